//! The command-line client of a running msbd: `msbd task …`, `msbd queue …`, `msbd sessions`
//! and `msbd health` (docs/cli.md).
//!
//! Each command opens an MCP session with msbd's HTTP endpoint (`/mcp`, through
//! [`mcp_tools::client`]), calls the tools it maps to and prints their answers: readable text
//! by default, the tools' structured answers with `--json`. The address and token come from
//! `--addr` / `--token` or the variables msbd itself reads, `MSB_HTTP_ADDR` and
//! `MSB_AUTH_TOKEN`. Colour only on a terminal and never with `NO_COLOR` set. The exit codes
//! are [`Exit`]'s, listed in every command's `--help` ([`EXIT_CODES`]).
//!
//! A module per command group: `task`, `queue`, `sessions`, `health`; `table`
//! lays out the tables.

mod health;
mod queue;
mod sessions;
mod table;
mod task;

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use mcp_tools::client::{ClientError, ToolClient};
use serde_json::Value;

use crate::config;

pub use health::HealthArgs;
pub use queue::QueueCommand;
pub use sessions::SessionsArgs;
pub use task::TaskCommand;

/// The variable that says where msbd listens (also `msbd serve`'s).
const ADDR_VARIABLE: &str = "MSB_HTTP_ADDR";
/// The variable that holds the bearer token (also `msbd serve`'s).
const TOKEN_VARIABLE: &str = "MSB_AUTH_TOKEN";
/// Where msbd listens when nothing says otherwise (`MSB_HTTP_ADDR`'s default).
const DEFAULT_ADDR: &str = "127.0.0.1:8765";

/// The exit codes, as every client command's `--help` shows them.
pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a task did not complete (failed, timed out or cancelled: `task wait`, `task submit --wait`);
     msbd is unhealthy (`health`)
  2  usage error: bad flags, or msbd refused the arguments (INVALID_ARGUMENT and the like)
  3  msbd is not reachable at the address, or it refused the token
  4  not found: no such task or session (or it is another token's)
  5  msbd refused the request otherwise (ILLEGAL_TRANSITION, SHUTTING_DOWN, OPERATION_FAILED…)
  6  `task wait --timeout` ran out before every task finished";

/// The commands that talk to a running msbd.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Submit, list, show, follow, wait for, cancel and retry tasks of a running msbd.
    #[command(after_help = EXIT_CODES)]
    Task(Box<TaskArgs>),
    /// The task queue of a running msbd: statistics, pause, resume.
    #[command(after_help = EXIT_CODES)]
    Queue(QueueArgs),
    /// List your live sandbox sessions on a running msbd.
    #[command(after_help = EXIT_CODES)]
    Sessions(SessionsArgs),
    /// Check the health of a running msbd.
    #[command(after_help = EXIT_CODES)]
    Health(HealthArgs),
}

/// `msbd task`: the connection flags and a task command.
#[derive(Debug, Args)]
pub struct TaskArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: TaskCommand,
}

/// `msbd queue`: the connection flags and a queue command.
#[derive(Debug, Args)]
pub struct QueueArgs {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: QueueCommand,
}

/// How to reach msbd, and how to print. Global: they may follow the subcommand.
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Where msbd serves HTTP: HOST:PORT or an http:// URL [default: MSB_HTTP_ADDR, else
    /// 127.0.0.1:8765].
    #[arg(long, global = true, value_name = "ADDR")]
    addr: Option<String>,
    /// The bearer token msbd was started with [default: MSB_AUTH_TOKEN]. Prefer the variable:
    /// a flag is visible to other users in the process list.
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Print the tools' structured answers as JSON, for scripts.
    #[arg(long, global = true)]
    json: bool,
}

/// What a client command ended with: its exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: done.
    Success = 0,
    /// 1: a task did not complete, or msbd is unhealthy.
    NotCompleted = 1,
    /// 2: a usage error (ours or msbd's refusal of the arguments).
    Usage = 2,
    /// 3: msbd is not reachable, or refused the token.
    Unreachable = 3,
    /// 4: the task or session was not found.
    NotFound = 4,
    /// 5: msbd refused the request for another reason.
    Refused = 5,
    /// 6: `--timeout` ran out.
    TimedOut = 6,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// Where msbd is, what to send it and how to print: what every command is given.
pub(crate) struct Context {
    /// The MCP endpoint, `http://HOST:PORT/mcp`.
    mcp_url: String,
    /// The endpoint without `/mcp` (for `/healthz`).
    base_url: String,
    /// The bearer token, if any.
    token: Option<String>,
    /// How to print.
    out: Output,
}

/// How to print.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Output {
    /// `--json`.
    json: bool,
    /// Colours on stdout.
    colour: bool,
    /// Whether stderr is a terminal (progress bars are drawn there).
    stderr_terminal: bool,
    /// The terminal's width, when stdout is one.
    width: Option<usize>,
}

impl Output {
    /// `text` in the colour of ANSI code `code` (such as `"32"` for green), when colours are on.
    fn paint(&self, text: &str, code: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    /// A task status, coloured by what it means.
    fn status(&self, status: &str) -> String {
        let code = match status {
            "completed" => "32",
            "failed" | "timeout" => "31",
            "running" => "36",
            "cancelled" | "paused" => "33",
            _ => return status.to_owned(),
        };
        self.paint(status, code)
    }
}

/// Runs a client command and answers its exit code.
pub fn run(command: ClientCommand) -> ExitCode {
    let environment = config::environment();
    let variable = |name: &str| {
        environment
            .iter()
            .find(|(key, value)| key == name && !value.is_empty())
            .map(|(_, value)| value.clone())
    };
    let connection = match &command {
        ClientCommand::Task(args) => &args.connection,
        ClientCommand::Queue(args) => &args.connection,
        ClientCommand::Sessions(args) => &args.connection,
        ClientCommand::Health(args) => &args.connection,
    };
    let addr = connection
        .addr
        .clone()
        .or_else(|| variable(ADDR_VARIABLE))
        .unwrap_or_else(|| DEFAULT_ADDR.to_owned());
    let (base_url, mcp_url) = match endpoint(&addr) {
        Ok(urls) => urls,
        Err(problem) => {
            eprintln!("msbd: {problem}");
            return Exit::Usage.into();
        }
    };
    let no_color = variable("NO_COLOR").is_some();
    let stdout_terminal = std::io::stdout().is_terminal();
    let out = Output {
        json: connection.json,
        colour: stdout_terminal && !no_color,
        stderr_terminal: std::io::stderr().is_terminal(),
        width: stdout_terminal
            .then(|| terminal_width(&environment))
            .flatten(),
    };
    let context = Context {
        mcp_url,
        base_url,
        token: connection
            .token
            .clone()
            .or_else(|| variable(TOKEN_VARIABLE)),
        out,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("msbd: cannot start the async runtime: {error}");
            return Exit::Refused.into();
        }
    };
    let exit = runtime.block_on(async {
        match command {
            ClientCommand::Task(args) => task::run(&context, args.command).await,
            ClientCommand::Queue(args) => queue::run(&context, args.command).await,
            ClientCommand::Sessions(args) => sessions::run(&context, &args).await,
            ClientCommand::Health(_) => health::run(&context).await,
        }
    });
    let _ = std::io::stdout().flush();
    exit.into()
}

/// The width of the terminal on stdout: `COLUMNS` when set (as shells and `watch` set it),
/// else what the terminal says.
fn terminal_width(environment: &[(String, String)]) -> Option<usize> {
    environment
        .iter()
        .find(|(key, _)| key == "COLUMNS")
        .and_then(|(_, value)| value.parse::<usize>().ok())
        .filter(|width| *width > 0)
        .or_else(|| {
            console::Term::stdout()
                .size_checked()
                .map(|(_, columns)| usize::from(columns))
        })
}

/// The base URL and the MCP endpoint of `addr` (HOST:PORT, or an `http://` URL with or without
/// `/mcp`). An unspecified address (`0.0.0.0`, `[::]`, as a server may listen on) is reached on
/// loopback.
fn endpoint(addr: &str) -> Result<(String, String), String> {
    let trimmed = addr.trim().trim_end_matches('/');
    let without_scheme = if let Some(rest) = trimmed.strip_prefix("http://") {
        rest
    } else if trimmed.starts_with("https://") {
        return Err(format!(
            "the address {addr:?} is https: msbd serves plain HTTP; give HOST:PORT or an http:// URL (behind a TLS proxy, its http:// address)"
        ));
    } else if trimmed.contains("://") {
        return Err(format!(
            "the address {addr:?} is not HOST:PORT nor an http:// URL"
        ));
    } else {
        trimmed
    };
    let host_port = without_scheme
        .strip_suffix("/mcp")
        .unwrap_or(without_scheme);
    if host_port.is_empty() || host_port.contains('/') {
        return Err(format!(
            "the address {addr:?} is not HOST:PORT nor an http:// URL ending in /mcp"
        ));
    }
    let host_port = if let Some(port) = host_port.strip_prefix("0.0.0.0:") {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = host_port.strip_prefix("[::]:") {
        format!("[::1]:{port}")
    } else {
        host_port.to_owned()
    };
    let base = format!("http://{host_port}");
    let mcp = format!("{base}/mcp");
    Ok((base, mcp))
}

impl Context {
    /// Opens the MCP session, or prints why it cannot be opened and answers the exit code.
    async fn connect(&self) -> Result<ToolClient, Exit> {
        ToolClient::connect(
            &self.mcp_url,
            self.token.as_deref(),
            "msbd-cli",
            env!("CARGO_PKG_VERSION"),
        )
        .await
        .map_err(|error| self.report(&error))
    }

    /// Prints why a call failed, in the words of what to do about it, and answers its exit
    /// code.
    fn report(&self, error: &ClientError) -> Exit {
        match error {
            ClientError::Unreachable { reason, .. } => {
                eprintln!(
                    "msbd: msbd is not reachable at {}: {reason}\nStart it with `msbd serve --transport http`, or set {ADDR_VARIABLE} (or --addr) to the address it listens on.",
                    self.base_url
                );
                Exit::Unreachable
            }
            ClientError::Unauthorized { .. } => {
                let what = if self.token.is_some() {
                    "refused the token"
                } else {
                    "asks for a token and none was given"
                };
                eprintln!(
                    "msbd: msbd at {} {what}: set {TOKEN_VARIABLE} or --token to the token msbd was started with.",
                    self.base_url
                );
                Exit::Unreachable
            }
            ClientError::Tool { code, text, .. } => {
                eprintln!("{text}");
                match code.as_deref() {
                    Some("TASK_NOT_FOUND" | "SESSION_NOT_FOUND" | "FILE_NOT_FOUND") => {
                        Exit::NotFound
                    }
                    Some(
                        "INVALID_ARGUMENT" | "INVALID_TASK_TYPE" | "UNKNOWN_ACTION"
                        | "MISSING_TASK_ID",
                    ) => Exit::Usage,
                    _ => Exit::Refused,
                }
            }
            ClientError::UnknownTool { tool } => {
                eprintln!(
                    "msbd: msbd at {} does not offer the tool {tool}",
                    self.base_url
                );
                Exit::Refused
            }
            ClientError::Protocol { .. } => {
                eprintln!("msbd: {error}");
                Exit::Refused
            }
        }
    }
}

/// Prints a JSON value on stdout, indented.
fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A usage error found by the command line itself: printed, exit code 2.
fn usage(problem: &str) -> Exit {
    eprintln!("msbd: {problem}");
    Exit::Usage
}

/// The string at `key` of a JSON object, or "".
fn text<'v>(value: &'v Value, key: &str) -> &'v str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

/// Whether a task status is final.
fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "timeout" | "cancelled")
}

/// A duration in seconds, short and readable (`4 s`, `2 min 5 s`, `1 h 3 min`).
fn seconds_text(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    match seconds {
        0..60 => format!("{seconds} s"),
        60..3600 => format!("{} min {} s", seconds / 60, seconds % 60),
        _ => format!("{} h {} min", seconds / 3600, seconds % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::{ADDR_VARIABLE, DEFAULT_ADDR, TOKEN_VARIABLE, endpoint, seconds_text};

    #[test]
    fn the_variables_are_msbds_own() {
        let names: Vec<&str> = crate::config::VARIABLES.iter().map(|v| v.name).collect();
        assert!(names.contains(&ADDR_VARIABLE), "{names:?}");
        assert!(names.contains(&TOKEN_VARIABLE), "{names:?}");
        let loaded = crate::config::load(
            [("HOME".to_owned(), "/home/ada".to_owned())],
            &crate::config::Overrides::default(),
        )
        .unwrap();
        assert_eq!(loaded.config.http_addr.to_string(), DEFAULT_ADDR);
    }

    #[test]
    fn addresses_become_the_mcp_endpoint() {
        let mcp = |addr: &str| endpoint(addr).map(|(_, mcp)| mcp);
        assert_eq!(mcp("127.0.0.1:8765").unwrap(), "http://127.0.0.1:8765/mcp");
        assert_eq!(mcp("localhost:9000").unwrap(), "http://localhost:9000/mcp");
        assert_eq!(
            mcp("http://127.0.0.1:1/").unwrap(),
            "http://127.0.0.1:1/mcp"
        );
        assert_eq!(
            mcp("http://127.0.0.1:1/mcp").unwrap(),
            "http://127.0.0.1:1/mcp"
        );
        assert_eq!(mcp("0.0.0.0:8765").unwrap(), "http://127.0.0.1:8765/mcp");
        assert_eq!(mcp("[::]:8765").unwrap(), "http://[::1]:8765/mcp");
        assert!(mcp("https://example.com").unwrap_err().contains("https"));
        assert!(mcp("ftp://x").is_err());
        assert!(mcp("host:1/other").is_err());
        assert!(mcp("").is_err());
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(seconds_text(0.4), "0 s");
        assert_eq!(seconds_text(59.6), "1 min 0 s");
        assert_eq!(seconds_text(125.0), "2 min 5 s");
        assert_eq!(seconds_text(3780.0), "1 h 3 min");
    }
}
