//! Logs (through `tracing`) and, with the control-plane issue, metrics export.

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
