//! Carries one request upstream and its response back, as a task on the worker's runtime.
//!
//! Order of events: pick a backend → get its HTTP/2 connection → wait for a stream slot →
//! send the head → (request body pumped by its own task, so upload and download overlap) →
//! await the response head (bounded by `timeouts.request`) → stream the body → trailers.
//!
//! Failures before the response head become local responses: 502 when the backend refused,
//! reset or broke the exchange, 504 when it did not answer in time. After the head they reset
//! the client's stream, so a truncated body can never pass for a complete one.

use super::pool::{self, Pooled};
use super::Upstreams;
use crate::bridge::exchange::{Failure, RequestItem, SharedExchange};
use crate::bridge::h3_error;
use crate::lb::PickContext;
use bytes::Bytes;
use h2::SendStream;
use http::StatusCode;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::pin;
use std::rc::Rc;
use std::task::Poll;

/// Everything the forwarding task needs about the request.
pub struct Outbound {
    pub request: http::Request<()>,
    /// False when the client's request ended with its header section.
    pub has_body: bool,
    pub pool: usize,
    pub client: SocketAddr,
}

/// Runs the exchange to completion or until the client cancels it.
pub async fn forward(up: Rc<Upstreams>, ex: SharedExchange, out: Outbound) {
    let mut work = pin!(run(&up, &ex, out));
    let finished = poll_fn(|cx| {
        if let Poll::Ready(()) = work.as_mut().poll(cx) {
            return Poll::Ready(true);
        }
        ex.borrow_mut().poll_cancelled(cx).map(|()| false)
    })
    .await;
    if !finished {
        // Dropping `work` drops the h2 response handles, which resets the upstream stream.
        metrics::counter!("spooky_requests_cancelled_total").increment(1);
    }
}

async fn run(up: &Upstreams, ex: &SharedExchange, out: Outbound) {
    let Outbound { request, has_body, pool: pool_idx, client } = out;
    let (parts, ()) = request.into_parts();
    let backend = {
        let ctx = PickContext {
            method: parts.method.as_str(),
            authority: parts.uri.authority().map(|a| a.as_str()).unwrap_or(""),
            path: parts.uri.path(),
            client,
            hash: None,
            excluded: &[],
        };
        up.balancers.borrow_mut()[pool_idx].pick(&ctx)
    };
    let Some(backend) = backend else {
        return fail(ex, StatusCode::SERVICE_UNAVAILABLE, "no backend available");
    };
    let addr = up.pools[pool_idx].backends[backend];

    ex.borrow_mut().upstream = Some(addr);
    // A pooled connection can turn out dead (closed, GOAWAY) when we try to open a stream on
    // it. Nothing reached the backend then, so one retry on a fresh connection is always safe.
    let mut retried = false;
    let (response, body_tx) = loop {
        let conn: Pooled = match pool::connection(&up.connections, addr).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%addr, error = %e, "upstream connect failed");
                return fail(ex, e.status(), &e.to_string());
            }
        };
        let req = http::Request::from_parts(clone_parts(&parts), ());
        let sent = match conn.sender.clone().ready().await {
            Ok(mut sender) => sender.send_request(req, !has_body),
            Err(e) => Err(e),
        };
        match sent {
            Ok(v) => break v,
            Err(e) if !retried => {
                tracing::debug!(%addr, error = %e, "pooled upstream connection unusable, reconnecting");
                metrics::counter!("spooky_upstream_retries_total").increment(1);
                up.connections.borrow_mut().forget(addr, &conn);
                retried = true;
            }
            Err(e) => return fail(ex, StatusCode::BAD_GATEWAY, &format!("upstream refused the stream: {e}")),
        }
    };
    let sent_at = std::time::Instant::now();
    if has_body {
        monoio::spawn(pump_request_body(ex.clone(), body_tx));
    }

    // `timeouts.request` starts once the request is fully sent, as in Envoy: an upload of any
    // length is never cut short by it (a stalled client is bounded by the QUIC idle timeout).
    let mut response = pin!(response);
    let early = if has_body {
        poll_fn(|cx| match response.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending => ex.borrow_mut().poll_request_forwarded(cx).map(|()| None),
        })
        .await
    } else {
        None
    };
    let result = match early {
        Some(r) => r,
        None => match monoio::time::timeout(up.request_timeout, response).await {
            Err(_) => return fail(ex, StatusCode::GATEWAY_TIMEOUT, "upstream did not answer in time"),
            Ok(r) => r,
        },
    };
    let response = match result {
        Err(e) => return fail(ex, StatusCode::BAD_GATEWAY, &format!("upstream failed: {e}")),
        Ok(r) => r,
    };
    let (head, mut body) = response.into_parts();
    {
        let mut x = ex.borrow_mut();
        x.upstream_time = Some(sent_at.elapsed());
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
async fn pump_request_body(ex: SharedExchange, mut tx: SendStream<Bytes>) {
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
        if ex.borrow_mut().poll_cancelled(cx).is_ready() {
            return Poll::Ready(None);
        }
        if tx.capacity() > 0 {
            return Poll::Ready(Some(tx.capacity()));
        }
        match tx.poll_capacity(cx) {
            Poll::Ready(Some(Ok(n))) if n > 0 => Poll::Ready(Some(n)),
            Poll::Ready(Some(Ok(_))) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
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
