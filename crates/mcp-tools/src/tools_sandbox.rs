//! The sandbox tools: `execute_code`, `execute_command`, `get_sessions`, `stop_session`,
//! `get_volume_mappings`. `execute_*` run as durable tasks of the built-in `code` and `command`
//! types: they wait for the result (or, for a tasks-extension client, answer with the task).

use std::time::Duration;

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolRequestParams, CallToolResult};
use rmcp::schemars::JsonSchema;
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, tool, tool_router};
use sandbox_wrapper::session::SessionInfo;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use task_core::Task;

use crate::server::{McpServer, ToolError, answer, finish};
use crate::wire::SubmitOptions;

/// The task types whose tasks run in a sandbox session and answer like `execute_*`.
pub(crate) fn is_sandbox_type(task_type: &str) -> bool {
    matches!(task_type, "command" | "code")
}

/// A session id a client gave, checked.
pub(crate) fn check_session_id(session: &str) -> Result<(), ToolError> {
    sandbox_wrapper::backend::local::validate_session_id(session).map_err(|e| {
        ToolError::invalid(
            e.to_string(),
            "use 1 to 64 letters, digits, '-' or '_', or omit session_id for a fresh session",
        )
    })
}

/// The arguments of an `execute_*` call.
pub(crate) enum SandboxCall {
    /// `execute_code`.
    Code(ExecuteCodeArgs),
    /// `execute_command`.
    Command(ExecuteCommandArgs),
}

impl SandboxCall {
    /// The call's `wait_seconds`.
    fn wait_seconds(&self) -> Option<f64> {
        match self {
            SandboxCall::Code(args) => args.wait_seconds,
            SandboxCall::Command(args) => args.wait_seconds,
        }
    }
}

/// How much of the output an answer about a run still going carries.
const RUNNING_TAIL_BYTES: usize = 4096;

/// `execute_code`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ExecuteCodeArgs {
    /// The code to run. Within one session, state (variables, imports, definitions) persists
    /// from one call to the next, as in a REPL.
    pub code: String,
    /// The language: "python" (default), "node" or "bash".
    #[serde(default, alias = "language")]
    pub template: Option<String>,
    /// The session to run in; omit for a fresh one (the answer names it: pass it next time to
    /// keep state and files).
    #[serde(default)]
    pub session_id: Option<String>,
    /// The sandbox size for a new session: "small" (default), "medium" or "large".
    #[serde(default)]
    pub flavor: Option<String>,
    /// The most seconds to run (1 to 300; default the server's execution timeout).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// The network of a new session: "none" (no network), "allow" (only allowed names, through
    /// the server's filtering proxy) or "host" (when the server enables it); default the
    /// server's (usually "none"). A session keeps the network it was made with.
    #[serde(default)]
    pub network: Option<String>,
    /// Names a new session of network "allow" may reach besides the server's own list
    /// ("docs.example.com", ".example.com" for every name under it, "example.com:8080"), within
    /// what the server lets callers add.
    #[serde(default)]
    pub network_allow: Option<Vec<String>>,
    /// The most seconds to wait for the result (0 to 3600; default the server's call wait, 20
    /// s). A run still going then is answered with its task id, progress and output so far; it
    /// goes on, and get_task_result or wait_for_tasks waits for it.
    #[serde(default)]
    pub wait_seconds: Option<f64>,
}

/// `execute_command`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ExecuteCommandArgs {
    /// The shell command line, run with `sh -c` in the session's work directory.
    pub command: String,
    /// The session's template when it is new ("python" or "node"; both have a shell).
    #[serde(default)]
    pub template: Option<String>,
    /// The session to run in; omit for a fresh one (the answer names it).
    #[serde(default)]
    pub session_id: Option<String>,
    /// The sandbox size for a new session: "small" (default), "medium" or "large".
    #[serde(default)]
    pub flavor: Option<String>,
    /// The most seconds to run (1 to 1800; default the server's execution timeout).
    #[serde(default)]
    pub timeout: Option<f64>,
    /// The network of a new session: "none" (no network), "allow" (only allowed names, through
    /// the server's filtering proxy) or "host" (when the server enables it); default the
    /// server's (usually "none"). A session keeps the network it was made with.
    #[serde(default)]
    pub network: Option<String>,
    /// Names a new session of network "allow" may reach besides the server's own list
    /// ("docs.example.com", ".example.com" for every name under it, "example.com:8080"), within
    /// what the server lets callers add.
    #[serde(default)]
    pub network_allow: Option<Vec<String>>,
    /// The most seconds to wait for the result (0 to 3600; default the server's call wait, 20
    /// s). A run still going then is answered with its task id, progress and output so far; it
    /// goes on, and get_task_result or wait_for_tasks waits for it.
    #[serde(default)]
    pub wait_seconds: Option<f64>,
}

/// `get_sessions`.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct GetSessionsArgs {
    /// Only this session.
    #[serde(default)]
    pub session_id: Option<String>,
}

/// `stop_session`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct StopSessionArgs {
    /// The session to stop: its processes are killed and its work directory deleted.
    pub session_id: String,
}

/// The answer of `execute_code` and `execute_command`.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct ExecutionAnswer {
    /// The task that ran it (its output stays readable with read_task_output).
    pub task_id: String,
    /// "completed", or for a run that did not succeed "failed", "timeout" or "cancelled"; for
    /// a run still going when the call's wait ended, "pending", "scheduled", "running" or
    /// "paused" (with `progress`, `waited_seconds` and `next`).
    pub status: String,
    /// The session it ran in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The exit code (0 is success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// The signal that killed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    /// Why it ended: "exited", "timed out" (the task's timeout), "killed: memory limit",
    /// "killed by a signal", "cancelled".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// How long it ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Its peak memory, where measurable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// The end of its output (stdout and stderr as written; at most 4 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
    /// The end of its stderr alone (at most 4 KiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_tail: Option<String>,
    /// Bytes of output kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// The isolation it ran under.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolation: Option<String>,
    /// The language, for code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Why it did not succeed (a run that failed also has its exit_code or signal, reason,
    /// output_tail and stderr_tail above).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// While it runs: percent done, 0 to 100.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// While it runs: its latest progress message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress_message: Option<String>,
    /// While it runs: the estimated seconds left, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// While it runs: how long this call waited for it (`wait_seconds`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_seconds: Option<f64>,
    /// While it runs: how to follow it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A session as clients see it.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct SessionView {
    /// Its id.
    pub session_id: String,
    /// "creating", "ready", "running", "stopped"...
    pub status: String,
    /// Its template (python, node).
    pub template: String,
    /// Its flavor.
    pub flavor: String,
    /// Its network: "none", "host", or "allow" and what it may reach.
    pub network: String,
    /// When it was made (Unix seconds).
    pub created_at: f64,
    /// When it was last used (Unix seconds).
    pub last_used_at: f64,
    /// Tasks running in it now.
    pub running_tasks: usize,
    /// Seconds idle; once idle for the server's session timeout, it is stopped.
    pub idle_seconds: f64,
}

/// The answer of `get_sessions`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct SessionsAnswer {
    /// Your live sessions.
    pub sessions: Vec<SessionView>,
    /// How many.
    pub count: usize,
}

/// The answer of `stop_session`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct StopAnswer {
    /// The session.
    pub session_id: String,
    /// "stopped".
    pub status: String,
    /// What happened.
    pub message: String,
}

/// A volume mapping as clients see it.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct VolumeView {
    /// The host directory.
    pub host_path: String,
    /// Where sandboxes see it.
    pub container_path: String,
    /// Whether sandboxes may only read it.
    pub read_only: bool,
}

/// The answer of `get_volume_mappings`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct VolumesAnswer {
    /// The mappings the operator configured.
    pub volume_mappings: Vec<VolumeView>,
    /// How many.
    pub count: usize,
}

#[tool_router(router = sandbox_tools, vis = "pub(crate)")]
impl McpServer {
    #[tool(
        description = "Run code in a sandboxed, persistent interpreter and return its output: template \"python\" (default), \"node\" or \"bash\". State (variables, imports, functions) persists within a session_id across calls; omit session_id for a fresh session (the answer names it). flavor small|medium|large sizes a new session; network none|allow|host (with network_allow names) gives a new session network, within what the server allows; timeout in seconds (1-300). The run is a durable task: its task_id works with the background-task tools. A run still going after wait_seconds (default 20) is answered with its task_id, progress and output so far, and goes on (get_task_result or wait_for_tasks waits for it).",
        output_schema = schema_for_output::<ExecutionAnswer>()
    )]
    async fn execute_code(
        &self,
        Parameters(args): Parameters<ExecuteCodeArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.execute(SandboxCall::Code(args), context).await)
    }

    #[tool(
        description = "Run a shell command (sh -c) in a sandbox and return its output and exit code. The session's work directory persists across calls with the same session_id (omit it for a fresh session; the answer names it). flavor small|medium|large sizes a new session; network none|allow|host (with network_allow names) gives a new session network, within what the server allows; timeout in seconds (1-1800). The run is a durable task: its task_id works with the background-task tools. A run still going after wait_seconds (default 20) is answered with its task_id, progress and output so far, and goes on (get_task_result or wait_for_tasks waits for it).",
        output_schema = schema_for_output::<ExecutionAnswer>()
    )]
    async fn execute_command(
        &self,
        Parameters(args): Parameters<ExecuteCommandArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.execute(SandboxCall::Command(args), context).await)
    }

    #[tool(
        description = "Your live sandbox sessions (or only session_id): status, template, flavor, running tasks, idle time.",
        output_schema = schema_for_output::<SessionsAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn get_sessions(
        &self,
        Parameters(args): Parameters<GetSessionsArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.sessions(args))
    }

    #[tool(
        description = "Stop a sandbox session: its processes are killed, its interpreters end and its work directory is deleted. Tasks still running in it fail.",
        output_schema = schema_for_output::<StopAnswer>(),
        annotations(destructive_hint = true)
    )]
    async fn stop_session(
        &self,
        Parameters(args): Parameters<StopSessionArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.stop(args).await)
    }

    #[tool(
        description = "The host directories the operator binds into every sandbox: host path, path inside the sandbox, read-only or not.",
        output_schema = schema_for_output::<VolumesAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn get_volume_mappings(&self) -> Result<CallToolResult, McpError> {
        let volume_mappings: Vec<VolumeView> = self
            .core
            .options
            .volumes
            .iter()
            .map(|v| VolumeView {
                host_path: v.host.display().to_string(),
                container_path: v.guest.display().to_string(),
                read_only: v.read_only,
            })
            .collect();
        let text = if volume_mappings.is_empty() {
            "No volumes are mapped: host directories are bound into sandboxes only when the operator configures them at msbd's start."
                .to_owned()
        } else {
            volume_mappings
                .iter()
                .map(|v| {
                    format!(
                        "{} -> {}{}",
                        v.host_path,
                        v.container_path,
                        if v.read_only { " (read-only)" } else { "" }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let volumes = VolumesAnswer {
            count: volume_mappings.len(),
            volume_mappings,
        };
        Ok(answer(text, &volumes))
    }
}

impl McpServer {
    /// Submits the task an `execute_*` call (as it came from the client) asks for.
    pub(crate) async fn start_sandbox_task(
        &self,
        request: &CallToolRequestParams,
    ) -> Result<Task, ToolError> {
        let arguments = Value::Object(request.arguments.clone().unwrap_or_default());
        let bad = |e: serde_json::Error| {
            ToolError::invalid(
                format!("the arguments of {} are not valid: {e}", request.name),
                "see the tool's input schema",
            )
        };
        let call = match &*request.name {
            "execute_code" => SandboxCall::Code(serde_json::from_value(arguments).map_err(bad)?),
            "execute_command" => {
                SandboxCall::Command(serde_json::from_value(arguments).map_err(bad)?)
            }
            other => {
                return Err(ToolError::new(
                    "OPERATION_FAILED",
                    format!("{other} does not run as a task"),
                    "call it without the tasks extension",
                ));
            }
        };
        self.submit_sandbox_call(call).await
    }

    /// Submits the task of an `execute_*` call.
    async fn submit_sandbox_call(&self, call: SandboxCall) -> Result<Task, ToolError> {
        let (task_type, params, session, timeout, max_timeout) = match call {
            SandboxCall::Code(args) => {
                let language = args.template.unwrap_or_else(|| "python".into());
                let mut params = json!({ "language": language, "code": args.code });
                if let Some(flavor) = args.flavor {
                    params["flavor"] = flavor.into();
                }
                network_params(&mut params, args.network, args.network_allow);
                ("code", params, args.session_id, args.timeout, 300.0)
            }
            SandboxCall::Command(args) => {
                let mut params = json!({ "command": args.command });
                if let Some(template) = args.template {
                    params["template"] = template.into();
                }
                if let Some(flavor) = args.flavor {
                    params["flavor"] = flavor.into();
                }
                network_params(&mut params, args.network, args.network_allow);
                ("command", params, args.session_id, args.timeout, 1800.0)
            }
        };
        if let Some(seconds) = timeout
            && !(seconds > 0.0 && seconds <= max_timeout)
        {
            return Err(ToolError::invalid(
                format!("timeout {seconds} is out of range"),
                format!("give 1 to {max_timeout} seconds"),
            ));
        }
        let options = SubmitOptions {
            timeout_seconds: timeout,
            session_id: session.filter(|s| !s.is_empty()),
            ..SubmitOptions::default()
        };
        let new = self.new_task(task_type, Some(params), &options)?;
        let submitted = self
            .core
            .wrapper
            .submit(new)
            .await
            .map_err(ToolError::from_core)?;
        Ok(submitted.task)
    }

    /// `execute_*` without the tasks extension: submit, wait up to `wait_seconds`, answer with
    /// the result, or with where the task stands when it is still going (a client gives up on
    /// a call after about a minute, and must not lose the task's id with it).
    async fn execute(
        &self,
        call: SandboxCall,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ToolError> {
        let wait = self.call_wait(call.wait_seconds(), "wait_seconds")?;
        let task = self.submit_sandbox_call(call).await?;
        self.track_call(&context.id, task.id).await;
        let waited = self.await_task(task.id, wait, &context, true).await;
        if !context.ct.is_cancelled() {
            self.untrack_call(&context.id);
        }
        let task = waited?;
        if !task.status.is_terminal() {
            return Ok(self.still_running_answer(&task, wait));
        }
        Ok(self.sandbox_answer(&task))
    }

    /// The answer of an `execute_*` call whose task is still going when the call's wait ends:
    /// not an error, but the task's id, where it stands, its output so far and how to follow it.
    fn still_running_answer(&self, task: &Task, waited: Duration) -> CallToolResult {
        let view = self.view(task);
        let id = task.id;
        let tail = self
            .core
            .wrapper
            .read_output_tail(
                id,
                task.attempt,
                sandbox_wrapper::output::OutputStream::Combined,
                RUNNING_TAIL_BYTES,
            )
            .ok()
            .flatten();
        let mut standing = format!("{}, {:.0}%", view.status, view.progress);
        if let Some(message) = &view.progress_message {
            standing.push_str(&format!(": {message}"));
        }
        if let Some(eta) = view.eta_seconds {
            standing.push_str(&format!("; about {eta:.0} s left"));
        }
        let next = format!(
            "the task goes on: wait for it with get_task_result(task_id=\"{id}\", wait=true) or wait_for_tasks(task_ids=[\"{id}\"]); see its latest output with read_task_output(task_id=\"{id}\", tail={RUNNING_TAIL_BYTES}); stop it with cancel_task(task_id=\"{id}\")"
        );
        let mut text = format!(
            "Still going after {} s: task {id} ({standing}).\n",
            waited.as_secs_f64()
        );
        if let Some((_, chunk)) = &tail
            && !chunk.data.is_empty()
        {
            text.push_str(&chunk.data);
            if !chunk.data.ends_with('\n') {
                text.push('\n');
            }
        }
        text.push_str(&format!(
            "[Session: {}] [Status: {}] [Task: {id}]\nWhat to do: {next}.",
            view.session_id.as_deref().unwrap_or("-"),
            view.status
        ));
        let running = ExecutionAnswer {
            task_id: id.to_string(),
            status: view.status.clone(),
            session_id: view.session_id.clone(),
            progress: Some(view.progress),
            progress_message: view.progress_message.clone(),
            eta_seconds: view.eta_seconds,
            waited_seconds: Some(waited.as_secs_f64()),
            output_tail: tail.as_ref().map(|(_, chunk)| chunk.data.clone()),
            output_bytes: tail.as_ref().map(|(_, chunk)| chunk.size),
            next: Some(next),
            ..ExecutionAnswer::default()
        };
        answer(text, &running)
    }

    pub(crate) fn sessions(&self, args: GetSessionsArgs) -> Result<CallToolResult, ToolError> {
        let sessions = self.core.wrapper.sessions();
        let now = sandbox_wrapper::unix_now();
        let list: Vec<SessionInfo> = match args.session_id.filter(|s| !s.is_empty()) {
            Some(id) => {
                if !self.owns_session(&id) {
                    return Err(self.session_not_found(&id));
                }
                vec![sessions.get(&id).map_err(|_| self.session_not_found(&id))?]
            }
            None => sessions
                .list()
                .into_iter()
                .filter(|s| self.owns_session(&s.id))
                .collect(),
        };
        let views: Vec<SessionView> = list
            .into_iter()
            .map(|s| SessionView {
                idle_seconds: if s.running_tasks > 0 {
                    0.0
                } else {
                    (now - s.last_used_at).max(0.0)
                },
                session_id: s.id,
                status: serde_json::to_value(s.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                template: s.template,
                flavor: s.flavor.as_str().to_owned(),
                network: s.network,
                created_at: s.created_at,
                last_used_at: s.last_used_at,
                running_tasks: s.running_tasks,
            })
            .collect();
        let text = if views.is_empty() {
            "No live sessions.".to_owned()
        } else {
            views
                .iter()
                .map(|s| {
                    format!(
                        "{}: {} ({}, {}, network {}), {} running, idle {:.0} s",
                        s.session_id,
                        s.status,
                        s.template,
                        s.flavor,
                        s.network,
                        s.running_tasks,
                        s.idle_seconds
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        Ok(answer(
            text,
            &SessionsAnswer {
                count: views.len(),
                sessions: views,
            },
        ))
    }

    pub(crate) async fn stop(&self, args: StopSessionArgs) -> Result<CallToolResult, ToolError> {
        let id = args.session_id;
        check_session_id(&id)?;
        if !self.owns_session(&id) {
            return Err(self.session_not_found(&id));
        }
        self.core
            .wrapper
            .sessions()
            .stop(&id)
            .await
            .map_err(|e| match e {
                sandbox_wrapper::session::SessionError::NotFound(_) => self.session_not_found(&id),
                other => ToolError::new("OPERATION_FAILED", other.to_string(), "try again"),
            })?;
        let stop = StopAnswer {
            message: format!(
                "Session {id} is stopped: its processes are gone and its work directory deleted."
            ),
            session_id: id,
            status: "stopped".into(),
        };
        Ok(answer(stop.message.clone(), &stop))
    }
}

impl McpServer {
    /// The refusal for a session that is not (or no longer) this principal's.
    pub(crate) fn session_not_found(&self, id: &str) -> ToolError {
        let timeout = self.core.wrapper.sessions().config().session_timeout;
        ToolError::new(
            "SESSION_NOT_FOUND",
            format!("no live session {id:?} of yours"),
            format!(
                "get_sessions lists yours; a session idle for {} s is stopped",
                timeout.as_secs()
            ),
        )
    }
}

/// Adds an `execute_*` call's network choice to its task's params (the handler checks it).
fn network_params(params: &mut Value, network: Option<String>, allow: Option<Vec<String>>) {
    if let Some(network) = network {
        params["network"] = network.into();
    }
    if let Some(allow) = allow {
        params["network_allow"] = allow.into();
    }
}
