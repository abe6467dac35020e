//! `sandq`: parse the command line, start logging, run the subcommand, map
//! failures to exit codes (2 configuration, 3 sandbox, 4 Redis, 1 other).

use clap::Parser;
use sandq::cli;
use sandq::config::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = Cli::parse();
    if matches!(args.command, Command::Doctor(_) | Command::Profile(_)) {
        // Report commands: `sandq doctor | head` should end quietly, as
        // other Unix tools do, not panic on a closed stdout. (Everything that
        // talks to sockets keeps SIGPIPE ignored and sees EPIPE instead.)
        // SAFETY: restoring a default disposition, before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SANDQ_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let result = match args.command {
        Command::Worker(a) => cli::worker(a).map(|_| ExitCode::SUCCESS),
        Command::Run(a) => cli::run(a, false),
        Command::Profile(a) => cli::run(a, true),
        Command::Submit(a) => cli::submit(a),
        Command::Gateway(a) => cli::gateway(a).map(|_| ExitCode::SUCCESS),
        Command::Doctor(a) => Ok(cli::doctor(a)),
        Command::Bench(a) => cli::bench(a).map(|_| ExitCode::SUCCESS),
        Command::Healthcheck { url } => Ok(cli::healthcheck(&url)),
    };
    result.unwrap_or_else(|e| {
        tracing::error!("{e}");
        eprintln!("sandq: {e}");
        ExitCode::from(e.exit_code())
    })
}
