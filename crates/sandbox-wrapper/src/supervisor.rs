//! The supervisor of every background loop: named children with a restart policy, pause and
//! resume, statistics, health, and shutdown in reverse start order within a deadline.
//!
//! # Children
//!
//! A [`Supervisor`] owns named children, each a background loop described by a [`ChildSpec`]:
//!
//! - a **periodic** child ([`ChildSpec::periodic`]) is a `tick` function that the supervisor's
//!   own loop calls once at start (unless [`ChildSpec::run_at_start`] says otherwise) and then
//!   every interval. A tick answers how many items it handled (sessions expired, orphans
//!   removed, tasks recovered...), counted under [`ChildSpec::item_label`].
//!   [`Supervisor::run_now`] makes it tick at once. A tick in progress when the child is stopped
//!   is allowed to finish (within the stop timeout or the shutdown deadline);
//! - a **service** child ([`ChildSpec::service`]) is a long-running loop (the task dispatcher,
//!   say) that receives a [`ChildContext`]: a cancellation token that fires when the child is
//!   stopped, restarted or shut down, the pause flag (which the service honors itself), and
//!   ways to count its cycles so that its statistics mean the same as a periodic child's.
//!   Returning `Ok(())` means it stopped normally: it is not restarted.
//!
//! Every child runs as a Tokio task spawned on the supervisor's [`TaskTracker`], watched by a
//! small supervising task of its own (also tracked): nothing is spawned and forgotten. Dropping
//! the last handle to a supervisor cancels every child.
//!
//! # Restarts and intensity
//!
//! An `Err` from a tick or a service, or a panic inside either, ends that *incarnation* of the
//! child. The supervisor records the error and starts a fresh incarnation after a backoff
//! ([`RestartPolicy::initial_backoff`], doubling with each restart still inside the window, up
//! to [`RestartPolicy::max_backoff`]). As in Erlang/OTP, the restart *intensity* is bounded: a
//! child that would need more than [`RestartPolicy::max_restarts`] restarts within
//! [`RestartPolicy::window`] is marked `failed` and stays down, and health says so, until an
//! explicit [`Supervisor::restart`] (or [`Supervisor::restart_unhealthy`]), which also resets
//! the window. A panic never takes down the supervisor: it is caught where the supervisor
//! awaits the child's task. Once [`Supervisor::shutdown`] has begun, nothing is restarted.
//!
//! # Pause
//!
//! A paused child stays alive (its task exists) and skips its work: a periodic child skips its
//! ticks, each counted in `skipped_cycles`; a service sees `*ctx.paused.borrow() == true` and is
//! expected to wait (see [`ChildContext::wait_unpaused`]). A child built with
//! [`ChildSpec::pausable`]`(false)` (the heartbeat that keeps task leases alive, say) is never
//! paused: asking for it is reported as an error in the [`ActionReport`] and it keeps running.
//! The pause flag belongs to the child, not to an incarnation: it survives a restart.
//!
//! # Health
//!
//! Each child's [`ChildStatus::healthy`] is false when it is `failed`, when it is backing off
//! after an error, or when it stopped because of an error (an error while it was being stopped,
//! or after the shutdown began). The supervisor's [`SupervisorHealth::overall_status`] is
//! [`HealthStatus::Unhealthy`] if any child failed, [`HealthStatus::Degraded`] if any child is
//! unhealthy otherwise, paused, or had an error in its last cycle, and
//! [`HealthStatus::Healthy`] otherwise. A child that stopped normally is healthy.
//!
//! # Shutdown
//!
//! [`Supervisor::shutdown`] stops children one at a time in the reverse of their start order,
//! each given what is left of the deadline: its cancellation token fires and the supervisor
//! waits for it; a child still running at the deadline is aborted and named in the report's
//! errors. [`Supervisor::stop_child`] stops a single child at a point of the caller's own
//! ordered shutdown (the dispatcher before the drain, for example).
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use sandbox_wrapper::supervisor::{ChildSpec, Supervisor};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let supervisor = Supervisor::new();
//! supervisor.start_child(
//!     ChildSpec::periodic("session_cleanup", Duration::from_secs(60), || {
//!         Box::pin(async { Ok(0) }) // expire idle sessions, answer how many
//!     })
//!     .item_label("sessions_expired"),
//! )?;
//! println!("{:?}", supervisor.health().overall_status);
//! let report = supervisor.shutdown(Duration::from_secs(30)).await;
//! println!("{}", serde_json::to_string(&report)?);
//! # Ok(())
//! # }
//! ```

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::stable::unix_now;

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::task::AbortHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

/// How long a child gets to stop after its token fired, when stopped by [`Supervisor::restart`]
/// or [`Supervisor::stop_child`], unless its spec says otherwise.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest interval of a periodic child; shorter ones are raised to it.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// How long to wait for an aborted child's task to be gone, once the grace time is over.
const ABORT_GRACE: Duration = Duration::from_millis(100);

/// What one tick of a periodic child returns: how many items it handled, or why it failed.
pub type TickFuture = Pin<Box<dyn Future<Output = Result<u64, LoopError>> + Send>>;

/// What a service child returns: `Ok(())` when it stopped normally, or why it failed.
pub type ServiceFuture = Pin<Box<dyn Future<Output = Result<(), LoopError>> + Send>>;

/// Why a supervised loop (a tick of a periodic child, or a service) ended with an error. The
/// supervisor counts it, reports it as the child's `last_error` (its text), and restarts the
/// child per its [`RestartPolicy`].
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The task engine or its store failed.
    #[error(transparent)]
    Task(#[from] task_core::Error),
    /// The session manager (or the sandbox backend under it) failed.
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
    /// Another loop's failure, in its words.
    #[error("{0}")]
    Other(String),
}

impl From<String> for LoopError {
    fn from(message: String) -> LoopError {
        LoopError::Other(message)
    }
}

impl From<&str> for LoopError {
    fn from(message: &str) -> LoopError {
        LoopError::Other(message.to_owned())
    }
}

type TickFn = Arc<dyn Fn() -> TickFuture + Send + Sync>;
type ServiceFn = Arc<dyn Fn(ChildContext) -> ServiceFuture + Send + Sync>;

/// When a child that ended with an error is restarted, and when it is given up on.
///
/// A child that would need more than `max_restarts` restarts within `window` is marked failed
/// and stays down until it is restarted explicitly. Before each restart the supervisor waits
/// `initial_backoff`, doubled for each restart already inside the window, at most
/// `max_backoff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// How many restarts are allowed within `window` (0: the first error fails the child).
    pub max_restarts: u32,
    /// The sliding window over which restarts are counted.
    pub window: Duration,
    /// The wait before the first restart within the window.
    pub initial_backoff: Duration,
    /// The longest wait before a restart.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    /// 5 restarts in 60 s; backoff from 100 ms, doubling, at most 30 s.
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RestartPolicy {
    /// This policy, except that the child is never given up on, and waits at most `max_backoff`
    /// before a restart. For a loop that must come back on its own once what it depends on is
    /// back: a heartbeat that stopped for good after a long database outage would let every
    /// running task's lease run out.
    pub fn never_give_up(self, max_backoff: Duration) -> RestartPolicy {
        RestartPolicy {
            max_restarts: u32::MAX,
            max_backoff: self.max_backoff.min(max_backoff),
            ..self
        }
    }

    /// The wait before restart number `n` (counted from 1) within the window.
    pub fn backoff(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

/// What a child runs.
#[derive(Clone)]
enum ChildKind {
    Periodic { interval: Duration, tick: TickFn },
    Service { run: ServiceFn },
}

/// The description of a child: what it runs and how it is supervised. Build it with
/// [`ChildSpec::periodic`] or [`ChildSpec::service`], then the builder methods.
#[derive(Clone)]
pub struct ChildSpec {
    name: String,
    kind: ChildKind,
    run_at_start: bool,
    item_label: Option<String>,
    pausable: bool,
    policy: RestartPolicy,
    interval_hint: Option<Duration>,
    stop_timeout: Duration,
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            ChildKind::Periodic { .. } => "periodic",
            ChildKind::Service { .. } => "service",
        };
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("kind", &kind)
            .field("interval", &self.interval())
            .field("run_at_start", &self.run_at_start)
            .field("item_label", &self.item_label)
            .field("pausable", &self.pausable)
            .field("policy", &self.policy)
            .field("stop_timeout", &self.stop_timeout)
            .finish()
    }
}

impl ChildSpec {
    /// A periodic child: `tick` is called once at start (see [`ChildSpec::run_at_start`]) and
    /// then every `interval` (at least 1 ms), and answers how many items it handled. An `Err` or
    /// a panic ends this incarnation of the child; it is restarted per its policy.
    pub fn periodic<F>(name: impl Into<String>, interval: Duration, tick: F) -> ChildSpec
    where
        F: Fn() -> TickFuture + Send + Sync + 'static,
    {
        ChildSpec::new(
            name.into(),
            ChildKind::Periodic {
                interval: interval.max(MIN_INTERVAL),
                tick: Arc::new(tick),
            },
        )
    }

    /// A service child: a long-running loop that runs until its [`ChildContext::cancel`] fires.
    /// `Ok(())` means it stopped normally (no restart); an `Err` or a panic restarts it per its
    /// policy. It honors [`ChildContext::paused`] itself.
    pub fn service<F>(name: impl Into<String>, run: F) -> ChildSpec
    where
        F: Fn(ChildContext) -> ServiceFuture + Send + Sync + 'static,
    {
        ChildSpec::new(name.into(), ChildKind::Service { run: Arc::new(run) })
    }

    fn new(name: String, kind: ChildKind) -> ChildSpec {
        ChildSpec {
            name,
            kind,
            run_at_start: true,
            item_label: None,
            pausable: true,
            policy: RestartPolicy::default(),
            interval_hint: None,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        }
    }

    /// Whether a periodic child ticks as soon as it starts (the default) or only after its
    /// first interval. Has no effect on a service.
    pub fn run_at_start(mut self, run_at_start: bool) -> ChildSpec {
        self.run_at_start = run_at_start;
        self
    }

    /// Names the items a cycle handles (`"sessions_expired"`, `"orphans_removed"`...), as
    /// reported in [`ChildStatus::items_label`].
    pub fn item_label(mut self, label: impl Into<String>) -> ChildSpec {
        self.item_label = Some(label.into());
        self
    }

    /// Whether the child may be paused (the default). Asking to pause a child that may not is
    /// reported as an error and the child keeps running.
    pub fn pausable(mut self, pausable: bool) -> ChildSpec {
        self.pausable = pausable;
        self
    }

    /// The restart policy (default: [`RestartPolicy::default`]).
    pub fn policy(mut self, policy: RestartPolicy) -> ChildSpec {
        self.policy = policy;
        self
    }

    /// The interval a service works at, reported as its [`ChildStatus::interval_seconds`].
    /// Ignored for a periodic child, whose interval is its own.
    pub fn interval_hint(mut self, interval: Duration) -> ChildSpec {
        self.interval_hint = Some(interval);
        self
    }

    /// How long the child gets to stop after its token fired, when stopped by
    /// [`Supervisor::restart`] or [`Supervisor::stop_child`] (default
    /// [`DEFAULT_STOP_TIMEOUT`]); past it, its task is aborted. Shutdown uses its own deadline.
    pub fn stop_timeout(mut self, timeout: Duration) -> ChildSpec {
        self.stop_timeout = timeout;
        self
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn interval(&self) -> Option<Duration> {
        match &self.kind {
            ChildKind::Periodic { interval, .. } => Some(*interval),
            ChildKind::Service { .. } => self.interval_hint,
        }
    }
}

/// What a service child receives: its cancellation token, its pause flag, and ways to count its
/// cycles in the supervisor's statistics.
#[derive(Clone)]
pub struct ChildContext {
    /// Fires when the child is stopped, restarted or shut down. The service then returns
    /// `Ok(())` promptly.
    pub cancel: CancellationToken,
    /// Whether the child is paused. A paused service stays alive and skips its work; it watches
    /// this itself (see [`ChildContext::wait_unpaused`]).
    pub paused: watch::Receiver<bool>,
    slot: Arc<Slot>,
}

impl fmt::Debug for ChildContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildContext")
            .field("name", &self.slot.spec.name)
            .field("cancelled", &self.cancel.is_cancelled())
            .field("paused", &*self.paused.borrow())
            .finish()
    }
}

impl ChildContext {
    /// The child's name.
    pub fn name(&self) -> &str {
        &self.slot.spec.name
    }

    /// Whether the child is paused now.
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Counts a successful cycle that handled `items` items, as run just now (use
    /// [`ChildContext::cycle_timed`] to report its start and duration too).
    pub fn cycle(&self, items: u64) {
        let mut stats = self.slot.stats();
        stats.cycles += 1;
        stats.items_total += items;
        stats.last_run_at = Some(unix_now());
        stats.last_cycle_failed = false;
    }

    /// Counts a successful cycle that began at `started`, handled `items` items and ended now,
    /// so that its start and duration are reported too.
    pub fn cycle_timed(&self, started: Instant, items: u64) {
        let elapsed = started.elapsed();
        let mut stats = self.slot.stats();
        stats.cycles += 1;
        stats.items_total += items;
        stats.last_run_at = Some(unix_now() - elapsed.as_secs_f64());
        stats.last_duration_ms = Some(elapsed.as_secs_f64() * 1000.0);
        stats.last_cycle_failed = false;
    }

    /// Counts a cycle that failed without ending the service: the error is counted and
    /// reported (its text is the child's `last_error`), and health is degraded until a later
    /// cycle succeeds.
    pub fn cycle_failed(&self, error: &LoopError) {
        let error = error.to_string();
        warn!(child = %self.slot.spec.name, %error, "child cycle failed");
        let mut stats = self.slot.stats();
        stats.cycles += 1;
        stats.errors += 1;
        stats.last_run_at = Some(unix_now());
        stats.last_error = Some(error);
        stats.last_cycle_failed = true;
    }

    /// Counts a cycle skipped because the child is paused.
    pub fn skip_cycle(&self) {
        self.slot.stats().skipped_cycles += 1;
    }

    /// Waits until the child is not paused: `true` then, or `false` if the child's token fired
    /// first (the service should then return).
    pub async fn wait_unpaused(&mut self) -> bool {
        loop {
            if self.cancel.is_cancelled() {
                return false;
            }
            if !*self.paused.borrow_and_update() {
                return true;
            }
            tokio::select! {
                () = self.cancel.cancelled() => return false,
                changed = self.paused.changed() => {
                    if changed.is_err() {
                        self.cancel.cancelled().await;
                        return false;
                    }
                }
            }
        }
    }

    /// Completes when [`Supervisor::run_now`] asks this child to work at once (a request made
    /// while nobody waits is kept for the next call).
    pub async fn woken(&self) {
        self.slot.wake.notified().await;
    }
}

/// The state of a child.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildState {
    /// Registered or restarted; its task is about to run.
    Starting,
    /// Running.
    Running,
    /// Alive but paused: it skips its work.
    Paused,
    /// Ended with an error; waiting for its restart.
    BackingOff,
    /// Exceeded its restart intensity; down until restarted explicitly.
    Failed,
    /// Stopped: by request, by the shutdown, or because it returned normally.
    Stopped,
}

/// A snapshot of one child: state, health and statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildStatus {
    /// The child's name.
    pub name: String,
    /// Its state.
    pub state: ChildState,
    /// False when it failed, is backing off after an error, or stopped because of an error.
    pub healthy: bool,
    /// Whether its Tokio task is alive (false while backing off, failed or stopped).
    pub exists: bool,
    /// Whether it may be paused.
    pub pausable: bool,
    /// Its interval (a periodic child's, or a service's hint).
    pub interval_seconds: Option<f64>,
    /// Cycles run (ticks, or cycles a service counted), across restarts.
    pub cycles: u64,
    /// Cycles skipped while paused.
    pub skipped_cycles: u64,
    /// What its items are (`"sessions_expired"`...).
    pub items_label: Option<String>,
    /// Items handled by all its cycles.
    pub items_total: u64,
    /// Errors: failed cycles, errors returned and panics.
    pub errors: u64,
    /// Restarts, automatic and explicit.
    pub restarts: u64,
    /// The last error, kept after it recovered.
    pub last_error: Option<String>,
    /// When its last cycle began (Unix seconds).
    pub last_run_at: Option<f64>,
    /// How long its last timed cycle took, in milliseconds.
    pub last_duration_ms: Option<f64>,
    /// When its current (or last) incarnation started (Unix seconds).
    pub started_at: f64,
    /// How long its current incarnation has run (0 when its task is not alive).
    pub uptime_seconds: f64,
}

/// The overall health of the supervised children, ordered from best to worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Every child is healthy, running (or stopped normally) and not paused.
    Healthy,
    /// Some child is backing off, paused, stopped by an error, or had an error in its last cycle.
    Degraded,
    /// Some child failed: it stays down until restarted.
    Unhealthy,
}

/// The health of the supervisor: overall, and one entry per child.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SupervisorHealth {
    /// The overall status.
    pub overall_status: HealthStatus,
    /// When this was taken (Unix seconds).
    pub timestamp: f64,
    /// One entry per child, by name.
    pub components: BTreeMap<String, ChildStatus>,
}

/// How an operation on children went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionStatus {
    /// Everything asked was done.
    Success,
    /// Some was done, some could not be.
    PartialSuccess,
    /// Nothing needed doing.
    NoActionNeeded,
    /// Nothing could be done.
    Failed,
}

/// The report of a pause, resume or restart:
/// `{status, actions_taken: ["orphan_cleanup_restarted"], errors: [], timestamp}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionReport {
    /// How it went.
    pub status: ActionStatus,
    /// What was done, one `<child>_<action>` per child (`"session_cleanup_paused"`).
    pub actions_taken: Vec<String>,
    /// What could not be done, and why.
    pub errors: Vec<String>,
    /// When (Unix seconds).
    pub timestamp: f64,
}

impl ActionReport {
    fn new(actions_taken: Vec<String>, errors: Vec<String>) -> ActionReport {
        let status = match (actions_taken.is_empty(), errors.is_empty()) {
            (true, true) => ActionStatus::NoActionNeeded,
            (false, true) => ActionStatus::Success,
            (false, false) => ActionStatus::PartialSuccess,
            (true, false) => ActionStatus::Failed,
        };
        ActionReport {
            status,
            actions_taken,
            errors,
            timestamp: unix_now(),
        }
    }
}

/// How a shutdown went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, strum::Display)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ShutdownStatus {
    /// Every child stopped within the deadline, without error.
    Success,
    /// Every child stopped within the deadline, some with an error.
    PartialSuccess,
    /// Some child was still running at the deadline and was aborted.
    Timeout,
}

/// The report of [`Supervisor::shutdown`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShutdownReport {
    /// How it went.
    pub status: ShutdownStatus,
    /// When it began (Unix seconds).
    pub start_time: f64,
    /// When it ended (Unix seconds).
    pub end_time: f64,
    /// How long it took.
    pub duration_seconds: f64,
    /// Children that are stopped (including those already stopped or failed before), not
    /// counting the ones aborted at the deadline.
    pub components_stopped: usize,
    /// Children the supervisor had.
    pub components_expected: usize,
    /// How many errors follow.
    pub error_count: usize,
    /// The children aborted at the deadline, and those that stopped with an error.
    pub errors: Vec<String>,
}

/// How [`Supervisor::stop_child`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// It was not running (stopped, failed, or returned by itself).
    AlreadyStopped,
    /// It stopped within its time.
    Stopped,
    /// It was still running when its time was up, and was aborted.
    Aborted,
}

/// Why the supervisor refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    /// No child has this name.
    #[error("no background loop is named `{name}`; {}", known_names(.known))]
    UnknownChild {
        /// The name asked for.
        name: String,
        /// The children there are, in start order.
        known: Vec<String>,
    },
    /// A child with this name is already supervised.
    #[error(
        "a background loop named `{name}` is already supervised; restart it, or give the new one another name"
    )]
    DuplicateChild {
        /// The name asked for.
        name: String,
    },
    /// The supervisor is shutting down.
    #[error(
        "the supervisor is shutting down: no background loop can be started or restarted; start the daemon again"
    )]
    ShuttingDown,
}

fn known_names(known: &[String]) -> String {
    if known.is_empty() {
        "none is supervised yet".to_owned()
    } else {
        format!("use one of: {}", known.join(", "))
    }
}

/// The supervisor of msbd's background loops. Cheap to clone: every clone shares one state.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let children = self.inner.children();
        let names: Vec<&str> = children
            .slots
            .iter()
            .map(|slot| slot.spec.name.as_str())
            .collect();
        f.debug_struct("Supervisor")
            .field("children", &names)
            .field("closing", &children.closing)
            .finish()
    }
}

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new()
    }
}

struct Inner {
    children: Mutex<Children>,
    tracker: TaskTracker,
    /// Fires when the shutdown begins: no restart happens after it.
    closing: CancellationToken,
}

impl Inner {
    fn children(&self) -> MutexGuard<'_, Children> {
        lock(&self.children)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.closing.cancel();
        let children = self
            .children
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for slot in &children.slots {
            if let Some(run) = lock(&slot.run).as_ref() {
                run.stop.cancel();
            }
        }
        self.tracker.close();
    }
}

struct Children {
    /// In start order.
    slots: Vec<Arc<Slot>>,
    /// Set when the shutdown begins, under the same lock as every launch.
    closing: bool,
}

/// One child: its spec, its pause flag, its statistics and its current run.
struct Slot {
    spec: ChildSpec,
    paused: watch::Sender<bool>,
    wake: Notify,
    stats: Mutex<Stats>,
    run: Mutex<Option<RunCtl>>,
}

/// One run of a child: from a start or an explicit restart until it stops or fails, through any
/// number of automatic restarts.
#[derive(Clone)]
struct RunCtl {
    stop: CancellationToken,
    done: watch::Receiver<bool>,
    incarnation: Arc<Mutex<Option<AbortHandle>>>,
}

impl RunCtl {
    fn finished(&self) -> bool {
        *self.done.borrow() || self.done.has_changed().is_err()
    }
}

struct Stats {
    /// Never `Paused`: that is derived from the pause flag.
    state: ChildState,
    exists: bool,
    cycles: u64,
    skipped_cycles: u64,
    items_total: u64,
    errors: u64,
    restarts: u64,
    last_error: Option<String>,
    last_run_at: Option<f64>,
    last_duration_ms: Option<f64>,
    started_at: f64,
    started: Instant,
    last_cycle_failed: bool,
    ended_with_error: bool,
    restart_times: VecDeque<Instant>,
    cycle_started: Option<(Instant, f64)>,
}

impl Stats {
    fn healthy(&self) -> bool {
        match self.state {
            ChildState::Failed | ChildState::BackingOff => false,
            ChildState::Stopped => !self.ended_with_error,
            ChildState::Starting | ChildState::Running | ChildState::Paused => true,
        }
    }

    fn end_cycle(&mut self, items: Option<u64>) {
        if let Some((started, started_at)) = self.cycle_started.take() {
            self.cycles += 1;
            self.last_run_at = Some(started_at);
            self.last_duration_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
        }
        match items {
            Some(items) => {
                self.items_total += items;
                self.last_cycle_failed = false;
            }
            None => self.last_cycle_failed = true,
        }
    }
}

impl Slot {
    fn new(spec: ChildSpec) -> Slot {
        let (paused, _) = watch::channel(false);
        Slot {
            spec,
            paused,
            wake: Notify::new(),
            stats: Mutex::new(Stats {
                state: ChildState::Starting,
                exists: false,
                cycles: 0,
                skipped_cycles: 0,
                items_total: 0,
                errors: 0,
                restarts: 0,
                last_error: None,
                last_run_at: None,
                last_duration_ms: None,
                started_at: unix_now(),
                started: Instant::now(),
                last_cycle_failed: false,
                ended_with_error: false,
                restart_times: VecDeque::new(),
                cycle_started: None,
            }),
            run: Mutex::new(None),
        }
    }

    fn stats(&self) -> MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    fn current_run(&self) -> Option<RunCtl> {
        lock(&self.run).clone()
    }

    /// The state as reported: `Paused` when the flag is set and the child is alive.
    fn reported_state(&self, stats: &Stats) -> ChildState {
        match stats.state {
            ChildState::Starting | ChildState::Running if self.is_paused() => ChildState::Paused,
            state => state,
        }
    }

    fn status(&self) -> ChildStatus {
        self.snapshot().0
    }

    /// The child's status and its contribution to the overall health, from one look at it.
    fn snapshot(&self) -> (ChildStatus, HealthStatus) {
        let stats = self.stats();
        let state = self.reported_state(&stats);
        let healthy = stats.healthy();
        let health = if stats.state == ChildState::Failed {
            HealthStatus::Unhealthy
        } else if !healthy || stats.last_cycle_failed || state == ChildState::Paused {
            HealthStatus::Degraded
        } else {
            HealthStatus::Healthy
        };
        let status = ChildStatus {
            name: self.spec.name.clone(),
            state,
            healthy,
            exists: stats.exists,
            pausable: self.spec.pausable,
            interval_seconds: self.spec.interval().map(|i| i.as_secs_f64()),
            cycles: stats.cycles,
            skipped_cycles: stats.skipped_cycles,
            items_label: self.spec.item_label.clone(),
            items_total: stats.items_total,
            errors: stats.errors,
            restarts: stats.restarts,
            last_error: stats.last_error.clone(),
            last_run_at: stats.last_run_at,
            last_duration_ms: stats.last_duration_ms,
            started_at: stats.started_at,
            uptime_seconds: if stats.exists {
                stats.started.elapsed().as_secs_f64()
            } else {
                0.0
            },
        };
        (status, health)
    }

    /// Whether [`Supervisor::restart_unhealthy`] restarts it.
    fn needs_restart(&self) -> bool {
        let stats = self.stats();
        stats.state == ChildState::Failed
            || (stats.state == ChildState::Stopped && stats.ended_with_error)
    }

    fn begin_incarnation(&self) {
        let mut stats = self.stats();
        stats.state = ChildState::Running;
        stats.exists = true;
        stats.started_at = unix_now();
        stats.started = Instant::now();
        stats.cycle_started = None;
        if matches!(self.spec.kind, ChildKind::Service { .. }) {
            // A service's cycles are its own to count: a fresh incarnation starts clean.
            stats.last_cycle_failed = false;
        }
    }

    fn record_failure(&self, error: &str) {
        let mut stats = self.stats();
        stats.exists = false;
        if stats.cycle_started.is_some() {
            // It panicked inside a tick: that cycle ends here.
            stats.end_cycle(None);
        }
        stats.errors += 1;
        stats.last_error = Some(error.to_owned());
        stats.last_cycle_failed = true;
    }

    fn finish(&self, with_error: bool) {
        let mut stats = self.stats();
        stats.state = ChildState::Stopped;
        stats.exists = false;
        stats.ended_with_error = with_error;
    }

    /// Decides on a restart after an error: the backoff before it, or `None` when the restart
    /// intensity is exceeded (the child is then marked failed).
    fn next_restart(&self) -> Option<Duration> {
        let policy = self.spec.policy;
        let now = Instant::now();
        let mut stats = self.stats();
        while let Some(&first) = stats.restart_times.front() {
            if now.duration_since(first) > policy.window {
                stats.restart_times.pop_front();
            } else {
                break;
            }
        }
        if stats.restart_times.len() >= policy.max_restarts as usize {
            stats.state = ChildState::Failed;
            stats.exists = false;
            return None;
        }
        stats.restart_times.push_back(now);
        stats.state = ChildState::BackingOff;
        let n = u32::try_from(stats.restart_times.len()).unwrap_or(u32::MAX);
        Some(policy.backoff(n))
    }
}

impl Supervisor {
    /// An empty supervisor.
    pub fn new() -> Supervisor {
        Supervisor {
            inner: Arc::new(Inner {
                children: Mutex::new(Children {
                    slots: Vec::new(),
                    closing: false,
                }),
                tracker: TaskTracker::new(),
                closing: CancellationToken::new(),
            }),
        }
    }

    /// Starts a child: it runs at once, and its place in the start order is remembered.
    ///
    /// Refused when a child of that name exists or the shutdown has begun.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub fn start_child(&self, spec: ChildSpec) -> Result<(), SupervisorError> {
        let mut children = self.inner.children();
        if children.closing {
            return Err(SupervisorError::ShuttingDown);
        }
        if children
            .slots
            .iter()
            .any(|slot| slot.spec.name == spec.name)
        {
            return Err(SupervisorError::DuplicateChild { name: spec.name });
        }
        let slot = Arc::new(Slot::new(spec));
        children.slots.push(Arc::clone(&slot));
        debug!(child = %slot.spec.name, "starting child");
        self.launch(&children, &slot, false)
    }

    /// Pauses one child: it stays alive and skips its work. A child that may not be paused is
    /// reported in the errors and keeps running.
    pub fn pause(&self, name: &str) -> Result<ActionReport, SupervisorError> {
        let slot = self.find(name)?;
        let (actions, errors) = collect(std::iter::once(&slot), Slot::pause);
        Ok(ActionReport::new(actions, errors))
    }

    /// Resumes one paused child.
    pub fn resume(&self, name: &str) -> Result<ActionReport, SupervisorError> {
        let slot = self.find(name)?;
        let (actions, errors) = collect(std::iter::once(&slot), Slot::resume);
        Ok(ActionReport::new(actions, errors))
    }

    /// Pauses every child that may be paused; the others are reported in the errors.
    pub fn pause_all(&self) -> ActionReport {
        let slots = self.slots();
        let (actions, errors) = collect(slots.iter(), Slot::pause);
        ActionReport::new(actions, errors)
    }

    /// Resumes every paused child.
    pub fn resume_all(&self) -> ActionReport {
        let slots = self.slots();
        let (actions, errors) = collect(slots.iter(), Slot::resume);
        ActionReport::new(actions, errors)
    }

    /// Restarts one child: stops its current incarnation (its token fires; after its stop
    /// timeout it is aborted) and starts a fresh one, also when it had failed. The restart
    /// intensity window starts afresh; the pause flag stays as it was.
    pub async fn restart(&self, name: &str) -> Result<ActionReport, SupervisorError> {
        let slot = self.find(name)?;
        self.restart_slot(&slot).await?;
        Ok(ActionReport::new(
            vec![format!("{}_restarted", slot.spec.name)],
            Vec::new(),
        ))
    }

    /// Restarts every child that failed or stopped because of an error.
    /// `no_action_needed` when there is none.
    pub async fn restart_unhealthy(&self) -> ActionReport {
        let mut actions = Vec::new();
        let mut errors = Vec::new();
        for slot in self.slots() {
            if !slot.needs_restart() {
                continue;
            }
            match self.restart_slot(&slot).await {
                Ok(()) => actions.push(format!("{}_restarted", slot.spec.name)),
                Err(e) => errors.push(format!("{}: {e}", slot.spec.name)),
            }
        }
        ActionReport::new(actions, errors)
    }

    /// Makes a periodic child tick at once (when it is not paused); a service sees it through
    /// [`ChildContext::woken`].
    pub fn run_now(&self, name: &str) -> Result<(), SupervisorError> {
        self.find(name)?.wake.notify_one();
        Ok(())
    }

    /// Every child's status, in start order.
    pub fn status(&self) -> Vec<ChildStatus> {
        self.slots().iter().map(|slot| slot.status()).collect()
    }

    /// One child's status.
    pub fn child(&self, name: &str) -> Option<ChildStatus> {
        self.find(name).ok().map(|slot| slot.status())
    }

    /// The overall health and every child's status.
    pub fn health(&self) -> SupervisorHealth {
        let mut overall_status = HealthStatus::Healthy;
        let mut components = BTreeMap::new();
        for slot in self.slots() {
            let (status, health) = slot.snapshot();
            overall_status = overall_status.max(health);
            components.insert(status.name.clone(), status);
        }
        SupervisorHealth {
            overall_status,
            timestamp: unix_now(),
            components,
        }
    }

    /// Stops one child and waits for it, within its stop timeout (after which it is aborted).
    /// Idempotent. It stays stopped: it is not restarted, except explicitly.
    pub async fn stop_child(&self, name: &str) -> Result<StopOutcome, SupervisorError> {
        let slot = self.find(name)?;
        Ok(stop_slot(&slot, slot.spec.stop_timeout).await)
    }

    /// Like [`Supervisor::stop_child`], within `grace` instead of the child's stop timeout.
    pub async fn stop_child_within(
        &self,
        name: &str,
        grace: Duration,
    ) -> Result<StopOutcome, SupervisorError> {
        let slot = self.find(name)?;
        Ok(stop_slot(&slot, grace).await)
    }

    /// Stops every child, one at a time in the reverse of their start order, each within what is
    /// left of `deadline`; a child still running then is aborted and named in the errors. From
    /// the moment it begins nothing is started or restarted. Calling it again stops whatever
    /// was started before and is still running.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let start_time = unix_now();
        let started = tokio::time::Instant::now();
        let end = started + deadline;
        let slots = {
            let mut children = self.inner.children();
            children.closing = true;
            self.inner.closing.cancel();
            children.slots.clone()
        };
        debug!(
            children = slots.len(),
            ?deadline,
            "supervisor shutting down"
        );
        let mut stopped = 0;
        let mut errors = Vec::new();
        let mut timed_out = false;
        for slot in slots.iter().rev() {
            let remaining = end.saturating_duration_since(tokio::time::Instant::now());
            match stop_slot(slot, remaining).await {
                StopOutcome::AlreadyStopped => stopped += 1,
                StopOutcome::Stopped => {
                    stopped += 1;
                    let stats = slot.stats();
                    if stats.ended_with_error {
                        errors.push(format!(
                            "{}: stopped with an error: {}",
                            slot.spec.name,
                            stats.last_error.as_deref().unwrap_or("unknown")
                        ));
                    }
                }
                StopOutcome::Aborted => {
                    timed_out = true;
                    errors.push(format!(
                        "{}: still running at the shutdown deadline ({:.3} s); aborted",
                        slot.spec.name,
                        deadline.as_secs_f64()
                    ));
                }
            }
        }
        self.inner.tracker.close();
        let remaining = end.saturating_duration_since(tokio::time::Instant::now());
        let _ = tokio::time::timeout(remaining.max(ABORT_GRACE), self.inner.tracker.wait()).await;
        let status = if timed_out {
            ShutdownStatus::Timeout
        } else if errors.is_empty() {
            ShutdownStatus::Success
        } else {
            ShutdownStatus::PartialSuccess
        };
        let end_time = unix_now();
        ShutdownReport {
            status,
            start_time,
            end_time,
            duration_seconds: started.elapsed().as_secs_f64(),
            components_stopped: stopped,
            components_expected: slots.len(),
            error_count: errors.len(),
            errors,
        }
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        self.inner.children().slots.clone()
    }

    fn find(&self, name: &str) -> Result<Arc<Slot>, SupervisorError> {
        let children = self.inner.children();
        children
            .slots
            .iter()
            .find(|slot| slot.spec.name == name)
            .cloned()
            .ok_or_else(|| SupervisorError::UnknownChild {
                name: name.to_owned(),
                known: children
                    .slots
                    .iter()
                    .map(|slot| slot.spec.name.clone())
                    .collect(),
            })
    }

    async fn restart_slot(&self, slot: &Arc<Slot>) -> Result<(), SupervisorError> {
        if self.inner.closing.is_cancelled() {
            return Err(SupervisorError::ShuttingDown);
        }
        if stop_slot(slot, slot.spec.stop_timeout).await == StopOutcome::Aborted {
            warn!(child = %slot.spec.name, "child did not stop in time for its restart; aborted");
        }
        let children = self.inner.children();
        self.launch(&children, slot, true)?;
        info!(child = %slot.spec.name, "child restarted on request");
        Ok(())
    }

    /// Starts a run of `slot`, under the children lock (`children`), so that a shutdown that
    /// began sees either this run or the refusal.
    fn launch(
        &self,
        children: &Children,
        slot: &Arc<Slot>,
        explicit_restart: bool,
    ) -> Result<(), SupervisorError> {
        if children.closing {
            return Err(SupervisorError::ShuttingDown);
        }
        let mut current = lock(&slot.run);
        if current.as_ref().is_some_and(|run| !run.finished()) {
            // Someone else restarted it meanwhile: that run stands.
            return Ok(());
        }
        {
            let mut stats = slot.stats();
            stats.state = ChildState::Starting;
            stats.ended_with_error = false;
            stats.restart_times.clear();
            if explicit_restart {
                stats.restarts += 1;
            }
        }
        let (done_tx, done) = watch::channel(false);
        let run = RunCtl {
            stop: CancellationToken::new(),
            done,
            incarnation: Arc::new(Mutex::new(None)),
        };
        *current = Some(run.clone());
        drop(current);
        self.inner.tracker.spawn(supervise(
            Arc::clone(slot),
            run,
            self.inner.tracker.clone(),
            self.inner.closing.clone(),
            done_tx,
        ));
        Ok(())
    }
}

impl Slot {
    fn pause(&self) -> Result<Option<String>, String> {
        if !self.spec.pausable {
            return Err(format!(
                "{}: not pausable; it keeps running",
                self.spec.name
            ));
        }
        if self.paused.send_replace(true) {
            Ok(None)
        } else {
            debug!(child = %self.spec.name, "child paused");
            Ok(Some(format!("{}_paused", self.spec.name)))
        }
    }

    fn resume(&self) -> Result<Option<String>, String> {
        if self.paused.send_replace(false) {
            debug!(child = %self.spec.name, "child resumed");
            Ok(Some(format!("{}_resumed", self.spec.name)))
        } else {
            Ok(None)
        }
    }
}

/// Applies `op` to each slot, gathering the actions taken and the errors.
fn collect<'a>(
    slots: impl Iterator<Item = &'a Arc<Slot>>,
    op: fn(&Slot) -> Result<Option<String>, String>,
) -> (Vec<String>, Vec<String>) {
    let mut actions = Vec::new();
    let mut errors = Vec::new();
    for slot in slots {
        match op(slot) {
            Ok(Some(action)) => actions.push(action),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    (actions, errors)
}

/// Stops the current run of `slot`: fires its token and waits for it within `grace`; past it,
/// aborts its task.
async fn stop_slot(slot: &Slot, grace: Duration) -> StopOutcome {
    let Some(run) = slot.current_run() else {
        return StopOutcome::AlreadyStopped;
    };
    if run.finished() {
        return StopOutcome::AlreadyStopped;
    }
    run.stop.cancel();
    let mut done = run.done.clone();
    if tokio::time::timeout(grace, done.wait_for(|done| *done))
        .await
        .is_ok()
    {
        debug!(child = %slot.spec.name, "child stopped");
        return StopOutcome::Stopped;
    }
    warn!(child = %slot.spec.name, ?grace, "child did not stop in time; aborting it");
    if let Some(task) = lock(&run.incarnation).as_ref() {
        task.abort();
    }
    let _ = tokio::time::timeout(ABORT_GRACE, done.wait_for(|done| *done)).await;
    StopOutcome::Aborted
}

/// Tells the waiters of a run that it is over, however its task ends.
struct DoneGuard(watch::Sender<bool>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// The supervising task of one run of a child: runs incarnations one after the other, each as a
/// task of its own, restarting after errors and panics per the policy.
async fn supervise(
    slot: Arc<Slot>,
    run: RunCtl,
    tracker: TaskTracker,
    closing: CancellationToken,
    done: watch::Sender<bool>,
) {
    let _done = DoneGuard(done);
    let name = slot.spec.name.clone();
    loop {
        if run.stop.is_cancelled() {
            slot.finish(false);
            return;
        }
        slot.begin_incarnation();
        let task = tracker.spawn(incarnation(Arc::clone(&slot), run.stop.child_token()));
        *lock(&run.incarnation) = Some(task.abort_handle());
        let joined = task.await;
        *lock(&run.incarnation) = None;
        let error = match joined {
            Ok(Ok(())) => {
                debug!(child = %name, "child stopped");
                slot.finish(false);
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            Err(_) => {
                slot.finish(false);
                slot.stats().last_error = Some("aborted: it did not stop in time".to_owned());
                return;
            }
        };
        slot.record_failure(&error);
        if run.stop.is_cancelled() || closing.is_cancelled() {
            warn!(child = %name, %error, "child ended with an error while stopping; not restarted");
            slot.finish(true);
            return;
        }
        let Some(backoff) = slot.next_restart() else {
            let policy = slot.spec.policy;
            error!(
                child = %name,
                %error,
                max_restarts = policy.max_restarts,
                window_seconds = policy.window.as_secs_f64(),
                "child failed: too many restarts; it stays down until restarted explicitly"
            );
            return;
        };
        warn!(
            child = %name,
            %error,
            backoff_ms = backoff.as_secs_f64() * 1000.0,
            "child ended with an error; restarting it"
        );
        tokio::select! {
            () = run.stop.cancelled() => {
                slot.finish(true);
                return;
            }
            () = closing.cancelled() => {
                slot.finish(true);
                return;
            }
            () = tokio::time::sleep(backoff) => {}
        }
        slot.stats().restarts += 1;
    }
}

/// One incarnation of a child.
async fn incarnation(slot: Arc<Slot>, cancel: CancellationToken) -> Result<(), LoopError> {
    match slot.spec.kind.clone() {
        ChildKind::Periodic { interval, tick } => run_periodic(slot, tick, interval, cancel).await,
        ChildKind::Service { run } => {
            let ctx = ChildContext {
                cancel,
                paused: slot.paused.subscribe(),
                slot,
            };
            run(ctx).await
        }
    }
}

/// The loop of a periodic child: ticks at start (if asked), every interval and on request,
/// skipping while paused, until its token fires or a tick fails.
async fn run_periodic(
    slot: Arc<Slot>,
    tick: TickFn,
    interval: Duration,
    cancel: CancellationToken,
) -> Result<(), LoopError> {
    let now = tokio::time::Instant::now();
    let first = if slot.spec.run_at_start {
        now
    } else {
        now + interval
    };
    let mut ticker = tokio::time::interval_at(first, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
            () = slot.wake.notified() => ticker.reset(),
        }
        if slot.is_paused() {
            slot.stats().skipped_cycles += 1;
            continue;
        }
        slot.stats().cycle_started = Some((Instant::now(), unix_now()));
        let outcome = tick().await;
        slot.stats().end_cycle(outcome.as_ref().ok().copied());
        outcome?;
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
