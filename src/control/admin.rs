//! The admin listener: a small HTTP/1.1 server on its own thread, off the data path, bounded
//! so that no client of it can hurt the proxy ([`super::http`]: 64 connections, 8 KiB request
//! heads within 5 s, idle connections closed after 30 s).
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when every worker serves and Spooky is not draining, else 503 |
//! | `GET /config` | JSON: the version every worker runs, its hash, source, load time; the pending version, if any; each worker's version; the outcome of the last `POST /reload` |
//! | `POST /reload` | starts a reload and answers 202 at once; its outcome appears in `/config` (`last_reload`); needs exactly `Authorization: Bearer <admin.token>` |
//!
//! Nothing changes state unless a token is configured and presented. While the listener is
//! bound to a loopback address, requests must name it in `Host` (an IP literal or
//! `localhost`): a web page a local browser loads cannot reach it through DNS rebinding.

use super::http::{self, Request, Response};
use super::rollout::Rollout;
use super::Event;
use crossbeam_channel::Sender;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

/// How long a reload may take before its outcome is reported as timed out.
const RELOAD_WAIT: Duration = Duration::from_secs(60);

/// What the admin thread shares with the control thread.
pub struct AdminState {
    /// Written by the control thread only.
    pub rollout: Mutex<Rollout>,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    pub metrics: PrometheusHandle,
    pub events: Sender<Event>,
    /// The outcome of the last `POST /reload`.
    pub last_reload: Mutex<LastReload>,
}

impl AdminState {
    pub fn rollout(&self) -> MutexGuard<'_, Rollout> {
        self.rollout.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn last_reload(&self) -> MutexGuard<'_, LastReload> {
        self.last_reload.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where the last `POST /reload` stands.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LastReload {
    /// `none`, `pending`, `applied` (every worker runs `version`), `rejected` (see `error`)
    /// or `timed_out`.
    pub state: &'static str,
    pub version: Option<u64>,
    pub error: Option<String>,
}

/// Binds the admin listener and serves it on a new thread; returns the bound address.
pub fn start(addr: SocketAddr, state: Arc<AdminState>) -> anyhow::Result<SocketAddr> {
    let upkeep = state.clone();
    let bound = http::serve(addr, http::Limits::default(), move |req| handle(req, &state, addr))
        .map_err(|e| anyhow::anyhow!("binding admin listener {addr}: {e}"))?;
    // Keep histogram buckets and idle series tidy even when nobody scrapes.
    std::thread::Builder::new().name("spooky-metrics".into()).spawn(move || loop {
        upkeep.metrics.run_upkeep();
        std::thread::sleep(Duration::from_secs(5));
    })?;
    Ok(bound)
}

fn handle(req: &Request, state: &Arc<AdminState>, listen: SocketAddr) -> Response {
    if listen.ip().is_loopback() && !names_this_host(req.header("host")) {
        return Response::text(421, "the Host header must name this listener (an IP address or localhost)\n");
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/metrics") => {
            Response { status: 200, content_type: "text/plain; version=0.0.4", body: state.metrics.render() }
        }
        ("GET", "/healthz") => Response::text(200, "ok\n"),
        ("GET", "/readyz") => {
            if state.ready.load(Ordering::Relaxed) && !state.draining.load(Ordering::Relaxed) {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, "not ready\n")
            }
        }
        ("GET", "/config") => Response {
            status: 200,
            content_type: "application/json",
            body: config_json(&state.rollout(), &state.last_reload()),
        },
        ("POST", "/reload") => reload(req, state),
        (_, "/metrics" | "/healthz" | "/readyz" | "/config" | "/reload") => Response::text(405, "method not allowed\n"),
        _ => Response::text(404, "not found\n"),
    }
}

/// Whether `Host` names a loopback listener by IP literal or as `localhost` (any port): what
/// a DNS-rebinding page sends instead is its own name.
fn names_this_host(host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Starts a reload and answers at once (a reload waits for every worker, which an admin
/// request must not): one waiter thread at a time records the outcome for `/config`.
fn reload(req: &Request, state: &Arc<AdminState>) -> Response {
    let token = state.rollout().latest().config.admin.token.clone();
    let Some(token) = token else {
        return Response::text(403, "state-changing requests need `admin.token` in the configuration\n");
    };
    let expected = format!("Bearer {token}");
    if !req.header("authorization").is_some_and(|p| constant_time_eq(p.as_bytes(), expected.as_bytes())) {
        return Response::text(401, "missing or wrong bearer token\n");
    }
    let mut last = state.last_reload();
    if last.state == "pending" {
        return Response::text(202, "a reload is in progress; its outcome will be in /config (last_reload)\n");
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    if state.events.send(Event::Reload { reason: "admin", reply: Some(tx) }).is_err() {
        return Response::text(503, "control thread is gone\n");
    }
    *last = LastReload { state: "pending", version: None, error: None };
    drop(last);
    let waiter = state.clone();
    let spawned = std::thread::Builder::new().name("spooky-reload-wait".into()).spawn(move || {
        *waiter.last_reload() = match rx.recv_timeout(RELOAD_WAIT) {
            Ok(Ok(version)) => LastReload { state: "applied", version: Some(version), error: None },
            Ok(Err(why)) => LastReload { state: "rejected", version: None, error: Some(why) },
            Err(_) => LastReload { state: "timed_out", version: None, error: None },
        };
    });
    match spawned {
        Ok(_) => Response::text(202, "reload started; its outcome will be in /config (last_reload)\n"),
        Err(e) => {
            *state.last_reload() = LastReload { state: "rejected", version: None, error: Some(e.to_string()) };
            Response::text(503, format!("cannot wait for the reload: {e}\n"))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The snapshot every worker runs; `pending`: a newer one not every worker runs yet.
fn config_json(r: &Rollout, last_reload: &LastReload) -> String {
    let s = r.applied();
    let loaded = s.loaded_at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    serde_json::json!({
        "version": s.version,
        "hash": s.hash,
        "source": s.source.describe(),
        "loaded_at": loaded,
        "workers": s.config.workers.resolve(),
        "listen": s.config.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "pending": r.pending().map(|p| serde_json::json!({ "version": p.version, "hash": p.hash })),
        "worker_versions": r.worker_versions(),
        "last_reload": last_reload,
    })
    .to_string()
        + "\n"
}
