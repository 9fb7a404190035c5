//! The `reload_apply` fuzz target: configuration A runs a real worker with a real HTTP/3
//! client and requests in flight (uploads half sent, downloads, resets), then configuration B
//! arrives the way a reload delivers it (validated into a snapshot by the control thread's
//! code, sent through the worker's inbox), and the client carries on.
//!
//! Inputs are structured ([`ReloadInput`]): every setting is picked from values inside its
//! legal range, so almost every input is a pair of valid configurations, and an optional
//! `breakage` sets one key to a raw value (often out of range) to exercise refusals.

use crate::bridge::h3_error;
use crate::control::mailbox::{self, Postbox};
use crate::control::snapshot::{Snapshot, Source};
use crate::control::{ControlLink, Event, ToWorker};
use crate::edge::keys::EdgeKeys;
use crate::edge::socket::{bind_reuseport, EdgeSocket, Offloads};
use crate::edge::steering;
use crate::edge::worker::{Mesh, Worker, WorkerCtx};
use crate::telemetry::access_log::{self, AccessLogger};
use arbitrary::{Arbitrary, Unstructured};
use crossbeam_channel::Receiver;
use quiche::h3;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Inputs

#[derive(Debug, Arbitrary)]
pub struct ReloadInput {
    a: ConfigSpec,
    b: ConfigSpec,
    /// Client actions under A, then under B.
    before: Vec<Step>,
    after: Vec<Step>,
}

/// One configuration. Every `u8` picks a value from that key's list of legal values.
#[derive(Debug, Arbitrary)]
struct ConfigSpec {
    quic: [u8; 11],
    timeouts: [u8; 6],
    h2: [u8; 6],
    misc: [u8; 4],
    pools: Vec<PoolSpec>,
    routes: Vec<RouteSpec>,
    /// A key that needs a restart (`quic.gso`): when A and B differ, B must be refused.
    gso: bool,
    /// One key (by index into [`BREAKABLE`]) set to a raw value instead.
    breakage: Option<(u8, u64)>,
}

#[derive(Debug, Arbitrary)]
struct PoolSpec {
    balance: u8,
    /// (to the in-process backend, or to a closed port; weight)
    backends: Vec<(bool, u8)>,
    outlier: [u8; 4],
    breaker: [u8; 2],
    fallback: Option<u8>,
    health: Option<[u8; 4]>,
}

#[derive(Debug, Arbitrary)]
struct RouteSpec {
    path: u8,
    methods: u8,
    pool: u8,
    request_timeout: Option<u8>,
    retries: Option<[u8; 3]>,
    rate_limit: Option<[u8; 2]>,
}

#[derive(Debug, Arbitrary)]
enum Step {
    /// A request without a body.
    Get(u8),
    /// A POST whose body is partly sent (with or without `content-length`).
    Upload { path: u8, declared: Option<u16>, first: u16 },
    /// More body for the n-th upload still open.
    Body { upload: u8, len: u16 },
    /// The n-th upload's body ends.
    Finish(u8),
    /// The client resets the n-th request stream.
    Reset(u8),
    /// Time passes for the worker's timers (units of 250 ms, added up).
    Elapse(u8),
    /// The worker, its upstream tasks and the backend get a few turns.
    Run,
}

/// Keys a `breakage` can set to a raw value, and how a raw number is written for each.
const BREAKABLE: &[(&str, Raw)] = &[
    ("quic.max_data", Raw::Bytes),
    ("quic.max_stream_data", Raw::Bytes),
    ("quic.max_concurrent_streams", Raw::Count),
    ("quic.max_header_list_size", Raw::Bytes),
    ("quic.max_udp_payload", Raw::Count),
    ("quic.retry_token_lifetime", Raw::Millis),
    ("quic.max_connections_per_worker", Raw::Count),
    ("quic.max_new_connections_per_sec", Raw::Count),
    ("timeouts.connect", Raw::Millis),
    ("timeouts.request", Raw::Millis),
    ("timeouts.idle", Raw::Millis),
    ("timeouts.body_grace", Raw::Millis),
    ("timeouts.body_min_rate", Raw::Bytes),
    ("upstream_h2.stream_window", Raw::Bytes),
    ("upstream_h2.connection_window", Raw::Bytes),
    ("upstream_h2.max_frame_size", Raw::Bytes),
    ("upstream_h2.max_connections_per_backend", Raw::Count),
    ("upstream_h2.keepalive_interval", Raw::Millis),
    ("upstream_h2.keepalive_timeout", Raw::Millis),
    ("access_log.buffer", Raw::Count),
    ("pool.weight", Raw::Count),
    ("pool.outlier.base_ejection", Raw::Millis),
    ("pool.outlier.max_ejection", Raw::Millis),
    ("pool.outlier.max_ejected_percent", Raw::Count),
    ("pool.health_check.interval", Raw::Millis),
    ("route.rate_limit.rate", Raw::Rate),
    ("route.rate_limit.burst", Raw::Count),
    ("route.retries.attempts", Raw::Count),
    ("route.retries.per_try_timeout", Raw::Millis),
    ("route.request_timeout", Raw::Millis),
    // Added later: at the end, so the seeds' indices above keep their keys.
    ("quic.body_buffer_per_connection", Raw::Bytes),
    ("quic.body_buffer_per_worker", Raw::Bytes),
];

#[derive(Clone, Copy)]
enum Raw {
    Bytes,
    Count,
    Millis,
    Rate,
}

/// Request paths the client picks from.
const PATHS: [&str; 8] =
    ["/", "/echo", "/sink", "/bytes/1000", "/bytes/300000", "/status/503", "/nope", "/?delay_ms=20"];

fn pick<T: Copy>(list: &[T], selector: u8) -> T {
    list[usize::from(selector) % list.len()]
}

/// Renders a [`ConfigSpec`] as YAML; `backend` is the in-process backend, `closed` a port
/// nothing listens on.
struct Render<'a> {
    spec: &'a ConfigSpec,
    broken: Option<(&'static str, String)>,
    backend: SocketAddr,
    closed: SocketAddr,
}

impl<'a> Render<'a> {
    fn new(spec: &'a ConfigSpec, backend: SocketAddr, closed: SocketAddr) -> Self {
        let broken = spec.breakage.map(|(i, raw)| {
            let (key, kind) = BREAKABLE[usize::from(i) % BREAKABLE.len()];
            // Edge values first: 0, 1 and the largest, then anything.
            let n = match raw % 8 {
                0 => 0,
                1 => 1,
                2 => u64::MAX,
                _ => raw >> 3,
            };
            let text = match kind {
                Raw::Bytes | Raw::Count => n.to_string(),
                Raw::Millis => format!("{n}ms"),
                Raw::Rate => format!("{}", n as f64 / 1000.0),
            };
            (key, text)
        });
        Render { spec, broken, backend, closed }
    }

    /// `valid`, unless `key` is the broken one.
    fn val(&self, key: &str, valid: &str) -> String {
        match &self.broken {
            Some((k, raw)) if *k == key => raw.clone(),
            _ => valid.to_string(),
        }
    }

    fn yaml(&self) -> String {
        let s = self.spec;
        let mut y = String::from("listen: 127.0.0.1:0\nworkers: 1\npin_workers: false\n");
        y += "tls: { self_signed: [localhost] }\nadmin: { listen: null }\n";
        let q = &s.quic;
        let stream_data = pick(&["1KiB", "64KiB", "1MiB", "16MiB"], q[1]);
        let data = match stream_data {
            "1KiB" => pick(&["1KiB", "64KiB", "16MiB"], q[0]),
            "64KiB" => pick(&["64KiB", "1MiB", "4GiB"], q[0]),
            "1MiB" => pick(&["1MiB", "16MiB"], q[0]),
            _ => pick(&["16MiB", "1GiB"], q[0]),
        };
        let _ = writeln!(
            y,
            "quic: {{ max_data: {}, max_stream_data: {}, max_concurrent_streams: {}, max_header_list_size: {}, \
             max_udp_payload: {}, congestion_control: {}, retry: {}, retry_token_lifetime: {}, early_data: {}, \
             max_connections_per_worker: {}, max_new_connections_per_sec: {}, gso: {}, \
             body_buffer_per_connection: {}, body_buffer_per_worker: {} }}",
            self.val("quic.max_data", data),
            self.val("quic.max_stream_data", stream_data),
            self.val("quic.max_concurrent_streams", pick(&["1", "3", "100", "1048576"], q[2])),
            self.val("quic.max_header_list_size", pick(&["1KiB", "64KiB", "1MiB"], q[3])),
            self.val("quic.max_udp_payload", pick(&["1200", "1350", "1452", "65507"], q[4])),
            pick(&["cubic", "reno", "bbr2"], q[5]),
            pick(&["never", "never", "auto", "always"], q[6]),
            self.val("quic.retry_token_lifetime", pick(&["1s", "10s", "10m"], q[7])),
            pick(&["false", "true"], q[8]),
            self.val("quic.max_connections_per_worker", pick(&["1", "2", "100000"], q[9])),
            self.val("quic.max_new_connections_per_sec", pick(&["0", "0", "1", "1000"], q[10])),
            s.gso,
            // Budgets small enough that uploads stall on them and must be resumed (the selectors
            // are reused: the spec's layout stays what the corpus was written with).
            self.val("quic.body_buffer_per_connection", pick(&["64KiB", "128KiB", "4MiB"], q[2] / 4)),
            self.val("quic.body_buffer_per_worker", pick(&["4MiB", "128MiB"], q[3] / 4)),
        );
        let t = &s.timeouts;
        let _ = writeln!(
            y,
            "timeouts: {{ connect: {}, request: {}, idle: {}, drain: 1s, body_grace: {}, body_min_rate: {} }}",
            self.val("timeouts.connect", pick(&["1ms", "250ms", "2s", "10m"], t[0])),
            self.val("timeouts.request", pick(&["1ms", "50ms", "30s", "24h"], t[1])),
            self.val("timeouts.idle", pick(&["100ms", "3s", "30s", "24h"], t[2])),
            self.val("timeouts.body_grace", pick(&["100ms", "1s", "10s", "1h"], t[3])),
            self.val("timeouts.body_min_rate", pick(&["0", "1", "1KiB", "1MiB", "1GiB"], t[4])),
        );
        let h = &s.h2;
        let stream_window = pick(&["65535", "1MiB", "2147483647"], h[0]);
        let connection_window =
            if stream_window == "2147483647" { stream_window } else { pick(&["2147483647", "16MiB"], h[1]) };
        let _ = writeln!(
            y,
            "upstream_h2: {{ stream_window: {}, connection_window: {}, max_frame_size: {}, max_connections_per_backend: {}, \
             keepalive_interval: {}, keepalive_timeout: {} }}",
            self.val("upstream_h2.stream_window", stream_window),
            self.val("upstream_h2.connection_window", connection_window),
            self.val("upstream_h2.max_frame_size", pick(&["16384", "64KiB", "16777215"], h[2])),
            self.val("upstream_h2.max_connections_per_backend", pick(&["1", "4", "64"], h[3])),
            self.val("upstream_h2.keepalive_interval", pick(&["0s", "100ms", "30s", "1h"], h[4])),
            self.val("upstream_h2.keepalive_timeout", pick(&["1ms", "200ms", "10s", "10m"], h[5])),
        );
        let m = &s.misc;
        let _ = writeln!(
            y,
            "headers: {{ x_forwarded_for: {}, via_name: {} }}\nno_route: {{ status: {} }}\n\
             access_log: {{ target: \"off\", buffer: {} }}",
            pick(&["overwrite", "append"], m[0]),
            pick(&["spooky", "edge-1"], m[1]),
            pick(&["404", "200", "503", "599"], m[2]),
            self.val("access_log.buffer", pick(&["1", "16384", "1048576"], m[3])),
        );
        let pools = s.pools.len().clamp(1, 3);
        y += "upstreams:\n";
        for i in 0..pools {
            y += &self.pool(i, s.pools.get(i), pools);
        }
        y += "routes:\n";
        let routes = s.routes.len().clamp(1, 4);
        for i in 0..routes {
            y += &self.route(s.routes.get(i), pools);
        }
        y
    }

    fn pool(&self, i: usize, spec: Option<&PoolSpec>, pools: usize) -> String {
        let Some(p) = spec else { return format!("  p{i}: {{ backends: [{{ address: \"{}\" }}] }}\n", self.backend) };
        let balance = pick(&["round_robin", "random", "least_request", "peak_ewma", "ring_hash", "maglev"], p.balance);
        let hash = if matches!(balance, "ring_hash" | "maglev") {
            format!(", hash_key: {}", pick(&["client_ip", "path", "authority", "{ header: x-user }"], p.balance / 8))
        } else {
            String::new()
        };
        let backends: Vec<String> = p
            .backends
            .iter()
            .take(3)
            .map(|(real, w)| {
                let addr = if *real { self.backend } else { self.closed };
                let weight = self.val("pool.weight", &(u32::from(*w) % 100 + 1).to_string());
                format!("{{ address: \"{addr}\", weight: {weight} }}")
            })
            .collect();
        let backends =
            if backends.is_empty() { format!("{{ address: \"{}\" }}", self.backend) } else { backends.join(", ") };
        let o = &p.outlier;
        let base = pick(&["1ms", "10s", "1h"], o[1]);
        let max = match base {
            "1ms" => pick(&["1ms", "300s"], o[2]),
            "10s" => pick(&["10s", "24h"], o[2]),
            _ => pick(&["1h", "24h"], o[2]),
        };
        let outlier = format!(
            "{{ consecutive_failures: {}, base_ejection: {}, max_ejection: {}, max_ejected_percent: {} }}",
            pick(&["1", "5", "1000000"], o[0]),
            self.val("pool.outlier.base_ejection", base),
            self.val("pool.outlier.max_ejection", max),
            self.val("pool.outlier.max_ejected_percent", pick(&["0", "50", "100"], o[3])),
        );
        let breaker = format!(
            "{{ max_active: {}, max_pending: {} }}",
            pick(&["1", "100000", "4294967295"], p.breaker[0]),
            pick(&["1", "100000"], p.breaker[1])
        );
        let fallback = match p.fallback {
            Some(f) if pools > 1 => format!(", fallback: p{}", (i + 1 + usize::from(f) % (pools - 1)) % pools),
            _ => String::new(),
        };
        let health = match &p.health {
            Some(hc) => {
                let interval = pick(&["100ms", "5s", "1h"], hc[0]);
                let timeout = if interval == "100ms" { "1ms" } else { pick(&["1ms", "1s", "5s"], hc[1]) };
                format!(
                    ", health_check: {{ interval: {}, timeout: {timeout}, healthy_threshold: {}, unhealthy_threshold: {} }}",
                    self.val("pool.health_check.interval", interval),
                    pick(&["1", "2", "1000"], hc[2]),
                    pick(&["1", "3", "1000"], hc[3]),
                )
            }
            None => String::new(),
        };
        format!(
            "  p{i}: {{ balance: {balance}{hash}, backends: [{backends}], outlier: {outlier}, circuit_breaker: {breaker}{fallback}{health} }}\n"
        )
    }

    fn route(&self, spec: Option<&RouteSpec>, pools: usize) -> String {
        let Some(r) = spec else { return "  - { upstream: p0 }\n".into() };
        let mut route = format!(
            "  - {{ path_prefix: {}, upstream: p{}",
            pick(&["/", "/echo", "/sink", "/bytes/", "/status/"], r.path),
            usize::from(r.pool) % pools
        );
        if r.methods % 3 == 1 {
            route += ", methods: [GET, HEAD]";
        } else if r.methods % 3 == 2 {
            route += ", methods: [POST]";
        }
        if let Some(t) = r.request_timeout {
            let _ = write!(
                route,
                ", request_timeout: {}",
                self.val("route.request_timeout", pick(&["1ms", "5s", "24h"], t))
            );
        }
        if let Some(rt) = &r.retries {
            let _ = write!(
                route,
                ", retries: {{ attempts: {}, on: [connect_failure, refused_stream, reset, timeout], statuses: [503], \
                 per_try_timeout: {}, budget_percent: {} }}",
                self.val("route.retries.attempts", pick(&["0", "1", "10"], rt[0])),
                self.val("route.retries.per_try_timeout", pick(&["1ms", "3s", "24h"], rt[1])),
                pick(&["1", "20", "100"], rt[2]),
            );
        }
        if let Some(rl) = &r.rate_limit {
            let _ = write!(
                route,
                ", rate_limit: {{ rate: {}, burst: {}, key: {} }}",
                self.val("route.rate_limit.rate", pick(&["0.001", "0.2", "20", "1000000000"], rl[0])),
                self.val("route.rate_limit.burst", pick(&["1", "4", "1000000000"], rl[1])),
                pick(&["client_ip", "{ header: x-api-key }"], rl[0] / 8),
            );
        }
        route + " }\n"
    }
}

// ---------------------------------------------------------------------------------------------
// The harness

/// An HTTP/2 backend in this process (the project's test backend), for every input.
fn backend() -> SocketAddr {
    static BACKEND: OnceLock<SocketAddr> = OnceLock::new();
    *BACKEND.get_or_init(|| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port");
        let opts = crate::tools::backend::Options {
            listen: port,
            threads: 1,
            name: "fuzz".into(),
            fail_status: None,
            delay: Duration::ZERO,
            max_streams: 100,
            tls: None,
        };
        std::thread::spawn(move || crate::tools::backend::serve(opts));
        for _ in 0..500 {
            if std::net::TcpStream::connect(port).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        port
    })
}

/// A loopback TCP port with nothing listening on it.
fn closed_port() -> SocketAddr {
    static CLOSED: OnceLock<SocketAddr> = OnceLock::new();
    *CLOSED.get_or_init(|| std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port"))
}

/// What stays between inputs: the runtime and the access-log thread.
struct Harness {
    runtime: monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>,
    logger: AccessLogger,
}

thread_local! {
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

/// One worker (id 0 of 1) with its inbox link and acknowledgement channel.
struct Running {
    worker: Worker,
    link: Postbox<ToWorker>,
    acks: Receiver<Event>,
    addr: SocketAddr,
}

impl Harness {
    fn new() -> Self {
        let runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .expect("a monoio runtime for the fuzzing worker");
        let logger = access_log::start(&crate::config::AccessLog { target: "off".into(), ..Default::default() });
        Harness { runtime, logger }
    }
}

impl Running {
    /// A worker built from `snap`, the way `control::supervise` builds one (on the current
    /// runtime).
    fn start(snap: &Snapshot, logger: AccessLogger) -> anyhow::Result<Self> {
        let offloads = Offloads { gso: false, gro: false, txtime: false };
        let std_socket = bind_reuseport("127.0.0.1:0".parse().expect("address"))?;
        let addr = std_socket.local_addr()?;
        let socket = EdgeSocket::new(std_socket, offloads)?;
        let (postbox, strays) = steering::stray_mailbox()?;
        let (link, inbox) = mailbox::mailbox(None)?;
        let (events, acks) = crossbeam_channel::unbounded();
        let control = ControlLink { inbox: inbox.attach()?, acks: events };
        let ctx = WorkerCtx::new(0, snap, logger, None)?;
        let mesh = Mesh { peers: vec![postbox], strays: strays.attach()? };
        let keys = Arc::new(EdgeKeys::from_master(b"spooky reload fuzzing"));
        let worker = Worker::new(0, vec![socket], snap, ctx, control, mesh, keys)?;
        Ok(Running { worker, link, acks, addr })
    }

    /// Lets the worker run `turns` turns, with its timers `ahead` of the clock, and its
    /// upstream tasks (and the backend, on its own thread) a moment between turns.
    async fn run(&mut self, client: &mut Client, turns: usize, ahead: Duration) {
        for _ in 0..turns {
            client.flush();
            self.worker.turn_ahead(ahead).await;
            monoio::time::sleep(Duration::from_micros(200)).await;
            client.receive();
            client.poll();
        }
    }
}

/// A quiche HTTP/3 client on its own loopback socket.
struct Client {
    sock: UdpSocket,
    local: SocketAddr,
    conn: quiche::Connection,
    h3: Option<h3::Connection>,
    /// Request streams, and which of them still send body.
    streams: Vec<u64>,
    uploads: Vec<u64>,
    buf: Vec<u8>,
}

impl Client {
    fn connect(server: SocketAddr) -> anyhow::Result<Self> {
        let sock = UdpSocket::bind("127.0.0.1:0")?;
        sock.connect(server)?;
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
        config.set_application_protos(h3::APPLICATION_PROTOCOL)?;
        config.verify_peer(false);
        config.set_max_idle_timeout(30_000);
        config.set_initial_max_data(16 << 20);
        config.set_initial_max_stream_data_bidi_local(1 << 20);
        config.set_initial_max_stream_data_bidi_remote(1 << 20);
        config.set_initial_max_stream_data_uni(1 << 20);
        config.set_initial_max_streams_bidi(100);
        config.set_initial_max_streams_uni(8);
        let scid = [0x3c; 16];
        let conn =
            quiche::connect(Some("localhost"), &quiche::ConnectionId::from_ref(&scid), local, server, &mut config)?;
        Ok(Client { sock, local, conn, h3: None, streams: Vec::new(), uploads: Vec::new(), buf: vec![0; 65_535] })
    }

    fn flush(&mut self) {
        while let Ok((n, _)) = self.conn.send(&mut self.buf) {
            let _ = self.sock.send(&self.buf[..n]);
        }
    }

    fn receive(&mut self) {
        while let Ok((n, from)) = self.sock.recv_from(&mut self.buf) {
            let _ = self.conn.recv(&mut self.buf[..n], quiche::RecvInfo { from, to: self.local });
        }
    }

    /// Sets up HTTP/3 once the handshake is done, and reads whatever arrived.
    fn poll(&mut self) {
        if self.h3.is_none() && self.conn.is_established() {
            self.h3 = h3::Config::new().and_then(|c| h3::Connection::with_transport(&mut self.conn, &c)).ok();
        }
        let Some(h3) = self.h3.as_mut() else { return };
        let mut body = [0u8; 16 * 1024];
        loop {
            match h3.poll(&mut self.conn) {
                Ok((sid, h3::Event::Data)) => {
                    while h3.recv_body(&mut self.conn, sid, &mut body).is_ok_and(|n| n > 0) {}
                }
                Ok((sid, h3::Event::Finished | h3::Event::Reset(_))) => self.uploads.retain(|&s| s != sid),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    fn request(&mut self, method: &str, path: &str, length: Option<u64>, fin: bool) -> Option<u64> {
        let h3 = self.h3.as_mut()?;
        let mut headers = vec![
            h3::Header::new(b":method", method.as_bytes()),
            h3::Header::new(b":scheme", b"https"),
            h3::Header::new(b":authority", b"localhost"),
            h3::Header::new(b":path", path.as_bytes()),
            h3::Header::new(b"x-user", b"fuzz"),
        ];
        let length = length.map(|n| n.to_string());
        if let Some(n) = &length {
            headers.push(h3::Header::new(b"content-length", n.as_bytes()));
        }
        let sid = h3.send_request(&mut self.conn, &headers, fin).ok()?;
        self.streams.push(sid);
        Some(sid)
    }

    fn send_body(&mut self, sid: u64, len: usize, fin: bool) {
        let Some(h3) = self.h3.as_mut() else { return };
        let chunk = vec![0x5a; len];
        let _ = h3.send_body(&mut self.conn, sid, &chunk, fin);
    }

    fn step(&mut self, step: &Step, ahead: &mut Duration) {
        match *step {
            Step::Get(p) => {
                self.request(pick(&["GET", "HEAD", "GET", "DELETE"], p / 8), pick(&PATHS, p), None, true);
            }
            Step::Upload { path, declared, first } => {
                let declared = declared.map(|d| u64::from(d) * 16);
                if let Some(sid) = self.request("POST", pick(&PATHS, path), declared, false) {
                    self.send_body(sid, usize::from(first) % 65_536, false);
                    self.uploads.push(sid);
                }
            }
            Step::Body { upload, len } => {
                if let Some(&sid) = self.uploads.get(usize::from(upload) % self.uploads.len().max(1)) {
                    self.send_body(sid, usize::from(len), false);
                }
            }
            Step::Finish(n) => {
                if !self.uploads.is_empty() {
                    let sid = self.uploads.remove(usize::from(n) % self.uploads.len());
                    self.send_body(sid, 0, true);
                }
            }
            Step::Reset(n) => {
                if let Some(&sid) = self.streams.get(usize::from(n) % self.streams.len().max(1)) {
                    let _ = self.conn.stream_shutdown(sid, quiche::Shutdown::Write, h3_error::REQUEST_CANCELLED);
                    let _ = self.conn.stream_shutdown(sid, quiche::Shutdown::Read, h3_error::REQUEST_CANCELLED);
                    self.uploads.retain(|&s| s != sid);
                }
            }
            Step::Elapse(units) => *ahead += Duration::from_millis(250) * u32::from(units),
            Step::Run => {}
        }
    }
}

/// Most steps per phase, so one input stays short.
const MAX_STEPS: usize = 24;
/// Worker turns after each step (more for [`Step::Run`]).
const TURNS: usize = 2;
const RUN_TURNS: usize = 12;

/// Configuration A on a real worker with a client and requests in flight, then B applied the
/// way a reload applies it, then more requests.
///
/// Invariants: nothing panics; a configuration the generator built without `breakage` is
/// accepted; a refused one names its file and a key; a snapshot accepted (and not needing a
/// restart) is applied by the worker without error, acknowledged with its version, and closes
/// no connection; a refused or restart-requiring one leaves the worker on A; once every stream
/// ended, no request-body byte is still charged to the worker's budget.
pub fn reload_apply(data: &[u8]) {
    let Ok(input) = ReloadInput::arbitrary_take_rest(Unstructured::new(data)) else { return };
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        let Harness { runtime, logger } = h.get_or_insert_with(Harness::new);
        runtime.block_on(check(&input, logger.clone()));
    });
}

/// One input. Everything it builds lives and ends inside the runtime: monoio tasks woken
/// from outside their runtime panic.
async fn check(input: &ReloadInput, logger: AccessLogger) {
    let (backend, closed) = (backend(), closed_port());
    let Some(a) = snapshot(&input.a, "fuzz-a.yaml", 1, backend, closed) else { return };
    let mut w = Running::start(&a, logger).expect("a snapshot the control thread accepted builds a worker");
    let Ok(mut client) = Client::connect(w.addr) else { return };
    let turns = |step: &Step| if matches!(step, Step::Run) { RUN_TURNS } else { TURNS };
    let mut ahead = Duration::ZERO;
    w.run(&mut client, 8, ahead).await;
    for step in input.before.iter().take(MAX_STEPS) {
        client.step(step, &mut ahead);
        w.run(&mut client, turns(step), ahead).await;
    }
    let b = snapshot(&input.b, "fuzz-b.yaml", 2, backend, closed);
    let applies = b.as_ref().is_some_and(|b| a.restart_needed(b).is_none());
    if let Some(b) = b.filter(|_| applies) {
        while w.acks.try_recv().is_ok() {}
        let before = w.worker.connection_count();
        assert!(w.link.send(ToWorker::Apply(Arc::new(b))).is_ok());
        w.worker.handle_control_now();
        assert_eq!(w.worker.connection_count(), before, "applying a snapshot closed a connection");
        match w.acks.try_recv() {
            Ok(Event::Applied { worker: 0, version: 2, error: None }) => {}
            Ok(Event::Applied { error, version, .. }) => panic!("version {version} not applied: {error:?}"),
            _ => panic!("the worker did not acknowledge the snapshot"),
        }
    }
    for step in input.after.iter().take(MAX_STEPS) {
        client.step(step, &mut ahead);
        w.run(&mut client, turns(step), ahead).await;
    }
    assert_eq!(w.worker.version(), if applies { 2 } else { 1 });
    // End every stream, so their upstream tasks stop, before the next input.
    w.worker.close_all();
    assert_eq!(w.worker.body_bytes_held(), 0, "request-body bytes still charged after every stream ended");
    w.run(&mut client, 2, ahead).await;
}

/// The snapshot the control thread would make of `spec`, or `None` if it refuses it (checked).
fn snapshot(spec: &ConfigSpec, name: &str, version: u64, backend: SocketAddr, closed: SocketAddr) -> Option<Snapshot> {
    let yaml = Render::new(spec, backend, closed).yaml();
    let source = Source::File(Path::new("/nonexistent-spooky-fuzz").join(name));
    match Snapshot::from_text(&yaml, &source, Path::new("/nonexistent-spooky-fuzz"), version) {
        Ok(s) => Some(s),
        Err(e) => {
            assert!(spec.breakage.is_some(), "a configuration built from legal values was refused: {e}\n{yaml}");
            assert!(e.starts_with(&source.describe()) && e.contains('`'), "refusal without file or key: {e}");
            None
        }
    }
}

/// The seed corpus: inputs of chosen shapes, written byte for byte the way `arbitrary` reads
/// them back (`cargo test --test fuzz_regressions -- --ignored write_seed_corpora`).
pub fn reload_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let plain = |min_rate: u8| ConfigSpec {
        // 1 MiB windows, 100 streams, no Retry, no connection limits.
        quic: [0, 2, 2, 1, 1, 0, 0, 1, 0, 2, 0],
        // connect 2s, request 30s, idle 30s, body_grace 10s, body_min_rate by index
        // (0: off, 1: 1 B/s, 2: 1KiB, 3: 1MiB).
        timeouts: [2, 2, 2, 2, min_rate, 0],
        h2: [1, 1, 1, 1, 2, 2],
        misc: [0, 0, 0, 1],
        pools: Vec::new(),
        routes: Vec::new(),
        gso: false,
        breakage: None,
    };
    let upload = |path: u8| Step::Upload { path, declared: None, first: 30_000 };
    let body = || Step::Body { upload: 0, len: 40_000 };
    let pools = || {
        let pool = |balance: u8, fallback: Option<u8>| PoolSpec {
            balance,
            backends: vec![(true, 3), (false, 1), (true, 1)],
            outlier: [0, 1, 1, 1],
            breaker: [1, 1],
            fallback,
            health: Some([1, 1, 1, 1]),
        };
        vec![pool(5, Some(0)), pool(2, None)]
    };
    let route = |path: u8, pool: u8| RouteSpec {
        path,
        methods: 0,
        pool,
        request_timeout: Some(1),
        retries: Some([1, 1, 1]),
        rate_limit: Some([3, 2]),
    };
    let inputs = [
        // The crash of issue 11: an upload paced at 1 KiB/s under A keeps sending body after
        // B turned the rate off (`body_min_rate: 0`).
        (
            "body-rate-off-mid-upload",
            ReloadInput {
                a: plain(2),
                b: plain(0),
                before: vec![upload(2), Step::Run],
                after: vec![body(), Step::Run, body(), Step::Finish(0), Step::Run],
            },
        ),
        // A stream paced under A is judged by A's grace and rate after a reload to others.
        (
            "slow-body-after-reload",
            ReloadInput {
                a: ConfigSpec { timeouts: [2, 2, 2, 1, 3, 0], ..plain(3) },
                b: ConfigSpec { timeouts: [2, 2, 2, 3, 1, 0], ..plain(1) },
                before: vec![upload(1), Step::Run],
                after: vec![Step::Elapse(20), Step::Run, Step::Body { upload: 0, len: 100 }, Step::Run],
            },
        ),
        (
            "traffic-across-a-reload",
            ReloadInput {
                a: plain(2),
                b: ConfigSpec { pools: pools(), routes: vec![route(2, 0), route(0, 1)], ..plain(1) },
                before: vec![Step::Get(0), Step::Get(4), upload(1), Step::Run],
                after: vec![
                    body(),
                    Step::Get(3),
                    Step::Finish(0),
                    Step::Run,
                    Step::Reset(1),
                    Step::Elapse(60),
                    Step::Run,
                ],
            },
        ),
        (
            "refused-reload",
            ReloadInput {
                a: plain(2),
                // timeouts.body_grace: 0ms.
                b: ConfigSpec { breakage: Some((11, 0)), ..plain(0) },
                before: vec![upload(2)],
                after: vec![body(), Step::Finish(0), Step::Run],
            },
        ),
        (
            "restart-required",
            ReloadInput {
                a: plain(2),
                b: ConfigSpec { gso: true, ..plain(2) },
                before: vec![Step::Get(0)],
                after: vec![Step::Get(0), Step::Run],
            },
        ),
    ];
    inputs.into_iter().map(|(name, input)| (name, encode(&input))).collect()
}

/// `input` as the bytes `ReloadInput::arbitrary_take_rest` decodes back into it.
fn encode(input: &ReloadInput) -> Vec<u8> {
    let mut out = Vec::new();
    config(&mut out, &input.a);
    config(&mut out, &input.b);
    list(&mut out, &input.before, step);
    list(&mut out, &input.after, step);
    out
}

/// A collection: each element after a `true`, then `false`.
fn list<T>(out: &mut Vec<u8>, items: &[T], mut each: impl FnMut(&mut Vec<u8>, &T)) {
    for item in items {
        out.push(1);
        each(out, item);
    }
    out.push(0);
}

fn option<T>(out: &mut Vec<u8>, value: &Option<T>, each: impl FnOnce(&mut Vec<u8>, &T)) {
    match value {
        Some(v) => {
            out.push(1);
            each(out, v);
        }
        None => out.push(0),
    }
}

/// Variant `k` of `n`: a `u32` that derive(Arbitrary) scales to `k` (`(v × n) >> 32`).
fn variant(out: &mut Vec<u8>, k: u64, n: u64) {
    let v = (k << 32).div_ceil(n);
    out.extend_from_slice(&(v as u32).to_le_bytes());
}

fn config(out: &mut Vec<u8>, c: &ConfigSpec) {
    out.extend_from_slice(&c.quic);
    out.extend_from_slice(&c.timeouts);
    out.extend_from_slice(&c.h2);
    out.extend_from_slice(&c.misc);
    list(out, &c.pools, |out, p| {
        out.push(p.balance);
        list(out, &p.backends, |out, (real, weight)| out.extend_from_slice(&[u8::from(*real), *weight]));
        out.extend_from_slice(&p.outlier);
        out.extend_from_slice(&p.breaker);
        option(out, &p.fallback, |out, f| out.push(*f));
        option(out, &p.health, |out, h| out.extend_from_slice(h));
    });
    list(out, &c.routes, |out, r| {
        out.extend_from_slice(&[r.path, r.methods, r.pool]);
        option(out, &r.request_timeout, |out, t| out.push(*t));
        option(out, &r.retries, |out, rt| out.extend_from_slice(rt));
        option(out, &r.rate_limit, |out, rl| out.extend_from_slice(rl));
    });
    out.push(u8::from(c.gso));
    option(out, &c.breakage, |out, (key, raw)| {
        out.push(*key);
        out.extend_from_slice(&raw.to_le_bytes());
    });
}

fn step(out: &mut Vec<u8>, s: &Step) {
    const VARIANTS: u64 = 7;
    match *s {
        Step::Get(p) => {
            variant(out, 0, VARIANTS);
            out.push(p);
        }
        Step::Upload { path, declared, first } => {
            variant(out, 1, VARIANTS);
            out.push(path);
            option(out, &declared, |out, d| out.extend_from_slice(&d.to_le_bytes()));
            out.extend_from_slice(&first.to_le_bytes());
        }
        Step::Body { upload, len } => {
            variant(out, 2, VARIANTS);
            out.push(upload);
            out.extend_from_slice(&len.to_le_bytes());
        }
        Step::Finish(n) => {
            variant(out, 3, VARIANTS);
            out.push(n);
        }
        Step::Reset(n) => {
            variant(out, 4, VARIANTS);
            out.push(n);
        }
        Step::Elapse(n) => {
            variant(out, 5, VARIANTS);
            out.push(n);
        }
        Step::Run => variant(out, 6, VARIANTS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_decode_to_the_inputs_they_were_written_from() {
        for (name, bytes) in reload_seeds() {
            let decoded = ReloadInput::arbitrary_take_rest(Unstructured::new(&bytes)).expect("decodes");
            assert_eq!(encode(&decoded), bytes, "{name}");
        }
        assert_eq!(BREAKABLE[11].0, "timeouts.body_grace", "the refused-reload seed breaks this key");
    }
}
