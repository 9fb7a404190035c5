//! Carries one request upstream and its response back, as a task on the worker's runtime.
//!
//! Per attempt: select a backend ([`super::select`]) → get its HTTP/2 connection → wait for a
//! stream slot → send the head → (request body pumped by its own task, so upload and download
//! overlap) → await the response head → stream the body → trailers.
//!
//! Failures before the response head are retried when the route's policy asks for it and it
//! is safe: connect failures and refused streams always are (nothing reached the backend);
//! resets, timeouts and retryable statuses only for idempotent requests without a body.
//! Retries go to a backend not tried yet (a refused stream may retry on the same one) and
//! must fit the worker's retry budget. What is not retried becomes a local response: 502
//! (refused, reset, broken), 503 (circuit open, no backend), 504 (no answer in time). After the head, failures reset the client's stream, so a
//! truncated body can never pass for a complete one.

use super::pool::{self, Pooled};
use super::select::{self, Selection};
use super::{InFlight, LoadGuard, Upstreams};
use crate::bridge::exchange::{Failure, RequestItem, SharedExchange, Waiter};
use crate::bridge::h3_error;
use crate::config::{Config, HashKey, Retries, RetryOn, Route};
use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Response, StatusCode};
use std::cell::Cell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;
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
    // cancellation: either way the client cancelled.
    if !finished || ex.borrow().is_cancelled() {
        metrics::counter!("spooky_requests_cancelled_total").increment(1);
    }
}

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
                return fail(ex, StatusCode::SERVICE_UNAVAILABLE, "circuit breaker open");
            }
            // Nothing left to retry on: the client gets the last attempt's failure.
            Selection::Exhausted => match last_failure {
                Some(f) => return fail(ex, f.status, &f.detail),
                None => return fail(ex, StatusCode::SERVICE_UNAVAILABLE, "no backend available"),
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
        let retry_status = may_retry && replayable;
        let failed = match attempt_once(
            up,
            ex,
            &parts,
            has_body,
            (pool, backend, addr),
            &policy,
            deadline,
            retry_status,
        )
        .await
        {
            None => return,
            // The failure is the client's doing (it reset the request): not the backend's.
            Some(_) if ex.borrow().is_cancelled() => return,
            Some(f) => f,
        };
        let safe = matches!(failed.kind, Kind::Retry(RetryOn::ConnectFailure | RetryOn::RefusedStream)) || replayable;
        let wanted = match failed.kind {
            Kind::Retry(on) => policy.retries.on.contains(&on),
            Kind::Status => true,
        };
        if !(safe && wanted && attempt < attempts) {
            return fail(ex, failed.status, &failed.detail);
        }
        if !may_retry {
            metrics::counter!("spooky_retry_budget_exhausted_total").increment(1);
            return fail(ex, failed.status, &failed.detail);
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

/// One attempt on `target` (pool, backend, address). `None` when a response reached the
/// client (fully, or until a reset after its head); otherwise why not.
#[allow(clippy::too_many_arguments)]
async fn attempt_once(
    up: &Upstreams,
    ex: &SharedExchange,
    parts: &http::request::Parts,
    has_body: bool,
    (pool, backend, addr): (usize, usize, SocketAddr),
    policy: &RoutePolicy,
    deadline: Instant,
    retry_status: bool,
) -> Option<Failed> {
    // Outlier detection hears of every failure except a refused stream (not processed) and
    // one the client cancelled (the body pump reset it upstream): neither says anything about
    // the backend.
    let failed = |kind: RetryOn, status: StatusCode, detail: String| {
        if kind != RetryOn::RefusedStream && !ex.borrow().is_cancelled() {
            up.record_health(pool, backend, true);
        }
        Some(Failed { kind: Kind::Retry(kind), status, detail })
    };
    let (response, body_tx, _conn) = {
        let _pending = LoadGuard::pending(up, pool, backend);
        // A pooled connection can turn out dead (closed, GOAWAY) when a stream is opened on it.
        // Nothing reached the backend then, so one reconnect is always safe (and not a retry).
        let mut reconnected = false;
        loop {
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
                Ok((response, body_tx)) => break (response, body_tx, conn),
                Err(e) if !reconnected => {
                    tracing::debug!(%addr, error = %e, "pooled upstream connection unusable, reconnecting");
                    up.connections.borrow_mut().forget(&conn);
                    reconnected = true;
                }
                Err(e) => {
                    return failed(
                        RetryOn::RefusedStream,
                        StatusCode::BAD_GATEWAY,
                        format!("{addr} refused the stream: {e}"),
                    )
                }
            }
        }
    };
    let mut active = LoadGuard::active(up, pool, backend);
    // The balancer hears how the attempt ended; a cancelled one only leaves (guard's drop).
    let mut ended = |latency: Duration, ok: bool| {
        if !ex.borrow().is_cancelled() {
            active.end(latency, ok);
        }
    };
    let sent_at = Instant::now();
    let upload_progress = Rc::new(Cell::new(sent_at));
    if has_body {
        monoio::spawn(pump_request_body(ex.clone(), body_tx, upload_progress.clone()));
    }

    // The head timeout starts once the request is fully sent, as in Envoy: an upload of any
    // length is never cut short by it (a stalled client is bounded by the QUIC idle timeout).
    // Until then the same timeout bounds a backend that stops taking the body (no HTTP/2
    // window for that long): otherwise such an upload would wait for capacity forever.
    let mut response = pin!(response);
    let mut early = None;
    while has_body && early.is_none() {
        let progress = upload_progress.get();
        let mut stall = pin!(monoio::time::sleep_until((progress + policy.per_try_timeout).into()));
        let woke = poll_fn(|cx| match response.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Some(Some(r))),
            Poll::Pending if ex.borrow_mut().poll_request_forwarded(cx).is_ready() => Poll::Ready(Some(None)),
            Poll::Pending => stall.as_mut().poll(cx).map(|()| None),
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
            match monoio::time::timeout(limit, response).await {
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
            return failed(RetryOn::RefusedStream, StatusCode::BAD_GATEWAY, format!("{addr} refused the stream"));
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
        return Some(Failed { kind: Kind::Status, status, detail: format!("{addr} answered {status}") });
    }
    ex.borrow_mut().upstream_time = Some(latency);
    stream_response(up, ex, response).await;
    None
}

/// Hands the response head to the edge and streams the body and trailers after it.
async fn stream_response(up: &Upstreams, ex: &SharedExchange, response: Response<RecvStream>) {
    let (head, mut body) = response.into_parts();
    {
        let mut x = ex.borrow_mut();
        x.resp_head = Some(head);
        x.resp_flow = Some(body.flow_control().clone());
        x.notify_edge();
    }
    loop {
        let next = monoio::time::timeout(up.body_idle_timeout, body.data()).await;
        match next {
            // A stall is the backend's fault only when the client is keeping up.
            Err(_) if ex.borrow().resp_buffered > 0 => continue,
            Err(_) => return reset(ex, "upstream body stalled"),
            Ok(None) => break,
            Ok(Some(Ok(chunk))) if chunk.is_empty() => {}
            Ok(Some(Ok(chunk))) => ex.borrow_mut().push_response_chunk(chunk),
            Ok(Some(Err(e))) => return reset(ex, &format!("upstream body failed: {e}")),
        }
    }
    let trailers = match body.trailers().await {
        Ok(t) => t,
        Err(e) => return reset(ex, &format!("upstream trailers failed: {e}")),
    };
    let mut x = ex.borrow_mut();
    x.resp_trailers = trailers;
    x.resp_end = true;
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

fn fail(ex: &SharedExchange, status: StatusCode, detail: &str) {
    metrics::counter!("spooky_upstream_failures_total", "status" => status.as_str().to_owned()).increment(1);
    ex.borrow_mut().respond_locally(status, detail);
}

fn reset(ex: &SharedExchange, why: &str) {
    tracing::debug!(why, "resetting client stream after the response started");
    metrics::counter!("spooky_upstream_resets_total").increment(1);
    let mut x = ex.borrow_mut();
    x.failure = Some(Failure::Reset(h3_error::INTERNAL_ERROR));
    x.notify_edge();
}

/// Moves request body chunks from the exchange into the HTTP/2 stream, never sending more than
/// the peer's flow-control window allows.
/// Each chunk the backend takes moves `progress` on.
async fn pump_request_body(ex: SharedExchange, mut tx: SendStream<Bytes>, progress: Rc<Cell<Instant>>) {
    loop {
        let item = poll_fn(|cx| ex.borrow_mut().poll_request_item(cx)).await;
        let sent = match item {
            RequestItem::Chunk(mut data) => {
                let mut result = Ok(());
                while !data.is_empty() && result.is_ok() {
                    tx.reserve_capacity(data.len());
                    result = match wait_capacity(&ex, &mut tx).await {
                        Some(n) => tx.send_data(data.split_to(n.min(data.len())), false),
                        None => Err(h2::Error::from(h2::Reason::CANCEL)),
                    };
                    progress.set(Instant::now());
                }
                result
            }
            RequestItem::End(Some(trailers)) => return finish(&ex, tx.send_trailers(trailers)),
            RequestItem::End(None) => return finish(&ex, tx.send_data(Bytes::new(), true)),
            RequestItem::Cancelled => {
                tx.send_reset(h2::Reason::CANCEL);
                return ex.borrow_mut().mark_request_forwarded();
            }
        };
        if sent.is_err() {
            return abandon(&ex);
        }
    }
}

/// Waits for send capacity; `None` when the stream is gone or the exchange was cancelled.
async fn wait_capacity(ex: &SharedExchange, tx: &mut SendStream<Bytes>) -> Option<usize> {
    poll_fn(|cx| {
        if ex.borrow_mut().poll_cancelled(cx, Waiter::BodyPump).is_ready() {
            return Poll::Ready(None);
        }
        crate::runtime::poll_send_capacity(tx, cx)
    })
    .await
}

fn finish(ex: &SharedExchange, r: Result<(), h2::Error>) {
    if r.is_err() {
        return abandon(ex);
    }
    ex.borrow_mut().mark_request_forwarded();
}

/// The upstream stopped accepting the body (it answered early or reset): the edge stops reading.
fn abandon(ex: &SharedExchange) {
    let mut x = ex.borrow_mut();
    x.req_abandoned = true;
    x.mark_request_forwarded();
    x.notify_edge();
}
