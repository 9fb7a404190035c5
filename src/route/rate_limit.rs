//! Per-route rate limits: GCRA (the generic cell rate algorithm) keyed by client IP or a
//! header, one set per worker.
//!
//! The configured `rate` and `burst` are for the whole process and split evenly across workers
//! (each enforces `rate / workers` per second with `burst / workers` requests at once, at least
//! 1): no shared state, at the price of a limit that is exact only when traffic spreads evenly
//! over workers (QUIC connections are spread by the kernel's hash). A limited request gets 429
//! with `retry-after`.
//!
//! GCRA keeps one integer per key, the key's theoretical arrival time (TAT): a request is
//! allowed while the TAT is less than `burst` emission intervals ahead of now, and moves it one
//! interval on. A key whose TAT has passed is the same as an unseen key, so it can be dropped:
//! every check looks at two keys in creation order and drops them if they are spent, which
//! keeps the table near the number of keys active within one burst window, without a full
//! scan. The table is bounded by [`MAX_KEYS`]: when a flood of distinct keys fills it, new
//! keys share one overflow key, so they are still limited, together.

use crate::config::{HashKey, RateLimit};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Keys tracked per route on one worker (about 40 bytes each).
pub const MAX_KEYS: usize = 100_000;

/// Keys examined for eviction on every check.
const SWEEP: usize = 2;

/// The key that stands for every key the full table has no room for.
const OVERFLOW: u64 = u64::MAX;

/// One route's limiter on one worker.
pub struct RateLimiter {
    key: HashKey,
    /// Nanoseconds between two requests of one key at the limit.
    interval: u64,
    /// How far ahead of now a key's TAT may be and still be allowed: `burst` intervals.
    tolerance: u64,
    /// Each key's TAT, in nanoseconds since `epoch`.
    tats: HashMap<u64, u64>,
    /// Keys in the order they were (re)visited by the sweep.
    order: VecDeque<u64>,
    epoch: Instant,
}

impl RateLimiter {
    pub fn new(limit: &RateLimit, workers: usize) -> Self {
        let workers = workers.max(1) as f64;
        let per_second = (limit.rate / workers).max(f64::MIN_POSITIVE);
        let burst = (f64::from(limit.burst) / workers).max(1.0);
        let interval = (1e9 / per_second).min(u64::MAX as f64 / 4.0 / burst).max(1.0);
        RateLimiter {
            key: limit.key.clone(),
            interval: interval as u64,
            tolerance: (interval * burst) as u64,
            tats: HashMap::new(),
            order: VecDeque::new(),
            epoch: Instant::now(),
        }
    }

    pub fn key(&self) -> &HashKey {
        &self.key
    }

    /// Keys the limiter holds state for.
    pub fn tracked(&self) -> usize {
        self.tats.len()
    }

    /// Admits one request for `key` (a hash of the request's key value); `Err(wait)` when the
    /// key is over its limit, with the time until it may send again.
    pub fn check(&mut self, key: u64, now: Instant) -> Result<(), Duration> {
        let now = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.sweep(now);
        let key = if self.tats.len() >= MAX_KEYS && !self.tats.contains_key(&key) { OVERFLOW } else { key };
        let tat = match self.tats.get(&key) {
            Some(&tat) => tat.max(now),
            None => {
                self.order.push_back(key);
                now
            }
        };
        let next = tat + self.interval;
        if next - now > self.tolerance {
            return Err(Duration::from_nanos(next - now - self.tolerance));
        }
        self.tats.insert(key, next);
        Ok(())
    }

    /// Drops up to [`SWEEP`] keys whose TAT has passed; the others go to the back.
    fn sweep(&mut self, now: u64) {
        for _ in 0..SWEEP.min(self.order.len()) {
            let Some(key) = self.order.pop_front() else { return };
            match self.tats.get(&key) {
                Some(&tat) if tat > now => self.order.push_back(key),
                _ => {
                    self.tats.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: f64, burst: u32, workers: usize) -> RateLimiter {
        RateLimiter::new(&RateLimit { rate, burst, key: HashKey::ClientIp }, workers)
    }

    #[test]
    fn bursts_then_refills_at_the_rate_split_across_workers() {
        let mut l = limiter(20.0, 10, 2); // per worker: 10/s, burst 5
        let t = Instant::now();
        for _ in 0..5 {
            assert!(l.check(1, t).is_ok());
        }
        let wait = l.check(1, t).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(l.check(2, t).is_ok(), "keys are independent");
        assert!(l.check(1, t + Duration::from_millis(100)).is_ok(), "one request after 1/rate");
        assert!(l.check(1, t + Duration::from_millis(100)).is_err());
        for _ in 0..5 {
            assert!(l.check(1, t + Duration::from_secs(10)).is_ok(), "refilled up to the burst");
        }
        assert!(l.check(1, t + Duration::from_secs(10)).is_err());
    }

    #[test]
    fn spent_keys_are_dropped_as_traffic_goes_on() {
        let mut l = limiter(10.0, 1, 1); // a key is spent 100 ms after its request
        let t = Instant::now();
        for key in 0..1_000 {
            assert!(l.check(key, t).is_ok());
        }
        assert_eq!(l.tracked(), 1_000);
        // A second later every one of them is spent: one key's traffic sweeps them out.
        let later = t + Duration::from_secs(1);
        for _ in 0..600 {
            let _ = l.check(5_000, later);
        }
        assert_eq!(l.tracked(), 1, "only the active key is left");
    }

    #[test]
    fn a_flood_of_keys_is_bounded_and_still_limited() {
        let mut l = limiter(1.0, 1, 1);
        let t = Instant::now();
        // Every key is active (1 request per second each), far more keys than fit.
        let admitted = (0..(MAX_KEYS as u64 + 50_000)).filter(|&key| l.check(key, t).is_ok()).count();
        assert!(l.tracked() <= MAX_KEYS + 1, "{} keys tracked", l.tracked());
        // The keys past the bound share one key: one of them got in, the rest were limited.
        assert_eq!(admitted, MAX_KEYS + 1);
    }
}
