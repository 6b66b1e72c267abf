//! [`McpServer`]: the MCP server handler. It owns nothing but a [`Wrapper`] handle and the
//! principal it serves; the tools live in `tools_*.rs`, each an `impl McpServer` block with its
//! own router, merged here.
//!
//! The MCP tasks extension: for a client that declares it, `execute_command` and `execute_code`
//! answer at once with a task whose id is the engine's task id; `tasks/get` and `tasks/cancel`
//! read and change the durable task store, so they answer across restarts of msbd.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::ToolCallContext;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ContentBlock,
    CreateTaskResult, CustomRequest, CustomResult, DetailedTask, GetTaskParams, GetTaskResult,
    Implementation, ListToolsResult, PaginatedRequestParams, ProgressNotificationParam,
    ServerCapabilities, ServerConfig, Task as McpTask, TaskPayload, TaskStatus, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use sandbox_wrapper::Wrapper;
use sandbox_wrapper::backend::VolumeMapping;
use serde::Serialize;
use serde_json::Value;
use task_core::{Status, Task, TaskEvent, TaskId};

use crate::arguments;
use crate::wire::{self, TaskView};

/// The principal of a stdio connection: whoever started msbd. Stable across restarts, so that
/// the tasks it created are still its own after one.
pub const STDIO_PRINCIPAL: &str = "stdio";

/// The tools that only operators should see (listed when [`ServerOptions::supervision_tools`]).
pub const SUPERVISION_TOOLS: [&str; 5] = [
    "get_background_task_status",
    "restart_background_tasks",
    "pause_background_tasks",
    "resume_background_tasks",
    "health_check",
];

/// The method a transport substitutes for a request over its size limit (params `bytes`,
/// `limit`), so that the server answers it with a clear JSON-RPC error under the request's id.
pub const REQUEST_TOO_LARGE_METHOD: &str = "msbd/request_too_large";

/// The tools that run as an MCP task for a client that declares the tasks extension.
pub const TASK_TOOLS: [&str; 2] = ["execute_command", "execute_code"];

/// What the server offers; plain values (msbd fills them from its configuration).
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Whether the supervision tools are listed and callable.
    pub supervision_tools: bool,
    /// The timeout of `execute_command` and `execute_code` when none is given (and the default
    /// of background tasks of the built-in types).
    pub default_timeout: Duration,
    /// The longest any call waits for tasks (`wait_seconds`, `get_task_result`'s and
    /// `wait_for_tasks`' `timeout`).
    pub max_wait: Duration,
    /// How long a call waits for tasks when it does not say: `execute_command` and
    /// `execute_code` then answer with where the task stands, `get_task_result(wait=true)` and
    /// `wait_for_tasks` with what has finished. Below the ~60 s after which agent clients give
    /// up on a call.
    pub call_wait: Duration,
    /// The poll interval suggested to tasks-extension clients.
    pub poll_interval: Duration,
    /// The largest file `write_file` makes (appends included), and the most bytes one
    /// `read_file` returns.
    pub max_file_bytes: u64,
    /// How long finished tasks are kept (the task's TTL in the tasks extension); `None` forever.
    pub retention: Option<Duration>,
    /// The host directories bound into sandboxes (for `get_volume_mappings`).
    pub volumes: Vec<VolumeMapping>,
    /// The server's name and version in `initialize`.
    pub server_name: String,
    /// See `server_name`.
    pub server_version: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            supervision_tools: true,
            default_timeout: Duration::from_secs(300),
            max_wait: Duration::from_secs(3600),
            call_wait: Duration::from_secs(20),
            poll_interval: Duration::from_millis(500),
            max_file_bytes: 16 * 1024 * 1024,
            retention: Some(Duration::from_secs(7 * 86_400)),
            volumes: Vec::new(),
            server_name: "msbd".into(),
            server_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// State shared by every handler (one per connection or HTTP session).
pub(crate) struct Core {
    pub(crate) wrapper: Wrapper,
    pub(crate) options: ServerOptions,
    /// Set by [`McpServer::start_draining`]: every tool call is refused with `SHUTTING_DOWN`.
    pub(crate) draining: AtomicBool,
    /// Tool calls rmcp's router is answering ([`McpServer::calls_answered`]).
    pub(crate) calls_under_way: AtomicUsize,
    /// Told when `calls_under_way` goes down.
    pub(crate) call_ended: tokio::sync::Notify,
    /// Fired by [`McpServer::stop_waiting`]: calls waiting for a task answer at once.
    pub(crate) waits_end: tokio_util::sync::CancellationToken,
}

/// One tool call under way, counted in [`Core::calls_under_way`] while it lives.
struct CallUnderWay<'a>(&'a Core);

impl<'a> CallUnderWay<'a> {
    fn new(core: &'a Core) -> CallUnderWay<'a> {
        core.calls_under_way.fetch_add(1, Ordering::AcqRel);
        CallUnderWay(core)
    }
}

impl Drop for CallUnderWay<'_> {
    fn drop(&mut self) {
        self.0.calls_under_way.fetch_sub(1, Ordering::AcqRel);
        self.0.call_ended.notify_waiters();
    }
}

/// How long a cancelled request is remembered for the task of its `execute_*` call.
const CANCELLED_CALL_KEPT: Duration = Duration::from_secs(600);

/// The `execute_*` calls of one connection whose client may still cancel them
/// (`notifications/cancelled`): the request's cancellation token alone cannot tell a client's
/// cancel from the connection or msbd going away, which must not cancel the task (a graceful
/// shutdown lets it finish, or queues it again for the next start).
#[derive(Default)]
pub(crate) struct Calls {
    /// The task of each call, from its submission until it is answered.
    tasks: HashMap<rmcp::model::RequestId, (TaskId, std::time::Instant)>,
    /// Requests the client cancelled before their task was submitted.
    cancelled: HashMap<rmcp::model::RequestId, std::time::Instant>,
}

impl Calls {
    fn prune(&mut self) {
        let now = std::time::Instant::now();
        self.tasks
            .retain(|_, (_, at)| now.duration_since(*at) < CANCELLED_CALL_KEPT);
        self.cancelled
            .retain(|_, at| now.duration_since(*at) < CANCELLED_CALL_KEPT);
    }
}

/// The MCP server: cheap to clone; clones share the daemon's state. One per connection, each
/// with the principal it serves ([`McpServer::with_principal`]).
#[derive(Clone)]
pub struct McpServer {
    pub(crate) core: Arc<Core>,
    pub(crate) principal: Arc<str>,
    /// Whether the principal is the operator ([`McpServer::as_operator`]): every task and
    /// session is its own to see and act on.
    pub(crate) operator: bool,
    /// This connection's `execute_*` calls (see [`Calls`]).
    calls: Arc<Mutex<Calls>>,
    /// This connection's tasks whose status changes its client is told of.
    pub(crate) watched: crate::notify::WatchedTasks,
    tool_router: ToolRouter<McpServer>,
}

impl McpServer {
    /// A server over a started wrapper, serving [`STDIO_PRINCIPAL`].
    pub fn new(wrapper: Wrapper, options: ServerOptions) -> McpServer {
        let mut tool_router = Self::task_tools()
            + Self::sandbox_tools()
            + Self::file_tools()
            + Self::supervision_tools();
        if !options.supervision_tools {
            for name in SUPERVISION_TOOLS {
                tool_router.remove_route(name);
            }
        }
        // Publish standard JSON Schema only (see `arguments`).
        for route in tool_router.map.values_mut() {
            let tool = &mut route.attr;
            tool.input_schema = Arc::new(arguments::standard_input_schema(&tool.input_schema));
            if let Some(output) = &tool.output_schema {
                tool.output_schema = Some(Arc::new(arguments::standard_schema(output)));
            }
        }
        McpServer {
            core: Arc::new(Core {
                wrapper,
                options,
                draining: AtomicBool::new(false),
                calls_under_way: AtomicUsize::new(0),
                call_ended: tokio::sync::Notify::new(),
                waits_end: tokio_util::sync::CancellationToken::new(),
            }),
            principal: Arc::from(STDIO_PRINCIPAL),
            operator: false,
            calls: Arc::default(),
            watched: Arc::default(),
            tool_router,
        }
    }

    /// The same server, serving another principal: its tasks and sessions are its own, and
    /// another principal's are "not found".
    pub fn with_principal(&self, principal: impl AsRef<str>) -> McpServer {
        McpServer {
            principal: Arc::from(principal.as_ref()),
            operator: false,
            calls: Arc::default(),
            watched: Arc::default(),
            ..self.clone()
        }
    }

    /// The same server, serving the operator: it sees and acts on every principal's tasks and
    /// sessions (the web console's operator; never an MCP connection's principal). Tasks it
    /// creates are its principal's.
    pub fn as_operator(&self) -> McpServer {
        McpServer {
            operator: true,
            ..self.clone()
        }
    }

    /// Whether this server serves the operator ([`McpServer::as_operator`]).
    pub fn is_operator(&self) -> bool {
        self.operator
    }

    /// The principal served.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// The wrapper underneath.
    pub fn wrapper(&self) -> &Wrapper {
        &self.core.wrapper
    }

    /// msbd is shutting down and drains its running tasks: from now on every tool call, on
    /// this server and every other one made from it ([`McpServer::with_principal`]), is
    /// answered at once with the tool error `SHUTTING_DOWN`. Calls already being answered go
    /// on; other requests (`tools/list`, `tasks/get`, `tasks/cancel`, `ping`) are answered as
    /// usual. It cannot be undone.
    pub fn start_draining(&self) {
        self.core.draining.store(true, Ordering::Release);
    }

    /// Whether [`McpServer::start_draining`] was called.
    pub fn is_draining(&self) -> bool {
        self.core.draining.load(Ordering::Acquire)
    }

    /// The drain is over: the calls that wait for tasks (`execute_*`, `get_task_result` with
    /// `wait`, `wait_for_tasks`) answer at once with the tasks as they are now (a task the
    /// shutdown interrupted is back in the queue: `execute_*` answers that it is still going),
    /// on this server and every other one made from it. It cannot be undone.
    pub fn stop_waiting(&self) {
        self.core.waits_end.cancel();
    }

    /// How many tool calls are being answered (see [`McpServer::calls_answered`]).
    pub fn calls_under_way(&self) -> usize {
        self.core.calls_under_way.load(Ordering::Acquire)
    }

    /// Waits (at most `within`) until no tool call is being answered, on this server or any
    /// other made from it; whether none is. With [`McpServer::start_draining`] first, so that
    /// no new one starts, a transport can then end without cutting an answer off (an
    /// `execute_*` call answers as soon as the shutdown has put its task back in the queue).
    /// The quick reads of [`crate::FastLane`] are not counted: it answers them itself.
    pub async fn calls_answered(&self, within: Duration) -> bool {
        let core = &self.core;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ended = core.call_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if core.calls_under_way.load(Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return core.calls_under_way.load(Ordering::Acquire) == 0;
            }
        }
    }

    /// The tools this server lists.
    pub fn tools(&self) -> Vec<Tool> {
        self.tool_router.list_all()
    }

    // -----------------------------------------------------------------------------------------
    // Helpers for the tools.

    /// A task of this principal, or "not found" (also for another principal's task, and for
    /// text that is not a task id).
    pub(crate) async fn owned_task(&self, task_id: &str) -> Result<Task, ToolError> {
        let id = parse_task_id(task_id)?;
        match self.core.wrapper.engine().get(id).await {
            Ok(task) if self.operator || task.owner.as_deref() == Some(&*self.principal) => {
                Ok(task)
            }
            Ok(_) | Err(task_core::Error::TaskNotFound { .. }) => {
                Err(ToolError::task_not_found(task_id))
            }
            Err(error) => Err(ToolError::from_core(error)),
        }
    }

    /// Refuses a call's arguments that its tool does not take (see [`arguments::check_arguments`]);
    /// a tool this server does not serve is left to rmcp, which answers it.
    pub(crate) fn check_arguments(&self, request: &CallToolRequestParams) -> Result<(), ToolError> {
        match self.tool_router.get(&request.name) {
            Some(tool) => arguments::check_arguments(
                &request.name,
                request.arguments.as_ref(),
                &tool.input_schema,
            ),
            None => Ok(()),
        }
    }

    /// The view of a task, with its ETA.
    pub(crate) fn view(&self, task: &Task) -> TaskView {
        TaskView::new(task, self.core.wrapper.engine().eta(task))
    }

    /// Claims a session a client named for this principal: it may use it when it made it, or
    /// nobody has yet (the session manager keeps the one record of who owns a session).
    pub(crate) fn claim_session(&self, session_id: &str) -> Result<(), ToolError> {
        self.core
            .wrapper
            .sessions()
            .claim(session_id, &self.principal, false)
            .map_err(|_| {
                ToolError::new(
                    "SESSION_NOT_FOUND",
                    format!("session {session_id:?} belongs to another client"),
                    "use a session id of your own, or omit session_id for a fresh session",
                )
            })
    }

    /// Whether a session is this principal's.
    pub(crate) fn owns_session(&self, session_id: &str) -> bool {
        self.operator
            || self
                .core
                .wrapper
                .sessions()
                .claimed_by(session_id, &self.principal)
    }

    /// Records the task of an `execute_*` call, so that the client's cancel of the request
    /// cancels it ([`ServerHandler::on_cancelled`]); cancels it at once when that cancel came
    /// first.
    pub(crate) async fn track_call(&self, request: &rmcp::model::RequestId, task: TaskId) {
        let cancelled = {
            let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
            calls.prune();
            let cancelled = calls.cancelled.remove(request).is_some();
            if !cancelled {
                calls
                    .tasks
                    .insert(request.clone(), (task, std::time::Instant::now()));
            }
            cancelled
        };
        if cancelled {
            let _ = self.core.wrapper.engine().cancel(task).await;
        }
    }

    /// The end of an `execute_*` call: its answer is on its way, so a cancel of the request
    /// has nothing left to cancel. A call whose request was cancelled stays recorded, for the
    /// client's cancel notification that may follow.
    pub(crate) fn untrack_call(&self, request: &rmcp::model::RequestId) {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tasks
            .remove(request);
    }

    /// Waits for a task to finish (up to `timeout`), forwarding its progress to a caller that
    /// sent a progress token; with `stop_with_request`, it stops waiting when the request is
    /// cancelled (the task goes on: only the client's cancel notification cancels it, see
    /// [`McpServer::track_call`]). Returns the task as it then is.
    pub(crate) async fn await_task(
        &self,
        id: TaskId,
        timeout: Duration,
        context: &RequestContext<RoleServer>,
        stop_with_request: bool,
    ) -> Result<Task, ToolError> {
        let engine = self.core.wrapper.engine();
        let mut events = engine.subscribe();
        let token = context.meta.get_progress_token();
        let wait = engine.wait(id, timeout);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                task = &mut wait => return task.map_err(ToolError::from_core),
                () = context.ct.cancelled(), if stop_with_request => {
                    return engine.get(id).await.map_err(ToolError::from_core);
                }
                () = self.core.waits_end.cancelled() => {
                    return engine.get(id).await.map_err(ToolError::from_core);
                }
                event = events.recv() => match event {
                    Ok(TaskEvent::Progress { id: of, progress, message }) if of == id => {
                        if let Some(token) = &token {
                            let mut param = ProgressNotificationParam::new(token.clone(), progress * 100.0)
                                .with_total(100.0);
                            if let Some(message) = message {
                                param = param.with_message(message);
                            }
                            let _ = context.peer.notify_progress(param).await;
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        // No more events: only the wait can end this.
                        return (&mut wait).await.map_err(ToolError::from_core);
                    }
                },
            }
        }
    }

    /// How long a call waits for tasks: `seconds` as the client gave it (0 to `max_wait`), or
    /// the server's call wait. `name` is the argument's, for the error.
    pub(crate) fn call_wait(
        &self,
        seconds: Option<f64>,
        name: &str,
    ) -> Result<Duration, ToolError> {
        let max = self.core.options.max_wait;
        let Some(seconds) = seconds else {
            return Ok(self.core.options.call_wait.min(max));
        };
        if !seconds.is_finite() || seconds < 0.0 || seconds > max.as_secs_f64() {
            return Err(ToolError::invalid(
                format!("{name} {seconds} is out of range"),
                format!(
                    "give 0 to {} seconds; to wait longer, call again (get_task_result or wait_for_tasks): a client gives up on one call after about a minute",
                    max.as_secs()
                ),
            ));
        }
        Ok(Duration::from_secs_f64(seconds))
    }

    /// The answer a finished sandbox task gives as a tool result (also the `tasks/get` result).
    pub(crate) fn sandbox_answer(&self, task: &Task) -> CallToolResult {
        let view = self.view(task);
        let session = view.session_id.clone().unwrap_or_default();
        match task.status {
            Status::Completed => {
                let result = task.result.clone().unwrap_or(Value::Null);
                let tail = result
                    .get("output_tail")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let exit = result.get("exit_code").and_then(Value::as_i64);
                let duration = result
                    .get("duration_ms")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                let mut text = String::new();
                text.push_str(tail);
                if !text.is_empty() && !text.ends_with('\n') {
                    text.push('\n');
                }
                text.push_str(&format!(
                    "[Session: {session}] [Time: {duration} ms] [Exit: {}] [Task: {}]",
                    exit.map_or("-".into(), |c| c.to_string()),
                    task.id
                ));
                let mut structured = serde_json::Map::new();
                structured.insert("task_id".into(), task.id.to_string().into());
                structured.insert("status".into(), view.status.clone().into());
                if let Value::Object(fields) = result {
                    structured.extend(fields);
                }
                answer_value(text, Value::Object(structured))
            }
            _ => {
                let error = task.error.as_ref().map_or_else(
                    || format!("the task is {}", view.status),
                    |e| e.message.clone(),
                );
                let text = format!(
                    "{error}\n[Session: {session}] [Status: {}] [Task: {}]\nWhat to do: read the whole output with read_task_output(task_id=\"{}\"); a session's files persist, so fix and run again in session {session:?}.",
                    view.status, task.id, task.id
                );
                let mut structured = serde_json::Map::new();
                // What the failed run left (exit code or signal, reason, the tails of its
                // output and stderr...), when it ran at all.
                if let Some(Value::Object(fields)) = task.result.clone()
                    && task.error.is_some()
                {
                    structured.extend(fields);
                }
                structured.insert("task_id".into(), task.id.to_string().into());
                structured.insert("status".into(), view.status.clone().into());
                structured.insert("session_id".into(), serde_json::json!(view.session_id));
                structured.insert("error".into(), error.into());
                let mut result = CallToolResult::error(vec![ContentBlock::text(text)]);
                result.structured_content = Some(Value::Object(structured));
                result
            }
        }
    }

    /// The MCP task for an engine task.
    fn mcp_task(&self, task: &Task) -> McpTask {
        let view = self.view(task);
        let status = match task.status {
            Status::Cancelled => TaskStatus::Cancelled,
            Status::Completed | Status::Failed => TaskStatus::Completed,
            _ => TaskStatus::Working,
        };
        let mut message = format!("{} ({:.0}%)", view.status, view.progress);
        if let Some(progress) = &view.progress_message {
            message = format!("{message}: {progress}");
        }
        let mut mcp = McpTask::new(
            task.id.to_string(),
            status,
            wire::rfc3339(task.created_at),
            wire::rfc3339(task.updated_at),
        )
        .with_status_message(message)
        .with_poll_interval_ms(self.core.options.poll_interval.as_millis() as u64);
        if let Some(retention) = self.core.options.retention {
            mcp = mcp.with_ttl_ms(retention.as_millis() as u64);
        }
        mcp
    }

    pub(crate) fn detailed(&self, task: &Task) -> Result<DetailedTask, McpError> {
        let mcp = self.mcp_task(task);
        let payload = match task.status {
            Status::Cancelled => TaskPayload::Cancelled,
            Status::Completed | Status::Failed => {
                let answer = if crate::tools_sandbox::is_sandbox_type(&task.task_type) {
                    self.sandbox_answer(task)
                } else {
                    generic_answer(self, task)
                };
                let Value::Object(result) = serde_json::to_value(answer)
                    .map_err(|e| McpError::internal_error(e.to_string(), None))?
                else {
                    return Err(McpError::internal_error(
                        "a tool result is not an object",
                        None,
                    ));
                };
                TaskPayload::Completed { result }
            }
            _ => TaskPayload::Working,
        };
        Ok(DetailedTask::new(mcp, payload))
    }
}

/// A finished task of any type as a tool result.
fn generic_answer(server: &McpServer, task: &Task) -> CallToolResult {
    let view = server.view(task);
    match task.status {
        Status::Completed => answer_value(
            format!(
                "task {} completed: {}",
                task.id,
                task.result.clone().unwrap_or(Value::Null)
            ),
            serde_json::json!({"task_id": view.task_id, "status": view.status, "result": task.result}),
        ),
        _ => {
            let error = view.error.unwrap_or_default();
            let mut result = CallToolResult::error(vec![ContentBlock::text(format!(
                "task {} {}: {error}",
                task.id, view.status,
            ))]);
            // The failed run's facts, when its handler kept them (an operator-defined type's
            // exit code and stderr tail, say).
            result.structured_content = Some(serde_json::json!({
                "task_id": view.task_id,
                "status": view.status,
                "error": error,
                "result": task.result.as_ref().filter(|_| task.error.is_some()),
            }));
            result
        }
    }
}

/// A task id from text, or "not found".
pub(crate) fn parse_task_id(text: &str) -> Result<TaskId, ToolError> {
    text.trim()
        .parse::<TaskId>()
        .map_err(|_| ToolError::task_not_found(text))
}

/// A successful tool answer: readable text, and the structured value.
pub(crate) fn answer<T: Serialize>(text: impl Into<String>, value: &T) -> CallToolResult {
    match serde_json::to_value(value) {
        Ok(value) => answer_value(text, value),
        Err(error) => CallToolResult::error(vec![ContentBlock::text(format!(
            "msbd could not encode its answer: {error}; please report this"
        ))]),
    }
}

fn answer_value(text: impl Into<String>, value: Value) -> CallToolResult {
    let mut result = CallToolResult::success(vec![ContentBlock::text(text.into())]);
    result.structured_content = Some(value);
    result
}

/// A call that could not be done: a tool error (`isError: true`) whose text says what happened
/// and what to do.
#[derive(Clone, Debug)]
pub(crate) struct ToolError {
    pub(crate) code: &'static str,
    pub(crate) message: String,
    pub(crate) hint: String,
}

impl ToolError {
    pub(crate) fn new(
        code: &'static str,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> ToolError {
        ToolError {
            code,
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub(crate) fn invalid(message: impl Into<String>, hint: impl Into<String>) -> ToolError {
        ToolError::new("INVALID_ARGUMENT", message, hint)
    }

    pub(crate) fn task_not_found(task_id: &str) -> ToolError {
        ToolError::new(
            "TASK_NOT_FOUND",
            format!("no task with id {task_id:?}"),
            "check the id (list_tasks shows yours); finished tasks are deleted after the retention period",
        )
    }

    /// The refusal of every tool call while msbd drains ([`McpServer::start_draining`]).
    pub(crate) fn shutting_down() -> ToolError {
        ToolError::new(
            "SHUTTING_DOWN",
            "msbd is shutting down: it lets its running tasks finish and takes no new calls",
            "call again once it has restarted (tasks still running at the end of the drain are queued again for the next start)",
        )
    }

    pub(crate) fn from_core(error: task_core::Error) -> ToolError {
        use task_core::Error as E;
        let code = match &error {
            E::TaskNotFound { .. } => "TASK_NOT_FOUND",
            E::IllegalTransition { .. } => "ILLEGAL_TRANSITION",
            E::UnknownTaskType { .. } => "INVALID_TASK_TYPE",
            E::InvalidInput { .. } => "INVALID_ARGUMENT",
            E::ShuttingDown => "SHUTTING_DOWN",
            _ => "OPERATION_FAILED",
        };
        let hint = match code {
            "ILLEGAL_TRANSITION" => "check the task's status with check_task_status first",
            "INVALID_TASK_TYPE" => "use one of the listed types",
            "INVALID_ARGUMENT" => "fix the argument as the message says and call again",
            "SHUTTING_DOWN" => "msbd is shutting down: call again once it has restarted",
            "TASK_NOT_FOUND" => "check the id (list_tasks shows yours)",
            _ => "try again; if it persists, check msbd's log",
        };
        ToolError::new(code, error.to_string(), hint)
    }

    /// As a tool result.
    pub(crate) fn into_result(self) -> CallToolResult {
        let text = format!(
            "Error {}: {}\nWhat to do: {}",
            self.code, self.message, self.hint
        );
        CallToolResult::error(vec![ContentBlock::text(text)])
    }
}

/// Turns a tool body's outcome into the tool's answer.
pub(crate) fn finish(
    outcome: Result<CallToolResult, ToolError>,
) -> Result<CallToolResult, McpError> {
    Ok(outcome.unwrap_or_else(ToolError::into_result))
}

impl McpServer {
    /// The answer to a call of one of [`crate::AT_ONCE_TOOLS`], for a transport that runs it
    /// where it read it ([`crate::FastLane`]): the same tool body rmcp's router runs, and the same
    /// refusal of an argument the tool does not take. `None` for any other tool and for
    /// arguments that do not decode (rmcp's way words that error).
    pub fn answer_at_once(
        self: Arc<Self>,
        request: &CallToolRequestParams,
    ) -> Option<impl Future<Output = CallToolResult> + Send + 'static> {
        enum Call {
            Status(wire::CheckStatusArgs),
            List(wire::ListArgs),
            Output(wire::ReadOutputArgs),
            Refused(ToolError),
        }
        fn decode<T: serde::de::DeserializeOwned>(request: &CallToolRequestParams) -> Option<T> {
            let arguments = request.arguments.clone().unwrap_or_default();
            serde_json::from_value(Value::Object(arguments)).ok()
        }
        // While draining, rmcp's way answers (`SHUTTING_DOWN`).
        if !self.tool_router.has_route(&request.name) || self.is_draining() {
            return None;
        }
        if !crate::AT_ONCE_TOOLS.contains(&&*request.name) {
            return None;
        }
        // Before decoding, as `call_tool` does: the argument types would refuse an unknown
        // argument too, in serde's words.
        let call = match (self.check_arguments(request), &*request.name) {
            (Err(error), _) => Call::Refused(error),
            (Ok(()), "check_task_status") => Call::Status(decode(request)?),
            (Ok(()), "list_tasks") => Call::List(decode(request)?),
            (Ok(()), "read_task_output") => Call::Output(decode(request)?),
            _ => return None,
        };
        Some(async move {
            let outcome = match call {
                Call::Status(args) => self.check_status(args).await,
                Call::List(args) => self.list(args).await,
                Call::Output(args) => self.read_output(args).await,
                Call::Refused(error) => Err(error),
            };
            outcome.unwrap_or_else(ToolError::into_result)
        })
    }

    /// The answer to `tasks/get` for a transport that runs it where it read it
    /// ([`crate::FastLane`], for a client that declared the tasks extension): the same body
    /// as [`ServerHandler::get_task`].
    pub fn task_at_once(
        self: Arc<Self>,
        request: &GetTaskParams,
    ) -> impl Future<Output = Result<GetTaskResult, McpError>> + Send + 'static {
        let task_id = request.task_id.clone();
        async move { self.task_result(&task_id).await }
    }

    async fn task_result(&self, task_id: &str) -> Result<GetTaskResult, McpError> {
        let task = self
            .owned_task(task_id)
            .await
            .map_err(|e| McpError::invalid_params(format!("{}: {}", e.message, e.hint), None))?;
        Ok(GetTaskResult::new(self.detailed(&task)?))
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .build(),
        )
        .with_server_info(Implementation::new(
            self.core.options.server_name.clone(),
            self.core.options.server_version.clone(),
        ))
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.tool_router.list_all()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        self.tool_router.get(name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        mut context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        if self.is_draining() {
            return Ok(CallToolResponse::Complete(
                ToolError::shutting_down().into_result(),
            ));
        }
        if let Err(error) = self.check_arguments(&request) {
            return Ok(CallToolResponse::Complete(error.into_result()));
        }
        let _under_way = CallUnderWay::new(&self.core);
        let tasks_client = context
            .client_capabilities()
            .is_some_and(|c| c.supports_tasks());
        if tasks_client && TASK_TOOLS.contains(&&*request.name) {
            // The request's token fires once the task answer is sent: the task has its own life.
            context.ct = Default::default();
            return match self.start_sandbox_task(&request).await {
                Ok(task) => {
                    self.notify_status_changes(task.id, context.peer.clone());
                    Ok(CallToolResponse::Task(CreateTaskResult::new(
                        self.mcp_task(&task),
                    )))
                }
                Err(error) => Ok(CallToolResponse::Complete(error.into_result())),
            };
        }
        let name = request.name.clone();
        let response = self
            .tool_router
            .call(ToolCallContext::new(self, request, context))
            .await?;
        Ok(explain_argument_errors(&name, response))
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, McpError> {
        if request.method == REQUEST_TOO_LARGE_METHOD {
            let field = |name: &str| {
                request
                    .params
                    .as_ref()
                    .and_then(|p| p.get(name))
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            };
            return Err(McpError::invalid_request(
                format!(
                    "the request is {} bytes, over the server's limit of {} bytes: send less per call (for large inputs, put them in a file in a mapped volume and pass its path)",
                    field("bytes"),
                    field("limit")
                ),
                None,
            ));
        }
        Err(McpError::new(
            rmcp::model::ErrorCode::METHOD_NOT_FOUND,
            format!("method {:?} is not known to msbd", request.method),
            None,
        ))
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        self.task_result(&request.task_id).await
    }

    async fn on_cancelled(
        &self,
        notification: rmcp::model::CancelledNotificationParam,
        _context: rmcp::service::NotificationContext<RoleServer>,
    ) {
        let Some(request) = notification.request_id else {
            return;
        };
        let task = {
            let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
            match calls.tasks.remove(&request) {
                Some((task, _)) => Some(task),
                None => {
                    // Its task is not submitted yet (or the call is over: then this is
                    // forgotten with time).
                    calls.prune();
                    calls.cancelled.insert(request, std::time::Instant::now());
                    None
                }
            }
        };
        if let Some(task) = task {
            let _ = self.core.wrapper.engine().cancel(task).await;
        }
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        let task = self
            .owned_task(&request.task_id)
            .await
            .map_err(|e| McpError::invalid_params(format!("{}: {}", e.message, e.hint), None))?;
        if task.status.is_terminal() {
            return Ok(());
        }
        self.core
            .wrapper
            .engine()
            .cancel(task.id)
            .await
            .map(|_| ())
            .map_err(|e| McpError::invalid_params(e.to_string(), None))
    }
}

/// rmcp answers arguments that do not fit a tool's input (a wrong type, a missing required
/// argument) with a bare tool error; this one says which tool and what to do, like the others.
/// Public only for the fuzz targets (`fuzz/fuzz_targets/tool_args.rs`).
#[doc(hidden)]
pub fn explain_argument_errors(tool: &str, response: CallToolResponse) -> CallToolResponse {
    let CallToolResponse::Complete(result) = &response else {
        return response;
    };
    let text = match (
        result.is_error,
        result.content.first().and_then(|c| c.as_text()),
    ) {
        (Some(true), Some(text)) if text.text.starts_with("failed to deserialize parameters") => {
            text.text.clone()
        }
        _ => return response,
    };
    let detail = text
        .trim_start_matches("failed to deserialize parameters")
        .trim_start_matches(':')
        .trim();
    let error = ToolError::invalid(
        format!("the arguments of {tool} are not valid: {detail}"),
        format!(
            "fix the named argument as the {tool} tool's input schema says (tools/list shows it) and call again"
        ),
    );
    CallToolResponse::Complete(error.into_result())
}

/// What `initialize` tells the client about msbd.
const INSTRUCTIONS: &str = "msbd runs durable background tasks in sandboxes. \
Run a shell command with execute_command, or code (python, node, bash) with execute_code: \
they wait for the result (up to `timeout` seconds). For long work, submit_task / \
create_background_task return a task_id at once; follow it with check_task_status (status, \
progress, eta_seconds), read_task_output (cursor paging, while it runs), get_task_result \
(wait=true to block), cancel_task. Tasks survive restarts of msbd. Sessions (session_id) keep \
a work directory and interpreter state between calls.";
