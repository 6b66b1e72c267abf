//! What the end-to-end tests share: the binary under test, an rmcp client handler (with or
//! without the tasks extension), helpers to call tools and follow tasks, and the one way they
//! wait for something to become true (`wait_until`, and `wait_until_blocking` for the tests
//! that drive msbd from plain threads).

use std::fmt::Display;
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, GetTaskParams,
    Implementation, JsonObject, TaskPayload,
};
use rmcp::service::RunningService;
use rmcp::{ClientHandler, RoleClient};
use serde_json::{Value, json};

/// The msbd binary under test.
pub(crate) const MSBD: &str = env!("CARGO_BIN_EXE_msbd");

/// The pause after `wait_until`'s first check; it doubles after each check, up to `LAST_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LAST_PAUSE: Duration = Duration::from_millis(100);

/// Waits until `condition` holds, checking it at once and then every few milliseconds (10 ms,
/// doubling up to 100 ms), and returns what it gave. `condition` answers `Ok(value)` when it
/// holds, else `Err(what it saw)`; if it still does not hold `within`, the test fails with the
/// last thing it saw.
pub(crate) async fn wait_until<T, E: Display>(
    within: Duration,
    mut condition: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        match condition().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "not so within {within:?}: {seen}"
            ),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(LAST_PAUSE);
    }
}

/// `wait_until` for a test that is not async (it blocks its thread between checks).
pub(crate) fn wait_until_blocking<T, E: Display>(
    within: Duration,
    mut condition: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + within;
    let mut pause = FIRST_PAUSE;
    loop {
        match condition() {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "not so within {within:?}: {seen}"
            ),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(LAST_PAUSE);
    }
}

/// A client that declares the tasks extension or not.
#[derive(Clone, Default)]
pub(crate) struct Client {
    pub(crate) tasks: bool,
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

pub(crate) type Connection = RunningService<RoleClient, Client>;

/// Tool arguments from a JSON object.
pub(crate) fn args(value: Value) -> JsonObject {
    value.as_object().unwrap().clone()
}

/// A tool call's answer, whatever it is.
pub(crate) async fn call(client: &Connection, tool: &str, arguments: Value) -> CallToolResult {
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args(arguments)))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

/// A successful call's structured answer.
pub(crate) async fn ok(client: &Connection, tool: &str, arguments: Value) -> Value {
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
pub(crate) async fn wait_status(client: &Connection, id: &str, status: &str) -> Value {
    wait_until(Duration::from_secs(60), async || {
        let view = ok(client, "check_task_status", json!({"task_id": id})).await;
        if view["status"] == status {
            Ok(view)
        } else {
            Err(format!("task {id} is not {status}: {view}"))
        }
    })
    .await
}

/// Polls `tasks/get` until the task is no longer working (at most a minute).
pub(crate) async fn wait_task_payload(client: &Connection, id: &str) -> TaskPayload {
    wait_until(Duration::from_secs(60), async || {
        let got = client
            .peer()
            .get_task(GetTaskParams::new(id.to_owned()))
            .await
            .unwrap();
        match got.task.payload {
            TaskPayload::Working => Err(format!("task {id} is still working")),
            payload => Ok(payload),
        }
    })
    .await
}

/// The tool result of a task that `tasks/get` reports completed.
pub(crate) async fn completed_result(client: &Connection, id: &str) -> CallToolResult {
    match wait_task_payload(client, id).await {
        TaskPayload::Completed { result } => serde_json::from_value(Value::Object(result)).unwrap(),
        other => panic!("task {id} ended as {other:?}"),
    }
}

/// Every tool at least once, and a task's whole life: create, progress, output by cursor,
/// result; pause, resume, cancel; the queue, sandbox and supervision tools. Returns the id of
/// the completed task (tagged `e2e`).
pub(crate) async fn every_tool_and_a_tasks_whole_life(client: &Connection) -> String {
    let created = ok(
        client,
        "create_background_task",
        json!({
            "task_type": "command",
            "params": {"command": "echo one; echo '::progress:: 50 half'; sleep 1; echo two"},
            "tags": ["e2e"],
        }),
    )
    .await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    let running = wait_status(client, &id, "running").await;
    assert!(running.get("eta_seconds").is_some());
    let result = ok(
        client,
        "get_task_result",
        json!({"task_id": id, "wait": true, "timeout": 60}),
    )
    .await;
    assert_eq!(result["status"], "completed", "{result}");
    let mut output = String::new();
    let mut cursor = 0;
    loop {
        let chunk = ok(
            client,
            "read_task_output",
            json!({"task_id": id, "cursor": cursor, "max_bytes": 5}),
        )
        .await;
        output.push_str(chunk["data"].as_str().unwrap());
        cursor = chunk["next_cursor"].as_u64().unwrap();
        if chunk["complete"] == true {
            break;
        }
    }
    assert!(output.contains("one") && output.contains("two"), "{output}");

    // Cancel; pause and resume.
    let long = ok(
        client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "sleep 30"}, "max_retries": 0, "timeout_seconds": 60}),
    )
    .await;
    let long = long["task_id"].as_str().unwrap().to_owned();
    wait_status(client, &long, "running").await;
    ok(
        client,
        "manage_background_tasks",
        json!({"action": "pause", "task_id": long}),
    )
    .await;
    wait_status(client, &long, "paused").await;
    ok(
        client,
        "manage_background_tasks",
        json!({"action": "resume", "task_id": long}),
    )
    .await;
    wait_status(client, &long, "running").await;
    ok(client, "cancel_task", json!({"task_id": long})).await;
    wait_status(client, &long, "cancelled").await;

    // The rest of the tools, once each.
    let tagged = ok(client, "list_tasks", json!({"tag": "e2e"})).await;
    assert_eq!(tagged["count"], 1, "{tagged}");
    ok(client, "check_task_status", json!({})).await;
    ok(client, "manage_task_queue", json!({"action": "get_stats"})).await;
    let code = ok(client, "execute_code", json!({"code": "print(2 ** 10)"})).await;
    assert!(
        code["output_tail"].as_str().unwrap().contains("1024"),
        "{code}"
    );
    let session = code["session_id"].as_str().unwrap().to_owned();
    let command = ok(
        client,
        "execute_command",
        json!({"command": "pwd", "session_id": session}),
    )
    .await;
    assert_eq!(command["exit_code"], 0);
    // A command longer than its wait answers with its task id and goes on; wait_for_tasks
    // waits for it and the first task in one call; its output's tail is its last line.
    let going = ok(
        client,
        "execute_command",
        json!({"command": "echo started; sleep 2; echo ended", "wait_seconds": 0.5, "session_id": session}),
    )
    .await;
    assert!(
        ["pending", "running"].contains(&going["status"].as_str().unwrap()),
        "{going}"
    );
    let going = going["task_id"].as_str().unwrap().to_owned();
    let waited = ok(
        client,
        "wait_for_tasks",
        json!({"task_ids": [going, id], "mode": "all", "timeout": 30}),
    )
    .await;
    assert_eq!(
        (waited["done"].as_bool(), waited["finished"].as_u64()),
        (Some(true), Some(2)),
        "{waited}"
    );
    assert_eq!(waited["tasks"][0]["result"]["exit_code"], 0, "{waited}");
    let tail = ok(
        client,
        "read_task_output",
        json!({"task_id": going, "tail": 6}),
    )
    .await;
    assert_eq!(tail["data"], "ended\n", "{tail}");
    // Files in and out of the session.
    ok(
        client,
        "write_file",
        json!({"session_id": session, "path": "in/e2e.txt", "content": "e2e\n"}),
    )
    .await;
    let cat = ok(
        client,
        "execute_command",
        json!({"command": "cat in/e2e.txt > out.txt; cat out.txt", "session_id": session}),
    )
    .await;
    assert_eq!(cat["output_tail"], "e2e\n", "{cat}");
    let read = ok(
        client,
        "read_file",
        json!({"session_id": session, "path": "out.txt"}),
    )
    .await;
    assert_eq!(read["content"], "e2e\n", "{read}");
    let listed = ok(
        client,
        "list_files",
        json!({"session_id": session, "depth": 2}),
    )
    .await;
    assert!(listed["count"].as_u64().unwrap() >= 3, "{listed}");
    let sessions = ok(client, "get_sessions", json!({})).await;
    assert!(sessions["count"].as_u64().unwrap() >= 1);
    ok(client, "stop_session", json!({"session_id": session})).await;
    ok(client, "get_volume_mappings", json!({})).await;
    for tool in [
        "health_check",
        "get_background_task_status",
        "pause_background_tasks",
        "resume_background_tasks",
        "restart_background_tasks",
    ] {
        ok(client, tool, json!({})).await;
    }
    id
}
