//! `spooky`: run the proxy, or check a configuration file.

use clap::{Parser, Subcommand};
use spooky::control::snapshot::{Snapshot, Source};
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "spooky", version, about = "HTTP/3 edge proxy: QUIC in, pooled HTTP/2 out")]
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
    let (source, run) = match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config: Some(path) } => (Source::File(path), true),
        Command::Run { config: None } => (Source::Embedded, true),
        Command::Check { config } => (Source::File(config), false),
    };
    // The whole file, certificate and key included, is checked before anything starts.
    let snapshot = match Snapshot::load(&source, 1) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("spooky: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if !run {
        println!("spooky: configuration {} is valid", source.describe());
        return ExitCode::SUCCESS;
    }
    spooky::telemetry::init_logging(&snapshot.config.log.level);
    match spooky::control::run(snapshot) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spooky: {e:#}");
            ExitCode::FAILURE
        }
    }
}
