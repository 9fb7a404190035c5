//! The configuration schema, as written in `config.yaml`. Every struct rejects unknown keys so a
//! typo is an error rather than a silently ignored setting. Defaults live next to each field.

use super::resilience::{CircuitBreaker, HealthCheck, Outlier, RateLimit, Retries};
use super::units::{ByteSize, Seconds};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The whole configuration, validated by [`super::load`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP addresses to listen on for QUIC (`"0.0.0.0:443"` or a list).
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    /// Worker threads: `auto` (one per available core) or a number.
    #[serde(default)]
    pub workers: Workers,
    /// Pin each worker to its own core.
    #[serde(default = "yes")]
    pub pin_workers: bool,
    pub tls: Tls,
    #[serde(default)]
    pub quic: Quic,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub headers: HeaderPolicy,
    #[serde(default)]
    pub upstream_h2: UpstreamH2,
    /// Upstream pools by name.
    pub upstreams: BTreeMap<String, Upstream>,
    /// Routes, matched in declared order; the first match wins.
    pub routes: Vec<Route>,
    /// The answer when no route matches.
    #[serde(default)]
    pub no_route: NoRoute,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub access_log: AccessLog,
}

fn yes() -> bool {
    true
}

fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    let raw =
        Raw::deserialize(d).map_err(|_| serde::de::Error::custom("expected an address `IP:PORT` or a list of them"))?;
    let list = match raw {
        Raw::One(s) => vec![s],
        Raw::Many(v) => v,
    };
    list.iter()
        .map(|s| {
            s.parse::<SocketAddr>()
                .map_err(|_| serde::de::Error::custom(format!("`{s}` is not an `IP:PORT` socket address")))
        })
        .collect()
}

/// How many workers to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    #[default]
    Auto,
    Count(usize),
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(usize),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom("expected `auto` or a number"))? {
            Raw::Count(n) => Ok(Workers::Count(n)),
            Raw::Text(t) if t == "auto" => Ok(Workers::Auto),
            Raw::Text(t) => Err(serde::de::Error::custom(format!("expected `auto` or a number, got `{t}`"))),
        }
    }
}

impl Workers {
    /// The concrete worker count on this machine.
    pub fn resolve(self) -> usize {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        }
    }
}

/// Server certificates and session resumption. The default certificate is PEM files, or a
/// self-signed certificate generated at start (for demos and tests only; clients must skip
/// verification); `sni` adds certificates chosen by the name the client asks for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first. Relative paths are relative to the config file.
    pub cert: Option<PathBuf>,
    /// PEM private key (ECDSA, RSA or Ed25519).
    pub key: Option<PathBuf>,
    /// Generate a self-signed certificate for these names instead of reading files.
    pub self_signed: Option<Vec<String>>,
    /// More certificates, each served to clients whose SNI matches one of its names; the
    /// default certificate answers when SNI is absent or matches none.
    #[serde(default)]
    pub sni: Vec<SniCert>,
    /// How long a session-ticket key encrypts new tickets; it keeps opening them for one more
    /// period, so a ticket is honoured for at least this long (its advertised lifetime).
    #[serde(default = "default_ticket_key_rotation")]
    pub ticket_key_rotation: Seconds,
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            cert: None,
            key: None,
            self_signed: None,
            sni: Vec::new(),
            ticket_key_rotation: default_ticket_key_rotation(),
        }
    }
}

fn default_ticket_key_rotation() -> Seconds {
    Seconds(Duration::from_secs(3600))
}

/// A certificate chosen by SNI.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    /// Exact names (`api.example.com`) and wildcards (`*.example.com`, any depth below the
    /// suffix) this certificate answers; absent: the certificate's DNS subject-alternative names.
    #[serde(default)]
    pub names: Option<Vec<String>>,
    /// PEM certificate chain, leaf first. Relative paths are relative to the config file.
    pub cert: PathBuf,
    /// PEM private key (ECDSA, RSA or Ed25519).
    pub key: PathBuf,
}

/// QUIC transport limits advertised to clients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quic {
    /// Connection-level flow-control window (`initial_max_data`).
    pub max_data: ByteSize,
    /// Per-stream flow-control window (`initial_max_stream_data_bidi_remote`).
    pub max_stream_data: ByteSize,
    /// Concurrent request streams a client may open (`initial_max_streams_bidi`).
    pub max_concurrent_streams: u64,
    /// Largest UDP payload Spooky sends or accepts.
    pub max_udp_payload: usize,
    /// Largest request header section accepted (SETTINGS_MAX_FIELD_SECTION_SIZE).
    pub max_header_list_size: ByteSize,
    /// Congestion control: `bbr2` (default), `cubic` or `reno`. BBR2 follows the delivery rate,
    /// so a client that reads slower than the path (a browser) sees no drops; the loss-based
    /// two fill its receive buffer until it overflows.
    pub congestion_control: String,
    /// Send each connection's packets with UDP GSO (one system call per batch); falls back
    /// by itself where the kernel refuses. Read at start.
    pub gso: bool,
    /// Receive with UDP GRO (the kernel hands over trains of datagrams in one read). Read at
    /// start.
    pub gro: bool,
    /// Pace each connection's packets (RFC 9002 §7.7): at quiche's release times under BBR2,
    /// at 1.25 × cwnd / RTT under cubic and reno. Read at start.
    pub pacing: bool,
    /// The egress qdisc enforces `SO_TXTIME` (`fq` or `etf`): hand release times to the
    /// kernel. Off (the default, right for loopback and the usual `fq_codel`/`pfifo_fast`),
    /// Spooky holds each not-yet-due packet itself until a timer releases it. Read at start.
    pub pacing_qdisc: bool,
    /// This node's id in every connection ID it issues (CID bytes 1-2), so an L4 balancer in
    /// front of a fleet (QUIC-LB plaintext mode, Katran) routes on it. Read at start.
    pub server_id: u16,
    /// Config-rotation codepoint (0-6) in the top bits of CID byte 0. Read at start.
    pub cid_rotation: u8,
    /// Steer each packet to the worker that owns its connection with a reuseport BPF program
    /// reading the worker id in the CID. Without it, strays are forwarded between workers
    /// (correct, slower). Read at start.
    pub reuseport_bpf: bool,
    /// Address validation with stateless Retry: `never`, `always`, or `auto` (only while a
    /// worker sees more than `retry_above_rate` new connections per second).
    pub retry: RetryMode,
    pub retry_above_rate: u32,
    /// How long a Retry token stays valid.
    pub retry_token_lifetime: Seconds,
    /// How long the token Spooky sends a client in a NEW_TOKEN frame, once its handshake
    /// completed, lets the client's next connection from the same IP skip the Retry.
    pub new_token_lifetime: Seconds,
    /// A file of at least 32 random bytes keying stateless resets and Retry tokens. Default:
    /// derived from the TLS private key, so a restarted process (or a fleet sharing the key)
    /// still resets old connections; with `self_signed`, random per start. Read at start.
    pub secret_key_file: Option<PathBuf>,
    /// Let clients move to a new address or port on purpose (RFC 9000 §9). NAT rebinding is
    /// followed either way.
    pub active_migration: bool,
    /// Accept requests in 0-RTT early data: safe methods are forwarded with `early-data: 1`,
    /// others answered 425 Too Early (RFC 8470).
    pub early_data: bool,
    /// Most connections a worker holds; beyond, new ones are refused (CONNECTION_REFUSED).
    pub max_connections_per_worker: usize,
    /// Most new connections a worker accepts per second (0: no limit); beyond, refused.
    pub max_new_connections_per_sec: u32,
    /// Most request-body bytes Spooky holds for one connection's streams, and for all of a
    /// worker's; past either, it stops reading bodies from QUIC until some go upstream.
    pub body_buffer_per_connection: ByteSize,
    pub body_buffer_per_worker: ByteSize,
}

/// When Spooky sends a Retry to validate a client's address before keeping any state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryMode {
    Never,
    Always,
    Auto,
}

impl Default for Quic {
    fn default() -> Self {
        Quic {
            max_data: ByteSize(16 << 20),
            max_stream_data: ByteSize(1 << 20),
            max_concurrent_streams: 256,
            max_udp_payload: 1350,
            max_header_list_size: ByteSize(64 << 10),
            congestion_control: "bbr2".into(),
            gso: true,
            gro: true,
            pacing: true,
            pacing_qdisc: false,
            server_id: 0,
            cid_rotation: 0,
            reuseport_bpf: true,
            retry: RetryMode::Auto,
            retry_above_rate: 2_000,
            retry_token_lifetime: Seconds(Duration::from_secs(10)),
            // A day: a returning visitor (the next page view, the next morning) skips the
            // Retry; a token copied off the wire can only be replayed from the IP it was issued
            // to, and quiche keeps the 3x anti-amplification limit for connections admitted on
            // a NEW_TOKEN (no original DCID), so a replay amplifies no more than `retry: never`.
            new_token_lifetime: Seconds(Duration::from_secs(86_400)),
            secret_key_file: None,
            active_migration: true,
            early_data: false,
            max_connections_per_worker: 100_000,
            max_new_connections_per_sec: 0,
            body_buffer_per_connection: ByteSize(4 << 20),
            body_buffer_per_worker: ByteSize(128 << 20),
        }
    }
}

/// Timeouts. `request` bounds the wait for the upstream's response head; streaming bodies are
/// bounded by `idle` instead, so a long download is never cut by a whole-request deadline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect + HTTP/2 handshake to a backend (exceeded: 504).
    pub connect: Seconds,
    /// From sending the request upstream to its response head (exceeded: 504).
    pub request: Seconds,
    /// QUIC idle timeout, and the longest an upstream body may stall.
    pub idle: Seconds,
    /// On SIGTERM/SIGINT: how long in-flight requests may take to finish before connections close.
    pub drain: Seconds,
    /// Slow request bodies (slowloris): once `body_grace` has passed since the request head,
    /// the body must have arrived at `body_min_rate` bytes per second on average, or the
    /// stream is reset (H3_REQUEST_CANCELLED). Time Spooky itself stops reading (the upstream
    /// is slower) does not count against the client. `body_min_rate: 0` turns this off.
    pub body_grace: Seconds,
    pub body_min_rate: ByteSize,
    /// A response stream whose client accepts none of the bytes waiting for it for this long
    /// is reset (H3_REQUEST_CANCELLED), so a reader that stopped cannot hold upstream window
    /// and buffers forever.
    pub client_read: Seconds,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Seconds(Duration::from_secs(2)),
            request: Seconds(Duration::from_secs(30)),
            idle: Seconds(Duration::from_secs(30)),
            drain: Seconds(Duration::from_secs(10)),
            body_grace: Seconds(Duration::from_secs(10)),
            body_min_rate: ByteSize(1024),
            client_read: Seconds(Duration::from_secs(60)),
        }
    }
}

/// What Spooky does with forwarding headers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderPolicy {
    /// `overwrite` (default: the client's value is never trusted) or `append`.
    pub x_forwarded_for: ForwardedMode,
    /// The name Spooky gives itself in `via`.
    pub via_name: String,
    /// `alt-svc` on every response Spooky sends (RFC 7838), replacing a backend's, e.g.
    /// `h3=":443"; ma=86400`: clients that found Spooky through a TCP front's `Alt-Svc` keep
    /// their record of it fresh. Unset: a backend's `alt-svc` passes through unchanged.
    pub alt_svc: Option<String>,
}

impl Default for HeaderPolicy {
    fn default() -> Self {
        HeaderPolicy { x_forwarded_for: ForwardedMode::Overwrite, via_name: "spooky".into(), alt_svc: None }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ForwardedMode {
    Overwrite,
    Append,
}

/// HTTP/2 settings Spooky uses towards every backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamH2 {
    /// Per-stream receive window: bounds how much of one response Spooky buffers.
    pub stream_window: ByteSize,
    /// Connection receive window.
    pub connection_window: ByteSize,
    /// Largest frame Spooky accepts.
    pub max_frame_size: ByteSize,
    /// Connections per backend per worker, opened when the existing ones have no free stream.
    pub max_connections_per_backend: usize,
    /// A connection that carried no request for this long is closed (0: never): shorter than
    /// backends' own idle timeouts (hypercorn 5 s), so a backend never closes one under a
    /// request that is on its way.
    pub idle_timeout: Seconds,
    /// Requests one connection carries before it retires (in-flight ones finish on it): below
    /// the 1000 after which stock nginx and hypercorn end a connection themselves.
    pub max_requests_per_connection: usize,
    /// How often an idle or busy connection is PINGed (0 turns keepalive off).
    pub keepalive_interval: Seconds,
    /// How long a PING may go unanswered before the connection is closed.
    pub keepalive_timeout: Seconds,
    /// Request-body bytes held per request so that a stream the backend did not process
    /// (REFUSED_STREAM, above a GOAWAY's last stream id) can be sent again on another
    /// connection. A body that outgrew it before such a refusal gets 502 instead.
    pub replay_buffer: ByteSize,
}

impl Default for UpstreamH2 {
    fn default() -> Self {
        UpstreamH2 {
            stream_window: ByteSize(1 << 20),
            connection_window: ByteSize(16 << 20),
            max_frame_size: ByteSize(64 << 10),
            max_connections_per_backend: 4,
            idle_timeout: Seconds(Duration::from_secs(3)),
            max_requests_per_connection: 1000,
            keepalive_interval: Seconds(Duration::from_secs(30)),
            keepalive_timeout: Seconds(Duration::from_secs(10)),
            replay_buffer: ByteSize(64 << 10),
        }
    }
}

/// An upstream pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub backends: Vec<Backend>,
    /// Balancing algorithm.
    #[serde(default)]
    pub balance: Balance,
    /// What consistent-hashing algorithms (`ring_hash`, `maglev`) hash.
    #[serde(default)]
    pub hash_key: Option<HashKey>,
    /// Active health checks (off when absent).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub outlier: Outlier,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    /// Pool to use when none of this pool's backends is available (healthy, not ejected).
    #[serde(default)]
    pub fallback: Option<String>,
    /// HTTP/2 over TLS to this pool's backends (absent: h2c, prior knowledge).
    #[serde(default)]
    pub tls: Option<UpstreamTls>,
}

/// TLS towards a pool's backends.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// Name to send in SNI and verify (default: the host of each backend's `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM file of CA certificates to trust instead of the system store.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Filled by validation: the contents of `ca`, read once by the control thread.
    #[serde(skip)]
    pub ca_pem: Option<FileBytes>,
    /// Verify the backend's certificate and name (default true; false is for tests only).
    #[serde(default = "yes")]
    pub verify: bool,
}

/// The contents of a file named in the configuration, read by validation so that nothing
/// downstream (a worker building its verifier) reads the file again. Printed as its length.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct FileBytes(pub Arc<[u8]>);

impl std::fmt::Debug for FileBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// Balancing algorithms; each is one file in `lb` and honours backend weights.
#[derive(Debug, Clone, Copy, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Smooth weighted round robin (nginx's algorithm).
    #[default]
    RoundRobin,
    /// Weighted random.
    Random,
    /// Fewest outstanding requests per unit of weight among two weighted-random candidates.
    LeastRequest,
    /// Lowest peak-EWMA latency × outstanding requests among two weighted-random candidates.
    PeakEwma,
    /// Consistent hashing of `hash_key` on a ring of virtual nodes (ketama).
    RingHash,
    /// Consistent hashing of `hash_key` through a Maglev lookup table.
    Maglev,
}

impl Balance {
    /// Whether the algorithm needs a `hash_key`.
    pub fn hashes(self) -> bool {
        matches!(self, Balance::RingHash | Balance::Maglev)
    }
}

/// The request property consistent hashing keys on: `client_ip`, `path`, `authority`,
/// `{ header: NAME }` or `{ cookie: NAME }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(String),
    Cookie(String),
    ClientIp,
    Path,
    Authority,
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Name(String),
            Map(BTreeMap<String, String>),
        }
        let expected = "expected `client_ip`, `path`, `authority`, `{ header: NAME }` or `{ cookie: NAME }`";
        let raw = Raw::deserialize(d).map_err(|_| serde::de::Error::custom(expected))?;
        let key = match raw {
            Raw::Name(n) => match n.as_str() {
                "client_ip" => HashKey::ClientIp,
                "path" => HashKey::Path,
                "authority" => HashKey::Authority,
                _ => return Err(serde::de::Error::custom(format!("unknown hash key `{n}`: {expected}"))),
            },
            Raw::Map(m) if m.len() == 1 => {
                let (k, v) = m.into_iter().next().expect("one entry");
                let name = v.to_ascii_lowercase();
                match k.as_str() {
                    "header" => HashKey::Header(name),
                    "cookie" => HashKey::Cookie(v),
                    _ => return Err(serde::de::Error::custom(expected)),
                }
            }
            Raw::Map(_) => return Err(serde::de::Error::custom(expected)),
        };
        Ok(key)
    }
}

/// One backend of a pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// `host:port` of an HTTP/2 (h2c, prior knowledge) server. Names resolve once at load.
    pub address: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// Filled by validation: the resolved address.
    #[serde(skip, default = "unspecified")]
    pub addr: SocketAddr,
}

fn one() -> u32 {
    1
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// A route: requests that match every condition go to `upstream`. Routes are tried in
/// declared order and the first match wins, so put specific routes before general ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name used in metrics and access logs (default: `host` + path).
    #[serde(default)]
    pub name: Option<String>,
    /// `example.com`, `*.example.com`, or `*` (default) for any host.
    #[serde(default = "any_host")]
    pub host: String,
    /// Path prefix, starting with `/` (default `/`). Ignored when `path_exact` is set.
    #[serde(default = "root")]
    pub path_prefix: String,
    /// Exact path (the query string is not part of the comparison).
    #[serde(default)]
    pub path_exact: Option<String>,
    /// Methods this route accepts (default: any).
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header conditions: presence, or an exact value.
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    pub upstream: String,
    /// Overrides `timeouts.request` for this route.
    #[serde(default)]
    pub request_timeout: Option<Seconds>,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// A header condition of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Lower-case header name.
    pub name: String,
    /// Required value; absent means the header only has to be present.
    #[serde(default)]
    pub value: Option<String>,
}

/// What Spooky answers when no route matches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoRoute {
    pub status: u16,
    pub body: String,
}

impl Default for NoRoute {
    fn default() -> Self {
        NoRoute { status: 404, body: "no route matches".into() }
    }
}

fn any_host() -> String {
    "*".into()
}

fn root() -> String {
    "/".into()
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// A `tracing` filter such as `info` or `spooky=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log { level: "info".into() }
    }
}

impl Route {
    /// The route's name in metrics and logs.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{}{}", self.host, self.path_exact.as_ref().unwrap_or(&self.path_prefix)))
    }
}

/// The admin listener (TCP, HTTP/1.1): `/metrics`, `/healthz`, `/readyz`, `/config`, and
/// `POST /reload` when a token is configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Address to listen on; `null` disables the admin listener.
    pub listen: Option<SocketAddr>,
    /// Bearer token required by state-changing requests; without one, none are accepted.
    pub token: Option<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin { listen: Some(SocketAddr::from(([127, 0, 0, 1], 9901))), token: None }
    }
}

/// The access log: one line per request, written by a background thread.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLog {
    /// `off`, `stdout`, `stderr`, or a file path (appended to).
    pub target: String,
    /// `json` (one object per line) or `text` (space-separated `field=value`).
    pub format: AccessLogFormat,
    /// Fields, in order. Known: time, client, method, authority, path, status, bytes_in,
    /// bytes_out, route, upstream, upstream_time, total_time, request_id.
    pub fields: Vec<String>,
    /// Lines buffered before new ones are dropped (and counted) instead of blocking requests.
    pub buffer: usize,
}

/// Every access-log field Spooky knows, in the default order.
pub const ACCESS_LOG_FIELDS: [&str; 13] = [
    "time",
    "client",
    "method",
    "authority",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "route",
    "upstream",
    "upstream_time",
    "total_time",
    "request_id",
];

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            target: "off".into(),
            format: AccessLogFormat::Json,
            fields: ACCESS_LOG_FIELDS.iter().map(|f| f.to_string()).collect(),
            buffer: 16_384,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AccessLogFormat {
    Json,
    Text,
}
