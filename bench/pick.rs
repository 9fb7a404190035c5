//! Cost of one pick per balancing algorithm: `cargo bench --bench pick`.
//!
//! Each row times up to 2,000,000 picks (or 2 s) over backends of weights 1..=5. Load-aware
//! algorithms also get `on_start` and, 64 picks later, `on_end` (64 requests in flight, latency
//! 1..=7 ms by backend), as on the request path; peak EWMA reads the clock in `pick` and
//! `on_end`. Hashing algorithms get a different key hash each pick (their table build is not
//! timed). Prints a markdown table; the last column is the cost relative to round robin.

use spooky::lb::least_request::LeastRequest;
use spooky::lb::maglev::Maglev;
use spooky::lb::peak_ewma::PeakEwma;
use spooky::lb::random::WeightedRandom;
use spooky::lb::ring_hash::RingHash;
use spooky::lb::round_robin::SmoothWeighted;
use spooky::lb::{hash_key, BackendId, Balancer, PickContext};
use std::hint::black_box;
use std::time::{Duration, Instant};

const MAX_PICKS: u64 = 2_000_000;
const MAX_TIME: Duration = Duration::from_secs(2);
const IN_FLIGHT: usize = 64;

/// Nanoseconds per pick of `lb`, with load feedback when `feedback`.
fn time_picks(lb: &mut dyn Balancer, feedback: bool, hashes: &[u64]) -> f64 {
    let client = "192.0.2.1:4433".parse().unwrap();
    let mut in_flight: [Option<BackendId>; IN_FLIGHT] = [None; IN_FLIGHT];
    let mut step = |i: u64| {
        let hash = Some(hashes[i as usize % hashes.len()]);
        let ctx = PickContext { method: "GET", authority: "example.com", path: "/", client, hash, excluded: &[] };
        let b = black_box(lb.pick(black_box(&ctx)).unwrap());
        if feedback {
            let slot = &mut in_flight[i as usize % IN_FLIGHT];
            if let Some(done) = slot.replace(b) {
                lb.on_end(done, Duration::from_millis(1 + done as u64 % 7), true);
            }
            lb.on_start(b);
        }
    };
    for i in 0..10_000 {
        step(i);
    }
    let start = Instant::now();
    let mut n = 0;
    while n < MAX_PICKS && start.elapsed() < MAX_TIME {
        for _ in 0..4_096 {
            step(n);
            n += 1;
        }
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    let hashes: Vec<u64> = (0..4_096u32).map(|k| hash_key(format!("user-{k}").as_bytes())).collect();
    println!("| algorithm | backends | ns/pick | × round robin |");
    println!("|---|---:|---:|---:|");
    for n in [3usize, 10, 100] {
        let weights: Vec<u32> = (0..n as u32).map(|i| 1 + i % 5).collect();
        let addresses: Vec<String> = (0..n).map(|i| format!("10.0.{}.{}:8080", i / 256, i % 256)).collect();
        let backends: Vec<(&str, u32)> = addresses.iter().map(String::as_str).zip(weights.iter().copied()).collect();
        let algorithms: Vec<(&str, Box<dyn Balancer>, bool)> = vec![
            ("round_robin", Box::new(SmoothWeighted::new(&weights)), false),
            ("random", Box::new(WeightedRandom::with_seed(&weights, 1)), false),
            ("least_request", Box::new(LeastRequest::with_seed(&weights, 1)), true),
            ("peak_ewma", Box::new(PeakEwma::with_seed(&weights, 1)), true),
            ("ring_hash", Box::new(RingHash::with_seed(&backends, 1)), false),
            ("maglev", Box::new(Maglev::with_seed(&backends, 1)), false),
        ];
        let mut baseline = None;
        for (name, mut lb, feedback) in algorithms {
            let ns = time_picks(lb.as_mut(), feedback, &hashes);
            let base = *baseline.get_or_insert(ns);
            println!("| {name} | {n} | {ns:.1} | {:.2} |", ns / base);
        }
    }
}
