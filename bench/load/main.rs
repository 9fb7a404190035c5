//! `spooky-load`: HTTP/3 load generator (quiche), with an HTTP/2 cleartext mode for the direct
//! baseline. N threads, each with its own event loop over its connections; closed loop (fixed
//! concurrency) or open loop (`--rate`, latency from the intended start); HDR latency
//! percentiles, status counts, errors, a progress line each second, `--json` on stdout.
//! `--watch NAME=PID` samples other processes (the proxy) over the measured window.
//! See bench/README.md.

mod h2run;
mod h3conn;
mod h3run;
mod pacer;
mod plan;
mod poller;
mod stats;
mod watch;

use clap::Parser;
use plan::{Mode, Plan, RequestSpec};
use stats::{Progress, Stats};
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use watch::Watched;

#[derive(Parser, Debug)]
#[command(name = "spooky-load", about = "HTTP/3 (and h2c) load generator")]
struct Args {
    /// Target address (UDP for HTTP/3, TCP for --h2c).
    addr: SocketAddr,
    /// Speak HTTP/2 cleartext (prior knowledge) instead of HTTP/3.
    #[arg(long)]
    h2c: bool,
    /// Threads, each with its own connections and event loop.
    #[arg(short, long, default_value_t = 1)]
    threads: usize,
    /// Connections (in total, split over threads).
    #[arg(short, long, default_value_t = 1)]
    connections: usize,
    /// Concurrent streams per connection.
    #[arg(short, long, default_value_t = 1)]
    streams: usize,
    /// Open loop at this many requests per second in total (default: closed loop).
    #[arg(short, long)]
    rate: Option<f64>,
    /// Length of the measured window, e.g. `10s` (default 10s unless --requests is given).
    #[arg(short, long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many requests (in total).
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// Request path.
    #[arg(long, default_value = "/bytes/64")]
    path: String,
    /// Request body size in bytes (sent as POST unless --method says otherwise).
    #[arg(long, default_value_t = 0)]
    body: u64,
    #[arg(long)]
    method: Option<String>,
    /// TLS server name and :authority.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Open a new connection for every request (handshake rate); -c of them at once.
    #[arg(long, conflicts_with = "idle")]
    new_conn: bool,
    /// Open -c connections, one request each, then hold them idle for --duration.
    #[arg(long)]
    idle: bool,
    /// Handshakes in flight at once while opening idle connections (per thread).
    #[arg(long, default_value_t = 64)]
    handshake_window: usize,
    /// Sample a process over the measured window: CPU time and RSS (repeatable).
    #[arg(long, value_name = "NAME=PID")]
    watch: Vec<String>,
    /// Free-form label copied into the JSON output.
    #[arg(long, default_value = "")]
    label: String,
    /// Hard bound on the whole run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    timeout: Duration,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(failed) => std::process::exit(if failed { 1 } else { 0 }),
        Err(e) => {
            eprintln!("spooky-load: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Runs the load; returns true if no request succeeded.
fn run(args: &Args) -> anyhow::Result<bool> {
    let mut watched =
        args.watch.iter().map(|w| Watched::parse(w)).collect::<Result<Vec<_>, _>>().map_err(anyhow::Error::msg)?;
    let mode = if args.new_conn {
        Mode::NewConn
    } else if args.idle {
        Mode::Idle
    } else {
        Mode::Load
    };
    let threads = args.threads.max(1).min(args.connections.max(1));
    let duration = match (args.duration, args.requests) {
        (None, None) => Some(Duration::from_secs(10)),
        (d, _) => d,
    };
    let method = args.method.clone().unwrap_or_else(|| if args.body > 0 { "POST" } else { "GET" }.to_string());
    let deadline = Instant::now() + args.timeout;
    let plans: Vec<Plan> = (0..threads)
        .map(|i| Plan {
            peer: args.addr,
            mode,
            connections: share(args.connections as u64, threads, i) as usize,
            streams: args.streams.max(1),
            rate: args.rate.map(|r| r / threads as f64),
            quota: args.requests.map(|n| share(n, threads, i)),
            duration,
            deadline,
            request: RequestSpec {
                method: method.clone(),
                authority: args.server_name.clone(),
                path: args.path.clone(),
                body: args.body,
            },
            handshake_window: args.handshake_window.max(1),
        })
        .collect();
    let progress = Arc::new(Progress::default());
    let barrier = Arc::new(Barrier::new(threads + 1));
    let h2c = args.h2c;
    let handles: Vec<_> = plans
        .into_iter()
        .map(|plan| {
            let (progress, barrier) = (progress.clone(), barrier.clone());
            std::thread::spawn(move || {
                if h2c {
                    h2run::run(&plan, &progress, &barrier)
                } else {
                    h3run::run(&plan, &progress, &barrier)
                }
            })
        })
        .collect();
    eprintln!(
        "spooky-load: {} {} {}: {threads} thread(s), {} conn(s) x {} stream(s){}",
        if h2c { "h2c" } else { "h3" },
        mode.name(),
        args.addr,
        args.connections,
        args.streams,
        args.rate.map(|r| format!(", open loop {r} req/s")).unwrap_or_default()
    );
    barrier.wait();
    let start = Instant::now();
    for w in &mut watched {
        w.start();
    }
    progress_loop(&handles, &progress, start, &mut watched);
    for w in &mut watched {
        w.end();
    }
    let mut total = Stats::default();
    let mut thread_errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(s)) => total.merge(s),
            Ok(Err(e)) => thread_errors.push(format!("{e:#}")),
            Err(_) => thread_errors.push("thread panicked".into()),
        }
    }
    let mut out = total.to_json();
    out["label"] = args.label.clone().into();
    out["mode"] = mode.name().into();
    out["protocol"] = if h2c { "h2c" } else { "h3" }.into();
    out["threads"] = threads.into();
    out["streams"] = args.streams.into();
    out["rate"] = args.rate.into();
    out["path"] = args.path.clone().into();
    out["body"] = args.body.into();
    out["thread_errors"] = thread_errors.clone().into();
    out["processes"] = watched.iter().map(|w| (w.name.clone(), w.to_json())).collect::<serde_json::Map<_, _>>().into();
    eprintln!("{}", summary(&total));
    if args.json {
        println!("{out}");
    }
    Ok(!thread_errors.is_empty() || (total.responses == 0 && mode != Mode::Idle))
}

/// Thread `i`'s share of `n` split over `threads`.
fn share(n: u64, threads: usize, i: usize) -> u64 {
    n / threads as u64 + u64::from((i as u64) < n % threads as u64)
}

/// Prints a progress line each second until every thread is done.
fn progress_loop(
    handles: &[std::thread::JoinHandle<anyhow::Result<Stats>>],
    progress: &Progress,
    start: Instant,
    watched: &mut [Watched],
) {
    let mut last = 0;
    let mut next = start + Duration::from_secs(1);
    while !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        if Instant::now() < next {
            continue;
        }
        next += Duration::from_secs(1);
        for w in watched.iter_mut() {
            w.poll();
        }
        let done = Progress::get(&progress.requests);
        eprintln!(
            "[{:5.1}s] {done} responses (+{}/s), {} errors, {} handshakes, {:.1} MiB",
            start.elapsed().as_secs_f64(),
            done - last,
            Progress::get(&progress.errors),
            Progress::get(&progress.handshakes),
            Progress::get(&progress.bytes) as f64 / (1u64 << 20) as f64
        );
        last = done;
    }
}

fn summary(s: &Stats) -> String {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    let h = &s.latency;
    let q = |v: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(v)
        }
    };
    format!(
        "{} responses in {:.2}s = {:.0} req/s, {:.1} MiB/s, {} errors {:?}, status {:?}, {} handshakes\n\
         latency µs: p50 {} p90 {} p99 {} p99.9 {} max {}",
        s.responses,
        secs,
        s.responses as f64 / secs,
        (s.bytes_down + s.bytes_up) as f64 / secs / (1u64 << 20) as f64,
        s.error_count(),
        s.errors,
        s.status,
        s.handshakes,
        q(0.5),
        q(0.9),
        q(0.99),
        q(0.999),
        if h.is_empty() { 0 } else { h.max() },
    )
}
