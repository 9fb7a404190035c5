//! Resilience settings: active health checks, passive outlier detection, circuit breaking
//! (per pool) and retries (per route).

use super::schema::HashKey;
use super::units::Seconds;
use serde::Deserialize;
use std::time::Duration;

/// Active health checking of every backend of a pool: HTTP/2 GET probes from one checker
/// thread per Spooky process; the resulting health view reaches every worker.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Seconds,
    pub timeout: Seconds,
    /// Consecutive successes that mark an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that mark a healthy backend unhealthy.
    pub unhealthy_threshold: u32,
    /// Statuses that count as healthy (default: 200–399).
    pub expected_statuses: Vec<u16>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/healthz".into(),
            interval: Seconds(Duration::from_secs(5)),
            timeout: Seconds(Duration::from_secs(1)),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expected_statuses: Vec::new(),
        }
    }
}

impl HealthCheck {
    pub fn is_expected(&self, status: u16) -> bool {
        if self.expected_statuses.is_empty() {
            (200..400).contains(&status)
        } else {
            self.expected_statuses.contains(&status)
        }
    }
}

/// Passive outlier detection: consecutive gateway failures (connect failure, reset, 502, 503,
/// 504) eject a backend for `base_ejection × times ejected`, capped at `max_ejection`.
/// Computed per worker from the traffic it sees.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Seconds,
    pub max_ejection: Seconds,
    /// Never eject more than this share of a pool's backends.
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 5,
            base_ejection: Seconds(Duration::from_secs(10)),
            max_ejection: Seconds(Duration::from_secs(300)),
            max_ejected_percent: 50,
        }
    }
}

/// Circuit breaking per backend. The limits are for the whole process and split evenly
/// across workers (each worker enforces `limit / workers`, at least 1).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreaker {
    /// Requests in flight to one backend.
    pub max_active: u32,
    /// Requests waiting for a connection or a stream slot on one backend.
    pub max_pending: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        // Generous by default (a proxy should not invent 503s at ordinary concurrency);
        // set real limits to protect backends.
        CircuitBreaker { max_active: 100_000, max_pending: 100_000 }
    }
}

/// When a failed attempt is retried.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RetryOn {
    /// The backend could not be connected to (nothing was sent: always safe).
    ConnectFailure,
    /// The backend refused the stream (REFUSED_STREAM or GOAWAY: not processed, always safe).
    RefusedStream,
    /// The stream broke before a response head.
    Reset,
    /// The response head did not arrive within `per_try_timeout`.
    Timeout,
}

/// Retry policy of a route. Only requests that are safe to repeat are retried: a request is
/// retried after it reached a backend only if its method is idempotent and it has no body.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Retries {
    /// Extra attempts after the first (0 disables retries).
    pub attempts: u32,
    pub on: Vec<RetryOn>,
    /// Also retry responses with these statuses (e.g. 503).
    pub statuses: Vec<u16>,
    /// Bound for one attempt's wait for a response head (default: the route's request timeout).
    pub per_try_timeout: Option<Seconds>,
    /// Retries in flight may be at most this percentage of requests in flight (per worker,
    /// never less than 3), so retries cannot multiply an outage.
    pub budget_percent: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Retries {
            attempts: 1,
            on: vec![RetryOn::ConnectFailure, RetryOn::RefusedStream],
            statuses: Vec::new(),
            per_try_timeout: None,
            budget_percent: 20,
        }
    }
}

/// A route's rate limit: `rate` requests per second with bursts of `burst`, per value of `key`
/// (`client_ip` or `{ header: NAME }`; requests without the header share one bucket).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub rate: f64,
    pub burst: u32,
    #[serde(default = "client_ip")]
    pub key: HashKey,
}

fn client_ip() -> HashKey {
    HashKey::ClientIp
}
