//! Every balancing algorithm against real backends: weights, stickiness, and load-awareness.

use crate::harness::{Backend, Spooky, PREAMBLE};
use spooky::tools::h3client::Request;
use std::collections::HashMap;

fn spooky_with(balance: &str, extra: &str, backends: &[(&Backend, u32)]) -> Spooky {
    let list: Vec<String> =
        backends.iter().map(|(b, w)| format!("{{ address: \"{}\", weight: {w} }}", b.addr)).collect();
    Spooky::start(&format!(
        "{PREAMBLE}upstreams:\n  main:\n    balance: {balance}\n{extra}    backends: [{}]\nroutes: [{{ upstream: main }}]\n",
        list.join(", ")
    ))
}

fn shares(responses: &[spooky::tools::h3client::Response]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in responses {
        *m.entry(r.header("x-backend").unwrap_or("?").to_string()).or_default() += 1;
    }
    m
}

#[test]
fn weighted_random_follows_weights_within_five_percent() {
    let (a, b) = (Backend::start("a"), Backend::start("b"));
    let spooky = spooky_with("random", "", &[(&a, 3), (&b, 1)]);
    let responses = spooky.client().run((0..2000).map(|_| Request::get("/")).collect()).unwrap();
    let share_a = shares(&responses)["a"] as f64 / 2000.0;
    assert!((0.70..=0.80).contains(&share_a), "a's share {share_a} (expected 0.75 ± 0.05)");
}

#[test]
fn consistent_hashing_keeps_a_key_on_one_backend_across_connections() {
    for balance in ["ring_hash", "maglev"] {
        let (a, b, c) = (Backend::start("a"), Backend::start("b"), Backend::start("c"));
        let spooky = spooky_with(balance, "    hash_key: { header: x-user }\n", &[(&a, 1), (&b, 1), (&c, 1)]);
        let mut placement: HashMap<String, String> = HashMap::new();
        for _ in 0..3 {
            // A new connection each round: possibly another worker, same answer.
            let mut client = spooky.client();
            let users: Vec<String> = (0..60).map(|u| format!("user-{u}")).collect();
            let responses = client.run(users.iter().map(|u| Request::get("/").header("x-user", u)).collect()).unwrap();
            for (u, r) in users.iter().zip(responses) {
                let backend = r.header("x-backend").unwrap().to_string();
                let first = placement.entry(u.clone()).or_insert(backend.clone());
                assert_eq!(*first, backend, "{balance}: {u} moved");
            }
        }
        let mut per_backend: HashMap<&str, usize> = HashMap::new();
        for b in placement.values() {
            *per_backend.entry(b.as_str()).or_default() += 1;
        }
        assert_eq!(per_backend.len(), 3, "{balance}: every backend holds some keys: {per_backend:?}");
        assert!(per_backend.values().all(|n| *n >= 8), "{balance}: keys spread: {per_backend:?}");
    }
}

#[test]
fn peak_ewma_steers_sequential_traffic_away_from_a_slow_backend() {
    let slow = Backend::start_with("slow", "127.0.0.1:0", &["--delay-ms", "50"]);
    let fast = Backend::start("fast");
    let spooky = spooky_with("peak_ewma", "", &[(&slow, 1), (&fast, 1)]);
    let mut client = spooky.client();
    let responses: Vec<_> = (0..60).map(|_| client.request(Request::get("/")).unwrap()).collect();
    let s = shares(&responses);
    let slow_n = s.get("slow").copied().unwrap_or(0);
    assert!(slow_n <= 6, "slow got {slow_n} of 60 (round robin would give 30)");
}

#[test]
fn least_request_steers_concurrent_traffic_away_from_a_slow_backend() {
    let slow = Backend::start_with("slow", "127.0.0.1:0", &["--delay-ms", "100"]);
    let fast = Backend::start("fast");
    let spooky = spooky_with("least_request", "", &[(&slow, 1), (&fast, 1)]);
    // Eight clients, each sending one request at a time: requests pile up on the slow backend,
    // so picks made while they are outstanding go to the fast one.
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let mut client = spooky.client();
            std::thread::spawn(move || (0..15).map(|_| client.request(Request::get("/")).unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let responses: Vec<_> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let s = shares(&responses);
    let (slow_n, fast_n) = (s.get("slow").copied().unwrap_or(0), s.get("fast").copied().unwrap_or(0));
    assert_eq!(slow_n + fast_n, 120);
    assert!(fast_n >= 2 * slow_n, "fast {fast_n} vs slow {slow_n}");
}
