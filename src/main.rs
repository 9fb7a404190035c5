//! `spooky`: run the proxy, or check a configuration file.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "spooky",
    version,
    about = "HTTP/3 edge proxy: QUIC in, pooled HTTP/2 out"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the embedded default config when --config is omitted).
    Run {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and exit (0: valid, 2: invalid), like `nginx -t`.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, run) = match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config } => (config, true),
        Command::Check { config } => (Some(config), false),
    };
    let loaded = match &path {
        Some(p) => spooky::config::load(p),
        None => spooky::config::parse(
            spooky::config::DEFAULT_CONFIG_YAML,
            "<embedded default>",
            ".".as_ref(),
        ),
    };
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spooky: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if !run {
        // Like `nginx -t`, also load the certificate and key, not just their paths.
        if let Err(e) = spooky::edge::tls::TlsMaterial::load(&config) {
            eprintln!(
                "spooky: invalid configuration: {}: {e:#}",
                path.as_ref().expect("check has a path").display()
            );
            return ExitCode::from(2);
        }
        println!(
            "spooky: configuration {} is valid",
            path.expect("check has a path").display()
        );
        return ExitCode::SUCCESS;
    }
    spooky::telemetry::init_logging(&config.log.level);
    match spooky::control::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spooky: {e:#}");
            ExitCode::FAILURE
        }
    }
}
