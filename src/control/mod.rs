//! The control thread: turns a validated [`Config`] into running workers.
//!
//! Start-up order matters: TLS material is loaded (or generated) once, then every worker's
//! sockets are bound here, in worker order, so the kernel's reuseport group index equals the
//! worker id; only then are worker threads started, each pinned to its core.

use crate::bridge::exchange::Notifier;
use crate::config::Config;
use crate::edge::cid::CidGenerator;
use crate::edge::socket::{bind_reuseport, EdgeSocket};
use crate::edge::tls::{self, TlsMaterial};
use crate::edge::worker::{Worker, WorkerCtx};
use crate::route::Router;
use crate::transport::Upstreams;
use anyhow::Context as _;
use std::net::{SocketAddr, UdpSocket};
use std::rc::Rc;
use std::sync::Arc;

/// Starts the workers and blocks while they run.
pub fn run(config: Config) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let workers = config.workers.resolve();
    let tls = TlsMaterial::load(&config)?;
    let sockets = bind_all(&config.listen, workers)?;
    let listen: Vec<SocketAddr> = sockets[0]
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<_, _>>()?;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded::<anyhow::Result<()>>(workers);
    let mut threads = Vec::with_capacity(workers);
    for (id, socks) in sockets.into_iter().enumerate() {
        let config = config.clone();
        let tls = tls.clone();
        let ready = ready_tx.clone();
        let core = (config.pin_workers && !cores.is_empty()).then(|| cores[id % cores.len()]);
        let t = std::thread::Builder::new()
            .name(format!("spooky-w{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    if !core_affinity::set_for_current(core) {
                        tracing::warn!(worker = id, "could not pin to core {}", core.id);
                    }
                }
                run_worker(id, socks, &config, &tls, ready)
            })?;
        threads.push(t);
    }
    drop(ready_tx);
    for _ in 0..workers {
        ready_rx
            .recv()
            .context("a worker exited during start-up")??;
    }
    let addrs: Vec<String> = listen.iter().map(ToString::to_string).collect();
    tracing::info!(workers, listen = %addrs.join(","), "spooky ready");
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            return Err(e);
        }
    }
    Ok(())
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

fn run_worker(
    id: usize,
    sockets: Vec<UdpSocket>,
    config: &Config,
    tls: &TlsMaterial,
    ready: crossbeam_channel::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let setup = || -> anyhow::Result<_> {
        let quic = tls::quic_config(config, tls)?;
        let h3_config = tls::h3_config(config)?;
        let runtime = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .context("building the worker runtime")?;
        Ok((quic, h3_config, runtime))
    };
    let (quic, h3_config, mut runtime) = match setup() {
        Ok(v) => v,
        Err(e) => {
            let msg = format!("worker {id}: {e:#}");
            let _ = ready.send(Err(e));
            anyhow::bail!(msg);
        }
    };
    match &runtime {
        monoio::FusionRuntime::Uring(_) => tracing::debug!(worker = id, "io_uring driver"),
        monoio::FusionRuntime::Legacy(_) => {
            if id == 0 {
                tracing::warn!("io_uring unavailable; workers use the epoll driver");
            }
        }
    }
    runtime.block_on(async move {
        let upstreams = Rc::new(Upstreams::new(config));
        let router = Router::new(&config.routes, |name| upstreams.pool_index(name));
        let ctx = WorkerCtx {
            h3_config,
            notifier: Rc::new(Notifier::default()),
            router,
            upstreams,
            header_policy: config.headers.clone(),
        };
        let sockets = sockets
            .into_iter()
            .map(EdgeSocket::new)
            .collect::<Result<Vec<_>, _>>();
        let sockets = match sockets {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(anyhow::anyhow!(
                    "worker {id}: registering sockets: {e}"
                )));
                return;
            }
        };
        let worker = Worker::new(id, sockets, quic, ctx, CidGenerator::new(0, 0, id as u8));
        let _ = ready.send(Ok(()));
        worker.run().await;
    });
    Ok(())
}
