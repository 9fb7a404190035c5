//! Abuse at the QUIC edge while a legitimate client keeps working: garbage datagram floods,
//! floods of Initials that never complete, and idle connections up to the per-worker limit.
//! Each test checks that the legitimate client gets every response right (status and
//! byte-exact body), that Spooky's memory stays bounded, and that the abuse is counted.
//! Stream- and HTTP/3-level abuse (stream limits, header blocks, QPACK, slowloris, resets)
//! is in `tests/interop/test_abuse.py` (aioquic can send what quiche's client refuses to).
//!
//! Sizes scale with `SPOOKY_SOAK_SCALE` (`scripts/soak`); the fast variants run in the suite.

use crate::harness::{metric_sum, soak_scale, summary, Backend, Legit, Noise, Spooky, PREAMBLE};
use spooky::tools::h3client::{Client, Error, Options, Request};
use spooky::tools::pattern;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

const MIB: f64 = (1 << 20) as f64;

fn config(backend: &Backend, quic: &str, timeouts: &str) -> String {
    format!(
        "{PREAMBLE}quic: {{ {quic} }}\ntimeouts: {{ {timeouts} }}\nupstreams:\n  main: {{ backends: [{{ address: \"{}\" }}] }}\nroutes:\n  - {{ upstream: main }}\n",
        backend.addr
    )
}

/// A fresh connection makes one byte-exact download.
fn fresh_client_ok(spooky: &Spooky) {
    let mut c = Client::connect(spooky.addr, Options::default())
        .unwrap_or_else(|e| panic!("a legitimate client could not connect: {e}"));
    let r = c.request(Request::get("/bytes/50000")).expect("request");
    assert_eq!((r.status, r.sha256.as_str()), (200, pattern::sha256_hex(50_000).as_str()));
    c.close();
}

/// Garbage of several shapes: random bytes, short headers carrying a CID in Spooky's layout
/// that no connection has, long headers with an unknown version, and QUIC v1 Initials whose
/// payload is noise (they cannot be decrypted).
fn garbage(noise: &mut Noise, i: usize) -> Vec<u8> {
    let len = [1, 7, 30, 64, 600, 1200, 1350][(noise.next() % 7) as usize];
    let mut p = vec![0u8; len];
    noise.fill(&mut p);
    match i % 4 {
        1 if len > 20 => {
            p[0] = 0x40 | (p[0] & 0x3f);
            p[1] = 0x0f;
            p[2..4].copy_from_slice(&[0, 0]);
            p[4] = (i % 2) as u8;
        }
        2 if len > 20 => {
            p[0] = 0xc0 | (p[0] & 0x0f);
            p[1..5].copy_from_slice(&[0x1a, 0x2a, 0x3a, 0x4a]);
            p[5] = 8;
            p[14] = 8;
        }
        3 if len >= 1200 => {
            // Initial, version 1, 8-byte CIDs, no token, a length covering the rest.
            p[0] = 0xc0 | (p[0] & 0x0f);
            p[1..5].copy_from_slice(&1u32.to_be_bytes());
            p[5] = 8;
            p[14] = 8;
            p[23] = 0;
            let rest = (len - 26) as u16 | 0x4000;
            p[24..26].copy_from_slice(&rest.to_be_bytes());
        }
        _ => {}
    }
    p
}

#[test]
fn a_garbage_flood_is_accounted_and_costs_the_legit_client_nothing() {
    let backend = Backend::start("abuse-garbage");
    // A short idle timeout: undecryptable Initials leave half-open connections (see below).
    let spooky = Spooky::start(&config(&backend, "", "idle: 3s"));
    fresh_client_ok(&spooky);
    let (rss_before, _) = spooky.rss();
    let before = spooky.metrics();
    let kernel_before = spooky.udp_drops();
    let legit = Legit::start(spooky.addr, 3);

    let total = 20_000 * soak_scale() as usize;
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut noise = Noise(0x2545_f491_4f6c_dd1d);
    let started = Instant::now();
    for i in 0..total {
        sock.send_to(&garbage(&mut noise, i), spooky.addr).unwrap();
        // Paced: about 50 000 datagrams per second at most.
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let flood_time = started.elapsed();
    // Scraped while the legitimate client is still connected (its closing packets may land on
    // forgotten CIDs), once Spooky has worked through its receive queue.
    let outcomes = |m: &prometheus_parse::Scrape| {
        [
            "spooky_packets_dropped_total",
            "spooky_stateless_resets_sent_total",
            "spooky_version_negotiations_total",
            // Undecryptable Initials arriving faster than `retry_above_rate` get a Retry.
            "spooky_retries_sent_total",
        ]
        .iter()
        .map(|n| metric_sum(m, n, &[]) - metric_sum(&before, n, &[]))
        .sum::<f64>()
    };
    let mut after = spooky.metrics();
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let again = spooky.metrics();
        let settled = outcomes(&again) == outcomes(&after);
        after = again;
        if settled {
            break;
        }
    }
    let accounted = outcomes(&after);
    let kernel = (spooky.udp_drops() - kernel_before) as f64;
    let report = legit.finish();
    fresh_client_ok(&spooky);
    let delta = |name: &str| metric_sum(&after, name, &[]) - metric_sum(&before, name, &[]);
    let total = total as f64;
    // Every garbage datagram ends in exactly one outcome inside Spooky, unless the kernel
    // dropped it first (the kernel's count may include a legitimate client's datagram).
    assert!(accounted <= total, "{accounted} outcomes for {total} garbage datagrams: counted twice");
    assert!(accounted + kernel >= total, "{accounted} counted + {kernel} kernel drops < {total} sent");
    assert!(delta("spooky_stateless_resets_sent_total") > 0.0);
    assert!(delta("spooky_version_negotiations_total") > 0.0);
    // The background client is still connected in `after`.
    let still_active = metric_sum(&after, "spooky_connections_active", &[]) - 1.0;
    // Undecryptable v1 Initials do open connections (`garbage_initials_open_no_connections`
    // shows it), but none of them ever completes a handshake and all are reclaimed.
    let handshakes = metric_sum(&spooky.metrics(), "spooky_quic_handshakes_total", &[])
        - metric_sum(&before, "spooky_quic_handshakes_total", &[]);
    assert_eq!(handshakes, 2.0, "only the two legitimate clients completed a handshake");
    let (rss_after, _) = spooky.rss();
    let growth = rss_after as f64 - rss_before as f64;
    assert!(growth < 48.0 * MIB, "RSS grew {:.1} MiB during the flood", growth / MIB);
    let by_reason: Vec<String> = ["unparseable", "unknown_cid", "short_initial", "rejected", "invalid_token"]
        .iter()
        .map(|r| {
            let v = metric_sum(&after, "spooky_packets_dropped_total", &[("reason", r)])
                - metric_sum(&before, "spooky_packets_dropped_total", &[("reason", r)]);
            format!("{r}={v}")
        })
        .collect();
    summary(
        "garbage_flood",
        &format!(
            "sent={total} in {:.1}s, dropped[{}], stateless_resets={}, version_negotiations={}, retries={}, kernel_drops={kernel}, rss_growth={:.1}MiB, legit_ok={}/{}",
            flood_time.as_secs_f64(),
            by_reason.join(" "),
            delta("spooky_stateless_resets_sent_total"),
            delta("spooky_version_negotiations_total"),
            delta("spooky_retries_sent_total"),
            growth / MIB,
            report.ok,
            report.requests
        ),
    );
    summary(
        "garbage_flood",
        &format!(
            "connections opened by garbage Initials={}, of them still active after the flood={still_active}",
            delta("spooky_connections_accepted_total") - 1.0
        ),
    );
    let active = spooky.wait_metric("spooky_connections_active", &[], Duration::from_secs(20), |v| v == 0.0);
    assert_eq!(active, 0.0, "half-open connections were never reclaimed");
}

#[test]
fn garbage_initials_open_no_connections() {
    let backend = Backend::start("abuse-garbage-initials");
    let spooky = Spooky::start(&config(&backend, "", ""));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut noise = Noise(0x0123_4567_89ab_cdef);
    let mut sent = 0;
    while sent < 200 {
        let mut p = garbage(&mut noise, 3);
        if p.len() < 1200 {
            continue;
        }
        p[0] = 0xc0;
        sock.send_to(&p, spooky.addr).unwrap();
        sent += 1;
    }
    fresh_client_ok(&spooky);
    // No state is held (the legitimate client's closed connection drains away)...
    let active = spooky.wait_metric("spooky_connections_active", &[], Duration::from_secs(20), |v| v == 0.0);
    assert_eq!(active, 0.0);
    // ...and nothing in them could be decrypted: each was dropped (counted), none opened a
    // connection.
    let m = spooky.metrics();
    assert_eq!(metric_sum(&m, "spooky_packets_dropped_total", &[("reason", "rejected")]), 200.0);
    assert_eq!(metric_sum(&m, "spooky_connections_accepted_total", &[]), 1.0, "connections opened by noise");
}

/// Sends one real client Initial (a fresh quiche client connection) from a fresh source
/// port and never reads the answer.
fn one_initial(config: &mut quiche::Config, peer: SocketAddr, out: &mut [u8]) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = sock.local_addr().unwrap();
    let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut scid).unwrap();
    let scid = quiche::ConnectionId::from_ref(&scid);
    let mut conn = quiche::connect(Some("localhost"), &scid, local, peer, config).unwrap();
    let (n, info) = conn.send(out).unwrap();
    sock.send_to(&out[..n], info.to).unwrap();
}

#[test]
fn an_initial_flood_engages_retry_and_keeps_state_bounded() {
    let backend = Backend::start("abuse-initials");
    // Retry only above 20 new connections per second per worker; half-open connections
    // (accepted before Retry engaged) are reclaimed by the 3 s idle timeout.
    let spooky = Spooky::start(&config(&backend, "retry: auto, retry_above_rate: 20", "idle: 3s"));
    fresh_client_ok(&spooky);
    let (rss_before, _) = spooky.rss();
    let before = spooky.metrics();
    let kernel_before = spooky.udp_drops();
    let legit = Legit::start(spooky.addr, 3);

    let mut qc = quiche::Config::new(quiche::PROTOCOL_VERSION).unwrap();
    qc.set_application_protos(quiche::h3::APPLICATION_PROTOCOL).unwrap();
    qc.verify_peer(false);
    qc.set_max_idle_timeout(5_000);
    let mut out = vec![0u8; 1500];
    let total = 3_000 * soak_scale() as usize;
    let mut peak_active = 0.0f64;
    let mut fresh = 0;
    let started = Instant::now();
    for i in 0..total {
        one_initial(&mut qc, spooky.addr, &mut out);
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(5));
        }
        if i % 500 == 499 {
            peak_active = peak_active.max(metric_sum(&spooky.metrics(), "spooky_connections_active", &[]));
            // A new legitimate client gets through (its quiche answers the Retry).
            fresh_client_ok(&spooky);
            fresh += 1;
        }
    }
    let flood_time = started.elapsed();
    let report = legit.finish();
    let after = spooky.metrics();
    let delta = |name: &str| metric_sum(&after, name, &[]) - metric_sum(&before, name, &[]);
    let retries = delta("spooky_retries_sent_total");
    let accepted = delta("spooky_connections_accepted_total");
    let kernel = (spooky.udp_drops() - kernel_before) as f64;
    let total = total as f64;
    // Nearly every flood Initial was answered statelessly: the rate window lets in at most
    // about `retry_above_rate` per second per worker before Retry engages.
    let allowed = 2.0 * 20.0 * (flood_time.as_secs_f64() + 1.0);
    assert!(accepted <= allowed + 1.0 + fresh as f64, "{accepted} connections accepted, bound {allowed}");
    assert!(
        retries + accepted + kernel >= total,
        "retries {retries} + accepted {accepted} + kernel {kernel} < {total}"
    );
    assert!(peak_active <= allowed + 2.0, "peak {peak_active} active connections");
    // Half-open connections expire; only the legitimate ones were ever established.
    let active = spooky.wait_metric("spooky_connections_active", &[], Duration::from_secs(20), |v| v == 0.0);
    assert_eq!(active, 0.0, "half-open connections were never reclaimed");
    let handshakes = metric_sum(&spooky.metrics(), "spooky_quic_handshakes_total", &[])
        - metric_sum(&before, "spooky_quic_handshakes_total", &[]);
    assert_eq!(handshakes, 1.0 + fresh as f64, "only legitimate clients completed a handshake");
    let (rss_after, peak) = spooky.rss();
    let growth = rss_after as f64 - rss_before as f64;
    assert!(growth < 32.0 * MIB, "RSS grew {:.1} MiB", growth / MIB);
    summary(
        "initial_flood",
        &format!(
            "initials={total} in {:.1}s, retries_sent={retries}, accepted={accepted} (incl. {} legit), peak_active={peak_active}, kernel_drops={kernel}, rss_growth={:.1}MiB, rss_peak={:.1}MiB, legit_ok={}/{}",
            flood_time.as_secs_f64(),
            fresh + 1,
            growth / MIB,
            peak as f64 / MIB,
            report.ok,
            report.requests
        ),
    );
}

#[test]
fn idle_connections_fill_a_worker_then_the_next_is_refused() {
    let backend = Backend::start("abuse-idle");
    let limit = (100 * soak_scale()).min(2_000) as usize;
    let yaml =
        config(&backend, &format!("max_connections_per_worker: {limit}"), "").replace("workers: 2", "workers: 1");
    let spooky = Spooky::start(&yaml);
    fresh_client_ok(&spooky);
    let (rss_before, _) = spooky.rss();
    // Each client makes one small request right after its handshake, then idles. (A quiche
    // client that never reads after its handshake acknowledges nothing until it next runs:
    // Spooky then measures a seconds-long RTT, and the connection's draining period after a
    // close, three PTOs, grows with it.)
    let mut idle: Vec<Client> = (0..limit)
        .map(|i| {
            let mut c = Client::connect(spooky.addr, Options::default()).unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(c.request(Request::get("/bytes/1")).unwrap().status, 200);
            c
        })
        .collect();
    let active = metric_sum(&spooky.metrics(), "spooky_connections_active", &[]);
    assert_eq!(active, limit as f64);
    let (rss_full, _) = spooky.rss();
    match Client::connect(spooky.addr, Options::default()) {
        Err(Error::Closed(reason)) => assert!(reason.contains("peer error 0x2"), "{reason}"),
        other => panic!("expected CONNECTION_REFUSED (0x2), got {:?}", other.map(|_| "a connection")),
    }
    assert!(
        metric_sum(&spooky.metrics(), "spooky_connections_refused_total", &[("reason", "connection_limit")]) >= 1.0
    );
    // The held connections all still work.
    for c in idle.iter_mut().step_by((limit / 10).max(1)) {
        let r = c.request(Request::get("/bytes/20000")).unwrap();
        assert_eq!((r.status, r.sha256.as_str()), (200, pattern::sha256_hex(20_000).as_str()));
    }
    // Freeing one slot lets a new client in (once the closed connection has drained).
    idle.swap_remove(0).close();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tries = 0;
    let mut reconnect = loop {
        tries += 1;
        match Client::connect(spooky.addr, Options::default()) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("a freed slot was never reusable: {e}"),
        }
    };
    let r = reconnect.request(Request::get("/bytes/20000")).unwrap();
    assert_eq!((r.status, r.sha256.as_str()), (200, pattern::sha256_hex(20_000).as_str()));
    reconnect.close();
    let per_conn = (rss_full as f64 - rss_before as f64) / limit as f64;
    // A stated bound: an idle connection (handshake done, HTTP/3 set up) costs under 256 KiB.
    assert!(per_conn < 256.0 * 1024.0, "{:.0} KiB of RSS per idle connection", per_conn / 1024.0);
    summary(
        "idle_connections",
        &format!(
            "limit={limit}, rss_before={:.1}MiB, rss_full={:.1}MiB, per_connection={:.1}KiB, next refused with 0x2, reconnect after one close took {tries} attempt(s)",
            rss_before as f64 / MIB,
            rss_full as f64 / MIB,
            per_conn / 1024.0
        ),
    );
    for c in idle {
        c.close();
    }
}
