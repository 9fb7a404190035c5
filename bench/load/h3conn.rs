//! One non-blocking HTTP/3 client connection on quiche with its own UDP socket (so every
//! connection has its own 4-tuple and SO_REUSEPORT spreads them over the proxy's workers).
//! The thread's event loop drives it: `readable` on socket readiness, `on_timer` when its QUIC
//! timer fires, `flush` after anything changed.

use quiche::h3::{self, NameValue};
use spooky::edge::socket::{enable_gro, recv_train, send_gso, GSO_MAX_SEGMENTS};
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

/// Request body bytes are sent from this buffer (the shared test pattern from offset 0).
const BODY_CHUNK: usize = 64 * 1024;

/// A request in flight.
struct Flight {
    intended: Instant,
    status: u16,
    down: u64,
    up_len: u64,
    up_sent: u64,
}

/// How a request ended.
pub enum Outcome {
    /// A complete response.
    Response { intended: Instant, status: u16, down: u64, up: u64 },
    /// The server reset the stream (or the stream failed locally).
    Failed { kind: &'static str },
}

pub struct Conn {
    sock: UdpSocket,
    local: SocketAddr,
    peer: SocketAddr,
    quic: quiche::Connection,
    h3: Option<h3::Connection>,
    flights: HashMap<u64, Flight>,
    /// Streams whose request body is not fully sent yet.
    uploads: Vec<u64>,
    /// When this connection was opened (start of its handshake).
    pub opened: Instant,
    /// The QUIC timer instant currently in the thread's timer heap.
    pub armed: Option<Instant>,
    /// Set when the connection needs a flush this turn.
    pub touched: bool,
    /// Send with UDP GSO (cleared if the kernel refuses).
    gso: bool,
    /// UDP GRO on the socket: a read may return a train of datagrams. A client host's NIC
    /// would coalesce (or a real wire would carry) the proxy's GSO runs; without it, loopback
    /// splits each run in the sender's context and bills the proxy for the receiver's work.
    gro: bool,
}

/// Largest datagram sent (`max_send_udp_payload_size`).
const MAX_DATAGRAM: usize = 1350;

/// Builds the client QUIC configuration shared by a thread's connections.
pub fn client_config(idle_timeout_ms: u64) -> quiche::Result<quiche::Config> {
    let mut c = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
    c.set_application_protos(h3::APPLICATION_PROTOCOL)?;
    c.verify_peer(false);
    c.set_max_idle_timeout(idle_timeout_ms);
    c.set_max_recv_udp_payload_size(MAX_DATAGRAM);
    c.set_max_send_udp_payload_size(MAX_DATAGRAM);
    c.set_initial_max_data(64 << 20);
    c.set_initial_max_stream_data_bidi_local(16 << 20);
    c.set_initial_max_stream_data_bidi_remote(16 << 20);
    c.set_initial_max_stream_data_uni(1 << 20);
    c.set_initial_max_streams_bidi(1000);
    c.set_initial_max_streams_uni(16);
    c.set_disable_active_migration(true);
    Ok(c)
}

/// The header section of the request every stream sends.
pub fn request_headers(spec: &crate::plan::RequestSpec) -> Vec<h3::Header> {
    let mut h = vec![
        h3::Header::new(b":method", spec.method.as_bytes()),
        h3::Header::new(b":scheme", b"https"),
        h3::Header::new(b":authority", spec.authority.as_bytes()),
        h3::Header::new(b":path", spec.path.as_bytes()),
        h3::Header::new(b"user-agent", b"spooky-load"),
    ];
    if spec.body > 0 {
        h.push(h3::Header::new(b"content-length", spec.body.to_string().as_bytes()));
    }
    h
}

/// The bytes request bodies are cut from.
pub fn body_chunk() -> Vec<u8> {
    let mut b = vec![0; BODY_CHUNK];
    spooky::tools::pattern::fill(0, &mut b);
    b
}

impl Conn {
    /// Starts a handshake to `peer` (the first flight goes out on the next `flush`).
    pub fn open(peer: SocketAddr, server_name: &str, config: &mut quiche::Config) -> io::Result<Conn> {
        let bind: SocketAddr = if peer.is_ipv6() { "[::1]:0" } else { "127.0.0.1:0" }.parse().expect("literal address");
        let sock = socket2::Socket::new(socket2::Domain::for_address(peer), socket2::Type::DGRAM, None)?;
        // Bulk transfers arrive faster than one loop turn drains them; avoid needless drops.
        let _ = sock.set_recv_buffer_size(4 << 20);
        let _ = sock.set_send_buffer_size(4 << 20);
        sock.bind(&bind.into())?;
        sock.connect(&peer.into())?;
        sock.set_nonblocking(true)?;
        let sock: UdpSocket = sock.into();
        let gro = enable_gro(&sock);
        let local = sock.local_addr()?;
        let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut scid)
            .map_err(|_| io::Error::other("no OS randomness"))?;
        let scid = quiche::ConnectionId::from_ref(&scid);
        let quic = quiche::connect(Some(server_name), &scid, local, peer, config).map_err(io::Error::other)?;
        Ok(Conn {
            sock,
            local,
            peer,
            quic,
            h3: None,
            flights: HashMap::new(),
            uploads: Vec::new(),
            opened: Instant::now(),
            armed: None,
            touched: true,
            gso: true,
            gro,
        })
    }

    pub fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// HTTP/3 is set up (handshake complete).
    pub fn is_ready(&self) -> bool {
        self.h3.is_some() && !self.quic.is_closed()
    }

    pub fn is_closed(&self) -> bool {
        self.quic.is_closed()
    }

    /// True if a request could start now with at most `limit` in flight.
    pub fn can_start(&self, limit: usize) -> bool {
        self.is_ready() && self.flights.len() < limit && self.quic.peer_streams_left_bidi() > 0
    }

    /// Sends a request whose latency counts from `intended`.
    pub fn start(
        &mut self,
        headers: &[h3::Header],
        body: u64,
        body_chunk: &[u8],
        intended: Instant,
    ) -> Result<(), &'static str> {
        let h3 = self.h3.as_mut().ok_or("not ready")?;
        let sid = h3.send_request(&mut self.quic, headers, body == 0).map_err(|_| "send_request")?;
        self.flights.insert(sid, Flight { intended, status: 0, down: 0, up_len: body, up_sent: 0 });
        if body > 0 {
            self.uploads.push(sid);
            self.pump_uploads(body_chunk);
        }
        self.touched = true;
        Ok(())
    }

    /// Drains the socket into quiche and collects finished requests. Returns true when the
    /// handshake completed during this call.
    pub fn readable(&mut self, buf: &mut [u8], body_chunk: &[u8], done: &mut Vec<Outcome>) -> bool {
        self.touched = true;
        loop {
            match recv_train(&self.sock, buf, self.gro) {
                Ok((n, _, segment)) => {
                    let info = quiche::RecvInfo { from: self.peer, to: self.local };
                    for datagram in buf[..n].chunks_mut(segment.max(1)) {
                        let _ = self.quic.recv(datagram, info);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // Nobody listens there (ICMP port unreachable): give up on this connection.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    let _ = self.quic.close(false, 0, b"");
                    break;
                }
                Err(_) => break,
            }
        }
        let mut became_ready = false;
        if self.h3.is_none() && self.quic.is_established() {
            match h3::Connection::with_transport(&mut self.quic, &h3::Config::new().expect("h3 config")) {
                Ok(h3) => {
                    self.h3 = Some(h3);
                    became_ready = true;
                }
                Err(_) => {
                    let _ = self.quic.close(true, 0x101, b"h3 setup");
                }
            }
        }
        self.poll_events(buf, done);
        self.pump_uploads(body_chunk);
        became_ready
    }

    /// Fires the QUIC timer if it is due.
    pub fn on_timer(&mut self, now: Instant) {
        if self.quic.timeout_instant().is_some_and(|t| t <= now) {
            self.quic.on_timeout();
            self.touched = true;
        }
    }

    pub fn next_timer(&self) -> Option<Instant> {
        self.quic.timeout_instant()
    }

    /// Sends everything quiche has queued, in UDP GSO runs of equal-size datagrams (so a
    /// receiver with UDP GRO gets them as one train, as from a real client's NIC).
    pub fn flush(&mut self, out: &mut [u8]) {
        self.touched = false;
        let (mut len, mut segment, mut count) = (0, 0, 0);
        loop {
            if len + MAX_DATAGRAM > out.len() || count == GSO_MAX_SEGMENTS {
                self.send_run(&out[..len], segment);
                (len, segment, count) = (0, 0, 0);
            }
            let n = match self.quic.send(&mut out[len..len + MAX_DATAGRAM]) {
                Ok((n, _)) => n,
                Err(_) => break,
            };
            if count > 0 && n > segment {
                // Larger than the run's segments: send the run, start a new one with this.
                self.send_run(&out[..len], segment);
                out.copy_within(len..len + n, 0);
                (len, count) = (0, 0);
            }
            if count == 0 {
                segment = n;
            }
            len += n;
            count += 1;
            if n < segment {
                // A short datagram can only end a run.
                self.send_run(&out[..len], segment);
                (len, segment, count) = (0, 0, 0);
            }
        }
        self.send_run(&out[..len], segment);
    }

    /// One GSO send of `run` (datagrams of `segment` bytes), or plain sends if GSO fails. A
    /// full socket buffer drops datagrams; QUIC loss recovery resends them.
    fn send_run(&mut self, run: &[u8], segment: usize) {
        if run.is_empty() {
            return;
        }
        if run.len() > segment && self.gso {
            match send_gso(&self.sock, run, segment, self.peer) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => self.gso = false, // the kernel cannot segment: plain sends from now on
            }
        }
        for datagram in run.chunks(segment) {
            let _ = self.sock.send(datagram);
        }
    }

    /// Sends CONNECTION_CLOSE (H3_NO_ERROR) so the server frees the connection now.
    pub fn close(&mut self, out: &mut [u8]) {
        let _ = self.quic.close(true, 0x100, b"");
        self.flush(out);
    }

    /// Requests still in flight (reported as errors when the connection dies).
    pub fn abandon(&mut self) -> usize {
        self.uploads.clear();
        self.flights.drain().count()
    }

    fn poll_events(&mut self, buf: &mut [u8], done: &mut Vec<Outcome>) {
        let Some(h3) = self.h3.as_mut() else { return };
        loop {
            let (sid, ev) = match h3.poll(&mut self.quic) {
                Ok(v) => v,
                Err(h3::Error::Done) => return,
                Err(_) => {
                    let _ = self.quic.close(true, 0x101, b"h3 error");
                    return;
                }
            };
            let Some(f) = self.flights.get_mut(&sid) else {
                continue;
            };
            match ev {
                h3::Event::Headers { list, .. } => {
                    if f.status == 0 {
                        if let Some(s) = list.iter().find(|h| h.name() == b":status") {
                            let s: u16 = std::str::from_utf8(s.value()).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
                            // 1xx responses are interim; the final head follows.
                            if s >= 200 {
                                f.status = s;
                            }
                        }
                    }
                }
                h3::Event::Data => {
                    while let Ok(n) = h3.recv_body(&mut self.quic, sid, buf) {
                        f.down += n as u64;
                    }
                }
                h3::Event::Finished => {
                    let f = self.flights.remove(&sid).expect("flight exists");
                    done.push(Outcome::Response {
                        intended: f.intended,
                        status: f.status,
                        down: f.down,
                        up: f.up_sent,
                    });
                }
                h3::Event::Reset(_) => {
                    self.flights.remove(&sid);
                    self.uploads.retain(|s| *s != sid);
                    done.push(Outcome::Failed { kind: "stream reset" });
                }
                h3::Event::PriorityUpdate | h3::Event::GoAway => {}
            }
        }
    }

    fn pump_uploads(&mut self, chunk: &[u8]) {
        let Some(h3) = self.h3.as_mut() else { return };
        let flights = &mut self.flights;
        let quic = &mut self.quic;
        self.uploads.retain(|sid| {
            let Some(f) = flights.get_mut(sid) else {
                return false;
            };
            while f.up_sent < f.up_len {
                let n = ((f.up_len - f.up_sent) as usize).min(chunk.len());
                let fin = f.up_sent + n as u64 == f.up_len;
                match h3.send_body(quic, *sid, &chunk[..n], fin) {
                    Ok(w) => {
                        f.up_sent += w as u64;
                        if w < n {
                            return true;
                        }
                    }
                    Err(h3::Error::Done) | Err(h3::Error::StreamBlocked) => return true,
                    // The server stopped the stream; its reset reports the outcome.
                    Err(_) => return false,
                }
            }
            false
        });
    }
}
