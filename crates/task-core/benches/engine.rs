//! Benchmarks of the task engine and its stores, run by `cargo xtask bench` (or
//! `cargo bench -p task-core --bench engine [-- FILTER]`).
//!
//! A plain program (`harness = false`): it builds its own Tokio runtime (multi-thread, 2 workers),
//! measures, prints one line per figure and a summary table, and writes the figures as one JSON
//! object (name → number) to `$MSBD_BENCH_PARTS_DIR/engine.json` (or, without that variable, to
//! `target/bench/parts/engine.json` in the workspace).
//!
//! The figures:
//! - `engine_sqlite_tasks_per_s`, `engine_memory_tasks_per_s`: burn-down of 100,000 no-op tasks
//!   at concurrency 64, all submitted first with the queue paused; median of 3 runs.
//! - `engine_postgres_tasks_per_s`: the same burn-down by two engines (nodes) sharing one
//!   PostgreSQL queue, concurrency 64 each; median of 3 runs.
//! - `engine_postgres_sustained_ratio`: two nodes run no-op tasks for 5 minutes
//!   (`MSBD_BENCH_PG_SUSTAINED_SECS` shortens it) with about 20,000 always queued: throughput in
//!   the last fifth over the first, with finished tasks and dead row versions piling up (target:
//!   at least 0.8). `engine_postgres_sustained_10min_ratio`: the same for 10 minutes, minute 10 over
//!   minute 1 (the windows are a fifth of the 5-minute run's length, so the variable scales both).
//!   With `MSBD_BENCH_BUSY_CORE=1` both run with one core kept busy by a spinning thread, and are
//!   named `…_one_core_busy` (the issue asks for both figures on a busy machine too).
//!   The PostgreSQL benches use the database at `MSB_TEST_DATABASE_URL` (by default
//!   `postgres://postgres@127.0.0.1:5432/test`), a fresh schema per run, dropped afterwards.
//! - `burndown_c16_sqlite_tasks_per_s`, `burndown_c16_sqlite_full_tasks_per_s`,
//!   `burndown_c16_postgres_one_node_tasks_per_s`, `burndown_c16_memory_tasks_per_s`: the
//!   protocol users measure job queues by: 20,000 no-op tasks put in the store first, then one
//!   engine (one process) with concurrency 16 built on it, timed from `Engine::start` until the
//!   store counts all 20,000 completed; median of 3 runs. SQLite with `synchronous=NORMAL` (the
//!   default) and `FULL`, one PostgreSQL node, memory.
//! - `burndown_c16_sqlite_vs_store_ratio`: the C=16 SQLite burn-down over the SQLite store alone
//!   doing the same claims and finishes with no engine (as `diag_store`: claim a batch, finish
//!   it concurrently), its best batch of 16, 64, 256 and 1,000, measured in the same run: after
//!   each of the 3 burn-downs, so that each ratio's two terms are taken a few seconds apart;
//!   the median of the 3 ratios.
//! - `engine_start_to_first_run_us`: in each C=16 SQLite run, from `Engine::start` to the first
//!   handler call; median of 3.
//! - `submit_to_start_p50_us`, `submit_to_start_p99_us`: an idle engine on SQLite, one task at a
//!   time, from just before `submit` to the moment its handler starts.
//! - `sqlite_1m_rss_mb`, `sqlite_1m_list_page_ms`, `sqlite_1m_list_sparse_page_ms`,
//!   `sqlite_1m_open_ms`: a SQLite file holding 1,000,000 finished tasks.
//!
//! Before the figures it prints `host_cpu_probe_ms` (also in the JSON): a fixed single-thread
//! integer workload, so that figures taken on different hosts, or on one host on different days,
//! can be compared (the ratios above do not move with the host; the absolute figures do).
//!
//! An optional argument keeps only the figures whose name contains it; arguments that start with
//! `--` (cargo passes `--bench`) are ignored.
//!
//! Diagnostics, printed only (no figures), run with a filter starting with `diag`:
//! `diag_engine` runs one burn-down per store through a wrapper that counts and times the
//! engine's claims and finishes; `diag_store` drives the SQLite store alone (claim N, finish them
//! concurrently) for N in `MSBD_DIAG_BATCHES` (default 1,8,64,256,1000), after dropping the
//! indexes named in `MSBD_DIAG_DROP_INDEXES` if set; `diag_c16` runs the C=16 SQLite burn-down
//! through the counting wrapper.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The daemon's allocator (see msbd's `main.rs`), so that these figures are the daemon's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use serde_json::{Value, json};
use task_core::store::memory::MemoryStore;
use task_core::store::postgres::{PostgresConfig, PostgresStore};
use task_core::store::sqlite::{SqliteConfig, SqliteStore, Synchronous};
use task_core::store::{
    ClaimRequest, Command as StoreCommand, Finish, Heartbeat, HeartbeatReply, ListFilter, Outcome,
    Page, PageRequest, ProgressUpdate, Promoted, Recover, Stats, Store, StoreFuture, Submitted,
};
use task_core::{
    Engine, EngineConfig, FailureKind, NewTask, Status, Task, TaskError, TaskFailure, TaskId,
    Timestamp, handler_fn,
};
use tokio::runtime::Runtime;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Tasks in each burn-down.
const BURN_TASKS: usize = 100_000;
/// The engine's concurrency in the burn-downs.
const BURN_CONCURRENCY: usize = 64;
/// Tasks per `submit_many` / `Store::submit` call.
const SUBMIT_BATCH: usize = 1_000;
/// Runs of each burn-down (the median is reported).
const BURN_RUNS: usize = 3;
/// Submit-to-start samples thrown away first.
const LATENCY_WARMUP: usize = 200;
/// Submit-to-start samples kept.
const LATENCY_SAMPLES: usize = 2_000;
/// Finished tasks in the large store file.
const RETAINED: usize = 1_000_000;
/// One retained task in this many ends `failed` (the rest `completed`): the sparse listing.
const FAIL_EVERY: usize = 1_000;
/// Timed repetitions of each listing (the median is reported).
const LIST_REPEATS: usize = 31;
/// Timed opens of the large file (the median is reported).
const OPEN_RUNS: usize = 3;

/// Set (to the store file) in the child process that measures the RSS of a fresh process.
const RSS_PROBE_ENV: &str = "MSBD_BENCH_ENGINE_RSS_PROBE";
/// How the child reports its RSS on stdout.
const RSS_PROBE_PREFIX: &str = "rss_probe_kib=";

/// The task type every bench uses.
const NOOP: &str = "noop";

fn main() -> BenchResult<()> {
    if let Some(path) = std::env::var_os(RSS_PROBE_ENV) {
        return rss_probe(Path::new(&path));
    }
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with("--"));
    let wants = |names: &[&str]| {
        filter
            .as_deref()
            .is_none_or(|f| names.iter().any(|name| name.contains(f)))
    };
    let runtime = runtime()?;
    let mut figures = Figures::default();
    let probe = host_cpu_probe_ms();
    println!(
        "host_cpu_probe_ms: {probe:.0} (a fixed single-thread workload; larger is a slower host)"
    );
    figures.info.push(("host_cpu_probe_ms", probe.round()));

    let c16 = [
        "burndown_c16_sqlite_tasks_per_s",
        "burndown_c16_sqlite_vs_store_ratio",
        "engine_start_to_first_run_us",
    ];
    if wants(&c16) {
        bench_c16_sqlite(&runtime, &mut figures)?;
    }
    for store in [C16Store::SqliteFull, C16Store::Postgres, C16Store::Memory] {
        if wants(&[store.name()]) {
            bench_c16(&runtime, &mut figures, store)?;
        }
    }

    if wants(&["engine_sqlite_tasks_per_s"]) {
        bench_burn_down(&runtime, &mut figures, Backend::Sqlite)?;
    }
    if wants(&["engine_memory_tasks_per_s"]) {
        bench_burn_down(&runtime, &mut figures, Backend::Memory)?;
    }
    if wants(&["engine_postgres_tasks_per_s"]) {
        bench_postgres_burn_down(&runtime, &mut figures)?;
    }
    if wants(&["engine_postgres_sustained_ratio"]) {
        bench_postgres_sustained(&runtime, &mut figures, "engine_postgres_sustained_ratio", 5)?;
    }
    if wants(&["engine_postgres_sustained_10min_ratio"]) {
        bench_postgres_sustained(
            &runtime,
            &mut figures,
            "engine_postgres_sustained_10min_ratio",
            10,
        )?;
    }
    if wants(&["submit_to_start_p50_us", "submit_to_start_p99_us"]) {
        bench_submit_to_start(&runtime, &mut figures)?;
    }
    let large = [
        "sqlite_1m_rss_mb",
        "sqlite_1m_list_page_ms",
        "sqlite_1m_list_sparse_page_ms",
        "sqlite_1m_open_ms",
    ];
    if wants(&large) {
        bench_large_store(&runtime, &mut figures)?;
    }
    if filter.as_deref().is_some_and(|f| f.starts_with("diag")) {
        diagnostics(&runtime, filter.as_deref().unwrap_or_default())?;
    }
    drop(runtime);

    if figures.list.is_empty() {
        eprintln!(
            "no bench matches the filter {filter:?}; the names are burndown_c16_sqlite_tasks_per_s, burndown_c16_sqlite_vs_store_ratio, engine_start_to_first_run_us, burndown_c16_sqlite_full_tasks_per_s, burndown_c16_postgres_one_node_tasks_per_s, burndown_c16_memory_tasks_per_s, engine_sqlite_tasks_per_s, engine_memory_tasks_per_s, engine_postgres_tasks_per_s, engine_postgres_sustained_ratio, engine_postgres_sustained_10min_ratio, submit_to_start_p50_us, submit_to_start_p99_us, {}",
            large.join(", ")
        );
    }
    let path = figures.write()?;
    println!();
    print!("{}", figures.table());
    println!("(written to {})", path.display());
    Ok(())
}

/// Runs a future as a task of the runtime, so that it runs on the 2 worker threads (as the
/// daemon's work would) rather than on this thread, a third one.
fn on_workers<T: Send + 'static>(
    runtime: &Runtime,
    future: impl Future<Output = BenchResult<T>> + Send + 'static,
) -> BenchResult<T> {
    runtime.block_on(runtime.spawn(future))?
}

fn runtime() -> BenchResult<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------------
// Burn-down throughput.

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Memory,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "engine_sqlite_tasks_per_s",
            Backend::Memory => "engine_memory_tasks_per_s",
        }
    }

    fn target(self) -> Target {
        match self {
            Backend::Sqlite => Target::AtLeast(50_000.0),
            Backend::Memory => Target::AtLeast(500_000.0),
        }
    }
}

fn bench_burn_down(runtime: &Runtime, figures: &mut Figures, backend: Backend) -> BenchResult<()> {
    let mut rates = Vec::with_capacity(BURN_RUNS);
    for run in 1..=BURN_RUNS {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> = match backend {
            Backend::Sqlite => Arc::new(SqliteStore::open(SqliteConfig::new(
                dir.path().join("burn.sqlite3"),
            ))?),
            Backend::Memory => Arc::new(MemoryStore::new()),
        };
        let report = on_workers(runtime, burn_down(store))?;
        let rate = BURN_TASKS as f64 / report.run.as_secs_f64();
        println!(
            "  {} run {run}: {BURN_TASKS} tasks in {:.3} s = {rate:.0} tasks/s (submitting them took {:.3} s = {:.0} tasks/s)",
            backend.name(),
            report.run.as_secs_f64(),
            report.submit.as_secs_f64(),
            BURN_TASKS as f64 / report.submit.as_secs_f64(),
        );
        rates.push(rate);
    }
    figures.add(backend.name(), rates, "tasks/s", 0, backend.target());
    Ok(())
}

struct BurnDown {
    submit: Duration,
    run: Duration,
}

async fn burn_down(store: Arc<dyn Store>) -> BenchResult<BurnDown> {
    let engine = Engine::builder(store)
        .handler(
            NOOP,
            handler_fn(|_ctx| async { Ok::<_, TaskFailure>(Value::Null) }),
        )
        .config(EngineConfig {
            concurrency: BURN_CONCURRENCY,
            ..EngineConfig::default()
        })
        .build()
        .await?;
    engine.pause_queue();
    let submit_started = Instant::now();
    for _ in 0..BURN_TASKS / SUBMIT_BATCH {
        let batch = (0..SUBMIT_BATCH)
            .map(|_| NewTask::new(NOOP, Value::Null))
            .collect();
        engine.submit_many(batch).await?;
    }
    let submit = submit_started.elapsed();

    // No event subscriber during the run: a subscriber is a consumer task of its own that
    // competes for the two cores. Completion is watched through the store's counts instead.
    let loops = engine.start();
    let started = Instant::now();
    engine.resume_queue();
    wait_until_completed(&engine, BURN_TASKS as u64).await?;
    let run = started.elapsed();

    let stats = engine.stats().await?;
    if stats.count(Status::Completed) != BURN_TASKS as u64 || stats.total() != BURN_TASKS as u64 {
        return Err(format!(
            "the burn-down ended with unexpected counts: {:?}",
            stats.by_status
        )
        .into());
    }
    engine.shutdown(Duration::from_secs(10)).await;
    loops.stop().await;
    Ok(BurnDown { submit, run })
}

/// Waits until the store counts `expected` completed tasks, looking every millisecond.
async fn wait_until_completed(engine: &Engine, expected: u64) -> BenchResult<()> {
    let give_up = Instant::now() + Duration::from_secs(600);
    while engine.stats().await?.count(Status::Completed) < expected {
        if Instant::now() > give_up {
            return Err("the burn-down did not finish within 600 s".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The C=16 burn-down: one process, a pool of 16, tasks queued before the engine starts.

/// Tasks in each C=16 burn-down.
const C16_TASKS: usize = 20_000;
/// The engine's concurrency in the C=16 burn-downs.
const C16_CONCURRENCY: usize = 16;
/// The batches the store-alone run tries (its best is the ratio's denominator).
const C16_STORE_BATCHES: [usize; 4] = [16, 64, 256, 1_000];

/// The stores of the C=16 burn-downs.
#[derive(Clone, Copy)]
enum C16Store {
    Sqlite,
    SqliteFull,
    Postgres,
    Memory,
}

impl C16Store {
    fn name(self) -> &'static str {
        match self {
            C16Store::Sqlite => "burndown_c16_sqlite_tasks_per_s",
            C16Store::SqliteFull => "burndown_c16_sqlite_full_tasks_per_s",
            C16Store::Postgres => "burndown_c16_postgres_one_node_tasks_per_s",
            C16Store::Memory => "burndown_c16_memory_tasks_per_s",
        }
    }

    fn target(self) -> Target {
        Target::AtLeast(match self {
            C16Store::Sqlite => 45_000.0,
            C16Store::SqliteFull => 25_000.0,
            C16Store::Postgres => 13_000.0,
            C16Store::Memory => 400_000.0,
        })
    }
}

/// One C=16 run: tasks per second, and from `Engine::start` to the first handler call.
struct C16Run {
    rate: f64,
    first_run: Duration,
}

/// The burn-downs of one store (3 runs, the median).
fn bench_c16(runtime: &Runtime, figures: &mut Figures, store: C16Store) -> BenchResult<()> {
    let rates = c16_runs(runtime, store)?
        .into_iter()
        .map(|run| run.rate)
        .collect();
    figures.add(store.name(), rates, "tasks/s", 0, store.target());
    Ok(())
}

/// The SQLite (NORMAL) burn-downs, the store alone in the same run, and the start-to-first-run
/// times of the burn-downs. Each burn-down is followed by the store alone at each batch size,
/// and its ratio is to the best of those: the two terms of a ratio are measured a few seconds
/// apart, so that a host that slows down or speeds up during the bench moves both.
fn bench_c16_sqlite(runtime: &Runtime, figures: &mut Figures) -> BenchResult<()> {
    let mut rates = Vec::with_capacity(BURN_RUNS);
    let mut firsts = Vec::with_capacity(BURN_RUNS);
    let mut ratios = Vec::with_capacity(BURN_RUNS);
    for number in 1..=BURN_RUNS {
        let run = c16_run(runtime, C16Store::Sqlite, number)?;
        let mut best = 0.0f64;
        for batch in C16_STORE_BATCHES {
            let rate = runtime.block_on(store_alone(C16_TASKS, batch))?;
            println!(
                "  the SQLite store alone, claims of {batch} finished concurrently: {rate:.0} tasks/s"
            );
            best = best.max(rate);
        }
        println!(
            "  run {number}: the burn-down over the store's best: {:.2}",
            run.rate / best
        );
        rates.push(run.rate);
        firsts.push(run.first_run.as_secs_f64() * 1e6);
        ratios.push(run.rate / best);
    }
    figures.add(
        C16Store::Sqlite.name(),
        rates,
        "tasks/s",
        0,
        C16Store::Sqlite.target(),
    );
    figures.add(
        "burndown_c16_sqlite_vs_store_ratio",
        ratios,
        "",
        2,
        Target::AtLeast(0.75),
    );
    figures.add(
        "engine_start_to_first_run_us",
        firsts,
        "µs",
        0,
        Target::AtMost(2_000.0),
    );
    Ok(())
}

fn c16_runs(runtime: &Runtime, kind: C16Store) -> BenchResult<Vec<C16Run>> {
    (1..=BURN_RUNS)
        .map(|number| c16_run(runtime, kind, number))
        .collect()
}

/// C=16 run number `number` on a fresh store of `kind`.
fn c16_run(runtime: &Runtime, kind: C16Store, number: usize) -> BenchResult<C16Run> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("c16.sqlite3");
    let url = pg_url();
    let schema = pg_schema();
    let run = on_workers(runtime, {
        let (url, schema) = (url.clone(), schema.clone());
        async move {
            let (store, pg): (Arc<dyn Store>, Option<Arc<PostgresStore>>) = match kind {
                C16Store::Sqlite => (Arc::new(SqliteStore::open(SqliteConfig::new(path))?), None),
                C16Store::SqliteFull => (
                    Arc::new(SqliteStore::open(SqliteConfig {
                        synchronous: Synchronous::Full,
                        ..SqliteConfig::new(path)
                    })?),
                    None,
                ),
                C16Store::Memory => (Arc::new(MemoryStore::new()), None),
                C16Store::Postgres => {
                    let store = Arc::new(
                        PostgresStore::connect(PostgresConfig {
                            schema: schema.clone(),
                            ..PostgresConfig::new(&url, "c16")
                        })
                        .await
                        .map_err(|e| format!("cannot open the PostgreSQL store at {url}: {e}"))?,
                    );
                    (Arc::clone(&store) as Arc<dyn Store>, Some(store))
                }
            };
            let run = c16_burn_down(store, pg.clone()).await;
            if let Some(store) = pg {
                if let Ok(store) = Arc::try_unwrap(store) {
                    store.close().await;
                }
                pg_drop_schema(&url, &schema).await?;
            }
            run
        }
    })?;
    println!(
        "  {} run {number}: {C16_TASKS} tasks at concurrency {C16_CONCURRENCY}: {:.0} tasks/s; first handler call {:.0} µs after Engine::start",
        kind.name(),
        run.rate,
        run.first_run.as_secs_f64() * 1e6,
    );
    Ok(run)
}

/// Puts [`C16_TASKS`] no-op tasks in `store`, builds an engine of concurrency 16 on it, and times
/// it from `Engine::start` until the store counts them all completed.
async fn c16_burn_down(
    store: Arc<dyn Store>,
    postgres: Option<Arc<PostgresStore>>,
) -> BenchResult<C16Run> {
    queue_noops(&*store, C16_TASKS).await?;
    store.flush().await?;
    let first_call: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let mut config = EngineConfig {
        concurrency: C16_CONCURRENCY,
        ..EngineConfig::default()
    };
    if postgres.is_some() {
        config = PostgresStore::engine_config(config);
    }
    let engine = Engine::builder(Arc::clone(&store))
        .handler(
            NOOP,
            handler_fn({
                let first_call = Arc::clone(&first_call);
                move |_ctx| {
                    first_call.get_or_init(Instant::now);
                    async { Ok::<_, TaskFailure>(Value::Null) }
                }
            }),
        )
        .config(config)
        .build()
        .await?;

    let started = Instant::now();
    let loops = engine.start();
    let cancel = CancellationToken::new();
    let wakeups = postgres.as_ref().map(|store| {
        let (store, engine, cancel) = (Arc::clone(store), engine.clone(), cancel.clone());
        tokio::spawn(async move {
            let _ = store.run_wakeups(&engine, cancel).await;
        })
    });
    wait_until_completed(&engine, C16_TASKS as u64).await?;
    let run = started.elapsed();
    let first_run = first_call
        .get()
        .map(|at| at.duration_since(started))
        .ok_or("no handler ran")?;

    let stats = engine.stats().await?;
    engine.shutdown(Duration::from_secs(10)).await;
    loops.stop().await;
    cancel.cancel();
    if let Some(wakeups) = wakeups {
        let _ = wakeups.await;
    }
    if stats.count(Status::Completed) != C16_TASKS as u64 || stats.total() != C16_TASKS as u64 {
        return Err(format!(
            "the C=16 burn-down ended with unexpected counts: {:?}",
            stats.by_status
        )
        .into());
    }
    Ok(C16Run {
        rate: C16_TASKS as f64 / run.as_secs_f64(),
        first_run,
    })
}

/// The SQLite store (NORMAL) alone, with no engine: `n` no-op tasks submitted, then claimed
/// `batch` at a time, each batch finished concurrently (as `diag_store`); claims and finishes
/// per second.
async fn store_alone(n: usize, batch: usize) -> BenchResult<f64> {
    let dir = tempfile::tempdir()?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(
        dir.path().join("alone.sqlite3"),
    ))?);
    queue_noops(&*store, n).await?;
    store.flush().await?;
    let run = claim_and_finish(store, batch).await?;
    if run.finished != n {
        return Err(format!("the store alone finished {} of {n} tasks", run.finished).into());
    }
    Ok(n as f64 / (run.claim + run.finish).as_secs_f64())
}

/// Puts `n` queued no-op tasks in `store`, [`SUBMIT_BATCH`] per write.
async fn queue_noops(store: &dyn Store, n: usize) -> BenchResult<()> {
    for _ in 0..n / SUBMIT_BATCH {
        let now = Timestamp::now();
        let tasks = (0..SUBMIT_BATCH)
            .map(|_| NewTask::new(NOOP, Value::Null).into_task(TaskId::new(), now))
            .collect();
        store.submit(tasks).await?;
    }
    Ok(())
}

/// What [`claim_and_finish`] took: the time in claims, in finishes, and the tasks finished.
struct StoreRun {
    claim: Duration,
    finish: Duration,
    finished: usize,
}

/// Claims `batch` tasks at a time from `store`, with no engine, and finishes each batch
/// concurrently, until nothing is left to claim.
async fn claim_and_finish(store: Arc<dyn Store>, batch: usize) -> BenchResult<StoreRun> {
    let mut run = StoreRun {
        claim: Duration::ZERO,
        finish: Duration::ZERO,
        finished: 0,
    };
    loop {
        let now = Timestamp::now();
        let started = Instant::now();
        let claimed = store
            .claim(ClaimRequest {
                max: batch,
                now,
                lease_until: now.after(Duration::from_secs(600)),
                exclude_types: Vec::new(),
                type_room: Vec::new(),
            })
            .await?;
        run.claim += started.elapsed();
        if claimed.is_empty() {
            return Ok(run);
        }
        let started = Instant::now();
        let mut set = JoinSet::new();
        for task in claimed {
            let store = Arc::clone(&store);
            let finish = Finish {
                id: task.id,
                attempt: task.attempt,
                now,
                outcome: Outcome::Completed {
                    result: Value::Null,
                },
            };
            set.spawn(async move { store.finish(finish).await });
        }
        while let Some(joined) = set.join_next().await {
            run.finished += usize::from(joined??);
        }
        run.finish += started.elapsed();
    }
}

/// A fixed single-thread integer workload (a xorshift walk over a 4 MiB table, 50 million
/// steps), in milliseconds: the host's speed, printed beside the figures.
fn host_cpu_probe_ms() -> f64 {
    let mut table = vec![0u64; 1 << 19];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let started = Instant::now();
    for _ in 0..50_000_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let slot = (x as usize) & (table.len() - 1);
        table[slot] = table[slot].wrapping_add(x);
    }
    let elapsed = started.elapsed();
    std::hint::black_box(&table);
    elapsed.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: two nodes on one queue.

/// The database of the PostgreSQL benches (each run makes a schema of its own and drops it).
const PG_URL_ENV: &str = "MSB_TEST_DATABASE_URL";
/// The database when [`PG_URL_ENV`] is not set: the one these machines run.
const PG_DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
/// Overrides the length of the sustained run (seconds; five equal windows).
const PG_SUSTAINED_ENV: &str = "MSBD_BENCH_PG_SUSTAINED_SECS";
/// Set to 1: the sustained runs load one core of the machine for their whole length (a thread
/// of this process that spins), as a busy host would, and their figures are named
/// `…_one_core_busy`.
const BUSY_CORE_ENV: &str = "MSBD_BENCH_BUSY_CORE";
/// The nodes sharing the queue.
const PG_NODES: usize = 2;
/// Each node's concurrency.
const PG_CONCURRENCY: usize = 64;
/// In the sustained run, the producer keeps about this many tasks queued.
const PG_BACKLOG: u64 = 20_000;

fn pg_url() -> String {
    std::env::var(PG_URL_ENV).unwrap_or_else(|_| PG_DEFAULT_URL.to_owned())
}

/// A schema name of one run.
fn pg_schema() -> String {
    let id = TaskId::new().to_string().replace('-', "");
    format!("bench_{}", &id[id.len() - 12..])
}

/// A plain connection for the bench's own statements.
async fn pg_admin(url: &str) -> BenchResult<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| {
            format!(
                "cannot reach PostgreSQL at {url} ({e}): start it (`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`) or set {PG_URL_ENV}"
            )
        })?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// One node: its store, its engine, and once started, its loops and `NOTIFY` forwarder.
struct PgNode {
    store: Arc<PostgresStore>,
    engine: Engine,
    running: Option<(task_core::EngineLoops, CancellationToken, JoinHandle<()>)>,
}

impl PgNode {
    /// Connects node `name` to `schema` with a no-op handler that counts its calls in `handled`;
    /// the node's queue starts paused.
    async fn open(
        url: &str,
        schema: &str,
        name: &str,
        handled: Arc<AtomicU64>,
    ) -> BenchResult<PgNode> {
        let store = Arc::new(
            PostgresStore::connect(PostgresConfig {
                schema: schema.to_owned(),
                ..PostgresConfig::new(url, name)
            })
            .await
            .map_err(|e| format!("cannot open the PostgreSQL store at {url}: {e}"))?,
        );
        let engine = Engine::builder(Arc::clone(&store) as Arc<dyn Store>)
            .handler(
                NOOP,
                handler_fn(move |_ctx| {
                    handled.fetch_add(1, Ordering::Relaxed);
                    async { Ok::<_, TaskFailure>(Value::Null) }
                }),
            )
            .config(PostgresStore::engine_config(EngineConfig {
                concurrency: PG_CONCURRENCY,
                ..EngineConfig::default()
            }))
            .build()
            .await?;
        engine.pause_queue();
        Ok(PgNode {
            store,
            engine,
            running: None,
        })
    }

    fn start(&mut self) {
        let loops = self.engine.start();
        let cancel = CancellationToken::new();
        let forward = tokio::spawn({
            let (store, engine, cancel) =
                (Arc::clone(&self.store), self.engine.clone(), cancel.clone());
            async move {
                let _ = store.run_wakeups(&engine, cancel).await;
            }
        });
        self.running = Some((loops, cancel, forward));
        self.engine.resume_queue();
    }

    async fn stop(self) {
        self.engine.shutdown(Duration::from_secs(10)).await;
        if let Some((loops, cancel, forward)) = self.running {
            loops.stop().await;
            cancel.cancel();
            let _ = forward.await;
        }
        drop(self.engine);
        if let Ok(store) = Arc::try_unwrap(self.store) {
            store.close().await;
        }
    }
}

/// Opens the nodes of one run on a fresh schema.
async fn pg_nodes(url: &str, schema: &str, handled: &Arc<AtomicU64>) -> BenchResult<Vec<PgNode>> {
    let mut nodes = Vec::with_capacity(PG_NODES);
    for index in 0..PG_NODES {
        nodes
            .push(PgNode::open(url, schema, &format!("bench-{index}"), Arc::clone(handled)).await?);
    }
    Ok(nodes)
}

async fn pg_drop_schema(url: &str, schema: &str) -> BenchResult<()> {
    pg_admin(url)
        .await?
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await?;
    Ok(())
}

/// `engine_postgres_tasks_per_s`: the burn-down of [`BURN_TASKS`] no-op tasks by two nodes, all
/// submitted first (half through each node) with both queues paused; median of 3 runs.
fn bench_postgres_burn_down(runtime: &Runtime, figures: &mut Figures) -> BenchResult<()> {
    let url = pg_url();
    let mut rates = Vec::with_capacity(BURN_RUNS);
    for run in 1..=BURN_RUNS {
        let schema = pg_schema();
        let report = on_workers(runtime, {
            let (url, schema) = (url.clone(), schema.clone());
            async move {
                let report = postgres_burn_down(&url, &schema).await;
                pg_drop_schema(&url, &schema).await?;
                report
            }
        })?;
        let rate = BURN_TASKS as f64 / report.run.as_secs_f64();
        println!(
            "  engine_postgres_tasks_per_s run {run}: {BURN_TASKS} tasks on {PG_NODES} nodes in {:.3} s = {rate:.0} tasks/s (submitting them took {:.3} s = {:.0} tasks/s)",
            report.run.as_secs_f64(),
            report.submit.as_secs_f64(),
            BURN_TASKS as f64 / report.submit.as_secs_f64(),
        );
        rates.push(rate);
    }
    figures.add(
        "engine_postgres_tasks_per_s",
        rates,
        "tasks/s",
        0,
        Target::AtLeast(15_000.0),
    );
    Ok(())
}

async fn postgres_burn_down(url: &str, schema: &str) -> BenchResult<BurnDown> {
    let handled = Arc::new(AtomicU64::new(0));
    let mut nodes = pg_nodes(url, schema, &handled).await?;
    let submit_started = Instant::now();
    for batch_index in 0..BURN_TASKS / SUBMIT_BATCH {
        let batch = (0..SUBMIT_BATCH)
            .map(|_| NewTask::new(NOOP, Value::Null))
            .collect();
        nodes[batch_index % PG_NODES]
            .engine
            .submit_many(batch)
            .await?;
    }
    let submit = submit_started.elapsed();

    let started = Instant::now();
    for node in &mut nodes {
        node.start();
    }
    // Looking every 5 ms: each look is a query (of the per-node counters table, not the tasks).
    let give_up = Instant::now() + Duration::from_secs(600);
    while nodes[0].engine.stats().await?.count(Status::Completed) < BURN_TASKS as u64 {
        if Instant::now() > give_up {
            return Err("the PostgreSQL burn-down did not finish within 600 s".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let run = started.elapsed();

    let stats = nodes[0].engine.stats().await?;
    let handled = handled.load(Ordering::Relaxed);
    for node in nodes {
        node.stop().await;
    }
    if stats.count(Status::Completed) != BURN_TASKS as u64
        || stats.total() != BURN_TASKS as u64
        || handled != BURN_TASKS as u64
    {
        return Err(format!(
            "the PostgreSQL burn-down ended with unexpected counts: {:?}, {handled} handler calls",
            stats.by_status
        )
        .into());
    }
    Ok(BurnDown { submit, run })
}

/// Deadlocks PostgreSQL detected in the current database so far (each stalls its transactions
/// for `deadlock_timeout`).
async fn pg_deadlocks(admin: &tokio_postgres::Client) -> BenchResult<i64> {
    Ok(admin
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await?
        .get(0))
}

/// `engine_postgres_sustained_ratio`: two nodes run no-op tasks for 5 minutes (or
/// `MSBD_BENCH_PG_SUSTAINED_SECS`) while a producer keeps about [`PG_BACKLOG`] queued; the
/// figure is the throughput of the last fifth over the first. Finished tasks are all kept (the
/// default retention is 7 days; in `tasks_done` since schema version 5, so the window lines'
/// "tasks table" counts only the unfinished ones) and every task leaves dead row versions
/// behind, so this is where bloat would show.
///
/// With `windows` 10 it is `engine_postgres_sustained_10min_ratio`: ten windows of a minute
/// (or a tenth of twice `MSBD_BENCH_PG_SUSTAINED_SECS`), the tenth over the first, every finished
/// task kept (the retention is 7 days).
fn bench_postgres_sustained(
    runtime: &Runtime,
    figures: &mut Figures,
    name: &'static str,
    windows: usize,
) -> BenchResult<()> {
    let url = pg_url();
    let five =
        match std::env::var(PG_SUSTAINED_ENV) {
            Ok(secs) => Duration::from_secs(secs.parse().map_err(|e| {
                format!("{PG_SUSTAINED_ENV}={secs:?} is not a number of seconds: {e}")
            })?),
            Err(_) => Duration::from_secs(300),
        };
    let window = five / 5;
    let busy = match std::env::var(BUSY_CORE_ENV).as_deref() {
        Ok("1") => Some(BusyCore::start()),
        Ok("0") | Err(_) => None,
        Ok(other) => return Err(format!("{BUSY_CORE_ENV}={other:?}: expected 1 or 0").into()),
    };
    let name = match (&busy, name) {
        (None, name) => name,
        (Some(_), "engine_postgres_sustained_ratio") => {
            "engine_postgres_sustained_ratio_one_core_busy"
        }
        (Some(_), _) => "engine_postgres_sustained_10min_ratio_one_core_busy",
    };
    if busy.is_some() {
        println!("  {name}: a thread spins on one core for the whole run ({BUSY_CORE_ENV}=1)");
    }
    let schema = pg_schema();
    let rates = on_workers(runtime, {
        let schema = schema.clone();
        async move {
            let rates = postgres_sustained(&url, &schema, window, windows).await;
            pg_drop_schema(&url, &schema).await?;
            rates
        }
    })?;
    drop(busy);
    let first = rates[0];
    let last = rates[rates.len() - 1];
    figures.add(name, vec![last / first], "", 2, Target::AtLeast(0.8));
    Ok(())
}

/// A thread that keeps one core busy until dropped (see [`BUSY_CORE_ENV`]).
struct BusyCore {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BusyCore {
    fn start() -> BusyCore {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = Arc::clone(&stop);
            move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                }
            }
        });
        BusyCore {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for BusyCore {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Runs `count` windows of `window` and returns the tasks/s of each.
async fn postgres_sustained(
    url: &str,
    schema: &str,
    window: Duration,
    count: usize,
) -> BenchResult<Vec<f64>> {
    let handled = Arc::new(AtomicU64::new(0));
    let mut nodes = pg_nodes(url, schema, &handled).await?;
    let admin = pg_admin(url).await?;
    let engines: Vec<Engine> = nodes.iter().map(|node| node.engine.clone()).collect();
    let stop = CancellationToken::new();
    let producer = tokio::spawn({
        let (handled, stop) = (Arc::clone(&handled), stop.clone());
        async move {
            let mut submitted = 0u64;
            let mut turn = 0;
            while !stop.is_cancelled() {
                if submitted.saturating_sub(handled.load(Ordering::Relaxed)) < PG_BACKLOG {
                    let batch = (0..SUBMIT_BATCH)
                        .map(|_| NewTask::new(NOOP, Value::Null))
                        .collect();
                    engines[turn % engines.len()].submit_many(batch).await?;
                    submitted += SUBMIT_BATCH as u64;
                    turn += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            BenchResult::Ok(submitted)
        }
    });
    // Let the producer fill the backlog before the clock starts.
    while nodes[0].engine.stats().await?.count(Status::Queued) < PG_BACKLOG {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for node in &mut nodes {
        node.start();
    }
    let deadlocks_before = pg_deadlocks(&admin).await?;
    let mut rates = Vec::with_capacity(count);
    let mut window_start = (Instant::now(), handled.load(Ordering::Relaxed));
    for index in 1..=count {
        tokio::time::sleep_until((window_start.0 + window).into()).await;
        let now = (Instant::now(), handled.load(Ordering::Relaxed));
        let rate = (now.1 - window_start.1) as f64 / (now.0 - window_start.0).as_secs_f64();
        let (live, dead) = admin
            .query_opt(
                "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'tasks'",
                &[&schema],
            )
            .await?
            .map(|row| (row.get::<_, i64>(0), row.get::<_, i64>(1)))
            .unwrap_or_default();
        println!(
            "  engine_postgres_sustained window {index}/{count} ({:.0} s): {rate:.0} tasks/s; tasks table: {live} live rows, {dead} dead",
            window.as_secs_f64()
        );
        rates.push(rate);
        window_start = now;
    }
    stop.cancel();
    let deadlocks_after = pg_deadlocks(&admin).await?;
    let submitted = producer.await??;
    for node in nodes {
        node.stop().await;
    }
    println!(
        "  engine_postgres_sustained: {submitted} submitted, {} handled in {:.0} s; {} deadlocks in the database meanwhile",
        handled.load(Ordering::Relaxed),
        window.as_secs_f64() * count as f64,
        deadlocks_after - deadlocks_before
    );
    Ok(rates)
}

// ---------------------------------------------------------------------------------------------
// Submit-to-start latency.

fn bench_submit_to_start(runtime: &Runtime, figures: &mut Figures) -> BenchResult<()> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(SqliteConfig::new(dir.path().join("latency.sqlite3")))?;
    let (mut to_start, mut to_done) = on_workers(runtime, submit_to_start(Arc::new(store)))?;
    to_start.sort_unstable();
    to_done.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "  submit_to_start over {LATENCY_SAMPLES} samples: min {:.0} µs, p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs",
        us(to_start[0]),
        us(percentile(&to_start, 50.0)),
        us(percentile(&to_start, 90.0)),
        us(percentile(&to_start, 99.0)),
        us(percentile(&to_start, 99.9)),
        us(to_start[to_start.len() - 1]),
    );
    println!(
        "  submit to `wait` returning the completed task: p50 {:.0} µs, p99 {:.0} µs",
        us(percentile(&to_done, 50.0)),
        us(percentile(&to_done, 99.0)),
    );
    figures.add(
        "submit_to_start_p50_us",
        vec![us(percentile(&to_start, 50.0))],
        "µs",
        1,
        Target::AtMost(200.0),
    );
    figures.add(
        "submit_to_start_p99_us",
        vec![us(percentile(&to_start, 99.0))],
        "µs",
        1,
        Target::AtMost(2_000.0),
    );
    // The same on the memory store: the engine's own part of the latency, without SQLite's
    // commits and thread hops.
    let (mut to_start, _) = on_workers(runtime, submit_to_start(Arc::new(MemoryStore::new())))?;
    to_start.sort_unstable();
    println!(
        "  on the memory store: p50 {:.0} µs, p99 {:.0} µs",
        us(percentile(&to_start, 50.0)),
        us(percentile(&to_start, 99.0)),
    );
    Ok(())
}

/// Submits one task at a time to an idle engine and waits for it to complete. Returns, per kept
/// sample, the time from just before `submit` to the handler's start, and to `wait` returning.
async fn submit_to_start(store: Arc<dyn Store>) -> BenchResult<(Vec<Duration>, Vec<Duration>)> {
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let engine = Engine::builder(store)
        .handler(
            NOOP,
            handler_fn(move |_ctx| {
                let _ = started_tx.send(Instant::now());
                async { Ok::<_, TaskFailure>(Value::Null) }
            }),
        )
        .build()
        .await?;
    let loops = engine.start();
    let mut to_start = Vec::with_capacity(LATENCY_SAMPLES);
    let mut to_done = Vec::with_capacity(LATENCY_SAMPLES);
    for sample in 0..LATENCY_WARMUP + LATENCY_SAMPLES {
        let before = Instant::now();
        let id = engine
            .submit(NewTask::new(NOOP, Value::Null))
            .await?
            .task
            .id;
        let started = started_rx
            .recv()
            .await
            .ok_or("the handler's channel closed")?;
        let done = engine.wait(id, Duration::from_secs(10)).await?;
        let finished = Instant::now();
        if done.status != Status::Completed {
            return Err(format!("task {id} ended {} instead of completed", done.status).into());
        }
        if sample >= LATENCY_WARMUP {
            to_start.push(started.saturating_duration_since(before));
            to_done.push(finished.saturating_duration_since(before));
        }
    }
    engine.shutdown(Duration::from_secs(10)).await;
    loops.stop().await;
    Ok((to_start, to_done))
}

/// The nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------------------------
// A store file with 1,000,000 finished tasks.

fn bench_large_store(runtime: &Runtime, figures: &mut Figures) -> BenchResult<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("retained.sqlite3");

    let started = Instant::now();
    let (submitted, finished) = on_workers(runtime, build_retained(path.clone()))?;
    let db_bytes = std::fs::metadata(&path)?.len();
    println!(
        "  built {RETAINED} finished tasks in {:.1} s (submit {:.1} s, claim + finish {:.1} s); file {:.0} MB = {:.0} bytes a task",
        started.elapsed().as_secs_f64(),
        submitted.as_secs_f64(),
        finished.as_secs_f64(),
        db_bytes as f64 / 1e6,
        db_bytes as f64 / RETAINED as f64,
    );

    // RSS: measured in a child process (this same program, told so by an environment variable)
    // that does nothing but open the file as msbd would (store + engine, which runs recovery),
    // list one page and read the stats. So it counts: the program's resident code and data, the
    // Tokio runtime and its 2 worker threads, the store's writer and reader threads with their
    // SQLite connections (and whatever of their page caches was filled: the writer's is up to
    // 32 MiB, the reader's 8 MiB; counting tasks at open reads a whole index), the counts kept in
    // memory, and the page of 50 tasks. It does not count this process's own allocations from
    // building the file, which glibc would not have returned to the system anyway.
    let probe = Command::new(std::env::current_exe()?)
        .env(RSS_PROBE_ENV, &path)
        .output()?;
    let stdout = String::from_utf8_lossy(&probe.stdout);
    if !probe.status.success() {
        return Err(format!(
            "the RSS probe failed ({}): {stdout}{}",
            probe.status,
            String::from_utf8_lossy(&probe.stderr)
        )
        .into());
    }
    let probe_value = |key: &str| -> BenchResult<f64> {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(RSS_PROBE_PREFIX)?.strip_prefix(key))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("the RSS probe said no `{key}`: {stdout}").into())
    };
    let baseline_mb = probe_value("baseline:")? / 1024.0;
    let rss_mb = probe_value("after:")? / 1024.0;
    println!(
        "  sqlite_1m_rss_mb: {rss_mb:.1} MB in a fresh process after open + engine build + list + stats ({baseline_mb:.1} MB before opening the store)"
    );
    figures.add(
        "sqlite_1m_rss_mb",
        vec![rss_mb],
        "MB",
        1,
        Target::AtMost(100.0),
    );

    // Open: the store and an engine on it (whose build runs recovery), dropped in between.
    let mut opens = Vec::with_capacity(OPEN_RUNS);
    for run in 1..=OPEN_RUNS {
        let (open, build) = runtime.block_on(open_once(&path))?;
        let total = open + build;
        println!(
            "  sqlite_1m_open_ms run {run}: {:.1} ms (SqliteStore::open {:.1} ms, Engine build {:.1} ms)",
            ms(total),
            ms(open),
            ms(build),
        );
        opens.push(ms(total));
    }
    figures.add("sqlite_1m_open_ms", opens, "ms", 2, Target::AtMost(1_000.0));

    // Listings.
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(&path))?);
    let listings = on_workers(runtime, time_listings(Arc::clone(&store)))?;
    drop(store);
    let [first, second, sparse, empty] = listings;
    println!(
        "  sqlite_1m_list_page_ms: completed, first page of 50 {:.3} ms, second page {:.3} ms (medians of {LIST_REPEATS})",
        first.0, second.0
    );
    println!(
        "  sqlite_1m_list_sparse_page_ms: failed (1 task in {FAIL_EVERY}), first page of 50 {:.3} ms; cancelled (no task) {:.3} ms",
        sparse.0, empty.0
    );
    // The slower of the two pages (their medians) is the figure.
    figures.add(
        "sqlite_1m_list_page_ms",
        vec![first.0.max(second.0)],
        "ms",
        3,
        Target::AtMost(5.0),
    );
    figures.add(
        "sqlite_1m_list_sparse_page_ms",
        vec![sparse.0],
        "ms",
        3,
        Target::AtMost(5.0),
    );
    Ok(())
}

/// Builds the file: submits [`RETAINED`] tasks through [`Store::submit`] in batches, then claims
/// them in batches and finishes each (one in [`FAIL_EVERY`] as failed), the finishes of a batch
/// in flight together so that the writer commits them in groups. Returns the two phases' times.
async fn build_retained(path: PathBuf) -> BenchResult<(Duration, Duration)> {
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(path))?);
    let started = Instant::now();
    for batch in 0..RETAINED / SUBMIT_BATCH {
        let now = Timestamp::now();
        let tasks = (0..SUBMIT_BATCH)
            .map(|i| {
                NewTask::new(NOOP, json!({ "n": batch * SUBMIT_BATCH + i }))
                    .into_task(TaskId::new(), now)
            })
            .collect();
        store.submit(tasks).await?;
    }
    let submitted = started.elapsed();

    let started = Instant::now();
    let mut finished = 0usize;
    loop {
        let now = Timestamp::now();
        let claimed = store
            .claim(ClaimRequest {
                max: SUBMIT_BATCH,
                now,
                lease_until: now.after(Duration::from_secs(3_600)),
                exclude_types: Vec::new(),
                type_room: Vec::new(),
            })
            .await?;
        if claimed.is_empty() {
            break;
        }
        let mut finishes = JoinSet::new();
        for task in claimed {
            let outcome = if finished.is_multiple_of(FAIL_EVERY) {
                Outcome::Failed {
                    error: TaskError {
                        kind: FailureKind::Error,
                        message: "bench failure".into(),
                    },
                    retry_at: None,
                    result: None,
                }
            } else {
                Outcome::Completed {
                    result: json!({ "ok": true }),
                }
            };
            finished += 1;
            let store = Arc::clone(&store);
            let finish = Finish {
                id: task.id,
                attempt: task.attempt,
                now: Timestamp::now(),
                outcome,
            };
            finishes.spawn(async move { store.finish(finish).await });
        }
        while let Some(joined) = finishes.join_next().await {
            if !joined?? {
                return Err("a finish of the bench's own claim was fenced out".into());
            }
        }
    }
    let stats = store.stats().await?;
    if finished != RETAINED
        || stats.count(Status::Completed) + stats.count(Status::Failed) != RETAINED as u64
    {
        return Err(format!(
            "building the file went wrong: {finished} finished, {:?}",
            stats.by_status
        )
        .into());
    }
    store.flush().await?;
    // Close the file (the store's threads stop when its last handle goes).
    let store = Arc::try_unwrap(store).map_err(|_| "the store is still shared")?;
    drop(store);
    Ok((submitted, started.elapsed()))
}

/// Opens the store and builds an engine on it; returns the two times. Both are dropped before
/// returning, which closes the file.
async fn open_once(path: &Path) -> BenchResult<(Duration, Duration)> {
    let started = Instant::now();
    let store = SqliteStore::open(SqliteConfig::new(path))?;
    let opened = started.elapsed();
    let engine = engine_on(Arc::new(store)).await?;
    let built = started.elapsed() - opened;
    drop(engine);
    Ok((opened, built))
}

async fn engine_on(store: Arc<dyn Store>) -> BenchResult<Engine> {
    Ok(Engine::builder(store)
        .handler(
            NOOP,
            handler_fn(|_ctx| async { Ok::<_, TaskFailure>(Value::Null) }),
        )
        .build()
        .await?)
}

/// Times, as medians in ms: the first page of completed tasks, the second page (via the first's
/// cursor), the first page of failed tasks (sparse), and of cancelled tasks (none).
async fn time_listings(store: Arc<SqliteStore>) -> BenchResult<[(f64, usize); 4]> {
    let by_status = |status: Status| ListFilter {
        statuses: vec![status],
        ..ListFilter::default()
    };
    let first_page = store
        .list(by_status(Status::Completed), PageRequest::first(50))
        .await?;
    let cursor = first_page
        .next_cursor
        .ok_or("the first page of completed tasks has no next page")?;
    let requests = [
        (by_status(Status::Completed), PageRequest::first(50)),
        (
            by_status(Status::Completed),
            PageRequest {
                cursor: Some(cursor),
                limit: 50,
            },
        ),
        (by_status(Status::Failed), PageRequest::first(50)),
        (by_status(Status::Cancelled), PageRequest::first(50)),
    ];
    let mut out = [(0.0, 0); 4];
    for (slot, (filter, page)) in out.iter_mut().zip(requests) {
        let mut times = Vec::with_capacity(LIST_REPEATS);
        let mut found = 0;
        for _ in 0..LIST_REPEATS {
            let started = Instant::now();
            let Page { tasks, .. } = store.list(filter.clone(), page.clone()).await?;
            times.push(ms(started.elapsed()));
            found = tasks.len();
            if tasks.iter().any(|task| !filter.matches(task)) {
                return Err("a listing returned a task that does not match its filter".into());
            }
        }
        *slot = (median(&mut times), found);
    }
    let expected = [50, 50, 50, 0];
    if out.iter().map(|(_, found)| *found).ne(expected) {
        return Err(format!(
            "the listings found {:?} tasks, expected {expected:?}",
            out.map(|o| o.1)
        )
        .into());
    }
    Ok(out)
}

/// The child process of the RSS measurement: opens the file at `path` as msbd would, lists a page,
/// reads the counts, and prints its RSS before and after.
fn rss_probe(path: &Path) -> BenchResult<()> {
    let runtime = runtime()?;
    let baseline = runtime.block_on(async { rss_kib() })?;
    let after = runtime.block_on(async {
        let store = SqliteStore::open(SqliteConfig::new(path))?;
        let engine = engine_on(Arc::new(store)).await?;
        let filter = ListFilter {
            statuses: vec![Status::Completed],
            ..ListFilter::default()
        };
        let page = engine.list(filter, PageRequest::first(50)).await?;
        let stats = engine.stats().await?;
        if page.tasks.len() != 50 || stats.total() != RETAINED as u64 {
            return Err(format!("the file holds {} tasks", stats.total()).into());
        }
        let rss = rss_kib()?;
        drop((page, engine));
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(rss)
    })?;
    println!("{RSS_PROBE_PREFIX}baseline:{baseline}");
    println!("{RSS_PROBE_PREFIX}after:{after}");
    Ok(())
}

/// This process's resident set size (`VmRSS`), in KiB.
fn rss_kib() -> BenchResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS in /proc/self/status".into())
}

// ---------------------------------------------------------------------------------------------
// Diagnostics: not figures; run only with a filter that starts with `diag`.

fn diagnostics(runtime: &Runtime, filter: &str) -> BenchResult<()> {
    if "diag_engine".contains(filter) || filter.starts_with("diag_engine") {
        for backend in [Backend::Sqlite, Backend::Memory] {
            let dir = tempfile::tempdir()?;
            let inner: Arc<dyn Store> = match backend {
                Backend::Sqlite => Arc::new(SqliteStore::open(SqliteConfig::new(
                    dir.path().join("d.sqlite3"),
                ))?),
                Backend::Memory => Arc::new(MemoryStore::new()),
            };
            let counting = Arc::new(CountingStore {
                inner,
                counters: Mutex::default(),
            });
            let report = on_workers(runtime, burn_down(counting.clone()))?;
            let c = counting
                .counters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            println!(
                "  diag {}: {:.0} tasks/s; claims {} (empty {}), mean claimed {:.2} of mean max {:.2}; claim mean {:.1} µs; finishes {} mean {:.1} µs; submit {:.0} tasks/s",
                backend.name(),
                BURN_TASKS as f64 / report.run.as_secs_f64(),
                c.claims,
                c.empty_claims,
                c.claimed as f64 / c.claims.max(1) as f64,
                c.claim_max as f64 / c.claims.max(1) as f64,
                c.claim_time.as_secs_f64() * 1e6 / c.claims.max(1) as f64,
                c.finishes,
                c.finish_time.as_secs_f64() * 1e6 / c.finishes.max(1) as f64,
                BURN_TASKS as f64 / report.submit.as_secs_f64(),
            );
        }
    }
    if "diag_c16".contains(filter) || filter.starts_with("diag_c16") {
        // `MSBD_DIAG_SYNC=full`: the same with synchronous=FULL; `MSBD_DIAG_STORE=postgres`:
        // on one PostgreSQL node.
        let full = std::env::var("MSBD_DIAG_SYNC").is_ok_and(|v| v == "full");
        let postgres = std::env::var("MSBD_DIAG_STORE").is_ok_and(|v| v == "postgres");
        for _ in 0..2 {
            let dir = tempfile::tempdir()?;
            let mut config = SqliteConfig::new(dir.path().join("d.sqlite3"));
            if full {
                config.synchronous = Synchronous::Full;
            }
            let (url, schema) = (pg_url(), pg_schema());
            let pg = if postgres {
                let config = PostgresConfig {
                    schema: schema.clone(),
                    ..PostgresConfig::new(&url, "c16")
                };
                Some(Arc::new(runtime.block_on(PostgresStore::connect(config))?))
            } else {
                None
            };
            let inner: Arc<dyn Store> = match &pg {
                Some(store) => Arc::clone(store) as Arc<dyn Store>,
                None => Arc::new(SqliteStore::open(config)?),
            };
            let counting = Arc::new(CountingStore {
                inner,
                counters: Mutex::default(),
            });
            let run = on_workers(runtime, c16_burn_down(counting.clone(), pg.clone()))?;
            if pg.is_some() {
                runtime.block_on(pg_drop_schema(&url, &schema))?;
            }
            let c = counting
                .counters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            println!(
                "  diag c16 {}: {:.0} tasks/s; claims {} (empty {}), mean claimed {:.2} of mean max {:.2}; claim mean {:.1} µs; finishes {} mean {:.1} µs",
                if postgres {
                    "postgres"
                } else if full {
                    "sqlite full"
                } else {
                    "sqlite"
                },
                run.rate,
                c.claims,
                c.empty_claims,
                c.claimed as f64 / c.claims.max(1) as f64,
                c.claim_max as f64 / c.claims.max(1) as f64,
                c.claim_time.as_secs_f64() * 1e6 / c.claims.max(1) as f64,
                c.finishes,
                c.finish_time.as_secs_f64() * 1e6 / c.finishes.max(1) as f64,
            );
        }
    }
    if "diag_store".contains(filter) || filter.starts_with("diag_store") {
        const N: usize = 50_000;
        let batches: Vec<usize> = match std::env::var("MSBD_DIAG_BATCHES") {
            Ok(list) => list
                .split(',')
                .filter_map(|b| b.trim().parse().ok())
                .collect(),
            Err(_) => vec![1, 8, 64, 256, 1_000],
        };
        for batch in batches {
            let n = if batch == 1 { N / 5 } else { N };
            let dir = tempfile::tempdir()?;
            let path = dir.path().join("s.sqlite3");
            // Indexes to drop before the run (an experiment: what each costs the writer).
            if let Ok(drop_list) = std::env::var("MSBD_DIAG_DROP_INDEXES") {
                drop(SqliteStore::open(SqliteConfig::new(&path))?);
                let conn = rusqlite::Connection::open(&path)?;
                for index in drop_list.split(',').filter(|i| !i.is_empty()) {
                    conn.execute_batch(&format!("DROP INDEX {index}"))?;
                }
            }
            let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(&path))?);
            let (submit, StoreRun { claim, finish, .. }) = runtime.block_on(async {
                let started = Instant::now();
                queue_noops(&*store, n).await?;
                let submit = started.elapsed();
                BenchResult::Ok((submit, claim_and_finish(store, batch).await?))
            })?;
            println!(
                "  diag store sqlite, {n} tasks, claim {batch} then finish them concurrently: {:.0} tasks/s (claim {:.1} µs/task, finish {:.1} µs/task); submit {:.0} tasks/s",
                n as f64 / (claim + finish).as_secs_f64(),
                claim.as_secs_f64() * 1e6 / n as f64,
                finish.as_secs_f64() * 1e6 / n as f64,
                n as f64 / submit.as_secs_f64(),
            );
        }
    }
    Ok(())
}

#[derive(Clone, Default)]
struct Counters {
    claims: u64,
    empty_claims: u64,
    claimed: u64,
    claim_max: u64,
    claim_time: Duration,
    finishes: u64,
    finish_time: Duration,
}

/// A store that counts and times the engine's claims and finishes.
struct CountingStore {
    inner: Arc<dyn Store>,
    counters: Mutex<Counters>,
}

impl CountingStore {
    fn count(&self, change: impl FnOnce(&mut Counters)) {
        change(&mut self.counters.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Store for CountingStore {
    fn submit(&self, tasks: Vec<Task>) -> StoreFuture<'_, Vec<Submitted>> {
        self.inner.submit(tasks)
    }
    fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, Vec<Task>> {
        Box::pin(async move {
            let max = request.max as u64;
            let started = Instant::now();
            let claimed = self.inner.claim(request).await?;
            let n = claimed.len() as u64;
            self.count(|c| {
                c.claims += 1;
                c.empty_claims += u64::from(n == 0);
                c.claimed += n;
                c.claim_max += max;
                c.claim_time += started.elapsed();
            });
            Ok(claimed)
        })
    }
    fn promote_due(&self, now: Timestamp) -> StoreFuture<'_, Promoted> {
        self.inner.promote_due(now)
    }
    fn finish(&self, finish: Finish) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let started = Instant::now();
            let done = self.inner.finish(finish).await?;
            self.count(|c| {
                c.finishes += 1;
                c.finish_time += started.elapsed();
            });
            Ok(done)
        })
    }
    fn release(&self, held: Vec<(TaskId, u32)>, now: Timestamp) -> StoreFuture<'_, usize> {
        self.inner.release(held, now)
    }
    fn progress(&self, update: ProgressUpdate) -> StoreFuture<'_, bool> {
        self.inner.progress(update)
    }
    fn heartbeat(&self, heartbeat: Heartbeat) -> StoreFuture<'_, HeartbeatReply> {
        self.inner.heartbeat(heartbeat)
    }
    fn command(&self, id: TaskId, command: StoreCommand, now: Timestamp) -> StoreFuture<'_, Task> {
        self.inner.command(id, command, now)
    }
    fn recover(&self, now: Timestamp, which: Recover) -> StoreFuture<'_, Vec<Task>> {
        self.inner.recover(now, which)
    }
    fn prune(&self, before: Timestamp, limit: usize) -> StoreFuture<'_, usize> {
        self.inner.prune(before, limit)
    }
    fn delete_finished(
        &self,
        filter: ListFilter,
        finished_before: Timestamp,
        limit: usize,
    ) -> StoreFuture<'_, usize> {
        self.inner.delete_finished(filter, finished_before, limit)
    }
    fn reassign_owner(&self, from: &str, to: &str) -> StoreFuture<'_, u64> {
        self.inner.reassign_owner(from, to)
    }
    fn get(&self, id: TaskId) -> StoreFuture<'_, Option<Task>> {
        self.inner.get(id)
    }
    fn list(&self, filter: ListFilter, page: PageRequest) -> StoreFuture<'_, Page> {
        self.inner.list(filter, page)
    }
    fn stats(&self) -> StoreFuture<'_, Stats> {
        self.inner.stats()
    }
    fn timed_out(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, u64>> {
        self.inner.timed_out()
    }
    fn flush(&self) -> StoreFuture<'_, ()> {
        self.inner.flush()
    }
}

// ---------------------------------------------------------------------------------------------
// Figures, the table and the JSON file.

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[derive(Clone, Copy)]
enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn met(self, value: f64) -> bool {
        match self {
            Target::AtLeast(target) => value >= target,
            Target::AtMost(target) => value <= target,
        }
    }

    fn describe(self) -> String {
        match self {
            Target::AtLeast(target) => format!(">= {target}"),
            Target::AtMost(target) => format!("<= {target}"),
        }
    }
}

struct Figure {
    name: &'static str,
    /// The median of the runs, rounded to `decimals`.
    value: f64,
    runs: Vec<f64>,
    unit: &'static str,
    decimals: usize,
    target: Target,
}

#[derive(Default)]
struct Figures {
    list: Vec<Figure>,
    /// Numbers written beside the figures that have no target (the host probe).
    info: Vec<(&'static str, f64)>,
}

impl Figures {
    fn add(
        &mut self,
        name: &'static str,
        mut runs: Vec<f64>,
        unit: &'static str,
        decimals: usize,
        target: Target,
    ) {
        let scale = 10f64.powi(decimals as i32);
        let value = (median(&mut runs.clone()) * scale).round() / scale;
        runs.iter_mut()
            .for_each(|run| *run = (*run * scale).round() / scale);
        let spread = if runs.len() > 1 {
            let (lo, hi) = (
                runs.iter().copied().fold(f64::MAX, f64::min),
                runs.iter().copied().fold(f64::MIN, f64::max),
            );
            format!(
                " (runs {}; spread {:.1}% of the median)",
                join(&runs, decimals),
                (hi - lo) / value * 100.0
            )
        } else {
            String::new()
        };
        println!(
            "{name}: {value:.decimals$} {unit}{spread}  [target {} {unit}: {}]",
            target.describe(),
            if target.met(value) { "met" } else { "MISSED" }
        );
        self.list.push(Figure {
            name,
            value,
            runs,
            unit,
            decimals,
            target,
        });
    }

    fn write(&self) -> BenchResult<PathBuf> {
        let dir = match std::env::var_os("MSBD_BENCH_PARTS_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/parts"),
        };
        std::fs::create_dir_all(&dir)?;
        let mut object = serde_json::Map::new();
        for figure in &self.list {
            let number = if figure.decimals == 0 {
                json!(figure.value as i64)
            } else {
                json!(figure.value)
            };
            object.insert(figure.name.to_owned(), number);
        }
        for (name, value) in &self.info {
            object.insert((*name).to_owned(), json!(value));
        }
        let path = dir.join("engine.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&Value::Object(object))? + "\n",
        )?;
        Ok(path)
    }

    fn table(&self) -> String {
        let rows: Vec<[String; 5]> = self
            .list
            .iter()
            .map(|f| {
                [
                    f.name.to_owned(),
                    format!("{:.*} {}", f.decimals, f.value, f.unit),
                    join(&f.runs, f.decimals),
                    format!("{} {}", f.target.describe(), f.unit),
                    if f.target.met(f.value) {
                        "met".into()
                    } else {
                        "MISSED".into()
                    },
                ]
            })
            .collect();
        let header = ["figure", "value", "runs", "target", "status"].map(String::from);
        let mut widths = [0; 5];
        for row in std::iter::once(&header).chain(&rows) {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for (index, row) in std::iter::once(&header).chain(&rows).enumerate() {
            for (column, (cell, width)) in row.iter().zip(widths).enumerate() {
                let pad = width - cell.chars().count();
                let sep = if column == 0 { "" } else { " | " };
                if column == 1 {
                    let _ = write!(out, "{sep}{}{cell}", " ".repeat(pad));
                } else {
                    let _ = write!(out, "{sep}{cell}{}", " ".repeat(pad));
                }
            }
            out = out.trim_end().to_owned();
            out.push('\n');
            if index == 0 {
                let total = widths.iter().sum::<usize>() + 3 * (widths.len() - 1);
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        out
    }
}

fn join(values: &[f64], decimals: usize) -> String {
    values
        .iter()
        .map(|v| format!("{v:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}
