//! The whole wrapper, end to end: tasks submitted to the engine run in real sandboxes; output is
//! read by cursor while a task runs; progress lines become progress; operator-defined types are
//! checked at submit; the supervised loops report health and pause, resume and restart; a
//! graceful shutdown with running tasks keeps its deadline, leaves no process, and the tasks run
//! again after a restart; a SIGKILLed instance's sandboxes are swept by the next start.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_wrapper::handlers::KEPT_ATTEMPTS;
use sandbox_wrapper::output::{OutputChunk, OutputStream};
use sandbox_wrapper::supervisor::{ActionStatus, ChildState, HealthStatus, ShutdownStatus};
use sandbox_wrapper::task_types::TaskTypes;
use sandbox_wrapper::{Wrapper, WrapperConfig};
use serde_json::json;
use task_core::store::ListFilter;
use task_core::store::sqlite::{SqliteConfig, SqliteStore};
use task_core::{EngineConfig, NewTask, RetryPolicy, Status, Task, TaskId, Timestamp};

fn config(data_dir: &Path, marker: &str) -> WrapperConfig {
    let mut config = WrapperConfig::new(data_dir);
    config.instance_marker = Some(marker.to_owned());
    config.landlock_shim = Some(PathBuf::from(env!("CARGO_BIN_EXE_msbd-sandbox-shim")));
    config.engine = EngineConfig {
        concurrency: 4,
        lease: Duration::from_secs(5),
        heartbeat_interval: Duration::from_millis(500),
        reaper_interval: Duration::from_millis(500),
        cancel_grace: Duration::from_millis(500),
        ..EngineConfig::default()
    };
    config
}

fn unique_marker() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "w{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

async fn start(data_dir: &Path, config: WrapperConfig) -> Wrapper {
    let store = SqliteStore::open(SqliteConfig::new(data_dir.join("tasks.sqlite3"))).unwrap();
    let wrapper = Wrapper::start(Arc::new(store), config).await.unwrap();
    eprintln!("isolation: {}", wrapper.isolation());
    wrapper
}

async fn run(wrapper: &Wrapper, task: NewTask) -> Task {
    let id = wrapper.submit(task).await.unwrap().task.id;
    wrapper
        .engine()
        .wait(id, Duration::from_secs(60))
        .await
        .unwrap()
}

/// The first attempt's output so far, from its start (empty before it starts).
fn output(wrapper: &Wrapper, id: TaskId) -> OutputChunk {
    wrapper
        .read_output(id, 1, OutputStream::Combined, 0, 1 << 16)
        .unwrap()
        .unwrap_or_default()
}

async fn eventually<F: FnMut() -> bool>(what: &str, mut condition: F) {
    let until = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Processes whose environment marks them as sandboxed by this instance marker.
fn marked_processes(marker: &str) -> Vec<i32> {
    let prefix = format!("MSBD_SANDBOX={marker}/");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(environ) = std::fs::read(entry.path().join("environ"))
            && environ
                .split(|&b| b == 0)
                .any(|var| var.starts_with(prefix.as_bytes()))
        {
            pids.push(pid);
        }
    }
    pids
}

/// The processes of runs (the tasks' own), without the sessions' spawners: a session's spawner
/// (marked `<marker>/<session>/spawner`) forks its runs and lives until the session stops.
fn run_processes(marker: &str) -> Vec<i32> {
    let spawner = |pid: &i32| {
        std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
            environ.split(|&b| b == 0).any(|var| {
                var.starts_with(format!("MSBD_SANDBOX={marker}/").as_bytes())
                    && var.ends_with(b"/spawner")
            })
        })
    };
    marked_processes(marker)
        .into_iter()
        .filter(|pid| !spawner(pid))
        .collect()
}

/// This instance's cgroup directories for sessions, in every hierarchy.
fn session_cgroups(marker: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name() == format!("msbd-{marker}").as_str() {
                if let Ok(sessions) = std::fs::read_dir(&path) {
                    found.extend(
                        sessions
                            .flatten()
                            .filter(|s| s.file_name().to_string_lossy().starts_with("s-"))
                            .map(|s| s.path()),
                    );
                }
            } else if path.components().count() < 9 {
                stack.push(path);
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_task_runs_in_a_sandbox_with_output_and_progress() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = start(dir.path(), config(dir.path(), &unique_marker())).await;
    let task = NewTask::new(
        "command",
        json!({"command": "echo start; echo '::progress:: 40% compiling'; sleep 1; echo done"}),
    );
    let id = wrapper.submit(task).await.unwrap().task.id;
    // The output is readable while the task runs, and the progress line became progress.
    let seen;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let chunk = output(&wrapper, id);
        let task = wrapper.engine().get(id).await.unwrap();
        if chunk.data.contains("start") && task.progress == Some(0.4) {
            assert_eq!(task.status, Status::Running, "{task:?}");
            assert_eq!(task.progress_message.as_deref(), Some("compiling"));
            seen = chunk.data;
            break;
        }
        assert!(
            Instant::now() < until,
            "no output while running: {chunk:?} {task:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!seen.contains("done"), "{seen}");
    let task = wrapper
        .engine()
        .wait(id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(task.status, Status::Completed, "{task:?}");
    let result = task.result.unwrap();
    assert_eq!(result["exit_code"], 0);
    assert_eq!(result["reason"], "exited");
    assert!(result["output_tail"].as_str().unwrap().ends_with("done\n"));
    assert!(result["session_id"].as_str().unwrap().starts_with('s'));
    assert!(result["isolation"].as_str().is_some());
    // Reading on from the cursor gives the rest.
    let first = wrapper
        .read_output(id, 1, OutputStream::Combined, 0, 6)
        .unwrap()
        .unwrap();
    assert_eq!(first.data, "start\n");
    let rest = wrapper
        .read_output(id, 1, OutputStream::Combined, first.next_cursor, 1 << 16)
        .unwrap()
        .unwrap();
    assert!(rest.data.ends_with("done\n"), "{rest:?}");
    wrapper.graceful_shutdown(Duration::from_secs(10)).await;
}

/// More tasks may run at once than there are sessions: a task that finds every session busy
/// waits for one to come free (a load test saw such tasks fail instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_beyond_the_session_limit_wait_for_a_session_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), &unique_marker());
    config.sessions.max_sessions = 2;
    let wrapper = start(dir.path(), config).await;
    let mut ids = Vec::new();
    for n in 0..6 {
        let task = NewTask::new(
            "command",
            json!({"command": format!("sleep 0.3; echo {n}")}),
        );
        ids.push(wrapper.submit(task).await.unwrap().task.id);
    }
    for id in ids {
        let task = wrapper
            .engine()
            .wait(id, Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(task.status, Status::Completed, "{task:?}");
        assert_eq!(task.attempt, 1, "{task:?}");
    }
    wrapper.graceful_shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_running_task_freezes_its_tree_and_its_timeout_clocks() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = start(dir.path(), config(dir.path(), &unique_marker())).await;
    // 1.5 s of ticks under a 2 s sandbox timeout and a 2 s task timeout, paused for 2.5 s.
    let task = NewTask::new(
        "command",
        json!({
            "command": "i=0; while [ $i -lt 15 ]; do echo tick; sleep 0.1; i=$((i+1)); done",
            "timeout_seconds": 2,
        }),
    )
    .with_timeout(Duration::from_secs(2));
    let id = wrapper.submit(task).await.unwrap().task.id;
    eventually_async(|| async { output(&wrapper, id).data.contains("tick") }).await;
    let frozen = wrapper.engine().pause_task(id).await.unwrap();
    assert_eq!(frozen.status, Status::Paused);
    // Let the freeze land, then see that nothing more is printed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let size = output(&wrapper, id).size;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(output(&wrapper, id).size, size, "output grew while frozen");
    assert_eq!(
        wrapper.engine().get(id).await.unwrap().status,
        Status::Paused
    );
    assert_eq!(
        wrapper.engine().resume_task(id).await.unwrap().status,
        Status::Running
    );
    let done = wrapper
        .engine()
        .wait(id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(done.status, Status::Completed, "{done:?}");
    assert_eq!(
        done.result.unwrap()["output_tail"]
            .as_str()
            .unwrap()
            .matches("tick")
            .count(),
        15
    );
    wrapper.graceful_shutdown(Duration::from_secs(10)).await;
}

async fn eventually_async<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + Duration::from_secs(20);
    while !condition().await {
        assert!(Instant::now() < until, "timed out waiting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each attempt of a retried task writes its own output file, under the same cap: an attempt
/// no longer truncates the one before it. Only the last `KEPT_ATTEMPTS` are kept, and a task
/// that is deleted leaves none of its files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_keeps_its_own_output_and_a_deleted_task_leaves_none() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = start(dir.path(), config(dir.path(), &unique_marker())).await;
    let outputs = dir.path().join("outputs");
    let quick = RetryPolicy {
        base_delay_ms: 10,
        max_delay_ms: 20,
    };
    // A session keeps a count across attempts: each attempt says which it is; the first fails.
    let count = "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count";
    let task = NewTask::new(
        "command",
        json!({"command": format!("{count}; if [ $n = 1 ]; then echo first; exit 1; fi; echo second"), "session_id": "twice"}),
    )
    .with_max_attempts(2)
    .with_retry(quick);
    let task = run(&wrapper, task).await;
    assert_eq!(task.status, Status::Completed, "{task:?}");
    assert_eq!(task.attempt, 2);
    let read = |attempt| {
        wrapper
            .read_output(task.id, attempt, OutputStream::Combined, 0, 1 << 16)
            .unwrap()
            .map(|chunk| chunk.data)
    };
    assert_eq!(read(1).as_deref(), Some("first\n"));
    assert_eq!(read(2).as_deref(), Some("second\n"));
    assert_eq!(read(3), None);
    assert_eq!(wrapper.attempts_with_output(task.id, 2), [1, 2]);
    assert!(outputs.join(format!("{}.log", task.id)).exists());
    assert!(outputs.join(format!("{}.2.log", task.id)).exists());

    // Seven attempts that all fail: the first two's output is gone, the last five's is kept.
    let seven = NewTask::new(
        "command",
        json!({"command": format!("{count}; echo run $n; exit 1"), "session_id": "often"}),
    )
    .with_max_attempts(7)
    .with_retry(quick);
    let often = run(&wrapper, seven).await;
    assert_eq!(often.status, Status::Failed, "{often:?}");
    assert_eq!(often.attempt, 7);
    assert_eq!(wrapper.attempts_with_output(often.id, 7), [3, 4, 5, 6, 7]);
    for attempt in 1..=7 {
        let chunk = wrapper
            .read_output(often.id, attempt, OutputStream::Combined, 0, 1 << 16)
            .unwrap();
        if attempt <= 7 - KEPT_ATTEMPTS {
            assert_eq!(chunk, None, "attempt {attempt}");
        } else {
            assert_eq!(chunk.unwrap().data, format!("run {attempt}\n"));
        }
    }

    // Deleted tasks leave no output file of any attempt behind.
    let files = |id: TaskId| -> Vec<String> {
        std::fs::read_dir(&outputs)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&id.to_string()))
            .collect()
    };
    // Each kept attempt has three files: the combined output, stdout's and stderr's.
    assert_eq!(files(often.id).len(), 3 * KEPT_ATTEMPTS as usize);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let deleted = wrapper
        .engine()
        .delete_finished(ListFilter::default(), Timestamp::now(), 100)
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    assert_eq!(
        wrapper.remove_stale_outputs().await,
        3 * (2 + KEPT_ATTEMPTS as usize)
    );
    assert_eq!(files(task.id), Vec::<String>::new());
    assert_eq!(files(often.id), Vec::<String>::new());
    wrapper.graceful_shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_say_why_and_code_keeps_state_within_a_session() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = start(dir.path(), config(dir.path(), &unique_marker())).await;
    let failed = run(
        &wrapper,
        NewTask::new(
            "command",
            json!({"argv": ["sh", "-c", "echo boom >&2; exit 3"]}),
        )
        .with_max_attempts(1),
    )
    .await;
    assert_eq!(failed.status, Status::Failed);
    let message = failed.error.unwrap().message;
    assert!(message.starts_with("exit code 3 after"), "{message}");
    assert!(message.ends_with("boom"), "{message}");
    // The failure's facts are the failed task's result too.
    let facts = failed.result.expect("a failed run keeps its result");
    assert_eq!(facts["exit_code"], 3, "{facts}");
    assert_eq!(facts["signal"], serde_json::Value::Null, "{facts}");
    assert_eq!(facts["reason"], "exited", "{facts}");
    assert_eq!(facts["stderr_tail"], "boom\n", "{facts}");
    assert_eq!(facts["output_tail"], "boom\n", "{facts}");
    let read = |stream| {
        wrapper
            .read_output(failed.id, 1, stream, 0, 1 << 16)
            .unwrap()
            .map(|chunk| chunk.data)
    };
    assert_eq!(read(OutputStream::Stderr).as_deref(), Some("boom\n"));
    assert_eq!(read(OutputStream::Stdout).as_deref(), Some(""));
    let (start, tail) = wrapper
        .read_output_tail(failed.id, 1, OutputStream::Stderr, 3)
        .unwrap()
        .unwrap();
    assert_eq!((start, tail.data.as_str()), (2, "om\n"));

    let first = run(
        &wrapper,
        NewTask::new(
            "code",
            json!({"language": "python", "code": "total = 40", "session_id": "calc"}),
        ),
    )
    .await;
    assert_eq!(first.status, Status::Completed, "{first:?}");
    let second = run(
        &wrapper,
        NewTask::new(
            "code",
            json!({"language": "python", "code": "total + 2", "session_id": "calc"}),
        ),
    )
    .await;
    assert_eq!(
        second.result.as_ref().unwrap()["output_tail"],
        "42\n",
        "{second:?}"
    );
    assert_eq!(second.result.as_ref().unwrap()["session_id"], "calc");

    // Bad params are refused at submit, with what to do.
    let error = wrapper
        .submit(NewTask::new("command", json!({"comand": "ls"})))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("unknown field `comand`"), "{error}");
    let error = wrapper
        .submit(NewTask::new(
            "code",
            json!({"language": "cobol", "code": "x"}),
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("use \"python\", \"node\" or \"bash\""),
        "{error}"
    );
    wrapper.graceful_shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_task_types_are_checked_at_submit_and_run_their_template() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), &unique_marker());
    config.task_types = TaskTypes::from_toml_str(
        r#"
[[task_type]]
name = "greet"
command = ["printf", "%s|%s\n", "{name}", "{punct}"]
max_retries = 0
[task_type.params_schema]
type = "object"
required = ["name"]
properties.name = { type = "string", minLength = 1 }
properties.punct = { type = "string", default = "!" }
"#,
    )
    .unwrap();
    let wrapper = start(dir.path(), config).await;
    let error = wrapper
        .submit(wrapper.new_task("greet", json!({})))
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("\"name\" is a required property"), "{error}");
    let task = run(
        &wrapper,
        wrapper.new_task("greet", json!({"name": "a; rm -rf / #"})),
    )
    .await;
    assert_eq!(task.status, Status::Completed, "{task:?}");
    assert_eq!(task.result.unwrap()["output_tail"], "a; rm -rf / #|!\n");
    assert_eq!(task.max_attempts, 1);
    wrapper.graceful_shutdown(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_pause_resume_and_restart_of_the_background_loops() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), &unique_marker());
    config.sessions.cleanup_interval = Duration::from_millis(50);
    let wrapper = start(dir.path(), config).await;
    eventually("every loop to be running", || {
        wrapper.supervisor().status().iter().all(|c| c.exists)
    })
    .await;
    let health = wrapper.health_check().await;
    let text = serde_json::to_value(&health).unwrap();
    for loop_name in [
        "session_cleanup",
        "orphan_cleanup",
        "task_heartbeat",
        "lease_reaper",
        "retention_pruner",
        "task_dispatcher",
    ] {
        assert!(
            text["background_tasks"]["components"][loop_name]["exists"] == true,
            "{loop_name}: {text:#}"
        );
    }
    assert!(health.components.session_manager.cleanup_task_healthy);
    assert!(
        health
            .components
            .resource_manager
            .orphan_cleanup_task_healthy
    );
    assert_eq!(
        text["background_tasks"]["components"]["session_manager"]["cleanup_interval_seconds"],
        0.05
    );
    assert!(
        text["components"]["sandbox"]["isolation"]
            .as_str()
            .is_some()
    );

    // Paused: the loops stay alive and skip their work; the dispatcher starts nothing.
    let report = wrapper.pause_background_tasks();
    assert_eq!(report.status, ActionStatus::PartialSuccess, "{report:?}");
    assert!(
        report.errors.iter().any(|e| e.contains("task_heartbeat")),
        "{report:?}"
    );
    assert_eq!(
        wrapper.get_background_task_status().overall_status,
        HealthStatus::Degraded
    );
    let id = wrapper
        .submit(NewTask::new("command", json!({"argv": ["true"]})))
        .await
        .unwrap()
        .task
        .id;
    let skipped_before = wrapper
        .supervisor()
        .child("session_cleanup")
        .unwrap()
        .skipped_cycles;
    eventually("skipped cleanup cycles", || {
        wrapper
            .supervisor()
            .child("session_cleanup")
            .unwrap()
            .skipped_cycles
            > skipped_before + 2
    })
    .await;
    assert!(
        wrapper
            .supervisor()
            .child("session_cleanup")
            .unwrap()
            .exists
    );
    // The submit itself may claim the task at once (a free slot); otherwise it waits.
    let status = wrapper.engine().get(id).await.unwrap().status;
    let report = wrapper.resume_background_tasks();
    assert_eq!(report.status, ActionStatus::Success, "{report:?}");
    let task = wrapper
        .engine()
        .wait(id, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(task.status, Status::Completed, "was {status:?}: {task:?}");
    assert_eq!(
        wrapper
            .health_check()
            .await
            .status
            .max(HealthStatus::Degraded),
        HealthStatus::Degraded
    );

    // Restarting when nothing is wrong does nothing; a restart of one loop revives it.
    assert_eq!(
        wrapper.restart_background_tasks().await.status,
        ActionStatus::NoActionNeeded
    );
    wrapper.supervisor().restart("lease_reaper").await.unwrap();
    eventually("the reaper to run again", || {
        wrapper.supervisor().child("lease_reaper").unwrap().state == ChildState::Running
    })
    .await;
    let report = wrapper.graceful_shutdown(Duration::from_secs(10)).await;
    assert_eq!(report.components_expected, 6);
    assert_eq!(report.components_stopped, 6, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_keeps_its_deadline_and_interrupted_tasks_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let marker = unique_marker();
    let wrapper = start(dir.path(), config(dir.path(), &marker)).await;
    let mut ids: Vec<TaskId> = Vec::new();
    for _ in 0..2 {
        let task = NewTask::new(
            "command",
            json!({"command": "setsid sh -c 'sleep 300' & sleep 300"}),
        );
        ids.push(wrapper.submit(task).await.unwrap().task.id);
    }
    eventually("both tasks to run", || run_processes(&marker).len() >= 4).await;
    let started = Instant::now();
    let report = wrapper.graceful_shutdown(Duration::from_secs(3)).await;
    let took = started.elapsed();
    eprintln!("shutdown: {report:?} in {took:?}");
    assert!(took < Duration::from_millis(3500), "{took:?}");
    assert_eq!(report.tasks_running_at_start, 2);
    assert_eq!(report.tasks_interrupted, 2);
    assert_eq!(report.status, ShutdownStatus::Success, "{report:?}");
    eventually("no sandboxed process left", || {
        marked_processes(&marker).is_empty()
    })
    .await;
    assert!(
        session_cgroups(&marker).is_empty(),
        "{:?}",
        session_cgroups(&marker)
    );
    drop(wrapper);

    // The next start runs them again (as new attempts that do not count against the limit).
    let wrapper = start(dir.path(), config(dir.path(), &marker)).await;
    for id in &ids {
        let task = wrapper.engine().get(*id).await.unwrap();
        assert!(
            matches!(task.status, Status::Queued | Status::Running),
            "{task:?}"
        );
    }
    eventually("the interrupted tasks to run again", || {
        run_processes(&marker).len() >= 4
    })
    .await;
    for id in &ids {
        wrapper.engine().cancel(*id).await.unwrap();
        let task = wrapper
            .engine()
            .wait(*id, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(task.status, Status::Cancelled);
    }
    eventually("no process after cancel", || {
        run_processes(&marker).is_empty()
    })
    .await;
    wrapper.graceful_shutdown(Duration::from_secs(5)).await;
    // The sessions' spawners go with the sessions.
    eventually("no sandboxed process left", || {
        marked_processes(&marker).is_empty()
    })
    .await;
}

/// Set for the child process of the SIGKILL test: the data directory to run in.
const CHILD_DATA_DIR: &str = "SANDBOX_WRAPPER_KILL_TEST_DIR";
const CHILD_MARKER: &str = "SANDBOX_WRAPPER_KILL_TEST_MARKER";

/// The child of [`a_sigkilled_instances_sandboxes_are_swept_at_the_next_start`]: starts a wrapper
/// with two escaping tasks, prints `ready` once they run, and waits to be killed.
#[test]
fn kill_test_child() {
    let (Some(dir), Some(marker)) = (
        std::env::var_os(CHILD_DATA_DIR),
        std::env::var(CHILD_MARKER).ok(),
    ) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let wrapper = start(&dir, config(&dir, &marker)).await;
        for session in ["k1", "k2"] {
            // Not run again after the kill (an interrupted task runs again by default): a rerun
            // would make its session anew while the test looks for the old one's leftovers.
            let task = NewTask::new(
                "command",
                json!({"command": "setsid sh -c 'sleep 300' & sleep 300", "session_id": session}),
            )
            .with_rerun_on_recovery(false);
            wrapper.submit(task).await.unwrap();
        }
        eventually("the tasks to run", || run_processes(&marker).len() >= 4).await;
        println!("ready");
        tokio::time::sleep(Duration::from_secs(300)).await;
    });
}

#[test]
fn a_sigkilled_instances_sandboxes_are_swept_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let marker = unique_marker();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "wrapper::kill_test_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DATA_DIR, dir.path())
        .env(CHILD_MARKER, &marker)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("ready") {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the child to start its tasks");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    let left_processes = marked_processes(&marker);
    let left_cgroups = session_cgroups(&marker);
    let sessions_dir = dir.path().join("sandboxes");
    let left_dirs: Vec<_> = std::fs::read_dir(&sessions_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    eprintln!(
        "after SIGKILL: {} processes, {} session cgroups, directories {left_dirs:?}",
        left_processes.len(),
        left_cgroups.len()
    );
    assert!(
        !left_dirs.is_empty(),
        "the killed instance left no sandbox to sweep"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut config = config(dir.path(), &marker);
        // Keep the recovered tasks from starting new sandboxes while we look.
        config.engine.concurrency = 1;
        let wrapper = start(dir.path(), config).await;
        wrapper.engine().pause_queue();
        let status = wrapper.get_background_task_status();
        assert!(
            status.components.resource_manager.total_orphans_cleaned > 0
                || left_processes.is_empty() && left_cgroups.is_empty(),
            "{status:?}"
        );
        eventually("the orphaned processes to be gone", || {
            marked_processes(&marker)
                .iter()
                .all(|pid| !left_processes.contains(pid))
        })
        .await;
        let still: Vec<_> = session_cgroups(&marker)
            .into_iter()
            .filter(|p| left_cgroups.contains(p))
            .collect();
        assert!(still.is_empty(), "{still:?}");
        for name in &left_dirs {
            assert!(!sessions_dir.join(name).exists(), "{name:?} is still there");
        }
        wrapper.graceful_shutdown(Duration::from_secs(5)).await;
    });
}

/// A store shared with other processes, as far as the wrapper can tell: a memory store that says
/// it is shared, changes the engine's settings, is not the maintenance leader and has a wake-up
/// loop. The wrapper knows no store type; it asks the store (`Store`'s capabilities).
struct SharedMemory {
    inner: task_core::store::memory::MemoryStore,
    leader_asked: std::sync::atomic::AtomicU64,
    wakeup_runs: Arc<std::sync::atomic::AtomicU64>,
}

mod shared_memory {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use task_core::store::{
        ClaimRequest, Command, Finish, Heartbeat, HeartbeatReply, ListFilter, Page, PageRequest,
        ProgressUpdate, Promoted, Recover, Stats, Store, StoreFuture, Submitted, WakeupLoop,
    };
    use task_core::{EngineConfig, Task, TaskId, Timestamp};

    impl Store for super::SharedMemory {
        fn submit(&self, tasks: Vec<Task>) -> StoreFuture<'_, Vec<Submitted>> {
            self.inner.submit(tasks)
        }
        fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, Vec<Task>> {
            self.inner.claim(request)
        }
        fn promote_due(&self, now: Timestamp) -> StoreFuture<'_, Promoted> {
            self.inner.promote_due(now)
        }
        fn finish(&self, finish: Finish) -> StoreFuture<'_, bool> {
            self.inner.finish(finish)
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
        fn command(&self, id: TaskId, command: Command, now: Timestamp) -> StoreFuture<'_, Task> {
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
        fn timed_out(&self) -> StoreFuture<'_, BTreeMap<String, u64>> {
            self.inner.timed_out()
        }
        fn flush(&self) -> StoreFuture<'_, ()> {
            self.inner.flush()
        }

        fn is_shared(&self) -> bool {
            true
        }
        fn engine_config(&self, config: EngineConfig) -> EngineConfig {
            EngineConfig {
                recover_running_at_start: false,
                idle_poll: Duration::from_secs(7),
                ..config
            }
        }
        fn is_maintenance_leader(&self) -> bool {
            self.leader_asked.fetch_add(1, Ordering::Relaxed);
            false
        }
        fn healthy_for(&self) -> Option<Duration> {
            None
        }
        fn wakeups(self: Arc<Self>) -> Option<WakeupLoop> {
            let runs = self.wakeup_runs.clone();
            Some(Arc::new(move |engine, cancel| {
                runs.fetch_add(1, Ordering::Relaxed);
                Box::pin(async move {
                    engine.wake();
                    cancel.cancelled().await;
                    Ok(())
                })
            }))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrapper_asks_the_store_for_leadership_wakeups_and_engine_settings() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let dir = tempfile::tempdir().unwrap();

    // A store one process owns: the engine recovers at start, no wake-up loop.
    let wrapper = Wrapper::start(
        Arc::new(task_core::store::memory::MemoryStore::new()),
        config(dir.path(), &unique_marker()),
    )
    .await
    .unwrap();
    assert!(wrapper.engine().config().recover_running_at_start);
    assert!(wrapper.supervisor().child("store_wakeups").is_none());
    wrapper.graceful_shutdown(Duration::from_secs(5)).await;

    // A shared one: its settings, its wake-up loop, maintenance only when it says so.
    let wakeup_runs = Arc::new(AtomicU64::new(0));
    let store = Arc::new(SharedMemory {
        inner: task_core::store::memory::MemoryStore::new(),
        leader_asked: AtomicU64::new(0),
        wakeup_runs: wakeup_runs.clone(),
    });
    let wrapper = Wrapper::start(store.clone(), config(dir.path(), &unique_marker()))
        .await
        .unwrap();
    let engine_config = wrapper.engine().config();
    assert!(!engine_config.recover_running_at_start);
    assert_eq!(engine_config.idle_poll, Duration::from_secs(7));
    let wakeups = wrapper
        .supervisor()
        .child("store_wakeups")
        .expect("a store_wakeups loop");
    assert!(!wakeups.pausable);
    eventually("the wake-up loop to run", || {
        wakeup_runs.load(Ordering::Relaxed) >= 1
    })
    .await;
    // The reaper (every 500 ms) and the pruner ask whether this node leads; it does not, so
    // they do nothing.
    eventually("the maintenance loops to ask for leadership", || {
        store.leader_asked.load(Ordering::Relaxed) >= 3
    })
    .await;
    let reaper = wrapper.supervisor().child("lease_reaper").unwrap();
    assert_eq!(reaper.items_total, 0);
    assert_eq!(reaper.errors, 0);
    let report = wrapper.graceful_shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        report.components_stopped, report.components_expected,
        "{report:?}"
    );
    assert_eq!(report.components_expected, 7, "six loops and the wake-ups");
}
