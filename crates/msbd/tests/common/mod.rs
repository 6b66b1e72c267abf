//! What the end-to-end tests share: an rmcp client handler (with or without the tasks
//! extension) and helpers to call tools and follow tasks.

#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, GetTaskParams,
    Implementation, JsonObject, TaskPayload,
};
use rmcp::service::RunningService;
use rmcp::{ClientHandler, RoleClient};
use serde_json::{Value, json};

/// A client that declares the tasks extension or not.
#[derive(Clone, Default)]
pub struct Client {
    pub tasks: bool,
}

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        let caps = if self.tasks {
            ClientCapabilities::builder().enable_tasks().build()
        } else {
            ClientCapabilities::default()
        };
        ClientConfig::new(caps, Implementation::new("e2e", "0.0.0"))
    }
}

pub type Connection = RunningService<RoleClient, Client>;

/// Tool arguments from a JSON object.
pub fn args(value: Value) -> JsonObject {
    value.as_object().unwrap().clone()
}

/// A tool call's answer, whatever it is.
pub async fn call(client: &Connection, tool: &str, arguments: Value) -> CallToolResult {
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args(arguments)))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

/// A successful call's structured answer.
pub async fn ok(client: &Connection, tool: &str, arguments: Value) -> Value {
    let result = call(client, tool, arguments.clone()).await;
    assert_ne!(
        result.is_error,
        Some(true),
        "{tool}({arguments}): {result:?}"
    );
    result
        .structured_content
        .unwrap_or_else(|| panic!("{tool}: no structured answer"))
}

/// Polls `check_task_status` until the task is in `status` (at most a minute).
pub async fn wait_status(client: &Connection, id: &str, status: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = ok(client, "check_task_status", json!({"task_id": id})).await;
        if view["status"] == status {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} never became {status}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `tasks/get` until the task is no longer working (at most a minute).
pub async fn wait_task_payload(client: &Connection, id: &str) -> TaskPayload {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = client
            .peer()
            .get_task(GetTaskParams::new(id.to_owned()))
            .await
            .unwrap();
        if !matches!(got.task.payload, TaskPayload::Working) {
            return got.task.payload;
        }
        assert!(Instant::now() < deadline, "task {id} is still working");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The tool result of a task that `tasks/get` reports completed.
pub async fn completed_result(client: &Connection, id: &str) -> CallToolResult {
    match wait_task_payload(client, id).await {
        TaskPayload::Completed { result } => serde_json::from_value(Value::Object(result)).unwrap(),
        other => panic!("task {id} ended as {other:?}"),
    }
}
