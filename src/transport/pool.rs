//! Per-worker pool of HTTP/2 connections, one per backend, opened on first use.

use bytes::Bytes;
use futures::future::{FutureExt, LocalBoxFuture, Shared};
use h2::client::SendRequest;
use monoio::io::IntoPollIo;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

/// HTTP/2 client settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
}

impl Settings {
    pub fn from_config(c: &crate::config::Config) -> Self {
        Settings {
            connect_timeout: c.timeouts.connect.0,
            stream_window: c.upstream_h2.stream_window.0 as u32,
            connection_window: c.upstream_h2.connection_window.0 as u32,
            max_frame_size: c.upstream_h2.max_frame_size.0 as u32,
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

/// A live connection: the request handle and a flag the connection task clears when it ends.
#[derive(Clone)]
pub struct Pooled {
    pub sender: SendRequest<Bytes>,
    alive: Rc<Cell<bool>>,
}

type Connecting = Shared<LocalBoxFuture<'static, Result<Pooled, ConnectError>>>;

enum Slot {
    Connecting(Connecting),
    Ready(Pooled),
}

pub struct ConnectionPool {
    settings: Settings,
    slots: HashMap<SocketAddr, Slot>,
}

impl ConnectionPool {
    pub fn new(settings: Settings) -> Self {
        ConnectionPool { settings, slots: HashMap::new() }
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Drops connections to backends not in `keep` (removed by a reload). Requests in flight
    /// on them finish; the connection closes when its last handle goes.
    pub fn retain(&mut self, keep: &[SocketAddr]) {
        self.slots.retain(|addr, _| keep.contains(addr));
    }

    /// Drops `conn` from the pool if it is still the one pooled for `addr` (it failed before a
    /// request could be sent on it), so the next request opens a fresh connection.
    pub fn forget(&mut self, addr: SocketAddr, conn: &Pooled) {
        if let Some(Slot::Ready(p)) = self.slots.get(&addr) {
            if Rc::ptr_eq(&p.alive, &conn.alive) {
                self.slots.remove(&addr);
            }
        }
    }
}

/// A connection to `addr`: the pooled one if alive, else the one being opened (shared by every
/// request that asks meanwhile), else a new one.
pub async fn connection(pool: &RefCell<ConnectionPool>, addr: SocketAddr) -> Result<Pooled, ConnectError> {
    let pending = {
        let mut p = pool.borrow_mut();
        match p.slots.get(&addr) {
            Some(Slot::Ready(c)) if c.alive.get() => return Ok(c.clone()),
            Some(Slot::Connecting(f)) => f.clone(),
            _ => {
                metrics::counter!("spooky_upstream_connects_total").increment(1);
                let f = connect(addr, p.settings).boxed_local().shared();
                p.slots.insert(addr, Slot::Connecting(f.clone()));
                f
            }
        }
    };
    let result = pending.clone().await;
    let mut p = pool.borrow_mut();
    // The first waiter to finish records the outcome, unless the slot moved on meanwhile.
    if let Some(Slot::Connecting(f)) = p.slots.get(&addr) {
        if f.ptr_eq(&pending) {
            match &result {
                Ok(c) => p.slots.insert(addr, Slot::Ready(c.clone())),
                Err(_) => p.slots.remove(&addr),
            };
        }
    }
    result
}

/// Opens a new HTTP/2 connection (TCP connect + handshake within the connect timeout) and
/// spawns the task that drives it.
pub async fn connect(addr: SocketAddr, s: Settings) -> Result<Pooled, ConnectError> {
    let open = async move {
        let tcp = monoio::net::TcpStream::connect_addr(addr).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ConnectError::Refused,
            std::io::ErrorKind::TimedOut => ConnectError::Timeout,
            _ => ConnectError::Io(e.to_string()),
        })?;
        let _ = tcp.set_nodelay(true);
        let io = tcp.into_poll_io().map_err(|e| ConnectError::Io(e.to_string()))?;
        let (sender, conn) = h2::client::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| ConnectError::Handshake(e.to_string()))?;
        let alive = Rc::new(Cell::new(true));
        let flag = alive.clone();
        monoio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "upstream connection ended");
            }
            flag.set(false);
        });
        Ok(Pooled { sender, alive })
    };
    match monoio::time::timeout(s.connect_timeout, open).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}
