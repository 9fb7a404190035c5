//! Spooky: an HTTP/3 edge proxy. QUIC + TLS 1.3 in (quiche), pooled multiplexed HTTP/2 out (h2),
//! one pinned io_uring worker per core (monoio), nothing shared on the request path.
//!
//! Modules follow the data path:
//! [`config`] → [`control`] (start-up) → [`edge`] (QUIC/HTTP/3, per worker) → [`bridge`]
//! (HTTP/3 ⇄ HTTP/2 mapping) → [`route`] → [`lb`] → [`transport`] (HTTP/2 pool) → backends.
//! [`health`] tells which backends to avoid; [`telemetry`] serves logs and metrics; [`tools`] holds the demo backend and HTTP/3 client.
//! [`fuzzing`] holds the checks behind the fuzz targets in `fuzz/` (and their regression tests).

pub mod bridge;
pub mod config;
pub mod control;
pub mod edge;
pub mod fuzzing;
pub mod health;
pub mod lb;
pub mod route;
pub mod runtime;
pub mod telemetry;
pub mod tools;
pub mod transport;
