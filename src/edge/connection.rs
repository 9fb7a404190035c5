//! One QUIC connection at the edge: its HTTP/3 state and the request streams it carries.
//!
//! Call order, fixed by the worker loop: [`Connection::on_input`] after packets were fed to
//! `quiche` (handles HTTP/3 events and retries streams that were blocked on QUIC flow control),
//! [`Connection::on_exchange_news`] when an upstream task has news for a stream. Both only
//! queue data in `quiche`; the worker flushes packets afterwards.
//!
//! Every stream leaves through [`Connection::finish_stream`], which records its metrics and
//! access-log line exactly once.

use super::pacing::Pacer;
use super::worker::WorkerCtx;
use crate::bridge::budget::ConnectionBudget;
use crate::bridge::exchange::{Exchange, Failure, SharedExchange, StreamKey};
use crate::bridge::{h3_error, request, response};
use crate::control::fault;
use crate::route::RequestView;
use crate::telemetry::access_log::Record;
use crate::telemetry::metrics::RouteMetrics;
use crate::transport::forward::{self, Outbound};
use bytes::{BufMut, Bytes, BytesMut};
use quiche::h3::{self, NameValue};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

/// Largest piece of request body read from QUIC at once.
const READ_CHUNK: usize = 64 * 1024;
/// H3_REQUEST_REJECTED: the request was not processed (RFC 9114 §8.1), safe to retry.
const REQUEST_REJECTED: u64 = 0x10b;

pub struct Connection {
    pub handle: u64,
    pub quic: quiche::Connection,
    h3: Option<h3::Connection>,
    streams: HashMap<u64, RequestStream>,
    /// Streams whose response is waiting for QUIC stream capacity.
    blocked: Vec<u64>,
    pub peer: SocketAddr,
    /// Index of the worker socket this connection arrived on.
    pub socket: usize,
    /// Keys of this connection in the worker's CID table.
    pub cids: Vec<Vec<u8>>,
    /// Set once the NEW_TOKEN for the client's next connection was queued.
    pub new_token_sent: bool,
    /// The quiche timer deadline last scheduled in the worker's timer heap.
    pub deadline: Option<Instant>,
    /// Set while queued for the worker's next flush.
    pub dirty: bool,
    /// Pacing schedule and the datagram held until it is due.
    pub pacer: Pacer,
    /// The fields Spooky adds to response heads (`via`, `alt-svc`).
    added: Rc<response::Added>,
    /// Request body is read here, then handed on as a chunk of its own (see [`take_chunk`]).
    read_buf: BytesMut,
    /// This connection's share of the worker's request-body budget.
    body_budget: Rc<ConnectionBudget>,
    /// Highest request stream id seen, for GOAWAY.
    max_stream_seen: Option<u64>,
    /// Set once GOAWAY was sent: streams at or above this id are refused.
    goaway_id: Option<u64>,
    /// Streams whose response is complete on our side but may not be acknowledged yet;
    /// closing the connection before quiche collects them would cut their tails off.
    finished: Vec<u64>,
}

/// Edge-side state of one request stream.
struct RequestStream {
    exchange: SharedExchange,
    /// quiche reported DATA that is not fully read yet (its events are edge-triggered).
    readable: bool,
    body_received: u64,
    content_length: Option<u64>,
    /// The request (body and trailers) is fully read, or reading was abandoned.
    recv_done: bool,
    head_sent: bool,
    /// Part of a response chunk QUIC did not accept yet.
    pending: Option<Bytes>,
    is_blocked: bool,
    status: u16,
    bytes_out: u64,
    started: Instant,
    /// Metric handles of the route this request matched (from the snapshot it started on).
    route: Rc<RouteMetrics>,
    /// While the body arrives: the minimum-rate check (slowloris), with the values of the
    /// snapshot the request started on; `None` when the check is off.
    pace: Option<BodyPace>,
    /// Details for the access log, kept only when it is enabled.
    log: Option<Box<LogInfo>>,
}

struct LogInfo {
    time: SystemTime,
    method: String,
    authority: String,
    path: String,
    request_id: String,
}

/// A request body's minimum-rate check. It keeps its own grace and rate, taken when the
/// request started, so a reload never moves a deadline with another snapshot's rate.
struct BodyPace {
    /// By when the body must have reached the minimum rate.
    deadline: Instant,
    grace: Duration,
    min_rate: NonZeroU64,
}

impl BodyPace {
    /// The check for a body starting now, if `min_rate` (bytes/s) turns it on.
    fn start(grace: Duration, min_rate: u64, now: Instant) -> Option<Self> {
        let min_rate = NonZeroU64::new(min_rate)?;
        Some(BodyPace { deadline: now + grace, grace, min_rate })
    }

    /// `n` more bytes arrived: they buy `n / min_rate` seconds.
    fn received(&mut self, n: u64) {
        let nanos = u128::from(n) * 1_000_000_000 / u128::from(self.min_rate.get());
        let step = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.deadline = self.deadline.checked_add(step).unwrap_or(self.deadline);
    }

    /// The client was not at fault (Spooky stopped reading): one more grace period from `now`.
    fn excuse(&mut self, now: Instant) {
        self.deadline = self.deadline.max(now) + self.grace;
    }
}

/// Where a stream stands after driving it.
enum Drive {
    /// Waiting for the upstream side.
    Waiting,
    /// Waiting for QUIC stream capacity: retried after the next packets.
    Blocked,
    /// The response is complete.
    Done,
}

/// How a stream ended.
enum End {
    /// The response was sent completely.
    Complete,
    /// The stream was reset, by Spooky or by the client.
    Reset,
}

impl Connection {
    pub fn new(
        handle: u64,
        quic: quiche::Connection,
        peer: SocketAddr,
        socket: usize,
        added: Rc<response::Added>,
        body_budget: Rc<ConnectionBudget>,
    ) -> Self {
        Connection {
            handle,
            quic,
            h3: None,
            streams: HashMap::new(),
            blocked: Vec::new(),
            peer,
            socket,
            cids: Vec::new(),
            deadline: None,
            dirty: false,
            pacer: Pacer::default(),
            added,
            read_buf: BytesMut::new(),
            body_budget,
            max_stream_seen: None,
            goaway_id: None,
            finished: Vec::new(),
            new_token_sent: false,
        }
    }

    /// Number of request streams in flight.
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    /// Handles what the last received packets made available.
    pub fn on_input(&mut self, ctx: &WorkerCtx) {
        self.on_path_events(ctx);
        if self.h3.is_none() && (self.quic.is_established() || self.quic.is_in_early_data()) {
            match h3::Connection::with_transport(&mut self.quic, &ctx.h3_config) {
                Ok(h3) => {
                    self.h3 = Some(h3);
                    ctx.metrics.handshakes.increment(1);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/3 setup failed");
                    let _ = self.quic.close(true, h3::WireErrorCode::InternalError as u64, b"h3 setup");
                    return;
                }
            }
        }
        if self.h3.is_none() {
            return;
        }
        self.poll_h3(ctx);
        // Packets may have carried flow-control credit for blocked responses.
        for sid in std::mem::take(&mut self.blocked) {
            if let Some(st) = self.streams.get_mut(&sid) {
                st.is_blocked = false;
            }
            self.drive(ctx, sid);
        }
    }

    /// Follows quiche's path events: the client's address is the one of the active, validated
    /// path (a packet from a new address alone moves nothing: it may be spoofed). Events
    /// raised by a timer are seen with the next packet.
    fn on_path_events(&mut self, ctx: &WorkerCtx) {
        while let Some(event) = self.quic.path_event_next() {
            match event {
                quiche::PathEvent::PeerMigrated(_, peer) => {
                    tracing::debug!(from = %self.peer, to = %peer, "connection migrated");
                    ctx.metrics.migrations.increment(1);
                    self.peer = peer;
                }
                quiche::PathEvent::FailedValidation(_, peer) => {
                    tracing::debug!(%peer, "path validation failed");
                    ctx.metrics.path_validation_failures.increment(1);
                }
                other => tracing::trace!(event = ?other, "path event"),
            }
        }
    }

    /// An upstream task has news for `stream`.
    pub fn on_exchange_news(&mut self, ctx: &WorkerCtx, stream: u64) {
        if let Some(st) = self.streams.get(&stream) {
            st.exchange.borrow().take_notification();
            self.drive(ctx, stream);
            // Reading body may have surfaced events (end of stream, trailers) that quiche
            // reports only through `poll`.
            self.poll_h3(ctx);
        }
    }

    /// Drives the streams that stopped reading on a full request-body budget, oldest first,
    /// while there is room; the others keep their place (see [`crate::bridge::budget`]).
    pub fn resume_bodies(&mut self, ctx: &WorkerCtx) {
        let mut stalled = self.body_budget.take_stalled();
        while self.body_budget.room() > 0 {
            let Some(sid) = stalled.pop_front() else { break };
            self.drive(ctx, sid);
        }
        self.body_budget.restall(stalled);
        // As after exchange news: reading may have surfaced the end of a body.
        self.poll_h3(ctx);
    }

    /// Starts a graceful close: HTTP/3 GOAWAY, so the client sends no new requests here.
    /// Connections still handshaking are closed at once.
    pub fn start_drain(&mut self) {
        match self.h3.as_mut() {
            Some(h3) => {
                let id = self.max_stream_seen.map_or(0, |m| m + 4);
                if h3.send_goaway(&mut self.quic, id).is_ok() {
                    self.goaway_id = Some(id);
                }
            }
            None => {
                let _ = self.quic.close(true, h3_error::NO_ERROR, b"shutting down");
            }
        }
    }

    /// Closes with H3_NO_ERROR once no request is in flight and every response was delivered
    /// (or at once when `force`).
    pub fn close_if_idle(&mut self, ctx: &WorkerCtx, force: bool) {
        if force {
            self.cancel_all(ctx);
        } else {
            self.forget_delivered();
            if !self.streams.is_empty() || !self.finished.is_empty() {
                return;
            }
        }
        if !self.quic.is_draining() {
            let _ = self.quic.close(true, h3_error::NO_ERROR, b"");
        }
    }

    /// The earliest minimum-rate deadline among request bodies still arriving.
    pub fn next_body_deadline(&self) -> Option<Instant> {
        self.streams.values().filter(|st| !st.recv_done).filter_map(|st| st.pace.as_ref().map(|p| p.deadline)).min()
    }

    /// Resets request streams whose body arrives slower than `timeouts.body_min_rate` (a
    /// slowloris client). A stream whose data waits in QUIC because Spooky stopped reading
    /// (its upstream is slower, or stopped taking the body) is not the client's fault: its
    /// deadline moves on by the grace period instead.
    pub fn cut_slow_bodies(&mut self, ctx: &WorkerCtx, now: Instant) {
        let mut slow = Vec::new();
        for (&sid, st) in self.streams.iter_mut() {
            let Some(pace) = st.pace.as_mut().filter(|p| !st.recv_done && p.deadline <= now) else { continue };
            if st.readable || st.exchange.borrow().req_abandoned {
                pace.excuse(now);
            } else {
                slow.push(sid);
            }
        }
        for sid in slow {
            tracing::debug!(sid, "request body below the minimum rate: resetting the stream");
            ctx.metrics.slow_request_bodies.increment(1);
            let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Read, h3_error::REQUEST_CANCELLED);
            let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Write, h3_error::REQUEST_CANCELLED);
            self.finish_stream(ctx, sid, End::Reset);
        }
    }

    /// Drops from `finished` the streams quiche has collected (all data acknowledged).
    fn forget_delivered(&mut self) {
        let quic = &mut self.quic;
        self.finished.retain(|&sid| !matches!(quic.stream_capacity(sid), Err(quiche::Error::InvalidStreamState(_))));
    }

    /// Ends every stream (the connection is gone).
    pub fn cancel_all(&mut self, ctx: &WorkerCtx) {
        let sids: Vec<u64> = self.streams.keys().copied().collect();
        for sid in sids {
            self.finish_stream(ctx, sid, End::Reset);
        }
    }

    /// Records what QUIC saw on this connection, when it closes.
    pub fn record_path_stats(&self, ctx: &WorkerCtx) {
        // A transport error Spooky closed with is the client's doing (stream limit, flow
        // control, protocol violation): counted by code (a handful of values).
        if let Some(e) = self.quic.local_error().filter(|e| !e.is_app && e.error_code != 0) {
            metrics::counter!("spooky_quic_transport_errors_total", "code" => format!("0x{:x}", e.error_code))
                .increment(1);
        }
        let stats = self.quic.stats();
        ctx.metrics.quic_lost.increment(stats.lost as u64);
        ctx.metrics.quic_retransmitted.increment(stats.retrans as u64);
        if let Some(path) = self.quic.path_stats().next() {
            ctx.metrics.quic_rtt.record(path.rtt.as_secs_f64());
            ctx.metrics.quic_cwnd.record(path.cwnd as f64);
        }
    }

    fn poll_h3(&mut self, ctx: &WorkerCtx) {
        loop {
            let Some(h3) = self.h3.as_mut() else { return };
            let (sid, event) = match h3.poll(&mut self.quic) {
                Ok(v) => v,
                Err(h3::Error::Done) => return,
                Err(e) => {
                    // quiche already closed the connection with the matching error code.
                    tracing::debug!(error = %e, "HTTP/3 connection error");
                    metrics::counter!("spooky_h3_connection_errors_total").increment(1);
                    return;
                }
            };
            match event {
                h3::Event::Headers { list, more_frames } => {
                    if self.streams.contains_key(&sid) {
                        self.on_trailers(ctx, sid, &list);
                    } else {
                        self.on_request(ctx, sid, &list, more_frames);
                    }
                }
                h3::Event::Data => {
                    if let Some(st) = self.streams.get_mut(&sid) {
                        st.readable = true;
                        self.drive(ctx, sid);
                    }
                }
                h3::Event::Finished => self.on_request_finished(ctx, sid),
                h3::Event::Reset(code) => {
                    tracing::debug!(sid, code, "client reset request stream");
                    if self.streams.contains_key(&sid) {
                        let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Write, h3_error::REQUEST_CANCELLED);
                        self.finish_stream(ctx, sid, End::Reset);
                    }
                }
                h3::Event::PriorityUpdate | h3::Event::GoAway => {}
            }
        }
    }

    fn on_request(&mut self, ctx: &WorkerCtx, sid: u64, list: &[h3::Header], more_frames: bool) {
        self.max_stream_seen = self.max_stream_seen.max(Some(sid));
        if self.goaway_id.is_some_and(|g| sid >= g) {
            let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Read, REQUEST_REJECTED);
            let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Write, REQUEST_REJECTED);
            return;
        }
        let mut head = match request::parse_head(list.iter().map(|h| (h.name(), h.value()))) {
            Ok(h) => h,
            Err(e) => return self.reject_unregistered(ctx, sid, e),
        };
        fault::on_request(&head.path);
        let request_id = ctx.request_ids.borrow_mut().ensure(&mut head.headers);
        let log = ctx.access_log.enabled().then(|| {
            Box::new(LogInfo {
                time: SystemTime::now(),
                method: head.method.to_string(),
                authority: head.authority.clone(),
                path: head.path.clone(),
                request_id,
            })
        });
        let key = StreamKey { conn: self.handle, stream: sid };
        let exchange = Exchange::new(key, ctx.notifier.clone(), Some(self.body_budget.clone()));
        let content_length = head.content_length;
        let mut route = ctx.unrouted_metrics.clone();
        // A request in 0-RTT data can be replayed by an attacker (RFC 8470): only safe
        // methods are forwarded, marked so the backend can still say 425 itself.
        let early = self.quic.is_in_early_data();
        if early {
            ctx.metrics.early_data_requests.increment(1);
        }
        if head.method == http::Method::CONNECT {
            exchange.borrow_mut().respond_locally(http::StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported");
        } else if early && !head.method.is_safe() {
            exchange.borrow_mut().respond_locally(http::StatusCode::TOO_EARLY, "retry after the handshake");
        } else {
            if early {
                head.headers.insert("early-data", http::HeaderValue::from_static("1"));
            }
            let view = RequestView {
                authority: &head.authority,
                path: &head.path,
                method: &head.method,
                headers: &head.headers,
            };
            match ctx.router.route(&view) {
                None => exchange.borrow_mut().respond_locally(ctx.no_route.0, &ctx.no_route.1),
                Some(m) => {
                    route = ctx.route_metrics[m.route].clone();
                    if let Err(wait) = check_rate(ctx, m.route, &head, self.peer) {
                        metrics::counter!("spooky_rate_limited_total", "route" => route.name.clone()).increment(1);
                        exchange.borrow_mut().respond_rate_limited(wait);
                    } else {
                        let out = Outbound {
                            request: request::to_upstream(head, self.peer, &ctx.header_policy),
                            has_body: more_frames,
                            pool: m.pool,
                            client: self.peer,
                            policy: ctx.route_policies[m.route].clone(),
                        };
                        monoio::spawn(forward::forward(ctx.upstreams.clone(), exchange.clone(), out));
                    }
                }
            }
        }
        if !more_frames {
            exchange.borrow_mut().finish_request(None);
        }
        ctx.metrics.streams_active.increment(1.0);
        self.streams.insert(
            sid,
            RequestStream {
                exchange,
                readable: false,
                body_received: 0,
                content_length,
                recv_done: !more_frames,
                head_sent: false,
                pending: None,
                is_blocked: false,
                status: 0,
                bytes_out: 0,
                started: Instant::now(),
                route,
                pace: BodyPace::start(ctx.body_grace, ctx.body_min_rate, Instant::now()).filter(|_| more_frames),
                log,
            },
        );
        if !more_frames && content_length.is_some_and(|n| n > 0) {
            return self.reject_malformed(ctx, sid, request::Malformed("content-length does not match the body"));
        }
        self.drive(ctx, sid);
    }

    fn on_trailers(&mut self, ctx: &WorkerCtx, sid: u64, list: &[h3::Header]) {
        match request::parse_trailers(list.iter().map(|h| (h.name(), h.value()))) {
            Ok(t) => {
                let st = self.streams.get_mut(&sid).expect("caller checked");
                st.exchange.borrow_mut().finish_request(Some(t));
            }
            Err(e) => self.reject_malformed(ctx, sid, e),
        }
    }

    fn on_request_finished(&mut self, ctx: &WorkerCtx, sid: u64) {
        let Some(st) = self.streams.get_mut(&sid) else { return };
        if st.recv_done {
            return;
        }
        st.recv_done = true;
        if st.content_length.is_some_and(|n| n != st.body_received) {
            return self.reject_malformed(ctx, sid, request::Malformed("content-length does not match the body"));
        }
        st.exchange.borrow_mut().finish_request(None);
        self.drive(ctx, sid);
    }

    /// RFC 9114 §4.1.2: a malformed request is a stream error of type H3_MESSAGE_ERROR.
    fn reject_malformed(&mut self, ctx: &WorkerCtx, sid: u64, why: request::Malformed) {
        self.reject_unregistered(ctx, sid, why);
        self.finish_stream(ctx, sid, End::Reset);
    }

    /// Resets a stream as malformed (before or after it was registered).
    fn reject_unregistered(&mut self, ctx: &WorkerCtx, sid: u64, why: request::Malformed) {
        tracing::debug!(sid, %why, "rejecting malformed request");
        ctx.metrics.malformed_requests.increment(1);
        let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Read, h3_error::MESSAGE_ERROR);
        let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Write, h3_error::MESSAGE_ERROR);
    }

    /// Moves whatever can move on stream `sid` in both directions; finishes it when done.
    fn drive(&mut self, ctx: &WorkerCtx, sid: u64) {
        let outcome = match self.streams.get_mut(&sid) {
            Some(st) => {
                let h3 = self.h3.as_mut().expect("streams exist only with HTTP/3");
                match read_request_body(&mut self.quic, h3, sid, st, &mut self.read_buf) {
                    Err(why) => return self.reject_malformed(ctx, sid, why),
                    Ok(()) => write_response(&mut self.quic, h3, sid, st, &self.added),
                }
            }
            None => return,
        };
        match outcome {
            Ok(Drive::Waiting) => {}
            Ok(Drive::Blocked) => {
                let st = self.streams.get_mut(&sid).expect("still present");
                if !st.is_blocked {
                    st.is_blocked = true;
                    self.blocked.push(sid);
                }
            }
            Ok(Drive::Done) => {
                if !self.streams[&sid].recv_done {
                    // The response is complete; the rest of the request is not needed
                    // (RFC 9114 §4.1: abort reading with H3_NO_ERROR).
                    let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Read, h3_error::NO_ERROR);
                }
                self.finish_stream(ctx, sid, End::Complete);
            }
            Err(code) => {
                if let Some(code) = code {
                    let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Write, code);
                    if !self.streams[&sid].recv_done {
                        let _ = self.quic.stream_shutdown(sid, quiche::Shutdown::Read, h3_error::REQUEST_CANCELLED);
                    }
                }
                self.finish_stream(ctx, sid, End::Reset);
            }
        }
    }

    /// Removes a stream, releases its upstream side, and records its metrics and log line.
    fn finish_stream(&mut self, ctx: &WorkerCtx, sid: u64, end: End) {
        let Some(st) = self.streams.remove(&sid) else { return };
        self.finished.push(sid);
        if self.finished.len() > 64 {
            self.forget_delivered();
        }
        let (upstream, upstream_time) = {
            let mut ex = st.exchange.borrow_mut();
            ex.cancel();
            (ex.upstream, ex.upstream_time)
        };
        ctx.metrics.streams_active.decrement(1.0);
        let status = match end {
            End::Complete => Some(st.status),
            End::Reset => None,
        };
        let total = st.started.elapsed();
        st.route.finished(status, total, upstream_time);
        if let Some(info) = st.log {
            let LogInfo { time, method, authority, path, request_id } = *info;
            ctx.access_log.log(Record {
                time,
                client: self.peer,
                method,
                authority,
                path,
                status: status.unwrap_or(0),
                bytes_in: st.body_received,
                bytes_out: st.bytes_out,
                route: st.route.name.clone(),
                upstream,
                upstream_time,
                total_time: total,
                request_id,
            });
        }
    }
}

/// Applies route `route`'s rate limit, if it has one, to this request.
fn check_rate(
    ctx: &WorkerCtx,
    route: usize,
    head: &request::RequestHead,
    client: SocketAddr,
) -> Result<(), std::time::Duration> {
    let Some(limiter) = &ctx.rate_limiters[route] else { return Ok(()) };
    let mut limiter = limiter.borrow_mut();
    let view = crate::transport::select::Request {
        method: head.method.as_str(),
        authority: &head.authority,
        path: &head.path,
        client,
        headers: &head.headers,
    };
    // Requests without the key value (e.g. no such header) share one bucket.
    let key = crate::transport::forward::request_hash(limiter.key(), &view).unwrap_or(0);
    limiter.check(key, Instant::now())
}

/// Reads what request body QUIC has for `sid` into the exchange, as far as the exchange has
/// room; each chunk moves the stream's minimum-rate deadline on by its size.
fn read_request_body(
    quic: &mut quiche::Connection,
    h3: &mut h3::Connection,
    sid: u64,
    st: &mut RequestStream,
    buf: &mut BytesMut,
) -> Result<(), request::Malformed> {
    if !st.readable || st.recv_done {
        return Ok(());
    }
    let mut ex = st.exchange.borrow_mut();
    if ex.req_abandoned {
        return Ok(());
    }
    loop {
        let room = ex.request_room();
        if room == 0 {
            return Ok(());
        }
        let want = room.min(READ_CHUNK);
        buf.reserve(want);
        match h3.recv_body_buf(quic, sid, (&mut *buf).limit(want)) {
            Ok(n) => {
                st.body_received += n as u64;
                if let Some(pace) = st.pace.as_mut() {
                    pace.received(n as u64);
                }
                if st.content_length.is_some_and(|cl| st.body_received > cl) {
                    return Err(request::Malformed("body longer than content-length"));
                }
                ex.push_request_chunk(take_chunk(buf));
            }
            Err(h3::Error::Done) => {
                st.readable = false;
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(sid, error = %e, "reading request body failed");
                st.readable = false;
                return Ok(());
            }
        }
    }
}

/// The bytes just read, as a chunk that pins no more than twice its size: a read that fills at
/// least half the buffer takes the buffer along, a smaller one is copied out and the buffer
/// reused. (Splitting every read off one buffer would let each small chunk keep a whole 64 KiB
/// allocation alive, so memory held would no longer follow the bytes the budgets count.)
fn take_chunk(buf: &mut BytesMut) -> Bytes {
    if 2 * buf.len() >= buf.capacity() {
        return std::mem::take(buf).freeze();
    }
    let chunk = Bytes::copy_from_slice(buf);
    buf.clear();
    chunk
}

/// Writes whatever response parts the exchange holds. `Err(Some(code))` resets the stream
/// with `code`; `Err(None)` means the client stopped the stream (nothing to send).
fn write_response(
    quic: &mut quiche::Connection,
    h3: &mut h3::Connection,
    sid: u64,
    st: &mut RequestStream,
    added: &response::Added,
) -> Result<Drive, Option<u64>> {
    let mut ex = st.exchange.borrow_mut();
    if let Some(Failure::Reset(code)) = ex.failure {
        return Err(Some(code));
    }
    if !st.head_sent {
        let Some(head) = ex.resp_head.as_ref() else { return Ok(Drive::Waiting) };
        let fin = ex.resp_end && ex.resp_chunks.is_empty() && ex.resp_trailers.is_none();
        let headers = response::head_to_h3(head, added);
        match h3.send_response(quic, sid, &headers, fin) {
            Ok(()) => {}
            Err(h3::Error::StreamBlocked) | Err(h3::Error::Done) => return Ok(Drive::Blocked),
            Err(e) => return Err(stream_gone(e)),
        }
        st.head_sent = true;
        st.status = head.status.as_u16();
        ex.resp_head = None;
        if fin {
            return Ok(Drive::Done);
        }
    }
    loop {
        let chunk = match st.pending.take() {
            Some(p) => p,
            None => match ex.resp_chunks.pop_front() {
                Some(c) => c,
                None => break,
            },
        };
        let fin = ex.resp_end && ex.resp_chunks.is_empty() && ex.resp_trailers.is_none();
        match h3.send_body(quic, sid, &chunk, fin) {
            Ok(n) => {
                ex.consumed_response(n);
                st.bytes_out += n as u64;
                if n < chunk.len() {
                    st.pending = Some(chunk.slice(n..));
                    return Ok(Drive::Blocked);
                }
                if fin {
                    return Ok(Drive::Done);
                }
            }
            Err(h3::Error::Done) | Err(h3::Error::StreamBlocked) => {
                st.pending = Some(chunk);
                return Ok(Drive::Blocked);
            }
            Err(e) => return Err(stream_gone(e)),
        }
    }
    if !ex.resp_end {
        return Ok(Drive::Waiting);
    }
    let sent = match ex.resp_trailers.as_ref() {
        Some(t) => h3.send_additional_headers(quic, sid, &response::trailers_to_h3(t), true, true),
        None => h3.send_body(quic, sid, &[], true).map(|_| ()),
    };
    match sent {
        Ok(()) => Ok(Drive::Done),
        Err(h3::Error::Done) | Err(h3::Error::StreamBlocked) => Ok(Drive::Blocked),
        Err(e) => Err(stream_gone(e)),
    }
}

fn stream_gone(e: h3::Error) -> Option<u64> {
    match e {
        // The client sent STOP_SENDING: it no longer wants the response.
        h3::Error::TransportError(quiche::Error::StreamStopped(_)) => None,
        other => {
            tracing::debug!(error = %other, "writing response failed");
            Some(h3_error::INTERNAL_ERROR)
        }
    }
}
