//! What the run knows about each task: accepted or not, its id, every status observed through
//! the tools, and the violations those observations show.
//!
//! The observations are checked as they come: a task seen in a final status must never be seen
//! unfinished again by a request sent after that answer arrived (whatever the thread, and
//! across kills), nor in another final status or with another completion time (a completion
//! recorded twice would show as one of those).

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use serde_json::Value;

use crate::workload::Kind;

/// The final statuses of the wire.
pub(crate) fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "timeout" | "cancelled")
}

/// A final status as first observed.
#[derive(Clone, Debug)]
pub(crate) struct Terminal {
    /// The status.
    pub(crate) status: String,
    /// Its `completed_at`.
    pub(crate) completed_at: Option<String>,
    /// Its attempt number.
    pub(crate) attempt: u64,
    /// When the answer that showed it arrived.
    pub(crate) seen: Instant,
}

/// One task of the run.
#[derive(Clone, Debug)]
pub(crate) struct TaskRec {
    /// What it is.
    pub(crate) kind: Kind,
    /// Its idempotency key.
    pub(crate) key: String,
    /// Its id, once msbd answered the submission.
    pub(crate) id: Option<String>,
    /// How many submissions of it were answered (more than one after a lost answer).
    pub(crate) answers: u32,
    /// Its final status, once seen.
    pub(crate) terminal: Option<Terminal>,
    /// A cancel was answered with `cancelled: true`.
    pub(crate) cancel_acked: bool,
    /// The cancel was answered at all.
    pub(crate) cancel_answered: bool,
}

/// The run's knowledge, shared by its threads.
pub(crate) struct Tracker {
    inner: Mutex<Inner>,
}

/// See [`Tracker`].
pub(crate) struct Inner {
    /// Every task planned, by index.
    pub(crate) tasks: Vec<TaskRec>,
    /// Index by id.
    pub(crate) by_id: HashMap<String, usize>,
    /// How many are accepted.
    pub(crate) accepted: usize,
    /// How many are accepted and seen final.
    pub(crate) terminal: usize,
    /// What went wrong, as messages.
    pub(crate) violations: Vec<String>,
    /// Tasks whose submission was answered more than once (idempotent retries after a lost
    /// answer): how many of those answers said `deduplicated`.
    pub(crate) deduplicated_answers: usize,
    /// Submissions answered with `deduplicated: false` after a lost answer: the first try never
    /// reached the store.
    pub(crate) resubmitted_fresh: usize,
    /// Completion recorded twice (a final status or time that changed).
    pub(crate) duplicated: usize,
}

impl Tracker {
    /// A tracker for a run whose tasks are `plans` (kind and key of each).
    pub(crate) fn new(plans: Vec<(Kind, String)>) -> Tracker {
        let tasks = plans
            .into_iter()
            .map(|(kind, key)| TaskRec {
                kind,
                key,
                id: None,
                answers: 0,
                terminal: None,
                cancel_acked: false,
                cancel_answered: false,
            })
            .collect();
        Tracker {
            inner: Mutex::new(Inner {
                tasks,
                by_id: HashMap::new(),
                accepted: 0,
                terminal: 0,
                violations: Vec::new(),
                deduplicated_answers: 0,
                resubmitted_fresh: 0,
                duplicated: 0,
            }),
        }
    }

    /// The lock on everything.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("tracker lock")
    }

    /// Records a violation.
    pub(crate) fn violation(&self, message: String) {
        eprintln!("chaos: VIOLATION: {message}");
        self.lock().violations.push(message);
    }

    /// How many tasks are accepted and not seen final yet.
    pub(crate) fn open(&self) -> usize {
        let inner = self.lock();
        inner.accepted - inner.terminal
    }

    /// Records the answer to a submission of task `index`; `retried` says whether an earlier
    /// submission of it got no answer.
    pub(crate) fn accepted(
        &self,
        index: usize,
        answer: &Value,
        retried: bool,
        sent: Instant,
        received: Instant,
    ) {
        let Some(id) = answer["task_id"].as_str() else {
            self.violation(format!(
                "task {index}: a submission answered without a task_id: {answer}"
            ));
            return;
        };
        let deduplicated = answer["deduplicated"].as_bool().unwrap_or(false);
        // `manage_background_tasks(create)` names the task's status `task_status`.
        let status = answer["status"]
            .as_str()
            .filter(|s| *s != "success")
            .or_else(|| answer["task_status"].as_str())
            .unwrap_or("")
            .to_owned();
        let mut inner = self.lock();
        let inner = &mut *inner;
        let task = &mut inner.tasks[index];
        task.answers += 1;
        match &task.id {
            Some(known) if known != id => {
                let message = format!(
                    "task {index} (key {}): a second submission with the same idempotency key created another task: {known} then {id}",
                    task.key
                );
                inner.duplicated += 1;
                inner.violations.push(message);
                return;
            }
            Some(_) => {}
            None => {
                task.id = Some(id.to_owned());
                inner.by_id.insert(id.to_owned(), index);
                inner.accepted += 1;
            }
        }
        if retried {
            if deduplicated {
                inner.deduplicated_answers += 1;
            } else {
                inner.resubmitted_fresh += 1;
            }
        }
        observe_locked(inner, index, &status, None, 0, sent, received);
    }

    /// Records a task view (`check_task_status`, `list_tasks`): `sent` is when the request left,
    /// `received` when its answer came.
    pub(crate) fn observe(&self, view: &Value, sent: Instant, received: Instant) {
        let Some(id) = view["task_id"].as_str() else {
            return;
        };
        let mut inner = self.lock();
        let Some(&index) = inner.by_id.get(id) else {
            return;
        };
        let status = view["status"].as_str().unwrap_or("");
        let completed_at = view["completed_at"].as_str();
        let attempt = view["attempt"].as_u64().unwrap_or(0);
        observe_locked(
            &mut inner,
            index,
            status,
            completed_at,
            attempt,
            sent,
            received,
        );
    }

    /// Records the answer to a cancel.
    pub(crate) fn cancel_answered(&self, index: usize, cancelled: bool) {
        let mut inner = self.lock();
        let task = &mut inner.tasks[index];
        task.cancel_answered = true;
        task.cancel_acked |= cancelled;
    }

    /// The ids of the accepted tasks not seen final yet.
    pub(crate) fn open_ids(&self) -> Vec<String> {
        self.lock()
            .tasks
            .iter()
            .filter(|t| t.terminal.is_none())
            .filter_map(|t| t.id.clone())
            .collect()
    }
}

/// Checks and records one observation of task `index`.
fn observe_locked(
    inner: &mut Inner,
    index: usize,
    status: &str,
    completed_at: Option<&str>,
    attempt: u64,
    sent: Instant,
    received: Instant,
) {
    let task = &mut inner.tasks[index];
    let id = task.id.clone().unwrap_or_default();
    match (&task.terminal, is_terminal(status)) {
        (None, true) => {
            task.terminal = Some(Terminal {
                status: status.to_owned(),
                completed_at: completed_at.map(str::to_owned),
                attempt,
                seen: received,
            });
            inner.terminal += 1;
        }
        (None, false) => {}
        (Some(first), false) => {
            if sent > first.seen {
                inner.violations.push(format!(
                    "task {id} (#{index}): seen {} (attempt {}), then {status} again (attempt {attempt}) by a request sent {:?} later",
                    first.status,
                    first.attempt,
                    sent - first.seen
                ));
            }
        }
        (Some(first), true) => {
            // Submission answers carry no completion time or attempt.
            let times_differ =
                matches!((&first.completed_at, completed_at), (Some(a), Some(b)) if a != b);
            let attempts_differ = attempt != 0 && first.attempt != 0 && attempt != first.attempt;
            if first.status != status || times_differ || attempts_differ {
                inner.duplicated += 1;
                inner.violations.push(format!(
                    "task {id} (#{index}): its final status changed: {} at {:?} (attempt {}), later {status} at {completed_at:?} (attempt {attempt})",
                    first.status, first.completed_at, first.attempt
                ));
            } else if first.completed_at.is_none() && completed_at.is_some() {
                let first = task.terminal.as_mut().expect("terminal");
                first.completed_at = completed_at.map(str::to_owned);
                first.attempt = attempt;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::Tracker;
    use crate::workload::Kind;

    #[test]
    fn a_final_status_that_reverts_or_changes_is_a_violation() {
        let tracker = Tracker::new(vec![(Kind::Noop, "a".into()), (Kind::Noop, "b".into())]);
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);
        tracker.accepted(
            0,
            &json!({"task_id": "x", "status": "pending"}),
            false,
            t0,
            later(1),
        );
        tracker.accepted(
            1,
            &json!({"task_id": "y", "status": "pending"}),
            false,
            t0,
            later(1),
        );
        assert_eq!(tracker.open(), 2);
        let done =
            json!({"task_id": "x", "status": "completed", "completed_at": "T1", "attempt": 1});
        tracker.observe(&done, later(2), later(3));
        assert_eq!(tracker.open(), 1);
        // A request sent before the final answer arrived may still see it running.
        tracker.observe(
            &json!({"task_id": "x", "status": "running", "attempt": 1}),
            later(2),
            later(4),
        );
        assert!(tracker.lock().violations.is_empty());
        // One sent after may not.
        tracker.observe(
            &json!({"task_id": "x", "status": "pending", "attempt": 1}),
            later(5),
            later(6),
        );
        assert_eq!(tracker.lock().violations.len(), 1);
        tracker.observe(
            &json!({"task_id": "x", "status": "completed", "completed_at": "T2", "attempt": 2}),
            later(7),
            later(8),
        );
        assert_eq!(tracker.lock().duplicated, 1);
        // The same key answered with another id is a duplicate too.
        tracker.accepted(
            1,
            &json!({"task_id": "z", "status": "pending", "deduplicated": false}),
            true,
            later(9),
            later(10),
        );
        assert_eq!(tracker.lock().duplicated, 2);
    }
}
