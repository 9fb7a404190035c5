//! The control plane: hot reload under load, refused reloads, metrics that match the traffic,
//! the admin listener, and graceful drain on SIGTERM.

use crate::harness::{metric_sum, Backend, Spooky, PREAMBLE};
use spooky::tools::h3client::{Options, Request};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(pools: &str, routes: &str) -> String {
    format!("{PREAMBLE}admin: {{ listen: 127.0.0.1:0 }}\nupstreams:\n{pools}routes:\n{routes}")
}

fn pool(name: &str, backends: &[(&Backend, u32)]) -> String {
    let list: Vec<String> =
        backends.iter().map(|(b, w)| format!("{{ address: \"{}\", weight: {w} }}", b.addr)).collect();
    format!("  {name}: {{ backends: [{}] }}\n", list.join(", "))
}

/// Rewrites the config file and waits until `/config` reports its hash; the new version.
fn rewrite(spooky: &Spooky, text: &str) -> u64 {
    std::fs::write(&spooky.config, text).unwrap();
    spooky.wait_for_config(text)["version"].as_u64().unwrap()
}

#[test]
fn twenty_reloads_under_load_lose_no_request_and_keep_the_sockets() {
    let (a, b, c) = (Backend::start("a"), Backend::start("b"), Backend::start("c"));
    let route_main = "  - { upstream: main }\n";
    let spooky = Spooky::start(&config(&pool("main", &[(&a, 1)]), route_main));
    let sockets = spooky.udp_socket_inodes();
    assert_eq!(sockets.len(), 2, "one socket per worker");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let mut client = spooky.client();
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                // Bounded: stops when told, or after 2,000 batches at most.
                for _ in 0..2_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let batch = (0..10).map(|_| Request::get("/")).chain([Request::get("/extra/x")]).collect();
                    for r in client.run(batch).expect("client run") {
                        if r.status == 200 || (r.status == 404 && r.header("x-backend").is_none()) {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();

    let variants = [
        config(&pool("main", &[(&a, 1), (&b, 1)]), route_main),
        config(&pool("main", &[(&a, 3), (&b, 1)]), route_main),
        config(
            &(pool("main", &[(&b, 1)]) + &pool("extra", &[(&c, 1)])),
            &format!("  - {{ path_prefix: /extra/, upstream: extra }}\n{route_main}"),
        ),
        config(&pool("main", &[(&a, 1)]), route_main),
    ];
    let mut last_version = 1;
    for i in 0..20 {
        if i == 10 {
            spooky.signal(libc::SIGHUP); // a reload of unchanged text changes nothing
        }
        let version = rewrite(&spooky, &variants[i % 4]);
        assert!(version > last_version, "each rewrite is a new version");
        last_version = version;
        std::thread::sleep(Duration::from_millis(50));
    }
    let finale = config(&pool("main", &[(&a, 3), (&b, 1)]), route_main);
    rewrite(&spooky, &finale);
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request may fail across reloads");
    assert!(ok.load(Ordering::Relaxed) > 1_000, "the load ran: {}", ok.load(Ordering::Relaxed));

    // The new policy is the one in force: exactly 3:1 on one connection.
    let responses = spooky.client().run((0..400).map(|_| Request::get("/")).collect()).unwrap();
    let count = |n: &str| responses.iter().filter(|r| r.header("x-backend") == Some(n)).count();
    assert_eq!((count("a"), count("b")), (300, 100));
    // Same process, same sockets.
    assert!(spooky.proc.child.id() > 0);
    assert_eq!(spooky.udp_socket_inodes(), sockets, "no socket was closed or rebound");
    let m = spooky.metrics();
    assert!(metric_sum(&m, "spooky_reloads_total", &[("result", "ok")]) >= 21.0);
}

#[test]
fn a_bad_reload_is_refused_and_the_old_config_keeps_serving() {
    let a = Backend::start("a");
    let good = config(&pool("main", &[(&a, 1)]), "  - { upstream: main }\n");
    let spooky = Spooky::start(&good);
    let mut client = spooky.client();
    assert_eq!(client.request(Request::get("/")).unwrap().status, 200);

    std::fs::write(&spooky.config, good.replace("upstream: main }", "upstream: nope }")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_sum(&spooky.metrics(), "spooky_reloads_total", &[("result", "invalid")]) < 1.0 {
        assert!(Instant::now() < deadline, "invalid reload not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The log line is copied to the file by another thread: wait for it, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !spooky.proc.log_text().contains("`routes[0].upstream`: unknown upstream `nope`") {
        assert!(Instant::now() < deadline, "rejection reason not logged:\n{}", spooky.proc.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(client.request(Request::get("/")).unwrap().header("x-backend"), Some("a"));
    let (_, cfg) = spooky.admin_get("/config");
    assert!(cfg.contains("\"version\":1"), "{cfg}");

    // A new listen address needs a restart: refused whole, counted, still serving.
    std::fs::write(&spooky.config, good.replace("listen: 127.0.0.1:0", "listen: 127.0.0.2:0")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_sum(&spooky.metrics(), "spooky_reloads_total", &[("result", "restart_required")]) < 1.0 {
        assert!(Instant::now() < deadline, "restart-required reload not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(client.request(Request::get("/")).unwrap().status, 200);
}

#[test]
fn metrics_count_exactly_the_traffic_sent() {
    let a = Backend::start("a");
    let spooky = Spooky::start(&config(&pool("main", &[(&a, 1)]), "  - { name: api, upstream: main }\n"));
    let mut requests: Vec<Request> = (0..37).map(|_| Request::get("/bytes/100")).collect();
    requests.extend((0..5).map(|_| Request::get("/status/503")));
    let mut client = spooky.client();
    client.run(requests).unwrap();
    let mut malformed = Request::get("/");
    malformed.raw_head = Some(vec![(b":method".to_vec(), b"GET".to_vec())]);
    for _ in 0..3 {
        assert!(client.request(malformed.clone()).unwrap().reset.is_some());
    }
    let mut second = spooky.client();
    second.request(Request::get("/")).unwrap();

    let m = spooky.metrics();
    let route = [("route", "api"), ("pool", "main")];
    assert_eq!(metric_sum(&m, "spooky_requests_total", &[route[0], route[1], ("class", "2xx")]), 38.0);
    assert_eq!(metric_sum(&m, "spooky_requests_total", &[route[0], route[1], ("class", "5xx")]), 5.0);
    assert_eq!(metric_sum(&m, "spooky_malformed_requests_total", &[]), 3.0);
    assert_eq!(metric_sum(&m, "spooky_connections_accepted_total", &[]), 2.0);
    assert_eq!(metric_sum(&m, "spooky_quic_handshakes_total", &[]), 2.0);
    assert_eq!(metric_sum(&m, "spooky_connections_active", &[]), 2.0);
    assert_eq!(metric_sum(&m, "spooky_streams_active", &[]), 0.0);
    let durations = m
        .samples
        .iter()
        .find(|s| s.metric == "spooky_request_duration_seconds" && s.labels.get("pool") == Some("main"))
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map(|b| b.count).unwrap_or(0.0),
            _ => 0.0,
        });
    assert!(durations.is_some(), "request duration histogram exported");
    assert_eq!(metric_sum(&m, "spooky_config_version", &[]), 1.0);
}

#[test]
fn admin_endpoints_and_token_guarded_reload() {
    let a = Backend::start("a");
    let token = "s3cret-token-0123456789";
    let text = config(&pool("main", &[(&a, 1)]), "  - { upstream: main }\n")
        .replace("admin: { listen: 127.0.0.1:0 }", &format!("admin: {{ listen: 127.0.0.1:0, token: {token} }}"));
    let spooky = Spooky::start(&text);
    // The harness writes the file 0644: a token every user of the machine can read.
    let log = spooky.proc.log_text();
    assert!(log.contains("a secret is readable by every user") && log.contains("key=\"admin.token\""), "{log}");
    assert_eq!(spooky.admin_get("/healthz").0, 200);
    assert_eq!(spooky.admin_get("/readyz").0, 200);
    assert_eq!(spooky.admin_get("/nope").0, 404);
    assert_eq!(spooky.admin_request("POST", "/metrics", None).0, 405);
    assert_eq!(spooky.admin_request("POST", "/reload", None).0, 401);
    assert_eq!(spooky.admin_request("POST", "/reload", Some("wrong-token-0123456789")).0, 401);
    // Same text: nothing to apply, still version 1.
    let outcome = spooky.admin_reload(token);
    assert_eq!((outcome["state"].as_str(), outcome["version"].as_u64()), (Some("applied"), Some(1)), "{outcome}");
}

#[test]
fn admin_refuses_state_changes_without_a_token() {
    let a = Backend::start("a");
    let spooky = Spooky::start(&config(&pool("main", &[(&a, 1)]), "  - { upstream: main }\n"));
    assert_eq!(spooky.admin_request("POST", "/reload", Some("anything-at-all-1234")).0, 403);
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let a = Backend::start("a");
    let mut spooky = Spooky::start(
        &config(&pool("main", &[(&a, 1)]), "  - { upstream: main }\n")
            .replace("admin:", "timeouts: { drain: 8s }\nadmin:"),
    );
    let mut client = spooky.client_with(Options { timeout: Duration::from_secs(20), ..Options::default() });
    let in_flight = std::thread::spawn(move || {
        client.run((0..3).map(|_| Request::get("/bytes/5000?delay_ms=1500")).collect()).expect("responses")
    });
    std::thread::sleep(Duration::from_millis(400));
    spooky.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(spooky.admin_get("/readyz").0, 503, "not ready while draining");
    let responses = in_flight.join().unwrap();
    assert!(responses.iter().all(|r| r.status == 200 && r.body_len == 5000), "{responses:?}");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = spooky.proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "did not exit within the drain deadline");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_second_signal_exits_at_once() {
    let a = Backend::start("a");
    let mut spooky = Spooky::start(
        &config(&pool("main", &[(&a, 1)]), "  - { upstream: main }\n")
            .replace("admin:", "timeouts: { drain: 60s }\nadmin:"),
    );
    let mut client = spooky.client_with(Options { timeout: Duration::from_secs(5), ..Options::default() });
    let slow = std::thread::spawn(move || client.request(Request::get("/?delay_ms=30000")));
    std::thread::sleep(Duration::from_millis(300));
    spooky.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert!(spooky.proc.child.try_wait().unwrap().is_none(), "still draining after one signal");
    spooky.signal(libc::SIGINT);
    let started = Instant::now();
    let status = loop {
        if let Some(s) = spooky.proc.child.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "second signal must exit at once");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(1));
    let _ = slow.join();
}

#[test]
fn certificates_are_reread_on_reload_and_live_connections_keep_theirs() {
    let a = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let write_cert = |name: &str| -> Vec<u8> {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
        ck.cert.der().to_vec()
    };
    let first = write_cert("localhost");
    let tls = format!("tls: {{ cert: {0}/cert.pem, key: {0}/key.pem }}", dir.path().display());
    let text = config(&pool("main", &[(&a, 1)]), "  - { upstream: main }\n")
        .replace("tls: { self_signed: [localhost] }", &tls);
    let spooky = Spooky::start(&text);
    let mut old = spooky.client();
    assert_eq!(old.peer_cert(), Some(first.clone()));

    let second = write_cert("localhost");
    // Same config text, new files: a reload (SIGHUP) still re-reads them.
    spooky.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let fresh = spooky.client();
        if fresh.peer_cert() == Some(second.clone()) {
            break;
        }
        assert!(Instant::now() < deadline, "new handshakes never got the new certificate");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(old.request(Request::get("/")).unwrap().status, 200, "the live connection is untouched");
}

/// The admin listener cannot be used against the proxy: 200 connections that never finish a
/// request head and one sending a 10 MiB header line leave `/healthz` answering and the
/// HTTP/3 data path serving; only `Authorization: Bearer TOKEN` exactly is accepted; a
/// loopback listener refuses a `Host` that is not its own (DNS rebinding).
#[test]
fn the_admin_listener_survives_slowloris_and_huge_headers_and_checks_host_and_token() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let a = Backend::start("a");
    let token = "s3cret-token-0123456789";
    let text = config(&pool("main", &[(&a, 1)]), "  - { upstream: main }\n")
        .replace("admin: { listen: 127.0.0.1:0 }", &format!("admin: {{ listen: 127.0.0.1:0, token: {token} }}"));
    let spooky = Spooky::start(&text);
    let mut client = spooky.client();

    // 200 slowloris connections, each with half a request line.
    let slow: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = TcpStream::connect(spooky.admin).unwrap();
            s.write_all(b"GET /heal").unwrap();
            s
        })
        .collect();
    // A 10 MiB header line: refused after 8 KiB with 431, the rest never read.
    let mut huge = TcpStream::connect(spooky.admin).unwrap();
    huge.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let line = format!("GET /healthz HTTP/1.1\r\nx-big: {}", "a".repeat(10 << 20));
    let _ = huge.write_all(line.as_bytes()); // the server may close before it is all sent
    let mut answer = String::new();
    let _ = huge.read_to_string(&mut answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer:.80}");

    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        assert_eq!(spooky.admin_get("/healthz").0, 200, "healthz under slowloris");
        slowest = slowest.max(started.elapsed());
        let r = client.request(Request::get("/")).unwrap();
        assert_eq!(r.status, 200, "the data path is untouched");
    }
    let evicted = metric_sum(&spooky.metrics(), "spooky_admin_connections_evicted_total", &[]);
    assert!(evicted >= 136.0, "200 held connections over a limit of 64: {evicted} evicted");
    drop(slow);

    // The token: exactly `Bearer TOKEN`.
    for wrong in [token.to_string(), format!("bearer {token}"), format!("Bearer {token}x"), format!("Basic {token}")] {
        let auth = format!("authorization: {wrong}\r\n");
        assert_eq!(admin_send(&spooky, "POST /reload", Some("127.0.0.1"), &auth).0, 401, "{wrong}");
    }
    let auth = format!("authorization: Bearer {token}\r\n");
    assert_eq!(admin_send(&spooky, "POST /reload", Some("127.0.0.1"), &auth).0, 202);
    // DNS rebinding: a page of evil.example that resolves to 127.0.0.1 sends its own name.
    assert_eq!(admin_send(&spooky, "GET /metrics", None, "").0, 421, "no Host");
    assert_eq!(admin_send(&spooky, "GET /metrics", Some("evil.example:9901"), "").0, 421);
    for host in ["localhost", "127.0.0.1:9901", "[::1]:9901"] {
        assert_eq!(admin_send(&spooky, "GET /healthz", Some(host), "").0, 200, "{host}");
    }
    crate::harness::summary(
        "admin_abuse",
        &format!("slowloris=200 huge_header=10MiB evicted={evicted} healthz_slowest={slowest:?} data_path_ok=20/20"),
    );
}

/// An admin request with `Host: host` (none if `None`) and the `extra` header lines:
/// (status, body).
fn admin_send(spooky: &Spooky, request: &str, host: Option<&str>, extra: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let host = host.map(|h| format!("host: {h}\r\n")).unwrap_or_default();
    let mut s = std::net::TcpStream::connect(spooky.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{request} HTTP/1.1\r\n{host}{extra}connection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}
