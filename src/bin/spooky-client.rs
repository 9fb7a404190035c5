//! `spooky-client`: a small HTTP/3 client, like `curl --http3`. See `spooky::tools::h3client`.
//!
//! ```text
//! spooky-client -k https://localhost:8443/bytes/100
//! spooky-client -k -X POST -d 'hello' https://localhost:8443/echo
//! ```

use bytes::Bytes;
use clap::Parser;
use spooky::tools::h3client::{Body, Client, Options, Request};
use std::io::Write;
use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "spooky-client", about = "Minimal HTTP/3 client: prints status, headers and body")]
struct Cli {
    /// https://host[:port]/path
    url: String,
    /// Request method (default GET, or POST with a body).
    #[arg(short = 'X', long)]
    request: Option<String>,
    /// Extra header, `name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request body text.
    #[arg(short, long, conflicts_with_all = ["data_file", "upload_pattern"])]
    data: Option<String>,
    /// Request body from a file.
    #[arg(long)]
    data_file: Option<std::path::PathBuf>,
    /// Upload N bytes of the test pattern.
    #[arg(long)]
    upload_pattern: Option<u64>,
    /// Skip certificate verification (for self-signed certificates).
    #[arg(short = 'k', long)]
    insecure: bool,
    /// CA file to verify the server against.
    #[arg(long)]
    cacert: Option<String>,
    /// Connect to this address instead of resolving the URL's host.
    #[arg(long)]
    connect_to: Option<String>,
    /// Print only a summary line with the body's length and SHA-256, not the body.
    #[arg(short, long)]
    summary: bool,
    /// Send the request N times concurrently on one connection.
    #[arg(short = 'n', long, default_value_t = 1)]
    count: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    max_time: u64,
    /// Resume the TLS session saved in this file (by `--session-out`).
    #[arg(long)]
    session_in: Option<std::path::PathBuf>,
    /// Save the connection's TLS session to this file, to resume later.
    #[arg(long)]
    session_out: Option<std::path::PathBuf>,
    /// With `--session-in`: send the request(s) as 0-RTT early data when the session allows.
    #[arg(long, requires = "session_in")]
    early_data: bool,
    /// Send no SNI (the server answers with its default certificate).
    #[arg(long)]
    no_sni: bool,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spooky-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let uri: http::Uri = cli.url.parse()?;
    anyhow::ensure!(uri.scheme_str() == Some("https"), "the URL must start with https://");
    let host = uri.host().ok_or_else(|| anyhow::anyhow!("the URL has no host"))?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    let target = cli.connect_to.clone().unwrap_or_else(|| format!("{host}:{port}"));
    let addr = target.to_socket_addrs()?.next().ok_or_else(|| anyhow::anyhow!("{target} resolves to nothing"))?;
    let body = if let Some(d) = cli.data {
        Body::Bytes(Bytes::from(d))
    } else if let Some(f) = &cli.data_file {
        Body::Bytes(Bytes::from(std::fs::read(f)?))
    } else if let Some(n) = cli.upload_pattern {
        Body::Pattern(n)
    } else {
        Body::Empty
    };
    let method = cli.request.unwrap_or_else(|| if matches!(body, Body::Empty) { "GET" } else { "POST" }.into());
    let mut req = Request {
        method,
        path: uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into()),
        authority: Some(uri.authority().map(|a| a.as_str().to_string()).unwrap_or(host.clone())),
        body,
        ..Request::get("/")
    };
    for h in &cli.headers {
        let (n, v) = h.split_once(':').ok_or_else(|| anyhow::anyhow!("header `{h}` is not `name: value`"))?;
        req.headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let opts = Options {
        server_name: host,
        verify: !cli.insecure,
        ca_file: cli.cacert,
        timeout: Duration::from_secs(cli.max_time),
        keep_body: if cli.summary { 0 } else { usize::MAX },
        sni: !cli.no_sni,
        session: cli.session_in.as_ref().map(std::fs::read).transpose()?,
    };
    let started = std::time::Instant::now();
    let (mut client, responses) = if cli.early_data {
        Client::connect_early(addr, opts, vec![req; cli.count])?
    } else {
        let mut client = Client::connect(addr, opts)?;
        let responses = client.run(vec![req; cli.count])?;
        (client, responses)
    };
    let elapsed = started.elapsed();
    if cli.session_in.is_some() {
        eprintln!("resumed: {}, early data: {:?}", client.is_resumed(), client.early_data());
    }
    if let Some(path) = &cli.session_out {
        std::fs::write(path, client.wait_session()?)?;
    }
    client.close();
    let mut out = std::io::stdout().lock();
    let mut ok = true;
    for r in &responses {
        if let Some(code) = r.reset {
            writeln!(out, "stream reset by server: H3 error 0x{code:x}")?;
            ok = false;
            continue;
        }
        if cli.summary {
            writeln!(out, "{} {} bytes sha256={}", r.status, r.body_len, r.sha256)?;
            continue;
        }
        writeln!(out, "HTTP/3 {}", r.status)?;
        for (n, v) in &r.headers {
            writeln!(out, "{n}: {v}")?;
        }
        writeln!(out)?;
        out.write_all(&r.body)?;
        for (n, v) in &r.trailers {
            writeln!(out, "{n}: {v} (trailer)")?;
        }
    }
    if cli.count > 1 {
        eprintln!("{} responses in {:.3}s", responses.len(), elapsed.as_secs_f64());
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
