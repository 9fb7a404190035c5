//! The control plane: start-up, configuration reload, graceful drain, admin listener.
//!
//! - [`snapshot`]: an immutable, validated configuration (+ TLS material) with version and hash.
//! - [`watch`]: signals (SIGHUP reload, SIGTERM/SIGINT drain) and config-file changes (inotify).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/config`, `POST /reload` (with a token).
//!
//! Start-up order matters: TLS material is loaded once, then every worker's sockets are bound
//! here, in worker order, so the kernel's reuseport group index equals the worker id; only then
//! are worker threads started, each pinned to its core. Afterwards the control thread (this
//! one) owns the configuration: a reload validates the whole file and, only if all of it is
//! good and nothing needs new sockets, sends the new [`snapshot::Snapshot`] to every worker
//! over its channel. Sockets are never closed or rebound while Spooky runs.

pub mod admin;
pub mod mailbox;
pub mod snapshot;
mod watch;

use crate::edge::keys::EdgeKeys;
use crate::edge::socket::{bind_reuseport, EdgeSocket, Offloads};
use crate::edge::steering::{self, Stray};
use crate::edge::worker::{Mesh, Worker, WorkerCtx};
use crate::health::{active, HealthView};
use crate::telemetry::{access_log, metrics as telemetry_metrics};
use crate::transport::pool::Settings as H2Settings;
use anyhow::Context as _;
use crossbeam_channel::Sender;
use snapshot::{Snapshot, Source};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What the control thread reacts to.
pub enum Event {
    /// Reload the configuration file; `reply` gets the new version or why it was refused.
    Reload { reason: &'static str, reply: Option<Sender<Result<u64, String>>> },
    /// SIGTERM/SIGINT: drain; a second one exits at once.
    Shutdown,
    /// A worker thread ended (after draining, or by failing).
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

/// Runs Spooky on `first` until a drain completes (or a worker fails).
pub fn run(first: Snapshot) -> anyhow::Result<()> {
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
    let mut stray_boxes = Vec::with_capacity(workers);
    let mut peers = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (postbox, mailbox) = mailbox::mailbox(Some(steering::STRAY_QUEUE))?;
        peers.push(postbox);
        stray_boxes.push(mailbox);
    }
    let listen: Vec<SocketAddr> = sockets[0].iter().map(|s| s.local_addr()).collect::<Result<_, _>>()?;
    let logger = access_log::start(&config.access_log);
    let (events_tx, events_rx) = crossbeam_channel::unbounded::<Event>();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<anyhow::Result<()>>(workers);
    let mut links = Vec::with_capacity(workers);
    let mut threads = Vec::with_capacity(workers);
    for ((id, socks), strays) in sockets.into_iter().enumerate().zip(stray_boxes) {
        let peers = peers.iter().map(mailbox::Postbox::try_clone).collect::<Result<Vec<_>, _>>()?;
        let (link, inbox) = mailbox::mailbox(None)?;
        links.push(link);
        let seed = WorkerSeed { id, sockets: socks, inbox, peers, strays, keys: keys.clone() };
        let snap = first.clone();
        let logger = logger.clone();
        let ready = ready_tx.clone();
        let exited = events_tx.clone();
        let core = (config.pin_workers && !cores.is_empty()).then(|| cores[id % cores.len()]);
        threads.push(std::thread::Builder::new().name(format!("spooky-w{id}")).spawn(move || {
            if let Some(core) = core {
                if !core_affinity::set_for_current(core) {
                    tracing::warn!(worker = id, "could not pin to core {}", core.id);
                }
            }
            let run = std::panic::AssertUnwindSafe(|| run_worker(seed, &snap, logger, ready));
            let error = match std::panic::catch_unwind(run) {
                Ok(result) => result.err().map(|e| format!("{e:#}")),
                Err(_) => Some("panicked".to_string()),
            };
            let _ = exited.send(Event::WorkerExited { id, error });
        })?);
    }
    drop(ready_tx);
    for _ in 0..workers {
        ready_rx.recv().context("a worker exited during start-up")??;
    }
    let admin_state = Arc::new(admin::AdminState {
        current: Mutex::new(first.clone()),
        ready: false.into(),
        draining: false.into(),
        metrics,
        events: events_tx.clone(),
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
    ::metrics::gauge!("spooky_config_version").set(first.version as f64);
    let addrs: Vec<String> = listen.iter().map(ToString::to_string).collect();
    let admin_text = admin_addr.map_or("off".to_string(), |a| a.to_string());
    tracing::info!(workers, listen = %addrs.join(","), admin = %admin_text, version = first.version,
        hash = %first.hash, "spooky ready");

    let mut control = Control { links, admin: admin_state, current: first, draining: false, checker };
    let mut running = workers;
    while running > 0 {
        match events_rx.recv().expect("the control thread holds a sender") {
            Event::Reload { reason, reply } => {
                let result = control.reload(reason);
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            }
            Event::Shutdown if control.draining => {
                tracing::warn!("second signal: exiting without waiting for in-flight requests");
                std::process::exit(1);
            }
            Event::Shutdown => control.drain(),
            Event::Health(view) => {
                let view = Arc::new(view);
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
    current: Arc<Snapshot>,
    draining: bool,
    checker: active::Checker,
}

impl Control {
    /// Loads, validates and broadcasts the configuration file; on any problem the running
    /// configuration stays, untouched.
    fn reload(&mut self, reason: &str) -> Result<u64, String> {
        if matches!(self.current.source, Source::Embedded) {
            return Err("running on the embedded default configuration: there is no file to reload".into());
        }
        let next = match Snapshot::load(&self.current.source, self.current.version + 1) {
            Ok(s) => s,
            Err(why) => {
                ::metrics::counter!("spooky_reloads_total", "result" => "invalid").increment(1);
                tracing::error!(reason, %why, "reload rejected; the running configuration stays");
                return Err(why);
            }
        };
        if next.fingerprint == self.current.fingerprint {
            tracing::debug!(reason, "configuration unchanged");
            return Ok(self.current.version);
        }
        if let Some(why) = self.current.restart_needed(&next) {
            ::metrics::counter!("spooky_reloads_total", "result" => "restart_required").increment(1);
            tracing::warn!(reason, %why, "reload not applied: this change needs a restart");
            return Err(format!("{why}; nothing was applied"));
        }
        let next = Arc::new(next);
        for link in &self.links {
            let _ = link.send(ToWorker::Apply(next.clone()));
        }
        *self.admin.current.lock().expect("not poisoned") = next.clone();
        self.checker.update(active::targets(&next.config), H2Settings::from_config(&next.config));
        ::metrics::counter!("spooky_reloads_total", "result" => "ok").increment(1);
        ::metrics::gauge!("spooky_config_version").set(next.version as f64);
        tracing::info!(reason, version = next.version, hash = %next.hash, "configuration reloaded");
        self.current = next;
        Ok(self.current.version)
    }

    fn drain(&mut self) {
        self.draining = true;
        self.admin.draining.store(true, Ordering::Relaxed);
        let timeout = self.current.config.timeouts.drain.0;
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
    Ok(all)
}

/// What a worker thread starts from, made on the control thread before the worker's runtime
/// exists.
struct WorkerSeed {
    id: usize,
    sockets: Vec<UdpSocket>,
    inbox: mailbox::Mailbox<ToWorker>,
    /// Every worker's stray-packet mailbox (by worker id), and this worker's own.
    peers: Vec<mailbox::Postbox<Stray>>,
    strays: mailbox::Mailbox<Stray>,
    keys: Arc<EdgeKeys>,
}

fn run_worker(
    seed: WorkerSeed,
    snap: &Snapshot,
    logger: access_log::AccessLogger,
    ready: Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let WorkerSeed { id, sockets, inbox, peers, strays, keys } = seed;
    let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("building the worker runtime");
    let mut runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("worker {id}: {e:#}");
            let _ = ready.send(Err(e));
            anyhow::bail!(msg);
        }
    };
    match &runtime {
        monoio::FusionRuntime::Uring(_) => tracing::debug!(worker = id, "io_uring driver"),
        monoio::FusionRuntime::Legacy(_) if id == 0 => {
            tracing::warn!("io_uring unavailable; workers use the epoll driver")
        }
        monoio::FusionRuntime::Legacy(_) => {}
    }
    runtime.block_on(async move {
        let setup = || -> anyhow::Result<Worker> {
            let q = &snap.config.quic;
            let offloads = Offloads { gso: q.gso, gro: q.gro, pacing: q.pacing };
            let sockets = sockets.into_iter().map(|s| EdgeSocket::new(s, offloads)).collect::<Result<Vec<_>, _>>()?;
            let inbox = inbox.attach()?;
            let mesh = Mesh { peers, strays: strays.attach()? };
            let ctx = WorkerCtx::new(id, snap, logger, None)?;
            Worker::new(id, sockets, snap, ctx, inbox, mesh, keys)
        };
        match setup() {
            Ok(worker) => {
                let _ = ready.send(Ok(()));
                worker.run().await;
                Ok(())
            }
            Err(e) => {
                let msg = format!("worker {id}: {e:#}");
                let _ = ready.send(Err(e));
                anyhow::bail!(msg)
            }
        }
    })
}
