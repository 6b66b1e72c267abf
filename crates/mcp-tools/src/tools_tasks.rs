//! The background-task tools: `create_background_task`, `submit_task`, `check_task_status`,
//! `get_task_result`, `wait_for_tasks`, `cancel_task`, `list_tasks`, `read_task_output`,
//! `manage_background_tasks`, `manage_task_queue`.

use std::collections::BTreeMap;
use std::time::Duration;

use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ProgressNotificationParam};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, tool, tool_router};
use sandbox_wrapper::handlers::{KEPT_ATTEMPTS, kept_attempts};
use sandbox_wrapper::output::OutputChunk;
use serde::Serialize;
use serde_json::{Map, Value, json};
use task_core::store::{ListFilter, PageRequest};
use task_core::{NewTask, Priority, Status, Task, Timestamp};

use crate::server::{McpServer, ToolError, answer, finish};
use crate::wire::{
    self, Action, ActionAnswer, ActionStatus, CancelAnswer, CheckStatusArgs, Created,
    GetResultArgs, ListArgs, ManageQueueArgs, ManageTasksArgs, OutputAnswer, OutputStreamArg,
    QueueAction, QueueStatistics, ReadOutputArgs, ResultAnswer, StatusAnswer, SubmitArgs,
    SubmitOptions, TaskAction, TaskIdArgs, TaskList, TaskView, WaitAnswer, WaitForTasksArgs,
    WaitMode, WaitedTask,
};

/// The default page size of listings.
const DEFAULT_LIMIT: u32 = 20;
/// The largest page.
const MAX_LIMIT: u32 = 500;
/// The default and largest chunk of output read at once.
const DEFAULT_OUTPUT_BYTES: u64 = 64 * 1024;
const MAX_OUTPUT_BYTES: u64 = 1024 * 1024;
/// The most tasks one `wait_for_tasks` call waits for.
const MAX_WAIT_TASKS: usize = 100;

#[tool_router(router = task_tools, vis = "pub(crate)")]
impl McpServer {
    #[tool(
        description = "Start a background task and return its task_id at once (it runs in a sandbox; follow it with check_task_status, read_task_output, get_task_result). task_type: \"command\" (params {\"command\": \"<shell line>\"} or {\"argv\": [..]}, optional env, stdin, flavor small|medium|large, network none|allow|host and network_allow for a new session), \"code\" (params {\"language\": \"python\"|\"node\"|\"bash\", \"code\": \"...\"}, with the same session options), or an operator-defined type. Options: priority (0-9 or low/normal/high/critical), timeout_seconds, max_retries, delay_seconds, idempotency_key, session_id, tags, rerun_on_recovery (default true: an attempt cut short by a restart or crash of msbd runs again without counting as a retry; false: the task fails with error kind interrupted).",
        output_schema = schema_for_output::<Created>()
    )]
    async fn create_background_task(
        &self,
        Parameters(args): Parameters<SubmitArgs>,
    ) -> Result<CallToolResult, McpError> {
        let options = args.options();
        finish(self.submit(args.task_type, args.params, options).await)
    }

    #[tool(
        description = "Submit a task to the durable queue and return its task_id at once: the same as create_background_task (task_type, params, priority, max_retries, timeout_seconds, delay_seconds, idempotency_key, session_id, tags, rerun_on_recovery).",
        output_schema = schema_for_output::<Created>()
    )]
    async fn submit_task(
        &self,
        Parameters(args): Parameters<SubmitArgs>,
    ) -> Result<CallToolResult, McpError> {
        let options = args.options();
        finish(self.submit(args.task_type, args.params, options).await)
    }

    #[tool(
        description = "The status of a task: task_id, status (pending, scheduled, running, paused, completed, failed, timeout, cancelled), progress (percent), eta_seconds, progress_message, attempts, error. Without task_id: a list of your tasks, filtered by task_type and status_filter (limit, default 20).",
        output_schema = schema_for_output::<StatusAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn check_task_status(
        &self,
        Parameters(args): Parameters<CheckStatusArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.check_status(args).await)
    }

    #[tool(
        description = "The result of a task: with wait=true, waits until it finishes (up to timeout seconds, default 20) and sends progress notifications if you gave a progress token; else answers at once. `finished` says whether it is done; `result` holds what it returned (for command and code tasks: exit_code, output_tail, duration_ms, session_id...), `error` why it failed.",
        output_schema = schema_for_output::<ResultAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn get_task_result(
        &self,
        Parameters(args): Parameters<GetResultArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.get_result(args, &context).await)
    }

    #[tool(
        description = "Wait for several tasks in one call: until any (mode \"any\", the default) or all (mode \"all\") of task_ids have finished, or timeout seconds have passed (default 20). Answers each task's status, and the result or error of those that finished (done: false when the wait ran out first: call again). Sends progress notifications (tasks finished of total) if you gave a progress token.",
        output_schema = schema_for_output::<WaitAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn wait_for_tasks(
        &self,
        Parameters(args): Parameters<WaitForTasksArgs>,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.wait_for(args, &context).await)
    }

    #[tool(
        description = "Cancel a task: a waiting one never starts; a running one has its whole process tree killed. Cancelling a finished task changes nothing (cancelled: false).",
        output_schema = schema_for_output::<CancelAnswer>(),
        annotations(destructive_hint = true, idempotent_hint = true)
    )]
    async fn cancel_task(
        &self,
        Parameters(args): Parameters<TaskIdArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.cancel(&args.task_id).await)
    }

    #[tool(
        description = "List your tasks, newest first: filter by status (pending, scheduled, running, paused, completed, failed, timeout, cancelled, active, all), task_type, session_id, tag; page with limit (default 20) and cursor (the previous answer's next_cursor).",
        output_schema = schema_for_output::<TaskList>(),
        annotations(read_only_hint = true)
    )]
    async fn list_tasks(
        &self,
        Parameters(args): Parameters<ListArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.list(args).await)
    }

    #[tool(
        description = "Read a task's output, also while it runs: start at cursor 0, then pass the answer's next_cursor to read on; max_bytes per call (default 65536); or tail=N for its last N bytes. stream=\"combined\" (default: stdout and stderr interleaved as written), \"stdout\" or \"stderr\" reads that stream alone, with its own cursor. complete=true once the task has finished and everything was read. A retried task keeps the output of its last 5 attempts: attempt=n reads attempt n's (default: the latest; the answer's attempt says which).",
        output_schema = schema_for_output::<OutputAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn read_task_output(
        &self,
        Parameters(args): Parameters<ReadOutputArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.read_output(args).await)
    }

    #[tool(
        description = manage_tasks_description(),
        output_schema = schema_for_output::<ActionAnswer>()
    )]
    async fn manage_background_tasks(
        &self,
        Parameters(args): Parameters<ManageTasksArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.manage_tasks(args).await)
    }

    #[tool(
        description = manage_queue_description(),
        output_schema = schema_for_output::<ActionAnswer>()
    )]
    async fn manage_task_queue(
        &self,
        Parameters(args): Parameters<ManageQueueArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.manage_queue(args).await)
    }
}

impl McpServer {
    /// Builds the task a submitting tool asks for.
    pub(crate) fn new_task(
        &self,
        task_type: &str,
        params: Option<Value>,
        options: &SubmitOptions,
    ) -> Result<NewTask, ToolError> {
        let task_type = task_type.trim();
        if task_type.is_empty() {
            return Err(ToolError::new(
                "INVALID_TASK_TYPE",
                "task_type is empty",
                format!("give one of: {}", self.task_types().join(", ")),
            ));
        }
        if !self.task_types().iter().any(|t| t == task_type) {
            return Err(ToolError::new(
                "INVALID_TASK_TYPE",
                format!("task type {task_type:?} is not known"),
                format!(
                    "use one of: {} (\"command\" runs a shell command, \"code\" runs python, node or bash)",
                    self.task_types().join(", ")
                ),
            ));
        }
        let params = match params {
            None | Some(Value::Null) => json!({}),
            Some(Value::Object(map)) => Value::Object(map),
            Some(Value::String(text)) => match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => Value::Object(map),
                _ => {
                    return Err(ToolError::invalid(
                        "params must be an object",
                        "pass params as a JSON object, e.g. {\"command\": \"echo hi\"}",
                    ));
                }
            },
            Some(_) => {
                return Err(ToolError::invalid(
                    "params must be an object",
                    "pass params as a JSON object, e.g. {\"command\": \"echo hi\"}",
                ));
            }
        };
        let mut task = self.core.wrapper.new_task(task_type, params);
        task.owner = Some(self.principal.to_string());
        if let Some(priority) = &options.priority {
            task.priority = priority.to_priority().map_err(|m| {
                ToolError::invalid(m, "priority: 0 to 9, or low, normal, high, critical")
            })?;
        }
        if let Some(seconds) = options.timeout_seconds {
            task.timeout = Some(seconds_arg("timeout_seconds", seconds, false)?);
        } else if task.timeout.is_none() && crate::tools_sandbox::is_sandbox_type(task_type) {
            task.timeout = Some(self.core.options.default_timeout);
        }
        if let Some(retries) = options.max_retries {
            if retries > 100 {
                return Err(ToolError::invalid(
                    format!("max_retries {retries} is too many"),
                    "give 0 to 100",
                ));
            }
            task.max_attempts = retries + 1;
        }
        if let Some(rerun) = options.rerun_on_recovery {
            task.rerun_on_recovery = rerun;
        }
        if let Some(seconds) = options.delay_seconds {
            let delay = seconds_arg("delay_seconds", seconds, true)?;
            if !delay.is_zero() {
                task.run_at = Some(Timestamp(
                    Timestamp::now().0.saturating_add(delay.as_millis() as i64),
                ));
            }
        }
        if let Some(key) = &options.idempotency_key {
            if key.is_empty() || key.len() > 256 {
                return Err(ToolError::invalid(
                    "idempotency_key must be 1 to 256 characters",
                    "pass a shorter key, or none",
                ));
            }
            task.idempotency_key = Some(key.clone());
        }
        if let Some(tags) = &options.tags {
            if tags.len() > 32 || tags.iter().any(|t| t.is_empty() || t.len() > 128) {
                return Err(ToolError::invalid(
                    "tags: at most 32, each 1 to 128 characters",
                    "pass fewer or shorter tags",
                ));
            }
            task.tags = tags.clone();
        }
        // A session named inside params (which the handlers also read) is checked like the
        // option; two different ones are a mistake.
        let in_params = task
            .params
            .get("session_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let session = match (&options.session_id, in_params) {
            (Some(option), Some(param)) if *option != param => {
                return Err(ToolError::invalid(
                    format!("session_id {option:?} and params.session_id {param:?} differ"),
                    "name the session once, as the session_id argument",
                ));
            }
            (Some(option), _) => Some(option.clone()),
            (None, param) => param,
        };
        // Every task runs in a session: the one it names, claimed here for this principal (last,
        // once nothing else can refuse the task), or a fresh one, claimed when the task starts
        // on the node that makes it.
        match session.filter(|s| !s.is_empty()) {
            Some(session) => {
                crate::tools_sandbox::check_session_id(&session)?;
                self.claim_session(&session)?;
                task.session_id = Some(session);
                task.fresh_session = false;
            }
            None => {
                task.session_id = Some(sandbox_wrapper::session::fresh_session_id());
                task.fresh_session = true;
            }
        }
        Ok(task)
    }

    /// The task types this server runs.
    pub(crate) fn task_types(&self) -> Vec<String> {
        self.core.wrapper.engine().task_types()
    }

    async fn submit(
        &self,
        task_type: String,
        params: Option<Value>,
        options: SubmitOptions,
    ) -> Result<CallToolResult, ToolError> {
        let new = self.new_task(&task_type, params, &options)?;
        let submitted = self
            .core
            .wrapper
            .submit(new)
            .await
            .map_err(ToolError::from_core)?;
        let task = submitted.task;
        let created = Created {
            task_id: task.id.to_string(),
            status: wire::status_name(&task).to_owned(),
            task_type: task.task_type.clone(),
            priority: task.priority.get(),
            deduplicated: !submitted.created,
            run_at: task
                .run_at
                .filter(|_| task.status == Status::Scheduled)
                .map(wire::rfc3339),
            created_at: wire::rfc3339(task.created_at),
            message: format!(
                "Task {} {}. Follow it with check_task_status(task_id=\"{}\"), read its output with read_task_output, wait for it with get_task_result(wait=true).",
                task.id,
                if submitted.created {
                    "submitted"
                } else {
                    "already existed with this idempotency_key"
                },
                task.id
            ),
        };
        Ok(answer(
            format!(
                "task_id: {}\nstatus: {}\ntype: {}, priority {}{}\n{}",
                created.task_id,
                created.status,
                created.task_type,
                created.priority,
                if created.deduplicated {
                    " (deduplicated)"
                } else {
                    ""
                },
                created.message
            ),
            &created,
        ))
    }

    pub(crate) async fn check_status(
        &self,
        args: CheckStatusArgs,
    ) -> Result<CallToolResult, ToolError> {
        if let Some(task_id) = args.task_id.as_deref().filter(|t| !t.trim().is_empty()) {
            let task = self.owned_task(task_id).await?;
            let view = self.view(&task);
            let text = status_text(&view);
            let status = StatusAnswer {
                task: Some(view),
                tasks: None,
                count: None,
                filters: None,
            };
            return Ok(answer(text, &status));
        }
        let task_type = args.task_type.filter(|t| !t.is_empty() && t != "all");
        let status_filter = args.status_filter.filter(|s| !s.is_empty());
        let limit = limit_arg(args.limit)?;
        let tasks = self
            .filtered(
                None,
                status_filter.as_deref(),
                task_type.clone(),
                None,
                None,
                limit,
                None,
            )
            .await?
            .0;
        let mut filters = BTreeMap::new();
        filters.insert(
            "task_type".to_owned(),
            task_type.unwrap_or_else(|| "all".into()),
        );
        filters.insert(
            "status_filter".to_owned(),
            status_filter.unwrap_or_else(|| "all".into()),
        );
        filters.insert("limit".to_owned(), limit.to_string());
        let text = list_text(&tasks, None);
        let status = StatusAnswer {
            task: None,
            count: Some(tasks.len()),
            tasks: Some(tasks),
            filters: Some(filters),
        };
        Ok(answer(text, &status))
    }

    /// A page of this principal's tasks that pass the filters (the operator's: every
    /// principal's, or `owner`'s).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn filtered(
        &self,
        owner: Option<String>,
        status: Option<&str>,
        task_type: Option<String>,
        session_id: Option<String>,
        tag: Option<String>,
        limit: u32,
        cursor: Option<String>,
    ) -> Result<(Vec<TaskView>, Option<String>), ToolError> {
        let statuses = wire::parse_status_filter(status)
            .map_err(|m| ToolError::invalid(m, "use one of the listed statuses"))?
            .unwrap_or_default();
        let filter = ListFilter {
            statuses,
            task_type,
            owner: if self.operator {
                owner
            } else {
                Some(self.principal.to_string())
            },
            session_id,
            ..ListFilter::default()
        };
        let mut cursor = match cursor.filter(|c| !c.is_empty()) {
            Some(text) => Some(text.parse().map_err(|_| {
                ToolError::invalid(
                    format!("cursor {text:?} is not one this server gave"),
                    "pass the next_cursor of the previous answer unchanged, or none for the first page",
                )
            })?),
            None => None,
        };
        // A filter the store cannot apply (tag, timeout versus failed) may thin a page: read on
        // until the page is full or the listing ends.
        let mut views = Vec::new();
        loop {
            let page = self
                .core
                .wrapper
                .engine()
                .list(
                    filter.clone(),
                    PageRequest {
                        cursor,
                        limit: limit as usize,
                    },
                )
                .await
                .map_err(ToolError::from_core)?;
            for task in &page.tasks {
                if views.len() == limit as usize {
                    break;
                }
                let tagged = tag.as_ref().is_none_or(|t| task.tags.contains(t));
                if tagged && wire::passes_status_filter(status, task) {
                    let mut view = self.view(task);
                    // Lists stay small: a failure's stderr is read one task at a time.
                    if let Some(failure) = &mut view.failure {
                        failure.stderr_tail = None;
                    }
                    views.push(view);
                }
            }
            cursor = page.next_cursor;
            if views.len() == limit as usize || cursor.is_none() {
                break;
            }
        }
        Ok((views, cursor.map(|c| c.to_string())))
    }

    pub(crate) async fn list(&self, args: ListArgs) -> Result<CallToolResult, ToolError> {
        let limit = limit_arg(args.limit)?;
        let (tasks, next_cursor) = self
            .filtered(
                None,
                args.status.as_deref(),
                args.task_type.filter(|t| !t.is_empty() && t != "all"),
                args.session_id.filter(|s| !s.is_empty()),
                args.tag.filter(|t| !t.is_empty()),
                limit,
                args.cursor,
            )
            .await?;
        let text = list_text(&tasks, next_cursor.as_deref());
        let list = TaskList {
            count: tasks.len(),
            tasks,
            next_cursor,
        };
        Ok(answer(text, &list))
    }

    async fn get_result(
        &self,
        args: GetResultArgs,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ToolError> {
        let mut task = self.owned_task(&args.task_id).await?;
        if args.wait.unwrap_or(false) && !task.status.is_terminal() {
            let timeout = match args.timeout {
                Some(seconds) => seconds_arg("timeout", seconds, true)?,
                None => self.core.options.call_wait,
            }
            .min(self.core.options.max_wait);
            task = self.await_task(task.id, timeout, context, false).await?;
        }
        let view = self.view(&task);
        let finished = task.status.is_terminal();
        let message = if finished {
            match task.status {
                Status::Completed => "The task completed; its result is in `result`.".to_owned(),
                Status::Cancelled => "The task was cancelled.".to_owned(),
                _ => format!(
                    "The task {}: see `error`; read_task_output(task_id=\"{}\") has its whole output; manage_background_tasks(action=\"retry\") runs it again.",
                    view.status, task.id
                ),
            }
        } else {
            format!(
                "The task is {} ({:.0}%); call get_task_result(task_id=\"{}\", wait=true) to wait for it.",
                view.status, view.progress, task.id
            )
        };
        let result = ResultAnswer {
            task_id: view.task_id.clone(),
            status: view.status.clone(),
            finished,
            result: task.result.clone(),
            error: view.error.clone(),
            progress: view.progress,
            eta_seconds: if finished { None } else { view.eta_seconds },
            message,
        };
        let mut text = format!("task {}: {}\n", result.task_id, result.status);
        if let Some(value) = &result.result {
            match value.get("output_tail").and_then(Value::as_str) {
                Some(tail) => {
                    text.push_str(tail);
                    if !tail.ends_with('\n') && !tail.is_empty() {
                        text.push('\n');
                    }
                    match value.get("signal").and_then(Value::as_i64) {
                        Some(signal) => text.push_str(&format!("[killed by signal {signal}]\n")),
                        None => {
                            let exit = value
                                .get("exit_code")
                                .map(Value::to_string)
                                .unwrap_or_default();
                            text.push_str(&format!("[exit code {exit}]\n"));
                        }
                    }
                }
                None => text.push_str(&format!("result: {value}\n")),
            }
        }
        if let Some(error) = &result.error {
            text.push_str(&format!("error: {error}\n"));
        }
        text.push_str(&result.message);
        Ok(answer(text, &result))
    }

    /// `wait_for_tasks`: one wait per unfinished task, all against the same timeout; ends
    /// when the mode is satisfied, the timeout passes, the client cancels, or msbd drains.
    async fn wait_for(
        &self,
        args: WaitForTasksArgs,
        context: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ToolError> {
        if args.task_ids.is_empty() || args.task_ids.len() > MAX_WAIT_TASKS {
            return Err(ToolError::invalid(
                format!("task_ids has {} ids", args.task_ids.len()),
                format!("give 1 to {MAX_WAIT_TASKS} task ids"),
            ));
        }
        let mode = args.mode.unwrap_or_default();
        let timeout = self.call_wait(args.timeout, "timeout")?;
        let mut tasks: Vec<Task> = Vec::with_capacity(args.task_ids.len());
        for id in &args.task_ids {
            let task = self.owned_task(id).await?;
            if !tasks.iter().any(|t| t.id == task.id) {
                tasks.push(task);
            }
        }
        let total = tasks.len();
        let satisfied = |finished: usize| match mode {
            WaitMode::Any => finished >= 1,
            WaitMode::All => finished == total,
        };
        let mut finished = tasks.iter().filter(|t| t.status.is_terminal()).count();
        if !satisfied(finished) {
            let token = context.meta.get_progress_token();
            let mut waits = tokio::task::JoinSet::new();
            for (index, task) in tasks.iter().enumerate() {
                if !task.status.is_terminal() {
                    let engine = self.core.wrapper.engine().clone();
                    let id = task.id;
                    waits.spawn(async move { (index, engine.wait(id, timeout).await) });
                }
            }
            loop {
                tokio::select! {
                    joined = waits.join_next() => match joined {
                        // Every wait has ended: each task finished or the timeout passed.
                        None => break,
                        Some(Ok((index, Ok(task)))) => {
                            let ended = task.status.is_terminal();
                            let id = task.id;
                            let status = wire::status_name(&task).to_owned();
                            tasks[index] = task;
                            if !ended {
                                continue;
                            }
                            finished += 1;
                            if let Some(token) = &token {
                                let param = ProgressNotificationParam::new(token.clone(), finished as f64)
                                    .with_total(total as f64)
                                    .with_message(format!("task {id} {status}"));
                                let _ = context.peer.notify_progress(param).await;
                            }
                            if satisfied(finished) {
                                break;
                            }
                        }
                        Some(Ok((_, Err(error)))) => return Err(ToolError::from_core(error)),
                        Some(Err(error)) => {
                            return Err(ToolError::new(
                                "OPERATION_FAILED",
                                format!("a wait failed: {error}"),
                                "try again",
                            ));
                        }
                    },
                    () = context.ct.cancelled() => break,
                    () = self.core.waits_end.cancelled() => break,
                }
            }
        }
        let done = satisfied(finished);
        let waited: Vec<WaitedTask> = tasks
            .iter()
            .map(|task| {
                let view = self.view(task);
                let finished = task.status.is_terminal();
                WaitedTask {
                    task_id: view.task_id,
                    status: view.status,
                    finished,
                    progress: view.progress,
                    result: task.result.clone(),
                    error: view.error,
                    eta_seconds: if finished { None } else { view.eta_seconds },
                }
            })
            .collect();
        let message = if done {
            match (mode, finished == total) {
                (_, true) => "Every task has finished; results and errors are in `tasks`.".to_owned(),
                _ => "A task has finished (see `tasks`); call wait_for_tasks again with the unfinished ones to wait for the next.".to_owned(),
            }
        } else {
            format!(
                "Not done after {} s ({finished} of {total} finished): call wait_for_tasks again to keep waiting.",
                timeout.as_secs_f64()
            )
        };
        let mut text = format!("{finished} of {total} finished (mode {}).\n", mode.as_ref());
        for task in &waited {
            text.push_str(&format!("task {}: {}", task.task_id, task.status));
            if !task.finished {
                text.push_str(&format!(", {:.0}%", task.progress));
            }
            if let Some(exit) = task.result.as_ref().and_then(|r| r.get("exit_code")) {
                text.push_str(&format!(" [exit code {exit}]"));
            }
            if let Some(error) = &task.error {
                text.push_str(&format!(": {error}"));
            }
            text.push('\n');
        }
        text.push_str(&message);
        let answer_body = WaitAnswer {
            mode,
            done,
            finished,
            total,
            tasks: waited,
            message,
        };
        Ok(answer(text, &answer_body))
    }

    async fn cancel(&self, task_id: &str) -> Result<CallToolResult, ToolError> {
        let task = self.owned_task(task_id).await?;
        if task.status.is_terminal() {
            return Ok(self.already_finished(&task));
        }
        let task = match self.core.wrapper.engine().cancel(task.id).await {
            Ok(task) => task,
            // It finished between the read above and the cancel: the same answer as when it
            // had finished before the call.
            Err(task_core::Error::IllegalTransition { transition, .. })
                if transition.from.is_terminal() =>
            {
                let task = self.owned_task(task_id).await?;
                return Ok(self.already_finished(&task));
            }
            Err(error) => return Err(ToolError::from_core(error)),
        };
        let view = self.view(&task);
        let message = if task.status == Status::Cancelled {
            format!("Task {} is cancelled.", task.id)
        } else {
            format!(
                "Task {} is being cancelled: its processes are being stopped; check_task_status shows \"cancelled\" in a moment.",
                task.id
            )
        };
        let cancel = CancelAnswer {
            task_id: view.task_id,
            status: view.status,
            cancelled: true,
            message,
        };
        Ok(answer(cancel.message.clone(), &cancel))
    }

    /// `cancel_task`'s answer for a task that had already finished.
    fn already_finished(&self, task: &Task) -> CallToolResult {
        let view = self.view(task);
        let cancel = CancelAnswer {
            task_id: view.task_id.clone(),
            message: format!(
                "The task had already finished ({}); nothing was cancelled.",
                view.status
            ),
            status: view.status,
            cancelled: false,
        };
        answer(cancel.message.clone(), &cancel)
    }

    pub(crate) async fn read_output(
        &self,
        args: ReadOutputArgs,
    ) -> Result<CallToolResult, ToolError> {
        let task = self.owned_task(&args.task_id).await?;
        let max = args.max_bytes.unwrap_or(DEFAULT_OUTPUT_BYTES);
        if max == 0 || max > MAX_OUTPUT_BYTES {
            return Err(ToolError::invalid(
                format!("max_bytes {max} is out of range"),
                format!("give 1 to {MAX_OUTPUT_BYTES}"),
            ));
        }
        match (args.tail, args.cursor) {
            (Some(tail), _) if tail == 0 || tail > MAX_OUTPUT_BYTES => {
                return Err(ToolError::invalid(
                    format!("tail {tail} is out of range"),
                    format!("give 1 to {MAX_OUTPUT_BYTES} bytes"),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(ToolError::invalid(
                    "tail and cursor were both given",
                    "give cursor to read on from a place, or tail for the last bytes, not both",
                ));
            }
            _ => {}
        }
        let latest = task.attempt;
        let attempt = match args.attempt {
            None => latest,
            Some(n) if n == 0 || n > latest => {
                return Err(if latest == 0 {
                    ToolError::invalid(
                        format!(
                            "attempt {n} is out of range: task {} has not started yet",
                            task.id
                        ),
                        "leave attempt out: the output of its first attempt is read once it starts",
                    )
                } else {
                    ToolError::invalid(
                        format!(
                            "attempt {n} is out of range: task {} has had attempts 1 to {latest}",
                            task.id
                        ),
                        format!("give 1 to {latest}, or leave attempt out for the latest"),
                    )
                });
            }
            Some(n) => n,
        };
        let earlier = attempt < latest;
        let stream = args.stream.unwrap_or_default();
        let read = if kept_attempts(latest).contains(&attempt) {
            let wrapper = &self.core.wrapper;
            let which = stream.to_core();
            match args.tail {
                Some(tail) => wrapper.read_output_tail(task.id, attempt, which, tail as usize),
                None => {
                    let cursor = args.cursor.unwrap_or(0);
                    wrapper
                        .read_output(task.id, attempt, which, cursor, max as usize)
                        .map(|chunk| chunk.map(|chunk| (cursor, chunk)))
                }
            }
            .map_err(|e| {
                ToolError::new(
                    "OPERATION_FAILED",
                    format!("cannot read the output of task {}: {e}", task.id),
                    "try again; if the task is old its output may have been pruned",
                )
            })?
        } else {
            None
        };
        let (cursor, chunk) = match read {
            Some(read) => read,
            // The combined output is there but not this stream's: captured by an older msbd.
            None if stream != OutputStreamArg::Combined
                && self
                    .core
                    .wrapper
                    .attempts_with_output(task.id, latest)
                    .contains(&attempt) =>
            {
                return Err(ToolError::invalid(
                    format!(
                        "attempt {attempt} of task {} has no {} output of its own: it ran before msbd kept stdout and stderr apart",
                        task.id,
                        stream.as_str()
                    ),
                    "read stream=\"combined\" (stdout and stderr interleaved)",
                ));
            }
            // The latest attempt has no output yet: it has not started (or has just).
            None if !earlier => (args.cursor.unwrap_or(0), OutputChunk::default()),
            None => return Err(self.attempt_not_kept(&task, attempt)),
        };
        let complete = (earlier || task.status.is_terminal()) && chunk.next_cursor >= chunk.size;
        let output = OutputAnswer {
            task_id: task.id.to_string(),
            data: chunk.data,
            cursor,
            next_cursor: chunk.next_cursor,
            size: chunk.size,
            complete,
            status: wire::status_name(&task).to_owned(),
            attempt,
            stream,
        };
        // Which stream, when one alone; which attempt, once there is more than one.
        let mut whose = match stream {
            OutputStreamArg::Combined => String::new(),
            one => format!("{} only; ", one.as_str()),
        };
        if latest > 1 {
            whose.push_str(&format!("attempt {attempt} of {latest}; "));
        }
        let footer = if complete {
            format!("[end of output; {whose}task {}]", output.status)
        } else {
            format!(
                "[bytes {}..{} of {}; {whose}task {}; read on with cursor={}]",
                cursor, output.next_cursor, output.size, output.status, output.next_cursor
            )
        };
        let mut text = output.data.clone();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&footer);
        Ok(answer(text, &output))
    }

    /// The refusal of `read_task_output` for an earlier attempt whose output is not kept: it
    /// names the attempts whose output is.
    fn attempt_not_kept(&self, task: &Task, attempt: u32) -> ToolError {
        let kept = self
            .core
            .wrapper
            .attempts_with_output(task.id, task.attempt);
        let names: Vec<String> = kept.iter().map(u32::to_string).collect();
        let (message, hint) = match names.as_slice() {
            [] => (
                format!(
                    "attempt {attempt} of task {} has no output kept, nor has any other attempt",
                    task.id
                ),
                "leave attempt out for the latest attempt's output".to_owned(),
            ),
            [only] => (
                format!(
                    "attempt {attempt} of task {} has no output kept; only attempt {only}'s is (msbd keeps the output of a task's last {KEPT_ATTEMPTS} attempts)",
                    task.id
                ),
                format!("give attempt {only}, or leave attempt out for the latest"),
            ),
            _ => (
                format!(
                    "attempt {attempt} of task {} has no output kept; attempts {} have theirs (msbd keeps the output of a task's last {KEPT_ATTEMPTS} attempts)",
                    task.id,
                    names.join(", ")
                ),
                format!(
                    "give one of {}, or leave attempt out for the latest",
                    names.join(", ")
                ),
            ),
        };
        ToolError::invalid(message, hint)
    }

    pub(crate) async fn manage_tasks(
        &self,
        args: ManageTasksArgs,
    ) -> Result<CallToolResult, ToolError> {
        let action = args.action;
        match action {
            TaskAction::Create | TaskAction::Schedule => self.create_action(action, &args).await,
            TaskAction::Cancel => {
                let result = self.cancel(&needs_task_id(action, &args.task_id)?).await?;
                action_from(action.name(), result)
            }
            TaskAction::Pause | TaskAction::Resume => {
                let task_id = needs_task_id(action, &args.task_id)?;
                self.pause_or_resume_task(action, &task_id).await
            }
            TaskAction::Retry => {
                let task = self
                    .owned_task(&needs_task_id(action, &args.task_id)?)
                    .await?;
                self.retry(task).await
            }
            TaskAction::List => self.list_action(&args).await,
            TaskAction::GetStats => {
                let stats = self.queue_statistics().await?;
                Ok(action_answer(
                    action.name(),
                    ActionStatus::Success,
                    stats_text(&stats),
                    json!({ "statistics": stats }),
                ))
            }
            TaskAction::Cleanup => self.cleanup(&args).await,
            TaskAction::ListTypes => Ok(self.list_types()),
        }
    }

    /// `create` and `schedule`: submits the task with the options of `task_config` and the
    /// arguments.
    async fn create_action(
        &self,
        action: TaskAction,
        args: &ManageTasksArgs,
    ) -> Result<CallToolResult, ToolError> {
        let task_type = args.task_type.clone().ok_or_else(|| {
            ToolError::new(
                "INVALID_TASK_TYPE",
                format!("action {:?} needs a task_type", action.name()),
                format!("give one of: {}", self.task_types().join(", ")),
            )
        })?;
        let mut options = task_config(args.task_config.as_ref())?;
        if args.priority.is_some() {
            options.priority = args.priority.clone();
        }
        if args.delay_seconds.is_some() {
            options.delay_seconds = args.delay_seconds;
        }
        if action == TaskAction::Schedule && options.delay_seconds.is_none() {
            return Err(ToolError::invalid(
                "action \"schedule\" needs delay_seconds (here or in task_config)",
                "give delay_seconds, or use action \"create\" to start as soon as possible",
            ));
        }
        let result = self
            .submit(task_type, args.parameters.clone(), options)
            .await?;
        action_from(action.name(), result)
    }

    /// `pause` and `resume` of one task.
    async fn pause_or_resume_task(
        &self,
        action: TaskAction,
        task_id: &str,
    ) -> Result<CallToolResult, ToolError> {
        let task = self.owned_task(task_id).await?;
        let engine = self.core.wrapper.engine();
        let pause = action == TaskAction::Pause;
        let task = if pause {
            engine.pause_task(task.id).await
        } else {
            engine.resume_task(task.id).await
        }
        .map_err(ToolError::from_core)?;
        let view = self.view(&task);
        let message = match (pause, task.lease_until.is_some()) {
            (true, true) => format!(
                "Task {} is paused: its processes are frozen and its timeout clock stopped; resume it to go on.",
                task.id
            ),
            (true, false) => format!(
                "Task {} is paused: it will not start until resumed.",
                task.id
            ),
            (false, _) => format!("Task {} is resumed ({}).", task.id, view.status),
        };
        Ok(action_answer(
            action.name(),
            ActionStatus::Success,
            message,
            json!({ "task": view }),
        ))
    }

    /// `list`: one page of this principal's tasks.
    async fn list_action(&self, args: &ManageTasksArgs) -> Result<CallToolResult, ToolError> {
        let limit = limit_arg(args.limit)?;
        let (tasks, next_cursor) = self
            .filtered(
                None,
                args.status.as_deref(),
                args.task_type.clone(),
                None,
                None,
                limit,
                None,
            )
            .await?;
        let message = list_text(&tasks, next_cursor.as_deref());
        Ok(action_answer(
            TaskAction::List.name(),
            ActionStatus::Success,
            message,
            json!({ "tasks": tasks, "count": tasks.len(), "next_cursor": next_cursor }),
        ))
    }

    /// `cleanup`: deletes this principal's tasks that finished `older_than_seconds` ago.
    async fn cleanup(&self, args: &ManageTasksArgs) -> Result<CallToolResult, ToolError> {
        let age = match args.older_than_seconds {
            Some(seconds) => seconds_arg("older_than_seconds", seconds, true)?,
            None => Duration::from_secs(3600),
        };
        // "Finished at least `age` ago", this millisecond included (the store deletes
        // strictly before the cutoff): with 0, every finished task goes, also one that
        // finished in the same millisecond.
        let before = Timestamp(
            Timestamp::now()
                .0
                .saturating_sub(age.as_millis() as i64)
                .saturating_add(1),
        );
        let filter = ListFilter {
            owner: Some(self.principal.to_string()),
            task_type: args
                .task_type
                .clone()
                .filter(|t| !t.is_empty() && t != "all"),
            ..ListFilter::default()
        };
        let deleted = self
            .core
            .wrapper
            .engine()
            .delete_finished(filter, before, 10_000)
            .await
            .map_err(ToolError::from_core)?;
        if deleted > 0 {
            self.core.wrapper.remove_stale_outputs().await;
        }
        Ok(action_answer(
            TaskAction::Cleanup.name(),
            changed_something(deleted > 0),
            format!(
                "Deleted {deleted} of your finished tasks that finished more than {} s ago.",
                age.as_secs()
            ),
            json!({ "deleted": deleted }),
        ))
    }

    /// `list_types`: every task type this server runs, with what it does.
    fn list_types(&self) -> CallToolResult {
        let types: Vec<TaskTypeView> = self
            .task_types()
            .into_iter()
            .map(|name| {
                let description = match name.as_str() {
                    "command" => "a shell command: params {\"command\": \"...\"} or {\"argv\": [...]}".to_owned(),
                    "code" => "code in a persistent interpreter: params {\"language\": \"python\"|\"node\"|\"bash\", \"code\": \"...\"}".to_owned(),
                    other => self
                        .core
                        .wrapper
                        .task_types()
                        .get(other)
                        .map(|spec| spec.description().to_owned())
                        .unwrap_or_default(),
                };
                TaskTypeView { name, description }
            })
            .collect();
        let message = types
            .iter()
            .map(|t| format!("{}: {}", t.name, t.description))
            .collect::<Vec<_>>()
            .join("\n");
        action_answer(
            TaskAction::ListTypes.name(),
            ActionStatus::Success,
            message,
            json!({ "task_types": types }),
        )
    }
    /// Runs a finished task again, as a new task with the same type, params and options.
    async fn retry(&self, task: Task) -> Result<CallToolResult, ToolError> {
        if !matches!(task.status, Status::Failed | Status::Cancelled) {
            return Err(ToolError::new(
                "ILLEGAL_TRANSITION",
                format!(
                    "task {} is {}: only a failed, timed-out or cancelled task can be retried",
                    task.id,
                    wire::status_name(&task)
                ),
                "wait for it to finish, or cancel it first",
            ));
        }
        let mut new = NewTask::new(task.task_type.clone(), task.params.clone());
        new.priority = task.priority;
        new.max_attempts = task.max_attempts;
        new.rerun_on_recovery = task.rerun_on_recovery;
        new.retry = task.retry;
        new.timeout = task.timeout;
        new.owner = task.owner.clone();
        new.session_id = task.session_id.clone();
        new.tags = task.tags.clone();
        new.tags.push(format!("retry_of:{}", task.id));
        let submitted = self
            .core
            .wrapper
            .submit(new)
            .await
            .map_err(ToolError::from_core)?;
        let view = self.view(&submitted.task);
        Ok(action_answer(
            TaskAction::Retry.name(),
            ActionStatus::Success,
            format!(
                "Task {} runs again as the new task {} (tag retry_of:{}).",
                task.id, view.task_id, task.id
            ),
            json!({ "task": view, "task_id": view.task_id, "retry_of": task.id.to_string() }),
        ))
    }

    pub(crate) async fn queue_statistics(&self) -> Result<QueueStatistics, ToolError> {
        let engine = self.core.wrapper.engine();
        let stats = engine.stats().await.map_err(ToolError::from_core)?;
        let mut by_priority: BTreeMap<String, u64> = BTreeMap::new();
        // Waiting tasks by priority: from a listing of the waiting ones (bounded).
        let filter = ListFilter {
            statuses: vec![Status::Queued, Status::Scheduled],
            ..ListFilter::default()
        };
        let mut cursor = None;
        for _ in 0..20 {
            let page = engine
                .list(filter.clone(), PageRequest { cursor, limit: 500 })
                .await
                .map_err(ToolError::from_core)?;
            for task in &page.tasks {
                *by_priority
                    .entry(wire::priority_name(task.priority))
                    .or_default() += 1;
            }
            cursor = page.next_cursor;
            if cursor.is_none() {
                break;
            }
        }
        let by_type = stats
            .by_type
            .iter()
            .map(|(name, counts)| {
                (
                    name.clone(),
                    counts
                        .iter()
                        .map(|(status, n)| (wire::core_status_name(*status).to_owned(), *n))
                        .collect(),
                )
            })
            .collect();
        Ok(QueueStatistics {
            total_queued: stats.count(Status::Queued) + stats.count(Status::Scheduled),
            by_priority,
            running_tasks: stats.count(Status::Running),
            paused_tasks: stats.count(Status::Paused),
            total_tasks_created: stats.total(),
            total_tasks_completed: stats.count(Status::Completed),
            total_tasks_failed: stats.count(Status::Failed),
            total_tasks_cancelled: stats.count(Status::Cancelled),
            by_type,
            max_concurrent: engine.concurrency(),
            queue_paused: engine.is_queue_paused(),
            paused_types: engine.paused_types(),
            type_limits: engine.type_limits().into_iter().collect(),
        })
    }

    pub(crate) async fn manage_queue(
        &self,
        args: ManageQueueArgs,
    ) -> Result<CallToolResult, ToolError> {
        let task_type = self.queue_task_type(args.task_type.as_deref())?;
        match args.action {
            QueueAction::GetStats => {
                let stats = self.queue_statistics().await?;
                Ok(action_answer(
                    QueueAction::GetStats.name(),
                    ActionStatus::Success,
                    stats_text(&stats),
                    json!({ "queue_statistics": stats }),
                ))
            }
            QueueAction::Pause => Ok(self.pause_or_resume_queue(true, task_type.as_deref())),
            QueueAction::Resume => Ok(self.pause_or_resume_queue(false, task_type.as_deref())),
            QueueAction::ClearQueue => {
                let priority = args.priority.as_ref().map(priority_arg).transpose()?;
                self.clear_queue(task_type, priority).await
            }
            QueueAction::SetLimits => self.set_limits(args.max_concurrent, task_type.as_deref()),
            QueueAction::Reorder => self.reorder(&args).await,
        }
    }

    /// The task type a queue action is limited to (`None`: all), or `INVALID_TASK_TYPE`.
    fn queue_task_type(&self, task_type: Option<&str>) -> Result<Option<String>, ToolError> {
        let Some(t) = task_type.filter(|t| !t.is_empty() && *t != "all") else {
            return Ok(None);
        };
        if !self.task_types().iter().any(|known| known == t) {
            return Err(ToolError::new(
                "INVALID_TASK_TYPE",
                format!("task type {t:?} is not known"),
                format!("use one of: {}", self.task_types().join(", ")),
            ));
        }
        Ok(Some(t.to_owned()))
    }

    /// `pause` and `resume` of the queue, or of one task type's.
    fn pause_or_resume_queue(&self, pause: bool, task_type: Option<&str>) -> CallToolResult {
        let engine = self.core.wrapper.engine();
        let (what, before) = match task_type {
            Some(t) => {
                let before = engine.paused_types().iter().any(|p| p == t);
                if pause {
                    engine.pause_type(t)
                } else {
                    engine.resume_type(t)
                }
                (format!("The queue of task type {t:?}"), before)
            }
            None => {
                let before = engine.is_queue_paused();
                if pause {
                    engine.pause_queue()
                } else {
                    engine.resume_queue()
                }
                ("The queue".to_owned(), before)
            }
        };
        let (status, message) = if before == pause {
            let state = if pause { "paused" } else { "running" };
            (
                ActionStatus::NoActionNeeded,
                format!("{what} was already {state}; nothing changed."),
            )
        } else if pause {
            let tasks = if task_type.is_some() {
                "its queued tasks"
            } else {
                "queued tasks"
            };
            (
                ActionStatus::Success,
                format!("{what} is paused: {tasks} wait; running ones go on."),
            )
        } else {
            (ActionStatus::Success, format!("{what} is running again."))
        };
        let action = if pause {
            QueueAction::Pause
        } else {
            QueueAction::Resume
        };
        action_answer(
            action.name(),
            status,
            message,
            json!({ "queue_paused": engine.is_queue_paused(), "paused_types": engine.paused_types() }),
        )
    }

    /// `clear_queue`: cancels this principal's tasks that have not started (of `task_type`,
    /// of `priority`).
    async fn clear_queue(
        &self,
        task_type: Option<String>,
        priority: Option<Priority>,
    ) -> Result<CallToolResult, ToolError> {
        let engine = self.core.wrapper.engine();
        let filter = ListFilter {
            statuses: vec![Status::Queued, Status::Scheduled, Status::Paused],
            owner: Some(self.principal.to_string()),
            task_type,
            ..ListFilter::default()
        };
        let mut cancelled = Vec::new();
        loop {
            let page = engine
                .list(
                    filter.clone(),
                    PageRequest {
                        cursor: None,
                        limit: 500,
                    },
                )
                .await
                .map_err(ToolError::from_core)?;
            let mut any = false;
            for task in page.tasks {
                // A frozen (running, paused) task is not in the queue.
                if task.lease_until.is_some() || priority.is_some_and(|p| p != task.priority) {
                    continue;
                }
                if engine.cancel(task.id).await.is_ok() {
                    cancelled.push(task.id.to_string());
                    any = true;
                }
            }
            if !any || page.next_cursor.is_none() {
                break;
            }
        }
        Ok(action_answer(
            QueueAction::ClearQueue.name(),
            changed_something(!cancelled.is_empty()),
            format!(
                "Cancelled {} of your tasks that had not started.",
                cancelled.len()
            ),
            json!({ "cancelled": cancelled.len(), "task_ids": cancelled }),
        ))
    }

    /// `set_limits`: the most tasks running at once, overall or of `task_type`.
    fn set_limits(
        &self,
        max_concurrent: Option<u32>,
        task_type: Option<&str>,
    ) -> Result<CallToolResult, ToolError> {
        let engine = self.core.wrapper.engine();
        let Some(max) = max_concurrent else {
            return Err(ToolError::invalid(
                "action \"set_limits\" needs max_concurrent",
                "give max_concurrent: the most tasks running at once (overall, or for task_type)",
            ));
        };
        let action = QueueAction::SetLimits.name();
        if let Some(t) = task_type {
            let limit = (max > 0).then_some(max as usize);
            engine.set_type_limit(t, limit);
            return Ok(action_answer(
                action,
                ActionStatus::Success,
                match limit {
                    Some(n) => format!("At most {n} tasks of type {t:?} run at once."),
                    None => format!("Task type {t:?} has no limit of its own now."),
                },
                json!({ "task_type": t, "max_concurrent": max }),
            ));
        }
        if max == 0 || max > 1024 {
            return Err(ToolError::invalid(
                format!("max_concurrent {max} is out of range"),
                "give 1 to 1024 (to stop starting tasks, use action \"pause\")",
            ));
        }
        engine.set_concurrency(max as usize);
        Ok(action_answer(
            action,
            ActionStatus::Success,
            format!("At most {max} tasks run at once."),
            json!({ "max_concurrent": max }),
        ))
    }

    /// `reorder`: a new priority for a waiting task.
    async fn reorder(&self, args: &ManageQueueArgs) -> Result<CallToolResult, ToolError> {
        let task_id = args.task_id.clone().ok_or_else(|| {
            ToolError::new(
                "MISSING_TASK_ID",
                "action \"reorder\" needs a task_id",
                "pass the task_id of a waiting task and its new priority",
            )
        })?;
        let priority = args.priority.as_ref().ok_or_else(|| {
            ToolError::invalid(
                "action \"reorder\" needs a priority",
                "give priority: 0 to 9, or low, normal, high, critical",
            )
        })?;
        let priority = priority_arg(priority)?;
        let task = self.owned_task(&task_id).await?;
        let task = self
            .core
            .wrapper
            .engine()
            .set_priority(task.id, priority)
            .await
            .map_err(ToolError::from_core)?;
        let view = self.view(&task);
        Ok(action_answer(
            QueueAction::Reorder.name(),
            ActionStatus::Success,
            format!(
                "Task {} now has priority {} ({}).",
                task.id,
                priority.get(),
                wire::priority_name(priority)
            ),
            json!({ "task": view }),
        ))
    }
}

/// A duration argument in seconds, or what was wrong.
pub(crate) fn seconds_arg(name: &str, seconds: f64, zero_ok: bool) -> Result<Duration, ToolError> {
    let max = 30.0 * 86_400.0;
    if !seconds.is_finite() || seconds < 0.0 || (!zero_ok && seconds == 0.0) || seconds > max {
        return Err(ToolError::invalid(
            format!("{name} {seconds} is out of range"),
            format!(
                "give {} to {max} seconds",
                if zero_ok { "0" } else { "more than 0" }
            ),
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn limit_arg(limit: Option<u32>) -> Result<u32, ToolError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        0 => Err(ToolError::invalid(
            "limit 0 is out of range",
            format!("give 1 to {MAX_LIMIT}"),
        )),
        n => Ok(n.min(MAX_LIMIT)),
    }
}

/// The description of `manage_background_tasks`: its actions from [`TaskAction`].
fn manage_tasks_description() -> String {
    format!(
        "Manage background tasks with one tool, by action: {} (the action argument says what each does). create and schedule take task_type, parameters, priority, task_config {{timeout_seconds, max_retries, delay_seconds, idempotency_key, session_id, tags, rerun_on_recovery}} (schedule also delay_seconds); cancel, pause, resume and retry take task_id; list takes task_type, status, limit; cleanup takes older_than_seconds.",
        TaskAction::listed()
    )
}

/// The description of `manage_task_queue`: its actions from [`QueueAction`].
fn manage_queue_description() -> String {
    format!(
        "Manage the task queue, by action: {} (the action argument says what each does). pause, resume, clear_queue and set_limits take task_type (default: every type); clear_queue takes priority; set_limits takes max_concurrent; reorder takes task_id and priority.",
        QueueAction::listed()
    )
}

/// The task id an action needs, or `MISSING_TASK_ID`.
fn needs_task_id(action: TaskAction, task_id: &Option<String>) -> Result<String, ToolError> {
    task_id
        .clone()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| {
            ToolError::new(
                "MISSING_TASK_ID",
                format!("action {:?} needs a task_id", action.name()),
                "pass the task_id of one of your tasks (list_tasks shows them)",
            )
        })
}

/// The submission options of `task_config` (refusing a field that is not one).
fn task_config(config: Option<&Value>) -> Result<SubmitOptions, ToolError> {
    let Some(config) = config.filter(|c| !c.is_null()) else {
        return Ok(SubmitOptions::default());
    };
    if let Some(config) = config.as_object() {
        crate::arguments::check_task_config(config)?;
    }
    serde_json::from_value(config.clone()).map_err(|e| {
        ToolError::invalid(
            format!("task_config is not valid: {e}"),
            "task_config takes timeout_seconds, max_retries, delay_seconds, idempotency_key, session_id, tags, rerun_on_recovery",
        )
    })
}

/// A priority argument, or what was wrong.
fn priority_arg(priority: &wire::PriorityArg) -> Result<Priority, ToolError> {
    priority
        .to_priority()
        .map_err(|m| ToolError::invalid(m, "priority: 0 to 9, or low, normal, high, critical"))
}

/// `success` when an action changed something, else `no_action_needed`.
fn changed_something(changed: bool) -> ActionStatus {
    if changed {
        ActionStatus::Success
    } else {
        ActionStatus::NoActionNeeded
    }
}

/// One task type in the answer of `list_types`.
#[derive(Serialize)]
struct TaskTypeView {
    name: String,
    description: String,
}

fn action_answer(
    action: &str,
    status: ActionStatus,
    message: String,
    data: Value,
) -> CallToolResult {
    let data = match data {
        Value::Object(map) => map,
        other => {
            let mut map = Map::new();
            map.insert("data".into(), other);
            map
        }
    };
    let text = message.clone();
    answer(
        text,
        &ActionAnswer {
            action: action.to_owned(),
            status,
            message,
            data,
        },
    )
}

/// Wraps another tool's answer as an action's.
fn action_from(action: &str, result: CallToolResult) -> Result<CallToolResult, ToolError> {
    let data = match result.structured_content.clone() {
        Some(Value::Object(mut map)) => {
            // The action's own fields win; the wrapped answer's are renamed.
            for key in ["status", "message", "action"] {
                if let Some(value) = map.remove(key) {
                    map.insert(format!("task_{key}"), value);
                }
            }
            Value::Object(map)
        }
        _ => json!({}),
    };
    let message = result
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .unwrap_or_default();
    Ok(action_answer(action, ActionStatus::Success, message, data))
}

fn status_text(view: &TaskView) -> String {
    let mut text = format!(
        "task {} ({}): {}, {:.0}% done",
        view.task_id, view.task_type, view.status, view.progress
    );
    if let Some(eta) = view.eta_seconds.filter(|_| {
        !matches!(
            view.status.as_str(),
            "completed" | "failed" | "timeout" | "cancelled"
        )
    }) {
        text.push_str(&format!(", about {eta:.0} s left"));
    }
    if let Some(message) = &view.progress_message {
        text.push_str(&format!("\nprogress: {message}"));
    }
    if view.interrupted_attempts == 0 {
        text.push_str(&format!(
            "\nattempt {} of {}",
            view.attempt, view.max_attempts
        ));
    } else {
        // Interrupted attempts do not count against max_attempts.
        text.push_str(&format!(
            "\nattempt {} ({} of {} counted; {} interrupted by msbd going away, not counted)",
            view.attempt,
            view.attempt.saturating_sub(view.interrupted_attempts),
            view.max_attempts,
            view.interrupted_attempts
        ));
    }
    if let Some(outcome) = &view.last_attempt_outcome
        && !matches!(view.status.as_str(), "completed" | "cancelled")
    {
        text.push_str(&format!(", last attempt ended: {outcome}"));
    }
    if let Some(session) = &view.session_id {
        text.push_str(&format!(", session {session}"));
    }
    if view.attempts.len() > 1 {
        let history: Vec<String> = view
            .attempts
            .iter()
            .map(|a| format!("#{} {}", a.attempt, a.outcome))
            .collect();
        text.push_str(&format!("\nattempts: {}", history.join(", ")));
    }
    if let Some(error) = &view.error {
        text.push_str(&format!("\nerror: {error}"));
    }
    if let Some(failure) = &view.failure {
        let how = match (failure.exit_code, failure.signal) {
            (_, Some(signal)) => format!("killed by signal {signal}"),
            (Some(code), None) => format!("exit code {code}"),
            (None, None) => failure.reason.clone(),
        };
        text.push_str(&format!("\nfailed run: {how}"));
        if failure.stderr_tail.as_ref().is_some_and(|t| !t.is_empty()) {
            text.push_str(" (the end of its stderr is in failure.stderr_tail)");
        }
    }
    text
}

fn list_text(tasks: &[TaskView], next_cursor: Option<&str>) -> String {
    if tasks.is_empty() {
        return "No tasks match.".into();
    }
    let mut text = format!("{} task(s):\n", tasks.len());
    for view in tasks {
        text.push_str(&format!(
            "- {} {} {} {:.0}% (created {})\n",
            view.task_id, view.task_type, view.status, view.progress, view.created_at
        ));
    }
    if let Some(cursor) = next_cursor {
        text.push_str(&format!("More: pass cursor={cursor:?}."));
    }
    text
}

fn stats_text(stats: &QueueStatistics) -> String {
    format!(
        "queued {} (by priority {:?}), running {}, paused {}, completed {}, failed {}, cancelled {}, total {}; at most {} at once{}",
        stats.total_queued,
        stats.by_priority,
        stats.running_tasks,
        stats.paused_tasks,
        stats.total_tasks_completed,
        stats.total_tasks_failed,
        stats.total_tasks_cancelled,
        stats.total_tasks_created,
        stats.max_concurrent,
        if stats.queue_paused {
            "; the queue is paused"
        } else {
            ""
        }
    )
}
