//! `spooky-backend`: the HTTP/2 (h2c) demo and test backend. See `spooky::tools::backend`.

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "spooky-backend",
    about = "HTTP/2 cleartext test backend: /bytes/N, /echo, /sink, /headers, /status/N, /trailers, /reset-after/N"
)]
struct Cli {
    /// Address to listen on.
    #[arg(short, long, default_value = "127.0.0.1:8081")]
    listen: std::net::SocketAddr,
    /// Threads (each with its own runtime and accept queue).
    #[arg(short, long, default_value_t = 1)]
    threads: usize,
    /// Name reported in `x-backend`.
    #[arg(short, long, default_value = "demo")]
    name: String,
    /// Answer every request (but /peek/) with this status: a broken backend for tests.
    #[arg(long)]
    fail_status: Option<u16>,
    /// Delay every response head by this many milliseconds: a slow backend for tests.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// SETTINGS_MAX_CONCURRENT_STREAMS to advertise.
    #[arg(long, default_value_t = 1000)]
    max_streams: u32,
    /// Serve HTTP/2 over TLS with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    spooky::tools::backend::serve(spooky::tools::backend::Options {
        listen: cli.listen,
        threads: cli.threads,
        name: cli.name,
        fail_status: cli.fail_status,
        delay: std::time::Duration::from_millis(cli.delay_ms),
        max_streams: cli.max_streams,
        tls: cli.tls_cert.zip(cli.tls_key),
    })
}
