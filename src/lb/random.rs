//! Weighted random: each pick draws a backend with probability proportional to its weight
//! (prefix sums + binary search, O(log n)). Stateless, so replicas in many workers need no
//! coordination and never synchronize into bursts; the price is that short windows are noisy,
//! unlike round robin's exact cycles, and load is ignored.

use super::sample::{entropy_seed, Rng, WeightedSampler};
use super::{BackendId, Balancer, PickContext};

/// Weighted random choice among the non-excluded backends.
pub struct WeightedRandom {
    sampler: WeightedSampler,
    rng: Rng,
}

impl WeightedRandom {
    /// A balancer over backends with these weights, seeded from the OS.
    pub fn new(weights: &[u32]) -> Self {
        Self::with_seed(weights, entropy_seed())
    }

    /// Same, with a fixed seed: the sequence of picks is reproducible (tests, benchmarks).
    pub fn with_seed(weights: &[u32], seed: u64) -> Self {
        WeightedRandom { sampler: WeightedSampler::new(weights), rng: Rng::seeded(seed) }
    }
}

impl Balancer for WeightedRandom {
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<BackendId> {
        self.sampler.sample(&mut self.rng, ctx.excluded, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::{assert_shares, test_ctx};

    #[test]
    fn distribution_follows_weights() {
        let mut lb = WeightedRandom::with_seed(&[1, 2, 5], 1);
        let mut counts = [0u64; 3];
        for _ in 0..80_000 {
            counts[lb.pick(&test_ctx(None, &[])).unwrap()] += 1;
        }
        assert_shares(&counts, &[1, 2, 5], 0.03);
    }

    #[test]
    fn excluded_backends_are_never_picked() {
        let mut lb = WeightedRandom::with_seed(&[1, 2, 5], 2);
        let mut counts = [0u64; 3];
        for _ in 0..30_000 {
            counts[lb.pick(&test_ctx(None, &[2])).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        assert_shares(&counts[..2], &[1, 2], 0.03);
        assert_eq!(lb.pick(&test_ctx(None, &[0, 1, 2])), None);
    }

    #[test]
    fn single_backend() {
        let mut lb = WeightedRandom::with_seed(&[7], 3);
        for _ in 0..100 {
            assert_eq!(lb.pick(&test_ctx(None, &[])), Some(0));
        }
        assert_eq!(lb.pick(&test_ctx(None, &[0])), None);
    }

    #[test]
    fn seeds_give_different_sequences() {
        let seq = |seed| {
            let mut lb = WeightedRandom::with_seed(&[1, 1, 1, 1], seed);
            (0..32).map(|_| lb.pick(&test_ctx(None, &[])).unwrap()).collect::<Vec<_>>()
        };
        assert_eq!(seq(5), seq(5));
        assert_ne!(seq(5), seq(6));
    }
}
