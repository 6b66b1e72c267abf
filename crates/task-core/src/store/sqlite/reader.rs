//! The reads: a reader thread with a connection of its own (gets, listings, counts), and the
//! counts by type and status read once when the store opens.

use std::collections::BTreeMap;
use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::model::{Status, Task, TaskId};
use crate::store::{Cursor, ListFilter, Page, PageRequest, Stats};

use crate::store::common::{Bind, field_clauses, status_in, timed_out_sql};

use super::rows::{COLUMNS, SEQ_AFTER_COLUMNS, task_from_row};
use super::writer::Reply;

pub(super) enum ReadOp {
    Get(TaskId, Reply<Option<Task>>),
    List(ListFilter, PageRequest, Reply<Page>),
    TimedOut(Reply<BTreeMap<String, u64>>),
}

pub(super) fn load_stats(conn: &Connection) -> Result<Stats> {
    let mut stats = Stats::empty();
    let mut statement = conn
        .prepare("SELECT task_type, status, count FROM task_counts")
        .map_err(|e| Error::store("counting tasks", e))?;
    let rows = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, String>("task_type")?,
                row.get::<_, u8>("status")?,
                row.get::<_, i64>("count")?,
            ))
        })
        .map_err(|e| Error::store("counting tasks", e))?;
    for row in rows {
        let (task_type, code, count) = row.map_err(|e| Error::store("counting tasks", e))?;
        let status = Status::from_code(code)
            .ok_or_else(|| Error::store("counting tasks", format!("unknown status code {code}")))?;
        stats.add(&task_type, status, count);
    }
    Ok(stats)
}

/// One task by id.
pub(super) fn get_task(conn: &Connection, id: TaskId) -> Result<Option<Task>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"))
        .and_then(|mut s| s.query_row([&id.as_bytes()[..]], task_from_row).optional())
        .map_err(|e| Error::store("reading a task", e))
}

pub(super) fn run_reader(conn: Connection, requests: mpsc::Receiver<ReadOp>) {
    while let Ok(op) = requests.recv() {
        match op {
            ReadOp::Get(id, reply) => {
                let _ = reply.send(get_task(&conn, id));
            }
            ReadOp::List(filter, page, reply) => {
                let _ = reply.send(list(&conn, &filter, &page));
            }
            ReadOp::TimedOut(reply) => {
                let _ = reply.send(timed_out(&conn));
            }
        }
    }
}

/// Binds as `?n`, numbered in the order the values are added.
impl Bind for Vec<rusqlite::types::Value> {
    fn text(&mut self, value: String) -> String {
        self.push(value.into());
        format!("?{}", self.len())
    }

    fn int(&mut self, value: i64) -> String {
        self.push(value.into());
        format!("?{}", self.len())
    }
}

pub(super) fn timed_out(conn: &Connection) -> Result<BTreeMap<String, u64>> {
    let counting = |e| Error::store("counting timed-out tasks", e);
    let mut statement = conn.prepare_cached(&timed_out_sql()).map_err(counting)?;
    let rows = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, String>("task_type")?,
                row.get::<_, i64>("count")?,
            ))
        })
        .map_err(counting)?;
    let mut counts = BTreeMap::new();
    for row in rows {
        let (task_type, count) = row.map_err(counting)?;
        counts.insert(task_type, u64::try_from(count).unwrap_or(0));
    }
    Ok(counts)
}

pub(super) fn list(conn: &Connection, filter: &ListFilter, page: &PageRequest) -> Result<Page> {
    let limit = page.clamped_limit();
    let mut clauses = vec!["seq < ?1".to_owned()];
    let mut values: Vec<rusqlite::types::Value> = vec![rusqlite::types::Value::Integer(
        page.cursor
            .map_or(i64::MAX, |c| c.0.min(i64::MAX as u64) as i64),
    )];
    if !filter.statuses.is_empty() {
        clauses.push(status_in(&filter.statuses));
    }
    clauses.extend(field_clauses(filter, &mut values));
    let sql = format!(
        "SELECT {COLUMNS}, seq FROM tasks WHERE {} ORDER BY seq DESC LIMIT {}",
        clauses.join(" AND "),
        limit + 1
    );
    let mut rows: Vec<(i64, Task)> = conn
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_map(rusqlite::params_from_iter(values.iter()), |row| {
                Ok((row.get(SEQ_AFTER_COLUMNS)?, task_from_row(row)?))
            })?
            .collect()
        })
        .map_err(|e| Error::store("listing tasks", e))?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|(seq, _)| Cursor(*seq as u64))
    } else {
        None
    };
    Ok(Page {
        tasks: rows.into_iter().map(|(_, task)| task).collect(),
        next_cursor,
    })
}
