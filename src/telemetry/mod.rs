//! Telemetry: logs ([`init_logging`]; [`log_limit`] rate-limits lines clients can cause),
//! Prometheus metrics ([`metrics`]) and the access log ([`access_log`]).
//!
//! Hot-path recording is per worker: every series a worker updates per packet or per request
//! carries a `worker` label and is registered once into a [`metrics::WorkerMetrics`] handle, so
//! recording is an atomic add on a cache line no other worker touches — no registry lookup, no
//! lock. Rare events (failures, reloads) use the `metrics` macros directly.

pub mod access_log;
pub mod log_limit;
pub mod metrics;

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the log subscriber: `RUST_LOG` if set, else the configured level. Logs go to stderr.
pub fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
