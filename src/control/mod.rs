//! The control plane: start-up, configuration reload, graceful drain, admin listener.
//!
//! - [`snapshot`]: an immutable, validated configuration (+ TLS material) with version and hash.
//! - [`rollout`]: which snapshot every worker has acknowledged (the version Spooky reports).
//! - [`supervise`]: worker threads, and the policy when one panics (restart it on its sockets).
//! - [`watch`]: signals (SIGHUP reload, SIGTERM/SIGINT drain) and config-file changes (inotify).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/config`, `POST /reload` (with a token).
//! - [`fault`]: test-only fault injection, honoured only when enabled by environment at start.
//!
//! Start-up order matters: TLS material is loaded once, then every worker's sockets are bound
//! here, in worker order, so the kernel's reuseport group index equals the worker id; only then
//! are worker threads started, each pinned to its core. Afterwards the control thread (this
//! one) owns the configuration: a reload validates the whole file and, only if all of it is
//! good and nothing needs new sockets, sends the new [`snapshot::Snapshot`] to every worker
//! over its channel; each worker acknowledges the version once it swapped it in. Sockets are
//! never closed or rebound while Spooky runs, also not when a worker panics and restarts.

pub mod admin;
pub mod fault;
pub mod http;
pub mod mailbox;
pub mod rollout;
pub mod snapshot;
pub mod supervise;
mod watch;

use crate::edge::keys::EdgeKeys;
use crate::edge::socket::{bind_reuseport, buffer_shortfall};
use crate::edge::steering;
use crate::health::{active, HealthView};
use crate::telemetry::{access_log, metrics as telemetry_metrics};
use crate::transport::pool::Settings as H2Settings;
use anyhow::Context as _;
use crossbeam_channel::Sender;
use rollout::Rollout;
use snapshot::{Snapshot, Source};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;
use supervise::{Latest, SharedLatest, WorkerSeed};

/// What the control thread reacts to.
pub enum Event {
    /// Reload the configuration file; `reply` gets the new version once every worker runs it,
    /// or why it was refused.
    Reload { reason: &'static str, reply: Option<Sender<Result<u64, String>>> },
    /// SIGTERM/SIGINT: drain; a second one exits at once.
    Shutdown,
    /// A worker swapped in snapshot `version` (or could not: `error`, and it keeps its old one).
    Applied { worker: usize, version: u64, error: Option<String> },
    /// A worker thread ended for good (after draining, or by failing).
    WorkerExited { id: usize, error: Option<String> },
    /// Active health checking changed its verdicts.
    Health(HealthView),
}

/// What the control thread tells a worker.
pub enum ToWorker {
    /// Use this snapshot for everything new.
    Apply(Arc<Snapshot>),
    /// Stop accepting, send GOAWAY, finish in-flight requests, close by `deadline`.
    Drain { deadline: Instant },
    /// New verdicts of active health checking.
    Health(Arc<HealthView>),
}

/// A worker's inbox from the control thread.
pub type AttachedInbox = mailbox::AttachedMailbox<ToWorker>;

/// A worker's two-way link with the control thread: orders in, acknowledgements out.
pub struct ControlLink {
    pub inbox: AttachedInbox,
    /// Where the worker acknowledges the snapshots it swapped in ([`Event::Applied`]).
    pub acks: Sender<Event>,
}

/// Runs Spooky on `first` until a drain completes (or a worker fails for good).
pub fn run(first: Snapshot) -> anyhow::Result<()> {
    supervise::install_panic_hook();
    if fault::init_from_env() {
        tracing::warn!("fault injection is on ({}=1): for tests only", fault::ENV);
    }
    let metrics = telemetry_metrics::install()?;
    let first = Arc::new(first);
    let config = first.config.clone();
    let workers = config.workers.resolve();
    let sockets = bind_all(&config.listen, workers)?;
    if config.quic.reuseport_bpf {
        for (addr, socket) in config.listen.iter().zip(&sockets[0]) {
            match steering::attach(socket, workers) {
                Ok(()) => tracing::debug!(%addr, "reuseport BPF steering attached"),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot attach the reuseport BPF program; workers forward strays")
                }
            }
        }
    }
    let keys = Arc::new(EdgeKeys::load(&config).context("loading the QUIC secret")?);
    if let (snapshot::Source::File(path), Some(_)) = (&first.source, &config.admin.token) {
        crate::edge::keys::warn_if_others_can_read("admin.token", path);
    }
    let mut stray_boxes = Vec::with_capacity(workers);
    let mut peers = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (postbox, mailbox) = steering::stray_mailbox()?;
        peers.push(postbox);
        stray_boxes.push(mailbox);
    }
    let listen: Vec<SocketAddr> = sockets[0].iter().map(|s| s.local_addr()).collect::<Result<_, _>>()?;
    let logger = access_log::start(&config.access_log);
    let (events_tx, events_rx) = crossbeam_channel::unbounded::<Event>();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let latest: SharedLatest =
        Arc::new(Mutex::new(Latest { snapshot: first.clone(), health: Arc::default(), draining: false }));
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<anyhow::Result<()>>(workers);
    let mut links = Vec::with_capacity(workers);
    let mut threads = Vec::with_capacity(workers);
    for ((id, socks), strays) in sockets.into_iter().enumerate().zip(stray_boxes) {
        let (link, inbox) = mailbox::mailbox(None)?;
        links.push(link);
        let seed = WorkerSeed {
            id,
            sockets: socks,
            inbox,
            peers: peers.iter().map(steering::StrayPeer::try_clone).collect::<Result<Vec<_>, _>>()?,
            strays,
            keys: keys.clone(),
            logger: logger.clone(),
            events: events_tx.clone(),
            latest: latest.clone(),
            core: (config.pin_workers && !cores.is_empty()).then(|| cores[id % cores.len()]),
        };
        threads.push(supervise::spawn(seed, ready_tx.clone())?);
    }
    drop(ready_tx);
    for _ in 0..workers {
        ready_rx.recv().context("a worker exited during start-up")??;
    }
    let admin_state = Arc::new(admin::AdminState {
        rollout: Mutex::new(Rollout::new(first.clone(), workers)),
        ready: false.into(),
        draining: false.into(),
        metrics,
        events: events_tx.clone(),
        last_reload: Mutex::new(admin::LastReload { state: "none", version: None, error: None }),
    });
    let admin_addr = match config.admin.listen {
        Some(addr) => Some(admin::start(addr, admin_state.clone())?),
        None => None,
    };
    watch::signals(events_tx.clone())?;
    if let Source::File(path) = &first.source {
        if let Err(e) = watch::config_file(path, events_tx.clone()) {
            tracing::warn!(error = %e, "cannot watch the configuration file; SIGHUP still reloads");
        }
    }
    let health_events = events_tx.clone();
    let checker = active::start(active::targets(&config), H2Settings::from_config(&config), move |view| {
        let _ = health_events.send(Event::Health(view));
    })?;
    admin_state.ready.store(true, Ordering::Relaxed);
    let addrs: Vec<String> = listen.iter().map(ToString::to_string).collect();
    let admin_text = admin_addr.map_or("off".to_string(), |a| a.to_string());
    tracing::info!(workers, listen = %addrs.join(","), admin = %admin_text, version = first.version,
        hash = %first.hash, "spooky ready");

    let mut control = Control { links, admin: admin_state, latest, waiting: Vec::new(), draining: false, checker };
    control.publish_version();
    let mut running = workers;
    while running > 0 {
        match events_rx.recv().expect("the control thread holds a sender") {
            Event::Reload { reason, reply } => control.reload(reason, reply),
            Event::Shutdown if control.draining => {
                tracing::warn!("second signal: exiting without waiting for in-flight requests");
                std::process::exit(1);
            }
            Event::Shutdown => control.drain(),
            Event::Applied { worker, version, error } => control.applied(worker, version, error),
            Event::Health(view) => {
                let view = Arc::new(view);
                control.latest().health = view.clone();
                for link in &control.links {
                    let _ = link.send(ToWorker::Health(view.clone()));
                }
            }
            Event::WorkerExited { id, error } => {
                running -= 1;
                if let Some(e) = error {
                    anyhow::bail!("worker {id} failed: {e}");
                }
                if !control.draining {
                    anyhow::bail!("worker {id} stopped unexpectedly");
                }
            }
        }
    }
    for t in threads {
        let _ = t.join();
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// The control thread's state after start-up.
struct Control {
    links: Vec<mailbox::Postbox<ToWorker>>,
    admin: Arc<admin::AdminState>,
    /// What a restarted worker starts from.
    latest: SharedLatest,
    /// `POST /reload` callers waiting for every worker to run their version.
    waiting: Vec<(u64, Sender<Result<u64, String>>)>,
    draining: bool,
    checker: active::Checker,
}

impl Control {
    /// Loads, validates and broadcasts the configuration file; on any problem the running
    /// configuration stays, untouched. `reply` hears once every worker runs the new version.
    fn reload(&mut self, reason: &str, reply: Option<Sender<Result<u64, String>>>) {
        let answer = |result: Result<u64, String>| {
            if let Some(reply) = &reply {
                let _ = reply.send(result);
            }
        };
        let current = self.admin.rollout().latest().clone();
        if matches!(current.source, Source::Embedded) {
            return answer(Err("running on the embedded default configuration: there is no file to reload".into()));
        }
        let next = match Snapshot::load(&current.source, current.version + 1) {
            Ok(s) => s,
            Err(why) => {
                ::metrics::counter!("spooky_reloads_total", "result" => "invalid").increment(1);
                tracing::error!(reason, %why, "reload rejected; the running configuration stays");
                return answer(Err(why));
            }
        };
        if next.fingerprint == current.fingerprint {
            tracing::debug!(reason, "configuration unchanged");
            return self.answer_when_applied(current.version, reply);
        }
        if let Some(why) = current.restart_needed(&next) {
            ::metrics::counter!("spooky_reloads_total", "result" => "restart_required").increment(1);
            tracing::warn!(reason, %why, "reload not applied: this change needs a restart");
            return answer(Err(format!("{why}; nothing was applied")));
        }
        let next = Arc::new(next);
        self.admin.rollout().sent(next.clone());
        self.latest().snapshot = next.clone();
        for link in &self.links {
            let _ = link.send(ToWorker::Apply(next.clone()));
        }
        self.checker.update(active::targets(&next.config), H2Settings::from_config(&next.config));
        ::metrics::counter!("spooky_reloads_total", "result" => "ok").increment(1);
        tracing::info!(reason, version = next.version, hash = %next.hash, "configuration sent to every worker");
        self.publish_version();
        self.answer_when_applied(next.version, reply);
    }

    /// Tells `reply` (if any) once every worker runs `version`: now, or when they acknowledge.
    fn answer_when_applied(&mut self, version: u64, reply: Option<Sender<Result<u64, String>>>) {
        let Some(reply) = reply else { return };
        let applied = self.admin.rollout().applied().version;
        if applied >= version {
            let _ = reply.send(Ok(applied));
        } else {
            self.waiting.push((version, reply));
        }
    }

    /// A worker's acknowledgement of a snapshot.
    fn applied(&mut self, worker: usize, version: u64, error: Option<String>) {
        if let Some(e) = error {
            ::metrics::counter!("spooky_reloads_total", "result" => "worker_failed").increment(1);
            tracing::error!(worker, version, error = %e, "a worker could not apply a configuration; it keeps its previous one");
            self.answer_waiting(|v| v == version, Err(format!("worker {worker} could not apply it: {e}")));
            return;
        }
        if !self.admin.rollout().acknowledged(worker, version) {
            return;
        }
        let applied = self.admin.rollout().applied().version;
        tracing::info!(version = applied, "configuration in force on every worker");
        self.answer_waiting(|v| v <= applied, Ok(applied));
        self.publish_version();
    }

    /// Answers the `POST /reload` callers waiting for a version that `settled` says is decided.
    fn answer_waiting(&mut self, settled: impl Fn(u64) -> bool, result: Result<u64, String>) {
        let (done, waiting): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|(v, _)| settled(*v));
        self.waiting = waiting;
        for (_, reply) in done {
            let _ = reply.send(result.clone());
        }
    }

    /// `spooky_config_version`: the version every worker acknowledged;
    /// `spooky_config_version_pending`: a newer one not every worker has yet (0: none).
    fn publish_version(&self) {
        let rollout = self.admin.rollout();
        ::metrics::gauge!("spooky_config_version").set(rollout.applied().version as f64);
        ::metrics::gauge!("spooky_config_version_pending").set(rollout.pending().map_or(0.0, |s| s.version as f64));
    }

    fn latest(&self) -> MutexGuard<'_, Latest> {
        self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn drain(&mut self) {
        self.draining = true;
        self.latest().draining = true;
        self.admin.draining.store(true, Ordering::Relaxed);
        let timeout = self.admin.rollout().latest().config.timeouts.drain.0;
        tracing::info!(?timeout, "draining: no new connections, GOAWAY sent, waiting for in-flight requests");
        let deadline = Instant::now() + timeout;
        for link in &self.links {
            let _ = link.send(ToWorker::Drain { deadline });
        }
    }
}

/// Binds one socket per listen address for every worker. Port 0 is resolved by the first bind
/// so all workers share the same port.
fn bind_all(listen: &[SocketAddr], workers: usize) -> anyhow::Result<Vec<Vec<UdpSocket>>> {
    let mut resolved = listen.to_vec();
    let mut all = Vec::with_capacity(workers);
    for _ in 0..workers {
        let mut mine = Vec::with_capacity(resolved.len());
        for addr in resolved.iter_mut() {
            let sock = bind_reuseport(*addr).with_context(|| format!("binding UDP {addr}"))?;
            *addr = sock.local_addr()?;
            mine.push(sock);
        }
        all.push(mine);
    }
    // Every socket got the same treatment: one line for all of them.
    if let Some(why) = all.first().and_then(|socks| socks.first()).and_then(buffer_shortfall) {
        tracing::warn!("{why}");
    }
    Ok(all)
}
