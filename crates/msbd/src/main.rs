//! The `msbd` binary: the command line (see the library crate, `msbd`, for the rest).
//!
//! `msbd serve` serves MCP clients, `msbd config` prints the effective configuration,
//! `msbd doctor` checks what the host offers; `msbd task`, `queue`, `sessions` and `health`
//! talk to a running msbd over HTTP (`msbd::cli`). The same binary is also the Landlock shim
//! the local sandbox backend stacks under bubblewrap (see `run_if_requested` below).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use msbd::{cli, config, doctor, serve};

/// Exit status when the configuration is invalid (a usage error: nothing was started).
const CONFIG_ERROR_EXIT_CODE: u8 = 2;

/// Durable, supervised background tasks in sandboxes, for MCP clients.
#[derive(Debug, Parser)]
#[command(name = "msbd", version, about)]
struct Cli {
    /// msbd's data directory [overrides MSB_DATA_DIR].
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// What is logged: a level or tracing filter directives [overrides MSB_LOG_LEVEL].
    #[arg(long, global = true, value_name = "FILTER")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve MCP clients (over stdio or HTTP).
    Serve(ServeArgs),
    /// Serve MCP over stdio and the web console on ADDR, from one process (the same as `msbd
    /// serve --console ADDR`).
    Console(ConsoleArgs),
    /// Print the effective configuration, with where each value came from.
    Config(ConfigArgs),
    /// Check sandbox isolation and the task store.
    Doctor,
    #[command(flatten)]
    Client(cli::ClientCommand),
}

/// The flags of `serve` (also accepted by `config`, to show what `serve` would use).
#[derive(Debug, Args)]
struct ServeArgs {
    /// How MCP clients reach msbd: stdio or http [overrides MSB_TRANSPORT].
    #[arg(long, value_name = "stdio|http", ignore_case = true, value_parser = transport_parser())]
    transport: Option<config::Transport>,
    /// Where the HTTP transport listens, IP:PORT or HOST:PORT [overrides MSB_HTTP_ADDR].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Where the web console listens beside the stdio transport [overrides MSB_CONSOLE_ADDR].
    #[arg(long, value_name = "ADDR")]
    console: Option<String>,
}

/// The flags of `console`.
#[derive(Debug, Args)]
struct ConsoleArgs {
    /// Where the web console listens, IP:PORT or HOST:PORT (beyond loopback it needs
    /// MSB_OPERATOR_TOKEN or MSB_AUTH_TOKEN).
    #[arg(long, value_name = "ADDR")]
    listen: String,
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// Print the configuration reference (docs/configuration.md) in Markdown instead.
    #[arg(long)]
    markdown: bool,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Parses `--transport` from the names strum gives [`config::Transport`], so that a wrong one is
/// answered with the possible values.
fn transport_parser() -> impl clap::builder::TypedValueParser<Value = config::Transport> {
    use clap::builder::TypedValueParser as _;
    use strum::VariantNames as _;
    clap::builder::PossibleValuesParser::new(config::Transport::VARIANTS)
        .try_map(|name| name.parse::<config::Transport>())
}

impl Cli {
    /// The flags that override the environment.
    fn overrides(&self) -> config::Overrides {
        let serve = match &self.command {
            Command::Serve(serve) | Command::Config(ConfigArgs { serve, .. }) => Some(serve),
            Command::Console(_) | Command::Doctor | Command::Client(_) => None,
        };
        let mut overrides = config::Overrides {
            transport: serve.and_then(|serve| serve.transport),
            listen: serve.and_then(|serve| serve.listen.clone()),
            data_dir: self.data_dir.clone(),
            log_level: self.log_level.clone(),
            console: serve.and_then(|serve| serve.console.clone()),
        };
        if let Command::Console(console) = &self.command {
            overrides.transport = Some(config::Transport::Stdio);
            overrides.console = Some(console.listen.clone());
        }
        overrides
    }
}

/// The daemon's allocator. glibc's malloc makes the two threads of a busy engine queue on its
/// arena locks (a task is allocated on one worker and freed on the other) and consolidates its
/// free lists on the hot path: with it the engine's no-op burn-down ran at about 60% of the rate
/// it reaches on mimalloc (docs/benchmarks.md, "A slower host, the allocator and the engine's
/// hot path").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<ExitCode> {
    // When a sandbox starts this binary as its Landlock shim, it becomes the sandboxed program
    // here and never returns.
    sandbox_wrapper::backend::local::shim::run_if_requested();
    let cli = Cli::parse();
    run(cli)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let overrides = cli.overrides();
    match cli.command {
        Command::Client(command) => Ok(cli::run(command)),
        Command::Config(args) => Ok(show_config(&args, &overrides)),
        command @ (Command::Serve(_) | Command::Console(_) | Command::Doctor) => {
            let loaded = match config::load(config::environment(), &overrides) {
                Ok(loaded) => loaded,
                Err(errors) => {
                    for warning in &errors.warnings {
                        eprintln!("msbd: warning: {warning}");
                    }
                    eprintln!("msbd: {errors}");
                    return Ok(ExitCode::from(CONFIG_ERROR_EXIT_CODE));
                }
            };
            if let Err(error) = init_tracing(&loaded.config) {
                eprintln!("msbd: {error}");
                return Ok(ExitCode::from(CONFIG_ERROR_EXIT_CODE));
            }
            for warning in &loaded.warnings {
                tracing::warn!("{warning}");
            }
            if matches!(command, Command::Doctor) {
                return Ok(run_doctor(&loaded.config));
            }
            Ok(serve::run(loaded))
        }
    }
}

/// Logs go to stderr only: over stdio, stdout carries MCP frames and nothing else. The filter
/// is built by the parser that checked `MSB_LOG_LEVEL`, so it fails only if [`log_filter`] broke
/// it, and then says so rather than logging at another level.
fn init_tracing(config: &config::Config) -> Result<(), String> {
    let directives = log_filter(&config.log_level);
    let filter = config::log_filter_builder()
        .parse(&directives)
        .map_err(|error| {
            format!(
                "MSB_LOG_LEVEL={}: the tracing filter {directives:?} is invalid ({error}); set \
                 MSB_LOG_LEVEL (or --log-level) to a level such as info",
                config.log_level
            )
        })?;
    let ansi = use_ansi(
        std::env::var_os("NO_COLOR").as_deref(),
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match config.log_format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
    Ok(())
}

/// The tracing filter for `MSB_LOG_LEVEL` (or `--log-level`): the user's directives, with the
/// MCP library held at `warn` when they would let it log at `info` or below without naming it.
/// rmcp logs at `info` every client's whole `initialize` request (`rmcp::service`: "Service
/// initialized as server", with the client's info and capabilities) and every notification it
/// receives; those are protocol dumps, not msbd's own events. A filter that names `rmcp` (such as
/// `info,rmcp=info`) is used as written; one whose default level is `warn` or quieter, or that
/// has no default level, already keeps rmcp quiet and is left alone too.
fn log_filter(user: &str) -> String {
    /// Whether a directive is a bare level more verbose than `warn`.
    fn is_verbose_level(directive: &str) -> bool {
        matches!(
            directive.to_ascii_lowercase().as_str(),
            "info" | "debug" | "trace"
        )
    }
    /// Whether a directive is about the target `rmcp` or one of its modules.
    fn names_rmcp(directive: &str) -> bool {
        directive
            .strip_prefix("rmcp")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', '[', '=']))
    }
    let directives: Vec<&str> = user
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let verbose_default = directives.iter().any(|d| is_verbose_level(d));
    if verbose_default && !directives.iter().any(|d| names_rmcp(d)) {
        let mut filter = directives.join(",");
        filter.push_str(",rmcp=warn");
        filter
    } else {
        user.to_owned()
    }
}

/// Whether the text log uses ANSI colours: only on a terminal, and never when `NO_COLOR` is set
/// to anything but the empty string (<https://no-color.org>).
fn use_ansi(no_color: Option<&std::ffi::OsStr>, stderr_is_terminal: bool) -> bool {
    let no_color = no_color.is_some_and(|value| !value.is_empty());
    stderr_is_terminal && !no_color
}

/// `msbd doctor`.
fn run_doctor(config: &config::Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("msbd: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let healthy = runtime.block_on(doctor::run(config, std::env::current_exe().ok()));
    if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `msbd config`: the effective configuration on stdout (warnings on stderr), or every
/// problem on stderr and exit status 2; with `--markdown`, the configuration reference.
fn show_config(args: &ConfigArgs, overrides: &config::Overrides) -> ExitCode {
    if args.markdown {
        print!("{}", config::markdown_reference());
        return ExitCode::SUCCESS;
    }
    match config::load(config::environment(), overrides) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("msbd: warning: {warning}");
            }
            print!("{}", config::render(&loaded));
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for warning in &errors.warnings {
                eprintln!("msbd: warning: {warning}");
            }
            eprintln!("msbd: {errors}");
            ExitCode::from(CONFIG_ERROR_EXIT_CODE)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::{Cli, log_filter, use_ansi};

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rmcp_is_held_at_warn_unless_the_filter_names_it() {
        // The default, and plain verbose levels: rmcp's initialize dump (info) is filtered out.
        assert_eq!(log_filter("info"), "info,rmcp=warn");
        assert_eq!(log_filter("DEBUG"), "DEBUG,rmcp=warn");
        assert_eq!(log_filter("info,msbd=debug"), "info,msbd=debug,rmcp=warn");
        // Quiet enough already, or no default level: as written.
        for user in ["warn", "error", "off", "msbd=debug", "msbd::http=trace"] {
            assert_eq!(log_filter(user), user);
        }
        // The user asks for rmcp: as written.
        for user in ["info,rmcp=info", "debug,rmcp::service=debug", "trace,rmcp"] {
            assert_eq!(log_filter(user), user);
        }
        // A target that merely starts with "rmcp" is not rmcp.
        assert_eq!(log_filter("info,rmcpx=info"), "info,rmcpx=info,rmcp=warn");
        // What comes out is a filter tracing accepts, and it drops rmcp's info events.
        let filter = tracing_subscriber::EnvFilter::try_new(log_filter("info")).unwrap();
        assert_eq!(filter.to_string(), "rmcp=warn,info");
    }

    #[test]
    fn no_color_turns_colours_off() {
        use std::ffi::OsStr;
        assert!(use_ansi(None, true));
        assert!(use_ansi(Some(OsStr::new("")), true));
        assert!(!use_ansi(Some(OsStr::new("1")), true));
        assert!(!use_ansi(Some(OsStr::new("0")), true));
        assert!(!use_ansi(None, false));
    }

    #[test]
    fn the_version_flag_prints_the_crate_version() {
        let version = Cli::command().render_version();
        assert_eq!(version, format!("msbd {}\n", env!("CARGO_PKG_VERSION")));
        assert_ne!(env!("CARGO_PKG_VERSION"), "0.0.0");
    }
}
