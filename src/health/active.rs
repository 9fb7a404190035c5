//! Active health checks: one checker thread per Spooky process (not per worker) probes every
//! backend that has a `health_check`, with an HTTP/2 GET of its path on a fresh connection
//! each interval. `unhealthy_threshold` failures in a row mark a backend down,
//! `healthy_threshold` successes bring it back; backends start healthy. Every change is
//! published as a new [`HealthView`] (and the `spooky_backend_healthy` gauge).
//!
//! The thread runs its own monoio runtime; it picks up new targets after a reload within a
//! quarter second (it checks its update channel on that period — this is the control plane,
//! not the data path).

use super::HealthView;
use crate::config::{Config, HealthCheck, UpstreamTls};
use crate::transport::pool::{self, Settings};
use crate::transport::tls::TlsUpstream;
use crossbeam_channel::{Receiver, Sender};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

/// One backend to probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub addr: SocketAddr,
    pub check: HealthCheck,
    pub tls: Option<UpstreamTls>,
}

/// The backends of `config` that have health checks (the first pool naming an address wins).
pub fn targets(config: &Config) -> Vec<Target> {
    let mut out: Vec<Target> = Vec::new();
    for pool in config.upstreams.values() {
        let Some(check) = &pool.health_check else { continue };
        for b in &pool.backends {
            if !out.iter().any(|t| t.addr == b.addr) {
                out.push(Target { addr: b.addr, check: check.clone(), tls: pool.tls.clone() });
            }
        }
    }
    out
}

/// Handle to the checker thread.
pub struct Checker {
    updates: Sender<(Vec<Target>, Settings)>,
}

impl Checker {
    /// Replaces the probed set (after a reload). State of addresses that stay is kept.
    pub fn update(&self, targets: Vec<Target>, settings: Settings) {
        let _ = self.updates.send((targets, settings));
    }
}

/// Starts the checker; `publish` is called with every new view.
pub fn start(
    targets: Vec<Target>,
    settings: Settings,
    publish: impl Fn(HealthView) + Send + 'static,
) -> anyhow::Result<Checker> {
    let (tx, rx) = crossbeam_channel::unbounded();
    tx.send((targets, settings)).expect("receiver alive");
    std::thread::Builder::new().name("spooky-health".into()).spawn(move || {
        let mut rt = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build() {
            Ok(rt) => rt,
            Err(e) => return tracing::error!(error = %e, "health checker runtime failed; active checks are off"),
        };
        rt.block_on(run(rx, Box::new(publish)));
    })?;
    Ok(Checker { updates: tx })
}

#[derive(Clone, Copy)]
struct State {
    healthy: bool,
    successes: u32,
    failures: u32,
}

struct Shared {
    states: RefCell<HashMap<SocketAddr, State>>,
    published: RefCell<HealthView>,
    publish: Box<dyn Fn(HealthView)>,
}

impl Shared {
    fn record(&self, target: &Target, ok: bool) {
        let changed = {
            let mut states = self.states.borrow_mut();
            let Some(s) = states.get_mut(&target.addr) else { return };
            if ok {
                s.failures = 0;
                s.successes += 1;
            } else {
                s.successes = 0;
                s.failures += 1;
            }
            let flip = if s.healthy {
                s.failures >= target.check.unhealthy_threshold
            } else {
                s.successes >= target.check.healthy_threshold
            };
            if flip {
                s.healthy = !s.healthy;
                tracing::warn!(backend = %target.addr, healthy = s.healthy, "health check verdict changed");
                metrics::gauge!("spooky_backend_healthy", "backend" => target.addr.to_string()).set(if s.healthy {
                    1.0
                } else {
                    0.0
                });
            }
            flip
        };
        if changed {
            self.publish_view();
        }
    }

    fn publish_view(&self) {
        let view =
            HealthView { down: self.states.borrow().iter().filter(|(_, s)| !s.healthy).map(|(a, _)| *a).collect() };
        if *self.published.borrow() != view {
            *self.published.borrow_mut() = view.clone();
            (self.publish)(view);
        }
    }
}

async fn run(updates: Receiver<(Vec<Target>, Settings)>, publish: Box<dyn Fn(HealthView)>) {
    let shared = Rc::new(Shared { states: RefCell::new(HashMap::new()), published: Default::default(), publish });
    let generation = Rc::new(Cell::new(0u64));
    loop {
        if let Some((targets, settings)) = updates.try_iter().last() {
            generation.set(generation.get() + 1);
            {
                let mut states = shared.states.borrow_mut();
                states.retain(|addr, _| targets.iter().any(|t| t.addr == *addr));
                for t in &targets {
                    states.entry(t.addr).or_insert_with(|| {
                        metrics::gauge!("spooky_backend_healthy", "backend" => t.addr.to_string()).set(1.0);
                        State { healthy: true, successes: 0, failures: 0 }
                    });
                }
            }
            shared.publish_view();
            for t in targets {
                monoio::spawn(probe_loop(t, settings, shared.clone(), generation.clone(), generation.get()));
            }
        }
        monoio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Probes `target` every interval until the target set changes.
async fn probe_loop(target: Target, settings: Settings, shared: Rc<Shared>, generation: Rc<Cell<u64>>, mine: u64) {
    while generation.get() == mine {
        let ok = matches!(
            monoio::time::timeout(target.check.timeout.0, probe(&target, settings)).await,
            Ok(Some(status)) if target.check.is_expected(status)
        );
        if generation.get() != mine {
            return;
        }
        metrics::counter!("spooky_health_checks_total", "result" => if ok { "ok" } else { "failed" }).increment(1);
        shared.record(&target, ok);
        monoio::time::sleep(target.check.interval.0).await;
    }
}

/// One probe: the response status, or `None` when the backend could not answer.
async fn probe(target: &Target, settings: Settings) -> Option<u16> {
    let tls = match &target.tls {
        Some(t) => Some(Rc::new(TlsUpstream::new(t).ok()?)),
        None => None,
    };
    let conn = pool::connect(target.addr, settings, tls).await.ok()?;
    let mut sender = conn.sender.clone().ready().await.ok()?;
    let scheme = if target.tls.is_some() { "https" } else { "http" };
    let uri = format!("{scheme}://{}{}", target.addr, target.check.path);
    let req = http::Request::get(uri).header("user-agent", "spooky-health-check").body(()).ok()?;
    let (response, _) = sender.send_request(req, true).ok()?;
    // Dropping the response and the connection's handles closes the probe's connection.
    Some(response.await.ok()?.status().as_u16())
}
