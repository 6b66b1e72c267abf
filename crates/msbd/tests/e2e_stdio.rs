//! End to end over stdio: the built `msbd` binary, started by an rmcp client as MCP clients
//! start it, on a fresh data directory, with real sandboxes. Every tool at least once; a task's
//! whole life; the tasks extension across a restart; bad input; SIGTERM with running tasks.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    Client, Connection, args, completed_result, every_tool_and_a_tasks_whole_life,
    wait_task_payload,
};
use rmcp::ServiceExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CancelTaskParams, GetTaskParams, TaskPayload,
};
use rmcp::transport::TokioChildProcess;
use serde_json::{Value, json};

const MSBD: &str = env!("CARGO_BIN_EXE_msbd");

fn command(data_dir: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(MSBD);
    command
        .arg("serve")
        .env("MSB_DATA_DIR", data_dir)
        .env("MSB_LOG_LEVEL", "warn")
        .env("MSB_SHUTDOWN_TIMEOUT", "10")
        .stderr(Stdio::inherit());
    command
}

async fn start(data_dir: &Path, client: Client) -> Connection {
    let transport = TokioChildProcess::new(command(data_dir)).unwrap();
    client.serve(transport).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tool_over_stdio_and_a_tasks_whole_life() {
    let dir = tempfile::tempdir().unwrap();
    let client = start(dir.path(), Client::default()).await;
    let info = client.peer_info().unwrap();
    assert_eq!(
        info.server_info.as_ref().map(|s| s.name.as_str()),
        Some("msbd")
    );

    every_tool_and_a_tasks_whole_life(&client).await;
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_answer_survives_a_restart_of_msbd() {
    let dir = tempfile::tempdir().unwrap();
    let client = start(dir.path(), Client { tasks: true }).await;
    let response = client
        .call_tool_once(
            CallToolRequestParams::new("execute_command")
                .with_arguments(args(json!({"command": "sleep 1; echo survived"}))),
        )
        .await
        .unwrap();
    let CallToolResponse::Task(created) = response else {
        panic!("expected a task, got {response:?}")
    };
    let id = created.task.task_id.clone();
    let got = client
        .peer()
        .get_task(GetTaskParams::new(id.clone()))
        .await
        .unwrap();
    assert!(matches!(got.task.payload, TaskPayload::Working), "{got:?}");
    // msbd stops (its stdin closes) while the task runs: the task is interrupted and queued again.
    client.cancel().await.unwrap();

    let client = start(dir.path(), Client { tasks: true }).await;
    let result = completed_result(&client, &id).await;
    assert!(
        result.content[0]
            .as_text()
            .unwrap()
            .text
            .contains("survived"),
        "{result:?}"
    );

    // tasks/cancel after a restart too.
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
    // Another connection's view of an unknown id: an error, and the server keeps serving.
    assert!(
        client
            .peer()
            .get_task(GetTaskParams::new("not-a-task"))
            .await
            .is_err()
    );
    client.cancel().await.unwrap();
}

/// A raw stdio session: lines in, lines out.
struct Raw {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Raw {
    fn start(data_dir: &Path, extra_env: &[(&str, &str)]) -> Raw {
        let mut command = std::process::Command::new(MSBD);
        command
            .arg("serve")
            .env("MSB_DATA_DIR", data_dir)
            .env("MSB_LOG_LEVEL", "warn")
            .env("MSB_SHUTDOWN_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut raw = Raw {
            child,
            stdin,
            stdout,
        };
        raw.send(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#);
        let answer = raw.receive();
        assert!(answer.get("result").is_some(), "{answer}");
        raw.send(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        raw
    }

    fn send(&mut self, line: &str) {
        self.stdin.write_all(line.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
    }

    fn receive(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
    }

    /// The answer to request `id` (skipping notifications).
    fn answer(&mut self, id: i64) -> Value {
        loop {
            let message = self.receive();
            if message.get("id").and_then(Value::as_i64) == Some(id) {
                return message;
            }
        }
    }

    fn call(&mut self, id: i64, tool: &str, arguments: Value) -> Value {
        let request = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}});
        self.send(&request.to_string());
        self.answer(id)
    }
}

#[test]
fn bad_input_keeps_the_server_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::start(dir.path(), &[("MSB_MAX_REQUEST_BYTES", "65536")]);
    // Malformed JSON: a JSON-RPC parse error (or nothing), and the next request is answered.
    raw.send("{this is not json");
    // An unknown method, an unknown tool, wrong types, a missing argument.
    raw.send(r#"{"jsonrpc":"2.0","id":1,"method":"no/such/method"}"#);
    let answer = raw.answer(1);
    assert!(answer.get("error").is_some(), "{answer}");
    let answer = raw.call(2, "no_such_tool", json!({}));
    assert!(
        answer.get("error").is_some() || answer["result"]["isError"] == true,
        "{answer}"
    );
    let answer = raw.call(3, "check_task_status", json!({"task_id": 5}));
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    let answer = raw.call(4, "cancel_task", json!({}));
    assert_eq!(answer["result"]["isError"], true, "{answer}");
    // An unknown task id; an illegal transition.
    let answer = raw.call(
        5,
        "get_task_result",
        json!({"task_id": "0192f3c4-0000-7000-8000-000000000000"}),
    );
    assert!(
        answer["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("TASK_NOT_FOUND"),
        "{answer}"
    );
    let created = raw.call(
        6,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "true"}}),
    );
    let id = created["result"]["structuredContent"]["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = raw.call(
        7,
        "get_task_result",
        json!({"task_id": id, "wait": true, "timeout": 60}),
    );
    assert_eq!(
        done["result"]["structuredContent"]["status"], "completed",
        "{done}"
    );
    let answer = raw.call(
        8,
        "manage_background_tasks",
        json!({"action": "resume", "task_id": id}),
    );
    assert!(
        answer["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("ILLEGAL_TRANSITION"),
        "{answer}"
    );
    // An oversized request: a clear JSON-RPC error under its id.
    let big = "x".repeat(200_000);
    let answer = raw.call(
        9,
        "execute_command",
        json!({"command": format!("echo {big}")}),
    );
    let message = answer["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("MSB_MAX_REQUEST_BYTES"), "{answer}");
    // Still serving.
    let answer = raw.call(10, "list_tasks", json!({}));
    assert_eq!(
        answer["result"]["structuredContent"]["count"], 1,
        "{answer}"
    );
    drop(raw.stdin);
    let status = raw.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// The processes whose environment carries a sandbox marker of this data directory's instance.
fn sandboxed_processes() -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(environ) = std::fs::read(entry.path().join("environ"))
            && environ
                .split(|b| *b == 0)
                .any(|v| v.starts_with(b"MSBD_E2E_SIGTERM=1"))
        {
            found.push(pid);
        }
    }
    found
}

#[test]
fn sigterm_with_running_tasks_exits_within_the_timeout_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::start(dir.path(), &[("MSB_SHUTDOWN_TIMEOUT", "5")]);
    for id in 1..=2 {
        let answer = raw.call(id, "submit_task", json!({"task_type": "command", "params": {"command": "sleep 120", "env": {"MSBD_E2E_SIGTERM": "1"}}}));
        assert!(
            answer["result"]["structuredContent"]["task_id"].is_string(),
            "{answer}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sandboxed_processes().len() < 2 {
        assert!(Instant::now() < deadline, "the tasks never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = nix::unistd::Pid::from_raw(raw.child.id() as i32);
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(status) = raw.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(15),
            "msbd did not exit within its shutdown timeout"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "msbd exited with {status} {} ms after SIGTERM",
        sent.elapsed().as_millis()
    );
    assert!(
        sent.elapsed() < Duration::from_secs(7),
        "took {:?}",
        sent.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sandboxed_processes().is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            sandboxed_processes()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client that sends its last calls and closes stdin at once still gets their answers,
/// also those that wait for the store (a listing goes to SQLite's reader thread).
#[test]
fn answers_to_the_last_calls_before_stdin_closes_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(MSBD)
        .arg("serve")
        .env("MSB_DATA_DIR", dir.path())
        .env("MSB_LOG_LEVEL", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = String::new();
    lines.push_str(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#);
    lines.push('\n');
    lines.push_str(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    lines.push('\n');
    for id in 1..=5 {
        let tool = if id % 2 == 1 {
            "list_tasks"
        } else {
            "check_task_status"
        };
        lines.push_str(&format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"{tool}","arguments":{{}}}}}}"#
        ));
        lines.push('\n');
    }
    stdin.write_all(lines.as_bytes()).unwrap();
    drop(stdin);
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut answered = Vec::new();
    for line in stdout.lines() {
        let message: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if let Some(id) = message["id"].as_i64()
            && id > 0
        {
            assert!(
                message["result"]["structuredContent"].is_object(),
                "{message}"
            );
            answered.push(id);
        }
    }
    answered.sort_unstable();
    assert_eq!(answered, [1, 2, 3, 4, 5]);
    assert!(child.wait().unwrap().success());
}
