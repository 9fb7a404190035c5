//! The HTTP/2 upstream pool: more connections when a backend's stream limit is full, graceful
//! handling of a backend's GOAWAY.

use crate::harness::{metric_sum, Backend, Spooky, PREAMBLE};
use spooky::tools::h3client::Request;

#[test]
fn a_full_connection_makes_the_pool_open_another() {
    let b = Backend::start_with("b", "127.0.0.1:0", &["--max-streams", "2"]);
    let spooky = Spooky::in_front_of(&[(&b, 1)], "");
    let mut c = spooky.client();
    // Learn the server's limit on a first connection, then ask for more than it allows.
    assert_eq!(c.request(Request::get("/")).unwrap().status, 200);
    let responses = c.run((0..8).map(|_| Request::get("/bytes/1000?delay_ms=200")).collect()).unwrap();
    assert!(responses.iter().all(|r| r.status == 200 && r.body_len == 1000));
    let connects = metric_sum(&spooky.metrics(), "spooky_upstream_connects_total", &[]);
    assert!(connects >= 2.0, "a stream-limited backend got {connects} connection(s)");
}

#[test]
fn a_backend_goaway_drains_in_flight_requests_and_new_ones_reconnect() {
    let b = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&b, 1)], "");
    let mut c = spooky.client();
    assert_eq!(c.request(Request::get("/")).unwrap().status, 200);
    // A slow request in flight on the connection the backend is about to GOAWAY.
    let responses = c.run(vec![Request::get("/bytes/5000?delay_ms=400"), Request::get("/goaway")]).unwrap();
    assert_eq!((responses[0].status, responses[0].body_len), (200, 5000), "in-flight request finished");
    assert_eq!(responses[1].status, 200);
    for _ in 0..10 {
        assert_eq!(c.request(Request::get("/")).unwrap().status, 200);
    }
    assert!(metric_sum(&spooky.metrics(), "spooky_upstream_connects_total", &[]) >= 2.0);
}

#[test]
fn keepalive_pings_close_a_connection_whose_backend_stopped_answering() {
    let b = Backend::start("b");
    let spooky =
        Spooky::in_front_of(&[(&b, 1)], "upstream_h2: { keepalive_interval: 200ms, keepalive_timeout: 200ms }");
    let mut c = spooky.client();
    assert_eq!(c.request(Request::get("/")).unwrap().status, 200);
    // A stopped process still has its socket (the kernel ACKs) but answers no PING.
    b.signal(libc::SIGSTOP);
    let started = std::time::Instant::now();
    while metric_sum(&spooky.metrics(), "spooky_upstream_keepalive_failures_total", &[]) < 1.0 {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "unanswered PING not detected");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    b.signal(libc::SIGCONT);
    // The dead connection is gone from the pool: the next request opens a fresh one.
    assert_eq!(c.request(Request::get("/")).unwrap().status, 200);
}

/// A CA and a `localhost` certificate it signed, written to `dir`: (ca.pem, cert.pem, key.pem).
fn pki(dir: &std::path::Path) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: a leaf whose subject equals its issuer looks self-signed to OpenSSL.
    ca_params.distinguished_name.push(DnType::CommonName, "Spooky test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf_params.distinguished_name.push(DnType::CommonName, "localhost");
    let leaf = leaf_params.signed_by(&key, &ca).unwrap();
    let path = |n: &str| dir.join(n).display().to_string();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    (path("ca.pem"), path("cert.pem"), path("key.pem"))
}

#[test]
fn tls_upstreams_verify_certificates_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(dir.path());
    let b = Backend::start_with("tls", "127.0.0.1:0", &["--tls-cert", &cert, "--tls-key", &key]);
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:
  trusted: {{ backends: [{{ address: \"{b}\" }}], tls: {{ server_name: localhost, ca: \"{ca}\" }} }}
  untrusted: {{ backends: [{{ address: \"{b}\" }}], tls: {{ server_name: localhost }} }}
  wrong_name: {{ backends: [{{ address: \"{b}\" }}], tls: {{ server_name: evil.example, ca: \"{ca}\" }} }}
  insecure: {{ backends: [{{ address: \"{b}\" }}], tls: {{ verify: false }} }}
routes:
  - {{ path_prefix: /untrusted/, upstream: untrusted }}
  - {{ path_prefix: /wrong/, upstream: wrong_name }}
  - {{ path_prefix: /insecure/, upstream: insecure }}
  - {{ upstream: trusted }}
",
        b = b.addr
    ));
    let mut c = spooky.client();
    let r = c.request(Request::get("/bytes/70000")).unwrap();
    assert_eq!((r.status, r.body_len), (200, 70000), "{}", r.text());
    assert_eq!(r.header("x-backend"), Some("tls"));
    for path in ["/untrusted/x", "/wrong/x"] {
        let r = c.request(Request::get(path)).unwrap();
        assert_eq!(r.status, 502, "{path}: {}", r.text());
    }
    // Why is for the operator's log, not for the client's page.
    assert!(spooky.proc.logged("TLS handshake"), "{}", spooky.proc.log_text());
    assert_eq!(c.request(Request::get("/insecure/x")).unwrap().status, 200);
}

/// Clients that stop reading must not stall the others that share their pooled HTTP/2
/// connection: each unread response holds up to a stream window of the connection's receive
/// window, so the pool lends a connection only while it has a stream window left, and a
/// response whose client accepts nothing for `timeouts.client_read` is reset.
#[test]
fn clients_that_stop_reading_do_not_stall_the_others() {
    use spooky::tools::h3client::{Client, Options};
    use std::time::{Duration, Instant};
    const STALLED: usize = 32;
    let b = Backend::start("b");
    // One worker, so every stalled response shares the normal client's pool.
    let spooky = Spooky::start(&format!(
        "{}timeouts: {{ client_read: 10s }}\nupstreams:\n  main:\n    backends: [{{ address: \"{}\" }}]\nroutes: [{{ upstream: main }}]\n",
        PREAMBLE.replace("workers: 2", "workers: 1"),
        b.addr
    ));
    // A normal request that waited for the stalled ones to be reset would fail here first.
    let mut normal = spooky.client_with(Options { timeout: Duration::from_secs(5), ..Options::default() });
    let warm = |c: &mut Client| {
        let started = Instant::now();
        let r = c.request(Request::get("/bytes/1000")).unwrap();
        assert_eq!((r.status, r.body_len), (200, 1000));
        started.elapsed()
    };
    let baseline: Vec<Duration> = (0..50).map(|_| warm(&mut normal)).collect();
    let (rss_before, _) = spooky.rss();
    let mut stalled: Vec<Client> =
        (0..STALLED).map(|_| Client::connect(spooky.addr, Options::default()).unwrap()).collect();
    for c in &mut stalled {
        c.send_unread(Request::get("/bytes/4194304")).unwrap();
    }
    // Let the stalled responses fill what they can: their windows, QUIC's and HTTP/2's.
    std::thread::sleep(Duration::from_millis(500));
    let during: Vec<Duration> = (0..200).map(|_| warm(&mut normal)).collect();
    let (rss_during, _) = spooky.rss();
    assert_eq!(
        metric_sum(&spooky.metrics(), "spooky_client_read_timeouts_total", &[]),
        0.0,
        "the normal client was served while every stalled response still held its windows"
    );
    // Past client_read every stalled response is reset, which gives the windows back.
    let reset =
        spooky.wait_metric("spooky_client_read_timeouts_total", &[], Duration::from_secs(20), |n| n >= STALLED as f64);
    assert_eq!(reset, STALLED as f64, "every stalled response is reset after client_read");
    warm(&mut normal);
    let connects = metric_sum(&spooky.metrics(), "spooky_upstream_connects_total", &[]);
    let median = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let growth = rss_during.saturating_sub(rss_before) as f64 / (1 << 20) as f64;
    // 32 stalled responses hold at most a stream window (1 MiB) in Spooky each, plus QUIC's
    // send buffers: bounded, whatever the response size.
    assert!(growth < 96.0, "RSS grew {growth:.1} MiB with {STALLED} stalled 4 MiB responses");
    crate::harness::summary(
        "stalled_readers",
        &format!(
            "stalled={STALLED} normal_ok=200/200 median_latency_before={:?} median_latency_during={:?} max_during={:?} upstream_connections={connects} resets={reset} rss_growth={growth:.1}MiB",
            median(&baseline),
            median(&during),
            during.iter().max().unwrap()
        ),
    );
}
