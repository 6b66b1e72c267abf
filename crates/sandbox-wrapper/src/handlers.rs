//! The task handlers that run in sandboxes, registered into the `task-core` engine:
//! [`CommandHandler`] (`command`), [`CodeHandler`] (`code`) and [`OperatorHandler`] (each
//! operator-defined task type).
//!
//! Each attempt takes a session (the one named by `session_id`, or a fresh one; the result says
//! which), captures its output to a file of its own (see [`output_path`]; capped; readable by
//! cursor while it runs; each stream also alone beside it; the last [`KEPT_ATTEMPTS`] attempts'
//! files are kept), turns `::progress::` lines into progress reports, and
//! ends with a result that holds the exit code or signal, the duration, the peak memory where
//! measured, the output's and stderr's tails, why it ended and the isolation it ran under. A
//! non-zero exit, a timeout or a kill is a failure whose message carries the same facts, and
//! which keeps the same result as the failure's [`TaskFailure::result`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use task_core::{TaskContext, TaskFailure, TaskHandler, TaskId};

use crate::backend::{
    BackendError, EndReason, ExecControl, ExecOutcome, ExecRequest, ExitStatus, Flavor, Language,
    ReplRequest,
};
use crate::network::{NetworkPolicy, NetworkSettings};
use crate::output::{OutputSink, Stream, output_files};
use crate::session::{SessionError, SessionManager};
use crate::task_types::TaskTypeSpec;

/// What every sandboxed handler shares.
#[derive(Clone)]
pub struct HandlerShared {
    /// The sessions tasks run in.
    pub sessions: SessionManager,
    /// Where output files go.
    pub outputs_dir: PathBuf,
    /// The most bytes of output kept per attempt of a task.
    pub output_cap: u64,
    /// The operator's network settings, which a task's `network` is checked against.
    pub network: NetworkSettings,
}

impl HandlerShared {
    /// The output file of an attempt of a task.
    pub fn output_path(&self, id: TaskId, attempt: u32) -> PathBuf {
        output_path(&self.outputs_dir, id, attempt)
    }
}

/// How many attempts of a task keep their output: the latest and the ones just before it. When
/// an attempt starts, the output of the attempt this many before it is deleted, so that a task
/// retried again and again holds at most this many output files, each under the cap.
pub const KEPT_ATTEMPTS: u32 = 5;

/// The (combined) output file of attempt `attempt` of a task under an outputs directory:
/// `<task id>.log` for the first attempt (and for a task that has not started: attempt 0),
/// `<task id>.<attempt>.log` for the next ones. A task that runs once has one such file, named
/// as it always was; each attempt writes its own, so none truncates another's. Each stream's own
/// file is beside it ([`crate::output::stream_path`]: `<task id>.log.stdout`, ...).
pub fn output_path(outputs_dir: &Path, id: TaskId, attempt: u32) -> PathBuf {
    if attempt <= 1 {
        outputs_dir.join(format!("{id}.log"))
    } else {
        outputs_dir.join(format!("{id}.{attempt}.log"))
    }
}

/// The attempts that may still have their output when `latest` is a task's latest attempt:
/// the last [`KEPT_ATTEMPTS`] of them (none before the first attempt).
pub fn kept_attempts(latest: u32) -> std::ops::RangeInclusive<u32> {
    latest.saturating_sub(KEPT_ATTEMPTS - 1).max(1)..=latest
}

/// Deletes the output of the attempts before [`kept_attempts`]`(attempt)` (run as attempt
/// `attempt` starts). It looks back [`KEPT_ATTEMPTS`] attempts more, not to the first: an
/// attempt that never reached its handler (msbd died between its claim and its start) left
/// the deletion to the next one, which makes up for it. Files that are not there are fine.
fn forget_old_outputs(outputs_dir: &Path, id: TaskId, attempt: u32) {
    let first_kept = *kept_attempts(attempt).start();
    for old in first_kept.saturating_sub(KEPT_ATTEMPTS).max(1)..first_kept {
        for path in output_files(&output_path(outputs_dir, id, old)) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(%id, attempt = old, path = %path.display(), %error, "cannot delete the output of an old attempt");
                }
            }
        }
    }
}

/// Options every sandboxed task type accepts.
#[derive(Debug, Default)]
struct SessionOptions {
    session_id: Option<String>,
    flavor: Option<Flavor>,
    timeout_seconds: Option<f64>,
    /// The network policy asked for (`None`: the session's, or the default for a new one).
    network: Option<NetworkPolicy>,
}

/// `command` params.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandParams {
    command: Option<String>,
    argv: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    stdin: Option<String>,
    template: Option<String>,
    #[serde(flatten)]
    session: SessionOptionsFlat,
}

/// `code` params.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CodeParams {
    language: String,
    code: String,
    #[serde(default)]
    env: BTreeMap<String, String>,
    stdin: Option<String>,
    #[serde(flatten)]
    session: SessionOptionsFlat,
}

/// The session options, flattened into each params object (serde's `flatten` and
/// `deny_unknown_fields` do not mix, so the fields are spelled out here).
#[derive(Debug, Default, Deserialize)]
struct SessionOptionsFlat {
    session_id: Option<String>,
    flavor: Option<String>,
    timeout_seconds: Option<f64>,
    network: Option<String>,
    network_allow: Option<Vec<String>>,
}

impl SessionOptionsFlat {
    fn check(self, settings: &NetworkSettings) -> Result<SessionOptions, String> {
        let network = if self.network.is_some() || self.network_allow.is_some() {
            Some(settings.policy(
                self.network.as_deref(),
                self.network_allow.as_deref().unwrap_or_default(),
            )?)
        } else {
            None
        };
        let flavor = match self.flavor.as_deref() {
            Some(name) => Some(Flavor::parse(name).map_err(|e| e.to_string())?),
            None => None,
        };
        if let Some(id) = &self.session_id {
            crate::backend::local::validate_session_id(id).map_err(|e| e.to_string())?;
        }
        if let Some(timeout) = self.timeout_seconds
            && !(timeout.is_finite() && timeout > 0.0 && timeout <= 86_400.0)
        {
            return Err(format!(
                "timeout_seconds must be a number of seconds above 0 and at most 86400, got {timeout}"
            ));
        }
        Ok(SessionOptions {
            session_id: self.session_id,
            flavor,
            timeout_seconds: self.timeout_seconds,
            network,
        })
    }
}

fn parse<T: for<'de> Deserialize<'de>>(params: &Value, what: &str) -> Result<T, String> {
    T::deserialize(params).map_err(|e| format!("{what} params: {e}"))
}

/// A command, checked.
struct CommandJob {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    stdin: Option<Vec<u8>>,
    template: String,
    session: SessionOptions,
}

fn command_job(params: &Value, network: &NetworkSettings) -> Result<CommandJob, String> {
    let params: CommandParams = parse(params, "command")?;
    let argv = match (params.command, params.argv) {
        (Some(line), None) => {
            if line.trim().is_empty() {
                return Err("command params: \"command\" is empty".into());
            }
            vec!["/bin/sh".to_owned(), "-c".to_owned(), line]
        }
        (None, Some(argv)) => {
            if argv.first().is_none_or(|p| p.is_empty()) {
                return Err("command params: \"argv\" must start with a program name".into());
            }
            argv
        }
        (Some(_), Some(_)) => {
            return Err(
                "command params: give either \"command\" (a shell line) or \"argv\" (a list), not both"
                    .into(),
            );
        }
        (None, None) => {
            return Err(
                "command params: give \"command\" (a shell line, run with /bin/sh -c) or \"argv\" (a list: program and arguments)"
                    .into(),
            );
        }
    };
    Ok(CommandJob {
        argv,
        env: params.env.into_iter().collect(),
        stdin: params.stdin.map(String::into_bytes),
        template: params.template.unwrap_or_else(|| "python".into()),
        session: params.session.check(network)?,
    })
}

/// Runs `command` tasks: a shell line (`{"command": "make test"}`) or an argv list
/// (`{"argv": ["make", "test"]}`), with optional `env`, `stdin`, `session_id`, `flavor`,
/// `timeout_seconds` and `template`.
pub struct CommandHandler {
    shared: Arc<HandlerShared>,
}

impl CommandHandler {
    /// A `command` handler.
    pub fn new(shared: Arc<HandlerShared>) -> CommandHandler {
        CommandHandler { shared }
    }
}

impl TaskHandler for CommandHandler {
    async fn run(&self, context: TaskContext) -> Result<Value, TaskFailure> {
        let job =
            command_job(context.params(), &self.shared.network).map_err(TaskFailure::permanent)?;
        let request = ExecRequest {
            argv: job.argv,
            env: job.env,
            stdin: job.stdin,
            timeout: job.session.timeout_seconds.map(Duration::from_secs_f64),
        };
        run_job(
            &self.shared,
            &context,
            &job.template,
            job.session,
            Job::Exec(request),
        )
        .await
    }

    fn validate(&self, params: &Value) -> Result<(), String> {
        command_job(params, &self.shared.network).map(|_| ())
    }
}

/// Runs `code` tasks: `{"language": "python"|"node"|"bash", "code": "..."}` plus the session
/// options. Within one session, interpreter state persists from one call to the next.
pub struct CodeHandler {
    shared: Arc<HandlerShared>,
}

impl CodeHandler {
    /// A `code` handler.
    pub fn new(shared: Arc<HandlerShared>) -> CodeHandler {
        CodeHandler { shared }
    }
}

struct CodeJob {
    language: Language,
    code: String,
    session: SessionOptions,
}

fn code_job(params: &Value, network: &NetworkSettings) -> Result<CodeJob, String> {
    let params: CodeParams = parse(params, "code")?;
    let language = Language::parse(&params.language).map_err(|e| format!("code params: {e}"))?;
    if !params.env.is_empty() || params.stdin.is_some() {
        return Err(
            "code params: \"env\" and \"stdin\" are not supported for code (the interpreter is shared by the session); use a command task"
                .into(),
        );
    }
    Ok(CodeJob {
        language,
        code: params.code,
        session: params.session.check(network)?,
    })
}

impl TaskHandler for CodeHandler {
    async fn run(&self, context: TaskContext) -> Result<Value, TaskFailure> {
        let job =
            code_job(context.params(), &self.shared.network).map_err(TaskFailure::permanent)?;
        let request = ReplRequest {
            language: job.language,
            code: job.code,
            timeout: job.session.timeout_seconds.map(Duration::from_secs_f64),
        };
        let template = match job.language {
            Language::Node => "node",
            _ => "python",
        };
        run_job(
            &self.shared,
            &context,
            template,
            job.session,
            Job::Repl(request),
        )
        .await
    }

    fn validate(&self, params: &Value) -> Result<(), String> {
        code_job(params, &self.shared.network).map(|_| ())
    }
}

/// Runs one operator-defined task type: its command template filled with the task's params,
/// each placeholder one whole argument, never through a shell.
pub struct OperatorHandler {
    shared: Arc<HandlerShared>,
    spec: Arc<TaskTypeSpec>,
}

impl OperatorHandler {
    /// A handler for one operator-defined type.
    pub fn new(shared: Arc<HandlerShared>, spec: Arc<TaskTypeSpec>) -> OperatorHandler {
        OperatorHandler { shared, spec }
    }
}

impl TaskHandler for OperatorHandler {
    async fn run(&self, context: TaskContext) -> Result<Value, TaskFailure> {
        let params = context.params();
        self.spec
            .validate(params)
            .map_err(|e| TaskFailure::permanent(e.to_string()))?;
        let argv = self
            .spec
            .render_argv(params)
            .map_err(|e| TaskFailure::permanent(e.to_string()))?;
        let flavor = match self.spec.defaults().flavor.as_deref() {
            Some(name) => {
                Some(Flavor::parse(name).map_err(|e| TaskFailure::permanent(e.to_string()))?)
            }
            None => None,
        };
        let session = SessionOptions {
            session_id: context.session_id().map(str::to_owned),
            flavor,
            timeout_seconds: self.spec.defaults().timeout.map(|t| t.as_secs_f64()),
            network: None,
        };
        let request = ExecRequest {
            argv,
            env: Vec::new(),
            stdin: None,
            timeout: self.spec.defaults().timeout,
        };
        run_job(
            &self.shared,
            &context,
            "python",
            session,
            Job::Exec(request),
        )
        .await
    }

    fn validate(&self, params: &Value) -> Result<(), String> {
        self.spec.validate(params).map_err(|e| e.to_string())?;
        self.spec
            .render_argv(params)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

enum Job {
    Exec(ExecRequest),
    Repl(ReplRequest),
}

async fn run_job(
    shared: &HandlerShared,
    context: &TaskContext,
    template: &str,
    options: SessionOptions,
    job: Job,
) -> Result<Value, TaskFailure> {
    let session_id = options.session_id.as_deref().or(context.session_id());
    // First, before anything can fail this attempt: the attempts past the kept ones go.
    if context.attempt() > KEPT_ATTEMPTS {
        forget_old_outputs(&shared.outputs_dir, context.id(), context.attempt());
    }
    // The task's owner claims its session (already done at submission for a session it named;
    // a fresh one is claimed here, on the node that makes it).
    if let (Some(id), Some(owner)) = (session_id, context.owner()) {
        let fresh = context.fresh_session() && context.session_id() == Some(id);
        shared
            .sessions
            .claim(id, owner, fresh)
            .map_err(session_failure)?;
    }
    let lease = acquire_waiting(
        shared,
        context,
        session_id,
        options.flavor,
        template,
        options.network.as_ref(),
    )
    .await?;
    let path = shared.output_path(context.id(), context.attempt());
    let sink = OutputSink::create(&path, shared.output_cap).map_err(|e| {
        TaskFailure::retryable(format!(
            "cannot create the output file {}: {e}",
            path.display()
        ))
    })?;
    let mut progress = sink.progress();
    // A pause of the running task freezes its process tree and stops its timeout clock.
    let control = ExecControl {
        cancel: context.cancellation().clone(),
        paused: context.paused(),
    };
    let backend = shared.sessions.backend();
    let language = match &job {
        Job::Repl(request) => Some(request.language),
        Job::Exec(_) => None,
    };
    let run = async {
        match job {
            Job::Exec(request) => backend.exec(lease.sandbox(), request, &sink, control).await,
            Job::Repl(request) => backend.repl(lease.sandbox(), request, &sink, control).await,
        }
    };
    let forward = async {
        while progress.changed().await.is_ok() {
            let latest = progress.borrow_and_update().clone();
            if let Some(line) = latest {
                // A report the engine refuses (the task is ending) is not the task's failure.
                let _ = context.progress(line.fraction, line.message).await;
            }
        }
        std::future::pending::<()>().await;
    };
    let outcome = tokio::select! {
        outcome = run => outcome,
        () = forward => unreachable!("progress forwarding never ends on its own"),
    };
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(BackendError::NoSuchSandbox(name)) => {
            shared.sessions.forget(&lease);
            return Err(TaskFailure::retryable(format!(
                "the sandbox {name:?} of session {:?} is gone (stopped by a cancel, or lost by its server); the session was forgotten and the next attempt starts a fresh one",
                lease.id()
            )));
        }
        Err(error) => return Err(TaskFailure::retryable(error.to_string())),
    };
    let (kept, dropped) = sink.sizes();
    let tail = sink.tail();
    let mut result = report(
        &outcome,
        lease.id(),
        language,
        Tails {
            output: &tail,
            stderr: &sink.stream_tail(Stream::Stderr),
        },
        kept,
        dropped,
    );
    if outcome.reason == EndReason::Cancelled && context.timed_out() {
        // Stopped by the task's timeout (the engine's clock), not by a cancel.
        result["reason"] = json!("timed out");
    }
    drop(lease);
    if outcome.success() {
        return Ok(result);
    }
    Err(failure(&outcome, &tail, lease_flavor_hint(options.flavor)).with_result(result))
}

/// The tails a result carries: of the combined output and of stderr alone.
struct Tails<'a> {
    output: &'a str,
    stderr: &'a str,
}

fn lease_flavor_hint(flavor: Option<Flavor>) -> String {
    match flavor {
        Some(Flavor::Large) => "the large flavor is the biggest".into(),
        _ => "use a larger flavor (\"medium\" or \"large\")".into(),
    }
}

/// Takes the task's session. When every session is taken and some are busy running tasks, the
/// limit passes as they finish (an idle session can then be evicted, or its slot is free): the
/// attempt waits for that, as it would for a free slot in the queue, until it is cancelled or
/// times out, rather than failing for a moment's crowding (more tasks may run at once than there
/// are sessions). A limit that waiting cannot lift fails the attempt at once.
async fn acquire_waiting(
    shared: &HandlerShared,
    context: &TaskContext,
    session_id: Option<&str>,
    flavor: Option<crate::backend::Flavor>,
    template: &str,
    network: Option<&NetworkPolicy>,
) -> Result<crate::session::SessionLease, TaskFailure> {
    let mut pause = Duration::from_millis(20);
    let mut waited = false;
    loop {
        match shared
            .sessions
            .acquire(session_id, flavor, template, network)
            .await
        {
            Ok(lease) => {
                if waited {
                    tracing::debug!(task = %context.id(), "a session came free");
                }
                return Ok(lease);
            }
            Err(error @ SessionError::LimitReached { .. })
                if shared.sessions.list().iter().any(|s| s.running_tasks > 0) =>
            {
                if !waited {
                    tracing::debug!(task = %context.id(), %error, "waiting for a session to come free");
                    waited = true;
                }
                tokio::select! {
                    () = context.cancellation().cancelled() => {
                        return Err(TaskFailure::retryable(format!(
                            "stopped while waiting for a session: {error}"
                        )));
                    }
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            Err(error) => return Err(session_failure(error)),
        }
    }
}

fn session_failure(error: SessionError) -> TaskFailure {
    match error {
        SessionError::LimitReached { .. }
        | SessionError::ShuttingDown
        | SessionError::Backend(_) => TaskFailure::retryable(error.to_string()),
        SessionError::NotFound(_)
        | SessionError::FlavorMismatch { .. }
        | SessionError::NetworkMismatch { .. } => TaskFailure::permanent(error.to_string()),
        SessionError::NoFiles(..) => TaskFailure::retryable(error.to_string()),
        SessionError::Claimed(_) => TaskFailure::permanent(format!(
            "{error}: use a session of your own, or name none for a fresh one"
        )),
    }
}

fn report(
    outcome: &ExecOutcome,
    session: &str,
    language: Option<Language>,
    tails: Tails<'_>,
    kept: u64,
    dropped: u64,
) -> Value {
    let (exit_code, signal) = match outcome.exit {
        Some(ExitStatus::Code(code)) => (Some(code), None),
        Some(ExitStatus::Signal(signal)) => (None, Some(signal)),
        None => (None, None),
    };
    let mut value = json!({
        "session_id": session,
        "exit_code": exit_code,
        "signal": signal,
        "reason": outcome.reason.to_string(),
        "duration_ms": outcome.duration_ms,
        "peak_memory_bytes": outcome.peak_memory_bytes,
        "output_tail": tails.output,
        "stderr_tail": tails.stderr,
        "output_bytes": kept,
        "output_dropped_bytes": dropped,
        "isolation": outcome.isolation,
    });
    if let Some(language) = language {
        value["language"] = json!(language.as_str());
    }
    value
}

fn failure(outcome: &ExecOutcome, tail: &str, flavor_hint: String) -> TaskFailure {
    let what = match (&outcome.reason, outcome.exit) {
        (EndReason::Exited, Some(ExitStatus::Code(code))) => format!("exit code {code}"),
        (EndReason::Exited, Some(ExitStatus::Signal(signal))) => {
            format!("killed by signal {signal}")
        }
        (EndReason::MemoryLimit, _) => format!("killed: memory limit ({flavor_hint})"),
        (reason, _) => reason.to_string(),
    };
    let tail: String = {
        let trimmed = tail.trim_end();
        let start = trimmed.char_indices().rev().nth(499).map_or(0, |(i, _)| i);
        trimmed[start..].to_owned()
    };
    let message = if tail.is_empty() {
        format!("{what} after {} ms (no output)", outcome.duration_ms)
    } else {
        format!(
            "{what} after {} ms; output ends with:\n{tail}",
            outcome.duration_ms
        )
    };
    match outcome.reason {
        // The same program in the same sandbox would hit the same limit.
        EndReason::MemoryLimit => TaskFailure::permanent(message),
        _ => TaskFailure::retryable(message),
    }
}
