//! Passive outlier detection (per worker): `consecutive_failures` gateway failures in a row
//! eject a backend for `base_ejection × n` (n = times ejected, capped at `max_ejection`), as
//! long as no more than `max_ejected_percent` of the pool is ejected at once — so a pool can
//! never eject itself empty. A success resets the failure count; an ejected backend returns
//! when its time is up.

use crate::config::Outlier;
use std::time::{Duration, Instant};

#[derive(Default, Clone)]
struct Backend {
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Outlier state of one pool.
pub struct OutlierDetector {
    settings: Outlier,
    backends: Vec<Backend>,
}

impl OutlierDetector {
    pub fn new(settings: &Outlier, backends: usize) -> Self {
        OutlierDetector { settings: settings.clone(), backends: vec![Backend::default(); backends] }
    }

    pub fn is_ejected(&self, backend: usize, now: Instant) -> bool {
        self.backends[backend].ejected_until.is_some_and(|t| now < t)
    }

    /// Records the outcome of a request; returns the ejection time when this one ejects.
    pub fn record(&mut self, backend: usize, gateway_failure: bool, now: Instant) -> Option<Duration> {
        if !gateway_failure {
            self.backends[backend].consecutive_failures = 0;
            return None;
        }
        let ejected_now = self.backends.iter().filter(|b| b.ejected_until.is_some_and(|t| now < t)).count();
        let b = &mut self.backends[backend];
        b.consecutive_failures += 1;
        if b.consecutive_failures < self.settings.consecutive_failures || b.ejected_until.is_some_and(|t| now < t) {
            return None;
        }
        let allowed = (ejected_now + 1) * 100 <= self.settings.max_ejected_percent as usize * self.backends.len();
        if !allowed {
            return None;
        }
        let b = &mut self.backends[backend];
        b.ejections += 1;
        b.consecutive_failures = 0;
        let time = (self.settings.base_ejection.0 * b.ejections).min(self.settings.max_ejection.0);
        b.ejected_until = Some(now + time);
        Some(time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Seconds;

    fn settings() -> Outlier {
        Outlier {
            consecutive_failures: 3,
            base_ejection: Seconds(Duration::from_secs(10)),
            max_ejection: Seconds(Duration::from_secs(25)),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn consecutive_failures_eject_for_growing_times() {
        let mut d = OutlierDetector::new(&settings(), 4);
        let t0 = Instant::now();
        assert_eq!(d.record(0, true, t0), None);
        assert_eq!(d.record(0, false, t0), None, "a success resets the count");
        d.record(0, true, t0);
        d.record(0, true, t0);
        assert_eq!(d.record(0, true, t0), Some(Duration::from_secs(10)));
        assert!(d.is_ejected(0, t0 + Duration::from_secs(9)));
        let t1 = t0 + Duration::from_secs(11);
        assert!(!d.is_ejected(0, t1), "back after the ejection time");
        for _ in 0..2 {
            d.record(0, true, t1);
        }
        assert_eq!(d.record(0, true, t1), Some(Duration::from_secs(20)), "second ejection lasts longer");
        let t2 = t1 + Duration::from_secs(21);
        for _ in 0..2 {
            d.record(0, true, t2);
        }
        assert_eq!(d.record(0, true, t2), Some(Duration::from_secs(25)), "capped at max_ejection");
    }

    #[test]
    fn never_ejects_more_than_the_allowed_share() {
        let mut d = OutlierDetector::new(&settings(), 4);
        let t = Instant::now();
        for b in 0..4 {
            for _ in 0..3 {
                d.record(b, true, t);
            }
        }
        let ejected = (0..4).filter(|&b| d.is_ejected(b, t)).count();
        assert_eq!(ejected, 2, "50% of 4 backends");
    }
}
