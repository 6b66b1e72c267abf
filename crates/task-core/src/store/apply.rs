//! How each store request changes one task record, shared by every store.
//!
//! Each function asks the state machine ([`crate::state::decide`]) for the new status and
//! updates the record's other fields to match. Stores that write with specialised SQL on their
//! hot paths must give the same result as these functions; the conformance suite checks that.

use crate::error::{Error, Result};
use crate::model::{AttemptOutcome, Interruption, Status, Task, Timestamp};
use crate::state::{Event, decide};
use crate::store::{Command, Finish, Outcome};

fn illegal(task: &Task, transition: crate::state::IllegalTransition) -> Error {
    Error::IllegalTransition {
        id: task.id,
        transition,
    }
}

/// Starts a new attempt of a queued task.
pub(crate) fn claim(task: &mut Task, now: Timestamp, lease_until: Timestamp) -> Result<()> {
    task.status = decide(task.status, Event::Claim).map_err(|t| illegal(task, t))?;
    task.attempt += 1;
    task.started_at = Some(now);
    task.updated_at = now;
    task.lease_until = Some(lease_until);
    task.run_at = None;
    task.progress = None;
    task.progress_message = None;
    Ok(())
}

/// Moves a due scheduled task to the queue.
pub(crate) fn promote(task: &mut Task, now: Timestamp) -> Result<()> {
    task.status = decide(task.status, Event::Promote).map_err(|t| illegal(task, t))?;
    task.run_at = None;
    task.updated_at = now;
    Ok(())
}

/// Whether `attempt` still holds the task: the fence of every write of a running attempt.
pub(crate) fn holds(task: &Task, attempt: u32) -> bool {
    (task.status == Status::Running || frozen(task)) && task.attempt == attempt
}

/// Whether a task is paused while its attempt runs (frozen): status `paused`, and its attempt
/// still holds a lease. A task paused before it started has no lease.
pub(crate) fn frozen(task: &Task) -> bool {
    task.status == Status::Paused && task.lease_until.is_some()
}

/// The status an attempt's end moves from: a frozen task ends as a running one would.
fn attempt_status(task: &Task) -> Status {
    if frozen(task) {
        Status::Running
    } else {
        task.status
    }
}

/// The outcome to record for an attempt: a task whose cancel was asked for is not retried or
/// re-queued, whatever ended its attempt (a timeout or a shutdown that came first, say).
pub(crate) fn settle(outcome: Outcome, cancel_requested: bool) -> Outcome {
    if cancel_requested && outcome.yields_to_cancel() {
        Outcome::Cancelled
    } else {
        outcome
    }
}

/// Ends a running attempt, appending its entry to the task's history. Returns `false` (and
/// changes nothing) when the attempt is fenced out.
pub(crate) fn finish(task: &mut Task, finish: &Finish) -> bool {
    if !holds(task, finish.attempt) {
        return false;
    }
    let cancelled;
    let finish = if task.cancel_requested && finish.outcome.yields_to_cancel() {
        // As `settle` decides, without cloning the outcome in the common case.
        cancelled = Finish {
            id: finish.id,
            attempt: finish.attempt,
            now: finish.now,
            outcome: Outcome::Cancelled,
        };
        &cancelled
    } else {
        finish
    };
    let now = finish.now;
    let Ok(to) = decide(attempt_status(task), finish.outcome.event()) else {
        return false;
    };
    task.record_attempt_end(finish.outcome.attempt_outcome(), now);
    task.status = to;
    task.updated_at = now;
    task.lease_until = None;
    task.cancel_requested = false;
    match &finish.outcome {
        Outcome::Completed { result } => {
            task.result = Some(result.clone());
            task.progress = Some(1.0);
        }
        Outcome::Failed {
            error,
            retry_at,
            result,
        } => {
            // The result goes with the error: both say how this attempt ended.
            task.error = Some(error.clone());
            task.result = result.clone();
            task.run_at = *retry_at;
        }
        Outcome::Interrupted { error, .. } => {
            // The attempt was cut short by a shutdown: it does not count.
            task.interrupted_attempts = task.interrupted_attempts.saturating_add(1);
            task.error = Some(error.clone());
            task.result = None;
        }
        Outcome::Cancelled => {}
    }
    if to.is_terminal() {
        task.finished_at = Some(now);
    } else {
        // Waiting for its next attempt: nothing of the last one's progress is true any more.
        task.progress = None;
        task.progress_message = None;
    }
    true
}

/// Gives back an attempt that was claimed but never started (see [`crate::state::Event::Release`]):
/// the task is as it was before the claim, its attempt number and start included, with no
/// entry in its history. A task paused meanwhile stays paused (as one paused before it
/// started: without a lease); one whose cancel was asked for is cancelled. Returns `false`
/// (and changes nothing) when the attempt is fenced out.
pub(crate) fn release(task: &mut Task, attempt: u32, now: Timestamp) -> bool {
    if !holds(task, attempt) {
        return false;
    }
    let event = if task.cancel_requested {
        Event::Cancel
    } else {
        Event::Release
    };
    let Ok(to) = decide(Status::Running, event) else {
        return false;
    };
    task.status = if frozen(task) && to == Status::Queued {
        Status::Paused
    } else {
        to
    };
    task.attempt = task.attempt.saturating_sub(1);
    task.started_at = task.attempts.last().map(|entry| entry.started_at);
    task.lease_until = None;
    task.cancel_requested = false;
    task.updated_at = now;
    if to.is_terminal() {
        task.finished_at = Some(now);
    }
    true
}

/// Records progress. Returns `false` when the attempt is fenced out.
pub(crate) fn progress(
    task: &mut Task,
    attempt: u32,
    progress: f64,
    message: Option<String>,
    now: Timestamp,
) -> bool {
    if !holds(task, attempt) {
        return false;
    }
    task.progress = Some(progress);
    if message.is_some() {
        task.progress_message = message;
    }
    task.updated_at = now;
    true
}

/// Applies a person's command.
pub(crate) fn command(task: &mut Task, command: Command, now: Timestamp) -> Result<()> {
    let event = match command {
        Command::Cancel => Event::Cancel,
        Command::Pause => Event::Pause,
        Command::Resume => Event::Resume {
            frozen: frozen(task),
            due: task.run_at.is_none_or(|at| at <= now),
        },
        Command::SetPriority(_) => Event::Reprioritize {
            frozen: frozen(task),
        },
    };
    let to = decide(task.status, event).map_err(|t| illegal(task, t))?;
    if let Command::SetPriority(priority) = command {
        // Only a waiting task gets here, and its status stays (`to` is its status).
        task.priority = priority;
        task.updated_at = now;
        return Ok(());
    }
    if command == Command::Cancel && (task.status == Status::Running || frozen(task)) {
        // The worker holding the attempt stops it (thawing it first) and records the cancel.
        task.cancel_requested = true;
        task.updated_at = now;
        return Ok(());
    }
    // Pausing a running task freezes it: its attempt keeps its lease (the worker freezes the
    // work and renews the lease), and resuming gives it back to the same attempt.
    task.status = to;
    task.updated_at = now;
    if to == Status::Queued {
        // A resumed task whose run_at has passed runs now; run_at is kept only while scheduled.
        task.run_at = None;
    }
    if to.is_terminal() {
        task.finished_at = Some(now);
        task.lease_until = None;
    }
    Ok(())
}

/// Recovers a running attempt whose worker is gone (msbd or its node died): cancelled if a
/// cancel was asked for; else, as a shutdown's interruption, the attempt does not count and the
/// task runs again, unless [`Task::interruption`] says it fails with kind `interrupted`. The
/// attempt's entry in the history says `worker_lost` (or `cancelled`), whatever the task's
/// error says.
pub(crate) fn recover(task: &mut Task, now: Timestamp) -> Result<()> {
    let (event, error) = if task.cancel_requested {
        (Event::Cancel, None)
    } else {
        let (rerun, error) = task.interruption(Interruption::WorkerLost);
        (Event::Abandon { retry: rerun }, Some(error))
    };
    task.status = decide(attempt_status(task), event).map_err(|t| illegal(task, t))?;
    // As a finish would record it: a cancel asked for wins over how else the attempt ended.
    task.record_attempt_end(
        if error.is_some() {
            AttemptOutcome::WorkerLost
        } else {
            AttemptOutcome::Cancelled
        },
        now,
    );
    task.updated_at = now;
    task.lease_until = None;
    task.cancel_requested = false;
    if error.is_some() {
        // A new error: an earlier attempt's result (its failure's facts) no longer goes with it.
        task.error = error;
        task.result = None;
        task.interrupted_attempts = task.interrupted_attempts.saturating_add(1);
    }
    if task.status.is_terminal() {
        task.finished_at = Some(now);
    } else {
        task.progress = None;
        task.progress_message = None;
    }
    Ok(())
}
