//! The state machine: the one place where a task's moves between statuses are decided.
//!
//! Stores and the engine never set a status by hand; they ask [`decide`] what an event does to a
//! status, and an event that a status does not allow is an [`IllegalTransition`].

use std::fmt;

use crate::model::Status;

/// Something that happens to a task.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    /// A scheduled task's `run_at` has come.
    Promote,
    /// A worker claims a queued task and starts an attempt.
    Claim,
    /// The running attempt returned a result.
    Complete,
    /// The running attempt failed (an error or a timeout). `retry`: attempts remain and the
    /// failure may be retried, so the task waits for its backoff.
    Fail {
        /// Whether another attempt follows.
        retry: bool,
    },
    /// The running attempt ended without a verdict: its worker was lost or it was interrupted
    /// by a shutdown. `retry`: the task goes back to the queue.
    Abandon {
        /// Whether another attempt follows.
        retry: bool,
    },
    /// A worker gives back an attempt it claimed but never started (a task claimed ahead of
    /// its workers, given back at a shutdown, a pause, or because it waited too long): the
    /// task goes back to the queue as if it had not been claimed.
    Release,
    /// Someone cancels the task.
    Cancel,
    /// Someone pauses the task: held before it starts, or frozen while it runs.
    Pause,
    /// Someone resumes a paused task. `frozen`: it was paused while running (it goes back to
    /// running); `due`: it has no `run_at` ahead (it goes to the queue, else it is scheduled).
    Resume {
        /// Whether it was paused while running.
        frozen: bool,
        /// Whether it may run now.
        due: bool,
    },
    /// Someone changes the priority of a task that has not started (queued, scheduled, or paused
    /// before it started). The status stays as it is. `frozen`: the task is paused while its
    /// attempt runs (only a paused task can be), so it has started and keeps its priority.
    Reprioritize {
        /// Whether it was paused while running.
        frozen: bool,
    },
}

impl Event {
    /// The verb a person would use for the event, for messages.
    pub const fn verb(self) -> &'static str {
        match self {
            Event::Promote => "promote",
            Event::Claim => "start",
            Event::Complete => "complete",
            Event::Fail { .. } => "fail",
            Event::Abandon { .. } => "recover",
            Event::Release => "give back",
            Event::Cancel => "cancel",
            Event::Pause => "pause",
            Event::Resume { .. } => "resume",
            Event::Reprioritize { .. } => "reprioritize",
        }
    }
}

/// An event that the task's status does not allow.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub struct IllegalTransition {
    /// The status the task was in.
    pub from: Status,
    /// What was attempted.
    pub event: Event,
}

impl fmt::Display for IllegalTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verb = self.event.verb();
        let from = self.from;
        write!(f, "cannot {verb} a task that is {from}")?;
        let advice = match (self.from, self.event) {
            (from, Event::Reprioritize { .. }) if from.is_terminal() => {
                ": it has already finished; only waiting tasks (queued, scheduled, or paused before they started) can be reprioritized; submit a new task to run it again at another priority"
            }
            (Status::Paused, Event::Reprioritize { frozen: true }) => {
                ": it was paused while running, so it has already started; only waiting tasks (queued, scheduled, or paused before they started) can be reprioritized"
            }
            (_, Event::Reprioritize { .. }) => {
                ": it has already started; only waiting tasks (queued, scheduled, or paused before they started) can be reprioritized"
            }
            (from, _) if from.is_terminal() => {
                ": it has already finished and its status is final; submit a new task to run it again"
            }
            (Status::Running, Event::Resume { .. }) => ": it is already running",
            (Status::Paused, Event::Pause) => ": it is already paused",
            (Status::Queued | Status::Scheduled, Event::Resume { .. }) => ": it is not paused",
            (_, Event::Complete | Event::Fail { .. } | Event::Abandon { .. } | Event::Release) => {
                ": only a running attempt can end"
            }
            _ => "",
        };
        f.write_str(advice)
    }
}

/// What `event` does to a task in status `from`: the status it moves to, or why it may not.
pub fn decide(from: Status, event: Event) -> Result<Status, IllegalTransition> {
    use Status::*;
    let to = match (from, event) {
        (Scheduled, Event::Promote) => Queued,
        (Queued, Event::Claim) => Running,
        (Running, Event::Complete) => Completed,
        (Running, Event::Fail { retry: true }) => Scheduled,
        (Running, Event::Fail { retry: false }) => Failed,
        (Running, Event::Abandon { retry: true }) => Queued,
        (Running, Event::Abandon { retry: false }) => Failed,
        (Running, Event::Release) => Queued,
        (Queued | Scheduled | Paused | Running, Event::Cancel) => Cancelled,
        (Queued | Scheduled | Running, Event::Pause) => Paused,
        (Paused, Event::Resume { frozen: true, .. }) => Running,
        (
            Paused,
            Event::Resume {
                frozen: false,
                due: true,
            },
        ) => Queued,
        (
            Paused,
            Event::Resume {
                frozen: false,
                due: false,
            },
        ) => Scheduled,
        // A priority changes only while the task waits; its status stays.
        (Queued | Scheduled, Event::Reprioritize { .. })
        | (Paused, Event::Reprioritize { frozen: false }) => from,
        _ => return Err(IllegalTransition { from, event }),
    };
    Ok(to)
}

/// Every event, with each flag set both ways: for exhaustive tests and for callers that want to
/// know which events a status allows.
pub const ALL_EVENTS: [Event; 16] = [
    Event::Promote,
    Event::Claim,
    Event::Complete,
    Event::Fail { retry: true },
    Event::Fail { retry: false },
    Event::Abandon { retry: true },
    Event::Abandon { retry: false },
    Event::Release,
    Event::Cancel,
    Event::Pause,
    Event::Resume {
        frozen: true,
        due: true,
    },
    Event::Resume {
        frozen: true,
        due: false,
    },
    Event::Resume {
        frozen: false,
        due: true,
    },
    Event::Resume {
        frozen: false,
        due: false,
    },
    Event::Reprioritize { frozen: true },
    Event::Reprioritize { frozen: false },
];

/// The statuses from which `event` is allowed.
pub fn allowed_from(event: Event) -> Vec<Status> {
    Status::ALL
        .into_iter()
        .filter(|from| decide(*from, event).is_ok())
        .collect()
}
