//! What a worker does with a client's first Initial: accept it, ask for address validation
//! with a Retry, or refuse it — decided before any connection state exists.
//!
//! Order of the checks: the connection limit first (a full worker refuses everyone), then
//! Retry for unvalidated clients (always, or in `auto` mode while the worker sees more new
//! connections per second than configured — a flood of spoofed Initials then costs one
//! stateless Retry each), then the new-connection rate limit.

use crate::config::{Quic, RetryMode};
use std::time::Instant;

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Retry,
    Refuse(Refusal),
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Refusal {
    /// The worker holds `max_connections_per_worker` connections.
    ConnectionLimit = 0,
    /// More than `max_new_connections_per_sec` this second.
    RateLimit,
}

pub struct Admission {
    retry: RetryMode,
    retry_above_rate: f64,
    max_connections: usize,
    /// Token bucket for new connections: (tokens, last refill); None without a limit.
    bucket: Option<(f64, Instant)>,
    max_rate: f64,
    attempts: RateWindow,
}

impl Admission {
    pub fn new(q: &Quic, now: Instant) -> Self {
        let max_rate = f64::from(q.max_new_connections_per_sec);
        Admission {
            retry: q.retry,
            retry_above_rate: f64::from(q.retry_above_rate),
            max_connections: q.max_connections_per_worker,
            bucket: (max_rate > 0.0).then_some((max_rate, now)),
            max_rate,
            attempts: RateWindow::new(now),
        }
    }

    /// Keeps the measured rate when the limits change on reload.
    pub fn reconfigure(&mut self, q: &Quic, now: Instant) {
        let attempts = std::mem::replace(&mut self.attempts, RateWindow::new(now));
        *self = Admission { attempts, ..Admission::new(q, now) };
    }

    /// Decides for an Initial that would open a connection; `validated` when it carried a
    /// valid Retry token or NEW_TOKEN token (its address is proven: no Retry, whatever the
    /// mode), `active` the worker's connection count.
    pub fn decide(&mut self, validated: bool, active: usize, now: Instant) -> Verdict {
        if active >= self.max_connections {
            return Verdict::Refuse(Refusal::ConnectionLimit);
        }
        if !validated {
            // A validated Initial completes an attempt already counted when it was retried.
            let rate = self.attempts.record(now);
            let retry = match self.retry {
                RetryMode::Never => false,
                RetryMode::Always => true,
                RetryMode::Auto => rate > self.retry_above_rate,
            };
            if retry {
                return Verdict::Retry;
            }
        }
        if let Some((tokens, last)) = self.bucket.as_mut() {
            let elapsed = now.saturating_duration_since(*last).as_secs_f64();
            *tokens = (*tokens + elapsed * self.max_rate).min(self.max_rate);
            *last = now;
            if *tokens < 1.0 {
                return Verdict::Refuse(Refusal::RateLimit);
            }
            *tokens -= 1.0;
        }
        Verdict::Accept
    }
}

/// Events per second over a sliding one-second window, estimated from the counts of the
/// current and the previous whole second (as nginx's and Cloudflare's rate limiters do).
struct RateWindow {
    start: Instant,
    current: u64,
    previous: u64,
}

impl RateWindow {
    fn new(now: Instant) -> Self {
        RateWindow { start: now, current: 0, previous: 0 }
    }

    /// Counts one event at `now`; the estimated rate including it.
    fn record(&mut self, now: Instant) -> f64 {
        let mut elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        if elapsed >= 1.0 {
            let whole = elapsed.floor();
            self.previous = if whole >= 2.0 { 0 } else { self.current };
            self.current = 0;
            self.start += std::time::Duration::from_secs_f64(whole);
            elapsed -= whole;
        }
        self.current += 1;
        self.previous as f64 * (1.0 - elapsed) + self.current as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn quic(retry: RetryMode, above: u32, max_conns: usize, max_rate: u32) -> Quic {
        Quic {
            retry,
            retry_above_rate: above,
            max_connections_per_worker: max_conns,
            max_new_connections_per_sec: max_rate,
            ..Quic::default()
        }
    }

    #[test]
    fn auto_retry_engages_only_above_the_rate() {
        let t0 = Instant::now();
        let mut a = Admission::new(&quic(RetryMode::Auto, 10, 100, 0), t0);
        let verdicts: Vec<_> = (0..15).map(|i| a.decide(false, 0, t0 + Duration::from_millis(i * 10))).collect();
        assert!(verdicts[..10].iter().all(|v| *v == Verdict::Accept), "{verdicts:?}");
        assert!(verdicts[10..].iter().all(|v| *v == Verdict::Retry), "{verdicts:?}");
        // Validated clients get through during the flood.
        assert_eq!(a.decide(true, 0, t0 + Duration::from_millis(200)), Verdict::Accept);
        // Two quiet seconds later the rate has decayed.
        assert_eq!(a.decide(false, 0, t0 + Duration::from_secs(3)), Verdict::Accept);
    }

    #[test]
    fn never_and_always() {
        let t0 = Instant::now();
        let mut never = Admission::new(&quic(RetryMode::Never, 1, 100, 0), t0);
        assert!((0..50).all(|_| never.decide(false, 0, t0) == Verdict::Accept));
        let mut always = Admission::new(&quic(RetryMode::Always, 1, 100, 0), t0);
        assert_eq!(always.decide(false, 0, t0), Verdict::Retry);
        assert_eq!(always.decide(true, 0, t0), Verdict::Accept);
    }

    #[test]
    fn limits_refuse() {
        let t0 = Instant::now();
        let mut a = Admission::new(&quic(RetryMode::Never, 1, 3, 5), t0);
        assert_eq!(a.decide(false, 3, t0), Verdict::Refuse(Refusal::ConnectionLimit));
        let accepted = (0..8).filter(|_| a.decide(false, 0, t0) == Verdict::Accept).count();
        assert_eq!(accepted, 5, "a full bucket admits a burst of max_new_connections_per_sec");
        assert_eq!(a.decide(false, 0, t0), Verdict::Refuse(Refusal::RateLimit));
        assert_eq!(a.decide(false, 0, t0 + Duration::from_millis(250)), Verdict::Accept, "refilled");
    }
}
