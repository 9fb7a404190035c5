//! The request body on its way upstream: the pump that moves it from the exchange into one
//! attempt's HTTP/2 stream, and the replay buffer that lets a later stream send it again.
//!
//! A stream the backend did not process (refused, or above a GOAWAY's last stream id: RFC 9113
//! §8.7, §6.8) may be sent again on another connection, but only with the very same bytes. So
//! every chunk the pump takes from the exchange stays in the [`Upload`] until a stream has
//! been given more than `upstream_h2.replay_buffer` bytes; from then on the body cannot be
//! replayed, and such a request fails with 502 rather than reaching the backend with a piece
//! missing. The pump takes a chunk only once the one before went out whole, so the buffer
//! holds at most the limit plus one chunk. (At default HTTP/2 windows a backend can be given
//! at most 64 KiB before it has read the request head, the same as the default limit.)
//!
//! The pump is a plain future that the attempt polls alongside its own waits (see
//! `forward::Pump`), never a task of its own: when an attempt ends, its pump is dropped with
//! it, so two attempts can never take chunks from the same body at once.

use crate::bridge::exchange::{Exchange, RequestItem, SharedExchange, Waiter};
use bytes::Bytes;
use h2::SendStream;
use http::HeaderMap;
use std::cell::Cell;
use std::future::poll_fn;
use std::task::{Context, Poll};
use std::time::Instant;

/// One request's body as its attempts see it.
pub struct Upload {
    /// The chunks taken from the exchange so far, until a stream was given more than `limit`.
    held: Vec<Bytes>,
    limit: usize,
    /// A stream was given more than `limit` bytes: `held` is empty and stays so.
    overflowed: bool,
    /// The client's end of the body (with its trailers), once taken from the exchange.
    end: Option<Option<HeaderMap>>,
}

/// How a pump ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// The whole body (and its end) went into the stream.
    Complete,
    /// The stream stopped taking it (reset, refused, connection gone).
    Refused,
    /// The client went away; the upstream stream was reset.
    Cancelled,
}

impl Upload {
    pub fn new(limit: usize) -> Self {
        Upload { held: Vec::new(), limit, overflowed: false, end: None }
    }

    /// Whether every byte a stream was given is still held, so another stream can be given
    /// the same body.
    pub fn replayable(&self) -> bool {
        !self.overflowed
    }

    /// The next item for a stream that has had `cursor` held chunks: held chunks first (a
    /// replay), then the client's end if it was already taken, then what the exchange has.
    fn poll_next(&mut self, cursor: &mut usize, ex: &mut Exchange, cx: &mut Context<'_>) -> Poll<RequestItem> {
        if ex.is_cancelled() {
            return Poll::Ready(RequestItem::Cancelled);
        }
        if let Some(chunk) = self.held.get(*cursor) {
            *cursor += 1;
            return Poll::Ready(RequestItem::Chunk(chunk.clone()));
        }
        if let Some(end) = &self.end {
            return Poll::Ready(RequestItem::End(end.clone()));
        }
        let item = std::task::ready!(ex.poll_request_item(cx));
        match &item {
            RequestItem::Chunk(chunk) if !self.overflowed => {
                self.held.push(chunk.clone());
                *cursor += 1;
            }
            RequestItem::Chunk(_) | RequestItem::Cancelled => {}
            RequestItem::End(trailers) => self.end = Some(trailers.clone()),
        }
        Poll::Ready(item)
    }

    /// A stream has been given the body up to `offset`: past the limit, the held chunks go.
    fn sent_up_to(&mut self, offset: usize) {
        if offset > self.limit && !self.overflowed {
            self.overflowed = true;
            self.held = Vec::new();
        }
    }
}

/// Sends the body into `tx`, never more than the peer's flow-control window allows; every
/// chunk the backend takes moves `progress` on.
pub async fn pump(
    ex: &SharedExchange,
    mut tx: SendStream<Bytes>,
    upload: &mut Upload,
    progress: &Cell<Instant>,
) -> Sent {
    let (mut cursor, mut offset) = (0, 0);
    loop {
        let item = poll_fn(|cx| upload.poll_next(&mut cursor, &mut ex.borrow_mut(), cx)).await;
        let sent = match item {
            RequestItem::Chunk(mut data) => {
                let mut result = Ok(());
                while !data.is_empty() && result.is_ok() {
                    tx.reserve_capacity(data.len());
                    let n = match wait_capacity(ex, &mut tx).await {
                        Some(n) => n.min(data.len()),
                        None if ex.borrow().is_cancelled() => break,
                        None => return Sent::Refused,
                    };
                    result = tx.send_data(data.split_to(n), false);
                    offset += n;
                    upload.sent_up_to(offset);
                    progress.set(Instant::now());
                }
                result
            }
            RequestItem::End(Some(trailers)) => return done(tx.send_trailers(trailers)),
            RequestItem::End(None) => return done(tx.send_data(Bytes::new(), true)),
            RequestItem::Cancelled => Ok(()),
        };
        if sent.is_err() {
            return Sent::Refused;
        }
        if ex.borrow().is_cancelled() {
            tx.send_reset(h2::Reason::CANCEL);
            return Sent::Cancelled;
        }
    }
}

fn done(r: Result<(), h2::Error>) -> Sent {
    match r {
        Ok(()) => Sent::Complete,
        Err(_) => Sent::Refused,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::exchange::{Notifier, StreamKey};
    use std::rc::Rc;

    fn next(upload: &mut Upload, cursor: &mut usize, ex: &SharedExchange) -> Option<RequestItem> {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        match upload.poll_next(cursor, &mut ex.borrow_mut(), &mut cx) {
            Poll::Ready(item) => Some(item),
            Poll::Pending => None,
        }
    }

    fn chunk(item: Option<RequestItem>) -> Bytes {
        match item {
            Some(RequestItem::Chunk(c)) => c,
            _ => panic!("expected a chunk"),
        }
    }

    #[test]
    fn a_replay_sends_the_held_chunks_then_the_rest_once() {
        let ex = Exchange::new(StreamKey { conn: 1, stream: 0 }, Rc::new(Notifier::default()), None);
        let mut upload = Upload::new(10);
        ex.borrow_mut().push_request_chunk(Bytes::from_static(b"abcd"));
        let mut first = 0;
        assert_eq!(chunk(next(&mut upload, &mut first, &ex)), "abcd");
        assert!(next(&mut upload, &mut first, &ex).is_none(), "nothing more queued yet");
        // The first stream is refused; the second gets the held chunk, then new ones.
        ex.borrow_mut().push_request_chunk(Bytes::from_static(b"efgh"));
        let mut second = 0;
        assert_eq!(chunk(next(&mut upload, &mut second, &ex)), "abcd");
        assert_eq!(chunk(next(&mut upload, &mut second, &ex)), "efgh");
        ex.borrow_mut().finish_request(None);
        assert!(matches!(next(&mut upload, &mut second, &ex), Some(RequestItem::End(None))));
        assert!(upload.replayable());
        // A third stream gets the whole body and its end again, and no chunk twice.
        let mut third = 0;
        assert_eq!(chunk(next(&mut upload, &mut third, &ex)), "abcd");
        assert_eq!(chunk(next(&mut upload, &mut third, &ex)), "efgh");
        assert!(matches!(next(&mut upload, &mut third, &ex), Some(RequestItem::End(None))));
    }

    #[test]
    fn a_body_given_past_the_limit_is_no_longer_replayable() {
        let ex = Exchange::new(StreamKey { conn: 1, stream: 0 }, Rc::new(Notifier::default()), None);
        let mut upload = Upload::new(6);
        ex.borrow_mut().push_request_chunk(Bytes::from_static(b"abcd"));
        ex.borrow_mut().push_request_chunk(Bytes::from_static(b"efgh"));
        let mut cursor = 0;
        assert_eq!(chunk(next(&mut upload, &mut cursor, &ex)), "abcd");
        upload.sent_up_to(4);
        // Taken but given only up to the limit: a refused stream can still be replayed whole.
        assert_eq!(chunk(next(&mut upload, &mut cursor, &ex)), "efgh");
        upload.sent_up_to(6);
        assert!(upload.replayable());
        let mut replay = 0;
        assert_eq!(chunk(next(&mut upload, &mut replay, &ex)), "abcd");
        assert_eq!(chunk(next(&mut upload, &mut replay, &ex)), "efgh");
        upload.sent_up_to(7);
        assert!(!upload.replayable(), "7 bytes given, 6 held at most");
        // The stream that has it goes on with the rest.
        ex.borrow_mut().push_request_chunk(Bytes::from_static(b"ij"));
        assert_eq!(chunk(next(&mut upload, &mut replay, &ex)), "ij");
    }

    #[test]
    fn a_cancelled_exchange_ends_the_body() {
        let ex = Exchange::new(StreamKey { conn: 1, stream: 0 }, Rc::new(Notifier::default()), None);
        let mut upload = Upload::new(6);
        ex.borrow_mut().push_request_chunk(Bytes::from_static(b"abcd"));
        ex.borrow_mut().cancel();
        assert!(matches!(next(&mut upload, &mut 0, &ex), Some(RequestItem::Cancelled)));
    }
}
