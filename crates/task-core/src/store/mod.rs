//! The store trait that every task store implements, and the types of its requests.
//!
//! A store keeps tasks and applies the state machine to them atomically. Every write of a running
//! attempt is fenced: it applies only while the task is `running` with the same `attempt`, so a
//! worker that lost its lease can never overwrite the work of the attempt that replaced it.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::model::{AttemptOutcome, Priority, Status, Task, TaskError, TaskId, Timestamp};
use crate::state::{Event, decide};

pub(crate) mod apply;
mod common;
pub mod memory;
pub mod postgres;
pub mod sqlite;

/// The future a store method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// A durable (or, for [`memory::MemoryStore`], ephemeral) home for tasks.
///
/// Methods take the current time from the caller, so that stores hold no clock of their own and
/// tests can drive time.
pub trait Store: Send + Sync + 'static {
    /// Inserts new tasks. A task whose idempotency key (with its owner) is already taken is not
    /// inserted; the existing task is returned with `created: false`.
    fn submit(&self, tasks: Vec<Task>) -> StoreFuture<'_, Vec<Submitted>>;

    /// Submits tasks, then claims as [`Store::claim`] does, in one request (one transaction where
    /// the store has them), so that a task submitted to an idle engine starts one commit sooner.
    fn submit_and_claim(
        &self,
        tasks: Vec<Task>,
        request: ClaimRequest,
    ) -> StoreFuture<'_, (Vec<Submitted>, Vec<Task>)> {
        Box::pin(async move {
            let submitted = self.submit(tasks).await?;
            let claimed = self.claim(request).await?;
            Ok((submitted, claimed))
        })
    }

    /// Claims up to `request.max` queued tasks, highest priority first and oldest first within a
    /// priority, moving them to `running` with a new attempt and a lease.
    fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, Vec<Task>>;

    /// Moves scheduled tasks whose `run_at` has come to the queue.
    fn promote_due(&self, now: Timestamp) -> StoreFuture<'_, Promoted>;

    /// Ends a running attempt. Returns `false` when the attempt was fenced out.
    fn finish(&self, finish: Finish) -> StoreFuture<'_, bool>;

    /// Gives back attempts that were claimed but never started (`held`: each task with its
    /// attempt), as if they had not been claimed: each task goes back to the queue with its
    /// attempt number and start as before the claim and nothing added to its history (a task
    /// paused meanwhile stays paused; one whose cancel was asked for is cancelled). Returns how
    /// many were given back; attempts fenced out are skipped.
    fn release(&self, held: Vec<(TaskId, u32)>, now: Timestamp) -> StoreFuture<'_, usize>;

    /// Records progress of a running attempt. Returns `false` when the attempt was fenced out.
    fn progress(&self, update: ProgressUpdate) -> StoreFuture<'_, bool>;

    /// Extends the leases of running attempts; says which are no longer held and which were
    /// asked to stop.
    fn heartbeat(&self, heartbeat: Heartbeat) -> StoreFuture<'_, HeartbeatReply>;

    /// Applies a person's command (cancel, pause, resume, set the priority) to one task.
    /// Cancelling a running task marks it `cancel_requested`; its worker ends it. A new priority
    /// orders the next claim at once.
    fn command(&self, id: TaskId, command: Command, now: Timestamp) -> StoreFuture<'_, Task>;

    /// Recovers running attempts whose worker is gone: those whose lease expired before `now`,
    /// or, with [`Recover::AllRunning`], every running attempt (for a store that one process owns
    /// exclusively, at start). Returns the recovered tasks as they now are.
    fn recover(&self, now: Timestamp, which: Recover) -> StoreFuture<'_, Vec<Task>>;

    /// Deletes up to `limit` terminal tasks that finished before `before`. Returns how many.
    fn prune(&self, before: Timestamp, limit: usize) -> StoreFuture<'_, usize>;

    /// Deletes up to `limit` terminal tasks (completed, failed or cancelled) that match `filter`
    /// and finished before `finished_before`, those that finished first first. Returns how many.
    ///
    /// Only terminal tasks are ever deleted: `filter.statuses` narrows the terminal statuses
    /// (empty means all three), and a non-terminal status in it matches nothing. The filter's
    /// other fields match as in [`Store::list`]; an empty filter matches every owner's tasks.
    fn delete_finished(
        &self,
        filter: ListFilter,
        finished_before: Timestamp,
        limit: usize,
    ) -> StoreFuture<'_, usize>;

    /// Gives every task of owner `from` to owner `to`, in one write, whatever its status; returns
    /// how many tasks moved. For an owner that was renamed (msbd's HTTP principals once were).
    ///
    /// Idempotency keys are unique per owner: a task whose key `to` already holds stays with
    /// `from` (so the move never fails on a key), and the caller can find it listed under `from`.
    /// Nothing else of a task changes (not `updated_at`), and no task is left with no owner: a
    /// task without one is never `from`'s. Moving an owner to itself moves nothing.
    fn reassign_owner(&self, from: &str, to: &str) -> StoreFuture<'_, u64>;

    /// One task.
    fn get(&self, id: TaskId) -> StoreFuture<'_, Option<Task>>;

    /// A page of tasks matching the filter, newest first.
    fn list(&self, filter: ListFilter, page: PageRequest) -> StoreFuture<'_, Page>;

    /// Counts of tasks by status and by type.
    fn stats(&self) -> StoreFuture<'_, Stats>;

    /// Failed tasks whose last attempt ran out of time, by type (clients see them with status
    /// `timeout`). Counted when asked, from the tasks themselves: for metrics, not a hot path.
    fn timed_out(&self) -> StoreFuture<'_, BTreeMap<String, u64>>;

    /// Waits until every write accepted so far is durable.
    fn flush(&self) -> StoreFuture<'_, ()>;

    /// How the store is doing: whether writes currently fail, and why. Cheap (no I/O); a
    /// store that cannot fail this way keeps the default, always healthy.
    fn health(&self) -> StoreHealth {
        StoreHealth::default()
    }

    // What a store shared with other processes (several msbd nodes on one database) asks of
    // whoever runs an engine on it. The defaults are a store one process owns: nothing changes.

    /// Whether other processes run engines on this store too (they share its queue).
    fn is_shared(&self) -> bool {
        false
    }

    /// The engine settings for this store, given the ones asked for. A shared store recovers
    /// nothing at start (a running task may be another live process's: expired leases are the
    /// lease reaper's) and may poll for work less often when it wakes engines itself
    /// ([`Store::wakeups`]). The default keeps `config` as it is.
    fn engine_config(&self, config: EngineConfig) -> EngineConfig {
        config
    }

    /// Whether this process should run the queue's maintenance (the lease reaper, the retention
    /// pruner) now: on a shared store, only one process at a time does. The default: always.
    fn is_maintenance_leader(&self) -> bool {
        true
    }

    /// How long this process has reached the store without a problem since its last problem
    /// went away; `None` while it has one. After an outage, leases that ran out meanwhile say
    /// nothing about their workers (no process could renew them): a lease reaper waits until
    /// this is longer than the processes need to reconnect and renew. The default,
    /// `Duration::MAX`, never delays the reaper.
    fn healthy_for(&self) -> Option<Duration> {
        Some(Duration::MAX)
    }

    /// The loop that forwards to an engine the wake-ups of the other processes sharing this
    /// store (work they made ready), for a supervisor to run beside the engine's own loops; `None`
    /// (the default) when there are none, as for a store one process owns.
    fn wakeups(self: Arc<Self>) -> Option<WakeupLoop> {
        None
    }

    /// The nodes sharing this store and the state of its database, as the database sees them
    /// now: for operators (which nodes are up, which one leads the maintenance, how full the
    /// database is). `None` (the default) for a store one process owns. Reads the database
    /// (a query or two); fails with the database's error when it cannot be read.
    fn cluster_status(&self) -> StoreFuture<'_, Option<ClusterStatus>> {
        Box::pin(async { Ok(None) })
    }
}

/// A store's wake-up loop (see [`Store::wakeups`]): given an engine and a cancellation token,
/// a future that forwards the store's wake-ups to the engine until the token fires. Called
/// again for each run, so that a supervisor can restart it.
pub type WakeupLoop =
    Arc<dyn Fn(Engine, CancellationToken) -> StoreFuture<'static, ()> + Send + Sync>;

/// How a store is doing, for health checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StoreHealth {
    /// Whether writes work.
    pub status: StoreStatus,
    /// While not healthy: what is wrong and what to do.
    pub problem: Option<String>,
    /// While not healthy: since when (milliseconds since the Unix epoch).
    pub since_ms: Option<i64>,
}

/// The state of a store's writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreStatus {
    /// Reads and writes work.
    #[default]
    Healthy,
    /// Reads work; the last write failed for a reason that may pass (a full disk, an I/O
    /// error). Writes are tried again as they come.
    Degraded,
    /// Writes are refused until an operator acts (the problem says what to do).
    Unhealthy,
}

/// The nodes sharing a store and its database (see [`Store::cluster_status`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// This node's name (its `node_id`).
    pub node: String,
    /// The nodes connected now, sorted by name, this one among them (unless its connection to
    /// the database is being reopened).
    pub nodes: Vec<ClusterNode>,
    /// The database they share.
    pub database: DatabaseStatus,
}

/// A node connected to a shared store, as the database sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterNode {
    /// The node's name (its `node_id`).
    pub name: String,
    /// Whether this is the node that asked.
    pub is_self: bool,
    /// Whether it runs the queue's maintenance (the lease reaper, the pruner): at most one
    /// node does at a time.
    pub is_leader: bool,
    /// Since when its connection to the database has been open (milliseconds since the Unix
    /// epoch): when it started, or last reconnected. `None` when the database does not show it
    /// (the database user may not see other users' sessions).
    pub connected_since_ms: Option<i64>,
    /// The address it connects from, as the database sees it; `None` over a Unix socket or when
    /// the database does not show it.
    pub client_addr: Option<String>,
}

/// The database of a shared store. A field the database does not show (for lack of a right,
/// or statistics not gathered yet) is `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DatabaseStatus {
    /// The server's version (`server_version`, e.g. `15.4`).
    pub server_version: String,
    /// The size of the whole database on disk, in bytes (`pg_database_size`).
    pub database_size_bytes: Option<i64>,
    /// The row versions of the task tables (unfinished and finished tasks) that are live (the
    /// statistics' estimate, `n_live_tup`): about the number of tasks.
    pub live_tasks: Option<i64>,
    /// The dead row versions of the task tables awaiting a vacuum (`n_dead_tup`).
    pub dead_tasks: Option<i64>,
    /// When the table of unfinished tasks was last vacuumed, by hand, by the maintenance leader or by
    /// autovacuum (milliseconds since the Unix epoch); `None` when it never was.
    pub last_vacuum_ms: Option<i64>,
    /// The client connections to this database now, of every node and every other client.
    pub connections: Option<i64>,
    /// The most connections the server accepts (`max_connections`), across all its databases.
    pub max_connections: Option<i64>,
}

/// The answer to one submitted task.
#[derive(Clone, Debug)]
pub struct Submitted {
    /// The task: the new one, or the one that already had the idempotency key.
    pub task: Task,
    /// `false` when an existing task with the same idempotency key was returned.
    pub created: bool,
}

/// What a claim may take.
#[derive(Clone, Debug)]
pub struct ClaimRequest {
    /// The most tasks to claim.
    pub max: usize,
    /// The current time: the attempt's start.
    pub now: Timestamp,
    /// The lease of the claimed attempts.
    pub lease_until: Timestamp,
    /// Types not to claim at all (paused, or at their concurrency limit).
    pub exclude_types: Vec<String>,
    /// Types with a concurrency limit and the number of their tasks that may still start.
    pub type_room: Vec<(String, usize)>,
}

impl ClaimRequest {
    /// How many more tasks of `task_type` this claim may take, given `taken` already taken.
    pub fn room_for(&self, task_type: &str) -> Option<usize> {
        if self.exclude_types.iter().any(|t| t == task_type) {
            return Some(0);
        }
        self.type_room
            .iter()
            .find(|(t, _)| t == task_type)
            .map(|(_, room)| *room)
    }
}

/// The result of promoting due scheduled tasks.
#[derive(Clone, Debug, Default)]
pub struct Promoted {
    /// How many tasks moved to the queue.
    pub count: usize,
    /// When the next scheduled task becomes due.
    pub next_due: Option<Timestamp>,
}

/// The end of a running attempt.
#[derive(Clone, Debug)]
pub struct Finish {
    /// The task.
    pub id: TaskId,
    /// The attempt that ends (the fence).
    pub attempt: u32,
    /// When.
    pub now: Timestamp,
    /// How it ended.
    pub outcome: Outcome,
}

/// How an attempt ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// With a result: the task is completed.
    Completed {
        /// The handler's result.
        result: Value,
    },
    /// With an error or a timeout: retried at `retry_at` if given, else failed.
    Failed {
        /// The error.
        error: TaskError,
        /// When the next attempt may start.
        retry_at: Option<Timestamp>,
        /// What the failed attempt produced, if the handler said ([`crate::TaskFailure::result`]):
        /// the task's result from now on, beside its error (`None` clears an earlier attempt's).
        result: Option<Value>,
    },
    /// Interrupted by a shutdown of msbd: the attempt does not count against `max_attempts`
    /// (`interrupted_attempts` grows by one), the task is re-queued without the progress of the
    /// attempt if `rerun`, else failed. `error` says what happened (see
    /// [`crate::model::Task::interruption`], which decides both).
    Interrupted {
        /// Whether the task runs again.
        rerun: bool,
        /// Why the attempt ended: kept as the task's error.
        error: TaskError,
    },
    /// Cancelled while it ran.
    Cancelled,
}

impl Outcome {
    /// The state machine's event for this outcome.
    pub fn event(&self) -> Event {
        match self {
            Outcome::Completed { .. } => Event::Complete,
            Outcome::Failed { retry_at, .. } => Event::Fail {
                retry: retry_at.is_some(),
            },
            Outcome::Interrupted { rerun, .. } => Event::Abandon { retry: *rerun },
            Outcome::Cancelled => Event::Cancel,
        }
    }

    /// The status a running task moves to with this outcome.
    pub fn status(&self) -> Status {
        // Every outcome is an event that a running task allows.
        decide(Status::Running, self.event()).unwrap_or(Status::Failed)
    }

    /// How the attempt ended, as its entry in [`crate::model::Task::attempts`] says: a failure
    /// by its error's kind, an interruption by a shutdown `interrupted`.
    pub fn attempt_outcome(&self) -> AttemptOutcome {
        match self {
            Outcome::Completed { .. } => AttemptOutcome::Completed,
            Outcome::Failed { error, .. } => AttemptOutcome::of_failure(error.kind),
            Outcome::Interrupted { .. } => AttemptOutcome::Interrupted,
            Outcome::Cancelled => AttemptOutcome::Cancelled,
        }
    }

    /// Whether a cancel asked for while the attempt ran wins over this outcome: over every
    /// outcome that would run the task again, and over an interruption (the task was to stop
    /// anyway, and its user asked for it).
    pub fn yields_to_cancel(&self) -> bool {
        !self.status().is_terminal() || matches!(self, Outcome::Interrupted { .. })
    }
}

/// A progress report of a running attempt.
#[derive(Clone, Debug)]
pub struct ProgressUpdate {
    /// The task.
    pub id: TaskId,
    /// The attempt reporting (the fence).
    pub attempt: u32,
    /// From 0.0 to 1.0 (checked by the caller).
    pub progress: f64,
    /// The handler's words.
    pub message: Option<String>,
    /// When.
    pub now: Timestamp,
}

/// A renewal of the leases a worker holds.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    /// The attempts held: task and attempt.
    pub held: Vec<(TaskId, u32)>,
    /// The new end of their leases.
    pub lease_until: Timestamp,
}

/// The answer to a heartbeat.
#[derive(Clone, Debug, Default)]
pub struct HeartbeatReply {
    /// Attempts no longer held (recovered by a reaper, or ended): stop them.
    pub lost: Vec<TaskId>,
    /// Attempts asked to stop by a cancel.
    pub cancel_requested: Vec<TaskId>,
}

/// A person's command on one task.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Command {
    /// Cancel: at once unless running; a running task is marked and its worker ends it.
    Cancel,
    /// Hold a queued or scheduled task.
    Pause,
    /// Release a paused task.
    Resume,
    /// Change the priority of a task that waits: queued, scheduled, or paused before it started.
    /// Its status stays; a queued task takes its new place in the claim order at once. A task
    /// that has started (running, or paused while running) or finished is refused.
    SetPriority(Priority),
}

/// Which running attempts [`Store::recover`] takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Recover {
    /// Those whose lease has expired.
    Expired,
    /// All of them (their process is known to be gone).
    AllRunning,
}

/// Which tasks to list. Empty fields match everything.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListFilter {
    /// Any of these statuses.
    pub statuses: Vec<Status>,
    /// This type.
    pub task_type: Option<String>,
    /// This owner.
    pub owner: Option<String>,
    /// This session.
    pub session_id: Option<String>,
    /// Created at or after.
    pub created_from: Option<Timestamp>,
    /// Created before.
    pub created_until: Option<Timestamp>,
}

impl ListFilter {
    /// Whether `task` matches and may be deleted by [`Store::delete_finished`]: it matches and
    /// is terminal.
    pub(crate) fn matches_finished(&self, task: &Task) -> bool {
        task.status.is_terminal() && self.matches(task)
    }

    /// Whether `task` matches.
    pub fn matches(&self, task: &Task) -> bool {
        (self.statuses.is_empty() || self.statuses.contains(&task.status))
            && self.task_type.as_ref().is_none_or(|t| *t == task.task_type)
            && self
                .owner
                .as_ref()
                .is_none_or(|o| Some(o) == task.owner.as_ref())
            && self
                .session_id
                .as_ref()
                .is_none_or(|s| Some(s) == task.session_id.as_ref())
            && self.created_from.is_none_or(|from| task.created_at >= from)
            && self
                .created_until
                .is_none_or(|until| task.created_at < until)
    }
}

/// Which page of a listing.
#[derive(Clone, Debug)]
pub struct PageRequest {
    /// Where the previous page ended; `None` for the first page.
    pub cursor: Option<Cursor>,
    /// The most tasks in the page (1 to [`PageRequest::MAX_LIMIT`]).
    pub limit: usize,
}

impl PageRequest {
    /// The largest page.
    pub const MAX_LIMIT: usize = 1_000;

    /// The first page of `limit` tasks.
    pub fn first(limit: usize) -> PageRequest {
        PageRequest {
            cursor: None,
            limit,
        }
    }

    /// The limit, clamped to 1..=MAX_LIMIT.
    pub fn clamped_limit(&self) -> usize {
        self.limit.clamp(1, Self::MAX_LIMIT)
    }
}

/// A page of tasks.
#[derive(Clone, Debug)]
pub struct Page {
    /// The tasks, newest first.
    pub tasks: Vec<Task>,
    /// The cursor of the next page; `None` on the last page.
    pub next_cursor: Option<Cursor>,
}

/// A position in a listing. Opaque to callers: its text form is what they pass back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Cursor(pub(crate) u64);

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c1.{:x}", self.0)
    }
}

impl FromStr for Cursor {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        s.strip_prefix("c1.")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .map(Cursor)
            .ok_or_else(|| Error::InvalidInput {
                field: "cursor",
                message: format!(
                    "`{}` is not a cursor of this listing: pass back the next_cursor of the previous page unchanged, or omit it for the first page",
                    s.chars().take(40).collect::<String>()
                ),
            })
    }
}

/// Counts of tasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Tasks by status (every status present, zero included).
    pub by_status: BTreeMap<Status, u64>,
    /// Tasks by type, then by status (statuses with no task left out).
    pub by_type: BTreeMap<String, BTreeMap<Status, u64>>,
}

impl Default for Stats {
    /// No tasks: every status present with a zero count.
    fn default() -> Self {
        Stats::empty()
    }
}

impl Stats {
    /// The number of tasks in `status`.
    pub fn count(&self, status: Status) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// All tasks.
    pub fn total(&self) -> u64 {
        self.by_status.values().sum()
    }

    /// Adds `delta` to the count of (`task_type`, `status`).
    pub(crate) fn add(&mut self, task_type: &str, status: Status, delta: i64) {
        let slot = self.by_status.entry(status).or_insert(0);
        *slot = slot.saturating_add_signed(delta);
        let by_status = match self.by_type.get_mut(task_type) {
            Some(by_status) => by_status,
            None => self.by_type.entry(task_type.to_owned()).or_default(),
        };
        let slot = by_status.entry(status).or_insert(0);
        *slot = slot.saturating_add_signed(delta);
        if *slot == 0 {
            by_status.remove(&status);
            if by_status.is_empty() {
                self.by_type.remove(task_type);
            }
        }
    }

    /// Moves one task of `task_type` from one status to another.
    pub(crate) fn moved(&mut self, task_type: &str, from: Status, to: Status) {
        if from != to {
            self.add(task_type, from, -1);
            self.add(task_type, to, 1);
        }
    }

    /// Stats with every status present.
    pub(crate) fn empty() -> Stats {
        Stats {
            by_status: Status::ALL.into_iter().map(|s| (s, 0)).collect(),
            by_type: BTreeMap::new(),
        }
    }
}
