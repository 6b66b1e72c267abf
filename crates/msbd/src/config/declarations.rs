//! The declarations: every `MSB_*` variable, once, with its type, default, documentation,
//! flag and how `msbd config` shows it. [`VARIABLES`], the struct envy reads and the defaults
//! all come from the one `variables!` table below.

use std::net::SocketAddr;

use sandbox_wrapper::backend::Flavor;
use sandbox_wrapper::output::DEFAULT_OUTPUT_CAP;
use serde::Deserialize;

use super::values::{
    Addr, AddrRules, Choice, Count, DatabaseUrl, HostList, LogFilter, NameMap, NetRules, NodeName,
    OriginList, PathValue, Seconds, ServerUrl, SqlName, Switch, Value, Volumes,
};
use super::{
    BackendChoice, Group, Isolation, LogFormat, NetworkChoice, Secret, Transport, Variable,
};

/// A default, in words for the reference.
pub(super) struct DefaultText {
    pub(super) text: String,
    /// Whether `text` is a literal value (shown in backticks) rather than words.
    pub(super) literal: bool,
}

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
        pub(super) struct Raw {
            $( pub(super) $field: Option<$ty>, )+
        }

        /// The fixed defaults (`()` for a variable whose default is unset or derived).
        #[allow(dead_code, reason = "the `()` fields of unset and derived defaults are never read")]
        pub(super) struct Defaults {
            $( pub(super) $field: default_type!($dkind, $ty), )+
        }

        pub(super) fn defaults() -> Defaults {
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

    /// The operator's token for the web console (`/ui`): at least 16 visible ASCII characters,
    /// not `MSB_AUTH_TOKEN`. Whoever signs in with it (or sends it as `Authorization: Bearer`)
    /// sees and acts on every principal's tasks and sessions, pauses the queue and the
    /// background loops; the holder of `MSB_AUTH_TOKEN` sees only its own tasks there. With
    /// neither token set, the console (loopback only) treats everyone as the operator.
    MSB_OPERATOR_TOKEN: operator_token: Secret = unset("with MSB_AUTH_TOKEN set, no operator in the web console"),
        group = Group::Daemon, flag = None, secret = true,
        show = |c| c.operator_token.as_ref().map(|_| String::new());

    /// Where the web console listens when MCP is served on stdio, as `IP:PORT`, such as
    /// `127.0.0.1:8766`: the same msbd process serves its MCP client on stdin/stdout and the
    /// console (with `/healthz`, `/readyz` and `/metrics`, but no `/mcp`) on this address. With
    /// `MSB_TRANSPORT=http` the console is at `/ui` on `MSB_HTTP_ADDR` and this is not used. An
    /// address that is not loopback requires `MSB_OPERATOR_TOKEN` or `MSB_AUTH_TOKEN`.
    MSB_CONSOLE_ADDR: console_addr: Addr = unset("no web console with the stdio transport"),
        group = Group::Daemon, flag = Some("--console"), secret = false,
        show = |c| c.console_addr.map(|a| a.to_string());

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

    /// How long a tool call waits for tasks when it does not say, in seconds (1 to 3600):
    /// `execute_command` and `execute_code` then answer with the task's id, progress and output
    /// so far if it is still going (it goes on), and `get_task_result(wait=true)` and
    /// `wait_for_tasks` with what has finished. Agent clients give up on a call after about 60
    /// s, so keep it well below that.
    MSB_CALL_WAIT: call_wait: Seconds = fixed(Seconds(20)),
        group = Group::Tasks, flag = None, secret = false,
        show = |c| Some(c.call_wait.as_secs().to_string());

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

    /// The largest file `write_file` makes in a session (its appends included), and the most
    /// bytes one `read_file` returns, in bytes (at least 1024). One call's content is also
    /// bounded by `MSB_MAX_REQUEST_BYTES`: write larger files in pieces with `append`.
    MSB_MAX_FILE_BYTES: max_file_bytes: Count = fixed(Count(16 * 1024 * 1024)),
        group = Group::Tasks, flag = None, secret = false,
        show = |c| Some(c.max_file_bytes.to_string());

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
        show = |c| Some(c.isolation.to_string());

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

    /// The network of a session whose caller names none (see `docs/sandboxing.md`, Network):
    /// `none` (no route out), `allow` (only the names in `MSB_NETWORK_ALLOW`, through msbd's
    /// filtering proxy), or `host` (the host's network; needs `MSB_NETWORK_HOST=true`). A caller
    /// chooses per session with `network` and `network_allow`, within these settings.
    MSB_NETWORK: network: Choice<NetworkChoice> = fixed(Choice(NetworkChoice::None)),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| Some(c.network.default_mode.to_string());

    /// What every session of network `allow` may reach: names (`pypi.org`: that name only) and
    /// suffixes (`.pythonhosted.org`: every name under it), each on ports 80 and 443, or on the
    /// port written after it (`:8080`), or on every port (`:*`). Names are resolved by msbd on
    /// the host; a name that resolves to a loopback, link-local or private address is refused
    /// unless `MSB_NETWORK_PRIVATE` allows the address.
    MSB_NETWORK_ALLOW: network_allow: NetRules = unset("no names"),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| (!c.network.allow.is_empty()).then(|| NetRules(c.network.allow.clone()).describe());

    /// What a caller may add to its session's allow-list with `network_allow`: rules as in
    /// `MSB_NETWORK_ALLOW`, and a caller's rule must fall within one of them (`.example.com`
    /// lets a caller add `docs.example.com`; `*` lets it add any name, on ports 80 and 443, and
    /// `*:*` on any port).
    MSB_NETWORK_CALLER_ALLOW: network_caller_allow: NetRules = unset("callers add nothing"),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| (!c.network.caller_may_add.is_empty()).then(|| NetRules(c.network.caller_may_add.clone()).describe());

    /// Whether a session may have the host's network (`network: "host"`): its processes then
    /// reach whatever the host reaches, its own loopback services included.
    MSB_NETWORK_HOST: network_host: Switch = fixed(Switch(false)),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| Some(c.network.host_allowed.to_string());

    /// Loopback, link-local or private addresses the proxy may connect to all the same (a
    /// package mirror on the local network, say): addresses or ranges, each with an optional
    /// `:PORT` (`10.1.0.0/16`, `127.0.0.1:3141`, `[fd00::/8]:443`).
    MSB_NETWORK_PRIVATE: network_private: AddrRules = unset("none: public addresses only"),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| (!c.network.private_allowed.is_empty()).then(|| AddrRules(c.network.private_allowed.clone()).describe());

    /// Names the proxy resolves itself, before DNS: `name=address` pairs
    /// (`mirror.internal=10.1.2.3`). The address must still be public or allowed by
    /// `MSB_NETWORK_PRIVATE`.
    MSB_NETWORK_HOSTS: network_hosts: NameMap = unset("every name is resolved by the host's resolver"),
        group = Group::Sandboxes, flag = None, secret = false,
        show = |c| (!c.network.hosts.is_empty()).then(|| {
            let mut pairs: Vec<(String, std::net::IpAddr)> = c
                .network
                .hosts
                .iter()
                .flat_map(|(name, ips)| ips.iter().map(move |ip| (name.clone(), *ip)))
                .collect();
            pairs.sort();
            NameMap(pairs).describe()
        });

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
