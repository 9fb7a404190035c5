//! The worker's UDP sockets: bound with `SO_REUSEPORT` so every worker has its own socket on the
//! same address, created in worker order at start-up and never closed while Spooky runs (the
//! kernel's reuseport group index is the join order).

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::cell::Cell;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

/// Most datagrams the kernel accepts in one GSO send (UDP_MAX_SEGMENTS).
pub const GSO_MAX_SEGMENTS: usize = 64;

/// A worker's socket: `io` for non-blocking syscalls, `ready` (same file, dup'ed) for awaiting
/// readiness on the worker's runtime.
pub struct EdgeSocket {
    pub io: UdpSocket,
    pub local: SocketAddr,
    ready: monoio::net::udp::UdpSocket,
    /// UDP GSO in use; cleared for good if the kernel refuses it.
    gso: Cell<bool>,
    /// UDP GRO enabled on the socket: reads may return trains of datagrams.
    gro: bool,
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
    /// With `gro`, asks the kernel to coalesce received datagrams (falls back if it refuses).
    pub fn new(io: UdpSocket, gso: bool, gro: bool) -> std::io::Result<Self> {
        let local = io.local_addr()?;
        let ready = monoio::net::udp::UdpSocket::from_std(io.try_clone()?)?;
        let gro = gro
            && {
                let on: libc::c_int = 1;
                // SAFETY: a valid int option for the duration of the call.
                let rc = unsafe {
                    libc::setsockopt(
                        io.as_raw_fd(),
                        libc::SOL_UDP,
                        libc::UDP_GRO,
                        &on as *const libc::c_int as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc < 0 {
                    tracing::warn!(error = %std::io::Error::last_os_error(), "UDP GRO refused by the kernel; reading datagrams one by one");
                }
                rc == 0
            };
        Ok(EdgeSocket { io, local, ready, gso: Cell::new(gso), gro })
    }

    /// Reads one datagram — or, with GRO, a train of datagrams from one sender that the
    /// kernel coalesced — into `buf`: (bytes, sender, segment size). Every datagram of a train
    /// is `segment` bytes except perhaps the last. Non-blocking.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, usize)> {
        // SAFETY: sockaddr_storage and msghdr are plain data; every pointer placed in `msg`
        // outlives the recvmsg call, and the control buffer is 8-byte aligned.
        unsafe {
            let mut storage = socket2::SockAddrStorage::zeroed();
            let addr = storage.view_as::<libc::sockaddr_storage>();
            let mut iov = libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() };
            let mut control = [0u64; 8];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = addr as *mut libc::sockaddr_storage as *mut libc::c_void;
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if self.gro {
                msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = std::mem::size_of_val(&control);
            }
            let n = libc::recvmsg(self.io.as_raw_fd(), &mut msg, 0);
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = n as usize;
            let mut segment = n;
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
                    let size = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int);
                    segment = (size as usize).clamp(1, n.max(1));
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            let from = SockAddr::new(storage, msg.msg_namelen)
                .as_socket()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "sender is not an IP address"))?;
            Ok((n, from, segment))
        }
    }

    /// Sends `buf`, a run of datagrams of `segment` bytes each (the last may be shorter), to
    /// `to`: with UDP GSO one system call for all of them, else one each.
    pub async fn send_batch(&self, buf: &[u8], segment: usize, to: SocketAddr) -> std::io::Result<()> {
        if buf.len() > segment && self.gso.get() {
            loop {
                match send_gso(&self.io, buf, segment, to) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.writable().await?,
                    // EIO: the device cannot segment; EINVAL: the kernel has no UDP_SEGMENT.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)) => {
                        tracing::warn!(error = %e, "UDP GSO refused by the kernel; sending datagrams one by one");
                        self.gso.set(false);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for datagram in buf.chunks(segment) {
            self.send_to(datagram, to).await?;
        }
        Ok(())
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

/// One `sendmsg` with a `UDP_SEGMENT` control message: the kernel splits `buf` into datagrams
/// of `segment` bytes (the last may be shorter).
pub fn send_gso(socket: &UdpSocket, buf: &[u8], segment: usize, to: SocketAddr) -> std::io::Result<()> {
    let addr = SockAddr::from(to);
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) } as usize;
    let mut control = [0u64; 4]; // 8-byte aligned, larger than `space`
    debug_assert!(space <= std::mem::size_of_val(&control));
    // SAFETY: msghdr is plain data; every pointer in it outlives the sendmsg call below.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = addr.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment as u16);
        if libc::sendmsg(socket.as_raw_fd(), &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
