//! Benchmarks of the MCP surface, run by `cargo xtask bench` (or
//! `cargo bench -p msbd --bench mcp [-- FILTER]`). A plain program (`harness = false`) that
//! writes its figures (name → number) to `$MSBD_BENCH_PARTS_DIR/mcp.json` (else
//! `target/bench/parts/mcp.json`).
//!
//! - `mcp_stdio_call_p50_us`: the median round trip of `check_task_status` (one finished task)
//!   from an rmcp client to the built `msbd serve` over its stdin and stdout (a real child
//!   process, as MCP clients start it), one call at a time, after 200 warm-up calls;
//! - `mcp_stdio_calls_per_s`: how many such calls one client makes per second, one after the
//!   other (the count over the wall-clock time of the whole run);
//! - `mcp_http_call_p50_us`: the same round trip over streamable HTTP on loopback
//!   (`msbd serve --transport http`);
//! - `mcp_tasks_get_vs_rmcp_ratio`: the median `tasks/get` of msbd (its durable SQLite store,
//!   served as `msbd serve` serves it: through its `FastLane`) over the median `tasks/get` of a
//!   minimal rmcp server whose tasks live in rmcp's in-memory `TaskManager`, both in this
//!   process over the same in-memory byte stream, measured in turns in the same run (the ratio
//!   is what the target is about; the medians are in the part as `diag_mcp_tasks_get_msbd_us`
//!   and `diag_mcp_tasks_get_rmcp_us`, and msbd's through rmcp's own service, without the fast
//!   lane, as `diag_mcp_tasks_get_msbd_plain_us`).
//!
//! Two floors put the round trips in proportion on the machine at hand:
//! `diag_stdio_pipe_floor_*` (`cat` echoing the same request line over pipes: what any stdio
//! server pays before doing any work) and `diag_http_floor_p50_us` (a bare axum route in this
//! process answering the same POST). The figures over their floors, measured in the same run,
//! are what moves least with the host: `mcp_stdio_call_vs_floor` (the p50 over the pipe's,
//! target <= 6), `mcp_stdio_calls_vs_floor` (calls per second over the pipe's round trips per
//! second, >= 0.2) and `mcp_http_call_vs_floor` (the p50 over the axum route's, <= 3).
//!
//! An optional argument keeps only the figures whose name contains it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcp_tools::{FastLane, McpServer, ServerOptions};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
    ContentBlock, GetTaskParams, GetTaskResult, Implementation, ServerCapabilities, ServerConfig,
};
use rmcp::service::{RequestContext, RunningService};
use rmcp::task_manager::{TaskManager, TaskOptions};
use rmcp::transport::TokioChildProcess;
use rmcp::transport::async_rw::AsyncRwTransport;
use rmcp::{
    ClientHandler, ErrorData as McpError, RoleClient, RoleServer, ServerHandler, ServiceExt,
};
use serde_json::{Value, json};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const WARMUP: usize = 200;
const CALLS: usize = 5000;
/// More calls, for profiling (`MSBD_BENCH_CALLS`).
fn calls() -> usize {
    std::env::var("MSBD_BENCH_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CALLS)
}
const TASKS_GET_CALLS: usize = 2000;

#[derive(Clone)]
struct Client {
    tasks: bool,
}

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        let caps = if self.tasks {
            ClientCapabilities::builder().enable_tasks().build()
        } else {
            ClientCapabilities::default()
        };
        ClientConfig::new(caps, Implementation::new("bench", "0.0.0"))
    }
}

fn main() -> BenchResult<()> {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut part = serde_json::Map::new();
    runtime.block_on(async {
        if wanted("mcp_stdio_call_p50_us") || wanted("mcp_stdio_calls_per_s") {
            let (p50, per_s) = tokio::task::spawn_blocking(raw_stdio_calls).await.map_err(|e| e.to_string())??;
            println!("mcp_stdio_call_p50_us: {p50:.1} (target <= 100); mcp_stdio_calls_per_s: {per_s:.0} (target >= 20000)");
            part.insert("mcp_stdio_call_p50_us".into(), json!(round(p50)));
            part.insert("mcp_stdio_calls_per_s".into(), json!(per_s.round()));
            let (floor_p50, floor_per_s) = tokio::task::spawn_blocking(pipe_floor).await.map_err(|e| e.to_string())??;
            println!("  the floor, `cat` echoing the same request over pipes: diag_stdio_pipe_floor_p50_us {floor_p50:.1}, diag_stdio_pipe_floor_per_s {floor_per_s:.0}");
            part.insert("diag_stdio_pipe_floor_p50_us".into(), json!(round(floor_p50)));
            part.insert("diag_stdio_pipe_floor_per_s".into(), json!(floor_per_s.round()));
            // The same figures over the floor of the same run: they do not move with the host.
            let call_ratio = p50 / floor_p50;
            let calls_ratio = per_s / floor_per_s;
            println!(
                "mcp_stdio_call_vs_floor: {call_ratio:.2} (target <= 6; {p50:.1} us over {floor_p50:.1} us); mcp_stdio_calls_vs_floor: {calls_ratio:.3} (target >= 0.2; {per_s:.0}/s over {floor_per_s:.0}/s)"
            );
            part.insert("mcp_stdio_call_vs_floor".into(), json!(round(call_ratio)));
            part.insert("mcp_stdio_calls_vs_floor".into(), json!((calls_ratio * 1000.0).round() / 1000.0));
            let (p50, per_s) = stdio_calls().await?;
            println!("  with rmcp's client: diag_mcp_stdio_rmcp_client_call_p50_us {p50:.1}, diag_mcp_stdio_rmcp_client_calls_per_s {per_s:.0}");
            part.insert("diag_mcp_stdio_rmcp_client_call_p50_us".into(), json!(round(p50)));
            part.insert("diag_mcp_stdio_rmcp_client_calls_per_s".into(), json!(per_s.round()));
        }
        if wanted("mcp_http_call_p50_us") {
            let (p50, rmcp) = http_calls().await?;
            println!("mcp_http_call_p50_us: {p50:.1} (target <= 300)");
            println!("  with rmcp's client: diag_mcp_http_rmcp_client_call_p50_us {rmcp:.1}");
            part.insert("mcp_http_call_p50_us".into(), json!(round(p50)));
            part.insert("diag_mcp_http_rmcp_client_call_p50_us".into(), json!(round(rmcp)));
            let floor = http_floor().await?;
            println!("  the floor, a bare axum route answering the same POST in this process: diag_http_floor_p50_us {floor:.1}");
            part.insert("diag_http_floor_p50_us".into(), json!(round(floor)));
            let ratio = p50 / floor;
            println!("mcp_http_call_vs_floor: {ratio:.2} (target <= 3; {p50:.1} us over {floor:.1} us)");
            part.insert("mcp_http_call_vs_floor".into(), json!(round(ratio)));
        }
        if wanted("mcp_tasks_get_vs_rmcp_ratio") {
            let (msbd, plain, rmcp) = tasks_get().await?;
            let ratio = msbd / rmcp;
            println!("mcp_tasks_get_vs_rmcp_ratio: {ratio:.2} (target <= 1.5): msbd {msbd:.1} us, rmcp TaskManager {rmcp:.1} us");
            println!("  msbd through rmcp's own service (no fast lane): diag_mcp_tasks_get_msbd_plain_us {plain:.1} ({:.2} x rmcp)", plain / rmcp);
            part.insert("mcp_tasks_get_vs_rmcp_ratio".into(), json!(round(ratio)));
            part.insert("diag_mcp_tasks_get_msbd_us".into(), json!(round(msbd)));
            part.insert("diag_mcp_tasks_get_msbd_plain_us".into(), json!(round(plain)));
            part.insert("diag_mcp_tasks_get_rmcp_us".into(), json!(round(rmcp)));
        }
        BenchResult::Ok(())
    })?;
    let dir = std::env::var_os("MSBD_BENCH_PARTS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/parts"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("mcp.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(part))? + "\n",
    )?;
    println!("(written to {})", path.display());
    Ok(())
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn median_us(samples: &mut [Duration]) -> f64 {
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}

fn args(value: Value) -> rmcp::model::JsonObject {
    value.as_object().cloned().unwrap_or_default()
}

/// Submits one quick task and waits for it; returns its id.
async fn finished_task(client: &RunningService<RoleClient, Client>) -> BenchResult<String> {
    let created = client
        .call_tool(
            CallToolRequestParams::new("submit_task").with_arguments(args(
                json!({"task_type": "command", "params": {"command": "true"}}),
            )),
        )
        .await?;
    let id = created
        .structured_content
        .as_ref()
        .and_then(|v| v["task_id"].as_str())
        .ok_or("submit_task gave no task id")?
        .to_owned();
    client
        .call_tool(
            CallToolRequestParams::new("get_task_result")
                .with_arguments(args(json!({"task_id": id, "wait": true, "timeout": 60}))),
        )
        .await?;
    Ok(id)
}

/// Round trips of `check_task_status`: the median and the calls per second.
async fn status_calls(
    client: &RunningService<RoleClient, Client>,
    id: &str,
) -> BenchResult<(f64, f64)> {
    let params = CallToolRequestParams::new("check_task_status")
        .with_arguments(args(json!({"task_id": id})));
    for _ in 0..WARMUP {
        client.call_tool(params.clone()).await?;
    }
    let mut samples = Vec::with_capacity(calls());
    let started = Instant::now();
    for _ in 0..calls() {
        let before = Instant::now();
        let result = client.call_tool(params.clone()).await?;
        samples.push(before.elapsed());
        if result.is_error == Some(true) {
            return Err(format!("check_task_status failed: {result:?}").into());
        }
    }
    let per_s = calls() as f64 / started.elapsed().as_secs_f64();
    Ok((median_us(&mut samples), per_s))
}

fn msbd_command(data_dir: &std::path::Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_msbd"));
    command
        .arg("serve")
        .env("MSB_DATA_DIR", data_dir)
        .env("MSB_LOG_LEVEL", "warn");
    command
}

/// The same round trips from a lean client: raw JSON-RPC lines over the child's pipes, with
/// blocking reads and writes on one thread (what the server costs, without a client runtime's
/// thread hand-offs or rmcp's client-side machinery).
fn raw_stdio_calls() -> BenchResult<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_msbd"))
        .arg("serve")
        .env("MSB_DATA_DIR", dir.path())
        .env("MSB_LOG_LEVEL", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut client = LineClient::new(&mut child)?;
    let mut request = |method: &str, params: Value| client.request(method, params);
    request(
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}),
    )?;
    let created = request(
        "tools/call",
        json!({"name": "submit_task", "arguments": {"task_type": "command", "params": {"command": "true"}}}),
    )?;
    let id = created["result"]["structuredContent"]["task_id"]
        .as_str()
        .ok_or("no task id")?
        .to_owned();
    request(
        "tools/call",
        json!({"name": "get_task_result", "arguments": {"task_id": id, "wait": true, "timeout": 60}}),
    )?;
    let params = json!({"name": "check_task_status", "arguments": {"task_id": id}});
    for _ in 0..WARMUP {
        request("tools/call", params.clone())?;
    }
    let mut samples = Vec::with_capacity(calls());
    let started = Instant::now();
    for _ in 0..calls() {
        let before = Instant::now();
        let answer = request("tools/call", params.clone())?;
        samples.push(before.elapsed());
        if answer["result"]["isError"] == json!(true) || answer.get("error").is_some() {
            return Err(format!("check_task_status failed: {answer}").into());
        }
    }
    let per_s = calls() as f64 / started.elapsed().as_secs_f64();
    // Closing msbd's stdin ends its session.
    drop(client);
    let _ = child.wait();
    Ok((median_us(&mut samples), per_s))
}

/// The lean client's side of a JSON-RPC session over a child's pipes: each request is built as
/// a JSON value and written as one line; lines are read and parsed until the one whose `id` is
/// the request's. The floor (`cat`, which sends the request line back) goes through the same
/// steps, so that the client's own work is in both and the ratios measure the server.
struct LineClient {
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    line: String,
    next_id: u64,
}

impl LineClient {
    fn new(child: &mut std::process::Child) -> BenchResult<LineClient> {
        Ok(LineClient {
            stdin: child.stdin.take().ok_or("no stdin")?,
            stdout: std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?),
            line: String::new(),
            next_id: 0,
        })
    }

    fn request(&mut self, method: &str, params: Value) -> BenchResult<Value> {
        use std::io::{BufRead, Write};
        self.next_id += 1;
        let id = self.next_id;
        let mut text =
            json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string();
        text.push('\n');
        if id == 2 {
            // After `initialize`, the notification every client sends.
            text.insert_str(
                0,
                "{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n",
            );
        }
        self.stdin.write_all(text.as_bytes())?;
        self.stdin.flush()?;
        loop {
            self.line.clear();
            if self.stdout.read_line(&mut self.line)? == 0 {
                return Err("the server closed its stdout".into());
            }
            let answer: Value = serde_json::from_str(&self.line)?;
            if answer["id"] == json!(id) {
                return Ok(answer);
            }
        }
    }
}

/// The floor under `mcp_stdio_*` on this machine: `cat` as the server, which sends each request
/// line back as its answer, over the same kind of pipes to a child process, from the same
/// client doing the same work per call ([`LineClient`]): two wake-ups per round trip and no
/// server work at all. Returns the median round trip and the calls per second.
fn pipe_floor() -> BenchResult<(f64, f64)> {
    let mut child = std::process::Command::new("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut client = LineClient::new(&mut child)?;
    let params = json!({"name": "check_task_status", "arguments": {"task_id": "019ad6c2-8f3e-7c4a-9b1d-2e5f6a7b8c9d"}});
    let mut samples = Vec::with_capacity(calls());
    let mut started = Instant::now();
    for round in 0..(WARMUP + calls()) {
        if round == WARMUP {
            started = Instant::now();
        }
        let before = Instant::now();
        client.request("tools/call", params.clone())?;
        if round >= WARMUP {
            samples.push(before.elapsed());
        }
    }
    let per_s = calls() as f64 / started.elapsed().as_secs_f64();
    drop(client);
    let _ = child.wait();
    Ok((median_us(&mut samples), per_s))
}

/// The floor under `mcp_http_call_p50_us`: the lean client's POST to a bare axum route in this
/// process that answers with a fixed JSON body of a `check_task_status` answer's size (no MCP,
/// no store). A lower bound: client and server share a process.
async fn http_floor() -> BenchResult<f64> {
    let body = json!({"jsonrpc": "2.0", "id": 2, "result": {"content": [{"type": "text", "text": "x".repeat(400)}], "structuredContent": {"pad": "y".repeat(500)}}}).to_string();
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(move || {
            let body = body.clone();
            async move { ([("content-type", "application/json")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/mcp", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "check_task_status", "arguments": {"task_id": "019ad6c2-8f3e-7c4a-9b1d-2e5f6a7b8c9d"}}}).to_string();
    let mut samples = Vec::with_capacity(calls());
    for round in 0..(WARMUP + calls()) {
        let before = Instant::now();
        let text = http
            .post(&url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(call.clone())
            .send()
            .await?
            .text()
            .await?;
        let elapsed = before.elapsed();
        if text.is_empty() {
            return Err("the floor server answered nothing".into());
        }
        if round >= WARMUP {
            samples.push(elapsed);
        }
    }
    server.abort();
    Ok(median_us(&mut samples))
}

async fn stdio_calls() -> BenchResult<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let client = Client { tasks: false }
        .serve(TokioChildProcess::new(msbd_command(dir.path()))?)
        .await?;
    let id = finished_task(&client).await?;
    let figures = status_calls(&client, &id).await?;
    client.cancel().await?;
    Ok(figures)
}

async fn http_calls() -> BenchResult<(f64, f64)> {
    use rmcp::transport::StreamableHttpClientTransport;
    let dir = tempfile::tempdir()?;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let mut command = msbd_command(dir.path());
    command
        .args([
            "--transport",
            "http",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    let mut child = command.spawn()?;
    let url = format!("http://127.0.0.1:{port}/mcp");
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            return Err("msbd never listened".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = Client { tasks: false }
        .serve(StreamableHttpClientTransport::from_uri(url.clone()))
        .await?;
    let id = finished_task(&client).await?;
    let (rmcp_p50, _) = status_calls(&client, &id).await?;
    client.cancel().await?;
    let lean_p50 = lean_http_calls(&url, &id).await?;
    child.start_kill()?;
    let _ = child.wait().await;
    Ok((lean_p50, rmcp_p50))
}

/// Round trips of `check_task_status` over streamable HTTP from a lean client: one keep-alive
/// connection, one POST per call, the answer read whole (a JSON body, or the one `data:` line
/// of an event stream).
async fn lean_http_calls(url: &str, id: &str) -> BenchResult<f64> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let post = |body: Value, session: Option<String>| {
        let mut request = http
            .post(url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_string());
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        request
    };
    let answer = |text: &str| -> BenchResult<Value> {
        // An event stream may open with a priming event whose data is empty.
        let json = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(str::trim)
            .find(|d| !d.is_empty())
            .unwrap_or(text)
            .trim();
        Ok(serde_json::from_str(json)?)
    };
    let init = post(
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}}}),
        None,
    )
    .send()
    .await?;
    let session = init
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    init.text().await?;
    post(
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        session.clone(),
    )
    .send()
    .await?
    .text()
    .await?;
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "check_task_status", "arguments": {"task_id": id}}});
    let mut samples = Vec::with_capacity(calls());
    for round in 0..(WARMUP + calls()) {
        let before = Instant::now();
        let text = post(call.clone(), session.clone())
            .send()
            .await?
            .text()
            .await?;
        let elapsed = before.elapsed();
        let value = answer(&text)?;
        if value["result"]["isError"] == json!(true) || value.get("error").is_some() {
            return Err(format!("check_task_status over HTTP failed: {value}").into());
        }
        if round >= WARMUP {
            samples.push(elapsed);
        }
    }
    Ok(median_us(&mut samples))
}

/// A minimal server whose tasks live in rmcp's in-memory `TaskManager`: `tools/call` answers
/// with a task that completes at once.
#[derive(Clone)]
struct InMemory {
    tasks: TaskManager,
}

impl ServerHandler for InMemory {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tasks()
                .build(),
        )
    }

    async fn call_tool(
        &self,
        _request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let task = self.tasks.spawn(TaskOptions::new(), |_ctx| {
            Box::pin(async { Ok(CallToolResult::success(vec![ContentBlock::text("done")])) })
        });
        Ok(CallToolResponse::Task(rmcp::model::CreateTaskResult::new(
            task,
        )))
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, McpError> {
        Ok(GetTaskResult::new(self.tasks.get_task(&request.task_id)?))
    }
}

/// Connects a tasks client to a server over an in-memory byte stream.
async fn duplex_client<S: ServerHandler>(
    server: S,
) -> BenchResult<RunningService<RoleClient, Client>> {
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    Ok(Client { tasks: true }.serve(client_io).await?)
}

/// Connects a tasks client to msbd's server over an in-memory byte stream, through the
/// [`FastLane`] `msbd serve` puts in front of rmcp's service on every connection.
async fn fast_lane_client(server: McpServer) -> BenchResult<RunningService<RoleClient, Client>> {
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    let (read, write) = tokio::io::split(server_io);
    let transport = FastLane::new(AsyncRwTransport::new_server(read, write), server.clone());
    tokio::spawn(async move {
        if let Ok(running) = server.serve(transport).await {
            let _ = running.waiting().await;
        }
    });
    Ok(Client { tasks: true }.serve(client_io).await?)
}

/// Starts a task through `tools/call` and returns its id once `tasks/get` says it completed.
async fn completed_task(
    client: &RunningService<RoleClient, Client>,
    tool: &str,
    arguments: Value,
) -> BenchResult<String> {
    let response = client
        .call_tool_once(CallToolRequestParams::new(tool.to_owned()).with_arguments(args(arguments)))
        .await?;
    let CallToolResponse::Task(created) = response else {
        return Err(format!("{tool} did not answer with a task: {response:?}").into());
    };
    let id = created.task.task_id;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = client
            .peer()
            .get_task(GetTaskParams::new(id.clone()))
            .await?;
        if got.task.task.status.is_terminal() {
            return Ok(id);
        }
        if Instant::now() > deadline {
            return Err("the task never finished".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn tasks_get() -> BenchResult<(f64, f64, f64)> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn task_core::store::Store> =
        Arc::new(task_core::store::sqlite::SqliteStore::open(
            task_core::store::sqlite::SqliteConfig::new(dir.path().join("tasks.sqlite3")),
        )?);
    let wrapper = sandbox_wrapper::Wrapper::start(
        store,
        sandbox_wrapper::WrapperConfig::new(dir.path().join("data")),
    )
    .await?;
    let server = McpServer::new(wrapper.clone(), ServerOptions::default());
    let msbd = fast_lane_client(server.clone()).await?;
    let plain = duplex_client(server).await?;
    let rmcp = duplex_client(InMemory {
        tasks: TaskManager::new(),
    })
    .await?;
    let msbd_id = completed_task(&msbd, "execute_command", json!({"command": "true"})).await?;
    let rmcp_id = completed_task(&rmcp, "anything", json!({})).await?;
    let mut msbd_samples = Vec::with_capacity(TASKS_GET_CALLS);
    let mut plain_samples = Vec::with_capacity(TASKS_GET_CALLS);
    let mut rmcp_samples = Vec::with_capacity(TASKS_GET_CALLS);
    // In turns, so that both see the same machine.
    for round in 0..(WARMUP + TASKS_GET_CALLS) {
        for (client, id, samples) in [
            (&msbd, &msbd_id, &mut msbd_samples),
            (&plain, &msbd_id, &mut plain_samples),
            (&rmcp, &rmcp_id, &mut rmcp_samples),
        ] {
            let before = Instant::now();
            client
                .peer()
                .get_task(GetTaskParams::new(id.clone()))
                .await?;
            if round >= WARMUP {
                samples.push(before.elapsed());
            }
        }
    }
    msbd.cancel().await?;
    plain.cancel().await?;
    rmcp.cancel().await?;
    wrapper.graceful_shutdown(Duration::from_secs(10)).await;
    Ok((
        median_us(&mut msbd_samples),
        median_us(&mut plain_samples),
        median_us(&mut rmcp_samples),
    ))
}
