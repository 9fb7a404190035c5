//! The HTTP/2 upstream pool: more connections when a backend's stream limit is full, graceful
//! handling of a backend's GOAWAY.

use crate::harness::{metric_sum, Backend, Spooky};
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
