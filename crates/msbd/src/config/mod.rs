//! msbd's configuration: the `MSB_*` environment variables, a few command-line flags that
//! override them, and their validation.
//!
//! Every variable is declared once, in the table of the `declarations` module (the
//! `variables!` invocation): its name, its type, its default, its documentation, the
//! flag that overrides it, whether it is a secret, and how `msbd config` shows its value.
//! From that one table come the struct envy reads the environment into, the defaults,
//! [`VARIABLES`] (the reference that [`render`] and [`markdown_reference`] walk), and so
//! `docs/configuration.md`, which a unit test keeps equal to [`markdown_reference`].
//!
//! [`load`] takes the variables as an argument (the binary passes [`environment`]), so tests
//! never touch the process environment. It reads the `MSB_*` variables with envy, applies the
//! flags ([`Overrides`]: flag > environment > default), checks every value and the rules that
//! tie values together, and answers either a [`Loaded`] configuration (with where each value
//! came from, and warnings to log) or [`ConfigErrors`]: every problem at once, each naming the
//! variable, saying what is wrong and what to do.
//!
//! Conventions: a variable set to the empty string counts as unset; durations are whole
//! seconds; an `MSB_*` variable that is not in the table is a warning (most likely a typo),
//! not an error; secrets (`MSB_API_KEY`, `MSB_AUTH_TOKEN`) are never printed, not even in
//! error messages or `Debug` output. Besides `MSB_*`, only `XDG_DATA_HOME` and `HOME` are
//! read, for the default data directory.

mod declarations;
mod render;
mod rules;
mod values;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sandbox_wrapper::WrapperConfig;
use sandbox_wrapper::backend::local::{IsolationLevel, IsolationMode};
use sandbox_wrapper::backend::microsandbox::{MicrosandboxConfig, SettingNames};
use sandbox_wrapper::backend::{Flavor, VolumeMapping};
use sandbox_wrapper::network::{NetworkMode, NetworkPolicy, NetworkSettings};
use sandbox_wrapper::session::SessionConfig;
use sandbox_wrapper::task_types::TaskTypes;
use sandbox_wrapper::wrapper::BackendKind;
use task_core::EngineConfig;

pub use declarations::VARIABLES;
pub(crate) use render::quoted;
pub use render::{markdown_reference, render};

use declarations::{DefaultText, Raw};
use render::url_without_password;
use rules::{Check, build, unknown_warning};
use values::{Addr, Choice, LogFilter, PathValue, Value as _};

/// The prefix of every variable msbd reads.
pub const PREFIX: &str = "MSB_";

/// The microsandbox namespace that every sandbox of msbd lives in (the server's namespaces
/// separate users; msbd's own sandboxes are told apart by the instance marker in their names).
pub const MICROSANDBOX_NAMESPACE: &str = "msbd";

/// The longest duration a timeout or interval variable accepts: 365 days, in seconds.
pub const MAX_DURATION_SECS: u64 = 365 * 24 * 3600;

/// The shortest `MSB_LEASE_TIMEOUT` accepted, in seconds: renewals every second at least.
const MIN_LEASE_SECS: u64 = 3;
/// The longest `MSB_LEASE_TIMEOUT` accepted, in seconds (an hour).
const MAX_LEASE_SECS: u64 = 3600;

/// The longest `MSB_TASK_RETENTION` accepted: 100 years, in seconds (use 0 for forever).
pub const MAX_RETENTION_SECS: u64 = 36_500 * 24 * 3600;

/// The shortest `MSB_AUTH_TOKEN` accepted, in characters.
pub const MIN_AUTH_TOKEN_LEN: usize = 16;

/// The smallest `MSB_MAX_REQUEST_BYTES` accepted.
pub const MIN_REQUEST_BYTES: u64 = 1024;

/// The command that writes `docs/configuration.md` from the declarations.
pub const REGENERATE_DOCS: &str = "cargo run -p msbd -- config --markdown > docs/configuration.md";

/// How MCP clients reach msbd (`MSB_TRANSPORT`, `--transport`).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum Transport {
    /// MCP frames on standard input and output (the client starts msbd).
    Stdio,
    /// Streamable HTTP on `MSB_HTTP_ADDR`.
    Http,
}

/// How log lines are written (`MSB_LOG_FORMAT`).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum LogFormat {
    /// Plain text, for people.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// How much isolation the local backend uses, and the least it may start with
/// (`MSB_ISOLATION`).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum Isolation {
    /// Every layer the host offers, at whatever level that makes.
    Strongest,
    /// Every layer the host offers, and no less than the strong level.
    Strong,
    /// Every layer the host offers, and no less than the standard level.
    Standard,
    /// None (tests and benchmarks only).
    Off,
}

impl Isolation {
    /// The backend's mode.
    pub fn mode(self) -> IsolationMode {
        match self {
            Isolation::Off => IsolationMode::Off,
            Isolation::Strongest | Isolation::Strong | Isolation::Standard => {
                IsolationMode::Strongest
            }
        }
    }

    /// The least level `msbd serve` may start with.
    pub fn required(self) -> Option<IsolationLevel> {
        match self {
            Isolation::Strong => Some(IsolationLevel::Strong),
            Isolation::Standard => Some(IsolationLevel::Standard),
            Isolation::Strongest | Isolation::Off => None,
        }
    }
}

/// Where sandboxes run (`MSB_SANDBOX_BACKEND`).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum BackendChoice {
    /// Processes on this host, under the strongest isolation it offers.
    Local,
    /// MicroVMs run by a microsandbox server (`MSB_SERVER_URL`).
    Microsandbox,
}

/// The network of a session whose caller names none (`MSB_NETWORK`).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum NetworkChoice {
    /// No network.
    None,
    /// Only the allowed names, through msbd's proxy.
    Allow,
    /// The host's network.
    Host,
}

impl NetworkChoice {
    /// The wrapper's mode.
    pub fn mode(self) -> NetworkMode {
        match self {
            NetworkChoice::None => NetworkMode::None,
            NetworkChoice::Allow => NetworkMode::Allow,
            NetworkChoice::Host => NetworkMode::Host,
        }
    }
}

/// A secret (`MSB_API_KEY`, `MSB_AUTH_TOKEN`). Its `Debug` output never shows it; only
/// [`Secret::expose`] does, for the code that must send or compare it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// Where tasks are stored (`MSB_DATABASE_URL`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Database {
    /// The embedded SQLite store, in one file.
    Sqlite {
        /// The database file (its directory must exist when the store opens it).
        path: PathBuf,
    },
    /// The PostgreSQL store, shared by every msbd node that names the same database and
    /// schema (`docs/cluster.md`).
    Postgres {
        /// The URL (`postgres://user:password@host:port/database`) as given: it may hold a
        /// password, so it is shown only through [`Database::url`], which hides it.
        url: String,
    },
}

/// msbd's effective configuration: every `MSB_*` variable, typed, defaulted and checked.
/// Build it with [`load`].
#[derive(Clone, Debug)]
pub struct Config {
    /// How MCP clients reach msbd (`MSB_TRANSPORT`, `--transport`).
    pub transport: Transport,
    /// Where the HTTP transport listens (`MSB_HTTP_ADDR`, `--listen`).
    pub http_addr: SocketAddr,
    /// The bearer token HTTP clients must send (`MSB_AUTH_TOKEN`); required off loopback.
    pub auth_token: Option<Secret>,
    /// The web console's operator token (`MSB_OPERATOR_TOKEN`).
    pub operator_token: Option<Secret>,
    /// Where the web console listens beside the stdio transport (`MSB_CONSOLE_ADDR`).
    pub console_addr: Option<SocketAddr>,
    /// The largest HTTP request body accepted, in bytes (`MSB_MAX_REQUEST_BYTES`).
    pub max_request_bytes: usize,
    /// The `Host` header values the HTTP transport accepts besides the loopback names and the
    /// listen address (`MSB_HTTP_ALLOWED_HOSTS`): `name` for any port, or `name:port`; empty
    /// for none.
    pub http_allowed_hosts: Vec<String>,
    /// The browser `Origin` values allowed on `/mcp` (`MSB_HTTP_ALLOWED_ORIGINS`):
    /// `scheme://host[:port]` (`:*` for any port) or `null`; empty: `Origin` is not checked.
    pub http_allowed_origins: Vec<String>,
    /// Whether the supervision (admin) tools are offered (`MSB_SUPERVISION_TOOLS`; when unset,
    /// on for stdio and off for HTTP, already resolved here).
    pub supervision_tools: bool,
    /// The tracing filter (`MSB_LOG_LEVEL`, `--log-level`): a level or filter directives.
    pub log_level: String,
    /// How log lines are written (`MSB_LOG_FORMAT`).
    pub log_format: LogFormat,
    /// How long a graceful shutdown may take (`MSB_SHUTDOWN_TIMEOUT`).
    pub shutdown_timeout: Duration,
    /// msbd's data directory (`MSB_DATA_DIR`, `--data-dir`).
    pub data_dir: PathBuf,
    /// Where tasks are stored (`MSB_DATABASE_URL`; by default `<data_dir>/tasks.sqlite3`).
    pub database: Database,
    /// The PostgreSQL schema of the shared queue (`MSB_DATABASE_SCHEMA`).
    pub database_schema: String,
    /// This node's name on a shared PostgreSQL store (`MSB_NODE_ID`; by default the host name).
    pub node_id: String,
    /// How long finished tasks are kept; `None` keeps them forever (`MSB_TASK_RETENTION`).
    pub task_retention: Option<Duration>,
    /// The SQLite store's page cache, in MiB (`MSB_SQLITE_CACHE_MB`).
    pub sqlite_cache_mb: u64,
    /// The most tasks running at once (`MSB_MAX_CONCURRENT_TASKS`).
    pub max_concurrent_tasks: usize,
    /// The timeout of a task that sets none (`MSB_EXECUTION_TIMEOUT`). The MCP layer applies it
    /// when it submits a task; the engine itself has no default timeout.
    pub execution_timeout: Duration,
    /// The largest file `write_file` makes, and the most bytes one `read_file` returns
    /// (`MSB_MAX_FILE_BYTES`).
    pub max_file_bytes: u64,
    /// How long a tool call waits for tasks when it does not say (`MSB_CALL_WAIT`).
    pub call_wait: Duration,
    /// How long a running task's lease lasts without renewal (`MSB_LEASE_TIMEOUT`).
    pub lease_timeout: Duration,
    /// The file of operator-defined task types, if any (`MSB_TASK_TYPES_FILE`); read by
    /// [`Config::wrapper_config`].
    pub task_types_file: Option<PathBuf>,
    /// The most output kept per task, in bytes (`MSB_OUTPUT_CAP_BYTES`).
    pub output_cap_bytes: u64,
    /// Where sandboxes run (`MSB_SANDBOX_BACKEND`).
    pub backend: BackendChoice,
    /// How much isolation the local backend uses, and the least it may start with
    /// (`MSB_ISOLATION`).
    pub isolation: Isolation,
    /// Where the local backend keeps the sessions' workspaces (`MSB_SANDBOX_DIR`); `None`: the
    /// backend's default (see [`LocalConfig::sandbox_dir`]).
    ///
    /// [`LocalConfig::sandbox_dir`]: sandbox_wrapper::backend::local::LocalConfig::sandbox_dir
    pub sandbox_dir: Option<PathBuf>,
    /// The microsandbox server's base URL, without a trailing `/` (`MSB_SERVER_URL`).
    pub server_url: String,
    /// The microsandbox server's API key (`MSB_API_KEY`).
    pub api_key: Option<Secret>,
    /// How long starting a microsandbox sandbox (and any request to the server) may take
    /// (`MSB_SANDBOX_START_TIMEOUT`): the microsandbox backend's request timeout. The local
    /// backend starts sandboxes at once and does not use it.
    pub sandbox_start_timeout: Duration,
    /// A session's flavor when none is asked for (`MSB_DEFAULT_FLAVOR`).
    pub default_flavor: Flavor,
    /// Host directories bound into every sandbox (`MSB_SHARED_VOLUME_PATH`).
    pub volumes: Vec<VolumeMapping>,
    /// Network for sandboxes (`MSB_NETWORK`, `MSB_NETWORK_ALLOW`, `MSB_NETWORK_CALLER_ALLOW`,
    /// `MSB_NETWORK_HOST`, `MSB_NETWORK_PRIVATE`, `MSB_NETWORK_HOSTS`).
    pub network: NetworkSettings,
    /// How long an idle session lives (`MSB_SESSION_TIMEOUT`).
    pub session_timeout: Duration,
    /// How often idle sessions are expired (`MSB_CLEANUP_INTERVAL`); below `session_timeout`.
    pub cleanup_interval: Duration,
    /// The most sessions at once (`MSB_MAX_SESSIONS`).
    pub max_sessions: usize,
    /// The most flavor memory of all sessions together, in MB; `None` is no limit
    /// (`MSB_MAX_TOTAL_MEMORY_MB`).
    pub max_total_memory_mb: Option<u64>,
    /// Whether to stop the least recently used idle session at a limit
    /// (`MSB_ENABLE_LRU_EVICTION`).
    pub lru_eviction: bool,
    /// How often orphaned sandboxes are swept (`MSB_ORPHAN_CLEANUP_INTERVAL`).
    pub orphan_cleanup_interval: Duration,
}

/// Values from command-line flags, which override the environment.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--transport` (overrides `MSB_TRANSPORT`).
    pub transport: Option<Transport>,
    /// `--listen` (overrides `MSB_HTTP_ADDR`), as given: `IP:PORT` or `HOST:PORT`.
    pub listen: Option<String>,
    /// `--data-dir` (overrides `MSB_DATA_DIR`).
    pub data_dir: Option<PathBuf>,
    /// `--log-level` (overrides `MSB_LOG_LEVEL`).
    pub log_level: Option<String>,
    /// `--console` of `serve`, `--listen` of `console` (overrides `MSB_CONSOLE_ADDR`).
    pub console: Option<String>,
}

/// Where a value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The variable is unset (or empty): the default applies.
    Default,
    /// The environment variable.
    Environment,
    /// A command-line flag, such as `--listen`.
    Flag(&'static str),
}

/// A loaded configuration, with where each value came from.
#[derive(Clone, Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// Where each variable's value came from, by variable name (every variable is present).
    pub sources: BTreeMap<&'static str, Source>,
    /// Things that are allowed but probably not what was meant (an unknown `MSB_*` variable,
    /// isolation switched off, ...). `msbd serve` logs each at WARN level when it starts.
    pub warnings: Vec<String>,
}

/// One problem with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The variable at fault (for a flag, the variable it overrides).
    pub variable: &'static str,
    /// What is wrong and what to do; it starts with the variable (or flag) and its value, and
    /// never contains a secret.
    pub message: String,
}

/// Every problem with the configuration (at least one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The problems: the values that do not parse, then those out of range, each in the order
    /// of the declarations, then the rules between values.
    pub errors: Vec<ConfigError>,
    /// The warnings found on the way (an unknown `MSB_*` variable may explain an error).
    pub warnings: Vec<String>,
}

/// One `MSB_*` variable, as declared in this module's table.
#[derive(Clone, Copy)]
pub struct Variable {
    /// Its name, such as `MSB_SESSION_TIMEOUT`.
    pub name: &'static str,
    /// The part of the documentation it belongs to.
    pub group: Group,
    /// The flag that overrides it, if any, such as `--listen`.
    pub flag: Option<&'static str>,
    /// Whether its value is a secret (never printed).
    pub secret: bool,
    /// Its documentation, as written in the table (lines of one paragraph).
    doc: &'static str,
    /// The name of its field in the struct envy reads (the name without `MSB_`, lower-cased).
    field: &'static str,
    kind: fn() -> String,
    default: fn() -> DefaultText,
    show: fn(&Config) -> Option<String>,
}

/// The parts of the configuration reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    /// Transports, logging, shutdown.
    Daemon,
    /// The data directory, the database, retention.
    Storage,
    /// Concurrency, timeouts, task types, output.
    Tasks,
    /// The sandbox backend and what sandboxes are made of.
    Sandboxes,
    /// Sessions, their limits and the cleanup loops.
    Sessions,
}

/// The builder of the tracing filter: `MSB_LOG_LEVEL` is checked with it, and `msbd` logs
/// through the filter it builds, so that a value that passes the check is the filter used.
pub fn log_filter_builder() -> tracing_subscriber::filter::Builder {
    tracing_subscriber::EnvFilter::builder()
}

/// The process environment as [`load`] takes it. Unlike `std::env::vars`, this never panics: a
/// name or value that is not valid UTF-8 is converted with U+FFFD in place of the bad bytes.
pub fn environment() -> Vec<(String, String)> {
    std::env::vars_os()
        .map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                value.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// Reads the configuration from `vars` (the process environment: only `MSB_*`, `XDG_DATA_HOME`
/// and `HOME` are looked at) and the flags in `overrides`, and checks it.
///
/// # Errors
///
/// Every problem found, each naming its variable: a value that does not parse, a number that
/// must be positive, an unknown choice (with the allowed ones), and the rules between values
/// (the session cleanup interval below the session timeout, a token to listen off loopback,
/// ...).
pub fn load(
    vars: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Loaded, ConfigErrors> {
    let mut home = None;
    let mut xdg_data_home = None;
    let mut set: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut unknown: BTreeSet<String> = BTreeSet::new();
    for (name, value) in vars {
        match name.as_str() {
            "HOME" => home = Some(value),
            "XDG_DATA_HOME" => xdg_data_home = Some(value),
            _ if name.starts_with(PREFIX) => match variable(&name) {
                Some(variable) if value.trim().is_empty() => {
                    set.remove(variable.name);
                }
                Some(variable) => {
                    set.insert(variable.name, value);
                }
                None => {
                    unknown.insert(name);
                }
            },
            _ => {}
        }
    }
    let mut warnings: Vec<String> = unknown.iter().map(|name| unknown_warning(name)).collect();
    let mut sources: BTreeMap<&'static str, Source> = VARIABLES
        .iter()
        .map(|variable| {
            let source = if set.contains_key(variable.name) {
                Source::Environment
            } else {
                Source::Default
            };
            (variable.name, source)
        })
        .collect();
    let flagged = [
        ("MSB_TRANSPORT", overrides.transport.is_some()),
        ("MSB_HTTP_ADDR", overrides.listen.is_some()),
        ("MSB_DATA_DIR", overrides.data_dir.is_some()),
        ("MSB_LOG_LEVEL", overrides.log_level.is_some()),
        ("MSB_CONSOLE_ADDR", overrides.console.is_some()),
    ];
    for (name, given) in flagged {
        if given {
            // A flag wins: the environment's value, valid or not, does not matter.
            set.remove(name);
            let flag = variable(name).and_then(|v| v.flag).unwrap_or("a flag");
            sources.insert(name, Source::Flag(flag));
        }
    }

    let (mut raw, parse_errors) = read_raw(&set);
    let mut check = Check {
        invalid: parse_errors.iter().map(|e| e.variable).collect(),
        errors: parse_errors,
        sources: &sources,
    };
    if let Some(transport) = overrides.transport {
        raw.transport = Some(Choice(transport));
    }
    if let Some(listen) = &overrides.listen {
        match Addr::parse(listen) {
            Ok(addr) => raw.http_addr = Some(addr),
            Err(reason) => check.fail(
                "MSB_HTTP_ADDR",
                format!("--listen {}: {reason}", quoted(listen)),
            ),
        }
    }
    if let Some(console) = &overrides.console {
        match Addr::parse(console) {
            Ok(addr) => raw.console_addr = Some(addr),
            Err(reason) => check.fail(
                "MSB_CONSOLE_ADDR",
                format!("--console {}: {reason}", quoted(console)),
            ),
        }
    }
    if let Some(data_dir) = &overrides.data_dir {
        match PathValue::parse(&data_dir.to_string_lossy()) {
            Ok(_) => raw.data_dir = Some(PathValue(data_dir.clone())),
            Err(reason) => check.fail("MSB_DATA_DIR", format!("--data-dir: {reason}")),
        }
    }
    if let Some(log_level) = &overrides.log_level {
        match LogFilter::parse(log_level) {
            Ok(filter) => raw.log_level = Some(filter),
            Err(reason) => check.fail(
                "MSB_LOG_LEVEL",
                format!("--log-level {}: {reason}", quoted(log_level)),
            ),
        }
    }

    let config = build(raw, &mut check, &mut warnings, xdg_data_home, home);
    let errors = check.errors;
    if !errors.is_empty() {
        return Err(ConfigErrors { errors, warnings });
    }
    if let Some(listen) = &overrides.listen
        && config.transport == Transport::Stdio
    {
        warnings.push(format!(
            "--listen {listen} has no effect with the stdio transport: add --transport http to \
             serve over HTTP"
        ));
    }
    Ok(Loaded {
        config,
        sources,
        warnings,
    })
}

impl Config {
    /// The sandbox-wrapper configuration: backend, isolation, volumes, sessions and their
    /// limits, the engine's concurrency and retention, the output cap, and the task types
    /// read from `MSB_TASK_TYPES_FILE`. `own_exe` (msbd's own path) becomes the Landlock shim.
    ///
    /// # Errors
    ///
    /// The task types file cannot be read or is invalid (the message names
    /// `MSB_TASK_TYPES_FILE`, the file and the line).
    pub fn wrapper_config(&self, own_exe: Option<PathBuf>) -> anyhow::Result<WrapperConfig> {
        let mut wrapper = WrapperConfig::new(&self.data_dir);
        wrapper.backend = match self.backend {
            BackendChoice::Local => BackendKind::Local,
            BackendChoice::Microsandbox => BackendKind::Microsandbox(MicrosandboxConfig {
                server_url: self.server_url.clone(),
                api_key: self.api_key.as_ref().map(|key| key.expose().to_owned()),
                namespace: MICROSANDBOX_NAMESPACE.to_owned(),
                // Empty: the wrapper derives it from the data directory, as for the local backend.
                instance_marker: String::new(),
                request_timeout: self.sandbox_start_timeout,
                setting_names: SettingNames {
                    server_url: "MSB_SERVER_URL".to_owned(),
                    api_key: "MSB_API_KEY".to_owned(),
                },
            }),
        };
        wrapper.isolation = self.isolation.mode();
        wrapper.required_isolation = self.isolation.required();
        wrapper.sandbox_dir = self.sandbox_dir.clone();
        wrapper.volumes = self.volumes.clone();
        wrapper.landlock_shim = own_exe;
        wrapper.network = self.network.clone();
        wrapper.sessions = SessionConfig {
            session_timeout: self.session_timeout,
            cleanup_interval: self.cleanup_interval,
            orphan_cleanup_interval: self.orphan_cleanup_interval,
            max_sessions: self.max_sessions,
            // The resource manager has no "no limit"; nothing can sum to more than this.
            max_total_memory_mb: self.max_total_memory_mb.unwrap_or(u64::MAX),
            lru_eviction: self.lru_eviction,
            default_flavor: self.default_flavor,
            // The wrapper sets it from `network` when it starts.
            default_network: NetworkPolicy::none(),
            clock: sandbox_wrapper::Clock::system(),
        };
        let defaults = EngineConfig::default();
        wrapper.engine = EngineConfig {
            concurrency: self.max_concurrent_tasks,
            retention: self.task_retention,
            lease: self.lease_timeout,
            heartbeat_interval: self.lease_timeout / 3,
            reaper_interval: defaults.reaper_interval.min(self.lease_timeout / 5),
            ..defaults
        };
        wrapper.output_cap = self.output_cap_bytes;
        if let Some(path) = &self.task_types_file {
            // The error names the file, the line and what to do; say which variable chose it.
            wrapper.task_types = TaskTypes::load(path).map_err(|error| {
                anyhow::anyhow!("MSB_TASK_TYPES_FILE={}: {error}", path.display())
            })?;
        }
        Ok(wrapper)
    }
}

impl Transport {
    /// Its name: `stdio` or `http`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl LogFormat {
    /// Its name: `text` or `json`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl BackendChoice {
    /// Its name: `local` or `microsandbox`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the code that sends or compares it. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Database {
    /// The URL of the database, as `msbd config` shows it: `sqlite://PATH`.
    pub fn url(&self) -> String {
        match self {
            Database::Sqlite { path } => format!("sqlite://{}", path.display()),
            Database::Postgres { url } => url_without_password(url),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Environment => f.write_str("environment"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.errors.as_slice() {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for error in many {
                    write!(f, "\n  - {error}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigErrors {}

impl Variable {
    /// What values it takes, in words (`whole seconds`, one of `stdio`, `http`, ...).
    pub fn kind(&self) -> String {
        (self.kind)()
    }

    /// Its default, in Markdown: a literal in backticks, or words for a default that is
    /// derived from something else or is no value at all.
    pub fn default_markdown(&self) -> String {
        let default = (self.default)();
        if default.literal {
            format!("`{}`", default.text)
        } else {
            default.text
        }
    }

    /// Its documentation as one paragraph.
    pub fn doc_paragraph(&self) -> String {
        self.doc
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl fmt::Debug for Variable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Variable")
            .field("name", &self.name)
            .field("envy_field", &self.field)
            .field("group", &self.group)
            .field("flag", &self.flag)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

impl Group {
    /// Every group, in the order of the reference.
    pub const ALL: [Group; 5] = [
        Group::Daemon,
        Group::Storage,
        Group::Tasks,
        Group::Sandboxes,
        Group::Sessions,
    ];

    /// Its title in the reference.
    pub fn title(self) -> &'static str {
        match self {
            Group::Daemon => "Daemon",
            Group::Storage => "Storage",
            Group::Tasks => "Tasks",
            Group::Sandboxes => "Sandboxes",
            Group::Sessions => "Sessions",
        }
    }
}

/// Reads the variables that are set with envy. When envy refuses the set, each variable is
/// read on its own, so that every bad value is reported (envy stops at the first), named;
/// the good ones are then read together.
fn read_raw(set: &BTreeMap<&'static str, String>) -> (Raw, Vec<ConfigError>) {
    let envy = envy::prefixed(PREFIX);
    let pairs = |set: &BTreeMap<&'static str, String>| {
        set.iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect::<Vec<_>>()
    };
    if let Ok(raw) = envy.from_iter::<_, Raw>(pairs(set)) {
        return (raw, Vec::new());
    }
    let mut good = BTreeMap::new();
    let mut errors = Vec::new();
    let set_in_order = VARIABLES
        .iter()
        .filter_map(|variable| set.get_key_value(variable.name));
    for (&name, value) in set_in_order {
        match envy.from_iter::<_, Raw>([(name.to_owned(), value.clone())]) {
            Ok(_) => {
                good.insert(name, value.clone());
            }
            Err(error) => errors.push(parse_error(name, value, &error)),
        }
    }
    match envy.from_iter::<_, Raw>(pairs(&good)) {
        Ok(raw) => (raw, errors),
        Err(error) => {
            // Each of these was read on its own; together they should read too.
            errors.push(ConfigError {
                variable: "MSB_*",
                message: format!("the MSB_* variables could not be read together: {error}"),
            });
            (Raw::default(), errors)
        }
    }
}

/// The error for a value envy (that is, the variable's type) refused, naming the variable.
fn parse_error(name: &'static str, value: &str, error: &envy::Error) -> ConfigError {
    let reason = match error {
        envy::Error::Custom(reason) => reason.clone(),
        envy::Error::MissingValue(field) => format!("missing value for {field}"),
    };
    let secret = variable(name).is_some_and(|v| v.secret);
    let message = if secret {
        format!("{name} (value not shown): {reason}")
    } else {
        format!("{name}={}: {reason}", quoted(value))
    };
    ConfigError {
        variable: name,
        message,
    }
}

/// The declared variable of this name.
fn variable(name: &str) -> Option<&'static Variable> {
    VARIABLES.iter().find(|variable| variable.name == name)
}

/// A variable's default, in words, for "unset it for the default (...)".
fn default_of(name: &str) -> String {
    variable(name).map_or_else(String::new, |variable| (variable.default)().text)
}
