//! The access log, request ids and trace context.

use crate::harness::{Backend, Spooky};
use spooky::tools::h3client::{Body, Request};
use std::time::{Duration, Instant};

#[test]
fn every_request_gets_one_json_line_and_a_forwarded_request_id() {
    let backend = Backend::start("b");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], &format!("access_log: {{ target: {} }}", log.display()));
    let mut client = spooky.client();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let echoed = client.request(Request::get("/headers").header("traceparent", traceparent)).unwrap();
    client.request(Request::post("/echo", Body::Pattern(1234))).unwrap();
    client.request(Request::get("/x").header("x-request-id", "client-chosen-id")).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let lines: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 3 {
            break text.lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
        }
        assert!(Instant::now() < deadline, "access log has: {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(lines.len(), 3);
    let [first, second, third] = [&lines[0], &lines[1], &lines[2]];
    assert_eq!(
        (first["method"].as_str(), first["path"].as_str(), first["status"].as_u64()),
        (Some("GET"), Some("/headers"), Some(200))
    );
    assert_eq!(first["upstream"].as_str(), Some(backend.addr.to_string().as_str()));
    assert!(first["upstream_time"].as_f64().unwrap() <= first["total_time"].as_f64().unwrap());
    assert_eq!((second["bytes_in"].as_u64(), second["bytes_out"].as_u64()), (Some(1234), Some(1234)));
    assert_eq!(third["request_id"].as_str(), Some("client-chosen-id"), "a client's id is kept");

    // The generated id is what the backend saw; trace context passes through untouched.
    let id = first["request_id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    let text = echoed.text();
    assert!(text.lines().any(|l| l == format!("x-request-id: {id}")), "{text}");
    assert!(text.lines().any(|l| l == format!("traceparent: {traceparent}")), "{text}");
}

/// Lines of `path` once it has at least `n` (within 10 s).
fn wait_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= n {
            return text.lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect();
        }
        assert!(Instant::now() < deadline, "{} has: {text}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The log file is private to its group, a rotated file is let go on SIGUSR1, and a client's
/// huge path costs the log a bounded line.
#[test]
fn the_log_file_is_0640_reopens_on_sigusr1_and_caps_long_paths() {
    use std::os::unix::fs::PermissionsExt;
    let backend = Backend::start("b");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], &format!("access_log: {{ target: {} }}", log.display()));
    let mut client = spooky.client();
    client.request(Request::get("/before")).unwrap();
    wait_lines(&log, 1);
    assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o640);

    // logrotate: move the file away, then SIGUSR1; new lines go to a new file.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(spooky.proc.pid() as i32, libc::SIGUSR1) }, 0);
    assert!(spooky.proc.logged("access log reopened"), "{}", spooky.proc.log_text());
    let long = format!("/{}", "a".repeat(10_000));
    client.request(Request::get(&long)).unwrap();
    let lines = wait_lines(&log, 1);
    assert_eq!(wait_lines(&rotated, 1).len(), 1, "the rotated file keeps its line only");
    let path = lines[0]["path"].as_str().unwrap();
    assert_eq!(path.len(), 4096, "the path is cut to 4 KiB");
    assert!(path.ends_with("..."));
}

/// A log that cannot keep up (its reader stopped) fills the queue to `access_log.buffer`
/// records, each cut to 4 KiB of path: RSS stays within that, the rest is dropped and counted,
/// and requests are served as usual.
#[test]
fn a_stuck_log_with_huge_paths_holds_a_bounded_queue() {
    const BUFFER: u64 = 8192;
    const REQUESTS: usize = 9000;
    let backend = Backend::start("b");
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) on a path we own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // A reader that opens the pipe and never reads: the writer blocks once the pipe is full.
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || std::fs::File::open(reader_path).unwrap());
    let spooky = Spooky::in_front_of(
        &[(&backend, 1)],
        &format!("access_log: {{ target: {}, buffer: {BUFFER} }}", fifo.display()),
    );
    let _reader = reader.join().unwrap();
    let mut client = spooky.client();
    client.request(Request::get("/warm")).unwrap();
    let (rss_before, _) = spooky.rss();
    let long = format!("/{}", "a".repeat(12_000));
    for i in 0..REQUESTS {
        let r = client.request(Request::get(&long)).unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(r.status, 200);
    }
    let (rss_after, _) = spooky.rss();
    let dropped = crate::harness::metric_sum(&spooky.metrics(), "spooky_access_log_dropped_total", &[]);
    assert!(dropped > 0.0, "the queue filled");
    // Uncut, the queue would hold 8,192 × 12 KB = 94 MiB; cut, about 8,192 × 4.5 KiB = 36 MiB.
    let growth = rss_after.saturating_sub(rss_before) as f64 / (1 << 20) as f64;
    assert!(growth < 64.0, "RSS grew {growth:.1} MiB with the log queue full");
    crate::harness::summary(
        "stuck_access_log",
        &format!("requests={REQUESTS} path=12000B buffer={BUFFER} dropped={dropped} rss_growth={growth:.1}MiB served={REQUESTS}/{REQUESTS}"),
    );
}
