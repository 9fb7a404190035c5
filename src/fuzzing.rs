//! Checks behind the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer), and the harness that
//! feeds datagrams to a real worker.
//!
//! Every target in `fuzz/fuzz_targets/` is one line calling a function here, so the same
//! checks run on stable in `cargo test` (`tests/fuzz_regressions.rs` replays every file of
//! `fuzz/corpus/` and `fuzz/regressions/`). A check panics when an invariant breaks; that
//! panic is the crash libFuzzer reports. Structured targets decode their input with
//! [`arbitrary`], so a corpus file means the same thing to libFuzzer and to the replay.
//!
//! | target | what it checks |
//! |---|---|
//! | [`h3_request_head`] | request validation and mapping to HTTP/2, trailers, response mapping |
//! | [`config_parse`] | YAML → validated [`Config`]: `Ok` re-validates, `Err` explains itself |
//! | [`cid_steering`] | the reuseport cBPF program (interpreted) against the rule in plain Rust |
//! | [`retry_token`] | Retry tokens: no forgery, seal/open round trip, any change refused |
//! | [`datagram_entry`] | one datagram into a real worker's receive path |
//! | [`reload_apply`] | configuration A on a worker with requests in flight, then B applied as a reload applies it |

use crate::bridge::request::{self, RequestIds};
use crate::bridge::{response, CONNECTION_SPECIFIC};
use crate::config::{self, Config, ForwardedMode, HeaderPolicy};
use crate::control::mailbox::{self, AttachedMailbox};
use crate::control::snapshot::{Snapshot, Source};
use crate::control::ControlLink;
use crate::edge::cid::{self, CidGenerator, CID_LEN, WORKER_OFFSET};
use crate::edge::keys::EdgeKeys;
use crate::edge::retry::{self, TokenError};
use crate::edge::socket::{bind_reuseport, EdgeSocket, Offloads};
use crate::edge::steering::{self, Stray};
use crate::edge::worker::{Mesh, Worker, WorkerCtx};
use crate::telemetry::access_log;
use arbitrary::{Arbitrary, Unstructured};
use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

mod reload_apply;
pub use reload_apply::{reload_apply, reload_seeds};

// ---------------------------------------------------------------------------------------------
// h3_request_head

/// Field names the request fuzzer picks from (or it makes up its own bytes).
const NAMES: &[&str] = &[
    ":method",
    ":scheme",
    ":authority",
    ":path",
    ":protocol",
    ":status",
    "host",
    "te",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "via",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "accept",
    "cookie",
];
/// Values the request fuzzer picks from (or it makes up its own bytes).
const VALUES: &[&str] = &[
    "GET",
    "POST",
    "OPTIONS",
    "CONNECT",
    "https",
    "http",
    "a.example",
    "a.example:443",
    "user@a.example",
    "[::1]:8443",
    "/",
    "/x?y=1",
    "/a b",
    "/p#frag",
    "/%zz\x7f",
    "*",
    "trailers",
    "0",
    "12",
    "1.1 cdn",
    "10.0.0.1",
];

/// A field name or value: one of the usual ones, or arbitrary bytes.
#[derive(Debug, Arbitrary)]
enum Text {
    Known(u8),
    Raw(Vec<u8>),
}

impl Text {
    fn bytes(&self, table: &[&'static str]) -> Vec<u8> {
        match self {
            Text::Known(i) => table[usize::from(*i) % table.len()].as_bytes().to_vec(),
            Text::Raw(b) => b.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
struct HeadInput {
    fields: Vec<(Text, Text)>,
    trailers: Vec<(Text, Text)>,
    client: ([u8; 16], u16, bool),
    append: bool,
    status: u16,
    upstream_headers: Vec<(Text, Text)>,
}

fn pairs(list: &[(Text, Text)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    list.iter().map(|(n, v)| (n.bytes(NAMES), v.bytes(VALUES))).collect()
}

fn addr(ip: [u8; 16], port: u16, v4: bool) -> SocketAddr {
    let ip = if v4 { IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])) } else { IpAddr::V6(Ipv6Addr::from(ip)) };
    SocketAddr::new(ip, port)
}

/// Request head validation and the HTTP/2 request built from it, trailers, and the response
/// head and trailers mapped back to HTTP/3, the way `edge::connection` calls them.
///
/// Invariants: nothing panics; a head that validates has a valid method, `:authority` and path
/// and no connection-specific or `host` field, and maps to an HTTP/2 request with exactly that
/// method, authority and path, forwarding headers set by policy and no connection-specific
/// field; a response section has `:status` first, never a connection-specific field or `te`,
/// and `via` last.
pub fn h3_request_head(data: &[u8]) {
    let Ok(input) = HeadInput::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let fields = pairs(&input.fields);
    let client = addr(input.client.0, input.client.1, input.client.2);
    let policy = HeaderPolicy {
        x_forwarded_for: if input.append { ForwardedMode::Append } else { ForwardedMode::Overwrite },
        ..HeaderPolicy::default()
    };
    if let Ok(mut head) = request::parse_head(fields.iter().map(|(n, v)| (&n[..], &v[..]))) {
        check_valid_head(&head, &fields);
        let id = RequestIds::new().ensure(&mut head.headers);
        assert_eq!(head.headers["x-request-id"], id.as_str());
        if head.method != http::Method::CONNECT {
            // The connection answers CONNECT itself; everything else goes upstream.
            let (method, authority, path) = (head.method.clone(), head.authority.clone(), head.path.clone());
            let prior_xff = head.headers.get("x-forwarded-for").cloned();
            let req = request::to_upstream(head, client, &policy);
            check_upstream_request(&req, &method, &authority, &path, prior_xff, client, &policy);
        }
    }
    let trailers = pairs(&input.trailers);
    if let Ok(map) = request::parse_trailers(trailers.iter().map(|(n, v)| (&n[..], &v[..]))) {
        for name in map.keys() {
            assert!(!CONNECTION_SPECIFIC.contains(&name.as_str()), "trailer {name} accepted");
        }
    }
    check_response(input.status, &pairs(&input.upstream_headers));
}

fn check_valid_head(head: &request::RequestHead, fields: &[(Vec<u8>, Vec<u8>)]) {
    assert!(http::Method::from_bytes(head.method.as_str().as_bytes()).is_ok());
    assert!(
        !head.authority.is_empty() && http::uri::Authority::try_from(head.authority.as_str()).is_ok(),
        "invalid authority {:?} accepted",
        head.authority
    );
    // RFC 9114 §4.3.1: no userinfo in the authority of an http/https request.
    assert!(!head.authority.contains('@'), "userinfo in {:?} accepted", head.authority);
    if head.method == http::Method::CONNECT {
        assert!(head.scheme.is_empty() && head.path.is_empty());
    } else {
        assert!(
            head.path.starts_with('/') || (head.path == "*" && head.method == http::Method::OPTIONS),
            "invalid path {:?} accepted",
            head.path
        );
        assert!(!head.scheme.is_empty());
    }
    for (name, value) in &head.headers {
        let n = name.as_str();
        assert!(!CONNECTION_SPECIFIC.contains(&n), "{n} kept");
        assert!(n != "host" || head.method == http::Method::CONNECT, "host kept");
        assert!(!n.bytes().any(|b| b.is_ascii_uppercase()));
        if n == "te" {
            assert!(value.as_bytes().eq_ignore_ascii_case(b"trailers"), "te: {value:?} accepted");
        }
    }
    let host_removed = head.method != http::Method::CONNECT;
    let dropped = |n: &[u8]| n.starts_with(b":") || (host_removed && n == b"host");
    let regular = fields.iter().filter(|(n, _)| !dropped(n)).count();
    assert_eq!(head.headers.len(), regular, "a regular field was lost or invented");
    let lengths = head.headers.get_all("content-length").iter().map(|v| v.to_str().ok().and_then(|s| s.parse().ok()));
    match head.content_length {
        Some(n) => assert!(lengths.into_iter().all(|l| l == Some(n)), "content-length {n} from {fields:?}"),
        None => assert_eq!(lengths.count(), 0, "content-length ignored"),
    }
}

fn check_upstream_request(
    req: &http::Request<()>,
    method: &http::Method,
    authority: &str,
    path: &str,
    prior_xff: Option<http::HeaderValue>,
    client: SocketAddr,
    policy: &HeaderPolicy,
) {
    assert_eq!(req.method(), method);
    assert_eq!(req.version(), http::Version::HTTP_2);
    let uri = req.uri();
    assert_eq!(uri.authority().map(|a| a.as_str()), Some(authority), "authority changed: {uri}");
    assert_eq!(uri.path_and_query().map(|p| p.as_str()), Some(path), "path changed: {uri}");
    assert!(uri.scheme().is_some());
    for name in req.headers().keys() {
        assert!(!CONNECTION_SPECIFIC.contains(&name.as_str()) && name != "host", "{name} forwarded");
    }
    let ip = client.ip().to_string();
    let xff = req.headers().get_all("x-forwarded-for").iter().collect::<Vec<_>>();
    assert_eq!(xff.len(), 1, "one x-forwarded-for");
    let expected = match (policy.x_forwarded_for, prior_xff.as_ref().and_then(|v| v.to_str().ok())) {
        (ForwardedMode::Append, Some(prev)) => format!("{prev}, {ip}"),
        _ => ip,
    };
    assert_eq!(xff[0], expected.as_str());
    assert_eq!(req.headers()["x-forwarded-proto"], "https");
    let via = req.headers().get_all("via").iter().collect::<Vec<_>>();
    assert_eq!(via.len(), 1, "one via");
    let ours = format!("3 {}", policy.via_name);
    assert!(via[0] == ours.as_str() || via[0].as_bytes().ends_with(format!(", {ours}").as_bytes()), "via: {via:?}");
}

/// Maps an upstream response (the valid part of `fields`) back to HTTP/3.
fn check_response(status: u16, fields: &[(Vec<u8>, Vec<u8>)]) {
    use quiche::h3::NameValue;
    let Ok(status) = http::StatusCode::from_u16(status) else { return };
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    for (n, v) in fields {
        if let (Ok(n), Ok(v)) = (http::HeaderName::from_bytes(n), http::HeaderValue::from_bytes(v)) {
            parts.headers.append(n, v);
        }
    }
    let out = response::head_to_h3(&parts, &response::Added { via_name: "spooky".into(), alt_svc: None });
    assert_eq!(out[0].name(), b":status");
    assert_eq!(out[0].value(), status.as_str().as_bytes());
    let last = out.last().expect("via");
    assert_eq!(last.name(), b"via");
    assert!(last.value().ends_with(b"2 spooky"));
    assert!(http::HeaderValue::from_bytes(last.value()).is_ok(), "via is not a valid value");
    for h in &out[1..] {
        let name = std::str::from_utf8(h.name()).expect("names are ASCII");
        assert!(!name.starts_with(':') && !CONNECTION_SPECIFIC.contains(&name) && name != "te", "{name} sent");
        assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
    }
    let dropped = |n: &http::HeaderName| CONNECTION_SPECIFIC.contains(&n.as_str()) || n == "te" || n == "via";
    let kept = parts.headers.iter().filter(|(n, _)| !dropped(n)).count();
    assert_eq!(out.len(), kept + 2, "a response field was lost or invented");
    let trailers = response::trailers_to_h3(&parts.headers);
    assert!(trailers.iter().all(|h| !CONNECTION_SPECIFIC.contains(&std::str::from_utf8(h.name()).unwrap_or(""))));
}

// ---------------------------------------------------------------------------------------------
// config_parse

/// YAML text through [`config::parse`] (as UTF-8; other bytes are skipped).
///
/// Invariants: nothing panics; an `Ok` config passes validation again unchanged and parsing is
/// deterministic; an `Err` names the file and has a message, and a key unless the document as
/// a whole is wrong (a YAML syntax or top-level type error, which carries a line instead).
pub fn config_parse(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let base = Path::new("/nonexistent-spooky-fuzz");
    match config::parse(text, "fuzz.yaml", base) {
        Ok(c) => {
            let mut again: Config = c.clone();
            if let Err((key, problem)) = config::validate(&mut again, base) {
                panic!("an accepted configuration fails validation again: `{key}`: {problem}");
            }
            assert_eq!(format!("{c:?}"), format!("{again:?}"), "validation is not idempotent");
            let twice = config::parse(text, "fuzz.yaml", base).expect("parsing is deterministic");
            assert_eq!(format!("{c:?}"), format!("{twice:?}"));
        }
        Err(e) => {
            assert_eq!(e.file, "fuzz.yaml");
            assert!(!e.problem.trim().is_empty(), "empty message: {e:?}");
            assert!(!e.key.is_empty() || e.line.is_some() || e.problem.contains("Config"), "no key: {e:?}");
            assert!(!e.to_string().is_empty());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// cid_steering

/// What the steering program returns to mean "use the kernel's hash".
pub const STEER_FALLBACK: u32 = u32::MAX;

/// The steering rule in plain Rust, independent of the cBPF program: a short-header packet
/// goes to the worker named by a 16-byte Spooky DCID at offset 1; a long-header packet whose
/// DCID length byte (offset 5) is 16 and whose DCID (offset 6) has Spooky's layout goes to that
/// worker; a worker id past the group, or anything else, falls back to the kernel's hash.
pub fn steer_reference(pkt: &[u8], workers: u32) -> u32 {
    let dcid = match pkt.first() {
        Some(b) if b & 0x80 == 0 => pkt.get(1..1 + CID_LEN),
        Some(_) if pkt.get(5) == Some(&(CID_LEN as u8)) => pkt.get(6..6 + CID_LEN),
        _ => None,
    };
    // Spooky's layout: the low five bits of byte 0 hold the length of the rest (15).
    let worker = dcid.filter(|d| d[0] & 0x1f == 15).map(|d| d[3]);
    match worker {
        Some(w) if u32::from(w) < workers => u32::from(w),
        _ => STEER_FALLBACK,
    }
}

#[derive(Debug, Arbitrary)]
struct SteeringInput {
    workers: u8,
    datagram: Vec<u8>,
    rotation: u8,
    server_id: u16,
    worker: u8,
    long: bool,
    tail: Vec<u8>,
}

/// Differential check of the reuseport steering program ([`steering::program`], run by
/// [`steering::run_program`]) against [`steer_reference`] and [`cid::worker_of`], for an
/// arbitrary datagram and for packets carrying a CID from a real [`CidGenerator`].
pub fn cid_steering(data: &[u8]) {
    let Ok(input) = SteeringInput::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let workers = u32::from(input.workers) + 1; // the configuration allows 1..=256
    let prog = steering::program(workers);
    let pkt = &input.datagram;
    let got = steering::run_program(&prog, pkt);
    let want = steer_reference(pkt, workers);
    assert_eq!(got, want, "program and rule disagree for {workers} workers on {pkt:02x?}");
    if want != STEER_FALLBACK {
        let dcid = if pkt[0] & 0x80 == 0 { &pkt[1..1 + CID_LEN] } else { &pkt[6..6 + CID_LEN] };
        assert_eq!(cid::worker_of(dcid).map(u32::from), Some(want), "worker_of disagrees");
    }
    // A CID Spooky issued steers to its worker, in either header form.
    let rotation = input.rotation % 7;
    let g = CidGenerator::new(rotation, input.server_id, input.worker);
    let c = g.generate();
    assert_eq!(cid::worker_of(&c), Some(input.worker));
    assert!(g.issued_here(&c));
    assert!(CidGenerator::new(rotation, input.server_id, input.worker.wrapping_add(1)).issued_here(&c));
    assert!(!CidGenerator::new(rotation, input.server_id.wrapping_add(1), input.worker).issued_here(&c));
    assert!(!CidGenerator::new((rotation + 1) % 7, input.server_id, input.worker).issued_here(&c));
    assert!(!g.issued_here(&c[..CID_LEN - 1]));
    assert_eq!(c[WORKER_OFFSET], input.worker);
    let mut pkt = if input.long { vec![0xc0 | (input.rotation & 0x3f), 0, 0, 0, 1, CID_LEN as u8] } else { vec![0x40] };
    pkt.extend_from_slice(&c);
    pkt.extend_from_slice(&input.tail);
    let expected = if u32::from(input.worker) < workers { u32::from(input.worker) } else { STEER_FALLBACK };
    assert_eq!(steering::run_program(&prog, &pkt), expected, "a Spooky CID misrouted: {pkt:02x?}");
}

// ---------------------------------------------------------------------------------------------
// retry_token

/// Which single input of an `open` the round trip changes.
#[derive(Debug, Arbitrary)]
enum Change {
    TokenByte(u16, u8),
    Truncate(u16),
    Extend(u8),
    Ip(u8),
    Port(u16),
    Cid(Vec<u8>),
    Key,
    Expired(u16),
    Future(u16),
}

#[derive(Debug, Arbitrary)]
struct RetryInput {
    token: Vec<u8>,
    client: ([u8; 16], u16, bool),
    dcid: Vec<u8>,
    odcid: Vec<u8>,
    /// Seconds since the epoch, for a clock in whole seconds.
    issued: u32,
    age: u16,
    lifetime: u16,
    change: Change,
}

thread_local! {
    /// A key nobody outside this process knows: arbitrary tokens are opened under it, so
    /// accepting one would be a forgery.
    static SECRET_KEYS: EdgeKeys = {
        let mut master = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut master).expect("OS randomness");
        EdgeKeys::from_master(&master)
    };
}

/// Retry tokens ([`retry::seal`], [`retry::open`]).
///
/// Invariants: opening arbitrary bytes never panics and never succeeds (the key is secret);
/// a token sealed for (client, CIDs, time) opens with the same inputs, to the original DCID,
/// until its lifetime is over, and fails after any single change: a token byte, its length,
/// the client's address or port, the CID, the key, the time.
pub fn retry_token(data: &[u8]) {
    let Ok(input) = RetryInput::arbitrary_take_rest(Unstructured::new(data)) else { return };
    let client = addr(input.client.0, input.client.1, input.client.2);
    // QUIC v1 connection IDs are at most 20 bytes (RFC 9000 §17.2); quiche refuses longer ones.
    let dcid = &input.dcid[..input.dcid.len().min(quiche::MAX_CONN_ID_LEN)];
    let odcid = &input.odcid[..input.odcid.len().min(quiche::MAX_CONN_ID_LEN)];
    let lifetime = Duration::from_secs(u64::from(input.lifetime.max(1)));
    let issued = UNIX_EPOCH + Duration::from_secs(u64::from(input.issued));
    let age = Duration::from_secs(u64::from(input.age)).min(lifetime);
    SECRET_KEYS.with(|keys| {
        let opened = retry::open(keys, &input.token, client, dcid, lifetime, issued + age);
        assert!(opened.is_err(), "a token we never sealed was accepted: {:02x?}", input.token);

        let token = retry::seal(keys, client, odcid, dcid, issued);
        assert!(retry::is_retry_token(&token));
        assert_eq!(retry::open(keys, &token, client, dcid, lifetime, issued + age).as_deref(), Ok(odcid));
        let mut other_client = client;
        let mut other_dcid = dcid.to_vec();
        let mut other_token = token.clone();
        let mut now = issued + age;
        let mut expect = TokenError::Invalid;
        let other_keys;
        let mut k = keys;
        match input.change {
            Change::TokenByte(i, x) => other_token[usize::from(i) % token.len()] ^= x.max(1),
            Change::Truncate(n) => other_token.truncate(usize::from(n) % token.len()),
            Change::Extend(x) => other_token.push(x),
            Change::Ip(x) => other_client.set_ip(match client.ip() {
                IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from(u32::from(ip) ^ u32::from(x.max(1)))),
                IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from(u128::from(ip) ^ u128::from(x.max(1)))),
            }),
            Change::Port(p) => other_client.set_port(client.port() ^ p.max(1)),
            Change::Cid(c) => {
                other_dcid = c[..c.len().min(quiche::MAX_CONN_ID_LEN)].to_vec();
                if other_dcid == dcid {
                    other_dcid.push(0);
                }
            }
            Change::Key => {
                other_keys = EdgeKeys::from_master(&[input.issued as u8; 32]);
                k = &other_keys;
            }
            Change::Expired(s) => {
                now = issued + lifetime + Duration::from_secs(u64::from(s.max(1)));
                expect = TokenError::Expired;
            }
            Change::Future(s) => {
                now = issued - Duration::from_secs(u64::from(s.max(1)));
                expect = TokenError::Expired;
            }
        }
        let result = retry::open(k, &other_token, other_client, &other_dcid, lifetime, now);
        assert_eq!(result, Err(expect), "a changed input was accepted or misjudged");
    });
}

// ---------------------------------------------------------------------------------------------
// datagram_entry

/// A real worker built from the embedded default configuration (self-signed certificate) on a
/// monoio runtime (epoll driver), with a loopback UDP socket, a second worker's stray mailbox
/// (for packets naming worker 1) and a client socket on loopback that every datagram comes
/// from and every answer goes to.
pub struct EdgeHarness {
    runtime: monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>>,
    snap: Snapshot,
    logger: access_log::AccessLogger,
    keys: Arc<EdgeKeys>,
    worker: Option<Worker>,
    /// Worker 1's stray mailbox: what worker 0 hands over.
    peer: Option<AttachedMailbox<Stray>>,
    client: UdpSocket,
    from: SocketAddr,
}

/// Connections a harness worker may accumulate before it is replaced by a fresh one.
const MAX_HARNESS_CONNECTIONS: usize = 32;
/// Workers in the harness's mesh (the harness worker is worker 0).
const HARNESS_WORKERS: usize = 2;

impl EdgeHarness {
    pub fn new() -> anyhow::Result<Self> {
        let runtime = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build()?;
        let snap = Snapshot::load(&Source::Embedded, 1).map_err(anyhow::Error::msg)?;
        let mut access = snap.config.access_log.clone();
        access.target = "off".into();
        let logger = access_log::start(&access);
        let client = UdpSocket::bind("127.0.0.1:0")?;
        client.set_nonblocking(true)?;
        let from = client.local_addr()?;
        let keys = Arc::new(EdgeKeys::from_master(b"spooky fuzzing harness"));
        let mut h = EdgeHarness { runtime, snap, logger, keys, worker: None, peer: None, client, from };
        h.rebuild()?;
        Ok(h)
    }

    /// Replaces the worker with a fresh one (new socket, no connections).
    fn rebuild(&mut self) -> anyhow::Result<()> {
        self.worker = None;
        self.peer = None;
        let EdgeHarness { runtime, snap, logger, keys, .. } = self;
        let (worker, peer) = runtime.block_on(async {
            let offloads = Offloads { gso: false, gro: false, txtime: false };
            let socket = EdgeSocket::new(bind_reuseport("127.0.0.1:0".parse().expect("address"))?, offloads)?;
            let mut peers = Vec::new();
            let mut boxes = Vec::new();
            for _ in 0..HARNESS_WORKERS {
                let (postbox, mailbox) = steering::stray_mailbox()?;
                peers.push(postbox);
                boxes.push(mailbox);
            }
            let peer = boxes.pop().expect("two mailboxes").attach()?;
            let strays = boxes.pop().expect("two mailboxes").attach()?;
            let (_link, inbox) = mailbox::mailbox(None)?;
            // Nobody listens to acknowledgements here.
            let control = ControlLink { inbox: inbox.attach()?, acks: crossbeam_channel::unbounded().0 };
            let ctx = WorkerCtx::new(0, snap, logger.clone(), None)?;
            let worker = Worker::new(0, vec![socket], snap, ctx, control, Mesh { peers, strays }, keys.clone())?;
            anyhow::Ok((worker, peer))
        })?;
        self.worker = Some(worker);
        self.peer = Some(peer);
        Ok(())
    }

    /// Feeds one datagram to the worker and checks what happened (see [`datagram_entry`]).
    pub fn feed(&mut self, datagram: &[u8]) {
        if self.worker.as_ref().is_some_and(|w| w.connection_count() >= MAX_HARNESS_CONNECTIONS) {
            self.rebuild().expect("rebuilding the harness worker");
        }
        let mut pkt = datagram.to_vec();
        let from = self.from;
        let (worker, peer) = (self.worker.as_mut().expect("built"), self.peer.as_ref().expect("built"));
        let before = worker.connection_count();
        self.runtime.block_on(async { worker.receive_datagram(0, &mut pkt, from) });
        let after = worker.connection_count();
        let hdr = quiche::Header::from_slice(&mut datagram.to_vec(), CID_LEN).ok();
        let owner = hdr.as_ref().and_then(|h| cid::worker_of(&h.dcid));
        assert!(after <= before + 1, "one datagram opened {} connections", after - before);
        if after > before {
            let hdr = hdr.as_ref().expect("a connection from an unparsable packet");
            assert_eq!(hdr.ty, quiche::Type::Initial, "a connection from a {:?} packet", hdr.ty);
            assert!(datagram.len() >= 1200, "a connection from a {}-byte datagram", datagram.len());
            assert!(quiche::version_is_supported(hdr.version));
        }
        // Worker 1's packets are handed over unchanged, and nothing else is.
        let mut handed = 0;
        while let Ok(stray) = peer.rx.try_recv() {
            handed += 1;
            assert_eq!(stray.data, datagram, "a stray changed on its way");
            assert_eq!((stray.from, stray.socket), (from, 0));
        }
        assert_eq!(handed > 0, owner == Some(1), "hand-over of a packet for worker {owner:?}");
        // What the worker answered at once (version negotiation, stateless reset, Retry,
        // refusal) stays within the anti-amplification limit (RFC 9000 §8).
        let mut answered = 0;
        let mut buf = [0u8; 65_536];
        while let Ok(n) = self.client.recv(&mut buf) {
            answered += n;
        }
        assert!(answered <= 3 * datagram.len(), "{answered} bytes answered to a {}-byte datagram", datagram.len());
    }
}

thread_local! {
    static EDGE: RefCell<Option<EdgeHarness>> = const { RefCell::new(None) };
}

/// One datagram into a real worker's receive path ([`Worker::receive_datagram`]), from a fixed
/// loopback address; the worker persists between inputs (replaced once it holds
/// [`MAX_HARNESS_CONNECTIONS`] connections), as it would between datagrams.
///
/// Invariants: nothing panics; a datagram opens at most one connection, and only if it is an
/// Initial of a supported version of at least 1200 bytes; a packet naming worker 1 is handed
/// to worker 1 unchanged, and no other packet is; immediate answers are at most three times
/// the datagram's size.
pub fn datagram_entry(data: &[u8]) {
    EDGE.with(|edge| {
        let mut edge = edge.borrow_mut();
        if edge.is_none() {
            *edge = Some(EdgeHarness::new().expect("building the fuzzing worker"));
        }
        edge.as_mut().expect("built").feed(data);
    });
}
