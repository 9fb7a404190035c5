//! Backend health, kept apart from selection (balancers only see which backends to skip).
//!
//! - [`active`]: HTTP/2 probes from one checker thread per process; its verdicts form a
//!   [`HealthView`] snapshot that the control thread sends to every worker.
//! - [`outlier`]: passive outlier detection, per worker, from the traffic that worker sees.

pub mod active;
pub mod outlier;

use std::collections::HashSet;
use std::net::SocketAddr;

/// Which backends active health checking currently considers down. Immutable; replaced
/// whole when a verdict changes. Keyed by address, so it survives reloads that renumber pools.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HealthView {
    pub down: HashSet<SocketAddr>,
}

impl HealthView {
    pub fn is_down(&self, addr: &SocketAddr) -> bool {
        self.down.contains(addr)
    }
}
