//! The engine end to end on real stores: ordering, limits, pauses, delays, idempotency,
//! timeouts, retries, cancellation, progress, events, waiting, ETA, leases, retention, shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use task_core::store::memory::MemoryStore;
use task_core::store::sqlite::{SqliteConfig, SqliteStore};
use task_core::store::{ClaimRequest, Store};
use task_core::{
    AttemptOutcome, Engine, EngineConfig, EngineLoops, Error, FailureKind, NewTask, Priority,
    RetryPolicy, Status, TaskEvent, TaskFailure, TaskId, Timestamp, handler_fn,
};
use tokio::sync::{Notify, mpsc};

const LONG: Duration = Duration::from_secs(20);

fn quick_config() -> EngineConfig {
    EngineConfig {
        concurrency: 4,
        cancel_grace: Duration::from_millis(200),
        idle_poll: Duration::from_millis(50),
        reaper_interval: Duration::from_millis(50),
        ..EngineConfig::default()
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        base_delay_ms: 10,
        max_delay_ms: 20,
    }
}

/// An engine on a memory store with an `echo` handler (returns its params), started.
async fn started(
    config: EngineConfig,
    extra: impl FnOnce(task_core::EngineBuilder) -> task_core::EngineBuilder,
) -> (Engine, EngineLoops) {
    started_on(Arc::new(MemoryStore::new()), config, extra).await
}

async fn started_on(
    store: Arc<dyn Store>,
    config: EngineConfig,
    extra: impl FnOnce(task_core::EngineBuilder) -> task_core::EngineBuilder,
) -> (Engine, EngineLoops) {
    let builder = Engine::builder(store).config(config).handler(
        "echo",
        handler_fn(|ctx| async move { Ok(ctx.params().clone()) }),
    );
    let engine = extra(builder).build().await.expect("engine builds");
    let loops = engine.start();
    (engine, loops)
}

async fn submit(engine: &Engine, task: NewTask) -> TaskId {
    engine.submit(task).await.expect("submit").task.id
}

/// Waits (up to [`LONG`]) for an event about task `id` that `wanted` accepts.
async fn seen(
    events: &mut tokio::sync::broadcast::Receiver<TaskEvent>,
    id: TaskId,
    wanted: impl Fn(&TaskEvent) -> bool,
) {
    tokio::time::timeout(LONG, async {
        loop {
            if let Ok(event) = events.recv().await
                && event.task_id() == id
                && wanted(&event)
            {
                return;
            }
        }
    })
    .await
    .expect("the awaited event came in time");
}

async fn finished(engine: &Engine, id: TaskId) -> task_core::Task {
    let task = engine.wait(id, LONG).await.expect("wait");
    assert!(
        task.status.is_terminal(),
        "task {id} still {} after {LONG:?}",
        task.status
    );
    task
}

#[tokio::test]
async fn runs_by_priority_then_submission_order() {
    let (order_tx, mut order_rx) = mpsc::unbounded_channel();
    let (engine, loops) = started(
        EngineConfig {
            concurrency: 1,
            ..quick_config()
        },
        |b| {
            b.handler(
                "record",
                handler_fn(move |ctx| {
                    let order_tx = order_tx.clone();
                    async move {
                        let _ = order_tx.send(ctx.params()["n"].as_i64().unwrap_or(-1));
                        Ok(Value::Null)
                    }
                }),
            )
        },
    )
    .await;
    engine.pause_queue();
    let priorities = [2, 9, 5, 9, 2, 5, 8];
    let mut ids = Vec::new();
    for (n, p) in priorities.iter().enumerate() {
        let task = NewTask::new("record", json!({ "n": n }))
            .with_priority(Priority::new(*p).expect("valid priority"));
        ids.push(submit(&engine, task).await);
    }
    engine.resume_queue();
    for id in &ids {
        finished(&engine, *id).await;
    }
    let mut order = Vec::new();
    while let Ok(n) = order_rx.try_recv() {
        order.push(n);
    }
    assert_eq!(order, vec![1, 3, 6, 2, 5, 0, 4]);
    loops.stop().await;
}

/// A handler that counts how many run at once, and holds each run until released.
struct Gate {
    now: AtomicUsize,
    peak: AtomicUsize,
    release: Notify,
    started: Notify,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate {
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            release: Notify::new(),
            started: Notify::new(),
        })
    }

    fn handler(self: &Arc<Gate>) -> impl task_core::TaskHandler {
        let gate = Arc::clone(self);
        handler_fn(move |_ctx| {
            let gate = Arc::clone(&gate);
            async move {
                let now = gate.now.fetch_add(1, Ordering::SeqCst) + 1;
                gate.peak.fetch_max(now, Ordering::SeqCst);
                let released = gate.release.notified();
                gate.started.notify_waiters();
                released.await;
                gate.now.fetch_sub(1, Ordering::SeqCst);
                Ok(Value::Null)
            }
        })
    }

    /// Waits until `count` runs are in the handler at once.
    async fn wait_running(&self, count: usize) {
        tokio::time::timeout(LONG, async {
            loop {
                let started = self.started.notified();
                if self.now.load(Ordering::SeqCst) >= count {
                    return;
                }
                started.await;
            }
        })
        .await
        .expect("handlers started in time");
    }
}

/// With the one slot busy, two low tasks wait; the later one, raised to high while the
/// dispatcher runs, starts first when the slot frees. A started task keeps its priority.
#[tokio::test]
async fn a_new_priority_orders_the_next_claims_of_a_running_dispatcher() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(
        SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.sqlite3"))).expect("open"),
    );
    let gate = Gate::new();
    let (order_tx, mut order_rx) = mpsc::unbounded_channel();
    let (engine, loops) = started_on(
        store,
        EngineConfig {
            concurrency: 1,
            ..quick_config()
        },
        |b| {
            b.handler("gate", gate.handler()).handler(
                "record",
                handler_fn(move |ctx| {
                    let order_tx = order_tx.clone();
                    async move {
                        let _ = order_tx.send(ctx.params()["name"].clone());
                        Ok(Value::Null)
                    }
                }),
            )
        },
    )
    .await;
    let busy = submit(&engine, NewTask::new("gate", Value::Null)).await;
    gate.wait_running(1).await;
    let low =
        |name: &str| NewTask::new("record", json!({ "name": name })).with_priority(Priority::LOW);
    let a = submit(&engine, low("a")).await;
    let b = submit(&engine, low("b")).await;
    let raised = engine
        .set_priority(b, Priority::HIGH)
        .await
        .expect("set priority");
    assert_eq!(
        (raised.status, raised.priority),
        (Status::Queued, Priority::HIGH)
    );

    let error = engine
        .set_priority(busy, Priority::CRITICAL)
        .await
        .expect_err("a running task");
    assert!(
        matches!(error, Error::IllegalTransition { .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("that is running") && text.contains("only waiting tasks"),
        "{text}"
    );
    assert_eq!(
        engine.get(busy).await.expect("get").priority,
        Priority::NORMAL
    );

    gate.release.notify_waiters();
    finished(&engine, a).await;
    finished(&engine, b).await;
    let mut order = Vec::new();
    while let Ok(name) = order_rx.try_recv() {
        order.push(name);
    }
    assert_eq!(order, [json!("b"), json!("a")]);
    loops.stop().await;
}

/// The engine deletes one owner's finished tasks on request, in batches, and nothing else.
#[tokio::test]
async fn delete_finished_cleans_up_one_owners_finished_tasks() {
    let (engine, loops) = started(quick_config(), |b| b).await;
    let mut mine = Vec::new();
    for n in 0..5 {
        mine.push(submit(&engine, NewTask::new("echo", json!(n)).with_owner("me")).await);
    }
    let theirs = submit(&engine, NewTask::new("echo", json!("x")).with_owner("them")).await;
    for id in mine.iter().chain([&theirs]) {
        finished(&engine, *id).await;
    }
    engine.pause_queue();
    let waiting = submit(&engine, NewTask::new("echo", json!("w")).with_owner("me")).await;
    let later = Timestamp::now().after(Duration::from_secs(1));
    let of_mine = task_core::store::ListFilter {
        owner: Some("me".into()),
        ..Default::default()
    };

    assert_eq!(
        engine
            .delete_finished(of_mine.clone(), Timestamp(0), 100)
            .await
            .expect("delete"),
        0,
        "nothing finished before 1970"
    );
    assert_eq!(
        engine
            .delete_finished(of_mine.clone(), later, 3)
            .await
            .expect("delete"),
        3
    );
    assert_eq!(
        engine
            .delete_finished(of_mine.clone(), later, usize::MAX)
            .await
            .expect("delete"),
        2
    );
    for id in &mine {
        assert!(matches!(
            engine.get(*id).await,
            Err(Error::TaskNotFound { .. })
        ));
    }
    assert_eq!(
        engine.get(theirs).await.expect("kept").status,
        Status::Completed
    );
    assert_eq!(
        engine.get(waiting).await.expect("kept").status,
        Status::Queued
    );
    let stats = engine.stats().await.expect("stats");
    assert_eq!(
        (
            stats.total(),
            stats.count(Status::Completed),
            stats.count(Status::Queued)
        ),
        (2, 1, 1)
    );
    loops.stop().await;
}

#[tokio::test]
async fn global_and_per_type_concurrency_limits_hold() {
    let gate = Gate::new();
    let limited = Gate::new();
    let config = EngineConfig {
        concurrency: 3,
        type_limits: [("limited".to_owned(), 1)].into_iter().collect(),
        ..quick_config()
    };
    let (engine, loops) = started(config, |b| {
        b.handler("gate", gate.handler())
            .handler("limited", limited.handler())
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(submit(&engine, NewTask::new("limited", Value::Null)).await);
    }
    for _ in 0..6 {
        ids.push(submit(&engine, NewTask::new("gate", Value::Null)).await);
    }
    // One limited task and two gate tasks fill the three slots.
    limited.wait_running(1).await;
    gate.wait_running(2).await;
    assert_eq!(engine.running_count(), 3);
    // Keep releasing whoever is in the handlers until all ten completed.
    tokio::time::timeout(LONG, async {
        loop {
            gate.release.notify_waiters();
            limited.release.notify_waiters();
            let stats = engine.stats().await.expect("stats");
            if stats.count(Status::Completed) == 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("all tasks completed in time");
    assert_eq!(
        limited.peak.load(Ordering::SeqCst),
        1,
        "the per-type limit of 1 was exceeded"
    );
    assert!(gate.peak.load(Ordering::SeqCst) <= 3);
    loops.stop().await;
}

#[tokio::test]
async fn paused_queue_and_paused_type_start_nothing_until_resumed() {
    let (engine, loops) = started(quick_config(), |b| b).await;
    engine.pause_queue();
    let id = submit(&engine, NewTask::new("echo", json!(1))).await;
    let still = engine
        .wait(id, Duration::from_millis(150))
        .await
        .expect("wait");
    assert_eq!(still.status, Status::Queued);
    engine.resume_queue();
    assert_eq!(finished(&engine, id).await.status, Status::Completed);

    engine.pause_type("echo");
    assert_eq!(engine.paused_types(), vec!["echo".to_owned()]);
    let id = submit(&engine, NewTask::new("echo", json!(2))).await;
    let still = engine
        .wait(id, Duration::from_millis(150))
        .await
        .expect("wait");
    assert_eq!(still.status, Status::Queued);
    engine.resume_type("echo");
    assert_eq!(finished(&engine, id).await.result, Some(json!(2)));
    loops.stop().await;
}

#[tokio::test]
async fn a_paused_task_waits_until_resumed_and_a_resume_of_a_queued_task_is_refused() {
    let (engine, loops) = started(quick_config(), |b| b).await;
    engine.pause_queue();
    let id = submit(&engine, NewTask::new("echo", json!("held"))).await;
    assert_eq!(
        engine.pause_task(id).await.expect("pause").status,
        Status::Paused
    );
    engine.resume_queue();
    let still = engine
        .wait(id, Duration::from_millis(150))
        .await
        .expect("wait");
    assert_eq!(still.status, Status::Paused);
    let error = engine.pause_task(id).await.expect_err("already paused");
    assert!(error.to_string().contains("already paused"), "{error}");
    assert_eq!(
        engine.resume_task(id).await.expect("resume").status,
        Status::Queued
    );
    assert_eq!(finished(&engine, id).await.status, Status::Completed);
    let error = engine.resume_task(id).await.expect_err("completed");
    assert!(matches!(error, Error::IllegalTransition { .. }), "{error}");
    loops.stop().await;
}

#[tokio::test]
async fn delayed_tasks_wait_for_run_at() {
    let (engine, loops) = started(quick_config(), |b| b).await;
    let run_at = Timestamp::now().after(Duration::from_millis(300));
    let id = submit(&engine, NewTask::new("echo", json!(1)).with_run_at(run_at)).await;
    assert_eq!(engine.get(id).await.expect("get").status, Status::Scheduled);
    let task = finished(&engine, id).await;
    assert_eq!(task.status, Status::Completed);
    assert!(
        task.started_at.expect("started") >= run_at,
        "started before its run_at"
    );
    loops.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_task() {
    let (engine, loops) = started(quick_config(), |b| b).await;
    let first = engine
        .submit(
            NewTask::new("echo", json!(1))
                .with_idempotency_key("k")
                .with_owner("alice"),
        )
        .await
        .expect("submit");
    let second = engine
        .submit(
            NewTask::new("echo", json!(2))
                .with_idempotency_key("k")
                .with_owner("alice"),
        )
        .await
        .expect("submit");
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.task.id, second.task.id);
    let other = engine
        .submit(
            NewTask::new("echo", json!(3))
                .with_idempotency_key("k")
                .with_owner("bob"),
        )
        .await
        .expect("submit");
    assert!(other.created);
    assert_ne!(other.task.id, first.task.id);
    loops.stop().await;
}

#[tokio::test]
async fn a_timeout_fails_the_attempt_and_retries_follow_until_attempts_run_out() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&attempts);
    let (engine, loops) = started(quick_config(), |b| {
        b.handler(
            "slow",
            handler_fn(move |ctx| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    ctx.cancellation().cancelled().await;
                    // What the stopped work left is kept for a timeout, beside its error.
                    let facts = json!({"timed_out": ctx.timed_out(), "attempt": ctx.attempt()});
                    Err(TaskFailure::retryable("stopped").with_result(facts))
                }
            }),
        )
    })
    .await;
    let task = NewTask::new("slow", Value::Null)
        .with_timeout(Duration::from_millis(50))
        .with_max_attempts(3)
        .with_retry(fast_retry());
    let id = submit(&engine, task).await;
    let task = finished(&engine, id).await;
    assert_eq!(task.status, Status::Failed);
    assert_eq!(task.attempt, 3);
    let error = task.error.expect("an error");
    assert_eq!(error.kind, FailureKind::Timeout);
    assert!(
        error.message.contains("timed out after 0.1 s"),
        "{}",
        error.message
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(task.result, Some(json!({"timed_out": true, "attempt": 3})));
    loops.stop().await;
}

/// A cancel is not a timeout: the handler is told so, and its failure's result is not kept.
#[tokio::test]
async fn a_cancelled_attempt_is_not_timed_out_and_keeps_no_result() {
    let told = Arc::new(Mutex::new(None));
    let tell = Arc::clone(&told);
    let (engine, loops) = started(quick_config(), |b| {
        b.handler(
            "slow",
            handler_fn(move |ctx| {
                let tell = Arc::clone(&tell);
                async move {
                    ctx.progress(0.1, None).await?;
                    ctx.cancellation().cancelled().await;
                    *tell.lock().unwrap() = Some(ctx.timed_out());
                    Err(TaskFailure::retryable("stopped").with_result(json!("kept?")))
                }
            }),
        )
    })
    .await;
    let mut events = engine.subscribe();
    let id = submit(&engine, NewTask::new("slow", Value::Null)).await;
    seen(&mut events, id, |e| matches!(e, TaskEvent::Progress { .. })).await;
    engine.cancel(id).await.expect("cancel");
    let task = finished(&engine, id).await;
    assert_eq!((task.status, task.result), (Status::Cancelled, None));
    assert_eq!(
        *told.lock().unwrap(),
        Some(false),
        "a cancel is not a timeout"
    );
    loops.stop().await;
}

#[tokio::test]
async fn errors_retry_when_retryable_and_stop_when_permanent() {
    let (engine, loops) = started(quick_config(), |b| {
        b.handler(
            "flaky",
            handler_fn(|ctx| async move {
                if ctx.attempt() < 3 {
                    Err(TaskFailure::retryable(format!(
                        "attempt {} failed",
                        ctx.attempt()
                    )))
                } else {
                    Ok(json!({"attempt": ctx.attempt()}))
                }
            }),
        )
        .handler(
            "broken",
            handler_fn(|_ctx| async { Err(TaskFailure::permanent("bad params")) }),
        )
        .handler(
            "panics",
            handler_fn(|ctx| async move {
                if ctx.attempt() == 1 {
                    panic!("boom");
                }
                Ok(json!("recovered"))
            }),
        )
    })
    .await;
    let flaky = submit(
        &engine,
        NewTask::new("flaky", Value::Null)
            .with_max_attempts(5)
            .with_retry(fast_retry()),
    )
    .await;
    let broken = submit(
        &engine,
        NewTask::new("broken", Value::Null).with_max_attempts(5),
    )
    .await;
    let panics = submit(
        &engine,
        NewTask::new("panics", Value::Null)
            .with_max_attempts(2)
            .with_retry(fast_retry()),
    )
    .await;
    let flaky = finished(&engine, flaky).await;
    assert_eq!((flaky.status, flaky.attempt), (Status::Completed, 3));
    assert_eq!(flaky.result, Some(json!({"attempt": 3})));
    let broken = finished(&engine, broken).await;
    assert_eq!((broken.status, broken.attempt), (Status::Failed, 1));
    assert_eq!(broken.error.expect("error").message, "bad params");
    let panics = finished(&engine, panics).await;
    assert_eq!((panics.status, panics.attempt), (Status::Completed, 2));
    loops.stop().await;
}

#[tokio::test]
async fn cancelling_queued_and_running_tasks() {
    let (engine, loops) = started(quick_config(), |b| {
        b.handler(
            "cooperative",
            handler_fn(|ctx| async move {
                ctx.progress(0.1, Some("started".into())).await?;
                ctx.cancellation().cancelled().await;
                Ok(json!("stopped"))
            }),
        )
        .handler(
            "stubborn",
            handler_fn(|ctx| async move {
                ctx.progress(0.1, None).await?;
                std::future::pending::<()>().await;
                Ok(Value::Null)
            }),
        )
    })
    .await;
    let mut events = engine.subscribe();
    engine.pause_queue();
    let queued = submit(&engine, NewTask::new("echo", Value::Null)).await;
    let task = engine.cancel(queued).await.expect("cancel");
    assert_eq!(task.status, Status::Cancelled);
    let error = engine.cancel(queued).await.expect_err("twice");
    assert!(error.to_string().contains("already finished"), "{error}");
    engine.resume_queue();

    for task_type in ["cooperative", "stubborn"] {
        let id = submit(
            &engine,
            NewTask::new(task_type, Value::Null).with_max_attempts(3),
        )
        .await;
        // Wait until it runs (its progress event), then cancel.
        seen(&mut events, id, |e| matches!(e, TaskEvent::Progress { .. })).await;
        let running = engine.cancel(id).await.expect("cancel running");
        assert_eq!(running.status, Status::Running);
        assert!(running.cancel_requested);
        let task = finished(&engine, id).await;
        assert_eq!(task.status, Status::Cancelled, "{task_type}");
        assert_eq!(
            task.attempt, 1,
            "{task_type}: a cancelled task is not retried"
        );
    }
    loops.stop().await;
}

#[tokio::test]
async fn progress_is_validated_recorded_and_published() {
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let (engine, loops) = started(quick_config(), |b| {
        b.handler(
            "steps",
            handler_fn(move |ctx| {
                let seen_tx = seen_tx.clone();
                async move {
                    for bad in [f64::NAN, -0.1, 1.5, f64::INFINITY] {
                        let error = ctx.progress(bad, None).await.expect_err("invalid progress");
                        let _ = seen_tx.send(error.to_string());
                    }
                    ctx.progress(0.25, Some("a quarter".into())).await?;
                    ctx.progress(0.5, None).await?;
                    Ok(Value::Null)
                }
            }),
        )
    })
    .await;
    let mut events = engine.subscribe();
    let id = submit(&engine, NewTask::new("steps", Value::Null)).await;
    let task = finished(&engine, id).await;
    assert_eq!(task.status, Status::Completed);
    assert_eq!(task.progress, Some(1.0));
    assert_eq!(task.progress_message.as_deref(), Some("a quarter"));
    for _ in 0..4 {
        let message = seen_rx.recv().await.expect("a refusal");
        assert!(message.contains("from 0.0 to 1.0"), "{message}");
    }
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        if event.task_id() == id {
            seen.push(event);
        }
    }
    let statuses: Vec<Status> = seen
        .iter()
        .filter_map(|e| match e {
            TaskEvent::Status { status, .. } => Some(*status),
            TaskEvent::Progress { .. } => None,
        })
        .collect();
    assert_eq!(
        statuses,
        vec![Status::Queued, Status::Running, Status::Completed]
    );
    let progress: Vec<f64> = seen
        .iter()
        .filter_map(|e| match e {
            TaskEvent::Progress { progress, .. } => Some(*progress),
            TaskEvent::Status { .. } => None,
        })
        .collect();
    assert_eq!(progress, vec![0.25, 0.5]);
    loops.stop().await;
}

#[tokio::test]
async fn eta_comes_from_progress_then_from_recent_durations() {
    let gate = Notify::new();
    let gate = Arc::new(gate);
    let hold = Arc::clone(&gate);
    let (engine, loops) = started(quick_config(), |b| {
        b.handler(
            "half",
            handler_fn(move |ctx| {
                let hold = Arc::clone(&hold);
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    ctx.progress(0.5, None).await?;
                    hold.notified().await;
                    Ok(Value::Null)
                }
            }),
        )
    })
    .await;
    let queued = engine
        .get(submit(&engine, NewTask::new("echo", Value::Null)).await)
        .await
        .expect("get");
    let id = queued.id;
    finished(&engine, id).await;
    let done = engine.get(id).await.expect("get");
    assert_eq!(engine.eta(&done), Some(Duration::ZERO));
    // A type that has completed tasks has a typical duration.
    let next = NewTask::new("echo", Value::Null);
    let pending = next.into_task(TaskId::new(), Timestamp::now());
    assert!(engine.eta(&pending).is_some());

    let mut events = engine.subscribe();
    let id = submit(&engine, NewTask::new("half", Value::Null)).await;
    let fresh = NewTask::new("half", Value::Null).into_task(TaskId::new(), Timestamp::now());
    assert_eq!(
        engine.eta(&fresh),
        None,
        "no progress and no history: unknown"
    );
    seen(&mut events, id, |e| matches!(e, TaskEvent::Progress { .. })).await;
    let running = engine.get(id).await.expect("get");
    let eta = engine.eta(&running).expect("an ETA from progress");
    // Half done after about 100 ms: about 100 ms to go.
    assert!(
        eta >= Duration::from_millis(50) && eta <= Duration::from_secs(5),
        "{eta:?}"
    );
    gate.notify_waiters();
    finished(&engine, id).await;
    loops.stop().await;
}

/// `sleep 60` with no progress showed "0% done, about 2 s left": the ETA came from other
/// commands of the same type. Only the history of the same kind of task (same type, same
/// parameters) counts, and a run longer than that history has no ETA.
#[tokio::test]
async fn an_eta_comes_only_from_the_same_kind_of_task_and_not_past_it() {
    let gate = Arc::new(Notify::new());
    let hold = Arc::clone(&gate);
    let (engine, loops) = started(quick_config(), |b| {
        b.handler(
            "sleep",
            handler_fn(move |ctx| {
                let hold = Arc::clone(&hold);
                async move {
                    if ctx.params()["hold"] == true {
                        hold.notified().await;
                    }
                    Ok(Value::Null)
                }
            }),
        )
    })
    .await;
    let quick = json!({"seconds": 0});
    let id = submit(&engine, NewTask::new("sleep", quick.clone())).await;
    finished(&engine, id).await;
    let same = NewTask::new("sleep", quick).into_task(TaskId::new(), Timestamp::now());
    assert!(engine.eta(&same).is_some(), "the same kind has a history");
    let other =
        NewTask::new("sleep", json!({"seconds": 60})).into_task(TaskId::new(), Timestamp::now());
    assert_eq!(
        engine.eta(&other),
        None,
        "another kind of the same type has none"
    );

    // Running past its kind's typical duration, with no progress: no ETA rather than "0 s".
    let held = json!({"hold": true});
    let mut events = engine.subscribe();
    let first = submit(&engine, NewTask::new("sleep", held.clone())).await;
    seen(&mut events, first, |e| {
        matches!(
            e,
            TaskEvent::Status {
                status: Status::Running,
                ..
            }
        )
    })
    .await;
    // A permit if the handler is not waiting yet.
    gate.notify_one();
    finished(&engine, first).await;
    let second = submit(&engine, NewTask::new("sleep", held)).await;
    seen(&mut events, second, |e| {
        matches!(
            e,
            TaskEvent::Status {
                status: Status::Running,
                ..
            }
        )
    })
    .await;
    let typical = engine
        .eta(&engine.get(second).await.expect("get"))
        .map(|d| d.as_millis());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let running = engine.get(second).await.expect("get");
    assert_eq!(running.status, Status::Running);
    assert_eq!(
        engine.eta(&running),
        None,
        "past the typical duration (about {typical:?} ms) there is no ETA"
    );
    // A permit if the handler is not waiting yet.
    gate.notify_one();
    finished(&engine, second).await;
    loops.stop().await;
}

#[tokio::test]
async fn results_over_the_cap_fail_the_task() {
    let config = EngineConfig {
        max_result_bytes: 64,
        ..quick_config()
    };
    let (engine, loops) = started(config, |b| b).await;
    let id = submit(&engine, NewTask::new("echo", json!("x".repeat(100)))).await;
    let task = finished(&engine, id).await;
    assert_eq!(task.status, Status::Failed);
    let message = task.error.expect("error").message;
    assert!(message.contains("over the limit of 64 bytes"), "{message}");
    loops.stop().await;
}

#[tokio::test]
async fn unknown_task_types_are_refused_at_submit() {
    let (engine, loops) = started(quick_config(), |b| b).await;
    let error = engine
        .submit(NewTask::new("nope", Value::Null))
        .await
        .expect_err("unknown");
    let message = error.to_string();
    assert!(
        message.contains("`nope`") && message.contains("echo"),
        "{message}"
    );
    loops.stop().await;
}

#[tokio::test]
async fn wait_returns_the_current_state_at_its_timeout() {
    let (engine, loops) = started(quick_config(), |b| b).await;
    engine.pause_queue();
    let id = submit(&engine, NewTask::new("echo", Value::Null)).await;
    let task = engine
        .wait(id, Duration::from_millis(20))
        .await
        .expect("wait");
    assert_eq!(task.status, Status::Queued);
    let missing = engine
        .wait(TaskId::new(), Duration::from_millis(20))
        .await
        .expect_err("missing");
    assert!(matches!(missing, Error::TaskNotFound { .. }));
    loops.stop().await;
}

#[tokio::test]
async fn the_lease_reaper_recovers_a_dead_workers_task() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let config = EngineConfig {
        recover_running_at_start: false,
        ..quick_config()
    };
    let (engine, loops) = started_on(Arc::clone(&store), config, |b| b).await;
    engine.pause_queue();
    let retried = submit(
        &engine,
        NewTask::new("echo", json!("again")).with_max_attempts(2),
    )
    .await;
    let lost = submit(&engine, NewTask::new("echo", json!("once"))).await;
    // Another "worker" claims both with a lease that has already run out, and dies.
    let now = Timestamp::now();
    let claimed = store
        .claim(ClaimRequest {
            max: 10,
            now,
            lease_until: now,
            exclude_types: vec![],
            type_room: vec![],
        })
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 2);
    engine.resume_queue();
    let retried = finished(&engine, retried).await;
    assert_eq!((retried.status, retried.attempt), (Status::Completed, 2));
    // Its only attempt was lost, which does not count: it runs again.
    let lost = finished(&engine, lost).await;
    assert_eq!(
        (lost.status, lost.attempt, lost.max_attempts),
        (Status::Completed, 2, 1)
    );
    assert_eq!(lost.interrupted_attempts, 1);
    loops.stop().await;
}

#[tokio::test]
async fn retention_prunes_old_terminal_tasks_only() {
    let (engine, loops) = started(quick_config(), |b| b).await;
    let done = submit(&engine, NewTask::new("echo", Value::Null)).await;
    finished(&engine, done).await;
    engine.pause_queue();
    let queued = submit(&engine, NewTask::new("echo", Value::Null)).await;
    assert_eq!(
        engine
            .prune_older_than(Duration::from_secs(3600))
            .await
            .expect("prune"),
        0
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(
        engine
            .prune_older_than(Duration::ZERO)
            .await
            .expect("prune"),
        1
    );
    assert!(matches!(
        engine.get(done).await,
        Err(Error::TaskNotFound { .. })
    ));
    assert_eq!(
        engine.get(queued).await.expect("kept").status,
        Status::Queued
    );
    loops.stop().await;
}

#[tokio::test]
async fn shutdown_lets_short_tasks_finish_and_requeues_the_rest_for_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tasks.sqlite3");
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(&path)).expect("open"));
    let gate = Gate::new();
    let (engine, loops) =
        started_on(store, quick_config(), |b| b.handler("gate", gate.handler())).await;
    let quick = submit(&engine, NewTask::new("echo", json!(1))).await;
    finished(&engine, quick).await;
    let held = submit(&engine, NewTask::new("gate", Value::Null)).await;
    gate.wait_running(1).await;
    let report = engine.shutdown(Duration::from_millis(400)).await;
    assert_eq!(report.running_at_start, 1);
    assert_eq!(report.interrupted, 1);
    let error = engine
        .submit(NewTask::new("echo", Value::Null))
        .await
        .expect_err("closed");
    assert!(matches!(error, Error::ShuttingDown));
    loops.stop().await;
    let task = engine.get(held).await.expect("get");
    assert_eq!(
        task.status,
        Status::Queued,
        "an interrupted task goes back to the queue"
    );
    assert_eq!(
        (task.max_attempts, task.interrupted_attempts),
        (1, 1),
        "the interrupted attempt does not count, and the limit is the user's"
    );
    drop(engine);

    // The next start runs it.
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(&path)).expect("reopen"));
    let (engine, loops) = started_on(store, quick_config(), |b| {
        b.handler(
            "gate",
            handler_fn(|_ctx| async { Ok(json!("second life")) }),
        )
    })
    .await;
    let task = finished(&engine, held).await;
    assert_eq!(task.status, Status::Completed);
    assert_eq!(task.result, Some(json!("second life")));
    loops.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_a_long_attempt_s_lease_alive() {
    let config = EngineConfig {
        lease: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(50),
        ..quick_config()
    };
    let (engine, loops) = started(config, |b| {
        b.handler(
            "long",
            handler_fn(|_ctx| async {
                tokio::time::sleep(Duration::from_millis(900)).await;
                Ok(json!("done"))
            }),
        )
    })
    .await;
    let id = submit(
        &engine,
        NewTask::new("long", Value::Null).with_max_attempts(3),
    )
    .await;
    let task = finished(&engine, id).await;
    assert_eq!(task.status, Status::Completed);
    assert_eq!(
        task.attempt, 1,
        "the lease expired although the worker was alive"
    );
    loops.stop().await;
}

#[tokio::test]
async fn a_freed_slot_of_a_limited_type_is_used_at_once_while_other_tasks_run() {
    // Ten long tasks hold slots of a large engine while quick tasks of a type limited to one at
    // a time go through. Without a wake-up on each of their ends, each would wait for the idle
    // poll or heartbeat (made a minute long here) and the test would time out.
    let gate = Gate::new();
    let config = EngineConfig {
        concurrency: 64,
        idle_poll: Duration::from_secs(60),
        heartbeat_interval: Duration::from_secs(60),
        lease: Duration::from_secs(180),
        type_limits: [("one_at_a_time".to_owned(), 1)].into_iter().collect(),
        ..quick_config()
    };
    let (engine, loops) = started(config, |b| {
        b.handler("gate", gate.handler()).handler(
            "one_at_a_time",
            handler_fn(|_ctx| async { Ok(json!("done")) }),
        )
    })
    .await;
    for _ in 0..10 {
        submit(&engine, NewTask::new("gate", Value::Null)).await;
    }
    gate.wait_running(10).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(submit(&engine, NewTask::new("one_at_a_time", Value::Null)).await);
    }
    for id in ids {
        assert_eq!(finished(&engine, id).await.status, Status::Completed);
    }
    gate.release.notify_waiters();
    loops.stop().await;
}

#[tokio::test]
async fn leases_are_renewed_while_a_shutdown_waits_for_running_tasks() {
    let config = EngineConfig {
        lease: Duration::from_millis(600),
        heartbeat_interval: Duration::from_millis(100),
        recover_running_at_start: false,
        ..quick_config()
    };
    let (engine, loops) = started(config, |b| {
        b.handler(
            "slow",
            handler_fn(|_ctx| async {
                tokio::time::sleep(Duration::from_millis(1_500)).await;
                Ok(json!("finished during the drain"))
            }),
        )
    })
    .await;
    let mut events = engine.subscribe();
    let id = submit(&engine, NewTask::new("slow", Value::Null)).await;
    seen(&mut events, id, |e| {
        matches!(
            e,
            TaskEvent::Status {
                status: Status::Running,
                ..
            }
        )
    })
    .await;
    let report = engine.shutdown(Duration::from_secs(8)).await;
    assert_eq!(report.interrupted, 0, "the task had time to finish");
    let task = engine.get(id).await.expect("get");
    assert_eq!(task.status, Status::Completed, "{task:?}");
    assert_eq!(task.attempt, 1);
    loops.stop().await;
}

#[tokio::test]
async fn a_shutdown_shorter_than_the_cancel_grace_still_requeues_a_stubborn_task() {
    let config = EngineConfig {
        cancel_grace: Duration::from_secs(30),
        ..quick_config()
    };
    let gate = Gate::new();
    let (engine, loops) = started(config, |b| b.handler("gate", gate.handler())).await;
    let id = submit(&engine, NewTask::new("gate", Value::Null)).await;
    gate.wait_running(1).await;
    let report = engine.shutdown(Duration::from_millis(500)).await;
    assert_eq!(report.interrupted, 1);
    assert!(
        report.duration < Duration::from_secs(10),
        "the shutdown waited for the whole grace: {:?}",
        report.duration
    );
    let task = engine.get(id).await.expect("get");
    assert_eq!(task.status, Status::Queued, "{task:?}");
    loops.stop().await;
}

#[tokio::test]
async fn a_cancel_during_a_timeouts_grace_is_not_lost_to_a_retry() {
    let (engine, loops) = started(quick_config(), |b| {
        b.handler(
            "stubborn",
            handler_fn(|_ctx| async {
                std::future::pending::<()>().await;
                Ok(Value::Null)
            }),
        )
    })
    .await;
    let mut events = engine.subscribe();
    let task = NewTask::new("stubborn", Value::Null)
        .with_timeout(Duration::from_millis(50))
        .with_max_attempts(3)
        .with_retry(fast_retry());
    let id = submit(&engine, task).await;
    seen(&mut events, id, |e| {
        matches!(
            e,
            TaskEvent::Status {
                status: Status::Running,
                ..
            }
        )
    })
    .await;
    // The timeout fires after 50 ms and the handler ignores it for its 200 ms grace: cancel
    // within that window.
    tokio::time::sleep(Duration::from_millis(100)).await;
    engine.cancel(id).await.expect("cancel");
    let task = finished(&engine, id).await;
    assert_eq!(task.status, Status::Cancelled, "{task:?}");
    assert_eq!(task.attempt, 1);
    loops.stop().await;
}

#[tokio::test]
async fn values_nested_too_deep_are_refused_and_a_huge_timeout_is_no_timeout() {
    fn nested(depth: usize) -> Value {
        (0..depth).fold(json!(1), |inner, _| json!([inner]))
    }
    let (engine, loops) = started(quick_config(), |b| {
        b.handler("deep_result", handler_fn(|_ctx| async { Ok(nested(100)) }))
    })
    .await;
    let error = engine
        .submit(NewTask::new("echo", nested(100)))
        .await
        .expect_err("too deep");
    assert!(error.to_string().contains("64 levels"), "{error}");
    let fine = submit(&engine, NewTask::new("echo", nested(60))).await;
    assert_eq!(finished(&engine, fine).await.status, Status::Completed);
    let deep = submit(&engine, NewTask::new("deep_result", Value::Null)).await;
    let deep = finished(&engine, deep).await;
    assert_eq!(deep.status, Status::Failed);
    assert!(deep.error.expect("error").message.contains("64 levels"));

    let forever = submit(
        &engine,
        NewTask::new("echo", json!("x")).with_timeout(Duration::MAX),
    )
    .await;
    assert_eq!(finished(&engine, forever).await.status, Status::Completed);
    assert_eq!(engine.running_count(), 0);

    // A sliver of progress gives no estimate from its rate, rather than a panic.
    let mut running = NewTask::new("echo", Value::Null).into_task(TaskId::new(), Timestamp::now());
    running.status = Status::Running;
    running.started_at = Some(Timestamp(Timestamp::now().0 - 1_000));
    running.progress = Some(5e-324);
    let _ = engine.eta(&running);
    running.progress = Some(1e-9);
    let _ = engine.eta(&running);
    loops.stop().await;
}

#[tokio::test]
async fn a_running_task_paused_is_frozen_and_its_timeout_clock_stops() {
    // Ten steps of 30 ms, each taken only while the task is not paused: 300 ms of work under a
    // 450 ms timeout, paused for 600 ms in the middle.
    let (engine, loops) = started(quick_config(), |b| {
        b.handler(
            "steps",
            handler_fn(|ctx| async move {
                let mut paused = ctx.paused();
                for _ in 0..10 {
                    while *paused.borrow_and_update() {
                        if paused.changed().await.is_err() {
                            break;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                Ok(json!("done"))
            }),
        )
    })
    .await;
    let running = |e: &TaskEvent| {
        matches!(
            e,
            TaskEvent::Status {
                status: Status::Running,
                ..
            }
        )
    };
    let mut events = engine.subscribe();
    let id = submit(
        &engine,
        NewTask::new("steps", json!({})).with_timeout(Duration::from_millis(450)),
    )
    .await;
    seen(&mut events, id, running).await;
    let frozen = engine.pause_task(id).await.expect("pause a running task");
    assert_eq!(frozen.status, Status::Paused);
    assert!(frozen.lease_until.is_some(), "the attempt keeps its lease");
    let error = engine.pause_task(id).await.expect_err("already paused");
    assert!(error.to_string().contains("already paused"), "{error}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(engine.get(id).await.unwrap().status, Status::Paused);
    let resumed = engine.resume_task(id).await.expect("resume");
    assert_eq!(resumed.status, Status::Running);
    let done = finished(&engine, id).await;
    assert_eq!(done.status, Status::Completed, "{done:?}");
    assert_eq!(done.attempt, 1);

    // Cancelled while frozen: the handler is stopped, the task cancelled.
    let mut events = engine.subscribe();
    let id = submit(&engine, NewTask::new("steps", json!({}))).await;
    seen(&mut events, id, running).await;
    engine.pause_task(id).await.expect("pause");
    let marked = engine.cancel(id).await.expect("cancel");
    assert!(marked.cancel_requested);
    assert_eq!(finished(&engine, id).await.status, Status::Cancelled);
    loops.stop().await;
}

/// A memory store whose `finish` records the end, says so, then waits to be let go before
/// answering: the window in which the engine still counts the attempt as running. With
/// `failing` above zero, that many calls of `finish` fail first (a database that is down),
/// and no call waits.
struct ParkedFinish {
    inner: MemoryStore,
    parked: Notify,
    go: Notify,
    failing: AtomicUsize,
    park: bool,
    /// Claims asked of it.
    claims: AtomicUsize,
    /// The most tasks one claim asked for.
    most_asked: AtomicUsize,
}

impl ParkedFinish {
    fn new(failing: usize) -> ParkedFinish {
        ParkedFinish {
            inner: MemoryStore::new(),
            parked: Notify::new(),
            go: Notify::new(),
            failing: AtomicUsize::new(failing),
            park: failing == 0,
            claims: AtomicUsize::new(0),
            most_asked: AtomicUsize::new(0),
        }
    }

    /// A memory store that only counts claims.
    fn counting() -> ParkedFinish {
        ParkedFinish {
            park: false,
            ..ParkedFinish::new(0)
        }
    }
}

mod parked_finish {
    use task_core::store::{
        ClaimRequest, Command, Finish, Heartbeat, HeartbeatReply, ListFilter, Page, PageRequest,
        ProgressUpdate, Promoted, Recover, Stats, Store, StoreFuture, Submitted,
    };
    use task_core::{Task, TaskId, Timestamp};

    use std::sync::atomic::Ordering;

    impl Store for super::ParkedFinish {
        fn submit(&self, tasks: Vec<Task>) -> StoreFuture<'_, Vec<Submitted>> {
            self.inner.submit(tasks)
        }
        fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, Vec<Task>> {
            self.claims.fetch_add(1, Ordering::Relaxed);
            self.most_asked.fetch_max(request.max, Ordering::Relaxed);
            self.inner.claim(request)
        }
        fn promote_due(&self, now: Timestamp) -> StoreFuture<'_, Promoted> {
            self.inner.promote_due(now)
        }
        fn finish(&self, finish: Finish) -> StoreFuture<'_, bool> {
            Box::pin(async move {
                if self.failing.load(Ordering::Acquire) > 0 {
                    self.failing.fetch_sub(1, Ordering::AcqRel);
                    return Err(task_core::Error::store(
                        "writing",
                        "the database is down (a test's store)",
                    ));
                }
                let done = self.inner.finish(finish).await?;
                if self.park {
                    let go = self.go.notified();
                    self.parked.notify_one();
                    go.await;
                }
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
        fn timed_out(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, u64>> {
            self.inner.timed_out()
        }
        fn flush(&self) -> StoreFuture<'_, ()> {
            self.inner.flush()
        }
    }
}

/// An idle engine claims when something wakes it (a submission, a freed slot) or its poll
/// comes, not in a loop: a claim that finds nothing is not followed by another at once.
#[tokio::test]
async fn an_idle_engine_claims_only_when_woken_or_polled() {
    let store = Arc::new(ParkedFinish::new(1));
    let (engine, loops) =
        started_on(Arc::clone(&store) as Arc<dyn Store>, quick_config(), |b| b).await;
    // One task, so that claims in flight and their ends have run once.
    let id = submit(&engine, NewTask::new("echo", json!(1))).await;
    let _ = finished(&engine, id).await;
    let before = store.claims.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let claims = store.claims.load(Ordering::Relaxed) - before;
    // The poll (every 50 ms) claims about 10 times in 500 ms.
    assert!(
        claims <= 20,
        "an idle engine claimed {claims} times in 500 ms (idle_poll is 50 ms)"
    );
    loops.stop().await;
}

/// A heartbeat that runs while an attempt's end is being recorded finds the task no longer
/// running in the store: that is the attempt ending, not a lost lease (the load test logged
/// "lost its lease" warnings for such tasks). A lease that really ran out is counted.
#[tokio::test]
async fn a_heartbeat_during_an_attempts_finish_is_not_a_lost_lease() {
    let store = Arc::new(ParkedFinish::new(0));
    let config = EngineConfig {
        recover_running_at_start: false,
        heartbeat_interval: Duration::from_secs(3600),
        ..quick_config()
    };
    let (engine, loops) = started_on(Arc::clone(&store) as Arc<dyn Store>, config, |b| b).await;
    let parked = store.parked.notified();
    let id = submit(&engine, NewTask::new("echo", json!("done"))).await;
    tokio::time::timeout(LONG, parked)
        .await
        .expect("the finish was recorded");
    // The store has the task completed; the engine still holds the attempt.
    engine.renew_leases().await.expect("heartbeat");
    assert_eq!(engine.leases_lost(), 0);
    store.go.notify_one();
    let task = finished(&engine, id).await;
    assert_eq!(task.status, Status::Completed);
    assert_eq!(engine.leases_lost(), 0);
    loops.stop().await;

    // A lease that runs out while its attempt runs: the reaper takes the task back, and the
    // next heartbeat stops the attempt and counts it.
    let config = EngineConfig {
        lease: Duration::from_millis(100),
        heartbeat_interval: Duration::from_secs(3600),
        recover_running_at_start: false,
        ..quick_config()
    };
    let (engine, loops) = started(config, |b| {
        b.handler(
            "stuck",
            handler_fn(|ctx| async move {
                ctx.cancellation().cancelled().await;
                Ok(Value::Null)
            }),
        )
    })
    .await;
    // Not run again: this checks the count of a lost lease, once.
    let id = submit(
        &engine,
        NewTask::new("stuck", Value::Null).with_rerun_on_recovery(false),
    )
    .await;
    let task = finished(&engine, id).await;
    assert_eq!(task.error.expect("error").kind, FailureKind::Interrupted);
    engine.renew_leases().await.expect("heartbeat");
    assert_eq!(engine.leases_lost(), 1);
    loops.stop().await;
}

/// A store that fails to record an attempt's end (a database restarting) is asked again until
/// it answers: the task completes with its result, once, instead of being left to the lease
/// reaper (which would fail it as `worker_lost` when it has no attempts left).
#[tokio::test]
async fn an_attempts_end_is_recorded_once_the_store_answers_again() {
    let store = Arc::new(ParkedFinish::new(3));
    let config = EngineConfig {
        recover_running_at_start: false,
        ..quick_config()
    };
    let (engine, loops) = started_on(Arc::clone(&store) as Arc<dyn Store>, config, |b| b).await;
    let id = submit(&engine, NewTask::new("echo", json!("kept"))).await;
    let task = finished(&engine, id).await;
    assert_eq!(task.status, Status::Completed);
    assert_eq!(task.result, Some(json!("kept")));
    assert_eq!(
        task.attempt, 1,
        "one attempt: its end was recorded late, not lost"
    );
    assert_eq!(
        store.failing.load(Ordering::Acquire),
        0,
        "three failures, then it answered"
    );
    loops.stop().await;
}

/// A handler that reports progress 0.6 with words, then waits to be stopped.
fn sixty_percent_then_wait(reported: Arc<Notify>) -> impl task_core::TaskHandler {
    handler_fn(move |ctx| {
        let reported = Arc::clone(&reported);
        async move {
            ctx.progress(0.6, Some("60% done".into())).await?;
            reported.notify_one();
            ctx.cancellation().cancelled().await;
            Err(TaskFailure::retryable("stopped"))
        }
    })
}

/// What a task that msbd stopped running looks like, for comparing two ways of stopping.
fn after_interruption(task: &task_core::Task) -> impl PartialEq + std::fmt::Debug {
    (
        task.status,
        task.attempt,
        task.max_attempts,
        task.interrupted_attempts,
        task.progress,
        task.progress_message.clone(),
        task.finished_at,
    )
}

/// Issue 15: msbd going away gracefully (SIGTERM: a shutdown) and msbd going away at once
/// (SIGKILL, a crash: the lease expires, found by the reaper or by recovery at start) leave a
/// task in the same state. For a task with one attempt, as it is submitted by default: queued
/// again, its limit unchanged, the attempt not counted, no progress of the dead attempt; and
/// the next start runs it to completion.
#[tokio::test]
async fn a_shutdown_and_a_crash_leave_a_task_the_same_way() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reported = Arc::new(Notify::new());
    let work = |b: task_core::EngineBuilder, reported: &Arc<Notify>| {
        b.handler("work", sixty_percent_then_wait(Arc::clone(reported)))
    };
    let second_life = |b: task_core::EngineBuilder| {
        b.handler(
            "work",
            handler_fn(|_ctx| async { Ok(json!("second life")) }),
        )
    };

    // Shutdown.
    let graceful_path = dir.path().join("graceful.sqlite3");
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(&graceful_path)).expect("open"));
    let (engine, loops) = started_on(store, quick_config(), |b| work(b, &reported)).await;
    let graceful = submit(&engine, NewTask::new("work", Value::Null)).await;
    tokio::time::timeout(LONG, reported.notified())
        .await
        .expect("progress reported");
    let report = engine.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.interrupted, 1);
    loops.stop().await;
    let after_shutdown = engine.get(graceful).await.expect("get");
    drop(engine);

    // Crash, found by recovery at start: the process that ran the attempt is gone without a
    // word (its claim and its progress are all the store has).
    let crash_path = dir.path().join("crash.sqlite3");
    let store = SqliteStore::open(SqliteConfig::new(&crash_path)).expect("open");
    let now = Timestamp::now();
    let crashed = store
        .submit(vec![
            NewTask::new("work", Value::Null).into_task(TaskId::new(), now),
        ])
        .await
        .expect("submit")[0]
        .task
        .id;
    let claimed = store
        .claim(ClaimRequest {
            max: 1,
            now,
            lease_until: now.after(Duration::from_secs(30)),
            exclude_types: vec![],
            type_room: vec![],
        })
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert!(
        store
            .progress(task_core::store::ProgressUpdate {
                id: crashed,
                attempt: 1,
                progress: 0.6,
                message: Some("60% done".into()),
                now,
            })
            .await
            .expect("progress")
    );
    drop(store);
    let store = Arc::new(SqliteStore::open(SqliteConfig::new(&crash_path)).expect("reopen"));
    let engine = Engine::builder(store)
        .config(quick_config())
        .build()
        .await
        .expect("recovers");
    let after_crash = engine.get(crashed).await.expect("get");
    drop(engine);

    // Crash, found by the lease reaper (another node's attempt, say).
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let config = EngineConfig {
        recover_running_at_start: false,
        ..quick_config()
    };
    // Its loops are not started: the test plays the reaper's round itself.
    let engine = Engine::builder(Arc::clone(&store))
        .config(config)
        .build()
        .await
        .expect("engine");
    let now = Timestamp::now();
    let reaped = store
        .submit(vec![
            NewTask::new("work", Value::Null).into_task(TaskId::new(), now),
        ])
        .await
        .expect("submit")[0]
        .task
        .id;
    let claimed = store
        .claim(ClaimRequest {
            max: 1,
            now,
            lease_until: now,
            exclude_types: vec![],
            type_room: vec![],
        })
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    assert!(
        store
            .progress(task_core::store::ProgressUpdate {
                id: reaped,
                attempt: 1,
                progress: 0.6,
                message: Some("60% done".into()),
                now,
            })
            .await
            .expect("progress")
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(engine.recover_expired().await.expect("reaper"), 1);
    let after_reaper = engine.get(reaped).await.expect("get");
    assert_eq!(
        engine.eta(&after_reaper),
        None,
        "no ETA from the dead attempt's progress"
    );
    drop(engine);

    for (what, task) in [
        ("shutdown", &after_shutdown),
        ("crash", &after_crash),
        ("reaper", &after_reaper),
    ] {
        assert_eq!(
            task.status,
            Status::Queued,
            "{what}: runs again ({:?})",
            task.error
        );
        assert_eq!(
            (task.attempt, task.max_attempts, task.interrupted_attempts),
            (1, 1, 1),
            "{what}: the limit is unchanged and the attempt is not counted"
        );
        assert!(task.has_attempts_left(), "{what}");
        assert_eq!(
            (task.progress, task.progress_message.as_deref()),
            (None, None),
            "{what}: nothing of the dead attempt's progress"
        );
    }
    assert_eq!(
        after_interruption(&after_shutdown),
        after_interruption(&after_crash)
    );
    assert_eq!(
        after_interruption(&after_shutdown),
        after_interruption(&after_reaper)
    );
    // Only the error, and the attempt's entry in the history, say how msbd went away.
    assert_eq!(
        after_shutdown.error.as_ref().map(|e| e.kind),
        Some(FailureKind::Interrupted)
    );
    assert_eq!(
        after_crash.error.as_ref().map(|e| e.kind),
        Some(FailureKind::WorkerLost)
    );
    let outcomes = |task: &task_core::Task| -> Vec<(u32, AttemptOutcome)> {
        task.attempts.iter().map(|r| (r.n, r.outcome)).collect()
    };
    assert_eq!(
        outcomes(&after_shutdown),
        [(1, AttemptOutcome::Interrupted)]
    );
    assert_eq!(outcomes(&after_crash), [(1, AttemptOutcome::WorkerLost)]);
    assert_eq!(outcomes(&after_reaper), [(1, AttemptOutcome::WorkerLost)]);

    // The next start runs both, and the attempt that completes is the first that counts.
    for (path, id, first) in [
        (&graceful_path, graceful, AttemptOutcome::Interrupted),
        (&crash_path, crashed, AttemptOutcome::WorkerLost),
    ] {
        let store = Arc::new(SqliteStore::open(SqliteConfig::new(path)).expect("reopen"));
        let (engine, loops) = started_on(store, quick_config(), second_life).await;
        let done = finished(&engine, id).await;
        assert_eq!(
            (done.status, done.attempt, done.max_attempts),
            (Status::Completed, 2, 1)
        );
        assert_eq!(done.result, Some(json!("second life")));
        assert_eq!(
            outcomes(&done),
            [(1, first), (2, AttemptOutcome::Completed)]
        );
        loops.stop().await;
    }
}

/// A task submitted with `rerun_on_recovery: false` is not run again after a shutdown: it
/// fails with kind `interrupted`, as it does after a crash (see the conformance suite).
#[tokio::test]
async fn a_task_that_opted_out_of_reruns_fails_interrupted_at_a_shutdown() {
    let reported = Arc::new(Notify::new());
    let handler = sixty_percent_then_wait(Arc::clone(&reported));
    let (engine, loops) = started(quick_config(), |b| b.handler("work", handler)).await;
    let id = submit(
        &engine,
        NewTask::new("work", Value::Null)
            .with_max_attempts(3)
            .with_rerun_on_recovery(false),
    )
    .await;
    tokio::time::timeout(LONG, reported.notified())
        .await
        .expect("progress reported");
    engine.shutdown(Duration::from_secs(2)).await;
    loops.stop().await;
    let task = engine.get(id).await.expect("get");
    assert_eq!(task.status, Status::Failed);
    assert_eq!(
        (task.attempt, task.max_attempts, task.interrupted_attempts),
        (1, 3, 1)
    );
    let error = task.error.expect("an error");
    assert_eq!(error.kind, FailureKind::Interrupted);
    assert!(
        error.message.contains("rerun_on_recovery: false"),
        "{error:?}"
    );
}

/// A handler that counts its runs and how many run at once, and returns after `pause` (or at
/// once).
fn counted(
    runs: &Arc<AtomicUsize>,
    now: &Arc<AtomicUsize>,
    peak: &Arc<AtomicUsize>,
    pause: Duration,
) -> impl task_core::TaskHandler {
    let (runs, now, peak) = (Arc::clone(runs), Arc::clone(now), Arc::clone(peak));
    handler_fn(move |_ctx| {
        let (runs, now, peak) = (Arc::clone(&runs), Arc::clone(&now), Arc::clone(&peak));
        async move {
            let running = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(running, Ordering::SeqCst);
            runs.fetch_add(1, Ordering::SeqCst);
            if pause.is_zero() {
                tokio::task::yield_now().await;
            } else {
                tokio::time::sleep(pause).await;
            }
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(Value::Null)
        }
    })
}

/// While handlers run short, the dispatcher claims more tasks than it has slots, so that a
/// slot that frees starts the next task without waiting for the store; yet no more than
/// `concurrency` handlers run at once, and every task runs once, on its first attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_engine_claims_ahead_yet_runs_no_more_than_its_concurrency() {
    let store = Arc::new(ParkedFinish::counting());
    let (runs, now, peak) = Default::default();
    let engine = Engine::builder(Arc::clone(&store) as Arc<dyn Store>)
        .config(EngineConfig {
            concurrency: 2,
            ..quick_config()
        })
        .handler("quick", counted(&runs, &now, &peak, Duration::ZERO))
        .build()
        .await
        .expect("engine builds");
    let submitted = engine
        .submit_many((0..500).map(|i| NewTask::new("quick", json!(i))).collect())
        .await
        .expect("submit");
    let loops = engine.start();
    for submitted in submitted {
        let task = finished(&engine, submitted.task.id).await;
        assert_eq!(
            (task.status, task.attempt, task.interrupted_attempts),
            (Status::Completed, 1, 0),
            "{task:?}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 500);
    assert!(peak.load(Ordering::SeqCst) <= 2, "more than 2 ran at once");
    let most = store.most_asked.load(Ordering::Relaxed);
    assert!(most > 2, "no claim asked for more than the 2 slots: {most}");
    loops.stop().await;
}

/// Tasks claimed ahead wait for a slot only briefly: behind a long attempt they go back to the
/// queue (where another node could take them) and are not claimed again until a slot frees. A
/// pause and a shutdown give them back the same way: as they were, their attempt not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_claimed_ahead_go_back_to_the_queue_behind_a_long_attempt_a_pause_or_a_shutdown() {
    let store = Arc::new(ParkedFinish::counting());
    let gate = Gate::new();
    let (runs, now, peak) = Default::default();
    let (engine, loops) = started_on(
        Arc::clone(&store) as Arc<dyn Store>,
        EngineConfig {
            concurrency: 1,
            ..quick_config()
        },
        |b| {
            b.handler(
                "quick",
                counted(&runs, &now, &peak, Duration::from_micros(500)),
            )
            .handler("gate", gate.handler())
        },
    )
    .await;
    // Short runs first, so that the engine claims ahead.
    let warm = engine
        .submit_many((0..50).map(|i| NewTask::new("quick", json!(i))).collect())
        .await
        .expect("submit");
    for submitted in &warm {
        finished(&engine, submitted.task.id).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 50);
    let held = submit(
        &engine,
        NewTask::new("gate", Value::Null).with_priority(Priority::HIGH),
    )
    .await;
    let waiting: Vec<TaskId> = engine
        .submit_many((0..200).map(|i| NewTask::new("quick", json!(i))).collect())
        .await
        .expect("submit")
        .into_iter()
        .map(|submitted| submitted.task.id)
        .collect();
    gate.wait_running(1).await;
    // Behind the long attempt, nothing stays claimed for long, and the engine does not claim
    // and give back in a loop.
    let as_they_were = |task: &task_core::Task| {
        (
            task.status,
            task.attempt,
            task.interrupted_attempts,
            task.attempts.len(),
            task.lease_until,
            task.error.is_none(),
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let claims = store.claims.load(Ordering::Relaxed);
    for id in &waiting {
        let task = engine.get(*id).await.expect("get");
        assert_eq!(
            as_they_were(&task),
            (Status::Queued, 0, 0, 0, None, true),
            "{task:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let more = store.claims.load(Ordering::Relaxed) - claims;
    assert!(more <= 2, "{more} claims in 300 ms with the one slot held");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        50,
        "a task ran while the slot was held"
    );

    // A pause while the slot is held: nothing starts once it frees.
    engine.pause_queue();
    gate.release.notify_waiters();
    assert_eq!(finished(&engine, held).await.status, Status::Completed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        50,
        "a task started while the queue was paused"
    );
    for id in &waiting {
        let task = engine.get(*id).await.expect("get");
        assert_eq!(
            as_they_were(&task),
            (Status::Queued, 0, 0, 0, None, true),
            "{task:?}"
        );
    }
    engine.resume_queue();
    // (After 40 or so short runs the long one no longer weighs in the engine's average.)
    for id in &waiting[..60] {
        finished(&engine, *id).await;
    }
    // Then a shutdown in the middle of the run, with tasks claimed ahead: those not run are as
    // they were (not interrupted: they never started).
    let report = engine.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.interrupted, 0, "{report:?}");
    loops.stop().await;
    let mut left = 0;
    for id in &waiting {
        let task = engine.get(*id).await.expect("get");
        if task.status == Status::Completed {
            assert_eq!(task.attempt, 1);
            continue;
        }
        left += 1;
        assert_eq!(
            as_they_were(&task),
            (Status::Queued, 0, 0, 0, None, true),
            "{task:?}"
        );
    }
    assert!(left > 0, "every task ran before the shutdown");
    assert_eq!(runs.load(Ordering::SeqCst), 250 - left);
}

/// A handler that asks for the pause flag only after its task was paused (and has no timeout,
/// so the engine made no channel for it before) still hears of the pause: its first
/// `changed()` returns at once, and the flag reads `true`.
#[tokio::test]
async fn a_handler_that_follows_pauses_late_still_hears_of_a_pause_made_before() {
    let ask = Arc::new(tokio::sync::Notify::new());
    let (engine, loops) = started(quick_config(), |b| {
        let ask = Arc::clone(&ask);
        b.handler(
            "late",
            handler_fn(move |ctx| {
                let ask = Arc::clone(&ask);
                async move {
                    ask.notified().await;
                    let mut paused = ctx.paused();
                    let changed =
                        tokio::time::timeout(Duration::from_secs(5), paused.changed()).await;
                    let now = *paused.borrow_and_update();
                    Ok(json!({"changed": matches!(changed, Ok(Ok(()))), "paused": now}))
                }
            }),
        )
    })
    .await;
    let mut events = engine.subscribe();
    let id = submit(&engine, NewTask::new("late", json!({}))).await;
    seen(&mut events, id, |e| {
        matches!(
            e,
            TaskEvent::Status {
                status: Status::Running,
                ..
            }
        )
    })
    .await;
    engine.pause_task(id).await.expect("pause a running task");
    ask.notify_one();
    // The handler returns once it has heard, paused as it is: its task completes.
    let task = finished(&engine, id).await;
    assert_eq!(task.status, Status::Completed, "{task:?}");
    assert_eq!(task.result, Some(json!({"changed": true, "paused": true})));
    loops.stop().await;
}

/// A handler that takes its cancellation token only after its task was cancelled (the engine
/// makes the token when first asked for) finds it cancelled; one that took it before sees it
/// cancelled by the same cancel.
#[tokio::test]
async fn a_cancellation_token_taken_after_the_cancel_is_already_cancelled() {
    // Each handler says when it has begun (`began`), waits for the test's go (`go`, the "late"
    // one only), and reports what its token said (`noted`).
    let began = Arc::new(tokio::sync::Notify::new());
    let go = Arc::new(tokio::sync::Notify::new());
    let (noted_tx, mut noted) = tokio::sync::mpsc::unbounded_channel();
    let (engine, loops) = started(quick_config(), |b| {
        let (late_began, early_began) = (Arc::clone(&began), Arc::clone(&began));
        let go = Arc::clone(&go);
        let (late_noted, early_noted) = (noted_tx.clone(), noted_tx.clone());
        b.handler(
            "late",
            handler_fn(move |ctx| {
                let (began, go, noted) =
                    (Arc::clone(&late_began), Arc::clone(&go), late_noted.clone());
                async move {
                    began.notify_one();
                    go.notified().await;
                    let _ = noted.send(("late", ctx.cancellation().is_cancelled()));
                    Ok(Value::Null)
                }
            }),
        )
        .handler(
            "early",
            handler_fn(move |ctx| {
                let (began, noted) = (Arc::clone(&early_began), early_noted.clone());
                async move {
                    let token = ctx.cancellation().clone();
                    began.notify_one();
                    let cancelled =
                        tokio::time::timeout(Duration::from_secs(5), token.cancelled()).await;
                    let _ = noted.send(("early", cancelled.is_ok()));
                    Ok(Value::Null)
                }
            }),
        )
    })
    .await;
    let late = submit(&engine, NewTask::new("late", json!({}))).await;
    within(began.notified()).await;
    engine.cancel(late).await.expect("cancel a running task");
    go.notify_one();
    assert_eq!(within(noted.recv()).await, Some(("late", true)));
    assert_eq!(finished(&engine, late).await.status, Status::Cancelled);

    let early = submit(&engine, NewTask::new("early", json!({}))).await;
    within(began.notified()).await;
    engine.cancel(early).await.expect("cancel a running task");
    assert_eq!(within(noted.recv()).await, Some(("early", true)));
    assert_eq!(finished(&engine, early).await.status, Status::Cancelled);
    loops.stop().await;
}

/// `what`'s output, which must come within 5 s.
async fn within<T>(what: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), what)
        .await
        .expect("it came within 5 s")
}
