//! The supervisor of background loops: ticks and statistics, restarts after panics and errors,
//! restart intensity, pause and resume, services, and shutdown in reverse start order.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sandbox_wrapper::session::SessionError;
use sandbox_wrapper::supervisor::{
    ActionStatus, ChildSpec, ChildState, HealthStatus, LoopError, RestartPolicy, ShutdownStatus,
    StopOutcome, Supervisor, SupervisorError, TickFuture,
};

/// How long a condition may take to come true before a test gives up.
const PATIENCE: Duration = Duration::from_secs(5);

/// Polls `cond` until it holds or `timeout` passes; answers whether it held.
async fn eventually(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A child's status, which must exist.
fn status(sup: &Supervisor, name: &str) -> sandbox_wrapper::supervisor::ChildStatus {
    sup.child(name).expect("the child exists")
}

/// Quick restarts, so that tests do not wait on backoff.
fn quick(max_restarts: u32) -> RestartPolicy {
    RestartPolicy {
        max_restarts,
        window: Duration::from_secs(10),
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
    }
}

/// A tick that handles `items` items each time.
fn steady(items: u64) -> impl Fn() -> TickFuture + Send + Sync + 'static {
    move || Box::pin(async move { Ok(items) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_child_ticks_and_counts() {
    let sup = Supervisor::new();
    sup.start_child(
        ChildSpec::periodic("session_cleanup", Duration::from_millis(10), steady(2))
            .item_label("sessions_expired"),
    )
    .unwrap();

    assert!(eventually(|| status(&sup, "session_cleanup").cycles >= 3, PATIENCE).await);
    let st = status(&sup, "session_cleanup");
    assert_eq!(st.name, "session_cleanup");
    assert_eq!(st.state, ChildState::Running);
    assert!(st.healthy && st.exists && st.pausable);
    assert_eq!(st.items_total, 2 * st.cycles);
    assert_eq!(st.items_label.as_deref(), Some("sessions_expired"));
    assert_eq!(st.interval_seconds, Some(0.01));
    assert_eq!((st.errors, st.restarts, st.skipped_cycles), (0, 0, 0));
    assert_eq!(st.last_error, None);
    assert!(st.last_run_at.is_some_and(|t| t >= st.started_at));
    assert!(st.last_duration_ms.is_some_and(|ms| ms >= 0.0));
    assert!(st.started_at > 1.0e9 && st.uptime_seconds >= 0.0);

    let health = sup.health();
    assert_eq!(health.overall_status, HealthStatus::Healthy);
    assert_eq!(health.components["session_cleanup"].name, "session_cleanup");
    let json = serde_json::to_value(&health).unwrap();
    assert_eq!(json["overall_status"], "healthy");
    assert_eq!(json["components"]["session_cleanup"]["state"], "running");

    // Names are unique; unknown names say which exist.
    let dup = sup.start_child(ChildSpec::periodic(
        "session_cleanup",
        Duration::from_secs(1),
        steady(0),
    ));
    assert_eq!(
        dup,
        Err(SupervisorError::DuplicateChild {
            name: "session_cleanup".into()
        })
    );
    let unknown = sup.pause("nope").unwrap_err();
    assert!(
        matches!(&unknown, SupervisorError::UnknownChild { known, .. } if known == &["session_cleanup"])
    );
    assert!(unknown.to_string().contains("session_cleanup"), "{unknown}");

    // A child that does not tick at start ticks when asked to.
    sup.start_child(
        ChildSpec::periodic("orphan_cleanup", Duration::from_secs(3600), steady(1))
            .run_at_start(false),
    )
    .unwrap();
    assert_eq!(status(&sup, "orphan_cleanup").cycles, 0);
    sup.run_now("orphan_cleanup").unwrap();
    assert!(eventually(|| status(&sup, "orphan_cleanup").cycles == 1, PATIENCE).await);
    assert_eq!(status(&sup, "orphan_cleanup").items_total, 1);
    let names: Vec<String> = sup.status().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["session_cleanup", "orphan_cleanup"]);

    let report = sup.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.status, ShutdownStatus::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_restarts_the_child() {
    let sup = Supervisor::new();
    let panic_next = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&panic_next);
    sup.start_child(
        ChildSpec::periodic("lease_reaper", Duration::from_millis(10), move || {
            let flag = Arc::clone(&flag);
            Box::pin(async move {
                if flag.swap(false, Ordering::SeqCst) {
                    panic!("injected fault");
                }
                Ok(1)
            })
        })
        .policy(quick(3)),
    )
    .unwrap();
    assert!(eventually(|| status(&sup, "lease_reaper").cycles >= 1, PATIENCE).await);

    panic_next.store(true, Ordering::SeqCst);
    assert!(eventually(|| status(&sup, "lease_reaper").restarts == 1, PATIENCE).await);
    let after_panic = status(&sup, "lease_reaper");
    assert_eq!(after_panic.errors, 1);
    let last_error = after_panic.last_error.clone().unwrap();
    assert!(last_error.contains("injected fault"), "{last_error}");

    // It ticks again, and health recovers.
    assert!(
        eventually(
            || status(&sup, "lease_reaper").cycles > after_panic.cycles + 2,
            PATIENCE
        )
        .await
    );
    assert!(
        eventually(
            || sup.health().overall_status == HealthStatus::Healthy,
            PATIENCE
        )
        .await
    );
    let st = status(&sup, "lease_reaper");
    assert!(st.healthy && st.exists);
    assert_eq!(st.state, ChildState::Running);
    assert_eq!(st.restarts, 1);
    sup.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceeding_the_intensity_fails_the_child_until_restarted() {
    let sup = Supervisor::new();
    let faulty = Arc::new(AtomicBool::new(true));
    let fault = Arc::clone(&faulty);
    sup.start_child(
        ChildSpec::periodic("orphan_cleanup", Duration::from_millis(10), move || {
            let fault = Arc::clone(&fault);
            Box::pin(async move {
                if fault.load(Ordering::SeqCst) {
                    Err("disk on fire".into())
                } else {
                    Ok(0)
                }
            })
        })
        .policy(quick(3)),
    )
    .unwrap();

    assert_eq!(
        sup.restart_unhealthy().await.status,
        ActionStatus::NoActionNeeded
    );
    assert!(
        eventually(
            || status(&sup, "orphan_cleanup").state == ChildState::Failed,
            PATIENCE
        )
        .await
    );
    let st = status(&sup, "orphan_cleanup");
    assert_eq!(st.restarts, 3);
    assert_eq!(st.errors, 4);
    assert!(!st.healthy && !st.exists);
    assert_eq!(st.last_error.as_deref(), Some("disk on fire"));
    assert_eq!(sup.health().overall_status, HealthStatus::Unhealthy);

    // restart_unhealthy revives it once the fault is gone.
    faulty.store(false, Ordering::SeqCst);
    let report = sup.restart_unhealthy().await;
    assert_eq!(report.status, ActionStatus::Success);
    assert_eq!(report.actions_taken, ["orphan_cleanup_restarted"]);
    assert!(report.errors.is_empty());
    assert!(
        eventually(
            || sup.health().overall_status == HealthStatus::Healthy,
            PATIENCE
        )
        .await
    );
    let json = serde_json::to_value(sup.restart_unhealthy().await).unwrap();
    assert_eq!(json["status"], "no_action_needed");
    assert_eq!(json["actions_taken"], serde_json::json!([]));
    assert!(json["timestamp"].as_f64().unwrap() > 1.0e9);

    // Failing again: the window started afresh at the restart, so it takes 3 more restarts.
    let restarts_before = status(&sup, "orphan_cleanup").restarts;
    faulty.store(true, Ordering::SeqCst);
    assert!(
        eventually(
            || status(&sup, "orphan_cleanup").state == ChildState::Failed,
            PATIENCE
        )
        .await
    );
    assert_eq!(status(&sup, "orphan_cleanup").restarts, restarts_before + 3);

    // An explicit restart revives it too.
    faulty.store(false, Ordering::SeqCst);
    let report = sup.restart("orphan_cleanup").await.unwrap();
    assert_eq!(report.status, ActionStatus::Success);
    assert_eq!(report.actions_taken, ["orphan_cleanup_restarted"]);
    assert!(
        eventually(
            || sup.health().overall_status == HealthStatus::Healthy,
            PATIENCE
        )
        .await
    );
    let st = status(&sup, "orphan_cleanup");
    assert!(st.healthy && st.exists);
    sup.shutdown(Duration::from_secs(5)).await;
}

/// A child that must never be given up on (the task heartbeat, the dispatcher: a long
/// database outage fails every call of theirs) restarts past the restart intensity, with its
/// backoff capped, and runs again once the fault is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_is_never_given_up_on_outlasts_a_long_fault() {
    let sup = Supervisor::new();
    let faulty = Arc::new(AtomicBool::new(true));
    let fault = Arc::clone(&faulty);
    let policy = quick(3).never_give_up(Duration::from_millis(10));
    assert_eq!(policy.max_backoff, Duration::from_millis(10));
    assert_eq!(policy.backoff(1_000), Duration::from_millis(10));
    sup.start_child(
        ChildSpec::periodic("task_heartbeat", Duration::from_millis(5), move || {
            let fault = Arc::clone(&fault);
            Box::pin(async move {
                if fault.load(Ordering::SeqCst) {
                    Err("database unreachable".into())
                } else {
                    Ok(1)
                }
            })
        })
        .policy(policy),
    )
    .unwrap();

    // Well past the 3 restarts that fail a child with `quick(3)`.
    assert!(
        eventually(|| status(&sup, "task_heartbeat").restarts >= 12, PATIENCE).await,
        "{:?}",
        status(&sup, "task_heartbeat")
    );
    let st = status(&sup, "task_heartbeat");
    assert_ne!(st.state, ChildState::Failed);
    assert_eq!(st.last_error.as_deref(), Some("database unreachable"));

    faulty.store(false, Ordering::SeqCst);
    assert!(
        eventually(
            || {
                let st = status(&sup, "task_heartbeat");
                st.healthy && st.items_total > 0
            },
            PATIENCE
        )
        .await,
        "{:?}",
        status(&sup, "task_heartbeat")
    );
    assert_eq!(sup.health().overall_status, HealthStatus::Healthy);
    sup.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_skips_ticks_and_keeps_the_child_alive() {
    let sup = Supervisor::new();
    sup.start_child(ChildSpec::periodic(
        "pruner",
        Duration::from_millis(10),
        steady(1),
    ))
    .unwrap();
    sup.start_child(
        ChildSpec::periodic("heartbeat", Duration::from_millis(10), steady(1)).pausable(false),
    )
    .unwrap();
    assert!(eventually(|| status(&sup, "pruner").cycles >= 2, PATIENCE).await);

    let report = sup.pause_all();
    assert_eq!(report.status, ActionStatus::PartialSuccess);
    assert_eq!(report.actions_taken, ["pruner_paused"]);
    assert_eq!(report.errors.len(), 1);
    assert!(report.errors[0].contains("heartbeat") && report.errors[0].contains("not pausable"));

    // Once a tick has been skipped, none runs while paused.
    assert!(eventually(|| status(&sup, "pruner").skipped_cycles >= 1, PATIENCE).await);
    let paused = status(&sup, "pruner");
    let heartbeat = status(&sup, "heartbeat");
    assert!(
        eventually(
            || status(&sup, "pruner").skipped_cycles >= paused.skipped_cycles + 3,
            PATIENCE
        )
        .await
    );
    let st = status(&sup, "pruner");
    assert_eq!(st.cycles, paused.cycles);
    assert_eq!(st.state, ChildState::Paused);
    assert!(st.exists && st.healthy);
    assert_eq!(sup.health().overall_status, HealthStatus::Degraded);
    // The child that may not pause keeps ticking.
    assert!(
        eventually(
            || status(&sup, "heartbeat").cycles > heartbeat.cycles,
            PATIENCE
        )
        .await
    );
    assert_eq!(status(&sup, "heartbeat").state, ChildState::Running);

    assert_eq!(
        sup.pause("pruner").unwrap().status,
        ActionStatus::NoActionNeeded
    );
    let refused = sup.pause("heartbeat").unwrap();
    assert_eq!(refused.status, ActionStatus::Failed);
    assert_eq!(refused.errors.len(), 1);

    let report = sup.resume_all();
    assert_eq!(report.status, ActionStatus::Success);
    assert_eq!(report.actions_taken, ["pruner_resumed"]);
    assert!(eventually(|| status(&sup, "pruner").cycles > st.cycles + 1, PATIENCE).await);
    assert_eq!(status(&sup, "pruner").state, ChildState::Running);
    assert_eq!(sup.health().overall_status, HealthStatus::Healthy);
    assert_eq!(
        sup.resume("pruner").unwrap().status,
        ActionStatus::NoActionNeeded
    );

    // One child at a time.
    assert_eq!(
        sup.pause("pruner").unwrap().actions_taken,
        ["pruner_paused"]
    );
    assert_eq!(status(&sup, "pruner").state, ChildState::Paused);
    assert_eq!(
        sup.resume("pruner").unwrap().actions_taken,
        ["pruner_resumed"]
    );
    assert_eq!(status(&sup, "pruner").state, ChildState::Running);
    sup.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_sees_pause_and_cancellation() {
    let sup = Supervisor::new();
    let saw_pause = Arc::new(AtomicBool::new(false));
    let saw_cancel = Arc::new(AtomicBool::new(false));
    let (pause_seen, cancel_seen) = (Arc::clone(&saw_pause), Arc::clone(&saw_cancel));
    sup.start_child(
        ChildSpec::service("dispatcher", move |mut ctx| {
            let (pause_seen, cancel_seen) = (Arc::clone(&pause_seen), Arc::clone(&cancel_seen));
            Box::pin(async move {
                loop {
                    if ctx.is_paused() {
                        pause_seen.store(true, Ordering::SeqCst);
                    }
                    if !ctx.wait_unpaused().await {
                        cancel_seen.store(true, Ordering::SeqCst);
                        return Ok(());
                    }
                    ctx.cycle_timed(std::time::Instant::now(), 1);
                    tokio::select! {
                        () = ctx.cancel.cancelled() => {
                            cancel_seen.store(true, Ordering::SeqCst);
                            return Ok(());
                        }
                        _ = ctx.paused.changed() => {}
                        () = tokio::time::sleep(Duration::from_millis(10)) => {}
                    }
                }
            })
        })
        .interval_hint(Duration::from_millis(10)),
    )
    .unwrap();
    assert!(eventually(|| status(&sup, "dispatcher").cycles >= 2, PATIENCE).await);
    let st = status(&sup, "dispatcher");
    assert_eq!(st.interval_seconds, Some(0.01));
    assert!(st.last_duration_ms.is_some() && st.last_run_at.is_some());
    assert_eq!(st.items_total, st.cycles);

    sup.pause("dispatcher").unwrap();
    assert!(eventually(|| saw_pause.load(Ordering::SeqCst), PATIENCE).await);
    assert_eq!(status(&sup, "dispatcher").state, ChildState::Paused);
    let paused_cycles = status(&sup, "dispatcher").cycles;
    sup.resume("dispatcher").unwrap();
    assert!(
        eventually(
            || status(&sup, "dispatcher").cycles > paused_cycles,
            PATIENCE
        )
        .await
    );

    assert_eq!(sup.stop_child("dispatcher").await, Ok(StopOutcome::Stopped));
    assert!(saw_cancel.load(Ordering::SeqCst));
    let st = status(&sup, "dispatcher");
    assert_eq!(st.state, ChildState::Stopped);
    assert!(st.healthy && !st.exists);
    assert_eq!(st.restarts, 0);
    assert_eq!(
        sup.stop_child("dispatcher").await,
        Ok(StopOutcome::AlreadyStopped)
    );
    assert_eq!(sup.health().overall_status, HealthStatus::Healthy);
    sup.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_returns_ok_is_not_restarted_and_one_that_errs_is() {
    let sup = Supervisor::new();
    sup.start_child(ChildSpec::service("one_shot", |ctx| {
        Box::pin(async move {
            for _ in 0..3 {
                ctx.cycle(1);
            }
            Ok(())
        })
    }))
    .unwrap();
    let incarnations = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&incarnations);
    sup.start_child(
        ChildSpec::service("flaky", move |ctx| {
            let n = counter.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    return Err("lost the database".into());
                }
                ctx.cycle(0);
                ctx.cancel.cancelled().await;
                Ok(())
            })
        })
        .policy(quick(3)),
    )
    .unwrap();

    assert!(
        eventually(
            || status(&sup, "one_shot").state == ChildState::Stopped,
            PATIENCE
        )
        .await
    );
    let st = status(&sup, "one_shot");
    assert_eq!(
        (st.cycles, st.items_total, st.restarts, st.errors),
        (3, 3, 0, 0)
    );
    assert!(st.healthy && !st.exists);

    assert!(eventually(|| status(&sup, "flaky").cycles == 1, PATIENCE).await);
    let st = status(&sup, "flaky");
    assert_eq!((st.restarts, st.errors), (1, 1));
    assert_eq!(st.last_error.as_deref(), Some("lost the database"));
    assert!(st.exists && st.healthy);
    assert_eq!(incarnations.load(Ordering::SeqCst), 2);
    assert_eq!(sup.health().overall_status, HealthStatus::Healthy);

    let report = sup.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.status, ShutdownStatus::Success);
    assert_eq!(
        (report.components_stopped, report.components_expected),
        (2, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_cycle_of_a_service_degrades_health_until_one_succeeds() {
    let sup = Supervisor::new();
    let (fail, failing) = tokio::sync::watch::channel(true);
    sup.start_child(ChildSpec::service("watcher", move |ctx| {
        let mut failing = failing.clone();
        Box::pin(async move {
            loop {
                if *failing.borrow_and_update() {
                    let error = LoopError::Session(SessionError::NotFound("gone".into()));
                    ctx.cycle_failed(&error);
                } else {
                    ctx.cycle(1);
                }
                tokio::select! {
                    () = ctx.cancel.cancelled() => return Ok(()),
                    _ = failing.changed() => {}
                }
            }
        })
    }))
    .unwrap();
    assert!(eventually(|| status(&sup, "watcher").errors == 1, PATIENCE).await);
    let st = status(&sup, "watcher");
    assert_eq!(st.restarts, 0, "a failed cycle does not end the service");
    assert!(
        st.last_error
            .as_deref()
            .is_some_and(|e| e.contains("\"gone\" does not exist")),
        "{st:?}"
    );
    assert_eq!(sup.health().overall_status, HealthStatus::Degraded);
    fail.send(false).unwrap();
    assert!(
        eventually(
            || sup.health().overall_status == HealthStatus::Healthy,
            PATIENCE
        )
        .await
    );
    assert_eq!(status(&sup, "watcher").errors, 1);
    sup.shutdown(Duration::from_secs(5)).await;
}

/// A service that waits for its token, then records its name on the way out.
fn recording_service(name: &str, exits: &Arc<Mutex<Vec<String>>>) -> ChildSpec {
    let exits = Arc::clone(exits);
    let own = name.to_owned();
    ChildSpec::service(name, move |ctx| {
        let exits = Arc::clone(&exits);
        let own = own.clone();
        Box::pin(async move {
            ctx.cancel.cancelled().await;
            // Give a later-stopped sibling the chance to overtake, were the order wrong.
            tokio::task::yield_now().await;
            exits.lock().unwrap().push(own);
            Ok(())
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_children_in_reverse_start_order() {
    let sup = Supervisor::new();
    let exits = Arc::new(Mutex::new(Vec::new()));
    for name in ["store_flush", "dispatcher", "session_cleanup"] {
        sup.start_child(recording_service(name, &exits)).unwrap();
    }
    sup.start_child(ChildSpec::periodic(
        "pruner",
        Duration::from_millis(10),
        steady(0),
    ))
    .unwrap();
    assert!(
        eventually(
            || sup
                .status()
                .iter()
                .all(|s| s.state == ChildState::Running && s.exists),
            PATIENCE
        )
        .await
    );

    let began = Instant::now();
    let report = sup.shutdown(Duration::from_secs(5)).await;
    assert!(began.elapsed() < Duration::from_secs(5));
    assert_eq!(report.status, ShutdownStatus::Success, "{report:?}");
    assert_eq!(
        (report.components_stopped, report.components_expected),
        (4, 4)
    );
    assert_eq!(report.error_count, 0);
    assert!(report.errors.is_empty());
    assert!(report.end_time >= report.start_time && report.duration_seconds < 5.0);
    assert_eq!(
        *exits.lock().unwrap(),
        ["session_cleanup", "dispatcher", "store_flush"]
    );
    assert!(
        sup.status()
            .iter()
            .all(|s| s.state == ChildState::Stopped && !s.exists)
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["status"], "success");

    // After the shutdown began, nothing starts.
    assert_eq!(
        sup.start_child(ChildSpec::periodic(
            "late",
            Duration::from_secs(1),
            steady(0)
        )),
        Err(SupervisorError::ShuttingDown)
    );
    assert_eq!(
        sup.restart("pruner").await,
        Err(SupervisorError::ShuttingDown)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_ignores_cancellation_is_aborted_at_the_deadline() {
    let sup = Supervisor::new();
    let exits = Arc::new(Mutex::new(Vec::new()));
    sup.start_child(ChildSpec::service("stubborn", |_ctx| {
        Box::pin(async {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    }))
    .unwrap();
    sup.start_child(recording_service("polite", &exits))
        .unwrap();
    // Both must have begun: a child stopped before its first incarnation never runs its body.
    assert!(
        eventually(
            || status(&sup, "stubborn").exists && status(&sup, "polite").exists,
            PATIENCE
        )
        .await
    );

    let deadline = Duration::from_millis(200);
    let began = Instant::now();
    let report = sup.shutdown(deadline).await;
    let took = began.elapsed();
    assert!(
        took >= deadline && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(report.status, ShutdownStatus::Timeout);
    assert_eq!(
        (report.components_stopped, report.components_expected),
        (1, 2)
    );
    assert_eq!(report.error_count, 1);
    assert!(report.errors[0].contains("stubborn"), "{:?}", report.errors);
    assert_eq!(*exits.lock().unwrap(), ["polite"]);
    assert!(
        eventually(
            || {
                let st = status(&sup, "stubborn");
                st.state == ChildState::Stopped && !st.exists
            },
            PATIENCE
        )
        .await
    );
}
