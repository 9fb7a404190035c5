//! Consistent hashing on a ring (ketama): every backend owns points on a 64-bit circle, spread
//! by hashing its address with a replica number, and a key goes to the owner of the first point
//! at or after its hash. Removing a backend moves only its own keys, to its ring successors;
//! lookups are a binary search (O(log points)) and balance needs many points per backend, so
//! it trades memory for smoothness where [`super::maglev`] trades rebuild cost for speed.

use super::sample::{all_excluded, entropy_seed, Rng, WeightedSampler};
use super::{identities, splitmix64, BackendId, Balancer, PickContext};

/// Points given to a backend of the pool's smallest weight; a backend of weight `w` gets
/// `w / w_min` times as many. Balance improves with points per backend (±1/√points relative),
/// not with the total, so there is no minimum ring size: a minimum would make every backend's
/// point count depend on the pool's size, and removing one backend would then move keys
/// between the others.
pub const POINTS_PER_MIN_WEIGHT: u64 = 256;

/// Cap on the ring (12 bytes per point: ~96 MiB at the cap). Only extreme weight ratios reach
/// it; every backend's share of points is then scaled down alike (at least one point each).
pub const MAX_RING_SIZE: u64 = 8 << 20;

/// A ketama-style consistent-hash ring over the pool's backends.
pub struct RingHash {
    /// Point positions, ascending.
    points: Vec<u64>,
    /// `owners[i]` owns `points[i]`.
    owners: Vec<u32>,
    backends: usize,
    /// Picks for requests without a hash key.
    sampler: WeightedSampler,
    rng: Rng,
}

impl RingHash {
    /// A ring over `(address, weight)` pairs, in pool order (a pick returns the pair's index).
    /// A backend's points derive from its address, its weight and the pool's smallest weight
    /// only, so other backends coming and going leave them in place. Requests without a hash
    /// fall back to a weighted random pick, seeded from the OS.
    pub fn new(backends: &[(&str, u32)]) -> Self {
        Self::with_seed(backends, entropy_seed())
    }

    /// Same, with a fixed seed for the hashless fallback (tests, benchmarks).
    pub fn with_seed(backends: &[(&str, u32)], seed: u64) -> Self {
        let weights: Vec<u32> = backends.iter().map(|&(_, w)| w).collect();
        let min = u64::from(weights.iter().copied().min().unwrap_or(1).max(1));
        let mut counts: Vec<u64> =
            weights.iter().map(|&w| (u64::from(w) * POINTS_PER_MIN_WEIGHT + min / 2) / min).collect();
        let total: u64 = counts.iter().sum();
        if total > MAX_RING_SIZE {
            counts.iter_mut().for_each(|c| *c = (*c * MAX_RING_SIZE / total).max(1));
        }
        let mut ring: Vec<(u64, u32)> = Vec::with_capacity(counts.iter().sum::<u64>() as usize);
        for (owner, (id, &count)) in identities(backends).into_iter().zip(&counts).enumerate() {
            ring.extend((0..count).map(|replica| (splitmix64(id, replica), owner as u32)));
        }
        ring.sort_unstable();
        let (points, owners) = ring.into_iter().unzip();
        RingHash {
            points,
            owners,
            backends: backends.len(),
            sampler: WeightedSampler::new(&weights),
            rng: Rng::seeded(seed),
        }
    }
}

impl Balancer for RingHash {
    /// The owner of the first point at or after `ctx.hash` (wrapping around); when that owner
    /// is excluded, the next point's owner that is not. Without a hash: weighted random.
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<BackendId> {
        let Some(hash) = ctx.hash else {
            return self.sampler.sample(&mut self.rng, ctx.excluded, None);
        };
        if self.points.is_empty() || (!ctx.excluded.is_empty() && all_excluded(self.backends, ctx.excluded)) {
            return None;
        }
        let start = self.points.partition_point(|&p| p < hash);
        let len = self.points.len();
        (0..len).map(|k| self.owners[(start + k) % len] as BackendId).find(|b| !ctx.excluded.contains(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::hash_tests;

    fn ring(backends: &[(&str, u32)]) -> Box<dyn Balancer> {
        Box::new(RingHash::with_seed(backends, 1))
    }

    #[test]
    fn same_hash_same_backend() {
        hash_tests::same_hash_same_backend(ring);
    }

    #[test]
    fn key_shares_follow_weights() {
        hash_tests::key_shares_follow_weights(ring, 0.03, 0.05);
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let moved_from_others = hash_tests::removal_moves_few_keys(ring, 0.10);
        // Stronger than the bound: the survivors' points do not move, so neither do their keys.
        assert_eq!(moved_from_others, 0);
    }

    #[test]
    fn exclusion_walks_to_the_next_backend_and_moves_nothing_else() {
        hash_tests::exclusion_is_consistent(ring);
    }

    #[test]
    fn without_hash_picks_by_weight() {
        hash_tests::hashless_fallback_is_weighted(ring);
    }

    #[test]
    fn single_backend() {
        hash_tests::single_backend(ring);
    }

    #[test]
    fn points_follow_weight_ratios() {
        let r = RingHash::with_seed(&[("a:1", 2), ("b:1", 4), ("c:1", 5)], 1);
        let count = |b| r.owners.iter().filter(|&&o| o == b).count();
        assert_eq!((count(0), count(1), count(2)), (256, 512, 640));
        assert!(r.points.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn ring_is_capped() {
        let r = RingHash::with_seed(&[("a:1", 1), ("b:1", 10_000), ("c:1", 10_000), ("d:1", 10_000)], 1);
        assert!(r.points.len() as u64 <= MAX_RING_SIZE + 4, "{}", r.points.len());
        assert!(r.owners.contains(&0));
    }
}
