//! Tools Spooky ships so a person (and the tests) can try it with nothing else installed:
//!
//! - [`backend`]: an HTTP/2 (h2c) test backend — sized bodies, echo, sink, status, delay,
//!   trailers, resets (`spooky-backend`).
//! - [`h3client`]: a small blocking HTTP/3 client on quiche (`spooky-client`), also used by the
//!   integration tests and benchmarks.
//! - [`pattern`]: the deterministic byte pattern both use to check bodies by hash.
//! - [`certs`]: self-signed ECDSA or RSA test certificates.

pub mod backend;
pub mod certs;
pub mod h3client;
pub mod pattern;
