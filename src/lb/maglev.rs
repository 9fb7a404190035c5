//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): every backend walks its own
//! permutation of a prime-sized table (from two hashes of its address: offset and skip), and
//! the backends take turns claiming their next free slot until the table is full; a key goes to
//! `table[hash % M]`. Lookups are one array read and shares are even to within a slot, at the
//! price of an O(M log M) rebuild and slightly more key movement than a ring on pool changes.

use super::sample::{all_excluded, entropy_seed, Rng, WeightedSampler};
use super::{identities, splitmix64, BackendId, Balancer, PickContext};

/// Lookup table size M: prime (so every skip generates a full permutation) and ≫ 100 × the
/// number of backends, which keeps each backend's share within ~1% of its weight.
pub const TABLE_SIZE: usize = 65_537;

/// Rehashes tried when a key's slot belongs to an excluded backend, before scanning the table.
const REHASHES: u64 = 16;

/// A Maglev lookup table over the pool's backends.
pub struct Maglev {
    /// Slot → backend.
    table: Vec<u32>,
    backends: usize,
    /// Picks for requests without a hash key.
    sampler: WeightedSampler,
    rng: Rng,
}

impl Maglev {
    /// A table over `(address, weight)` pairs, in pool order (a pick returns the pair's index).
    /// Permutations derive from addresses, so the table shifts little when backends come and go.
    /// Requests without a hash fall back to a weighted random pick, seeded from the OS.
    pub fn new(backends: &[(&str, u32)]) -> Self {
        Self::with_seed(backends, entropy_seed())
    }

    /// Same, with a fixed seed for the hashless fallback (tests, benchmarks).
    pub fn with_seed(backends: &[(&str, u32)], seed: u64) -> Self {
        let weights: Vec<u32> = backends.iter().map(|&(_, w)| w).collect();
        Maglev {
            table: populate(&identities(backends), &weights),
            backends: backends.len(),
            sampler: WeightedSampler::new(&weights),
            rng: Rng::seeded(seed),
        }
    }
}

/// Weighted population, as Envoy does it: rounds `k = 1, 2, ...`; in each, backend `i` claims
/// its next free slot if `k · w_i ≥ credit_i`, then adds `w_max` to its credit. The heaviest
/// backend claims every round and one of weight `w_max / 3` every third round, so slot counts
/// follow weights to within one round's rounding. Everyone claims in round 1 (at least one slot).
fn populate(ids: &[u64], weights: &[u32]) -> Vec<u32> {
    let m = TABLE_SIZE as u64;
    let mut table = vec![u32::MAX; if ids.is_empty() { 0 } else { TABLE_SIZE }];
    // (next permutation position, skip, credit) per backend.
    let mut walk: Vec<(u64, u64, u64)> =
        ids.iter().map(|&id| (splitmix64(id, 0) % m, splitmix64(id, 1) % (m - 1) + 1, 0)).collect();
    let w_max = u64::from(weights.iter().copied().max().unwrap_or(1));
    let mut filled = 0;
    let mut round = 1u64;
    while filled < table.len() {
        for (i, (pos, skip, credit)) in walk.iter_mut().enumerate() {
            if round * u64::from(weights[i]) < *credit || filled == table.len() {
                continue;
            }
            *credit += w_max;
            while table[*pos as usize] != u32::MAX {
                *pos = (*pos + *skip) % m;
            }
            table[*pos as usize] = i as u32;
            filled += 1;
        }
        round += 1;
    }
    table
}

impl Balancer for Maglev {
    /// `table[hash % M]`; when that backend is excluded, `table[rehash_k % M]` for up to 16
    /// rehashes of the key, then the first slot after `hash % M` whose backend is not excluded
    /// (deterministic, so a key's fallback is stable too). Without a hash: weighted random.
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<BackendId> {
        let Some(hash) = ctx.hash else {
            return self.sampler.sample(&mut self.rng, ctx.excluded, None);
        };
        if self.table.is_empty() {
            return None;
        }
        let slot = |h: u64| self.table[(h % TABLE_SIZE as u64) as usize] as BackendId;
        let first = slot(hash);
        if !ctx.excluded.contains(&first) {
            return Some(first);
        }
        if all_excluded(self.backends, ctx.excluded) {
            return None;
        }
        let usable = |b: &BackendId| !ctx.excluded.contains(b);
        let start = (hash % TABLE_SIZE as u64) as usize;
        (0..REHASHES)
            .map(|k| slot(splitmix64(hash, k)))
            .find(usable)
            .or_else(|| (1..TABLE_SIZE).map(|j| self.table[(start + j) % TABLE_SIZE] as BackendId).find(usable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::hash_tests;

    fn maglev(backends: &[(&str, u32)]) -> Box<dyn Balancer> {
        Box::new(Maglev::with_seed(backends, 1))
    }

    #[test]
    fn same_hash_same_backend() {
        hash_tests::same_hash_same_backend(maglev);
    }

    #[test]
    fn key_shares_follow_weights() {
        hash_tests::key_shares_follow_weights(maglev, 0.03, 0.05);
    }

    #[test]
    fn removing_a_backend_moves_few_other_keys() {
        hash_tests::removal_moves_few_keys(maglev, 0.05);
    }

    #[test]
    fn exclusion_falls_back_consistently_and_moves_nothing_else() {
        hash_tests::exclusion_is_consistent(maglev);
    }

    #[test]
    fn without_hash_picks_by_weight() {
        hash_tests::hashless_fallback_is_weighted(maglev);
    }

    #[test]
    fn single_backend() {
        hash_tests::single_backend(maglev);
    }

    #[test]
    fn table_slots_follow_weights_closely() {
        let weights = [1, 2, 5];
        let table = populate(&identities(&[("a:1", 1), ("b:1", 2), ("c:1", 5)]), &weights);
        let counts: Vec<u64> = (0..3).map(|b| table.iter().filter(|&&o| o == b).count() as u64).collect();
        assert_eq!(counts.iter().sum::<u64>(), TABLE_SIZE as u64);
        crate::lb::assert_shares(&counts, &weights, 0.001);
    }

    #[test]
    fn scan_finds_a_backend_with_few_slots() {
        // Backend 0 holds ~0.01% of the table: rehashes almost surely miss it, the scan must not.
        let mut lb = Maglev::with_seed(&[("a:1", 1), ("b:1", 10_000)], 1);
        for key in 0..100u64 {
            let hash = crate::lb::hash_key(&key.to_le_bytes());
            assert_eq!(lb.pick(&crate::lb::test_ctx(Some(hash), &[1])), Some(0));
        }
    }
}
