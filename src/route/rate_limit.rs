//! Per-route rate limits: token buckets keyed by client IP or a header, one set per worker.
//!
//! The configured `rate` and `burst` are for the whole process and split evenly across workers
//! (each enforces `rate / workers` per second with `burst / workers` tokens, at least 1): no
//! shared state, at the price of a limit that is exact only when traffic spreads evenly over
//! workers (QUIC connections are spread by the kernel's hash). A limited request gets 429 with
//! `retry-after`.

use crate::config::{HashKey, RateLimit};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Buckets kept per route before idle ones are swept.
const MAX_BUCKETS: usize = 100_000;

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// One route's limiter on one worker.
pub struct RateLimiter {
    key: HashKey,
    per_second: f64,
    burst: f64,
    buckets: HashMap<u64, Bucket>,
}

impl RateLimiter {
    pub fn new(limit: &RateLimit, workers: usize) -> Self {
        let workers = workers.max(1) as f64;
        RateLimiter {
            key: limit.key.clone(),
            per_second: (limit.rate / workers).max(f64::MIN_POSITIVE),
            burst: (f64::from(limit.burst) / workers).max(1.0),
            buckets: HashMap::new(),
        }
    }

    pub fn key(&self) -> &HashKey {
        &self.key
    }

    /// Takes a token for `key` (a hash of the request's key value); `Err(wait)` when the
    /// bucket is empty, with the time until the next token.
    pub fn check(&mut self, key: u64, now: Instant) -> Result<(), Duration> {
        if self.buckets.len() >= MAX_BUCKETS && !self.buckets.contains_key(&key) {
            // Full buckets are indistinguishable from new ones: forget those.
            let refill = Duration::from_secs_f64(self.burst / self.per_second);
            self.buckets.retain(|_, b| now.duration_since(b.last) < refill);
        }
        let b = self.buckets.entry(key).or_insert(Bucket { tokens: self.burst, last: now });
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * self.per_second).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.per_second))
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
        assert!(l.check(1, t + Duration::from_millis(100)).is_ok(), "one token after 1/rate");
        assert!(l.check(1, t + Duration::from_millis(100)).is_err());
        for _ in 0..5 {
            assert!(l.check(1, t + Duration::from_secs(10)).is_ok(), "refilled up to the burst");
        }
        assert!(l.check(1, t + Duration::from_secs(10)).is_err());
    }
}
