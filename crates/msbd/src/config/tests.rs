//! The configuration's unit tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use sandbox_wrapper::backend::local::{IsolationLevel, IsolationMode};
use sandbox_wrapper::backend::{Flavor, VolumeMapping};
use sandbox_wrapper::network::NetworkMode;
use sandbox_wrapper::output::DEFAULT_OUTPUT_CAP;
use sandbox_wrapper::wrapper::BackendKind;

use super::values::pick_listen_addr;
use super::{
    BackendChoice, ConfigError, Database, Isolation, Loaded, LogFormat, Overrides, REGENERATE_DOCS,
    Source, Transport, VARIABLES, load, markdown_reference, render,
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
    assert_eq!(c.call_wait, Duration::from_secs(20));
    assert_eq!(c.max_file_bytes, 16 * 1024 * 1024);
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
        ("MSB_OPERATOR_TOKEN", "operator-0123456789abcdef"),
        ("MSB_CONSOLE_ADDR", "127.0.0.1:8766"),
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
        ("MSB_CALL_WAIT", "45"),
        ("MSB_LEASE_TIMEOUT", "12"),
        ("MSB_TASK_TYPES_FILE", "/etc/msbd/types.toml"),
        ("MSB_OUTPUT_CAP_BYTES", "1024"),
        ("MSB_MAX_FILE_BYTES", "2048"),
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
        ("MSB_NETWORK", "Allow"),
        (
            "MSB_NETWORK_ALLOW",
            "pypi.org, .pythonhosted.org,example.com:8080",
        ),
        ("MSB_NETWORK_CALLER_ALLOW", "*"),
        ("MSB_NETWORK_HOST", "true"),
        ("MSB_NETWORK_PRIVATE", "10.1.0.0/16,127.0.0.1:3141"),
        (
            "MSB_NETWORK_HOSTS",
            "mirror.internal=10.1.2.3,mirror.internal=10.1.2.4",
        ),
    ]);
    let c = &loaded.config;
    assert_eq!(c.network.default_mode, NetworkMode::Allow);
    assert_eq!(
        c.network
            .allow
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["pypi.org", ".pythonhosted.org", "example.com:8080"]
    );
    assert_eq!(c.network.caller_may_add.len(), 1);
    assert!(c.network.host_allowed);
    assert_eq!(c.network.private_allowed.len(), 2);
    assert_eq!(c.network.hosts["mirror.internal"].len(), 2);
    assert_eq!(c.sandbox_dir, Some(PathBuf::from("/srv/msbd-sandboxes")));
    assert_eq!(c.transport, Transport::Http);
    assert_eq!(c.http_addr, "0.0.0.0:9000".parse::<SocketAddr>().unwrap());
    assert_eq!(
        c.auth_token.as_ref().unwrap().expose(),
        "0123456789abcdef0123"
    );
    assert_eq!(
        c.operator_token.as_ref().unwrap().expose(),
        "operator-0123456789abcdef"
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
    assert_eq!(c.call_wait, Duration::from_secs(45));
    assert_eq!(c.lease_timeout, Duration::from_secs(12));
    assert_eq!(
        c.task_types_file,
        Some(PathBuf::from("/etc/msbd/types.toml"))
    );
    assert_eq!(c.output_cap_bytes, 1024);
    assert_eq!(c.max_file_bytes, 2048);
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
    assert_eq!(c.console_addr, Some("127.0.0.1:8766".parse().unwrap()));
    // The one warning: a console address is not used with the HTTP transport.
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(loaded.warnings[0].starts_with("MSB_CONSOLE_ADDR="));
    assert!(loaded.sources.values().all(|s| *s == Source::Environment));
}

#[test]
fn a_network_default_must_be_one_a_caller_could_have() {
    let message = one_error(&[("MSB_NETWORK", "allow")], "MSB_NETWORK");
    assert!(
        message.contains("MSB_NETWORK_ALLOW lists no names"),
        "{message}"
    );
    let message = one_error(&[("MSB_NETWORK", "host")], "MSB_NETWORK");
    assert!(message.contains("MSB_NETWORK_HOST=true"), "{message}");
    let message = one_error(&[("MSB_NETWORK", "open")], "MSB_NETWORK");
    assert!(message.contains("none"), "{message}");
    let message = one_error(
        &[("MSB_NETWORK_ALLOW", "pypi.org,10.0.0.1")],
        "MSB_NETWORK_ALLOW",
    );
    assert!(
        message.contains("10.0.0.1") && message.contains("address"),
        "{message}"
    );
    let message = one_error(
        &[("MSB_NETWORK_PRIVATE", "10.0.0.0/40")],
        "MSB_NETWORK_PRIVATE",
    );
    assert!(message.contains("prefix"), "{message}");
    let message = one_error(
        &[("MSB_NETWORK_HOSTS", "mirror=nowhere")],
        "MSB_NETWORK_HOSTS",
    );
    assert!(message.contains("not an IP address"), "{message}");
    // Allowed names with the default of none: callers opt in.
    let loaded = ok(&[("MSB_NETWORK_ALLOW", "pypi.org")]);
    assert_eq!(loaded.config.network.default_mode, NetworkMode::None);
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
        ("MSB_CALL_WAIT", "0", "must be at least 1 second"),
        ("MSB_CALL_WAIT", "3601", "at most 3600 seconds; set"),
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
        message.starts_with("MSB_CLEANUP_INTERVAL=4000 must be below MSB_SESSION_TIMEOUT=1800: "),
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
fn the_console_flag_wins_over_the_environment_and_a_bad_one_is_named() {
    let overrides = Overrides {
        console: Some("127.0.0.1:9100".to_owned()),
        ..Overrides::default()
    };
    let loaded = ok_with(&[("MSB_CONSOLE_ADDR", "127.0.0.1:1")], &overrides);
    assert_eq!(
        loaded.config.console_addr,
        Some(SocketAddr::from(([127, 0, 0, 1], 9100)))
    );
    assert_eq!(
        loaded.sources["MSB_CONSOLE_ADDR"],
        Source::Flag("--console")
    );
    let overrides = Overrides {
        console: Some("nowhere".to_owned()),
        ..Overrides::default()
    };
    let errors = load(vars(&[HOME]), &overrides).unwrap_err().errors;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].variable, "MSB_CONSOLE_ADDR");
    assert!(errors[0].to_string().contains("--console"), "{}", errors[0]);
}

#[test]
fn a_host_name_listens_on_what_it_resolves_to() {
    // localhost (from /etc/hosts, no DNS) is a loopback address: no token needed.
    let loaded = ok(&[("MSB_HTTP_ADDR", "localhost:8765")]);
    let addr = loaded.config.http_addr;
    assert_eq!(addr.port(), 8765);
    assert!(
        addr == SocketAddr::from(([127, 0, 0, 1], 8765)) || addr == "[::1]:8765".parse().unwrap(),
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
        console: None,
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
    // What rmcp and the http crate read differently from a host name is refused too.
    for (name, value, expected) in [
        (
            "MSB_HTTP_ALLOWED_HOSTS",
            "a!b.example",
            "is not a host name or IP address",
        ),
        (
            "MSB_HTTP_ALLOWED_ORIGINS",
            "http://a.example:80:*",
            "two ports",
        ),
        ("MSB_SERVER_URL", "http://a.example:5555?x=1", "query"),
        ("MSB_SERVER_URL", "http://a.example:99999", "not a URL"),
    ] {
        let message = one_error(&[(name, value)], name);
        assert!(message.contains(expected), "{name}={value}: {message}");
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
fn a_filter_that_tracing_refuses_is_an_error_not_a_fallback() {
    // Span filters were once left to tracing unchecked, and a bad one made msbd log at `info`.
    for level in ["info,msbd[span", "msbd[task]=loud", "info,=debug"] {
        let message = one_error(&[("MSB_LOG_LEVEL", level)], "MSB_LOG_LEVEL");
        assert!(message.contains("has the directive"), "{level}: {message}");
    }
    assert_eq!(
        ok(&[("MSB_LOG_LEVEL", "info,msbd[task]=debug")])
            .config
            .log_level,
        "info,msbd[task]=debug"
    );
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
    use super::render::hide_password;
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
    // The database URL is shown through url::Url, which keeps the rest as written.
    use super::render::url_without_password;
    assert_eq!(
        url_without_password("postgres://u:pw@h:5432/db?sslmode=disable&password=x"),
        "postgres://u:***@h:5432/db?sslmode=disable&password=***"
    );
    assert_eq!(
        url_without_password("postgresql://h/db"),
        "postgresql://h/db"
    );
    assert_eq!(url_without_password("not a url:x@y"), "not a url:x@y");
    let loaded = ok(&[("MSB_SERVER_URL", "http://user:sesame@10.0.0.1:5555")]);
    let text = render(&loaded);
    assert!(!text.contains("sesame"), "{text}");
    assert!(text.contains("MSB_SERVER_URL=http://user:***@10.0.0.1:5555  (environment)"));
}

#[test]
fn docs_configuration_md_is_up_to_date() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = markdown_reference();
    assert!(
        on_disk == generated,
        "{} is not what the declarations in crates/msbd/src/config/declarations.rs generate; regenerate \
         it from the repository root with:\n    {REGENERATE_DOCS}",
        path.display()
    );
}

#[test]
fn the_operator_token_is_long_and_its_own() {
    let message = one_error(&[("MSB_OPERATOR_TOKEN", "short")], "MSB_OPERATOR_TOKEN");
    assert!(message.contains("shorter than 16"), "{message}");
    let same = "the-same-token-0123456789";
    let message = one_error(
        &[("MSB_AUTH_TOKEN", same), ("MSB_OPERATOR_TOKEN", same)],
        "MSB_OPERATOR_TOKEN",
    );
    assert!(message.contains("same as MSB_AUTH_TOKEN"), "{message}");
    assert!(!message.contains(same), "the secret is printed: {message}");
}

#[test]
fn a_console_beyond_loopback_needs_a_token() {
    let message = one_error(&[("MSB_CONSOLE_ADDR", "0.0.0.0:8766")], "MSB_CONSOLE_ADDR");
    assert!(message.contains("MSB_OPERATOR_TOKEN"), "{message}");
    let loaded = ok(&[
        ("MSB_CONSOLE_ADDR", "0.0.0.0:8766"),
        ("MSB_OPERATOR_TOKEN", "operator-0123456789abcdef"),
    ]);
    assert_eq!(
        loaded.config.console_addr,
        Some("0.0.0.0:8766".parse().unwrap())
    );
    let loaded = ok(&[
        ("MSB_CONSOLE_ADDR", "127.0.0.1:8766"),
        ("MSB_TRANSPORT", "http"),
    ]);
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("MSB_CONSOLE_ADDR")),
        "{:?}",
        loaded.warnings
    );
}
