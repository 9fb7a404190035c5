//! One QUIC connection at the edge: its HTTP/3 state and the request streams it carries.
//!
//! Call order, fixed by the worker loop: [`Connection::on_input`] after packets were fed to
//! `quiche` (handles HTTP/3 events and retries streams that were blocked on QUIC flow control),
//! [`Connection::on_exchange_news`] when an upstream task has news for a stream. Both only
//! queue data in `quiche`; the worker flushes packets afterwards.

use super::worker::WorkerCtx;
use crate::bridge::exchange::{Exchange, Failure, SharedExchange, StreamKey};
use crate::bridge::{h3_error, request, response};
use crate::transport::forward::{self, Outbound};
use bytes::{BufMut, Bytes, BytesMut};
use quiche::h3::{self, NameValue};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

/// Largest piece of request body read from QUIC at once.
const READ_CHUNK: usize = 64 * 1024;

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
    /// The quiche timer deadline last scheduled in the worker's timer heap.
    pub deadline: Option<Instant>,
    /// Set while queued for the worker's next flush.
    pub dirty: bool,
    /// The name Spooky puts in `via`.
    via_name: Rc<str>,
    /// Request body is read here and split off, so a small read does not pin a large buffer.
    read_buf: BytesMut,
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

impl Connection {
    pub fn new(
        handle: u64,
        quic: quiche::Connection,
        peer: SocketAddr,
        socket: usize,
        via_name: Rc<str>,
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
            via_name,
            read_buf: BytesMut::new(),
        }
    }

    /// Number of request streams in flight.
    pub fn active_streams(&self) -> usize {
        self.streams.len()
    }

    /// Handles what the last received packets made available.
    pub fn on_input(&mut self, ctx: &WorkerCtx) {
        if self.h3.is_none() && (self.quic.is_established() || self.quic.is_in_early_data()) {
            match h3::Connection::with_transport(&mut self.quic, &ctx.h3_config) {
                Ok(h3) => self.h3 = Some(h3),
                Err(e) => {
                    tracing::debug!(error = %e, "HTTP/3 setup failed");
                    let _ =
                        self.quic
                            .close(true, h3::WireErrorCode::InternalError as u64, b"h3 setup");
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
            self.drive(sid);
        }
    }

    /// An upstream task has news for `stream`.
    pub fn on_exchange_news(&mut self, ctx: &WorkerCtx, stream: u64) {
        if let Some(st) = self.streams.get(&stream) {
            st.exchange.borrow().take_notification();
            self.drive(stream);
            // Reading body may have surfaced events (end of stream, trailers) that quiche
            // reports only through `poll`.
            self.poll_h3(ctx);
        }
    }

    /// Cancels every exchange (the connection is gone).
    pub fn cancel_all(&mut self) {
        for (_, st) in self.streams.drain() {
            st.exchange.borrow_mut().cancel();
        }
    }

    fn poll_h3(&mut self, ctx: &WorkerCtx) {
        loop {
            let h3 = self.h3.as_mut().expect("checked by caller");
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
                        self.on_trailers(sid, &list);
                    } else {
                        self.on_request(ctx, sid, &list, more_frames);
                    }
                }
                h3::Event::Data => {
                    if let Some(st) = self.streams.get_mut(&sid) {
                        st.readable = true;
                        self.drive(sid);
                    }
                }
                h3::Event::Finished => self.on_request_finished(sid),
                h3::Event::Reset(code) => {
                    tracing::debug!(sid, code, "client reset request stream");
                    if let Some(st) = self.streams.remove(&sid) {
                        st.exchange.borrow_mut().cancel();
                        let _ = self.quic.stream_shutdown(
                            sid,
                            quiche::Shutdown::Write,
                            h3_error::REQUEST_CANCELLED,
                        );
                    }
                }
                h3::Event::PriorityUpdate | h3::Event::GoAway => {}
            }
        }
    }

    fn on_request(&mut self, ctx: &WorkerCtx, sid: u64, list: &[h3::Header], more_frames: bool) {
        let head = match request::parse_head(list.iter().map(|h| (h.name(), h.value()))) {
            Ok(h) => h,
            Err(e) => return self.reject_malformed(sid, e),
        };
        metrics::counter!("spooky_requests_total").increment(1);
        let key = StreamKey {
            conn: self.handle,
            stream: sid,
        };
        let exchange = Exchange::new(key, ctx.notifier.clone());
        let content_length = head.content_length;
        if head.method == http::Method::CONNECT {
            exchange.borrow_mut().respond_locally(
                http::StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported",
            );
        } else {
            match ctx.router.route(&head.authority, &head.path) {
                None => exchange
                    .borrow_mut()
                    .respond_locally(http::StatusCode::NOT_FOUND, "no route matches"),
                Some(pool) => {
                    let out = Outbound {
                        request: request::to_upstream(head, self.peer, &ctx.header_policy),
                        has_body: more_frames,
                        pool,
                        client: self.peer,
                    };
                    monoio::spawn(forward::forward(
                        ctx.upstreams.clone(),
                        exchange.clone(),
                        out,
                    ));
                }
            }
        }
        if !more_frames {
            exchange.borrow_mut().finish_request(None);
        }
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
            },
        );
        if !more_frames && content_length.is_some_and(|n| n > 0) {
            return self.reject_malformed(
                sid,
                request::Malformed("content-length does not match the body"),
            );
        }
        self.drive(sid);
    }

    fn on_trailers(&mut self, sid: u64, list: &[h3::Header]) {
        match request::parse_trailers(list.iter().map(|h| (h.name(), h.value()))) {
            Ok(t) => {
                let st = self.streams.get_mut(&sid).expect("caller checked");
                st.exchange.borrow_mut().finish_request(Some(t));
            }
            Err(e) => self.reject_malformed(sid, e),
        }
    }

    fn on_request_finished(&mut self, sid: u64) {
        let Some(st) = self.streams.get_mut(&sid) else {
            return;
        };
        if st.recv_done {
            return;
        }
        st.recv_done = true;
        if st.content_length.is_some_and(|n| n != st.body_received) {
            return self.reject_malformed(
                sid,
                request::Malformed("content-length does not match the body"),
            );
        }
        st.exchange.borrow_mut().finish_request(None);
        self.drive(sid);
    }

    /// RFC 9114 §4.1.2: a malformed request is a stream error of type H3_MESSAGE_ERROR.
    fn reject_malformed(&mut self, sid: u64, why: request::Malformed) {
        tracing::debug!(sid, %why, "rejecting malformed request");
        metrics::counter!("spooky_malformed_requests_total").increment(1);
        if let Some(st) = self.streams.remove(&sid) {
            st.exchange.borrow_mut().cancel();
        }
        let _ = self
            .quic
            .stream_shutdown(sid, quiche::Shutdown::Read, h3_error::MESSAGE_ERROR);
        let _ = self
            .quic
            .stream_shutdown(sid, quiche::Shutdown::Write, h3_error::MESSAGE_ERROR);
    }

    /// Moves whatever can move on stream `sid` in both directions; removes it when finished.
    fn drive(&mut self, sid: u64) {
        let outcome = match self.streams.get_mut(&sid) {
            Some(st) => {
                let h3 = self.h3.as_mut().expect("streams exist only with HTTP/3");
                match read_request_body(&mut self.quic, h3, sid, st, &mut self.read_buf) {
                    Err(why) => return self.reject_malformed(sid, why),
                    Ok(()) => write_response(&mut self.quic, h3, sid, st, &self.via_name),
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
                let st = self.streams.remove(&sid).expect("still present");
                if !st.recv_done {
                    // The response is complete; the rest of the request is not needed
                    // (RFC 9114 §4.1: abort reading with H3_NO_ERROR).
                    let _ =
                        self.quic
                            .stream_shutdown(sid, quiche::Shutdown::Read, h3_error::NO_ERROR);
                }
                st.exchange.borrow_mut().cancel();
            }
            Err(code) => {
                let st = self.streams.remove(&sid).expect("still present");
                st.exchange.borrow_mut().cancel();
                if let Some(code) = code {
                    let _ = self
                        .quic
                        .stream_shutdown(sid, quiche::Shutdown::Write, code);
                    if !st.recv_done {
                        let _ = self.quic.stream_shutdown(
                            sid,
                            quiche::Shutdown::Read,
                            h3_error::REQUEST_CANCELLED,
                        );
                    }
                }
            }
        }
    }
}

/// Reads request body from QUIC into the exchange while it has room.
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
                if st.content_length.is_some_and(|cl| st.body_received > cl) {
                    return Err(request::Malformed("body longer than content-length"));
                }
                ex.push_request_chunk(buf.split().freeze());
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

/// Writes whatever response parts the exchange holds. `Err(Some(code))` resets the stream
/// with `code`; `Err(None)` means the client stopped the stream (nothing to send).
fn write_response(
    quic: &mut quiche::Connection,
    h3: &mut h3::Connection,
    sid: u64,
    st: &mut RequestStream,
    via: &str,
) -> Result<Drive, Option<u64>> {
    let mut ex = st.exchange.borrow_mut();
    if let Some(Failure::Reset(code)) = ex.failure {
        return Err(Some(code));
    }
    if !st.head_sent {
        let Some(head) = ex.resp_head.as_ref() else {
            return Ok(Drive::Waiting);
        };
        let fin = ex.resp_end && ex.resp_chunks.is_empty() && ex.resp_trailers.is_none();
        let headers = response::head_to_h3(head, via);
        match h3.send_response(quic, sid, &headers, fin) {
            Ok(()) => {}
            Err(h3::Error::StreamBlocked) | Err(h3::Error::Done) => return Ok(Drive::Blocked),
            Err(e) => return Err(stream_gone(e)),
        }
        st.head_sent = true;
        ex.resp_head = None;
        metrics::counter!("spooky_responses_total", "class" => status_class(headers[0].value()))
            .increment(1);
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

fn status_class(status: &[u8]) -> &'static str {
    match status.first() {
        Some(b'1') => "1xx",
        Some(b'2') => "2xx",
        Some(b'3') => "3xx",
        Some(b'4') => "4xx",
        _ => "5xx",
    }
}
