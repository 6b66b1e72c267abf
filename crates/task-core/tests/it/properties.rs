//! Property tests of the stores: random interleavings of submits, claims, progress, finishes,
//! commands (a new priority among them), lease expiries, promotions, deletions of finished tasks
//! and restarts, driven through the `Store` trait with a
//! simulated clock, against a reference model and a set of invariants checked after every step.
//!
//! Simulated workers hold (task, attempt) pairs. A worker whose attempt ended (it finished, or its
//! lease was recovered, or the store restarted under it) becomes stale and keeps trying to write:
//! every such write must be refused and change nothing.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::{Value, json};
use task_core::store::memory::MemoryStore;
use task_core::store::sqlite::{SqliteConfig, SqliteStore};
use task_core::store::{
    ClaimRequest, Command, Finish, Heartbeat, ListFilter, Outcome, PageRequest, ProgressUpdate,
    Recover, Store,
};
use task_core::{
    AttemptOutcome, FailureKind, MAX_ATTEMPT_RECORDS, MAX_INTERRUPTED_ATTEMPTS, NewTask, Priority,
    Status, Task, TaskError, TaskId, Timestamp,
};

/// The lease of every claim, in simulated milliseconds.
const LEASE_MS: u64 = 1_000;
/// Where the simulated clock starts.
const START: Timestamp = Timestamp(1_700_000_000_000);
/// How far the clock moves at every step.
const TICK_MS: u64 = 3;

type TestResult<T = ()> = Result<T, TestCaseError>;

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn ok<T>(result: task_core::Result<T>, what: &str) -> TestResult<T> {
    result.map_err(|e| TestCaseError::fail(format!("{what} failed: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Operations

/// How a simulated worker ends its attempt.
#[derive(Clone, Debug)]
enum End {
    Complete,
    Fail { retry: bool, delay_ms: u16 },
    Interrupt,
    Cancel,
}

/// The type limits of a claim.
#[derive(Clone, Debug)]
enum ClaimLimit {
    None,
    ExcludeB,
    RoomA(usize),
}

#[derive(Clone, Debug)]
struct SubmitSpec {
    priority: u8,
    max_attempts: u32,
    delay_ms: Option<u16>,
    type_b: bool,
    key: Option<u8>,
}

#[derive(Clone, Debug)]
enum Op {
    Submit(Vec<SubmitSpec>),
    Claim {
        max: usize,
        limit: ClaimLimit,
    },
    Progress {
        worker: Index,
        tenths: u8,
    },
    Finish {
        worker: Index,
        end: End,
    },
    Heartbeat {
        live: Vec<Index>,
        stale: Vec<Index>,
    },
    /// A person's command on a task: with `legal`, on one whose status allows it (when there is
    /// one); else on any task, so that refusals are tested too.
    Command {
        command: Command,
        task: Index,
        legal: bool,
    },
    /// Advance the clock (by `advance_ms`, or to the end of a live worker's lease, or just past
    /// it), then recover expired leases.
    Expire {
        advance_ms: u64,
        to_lease: Option<(Index, bool)>,
    },
    /// Advance the clock, then promote due scheduled tasks.
    Promote {
        advance_ms: u64,
    },
    /// Drop and reopen the store (SQLite), then recover every running attempt.
    Restart,
    /// A stale worker tries to finish (or report progress on) an attempt it no longer holds.
    StaleWrite {
        worker: Index,
        end: Option<End>,
        tenths: u8,
    },
    /// Delete finished tasks of one type (or any) and these statuses (any if empty; live ones
    /// named match nothing) that finished more than `back_ms` ago, up to `limit`.
    DeleteFinished {
        type_b: Option<bool>,
        statuses: Vec<Status>,
        back_ms: u64,
        limit: usize,
    },
}

fn end_strategy() -> impl Strategy<Value = End> {
    prop_oneof![
        3 => Just(End::Complete),
        3 => (any::<bool>(), 0u16..2_000).prop_map(|(retry, delay_ms)| End::Fail { retry, delay_ms }),
        1 => Just(End::Interrupt),
        1 => Just(End::Cancel),
    ]
}

fn submit_strategy() -> impl Strategy<Value = SubmitSpec> {
    (
        0u8..=9,
        1u32..=3,
        proptest::option::weighted(0.3, 0u16..3_000),
        any::<bool>(),
        proptest::option::weighted(0.2, 0u8..3),
    )
        .prop_map(
            |(priority, max_attempts, delay_ms, type_b, key)| SubmitSpec {
                priority,
                max_attempts,
                delay_ms,
                type_b,
                key,
            },
        )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let limit = prop_oneof![
        3 => Just(ClaimLimit::None),
        1 => Just(ClaimLimit::ExcludeB),
        1 => (0usize..3).prop_map(ClaimLimit::RoomA),
    ];
    prop_oneof![
        4 => proptest::collection::vec(submit_strategy(), 1..4).prop_map(Op::Submit),
        5 => (0usize..5, limit).prop_map(|(max, limit)| Op::Claim { max, limit }),
        2 => (any::<Index>(), 0u8..=10).prop_map(|(worker, tenths)| Op::Progress { worker, tenths }),
        5 => (any::<Index>(), end_strategy()).prop_map(|(worker, end)| Op::Finish { worker, end }),
        1 => (proptest::collection::vec(any::<Index>(), 0..3), proptest::collection::vec(any::<Index>(), 0..3))
            .prop_map(|(live, stale)| Op::Heartbeat { live, stale }),
        4 => (
            prop_oneof![
                Just(Command::Cancel),
                Just(Command::Pause),
                Just(Command::Resume),
                (0u8..=9).prop_map(|p| Command::SetPriority(Priority::new(p).expect("0..=9"))),
            ],
            any::<Index>(),
            any::<bool>(),
        )
            .prop_map(|(command, task, legal)| Op::Command { command, task, legal }),
        2 => (0..2 * LEASE_MS + 10, proptest::option::of((any::<Index>(), any::<bool>())))
            .prop_map(|(advance_ms, to_lease)| Op::Expire { advance_ms, to_lease }),
        2 => (0u64..2_000).prop_map(|advance_ms| Op::Promote { advance_ms }),
        1 => Just(Op::Restart),
        2 => (any::<Index>(), proptest::option::weighted(0.7, end_strategy()), 0u8..=10)
            .prop_map(|(worker, end, tenths)| Op::StaleWrite { worker, end, tenths }),
        2 => (
            proptest::option::of(any::<bool>()),
            proptest::sample::subsequence(Status::ALL.to_vec(), 0..=3),
            0u64..3_000,
            0usize..4,
        )
            .prop_map(|(type_b, statuses, back_ms, limit)| Op::DeleteFinished {
                type_b,
                statuses,
                back_ms,
                limit,
            }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The stores under test

enum Backend {
    Memory(MemoryStore),
    Sqlite {
        store: Option<SqliteStore>,
        path: PathBuf,
        _dir: tempfile::TempDir,
    },
}

impl Backend {
    fn memory() -> Backend {
        Backend::Memory(MemoryStore::new())
    }

    fn sqlite() -> TestResult<Backend> {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = dir.path().join("tasks.sqlite3");
        let store = ok(
            SqliteStore::open(SqliteConfig::new(&path)),
            "opening the store",
        )?;
        Ok(Backend::Sqlite {
            store: Some(store),
            path,
            _dir: dir,
        })
    }

    fn store(&self) -> &dyn Store {
        match self {
            Backend::Memory(store) => store,
            Backend::Sqlite { store, .. } => store.as_ref().expect("the store is open"),
        }
    }

    /// A restart: the SQLite store is dropped (its threads stop) and opened again on the same
    /// file; the memory store has nothing to reopen. The caller then recovers every running task.
    fn restart(&mut self) -> TestResult {
        if let Backend::Sqlite { store, path, .. } = self {
            drop(store.take());
            *store = Some(ok(
                SqliteStore::open(SqliteConfig::new(path.clone())),
                "reopening the store",
            )?);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The reference model

#[derive(Clone, Debug)]
struct ModelTask {
    id: TaskId,
    task_type: &'static str,
    priority: u8,
    status: Status,
    attempt: u32,
    max_attempts: u32,
    run_at: Option<Timestamp>,
    lease_until: Option<Timestamp>,
    cancel_requested: bool,
    progress: Option<f64>,
    result: Option<Value>,
    error_kind: Option<FailureKind>,
    finished_at: Option<Timestamp>,
    interrupted_attempts: u32,
    /// Every ended attempt: its number, how it ended, when (the store keeps the last ones).
    ended: Vec<(u32, AttemptOutcome, Timestamp)>,
}

impl ModelTask {
    fn has_attempts_left(&self) -> bool {
        // (A stale worker's copy may have an older attempt than its interruptions.)
        self.attempt.saturating_sub(self.interrupted_attempts) < self.max_attempts
    }

    /// Whether one more interruption leaves the task to run again.
    fn reruns_after_interruption(&self) -> bool {
        self.interrupted_attempts < MAX_INTERRUPTED_ATTEMPTS
    }

    /// Paused while its attempt runs: the attempt still holds the task.
    fn frozen(&self) -> bool {
        self.status == Status::Paused && self.lease_until.is_some()
    }

    /// A running attempt ends with `outcome` at `now` (the fence already checked).
    fn finish(&mut self, outcome: &Outcome, now: Timestamp) {
        // A task whose cancel was asked for is not retried or re-queued.
        let cancelled = Outcome::Cancelled;
        let outcome = match outcome {
            Outcome::Failed {
                retry_at: Some(_), ..
            }
            | Outcome::Interrupted { .. }
                if self.cancel_requested =>
            {
                &cancelled
            }
            other => other,
        };
        self.ended
            .push((self.attempt, outcome.attempt_outcome(), now));
        self.lease_until = None;
        self.cancel_requested = false;
        match outcome {
            Outcome::Completed { result } => {
                self.status = Status::Completed;
                self.result = Some(result.clone());
                self.progress = Some(1.0);
                self.run_at = None;
            }
            Outcome::Failed {
                error,
                retry_at,
                result,
            } => {
                self.status = if retry_at.is_some() {
                    Status::Scheduled
                } else {
                    Status::Failed
                };
                self.error_kind = Some(error.kind);
                self.result = result.clone();
                self.run_at = *retry_at;
            }
            Outcome::Interrupted { rerun, error } => {
                self.status = if *rerun {
                    Status::Queued
                } else {
                    Status::Failed
                };
                self.interrupted_attempts += 1;
                self.error_kind = Some(error.kind);
                self.result = None;
                self.run_at = None;
            }
            Outcome::Cancelled => {
                self.status = Status::Cancelled;
                self.run_at = None;
            }
        }
        if self.status.is_terminal() {
            self.finished_at = Some(now);
        } else {
            // Waiting for the next attempt: no progress of the last one.
            self.progress = None;
        }
    }

    /// A running attempt whose worker is gone is recovered at `now`: it does not count.
    fn recover(&mut self, now: Timestamp) {
        let outcome = if self.cancel_requested {
            AttemptOutcome::Cancelled
        } else {
            AttemptOutcome::WorkerLost
        };
        self.ended.push((self.attempt, outcome, now));
        if self.cancel_requested {
            self.status = Status::Cancelled;
        } else if self.reruns_after_interruption() {
            self.status = Status::Queued;
            self.error_kind = Some(FailureKind::WorkerLost);
            self.result = None;
            self.interrupted_attempts += 1;
        } else {
            self.status = Status::Failed;
            self.error_kind = Some(FailureKind::Interrupted);
            self.result = None;
            self.interrupted_attempts += 1;
        }
        self.lease_until = None;
        self.cancel_requested = false;
        if self.status.is_terminal() {
            self.finished_at = Some(now);
        } else {
            self.progress = None;
        }
    }

    /// What a command does: `Ok(changed task)` or `Err(())` for a refused one.
    fn command(&self, command: Command, now: Timestamp) -> Result<ModelTask, ()> {
        let mut next = self.clone();
        let frozen = self.frozen();
        match (self.status, command) {
            (Status::Completed | Status::Failed | Status::Cancelled, _) => return Err(()),
            // Only a task that waits (not one frozen while running) gets a new priority.
            (Status::Queued | Status::Scheduled, Command::SetPriority(p)) => {
                next.priority = p.get()
            }
            (Status::Paused, Command::SetPriority(p)) if !frozen => next.priority = p.get(),
            (_, Command::SetPriority(_)) => return Err(()),
            (Status::Running, Command::Cancel) => next.cancel_requested = true,
            (Status::Paused, Command::Cancel) if frozen => next.cancel_requested = true,
            (_, Command::Cancel) => next.status = Status::Cancelled,
            // Paused while running: frozen, the attempt keeps its lease.
            (Status::Queued | Status::Scheduled | Status::Running, Command::Pause) => {
                next.status = Status::Paused
            }
            (Status::Paused, Command::Pause) => return Err(()),
            (Status::Paused, Command::Resume) if frozen => next.status = Status::Running,
            (Status::Paused, Command::Resume) => {
                if self.run_at.is_none_or(|at| at <= now) {
                    // Queued at once, like a promoted task: no run_at left on a queued task.
                    next.status = Status::Queued;
                    next.run_at = None;
                } else {
                    next.status = Status::Scheduled;
                }
            }
            (_, Command::Resume) => return Err(()),
        }
        if next.status.is_terminal() {
            next.finished_at = Some(now);
        }
        Ok(next)
    }
}

#[derive(Default)]
struct Model {
    now: Timestamp,
    /// In submission order (the stores' age order).
    tasks: Vec<ModelTask>,
    index: HashMap<TaskId, usize>,
    keys: HashMap<String, TaskId>,
    /// Workers holding a running attempt.
    live: Vec<(TaskId, u32)>,
    /// Workers whose attempt ended: their writes must be fenced out.
    stale: Vec<(TaskId, u32)>,
    /// The highest attempt seen in the store, per task.
    seen_attempt: HashMap<TaskId, u32>,
    /// The terminal state first seen in the store, per task.
    seen_terminal: HashMap<TaskId, (Status, Option<Value>)>,
    submitted: usize,
    /// Counts of what happened, for the curious.
    fenced_writes: usize,
}

impl Model {
    fn task(&self, id: TaskId) -> &ModelTask {
        &self.tasks[self.index[&id]]
    }

    fn task_mut(&mut self, id: TaskId) -> &mut ModelTask {
        let at = self.index[&id];
        &mut self.tasks[at]
    }

    fn expected_claim(&self, max: usize, limit: &ClaimLimit) -> Vec<TaskId> {
        let mut queue: Vec<usize> = (0..self.tasks.len())
            .filter(|&i| self.tasks[i].status == Status::Queued)
            .collect();
        queue.sort_by_key(|&i| (Reverse(self.tasks[i].priority), i));
        let mut picked = Vec::new();
        let mut taken_a = 0;
        for i in queue {
            if picked.len() == max {
                break;
            }
            let task = &self.tasks[i];
            match limit {
                ClaimLimit::ExcludeB if task.task_type == "b" => continue,
                ClaimLimit::RoomA(room) if task.task_type == "a" => {
                    if taken_a >= *room {
                        continue;
                    }
                    taken_a += 1;
                }
                _ => {}
            }
            picked.push(task.id);
        }
        picked
    }

    fn end_worker(&mut self, worker: (TaskId, u32)) {
        self.live.retain(|w| *w != worker);
        self.stale.push(worker);
    }

    /// The finished tasks that a deletion with these terms takes: those that finished first
    /// first, then in submission order (the stores' age order).
    fn expected_deletion(
        &self,
        type_b: Option<bool>,
        statuses: &[Status],
        before: Timestamp,
        limit: usize,
    ) -> Vec<TaskId> {
        let mut matching: Vec<(Timestamp, usize)> = self
            .tasks
            .iter()
            .enumerate()
            .filter(|(_, t)| t.status.is_terminal())
            .filter(|(_, t)| statuses.is_empty() || statuses.contains(&t.status))
            .filter(|(_, t)| type_b.is_none_or(|b| (t.task_type == "b") == b))
            .filter_map(|(i, t)| t.finished_at.filter(|at| *at < before).map(|at| (at, i)))
            .collect();
        matching.sort();
        matching
            .into_iter()
            .take(limit)
            .map(|(_, i)| self.tasks[i].id)
            .collect()
    }

    /// Forgets deleted tasks: their keys are free again, and their stale workers gone.
    fn delete(&mut self, ids: &[TaskId]) {
        self.tasks.retain(|t| !ids.contains(&t.id));
        self.index = self
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id, i))
            .collect();
        self.keys.retain(|_, id| !ids.contains(id));
        self.stale.retain(|(id, _)| !ids.contains(id));
        self.submitted -= ids.len();
    }

    /// Recovers the model's running tasks that `which` selects; returns their ids, sorted.
    fn recover(&mut self, which: Recover) -> Vec<TaskId> {
        let now = self.now;
        let mut ids = Vec::new();
        for task in &mut self.tasks {
            let expired = task.lease_until.is_none_or(|until| until < now);
            if (task.status == Status::Running || task.frozen())
                && (which == Recover::AllRunning || expired)
            {
                ids.push((task.id, task.attempt));
                task.recover(now);
            }
        }
        for worker in &ids {
            self.end_worker(*worker);
        }
        let mut ids: Vec<TaskId> = ids.into_iter().map(|(id, _)| id).collect();
        ids.sort();
        ids
    }
}

// ---------------------------------------------------------------------------------------------
// The run

fn outcome_of(end: &End, task: &ModelTask, now: Timestamp) -> Outcome {
    match end {
        End::Complete => Outcome::Completed {
            result: json!({ "id": task.id.to_string(), "attempt": task.attempt }),
        },
        End::Fail { retry, delay_ms } => Outcome::Failed {
            error: TaskError {
                kind: FailureKind::Error,
                message: format!("attempt {} failed", task.attempt),
            },
            // As the engine does: a retry only while attempts remain.
            retry_at: (*retry && task.has_attempts_left())
                .then(|| now.after(ms(u64::from(*delay_ms)))),
            // What the failed attempt reported: the task's result until another attempt ends.
            result: Some(json!({ "failed_attempt": task.attempt })),
        },
        End::Interrupt => Outcome::Interrupted {
            rerun: task.reruns_after_interruption(),
            error: TaskError {
                kind: FailureKind::Interrupted,
                message: format!("attempt {} was interrupted", task.attempt),
            },
        },
        End::Cancel => Outcome::Cancelled,
    }
}

/// Runs `ops` against the backend and the model, checking the invariants after every step.
async fn run(backend: &mut Backend, ops: Vec<Op>) -> TestResult {
    let mut model = Model {
        now: START,
        ..Model::default()
    };
    let mut next_param = 0u64;
    for (step, op) in ops.into_iter().enumerate() {
        model.now = model.now.after(ms(TICK_MS));
        apply(backend, &mut model, &op, &mut next_param)
            .await
            .map_err(|e| TestCaseError::fail(format!("step {step} ({op:?}): {e}")))?;
        check(backend.store(), &mut model)
            .await
            .map_err(|e| TestCaseError::fail(format!("after step {step} ({op:?}): {e}")))?;
    }
    Ok(())
}

async fn apply(
    backend: &mut Backend,
    model: &mut Model,
    op: &Op,
    next_param: &mut u64,
) -> TestResult {
    let now = model.now;
    match op {
        Op::Submit(specs) => {
            let mut records = Vec::new();
            for spec in specs {
                *next_param += 1;
                let task_type = if spec.type_b { "b" } else { "a" };
                let mut new = NewTask::new(task_type, json!({ "n": *next_param }))
                    .with_priority(Priority::new(spec.priority).expect("0..=9"))
                    .with_max_attempts(spec.max_attempts);
                if let Some(delay) = spec.delay_ms {
                    new = new.with_run_at(now.after(ms(u64::from(delay))));
                }
                if let Some(key) = spec.key {
                    new = new.with_idempotency_key(format!("key-{key}"));
                }
                records.push(new.into_task(TaskId::new(), now));
            }
            let submitted = ok(backend.store().submit(records.clone()).await, "submit")?;
            prop_assert_eq!(submitted.len(), records.len());
            for (record, answer) in records.into_iter().zip(submitted) {
                let existing = record
                    .idempotency_key
                    .as_ref()
                    .and_then(|k| model.keys.get(k))
                    .copied();
                match existing {
                    Some(id) => {
                        prop_assert!(
                            !answer.created,
                            "a second submission with a taken key was created"
                        );
                        prop_assert_eq!(answer.task.id, id);
                    }
                    None => {
                        prop_assert!(answer.created);
                        prop_assert_eq!(&answer.task, &record);
                        if let Some(key) = &record.idempotency_key {
                            model.keys.insert(key.clone(), record.id);
                        }
                        model.index.insert(record.id, model.tasks.len());
                        model.tasks.push(ModelTask {
                            id: record.id,
                            task_type: if record.task_type == "b" { "b" } else { "a" },
                            priority: record.priority.get(),
                            status: record.status,
                            attempt: 0,
                            max_attempts: record.max_attempts,
                            run_at: record.run_at,
                            lease_until: None,
                            cancel_requested: false,
                            progress: None,
                            result: None,
                            error_kind: None,
                            finished_at: None,
                            interrupted_attempts: 0,
                            ended: Vec::new(),
                        });
                        model.submitted += 1;
                    }
                }
            }
        }
        Op::Claim { max, limit } => {
            let expected = model.expected_claim(*max, limit);
            let lease_until = now.after(ms(LEASE_MS));
            let (exclude_types, type_room) = match limit {
                ClaimLimit::None => (vec![], vec![]),
                ClaimLimit::ExcludeB => (vec!["b".to_owned()], vec![]),
                ClaimLimit::RoomA(room) => (vec![], vec![("a".to_owned(), *room)]),
            };
            let request = ClaimRequest {
                max: *max,
                now,
                lease_until,
                exclude_types,
                type_room,
            };
            let claimed = ok(backend.store().claim(request).await, "claim")?;
            let ids: Vec<TaskId> = claimed.iter().map(|t| t.id).collect();
            prop_assert_eq!(
                &ids,
                &expected,
                "claimed other tasks than priority-then-age order gives"
            );
            for task in claimed {
                let model_task = model.task_mut(task.id);
                model_task.status = Status::Running;
                model_task.attempt += 1;
                model_task.lease_until = Some(lease_until);
                model_task.run_at = None;
                model_task.progress = None;
                prop_assert_eq!(task.status, Status::Running);
                prop_assert_eq!(task.attempt, model_task.attempt);
                prop_assert_eq!(task.lease_until, Some(lease_until));
                model.live.push((task.id, task.attempt));
            }
        }
        Op::Progress { worker, tenths } => {
            if model.live.is_empty() {
                return Ok(());
            }
            let (id, attempt) = model.live[worker.index(model.live.len())];
            let progress = f64::from(*tenths) / 10.0;
            let update = ProgressUpdate {
                id,
                attempt,
                progress,
                message: Some(format!("{tenths}/10")),
                now,
            };
            let applied = ok(backend.store().progress(update).await, "progress")?;
            prop_assert!(
                applied,
                "the progress of a worker holding its attempt was refused"
            );
            model.task_mut(id).progress = Some(progress);
        }
        Op::Finish { worker, end } => {
            if model.live.is_empty() {
                return Ok(());
            }
            let (id, attempt) = model.live[worker.index(model.live.len())];
            let outcome = outcome_of(end, model.task(id), now);
            let finish = Finish {
                id,
                attempt,
                now,
                outcome: outcome.clone(),
            };
            let applied = ok(backend.store().finish(finish).await, "finish")?;
            prop_assert!(
                applied,
                "the finish of a worker holding its attempt was refused"
            );
            model.task_mut(id).finish(&outcome, now);
            model.end_worker((id, attempt));
        }
        Op::Heartbeat { live, stale } => {
            let mut held = Vec::new();
            if !model.live.is_empty() {
                held.extend(live.iter().map(|i| model.live[i.index(model.live.len())]));
            }
            if !model.stale.is_empty() {
                held.extend(
                    stale
                        .iter()
                        .map(|i| model.stale[i.index(model.stale.len())]),
                );
            }
            let lease_until = now.after(ms(LEASE_MS));
            let reply = ok(
                backend
                    .store()
                    .heartbeat(Heartbeat {
                        held: held.clone(),
                        lease_until,
                    })
                    .await,
                "heartbeat",
            )?;
            let mut lost = Vec::new();
            let mut cancel_requested = Vec::new();
            for (id, attempt) in held {
                if model.live.contains(&(id, attempt)) {
                    let task = model.task_mut(id);
                    task.lease_until = Some(lease_until);
                    if task.cancel_requested {
                        cancel_requested.push(id);
                    }
                } else {
                    lost.push(id);
                }
            }
            prop_assert_eq!(reply.lost, lost, "heartbeat: lost attempts");
            prop_assert_eq!(
                reply.cancel_requested,
                cancel_requested,
                "heartbeat: cancel requests"
            );
        }
        Op::Command {
            command,
            task,
            legal,
        } => {
            let command = *command;
            let allowed: Vec<TaskId> = model
                .tasks
                .iter()
                .filter(|t| t.command(command, now).is_ok())
                .map(|t| t.id)
                .collect();
            let id = if *legal && !allowed.is_empty() {
                allowed[task.index(allowed.len())]
            } else if !model.tasks.is_empty() {
                model.tasks[task.index(model.tasks.len())].id
            } else {
                return Ok(());
            };
            let expected = model.task(id).command(command, now);
            let before = ok(backend.store().get(id).await, "get")?;
            let answer = backend.store().command(id, command, now).await;
            match (expected, answer) {
                (Ok(next), Ok(task)) => {
                    prop_assert_eq!(task.status, next.status);
                    prop_assert_eq!(task.cancel_requested, next.cancel_requested);
                    *model.task_mut(id) = next;
                }
                (Err(()), Err(_)) => {
                    let after = ok(backend.store().get(id).await, "get")?;
                    prop_assert_eq!(before, after, "a refused command changed the task");
                }
                (Ok(next), Err(e)) => {
                    return Err(TestCaseError::fail(format!(
                        "{command:?} of a {} task was refused ({e}); expected it to become {}",
                        model.task(id).status,
                        next.status
                    )));
                }
                (Err(()), Ok(task)) => {
                    return Err(TestCaseError::fail(format!(
                        "{command:?} of a {} task was accepted (now {}); expected a refusal",
                        model.task(id).status,
                        task.status
                    )));
                }
            }
        }
        Op::Expire {
            advance_ms,
            to_lease,
        } => {
            match to_lease {
                Some((worker, past)) if !model.live.is_empty() => {
                    // Exactly at the end of a lease (not yet expired), or one millisecond past it.
                    let (id, _) = model.live[worker.index(model.live.len())];
                    let until = model.task(id).lease_until.expect("a live worker's lease");
                    let target = until.after(ms(u64::from(*past)));
                    model.now = model.now.max(target);
                }
                _ => model.now = model.now.after(ms(*advance_ms)),
            }
            let now = model.now;
            let recovered = ok(
                backend.store().recover(now, Recover::Expired).await,
                "recover",
            )?;
            check_recovered(model, recovered, Recover::Expired)?;
        }
        Op::Promote { advance_ms } => {
            model.now = model.now.after(ms(*advance_ms));
            let now = model.now;
            let promoted = ok(backend.store().promote_due(now).await, "promote_due")?;
            let mut count = 0;
            for task in &mut model.tasks {
                if task.status == Status::Scheduled && task.run_at.is_some_and(|at| at <= now) {
                    task.status = Status::Queued;
                    task.run_at = None;
                    count += 1;
                }
            }
            let next_due = model
                .tasks
                .iter()
                .filter(|t| t.status == Status::Scheduled)
                .filter_map(|t| t.run_at)
                .min();
            prop_assert_eq!(promoted.count, count, "promoted count");
            prop_assert_eq!(promoted.next_due, next_due, "next due");
        }
        Op::Restart => {
            backend.restart()?;
            let recovered = ok(
                backend.store().recover(now, Recover::AllRunning).await,
                "recover",
            )?;
            check_recovered(model, recovered, Recover::AllRunning)?;
        }
        Op::StaleWrite {
            worker,
            end,
            tenths,
        } => {
            if model.stale.is_empty() {
                return Ok(());
            }
            let (id, attempt) = model.stale[worker.index(model.stale.len())];
            let before = ok(backend.store().get(id).await, "get")?;
            let applied = match end {
                Some(end) => {
                    // The outcome a stale worker would compute from the task it was given.
                    let mut as_it_was = model.task(id).clone();
                    as_it_was.attempt = attempt;
                    let outcome = outcome_of(end, &as_it_was, now);
                    ok(
                        backend
                            .store()
                            .finish(Finish {
                                id,
                                attempt,
                                now,
                                outcome,
                            })
                            .await,
                        "finish",
                    )?
                }
                None => {
                    let update = ProgressUpdate {
                        id,
                        attempt,
                        progress: f64::from(*tenths) / 10.0,
                        message: Some("stale".into()),
                        now,
                    };
                    ok(backend.store().progress(update).await, "progress")?
                }
            };
            prop_assert!(
                !applied,
                "a stale worker's write (attempt {attempt}) was accepted"
            );
            let after = ok(backend.store().get(id).await, "get")?;
            prop_assert_eq!(before, after, "a fenced-out write changed the task");
            model.fenced_writes += 1;
        }
        Op::DeleteFinished {
            type_b,
            statuses,
            back_ms,
            limit,
        } => {
            let before = Timestamp(now.0 - *back_ms as i64);
            let expected = model.expected_deletion(*type_b, statuses, before, *limit);
            let filter = ListFilter {
                statuses: statuses.clone(),
                task_type: type_b.map(|b| if b { "b" } else { "a" }.to_owned()),
                ..ListFilter::default()
            };
            let deleted = ok(
                backend
                    .store()
                    .delete_finished(filter, before, *limit)
                    .await,
                "delete_finished",
            )?;
            prop_assert_eq!(deleted, expected.len(), "deleted count");
            for id in &expected {
                let gone = ok(backend.store().get(*id).await, "get")?;
                prop_assert!(gone.is_none(), "task {} should have been deleted", id);
            }
            model.delete(&expected);
        }
    }
    Ok(())
}

fn check_recovered(model: &mut Model, recovered: Vec<Task>, which: Recover) -> TestResult {
    let expected = model.recover(which);
    let mut got: Vec<TaskId> = recovered.iter().map(|t| t.id).collect();
    got.sort();
    prop_assert_eq!(got, expected, "recovered tasks ({:?})", which);
    for task in recovered {
        let model_task = model.task(task.id);
        prop_assert_eq!(task.status, model_task.status, "status of a recovered task");
        prop_assert_eq!(
            task.attempt,
            model_task.attempt,
            "attempt of a recovered task"
        );
    }
    Ok(())
}

/// Every task in the store, paging through the unfiltered listing.
async fn list_all(store: &dyn Store) -> TestResult<Vec<Task>> {
    let mut tasks = Vec::new();
    let mut cursor = None;
    loop {
        let page = ok(
            store
                .list(ListFilter::default(), PageRequest { cursor, limit: 7 })
                .await,
            "list",
        )?;
        prop_assert!(page.tasks.len() <= 7);
        tasks.extend(page.tasks);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(tasks),
        }
    }
}

/// The invariants, checked against the store after every step.
async fn check(store: &dyn Store, model: &mut Model) -> TestResult {
    // Every submitted task appears exactly once, newest first, with one status.
    let listed = list_all(store).await?;
    let listed_ids: Vec<TaskId> = listed.iter().map(|t| t.id).collect();
    let expected_ids: Vec<TaskId> = model.tasks.iter().rev().map(|t| t.id).collect();
    prop_assert_eq!(
        listed_ids,
        expected_ids,
        "the listing is not every submitted task once, newest first"
    );

    // The counts account for every task and agree with the listing.
    let stats = ok(store.stats().await, "stats")?;
    prop_assert_eq!(stats.total(), model.submitted as u64, "stats total");
    let mut counted: BTreeMap<Status, u64> = Status::ALL.into_iter().map(|s| (s, 0)).collect();
    for task in &listed {
        *counted.entry(task.status).or_default() += 1;
    }
    for status in Status::ALL {
        prop_assert_eq!(stats.count(status), counted[&status], "stats of {}", status);
    }

    for task in &listed {
        // Attempts never decrease; terminal tasks stay as they ended.
        let seen = model.seen_attempt.entry(task.id).or_insert(0);
        prop_assert!(
            task.attempt >= *seen,
            "attempt of {} went from {} to {}",
            task.id,
            *seen,
            task.attempt
        );
        *seen = task.attempt;
        if let Some((status, result)) = model.seen_terminal.get(&task.id) {
            prop_assert_eq!(task.status, *status, "a terminal task changed status");
            prop_assert_eq!(&task.result, result, "a terminal task changed result");
        } else if task.status.is_terminal() {
            model
                .seen_terminal
                .insert(task.id, (task.status, task.result.clone()));
        }
        prop_assert_eq!(
            task.finished_at.is_some(),
            task.status.is_terminal(),
            "finished_at of a {} task",
            task.status
        );
        // A run_at is set while a task is scheduled, and never on one that may run now.
        match task.status {
            Status::Scheduled => {
                prop_assert!(task.run_at.is_some(), "a scheduled task without run_at")
            }
            Status::Queued | Status::Running => {
                prop_assert_eq!(task.run_at, None, "run_at of a {} task", task.status);
            }
            _ => {}
        }

        // And the task is what the model says.
        let want = model.task(task.id);
        let what = format!("task {} ({} in the model)", task.id, want.status);
        prop_assert_eq!(task.status, want.status, "status of {}", what);
        prop_assert_eq!(task.attempt, want.attempt, "attempt of {}", what);
        prop_assert_eq!(
            task.max_attempts,
            want.max_attempts,
            "max_attempts of {}",
            what
        );
        prop_assert_eq!(
            task.interrupted_attempts,
            want.interrupted_attempts,
            "interrupted_attempts of {}",
            what
        );
        prop_assert_eq!(task.run_at, want.run_at, "run_at of {}", what);
        prop_assert_eq!(
            task.lease_until,
            want.lease_until,
            "lease_until of {}",
            what
        );
        prop_assert_eq!(
            task.cancel_requested,
            want.cancel_requested,
            "cancel_requested of {}",
            what
        );
        prop_assert_eq!(task.progress, want.progress, "progress of {}", what);
        prop_assert_eq!(&task.result, &want.result, "result of {}", what);
        prop_assert_eq!(
            task.error.as_ref().map(|e| e.kind),
            want.error_kind,
            "error of {}",
            what
        );
        prop_assert_eq!(task.priority.get(), want.priority, "priority of {}", what);
        let history: Vec<(u32, AttemptOutcome, Timestamp)> = task
            .attempts
            .iter()
            .map(|r| (r.n, r.outcome, r.ended_at))
            .collect();
        let kept = want.ended.len().saturating_sub(MAX_ATTEMPT_RECORDS);
        prop_assert_eq!(
            &history[..],
            &want.ended[kept..],
            "attempt history of {}",
            what
        );
        prop_assert!(
            task.attempts.iter().all(|r| r.started_at <= r.ended_at),
            "an attempt of {} ends before it starts: {:?}",
            what,
            task.attempts
        );
        prop_assert_eq!(
            task.finished_at,
            want.finished_at,
            "finished_at of {}",
            what
        );
    }

    // The live workers are exactly the running attempts.
    let mut running: Vec<(TaskId, u32)> = listed
        .iter()
        .filter(|t| {
            t.status == Status::Running || (t.status == Status::Paused && t.lease_until.is_some())
        })
        .map(|t| (t.id, t.attempt))
        .collect();
    running.sort();
    let mut live = model.live.clone();
    live.sort();
    prop_assert_eq!(
        running,
        live,
        "the running attempts are not those the live workers hold"
    );
    Ok(())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // No regression files: the failing case is printed, and this directory belongs to the
        // sources.
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn memory_store_keeps_its_invariants(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        runtime().block_on(async {
            let mut backend = Backend::memory();
            run(&mut backend, ops).await
        })?;
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn sqlite_store_keeps_its_invariants(ops in proptest::collection::vec(op_strategy(), 1..80)) {
        runtime().block_on(async {
            let mut backend = Backend::sqlite()?;
            run(&mut backend, ops).await
        })?;
    }
}
