//! Resilience: retries only where safe, outlier ejection, active health checks, circuit
//! breaking — all against real backends that fail on purpose.

use crate::harness::{closed_port, metric_sum, Backend, Spooky, PREAMBLE};
use spooky::tools::h3client::{Body, Client, Request};
use std::time::{Duration, Instant};

fn get(c: &mut Client, authority: &str, path: &str) -> spooky::tools::h3client::Response {
    let mut r = Request::get(path);
    r.authority = Some(authority.into());
    c.request(r).unwrap()
}

#[test]
fn connect_failures_are_retried_elsewhere_even_for_requests_with_bodies() {
    let live = Backend::start("live");
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:
  main:
    backends: [{{ address: \"{}\" }}, {{ address: \"{}\" }}]
    outlier: {{ consecutive_failures: 1000 }}
routes: [{{ upstream: main }}]
",
        closed_port(),
        live.addr
    ));
    let mut c = spooky.client();
    for i in 0..10 {
        assert_eq!(c.request(Request::get("/")).unwrap().header("x-backend"), Some("live"));
        let r = c.request(Request::post(&format!("/count/post{i}"), Body::Pattern(10_000))).unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "1\n"), "sent once, to the live backend");
    }
    assert!(metric_sum(&spooky.metrics(), "spooky_upstream_retries_total", &[]) >= 10.0);
}

#[test]
fn failing_statuses_are_retried_only_when_safe_and_bodies_never_sent_twice() {
    let bad = Backend::start_with("bad", "127.0.0.1:0", &["--fail-status", "503"]);
    let good = Backend::start("good");
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:
  main:
    backends: [{{ address: \"{bad}\" }}, {{ address: \"{good}\" }}]
    outlier: {{ consecutive_failures: 1000 }}
  bad: {{ backends: [{{ address: \"{bad}\" }}] }}
  good: {{ backends: [{{ address: \"{good}\" }}] }}
routes:
  - {{ host: bad.test, upstream: bad, retries: {{ attempts: 0 }} }}
  - {{ host: good.test, upstream: good }}
  - {{ upstream: main, retries: {{ attempts: 2, statuses: [503] }} }}
",
        bad = bad.addr,
        good = good.addr
    ));
    let mut c = spooky.client();
    let seen = |c: &mut Client, key: &str| -> (u64, u64) {
        let n = |r: spooky::tools::h3client::Response| r.text().trim().parse::<u64>().unwrap();
        (n(get(c, "bad.test", &format!("/peek/{key}"))), n(get(c, "good.test", &format!("/peek/{key}"))))
    };
    for i in 0..10 {
        let key = format!("get{i}");
        let r = c.request(Request::get(&format!("/count/{key}"))).unwrap();
        assert_eq!(r.status, 200, "an idempotent GET is retried past the 503");
        let (on_bad, on_good) = seen(&mut c, &key);
        assert!(on_bad <= 1 && on_good == 1, "{key}: bad {on_bad}, good {on_good}");
    }
    let mut failed_posts = 0;
    for i in 0..10 {
        let key = format!("post{i}");
        let r = c.request(Request::post(&format!("/count/{key}"), Body::Pattern(5_000))).unwrap();
        let (on_bad, on_good) = seen(&mut c, &key);
        assert_eq!(on_bad + on_good, 1, "{key} reached a backend exactly once");
        if r.status == 503 {
            failed_posts += 1;
            assert_eq!(on_bad, 1);
        }
    }
    assert!(failed_posts > 0, "some POSTs met the bad backend and were not retried");
}

#[test]
fn consecutive_failures_eject_a_backend() {
    let bad = Backend::start_with("bad", "127.0.0.1:0", &["--fail-status", "503"]);
    let good = Backend::start("good");
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:
  main:
    backends: [{{ address: \"{}\" }}, {{ address: \"{}\" }}]
    outlier: {{ consecutive_failures: 3, base_ejection: 60s }}
routes: [{{ upstream: main, retries: {{ attempts: 0 }} }}]
",
        bad.addr, good.addr
    ));
    // One connection: one worker, whose round robin alternates until `bad` is ejected.
    let mut c = spooky.client();
    let statuses: Vec<u16> = (0..40).map(|_| c.request(Request::get("/")).unwrap().status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 3, "{statuses:?}");
    assert!(statuses[10..].iter().all(|s| *s == 200));
    assert_eq!(metric_sum(&spooky.metrics(), "spooky_outlier_ejections_total", &[]), 1.0);
}

#[test]
fn active_health_checks_take_a_dead_backend_out_and_bring_it_back() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let b_addr = b.addr;
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:
  main:
    backends: [{{ address: \"{}\" }}, {{ address: \"{}\" }}]
    health_check: {{ path: /status/200, interval: 200ms, timeout: 150ms, unhealthy_threshold: 2, healthy_threshold: 2 }}
    outlier: {{ consecutive_failures: 1000 }}
routes: [{{ upstream: main, retries: {{ attempts: 0 }} }}]
",
        a.addr, b.addr
    ));
    let healthy =
        |spooky: &Spooky| metric_sum(&spooky.metrics(), "spooky_backend_healthy", &[("backend", &b_addr.to_string())]);
    let wait_for = |want: f64, what: &str| {
        let started = Instant::now();
        while healthy(&spooky) != want {
            assert!(started.elapsed() < Duration::from_secs(15), "{what} never happened");
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{what} after {:?}", started.elapsed());
    };
    wait_for(1.0, "b healthy");
    drop(b);
    wait_for(0.0, "b marked down");
    let mut c = spooky.client();
    for _ in 0..20 {
        let r = c.request(Request::get("/")).unwrap();
        assert_eq!(r.header("x-backend"), Some("a"), "a down backend gets no traffic");
    }
    let _b_again = Backend::start_with("b2", &b_addr.to_string(), &[]);
    wait_for(1.0, "b back up");
    let back = (0..20).filter(|_| c.request(Request::get("/")).unwrap().header("x-backend") == Some("b2")).count();
    assert_eq!(back, 10, "round robin shares again");
}

#[test]
fn the_circuit_breaker_opens_at_the_limit_and_closes_after() {
    let a = Backend::start("a");
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:
  main:
    backends: [{{ address: \"{}\" }}]
    circuit_breaker: {{ max_active: 2 }}
routes: [{{ upstream: main }}]
",
        a.addr
    ));
    // Two workers share the limit: one request in flight per worker.
    let mut c = spooky.client();
    let responses = c.run((0..4).map(|_| Request::get("/?delay_ms=300")).collect()).unwrap();
    let ok = responses.iter().filter(|r| r.status == 200).count();
    let open = responses.iter().filter(|r| r.status == 503 && r.text().contains("circuit breaker open")).count();
    assert_eq!((ok, open), (1, 3));
    assert_eq!(metric_sum(&spooky.metrics(), "spooky_circuit_breaker_rejections_total", &[]), 3.0);
    assert_eq!(c.request(Request::get("/")).unwrap().status, 200, "closed again");
}

#[test]
fn rate_limits_answer_429_with_retry_after_per_key() {
    let a = Backend::start("a");
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:
  main: {{ backends: [{{ address: \"{}\" }}] }}
routes:
  - {{ path_prefix: /api/, upstream: main, rate_limit: {{ rate: 0.2, burst: 4, key: {{ header: x-api-key }} }} }}
  - {{ upstream: main }}
",
        a.addr
    ));
    // Per worker: burst 2, one token every 10 s. One connection lives on one worker.
    let mut c = spooky.client();
    let ask = |c: &mut Client, key: &str| c.request(Request::get("/api/x").header("x-api-key", key)).unwrap();
    let statuses: Vec<u16> = (0..4).map(|_| ask(&mut c, "alice").status).collect();
    assert_eq!(statuses, vec![200, 200, 429, 429]);
    let limited = ask(&mut c, "alice");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=10).contains(&retry_after), "retry-after {retry_after}");
    assert_eq!(ask(&mut c, "bob").status, 200, "another key has its own bucket");
    assert_eq!(c.request(Request::get("/other")).unwrap().status, 200, "other routes are not limited");
    assert_eq!(metric_sum(&spooky.metrics(), "spooky_rate_limited_total", &[]), 3.0);
}

#[test]
fn killing_a_backend_under_load_fails_no_idempotent_request() {
    let a = Backend::start("a");
    let b = Backend::start("b");
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:
  main:
    backends: [{{ address: \"{}\" }}, {{ address: \"{}\" }}]
    health_check: {{ path: /status/200, interval: 200ms, timeout: 150ms, unhealthy_threshold: 2 }}
routes: [{{ upstream: main, retries: {{ attempts: 2, on: [connect_failure, refused_stream, reset] }} }}]
",
        a.addr, b.addr
    ));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..3)
        .map(|_| {
            let mut c = spooky.client();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                // Bounded: at most 400 batches.
                for _ in 0..400 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let batch = (0..8).map(|_| Request::get("/bytes/2000?delay_ms=5")).collect();
                    // A reset or short body counts as a failure too (status 0).
                    let ok = |r: &spooky::tools::h3client::Response| r.reset.is_none() && r.body_len == 2000;
                    statuses.extend(c.run(batch).unwrap().iter().map(|r| if ok(r) { r.status } else { 0 }));
                }
                statuses
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    drop(b); // killed with requests in flight
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses: Vec<u16> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert!(statuses.len() > 100, "load ran: {}", statuses.len());
    let mut kinds = std::collections::BTreeMap::new();
    for s in statuses.iter().filter(|s| **s != 200) {
        *kinds.entry(*s).or_insert(0) += 1;
    }
    assert_eq!(
        failed,
        0,
        "{failed} of {} GETs failed (status: count, 0 = reset or short body): {kinds:?}; log:\n{}",
        statuses.len(),
        spooky.proc.log_text()
    );
}

#[test]
fn a_pool_with_no_available_backend_falls_back_to_its_fallback_pool() {
    let fb = Backend::start("fallback");
    let spooky = Spooky::start(&format!(
        "{PREAMBLE}upstreams:
  primary:
    backends: [{{ address: \"{}\" }}]
    outlier: {{ consecutive_failures: 2, base_ejection: 60s, max_ejected_percent: 100 }}
    fallback: spare
  spare: {{ backends: [{{ address: \"{}\" }}] }}
routes: [{{ upstream: primary }}]
",
        closed_port(),
        fb.addr
    ));
    let mut c = spooky.client();
    for _ in 0..10 {
        // First by retrying past the refused connection, then (ejected) straight to the spare.
        assert_eq!(c.request(Request::get("/")).unwrap().header("x-backend"), Some("fallback"));
    }
    assert_eq!(metric_sum(&spooky.metrics(), "spooky_outlier_ejections_total", &[]), 1.0);
}
