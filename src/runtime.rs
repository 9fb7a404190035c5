//! Small helpers for tasks on a monoio runtime (Spooky's workers, its test backend and the
//! load generator share them).

use bytes::Bytes;
use h2::SendStream;
use std::future::poll_fn;
use std::task::{Context, Poll};

/// Gives other tasks on this runtime one turn.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Polls for HTTP/2 send capacity on a stream that has reserved some: `Some(n)` bytes may be
/// sent now, `None` means the stream is gone. (h2 may report a capacity of 0 spuriously; that
/// is waited out here.)
pub fn poll_send_capacity(tx: &mut SendStream<Bytes>, cx: &mut Context<'_>) -> Poll<Option<usize>> {
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
}
