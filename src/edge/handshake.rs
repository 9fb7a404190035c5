//! Connections that end before their handshake completes: why, counted and logged.
//!
//! A client that rejects Spooky's certificate closes the connection with a TLS alert
//! (CRYPTO_ERROR 0x100 + alert, RFC 9001 §4.8) and is never heard of again; without this an
//! operator could not tell a broken certificate from no traffic. When the worker removes a
//! connection that is not established, [`record_failure`] classifies the cause from what
//! quiche saw ([`classify`]), counts it in `spooky_handshake_failures_total{cause}` and logs
//! one `info` line with the client's address, the cause, the error code, the reason phrase
//! and the SNI name — at most [`LOG_BURST`] lines at once and [`LOG_PER_SECOND`] after that
//! per worker, so a flood of failing handshakes cannot fill the log (the counter stays exact).
//!
//! Causes (a fixed set, all pre-registered, so a dashboard sees zeros):
//! - the peer's CONNECTION_CLOSE: a TLS alert by its name (`bad_certificate`, `unknown_ca`,
//!   …; alert 80 is `tls_internal_error`, unlisted ones `tls_alert_other`), a transport error
//!   by its RFC 9000 §20.1 name in lower case (`no_error`, `protocol_violation`, …),
//!   `application_close` for an application error code, `other` for any other code;
//! - the same names with `local_` in front when Spooky closed the connection: its TLS stack
//!   refused the ClientHello (`local_no_application_protocol` for a client offering no ALPN
//!   Spooky speaks), quiche found a protocol violation, or Spooky closed it while draining
//!   (`local_application_error`: quiche sends an application close before the handshake as
//!   APPLICATION_ERROR);
//! - `idle_timeout`: nothing (more) came from the client until the idle timeout (a client
//!   that sent one Initial and went silent, or a path that lost every packet);
//! - `other`: also a connection removed with no error and no timeout (a worker stopping).
//!
//! When both sides' errors are known, Spooky's own counts: once Spooky closes, whatever the
//! peer sends is a reaction.

use super::connection::Connection;
use crate::telemetry::log_limit::{LogLimit, Verdict};
use crate::telemetry::metrics::WorkerMetrics;
use quiche::ConnectionError;
use std::cell::RefCell;
use std::fmt;
use std::time::Instant;

/// Lines logged at once before the rate limit applies (per worker).
pub const LOG_BURST: u32 = 10;
/// Lines logged per second, on average, once the burst is spent (per worker).
pub const LOG_PER_SECOND: f64 = 1.0;
/// Bytes of a reason phrase or SNI name that are logged.
const MAX_TEXT: usize = 128;
/// CRYPTO_ERROR: 0x100 + TLS alert (RFC 9001 §4.8).
const CRYPTO_ERROR: u64 = 0x100;

macro_rules! causes {
    (alerts: [$(($code:literal, $name:literal)),* $(,)?], transport: [$($tname:literal),* $(,)?] $(,)?) => {
        /// TLS alerts with a name of their own, in the order of their labels.
        const ALERTS: &[u8] = &[$($code),*];
        /// One side's labels: alerts, unlisted alert, transport codes 0x0.., application, other.
        const PEER: &[&str] = &[$($name,)* "tls_alert_other", $($tname,)* "application_close", "other"];
        const LOCAL: &[&str] = &[
            $(concat!("local_", $name),)* "local_tls_alert_other", $(concat!("local_", $tname),)*
            "local_application_close", "local_other"
        ];
    };
}

causes! {
    alerts: [
        (0, "close_notify"),
        (10, "unexpected_message"),
        (20, "bad_record_mac"),
        (22, "record_overflow"),
        (40, "handshake_failure"),
        (42, "bad_certificate"),
        (43, "unsupported_certificate"),
        (44, "certificate_revoked"),
        (45, "certificate_expired"),
        (46, "certificate_unknown"),
        (47, "illegal_parameter"),
        (48, "unknown_ca"),
        (49, "access_denied"),
        (50, "decode_error"),
        (51, "decrypt_error"),
        (70, "protocol_version"),
        (71, "insufficient_security"),
        (80, "tls_internal_error"),
        (86, "inappropriate_fallback"),
        (90, "user_canceled"),
        (109, "missing_extension"),
        (110, "unsupported_extension"),
        (112, "unrecognized_name"),
        (113, "bad_certificate_status_response"),
        (115, "unknown_psk_identity"),
        (116, "certificate_required"),
        (120, "no_application_protocol"),
    ],
    // RFC 9000 §20.1, codes 0x0 to 0x10 in order.
    transport: [
        "no_error",
        "internal_error",
        "connection_refused",
        "flow_control_error",
        "stream_limit_error",
        "stream_state_error",
        "final_size_error",
        "frame_encoding_error",
        "transport_parameter_error",
        "connection_id_limit_error",
        "protocol_violation",
        "invalid_token",
        "application_error",
        "crypto_buffer_exceeded",
        "key_update_error",
        "aead_limit_reached",
        "no_viable_path",
    ],
}

const ALERT_OTHER: usize = ALERTS.len();
const TRANSPORT: usize = ALERT_OTHER + 1;
const TRANSPORT_CODES: u64 = 0x11;
const APPLICATION: usize = TRANSPORT + TRANSPORT_CODES as usize;
const OTHER: usize = APPLICATION + 1;
const PER_SIDE: usize = OTHER + 1;
const _: () = assert!(PEER.len() == PER_SIDE && LOCAL.len() == PER_SIDE);

/// Number of causes (the label values of `spooky_handshake_failures_total`).
pub const CAUSES: usize = 2 * PER_SIDE + 1;

/// Why a connection ended before its handshake completed: one of [`CAUSES`] label values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cause(usize);

impl Cause {
    pub const IDLE_TIMEOUT: Cause = Cause(2 * PER_SIDE);
    pub const OTHER: Cause = Cause(OTHER);

    /// Every cause, by index.
    pub fn all() -> impl Iterator<Item = Cause> {
        (0..CAUSES).map(Cause)
    }

    /// Position in [`Cause::all`].
    pub fn index(self) -> usize {
        self.0
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self.0 {
            i if i < PER_SIDE => PEER[i],
            i if i < 2 * PER_SIDE => LOCAL[i - PER_SIDE],
            _ => "idle_timeout",
        }
    }
}

/// Index of a CONNECTION_CLOSE's cause among one side's labels.
fn side_index(e: &ConnectionError) -> usize {
    if e.is_app {
        return APPLICATION;
    }
    match e.error_code {
        c if c < TRANSPORT_CODES => TRANSPORT + c as usize,
        c if (CRYPTO_ERROR..CRYPTO_ERROR + 0x100).contains(&c) => {
            let alert = (c - CRYPTO_ERROR) as u8;
            ALERTS.iter().position(|&a| a == alert).unwrap_or(ALERT_OTHER)
        }
        _ => OTHER,
    }
}

/// The cause of a connection's end from what quiche recorded: the error Spooky closed with
/// (`local`), else the one the peer sent (`peer`), else the idle timeout.
pub fn classify(peer: Option<&ConnectionError>, local: Option<&ConnectionError>, timed_out: bool) -> Cause {
    match (local, peer) {
        (Some(e), _) => Cause(PER_SIDE + side_index(e)),
        (None, Some(e)) => Cause(side_index(e)),
        (None, None) if timed_out => Cause::IDLE_TIMEOUT,
        (None, None) => Cause::OTHER,
    }
}

thread_local! {
    /// The log rate limit of this thread's worker (one worker per thread; kept across reloads).
    static LOG_LIMIT: RefCell<Option<LogLimit>> = const { RefCell::new(None) };
}

/// Counts and (rate-limited) logs a connection removed before its handshake completed.
pub fn record_failure(metrics: &WorkerMetrics, conn: &Connection) {
    let quic = &conn.quic;
    let (local, peer) = (quic.local_error(), quic.peer_error());
    let cause = classify(peer, local, quic.is_timed_out());
    metrics.handshake_failed(cause);
    let now = Instant::now();
    let verdict = LOG_LIMIT
        .with_borrow_mut(|l| l.get_or_insert_with(|| LogLimit::new(LOG_BURST, LOG_PER_SECOND, now)).check(now));
    match verdict {
        Verdict::Suppress { first: true } => tracing::info!(
            "too many handshake failures to log each: suppressing these lines for a while \
             (spooky_handshake_failures_total counts every one)"
        ),
        Verdict::Suppress { first: false } => {}
        Verdict::Log { suppressed } => {
            if suppressed > 0 {
                tracing::info!("suppressed {suppressed} handshake-failure lines");
            }
            let error = local.or(peer);
            tracing::info!(
                peer = %conn.peer,
                cause = %cause.label(),
                code = %Code(error.map(|e| e.error_code)),
                reason = ?Text(error.map_or(&[][..], |e| &e.reason)),
                sni = ?Text(quic.server_name().unwrap_or("").as_bytes()),
                "handshake failed"
            );
        }
    }
}

/// An error code in hex, `-` when there is none.
struct Code(Option<u64>);

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(c) => write!(f, "{c:#x}"),
            None => f.write_str("-"),
        }
    }
}

/// Text a client chose (a reason phrase, an SNI name): quoted, escaped like a Rust string
/// (control characters and quotes cannot forge log structure), cut to [`MAX_TEXT`] bytes.
struct Text<'a>(&'a [u8]);

impl fmt::Debug for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cut = self.0.len() > MAX_TEXT;
        let mut s = String::from_utf8_lossy(&self.0[..self.0.len().min(MAX_TEXT)]).into_owned();
        if cut {
            s.push_str("...");
        }
        fmt::Debug::fmt(&s, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn err(is_app: bool, error_code: u64) -> ConnectionError {
        ConnectionError { is_app, error_code, reason: Vec::new() }
    }

    fn peer(code: u64) -> &'static str {
        classify(Some(&err(false, code)), None, false).label()
    }

    fn local(code: u64) -> &'static str {
        classify(None, Some(&err(false, code)), false).label()
    }

    #[test]
    fn tls_alerts_are_named() {
        assert_eq!(peer(0x100 + 42), "bad_certificate");
        assert_eq!(peer(0x100 + 48), "unknown_ca");
        assert_eq!(peer(0x100 + 45), "certificate_expired");
        assert_eq!(peer(0x100 + 40), "handshake_failure");
        assert_eq!(peer(0x100 + 80), "tls_internal_error");
        assert_eq!(peer(0x100 + 120), "no_application_protocol");
        assert_eq!(peer(0x100 + 200), "tls_alert_other");
        assert_eq!(peer(0x1ff), "tls_alert_other");
        assert_eq!(local(0x100 + 120), "local_no_application_protocol");
        assert_eq!(local(0x100 + 77), "local_tls_alert_other");
    }

    #[test]
    fn transport_errors_are_named_by_rfc_9000() {
        assert_eq!(peer(0x0), "no_error");
        assert_eq!(peer(0x1), "internal_error");
        assert_eq!(peer(0xa), "protocol_violation");
        assert_eq!(peer(0xd), "crypto_buffer_exceeded");
        assert_eq!(peer(0x10), "no_viable_path");
        assert_eq!(peer(0x11), "other");
        assert_eq!(peer(0xff), "other");
        assert_eq!(peer(0x200), "other");
        assert_eq!(peer(u64::MAX), "other");
        assert_eq!(local(0xc), "local_application_error");
        assert_eq!(local(0x8), "local_transport_parameter_error");
        assert_eq!(local(0x4242), "local_other");
    }

    #[test]
    fn spooky_s_own_close_wins_then_the_peer_s_then_the_timeout() {
        let (alert, proto) = (err(false, 0x12a), err(false, 0xa));
        assert_eq!(classify(Some(&alert), Some(&proto), true).label(), "local_protocol_violation");
        assert_eq!(classify(Some(&alert), None, true).label(), "bad_certificate");
        assert_eq!(classify(None, None, true), Cause::IDLE_TIMEOUT);
        assert_eq!(Cause::IDLE_TIMEOUT.label(), "idle_timeout");
        assert_eq!(classify(None, None, false).label(), "other");
        // An application code is not read as a transport code or an alert.
        assert_eq!(classify(Some(&err(true, 0x12a)), None, false).label(), "application_close");
        assert_eq!(classify(None, Some(&err(true, 0x100)), false).label(), "local_application_close");
    }

    #[test]
    fn labels_are_distinct_and_indexed_in_order() {
        let labels: Vec<&str> = Cause::all().map(Cause::label).collect();
        assert_eq!(labels.len(), CAUSES);
        assert_eq!(labels.iter().collect::<HashSet<_>>().len(), CAUSES, "{labels:?}");
        for (i, c) in Cause::all().enumerate() {
            assert_eq!(c.index(), i);
        }
        assert!(labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    }

    #[test]
    fn client_text_is_escaped_and_cut() {
        assert_eq!(format!("{:?}", Text(b"no \"cert\"\n\x1b[31m")), r#""no \"cert\"\n\u{1b}[31m""#);
        let long = format!("{:?}", Text(&[b'a'; 1000]));
        assert_eq!(long, format!("\"{}...\"", "a".repeat(MAX_TEXT)));
        assert_eq!(format!("{:?}", Text(b"\xff")), "\"\u{fffd}\"");
        assert_eq!(Code(Some(0x12a)).to_string(), "0x12a");
        assert_eq!(Code(None).to_string(), "-");
    }
}
