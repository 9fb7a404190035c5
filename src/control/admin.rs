//! The admin listener: a small HTTP/1.1 server on its own thread, off the data path.
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /healthz` | 200 while the process runs |
//! | `GET /readyz` | 200 when every worker serves and Spooky is not draining, else 503 |
//! | `GET /config` | JSON: the version every worker runs, its hash, source, load time; the pending version, if any; each worker's version |
//! | `POST /reload` | reloads the file and answers once every worker runs it; needs `Authorization: Bearer <admin.token>` |
//!
//! Nothing changes state unless a token is configured and presented.

use super::rollout::Rollout;
use super::Event;
use crossbeam_channel::Sender;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

/// What the admin thread shares with the control thread.
pub struct AdminState {
    /// Written by the control thread only.
    pub rollout: Mutex<Rollout>,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    pub metrics: PrometheusHandle,
    pub events: Sender<Event>,
}

impl AdminState {
    pub fn rollout(&self) -> MutexGuard<'_, Rollout> {
        self.rollout.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Binds the admin listener and serves it on a new thread; returns the bound address.
pub fn start(addr: SocketAddr, state: Arc<AdminState>) -> anyhow::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(|e| anyhow::anyhow!("binding admin listener {addr}: {e}"))?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    std::thread::Builder::new().name("spooky-admin".into()).spawn(move || loop {
        // Keep histogram buckets and idle series tidy even when nobody scrapes.
        state.metrics.run_upkeep();
        match server.recv_timeout(Duration::from_secs(5)) {
            Ok(Some(req)) => handle(req, &state),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "admin listener error"),
        }
    })?;
    Ok(bound)
}

fn handle(req: tiny_http::Request, state: &AdminState) {
    use tiny_http::Method;
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let (status, content_type, body) = match (req.method(), path.as_str()) {
        (Method::Get, "/metrics") => (200, "text/plain; version=0.0.4", state.metrics.render()),
        (Method::Get, "/healthz") => (200, "text/plain", "ok\n".to_string()),
        (Method::Get, "/readyz") => {
            if state.ready.load(Ordering::Relaxed) && !state.draining.load(Ordering::Relaxed) {
                (200, "text/plain", "ready\n".to_string())
            } else {
                (503, "text/plain", "not ready\n".to_string())
            }
        }
        (Method::Get, "/config") => (200, "application/json", config_json(&state.rollout())),
        (Method::Post, "/reload") => reload(&req, state),
        (_, "/metrics" | "/healthz" | "/readyz" | "/config" | "/reload") => {
            (405, "text/plain", "method not allowed\n".to_string())
        }
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    let header = tiny_http::Header::from_bytes("content-type", content_type).expect("static header");
    let _ = req.respond(tiny_http::Response::from_string(body).with_status_code(status).with_header(header));
}

fn reload(req: &tiny_http::Request, state: &AdminState) -> (u16, &'static str, String) {
    let token = state.rollout().latest().config.admin.token.clone();
    let Some(token) = token else {
        return (403, "text/plain", "state-changing requests need `admin.token` in the configuration\n".into());
    };
    let presented = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("authorization"))
        .map(|h| h.value.as_str().trim_start_matches("Bearer ").to_string());
    if !presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        return (401, "text/plain", "missing or wrong bearer token\n".into());
    }
    let (tx, rx) = crossbeam_channel::bounded(1);
    if state.events.send(Event::Reload { reason: "admin", reply: Some(tx) }).is_err() {
        return (503, "text/plain", "control thread is gone\n".into());
    }
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(version)) => (200, "text/plain", format!("reloaded: version {version}\n")),
        Ok(Err(why)) => (422, "text/plain", format!("reload rejected: {why}\n")),
        Err(_) => (504, "text/plain", "reload did not finish in time\n".into()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The snapshot every worker runs; `pending`: a newer one not every worker runs yet.
fn config_json(r: &Rollout) -> String {
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
    })
    .to_string()
        + "\n"
}
