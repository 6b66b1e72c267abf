//! Turning the raw values into a [`Config`]: the range of each value, the rules that tie
//! values together, and the warnings about what is allowed but probably not meant.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sandbox_wrapper::network::{NetworkMode, NetworkSettingNames, NetworkSettings};

use super::declarations::{Defaults, Raw, defaults};
use super::render::{printable, quoted};
use super::values::{Count, DatabaseUrl, NodeName, PathValue, Seconds, host_name};
use super::{
    BackendChoice, Config, ConfigError, Database, Isolation, MAX_DURATION_SECS, MAX_LEASE_SECS,
    MAX_RETENTION_SECS, MIN_AUTH_TOKEN_LEN, MIN_LEASE_SECS, MIN_REQUEST_BYTES, Source, Transport,
    VARIABLES, default_of,
};

/// The errors found so far, and what is needed to word them.
pub(super) struct Check<'a> {
    pub(super) errors: Vec<ConfigError>,
    pub(super) sources: &'a BTreeMap<&'static str, Source>,
    /// Variables whose value did not parse: rules that involve them are not checked (the
    /// default in their place would make for a misleading message).
    pub(super) invalid: BTreeSet<&'static str>,
}

impl Check<'_> {
    /// Records a problem with `variable`; the rules that involve it are then not checked.
    pub(super) fn fail(&mut self, variable: &'static str, message: String) {
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
pub(super) fn build(
    raw: Raw,
    check: &mut Check<'_>,
    warnings: &mut Vec<String>,
    xdg_data_home: Option<String>,
    home: Option<String>,
) -> Config {
    let d = defaults();
    let network = network_settings(&raw, &d, check);
    let transport = raw.transport.unwrap_or(d.transport).0;
    let http_addr = raw.http_addr.unwrap_or(d.http_addr).0;
    let auth_token = raw.auth_token;
    let operator_token = raw.operator_token;
    let console_addr = raw.console_addr.map(|addr| addr.0);
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
    let call_wait = raw.call_wait.unwrap_or(d.call_wait);
    let call_wait = check.seconds("MSB_CALL_WAIT", call_wait, 1, 3600);
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
    let max_file_bytes = raw.max_file_bytes.unwrap_or(d.max_file_bytes);
    let max_file_bytes = check.count("MSB_MAX_FILE_BYTES", max_file_bytes, 1024) as u64;

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

    if let Some(token) = &operator_token {
        if token.expose().chars().count() < MIN_AUTH_TOKEN_LEN {
            check.fail(
                "MSB_OPERATOR_TOKEN",
                format!(
                    "MSB_OPERATOR_TOKEN (value not shown) is shorter than {MIN_AUTH_TOKEN_LEN} \
                     characters, too easy to guess: use a random secret such as the output of \
                     `openssl rand -hex 32`"
                ),
            );
        } else if auth_token
            .as_ref()
            .is_some_and(|auth| auth.expose() == token.expose())
        {
            check.fail(
                "MSB_OPERATOR_TOKEN",
                "MSB_OPERATOR_TOKEN (value not shown) is the same as MSB_AUTH_TOKEN: the operator \
                 would be every client. Give the operator a secret of its own"
                    .to_owned(),
            );
        }
    }
    if let Some(addr) = console_addr {
        if !addr.ip().to_canonical().is_loopback()
            && auth_token.is_none()
            && operator_token.is_none()
            && check.usable(&["MSB_CONSOLE_ADDR"])
        {
            check.fail(
                "MSB_CONSOLE_ADDR",
                format!(
                    "{} is not a loopback address, and neither MSB_OPERATOR_TOKEN nor \
                     MSB_AUTH_TOKEN is set: anyone who can reach it could act on every task. Set \
                     MSB_OPERATOR_TOKEN to a random secret, or listen on 127.0.0.1:{}",
                    check.origin("MSB_CONSOLE_ADDR", &addr.to_string()),
                    addr.port()
                ),
            );
        }
        if transport == Transport::Http {
            warnings.push(format!(
                "MSB_CONSOLE_ADDR={addr} is not used with MSB_TRANSPORT=http: the web console is \
                 at /ui on MSB_HTTP_ADDR"
            ));
        }
    }
    Config {
        transport,
        http_addr,
        auth_token,
        operator_token,
        console_addr,
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
        call_wait: Duration::from_secs(call_wait),
        max_file_bytes,
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
        network,
        session_timeout: Duration::from_secs(session_timeout),
        cleanup_interval: Duration::from_secs(cleanup_interval),
        max_sessions,
        max_total_memory_mb,
        lru_eviction,
        orphan_cleanup_interval: Duration::from_secs(orphan_cleanup_interval),
    }
}

/// The warning for an `MSB_*` variable that is not declared, with the closest known name.
pub(super) fn unknown_warning(name: &str) -> String {
    let closest = VARIABLES
        .iter()
        .map(|variable| (strsim::levenshtein(name, variable.name), variable.name))
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

/// The network settings: the default policy must be one a caller could have (`allow` with
/// names to allow, `host` only where it is enabled).
fn network_settings(raw: &Raw, d: &Defaults, check: &mut Check<'_>) -> NetworkSettings {
    let mut hosts: HashMap<String, Vec<std::net::IpAddr>> = HashMap::new();
    for (name, address) in raw.network_hosts.clone().map(|m| m.0).unwrap_or_default() {
        hosts.entry(name).or_default().push(address);
    }
    let settings = NetworkSettings {
        default_mode: raw.network.unwrap_or(d.network).0.mode(),
        allow: raw.network_allow.clone().map(|r| r.0).unwrap_or_default(),
        caller_may_add: raw
            .network_caller_allow
            .clone()
            .map(|r| r.0)
            .unwrap_or_default(),
        host_allowed: raw.network_host.unwrap_or(d.network_host).0,
        private_allowed: raw.network_private.clone().map(|r| r.0).unwrap_or_default(),
        hosts,
        names: NetworkSettingNames {
            allow: "MSB_NETWORK_ALLOW".to_owned(),
            caller_allow: "MSB_NETWORK_CALLER_ALLOW".to_owned(),
            host: "MSB_NETWORK_HOST=true".to_owned(),
            private: "MSB_NETWORK_PRIVATE".to_owned(),
        },
    };
    if check.usable(&["MSB_NETWORK", "MSB_NETWORK_ALLOW", "MSB_NETWORK_HOST"])
        && let Err(problem) = settings.policy(None, &[])
    {
        let message = match settings.default_mode {
            NetworkMode::Host => "MSB_NETWORK=host, but MSB_NETWORK_HOST is false: set MSB_NETWORK_HOST=true to let sessions have the host's network, or choose MSB_NETWORK=none or allow".to_owned(),
            NetworkMode::Allow => "MSB_NETWORK=allow, but MSB_NETWORK_ALLOW lists no names: list what sessions may reach (pypi.org,.pythonhosted.org, say), or choose MSB_NETWORK=none".to_owned(),
            NetworkMode::None => problem,
        };
        check.fail("MSB_NETWORK", message);
    }
    settings
}
