//! A small blocking HTTP/3 client on quiche: one QUIC connection, any number of concurrent
//! requests, bodies streamed from memory or generated from [`super::pattern`], responses hashed
//! as they arrive (only the first `keep_body` bytes are kept). Used by `spooky-client`, the
//! integration tests and the benchmarks.

use super::pattern;
use bytes::Bytes;
use quiche::h3::{self, NameValue};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Client options.
#[derive(Clone, Debug)]
pub struct Options {
    /// TLS server name (SNI) and default `:authority`.
    pub server_name: String,
    /// Send `server_name` as SNI (the default); false sends no SNI at all.
    pub sni: bool,
    /// A session saved from an earlier connection ([`Client::session`]): resume it.
    pub session: Option<Vec<u8>>,
    /// Verify the server certificate (against the system store or `ca_file`).
    pub verify: bool,
    pub ca_file: Option<String>,
    /// Upper bound for one [`Client::run`] (and the handshake).
    pub timeout: Duration,
    /// Response body bytes kept in [`Response::body`]; all bytes are hashed regardless.
    pub keep_body: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            server_name: "localhost".into(),
            sni: true,
            session: None,
            verify: false,
            ca_file: None,
            timeout: Duration::from_secs(30),
            keep_body: 1 << 20,
        }
    }
}

/// A request body.
#[derive(Clone, Debug)]
pub enum Body {
    Empty,
    Bytes(Bytes),
    /// `n` bytes of the shared test pattern, generated while sending.
    Pattern(u64),
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::Pattern(n) => *n,
        }
    }
}

/// One request.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Defaults to the server name.
    pub authority: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    pub trailers: Vec<(String, String)>,
    /// Send exactly this header section instead (for malformed-request tests).
    pub raw_head: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Request {
    pub fn get(path: &str) -> Self {
        Request {
            method: "GET".into(),
            path: path.into(),
            authority: None,
            headers: Vec::new(),
            body: Body::Empty,
            trailers: Vec::new(),
            raw_head: None,
        }
    }

    pub fn post(path: &str, body: Body) -> Self {
        Request { method: "POST".into(), body, ..Request::get(path) }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// A response, or how its stream ended.
#[derive(Clone, Debug, Default)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The first `keep_body` bytes.
    pub body: Vec<u8>,
    pub body_len: u64,
    /// SHA-256 (hex) of the whole body.
    pub sha256: String,
    pub trailers: Vec<(String, String)>,
    /// The server reset the stream with this HTTP/3 error code.
    pub reset: Option<u64>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Errors of the client itself (not HTTP statuses).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QUIC: {0}")]
    Quic(#[from] quiche::Error),
    #[error("HTTP/3: {0}")]
    H3(#[from] h3::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection closed: {0}")]
    Closed(String),
}

/// What happened to 0-RTT on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyData {
    /// Not offered: no session, a session without early data, or plain [`Client::connect`].
    NotOffered,
    /// Sent, and the server accepted it.
    Accepted,
    /// Sent, and the server refused it (BoringSSL's `ssl_early_data_reason_t`): the requests
    /// went again after the handshake.
    Rejected(u32),
}

/// One HTTP/3 connection.
pub struct Client {
    sock: UdpSocket,
    conn: quiche::Connection,
    h3: h3::Connection,
    local: SocketAddr,
    opts: Options,
    buf: Vec<u8>,
    out: Vec<u8>,
    /// Whether requests were sent as 0-RTT.
    early_sent: bool,
}

struct Active {
    idx: usize,
    body: Body,
    sent: u64,
    trailers: Vec<(String, String)>,
    upload_done: bool,
    resp: Response,
    hasher: Sha256,
    head_seen: bool,
}

impl Client {
    /// Connects to `peer` and completes the handshake (resuming `opts.session` if set).
    pub fn connect(peer: SocketAddr, opts: Options) -> Result<Self, Error> {
        let mut hs = ClientHandshake::start(peer, &opts, false)?;
        hs.flush()?;
        hs.establish(opts)
    }

    /// Connects resuming `opts.session` and sends `requests` as 0-RTT early data, right after
    /// the first flight, when the session allows it; otherwise (no session, no early data in
    /// its ticket) they go once the handshake completes. Returns the connection and the
    /// responses in order; [`Client::early_data`] tells which way it went.
    pub fn connect_early(
        peer: SocketAddr,
        opts: Options,
        requests: Vec<Request>,
    ) -> Result<(Self, Vec<Response>), Error> {
        let mut hs = ClientHandshake::start(peer, &opts, true)?;
        // The ClientHello goes first; after it the client knows whether it may send early data.
        hs.flush()?;
        let mut client = if hs.conn.is_in_early_data() {
            let mut client = hs.into_client(opts)?;
            client.early_sent = true;
            client
        } else {
            hs.establish(opts)?
        };
        let responses = client.run(requests)?;
        let deadline = Instant::now() + client.opts.timeout;
        while !client.conn.is_established() {
            client.flush_conn()?;
            if client.conn.is_closed() {
                return Err(Error::Closed(close_reason(&client.conn)));
            }
            client.receive_conn(deadline)?;
        }
        Ok((client, responses))
    }

    /// Whether this connection resumed a session (no full handshake).
    pub fn is_resumed(&self) -> bool {
        self.conn.is_resumed()
    }

    /// The fate of 0-RTT on this connection (meaningful once the handshake is complete).
    pub fn early_data(&self) -> EarlyData {
        match self.conn.early_data_reason() {
            _ if !self.early_sent => EarlyData::NotOffered,
            // ssl_early_data_accepted
            2 => EarlyData::Accepted,
            reason => EarlyData::Rejected(reason),
        }
    }

    /// The latest session the server gave this connection (its NewSessionTicket arrives just
    /// after the handshake), to resume with through [`Options::session`].
    pub fn session(&self) -> Option<Vec<u8>> {
        self.conn.session().map(<[u8]>::to_vec)
    }

    /// Like [`Client::session`], waiting (up to the client's timeout) for the ticket to arrive.
    pub fn wait_session(&mut self) -> Result<Vec<u8>, Error> {
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            if let Some(s) = self.session() {
                return Ok(s);
            }
            self.flush_conn()?;
            if self.conn.is_closed() {
                return Err(Error::Closed(close_reason(&self.conn)));
            }
            self.receive_conn(deadline)?;
        }
    }

    /// Sends one request and waits for its response.
    pub fn request(&mut self, req: Request) -> Result<Response, Error> {
        Ok(self.run(vec![req])?.pop().expect("one response per request"))
    }

    /// Runs all requests concurrently (as many at once as the server's stream limit allows)
    /// and returns their responses in order.
    pub fn run(&mut self, requests: Vec<Request>) -> Result<Vec<Response>, Error> {
        let deadline = Instant::now() + self.opts.timeout;
        let total = requests.len();
        let mut pending: VecDeque<(usize, Request)> = requests.into_iter().enumerate().collect();
        let mut active: HashMap<u64, Active> = HashMap::new();
        let mut results: Vec<Option<Response>> = vec![None; total];
        let mut done = 0;
        let mut chunk = vec![0u8; 64 * 1024];
        while done < total {
            self.start_requests(&mut pending, &mut active)?;
            for (sid, a) in active.iter_mut() {
                self.upload(*sid, a, &mut chunk);
            }
            self.flush_conn()?;
            if self.conn.is_closed() {
                return Err(Error::Closed(close_reason(&self.conn)));
            }
            self.receive_conn(deadline)?;
            self.poll_events(&mut active)?;
            active.retain(|_, a| {
                let finished = a.resp.reset.is_some() || !a.resp.sha256.is_empty();
                if finished {
                    results[a.idx] = Some(std::mem::take(&mut a.resp));
                    done += 1;
                }
                !finished
            });
        }
        self.flush_conn()?;
        Ok(results.into_iter().map(|r| r.expect("every request finished")).collect())
    }

    /// Sends a request without a body and never reads its response: nothing more happens on
    /// this connection until the client is used again, so the response stays unread at the
    /// server, held back by QUIC flow control (a reader that stopped, for tests).
    pub fn send_unread(&mut self, req: Request) -> Result<(), Error> {
        let mut pending = VecDeque::from([(0, req)]);
        self.start_requests(&mut pending, &mut HashMap::new())?;
        self.flush_conn()
    }

    /// The server's leaf certificate (DER), as presented in the handshake.
    pub fn peer_cert(&self) -> Option<Vec<u8>> {
        self.conn.peer_cert().map(<[u8]>::to_vec)
    }

    /// Moves to a new UDP socket (a new source port) without telling QUIC: to the server this
    /// is NAT rebinding (RFC 9000 §9.3), which it must follow after validating the new path.
    pub fn rebind(&mut self) -> Result<(), Error> {
        let peer = self.sock.peer_addr()?;
        let sock = UdpSocket::bind(SocketAddr::new(self.sock.local_addr()?.ip(), 0))?;
        sock.connect(peer)?;
        sock.set_nonblocking(true)?;
        self.sock = sock;
        Ok(())
    }

    /// Migrates on purpose (RFC 9000 §9.2, §9.5): moves to a new UDP socket (a new source port)
    /// and tells QUIC, which switches to a spare connection ID of the server's, so the new
    /// path is not linkable to the old one. Waits (up to the client's timeout) for the server
    /// to hand over a spare CID if it has not yet.
    pub fn migrate(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + self.opts.timeout;
        let peer = self.sock.peer_addr()?;
        let sock = UdpSocket::bind(SocketAddr::new(self.sock.local_addr()?.ip(), 0))?;
        sock.connect(peer)?;
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        // quiche needs a spare CID of each side for the new path: until then, keep the
        // connection going on the old one.
        loop {
            match self.conn.migrate(local, peer) {
                Ok(_) => break,
                Err(quiche::Error::OutOfIdentifiers) => {}
                Err(e) => return Err(e.into()),
            }
            self.flush_conn()?;
            if self.conn.is_closed() {
                return Err(Error::Closed(close_reason(&self.conn)));
            }
            self.receive_conn(deadline)?;
        }
        self.sock = sock;
        self.local = local;
        self.flush_conn()
    }

    /// The destination connection ID the client sends with now (the server's).
    pub fn server_cid(&self) -> Vec<u8> {
        self.conn.destination_id().to_vec()
    }

    /// The local port datagrams leave from now.
    pub fn local_port(&self) -> u16 {
        self.sock.local_addr().map_or(0, |a| a.port())
    }

    /// Closes the connection cleanly (H3_NO_ERROR).
    pub fn close(mut self) {
        let _ = self.conn.close(true, 0x100, b"");
        let _ = self.flush_conn();
    }

    fn start_requests(
        &mut self,
        pending: &mut VecDeque<(usize, Request)>,
        active: &mut HashMap<u64, Active>,
    ) -> Result<(), Error> {
        while let Some((_, req)) = pending.front() {
            let headers: Vec<h3::Header> = match &req.raw_head {
                Some(raw) => raw.iter().map(|(n, v)| h3::Header::new(n, v)).collect(),
                None => {
                    let authority = req.authority.clone().unwrap_or_else(|| self.opts.server_name.clone());
                    let mut h = vec![
                        h3::Header::new(b":method", req.method.as_bytes()),
                        h3::Header::new(b":scheme", b"https"),
                        h3::Header::new(b":authority", authority.as_bytes()),
                        h3::Header::new(b":path", req.path.as_bytes()),
                    ];
                    if let Body::Bytes(_) | Body::Pattern(_) = req.body {
                        if !req.headers.iter().any(|(n, _)| n == "content-length") && req.trailers.is_empty() {
                            h.push(h3::Header::new(b"content-length", req.body.len().to_string().as_bytes()));
                        }
                    }
                    h.extend(req.headers.iter().map(|(n, v)| h3::Header::new(n.as_bytes(), v.as_bytes())));
                    h
                }
            };
            let fin = req.body.len() == 0 && req.trailers.is_empty();
            match self.h3.send_request(&mut self.conn, &headers, fin) {
                Ok(sid) => {
                    let (idx, req) = pending.pop_front().expect("front exists");
                    active.insert(
                        sid,
                        Active {
                            idx,
                            body: req.body,
                            sent: 0,
                            trailers: req.trailers,
                            upload_done: fin,
                            resp: Response::default(),
                            hasher: Sha256::new(),
                            head_seen: false,
                        },
                    );
                }
                Err(h3::Error::StreamBlocked) | Err(h3::Error::TransportError(quiche::Error::StreamLimit)) => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn upload(&mut self, sid: u64, a: &mut Active, chunk: &mut [u8]) {
        let len = a.body.len();
        while !a.upload_done && a.sent < len {
            let n = ((len - a.sent) as usize).min(chunk.len());
            let data: &[u8] = match &a.body {
                Body::Bytes(b) => &b[a.sent as usize..a.sent as usize + n],
                Body::Pattern(_) => {
                    pattern::fill(a.sent, &mut chunk[..n]);
                    &chunk[..n]
                }
                Body::Empty => &[],
            };
            let last = a.sent + n as u64 == len;
            match self.h3.send_body(&mut self.conn, sid, data, last && a.trailers.is_empty()) {
                Ok(w) => {
                    a.sent += w as u64;
                    if w < n {
                        return;
                    }
                }
                Err(h3::Error::Done) | Err(h3::Error::StreamBlocked) => return,
                Err(_) => {
                    // The server stopped the stream; its reset tells the outcome.
                    a.upload_done = true;
                    return;
                }
            }
        }
        if !a.upload_done && a.sent == len {
            if a.trailers.is_empty() {
                a.upload_done = true;
            } else {
                let t: Vec<h3::Header> =
                    a.trailers.iter().map(|(n, v)| h3::Header::new(n.as_bytes(), v.as_bytes())).collect();
                match self.h3.send_additional_headers(&mut self.conn, sid, &t, true, true) {
                    Err(h3::Error::Done) | Err(h3::Error::StreamBlocked) => {}
                    _ => a.upload_done = true,
                }
            }
        }
    }

    fn poll_events(&mut self, active: &mut HashMap<u64, Active>) -> Result<(), Error> {
        loop {
            let (sid, ev) = match self.h3.poll(&mut self.conn) {
                Ok(v) => v,
                Err(h3::Error::Done) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let Some(a) = active.get_mut(&sid) else {
                continue;
            };
            match ev {
                h3::Event::Headers { list, .. } => {
                    let fields = list.iter().map(|h| {
                        (
                            String::from_utf8_lossy(h.name()).into_owned(),
                            String::from_utf8_lossy(h.value()).into_owned(),
                        )
                    });
                    if a.head_seen {
                        a.resp.trailers.extend(fields);
                    } else {
                        for (n, v) in fields {
                            if n == ":status" {
                                a.resp.status = v.parse().unwrap_or(0);
                                // 1xx responses are interim; the final head follows.
                                a.head_seen = a.resp.status >= 200;
                            } else if a.head_seen {
                                a.resp.headers.push((n, v));
                            }
                        }
                    }
                }
                h3::Event::Data => loop {
                    match self.h3.recv_body(&mut self.conn, sid, &mut self.buf) {
                        Ok(n) => {
                            let data = &self.buf[..n];
                            a.hasher.update(data);
                            a.resp.body_len += n as u64;
                            let keep = self.opts.keep_body.saturating_sub(a.resp.body.len()).min(n);
                            a.resp.body.extend_from_slice(&data[..keep]);
                        }
                        Err(h3::Error::Done) => break,
                        Err(e) => return Err(e.into()),
                    }
                },
                h3::Event::Finished => {
                    a.resp.sha256 = hex::encode(std::mem::take(&mut a.hasher).finalize());
                }
                h3::Event::Reset(code) => a.resp.reset = Some(code),
                h3::Event::PriorityUpdate | h3::Event::GoAway => {}
            }
        }
    }

    fn flush_conn(&mut self) -> Result<(), Error> {
        self.sync_cids()?;
        flush(&mut self.conn, &self.sock, self.local, &mut self.out)
    }

    /// Keeps the server supplied with spare CIDs of the client's (a migrating server path
    /// needs one), replacing those it retired.
    fn sync_cids(&mut self) -> Result<(), Error> {
        while self.conn.retired_scid_next().is_some() {}
        if !self.conn.is_established() {
            return Ok(());
        }
        let rng = ring::rand::SystemRandom::new();
        while self.conn.scids_left() > 0 {
            // As long as the first one: short headers carry no CID length.
            let mut cid = [0u8; quiche::MAX_CONN_ID_LEN];
            let mut token = [0u8; 16];
            ring::rand::SecureRandom::fill(&rng, &mut cid).expect("OS randomness");
            ring::rand::SecureRandom::fill(&rng, &mut token).expect("OS randomness");
            self.conn.new_scid(&quiche::ConnectionId::from_ref(&cid), u128::from_be_bytes(token), false)?;
        }
        Ok(())
    }

    fn receive_conn(&mut self, deadline: Instant) -> Result<(), Error> {
        receive(&mut self.conn, &self.sock, self.local, &mut self.buf, deadline, self.opts.timeout)
    }
}

/// The connection before HTTP/3 is set up.
struct ClientHandshake {
    sock: UdpSocket,
    conn: quiche::Connection,
    local: SocketAddr,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl ClientHandshake {
    /// A connection to `peer` with nothing sent yet.
    fn start(peer: SocketAddr, opts: &Options, early_data: bool) -> Result<Self, Error> {
        let bind: SocketAddr = if peer.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("literal");
        let sock = UdpSocket::bind(bind)?;
        sock.connect(peer)?;
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
        config.set_application_protos(h3::APPLICATION_PROTOCOL)?;
        config.verify_peer(opts.verify);
        if let Some(ca) = &opts.ca_file {
            config.load_verify_locations_from_file(ca)?;
        }
        config.set_max_idle_timeout(30_000);
        config.set_max_recv_udp_payload_size(1350);
        config.set_max_send_udp_payload_size(1350);
        config.set_initial_max_data(32 << 20);
        config.set_initial_max_stream_data_bidi_local(8 << 20);
        config.set_initial_max_stream_data_bidi_remote(8 << 20);
        config.set_initial_max_stream_data_uni(1 << 20);
        config.set_initial_max_streams_bidi(100);
        config.set_initial_max_streams_uni(8);
        config.set_disable_active_migration(true);
        // Spare CIDs both ways, so that `migrate` finds one of the server's and the server one
        // of ours for the new path.
        config.set_active_connection_id_limit(4);
        if early_data {
            config.enable_early_data();
        }
        let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut scid).expect("OS randomness");
        let scid = quiche::ConnectionId::from_ref(&scid);
        let sni = opts.sni.then_some(opts.server_name.as_str());
        let mut conn = quiche::connect(sni, &scid, local, peer, &mut config)?;
        if let Some(session) = &opts.session {
            conn.set_session(session)?;
        }
        Ok(ClientHandshake { sock, conn, local, buf: vec![0; 65_535], out: vec![0; 65_535] })
    }

    /// Completes the handshake and sets up HTTP/3.
    fn establish(mut self, opts: Options) -> Result<Client, Error> {
        let deadline = Instant::now() + opts.timeout;
        while !self.conn.is_established() {
            self.flush()?;
            if self.conn.is_closed() {
                return Err(Error::Closed(close_reason(&self.conn)));
            }
            self.receive(deadline, opts.timeout)?;
        }
        self.into_client(opts)
    }

    /// HTTP/3 on the connection (established, or in early data).
    fn into_client(mut self, opts: Options) -> Result<Client, Error> {
        let h3 = h3::Connection::with_transport(&mut self.conn, &h3::Config::new()?)?;
        let ClientHandshake { sock, conn, local, buf, out } = self;
        Ok(Client { sock, conn, h3, local, opts, buf, out, early_sent: false })
    }

    fn flush(&mut self) -> Result<(), Error> {
        flush(&mut self.conn, &self.sock, self.local, &mut self.out)
    }

    fn receive(&mut self, deadline: Instant, limit: Duration) -> Result<(), Error> {
        receive(&mut self.conn, &self.sock, self.local, &mut self.buf, deadline, limit)
    }
}

/// Sends what QUIC has; packets for a path from an address the client left (after
/// [`Client::migrate`]) go nowhere, as that socket is gone.
fn flush(conn: &mut quiche::Connection, sock: &UdpSocket, local: SocketAddr, out: &mut [u8]) -> Result<(), Error> {
    loop {
        match conn.send(out) {
            Ok((_, info)) if info.from != local => continue,
            Ok((n, _)) => loop {
                match sock.send(&out[..n]) {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        wait_fd(sock, libc::POLLOUT, 10);
                    }
                    // ICMP errors (nobody listening) surface here; the idle timeout reports them.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
                    Err(e) => return Err(e.into()),
                }
            },
            Err(quiche::Error::Done) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits for datagrams (or the connection's next timeout) and feeds every available one.
fn receive(
    conn: &mut quiche::Connection,
    sock: &UdpSocket,
    local: SocketAddr,
    buf: &mut [u8],
    deadline: Instant,
    limit: Duration,
) -> Result<(), Error> {
    let now = Instant::now();
    if now >= deadline {
        return Err(Error::Timeout(limit));
    }
    let wait = conn.timeout().unwrap_or(Duration::from_millis(100)).min(deadline - now);
    let ready = wait_fd(sock, libc::POLLIN, wait.as_millis().max(1) as i32);
    if !ready {
        conn.on_timeout();
        return Ok(());
    }
    let peer = sock.peer_addr()?;
    loop {
        match sock.recv(buf) {
            Ok(n) => {
                let _ = conn.recv(&mut buf[..n], quiche::RecvInfo { from: peer, to: local });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) => return Err(e.into()),
        }
    }
    if conn.timeout() == Some(Duration::ZERO) {
        conn.on_timeout();
    }
    Ok(())
}

/// poll(2) on one socket; true when ready.
fn wait_fd(sock: &UdpSocket, events: i16, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) > 0 }
}

fn close_reason(conn: &quiche::Connection) -> String {
    match (conn.peer_error(), conn.local_error()) {
        (Some(e), _) => format!("peer error 0x{:x} {}", e.error_code, String::from_utf8_lossy(&e.reason)),
        (_, Some(e)) => format!("local error 0x{:x} {}", e.error_code, String::from_utf8_lossy(&e.reason)),
        _ if conn.is_timed_out() => "idle timeout".into(),
        _ => "closed".into(),
    }
}
