//! Per-worker pool of HTTP/2 connections to each backend, opened on first use.
//!
//! A request takes the first live connection that has a free stream slot (fewer of our
//! requests in flight than the server's `SETTINGS_MAX_CONCURRENT_STREAMS`) and receive window
//! left (responses whose clients read slowly hold less than the connection window minus one
//! stream window); when none does a new connection opens, up to
//! `upstream_h2.max_connections_per_backend`; beyond that the one with the most window left is
//! used and h2 queues the stream until a slot frees. A connection drops out of the pool the
//! moment it stops taking new streams — a GOAWAY was received (h2 then refuses new streams on
//! it) or it closed — so the next request opens its replacement while the requests in flight
//! on the old one finish. A connection also retires after `max_requests_per_connection`
//! requests (1000, as nginx's own upstream keepalive does), before stock backends reach their
//! limit and end it themselves: hypercorn (hyper-h2) treats every frame that arrives after its
//! GOAWAY, even for streams it is still serving, as a protocol error and drops the connection
//! with them. A connection that carried no request for `idle_timeout` (3 s) is closed, before
//! a backend's own idle timeout (hypercorn: 5 s) can close it under a request on its way. A
//! keepalive PING every `keepalive_interval` closes a connection whose
//! peer stopped answering.

use super::tls::TlsUpstream;
use crate::config::UpstreamTls;
use bytes::Bytes;
use futures::future::{FutureExt, LocalBoxFuture, Shared};
use h2::client::SendRequest;
use monoio::io::IntoPollIo;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

/// HTTP/2 client settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_connections: usize,
    pub max_requests: usize,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Settings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        let h2 = &c.upstream_h2;
        Settings {
            connect_timeout: c.timeouts.connect.0,
            stream_window: h2.stream_window.0 as u32,
            connection_window: h2.connection_window.0 as u32,
            max_frame_size: h2.max_frame_size.0 as u32,
            max_connections: h2.max_connections_per_backend,
            max_requests: h2.max_requests_per_connection,
            keepalive_interval: h2.keepalive_interval.0,
            keepalive_timeout: h2.keepalive_timeout.0,
            idle_timeout: h2.idle_timeout.0,
        }
    }
}

/// Why a backend connection could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused")]
    Refused,
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(String),
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(String),
    #[error("{0}")]
    Tls(String),
}

impl ConnectError {
    /// The status the client gets: 504 when the backend did not answer in time, else 502.
    pub fn status(&self) -> http::StatusCode {
        match self {
            ConnectError::Timeout => http::StatusCode::GATEWAY_TIMEOUT,
            _ => http::StatusCode::BAD_GATEWAY,
        }
    }
}

/// One pooled connection.
#[derive(Clone)]
struct Conn {
    sender: SendRequest<Bytes>,
    /// Cleared by the connection's task when it ends.
    alive: Rc<Cell<bool>>,
    /// Our requests in flight on it.
    in_flight: Rc<Cell<usize>>,
    /// Requests it was lent for, ever.
    lent: Rc<Cell<usize>>,
    /// Response bytes received on it that their clients have not accepted yet: they hold the
    /// connection's receive window (see [`crate::bridge::exchange::ResponseCredit`]).
    held: Rc<Cell<usize>>,
}

impl Conn {
    fn has_free_slot(&self) -> bool {
        self.in_flight.get() < self.sender.current_max_send_streams()
    }

    /// Whether a new stream could still get a whole stream window of response.
    fn has_window(&self, s: &Settings) -> bool {
        self.held.get() + s.stream_window as usize <= s.connection_window as usize
    }

    /// Whether it may carry another request: false once it carried `max_requests`, the peer
    /// sent GOAWAY, or the connection failed (h2 opens no stream then; the pool's own handle
    /// never has a stream pending, so asking never registers the waker).
    fn takes_streams(&mut self, s: &Settings) -> bool {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        self.alive.get()
            && self.lent.get() < s.max_requests
            && matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }
}

/// A connection lent to one request; counts the request on the connection while it lives.
pub struct Pooled {
    pub sender: SendRequest<Bytes>,
    conn: Conn,
}

impl Pooled {
    fn lend(conn: &Conn) -> Self {
        conn.in_flight.set(conn.in_flight.get() + 1);
        conn.lent.set(conn.lent.get() + 1);
        Pooled { sender: conn.sender.clone(), conn: conn.clone() }
    }

    /// The connection's count of response bytes held against its window.
    pub fn held_bytes(&self) -> Rc<Cell<usize>> {
        self.conn.held.clone()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.conn.in_flight.set(self.conn.in_flight.get() - 1);
    }
}

type Connecting = Shared<LocalBoxFuture<'static, Result<Conn, ConnectError>>>;

#[derive(Default)]
struct Slot {
    conns: Vec<Conn>,
    connecting: Option<Connecting>,
}

/// A pool slot: a backend address, and the TLS settings it is reached with (none: h2c).
type Key = (SocketAddr, Option<UpstreamTls>);

pub struct ConnectionPool {
    settings: Settings,
    slots: HashMap<Key, Slot>,
}

impl ConnectionPool {
    pub fn new(settings: Settings) -> Self {
        ConnectionPool { settings, slots: HashMap::new() }
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Drops connections to backends not in `keep` (removed by a reload). Requests in flight
    /// on them finish; a connection closes when its last handle goes.
    pub fn retain(&mut self, keep: &[SocketAddr]) {
        self.slots.retain(|(addr, _), _| keep.contains(addr));
    }

    /// Drops `conn`'s connection from the pool (it failed before a request could be sent on
    /// it), so requests use or open another.
    pub fn forget(&mut self, conn: &Pooled) {
        for slot in self.slots.values_mut() {
            slot.conns.retain(|c| !Rc::ptr_eq(&c.alive, &conn.conn.alive));
        }
    }
}

/// A connection to `addr` for one request (see the module doc for which).
pub async fn connection(
    pool: &RefCell<ConnectionPool>,
    addr: SocketAddr,
    tls: Option<&Rc<TlsUpstream>>,
) -> Result<Pooled, ConnectError> {
    let key = (addr, tls.map(|t| t.config.clone()));
    loop {
        let pending = {
            let mut p = pool.borrow_mut();
            let settings = p.settings;
            let slot = p.slots.entry(key.clone()).or_default();
            slot.conns.retain_mut(|c| c.takes_streams(&settings));
            if let Some(c) = slot.conns.iter().find(|c| c.has_free_slot() && c.has_window(&settings)) {
                return Ok(Pooled::lend(c));
            }
            match &slot.connecting {
                Some(f) => f.clone(),
                None if slot.conns.len() < settings.max_connections => {
                    metrics::counter!("spooky_upstream_connects_total").increment(1);
                    let f = open(addr, settings, tls.cloned()).boxed_local().shared();
                    slot.connecting = Some(f.clone());
                    f
                }
                None => {
                    let least = slot
                        .conns
                        .iter()
                        .min_by_key(|c| (c.held.get(), c.in_flight.get()))
                        .expect("at the limit: not empty");
                    return Ok(Pooled::lend(least));
                }
            }
        };
        let result = pending.clone().await;
        let mut p = pool.borrow_mut();
        let slot = p.slots.entry(key.clone()).or_default();
        // The first waiter to finish records the outcome, unless the slot moved on meanwhile.
        if slot.connecting.as_ref().is_some_and(|f| f.ptr_eq(&pending)) {
            slot.connecting = None;
            if let Ok(c) = &result {
                slot.conns.push(c.clone());
            }
        }
        // Every waiter then chooses again: the new connection may not have room for all.
        result?;
    }
}

/// Opens a new, unpooled HTTP/2 connection (health checks use this).
pub async fn connect(addr: SocketAddr, s: Settings, tls: Option<Rc<TlsUpstream>>) -> Result<Pooled, ConnectError> {
    open(addr, s, tls).await.map(|c| Pooled::lend(&c))
}

/// TCP connect (+ TLS) + HTTP/2 handshake within the connect timeout; spawns the task that
/// drives the connection and keeps it alive.
async fn open(addr: SocketAddr, s: Settings, tls: Option<Rc<TlsUpstream>>) -> Result<Conn, ConnectError> {
    let open = async move {
        let tcp = monoio::net::TcpStream::connect_addr(addr).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ConnectError::Refused,
            std::io::ErrorKind::TimedOut => ConnectError::Timeout,
            _ => ConnectError::Io(e.to_string()),
        })?;
        let _ = tcp.set_nodelay(true);
        let io = tcp.into_poll_io().map_err(|e| ConnectError::Io(e.to_string()))?;
        match tls {
            None => handshake(addr, io, s).await,
            Some(tls) => {
                let io = tls.handshake(&addr.ip().to_string(), io).await.map_err(ConnectError::Tls)?;
                handshake(addr, io, s).await
            }
        }
    };
    match monoio::time::timeout(s.connect_timeout, open).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// The HTTP/2 handshake over `io`, and the task that drives the connection.
async fn handshake<IO>(addr: SocketAddr, io: IO, s: Settings) -> Result<Conn, ConnectError>
where
    IO: monoio::io::poll_io::AsyncRead + monoio::io::poll_io::AsyncWrite + Unpin + 'static,
{
    let (sender, mut conn) = h2::client::Builder::new()
        .initial_window_size(s.stream_window)
        .initial_connection_window_size(s.connection_window)
        .max_frame_size(s.max_frame_size)
        .enable_push(false)
        // Until the server's SETTINGS arrive (one round trip), open one stream only: a burst
        // on a cold connection then waits or spreads over new connections instead of
        // overrunning a small limit and being refused.
        .initial_max_send_streams(1)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let c = Conn {
        sender,
        alive: Rc::new(Cell::new(true)),
        in_flight: Rc::default(),
        lent: Rc::default(),
        held: Rc::default(),
    };
    let (flag, in_flight, lent) = (c.alive.clone(), c.in_flight.clone(), c.lent.clone());
    let ping = conn.ping_pong();
    monoio::spawn(async move {
        let mut conn = pin!(conn);
        let mut keepalive = pin!(keepalive(ping, s.keepalive_interval, s.keepalive_timeout));
        let mut idle = pin!(idle(in_flight, lent, s.idle_timeout));
        // Drive the connection until it ends, stops answering PINGs or goes unused; dropping
        // it closes the socket and fails its remaining streams (an idle one has none).
        let outcome = poll_fn(|cx| {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(r.err().map(|e| e.to_string()));
            }
            if idle.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            keepalive.as_mut().poll(cx).map(|()| Some("keepalive PING unanswered".to_string()))
        })
        .await;
        if let Some(e) = outcome {
            tracing::debug!(%addr, error = %e, "upstream connection ended");
        }
        flag.set(false);
    });
    Ok(c)
}

/// Resolves once the connection has carried no request for `timeout` (never, when 0).
/// Spooky closes idle connections before backends do: a backend that closes one (hypercorn
/// after 5 s) can do so just as a new request is on its way, which then fails unprocessed
/// but indistinguishable from a processed one. (Resolution: a quarter of the timeout.)
async fn idle(in_flight: Rc<Cell<usize>>, lent: Rc<Cell<usize>>, timeout: Duration) {
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let tick = (timeout / 4).max(Duration::from_millis(10));
    let (mut seen, mut since) = (lent.get(), std::time::Instant::now());
    loop {
        monoio::time::sleep(tick).await;
        if in_flight.get() > 0 || lent.get() != seen {
            (seen, since) = (lent.get(), std::time::Instant::now());
        } else if since.elapsed() >= timeout {
            return;
        }
    }
}

/// Resolves when a PING goes unanswered for `timeout` (never, when keepalive is off).
async fn keepalive(ping: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut ping) = ping.filter(|_| !interval.is_zero()) else { return std::future::pending().await };
    loop {
        monoio::time::sleep(interval).await;
        let answered = monoio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await;
        if !matches!(answered, Ok(Ok(_))) {
            metrics::counter!("spooky_upstream_keepalive_failures_total").increment(1);
            return;
        }
    }
}
