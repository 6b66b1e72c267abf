//! A crash test: a child process burns down a queue on a SQLite file and is killed with SIGKILL
//! in the middle of it; reopening the file recovers every task, none lost and none completed twice.
//!
//! The parent test re-executes this test binary (a libtest binary, so this works under
//! `cargo test` and `cargo nextest` alike) to run [`burn_down_child`] with
//! `TASK_CORE_CRASH_DB` set to the database file.

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;
use task_core::store::sqlite::{SqliteConfig, SqliteStore};
use task_core::store::{ListFilter, PageRequest, Store};
use task_core::{Engine, EngineConfig, NewTask, Status, Task, TaskEvent, TaskId, handler_fn};

/// The variable that turns [`burn_down_child`] on, naming the database file.
const DB_VAR: &str = "TASK_CORE_CRASH_DB";
/// The tasks of the burn-down.
const TASKS: usize = 2_000;
/// What the child prints once every task is submitted.
const SUBMITTED: &str = "task-core-crash-child: submitted";
/// How many handler runs the parent waits to see before it kills the child.
const RUNS_BEFORE_KILL: usize = 600;

/// The side log of handler runs, next to the database.
fn runs_log(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".runs");
    PathBuf::from(name)
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        concurrency: 16,
        lease: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(500),
        reaper_interval: Duration::from_millis(500),
        retention: None,
        ..EngineConfig::default()
    }
}

/// Builds an engine whose `work` handler sleeps a little, appends `<id> <attempt>` to the side
/// log (one `O_APPEND` write per run, done before the handler returns), and returns `{"id": id}`.
async fn engine(store: SqliteStore, log: &Path) -> Engine {
    let log = Arc::new(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("opening the side log"),
    );
    let handler = handler_fn(move |ctx| {
        let log = Arc::clone(&log);
        async move {
            tokio::time::sleep(Duration::from_millis(3)).await;
            let line = format!("{} {}\n", ctx.id(), ctx.attempt());
            (&*log).write_all(line.as_bytes())?;
            Ok(json!({ "id": ctx.id().to_string() }))
        }
    });
    Engine::builder(Arc::new(store))
        .handler("work", handler)
        .config(engine_config())
        .build()
        .await
        .expect("building the engine")
}

/// The child's side of the crash test. Run as part of the suite (without `TASK_CORE_CRASH_DB`)
/// it does nothing; the parent test runs it in a child process with the variable set, and then
/// it submits the burn-down, starts the engine, and runs until it is killed.
#[test]
fn burn_down_child() {
    let Some(db) = std::env::var_os(DB_VAR) else {
        return;
    };
    let db = PathBuf::from(db);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async move {
        let store = SqliteStore::open(SqliteConfig::new(&db)).expect("opening the store");
        let engine = engine(store, &runs_log(&db)).await;
        let mut left = TASKS;
        while left > 0 {
            let batch = left.min(250);
            // One attempt each: a task running at the kill must run again all the same.
            let tasks = (0..batch)
                .map(|_| NewTask::new("work", json!({})).with_max_attempts(1))
                .collect();
            engine.submit_many(tasks).await.expect("submitting");
            left -= batch;
        }
        let mut stdout = std::io::stdout();
        writeln!(stdout, "\n{SUBMITTED}").expect("writing to stdout");
        stdout.flush().expect("flushing stdout");
        let _loops = engine.start();
        std::future::pending::<()>().await;
    });
}

/// Kills the child if the parent test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every task in the store.
async fn list_all(store: &dyn Store) -> Vec<Task> {
    let mut tasks = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(
                ListFilter::default(),
                PageRequest {
                    cursor,
                    limit: PageRequest::MAX_LIMIT,
                },
            )
            .await
            .expect("listing tasks");
        tasks.extend(page.tasks);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return tasks,
        }
    }
}

/// The side log's runs, `(id, attempt)`, in the order written.
fn read_runs(bytes: &[u8]) -> Vec<(TaskId, u32)> {
    let text = std::str::from_utf8(bytes).expect("the side log is text");
    text.lines()
        .map(|line| {
            let (id, attempt) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            (
                id.parse().expect("a task id"),
                attempt.parse().expect("an attempt"),
            )
        })
        .collect()
}

#[test]
fn sigkill_during_a_burn_down_loses_nothing_and_completes_nothing_twice() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = dir.path().join("tasks.sqlite3");
    let log = runs_log(&db);
    let started = Instant::now();

    // First life: a child process, killed in the middle of the burn-down.
    let child = Command::new(std::env::current_exe().expect("the test binary"))
        .args([
            "--exact",
            "crash::burn_down_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DB_VAR, &db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting the child");
    let mut child = KillOnDrop(child);
    let stdout = child.0.stdout.take().expect("the child's stdout");
    let mut stderr = child.0.stderr.take().expect("the child's stderr");
    let (submitted_tx, submitted_rx) = mpsc::channel();
    let stdout_reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(SUBMITTED) {
                let _ = submitted_tx.send(());
            }
            seen.push(line);
        }
        seen
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    if submitted_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        drop(child);
        panic!(
            "the child did not submit its tasks within 30 s; its stdout: {:?}; its stderr: {}",
            stdout_reader.join().unwrap_or_default(),
            stderr_reader.join().unwrap_or_default()
        );
    }
    let submitted_after = started.elapsed();

    // Wait until the handlers have run a while (each run is one line of about 39 bytes).
    let line_len = format!("{} 1\n", TaskId::new()).len() as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let size = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        if size >= line_len * RUNS_BEFORE_KILL as u64 {
            break;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!(
                "the child exited early ({status}): {}",
                stderr_reader.join().unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the child ran fewer than {RUNS_BEFORE_KILL} handlers in 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.0.kill().expect("killing the child");
    let status = child.0.wait().expect("waiting for the child");
    let killed_after = started.elapsed();
    drop(child);
    assert!(
        !status.success(),
        "the child was killed, yet it exited with {status}"
    );
    drop(stdout_reader.join());
    drop(stderr_reader.join());

    // Second life: reopen the file in this process and finish the burn-down.
    let first_life = std::fs::read(&log).expect("reading the side log");
    let first_runs = read_runs(&first_life);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let store = SqliteStore::open(SqliteConfig::new(&db)).expect("reopening the store");
        let at_reopen = list_all(&store).await;
        assert_eq!(at_reopen.len(), TASKS, "tasks lost (or invented) by the kill");
        let status_at_reopen: HashMap<TaskId, Status> =
            at_reopen.iter().map(|t| (t.id, t.status)).collect();
        let count = |status: Status| at_reopen.iter().filter(|t| t.status == status).count();
        let completed_at_reopen = count(Status::Completed);
        let running_at_reopen = count(Status::Running);
        let queued_at_reopen = count(Status::Queued);
        assert_eq!(
            completed_at_reopen + running_at_reopen + queued_at_reopen,
            TASKS,
            "only completed, running and queued tasks were expected at reopen"
        );
        assert!(completed_at_reopen > 0, "no task completed before the kill");
        assert!(
            completed_at_reopen < TASKS,
            "the child finished every task before it was killed: the kill came too late to test anything"
        );

        let engine = engine(store, &log).await;
        let recovered_queued = engine.stats().await.expect("stats").count(Status::Queued);
        assert_eq!(
            recovered_queued as usize,
            queued_at_reopen + running_at_reopen,
            "every running task should be back in the queue after the start-up recovery"
        );
        assert_eq!(engine.stats().await.expect("stats").count(Status::Running), 0);

        let mut events = engine.subscribe();
        let (stop_collector, mut stop) = tokio::sync::oneshot::channel::<()>();
        let collector = tokio::spawn(async move {
            use tokio::sync::broadcast::error::{RecvError, TryRecvError};
            fn note(completed: &mut HashMap<TaskId, usize>, event: TaskEvent) {
                if let TaskEvent::Status { id, status: Status::Completed, .. } = event {
                    *completed.entry(id).or_default() += 1;
                }
            }
            let mut completed = HashMap::new();
            loop {
                tokio::select! {
                    biased;
                    event = events.recv() => match event {
                        Ok(event) => note(&mut completed, event),
                        Err(RecvError::Closed) => return Ok(completed),
                        Err(RecvError::Lagged(lost)) => return Err(lost),
                    },
                    _ = &mut stop => loop {
                        // Everything published before the stop is in the channel already.
                        match events.try_recv() {
                            Ok(event) => note(&mut completed, event),
                            Err(TryRecvError::Empty | TryRecvError::Closed) => return Ok(completed),
                            Err(TryRecvError::Lagged(lost)) => return Err(lost),
                        }
                    },
                }
            }
        });
        let loops = engine.start();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for task in at_reopen.iter().filter(|t| !t.status.is_terminal()) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let done = engine.wait(task.id, left).await.expect("waiting for a task");
            assert!(done.status.is_terminal(), "task {} not finished 60 s after reopening: {:?}", task.id, done.status);
        }
        let second_life_time = started.elapsed() - killed_after;
        engine.shutdown(Duration::from_secs(5)).await;
        loops.stop().await;
        let final_tasks = list_all(engine.store().as_ref()).await;
        let stats = engine.stats().await.expect("stats");
        drop(engine);
        let _ = stop_collector.send(());
        let completed_events = collector.await.expect("the event collector").unwrap_or_else(|lagged| {
            panic!("the event collector fell {lagged} events behind")
        });

        // Exactly the submitted tasks, every one completed once, with its own result.
        assert_eq!(final_tasks.len(), TASKS);
        assert_eq!(stats.total(), TASKS as u64);
        assert_eq!(stats.count(Status::Completed), TASKS as u64);
        let ids: HashSet<TaskId> = final_tasks.iter().map(|t| t.id).collect();
        assert_eq!(ids.len(), TASKS, "a task id appears twice in the store");
        for task in &final_tasks {
            assert_eq!(task.status, Status::Completed, "task {}: {:?}", task.id, task.error);
            assert_eq!(task.result, Some(json!({ "id": task.id.to_string() })), "result of {}", task.id);
            // One attempt each (issue 15): an attempt the kill cut short does not count, and the
            // limit stays the user's.
            assert_eq!(task.max_attempts, 1, "max_attempts of {}", task.id);
            assert_eq!(task.counted_attempts(), 1, "attempts of {} that count", task.id);
        }

        // The second life completed exactly the tasks that were not completed at reopen, once each.
        for (id, times) in &completed_events {
            assert_eq!(*times, 1, "task {id} was completed {times} times in the second life");
            assert_ne!(
                status_at_reopen[id],
                Status::Completed,
                "task {id} was completed before the kill and again after the reopen"
            );
        }
        assert_eq!(completed_events.len(), TASKS - completed_at_reopen);

        // The side log: tasks completed before the kill never ran again; an attempt runs at most
        // once; the attempt that completed a task is one that ran; and a task ran twice only if
        // the kill caught it unfinished (at-least-once delivery, exactly-once completion).
        let all_runs = read_runs(&std::fs::read(&log).expect("reading the side log"));
        let second_runs = &all_runs[first_runs.len()..];
        assert_eq!(&all_runs[..first_runs.len()], &first_runs[..]);
        for (id, attempt) in second_runs {
            assert_ne!(
                status_at_reopen[id],
                Status::Completed,
                "task {id} (attempt {attempt}) ran again after the reopen though it had completed before the kill"
            );
        }
        let unique_runs: HashSet<(TaskId, u32)> = all_runs.iter().copied().collect();
        assert_eq!(unique_runs.len(), all_runs.len(), "an attempt of a task ran twice");
        let mut runs_per_task: HashMap<TaskId, usize> = HashMap::new();
        for (id, _) in &all_runs {
            *runs_per_task.entry(*id).or_default() += 1;
        }
        for task in &final_tasks {
            assert!(
                unique_runs.contains(&(task.id, task.attempt)),
                "task {} completed with attempt {}, which never ran",
                task.id,
                task.attempt
            );
        }
        let mut ran_twice = 0;
        for (id, runs) in &runs_per_task {
            if *runs > 1 {
                ran_twice += 1;
                assert!(
                    !status_at_reopen[id].is_terminal(),
                    "task {id} ran {runs} times but was already {} at reopen",
                    status_at_reopen[id]
                );
            }
        }

        println!(
            "crash test: {TASKS} tasks submitted in {submitted_after:?}; killed after {killed_after:?} with \
             {} handler runs logged; at reopen {completed_at_reopen} completed, {running_at_reopen} running \
             (recovered), {queued_at_reopen} queued; second life: {} runs, {} completions in {second_life_time:?}; \
             {ran_twice} tasks ran twice (killed between their run and its commit)",
            first_runs.len(),
            second_runs.len(),
            completed_events.len(),
        );
    });
}
