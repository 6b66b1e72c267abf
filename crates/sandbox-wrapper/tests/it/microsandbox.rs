//! The `microsandbox` backend against a stand-in server.
//!
//! The real microsandbox server cannot run here (it needs KVM and downloads images), so these
//! tests talk to `StandIn`: a small JSON-RPC HTTP/1.1 server on 127.0.0.1 written below. It is
//! NOT the real server: it follows the protocol as the backend's module documentation describes
//! it (read from `microsandbox/microsandbox`: `microsandbox-server/lib/{route,handler,payload,
//! middleware,error}.rs` and `microsandbox-portal/lib/{handler,payload}.rs`), answers with the
//! same shapes (JSON-RPC results and error objects, the server's `{"error", "code"}` bodies with
//! HTTP error statuses, 401 for a bad key), keeps its sandboxes in memory (some of them not
//! created by us, like `other-team-sandbox`), fakes a few programs, and records every call.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sandbox_wrapper::backend::microsandbox::{
    MicrosandboxBackend, MicrosandboxConfig, SettingNames,
};
use sandbox_wrapper::backend::{
    BackendError, EndReason, ExecControl, ExecRequest, ExitStatus, Flavor, Language, ReplRequest,
    SandboxBackend, SandboxInfo, SandboxSpec, VolumeMapping,
};
use sandbox_wrapper::output::{DEFAULT_OUTPUT_CAP, OutputSink, Stream, stream_path};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const KEY: &str = "msb_test-key";
const NAMESPACE: &str = "msbd-test";
const MARKER: &str = "inst1";

// ---------------------------------------------------------------------------------------------
// The stand-in server
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct State {
    /// The key it accepts; none = dev mode (no check).
    api_key: Option<String>,
    /// Namespaces that exist (the real server: a directory per namespace, made by the first start).
    namespaces: HashSet<String>,
    /// (namespace, name) → sandbox. Stopped sandboxes stay, with `running: false`.
    sandboxes: HashMap<(String, String), Sandbox>,
    /// Every request body received, in order.
    calls: Vec<Value>,
    /// Every `Authorization` header received.
    auth: Vec<Option<String>>,
    /// How long a stop takes.
    stop_delay: Duration,
    stops_in_flight: usize,
    max_stops_in_flight: usize,
}

#[derive(Default)]
struct Sandbox {
    running: bool,
    /// The fake REPL's variables.
    vars: HashMap<String, String>,
}

#[derive(Clone)]
struct StandIn {
    url: String,
    state: Arc<Mutex<State>>,
}

impl StandIn {
    async fn start(api_key: Option<&str>) -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            api_key: api_key.map(str::to_owned),
            ..State::default()
        }));
        let server = StandIn { url, state };
        let accepting = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let server = accepting.clone();
                tokio::spawn(async move { server.serve(stream).await });
            }
        });
        server
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Puts a sandbox on the server as if someone had started it.
    fn seed(&self, namespace: &str, name: &str, running: bool) {
        let mut state = self.state();
        state.namespaces.insert(namespace.to_owned());
        state.sandboxes.insert(
            (namespace.to_owned(), name.to_owned()),
            Sandbox {
                running,
                ..Sandbox::default()
            },
        );
    }

    fn running(&self, namespace: &str, name: &str) -> bool {
        self.state()
            .sandboxes
            .get(&(namespace.to_owned(), name.to_owned()))
            .is_some_and(|sandbox| sandbox.running)
    }

    fn calls(&self) -> Vec<Value> {
        self.state().calls.clone()
    }

    fn calls_of(&self, method: &str) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|call| call["method"] == method)
            .collect()
    }

    /// One connection: HTTP/1.1 requests, kept alive until the client closes it.
    async fn serve(self, stream: TcpStream) {
        let mut stream = BufReader::new(stream);
        loop {
            let mut request_line = String::new();
            match stream.read_line(&mut request_line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let mut parts = request_line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or("").to_owned(),
                parts.next().unwrap_or("").to_owned(),
            );
            let mut length = 0;
            let mut authorization = None;
            loop {
                let mut line = String::new();
                if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                let Some((name, value)) = line.split_once(':') else {
                    continue;
                };
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.trim().parse().unwrap_or(0),
                    "authorization" => authorization = Some(value.trim().to_owned()),
                    _ => {}
                }
            }
            let mut body = vec![0; length];
            if stream.read_exact(&mut body).await.is_err() {
                return;
            }
            let (status, answer) = if method == "POST" && path == "/api/v1/rpc" {
                self.handle(authorization, &body).await
            } else {
                (404, json!({"error": "Resource not found", "code": 4001}))
            };
            let text = answer.to_string();
            let head = format!(
                "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                reason(status),
                text.len()
            );
            let out = stream.get_mut();
            if out.write_all(head.as_bytes()).await.is_err()
                || out.write_all(text.as_bytes()).await.is_err()
            {
                return;
            }
        }
    }

    async fn handle(&self, authorization: Option<String>, body: &[u8]) -> (u16, Value) {
        {
            let mut state = self.state();
            state.auth.push(authorization.clone());
            if let Some(key) = &state.api_key {
                match authorization
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Bearer "))
                {
                    Some(given) if given == key => {}
                    Some(_) => {
                        return (
                            401,
                            json!({"error": "Invalid or expired token", "code": 1004}),
                        );
                    }
                    None => return (401, json!({"error": "Invalid credentials", "code": 1001})),
                }
            }
        }
        let Ok(request) = serde_json::from_slice::<Value>(body) else {
            return (400, json!({"error": "Invalid JSON", "code": 2001}));
        };
        self.state().calls.push(request.clone());
        let id = request["id"].clone();
        if request["jsonrpc"] != "2.0" {
            return (
                400,
                rpc_error(id, -32600, "Invalid or missing jsonrpc version field"),
            );
        }
        let params = &request["params"];
        let method = request["method"].as_str().unwrap_or("");
        let answer = match method {
            "sandbox.start" => self.start_sandbox(params),
            "sandbox.stop" => self.stop_sandbox(params).await,
            "sandbox.metrics.get" => self.metrics(params),
            "sandbox.command.run" => self.command(params).await,
            "sandbox.repl.run" => self.repl(params),
            other => {
                return (
                    404,
                    rpc_error(id, -32601, &format!("Method not found: {other}")),
                );
            }
        };
        match answer {
            Ok(result) => (200, json!({"jsonrpc": "2.0", "result": result, "id": id})),
            Err(Failure::Rpc(code, message)) => (200, rpc_error(id, code, &message)),
            Err(Failure::Rest(status, code, message)) => {
                (status, json!({"error": message, "code": code}))
            }
        }
    }

    fn start_sandbox(&self, params: &Value) -> Result<Value, Failure> {
        let (namespace, name) = target(params)?;
        check_name(&name)?;
        check_name(&namespace)?;
        let config = &params["config"];
        if let Some(image) = config["image"].as_str()
            && image.starts_with("missing/")
        {
            return Err(Failure::Rpc(
                -32603,
                format!("Sandbox start failed: image not found: {image}"),
            ));
        }
        if config["image"].as_str().is_none() {
            return Err(invalid(
                "No configuration provided and no existing configuration file",
            ));
        }
        let mut state = self.state();
        state.namespaces.insert(namespace.clone());
        state.sandboxes.insert(
            (namespace, name.clone()),
            Sandbox {
                running: true,
                ..Sandbox::default()
            },
        );
        Ok(json!(format!("Sandbox {name} started successfully")))
    }

    async fn stop_sandbox(&self, params: &Value) -> Result<Value, Failure> {
        let (namespace, name) = target(params)?;
        let delay = {
            let mut state = self.state();
            if !state.namespaces.contains(&namespace) {
                return Err(invalid(&format!(
                    "Namespace directory '{namespace}' does not exist"
                )));
            }
            if !state
                .sandboxes
                .contains_key(&(namespace.clone(), name.clone()))
            {
                return Err(internal());
            }
            state.stops_in_flight += 1;
            state.max_stops_in_flight = state.max_stops_in_flight.max(state.stops_in_flight);
            state.stop_delay
        };
        tokio::time::sleep(delay).await;
        let mut state = self.state();
        state.stops_in_flight -= 1;
        if let Some(sandbox) = state.sandboxes.get_mut(&(namespace, name.clone())) {
            sandbox.running = false;
            sandbox.vars.clear();
        }
        Ok(json!(format!("Sandbox {name} stopped successfully")))
    }

    fn metrics(&self, params: &Value) -> Result<Value, Failure> {
        let namespace = params["namespace"]
            .as_str()
            .ok_or_else(|| invalid("missing namespace"))?;
        let only = params["sandbox"].as_str();
        let state = self.state();
        if namespace != "*" && !state.namespaces.contains(namespace) {
            return Err(invalid(&format!(
                "Namespace directory '{namespace}' does not exist"
            )));
        }
        let mut sandboxes: Vec<Value> = state
            .sandboxes
            .iter()
            .filter(|((ns, name), _)| {
                (namespace == "*" || ns == namespace) && only.is_none_or(|only| only == name)
            })
            .map(|((ns, name), sandbox)| {
                json!({
                    "namespace": ns,
                    "name": name,
                    "running": sandbox.running,
                    "cpu_usage": if sandbox.running { json!(12.5) } else { Value::Null },
                    "memory_usage": if sandbox.running { json!(256) } else { Value::Null },
                    "disk_usage": 4096,
                })
            })
            .collect();
        sandboxes.sort_by_key(|entry| entry["name"].as_str().unwrap_or("").to_owned());
        Ok(json!({ "sandboxes": sandboxes }))
    }

    /// Checks that the sandbox of a portal call runs (the real server: no portal → HTTP 500).
    fn running_target(&self, params: &Value) -> Result<(String, String), Failure> {
        let (namespace, name) = target(params)?;
        if !self.running(&namespace, &name) {
            return Err(internal());
        }
        Ok((namespace, name))
    }

    async fn command(&self, params: &Value) -> Result<Value, Failure> {
        self.running_target(params)?;
        let command = params["command"].as_str().unwrap_or("").to_owned();
        let args: Vec<String> = params["args"]
            .as_array()
            .map(|args| {
                args.iter()
                    .map(|a| a.as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let timeout = params["timeout"].as_u64().map(Duration::from_secs);
        let run = fake_program(command.clone(), args.clone(), HashMap::new());
        let (exit_code, lines) = match timeout {
            Some(timeout) => match tokio::time::timeout(timeout, run).await {
                Ok(result) => result?,
                // The portal kills the command and the server hides why: HTTP 500.
                Err(_) => return Err(internal()),
            },
            None => run.await?,
        };
        let output: Vec<Value> = lines
            .into_iter()
            .map(|(stream, text)| json!({"stream": stream, "text": text}))
            .collect();
        Ok(json!({
            "command": command,
            "args": args,
            "exit_code": exit_code,
            "success": exit_code == 0,
            "output": output,
        }))
    }

    /// A REPL of sorts: `name = value`, `print(name)`, `print("text")`, `raise Kind("message")`.
    fn repl(&self, params: &Value) -> Result<Value, Failure> {
        let (namespace, name) = self.running_target(params)?;
        let language = params["language"].as_str().unwrap_or("");
        if !matches!(language, "python" | "node" | "nodejs" | "javascript") {
            return Err(Failure::Rpc(
                -32600,
                format!("Unsupported language: {language}"),
            ));
        }
        let code = params["code"].as_str().unwrap_or("");
        let mut state = self.state();
        let sandbox = state.sandboxes.get_mut(&(namespace, name)).unwrap();
        let mut output = Vec::new();
        for line in code.lines().map(str::trim) {
            if let Some(inner) = line
                .strip_prefix("print(")
                .and_then(|l| l.strip_suffix(')'))
            {
                let text = match inner.strip_prefix('"').and_then(|i| i.strip_suffix('"')) {
                    Some(literal) => literal.to_owned(),
                    None => match sandbox.vars.get(inner) {
                        Some(value) => value.clone(),
                        None => {
                            output.push(json!({"stream": "stderr", "text": "Traceback (most recent call last):"}));
                            output.push(json!({"stream": "stderr", "text": format!("NameError: name '{inner}' is not defined")}));
                            break;
                        }
                    },
                };
                output.push(json!({"stream": "stdout", "text": text}));
            } else if let Some(raised) = line.strip_prefix("raise ") {
                output.push(
                    json!({"stream": "stderr", "text": "Traceback (most recent call last):"}),
                );
                output.push(json!({"stream": "stderr", "text": raised}));
                break;
            } else if let Some((var, value)) = line.split_once('=') {
                sandbox
                    .vars
                    .insert(var.trim().to_owned(), value.trim().to_owned());
            }
        }
        Ok(json!({"status": "success", "language": language, "output": output}))
    }
}

enum Failure {
    /// A JSON-RPC error object (HTTP 200), as the API reference documents.
    Rpc(i64, String),
    /// The server's own error shape: an HTTP error status and `{"error", "code"}`.
    Rest(u16, u32, String),
}

fn invalid(message: &str) -> Failure {
    Failure::Rest(400, 2001, message.to_owned())
}

fn internal() -> Failure {
    Failure::Rest(500, 5002, "Internal server error".to_owned())
}

fn target(params: &Value) -> Result<(String, String), Failure> {
    let namespace = params["namespace"]
        .as_str()
        .ok_or_else(|| invalid("Missing required 'namespace' parameter"))?;
    let name = params["sandbox"]
        .as_str()
        .ok_or_else(|| invalid("Missing required 'sandbox' parameter"))?;
    Ok((namespace.to_owned(), name.to_owned()))
}

fn check_name(name: &str) -> Result<(), Failure> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            "Sandbox name can only contain alphanumeric characters, hyphens, or underscores",
        ))
    }
}

fn rpc_error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": id})
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Internal Server Error",
    }
}

type Lines = Vec<(&'static str, String)>;

/// A fake program's run: its exit code and output lines.
type Program = std::pin::Pin<Box<dyn Future<Output = Result<(i32, Lines), Failure>> + Send>>;

/// The programs the stand-in's sandboxes have: `echo`, `printenv`, `env`, `sleep` and a tiny
/// `sh -c` (`echo ...`, `echo ... >&2`, `exit N`, separated by `;`). Anything else cannot be
/// spawned, which the portal reports as a JSON-RPC error.
fn fake_program(command: String, args: Vec<String>, env: HashMap<String, String>) -> Program {
    Box::pin(async move {
        match command.as_str() {
            "echo" => Ok((0, vec![("stdout", args.join(" "))])),
            "printenv" => {
                let name = args.first().cloned().unwrap_or_default();
                match env.get(&name) {
                    Some(value) => Ok((0, vec![("stdout", value.clone())])),
                    None => Ok((1, Vec::new())),
                }
            }
            "env" => {
                let mut env = env;
                let mut rest = args.into_iter().peekable();
                while let Some((name, value)) = rest.peek().and_then(|a| a.split_once('=')) {
                    env.insert(name.to_owned(), value.to_owned());
                    rest.next();
                }
                let program = rest.next().unwrap_or_default();
                fake_program(program, rest.collect(), env).await
            }
            "sleep" => {
                let seconds: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(0.0);
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
                Ok((0, Vec::new()))
            }
            "sh" if args.first().map(String::as_str) == Some("-c") => {
                let script = args.get(1).cloned().unwrap_or_default();
                let mut lines = Vec::new();
                for step in script.split(';').map(str::trim) {
                    if let Some(code) = step.strip_prefix("exit ") {
                        return Ok((code.trim().parse().unwrap_or(1), lines));
                    } else if let Some(text) = step.strip_prefix("echo ") {
                        match text.strip_suffix(">&2") {
                            Some(text) => lines.push(("stderr", text.trim().to_owned())),
                            None => lines.push(("stdout", text.to_owned())),
                        }
                    }
                }
                Ok((0, lines))
            }
            other => Err(Failure::Rpc(
                -32603,
                format!(
                    "Command execution failed: Failed to spawn command: No such file or \
                     directory (os error 2) [{other}]"
                ),
            )),
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn config(url: &str, key: Option<&str>) -> MicrosandboxConfig {
    MicrosandboxConfig {
        server_url: url.to_owned(),
        api_key: key.map(str::to_owned),
        namespace: NAMESPACE.to_owned(),
        instance_marker: MARKER.to_owned(),
        request_timeout: Duration::from_secs(10),
        // Not msbd's names: the messages must take them from the configuration.
        setting_names: SettingNames {
            server_url: "THE_URL_SETTING".to_owned(),
            api_key: "THE_KEY_SETTING".to_owned(),
        },
    }
}

fn backend(server: &StandIn) -> MicrosandboxBackend {
    MicrosandboxBackend::new(config(&server.url, Some(KEY))).unwrap()
}

fn spec(session: &str) -> SandboxSpec {
    SandboxSpec {
        session_id: session.to_owned(),
        flavor: Flavor::Small,
        template: "python".to_owned(),
        volumes: Vec::new(),
        network: Default::default(),
    }
}

fn sink() -> (tempfile::TempDir, OutputSink) {
    let dir = tempfile::tempdir().unwrap();
    let sink = OutputSink::create(dir.path().join("out.log"), DEFAULT_OUTPUT_CAP).unwrap();
    (dir, sink)
}

fn read(sink: &OutputSink) -> String {
    sink.flush();
    std::fs::read_to_string(sink.path()).unwrap()
}

fn read_stream(sink: &OutputSink, stream: Stream) -> String {
    sink.flush();
    std::fs::read_to_string(stream_path(sink.path(), stream)).unwrap()
}

fn control() -> ExecControl {
    ExecControl::new(CancellationToken::new())
}

fn command(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        ..ExecRequest::default()
    }
}

/// A call's params, after checking the JSON-RPC envelope.
fn params_of(call: &Value, method: &str) -> Value {
    assert_eq!(call["jsonrpc"], "2.0", "{call}");
    assert_eq!(call["method"], method, "{call}");
    assert!(
        call["id"].is_number() || call["id"].is_string(),
        "no id: {call}"
    );
    assert_eq!(
        call.as_object().unwrap().len(),
        4,
        "unexpected fields: {call}"
    );
    call["params"].clone()
}

fn unavailable(error: BackendError) -> String {
    match error {
        BackendError::Unavailable(message) => message,
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

fn invalid_request(error: BackendError) -> String {
    match error {
        BackendError::InvalidRequest(message) => message,
        other => panic!("expected InvalidRequest, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn create_exec_repl_metrics_stop_round_trip() {
    let server = StandIn::start(Some(KEY)).await;
    let backend = backend(&server);
    assert_eq!(backend.name(), "microsandbox");
    assert_eq!(backend.isolation(), "microvm (microsandbox)");

    let mut spec = spec("s1");
    spec.flavor = Flavor::Medium;
    spec.volumes = vec![VolumeMapping::parse("/srv/shared:/shared").unwrap()];
    let info = backend.create(&spec).await.unwrap();
    assert_eq!(
        info,
        SandboxInfo {
            name: "inst1-s1".to_owned(),
            session_id: "s1".to_owned(),
            flavor: Flavor::Medium,
            work_dir: None,
        }
    );
    let calls = server.calls();
    assert_eq!(
        params_of(&calls[0], "sandbox.start"),
        json!({
            "sandbox": "inst1-s1",
            "namespace": NAMESPACE,
            "config": {
                "image": "microsandbox/python",
                "memory": 2048,
                "cpus": 2,
                "volumes": ["/srv/shared:/shared"],
            },
        })
    );

    let (_dir, out) = sink();
    let outcome = backend
        .exec(&info, command(&["echo", "hello", "world"]), &out, control())
        .await
        .unwrap();
    assert_eq!(outcome.exit, Some(ExitStatus::Code(0)));
    assert_eq!(outcome.reason, EndReason::Exited);
    assert!(outcome.success());
    assert_eq!(outcome.isolation, "microvm (microsandbox)");
    assert_eq!(read(&out), "hello world\n");
    assert_eq!(
        params_of(&server.calls()[1], "sandbox.command.run"),
        json!({
            "sandbox": "inst1-s1",
            "namespace": NAMESPACE,
            "command": "echo",
            "args": ["hello", "world"],
        })
    );

    // The REPL keeps its state between calls.
    let (_dir2, repl_out) = sink();
    let first = ReplRequest {
        language: Language::Python,
        code: "x = 42".to_owned(),
        timeout: Some(Duration::from_millis(1500)),
    };
    let outcome = backend
        .repl(&info, first, &repl_out, control())
        .await
        .unwrap();
    assert!(outcome.success());
    let second = ReplRequest {
        language: Language::Node,
        code: "print(x)".to_owned(),
        timeout: None,
    };
    let outcome = backend
        .repl(&info, second, &repl_out, control())
        .await
        .unwrap();
    assert!(outcome.success(), "{outcome:?}");
    assert_eq!(read(&repl_out), "42\n");
    let repl_calls = server.calls_of("sandbox.repl.run");
    assert_eq!(
        params_of(&repl_calls[0], "sandbox.repl.run"),
        json!({
            "sandbox": "inst1-s1",
            "namespace": NAMESPACE,
            "language": "python",
            "code": "x = 42",
            "timeout": 2,
        })
    );
    assert_eq!(
        params_of(&repl_calls[1], "sandbox.repl.run"),
        json!({
            "sandbox": "inst1-s1",
            "namespace": NAMESPACE,
            "language": "nodejs",
            "code": "print(x)",
        })
    );

    let metrics = backend.metrics(&info).await.unwrap();
    assert_eq!(metrics.memory_bytes, Some(256 * 1024 * 1024));
    assert_eq!(metrics.cpu_usage_us, None);
    assert_eq!(
        params_of(
            server.calls_of("sandbox.metrics.get").last().unwrap(),
            "sandbox.metrics.get"
        ),
        json!({"namespace": NAMESPACE, "sandbox": "inst1-s1"})
    );

    backend.stop(&info).await.unwrap();
    assert_eq!(
        params_of(server.calls().last().unwrap(), "sandbox.stop"),
        json!({"sandbox": "inst1-s1", "namespace": NAMESPACE})
    );
    assert!(!server.running(NAMESPACE, "inst1-s1"));
    assert!(matches!(
        backend.metrics(&info).await,
        Err(BackendError::NoSuchSandbox(name)) if name == "inst1-s1"
    ));

    // Every request carried the key.
    let state = server.state();
    assert!(!state.auth.is_empty());
    assert!(
        state
            .auth
            .iter()
            .all(|auth| auth.as_deref() == Some("Bearer msb_test-key"))
    );
}

#[tokio::test]
async fn a_non_zero_exit_is_reported_with_its_output() {
    let server = StandIn::start(Some(KEY)).await;
    let backend = backend(&server);
    let info = backend.create(&spec("s1")).await.unwrap();
    let (_dir, out) = sink();
    let outcome = backend
        .exec(
            &info,
            command(&["sh", "-c", "echo out; echo oops >&2; exit 3"]),
            &out,
            control(),
        )
        .await
        .unwrap();
    assert_eq!(outcome.exit, Some(ExitStatus::Code(3)));
    assert_eq!(outcome.reason, EndReason::Exited);
    assert!(!outcome.success());
    assert_eq!(read(&out), "out\noops\n");
    assert_eq!(out.tail(), "out\noops\n");
    // Each line is kept in the file of the stream the server says it came from.
    assert_eq!(read_stream(&out, Stream::Stdout), "out\n");
    assert_eq!(read_stream(&out, Stream::Stderr), "oops\n");
    assert_eq!(out.stream_tail(Stream::Stderr), "oops\n");

    // A REPL run that raises reports code 1, its traceback in the output.
    let (_dir2, repl_out) = sink();
    let request = ReplRequest {
        language: Language::Python,
        code: "raise ValueError(\"bad\")".to_owned(),
        timeout: None,
    };
    let outcome = backend
        .repl(&info, request, &repl_out, control())
        .await
        .unwrap();
    assert_eq!(outcome.exit, Some(ExitStatus::Code(1)));
    assert_eq!(
        read(&repl_out),
        "Traceback (most recent call last):\nValueError(\"bad\")\n"
    );
    assert_eq!(read_stream(&repl_out, Stream::Stdout), "");
    assert_eq!(
        read_stream(&repl_out, Stream::Stderr),
        "Traceback (most recent call last):\nValueError(\"bad\")\n"
    );
}

#[tokio::test]
async fn server_errors_are_surfaced_with_their_message() {
    let server = StandIn::start(Some(KEY)).await;
    let backend = backend(&server);
    let info = backend.create(&spec("s1")).await.unwrap();
    let (_dir, out) = sink();

    // A JSON-RPC error object.
    let error = backend
        .exec(&info, command(&["no-such-program"]), &out, control())
        .await
        .unwrap_err();
    let message = unavailable(error);
    assert!(
        message.contains("sandbox.command.run")
            && message.contains("Failed to spawn command: No such file or directory")
            && message.contains("JSON-RPC error -32603")
            && message.contains(&server.url),
        "{message}"
    );

    // The server's own error shape: an HTTP status and {"error", "code"}.
    backend.stop(&info).await.unwrap();
    let message = unavailable(
        backend
            .exec(&info, command(&["echo", "hi"]), &out, control())
            .await
            .unwrap_err(),
    );
    assert!(
        message.contains("HTTP 500") && message.contains("Internal server error"),
        "{message}"
    );
    assert!(read(&out).is_empty());

    // A JSON-RPC error from sandbox.start.
    let mut missing = spec("s2");
    missing.template = "missing/image".to_owned();
    let message = unavailable(backend.create(&missing).await.unwrap_err());
    assert!(
        message.contains("sandbox.start")
            && message.contains("image not found: missing/image")
            && message.contains("JSON-RPC error -32603"),
        "{message}"
    );
}

#[tokio::test]
async fn a_wrong_or_missing_api_key_says_to_check_msb_api_key() {
    let server = StandIn::start(Some(KEY)).await;
    let wrong = MicrosandboxBackend::new(config(&server.url, Some("msb_wrong"))).unwrap();
    let message = unavailable(wrong.list().await.unwrap_err());
    assert!(
        message.contains("THE_KEY_SETTING") && message.contains("Invalid or expired token"),
        "{message}"
    );
    let message = unavailable(wrong.create(&spec("s1")).await.unwrap_err());
    assert!(message.contains("THE_KEY_SETTING"), "{message}");
    assert!(server.calls().is_empty(), "nothing passed authentication");

    let none = MicrosandboxBackend::new(config(&server.url, None)).unwrap();
    let message = unavailable(none.list().await.unwrap_err());
    assert!(
        message.contains("requires an API key") && message.contains("THE_KEY_SETTING"),
        "{message}"
    );
    assert_eq!(server.state().auth.last().unwrap(), &None);
}

#[tokio::test]
async fn list_sees_only_this_instances_running_sandboxes() {
    let server = StandIn::start(Some(KEY)).await;
    let backend = backend(&server);
    // Before anything was started in the namespace, the server says it does not exist.
    assert!(backend.list().await.unwrap().is_empty());

    server.seed(NAMESPACE, "other-team-sandbox", true);
    server.seed(NAMESPACE, "inst2-s1", true); // another msbd instance
    server.seed(NAMESPACE, "inst12-s1", true); // a marker that merely starts like ours
    server.seed(NAMESPACE, "inst1", true); // no session part
    server.seed(NAMESPACE, "inst1-old", false); // ours, stopped
    server.seed(NAMESPACE, "inst1-leftover", true); // ours, from an earlier run
    server.seed("default", "inst1-elsewhere", true); // another namespace

    let mut spec = spec("s1");
    spec.flavor = Flavor::Large;
    backend.create(&spec).await.unwrap();

    let mut listed = backend.list().await.unwrap();
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        listed,
        vec![
            SandboxInfo {
                name: "inst1-leftover".to_owned(),
                session_id: "leftover".to_owned(),
                flavor: Flavor::Small,
                work_dir: None,
            },
            SandboxInfo {
                name: "inst1-s1".to_owned(),
                session_id: "s1".to_owned(),
                flavor: Flavor::Large,
                work_dir: None,
            },
        ]
    );
    for call in server.calls_of("sandbox.metrics.get") {
        assert_eq!(
            params_of(&call, "sandbox.metrics.get"),
            json!({"namespace": NAMESPACE}),
            "list never asks for the wildcard namespace"
        );
    }

    // Targeting a sandbox that is not ours is refused before anything is sent.
    let before = server.calls().len();
    let foreign = SandboxInfo {
        name: "other-team-sandbox".to_owned(),
        session_id: "x".to_owned(),
        flavor: Flavor::Small,
        work_dir: None,
    };
    let message = invalid_request(backend.stop(&foreign).await.unwrap_err());
    assert!(
        message.contains("not one of this msbd instance's"),
        "{message}"
    );
    let (_dir, out) = sink();
    invalid_request(
        backend
            .exec(&foreign, command(&["echo"]), &out, control())
            .await
            .unwrap_err(),
    );
    invalid_request(backend.metrics(&foreign).await.unwrap_err());
    assert_eq!(server.calls().len(), before);
    assert!(server.running(NAMESPACE, "other-team-sandbox"));
}

#[tokio::test]
async fn sweep_stops_only_our_orphans_five_at_a_time() {
    let server = StandIn::start(Some(KEY)).await;
    server.state().stop_delay = Duration::from_millis(200);
    let backend = backend(&server);
    let live = backend.create(&spec("live")).await.unwrap();
    for i in 0..12 {
        server.seed(NAMESPACE, &format!("inst1-orphan{i}"), true);
    }
    server.seed(NAMESPACE, "other-team-sandbox", true);
    server.seed(NAMESPACE, "inst2-orphan", true);
    server.seed(NAMESPACE, "inst12-orphan", true);
    server.seed("default", "inst1-orphan-elsewhere", true);
    server.seed(NAMESPACE, "inst1-stopped", false);

    let sessions: HashSet<String> = ["live".to_owned()].into();
    let report = backend.sweep_orphans(&sessions).await.unwrap();
    assert_eq!(report.sandboxes, 12);
    assert_eq!(report.total(), 12);

    let mut stopped: Vec<String> = server
        .calls_of("sandbox.stop")
        .iter()
        .map(|call| {
            let params = params_of(call, "sandbox.stop");
            assert_eq!(params["namespace"], NAMESPACE);
            params["sandbox"].as_str().unwrap().to_owned()
        })
        .collect();
    stopped.sort();
    let mut expected: Vec<String> = (0..12).map(|i| format!("inst1-orphan{i}")).collect();
    expected.sort();
    assert_eq!(stopped, expected);
    for (namespace, name) in [
        (NAMESPACE, "other-team-sandbox"),
        (NAMESPACE, "inst2-orphan"),
        (NAMESPACE, "inst12-orphan"),
        ("default", "inst1-orphan-elsewhere"),
        (NAMESPACE, live.name.as_str()),
    ] {
        assert!(
            server.running(namespace, name),
            "{namespace}/{name} was stopped"
        );
    }
    // Each stop takes 200 ms on the stand-in, so the first five overlap: exactly the cap.
    assert_eq!(server.state().max_stops_in_flight, 5);
    for call in server.calls() {
        assert_ne!(
            call["params"]["namespace"], "*",
            "wildcard namespace used: {call}"
        );
    }

    // Nothing left to sweep.
    let report = backend.sweep_orphans(&sessions).await.unwrap();
    assert_eq!(report.sandboxes, 0);
    assert!(server.running(NAMESPACE, "other-team-sandbox"));
}

#[tokio::test]
async fn a_timeout_ends_the_run_as_timed_out() {
    let server = StandIn::start(Some(KEY)).await;
    let backend = backend(&server);
    let info = backend.create(&spec("s1")).await.unwrap();
    let (_dir, out) = sink();
    let request = ExecRequest {
        timeout: Some(Duration::from_millis(300)),
        ..command(&["sleep", "30"])
    };
    let started = Instant::now();
    let outcome = backend.exec(&info, request, &out, control()).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(outcome.reason, EndReason::TimedOut { after_ms: 300 });
    assert_eq!(outcome.exit, None);
    assert!(outcome.duration_ms >= 300);
    assert_eq!(
        params_of(
            server.calls_of("sandbox.command.run").last().unwrap(),
            "sandbox.command.run"
        ),
        json!({
            "sandbox": "inst1-s1",
            "namespace": NAMESPACE,
            "command": "sleep",
            "args": ["30"],
            "timeout": 1,
        })
    );
    // The server kills it on its own timeout; the sandbox is not stopped.
    assert!(server.calls_of("sandbox.stop").is_empty());

    // When the server's timeout fires first (it answers HTTP 500), the run still timed out.
    let request = ExecRequest {
        timeout: Some(Duration::from_secs(1)),
        ..command(&["sleep", "30"])
    };
    let outcome = backend.exec(&info, request, &out, control()).await.unwrap();
    assert_eq!(outcome.reason, EndReason::TimedOut { after_ms: 1000 });
}

#[tokio::test]
async fn cancel_stops_waiting_and_stops_the_sandbox() {
    let server = StandIn::start(Some(KEY)).await;
    let backend = backend(&server);
    let info = backend.create(&spec("s1")).await.unwrap();
    let (_dir, out) = sink();
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let outcome = backend
        .exec(
            &info,
            command(&["sleep", "30"]),
            &out,
            ExecControl::new(cancel),
        )
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(outcome.reason, EndReason::Cancelled);
    assert_eq!(outcome.exit, None);
    let stops = server.calls_of("sandbox.stop");
    assert_eq!(stops.len(), 1);
    assert_eq!(
        params_of(&stops[0], "sandbox.stop"),
        json!({"sandbox": "inst1-s1", "namespace": NAMESPACE})
    );
    assert!(!server.running(NAMESPACE, "inst1-s1"));

    // Cancelled before it starts: nothing is sent, nothing stopped.
    let info = backend.create(&spec("s2")).await.unwrap();
    let cancel = CancellationToken::new();
    cancel.cancel();
    let before = server.calls().len();
    let outcome = backend
        .exec(
            &info,
            command(&["echo", "x"]),
            &out,
            ExecControl::new(cancel),
        )
        .await
        .unwrap();
    assert_eq!(outcome.reason, EndReason::Cancelled);
    assert_eq!(server.calls().len(), before);
    assert!(server.running(NAMESPACE, "inst1-s2"));
}

#[tokio::test]
async fn env_is_passed_through_the_env_program() {
    let server = StandIn::start(Some(KEY)).await;
    let backend = backend(&server);
    let info = backend.create(&spec("s1")).await.unwrap();
    let (_dir, out) = sink();
    let request = ExecRequest {
        env: vec![("GREETING".to_owned(), "hello there".to_owned())],
        ..command(&["printenv", "GREETING"])
    };
    let outcome = backend.exec(&info, request, &out, control()).await.unwrap();
    assert!(outcome.success());
    assert_eq!(read(&out), "hello there\n");
    assert_eq!(
        params_of(
            server.calls_of("sandbox.command.run").last().unwrap(),
            "sandbox.command.run"
        ),
        json!({
            "sandbox": "inst1-s1",
            "namespace": NAMESPACE,
            "command": "env",
            "args": ["GREETING=hello there", "printenv", "GREETING"],
        })
    );

    // An empty stdin is the same as none.
    let request = ExecRequest {
        stdin: Some(Vec::new()),
        ..command(&["echo", "ok"])
    };
    assert!(
        backend
            .exec(&info, request, &out, control())
            .await
            .unwrap()
            .success()
    );
}

#[tokio::test]
async fn what_the_server_cannot_do_is_refused_clearly() {
    let server = StandIn::start(Some(KEY)).await;
    let backend = backend(&server);
    let info = backend.create(&spec("s1")).await.unwrap();
    let before = server.calls().len();
    let (_dir, out) = sink();

    let request = ExecRequest {
        stdin: Some(b"data".to_vec()),
        ..command(&["cat"])
    };
    let message = invalid_request(
        backend
            .exec(&info, request, &out, control())
            .await
            .unwrap_err(),
    );
    assert!(message.contains("standard input"), "{message}");

    let request = ExecRequest {
        env: vec![("BAD-NAME".to_owned(), "1".to_owned())],
        ..command(&["true"])
    };
    invalid_request(
        backend
            .exec(&info, request, &out, control())
            .await
            .unwrap_err(),
    );
    invalid_request(
        backend
            .exec(&info, command(&[]), &out, control())
            .await
            .unwrap_err(),
    );

    let request = ReplRequest {
        language: Language::Bash,
        code: "echo hi".to_owned(),
        timeout: None,
    };
    let message = invalid_request(
        backend
            .repl(&info, request, &out, control())
            .await
            .unwrap_err(),
    );
    assert!(message.contains("bash -c"), "{message}");

    let mut read_only = spec("s2");
    read_only.volumes = vec![VolumeMapping::parse("/data:/data:ro").unwrap()];
    let message = invalid_request(backend.create(&read_only).await.unwrap_err());
    assert!(message.contains("read-only"), "{message}");
    let mut no_template = spec("s2");
    no_template.template = String::new();
    invalid_request(backend.create(&no_template).await.unwrap_err());

    assert_eq!(
        server.calls().len(),
        before,
        "nothing refused reached the server"
    );

    // Other templates are images.
    let mut node = spec("s3");
    node.template = "node".to_owned();
    backend.create(&node).await.unwrap();
    let mut custom = spec("s4");
    custom.template = "ghcr.io/me/tools:1".to_owned();
    backend.create(&custom).await.unwrap();
    let images: Vec<Value> = server
        .calls_of("sandbox.start")
        .iter()
        .map(|call| call["params"]["config"]["image"].clone())
        .collect();
    assert_eq!(
        images,
        vec![
            json!("microsandbox/python"),
            json!("microsandbox/node"),
            json!("ghcr.io/me/tools:1")
        ]
    );
}

#[tokio::test]
async fn configuration_is_checked_before_anything_is_sent() {
    let message = invalid_request(
        MicrosandboxBackend::new(config("https://msb.example.com", None)).unwrap_err(),
    );
    assert!(
        message.contains("https") && message.contains("THE_URL_SETTING"),
        "{message}"
    );
    invalid_request(MicrosandboxBackend::new(config("not a url", None)).unwrap_err());

    let mut dashed = config("http://127.0.0.1:5555", None);
    dashed.instance_marker = "msbd-1".to_owned();
    let message = invalid_request(MicrosandboxBackend::new(dashed).unwrap_err());
    assert!(message.contains("no `-`"), "{message}");

    let mut wildcard = config("http://127.0.0.1:5555", None);
    wildcard.namespace = "*".to_owned();
    invalid_request(MicrosandboxBackend::new(wildcard).unwrap_err());

    let backend = MicrosandboxBackend::new(config("http://127.0.0.1:5555/", None)).unwrap();
    assert_eq!(backend.rpc_url(), "http://127.0.0.1:5555/api/v1/rpc");
    assert_eq!(backend.sandbox_name("abc-123"), "inst1-abc-123");
    let odd = backend.sandbox_name("sess/ion.1");
    assert!(
        odd.starts_with("inst1-sess_ion_1-") && odd.len() <= 63,
        "{odd}"
    );
    assert_ne!(odd, backend.sandbox_name("sess_ion_1"));
    assert!(backend.sandbox_name(&"x".repeat(200)).len() <= 63);

    // The key never shows in debug output.
    let shown = format!("{:?}", config("http://127.0.0.1:5555", Some("secret-key")));
    assert!(!shown.contains("secret-key"), "{shown}");
}

#[tokio::test]
async fn an_unreachable_server_names_the_url_and_the_url_setting() {
    // A port that was just free: nothing listens there.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let backend = MicrosandboxBackend::new(config(&url, Some(KEY))).unwrap();
    let message = unavailable(backend.list().await.unwrap_err());
    assert!(
        message.contains(&url) && message.contains("THE_URL_SETTING"),
        "{message}"
    );
}
