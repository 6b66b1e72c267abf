//! How tasks are written to and read from SQLite rows: the column list, and the conversions
//! between the task model and column values.
//!
//! Columns are read by name. The task's columns are declared once ([`task_columns!`]), as the
//! select list and as names that [`col!`] turns into positions at compile time (a name that is
//! not a column does not compile): rusqlite looks a name up by comparing it with every column's
//! name, on every row, and a claim reads all of them.

use std::time::Duration;

use rusqlite::Row;

use crate::model::{
    FailureKind, Priority, RetryPolicy, Status, Task, TaskError, TaskId, Timestamp,
};

/// Declares the columns of a task, in the order they are selected: [`COLUMNS`] and [`NAMES`].
macro_rules! task_columns {
    ($first:ident $(, $rest:ident)* $(,)?) => {
        /// The columns of a task, as a select list.
        pub(super) const COLUMNS: &str = concat!(stringify!($first) $(, ", ", stringify!($rest))*);
        /// The names of [`COLUMNS`], in their order.
        const NAMES: &[&str] = &[stringify!($first) $(, stringify!($rest))*];
    };
}

task_columns!(
    id,
    task_type,
    params,
    priority,
    status,
    attempt,
    max_attempts,
    retry_base_ms,
    retry_max_ms,
    timeout_ms,
    run_at,
    idempotency_key,
    owner,
    session_id,
    progress,
    progress_message,
    result,
    error_kind,
    error_message,
    created_at,
    started_at,
    updated_at,
    finished_at,
    tags,
    lease_until,
    cancel_requested,
    interrupted_attempts,
    rerun_on_recovery,
    attempts,
    fresh_session,
);

/// The position of `seq` in a select list `{COLUMNS}, seq`. The claim and list paths read it
/// by position: a read by name compares every column's name on every row (rusqlite), which
/// doubled the time of a listed page (`sqlite_1m_list_page_ms`, 0.10 → 0.20 ms).
pub(super) const SEQ_AFTER_COLUMNS: usize = NAMES.len();

/// The position of the column `name` in [`COLUMNS`]; fails to compile when used in a constant
/// (as [`col!`] does) with a name that is not there.
const fn position(name: &str) -> usize {
    let mut index = 0;
    while index < NAMES.len() {
        let candidate = NAMES[index].as_bytes();
        let wanted = name.as_bytes();
        if candidate.len() == wanted.len() {
            let mut at = 0;
            while at < wanted.len() && candidate[at] == wanted[at] {
                at += 1;
            }
            if at == wanted.len() {
                return index;
            }
        }
        index += 1;
    }
    panic!("not a column of COLUMNS")
}

/// The position of a task column, by its name, found at compile time.
macro_rules! col {
    ($name:ident) => {
        const { position(stringify!($name)) }
    };
}

/// A task from a row whose first columns are [`COLUMNS`].
pub(super) fn task_from_row(row: &Row<'_>) -> rusqlite::Result<Task> {
    fn bad(index: usize, message: String) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Integer,
            message.into(),
        )
    }
    let id: [u8; 16] = row.get(col!(id))?;
    let params: String = row.get(col!(params))?;
    let priority: u8 = row.get(col!(priority))?;
    let status: u8 = row.get(col!(status))?;
    let result: Option<String> = row.get(col!(result))?;
    let error_kind: Option<u8> = row.get(col!(error_kind))?;
    let tags: Option<String> = row.get(col!(tags))?;
    let error = match error_kind {
        Some(code) => Some(TaskError {
            kind: FailureKind::from_code(code)
                .ok_or_else(|| bad(col!(error_kind), format!("failure kind {code}")))?,
            message: row
                .get::<_, Option<String>>(col!(error_message))?
                .unwrap_or_default(),
        }),
        None => None,
    };
    Ok(Task {
        id: TaskId::from_bytes(id),
        task_type: row.get(col!(task_type))?,
        params: serde_json::from_str(&params).map_err(|e| bad(col!(params), e.to_string()))?,
        priority: Priority::new(priority)
            .ok_or_else(|| bad(col!(priority), format!("priority {priority}")))?,
        status: Status::from_code(status)
            .ok_or_else(|| bad(col!(status), format!("status {status}")))?,
        attempt: row.get(col!(attempt))?,
        max_attempts: row.get(col!(max_attempts))?,
        retry: RetryPolicy {
            base_delay_ms: row.get::<_, i64>(col!(retry_base_ms))?.max(0) as u64,
            max_delay_ms: row.get::<_, i64>(col!(retry_max_ms))?.max(0) as u64,
        },
        timeout: row
            .get::<_, Option<i64>>(col!(timeout_ms))?
            .map(|ms| Duration::from_millis(ms.max(0) as u64)),
        run_at: row.get::<_, Option<i64>>(col!(run_at))?.map(Timestamp),
        idempotency_key: row.get(col!(idempotency_key))?,
        owner: row.get(col!(owner))?,
        session_id: row.get(col!(session_id))?,
        fresh_session: row.get(col!(fresh_session))?,
        progress: row.get(col!(progress))?,
        progress_message: row.get(col!(progress_message))?,
        result: match result {
            Some(text) => {
                Some(serde_json::from_str(&text).map_err(|e| bad(col!(result), e.to_string()))?)
            }
            None => None,
        },
        error,
        created_at: Timestamp(row.get(col!(created_at))?),
        started_at: row.get::<_, Option<i64>>(col!(started_at))?.map(Timestamp),
        updated_at: Timestamp(row.get(col!(updated_at))?),
        finished_at: row.get::<_, Option<i64>>(col!(finished_at))?.map(Timestamp),
        tags: match tags {
            Some(text) => {
                serde_json::from_str(&text).map_err(|e| bad(col!(tags), e.to_string()))?
            }
            None => Vec::new(),
        },
        lease_until: row.get::<_, Option<i64>>(col!(lease_until))?.map(Timestamp),
        cancel_requested: row.get(col!(cancel_requested))?,
        interrupted_attempts: row.get(col!(interrupted_attempts))?,
        rerun_on_recovery: row.get(col!(rerun_on_recovery))?,
        attempts: serde_json::from_str(&row.get::<_, String>(col!(attempts))?)
            .map_err(|e| bad(col!(attempts), e.to_string()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_listed_once_and_found_by_name() {
        assert_eq!(COLUMNS.split(", ").collect::<Vec<_>>(), NAMES);
        assert_eq!(col!(id), 0);
        assert_eq!(col!(fresh_session), NAMES.len() - 1);
        assert_eq!(NAMES[col!(lease_until)], "lease_until");
    }
}
