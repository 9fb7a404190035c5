//! Prometheus metrics. Names follow Prometheus conventions: `spooky_` prefix, base units,
//! `_total` for counters, `_seconds` / `_bytes` for histograms.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `spooky_requests_total` | counter | worker, route, pool, class (`2xx`…, `reset`) |
//! | `spooky_request_duration_seconds` | histogram | worker, pool — request head to response end |
//! | `spooky_upstream_response_seconds` | histogram | worker, pool — request sent to response head |
//! | `spooky_connections_active`, `spooky_streams_active` | gauge | worker |
//! | `spooky_worker_timers` | gauge | worker — deadlines the worker holds (at most one per connection) |
//! | `spooky_connections_accepted_total`, `spooky_quic_handshakes_total` | counter | worker |
//! | `spooky_packets_received_total`, `spooky_packets_sent_total` | counter | worker |
//! | `spooky_packets_dropped_total` | counter | worker, reason (`stray_queue_full`: the owner's stray mailbox holds 4,096 packets or 4 MiB) |
//! | `spooky_packets_forwarded_total` | counter | worker — strays handed to the owning worker |
//! | `spooky_stateless_resets_sent_total`, `spooky_retries_sent_total`, `spooky_version_negotiations_total` | counter | worker |
//! | `spooky_new_tokens_sent_total`, `spooky_new_tokens_accepted_total` | counter | worker — NEW_TOKENs issued after a handshake; Initials admitted on a valid one without a Retry |
//! | `spooky_connections_refused_total` | counter | worker, reason (`connection_limit`, `rate_limit`) |
//! | `spooky_handshake_failures_total` | counter | cause — connections that ended before the handshake completed: the peer's TLS alert (`bad_certificate`, `unknown_ca`, …) or transport error, Spooky's own (`local_…`, e.g. `local_no_application_protocol`), `idle_timeout`, `other`; the list is in `edge::handshake` |
//! | `spooky_connection_migrations_total`, `spooky_early_data_requests_total` | counter | worker |
//! | `spooky_path_validation_failures_total` | counter | worker — client addresses that never answered path validation |
//! | `spooky_connection_ids` | gauge | worker — CIDs in the worker's table, as of the last CID a connection retired or was issued |
//! | `spooky_slow_request_bodies_total` | counter | worker — bodies cut below `timeouts.body_min_rate` |
//! | `spooky_request_body_buffered_bytes` | gauge | worker — request-body bytes held, against `quic.body_buffer_per_worker` |
//! | `spooky_request_body_stalls_total` | counter | worker — times a stream stopped reading its body on a full budget |
//! | `spooky_malformed_requests_total` | counter | worker |
//! | `spooky_quic_transport_errors_total` | counter | code — transport errors Spooky closed a connection with (e.g. 0x4 STREAM_LIMIT_ERROR) |
//! | `spooky_h3_connection_errors_total` | counter | HTTP/3 connection errors (quiche closed the connection: QPACK, frame, excessive load) |
//! | `spooky_quic_rtt_seconds`, `spooky_quic_cwnd_bytes` | histogram | sampled from quiche when a connection closes |
//! | `spooky_quic_packets_lost_total`, `spooky_quic_packets_retransmitted_total` | counter | worker |
//! | `spooky_upstream_connects_total`, `spooky_upstream_failures_total{status}`, `spooky_upstream_resets_total`, `spooky_upstream_retries_total`, `spooky_requests_cancelled_total` | counter | |
//! | `spooky_upstream_replays_total` | counter | outcome — unprocessed streams sent again (`refused_stream`, `goaway`, `connection_closing`) or not (`body_not_held`, `exhausted`) |
//! | `spooky_client_read_timeouts_total` | counter | response streams reset after `timeouts.client_read` without the client accepting a byte |
//! | `spooky_reloads_total` | counter | result (`ok`, `invalid`, `restart_required`, `worker_failed`) |
//! | `spooky_config_version` | gauge | the version every worker acknowledged |
//! | `spooky_config_version_pending` | gauge | a newer version not every worker acknowledged yet (0: none) |
//! | `spooky_worker_panics_total` | counter | worker — panics; the worker was restarted (`control::supervise`) |
//! | `spooky_access_log_dropped_total` | counter | |

use crate::edge::handshake::Cause;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Latency buckets (seconds): 50 µs to 30 s.
const LATENCY_BUCKETS: [f64; 20] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 15.0, 20.0, 30.0,
];
/// Congestion-window buckets (bytes).
const CWND_BUCKETS: [f64; 10] = [
    4_096.0,
    16_384.0,
    65_536.0,
    131_072.0,
    262_144.0,
    524_288.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];

/// Installs the process-wide recorder and returns the handle `/metrics` renders from.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), &CWND_BUCKETS)?
        .install_recorder()?;
    Ok(handle)
}

/// Why a datagram was dropped.
#[derive(Clone, Copy, Debug)]
pub enum DropReason {
    Unparseable = 0,
    UnknownCid,
    ShortInitial,
    Rejected,
    Draining,
    /// The owning worker's stray-packet mailbox was full.
    StrayQueueFull,
    /// An Initial carried a Retry token that was altered, expired or for another client.
    InvalidToken,
}

const DROP_REASONS: [&str; 7] =
    ["unparseable", "unknown_cid", "short_initial", "rejected", "draining", "stray_queue_full", "invalid_token"];

/// Why a new connection was refused.
const REFUSALS: [&str; 2] = ["connection_limit", "rate_limit"];

/// One worker's pre-registered metric handles.
pub struct WorkerMetrics {
    worker: String,
    pub connections_active: Gauge,
    pub streams_active: Gauge,
    /// Entries in the worker's timer set.
    pub timers: Gauge,
    pub connections_accepted: Counter,
    pub handshakes: Counter,
    pub packets_received: Counter,
    pub packets_sent: Counter,
    pub malformed_requests: Counter,
    pub quic_rtt: Histogram,
    pub quic_cwnd: Histogram,
    pub quic_lost: Counter,
    pub quic_retransmitted: Counter,
    /// Packets handed to the worker owning their connection (the BPF program missed them).
    pub packets_forwarded: Counter,
    pub stateless_resets: Counter,
    pub retries_sent: Counter,
    /// NEW_TOKEN frames queued, one per connection once its handshake completed.
    pub new_tokens_sent: Counter,
    /// Initials admitted as address-validated on a valid NEW_TOKEN (no Retry).
    pub new_tokens_accepted: Counter,
    pub version_negotiations: Counter,
    /// Connections that moved to a new client address or port (migration, NAT rebinding):
    /// quiche validated the new path and made it the active one.
    pub migrations: Counter,
    /// New client addresses that did not answer path validation (a spoofed or vanished
    /// address; the connection stays on, or goes back to, its validated path).
    pub path_validation_failures: Counter,
    /// Requests that arrived in 0-RTT early data.
    pub early_data_requests: Counter,
    /// Request streams reset because their body arrived below `timeouts.body_min_rate`.
    pub slow_request_bodies: Counter,
    refused: [Counter; 2],
    dropped: [Counter; 7],
    /// By [`Cause::index`]; no worker label (rare, and ~100 causes).
    handshake_failures: Vec<Counter>,
}

impl WorkerMetrics {
    pub fn new(worker: usize) -> Self {
        let w = worker.to_string();
        let l = || [("worker", w.clone())];
        WorkerMetrics {
            connections_active: metrics::gauge!("spooky_connections_active", &l()),
            streams_active: metrics::gauge!("spooky_streams_active", &l()),
            timers: metrics::gauge!("spooky_worker_timers", &l()),
            connections_accepted: metrics::counter!("spooky_connections_accepted_total", &l()),
            handshakes: metrics::counter!("spooky_quic_handshakes_total", &l()),
            packets_received: metrics::counter!("spooky_packets_received_total", &l()),
            packets_sent: metrics::counter!("spooky_packets_sent_total", &l()),
            malformed_requests: metrics::counter!("spooky_malformed_requests_total", &l()),
            quic_rtt: metrics::histogram!("spooky_quic_rtt_seconds", &l()),
            quic_cwnd: metrics::histogram!("spooky_quic_cwnd_bytes", &l()),
            quic_lost: metrics::counter!("spooky_quic_packets_lost_total", &l()),
            quic_retransmitted: metrics::counter!("spooky_quic_packets_retransmitted_total", &l()),
            packets_forwarded: metrics::counter!("spooky_packets_forwarded_total", &l()),
            stateless_resets: metrics::counter!("spooky_stateless_resets_sent_total", &l()),
            retries_sent: metrics::counter!("spooky_retries_sent_total", &l()),
            new_tokens_sent: metrics::counter!("spooky_new_tokens_sent_total", &l()),
            new_tokens_accepted: metrics::counter!("spooky_new_tokens_accepted_total", &l()),
            version_negotiations: metrics::counter!("spooky_version_negotiations_total", &l()),
            migrations: metrics::counter!("spooky_connection_migrations_total", &l()),
            path_validation_failures: metrics::counter!("spooky_path_validation_failures_total", &l()),
            early_data_requests: metrics::counter!("spooky_early_data_requests_total", &l()),
            slow_request_bodies: metrics::counter!("spooky_slow_request_bodies_total", &l()),
            refused: REFUSALS
                .map(|r| metrics::counter!("spooky_connections_refused_total", "worker" => w.clone(), "reason" => r)),
            dropped: DROP_REASONS
                .map(|r| metrics::counter!("spooky_packets_dropped_total", "worker" => w.clone(), "reason" => r)),
            handshake_failures: Cause::all()
                .map(|c| metrics::counter!("spooky_handshake_failures_total", "cause" => c.label()))
                .collect(),
            worker: w,
        }
    }

    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason as usize].increment(1);
    }

    pub fn refused(&self, reason: crate::edge::admission::Refusal) {
        self.refused[reason as usize].increment(1);
    }

    pub fn handshake_failed(&self, cause: Cause) {
        self.handshake_failures[cause.index()].increment(1);
    }

    /// Handles for the requests of one route (or of none, for `route: None`).
    pub fn route(&self, route: Option<(&str, &str)>) -> RouteMetrics {
        let (route, pool) = route.unwrap_or(("none", "none"));
        let labels = |class: &'static str| {
            [
                ("worker", self.worker.clone()),
                ("route", route.to_string()),
                ("pool", pool.to_string()),
                ("class", class.to_string()),
            ]
        };
        let pool_labels = [("worker", self.worker.clone()), ("pool", pool.to_string())];
        RouteMetrics {
            name: route.to_string(),
            requests: CLASSES.map(|c| metrics::counter!("spooky_requests_total", &labels(c))),
            total: metrics::histogram!("spooky_request_duration_seconds", &pool_labels),
            upstream: metrics::histogram!("spooky_upstream_response_seconds", &pool_labels),
        }
    }
}

const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "reset"];

/// One route's handles, built with the snapshot that defined the route. A stream keeps the
/// handles of the route it matched, so a reload never relabels a request in flight.
pub struct RouteMetrics {
    pub name: String,
    requests: [Counter; 6],
    total: Histogram,
    upstream: Histogram,
}

impl RouteMetrics {
    /// Records a finished request: its outcome (`None`: reset), total and upstream durations.
    pub fn finished(&self, status: Option<u16>, total: std::time::Duration, upstream: Option<std::time::Duration>) {
        let class = match status {
            Some(100..=199) => 0,
            Some(200..=299) => 1,
            Some(300..=399) => 2,
            Some(400..=499) => 3,
            Some(_) => 4,
            None => 5,
        };
        self.requests[class].increment(1);
        self.total.record(total.as_secs_f64());
        if let Some(u) = upstream {
            self.upstream.record(u.as_secs_f64());
        }
    }
}
