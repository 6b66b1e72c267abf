//! The task model: identifiers, priorities, statuses, failure kinds and the task record itself.

use std::fmt;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A task's identifier: a UUIDv7, so identifiers sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(uuid::Uuid);

impl TaskId {
    /// A new identifier for a task created now: a UUIDv7 whose 48-bit millisecond timestamp
    /// and 12-bit counter increase strictly within the process (so ids created in the same
    /// millisecond still sort in creation order), followed by 62 random bits.
    pub fn new() -> TaskId {
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let candidate = now_ms << 12;
        let mut previous = LAST.load(Ordering::Relaxed);
        let stamp = loop {
            let next = candidate.max(previous + 1);
            match LAST.compare_exchange_weak(previous, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break next,
                Err(seen) => previous = seen,
            }
        };
        let millis = stamp >> 12;
        let counter = (stamp & 0xFFF) as u16;
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
        bytes[6] = 0x70 | ((counter >> 8) as u8 & 0x0F);
        bytes[7] = counter as u8;
        bytes[8..].copy_from_slice(&rand::random::<u64>().to_be_bytes());
        bytes[8] = 0x80 | (bytes[8] & 0x3F);
        TaskId(uuid::Uuid::from_bytes(bytes))
    }

    /// The identifier as 16 bytes, the form the stores keep.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// The identifier from the 16 bytes of [`TaskId::as_bytes`].
    pub fn from_bytes(bytes: [u8; 16]) -> TaskId {
        TaskId(uuid::Uuid::from_bytes(bytes))
    }
}

impl Hash for TaskId {
    /// Hashes the 64 bits that end the id (random in the ids this crate makes), so that maps
    /// keyed by id need no general-purpose hash function; see [`IdHasher`].
    fn hash<H: Hasher>(&self, state: &mut H) {
        let bytes = self.0.as_bytes();
        let mut low = [0u8; 8];
        low.copy_from_slice(&bytes[8..]);
        state.write_u64(
            u64::from_le_bytes(low)
                ^ u64::from_le_bytes([
                    bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7],
                ]),
        );
    }
}

/// The hasher of maps keyed by [`TaskId`]: one multiply of the 64 bits the id hashes to.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.write_u64(u64::from(*byte));
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// A map keyed by task id, with [`IdHasher`].
pub type IdMap<V> = std::collections::HashMap<TaskId, V, BuildHasherDefault<IdHasher>>;

impl Default for TaskId {
    fn default() -> Self {
        TaskId::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// The error of parsing a [`TaskId`] from text.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "`{input}` is not a task id: a task id is a UUID such as 01890a5d-ac96-774b-bcce-b302099a8057"
)]
pub struct ParseTaskIdError {
    input: String,
}

impl FromStr for TaskId {
    type Err = ParseTaskIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s.trim())
            .map(TaskId)
            .map_err(|_| ParseTaskIdError {
                input: s.chars().take(80).collect(),
            })
    }
}

/// A point in time: milliseconds since the Unix epoch.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize, Default,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(millis)
    }

    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// This time plus a duration (saturating).
    pub fn after(self, duration: Duration) -> Timestamp {
        let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_add(millis))
    }

    /// The time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }
}

/// A task's priority: 0 to 9, larger runs sooner, 5 by default.
///
/// The names `low` (2), `normal` (5), `high` (8) and `critical` (9) are accepted wherever a
/// priority is parsed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Priority(u8);

impl Priority {
    /// The lowest priority, 0.
    pub const MIN: Priority = Priority(0);
    /// `low`, 2.
    pub const LOW: Priority = Priority(2);
    /// `normal`, 5: the default.
    pub const NORMAL: Priority = Priority(5);
    /// `high`, 8.
    pub const HIGH: Priority = Priority(8);
    /// `critical`, 9: the highest priority.
    pub const CRITICAL: Priority = Priority(9);

    /// A priority from its number; `None` above 9.
    pub const fn new(value: u8) -> Option<Priority> {
        if value <= 9 {
            Some(Priority(value))
        } else {
            None
        }
    }

    /// The priority's number, 0 to 9.
    pub const fn get(self) -> u8 {
        self.0
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority::NORMAL
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The error of reading a priority.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "`{input}` is not a priority: use a number from 0 (lowest) to 9 (highest), or one of low (2), normal (5), high (8), critical (9)"
)]
pub struct ParsePriorityError {
    input: String,
}

impl TryFrom<u8> for Priority {
    type Error = ParsePriorityError;

    fn try_from(value: u8) -> Result<Self, Self::Error> {
        Priority::new(value).ok_or(ParsePriorityError {
            input: value.to_string(),
        })
    }
}

impl From<Priority> for u8 {
    fn from(p: Priority) -> u8 {
        p.0
    }
}

impl FromStr for Priority {
    type Err = ParsePriorityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let named = match trimmed.to_ascii_lowercase().as_str() {
            "low" => Some(Priority::LOW),
            "normal" => Some(Priority::NORMAL),
            "high" => Some(Priority::HIGH),
            "critical" => Some(Priority::CRITICAL),
            _ => None,
        };
        named
            .or_else(|| trimmed.parse::<u8>().ok().and_then(Priority::new))
            .ok_or_else(|| ParsePriorityError {
                input: s.chars().take(40).collect(),
            })
    }
}

/// Where a task stands. One closed set; the state machine in [`crate::state`] decides every move.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Ready to run, waiting for a worker.
    Queued,
    /// Waiting for its `run_at`: a delay or a retry backoff.
    Scheduled,
    /// Held before it started (or frozen while running).
    Paused,
    /// Claimed by a worker that holds its lease.
    Running,
    /// Finished with a result. Terminal.
    Completed,
    /// Finished with an error. Terminal.
    Failed,
    /// Cancelled. Terminal.
    Cancelled,
}

impl Status {
    /// Every status, in a fixed order.
    pub const ALL: [Status; 7] = [
        Status::Queued,
        Status::Scheduled,
        Status::Paused,
        Status::Running,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
    ];

    /// Whether the status is final: completed, failed or cancelled.
    pub const fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// The status's name, as it is written in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Scheduled => "scheduled",
            Status::Paused => "paused",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    /// The small integer the SQL stores keep.
    pub const fn code(self) -> u8 {
        match self {
            Status::Queued => 0,
            Status::Scheduled => 1,
            Status::Paused => 2,
            Status::Running => 3,
            Status::Completed => 4,
            Status::Failed => 5,
            Status::Cancelled => 6,
        }
    }

    /// The status of a code from [`Status::code`].
    pub const fn from_code(code: u8) -> Option<Status> {
        match code {
            0 => Some(Status::Queued),
            1 => Some(Status::Scheduled),
            2 => Some(Status::Paused),
            3 => Some(Status::Running),
            4 => Some(Status::Completed),
            5 => Some(Status::Failed),
            6 => Some(Status::Cancelled),
            _ => None,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of reading a status name.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "`{input}` is not a task status: use one of queued, scheduled, paused, running, completed, failed, cancelled"
)]
pub struct ParseStatusError {
    input: String,
}

impl FromStr for Status {
    type Err = ParseStatusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == lower)
            .ok_or_else(|| ParseStatusError {
                input: s.chars().take(40).collect(),
            })
    }
}

/// Why a task failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The handler returned an error.
    Error,
    /// The attempt ran longer than the task's timeout.
    Timeout,
    /// The worker running the attempt stopped renewing its lease (it died, or the daemon was
    /// killed). Kept as the last attempt's error of a task that runs again for it; a task that
    /// does not run again ends with kind `interrupted`.
    WorkerLost,
    /// msbd stopped running the attempt (a shutdown, a crash, a lost node) and the task is not
    /// run again: it asked not to be (`rerun_on_recovery: false`), or it was interrupted too
    /// many times. While a task runs again, its last attempt's error has this kind after a
    /// shutdown.
    Interrupted,
    /// The task could not be run at all (no handler for its type, say).
    Rejected,
}

impl FailureKind {
    /// The kind's name, as it is written in JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            FailureKind::Error => "error",
            FailureKind::Timeout => "timeout",
            FailureKind::WorkerLost => "worker_lost",
            FailureKind::Interrupted => "interrupted",
            FailureKind::Rejected => "rejected",
        }
    }

    /// The small integer the SQL stores keep.
    pub const fn code(self) -> u8 {
        match self {
            FailureKind::Error => 0,
            FailureKind::Timeout => 1,
            FailureKind::WorkerLost => 2,
            FailureKind::Interrupted => 3,
            FailureKind::Rejected => 4,
        }
    }

    /// The kind of a code from [`FailureKind::code`].
    pub const fn from_code(code: u8) -> Option<FailureKind> {
        match code {
            0 => Some(FailureKind::Error),
            1 => Some(FailureKind::Timeout),
            2 => Some(FailureKind::WorkerLost),
            3 => Some(FailureKind::Interrupted),
            4 => Some(FailureKind::Rejected),
            _ => None,
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error a task ended with (also kept on a task that will be retried, for its last attempt).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct TaskError {
    /// What kind of failure.
    pub kind: FailureKind,
    /// A readable message.
    pub message: String,
}

/// How a failed attempt is retried: exponential backoff with full jitter.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// The delay before the first retry (before jitter).
    pub base_delay_ms: u64,
    /// The largest delay, however many attempts have failed.
    pub max_delay_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base_delay_ms: 1_000,
            max_delay_ms: 300_000,
        }
    }
}

impl RetryPolicy {
    /// The delay before the retry that follows failed attempt number `attempt` (1-based):
    /// `base * 2^(attempt-1)`, capped at the maximum, then drawn uniformly from its upper half
    /// (so retries of many tasks that failed together spread out, and none comes too early).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        let ceiling = self
            .base_delay_ms
            .saturating_mul(1u64 << exponent)
            .min(self.max_delay_ms)
            .max(1);
        let floor = ceiling / 2;
        let jittered = floor + rand::random_range(0..=ceiling - floor);
        Duration::from_millis(jittered)
    }
}

/// A task as the stores keep it.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Task {
    /// Its identifier.
    pub id: TaskId,
    /// The type, which names the handler that runs it.
    pub task_type: String,
    /// The handler's input.
    pub params: Value,
    /// Larger runs sooner.
    pub priority: Priority,
    /// Where it stands.
    pub status: Status,
    /// The number of attempts started so far (0 before the first claim). Never decreases.
    pub attempt: u32,
    /// The most attempts it may have.
    pub max_attempts: u32,
    /// How failed attempts are retried.
    pub retry: RetryPolicy,
    /// The longest one attempt may run.
    pub timeout: Option<Duration>,
    /// When it may run: set while it is scheduled (a delay or a retry backoff).
    pub run_at: Option<Timestamp>,
    /// A second submission with the same key (and owner) returns this task.
    pub idempotency_key: Option<String>,
    /// The principal or session that created it.
    pub owner: Option<String>,
    /// The sandbox session it runs in, if any.
    pub session_id: Option<String>,
    /// Whether `session_id` was made for this task alone (it named no session): nothing else
    /// waits for that session, so it binds the task to no node of a shared queue (any node can
    /// make it), and the session's record of its owner ends with the session.
    #[serde(default)]
    pub fresh_session: bool,
    /// From 0.0 to 1.0, once the handler has reported any.
    pub progress: Option<f64>,
    /// The handler's words about its progress.
    pub progress_message: Option<String>,
    /// The handler's result, once completed. After a failed attempt, what that attempt produced
    /// if its handler said ([`crate::TaskFailure::result`]): it goes with [`Task::error`], and a
    /// later end with an error of its own (a failure without one, an interruption, a lost
    /// worker) clears it.
    pub result: Option<Value>,
    /// Why it failed (or why its last attempt failed, while it waits for a retry).
    pub error: Option<TaskError>,
    /// When it was submitted.
    pub created_at: Timestamp,
    /// When its latest attempt started.
    pub started_at: Option<Timestamp>,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it reached a terminal status.
    pub finished_at: Option<Timestamp>,
    /// Free labels, for filtering by people.
    pub tags: Vec<String>,
    /// While running: until when the worker's lease holds.
    pub lease_until: Option<Timestamp>,
    /// Whether a cancel was asked for while it ran (the worker stops it at its next heartbeat).
    pub cancel_requested: bool,
    /// How many of its attempts ended because msbd went away, not because of the task: a
    /// shutdown interrupted them, or their worker stopped renewing the lease (msbd or its node
    /// crashed). They do not count against `max_attempts`.
    pub interrupted_attempts: u32,
    /// Whether an attempt that msbd's going away interrupted runs again (the default), or the
    /// task ends `failed` with kind `interrupted`.
    pub rerun_on_recovery: bool,
    /// How its attempts ended, oldest first: one entry per ended attempt, appended by the very
    /// write that records the end (a finish, an interruption, a recovery). Only the last
    /// [`MAX_ATTEMPT_RECORDS`] are kept; the attempt under way has none yet. Empty for tasks
    /// whose attempts ended before msbd kept this history.
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
}

/// How many entries of [`Task::attempts`] are kept: the oldest is dropped when an attempt
/// ends with this many already there. Every store trims as it appends, in the same write.
pub const MAX_ATTEMPT_RECORDS: usize = 20;

/// How one attempt of a task ended, an entry of [`Task::attempts`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The attempt's number, from 1 (as [`Task::attempt`] counted it).
    pub n: u32,
    /// When it started.
    pub started_at: Timestamp,
    /// When it ended (when its end was recorded).
    pub ended_at: Timestamp,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// The node that ran the attempt (the one that claimed it), on a store shared by several
    /// nodes ([`crate::store::postgres::PostgresStore`]): its `node_id`. An attempt that a
    /// reaper on another node recovered still names the node that ran it. `None` on a store
    /// one process owns (memory, SQLite), and for entries written before msbd recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// How an attempt ended. The names are those of the failure kinds and statuses: `completed`,
/// `failed`, `timeout`, `rejected`, `cancelled`, `interrupted`, `worker_lost`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The handler returned a result.
    Completed,
    /// The handler returned an error (retried or not).
    Failed,
    /// The attempt ran longer than the task's timeout.
    #[serde(rename = "timeout")]
    TimedOut,
    /// The task could not be run (no handler for its type, say).
    Rejected,
    /// A cancel stopped it (one asked for while it ran wins over however else it ended).
    Cancelled,
    /// A shutdown of msbd stopped it.
    Interrupted,
    /// Its worker stopped renewing the lease (msbd or its node crashed or was killed; found by
    /// the lease reaper or by recovery at start).
    WorkerLost,
}

impl AttemptOutcome {
    /// Every outcome.
    pub const ALL: [AttemptOutcome; 7] = [
        AttemptOutcome::Completed,
        AttemptOutcome::Failed,
        AttemptOutcome::TimedOut,
        AttemptOutcome::Rejected,
        AttemptOutcome::Cancelled,
        AttemptOutcome::Interrupted,
        AttemptOutcome::WorkerLost,
    ];

    /// The outcome's name, as it is written in JSON (and in the stores' history columns).
    pub const fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::TimedOut => "timeout",
            AttemptOutcome::Rejected => "rejected",
            AttemptOutcome::Cancelled => "cancelled",
            AttemptOutcome::Interrupted => "interrupted",
            AttemptOutcome::WorkerLost => "worker_lost",
        }
    }

    /// The outcome of an attempt that ended with an error of this kind.
    pub const fn of_failure(kind: FailureKind) -> AttemptOutcome {
        match kind {
            FailureKind::Error => AttemptOutcome::Failed,
            FailureKind::Timeout => AttemptOutcome::TimedOut,
            FailureKind::Rejected => AttemptOutcome::Rejected,
            FailureKind::WorkerLost => AttemptOutcome::WorkerLost,
            FailureKind::Interrupted => AttemptOutcome::Interrupted,
        }
    }
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many interrupted attempts a task survives: the attempt interrupted after these many
/// ends the task `failed` with kind `interrupted`, so that a task that itself brings msbd down
/// cannot loop for ever.
pub const MAX_INTERRUPTED_ATTEMPTS: u32 = 3;

/// Why msbd stopped running an attempt (see [`Task::interruption`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Interruption {
    /// A graceful shutdown interrupted the attempt.
    Shutdown,
    /// The attempt's lease expired: msbd or its node died (found by the lease reaper, or by
    /// recovery at start).
    WorkerLost,
}

impl Task {
    /// Records that the current attempt ended at `now` with `outcome`: appends its entry to
    /// [`Task::attempts`], dropping the oldest beyond [`MAX_ATTEMPT_RECORDS`]. The entry names
    /// no node; a store shared by several nodes fills in [`AttemptRecord::node`] itself.
    pub fn record_attempt_end(&mut self, outcome: AttemptOutcome, now: Timestamp) {
        if self.attempts.len() >= MAX_ATTEMPT_RECORDS {
            let extra = self.attempts.len() + 1 - MAX_ATTEMPT_RECORDS;
            self.attempts.drain(..extra);
        }
        self.attempts.push(AttemptRecord {
            n: self.attempt,
            started_at: self.started_at.unwrap_or(now),
            ended_at: now,
            outcome,
            node: None,
        });
    }

    /// Whether another attempt may follow the current one: the attempts that count (those not
    /// interrupted) are fewer than `max_attempts`.
    pub fn has_attempts_left(&self) -> bool {
        self.counted_attempts() < self.max_attempts
    }

    /// The attempts that count against `max_attempts`: those started, less those interrupted.
    pub fn counted_attempts(&self) -> u32 {
        self.attempt.saturating_sub(self.interrupted_attempts)
    }

    /// What becomes of this task when msbd stops running its current attempt for `why`:
    /// whether it runs again (`true`), and the error that says what happened. It runs again
    /// unless it was submitted with `rerun_on_recovery: false` or this is its interrupted
    /// attempt number [`MAX_INTERRUPTED_ATTEMPTS`] + 1; then it fails with kind `interrupted`.
    /// While it runs again, the error (kind `interrupted` or `worker_lost`) tells why its last
    /// attempt ended.
    pub fn interruption(&self, why: Interruption) -> (bool, TaskError) {
        let attempt = self.attempt;
        let count = self.interrupted_attempts.saturating_add(1);
        let what = match why {
            Interruption::Shutdown => {
                format!("attempt {attempt} was interrupted by a shutdown of msbd")
            }
            Interruption::WorkerLost => format!(
                "the worker running attempt {attempt} stopped renewing its lease (msbd or its node died or was killed)"
            ),
        };
        if !self.rerun_on_recovery {
            let message = format!(
                "{what}; the task was submitted with rerun_on_recovery: false, so it is not run again"
            );
            (
                false,
                TaskError {
                    kind: FailureKind::Interrupted,
                    message,
                },
            )
        } else if count > MAX_INTERRUPTED_ATTEMPTS {
            let message = format!(
                "{what}; this task has been interrupted {count} times, more than the limit of {MAX_INTERRUPTED_ATTEMPTS}, so it is not run again (it may be what brings msbd down)"
            );
            (
                false,
                TaskError {
                    kind: FailureKind::Interrupted,
                    message,
                },
            )
        } else {
            let kind = match why {
                Interruption::Shutdown => FailureKind::Interrupted,
                Interruption::WorkerLost => FailureKind::WorkerLost,
            };
            let message = format!(
                "{what}; the task runs again, and the interrupted attempt does not count against max_attempts"
            );
            (true, TaskError { kind, message })
        }
    }
}

/// What a caller gives to create a task. Build one with [`NewTask::new`] and the `with_*` methods.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct NewTask {
    /// The type, which names the handler that runs it.
    pub task_type: String,
    /// The handler's input.
    pub params: Value,
    /// Larger runs sooner.
    pub priority: Priority,
    /// The most attempts it may have (at least 1).
    pub max_attempts: u32,
    /// How failed attempts are retried.
    pub retry: RetryPolicy,
    /// The longest one attempt may run; `None` for no limit.
    pub timeout: Option<Duration>,
    /// Do not run before this time.
    pub run_at: Option<Timestamp>,
    /// A second submission with the same key (and owner) returns the first task.
    pub idempotency_key: Option<String>,
    /// The principal or session that creates it.
    pub owner: Option<String>,
    /// The sandbox session it runs in.
    pub session_id: Option<String>,
    /// Whether `session_id` was made for this task alone (see [`Task::fresh_session`]).
    pub fresh_session: bool,
    /// Free labels.
    pub tags: Vec<String>,
    /// Whether an attempt interrupted by msbd's going away (a shutdown, a crash, a lost node)
    /// runs again: `true` by default; `false` ends the task `failed` with kind `interrupted`.
    pub rerun_on_recovery: bool,
}

impl NewTask {
    /// A task of this type with these params, priority normal, one attempt, no timeout.
    pub fn new(task_type: impl Into<String>, params: Value) -> NewTask {
        NewTask {
            task_type: task_type.into(),
            params,
            priority: Priority::NORMAL,
            max_attempts: 1,
            retry: RetryPolicy::default(),
            timeout: None,
            run_at: None,
            idempotency_key: None,
            owner: None,
            session_id: None,
            fresh_session: false,
            tags: Vec::new(),
            rerun_on_recovery: true,
        }
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: Priority) -> NewTask {
        self.priority = priority;
        self
    }

    /// Sets the most attempts (values below 1 count as 1).
    pub fn with_max_attempts(mut self, max_attempts: u32) -> NewTask {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Sets the retry backoff.
    pub fn with_retry(mut self, retry: RetryPolicy) -> NewTask {
        self.retry = retry;
        self
    }

    /// Sets the timeout of each attempt.
    pub fn with_timeout(mut self, timeout: Duration) -> NewTask {
        self.timeout = Some(timeout);
        self
    }

    /// Delays the first attempt until this time.
    pub fn with_run_at(mut self, run_at: Timestamp) -> NewTask {
        self.run_at = Some(run_at);
        self
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> NewTask {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the owner.
    pub fn with_owner(mut self, owner: impl Into<String>) -> NewTask {
        self.owner = Some(owner.into());
        self
    }

    /// Sets the session.
    pub fn with_session(mut self, session_id: impl Into<String>) -> NewTask {
        self.session_id = Some(session_id.into());
        self.fresh_session = false;
        self
    }

    /// Sets a session made for this task alone (see [`Task::fresh_session`]).
    pub fn with_fresh_session(mut self, session_id: impl Into<String>) -> NewTask {
        self.session_id = Some(session_id.into());
        self.fresh_session = true;
        self
    }

    /// Sets the tags.
    pub fn with_tags(mut self, tags: Vec<String>) -> NewTask {
        self.tags = tags;
        self
    }

    /// Sets whether an attempt interrupted by msbd's going away runs again (see
    /// [`Task::rerun_on_recovery`]).
    pub fn with_rerun_on_recovery(mut self, rerun: bool) -> NewTask {
        self.rerun_on_recovery = rerun;
        self
    }

    /// The task record this submission creates at `now`: queued, or scheduled when `run_at` is
    /// still ahead.
    pub fn into_task(self, id: TaskId, now: Timestamp) -> Task {
        let scheduled = self.run_at.is_some_and(|at| at > now);
        Task {
            id,
            task_type: self.task_type,
            params: self.params,
            priority: self.priority,
            status: if scheduled {
                Status::Scheduled
            } else {
                Status::Queued
            },
            attempt: 0,
            max_attempts: self.max_attempts.max(1),
            retry: self.retry,
            timeout: self.timeout,
            run_at: if scheduled { self.run_at } else { None },
            idempotency_key: self.idempotency_key,
            owner: self.owner,
            fresh_session: self.fresh_session && self.session_id.is_some(),
            session_id: self.session_id,
            progress: None,
            progress_message: None,
            result: None,
            error: None,
            created_at: now,
            started_at: None,
            updated_at: now,
            finished_at: None,
            tags: self.tags,
            lease_until: None,
            cancel_requested: false,
            interrupted_attempts: 0,
            rerun_on_recovery: self.rerun_on_recovery,
            attempts: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_parse_from_names_and_numbers() {
        assert_eq!("low".parse::<Priority>().unwrap(), Priority::LOW);
        assert_eq!("Normal".parse::<Priority>().unwrap().get(), 5);
        assert_eq!("high".parse::<Priority>().unwrap().get(), 8);
        assert_eq!("critical".parse::<Priority>().unwrap().get(), 9);
        assert_eq!("0".parse::<Priority>().unwrap().get(), 0);
        let error = "10".parse::<Priority>().unwrap_err().to_string();
        assert!(error.contains("from 0 (lowest) to 9"), "{error}");
        assert!("urgent".parse::<Priority>().is_err());
        assert!(serde_json::from_str::<Priority>("12").is_err());
    }

    #[test]
    fn statuses_round_trip_through_codes_names_and_json() {
        for status in Status::ALL {
            assert_eq!(Status::from_code(status.code()), Some(status));
            assert_eq!(status.as_str().parse::<Status>().unwrap(), status);
            let json = serde_json::to_string(&status).unwrap();
            assert_eq!(json, format!("\"{}\"", status.as_str()));
        }
        assert_eq!(Status::from_code(7), None);
    }

    #[test]
    fn attempt_outcomes_are_named_as_in_json() {
        for outcome in AttemptOutcome::ALL {
            let json = serde_json::to_string(&outcome).unwrap();
            assert_eq!(json, format!("\"{}\"", outcome.as_str()));
            assert_eq!(
                serde_json::from_str::<AttemptOutcome>(&json).unwrap(),
                outcome
            );
        }
        let mut record = AttemptRecord {
            n: 2,
            started_at: Timestamp(10),
            ended_at: Timestamp(20),
            outcome: AttemptOutcome::TimedOut,
            node: None,
        };
        let unnamed =
            serde_json::json!({"n": 2, "started_at": 10, "ended_at": 20, "outcome": "timeout"});
        assert_eq!(
            serde_json::to_value(&record).unwrap(),
            unnamed,
            "no node key"
        );
        assert_eq!(
            serde_json::from_value::<AttemptRecord>(unnamed).unwrap(),
            record,
            "an entry written before nodes were recorded"
        );
        record.node = Some("node-a".into());
        let named = serde_json::json!(
            {"n": 2, "started_at": 10, "ended_at": 20, "outcome": "timeout", "node": "node-a"}
        );
        assert_eq!(serde_json::to_value(&record).unwrap(), named);
        assert_eq!(
            serde_json::from_value::<AttemptRecord>(named).unwrap(),
            record
        );
    }

    #[test]
    fn the_attempt_history_keeps_the_last_entries() {
        let mut task = NewTask::new("t", Value::Null).into_task(TaskId::new(), Timestamp(0));
        for n in 1..=(MAX_ATTEMPT_RECORDS as u32 + 5) {
            task.attempt = n;
            task.started_at = Some(Timestamp(i64::from(n) * 10));
            task.record_attempt_end(AttemptOutcome::Failed, Timestamp(i64::from(n) * 10 + 5));
        }
        assert_eq!(task.attempts.len(), MAX_ATTEMPT_RECORDS);
        assert_eq!(task.attempts[0].n, 6);
        assert_eq!(
            task.attempts.last().unwrap().n,
            MAX_ATTEMPT_RECORDS as u32 + 5
        );
    }

    #[test]
    fn task_ids_sort_by_creation_and_parse_back() {
        let first = TaskId::new();
        let second = TaskId::new();
        assert!(first < second);
        let many: Vec<TaskId> = (0..10_000).map(|_| TaskId::new()).collect();
        assert!(
            many.windows(2).all(|pair| pair[0] < pair[1]),
            "ids out of order"
        );
        assert_eq!(first.0.get_version_num(), 7);
        assert_eq!(first.0.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(first.to_string().parse::<TaskId>().unwrap(), first);
        assert!("nope".parse::<TaskId>().is_err());
    }

    #[test]
    fn retry_delays_grow_and_stay_within_bounds() {
        let policy = RetryPolicy {
            base_delay_ms: 100,
            max_delay_ms: 1_000,
        };
        for _ in 0..100 {
            let first = policy.delay_after(1).as_millis();
            assert!((50..=100).contains(&first), "{first}");
            let third = policy.delay_after(3).as_millis();
            assert!((200..=400).contains(&third), "{third}");
            let late = policy.delay_after(30).as_millis();
            assert!((500..=1_000).contains(&late), "{late}");
        }
    }
}
