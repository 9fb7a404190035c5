//! Request pacing. Closed loop: a request starts whenever a stream is free. Open loop: requests
//! are due on a fixed schedule and each one's latency counts from its *intended* start, so a
//! stalled server cannot hide its stall by slowing the generator (no coordinated omission).

use std::time::{Duration, Instant};

#[derive(Debug)]
pub enum Pacer {
    Closed,
    Open { next: Instant, interval: Duration },
}

impl Pacer {
    /// `rate` in requests per second; `None` for closed loop.
    pub fn new(rate: Option<f64>, start: Instant) -> Self {
        match rate {
            Some(r) if r > 0.0 => Pacer::Open { next: start, interval: Duration::from_secs_f64(1.0 / r) },
            _ => Pacer::Closed,
        }
    }

    /// When the next request is due (`None`: whenever a stream is free).
    pub fn due(&self) -> Option<Instant> {
        match self {
            Pacer::Closed => None,
            Pacer::Open { next, .. } => Some(*next),
        }
    }

    /// Takes the next slot: returns its intended start (`now` in closed loop; possibly in the
    /// future in open loop, where the caller waits for it).
    pub fn claim(&mut self, now: Instant) -> Instant {
        match self {
            Pacer::Closed => now,
            Pacer::Open { next, interval } => {
                let t = *next;
                *next += *interval;
                t
            }
        }
    }

    /// Takes the next slot only if it is due at `now`.
    pub fn claim_due(&mut self, now: Instant) -> Option<Instant> {
        match self.due() {
            Some(t) if t > now => None,
            _ => Some(self.claim(now)),
        }
    }
}
