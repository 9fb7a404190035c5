//! Bad configuration is refused before anything starts, with the file, key and problem named,
//! and exit code 2 — for `spooky check` and `spooky run` alike.

use std::process::Command;

const GOOD: &str = "listen: 127.0.0.1:0
workers: 2
tls:
  self_signed: [localhost]
timeouts:
  request: 5s
upstreams:
  demo:
    backends:
      - address: 127.0.0.1:8081
        weight: 2
routes:
  - upstream: demo
";

fn check(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spooky")).arg("check").arg("--config").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.code() != Some(2) || text.contains(path.to_str().unwrap()), "error must name the file: {text}");
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn a_valid_config_passes_check() {
    let (code, text) = check(GOOD);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("is valid"));
}

#[test]
fn each_bad_config_is_refused_with_file_key_and_problem() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "weight: 2",
            "wieght: 2",
            &[":11: `upstreams.demo.backends[0].wieght`: unknown field `wieght`, expected `address` or `weight`"],
        ),
        ("weight: 2", "weight: 0", &["`upstreams.demo.backends[0].weight`", "must be 1..=10000"]),
        ("weight: 2", "weight: -3", &["`upstreams.demo.backends[0].weight`: invalid type: integer `-3`, expected u32"]),
        ("upstream: demo", "upstream: nope", &["`routes[0].upstream`", "unknown upstream `nope` (defined: demo)"]),
        ("listen: 127.0.0.1:0", "listen: localhost", &["`listen`", "`localhost` is not an `IP:PORT` socket address"]),
        ("request: 5s", "request: 5 parsecs", &["`timeouts.request`", "invalid duration `5 parsecs`"]),
        ("request: 5s", "request: 0s", &["`timeouts.request`: must be between 1ms and 1d, got 0s"]),
        ("workers: 2", "workers: many", &["`workers`", "expected `auto` or a number"]),
        (
            "  self_signed: [localhost]",
            "  cert: /nonexistent/cert.pem\n  key: /nonexistent/key.pem",
            &["`tls.cert`", "cannot read `/nonexistent/cert.pem`"],
        ),
        ("  self_signed: [localhost]", "  self_signed: [localhost]\n  cert: a.pem", &["`tls`", "not both"]),
        ("address: 127.0.0.1:8081", "address: 127.0.0.1", &["`upstreams.demo.backends[0].address`", "needs a port"]),
        ("routes:\n  - upstream: demo\n", "", &["missing field `routes`"]),
        ("timeouts:", "quic:\n  max_udp_payload: 100\ntimeouts:", &["`quic.max_udp_payload`", "must be 1200..=65507"]),
        (
            "timeouts:",
            "quic:\n  congestion_control: vegas\ntimeouts:",
            &["`quic.congestion_control`", "unknown algorithm `vegas`"],
        ),
        ("timeouts:", "quic:\n  retry: sometimes\ntimeouts:", &["`quic.retry`", "unknown variant `sometimes`"]),
        ("timeouts:", "quic:\n  cid_rotation: 7\ntimeouts:", &["`quic.cid_rotation`", "must be 0..=6"]),
        (
            "timeouts:",
            "quic:\n  secret_key_file: /nonexistent/quic.key\ntimeouts:",
            &["`quic.secret_key_file`", "cannot read `/nonexistent/quic.key`"],
        ),
        ("timeouts:", "quic:\n  max_connections_per_worker: 0\ntimeouts:", &["`quic.max_connections_per_worker`"]),
        ("upstreams:", "upstreams: [", &["bad.yaml"]),
    ];
    for (from, to, expected) in cases {
        assert!(GOOD.contains(from), "case setup: {from}");
        let (code, text) = check(&GOOD.replacen(from, to, 1));
        assert_eq!(code, 2, "`{to}` should be refused: {text}");
        for e in *expected {
            assert!(text.contains(e), "`{to}`: expected `{e}` in: {text}");
        }
    }
}

/// Every number, duration and size has a legal range (src/config/ranges.rs); a value outside
/// is refused at load (and, by the same code, at reload) with its key, the range and the value.
#[test]
fn each_value_out_of_its_range_is_refused_with_key_and_range() {
    let timeout = |line: &str| ("request: 5s", format!("request: 5s\n  {line}"));
    let quic = |line: &str| ("timeouts:", format!("quic:\n  {line}\ntimeouts:"));
    let h2 = |line: &str| ("timeouts:", format!("upstream_h2:\n  {line}\ntimeouts:"));
    let pool = |line: &str| ("    backends:", format!("    {line}\n    backends:"));
    let route = |line: &str| ("  - upstream: demo", format!("  - upstream: demo\n    {line}"));
    let cases: Vec<((&str, String), &str)> = vec![
        (timeout("connect: 0s"), "`timeouts.connect`: must be between 1ms and 10m, got 0s"),
        (timeout("connect: 11m"), "`timeouts.connect`: must be between 1ms and 10m, got 11m"),
        (("request: 5s", "request: 25h".into()), "`timeouts.request`: must be between 1ms and 1d, got 25h"),
        (timeout("idle: 50ms"), "`timeouts.idle`: must be between 100ms and 1d, got 50ms"),
        (timeout("drain: 2h"), "`timeouts.drain`: must be between 1ms and 1h, got 2h"),
        (timeout("body_grace: 0s"), "`timeouts.body_grace`: must be between 100ms and 1h, got 0s"),
        (
            timeout("body_min_rate: 2GiB"),
            "`timeouts.body_min_rate`: must be 0 (off) or between 1 byte and 1GiB, got 2GiB",
        ),
        (
            h2("stream_window: 4GiB"),
            "`upstream_h2.stream_window`: must be between 65535 bytes and 2147483647 bytes, got 4GiB (RFC 9113 §6.9.1)",
        ),
        (h2("connection_window: 64KiB"), "`upstream_h2.connection_window`: must be between 1MiB and 2147483647 bytes"),
        (
            h2("max_frame_size: 16MiB"),
            "`upstream_h2.max_frame_size`: must be between 16KiB and 16777215 bytes, got 16MiB",
        ),
        (h2("max_connections_per_backend: 0"), "`upstream_h2.max_connections_per_backend`: must be 1..=64, got 0"),
        (h2("keepalive_interval: 10ms"), "`upstream_h2.keepalive_interval`: must be 0 (off) or between 100ms and 1h"),
        (h2("keepalive_timeout: 0s"), "`upstream_h2.keepalive_timeout`: must be between 1ms and 10m, got 0s"),
        (quic("max_stream_data: 100"), "`quic.max_stream_data`: must be between 1KiB and 1GiB, got 100 bytes"),
        (
            quic("max_data: 8GiB"),
            "`quic.max_data`: must be between 1MiB and 4GiB, got 8GiB (at least quic.max_stream_data)",
        ),
        (quic("max_concurrent_streams: 0"), "`quic.max_concurrent_streams`: must be 1..=1048576, got 0"),
        (quic("max_header_list_size: 2MiB"), "`quic.max_header_list_size`: must be between 1KiB and 1MiB, got 2MiB"),
        (quic("retry_token_lifetime: 500ms"), "`quic.retry_token_lifetime`: must be between 1s and 10m, got 500ms"),
        (quic("retry_above_rate: 0"), "`quic.retry_above_rate`: must be 1..=10000000, got 0"),
        (
            quic("max_new_connections_per_sec: 20000000"),
            "`quic.max_new_connections_per_sec`: must be 0 (off) or 1..=10000000",
        ),
        (
            ("  self_signed: [localhost]", "  self_signed: [localhost]\n  ticket_key_rotation: 8d".into()),
            "`tls.ticket_key_rotation`: must be between 1s and 7d, got 8d",
        ),
        (route("request_timeout: 0s"), "`routes[0].request_timeout`: must be between 1ms and 1d, got 0s"),
        (
            route("retries: { per_try_timeout: 48h }"),
            "`routes[0].retries.per_try_timeout`: must be between 1ms and 1d, got 2d",
        ),
        (route("retries: { attempts: 11 }"), "`routes[0].retries.attempts`: must be 0..=10, got 11"),
        (route("retries: { budget_percent: 0 }"), "`routes[0].retries.budget_percent`: must be 1..=100, got 0"),
        (
            route("rate_limit: { rate: 0, burst: 1 }"),
            "`routes[0].rate_limit.rate`: must be between 0.001 and 1000000000 per second, got 0",
        ),
        (route("rate_limit: { rate: 1e-9, burst: 1 }"), "`routes[0].rate_limit.rate`"),
        (route("rate_limit: { rate: 5, burst: 0 }"), "`routes[0].rate_limit.burst`: must be 1..=1000000000, got 0"),
        (
            pool("outlier: { base_ejection: 0s }"),
            "`upstreams.demo.outlier.base_ejection`: must be between 1ms and 1h, got 0s",
        ),
        (
            pool("outlier: { base_ejection: 10s, max_ejection: 5s }"),
            "`upstreams.demo.outlier.max_ejection`: must be between 10s and 1d, got 5s (at least base_ejection)",
        ),
        (
            pool("outlier: { max_ejected_percent: 101 }"),
            "`upstreams.demo.outlier.max_ejected_percent`: must be 0..=100",
        ),
        (
            pool("outlier: { consecutive_failures: 0 }"),
            "`upstreams.demo.outlier.consecutive_failures`: must be 1..=1000000",
        ),
        (
            pool("health_check: { interval: 10ms }"),
            "`upstreams.demo.health_check.interval`: must be between 100ms and 1h",
        ),
        (
            pool("health_check: { interval: 1s, timeout: 2s }"),
            "`upstreams.demo.health_check.timeout`: must be between 1ms and 1s, got 2s",
        ),
        (
            pool("health_check: { healthy_threshold: 0 }"),
            "`upstreams.demo.health_check.healthy_threshold`: must be 1..=1000, got 0",
        ),
        (
            pool("health_check: { expected_statuses: [700] }"),
            "`upstreams.demo.health_check.expected_statuses`: 700 is not an HTTP status",
        ),
        (
            pool("circuit_breaker: { max_active: 0 }"),
            "`upstreams.demo.circuit_breaker.max_active`: must be 1..=4294967295, got 0",
        ),
        (("routes:", "access_log: { buffer: 0 }\nroutes:".into()), "`access_log.buffer`: must be 1..=1048576, got 0"),
    ];
    for ((from, to), expected) in &cases {
        assert!(GOOD.contains(from), "case setup: {from}");
        let (code, text) = check(&GOOD.replacen(from, to, 1));
        assert_eq!(code, 2, "`{to}` should be refused: {text}");
        assert!(text.contains(expected), "`{to}`: expected `{expected}` in: {text}");
    }
}

/// Where 0 is documented as "off", it is accepted.
#[test]
fn zero_turns_off_what_it_is_documented_to_turn_off() {
    let off = "timeouts:\n  body_min_rate: 0\nupstream_h2:\n  keepalive_interval: 0s\nquic:\n  max_new_connections_per_sec: 0\n";
    let (code, text) = check(&GOOD.replacen("timeouts:\n  request: 5s\n", off, 1));
    assert_eq!(code, 0, "{text}");
}

#[test]
fn run_refuses_a_bad_config_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, GOOD.replace("upstream: demo", "upstream: missing")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spooky")).arg("run").arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("`routes[0].upstream`: unknown upstream `missing`"), "{text}");
}

#[test]
fn the_documented_example_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    // As shipped (also by the Debian package): only the certificate is the operator's.
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/spooky.yaml")).unwrap();
    std::fs::write(dir.path().join("spooky.yaml"), example).unwrap();
    std::fs::create_dir(dir.path().join("tls")).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["api.example.com".to_string()]).unwrap();
    std::fs::write(dir.path().join("tls/cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls/key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_spooky"))
        .arg("check")
        .arg("--config")
        .arg(dir.path().join("spooky.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
