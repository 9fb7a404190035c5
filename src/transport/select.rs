//! Choosing the backend for one attempt.
//!
//! Order: the route's pool, skipping backends that are already tried, marked down by active
//! health checks, ejected as outliers, or at their circuit-breaker limit; then the pool's
//! `fallback` pool the same way, and its fallback (up to three links); then — when health and ejection have ruled out every
//! backend of the route's pool — the route's pool ignoring them ("panic mode", as in Envoy:
//! better to try a backend that may be down than to fail everything). Circuit-breaker limits
//! are never ignored: when they exclude the last candidates the answer is 503.

use super::Upstreams;

/// Fallback pools tried after the route's own pool.
const MAX_FALLBACKS: usize = 3;
use crate::lb::{BackendId, PickContext};
use std::time::Instant;

/// Request data a pick may use.
pub struct Request<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub client: std::net::SocketAddr,
    pub headers: &'a http::HeaderMap,
}

/// The outcome of a selection.
#[derive(Debug, PartialEq, Eq)]
pub enum Selection {
    Backend {
        pool: usize,
        backend: BackendId,
    },
    /// Every candidate is at its circuit-breaker limit.
    BreakerOpen,
    /// No backend left (all tried).
    Exhausted,
}

/// Picks a backend for `req` starting at `pool`, never one in `tried` (pairs of pool, backend).
pub fn select(up: &Upstreams, pool: usize, req: &Request<'_>, tried: &[(usize, BackendId)]) -> Selection {
    let now = Instant::now();
    let mut breaker_hit = false;
    // Follow the fallback chain, at most MAX_FALLBACKS links (a cycle stops there too).
    let mut next = Some(pool);
    for _ in 0..=MAX_FALLBACKS {
        let Some(p) = next else { break };
        if let Some(b) = pick(up, p, req, tried, now, true, &mut breaker_hit) {
            return Selection::Backend { pool: p, backend: b };
        }
        next = up.pools[p].fallback;
    }
    if let Some(b) = pick(up, pool, req, tried, now, false, &mut breaker_hit) {
        metrics::counter!("spooky_panic_routing_total", "pool" => up.pools[pool].name.clone()).increment(1);
        return Selection::Backend { pool, backend: b };
    }
    if breaker_hit {
        Selection::BreakerOpen
    } else {
        Selection::Exhausted
    }
}

fn pick(
    up: &Upstreams,
    pool: usize,
    req: &Request<'_>,
    tried: &[(usize, BackendId)],
    now: Instant,
    respect_health: bool,
    breaker_hit: &mut bool,
) -> Option<BackendId> {
    let info = &up.pools[pool];
    let health = up.health.borrow().clone();
    let outliers = up.outliers.borrow();
    let load = up.load.borrow();
    let mut excluded = Vec::new();
    for (b, addr) in info.backends.iter().enumerate() {
        let l = load[pool][b];
        // Pending requests will be active a moment later: they count against both limits.
        let over_limit = l.active + l.pending >= info.max_active || l.pending >= info.max_pending;
        *breaker_hit |= over_limit && !tried.contains(&(pool, b));
        let unavailable = respect_health && (health.is_down(addr) || outliers[pool].is_ejected(b, now));
        if tried.contains(&(pool, b)) || over_limit || unavailable {
            excluded.push(b);
        }
    }
    if excluded.len() == info.backends.len() {
        return None;
    }
    let hash = info.hash_key.as_ref().and_then(|k| super::forward::request_hash(k, req));
    let ctx = PickContext {
        method: req.method,
        authority: req.authority,
        path: req.path,
        client: req.client,
        hash,
        excluded: &excluded,
    };
    up.balancers.borrow_mut()[pool].pick(&ctx)
}
