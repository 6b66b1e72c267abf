//! msbd's configuration: the `MSB_*` environment variables, a few command-line flags that
//! override them, and their validation.
//!
//! Every variable is declared once, in the table at the heart of this module (the
//! `variables!` invocation below): its name, its type, its default, its documentation, the
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sandbox_wrapper::WrapperConfig;
use sandbox_wrapper::backend::local::{IsolationLevel, IsolationMode};
use sandbox_wrapper::backend::microsandbox::MicrosandboxConfig;
use sandbox_wrapper::backend::{Flavor, VolumeMapping};
use sandbox_wrapper::output::DEFAULT_OUTPUT_CAP;
use sandbox_wrapper::session::SessionConfig;
use sandbox_wrapper::task_types::TaskTypes;
use sandbox_wrapper::wrapper::BackendKind;
use serde::{Deserialize, Deserializer};
use task_core::EngineConfig;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// MCP frames on standard input and output (the client starts msbd).
    Stdio,
    /// Streamable HTTP on `MSB_HTTP_ADDR`.
    Http,
}

/// How log lines are written (`MSB_LOG_FORMAT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Plain text, for people.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// How much isolation the local backend uses, and the least it may start with
/// (`MSB_ISOLATION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// Processes on this host, under the strongest isolation it offers.
    Local,
    /// MicroVMs run by a microsandbox server (`MSB_SERVER_URL`).
    Microsandbox,
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
    /// backend's default (see [`LocalConfig::sandbox_dir`](sandbox_wrapper::backend::local::LocalConfig::sandbox_dir)).
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

/// The text `msbd config` prints: one line per variable, `NAME=value  (source)`, in the order
/// of the reference, with secrets shown only as `(set)` or `(unset)`.
pub fn render(loaded: &Loaded) -> String {
    let mut out = String::new();
    for variable in VARIABLES {
        let value = match ((variable.show)(&loaded.config), variable.secret) {
            (None, _) => "(unset)".to_owned(),
            (Some(_), true) => "(set)".to_owned(),
            (Some(value), false) => printable(&hide_password(&value)),
        };
        let source = loaded
            .sources
            .get(variable.name)
            .copied()
            .unwrap_or(Source::Default);
        let _ = writeln!(out, "{}={value}  ({source})", variable.name);
    }
    out
}

/// The configuration reference in Markdown: the whole content of `docs/configuration.md`.
pub fn markdown_reference() -> String {
    let mut out = String::new();
    out.push_str("# Configuration\n\n");
    let _ = writeln!(
        out,
        "<!-- Generated from crates/msbd/src/config.rs; do not edit. Regenerate with:\n     \
         {REGENERATE_DOCS} -->\n"
    );
    out.push_str(
        "msbd is configured by `MSB_*` environment variables, a few of which can also be set by \
         a command-line flag. Precedence: a flag overrides the environment, and the environment \
         overrides the default (**flag > environment > default**). `msbd config` prints the \
         effective configuration, one variable per line, with where each value came from; \
         `msbd config --markdown` prints this page.\n\n",
    );
    out.push_str(
        "- A variable set to the empty string counts as unset.\n\
         - Durations are whole seconds (`180`, not `3m`), and at most 365 days.\n\
         - Booleans are `true` or `false`; `1`/`0`, `yes`/`no`, `on`/`off` and \
         `enabled`/`disabled` are accepted too. Choices are not case-sensitive.\n\
         - Every value is checked when msbd starts. Every problem is reported at once, each \
         naming the variable, what is wrong and what to do, and msbd exits with status 2 \
         before it starts anything.\n\
         - A variable that starts with `MSB_` but is not listed here is reported as a warning \
         (it is probably a typo) and ignored.\n\
         - Secrets are never printed: `msbd config` shows them as `(set)` or `(unset)`.\n\
         - The variables that the microsandbox MCP wrapper read keep its names and defaults.\n\n",
    );
    out.push_str("| Variable | Default | Flag |\n|---|---|---|\n");
    for variable in VARIABLES {
        let _ = writeln!(
            out,
            "| [`{name}`](#{anchor}) | {default} | {flag} |",
            name = variable.name,
            anchor = variable.name.to_lowercase(),
            default = table_cell(&variable.default_markdown()),
            flag = variable
                .flag
                .map_or_else(|| "".to_owned(), |flag| format!("`{flag}`")),
        );
    }
    for group in Group::ALL {
        let _ = write!(out, "\n## {}\n", group.title());
        for variable in VARIABLES.iter().filter(|v| v.group == group) {
            let _ = write!(
                out,
                "\n### `{}`\n\n{}\n\n- Type: {}\n- Default: {}\n",
                variable.name,
                variable.doc_paragraph(),
                variable.kind(),
                variable.default_markdown(),
            );
            if let Some(flag) = variable.flag {
                let _ = writeln!(out, "- Flag: `{flag}`");
            }
            if variable.secret {
                out.push_str(
                    "- Secret: never printed; `msbd config` shows `(set)` or `(unset)`.\n",
                );
            }
        }
    }
    out
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
            }),
        };
        wrapper.isolation = self.isolation.mode();
        wrapper.required_isolation = self.isolation.required();
        wrapper.sandbox_dir = self.sandbox_dir.clone();
        wrapper.volumes = self.volumes.clone();
        wrapper.landlock_shim = own_exe;
        wrapper.sessions = SessionConfig {
            session_timeout: self.session_timeout,
            cleanup_interval: self.cleanup_interval,
            orphan_cleanup_interval: self.orphan_cleanup_interval,
            max_sessions: self.max_sessions,
            // The resource manager has no "no limit"; nothing can sum to more than this.
            max_total_memory_mb: self.max_total_memory_mb.unwrap_or(u64::MAX),
            lru_eviction: self.lru_eviction,
            default_flavor: self.default_flavor,
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
        name_of(self)
    }
}

impl LogFormat {
    /// Its name: `text` or `json`.
    pub fn as_str(self) -> &'static str {
        name_of(self)
    }
}

impl BackendChoice {
    /// Its name: `local` or `microsandbox`.
    pub fn as_str(self) -> &'static str {
        name_of(self)
    }
}

impl FromStr for Transport {
    type Err = String;

    fn from_str(text: &str) -> Result<Transport, String> {
        parse_choice(text)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
            Database::Postgres { url } => hide_password(url),
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

// ---------------------------------------------------------------------------------------------
// The declarations.
// ---------------------------------------------------------------------------------------------

/// Declares the variables: generates `Raw` (what envy reads: one optional field per variable),
/// `Defaults` and `defaults()` (the default of each variable that has a fixed one), and
/// [`VARIABLES`]. A row is:
///
/// ```text
/// /// Documentation (one paragraph).
/// NAME: field: RawType = fixed(value) | unset("meaning") | derived("how"),
///     group = Group::X, flag = Some("--flag") | None, secret = bool,
///     show = |config| Option<String>;
/// ```
macro_rules! variables {
    ($(
        $(#[doc = $doc:literal])+
        $name:ident : $field:ident : $ty:ty = $dkind:ident($dvalue:expr),
            group = $group:expr, flag = $flag:expr, secret = $secret:literal,
            show = $show:expr;
    )+) => {
        /// The variables that are set, as envy reads them: one field per variable, named as
        /// envy names it (the variable without `MSB_`, lower-cased).
        #[derive(Default, Deserialize)]
        struct Raw {
            $( $field: Option<$ty>, )+
        }

        /// The fixed defaults (`()` for a variable whose default is unset or derived).
        #[allow(dead_code, reason = "the `()` fields of unset and derived defaults are never read")]
        struct Defaults {
            $( $field: default_type!($dkind, $ty), )+
        }

        fn defaults() -> Defaults {
            Defaults {
                $( $field: default_value!($dkind, $dvalue), )+
            }
        }

        /// Every `MSB_*` variable msbd reads, in the order of the reference and `msbd config`.
        pub const VARIABLES: &[Variable] = &[
            $(
                Variable {
                    name: stringify!($name),
                    group: $group,
                    flag: $flag,
                    secret: $secret,
                    doc: concat!($($doc, "\n"),+),
                    field: stringify!($field),
                    kind: <$ty as Value>::kind,
                    default: || default_text!($dkind, $field, $dvalue),
                    show: $show,
                },
            )+
        ];
    };
}

macro_rules! default_type {
    (fixed, $ty:ty) => {
        $ty
    };
    (unset, $ty:ty) => {
        ()
    };
    (derived, $ty:ty) => {
        ()
    };
}

macro_rules! default_value {
    (fixed, $value:expr) => {
        $value
    };
    (unset, $value:expr) => {
        ()
    };
    (derived, $value:expr) => {
        ()
    };
}

macro_rules! default_text {
    (fixed, $field:ident, $value:expr) => {
        DefaultText {
            text: defaults().$field.describe(),
            literal: true,
        }
    };
    (unset, $field:ident, $value:expr) => {
        DefaultText {
            text: format!("unset ({})", $value),
            literal: false,
        }
    };
    (derived, $field:ident, $value:expr) => {
        DefaultText {
            text: $value.to_owned(),
            literal: false,
        }
    };
}

variables! {
    /// How MCP clients reach msbd: `stdio` (the client starts msbd and speaks MCP on its
    /// standard input and output; logs go to standard error) or `http` (streamable HTTP at
    /// `/mcp` on `MSB_HTTP_ADDR`, with `/healthz`, `/readyz` and `/metrics`).
    MSB_TRANSPORT: transport: Choice<Transport> = fixed(Choice(Transport::Stdio)),
        group = Group::Daemon, flag = Some("--transport"), secret = false,
        show = |c| Some(c.transport.to_string());

    /// The address the HTTP transport listens on, as `IP:PORT` (`[::1]:8765` for IPv6) or
    /// `HOST:PORT`: a host name is resolved once, at start, to its first IPv4 loopback address,
    /// else its first loopback address, else its first address (`localhost:8765` listens on
    /// 127.0.0.1:8765). Used only with `MSB_TRANSPORT=http`.
    /// An address that is not loopback (`0.0.0.0:8765`, a public IP) requires
    /// `MSB_AUTH_TOKEN`: without one msbd refuses to start, whatever the transport.
    MSB_HTTP_ADDR: http_addr: Addr = fixed(Addr(SocketAddr::from(([127, 0, 0, 1], 8765)))),
        group = Group::Daemon, flag = Some("--listen"), secret = false,
        show = |c| Some(c.http_addr.to_string());

    /// The bearer token HTTP clients must send (`Authorization: Bearer <token>`): at least 16
    /// visible ASCII characters, such as the output of `openssl rand -hex 32`. Required when
    /// `MSB_HTTP_ADDR` is not a loopback address; when set, it is required on loopback too.
    MSB_AUTH_TOKEN: auth_token: Secret = unset("no authentication; HTTP only on loopback"),
        group = Group::Daemon, flag = None, secret = true,
        show = |c| c.auth_token.as_ref().map(|_| String::new());

    /// The largest HTTP request body msbd accepts, in bytes (at least 1024); a larger request
    /// is refused.
    MSB_MAX_REQUEST_BYTES: max_request_bytes: Count = fixed(Count(4 * 1024 * 1024)),
        group = Group::Daemon, flag = None, secret = false,
        show = |c| Some(c.max_request_bytes.to_string());

    /// Further `Host` header values the HTTP transport accepts, comma-separated: `name` for any
    /// port or `name:port` for one, such as `msbd.example.com,192.0.2.10:8765`. The loopback
    /// names (`localhost`, `127.0.0.1`, `[::1]`) and the listen address are always accepted;
    /// a request with any other `Host` is refused with 403, which guards against DNS
    /// rebinding. When msbd listens beyond loopback (`MSB_HTTP_ADDR=0.0.0.0:8765`), list the
    /// DNS names and addresses clients reach it by; msbd warns at start while it is unset.
    MSB_HTTP_ALLOWED_HOSTS: http_allowed_hosts: HostList =
        unset("only the loopback names and the listen address"),
        group = Group::Daemon, flag = None, secret = false,
        show = |c| (!c.http_allowed_hosts.is_empty()).then(|| c.http_allowed_hosts.join(","));

    /// The browser origins allowed to call `/mcp`, comma-separated, each as browsers send it:
    /// a scheme and a host, with the port unless it is the scheme's default, such as
    /// `https://app.example.com,http://localhost:3000` (`:*` allows any port), or `null`. A
    /// request whose `Origin` header is not listed is refused with 403; requests without one,
    /// as MCP clients send them, always pass.
    MSB_HTTP_ALLOWED_ORIGINS: http_allowed_origins: OriginList =
        unset("the `Origin` header is not checked"),
        group = Group::Daemon, flag = None, secret = false,
        show = |c| (!c.http_allowed_origins.is_empty()).then(|| c.http_allowed_origins.join(","));

    /// Whether the supervision (admin) tools are offered: `get_background_task_status`,
    /// `restart_background_tasks`, `pause_background_tasks`, `resume_background_tasks` and
    /// `health_check`. Unset: on for the stdio transport (its one client is whoever started
    /// msbd) and off for HTTP (where clients may be many); `true` or `false` forces it.
    MSB_SUPERVISION_TOOLS: supervision_tools: Switch = derived("on for `stdio`, off for `http`"),
        group = Group::Daemon, flag = None, secret = false,
        show = |c| Some(c.supervision_tools.to_string());

    /// What is logged, to standard error: a level (`trace`, `debug`, `info`, `warn`, `error`
    /// or `off`) or tracing filter directives such as `info,msbd=debug`. The MCP library
    /// (`rmcp`), which logs every client's whole `initialize` request at `info`, is held at
    /// `warn` unless the directives name it (`info,rmcp=info` shows its lines).
    MSB_LOG_LEVEL: log_level: LogFilter = fixed(LogFilter("info".to_owned())),
        group = Group::Daemon, flag = Some("--log-level"), secret = false,
        show = |c| Some(c.log_level.clone());

    /// How log lines are written: `text`, for people, or `json` (one object per line), for
    /// log collectors. `text` is coloured only when standard error is a terminal and `NO_COLOR`
    /// is unset or empty.
    MSB_LOG_FORMAT: log_format: Choice<LogFormat> = fixed(Choice(LogFormat::Text)),
        group = Group::Daemon, flag = None, secret = false,
        show = |c| Some(c.log_format.to_string());

    /// How long a graceful shutdown (on SIGTERM or SIGINT) may take, in seconds: msbd stops
    /// taking tasks and lets running ones finish until 5 s before the end (a limit of 5 s or
    /// less stops them at once); then it stops the rest, which run again at the next start
    /// without using up an attempt (tasks submitted with `rerun_on_recovery: false` end failed,
    /// kind `interrupted`). Tool calls made meanwhile get `SHUTTING_DOWN`.
    MSB_SHUTDOWN_TIMEOUT: shutdown_timeout: Seconds = fixed(Seconds(30)),
        group = Group::Daemon, flag = None, secret = false,
        show = |c| Some(c.shutdown_timeout.as_secs().to_string());

    /// msbd's data directory: the task database (unless `MSB_DATABASE_URL` puts it elsewhere),
    /// the captured output of tasks and the sandboxes' work directories. It is created at start
    /// if missing. The default follows the XDG base directory specification:
    /// `$XDG_DATA_HOME/msbd` when `XDG_DATA_HOME` is an absolute path, else
    /// `$HOME/.local/share/msbd` when `HOME` is, else `./msbd-data` in the current directory
    /// (with a warning).
    MSB_DATA_DIR: data_dir: PathValue =
        derived("`$XDG_DATA_HOME/msbd`, else `$HOME/.local/share/msbd`, else `./msbd-data`"),
        group = Group::Storage, flag = Some("--data-dir"), secret = false,
        show = |c| Some(c.data_dir.display().to_string());

    /// Where tasks are stored: `sqlite://PATH` or a plain file path, for the embedded SQLite
    /// store of one msbd (a relative path is relative to the current directory, and the file's
    /// directory must exist); or `postgres://user:password@host:port/database`, for a queue
    /// shared by several msbd nodes (`docs/cluster.md`; plain TCP or a Unix socket, no TLS).
    /// `msbd config` shows the password as `***`.
    MSB_DATABASE_URL: database_url: DatabaseUrl = derived("`sqlite://<data dir>/tasks.sqlite3`"),
        group = Group::Storage, flag = None, secret = false,
        show = |c| Some(c.database.url());

    /// The PostgreSQL schema that holds the shared queue's tables (created, with them, when
    /// missing): nodes that share a queue name the same schema; another schema is another
    /// queue in the same database. Letters, digits and `_`. Only with a `postgres://`
    /// `MSB_DATABASE_URL`.
    MSB_DATABASE_SCHEMA: database_schema: SqlName = fixed(SqlName("msbd".to_owned())),
        group = Group::Storage, flag = None, secret = false,
        show = |c| Some(c.database_schema.clone());

    /// This node's name among the msbd nodes sharing a PostgreSQL queue: unique among the
    /// nodes running at once (a second node with the same name is refused at start) and the
    /// same across restarts, because tasks bound to a session run only on the node that owns
    /// the session. Letters, digits, `.`, `_` and `-`, up to 64. Only with a `postgres://`
    /// `MSB_DATABASE_URL`.
    MSB_NODE_ID: node_id: NodeName = derived("the host name"),
        group = Group::Storage, flag = None, secret = false,
        show = |c| Some(c.node_id.clone());

    /// The page cache of the SQLite store's writer connection, in MiB; each of its three reading
    /// connections gets a quarter of it. It fills as the store grows and then stays that size:
    /// msbd's memory grows by up to 1.75 times this value over its first hours of work and no
    /// further. Lower it on a small machine; raise it when the store is large and reads miss.
    MSB_SQLITE_CACHE_MB: sqlite_cache_mb: Count = fixed(Count(32)),
        group = Group::Storage, flag = None, secret = false,
        show = |c| Some(c.sqlite_cache_mb.to_string());

    /// How long finished tasks (completed, failed or cancelled), with their results, are kept
    /// before the retention pruner deletes them, in seconds; `0` keeps them forever.
    MSB_TASK_RETENTION: task_retention: Seconds = fixed(Seconds(7 * 24 * 3600)),
        group = Group::Storage, flag = None, secret = false,
        show = |c| Some(c.task_retention.map_or(0, |d| d.as_secs()).to_string());

    /// The most tasks that run at once; the others wait in the queue, highest priority first,
    /// then oldest first. Operator-defined task types may set lower limits of their own.
    MSB_MAX_CONCURRENT_TASKS: max_concurrent_tasks: Count = fixed(Count(4)),
        group = Group::Tasks, flag = None, secret = false,
        show = |c| Some(c.max_concurrent_tasks.to_string());

    /// The timeout of a task submitted without one, in seconds: a task still running when it
    /// passes is stopped and fails with the kind `timeout`.
    MSB_EXECUTION_TIMEOUT: execution_timeout: Seconds = fixed(Seconds(300)),
        group = Group::Tasks, flag = None, secret = false,
        show = |c| Some(c.execution_timeout.as_secs().to_string());

    /// How long a running task's claim (its lease) lasts without renewal, in seconds (3 to
    /// 3600). msbd renews the leases of its running tasks every third of this; the lease reaper
    /// looks every fifth of it (at most every 5 seconds) and queues again the tasks whose lease
    /// ran out (their msbd was killed, or lost its database), so this bounds how long a dead
    /// node's tasks wait. Shorter recovers sooner;
    /// longer survives longer stalls (a paused VM, a slow database) without running a task
    /// twice.
    MSB_LEASE_TIMEOUT: lease_timeout: Seconds = fixed(Seconds(30)),
        group = Group::Tasks, flag = None, secret = false,
        show = |c| Some(c.lease_timeout.as_secs().to_string());

    /// A TOML file of operator-defined task types (a name, a command template, a params
    /// schema, defaults); `examples/task-types.toml` documents the format. It is read at
    /// start, and a file that cannot be read or has a mistake stops msbd with an error naming
    /// the line.
    MSB_TASK_TYPES_FILE: task_types_file: PathValue =
        unset("only the built-in `command` and `code` task types"),
        group = Group::Tasks, flag = None, secret = false,
        show = |c| c.task_types_file.as_ref().map(|p| p.display().to_string());

    /// The most output kept per attempt of a task, in bytes (standard output and standard
    /// error together); output past it is counted but not kept. A retried task keeps the
    /// output of its last 5 attempts, each under this cap.
    MSB_OUTPUT_CAP_BYTES: output_cap_bytes: Count = fixed(Count(DEFAULT_OUTPUT_CAP)),
        group = Group::Tasks, flag = None, secret = false,
        show = |c| Some(c.output_cap_bytes.to_string());

    /// Where sandboxes run: `local` (processes on this host, under the strongest isolation it
    /// offers; see `docs/sandboxing.md`) or `microsandbox` (microVMs run by a microsandbox
    /// server at `MSB_SERVER_URL`).
    MSB_SANDBOX_BACKEND: sandbox_backend: Choice<BackendChoice> =
        fixed(Choice(BackendChoice::Local)),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| Some(c.backend.to_string());

    /// How much isolation the local backend uses: `strongest` (every layer the host offers,
    /// whatever level that makes; a level below `strong` is logged once at WARN with why, and
    /// shown by `msbd doctor`, the health check and `/metrics`), `strong` or `standard` (every
    /// layer the host offers, and `msbd serve` refuses to start, with exit status 2 and the
    /// failing layer named, when that is below the level named; `docs/sandboxing.md` says what
    /// each level holds), or `off` (none: tasks run as msbd's own user and can read and write
    /// whatever it can; only for tests and benchmarks, and msbd logs a loud warning when it
    /// starts with it). The microsandbox backend ignores it.
    MSB_ISOLATION: isolation: Choice<Isolation> = fixed(Choice(Isolation::Strongest)),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| Some(name_of(c.isolation).to_owned());

    /// Where the local backend keeps the sessions' workspaces. When msbd runs as root,
    /// sandboxes run as users of their own, which must be able to pass through every parent of
    /// this directory (mode o+x): the default is `<MSB_DATA_DIR>/sandboxes`, or
    /// `/var/lib/msbd-sandboxes/<instance>` when a parent of the data directory lets no other
    /// user through (the data directory under `/root`, mode 0700, say).
    MSB_SANDBOX_DIR: sandbox_dir: PathValue =
        derived("`<MSB_DATA_DIR>/sandboxes`, or `/var/lib/msbd-sandboxes/<instance>` (see above)"),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| c.sandbox_dir.as_ref().map(|p| p.display().to_string());

    /// The microsandbox server's base URL; its JSON-RPC endpoint is `<url>/api/v1/rpc`. Used
    /// only with `MSB_SANDBOX_BACKEND=microsandbox`, which supports only `http://` (this build
    /// has no TLS).
    MSB_SERVER_URL: server_url: ServerUrl = fixed(ServerUrl("http://127.0.0.1:5555".to_owned())),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| Some(c.server_url.clone());

    /// The microsandbox server's API key, sent as `Authorization: Bearer <key>`; leave it
    /// unset for a server in development mode. Used only with the microsandbox backend.
    MSB_API_KEY: api_key: Secret = unset("no key is sent"),
        group = Group::Sandboxes, flag = None, secret = true,
        show = |c| c.api_key.as_ref().map(|_| String::new());

    /// How long starting a microsandbox sandbox may take, in seconds (the server may pull an
    /// image first); it also bounds every other request to the server (a command's own timeout
    /// is added to it). Used only with the microsandbox backend.
    MSB_SANDBOX_START_TIMEOUT: sandbox_start_timeout: Seconds = fixed(Seconds(180)),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| Some(c.sandbox_start_timeout.as_secs().to_string());

    /// The size of a session's sandbox when the caller does not choose one: `small` (1 CPU,
    /// 1024 MB), `medium` (2 CPUs, 2048 MB) or `large` (4 CPUs, 4096 MB).
    MSB_DEFAULT_FLAVOR: default_flavor: Choice<Flavor> = fixed(Choice(Flavor::Small)),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| Some(c.default_flavor.to_string());

    /// Host directories bound into every sandbox: comma-separated `host:guest` mappings, with
    /// `:ro` appended for read-only (`:rw`, read-write, is the default); both paths absolute,
    /// for example `/srv/data:/data:ro,/srv/out:/out`. A JSON array of such strings is accepted
    /// too, as the microsandbox wrapper accepted it. The microsandbox backend cannot mount
    /// read-only, so it refuses `:ro`.
    MSB_SHARED_VOLUME_PATH: shared_volume_path: Volumes = unset("no volumes"),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| (!c.volumes.is_empty()).then(|| Volumes(c.volumes.clone()).describe());

    /// How long a session may stay idle (no task running in it) before it is stopped and its
    /// sandbox removed, in seconds.
    MSB_SESSION_TIMEOUT: session_timeout: Seconds = fixed(Seconds(1800)),
        group = Group::Sessions, flag = None, secret = false,
        show = |c| Some(c.session_timeout.as_secs().to_string());

    /// How often the session cleanup loop stops sessions idle past `MSB_SESSION_TIMEOUT`, in
    /// seconds; it must be below `MSB_SESSION_TIMEOUT`.
    MSB_CLEANUP_INTERVAL: cleanup_interval: Seconds = fixed(Seconds(60)),
        group = Group::Sessions, flag = None, secret = false,
        show = |c| Some(c.cleanup_interval.as_secs().to_string());

    /// The most sessions (sandboxes) alive at once. At the limit, the least recently used idle
    /// session is stopped to make room when `MSB_ENABLE_LRU_EVICTION` is on; otherwise the
    /// request fails with an error that names the limit.
    MSB_MAX_SESSIONS: max_sessions: Count = fixed(Count(10)),
        group = Group::Sessions, flag = None, secret = false,
        show = |c| Some(c.max_sessions.to_string());

    /// The most memory all sessions may hold together, in MB, counted by flavor (a `small`
    /// session counts 1024). It must be at least what one session of `MSB_DEFAULT_FLAVOR`
    /// needs.
    MSB_MAX_TOTAL_MEMORY_MB: max_total_memory_mb: Count = unset("no limit"),
        group = Group::Sessions, flag = None, secret = false,
        show = |c| c.max_total_memory_mb.map(|mb| mb.to_string());

    /// Whether a limit (`MSB_MAX_SESSIONS`, `MSB_MAX_TOTAL_MEMORY_MB`) is met by stopping the
    /// least recently used idle session (`true`) or by refusing the new session (`false`).
    MSB_ENABLE_LRU_EVICTION: enable_lru_eviction: Switch = fixed(Switch(true)),
        group = Group::Sessions, flag = None, secret = false,
        show = |c| Some(c.lru_eviction.to_string());

    /// How often the orphan cleanup loop removes the sandboxes, processes, cgroups and
    /// directories that carry this instance's marker but belong to no live session, in
    /// seconds (it also runs once at start). It never touches anything that is not this
    /// instance's.
    MSB_ORPHAN_CLEANUP_INTERVAL: orphan_cleanup_interval: Seconds = fixed(Seconds(600)),
        group = Group::Sessions, flag = None, secret = false,
        show = |c| Some(c.orphan_cleanup_interval.as_secs().to_string());
}

// ---------------------------------------------------------------------------------------------
// Building and checking the configuration.
// ---------------------------------------------------------------------------------------------

/// A default, in words for the reference.
struct DefaultText {
    text: String,
    /// Whether `text` is a literal value (shown in backticks) rather than words.
    literal: bool,
}

/// The errors found so far, and what is needed to word them.
struct Check<'a> {
    errors: Vec<ConfigError>,
    sources: &'a BTreeMap<&'static str, Source>,
    /// Variables whose value did not parse: rules that involve them are not checked (the
    /// default in their place would make for a misleading message).
    invalid: BTreeSet<&'static str>,
}

impl Check<'_> {
    /// Records a problem with `variable`; the rules that involve it are then not checked.
    fn fail(&mut self, variable: &'static str, message: String) {
        self.invalid.insert(variable);
        self.errors.push(ConfigError { variable, message });
    }

    /// `NAME=value`, or `--flag value` when a flag set it.
    fn origin(&self, name: &'static str, value: &str) -> String {
        match self.sources.get(name) {
            Some(Source::Flag(flag)) => format!("{flag} {}", quoted(value)),
            _ => format!("{name}={}", quoted(value)),
        }
    }

    fn usable(&self, names: &[&'static str]) -> bool {
        names.iter().all(|name| !self.invalid.contains(name))
    }

    /// A duration of at least one second and at most [`MAX_DURATION_SECS`].
    fn positive_seconds(&mut self, name: &'static str, value: Seconds) -> u64 {
        self.seconds(name, value, 1, MAX_DURATION_SECS)
    }

    /// A duration of `min` to `max` seconds.
    fn seconds(&mut self, name: &'static str, value: Seconds, min: u64, max: u64) -> u64 {
        let secs = value.0;
        if secs < min {
            let message = format!(
                "{}: must be at least {min} second{}; set a positive whole number of seconds, or \
                 unset {name} for the default ({})",
                self.origin(name, &secs.to_string()),
                if min == 1 { "" } else { "s" },
                default_of(name),
            );
            self.fail(name, message);
            return min;
        }
        if secs > max {
            let span = if max >= 2 * 24 * 3600 {
                format!(" ({} days)", max / (24 * 3600))
            } else {
                String::new()
            };
            let message = format!(
                "{}: must be at most {max} seconds{span}; set a smaller value, or unset \
                 {name} for the default ({})",
                self.origin(name, &secs.to_string()),
                default_of(name),
            );
            self.fail(name, message);
            return max;
        }
        secs
    }

    /// A count of at least `min`, that fits in `usize`.
    fn count(&mut self, name: &'static str, value: Count, min: u64) -> usize {
        let count = value.0;
        if count < min {
            let message = format!(
                "{}: must be at least {min}; set a larger number, or unset {name} for the default \
                 ({})",
                self.origin(name, &count.to_string()),
                default_of(name),
            );
            self.fail(name, message);
            return usize::try_from(min).unwrap_or(usize::MAX);
        }
        match usize::try_from(count) {
            Ok(count) => count,
            Err(_) => {
                let message = format!(
                    "{}: is too large for this machine; set at most {}",
                    self.origin(name, &count.to_string()),
                    usize::MAX,
                );
                self.fail(name, message);
                usize::MAX
            }
        }
    }
}

/// Turns the raw values (set or defaulted) into a [`Config`], recording every problem in
/// `check` and anything suspicious in `warnings`.
fn build(
    raw: Raw,
    check: &mut Check<'_>,
    warnings: &mut Vec<String>,
    xdg_data_home: Option<String>,
    home: Option<String>,
) -> Config {
    let d = defaults();
    let transport = raw.transport.unwrap_or(d.transport).0;
    let http_addr = raw.http_addr.unwrap_or(d.http_addr).0;
    let auth_token = raw.auth_token;
    let max_request_bytes = raw.max_request_bytes.unwrap_or(d.max_request_bytes);
    let max_request_bytes = check.count(
        "MSB_MAX_REQUEST_BYTES",
        max_request_bytes,
        MIN_REQUEST_BYTES,
    );
    let http_allowed_hosts = raw.http_allowed_hosts.map(|h| h.0).unwrap_or_default();
    let http_allowed_origins = raw.http_allowed_origins.map(|o| o.0).unwrap_or_default();
    let supervision_tools = raw
        .supervision_tools
        .map_or(transport == Transport::Stdio, |switch| switch.0);
    let log_level = raw.log_level.unwrap_or(d.log_level).0;
    let log_format = raw.log_format.unwrap_or(d.log_format).0;
    let shutdown_timeout = raw.shutdown_timeout.unwrap_or(d.shutdown_timeout);
    let shutdown_timeout = check.positive_seconds("MSB_SHUTDOWN_TIMEOUT", shutdown_timeout);

    let data_dir = match raw.data_dir {
        Some(PathValue(path)) => path,
        None => {
            let absolute = |value: Option<String>| {
                value.filter(|v| !v.is_empty() && Path::new(v).is_absolute())
            };
            if let Some(xdg) = absolute(xdg_data_home) {
                PathBuf::from(xdg).join("msbd")
            } else if let Some(home) = absolute(home) {
                PathBuf::from(home).join(".local/share/msbd")
            } else {
                warnings.push(
                    "neither XDG_DATA_HOME nor HOME is set to an absolute path, so the data \
                     directory is ./msbd-data under the current directory: set MSB_DATA_DIR (or \
                     --data-dir) to keep tasks in one place"
                        .to_owned(),
                );
                PathBuf::from("./msbd-data")
            }
        }
    };
    let database = match raw.database_url {
        Some(DatabaseUrl(database)) => database,
        None => Database::Sqlite {
            path: data_dir.join("tasks.sqlite3"),
        },
    };
    let database_schema = raw.database_schema.unwrap_or(d.database_schema).0;
    let node_id = match raw.node_id {
        Some(NodeName(name)) => name,
        None => host_name(),
    };
    let task_retention = raw.task_retention.unwrap_or(d.task_retention);
    let task_retention = check.seconds("MSB_TASK_RETENTION", task_retention, 0, MAX_RETENTION_SECS);
    let task_retention = (task_retention > 0).then(|| Duration::from_secs(task_retention));
    let sqlite_cache_mb = raw.sqlite_cache_mb.unwrap_or(d.sqlite_cache_mb);
    let sqlite_cache_mb = check.count("MSB_SQLITE_CACHE_MB", sqlite_cache_mb, 1) as u64;

    let max_concurrent_tasks = raw.max_concurrent_tasks.unwrap_or(d.max_concurrent_tasks);
    let max_concurrent_tasks = check.count("MSB_MAX_CONCURRENT_TASKS", max_concurrent_tasks, 1);
    let execution_timeout = raw.execution_timeout.unwrap_or(d.execution_timeout);
    let execution_timeout = check.positive_seconds("MSB_EXECUTION_TIMEOUT", execution_timeout);
    let lease_timeout = raw.lease_timeout.unwrap_or(d.lease_timeout);
    let lease_timeout = check.seconds(
        "MSB_LEASE_TIMEOUT",
        lease_timeout,
        MIN_LEASE_SECS,
        MAX_LEASE_SECS,
    );
    let task_types_file = raw.task_types_file.map(|path| path.0);
    let output_cap_bytes = raw.output_cap_bytes.unwrap_or(d.output_cap_bytes);
    let output_cap_bytes = check.count("MSB_OUTPUT_CAP_BYTES", output_cap_bytes, 1) as u64;

    let backend = raw.sandbox_backend.unwrap_or(d.sandbox_backend).0;
    let isolation = raw.isolation.unwrap_or(d.isolation).0;
    let sandbox_dir = raw.sandbox_dir.map(|path| path.0);
    let server_url = raw.server_url.unwrap_or(d.server_url).0;
    let api_key = raw.api_key;
    let sandbox_start_timeout = raw.sandbox_start_timeout.unwrap_or(d.sandbox_start_timeout);
    let sandbox_start_timeout =
        check.positive_seconds("MSB_SANDBOX_START_TIMEOUT", sandbox_start_timeout);
    let default_flavor = raw.default_flavor.unwrap_or(d.default_flavor).0;
    let volumes = raw.shared_volume_path.map(|v| v.0).unwrap_or_default();

    let session_timeout = raw.session_timeout.unwrap_or(d.session_timeout);
    let session_timeout = check.positive_seconds("MSB_SESSION_TIMEOUT", session_timeout);
    let cleanup_interval = raw.cleanup_interval.unwrap_or(d.cleanup_interval);
    let cleanup_interval = check.positive_seconds("MSB_CLEANUP_INTERVAL", cleanup_interval);
    let max_sessions = raw.max_sessions.unwrap_or(d.max_sessions);
    let max_sessions = check.count("MSB_MAX_SESSIONS", max_sessions, 1);
    let max_total_memory_mb = raw
        .max_total_memory_mb
        .map(|mb| check.count("MSB_MAX_TOTAL_MEMORY_MB", mb, 1) as u64);
    let lru_eviction = raw.enable_lru_eviction.unwrap_or(d.enable_lru_eviction).0;
    let orphan_cleanup_interval = raw
        .orphan_cleanup_interval
        .unwrap_or(d.orphan_cleanup_interval);
    let orphan_cleanup_interval =
        check.positive_seconds("MSB_ORPHAN_CLEANUP_INTERVAL", orphan_cleanup_interval);

    // The rules between values.
    if cleanup_interval >= session_timeout
        && check.usable(&["MSB_CLEANUP_INTERVAL", "MSB_SESSION_TIMEOUT"])
    {
        let message = format!(
            "{} must be below {}: sessions would outlive their timeout by up to the cleanup \
             interval; lower MSB_CLEANUP_INTERVAL (the default is {}) or raise \
             MSB_SESSION_TIMEOUT",
            check.origin("MSB_CLEANUP_INTERVAL", &cleanup_interval.to_string()),
            check.origin("MSB_SESSION_TIMEOUT", &session_timeout.to_string()),
            default_of("MSB_CLEANUP_INTERVAL"),
        );
        check.fail("MSB_CLEANUP_INTERVAL", message);
    }
    if let Some(limit) = max_total_memory_mb
        && limit < default_flavor.memory_mb()
        && check.usable(&["MSB_MAX_TOTAL_MEMORY_MB", "MSB_DEFAULT_FLAVOR"])
    {
        let message = format!(
            "{} is less than the {} MB that one session of {} needs: no session could start; \
             raise it to at least {}, choose a smaller MSB_DEFAULT_FLAVOR, or unset \
             MSB_MAX_TOTAL_MEMORY_MB for no limit",
            check.origin("MSB_MAX_TOTAL_MEMORY_MB", &limit.to_string()),
            default_flavor.memory_mb(),
            check.origin("MSB_DEFAULT_FLAVOR", default_flavor.as_str()),
            default_flavor.memory_mb(),
        );
        check.fail("MSB_MAX_TOTAL_MEMORY_MB", message);
    }
    let loopback = http_addr.ip().to_canonical().is_loopback();
    if !loopback && auth_token.is_none() && check.usable(&["MSB_HTTP_ADDR", "MSB_AUTH_TOKEN"]) {
        let message = format!(
            "{} is not a loopback address, and MSB_AUTH_TOKEN is not set: anyone who can reach \
             that address could run commands through msbd. Set MSB_AUTH_TOKEN to a random secret \
             of at least {MIN_AUTH_TOKEN_LEN} characters (for example the output of `openssl rand \
             -hex 32`), or listen on a loopback address such as 127.0.0.1:{}",
            check.origin("MSB_HTTP_ADDR", &http_addr.to_string()),
            http_addr.port(),
        );
        check.fail("MSB_HTTP_ADDR", message);
    }
    if !loopback
        && http_allowed_hosts.is_empty()
        && check.usable(&["MSB_HTTP_ADDR", "MSB_HTTP_ALLOWED_HOSTS"])
    {
        let every = if http_addr.ip().is_unspecified() {
            format!(
                " ({} listens on every interface, so that is every client that does not connect \
                 through localhost)",
                http_addr.ip()
            )
        } else {
            String::new()
        };
        warnings.push(format!(
            "{} is not a loopback address and MSB_HTTP_ALLOWED_HOSTS is not set: clients that \
             connect by a name or address other than the listen IP{every} will be refused with \
             403 until they are listed in MSB_HTTP_ALLOWED_HOSTS (the Host check guards against \
             DNS rebinding), such as MSB_HTTP_ALLOWED_HOSTS=msbd.example.com,192.0.2.10:{}",
            check.origin("MSB_HTTP_ADDR", &http_addr.to_string()),
            http_addr.port(),
        ));
    }
    if let Some(token) = &auth_token
        && token.expose().chars().count() < MIN_AUTH_TOKEN_LEN
    {
        check.fail(
            "MSB_AUTH_TOKEN",
            format!(
                "MSB_AUTH_TOKEN (value not shown) is shorter than {MIN_AUTH_TOKEN_LEN} characters, \
                 too easy to guess: use a random secret such as the output of `openssl rand -hex \
                 32`"
            ),
        );
    }
    if backend == BackendChoice::Microsandbox {
        if server_url.to_ascii_lowercase().starts_with("https://") {
            let message = format!(
                "{}: the microsandbox backend of this build has no TLS, so it supports only \
                 http:// (the server listens on plain HTTP, http://127.0.0.1:5555 by default); \
                 reach a remote server through a local TLS-terminating proxy",
                check.origin("MSB_SERVER_URL", &server_url),
            );
            check.fail("MSB_SERVER_URL", message);
        }
        let read_only: Vec<String> = volumes
            .iter()
            .filter(|volume| volume.read_only)
            .map(|volume| format!("{}:{}:ro", volume.host.display(), volume.guest.display()))
            .collect();
        if !read_only.is_empty() {
            check.fail(
                "MSB_SHARED_VOLUME_PATH",
                format!(
                    "MSB_SHARED_VOLUME_PATH has read-only mappings ({}), which the microsandbox \
                     backend cannot mount (the server has no read-only volumes): drop `:ro` to \
                     mount them writable, or use MSB_SANDBOX_BACKEND=local",
                    read_only.join(", ")
                ),
            );
        }
        if isolation == Isolation::Off {
            warnings.push(
                "MSB_ISOLATION=off has no effect with MSB_SANDBOX_BACKEND=microsandbox: microVMs \
                 are isolated by the microsandbox server"
                    .to_owned(),
            );
        }
    } else {
        if isolation == Isolation::Off {
            warnings.push(
                "MSB_ISOLATION=off: SANDBOXES ARE NOT ISOLATED. Tasks run as msbd's own user, \
                 can read and write everything it can, and reach the network. Use this only for \
                 tests and benchmarks; unset MSB_ISOLATION for the strongest isolation this host \
                 offers"
                    .to_owned(),
            );
        }
        let microsandbox_only: Vec<&str> =
            ["MSB_SERVER_URL", "MSB_API_KEY", "MSB_SANDBOX_START_TIMEOUT"]
                .into_iter()
                .filter(|name| check.sources.get(name) == Some(&Source::Environment))
                .collect();
        if !microsandbox_only.is_empty() {
            warnings.push(format!(
                "{} {} set, but only the microsandbox backend uses {} and MSB_SANDBOX_BACKEND is \
                 local: sandboxes run on this host. Set MSB_SANDBOX_BACKEND=microsandbox to use \
                 the microsandbox server",
                microsandbox_only.join(", "),
                if microsandbox_only.len() == 1 {
                    "is"
                } else {
                    "are"
                },
                if microsandbox_only.len() == 1 {
                    "it"
                } else {
                    "them"
                },
            ));
        }
    }

    Config {
        transport,
        http_addr,
        auth_token,
        max_request_bytes,
        http_allowed_hosts,
        http_allowed_origins,
        supervision_tools,
        log_level,
        log_format,
        shutdown_timeout: Duration::from_secs(shutdown_timeout),
        data_dir,
        database,
        database_schema,
        node_id,
        task_retention,
        sqlite_cache_mb,
        max_concurrent_tasks,
        execution_timeout: Duration::from_secs(execution_timeout),
        lease_timeout: Duration::from_secs(lease_timeout),
        task_types_file,
        output_cap_bytes,
        backend,
        isolation,
        sandbox_dir,
        server_url,
        api_key,
        sandbox_start_timeout: Duration::from_secs(sandbox_start_timeout),
        default_flavor,
        volumes,
        session_timeout: Duration::from_secs(session_timeout),
        cleanup_interval: Duration::from_secs(cleanup_interval),
        max_sessions,
        max_total_memory_mb,
        lru_eviction,
        orphan_cleanup_interval: Duration::from_secs(orphan_cleanup_interval),
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

/// The warning for an `MSB_*` variable that is not declared, with the closest known name.
fn unknown_warning(name: &str) -> String {
    let closest = VARIABLES
        .iter()
        .map(|variable| (edit_distance(name, variable.name), variable.name))
        .min();
    let hint = match closest {
        Some((distance, known)) if distance <= 3 => format!(" Did you mean {known}?"),
        _ => String::new(),
    };
    format!(
        "{} is not a variable msbd knows, so it is ignored.{hint} The variables are listed in \
         docs/configuration.md (or run `msbd config --markdown`)",
        printable(name)
    )
}

/// The Levenshtein distance between two strings, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = Vec::with_capacity(b.len() + 1);
        current.push(i + 1);
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

/// A value for a message: as is when it is plain, quoted (with escapes) when it is empty or
/// holds spaces, quotes or control characters; cut to 120 characters.
fn quoted(value: &str) -> String {
    const LIMIT: usize = 120;
    let value = &hide_password(value);
    let cut: String = value.chars().take(LIMIT).collect();
    let cut = if value.chars().count() > LIMIT {
        format!("{cut}...")
    } else {
        cut
    };
    let plain = !cut.is_empty()
        && cut
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\'');
    if plain { cut } else { format!("{cut:?}") }
}

/// A value with the password of a URL in it (`scheme://user:password@host`) replaced by `***`.
fn hide_password(value: &str) -> String {
    let Some(start) = value.find("://").map(|i| i + 3) else {
        return value.to_owned();
    };
    let authority_end = value[start..]
        .find(['/', '?', '#'])
        .map_or(value.len(), |i| start + i);
    let authority = &value[start..authority_end];
    match authority.rfind('@').and_then(|at| {
        let userinfo = &authority[..at];
        userinfo
            .find(':')
            .map(|colon| (start + colon + 1, start + at))
    }) {
        Some((from, to)) if from < to => {
            hide_password_option(&format!("{}***{}", &value[..from], &value[to..]))
        }
        _ => hide_password_option(value),
    }
}

/// A URL with the value of a `password=` option (a PostgreSQL URL may carry one) replaced by
/// `***`.
fn hide_password_option(value: &str) -> String {
    let Some(at) = value.find(['?', '&']).and_then(|query| {
        value[query..]
            .find("password=")
            .map(|at| query + at + "password=".len())
    }) else {
        return value.to_owned();
    };
    let end = value[at..].find('&').map_or(value.len(), |end| at + end);
    format!("{}***{}", &value[..at], &value[end..])
}

/// A value for `msbd config`: control characters (which could fake a line) escaped.
fn printable(value: &str) -> String {
    if value.chars().any(char::is_control) {
        value.escape_debug().to_string()
    } else {
        value.to_owned()
    }
}

/// Escapes a Markdown table cell.
fn table_cell(text: &str) -> String {
    text.replace('|', "\\|")
}

// ---------------------------------------------------------------------------------------------
// The types of the raw values: each parses the text of a variable, with a reason that says what
// is expected when it cannot.
// ---------------------------------------------------------------------------------------------

/// The type of a variable's value, as read from its text.
trait Value: Sized {
    /// What values it takes, in words, for the reference.
    fn kind() -> String;
    /// Parses a variable's text (never empty: an empty variable counts as unset).
    fn parse(text: &str) -> Result<Self, String>;
    /// The value as a variable would be written.
    fn describe(&self) -> String;
}

/// Implements `Deserialize` (what envy calls) through [`Value::parse`].
macro_rules! deserialize_with_parse {
    ($($ty:ty),+ $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                <$ty as Value>::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    )+};
}

deserialize_with_parse!(
    ServerUrl,
    Secret,
    Seconds,
    Count,
    Switch,
    PathValue,
    Volumes,
    DatabaseUrl,
    SqlName,
    NodeName,
    Addr,
    LogFilter,
    HostList,
    OriginList,
);

impl<'de, T: Named> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Choice::<T>::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A whole number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seconds(u64);

/// A whole number (a count, or bytes, or MB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Count(u64);

/// A boolean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Switch(bool);

/// One of a closed set of names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Choice<T>(T);

/// A path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PathValue(PathBuf);

/// The microsandbox server's URL.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ServerUrl(String);

/// Volume mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Volumes(Vec<VolumeMapping>);

/// A database URL or path.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DatabaseUrl(Database);

/// An SQL name (a schema).
#[derive(Clone, Debug, PartialEq, Eq)]
struct SqlName(String);

/// A node's name.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeName(String);

/// The host name (the default node name): the kernel's, made a valid [`NodeName`]; `msbd`
/// when there is none.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "msbd".to_owned()
    } else {
        name
    }
}

/// An IP address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Addr(SocketAddr);

/// The address to listen on among those a host name resolves to: the first IPv4 loopback
/// address, else the first loopback address, else the first address (so `localhost` gives
/// 127.0.0.1, or ::1 on a host without IPv4 loopback).
fn pick_listen_addr(addrs: impl IntoIterator<Item = SocketAddr>) -> Option<SocketAddr> {
    let addrs: Vec<SocketAddr> = addrs.into_iter().collect();
    let loopback = |a: &&SocketAddr| a.ip().to_canonical().is_loopback();
    addrs
        .iter()
        .find(|a| a.is_ipv4() && loopback(a))
        .or_else(|| addrs.iter().find(loopback))
        .or_else(|| addrs.first())
        .copied()
}

/// A tracing filter.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LogFilter(String);

/// `Host` header values (`name` or `name:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct HostList(Vec<String>);

/// Browser origins (`scheme://host[:port]`) or `null`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct OriginList(Vec<String>);

/// The digits of a whole number, or why the text is not one.
fn whole_number(text: &str, what: &str, example: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.strip_prefix('+').unwrap_or(text);
    if let Some(rest) = digits.strip_prefix('-')
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return Err(format!(
            "must not be negative; use {what} such as {example}"
        ));
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "is not {what}; write digits only, without a unit, such as {example}"
        ));
    }
    digits
        .parse::<u64>()
        .map_err(|_| format!("is too large; use {what} such as {example}"))
}

impl Value for Seconds {
    fn kind() -> String {
        "whole seconds".to_owned()
    }

    fn parse(text: &str) -> Result<Seconds, String> {
        let trimmed = text.trim();
        // The microsandbox wrapper took some durations as floats ("180.0"): a fraction of
        // zeros is accepted, any other fraction is not.
        if let Some((whole, fraction)) = trimmed.split_once('.')
            && !whole.is_empty()
            && whole.bytes().all(|b| b.is_ascii_digit())
            && fraction.bytes().all(|b| b.is_ascii_digit())
        {
            if !fraction.is_empty() && fraction.bytes().all(|b| b == b'0') {
                return whole_number(whole, "a whole number of seconds", "180").map(Seconds);
            }
            return Err(format!(
                "durations are whole seconds; round it, to {} for example",
                whole
                    .parse::<u64>()
                    .map_or_else(|_| whole.to_owned(), |w| (w.saturating_add(1)).to_string())
            ));
        }
        whole_number(trimmed, "a whole number of seconds", "180").map(Seconds)
    }

    fn describe(&self) -> String {
        self.0.to_string()
    }
}

impl Value for Count {
    fn kind() -> String {
        "whole number".to_owned()
    }

    fn parse(text: &str) -> Result<Count, String> {
        whole_number(text, "a whole number", "10").map(Count)
    }

    fn describe(&self) -> String {
        self.0.to_string()
    }
}

impl Value for Switch {
    fn kind() -> String {
        "boolean (`true` or `false`)".to_owned()
    }

    fn parse(text: &str) -> Result<Switch, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" | "enabled" => Ok(Switch(true)),
            "false" | "0" | "no" | "off" | "disabled" => Ok(Switch(false)),
            _ => Err(
                "is not a boolean; use true or false (1/0, yes/no, on/off and \
                      enabled/disabled are accepted too)"
                    .to_owned(),
            ),
        }
    }

    fn describe(&self) -> String {
        self.0.to_string()
    }
}

impl<T: Named> Value for Choice<T> {
    fn kind() -> String {
        let names: Vec<String> = T::CHOICES
            .iter()
            .map(|(name, _)| format!("`{name}`"))
            .collect();
        format!("one of {}", names.join(", "))
    }

    fn parse(text: &str) -> Result<Choice<T>, String> {
        parse_choice(text).map(Choice)
    }

    fn describe(&self) -> String {
        name_of(self.0).to_owned()
    }
}

impl Value for PathValue {
    fn kind() -> String {
        "path".to_owned()
    }

    fn parse(text: &str) -> Result<PathValue, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty; give a path".to_owned());
        }
        Ok(PathValue(PathBuf::from(text)))
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

impl Value for ServerUrl {
    fn kind() -> String {
        "URL (`http://HOST:PORT`)".to_owned()
    }

    fn parse(text: &str) -> Result<ServerUrl, String> {
        let text = text.trim();
        let lower = text.to_ascii_lowercase();
        let scheme_len = if lower.starts_with("http://") {
            "http://".len()
        } else if lower.starts_with("https://") {
            "https://".len()
        } else {
            return Err("is not an http:// URL; use one such as http://127.0.0.1:5555".to_owned());
        };
        // The scheme is ASCII, so `scheme_len` is a character boundary of `text` too.
        let (scheme, rest) = text.split_at(scheme_len);
        let rest = rest.trim_end_matches('/');
        let host = rest.split('/').next().unwrap_or_default();
        if host.is_empty() || rest.contains(char::is_whitespace) {
            return Err(
                "has no host or holds spaces; use one such as http://127.0.0.1:5555".to_owned(),
            );
        }
        if rest.contains(['?', '#']) {
            return Err("must not have a query or fragment; use http://HOST[:PORT]".to_owned());
        }
        let url = format!("{scheme}{rest}");
        Ok(ServerUrl(url))
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

impl Value for Secret {
    fn kind() -> String {
        "secret string".to_owned()
    }

    fn parse(text: &str) -> Result<Secret, String> {
        let text = text.trim();
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "contains spaces or characters that cannot be sent in an HTTP header; \
                        set it again with visible ASCII characters only"
                    .to_owned(),
            );
        }
        Ok(Secret(text.to_owned()))
    }

    fn describe(&self) -> String {
        "(set)".to_owned()
    }
}

impl Value for Addr {
    fn kind() -> String {
        "address and port (`IP:PORT` or `HOST:PORT`)".to_owned()
    }

    fn parse(text: &str) -> Result<Addr, String> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Addr(addr));
        }
        let usage = "use an address and port such as 127.0.0.1:8765, [::1]:8765, \
                     localhost:8765, or 0.0.0.0:8765 for every interface";
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("is not an address and port; {usage}"));
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("has no valid port (0 to 65535) after the colon; {usage}"))?;
        if host.is_empty() || host.contains([':', '[', ']', ' ', '/']) {
            return Err(format!(
                "is not an address and port (an IPv6 address goes in brackets, as in \
                 [::1]:{port}); {usage}"
            ));
        }
        match (host, port).to_socket_addrs() {
            Ok(addrs) => pick_listen_addr(addrs).map(Addr).ok_or_else(|| {
                format!(
                    "the host name {host} resolves to no address; use an IP address such as \
                     127.0.0.1:{port}"
                )
            }),
            Err(error) => Err(format!(
                "the host name {host} could not be resolved ({error}); use an IP address such \
                 as 127.0.0.1:{port}"
            )),
        }
    }

    fn describe(&self) -> String {
        self.0.to_string()
    }
}

impl Value for LogFilter {
    fn kind() -> String {
        "level or tracing filter".to_owned()
    }

    fn parse(text: &str) -> Result<LogFilter, String> {
        const USE: &str = "use trace, debug, info, warn, error or off, or tracing directives \
                           such as info,msbd=debug";
        fn is_level(text: &str) -> bool {
            matches!(
                text.trim().to_ascii_lowercase().as_str(),
                "trace"
                    | "debug"
                    | "info"
                    | "warn"
                    | "error"
                    | "off"
                    | "0"
                    | "1"
                    | "2"
                    | "3"
                    | "4"
                    | "5"
            )
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(format!("is empty; {USE}"));
        }
        for directive in text.split(',') {
            let directive = directive.trim();
            if directive.is_empty() {
                return Err(format!("has an empty directive (two commas?); {USE}"));
            }
            if directive.contains(['[', '{']) {
                // Span filters: left to the tracing filter itself.
                continue;
            }
            let valid = match directive.rsplit_once('=') {
                Some((target, level)) => !target.trim().is_empty() && is_level(level),
                // A bare word is a target in tracing's syntax, but one alone is almost always
                // a misspelt level; a module path (`msbd::config`) is taken as a target.
                None => is_level(directive) || directive.contains("::") || text.contains(','),
            };
            if !valid && directive.contains('=') {
                return Err(format!(
                    "has the directive {directive:?}, which is not TARGET=LEVEL; {USE}"
                ));
            }
            if !valid {
                // The microsandbox wrapper took Python's level names.
                let hint = match directive.to_ascii_lowercase().as_str() {
                    "warning" => " (Python's WARNING is warn here)",
                    "critical" | "fatal" => " (Python's CRITICAL is error here)",
                    _ => "",
                };
                return Err(format!("is not a level{hint}; {USE}"));
            }
        }
        Ok(LogFilter(text.to_owned()))
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

impl Value for DatabaseUrl {
    fn kind() -> String {
        "`sqlite://PATH` or a path".to_owned()
    }

    fn parse(text: &str) -> Result<DatabaseUrl, String> {
        const FORMS: &str = "use sqlite://PATH or a file path, or unset MSB_DATABASE_URL for \
                             tasks.sqlite3 in the data directory";
        let text = text.trim();
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return match task_core::store::postgres::check_url(text) {
                Ok(()) => Ok(DatabaseUrl(Database::Postgres {
                    url: text.to_owned(),
                })),
                Err(reason) => Err(format!(
                    "is not a PostgreSQL URL msbd can use ({reason}); write \
                     postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
                )),
            };
        }
        let path = if let Some(rest) = lower.strip_prefix("sqlite://").map(|_| &text[9..]) {
            rest
        } else if let Some(rest) = lower.strip_prefix("sqlite:").map(|_| &text[7..]) {
            rest
        } else if let Some((scheme, _)) = text.split_once("://")
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(format!(
                "the scheme {:?} is not supported; {FORMS}",
                scheme.to_ascii_lowercase()
            ));
        } else {
            text
        };
        if path.is_empty() {
            return Err(format!("names no file; {FORMS}"));
        }
        if path.starts_with(":memory:") || path.contains("mode=memory") {
            return Err(format!(
                "an in-memory database would lose every task when msbd stops; {FORMS}"
            ));
        }
        if text.len() != path.len() && path.contains('?') {
            return Err(format!(
                "URL options (after `?`) are not supported; {FORMS}"
            ));
        }
        Ok(DatabaseUrl(Database::Sqlite {
            path: PathBuf::from(path),
        }))
    }

    fn describe(&self) -> String {
        self.0.url()
    }
}

impl Value for SqlName {
    fn kind() -> String {
        "SQL name (letters, digits, `_`)".to_owned()
    }

    fn parse(text: &str) -> Result<SqlName, String> {
        let text = text.trim();
        let plain = text.len() <= 63
            && text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain {
            return Err(
                "is not a plain SQL name: use up to 63 letters, digits and `_`, not starting \
                 with a digit, such as msbd"
                    .to_owned(),
            );
        }
        Ok(SqlName(text.to_owned()))
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

impl Value for NodeName {
    fn kind() -> String {
        "name (letters, digits, `.`, `_`, `-`)".to_owned()
    }

    fn parse(text: &str) -> Result<NodeName, String> {
        let text = text.trim();
        let plain = !text.is_empty()
            && text.len() <= 64
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !plain {
            return Err(
                "is not a node name: use 1 to 64 letters, digits, `.`, `_` and `-`, such as \
                 worker-1"
                    .to_owned(),
            );
        }
        Ok(NodeName(text.to_owned()))
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

impl Value for Volumes {
    fn kind() -> String {
        "comma-separated `host:guest[:ro]` mappings".to_owned()
    }

    fn parse(text: &str) -> Result<Volumes, String> {
        let text = text.trim();
        let items: Vec<String> = if text.starts_with('[') {
            json_strings(text).map_err(|reason| {
                format!(
                    "is not a JSON array of strings ({reason}); write [\"/host:/guest\", ...] or \
                     comma-separated mappings such as /srv/data:/data:ro,/srv/out:/out"
                )
            })?
        } else if text.starts_with('{') {
            return Err(
                "is a JSON object, not a list of mappings; write comma-separated \
                        mappings such as /srv/data:/data:ro,/srv/out:/out"
                    .to_owned(),
            );
        } else {
            text.split(',').map(|item| item.trim().to_owned()).collect()
        };
        let mut volumes: Vec<VolumeMapping> = Vec::new();
        let mut problems = Vec::new();
        for (index, item) in items.iter().enumerate() {
            if item.is_empty() {
                continue;
            }
            match VolumeMapping::parse(item) {
                Ok(volume) => {
                    if volumes.iter().any(|v| v.guest == volume.guest) {
                        problems.push(format!(
                            "mapping {} maps {} a second time",
                            index + 1,
                            volume.guest.display()
                        ));
                    } else {
                        volumes.push(volume);
                    }
                }
                Err(error) => problems.push(format!("mapping {}: {error}", index + 1)),
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "{}; write each mapping as /host/dir:/guest/dir, or /host/dir:/guest/dir:ro for \
                 read-only, separated by commas",
                problems.join("; ")
            ));
        }
        Ok(Volumes(volumes))
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|volume| {
                format!(
                    "{}:{}{}",
                    volume.host.display(),
                    volume.guest.display(),
                    if volume.read_only { ":ro" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Value for HostList {
    fn kind() -> String {
        "comma-separated `HOST` or `HOST:PORT`".to_owned()
    }

    fn parse(text: &str) -> Result<HostList, String> {
        let mut hosts = Vec::new();
        let mut problems = Vec::new();
        for entry in text.split(',').map(str::trim) {
            match host_entry(entry) {
                Ok(()) => hosts.push(entry.to_owned()),
                Err(problem) if !problems.contains(&problem) => problems.push(problem),
                Err(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "{}; list host names or IP addresses, each with an optional :PORT, separated by \
                 commas, such as msbd.example.com,192.0.2.10:8765",
                problems.join("; ")
            ));
        }
        Ok(HostList(hosts))
    }

    fn describe(&self) -> String {
        self.0.join(",")
    }
}

impl Value for OriginList {
    fn kind() -> String {
        "comma-separated origins (`http[s]://HOST[:PORT]`) or `null`".to_owned()
    }

    fn parse(text: &str) -> Result<OriginList, String> {
        let mut origins = Vec::new();
        let mut problems = Vec::new();
        for entry in text.split(',').map(str::trim) {
            match origin_entry(entry) {
                Ok(origin) => origins.push(origin),
                Err(problem) if !problems.contains(&problem) => problems.push(problem),
                Err(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "{}; list origins as browsers send them (a scheme and a host, with the port \
                 unless it is the scheme's default), separated by commas, such as \
                 https://app.example.com,http://localhost:3000, or null",
                problems.join("; ")
            ));
        }
        Ok(OriginList(origins))
    }

    fn describe(&self) -> String {
        self.0.join(",")
    }
}

/// Checks one entry of `MSB_HTTP_ALLOWED_HOSTS`: `HOST` or `HOST:PORT` (an IPv6 address in
/// brackets, or bare without a port). The problem names the entry.
fn host_entry(entry: &str) -> Result<(), String> {
    if entry.is_empty() {
        return Err("an entry is empty (two commas?)".to_owned());
    }
    let named = quoted(entry);
    if entry.contains(char::is_whitespace) {
        return Err(format!("the entry {named} holds spaces"));
    }
    if let Some((scheme, rest)) = entry.split_once("://") {
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = if host.is_empty() {
            "msbd.example.com"
        } else {
            host
        };
        return Err(format!(
            "the entry {named} has a scheme ({scheme}://): give only the host, such as {}",
            quoted(host)
        ));
    }
    if let Some(at) = entry.find(['/', '?', '#']) {
        let host = &entry[..at];
        let host = if host.is_empty() {
            "msbd.example.com"
        } else {
            host
        };
        return Err(format!(
            "the entry {named} has a path: give only the host, such as {}",
            quoted(host)
        ));
    }
    if entry.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok(());
    }
    authority(entry, false).map_err(|reason| format!("the entry {named} {reason}"))
}

/// Checks one entry of `MSB_HTTP_ALLOWED_ORIGINS`: `http://` or `https://`, a host and an
/// optional port (`:*` for any), or `null`; answers it without a trailing `/`. The problem
/// names the entry.
fn origin_entry(entry: &str) -> Result<String, String> {
    if entry.is_empty() {
        return Err("an entry is empty (two commas?)".to_owned());
    }
    let named = quoted(entry);
    if entry.contains(char::is_whitespace) {
        return Err(format!("the entry {named} holds spaces"));
    }
    if entry.eq_ignore_ascii_case("null") {
        return Ok("null".to_owned());
    }
    let lower = entry.to_ascii_lowercase();
    let scheme_len = if lower.starts_with("http://") {
        "http://".len()
    } else if lower.starts_with("https://") {
        "https://".len()
    } else if let Some((scheme, _)) = entry.split_once("://") {
        return Err(format!(
            "the entry {named} has the scheme {scheme}://; an origin is http:// or https://"
        ));
    } else {
        return Err(format!(
            "the entry {named} has no scheme; write it as browsers send it, such as {}",
            quoted(&format!("https://{entry}"))
        ));
    };
    // The scheme is ASCII, so `scheme_len` is a character boundary of `entry` too.
    let (scheme, rest) = entry.split_at(scheme_len);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if let Some(at) = rest.find(['/', '?', '#']) {
        return Err(format!(
            "the entry {named} has a path; an origin is only a scheme, a host and a port, such \
             as {}",
            quoted(&format!("{scheme}{}", &rest[..at]))
        ));
    }
    authority(rest, true).map_err(|reason| format!("the entry {named} {reason}"))?;
    Ok(format!("{scheme}{rest}"))
}

/// Checks `HOST` or `HOST:PORT`: a name, an IPv4 address or an IPv6 address in brackets, and a
/// port from 1 to 65535 (or `*` when `any_port`). The reason follows the entry's name.
fn authority(text: &str, any_port: bool) -> Result<(), String> {
    if text.is_empty() {
        return Err("names no host".to_owned());
    }
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err("has a [ without its ]".to_owned());
        };
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!(
                "has {inside:?} in brackets, which is not an IPv6 address"
            ));
        }
        match after.strip_prefix(':') {
            Some(port) => (inside, Some(port)),
            None if after.is_empty() => (inside, None),
            None => return Err("has text after the ] that is not a :PORT".to_owned()),
        }
    } else {
        match text.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err(
                    "has more than one `:`; write an IPv6 address in brackets, such as \
                     [2001:db8::1]:8765"
                        .to_owned(),
                );
            }
            Some((host, port)) => {
                if host.is_empty() {
                    return Err("names no host".to_owned());
                }
                (host, Some(port))
            }
            None => (text, None),
        }
    };
    if host.contains('*') {
        return Err("has a wildcard, which is not supported: list each name".to_owned());
    }
    if !text.starts_with('[')
        && !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err("is not a host name or IP address".to_owned());
    }
    match port {
        None => Ok(()),
        Some("*") if any_port => Ok(()),
        Some(port) => {
            let valid = !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_ok_and(|port| port > 0);
            if valid {
                Ok(())
            } else {
                Err(format!(
                    "has the port {}, which is not a number from 1 to 65535",
                    quoted(port)
                ))
            }
        }
    }
}

/// Parses a JSON array of strings (the one JSON form `MSB_SHARED_VOLUME_PATH` accepts).
fn json_strings(text: &str) -> Result<Vec<String>, String> {
    let mut chars = text.trim().chars().peekable();
    let skip_whitespace = |chars: &mut std::iter::Peekable<std::str::Chars<'_>>| {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
    };
    if chars.next() != Some('[') {
        return Err("it does not start with [".to_owned());
    }
    let mut items = Vec::new();
    skip_whitespace(&mut chars);
    if chars.next_if_eq(&']').is_none() {
        loop {
            skip_whitespace(&mut chars);
            if chars.next() != Some('"') {
                return Err("each item must be a string in double quotes".to_owned());
            }
            let mut item = String::new();
            loop {
                match chars.next() {
                    None => return Err("a string is not closed".to_owned()),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('"') => item.push('"'),
                        Some('\\') => item.push('\\'),
                        Some('/') => item.push('/'),
                        Some('b') => item.push('\u{8}'),
                        Some('f') => item.push('\u{c}'),
                        Some('n') => item.push('\n'),
                        Some('r') => item.push('\r'),
                        Some('t') => item.push('\t'),
                        Some('u') => {
                            let hex: String = chars.by_ref().take(4).collect();
                            let code = u32::from_str_radix(&hex, 16)
                                .ok()
                                .filter(|_| hex.len() == 4)
                                .and_then(char::from_u32)
                                .ok_or_else(|| format!("\\u{hex} is not a character"))?;
                            item.push(code);
                        }
                        _ => return Err("a string has an unknown escape".to_owned()),
                    },
                    Some(c) => item.push(c),
                }
            }
            items.push(item);
            skip_whitespace(&mut chars);
            match chars.next() {
                Some(',') => {}
                Some(']') => break,
                _ => return Err("items must be separated by commas and end with ]".to_owned()),
            }
        }
    }
    skip_whitespace(&mut chars);
    if chars.next().is_some() {
        return Err("there is text after the closing ]".to_owned());
    }
    Ok(items)
}

/// A closed set of names, for the enums a variable chooses from.
trait Named: Copy + PartialEq + 'static {
    /// Each value and its name (lower case), in the order the reference lists them.
    const CHOICES: &'static [(&'static str, Self)];
}

impl Named for Transport {
    const CHOICES: &'static [(&'static str, Transport)] =
        &[("stdio", Transport::Stdio), ("http", Transport::Http)];
}

impl Named for LogFormat {
    const CHOICES: &'static [(&'static str, LogFormat)] =
        &[("text", LogFormat::Text), ("json", LogFormat::Json)];
}

impl Named for BackendChoice {
    const CHOICES: &'static [(&'static str, BackendChoice)] = &[
        ("local", BackendChoice::Local),
        ("microsandbox", BackendChoice::Microsandbox),
    ];
}

impl Named for Isolation {
    const CHOICES: &'static [(&'static str, Isolation)] = &[
        ("strongest", Isolation::Strongest),
        ("strong", Isolation::Strong),
        ("standard", Isolation::Standard),
        ("off", Isolation::Off),
    ];
}

impl Named for Flavor {
    const CHOICES: &'static [(&'static str, Flavor)] = &[
        ("small", Flavor::Small),
        ("medium", Flavor::Medium),
        ("large", Flavor::Large),
    ];
}

fn name_of<T: Named>(value: T) -> &'static str {
    T::CHOICES
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("?", |(name, _)| *name)
}

fn parse_choice<T: Named>(text: &str) -> Result<T, String> {
    let wanted = text.trim().to_ascii_lowercase();
    T::CHOICES
        .iter()
        .find(|(name, _)| *name == wanted)
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let names: Vec<&str> = T::CHOICES.iter().map(|(name, _)| *name).collect();
            format!(
                "is not one of the choices; use one of: {}",
                names.join(", ")
            )
        })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::time::Duration;

    use sandbox_wrapper::backend::local::{IsolationLevel, IsolationMode};
    use sandbox_wrapper::backend::{Flavor, VolumeMapping};
    use sandbox_wrapper::output::DEFAULT_OUTPUT_CAP;
    use sandbox_wrapper::wrapper::BackendKind;

    use super::{
        BackendChoice, ConfigError, Database, Isolation, Loaded, LogFormat, Overrides,
        REGENERATE_DOCS, Source, Transport, VARIABLES, load, markdown_reference, pick_listen_addr,
        render,
    };

    const HOME: (&str, &str) = ("HOME", "/home/ada");

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    /// Loads `pairs` (with HOME set) and no flags; panics with the errors if it fails.
    fn ok(pairs: &[(&str, &str)]) -> Loaded {
        ok_with(pairs, &Overrides::default())
    }

    fn ok_with(pairs: &[(&str, &str)], overrides: &Overrides) -> Loaded {
        let mut all = vec![HOME];
        all.extend_from_slice(pairs);
        match load(vars(&all), overrides) {
            Ok(loaded) => loaded,
            Err(errors) => panic!("expected a valid configuration, got: {errors}"),
        }
    }

    /// Loads `pairs` (with HOME set), expecting errors; returns them.
    fn errors(pairs: &[(&str, &str)]) -> Vec<ConfigError> {
        errors_with(pairs, &Overrides::default())
    }

    fn errors_with(pairs: &[(&str, &str)], overrides: &Overrides) -> Vec<ConfigError> {
        let mut all = vec![HOME];
        all.extend_from_slice(pairs);
        match load(vars(&all), overrides) {
            Ok(loaded) => panic!("expected errors, got:\n{}", render(&loaded)),
            Err(errors) => errors.errors,
        }
    }

    /// Exactly one error, about `variable`; returns its message.
    fn one_error(pairs: &[(&str, &str)], variable: &str) -> String {
        let errors = errors(pairs);
        assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
        assert_eq!(errors[0].variable, variable, "{errors:#?}");
        errors[0].message.clone()
    }

    #[test]
    fn defaults_with_an_empty_environment() {
        let loaded = ok(&[]);
        let c = &loaded.config;
        assert_eq!(c.transport, Transport::Stdio);
        assert_eq!(c.http_addr, "127.0.0.1:8765".parse::<SocketAddr>().unwrap());
        assert!(c.auth_token.is_none());
        assert_eq!(c.max_request_bytes, 4 * 1024 * 1024);
        assert!(c.http_allowed_hosts.is_empty());
        assert!(c.http_allowed_origins.is_empty());
        assert!(c.supervision_tools, "on for stdio by default");
        assert_eq!(c.log_level, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.data_dir, PathBuf::from("/home/ada/.local/share/msbd"));
        assert_eq!(
            c.database,
            Database::Sqlite {
                path: PathBuf::from("/home/ada/.local/share/msbd/tasks.sqlite3")
            }
        );
        assert_eq!(c.task_retention, Some(Duration::from_secs(604_800)));
        assert_eq!(c.max_concurrent_tasks, 4);
        assert_eq!(c.execution_timeout, Duration::from_secs(300));
        assert_eq!(c.task_types_file, None);
        assert_eq!(c.output_cap_bytes, DEFAULT_OUTPUT_CAP);
        assert_eq!(c.backend, BackendChoice::Local);
        assert_eq!(c.isolation, Isolation::Strongest);
        assert_eq!(c.server_url, "http://127.0.0.1:5555");
        assert!(c.api_key.is_none());
        assert_eq!(c.sandbox_start_timeout, Duration::from_secs(180));
        assert_eq!(c.default_flavor, Flavor::Small);
        assert!(c.volumes.is_empty());
        assert_eq!(c.session_timeout, Duration::from_secs(1800));
        assert_eq!(c.cleanup_interval, Duration::from_secs(60));
        assert_eq!(c.max_sessions, 10);
        assert_eq!(c.max_total_memory_mb, None);
        assert!(c.lru_eviction);
        assert_eq!(c.orphan_cleanup_interval, Duration::from_secs(600));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert_eq!(loaded.sources.len(), VARIABLES.len());
        assert!(loaded.sources.values().all(|s| *s == Source::Default));
    }

    #[test]
    fn the_data_directory_follows_xdg_then_home_then_the_current_directory() {
        let loaded = ok(&[("XDG_DATA_HOME", "/data/xdg")]);
        assert_eq!(loaded.config.data_dir, PathBuf::from("/data/xdg/msbd"));
        // A relative XDG_DATA_HOME is invalid by the specification and ignored.
        let loaded = ok(&[("XDG_DATA_HOME", "relative")]);
        assert_eq!(
            loaded.config.data_dir,
            PathBuf::from("/home/ada/.local/share/msbd")
        );
        let loaded = load(Vec::new(), &Overrides::default()).unwrap();
        assert_eq!(loaded.config.data_dir, PathBuf::from("./msbd-data"));
        assert_eq!(
            loaded.config.database,
            Database::Sqlite {
                path: PathBuf::from("./msbd-data/tasks.sqlite3")
            }
        );
        assert!(
            loaded.warnings[0].contains("MSB_DATA_DIR"),
            "{:?}",
            loaded.warnings
        );
        let loaded = ok(&[("MSB_DATA_DIR", "/srv/msbd")]);
        assert_eq!(loaded.config.data_dir, PathBuf::from("/srv/msbd"));
        assert_eq!(loaded.sources["MSB_DATA_DIR"], Source::Environment);
        assert_eq!(
            loaded.config.database.url(),
            "sqlite:///srv/msbd/tasks.sqlite3"
        );
    }

    #[test]
    fn every_variable_is_read_from_the_environment() {
        let loaded = ok(&[
            ("MSB_TRANSPORT", "HTTP"),
            ("MSB_HTTP_ADDR", "0.0.0.0:9000"),
            ("MSB_AUTH_TOKEN", "0123456789abcdef0123"),
            ("MSB_MAX_REQUEST_BYTES", "65536"),
            ("MSB_HTTP_ALLOWED_HOSTS", "msbd.example.com,10.0.0.5:9000"),
            ("MSB_HTTP_ALLOWED_ORIGINS", "https://app.example.com"),
            ("MSB_SUPERVISION_TOOLS", "yes"),
            ("MSB_LOG_LEVEL", "info,msbd=debug"),
            ("MSB_LOG_FORMAT", "json"),
            ("MSB_SHUTDOWN_TIMEOUT", "5"),
            ("MSB_DATA_DIR", "/srv/msbd"),
            ("MSB_DATABASE_URL", "sqlite:///var/lib/tasks.db"),
            ("MSB_DATABASE_SCHEMA", "queue_2"),
            ("MSB_NODE_ID", "worker-2.example"),
            ("MSB_TASK_RETENTION", "0"),
            ("MSB_SQLITE_CACHE_MB", "8"),
            ("MSB_MAX_CONCURRENT_TASKS", "32"),
            ("MSB_EXECUTION_TIMEOUT", "60"),
            ("MSB_LEASE_TIMEOUT", "12"),
            ("MSB_TASK_TYPES_FILE", "/etc/msbd/types.toml"),
            ("MSB_OUTPUT_CAP_BYTES", "1024"),
            ("MSB_SANDBOX_BACKEND", "microsandbox"),
            ("MSB_ISOLATION", "strongest"),
            ("MSB_SANDBOX_DIR", "/srv/msbd-sandboxes"),
            ("MSB_SERVER_URL", "http://10.0.0.5:5555/"),
            ("MSB_API_KEY", "key-123"),
            ("MSB_SANDBOX_START_TIMEOUT", "300.0"),
            ("MSB_DEFAULT_FLAVOR", " Large "),
            ("MSB_SHARED_VOLUME_PATH", "/srv/in:/in,/srv/out:/out"),
            ("MSB_SESSION_TIMEOUT", "3600"),
            ("MSB_CLEANUP_INTERVAL", "120"),
            ("MSB_MAX_SESSIONS", "20"),
            ("MSB_MAX_TOTAL_MEMORY_MB", "8192"),
            ("MSB_ENABLE_LRU_EVICTION", "off"),
            ("MSB_ORPHAN_CLEANUP_INTERVAL", "900"),
        ]);
        let c = &loaded.config;
        assert_eq!(c.sandbox_dir, Some(PathBuf::from("/srv/msbd-sandboxes")));
        assert_eq!(c.transport, Transport::Http);
        assert_eq!(c.http_addr, "0.0.0.0:9000".parse::<SocketAddr>().unwrap());
        assert_eq!(
            c.auth_token.as_ref().unwrap().expose(),
            "0123456789abcdef0123"
        );
        assert_eq!(c.max_request_bytes, 65536);
        assert_eq!(c.http_allowed_hosts, ["msbd.example.com", "10.0.0.5:9000"]);
        assert_eq!(c.http_allowed_origins, ["https://app.example.com"]);
        assert!(c.supervision_tools);
        assert_eq!(c.log_level, "info,msbd=debug");
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.data_dir, PathBuf::from("/srv/msbd"));
        assert_eq!(
            c.database,
            Database::Sqlite {
                path: PathBuf::from("/var/lib/tasks.db")
            }
        );
        assert_eq!(c.database_schema, "queue_2");
        assert_eq!(c.node_id, "worker-2.example");
        assert_eq!(c.task_retention, None);
        assert_eq!(c.sqlite_cache_mb, 8);
        assert_eq!(c.max_concurrent_tasks, 32);
        assert_eq!(c.execution_timeout, Duration::from_secs(60));
        assert_eq!(c.lease_timeout, Duration::from_secs(12));
        assert_eq!(
            c.task_types_file,
            Some(PathBuf::from("/etc/msbd/types.toml"))
        );
        assert_eq!(c.output_cap_bytes, 1024);
        assert_eq!(c.backend, BackendChoice::Microsandbox);
        assert_eq!(c.server_url, "http://10.0.0.5:5555");
        assert_eq!(c.api_key.as_ref().unwrap().expose(), "key-123");
        assert_eq!(c.sandbox_start_timeout, Duration::from_secs(300));
        assert_eq!(c.default_flavor, Flavor::Large);
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.session_timeout, Duration::from_secs(3600));
        assert_eq!(c.cleanup_interval, Duration::from_secs(120));
        assert_eq!(c.max_sessions, 20);
        assert_eq!(c.max_total_memory_mb, Some(8192));
        assert!(!c.lru_eviction);
        assert_eq!(c.orphan_cleanup_interval, Duration::from_secs(900));
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        assert!(loaded.sources.values().all(|s| *s == Source::Environment));
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let loaded = ok(&[("MSB_SESSION_TIMEOUT", ""), ("MSB_API_KEY", "  ")]);
        assert_eq!(loaded.config.session_timeout, Duration::from_secs(1800));
        assert!(loaded.config.api_key.is_none());
        assert_eq!(loaded.sources["MSB_SESSION_TIMEOUT"], Source::Default);
    }

    #[test]
    fn each_kind_of_bad_value_is_an_error_that_names_its_variable() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "MSB_SESSION_TIMEOUT",
                "abc",
                "is not a whole number of seconds",
            ),
            ("MSB_SESSION_TIMEOUT", "30m", "without a unit"),
            ("MSB_SESSION_TIMEOUT", "-5", "must not be negative"),
            ("MSB_SESSION_TIMEOUT", "2.5", "whole seconds"),
            (
                "MSB_SESSION_TIMEOUT",
                "99999999999999999999999",
                "too large",
            ),
            ("MSB_SESSION_TIMEOUT", "0", "must be at least 1 second"),
            (
                "MSB_SESSION_TIMEOUT",
                "31536001",
                "at most 31536000 seconds",
            ),
            ("MSB_MAX_SESSIONS", "0", "must be at least 1"),
            ("MSB_MAX_SESSIONS", "ten", "is not a whole number"),
            ("MSB_MAX_CONCURRENT_TASKS", "0", "must be at least 1"),
            ("MSB_MAX_REQUEST_BYTES", "10", "must be at least 1024"),
            ("MSB_OUTPUT_CAP_BYTES", "0", "must be at least 1"),
            ("MSB_MAX_TOTAL_MEMORY_MB", "0", "must be at least 1"),
            ("MSB_EXECUTION_TIMEOUT", "0", "must be at least 1 second"),
            ("MSB_SHUTDOWN_TIMEOUT", "0", "must be at least 1 second"),
            ("MSB_LEASE_TIMEOUT", "2", "must be at least 3 seconds"),
            ("MSB_LEASE_TIMEOUT", "3601", "at most 3600 seconds; set"),
            (
                "MSB_ORPHAN_CLEANUP_INTERVAL",
                "0",
                "must be at least 1 second",
            ),
            (
                "MSB_SANDBOX_START_TIMEOUT",
                "0",
                "must be at least 1 second",
            ),
            (
                "MSB_TASK_RETENTION",
                "x",
                "is not a whole number of seconds",
            ),
            ("MSB_ENABLE_LRU_EVICTION", "maybe", "use true or false"),
            ("MSB_SUPERVISION_TOOLS", "sometimes", "use true or false"),
            (
                "MSB_DEFAULT_FLAVOR",
                "huge",
                "use one of: small, medium, large",
            ),
            ("MSB_TRANSPORT", "websocket", "use one of: stdio, http"),
            ("MSB_LOG_FORMAT", "xml", "use one of: text, json"),
            (
                "MSB_SANDBOX_BACKEND",
                "docker",
                "use one of: local, microsandbox",
            ),
            (
                "MSB_ISOLATION",
                "weak",
                "use one of: strongest, strong, standard, off",
            ),
            ("MSB_HTTP_ADDR", "8765", "is not an address and port"),
            ("MSB_HTTP_ADDR", "localhost:99999", "has no valid port"),
            ("MSB_HTTP_ADDR", "::1:8765", "goes in brackets"),
            (
                "MSB_HTTP_ADDR",
                "no-such-host.invalid:8765",
                "could not be resolved",
            ),
            ("MSB_SERVER_URL", "127.0.0.1:5555", "is not an http:// URL"),
            ("MSB_SERVER_URL", "http://", "has no host"),
            ("MSB_LOG_LEVEL", "infp", "is not a level"),
            ("MSB_LOG_LEVEL", "WARNING", "Python's WARNING is warn here"),
            ("MSB_LOG_LEVEL", "msbd=loud", "not TARGET=LEVEL"),
            (
                "MSB_DATABASE_URL",
                "mysql://db/tasks",
                "\"mysql\" is not supported",
            ),
            ("MSB_SHARED_VOLUME_PATH", "/a", "is not `host:guest`"),
        ];
        for (name, value, expected) in cases {
            let message = one_error(&[(name, value)], name);
            assert!(
                message.starts_with(&format!("{name}=")),
                "{name}={value}: the message does not start with the variable: {message}"
            );
            assert!(
                message.contains(expected),
                "{name}={value}: expected {expected:?} in: {message}"
            );
        }
    }

    #[test]
    fn a_value_with_spaces_is_quoted_in_the_message() {
        let message = one_error(&[("MSB_MAX_SESSIONS", "1 0")], "MSB_MAX_SESSIONS");
        assert!(
            message.starts_with("MSB_MAX_SESSIONS=\"1 0\": "),
            "{message}"
        );
    }

    #[test]
    fn every_error_is_reported_not_only_the_first() {
        let errors = errors(&[
            ("MSB_SESSION_TIMEOUT", "abc"),
            ("MSB_MAX_SESSIONS", "0"),
            ("MSB_DEFAULT_FLAVOR", "huge"),
            ("MSB_TRANSPORT", "pigeon"),
            (
                "MSB_DATABASE_URL",
                "postgres://u:p@db/msbd?sslmode=sideways",
            ),
            ("MSB_HTTP_ADDR", "0.0.0.0:8765"),
        ]);
        let mut named: Vec<&str> = errors.iter().map(|e| e.variable).collect();
        named.sort_unstable();
        assert_eq!(
            named,
            [
                "MSB_DATABASE_URL",
                "MSB_DEFAULT_FLAVOR",
                "MSB_HTTP_ADDR",
                "MSB_MAX_SESSIONS",
                "MSB_SESSION_TIMEOUT",
                "MSB_TRANSPORT",
            ],
            "{errors:#?}"
        );
        let all = super::ConfigErrors {
            errors,
            warnings: Vec::new(),
        }
        .to_string();
        assert!(
            all.starts_with("invalid configuration (6 problems):"),
            "{all}"
        );
    }

    #[test]
    fn a_rule_is_not_checked_against_a_value_that_did_not_parse() {
        // MSB_SESSION_TIMEOUT is bad: "4000 must be below 1800" (the default) would mislead.
        let errors = errors(&[
            ("MSB_SESSION_TIMEOUT", "soon"),
            ("MSB_CLEANUP_INTERVAL", "4000"),
        ]);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].variable, "MSB_SESSION_TIMEOUT");
    }

    #[test]
    fn the_cleanup_interval_must_be_below_the_session_timeout() {
        let message = one_error(&[("MSB_CLEANUP_INTERVAL", "4000")], "MSB_CLEANUP_INTERVAL");
        assert!(
            message
                .starts_with("MSB_CLEANUP_INTERVAL=4000 must be below MSB_SESSION_TIMEOUT=1800: "),
            "{message}"
        );
        let message = one_error(
            &[
                ("MSB_CLEANUP_INTERVAL", "30"),
                ("MSB_SESSION_TIMEOUT", "30"),
            ],
            "MSB_CLEANUP_INTERVAL",
        );
        assert!(message.contains("MSB_SESSION_TIMEOUT=30"), "{message}");
        ok(&[
            ("MSB_CLEANUP_INTERVAL", "29"),
            ("MSB_SESSION_TIMEOUT", "30"),
        ]);
    }

    #[test]
    fn the_memory_limit_must_fit_one_session_of_the_default_flavor() {
        let message = one_error(
            &[
                ("MSB_MAX_TOTAL_MEMORY_MB", "2000"),
                ("MSB_DEFAULT_FLAVOR", "medium"),
            ],
            "MSB_MAX_TOTAL_MEMORY_MB",
        );
        assert!(message.contains("2048 MB"), "{message}");
        ok(&[
            ("MSB_MAX_TOTAL_MEMORY_MB", "2048"),
            ("MSB_DEFAULT_FLAVOR", "medium"),
        ]);
    }

    #[test]
    fn a_host_name_listens_on_what_it_resolves_to() {
        // localhost (from /etc/hosts, no DNS) is a loopback address: no token needed.
        let loaded = ok(&[("MSB_HTTP_ADDR", "localhost:8765")]);
        let addr = loaded.config.http_addr;
        assert_eq!(addr.port(), 8765);
        assert!(
            addr == SocketAddr::from(([127, 0, 0, 1], 8765))
                || addr == "[::1]:8765".parse().unwrap(),
            "{addr}"
        );
        // The flag takes a host name too, and wins over the environment.
        let overrides = Overrides {
            transport: Some(Transport::Http),
            listen: Some("localhost:9000".to_owned()),
            ..Overrides::default()
        };
        let loaded = ok_with(&[("MSB_HTTP_ADDR", "127.0.0.1:1")], &overrides);
        assert!(loaded.config.http_addr.ip().is_loopback());
        assert_eq!(loaded.config.http_addr.port(), 9000);
        assert_eq!(loaded.sources["MSB_HTTP_ADDR"], Source::Flag("--listen"));
        // A bad flag is an error that names the flag.
        let overrides = Overrides {
            listen: Some("localhost".to_owned()),
            ..Overrides::default()
        };
        let errors = load(vars(&[HOME]), &overrides).unwrap_err().errors;
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert_eq!(errors[0].variable, "MSB_HTTP_ADDR");
        assert!(
            errors[0]
                .message
                .contains("--listen localhost: is not an address and port"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn the_listen_address_of_a_name_prefers_ipv4_loopback() {
        let v4: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let v6: SocketAddr = "[::1]:1".parse().unwrap();
        let public: SocketAddr = "192.0.2.10:1".parse().unwrap();
        assert_eq!(pick_listen_addr([v6, v4]), Some(v4));
        assert_eq!(pick_listen_addr([public, v6]), Some(v6));
        assert_eq!(pick_listen_addr([public]), Some(public));
        assert_eq!(pick_listen_addr([]), None);
    }

    #[test]
    fn flags_override_the_environment_and_say_so() {
        let overrides = Overrides {
            transport: Some(Transport::Http),
            listen: Some("127.0.0.1:9999".parse().unwrap()),
            data_dir: Some(PathBuf::from("/flag/dir")),
            log_level: Some("debug".to_owned()),
        };
        let loaded = ok_with(
            &[
                ("MSB_TRANSPORT", "stdio"),
                ("MSB_HTTP_ADDR", "127.0.0.1:1"),
                ("MSB_DATA_DIR", "/env/dir"),
                ("MSB_LOG_LEVEL", "warn"),
            ],
            &overrides,
        );
        let c = &loaded.config;
        assert_eq!(c.transport, Transport::Http);
        assert_eq!(c.http_addr.port(), 9999);
        assert_eq!(c.data_dir, PathBuf::from("/flag/dir"));
        assert_eq!(c.log_level, "debug");
        // The default database follows the data directory the flag chose.
        assert_eq!(c.database.url(), "sqlite:///flag/dir/tasks.sqlite3");
        // Supervision tools default to off over HTTP.
        assert!(!c.supervision_tools);
        assert_eq!(loaded.sources["MSB_TRANSPORT"], Source::Flag("--transport"));
        assert_eq!(loaded.sources["MSB_HTTP_ADDR"], Source::Flag("--listen"));
        assert_eq!(loaded.sources["MSB_DATA_DIR"], Source::Flag("--data-dir"));
        assert_eq!(loaded.sources["MSB_LOG_LEVEL"], Source::Flag("--log-level"));
        let text = render(&loaded);
        assert!(
            text.contains("MSB_TRANSPORT=http  (flag --transport)\n"),
            "{text}"
        );
        assert!(
            text.contains("MSB_HTTP_ADDR=127.0.0.1:9999  (flag --listen)\n"),
            "{text}"
        );
    }

    #[test]
    fn a_flag_hides_a_bad_value_of_its_variable() {
        let overrides = Overrides {
            transport: Some(Transport::Stdio),
            ..Overrides::default()
        };
        ok_with(&[("MSB_TRANSPORT", "carrier-pigeon")], &overrides);
    }

    #[test]
    fn a_bad_flag_is_named_in_the_error() {
        let overrides = Overrides {
            log_level: Some("loud".to_owned()),
            listen: Some("0.0.0.0:8765".parse().unwrap()),
            transport: Some(Transport::Http),
            ..Overrides::default()
        };
        let errors = errors_with(&[], &overrides);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(
            errors[0].message.starts_with("--log-level loud: "),
            "{errors:#?}"
        );
        assert_eq!(errors[0].variable, "MSB_LOG_LEVEL");
        assert!(
            errors[1]
                .message
                .starts_with("--listen 0.0.0.0:8765 is not a loopback address"),
            "{errors:#?}"
        );
    }

    #[test]
    fn listening_off_loopback_requires_a_token() {
        for addr in ["0.0.0.0:8765", "[::]:8765", "192.168.1.10:8765"] {
            let message = one_error(&[("MSB_HTTP_ADDR", addr)], "MSB_HTTP_ADDR");
            assert!(
                message.starts_with(&format!("MSB_HTTP_ADDR={addr} is not a loopback address")),
                "{message}"
            );
            assert!(message.contains("MSB_AUTH_TOKEN"), "{message}");
            ok(&[
                ("MSB_HTTP_ADDR", addr),
                ("MSB_AUTH_TOKEN", "a-long-enough-random-token"),
            ]);
        }
        for addr in [
            "127.0.0.1:8765",
            "127.1.2.3:80",
            "[::1]:8765",
            "[::ffff:127.0.0.1]:8765",
        ] {
            ok(&[("MSB_HTTP_ADDR", addr)]);
        }
        let message = one_error(&[("MSB_AUTH_TOKEN", "short")], "MSB_AUTH_TOKEN");
        assert!(message.contains("shorter than 16"), "{message}");
        assert!(!message.contains("short:"), "the token leaked: {message}");
    }

    #[test]
    fn allowed_hosts_and_origins() {
        let hosts = |text: &str| {
            ok(&[("MSB_HTTP_ALLOWED_HOSTS", text)])
                .config
                .http_allowed_hosts
        };
        assert_eq!(
            hosts(" msbd.example.com , 192.0.2.10:8765,Example.COM,[2001:db8::1]:8765,fe80::1"),
            [
                "msbd.example.com",
                "192.0.2.10:8765",
                "Example.COM",
                "[2001:db8::1]:8765",
                "fe80::1",
            ]
        );
        assert_eq!(hosts("localhost:1,a:65535"), ["localhost:1", "a:65535"]);
        let origins = |text: &str| {
            ok(&[("MSB_HTTP_ALLOWED_ORIGINS", text)])
                .config
                .http_allowed_origins
        };
        assert_eq!(
            origins(
                "https://app.example.com, http://localhost:3000,NULL,http://[::1]:*,\
                 https://x.example/"
            ),
            [
                "https://app.example.com",
                "http://localhost:3000",
                "null",
                "http://[::1]:*",
                "https://x.example",
            ]
        );

        let loaded = ok(&[
            ("MSB_HTTP_ALLOWED_HOSTS", "a.example,b.example:80"),
            ("MSB_HTTP_ALLOWED_ORIGINS", "null"),
        ]);
        assert_eq!(
            loaded.sources["MSB_HTTP_ALLOWED_HOSTS"],
            Source::Environment
        );
        let text = render(&loaded);
        assert!(
            text.contains("MSB_HTTP_ALLOWED_HOSTS=a.example,b.example:80  (environment)\n"),
            "{text}"
        );
        assert!(
            text.contains("MSB_HTTP_ALLOWED_ORIGINS=null  (environment)\n"),
            "{text}"
        );
        let unset = render(&ok(&[]));
        assert!(
            unset.contains("MSB_HTTP_ALLOWED_HOSTS=(unset)  (default)\n"),
            "{unset}"
        );
        assert!(
            unset.contains("MSB_HTTP_ALLOWED_ORIGINS=(unset)  (default)\n"),
            "{unset}"
        );
    }

    #[test]
    fn each_kind_of_bad_host_or_origin_names_the_variable_and_the_entry() {
        let cases: &[(&str, &str, &str, &str)] = &[
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "a.example,,b.example",
                "",
                "an entry is empty",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "a.example,",
                "",
                "an entry is empty",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "a b.example",
                "\"a b.example\"",
                "holds spaces",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "http://msbd.example.com:8765/mcp",
                "http://msbd.example.com:8765/mcp",
                "give only the host, such as msbd.example.com:8765",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "msbd.example.com/mcp",
                "msbd.example.com/mcp",
                "has a path: give only the host",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "a.example:0",
                "a.example:0",
                "from 1 to 65535",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "a.example:65536",
                "a.example:65536",
                "from 1 to 65535",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "a.example:http",
                "a.example:http",
                "from 1 to 65535",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "a.example:",
                "a.example:",
                "from 1 to 65535",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "[::1]:99999",
                "[::1]:99999",
                "from 1 to 65535",
            ),
            ("MSB_HTTP_ALLOWED_HOSTS", ":8765", ":8765", "names no host"),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "*.example.com",
                "*.example.com",
                "wildcard",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "user@host",
                "user@host",
                "not a host name",
            ),
            ("MSB_HTTP_ALLOWED_HOSTS", "[::1", "[::1", "without its ]"),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "[nope]:80",
                "[nope]:80",
                "not an IPv6 address",
            ),
            (
                "MSB_HTTP_ALLOWED_HOSTS",
                "fe80::1:99999",
                "fe80::1:99999",
                "in brackets",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "https://a.example,,null",
                "",
                "an entry is empty",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "https://a b",
                "\"https://a b\"",
                "holds spaces",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "app.example.com",
                "app.example.com",
                "has no scheme; write it as browsers send it, such as https://app.example.com",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "ftp://app.example.com",
                "ftp://app.example.com",
                "an origin is http:// or https://",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "https://app.example.com/mcp",
                "https://app.example.com/mcp",
                "has a path; an origin is only a scheme, a host and a port, such as \
                 https://app.example.com",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "https://a.example?x=1",
                "https://a.example?x=1",
                "has a path",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "http://",
                "http://",
                "names no host",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "http://:3000",
                "http://:3000",
                "names no host",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "http://a.example:0",
                "http://a.example:0",
                "from 1 to 65535",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "http://::1",
                "http://::1",
                "in brackets",
            ),
            (
                "MSB_HTTP_ALLOWED_ORIGINS",
                "http://u@a.example",
                "http://u@a.example",
                "not a host name",
            ),
        ];
        for (name, value, entry, expected) in cases {
            let message = one_error(&[(name, value)], name);
            assert!(
                message.starts_with(&format!("{name}=")),
                "{name}={value}: the message does not start with the variable: {message}"
            );
            assert!(
                entry.is_empty() || message.contains(&format!("the entry {entry} ")),
                "{name}={value}: the message does not name the entry {entry}: {message}"
            );
            assert!(
                message.contains(expected),
                "{name}={value}: expected {expected:?} in: {message}"
            );
        }
        // Every bad entry is named, once.
        let message = one_error(
            &[(
                "MSB_HTTP_ALLOWED_HOSTS",
                "ok.example,http://a.example,b.example:0,,,",
            )],
            "MSB_HTTP_ALLOWED_HOSTS",
        );
        assert!(message.contains("the entry http://a.example "), "{message}");
        assert!(message.contains("the entry b.example:0 "), "{message}");
        assert_eq!(message.matches("an entry is empty").count(), 1, "{message}");
        assert!(!message.contains("the entry ok.example"), "{message}");
    }

    #[test]
    fn listening_off_loopback_without_allowed_hosts_is_warned_about() {
        const TOKEN: (&str, &str) = ("MSB_AUTH_TOKEN", "a-long-enough-random-token");
        let loaded = ok(&[("MSB_HTTP_ADDR", "0.0.0.0:8765"), TOKEN]);
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        let warning = &loaded.warnings[0];
        assert!(
            warning.starts_with("MSB_HTTP_ADDR=0.0.0.0:8765 is not a loopback address"),
            "{warning}"
        );
        assert!(warning.contains("refused with 403"), "{warning}");
        assert!(warning.contains("every client"), "{warning}");
        assert!(
            warning.contains("listed in MSB_HTTP_ALLOWED_HOSTS"),
            "{warning}"
        );
        let loaded = ok(&[("MSB_HTTP_ADDR", "192.168.1.10:8765"), TOKEN]);
        assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
        assert!(
            loaded.warnings[0].contains("other than the listen IP will be refused"),
            "{:?}",
            loaded.warnings
        );
        let overrides = Overrides {
            listen: Some("[::]:9000".parse().unwrap()),
            transport: Some(Transport::Http),
            ..Overrides::default()
        };
        let loaded = ok_with(&[TOKEN], &overrides);
        assert!(
            loaded.warnings[0].starts_with("--listen [::]:9000 is not a loopback address"),
            "{:?}",
            loaded.warnings
        );

        // Not when the hosts are listed, nor on loopback.
        let loaded = ok(&[
            ("MSB_HTTP_ADDR", "0.0.0.0:8765"),
            ("MSB_HTTP_ALLOWED_HOSTS", "msbd.example.com"),
            TOKEN,
        ]);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        for addr in ["127.0.0.1:8765", "[::1]:8765"] {
            let loaded = ok(&[("MSB_HTTP_ADDR", addr)]);
            assert!(loaded.warnings.is_empty(), "{addr}: {:?}", loaded.warnings);
        }
        // A bad MSB_HTTP_ALLOWED_HOSTS is an error, not also a warning that it is unset.
        let errors = load(
            vars(&[
                HOME,
                ("MSB_HTTP_ADDR", "0.0.0.0:8765"),
                ("MSB_HTTP_ALLOWED_HOSTS", "http://msbd.example.com"),
                TOKEN,
            ]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(errors.errors.len(), 1, "{errors:#?}");
        assert!(errors.warnings.is_empty(), "{:?}", errors.warnings);
    }

    #[test]
    fn secrets_never_appear_in_render_debug_or_errors() {
        let token = "TOKEN-0123456789-abcdef";
        let key = "APIKEY-9876543210";
        let loaded = ok(&[("MSB_AUTH_TOKEN", token), ("MSB_API_KEY", key)]);
        let text = render(&loaded);
        assert!(!text.contains(token) && !text.contains(key), "{text}");
        assert!(
            text.contains("MSB_AUTH_TOKEN=(set)  (environment)\n"),
            "{text}"
        );
        assert!(
            text.contains("MSB_API_KEY=(set)  (environment)\n"),
            "{text}"
        );
        let debug = format!("{:?}", loaded.config);
        assert!(!debug.contains(token) && !debug.contains(key), "{debug}");

        let unset = render(&ok(&[]));
        assert!(
            unset.contains("MSB_AUTH_TOKEN=(unset)  (default)\n"),
            "{unset}"
        );

        let bad = "secret with spaces 12345";
        let message = one_error(&[("MSB_AUTH_TOKEN", bad)], "MSB_AUTH_TOKEN");
        assert!(
            message.starts_with("MSB_AUTH_TOKEN (value not shown): "),
            "{message}"
        );
        assert!(!message.contains(bad), "{message}");
    }

    #[test]
    fn database_url_forms() {
        let path = |url: &str| match ok(&[("MSB_DATABASE_URL", url)]).config.database {
            Database::Sqlite { path } => path,
            other => panic!("{url}: {other:?}"),
        };
        assert_eq!(
            path("sqlite:///var/lib/msbd.db"),
            PathBuf::from("/var/lib/msbd.db")
        );
        assert_eq!(
            path("SQLITE:///var/lib/msbd.db"),
            PathBuf::from("/var/lib/msbd.db")
        );
        assert_eq!(path("sqlite://tasks.db"), PathBuf::from("tasks.db"));
        assert_eq!(path("sqlite:tasks.db"), PathBuf::from("tasks.db"));
        assert_eq!(path("/var/lib/msbd.db"), PathBuf::from("/var/lib/msbd.db"));
        assert_eq!(
            path("relative/tasks.db"),
            PathBuf::from("relative/tasks.db")
        );
        assert_eq!(path("/odd/na?me.db"), PathBuf::from("/odd/na?me.db"));

        for url in ["postgres://msbd:hunter2@db/msbd", "postgresql://db/msbd"] {
            let database = ok(&[("MSB_DATABASE_URL", url)]).config.database;
            assert_eq!(database, Database::Postgres { url: url.into() });
        }
        for (variable, value) in [
            ("MSB_NODE_ID", "two words"),
            ("MSB_NODE_ID", "x/y"),
            ("MSB_DATABASE_SCHEMA", "1queue"),
            ("MSB_DATABASE_SCHEMA", "msbd; drop table x"),
        ] {
            let message = one_error(&[(variable, value)], variable);
            assert!(message.contains("such as"), "{variable}={value}: {message}");
        }
        let message = one_error(
            &[("MSB_DATABASE_URL", "postgres://db/msbd?colour=blue")],
            "MSB_DATABASE_URL",
        );
        assert!(message.contains("not a PostgreSQL URL"), "{message}");
        let loaded = ok(&[(
            "MSB_DATABASE_URL",
            "postgres://msbd:hunter2@db/msbd?password=sesame&application_name=x",
        )]);
        let text = render(&loaded);
        assert!(
            !text.contains("hunter2") && !text.contains("sesame"),
            "{text}"
        );
        assert!(
            text.contains(
                "MSB_DATABASE_URL=postgres://msbd:***@db/msbd?password=***&application_name=x"
            ),
            "{text}"
        );
        for (url, expected) in [
            ("sqlite://", "names no file"),
            ("sqlite::memory:", "in-memory"),
            ("sqlite:///a.db?mode=rwc", "options"),
            ("mysql://db", "not supported"),
        ] {
            let message = one_error(&[("MSB_DATABASE_URL", url)], "MSB_DATABASE_URL");
            assert!(message.contains(expected), "{url}: {message}");
        }
    }

    #[test]
    fn volume_mappings() {
        let volumes = |text: &str| ok(&[("MSB_SHARED_VOLUME_PATH", text)]).config.volumes;
        let expected = vec![
            VolumeMapping {
                host: PathBuf::from("/srv/in"),
                guest: PathBuf::from("/in"),
                read_only: true,
            },
            VolumeMapping {
                host: PathBuf::from("/srv/out"),
                guest: PathBuf::from("/out"),
                read_only: false,
            },
        ];
        assert_eq!(volumes("/srv/in:/in:ro,/srv/out:/out"), expected);
        assert_eq!(volumes(" /srv/in:/in:ro , /srv/out:/out:rw ,"), expected);
        assert_eq!(volumes(r#"["/srv/in:/in:ro", "/srv/out:/out"]"#), expected);
        assert_eq!(volumes("[]"), Vec::new());

        let message = one_error(
            &[(
                "MSB_SHARED_VOLUME_PATH",
                "/ok:/ok,data:/data,/a:/b:rx,/c:/ok",
            )],
            "MSB_SHARED_VOLUME_PATH",
        );
        assert!(message.contains("mapping 2"), "{message}");
        assert!(message.contains("absolute"), "{message}");
        assert!(message.contains("mapping 3"), "{message}");
        assert!(
            message.contains("mapping 4 maps /ok a second time"),
            "{message}"
        );
        for (text, expected) in [
            (r#"["/a:/b""#, "not a JSON array"),
            (r#"[/a:/b]"#, "double quotes"),
            (r#"{"a": "/a:/b"}"#, "JSON object"),
        ] {
            let message = one_error(
                &[("MSB_SHARED_VOLUME_PATH", text)],
                "MSB_SHARED_VOLUME_PATH",
            );
            assert!(message.contains(expected), "{text}: {message}");
        }

        // The microsandbox backend has no read-only mounts.
        let message = one_error(
            &[
                ("MSB_SANDBOX_BACKEND", "microsandbox"),
                ("MSB_SHARED_VOLUME_PATH", "/srv/in:/in:ro"),
            ],
            "MSB_SHARED_VOLUME_PATH",
        );
        assert!(message.contains("/srv/in:/in:ro"), "{message}");
    }

    #[test]
    fn log_levels() {
        for level in [
            "info",
            "DEBUG",
            "warn",
            "off",
            "info,msbd=debug",
            "msbd::config=trace",
            "h2=off,info",
        ] {
            assert_eq!(ok(&[("MSB_LOG_LEVEL", level)]).config.log_level, level);
        }
    }

    #[test]
    fn a_named_isolation_level_is_required_and_strongest_requires_none() {
        for (value, required) in [
            ("strongest", None),
            ("strong", Some(IsolationLevel::Strong)),
            ("standard", Some(IsolationLevel::Standard)),
            ("off", None),
        ] {
            let loaded = ok(&[("MSB_ISOLATION", value)]);
            let wrapper = loaded.config.wrapper_config(None).unwrap();
            assert_eq!(wrapper.required_isolation, required, "{value}");
            assert_eq!(
                wrapper.isolation == IsolationMode::Off,
                value == "off",
                "{value}"
            );
        }
    }

    #[test]
    fn isolation_off_is_loudly_warned_about() {
        let loaded = ok(&[("MSB_ISOLATION", "off")]);
        assert_eq!(loaded.config.isolation, Isolation::Off);
        assert!(
            loaded.warnings.iter().any(|w| w.contains("NOT ISOLATED")),
            "{:?}",
            loaded.warnings
        );
    }

    #[test]
    fn microsandbox_settings_with_the_local_backend_are_warned_about() {
        let loaded = ok(&[("MSB_SERVER_URL", "http://10.0.0.5:5555")]);
        assert!(
            loaded
                .warnings
                .iter()
                .any(|w| w.contains("MSB_SANDBOX_BACKEND=microsandbox")),
            "{:?}",
            loaded.warnings
        );
        let message = one_error(
            &[
                ("MSB_SANDBOX_BACKEND", "microsandbox"),
                ("MSB_SERVER_URL", "https://msb.example"),
            ],
            "MSB_SERVER_URL",
        );
        assert!(message.contains("no TLS"), "{message}");
    }

    #[test]
    fn an_unknown_variable_is_a_warning_with_a_suggestion() {
        let loaded = ok(&[
            ("MSB_SESION_TIMEOUT", "10"),
            ("MSB_ZZZ", "1"),
            ("OTHER", "x"),
        ]);
        assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
        assert!(loaded.warnings[0].starts_with("MSB_SESION_TIMEOUT is not a variable"));
        assert!(loaded.warnings[0].contains("Did you mean MSB_SESSION_TIMEOUT?"));
        assert!(
            !loaded.warnings[1].contains("Did you mean"),
            "{:?}",
            loaded.warnings
        );
        // The lower-case spelling is not the variable (envy would lower-case it; msbd does not).
        let loaded = ok(&[("MSB_session_timeout", "10")]);
        assert_eq!(loaded.config.session_timeout, Duration::from_secs(1800));
        assert_eq!(loaded.warnings.len(), 1);
    }

    #[test]
    fn render_prints_one_line_per_variable() {
        let loaded = ok(&[("MSB_MAX_SESSIONS", "3")]);
        let text = render(&loaded);
        assert_eq!(text.lines().count(), VARIABLES.len());
        assert!(
            text.contains("MSB_MAX_SESSIONS=3  (environment)\n"),
            "{text}"
        );
        assert!(
            text.contains("MSB_SESSION_TIMEOUT=1800  (default)\n"),
            "{text}"
        );
        assert!(
            text.contains("MSB_MAX_TOTAL_MEMORY_MB=(unset)  (default)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "MSB_DATABASE_URL=sqlite:///home/ada/.local/share/msbd/tasks.sqlite3  (default)\n"
            ),
            "{text}"
        );
        // A control character in a value cannot fake a line.
        let text = render(&ok(&[("MSB_DATA_DIR", "/a\nMSB_API_KEY=(set)")]));
        assert_eq!(text.lines().count(), VARIABLES.len(), "{text}");
    }

    #[test]
    fn wrapper_config_maps_every_setting() {
        let loaded = ok(&[
            ("MSB_SANDBOX_BACKEND", "microsandbox"),
            ("MSB_API_KEY", "key"),
            ("MSB_SANDBOX_START_TIMEOUT", "240"),
            ("MSB_MAX_CONCURRENT_TASKS", "7"),
            ("MSB_TASK_RETENTION", "0"),
            ("MSB_SHARED_VOLUME_PATH", "/srv:/srv"),
            ("MSB_OUTPUT_CAP_BYTES", "4096"),
            ("MSB_LEASE_TIMEOUT", "6"),
        ]);
        let wrapper = loaded
            .config
            .wrapper_config(Some(PathBuf::from("/usr/bin/msbd")))
            .unwrap();
        assert_eq!(
            wrapper.data_dir,
            PathBuf::from("/home/ada/.local/share/msbd")
        );
        assert_eq!(wrapper.landlock_shim, Some(PathBuf::from("/usr/bin/msbd")));
        match &wrapper.backend {
            BackendKind::Microsandbox(m) => {
                assert_eq!(m.server_url, "http://127.0.0.1:5555");
                assert_eq!(m.api_key.as_deref(), Some("key"));
                assert_eq!(m.request_timeout, Duration::from_secs(240));
                assert_eq!(m.namespace, super::MICROSANDBOX_NAMESPACE);
                assert!(m.instance_marker.is_empty());
            }
            BackendKind::Local => panic!("expected the microsandbox backend"),
        }
        assert_eq!(wrapper.engine.concurrency, 7);
        assert_eq!(wrapper.engine.retention, None);
        assert_eq!(wrapper.engine.lease, Duration::from_secs(6));
        assert_eq!(wrapper.engine.heartbeat_interval, Duration::from_secs(2));
        assert_eq!(wrapper.engine.reaper_interval, Duration::from_millis(1200));
        assert_eq!(wrapper.volumes.len(), 1);
        assert_eq!(wrapper.output_cap, 4096);
        assert_eq!(wrapper.sessions.max_total_memory_mb, u64::MAX);
        assert_eq!(wrapper.sessions.session_timeout, Duration::from_secs(1800));
        assert_eq!(wrapper.sessions.default_flavor, Flavor::Small);
        assert!(wrapper.task_types.is_empty());

        let loaded = ok(&[
            ("MSB_ISOLATION", "off"),
            ("MSB_MAX_TOTAL_MEMORY_MB", "4096"),
        ]);
        let wrapper = loaded.config.wrapper_config(None).unwrap();
        assert!(matches!(wrapper.backend, BackendKind::Local));
        assert_eq!(wrapper.isolation, IsolationMode::Off);
        assert_eq!(wrapper.sessions.max_total_memory_mb, 4096);
    }

    #[test]
    fn wrapper_config_loads_the_task_types_file() {
        let dir = std::env::temp_dir().join(format!("msbd-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("types.toml");
        std::fs::write(
            &good,
            "[[task_type]]\nname = \"hello\"\ncommand = [\"echo\", \"{who}\"]\n",
        )
        .unwrap();
        let bad = dir.join("bad.toml");
        std::fs::write(
            &bad,
            "[[task_type]]\nname = \"command\"\ncommand = [\"true\"]\n",
        )
        .unwrap();
        let missing = dir.join("missing.toml");

        let config = |path: &PathBuf| ok(&[("MSB_TASK_TYPES_FILE", path.to_str().unwrap())]).config;
        let wrapper = config(&good).wrapper_config(None).unwrap();
        assert!(wrapper.task_types.contains("hello"));
        for path in [&bad, &missing] {
            let error = config(path).wrapper_config(None).unwrap_err();
            let message = error.to_string();
            assert!(message.starts_with("MSB_TASK_TYPES_FILE="), "{message}");
            assert!(message.contains(&*path.to_string_lossy()), "{message}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_value_makes_load_panic() {
        let values = [
            "",
            " ",
            "0",
            "-1",
            "1.5",
            "1e9",
            "18446744073709551616",
            "99999999999999999999999",
            "true",
            "[",
            "[\"",
            "[\"\\u12\"]",
            "{}",
            ":",
            "::",
            ":::",
            "/a:/b:ro:x",
            "é",
            "\u{7f}",
            "sqlite://",
            "postgres://",
            "http://",
            "https://x",
            "[::]:0",
            "a=b=c",
            ",,,",
            "=",
            "\\",
            "\"",
            "\u{0}",
        ];
        for variable in VARIABLES {
            for value in values {
                for overrides in [
                    Overrides::default(),
                    Overrides {
                        log_level: Some(value.to_owned()),
                        data_dir: Some(PathBuf::from(value)),
                        ..Overrides::default()
                    },
                ] {
                    let result = load(vars(&[(variable.name, value)]), &overrides);
                    if let Ok(loaded) = result {
                        let _ = render(&loaded);
                        let _ = loaded.config.wrapper_config(None);
                    }
                }
            }
        }
    }

    #[test]
    fn the_declarations_are_consistent() {
        let mut names = std::collections::BTreeSet::new();
        let mut flags = std::collections::BTreeSet::new();
        for variable in VARIABLES {
            assert!(
                names.insert(variable.name),
                "{} is declared twice",
                variable.name
            );
            // envy finds a variable by its field: the name without MSB_, lower-cased.
            assert_eq!(
                format!("MSB_{}", variable.field.to_uppercase()),
                variable.name,
                "the field of {} does not match its name",
                variable.name
            );
            assert!(
                !variable.doc_paragraph().is_empty(),
                "{} has no documentation",
                variable.name
            );
            if let Some(flag) = variable.flag {
                assert!(flags.insert(flag), "{flag} overrides two variables");
                assert!(flag.starts_with("--"), "{flag}");
            }
            let doc = variable.doc_paragraph();
            assert!(
                doc.ends_with('.'),
                "the documentation of {} is not a sentence: {doc}",
                variable.name
            );
        }
    }

    #[test]
    fn errors_come_in_declaration_order_with_the_warnings() {
        let result = load(
            vars(&[
                HOME,
                ("MSB_SESSION_TIMEOUT", "x"),
                ("MSB_TRANSPORT", "x"),
                ("MSB_DATA_DIR", " "),
                ("MSB_LOG_FORMAT", "x"),
                ("MSB_MAX_SESSONS", "3"),
            ]),
            &Overrides::default(),
        );
        let errors = result.unwrap_err();
        let named: Vec<&str> = errors.errors.iter().map(|e| e.variable).collect();
        assert_eq!(
            named,
            ["MSB_TRANSPORT", "MSB_LOG_FORMAT", "MSB_SESSION_TIMEOUT"]
        );
        assert_eq!(errors.warnings.len(), 1);
        assert!(errors.warnings[0].contains("Did you mean MSB_MAX_SESSIONS?"));
    }

    #[test]
    fn passwords_in_urls_are_hidden() {
        use super::hide_password;
        assert_eq!(
            hide_password("postgres://u:pw@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            hide_password("http://u:p:w@h:1/x?y=@"),
            "http://u:***@h:1/x?y=@"
        );
        assert_eq!(hide_password("http://u@h"), "http://u@h");
        assert_eq!(hide_password("http://h:1/a@b"), "http://h:1/a@b");
        assert_eq!(hide_password("/plain/path:x@y"), "/plain/path:x@y");
        let loaded = ok(&[("MSB_SERVER_URL", "http://user:sesame@10.0.0.1:5555")]);
        let text = render(&loaded);
        assert!(!text.contains("sesame"), "{text}");
        assert!(text.contains("MSB_SERVER_URL=http://user:***@10.0.0.1:5555  (environment)"));
    }

    #[test]
    fn docs_configuration_md_is_up_to_date() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = markdown_reference();
        assert!(
            on_disk == generated,
            "{} is not what the declarations in crates/msbd/src/config.rs generate; regenerate \
             it from the repository root with:\n    {REGENERATE_DOCS}",
            path.display()
        );
    }
}
