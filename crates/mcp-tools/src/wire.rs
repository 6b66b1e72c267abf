//! The wire types: tool arguments and structured answers. They are this crate's own, converted by
//! hand from `task-core` and `sandbox-wrapper` types, so that the core types can change without
//! changing what clients see.
//!
//! Names follow the background-task tools and the microsandbox wrapper that msbd replaces
//! (`task_id`, `task_type`, `status`, `progress`, `eta_seconds`, `priority`, ...).

use std::collections::BTreeMap;

use rmcp::schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use task_core::{AttemptRecord, FailureKind, Priority, Status, Task, Timestamp};

pub use crate::actions::{Action, QueueAction, TaskAction};

// ---------------------------------------------------------------------------------------------
// Arguments shared by the submitting tools.

/// A priority: a number from 0 (lowest) to 9 (highest), or a name.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(untagged)]
pub enum PriorityArg {
    /// 0 (lowest) to 9 (highest); 5 is normal.
    Number(i64),
    /// `low` (2), `normal` (5), `high` (8) or `critical` (9).
    Name(String),
}

impl PriorityArg {
    /// The core priority, or what was wrong.
    pub fn to_priority(&self) -> Result<Priority, String> {
        match self {
            PriorityArg::Number(n) => u8::try_from(*n)
                .ok()
                .and_then(Priority::new)
                .ok_or_else(|| {
                    format!("priority {n} is out of range: give 0 (lowest) to 9 (highest), or low, normal, high, critical")
                }),
            PriorityArg::Name(name) => match name.to_ascii_lowercase().as_str() {
                "low" => Ok(Priority::LOW),
                "normal" | "medium" | "default" => Ok(Priority::NORMAL),
                "high" => Ok(Priority::HIGH),
                "critical" | "urgent" => Ok(Priority::CRITICAL),
                other => other.parse::<u8>().ok().and_then(Priority::new).ok_or_else(|| {
                    format!("priority {name:?} is not known: give low, normal, high, critical, or a number from 0 to 9")
                }),
            },
        }
    }
}

/// How a task is to be run: the options every submitting tool accepts (`task_config` of
/// `manage_background_tasks` is one of these).
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct SubmitOptions {
    /// Priority: 0 (lowest) to 9 (highest), or "low" (2), "normal" (5), "high" (8), "critical"
    /// (9). Higher runs sooner. Default: the task type's default, else normal.
    #[serde(default)]
    pub priority: Option<PriorityArg>,
    /// The longest one attempt may run, in seconds; then it is killed and counts as failed
    /// (status "timeout"). Default: the task type's default, else the server's.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// How many times to retry a failed attempt (0 = run once). Default: the task type's
    /// default, else 0.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Wait this many seconds before starting (status "scheduled" until then).
    #[serde(default)]
    pub delay_seconds: Option<f64>,
    /// A key that makes submitting idempotent: a second submission with the same key returns
    /// the first task (`deduplicated: true`) instead of creating another.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The sandbox session to run in (for `command`, `code` and operator types): its work
    /// directory and interpreters persist between tasks. Omit for a fresh session; the result
    /// says which session ran the task.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Free labels, to find tasks again with `list_tasks(tag=...)`.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Whether an attempt cut short because msbd itself went away (a restart, a crash, a lost
    /// node) runs again. true (the default): the task runs again, and the cut-short attempt does
    /// not count against max_retries. false: the task ends "failed" with error kind
    /// "interrupted" (for work that must not run twice). Default: the task type's default,
    /// else true.
    #[serde(default)]
    pub rerun_on_recovery: Option<bool>,
}

/// `create_background_task` and `submit_task`: the task, and the options of [`SubmitOptions`]
/// as arguments of their own.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct SubmitArgs {
    /// The kind of work: "command" (params `{"command": "<shell line>"}` or `{"argv": [...]}`, plus
    /// optional env, stdin, flavor, and network ("none"|"allow"|"host") and network_allow (names)
    /// for a new session), "code" (params {"language": "python"|"node"|"bash", "code": "..."},
    /// with the same session options), or an operator-defined type (see `manage_background_tasks(action="list_types")`).
    pub task_type: String,
    /// The task's input, an object whose shape depends on `task_type`.
    #[serde(default, alias = "parameters")]
    pub params: Option<Value>,
    /// Priority: 0 (lowest) to 9 (highest), or "low" (2), "normal" (5), "high" (8), "critical"
    /// (9). Higher runs sooner. Default: the task type's default, else normal.
    #[serde(default)]
    pub priority: Option<PriorityArg>,
    /// The longest one attempt may run, in seconds; then it is killed and counts as failed
    /// (status "timeout"). Default: the task type's default, else the server's.
    #[serde(default)]
    pub timeout_seconds: Option<f64>,
    /// How many times to retry a failed attempt (0 = run once). Default: the task type's
    /// default, else 0.
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Wait this many seconds before starting (status "scheduled" until then).
    #[serde(default)]
    pub delay_seconds: Option<f64>,
    /// A key that makes submitting idempotent: a second submission with the same key returns
    /// the first task (`deduplicated: true`) instead of creating another.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// The sandbox session to run in (for `command`, `code` and operator types): its work
    /// directory and interpreters persist between tasks. Omit for a fresh session; the result
    /// says which session ran the task.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Free labels, to find tasks again with `list_tasks(tag=...)`.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Whether an attempt cut short because msbd itself went away (a restart, a crash, a lost
    /// node) runs again. true (the default): the task runs again, and the cut-short attempt does
    /// not count against max_retries. false: the task ends "failed" with error kind
    /// "interrupted" (for work that must not run twice). Default: the task type's default,
    /// else true.
    #[serde(default)]
    pub rerun_on_recovery: Option<bool>,
}

impl SubmitArgs {
    /// The submission options among the arguments.
    ///
    /// (Not a `#[serde(flatten)]` field: serde cannot refuse unknown fields next to one.)
    pub fn options(&self) -> SubmitOptions {
        SubmitOptions {
            priority: self.priority.clone(),
            timeout_seconds: self.timeout_seconds,
            max_retries: self.max_retries,
            delay_seconds: self.delay_seconds,
            idempotency_key: self.idempotency_key.clone(),
            session_id: self.session_id.clone(),
            tags: self.tags.clone(),
            rerun_on_recovery: self.rerun_on_recovery,
        }
    }
}

/// `check_task_status`.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct CheckStatusArgs {
    /// The task to look at. Omit to list tasks instead (filtered by `task_type`,
    /// `status_filter`, `limit`).
    #[serde(default)]
    pub task_id: Option<String>,
    /// Without a task_id: only tasks of this type ("all" for every type).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Without a task_id: only tasks in this status ("all", "pending", "scheduled", "running",
    /// "paused", "completed", "failed", "timeout", "cancelled", or "active" for the unfinished
    /// ones).
    #[serde(default)]
    pub status_filter: Option<String>,
    /// Without a task_id: the most tasks to return (1 to 500; default 20).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// `get_task_result`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct GetResultArgs {
    /// The task.
    pub task_id: String,
    /// Whether to wait for the task to finish (up to `timeout` seconds). Default false: answer
    /// at once with the current state.
    #[serde(default)]
    pub wait: Option<bool>,
    /// With wait: the most seconds to wait (default the server's call wait, 20 s; at most its
    /// longest wait, 3600 s). The answer says `finished: false` if the task was still running
    /// then; call again to keep waiting.
    #[serde(default)]
    pub timeout: Option<f64>,
}

/// `wait_for_tasks`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct WaitForTasksArgs {
    /// The tasks to wait for (1 to 100, each yours).
    pub task_ids: Vec<String>,
    /// "any" (the default): until one of them has finished; "all": until every one has.
    #[serde(default)]
    pub mode: Option<WaitMode>,
    /// The most seconds to wait (default the server's call wait, 20 s; at most its longest
    /// wait, 3600 s). The answer says `done: false` when the wait ran out first; call again to
    /// keep waiting.
    #[serde(default)]
    pub timeout: Option<f64>,
}

/// What `wait_for_tasks` waits for.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema, strum::AsRefStr,
)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum WaitMode {
    /// Until one of the tasks has finished.
    #[default]
    Any,
    /// Until every one has.
    All,
}

/// The answer of `wait_for_tasks`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct WaitAnswer {
    /// What was waited for: "any" or "all".
    pub mode: WaitMode,
    /// Whether that happened (false: the wait ran out, or was cut short, first).
    pub done: bool,
    /// How many of the tasks have finished.
    pub finished: usize,
    /// How many tasks were waited for.
    pub total: usize,
    /// Each task as it stands, in the order asked.
    pub tasks: Vec<WaitedTask>,
    /// What to do next.
    pub message: String,
}

/// One task of a `wait_for_tasks` answer.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct WaitedTask {
    /// The task's id.
    pub task_id: String,
    /// Its status (see check_task_status).
    pub status: String,
    /// Whether it has finished (completed, failed, timeout or cancelled).
    pub finished: bool,
    /// Percent done.
    pub progress: f64,
    /// What it returned, once completed; for a failed run, what that run left (as
    /// get_task_result's `result`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Estimated seconds until it finishes, when unfinished and known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
}

/// Tools that take only a task id (`cancel_task`).
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct TaskIdArgs {
    /// The task.
    pub task_id: String,
}

/// `list_tasks`.
#[derive(Clone, Debug, Default, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ListArgs {
    /// Only tasks in this status: "pending", "scheduled", "running", "paused", "completed",
    /// "failed", "timeout", "cancelled", "active" (unfinished) or "all" (default).
    #[serde(default)]
    pub status: Option<String>,
    /// Only tasks of this type.
    #[serde(default)]
    pub task_type: Option<String>,
    /// Only tasks that ran (or will run) in this session.
    #[serde(default)]
    pub session_id: Option<String>,
    /// Only tasks with this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// The most tasks per page (1 to 500; default 20).
    #[serde(default)]
    pub limit: Option<u32>,
    /// Where to continue: the `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// `read_task_output`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ReadOutputArgs {
    /// The task.
    pub task_id: String,
    /// The byte offset to read from: 0 at first, then the previous answer's `next_cursor`.
    #[serde(default)]
    pub cursor: Option<u64>,
    /// The most bytes to return (1 to 1048576; default 65536).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Instead of reading from a cursor: the last this many bytes (1 to 1048576), the latest
    /// output of a running task or the end of a finished one's. The answer's `cursor` is where
    /// they start and `next_cursor` the end, to read on from.
    #[serde(default)]
    pub tail: Option<u64>,
    /// Which attempt's output to read, from 1 to the task's latest attempt (default: the
    /// latest). A retried or re-run task keeps the output of its last 5 attempts, each read by
    /// its own cursor.
    #[serde(default)]
    pub attempt: Option<u32>,
    /// Which output: "combined" (default: stdout and stderr interleaved as written, with
    /// msbd's notes), "stdout" or "stderr" (that stream alone). Each is its own file with its
    /// own cursor, size and tail.
    #[serde(default)]
    pub stream: Option<OutputStreamArg>,
}

/// Which output `read_task_output` reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "lowercase")]
pub enum OutputStreamArg {
    /// stdout and stderr interleaved as they were written, with msbd's own notes.
    #[default]
    Combined,
    /// Standard output alone.
    Stdout,
    /// Standard error alone.
    Stderr,
}

impl OutputStreamArg {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStreamArg::Combined => "combined",
            OutputStreamArg::Stdout => "stdout",
            OutputStreamArg::Stderr => "stderr",
        }
    }

    /// The wrapper's name for it.
    pub fn to_core(self) -> sandbox_wrapper::output::OutputStream {
        use sandbox_wrapper::output::OutputStream;
        match self {
            OutputStreamArg::Combined => OutputStream::Combined,
            OutputStreamArg::Stdout => OutputStream::Stdout,
            OutputStreamArg::Stderr => OutputStream::Stderr,
        }
    }
}

/// `manage_background_tasks`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ManageTasksArgs {
    /// What to do (every action, with what it does, is in the schema's description).
    #[schemars(description = TaskAction::argument_description())]
    pub action: TaskAction,
    /// The task, for cancel, pause, resume and retry.
    #[serde(default)]
    pub task_id: Option<String>,
    /// The task type, for create and schedule (and a filter for list).
    #[serde(default)]
    pub task_type: Option<String>,
    /// The task's input, for create and schedule.
    #[serde(default, alias = "params")]
    pub parameters: Option<Value>,
    /// Priority, for create and schedule: 0 to 9, or low, normal, high, critical.
    #[serde(default)]
    pub priority: Option<PriorityArg>,
    /// More submission options for create and schedule (timeout_seconds, max_retries,
    /// delay_seconds, idempotency_key, session_id, tags), as an object.
    #[serde(default)]
    pub task_config: Option<Value>,
    /// For schedule: seconds from now.
    #[serde(default)]
    pub delay_seconds: Option<f64>,
    /// For list: only tasks in this status.
    #[serde(default)]
    pub status: Option<String>,
    /// For list: the most tasks (default 20).
    #[serde(default)]
    pub limit: Option<u32>,
    /// For cleanup: delete finished tasks that finished more than this many seconds ago.
    #[serde(default)]
    pub older_than_seconds: Option<f64>,
}

/// `manage_task_queue`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ManageQueueArgs {
    /// What to do (every action, with what it does, is in the schema's description).
    #[schemars(description = QueueAction::argument_description())]
    pub action: QueueAction,
    /// For pause, resume, clear_queue and set_limits: only this task type.
    #[serde(default)]
    pub task_type: Option<String>,
    /// For clear_queue: only tasks of this priority. For reorder: the new priority.
    #[serde(default)]
    pub priority: Option<PriorityArg>,
    /// For set_limits: the most tasks running at once (overall, or of task_type; with a
    /// task_type, 0 removes the type's own limit).
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// For reorder: the waiting task.
    #[serde(default)]
    pub task_id: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Answers.

/// A task as clients see it.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct TaskView {
    /// The task's id.
    pub task_id: String,
    /// Its type.
    pub task_type: String,
    /// "pending" (queued), "scheduled" (waiting for its start time or a retry), "running",
    /// "paused", "completed", "failed", "timeout" (its last attempt ran out of time) or
    /// "cancelled".
    pub status: String,
    /// Percent done, 0 to 100 (100 once completed).
    pub progress: f64,
    /// The latest progress message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_message: Option<String>,
    /// Estimated seconds until it finishes; null when unknown (0 once finished).
    pub eta_seconds: Option<f64>,
    /// 0 (lowest) to 9 (highest).
    pub priority: u8,
    /// The current (or last) attempt, from 1; 0 before the first.
    pub attempt: u32,
    /// The most attempts it may have: as submitted, never changed. Interrupted attempts do not
    /// count against it.
    pub max_attempts: u32,
    /// How many of its attempts were cut short because msbd went away (a restart, a crash, a
    /// lost node) rather than by the task itself; they do not count against max_attempts.
    /// Left out when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interrupted_attempts: u32,
    /// How its latest ended attempt ended: "completed", "failed", "timeout", "rejected",
    /// "cancelled", "interrupted" (stopped by a shutdown of msbd), or "worker_lost" (msbd or its
    /// node died under it). Left out while no attempt has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_attempt_outcome: Option<String>,
    /// How each of its ended attempts ended, oldest first: the last 20 are kept. The attempt
    /// under way has no entry yet. Left out while no attempt has ended (and for tasks whose
    /// attempts ended before msbd kept this history).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptView>,
    /// false when it was submitted with rerun_on_recovery: false. Left out when true.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub rerun_on_recovery: bool,
    /// The sandbox session it runs in, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Its tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When its current attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    /// When it may start (a delayed or retried task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<String>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How the failed run behind `error` ended, as facts (sandbox tasks whose process ran: a
    /// command, code, an operator-defined type). Left out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureView>,
    /// Whether a cancel was asked for and is being carried out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel_requested: bool,
}

/// One ended attempt of a task, in [`TaskView::attempts`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct AttemptView {
    /// The attempt's number, from 1.
    pub attempt: u32,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub ended_at: String,
    /// How it ended: "completed", "failed" (the work returned an error), "timeout", "rejected"
    /// (it could not be run), "cancelled", "interrupted" (stopped by a shutdown of msbd; does
    /// not count against max_attempts) or "worker_lost" (msbd or its node died under it; does
    /// not count either).
    #[schemars(extend("enum" = ["completed", "failed", "timeout", "rejected", "cancelled", "interrupted", "worker_lost"]))]
    pub outcome: String,
    /// The msbd node that ran it, where several share one PostgreSQL store. Left out on a
    /// store one msbd owns (every attempt ran there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl AttemptView {
    /// The view of one entry of a task's history.
    pub fn new(record: &AttemptRecord) -> AttemptView {
        AttemptView {
            attempt: record.n,
            started_at: rfc3339(record.started_at),
            ended_at: rfc3339(record.ended_at),
            outcome: record.outcome.as_str().to_owned(),
            node: record.node.clone(),
        }
    }
}

/// The wire name of a task's status.
pub fn status_name(task: &Task) -> &'static str {
    status_name_of(task.status, task.error.as_ref().map(|e| e.kind))
}

/// The wire name of a status and the kind of its failure: [`core_status_name`], except that a
/// task that failed by timing out is `timeout`.
pub fn status_name_of(status: Status, failure: Option<FailureKind>) -> &'static str {
    match (status, failure) {
        (Status::Failed, Some(FailureKind::Timeout)) => "timeout",
        (status, _) => core_status_name(status),
    }
}

/// The core statuses a wire status filter stands for, or what was wrong. `None` means all.
pub fn parse_status_filter(filter: Option<&str>) -> Result<Option<Vec<Status>>, String> {
    let Some(filter) = filter.map(str::trim).filter(|f| !f.is_empty()) else {
        return Ok(None);
    };
    let statuses = match filter.to_ascii_lowercase().as_str() {
        "all" | "any" => return Ok(None),
        "pending" | "queued" => vec![Status::Queued],
        "scheduled" => vec![Status::Scheduled],
        "running" => vec![Status::Running],
        "paused" => vec![Status::Paused],
        "completed" => vec![Status::Completed],
        // A timeout is a failed task whose error says so: filtered again by the caller.
        "failed" | "timeout" => vec![Status::Failed],
        "cancelled" | "canceled" => vec![Status::Cancelled],
        "active" | "unfinished" => vec![
            Status::Queued,
            Status::Scheduled,
            Status::Paused,
            Status::Running,
        ],
        "finished" | "done" | "terminal" => {
            vec![Status::Completed, Status::Failed, Status::Cancelled]
        }
        other => {
            return Err(format!(
                "status {other:?} is not known: give all, pending, scheduled, running, paused, completed, failed, timeout, cancelled, active or finished"
            ));
        }
    };
    Ok(Some(statuses))
}

/// Whether a task passes a wire status filter beyond its core status (`timeout` versus
/// `failed`).
pub fn passes_status_filter(filter: Option<&str>, task: &Task) -> bool {
    match filter.map(|f| f.trim().to_ascii_lowercase()) {
        Some(f) if f == "timeout" => status_name(task) == "timeout",
        Some(f) if f == "failed" => status_name(task) == "failed",
        _ => true,
    }
}

/// RFC 3339 text of a timestamp.
pub fn rfc3339(at: Timestamp) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(at.0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_else(|| at.0.to_string())
}

impl TaskView {
    /// The view of a task, with its ETA (from the engine).
    pub fn new(task: &Task, eta: Option<std::time::Duration>) -> TaskView {
        let progress = match task.status {
            Status::Completed => 100.0,
            _ => task.progress.unwrap_or(0.0) * 100.0,
        };
        TaskView {
            task_id: task.id.to_string(),
            task_type: task.task_type.clone(),
            status: status_name(task).to_owned(),
            progress: (progress * 10.0).round() / 10.0,
            progress_message: task.progress_message.clone(),
            eta_seconds: eta.map(|d| (d.as_secs_f64() * 10.0).round() / 10.0),
            priority: task.priority.get(),
            attempt: task.attempt,
            max_attempts: task.max_attempts,
            interrupted_attempts: task.interrupted_attempts,
            last_attempt_outcome: last_attempt_outcome(task).map(str::to_owned),
            attempts: task.attempts.iter().map(AttemptView::new).collect(),
            rerun_on_recovery: task.rerun_on_recovery,
            session_id: task
                .session_id
                .clone()
                .or_else(|| session_of_result(task.result.as_ref())),
            tags: task.tags.clone(),
            created_at: rfc3339(task.created_at),
            started_at: task.started_at.map(rfc3339),
            completed_at: task.finished_at.map(rfc3339),
            run_at: match task.status {
                Status::Scheduled => task.run_at.map(rfc3339),
                _ => None,
            },
            error: task.error.as_ref().map(|e| e.message.clone()),
            failure: FailureView::of(task),
            cancel_requested: task.cancel_requested && !task.status.is_terminal(),
        }
    }
}

/// How a failed run ended, in [`TaskView::failure`]: read from the result its handler kept
/// beside the error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct FailureView {
    /// Its exit code; null when it did not exit on its own (a signal, a timeout).
    pub exit_code: Option<i64>,
    /// The signal that killed it; null when none did.
    pub signal: Option<i64>,
    /// Why it ended: "exited", "timed out" (the task's timeout), "killed: memory limit",
    /// "killed by a signal", "cancelled".
    pub reason: String,
    /// The end of its stderr (at most 4 KiB). Left out of lists (list_tasks, check_task_status
    /// without a task_id): check_task_status with the task_id, or get_task_result, has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_tail: Option<String>,
}

impl FailureView {
    /// The facts of a task's failed run, when it has an error and the result of that run.
    pub fn of(task: &Task) -> Option<FailureView> {
        if task.status == Status::Completed || task.error.is_none() {
            return None;
        }
        let result = task.result.as_ref()?;
        Some(FailureView {
            exit_code: result.get("exit_code").and_then(Value::as_i64),
            signal: result.get("signal").and_then(Value::as_i64),
            reason: result.get("reason")?.as_str()?.to_owned(),
            stderr_tail: result
                .get("stderr_tail")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_true(b: &bool) -> bool {
    *b
}

fn yes() -> bool {
    true
}

/// How the latest ended attempt of a task ended, or `None` while none has: the last entry of
/// its history. A task without one (its attempts ended before msbd kept it) is read from its
/// status and error: every end other than a completion or a cancel leaves its reason as the
/// task's error (a failure waiting for its retry, an interruption waiting for its rerun), so
/// the error's kind is the last end's.
pub fn last_attempt_outcome(task: &Task) -> Option<&'static str> {
    if let Some(last) = task.attempts.last() {
        return Some(last.outcome.as_str());
    }
    let from_error = || {
        task.error.as_ref().map(|e| match e.kind {
            FailureKind::Error => "failed",
            FailureKind::Timeout => "timeout",
            FailureKind::WorkerLost => "worker_lost",
            FailureKind::Interrupted => "interrupted",
            FailureKind::Rejected => "rejected",
        })
    };
    match task.status {
        _ if task.attempt == 0 => None,
        Status::Completed => Some("completed"),
        Status::Cancelled => Some("cancelled"),
        Status::Failed | Status::Queued | Status::Scheduled => from_error(),
        // The attempt under way has not ended: the one before it, if any.
        Status::Running => (task.attempt > 1).then(from_error).flatten(),
        Status::Paused => {
            let frozen = task.lease_until.is_some();
            if frozen && task.attempt == 1 {
                None
            } else {
                from_error()
            }
        }
    }
}

/// The session a sandboxed task's result names.
fn session_of_result(result: Option<&Value>) -> Option<String> {
    result?.get("session_id")?.as_str().map(str::to_owned)
}

/// The answer of `create_background_task` and `submit_task`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct Created {
    /// The new task's id: pass it to check_task_status, read_task_output, get_task_result,
    /// cancel_task.
    pub task_id: String,
    /// "pending" or "scheduled" (or, for a deduplicated submission, the existing task's status).
    pub status: String,
    /// Its type.
    pub task_type: String,
    /// 0 (lowest) to 9 (highest).
    pub priority: u8,
    /// True when the idempotency key matched an existing task, which is returned instead.
    pub deduplicated: bool,
    /// When it may start, for a delayed task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_at: Option<String>,
    /// When it was created.
    pub created_at: String,
    /// What to do next.
    pub message: String,
}

/// The answer of `check_task_status`: one task (flattened), or a list.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct StatusAnswer {
    /// With a task_id: that task.
    #[serde(flatten)]
    pub task: Option<TaskView>,
    /// Without a task_id: the tasks that pass the filters, newest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<TaskView>>,
    /// Without a task_id: how many tasks are listed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    /// Without a task_id: the filters applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filters: Option<BTreeMap<String, String>>,
}

/// The answer of `list_tasks`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct TaskList {
    /// The tasks, newest first.
    pub tasks: Vec<TaskView>,
    /// How many are in this page.
    pub count: usize,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The answer of `get_task_result`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct ResultAnswer {
    /// The task's id.
    pub task_id: String,
    /// Its status (see check_task_status).
    pub status: String,
    /// Whether it has finished (completed, failed, timeout or cancelled).
    pub finished: bool,
    /// What the task returned, once completed. For command and code tasks: exit_code,
    /// signal, reason, duration_ms, peak_memory_bytes, output_tail, stderr_tail, session_id,
    /// isolation. A failed run of theirs (a non-zero exit, a signal, a timeout) has the same
    /// fields here, beside `error`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why it failed, when it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Percent done.
    pub progress: f64,
    /// Estimated seconds until it finishes, when unfinished and known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// What to do next.
    pub message: String,
}

/// The answer of `cancel_task`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct CancelAnswer {
    /// The task's id.
    pub task_id: String,
    /// Its status after the cancel: "cancelled", or still "running" while its process is
    /// being stopped (cancel_requested true).
    pub status: String,
    /// Whether the cancel took effect or is under way (false when it had already finished).
    pub cancelled: bool,
    /// What happened.
    pub message: String,
}

/// The answer of `read_task_output`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct OutputAnswer {
    /// The task's id.
    pub task_id: String,
    /// The output from `cursor` on (of the stream read: stdout and stderr interleaved as
    /// written, or one of them; invalid UTF-8 replaced).
    pub data: String,
    /// Where this chunk started.
    pub cursor: u64,
    /// Pass as `cursor` to read on.
    pub next_cursor: u64,
    /// The output's size so far, in bytes.
    pub size: u64,
    /// Whether all output has been read and nothing more will come: the task has finished
    /// (or, for an earlier attempt, that attempt has).
    pub complete: bool,
    /// The task's status.
    pub status: String,
    /// Whose output this is: the attempt's number (1 for the first; 0 before the task has
    /// started). Without `attempt` in the call, the latest attempt: when it grows, a new attempt
    /// has started, to be read from cursor 0.
    pub attempt: u32,
    /// Which output this is: "combined", "stdout" or "stderr" (as asked).
    pub stream: OutputStreamArg,
}

/// The answer of the `manage_*` tools and other actions: what was done, and its data.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct ActionAnswer {
    /// The action.
    pub action: String,
    /// "success", or "no_action_needed" when nothing had to change.
    pub status: ActionStatus,
    /// What happened, in words.
    pub message: String,
    /// The action's data (a task, a list, statistics...).
    #[serde(flatten)]
    pub data: Map<String, Value>,
}

/// How an action of a `manage_*` tool went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// It was done.
    Success,
    /// Nothing had to change.
    NoActionNeeded,
}

/// Queue statistics, in the shape of the background-task tools' `queue_statistics`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct QueueStatistics {
    /// Tasks waiting to start (pending and scheduled).
    pub total_queued: u64,
    /// Waiting tasks by priority name (low, normal, high, critical, or the number).
    pub by_priority: BTreeMap<String, u64>,
    /// Tasks running now.
    pub running_tasks: u64,
    /// Tasks paused.
    pub paused_tasks: u64,
    /// All tasks the store holds.
    pub total_tasks_created: u64,
    /// Completed tasks held.
    pub total_tasks_completed: u64,
    /// Failed tasks held (timeouts included).
    pub total_tasks_failed: u64,
    /// Cancelled tasks held.
    pub total_tasks_cancelled: u64,
    /// Tasks by type, then by status.
    pub by_type: BTreeMap<String, BTreeMap<String, u64>>,
    /// The most tasks running at once.
    pub max_concurrent: usize,
    /// Whether the whole queue is paused.
    pub queue_paused: bool,
    /// Task types whose queue is paused.
    pub paused_types: Vec<String>,
    /// Task types with a limit of their own on tasks running at once (`set_limits` with a
    /// task_type), and that limit.
    #[serde(default)]
    pub type_limits: BTreeMap<String, usize>,
}

/// The wire name of a core status (without the timeout distinction): the one table of the names
/// clients see (tools, the metrics' `status` label, the chaos audit), `pending` for `Queued`.
pub fn core_status_name(status: Status) -> &'static str {
    match status {
        Status::Queued => "pending",
        Status::Scheduled => "scheduled",
        Status::Paused => "paused",
        Status::Running => "running",
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
    }
}

/// The wire name of a priority.
pub fn priority_name(priority: Priority) -> String {
    match priority {
        Priority::LOW => "low".into(),
        Priority::NORMAL => "normal".into(),
        Priority::HIGH => "high".into(),
        Priority::CRITICAL => "critical".into(),
        other => other.get().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_see_pending_for_queued_and_timeout_for_a_timed_out_failure() {
        let names: Vec<_> = Status::ALL.into_iter().map(core_status_name).collect();
        assert_eq!(
            names,
            [
                "pending",
                "scheduled",
                "paused",
                "running",
                "completed",
                "failed",
                "cancelled"
            ]
        );
        assert_eq!(status_name_of(Status::Queued, None), "pending");
        assert_eq!(
            status_name_of(Status::Failed, Some(FailureKind::Timeout)),
            "timeout"
        );
        assert_eq!(
            status_name_of(Status::Failed, Some(FailureKind::Error)),
            "failed"
        );
        assert_eq!(
            status_name_of(Status::Cancelled, Some(FailureKind::Timeout)),
            "cancelled"
        );
    }
}
