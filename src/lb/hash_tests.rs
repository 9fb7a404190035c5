//! Properties every consistent-hashing balancer must have, shared by the `ring_hash` and
//! `maglev` tests. Each takes a constructor over `(address, weight)` pairs.

use super::{assert_shares, hash_key, test_ctx, Balancer};

type Build = fn(&[(&str, u32)]) -> Box<dyn Balancer>;

const KEYS: u64 = 10_000;

fn key(k: u64) -> u64 {
    hash_key(format!("user-{k}").as_bytes())
}

fn addresses(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("10.0.0.{i}:8080")).collect()
}

/// The address each of `KEYS` keys maps to.
fn owners(build: Build, backends: &[(&str, u32)]) -> Vec<String> {
    let mut lb = build(backends);
    (0..KEYS).map(|k| backends[lb.pick(&test_ctx(Some(key(k)), &[])).unwrap()].0.to_string()).collect()
}

fn equal(addrs: &[String]) -> Vec<(&str, u32)> {
    addrs.iter().map(|a| (a.as_str(), 1)).collect()
}

pub(crate) fn same_hash_same_backend(build: Build) {
    let addrs = addresses(5);
    let mut lb = build(&equal(&addrs));
    let first: Vec<_> = (0..1_000).map(|k| lb.pick(&test_ctx(Some(key(k)), &[])).unwrap()).collect();
    let again: Vec<_> = (0..1_000).map(|k| lb.pick(&test_ctx(Some(key(k)), &[])).unwrap()).collect();
    assert_eq!(first, again);
    // A separate instance (another worker, another process) agrees.
    assert_eq!(owners(build, &equal(&addrs)), owners(build, &equal(&addrs)));
    assert!((0..5).all(|b| first.contains(&b)), "every backend owns some keys");
}

/// Weights 1,2,5 over 80,000 keys within `tolerance`; then five equal backends with one raised
/// to weight 3: its share becomes 3/7 and the others' 1/7, within `shift_tolerance`.
pub(crate) fn key_shares_follow_weights(build: Build, tolerance: f64, shift_tolerance: f64) {
    let addrs = addresses(3);
    let weights = [1, 2, 5];
    let backends: Vec<_> = addrs.iter().map(String::as_str).zip(weights).collect();
    let mut lb = build(&backends);
    let mut counts = [0u64; 3];
    for k in 0..80_000 {
        counts[lb.pick(&test_ctx(Some(key(k)), &[])).unwrap()] += 1;
    }
    assert_shares(&counts, &weights, tolerance);

    let addrs = addresses(5);
    let weights = [3, 1, 1, 1, 1];
    let backends: Vec<_> = addrs.iter().map(String::as_str).zip(weights).collect();
    let mut lb = build(&backends);
    let mut counts = [0u64; 5];
    for k in 0..KEYS {
        counts[lb.pick(&test_ctx(Some(key(k)), &[])).unwrap()] += 1;
    }
    assert_shares(&counts, &weights, shift_tolerance);
}

/// Removes one of five backends: the keys that move are at most 1/5 + `extra` of all keys, and
/// re-adding it restores every key. Returns how many moved keys had not been on the removed one.
pub(crate) fn removal_moves_few_keys(build: Build, extra: f64) -> usize {
    let addrs = addresses(5);
    let all = equal(&addrs);
    let before = owners(build, &all);
    let without: Vec<_> = all.iter().copied().filter(|&(a, _)| a != addrs[2]).collect();
    let after = owners(build, &without);
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let on_removed = before.iter().filter(|&b| *b == addrs[2]).count();
    assert!(after.iter().all(|a| *a != addrs[2]));
    assert!(moved as f64 <= (0.2 + extra) * KEYS as f64, "{moved} of {KEYS} keys moved");
    assert_eq!(owners(build, &all), before, "adding the backend back restores its keys");
    moved - on_removed
}

/// Excluding a backend sends its keys elsewhere, consistently, and leaves the other keys alone.
pub(crate) fn exclusion_is_consistent(build: Build) {
    let addrs = addresses(5);
    let mut lb = build(&equal(&addrs));
    for k in 0..KEYS {
        let hash = Some(key(k));
        let free = lb.pick(&test_ctx(hash, &[])).unwrap();
        let other = lb.pick(&test_ctx(hash, &[3, 1])).unwrap();
        assert!(other != 3 && other != 1);
        if free != 3 && free != 1 {
            assert_eq!(other, free);
        }
        assert_eq!(lb.pick(&test_ctx(hash, &[3, 1])), Some(other));
        assert_eq!(lb.pick(&test_ctx(hash, &[0, 1, 2, 3, 4])), None);
    }
}

pub(crate) fn hashless_fallback_is_weighted(build: Build) {
    let addrs = addresses(3);
    let weights = [1, 2, 5];
    let backends: Vec<_> = addrs.iter().map(String::as_str).zip(weights).collect();
    let mut lb = build(&backends);
    let mut counts = [0u64; 3];
    for _ in 0..80_000 {
        counts[lb.pick(&test_ctx(None, &[])).unwrap()] += 1;
    }
    assert_shares(&counts, &weights, 0.03);
    assert_eq!(lb.pick(&test_ctx(None, &[0, 2])), Some(1));
    assert_eq!(lb.pick(&test_ctx(None, &[0, 1, 2])), None);
}

pub(crate) fn single_backend(build: Build) {
    let mut lb = build(&[("10.0.0.1:80", 5)]);
    for k in 0..1_000 {
        assert_eq!(lb.pick(&test_ctx(Some(key(k)), &[])), Some(0));
    }
    assert_eq!(lb.pick(&test_ctx(Some(key(0)), &[0])), None);
    assert_eq!(lb.pick(&test_ctx(None, &[0])), None);
    assert_eq!(build(&[]).pick(&test_ctx(Some(key(0)), &[])), None);
}
