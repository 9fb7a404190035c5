//! Least request with the power of two choices (Mitzenmacher): draw two distinct backends by
//! weight and send to the one with fewer outstanding requests per unit of weight. Comparing two
//! random candidates, rather than scanning for the global minimum, is O(log n) and keeps
//! independent worker replicas from herding onto the same momentarily idle backend; it reacts
//! to slow backends only through their growing backlog, not their latency.

use super::sample::{entropy_seed, Rng, WeightedSampler};
use super::{BackendId, Balancer, PickContext};
use std::time::Duration;

/// Power-of-two-choices least outstanding requests, weighted.
pub struct LeastRequest {
    sampler: WeightedSampler,
    /// Requests started and not yet ended, per backend.
    active: Vec<u64>,
    rng: Rng,
}

impl LeastRequest {
    /// A balancer over backends with these weights, seeded from the OS.
    pub fn new(weights: &[u32]) -> Self {
        Self::with_seed(weights, entropy_seed())
    }

    /// Same, with a fixed seed: the sequence of picks is reproducible (tests, benchmarks).
    pub fn with_seed(weights: &[u32], seed: u64) -> Self {
        LeastRequest { sampler: WeightedSampler::new(weights), active: vec![0; weights.len()], rng: Rng::seeded(seed) }
    }
}

impl Balancer for LeastRequest {
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<BackendId> {
        let a = self.sampler.sample(&mut self.rng, ctx.excluded, None)?;
        let Some(b) = self.sampler.sample(&mut self.rng, ctx.excluded, Some(a)) else {
            return Some(a);
        };
        // active_b / w_b < active_a / w_a, without division. Ties go to the first draw, so an
        // idle pool is split exactly by weight.
        let (wa, wb) = (self.sampler.weight(a), self.sampler.weight(b));
        Some(if self.active[b] * wa < self.active[a] * wb { b } else { a })
    }

    fn on_start(&mut self, backend: BackendId) {
        if let Some(n) = self.active.get_mut(backend) {
            *n += 1;
        }
    }

    fn on_end(&mut self, backend: BackendId, _latency: Duration, _ok: bool) {
        self.on_cancel(backend);
    }

    fn on_cancel(&mut self, backend: BackendId) {
        if let Some(n) = self.active.get_mut(backend) {
            *n = n.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::{assert_shares, test_ctx};

    fn picks(lb: &mut LeastRequest, n: usize, excluded: &[BackendId]) -> Vec<u64> {
        let mut counts = vec![0u64; lb.active.len()];
        for _ in 0..n {
            counts[lb.pick(&test_ctx(None, excluded)).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn idle_distribution_follows_weights() {
        let mut lb = LeastRequest::with_seed(&[1, 2, 5], 1);
        assert_shares(&picks(&mut lb, 80_000, &[]), &[1, 2, 5], 0.03);
    }

    #[test]
    fn outstanding_requests_shift_picks_away_and_back() {
        let mut lb = LeastRequest::with_seed(&[1, 1, 1], 2);
        for _ in 0..50 {
            lb.on_start(0);
        }
        // Backend 0 loses every comparison: it can only win against itself, which P2C never draws.
        assert_eq!(picks(&mut lb, 3_000, &[])[0], 0);
        for _ in 0..50 {
            lb.on_end(0, Duration::from_millis(1), true);
        }
        assert_shares(&picks(&mut lb, 30_000, &[]), &[1, 1, 1], 0.03);
    }

    #[test]
    fn load_is_compared_per_unit_of_weight() {
        let mut lb = LeastRequest::with_seed(&[1, 4], 3);
        // 3 outstanding on weight 4 (0.75 per unit) beats 1 on weight 1 (1 per unit).
        lb.on_start(0);
        for _ in 0..3 {
            lb.on_start(1);
        }
        assert_eq!(picks(&mut lb, 1_000, &[]), vec![0, 1_000]);
    }

    #[test]
    fn closed_loop_load_follows_weights() {
        // 80 requests always in flight; each pick replaces the oldest. With equal latencies the
        // outstanding counts settle proportional to weight, and so do the picks (±3%).
        let mut lb = LeastRequest::with_seed(&[1, 2, 5], 4);
        let mut in_flight = std::collections::VecDeque::new();
        let mut counts = [0u64; 3];
        for i in 0..100_000 {
            if in_flight.len() == 80 {
                lb.on_end(in_flight.pop_front().unwrap(), Duration::from_millis(1), true);
            }
            let b = lb.pick(&test_ctx(None, &[])).unwrap();
            lb.on_start(b);
            in_flight.push_back(b);
            if i >= 10_000 {
                counts[b] += 1;
            }
        }
        assert_shares(&counts, &[1, 2, 5], 0.03);
    }

    #[test]
    fn on_end_saturates_at_zero() {
        let mut lb = LeastRequest::with_seed(&[1, 1], 5);
        lb.on_end(0, Duration::ZERO, false);
        lb.on_end(9, Duration::ZERO, false);
        assert_eq!(lb.active, vec![0, 0]);
    }

    #[test]
    fn excluded_and_single_backend() {
        let mut lb = LeastRequest::with_seed(&[3, 1, 1], 6);
        lb.on_start(1);
        lb.on_start(1);
        let counts = picks(&mut lb, 5_000, &[0, 2]);
        assert_eq!(counts, vec![0, 5_000, 0]);
        assert_eq!(lb.pick(&test_ctx(None, &[2, 1, 0])), None);
        let mut one = LeastRequest::with_seed(&[4], 7);
        one.on_start(0);
        assert_eq!(one.pick(&test_ctx(None, &[])), Some(0));
        assert_eq!(one.pick(&test_ctx(None, &[0])), None);
    }
}
