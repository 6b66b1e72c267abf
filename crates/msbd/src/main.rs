//! The `msbd` binary: the command line, configuration and process lifecycle.
//!
//! This crate sits on top of every other crate and will own the `MSB_*`
//! configuration (read from the environment into one typed struct), tracing, the
//! stdio and HTTP transports, and signal handling with a graceful shutdown. It is the
//! only crate that reads the environment, parses flags or installs signal handlers.
//!
//! For now only `--help` and `--version` work; every subcommand reports that it is
//! not yet implemented and exits with status 2.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status of a subcommand that this build does not implement yet.
const NOT_IMPLEMENTED_EXIT_CODE: u8 = 2;

/// Durable, supervised background tasks in sandboxes, for MCP clients.
#[derive(Debug, Parser)]
#[command(name = "msbd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve MCP clients (over stdio or HTTP).
    Serve,
    /// Print the effective configuration, with where each value came from.
    Config,
    /// Check sandbox isolation and the task store.
    Doctor,
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Serve => "serve",
            Command::Config => "config",
            Command::Doctor => "doctor",
        }
    }
}

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    run(cli.command)
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve | Command::Config | Command::Doctor => {
            eprintln!(
                "msbd {}: not yet implemented in this build: see issue #4",
                command.name()
            );
            Ok(ExitCode::from(NOT_IMPLEMENTED_EXIT_CODE))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
