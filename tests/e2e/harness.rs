//! Starts real processes for end-to-end tests: the project's HTTP/2 backend and Spooky itself,
//! on OS-chosen loopback ports, and tears them down on drop.

use spooky::tools::h3client::{Client, Options};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The start of every test configuration: OS-chosen port, two workers (so requests really
/// cross the thread-per-core design), a self-signed certificate.
pub const PREAMBLE: &str = "listen: 127.0.0.1:0\nworkers: 2\ntls: { self_signed: [localhost] }\n";

/// A child process killed on drop, whose stderr is kept in a file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the log has (or gets, within 5 s: it is copied by a thread) a line with `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        (0..50).any(|_| {
            let found = self.log_text().contains(needle);
            if !found {
                std::thread::sleep(Duration::from_millis(100));
            }
            found
        })
    }
}

/// Spawns `cmd`, copies its stderr to `log`, and waits for a line containing `marker`;
/// returns the process and that line.
fn spawn_until(mut cmd: Command, log: PathBuf, marker: &'static str) -> (Proc, String) {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let log_path = log.clone();
    std::thread::spawn(move || {
        let mut file = std::fs::File::create(&log_path).expect("log file");
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            use std::io::Write;
            let _ = writeln!(file, "{line}");
            if !sent && line.contains(marker) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    let proc = Proc { child, log };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => (proc, line),
        Err(_) => panic!("process did not log `{marker}` in 30 s; log:\n{}", proc.log_text()),
    }
}

fn temp_dir() -> &'static std::path::Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir")).path()
}

fn unique(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    temp_dir().join(format!("{name}-{n}"))
}

/// The project's HTTP/2 test backend.
pub struct Backend {
    pub addr: SocketAddr,
    /// Stopped when dropped.
    proc: Proc,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Backend::start_with(name, "127.0.0.1:0", &[])
    }

    /// Sends a signal to the backend process (SIGSTOP makes it unresponsive).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.proc.pid() as i32, sig) }, 0);
    }

    /// A backend on `listen` with extra flags (`--fail-status 503`, `--delay-ms 200`).
    pub fn start_with(name: &str, listen: &str, flags: &[&str]) -> Backend {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spooky-backend"));
        cmd.args(["-l", listen, "-n", name]).args(flags);
        let (proc, line) = spawn_until(cmd, unique("backend.log"), "listening on");
        let addr = line.split("listening on ").nth(1).and_then(|s| s.split(' ').next()).expect("address");
        Backend { addr: addr.parse().expect("backend address"), proc }
    }
}

/// A running Spooky.
pub struct Spooky {
    pub addr: SocketAddr,
    /// The admin listener (tests run it on an OS-chosen port).
    pub admin: SocketAddr,
    pub config: PathBuf,
    pub proc: Proc,
}

impl Spooky {
    /// Starts Spooky with `yaml` (which should listen on `127.0.0.1:0`). Unless `yaml` sets
    /// `admin`, the admin listener gets an OS-chosen port too.
    pub fn start(yaml: &str) -> Spooky {
        Spooky::start_with_env(yaml, &[])
    }

    /// Like [`Spooky::start`], with extra environment variables (e.g. fault injection).
    pub fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Spooky {
        let config = unique("spooky.yaml");
        let yaml = if yaml.contains("\nadmin:") {
            yaml.to_string()
        } else {
            format!("{yaml}\nadmin: {{ listen: 127.0.0.1:0 }}\n")
        };
        std::fs::write(&config, yaml).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_spooky"));
        // SPOOKY_TEST_LOG raises the log level when debugging a test.
        let level = std::env::var("SPOOKY_TEST_LOG").unwrap_or_else(|_| "info".into());
        cmd.arg("run").arg("--config").arg(&config).env("RUST_LOG", level).envs(env.iter().copied());
        let (proc, line) = spawn_until(cmd, unique("spooky.log"), "spooky ready");
        let field = |name: &str| {
            line.split(&format!("{name}=")).nth(1).and_then(|s| s.split([',', ' ']).next()).unwrap_or("").to_string()
        };
        let addr = field("listen").parse().expect("listen address");
        let admin = field("admin").parse().unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        Spooky { addr, admin, config, proc }
    }

    /// Spooky with two workers in front of `backends` (one pool `main`, weights given).
    pub fn in_front_of(backends: &[(&Backend, u32)], extra: &str) -> Spooky {
        let list: String =
            backends.iter().map(|(b, w)| format!("      - address: {}\n        weight: {w}\n", b.addr)).collect();
        Spooky::start(&format!(
            "listen: 127.0.0.1:0\nworkers: 2\ntls:\n  self_signed: [localhost]\n{extra}\nupstreams:\n  main:\n    backends:\n{list}routes:\n  - upstream: main\n"
        ))
    }

    pub fn client(&self) -> Client {
        self.client_with(Options::default())
    }

    pub fn client_with(&self, opts: Options) -> Client {
        Client::connect(self.addr, opts).unwrap_or_else(|e| panic!("connect: {e}; log:\n{}", self.proc.log_text()))
    }

    /// Resident set size now and its peak so far, in bytes, from /proc.
    pub fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).expect("proc status");
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .expect("field")
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// A loopback TCP port with nothing listening on it.
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

impl Spooky {
    /// An HTTP/1.1 request to the admin listener: (status, body).
    pub fn admin_request(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin).expect("admin listener");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nhost: {}\r\n{auth}content-length: 0\r\nconnection: close\r\n\r\n",
            self.admin
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).expect("admin response");
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("status line");
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        (status, body)
    }

    /// `POST /reload` (answered 202 at once), then the reload's outcome from `/config` once it
    /// is no longer pending (within 30 s): `{"state", "version", "error"}`.
    pub fn admin_reload(&self, token: &str) -> serde_json::Value {
        let (status, body) = self.admin_request("POST", "/reload", Some(token));
        assert_eq!(status, 202, "{body}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, config) = self.admin_get("/config");
            let v: serde_json::Value = serde_json::from_str(&config).expect("/config is JSON");
            if v["last_reload"]["state"] != "pending" {
                return v["last_reload"].clone();
            }
            assert!(std::time::Instant::now() < deadline, "the reload is still pending: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to 10 s) until `/config` reports the hash of configuration `text`; its JSON.
    pub fn wait_for_config(&self, text: &str) -> serde_json::Value {
        use sha2::{Digest, Sha256};
        let want = hex::encode(&Sha256::digest(text.as_bytes())[..8]);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = self.admin_get("/config");
            let v: serde_json::Value = serde_json::from_str(&body).expect("/config is JSON");
            if v["hash"] == want.as_str() {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "reload to {want} not seen; /config says {body}\n{}",
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn admin_get(&self, path: &str) -> (u16, String) {
        self.admin_request("GET", path, None)
    }

    /// Scrapes `/metrics` and parses it with a Prometheus text parser.
    pub fn metrics(&self) -> prometheus_parse::Scrape {
        let (status, body) = self.admin_get("/metrics");
        assert_eq!(status, 200);
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid exposition")
    }

    /// Sends a signal to the Spooky process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.proc.pid() as i32, sig) }, 0);
    }

    /// Inodes of the UDP sockets bound to Spooky's port (to prove nothing was rebound).
    pub fn udp_socket_inodes(&self) -> Vec<u64> {
        let mut inodes = self.udp_socket_column(9);
        inodes.sort();
        inodes
    }

    /// Datagrams the kernel dropped on Spooky's sockets (receive buffer full), in total.
    pub fn udp_drops(&self) -> u64 {
        self.udp_socket_column(12).iter().sum()
    }

    /// One numeric column of /proc/net/udp for the sockets bound to Spooky's port.
    fn udp_socket_column(&self, column: usize) -> Vec<u64> {
        let port = format!(":{:04X} ", self.addr.port());
        let table = std::fs::read_to_string("/proc/net/udp").unwrap();
        table
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().nth(1).is_some_and(|local| format!("{local} ").ends_with(&port)))
            .filter_map(|l| l.split_whitespace().nth(column).and_then(|i| i.parse().ok()))
            .collect()
    }
}

/// Sums a counter or gauge over the series whose labels include all of `labels`.
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

// ---- Helpers for the abuse and fault tests (tests/e2e/abuse.rs, tests/e2e/faults.rs). ----

impl Backend {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

/// How much bigger than the fast variant a scenario runs: `SPOOKY_SOAK_SCALE` (1 to 100;
/// 1 in the normal suite, larger from `scripts/soak`).
pub fn soak_scale() -> u64 {
    std::env::var("SPOOKY_SOAK_SCALE").ok().and_then(|v| v.parse().ok()).unwrap_or(1).clamp(1, 100)
}

/// One line of numbers a scenario measured, printed for `scripts/soak` (and `--nocapture`).
pub fn summary(test: &str, numbers: &str) {
    println!("\nSUMMARY {test}: {numbers}");
}

impl Spooky {
    /// Polls `/metrics` until `name` (summed over `labels`) satisfies `ok`, for at most
    /// `limit`; returns the last value either way.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], limit: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let v = metric_sum(&self.metrics(), name, labels);
            if ok(v) || std::time::Instant::now() >= deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What a legitimate client saw while something else was going on.
#[derive(Debug, Default)]
pub struct LegitReport {
    pub requests: u64,
    pub ok: u64,
    /// The first few failures (status, reset, wrong hash, client error), for the message.
    pub failures: Vec<String>,
}

/// A legitimate client in a background thread: on one connection, rounds of a download and
/// an upload (echo), each checked for status 200 and a byte-exact body (SHA-256 of the test
/// pattern), until stopped. At least `min_rounds` rounds run even if stopped earlier.
pub struct Legit {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<LegitReport>,
}

impl Legit {
    pub fn start(addr: SocketAddr, min_rounds: u64) -> Legit {
        use spooky::tools::h3client::{Body, Request};
        use spooky::tools::pattern;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut report = LegitReport::default();
            let mut client = match Client::connect(addr, Options::default()) {
                Ok(c) => c,
                Err(e) => {
                    report.requests = 1;
                    report.failures.push(format!("connect: {e}"));
                    return report;
                }
            };
            let (down, up) = (200_000u64, 100_000u64);
            let mut round = 0;
            while round < min_rounds || !flag.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                report.requests += 2;
                let reqs = vec![Request::get(&format!("/bytes/{down}")), Request::post("/echo", Body::Pattern(up))];
                match client.run(reqs) {
                    Ok(rs) => {
                        for (r, n) in rs.iter().zip([down, up]) {
                            if r.status == 200
                                && r.reset.is_none()
                                && r.body_len == n
                                && r.sha256 == pattern::sha256_hex(n)
                            {
                                report.ok += 1;
                            } else if report.failures.len() < 5 {
                                report.failures.push(format!(
                                    "round {round}: status {} reset {:?} len {} (want {n})",
                                    r.status, r.reset, r.body_len
                                ));
                            }
                        }
                    }
                    Err(e) => {
                        report.failures.push(format!("round {round}: {e}"));
                        return report;
                    }
                }
            }
            client.close();
            report
        });
        Legit { stop, handle }
    }

    /// Stops the client and asserts that every one of its requests succeeded byte-exact.
    pub fn finish(self) -> LegitReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let report = self.handle.join().expect("legit client thread");
        assert!(report.requests > 0);
        assert_eq!(report.ok, report.requests, "legit client failures: {:?}", report.failures);
        report
    }
}

/// A deterministic stream of pseudo-random bytes (xorshift64).
pub struct Noise(pub u64);

impl Noise {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}
