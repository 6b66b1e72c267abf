//! Benchmarks of the web console, run by `cargo xtask bench` (or
//! `cargo bench -p msbd --bench console [-- FILTER]`). A plain program (`harness = false`) that
//! writes its figures to `$MSBD_BENCH_PARTS_DIR/console.json` (else
//! `target/bench/parts/console.json`).
//!
//! The built `msbd serve --transport http` (no token: the console's user is the operator, who
//! sees every task) runs on a data directory whose SQLite store holds 1,000,000 completed tasks,
//! made first with task-core's store.
//!
//! - `console_task_list_ms`: `GET /ui/tasks` (the task page's first load: 50 tasks of the million,
//!   newest first), from sending the request to the last byte of the page, the median of 31
//!   (after 3 unmeasured). `diag_console_task_page_200_ms` is the 200th page, reached by its
//!   cursor (keyset paging: it should cost what the first does).
//! - `console_event_lag_ms`: the median, over 200 tasks submitted over MCP (streamable HTTP) 20 ms
//!   apart, from the task's creation (its `created_at`, which msbd stamps in milliseconds just
//!   before the store commits it) to its `task` event arriving on a connected `/ui/events`
//!   stream. The tasks are scheduled an hour ahead, so each has one change (its creation).
//! - `console_idle_cpu_pct`: msbd's CPU time (user + system, from `/proc/PID/stat`) over 30 s
//!   with 10 consoles connected to `/ui/events` and an idle queue, as a percent of one core.
//!   `diag_console_idle_cpu_pct_no_console` is the same 30 s with none connected, measured just
//!   before (msbd's own loops).
//!
//! An optional argument keeps only the figures whose name contains it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, ServiceExt};
use serde_json::{Value, json};
use task_core::store::sqlite::{SqliteConfig, SqliteStore};
use task_core::store::{ClaimRequest, Finish, Outcome, Store};
use task_core::{NewTask, TaskId, Timestamp};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TASKS: usize = 1_000_000;
const BATCH: usize = 1_000;
const LIST_RUNS: usize = 31;
const EVENT_TASKS: usize = 200;
const CONSOLES: usize = 10;
const IDLE: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct Client;

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("bench", "0.0.0"),
        )
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
    if ![
        "console_task_list_ms",
        "console_event_lag_ms",
        "console_idle_cpu_pct",
    ]
    .iter()
    .any(|name| wanted(name))
    {
        return Ok(());
    }
    runtime.block_on(async {
        let dir = tempfile::tempdir()?;
        let started = Instant::now();
        fill(&dir.path().join("tasks.sqlite3")).await?;
        println!(
            "  built {TASKS} completed tasks in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let mut daemon = Daemon::start(dir.path()).await?;
        if wanted("console_task_list_ms") {
            let (first, deep) = list(&daemon).await?;
            println!(
                "console_task_list_ms: {first:.2} (target <= 50); the 200th page: {deep:.2} ms"
            );
            part.insert("console_task_list_ms".into(), json!(round(first)));
            part.insert("diag_console_task_page_200_ms".into(), json!(round(deep)));
        }
        if wanted("console_event_lag_ms") {
            let (p50, p99) = event_lag(&daemon).await?;
            println!("console_event_lag_ms: {p50:.2} (target <= 50); p99 {p99:.2}");
            part.insert("console_event_lag_ms".into(), json!(round(p50)));
            part.insert("diag_console_event_lag_p99_ms".into(), json!(round(p99)));
        }
        if wanted("console_idle_cpu_pct") {
            let (none, ten) = idle_cpu(&daemon).await?;
            println!(
                "console_idle_cpu_pct: {ten:.2} (target <= 1) with {CONSOLES} consoles; {none:.2} with none"
            );
            part.insert("console_idle_cpu_pct".into(), json!(round(ten)));
            part.insert(
                "diag_console_idle_cpu_pct_no_console".into(),
                json!(round(none)),
            );
        }
        daemon.child.kill().await?;
        BenchResult::Ok(())
    })?;
    let dir = std::env::var_os("MSBD_BENCH_PARTS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/parts"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("console.json");
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

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A store of `TASKS` completed `command` tasks.
async fn fill(path: &Path) -> BenchResult<()> {
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(path.to_owned()))?);
    for batch in 0..TASKS / BATCH {
        let now = Timestamp::now();
        let tasks = (0..BATCH)
            .map(|i| {
                NewTask::new(
                    "command",
                    json!({ "command": format!("echo {}", batch * BATCH + i) }),
                )
                .into_task(TaskId::new(), now)
            })
            .collect();
        store.submit(tasks).await?;
    }
    loop {
        let now = Timestamp::now();
        let claimed = store
            .claim(ClaimRequest {
                max: BATCH,
                now,
                lease_until: now.after(Duration::from_secs(3_600)),
                exclude_types: Vec::new(),
                type_room: Vec::new(),
            })
            .await?;
        if claimed.is_empty() {
            break;
        }
        let mut finishes = tokio::task::JoinSet::new();
        for task in claimed {
            let store = Arc::clone(&store);
            let finish = Finish {
                id: task.id,
                attempt: task.attempt,
                now: Timestamp::now(),
                outcome: Outcome::Completed {
                    result: json!({ "exit_code": 0 }),
                },
            };
            finishes.spawn(async move { store.finish(finish).await });
        }
        while let Some(joined) = finishes.join_next().await {
            joined??;
        }
    }
    drop(store);
    Ok(())
}

struct Daemon {
    child: tokio::process::Child,
    port: u16,
    http: reqwest::Client,
}

impl Daemon {
    async fn start(data_dir: &Path) -> BenchResult<Daemon> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_msbd"))
            .args(["serve", "--transport", "http", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .env("MSB_DATA_DIR", data_dir)
            .env("MSB_LOG_LEVEL", "warn")
            .kill_on_drop(true)
            .spawn()?;
        let daemon = Daemon {
            child,
            port,
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(response) = daemon.http.get(daemon.url("/readyz")).send().await
                && response.status() == 200
            {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                return Err("msbd did not become ready within 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The time to the last byte of a page, and the page.
    async fn page(&self, path: &str) -> BenchResult<(Duration, String)> {
        let started = Instant::now();
        let response = self.http.get(self.url(path)).send().await?;
        if response.status() != 200 {
            return Err(format!("GET {path}: {}", response.status()).into());
        }
        let body = response.text().await?;
        Ok((started.elapsed(), body))
    }
}

/// The first page's time, and the 200th page's.
async fn list(daemon: &Daemon) -> BenchResult<(f64, f64)> {
    for _ in 0..3 {
        daemon.page("/ui/tasks").await?;
    }
    let mut firsts = Vec::with_capacity(LIST_RUNS);
    for _ in 0..LIST_RUNS {
        let (took, body) = daemon.page("/ui/tasks").await?;
        if body.matches("<tr data-task-id=\"").count() < 51 {
            return Err("the first page does not hold 50 tasks".into());
        }
        firsts.push(ms(took));
    }
    // Follow the cursors to the 200th page, then time it.
    let mut path = "/ui/tasks".to_owned();
    for _ in 1..200 {
        let (_, body) = daemon.page(&path).await?;
        let start = body
            .find("id=\"next-page\" href=\"")
            .ok_or("a page without a next page")?
            + 21;
        let end = body[start..].find('"').ok_or("a broken link")? + start;
        path = body[start..end].replace("&amp;", "&");
    }
    let mut deep = Vec::with_capacity(LIST_RUNS);
    for _ in 0..LIST_RUNS {
        deep.push(ms(daemon.page(&path).await?.0));
    }
    Ok((median(&mut firsts), median(&mut deep)))
}

/// Milliseconds since the epoch of an RFC 3339 time as msbd writes it (`...T..:..:..sssZ`).
fn epoch_ms(text: &str) -> BenchResult<f64> {
    let at = chrono::DateTime::parse_from_rfc3339(text)?;
    Ok(at.timestamp_millis() as f64)
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// The median and p99 lag from a task's creation to its event on a console's stream.
async fn event_lag(daemon: &Daemon) -> BenchResult<(f64, f64)> {
    let mut stream = daemon.http.get(daemon.url("/ui/events")).send().await?;
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(String, f64)>();
    let reader = tokio::spawn(async move {
        let mut buffer = String::new();
        while let Ok(Some(chunk)) = stream.chunk().await {
            let at = now_ms();
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: "))
                    && let Ok(task) = serde_json::from_str::<Value>(data)
                    && let Some(created) = task["created_at"].as_str()
                    && sender.send((created.to_owned(), at)).is_err()
                {
                    return;
                }
            }
        }
    });
    let transport = StreamableHttpClientTransport::from_config(
        StreamableHttpClientTransportConfig::with_uri(daemon.url("/mcp")),
    );
    let client = Client.serve(transport).await?;
    let mut lags = Vec::with_capacity(EVENT_TASKS);
    for _ in 0..EVENT_TASKS {
        let arguments = json!({
            "task_type": "command",
            "params": {"command": "true"},
            "delay_seconds": 3600,
        });
        let result = client
            .call_tool(
                CallToolRequestParams::new("create_background_task")
                    .with_arguments(arguments.as_object().cloned().unwrap_or_default()),
            )
            .await?;
        if result.is_error == Some(true) {
            return Err(format!("create_background_task failed: {result:?}").into());
        }
        let (created, at) = tokio::time::timeout(Duration::from_secs(10), receiver.recv())
            .await?
            .ok_or("the event stream ended")?;
        lags.push((at - epoch_ms(&created)?).max(0.0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.cancel().await?;
    reader.abort();
    lags.sort_by(f64::total_cmp);
    let p99 = lags[lags.len() * 99 / 100];
    Ok((median(&mut lags), p99))
}

/// msbd's CPU time so far (user + system), from `/proc/PID/stat`.
fn cpu_time(pid: u32) -> BenchResult<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').ok_or("an unreadable stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
    Ok(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// msbd's CPU over `IDLE` with no console and with `CONSOLES`, in percent of one core.
async fn idle_cpu(daemon: &Daemon) -> BenchResult<(f64, f64)> {
    let pid = daemon.child.id().ok_or("msbd has exited")?;
    let measure = async || -> BenchResult<f64> {
        let before = cpu_time(pid)?;
        let started = Instant::now();
        tokio::time::sleep(IDLE).await;
        let used = cpu_time(pid)? - before;
        Ok(used.as_secs_f64() / started.elapsed().as_secs_f64() * 100.0)
    };
    let none = measure().await?;
    let mut streams = Vec::with_capacity(CONSOLES);
    for _ in 0..CONSOLES {
        let response = daemon.http.get(daemon.url("/ui/events")).send().await?;
        if response.status() != 200 {
            return Err(format!("/ui/events: {}", response.status()).into());
        }
        streams.push(response);
    }
    let ten = measure().await?;
    drop(streams);
    Ok((none, ten))
}
