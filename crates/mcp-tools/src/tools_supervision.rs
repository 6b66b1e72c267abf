//! The supervision tools (for operators; listed only when enabled): `health_check`,
//! `get_background_task_status`, `restart_background_tasks`, `pause_background_tasks`,
//! `resume_background_tasks`. Each answers with the wrapper's report, in the shape the
//! microsandbox wrapper's users know.

use rmcp::handler::server::common::schema_for_output;
use rmcp::model::CallToolResult;
use rmcp::schemars::JsonSchema;
use rmcp::{ErrorData as McpError, tool, tool_router};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::server::{McpServer, answer};

/// A report (health, loop status, an action's outcome): its fields as the wrapper gives them.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct ReportAnswer {
    /// The report's fields: `status` or `overall_status` (healthy, degraded, unhealthy; or
    /// success, no_action_needed, partial_success, failed for actions), `timestamp`, and
    /// `components` (one entry per background loop: interval, health, counters) or
    /// `actions_taken` and `errors`.
    #[serde(flatten)]
    pub report: Map<String, Value>,
}

fn report_answer(title: &str, report: &impl Serialize) -> CallToolResult {
    let value = serde_json::to_value(report).unwrap_or(Value::Null);
    let status = value
        .get("status")
        .or_else(|| value.get("overall_status"))
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let mut text = format!("{title}: {status}\n");
    if let Ok(pretty) = serde_json::to_string_pretty(&value) {
        text.push_str(&pretty);
    }
    let report = match value {
        Value::Object(map) => map,
        other => {
            let mut map = Map::new();
            map.insert("report".into(), other);
            map
        }
    };
    answer(text, &ReportAnswer { report })
}

#[tool_router(router = supervision_tools, vis = "pub(crate)")]
impl McpServer {
    #[tool(
        description = "The daemon's health: overall status (healthy, degraded, unhealthy), uptime, and each component (task engine, sandbox backend and its isolation level, session manager, resource manager, every background loop).",
        output_schema = schema_for_output::<ReportAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn health_check(&self) -> Result<CallToolResult, McpError> {
        let report = self.core.wrapper.health_check().await;
        Ok(report_answer("health", &report))
    }

    #[tool(
        description = "The status of every background loop (session cleanup, orphan cleanup, task heartbeat, lease reaper, retention pruner, task dispatcher): state (running, paused, failed...), interval, health, run and error counters, restarts.",
        output_schema = schema_for_output::<ReportAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn get_background_task_status(&self) -> Result<CallToolResult, McpError> {
        let report = self.core.wrapper.get_background_task_status();
        Ok(report_answer("background tasks", &report))
    }

    #[tool(
        description = "Restart the background loops that failed or stopped (healthy ones are left alone): status success, no_action_needed, partial_success or failed, with actions_taken and errors.",
        output_schema = schema_for_output::<ReportAnswer>()
    )]
    async fn restart_background_tasks(&self) -> Result<CallToolResult, McpError> {
        let report = self.core.wrapper.restart_background_tasks().await;
        Ok(report_answer("restart", &report))
    }

    #[tool(
        description = "Pause the pausable background loops (session cleanup, orphan cleanup, lease reaper, retention pruner, task dispatcher): they stay alive and healthy but skip their work until resumed; running tasks go on, no new task starts.",
        output_schema = schema_for_output::<ReportAnswer>()
    )]
    async fn pause_background_tasks(&self) -> Result<CallToolResult, McpError> {
        let report = self.core.wrapper.pause_background_tasks();
        Ok(report_answer("pause", &report))
    }

    #[tool(
        description = "Resume the paused background loops.",
        output_schema = schema_for_output::<ReportAnswer>()
    )]
    async fn resume_background_tasks(&self) -> Result<CallToolResult, McpError> {
        let report = self.core.wrapper.resume_background_tasks();
        Ok(report_answer("resume", &report))
    }
}
