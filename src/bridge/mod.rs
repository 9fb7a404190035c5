//! The bridge between the HTTP/3 edge and the HTTP/2 upstream.
//!
//! - [`request`]: HTTP/3 request header section → validated [`request::RequestHead`] → HTTP/2
//!   request (RFC 9114 §4.3.1, RFC 9113 §8.2.2, RFC 9110 §7.6).
//! - [`response`]: HTTP/2 response head and trailers → HTTP/3 header sections.
//! - [`exchange`]: the per-request state both halves share: body queues in each direction,
//!   end-of-stream, trailers, failure and cancellation, plus the [`exchange::Notifier`] that
//!   wakes the edge's event loop when the upstream side has news.
//! - [`budget`]: the per-connection and per-worker budgets for request-body bytes held.

pub mod budget;
pub mod exchange;
pub mod request;
pub mod response;

/// HTTP/3 error codes (RFC 9114 §8.1) Spooky uses on streams.
pub mod h3_error {
    pub const NO_ERROR: u64 = 0x100;
    pub const INTERNAL_ERROR: u64 = 0x102;
    pub const REQUEST_CANCELLED: u64 = 0x10c;
    pub const REQUEST_INCOMPLETE: u64 = 0x10d;
    pub const MESSAGE_ERROR: u64 = 0x10e;
}

/// Headers that describe one hop's connection, never forwarded (RFC 9110 §7.6.1) and
/// malformed in HTTP/2 and HTTP/3 requests (RFC 9113 §8.2.2, RFC 9114 §4.2).
pub(crate) const CONNECTION_SPECIFIC: [&str; 5] =
    ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"];
