//! Reloads while requests are in flight: a request keeps the values it started with (the
//! slow-body pace among them), so a reload can never combine an old deadline with a new rate.

use crate::harness::{metric_sum, Backend, Legit, Spooky};
use sha2::{Digest, Sha256};
use spooky::tools::h3client::{Body, Options, Request};
use spooky::tools::pattern;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Waits until `/config` reports the hash of `text`; returns its JSON.
fn wait_for_hash(spooky: &Spooky, text: &str) -> serde_json::Value {
    let want = hex::encode(&Sha256::digest(text.as_bytes())[..8]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = spooky.admin_get("/config");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["hash"] == want.as_str() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "reload to {want} not seen; /config says {body}\n{}",
            spooky.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

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
    let applied = wait_for_hash(&spooky, &text);
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
