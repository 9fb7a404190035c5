//! Smooth weighted round robin, as in nginx (`ngx_http_upstream_get_peer`): each pick adds every
//! backend's weight to its running score, takes the highest, and subtracts the total from the
//! winner. Weights 5,1,1 give `a a b a c a a` rather than `a a a a a b c`: the heavy backend's
//! turns are spread out, so no backend sees a burst.

use super::{BackendId, Balancer, PickContext};

pub struct SmoothWeighted {
    weights: Vec<i64>,
    current: Vec<i64>,
}

impl SmoothWeighted {
    pub fn new(weights: &[u32]) -> Self {
        SmoothWeighted { weights: weights.iter().map(|&w| i64::from(w)).collect(), current: vec![0; weights.len()] }
    }
}

impl Balancer for SmoothWeighted {
    fn pick(&mut self, ctx: &PickContext<'_>) -> Option<BackendId> {
        let mut total = 0;
        let mut best: Option<BackendId> = None;
        for i in 0..self.weights.len() {
            if ctx.excluded.contains(&i) {
                continue;
            }
            self.current[i] += self.weights[i];
            total += self.weights[i];
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let b = best?;
        self.current[b] -= total;
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(excluded: &[BackendId]) -> PickContext<'_> {
        PickContext {
            method: "GET",
            authority: "a",
            path: "/",
            client: "127.0.0.1:1".parse().unwrap(),
            hash: None,
            excluded,
        }
    }

    #[test]
    fn sequence_is_smooth_like_nginx() {
        let mut rr = SmoothWeighted::new(&[5, 1, 1]);
        let seq: Vec<_> = (0..7).map(|_| rr.pick(&ctx(&[])).unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn distribution_follows_weights_exactly_per_cycle() {
        let mut rr = SmoothWeighted::new(&[3, 2, 1]);
        let mut counts = [0; 3];
        for _ in 0..600 {
            counts[rr.pick(&ctx(&[])).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 200, 100]);
    }

    #[test]
    fn excluded_backends_are_skipped() {
        let mut rr = SmoothWeighted::new(&[1, 1]);
        for _ in 0..5 {
            assert_eq!(rr.pick(&ctx(&[0])), Some(1));
        }
        assert_eq!(rr.pick(&ctx(&[0, 1])), None);
    }

    #[test]
    fn single_backend() {
        let mut rr = SmoothWeighted::new(&[4]);
        for _ in 0..10 {
            assert_eq!(rr.pick(&ctx(&[])), Some(0));
        }
        assert_eq!(rr.pick(&ctx(&[0])), None);
    }
}
