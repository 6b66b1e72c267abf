//! End to end over streamable HTTP: the built `msbd serve --transport http` with a bearer
//! token, driven by rmcp's HTTP client. Every tool at least once (the supervision tools
//! switched on), a task's whole life, the tasks extension across a restart of msbd, the probes,
//! and a token's tasks invisible to another token.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use crate::common::{
    Client, Connection, MSBD, args, completed_result, every_tool_and_a_tasks_whole_life, ok,
    wait_task_payload, wait_until,
};
use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, CallToolResponse, CancelTaskParams, TaskPayload};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::json;

const TOKEN: &str = "e2e-token-0123456789abcdef";

/// A running `msbd serve --transport http`.
pub(crate) struct Daemon {
    child: tokio::process::Child,
    pub(crate) port: u16,
}

impl Daemon {
    pub(crate) async fn start(data_dir: &Path, token: &str) -> Daemon {
        Daemon::start_with(data_dir, token, &[]).await
    }

    /// With more environment variables.
    pub(crate) async fn start_with(
        data_dir: &Path,
        token: &str,
        extra_env: &[(&str, &str)],
    ) -> Daemon {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let child = tokio::process::Command::new(MSBD)
            .args([
                "serve",
                "--transport",
                "http",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("MSB_DATA_DIR", data_dir)
            .env("MSB_AUTH_TOKEN", token)
            .env("MSB_SUPERVISION_TOOLS", "true")
            // MSBD_TEST_LOG=info (say) shows msbd's log when a test fails.
            .env(
                "MSB_LOG_LEVEL",
                std::env::var("MSBD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("MSB_SHUTDOWN_TIMEOUT", "10")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let daemon = Daemon { child, port };
        wait_until(Duration::from_secs(30), async || {
            match reqwest::get(daemon.url("/readyz")).await {
                Ok(response) if response.status() == 200 => Ok(()),
                Ok(response) => Err(format!("msbd never became ready: {}", response.status())),
                Err(error) => Err(format!("msbd never became ready: {error}")),
            }
        })
        .await;
        daemon
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub(crate) async fn connect(&self, token: &str, client: Client) -> Connection {
        let transport = StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(self.url("/mcp"))
                .auth_header(token.to_owned()),
        );
        client.serve(transport).await.unwrap()
    }

    /// SIGTERM, and the exit.
    pub(crate) async fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id().unwrap() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("msbd did not exit after SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_over_http_with_probes_and_ownership() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), TOKEN).await;
    let healthz = reqwest::get(daemon.url("/healthz")).await.unwrap();
    assert_eq!(healthz.status(), 200);
    let anonymous: serde_json::Value = healthz.json().await.unwrap();
    assert_eq!(anonymous.as_object().unwrap().len(), 1, "{anonymous}");
    let healthz: serde_json::Value = reqwest::Client::new()
        .get(daemon.url("/healthz"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Degraded where the host lacks an isolation layer; the body says which and why.
    assert!(
        ["healthy", "degraded"].contains(&healthz["status"].as_str().unwrap()),
        "{healthz}"
    );
    assert!(healthz["not_healthy"].is_object(), "{healthz}");
    if healthz["status"] == "degraded" {
        assert!(
            healthz["not_healthy"]["sandbox"]["detail"].is_array(),
            "{healthz}"
        );
    }
    let unauthorized = reqwest::Client::new()
        .post(daemon.url("/mcp"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let client = daemon.connect(TOKEN, Client::default()).await;

    let id = every_tool_and_a_tasks_whole_life(&client).await;

    // /metrics with the token counts what ran.
    let metrics = reqwest::Client::new()
        .get(daemon.url("/metrics"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("msbd_tasks{") && metrics.contains("msbd_loop_healthy"),
        "{metrics}"
    );
    client.cancel().await.unwrap();
    daemon.stop().await;

    // Another token is another principal: the first one's tasks are not found.
    let daemon = Daemon::start(dir.path(), "another-token-0123456789").await;
    let other = daemon
        .connect("another-token-0123456789", Client::default())
        .await;
    let answer = other
        .call_tool(
            CallToolRequestParams::new("check_task_status")
                .with_arguments(args(json!({"task_id": id}))),
        )
        .await
        .unwrap();
    assert_eq!(answer.is_error, Some(true), "{answer:?}");
    assert_eq!(ok(&other, "list_tasks", json!({})).await["count"], 0);
    other.cancel().await.unwrap();
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_answer_over_http_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), TOKEN).await;
    let client = daemon.connect(TOKEN, Client { tasks: true }).await;
    let response = client
        .call_tool_once(
            CallToolRequestParams::new("execute_command")
                .with_arguments(args(json!({"command": "sleep 1; echo over-http"}))),
        )
        .await
        .unwrap();
    let CallToolResponse::Task(created) = response else {
        panic!("expected a task, got {response:?}")
    };
    let id = created.task.task_id.clone();
    client.cancel().await.unwrap();
    daemon.stop().await;

    let daemon = Daemon::start(dir.path(), TOKEN).await;
    let client = daemon.connect(TOKEN, Client { tasks: true }).await;
    let result = completed_result(&client, &id).await;
    assert!(
        result.content[0]
            .as_text()
            .unwrap()
            .text
            .contains("over-http"),
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
    let payload = wait_task_payload(&client, &created.task.task_id).await;
    assert!(matches!(payload, TaskPayload::Cancelled), "{payload:?}");
    client.cancel().await.unwrap();
    daemon.stop().await;
}

/// Many calls at once on one session, quick ones (answered by msbd's fast lane) among others:
/// every one is answered (a lane that waited for its writes while the session's worker waited
/// for it to read would hang the session here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_calls_at_once_on_one_session_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), TOKEN).await;
    let client = daemon.connect(TOKEN, Client::default()).await;
    let created = client
        .call_tool(
            CallToolRequestParams::new("submit_task").with_arguments(
                json!({"task_type": "command", "params": {"command": "echo many"}})
                    .as_object()
                    .unwrap()
                    .clone(),
            ),
        )
        .await
        .unwrap();
    let id = created.structured_content.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut calls = tokio::task::JoinSet::new();
    for n in 0..96 {
        let peer = client.peer().clone();
        let (tool, arguments) = match n % 4 {
            0 => ("check_task_status", json!({"task_id": id})),
            1 => ("list_tasks", json!({})),
            2 => ("read_task_output", json!({"task_id": id})),
            _ => ("get_task_result", json!({"task_id": id})),
        };
        calls.spawn(async move {
            let params = CallToolRequestParams::new(tool)
                .with_arguments(arguments.as_object().unwrap().clone());
            (tool, peer.call_tool(params).await)
        });
    }
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        let mut answered = 0;
        while let Some(joined) = calls.join_next().await {
            let (tool, result) = joined.unwrap();
            let result = result.unwrap_or_else(|e| panic!("{tool}: {e}"));
            assert_ne!(result.is_error, Some(true), "{tool}: {result:?}");
            answered += 1;
        }
        answered
    })
    .await
    .expect("the calls were not all answered within 60 s");
    assert_eq!(answered, 96);
    client.cancel().await.unwrap();
    daemon.stop().await;
}

/// An MCP `initialize` POST with the token.
async fn post_initialize(daemon: &Daemon) -> reqwest::Response {
    reqwest::Client::new()
        .post(daemon.url("/mcp"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#)
        .send()
        .await
        .unwrap()
}

/// Issue 15: after SIGTERM, while running tasks drain, a call under way (waiting for its task)
/// finishes, `/readyz` says draining, and a new MCP request is refused with 503 and
/// `Retry-After`; msbd exits with status 0 once the drain is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_refuses_new_requests_with_503_and_lets_calls_under_way_finish() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough for the task to finish within the drain (the engine keeps the last 5 s of
    // the timeout to stop what is still running).
    let mut daemon = Daemon::start_with(dir.path(), TOKEN, &[("MSB_SHUTDOWN_TIMEOUT", "60")]).await;
    let client = daemon.connect(TOKEN, Client::default()).await;
    let under_way = {
        let peer = client.peer().clone();
        tokio::spawn(async move {
            peer.call_tool(
                CallToolRequestParams::new("execute_command")
                    .with_arguments(args(json!({"command": "sleep 4; echo finished"}))),
            )
            .await
        })
    };
    wait_until(Duration::from_secs(60), async || {
        let running = ok(&client, "list_tasks", json!({"status": "running"})).await;
        if running["count"] == 1 {
            Ok(())
        } else {
            Err(format!("the task never ran: {running}"))
        }
    })
    .await;
    let pid = nix::unistd::Pid::from_raw(daemon.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let body: serde_json::Value =
        wait_until(Duration::from_secs(10), async || {
            match reqwest::get(daemon.url("/readyz")).await {
                Ok(response) if response.status() == 503 => Ok(response.json().await.unwrap()),
                Ok(response) => Err(format!(
                    "/readyz never said draining: {}",
                    response.status()
                )),
                Err(error) => Err(format!("/readyz never said draining: {error}")),
            }
        })
        .await;
    assert_eq!(body["status"], "draining", "{body}");
    let refused = post_initialize(&daemon).await;
    assert_eq!(refused.status(), 503);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("shutting down"),
        "{body}"
    );

    let finished = tokio::time::timeout(Duration::from_secs(60), under_way)
        .await
        .expect("the call under way was not answered during the drain")
        .unwrap()
        .expect("the call under way failed");
    assert_ne!(finished.is_error, Some(true), "{finished:?}");
    assert!(format!("{finished:?}").contains("finished"), "{finished:?}");

    let status = tokio::time::timeout(Duration::from_secs(30), daemon.child.wait())
        .await
        .expect("msbd did not exit after the drain")
        .unwrap();
    assert!(status.success(), "{status}");
    drop(client);
}

/// Issue 15: `DELETE /mcp` that ends a session answers 204 (rmcp says 202, which the Python
/// MCP SDK reports as "Session termination failed: 202").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_session_with_delete_answers_204() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), TOKEN).await;
    let initialized = post_initialize(&daemon).await;
    assert_eq!(initialized.status(), 200);
    let session = initialized.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    drop(initialized.text().await.unwrap());
    let http = reqwest::Client::new();
    let notified = http
        .post(daemon.url("/mcp"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-06-18")
        .body(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
        .send()
        .await
        .unwrap();
    assert!(notified.status().is_success(), "{}", notified.status());
    let deleted = http
        .delete(daemon.url("/mcp"))
        .bearer_auth(TOKEN)
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-06-18")
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    // The session is gone.
    let after = http
        .post(daemon.url("/mcp"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-06-18")
        .body(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 404);
    daemon.stop().await;
}
