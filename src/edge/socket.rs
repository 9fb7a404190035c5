//! The worker's UDP sockets: bound with `SO_REUSEPORT` so every worker has its own socket on the
//! same address, created in worker order at start-up and never closed while Spooky runs (the
//! kernel's reuseport group index is the join order).

use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, UdpSocket};

/// A worker's socket: `io` for non-blocking syscalls, `ready` (same file, dup'ed) for awaiting
/// readiness on the worker's runtime.
pub struct EdgeSocket {
    pub io: UdpSocket,
    pub local: SocketAddr,
    ready: monoio::net::udp::UdpSocket,
}

/// Binds one reuseport UDP socket on `addr` (call once per worker, in worker order).
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    // Large buffers absorb bursts while the worker is busy; the kernel caps them at rmem_max.
    socket.set_recv_buffer_size(8 << 20).ok();
    socket.set_send_buffer_size(8 << 20).ok();
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

impl EdgeSocket {
    /// Wraps a bound socket; must run on the worker's runtime, which it registers with.
    pub fn new(io: UdpSocket) -> std::io::Result<Self> {
        let local = io.local_addr()?;
        let ready = monoio::net::udp::UdpSocket::from_std(io.try_clone()?)?;
        Ok(EdgeSocket { io, local, ready })
    }

    pub async fn readable(&self) -> std::io::Result<()> {
        self.ready.readable(false).await
    }

    pub async fn writable(&self) -> std::io::Result<()> {
        self.ready.writable(false).await
    }

    /// Sends one datagram, waiting for buffer space if the kernel is full.
    pub async fn send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<()> {
        loop {
            match self.io.send_to(buf, to) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
    }
}
