//! A worker's event loop: one thread, one monoio runtime, its own sockets, connections, HTTP/2
//! pool and balancers. Nothing here is shared with other workers.
//!
//! Each turn, in this order:
//! 1. receive: drain every socket and the stray-packet mailbox (bounded batches) and feed the
//!    datagrams to their connections (see [`super::steering`] for how packets find the worker
//!    owning their connection, and [`super::admission`] for what happens to new ones);
//! 2. control: apply a new configuration snapshot (and acknowledge its version to the control
//!    thread) or start draining, if the control thread sent one (swapped between turns:
//!    in-flight requests keep the snapshot they started with);
//! 3. timers: fire quiche timeouts that are due;
//! 4. upstream news: drive the streams whose upstream task queued data or failed;
//! 5. flush: send every packet the touched connections have, reschedule their timers, reap
//!    closed ones;
//! 6. wait for the first of: a readable socket, the earliest timer, upstream news, a control
//!    message.
//!
//! The loop sleeps only in step 6, so a response never waits for the next client packet and
//! nothing polls on an interval.

use super::admission::{Admission, Refusal, Verdict};
use super::cid::{self, CidGenerator, CID_LEN};
use super::connection::Connection;
use super::handshake;
use super::keys::{self, EdgeKeys};
use super::pacing::{Held, PaceMode, Rate, HORIZON};
use super::settings;
use super::socket::{EdgeSocket, GSO_MAX_SEGMENTS, PACING_SLACK};
use super::steering::{Stray, StrayPeer};
use super::{refuse, retry};
use crate::bridge::budget::BodyBudget;
use crate::bridge::exchange::{Notifier, StreamKey};
use crate::bridge::request::RequestIds;
use crate::bridge::response;
use crate::config::HeaderPolicy;
use crate::control::mailbox::AttachedMailbox;
use crate::control::snapshot::Snapshot;
use crate::control::{ControlLink, Event, ToWorker};
use crate::route::rate_limit::RateLimiter;
use crate::route::Router;
use crate::telemetry::access_log::AccessLogger;
use crate::telemetry::metrics::{DropReason, RouteMetrics, WorkerMetrics};
use crate::transport::forward::RoutePolicy;
use crate::transport::Upstreams;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

/// Reads (each one datagram or a GRO train) from one socket before other work gets a turn.
const RECV_BATCH: usize = 64;
/// QUIC's CONNECTION_REFUSED transport error (RFC 9000 §20.1).
const CONNECTION_REFUSED: u64 = 0x2;
/// Largest datagram accepted (GRO can deliver up to 64 KiB later on).
const RECV_BUF: usize = 65_535;

/// What connections need from their worker while handling events: everything derived from
/// one configuration snapshot, plus the worker-lifetime pieces (notifier, request ids).
pub struct WorkerCtx {
    pub h3_config: quiche::h3::Config,
    pub notifier: Rc<Notifier>,
    pub router: Router,
    /// Upstream policy per route (by route index).
    pub route_policies: Vec<Rc<RoutePolicy>>,
    /// Rate limiter per route (by route index), for routes that have one.
    pub rate_limiters: Vec<Option<RefCell<RateLimiter>>>,
    /// Metric handles per route (by route index), and for requests no route matched.
    pub route_metrics: Vec<Rc<RouteMetrics>>,
    pub unrouted_metrics: Rc<RouteMetrics>,
    pub upstreams: Rc<Upstreams>,
    pub header_policy: HeaderPolicy,
    /// Status and body when no route matches.
    pub no_route: (http::StatusCode, String),
    /// Slow request bodies: the grace period and the minimum average rate (bytes/s, 0: off)
    /// for requests starting now; a request keeps the pair it started with.
    pub body_grace: std::time::Duration,
    pub body_min_rate: u64,
    pub metrics: WorkerMetrics,
    pub access_log: AccessLogger,
    pub request_ids: Rc<RefCell<RequestIds>>,
    /// Request-body bytes held by this worker's streams (kept across reloads).
    pub body_budget: Rc<BodyBudget>,
}

impl WorkerCtx {
    /// Builds the context for `snap`; with `previous` (a reload), carries over what must
    /// outlive a snapshot: the notifier in-flight exchanges report to, pooled connections,
    /// the request-id generator.
    pub fn new(
        worker: usize,
        snap: &Snapshot,
        mut access_log: AccessLogger,
        previous: Option<&WorkerCtx>,
    ) -> anyhow::Result<Self> {
        let config = &snap.config;
        let upstreams = Rc::new(Upstreams::new(config, previous.map(|p| &*p.upstreams))?);
        let router = Router::new(&config.routes, |name| upstreams.pool_index(name));
        access_log.reconfigure(&config.access_log);
        let (notifier, request_ids) = match previous {
            Some(p) => (p.notifier.clone(), p.request_ids.clone()),
            None => (Rc::new(Notifier::default()), Rc::new(RefCell::new(RequestIds::new()))),
        };
        let (per_connection, per_worker) =
            (config.quic.body_buffer_per_connection.0 as usize, config.quic.body_buffer_per_worker.0 as usize);
        let body_budget = match previous {
            Some(p) => {
                p.body_budget.reconfigure(per_connection, per_worker);
                p.body_budget.clone()
            }
            None => BodyBudget::new(worker, per_connection, per_worker, notifier.clone()),
        };
        let metrics = WorkerMetrics::new(worker);
        let route_metrics =
            config.routes.iter().map(|r| Rc::new(metrics.route(Some((&r.label(), &r.upstream))))).collect();
        Ok(WorkerCtx {
            h3_config: settings::h3_config(config)?,
            notifier,
            router,
            route_policies: config.routes.iter().map(|r| Rc::new(RoutePolicy::new(r, config))).collect(),
            rate_limiters: config
                .routes
                .iter()
                .map(|r| r.rate_limit.as_ref().map(|l| RefCell::new(RateLimiter::new(l, config.workers.resolve()))))
                .collect(),
            route_metrics,
            unrouted_metrics: Rc::new(metrics.route(None)),
            upstreams,
            header_policy: config.headers.clone(),
            no_route: (
                http::StatusCode::from_u16(config.no_route.status).unwrap_or(http::StatusCode::NOT_FOUND),
                config.no_route.body.clone(),
            ),
            body_grace: config.timeouts.body_grace.0,
            body_min_rate: config.timeouts.body_min_rate.0,
            metrics,
            access_log,
            request_ids,
            body_budget,
        })
    }
}

/// A worker's links to the other workers, for packets that reached the wrong one.
pub struct Mesh {
    /// Every worker's stray mailbox, by worker id (this worker's own included, unused).
    pub peers: Vec<StrayPeer>,
    pub strays: AttachedMailbox<Stray>,
}

pub struct Worker {
    id: usize,
    /// The version of the snapshot in use.
    version: u64,
    mesh: Mesh,
    keys: Arc<EdgeKeys>,
    admission: Admission,
    retry_token_lifetime: Duration,
    new_token_lifetime: Duration,
    sockets: Vec<EdgeSocket>,
    quic_config: quiche::Config,
    ctx: WorkerCtx,
    control: ControlLink,
    conns: HashMap<u64, Connection>,
    by_cid: HashMap<Vec<u8>, u64>,
    next_handle: u64,
    /// Each connection's next deadline, exactly one entry per connection that has one, so a
    /// client that moves its deadline on every packet cannot grow it.
    timers: BTreeSet<(Instant, u64)>,
    dirty: Vec<u64>,
    cids: CidGenerator,
    /// The fields added to response heads, shared by the connections accepted under it.
    added: Rc<response::Added>,
    /// Where a flush assembles its GSO batches.
    send_buf: Vec<u8>,
    /// Largest datagram Spooky sends (`quic.max_udp_payload`).
    max_datagram: usize,
    /// Who enforces pacing release times on this worker's sockets.
    pace_mode: PaceMode,
    /// Set by a drain order: when remaining connections are closed regardless.
    drain_deadline: Option<Instant>,
    /// Where receives land, and the streams with upstream news, reused every turn.
    recv_buf: Vec<u8>,
    news: Vec<StreamKey>,
}

impl Worker {
    pub fn new(
        id: usize,
        sockets: Vec<EdgeSocket>,
        snap: &Snapshot,
        ctx: WorkerCtx,
        control: ControlLink,
        mesh: Mesh,
        keys: Arc<EdgeKeys>,
    ) -> anyhow::Result<Self> {
        let q = &snap.config.quic;
        // A new run of a worker (also after a panic) holds no connection or stream yet.
        ctx.metrics.connections_active.set(0.0);
        ctx.metrics.streams_active.set(0.0);
        // Sockets carry SO_TXTIME only where config says the qdisc enforces it (and the
        // kernel took the option); everywhere else Spooky holds paced datagrams itself.
        let pace_mode = match (q.pacing, sockets.iter().all(|s| s.txtime())) {
            (false, _) => PaceMode::Off,
            (true, true) => PaceMode::Qdisc,
            (true, false) => PaceMode::UserSpace,
        };
        Ok(Worker {
            id,
            version: snap.version,
            mesh,
            keys,
            admission: Admission::new(q, Instant::now()),
            retry_token_lifetime: q.retry_token_lifetime.0,
            new_token_lifetime: q.new_token_lifetime.0,
            sockets,
            quic_config: settings::quic_config(&snap.config, &snap.tls)?,
            added: Rc::new(response::Added::new(&snap.config.headers)),
            ctx,
            control,
            conns: HashMap::new(),
            by_cid: HashMap::new(),
            next_handle: 0,
            timers: BTreeSet::new(),
            dirty: Vec::new(),
            cids: CidGenerator::new(q.cid_rotation, q.server_id, id as u8),
            // The largest IPv4 UDP payload: a GSO batch is one datagram to the kernel.
            send_buf: vec![0; 65_507],
            max_datagram: snap.config.quic.max_udp_payload,
            pace_mode,
            drain_deadline: None,
            recv_buf: vec![0u8; RECV_BUF],
            news: Vec::new(),
        })
    }

    /// Runs the loop until a drain completes.
    pub async fn run(&mut self) {
        tracing::info!(worker = self.id, version = self.version, sockets = self.sockets.len(), "worker ready");
        self.acknowledge(self.version, None);
        loop {
            let more_waiting = self.turn(Duration::ZERO).await;
            if self.drain_deadline.is_some() && self.conns.is_empty() {
                tracing::info!(worker = self.id, "worker drained");
                return;
            }
            if more_waiting {
                // Let upstream tasks run before the next batch.
                crate::runtime::yield_now().await;
                continue;
            }
            self.wait().await;
        }
    }

    /// Steps 1-5 of the loop; true if a socket may have more to read. Timers fire as if the
    /// clock were `timers_ahead` later: zero, except when fuzzing simulates time passing.
    async fn turn(&mut self, timers_ahead: Duration) -> bool {
        let mut buf = std::mem::take(&mut self.recv_buf);
        let more_waiting = self.receive(&mut buf);
        self.recv_buf = buf;
        self.handle_control();
        self.fire_timers(Instant::now() + timers_ahead);
        let mut news = std::mem::take(&mut self.news);
        self.ctx.notifier.drain(&mut news);
        for key in news.drain(..) {
            self.on_news(key);
        }
        self.news = news;
        self.resume_bodies();
        self.progress_drain();
        self.flush().await;
        more_waiting
    }

    /// Tells the control thread which snapshot this worker runs (or why it could not apply one).
    fn acknowledge(&self, version: u64, error: Option<String>) {
        let _ = self.control.acks.send(Event::Applied { worker: self.id, version, error });
    }

    /// Reads up to a batch from every socket; true if a socket may have more.
    fn receive(&mut self, buf: &mut [u8]) -> bool {
        let mut more = false;
        for si in 0..self.sockets.len() {
            let (mut n, mut datagrams) = (0, 0);
            while n < RECV_BATCH {
                match self.sockets[si].recv(buf) {
                    Ok((0, _, _)) => {
                        n += 1;
                        datagrams += 1;
                        self.ctx.metrics.dropped(DropReason::Unparseable);
                    }
                    Ok((len, from, segment)) => {
                        n += 1;
                        for datagram in buf[..len].chunks_mut(segment.max(1)) {
                            datagrams += 1;
                            self.on_datagram(si, datagram, from, false);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "UDP receive failed");
                        break;
                    }
                }
            }
            self.ctx.metrics.packets_received.increment(datagrams);
            more |= n == RECV_BATCH;
        }
        self.mesh.strays.clear_wakeups();
        let mut n = 0;
        while n < RECV_BATCH {
            let Ok(mut stray) = self.mesh.strays.rx.try_recv() else { break };
            n += 1;
            self.on_datagram(stray.socket, &mut stray.data, stray.from, true);
        }
        more | (n == RECV_BATCH)
    }

    /// Handles one datagram; `forwarded` when another worker handed it over.
    fn on_datagram(&mut self, si: usize, pkt: &mut [u8], from: SocketAddr, forwarded: bool) {
        let hdr = match quiche::Header::from_slice(pkt, CID_LEN) {
            Ok(h) => h,
            Err(_) => return self.ctx.metrics.dropped(DropReason::Unparseable),
        };
        let (handle, fresh) = match self.by_cid.get(hdr.dcid.as_ref()) {
            Some(h) => (*h, false),
            None => {
                // A CID of ours naming another worker: that worker owns the connection (or
                // issued the Retry this Initial answers). Strays are handed over only once.
                let owner = cid::worker_of(&hdr.dcid).map(usize::from);
                if let Some(owner) = owner.filter(|&w| !forwarded && w != self.id && w < self.mesh.peers.len()) {
                    return self.forward(owner, si, pkt, from);
                }
                match self.on_unknown_cid(si, &hdr, pkt, from) {
                    Some(h) => (h, true),
                    None => return,
                }
            }
        };
        let local = self.sockets[si].local;
        let conn = self.conns.get_mut(&handle).expect("CID table points at live connections");
        let received = conn.quic.recv(pkt, quiche::RecvInfo { from, to: local });
        if fresh {
            // An "Initial" that does not decrypt (noise with a plausible header) must not leave a
            // connection behind: only one quiche could read opens a connection. One whose
            // ClientHello Spooky's TLS refused (no ALPN it speaks) stays until quiche has sent
            // the alert in a CONNECTION_CLOSE, so the client learns why and the refusal is
            // counted as a handshake failure, instead of each retransmission starting over.
            let refused = conn.quic.local_error().is_some() && !conn.quic.is_closed();
            if (received.is_err() || conn.quic.stats().recv == 0) && !refused {
                self.discard(handle);
                return self.ctx.metrics.dropped(DropReason::Rejected);
            }
            self.ctx.metrics.connections_accepted.increment(1);
            self.ctx.metrics.connections_active.increment(1.0);
        }
        let conn = self.conns.get_mut(&handle).expect("still there");
        match received {
            // A packet from a new address is a migration only once quiche validated that
            // address (RFC 9000 §9): `Connection::on_input` follows quiche's path events.
            Ok(_) => {}
            Err(e) => {
                tracing::trace!(error = %e, "packet rejected by quiche");
                self.ctx.metrics.dropped(DropReason::Rejected);
            }
        }
        conn.on_input(&self.ctx);
        mark_dirty(&mut self.dirty, conn);
    }

    /// Hands a packet to the worker that owns its connection.
    fn forward(&mut self, owner: usize, si: usize, pkt: &[u8], from: SocketAddr) {
        if self.mesh.peers[owner].send(pkt, from, si) {
            self.ctx.metrics.packets_forwarded.increment(1);
        } else {
            self.ctx.metrics.dropped(DropReason::StrayQueueFull);
        }
    }

    /// A packet for no connection of this worker: a new connection, a version negotiation, a
    /// stateless reset, or nothing.
    fn on_unknown_cid(&mut self, si: usize, hdr: &quiche::Header<'_>, pkt: &mut [u8], from: SocketAddr) -> Option<u64> {
        if hdr.ty == quiche::Type::Short {
            // A connection this node forgot (restart, idle expiry): tell the client at once
            // instead of letting it time out.
            if self.cids.issued_here(&hdr.dcid) {
                let token = self.keys.reset_token(&hdr.dcid);
                if let Some(n) = keys::stateless_reset(token, pkt.len(), &mut self.send_buf) {
                    let _ = self.sockets[si].io.send_to(&self.send_buf[..n], from);
                    self.ctx.metrics.stateless_resets.increment(1);
                    return None;
                }
            }
            self.ctx.metrics.dropped(DropReason::UnknownCid);
            return None;
        }
        // RFC 9000 §14.1: a client's first datagram is at least 1200 bytes; answering a
        // smaller one would amplify.
        if pkt.len() < 1200 {
            self.ctx.metrics.dropped(DropReason::ShortInitial);
            return None;
        }
        if !quiche::version_is_supported(hdr.version) {
            let n = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut self.send_buf).ok()?;
            let _ = self.sockets[si].io.send_to(&self.send_buf[..n], from);
            self.ctx.metrics.version_negotiations.increment(1);
            return None;
        }
        if hdr.ty != quiche::Type::Initial {
            self.ctx.metrics.dropped(DropReason::UnknownCid);
            return None;
        }
        if self.drain_deadline.is_some() {
            self.ctx.metrics.dropped(DropReason::Draining);
            return None;
        }
        self.accept(si, hdr, from)
    }

    /// A client's Initial: validates its Retry or NEW_TOKEN token if it has one, asks the
    /// admission policy, then accepts, retries or refuses.
    fn accept(&mut self, si: usize, hdr: &quiche::Header<'_>, from: SocketAddr) -> Option<u64> {
        // A valid NEW_TOKEN validates the address like a Retry token; an invalid or expired one
        // counts as no token at all (RFC 9000 §8.1.3: the client may have it from another
        // server, or kept it too long), so the Initial gets a Retry if one is due.
        let new_token = hdr.token.as_deref().filter(|t| retry::is_new_token(t)).is_some_and(|t| {
            match retry::open_new_token(&self.keys, t, from.ip(), self.new_token_lifetime, SystemTime::now()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = ?e, %from, "NEW_TOKEN token refused, treated as none");
                    false
                }
            }
        });
        let token = hdr.token.as_deref().filter(|t| retry::is_retry_token(t));
        let odcid = match token {
            Some(t) => {
                match retry::open(&self.keys, t, from, &hdr.dcid, self.retry_token_lifetime, SystemTime::now()) {
                    Ok(odcid) => Some(odcid),
                    Err(e) => {
                        tracing::debug!(error = ?e, %from, "Retry token refused");
                        self.ctx.metrics.dropped(DropReason::InvalidToken);
                        return None;
                    }
                }
            }
            None => None,
        };
        match self.admission.decide(odcid.is_some() || new_token, self.conns.len(), Instant::now()) {
            Verdict::Accept if new_token => self.ctx.metrics.new_tokens_accepted.increment(1),
            Verdict::Accept => {}
            Verdict::Retry => {
                self.send_retry(si, hdr, from);
                return None;
            }
            Verdict::Refuse(why) => {
                self.refuse(si, hdr, from, why);
                return None;
            }
        }
        // After a Retry the client already uses the CID Spooky chose in it.
        let scid = match odcid {
            Some(_) => hdr.dcid.to_vec(),
            None => self.cids.generate().to_vec(),
        };
        self.quic_config.set_stateless_reset_token(Some(self.keys.reset_token(&scid)));
        let local = self.sockets[si].local;
        let odcid_ref = odcid.as_deref().map(quiche::ConnectionId::from_ref);
        let quic = match quiche::accept(
            &quiche::ConnectionId::from_ref(&scid),
            odcid_ref.as_ref(),
            local,
            from,
            &mut self.quic_config,
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "accept failed");
                return None;
            }
        };
        let handle = self.next_handle;
        self.next_handle += 1;
        let budget = self.ctx.body_budget.connection(handle);
        let mut conn = Connection::new(handle, quic, from, si, self.added.clone(), budget);
        // Until the client sees our CID it keeps sending to the one it picked: map both.
        conn.cids = vec![scid.clone()];
        if hdr.dcid.as_ref() != scid.as_slice() {
            conn.cids.push(hdr.dcid.to_vec());
        }
        for cid in &conn.cids {
            self.by_cid.insert(cid.clone(), handle);
        }
        self.conns.insert(handle, conn);
        Some(handle)
    }

    /// Answers with a Retry carrying a sealed token: the client must come back from the same
    /// address, proving it is not spoofed, before Spooky keeps any state for it.
    fn send_retry(&mut self, si: usize, hdr: &quiche::Header<'_>, from: SocketAddr) {
        let new_scid = self.cids.generate();
        let token = retry::seal(&self.keys, from, &hdr.dcid, &new_scid, SystemTime::now());
        let new_scid = quiche::ConnectionId::from_ref(&new_scid);
        match quiche::retry(&hdr.scid, &hdr.dcid, &new_scid, &token, hdr.version, &mut self.send_buf) {
            Ok(n) => {
                let _ = self.sockets[si].io.send_to(&self.send_buf[..n], from);
                self.ctx.metrics.retries_sent.increment(1);
            }
            Err(e) => tracing::debug!(error = %e, "building a Retry failed"),
        }
    }

    /// Refuses a new connection with CONNECTION_REFUSED, statelessly (see [`refuse`]).
    fn refuse(&mut self, si: usize, hdr: &quiche::Header<'_>, from: SocketAddr, why: Refusal) {
        self.ctx.metrics.refused(why);
        let reason: &[u8] = match why {
            Refusal::ConnectionLimit => b"connection limit",
            Refusal::RateLimit => b"new-connection rate limit",
        };
        let scid = self.cids.generate();
        if let Some(n) =
            refuse::initial_close(&hdr.dcid, &hdr.scid, &scid, CONNECTION_REFUSED, reason, &mut self.send_buf)
        {
            let _ = self.sockets[si].io.send_to(&self.send_buf[..n], from);
        }
    }

    /// Applies whatever the control thread sent since the last turn.
    fn handle_control(&mut self) {
        self.control.inbox.clear_wakeups();
        while let Ok(msg) = self.control.inbox.rx.try_recv() {
            match msg {
                ToWorker::Apply(snap) => self.apply(&snap),
                ToWorker::Health(view) => *self.ctx.upstreams.health.borrow_mut() = view,
                ToWorker::Drain { deadline } => {
                    tracing::info!(worker = self.id, connections = self.conns.len(), "draining");
                    self.drain_deadline = Some(deadline);
                    for conn in self.conns.values_mut() {
                        conn.start_drain();
                        mark_dirty(&mut self.dirty, conn);
                    }
                }
            }
        }
    }

    /// Swaps in a new snapshot, all of it or (if a part cannot be built) none of it, and
    /// acknowledges the outcome. Live connections keep their TLS state and in-flight requests
    /// keep the values and upstream state they started with; everything new uses the snapshot.
    /// A version not newer than the one in use (queued for a restarted worker that already
    /// started from it) is skipped.
    fn apply(&mut self, snap: &Arc<Snapshot>) {
        if snap.version <= self.version {
            return;
        }
        let built = settings::quic_config(&snap.config, &snap.tls)
            .and_then(|quic| Ok((quic, WorkerCtx::new(self.id, snap, self.ctx.access_log.clone(), Some(&self.ctx))?)));
        match built {
            Ok((quic, ctx)) => {
                self.ctx = ctx;
                self.quic_config = quic;
                self.admission.reconfigure(&snap.config.quic, Instant::now());
                self.retry_token_lifetime = snap.config.quic.retry_token_lifetime.0;
                self.new_token_lifetime = snap.config.quic.new_token_lifetime.0;
                self.added = Rc::new(response::Added::new(&snap.config.headers));
                self.max_datagram = snap.config.quic.max_udp_payload;
                self.version = snap.version;
                tracing::debug!(worker = self.id, version = snap.version, "configuration applied");
                self.acknowledge(snap.version, None);
            }
            Err(e) => {
                tracing::error!(worker = self.id, version = snap.version, error = %e, "cannot apply the new configuration");
                self.acknowledge(snap.version, Some(format!("{e:#}")));
            }
        }
    }

    /// Request bodies that stalled on a full budget go on, if bytes were released since.
    fn resume_bodies(&mut self) {
        for budget in self.ctx.body_budget.take_resumable() {
            if let Some(conn) = self.conns.get_mut(&budget.conn) {
                conn.resume_bodies(&self.ctx);
                mark_dirty(&mut self.dirty, conn);
            }
        }
    }

    fn on_news(&mut self, key: StreamKey) {
        if let Some(conn) = self.conns.get_mut(&key.conn) {
            conn.on_exchange_news(&self.ctx, key.stream);
            mark_dirty(&mut self.dirty, conn);
        }
    }

    /// While draining: close connections whose requests are done; at the deadline, all.
    fn progress_drain(&mut self) {
        let Some(deadline) = self.drain_deadline else { return };
        let force = Instant::now() >= deadline;
        for conn in self.conns.values_mut() {
            conn.close_if_idle(&self.ctx, force);
            mark_dirty(&mut self.dirty, conn);
        }
        if force {
            // Closing connections wait out their draining period; don't wait for it.
            let handles: Vec<u64> = self.conns.keys().copied().collect();
            self.dirty = handles;
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(&(at, handle)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            let Some(conn) = self.conns.get_mut(&handle) else { continue };
            conn.deadline = None;
            // The deadline may be quiche's, a body's minimum rate or a paced datagram's;
            // each of these checks its own time.
            conn.quic.on_timeout();
            conn.on_input(&self.ctx);
            conn.cut_slow_bodies(&self.ctx, now);
            mark_dirty(&mut self.dirty, conn);
        }
    }

    /// Sends what every touched connection has queued, as far as pacing allows; reschedules
    /// timers; reaps closed ones.
    async fn flush(&mut self) {
        let past_deadline = self.drain_deadline.is_some_and(|d| Instant::now() >= d);
        while let Some(handle) = self.dirty.pop() {
            let Some(conn) = self.conns.get_mut(&handle) else { continue };
            conn.dirty = false;
            sync_cids(conn, &mut self.by_cid, &self.cids, &self.keys);
            if !conn.new_token_sent && conn.quic.is_established() {
                send_new_token(conn, &self.keys, &self.ctx.metrics);
            }
            let socket = &self.sockets[conn.socket];
            let sent = send_paced(conn, socket, &mut self.send_buf, self.max_datagram, self.pace_mode).await;
            self.ctx.metrics.packets_sent.increment(sent);
            if conn.quic.is_closed() || (past_deadline && conn.quic.is_draining()) {
                self.remove(handle);
                continue;
            }
            let now = Instant::now();
            let deadline = [conn.quic.timeout().map(|d| now + d), conn.next_body_deadline(), conn.pacer.held_until()]
                .into_iter()
                .flatten()
                .min();
            if deadline != conn.deadline {
                if let Some(old) = conn.deadline {
                    self.timers.remove(&(old, handle));
                }
                conn.deadline = deadline;
                if let Some(at) = deadline {
                    self.timers.insert((at, handle));
                }
            }
        }
    }

    /// Ends every connection as if it had closed: streams cancelled (their upstream tasks
    /// stop), metrics and access-log lines recorded. For a worker that stops abruptly.
    pub fn close_all(&mut self) {
        let handles: Vec<u64> = self.conns.keys().copied().collect();
        for handle in handles {
            self.remove(handle);
        }
    }

    /// Forgets a connection that never got a readable packet (it was never counted). Not a
    /// handshake failure: no handshake started (noise, a damaged or spoofed Initial); the
    /// datagram is counted in `dropped{reason="rejected"}`.
    fn discard(&mut self, handle: u64) {
        if let Some(conn) = self.conns.remove(&handle) {
            self.forget_timer(&conn);
            for cid in &conn.cids {
                self.by_cid.remove(cid);
            }
        }
    }

    fn remove(&mut self, handle: u64) {
        if let Some(mut conn) = self.conns.remove(&handle) {
            self.forget_timer(&conn);
            for cid in &conn.cids {
                self.by_cid.remove(cid);
            }
            conn.record_path_stats(&self.ctx);
            if !conn.quic.is_established() {
                handshake::record_failure(&self.ctx.metrics, &conn);
            }
            conn.cancel_all(&self.ctx);
            self.ctx.metrics.connections_active.decrement(1.0);
        }
    }

    fn forget_timer(&mut self, conn: &Connection) {
        if let Some(at) = conn.deadline {
            self.timers.remove(&(at, conn.handle));
        }
    }

    /// Sleeps until a socket is readable, the earliest timer is due, upstream news or a
    /// control message arrives.
    async fn wait(&mut self) {
        self.ctx.metrics.timers.set(self.timers.len() as f64);
        let deadline = self.timers.first().map(|&(at, _)| at);
        let deadline = match (deadline, self.drain_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut sleep = pin!(async move {
            match deadline {
                Some(at) => monoio::time::sleep_until(monoio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        });
        let mut readable: Vec<_> = self.sockets.iter().map(|s| Box::pin(s.readable())).collect();
        let mut control = pin!(self.control.inbox.wakeup());
        let mut strays = pin!(self.mesh.strays.wakeup());
        let notifier = self.ctx.notifier.clone();
        poll_fn(|cx| {
            if notifier.poll_ready(cx).is_ready()
                || sleep.as_mut().poll(cx).is_ready()
                || control.as_mut().poll(cx).is_ready()
                || strays.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(());
            }
            for r in readable.iter_mut() {
                if r.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
        .await;
    }
}

/// Sends what `conn` has queued and pacing allows, in GSO runs: runs of equal-size datagrams
/// to one address (the last may be shorter), written back to back in `buf` so the kernel can
/// split them. Under user-space pacing the first datagram that is not due within
/// [`HORIZON`] is held, and nothing more is generated for the connection until its timer
/// releases it; under qdisc pacing a run carries its first datagram's release time, and one
/// due notably later starts a new run. Returns the datagrams sent.
async fn send_paced(conn: &mut Connection, socket: &EdgeSocket, buf: &mut [u8], max: usize, mode: PaceMode) -> u64 {
    let now = Instant::now();
    let due = now + HORIZON;
    let mut run = Run::default();
    if let Some(held) = conn.pacer.held.take() {
        if held.at > due {
            conn.pacer.held = Some(held);
            return 0;
        }
        buf[..held.data.len()].copy_from_slice(&held.data);
        run.add(held.data.len(), held.to, held.at);
    }
    let rate = Rate::of(&conn.quic, mode);
    loop {
        if run.len + max > buf.len() || run.count >= GSO_MAX_SEGMENTS {
            run.send(socket, buf).await;
        }
        let (n, info) = match conn.quic.send(&mut buf[run.len..run.len + max]) {
            Ok(sent) => sent,
            Err(quiche::Error::Done) => break,
            Err(e) => {
                tracing::debug!(error = %e, "quiche send failed");
                let _ = conn.quic.close(false, 0x1, b"internal");
                break;
            }
        };
        let at = conn.pacer.release(now, n, info.at, rate);
        if mode == PaceMode::UserSpace && at > due {
            conn.pacer.held = Some(Held { data: buf[run.len..run.len + n].to_vec(), to: info.to, at });
            break;
        }
        let later = mode == PaceMode::Qdisc && run.dest.is_some_and(|(_, first)| at > first + PACING_SLACK);
        if run.count > 0 && (run.dest.map(|(to, _)| to) != Some(info.to) || n > run.segment || later) {
            // Does not fit the current run: send the run, restart with this datagram.
            let start = run.len;
            run.send(socket, buf).await;
            buf.copy_within(start..start + n, 0);
        }
        run.add(n, info.to, at);
        if n < run.segment {
            // A short datagram can only end a run.
            run.send(socket, buf).await;
        }
    }
    run.send(socket, buf).await;
    run.sent
}

/// The GSO run being assembled at the start of the send buffer.
#[derive(Default)]
struct Run {
    len: usize,
    segment: usize,
    count: usize,
    /// Destination and release time of the run's first datagram.
    dest: Option<(SocketAddr, Instant)>,
    /// Datagrams handed to the kernel so far.
    sent: u64,
}

impl Run {
    /// Appends the `n`-byte datagram just written at `buf[self.len..]`.
    fn add(&mut self, n: usize, to: SocketAddr, at: Instant) {
        if self.count == 0 {
            self.segment = n;
            self.dest = Some((to, at));
        }
        self.len += n;
        self.count += 1;
    }

    /// Sends the run (nothing when empty) and starts an empty one.
    async fn send(&mut self, socket: &EdgeSocket, buf: &[u8]) {
        if let Some((to, at)) = self.dest.filter(|_| self.len > 0) {
            if let Err(e) = socket.send_batch(&buf[..self.len], self.segment, to, at).await {
                tracing::debug!(error = %e, %to, "UDP send failed");
            }
            self.sent += self.count as u64;
        }
        (self.len, self.segment, self.count, self.dest) = (0, 0, 0, None);
    }
}

/// Keeps a connection's CIDs in the worker's table in step with quiche: forgets the ones the
/// client retired and, once the handshake is done, issues spare ones (with their reset tokens)
/// so the client can migrate to a new path with a fresh CID (RFC 9000 §9.5).
fn sync_cids(conn: &mut Connection, by_cid: &mut HashMap<Vec<u8>, u64>, cids: &CidGenerator, keys: &EdgeKeys) {
    let before = by_cid.len();
    let mut changed = false;
    while let Some(retired) = conn.quic.retired_scid_next() {
        by_cid.remove(retired.as_ref());
        conn.cids.retain(|c| c.as_slice() != retired.as_ref());
        changed = true;
    }
    if conn.quic.is_established() {
        while conn.quic.scids_left() > 0 {
            let cid = cids.generate();
            if conn.quic.new_scid(&quiche::ConnectionId::from_ref(&cid), keys.reset_token(&cid), false).is_err() {
                break;
            }
            by_cid.insert(cid.to_vec(), conn.handle);
            conn.cids.push(cid.to_vec());
            changed = true;
        }
    }
    if changed || by_cid.len() != before {
        // Rare (handshakes, migrations): the gauge shows that retired CIDs leave the table.
        metrics::gauge!("spooky_connection_ids", "worker" => cids.worker().to_string()).set(by_cid.len() as f64);
    }
}

/// Queues one NEW_TOKEN frame (RFC 9000 §8.1.3) once a connection's handshake completed: its
/// token, bound to the client's IP, lets the client's next connection skip the Retry.
fn send_new_token(conn: &mut Connection, keys: &EdgeKeys, metrics: &WorkerMetrics) {
    conn.new_token_sent = true;
    let token = retry::seal_new_token(keys, conn.peer.ip(), SystemTime::now());
    match conn.quic.send_new_token(&token) {
        Ok(()) => metrics.new_tokens_sent.increment(1),
        Err(e) => tracing::debug!(error = %e, "queuing a NEW_TOKEN failed"),
    }
}

fn mark_dirty(dirty: &mut Vec<u64>, conn: &mut Connection) {
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(conn.handle);
    }
}

// Entry points for `crate::fuzzing` (the `datagram_entry` and `reload_apply` fuzz targets
// and their regression tests), kept in their own block, apart from the loop above.
impl Worker {
    /// One turn of the loop (without its wait), timers firing as if `ahead` had passed.
    pub async fn turn_ahead(&mut self, ahead: Duration) {
        self.turn(ahead).await;
    }

    /// Applies what the control thread sent, as the loop does between turns.
    pub fn handle_control_now(&mut self) {
        self.handle_control();
    }

    /// The version of the snapshot in use.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Handles one datagram received on socket `si` from `from`, exactly as the loop does
    /// (`on_datagram`): parse, steer, admit, and feed to quiche.
    pub fn receive_datagram(&mut self, si: usize, pkt: &mut [u8], from: SocketAddr) {
        self.on_datagram(si, pkt, from, false);
    }

    /// How many connections the worker holds.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Request-body bytes charged to the worker's budget.
    pub fn body_bytes_held(&self) -> usize {
        self.ctx.body_budget.held()
    }
}
