//! The supervision tools (for operators; listed only when enabled): `health_check`,
//! `get_background_task_status`, `restart_background_tasks`, `pause_background_tasks`,
//! `resume_background_tasks`. Each answers with a report in the shape the microsandbox
//! wrapper's users know: the typed answers below, converted by hand from the wrapper's reports.

use std::collections::BTreeMap;

use rmcp::handler::server::common::schema_for_output;
use rmcp::model::CallToolResult;
use rmcp::schemars::JsonSchema;
use rmcp::{ErrorData as McpError, tool, tool_router};
use sandbox_wrapper::backend::local::{IsolationLevel, IsolationReport};
use sandbox_wrapper::supervisor::{
    ActionReport, ActionStatus, ChildState, ChildStatus, HealthStatus,
};
use sandbox_wrapper::wrapper::{
    BackgroundTaskStatus, EngineHealth, HealthReport, ResourceManagerStatus, SandboxHealth,
    SessionManagerStatus,
};
use serde::Serialize;
use task_core::store::{StoreHealth, StoreStatus};

use crate::server::{McpServer, answer};

/// The health of a component, or of the whole: ordered from best to worst.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, JsonSchema, strum::IntoStaticStr,
)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum Health {
    /// Working as it should.
    Healthy,
    /// Working, but something is off (a loop backing off or paused, weaker isolation, a store
    /// write that failed for a reason that may pass).
    Degraded,
    /// Not working: a loop failed for good, or the store refuses writes.
    Unhealthy,
}

impl From<HealthStatus> for Health {
    fn from(status: HealthStatus) -> Health {
        match status {
            HealthStatus::Healthy => Health::Healthy,
            HealthStatus::Degraded => Health::Degraded,
            HealthStatus::Unhealthy => Health::Unhealthy,
        }
    }
}

impl From<StoreStatus> for Health {
    fn from(status: StoreStatus) -> Health {
        match status {
            StoreStatus::Healthy => Health::Healthy,
            StoreStatus::Degraded => Health::Degraded,
            StoreStatus::Unhealthy => Health::Unhealthy,
        }
    }
}

/// The state of a background loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "snake_case")]
pub enum LoopState {
    /// About to run (registered or restarted).
    Starting,
    /// Running.
    Running,
    /// Alive but paused: it skips its work.
    Paused,
    /// Ended with an error; waiting for its restart.
    BackingOff,
    /// Restarted too often; down until restarted explicitly (`restart_background_tasks`).
    Failed,
    /// Stopped.
    Stopped,
}

impl From<ChildState> for LoopState {
    fn from(state: ChildState) -> LoopState {
        match state {
            ChildState::Starting => LoopState::Starting,
            ChildState::Running => LoopState::Running,
            ChildState::Paused => LoopState::Paused,
            ChildState::BackingOff => LoopState::BackingOff,
            ChildState::Failed => LoopState::Failed,
            ChildState::Stopped => LoopState::Stopped,
        }
    }
}

/// One background loop: state, health and counters.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct LoopView {
    /// The loop's name.
    pub name: String,
    /// Its state.
    pub state: LoopState,
    /// False when it failed, is backing off after an error, or stopped because of one.
    pub healthy: bool,
    /// Whether its task is alive.
    pub exists: bool,
    /// Whether `pause_background_tasks` pauses it.
    pub pausable: bool,
    /// How often it runs, in seconds.
    pub interval_seconds: Option<f64>,
    /// Cycles run, across restarts.
    pub cycles: u64,
    /// Cycles skipped while paused.
    pub skipped_cycles: u64,
    /// What its items are (`tasks_recovered`...).
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
    /// When its current (or last) run started (Unix seconds).
    pub started_at: f64,
    /// How long its current run has lasted (0 when its task is not alive).
    pub uptime_seconds: f64,
}

impl From<&ChildStatus> for LoopView {
    fn from(child: &ChildStatus) -> LoopView {
        LoopView {
            name: child.name.clone(),
            state: child.state.into(),
            healthy: child.healthy,
            exists: child.exists,
            pausable: child.pausable,
            interval_seconds: child.interval_seconds,
            cycles: child.cycles,
            skipped_cycles: child.skipped_cycles,
            items_label: child.items_label.clone(),
            items_total: child.items_total,
            errors: child.errors,
            restarts: child.restarts,
            last_error: child.last_error.clone(),
            last_run_at: child.last_run_at,
            last_duration_ms: child.last_duration_ms,
            started_at: child.started_at,
            uptime_seconds: child.uptime_seconds,
        }
    }
}

/// The session manager.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct SessionManagerView {
    /// Its health (its loop's).
    pub status: Health,
    /// In `health_check`: whether its loop (`session_cleanup`) is healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background_task_healthy: Option<bool>,
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

impl SessionManagerView {
    fn new(status: &SessionManagerStatus, in_health_check: bool) -> SessionManagerView {
        SessionManagerView {
            status: status.status.into(),
            background_task_healthy: in_health_check.then_some(status.cleanup_task_healthy),
            cleanup_task_healthy: status.cleanup_task_healthy,
            cleanup_task_exists: status.cleanup_task_exists,
            cleanup_interval_seconds: status.cleanup_interval_seconds,
            session_timeout_seconds: status.session_timeout_seconds,
            manager_uptime_seconds: status.manager_uptime_seconds,
            active_sessions: status.active_sessions,
            total_sessions_expired: status.total_sessions_expired,
        }
    }
}

/// The resource manager.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct ResourceManagerView {
    /// Its health (its loop's).
    pub status: Health,
    /// In `health_check`: whether its loop (`orphan_cleanup`) is healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background_task_healthy: Option<bool>,
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
    /// Sessions alive.
    pub sessions: usize,
    /// The limit on sessions.
    pub max_sessions: usize,
    /// Flavor memory held, in MiB.
    pub memory_mb: u64,
    /// The limit, in MiB (the largest 64-bit number when there is none).
    pub max_total_memory_mb: u64,
}

impl ResourceManagerView {
    fn new(status: &ResourceManagerStatus, in_health_check: bool) -> ResourceManagerView {
        ResourceManagerView {
            status: status.status.into(),
            background_task_healthy: in_health_check.then_some(status.orphan_cleanup_task_healthy),
            orphan_cleanup_task_healthy: status.orphan_cleanup_task_healthy,
            orphan_cleanup_task_exists: status.orphan_cleanup_task_exists,
            orphan_cleanup_interval_seconds: status.orphan_cleanup_interval_seconds,
            total_cleanup_cycles: status.total_cleanup_cycles,
            total_orphans_cleaned: status.total_orphans_cleaned,
            sessions: status.sessions,
            max_sessions: status.max_sessions,
            memory_mb: status.memory_mb,
            max_total_memory_mb: status.max_total_memory_mb,
        }
    }
}

/// The components of `get_background_task_status`: the two managers, then every loop by name.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct BackgroundComponents {
    /// The session manager.
    pub session_manager: SessionManagerView,
    /// The resource manager.
    pub resource_manager: ResourceManagerView,
    /// Each background loop, by name (`session_cleanup`, `task_dispatcher`...).
    #[serde(flatten)]
    pub loops: BTreeMap<String, LoopView>,
}

/// The answer of `get_background_task_status` (and `background_tasks` of `health_check`).
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct BackgroundTasksAnswer {
    /// The worst of the components.
    pub overall_status: Health,
    /// When (Unix seconds).
    pub timestamp: f64,
    /// One entry per component.
    pub components: BackgroundComponents,
}

impl From<&BackgroundTaskStatus> for BackgroundTasksAnswer {
    fn from(status: &BackgroundTaskStatus) -> BackgroundTasksAnswer {
        let components = &status.components;
        BackgroundTasksAnswer {
            overall_status: status.overall_status.into(),
            timestamp: status.timestamp,
            components: BackgroundComponents {
                session_manager: SessionManagerView::new(&components.session_manager, false),
                resource_manager: ResourceManagerView::new(&components.resource_manager, false),
                loops: components
                    .loops
                    .iter()
                    .map(|(name, child)| (name.clone(), child.into()))
                    .collect(),
            },
        }
    }
}

/// The task store.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct StoreView {
    /// `healthy`; `degraded` when the last write failed for a reason that may pass;
    /// `unhealthy` when writes are refused until an operator acts.
    pub status: Health,
    /// While not healthy: what is wrong and what to do.
    pub problem: Option<String>,
    /// While not healthy: since when (milliseconds since the Unix epoch).
    pub since_ms: Option<i64>,
}

impl From<&StoreHealth> for StoreView {
    fn from(store: &StoreHealth) -> StoreView {
        StoreView {
            status: store.status.into(),
            problem: store.problem.clone(),
            since_ms: store.since_ms,
        }
    }
}

/// The task engine.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct EngineView {
    /// `healthy` unless its loops are not.
    pub status: Health,
    /// Whether its loops are all healthy.
    pub background_task_healthy: bool,
    /// Tasks running in this process.
    pub running_tasks: usize,
    /// The most tasks running at once.
    pub concurrency: usize,
    /// Whether the queue is paused.
    pub queue_paused: bool,
    /// The task types it runs.
    pub task_types: Vec<String>,
}

impl From<&EngineHealth> for EngineView {
    fn from(engine: &EngineHealth) -> EngineView {
        EngineView {
            status: engine.status.into(),
            background_task_healthy: engine.status == HealthStatus::Healthy,
            running_tasks: engine.running_tasks,
            concurrency: engine.concurrency,
            queue_paused: engine.queue_paused,
            task_types: engine.task_types.clone(),
        }
    }
}

/// How strong the sandboxes' isolation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "lowercase")]
pub enum IsolationLevelView {
    /// No isolation (tests and benchmarks only).
    Off,
    /// Process-level measures only: nothing restricts files or network.
    Minimal,
    /// Files and network are restricted, but a layer of the strong level is missing.
    Standard,
    /// cgroups, an unprivileged uid, namespaces and seccomp.
    Strong,
}

/// The local backend's isolation: its level, its layers, and what is missing and why.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct IsolationView {
    /// The level.
    pub level: IsolationLevelView,
    /// The layers in use, `+`-joined.
    pub layers: String,
    /// The layers missing, each with why.
    pub missing: Vec<String>,
}

impl From<&IsolationReport> for IsolationView {
    fn from(report: &IsolationReport) -> IsolationView {
        IsolationView {
            level: match report.level {
                IsolationLevel::Off => IsolationLevelView::Off,
                IsolationLevel::Minimal => IsolationLevelView::Minimal,
                IsolationLevel::Standard => IsolationLevelView::Standard,
                IsolationLevel::Strong => IsolationLevelView::Strong,
            },
            layers: report.layers.clone(),
            missing: report.missing.clone(),
        }
    }
}

/// The sandbox backend.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct SandboxView {
    /// `healthy`, or `degraded` when the isolation is below the strong level.
    pub status: Health,
    /// `local` or `microsandbox`.
    pub backend: String,
    /// The isolation in use, in words.
    pub isolation: String,
    /// The local backend's isolation in detail.
    pub isolation_report: Option<IsolationView>,
}

impl From<&SandboxHealth> for SandboxView {
    fn from(sandbox: &SandboxHealth) -> SandboxView {
        SandboxView {
            status: sandbox.status.into(),
            backend: sandbox.backend.clone(),
            isolation: sandbox.isolation.clone(),
            isolation_report: sandbox.isolation_report.as_ref().map(IsolationView::from),
        }
    }
}

/// The components of `health_check`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct HealthComponentsView {
    /// The task store.
    pub task_store: StoreView,
    /// The session manager.
    pub session_manager: SessionManagerView,
    /// The resource manager.
    pub resource_manager: ResourceManagerView,
    /// The task engine.
    pub task_engine: EngineView,
    /// The sandbox backend.
    pub sandbox: SandboxView,
}

/// The answer of `health_check`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct HealthAnswer {
    /// The worst of the components.
    pub status: Health,
    /// When (Unix seconds).
    pub timestamp: f64,
    /// How long msbd has run, in seconds.
    pub uptime_seconds: f64,
    /// Each component's health.
    pub components: HealthComponentsView,
    /// The background loops in detail (as `get_background_task_status` answers).
    pub background_tasks: BackgroundTasksAnswer,
}

impl From<&HealthReport> for HealthAnswer {
    fn from(report: &HealthReport) -> HealthAnswer {
        let components = &report.components;
        HealthAnswer {
            status: report.status.into(),
            timestamp: report.timestamp,
            uptime_seconds: report.uptime_seconds,
            components: HealthComponentsView {
                task_store: (&components.task_store).into(),
                session_manager: SessionManagerView::new(&components.session_manager, true),
                resource_manager: ResourceManagerView::new(&components.resource_manager, true),
                task_engine: (&components.task_engine).into(),
                sandbox: (&components.sandbox).into(),
            },
            background_tasks: (&report.background_tasks).into(),
        }
    }
}

/// How a restart, pause or resume of the loops went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema, strum::IntoStaticStr)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum LoopActionStatus {
    /// Everything asked was done.
    Success,
    /// Some was done, some could not be (see `errors`).
    PartialSuccess,
    /// Nothing needed doing.
    NoActionNeeded,
    /// Nothing could be done (see `errors`).
    Failed,
}

/// The answer of `restart_background_tasks`, `pause_background_tasks` and
/// `resume_background_tasks`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct LoopActionAnswer {
    /// How it went.
    pub status: LoopActionStatus,
    /// What was done, one `<loop>_<action>` per loop (`session_cleanup_paused`).
    pub actions_taken: Vec<String>,
    /// What could not be done, and why.
    pub errors: Vec<String>,
    /// When (Unix seconds).
    pub timestamp: f64,
}

impl From<&ActionReport> for LoopActionAnswer {
    fn from(report: &ActionReport) -> LoopActionAnswer {
        LoopActionAnswer {
            status: match report.status {
                ActionStatus::Success => LoopActionStatus::Success,
                ActionStatus::PartialSuccess => LoopActionStatus::PartialSuccess,
                ActionStatus::NoActionNeeded => LoopActionStatus::NoActionNeeded,
                ActionStatus::Failed => LoopActionStatus::Failed,
            },
            actions_taken: report.actions_taken.clone(),
            errors: report.errors.clone(),
            timestamp: report.timestamp,
        }
    }
}

/// A report as a tool answer: the title line (`health: healthy`) and the report as indented
/// JSON for the text, the report for the structured content.
fn report_answer(title: &str, status: &'static str, report: &impl Serialize) -> CallToolResult {
    let mut text = format!("{title}: {status}\n");
    // Through a `Value`, so that the keys are in the same (sorted) order as the structured
    // content's.
    if let Ok(pretty) = serde_json::to_value(report).and_then(|v| serde_json::to_string_pretty(&v))
    {
        text.push_str(&pretty);
    }
    answer(text, report)
}

fn loop_action_answer(title: &str, report: &ActionReport) -> CallToolResult {
    let answer = LoopActionAnswer::from(report);
    report_answer(title, answer.status.into(), &answer)
}

#[tool_router(router = supervision_tools, vis = "pub(crate)")]
impl McpServer {
    #[tool(
        description = "The daemon's health: overall status (healthy, degraded, unhealthy), uptime, and each component (task store, task engine, sandbox backend and its isolation level, session manager, resource manager, every background loop).",
        output_schema = schema_for_output::<HealthAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn health_check(&self) -> Result<CallToolResult, McpError> {
        let health = HealthAnswer::from(&self.core.wrapper.health_check().await);
        Ok(report_answer("health", health.status.into(), &health))
    }

    #[tool(
        description = "The status of every background loop (session cleanup, orphan cleanup, task heartbeat, lease reaper, retention pruner, task dispatcher): state (running, paused, failed...), interval, health, run and error counters, restarts.",
        output_schema = schema_for_output::<BackgroundTasksAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn get_background_task_status(&self) -> Result<CallToolResult, McpError> {
        let status = BackgroundTasksAnswer::from(&self.core.wrapper.get_background_task_status());
        Ok(report_answer(
            "background tasks",
            status.overall_status.into(),
            &status,
        ))
    }

    #[tool(
        description = "Restart the background loops that failed or stopped (healthy ones are left alone): status success, no_action_needed, partial_success or failed, with actions_taken and errors.",
        output_schema = schema_for_output::<LoopActionAnswer>()
    )]
    async fn restart_background_tasks(&self) -> Result<CallToolResult, McpError> {
        let report = self.core.wrapper.restart_background_tasks().await;
        Ok(loop_action_answer("restart", &report))
    }

    #[tool(
        description = "Pause the pausable background loops (session cleanup, orphan cleanup, lease reaper, retention pruner, task dispatcher): they stay alive and healthy but skip their work until resumed; running tasks go on, no new task starts.",
        output_schema = schema_for_output::<LoopActionAnswer>()
    )]
    async fn pause_background_tasks(&self) -> Result<CallToolResult, McpError> {
        let report = self.core.wrapper.pause_background_tasks();
        Ok(loop_action_answer("pause", &report))
    }

    #[tool(
        description = "Resume the paused background loops.",
        output_schema = schema_for_output::<LoopActionAnswer>()
    )]
    async fn resume_background_tasks(&self) -> Result<CallToolResult, McpError> {
        let report = self.core.wrapper.resume_background_tasks();
        Ok(loop_action_answer("resume", &report))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use sandbox_wrapper::{Wrapper, WrapperConfig};
    use serde_json::Value;
    use task_core::store::Store;
    use task_core::store::memory::MemoryStore;

    use super::*;
    use crate::ServerOptions;

    /// The answer validated against the output schema `tool` publishes.
    fn check_schema(server: &McpServer, tool: &str, answer: &Value) {
        let tool = server.tools().into_iter().find(|t| t.name == tool).unwrap();
        let schema = Value::Object((*tool.output_schema.unwrap()).clone());
        let validator = jsonschema::validator_for(&schema).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(answer)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}\n{answer:#}", tool.name);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reports_keep_the_wrappers_shape_and_match_their_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let wrapper = Wrapper::start(store, WrapperConfig::new(dir.path().join("data")))
            .await
            .unwrap();
        let server = McpServer::new(wrapper.clone(), ServerOptions::default());

        // The loops' report: the wrapper's, field for field.
        let background = wrapper.get_background_task_status();
        let answer = serde_json::to_value(BackgroundTasksAnswer::from(&background)).unwrap();
        assert_eq!(answer, serde_json::to_value(&background).unwrap());
        check_schema(&server, "get_background_task_status", &answer);

        // Health: the wrapper's, with `background_task_healthy` on the components with loops.
        let health = wrapper.health_check().await;
        let answer = serde_json::to_value(HealthAnswer::from(&health)).unwrap();
        let mut expected = serde_json::to_value(&health).unwrap();
        let components = &mut expected["components"];
        components["session_manager"]["background_task_healthy"] = health
            .components
            .session_manager
            .cleanup_task_healthy
            .into();
        components["resource_manager"]["background_task_healthy"] = health
            .components
            .resource_manager
            .orphan_cleanup_task_healthy
            .into();
        components["task_engine"]["background_task_healthy"] =
            (health.components.task_engine.status == HealthStatus::Healthy).into();
        assert_eq!(answer, expected);
        check_schema(&server, "health_check", &answer);

        for (tool, report) in [
            ("pause_background_tasks", wrapper.pause_background_tasks()),
            ("resume_background_tasks", wrapper.resume_background_tasks()),
            (
                "restart_background_tasks",
                wrapper.restart_background_tasks().await,
            ),
        ] {
            let answer = serde_json::to_value(LoopActionAnswer::from(&report)).unwrap();
            assert_eq!(answer, serde_json::to_value(&report).unwrap());
            check_schema(&server, tool, &answer);
        }
        wrapper.stop(Duration::from_secs(5)).await;
    }
}
