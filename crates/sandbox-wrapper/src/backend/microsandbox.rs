//! The `microsandbox` backend: a client of the microsandbox server's JSON-RPC API, for users who
//! run microVMs.
//!
//! # The protocol, and where it was read
//!
//! Everything here was read from the public source of `microsandbox/microsandbox` (the snapshot
//! of 2025-07-12, commit `0f2c5b3`); a reader can check each point there:
//!
//! - endpoint: one JSON-RPC 2.0 endpoint, `POST {MSB_SERVER_URL}/api/v1/rpc`
//!   (`microsandbox-server/lib/route.rs`), and the default URL `http://127.0.0.1:5555`
//!   (`docs/references/api.md`);
//! - auth: `Authorization: Bearer <MSB_API_KEY>`, checked by `auth_middleware`; a bad or missing
//!   key is answered with HTTP 401, a key for another namespace with HTTP 403
//!   (`microsandbox-server/lib/middleware.rs`, `lib/error.rs`); a server started in dev mode
//!   checks nothing;
//! - `sandbox.start` `{sandbox, namespace, config: {image, memory (MiB), cpus, volumes
//!   ["host:guest"], ...}}` → a string such as `"Sandbox x started successfully"`
//!   (`SandboxStartParams`, `SandboxConfig` in `microsandbox-server/lib/payload.rs`,
//!   `sandbox_start_impl` in `lib/handler.rs`);
//! - `sandbox.stop` `{sandbox, namespace}` → a string (`SandboxStopParams`, `sandbox_stop_impl`);
//! - `sandbox.metrics.get` `{namespace, sandbox?}` → `{sandboxes: [{namespace, name, running,
//!   cpu_usage (percent), memory_usage (MiB), disk_usage (bytes)}]}`; namespace `"*"` means every
//!   namespace, which this backend never asks for (`SandboxMetricsGetParams`,
//!   `SandboxStatusResponse`, `sandbox_get_metrics_impl`). Stopped sandboxes stay in the list with
//!   `running: false`;
//! - `sandbox.command.run` `{sandbox, namespace, command, args, timeout (s)?}` → `{command, args,
//!   exit_code, success, output: [{stream: "stdout"|"stderr", text}]}` and `sandbox.repl.run`
//!   `{sandbox, namespace, language, code, timeout (s)?}` → `{status, language, output: [...]}`:
//!   the server forwards both, unchanged, to the "portal" inside the sandbox
//!   (`forward_rpc_to_portal` in `microsandbox-server/lib/handler.rs`; the shapes are in
//!   `microsandbox-portal/lib/payload.rs` and `sandbox_command_run_impl` / `sandbox_run_impl` in
//!   `microsandbox-portal/lib/handler.rs`). The portal's REPL knows `python` and
//!   `node`/`nodejs`/`javascript`; the SDKs send `python` and `nodejs`
//!   (`sdk/python/microsandbox/python_sandbox.py`, `node_sandbox.py`), so this backend sends those.
//!   The images are `microsandbox/python` and `microsandbox/node` (the SDKs' defaults);
//! - names: sandbox names and namespaces are 1–63 characters of `[A-Za-z0-9_-]`, starting with a
//!   letter or digit (`validate_sandbox_name`, `validate_namespace` in the server's handler).
//!
//! Where the sources disagree or say nothing, this backend guesses, and says so:
//!
//! - `docs/references/api.md` shows `output` and `error` of a run as plain strings, while the
//!   portal's code returns `output` as a list of `{stream, text}` lines; both shapes are read.
//! - The server answers its own failures not with a JSON-RPC error object but with an HTTP error
//!   status and `{"error": "...", "code": N}` (its `IntoResponse for ServerError`), and turns every
//!   portal failure (a command that cannot be spawned, a server-side timeout) into HTTP 500
//!   "Internal server error" without the detail. All these shapes, and proper JSON-RPC error
//!   objects, are turned into [`BackendError::Unavailable`] with whatever message the server gave.
//! - `sandbox.metrics.get` on a namespace in which nothing was ever started fails with
//!   "Namespace directory '...' does not exist"; [`list`](SandboxBackend::list) reads that answer
//!   as "no sandboxes" (matched on the message text, which is a guess that holds for that
//!   snapshot).
//!
//! # What this backend does and does not do
//!
//! - **Names.** Every sandbox it creates is called `{instance_marker}-{session}` in its one
//!   namespace (see [`MicrosandboxBackend::sandbox_name`] for how a session id is made a legal
//!   name). The marker may not contain `-`, so the first `-` of a name ends the marker and no
//!   instance's marker is a prefix of another's. [`list`](SandboxBackend::list) and
//!   [`sweep_orphans`](SandboxBackend::sweep_orphans) look only in that namespace and only at
//!   names with this marker, and every call that targets a sandbox refuses a name without it: the
//!   prototype swept the wildcard namespace and stopped sandboxes it never created, which this
//!   backend cannot do. The sweep stops at most five sandboxes at a time.
//! - **Sandboxes.** A flavor gives `memory` (MiB) and `cpus`; the template `python` gives the
//!   image `microsandbox/python`, `node` gives `microsandbox/node`, and any other string is used
//!   as an image name. Volumes become `host:guest` strings. The server has no read-only mounts,
//!   so a read-only volume is refused rather than mounted writable, and a path containing `:`
//!   cannot be expressed and is refused too.
//! - **Output** is not streamed: the server answers a run with all its output at once, and the
//!   lines are then written to the [`OutputSink`], each followed by `\n`, stdout lines as
//!   [`Stream::Stdout`] and stderr lines as [`Stream::Stderr`], in the order the server lists them.
//!   A run that times out or is cancelled leaves no output (the server never sends it).
//! - **Standard input** is not in the protocol: a request with non-empty `stdin` is refused with
//!   [`BackendError::InvalidRequest`] (an empty one means the same as none, `/dev/null`).
//! - **Environment.** `sandbox.command.run` has no environment field (only `sandbox.start` has
//!   `envs`, for the whole sandbox), so a command with `env` is run as
//!   `env NAME=VALUE ... argv...`: the image must have `env` (the microsandbox images do). Names
//!   must be `[A-Za-z_][A-Za-z0-9_]*`, and a program whose name contains `=` is refused, since
//!   `env` would read it as one more variable.
//! - **Timeouts** are passed to the server (in whole seconds, rounded up, for it to kill the
//!   command) and enforced here too: the run ends with [`EndReason::TimedOut`] when the timeout
//!   passes, whatever the server does. The HTTP request of a run may last its timeout plus
//!   `request_timeout`; a run without a timeout has no HTTP timeout either.
//! - **Cancel.** The server offers no way to kill one command, so on
//!   [`ExecControl::cancel`] this backend stops waiting and then **stops the whole sandbox** with
//!   `sandbox.stop`, the only kill the protocol has: the session's sandbox is gone afterwards
//!   (with its REPL state), and the run ends with [`EndReason::Cancelled`]. If that stop fails it
//!   is logged and the run still ends as cancelled.
//! - **Pause** ([`ExecControl::paused`]) is not supported: the server cannot freeze a command, so
//!   the flag is ignored, the command keeps running and its timeout clock keeps going.
//! - **REPL**: `python` and `node` go to `sandbox.repl.run`, whose interpreter keeps its state
//!   between calls within a sandbox. The portal has no bash REPL, so
//!   [`Language::Bash`] is refused with a hint to run a `bash -c` command instead. The server
//!   reports no exit code for a REPL run: the outcome says code 1 when the server's status is
//!   `error`/`exception` or when the code wrote to stderr (as the Python SDK's `has_error` does,
//!   since a Python exception arrives only as stderr text), and code 0 otherwise.
//! - **Metrics**: `memory_usage` (MiB) becomes [`SandboxMetrics::memory_bytes`]. The server
//!   reports CPU as a percentage and no CPU time, no peak and no process count, so those stay
//!   empty.
//! - **Flavor of listed sandboxes**: the server does not say a sandbox's size, so
//!   [`list`](SandboxBackend::list) reports the flavor this process created it with, and
//!   [`Flavor::Small`] for sandboxes it did not create (those left by an earlier run).
//! - **Transport**: plain HTTP only. This build of reqwest has no TLS, so an `https://` URL is
//!   refused by [`MicrosandboxBackend::new`] with a clear error (put a local TLS-terminating proxy
//!   in front if the server is remote). Proxy variables of the environment are not used: this
//!   library never reads the environment.
//! - **Errors**: HTTP failures and the server's errors become [`BackendError::Unavailable`] with
//!   the server's message and what to do: an unreachable server names the URL and `MSB_SERVER_URL`,
//!   HTTP 401 says to check `MSB_API_KEY`, HTTP 403 names the namespace.
//!
//! # Tests
//!
//! The real server cannot run in this crate's tests (it needs KVM and downloads images), so
//! `tests/it/microsandbox.rs` runs this backend against a small JSON-RPC HTTP/1.1 server written
//! in the test file. It is a stand-in that follows the protocol as documented above, not the real
//! microsandbox server.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::{
    BackendError, BoxFuture, EndReason, ExecControl, ExecOutcome, ExecRequest, ExitStatus, Flavor,
    Language, ReplRequest, SandboxBackend, SandboxInfo, SandboxMetrics, SandboxSpec, SweepReport,
    VolumeMapping,
};
use crate::output::{OutputSink, Stream};

/// What [`SandboxBackend::isolation`] reports for this backend.
pub const ISOLATION: &str = "microvm (microsandbox)";

/// The longest sandbox name or namespace the server accepts.
pub const MAX_NAME_LEN: usize = 63;

/// The longest instance marker this backend accepts (the rest of a name is for the session).
pub const MAX_MARKER_LEN: usize = 24;

/// How many sandboxes an orphan sweep stops at once.
pub const SWEEP_CONCURRENCY: usize = 5;

/// The path of the JSON-RPC endpoint under the server's URL.
const RPC_PATH: &str = "/api/v1/rpc";

/// How much of an unexpected response body an error message quotes.
const BODY_QUOTE: usize = 200;

/// How to reach the microsandbox server, and how this instance names its sandboxes.
///
/// A plain struct: the caller fills it (from `MSB_SERVER_URL`, `MSB_API_KEY`, ...); this library
/// never reads the environment. Its `Debug` output hides the API key.
#[derive(Clone)]
pub struct MicrosandboxConfig {
    /// The server's base URL, such as `http://127.0.0.1:5555` (`MSB_SERVER_URL`); the endpoint is
    /// `{server_url}/api/v1/rpc`. Only `http://` is supported.
    pub server_url: String,
    /// The API key sent as `Authorization: Bearer <key>` (`MSB_API_KEY`); none (or an empty
    /// string) sends no header, for a server in dev mode.
    pub api_key: Option<String>,
    /// The namespace every sandbox of this instance lives in (`[A-Za-z0-9_-]`, at most 63
    /// characters, starting with a letter or digit; never `*`).
    pub namespace: String,
    /// This instance's marker, the first part of every sandbox name it creates: 1 to
    /// [`MAX_MARKER_LEN`] characters of `[A-Za-z0-9_]` (no `-`, which separates the marker from
    /// the session), starting with a letter or digit.
    pub instance_marker: String,
    /// How long any request may take (connecting included), except a command or REPL run, which
    /// may take its own timeout plus this. `sandbox.start` waits while the server pulls an image,
    /// so this should be at least the start timeout (`MSB_SANDBOX_START_TIMEOUT`, 180 s).
    pub request_timeout: Duration,
    /// What the operator calls the server URL and API key settings, for the advice in error
    /// messages: this library knows neither name nor where the values came from.
    pub setting_names: SettingNames,
}

/// The names of the settings behind [`MicrosandboxConfig`]'s server URL and API key, as the
/// program that fills it calls them (msbd: `MSB_SERVER_URL`, `MSB_API_KEY`). Error messages name
/// them so that an operator knows what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingNames {
    /// The setting that holds the server URL.
    pub server_url: String,
    /// The setting that holds the API key.
    pub api_key: String,
}

impl Default for SettingNames {
    fn default() -> SettingNames {
        SettingNames {
            server_url: "the server URL setting".to_owned(),
            api_key: "the API key setting".to_owned(),
        }
    }
}

impl fmt::Debug for MicrosandboxConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MicrosandboxConfig")
            .field("server_url", &self.server_url)
            .field(
                "api_key",
                &self
                    .api_key
                    .as_ref()
                    .map(|_| "<redacted>")
                    .unwrap_or("<none>"),
            )
            .field("namespace", &self.namespace)
            .field("instance_marker", &self.instance_marker)
            .field("request_timeout", &self.request_timeout)
            .field("setting_names", &self.setting_names)
            .finish()
    }
}

/// The `microsandbox` backend: sandboxes are microVMs run by a microsandbox server, driven over
/// its JSON-RPC API. See the [module documentation](self) for what it supports.
///
/// Cheap to clone: clones share one HTTP client and one record of the sandboxes created.
#[derive(Clone)]
pub struct MicrosandboxBackend {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    server_url: String,
    rpc_url: String,
    api_key: Option<String>,
    namespace: String,
    /// `{marker}-`: every name of ours starts with it.
    prefix: String,
    request_timeout: Duration,
    names: SettingNames,
    next_id: AtomicU64,
    /// What this process created: sandbox name → (session id, flavor).
    created: Mutex<HashMap<String, (String, Flavor)>>,
}

impl fmt::Debug for MicrosandboxBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MicrosandboxBackend")
            .field("rpc_url", &self.inner.rpc_url)
            .field("namespace", &self.inner.namespace)
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl MicrosandboxBackend {
    /// Checks the configuration and builds the HTTP client. Nothing is sent to the server yet.
    ///
    /// Refused with [`BackendError::InvalidRequest`]: an `https://` URL (no TLS in this build),
    /// a URL that does not parse, a namespace or marker the rules above do not allow, an API key
    /// that cannot be sent in a header.
    pub fn new(config: MicrosandboxConfig) -> Result<MicrosandboxBackend, BackendError> {
        let names = config.setting_names;
        let server_url = check_server_url(&config.server_url, &names.server_url)?;
        check_namespace(&config.namespace)?;
        check_marker(&config.instance_marker)?;
        let api_key = config.api_key.filter(|key| !key.is_empty());
        if let Some(key) = &api_key
            && !key.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(BackendError::InvalidRequest(format!(
                "the microsandbox API key ({}) contains spaces or characters that cannot be sent \
                 in an HTTP header: copy it again from `msb server keygen`",
                names.api_key
            )));
        }
        if config.request_timeout.is_zero() {
            return Err(BackendError::InvalidRequest(
                "the microsandbox request timeout must be positive".to_owned(),
            ));
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(config.request_timeout)
            .build()
            .map_err(|error| {
                BackendError::Unavailable(format!(
                    "could not set up the HTTP client for the microsandbox server: {}",
                    error_chain(&error)
                ))
            })?;
        let rpc_url = format!("{server_url}{RPC_PATH}");
        Ok(MicrosandboxBackend {
            inner: Arc::new(Inner {
                client,
                server_url,
                rpc_url,
                api_key,
                namespace: config.namespace,
                prefix: format!("{}-", config.instance_marker),
                request_timeout: config.request_timeout,
                names,
                next_id: AtomicU64::new(1),
                created: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The JSON-RPC endpoint, `{server_url}/api/v1/rpc`.
    pub fn rpc_url(&self) -> &str {
        &self.inner.rpc_url
    }

    /// The namespace this instance's sandboxes live in.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The name of the sandbox of a session: `{instance_marker}-{session_id}`.
    ///
    /// A session id made only of `[A-Za-z0-9_-]` that fits in the name's 63 characters is used
    /// as it is. Any other id has its other characters replaced by `_`, is cut to fit, and gets
    /// `-` and 16 hex digits of a hash of the original id appended, so that two ids that differ
    /// only in replaced characters still get different names.
    pub fn sandbox_name(&self, session_id: &str) -> String {
        let prefix = &self.inner.prefix;
        let room = MAX_NAME_LEN - prefix.len();
        format!("{prefix}{}", session_part(session_id, room))
    }

    /// Whether a sandbox name carries this instance's marker (only those are ever touched).
    pub fn is_ours(&self, name: &str) -> bool {
        self.inner.is_ours(name)
    }

    fn check_ours(&self, name: &str) -> Result<(), BackendError> {
        if self.is_ours(name) {
            Ok(())
        } else {
            Err(BackendError::InvalidRequest(format!(
                "sandbox {name:?} is not one of this msbd instance's sandboxes (their names start \
                 with {:?}): refusing to touch it",
                self.inner.prefix
            )))
        }
    }

    /// The running sandboxes of this instance, and nothing else.
    async fn ours_running(&self) -> Result<Vec<SandboxInfo>, BackendError> {
        let params = json!({ "namespace": self.inner.namespace });
        let result = match self
            .inner
            .call_raw(
                "sandbox.metrics.get",
                params,
                Some(self.inner.request_timeout),
            )
            .await
        {
            Ok(result) => result,
            // Nothing was ever started in the namespace, so there is nothing of ours in it.
            Err(failure) if failure.is_missing_namespace() => return Ok(Vec::new()),
            Err(failure) => return Err(failure.error),
        };
        let statuses = parse_statuses(&result)
            .map_err(|detail| self.inner.protocol_error("sandbox.metrics.get", detail))?;
        let created = self.inner.created();
        Ok(statuses
            .into_iter()
            // The server answers for the namespace asked, but check anyway.
            .filter(|status| {
                status
                    .namespace
                    .as_deref()
                    .is_none_or(|ns| ns == self.inner.namespace)
            })
            .filter(|status| status.running && self.is_ours(&status.name))
            .map(|status| {
                let (session_id, flavor) =
                    created.get(&status.name).cloned().unwrap_or_else(|| {
                        let session = status.name[self.inner.prefix.len()..].to_owned();
                        (session, Flavor::Small)
                    });
                SandboxInfo {
                    name: status.name,
                    session_id,
                    flavor,
                    work_dir: None,
                }
            })
            .collect())
    }

    /// Sends a command or REPL run and waits for it, a local timeout, or a cancel.
    async fn run(
        &self,
        sandbox: &SandboxInfo,
        method: &'static str,
        mut params: Value,
        timeout: Option<Duration>,
        control: ExecControl,
    ) -> Result<RunEnd, BackendError> {
        let started = Instant::now();
        if control.cancel.is_cancelled() {
            // Nothing was sent, so nothing runs: no need to stop the sandbox.
            return Ok(RunEnd::Cancelled(started.elapsed()));
        }
        if let Some(timeout) = timeout {
            params["timeout"] = json!(whole_seconds(timeout));
        }
        if *control.paused.borrow() {
            tracing::debug!(
                sandbox = %sandbox.name,
                "the microsandbox backend cannot pause a run; it goes on"
            );
        }
        let http_timeout = timeout.map(|timeout| timeout + self.inner.request_timeout);
        let request = self.inner.call(method, params, http_timeout);
        let deadline = async {
            match timeout {
                Some(timeout) => tokio::time::sleep(timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            () = control.cancel.cancelled() => {
                // The server cannot kill one command: stopping the sandbox is the only kill.
                tracing::info!(
                    sandbox = %sandbox.name,
                    "run cancelled: stopping its microsandbox sandbox, the only way to kill it"
                );
                if let Err(error) = self.inner.stop_name(&sandbox.name).await {
                    tracing::warn!(
                        sandbox = %sandbox.name,
                        %error,
                        "could not stop the sandbox of a cancelled run"
                    );
                }
                self.inner.forget(&sandbox.name);
                Ok(RunEnd::Cancelled(started.elapsed()))
            }
            () = deadline => Ok(RunEnd::TimedOut(started.elapsed())),
            result = request => match result {
                Ok(value) => Ok(RunEnd::Done(value, started.elapsed())),
                // The server's own timeout fired first: its error hides that, the clock does not.
                Err(_) if timeout.is_some_and(|timeout| started.elapsed() >= timeout) => {
                    Ok(RunEnd::TimedOut(started.elapsed()))
                }
                Err(error) => Err(error),
            },
        }
    }

    /// Runs (see [`MicrosandboxBackend::run`]) and writes the run's output lines: the server's
    /// result, its lines and the duration, or the outcome of a run that did not finish on its
    /// own.
    async fn run_to_output(
        &self,
        sandbox: &SandboxInfo,
        method: &'static str,
        params: Value,
        timeout: Option<Duration>,
        control: ExecControl,
        output: &OutputSink,
    ) -> Result<Result<(Value, Vec<(Stream, String)>, Duration), ExecOutcome>, BackendError> {
        let end = self.run(sandbox, method, params, timeout, control).await?;
        let (result, took) = match self.finished(end, timeout) {
            Ok(done) => done,
            Err(outcome) => return Ok(Err(outcome)),
        };
        let lines =
            output_lines(&result).map_err(|detail| self.inner.protocol_error(method, detail))?;
        write_lines(output, &lines);
        Ok(Ok((result, lines, took)))
    }

    fn outcome(&self, exit: Option<ExitStatus>, reason: EndReason, took: Duration) -> ExecOutcome {
        ExecOutcome {
            exit,
            reason,
            duration_ms: millis(took),
            peak_memory_bytes: None,
            isolation: ISOLATION.to_owned(),
        }
    }

    /// The server's result and the run's duration, or the outcome of a run that did not finish
    /// on its own.
    fn finished(
        &self,
        end: RunEnd,
        timeout: Option<Duration>,
    ) -> Result<(Value, Duration), ExecOutcome> {
        match end {
            RunEnd::Done(result, took) => Ok((result, took)),
            RunEnd::Cancelled(took) => Err(self.outcome(None, EndReason::Cancelled, took)),
            RunEnd::TimedOut(took) => Err(self.outcome(
                None,
                EndReason::TimedOut {
                    after_ms: millis(timeout.unwrap_or(took)),
                },
                took,
            )),
        }
    }
}

impl Inner {
    fn is_ours(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .is_some_and(|rest| !rest.is_empty())
    }

    fn created(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Flavor)>> {
        self.created.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn forget(&self, name: &str) {
        self.created().remove(name);
    }

    async fn stop_name(&self, name: &str) -> Result<(), BackendError> {
        if !self.is_ours(name) {
            // Never reached through the public API, which checks first; kept as a last guard.
            return Err(BackendError::InvalidRequest(format!(
                "refusing to stop {name:?}: not one of this instance's sandboxes"
            )));
        }
        let params = json!({ "sandbox": name, "namespace": self.namespace });
        self.call("sandbox.stop", params, Some(self.request_timeout))
            .await?;
        Ok(())
    }

    async fn call(
        &self,
        method: &str,
        params: Value,
        timeout: Option<Duration>,
    ) -> Result<Value, BackendError> {
        self.call_raw(method, params, timeout)
            .await
            .map_err(|failure| failure.error)
    }

    /// One JSON-RPC call: its result, or an error that says what the server said and what to do.
    async fn call_raw(
        &self,
        method: &str,
        params: Value,
        timeout: Option<Duration>,
    ) -> Result<Value, CallFailure> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({ "jsonrpc": "2.0", "method": method, "params": params, "id": id });
        tracing::debug!(method, id, "microsandbox request");
        let mut request = self.client.post(&self.rpc_url).json(&body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        let response = request
            .send()
            .await
            .map_err(|error| self.transport_error(method, &error, timeout))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| self.transport_error(method, &error, timeout))?;
        let json: Option<Value> = serde_json::from_slice(&bytes).ok();
        let server_message = json.as_ref().and_then(error_message);
        if status == 401 {
            let said = server_message.as_deref().unwrap_or("unauthorized");
            let text = match &self.api_key {
                Some(_) => format!(
                    "the microsandbox server at {} refused the API key ({said}): check {} \
                     (create a key with `msb server keygen`)",
                    self.server_url, self.names.api_key
                ),
                None => format!(
                    "the microsandbox server at {} requires an API key ({said}): set {} \
                     (create one with `msb server keygen`), or start the server with --dev",
                    self.server_url, self.names.api_key
                ),
            };
            return Err(CallFailure::server(text, server_message));
        }
        if status == 403 {
            let said = server_message.as_deref().unwrap_or("forbidden");
            let text = format!(
                "the microsandbox server at {} denied access to namespace {:?} ({said}): use an \
                 API key for that namespace in {}, or use the key's namespace",
                self.server_url, self.namespace, self.names.api_key
            );
            return Err(CallFailure::server(text, server_message));
        }
        if let Some(error) = json.as_ref().and_then(|json| json.get("error"))
            && let Some(object) = error.as_object()
        {
            // A JSON-RPC error object, whatever the HTTP status.
            let message = object
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)");
            let code = object.get("code").and_then(Value::as_i64);
            let mut text = format!(
                "{method} failed on the microsandbox server at {}: {message}",
                self.server_url
            );
            if let Some(code) = code {
                text.push_str(&format!(" (JSON-RPC error {code})"));
            }
            if code == Some(-32601) {
                text.push_str(&format!(
                    "; is {} pointing at a microsandbox server of a version that has this method?",
                    self.names.server_url
                ));
            }
            return Err(CallFailure::server(text, Some(message.to_owned())));
        }
        if !(200..300).contains(&status) {
            let mut text = format!(
                "{method} failed on the microsandbox server at {}: HTTP {status}",
                self.server_url
            );
            match &server_message {
                Some(message) => text.push_str(&format!(": {message}")),
                None => text.push_str(&format!(
                    " ({}); is {} pointing at a microsandbox server?",
                    quote_body(&bytes),
                    self.names.server_url
                )),
            }
            if status >= 500 {
                text.push_str(" (the server hides the cause of internal errors: see its log)");
            }
            return Err(CallFailure::server(text, server_message));
        }
        match json {
            Some(mut json) if json.get("result").is_some() => Ok(json["result"].take()),
            _ => Err(CallFailure::server(
                format!(
                    "the microsandbox server at {} answered {method} with something that is not \
                     a JSON-RPC response ({}); is {} pointing at a microsandbox server?",
                    self.server_url,
                    quote_body(&bytes),
                    self.names.server_url
                ),
                None,
            )),
        }
    }

    fn transport_error(
        &self,
        method: &str,
        error: &reqwest::Error,
        timeout: Option<Duration>,
    ) -> CallFailure {
        let detail = error_chain(error);
        let text = if error.is_timeout() {
            let limit = timeout
                .map(|t| format!(" within {} s", t.as_secs_f64()))
                .unwrap_or_default();
            format!(
                "the microsandbox server at {} did not answer {method}{limit} ({detail}): it may \
                 be busy (pulling an image, say); check the server's log, or raise the timeout",
                self.server_url
            )
        } else if error.is_connect() {
            format!(
                "could not connect to the microsandbox server at {} ({detail}): is the \
                 microsandbox server running there (`msb server start`)? Set {} if it listens \
                 elsewhere",
                self.server_url, self.names.server_url
            )
        } else {
            format!(
                "{method} to the microsandbox server at {} failed ({detail}): is the microsandbox \
                 server running at {}? Set {}",
                self.server_url, self.server_url, self.names.server_url
            )
        };
        CallFailure {
            server_message: None,
            error: BackendError::Unavailable(text),
        }
    }

    fn protocol_error(&self, method: &str, detail: &str) -> BackendError {
        BackendError::Unavailable(format!(
            "the microsandbox server at {} answered {method} in an unexpected shape: {detail}",
            self.server_url
        ))
    }
}

/// A failed call: the error to report, and the server's own message when it gave one.
struct CallFailure {
    server_message: Option<String>,
    error: BackendError,
}

impl CallFailure {
    fn server(text: String, server_message: Option<String>) -> CallFailure {
        CallFailure {
            server_message,
            error: BackendError::Unavailable(text),
        }
    }

    /// The server's answer for a namespace in which no sandbox was ever started.
    fn is_missing_namespace(&self) -> bool {
        self.server_message.as_deref().is_some_and(|message| {
            message.contains("Namespace directory") && message.contains("does not exist")
        })
    }
}

/// How a run ended, as far as waiting for it goes.
enum RunEnd {
    /// The server answered with this result.
    Done(Value, Duration),
    /// The local timeout passed.
    TimedOut(Duration),
    /// The run was cancelled (and its sandbox stopped).
    Cancelled(Duration),
}

impl SandboxBackend for MicrosandboxBackend {
    fn name(&self) -> &'static str {
        "microsandbox"
    }

    fn isolation(&self) -> String {
        ISOLATION.to_owned()
    }

    fn create<'a>(
        &'a self,
        spec: &'a SandboxSpec,
    ) -> BoxFuture<'a, Result<SandboxInfo, BackendError>> {
        Box::pin(async move {
            if spec.session_id.is_empty() {
                return Err(BackendError::InvalidRequest(
                    "a sandbox needs a session id".to_owned(),
                ));
            }
            if spec.network.mode != crate::network::NetworkMode::None {
                return Err(BackendError::InvalidRequest(format!(
                    "network \"{}\" is not available with the microsandbox backend (its network is the server's to set); ask for network \"none\", or use the local backend",
                    spec.network.mode
                )));
            }
            let image = image_for(&spec.template)?;
            let volumes = spec
                .volumes
                .iter()
                .map(volume_string)
                .collect::<Result<Vec<_>, _>>()?;
            let name = self.sandbox_name(&spec.session_id);
            let params = json!({
                "sandbox": name,
                "namespace": self.inner.namespace,
                "config": {
                    "image": image,
                    "memory": spec.flavor.memory_mb(),
                    "cpus": spec.flavor.cpus(),
                    "volumes": volumes,
                },
            });
            let result = self
                .inner
                .call("sandbox.start", params, Some(self.inner.request_timeout))
                .await?;
            if let Some(message) = result.as_str()
                && !message.contains("started successfully")
            {
                // "was started, but timed out waiting for it to be fully running", say.
                tracing::warn!(sandbox = %name, message, "microsandbox start warning");
            }
            self.inner
                .created()
                .insert(name.clone(), (spec.session_id.clone(), spec.flavor));
            Ok(SandboxInfo {
                name,
                session_id: spec.session_id.clone(),
                flavor: spec.flavor,
                work_dir: None,
            })
        })
    }

    fn exec<'a>(
        &'a self,
        sandbox: &'a SandboxInfo,
        request: ExecRequest,
        output: &'a OutputSink,
        control: ExecControl,
    ) -> BoxFuture<'a, Result<ExecOutcome, BackendError>> {
        Box::pin(async move {
            self.check_ours(&sandbox.name)?;
            let (command, args) = command_line(&request)?;
            let params = json!({
                "sandbox": sandbox.name,
                "namespace": self.inner.namespace,
                "command": command,
                "args": args,
            });
            let ran = self
                .run_to_output(
                    sandbox,
                    "sandbox.command.run",
                    params,
                    request.timeout,
                    control,
                    output,
                )
                .await?;
            let (result, _, took) = match ran {
                Ok(done) => done,
                Err(outcome) => return Ok(outcome),
            };
            let code = match result.get("exit_code").and_then(Value::as_i64) {
                Some(code) => Some(i32::try_from(code).unwrap_or(i32::MAX)),
                None => result
                    .get("success")
                    .and_then(Value::as_bool)
                    .map(|ok| if ok { 0 } else { 1 }),
            };
            Ok(self.outcome(code.map(ExitStatus::Code), EndReason::Exited, took))
        })
    }

    fn repl<'a>(
        &'a self,
        sandbox: &'a SandboxInfo,
        request: ReplRequest,
        output: &'a OutputSink,
        control: ExecControl,
    ) -> BoxFuture<'a, Result<ExecOutcome, BackendError>> {
        Box::pin(async move {
            self.check_ours(&sandbox.name)?;
            let language = match request.language {
                Language::Python => "python",
                Language::Node => "nodejs",
                Language::Bash => {
                    return Err(BackendError::InvalidRequest(
                        "the microsandbox server has no bash REPL (only python and node): run \
                         the code as a command, `bash -c <code>`, instead (its state does not \
                         persist)"
                            .to_owned(),
                    ));
                }
            };
            let params = json!({
                "sandbox": sandbox.name,
                "namespace": self.inner.namespace,
                "language": language,
                "code": request.code,
            });
            let ran = self
                .run_to_output(
                    sandbox,
                    "sandbox.repl.run",
                    params,
                    request.timeout,
                    control,
                    output,
                )
                .await?;
            let (result, lines, took) = match ran {
                Ok(done) => done,
                Err(outcome) => return Ok(outcome),
            };
            let status = result.get("status").and_then(Value::as_str).unwrap_or("");
            let failed = matches!(status, "error" | "exception")
                || result.get("has_error").and_then(Value::as_bool) == Some(true)
                || lines
                    .iter()
                    .any(|(stream, text)| *stream == Stream::Stderr && !text.is_empty());
            let code = if failed { 1 } else { 0 };
            Ok(self.outcome(Some(ExitStatus::Code(code)), EndReason::Exited, took))
        })
    }

    fn stop<'a>(&'a self, sandbox: &'a SandboxInfo) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.check_ours(&sandbox.name)?;
            self.inner.stop_name(&sandbox.name).await?;
            self.inner.forget(&sandbox.name);
            Ok(())
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxInfo>, BackendError>> {
        Box::pin(self.ours_running())
    }

    fn metrics<'a>(
        &'a self,
        sandbox: &'a SandboxInfo,
    ) -> BoxFuture<'a, Result<SandboxMetrics, BackendError>> {
        Box::pin(async move {
            self.check_ours(&sandbox.name)?;
            let params = json!({ "namespace": self.inner.namespace, "sandbox": sandbox.name });
            let result = match self
                .inner
                .call_raw(
                    "sandbox.metrics.get",
                    params,
                    Some(self.inner.request_timeout),
                )
                .await
            {
                Ok(result) => result,
                Err(failure) if failure.is_missing_namespace() => {
                    return Err(BackendError::NoSuchSandbox(sandbox.name.clone()));
                }
                Err(failure) => return Err(failure.error),
            };
            let statuses = parse_statuses(&result)
                .map_err(|detail| self.inner.protocol_error("sandbox.metrics.get", detail))?;
            let status = statuses
                .into_iter()
                .find(|status| status.name == sandbox.name && status.running)
                .ok_or_else(|| BackendError::NoSuchSandbox(sandbox.name.clone()))?;
            Ok(SandboxMetrics {
                memory_bytes: status.memory_mib.map(|mib| mib.saturating_mul(1024 * 1024)),
                peak_memory_bytes: None,
                cpu_usage_us: None,
                processes: None,
            })
        })
    }

    fn sweep_orphans<'a>(
        &'a self,
        live: &'a HashSet<String>,
    ) -> BoxFuture<'a, Result<SweepReport, BackendError>> {
        Box::pin(async move {
            let live_names: HashSet<String> = live.iter().map(|id| self.sandbox_name(id)).collect();
            let mut orphans = self
                .ours_running()
                .await?
                .into_iter()
                .map(|info| info.name)
                .filter(|name| !live_names.contains(name));
            let mut stopping = JoinSet::new();
            let mut stopped = 0;
            let mut failures = Vec::new();
            loop {
                while stopping.len() < SWEEP_CONCURRENCY {
                    let Some(name) = orphans.next() else { break };
                    let inner = Arc::clone(&self.inner);
                    stopping.spawn(async move {
                        let result = inner.stop_name(&name).await;
                        if result.is_ok() {
                            inner.forget(&name);
                        }
                        (name, result)
                    });
                }
                match stopping.join_next().await {
                    None => break,
                    Some(Ok((name, Ok(())))) => {
                        tracing::info!(sandbox = %name, "stopped an orphaned microsandbox sandbox");
                        stopped += 1;
                    }
                    Some(Ok((name, Err(error)))) => {
                        tracing::warn!(
                            sandbox = %name,
                            %error,
                            "could not stop an orphaned microsandbox sandbox"
                        );
                        failures.push(format!("{name}: {error}"));
                    }
                    Some(Err(error)) => failures.push(format!("a stop task failed: {error}")),
                }
            }
            if stopped == 0 && !failures.is_empty() {
                return Err(BackendError::Unavailable(format!(
                    "could not stop any of {} orphaned microsandbox sandboxes: {}",
                    failures.len(),
                    failures.join("; ")
                )));
            }
            Ok(SweepReport {
                sandboxes: stopped,
                ..SweepReport::default()
            })
        })
    }
}

/// One entry of `sandbox.metrics.get`.
struct Status {
    namespace: Option<String>,
    name: String,
    running: bool,
    memory_mib: Option<u64>,
}

fn parse_statuses(result: &Value) -> Result<Vec<Status>, &'static str> {
    let list = result
        .get("sandboxes")
        .and_then(Value::as_array)
        .ok_or("no `sandboxes` list")?;
    list.iter()
        .map(|entry| {
            let name = entry
                .get("name")
                .and_then(Value::as_str)
                .ok_or("a sandbox without a `name`")?;
            Ok(Status {
                namespace: entry
                    .get("namespace")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                name: name.to_owned(),
                running: entry.get("running").and_then(Value::as_bool) == Some(true),
                memory_mib: entry.get("memory_usage").and_then(Value::as_u64),
            })
        })
        .collect()
}

/// The output of a run: `[{stream, text}]` as the portal sends it, or `output` and `error`
/// strings as the API reference shows them.
fn output_lines(result: &Value) -> Result<Vec<(Stream, String)>, &'static str> {
    let mut lines = Vec::new();
    match result.get("output") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            for item in items {
                let stream = match item.get("stream").and_then(Value::as_str) {
                    Some("stderr") => Stream::Stderr,
                    _ => Stream::Stdout,
                };
                let text = item
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or("an output line without `text`")?;
                lines.push((stream, text.to_owned()));
            }
        }
        Some(Value::String(text)) => {
            lines.extend(text.lines().map(|line| (Stream::Stdout, line.to_owned())));
            if let Some(error) = result.get("error").and_then(Value::as_str) {
                lines.extend(error.lines().map(|line| (Stream::Stderr, line.to_owned())));
            }
        }
        Some(_) => return Err("`output` is neither a list nor a string"),
    }
    Ok(lines)
}

fn write_lines(output: &OutputSink, lines: &[(Stream, String)]) {
    for (stream, text) in lines {
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
        output.write(*stream, &bytes);
    }
}

/// The command and arguments to send for a request: refuses stdin, wraps env in `env`.
fn command_line(request: &ExecRequest) -> Result<(String, Vec<String>), BackendError> {
    let Some((program, rest)) = request.argv.split_first() else {
        return Err(BackendError::InvalidRequest(
            "the command is empty: give at least the program to run".to_owned(),
        ));
    };
    if program.is_empty() {
        return Err(BackendError::InvalidRequest(
            "the program name is empty".to_owned(),
        ));
    }
    if request
        .stdin
        .as_ref()
        .is_some_and(|stdin| !stdin.is_empty())
    {
        return Err(BackendError::InvalidRequest(
            "the microsandbox server cannot feed standard input to a command: pass the data as an \
             argument, or write it to a file in a shared volume and read it from there"
                .to_owned(),
        ));
    }
    if request.env.is_empty() {
        return Ok((program.clone(), rest.to_vec()));
    }
    if program.contains('=') {
        return Err(BackendError::InvalidRequest(format!(
            "program {program:?} contains `=`: with environment variables the microsandbox \
             backend runs `env NAME=VALUE ... program`, and `env` would take it for a variable"
        )));
    }
    let mut args = Vec::with_capacity(request.env.len() + request.argv.len());
    for (name, value) in &request.env {
        let valid = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(BackendError::InvalidRequest(format!(
                "environment variable name {name:?} is not of the form [A-Za-z_][A-Za-z0-9_]*"
            )));
        }
        args.push(format!("{name}={value}"));
    }
    args.extend(request.argv.iter().cloned());
    Ok(("env".to_owned(), args))
}

/// The image for a template.
fn image_for(template: &str) -> Result<String, BackendError> {
    match template {
        "python" => Ok("microsandbox/python".to_owned()),
        "node" => Ok("microsandbox/node".to_owned()),
        "" => Err(BackendError::InvalidRequest(
            "the sandbox template is empty: use \"python\", \"node\" or an image name".to_owned(),
        )),
        image if image.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            Err(BackendError::InvalidRequest(format!(
                "template {image:?} is not an image name: use \"python\", \"node\" or an image \
                 name such as \"microsandbox/python\""
            )))
        }
        image => Ok(image.to_owned()),
    }
}

/// The server's `host:guest` string for a volume.
fn volume_string(volume: &VolumeMapping) -> Result<String, BackendError> {
    let (Some(host), Some(guest)) = (volume.host.to_str(), volume.guest.to_str()) else {
        return Err(BackendError::InvalidRequest(format!(
            "volume {}:{}: the microsandbox server takes only UTF-8 paths",
            volume.host.display(),
            volume.guest.display()
        )));
    };
    if volume.read_only {
        return Err(BackendError::InvalidRequest(format!(
            "volume {host}:{guest} is read-only, and the microsandbox server has no read-only \
             mounts: map it read-write, or use the local backend"
        )));
    }
    if host.contains(':') || guest.contains(':') || host.is_empty() || guest.is_empty() {
        return Err(BackendError::InvalidRequest(format!(
            "volume {host:?} → {guest:?}: the microsandbox server cannot mount an empty path or \
             one that contains `:`"
        )));
    }
    Ok(format!("{host}:{guest}"))
}

fn check_server_url(url: &str, setting: &str) -> Result<String, BackendError> {
    let trimmed = url.trim().trim_end_matches('/');
    let parsed = reqwest::Url::parse(trimmed).map_err(|error| {
        BackendError::InvalidRequest(format!(
            "the microsandbox server URL {url:?} ({setting}) is not a URL ({error}): use \
             one such as http://127.0.0.1:5555"
        ))
    })?;
    match parsed.scheme() {
        "http" => {}
        "https" => {
            return Err(BackendError::InvalidRequest(format!(
                "the microsandbox server URL {url:?} ({setting}) uses https, which this \
                 build of msbd does not support yet (it has no TLS): use http:// (the server \
                 listens on plain HTTP, http://127.0.0.1:5555 by default), or reach a remote \
                 server through a local TLS-terminating proxy"
            )));
        }
        other => {
            return Err(BackendError::InvalidRequest(format!(
                "the microsandbox server URL {url:?} ({setting}) has scheme {other:?}: use \
                 http://host:port"
            )));
        }
    }
    if parsed.host_str().is_none_or(str::is_empty)
        || parsed.query().is_some()
        || parsed.fragment().is_some()
    {
        return Err(BackendError::InvalidRequest(format!(
            "the microsandbox server URL {url:?} ({setting}) must be http://host[:port] \
             (with no query or fragment)"
        )));
    }
    Ok(trimmed.to_owned())
}

fn check_namespace(namespace: &str) -> Result<(), BackendError> {
    let valid = !namespace.is_empty()
        && namespace.len() <= MAX_NAME_LEN
        && namespace.starts_with(|c: char| c.is_ascii_alphanumeric())
        && namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(BackendError::InvalidRequest(format!(
            "microsandbox namespace {namespace:?} is not allowed: use 1 to {MAX_NAME_LEN} letters, \
             digits, `-` or `_`, starting with a letter or digit (and never the wildcard `*`)"
        )))
    }
}

fn check_marker(marker: &str) -> Result<(), BackendError> {
    let valid = !marker.is_empty()
        && marker.len() <= MAX_MARKER_LEN
        && marker.starts_with(|c: char| c.is_ascii_alphanumeric())
        && marker
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(BackendError::InvalidRequest(format!(
            "instance marker {marker:?} cannot name microsandbox sandboxes: use 1 to \
             {MAX_MARKER_LEN} letters, digits or `_`, starting with a letter or digit (no `-`, \
             which ends the marker in a sandbox name)"
        )))
    }
}

/// The session's part of a sandbox name, at most `room` characters of `[A-Za-z0-9_-]`.
fn session_part(session_id: &str, room: usize) -> String {
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if !session_id.is_empty() && session_id.len() <= room && session_id.chars().all(allowed) {
        return session_id.to_owned();
    }
    let hash = format!("{:016x}", crate::fnv1a_64(session_id.as_bytes()));
    let keep = room.saturating_sub(hash.len() + 1);
    let head: String = session_id
        .chars()
        .map(|c| if allowed(c) { c } else { '_' })
        .take(keep)
        .collect();
    if head.is_empty() {
        hash
    } else {
        format!("{head}-{hash}")
    }
}

/// A timeout in whole seconds for the server, rounded up, at least 1.
fn whole_seconds(timeout: Duration) -> u64 {
    let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    seconds.max(1)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A server error's message: a JSON-RPC `error.message`, or the REST-style `error` string.
fn error_message(json: &Value) -> Option<String> {
    match json.get("error")? {
        Value::String(message) => Some(message.clone()),
        Value::Object(object) => object
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

fn quote_body(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "an empty body".to_owned();
    }
    let text = String::from_utf8_lossy(bytes);
    let mut quoted: String = text.chars().take(BODY_QUOTE).collect();
    if text.chars().count() > BODY_QUOTE {
        quoted.push('…');
    }
    format!("body {quoted:?}")
}

/// An error and its causes, joined (reqwest's own message alone says little).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_become_legal_distinct_names() {
        assert_eq!(session_part("abc-123_x", 40), "abc-123_x");
        let dotted = session_part("a.b", 40);
        let underscored = session_part("a_b", 40);
        assert_eq!(underscored, "a_b");
        assert!(dotted.starts_with("a_b-") && dotted.len() == 4 + 16);
        assert_ne!(dotted, underscored);
        let long = session_part(&"x".repeat(100), 38);
        assert_eq!(long.len(), 38);
        assert_eq!(session_part("", 38).len(), 16);
        assert_eq!(
            session_part("é", 38),
            format!("_-{:016x}", crate::fnv1a_64("é".as_bytes()))
        );
    }

    #[test]
    fn timeouts_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn both_output_shapes_are_read() {
        let lines = output_lines(&json!({"output": [
            {"stream": "stdout", "text": "a"}, {"stream": "stderr", "text": "b"}
        ]}))
        .unwrap();
        assert_eq!(
            lines,
            vec![
                (Stream::Stdout, "a".to_owned()),
                (Stream::Stderr, "b".to_owned())
            ]
        );
        let lines = output_lines(&json!({"output": "x\ny\n", "error": "z\n"})).unwrap();
        assert_eq!(
            lines,
            vec![
                (Stream::Stdout, "x".to_owned()),
                (Stream::Stdout, "y".to_owned()),
                (Stream::Stderr, "z".to_owned())
            ]
        );
    }
}
