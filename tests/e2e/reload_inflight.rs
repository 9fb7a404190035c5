//! Reloads while requests are in flight: a request keeps the values it started with (the
//! slow-body pace among them), so a reload can never combine an old deadline with a new rate;
//! and the version Spooky reports is the one every worker has acknowledged.

use crate::harness::{metric_sum, Backend, Legit, Spooky, PREAMBLE};
use crate::worker_panic::{client_on, FAULTS};
use spooky::tools::h3client::{Body, Options, Request};
use spooky::tools::pattern;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The crash of issue 11: an upload whose slow-body deadline was armed under
/// `body_min_rate: 1KiB` (the default) read its next chunk under `body_min_rate: 0` after a
/// reload, divided by zero and took the process down.
#[test]
fn turning_the_body_rate_off_mid_upload_keeps_the_upload_and_the_process() {
    const SIZE: u64 = 256 << 20;
    let backend = Backend::start("sink");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let legit = Legit::start(spooky.addr, 2);
    let done = Arc::new(AtomicBool::new(false));
    let mut uploader =
        spooky.client_with(Options { timeout: Duration::from_secs(300), keep_body: 1024, ..Options::default() });
    let finished = done.clone();
    let upload = std::thread::spawn(move || {
        let r = uploader.request(Request::post("/sink", Body::Pattern(SIZE)));
        finished.store(true, Ordering::Relaxed);
        r
    });
    // Mid-upload: the body is arriving and its deadline is armed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_sum(&spooky.metrics(), "spooky_streams_active", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "the upload never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&spooky.config).unwrap() + "timeouts: { body_min_rate: 0 }\n";
    std::fs::write(&spooky.config, &text).unwrap();
    spooky.signal(libc::SIGHUP);
    let applied = spooky.wait_for_config(&text);
    assert_eq!(applied["version"], 2, "{applied}");
    assert!(!done.load(Ordering::Relaxed), "the upload finished before the reload: make it larger");

    let r = upload.join().unwrap().expect("the upload survives the reload");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("{{\"bytes\":{SIZE},\"sha256\":\"{}\"}}", pattern::sha256_hex(SIZE)));
    legit.finish();
    assert_eq!(spooky.client().request(Request::get("/")).unwrap().status, 200, "new clients are served");
    let mut spooky = spooky;
    assert!(spooky.proc.child.try_wait().unwrap().is_none(), "the process is still up");
    assert!(!spooky.proc.log_text().contains("panicked"), "{}", spooky.proc.log_text());
}

/// While worker 0 is blocked (fault injection), it cannot acknowledge a reload: the version
/// reported stays the old one, the new one is pending, and both move once worker 0 catches up.
#[test]
fn config_version_is_the_one_every_worker_acknowledged() {
    let backend = Backend::start("a");
    let text = |weight: u32| {
        format!(
            "{PREAMBLE}upstreams:\n  main: {{ backends: [{{ address: \"{}\", weight: {weight} }}] }}\nroutes: [{{ upstream: main }}]\nadmin: {{ listen: 127.0.0.1:0, token: a-token-of-twenty-chars }}\n",
            backend.addr
        )
    };
    let spooky = Spooky::start_with_env(&text(1), &FAULTS);
    let config = || -> serde_json::Value { serde_json::from_str(&spooky.admin_get("/config").1).unwrap() };
    let v = config();
    assert_eq!((v["version"].as_u64(), v["pending"].is_null()), (Some(1), true), "{v}");
    assert_eq!(v["worker_versions"], serde_json::json!([1, 1]), "{v}");

    let mut stalled = client_on(&spooky, "0", &Options::default());
    let stall = std::thread::spawn(move || stalled.request(Request::get("/.spooky-fault/stall?ms=3000")));
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&spooky.config, text(2)).unwrap();
    spooky.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(2);
    let v = loop {
        let v = config();
        if v["worker_versions"] == serde_json::json!([1, 2]) {
            break v;
        }
        assert!(Instant::now() < deadline, "worker 1 never acknowledged version 2: {v}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!((v["version"].as_u64(), v["pending"]["version"].as_u64()), (Some(1), Some(2)), "{v}");
    let m = spooky.metrics();
    assert_eq!(metric_sum(&m, "spooky_config_version", &[]), 1.0);
    assert_eq!(metric_sum(&m, "spooky_config_version_pending", &[]), 2.0);
    // A reload's outcome (in `/config`, `POST /reload` answers at once) is known once every
    // worker runs the version: after the stall.
    let outcome = spooky.admin_reload("a-token-of-twenty-chars");
    assert_eq!((outcome["state"].as_str(), outcome["version"].as_u64()), (Some("applied"), Some(2)), "{outcome}");
    assert_eq!(stall.join().unwrap().expect("the stalled request is answered").status, 200);
    let v = spooky.wait_for_config(&text(2));
    assert_eq!(v["version"], 2);
    assert_eq!(v["worker_versions"], serde_json::json!([2, 2]), "{v}");
    assert!(v["pending"].is_null(), "{v}");
    let m = spooky.metrics();
    assert_eq!(metric_sum(&m, "spooky_config_version", &[]), 2.0);
    assert_eq!(metric_sum(&m, "spooky_config_version_pending", &[]), 0.0);
}
