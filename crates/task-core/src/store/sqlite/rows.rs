//! How tasks are written to and read from SQLite rows: the column list, and the conversions
//! between the task model and column values.

use std::time::Duration;

use rusqlite::Row;

use crate::model::{
    FailureKind, Priority, RetryPolicy, Status, Task, TaskError, TaskId, Timestamp,
};

/// The columns of a task, in the order [`task_from_row`] reads them.
pub(super) const COLUMNS: &str = "id, task_type, params, priority, status, attempt, max_attempts, \
    retry_base_ms, retry_max_ms, timeout_ms, run_at, idempotency_key, owner, session_id, \
    progress, progress_message, result, error_kind, error_message, created_at, started_at, \
    updated_at, finished_at, tags, lease_until, cancel_requested, interrupted_attempts, \
    rerun_on_recovery, attempts";

/// The index of `seq` in a row that has it after [`COLUMNS`].
pub(super) const SEQ: usize = 29;

pub(super) fn task_from_row(row: &Row<'_>) -> rusqlite::Result<Task> {
    fn bad(index: usize, message: String) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Integer,
            message.into(),
        )
    }
    let id: [u8; 16] = row.get(0)?;
    let params: String = row.get(2)?;
    let priority: u8 = row.get(3)?;
    let status: u8 = row.get(4)?;
    let result: Option<String> = row.get(16)?;
    let error_kind: Option<u8> = row.get(17)?;
    let tags: Option<String> = row.get(23)?;
    let error = match error_kind {
        Some(code) => Some(TaskError {
            kind: FailureKind::from_code(code)
                .ok_or_else(|| bad(17, format!("failure kind {code}")))?,
            message: row.get::<_, Option<String>>(18)?.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(Task {
        id: TaskId::from_bytes(id),
        task_type: row.get(1)?,
        params: serde_json::from_str(&params).map_err(|e| bad(2, e.to_string()))?,
        priority: Priority::new(priority).ok_or_else(|| bad(3, format!("priority {priority}")))?,
        status: Status::from_code(status).ok_or_else(|| bad(4, format!("status {status}")))?,
        attempt: row.get(5)?,
        max_attempts: row.get(6)?,
        retry: RetryPolicy {
            base_delay_ms: row.get::<_, i64>(7)?.max(0) as u64,
            max_delay_ms: row.get::<_, i64>(8)?.max(0) as u64,
        },
        timeout: row
            .get::<_, Option<i64>>(9)?
            .map(|ms| Duration::from_millis(ms.max(0) as u64)),
        run_at: row.get::<_, Option<i64>>(10)?.map(Timestamp),
        idempotency_key: row.get(11)?,
        owner: row.get(12)?,
        session_id: row.get(13)?,
        progress: row.get(14)?,
        progress_message: row.get(15)?,
        result: match result {
            Some(text) => Some(serde_json::from_str(&text).map_err(|e| bad(16, e.to_string()))?),
            None => None,
        },
        error,
        created_at: Timestamp(row.get(19)?),
        started_at: row.get::<_, Option<i64>>(20)?.map(Timestamp),
        updated_at: Timestamp(row.get(21)?),
        finished_at: row.get::<_, Option<i64>>(22)?.map(Timestamp),
        tags: match tags {
            Some(text) => serde_json::from_str(&text).map_err(|e| bad(23, e.to_string()))?,
            None => Vec::new(),
        },
        lease_until: row.get::<_, Option<i64>>(24)?.map(Timestamp),
        cancel_requested: row.get(25)?,
        interrupted_attempts: row.get(26)?,
        rerun_on_recovery: row.get(27)?,
        attempts: serde_json::from_str(&row.get::<_, String>(28)?)
            .map_err(|e| bad(28, e.to_string()))?,
    })
}
