//! Shared pieces of the randomized algorithms: a small PRNG and weighted sampling that skips
//! excluded backends without allocating on the request path.

use super::{fmix64, BackendId};
use ring::rand::{SecureRandom, SystemRandom};

/// A seed from the OS (`getrandom` via ring), so every worker's replica draws differently.
/// Should the OS source fail, the wall clock seeds instead.
pub(crate) fn entropy_seed() -> u64 {
    let mut seed = [0u8; 8];
    if SystemRandom::new().fill(&mut seed).is_ok() {
        return u64::from_le_bytes(seed);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    fmix64(nanos as u64 ^ (nanos >> 64) as u64)
}

/// wyrand: a 64-bit PRNG with one add and one 128-bit multiply per output, passing BigCrush.
/// Not cryptographic; balancing only needs picks that are uncorrelated across workers.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn seeded(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    }

    /// Uniform in `0..n` (`n > 0`) by Lemire's multiply-shift; the bias is below n / 2^64.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// Draws backends with probability proportional to weight. Backend `i` owns the interval
/// `[ends[i] - w_i, ends[i])` of `0..total`; a draw is a binary search for the interval holding a
/// uniform number. Excluded backends are skipped by drawing in `0..total - excluded weight` and
/// shifting the number past each excluded interval, so exclusions cost O(k log k), not O(n).
pub(crate) struct WeightedSampler {
    ends: Vec<u64>,
    /// Sorted distinct excluded backends of the current draw (kept to reuse its allocation).
    skip: Vec<BackendId>,
}

impl WeightedSampler {
    pub(crate) fn new(weights: &[u32]) -> Self {
        let ends = weights
            .iter()
            .scan(0u64, |sum, &w| {
                *sum += u64::from(w);
                Some(*sum)
            })
            .collect();
        WeightedSampler { ends, skip: Vec::new() }
    }

    pub(crate) fn weight(&self, i: BackendId) -> u64 {
        self.ends[i] - self.start(i)
    }

    fn start(&self, i: BackendId) -> u64 {
        if i == 0 {
            0
        } else {
            self.ends[i - 1]
        }
    }

    /// A weighted draw among the backends neither in `excluded` nor equal to `also`; `None` when
    /// no weight is left.
    pub(crate) fn sample(
        &mut self,
        rng: &mut Rng,
        excluded: &[BackendId],
        also: Option<BackendId>,
    ) -> Option<BackendId> {
        let total = *self.ends.last()?;
        match (excluded.is_empty(), also) {
            (true, None) => return Some(self.find(rng.below(total))),
            // The second draw of two choices: one interval to skip, no list to build.
            (true, Some(a)) if a < self.ends.len() => {
                let rest = total - self.weight(a);
                if rest == 0 {
                    return None;
                }
                let r = rng.below(rest);
                return Some(self.find(if r < self.start(a) { r } else { r + self.weight(a) }));
            }
            _ => {}
        }
        self.skip.clear();
        for &b in excluded.iter().chain(also.iter()) {
            if b < self.ends.len() && !self.skip.contains(&b) {
                self.skip.push(b);
            }
        }
        self.skip.sort_unstable();
        let removed: u64 = self.skip.iter().map(|&b| self.weight(b)).sum();
        if removed >= total {
            return None;
        }
        let mut r = rng.below(total - removed);
        for &b in &self.skip {
            if r < self.start(b) {
                break;
            }
            r += self.weight(b);
        }
        Some(self.find(r))
    }

    fn find(&self, r: u64) -> BackendId {
        self.ends.partition_point(|&end| end <= r)
    }
}

/// Whether `excluded` names every one of `n` backends (duplicates and out-of-range ids ignored).
pub(crate) fn all_excluded(n: usize, excluded: &[BackendId]) -> bool {
    let distinct = excluded.iter().enumerate().filter(|&(j, &b)| b < n && !excluded[..j].contains(&b)).count();
    distinct == n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = Rng::seeded(7);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (900..1100).contains(&c)), "{seen:?}");
    }

    #[test]
    fn draws_skip_excluded_intervals_in_proportion() {
        let mut s = WeightedSampler::new(&[1, 2, 3, 4]);
        let mut rng = Rng::seeded(1);
        let mut counts = [0u32; 4];
        for _ in 0..70_000 {
            counts[s.sample(&mut rng, &[2, 0, 2], None).unwrap()] += 1;
        }
        assert_eq!((counts[0], counts[2]), (0, 0));
        // Shares 2/6 and 4/6 of 70,000: 23,333 and 46,667.
        assert!((22_633..24_033).contains(&counts[1]), "{counts:?}");
        assert!((45_967..47_367).contains(&counts[3]), "{counts:?}");
        assert_eq!(s.sample(&mut rng, &[0, 1, 3], Some(2)), None);
        assert_eq!(s.sample(&mut rng, &[0, 1], Some(2)), Some(3));
    }

    #[test]
    fn second_draw_skips_the_first() {
        let mut s = WeightedSampler::new(&[1, 2, 3, 4]);
        let mut rng = Rng::seeded(2);
        let mut counts = [0u32; 4];
        for _ in 0..80_000 {
            counts[s.sample(&mut rng, &[], Some(1)).unwrap()] += 1;
        }
        // Shares 1/8, 3/8, 4/8 of 80,000: 10,000, 30,000 and 40,000.
        assert_eq!(counts[1], 0);
        assert!((9_400..10_600).contains(&counts[0]), "{counts:?}");
        assert!((29_200..30_800).contains(&counts[2]), "{counts:?}");
        assert!((39_200..40_800).contains(&counts[3]), "{counts:?}");
        let mut one = WeightedSampler::new(&[5]);
        assert_eq!(one.sample(&mut rng, &[], Some(0)), None);
    }

    #[test]
    fn all_excluded_counts_distinct_valid_ids() {
        assert!(all_excluded(2, &[1, 0]));
        assert!(!all_excluded(3, &[1, 1, 0, 7]));
        assert!(all_excluded(0, &[]));
    }
}
