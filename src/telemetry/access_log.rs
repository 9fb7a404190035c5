//! The access log: workers hand finished-request records to a bounded channel; one background
//! thread formats and writes them. A full channel drops the record (counted in
//! `spooky_access_log_dropped_total`) rather than ever blocking a worker. A record keeps at
//! most [`MAX_FIELD`] bytes of the path and authority, so the queue holds at most
//! `access_log.buffer` × about 9 KiB whatever clients send (the cut fields give their allocations back).
//!
//! A log file is created with mode 0640 and reopened on SIGUSR1, for logrotate's
//! `postrotate kill -USR1 $(pidof spooky)` (see the README).

use crate::config::{AccessLog as Settings, AccessLogFormat};
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Bytes of a record's path or authority that are logged; a longer one ends in `...`.
pub const MAX_FIELD: usize = 4096;

/// How often the writer looks for a reopen request while no record arrives.
const REOPEN_CHECK: Duration = Duration::from_millis(500);

/// One finished request.
#[derive(Debug, Clone)]
pub struct Record {
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: String,
    pub authority: String,
    pub path: String,
    /// 0 when the stream was reset before a response.
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub route: String,
    pub upstream: Option<SocketAddr>,
    pub upstream_time: Option<Duration>,
    pub total_time: Duration,
    pub request_id: String,
}

enum Msg {
    Record(Box<Record>),
    Settings(Settings),
}

/// A worker's handle to the access log.
#[derive(Clone)]
pub struct AccessLogger {
    tx: Sender<Msg>,
    enabled: bool,
}

impl AccessLogger {
    /// Whether records are wanted (skip building them otherwise).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn log(&self, mut record: Record) {
        cap(&mut record.path);
        cap(&mut record.authority);
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!("spooky_access_log_dropped_total").increment(1);
            }
        }
    }

    /// Applies new settings (format, fields, target) from a reloaded configuration.
    pub fn reconfigure(&mut self, settings: &Settings) {
        self.enabled = settings.target != "off";
        // A full queue delays the change to the next record slot; never block.
        let _ = self.tx.try_send(Msg::Settings(settings.clone()));
    }
}

/// Cuts `field` to [`MAX_FIELD`] bytes (at a character boundary), marking the cut.
fn cap(field: &mut String) {
    if field.len() > MAX_FIELD {
        let mut end = MAX_FIELD - 3;
        while !field.is_char_boundary(end) {
            end -= 1;
        }
        field.truncate(end);
        field.push_str("...");
        // Truncating keeps the allocation: without this a queued record still holds the
        // whole path (a stuck log with 12 KB paths held 8,192 × 12 KB).
        field.shrink_to_fit();
    }
}

/// Starts the writer thread, which reopens a file target on SIGUSR1.
pub fn start(settings: &Settings) -> AccessLogger {
    let (tx, rx) = crossbeam_channel::bounded(settings.buffer);
    let initial = settings.clone();
    let reopen = Arc::new(AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGUSR1, reopen.clone()) {
        tracing::warn!(error = %e, "SIGUSR1 cannot reopen the access log");
    }
    std::thread::Builder::new()
        .name("spooky-access-log".into())
        .spawn(move || writer(rx, initial, &reopen))
        .expect("spawning the access-log thread");
    AccessLogger { tx, enabled: settings.target != "off" }
}

fn open(target: &str) -> Option<Box<dyn Write + Send>> {
    match target {
        "off" => None,
        "stdout" => Some(Box::new(std::io::stdout())),
        "stderr" => Some(Box::new(std::io::stderr())),
        // Client addresses and paths are not for every user of the machine.
        path => match std::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(path) {
            Ok(f) => Some(Box::new(f)),
            Err(e) => {
                tracing::error!(path, error = %e, "cannot open the access log; lines are dropped");
                None
            }
        },
    }
}

fn writer(rx: Receiver<Msg>, mut settings: Settings, reopen: &AtomicBool) {
    let mut out = open(&settings.target).map(|w| std::io::BufWriter::with_capacity(64 * 1024, w));
    let mut line = String::with_capacity(512);
    loop {
        let is_file = !matches!(settings.target.as_str(), "off" | "stdout" | "stderr");
        if reopen.swap(false, Ordering::Relaxed) && is_file {
            // logrotate moved the file away: flush what belongs to it, continue in a new one.
            if let Some(o) = out.as_mut() {
                let _ = o.flush();
            }
            out = open(&settings.target).map(|w| std::io::BufWriter::with_capacity(64 * 1024, w));
            tracing::info!(target = %settings.target, "access log reopened (SIGUSR1)");
        }
        let msg = match rx.recv_timeout(REOPEN_CHECK) {
            Ok(msg) => msg,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        match msg {
            Msg::Settings(new) => {
                if new.target != settings.target {
                    if let Some(o) = out.as_mut() {
                        let _ = o.flush();
                    }
                    out = open(&new.target).map(|w| std::io::BufWriter::with_capacity(64 * 1024, w));
                }
                settings = new;
            }
            Msg::Record(r) => {
                if let Some(o) = out.as_mut() {
                    line.clear();
                    format_record(&r, &settings, &mut line);
                    let _ = o.write_all(line.as_bytes());
                }
            }
        }
        // Flush when the burst is over, so lines appear promptly without a write per line.
        if rx.is_empty() {
            if let Some(o) = out.as_mut() {
                let _ = o.flush();
            }
        }
    }
}

/// Formats one line (with its newline) as JSON or `key=value` text.
pub fn format_record(r: &Record, s: &Settings, out: &mut String) {
    use std::fmt::Write as _;
    let json = s.format == AccessLogFormat::Json;
    if json {
        out.push('{');
    }
    for (i, field) in s.fields.iter().enumerate() {
        if i > 0 {
            out.push(if json { ',' } else { ' ' });
        }
        let value: serde_json::Value = match field.as_str() {
            "time" => {
                let d = r.time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                serde_json::json!((d.as_secs_f64() * 1000.0).round() / 1000.0)
            }
            "client" => r.client.to_string().into(),
            "method" => r.method.clone().into(),
            "authority" => r.authority.clone().into(),
            "path" => r.path.clone().into(),
            "status" => r.status.into(),
            "bytes_in" => r.bytes_in.into(),
            "bytes_out" => r.bytes_out.into(),
            "route" => r.route.clone().into(),
            "upstream" => r.upstream.map(|a| a.to_string()).into(),
            "upstream_time" => r.upstream_time.map(|d| d.as_secs_f64()).into(),
            "total_time" => r.total_time.as_secs_f64().into(),
            "request_id" => r.request_id.clone().into(),
            _ => serde_json::Value::Null,
        };
        if json {
            let _ = write!(out, "{}:{}", serde_json::Value::from(field.as_str()), value);
        } else {
            let _ = write!(out, "{field}={value}");
        }
    }
    if json {
        out.push('}');
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_field_gives_its_allocation_back() {
        let mut path = format!("/{}", "é".repeat(10_000));
        cap(&mut path);
        assert!(path.len() <= MAX_FIELD && path.ends_with("..."));
        assert!(path.capacity() <= MAX_FIELD, "a capped path keeps {} bytes allocated", path.capacity());
    }

    fn record() -> Record {
        Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_500),
            client: "127.0.0.1:5000".parse().unwrap(),
            method: "GET".into(),
            authority: "a.example".into(),
            path: "/x \"y\"".into(),
            status: 200,
            bytes_in: 0,
            bytes_out: 12,
            route: "api".into(),
            upstream: Some("127.0.0.1:8081".parse().unwrap()),
            upstream_time: Some(Duration::from_millis(3)),
            total_time: Duration::from_millis(4),
            request_id: "abc".into(),
        }
    }

    #[test]
    fn json_lines_are_valid_json_with_the_configured_fields() {
        let mut s = Settings::default();
        let mut line = String::new();
        format_record(&record(), &s, &mut line);
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["status"], 200);
        assert_eq!(v["path"], "/x \"y\"");
        assert_eq!(v["time"], 1.5);
        assert_eq!(v["upstream"], "127.0.0.1:8081");
        s.fields = vec!["method".into(), "status".into()];
        s.format = AccessLogFormat::Text;
        line.clear();
        format_record(&record(), &s, &mut line);
        assert_eq!(line, "method=\"GET\" status=200\n");
    }
}
