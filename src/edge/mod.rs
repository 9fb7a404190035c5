//! The QUIC + HTTP/3 edge: one event loop per worker.
//!
//! - [`socket`]: the worker's `SO_REUSEPORT` UDP sockets.
//! - [`pacing`]: when each datagram may leave, and holding the ones not yet due.
//! - [`cid`]: Spooky's connection-ID layout (rotation, server id, worker id, nonce).
//! - [`steering`]: the reuseport BPF program and the hand-off of stray packets between workers.
//! - [`keys`]: the secrets behind stateless resets and Retry tokens.
//! - [`retry`]: sealing and checking Retry tokens.
//! - [`admission`]: accept, Retry or refuse a new connection (limits, flood response).
//! - [`refuse`]: the stateless CONNECTION_REFUSED answer (hand-built server Initial).
//! - [`tls`]: certificate material (loaded by the control thread, shared by workers).
//! - [`settings`]: the `quiche` transport and HTTP/3 configuration built from a snapshot.
//! - [`connection`]: one QUIC connection: its HTTP/3 streams and their bridge to upstream tasks.
//! - [`handshake`]: connections that end before their handshake completes: cause, metric, log.
//! - [`worker`]: the loop itself — receive → timers → upstream news → send → wait.

pub mod admission;
pub mod cid;
pub mod connection;
pub mod handshake;
pub mod keys;
pub mod pacing;
pub mod refuse;
pub mod retry;
pub mod settings;
pub mod socket;
pub mod steering;
pub mod tls;
pub mod worker;
