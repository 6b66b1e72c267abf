//! How tasks are written to and read from PostgreSQL rows: the column list, and the conversions
//! between the task model and column values. Columns are read by name.

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::Row;

use crate::error::{Error, Result};
use crate::model::{
    FailureKind, Priority, RetryPolicy, Status, Task, TaskError, TaskId, Timestamp,
};

/// The columns of a task, read by [`task_from_row`]; `seq` follows them in the queries that need
/// it (read by [`seq_of`]).
pub(super) const COLUMNS: &str = "id, task_type, params, priority, status, attempt, max_attempts, \
    retry_base_ms, retry_max_ms, timeout_ms, run_at, idempotency_key, owner, session_id, \
    progress, progress_message, result, error_kind, error_message, created_at, started_at, \
    updated_at, finished_at, tags, lease_until, cancel_requested, interrupted_attempts, \
    rerun_on_recovery, attempts::text AS attempts, fresh_session";

/// Every stored column of a task row, the same in `tasks` and `tasks_done`: what moves a
/// finished task from one to the other names them all.
pub(super) const STORED: &str = "seq, id, task_type, params, priority, status, attempt, \
    max_attempts, retry_base_ms, retry_max_ms, timeout_ms, run_at, idempotency_key, owner, \
    session_id, progress, progress_message, result, error_kind, error_message, created_at, \
    started_at, updated_at, finished_at, tags, lease_until, cancel_requested, home_node, \
    claimed_by, interrupted_attempts, rerun_on_recovery, attempts, fresh_session";

/// A task's id as the `uuid` column holds it.
pub(super) fn uuid(id: TaskId) -> uuid::Uuid {
    uuid::Uuid::from_bytes(*id.as_bytes())
}

/// A status as the `status` column holds it.
pub(super) fn code(status: Status) -> i16 {
    i16::from(status.code())
}

/// A status from the `status` column.
pub(super) fn status(code: i16) -> Result<Status> {
    u8::try_from(code)
        .ok()
        .and_then(Status::from_code)
        .ok_or_else(|| Error::store("reading a task", format!("unknown status code {code}")))
}

/// A count or a duration in milliseconds, as a `bigint`.
pub(super) fn big(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Reads one column of a task's row by its name, naming it in the error.
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, name: &str) -> Result<T> {
    column_of(row, name, "reading a task")
}

/// Reads one column by its name; an error names the column and what was being done.
pub(super) fn column_of<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    name: &str,
    action: &'static str,
) -> Result<T> {
    row.try_get(name)
        .map_err(|e| Error::store(action, format!("column {name}: {e}")))
}

fn bad(what: &str, value: impl std::fmt::Display) -> Error {
    Error::store("reading a task", format!("{what} {value} is out of range"))
}

/// A task from a row whose first columns are [`COLUMNS`].
pub(super) fn task_from_row(row: &Row) -> Result<Task> {
    let id: uuid::Uuid = column(row, "id")?;
    let params: String = column(row, "params")?;
    let priority: i16 = column(row, "priority")?;
    let attempt: i64 = column(row, "attempt")?;
    let max_attempts: i64 = column(row, "max_attempts")?;
    let interrupted: i64 = column(row, "interrupted_attempts")?;
    let result: Option<String> = column(row, "result")?;
    let error_kind: Option<i16> = column(row, "error_kind")?;
    let tags: Option<String> = column(row, "tags")?;
    let error = match error_kind {
        Some(code) => Some(TaskError {
            kind: u8::try_from(code)
                .ok()
                .and_then(FailureKind::from_code)
                .ok_or_else(|| bad("the failure kind", code))?,
            message: column::<Option<String>>(row, "error_message")?.unwrap_or_default(),
        }),
        None => None,
    };
    let json = |text: &str| {
        serde_json::from_str::<Value>(text).map_err(|e| Error::store("reading a task", e))
    };
    Ok(Task {
        id: TaskId::from_bytes(*id.as_bytes()),
        task_type: column(row, "task_type")?,
        params: json(&params)?,
        priority: u8::try_from(priority)
            .ok()
            .and_then(Priority::new)
            .ok_or_else(|| bad("the priority", priority))?,
        status: status(column(row, "status")?)?,
        attempt: u32::try_from(attempt).map_err(|_| bad("the attempt", attempt))?,
        max_attempts: u32::try_from(max_attempts).map_err(|_| bad("max_attempts", max_attempts))?,
        retry: RetryPolicy {
            base_delay_ms: column::<i64>(row, "retry_base_ms")?.max(0) as u64,
            max_delay_ms: column::<i64>(row, "retry_max_ms")?.max(0) as u64,
        },
        timeout: column::<Option<i64>>(row, "timeout_ms")?
            .map(|ms| Duration::from_millis(ms.max(0) as u64)),
        run_at: column::<Option<i64>>(row, "run_at")?.map(Timestamp),
        idempotency_key: column(row, "idempotency_key")?,
        owner: column(row, "owner")?,
        session_id: column(row, "session_id")?,
        fresh_session: column(row, "fresh_session")?,
        progress: column(row, "progress")?,
        progress_message: column(row, "progress_message")?,
        result: result.as_deref().map(json).transpose()?,
        error,
        created_at: Timestamp(column(row, "created_at")?),
        started_at: column::<Option<i64>>(row, "started_at")?.map(Timestamp),
        updated_at: Timestamp(column(row, "updated_at")?),
        finished_at: column::<Option<i64>>(row, "finished_at")?.map(Timestamp),
        tags: match tags {
            Some(text) => {
                serde_json::from_str(&text).map_err(|e| Error::store("reading a task", e))?
            }
            None => Vec::new(),
        },
        lease_until: column::<Option<i64>>(row, "lease_until")?.map(Timestamp),
        cancel_requested: column(row, "cancel_requested")?,
        interrupted_attempts: u32::try_from(interrupted)
            .map_err(|_| bad("interrupted_attempts", interrupted))?,
        rerun_on_recovery: column(row, "rerun_on_recovery")?,
        attempts: serde_json::from_str(&column::<String>(row, "attempts")?)
            .map_err(|e| Error::store("reading a task", e))?,
    })
}

/// The `seq` of a row that has it.
pub(super) fn seq_of(row: &Row) -> Result<i64> {
    column(row, "seq")
}
