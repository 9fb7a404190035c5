//! Load balancing: choose a backend of a pool for one request.
//!
//! Every worker owns its own balancer replica (no locks on the request path). An algorithm is
//! one file implementing [`Balancer`]; [`build`] maps the configured name to it.
//!
//! - [`round_robin`]: smooth weighted round robin.
//! - [`random`]: weighted random.
//! - [`least_request`]: fewest outstanding requests per unit of weight, power of two choices.
//! - [`peak_ewma`]: lowest peak-EWMA latency × outstanding requests, power of two choices.
//! - [`ring_hash`]: consistent hashing on a ring of virtual nodes (ketama).
//! - [`maglev`]: consistent hashing through a Maglev lookup table.
//!
//! The hashing algorithms key on [`PickContext::hash`], which the caller computes with
//! [`hash_key`] from the pool's `hash_key` setting.

#[cfg(test)]
mod hash_tests;
pub mod least_request;
pub mod maglev;
pub mod peak_ewma;
pub mod random;
pub mod ring_hash;
pub mod round_robin;
mod sample;

use crate::config::{Balance, Upstream};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

/// Index of a backend within its pool.
pub type BackendId = usize;

/// What a balancer may look at when picking: the request's metadata and which backends
/// are excluded for this attempt (already tried, or unhealthy).
pub struct PickContext<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub client: SocketAddr,
    /// Hash of the pool's `hash_key` for this request, computed with [`hash_key`]
    /// (consistent-hashing algorithms only; `None` when the key is absent from the request,
    /// e.g. no such header: those algorithms then fall back to a weighted random pick).
    pub hash: Option<u64>,
    /// Backends not to return (e.g. the one a retry just failed on).
    pub excluded: &'a [BackendId],
}

/// A balancing algorithm over one pool's backends.
pub trait Balancer {
    /// Picks a backend, or `None` when every backend is excluded.
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<BackendId>;
    /// A request was sent to `backend` (load-aware algorithms count it).
    fn on_start(&mut self, _backend: BackendId) {}
    /// A request to `backend` ended; `latency` is the time to the response head, `ok` is false
    /// for gateway failures (connect errors, resets, 502/503/504).
    fn on_end(&mut self, _backend: BackendId, _latency: Duration, _ok: bool) {}
    /// A request to `backend` ended because the client cancelled it: it says nothing about
    /// the backend's latency or health, only that it is no longer in flight.
    fn on_cancel(&mut self, _backend: BackendId) {}
}

/// Builds the configured algorithm for a pool.
pub fn build(pool: &Upstream) -> Box<dyn Balancer> {
    let weights: Vec<u32> = pool.backends.iter().map(|b| b.weight).collect();
    let identified: Vec<(&str, u32)> = pool.backends.iter().map(|b| (b.address.as_str(), b.weight)).collect();
    match pool.balance {
        Balance::RoundRobin => Box::new(round_robin::SmoothWeighted::new(&weights)),
        Balance::Random => Box::new(random::WeightedRandom::new(&weights)),
        Balance::LeastRequest => Box::new(least_request::LeastRequest::new(&weights)),
        Balance::PeakEwma => Box::new(peak_ewma::PeakEwma::new(&weights)),
        Balance::RingHash => Box::new(ring_hash::RingHash::new(&identified)),
        Balance::Maglev => Box::new(maglev::Maglev::new(&identified)),
    }
}

/// Hashes a request's `hash_key` value (header or cookie value, client IP, path, authority)
/// into [`PickContext::hash`]. FNV-1a 64 followed by murmur3's `fmix64` finalizer (FNV alone
/// mixes its last bytes poorly into the high bits). Fixed constants, no per-process seed: the
/// same key maps to the same backend in every worker, process and version.
pub fn hash_key(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    fmix64(h)
}

/// murmur3's 64-bit finalizer: a bijection in which every input bit affects every output bit.
pub(crate) fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The `n`th output of a splitmix64 stream seeded with `seed`: well-spread 64-bit values
/// derived from one identity (ring points, Maglev permutations, rehashes).
pub(crate) fn splitmix64(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Stable identities for consistent hashing: the [`hash_key`] of each backend's address, so a
/// backend keeps its place when others are added or removed (indexes shift, addresses do not).
/// A repeated address is told apart by its occurrence number (`addr#1`, `addr#2`, ...).
pub(crate) fn identities(backends: &[(&str, u32)]) -> Vec<u64> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    backends
        .iter()
        .map(|&(address, _)| {
            let n = seen.entry(address).or_default();
            *n += 1;
            match *n {
                1 => hash_key(address.as_bytes()),
                n => hash_key(format!("{address}#{}", n - 1).as_bytes()),
            }
        })
        .collect()
}

/// A request context for unit tests: only `hash` and `excluded` vary.
#[cfg(test)]
pub(crate) fn test_ctx(hash: Option<u64>, excluded: &[BackendId]) -> PickContext<'_> {
    PickContext { method: "GET", authority: "a", path: "/", client: "127.0.0.1:1".parse().unwrap(), hash, excluded }
}

/// Fails unless `counts` splits its total like `weights`, each share within `tolerance` (0.03 is
/// ±3 percentage points).
#[cfg(test)]
pub(crate) fn assert_shares(counts: &[u64], weights: &[u32], tolerance: f64) {
    let total: u64 = counts.iter().sum();
    let weight_total: u32 = weights.iter().sum();
    for (i, (&c, &w)) in counts.iter().zip(weights).enumerate() {
        let (share, expected) = (c as f64 / total as f64, f64::from(w) / f64::from(weight_total));
        assert!(
            (share - expected).abs() <= tolerance,
            "backend {i}: share {share:.4}, expected {expected:.4}: {counts:?}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_is_stable() {
        // Computed once, independently (Python), from the FNV-1a 64 + fmix64 definition. A
        // change here remaps every key of every consistent-hashing pool on upgrade.
        assert_eq!(hash_key(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash_key(b"user-42"), 0xa395_32c7_ab05_1e8d);
        assert_eq!(hash_key(b"10.0.0.1:8080"), 0xe8c7_2115_6ed5_2b14);
    }

    #[test]
    fn repeated_addresses_get_distinct_identities() {
        let ids = identities(&[("a:1", 1), ("b:1", 1), ("a:1", 1)]);
        assert_eq!(ids[0], hash_key(b"a:1"));
        assert_eq!(ids[2], hash_key(b"a:1#1"));
        assert_ne!(ids[0], ids[2]);
    }

    #[test]
    fn build_maps_every_algorithm() {
        for balance in ["round_robin", "random", "least_request", "peak_ewma", "ring_hash", "maglev"] {
            let yaml = format!(
                "backends: [{{address: '10.0.0.1:80'}}, {{address: '10.0.0.2:80'}}, {{address: '10.0.0.3:80'}}]\n\
                 balance: {balance}\nhash_key: path\n"
            );
            let pool: Upstream = serde_norway::from_str(&yaml).unwrap();
            assert_eq!(pool.balance.hashes(), balance.ends_with("hash") || balance == "maglev");
            let mut lb = build(&pool);
            let hash = Some(hash_key(b"/x"));
            let picked = lb.pick(&test_ctx(hash, &[0, 2])).unwrap();
            assert_eq!(picked, 1, "{balance}");
            lb.on_start(picked);
            lb.on_end(picked, Duration::from_millis(1), true);
            assert_eq!(lb.pick(&test_ctx(hash, &[0, 1, 2])), None, "{balance}");
        }
    }
}
