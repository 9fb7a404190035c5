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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    spooky::tools::backend::serve(spooky::tools::backend::Options {
        listen: cli.listen,
        threads: cli.threads,
        name: cli.name,
    })
}
