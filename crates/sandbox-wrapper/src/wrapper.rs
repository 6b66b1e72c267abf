//! [`Wrapper`]: the one facade over everything this crate runs — the sandbox backend, sessions
//! and resources, the sandboxed task handlers registered into a `task-core` engine, and the
//! supervisor of every background loop — with the operations the microsandbox wrapper's users
//! know: start, `health_check`, `get_background_task_status`, `restart_background_tasks`,
//! `pause_background_tasks`, `resume_background_tasks`, `graceful_shutdown(timeout)` and `stop`.
//!
//! The supervised loops, in start order (shutdown goes the other way):
//! `session_cleanup`, `orphan_cleanup`, `task_heartbeat`, `lease_reaper`, `retention_pruner`,
//! `task_dispatcher`, and `store_wakeups` when the task store has wake-ups
//! ([`task_core::store::Store::wakeups`]: a store shared with other msbd nodes).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use task_core::store::{Store, StoreHealth, Submitted};
use task_core::{Engine, EngineConfig, NewTask, TaskId};

use crate::backend::local::{
    IsolationLevel, IsolationMode, IsolationReport, LocalBackend, LocalConfig,
};
use crate::backend::microsandbox::{MicrosandboxBackend, MicrosandboxConfig};
use crate::backend::{BackendError, SandboxBackend, VolumeMapping};
use crate::handlers::{CodeHandler, CommandHandler, HandlerShared, OperatorHandler};
use crate::network::{Network, NetworkSettings};
use crate::output::{DEFAULT_OUTPUT_CAP, OutputChunk, OutputStream, read_output};
use crate::session::{SessionConfig, SessionManager};
use crate::stable::{fnv1a_64, unix_now};
use crate::supervisor::{
    ActionReport, ChildSpec, ChildStatus, HealthStatus, LoopError, RestartPolicy, ShutdownStatus,
    Supervisor, TickFuture,
};
use crate::task_types::TaskTypes;

/// Which backend sandboxes run on.
#[derive(Clone, Debug, Default)]
pub enum BackendKind {
    /// Processes on this host (the default).
    #[default]
    Local,
    /// A microsandbox server.
    Microsandbox(MicrosandboxConfig),
}

/// Everything the wrapper needs to start. Plain values: the caller (msbd) reads them from the
/// environment; this crate never does.
#[derive(Clone, Debug)]
pub struct WrapperConfig {
    /// msbd's data directory: work directories, outputs and the seccomp program go here.
    pub data_dir: PathBuf,
    /// This instance's marker on everything it creates; `None` derives a stable one from the
    /// data directory, so that a restarted instance sweeps its predecessor's orphans.
    pub instance_marker: Option<String>,
    /// The backend.
    pub backend: BackendKind,
    /// How much isolation the local backend uses.
    pub isolation: IsolationMode,
    /// The weakest isolation the local backend may start with: below it, [`Wrapper::start`]
    /// fails with [`WrapperError::IsolationBelowRequired`]. `None`: any level.
    pub required_isolation: Option<IsolationLevel>,
    /// Where the local backend keeps the sessions' workspaces; `None`: see
    /// [`LocalConfig::sandbox_dir`].
    pub sandbox_dir: Option<PathBuf>,
    /// Host directories bound into every local sandbox.
    pub volumes: Vec<VolumeMapping>,
    /// The Landlock shim (see [`crate::backend::local::shim`]): `msbd` passes its own path.
    pub landlock_shim: Option<PathBuf>,
    /// Sessions and their limits.
    pub sessions: SessionConfig,
    /// The task engine's settings.
    pub engine: EngineConfig,
    /// The most bytes of output kept per task.
    pub output_cap: u64,
    /// Operator-defined task types.
    pub task_types: TaskTypes,
    /// How supervised loops are restarted.
    pub restart_policy: RestartPolicy,
    /// Network for sandboxes: the default policy and what callers may ask for.
    pub network: NetworkSettings,
}

impl WrapperConfig {
    /// This instance's marker: the one set, else one derived from the data directory.
    pub fn marker(&self) -> String {
        self.instance_marker
            .clone()
            .unwrap_or_else(|| marker_for(&self.data_dir))
    }

    /// The local backend's configuration, as [`Wrapper::start`] makes it (`msbd doctor` checks
    /// the same one).
    pub fn local_config(&self) -> LocalConfig {
        let mut local = LocalConfig::new(&self.data_dir, self.marker());
        local.isolation = self.isolation;
        local.sandbox_dir = self.sandbox_dir.clone();
        local.volumes = self.volumes.clone();
        local.landlock_shim = self.landlock_shim.clone();
        local.network = Network::new(self.network.clone());
        local
    }

    /// The defaults, on a data directory.
    pub fn new(data_dir: impl Into<PathBuf>) -> WrapperConfig {
        WrapperConfig {
            data_dir: data_dir.into(),
            instance_marker: None,
            backend: BackendKind::Local,
            isolation: IsolationMode::Strongest,
            required_isolation: None,
            sandbox_dir: None,
            volumes: Vec::new(),
            landlock_shim: None,
            sessions: SessionConfig::default(),
            engine: EngineConfig::default(),
            output_cap: DEFAULT_OUTPUT_CAP,
            task_types: TaskTypes::default(),
            restart_policy: RestartPolicy::default(),
            network: NetworkSettings::default(),
        }
    }
}

/// Why the wrapper could not start or do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum WrapperError {
    /// The backend could not be prepared.
    #[error("sandbox backend: {0}")]
    Backend(#[from] BackendError),
    /// The engine could not start.
    #[error("task engine: {0}")]
    Engine(#[from] task_core::Error),
    /// The local backend's isolation is weaker than the configuration requires.
    #[error(
        "sandbox isolation on this host is {level}, below the required {required}: {}",
        missing.join("; ")
    )]
    IsolationBelowRequired {
        /// The level the host gives.
        level: IsolationLevel,
        /// The level required.
        required: IsolationLevel,
        /// The layers that are missing, each with why.
        missing: Vec<String>,
    },
    /// A file could not be used.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The wrapper. Cheap to clone: clones share one instance.
#[derive(Clone)]
pub struct Wrapper {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    sessions: SessionManager,
    supervisor: Supervisor,
    shared: Arc<HandlerShared>,
    task_types: TaskTypes,
    isolation_report: Option<IsolationReport>,
    backend_name: &'static str,
    isolation: String,
    marker: String,
    started: Instant,
    shutdown: tokio::sync::Mutex<Option<GracefulShutdownReport>>,
    startup_sweep: Mutex<Option<String>>,
    network: Arc<Network>,
}

/// The status of the session manager, as the microsandbox wrapper reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionManagerStatus {
    /// `healthy`, `degraded` or `unhealthy`.
    pub status: HealthStatus,
    /// Whether the session cleanup loop is healthy.
    pub cleanup_task_healthy: bool,
    /// Whether it is alive.
    pub cleanup_task_exists: bool,
    /// How often it runs.
    pub cleanup_interval_seconds: f64,
    /// How long an idle session lives.
    pub session_timeout_seconds: f64,
    /// How long the manager has run.
    pub manager_uptime_seconds: f64,
    /// Sessions alive.
    pub active_sessions: usize,
    /// Sessions expired since start.
    pub total_sessions_expired: u64,
}

/// The status of the resource manager, as the microsandbox wrapper reported it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceManagerStatus {
    /// `healthy`, `degraded` or `unhealthy`.
    pub status: HealthStatus,
    /// Whether the orphan cleanup loop is healthy.
    pub orphan_cleanup_task_healthy: bool,
    /// Whether it is alive.
    pub orphan_cleanup_task_exists: bool,
    /// How often it runs.
    pub orphan_cleanup_interval_seconds: f64,
    /// Orphan sweeps run.
    pub total_cleanup_cycles: u64,
    /// Orphans removed.
    pub total_orphans_cleaned: u64,
    /// Sessions alive and their limit.
    pub sessions: usize,
    /// The limit on sessions.
    pub max_sessions: usize,
    /// Flavor memory held, in MiB.
    pub memory_mb: u64,
    /// The limit, in MiB.
    pub max_total_memory_mb: u64,
}

/// Every component: the two managers, then each supervised loop by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Components {
    /// The session manager.
    pub session_manager: SessionManagerStatus,
    /// The resource manager.
    pub resource_manager: ResourceManagerStatus,
    /// Each supervised loop (`session_cleanup`, `task_dispatcher`, ...).
    #[serde(flatten)]
    pub loops: BTreeMap<String, ChildStatus>,
}

/// What `get_background_task_status` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackgroundTaskStatus {
    /// The worst of the components.
    pub overall_status: HealthStatus,
    /// When, in Unix seconds.
    pub timestamp: f64,
    /// One entry per component.
    pub components: Components,
}

/// The task engine's part of a health check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineHealth {
    /// `healthy` unless its loops are not.
    pub status: HealthStatus,
    /// Tasks running in this process.
    pub running_tasks: usize,
    /// The most tasks running at once.
    pub concurrency: usize,
    /// Whether the queue is paused by an operator.
    pub queue_paused: bool,
    /// Task types it runs.
    pub task_types: Vec<String>,
}

/// The sandbox backend's part of a health check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SandboxHealth {
    /// `healthy`, or `degraded` when isolation is below the strong level.
    pub status: HealthStatus,
    /// `local` or `microsandbox`.
    pub backend: String,
    /// The isolation in use, in words.
    pub isolation: String,
    /// The local backend's report (level, layers, what is missing and why).
    pub isolation_report: Option<IsolationReport>,
}

/// The components of a health check, each with its `status`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthComponents {
    /// The task store: whether its writes work, and if not what is wrong.
    pub task_store: StoreHealth,
    /// The session manager (its loop: `session_cleanup`).
    pub session_manager: SessionManagerStatus,
    /// The resource manager (its loop: `orphan_cleanup`).
    pub resource_manager: ResourceManagerStatus,
    /// The task engine (its loops: the dispatcher, heartbeat, reaper and pruner).
    pub task_engine: EngineHealth,
    /// The sandbox backend and its isolation.
    pub sandbox: SandboxHealth,
}

/// What `health_check` answers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthReport {
    /// The worst of the components.
    pub status: HealthStatus,
    /// When, in Unix seconds.
    pub timestamp: f64,
    /// How long the wrapper has run.
    pub uptime_seconds: f64,
    /// The components.
    pub components: HealthComponents,
    /// The background loops in detail.
    pub background_tasks: BackgroundTaskStatus,
}

/// What `graceful_shutdown` answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GracefulShutdownReport {
    /// `success`, `partial_success` or `timeout`.
    pub status: ShutdownStatus,
    /// When it began, in Unix seconds.
    pub start_time: f64,
    /// When it ended.
    pub end_time: f64,
    /// How long it took.
    pub duration_seconds: f64,
    /// Loops stopped.
    pub components_stopped: usize,
    /// Loops there were.
    pub components_expected: usize,
    /// Tasks running when it began.
    pub tasks_running_at_start: usize,
    /// Tasks cancelled at the deadline and put back in the queue for the next start.
    pub tasks_interrupted: usize,
    /// Sessions (sandboxes) stopped.
    pub sandboxes_stopped: usize,
    /// How many things went wrong.
    pub error_count: usize,
    /// What went wrong.
    pub errors: Vec<String>,
}

/// A stable marker for a data directory: `i` and 10 hex digits of a hash of its path.
pub fn marker_for(data_dir: &std::path::Path) -> String {
    let path = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    let hash = fnv1a_64(path.as_os_str().as_encoded_bytes());
    format!("i{:010x}", hash & 0xff_ffff_ffff)
}

impl Wrapper {
    /// Starts everything: prepares the backend (detecting isolation), sweeps orphans left by a
    /// previous run, builds the engine on `store` with the sandboxed handlers (recovering tasks
    /// left running, unless the store is shared with other msbd nodes), and starts the
    /// supervised loops. What a shared store asks for (its engine settings, maintenance only
    /// while this node leads, its wake-ups) the wrapper learns from the store itself
    /// ([`Store`]'s capabilities), whichever store it is.
    pub async fn start(
        store: Arc<dyn Store>,
        config: WrapperConfig,
    ) -> Result<Wrapper, WrapperError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| WrapperError::Io {
            action: format!("creating the data directory {}", config.data_dir.display()),
            source,
        })?;
        let marker = config.marker();
        // The policy of a session whose caller names none: checked now, not at the first task.
        let default_network = config
            .network
            .policy(None, &[])
            .map_err(|error| WrapperError::Backend(BackendError::InvalidRequest(error)))?;
        let mut network = Network::new(config.network.clone());
        let (backend, isolation_report): (Arc<dyn SandboxBackend>, Option<IsolationReport>) =
            match &config.backend {
                BackendKind::Local => {
                    let local = config.local_config();
                    network = local.network.clone();
                    let backend = LocalBackend::new(local)?;
                    let report = backend.isolation_report().clone();
                    if let Some(required) = config.required_isolation
                        && report.level < required
                    {
                        return Err(WrapperError::IsolationBelowRequired {
                            level: report.level,
                            required,
                            missing: report.missing,
                        });
                    }
                    tracing::info!(
                        workspaces = %backend.sandbox_root().display(),
                        "sandbox workspaces"
                    );
                    (Arc::new(backend), Some(report))
                }
                BackendKind::Microsandbox(microsandbox) => {
                    let mut microsandbox = microsandbox.clone();
                    if microsandbox.instance_marker.is_empty() {
                        microsandbox.instance_marker = marker.clone();
                    }
                    (Arc::new(MicrosandboxBackend::new(microsandbox)?), None)
                }
            };
        let backend_name = backend.name();
        let isolation = backend.isolation();
        tracing::info!(backend = backend_name, %isolation, "sandbox backend ready");
        // A weaker level than the strong one is allowed (no level was required, or a weaker
        // one): said once, with why.
        if let Some(report) = &isolation_report
            && report.level < IsolationLevel::Strong
        {
            tracing::warn!(
                level = %report.level,
                "sandbox isolation is {}, not strong: {}",
                report.level,
                report.missing.join("; ")
            );
        }
        let mut session_config = config.sessions.clone();
        session_config.default_network = default_network;
        let sessions = SessionManager::new(backend, session_config);
        // Whatever a previous run left behind goes before anything new starts.
        let startup_sweep = match sessions.sweep_orphans().await {
            Ok(_) => None,
            Err(error) => {
                tracing::warn!(%error, "the orphan sweep at start failed");
                Some(error.to_string())
            }
        };
        let outputs_dir = config.data_dir.join("outputs");
        std::fs::create_dir_all(&outputs_dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                // Outputs are the tasks' own: no sandbox may read another's.
                std::fs::set_permissions(&outputs_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|source| WrapperError::Io {
                action: format!("creating {}", outputs_dir.display()),
                source,
            })?;
        let shared = Arc::new(HandlerShared {
            sessions: sessions.clone(),
            outputs_dir,
            output_cap: config.output_cap,
            network: config.network.clone(),
        });
        // A store shared with other msbd nodes adjusts the engine (no recovery of running
        // tasks at start: they may be another node's; see `Store::engine_config`).
        let mut engine_config = store.engine_config(config.engine.clone());
        for spec in config.task_types.iter() {
            if let Some(limit) = spec.defaults().concurrency {
                engine_config
                    .type_limits
                    .entry(spec.name().to_owned())
                    .or_insert(limit);
            }
        }
        let mut builder = Engine::builder(store)
            .config(engine_config)
            .handler("command", CommandHandler::new(shared.clone()))
            .handler("code", CodeHandler::new(shared.clone()));
        for spec in config.task_types.iter() {
            builder = builder.handler(
                spec.name(),
                OperatorHandler::new(shared.clone(), Arc::new(spec.clone())),
            );
        }
        let engine = builder.build().await?;
        let supervisor = Supervisor::new();
        let wrapper = Wrapper {
            inner: Arc::new(Inner {
                engine,
                sessions,
                supervisor,
                shared,
                task_types: config.task_types.clone(),
                isolation_report,
                backend_name,
                isolation,
                marker,
                started: Instant::now(),
                shutdown: tokio::sync::Mutex::new(None),
                startup_sweep: Mutex::new(startup_sweep),
                network,
            }),
        };
        wrapper.start_loops(&config);
        Ok(wrapper)
    }

    /// Starts every background loop under the supervisor: session upkeep, the lease
    /// heartbeat, the queue's maintenance, the dispatcher, and a shared store's wake-ups.
    fn start_loops(&self, config: &WrapperConfig) {
        let inner = &self.inner;
        let policy = config.restart_policy;
        let engine_config = inner.engine.config().clone();
        let [cleanup, orphans] = self.session_loops(config, policy);
        let heartbeat = self.heartbeat_loop(&engine_config, policy);
        let [reaper, pruner] = self.maintenance_loops(&engine_config, policy);
        let mut specs = vec![cleanup, orphans, heartbeat, reaper, pruner];
        specs.push(self.dispatcher_loop(&engine_config, policy));
        specs.extend(self.wakeup_loop(&engine_config, policy));
        for spec in specs {
            if let Err(error) = inner.supervisor.start_child(spec) {
                tracing::error!(%error, "could not start a background loop");
            }
        }
    }

    /// Idle sessions expire; sandboxes no session owns are swept (once at start already).
    fn session_loops(&self, config: &WrapperConfig, policy: RestartPolicy) -> [ChildSpec; 2] {
        let sessions = self.inner.sessions.clone();
        let cleanup = periodic(
            "session_cleanup",
            config.sessions.cleanup_interval,
            "sessions_expired",
            policy,
            Box::new(move || {
                let sessions = sessions.clone();
                Box::pin(async move { sessions.expire_idle().await.map_err(LoopError::from) })
            }),
        )
        .run_at_start(false);
        let sessions = self.inner.sessions.clone();
        let orphans = periodic(
            "orphan_cleanup",
            config.sessions.orphan_cleanup_interval,
            "orphans_removed",
            policy,
            Box::new(move || {
                let sessions = sessions.clone();
                Box::pin(async move {
                    sessions
                        .sweep_orphans()
                        .await
                        .map(|r| r.sandboxes as u64)
                        .map_err(LoopError::from)
                })
            }),
        )
        // It ran once at start already.
        .run_at_start(false);
        [cleanup, orphans]
    }

    /// Renews the leases of the running tasks. It talks to the store, so it comes back on its
    /// own once the store answers again, however long it was away (given up, it would let every
    /// running task's lease run out), within one of its intervals.
    fn heartbeat_loop(&self, engine_config: &EngineConfig, policy: RestartPolicy) -> ChildSpec {
        let engine = self.inner.engine.clone();
        periodic(
            "task_heartbeat",
            engine_config.heartbeat_interval,
            "lease_renewals",
            policy,
            Box::new(move || {
                let engine = engine.clone();
                Box::pin(async move {
                    engine.renew_leases().await?;
                    Ok(engine.running_count() as u64)
                })
            }),
        )
        .run_at_start(false)
        // Pausing it would let running tasks' leases expire and the reaper take them back.
        .pausable(false)
        .policy(policy.never_give_up(engine_config.heartbeat_interval))
    }

    /// The queue's maintenance: the lease reaper and the retention pruner. On a shared store it
    /// is the leader's alone (a store one process owns always says this process leads).
    fn maintenance_loops(
        &self,
        engine_config: &EngineConfig,
        policy: RestartPolicy,
    ) -> [ChildSpec; 2] {
        let inner = &self.inner;
        let store_policy = store_loop_policy(policy);
        let store = inner.engine.store().clone();
        let maintains = move || store.is_maintenance_leader();
        // After this node regains the database, leases that ran out meanwhile say nothing
        // about their workers: wait two lease periods (every live node reconnects and renews
        // its leases) before taking tasks back (a store that cannot lose its connection never
        // delays this).
        let reap_grace = engine_config.lease * 2;
        let store = inner.engine.store().clone();
        let maintains_now = maintains.clone();
        let leader = move || {
            maintains_now()
                && store
                    .healthy_for()
                    .is_some_and(|healthy| healthy >= reap_grace)
        };
        let engine = inner.engine.clone();
        let reaper = periodic(
            "lease_reaper",
            engine_config.reaper_interval,
            "tasks_recovered",
            policy,
            Box::new(move || {
                let engine = engine.clone();
                let leader = leader();
                Box::pin(async move {
                    if !leader {
                        return Ok(0);
                    }
                    engine
                        .recover_expired()
                        .await
                        .map(|n| n as u64)
                        .map_err(LoopError::from)
                })
            }),
        )
        .policy(store_policy);
        let engine = inner.engine.clone();
        let outputs_dir = inner.shared.outputs_dir.clone();
        let pruner = periodic(
            "retention_pruner",
            engine_config.prune_interval,
            "tasks_pruned",
            policy,
            Box::new(move || {
                let engine = engine.clone();
                let outputs_dir = outputs_dir.clone();
                let leader = maintains();
                Box::pin(async move {
                    if !leader {
                        return Ok(0);
                    }
                    let pruned = engine.prune_expired().await?;
                    // The output files of the tasks that are gone go too (a scan of the
                    // outputs, so only after a round that pruned something).
                    if pruned > 0 {
                        remove_stale_outputs(&engine, &outputs_dir).await;
                    }
                    Ok(pruned as u64)
                })
            }),
        )
        .policy(store_policy);
        [reaper, pruner]
    }

    /// Claims and runs tasks until paused (then it waits, claiming nothing), stopped, or the
    /// engine drains.
    fn dispatcher_loop(&self, engine_config: &EngineConfig, policy: RestartPolicy) -> ChildSpec {
        let engine = self.inner.engine.clone();
        ChildSpec::service("task_dispatcher", move |mut context| {
            let engine = engine.clone();
            Box::pin(async move {
                loop {
                    if !context.wait_unpaused().await {
                        return Ok(());
                    }
                    let round = context.cancel.child_token();
                    let mut paused = context.paused.clone();
                    let run = engine.run_dispatcher(round.clone());
                    tokio::pin!(run);
                    let ended = tokio::select! {
                        result = &mut run => Some(result),
                        _ = paused.wait_for(|p| *p) => None,
                    };
                    match ended {
                        Some(result) => {
                            result?;
                            // It returns only when stopped or drained: either way, done.
                            return Ok(());
                        }
                        None => {
                            round.cancel();
                            run.await?;
                            context.skip_cycle();
                        }
                    }
                }
            })
        })
        .interval_hint(engine_config.idle_poll)
        .policy(store_loop_policy(policy))
    }

    /// A store shared with other msbd nodes wakes the dispatcher when another node queues
    /// work; `None` for a store one process owns.
    fn wakeup_loop(
        &self,
        engine_config: &EngineConfig,
        policy: RestartPolicy,
    ) -> Option<ChildSpec> {
        let wakeups = self.inner.engine.store().clone().wakeups()?;
        let engine = self.inner.engine.clone();
        Some(
            ChildSpec::service("store_wakeups", move |context| {
                let run = wakeups(engine.clone(), context.cancel.clone());
                Box::pin(async move { run.await.map_err(LoopError::from) })
            })
            .interval_hint(engine_config.idle_poll)
            .pausable(false)
            .policy(store_loop_policy(policy)),
        )
    }

    /// The task engine (submit, get, list, wait, cancel...).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The sessions.
    pub fn sessions(&self) -> &SessionManager {
        &self.inner.sessions
    }

    /// Network for sandboxes: the operator's settings and the proxy's counts.
    pub fn network(&self) -> &Network {
        &self.inner.network
    }

    /// The supervisor of the background loops.
    pub fn supervisor(&self) -> &Supervisor {
        &self.inner.supervisor
    }

    /// The operator-defined task types.
    pub fn task_types(&self) -> &TaskTypes {
        &self.inner.task_types
    }

    /// This instance's marker.
    pub fn instance_marker(&self) -> &str {
        &self.inner.marker
    }

    /// The isolation in use, in words.
    pub fn isolation(&self) -> &str {
        &self.inner.isolation
    }

    /// The local backend's isolation level and what is missing (`None` for microsandbox).
    pub fn isolation_report(&self) -> Option<&IsolationReport> {
        self.inner.isolation_report.as_ref()
    }

    /// A task of a type with its params, with an operator-defined type's defaults applied
    /// (priority, attempts, timeout).
    pub fn new_task(&self, task_type: &str, params: Value) -> NewTask {
        match self.inner.task_types.get(task_type) {
            Some(spec) => spec.new_task(params),
            None => NewTask::new(task_type, params),
        }
    }

    /// Submits a task (see [`Engine::submit`]).
    pub async fn submit(&self, task: NewTask) -> Result<Submitted, task_core::Error> {
        self.inner.engine.submit(task).await
    }

    /// Reads the output of attempt `attempt` of a task (see [`crate::handlers::output_path`]),
    /// both streams or one ([`OutputStream`]), from byte `cursor` on (of that file), at most
    /// `max` bytes; works while the attempt runs. `None`: that attempt has no such file (it has
    /// not started yet, ended before it had one, was pruned: see
    /// [`crate::handlers::KEPT_ATTEMPTS`], or ran before msbd kept each stream alone). One file
    /// open, whatever the attempt.
    pub fn read_output(
        &self,
        id: TaskId,
        attempt: u32,
        stream: OutputStream,
        cursor: u64,
        max: usize,
    ) -> std::io::Result<Option<OutputChunk>> {
        let path = stream.path(&self.inner.shared.output_path(id, attempt));
        match read_output(&path, cursor, max) {
            Ok(chunk) => Ok(Some(chunk)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The last `max` bytes (at most) of the output of attempt `attempt` of task `id` (both
    /// streams or one), and the offset they start at; `None` as for [`Wrapper::read_output`].
    pub fn read_output_tail(
        &self,
        id: TaskId,
        attempt: u32,
        stream: OutputStream,
        max: usize,
    ) -> std::io::Result<Option<(u64, OutputChunk)>> {
        let path = stream.path(&self.inner.shared.output_path(id, attempt));
        match crate::output::read_output_tail(&path, max) {
            Ok(tail) => Ok(Some(tail)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The attempts of a task whose output is kept, when `latest` is its latest attempt (the
    /// ones among the last [`crate::handlers::KEPT_ATTEMPTS`] that have an output file).
    pub fn attempts_with_output(&self, id: TaskId, latest: u32) -> Vec<u32> {
        crate::handlers::kept_attempts(latest)
            .filter(|&attempt| self.inner.shared.output_path(id, attempt).exists())
            .collect()
    }

    /// Deletes the output files of tasks that no longer exist (pruned, or deleted with
    /// [`Engine::delete_finished`]); returns how many. The retention pruner does this after every
    /// round that pruned tasks; call it after deleting tasks to free their disk at once.
    pub async fn remove_stale_outputs(&self) -> usize {
        remove_stale_outputs(&self.inner.engine, &self.inner.shared.outputs_dir).await
    }

    /// The background loops' status, in the shape the microsandbox wrapper's users know.
    pub fn get_background_task_status(&self) -> BackgroundTaskStatus {
        let inner = &self.inner;
        let health = inner.supervisor.health();
        let loops = health.components;
        let child_health = |name: &str| {
            loops
                .get(name)
                .map_or((HealthStatus::Unhealthy, false, false), |c| {
                    let status = if !c.healthy {
                        if c.state == crate::supervisor::ChildState::Failed {
                            HealthStatus::Unhealthy
                        } else {
                            HealthStatus::Degraded
                        }
                    } else if c.state == crate::supervisor::ChildState::Paused {
                        HealthStatus::Degraded
                    } else {
                        HealthStatus::Healthy
                    };
                    (status, c.healthy, c.exists)
                })
        };
        let (cleanup_status, cleanup_healthy, cleanup_exists) = child_health("session_cleanup");
        let (orphan_status, orphan_healthy, orphan_exists) = child_health("orphan_cleanup");
        let config = inner.sessions.config();
        let resources = inner.sessions.resource_stats();
        let startup_sweep_failed = inner
            .startup_sweep
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
            && loops.get("orphan_cleanup").is_none_or(|c| c.cycles == 0);
        let orphan_status = if startup_sweep_failed {
            orphan_status.max(HealthStatus::Degraded)
        } else {
            orphan_status
        };
        BackgroundTaskStatus {
            overall_status: health.overall_status.max(orphan_status),
            timestamp: unix_now(),
            components: Components {
                session_manager: SessionManagerStatus {
                    status: cleanup_status,
                    cleanup_task_healthy: cleanup_healthy,
                    cleanup_task_exists: cleanup_exists,
                    cleanup_interval_seconds: config.cleanup_interval.as_secs_f64(),
                    session_timeout_seconds: config.session_timeout.as_secs_f64(),
                    manager_uptime_seconds: inner.started.elapsed().as_secs_f64(),
                    active_sessions: resources.sessions,
                    total_sessions_expired: inner.sessions.expired_total(),
                },
                resource_manager: ResourceManagerStatus {
                    status: orphan_status,
                    orphan_cleanup_task_healthy: orphan_healthy && !startup_sweep_failed,
                    orphan_cleanup_task_exists: orphan_exists,
                    orphan_cleanup_interval_seconds: config.orphan_cleanup_interval.as_secs_f64(),
                    total_cleanup_cycles: resources.total_cleanup_cycles,
                    total_orphans_cleaned: resources.total_orphans_cleaned,
                    sessions: resources.sessions,
                    max_sessions: resources.max_sessions,
                    memory_mb: resources.memory_mb,
                    max_total_memory_mb: resources.max_total_memory_mb,
                },
                loops,
            },
        }
    }

    /// A health check of every component: the managers, the engine, the sandbox backend (with
    /// the isolation level), and the background loops.
    pub async fn health_check(&self) -> HealthReport {
        let inner = &self.inner;
        let background = self.get_background_task_status();
        let loops = &background.components.loops;
        let engine_loops = [
            "task_dispatcher",
            "task_heartbeat",
            "lease_reaper",
            "retention_pruner",
        ];
        let engine_status = engine_loops
            .iter()
            .map(|name| match loops.get(*name) {
                Some(c) if c.state == crate::supervisor::ChildState::Failed => {
                    HealthStatus::Unhealthy
                }
                Some(c) if !c.healthy || c.state == crate::supervisor::ChildState::Paused => {
                    HealthStatus::Degraded
                }
                Some(_) => HealthStatus::Healthy,
                None => HealthStatus::Unhealthy,
            })
            .max()
            .unwrap_or(HealthStatus::Healthy);
        let engine = &inner.engine;
        let engine_health = EngineHealth {
            status: engine_status,
            running_tasks: engine.running_count(),
            concurrency: engine.concurrency(),
            queue_paused: engine.is_queue_paused(),
            task_types: engine.task_types(),
        };
        let sandbox_status = match &inner.isolation_report {
            Some(report) if report.level < crate::backend::local::IsolationLevel::Strong => {
                HealthStatus::Degraded
            }
            _ => HealthStatus::Healthy,
        };
        let sandbox = SandboxHealth {
            status: sandbox_status,
            backend: inner.backend_name.to_owned(),
            isolation: inner.isolation.clone(),
            isolation_report: inner.isolation_report.clone(),
        };
        let store = engine.store_health();
        let store_status = match store.status {
            task_core::store::StoreStatus::Healthy => HealthStatus::Healthy,
            task_core::store::StoreStatus::Degraded => HealthStatus::Degraded,
            task_core::store::StoreStatus::Unhealthy => HealthStatus::Unhealthy,
        };
        let components = HealthComponents {
            task_store: store,
            session_manager: background.components.session_manager.clone(),
            resource_manager: background.components.resource_manager.clone(),
            task_engine: engine_health,
            sandbox,
        };
        // The isolation level lowers health only to `degraded`: it is the host's, not a fault.
        let status = background
            .overall_status
            .max(engine_status)
            .max(sandbox_status)
            .max(store_status);
        HealthReport {
            status,
            timestamp: unix_now(),
            uptime_seconds: inner.started.elapsed().as_secs_f64(),
            components,
            background_tasks: background,
        }
    }

    /// Restarts every failed loop (or one stopped by an error).
    pub async fn restart_background_tasks(&self) -> ActionReport {
        self.inner.supervisor.restart_unhealthy().await
    }

    /// Pauses every loop that can pause (they stay alive and skip their work). The heartbeat
    /// does not pause: running tasks would lose their leases.
    pub fn pause_background_tasks(&self) -> ActionReport {
        self.inner.supervisor.pause_all()
    }

    /// Resumes every paused loop.
    pub fn resume_background_tasks(&self) -> ActionReport {
        self.inner.supervisor.resume_all()
    }

    /// Stops gracefully within `timeout`: stops accepting tasks, lets running ones finish, then
    /// cancels what is left (those tasks go back to the queue for the next start), stops the
    /// loops in reverse start order, stops every sandbox, and flushes the store. A second call
    /// returns the first call's report.
    pub async fn graceful_shutdown(&self, timeout: Duration) -> GracefulShutdownReport {
        let inner = &self.inner;
        let mut done = inner.shutdown.lock().await;
        if let Some(report) = done.as_ref() {
            return report.clone();
        }
        let start_time = unix_now();
        let started = Instant::now();
        let deadline = started + timeout;
        // Keep a little for the sandboxes and the flush.
        let reserve = (timeout / 5).min(Duration::from_secs(2));
        let engine_report = inner.engine.shutdown(timeout.saturating_sub(reserve)).await;
        let left = deadline.saturating_duration_since(Instant::now());
        let loops = inner
            .supervisor
            .shutdown(left.max(Duration::from_millis(100)))
            .await;
        let mut errors = loops.errors.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let sandboxes_stopped = match tokio::time::timeout(
            left.max(Duration::from_millis(500)),
            inner.sessions.stop_all(),
        )
        .await
        {
            Ok(stopped) => stopped,
            Err(_) => {
                errors.push("stopping the sandboxes did not finish within the deadline".into());
                0
            }
        };
        inner.engine.store().flush().await.unwrap_or_else(|error| {
            errors.push(format!("flushing the store: {error}"));
        });
        let status = if started.elapsed() > timeout + Duration::from_millis(500) {
            ShutdownStatus::Timeout
        } else if errors.is_empty() {
            ShutdownStatus::Success
        } else {
            ShutdownStatus::PartialSuccess
        };
        let report = GracefulShutdownReport {
            status,
            start_time,
            end_time: unix_now(),
            duration_seconds: started.elapsed().as_secs_f64(),
            components_stopped: loops.components_stopped,
            components_expected: loops.components_expected,
            tasks_running_at_start: engine_report.running_at_start,
            tasks_interrupted: engine_report.interrupted,
            sandboxes_stopped,
            error_count: errors.len(),
            errors,
        };
        tracing::debug!(?report, "sandbox wrapper stopped");
        *done = Some(report.clone());
        report
    }

    /// The same as [`Wrapper::graceful_shutdown`].
    pub async fn stop(&self, timeout: Duration) -> GracefulShutdownReport {
        self.graceful_shutdown(timeout).await
    }
}

/// A loop that runs `tick` every `interval`, counting what each round did under `label`.
fn periodic(
    name: &str,
    interval: Duration,
    label: &str,
    policy: RestartPolicy,
    tick: Box<dyn Fn() -> TickFuture + Send + Sync>,
) -> ChildSpec {
    ChildSpec::periodic(name, interval, move || tick())
        .item_label(label)
        .policy(policy)
}

/// The policy of the loops that talk to the task store: they come back on their own once it
/// answers again, however long it was away (a database outage fails every call of theirs after
/// `unavailable_wait`): given up, the dispatcher would claim nothing more.
fn store_loop_policy(policy: RestartPolicy) -> RestartPolicy {
    policy.never_give_up(Duration::from_secs(1))
}

/// Deletes the output files (`<task id>.log`, `<task id>.<attempt>.log`, and each with
/// `.stdout` or `.stderr` after it) under `outputs_dir` whose task the store no longer holds;
/// returns how many files. Files that are not named so are left alone.
async fn remove_stale_outputs(engine: &Engine, outputs_dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(outputs_dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(id) = name.to_str().and_then(output_file_task) else {
            continue;
        };
        if let Err(task_core::Error::TaskNotFound { .. }) = engine.get(id).await
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// The task whose output a file of the outputs directory is, by its name: `<task id>.log`
/// (a first attempt) or `<task id>.<attempt>.log` (a later one), either perhaps followed by
/// `.stdout` or `.stderr` (one stream's own file).
fn output_file_task(name: &str) -> Option<TaskId> {
    let name = name
        .strip_suffix(".stdout")
        .or_else(|| name.strip_suffix(".stderr"))
        .unwrap_or(name);
    let stem = name.strip_suffix(".log")?;
    let (id, attempt) = match stem.split_once('.') {
        Some((id, attempt)) => (id, Some(attempt)),
        None => (stem, None),
    };
    if let Some(attempt) = attempt
        && !attempt.parse::<u32>().is_ok_and(|n| n >= 2)
    {
        return None;
    }
    id.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::output_file_task;
    use task_core::TaskId;

    #[test]
    fn markers_keep_their_values() {
        // Captured before the FNV-1a copies were merged: markers name what is left on the host.
        let dir = std::path::Path::new("/nonexistent/msbd-data");
        assert_eq!(super::marker_for(dir), "if32a330347");
    }

    #[test]
    fn output_files_are_known_by_name_whatever_the_attempt() {
        let id = TaskId::new();
        assert_eq!(output_file_task(&format!("{id}.log")), Some(id));
        assert_eq!(output_file_task(&format!("{id}.2.log")), Some(id));
        assert_eq!(output_file_task(&format!("{id}.117.log")), Some(id));
        for stream in ["stdout", "stderr"] {
            assert_eq!(output_file_task(&format!("{id}.log.{stream}")), Some(id));
            assert_eq!(output_file_task(&format!("{id}.3.log.{stream}")), Some(id));
        }
        for other in [
            format!("{id}.log.stdin"),
            format!("{id}.stdout"),
            format!("{id}.log.stdout.stderr"),
            format!("{id}.1.log"),
            format!("{id}.0.log"),
            format!("{id}.x.log"),
            format!("{id}.2.3.log"),
            format!("{id}.txt"),
            format!("{id}"),
            "notes.log".to_owned(),
            "seccomp.bpf".to_owned(),
        ] {
            assert_eq!(output_file_task(&other), None, "{other}");
        }
    }
}
