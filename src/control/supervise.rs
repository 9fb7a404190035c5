//! Worker threads, and what happens when one panics.
//!
//! The policy: a worker that panics is restarted, on its own thread and its own sockets, and
//! nothing else is touched.
//! - The panic is logged with its backtrace (the hook from [`install_panic_hook`]) and counted
//!   in `spooky_worker_panics_total{worker}`.
//! - The worker's sockets and mailboxes are owned here, outside the code that can unwind. Each
//!   run of the worker gets duplicates of the socket descriptors, so an unwinding worker closes
//!   only its duplicates: the socket stays in its reuseport group at the same index (closing
//!   one would move the last socket into its slot and misroute every packet the BPF program
//!   steers), and messages sent to the worker while it restarts wait in its mailboxes.
//! - The new run starts from the newest snapshot and health view the control thread sent, and
//!   acknowledges that version. The connections of the panicked run are lost; their clients get
//!   a stateless reset for the next packet they send. Other workers share nothing mutable with
//!   it and carry on.
//! - A panic before the worker's first run is set up fails start-up, like any start-up error.
//! - A worker that panics more than [`MAX_PANICS`] times within [`PANIC_WINDOW`] is not
//!   restarted again: Spooky exits non-zero so the process supervisor (systemd, Kubernetes)
//!   restarts it, rather than spin on a panic every client can trigger. During a drain a
//!   panicked worker is not restarted either: its connections are gone, there is nothing left to
//!   drain.
//! - A panic while a panic unwinds (in a destructor), or inside a callback BoringSSL calls from
//!   C, aborts the process (Rust's rules); the process supervisor restarts it then.

use super::mailbox::Mailbox;
use super::{ControlLink, Event, ToWorker};
use crate::control::snapshot::Snapshot;
use crate::edge::keys::EdgeKeys;
use crate::edge::socket::{EdgeSocket, Offloads};
use crate::edge::steering::{Stray, StrayPeer};
use crate::edge::worker::{Mesh, Worker, WorkerCtx};
use crate::health::HealthView;
use crate::telemetry::access_log::AccessLogger;
use anyhow::Context as _;
use crossbeam_channel::Sender;
use futures::FutureExt as _;
use std::cell::Cell;
use std::collections::VecDeque;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Panics within [`PANIC_WINDOW`] after which a worker is not restarted again.
pub const MAX_PANICS: usize = 5;
pub const PANIC_WINDOW: Duration = Duration::from_secs(60);

/// What a worker (re)starts from; the control thread keeps it current.
#[derive(Clone)]
pub struct Latest {
    pub snapshot: Arc<Snapshot>,
    pub health: Arc<HealthView>,
    pub draining: bool,
}

/// Shared between the control thread (writer) and the worker supervisors (readers, at restart).
pub type SharedLatest = Arc<Mutex<Latest>>;

/// Everything a worker thread owns for the life of the process, across restarts.
pub struct WorkerSeed {
    pub id: usize,
    /// The reuseport sockets bound for this worker at start-up, in listen order; never closed.
    pub sockets: Vec<UdpSocket>,
    pub inbox: Mailbox<ToWorker>,
    /// Every worker's stray-packet mailbox (by worker id), and this worker's own.
    pub peers: Vec<StrayPeer>,
    pub strays: Mailbox<Stray>,
    pub keys: Arc<EdgeKeys>,
    pub logger: AccessLogger,
    /// Where the worker acknowledges snapshots and the supervisor reports its end.
    pub events: Sender<Event>,
    pub latest: SharedLatest,
    pub core: Option<core_affinity::CoreId>,
}

/// Logs every panic, on any thread, with its backtrace (captured whatever `RUST_BACKTRACE`
/// says: the panic hook is the only place that still has the panicking stack).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let backtrace = std::backtrace::Backtrace::force_capture();
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        if tracing::dispatcher::has_been_set() {
            tracing::error!(thread = name, "{info}\nbacktrace:\n{backtrace}");
        } else {
            eprintln!("thread {name} {info}\nbacktrace:\n{backtrace}");
        }
    }));
}

/// Starts worker `seed.id` on its own thread; `ready` hears once its first run is set up (or
/// failed to: a panic before that is not restarted).
pub fn spawn(seed: WorkerSeed, ready: Sender<anyhow::Result<()>>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name(format!("spooky-w{}", seed.id)).spawn(move || supervise(seed, ready))
}

fn supervise(seed: WorkerSeed, ready: Sender<anyhow::Result<()>>) {
    let id = seed.id;
    if let Some(core) = seed.core {
        if !core_affinity::set_for_current(core) {
            tracing::warn!(worker = id, "could not pin to core {}", core.id);
        }
    }
    let panics_total = metrics::counter!("spooky_worker_panics_total", "worker" => id.to_string());
    // Taken by the first run once it is set up.
    let ready = Cell::new(Some(ready));
    let mut panics: VecDeque<Instant> = VecDeque::new();
    let error = loop {
        let start = seed.latest.lock().unwrap_or_else(PoisonError::into_inner).clone();
        match run_worker(&seed, &start, &ready) {
            Ok(Ended::Drained) => break None,
            Err(e) => break Some(format!("{e:#}")),
            Ok(Ended::Panicked) => {
                panics_total.increment(1);
                if let Some(ready) = ready.take() {
                    // Start-up fails as a whole rather than wait for a worker that restarts.
                    let _ = ready.send(Err(anyhow::anyhow!("worker {id} panicked while starting")));
                    break Some("panicked while starting".into());
                }
                let now = Instant::now();
                panics.push_back(now);
                panics.retain(|t| now.duration_since(*t) < PANIC_WINDOW);
                if seed.latest.lock().unwrap_or_else(PoisonError::into_inner).draining {
                    tracing::warn!(worker = id, "worker panicked while draining; its connections are lost");
                    break None;
                }
                if panics.len() > MAX_PANICS {
                    break Some(format!("panicked {} times within {PANIC_WINDOW:?}", panics.len()));
                }
                tracing::error!(worker = id, "worker panicked: restarting it on its sockets; its connections are lost");
            }
        }
    };
    let _ = seed.events.send(Event::WorkerExited { id, error });
}

/// How a run of a worker ended (setting it up can also fail: `Err`).
enum Ended {
    Drained,
    Panicked,
}

/// After a panic in the worker's own loop: how long the runtime keeps running so the upstream
/// tasks of its cancelled streams can wind down.
const WIND_DOWN: Duration = Duration::from_millis(100);

/// One run of a worker: a fresh runtime, duplicates of its sockets, its mailboxes, `start`.
///
/// After a panic the runtime is leaked, never dropped: tasks it still holds would be dropped
/// outside it, where their wake-ups panic again (monoio), and a second panic while unwinding
/// aborts the process. Leaking is also what keeps buffers of io_uring operations still in the
/// kernel valid. The cost is the driver's few descriptors and whatever the dead run left.
fn run_worker(
    seed: &WorkerSeed,
    start: &Latest,
    ready: &Cell<Option<Sender<anyhow::Result<()>>>>,
) -> anyhow::Result<Ended> {
    let id = seed.id;
    let report = |result: anyhow::Result<()>| {
        if let Some(ready) = ready.take() {
            let _ = ready.send(result);
        }
    };
    let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("building the worker runtime");
    let mut runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("worker {id}: {e:#}");
            report(Err(e));
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
    let run = std::panic::AssertUnwindSafe(|| runtime.block_on(serve(seed, start, report)));
    match std::panic::catch_unwind(run) {
        Ok(Ok(Ended::Drained)) => Ok(Ended::Drained),
        Ok(Err(e)) => Err(e),
        // A panic in the loop (caught inside the runtime, streams cancelled), or one that left
        // the runtime (an upstream task's).
        Ok(Ok(Ended::Panicked)) | Err(_) => {
            std::mem::forget(runtime);
            Ok(Ended::Panicked)
        }
    }
}

/// Builds the worker on the current runtime and runs it until it drains or panics.
async fn serve(seed: &WorkerSeed, start: &Latest, report: impl Fn(anyhow::Result<()>)) -> anyhow::Result<Ended> {
    let id = seed.id;
    let setup = || -> anyhow::Result<Worker> {
        let snap = &start.snapshot;
        let q = &snap.config.quic;
        let offloads = Offloads { gso: q.gso, gro: q.gro, txtime: q.pacing && q.pacing_qdisc };
        let sockets =
            seed.sockets.iter().map(|s| EdgeSocket::new(s.try_clone()?, offloads)).collect::<Result<Vec<_>, _>>()?;
        let peers = seed.peers.iter().map(StrayPeer::try_clone).collect::<Result<Vec<_>, _>>()?;
        let mesh = Mesh { peers, strays: seed.strays.attach()? };
        let ctx = WorkerCtx::new(id, snap, seed.logger.clone(), None)?;
        *ctx.upstreams.health.borrow_mut() = start.health.clone();
        let control = ControlLink { inbox: seed.inbox.attach()?, acks: seed.events.clone() };
        Worker::new(id, sockets, snap, ctx, control, mesh, seed.keys.clone())
    };
    let mut worker = match setup() {
        Ok(worker) => worker,
        Err(e) => {
            let msg = format!("worker {id}: {e:#}");
            report(Err(e));
            anyhow::bail!(msg)
        }
    };
    report(Ok(()));
    match std::panic::AssertUnwindSafe(worker.run()).catch_unwind().await {
        Ok(()) => Ok(Ended::Drained),
        Err(_) => {
            // Every stream of the dead run ends, so its upstream tasks stop and release their
            // backend connections while this runtime still runs them.
            worker.close_all();
            drop(worker);
            monoio::time::sleep(WIND_DOWN).await;
            Ok(Ended::Panicked)
        }
    }
}
