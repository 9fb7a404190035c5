//! Peak EWMA (Finagle, linkerd): each backend keeps a latency estimate that jumps at once to any
//! higher observation (the peak) and decays toward lower ones with time constant τ = 10 s; its
//! cost is estimate × (outstanding + 1) / weight, and the cheaper of two weighted-random
//! candidates wins. It sheds load from a slow backend within one response, before a queue forms,
//! at the price of some float math per pick and of trusting latency as a proxy for health.

use super::sample::{entropy_seed, Rng, WeightedSampler};
use super::{BackendId, Balancer, PickContext};
use std::time::{Duration, Instant};

/// τ: how fast an estimate forgets. A response faster than the estimate pulls it down by
/// `1 - exp(-elapsed / τ)` (elapsed since the previous response); between responses the cost
/// ages the estimate toward zero by `exp(-idle / τ)` (Finagle's decay on read), so a backend
/// shunned for being slow is probed again once aged below its peers (after ≈ τ·ln(ratio)), and
/// a response at least as slow as the aged estimate replaces it (the peak).
pub const DECAY: Duration = Duration::from_secs(10);

/// Estimate of a backend with no response yet (linkerd's default): a typical in-datacenter HTTP
/// latency, low enough that a new backend is tried, high enough that it is not flooded with
/// every request before its first response returns.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// Least latency charged for a failure (`ok = false`): a backend that refuses or resets in
/// microseconds must look slow, not fast, or it would attract all traffic.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

struct Estimate {
    /// Peak-EWMA latency in nanoseconds, as of `at`.
    rtt_ns: f64,
    /// When the last response was observed; `None` until the first.
    at: Option<Instant>,
    /// Requests started and not yet ended.
    active: u64,
}

/// Power-of-two-choices over peak-EWMA latency × outstanding requests, weighted.
pub struct PeakEwma {
    sampler: WeightedSampler,
    backends: Vec<Estimate>,
    rng: Rng,
}

impl PeakEwma {
    /// A balancer over backends with these weights, seeded from the OS.
    pub fn new(weights: &[u32]) -> Self {
        Self::with_seed(weights, entropy_seed())
    }

    /// Same, with a fixed seed: the sequence of picks is reproducible (tests, benchmarks).
    pub fn with_seed(weights: &[u32], seed: u64) -> Self {
        let backends = weights.iter().map(|_| Estimate { rtt_ns: 0.0, at: None, active: 0 }).collect();
        PeakEwma { sampler: WeightedSampler::new(weights), backends, rng: Rng::seeded(seed) }
    }

    fn cost(&self, i: BackendId, now: Instant) -> f64 {
        let e = &self.backends[i];
        let rtt = match e.at {
            None => DEFAULT_RTT.as_nanos() as f64,
            Some(at) => e.rtt_ns * decay(now.saturating_duration_since(at)),
        };
        rtt * (e.active + 1) as f64 / self.sampler.weight(i) as f64
    }

    fn pick_at(&mut self, ctx: &PickContext<'_>, now: Instant) -> Option<BackendId> {
        let a = self.sampler.sample(&mut self.rng, ctx.excluded, None)?;
        let Some(b) = self.sampler.sample(&mut self.rng, ctx.excluded, Some(a)) else {
            return Some(a);
        };
        Some(if self.cost(b, now) < self.cost(a, now) { b } else { a })
    }

    fn on_end_at(&mut self, backend: BackendId, latency: Duration, ok: bool, now: Instant) {
        let Some(e) = self.backends.get_mut(backend) else { return };
        e.active = e.active.saturating_sub(1);
        let rtt = if ok { latency } else { latency.max(FAILURE_PENALTY) }.as_nanos() as f64;
        e.rtt_ns = match e.at {
            Some(at) => {
                let w = decay(now.saturating_duration_since(at));
                // The peak test uses the aged estimate the cost saw (`rtt_ns · w`), so the first
                // normal response after a backend was shunned and aged restores it at once.
                if rtt >= e.rtt_ns * w {
                    rtt
                } else {
                    e.rtt_ns * w + rtt * (1.0 - w)
                }
            }
            None => rtt,
        };
        e.at = Some(now);
    }
}

/// `exp(-elapsed / τ)`.
fn decay(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

impl Balancer for PeakEwma {
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<BackendId> {
        self.pick_at(ctx, Instant::now())
    }

    fn on_start(&mut self, backend: BackendId) {
        if let Some(e) = self.backends.get_mut(backend) {
            e.active += 1;
        }
    }

    fn on_end(&mut self, backend: BackendId, latency: Duration, ok: bool) {
        self.on_end_at(backend, latency, ok, Instant::now());
    }

    fn on_cancel(&mut self, backend: BackendId) {
        if let Some(e) = self.backends.get_mut(backend) {
            e.active = e.active.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lb::{assert_shares, test_ctx};
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    const MS: Duration = Duration::from_millis(1);

    /// Open-loop traffic on an injected clock: a request every `every` from `clock` until
    /// `clock + span`, each answered after `latency(backend)` (with `ok(backend)`); in-flight
    /// requests are left to finish at the end. Returns the picks per backend.
    fn simulate(
        lb: &mut PeakEwma,
        clock: &mut Instant,
        span: Duration,
        every: Duration,
        latency: impl Fn(BackendId) -> Duration,
        ok: impl Fn(BackendId) -> bool,
    ) -> Vec<u64> {
        let mut counts = vec![0u64; lb.backends.len()];
        let mut done: BinaryHeap<Reverse<(Instant, BackendId, Duration)>> = BinaryHeap::new();
        let end = *clock + span;
        let finish = |lb: &mut PeakEwma, done: &mut BinaryHeap<_>, until: Instant| {
            while let Some(&Reverse((t, b, lat))) = done.peek() {
                if t > until {
                    break;
                }
                done.pop();
                lb.on_end_at(b, lat, ok(b), t);
            }
        };
        while *clock < end {
            finish(lb, &mut done, *clock);
            let b = lb.pick_at(&test_ctx(None, &[]), *clock).unwrap();
            lb.on_start(b);
            counts[b] += 1;
            done.push(Reverse((*clock + latency(b), b, latency(b))));
            *clock += every;
        }
        finish(lb, &mut done, end + Duration::from_secs(3600));
        counts
    }

    #[test]
    fn estimate_peaks_at_once_and_decays_with_tau() {
        let t0 = Instant::now();
        let mut lb = PeakEwma::with_seed(&[1], 1);
        lb.on_end_at(0, 10 * MS, true, t0);
        lb.on_end_at(0, 100 * MS, true, t0 + Duration::from_secs(1));
        assert_eq!(lb.backends[0].rtt_ns, 100e6);
        // τ later, a 10 ms response pulls it by 1 - 1/e: 100·e⁻¹ + 10·(1 - e⁻¹) ≈ 43.11 ms.
        lb.on_end_at(0, 10 * MS, true, t0 + Duration::from_secs(11));
        assert!((lb.backends[0].rtt_ns / 1e6 - 43.109).abs() < 0.01, "{}", lb.backends[0].rtt_ns);
    }

    #[test]
    fn cost_counts_outstanding_requests_and_weight() {
        let t0 = Instant::now();
        let mut lb = PeakEwma::with_seed(&[1, 4], 2);
        assert_eq!(lb.cost(0, t0), DEFAULT_RTT.as_nanos() as f64);
        lb.on_start(1);
        lb.on_start(1);
        lb.on_end_at(1, 8 * MS, true, t0);
        // 8 ms × (1 outstanding + 1) / weight 4.
        assert_eq!(lb.cost(1, t0), 4e6);
    }

    #[test]
    fn slow_backend_is_shed_then_regains_traffic_after_recovering() {
        let mut lb = PeakEwma::with_seed(&[1, 1, 1], 3);
        let mut clock = Instant::now();
        let slow = |b| if b == 2 { 100 * MS } else { MS };
        let counts = simulate(&mut lb, &mut clock, Duration::from_secs(20), MS, slow, |_| true);
        // Bound: under 1% of 20,000 picks (it keeps only the probes before its first 100 ms
        // response; aging brings it back only after ≈ τ·ln(100) ≈ 46 s).
        assert!(counts[2] * 100 < counts.iter().sum::<u64>(), "{counts:?}");

        // Recovered: its stale 100 ms estimate ages while the others stay at 1 ms; once it has
        // aged below them it is probed, its 1 ms response replaces the estimate, and it takes
        // its third again.
        simulate(&mut lb, &mut clock, Duration::from_secs(90), MS, |_| MS, |_| true);
        let counts = simulate(&mut lb, &mut clock, Duration::from_secs(30), MS, |_| MS, |_| true);
        assert_shares(&counts, &[1, 1, 1], 0.03);
    }

    #[test]
    fn fast_failures_count_as_slow() {
        let mut lb = PeakEwma::with_seed(&[1, 1], 4);
        let mut clock = Instant::now();
        let latency = |b| if b == 0 { Duration::from_micros(100) } else { 10 * MS };
        let counts = simulate(&mut lb, &mut clock, Duration::from_secs(10), MS, latency, |b| b != 0);
        assert!(counts[0] * 100 < counts[1], "{counts:?}");
    }

    #[test]
    fn loaded_pool_follows_weights() {
        // ~100 requests in flight at equal latency: costs equalize when outstanding + 1 is
        // proportional to weight, which puts the picks within ±3% of the weights.
        let mut lb = PeakEwma::with_seed(&[1, 2, 5], 5);
        let mut clock = Instant::now();
        simulate(&mut lb, &mut clock, Duration::from_secs(1), Duration::from_micros(100), |_| 10 * MS, |_| true);
        let every = Duration::from_micros(100);
        let counts = simulate(&mut lb, &mut clock, Duration::from_secs(8), every, |_| 10 * MS, |_| true);
        assert_shares(&counts, &[1, 2, 5], 0.03);
    }

    #[test]
    fn excluded_and_single_backend() {
        let t0 = Instant::now();
        let mut lb = PeakEwma::with_seed(&[1, 1, 1], 6);
        lb.on_end_at(1, Duration::from_secs(5), false, t0);
        for _ in 0..1_000 {
            assert_eq!(lb.pick_at(&test_ctx(None, &[0, 2]), t0), Some(1));
        }
        assert_eq!(lb.pick_at(&test_ctx(None, &[0, 1, 2]), t0), None);
        let mut one = PeakEwma::with_seed(&[3], 7);
        assert_eq!(one.pick_at(&test_ctx(None, &[]), t0), Some(0));
        assert_eq!(one.pick_at(&test_ctx(None, &[0]), t0), None);
    }
}
