//! What one load-generator thread is asked to do: the target, the traffic shape and the bounds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How connections are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Long-lived connections, `streams` requests in flight (or paced) on each.
    Load,
    /// A fresh connection (handshake) for every request; `connections` of them at once.
    NewConn,
    /// Open `connections` connections, one small request each, then hold them idle.
    Idle,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Load => "load",
            Mode::NewConn => "new-conn",
            Mode::Idle => "idle",
        }
    }
}

/// The request every stream sends.
#[derive(Clone, Debug)]
pub struct RequestSpec {
    pub method: String,
    pub authority: String,
    pub path: String,
    /// Request body length (pattern bytes); 0 sends no body.
    pub body: u64,
}

/// One thread's share of the run.
#[derive(Clone, Debug)]
pub struct Plan {
    pub peer: SocketAddr,
    pub mode: Mode,
    pub connections: usize,
    pub streams: usize,
    /// Open loop: requests per second for this thread. `None`: closed loop.
    pub rate: Option<f64>,
    /// Stop after this many requests (this thread's share).
    pub quota: Option<u64>,
    /// Length of the measured window (after connections are set up).
    pub duration: Option<Duration>,
    /// Nothing runs past this instant, whatever else happens.
    pub deadline: Instant,
    pub request: RequestSpec,
    /// Handshakes in progress at once while opening idle connections.
    pub handshake_window: usize,
}

impl Plan {
    /// True once the measured window that began at `start` is over.
    pub fn window_over(&self, start: Instant, now: Instant, finished: u64) -> bool {
        now >= self.deadline
            || self.duration.is_some_and(|d| now >= start + d)
            || self.quota.is_some_and(|q| finished >= q)
    }

    /// True if another request may be issued, given how many were already issued.
    pub fn may_issue(&self, issued: u64) -> bool {
        self.quota.is_none_or(|q| issued < q)
    }
}
