//! A worker's event loop: one thread, one monoio runtime, its own sockets, connections, HTTP/2
//! pool and balancers. Nothing here is shared with other workers.
//!
//! Each turn, in this order:
//! 1. receive: drain every socket (bounded batch) and feed the datagrams to their connections;
//! 2. timers: fire quiche timeouts that are due;
//! 3. upstream news: drive the streams whose upstream task queued data or failed;
//! 4. flush: send every packet the touched connections have, reschedule their timers, reap
//!    closed ones;
//! 5. wait for the first of: a readable socket, the earliest timer, upstream news.
//!
//! The loop sleeps only in step 5, so a response never waits for the next client packet and
//! nothing polls on an interval.

use super::cid::{CidGenerator, CID_LEN};
use super::connection::Connection;
use super::socket::EdgeSocket;
use crate::bridge::exchange::{Notifier, StreamKey};
use crate::config::HeaderPolicy;
use crate::route::Router;
use crate::transport::Upstreams;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::Instant;

/// Datagrams read from one socket before other work gets a turn.
const RECV_BATCH: usize = 64;
/// Largest datagram accepted (GRO can deliver up to 64 KiB later on).
const RECV_BUF: usize = 65_535;

/// What connections need from their worker while handling events.
pub struct WorkerCtx {
    pub h3_config: quiche::h3::Config,
    pub notifier: Rc<Notifier>,
    pub router: Router,
    pub upstreams: Rc<Upstreams>,
    pub header_policy: HeaderPolicy,
}

pub struct Worker {
    id: usize,
    sockets: Vec<EdgeSocket>,
    quic_config: quiche::Config,
    ctx: WorkerCtx,
    conns: HashMap<u64, Connection>,
    by_cid: HashMap<Vec<u8>, u64>,
    next_handle: u64,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    dirty: Vec<u64>,
    cids: CidGenerator,
    via_name: Rc<str>,
    send_buf: Vec<u8>,
}

impl Worker {
    pub fn new(
        id: usize,
        sockets: Vec<EdgeSocket>,
        quic_config: quiche::Config,
        ctx: WorkerCtx,
        cids: CidGenerator,
    ) -> Self {
        let via_name: Rc<str> = ctx.header_policy.via_name.as_str().into();
        Worker {
            id,
            sockets,
            quic_config,
            ctx,
            conns: HashMap::new(),
            by_cid: HashMap::new(),
            next_handle: 0,
            timers: BinaryHeap::new(),
            dirty: Vec::new(),
            cids,
            via_name,
            send_buf: vec![0; 65_535],
        }
    }

    /// Runs the loop forever (until the process exits).
    pub async fn run(mut self) {
        tracing::info!(
            worker = self.id,
            sockets = self.sockets.len(),
            "worker ready"
        );
        let mut buf = vec![0u8; RECV_BUF];
        let mut news = Vec::new();
        loop {
            let more_waiting = self.receive(&mut buf);
            self.fire_timers();
            self.ctx.notifier.drain(&mut news);
            for key in news.drain(..) {
                self.on_news(key);
            }
            self.flush().await;
            if more_waiting {
                // Let upstream tasks run before the next batch.
                yield_now().await;
                continue;
            }
            self.wait().await;
        }
    }

    /// Reads up to a batch from every socket; true if a socket may have more.
    fn receive(&mut self, buf: &mut [u8]) -> bool {
        let mut more = false;
        for si in 0..self.sockets.len() {
            let mut n = 0;
            while n < RECV_BATCH {
                match self.sockets[si].io.recv_from(buf) {
                    Ok((len, from)) => {
                        n += 1;
                        self.on_datagram(si, &mut buf[..len], from);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "UDP receive failed");
                        break;
                    }
                }
            }
            more |= n == RECV_BATCH;
        }
        more
    }

    fn on_datagram(&mut self, si: usize, pkt: &mut [u8], from: SocketAddr) {
        let hdr = match quiche::Header::from_slice(pkt, CID_LEN) {
            Ok(h) => h,
            Err(_) => {
                metrics::counter!("spooky_packets_dropped_total", "reason" => "unparseable")
                    .increment(1);
                return;
            }
        };
        let handle = match self.by_cid.get(hdr.dcid.as_ref()) {
            Some(h) => *h,
            None => match self.accept(si, &hdr, pkt.len(), from) {
                Some(h) => h,
                None => return,
            },
        };
        let local = self.sockets[si].local;
        let conn = self
            .conns
            .get_mut(&handle)
            .expect("CID table points at live connections");
        if let Err(e) = conn.quic.recv(pkt, quiche::RecvInfo { from, to: local }) {
            tracing::trace!(error = %e, "packet rejected by quiche");
            metrics::counter!("spooky_packets_dropped_total", "reason" => "rejected").increment(1);
        }
        conn.peer = from;
        conn.on_input(&self.ctx);
        mark_dirty(&mut self.dirty, conn);
    }

    /// Handles a packet for an unknown CID: a new connection if it is a valid Initial.
    fn accept(
        &mut self,
        si: usize,
        hdr: &quiche::Header<'_>,
        len: usize,
        from: SocketAddr,
    ) -> Option<u64> {
        if hdr.ty != quiche::Type::Initial {
            metrics::counter!("spooky_packets_dropped_total", "reason" => "unknown_cid")
                .increment(1);
            return None;
        }
        if !quiche::version_is_supported(hdr.version) {
            let n = quiche::negotiate_version(&hdr.scid, &hdr.dcid, &mut self.send_buf).ok()?;
            let _ = self.sockets[si].io.send_to(&self.send_buf[..n], from);
            metrics::counter!("spooky_version_negotiations_total").increment(1);
            return None;
        }
        // RFC 9000 §14.1: Initial datagrams from clients are at least 1200 bytes.
        if len < 1200 {
            metrics::counter!("spooky_packets_dropped_total", "reason" => "short_initial")
                .increment(1);
            return None;
        }
        let scid = self.cids.generate();
        let local = self.sockets[si].local;
        let quic = match quiche::accept(
            &quiche::ConnectionId::from_ref(&scid),
            None,
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
        let mut conn = Connection::new(handle, quic, from, si, self.via_name.clone());
        // The client keeps using its original DCID until it sees ours: map both.
        conn.cids = vec![scid.to_vec(), hdr.dcid.to_vec()];
        for cid in &conn.cids {
            self.by_cid.insert(cid.clone(), handle);
        }
        self.conns.insert(handle, conn);
        metrics::counter!("spooky_connections_accepted_total").increment(1);
        metrics::gauge!("spooky_connections_active", "worker" => self.id.to_string())
            .increment(1.0);
        Some(handle)
    }

    fn on_news(&mut self, key: StreamKey) {
        if let Some(conn) = self.conns.get_mut(&key.conn) {
            conn.on_exchange_news(&self.ctx, key.stream);
            mark_dirty(&mut self.dirty, conn);
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, handle))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            // Entries are never removed from the heap; only the latest deadline counts.
            if conn.deadline != Some(at) {
                continue;
            }
            conn.deadline = None;
            conn.quic.on_timeout();
            conn.on_input(&self.ctx);
            mark_dirty(&mut self.dirty, conn);
        }
    }

    /// Sends what every touched connection has queued; reschedules timers; reaps closed ones.
    async fn flush(&mut self) {
        while let Some(handle) = self.dirty.pop() {
            let Some(conn) = self.conns.get_mut(&handle) else {
                continue;
            };
            conn.dirty = false;
            let socket = &self.sockets[conn.socket];
            loop {
                match conn.quic.send(&mut self.send_buf) {
                    Ok((n, info)) => {
                        if let Err(e) = socket.send_to(&self.send_buf[..n], info.to).await {
                            tracing::debug!(error = %e, to = %info.to, "UDP send failed");
                        }
                    }
                    Err(quiche::Error::Done) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "quiche send failed");
                        let _ = conn.quic.close(false, 0x1, b"internal");
                        break;
                    }
                }
            }
            if conn.quic.is_closed() {
                self.remove(handle);
                continue;
            }
            let deadline = conn.quic.timeout().map(|d| Instant::now() + d);
            if deadline != conn.deadline {
                conn.deadline = deadline;
                if let Some(at) = deadline {
                    self.timers.push(Reverse((at, handle)));
                }
            }
        }
    }

    fn remove(&mut self, handle: u64) {
        if let Some(mut conn) = self.conns.remove(&handle) {
            for cid in &conn.cids {
                self.by_cid.remove(cid);
            }
            conn.cancel_all();
            metrics::gauge!("spooky_connections_active", "worker" => self.id.to_string())
                .decrement(1.0);
        }
    }

    /// Sleeps until a socket is readable, the earliest timer is due, or upstream news arrives.
    async fn wait(&mut self) {
        while let Some(Reverse((at, handle))) = self.timers.peek().copied() {
            if self
                .conns
                .get(&handle)
                .is_some_and(|c| c.deadline == Some(at))
            {
                break;
            }
            self.timers.pop();
        }
        let deadline = self.timers.peek().map(|Reverse((at, _))| *at);
        let mut sleep = pin!(async move {
            match deadline {
                Some(at) => monoio::time::sleep_until(monoio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        });
        let mut readable: Vec<_> = self
            .sockets
            .iter()
            .map(|s| Box::pin(s.readable()))
            .collect();
        let notifier = self.ctx.notifier.clone();
        poll_fn(|cx| {
            if notifier.poll_ready(cx).is_ready() || sleep.as_mut().poll(cx).is_ready() {
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

fn mark_dirty(dirty: &mut Vec<u64>, conn: &mut Connection) {
    if !conn.dirty {
        conn.dirty = true;
        dirty.push(conn.handle);
    }
}

/// Gives other tasks on this runtime one turn.
async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}
