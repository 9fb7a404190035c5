//! Fault injection, for the end-to-end tests of the worker panic policy and of reload
//! acknowledgements: it lets a request make the worker handling it panic, or block its thread.
//!
//! It is honoured only when the environment variable `SPOOKY_FAULT_INJECTION=1` is set when
//! Spooky starts (read once by [`crate::control::run`], which logs a warning). Without it the
//! paths below are ordinary paths, routed like any other. It is not a configuration key, so a
//! configuration file (or a reload) can never turn it on.
//!
//! | request path | effect on the worker handling it |
//! |---|---|
//! | `/.spooky-fault/panic` | panics (in the request handler) |
//! | `/.spooky-fault/panic-task` | panics in a task spawned on the worker's runtime (as an upstream task would) |
//! | `/.spooky-fault/stall?ms=N` | blocks the worker thread for N ms (at most 10 s) |

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The environment variable that turns fault injection on at start-up.
pub const ENV: &str = "SPOOKY_FAULT_INJECTION";
pub const PANIC_PATH: &str = "/.spooky-fault/panic";
pub const TASK_PANIC_PATH: &str = "/.spooky-fault/panic-task";
pub const STALL_PATH: &str = "/.spooky-fault/stall";
const MAX_STALL: Duration = Duration::from_secs(10);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Reads [`ENV`]; true when fault injection is now on.
pub fn init_from_env() -> bool {
    let on = std::env::var(ENV).is_ok_and(|v| v == "1");
    ENABLED.store(on, Ordering::Relaxed);
    on
}

/// Called by the worker for every request head; does nothing unless enabled at start-up.
pub fn on_request(path: &str) {
    if !ENABLED.load(Ordering::Relaxed) {
        return;
    }
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    match route {
        PANIC_PATH => panic!("fault injection: {PANIC_PATH} requested"),
        TASK_PANIC_PATH => {
            monoio::spawn(async { panic!("fault injection: {TASK_PANIC_PATH} requested") });
        }
        STALL_PATH => {
            let ms = query.strip_prefix("ms=").and_then(|v| v.parse().ok()).unwrap_or(1000);
            std::thread::sleep(Duration::from_millis(ms).min(MAX_STALL));
        }
        _ => {}
    }
}
