//! Memory budgets (issue 13, docs/SECURITY.md): floods pushed past each bound leave Spooky's
//! RSS within what the bound allows, and a legitimate client is served.

use crate::harness::{metric_sum, summary, Backend, Spooky};
use spooky::tools::h3client::{Body, Client, Options, Request};
use spooky::tools::pattern;
use std::time::Duration;

const MIB: u64 = 1 << 20;

/// Connections that upload to a backend that does not read during the test: each runs
/// `streams` 1 MiB POSTs for `for_how_long`, then the clients are handed back (still connected,
/// their bodies held wherever Spooky holds them).
fn uploaders(spooky: &Spooky, connections: usize, streams: usize, for_how_long: Duration) -> Vec<Client> {
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let addr = spooky.addr;
            std::thread::spawn(move || {
                let mut c = Client::connect(addr, Options { timeout: for_how_long, ..Options::default() }).unwrap();
                let reqs = (0..streams).map(|_| Request::post("/sink?delay_ms=600000", Body::Pattern(MIB))).collect();
                // Times out by design: the backend answers none of them.
                assert!(c.run(reqs).is_err(), "the backend does not answer during the test");
                c
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn request_bodies_past_their_budgets_wait_in_quic_and_resume_when_room_returns() {
    const PER_CONNECTION: u64 = MIB;
    const PER_WORKER: u64 = 6 * MIB;
    const MAX_DATA: u64 = 2 * MIB;
    const CONNECTIONS: usize = 12;
    const STREAMS: usize = 32;
    let (b, sink) = (Backend::start("budgets"), Backend::start("budgets-sink"));
    // One worker, so its budget is the whole process's; one upstream connection to the
    // backend that does not read, so its HTTP/2 windows (16 MiB) absorb only a few bodies (the
    // legitimate client's backend is another, whose windows the flood does not hold).
    let spooky = Spooky::start(&format!(
        "listen: 127.0.0.1:0\nworkers: 1\ntls: {{ self_signed: [localhost] }}\n\
         quic: {{ max_data: {MAX_DATA}, max_stream_data: 512KiB, body_buffer_per_connection: {PER_CONNECTION}, body_buffer_per_worker: {PER_WORKER} }}\n\
         timeouts: {{ body_min_rate: 0 }}\n\
         upstream_h2: {{ max_connections_per_backend: 1 }}\n\
         upstreams:\n  main:\n    backends:\n      - address: {}\n  sink:\n    backends:\n      - address: {}\n\
         routes:\n  - {{ path_prefix: /sink, upstream: sink }}\n  - upstream: main\n",
        b.addr, sink.addr
    ));
    let mut legit = spooky.client();
    assert_eq!(legit.request(Request::get("/bytes/1000")).unwrap().status, 200);
    let (rss_before, _) = spooky.rss();
    let held = |s: &Spooky| metric_sum(&s.metrics(), "spooky_request_body_buffered_bytes", &[]) as u64;

    // One connection alone holds at most its own budget.
    let mut flood = uploaders(&spooky, 1, STREAMS, Duration::from_secs(2));
    let one = held(&spooky);
    assert!(one > 0 && one <= PER_CONNECTION, "one connection holds {one} bytes of request bodies");

    // Many hold at most the worker's budget; the rest waits in QUIC, in the clients.
    flood.extend(uploaders(&spooky, CONNECTIONS - 1, STREAMS, Duration::from_secs(3)));
    let all = held(&spooky);
    assert!(all <= PER_WORKER, "the worker holds {all} bytes of request bodies");
    assert!(all > PER_WORKER - MIB, "{CONNECTIONS} connections filled the worker's budget ({all} bytes)");
    let (rss_during, _) = spooky.rss();
    let stalls = metric_sum(&spooky.metrics(), "spooky_request_body_stalls_total", &[]);
    assert!(stalls > 0.0, "streams stopped reading at the budget");

    // A client without a body is served as usual.
    for _ in 0..20 {
        let r = legit.request(Request::get("/bytes/100000")).unwrap();
        assert_eq!((r.status, r.body_len), (200, 100_000));
    }
    // A legitimate upload waits for room (the budget is full), and goes on once the flood's
    // connections close and give theirs back: the stalled stream is woken.
    let addr = spooky.addr;
    let upload = std::thread::spawn(move || {
        let mut c = Client::connect(addr, Options::default()).unwrap();
        c.request(Request::post("/echo", Body::Pattern(300_000))).unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    for c in flood {
        c.close();
    }
    let r = upload.join().unwrap();
    assert_eq!((r.status, r.body_len, r.sha256.as_str()), (200, 300_000, pattern::sha256_hex(300_000).as_str()));
    // Every charged byte came back: nothing leaks from the accounting.
    let left = spooky.wait_metric("spooky_request_body_buffered_bytes", &[], Duration::from_secs(10), |v| v == 0.0);
    assert_eq!(left, 0.0, "bytes still charged after every stream ended");

    // Without the budgets, each of the 384 streams would queue 256 KiB and a chunk besides
    // (over 100 MiB); with them, the worker's budget plus what quiche may buffer per connection
    // (`max_data`), with room for allocator overhead and the connections themselves.
    let growth = rss_during.saturating_sub(rss_before);
    let bound = 2 * (PER_WORKER + CONNECTIONS as u64 * MAX_DATA) + 16 * MIB;
    assert!(growth < bound, "RSS grew {} MiB (bound {} MiB)", growth / MIB, bound / MIB);
    summary(
        "body_budgets",
        &format!(
            "streams={} held_one_connection={one} held_all={all} stalls={stalls} rss_growth={:.1}MiB bound={}MiB legit_gets=20/20 legit_upload_after_release=ok",
            CONNECTIONS * STREAMS,
            growth as f64 / MIB as f64,
            bound / MIB
        ),
    );
}

#[test]
fn a_stray_packet_flood_is_bounded_in_bytes_while_the_owner_is_busy() {
    use spooky::edge::cid::CidGenerator;
    const PACKET: usize = 32_000;
    const PACKETS: usize = 12_000;
    let b = Backend::start("strays");
    // No BPF steering: packets land on either worker by the kernel's hash, and a packet whose
    // CID names the other worker is handed over through that worker's mailbox.
    let spooky = Spooky::start_with_env(
        &format!(
            "listen: 127.0.0.1:0\nworkers: 2\ntls: {{ self_signed: [localhost] }}\nquic: {{ reuseport_bpf: false }}\n\
             upstreams:\n  main:\n    backends:\n      - address: {}\nroutes:\n  - upstream: main\n",
            b.addr
        ),
        &[("SPOOKY_FAULT_INJECTION", "1")],
    );
    assert_eq!(spooky.client().request(Request::get("/")).unwrap().status, 200);
    let (rss_before, _) = spooky.rss();
    // One worker stops handling anything for 8 s; the other keeps forwarding it strays.
    let addr = spooky.addr;
    let stall = std::thread::spawn(move || {
        let mut c = Client::connect(addr, Options::default()).unwrap();
        c.request(Request::get("/.spooky-fault/stall?ms=8000")).unwrap().status
    });
    std::thread::sleep(Duration::from_millis(300));
    // Short-header packets for connections of either worker, from many source ports.
    let socks: Vec<_> = (0..8).map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    let packets: Vec<Vec<u8>> = (0..2u8)
        .map(|w| {
            let mut p = vec![0x40];
            p.extend_from_slice(&CidGenerator::new(0, 0, w).generate());
            p.resize(PACKET, 0xaa);
            p
        })
        .collect();
    for i in 0..PACKETS {
        let _ = socks[i % socks.len()].send_to(&packets[i % 2], spooky.addr);
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let (rss_flooded, _) = spooky.rss();
    let m = spooky.metrics();
    let full = metric_sum(&m, "spooky_packets_dropped_total", &[("reason", "stray_queue_full")]);
    let forwarded = metric_sum(&m, "spooky_packets_forwarded_total", &[]);
    assert_eq!(stall.join().unwrap(), 200, "the stalled worker's own client is served afterwards");
    assert!(full > 0.0, "strays past the byte bound were dropped ({forwarded} forwarded)");
    // 4,096 queued strays of 32 KB would be 128 MiB; the byte bound keeps 4 MiB.
    let growth = rss_flooded.saturating_sub(rss_before);
    assert!(growth < 24 * MIB, "RSS grew {} MiB with the owner's mailbox full", growth / MIB);
    let mut legit = spooky.client();
    for _ in 0..20 {
        let r = legit.request(Request::get("/bytes/100000")).unwrap();
        assert_eq!((r.status, r.body_len), (200, 100_000));
    }
    summary(
        "stray_mailbox",
        &format!(
            "sent={PACKETS}x{PACKET}B forwarded={forwarded} dropped_stray_queue_full={full} rss_growth={:.1}MiB legit=20/20",
            growth as f64 / MIB as f64
        ),
    );
}
