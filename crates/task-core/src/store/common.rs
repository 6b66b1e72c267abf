//! What the SQLite and PostgreSQL stores share: status codes by name in SQL text, the conditions
//! both write (an attempt that still holds its task, a finished task, a filter's fields), the
//! count changes of a transaction, the health cell, and the conversions of task fields to column
//! values.
//!
//! The status codes are written into the SQL text rather than bound, so that the partial indexes
//! (`WHERE status = 0`, …) match the queries. [`sql_status!`] names them, and is checked against
//! [`Status::code`] at compile time; SQL constants build on it with `concat!`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::model::{AttemptRecord, Status, Timestamp};
use crate::store::{ListFilter, StoreHealth, StoreStatus};

/// A status's code as an SQL literal, by the status's name: `sql_status!(running)` is `"3"`.
/// Usable inside `concat!`, so that SQL constants name statuses instead of numbers.
macro_rules! sql_status {
    (queued) => {
        "0"
    };
    (scheduled) => {
        "1"
    };
    (paused) => {
        "2"
    };
    (running) => {
        "3"
    };
    (completed) => {
        "4"
    };
    (failed) => {
        "5"
    };
    (cancelled) => {
        "6"
    };
}
pub(crate) use sql_status;

/// The condition of a task that its attempt still holds (the fence of every write of a running
/// attempt): running, or *frozen*, that is paused while its attempt runs, which keeps the lease.
macro_rules! sql_held {
    () => {
        concat!(
            "(status = ",
            $crate::store::common::sql_status!(running),
            " OR (status = ",
            $crate::store::common::sql_status!(paused),
            " AND lease_until IS NOT NULL))"
        )
    };
}
pub(crate) use sql_held;

/// The condition of a task that holds a lease or held one: running or paused (a paused task
/// that never ran has no lease, so a condition on `lease_until` leaves it out).
macro_rules! sql_leased {
    () => {
        concat!(
            "status IN (",
            $crate::store::common::sql_status!(paused),
            ", ",
            $crate::store::common::sql_status!(running),
            ")"
        )
    };
}
pub(crate) use sql_leased;

/// The condition of a finished task: the terminal statuses have the highest codes. Written as
/// the partial index `tasks_finished` is, so that the index serves it.
macro_rules! sql_terminal {
    () => {
        concat!("status >= ", $crate::store::common::sql_status!(completed))
    };
}
pub(crate) use sql_terminal;

/// The code an [`sql_status!`] literal stands for.
const fn literal_code(literal: &str) -> u8 {
    let bytes = literal.as_bytes();
    assert!(bytes.len() == 1 && bytes[0].is_ascii_digit());
    bytes[0] - b'0'
}

// The literals are the model's codes, and the terminal statuses are those from `completed` up.
const _: () = {
    assert!(literal_code(sql_status!(queued)) == Status::Queued.code());
    assert!(literal_code(sql_status!(scheduled)) == Status::Scheduled.code());
    assert!(literal_code(sql_status!(paused)) == Status::Paused.code());
    assert!(literal_code(sql_status!(running)) == Status::Running.code());
    assert!(literal_code(sql_status!(completed)) == Status::Completed.code());
    assert!(literal_code(sql_status!(failed)) == Status::Failed.code());
    assert!(literal_code(sql_status!(cancelled)) == Status::Cancelled.code());
    let mut index = 0;
    while index < Status::ALL.len() {
        let status = Status::ALL[index];
        assert!(status.is_terminal() == (status.code() >= Status::Completed.code()));
        index += 1;
    }
};

/// The condition `status IN (…)` of these statuses (their codes are written in the SQL).
pub(super) fn status_in(statuses: &[Status]) -> String {
    let codes: Vec<String> = statuses.iter().map(|s| s.code().to_string()).collect();
    format!("status IN ({})", codes.join(", "))
}

/// The SQL that counts the tasks that failed by timing out, by type (columns `task_type` and
/// `count`).
pub(super) fn timed_out_sql() -> String {
    format!(
        "SELECT task_type, count(*) AS count FROM tasks WHERE status = {} AND error_kind = {} \
         GROUP BY task_type",
        Status::Failed.code(),
        crate::model::FailureKind::Timeout.code()
    )
}

/// How a store binds the values of a statement built at run time: each call adds a value and
/// returns what stands for it in the SQL (`?3`, `$3::text`).
pub(super) trait Bind {
    /// Adds a text value.
    fn text(&mut self, value: String) -> String;
    /// Adds an integer value.
    fn int(&mut self, value: i64) -> String;
}

/// The conditions of a filter's fields other than its statuses, their values bound to `bind`.
pub(super) fn field_clauses(filter: &ListFilter, bind: &mut impl Bind) -> Vec<String> {
    let mut clauses = Vec::new();
    if let Some(task_type) = &filter.task_type {
        clauses.push(format!("task_type = {}", bind.text(task_type.clone())));
    }
    if let Some(owner) = &filter.owner {
        clauses.push(format!("owner = {}", bind.text(owner.clone())));
    }
    if let Some(session) = &filter.session_id {
        clauses.push(format!("session_id = {}", bind.text(session.clone())));
    }
    if let Some(from) = filter.created_from {
        clauses.push(format!("created_at >= {}", bind.int(from.0)));
    }
    if let Some(until) = filter.created_until {
        clauses.push(format!("created_at < {}", bind.int(until.0)));
    }
    clauses
}

/// What [`crate::store::Store::delete_finished`] deletes of a filter's statuses: the terminal
/// statuses it names, all of them when it names none (a non-terminal status in the filter
/// matches nothing here). `None`: nothing can match. Otherwise the condition to add to
/// [`sql_terminal!`], if any (none when every terminal status is meant).
pub(super) fn finished_statuses(filter: &ListFilter) -> Option<Option<String>> {
    let statuses: Vec<Status> = Status::ALL
        .into_iter()
        .filter(|s| s.is_terminal())
        .filter(|s| filter.statuses.is_empty() || filter.statuses.contains(s))
        .collect();
    let terminal = Status::ALL.iter().filter(|s| s.is_terminal()).count();
    match statuses.len() {
        0 => None,
        n if n == terminal => Some(None),
        _ => Some(Some(status_in(&statuses))),
    }
}

/// A change of the counts by type and status, written with its transaction.
pub(super) struct CountChange {
    pub(super) task_type: String,
    /// The status it left; `None` for a new task.
    pub(super) from: Option<Status>,
    /// The status it reached; `None` for a deleted task.
    pub(super) to: Option<Status>,
}

/// The net change of each (type, status) count of a transaction, in (type, status code) order;
/// zero changes left out.
pub(super) fn net_counts(changes: &[CountChange]) -> BTreeMap<(&str, Status), i64> {
    let mut net: BTreeMap<(&str, Status), i64> = BTreeMap::new();
    for change in changes {
        if let Some(from) = change.from {
            *net.entry((change.task_type.as_str(), from)).or_insert(0) -= 1;
        }
        if let Some(to) = change.to {
            *net.entry((change.task_type.as_str(), to)).or_insert(0) += 1;
        }
    }
    net.retain(|_, delta| *delta != 0);
    net
}

/// A part of a store whose failures show in its health (a writer, the reader, the file...).
pub(super) trait HealthPart: Copy + PartialEq + std::fmt::Debug {
    /// Whether a problem of this part makes the store unhealthy (it needs an operator), rather
    /// than degraded (it passes by itself).
    fn unhealthy(self) -> bool;
}

/// A store's health as its threads or tasks see it (see [`crate::store::Store::health`]): the
/// problem of each part that has one, and since when it has none. It logs nothing; its callers
/// say what a problem means.
pub(super) struct HealthCell<P> {
    /// Each part's problem, with when it began (in Unix milliseconds).
    problems: Mutex<Vec<(P, String, i64)>>,
    /// When the last problem went away; `None` when there was none since the store opened.
    clear_since: Mutex<Option<Instant>>,
}

impl<P> Default for HealthCell<P> {
    fn default() -> Self {
        HealthCell {
            problems: Mutex::new(Vec::new()),
            clear_since: Mutex::new(None),
        }
    }
}

impl<P: HealthPart> HealthCell<P> {
    /// Records a problem of `part`, replacing the one it had; true when it had none (worth a log
    /// line).
    pub(super) fn failing(&self, part: P, problem: String) -> bool {
        let mut problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        match problems.iter_mut().find(|(p, _, _)| *p == part) {
            Some(entry) => {
                entry.1 = problem;
                false
            }
            None => {
                problems.push((part, problem, Timestamp::now().as_millis()));
                true
            }
        }
    }

    /// Records the one problem that says all there is to say (the store refuses every write
    /// until an operator acts): the other problems are dropped.
    pub(super) fn only(&self, part: P, problem: String) {
        let mut problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        *problems = vec![(part, problem, Timestamp::now().as_millis())];
    }

    /// Records that `part` works again; true when it had a problem (worth a log line).
    pub(super) fn working(&self, part: P) -> bool {
        let mut problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        let Some(index) = problems.iter().position(|(p, _, _)| *p == part) else {
            return false;
        };
        problems.remove(index);
        if problems.is_empty() {
            *self.clear_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        true
    }

    /// How long the store has had no problem (`Duration::MAX` when it had none since it was
    /// opened); `None` while it has one.
    pub(super) fn healthy_for(&self) -> Option<Duration> {
        let problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        if !problems.is_empty() {
            return None;
        }
        let since = *self.clear_since.lock().unwrap_or_else(|p| p.into_inner());
        Some(since.map_or(Duration::MAX, |at| at.elapsed()))
    }

    /// The health: healthy without problems; otherwise unhealthy when a part's problem makes it
    /// so, else degraded, with every problem in words and since when the oldest began.
    pub(super) fn get(&self) -> StoreHealth {
        let problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        if problems.is_empty() {
            return StoreHealth::default();
        }
        let status = if problems.iter().any(|(p, _, _)| p.unhealthy()) {
            StoreStatus::Unhealthy
        } else {
            StoreStatus::Degraded
        };
        StoreHealth {
            status,
            problem: Some(
                problems
                    .iter()
                    .map(|(_, problem, _)| problem.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            since_ms: problems.iter().map(|(_, _, since)| *since).min(),
        }
    }
}

/// A duration as milliseconds.
pub(super) fn millis(duration: Option<Duration>) -> Option<i64> {
    duration.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A JSON value as text. Serializing a `Value` cannot fail.
pub(super) fn json_text(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// A task's attempt history as JSON text, for the `attempts` column.
pub(super) fn attempts_text(attempts: &[AttemptRecord]) -> String {
    // Serializing records of numbers and names cannot fail.
    serde_json::to_string(attempts).unwrap_or_else(|_| "[]".into())
}

/// Tags as JSON text; `None` for none.
pub(super) fn tags_text(tags: &[String]) -> Option<String> {
    if tags.is_empty() {
        None
    } else {
        serde_json::to_string(tags).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conditions_read_as_they_did_with_numbers() {
        assert_eq!(
            sql_held!(),
            "(status = 3 OR (status = 2 AND lease_until IS NOT NULL))"
        );
        assert_eq!(sql_leased!(), "status IN (2, 3)");
        assert_eq!(sql_terminal!(), "status >= 4");
    }

    #[test]
    fn status_ordering_is_code_ordering() {
        // `net_counts` orders by `Status`; the PostgreSQL store writes counts in that order,
        // which must be the codes' (every node takes row locks in one order).
        let mut by_status = Status::ALL.to_vec();
        by_status.sort();
        let mut by_code = Status::ALL.to_vec();
        by_code.sort_by_key(|s| s.code());
        assert_eq!(by_status, by_code);
    }

    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Part {
        Passing,
        Other,
        Lasting,
    }

    impl HealthPart for Part {
        fn unhealthy(self) -> bool {
            self == Part::Lasting
        }
    }

    #[test]
    fn the_health_cell_keeps_a_problem_per_part() {
        let cell = HealthCell::<Part>::default();
        assert_eq!(cell.get(), StoreHealth::default());
        assert_eq!(cell.healthy_for(), Some(Duration::MAX));
        assert!(cell.failing(Part::Passing, "one".into()));
        assert!(!cell.failing(Part::Passing, "two".into()));
        assert!(cell.failing(Part::Other, "three".into()));
        let health = cell.get();
        assert_eq!(health.status, StoreStatus::Degraded);
        assert_eq!(health.problem.as_deref(), Some("two; three"));
        assert!(health.since_ms.is_some());
        assert_eq!(cell.healthy_for(), None);
        assert!(cell.working(Part::Passing));
        assert!(!cell.working(Part::Passing));
        assert!(cell.working(Part::Other));
        assert!(
            cell.healthy_for()
                .is_some_and(|d| d < Duration::from_secs(60))
        );
        cell.failing(Part::Other, "four".into());
        cell.only(Part::Lasting, "gone".into());
        let health = cell.get();
        assert_eq!(health.status, StoreStatus::Unhealthy);
        assert_eq!(health.problem.as_deref(), Some("gone"));
    }

    #[test]
    fn finished_statuses_of_a_filter() {
        let mut filter = ListFilter::default();
        assert_eq!(finished_statuses(&filter), Some(None));
        filter.statuses = vec![Status::Failed, Status::Running];
        assert_eq!(
            finished_statuses(&filter),
            Some(Some("status IN (5)".into()))
        );
        filter.statuses = vec![Status::Queued];
        assert_eq!(finished_statuses(&filter), None);
    }
}
