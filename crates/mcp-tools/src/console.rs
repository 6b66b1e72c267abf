//! The web console's way to the tools: [`Console`] calls the same tool bodies an MCP client
//! reaches (the same ownership, the same checks, the same answers as structured content), with
//! no transport in between. One principal per console user; the operator
//! ([`McpServer::as_operator`]) sees and acts on every principal's tasks and sessions, and alone
//! may pause the queue or act on the supervised loops.

use serde_json::{Value, json};

use crate::McpServer;
use crate::actions::{Action as _, QueueAction, TaskAction};
use crate::server::ToolError;
use crate::tools_sandbox::{GetSessionsArgs, StopSessionArgs};
use crate::wire::{ManageQueueArgs, ManageTasksArgs, ReadOutputArgs};

/// Why a console request could not be done: the tool error an MCP client would get.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConsoleError {
    /// The error code (`TASK_NOT_FOUND`, `ILLEGAL_TRANSITION`, `FORBIDDEN`, ...).
    pub code: String,
    /// What happened.
    pub message: String,
    /// What to do.
    pub hint: String,
}

impl From<ToolError> for ConsoleError {
    fn from(error: ToolError) -> ConsoleError {
        ConsoleError {
            code: error.code.to_owned(),
            message: error.message,
            hint: error.hint,
        }
    }
}

impl ConsoleError {
    /// The refusal of an operator's action to another principal.
    fn operator_only(what: &str) -> ConsoleError {
        ConsoleError {
            code: "FORBIDDEN".into(),
            message: format!("only the operator may {what}"),
            hint: "sign in with the operator's token".into(),
        }
    }
}

/// What the task list shows.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    /// A status name, `active` or `all`.
    pub status: Option<String>,
    /// A task type.
    pub task_type: Option<String>,
    /// A tag.
    pub tag: Option<String>,
    /// A session id.
    pub session_id: Option<String>,
    /// An owner (the operator only; others see their own).
    pub owner: Option<String>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// The most tasks per page (1 to 500).
    pub limit: u32,
}

/// An action on one task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum TaskCommand {
    /// Cancel it.
    Cancel,
    /// Pause it (a running one is frozen).
    Pause,
    /// Resume it.
    Resume,
    /// Submit it again as a new task (a failed or cancelled one).
    Retry,
}

/// An action on a supervised loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, strum::EnumString, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum LoopCommand {
    /// Skip its work until resumed.
    Pause,
    /// Work again.
    Resume,
    /// Stop and start it again.
    Restart,
}

/// The console's calls, as one principal (or the operator).
#[derive(Clone)]
pub struct Console {
    server: McpServer,
}

/// The structured content of a tool's answer.
fn content(result: rmcp::model::CallToolResult) -> Value {
    result.structured_content.unwrap_or(Value::Null)
}

impl Console {
    /// The console of `server`'s principal (or of the operator, for a server made with
    /// [`McpServer::as_operator`]).
    pub fn new(server: McpServer) -> Console {
        Console { server }
    }

    /// The principal served.
    pub fn principal(&self) -> &str {
        self.server.principal()
    }

    /// Whether it serves the operator.
    pub fn is_operator(&self) -> bool {
        self.server.is_operator()
    }

    /// The server underneath.
    pub fn server(&self) -> &McpServer {
        &self.server
    }

    fn require_operator(&self, what: &str) -> Result<(), ConsoleError> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(ConsoleError::operator_only(what))
        }
    }

    /// A page of tasks (`list_tasks`'s answer: `tasks`, `count`, `next_cursor`).
    pub async fn list(&self, query: ListQuery) -> Result<Value, ConsoleError> {
        let limit = query.limit.clamp(1, 500);
        let non_empty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        let (tasks, next_cursor) = self
            .server
            .filtered(
                non_empty(query.owner),
                non_empty(query.status).as_deref(),
                non_empty(query.task_type).filter(|t| t != "all"),
                non_empty(query.session_id),
                non_empty(query.tag),
                limit,
                non_empty(query.cursor),
            )
            .await?;
        Ok(json!({
            "count": tasks.len(),
            "tasks": tasks,
            "next_cursor": next_cursor,
        }))
    }

    /// One task as `check_task_status` shows it (its `task`), with its owner, parameters and
    /// result (what it returned once completed, or what a failed run left, as
    /// `get_task_result`'s `result`). Another principal's is `TASK_NOT_FOUND` (the operator's
    /// console sees every task).
    pub async fn task(&self, id: &str) -> Result<Value, ConsoleError> {
        let task = self.server.owned_task(id).await?;
        let mut view = serde_json::to_value(self.server.view(&task)).unwrap_or(Value::Null);
        view["owner"] = json!(task.owner);
        view["params"] = task.params;
        view["result"] = task.result.unwrap_or(Value::Null);
        Ok(view)
    }

    /// Output of a task, as `read_task_output` answers: `stream` is `combined`, `stdout` or
    /// `stderr`; from `cursor`, or the last `tail` bytes.
    pub async fn output(
        &self,
        id: &str,
        stream: Option<&str>,
        cursor: Option<u64>,
        tail: Option<u64>,
    ) -> Result<Value, ConsoleError> {
        let mut args = json!({ "task_id": id });
        if let Some(stream) = stream {
            args["stream"] = json!(stream);
        }
        if let Some(cursor) = cursor {
            args["cursor"] = json!(cursor);
        }
        if let Some(tail) = tail {
            args["tail"] = json!(tail);
        }
        let args: ReadOutputArgs = decode(args)?;
        Ok(content(self.server.read_output(args).await?))
    }

    /// Cancels, pauses, resumes or retries a task (`manage_background_tasks`'s answer).
    pub async fn act(&self, id: &str, command: TaskCommand) -> Result<Value, ConsoleError> {
        let action = match command {
            TaskCommand::Cancel => TaskAction::Cancel,
            TaskCommand::Pause => TaskAction::Pause,
            TaskCommand::Resume => TaskAction::Resume,
            TaskCommand::Retry => TaskAction::Retry,
        };
        let args: ManageTasksArgs = decode(json!({ "action": action.name(), "task_id": id }))?;
        Ok(content(self.server.manage_tasks(args).await?))
    }

    /// A new priority for a waiting task (`manage_task_queue`'s `reorder`).
    pub async fn set_priority(&self, id: &str, priority: &str) -> Result<Value, ConsoleError> {
        let priority = match priority.trim().parse::<u8>() {
            Ok(n) => json!(n),
            Err(_) => json!(priority.trim()),
        };
        let args: ManageQueueArgs = decode(json!({
            "action": QueueAction::Reorder.name(),
            "task_id": id,
            "priority": priority,
        }))?;
        Ok(content(self.server.manage_queue(args).await?))
    }

    /// The queue's statistics (`manage_task_queue`'s `get_stats`): every principal's tasks;
    /// `task_types` adds every type msbd runs, those without tasks too.
    pub async fn queue(&self) -> Result<Value, ConsoleError> {
        let stats = self.server.queue_statistics().await?;
        let mut answer = serde_json::to_value(stats).unwrap_or(Value::Null);
        answer["task_types"] = json!(self.server.task_types());
        Ok(answer)
    }

    /// Pauses or resumes the queue, or one type of it (the operator only).
    pub async fn queue_action(
        &self,
        pause: bool,
        task_type: Option<&str>,
    ) -> Result<Value, ConsoleError> {
        self.require_operator("pause or resume the queue")?;
        let action = if pause {
            QueueAction::Pause
        } else {
            QueueAction::Resume
        };
        let mut args = json!({ "action": action.name() });
        if let Some(task_type) = task_type.filter(|t| !t.is_empty()) {
            args["task_type"] = json!(task_type);
        }
        let args: ManageQueueArgs = decode(args)?;
        Ok(content(self.server.manage_queue(args).await?))
    }

    /// Sets the most tasks running at once: overall, or of one task type (there, 0 removes
    /// the type's own limit). The operator only.
    pub async fn set_limits(
        &self,
        max_concurrent: u32,
        task_type: Option<&str>,
    ) -> Result<Value, ConsoleError> {
        self.require_operator("change the queue's concurrency limits")?;
        let mut args = json!({
            "action": QueueAction::SetLimits.name(),
            "max_concurrent": max_concurrent,
        });
        if let Some(task_type) = task_type.filter(|t| !t.is_empty()) {
            args["task_type"] = json!(task_type);
        }
        let args: ManageQueueArgs = decode(args)?;
        Ok(content(self.server.manage_queue(args).await?))
    }

    /// The live sessions this console may see (`get_sessions`'s answer), each with what its
    /// sandbox uses now (`usage`: `memory_bytes`, `cpu_seconds`, `processes`, null where the
    /// host does not measure it) and, for the operator, its owner; `isolation` names the layers
    /// every sandbox runs under.
    pub async fn sessions(&self) -> Result<Value, ConsoleError> {
        let mut answer = content(self.server.sessions(GetSessionsArgs::default())?);
        let manager = self.server.wrapper().sessions();
        if let Some(sessions) = answer["sessions"].as_array_mut() {
            for session in sessions {
                let id = session["session_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                // A session that ended since the listing has no usage: nulls.
                let usage = manager.usage(&id).await.unwrap_or_default();
                session["usage"] = json!({
                    "memory_bytes": usage.memory_bytes,
                    "peak_memory_bytes": usage.peak_memory_bytes,
                    "cpu_seconds": usage.cpu_usage_us.map(|us| us as f64 / 1e6),
                    "processes": usage.processes,
                });
                if self.is_operator() {
                    session["owner"] = json!(manager.owner_of(&id));
                }
            }
        }
        answer["isolation"] = json!(self.server.wrapper().isolation());
        Ok(answer)
    }

    /// Stops a session (`stop_session`).
    pub async fn stop_session(&self, id: &str) -> Result<Value, ConsoleError> {
        let args: StopSessionArgs = decode(json!({ "session_id": id }))?;
        Ok(content(self.server.stop(args).await?))
    }

    /// The daemon's health (`health_check`'s answer).
    pub async fn health(&self) -> Value {
        let health = crate::HealthAnswer::from(&self.server.wrapper().health_check().await);
        serde_json::to_value(health).unwrap_or(Value::Null)
    }

    /// The nodes sharing msbd's store and the state of its database (PostgreSQL), times as
    /// RFC 3339; null for a store this msbd owns (SQLite, memory). The operator only: it names
    /// hosts and addresses.
    pub async fn cluster(&self) -> Result<Value, ConsoleError> {
        self.require_operator("see the nodes and the database")?;
        let status = self
            .server
            .wrapper()
            .engine()
            .cluster_status()
            .await
            .map_err(|error| ConsoleError {
                code: "STORE_UNAVAILABLE".into(),
                message: error.to_string(),
                hint: "check the database (the supervision page's store component says more) and reload".into(),
            })?;
        let Some(status) = status else {
            return Ok(Value::Null);
        };
        let time = |ms: Option<i64>| ms.map(|ms| crate::wire::rfc3339(task_core::Timestamp(ms)));
        let mut answer = serde_json::to_value(&status).unwrap_or(Value::Null);
        if let Some(nodes) = answer["nodes"].as_array_mut() {
            for (node, source) in nodes.iter_mut().zip(&status.nodes) {
                node["connected_since"] = json!(time(source.connected_since_ms));
            }
        }
        answer["database"]["last_vacuum"] = json!(time(status.database.last_vacuum_ms));
        Ok(answer)
    }

    /// The supervised loops (`get_background_task_status`'s answer).
    pub fn loops(&self) -> Value {
        let status =
            crate::BackgroundTasksAnswer::from(&self.server.wrapper().get_background_task_status());
        serde_json::to_value(status).unwrap_or(Value::Null)
    }

    /// Pauses, resumes or restarts one supervised loop (the operator only).
    pub async fn loop_action(
        &self,
        name: &str,
        command: LoopCommand,
    ) -> Result<Value, ConsoleError> {
        self.require_operator("pause, resume or restart a background loop")?;
        let supervisor = self.server.wrapper().supervisor();
        let report = match command {
            LoopCommand::Pause => supervisor.pause(name),
            LoopCommand::Resume => supervisor.resume(name),
            LoopCommand::Restart => supervisor.restart(name).await,
        }
        .map_err(|error| ConsoleError {
            code: "LOOP_ACTION_FAILED".into(),
            message: error.to_string(),
            hint: "check the loop's name and state on the supervision page".into(),
        })?;
        Ok(serde_json::to_value(crate::LoopActionAnswer::from(&report)).unwrap_or(Value::Null))
    }
}

/// Arguments built by the console, decoded as the tool decodes them.
fn decode<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ConsoleError> {
    serde_json::from_value(value).map_err(|error| ConsoleError {
        code: "INVALID_ARGUMENT".into(),
        message: error.to_string(),
        hint: "fix the value as the message says and try again".into(),
    })
}
