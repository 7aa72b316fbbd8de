//! The `paystream` binary: the command line, configuration and tracing. Concrete stores,
//! chains and signers are chosen here; `anyhow` is used only at this edge.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// PayStream: off-chain state-channel payment streaming.
#[derive(Debug, Parser)]
#[command(name = "paystream", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hash, sign and verify channel states (a debugging aid for integrators).
    #[command(subcommand)]
    State(cmd::state::StateCommand),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::State(command) => cmd::state::run(command),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
