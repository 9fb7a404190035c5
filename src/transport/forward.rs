//! Carries one request upstream and its response back, as a task on the worker's runtime.
//!
//! Per attempt: select a backend ([`super::select`]) → get its HTTP/2 connection → wait for a
//! stream slot → send the head → (request body pumped alongside, so upload and download
//! overlap: [`super::upload`]) → await the response head → stream the body → trailers.
//!
//! A stream the backend did not process — refused (REFUSED_STREAM), above a GOAWAY's last
//! stream id, or never opened because the connection stopped taking streams — is sent again
//! on a fresh stream, transparently and whatever the method (RFC 9113 §8.7: nothing happened
//! at the backend), as long as the whole body sent so far is still held; a backend that keeps
//! refusing ends the attempt after [`MAX_REPLAYS`] such sends. Stock servers need this:
//! nginx and hypercorn end every HTTP/2 connection with GOAWAY after 1000 requests.
//!
//! Failures before the response head are retried when the route's policy asks for it and it
//! is safe: connect failures and refused streams always are (nothing reached the backend);
//! resets, timeouts and retryable statuses only for idempotent requests without a body.
//! Retries go to a backend not tried yet (a refused stream may retry on the same one) and
//! must fit the worker's retry budget. What is not retried becomes a local response: 502
//! (refused, reset, broken), 503 (circuit open, no backend), 504 (no answer in time). After
//! the head, failures reset the client's stream, so a truncated body can never pass for a
//! complete one.

use super::pool::{self, Pooled};
use super::select::{self, Selection};
use super::upload::{self, Sent, Upload};
use super::{InFlight, LoadGuard, Upstreams};
use crate::bridge::exchange::{Failure, ResponseCredit, SharedExchange, Waiter};
use crate::bridge::h3_error;
use crate::config::{Config, HashKey, Retries, RetryOn, Route};
use h2::RecvStream;
use http::{Method, Response, StatusCode};
use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A route's upstream policy, shared by its requests.
pub struct RoutePolicy {
    /// From the request being fully sent to the response head, over all attempts.
    pub request_timeout: Duration,
    /// One attempt's bound for the response head.
    pub per_try_timeout: Duration,
    pub retries: Retries,
}

impl RoutePolicy {
    pub fn new(route: &Route, config: &Config) -> Self {
        let request_timeout = route.request_timeout.unwrap_or(config.timeouts.request).0;
        RoutePolicy {
            request_timeout,
            per_try_timeout: route.retries.per_try_timeout.map_or(request_timeout, |t| t.0.min(request_timeout)),
            retries: route.retries.clone(),
        }
    }
}

/// Everything the forwarding task needs about the request.
pub struct Outbound {
    pub request: http::Request<()>,
    /// False when the client's request ended with its header section.
    pub has_body: bool,
    pub pool: usize,
    pub client: SocketAddr,
    pub policy: Rc<RoutePolicy>,
}

/// Runs the exchange to completion or until the client cancels it.
pub async fn forward(up: Rc<Upstreams>, ex: SharedExchange, out: Outbound) {
    let mut work = pin!(run(&up, &ex, out));
    let finished = poll_fn(|cx| {
        if let Poll::Ready(()) = work.as_mut().poll(cx) {
            return Poll::Ready(true);
        }
        ex.borrow_mut().poll_cancelled(cx, Waiter::Forward).map(|()| false)
    })
    .await;
    // Dropping `work` drops the h2 response handles, which resets the upstream stream. The
    // work may also have ended first, on the upstream reset the body pump sent on seeing the
    // cancellation: either way the client cancelled — unless the whole response had been
    // handed over (the edge ends every stream it is done with this way).
    let x = ex.borrow();
    if (!finished || x.is_cancelled()) && !x.resp_end {
        metrics::counter!("spooky_requests_cancelled_total").increment(1);
    }
}

/// Sends of one attempt's request that the backend did not process, after the first.
const MAX_REPLAYS: u32 = 8;

/// How one attempt ended, when it did not deliver a response to the client.
struct Failed {
    kind: Kind,
    status: StatusCode,
    detail: String,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Retry(RetryOn),
    /// A response status the route retries.
    Status,
}

async fn run(up: &Upstreams, ex: &SharedExchange, out: Outbound) {
    let _in_flight = InFlight::request(up);
    let Outbound { request, has_body, pool, client, policy } = out;
    let (parts, ()) = request.into_parts();
    // Only these may reach a backend twice (RFC 9110 §9.2.2), and only without a body.
    let replayable = !has_body
        && matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
    let view = select::Request {
        method: parts.method.as_str(),
        authority: parts.uri.authority().map(|a| a.as_str()).unwrap_or(""),
        path: parts.uri.path(),
        client,
        headers: &parts.headers,
    };
    let deadline = Instant::now() + policy.request_timeout;
    let mut upload = Upload::new(up.replay_buffer);
    let mut tried = Vec::new();
    let mut _retrying = None;
    let mut last_failure: Option<Failed> = None;
    let attempts = policy.retries.attempts;
    for attempt in 0..=attempts {
        let (pool, backend) = match select::select(up, pool, &view, &tried) {
            Selection::Backend { pool, backend } => (pool, backend),
            Selection::BreakerOpen => {
                metrics::counter!("spooky_circuit_breaker_rejections_total", "pool" => up.pools[pool].name.clone())
                    .increment(1);
                return fail(ex, &parts, StatusCode::SERVICE_UNAVAILABLE, BREAKER_OPEN);
            }
            // Nothing left to retry on: the client gets the last attempt's failure.
            Selection::Exhausted => match last_failure {
                Some(f) => return fail(ex, &parts, f.status, &f.detail),
                None => return fail(ex, &parts, StatusCode::SERVICE_UNAVAILABLE, "no backend available"),
            },
        };
        if attempt > 0 {
            metrics::counter!("spooky_upstream_retries_total").increment(1);
            _retrying.get_or_insert_with(|| InFlight::retry(up));
        }
        tried.push((pool, backend));
        let addr = up.pools[pool].backends[backend];
        ex.borrow_mut().upstream = Some(addr);
        let may_retry = attempt < attempts && up.retry_allowed(policy.retries.budget_percent);
        let on_backend = Attempt {
            up,
            ex,
            parts: &parts,
            has_body,
            target: (pool, backend, addr),
            policy: &policy,
            deadline,
            retry_status: may_retry && replayable,
        };
        let failed = match on_backend.run(&mut upload).await {
            None => return,
            // The failure is the client's doing (it reset the request): not the backend's.
            Some(_) if ex.borrow().is_cancelled() => return,
            Some(f) => f,
        };
        // Nothing reached a backend on a failed connect or a refused stream, but a body may
        // only go out again if all of it that any stream was given is still held.
        let unprocessed = matches!(failed.kind, Kind::Retry(RetryOn::ConnectFailure | RetryOn::RefusedStream));
        let safe = (unprocessed && upload.replayable()) || replayable;
        let wanted = match failed.kind {
            Kind::Retry(on) => policy.retries.on.contains(&on),
            Kind::Status => true,
        };
        if !(safe && wanted && attempt < attempts) {
            return fail(ex, &parts, failed.status, &failed.detail);
        }
        if !may_retry {
            metrics::counter!("spooky_retry_budget_exhausted_total").increment(1);
            return fail(ex, &parts, failed.status, &failed.detail);
        }
        if failed.kind == Kind::Retry(RetryOn::RefusedStream) {
            // Refused means "not now", not "broken": the same backend may take the retry.
            tried.retain(|t| *t != (pool, backend));
        }
        tracing::debug!(%addr, detail = %failed.detail, "retrying");
        last_failure = Some(failed);
    }
    unreachable!("the last attempt always returns");
}

/// Why the backend did not process a stream (so sending it again is safe, whatever the method).
#[derive(Clone, Copy)]
enum Unprocessed {
    /// The connection no longer opened streams (GOAWAY received, or it closed) when the
    /// request was to go out.
    ConnectionClosing,
    /// RST_STREAM(REFUSED_STREAM).
    Refused,
    /// The stream was above the last stream id of a GOAWAY.
    AboveGoaway,
}

impl Unprocessed {
    fn as_str(self) -> &'static str {
        match self {
            Unprocessed::ConnectionClosing => "connection_closing",
            Unprocessed::Refused => "refused_stream",
            Unprocessed::AboveGoaway => "goaway",
        }
    }
}

/// How one stream of an attempt ended.
enum Streamed {
    Delivered,
    Unprocessed(Unprocessed),
    Failed(Failed),
}

/// One attempt: the request to one backend.
struct Attempt<'a> {
    up: &'a Upstreams,
    ex: &'a SharedExchange,
    parts: &'a http::request::Parts,
    has_body: bool,
    /// Pool, backend, address.
    target: (usize, usize, SocketAddr),
    policy: &'a RoutePolicy,
    deadline: Instant,
    /// Whether a response status the route retries may be retried.
    retry_status: bool,
}

impl Attempt<'_> {
    /// The request goes out on a stream, and again on a fresh one (up to [`MAX_REPLAYS`] times)
    /// whenever the backend did not process it. `None` when a response reached the client
    /// (fully, or until a reset after its head); otherwise why not.
    async fn run(&self, upload: &mut Upload) -> Option<Failed> {
        let (up, ex, deadline) = (self.up, self.ex, self.deadline);
        let (pool, backend, addr) = self.target;
        let mut replays = 0;
        loop {
            // Boxed: awaiting the ~4 KB stream future in place doubled this future's size
            // (rustc keeps the awaitee twice, rust-lang/rust#62958), and every future above it
            // grew with it; each level then copied ~8 KB per request (10 % of a small GET's
            // CPU in a profile).
            let why = match Box::pin(self.stream(upload)).await {
                Streamed::Delivered => return None,
                Streamed::Failed(failed) => {
                    // Outlier detection hears of every failure except one the client caused by
                    // cancelling (the body pump reset it upstream); a retried status was
                    // recorded with its response.
                    if matches!(failed.kind, Kind::Retry(_)) && !ex.borrow().is_cancelled() {
                        up.record_health(pool, backend, true);
                    }
                    return Some(failed);
                }
                Streamed::Unprocessed(why) => why,
            };
            let detail = format!("{addr}: {}", why.as_str());
            if !upload.replayable() {
                metrics::counter!("spooky_upstream_replays_total", "outcome" => "body_not_held").increment(1);
                tracing::info!(%addr, why = why.as_str(), limit = up.replay_buffer, "unprocessed request not replayed: its body outgrew the replay buffer");
                return Some(Failed {
                    kind: Kind::Retry(RetryOn::RefusedStream),
                    status: StatusCode::BAD_GATEWAY,
                    detail: format!("{detail}; the request body outgrew the replay buffer"),
                });
            }
            if replays == MAX_REPLAYS || Instant::now() >= deadline {
                metrics::counter!("spooky_upstream_replays_total", "outcome" => "exhausted").increment(1);
                return Some(Failed {
                    kind: Kind::Retry(RetryOn::RefusedStream),
                    status: StatusCode::BAD_GATEWAY,
                    detail,
                });
            }
            replays += 1;
            metrics::counter!("spooky_upstream_replays_total", "outcome" => why.as_str()).increment(1);
            tracing::debug!(%addr, why = why.as_str(), replays, "sending an unprocessed request again");
        }
    }

    /// The request on one HTTP/2 stream, and its response back to the client.
    async fn stream(&self, upload: &mut Upload) -> Streamed {
        let Attempt { up, ex, parts, has_body, policy, deadline, retry_status, .. } = *self;
        let (pool, backend, addr) = self.target;
        let failed = |kind: RetryOn, status: StatusCode, detail: String| {
            Streamed::Failed(Failed { kind: Kind::Retry(kind), status, detail })
        };
        let (response, body_tx, conn) = {
            let _pending = LoadGuard::pending(up, pool, backend);
            let conn: Pooled = match pool::connection(&up.connections, addr, up.pools[pool].tls.as_ref()).await {
                Ok(c) => c,
                Err(e) => return failed(RetryOn::ConnectFailure, e.status(), format!("{addr}: {e}")),
            };
            let req = http::Request::from_parts(clone_parts(parts), ());
            let sent = match conn.sender.clone().ready().await {
                Ok(mut sender) => sender.send_request(req, !has_body),
                Err(e) => Err(e),
            };
            match sent {
                Ok((response, body_tx)) => (response, body_tx, conn),
                // h2 opens no stream on a connection that got GOAWAY or failed: nothing was sent.
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "pooled upstream connection takes no new streams");
                    up.connections.borrow_mut().forget(&conn);
                    return Streamed::Unprocessed(Unprocessed::ConnectionClosing);
                }
            }
        };
        let mut active = LoadGuard::active(up, pool, backend);
        // The balancer hears how the stream ended; a cancelled one only leaves (guard's drop).
        let mut ended = |latency: Duration, ok: bool| {
            if !ex.borrow().is_cancelled() {
                active.end(latency, ok);
            }
        };
        let sent_at = Instant::now();
        let upload_progress = Cell::new(sent_at);
        let body = async {
            if has_body {
                upload::pump(ex, body_tx, upload, &upload_progress).await
            } else {
                Sent::Complete
            }
        };
        let mut pump = Pump { body: pin!(body), sent: None };

        // The head timeout starts once the request is fully sent, as in Envoy: an upload of any
        // length is never cut short by it (a stalled client is bounded by the QUIC idle timeout).
        // Until then the same timeout bounds a backend that stops taking the body (no HTTP/2
        // window for that long): otherwise such an upload would wait for capacity forever.
        let mut response = pin!(response);
        let mut early = None;
        while early.is_none() {
            pump.poll_now();
            if pump.sent.is_some() {
                break;
            }
            let progress = upload_progress.get();
            let mut stall = pin!(monoio::time::sleep_until((progress + policy.per_try_timeout).into()));
            let woke = poll_fn(|cx| {
                pump.poll(cx);
                match response.as_mut().poll(cx) {
                    Poll::Ready(r) => Poll::Ready(Some(Some(r))),
                    Poll::Pending if pump.sent.is_some() => Poll::Ready(Some(None)),
                    Poll::Pending => stall.as_mut().poll(cx).map(|()| None),
                }
            })
            .await;
            match woke {
                Some(Some(r)) => early = Some(r),
                Some(None) => break,
                None if upload_progress.get() == progress => {
                    ended(Duration::ZERO, false);
                    return failed(
                        RetryOn::Timeout,
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("{addr} took no request body for {:?}", policy.per_try_timeout),
                    );
                }
                None => {}
            }
        }
        let result = match early {
            Some(r) => r,
            None => {
                let now = Instant::now();
                let limit =
                    policy.per_try_timeout.min(deadline.saturating_duration_since(now)).max(Duration::from_millis(1));
                match monoio::time::timeout(limit, pump.alongside(response.as_mut())).await {
                    Err(_) => {
                        ended(Duration::ZERO, false);
                        return failed(
                            RetryOn::Timeout,
                            StatusCode::GATEWAY_TIMEOUT,
                            format!("{addr} did not answer in time"),
                        );
                    }
                    Ok(r) => r,
                }
            }
        };
        let response = match result {
            Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                ended(Duration::ZERO, true);
                return Streamed::Unprocessed(Unprocessed::Refused);
            }
            // h2 fails exactly the streams above a GOAWAY's last stream id with the peer's GOAWAY
            // (the others go on, or fail with the connection's I/O error).
            Err(e) if e.is_go_away() && e.is_remote() => {
                ended(Duration::ZERO, true);
                return Streamed::Unprocessed(Unprocessed::AboveGoaway);
            }
            Err(e) => {
                ended(Duration::ZERO, false);
                return failed(RetryOn::Reset, StatusCode::BAD_GATEWAY, format!("{addr} failed: {e}"));
            }
            Ok(r) => r,
        };
        let status = response.status();
        let latency = sent_at.elapsed();
        let gateway_failure = matches!(status.as_u16(), 502..=504);
        ended(latency, !gateway_failure);
        up.record_health(pool, backend, gateway_failure);
        if retry_status && policy.retries.statuses.contains(&status.as_u16()) {
            // Dropping the response resets the upstream stream; the client sees the next attempt.
            return Streamed::Failed(Failed {
                kind: Kind::Status,
                status,
                detail: format!("{addr} answered {status}"),
            });
        }
        ex.borrow_mut().upstream_time = Some(latency);
        stream_response(up, ex, response, conn.held_bytes(), &mut pump).await;
        // The response is complete: the body goes on until the backend has it or stops taking it.
        if pump.finish().await == Sent::Refused {
            ex.borrow_mut().abandon_request();
        }
        Streamed::Delivered
    }
}

/// A stream's request-body pump, polled alongside whatever the stream awaits: it is dropped
/// with the stream, so a later stream of the request never races it for the body.
struct Pump<F> {
    body: Pin<F>,
    sent: Option<Sent>,
}

impl<F: std::ops::DerefMut<Target: Future<Output = Sent>>> Pump<F> {
    fn poll(&mut self, cx: &mut Context<'_>) {
        if self.sent.is_none() {
            if let Poll::Ready(sent) = self.body.as_mut().poll(cx) {
                self.sent = Some(sent);
            }
        }
    }

    /// Polls once without a waker of its own: the next `poll` registers one.
    fn poll_now(&mut self) {
        self.poll(&mut Context::from_waker(futures::task::noop_waker_ref()));
    }

    /// Awaits `fut` while the pump runs on.
    async fn alongside<T>(&mut self, fut: impl Future<Output = T>) -> T {
        let mut fut = pin!(fut);
        poll_fn(|cx| {
            self.poll(cx);
            fut.as_mut().poll(cx)
        })
        .await
    }

    /// Runs the pump to its end.
    async fn finish(&mut self) -> Sent {
        poll_fn(|cx| {
            self.poll(cx);
            self.sent.map_or(Poll::Pending, Poll::Ready)
        })
        .await
    }
}

/// Hands the response head to the edge and streams the body and trailers after it. A client
/// that accepts none of the waiting bytes for `timeouts.client_read` gets its stream reset.
async fn stream_response<F: std::ops::DerefMut<Target: Future<Output = Sent>>>(
    up: &Upstreams,
    ex: &SharedExchange,
    response: Response<RecvStream>,
    connection_held: Rc<Cell<usize>>,
    pump: &mut Pump<F>,
) {
    let (head, mut body) = response.into_parts();
    {
        let mut x = ex.borrow_mut();
        x.resp_head = Some(head);
        x.resp_credit = Some(ResponseCredit::new(body.flow_control().clone(), connection_held));
        x.notify_edge();
    }
    loop {
        let waiting_since = ex.borrow().response_waiting_since();
        let limit = match waiting_since {
            Some(since) => up.client_read.saturating_sub(since.elapsed()).min(up.body_idle_timeout),
            None => up.body_idle_timeout,
        };
        let next = monoio::time::timeout(limit, pump.alongside(body.data())).await;
        match next {
            Err(_) => match waited(ex) {
                Some(waited) if waited >= up.client_read => return client_stalled(ex),
                // A stall is the backend's fault only when the client is keeping up.
                Some(_) => continue,
                None if waiting_since.is_some() => continue,
                None => return reset(ex, "upstream body stalled"),
            },
            Ok(None) => break,
            Ok(Some(Ok(chunk))) if chunk.is_empty() => {}
            Ok(Some(Ok(chunk))) => ex.borrow_mut().push_response_chunk(chunk),
            Ok(Some(Err(e))) => return reset(ex, &format!("upstream body failed: {e}")),
        }
    }
    let trailers = match pump.alongside(body.trailers()).await {
        Ok(t) => t,
        Err(e) => return reset(ex, &format!("upstream trailers failed: {e}")),
    };
    {
        let mut x = ex.borrow_mut();
        x.resp_trailers = trailers;
        x.resp_end = true;
        x.notify_edge();
    }
    // The last bytes wait for the client with no upstream read to time: bound them too. The
    // edge usually hands them to QUIC in its next turn: only what is still waiting after that
    // costs a timer.
    crate::runtime::yield_now().await;
    while let Some(waited) = waited(ex).filter(|_| !ex.borrow().is_cancelled()) {
        if waited >= up.client_read {
            return client_stalled(ex);
        }
        monoio::time::sleep(up.client_read - waited).await;
    }
}

/// How long response bytes have waited for a client that accepts none of them.
fn waited(ex: &SharedExchange) -> Option<Duration> {
    ex.borrow().response_waiting_since().map(|since| since.elapsed())
}

/// The client accepted nothing for `timeouts.client_read`: its stream is reset, which also
/// gives the upstream window its bytes hold back.
fn client_stalled(ex: &SharedExchange) {
    tracing::debug!("resetting a response stream whose client stopped reading");
    metrics::counter!("spooky_client_read_timeouts_total").increment(1);
    let mut x = ex.borrow_mut();
    x.failure = Some(Failure::Reset(h3_error::REQUEST_CANCELLED));
    x.notify_edge();
}

/// The hash of a request's `hash_key` value, or `None` when the request lacks it.
pub(crate) fn request_hash(key: &HashKey, req: &select::Request<'_>) -> Option<u64> {
    let hash = crate::lb::hash_key;
    match key {
        HashKey::Header(name) => req.headers.get(name.as_str()).map(|v| hash(v.as_bytes())),
        HashKey::Cookie(name) => req
            .headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(n, _)| n == name)
            .map(|(_, v)| hash(v.as_bytes())),
        HashKey::ClientIp => Some(match req.client.ip() {
            std::net::IpAddr::V4(a) => hash(&a.octets()),
            std::net::IpAddr::V6(a) => hash(&a.octets()),
        }),
        HashKey::Path => Some(hash(req.path.as_bytes())),
        HashKey::Authority => Some(hash(req.authority.as_bytes())),
    }
}

fn clone_parts(p: &http::request::Parts) -> http::request::Parts {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = p.method.clone();
    parts.uri = p.uri.clone();
    parts.version = p.version;
    parts.headers = p.headers.clone();
    parts
}

/// Answers the client with Spooky's own error page. The page names the kind of failure only:
/// which backend failed and how stays in the log (with the request id to find it), never on a
/// page a client can read.
fn fail(ex: &SharedExchange, parts: &http::request::Parts, status: StatusCode, detail: &str) {
    metrics::counter!("spooky_upstream_failures_total", "status" => status.as_str().to_owned()).increment(1);
    let request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
    tracing::warn!(request_id, status = status.as_u16(), detail, "upstream request failed");
    let public = match status {
        StatusCode::GATEWAY_TIMEOUT => "the upstream server did not answer in time",
        StatusCode::SERVICE_UNAVAILABLE if detail == BREAKER_OPEN => BREAKER_OPEN,
        StatusCode::SERVICE_UNAVAILABLE => "no upstream server available",
        _ => "the upstream server failed to answer",
    };
    ex.borrow_mut().respond_locally(status, public);
}

/// Public on purpose: a client may learn that it is being shed.
const BREAKER_OPEN: &str = "circuit breaker open";

fn reset(ex: &SharedExchange, why: &str) {
    tracing::debug!(why, "resetting client stream after the response started");
    metrics::counter!("spooky_upstream_resets_total").increment(1);
    let mut x = ex.borrow_mut();
    x.failure = Some(Failure::Reset(h3_error::INTERNAL_ERROR));
    x.notify_edge();
}
