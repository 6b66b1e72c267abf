//! The engine: submits tasks, claims them by priority then age, runs their handlers within the
//! concurrency limits, enforces timeouts, retries with backoff, renews leases, recovers the tasks
//! of dead workers, prunes old tasks, and publishes every change as an event.
//!
//! The engine's background work is four loops, each an `async fn` that runs until its
//! cancellation token fires, so that a supervisor can own them: [`Engine::run_dispatcher`]
//! (claims and starts tasks), [`Engine::run_heartbeat`] (renews the leases of running attempts,
//! also while a shutdown drains), [`Engine::run_lease_reaper`] (recovers expired leases) and
//! [`Engine::run_pruner`] (retention). [`Engine::start`] spawns all four for standalone use;
//! stop them after [`Engine::shutdown`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::{Future, poll_fn};
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{Notify, broadcast, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Error, Result};
use crate::handler::{ErasedHandler, TaskContext, TaskFailure, TaskHandler};
use crate::model::{
    FailureKind, IdMap, Interruption, NewTask, Priority, Status, Task, TaskError, TaskId, Timestamp,
};
use crate::store::apply::settle;
use crate::store::{
    ClaimRequest, Command, Finish, Heartbeat, ListFilter, Outcome, Page, PageRequest,
    ProgressUpdate, Recover, Stats, Store, Submitted,
};

/// The engine's settings.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The most tasks running at once.
    pub concurrency: usize,
    /// Per-type limits on tasks running at once.
    pub type_limits: HashMap<String, usize>,
    /// How long a claimed attempt's lease lasts without renewal.
    pub lease: Duration,
    /// How often running attempts' leases are renewed (well below `lease`).
    pub heartbeat_interval: Duration,
    /// How often the lease reaper looks for expired leases.
    pub reaper_interval: Duration,
    /// How long terminal tasks are kept; `None` keeps them forever.
    pub retention: Option<Duration>,
    /// How often the pruner runs.
    pub prune_interval: Duration,
    /// The largest result, serialized as JSON.
    pub max_result_bytes: usize,
    /// How long a cancelled handler may take to return before its future is dropped.
    pub cancel_grace: Duration,
    /// How often an idle dispatcher looks at the store even without a wake-up (a safety net).
    pub idle_poll: Duration,
    /// Whether every task found running at start belongs to a dead process (true for a store
    /// that one process owns, such as the SQLite store) and is recovered at once.
    pub recover_running_at_start: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            concurrency: 16,
            type_limits: HashMap::new(),
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
            reaper_interval: Duration::from_secs(5),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            prune_interval: Duration::from_secs(60),
            max_result_bytes: 1 << 20,
            cancel_grace: Duration::from_secs(5),
            idle_poll: Duration::from_secs(1),
            recover_running_at_start: true,
        }
    }
}

/// A change of a task, as published on [`Engine::subscribe`].
#[derive(Clone, Debug, PartialEq)]
pub enum TaskEvent {
    /// The task moved to `status`.
    Status {
        /// The task.
        id: TaskId,
        /// Its new status.
        status: Status,
        /// Its attempt number.
        attempt: u32,
    },
    /// A running attempt reported progress.
    Progress {
        /// The task.
        id: TaskId,
        /// From 0.0 to 1.0.
        progress: f64,
        /// The handler's words.
        message: Option<String>,
    },
}

impl TaskEvent {
    /// The task the event is about.
    pub fn task_id(&self) -> TaskId {
        match self {
            TaskEvent::Status { id, .. } | TaskEvent::Progress { id, .. } => *id,
        }
    }
}

/// Builds an [`Engine`]: register handlers, then [`EngineBuilder::build`].
pub struct EngineBuilder {
    store: Arc<dyn Store>,
    handlers: HashMap<String, Registered>,
    config: EngineConfig,
}

impl EngineBuilder {
    /// Registers the handler of a task type (replacing any earlier one).
    pub fn handler(mut self, task_type: impl Into<String>, handler: impl TaskHandler) -> Self {
        let task_type: String = task_type.into();
        let registered = Registered {
            name: Arc::from(task_type.as_str()),
            handler: Arc::new(handler),
        };
        self.handlers.insert(task_type, registered);
        self
    }

    /// Sets the configuration.
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Builds the engine, first recovering tasks left running by a dead process when the config
    /// says so. The engine runs nothing until its loops run ([`Engine::start`]).
    pub async fn build(self) -> Result<Engine> {
        let config = self.config;
        if config.concurrency == 0 {
            return Err(Error::InvalidInput {
                field: "concurrency",
                message: "must be at least 1".into(),
            });
        }
        let (events, _) = broadcast::channel(4_096);
        let inner = Arc::new(Inner {
            store: self.store,
            handlers: self.handlers,
            concurrency: AtomicUsize::new(config.concurrency),
            limits: Mutex::new(Limits {
                type_limits: config.type_limits.clone(),
                paused_types: HashSet::new(),
            }),
            config,
            running: Mutex::new(Running::default()),
            slots_taken: AtomicUsize::new(0),
            finishing: AtomicUsize::new(0),
            queue_paused: AtomicBool::new(false),
            gathering: AtomicBool::new(false),
            stop_deadline: Mutex::new(None),
            accepting: AtomicBool::new(true),
            draining: CancellationToken::new(),
            drain_started: AtomicBool::new(false),
            wake: Notify::new(),
            wakes: AtomicU64::new(0),
            idle: Notify::new(),
            next_due: AtomicI64::new(0),
            events,
            waiters: Mutex::new(IdMap::default()),
            waiter_count: AtomicUsize::new(0),
            workers: TaskTracker::new(),
            leases_lost: AtomicU64::new(0),
            ahead: Mutex::new(Ahead {
                tasks: VecDeque::new(),
                moved: Instant::now(),
            }),
            ahead_len: AtomicUsize::new(0),
            ahead_on: AtomicBool::new(false),
            ahead_low: AtomicUsize::new(0),
            recent_run_us: AtomicU64::new(u64::MAX),
            ahead_stale: AtomicBool::new(false),
        });
        if inner.config.recover_running_at_start {
            let recovered = inner
                .store
                .recover(Timestamp::now(), Recover::AllRunning)
                .await?;
            if !recovered.is_empty() {
                tracing::warn!(
                    count = recovered.len(),
                    "recovered tasks left running by a previous process"
                );
            }
            inner.after_recovery(&recovered);
        }
        Ok(Engine { inner })
    }
}

/// The task engine. Cheap to clone: clones share one engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// The report of a graceful shutdown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Tasks that were running when the shutdown began.
    pub running_at_start: usize,
    /// Tasks still running at the deadline, cancelled and put back in the queue.
    pub interrupted: usize,
    /// How long the shutdown took.
    pub duration: Duration,
}

/// The engine's loops, spawned by [`Engine::start`].
pub struct EngineLoops {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl EngineLoops {
    /// Stops the loops and waits for them.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

impl Engine {
    /// Starts building an engine on a store.
    pub fn builder(store: Arc<dyn Store>) -> EngineBuilder {
        EngineBuilder {
            store,
            handlers: HashMap::new(),
            config: EngineConfig::default(),
        }
    }

    /// The store the engine runs on.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The registered task types, sorted.
    pub fn task_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.inner.handlers.keys().cloned().collect();
        types.sort();
        types
    }

    /// Spawns the heartbeat, the dispatcher, the lease reaper and the pruner on the current Tokio
    /// runtime, each restarted after an error (with a pause), for use without a supervisor.
    pub fn start(&self) -> EngineLoops {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let loops: [(&str, LoopFn); 4] = [
            ("heartbeat", |e, c| {
                Box::pin(async move { e.run_heartbeat(c).await })
            }),
            ("dispatcher", |e, c| {
                Box::pin(async move { e.run_dispatcher(c).await })
            }),
            ("lease reaper", |e, c| {
                Box::pin(async move { e.run_lease_reaper(c).await })
            }),
            ("pruner", |e, c| {
                Box::pin(async move { e.run_pruner(c).await })
            }),
        ];
        for (name, run) in loops {
            let engine = self.clone();
            let cancel = cancel.clone();
            tracker.spawn(async move {
                while !cancel.is_cancelled() {
                    match run(engine.clone(), cancel.clone()).await {
                        Ok(()) => break,
                        Err(error) => {
                            tracing::error!(loop_name = name, %error, "engine loop failed; restarting in 1 s");
                            tokio::select! {
                                _ = cancel.cancelled() => break,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            }
                        }
                    }
                }
            });
        }
        EngineLoops { cancel, tracker }
    }

    /// Submits one task.
    pub async fn submit(&self, task: NewTask) -> Result<Submitted> {
        let mut submitted = self.submit_many(vec![task]).await?;
        submitted
            .pop()
            .ok_or_else(|| Error::store("submitting", "the store answered nothing"))
    }

    /// Submits tasks in one store request (one transaction in the SQL stores).
    pub async fn submit_many(&self, tasks: Vec<NewTask>) -> Result<Vec<Submitted>> {
        let inner = &self.inner;
        if !inner.accepting.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        let now = Timestamp::now();
        let mut records = Vec::with_capacity(tasks.len());
        for task in tasks {
            inner.validate(&task)?;
            records.push(task.into_task(TaskId::new(), now));
        }
        // When slots are free, the submission claims in the same store request: the task starts
        // one commit after it is accepted instead of two.
        let reserved = inner.reserve_for_submit(records.len());
        let (submitted, claimed) = if reserved > 0 {
            let request = inner.claim_request(reserved, now);
            match inner.store.submit_and_claim(records, request).await {
                Ok(answer) => answer,
                Err(error) => {
                    inner.release(reserved);
                    return Err(error);
                }
            }
        } else {
            (inner.store.submit(records).await?, Vec::new())
        };
        if inner.release_unused(reserved, claimed.len()) {
            inner.wake_dispatcher();
        }
        let mut any_queued = false;
        for entry in submitted.iter().filter(|s| s.created) {
            let task = &entry.task;
            match (task.status, task.run_at) {
                (Status::Scheduled, Some(at)) => inner.note_due(at),
                _ => any_queued = true,
            }
            inner.publish(TaskEvent::Status {
                id: task.id,
                status: task.status,
                attempt: 0,
            });
        }
        for task in claimed {
            inner.start(task);
        }
        if any_queued {
            inner.wake_dispatcher();
        }
        Ok(submitted)
    }

    /// One task.
    pub async fn get(&self, id: TaskId) -> Result<Task> {
        self.inner
            .store
            .get(id)
            .await?
            .ok_or(Error::TaskNotFound { id })
    }

    /// A page of tasks, newest first.
    pub async fn list(&self, filter: ListFilter, page: PageRequest) -> Result<Page> {
        self.inner.store.list(filter, page).await
    }

    /// Counts by status and type.
    pub async fn stats(&self) -> Result<Stats> {
        self.inner.store.stats().await
    }

    /// Cancels a task. A task that has not started is cancelled at once; a running one is asked
    /// to stop (its handler's token is cancelled) and becomes `cancelled` when it has.
    pub async fn cancel(&self, id: TaskId) -> Result<Task> {
        let inner = &self.inner;
        let task = inner
            .store
            .command(id, Command::Cancel, Timestamp::now())
            .await?;
        if task.cancel_requested {
            // Running (or frozen): its attempt stops, thawed first, and records the cancel.
            inner.set_paused(id, false);
            inner.stop_running(id, StopReason::Cancelled);
        } else {
            inner.publish(TaskEvent::Status {
                id,
                status: task.status,
                attempt: task.attempt,
            });
            inner.wake_waiters(id);
        }
        Ok(task)
    }

    /// Holds a queued or scheduled task until it is resumed; a running one is frozen: its
    /// handler is told (see [`TaskContext::paused`]), its timeout clock stops, and its attempt
    /// keeps the task until it is resumed.
    pub async fn pause_task(&self, id: TaskId) -> Result<Task> {
        let task = self
            .inner
            .store
            .command(id, Command::Pause, Timestamp::now())
            .await?;
        if task.status == Status::Paused && task.lease_until.is_some() {
            self.inner.set_paused(id, true);
        }
        self.inner.publish(TaskEvent::Status {
            id,
            status: task.status,
            attempt: task.attempt,
        });
        Ok(task)
    }

    /// Releases a paused task: back to the queue, or scheduled if its `run_at` is still ahead.
    pub async fn resume_task(&self, id: TaskId) -> Result<Task> {
        let task = self
            .inner
            .store
            .command(id, Command::Resume, Timestamp::now())
            .await?;
        if task.status == Status::Running {
            // It was frozen: its attempt goes on.
            self.inner.set_paused(id, false);
        }
        if let (Status::Scheduled, Some(at)) = (task.status, task.run_at) {
            self.inner.note_due(at);
        }
        self.inner.publish(TaskEvent::Status {
            id,
            status: task.status,
            attempt: task.attempt,
        });
        self.inner.wake_dispatcher();
        Ok(task)
    }

    /// Changes the priority of a task that has not started yet: queued, scheduled, or paused
    /// before it started. Its status stays; a queued task takes its new place in the claim order
    /// at once (the dispatcher is woken to claim by it). Returns the task as it now is.
    ///
    /// A task that has started (running, or paused while running) or finished keeps its
    /// priority: that is an [`Error::IllegalTransition`] that says its status.
    pub async fn set_priority(&self, id: TaskId, priority: Priority) -> Result<Task> {
        let task = self
            .inner
            .store
            .command(id, Command::SetPriority(priority), Timestamp::now())
            .await?;
        if task.status == Status::Queued {
            self.inner.wake_dispatcher();
        }
        Ok(task)
    }

    /// Stops starting tasks (running ones go on).
    pub fn pause_queue(&self) {
        self.inner.queue_paused.store(true, Ordering::Release);
        self.inner.hold_ahead();
    }

    /// Starts tasks again.
    pub fn resume_queue(&self) {
        self.inner.queue_paused.store(false, Ordering::Release);
        self.inner.wake_dispatcher();
    }

    /// Whether the queue is paused.
    pub fn is_queue_paused(&self) -> bool {
        self.inner.queue_paused.load(Ordering::Acquire)
    }

    /// Stops starting tasks of one type.
    pub fn pause_type(&self, task_type: &str) {
        self.inner
            .limits()
            .paused_types
            .insert(task_type.to_owned());
        self.inner.hold_ahead();
    }

    /// Starts tasks of one type again.
    pub fn resume_type(&self, task_type: &str) {
        self.inner.limits().paused_types.remove(task_type);
        self.inner.wake_dispatcher();
    }

    /// The paused types, sorted.
    pub fn paused_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self.inner.limits().paused_types.iter().cloned().collect();
        types.sort();
        types
    }

    /// Sets the most tasks running at once (at least 1).
    pub fn set_concurrency(&self, concurrency: usize) {
        self.inner
            .concurrency
            .store(concurrency.max(1), Ordering::Release);
        self.inner.wake_dispatcher();
    }

    /// The most tasks running at once.
    pub fn concurrency(&self) -> usize {
        self.inner.concurrency.load(Ordering::Acquire)
    }

    /// Sets (or with `None` removes) the limit of one type's tasks running at once.
    pub fn set_type_limit(&self, task_type: &str, limit: Option<usize>) {
        let mut limits = self.inner.limits();
        match limit {
            Some(limit) => limits.type_limits.insert(task_type.to_owned(), limit),
            None => limits.type_limits.remove(task_type),
        };
        drop(limits);
        self.inner.hold_ahead();
    }

    /// The limits of single types' tasks running at once ([`Engine::set_type_limit`]), sorted
    /// by type.
    pub fn type_limits(&self) -> Vec<(String, usize)> {
        let mut limits: Vec<(String, usize)> = self
            .inner
            .limits()
            .type_limits
            .iter()
            .map(|(t, n)| (t.clone(), *n))
            .collect();
        limits.sort();
        limits
    }

    /// Wakes the dispatcher to claim at once: for a store shared with other processes, whose
    /// tasks become claimable without this engine knowing (see
    /// [`crate::store::Store::wakeups`], [`crate::store::postgres::PostgresStore::run_wakeups`]).
    pub fn wake(&self) {
        self.inner.wake_dispatcher();
    }

    /// Tells the dispatcher that a scheduled task is due at `at`, so that it promotes due tasks
    /// then: for a store shared with other processes, whose scheduled tasks this engine did not
    /// submit.
    pub fn note_due(&self, at: Timestamp) {
        self.inner.note_due(at);
    }

    /// How the store is doing (see [`Store::health`]).
    pub fn store_health(&self) -> crate::store::StoreHealth {
        self.inner.store.health()
    }

    /// The nodes sharing the engine's store and the state of its database
    /// ([`Store::cluster_status`]); `None` for a store one process owns.
    pub async fn cluster_status(&self) -> Result<Option<crate::store::ClusterStatus>> {
        self.inner.store.cluster_status().await
    }

    /// The number of tasks this engine is running now.
    pub fn running_count(&self) -> usize {
        self.inner.lock_running().tasks.len()
    }

    /// Every status and progress change from now on. A receiver that falls behind by more than
    /// 4,096 events loses the oldest (and is told so by the channel).
    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.inner.events.subscribe()
    }

    /// Waits until the task is terminal or `timeout` has passed, and returns it as it then is
    /// (check its status to know which). Waits on events, never by polling the store.
    pub async fn wait(&self, id: TaskId, timeout: Duration) -> Result<Task> {
        let inner = &self.inner;
        // Registered before the first read, so that an end between the read and the wait is
        // not missed; forgotten however this function ends (even if its future is dropped).
        let _forget = ForgetWaiter { inner, id };
        let receiver = inner.add_waiter(id);
        let task = self.get(id).await?;
        if task.status.is_terminal() {
            return Ok(task);
        }
        let _ = tokio::time::timeout(timeout, receiver).await;
        self.get(id).await
    }

    /// The estimated time until the task finishes: from the observed progress rate of a running
    /// task; else from the median duration of recent tasks of its kind (the same type and the
    /// same parameters: a `command` task's history is that of the same command); `None` when
    /// nothing fits (no progress and no such history, or a run already longer than it).
    pub fn eta(&self, task: &Task) -> Option<Duration> {
        let now = Timestamp::now();
        let typical = || {
            self.inner
                .median_duration(kind_of(&task.task_type, &task.params))
        };
        match task.status {
            Status::Completed | Status::Failed | Status::Cancelled => Some(Duration::ZERO),
            Status::Paused => None,
            Status::Running => {
                let elapsed = now.since(task.started_at.unwrap_or(now));
                // A rate from a sliver of progress says little (and could overflow a duration).
                match task.progress {
                    Some(p) if p >= 0.001 => {
                        Duration::try_from_secs_f64(elapsed.as_secs_f64() * (1.0 - p).max(0.0) / p)
                            .ok()
                    }
                    // Past the typical duration, the history no longer fits this run: unknown,
                    // rather than "0 s left" for as long as it runs.
                    _ => typical().and_then(|d| d.checked_sub(elapsed)),
                }
            }
            Status::Queued => typical(),
            Status::Scheduled => {
                let wait = task.run_at.map_or(Duration::ZERO, |at| at.since(now));
                typical().map(|d| d + wait)
            }
        }
    }

    /// Claims and starts tasks whenever there is room, until `cancel` fires or the engine
    /// drains. Up to two claims run at once (one while per-type limits apply): slots that free
    /// while a claim is in flight are claimed for at once, rather than after it returns, so
    /// that a store that commits in groups takes both in one.
    ///
    /// While handlers run short, it also claims ahead of the workers (up to 16 tasks per slot,
    /// 256 at most): a slot that frees then starts a claimed task at once. Tasks claimed ahead
    /// are given back to the queue when the queue or a type is paused, per-type limits are set,
    /// none of them has started for 20 ms (the slots are held by long runs), or the dispatcher
    /// stops.
    pub async fn run_dispatcher(&self, cancel: CancellationToken) -> Result<()> {
        let inner = &self.inner;
        // Promote whatever became due while no dispatcher ran.
        inner.next_due.store(0, Ordering::Release);
        // While tasks run and few slots are free, a claim waits briefly for more slots to free,
        // so that a saturated engine claims in batches rather than one task per completion.
        let mut gather_until: Option<tokio::time::Instant> = None;
        // Each claim in flight, with the slots it reserved and the tasks it asked for beyond
        // them (to wait in `ahead`).
        let mut claims: tokio::task::JoinSet<(usize, usize, Result<Vec<Task>>)> =
            tokio::task::JoinSet::new();
        // The count of wake-ups when the last claim began (see `Inner::wakes`).
        let mut wakes_at_claim = 0;
        // Tasks asked for to wait in `ahead` by the claims in flight.
        let mut ahead_asked = 0;
        // Whether to claim when there is room: not after a claim found fewer tasks than it
        // asked for, until something wakes the dispatcher (a submission, a freed slot, the poll).
        let mut may_claim = true;
        // The promotion of due scheduled tasks in flight, if any: it runs beside the claims
        // rather than before them, so that a claim does not wait behind a slow store request
        // (a prune that went to the store just before it, say).
        let mut promoting: Option<tokio::task::JoinHandle<Result<crate::store::Promoted>>> = None;
        let outcome = loop {
            inner.gathering.store(false, Ordering::Release);
            let mut woken = pin!(inner.wake.notified());
            woken.as_mut().enable();
            if cancel.is_cancelled() || inner.drain_started.load(Ordering::Acquire) {
                break Ok(());
            }
            let now = Timestamp::now();
            if promoting.is_none() && inner.next_due.load(Ordering::Acquire) <= now.0 {
                inner.next_due.store(i64::MAX, Ordering::Release);
                let store = Arc::clone(&inner.store);
                promoting = Some(tokio::spawn(async move { store.promote_due(now).await }));
            }
            let ahead_target = inner.ahead_target();
            inner.ahead_on.store(ahead_target > 0, Ordering::Release);
            inner
                .ahead_low
                .store(ahead_target.div_ceil(2), Ordering::Release);
            let stalled_since = inner.ahead_stalled_since();
            if let Some(since) = stalled_since
                && (ahead_target == 0 || since.elapsed() >= AHEAD_MAX_WAIT)
            {
                if ahead_target > 0 {
                    inner.ahead_stale.store(true, Ordering::Release);
                }
                inner.give_back_ahead().await;
                continue;
            }
            let free = inner.free_slots();
            let want_ahead =
                ahead_target.saturating_sub(inner.ahead_len.load(Ordering::Acquire) + ahead_asked);
            let refill = ahead_target > 0 && want_ahead >= ahead_target.div_ceil(2);
            let gathering = ahead_target == 0
                && free > 0
                && free < inner.claim_batch()
                && inner.slots_taken.load(Ordering::Acquire) > 0
                && tokio::time::Instant::now()
                    < *gather_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + CLAIM_GATHER);
            let room_for_a_claim = claims.len()
                < if inner.limits().type_limits.is_empty() {
                    CLAIMS_IN_FLIGHT
                } else {
                    1
                };
            if (free > 0 && !gathering || refill)
                && may_claim
                && room_for_a_claim
                && !inner.queue_paused.load(Ordering::Acquire)
            {
                gather_until = None;
                let reserved = inner.reserve(free);
                let extra = if ahead_target > 0 { want_ahead } else { 0 };
                if reserved + extra > 0 {
                    ahead_asked += extra;
                    wakes_at_claim = inner.wakes.load(Ordering::Acquire);
                    // The request is made as the claim starts, not now: a queue or type paused
                    // or limited meanwhile is left alone.
                    let claiming = Arc::clone(inner);
                    claims.spawn(async move {
                        if claiming.queue_paused.load(Ordering::Acquire) {
                            return (reserved, extra, Ok(Vec::new()));
                        }
                        let request = claiming.claim_request(reserved + extra, Timestamp::now());
                        (reserved, extra, claiming.store.claim(request).await)
                    });
                    continue;
                }
            }
            let next_due = inner.next_due.load(Ordering::Acquire);
            let poll_at = Timestamp::now()
                .after(inner.config.idle_poll)
                .0
                .min(next_due);
            let sleep_for = Duration::from_millis((poll_at - Timestamp::now().0).max(0) as u64);
            let mut wake_at = tokio::time::Instant::now() + sleep_for;
            if gathering && let Some(until) = gather_until {
                wake_at = wake_at.min(until);
                inner.gathering.store(true, Ordering::Release);
            }
            if let Some(since) = stalled_since {
                wake_at = wake_at.min((since + AHEAD_MAX_WAIT).into());
            }
            tokio::select! {
                _ = cancel.cancelled() => break Ok(()),
                _ = inner.draining.cancelled() => break Ok(()),
                Some(joined) = claims.join_next(), if !claims.is_empty() => {
                    let asked = joined.as_ref().map_or(0, |(_, extra, _)| *extra);
                    ahead_asked = if claims.is_empty() { 0 } else { ahead_asked.saturating_sub(asked) };
                    match inner.claimed(joined) {
                        Ok(full) => {
                            may_claim =
                                full || inner.wakes.load(Ordering::Acquire) != wakes_at_claim;
                        }
                        Err(error) => break Err(error),
                    }
                }
                promoted = async {
                    match promoting.as_mut() {
                        Some(promotion) => promotion.await,
                        None => std::future::pending().await,
                    }
                }, if promoting.is_some() => {
                    promoting = None;
                    match promoted {
                        Ok(Ok(promoted)) => {
                            if let Some(at) = promoted.next_due {
                                inner.note_due(at);
                            }
                            if promoted.count > 0 {
                                // As a wake-up: a claim in flight may have been made before
                                // the promotion, and must not stop the next one.
                                inner.wake_dispatcher();
                                may_claim = true;
                            }
                        }
                        Ok(Err(error)) => break Err(error),
                        Err(error) => break Err(Error::Store {
                            action: "promoting due tasks",
                            message: format!("the promotion's task ended abnormally: {error}"),
                        }),
                    }
                }
                _ = woken => may_claim = true,
                _ = tokio::time::sleep_until(wake_at) => may_claim = true,
            }
        };
        // A promotion in flight goes on without the dispatcher (its handle is dropped, not
        // aborted): what it promotes is claimed by the next one.
        inner.ahead_on.store(false, Ordering::Release);
        // Claims still in flight: their tasks are leased to this engine. While it drains, or
        // when only this loop stops, they are given back with those waiting in `ahead`.
        while let Some(joined) = claims.join_next().await {
            if let Err(error) = inner.claimed(joined) {
                tracing::warn!(%error, "a claim in flight as the dispatcher stopped failed");
            }
        }
        inner.give_back_ahead().await;
        outcome
    }

    /// Renews the leases of this engine's running attempts every `heartbeat_interval`, and stops
    /// those that lost their lease or were cancelled elsewhere, until `cancel` fires. It goes on
    /// while the engine drains, so that tasks finishing during a shutdown keep their leases: stop
    /// it after [`Engine::shutdown`].
    pub async fn run_heartbeat(&self, cancel: CancellationToken) -> Result<()> {
        let inner = &self.inner;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(inner.config.heartbeat_interval) => {}
            }
            inner.heartbeat().await?;
        }
    }

    /// Recovers the tasks whose lease expired (their worker died), every `reaper_interval`,
    /// until `cancel` fires.
    pub async fn run_lease_reaper(&self, cancel: CancellationToken) -> Result<()> {
        loop {
            self.recover_expired().await?;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.inner.config.reaper_interval) => {}
            }
        }
    }

    /// One round of the lease reaper: recovers the tasks whose lease expired (retried, or
    /// failed when out of attempts). Returns how many. For a supervisor that runs the loop
    /// itself, every [`EngineConfig::reaper_interval`].
    pub async fn recover_expired(&self) -> Result<usize> {
        let inner = &self.inner;
        let recovered = inner
            .store
            .recover(Timestamp::now(), Recover::Expired)
            .await?;
        if !recovered.is_empty() {
            tracing::warn!(
                count = recovered.len(),
                "recovered tasks whose lease expired"
            );
        }
        inner.after_recovery(&recovered);
        Ok(recovered.len())
    }

    /// One round of the heartbeat: renews the leases of this engine's running attempts and
    /// stops those that lost theirs. For a supervisor that runs the loop itself, every
    /// [`EngineConfig::heartbeat_interval`].
    pub async fn renew_leases(&self) -> Result<()> {
        self.inner.heartbeat().await
    }

    /// One round of the pruner: deletes terminal tasks older than the retention period (none
    /// when retention is off). Returns how many.
    pub async fn prune_expired(&self) -> Result<usize> {
        match self.inner.config.retention {
            Some(retention) => self.prune_older_than(retention).await,
            None => Ok(0),
        }
    }

    /// How many of this engine's running attempts were stopped because their lease was lost
    /// (the store gave the task to another attempt, or the lease ran out unrenewed) since it
    /// started. Attempts that ended while a heartbeat was under way are not counted.
    pub fn leases_lost(&self) -> u64 {
        self.inner.leases_lost.load(Ordering::Relaxed)
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Deletes terminal tasks older than the retention period, every `prune_interval`, until
    /// `cancel` fires. Does nothing when retention is `None`.
    pub async fn run_pruner(&self, cancel: CancellationToken) -> Result<()> {
        loop {
            self.prune_expired().await?;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(self.inner.config.prune_interval) => {}
            }
        }
    }

    /// Deletes terminal tasks that finished longer than `age` ago. Returns how many.
    pub async fn prune_older_than(&self, age: Duration) -> Result<usize> {
        const BATCH: usize = 1_000;
        let before = Timestamp(Timestamp::now().0.saturating_sub(age.as_millis() as i64));
        let mut total = 0;
        loop {
            let pruned = self.inner.store.prune(before, BATCH).await?;
            total += pruned;
            if pruned < BATCH {
                return Ok(total);
            }
        }
    }

    /// Deletes up to `limit` finished tasks (completed, failed or cancelled) that match `filter`
    /// and finished before `finished_before`, those that finished first first. Returns how many.
    ///
    /// For cleaning up on request (one owner's or one session's finished tasks, say), apart from
    /// the retention pruner. Tasks that have not finished are never deleted, even when
    /// `filter.statuses` names their status (such a status matches nothing); an empty filter
    /// matches the finished tasks of every owner, so set `filter.owner` to clean up after one
    /// owner only. The deletion goes to the store in batches of at most 1,000, each its own
    /// request, so that a large cleanup does not hold up other writes; a failure part-way
    /// leaves the batches before it deleted.
    pub async fn delete_finished(
        &self,
        filter: ListFilter,
        finished_before: Timestamp,
        limit: usize,
    ) -> Result<usize> {
        const BATCH: usize = 1_000;
        let mut total = 0;
        while total < limit {
            let batch = (limit - total).min(BATCH);
            let deleted = self
                .inner
                .store
                .delete_finished(filter.clone(), finished_before, batch)
                .await?;
            total += deleted;
            if deleted < batch {
                break;
            }
        }
        Ok(total)
    }

    /// Gives every task of owner `from` to owner `to` (see [`Store::reassign_owner`]): for an
    /// owner that was renamed. Returns how many moved; a task whose idempotency key `to`
    /// already holds stays with `from`. One write, whatever the number of tasks.
    pub async fn reassign_owner(&self, from: &str, to: &str) -> Result<u64> {
        self.inner.store.reassign_owner(from, to).await
    }

    /// Stops gracefully: refuses new tasks, stops starting queued ones, lets running tasks finish
    /// until `deadline` minus the cancel grace, then cancels the rest (they go back to the queue
    /// for the next start, their attempt not counted), and flushes the store.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let inner = &self.inner;
        let started = Instant::now();
        // Handlers still running are dropped a margin before the deadline, so that their
        // attempts can still be recorded as interrupted; before that they get the cancel grace
        // (or what is left of it).
        let margin = (deadline / 10).min(Duration::from_millis(250));
        let abort_by = started + deadline.saturating_sub(margin);
        *lock(&inner.stop_deadline) = Some(abort_by);
        inner.accepting.store(false, Ordering::Release);
        inner.drain_started.store(true, Ordering::Release);
        inner.draining.cancel();
        inner.ahead_on.store(false, Ordering::Release);
        // Tasks claimed ahead never started: they go back to the queue as they were.
        inner.give_back_ahead().await;
        let running_at_start = inner.lock_running().tasks.len();
        let drain_until = abort_by
            .checked_sub(inner.config.cancel_grace)
            .map_or(started, |at| at.max(started));
        loop {
            let idle = inner.idle.notified();
            if inner.slots_taken.load(Ordering::Acquire) == 0
                && inner.finishing.load(Ordering::Acquire) == 0
            {
                break;
            }
            if tokio::time::timeout_at(drain_until.into(), idle)
                .await
                .is_err()
            {
                break;
            }
        }
        // What claims in flight brought meanwhile.
        inner.give_back_ahead().await;
        let left: Vec<TaskId> = inner.lock_running().tasks.keys().copied().collect();
        for id in &left {
            inner.stop_running(*id, StopReason::Shutdown);
        }
        inner.workers.close();
        let _ = tokio::time::timeout_at((started + deadline).into(), inner.workers.wait()).await;
        if let Err(error) = inner.store.flush().await {
            tracing::error!(%error, "flushing the store at shutdown failed");
        }
        ShutdownReport {
            running_at_start,
            interrupted: left.len(),
            duration: started.elapsed(),
        }
    }
}

type LoopFn =
    fn(Engine, CancellationToken) -> std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// The slot of a running attempt, given back when the attempt ends however it ends.
struct AttemptSlot<'a> {
    inner: &'a Arc<Inner>,
    id: TaskId,
    completed_in: Option<Duration>,
    /// Whether the slot was given back when the handler ended, before the end was recorded
    /// ([`Inner::finish_early`]).
    given_back: bool,
}

impl Drop for AttemptSlot<'_> {
    fn drop(&mut self) {
        self.inner
            .end_attempt(self.id, self.completed_in, self.given_back);
    }
}

/// Forgets a `wait`'s waiter when the wait ends.
struct ForgetWaiter<'a> {
    inner: &'a Inner,
    id: TaskId,
}

impl Drop for ForgetWaiter<'_> {
    fn drop(&mut self) {
        self.inner.forget_closed_waiters(self.id);
    }
}

/// Why a running attempt is being stopped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum StopReason {
    None = 0,
    Cancelled = 1,
    TimedOut = 2,
    LeaseLost = 3,
    Shutdown = 4,
}

impl StopReason {
    fn from_u8(value: u8) -> StopReason {
        match value {
            1 => StopReason::Cancelled,
            2 => StopReason::TimedOut,
            3 => StopReason::LeaseLost,
            4 => StopReason::Shutdown,
            _ => StopReason::None,
        }
    }
}

/// A registered handler, with its type name shared by every attempt it runs.
#[derive(Clone)]
struct Registered {
    name: Arc<str>,
    handler: Arc<dyn ErasedHandler>,
}

/// The attempts this engine runs, and the recent durations of completed ones (one lock for both:
/// an attempt's end touches both).
#[derive(Default)]
struct Running {
    tasks: IdMap<RunningTask>,
    /// By kind (see [`kind_of`]), at most [`DURATION_KINDS`] of them.
    durations: HashMap<u64, VecDeque<Duration>>,
}

impl Running {
    fn record_duration(&mut self, kind: u64, duration: Duration) {
        if !self.durations.contains_key(&kind)
            && self.durations.len() >= DURATION_KINDS
            && let Some(evicted) = self.durations.keys().next().copied()
        {
            self.durations.remove(&evicted);
        }
        let window = self.durations.entry(kind).or_default();
        if window.len() == DURATION_WINDOW {
            window.pop_front();
        }
        window.push_back(duration);
    }
}

struct RunningTask {
    attempt: u32,
    /// Its kind, for the ETA (see [`kind_of`]).
    kind: u64,
    task_type: Arc<str>,
    control: Arc<Control>,
}

pub(crate) struct Control {
    /// The attempt's cancellation token, made when its handler first asks for it
    /// ([`Control::token`]): most short handlers never do, and a token is an allocation with a
    /// lock. Cancelled by [`Control::stop`] once both exist.
    cancel: std::sync::OnceLock<CancellationToken>,
    /// Woken by [`Control::stop`], for the engine's own wait (see [`Control::stopped`]).
    stop_notify: Notify,
    /// `true` while the task is paused (frozen) as it runs.
    paused: AtomicBool,
    /// Follows `paused` for those who wait for its changes, made when the first of them asks
    /// (most attempts have no timeout and a handler that does not follow pauses: a channel
    /// made and dropped for each would be a good part of a short task's cost).
    pause: std::sync::OnceLock<tokio::sync::watch::Sender<bool>>,
    reason: AtomicU8,
    /// Set by a cancel even when the attempt was already stopping for another reason: a
    /// cancelled task is not retried or re-queued, whatever stopped its attempt.
    cancel_requested: AtomicBool,
    /// Set once the attempt's end is being recorded: from then on the store may no longer
    /// count it as running, and a heartbeat that says so is not news.
    finishing: AtomicBool,
}

impl Control {
    fn new() -> Control {
        Control {
            cancel: std::sync::OnceLock::new(),
            stop_notify: Notify::new(),
            paused: AtomicBool::new(false),
            pause: std::sync::OnceLock::new(),
            reason: AtomicU8::new(StopReason::None as u8),
            cancel_requested: AtomicBool::new(false),
            finishing: AtomicBool::new(false),
        }
    }

    /// Asks the attempt to stop; the first reason given wins.
    fn stop(&self, reason: StopReason) {
        if reason == StopReason::Cancelled {
            self.cancel_requested.store(true, Ordering::Release);
        }
        let _ = self.reason.compare_exchange(
            StopReason::None as u8,
            reason as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        // With `token`'s fence: a token made meanwhile sees the reason, or is seen here.
        std::sync::atomic::fence(Ordering::SeqCst);
        if let Some(token) = self.cancel.get() {
            token.cancel();
        }
        self.stop_notify.notify_waiters();
    }

    /// Pauses (freezes) or resumes the attempt.
    fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        // Orders the store before the look for a channel (the `OnceLock`'s load is only an
        // Acquire): with `pause_receiver`'s fence, one of the two sides sees the other.
        std::sync::atomic::fence(Ordering::SeqCst);
        if let Some(sender) = self.pause.get() {
            self.sync_pause(sender);
        }
    }

    /// Follows whether the attempt is paused (see [`Control::set_paused`]).
    pub(crate) fn pause_receiver(&self) -> tokio::sync::watch::Receiver<bool> {
        let sender = self
            .pause
            .get_or_init(|| tokio::sync::watch::Sender::new(self.paused.load(Ordering::SeqCst)));
        // A pause set between the flag's load above and the channel's making found no channel
        // to tell: the flag is read again now that the channel is there.
        std::sync::atomic::fence(Ordering::SeqCst);
        self.sync_pause(sender);
        sender.subscribe()
    }

    fn sync_pause(&self, sender: &tokio::sync::watch::Sender<bool>) {
        sender.send_if_modified(|value| {
            let now = self.paused.load(Ordering::SeqCst);
            let changed = *value != now;
            *value = now;
            changed
        });
    }

    /// The attempt's cancellation token (made on the first call), cancelled if the attempt was
    /// asked to stop.
    pub(crate) fn token(&self) -> &CancellationToken {
        let token = self.cancel.get_or_init(CancellationToken::new);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.stopping() {
            token.cancel();
        }
        token
    }

    /// Returns once the attempt was asked to stop.
    async fn stopped(&self) {
        loop {
            let notified = self.stop_notify.notified();
            let mut notified = pin!(notified);
            // Registered before the check, so that a stop in between still wakes it.
            notified.as_mut().enable();
            if self.stopping() {
                return;
            }
            notified.await;
        }
    }

    /// Whether the attempt was asked to stop: its token is cancelled, or about to be. An atomic
    /// load, where the token's `is_cancelled` takes a lock.
    pub(crate) fn stopping(&self) -> bool {
        self.reason() != StopReason::None
    }

    pub(crate) fn reason(&self) -> StopReason {
        StopReason::from_u8(self.reason.load(Ordering::Acquire))
    }
}

struct Limits {
    type_limits: HashMap<String, usize>,
    paused_types: HashSet<String>,
}

/// The longest a busy dispatcher waits for more free slots before claiming.
const CLAIM_GATHER: Duration = Duration::from_millis(1);

/// The most claims the dispatcher has in flight at once.
const CLAIMS_IN_FLIGHT: usize = 2;

/// Tasks claimed ahead of the workers, per slot of concurrency, and at most.
const AHEAD_PER_SLOT: usize = 16;
const AHEAD_MAX: usize = 256;

/// Tasks are claimed ahead only while handlers run shorter than this on average: then a slot
/// frees often enough that a claimed-ahead task waits less than a claim takes.
const AHEAD_SHORT_RUN: Duration = Duration::from_millis(2);

/// How long tasks claimed ahead may wait with none of them starting (the slots held by long
/// runs) before the dispatcher gives them back to the queue (where another node, or a later
/// claim, takes them). A buffer that a busy engine drains is not stale, however long it is.
const AHEAD_MAX_WAIT: Duration = Duration::from_millis(20);

/// How many recent durations per type the ETA remembers.
const DURATION_WINDOW: usize = 32;

/// How many kinds of task the ETA remembers durations for.
const DURATION_KINDS: usize = 4096;

/// What counts as the same kind of task for the ETA: the same type and the same parameters.
fn kind_of(task_type: &str, params: &Value) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    /// Feeds serialized JSON to the hasher, with no buffer in between.
    struct Feed<'a>(&'a mut std::collections::hash_map::DefaultHasher);
    impl std::io::Write for Feed<'_> {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            std::hash::Hasher::write(self.0, bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    task_type.hash(&mut hasher);
    // Writing JSON into a hasher cannot fail.
    let _ = serde_json::to_writer(Feed(&mut hasher), params);
    hasher.finish()
}

pub(crate) struct Inner {
    store: Arc<dyn Store>,
    handlers: HashMap<String, Registered>,
    config: EngineConfig,
    concurrency: AtomicUsize,
    limits: Mutex<Limits>,
    running: Mutex<Running>,
    /// Slots taken: running attempts plus slots reserved for claims in flight.
    slots_taken: AtomicUsize,
    /// Attempts whose handler has ended and whose end is being recorded, having given their
    /// slot back early (see [`Inner::finish_early`]): at most `concurrency` of them.
    finishing: AtomicUsize,
    queue_paused: AtomicBool,
    /// Whether the dispatcher sleeps with a gather deadline (see `run_dispatcher`).
    gathering: AtomicBool,
    /// When a shutdown must be over, once one has begun.
    stop_deadline: Mutex<Option<Instant>>,
    accepting: AtomicBool,
    draining: CancellationToken,
    /// Set just before `draining` is cancelled: read on the hot path, where the token's
    /// `is_cancelled` (a lock both workers take) costs more than an atomic load.
    drain_started: AtomicBool,
    wake: Notify,
    /// How many times the dispatcher was woken ([`Inner::wake_dispatcher`]): a claim that came
    /// back short stops the dispatcher claiming only if nothing woke it since the claim began
    /// (a `Notify` keeps one wake-up, so one given while another waits is not seen).
    wakes: AtomicU64,
    idle: Notify,
    next_due: AtomicI64,
    events: broadcast::Sender<TaskEvent>,
    waiters: Mutex<IdMap<Vec<oneshot::Sender<()>>>>,
    waiter_count: AtomicUsize,
    workers: TaskTracker,
    /// Running attempts stopped because their lease was lost.
    leases_lost: AtomicU64,
    /// Tasks claimed ahead of the workers: leased to this engine and among its running
    /// attempts (so that heartbeats renew their leases and commands reach them), each waiting
    /// for a slot. A slot that frees starts the first of them at once, with no store round
    /// trip in between. See [`Inner::ahead_target`].
    ahead: Mutex<Ahead>,
    /// How many tasks wait in `ahead`, read without its lock.
    ahead_len: AtomicUsize,
    /// Whether tasks waiting in `ahead` may start: off while the queue or a type is paused,
    /// per-type limits apply, or the engine drains (the dispatcher then gives them back).
    ahead_on: AtomicBool,
    /// Below how many waiting tasks a slot that starts one wakes the dispatcher to claim more.
    ahead_low: AtomicUsize,
    /// How long recent handlers ran, in microseconds (a moving average; `u64::MAX` until one
    /// has ended): tasks are claimed ahead only while it is short.
    recent_run_us: AtomicU64,
    /// Set when tasks claimed ahead waited too long and were given back: no more are claimed
    /// ahead until a handler ends (the slots are held by long runs meanwhile).
    ahead_stale: AtomicBool,
}

/// The tasks claimed ahead of the workers (see `Inner::ahead`), oldest first.
struct Ahead {
    tasks: VecDeque<AheadTask>,
    /// When one of them last started (or, when none has since, when the oldest was claimed).
    moved: Instant,
}

/// A task claimed ahead of the workers.
struct AheadTask {
    task: Task,
    registered: Option<Registered>,
    control: Arc<Control>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data whole before anything that could panic.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Inner {
    fn limits(&self) -> MutexGuard<'_, Limits> {
        lock(&self.limits)
    }

    fn lock_running(&self) -> MutexGuard<'_, Running> {
        lock(&self.running)
    }

    fn validate(&self, task: &NewTask) -> Result<()> {
        let Some(handler) = self.handlers.get(&task.task_type) else {
            let mut known: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(Error::UnknownTaskType {
                task_type: task.task_type.chars().take(100).collect(),
                known: if known.is_empty() {
                    "(none)".into()
                } else {
                    known.join(", ")
                },
            });
        };
        if let Some(key) = &task.idempotency_key
            && (key.is_empty() || key.len() > 256)
        {
            return Err(Error::InvalidInput {
                field: "idempotency_key",
                message: format!("must be 1 to 256 bytes long, got {}", key.len()),
            });
        }
        if let Err(message) = check_json_depth(&task.params) {
            return Err(Error::InvalidInput {
                field: "params",
                message,
            });
        }
        if let Err(message) = handler.handler.check(&task.params) {
            return Err(Error::InvalidInput {
                field: "params",
                message,
            });
        }
        if task.tags.len() > 32 || task.tags.iter().any(|t| t.is_empty() || t.len() > 128) {
            return Err(Error::InvalidInput {
                field: "tags",
                message: "at most 32 tags, each 1 to 128 bytes long".into(),
            });
        }
        Ok(())
    }

    fn publish(&self, event: TaskEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event);
        }
    }

    fn note_due(&self, at: Timestamp) {
        let previous = self.next_due.fetch_min(at.0, Ordering::AcqRel);
        if at.0 < previous {
            self.wake_dispatcher();
        }
    }

    fn add_waiter(&self, id: TaskId) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut waiters = lock(&self.waiters);
        let list = waiters.entry(id).or_default();
        list.retain(|sender| !sender.is_closed());
        list.push(tx);
        self.waiter_count.store(waiters.len(), Ordering::Release);
        rx
    }

    fn forget_closed_waiters(&self, id: TaskId) {
        let mut waiters = lock(&self.waiters);
        if let Some(list) = waiters.get_mut(&id) {
            list.retain(|sender| !sender.is_closed());
            if list.is_empty() {
                waiters.remove(&id);
            }
        }
        self.waiter_count.store(waiters.len(), Ordering::Release);
    }

    fn wake_waiters(&self, id: TaskId) {
        if self.waiter_count.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut waiters = lock(&self.waiters);
        if let Some(list) = waiters.remove(&id) {
            for sender in list {
                let _ = sender.send(());
            }
        }
        self.waiter_count.store(waiters.len(), Ordering::Release);
    }

    fn after_recovery(&self, recovered: &[Task]) {
        for task in recovered {
            self.publish(TaskEvent::Status {
                id: task.id,
                status: task.status,
                attempt: task.attempt,
            });
            if task.status.is_terminal() {
                self.wake_waiters(task.id);
            }
        }
        if !recovered.is_empty() {
            self.wake_dispatcher();
        }
    }

    /// How many free slots a busy dispatcher waits for (up to [`CLAIM_GATHER`]) before claiming.
    fn claim_batch(&self) -> usize {
        (self.concurrency.load(Ordering::Acquire) / 4).max(1)
    }

    /// Takes up to `want` free slots for tasks about to be claimed; returns how many it took.
    /// Every slot taken is given back by [`Inner::release`]: at the end of the attempt it held,
    /// or at once if the claim found fewer tasks.
    fn reserve(&self, want: usize) -> usize {
        let concurrency = self.concurrency.load(Ordering::Acquire);
        let mut taken = self.slots_taken.load(Ordering::Acquire);
        loop {
            let grant = want.min(concurrency.saturating_sub(taken));
            if grant == 0 {
                return 0;
            }
            match self.slots_taken.compare_exchange_weak(
                taken,
                taken + grant,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return grant,
                Err(seen) => taken = seen,
            }
        }
    }

    /// Slots a submission may claim at once: none while the queue is paused or per-type limits
    /// apply (those are the dispatcher's to count).
    fn reserve_for_submit(&self, tasks: usize) -> usize {
        if self.queue_paused.load(Ordering::Acquire) || !self.limits().type_limits.is_empty() {
            return 0;
        }
        self.reserve(tasks)
    }

    /// Gives back slots taken by [`Inner::reserve`].
    /// Gives back the slots of a reservation that a claim did not fill; says whether any were.
    fn release_unused(&self, reserved: usize, claimed: usize) -> bool {
        let unused = reserved.saturating_sub(claimed);
        self.release(unused);
        unused > 0
    }

    /// Returns how many slots are taken afterwards.
    fn release(&self, slots: usize) -> usize {
        if slots == 0 {
            return self.slots_taken.load(Ordering::Acquire);
        }
        let taken = self.slots_taken.fetch_sub(slots, Ordering::AcqRel) - slots;
        if taken == 0 && self.finishing.load(Ordering::Acquire) == 0 {
            self.idle.notify_waiters();
        }
        taken
    }

    fn free_slots(&self) -> usize {
        self.concurrency
            .load(Ordering::Acquire)
            .saturating_sub(self.slots_taken.load(Ordering::Acquire))
    }

    /// Starts what a claim in flight brought in the slots it reserved, gives back those it did
    /// not fill, and keeps the rest in `ahead` (or starts them, where slots freed meanwhile);
    /// says whether the claim found all it asked for (there may be more to claim). While the
    /// engine drains, nothing starts: every task waits in `ahead` to be given back.
    fn claimed(
        self: &Arc<Self>,
        joined: std::result::Result<(usize, usize, Result<Vec<Task>>), tokio::task::JoinError>,
    ) -> Result<bool> {
        let (reserved, extra, claimed) = joined.map_err(|error| Error::Store {
            action: "claiming tasks",
            message: format!("the claim's task ended abnormally: {error}"),
        })?;
        match claimed {
            Ok(tasks) => {
                let full = tasks.len() >= reserved + extra;
                let draining = self.drain_started.load(Ordering::Acquire);
                let mut tasks = tasks.into_iter();
                let mut started = 0;
                if !draining {
                    for task in tasks.by_ref().take(reserved) {
                        self.start(task);
                        started += 1;
                    }
                }
                self.release(reserved - started);
                for task in tasks {
                    if !draining && self.ahead_on.load(Ordering::Acquire) && self.reserve(1) == 1 {
                        self.start(task);
                    } else {
                        self.park_ahead(task);
                    }
                }
                Ok(full)
            }
            Err(error) => {
                self.release(reserved);
                Err(error)
            }
        }
    }

    /// How many tasks the dispatcher keeps claimed ahead of the workers: none while the queue
    /// or a type is paused, per-type limits apply (their room is counted at each claim), or
    /// handlers do not run short (a claimed task would wait for a slot longer than a claim
    /// takes, and hold a task that another node could run).
    fn ahead_target(&self) -> usize {
        if self.queue_paused.load(Ordering::Acquire)
            || self.drain_started.load(Ordering::Acquire)
            || self.ahead_stale.load(Ordering::Acquire)
            || self.recent_run_us.load(Ordering::Acquire) > AHEAD_SHORT_RUN.as_micros() as u64
        {
            return 0;
        }
        let limits = self.limits();
        if !limits.type_limits.is_empty() || !limits.paused_types.is_empty() {
            return 0;
        }
        drop(limits);
        (self.concurrency.load(Ordering::Acquire) * AHEAD_PER_SLOT).min(AHEAD_MAX)
    }

    /// Wakes the dispatcher: there may be something to claim or to give back.
    fn wake_dispatcher(&self) {
        self.wakes.fetch_add(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Stops starting tasks claimed ahead, and wakes the dispatcher to give them back (a pause,
    /// a per-type limit).
    fn hold_ahead(&self) {
        self.ahead_on.store(false, Ordering::Release);
        self.wake_dispatcher();
    }

    fn lock_ahead(&self) -> MutexGuard<'_, Ahead> {
        lock(&self.ahead)
    }

    /// Since when the tasks claimed ahead have not moved: none of them has started since (and
    /// none was waiting before); `None` when there are none.
    fn ahead_stalled_since(&self) -> Option<Instant> {
        if self.ahead_len.load(Ordering::Acquire) == 0 {
            return None;
        }
        let ahead = self.lock_ahead();
        ahead.tasks.front().map(|_| ahead.moved)
    }

    /// Keeps a claimed task to start when a slot frees: it is among the running attempts from
    /// now on (it holds a lease, which heartbeats renew).
    fn park_ahead(&self, task: Task) {
        let (registered, control) = self.admit(&task);
        let mut ahead = self.lock_ahead();
        if ahead.tasks.is_empty() {
            ahead.moved = Instant::now();
        }
        ahead.tasks.push_back(AheadTask {
            task,
            registered,
            control,
        });
        self.ahead_len.store(ahead.tasks.len(), Ordering::Release);
    }

    /// Starts the oldest task claimed ahead in a slot its caller holds; says whether there was
    /// one to start. Wakes the dispatcher to claim more when few are left.
    fn start_ahead(self: &Arc<Self>) -> bool {
        if self.ahead_len.load(Ordering::Acquire) == 0 || !self.ahead_on.load(Ordering::Acquire) {
            return false;
        }
        let (next, left) = {
            let mut ahead = self.lock_ahead();
            let next = ahead.tasks.pop_front();
            ahead.moved = Instant::now();
            self.ahead_len.store(ahead.tasks.len(), Ordering::Release);
            (next, ahead.tasks.len())
        };
        let Some(next) = next else {
            return false;
        };
        if left < self.ahead_low.load(Ordering::Acquire) {
            self.wake_dispatcher();
        }
        self.spawn_attempt(next.task, next.registered, next.control);
        true
    }

    /// Gives every task claimed ahead back to the queue: they leave the running attempts, and
    /// the store forgets their claims. A store that fails leaves them to the lease reaper.
    async fn give_back_ahead(&self) {
        let waiting: Vec<AheadTask> = {
            let mut ahead = self.lock_ahead();
            self.ahead_len.store(0, Ordering::Release);
            ahead.tasks.drain(..).collect()
        };
        if waiting.is_empty() {
            return;
        }
        let held: Vec<(TaskId, u32)> = {
            let mut running = self.lock_running();
            waiting
                .iter()
                .map(|waiting| {
                    running.tasks.remove(&waiting.task.id);
                    (waiting.task.id, waiting.task.attempt)
                })
                .collect()
        };
        let count = held.len();
        match self.store.release(held, Timestamp::now()).await {
            Ok(released) => {
                tracing::debug!(count, released, "gave back tasks claimed ahead");
                for waiting in &waiting {
                    self.publish(TaskEvent::Status {
                        id: waiting.task.id,
                        status: Status::Queued,
                        attempt: waiting.task.attempt - 1,
                    });
                }
                self.wake_dispatcher();
            }
            Err(error) => {
                tracing::warn!(count, %error, "giving back tasks claimed ahead failed; the lease reaper will take them back");
            }
        }
    }

    fn claim_request(&self, max: usize, now: Timestamp) -> ClaimRequest {
        let limits = self.limits();
        let mut exclude_types: Vec<String> = limits.paused_types.iter().cloned().collect();
        let mut type_room = Vec::new();
        if !limits.type_limits.is_empty() {
            let running = self.lock_running();
            for (task_type, limit) in &limits.type_limits {
                let busy = running
                    .tasks
                    .values()
                    .filter(|r| *r.task_type == **task_type)
                    .count();
                match limit.saturating_sub(busy) {
                    0 => exclude_types.push(task_type.clone()),
                    room => type_room.push((task_type.clone(), room)),
                }
            }
        }
        ClaimRequest {
            max,
            now,
            lease_until: now.after(self.config.lease),
            exclude_types,
            type_room,
        }
    }

    /// Makes a claimed task one of this engine's running attempts, and says so to subscribers.
    fn admit(&self, task: &Task) -> (Option<Registered>, Arc<Control>) {
        let control = Arc::new(Control::new());
        let registered = self.handlers.get(&task.task_type).cloned();
        let task_type = match &registered {
            Some(registered) => Arc::clone(&registered.name),
            None => Arc::from(task.task_type.as_str()),
        };
        self.lock_running().tasks.insert(
            task.id,
            RunningTask {
                attempt: task.attempt,
                kind: kind_of(&task.task_type, &task.params),
                task_type,
                control: Arc::clone(&control),
            },
        );
        self.publish(TaskEvent::Status {
            id: task.id,
            status: Status::Running,
            attempt: task.attempt,
        });
        (registered, control)
    }

    /// Starts a claimed task in a slot its caller holds.
    fn start(self: &Arc<Self>, task: Task) {
        let (registered, control) = self.admit(&task);
        self.spawn_attempt(task, registered, control);
    }

    fn spawn_attempt(
        self: &Arc<Self>,
        task: Task,
        registered: Option<Registered>,
        control: Arc<Control>,
    ) {
        if self.drain_started.load(Ordering::Acquire) {
            // A claim that was in flight when the shutdown began: back to the queue.
            control.stop(StopReason::Shutdown);
        }
        let inner = Arc::clone(self);
        // Boxed: the attempt's future is large (about 1.8 KiB), and Tokio moves a spawned future
        // several times (into its cell, through its stages); moving a box costs a pointer.
        self.workers
            .spawn(Box::pin(inner.run_attempt(task, registered, control)));
    }

    async fn run_attempt(
        self: Arc<Self>,
        mut task: Task,
        registered: Option<Registered>,
        control: Arc<Control>,
    ) {
        let started = Instant::now();
        let id = task.id;
        let attempt = task.attempt;
        // Gives the slot back however this function ends, a panic included.
        let mut slot = AttemptSlot {
            inner: &self,
            id,
            completed_in: None,
            given_back: false,
        };
        let verdict = match registered {
            // Started while the engine drains: it goes back to the queue without running.
            Some(_) if control.stopping() => Verdict::Stopped(None),
            Some(Registered { name, handler }) => {
                let context = TaskContext {
                    id,
                    task_type: name,
                    params: std::mem::take(&mut task.params),
                    attempt,
                    max_attempts: task.max_attempts,
                    session_id: task.session_id.take(),
                    fresh_session: task.fresh_session,
                    owner: task.owner.clone(),
                    control: Arc::clone(&control),
                    engine: Arc::clone(&self),
                };
                let future = handler.start(context);
                self.drive(future, task.timeout, &control).await
            }
            None => Verdict::Rejected(format!(
                "no handler is registered for task type `{}` on this node",
                task.task_type
            )),
        };
        let ran = started.elapsed();
        if !matches!(verdict, Verdict::Rejected(_)) {
            self.note_run(ran);
        }
        let now = Timestamp::now();
        let cancel_requested = control.cancel_requested.load(Ordering::Acquire);
        let outcome = self
            .outcome(&task, verdict, &control, now)
            .map(|outcome| settle(outcome, cancel_requested));
        if let Some(Outcome::Completed { .. }) = outcome {
            slot.completed_in = Some(ran);
        }
        if let Some(outcome) = outcome {
            let status = outcome.status();
            let retry_at = match &outcome {
                Outcome::Failed { retry_at, .. } => *retry_at,
                _ => None,
            };
            let finish = Finish {
                id,
                attempt,
                now,
                outcome,
            };
            // The handler is done: its slot may start the next task while the end is recorded.
            slot.given_back = self.finish_early();
            match self.record_end(finish, &control).await {
                Ok(true) => {
                    self.publish(TaskEvent::Status {
                        id,
                        status,
                        attempt,
                    });
                    if status.is_terminal() {
                        self.wake_waiters(id);
                    }
                    if let Some(at) = retry_at {
                        self.note_due(at);
                    }
                }
                Ok(false) => {
                    tracing::warn!(%id, attempt, "the attempt no longer held its task; its outcome was dropped");
                }
                Err(error) => {
                    tracing::error!(%id, attempt, %error, "recording the end of an attempt failed until the engine stopped; the lease reaper will recover the task");
                }
            }
        }
        drop(slot);
    }

    /// Records the end of an attempt. A store that fails (a database that is down, a full disk)
    /// is asked again, after pauses from 100 ms doubling up to 5 s, until it answers or the
    /// engine's shutdown deadline comes: an outcome is not dropped for a passing failure. While
    /// it waits, heartbeats go on renewing the attempt's lease, so that the reaper does not take
    /// the task back meanwhile.
    async fn record_end(&self, finish: Finish, control: &Control) -> Result<bool> {
        let mut pause = Duration::from_millis(100);
        loop {
            control.finishing.store(true, Ordering::Release);
            let error = match self.store.finish(finish.clone()).await {
                Ok(applied) => return Ok(applied),
                Err(error) => error,
            };
            let stop_by = *lock(&self.stop_deadline);
            let retry_at = Instant::now() + pause;
            if stop_by.is_some_and(|at| at <= retry_at) {
                return Err(error);
            }
            tracing::warn!(id = %finish.id, attempt = finish.attempt, %error, retry_in_ms = pause.as_millis() as u64, "recording the end of an attempt failed; trying again");
            control.finishing.store(false, Ordering::Release);
            // A shutdown that starts meanwhile gets one more try at once, before its deadline.
            tokio::select! {
                _ = tokio::time::sleep_until(retry_at.into()) => {}
                _ = self.draining.cancelled(), if stop_by.is_none() => {}
            }
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Gives the slot of an attempt whose handler has ended back before its end is recorded,
    /// so that the next task starts while the store records this one (a store that commits in
    /// groups then records the ends of one batch with the claim of the next). Says whether it
    /// did: not when [`Inner::finishing_cap`] ends are being recorded already (a slow store
    /// holds the slots, and the dispatcher claims no more than it can record). The attempt
    /// stays among the running ones (its lease renewed) until [`Inner::end_attempt`].
    fn finish_early(self: &Arc<Self>) -> bool {
        let cap = self.finishing_cap();
        let mut finishing = self.finishing.load(Ordering::Acquire);
        loop {
            if finishing >= cap {
                return false;
            }
            match self.finishing.compare_exchange_weak(
                finishing,
                finishing + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(seen) => finishing = seen,
            }
        }
        self.slot_freed();
        true
    }

    /// How many ends may be being recorded at once with their slots given back: `concurrency`,
    /// or as many as are claimed ahead while handlers run short. A store that commits in
    /// groups records as many ends per commit as are waiting, so this bounds how many tasks a
    /// commit ends: with `synchronous=FULL`, or a database over the network, a commit takes
    /// long enough that `concurrency` ends per commit would be the limit.
    fn finishing_cap(&self) -> usize {
        let concurrency = self.concurrency.load(Ordering::Acquire);
        if self.ahead_on.load(Ordering::Acquire) {
            (concurrency * AHEAD_PER_SLOT).clamp(concurrency, AHEAD_MAX.max(concurrency))
        } else {
            concurrency
        }
    }

    /// A slot its caller held is free: it starts a task claimed ahead, or is given back.
    fn slot_freed(self: &Arc<Self>) {
        if !self.start_ahead() {
            let taken = self.release(1);
            self.wake_after_release(taken);
        }
    }

    /// Notes how long a handler ran (see `Inner::recent_run_us`).
    fn note_run(&self, ran: Duration) {
        let ran = ran.as_micros().min(u128::from(u32::MAX)) as u64;
        let recent = self.recent_run_us.load(Ordering::Acquire);
        let next = if recent == u64::MAX {
            ran
        } else {
            (recent * 7 + ran) / 8
        };
        self.recent_run_us.store(next, Ordering::Release);
        if self.ahead_stale.load(Ordering::Acquire) {
            self.ahead_stale.store(false, Ordering::Release);
        }
    }

    /// Forgets a finished attempt: removes it from the running attempts, gives its slot back
    /// (unless [`Inner::finish_early`] did), and wakes the dispatcher if it should claim.
    fn end_attempt(self: &Arc<Self>, id: TaskId, completed_in: Option<Duration>, given_back: bool) {
        {
            let mut running = self.lock_running();
            let ended = running.tasks.remove(&id);
            if let (Some(ended), Some(duration)) = (ended, completed_in) {
                running.record_duration(ended.kind, duration);
            }
        }
        if given_back {
            let finishing = self.finishing.fetch_sub(1, Ordering::AcqRel) - 1;
            if finishing == 0 && self.slots_taken.load(Ordering::Acquire) == 0 {
                self.idle.notify_waiters();
            }
            return;
        }
        self.slot_freed();
    }

    /// Wakes the dispatcher after a slot was given back, leaving `taken` taken.
    fn wake_after_release(&self, taken: usize) {
        // A gathering dispatcher claims at its deadline anyway: wake it only when a claim
        // batch's worth of slots is free, or nothing runs. Any other dispatcher is woken.
        let free = self
            .concurrency
            .load(Ordering::Acquire)
            .saturating_sub(taken);
        if !self.gathering.load(Ordering::Acquire) || free == self.claim_batch() || taken == 0 {
            self.wake_dispatcher();
        }
    }

    /// Runs the handler's future to its end, a timeout, or a stop, catching panics (in its
    /// polls and in its drop).
    async fn drive(
        &self,
        future: crate::handler::HandlerFuture,
        timeout: Option<Duration>,
        control: &Control,
    ) -> Verdict {
        let mut slot = Some(future);
        let verdict = {
            let mut guarded = pin!(poll_fn(|cx| {
                let Some(future) = slot.as_mut() else {
                    return Poll::Ready(Verdict::Aborted);
                };
                match std::panic::catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
                    Ok(Poll::Ready(result)) => Poll::Ready(Verdict::Returned(result)),
                    Ok(Poll::Pending) => Poll::Pending,
                    Err(payload) => Poll::Ready(Verdict::Panicked(panic_message(payload.as_ref()))),
                }
            }));
            // A timeout too large to add to the clock is no timeout. The clock stops while the
            // task is paused (frozen): the deadline moves by the time spent paused.
            let mut deadline = timeout.and_then(|t| tokio::time::Instant::now().checked_add(t));
            // Pauses matter here only to stop the timeout's clock: with no timeout, nothing
            // follows them (and no channel is made for them).
            let mut paused = deadline.map(|_| control.pause_receiver());
            // It may have been paused before this attempt got here.
            let mut paused_since = paused
                .as_mut()
                .and_then(|paused| (*paused.borrow_and_update()).then(tokio::time::Instant::now));
            let first = loop {
                let clock = if paused_since.is_some() {
                    None
                } else {
                    deadline
                };
                tokio::select! {
                    biased;
                    verdict = &mut guarded => break Ok(verdict),
                    () = control.stopped() => break Err(None),
                    _ = sleep_until_opt(clock) => break Err(Some(StopReason::TimedOut)),
                    () = pause_changed(&mut paused) => {
                        let now_paused = paused.as_mut().is_some_and(|paused| *paused.borrow_and_update());
                        match (now_paused, paused_since) {
                            (true, None) => paused_since = Some(tokio::time::Instant::now()),
                            (false, Some(since)) => {
                                let frozen_for = since.elapsed();
                                deadline = deadline.and_then(|d| d.checked_add(frozen_for));
                                paused_since = None;
                            }
                            _ => {}
                        }
                    }
                }
            };
            match first {
                Ok(verdict) => verdict,
                Err(reason) => {
                    if let Some(reason) = reason {
                        control.stop(reason);
                    }
                    // Give the handler its grace period to notice the cancel and return.
                    let grace = self.grace();
                    match tokio::time::timeout(grace, &mut guarded).await {
                        // What a failure said of the stopped work is kept for a timeout.
                        Ok(Verdict::Returned(Err(failure))) => Verdict::Stopped(failure.result),
                        Ok(_) => Verdict::Stopped(None),
                        Err(_) => {
                            tracing::warn!(
                                grace_ms = grace.as_millis() as u64,
                                "a handler ignored its cancellation past the grace period; its future was dropped"
                            );
                            Verdict::Aborted
                        }
                    }
                }
            }
        };
        // Drop the handler's future here, where a panic in its drop is caught too.
        if let Err(payload) = std::panic::catch_unwind(AssertUnwindSafe(|| drop(slot.take()))) {
            tracing::error!(
                panic = panic_message(payload.as_ref()),
                "a handler's future panicked when dropped"
            );
        }
        verdict
    }

    /// How long a stopped handler may take to return: the configured grace, or less when a
    /// shutdown's deadline is nearer.
    fn grace(&self) -> Duration {
        let grace = self.config.cancel_grace;
        match *lock(&self.stop_deadline) {
            Some(deadline) => grace.min(deadline.saturating_duration_since(Instant::now())),
            None => grace,
        }
    }

    /// What the store should record for an attempt's verdict, before a cancel request is taken
    /// into account (see `settle`); `None` when nothing may be written (the attempt lost its
    /// lease).
    fn outcome(
        &self,
        task: &Task,
        verdict: Verdict,
        control: &Control,
        now: Timestamp,
    ) -> Option<Outcome> {
        let retry_at = |retryable: bool| {
            (retryable && task.has_attempts_left())
                .then(|| now.after(task.retry.delay_after(task.counted_attempts())))
        };
        let failed = |kind: FailureKind, message: String, retryable: bool| Outcome::Failed {
            error: TaskError { kind, message },
            retry_at: retry_at(retryable),
            result: None,
        };
        // A failure's result is kept when a result would be: else only its message.
        let with_result = |mut outcome: Outcome, result: Option<Value>| {
            if let (Outcome::Failed { result: kept, .. }, Some(result)) = (&mut outcome, result) {
                if check_json_depth(&result).is_ok()
                    && json_size(&result) <= self.config.max_result_bytes
                {
                    *kept = Some(result);
                } else {
                    tracing::warn!(id = %task.id, "the result of a failed attempt is too large or too deep to keep; its message is");
                }
            }
            outcome
        };
        match (control.reason(), verdict) {
            (StopReason::None, Verdict::Returned(Ok(result))) => {
                let size = json_size(&result);
                if let Err(message) = check_json_depth(&result) {
                    Some(failed(
                        FailureKind::Error,
                        format!("the result {message}"),
                        false,
                    ))
                } else if size > self.config.max_result_bytes {
                    Some(failed(
                        FailureKind::Error,
                        Error::ResultTooLarge {
                            size,
                            limit: self.config.max_result_bytes,
                        }
                        .to_string(),
                        false,
                    ))
                } else {
                    Some(Outcome::Completed { result })
                }
            }
            (
                StopReason::None,
                Verdict::Returned(Err(TaskFailure {
                    message,
                    retryable,
                    result,
                })),
            ) => Some(with_result(
                failed(FailureKind::Error, message, retryable),
                result,
            )),
            (StopReason::None, Verdict::Panicked(message)) => Some(failed(
                FailureKind::Error,
                format!("the handler panicked: {message}"),
                true,
            )),
            (_, Verdict::Rejected(message)) => Some(failed(FailureKind::Rejected, message, false)),
            (StopReason::LeaseLost, _) => None,
            (StopReason::Cancelled, _) => Some(Outcome::Cancelled),
            (StopReason::Shutdown, _) => {
                let (rerun, error) = task.interruption(Interruption::Shutdown);
                Some(Outcome::Interrupted { rerun, error })
            }
            (StopReason::TimedOut, verdict) => {
                let limit = task.timeout.unwrap_or_default();
                let outcome = failed(
                    FailureKind::Timeout,
                    format!("timed out after {:.1} s", limit.as_secs_f64()),
                    true,
                );
                // What the handler said of the work it stopped (its output so far, say).
                let result = match verdict {
                    Verdict::Stopped(result) => result,
                    _ => None,
                };
                Some(with_result(outcome, result))
            }
            (StopReason::None, Verdict::Stopped(_) | Verdict::Aborted) => Some(failed(
                FailureKind::Error,
                "the attempt stopped for no recorded reason".into(),
                true,
            )),
        }
    }

    /// Tells a running attempt of this engine that its task is paused (frozen) or resumed.
    fn set_paused(&self, id: TaskId, paused: bool) {
        if let Some(running) = self.lock_running().tasks.get(&id) {
            running.control.set_paused(paused);
        }
    }

    fn stop_running(&self, id: TaskId, reason: StopReason) {
        if let Some(running) = self.lock_running().tasks.get(&id) {
            running.control.stop(reason);
        }
    }

    async fn heartbeat(&self) -> Result<()> {
        let held: Vec<(TaskId, u32)> = self
            .lock_running()
            .tasks
            .iter()
            .map(|(id, r)| (*id, r.attempt))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let lease_until = Timestamp::now().after(self.config.lease);
        let reply = self
            .store
            .heartbeat(Heartbeat {
                held: held.clone(),
                lease_until,
            })
            .await?;
        for id in reply.lost {
            // Only the attempt the heartbeat was about: a newer one of the same task may have
            // started since.
            let running = self.lock_running();
            let Some(entry) = running.tasks.get(&id) else {
                continue;
            };
            if !held
                .iter()
                .any(|(held_id, attempt)| *held_id == id && *attempt == entry.attempt)
            {
                continue;
            }
            if entry.control.finishing.load(Ordering::Acquire) {
                // Its end was being recorded as the heartbeat ran: the store no longer counts
                // it as running because it has ended, not because another took it.
                continue;
            }
            self.leases_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%id, attempt = entry.attempt, "a running attempt lost its lease; stopping it");
            entry.control.stop(StopReason::LeaseLost);
        }
        for id in reply.cancel_requested {
            self.stop_running(id, StopReason::Cancelled);
        }
        Ok(())
    }

    pub(crate) async fn report_progress(
        &self,
        id: TaskId,
        attempt: u32,
        progress: f64,
        message: Option<String>,
    ) -> Result<()> {
        if !progress.is_finite() || !(0.0..=1.0).contains(&progress) {
            return Err(Error::InvalidProgress { value: progress });
        }
        let update = ProgressUpdate {
            id,
            attempt,
            progress,
            message: message.clone(),
            now: Timestamp::now(),
        };
        if !self.store.progress(update).await? {
            return Err(Error::Fenced { id, attempt });
        }
        self.publish(TaskEvent::Progress {
            id,
            progress,
            message,
        });
        Ok(())
    }

    fn median_duration(&self, kind: u64) -> Option<Duration> {
        let running = self.lock_running();
        let mut recent: Vec<Duration> = running.durations.get(&kind)?.iter().copied().collect();
        drop(running);
        recent.sort_unstable();
        recent.get(recent.len() / 2).copied()
    }
}

enum Verdict {
    Returned(std::result::Result<Value, TaskFailure>),
    Panicked(String),
    Rejected(String),
    /// The handler returned within the grace period after a stop, with the result of its
    /// failure if it gave one (what the stopped work left: kept when a timeout stopped it).
    Stopped(Option<Value>),
    /// The handler ignored the stop past its grace period; its future was dropped.
    Aborted,
}

/// Waits for a change of a pause flag; never, when there is none to follow (or its sender is
/// gone, which happens only once the attempt is over).
async fn pause_changed(paused: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    if let Some(paused) = paused
        && paused.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The deepest nesting of arrays and objects accepted in params and results: well below the
/// depth at which JSON parsers give up (128 in serde_json), so that whatever is stored can be
/// read back.
pub const MAX_JSON_DEPTH: usize = 64;

/// Refuses values nested deeper than [`MAX_JSON_DEPTH`]; walks without recursion, so that
/// even an absurdly deep value cannot overflow the stack.
fn check_json_depth(value: &Value) -> std::result::Result<(), String> {
    let mut stack: Vec<(&Value, usize)> = vec![(value, 1)];
    while let Some((value, depth)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match value {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(fields) => Box::new(fields.values()),
            _ => continue,
        };
        if depth > MAX_JSON_DEPTH {
            return Err(format!(
                "nests arrays and objects more than {MAX_JSON_DEPTH} levels deep; flatten it"
            ));
        }
        stack.extend(children.map(|child| (child, depth + 1)));
    }
    Ok(())
}

/// The length of a value's JSON text, counted without building the text.
fn json_size(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Writing a `Value` to a writer that cannot fail cannot fail.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}
