//! Per-thread results (HDR latency histogram, status counts, errors, bytes) merged at the end,
//! and the shared atomic counters the progress line reads every second.

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Live counters shared by all threads (relaxed; only for the progress line).
#[derive(Default)]
pub struct Progress {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub handshakes: AtomicU64,
    pub bytes: AtomicU64,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Results of one thread, or of the whole run once merged.
pub struct Stats {
    /// Latency in microseconds.
    pub latency: Histogram<u64>,
    pub status: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    /// Requests that completed with a response (any status).
    pub responses: u64,
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// Completed QUIC/TCP handshakes inside the measured window.
    pub handshakes: u64,
    /// Connections open at the start of the window.
    pub connections: u64,
    /// Length of the measured window.
    pub elapsed: Duration,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
            responses: 0,
            bytes_down: 0,
            bytes_up: 0,
            handshakes: 0,
            connections: 0,
            elapsed: Duration::ZERO,
        }
    }
}

impl Stats {
    pub fn response(&mut self, progress: &Progress, latency: Duration, status: u16, down: u64) {
        self.latency.saturating_record((latency.as_micros() as u64).max(1));
        *self.status.entry(status).or_default() += 1;
        self.responses += 1;
        self.bytes_down += down;
        Progress::add(&progress.requests, 1);
        Progress::add(&progress.bytes, down);
    }

    pub fn error(&mut self, progress: &Progress, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
        Progress::add(&progress.errors, 1);
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Requests finished either way (for `--requests` bounds).
    pub fn finished(&self) -> u64 {
        self.responses + self.error_count()
    }

    pub fn merge(&mut self, other: Stats) {
        self.latency.add(&other.latency).expect("same bounds");
        for (k, v) in other.status {
            *self.status.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.responses += other.responses;
        self.bytes_down += other.bytes_down;
        self.bytes_up += other.bytes_up;
        self.handshakes += other.handshakes;
        self.connections += other.connections;
        self.elapsed = self.elapsed.max(other.elapsed);
    }

    pub fn to_json(&self) -> Value {
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let h = &self.latency;
        let pct = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q));
        json!({
            "elapsed_s": self.elapsed.as_secs_f64(),
            "responses": self.responses,
            "errors": self.error_count(),
            "error_kinds": self.errors,
            "status": self.status.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "rps": self.responses as f64 / secs,
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "mib_per_s": (self.bytes_down + self.bytes_up) as f64 / secs / (1u64 << 20) as f64,
            "handshakes": self.handshakes,
            "handshakes_per_s": self.handshakes as f64 / secs,
            "connections": self.connections,
            "latency_us": {
                "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "p999": pct(0.999),
                "max": (!h.is_empty()).then(|| h.max()), "mean": (!h.is_empty()).then(|| h.mean()),
            },
        })
    }
}
