//! 1 GiB down and 1 GiB up through Spooky, byte-exact, with bounded proxy memory: the proof
//! that backpressure holds end to end (QUIC flow control ⇄ HTTP/2 flow control).

use crate::harness::{Backend, Spooky};
use spooky::tools::h3client::{Body, Options, Request};
use spooky::tools::pattern;
use std::time::Duration;

const GIB: u64 = 1 << 30;
/// Allowed growth of Spooky's peak RSS over its warmed-up RSS during a 1 GiB transfer.
const RSS_GROWTH_LIMIT: u64 = 64 << 20;

#[test]
fn one_gib_each_way_with_bounded_memory() {
    let backend = Backend::start("bulk");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let mut client =
        spooky.client_with(Options { timeout: Duration::from_secs(600), keep_body: 1024, ..Options::default() });
    // Warm up: connections, pools and allocator arenas exist before the baseline.
    assert_eq!(client.request(Request::get("/bytes/1048576")).unwrap().status, 200);
    let (baseline, _) = spooky.rss();

    let r = client.request(Request::get(&format!("/bytes/{GIB}"))).unwrap();
    assert_eq!((r.status, r.body_len), (200, GIB));
    assert_eq!(r.sha256, pattern::sha256_hex(GIB));
    let (_, peak) = spooky.rss();
    assert!(peak < baseline + RSS_GROWTH_LIMIT, "download: peak RSS {peak} vs baseline {baseline}");
    eprintln!("1 GiB download: baseline RSS {} MiB, peak {} MiB", baseline >> 20, peak >> 20);

    let r = client.request(Request::post("/sink", Body::Pattern(GIB))).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("{{\"bytes\":{GIB},\"sha256\":\"{}\"}}", pattern::sha256_hex(GIB)));
    let (_, peak) = spooky.rss();
    assert!(peak < baseline + RSS_GROWTH_LIMIT, "upload: peak RSS {peak} vs baseline {baseline}");
    eprintln!("1 GiB upload: peak {} MiB", peak >> 20);
}
