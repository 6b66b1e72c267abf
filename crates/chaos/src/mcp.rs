//! A lean MCP client over a child's standard input and output: newline-delimited JSON-RPC,
//! several requests in flight at once (a reader thread hands each answer to its caller by id).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// Why a call got no answer.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The connection is gone (msbd was killed or exited).
    Lost,
    /// No answer within the time allowed.
    Timeout(Duration),
    /// A JSON-RPC error.
    Rpc(Value),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Lost => write!(f, "the connection to msbd was lost"),
            CallError::Timeout(after) => write!(f, "no answer within {after:?}"),
            CallError::Rpc(error) => write!(f, "JSON-RPC error {error}"),
        }
    }
}

/// The answer of a tool call.
#[derive(Debug)]
pub(crate) enum ToolAnswer {
    /// A successful call's structured content.
    Ok(Value),
    /// A tool error (`isError: true`): its text.
    Error(String),
}

type Pending = HashMap<u64, mpsc::Sender<Value>>;

/// One MCP connection to one msbd process.
pub(crate) struct Connection {
    stdin: Mutex<Option<ChildStdin>>,
    /// `None` once the connection is closed.
    pending: Arc<Mutex<Option<Pending>>>,
    next_id: AtomicU64,
}

impl Connection {
    /// A connection over a child's pipes; a thread reads its answers until the pipe ends.
    pub(crate) fn new(stdin: ChildStdin, stdout: ChildStdout) -> Arc<Connection> {
        let pending: Arc<Mutex<Option<Pending>>> = Arc::new(Mutex::new(Some(HashMap::new())));
        let reader_pending = Arc::clone(&pending);
        std::thread::Builder::new()
            .name("mcp-reader".into())
            .spawn(move || read_answers(stdout, &reader_pending))
            .expect("starting the MCP reader thread");
        Arc::new(Connection {
            stdin: Mutex::new(Some(stdin)),
            pending,
            next_id: AtomicU64::new(1),
        })
    }

    /// Closes the connection: every call in flight, and every later one, fails as lost.
    pub(crate) fn close(&self) {
        self.pending.lock().expect("pending lock").take();
        self.stdin.lock().expect("stdin lock").take();
    }

    /// Sends a request and waits for its answer's `result`.
    pub(crate) fn request(
        &self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        match self.pending.lock().expect("pending lock").as_mut() {
            Some(pending) => pending.insert(id, tx),
            None => return Err(CallError::Lost),
        };
        let line = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        if self.send(&line).is_err() {
            self.forget(id);
            return Err(CallError::Lost);
        }
        match rx.recv_timeout(timeout) {
            Ok(mut answer) => match answer.get_mut("error") {
                Some(error) => Err(CallError::Rpc(error.take())),
                None => Ok(answer
                    .get_mut("result")
                    .map(Value::take)
                    .unwrap_or(Value::Null)),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.forget(id);
                Err(CallError::Timeout(timeout))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(CallError::Lost),
        }
    }

    /// Sends a notification.
    pub(crate) fn notify(&self, method: &str, params: Value) -> Result<(), CallError> {
        self.send(&json!({"jsonrpc": "2.0", "method": method, "params": params}))
            .map_err(|_| CallError::Lost)
    }

    /// `initialize`, then `notifications/initialized`.
    pub(crate) fn initialize(&self, timeout: Duration) -> Result<Value, CallError> {
        let answer = self.request(
            "initialize",
            json!({
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "msbd-chaos", "version": "0.0.0"},
            }),
            timeout,
        )?;
        self.notify("notifications/initialized", json!({}))?;
        Ok(answer)
    }

    /// Calls a tool.
    pub(crate) fn tool(
        &self,
        name: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<ToolAnswer, CallError> {
        let mut result = self.request(
            "tools/call",
            json!({"name": name, "arguments": arguments}),
            timeout,
        )?;
        if result.get("isError") == Some(&Value::Bool(true)) {
            let text = result["content"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|block| block["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n");
            return Ok(ToolAnswer::Error(text));
        }
        Ok(ToolAnswer::Ok(
            result
                .get_mut("structuredContent")
                .map(Value::take)
                .unwrap_or(Value::Null),
        ))
    }

    fn send(&self, message: &Value) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(message)?;
        line.push(b'\n');
        let mut stdin = self.stdin.lock().expect("stdin lock");
        match stdin.as_mut() {
            Some(stdin) => {
                stdin.write_all(&line)?;
                stdin.flush()
            }
            None => Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }

    fn forget(&self, id: u64) {
        if let Some(pending) = self.pending.lock().expect("pending lock").as_mut() {
            pending.remove(&id);
        }
    }
}

/// Hands each answer to its caller until the pipe ends, then fails every call still waiting.
fn read_answers(stdout: ChildStdout, pending: &Mutex<Option<Pending>>) {
    let mut reader = BufReader::with_capacity(1 << 20, stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if !line.ends_with('\n') {
            // The last line, cut short when msbd was killed while writing it.
            break;
        }
        let Ok(message) = serde_json::from_str::<Value>(&line) else {
            eprintln!(
                "chaos: msbd wrote a line that is not JSON on stdout: {:?}",
                line.chars().take(200).collect::<String>()
            );
            continue;
        };
        // Notifications and requests from the server carry no answer for us.
        if message.get("method").is_some() {
            continue;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let waiter = pending
            .lock()
            .expect("pending lock")
            .as_mut()
            .and_then(|p| p.remove(&id));
        if let Some(waiter) = waiter {
            let _ = waiter.send(message);
        }
    }
    pending.lock().expect("pending lock").take();
}
