//! The QUIC + HTTP/3 edge: one event loop per worker.
//!
//! - [`socket`]: the worker's `SO_REUSEPORT` UDP sockets.
//! - [`cid`]: Spooky's connection-ID layout (rotation, server id, worker id, nonce).
//! - [`tls`]: certificate material (loaded by the control thread, shared by workers).
//! - [`settings`]: the `quiche` transport and HTTP/3 configuration built from a snapshot.
//! - [`connection`]: one QUIC connection: its HTTP/3 streams and their bridge to upstream tasks.
//! - [`worker`]: the loop itself — receive → timers → upstream news → send → wait.

pub mod cid;
pub mod connection;
pub mod settings;
pub mod socket;
pub mod tls;
pub mod worker;
