//! Load balancing: choose a backend of a pool for one request.
//!
//! Every worker owns its own balancer replica (no locks on the request path). An algorithm is
//! one file implementing [`Balancer`]; [`build`] maps the configured name to it.
//!
//! - [`round_robin`]: smooth weighted round robin.

pub mod round_robin;

use crate::config::{Balance, Upstream};
use std::net::SocketAddr;
use std::time::Duration;

/// Index of a backend within its pool.
pub type BackendId = usize;

/// What a balancer may look at when picking: the request's metadata and which backends
/// are excluded for this attempt (already tried, or unhealthy).
pub struct PickContext<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub client: SocketAddr,
    /// Hash of the pool's `hash_key` for this request (consistent-hashing algorithms only;
    /// `None` when the key is absent from the request, e.g. no such header).
    pub hash: Option<u64>,
    /// Backends not to return (e.g. the one a retry just failed on).
    pub excluded: &'a [BackendId],
}

/// A balancing algorithm over one pool's backends.
pub trait Balancer {
    /// Picks a backend, or `None` when every backend is excluded.
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<BackendId>;
    /// A request was sent to `backend` (load-aware algorithms count it).
    fn on_start(&mut self, _backend: BackendId) {}
    /// A request to `backend` ended; `latency` is the time to the response head, `ok` is false
    /// for gateway failures (connect errors, resets, 502/503/504).
    fn on_end(&mut self, _backend: BackendId, _latency: Duration, _ok: bool) {}
}

/// Builds the configured algorithm for a pool.
pub fn build(pool: &Upstream) -> Box<dyn Balancer> {
    let weights: Vec<u32> = pool.backends.iter().map(|b| b.weight).collect();
    match pool.balance {
        Balance::RoundRobin => Box::new(round_robin::SmoothWeighted::new(&weights)),
    }
}
