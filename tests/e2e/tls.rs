//! TLS at the edge: certificates chosen by SNI (ECDSA and RSA), the default certificate,
//! bad `tls.sni` entries refused at start, and session resumption across workers and reloads
//! through the process-wide ticket keys.

use crate::harness::{metric_sum, Backend, Spooky};
use boring::pkey::{Id, PKey, Private};
use boring::x509::X509;
use spooky::tools::certs;
use spooky::tools::h3client::{Body, Client, EarlyData, Options, Request};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn ecdsa_key() -> PKey<Private> {
    certs::ecdsa_key().unwrap()
}

fn rsa_key() -> PKey<Private> {
    certs::rsa_key().unwrap()
}

/// Writes `{stem}.crt` and `{stem}.key`: a self-signed certificate for `names`.
fn write_cert(dir: &Path, stem: &str, key: &PKey<Private>, names: &[&str]) {
    certs::write_self_signed(dir, stem, key, names).unwrap();
}

/// A configuration with a self-signed default certificate for `localhost` plus `tls_extra`.
fn config(backend: &Backend, tls_extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nworkers: 2\ntls:\n  self_signed: [localhost]\n{tls_extra}\nupstreams:\n  main:\n    backends:\n      - address: {}\nroutes:\n  - upstream: main\n",
        backend.addr
    )
}

/// The server certificate the client saw: its DNS names and key type.
fn seen(client: &Client) -> (Vec<String>, Id) {
    let cert = X509::from_der(&client.peer_cert().expect("a server certificate")).unwrap();
    let names = cert
        .subject_alt_names()
        .map(|s| s.iter().filter_map(|n| n.dnsname().map(str::to_string)).collect())
        .unwrap_or_default();
    (names, cert.public_key().unwrap().id())
}

fn opts(server_name: &str) -> Options {
    Options { server_name: server_name.into(), timeout: Duration::from_secs(10), ..Options::default() }
}

/// Two SNI certificates (ECDSA P-256 and RSA 2048) beside the self-signed default.
fn sni_certs(dir: &Path) -> String {
    write_cert(dir, "api", &ecdsa_key(), &["api.example.com"]);
    write_cert(dir, "org", &rsa_key(), &["*.example.org", "example.org"]);
    format!(
        "  sni:\n    - {{ names: [api.example.com], cert: {0}/api.crt, key: {0}/api.key }}\n    - {{ cert: {0}/org.crt, key: {0}/org.key }}\n",
        dir.display()
    )
}

#[test]
fn sni_selects_ecdsa_and_rsa_certificates_and_falls_back_to_the_default() {
    let backend = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let spooky = Spooky::start(&config(&backend, &sni_certs(dir.path())));
    let cases: [(&str, bool, &[&str], Id); 5] = [
        ("api.example.com", true, &["api.example.com"], Id::EC),
        ("www.example.org", true, &["*.example.org", "example.org"], Id::RSA),
        ("example.org", true, &["*.example.org", "example.org"], Id::RSA),
        ("unknown.example.net", true, &["localhost"], Id::EC),
        ("api.example.com", false, &["localhost"], Id::EC),
    ];
    for (name, sni, names, key) in cases {
        let mut client = spooky.client_with(Options { sni, ..opts(name) });
        let (got, id) = seen(&client);
        assert_eq!((got.as_slice(), id), (names.iter().map(|s| s.to_string()).collect::<Vec<_>>().as_slice(), key));
        // The handshake is complete and HTTP/3 works over it, whatever the certificate.
        assert_eq!(client.request(Request::get("/bytes/10")).unwrap().status, 200, "{name} (sni {sni})");
    }
}

#[test]
fn a_bad_sni_entry_is_refused_at_start_with_file_key_and_problem() {
    let backend = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), "a", &ecdsa_key(), &["a.test"]);
    write_cert(dir.path(), "b", &rsa_key(), &["b.test"]);
    let d = dir.path().display();
    let cases: [(String, &[&str]); 4] = [
        (
            format!("  sni:\n    - {{ cert: {d}/a.crt, key: {d}/a.key }}\n    - {{ cert: {d}/b.crt, key: {d}/a.key }}"),
            &["`tls.sni[1].key`", "a.key` does not match the certificate in", "b.crt"],
        ),
        (format!("  sni:\n    - {{ cert: {d}/none.crt, key: {d}/a.key }}"), &["`tls.sni[0].cert`", "cannot read", "none.crt"]),
        (format!("  sni:\n    - {{ cert: {d}/a.crt, key: {d}/a.crt }}"), &["`tls.sni[0].key`", "holds no PEM `PRIVATE KEY` block"]),
        (
            format!("  sni:\n    - {{ cert: {d}/a.crt, key: {d}/a.key }}\n    - {{ names: [a.test], cert: {d}/b.crt, key: {d}/b.key }}"),
            &["`tls.sni[1].names`", "`a.test` is already served by tls.sni[0]"],
        ),
    ];
    for (tls, expected) in cases {
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, config(&backend, &tls)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_spooky")).arg("run").arg("--config").arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(text.contains(path.to_str().unwrap()), "names the config file: {text}");
        for e in expected {
            assert!(text.contains(e), "expected `{e}` in: {text}");
        }
    }
}

/// Which worker accepted the connection `connect` opens (from the per-worker counters).
fn on_worker<T>(spooky: &Spooky, connect: impl FnOnce() -> T) -> (T, usize) {
    let count = |w: &str| metric_sum(&spooky.metrics(), "spooky_connections_accepted_total", &[("worker", w)]) as u64;
    let before = [count("0"), count("1")];
    let out = connect();
    let after = [count("0"), count("1")];
    let worker = (0..2).find(|&w| after[w] > before[w]).expect("a worker accepted the connection");
    assert_eq!(after[0] + after[1], before[0] + before[1] + 1, "one connection at a time");
    (out, worker)
}

/// Connects `n` or more times with `session` until both workers accepted at least 3
/// connections; every one must resume. Returns connections per worker.
fn resume_on_both_workers(spooky: &Spooky, session: &[u8], n: usize) -> [usize; 2] {
    let mut per_worker = [0usize; 2];
    let mut total = 0;
    while total < n || per_worker.iter().any(|&c| c < 3) {
        assert!(total < 60, "60 connections and one worker got fewer than 3: {per_worker:?}");
        let (mut client, worker) =
            on_worker(spooky, || spooky.client_with(Options { session: Some(session.to_vec()), ..opts("localhost") }));
        assert!(client.is_resumed(), "connection {total} on worker {worker} did not resume");
        assert_eq!(client.request(Request::get("/bytes/5")).unwrap().status, 200);
        client.close();
        per_worker[worker] += 1;
        total += 1;
    }
    per_worker
}

#[test]
fn a_ticket_from_one_worker_resumes_on_every_worker() {
    let backend = Backend::start("a");
    let spooky = Spooky::start(&config(&backend, ""));
    let (mut first, issuer) = on_worker(&spooky, || spooky.client_with(opts("localhost")));
    assert!(!first.is_resumed());
    assert_eq!(first.request(Request::get("/bytes/5")).unwrap().status, 200);
    let session = first.wait_session().unwrap();
    first.close();
    let per_worker = resume_on_both_workers(&spooky, &session, 12);
    assert!(per_worker[1 - issuer] >= 3, "the other worker resumed the ticket too: {per_worker:?}");

    // A ticket from another server process is not accepted: a full handshake, no failure.
    let other = Spooky::start(&config(&backend, ""));
    let mut client = other.client_with(Options { session: Some(session), ..opts("localhost") });
    assert!(!client.is_resumed());
    assert_eq!(client.request(Request::get("/bytes/5")).unwrap().status, 200);
}

#[test]
fn a_reload_keeps_tickets_valid() {
    let backend = Backend::start("a");
    let dir = tempfile::tempdir().unwrap();
    let spooky = Spooky::start(&config(&backend, &sni_certs(dir.path())));
    let mut first = spooky.client_with(opts("api.example.com"));
    let session = first.wait_session().unwrap();
    first.close();

    // Replace the SNI certificate for api.example.com (an RSA one now) and reload.
    write_cert(dir.path(), "api2", &rsa_key(), &["api.example.com"]);
    let text =
        std::fs::read_to_string(&spooky.config).unwrap().replace("api.crt", "api2.crt").replace("api.key", "api2.key");
    std::fs::write(&spooky.config, text).unwrap();
    spooky.signal(libc::SIGHUP);
    // Wait until each worker hands out the new certificate: both then run contexts built
    // after the reload.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut reloaded = [false; 2];
    while reloaded != [true, true] {
        assert!(Instant::now() < deadline, "the reload never reached both workers: {reloaded:?}");
        let (client, worker) = on_worker(&spooky, || spooky.client_with(opts("api.example.com")));
        reloaded[worker] |= seen(&client).1 == Id::RSA;
        client.close();
    }
    // The ticket issued before the reload still resumes, on either worker.
    resume_on_both_workers(&spooky, &session, 10);
}

#[test]
fn early_data_is_off_unless_configured() {
    let backend = Backend::start("a");
    let spooky = Spooky::start(&config(&backend, ""));
    let mut first = spooky.client_with(opts("localhost"));
    let session = first.wait_session().unwrap();
    first.close();
    let requests = vec![Request::get("/bytes/100"), Request::get("/bytes/7")];
    let (client, responses) =
        Client::connect_early(spooky.addr, Options { session: Some(session), ..opts("localhost") }, requests).unwrap();
    assert_eq!(responses.iter().map(|r| (r.status, r.body_len)).collect::<Vec<_>>(), vec![(200, 100), (200, 7)]);
    assert!(client.is_resumed());
    // Without `quic.early_data` the tickets carry no 0-RTT allowance: nothing is offered.
    assert_eq!(client.early_data(), EarlyData::NotOffered);

    // Without a session there is nothing to resume and nothing early.
    let (client, responses) =
        Client::connect_early(spooky.addr, opts("localhost"), vec![Request::get("/bytes/3")]).unwrap();
    assert_eq!(responses[0].body_len, 3);
    assert!(!client.is_resumed());
    assert_eq!(client.early_data(), EarlyData::NotOffered);
}

#[test]
fn early_data_forwards_safe_methods_marked_and_answers_others_425() {
    let backend = Backend::start("a");
    let spooky = Spooky::start(&config(&backend, "quic: { early_data: true }"));
    let mut first = spooky.client_with(opts("localhost"));
    let session = first.wait_session().unwrap();
    first.close();
    let requests = vec![
        Request::get("/headers"),
        Request::post("/echo", Body::Bytes(bytes::Bytes::from_static(b"not twice"))),
        Request::get("/bytes/7"),
    ];
    let early_opts = Options { session: Some(session.clone()), ..opts("localhost") };
    let (client, responses) = Client::connect_early(spooky.addr, early_opts, requests).unwrap();
    assert!(client.is_resumed());
    assert_eq!(client.early_data(), EarlyData::Accepted);
    // RFC 8470: the GET went upstream in early data, marked so the backend may refuse it too.
    assert_eq!(responses[0].status, 200);
    assert!(responses[0].text().contains("early-data: 1"), "{}", responses[0].text());
    // A POST could be replayed by whoever captured the 0-RTT flight: 425, never forwarded.
    assert_eq!(responses[1].status, 425);
    assert_eq!((responses[2].status, responses[2].body_len), (200, 7));
    assert_eq!(metric_sum(&spooky.metrics(), "spooky_early_data_requests_total", &[]), 3.0);

    // After the handshake the same POST goes through, and nothing is marked early.
    let mut late = spooky.client_with(Options { session: Some(session), ..opts("localhost") });
    let r = late.request(Request::post("/echo", Body::Bytes(bytes::Bytes::from_static(b"now")))).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "now"));
    assert!(!late.request(Request::get("/headers")).unwrap().text().contains("early-data"));
}
