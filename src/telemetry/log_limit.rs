//! A rate limit for log lines a client can cause, so a flood cannot fill the log.
//!
//! [`LogLimit`] is a token bucket: `burst` lines at once, then `per_second` on average. The
//! caller asks before each line; a line refused is counted, and the count is handed back with
//! the next line allowed, for one summary line ("suppressed K lines") before it. The first
//! refused line of a flood is marked too, so the caller can say once that lines are being
//! suppressed (not again while the flood goes on: its summaries say so). Counting never
//! stops: metrics stay exact whatever the log shows.

use std::time::Instant;

/// What to do with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` lines were refused since the last line logged (0: none).
    Log { suppressed: u64 },
    /// Do not log it; `first` if it is the first one refused since a line was logged with
    /// nothing suppressed before it (the start of a flood).
    Suppress { first: bool },
}

#[derive(Debug, Clone)]
pub struct LogLimit {
    burst: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
    suppressed: u64,
    /// Lines were refused, and no line since was logged without a summary before it.
    flooding: bool,
}

impl LogLimit {
    /// A full bucket of `burst` lines (at least 1), refilled at `per_second`.
    pub fn new(burst: u32, per_second: f64, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        LogLimit { burst, per_second: per_second.max(0.0), tokens: burst, last: now, suppressed: 0, flooding: false }
    }

    /// Whether a line wanted at `now` may be logged. A clock that went back adds nothing.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            let suppressed = std::mem::take(&mut self.suppressed);
            self.flooding &= suppressed > 0;
            Verdict::Log { suppressed }
        } else {
            self.suppressed += 1;
            let first = !self.flooding;
            self.flooding = true;
            Verdict::Suppress { first }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_passes_then_lines_are_refused_and_counted_until_the_bucket_refills() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(3, 2.0, t0);
        for _ in 0..3 {
            assert_eq!(l.check(t0), Verdict::Log { suppressed: 0 });
        }
        assert_eq!(l.check(t0), Verdict::Suppress { first: true });
        for _ in 0..9 {
            assert_eq!(l.check(t0), Verdict::Suppress { first: false });
        }
        // Half a second at 2/s buys exactly one line, which reports the ten refused.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(l.check(t1), Verdict::Log { suppressed: 10 });
        // Still the same flood: no second notice.
        assert_eq!(l.check(t1), Verdict::Suppress { first: false });
        // A long pause refills to the burst, no further.
        let t2 = t1 + Duration::from_secs(3600);
        assert_eq!(l.check(t2), Verdict::Log { suppressed: 1 });
        assert_eq!(l.check(t2), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check(t2), Verdict::Log { suppressed: 0 });
        // A new flood gets its notice.
        assert_eq!(l.check(t2), Verdict::Suppress { first: true });
        assert_eq!(l.check(t2), Verdict::Suppress { first: false });
    }

    #[test]
    fn a_flood_logs_at_most_the_burst_plus_the_rate() {
        let t0 = Instant::now();
        let mut l = LogLimit::new(10, 1.0, t0);
        let (mut logged, mut reported) = (0u64, 0u64);
        // 100,000 lines over 10 s (one every 100 µs).
        for i in 0..100_000u64 {
            match l.check(t0 + Duration::from_micros(i * 100)) {
                Verdict::Log { suppressed } => {
                    logged += 1;
                    reported += suppressed;
                }
                Verdict::Suppress { .. } => {}
            }
        }
        assert!(logged <= 10 + 10, "{logged} lines logged");
        assert!(logged >= 10, "{logged} lines logged");
        // Everything refused so far is reported with the next line allowed.
        assert!(
            matches!(l.check(t0 + Duration::from_secs(60)), Verdict::Log { suppressed } if logged + reported + suppressed == 100_000)
        );
    }

    #[test]
    fn a_clock_going_back_adds_no_tokens() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut l = LogLimit::new(1, 1.0, t0);
        assert_eq!(l.check(t0), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check(t0 - Duration::from_secs(5)), Verdict::Suppress { first: true });
        assert_eq!(l.check(t0), Verdict::Suppress { first: false });
    }
}
