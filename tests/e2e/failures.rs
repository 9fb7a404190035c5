//! Backend failures: 502 when unreachable, 504 when slow, stream reset (never a truncated
//! success) when the backend breaks mid-response, and recovery when a backend comes back.

use crate::harness::{closed_port, Backend, Spooky, PREAMBLE};
use spooky::tools::h3client::{Body, Request};
use spooky::tools::pattern;

const H3_INTERNAL_ERROR: u64 = 0x102;

#[test]
fn unreachable_backend_gives_502() {
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:\n  dead: {{ backends: [{{ address: \"{}\" }}] }}\nroutes: [{{ upstream: dead }}]\n",
        closed_port()
    ));
    let mut client = spooky.client();
    let r = client.request(Request::get("/")).unwrap();
    assert_eq!(r.status, 502);
    // The page names the failure, not the backend or its error (those go to the log).
    assert_eq!(r.text(), "502 Bad Gateway: the upstream server failed to answer\n");
    assert!(spooky.proc.logged("connection refused"), "the cause is logged:\n{}", spooky.proc.log_text());
    // A request with a body gets the same answer, and the connection stays usable.
    let r = client.request(Request::post("/echo", Body::Pattern(500_000))).unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(client.request(Request::get("/")).unwrap().status, 502);
}

#[test]
fn slow_backend_gives_504_after_the_request_timeout() {
    let backend = Backend::start("slow");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "timeouts: { request: 300ms }");
    let mut client = spooky.client();
    let r = client.request(Request::get("/?delay_ms=3000")).unwrap();
    assert_eq!(r.status, 504);
    // Fast enough requests on the same connection are unaffected.
    assert_eq!(client.request(Request::get("/?delay_ms=10")).unwrap().status, 200);
}

#[test]
fn upstream_status_codes_pass_through() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let mut client = spooky.client();
    for code in [201, 204, 304, 404, 418, 500, 503] {
        let r = client.request(Request::get(&format!("/status/{code}"))).unwrap();
        assert_eq!(r.status, code);
        assert_eq!(r.header("x-backend"), Some("b"), "the backend's own {code}, not Spooky's");
    }
}

#[test]
fn reset_mid_response_resets_only_that_stream() {
    let backend = Backend::start("b");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let mut client = spooky.client();
    let responses = client
        .run(vec![
            Request::get("/reset-after/200000"),
            Request::get("/bytes/3000000"),
            Request::post("/echo", Body::Pattern(2_000_000)),
        ])
        .unwrap();
    assert_eq!(responses[0].reset, Some(H3_INTERNAL_ERROR), "a truncated body must not look complete");
    assert!(responses[0].sha256.is_empty(), "the reset stream never finished");
    assert_eq!(responses[1].sha256, pattern::sha256_hex(3_000_000));
    assert_eq!(responses[2].sha256, pattern::sha256_hex(2_000_000));
    assert_eq!(client.request(Request::get("/")).unwrap().status, 200);
}

#[test]
fn a_restarted_backend_is_reconnected() {
    let backend = Backend::start("first");
    let addr = backend.addr;
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let mut client = spooky.client();
    assert_eq!(client.request(Request::get("/")).unwrap().header("x-backend"), Some("first"));
    drop(backend);
    let r = client.request(Request::get("/")).unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    // Same address, new process: the pool replaces its closed connection.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_spooky-backend"));
    cmd.args(["-l", &addr.to_string(), "-n", "second"]);
    let mut second = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let mut status = 0;
    for _ in 0..50 {
        let r = client.request(Request::get("/")).unwrap();
        status = r.status;
        if r.header("x-backend") == Some("second") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(status, 200);
}
