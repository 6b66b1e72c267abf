//! End to end over stdio: the built `msbd` binary, started by an rmcp client as MCP clients
//! start it, on a fresh data directory, with real sandboxes. Every tool at least once; a task's
//! whole life; the tasks extension across a restart; bad input; SIGTERM with running tasks.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::common::{
    Client, Connection, MSBD, args, call, completed_result, every_tool_and_a_tasks_whole_life, ok,
    wait_task_payload, wait_until_blocking,
};
use rmcp::ServiceExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CancelTaskParams, GetTaskParams, TaskPayload,
};
use rmcp::transport::TokioChildProcess;
use serde_json::{Value, json};

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
    /// stdout's lines, read on a thread of their own (so that waiting for one can time out).
    stdout: mpsc::Receiver<String>,
    /// Answers read while waiting for another one.
    early: Vec<Value>,
    /// stderr, when captured.
    stderr: Option<Stderr>,
}

impl Raw {
    fn start(data_dir: &Path, extra_env: &[(&str, &str)]) -> Raw {
        Raw::start_with(data_dir, extra_env, false)
    }

    /// With `capture_stderr`, stderr is collected (and still shown) rather than inherited.
    fn start_with(data_dir: &Path, extra_env: &[(&str, &str)], capture_stderr: bool) -> Raw {
        let mut command = std::process::Command::new(MSBD);
        command
            .arg("serve")
            .env("MSB_DATA_DIR", data_dir)
            .env("MSB_LOG_LEVEL", "warn")
            .env("MSB_SHUTDOWN_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if capture_stderr {
                Stdio::piped()
            } else {
                Stdio::inherit()
            });
        for (key, value) in extra_env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let stderr = capture_stderr.then(|| Stderr::collect(child.stderr.take().unwrap()));
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (lines, stdout_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut raw = Raw {
            child,
            stdin,
            stdout: stdout_lines,
            early: Vec::new(),
            stderr,
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

    /// The next message, within `within`.
    fn receive_within(&mut self, within: Duration) -> Option<Value> {
        let line = match self.stdout.recv_timeout(within) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => return None,
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("msbd closed its stdout"),
        };
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}")))
    }

    fn receive(&mut self) -> Value {
        self.receive_within(Duration::from_secs(120))
            .expect("no message from msbd within 120 s")
    }

    /// The answer to request `id` within `within` (keeping other answers for later, skipping
    /// notifications).
    fn answer_within(&mut self, id: i64, within: Duration) -> Option<Value> {
        let is_it = |message: &Value| message.get("id").and_then(Value::as_i64) == Some(id);
        if let Some(at) = self.early.iter().position(is_it) {
            return Some(self.early.remove(at));
        }
        let deadline = Instant::now() + within;
        loop {
            let message =
                self.receive_within(deadline.saturating_duration_since(Instant::now()))?;
            if is_it(&message) {
                return Some(message);
            }
            if message.get("id").is_some() {
                self.early.push(message);
            }
        }
    }

    /// The answer to request `id` (skipping notifications).
    fn answer(&mut self, id: i64) -> Value {
        self.answer_within(id, Duration::from_secs(120))
            .unwrap_or_else(|| panic!("no answer to request {id} within 120 s"))
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
    assert!(
        message.contains("over the server's limit of 65536 bytes"),
        "{answer}"
    );
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
    let mut raw = Raw::start_with(
        dir.path(),
        &[("MSB_SHUTDOWN_TIMEOUT", "5"), ("MSB_LOG_LEVEL", "info")],
        true,
    );
    for id in 1..=2 {
        let answer = raw.call(id, "submit_task", json!({"task_type": "command", "params": {"command": "sleep 120", "env": {"MSBD_E2E_SIGTERM": "1"}}}));
        assert!(
            answer["result"]["structuredContent"]["task_id"].is_string(),
            "{answer}"
        );
    }
    wait_until_blocking(Duration::from_secs(30), || match sandboxed_processes() {
        started if started.len() >= 2 => Ok(()),
        started => Err(format!("the tasks never started: {started:?}")),
    });
    let sent = Instant::now();
    signal(&raw.child, nix::sys::signal::Signal::SIGTERM);
    let status = exits_within(&mut raw.child, Duration::from_secs(15));
    eprintln!(
        "msbd exited with {status} {} ms after SIGTERM",
        sent.elapsed().as_millis()
    );
    assert!(
        sent.elapsed() < Duration::from_secs(7),
        "took {:?}",
        sent.elapsed()
    );
    wait_until_blocking(Duration::from_secs(5), || match sandboxed_processes() {
        left if left.is_empty() => Ok(()),
        left => Err(format!("left behind: {left:?}")),
    });
    // One readable line says how the shutdown went.
    let text = raw.stderr.as_ref().unwrap().whole_text();
    let stopped = text
        .lines()
        .find(|line| line.contains("msbd stopped: drained in "))
        .unwrap_or_else(|| panic!("no shutdown summary: {text}"));
    assert!(
        stopped.contains("2 tasks were running, 2 interrupted (queued again for the next start)"),
        "{stopped}"
    );
    assert!(
        !stopped.contains("errors =") && !stopped.contains("status ="),
        "{stopped}"
    );
}

/// `msbd serve` on `data_dir` with its stdin and stdout piped to the test, which speaks raw
/// JSON-RPC lines to it.
fn raw_serve(data_dir: &Path) -> std::process::Child {
    std::process::Command::new(MSBD)
        .arg("serve")
        .env("MSB_DATA_DIR", data_dir)
        .env("MSB_LOG_LEVEL", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// A client that sends its last calls and closes stdin at once still gets their answers,
/// also those that wait for the store (a listing goes to SQLite's reader thread).
#[test]
fn answers_to_the_last_calls_before_stdin_closes_are_written() {
    last_calls_before_stdin_closes_are_answered(false);
}

/// The same, once the session is open, where the quick calls are taken from their lines below
/// rmcp's transport (`mcp_tools::quick_lines`): they are still answered when stdin closes right
/// after them. (That they are taken there, and not passed to rmcp, is checked in mcp-tools:
/// `tools::quick_calls_read_just_before_the_end_of_input_are_answered`.)
#[test]
fn answers_to_the_last_quick_calls_of_an_open_session_are_written() {
    last_calls_before_stdin_closes_are_answered(true);
}

fn last_calls_before_stdin_closes_are_answered(open_first: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = raw_serve(dir.path());
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    // Reads lines until the answer to request `id`.
    let mut answer_to = |id: i64| loop {
        let line = stdout.next().expect("msbd answers").unwrap();
        let message: Value = serde_json::from_str(&line).unwrap();
        if message["id"].as_i64() == Some(id) {
            return message;
        }
    };
    let mut lines = String::new();
    lines.push_str(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#);
    lines.push('\n');
    lines.push_str(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    lines.push('\n');
    if open_first {
        // A ping answered after the notification: the session is open when it is.
        lines.push_str(r#"{"jsonrpc":"2.0","id":100,"method":"ping"}"#);
        lines.push('\n');
        stdin.write_all(lines.as_bytes()).unwrap();
        assert!(answer_to(100)["result"].is_object());
        lines.clear();
    }
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
    let mut answered = Vec::new();
    for line in stdout {
        let message: Value = serde_json::from_str(&line.unwrap()).unwrap();
        if let Some(id) = message["id"].as_i64()
            && (1..=5).contains(&id)
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

/// A child's stderr, collected on a thread (and shown, as inherited stderr would be).
#[derive(Clone)]
struct Stderr {
    text: Arc<Mutex<String>>,
    /// Whether the collector has read to the end (every writer closed it).
    closed: Arc<Mutex<bool>>,
}

impl Stderr {
    fn collect(mut stderr: impl Read + Send + 'static) -> Stderr {
        let collector = Stderr {
            text: Arc::new(Mutex::new(String::new())),
            closed: Arc::new(Mutex::new(false)),
        };
        let collected = collector.clone();
        std::thread::spawn(move || {
            let mut buffer = [0_u8; 4096];
            loop {
                match stderr.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let chunk = String::from_utf8_lossy(&buffer[..n]);
                        eprint!("{chunk}");
                        collected.text.lock().unwrap().push_str(&chunk);
                    }
                }
            }
            *collected.closed.lock().unwrap() = true;
        });
        collector
    }

    fn text(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Waits (at most `within`) until stderr contains `needle`.
    fn wait_for(&self, needle: &str, within: Duration) {
        wait_until_blocking(within, || {
            let text = self.text();
            if text.contains(needle) {
                Ok(())
            } else {
                Err(format!("stderr never said {needle:?}:\n{text}"))
            }
        });
    }

    /// Everything written to stderr, once every writer has closed it (msbd has exited).
    fn whole_text(&self) -> String {
        wait_until_blocking(Duration::from_secs(10), || {
            if *self.closed.lock().unwrap() {
                Ok(())
            } else {
                Err("stderr is still open")
            }
        });
        self.text()
    }
}

/// Waits for `child` to exit within `within` (a bound against hanging, not a benchmark); if it
/// does not, kills it and fails.
fn exits_within(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    /// Kills the child if the wait fails.
    struct KillOnPanic(nix::unistd::Pid);
    impl Drop for KillOnPanic {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    let _guard = KillOnPanic(nix::unistd::Pid::from_raw(child.id() as i32));
    wait_until_blocking(within, || {
        child
            .try_wait()
            .unwrap()
            .ok_or("msbd did not exit (within its shutdown timeout)")
    })
}

fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
}

/// `msbd serve` on a fresh data directory, logging at info level to a captured stderr.
fn serve_command(data_dir: &Path) -> std::process::Command {
    let mut command = std::process::Command::new(MSBD);
    command
        .arg("serve")
        .env("MSB_DATA_DIR", data_dir)
        .env("MSB_LOG_LEVEL", "info")
        .env("MSB_LOG_FORMAT", "text")
        .env("MSB_SHUTDOWN_TIMEOUT", "10")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Issue 15: a SIGTERM (or SIGINT) before any client said `initialize` (nobody connected, or a
/// client that has not spoken yet) ends msbd at once, with status 0 and no error; rmcp's
/// handshake alone would wait for stdin to close.
#[test]
fn a_signal_before_any_client_spoke_exits_at_once_with_status_0() {
    for sent in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = serve_command(dir.path())
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Stderr::collect(child.stderr.take().unwrap());
        stderr.wait_for("msbd is serving", Duration::from_secs(60));
        // Keep stdin open: the client is there, but has not said anything.
        let _stdin = child.stdin.take().unwrap();
        let sent_at = Instant::now();
        signal(&child, sent);
        let status = exits_within(&mut child, Duration::from_secs(15));
        eprintln!("{sent}: exited with {status} in {:?}", sent_at.elapsed());
        assert!(status.success(), "{sent}: {status}");
        let text = stderr.whole_text();
        assert!(!text.contains("ERROR"), "{sent}: {text}");
        // stdin is not a terminal: no word about waiting for a client.
        assert!(!text.contains("waiting for an MCP client"), "{text}");
        assert!(text.contains("msbd stopped: drained in"), "{text}");
    }
}

/// Issue 15: started by hand on a terminal, msbd says what it waits for and how to leave, and
/// Ctrl-C (SIGINT) or Ctrl-D (end of input) ends it at once with status 0.
#[test]
fn on_a_terminal_it_says_it_waits_for_a_client_and_ctrl_c_or_ctrl_d_end_it() {
    for leave_with in ["Ctrl-C", "Ctrl-D"] {
        let dir = tempfile::tempdir().unwrap();
        let pty = nix::pty::openpty(None, None).unwrap();
        let mut child = serve_command(dir.path())
            .stdin(Stdio::from(pty.slave))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut terminal = std::fs::File::from(pty.master);
        let stderr = Stderr::collect(child.stderr.take().unwrap());
        stderr.wait_for("waiting for an MCP client", Duration::from_secs(60));
        let text = stderr.text();
        assert!(
            text.contains("msbd: serving MCP on stdin/stdout") && text.contains("Ctrl-C"),
            "{text}"
        );
        let sent_at = Instant::now();
        match leave_with {
            // The terminal sends SIGINT to the foreground process group; msbd is not in one
            // here (the terminal is not its controlling terminal), so send it as the terminal
            // would.
            "Ctrl-C" => signal(&child, nix::sys::signal::Signal::SIGINT),
            _ => terminal.write_all(b"\x04").unwrap(),
        }
        let status = exits_within(&mut child, Duration::from_secs(15));
        eprintln!(
            "{leave_with}: exited with {status} in {:?}",
            sent_at.elapsed()
        );
        assert!(status.success(), "{leave_with}: {status}");
        let text = stderr.whole_text();
        assert!(!text.contains("ERROR"), "{leave_with}: {text}");
        drop(terminal);
    }
}

/// Issue 15: during the drain that follows a SIGTERM, a tool call is answered at once with
/// the tool error `SHUTTING_DOWN`, a call under way (waiting for its task) still gets its
/// answer, and msbd exits with status 0 once the running task has finished; the last line
/// says how the drain went.
#[test]
fn during_a_drain_new_calls_are_refused_at_once_and_calls_under_way_finish() {
    let dir = tempfile::tempdir().unwrap();
    let mut raw = Raw::start_with(
        dir.path(),
        &[("MSB_SHUTDOWN_TIMEOUT", "60"), ("MSB_LOG_LEVEL", "info")],
        true,
    );
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "execute_command", "arguments": {"command": "sleep 4; echo finished"}}});
    raw.send(&request.to_string());
    let mut id = 100;
    wait_until_blocking(Duration::from_secs(60), || {
        id += 1;
        let running = raw.call(id, "list_tasks", json!({"status": "running"}));
        if running["result"]["structuredContent"]["count"] == 1 {
            Ok(())
        } else {
            Err(format!("the task never ran: {running}"))
        }
    });
    let sent = Instant::now();
    signal(&raw.child, nix::sys::signal::Signal::SIGTERM);
    // Every call is answered within a few seconds; once the drain has begun, with
    // SHUTTING_DOWN.
    let refused = wait_until_blocking(Duration::from_secs(10), || {
        id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "list_tasks", "arguments": {}}});
        raw.send(&request.to_string());
        let answer = raw
            .answer_within(id, Duration::from_secs(5))
            .unwrap_or_else(|| {
                panic!(
                    "a call {:?} after SIGTERM was not answered within 5 s",
                    sent.elapsed()
                )
            });
        if answer["result"]["isError"] == true {
            Ok(answer)
        } else {
            Err(format!(
                "calls were still served normally {:?} after SIGTERM: {answer}",
                sent.elapsed()
            ))
        }
    });
    let text = refused["result"]["content"][0]["text"].as_str().unwrap();
    assert!(text.starts_with("Error SHUTTING_DOWN:"), "{refused}");
    id += 1;
    let answer = raw.call(
        id,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "true"}}),
    );
    assert!(
        answer["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Error SHUTTING_DOWN:"),
        "{answer}"
    );
    // The call under way gets its answer.
    let finished = raw
        .answer_within(1, Duration::from_secs(60))
        .expect("the call under way was not answered during the drain");
    assert_ne!(finished["result"]["isError"], true, "{finished}");
    assert!(finished.to_string().contains("finished"), "{finished}");
    // And msbd exits once the drain is over (the task finished: no need to wait 60 s).
    let status = exits_within(&mut raw.child, Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let text = raw.stderr.as_ref().unwrap().whole_text();
    let stopped = text
        .lines()
        .find(|line| line.contains("msbd stopped: "))
        .unwrap_or_else(|| panic!("no shutdown summary: {text}"));
    assert!(
        stopped.contains("1 task was running, 0 interrupted"),
        "{stopped}"
    );
    assert!(
        !stopped.contains('{') && !stopped.contains('['),
        "{stopped}"
    );
}

/// A failed command's facts and its streams, through the real binary: a tasks client gets the
/// exit code and the end of stderr in the task's result, and after a restart of msbd (read
/// from the store, not memory) get_task_result has them still, and read_task_output reads
/// stderr alone; a command killed by a signal says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_command_keeps_its_exit_code_and_stderr_and_its_streams_read_apart() {
    let dir = tempfile::tempdir().unwrap();
    let client = start(dir.path(), Client { tasks: true }).await;
    let response = client
        .call_tool_once(
            CallToolRequestParams::new("execute_command")
                .with_arguments(args(json!({"command": "echo out; echo err >&2; exit 3"}))),
        )
        .await
        .unwrap();
    let CallToolResponse::Task(created) = response else {
        panic!("expected a task, got {response:?}")
    };
    let id = created.task.task_id.clone();
    let result = completed_result(&client, &id).await;
    assert_eq!(result.is_error, Some(true), "{result:?}");
    let answer = result.structured_content.unwrap();
    assert_eq!(answer["status"], "failed", "{answer}");
    assert_eq!(answer["exit_code"], 3, "{answer}");
    assert_eq!(answer["signal"], Value::Null, "{answer}");
    assert_eq!(answer["stderr_tail"], "err\n", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("exit code 3 after "),
        "{answer}"
    );
    client.cancel().await.unwrap();

    let client = start(dir.path(), Client::default()).await;
    let result = ok(&client, "get_task_result", json!({"task_id": id})).await;
    assert_eq!(result["status"], "failed", "{result}");
    assert_eq!(
        (
            &result["result"]["exit_code"],
            &result["result"]["reason"],
            &result["result"]["stderr_tail"]
        ),
        (&json!(3), &json!("exited"), &json!("err\n")),
        "{result}"
    );
    let status = ok(&client, "check_task_status", json!({"task_id": id})).await;
    assert_eq!(status["failure"]["exit_code"], 3, "{status}");
    let stderr = ok(
        &client,
        "read_task_output",
        json!({"task_id": id, "stream": "stderr"}),
    )
    .await;
    assert_eq!(
        (&stderr["data"], &stderr["stream"], &stderr["complete"]),
        (&json!("err\n"), &json!("stderr"), &json!(true)),
        "{stderr}"
    );
    let stdout = ok(
        &client,
        "read_task_output",
        json!({"task_id": id, "stream": "stdout", "tail": 4}),
    )
    .await;
    assert_eq!(stdout["data"], "out\n", "{stdout}");

    let killed = call(&client, "execute_command", json!({"command": "kill -9 $$"})).await;
    assert_eq!(killed.is_error, Some(true), "{killed:?}");
    let answer = killed.structured_content.unwrap();
    assert_eq!(
        (&answer["signal"], &answer["exit_code"]),
        (&json!(9), &Value::Null),
        "{answer}"
    );
    client.cancel().await.unwrap();
}

/// After an answer, msbd tries stdin for a short while before it waits (a client's next call
/// often follows at once; see `msbd::spin`). That spin must end: a session whose client has
/// gone quiet after a burst of calls uses next to no CPU.
#[test]
fn a_session_whose_client_goes_quiet_after_quick_calls_uses_no_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = raw_serve(dir.path());
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut call = |id: u64, text: String| {
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
        loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "msbd closed stdout"
            );
            let message: Value = serde_json::from_str(&line).unwrap();
            if message["id"] == serde_json::json!(id) {
                return message;
            }
        }
    };
    call(0, r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"0"}}}"#.into());
    for id in 1..=200u64 {
        let initialized = if id == 1 {
            "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n"
        } else {
            ""
        };
        let answer = call(
            id,
            format!(
                r#"{initialized}{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{{"name":"list_tasks","arguments":{{}}}}}}"#
            ),
        );
        assert!(
            answer["result"]["structuredContent"].is_object(),
            "{answer}"
        );
    }
    // CPU time (user + system, in clock ticks) of the whole process.
    let cpu_ticks = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks() - before;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    // A spin that never ended would use the whole 2 s; the daemon's own loops use a few ms.
    assert!(
        used * 1000 / hz < 200,
        "an idle session used {} ms of CPU in 2 s",
        used * 1000 / hz
    );
    drop(stdin);
    assert!(exits_within(&mut child, Duration::from_secs(10)).success());
}
