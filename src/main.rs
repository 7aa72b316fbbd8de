//! The `paystream` binary: the command line, configuration and tracing. Concrete stores,
//! chains and signers are chosen here; `anyhow` is used only at this edge.

mod cmd;

/// mimalloc, not the system's malloc: a server holding thousands of sessions allocates and frees
/// small objects from every thread, where glibc's malloc spent 15% of the server's time under
/// load (its locks and consolidation) and kept freed memory resident.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use std::io::IsTerminal;
use std::process::ExitCode;

/// `json` for JSON log lines (one object a line); anything else, or unset, for text.
const LOG_FORMAT_ENV: &str = "PAYSTREAM_LOG_FORMAT";

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
    /// Deploy the PaymentChannels contract (key in $PAYSTREAM_DEPLOYER_KEY); prints its address
    /// and chain id as JSON.
    Deploy(cmd::deploy::DeployArgs),
    /// Serve paid streams (configuration in a TOML file, payee key in $PAYSTREAM_PAYEE_KEY
    /// unless a separate settler holds it).
    Serve(cmd::serve::ServeArgs),
    /// Settle queued claims on-chain as its own process (key in $PAYSTREAM_SETTLER_KEY or
    /// $PAYSTREAM_PAYEE_KEY); `--once` for one pass, `status` for what is pending.
    Settle(cmd::settle::SettleArgs),
    /// Pay for a stream (key in $PAYSTREAM_PAYER_KEY, budget policy from flags).
    Pay(Box<cmd::pay::PayArgs>),
    /// Everything in one process on embedded defaults: a paid stream, its cost, its settlement.
    Demo,
    /// Load a server on this machine with N concurrent paid sessions for a bounded time; prints
    /// setups/s, messages and vouchers/s, voucher round trips, errors and server memory as JSON.
    Load(Box<cmd::load::LoadArgs>),
    /// Measure this machine: `bench signatures` answers how many voucher signatures per second
    /// the engine verifies.
    #[command(subcommand)]
    Bench(cmd::bench::BenchCommand),
}

/// The tokio runtime for the commands that do I/O.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Turns transparent huge pages off for this process. mimalloc asks the kernel for them on its
/// arenas, and then every 2 MiB of heap the process touches is resident whole: an idle server
/// held 35 MiB instead of 18, its first ten sessions cost it 11.8 MiB instead of 1.8, and its
/// memory moved by 2 MiB steps from run to run (docs/SERVER.md, "Memory of an idle session").
/// A server of many small sessions gains nothing from them. Pages faulted in before `main` (the
/// first 2 MiB at most) stay as they are.
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        let (on, unused): (libc::c_ulong, libc::c_ulong) = (1, 0);
        // SAFETY: `prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)`, its arguments passed at the width the
        // kernel reads them (`unsigned long`), reads only those integers and sets a flag of this
        // process. A kernel that refuses it leaves the pages as they were, which is only the
        // memory figures' concern, so its result is not looked at.
        unsafe {
            libc::prctl(libc::PR_SET_THP_DISABLE, on, unused, unused, unused);
        }
    }
}

fn main() -> ExitCode {
    without_huge_pages();
    let cli = Cli::parse();
    // The server logs at info; the interactive commands only warn unless RUST_LOG says otherwise.
    let default_level = match cli.command {
        Command::Serve(_) | Command::Deploy(_) | Command::Settle(_) => "info",
        _ => "warn",
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr);
    // JSON lines on request (a log pipeline); otherwise text, coloured only on a terminal (a
    // file or a pipe gets no escape codes).
    if std::env::var(LOG_FORMAT_ENV).is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        logs.json().init();
    } else {
        logs.with_ansi(std::io::stderr().is_terminal()).init();
    }
    let result = match cli.command {
        Command::State(command) => cmd::state::run(command),
        Command::Bench(command) => cmd::bench::run(command).map(|()| ExitCode::SUCCESS),
        Command::Pay(args) => runtime()
            .and_then(|rt| rt.block_on(cmd::pay::run(*args)))
            .map(|()| ExitCode::SUCCESS),
        Command::Demo => runtime()
            .and_then(|rt| rt.block_on(cmd::demo::run()))
            .map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => runtime()
            .and_then(|rt| rt.block_on(cmd::serve::run(args)))
            .map(|()| ExitCode::SUCCESS),
        Command::Settle(args) => runtime()
            .and_then(|rt| rt.block_on(cmd::settle::run(args)))
            .map(|()| ExitCode::SUCCESS),
        Command::Deploy(args) => runtime()
            .and_then(|rt| rt.block_on(cmd::deploy::run(args)))
            .map(|()| ExitCode::SUCCESS),
        Command::Load(args) => runtime()
            .and_then(|rt| rt.block_on(cmd::load::run(*args)))
            .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
