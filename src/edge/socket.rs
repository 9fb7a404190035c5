//! The worker's UDP sockets: bound with `SO_REUSEPORT` so every worker has its own socket on the
//! same address, created in worker order at start-up and never closed while Spooky runs (the
//! kernel's reuseport group index is the join order).
//!
//! The kernel's UDP offloads do the per-datagram work where it allows: GSO splits a run of
//! equal-size datagrams on send, GRO hands over trains of datagrams on receive, and SO_TXTIME
//! lets an `fq`/`etf` qdisc release paced packets at quiche's chosen time. Each is switched off
//! by itself, with one log line, where the kernel refuses it.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::cell::Cell;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Most datagrams the kernel accepts in one GSO send (UDP_MAX_SEGMENTS).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// `SO_TXTIME`, which is also the `SCM_TXTIME` control message type (asm-generic/socket.h).
const SO_TXTIME: libc::c_int = 61;
/// Release times closer than this are not worth a qdisc timer: sent at once.
pub const PACING_SLACK: Duration = Duration::from_micros(250);

/// A worker's socket: `io` for non-blocking syscalls, `ready` (same file, dup'ed) for awaiting
/// readiness on the worker's runtime.
pub struct EdgeSocket {
    pub io: UdpSocket,
    pub local: SocketAddr,
    ready: monoio::net::udp::UdpSocket,
    /// UDP GSO in use; cleared for good if the kernel refuses it.
    gso: Cell<bool>,
    /// UDP GRO enabled: reads may return trains of datagrams.
    gro: bool,
    /// SO_TXTIME enabled: sends carry their pacing release time.
    txtime: bool,
}

/// Socket buffer Spooky asks for in each direction: absorbs bursts while the worker is busy.
pub const SOCKET_BUFFER: usize = 8 << 20;
/// SO_SNDBUFFORCE and SO_RCVBUFFORCE (asm-generic/socket.h): the same options, past
/// `net.core.{w,r}mem_max`, for a process with CAP_NET_ADMIN.
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;

/// Binds one reuseport UDP socket on `addr` (call once per worker, in worker order).
pub fn bind_reuseport(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    // The kernel caps these at net.core.rmem_max / wmem_max (often 208 KiB); with
    // CAP_NET_ADMIN the FORCE options go past the cap, as quic-go does.
    socket.set_recv_buffer_size(SOCKET_BUFFER).ok();
    socket.set_send_buffer_size(SOCKET_BUFFER).ok();
    // (Linux reports twice the size granted: the other half is its bookkeeping.)
    // Refused (EPERM) without the capability: `buffer_shortfall` reports what that leaves.
    let wanted = SOCKET_BUFFER as libc::c_int;
    if socket.recv_buffer_size().is_ok_and(|n| n / 2 < SOCKET_BUFFER) {
        let _ = set_option(&socket, libc::SOL_SOCKET, SO_RCVBUFFORCE, &wanted);
    }
    if socket.send_buffer_size().is_ok_and(|n| n / 2 < SOCKET_BUFFER) {
        let _ = set_option(&socket, libc::SOL_SOCKET, SO_SNDBUFFORCE, &wanted);
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// What is wrong with a bound socket's buffers, if they are smaller than Spooky asked for:
/// one line naming the sysctl to raise (`None` when they are large enough).
pub fn buffer_shortfall(socket: &UdpSocket) -> Option<String> {
    let socket = socket2::SockRef::from(socket);
    let got = |n: std::io::Result<usize>| n.map(|n| n / 2).unwrap_or(0);
    let (recv, send) = (got(socket.recv_buffer_size()), got(socket.send_buffer_size()));
    let short: Vec<String> = [("receive", "rmem_max", recv), ("send", "wmem_max", send)]
        .into_iter()
        .filter(|&(_, _, n)| n < SOCKET_BUFFER)
        .map(|(dir, sysctl, n)| format!("{dir} buffer {} KiB (net.core.{sysctl})", n >> 10))
        .collect();
    (!short.is_empty()).then(|| {
        format!(
            "UDP socket buffers are smaller than the {} MiB Spooky asks for: {}; bursts will be dropped \
             while a worker is busy. Raise the limits: sysctl -w net.core.rmem_max={SOCKET_BUFFER} \
             net.core.wmem_max={SOCKET_BUFFER} (or run with CAP_NET_ADMIN)",
            SOCKET_BUFFER >> 20,
            short.join(", ")
        )
    })
}

/// Which offloads a socket should try.
#[derive(Clone, Copy, Debug)]
pub struct Offloads {
    pub gso: bool,
    pub gro: bool,
    /// Carry release times in `SO_TXTIME` (only where the egress qdisc enforces them).
    pub txtime: bool,
}

impl EdgeSocket {
    /// Wraps a bound socket; must run on the worker's runtime, which it registers with.
    pub fn new(io: UdpSocket, want: Offloads) -> std::io::Result<Self> {
        let local = io.local_addr()?;
        let ready = monoio::net::udp::UdpSocket::from_std(io.try_clone()?)?;
        let gro = want.gro && enable_gro(&io);
        let clock = libc::sock_txtime { clockid: libc::CLOCK_MONOTONIC, flags: 0 };
        let txtime = want.txtime && enable(&io, libc::SOL_SOCKET, SO_TXTIME, &clock, "SO_TXTIME pacing");
        Ok(EdgeSocket { io, local, ready, gso: Cell::new(want.gso), gro, txtime })
    }

    /// Reads one datagram — or, with GRO, a train of datagrams from one sender that the
    /// kernel coalesced — into `buf`: (bytes, sender, segment size). Non-blocking.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr, usize)> {
        recv_train(&self.io, buf, self.gro)
    }

    /// Sends `buf`, a run of datagrams of `segment` bytes each (the last may be shorter), to
    /// `to`, to be released at `at` where the qdisc paces: with UDP GSO one system call for
    /// the run, else one per datagram.
    pub async fn send_batch(&self, buf: &[u8], segment: usize, to: SocketAddr, at: Instant) -> std::io::Result<()> {
        let txtime = if self.txtime { release_time(at) } else { None };
        let gso = buf.len() > segment && self.gso.get();
        if !gso && txtime.is_none() {
            for datagram in buf.chunks(segment) {
                self.send_to(datagram, to).await?;
            }
            return Ok(());
        }
        let pieces = if gso { buf.len() } else { segment };
        for piece in buf.chunks(pieces) {
            loop {
                match send_msg(&self.io, piece, gso.then_some(segment), txtime, to) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.writable().await?,
                    // EIO: the device cannot segment; EINVAL: the kernel has no UDP_SEGMENT.
                    Err(e) if gso && matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL)) => {
                        tracing::warn!(error = %e, "UDP GSO refused by the kernel; sending datagrams one by one");
                        self.gso.set(false);
                        return Box::pin(self.send_batch(buf, segment, to, at)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Sends carry their release time for the qdisc.
    pub fn txtime(&self) -> bool {
        self.txtime
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

/// Reads one datagram — or, on a socket with UDP GRO (`gro`), a train of datagrams from one
/// sender that the kernel coalesced — into `buf`: (bytes, sender, segment size). Every
/// datagram of a train is `segment` bytes except perhaps the last.
pub fn recv_train(socket: &UdpSocket, buf: &mut [u8], gro: bool) -> std::io::Result<(usize, SocketAddr, usize)> {
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
        if gro {
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = std::mem::size_of_val(&control);
        }
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, 0);
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

/// Turns UDP GRO on for `socket`; false where the kernel refuses.
pub fn enable_gro(socket: &UdpSocket) -> bool {
    let on: libc::c_int = 1;
    enable(socket, libc::SOL_UDP, libc::UDP_GRO, &on, "UDP GRO")
}

/// Sets a socket option; false (with a warning naming `what`) if the kernel refuses it.
fn enable<T>(socket: &UdpSocket, level: libc::c_int, name: libc::c_int, value: &T, what: &str) -> bool {
    match set_option(socket, level, name, value) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "{what} refused by the kernel; going without");
            false
        }
    }
}

/// Sets a socket option; the kernel's refusal as the error.
fn set_option<T>(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` is a valid `T` for the duration of the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `at` on CLOCK_MONOTONIC in nanoseconds (what SO_TXTIME takes), if it is far enough ahead
/// to be worth pacing.
fn release_time(at: Instant) -> Option<u64> {
    let now = Instant::now();
    let wait = at.checked_duration_since(now).filter(|w| *w > PACING_SLACK)?;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec. Instant is CLOCK_MONOTONIC on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64 + wait.as_nanos() as u64)
}

/// One `sendmsg` with a `UDP_SEGMENT` control message: the kernel splits `buf` into datagrams
/// of `segment` bytes (the last may be shorter).
pub fn send_gso(socket: &UdpSocket, buf: &[u8], segment: usize, to: SocketAddr) -> std::io::Result<()> {
    send_msg(socket, buf, Some(segment), None, to)
}

/// One `sendmsg` of `buf` to `to`, with a `UDP_SEGMENT` control message when `segment` is set
/// and an `SCM_TXTIME` one when `txtime` is.
fn send_msg(
    socket: &UdpSocket,
    buf: &[u8],
    segment: Option<usize>,
    txtime: Option<u64>,
    to: SocketAddr,
) -> std::io::Result<()> {
    let addr = SockAddr::from(to);
    let mut iov = libc::iovec { iov_base: buf.as_ptr() as *mut libc::c_void, iov_len: buf.len() };
    let mut control = [0u64; 8]; // 8-byte aligned, room for both messages
                                 // SAFETY: msghdr is plain data; every pointer in it outlives the sendmsg call below, and
                                 // the control buffer is large enough for the messages written (CMSG_SPACE of 2 and 8).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = addr.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = addr.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control);
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        let mut used = 0;
        if let Some(segment) = segment {
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u16, segment as u16);
            used += libc::CMSG_SPACE(std::mem::size_of::<u16>() as u32) as usize;
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        if let Some(txtime) = txtime {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = SO_TXTIME;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u64>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut u64, txtime);
            used += libc::CMSG_SPACE(std::mem::size_of::<u64>() as u32) as usize;
        }
        msg.msg_controllen = used;
        if used == 0 {
            msg.msg_control = std::ptr::null_mut();
        }
        if libc::sendmsg(socket.as_raw_fd(), &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket with the buffers Spooky wants passes; one the kernel capped (a plain socket at
    /// the default limits) is reported with the sysctls to raise.
    #[test]
    fn small_socket_buffers_are_reported_with_the_sysctl_to_raise() {
        let capped = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        capped.set_recv_buffer_size(64 << 10).unwrap();
        capped.set_send_buffer_size(64 << 10).unwrap();
        let why = buffer_shortfall(&capped.into()).expect("64 KiB buffers are short");
        assert!(why.contains("net.core.rmem_max=8388608") && why.contains("net.core.wmem_max=8388608"), "{why}");
        assert!(why.contains("receive buffer 64 KiB") && why.contains("send buffer 64 KiB"), "{why}");
        let bound = bind_reuseport("127.0.0.1:0".parse().unwrap()).unwrap();
        let rmem_max: usize = std::fs::read_to_string("/proc/sys/net/core/rmem_max").unwrap().trim().parse().unwrap();
        // Root (CAP_NET_ADMIN, as here and in CI) forces the size past the limit.
        if unsafe { libc::geteuid() } == 0 || rmem_max >= SOCKET_BUFFER {
            assert_eq!(buffer_shortfall(&bound), None);
        }
    }

    /// The kernel accepts a GSO run with a release time, and the receiver gets every datagram
    /// (loopback has no pacing qdisc, so the time is simply not enforced).
    #[test]
    fn gso_runs_with_release_times_arrive_whole() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let clock = libc::sock_txtime { clockid: libc::CLOCK_MONOTONIC, flags: 0 };
        assert!(enable(&tx, libc::SOL_SOCKET, SO_TXTIME, &clock, "SO_TXTIME"));
        let run: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let at = release_time(Instant::now() + Duration::from_millis(5)).expect("5 ms ahead is paced");
        send_msg(&tx, &run, Some(300), Some(at), rx.local_addr().unwrap()).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2000];
        for _ in 0..4 {
            let n = rx.recv(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, run, "300 + 300 + 300 + 100 bytes, in order");
        assert_eq!(release_time(Instant::now()), None, "now is not worth pacing");
    }
}
