//! A worker that panics is logged (with its backtrace), counted, and restarted on its own
//! socket; the other worker and its connections never notice. The panic is triggered through
//! the fault-injection hook (`SPOOKY_FAULT_INJECTION=1`, `src/control/fault.rs`).

use crate::harness::{metric_sum, Backend, Spooky};
use spooky::tools::h3client::{Client, Options, Request};
use spooky::tools::pattern;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const FAULTS: [(&str, &str); 1] = [("SPOOKY_FAULT_INJECTION", "1")];

/// A client whose connection lives on `worker`, found by opening connections until one is
/// accepted there.
pub fn client_on(spooky: &Spooky, worker: &str, opts: &Options) -> Client {
    for _ in 0..64 {
        let accepted = || metric_sum(&spooky.metrics(), "spooky_connections_accepted_total", &[("worker", worker)]);
        let before = accepted();
        let mut client = spooky.client_with(opts.clone());
        assert_eq!(client.request(Request::get("/")).expect("request").status, 200);
        if accepted() > before {
            return client;
        }
        client.close();
    }
    panic!("no connection landed on worker {worker} in 64 tries");
}

/// Spooky with two workers in front of `backend`, fault injection on.
fn start_with_faults(backend: &Backend) -> Spooky {
    let yaml = format!(
        "listen: 127.0.0.1:0\nworkers: 2\ntls: {{ self_signed: [localhost] }}\nupstreams:\n  main: {{ backends: [{{ address: \"{}\" }}] }}\nroutes: [{{ upstream: main }}]\n",
        backend.addr
    );
    Spooky::start_with_env(&yaml, &FAULTS)
}

#[test]
fn a_panicking_worker_restarts_on_its_socket_and_the_other_worker_carries_on() {
    let backend = Backend::start("a");
    let spooky = start_with_faults(&backend);
    let sockets = spooky.udp_socket_inodes();
    let long = Options { timeout: Duration::from_secs(60), keep_body: 1024, ..Options::default() };
    let mut victim = client_on(&spooky, "0", &Options { timeout: Duration::from_secs(3), ..Options::default() });
    let mut survivor = client_on(&spooky, "1", &long);

    // Worker 1's client keeps a download in flight and requests going the whole time.
    const BIG: u64 = 64 << 20;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let (flag, count) = (stop.clone(), served.clone());
    let steady = std::thread::spawn(move || -> Result<(), String> {
        let mut round = 0;
        while round < 3 || !flag.load(Ordering::Relaxed) {
            round += 1;
            let size = if round == 1 { BIG } else { 100_000 };
            let rs = survivor
                .run(vec![Request::get(&format!("/bytes/{size}")), Request::get("/")])
                .map_err(|e| format!("round {round}: {e}"))?;
            if rs[0].status != 200 || rs[0].body_len != size || rs[0].sha256 != pattern::sha256_hex(size) {
                return Err(format!("round {round}: {:?}", rs[0]));
            }
            if rs[1].status != 200 {
                return Err(format!("round {round}: status {}", rs[1].status));
            }
            count.fetch_add(2, Ordering::Relaxed);
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(300));

    // Worker 0 panics on this request: its connection is gone with it.
    let lost = victim.request(Request::get("/.spooky-fault/panic"));
    assert!(lost.is_err() || lost.as_ref().is_ok_and(|r| r.reset.is_some()), "{lost:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_sum(&spooky.metrics(), "spooky_worker_panics_total", &[("worker", "0")]) < 1.0 {
        assert!(Instant::now() < deadline, "the panic was not counted:\n{}", spooky.proc.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }

    // New connections are served by both workers, the restarted one included.
    let mut fresh = client_on(&spooky, "0", &long);
    assert_eq!(fresh.request(Request::get("/bytes/1000")).unwrap().body_len, 1000);
    let mut other = client_on(&spooky, "1", &long);
    assert_eq!(other.request(Request::get("/")).unwrap().status, 200);

    stop.store(true, Ordering::Relaxed);
    steady.join().unwrap().expect("worker 1's client is served without interruption");
    assert!(served.load(Ordering::Relaxed) >= 6);

    let m = spooky.metrics();
    assert_eq!(metric_sum(&m, "spooky_worker_panics_total", &[("worker", "0")]), 1.0);
    assert_eq!(metric_sum(&m, "spooky_worker_panics_total", &[("worker", "1")]), 0.0);
    assert_eq!(spooky.udp_socket_inodes(), sockets, "the panicked worker's socket survived");
    // The lost connections left the gauges: worker 0 holds only `fresh` (closed probes may
    // take their draining period to go).
    let active =
        spooky.wait_metric("spooky_connections_active", &[("worker", "0")], Duration::from_secs(5), |v| v == 1.0);
    assert_eq!(active, 1.0);
    assert_eq!(metric_sum(&m, "spooky_streams_active", &[("worker", "0")]), 0.0);
    let (_, config) = spooky.admin_get("/config");
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["worker_versions"], serde_json::json!([1, 1]), "the restarted worker acknowledged: {config}");
    let log = spooky.proc.log_text();
    assert!(log.contains("fault injection: /.spooky-fault/panic requested"), "{log}");
    assert!(log.contains("backtrace:") && log.contains("spooky::control::fault::on_request"), "{log}");
    assert!(log.contains("worker panicked: restarting it on its sockets"), "{log}");
    let mut spooky = spooky;
    assert!(spooky.proc.child.try_wait().unwrap().is_none(), "the process is still up");
}

/// A panic in a task on the worker's runtime (where upstream tasks run) leaves the runtime
/// instead of the worker's loop: the worker restarts all the same, and nothing aborts.
#[test]
fn a_panic_in_a_task_of_the_worker_restarts_it_too() {
    let backend = Backend::start("a");
    let spooky = start_with_faults(&backend);
    let short = Options { timeout: Duration::from_secs(3), ..Options::default() };
    let mut victim = client_on(&spooky, "1", &short);
    let mut survivor = client_on(&spooky, "0", &Options::default());
    let _ = victim.request(Request::get("/.spooky-fault/panic-task"));
    let panics =
        spooky.wait_metric("spooky_worker_panics_total", &[("worker", "1")], Duration::from_secs(10), |v| v >= 1.0);
    assert_eq!(panics, 1.0, "{}", spooky.proc.log_text());
    assert_eq!(survivor.request(Request::get("/bytes/5000")).unwrap().body_len, 5000);
    let mut fresh = client_on(&spooky, "1", &Options::default());
    assert_eq!(fresh.request(Request::get("/")).unwrap().status, 200);
    let mut spooky = spooky;
    assert!(spooky.proc.child.try_wait().unwrap().is_none(), "the process is still up");
    assert!(spooky.proc.log_text().contains("fault injection: /.spooky-fault/panic-task requested"));
}

#[test]
fn without_the_environment_variable_the_fault_paths_are_ordinary_paths() {
    let backend = Backend::start("a");
    let spooky = Spooky::in_front_of(&[(&backend, 1)], "");
    let r = spooky.client().request(Request::get("/.spooky-fault/panic")).unwrap();
    assert_eq!((r.status, r.header("x-backend")), (200, Some("a")), "forwarded like any request");
    assert_eq!(metric_sum(&spooky.metrics(), "spooky_worker_panics_total", &[]), 0.0);
}
