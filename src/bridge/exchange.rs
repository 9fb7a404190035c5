//! Per-request state shared by the edge (which owns the QUIC connection) and the upstream task
//! (which owns the HTTP/2 stream). Both live on the same worker thread, so this is a plain
//! `Rc<RefCell<_>>`: no locks, no atomics.
//!
//! Backpressure, end to end:
//! - request body: the edge reads from QUIC only while fewer than [`REQUEST_BUFFER`] bytes are
//!   queued here and its connection's and worker's budgets have room ([`super::budget`]);
//!   unread data stays in quiche, whose flow control stops the client.
//! - response body: the upstream task queues whatever HTTP/2 delivers, but the edge releases
//!   HTTP/2 flow-control credit only for bytes QUIC accepted, so the backend can never be more
//!   than one stream window ahead of the client.

use super::budget::ConnectionBudget;
use bytes::Bytes;
use http::HeaderMap;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// Most request-body bytes queued between the edge and the upstream per stream.
pub const REQUEST_BUFFER: usize = 256 * 1024;

/// What a queued chunk costs beyond its bytes (its `Bytes`, queue slot and allocation header),
/// charged to the budgets with it: a client sending tiny DATA frames makes many tiny chunks,
/// and the budgets must bound the memory they take, not just their payload.
const CHUNK_OVERHEAD: usize = 64;

fn cost(chunk: &Bytes) -> usize {
    chunk.len() + CHUNK_OVERHEAD
}

/// Identifies a request stream on a worker: the edge's connection handle and the stream id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StreamKey {
    pub conn: u64,
    pub stream: u64,
}

/// Wakes the edge's event loop when upstream tasks have news for some streams.
#[derive(Default)]
pub struct Notifier {
    ready: RefCell<Vec<StreamKey>>,
    /// Set by [`Notifier::wake`]: news for the loop itself (request-body budget released).
    woken: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notifier {
    fn notify(&self, key: StreamKey) {
        self.ready.borrow_mut().push(key);
        self.wake_loop();
    }

    /// Wakes the loop without news for a stream of its own.
    pub fn wake(&self) {
        self.woken.set(true);
        self.wake_loop();
    }

    fn wake_loop(&self) {
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Takes the streams with news (may hold duplicates; handling one twice is harmless).
    pub fn drain(&self, into: &mut Vec<StreamKey>) {
        self.woken.set(false);
        into.append(&mut self.ready.borrow_mut());
    }

    /// Resolves once some stream has news, or the loop was woken.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.ready.borrow().is_empty() && !self.woken.get() {
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// How the upstream half of a request ended badly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The response had started: the client's stream must be reset with this HTTP/3 code,
    /// never ended as if complete.
    Reset(u64),
}

/// What the request-body pump gets next.
pub enum RequestItem {
    Chunk(Bytes),
    /// The client finished its body, with optional trailers.
    End(Option<HeaderMap>),
    Cancelled,
}

/// The shared state of one proxied request.
pub struct Exchange {
    key: StreamKey,
    notifier: Rc<Notifier>,
    /// Set when the edge already has a notification pending for this stream.
    notified: Cell<bool>,

    // Client → upstream.
    req_chunks: VecDeque<Bytes>,
    /// What the queued chunks cost: their bytes and [`CHUNK_OVERHEAD`] each.
    req_buffered: usize,
    req_end: Option<Option<HeaderMap>>,
    req_end_taken: bool,
    req_waker: Option<Waker>,
    /// The edge stopped reading because the queue was full.
    req_blocked: bool,
    /// The connection's share of the request-body budget, charged for `req_held` bytes: those
    /// queued plus the chunk the pump has in hand (`req_in_hand`) until it asks for the next.
    budget: Option<Rc<ConnectionBudget>>,
    req_held: usize,
    req_in_hand: usize,
    /// The upstream no longer wants the request body (it answered or reset the stream).
    pub req_abandoned: bool,

    // Upstream → client.
    pub resp_head: Option<http::response::Parts>,
    pub resp_chunks: VecDeque<Bytes>,
    pub resp_buffered: usize,
    /// Since when response bytes have waited for the client without it accepting any (None
    /// while nothing waits).
    resp_waiting_since: Option<Instant>,
    pub resp_end: bool,
    pub resp_trailers: Option<HeaderMap>,
    /// Credit to return to HTTP/2 as QUIC accepts response bytes (None for local responses).
    pub resp_credit: Option<ResponseCredit>,
    pub failure: Option<Failure>,
    /// The backend the request went to, and how long its response head took.
    pub upstream: Option<std::net::SocketAddr>,
    pub upstream_time: Option<std::time::Duration>,

    /// The client went away: the upstream side must stop and reset its stream.
    cancelled: bool,
    /// One waker per [`Waiter`]. A slot is overwritten, never appended to: monoio's wakers
    /// for one task are not `will_wake`-equal from poll to poll, so a list would grow with
    /// every poll of a long upload.
    cancel_wakers: [Option<Waker>; 2],
}

/// The tasks that wait for an exchange's cancellation.
#[derive(Clone, Copy, Debug)]
pub enum Waiter {
    /// The forwarding task (attempts, response streaming).
    Forward = 0,
    /// The task moving the request body upstream.
    BodyPump = 1,
}

pub type SharedExchange = Rc<RefCell<Exchange>>;

impl Exchange {
    /// A new exchange; with `budget`, its request-body bytes count against that budget.
    pub fn new(key: StreamKey, notifier: Rc<Notifier>, budget: Option<Rc<ConnectionBudget>>) -> SharedExchange {
        Rc::new(RefCell::new(Exchange {
            key,
            notifier,
            notified: Cell::new(false),
            req_chunks: VecDeque::new(),
            req_buffered: 0,
            req_end: None,
            req_end_taken: false,
            req_waker: None,
            req_blocked: false,
            budget,
            req_held: 0,
            req_in_hand: 0,
            req_abandoned: false,
            resp_head: None,
            resp_chunks: VecDeque::new(),
            resp_buffered: 0,
            resp_waiting_since: None,
            resp_end: false,
            resp_trailers: None,
            resp_credit: None,
            failure: None,
            upstream: None,
            upstream_time: None,
            cancelled: false,
            cancel_wakers: [None, None],
        }))
    }

    // ----- edge side -----

    /// Room left in the request queue and the budgets; 0 means the edge must stop reading for
    /// now. It is told to go on by news for the stream (the queue drained) or, when a budget
    /// was full, by the budget's resume pass.
    pub fn request_room(&mut self) -> usize {
        // Room for a chunk's bytes once its overhead is paid.
        let room = REQUEST_BUFFER.saturating_sub(self.req_buffered + CHUNK_OVERHEAD);
        self.req_blocked = room == 0;
        match &self.budget {
            Some(budget) if room > 0 => {
                let shared = budget.room().saturating_sub(CHUNK_OVERHEAD);
                if shared == 0 {
                    budget.stall(self.key.stream);
                }
                room.min(shared)
            }
            _ => room,
        }
    }

    pub fn push_request_chunk(&mut self, chunk: Bytes) {
        self.req_buffered += cost(&chunk);
        self.charge(cost(&chunk));
        self.req_chunks.push_back(chunk);
        self.wake_pump();
    }

    fn charge(&mut self, n: usize) {
        if let Some(budget) = &self.budget {
            budget.charge(n);
            self.req_held += n;
        }
    }

    fn release(&mut self, n: usize) {
        if let Some(budget) = &self.budget {
            budget.release(n);
            self.req_held -= n;
        }
    }

    /// Drops the queued body and gives back every byte charged for it: nobody will take it.
    fn release_all(&mut self) {
        self.req_chunks.clear();
        self.req_buffered = 0;
        self.req_in_hand = 0;
        self.release(self.req_held);
    }

    pub fn finish_request(&mut self, trailers: Option<HeaderMap>) {
        if self.req_end.is_none() {
            self.req_end = Some(trailers);
        }
        self.wake_pump();
    }

    pub fn request_finished(&self) -> bool {
        self.req_end.is_some()
    }

    /// The client went away or the edge gave up on the stream.
    pub fn cancel(&mut self) {
        self.cancelled = true;
        self.release_all();
        self.wake_pump();
        for w in self.cancel_wakers.iter_mut().filter_map(Option::take) {
            w.wake();
        }
    }

    /// Clears the pending-notification mark before the edge handles this stream.
    pub fn take_notification(&self) {
        self.notified.set(false);
    }

    fn wake_pump(&mut self) {
        if let Some(w) = self.req_waker.take() {
            w.wake();
        }
    }

    // ----- upstream side -----

    /// Tells the edge this stream has news (response data, failure, room for more body).
    pub fn notify_edge(&self) {
        if !self.notified.replace(true) {
            self.notifier.notify(self.key);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// Resolves when the exchange is cancelled (for racing against upstream waits).
    pub fn poll_cancelled(&mut self, cx: &mut Context<'_>, who: Waiter) -> Poll<()> {
        if self.cancelled {
            return Poll::Ready(());
        }
        match &mut self.cancel_wakers[who as usize] {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The next request-body item for the pump, waiting if none is queued.
    pub fn poll_request_item(&mut self, cx: &mut Context<'_>) -> Poll<RequestItem> {
        if self.cancelled {
            return Poll::Ready(RequestItem::Cancelled);
        }
        // The pump asks again only once the chunk it took went out whole.
        let sent = std::mem::take(&mut self.req_in_hand);
        self.release(sent);
        if let Some(chunk) = self.req_chunks.pop_front() {
            self.req_buffered -= cost(&chunk);
            if self.budget.is_some() {
                self.req_in_hand = cost(&chunk);
            }
            if self.req_blocked {
                // The edge stopped reading at the limit: there is room again.
                self.req_blocked = false;
                self.notify_edge();
            }
            return Poll::Ready(RequestItem::Chunk(chunk));
        }
        if self.req_end.is_some() && !self.req_end_taken {
            self.req_end_taken = true;
            return Poll::Ready(RequestItem::End(self.req_end.as_mut().and_then(Option::take)));
        }
        self.req_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The upstream stopped taking the request body (it answered early or reset the stream):
    /// the edge stops reading it.
    pub fn abandon_request(&mut self) {
        self.req_abandoned = true;
        self.release_all();
        self.notify_edge();
    }

    /// Queues response body bytes from HTTP/2.
    pub fn push_response_chunk(&mut self, chunk: Bytes) {
        if self.resp_buffered == 0 {
            self.resp_waiting_since = Some(Instant::now());
        }
        if let Some(credit) = self.resp_credit.as_mut() {
            credit.received(chunk.len());
        }
        self.resp_buffered += chunk.len();
        self.resp_chunks.push_back(chunk);
        self.notify_edge();
    }

    /// Since when response bytes have waited for a client that accepted none of them.
    pub fn response_waiting_since(&self) -> Option<Instant> {
        self.resp_waiting_since
    }

    /// Puts a locally generated complete response (error pages, 404).
    pub fn respond_locally(&mut self, status: http::StatusCode, detail: &str) {
        let (parts, body) = super::response::local_response(status, detail);
        self.resp_head = Some(parts);
        self.resp_chunks.clear();
        self.resp_buffered = body.len();
        self.resp_chunks.push_back(body);
        self.resp_end = true;
        self.resp_waiting_since = None;
        self.resp_credit = None;
        self.notify_edge();
    }

    /// Answers 429 with `retry-after` (whole seconds, at least 1).
    pub fn respond_rate_limited(&mut self, wait: std::time::Duration) {
        self.respond_locally(http::StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded");
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        if let Some(head) = self.resp_head.as_mut() {
            head.headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs.max(1)));
        }
    }

    // ----- edge side, response -----

    /// Returns HTTP/2 credit for `n` response bytes that QUIC accepted.
    pub fn consumed_response(&mut self, n: usize) {
        self.resp_buffered -= n;
        self.resp_waiting_since = (self.resp_buffered > 0).then(Instant::now);
        if let Some(credit) = self.resp_credit.as_mut() {
            credit.release(n);
        }
    }
}

/// The HTTP/2 flow-control credit of one response: returned to the backend as the client
/// accepts bytes. It also keeps the count of bytes this response holds against its
/// connection's receive window, which the pool reads so that it lends a connection only
/// while it has window left (a few stalled readers could otherwise block every stream on it).
pub struct ResponseCredit {
    flow: h2::FlowControl,
    held: usize,
    connection_held: Rc<Cell<usize>>,
}

impl Drop for Exchange {
    /// Whatever is still charged goes back (an exchange can end without being cancelled, e.g.
    /// in tests or when its connection's worker stops).
    fn drop(&mut self) {
        self.release_all();
    }
}

impl ResponseCredit {
    pub fn new(flow: h2::FlowControl, connection_held: Rc<Cell<usize>>) -> Self {
        ResponseCredit { flow, held: 0, connection_held }
    }

    fn received(&mut self, n: usize) {
        self.held += n;
        self.connection_held.set(self.connection_held.get() + n);
    }

    fn release(&mut self, n: usize) {
        // Fails only when the HTTP/2 stream is already gone; nothing to return then.
        let _ = self.flow.release_capacity(n);
        let n = n.min(self.held);
        self.held -= n;
        self.connection_held.set(self.connection_held.get() - n);
    }
}

impl Drop for ResponseCredit {
    /// h2 gives a dropped stream's unreleased bytes back to the connection window.
    fn drop(&mut self) {
        self.connection_held.set(self.connection_held.get() - self.held);
    }
}
