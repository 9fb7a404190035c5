//! Samples another process (the proxy under test) from /proc: CPU time (utime + stime of all
//! its threads, from /proc/PID/stat) and resident memory (VmRSS from /proc/PID/status).

use serde_json::{json, Value};
use std::io;

/// One reading.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub cpu_s: f64,
    pub rss_kib: u64,
}

pub fn sample(pid: u32) -> io::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> io::Result<u64> {
        fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(|| io::Error::other("malformed /proc/PID/stat"))
    };
    // utime is field 14 and stime field 15 overall: indexes 11 and 12 after the state field.
    let ticks_total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Sample { cpu_s: ticks_total as f64 / hz, rss_kib })
}

/// A watched process over one run.
#[derive(Debug)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    initial: Option<Sample>,
    start: Option<Sample>,
    end: Option<Sample>,
    peak_rss_kib: u64,
}

impl Watched {
    /// Parses `NAME=PID` and takes the initial reading (before any connection is opened).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, pid) = spec.split_once('=').ok_or_else(|| format!("--watch {spec}: expected NAME=PID"))?;
        let pid: u32 = pid.parse().map_err(|_| format!("--watch {spec}: bad PID"))?;
        let initial = sample(pid).map_err(|e| format!("--watch {spec}: {e}"))?;
        Ok(Watched {
            name: name.to_string(),
            pid,
            initial: Some(initial),
            start: None,
            end: None,
            peak_rss_kib: initial.rss_kib,
        })
    }

    /// Marks the start of the measured window.
    pub fn start(&mut self) {
        self.start = sample(self.pid).ok();
        self.poll();
    }

    /// Tracks peak RSS; call periodically.
    pub fn poll(&mut self) {
        if let Ok(s) = sample(self.pid) {
            self.peak_rss_kib = self.peak_rss_kib.max(s.rss_kib);
        }
    }

    /// Marks the end of the measured window.
    pub fn end(&mut self) {
        self.end = sample(self.pid).ok();
        self.poll();
    }

    pub fn to_json(&self) -> Value {
        let rss = |s: &Option<Sample>| s.map(|s| s.rss_kib);
        let cpu_s = match (self.start, self.end) {
            (Some(a), Some(b)) => Some(b.cpu_s - a.cpu_s),
            _ => None,
        };
        json!({
            "pid": self.pid,
            "cpu_s": cpu_s,
            "rss_initial_kib": rss(&self.initial),
            "rss_start_kib": rss(&self.start),
            "rss_end_kib": rss(&self.end),
            "rss_peak_kib": self.peak_rss_kib,
        })
    }
}
