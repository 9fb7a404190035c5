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
        ("request: 5s", "request: 0s", &["`timeouts.request`", "must be greater than zero"]),
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
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/spooky.yaml")).unwrap();
    // Its backends are names of a real deployment; point them somewhere resolvable here.
    let example = example.replace("static.internal:8080", "localhost:8080");
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
