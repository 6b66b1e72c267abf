//! Load, run by `cargo xtask load` (or `cargo bench -p msbd --bench load`). A plain program
//! (`harness = false`) against the built `msbd serve --transport http` on a fresh data
//! directory, with real sandboxed tasks:
//!
//! 1. **Clients**: `MSBD_LOAD_CLIENTS` (50) MCP clients over streamable HTTP, each with its own
//!    session, submit a task (`submit_task`, command `true`) and await it
//!    (`get_task_result`, `wait=true`) over and over for `MSBD_LOAD_SECONDS` (60). Every call
//!    must succeed and every task complete. Reports p50 and p99 of each tool's latency and of
//!    a task's whole turn, tasks per second, and msbd's RSS: sampled every second, the growth
//!    from the end of the warm-up (`MSBD_LOAD_WARMUP_TASKS`, 3,000 tasks, and at least 10 s;
//!    not measured) to the end must stay under 10%. msbd runs with a 1 MiB SQLite page cache
//!    (`MSB_SQLITE_CACHE_MB=1`; default 32): the cache grows with the store until it is full,
//!    which at the default takes far longer than a run, so that with the default the growth
//!    measured would be the cache filling (bounded, by design), not a leak. With 1 MiB (1.75
//!    MiB with the readers' quarters) it is full within the warm-up, and whatever grows after
//!    that is what the check is for.
//! 2. **Paused queue**: the queue is paused, `MSBD_LOAD_QUEUED` (100,000) tasks are submitted
//!    by 16 clients, the queue is resumed, and every task must complete. Reports the submit
//!    rate, the burn-down rate, and RSS before, at the peak and after: memory stays bounded
//!    when the RSS at 100,000 queued tasks is within 64 MiB of the RSS before (the queue lives
//!    in the store, not in memory).
//!
//! The figures go to `target/load/results.json`; the exit status is non-zero when a check fails.
//! `MSBD_LOAD_URL` (and `MSBD_LOAD_PID`) load an msbd already running instead of a fresh one.
//! `MSB_ISOLATION` and `MSB_MAX_CONCURRENT_TASKS` pass through to msbd (defaults here: the
//! strongest isolation the host offers, 16 tasks at once).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

type LoadResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A lean MCP client over streamable HTTP: one session, one POST per request.
#[derive(Clone)]
struct Mcp {
    http: reqwest::Client,
    url: Arc<str>,
    session: Option<Arc<str>>,
    next_id: Arc<AtomicU64>,
}

impl Mcp {
    async fn connect(url: &str) -> LoadResult<Mcp> {
        let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
        let mut mcp = Mcp {
            http,
            url: url.into(),
            session: None,
            next_id: Arc::new(AtomicU64::new(1)),
        };
        let init = mcp
            .post(json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "load", "version": "0"}}}))
            .send()
            .await?;
        mcp.session = init
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(Arc::from);
        let answer = message(&init.text().await?)?;
        if answer.get("error").is_some() {
            return Err(format!("initialize failed: {answer}").into());
        }
        mcp.post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .send()
            .await?
            .text()
            .await?;
        Ok(mcp)
    }

    fn post(&self, body: Value) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(&*self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_string());
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", &**session);
        }
        request
    }

    /// A tool's structured answer; an error answer (JSON-RPC or tool) is an error.
    async fn call(&self, tool: &str, arguments: Value) -> LoadResult<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let response = self
            .post(json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}))
            .send()
            .await?;
        let status = response.status();
        let answer = message(&response.text().await?)?;
        if !status.is_success() || answer.get("error").is_some() {
            return Err(format!("{tool}: HTTP {status}: {answer}").into());
        }
        let result = &answer["result"];
        if result["isError"] == json!(true) {
            return Err(format!("{tool}: {}", result["content"]).into());
        }
        Ok(result["structuredContent"].clone())
    }
}

/// The JSON-RPC message of an answer: a JSON body, or the first `data:` line of an event
/// stream that holds one.
fn message(text: &str) -> LoadResult<Value> {
    let json = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .find(|d| !d.is_empty())
        .unwrap_or(text)
        .trim();
    serde_json::from_str(json).map_err(|e| format!("not JSON-RPC ({e}): {text:.200}").into())
}

/// msbd's resident set, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn percentile_ms(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_unstable();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index].as_secs_f64() * 1e3
}

struct Daemon {
    /// Killed when dropped (`kill_on_drop`).
    _child: Option<tokio::process::Child>,
    pid: u32,
    url: String,
    _dir: Option<tempfile::TempDir>,
}

impl Daemon {
    /// The msbd at `MSBD_LOAD_URL` (its process id in `MSBD_LOAD_PID`, for RSS), when set: to
    /// load an msbd started by hand (under a profiler, say). Else a fresh one.
    async fn start() -> LoadResult<Daemon> {
        if let Ok(url) = std::env::var("MSBD_LOAD_URL") {
            return Ok(Daemon {
                _child: None,
                pid: env_or("MSBD_LOAD_PID", 0) as u32,
                url: url
                    .trim_end_matches('/')
                    .trim_end_matches("/mcp")
                    .to_owned(),
                _dir: None,
            });
        }
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_msbd"));
        command
            .args(["serve", "--transport", "http", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("MSB_DATA_DIR", dir.path())
            .env("MSB_LOG_LEVEL", "warn")
            .env("MSB_SQLITE_CACHE_MB", "1")
            .env(
                "MSB_MAX_CONCURRENT_TASKS",
                std::env::var("MSB_MAX_CONCURRENT_TASKS").unwrap_or_else(|_| "16".into()),
            )
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        let child = command.spawn()?;
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = reqwest::get(format!("{url}/readyz")).await
                && response.status().is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                return Err("msbd never became ready".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Daemon {
            pid: child.id().unwrap_or(0),
            _child: Some(child),
            url,
            _dir: Some(dir),
        })
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    fn mcp_url(&self) -> String {
        format!("{}/mcp", self.url)
    }
}

/// RSS samples: (seconds since the sampling started, KiB).
type RssSamples = Arc<std::sync::Mutex<Vec<(f64, u64)>>>;

/// Samples msbd's RSS every second until the handle is aborted.
fn sample_rss(pid: u32) -> (tokio::task::JoinHandle<()>, RssSamples) {
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = Arc::clone(&samples);
    let started = Instant::now();
    let handle = tokio::spawn(async move {
        loop {
            if let Some(kib) = rss_kib(pid) {
                out.lock()
                    .unwrap()
                    .push((started.elapsed().as_secs_f64(), kib));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    (handle, samples)
}

#[derive(Default)]
struct Latencies {
    submit: Vec<Duration>,
    result: Vec<Duration>,
    turn: Vec<Duration>,
}

async fn clients_phase(
    daemon: &Daemon,
    report: &mut serde_json::Map<String, Value>,
) -> LoadResult<bool> {
    let clients = env_or("MSBD_LOAD_CLIENTS", 50) as usize;
    let seconds = env_or("MSBD_LOAD_SECONDS", 60);
    let warmup_tasks = env_or("MSBD_LOAD_WARMUP_TASKS", 3000);
    println!(
        "clients: {clients} MCP clients over HTTP; warm-up until {warmup_tasks} tasks and 10 s, then {seconds} s measured"
    );
    let (sampler, rss) = sample_rss(daemon.pid());
    let started = Instant::now();
    // Set once the warm-up is over: (when the measured run started, when it ends).
    let window: Arc<std::sync::OnceLock<(Instant, Instant)>> = Arc::default();
    let completed = Arc::new(AtomicU64::new(0));
    let coordinator = {
        let (window, completed) = (Arc::clone(&window), Arc::clone(&completed));
        tokio::spawn(async move {
            // At most five minutes of warm-up, whatever the count.
            while (completed.load(Ordering::Relaxed) < warmup_tasks
                || started.elapsed() < Duration::from_secs(10))
                && started.elapsed() < Duration::from_secs(300)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let now = Instant::now();
            let _ = window.set((now, now + Duration::from_secs(seconds)));
        })
    };
    let mut joins = Vec::new();
    for _ in 0..clients {
        let url = daemon.mcp_url();
        let (window, completed) = (Arc::clone(&window), Arc::clone(&completed));
        joins.push(tokio::spawn(async move {
            let mcp = Mcp::connect(&url).await?;
            let mut latencies = Latencies::default();
            while window.get().is_none_or(|(_, end)| Instant::now() < *end) {
                let measured = window.get().is_some();
                let turn = Instant::now();
                let submitted = mcp
                    .call(
                        "submit_task",
                        json!({"task_type": "command", "params": {"command": "true"}}),
                    )
                    .await?;
                let submit = turn.elapsed();
                let id = submitted["task_id"]
                    .as_str()
                    .ok_or("no task id")?
                    .to_owned();
                let asked = Instant::now();
                let result = mcp
                    .call(
                        "get_task_result",
                        json!({"task_id": id, "wait": true, "timeout": 120}),
                    )
                    .await?;
                if result["status"] != "completed" {
                    return Err(format!("task {id} ended {}: {result}", result["status"]).into());
                }
                completed.fetch_add(1, Ordering::Relaxed);
                if measured {
                    latencies.submit.push(submit);
                    latencies.result.push(asked.elapsed());
                    latencies.turn.push(turn.elapsed());
                }
            }
            LoadResult::Ok(latencies)
        }));
    }
    let mut all = Latencies::default();
    let mut errors = Vec::new();
    for join in joins {
        match join.await? {
            Ok(latencies) => {
                all.submit.extend(latencies.submit);
                all.result.extend(latencies.result);
                all.turn.extend(latencies.turn);
            }
            Err(error) => errors.push(error.to_string()),
        }
    }
    coordinator.abort();
    sampler.abort();
    let rss = rss.lock().unwrap().clone();
    let tasks = all.turn.len();
    let per_s = tasks as f64 / seconds as f64;
    let warmup = window
        .get()
        .map_or(f64::INFINITY, |(start, _)| (*start - started).as_secs_f64());
    let after_warmup = rss.iter().find(|(t, _)| *t >= warmup).map(|s| s.1);
    let last = rss.last().map(|s| s.1);
    let growth = match (after_warmup, last) {
        (Some(a), Some(b)) if a > 0 => (b as f64 - a as f64) / a as f64,
        _ => f64::NAN,
    };
    println!(
        "  warm-up: {:.0} s, {} tasks",
        warmup,
        completed.load(Ordering::Relaxed) as usize - tasks
    );
    let series: Vec<String> = rss
        .iter()
        .step_by(5)
        .map(|(t, kib)| format!("{t:.0}s {:.1}", *kib as f64 / 1024.0))
        .collect();
    println!("  RSS (MiB) every 5 s: {}", series.join(", "));
    let figures = json!({
        "load_warmup_seconds": (warmup * 10.0).round() / 10.0,
        "load_clients": clients,
        "load_seconds": seconds,
        "load_tasks": tasks,
        "load_tasks_per_s": (per_s * 10.0).round() / 10.0,
        "load_errors": errors.len(),
        "load_submit_p50_ms": percentile_ms(&mut all.submit, 0.5),
        "load_submit_p99_ms": percentile_ms(&mut all.submit, 0.99),
        "load_get_result_p50_ms": percentile_ms(&mut all.result, 0.5),
        "load_get_result_p99_ms": percentile_ms(&mut all.result, 0.99),
        "load_task_turn_p50_ms": percentile_ms(&mut all.turn, 0.5),
        "load_task_turn_p99_ms": percentile_ms(&mut all.turn, 0.99),
        "load_rss_after_warmup_kib": after_warmup,
        "load_rss_end_kib": last,
        "load_rss_growth_pct": (growth * 1000.0).round() / 10.0,
    });
    println!("{}", serde_json::to_string_pretty(&figures)?);
    for error in errors.iter().take(5) {
        println!("  error: {error}");
    }
    report.extend(figures.as_object().cloned().unwrap_or_default());
    let ok = errors.is_empty() && tasks > 0 && growth < 0.10;
    println!(
        "clients: {} ({} errors, RSS growth {:.1}% after warm-up, limit 10%)",
        if ok { "PASS" } else { "FAIL" },
        errors.len(),
        growth * 100.0
    );
    Ok(ok)
}

async fn stats(mcp: &Mcp) -> LoadResult<Value> {
    let answer = mcp
        .call("manage_background_tasks", json!({"action": "get_stats"}))
        .await?;
    Ok(answer["statistics"].clone())
}

async fn paused_queue_phase(
    daemon: &Daemon,
    report: &mut serde_json::Map<String, Value>,
) -> LoadResult<bool> {
    let queued = env_or("MSBD_LOAD_QUEUED", 100_000);
    let submitters = 16u64;
    println!("paused queue: {queued} tasks behind a paused queue, then resumed");
    let mcp = Mcp::connect(&daemon.mcp_url()).await?;
    let before = stats(&mcp).await?;
    let completed_before = before["total_tasks_completed"].as_u64().unwrap_or(0);
    mcp.call("manage_task_queue", json!({"action": "pause"}))
        .await?;
    let rss_before = rss_kib(daemon.pid()).unwrap_or(0);
    let (sampler, rss) = sample_rss(daemon.pid());
    let started = Instant::now();
    let mut joins = Vec::new();
    for worker in 0..submitters {
        let url = daemon.mcp_url();
        let count = queued / submitters + u64::from(worker < queued % submitters);
        joins.push(tokio::spawn(async move {
            let mcp = Mcp::connect(&url).await?;
            for _ in 0..count {
                mcp.call(
                    "submit_task",
                    json!({"task_type": "command", "params": {"command": "true"}}),
                )
                .await?;
            }
            LoadResult::Ok(())
        }));
    }
    for join in joins {
        join.await??;
    }
    let submit_s = started.elapsed().as_secs_f64();
    let rss_queued = rss_kib(daemon.pid()).unwrap_or(0);
    let waiting = stats(&mcp).await?;
    println!(
        "  submitted {queued} in {submit_s:.1} s ({:.0}/s); queued now {}, RSS {} MiB (before {} MiB)",
        queued as f64 / submit_s,
        waiting["total_queued"],
        rss_queued / 1024,
        rss_before / 1024
    );
    let resumed = Instant::now();
    mcp.call("manage_task_queue", json!({"action": "resume"}))
        .await?;
    let mut last_print = Instant::now();
    let finished = loop {
        let now = stats(&mcp).await?;
        let done = now["total_tasks_completed"].as_u64().unwrap_or(0) - completed_before;
        let failed = now["total_tasks_failed"].as_u64().unwrap_or(0)
            + now["total_tasks_cancelled"].as_u64().unwrap_or(0);
        if done >= queued || (now["total_queued"] == 0 && now["running_tasks"] == 0) {
            break (done, failed);
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            println!(
                "  {done} of {queued} completed after {:.0} s",
                resumed.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let burn_s = resumed.elapsed().as_secs_f64();
    sampler.abort();
    let peak = rss.lock().unwrap().iter().map(|s| s.1).max().unwrap_or(0);
    let rss_after = rss_kib(daemon.pid()).unwrap_or(0);
    let figures = json!({
        "paused_queue_tasks": queued,
        "paused_queue_submit_per_s": (queued as f64 / submit_s).round(),
        "paused_queue_completed": finished.0,
        "paused_queue_failed_or_cancelled": finished.1,
        "paused_queue_burn_down_per_s": (finished.0 as f64 / burn_s).round(),
        "paused_queue_rss_before_kib": rss_before,
        "paused_queue_rss_queued_kib": rss_queued,
        "paused_queue_rss_peak_kib": peak,
        "paused_queue_rss_after_kib": rss_after,
    });
    println!("{}", serde_json::to_string_pretty(&figures)?);
    report.extend(figures.as_object().cloned().unwrap_or_default());
    let bounded = rss_queued.saturating_sub(rss_before) < 64 * 1024
        && peak.saturating_sub(rss_before) < 128 * 1024;
    let ok = finished.0 == queued && bounded;
    println!(
        "paused queue: {} ({} of {queued} completed; RSS +{} MiB queued, +{} MiB at the peak)",
        if ok { "PASS" } else { "FAIL" },
        finished.0,
        rss_queued.saturating_sub(rss_before) / 1024,
        peak.saturating_sub(rss_before) / 1024
    );
    Ok(ok)
}

fn main() -> LoadResult<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let only = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |name: &str| only.as_deref().is_none_or(|f| name.contains(f));
    let mut report = serde_json::Map::new();
    let ok = runtime.block_on(async {
        let daemon = Daemon::start().await?;
        let mut ok = true;
        if wanted("clients") {
            ok &= clients_phase(&daemon, &mut report).await?;
        }
        if wanted("paused") {
            ok &= paused_queue_phase(&daemon, &mut report).await?;
        }
        LoadResult::Ok(ok)
    })?;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/load");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("results.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(report))? + "\n",
    )?;
    println!("(written to {})", path.display());
    if !ok {
        return Err("a load check failed (see above)".into());
    }
    Ok(())
}
