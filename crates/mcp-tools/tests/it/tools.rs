//! The MCP tools against a real rmcp client over an in-process byte stream, on a real wrapper
//! (SQLite store in a temporary directory, real sandboxes at the strongest isolation the host
//! offers). The binary's end-to-end tests (stdio, HTTP, restarts) live in the msbd crate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mcp_tools::transport::LimitedLines;
use mcp_tools::{FastLane, McpServer, SUPERVISION_TOOLS, ServerOptions};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CancelTaskParams, ClientCapabilities,
    ClientConfig, ClientRequest, GetTaskParams, Implementation, JsonRpcMessage, NumberOrString,
    ProgressNotificationParam, ProgressToken, RequestMetaObject, TaskPayload,
    TaskStatusNotificationParams,
};
use rmcp::service::{NotificationContext, RunningService, RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::{ClientHandler, RoleClient, RoleServer, ServiceExt};
use sandbox_wrapper::{Wrapper, WrapperConfig};
use serde_json::{Value, json};
use task_core::store::Store;
use task_core::store::sqlite::{SqliteConfig, SqliteStore};

use crate::wait_until;

/// The progress notifications a client received: (progress, message).
type Received = Arc<Mutex<Vec<(f64, Option<String>)>>>;

/// The task status notifications a client received.
type Told = Arc<Mutex<Vec<TaskStatusNotificationParams>>>;

#[derive(Clone, Default)]
struct Client {
    tasks: bool,
    progress: Received,
    told: Told,
}

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        let caps = if self.tasks {
            ClientCapabilities::builder().enable_tasks().build()
        } else {
            ClientCapabilities::default()
        };
        ClientConfig::new(caps, Implementation::new("tools-test", "0.0.0"))
    }

    async fn on_progress(&self, p: ProgressNotificationParam, _c: NotificationContext<RoleClient>) {
        self.progress.lock().unwrap().push((p.progress, p.message));
    }

    async fn on_task_status(
        &self,
        p: TaskStatusNotificationParams,
        _c: NotificationContext<RoleClient>,
    ) {
        self.told.lock().unwrap().push(p);
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    server: McpServer,
}

async fn fixture(options: ServerOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.sqlite3"))).unwrap());
    let mut config = WrapperConfig::new(dir.path().join("data"));
    config.engine.concurrency = 4;
    let wrapper = Wrapper::start(store, config).await.unwrap();
    eprintln!("isolation: {}", wrapper.isolation());
    Fixture {
        _dir: dir,
        server: McpServer::new(wrapper, options),
    }
}

async fn connect(server: McpServer, handler: Client) -> RunningService<RoleClient, Client> {
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    handler.serve(client_io).await.unwrap()
}

fn args(value: Value) -> rmcp::model::JsonObject {
    value.as_object().unwrap().clone()
}

async fn call(
    client: &RunningService<RoleClient, Client>,
    tool: &str,
    arguments: Value,
) -> CallToolResult {
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args(arguments)))
        .await
        .unwrap_or_else(|e| panic!("{tool}: {e}"))
}

/// A command task submitted by `client` and waited for: its id.
async fn finished_command(client: &RunningService<RoleClient, Client>, command: &str) -> String {
    let created = ok(
        client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": command}}),
    )
    .await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    ok(
        client,
        "get_task_result",
        json!({"task_id": id, "wait": true, "timeout": 60}),
    )
    .await;
    id
}

/// A successful call's structured answer.
async fn ok(client: &RunningService<RoleClient, Client>, tool: &str, arguments: Value) -> Value {
    let result = call(client, tool, arguments.clone()).await;
    assert_ne!(
        result.is_error,
        Some(true),
        "{tool}({arguments}) failed: {result:?}"
    );
    let text = result.content[0].as_text().unwrap().text.clone();
    assert!(!text.is_empty(), "{tool} has no text answer");
    result
        .structured_content
        .unwrap_or_else(|| panic!("{tool}: no structured answer"))
}

/// A failed call's text.
async fn tool_error(
    client: &RunningService<RoleClient, Client>,
    tool: &str,
    arguments: Value,
) -> String {
    let result = call(client, tool, arguments.clone()).await;
    assert_eq!(
        result.is_error,
        Some(true),
        "{tool}({arguments}) should fail: {result:?}"
    );
    result.content[0].as_text().unwrap().text.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_is_listed_with_schemas_and_supervision_can_be_hidden() {
    let full = fixture(ServerOptions::default()).await;
    let client = connect(full.server.clone(), Client::default()).await;
    let tools = client.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| &*t.name).collect();
    for name in [
        "create_background_task",
        "check_task_status",
        "manage_background_tasks",
        "manage_task_queue",
        "submit_task",
        "get_task_result",
        "cancel_task",
        "list_tasks",
        "read_task_output",
        "execute_code",
        "execute_command",
        "get_sessions",
        "stop_session",
        "get_volume_mappings",
        "get_background_task_status",
        "restart_background_tasks",
        "pause_background_tasks",
        "resume_background_tasks",
        "health_check",
    ] {
        let tool = tools
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("{name} missing from {names:?}"));
        assert!(
            tool.description.as_ref().is_some_and(|d| d.len() > 30),
            "{name}: no description"
        );
        assert!(tool.output_schema.is_some(), "{name}: no output schema");
    }
    client.cancel().await.unwrap();

    let hidden = fixture(ServerOptions {
        supervision_tools: false,
        ..ServerOptions::default()
    })
    .await;
    let client = connect(hidden.server.clone(), Client::default()).await;
    let tools = client.list_all_tools().await.unwrap();
    for name in SUPERVISION_TOOLS {
        assert!(
            tools.iter().all(|t| t.name != name),
            "{name} is listed though disabled"
        );
    }
    let error = client
        .call_tool(CallToolRequestParams::new("health_check"))
        .await
        .unwrap_err();
    eprintln!("calling a hidden tool: {error}");
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_background_task_lives_its_whole_life_through_the_tools() {
    let fixture = fixture(ServerOptions::default()).await;
    let client = connect(fixture.server.clone(), Client::default()).await;
    let created = ok(&client, "submit_task", json!({
        "task_type": "command",
        "params": {"command": "echo first; echo '::progress:: 40 working'; sleep 1; echo second"},
        "priority": "high",
        "max_retries": 1,
        "tags": ["life"],
    })).await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    assert_eq!(created["priority"], 8);
    assert_eq!(created["deduplicated"], false);

    // Status with progress while it runs, and the output so far by cursor.
    let mut seen_progress = false;
    let mut output = String::new();
    let mut cursor = 0;
    wait_until(Duration::from_secs(30), async || {
        let status = ok(&client, "check_task_status", json!({"task_id": id})).await;
        for key in ["task_id", "status", "progress", "eta_seconds"] {
            assert!(
                status.get(key).is_some(),
                "check_task_status lacks {key}: {status}"
            );
        }
        if status["status"] == "running" && status["progress"].as_f64() == Some(40.0) {
            seen_progress = true;
            assert_eq!(status["progress_message"], "working");
        }
        let chunk = ok(
            &client,
            "read_task_output",
            json!({"task_id": id, "cursor": cursor, "max_bytes": 4}),
        )
        .await;
        output.push_str(chunk["data"].as_str().unwrap());
        cursor = chunk["next_cursor"].as_u64().unwrap();
        if chunk["complete"] == true {
            Ok(())
        } else {
            Err(format!("the output is not complete: {output:?}"))
        }
    })
    .await;
    assert!(seen_progress, "never saw the task at 40 %");
    assert!(
        output.contains("first") && output.contains("second"),
        "{output:?}"
    );

    let result = ok(
        &client,
        "get_task_result",
        json!({"task_id": id, "wait": true, "timeout": 30}),
    )
    .await;
    assert_eq!(result["status"], "completed", "{result}");
    assert_eq!(result["finished"], true);
    assert_eq!(result["result"]["exit_code"], 0);
    let listed = ok(
        &client,
        "list_tasks",
        json!({"status": "completed", "tag": "life"}),
    )
    .await;
    assert_eq!(listed["count"], 1, "{listed}");
    let listed = ok(
        &client,
        "check_task_status",
        json!({"status_filter": "completed"}),
    )
    .await;
    assert_eq!(listed["count"], 1, "{listed}");

    // A finished task cannot be paused: a tool error that says so.
    let text = tool_error(
        &client,
        "manage_background_tasks",
        json!({"action": "pause", "task_id": id}),
    )
    .await;
    assert!(
        text.contains("ILLEGAL_TRANSITION") && text.contains("What to do"),
        "{text}"
    );
    // Cancelling it changes nothing.
    let cancel = ok(&client, "cancel_task", json!({"task_id": id})).await;
    assert_eq!(cancel["cancelled"], false);
    client.cancel().await.unwrap();
}

/// Issue 15: check_task_status shows how each attempt ended. A command that fails once (it
/// leaves a file in its session's work directory) and succeeds when retried has two entries:
/// failed, then completed, with their times in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_retried_once_shows_both_attempts() {
    let fixture = fixture(ServerOptions::default()).await;
    let client = connect(fixture.server.clone(), Client::default()).await;
    let first = ok(&client, "execute_command", json!({"command": "true"})).await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    let once = ok(
        &client,
        "check_task_status",
        json!({"task_id": first["task_id"]}),
    )
    .await;
    assert_eq!(once["attempts"].as_array().map(Vec::len), Some(1), "{once}");
    assert_eq!(once["attempts"][0]["outcome"], "completed");

    let created = ok(
        &client,
        "submit_task",
        json!({
            "task_type": "command",
            "params": {"command": "if [ -e tried ]; then echo second; else touch tried; exit 3; fi"},
            "session_id": session,
            "max_retries": 1,
        }),
    )
    .await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    let result = ok(
        &client,
        "get_task_result",
        json!({"task_id": id, "wait": true, "timeout": 30}),
    )
    .await;
    assert_eq!(result["status"], "completed", "{result}");

    let status = ok(&client, "check_task_status", json!({"task_id": id})).await;
    let attempts = status["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2, "{status}");
    assert_eq!(
        attempts
            .iter()
            .map(|a| (
                a["attempt"].as_u64().unwrap(),
                a["outcome"].as_str().unwrap()
            ))
            .collect::<Vec<_>>(),
        [(1, "failed"), (2, "completed")]
    );
    let time = |value: &Value| {
        chrono::DateTime::parse_from_rfc3339(value.as_str().expect("a time"))
            .unwrap_or_else(|e| panic!("{value}: {e}"))
    };
    for attempt in attempts {
        assert!(
            time(&attempt["started_at"]) <= time(&attempt["ended_at"]),
            "{attempt}"
        );
    }
    assert!(time(&attempts[0]["ended_at"]) <= time(&attempts[1]["started_at"]));
    assert_eq!(
        time(&attempts[1]["started_at"]),
        time(&status["started_at"]),
        "the last attempt is the one the task's started_at names"
    );
    assert_eq!(status["last_attempt_outcome"], "completed");
    assert!(status.get("interrupted_attempts").is_none(), "{status}");
    let text = call(&client, "check_task_status", json!({"task_id": id})).await;
    let text = &text.content[0].as_text().unwrap().text;
    assert!(text.contains("attempts: #1 failed, #2 completed"), "{text}");

    // A task that has not run yet has no history.
    let waiting = ok(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "true"}, "delay_seconds": 3600}),
    )
    .await;
    let waiting = ok(
        &client,
        "check_task_status",
        json!({"task_id": waiting["task_id"]}),
    )
    .await;
    assert!(waiting.get("attempts").is_none(), "{waiting}");
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_pause_resume_and_the_queue_tools_do_what_they_say() {
    let fixture = fixture(ServerOptions::default()).await;
    let client = connect(fixture.server.clone(), Client::default()).await;
    let sleeper = ok(
        &client,
        "create_background_task",
        json!({
            "task_type": "command", "params": {"command": "sleep 30"},
        }),
    )
    .await["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until(Duration::from_secs(30), async || {
        let view = ok(&client, "check_task_status", json!({"task_id": sleeper})).await;
        if view["status"] == "running" {
            Ok(())
        } else {
            Err(format!("the sleeper never ran: {view}"))
        }
    })
    .await;
    let paused = ok(
        &client,
        "manage_background_tasks",
        json!({"action": "pause", "task_id": sleeper}),
    )
    .await;
    assert_eq!(paused["task"]["status"], "paused", "{paused}");
    let resumed = ok(
        &client,
        "manage_background_tasks",
        json!({"action": "resume", "task_id": sleeper}),
    )
    .await;
    assert_eq!(resumed["task"]["status"], "running", "{resumed}");
    ok(&client, "cancel_task", json!({"task_id": sleeper})).await;
    let done = ok(
        &client,
        "get_task_result",
        json!({"task_id": sleeper, "wait": true, "timeout": 20}),
    )
    .await;
    assert_eq!(done["status"], "cancelled", "{done}");

    // The queue: paused, tasks wait; reordered; cleared; limits; stats.
    let paused = ok(&client, "manage_task_queue", json!({"action": "pause"})).await;
    assert_eq!(paused["queue_paused"], true);
    let low = ok(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "true"}, "priority": "low"}),
    )
    .await["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let other = ok(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "true"}, "priority": 3}),
    )
    .await["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let stats = ok(&client, "manage_task_queue", json!({"action": "get_stats"})).await;
    assert_eq!(stats["queue_statistics"]["total_queued"], 2, "{stats}");
    assert_eq!(
        stats["queue_statistics"]["by_priority"]["low"], 1,
        "{stats}"
    );
    let reordered = ok(
        &client,
        "manage_task_queue",
        json!({"action": "reorder", "task_id": low, "priority": "critical"}),
    )
    .await;
    assert_eq!(reordered["task"]["priority"], 9, "{reordered}");
    let cleared = ok(
        &client,
        "manage_task_queue",
        json!({"action": "clear_queue", "priority": 3}),
    )
    .await;
    assert_eq!(cleared["cancelled"], 1, "{cleared}");
    assert_eq!(
        ok(&client, "check_task_status", json!({"task_id": other})).await["status"],
        "cancelled"
    );
    ok(
        &client,
        "manage_task_queue",
        json!({"action": "set_limits", "max_concurrent": 2}),
    )
    .await;
    ok(&client, "manage_task_queue", json!({"action": "resume"})).await;
    let done = ok(
        &client,
        "get_task_result",
        json!({"task_id": low, "wait": true, "timeout": 30}),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    let stats = ok(
        &client,
        "manage_background_tasks",
        json!({"action": "get_stats"}),
    )
    .await;
    assert_eq!(stats["statistics"]["max_concurrent"], 2, "{stats}");

    // Retry a cancelled task; schedule one; clean up finished ones.
    let retried = ok(
        &client,
        "manage_background_tasks",
        json!({"action": "retry", "task_id": other}),
    )
    .await;
    let again = retried["task_id"].as_str().unwrap().to_owned();
    assert_ne!(again, other);
    let scheduled = ok(&client, "manage_background_tasks", json!({"action": "schedule", "task_type": "command", "parameters": {"command": "true"}, "delay_seconds": 3600})).await;
    assert_eq!(scheduled["status"], "success");
    assert_eq!(
        scheduled["task_id"].as_str().map(|s| s.len()),
        Some(36),
        "{scheduled}"
    );
    let done = ok(
        &client,
        "get_task_result",
        json!({"task_id": again, "wait": true, "timeout": 30}),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    let outputs = fixture._dir.path().join("data/outputs");
    for id in [&sleeper, &again] {
        assert!(
            outputs.join(format!("{id}.log")).exists(),
            "no output file for {id}"
        );
    }
    let cleaned = ok(
        &client,
        "manage_background_tasks",
        json!({"action": "cleanup", "older_than_seconds": 0}),
    )
    .await;
    assert!(cleaned["deleted"].as_u64().unwrap() >= 3, "{cleaned}");
    let text = tool_error(&client, "check_task_status", json!({"task_id": sleeper})).await;
    assert!(text.contains("TASK_NOT_FOUND"), "{text}");
    // Their output files went with them.
    for id in [&sleeper, &again] {
        assert!(
            !outputs.join(format!("{id}.log")).exists(),
            "the output of {id} is left"
        );
    }
    let text = tool_error(&client, "manage_task_queue", json!({"action": "explode"})).await;
    assert!(text.contains("UNKNOWN_ACTION"), "{text}");
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_code_keeps_state_in_a_session_and_reports_progress() {
    let fixture = fixture(ServerOptions::default()).await;
    let handler = Client::default();
    let client = connect(fixture.server.clone(), handler.clone()).await;
    let first = ok(
        &client,
        "execute_code",
        json!({"code": "x = 41\nprint('set')"}),
    )
    .await;
    let session = first["session_id"].as_str().unwrap().to_owned();
    let second = ok(
        &client,
        "execute_code",
        json!({"code": "print(x + 1)", "session_id": session}),
    )
    .await;
    assert!(
        second["output_tail"].as_str().unwrap().contains("42"),
        "{second}"
    );
    let text = call(&client, "execute_code", json!({"code": "print(x)"})).await;
    assert_eq!(
        text.is_error,
        Some(true),
        "a fresh session must not know x: {text:?}"
    );
    let sessions = ok(&client, "get_sessions", json!({})).await;
    assert!(sessions["count"].as_u64().unwrap() >= 1, "{sessions}");

    // Progress notifications for a caller that sent a token.
    let mut params = CallToolRequestParams::new("execute_command").with_arguments(args(
        json!({"command": "echo '::progress:: 0.5 halfway'; sleep 0.5; echo done"}),
    ));
    params.meta = Some(RequestMetaObject::with_progress_token(ProgressToken(
        NumberOrString::Number(7),
    )));
    let result = client.call_tool(params).await.unwrap();
    assert_ne!(result.is_error, Some(true), "{result:?}");
    let progress = handler.progress.lock().unwrap().clone();
    assert!(
        progress
            .iter()
            .any(|(p, m)| *p == 50.0 && m.as_deref() == Some("halfway")),
        "{progress:?}"
    );

    let stopped = ok(&client, "stop_session", json!({"session_id": session})).await;
    assert_eq!(stopped["status"], "stopped");
    let text = tool_error(&client, "stop_session", json!({"session_id": session})).await;
    assert!(text.contains("SESSION_NOT_FOUND"), "{text}");
    let volumes = ok(&client, "get_volume_mappings", json!({})).await;
    assert_eq!(volumes["count"], 0);
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_client_gets_a_task_it_can_poll_and_cancel() {
    let fixture = fixture(ServerOptions::default()).await;
    let client = connect(
        fixture.server.clone(),
        Client {
            tasks: true,
            ..Client::default()
        },
    )
    .await;
    let response = client
        .call_tool_once(
            CallToolRequestParams::new("execute_command")
                .with_arguments(args(json!({"command": "sleep 0.3; echo from-a-task"}))),
        )
        .await
        .unwrap();
    let CallToolResponse::Task(created) = response else {
        panic!("expected a task, got {response:?}")
    };
    let id = created.task.task_id.clone();
    // The same id works with the background-task tools.
    let status = ok(&client, "check_task_status", json!({"task_id": id})).await;
    assert_eq!(status["task_type"], "command");
    let result = wait_until(Duration::from_secs(60), async || {
        let got = client
            .peer()
            .get_task(GetTaskParams::new(id.clone()))
            .await
            .unwrap();
        match got.task.payload {
            TaskPayload::Completed { result } => Ok(result),
            TaskPayload::Working => Err(format!("task {id} is still working")),
            other => panic!("{other:?}"),
        }
    })
    .await;
    let result: CallToolResult = serde_json::from_value(Value::Object(result)).unwrap();
    assert!(
        result.content[0]
            .as_text()
            .unwrap()
            .text
            .contains("from-a-task"),
        "{result:?}"
    );

    let response = client
        .call_tool_once(
            CallToolRequestParams::new("execute_command")
                .with_arguments(args(json!({"command": "sleep 60"}))),
        )
        .await
        .unwrap();
    let CallToolResponse::Task(created) = response else {
        panic!("expected a task")
    };
    client
        .peer()
        .cancel_task(CancelTaskParams::new(created.task.task_id.clone()))
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), async || {
        let got = client
            .peer()
            .get_task(GetTaskParams::new(created.task.task_id.clone()))
            .await
            .unwrap();
        match got.task.payload {
            TaskPayload::Cancelled => Ok(()),
            other => Err(format!(
                "the cancelled task never read cancelled: {other:?}"
            )),
        }
    })
    .await;
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_client_is_told_when_its_tasks_change_status() {
    let fixture = fixture(ServerOptions::default()).await;
    let told = Told::default();
    let client = connect(
        fixture.server.clone(),
        Client {
            tasks: true,
            told: told.clone(),
            ..Client::default()
        },
    )
    .await;
    let start = async |command: &str| {
        let response = client
            .call_tool_once(
                CallToolRequestParams::new("execute_command")
                    .with_arguments(args(json!({"command": command}))),
            )
            .await
            .unwrap();
        let CallToolResponse::Task(created) = response else {
            panic!("expected a task, got {response:?}")
        };
        created.task.task_id
    };
    // Told of the end without asking: the notification carries the result.
    let id = start("sleep 0.5; echo pushed").await;
    let result = wait_until(Duration::from_secs(60), async || {
        let told = told.lock().unwrap();
        let ours: Vec<&TaskStatusNotificationParams> =
            told.iter().filter(|n| n.task.task.task_id == id).collect();
        match ours.last().map(|n| &n.payload) {
            Some(TaskPayload::Completed { result }) => Ok(result.clone()),
            _ => Err(format!("not told that {id} completed: {ours:?}")),
        }
    })
    .await;
    let result: CallToolResult = serde_json::from_value(Value::Object(result)).unwrap();
    assert!(
        result.content[0].as_text().unwrap().text.contains("pushed"),
        "{result:?}"
    );
    // Nothing after the end, and each change told once.
    let statuses: Vec<String> = told
        .lock()
        .unwrap()
        .iter()
        .filter(|n| n.task.task.task_id == id)
        .map(|n| n.task.task.status_message.clone().unwrap_or_default())
        .collect();
    let mut unique = statuses.clone();
    unique.dedup();
    assert_eq!(unique, statuses, "a change told twice");

    // And of a cancel.
    let id = start("sleep 60").await;
    client
        .peer()
        .cancel_task(CancelTaskParams::new(id.clone()))
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), async || {
        let told = told.lock().unwrap();
        match told
            .iter()
            .rfind(|n| n.task.task.task_id == id)
            .map(|n| &n.payload)
        {
            Some(TaskPayload::Cancelled) => Ok(()),
            other => Err(format!("not told that {id} was cancelled: {other:?}")),
        }
    })
    .await;

    // A client without the extension is told nothing (it gets its answer in the call).
    let plain_told = Told::default();
    let plain = connect(
        fixture.server.clone(),
        Client {
            told: plain_told.clone(),
            ..Client::default()
        },
    )
    .await;
    ok(
        &plain,
        "execute_command",
        json!({"command": "echo answered"}),
    )
    .await;
    assert!(plain_told.lock().unwrap().is_empty());
    plain.cancel().await.unwrap();
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_principals_tasks_and_sessions_are_not_found() {
    let fixture = fixture(ServerOptions::default()).await;
    let alice = connect(fixture.server.with_principal("alice"), Client::default()).await;
    let bob = connect(
        fixture.server.with_principal("bob"),
        Client {
            tasks: true,
            ..Client::default()
        },
    )
    .await;
    let run = ok(&alice, "execute_command", json!({"command": "echo mine"})).await;
    let id = run["task_id"].as_str().unwrap().to_owned();
    let session = run["session_id"].as_str().unwrap().to_owned();
    for (tool, arguments) in [
        ("check_task_status", json!({"task_id": id})),
        ("read_task_output", json!({"task_id": id})),
        ("get_task_result", json!({"task_id": id})),
        ("cancel_task", json!({"task_id": id})),
    ] {
        let text = tool_error(&bob, tool, arguments).await;
        assert!(text.contains("TASK_NOT_FOUND"), "{tool}: {text}");
    }
    assert!(
        bob.peer()
            .get_task(GetTaskParams::new(id.clone()))
            .await
            .is_err()
    );
    let text = tool_error(
        &bob,
        "execute_command",
        json!({"command": "ls", "session_id": session}),
    )
    .await;
    assert!(text.contains("SESSION_NOT_FOUND"), "{text}");
    assert_eq!(ok(&bob, "get_sessions", json!({})).await["count"], 0);
    assert_eq!(ok(&bob, "list_tasks", json!({})).await["count"], 0);
    assert_eq!(ok(&alice, "list_tasks", json!({})).await["count"], 1);
    alice.cancel().await.unwrap();
    bob.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_server_keeps_serving() {
    let fixture = fixture(ServerOptions::default()).await;
    let client = connect(fixture.server.clone(), Client::default()).await;
    // Wrong types and missing required arguments: tool errors that name the argument.
    for (tool, arguments, named) in [
        ("check_task_status", json!({"task_id": 42}), "integer"),
        ("cancel_task", json!({}), "task_id"),
        ("submit_task", json!({"params": {}}), "task_type"),
        (
            "read_task_output",
            json!({"task_id": "x", "cursor": "far"}),
            "far",
        ),
    ] {
        let text = tool_error(&client, tool, arguments).await;
        assert!(
            text.contains("INVALID_ARGUMENT") && text.contains(named) && text.contains(tool),
            "{tool}: {text}"
        );
    }
    let error = client
        .call_tool(CallToolRequestParams::new("no_such_tool"))
        .await
        .unwrap_err();
    eprintln!("unknown tool: {error}");
    // Impossible calls: tool errors that say what to do.
    let text = tool_error(&client, "submit_task", json!({"task_type": "nope"})).await;
    assert!(
        text.contains("INVALID_TASK_TYPE") && text.contains("command"),
        "{text}"
    );
    let text = tool_error(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"cmd": "x"}}),
    )
    .await;
    assert!(text.contains("params"), "{text}");
    let text = tool_error(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "x"}, "priority": 12}),
    )
    .await;
    assert!(text.contains("priority"), "{text}");
    let text = tool_error(
        &client,
        "get_task_result",
        json!({"task_id": "0192f3c4-0000-7000-8000-000000000000"}),
    )
    .await;
    assert!(text.contains("TASK_NOT_FOUND"), "{text}");
    let text = tool_error(&client, "list_tasks", json!({"status": "sleeping"})).await;
    assert!(text.contains("status"), "{text}");
    let text = tool_error(
        &client,
        "execute_command",
        json!({"command": "true", "session_id": "../etc"}),
    )
    .await;
    assert!(text.contains("session"), "{text}");
    // Still serving.
    let health = ok(&client, "health_check", json!({})).await;
    assert!(health.get("status").is_some(), "{health}");
    client.cancel().await.unwrap();
}

/// A refused call's text: an `INVALID_ARGUMENT` tool error whose message is `expected` and
/// whose text names the tool.
async fn refused(
    client: &RunningService<RoleClient, Client>,
    tool: &str,
    arguments: Value,
    expected: &str,
) {
    let text = tool_error(client, tool, arguments.clone()).await;
    assert!(
        text.starts_with(&format!("Error INVALID_ARGUMENT: {expected}\n")) && text.contains(tool),
        "{tool}({arguments}): {text}"
    );
}

/// A client of a fresh server, and the id of a task it submitted.
async fn client_with_a_task() -> (Fixture, RunningService<RoleClient, Client>, String) {
    let fixture = fixture(ServerOptions::default()).await;
    let client = connect(fixture.server.clone(), Client::default()).await;
    let created = ok(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "true"}}),
    )
    .await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    (fixture, client, id)
}

// The reported cases of issue 15: an argument a tool does not take was ignored, so the call did
// something else than asked (a listing instead of a status, priority 5 instead of "high", every
// task instead of the filtered ones) and said nothing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_task_status_refuses_a_task_id_under_another_name() {
    let (_fixture, client, id) = client_with_a_task().await;
    // The whole text, as docs/tools.md shows it.
    assert_eq!(
        tool_error(&client, "check_task_status", json!({"taskId": id})).await,
        "Error INVALID_ARGUMENT: unknown argument `taskId`; did you mean `task_id`?\n\
         What to do: rename or remove it and call again; the input schema of check_task_status \
         (tools/list) describes each argument"
    );
    refused(
        &client,
        "check_task_status",
        json!({"taskId": id}),
        "unknown argument `taskId`; did you mean `task_id`?",
    )
    .await;
    refused(
        &client,
        "check_task_status",
        json!({"id": id}),
        "unknown argument `id`; did you mean `task_id`?",
    )
    .await;
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_task_refuses_a_misspelled_priority_and_submits_nothing() {
    let (_fixture, client, _id) = client_with_a_task().await;
    refused(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "true"}, "priorty": "high"}),
        "unknown argument `priorty`; did you mean `priority`?",
    )
    .await;
    let listed = ok(&client, "list_tasks", json!({})).await;
    assert_eq!(listed["count"], 1, "only the first task: {listed}");
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_tasks_refuses_a_misspelled_filter() {
    let (_fixture, client, _id) = client_with_a_task().await;
    refused(
        &client,
        "list_tasks",
        json!({"statuss": "running"}),
        "unknown argument `statuss`; did you mean `status`?",
    )
    .await;
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_refuses_arguments_it_does_not_take_and_only_those() {
    let (fixture, client, id) = client_with_a_task().await;
    // Nothing close: the names the tool takes. A tool without arguments says so.
    refused(
        &client,
        "list_tasks",
        json!({"verbose": true}),
        "unknown argument `verbose`; list_tasks takes `status`, `task_type`, `session_id`, `tag`, `limit`, `cursor`",
    )
    .await;
    refused(
        &client,
        "health_check",
        json!({"verbose": true}),
        "unknown argument `verbose`; health_check takes no arguments",
    )
    .await;
    refused(
        &client,
        "get_task_result",
        json!({"task_id": id, "wait": true, "timeout_seconds": 5}),
        "unknown argument `timeout_seconds`; did you mean `timeout`?",
    )
    .await;
    refused(
        &client,
        "execute_command",
        json!({"cmd": "true"}),
        "unknown argument `cmd`; execute_command takes `command`, `template`, `session_id`, `flavor`, `timeout`, `network`, `network_allow`, `wait_seconds`",
    )
    .await;
    refused(
        &client,
        "manage_background_tasks",
        json!({"action": "create", "task_type": "command", "parameters": {"command": "true"}, "task_config": {"max_retry": 2}}),
        "unknown task_config field `max_retry`; did you mean `max_retries`?",
    )
    .await;
    let listed = ok(&client, "list_tasks", json!({})).await;
    assert_eq!(
        listed["count"], 1,
        "refused calls submitted nothing: {listed}"
    );
    // The aliases docs/tools.md names are arguments; `_meta` of the request is not one.
    ok(
        &client,
        "submit_task",
        json!({"task_type": "command", "parameters": {"command": "true"}, "priority": "high"}),
    )
    .await;
    let mut params = CallToolRequestParams::new("check_task_status")
        .with_arguments(args(json!({"task_id": id})));
    let mut meta = RequestMetaObject::default();
    meta.0.0.insert("progressToken".into(), json!("p-1"));
    meta.0.0.insert("example.com/trace".into(), json!("abc"));
    params.meta = Some(meta);
    let result = client.call_tool(params).await.unwrap();
    assert_ne!(result.is_error, Some(true), "{result:?}");
    client.cancel().await.unwrap();

    // A tasks-extension client gets the same refusal, not a task.
    let tasks = connect(
        fixture.server.clone(),
        Client {
            tasks: true,
            ..Client::default()
        },
    )
    .await;
    let response = tasks
        .call_tool_once(
            CallToolRequestParams::new("execute_command")
                .with_arguments(args(json!({"command": "true", "sesion_id": "s1"}))),
        )
        .await
        .unwrap();
    let CallToolResponse::Complete(result) = response else {
        panic!("expected a refusal, got {response:?}")
    };
    assert_eq!(result.is_error, Some(true));
    let text = &result.content[0].as_text().unwrap().text;
    assert!(
        text.starts_with(
            "Error INVALID_ARGUMENT: unknown argument `sesion_id`; did you mean `session_id`?"
        ),
        "{text}"
    );
    tasks.cancel().await.unwrap();
}

/// Standard JSON Schema only: no `format` that JSON Schema does not define (schemars' `uint64`,
/// `int32`, `double`... make validators warn), and every input object closed with
/// `"additionalProperties": false`, as msbd refuses other arguments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_published_schema_is_standard_and_inputs_are_closed() {
    const STANDARD_FORMATS: [&str; 19] = [
        "date-time",
        "date",
        "time",
        "duration",
        "email",
        "idn-email",
        "hostname",
        "idn-hostname",
        "ipv4",
        "ipv6",
        "uri",
        "uri-reference",
        "iri",
        "iri-reference",
        "uuid",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
        "regex",
    ];
    fn walk(value: &Value, at: String, input: bool, problems: &mut Vec<String>) {
        match value {
            Value::Object(object) => {
                if let Some(Value::String(format)) = object.get("format")
                    && !STANDARD_FORMATS.contains(&format.as_str())
                {
                    problems.push(format!("{at}: format {format:?}"));
                }
                let is_object = match object.get("type") {
                    Some(Value::String(t)) => t == "object",
                    Some(Value::Array(types)) => types.iter().any(|t| t == "object"),
                    _ => object.contains_key("properties"),
                };
                if input && is_object && object.get("additionalProperties") != Some(&json!(false)) {
                    problems.push(format!(
                        "{at}: an object without additionalProperties: false"
                    ));
                }
                for (key, value) in object {
                    // Values, not schemas.
                    if !["enum", "const", "default", "examples"].contains(&key.as_str()) {
                        walk(value, format!("{at}/{key}"), input, problems);
                    }
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, format!("{at}/{i}"), input, problems);
                }
            }
            _ => {}
        }
    }
    let fixture = fixture(ServerOptions::default()).await;
    let client = connect(fixture.server.clone(), Client::default()).await;
    let tools = client.list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 23);
    let mut problems = Vec::new();
    for tool in &tools {
        let input = Value::Object((*tool.input_schema).clone());
        walk(&input, format!("{} input", tool.name), true, &mut problems);
        let output = Value::Object((*tool.output_schema.clone().unwrap()).clone());
        walk(
            &output,
            format!("{} output", tool.name),
            false,
            &mut problems,
        );
    }
    assert!(problems.is_empty(), "{problems:#?}");
    // What the formats said stays said: an unsigned number is at least 0.
    let read = tools.iter().find(|t| t.name == "read_task_output").unwrap();
    assert_eq!(
        read.input_schema["properties"]["max_bytes"]["minimum"], 0,
        "{:?}",
        read.input_schema
    );
    let output = read.output_schema.as_ref().unwrap();
    assert_eq!(
        output["properties"]["size"],
        json!({"type": "integer", "minimum": 0, "description": output["properties"]["size"]["description"]})
    );
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manage_tools_list_their_actions_in_the_schema() {
    let fixture = fixture(ServerOptions::default()).await;
    let tools = fixture.server.tools();
    for (tool, actions) in [("manage_background_tasks", 10), ("manage_task_queue", 6)] {
        let tool = tools.iter().find(|t| t.name == tool).unwrap();
        let listed = tool.input_schema["properties"]["action"]["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: no action enum in {:?}", tool.name, tool.input_schema));
        assert_eq!(listed.len(), actions, "{}: {listed:?}", tool.name);
    }
}

/// The newest task of the fixture's principal, once one is `running`.
async fn running_task(observer: &RunningService<RoleClient, Client>) -> String {
    wait_until(Duration::from_secs(10), async || {
        let listed = ok(observer, "list_tasks", json!({"status": "running"})).await;
        match listed["tasks"][0]["task_id"].as_str() {
            Some(id) => Ok(id.to_owned()),
            None => Err(format!("no task started running: {listed}")),
        }
    })
    .await
}

/// A task's final status (waiting up to 30 s).
async fn final_status(observer: &RunningService<RoleClient, Client>, id: &str) -> String {
    wait_until(Duration::from_secs(30), async || {
        let view = ok(observer, "check_task_status", json!({"task_id": id})).await;
        let status = view["status"].as_str().unwrap().to_owned();
        if ["completed", "failed", "timeout", "cancelled"].contains(&status.as_str()) {
            Ok(status)
        } else {
            Err(format!("task {id} never finished: {view}"))
        }
    })
    .await
}

/// The task of an `execute_command` call is cancelled when its client cancels the request, and
/// only then: the connection or msbd going away while the call waits leaves the task to finish
/// (a graceful shutdown lets it, or queues it again for the next start). Found by
/// `cargo xtask chaos`: every SIGTERM cancelled the tasks that `execute_*` calls waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_execute_call_cancels_its_task_only_when_its_client_cancels_it() {
    let fixture = fixture(ServerOptions::default()).await;
    let observer = connect(fixture.server.clone(), Client::default()).await;

    // The client gives up on the call (its future is dropped): notifications/cancelled.
    let client = connect(fixture.server.clone(), Client::default()).await;
    let call = client.call_tool(
        CallToolRequestParams::new("execute_command")
            .with_arguments(args(json!({"command": "sleep 60"}))),
    );
    let (gave_up, id) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(3), call),
        running_task(&observer)
    );
    assert!(gave_up.is_err(), "the call should still be waiting");
    assert_eq!(final_status(&observer, &id).await, "cancelled");

    // The server side of the connection goes away while a call waits, as on SIGTERM.
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    let server = fixture.server.clone();
    let serving = tokio::spawn(async move { server.serve(server_io).await.unwrap() });
    let client = Client::default().serve(client_io).await.unwrap();
    let service = serving.await.unwrap();
    let waiting = tokio::spawn(async move {
        client
            .call_tool(
                CallToolRequestParams::new("execute_command")
                    .with_arguments(args(json!({"command": "sleep 1; echo finished"}))),
            )
            .await
    });
    let id = running_task(&observer).await;
    service.cancel().await.unwrap();
    let _ = waiting.await;
    assert_eq!(final_status(&observer, &id).await, "completed");
}

/// A transport that notes the tool calls it hands on to rmcp's service.
struct Noting<T> {
    inner: T,
    seen: Arc<Mutex<Vec<String>>>,
}

impl<T: Transport<RoleServer>> Transport<RoleServer> for Noting<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        let message = self.inner.receive().await?;
        if let JsonRpcMessage::Request(request) = &message {
            let name = match &request.request {
                ClientRequest::CallToolRequest(call) => call.params.name.to_string(),
                other => other.method().to_owned(),
            };
            self.seen.lock().unwrap().push(name);
        }
        Some(message)
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.inner.close().await
    }
}

/// A client of `server` through a [`FastLane`], and the requests that got through it to
/// rmcp's service (tool calls by tool name, the rest by method).
async fn connect_fast(
    server: McpServer,
    handler: Client,
) -> (RunningService<RoleClient, Client>, Arc<Mutex<Vec<String>>>) {
    let (client, seen, _) = connect_lane(server, handler, false).await;
    (client, seen)
}

/// The bytes read through it, kept.
struct Recording<R> {
    inner: R,
    kept: Arc<Mutex<Vec<u8>>>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Recording<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled()[before..].to_vec();
        self.kept.lock().unwrap().extend_from_slice(&read);
        polled
    }
}

/// The `tools/call` and `tasks/get` lines among `bytes`, by tool name or method.
fn calls_in(bytes: &Mutex<Vec<u8>>) -> Vec<String> {
    String::from_utf8_lossy(&bytes.lock().unwrap())
        .lines()
        .filter_map(|line| {
            let message: Value = serde_json::from_str(line).ok()?;
            match message["method"].as_str()? {
                "tools/call" => Some(message["params"]["name"].as_str()?.to_owned()),
                "tasks/get" => Some("tasks/get".to_owned()),
                _ => None,
            }
        })
        .collect()
}

/// [`connect_fast`], with the lines read through [`LimitedLines`] and, when `quick_lines`,
/// quick calls taken from their lines there (as msbd's stdio does).
///
/// Also gives the bytes that went on to rmcp's transport.
async fn connect_lane(
    server: McpServer,
    handler: Client,
    quick_lines: bool,
) -> (
    RunningService<RoleClient, Client>,
    Arc<Mutex<Vec<String>>>,
    Arc<Mutex<Vec<u8>>>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let passed = Arc::new(Mutex::new(Vec::new()));
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    let (read, write) = tokio::io::split(server_io);
    let read = LimitedLines::new(read, 1 << 20);
    let lane = if quick_lines {
        let (lines, queue) = mcp_tools::quick_lines(server.clone());
        let read = Recording {
            inner: read.with_quick_lines(lines),
            kept: passed.clone(),
        };
        FastLane::new(AsyncRwTransport::new_server(read, write), server.clone())
            .with_quick_lines(queue)
    } else {
        let read = Recording {
            inner: read,
            kept: passed.clone(),
        };
        FastLane::new(AsyncRwTransport::new_server(read, write), server.clone())
    };
    let transport = Noting {
        inner: lane,
        seen: seen.clone(),
    };
    tokio::spawn(async move {
        if let Ok(running) = server.serve(transport).await {
            let _ = running.waiting().await;
        }
    });
    let client = handler.serve(client_io).await.unwrap();
    seen.lock().unwrap().clear(); // `initialize`
    (client, seen, passed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_lane_answers_quick_calls_itself_as_rmcp_would() {
    quick_calls_are_answered_as_rmcp_would(false).await;
}

/// The same, with quick calls taken from their lines below rmcp's transport (msbd's stdio).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_lines_answer_quick_calls_as_rmcp_would() {
    quick_calls_are_answered_as_rmcp_would(true).await;
}

async fn quick_calls_are_answered_as_rmcp_would(quick_lines: bool) {
    let fixture = fixture(ServerOptions::default()).await;
    let plain = connect(fixture.server.clone(), Client::default()).await;
    let (fast, seen, passed) =
        connect_lane(fixture.server.clone(), Client::default(), quick_lines).await;

    let id = finished_command(&plain, "echo one; echo two").await;
    let both_ways = async |tool: &str, arguments: Value| {
        let lane = call(&fast, tool, arguments.clone()).await;
        let rmcp = call(&plain, tool, arguments.clone()).await;
        assert_eq!(
            serde_json::to_value(&lane).unwrap(),
            serde_json::to_value(&rmcp).unwrap(),
            "{tool}({arguments}): the fast lane's answer differs from rmcp's"
        );
        lane
    };
    // Answers, listings (which wait for SQLite's reader thread) and tool errors.
    let status = both_ways("check_task_status", json!({"task_id": id})).await;
    assert_eq!(status.structured_content.unwrap()["status"], "completed");
    both_ways("check_task_status", json!({})).await;
    both_ways(
        "check_task_status",
        json!({"task_id": "0192f3c4-0000-7000-8000-000000000000"}),
    )
    .await;
    both_ways("list_tasks", json!({"status": "completed"})).await;
    both_ways("list_tasks", json!({"cursor": "not-one-of-ours"})).await;
    let output = both_ways("read_task_output", json!({"task_id": id})).await;
    assert_eq!(
        output.structured_content.unwrap()["data"],
        "one\ntwo\n",
        "the whole output"
    );
    both_ways(
        "read_task_output",
        json!({"task_id": id, "cursor": 4, "max_bytes": 3}),
    )
    .await;
    let error = both_ways("read_task_output", json!({"task_id": id, "max_bytes": 0})).await;
    assert_eq!(error.is_error, Some(true));
    // An attempt named: the one it ran, and one it did not.
    let first = both_ways(
        "read_task_output",
        json!({"task_id": id, "attempt": 1, "cursor": 4}),
    )
    .await;
    let first = first.structured_content.unwrap();
    assert_eq!(
        (&first["data"], &first["attempt"]),
        (&json!("two\n"), &json!(1))
    );
    let error = both_ways("read_task_output", json!({"task_id": id, "attempt": 2})).await;
    assert_eq!(error.is_error, Some(true));
    // Arguments the tool does not take: refused by the lane, as by rmcp's way.
    for (tool, arguments) in [
        ("check_task_status", json!({"taskId": id})),
        ("check_task_status", json!({"id": id})),
        ("list_tasks", json!({"statuss": "completed"})),
        ("read_task_output", json!({"task_id": id, "cursr": 3})),
        (
            "read_task_output",
            json!({"task_id": id, "cursor": "far", "x": 1}),
        ),
    ] {
        let refused = both_ways(tool, arguments).await;
        assert_eq!(refused.is_error, Some(true));
        let text = &refused.content[0].as_text().unwrap().text;
        assert!(
            text.starts_with("Error INVALID_ARGUMENT: unknown argument"),
            "{text}"
        );
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "quick calls reached rmcp's service: {:?}",
        seen.lock().unwrap()
    );
    if quick_lines {
        assert_eq!(
            calls_in(&passed),
            Vec::<String>::new(),
            "quick calls reached rmcp's transport"
        );
    }

    // Arguments that do not decode, other tools and calls with more _meta than a progress
    // token (rmcp's client sends one with every call) take rmcp's way.
    both_ways("check_task_status", json!({"task_id": 5})).await;
    both_ways("get_task_result", json!({"task_id": id})).await;
    let mut params = CallToolRequestParams::new("check_task_status")
        .with_arguments(args(json!({"task_id": id})));
    let mut meta = RequestMetaObject::default();
    meta.0.0.insert("example.com/trace".into(), json!("abc"));
    params.meta = Some(meta);
    let with_meta = fast.call_tool(params).await.unwrap();
    assert_eq!(
        serde_json::to_value(&with_meta).unwrap(),
        serde_json::to_value(call(&plain, "check_task_status", json!({"task_id": id})).await)
            .unwrap()
    );
    assert_eq!(
        *seen.lock().unwrap(),
        ["check_task_status", "get_task_result", "check_task_status"]
    );
    if quick_lines {
        assert_eq!(
            calls_in(&passed),
            ["check_task_status", "get_task_result", "check_task_status"]
        );
    }
}

/// A retried task keeps the output of each attempt: the latest by default, an earlier one by
/// its number, each with its own cursor; numbers out of range, and attempts whose output is
/// not kept, are refused with the attempts to give. The fast lane answers the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_task_output_reads_every_attempt_of_a_retried_task() {
    let fixture = fixture(ServerOptions::default()).await;
    let plain = connect(fixture.server.clone(), Client::default()).await;
    let (fast, _) = connect_fast(fixture.server.clone(), Client::default()).await;
    // The session keeps a count across attempts: the first attempt fails, the retry succeeds.
    let created = ok(&plain, "submit_task", json!({
        "task_type": "command",
        "params": {"command": "if [ -e ran ]; then echo second; else touch ran; echo first; exit 1; fi"},
        "session_id": "retried",
        "max_retries": 1,
    })).await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    let result = ok(
        &plain,
        "get_task_result",
        json!({"task_id": id, "wait": true, "timeout": 60}),
    )
    .await;
    assert_eq!(result["status"], "completed", "{result}");
    let both_ways = async |arguments: Value| {
        let lane = call(&fast, "read_task_output", arguments.clone()).await;
        let rmcp = call(&plain, "read_task_output", arguments.clone()).await;
        assert_eq!(
            serde_json::to_value(&lane).unwrap(),
            serde_json::to_value(&rmcp).unwrap(),
            "read_task_output({arguments}): the fast lane's answer differs from rmcp's"
        );
        lane
    };
    let answer = |result: CallToolResult| {
        assert_ne!(result.is_error, Some(true), "{result:?}");
        result.structured_content.unwrap()
    };

    // The latest attempt by default, the first by its number.
    let latest = answer(both_ways(json!({"task_id": id})).await);
    assert_eq!(latest["data"], "second\n", "{latest}");
    assert_eq!(latest["attempt"], 2);
    assert_eq!(latest["complete"], true);
    assert_eq!(latest["status"], "completed");
    let named = answer(both_ways(json!({"task_id": id, "attempt": 2})).await);
    assert_eq!(named, latest);
    let first = answer(both_ways(json!({"task_id": id, "attempt": 1})).await);
    assert_eq!(first["data"], "first\n", "{first}");
    assert_eq!(first["attempt"], 1);
    assert_eq!(first["complete"], true);
    // Each attempt has its own cursor; an earlier attempt is complete once read to its end.
    let part = answer(both_ways(json!({"task_id": id, "attempt": 1, "max_bytes": 3})).await);
    assert_eq!(
        (&part["data"], &part["complete"]),
        (&json!("fir"), &json!(false))
    );
    let text = call(
        &plain,
        "read_task_output",
        json!({"task_id": id, "attempt": 1, "max_bytes": 3}),
    )
    .await;
    let text = &text.content[0].as_text().unwrap().text;
    assert!(
        text.ends_with("[bytes 0..3 of 6; attempt 1 of 2; task completed; read on with cursor=3]"),
        "{text}"
    );
    let rest = answer(
        both_ways(json!({"task_id": id, "attempt": 1, "cursor": part["next_cursor"]})).await,
    );
    assert_eq!(
        (&rest["data"], &rest["complete"]),
        (&json!("st\n"), &json!(true))
    );

    // Out of range: refused, saying which attempts there are.
    for attempt in [0, 3] {
        let refused = both_ways(json!({"task_id": id, "attempt": attempt})).await;
        assert_eq!(refused.is_error, Some(true));
        let text = &refused.content[0].as_text().unwrap().text;
        assert!(
            text.starts_with(&format!("Error INVALID_ARGUMENT: attempt {attempt} is out of range: task {id} has had attempts 1 to 2")),
            "{text}"
        );
        assert!(text.contains("give 1 to 2"), "{text}");
    }
    // An attempt whose output is gone: refused, naming the attempts whose output is kept.
    std::fs::remove_file(fixture._dir.path().join(format!("data/outputs/{id}.log"))).unwrap();
    let refused = both_ways(json!({"task_id": id, "attempt": 1})).await;
    assert_eq!(refused.is_error, Some(true));
    let text = &refused.content[0].as_text().unwrap().text;
    assert!(
        text.starts_with(&format!(
            "Error INVALID_ARGUMENT: attempt 1 of task {id} has no output kept; only attempt 2's is"
        )),
        "{text}"
    );
    assert_eq!(
        answer(both_ways(json!({"task_id": id})).await)["data"],
        "second\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_lane_answers_tasks_get_as_rmcp_would() {
    tasks_get_is_answered_as_rmcp_would(false).await;
}

/// The same, with quick calls taken from their lines below rmcp's transport (msbd's stdio).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_lines_answer_tasks_get_as_rmcp_would() {
    tasks_get_is_answered_as_rmcp_would(true).await;
}

async fn tasks_get_is_answered_as_rmcp_would(quick_lines: bool) {
    let fixture = fixture(ServerOptions::default()).await;
    let tasks = Client {
        tasks: true,
        ..Client::default()
    };
    let plain = connect(fixture.server.clone(), tasks.clone()).await;
    let (fast, seen, passed) = connect_lane(fixture.server.clone(), tasks, quick_lines).await;
    let (untasked, untasked_seen, untasked_passed) =
        connect_lane(fixture.server.clone(), Client::default(), quick_lines).await;
    let response = plain
        .call_tool_once(
            CallToolRequestParams::new("execute_command")
                .with_arguments(args(json!({"command": "sleep 0.2; echo polled"}))),
        )
        .await
        .unwrap();
    let CallToolResponse::Task(created) = response else {
        panic!("expected a task, got {response:?}")
    };
    let id = created.task.task_id.clone();
    let get = async |client: &RunningService<RoleClient, Client>, id: &str| {
        client
            .peer()
            .get_task(GetTaskParams::new(id.to_owned()))
            .await
            .map(|got| serde_json::to_value(got).unwrap())
            .map_err(|error| error.to_string())
    };
    // While it runs, and once it has finished: the same answers both ways.
    wait_until(Duration::from_secs(30), async || {
        let lane = get(&fast, &id).await.unwrap();
        let rmcp = get(&plain, &id).await.unwrap();
        // The status message carries the progress, which may move between the two reads.
        if lane["status"] == rmcp["status"] && lane["status"] == "completed" {
            assert_eq!(lane, rmcp, "the fast lane's tasks/get differs from rmcp's");
            Ok(())
        } else {
            Err(format!("the task never finished: {lane}"))
        }
    })
    .await;
    assert!(
        get(&fast, &id)
            .await
            .unwrap()
            .to_string()
            .contains("polled"),
        "the result holds the output"
    );
    // An unknown id: the same JSON-RPC error.
    let lane = get(&fast, "0192f3c4-0000-7000-8000-000000000000").await;
    let rmcp = get(&plain, "0192f3c4-0000-7000-8000-000000000000").await;
    assert!(lane.is_err());
    assert_eq!(lane, rmcp);
    assert!(
        !seen.lock().unwrap().iter().any(|m| m == "tasks/get"),
        "tasks/get reached rmcp's service: {:?}",
        seen.lock().unwrap()
    );
    // A client without the tasks extension gets rmcp's answer (an error), from rmcp.
    let refused = get(&untasked, &id).await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(*untasked_seen.lock().unwrap(), ["tasks/get"]);
    assert_eq!(calls_in(&untasked_passed), ["tasks/get"]);
    if quick_lines {
        assert_eq!(
            calls_in(&passed),
            Vec::<String>::new(),
            "tasks/get reached rmcp's transport"
        );
    }
}

/// A call never outlives its client: `execute_command` answers after `wait_seconds` with the
/// task still going (not an error), and `wait_for_tasks` then waits for it and others in one
/// call, with progress notifications.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_execute_answers_in_time_and_wait_for_tasks_waits_for_several() {
    let fixture = fixture(ServerOptions::default()).await;
    let handler = Client::default();
    let client = connect(fixture.server.clone(), handler.clone()).await;

    // Still going after the wait: the task id, where it stands, the output so far, what next.
    let started = std::time::Instant::now();
    let going = ok(
        &client,
        "execute_command",
        json!({"command": "echo first; sleep 2; echo second", "wait_seconds": 0.5}),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered after {:?}",
        started.elapsed()
    );
    let id = going["task_id"].as_str().unwrap().to_owned();
    assert!(
        ["pending", "running"].contains(&going["status"].as_str().unwrap()),
        "{going}"
    );
    assert_eq!(going["waited_seconds"], 0.5);
    assert!(going["next"].as_str().unwrap().contains("wait_for_tasks"));
    assert!(going.get("exit_code").is_none(), "{going}");

    // The tail of a running task's output.
    wait_until(Duration::from_secs(10), async || {
        let read = ok(
            &client,
            "read_task_output",
            json!({"task_id": id, "tail": 6}),
        )
        .await;
        (read["data"] == "first\n").then_some(()).ok_or(read)
    })
    .await;

    // The first task, a quick one, and one held until the test lets it go (it waits for a
    // file that write_file makes while the wait is under way): mode all ends when all three
    // have, with a progress notification for the held one, which finishes during the wait.
    let quick = ok(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "echo quick"}}),
    )
    .await;
    let quick = quick["task_id"].as_str().unwrap().to_owned();
    let held = ok(
        &client,
        "execute_command",
        json!({"command": "while [ ! -e go ]; do sleep 0.05; done; echo through", "session_id": "gate", "wait_seconds": 0}),
    )
    .await;
    let held = held["task_id"].as_str().unwrap().to_owned();
    let mut params = CallToolRequestParams::new("wait_for_tasks").with_arguments(args(
        json!({"task_ids": [id, quick, quick, held], "mode": "all", "timeout": 30}),
    ));
    params.meta = Some(RequestMetaObject::with_progress_token(ProgressToken(
        NumberOrString::Number(9),
    )));
    let (all, _) = tokio::join!(
        client.call_tool(params),
        ok(
            &client,
            "write_file",
            json!({"session_id": "gate", "path": "go", "content": ""}),
        )
    );
    let all = all.unwrap();
    assert_ne!(all.is_error, Some(true), "{all:?}");
    let all = all.structured_content.unwrap();
    assert_eq!(
        (
            all["done"].as_bool(),
            all["finished"].as_u64(),
            all["total"].as_u64()
        ),
        (Some(true), Some(3), Some(3)),
        "{all}"
    );
    let statuses: Vec<&str> = all["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["completed", "completed", "completed"], "{all}");
    assert_eq!(
        all["tasks"][0]["task_id"],
        id.as_str(),
        "in the order asked"
    );
    assert!(
        all["tasks"][0]["result"]["output_tail"]
            .as_str()
            .unwrap()
            .contains("second")
    );
    let progress = handler.progress.lock().unwrap().clone();
    assert!(
        progress.iter().any(|(p, m)| {
            (1.0..=3.0).contains(p)
                && m.as_deref()
                    .is_some_and(|m| m.contains(&held) && m.contains("completed"))
        }),
        "{progress:?}"
    );

    // Mode any with one task that will not finish in time: done at once with the finished one.
    let long = ok(
        &client,
        "execute_command",
        json!({"command": "sleep 30", "wait_seconds": 0}),
    )
    .await;
    let long = long["task_id"].as_str().unwrap().to_owned();
    let any = ok(
        &client,
        "wait_for_tasks",
        json!({"task_ids": [long, quick], "timeout": 20}),
    )
    .await;
    assert_eq!(
        (any["done"].as_bool(), any["finished"].as_u64()),
        (Some(true), Some(1)),
        "{any}"
    );
    // Mode all runs out: done false, and the call says how to go on.
    let started = std::time::Instant::now();
    let out = ok(
        &client,
        "wait_for_tasks",
        json!({"task_ids": [long, quick], "mode": "all", "timeout": 0.3}),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        (out["done"].as_bool(), out["finished"].as_u64()),
        (Some(false), Some(1)),
        "{out}"
    );
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("call wait_for_tasks again"),
        "{out}"
    );
    ok(&client, "cancel_task", json!({"task_id": long})).await;

    // Bad input: clear errors, nothing submitted.
    let listed = ok(&client, "list_tasks", json!({"status": "all"})).await["count"].clone();
    for (tool, arguments, says) in [
        (
            "execute_command",
            json!({"command": "echo x", "wait_seconds": -1}),
            "wait_seconds -1 is out of range",
        ),
        (
            "execute_command",
            json!({"command": "echo x", "wait_seconds": 3601}),
            "give 0 to 3600 seconds",
        ),
        (
            "wait_for_tasks",
            json!({"task_ids": []}),
            "give 1 to 100 task ids",
        ),
        (
            "wait_for_tasks",
            json!({"task_ids": [quick], "timeout": -2}),
            "timeout -2 is out of range",
        ),
        (
            "wait_for_tasks",
            json!({"task_ids": ["0193e4a2-0000-7000-8000-000000000000"]}),
            "TASK_NOT_FOUND",
        ),
        (
            "read_task_output",
            json!({"task_id": quick, "tail": 0}),
            "tail 0 is out of range",
        ),
        (
            "read_task_output",
            json!({"task_id": quick, "tail": 5, "cursor": 1}),
            "tail and cursor were both given",
        ),
    ] {
        let text = tool_error(&client, tool, arguments).await;
        assert!(text.contains(says), "{tool}: {text}");
    }
    assert_eq!(
        ok(&client, "list_tasks", json!({"status": "all"})).await["count"],
        listed
    );
    client.cancel().await.unwrap();
}

/// Files in and out of a session through the tools, with real sandboxed commands on the other
/// side: what `write_file` wrote a command reads, what a command wrote (binary) comes back byte
/// for byte, and links a command plants towards /etc/shadow or the task store lead nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_go_in_and_out_of_a_session_and_never_out_of_its_work_directory() {
    use base64::Engine as _;
    let base64 = base64::engine::general_purpose::STANDARD;
    let fixture = fixture(ServerOptions::default()).await;
    let alice = connect(fixture.server.with_principal("alice"), Client::default()).await;
    let bob = connect(fixture.server.with_principal("bob"), Client::default()).await;
    let session = "files-session";

    // write_file makes the session; a command in it reads the file (it is the session's own).
    let written = ok(
        &alice,
        "write_file",
        json!({"session_id": session, "path": "in/hello.txt", "content": "hello from the agent\n"}),
    )
    .await;
    assert_eq!(
        (
            written["created"].as_bool(),
            written["bytes_written"].as_u64()
        ),
        (Some(true), Some(21))
    );
    let cat = ok(
        &alice,
        "execute_command",
        json!({"command": "cat in/hello.txt && echo more >> in/hello.txt", "session_id": session}),
    )
    .await;
    assert_eq!(cat["exit_code"], 0, "{cat}");
    assert_eq!(cat["output_tail"], "hello from the agent\n");
    let read = ok(
        &alice,
        "read_file",
        json!({"session_id": session, "path": "in/hello.txt"}),
    )
    .await;
    assert_eq!(read["content"], "hello from the agent\nmore\n", "{read}");
    assert_eq!(read["complete"], true);

    // Binary both ways.
    let bytes: Vec<u8> = (0..=255u8).rev().cycle().take(3000).collect();
    ok(
        &alice,
        "write_file",
        json!({"session_id": session, "path": "bin/in.bin", "content": base64.encode(&bytes), "encoding": "base64", "mode": "0640"}),
    )
    .await;
    let sum = ok(
        &alice,
        "execute_command",
        json!({"command": "python3 -c \"import os; d = open('bin/in.bin', 'rb').read(); print(len(d), sum(d), oct(os.stat('bin/in.bin').st_mode & 0o777))\"; python3 -c \"import sys; sys.stdout.buffer.write(bytes(range(256)) * 40)\" > bin/out.bin", "session_id": session}),
    )
    .await;
    let expected_sum: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(
        sum["output_tail"],
        format!("3000 {expected_sum} 0o640\n"),
        "{sum}"
    );
    let out = ok(
        &alice,
        "read_file",
        json!({"session_id": session, "path": "bin/out.bin", "encoding": "base64", "offset": 10, "length": 5000}),
    )
    .await;
    let got = base64.decode(out["content"].as_str().unwrap()).unwrap();
    let want: Vec<u8> = (0..=255u8).cycle().skip(10).take(5000).collect();
    assert_eq!(got, want);
    assert_eq!(
        (
            out["size"].as_u64(),
            out["next_offset"].as_u64(),
            out["complete"].as_bool()
        ),
        (Some(10_240), Some(5010), Some(false))
    );
    let text = tool_error(
        &alice,
        "read_file",
        json!({"session_id": session, "path": "bin/out.bin"}),
    )
    .await;
    assert!(
        text.contains("not UTF-8") && text.contains("base64"),
        "{text}"
    );

    // Links a sandboxed command plants lead nowhere: not to /etc/shadow, not to the task store.
    let store = fixture._dir.path().join("tasks.sqlite3");
    let shadow_before = std::fs::read("/etc/shadow").ok();
    let plant = format!(
        "ln -s /etc/shadow shadow && ln -s {} store && ln -s / root && ln -s .. up",
        store.display()
    );
    let planted = ok(
        &alice,
        "execute_command",
        json!({"command": plant, "session_id": session}),
    )
    .await;
    assert_eq!(planted["exit_code"], 0, "{planted}");
    for path in [
        "shadow",
        "store",
        "root/etc/shadow",
        "up/work/in/hello.txt",
        "../../secret",
        "/etc/shadow",
    ] {
        let text = tool_error(
            &alice,
            "read_file",
            json!({"session_id": session, "path": path}),
        )
        .await;
        assert!(
            text.contains("outside the session's work directory"),
            "read_file {path}: {text}"
        );
        let text = tool_error(
            &alice,
            "write_file",
            json!({"session_id": session, "path": path, "content": "owned"}),
        )
        .await;
        assert!(
            text.contains("outside the session's work directory")
                || text.contains("a path to write holds no `..`"),
            "write_file {path}: {text}"
        );
    }
    let text = tool_error(
        &alice,
        "list_files",
        json!({"session_id": session, "path": "root/etc"}),
    )
    .await;
    assert!(text.contains("outside"), "{text}");
    assert_eq!(std::fs::read("/etc/shadow").ok(), shadow_before);
    // The store grows as tasks are recorded (its size is no witness); what the tools would have
    // written ("owned", or a truncation) is.
    let header = std::fs::read(&store).unwrap();
    assert!(
        header.starts_with(b"SQLite format 3\0") && header.len() >= 4096,
        "the task store was written through a link: {} bytes",
        header.len()
    );

    // The listing shows the links as links.
    let listed = ok(
        &alice,
        "list_files",
        json!({"session_id": session, "depth": 2}),
    )
    .await;
    let entries = listed["entries"].as_array().unwrap();
    let kind = |path: &str| {
        entries
            .iter()
            .find(|e| e["path"] == path)
            .map(|e| e["kind"].as_str().unwrap().to_owned())
    };
    assert_eq!(kind("shadow").as_deref(), Some("symlink"), "{listed}");
    assert_eq!(kind("in/hello.txt").as_deref(), Some("file"), "{listed}");
    assert_eq!(kind("bin").as_deref(), Some("directory"), "{listed}");
    let py = ok(
        &alice,
        "list_files",
        json!({"session_id": session, "glob": "**/*.bin", "depth": 3}),
    )
    .await;
    assert_eq!(py["count"], 2, "{py}");

    // Another principal's session is not found, for every file tool.
    for (tool, arguments) in [
        (
            "read_file",
            json!({"session_id": session, "path": "in/hello.txt"}),
        ),
        (
            "write_file",
            json!({"session_id": session, "path": "x", "content": "x"}),
        ),
        ("list_files", json!({"session_id": session})),
    ] {
        let text = tool_error(&bob, tool, arguments).await;
        assert!(text.contains("SESSION_NOT_FOUND"), "{tool}: {text}");
    }
    // Bad input: clear errors.
    for (arguments, says) in [
        (
            json!({"session_id": session, "path": "x", "content": "%%%", "encoding": "base64"}),
            "not valid base64",
        ),
        (
            json!({"session_id": session, "path": "x", "content": "x", "mode": "rwx"}),
            "not permission bits in octal",
        ),
        (
            json!({"session_id": session, "path": "in", "content": "x"}),
            "is a directory",
        ),
    ] {
        let text = tool_error(&alice, "write_file", arguments).await;
        assert!(text.contains(says), "{text}");
    }
    let text = tool_error(
        &alice,
        "read_file",
        json!({"session_id": session, "path": "nope"}),
    )
    .await;
    assert!(text.contains("FILE_NOT_FOUND"), "{text}");
    let text = tool_error(
        &alice,
        "read_file",
        json!({"session_id": "no-such-session", "path": "x"}),
    )
    .await;
    assert!(text.contains("SESSION_NOT_FOUND"), "{text}");
    alice.cancel().await.unwrap();
    bob.cancel().await.unwrap();
}

/// `read_task_output` reads stdout and stderr each alone (`stream`), with its own cursor and
/// tail, or interleaved as before; and a command that fails keeps its facts as fields: the
/// exit code or signal, why it ended and the end of its stderr, in the execute answer,
/// get_task_result and check_task_status alike, beside the same error message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_streams_read_apart_and_a_failed_command_keeps_its_exit_code_and_stderr() {
    let fixture = fixture(ServerOptions::default()).await;
    let client = connect(fixture.server.clone(), Client::default()).await;
    let (fast, _) = connect_fast(fixture.server.clone(), Client::default()).await;

    let failed = call(
        &client,
        "execute_command",
        json!({"command": "echo out; echo err >&2; exit 3"}),
    )
    .await;
    assert_eq!(failed.is_error, Some(true), "{failed:?}");
    let text = failed.content[0].as_text().unwrap().text.clone();
    assert!(text.starts_with("exit code 3 after "), "{text}");
    let answer = failed.structured_content.clone().unwrap();
    assert_eq!(answer["status"], "failed", "{answer}");
    assert_eq!(answer["exit_code"], 3, "{answer}");
    assert_eq!(answer["signal"], Value::Null, "{answer}");
    assert_eq!(answer["reason"], "exited", "{answer}");
    assert_eq!(answer["stderr_tail"], "err\n", "{answer}");
    let tail = answer["output_tail"].as_str().unwrap();
    assert!(tail == "out\nerr\n" || tail == "err\nout\n", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("exit code 3 after "),
        "{answer}"
    );
    let id = answer["task_id"].as_str().unwrap().to_owned();

    let result = ok(&client, "get_task_result", json!({"task_id": id})).await;
    assert_eq!(result["status"], "failed", "{result}");
    assert_eq!(result["result"]["exit_code"], 3, "{result}");
    assert_eq!(result["result"]["stderr_tail"], "err\n", "{result}");
    assert_eq!(result["error"], answer["error"], "the message is as it was");
    let status = ok(&client, "check_task_status", json!({"task_id": id})).await;
    assert_eq!(
        status["failure"],
        json!({"exit_code": 3, "signal": null, "reason": "exited", "stderr_tail": "err\n"}),
        "{status}"
    );
    assert_eq!(status["error"], answer["error"]);
    // Lists keep the facts, not the stderr.
    let listed = ok(&client, "list_tasks", json!({})).await;
    let entry = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["task_id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        entry["failure"],
        json!({"exit_code": 3, "signal": null, "reason": "exited"}),
        "{listed}"
    );

    // Each stream alone, by cursor and by tail; the fast lane answers as rmcp does.
    let read = async |arguments: Value| {
        let lane = call(&fast, "read_task_output", arguments.clone()).await;
        let rmcp = call(&client, "read_task_output", arguments.clone()).await;
        assert_eq!(
            serde_json::to_value(&lane).unwrap(),
            serde_json::to_value(&rmcp).unwrap(),
            "read_task_output({arguments}): the fast lane's answer differs from rmcp's"
        );
        assert_ne!(rmcp.is_error, Some(true), "{arguments}: {rmcp:?}");
        rmcp.structured_content.unwrap()
    };
    let stderr = read(json!({"task_id": id, "stream": "stderr"})).await;
    assert_eq!(
        (&stderr["data"], &stderr["size"], &stderr["complete"]),
        (&json!("err\n"), &json!(4), &json!(true)),
        "{stderr}"
    );
    assert_eq!(stderr["stream"], "stderr");
    let stdout = read(json!({"task_id": id, "stream": "stdout", "cursor": 1})).await;
    assert_eq!(
        (&stdout["data"], &stdout["cursor"], &stdout["next_cursor"]),
        (&json!("ut\n"), &json!(1), &json!(4)),
        "{stdout}"
    );
    let tail = read(json!({"task_id": id, "stream": "stderr", "tail": 2})).await;
    assert_eq!((&tail["data"], &tail["cursor"]), (&json!("r\n"), &json!(2)));
    let combined = read(json!({"task_id": id})).await;
    assert_eq!(combined["stream"], "combined");
    assert_eq!(combined["size"], 8, "{combined}");
    assert_eq!(
        read(json!({"task_id": id, "stream": "combined"})).await,
        combined
    );
    let part = call(
        &client,
        "read_task_output",
        json!({"task_id": id, "stream": "stdout", "max_bytes": 2}),
    )
    .await;
    let text = &part.content[0].as_text().unwrap().text;
    assert!(
        text.ends_with("[bytes 0..2 of 4; stdout only; task failed; read on with cursor=2]"),
        "{text}"
    );
    // A stream that is not one: refused, naming those there are.
    let text = tool_error(
        &client,
        "read_task_output",
        json!({"task_id": id, "stream": "both"}),
    )
    .await;
    assert!(
        text.contains("INVALID_ARGUMENT")
            && text.contains("combined")
            && text.contains("stdout")
            && text.contains("stderr"),
        "{text}"
    );

    // Killed by a signal: the signal, no exit code.
    let killed = call(&client, "execute_command", json!({"command": "kill -9 $$"})).await;
    assert_eq!(killed.is_error, Some(true), "{killed:?}");
    let answer = killed.structured_content.unwrap();
    assert_eq!(
        (&answer["signal"], &answer["exit_code"]),
        (&json!(9), &Value::Null),
        "{answer}"
    );
    let id = answer["task_id"].as_str().unwrap();
    let result = call(&client, "get_task_result", json!({"task_id": id})).await;
    let text = &result.content[0].as_text().unwrap().text;
    assert!(text.contains("[killed by signal 9]"), "{text}");
    let status = ok(&client, "check_task_status", json!({"task_id": id})).await;
    assert_eq!(status["failure"]["signal"], 9, "{status}");

    // Out of time: a timeout, whose facts say so and keep the stderr written before it.
    let slow = call(
        &client,
        "execute_command",
        json!({"command": "echo late >&2; exec sleep 30", "timeout": 1}),
    )
    .await;
    assert_eq!(slow.is_error, Some(true), "{slow:?}");
    let answer = slow.structured_content.unwrap();
    assert_eq!(answer["status"], "timeout", "{answer}");
    assert_eq!(answer["error"], "timed out after 1.0 s", "{answer}");
    assert_eq!(
        (
            &answer["reason"],
            &answer["exit_code"],
            &answer["stderr_tail"]
        ),
        (&json!("timed out"), &Value::Null, &json!("late\n")),
        "{answer}"
    );
    client.cancel().await.unwrap();
}

/// A transport above a [`FastLane`] that notes its `settled` flag when a request goes on to
/// rmcp's service and when rmcp's answer comes back down.
struct Settling<T> {
    inner: T,
    settled: Arc<std::sync::atomic::AtomicBool>,
    noted: Arc<Mutex<Vec<(&'static str, bool)>>>,
}

impl<T: Transport<RoleServer>> Transport<RoleServer> for Settling<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let answer = matches!(item, JsonRpcMessage::Response(_));
        let sending = self.inner.send(item);
        if answer {
            let settled = self.settled.load(std::sync::atomic::Ordering::Acquire);
            self.noted.lock().unwrap().push(("answered", settled));
        }
        sending
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        let message = self.inner.receive().await?;
        if let JsonRpcMessage::Request(_) = &message {
            let settled = self.settled.load(std::sync::atomic::Ordering::Acquire);
            self.noted.lock().unwrap().push(("to rmcp", settled));
        }
        Some(message)
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.inner.close().await
    }
}

/// `FastLane::with_settled`: the flag is down while a request is with rmcp's service, up again
/// once its answer goes out, and stays up through the lane's own quick answers (msbd's stdin
/// spins after an answer only while it is up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fast_lane_says_when_no_call_is_under_way() {
    let fixture = fixture(ServerOptions::default()).await;
    let settled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let noted = Arc::new(Mutex::new(Vec::new()));
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    let (read, write) = tokio::io::split(server_io);
    let transport = Settling {
        inner: FastLane::new(
            AsyncRwTransport::new_server(read, write),
            fixture.server.clone(),
        )
        .with_settled(settled.clone()),
        settled: settled.clone(),
        noted: noted.clone(),
    };
    let server = fixture.server.clone();
    tokio::spawn(async move {
        if let Ok(running) = server.serve(transport).await {
            let _ = running.waiting().await;
        }
    });
    let client = Client::default().serve(client_io).await.unwrap();
    let created = ok(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "true"}}),
    )
    .await;
    let id = created["task_id"].as_str().unwrap().to_owned();
    assert!(settled.load(std::sync::atomic::Ordering::Acquire));
    // `initialize`, then `submit_task`: each down while with rmcp, up as its answer goes out.
    assert_eq!(
        *noted.lock().unwrap(),
        [
            ("to rmcp", false),
            ("answered", true),
            ("to rmcp", false),
            ("answered", true)
        ]
    );
    noted.lock().unwrap().clear();
    ok(&client, "check_task_status", json!({"task_id": id})).await;
    // The lane answered that one itself: rmcp saw nothing, and the flag stayed up.
    assert!(noted.lock().unwrap().is_empty());
    assert!(settled.load(std::sync::atomic::Ordering::Acquire));
}

/// The HTTP sessions (`FastLaneSessions`): once a session is open, a quick call is answered
/// where rmcp asks for the request's stream (one message, with no event id, and the stream
/// ends), with the answer the session itself gives; anything else goes through the session
/// (whose messages carry event ids), and so does every call before the session is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sessions_answer_quick_calls_on_the_request_as_the_session_would() {
    use mcp_tools::transport::FastLaneSessions;
    use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
    use rmcp::transport::streamable_http_server::session::{ServerSseMessage, SessionManager};

    let fixture = fixture(ServerOptions::default()).await;
    let plain = connect(fixture.server.clone(), Client::default()).await;
    let task = finished_command(&plain, "echo over http").await;

    let sessions = FastLaneSessions::new(fixture.server.clone());
    let (session, transport) = sessions.create_session().await.unwrap();
    let server = fixture.server.clone();
    tokio::spawn(async move {
        if let Ok(running) = server.serve(transport).await {
            let _ = running.waiting().await;
        }
    });
    let message = |value: Value| -> ClientJsonRpcMessage { serde_json::from_value(value).unwrap() };
    let status_call = |id: u32, meta: Option<Value>| {
        let mut params = json!({"name": "check_task_status", "arguments": {"task_id": task}});
        if let Some(meta) = meta {
            params["_meta"] = meta;
        }
        message(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}))
    };
    // The messages of a request's stream, the priming events (no message) left out.
    let stream = async |request: ClientJsonRpcMessage| -> Vec<(Option<String>, Value)> {
        let stream = sessions.create_stream(&session, request).await.unwrap();
        let mut stream = std::pin::pin!(stream);
        let mut got = Vec::new();
        let read = async {
            while let Some(ServerSseMessage {
                event_id, message, ..
            }) =
                std::future::poll_fn(|cx| futures_core::Stream::poll_next(stream.as_mut(), cx))
                    .await
            {
                if let Some(message) = message {
                    let message: &ServerJsonRpcMessage = &message;
                    got.push((event_id, serde_json::to_value(message).unwrap()));
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("the request's stream ends");
        got
    };

    let initialized = sessions
        .initialize_session(&session, message(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "http-test", "version": "0"}}})))
        .await
        .unwrap();
    assert!(
        serde_json::to_value(&initialized).unwrap()["result"]["protocolVersion"].is_string(),
        "{initialized:?}"
    );
    // Before `notifications/initialized`, the session answers.
    let early = stream(status_call(1, None)).await;
    assert_eq!(early.len(), 1, "{early:?}");
    assert!(early[0].0.is_some(), "from the session: {early:?}");

    sessions
        .accept_message(
            &session,
            message(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})),
        )
        .await
        .unwrap();
    // The session hears the notification on its own task: wait until calls are answered here.
    let here = wait_until(Duration::from_secs(10), async || {
        let got = stream(status_call(2, None)).await;
        match got.as_slice() {
            [(None, _)] => Ok(got),
            _ => Err(format!("still answered by the session: {got:?}")),
        }
    })
    .await;
    // The same call with more `_meta` than a progress token goes through the session.
    let session_way = stream(status_call(
        2,
        Some(json!({"progressToken": 7, "example.com/trace": "abc"})),
    ))
    .await;
    assert_eq!(session_way.len(), 1, "{session_way:?}");
    assert!(session_way[0].0.is_some(), "{session_way:?}");
    assert_eq!(
        here[0].1, session_way[0].1,
        "the answer made on the request differs from the session's"
    );
    assert_eq!(
        here[0].1["result"]["structuredContent"]["status"],
        "completed"
    );
    // A tool error, made both ways.
    let unknown = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "read_task_output", "arguments": {"task_id": task, "max_bytes": 0}}});
    let here = stream(message(unknown.clone())).await;
    let mut with_meta = unknown;
    with_meta["params"]["_meta"] = json!({"example.com/trace": "abc"});
    let session_way = stream(message(with_meta)).await;
    assert_eq!((here[0].0.as_ref(), here.len()), (None, 1), "{here:?}");
    assert_eq!(here[0].1, session_way[0].1);
    assert_eq!(here[0].1["result"]["isError"], true, "{here:?}");
    // Other tools go through the session.
    let other = stream(message(json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "get_task_result", "arguments": {"task_id": task}}}))).await;
    assert!(other[0].0.is_some(), "{other:?}");
    assert_eq!(
        other[0].1["result"]["structuredContent"]["status"],
        "completed"
    );

    // A closed session's calls are not answered here.
    sessions.close_session(&session).await.unwrap();
    assert!(
        sessions
            .create_stream(&session, status_call(5, None))
            .await
            .is_err(),
        "a closed session's call is refused"
    );
}

/// A raw JSON-RPC client of `server` over a byte stream, read as msbd's stdio reads (through
/// [`LimitedLines`] with quick lines, and a [`FastLane`]); the bytes that went on to rmcp's
/// transport are kept.
struct RawLane {
    write: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>>,
    /// Messages read while looking for another.
    read: Vec<Value>,
    /// Bytes sent, and the bytes the server side has read of them.
    sent: usize,
    read_in: Arc<Mutex<Vec<u8>>>,
    passed: Arc<Mutex<Vec<u8>>>,
}

impl RawLane {
    async fn open(server: McpServer) -> RawLane {
        use tokio::io::AsyncBufReadExt as _;
        let passed = Arc::new(Mutex::new(Vec::new()));
        let read_in = Arc::new(Mutex::new(Vec::new()));
        let (server_io, client_io) = tokio::io::duplex(1 << 20);
        let (read, write) = tokio::io::split(server_io);
        let (lines, queue) = mcp_tools::quick_lines(server.clone());
        let read = Recording {
            inner: read,
            kept: read_in.clone(),
        };
        let read = Recording {
            inner: LimitedLines::new(read, 1 << 20).with_quick_lines(lines),
            kept: passed.clone(),
        };
        let lane = FastLane::new(AsyncRwTransport::new_server(read, write), server.clone())
            .with_quick_lines(queue);
        tokio::spawn(async move {
            if let Ok(running) = server.serve(lane).await {
                let _ = running.waiting().await;
            }
        });
        let (read, write) = tokio::io::split(client_io);
        let mut raw = RawLane {
            write,
            lines: tokio::io::BufReader::new(read).lines(),
            read: Vec::new(),
            sent: 0,
            read_in,
            passed,
        };
        raw.send(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#).await;
        raw.answer_to(json!(0)).await;
        // A ping answered after the notification: the session is open when it is.
        raw.send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .await;
        raw.send(r#"{"jsonrpc":"2.0","id":"opened","method":"ping"}"#)
            .await;
        raw.answer_to(json!("opened")).await;
        raw
    }

    async fn send(&mut self, line: &str) {
        self.send_raw(&format!("{line}\n")).await;
    }

    async fn send_raw(&mut self, bytes: &str) {
        use tokio::io::AsyncWriteExt as _;
        self.write.write_all(bytes.as_bytes()).await.unwrap();
        self.write.flush().await.unwrap();
        self.sent += bytes.len();
    }

    /// Waits until the server side has read every byte sent.
    async fn all_read(&self) {
        let read_in = self.read_in.clone();
        let sent = self.sent;
        wait_until(Duration::from_secs(10), async || {
            let read = read_in.lock().unwrap().len();
            if read == sent {
                Ok(())
            } else {
                Err(format!("{read} of {sent} bytes read"))
            }
        })
        .await;
    }

    /// The next message read (`None` at the end of the stream).
    async fn next(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("msbd answers within 30 s")
            .unwrap()?;
        Some(serde_json::from_str(&line).unwrap())
    }

    /// The answer to request `id`, keeping what else is read.
    async fn answer_to(&mut self, id: Value) -> Value {
        if let Some(at) = self.read.iter().position(|m| m["id"] == id) {
            return self.read.remove(at);
        }
        loop {
            let message = self.next().await.expect("an answer before the end");
            if message["id"] == id {
                return message;
            }
            self.read.push(message);
        }
    }

    /// Whether a request with this JSON text of an id went on to rmcp's transport.
    fn passed(&self, id: &str) -> bool {
        String::from_utf8_lossy(&self.passed.lock().unwrap()).contains(&format!("\"id\":{id},"))
    }
}

/// Quick lines take the plain shape of a quick call only (also a line that comes in two
/// reads, one that ends in `\r\n`, and a string id); an array where JSON-RPC has an object,
/// or more `_meta` than a progress token, goes to rmcp, which refuses the first and answers
/// the second; after a second `initialize`, every call goes to rmcp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_lines_take_only_plain_calls_of_a_session_opened_once() {
    let fixture = fixture(ServerOptions::default()).await;
    let mut raw = RawLane::open(fixture.server.clone()).await;
    let status = |id: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"check_task_status","arguments":{{}}}}}}"#
        )
    };

    let split = status("1");
    let (head, tail) = split.split_at(40);
    raw.send_raw(head).await;
    // The line's first part is read before its rest is sent: it comes in two reads.
    raw.all_read().await;
    raw.send(tail).await;
    raw.send_raw(&format!("{}\r\n", status("\"two\""))).await;
    raw.send(r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"list_tasks","arguments":{},"_meta":{"progressToken":3}}}"#).await;
    // `check_task_status` with no id answers with the caller's latest tasks.
    for id in [json!(1), json!("two")] {
        let answer = raw.answer_to(id).await;
        assert!(
            answer["result"]["structuredContent"]["tasks"].is_array(),
            "{answer}"
        );
    }
    let listed = raw.answer_to(json!(3)).await;
    assert!(
        listed["result"]["structuredContent"]["tasks"].is_array(),
        "{listed}"
    );
    assert!(!raw.passed("1") && !raw.passed("\"two\"") && !raw.passed("3"));

    // Arrays: rmcp refuses them (an error without an id), the lane must not answer them.
    raw.send(r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":["list_tasks"]}"#)
        .await;
    raw.send(r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"list_tasks","_meta":[]}}"#)
        .await;
    raw.send(r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"list_tasks","_meta":{"example.com/trace":"x"}}}"#)
        .await;
    let traced = raw.answer_to(json!(6)).await;
    assert!(
        traced["result"]["structuredContent"]["tasks"].is_array(),
        "{traced}"
    );
    assert!(raw.passed("4") && raw.passed("5") && raw.passed("6"));
    let refused: Vec<&Value> = raw
        .read
        .iter()
        .filter(|m| m["id"].is_null() && m["error"]["code"] == -32600)
        .collect();
    assert_eq!(refused.len(), 2, "{:?}", raw.read);
    assert!(
        !raw.read.iter().any(|m| m["id"] == 4 || m["id"] == 5),
        "{:?}",
        raw.read
    );

    // A second `initialize`: rmcp answers it, and quick calls go to rmcp from then on.
    raw.send(r#"{"jsonrpc":"2.0","id":7,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#).await;
    let again = raw.answer_to(json!(7)).await;
    assert!(again["result"]["protocolVersion"].is_string(), "{again}");
    raw.send(&status("8")).await;
    raw.answer_to(json!(8)).await;
    assert!(
        raw.passed("8"),
        "after a second initialize, quick calls go to rmcp"
    );
}

/// Quick calls taken from their lines just before the input ends are all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_calls_read_just_before_the_end_of_input_are_answered() {
    use tokio::io::AsyncWriteExt as _;
    let fixture = fixture(ServerOptions::default()).await;
    let mut raw = RawLane::open(fixture.server.clone()).await;
    let mut lines = String::new();
    for id in 1..=6 {
        let tool = if id % 2 == 1 {
            "list_tasks"
        } else {
            "check_task_status"
        };
        lines.push_str(&format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"tools/call\",\"params\":{{\"name\":\"{tool}\",\"arguments\":{{}}}}}}\n"
        ));
    }
    raw.send_raw(&lines).await;
    raw.write.shutdown().await.unwrap();
    let mut answered = Vec::new();
    while let Some(message) = raw.next().await {
        if let Some(id) = message["id"].as_i64() {
            assert!(message["result"].is_object(), "{message}");
            answered.push(id);
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 2, 3, 4, 5, 6]);
    for id in 1..=6 {
        assert!(!raw.passed(&id.to_string()), "call {id} went to rmcp");
    }
}
