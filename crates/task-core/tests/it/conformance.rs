//! One conformance suite for every task store: each case is an async function over `&dyn Store`,
//! run against a fresh `MemoryStore`, a fresh `SqliteStore`, and a `PostgresStore` in a schema of
//! its own (see `postgres.rs` for the database it needs). Time is driven by explicit
//! timestamps; nothing sleeps.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::json;
use task_core::state::Event;
use task_core::store::memory::MemoryStore;
use task_core::store::sqlite::{SqliteConfig, SqliteStore};
use task_core::store::{
    ClaimRequest, Command, Cursor, Finish, Heartbeat, ListFilter, Outcome, PageRequest,
    ProgressUpdate, Recover, Stats, Store,
};
use task_core::{
    AttemptOutcome, AttemptRecord, Error, FailureKind, Interruption, MAX_ATTEMPT_RECORDS,
    MAX_INTERRUPTED_ATTEMPTS, NewTask, Priority, RetryPolicy, Status, Task, TaskError, TaskId,
    Timestamp,
};

/// Runs each case against every store, each run with a store of its own.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    let store = super::MemoryStore::new();
                    super::$case(&store).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let (store, _dir) = super::sqlite_store();
                    super::$case(&store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let schema = crate::postgres::TestSchema::new();
                    let store = schema.store("conformance").await;
                    super::$case(&store).await;
                    store.close().await;
                }
            )*
        }
    };
}

conformance!(
    timed_out_counts_failed_tasks_whose_attempt_ran_out_of_time_by_type,
    submit_then_get_round_trips_every_field,
    submit_with_an_idempotency_key_returns_the_first_task,
    claim_takes_higher_priorities_first_and_equal_priorities_in_order,
    claim_takes_at_most_max,
    submit_and_claim_inserts_then_claims_in_queue_order,
    a_submission_that_fails_inserts_nothing,
    claim_skips_excluded_types_and_types_without_room,
    claim_starts_an_attempt_with_a_lease,
    scheduled_tasks_wait_for_promotion_past_their_run_at,
    finish_completed_records_the_result,
    finish_failed_with_a_retry_schedules_the_next_attempt,
    finish_failed_without_a_retry_fails_the_task,
    a_failure_keeps_its_result_until_another_error_replaces_it,
    finish_interrupted_requeues_without_using_an_attempt,
    a_lost_attempt_is_requeued_like_an_interrupted_one,
    an_interrupted_task_that_opted_out_of_reruns_fails_interrupted,
    a_task_interrupted_too_often_fails_interrupted,
    finish_cancelled_cancels_the_task,
    a_retry_or_interruption_after_a_cancel_request_cancels_the_task,
    writes_of_a_fenced_out_attempt_change_nothing,
    heartbeat_renews_leases_and_reports_lost_and_cancelled_attempts,
    commands_on_every_status,
    a_frozen_task_stays_with_its_attempt,
    release_gives_back_claims_that_never_started,
    commands_on_an_unknown_task_are_not_found,
    resume_of_a_paused_delayed_task_reschedules_or_queues_it,
    recover_expired_takes_only_expired_leases,
    recover_all_running_takes_every_running_attempt,
    prune_deletes_only_old_terminal_tasks_up_to_the_limit,
    set_priority_reorders_waiting_tasks_and_refuses_started_ones,
    delete_finished_deletes_only_matching_old_terminal_tasks_up_to_the_limit,
    reassign_owner_moves_every_task_but_those_whose_key_the_new_owner_holds,
    list_filters_by_every_field,
    list_pages_newest_first_without_gaps_or_duplicates,
    stats_follow_every_kind_of_change,
    the_attempt_history_says_how_each_attempt_ended,
    the_attempt_history_of_a_lost_or_cancelled_attempt,
    the_attempt_history_keeps_the_last_entries,
);

const T0: i64 = 1_700_000_000_000;
const LEASE: Duration = Duration::from_secs(30);

/// The time `seconds` after the start of every case.
fn at(seconds: i64) -> Timestamp {
    Timestamp(T0 + seconds * 1_000)
}

/// What a shared store asks of an engine's runner (leadership, wake-ups, its engine settings),
/// on the stores one process owns: nothing, so that an engine on them runs as it always did.
/// (The PostgreSQL store's answers: `postgres.rs`.)
#[tokio::test]
async fn a_store_one_process_owns_keeps_the_engine_as_it_is() {
    let (sqlite, _dir) = sqlite_store();
    let stores: [std::sync::Arc<dyn Store>; 2] = [
        std::sync::Arc::new(MemoryStore::new()),
        std::sync::Arc::new(sqlite),
    ];
    for store in stores {
        assert!(!store.is_shared());
        let asked = task_core::EngineConfig {
            idle_poll: Duration::from_millis(7),
            ..task_core::EngineConfig::default()
        };
        let config = store.engine_config(asked.clone());
        assert!(config.recover_running_at_start);
        assert_eq!(config.idle_poll, asked.idle_poll);
        assert!(store.is_maintenance_leader());
        assert_eq!(store.healthy_for(), Some(Duration::MAX));
        assert_eq!(store.cluster_status().await.expect("cluster status"), None);
        let engine = task_core::Engine::builder(std::sync::Arc::clone(&store))
            .build()
            .await
            .expect("engine");
        assert_eq!(engine.cluster_status().await.expect("cluster status"), None);
        drop(engine);
        assert!(store.wakeups().is_none());
    }
}

fn sqlite_store() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store =
        SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.sqlite3"))).expect("open");
    (store, dir)
}

async fn submit(store: &dyn Store, new: NewTask, now: Timestamp) -> Task {
    let mut answers = store
        .submit(vec![new.into_task(TaskId::new(), now)])
        .await
        .expect("submit");
    assert_eq!(answers.len(), 1);
    let answer = answers.pop().expect("one answer");
    assert!(
        answer.created,
        "a task without a taken idempotency key is created"
    );
    answer.task
}

async fn submit_all(store: &dyn Store, news: Vec<NewTask>, now: Timestamp) -> Vec<Task> {
    let tasks = news
        .into_iter()
        .map(|new| new.into_task(TaskId::new(), now))
        .collect();
    let answers = store.submit(tasks).await.expect("submit");
    answers
        .into_iter()
        .map(|answer| {
            assert!(answer.created);
            answer.task
        })
        .collect()
}

fn request(max: usize, now: Timestamp) -> ClaimRequest {
    ClaimRequest {
        max,
        now,
        lease_until: now.after(LEASE),
        exclude_types: Vec::new(),
        type_room: Vec::new(),
    }
}

async fn claim(store: &dyn Store, max: usize, now: Timestamp) -> Vec<Task> {
    store.claim(request(max, now)).await.expect("claim")
}

/// Claims exactly the task `expected`.
async fn claim_one(store: &dyn Store, expected: &Task, now: Timestamp) -> Task {
    let claimed = claim(store, 1, now).await;
    assert_eq!(
        ids(&claimed),
        [expected.id],
        "the claim should take {}",
        expected.task_type
    );
    claimed.into_iter().next().expect("one task")
}

async fn get(store: &dyn Store, id: TaskId) -> Task {
    store
        .get(id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("task {id} should exist"))
}

async fn finish(store: &dyn Store, task: &Task, now: Timestamp, outcome: Outcome) -> bool {
    store
        .finish(Finish {
            id: task.id,
            attempt: task.attempt,
            now,
            outcome,
        })
        .await
        .expect("finish")
}

fn ids(tasks: &[Task]) -> Vec<TaskId> {
    tasks.iter().map(|task| task.id).collect()
}

fn error(message: &str) -> TaskError {
    TaskError {
        kind: FailureKind::Error,
        message: message.to_owned(),
    }
}

/// The outcome the engine records for an attempt that a shutdown interrupted.
fn interrupted(task: &Task) -> Outcome {
    let (rerun, error) = task.interruption(Interruption::Shutdown);
    Outcome::Interrupted { rerun, error }
}

fn completed() -> Outcome {
    Outcome::Completed {
        result: json!({"ok": true}),
    }
}

/// Every task in the store, newest first, read page by page.
async fn all_tasks(store: &dyn Store) -> Vec<Task> {
    list_all(store, ListFilter::default(), PageRequest::MAX_LIMIT).await
}

/// Every task matching `filter`, following the cursors with pages of `limit`.
async fn list_all(store: &dyn Store, filter: ListFilter, limit: usize) -> Vec<Task> {
    let mut tasks = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(filter.clone(), PageRequest { cursor, limit })
            .await
            .expect("list");
        assert!(page.tasks.len() <= limit);
        tasks.extend(page.tasks);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return tasks,
        }
    }
}

/// Asserts that the store's stats equal the counts of its listed tasks.
async fn check_stats(store: &dyn Store, when: &str) {
    let mut expected = Stats {
        by_status: Status::ALL.into_iter().map(|s| (s, 0)).collect(),
        by_type: BTreeMap::new(),
    };
    for task in all_tasks(store).await {
        *expected.by_status.entry(task.status).or_default() += 1;
        *expected
            .by_type
            .entry(task.task_type)
            .or_default()
            .entry(task.status)
            .or_default() += 1;
    }
    let actual = store.stats().await.expect("stats");
    assert_eq!(actual, expected, "stats {when}");
}

/// A task in `status`, reached through the store's own requests. Tasks that are claimed have the
/// critical priority and the others the normal one, so queued tasks left by earlier calls are
/// never claimed in their place.
async fn task_in(store: &dyn Store, status: Status, now: Timestamp) -> Task {
    let new = NewTask::new(format!("in-{status}"), json!({}));
    let claimed = matches!(
        status,
        Status::Running | Status::Completed | Status::Failed | Status::Cancelled
    );
    let new = if claimed {
        new.with_priority(Priority::CRITICAL)
    } else {
        new
    };
    match status {
        Status::Queued => submit(store, new, now).await,
        Status::Scheduled => {
            submit(
                store,
                new.with_run_at(now.after(Duration::from_secs(60))),
                now,
            )
            .await
        }
        Status::Paused => {
            let task = submit(store, new, now).await;
            store
                .command(task.id, Command::Pause, now)
                .await
                .expect("pause")
        }
        Status::Running => {
            let task = submit(store, new, now).await;
            claim_one(store, &task, now).await
        }
        Status::Completed | Status::Failed | Status::Cancelled => {
            let task = submit(store, new, now).await;
            let running = claim_one(store, &task, now).await;
            let outcome = match status {
                Status::Completed => completed(),
                Status::Failed => Outcome::Failed {
                    error: error("broke"),
                    retry_at: None,
                    result: None,
                },
                _ => Outcome::Cancelled,
            };
            assert!(finish(store, &running, now, outcome).await);
            get(store, task.id).await
        }
    }
}

// The cases.

async fn submit_then_get_round_trips_every_field(store: &dyn Store) {
    let params = json!({
        "argv": ["echo", "héllo wörld", ""],
        "nested": {"n": 42, "big": 9_007_199_254_740_993_u64, "neg": -7, "half": 0.5, "null": null},
        "flag": true,
    });
    let full = NewTask::new("command", params.clone())
        .with_priority(Priority::HIGH)
        .with_max_attempts(3)
        .with_retry(RetryPolicy {
            base_delay_ms: 250,
            max_delay_ms: 10_000,
        })
        .with_timeout(Duration::from_millis(90_500))
        .with_run_at(at(3_600))
        .with_idempotency_key("key-1")
        .with_owner("agent-7")
        .with_session("session-3")
        .with_tags(vec!["nightly".into(), "db".into()])
        .with_rerun_on_recovery(false);
    let id = TaskId::new();
    let expected = full.clone().into_task(id, at(0));
    let answers = store
        .submit(vec![full.into_task(id, at(0))])
        .await
        .expect("submit");
    assert_eq!(answers.len(), 1);
    assert!(answers[0].created);
    assert_eq!(answers[0].task, expected);
    let stored = get(store, id).await;
    assert_eq!(stored, expected);
    assert_eq!(stored.params, params);
    assert_eq!(stored.priority, Priority::HIGH);
    assert_eq!(stored.status, Status::Scheduled);
    assert_eq!(stored.max_attempts, 3);
    assert_eq!(
        stored.retry,
        RetryPolicy {
            base_delay_ms: 250,
            max_delay_ms: 10_000
        }
    );
    assert_eq!(stored.timeout, Some(Duration::from_millis(90_500)));
    assert_eq!(stored.run_at, Some(at(3_600)));
    assert_eq!(stored.idempotency_key.as_deref(), Some("key-1"));
    assert_eq!(stored.owner.as_deref(), Some("agent-7"));
    assert_eq!(stored.session_id.as_deref(), Some("session-3"));
    assert!(!stored.fresh_session, "a named session is not fresh");
    assert_eq!(stored.tags, ["nightly", "db"]);
    assert_eq!(stored.created_at, at(0));
    assert_eq!(stored.updated_at, at(0));

    // The defaults round-trip too: no options, an empty object, no tags.
    let plain = submit(store, NewTask::new("plain", json!({})), at(1)).await;
    let stored = get(store, plain.id).await;
    assert_eq!(
        stored,
        NewTask::new("plain", json!({})).into_task(plain.id, at(1))
    );
    assert_eq!(stored.status, Status::Queued);
    assert_eq!(stored.priority, Priority::NORMAL);
    assert!(stored.tags.is_empty());
    assert_eq!(
        (stored.timeout, stored.run_at, stored.owner),
        (None, None, None)
    );

    // A session made for the task alone is recorded as such.
    let new = NewTask::new("plain", json!({})).with_fresh_session("s0123456789abcdef0123");
    let fresh = submit(store, new, at(1)).await;
    let stored = get(store, fresh.id).await;
    assert_eq!(stored, fresh);
    assert!(stored.fresh_session);
    assert_eq!(stored.session_id.as_deref(), Some("s0123456789abcdef0123"));

    // A run_at already past queues the task at once.
    let past = submit(
        store,
        NewTask::new("plain", json!([1, 2])).with_run_at(at(-5)),
        at(2),
    )
    .await;
    let stored = get(store, past.id).await;
    assert_eq!((stored.status, stored.run_at), (Status::Queued, None));
    assert_eq!(stored.params, json!([1, 2]));

    assert_eq!(store.get(TaskId::new()).await.expect("get"), None);
}

async fn submit_with_an_idempotency_key_returns_the_first_task(store: &dyn Store) {
    let first = submit(
        store,
        NewTask::new("build", json!({"n": 1}))
            .with_idempotency_key("k")
            .with_owner("alice"),
        at(0),
    )
    .await;

    // The same key and owner: the first task, as it is now, and nothing created.
    let running = claim_one(store, &first, at(1)).await;
    let again = NewTask::new("build", json!({"n": 2}))
        .with_idempotency_key("k")
        .with_owner("alice")
        .with_priority(Priority::CRITICAL);
    let answers = store
        .submit(vec![again.into_task(TaskId::new(), at(2))])
        .await
        .expect("submit");
    assert_eq!(answers.len(), 1);
    assert!(!answers[0].created);
    assert_eq!(answers[0].task, running);
    assert_eq!(answers[0].task.params, json!({"n": 1}));

    // The same key for another owner, or for no owner, is another task.
    let bob = NewTask::new("build", json!({"n": 3}))
        .with_idempotency_key("k")
        .with_owner("bob");
    let bob = submit(store, bob, at(3)).await;
    assert_ne!(bob.id, first.id);
    let nobody = submit(
        store,
        NewTask::new("build", json!({})).with_idempotency_key("k"),
        at(4),
    )
    .await;
    assert_ne!(nobody.id, first.id);
    assert_ne!(nobody.id, bob.id);

    // Within one submission, a repeated key returns the task created earlier in it.
    let batch = vec![
        NewTask::new("build", json!({"b": 1}))
            .with_idempotency_key("batch")
            .into_task(TaskId::new(), at(5)),
        NewTask::new("build", json!({"b": 2}))
            .with_idempotency_key("batch")
            .into_task(TaskId::new(), at(5)),
        NewTask::new("build", json!({"b": 3}))
            .with_idempotency_key("other")
            .into_task(TaskId::new(), at(5)),
    ];
    let answers = store.submit(batch).await.expect("submit");
    let created: Vec<bool> = answers.iter().map(|a| a.created).collect();
    assert_eq!(created, [true, false, true]);
    assert_eq!(answers[1].task.id, answers[0].task.id);
    assert_eq!(answers[1].task.params, json!({"b": 1}));

    assert_eq!(all_tasks(store).await.len(), 5);
    check_stats(store, "after idempotent submissions").await;
}

async fn claim_takes_higher_priorities_first_and_equal_priorities_in_order(store: &dyn Store) {
    let priorities = [5, 9, 5, 2, 9, 5, 0, 8];
    let mut tasks = Vec::new();
    for (index, priority) in priorities.into_iter().enumerate() {
        let new = NewTask::new(format!("p{priority}-{index}"), json!(index))
            .with_priority(Priority::new(priority).expect("0-9"));
        tasks.push(submit(store, new, at(index as i64)).await);
    }
    let order = [1, 4, 7, 0, 2, 5, 3, 6];
    let expected: Vec<TaskId> = order.into_iter().map(|i| tasks[i].id).collect();

    // One at a time...
    let mut claimed = Vec::new();
    for step in 0..tasks.len() {
        claimed.extend(claim(store, 1, at(100 + step as i64)).await);
    }
    assert_eq!(ids(&claimed), expected);
    assert!(claim(store, 1, at(200)).await.is_empty());

    // ...and all at once, from one batch of submissions, give the same order.
    let news: Vec<NewTask> = priorities
        .into_iter()
        .map(|p| NewTask::new("batch", json!(p)).with_priority(Priority::new(p).expect("0-9")))
        .collect();
    let batch = submit_all(store, news, at(300)).await;
    let claimed = claim(store, 100, at(301)).await;
    let expected: Vec<TaskId> = order.into_iter().map(|i| batch[i].id).collect();
    assert_eq!(ids(&claimed), expected);
}

async fn claim_takes_at_most_max(store: &dyn Store) {
    let news = (0..5).map(|i| NewTask::new("job", json!(i))).collect();
    let tasks = submit_all(store, news, at(0)).await;
    assert_eq!(ids(&claim(store, 2, at(1)).await), ids(&tasks[..2]));
    assert!(claim(store, 0, at(2)).await.is_empty());
    assert_eq!(ids(&claim(store, 10, at(3)).await), ids(&tasks[2..]));
    assert!(claim(store, 10, at(4)).await.is_empty());
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.count(Status::Running), stats.count(Status::Queued)),
        (5, 0)
    );
}

async fn submit_and_claim_inserts_then_claims_in_queue_order(store: &dyn Store) {
    // An older, higher-priority task is claimed before the new ones.
    let old = submit(
        store,
        NewTask::new("job", json!("old")).with_priority(Priority::HIGH),
        at(0),
    )
    .await;
    let news: Vec<Task> = (0..3)
        .map(|i| NewTask::new("job", json!(i)).into_task(TaskId::new(), at(1)))
        .collect();
    let keyed = NewTask::new("job", json!("keyed"))
        .with_idempotency_key("k")
        .into_task(TaskId::new(), at(1));
    let mut batch = news.clone();
    batch.push(keyed.clone());
    let (submitted, claimed) = store
        .submit_and_claim(batch, request(2, at(1)))
        .await
        .expect("submit and claim");
    assert_eq!(submitted.len(), 4);
    assert!(submitted.iter().all(|answer| answer.created));
    assert_eq!(ids(&claimed), [old.id, news[0].id]);
    assert!(
        claimed
            .iter()
            .all(|task| task.status == Status::Running && task.attempt == 1)
    );

    // A repeated key is answered with the first task, and nothing more is claimed than asked.
    let again = NewTask::new("job", json!("again"))
        .with_idempotency_key("k")
        .into_task(TaskId::new(), at(2));
    let (submitted, claimed) = store
        .submit_and_claim(vec![again], request(0, at(2)))
        .await
        .expect("submit and claim");
    assert!(!submitted[0].created);
    assert_eq!(submitted[0].task.id, keyed.id);
    assert!(claimed.is_empty());
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.count(Status::Running), stats.count(Status::Queued)),
        (2, 3)
    );
}

async fn a_submission_that_fails_inserts_nothing(store: &dyn Store) {
    // The second task reuses the first one's id: the batch fails as a whole.
    let first = NewTask::new("job", json!(1)).into_task(TaskId::new(), at(0));
    let mut second = NewTask::new("job", json!(2)).into_task(TaskId::new(), at(0));
    second.id = first.id;
    assert!(
        store
            .submit(vec![first.clone(), second.clone()])
            .await
            .is_err()
    );
    assert!(
        store
            .submit_and_claim(vec![first, second], request(5, at(1)))
            .await
            .is_err()
    );
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.total(), 0, "{stats:?}");
    assert!(all_tasks(store).await.is_empty());
}

async fn claim_skips_excluded_types_and_types_without_room(store: &dyn Store) {
    // Five tasks of a crowded type ahead of the others.
    let mut news: Vec<NewTask> = (0..5)
        .map(|i| NewTask::new("crowded", json!(i)).with_priority(Priority::CRITICAL))
        .collect();
    news.push(NewTask::new("other", json!("o1")));
    news.push(NewTask::new("other", json!("o2")));
    news.push(NewTask::new("low", json!("l1")).with_priority(Priority::MIN));
    let tasks = submit_all(store, news, at(0)).await;
    let (crowded, other1, other2, low) = (&tasks[..5], &tasks[5], &tasks[6], &tasks[7]);

    // Excluded: the types behind it are not starved, even with room for only one task.
    let excluded = ClaimRequest {
        exclude_types: vec!["crowded".into()],
        ..request(1, at(1))
    };
    let claimed = store.claim(excluded).await.expect("claim");
    assert_eq!(ids(&claimed), [other1.id]);

    // Room for one of the crowded type: one of it, then the queue goes on past it.
    let limited = ClaimRequest {
        type_room: vec![("crowded".into(), 1)],
        ..request(3, at(2))
    };
    let claimed = store.claim(limited).await.expect("claim");
    assert_eq!(ids(&claimed), [crowded[0].id, other2.id, low.id]);

    // No room at all for it, and an exclusion of a type that is not queued: nothing to take.
    let none = ClaimRequest {
        exclude_types: vec!["other".into()],
        type_room: vec![("crowded".into(), 0)],
        ..request(10, at(3))
    };
    assert!(store.claim(none).await.expect("claim").is_empty());

    // Room for two, with room declared for other types too.
    let two = ClaimRequest {
        type_room: vec![
            ("other".into(), 5),
            ("crowded".into(), 2),
            ("absent".into(), 0),
        ],
        ..request(10, at(4))
    };
    assert_eq!(
        ids(&store.claim(two).await.expect("claim")),
        ids(&crowded[1..3])
    );
    assert_eq!(ids(&claim(store, 10, at(5)).await), ids(&crowded[3..]));
    check_stats(store, "after limited claims").await;
}

async fn claim_starts_an_attempt_with_a_lease(store: &dyn Store) {
    let task = submit(
        store,
        NewTask::new("job", json!({})).with_max_attempts(3),
        at(0),
    )
    .await;
    let claimed = claim_one(store, &task, at(10)).await;
    assert_eq!(claimed.status, Status::Running);
    assert_eq!(claimed.attempt, 1);
    assert_eq!(claimed.started_at, Some(at(10)));
    assert_eq!(claimed.updated_at, at(10));
    assert_eq!(claimed.lease_until, Some(at(10).after(LEASE)));
    assert!(!claimed.cancel_requested);
    assert_eq!(get(store, task.id).await, claimed);

    // The next attempt: attempt 2, a new start and lease, and the old progress forgotten.
    let update = ProgressUpdate {
        id: task.id,
        attempt: 1,
        progress: 0.4,
        message: Some("halfway".into()),
        now: at(11),
    };
    assert!(store.progress(update).await.expect("progress"));
    let failed = Outcome::Failed {
        error: error("flaky"),
        retry_at: Some(at(20)),
        result: None,
    };
    assert!(finish(store, &claimed, at(12), failed).await);
    assert_eq!(store.promote_due(at(20)).await.expect("promote").count, 1);
    let second = claim_one(store, &task, at(21)).await;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.started_at, Some(at(21)));
    assert_eq!(second.lease_until, Some(at(21).after(LEASE)));
    assert_eq!(
        (second.progress, second.progress_message.as_deref()),
        (None, None)
    );
    assert_eq!(second.run_at, None);
    assert_eq!(get(store, task.id).await, second);
}

async fn scheduled_tasks_wait_for_promotion_past_their_run_at(store: &dyn Store) {
    let soon = submit(
        store,
        NewTask::new("job", json!("soon")).with_run_at(at(10)),
        at(0),
    )
    .await;
    let later = submit(
        store,
        NewTask::new("job", json!("later")).with_run_at(at(50)),
        at(0),
    )
    .await;
    assert_eq!(
        (soon.status, soon.run_at),
        (Status::Scheduled, Some(at(10)))
    );

    // Not claimable, however late the claim, until promoted.
    assert!(claim(store, 10, at(100)).await.is_empty());

    let early = store.promote_due(at(9)).await.expect("promote");
    assert_eq!((early.count, early.next_due), (0, Some(at(10))));
    assert_eq!(get(store, soon.id).await.status, Status::Scheduled);

    // Due at run_at itself.
    let due = store.promote_due(at(10)).await.expect("promote");
    assert_eq!((due.count, due.next_due), (1, Some(at(50))));
    let promoted = get(store, soon.id).await;
    assert_eq!(
        (promoted.status, promoted.run_at, promoted.updated_at),
        (Status::Queued, None, at(10))
    );
    assert_eq!(get(store, later.id).await.status, Status::Scheduled);
    assert_eq!(ids(&claim(store, 10, at(11)).await), [soon.id]);

    let last = store.promote_due(at(60)).await.expect("promote");
    assert_eq!((last.count, last.next_due), (1, None));
    let empty = store.promote_due(at(70)).await.expect("promote");
    assert_eq!((empty.count, empty.next_due), (0, None));
    assert_eq!(ids(&claim(store, 10, at(71)).await), [later.id]);
    check_stats(store, "after promotions").await;
}

async fn finish_completed_records_the_result(store: &dyn Store) {
    let task = submit(store, NewTask::new("job", json!({})), at(0)).await;
    let running = claim_one(store, &task, at(1)).await;
    let result = json!({"sum": 5, "lines": ["a", "b"]});
    assert!(
        finish(
            store,
            &running,
            at(7),
            Outcome::Completed {
                result: result.clone()
            }
        )
        .await
    );
    let done = get(store, task.id).await;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.result, Some(result));
    assert_eq!(done.progress, Some(1.0));
    assert_eq!(done.finished_at, Some(at(7)));
    assert_eq!(done.updated_at, at(7));
    assert_eq!(done.lease_until, None);
    assert_eq!(done.error, None);
    assert_eq!((done.attempt, done.started_at), (1, Some(at(1))));
    check_stats(store, "after a completion").await;
}

async fn finish_failed_with_a_retry_schedules_the_next_attempt(store: &dyn Store) {
    let task = submit(
        store,
        NewTask::new("job", json!({})).with_max_attempts(2),
        at(0),
    )
    .await;
    let running = claim_one(store, &task, at(1)).await;
    let failure = TaskError {
        kind: FailureKind::Timeout,
        message: "took over 5s".into(),
    };
    let outcome = Outcome::Failed {
        error: failure.clone(),
        retry_at: Some(at(30)),
        result: None,
    };
    assert!(finish(store, &running, at(6), outcome).await);
    let waiting = get(store, task.id).await;
    assert_eq!(waiting.status, Status::Scheduled);
    assert_eq!(waiting.run_at, Some(at(30)));
    assert_eq!(waiting.error, Some(failure.clone()));
    assert_eq!(waiting.finished_at, None);
    assert_eq!(waiting.lease_until, None);
    assert_eq!(waiting.updated_at, at(6));
    assert_eq!(waiting.attempt, 1);

    assert!(claim(store, 1, at(29)).await.is_empty());
    let promoted = store.promote_due(at(30)).await.expect("promote");
    assert_eq!(promoted.count, 1);
    let retried = claim_one(store, &task, at(31)).await;
    assert_eq!(retried.attempt, 2);
    assert_eq!(
        retried.error,
        Some(failure),
        "the last attempt's error is kept while retrying"
    );
    check_stats(store, "after a retry").await;
}

async fn finish_failed_without_a_retry_fails_the_task(store: &dyn Store) {
    let task = submit(store, NewTask::new("job", json!({})), at(0)).await;
    let running = claim_one(store, &task, at(1)).await;
    let failure = error("exit status 2");
    assert!(
        finish(
            store,
            &running,
            at(4),
            Outcome::Failed {
                error: failure.clone(),
                retry_at: None,
                result: None,
            }
        )
        .await
    );
    let failed = get(store, task.id).await;
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.error, Some(failure));
    assert_eq!(failed.finished_at, Some(at(4)));
    assert_eq!(
        (failed.run_at, failed.lease_until, failed.result.clone()),
        (None, None, None)
    );
    assert!(claim(store, 1, at(5)).await.is_empty());
    check_stats(store, "after a failure").await;
}

/// A failed attempt's result (the facts its handler gave: an exit code, say) is kept beside its
/// error, through the retry, and goes when another end brings an error of its own: a failure
/// without a result, a lost worker. A cancel keeps it, as it keeps the error.
async fn a_failure_keeps_its_result_until_another_error_replaces_it(store: &dyn Store) {
    let task = submit(
        store,
        NewTask::new("job", json!({})).with_max_attempts(4),
        at(0),
    )
    .await;
    let facts = json!({"exit_code": 3, "stderr_tail": "err\n"});
    let failed_with = |result: Option<serde_json::Value>, retry_at| Outcome::Failed {
        error: error("exit code 3"),
        retry_at,
        result,
    };
    let first = claim_one(store, &task, at(1)).await;
    assert!(
        finish(
            store,
            &first,
            at(2),
            failed_with(Some(facts.clone()), Some(at(3)))
        )
        .await
    );
    let waiting = get(store, task.id).await;
    assert_eq!(waiting.status, Status::Scheduled);
    assert_eq!(waiting.result, Some(facts.clone()), "kept while it waits");
    store.promote_due(at(3)).await.expect("promote");
    let second = claim_one(store, &task, at(4)).await;
    assert_eq!(
        second.result,
        Some(facts.clone()),
        "kept while it runs again"
    );
    // A failure without a result clears the last one's.
    assert!(finish(store, &second, at(5), failed_with(None, Some(at(6)))).await);
    assert_eq!(get(store, task.id).await.result, None);
    store.promote_due(at(6)).await.expect("promote");
    let third = claim_one(store, &task, at(7)).await;
    assert!(
        finish(
            store,
            &third,
            at(8),
            failed_with(Some(facts.clone()), Some(at(9)))
        )
        .await
    );
    // A lost worker's error replaces the error, and the result goes with it.
    store.promote_due(at(9)).await.expect("promote");
    let fourth = claim_one(store, &task, at(10)).await;
    assert_eq!(fourth.result, Some(facts.clone()));
    let recovered = store
        .recover(
            at(10).after(LEASE).after(Duration::from_secs(1)),
            Recover::Expired,
        )
        .await
        .expect("recover");
    assert_eq!(ids(&recovered), [task.id]);
    let lost = get(store, task.id).await;
    assert_eq!(
        lost.error.as_ref().map(|e| e.kind),
        Some(FailureKind::WorkerLost)
    );
    assert_eq!((recovered[0].result.clone(), lost.result), (None, None));
    // Requeued (a lost attempt does not count): its last attempt completes.
    let fifth = claim_one(store, &task, at(50)).await;
    assert!(finish(store, &fifth, at(51), completed()).await);
    assert_eq!(get(store, task.id).await.status, Status::Completed);

    // A final failure keeps its result on the failed task; a cancel of a running retry keeps
    // the last failure's error and result alike.
    let once = submit(store, NewTask::new("job", json!({})), at(0)).await;
    let running = claim_one(store, &once, at(1)).await;
    assert!(
        finish(
            store,
            &running,
            at(2),
            failed_with(Some(facts.clone()), None)
        )
        .await
    );
    let failed = get(store, once.id).await;
    assert_eq!(
        (failed.status, failed.result),
        (Status::Failed, Some(facts.clone()))
    );
    let twice = submit(
        store,
        NewTask::new("job", json!({})).with_max_attempts(2),
        at(0),
    )
    .await;
    let running = claim_one(store, &twice, at(1)).await;
    assert!(
        finish(
            store,
            &running,
            at(2),
            failed_with(Some(facts.clone()), Some(at(3)))
        )
        .await
    );
    store.promote_due(at(3)).await.expect("promote");
    let again = claim_one(store, &twice, at(4)).await;
    assert!(finish(store, &again, at(5), Outcome::Cancelled).await);
    let cancelled = get(store, twice.id).await;
    assert_eq!(cancelled.status, Status::Cancelled);
    assert_eq!(
        (cancelled.error, cancelled.result),
        (Some(error("exit code 3")), Some(facts))
    );
    check_stats(store, "after failures with results").await;
}

/// What clients see as status `timeout` (a failed task whose last attempt ran out of time),
/// counted by type for `/metrics`; other failures are not.
async fn timed_out_counts_failed_tasks_whose_attempt_ran_out_of_time_by_type(store: &dyn Store) {
    assert!(store.timed_out().await.unwrap().is_empty());
    let mut ids = Vec::new();
    for (task_type, kind) in [
        ("slow", FailureKind::Timeout),
        ("slow", FailureKind::Timeout),
        ("slow", FailureKind::Error),
        ("other", FailureKind::Timeout),
    ] {
        let task = submit(store, NewTask::new(task_type, json!({})), at(0)).await;
        let running = claim_one(store, &task, at(1)).await;
        let failure = TaskError {
            kind,
            message: "ran out of time".into(),
        };
        assert!(
            finish(
                store,
                &running,
                at(2),
                Outcome::Failed {
                    error: failure,
                    retry_at: None,
                    result: None,
                }
            )
            .await
        );
        ids.push(task.id);
    }
    // Still running: not counted.
    let running = submit(store, NewTask::new("slow", json!({})), at(3)).await;
    claim_one(store, &running, at(4)).await;
    let counts = store.timed_out().await.unwrap();
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        vec![("other".to_owned(), 1), ("slow".to_owned(), 2)]
    );
    let stats = store.stats().await.unwrap();
    assert_eq!(
        stats.count(Status::Failed),
        4,
        "timeouts stay failed in the store"
    );
}

/// Reports progress 0.6 with words for the running attempt of `task`.
async fn report_progress(store: &dyn Store, task: &Task, now: Timestamp) {
    let update = ProgressUpdate {
        id: task.id,
        attempt: task.attempt,
        progress: 0.6,
        message: Some("60% done".into()),
        now,
    };
    assert!(store.progress(update).await.expect("progress"));
}

/// Checks that `task` went back to the queue after its attempt `attempt` was interrupted for
/// the `count`th time: nothing of the attempt left, its limit unchanged, the attempt not counted.
fn assert_requeued_after_interruption(task: &Task, attempt: u32, count: u32, kind: FailureKind) {
    assert_eq!(task.status, Status::Queued);
    assert_eq!(
        (task.attempt, task.interrupted_attempts, task.max_attempts),
        (attempt, count, 1),
        "max_attempts is never changed, and the interrupted attempt is counted as such"
    );
    assert_eq!(task.counted_attempts(), attempt - count);
    assert!(
        task.has_attempts_left(),
        "an interrupted attempt does not count"
    );
    assert_eq!(
        (task.progress, task.progress_message.as_deref()),
        (None, None),
        "no progress of the interrupted attempt"
    );
    assert_eq!(
        (task.lease_until, task.finished_at, task.run_at),
        (None, None, None)
    );
    assert_eq!(task.error.as_ref().map(|e| e.kind), Some(kind));
}

async fn finish_interrupted_requeues_without_using_an_attempt(store: &dyn Store) {
    let task = submit(
        store,
        NewTask::new("job", json!({})).with_max_attempts(1),
        at(0),
    )
    .await;
    let running = claim_one(store, &task, at(1)).await;
    report_progress(store, &running, at(2)).await;
    assert!(finish(store, &running, at(3), interrupted(&running)).await);
    let requeued = get(store, task.id).await;
    assert_requeued_after_interruption(&requeued, 1, 1, FailureKind::Interrupted);
    assert_eq!(requeued.updated_at, at(3));
    let again = claim_one(store, &task, at(4)).await;
    assert_eq!(
        (
            again.attempt,
            again.max_attempts,
            again.interrupted_attempts
        ),
        (2, 1, 1)
    );
    assert!(
        !again.has_attempts_left(),
        "the second attempt is the first that counts, and the last"
    );
    check_stats(store, "after an interruption").await;
}

async fn a_lost_attempt_is_requeued_like_an_interrupted_one(store: &dyn Store) {
    // By the lease reaper (its lease expired) and by recovery at start (every running attempt).
    for which in [Recover::Expired, Recover::AllRunning] {
        let task = submit(
            store,
            NewTask::new("job", json!({})).with_max_attempts(1),
            at(0),
        )
        .await;
        let running = claim_one(store, &task, at(1)).await;
        report_progress(store, &running, at(2)).await;
        let recovered = store
            .recover(at(1).after(LEASE).after(Duration::from_secs(1)), which)
            .await
            .expect("recover");
        assert_eq!(ids(&recovered), [task.id], "{which:?}");
        let requeued = get(store, task.id).await;
        assert_eq!(recovered[0], requeued, "the answer is the stored task");
        assert_requeued_after_interruption(&requeued, 1, 1, FailureKind::WorkerLost);
        let again = claim_one(store, &task, at(40)).await;
        assert_eq!((again.attempt, again.interrupted_attempts), (2, 1));
        assert!(finish(store, &again, at(41), completed()).await);
        let done = get(store, task.id).await;
        assert_eq!(
            (done.status, done.attempt, done.max_attempts),
            (Status::Completed, 2, 1)
        );
        check_stats(store, "after a lost attempt").await;
    }
}

async fn an_interrupted_task_that_opted_out_of_reruns_fails_interrupted(store: &dyn Store) {
    // Interrupted by a shutdown, lost by the reaper, lost at start: the same end.
    for way in 0..3 {
        let task = submit(
            store,
            NewTask::new("job", json!({}))
                .with_max_attempts(3)
                .with_rerun_on_recovery(false),
            at(0),
        )
        .await;
        assert!(!task.rerun_on_recovery);
        let running = claim_one(store, &task, at(1)).await;
        let later = at(1).after(LEASE).after(Duration::from_secs(1));
        match way {
            0 => assert!(finish(store, &running, later, interrupted(&running)).await),
            1 => assert_eq!(
                ids(&store
                    .recover(later, Recover::Expired)
                    .await
                    .expect("recover")),
                [task.id]
            ),
            _ => assert_eq!(
                ids(&store
                    .recover(later, Recover::AllRunning)
                    .await
                    .expect("recover")),
                [task.id]
            ),
        }
        let failed = get(store, task.id).await;
        assert_eq!(
            (failed.status, failed.finished_at),
            (Status::Failed, Some(later)),
            "way {way}"
        );
        let error = failed.error.expect("an error");
        assert_eq!(error.kind, FailureKind::Interrupted, "way {way}");
        assert!(error.message.contains("rerun_on_recovery"), "{error:?}");
        assert_eq!(
            (
                failed.attempt,
                failed.interrupted_attempts,
                failed.max_attempts
            ),
            (1, 1, 3)
        );
        check_stats(store, "after an interruption without a rerun").await;
    }
}

async fn a_task_interrupted_too_often_fails_interrupted(store: &dyn Store) {
    let task = submit(
        store,
        NewTask::new("job", json!({})).with_max_attempts(1),
        at(0),
    )
    .await;
    let mut now = 0;
    // Interrupted by shutdowns and crashes in turn: it runs again as long as the limit allows.
    for n in 1..=MAX_INTERRUPTED_ATTEMPTS + 1 {
        now += 100;
        let running = claim_one(store, &task, at(now)).await;
        assert_eq!(running.attempt, n);
        let later = at(now).after(LEASE).after(Duration::from_secs(1));
        if n % 2 == 1 {
            assert!(finish(store, &running, later, interrupted(&running)).await);
        } else {
            let recovered = store
                .recover(later, Recover::Expired)
                .await
                .expect("recover");
            assert_eq!(ids(&recovered), [task.id]);
        }
        let after = get(store, task.id).await;
        assert_eq!(after.interrupted_attempts, n);
        if n <= MAX_INTERRUPTED_ATTEMPTS {
            assert_eq!(after.status, Status::Queued, "interruption {n}");
        } else {
            assert_eq!(after.status, Status::Failed, "interruption {n}");
            let error = after.error.expect("an error");
            assert_eq!(error.kind, FailureKind::Interrupted);
            assert!(error.message.contains("interrupted"), "{error:?}");
            assert_eq!(after.max_attempts, 1);
        }
    }
    check_stats(store, "after too many interruptions").await;
}

async fn finish_cancelled_cancels_the_task(store: &dyn Store) {
    let task = submit(store, NewTask::new("job", json!({})), at(0)).await;
    let running = claim_one(store, &task, at(1)).await;
    let marked = store
        .command(task.id, Command::Cancel, at(2))
        .await
        .expect("cancel");
    assert_eq!(
        (marked.status, marked.cancel_requested),
        (Status::Running, true)
    );
    assert!(finish(store, &running, at(3), Outcome::Cancelled).await);
    let cancelled = get(store, task.id).await;
    assert_eq!(cancelled.status, Status::Cancelled);
    assert_eq!(cancelled.finished_at, Some(at(3)));
    assert!(!cancelled.cancel_requested);
    assert_eq!(
        (cancelled.lease_until, cancelled.result.clone()),
        (None, None)
    );
    check_stats(store, "after a cancellation").await;
}

async fn a_retry_or_interruption_after_a_cancel_request_cancels_the_task(store: &dyn Store) {
    let retry = Outcome::Failed {
        error: TaskError {
            kind: FailureKind::Timeout,
            message: "timed out".into(),
        },
        retry_at: Some(at(60)),
        result: None,
    };
    let rerun = Outcome::Interrupted {
        rerun: true,
        error: TaskError {
            kind: FailureKind::Interrupted,
            message: "interrupted".into(),
        },
    };
    let last = Outcome::Interrupted {
        rerun: false,
        error: TaskError {
            kind: FailureKind::Interrupted,
            message: "interrupted".into(),
        },
    };
    for outcome in [retry, rerun, last] {
        let task = submit(
            store,
            NewTask::new("job", json!({})).with_max_attempts(3),
            at(0),
        )
        .await;
        let running = claim_one(store, &task, at(1)).await;
        store
            .command(task.id, Command::Cancel, at(2))
            .await
            .expect("cancel");
        assert!(finish(store, &running, at(3), outcome.clone()).await);
        let ended = get(store, task.id).await;
        assert_eq!(ended.status, Status::Cancelled, "{outcome:?}");
        assert_eq!(ended.finished_at, Some(at(3)));
        assert_eq!((ended.run_at, ended.max_attempts), (None, 3));
        check_stats(store, "after a cancelled retry").await;
    }
    // A completion that came first still stands.
    let task = submit(store, NewTask::new("job", json!({})), at(10)).await;
    let running = claim_one(store, &task, at(11)).await;
    store
        .command(task.id, Command::Cancel, at(12))
        .await
        .expect("cancel");
    assert!(finish(store, &running, at(13), completed()).await);
    assert_eq!(get(store, task.id).await.status, Status::Completed);
}

async fn writes_of_a_fenced_out_attempt_change_nothing(store: &dyn Store) {
    let task = submit(
        store,
        NewTask::new("job", json!({})).with_max_attempts(2),
        at(0),
    )
    .await;
    let first = claim_one(store, &task, at(1)).await;

    // A wrong attempt number.
    let wrong = Finish {
        id: task.id,
        attempt: 2,
        now: at(2),
        outcome: completed(),
    };
    assert!(!store.finish(wrong).await.expect("finish"));
    let update = |attempt, progress, now| ProgressUpdate {
        id: task.id,
        attempt,
        progress,
        message: Some(format!("at {progress}")),
        now,
    };
    assert!(
        !store
            .progress(update(2, 0.9, at(2)))
            .await
            .expect("progress")
    );
    assert_eq!(get(store, task.id).await, first);

    // The right attempt records progress; a report without words keeps the last words.
    assert!(
        store
            .progress(update(1, 0.25, at(3)))
            .await
            .expect("progress")
    );
    let quiet = ProgressUpdate {
        id: task.id,
        attempt: 1,
        progress: 0.5,
        message: None,
        now: at(4),
    };
    assert!(store.progress(quiet).await.expect("progress"));
    let reported = get(store, task.id).await;
    assert_eq!(reported.progress, Some(0.5));
    assert_eq!(reported.progress_message.as_deref(), Some("at 0.25"));
    assert_eq!(reported.updated_at, at(4));

    // The lease expires and the task is recovered: the first attempt is fenced out for good.
    let recovered = store
        .recover(
            at(1).after(LEASE).after(Duration::from_secs(1)),
            Recover::Expired,
        )
        .await
        .expect("recover");
    assert_eq!(ids(&recovered), [task.id]);
    let requeued = get(store, task.id).await;
    assert_eq!(requeued.status, Status::Queued);
    assert!(!finish(store, &first, at(40), completed()).await);
    assert!(
        !store
            .progress(update(1, 0.75, at(40)))
            .await
            .expect("progress")
    );
    assert_eq!(get(store, task.id).await, requeued);

    // Nor can it write over the attempt that replaced it.
    let second = claim_one(store, &task, at(41)).await;
    assert!(!finish(store, &first, at(42), completed()).await);
    assert!(
        !store
            .progress(update(1, 0.75, at(42)))
            .await
            .expect("progress")
    );
    assert_eq!(get(store, task.id).await, second);

    // Completion happens exactly once.
    assert!(
        finish(
            store,
            &second,
            at(43),
            Outcome::Completed { result: json!(1) }
        )
        .await
    );
    let done = get(store, task.id).await;
    assert!(
        !finish(
            store,
            &second,
            at(44),
            Outcome::Completed { result: json!(2) }
        )
        .await
    );
    let late_failure = Outcome::Failed {
        error: error("late"),
        retry_at: None,
        result: None,
    };
    assert!(!finish(store, &second, at(44), late_failure).await);
    assert!(
        !store
            .progress(update(2, 0.1, at(44)))
            .await
            .expect("progress")
    );
    assert_eq!(get(store, task.id).await, done);
    assert_eq!(done.result, Some(json!(1)));

    // An unknown task is fenced out too.
    let ghost = Finish {
        id: TaskId::new(),
        attempt: 1,
        now: at(45),
        outcome: completed(),
    };
    assert!(!store.finish(ghost).await.expect("finish"));
    check_stats(store, "after fenced writes").await;
}

async fn heartbeat_renews_leases_and_reports_lost_and_cancelled_attempts(store: &dyn Store) {
    let news = (0..3).map(|i| NewTask::new("job", json!(i))).collect();
    let tasks = submit_all(store, news, at(0)).await;
    let claimed = claim(store, 3, at(1)).await;
    assert_eq!(ids(&claimed), ids(&tasks));
    let (first, second, third) = (&claimed[0], &claimed[1], &claimed[2]);
    assert!(finish(store, third, at(2), completed()).await);
    store
        .command(second.id, Command::Cancel, at(3))
        .await
        .expect("cancel");

    let ghost = TaskId::new();
    let beat = Heartbeat {
        held: vec![(first.id, 1), (second.id, 1), (third.id, 1), (ghost, 1)],
        lease_until: at(90),
    };
    let reply = store.heartbeat(beat).await.expect("heartbeat");
    assert_eq!(reply.lost, [third.id, ghost]);
    assert_eq!(reply.cancel_requested, [second.id]);
    assert_eq!(get(store, first.id).await.lease_until, Some(at(90)));
    assert_eq!(get(store, second.id).await.lease_until, Some(at(90)));
    assert_eq!(get(store, third.id).await.lease_until, None);

    // A wrong attempt is lost and its lease is not renewed.
    let wrong = Heartbeat {
        held: vec![(first.id, 2)],
        lease_until: at(500),
    };
    let reply = store.heartbeat(wrong).await.expect("heartbeat");
    assert_eq!(
        (reply.lost, reply.cancel_requested),
        (vec![first.id], vec![])
    );
    assert_eq!(get(store, first.id).await.lease_until, Some(at(90)));

    // The renewed lease holds past the first one: nothing expired at 60s, both at 91s.
    assert!(
        store
            .recover(at(60), Recover::Expired)
            .await
            .expect("recover")
            .is_empty()
    );
    let recovered = store
        .recover(at(91), Recover::Expired)
        .await
        .expect("recover");
    let mut recovered_ids = ids(&recovered);
    recovered_ids.sort();
    let mut expected = vec![first.id, second.id];
    expected.sort();
    assert_eq!(recovered_ids, expected);

    // After recovery, the attempts are lost.
    let beat = Heartbeat {
        held: vec![(first.id, 1), (second.id, 1)],
        lease_until: at(200),
    };
    let reply = store.heartbeat(beat).await.expect("heartbeat");
    assert_eq!(
        (reply.lost, reply.cancel_requested),
        (vec![first.id, second.id], vec![])
    );
}

/// What a command does to a task in a status.
#[derive(Debug)]
enum Expect {
    /// Applied: the task is now in this status.
    Moves(Status),
    /// Applied to a running task: it keeps running, marked for cancellation.
    MarkedForCancel,
    /// Applied to a running task: paused while its attempt runs (frozen, the lease kept).
    Freezes,
    /// Applied to a waiting task: its priority is the new one, its status and all else stay.
    Reprioritized,
    /// Refused with `Error::IllegalTransition`.
    Illegal,
}

async fn commands_on_every_status(store: &dyn Store) {
    use Expect::*;
    #[rustfmt::skip]
    let table: [(Status, [Expect; 4]); 7] = [
        //                  cancel                     pause              resume                 set priority
        (Status::Queued,    [Moves(Status::Cancelled), Moves(Status::Paused), Illegal,              Reprioritized]),
        (Status::Scheduled, [Moves(Status::Cancelled), Moves(Status::Paused), Illegal,              Reprioritized]),
        (Status::Paused,    [Moves(Status::Cancelled), Illegal,              Moves(Status::Queued), Reprioritized]),
        (Status::Running,   [MarkedForCancel,          Freezes,              Illegal,              Illegal]),
        (Status::Completed, [Illegal,                  Illegal,              Illegal,              Illegal]),
        (Status::Failed,    [Illegal,                  Illegal,              Illegal,              Illegal]),
        (Status::Cancelled, [Illegal,                  Illegal,              Illegal,              Illegal]),
    ];
    // `task_in` gives tasks the normal or the critical priority: high is a change for all.
    let commands = [
        Command::Cancel,
        Command::Pause,
        Command::Resume,
        Command::SetPriority(Priority::HIGH),
    ];
    let mut clock = 0;
    for (status, row) in table {
        for (command, expect) in commands.into_iter().zip(row) {
            clock += 10;
            let task = task_in(store, status, at(clock)).await;
            assert_eq!(task.status, status);
            let now = at(clock + 1);
            let result = store.command(task.id, command, now).await;
            let after = get(store, task.id).await;
            let what = format!("{command:?} on a {status} task");
            match expect {
                Moves(to) => {
                    let returned = result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(returned, after, "{what}: the answer is the stored task");
                    assert_eq!(after.status, to, "{what}");
                    assert_eq!(after.updated_at, now, "{what}");
                    assert_eq!(after.finished_at, to.is_terminal().then_some(now), "{what}");
                    assert!(!after.cancel_requested, "{what}");
                }
                MarkedForCancel => {
                    let returned = result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(returned, after, "{what}");
                    assert_eq!(after.status, Status::Running, "{what}");
                    assert!(after.cancel_requested, "{what}");
                    assert_eq!(
                        (after.attempt, after.lease_until),
                        (task.attempt, task.lease_until)
                    );
                    assert_eq!(after.finished_at, None, "{what}");
                }
                Freezes => {
                    let returned = result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(returned, after, "{what}");
                    assert_eq!(after.status, Status::Paused, "{what}");
                    assert_eq!(
                        (after.attempt, after.lease_until),
                        (task.attempt, task.lease_until),
                        "{what}: the attempt keeps its lease"
                    );
                    assert!(!after.cancel_requested, "{what}");
                    assert_eq!(after.finished_at, None, "{what}");
                }
                Reprioritized => {
                    let returned = result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(returned, after, "{what}: the answer is the stored task");
                    let mut expected = task.clone();
                    expected.priority = Priority::HIGH;
                    expected.updated_at = now;
                    assert_eq!(after, expected, "{what}: only the priority changes");
                }
                Illegal => {
                    let error = result.expect_err(&what);
                    let Error::IllegalTransition { id, transition } = &error else {
                        panic!("{what}: expected IllegalTransition, got {error:?}");
                    };
                    assert_eq!((*id, transition.from), (task.id, status), "{what}");
                    let expected_event = match command {
                        Command::Cancel => Event::Cancel,
                        Command::Pause => Event::Pause,
                        Command::Resume => Event::Resume {
                            frozen: false,
                            due: true,
                        },
                        Command::SetPriority(_) => Event::Reprioritize { frozen: false },
                    };
                    assert_eq!(
                        std::mem::discriminant(&transition.event),
                        std::mem::discriminant(&expected_event),
                        "{what}"
                    );
                    // "task <id>: cannot <verb> a task that is <status>...".
                    let text = error.to_string();
                    let sentence = format!(
                        "task {}: cannot {} a task that is {status}",
                        task.id,
                        transition.event.verb()
                    );
                    assert!(text.starts_with(&sentence), "{what}: {text}");
                    if let Command::SetPriority(_) = command {
                        assert!(
                            text.contains("only waiting tasks (queued, scheduled, or paused before they started) can be reprioritized"),
                            "{what}: {text}"
                        );
                    }
                    assert_eq!(after, task, "{what} changes nothing");
                }
            }
        }
    }
    check_stats(store, "after commands").await;
}

/// A running task paused (frozen) stays with its attempt: the worker renews its lease, reports
/// progress and may still finish it; resume gives it back as running; cancel marks it for the
/// worker; recovery finds it when its worker dies.
async fn a_frozen_task_stays_with_its_attempt(store: &dyn Store) {
    let task = task_in(store, Status::Running, at(0)).await;
    let frozen = store.command(task.id, Command::Pause, at(1)).await.unwrap();
    assert_eq!(frozen.status, Status::Paused);
    check_stats(store, "frozen").await;
    // Its worker still holds it.
    let reply = store
        .heartbeat(Heartbeat {
            held: vec![(task.id, task.attempt)],
            lease_until: at(5_000),
        })
        .await
        .unwrap();
    assert!(reply.lost.is_empty(), "{reply:?}");
    assert_eq!(get(store, task.id).await.lease_until, Some(at(5_000)));
    let update = ProgressUpdate {
        id: task.id,
        attempt: task.attempt,
        progress: 0.5,
        message: None,
        now: at(2),
    };
    assert!(store.progress(update).await.unwrap());
    // Pausing again is refused; resuming gives it back to its attempt.
    assert!(store.command(task.id, Command::Pause, at(3)).await.is_err());
    let resumed = store
        .command(task.id, Command::Resume, at(4))
        .await
        .unwrap();
    assert_eq!(resumed.status, Status::Running);
    assert_eq!(resumed.attempt, task.attempt);
    check_stats(store, "resumed").await;

    // Frozen, then cancelled: marked for its worker, which records the end.
    store.command(task.id, Command::Pause, at(5)).await.unwrap();
    let marked = store
        .command(task.id, Command::Cancel, at(6))
        .await
        .unwrap();
    assert_eq!(marked.status, Status::Paused);
    assert!(marked.cancel_requested);
    let finish = Finish {
        id: task.id,
        attempt: task.attempt,
        now: at(7),
        outcome: Outcome::Cancelled,
    };
    assert!(store.finish(finish).await.unwrap());
    assert_eq!(get(store, task.id).await.status, Status::Cancelled);
    check_stats(store, "cancelled while frozen").await;

    // A frozen task whose attempt ends (it raced the pause) completes.
    let racer = task_in(store, Status::Running, at(10)).await;
    store
        .command(racer.id, Command::Pause, at(11))
        .await
        .unwrap();
    let finish = Finish {
        id: racer.id,
        attempt: racer.attempt,
        now: at(12),
        outcome: completed(),
    };
    assert!(store.finish(finish).await.unwrap());
    assert_eq!(get(store, racer.id).await.status, Status::Completed);
    check_stats(store, "completed while frozen").await;

    // A frozen task whose worker died is recovered like a running one.
    let orphan = task_in(store, Status::Running, at(20)).await;
    let frozen = store
        .command(orphan.id, Command::Pause, at(21))
        .await
        .unwrap();
    let expiry = frozen.lease_until.unwrap().after(Duration::from_millis(1));
    let recovered = store.recover(expiry, Recover::Expired).await.unwrap();
    assert_eq!(
        recovered.iter().map(|t| t.id).collect::<Vec<_>>(),
        [orphan.id]
    );
    // A lost attempt does not count: queued again, the worker lost.
    assert_eq!(recovered[0].status, Status::Queued);
    assert_eq!(
        recovered[0].error.as_ref().unwrap().kind,
        FailureKind::WorkerLost
    );
    // Out of the way of what follows.
    store
        .command(orphan.id, Command::Cancel, expiry)
        .await
        .unwrap();
    assert_eq!(recovered[0].lease_until, None);
    check_stats(store, "recovered from frozen").await;
    let other = task_in(store, Status::Running, expiry).await;
    store
        .command(other.id, Command::Pause, expiry)
        .await
        .unwrap();
    let all = store.recover(expiry, Recover::AllRunning).await.unwrap();
    assert_eq!(all.iter().map(|t| t.id).collect::<Vec<_>>(), [other.id]);
    check_stats(store, "recovered all").await;
}

async fn release_gives_back_claims_that_never_started(store: &dyn Store) {
    // A first claim, given back: as it was before the claim.
    let fresh = submit(store, NewTask::new("fresh", json!({})), at(0)).await;
    let claimed = claim_one(store, &fresh, at(1)).await;
    assert_eq!(
        store
            .release(vec![(fresh.id, claimed.attempt)], at(2))
            .await
            .unwrap(),
        1
    );
    let back = get(store, fresh.id).await;
    assert_eq!(
        (
            back.status,
            back.attempt,
            back.started_at,
            back.lease_until,
            back.attempts.len(),
            back.interrupted_attempts,
            back.error.is_none(),
        ),
        (Status::Queued, 0, None, None, 0, 0, true),
        "{back:?}"
    );
    assert_eq!(back.updated_at, at(2));
    check_stats(store, "a first claim given back").await;
    // Giving it back again is fenced out; its next claim takes the same attempt number.
    assert_eq!(
        store
            .release(vec![(fresh.id, claimed.attempt)], at(3))
            .await
            .unwrap(),
        0
    );
    let again = claim_one(store, &fresh, at(4)).await;
    assert_eq!(again.attempt, 1);
    assert!(finish(store, &again, at(5), completed()).await);
    assert_eq!(get(store, fresh.id).await.attempts.len(), 1);

    // A second attempt given back: the first one's start, error and history stay.
    let retried = submit(store, NewTask::new("retried", json!({})), at(10)).await;
    let first = claim_one(store, &retried, at(11)).await;
    let failed = Outcome::Failed {
        error: error("broke"),
        retry_at: Some(at(12)),
        result: None,
    };
    assert!(finish(store, &first, at(11), failed).await);
    store.promote_due(at(13)).await.unwrap();
    let second = claim_one(store, &retried, at(14)).await;
    assert_eq!(second.attempt, 2);
    // With an attempt fenced out (the first) in the same request, which changes nothing.
    let released = store
        .release(
            vec![(retried.id, first.attempt), (retried.id, second.attempt)],
            at(15),
        )
        .await
        .unwrap();
    assert_eq!(released, 1);
    let back = get(store, retried.id).await;
    assert_eq!(
        (
            back.status,
            back.attempt,
            back.started_at,
            back.lease_until,
            back.attempts.len()
        ),
        (Status::Queued, 1, Some(at(11)), None, 1),
        "{back:?}"
    );
    assert_eq!(back.error, Some(error("broke")));
    check_stats(store, "a second attempt given back").await;
    let third = claim_one(store, &retried, at(16)).await;
    assert!(finish(store, &third, at(17), completed()).await);

    // Paused while claimed: paused as before it started, without a lease.
    let paused = task_in(store, Status::Running, at(20)).await;
    store
        .command(paused.id, Command::Pause, at(21))
        .await
        .unwrap();
    assert_eq!(
        store
            .release(vec![(paused.id, paused.attempt)], at(22))
            .await
            .unwrap(),
        1
    );
    let back = get(store, paused.id).await;
    assert_eq!(
        (back.status, back.attempt, back.lease_until),
        (Status::Paused, 0, None)
    );
    check_stats(store, "a paused claim given back").await;
    let resumed = store
        .command(paused.id, Command::Resume, at(23))
        .await
        .unwrap();
    assert_eq!(resumed.status, Status::Queued, "it had not started");
    let run = claim_one(store, &paused, at(24)).await;
    assert!(finish(store, &run, at(25), completed()).await);

    // Cancelled while claimed: cancelled, with nothing in its history.
    let cancelled = task_in(store, Status::Running, at(30)).await;
    store
        .command(cancelled.id, Command::Cancel, at(31))
        .await
        .unwrap();
    assert_eq!(
        store
            .release(vec![(cancelled.id, cancelled.attempt)], at(32))
            .await
            .unwrap(),
        1
    );
    let back = get(store, cancelled.id).await;
    assert_eq!(
        (
            back.status,
            back.attempt,
            back.finished_at,
            back.cancel_requested,
            back.attempts.len()
        ),
        (Status::Cancelled, 0, Some(at(32)), false, 0),
        "{back:?}"
    );
    check_stats(store, "a cancelled claim given back").await;

    // A task never claimed, or unknown: nothing to give back.
    let waiting = submit(store, NewTask::new("waiting", json!({})), at(40)).await;
    assert_eq!(
        store
            .release(vec![(waiting.id, 0), (TaskId::new(), 1)], at(41))
            .await
            .unwrap(),
        0
    );
    assert_eq!(get(store, waiting.id).await.status, Status::Queued);
}

async fn commands_on_an_unknown_task_are_not_found(store: &dyn Store) {
    submit(store, NewTask::new("job", json!({})), at(0)).await;
    let ghost = TaskId::new();
    for command in [Command::Cancel, Command::Pause, Command::Resume] {
        match store.command(ghost, command, at(1)).await {
            Err(Error::TaskNotFound { id }) => assert_eq!(id, ghost),
            other => panic!("{command:?} on an unknown task: expected TaskNotFound, got {other:?}"),
        }
    }
    check_stats(store, "after commands on an unknown task").await;
}

async fn resume_of_a_paused_delayed_task_reschedules_or_queues_it(store: &dyn Store) {
    // Paused while scheduled, resumed before its run_at: scheduled again, still delayed.
    let early = submit(
        store,
        NewTask::new("job", json!("early")).with_run_at(at(100)),
        at(0),
    )
    .await;
    let paused = store
        .command(early.id, Command::Pause, at(1))
        .await
        .expect("pause");
    assert_eq!(paused.status, Status::Paused);
    assert_eq!(
        store.promote_due(at(200)).await.expect("promote").count,
        0,
        "paused is not promoted"
    );
    let resumed = store
        .command(early.id, Command::Resume, at(50))
        .await
        .expect("resume");
    assert_eq!(
        (resumed.status, resumed.run_at),
        (Status::Scheduled, Some(at(100)))
    );
    assert_eq!(get(store, early.id).await, resumed);
    assert!(claim(store, 10, at(60)).await.is_empty());
    let promoted = store.promote_due(at(100)).await.expect("promote");
    assert_eq!((promoted.count, promoted.next_due), (1, None));

    // Resumed after its run_at has passed: queued at once, like a promoted task (no run_at left
    // on a queued task).
    let late = submit(
        store,
        NewTask::new("job", json!("late")).with_run_at(at(300)),
        at(200),
    )
    .await;
    store
        .command(late.id, Command::Pause, at(201))
        .await
        .expect("pause");
    let resumed = store
        .command(late.id, Command::Resume, at(400))
        .await
        .expect("resume");
    assert_eq!(resumed.status, Status::Queued);
    assert_eq!(get(store, late.id).await, resumed);
    assert_eq!(
        resumed.run_at, None,
        "a queued task has no run_at (promotion clears it)"
    );
    check_stats(store, "after resumes").await;
}

async fn recover_expired_takes_only_expired_leases(store: &dyn Store) {
    let retry = submit(
        store,
        NewTask::new("retry", json!({})).with_max_attempts(2),
        at(0),
    )
    .await;
    let last = submit(
        store,
        NewTask::new("last", json!({})).with_max_attempts(1),
        at(0),
    )
    .await;
    let cancel = submit(
        store,
        NewTask::new("cancel", json!({})).with_max_attempts(3),
        at(0),
    )
    .await;
    let fresh = submit(store, NewTask::new("fresh", json!({})), at(0)).await;
    let edge = submit(store, NewTask::new("edge", json!({})), at(0)).await;
    let queued = submit(store, NewTask::new("queued", json!({})), at(0)).await;
    for task in [&retry, &last, &cancel] {
        let lease = ClaimRequest {
            lease_until: at(10),
            ..request(1, at(1))
        };
        assert_eq!(ids(&store.claim(lease).await.expect("claim")), [task.id]);
    }
    let lease = ClaimRequest {
        lease_until: at(100),
        ..request(1, at(1))
    };
    assert_eq!(ids(&store.claim(lease).await.expect("claim")), [fresh.id]);
    let lease = ClaimRequest {
        lease_until: at(50),
        ..request(1, at(1))
    };
    assert_eq!(ids(&store.claim(lease).await.expect("claim")), [edge.id]);
    store
        .command(cancel.id, Command::Cancel, at(5))
        .await
        .expect("cancel");

    assert!(
        store
            .recover(at(10), Recover::Expired)
            .await
            .expect("recover")
            .is_empty(),
        "a lease holds until its end"
    );
    let mut recovered = store
        .recover(at(50), Recover::Expired)
        .await
        .expect("recover");
    recovered.sort_by_key(|task| task.task_type.clone());
    let types: Vec<&str> = recovered.iter().map(|t| t.task_type.as_str()).collect();
    assert_eq!(types, ["cancel", "last", "retry"]);
    for task in &recovered {
        assert_eq!(
            *task,
            get(store, task.id).await,
            "the answer is the stored task"
        );
        assert_eq!((task.lease_until, task.updated_at), (None, at(50)));
        assert!(!task.cancel_requested);
    }

    let retried = get(store, retry.id).await;
    assert_eq!(
        (retried.status, retried.attempt, retried.finished_at),
        (Status::Queued, 1, None)
    );
    assert_eq!(
        retried.error.as_ref().map(|e| e.kind),
        Some(FailureKind::WorkerLost)
    );
    assert!(
        retried
            .error
            .as_ref()
            .is_some_and(|e| !e.message.is_empty())
    );

    // Out of attempts, but a lost attempt does not count: queued again.
    let lost = get(store, last.id).await;
    assert_eq!(
        (lost.status, lost.finished_at, lost.max_attempts),
        (Status::Queued, None, 1)
    );
    assert_eq!(lost.interrupted_attempts, 1);
    assert_eq!(
        lost.error.as_ref().map(|e| e.kind),
        Some(FailureKind::WorkerLost)
    );

    let cancelled = get(store, cancel.id).await;
    assert_eq!(
        (cancelled.status, cancelled.finished_at),
        (Status::Cancelled, Some(at(50)))
    );
    assert_eq!(cancelled.error, None);

    assert_eq!(get(store, fresh.id).await.status, Status::Running);
    assert_eq!(get(store, edge.id).await.status, Status::Running);
    assert_eq!(get(store, queued.id).await.status, Status::Queued);

    let later = store
        .recover(at(51), Recover::Expired)
        .await
        .expect("recover");
    assert_eq!(ids(&later), [edge.id]);
    assert!(
        store
            .recover(at(52), Recover::Expired)
            .await
            .expect("recover")
            .is_empty()
    );
    check_stats(store, "after recovering expired leases").await;
}

async fn recover_all_running_takes_every_running_attempt(store: &dyn Store) {
    let news = vec![
        NewTask::new("a", json!({})).with_max_attempts(2),
        NewTask::new("b", json!({})),
        NewTask::new("c", json!({})).with_rerun_on_recovery(false),
    ];
    let tasks = submit_all(store, news, at(0)).await;
    let queued = submit(store, NewTask::new("d", json!({})), at(0)).await;
    let scheduled = submit(
        store,
        NewTask::new("e", json!({})).with_run_at(at(100)),
        at(0),
    )
    .await;
    let lease = ClaimRequest {
        lease_until: at(1_000),
        ..request(3, at(1))
    };
    assert_eq!(ids(&store.claim(lease).await.expect("claim")), ids(&tasks));
    let still_queued = submit(store, NewTask::new("f", json!({})), at(2)).await;
    let finished = claim_one(store, &queued, at(2)).await;
    assert!(finish(store, &finished, at(3), completed()).await);

    let mut recovered = store
        .recover(at(4), Recover::AllRunning)
        .await
        .expect("recover");
    recovered.sort_by_key(|task| task.task_type.clone());
    let outcome: Vec<(&str, Status)> = recovered
        .iter()
        .map(|t| (t.task_type.as_str(), t.status))
        .collect();
    assert_eq!(
        outcome,
        [
            ("a", Status::Queued),
            // Out of attempts, but a lost attempt does not count.
            ("b", Status::Queued),
            // Opted out of reruns.
            ("c", Status::Failed)
        ]
    );
    assert_eq!(get(store, scheduled.id).await.status, Status::Scheduled);
    assert_eq!(get(store, queued.id).await.status, Status::Completed);
    assert_eq!(get(store, still_queued.id).await.status, Status::Queued);
    assert!(
        store
            .recover(at(5), Recover::AllRunning)
            .await
            .expect("recover")
            .is_empty()
    );
    check_stats(store, "after recovering every running attempt").await;
}

async fn prune_deletes_only_old_terminal_tasks_up_to_the_limit(store: &dyn Store) {
    // Terminal tasks finished at 1, 2, 3 (completed), 4 (failed) and 5 (cancelled).
    let mut terminal = Vec::new();
    for second in 1..=3 {
        let task = submit(
            store,
            NewTask::new("done", json!(second)).with_idempotency_key(format!("k{second}")),
            at(0),
        )
        .await;
        let running = claim_one(store, &task, at(0)).await;
        assert!(finish(store, &running, at(second), completed()).await);
        terminal.push(task);
    }
    let failed = submit(store, NewTask::new("failed", json!({})), at(0)).await;
    let running = claim_one(store, &failed, at(0)).await;
    assert!(
        finish(
            store,
            &running,
            at(4),
            Outcome::Failed {
                error: error("no"),
                retry_at: None,
                result: None,
            }
        )
        .await
    );
    let cancelled = submit(store, NewTask::new("cancelled", json!({})), at(0)).await;
    store
        .command(cancelled.id, Command::Cancel, at(5))
        .await
        .expect("cancel");
    terminal.push(failed);
    terminal.push(cancelled);

    // Live tasks, however old, are never pruned.
    let running = submit(store, NewTask::new("running", json!({})), at(0)).await;
    claim_one(store, &running, at(0)).await;
    let queued = submit(store, NewTask::new("queued", json!({})), at(0)).await;
    let scheduled = submit(
        store,
        NewTask::new("scheduled", json!({})).with_run_at(at(1_000)),
        at(0),
    )
    .await;
    let paused = submit(store, NewTask::new("paused", json!({})), at(0)).await;
    store
        .command(paused.id, Command::Pause, at(0))
        .await
        .expect("pause");

    // Strictly before the cutoff.
    assert_eq!(store.prune(at(3), 100).await.expect("prune"), 2);
    assert_eq!(store.get(terminal[0].id).await.expect("get"), None);
    assert_eq!(store.get(terminal[1].id).await.expect("get"), None);
    assert!(store.get(terminal[2].id).await.expect("get").is_some());
    check_stats(store, "after the first prune").await;

    // At most `limit` at a time, oldest first.
    assert_eq!(store.prune(at(1_000), 2).await.expect("prune"), 2);
    assert_eq!(store.get(terminal[2].id).await.expect("get"), None);
    assert_eq!(store.get(terminal[3].id).await.expect("get"), None);
    assert!(store.get(terminal[4].id).await.expect("get").is_some());
    assert_eq!(store.prune(at(1_000), 0).await.expect("prune"), 0);
    assert_eq!(store.prune(at(1_000), 2).await.expect("prune"), 1);
    assert_eq!(store.prune(at(1_000), 2).await.expect("prune"), 0);

    for task in [&running, &queued, &scheduled, &paused] {
        assert_eq!(get(store, task.id).await.task_type, task.task_type);
    }
    assert_eq!(all_tasks(store).await.len(), 4);
    check_stats(store, "after pruning").await;

    // A pruned task's idempotency key is free again.
    let again = NewTask::new("done", json!("again")).with_idempotency_key("k1");
    let answers = store
        .submit(vec![again.into_task(TaskId::new(), at(2_000))])
        .await
        .expect("submit");
    assert!(answers[0].created);
}

async fn set_priority_reorders_waiting_tasks_and_refuses_started_ones(store: &dyn Store) {
    // Raised: of two low tasks, the later one raised to high is claimed first.
    let a = submit(
        store,
        NewTask::new("a", json!({})).with_priority(Priority::LOW),
        at(0),
    )
    .await;
    let b = submit(
        store,
        NewTask::new("b", json!({})).with_priority(Priority::LOW),
        at(1),
    )
    .await;
    let raised = store
        .command(b.id, Command::SetPriority(Priority::HIGH), at(2))
        .await
        .expect("set priority");
    assert_eq!(
        (raised.status, raised.priority, raised.updated_at),
        (Status::Queued, Priority::HIGH, at(2))
    );
    assert_eq!(get(store, b.id).await, raised);
    let running_b = claim_one(store, &b, at(3)).await;
    assert_eq!(running_b.priority, Priority::HIGH);
    check_stats(store, "after raising a queued task").await;

    // Lowered: a normal task lowered to the minimum comes after the low one.
    let c = submit(store, NewTask::new("c", json!({})), at(4)).await;
    store
        .command(c.id, Command::SetPriority(Priority::MIN), at(5))
        .await
        .expect("set priority");
    claim_one(store, &a, at(6)).await;
    claim_one(store, &c, at(7)).await;

    // A scheduled task keeps its status and run_at, and takes its priority to the queue.
    let d = submit(store, NewTask::new("d", json!({})), at(10)).await;
    let s = submit(
        store,
        NewTask::new("s", json!({}))
            .with_priority(Priority::LOW)
            .with_run_at(at(20)),
        at(10),
    )
    .await;
    let scheduled = store
        .command(s.id, Command::SetPriority(Priority::CRITICAL), at(11))
        .await
        .expect("set priority");
    assert_eq!(
        (scheduled.status, scheduled.run_at, scheduled.priority),
        (Status::Scheduled, Some(at(20)), Priority::CRITICAL)
    );
    assert_eq!(store.promote_due(at(20)).await.expect("promote").count, 1);
    claim_one(store, &s, at(21)).await;

    // A task paused before it started stays paused, and resumes with its new priority.
    let p = submit(
        store,
        NewTask::new("p", json!({})).with_priority(Priority::MIN),
        at(22),
    )
    .await;
    store
        .command(p.id, Command::Pause, at(23))
        .await
        .expect("pause");
    let paused = store
        .command(p.id, Command::SetPriority(Priority::CRITICAL), at(24))
        .await
        .expect("set priority");
    assert_eq!(
        (paused.status, paused.priority, paused.lease_until),
        (Status::Paused, Priority::CRITICAL, None)
    );
    store
        .command(p.id, Command::Resume, at(25))
        .await
        .expect("resume");
    claim_one(store, &p, at(26)).await;
    claim_one(store, &d, at(27)).await;
    check_stats(store, "after reprioritizing waiting tasks").await;

    // Started tasks keep their priority: running, and frozen (paused while running).
    let refuse = |status: Status, frozen: bool, text: String| {
        assert!(
            text.contains(&format!("cannot reprioritize a task that is {status}")),
            "{text}"
        );
        assert!(text.contains("already started"), "{text}");
        assert!(
            text.contains("only waiting tasks (queued, scheduled, or paused before they started) can be reprioritized"),
            "{text}"
        );
        assert_eq!(text.contains("paused while running"), frozen, "{text}");
    };
    let before = get(store, running_b.id).await;
    let error = store
        .command(running_b.id, Command::SetPriority(Priority::MIN), at(30))
        .await
        .expect_err("a running task");
    assert!(
        matches!(error, Error::IllegalTransition { id, .. } if id == running_b.id),
        "{error:?}"
    );
    refuse(Status::Running, false, error.to_string());
    assert_eq!(get(store, running_b.id).await, before);

    let frozen = store
        .command(running_b.id, Command::Pause, at(31))
        .await
        .expect("freeze");
    assert!(frozen.lease_until.is_some());
    let error = store
        .command(running_b.id, Command::SetPriority(Priority::MIN), at(32))
        .await
        .expect_err("a frozen task");
    let Error::IllegalTransition { transition, .. } = &error else {
        panic!("expected IllegalTransition, got {error:?}");
    };
    assert_eq!(transition.event, Event::Reprioritize { frozen: true });
    refuse(Status::Paused, true, error.to_string());
    assert_eq!(get(store, running_b.id).await, frozen);

    // Finished tasks too; and an unknown task is not found.
    assert!(finish(store, &running_b, at(33), completed()).await);
    let error = store
        .command(running_b.id, Command::SetPriority(Priority::MIN), at(34))
        .await
        .expect_err("a completed task");
    let text = error.to_string();
    assert!(
        text.contains("cannot reprioritize a task that is completed")
            && text.contains("only waiting tasks")
            && text.contains("submit a new task"),
        "{text}"
    );
    let unknown = TaskId::new();
    assert!(matches!(
        store
            .command(unknown, Command::SetPriority(Priority::HIGH), at(35))
            .await,
        Err(Error::TaskNotFound { id }) if id == unknown
    ));
    check_stats(store, "after refused reprioritizations").await;
}

/// A task of `owner` with `task_type` and `session` that ends in `status` at `when`, claimed with
/// the critical priority so that no waiting task is claimed in its place.
async fn finished_task(
    store: &dyn Store,
    owner: Option<&str>,
    task_type: &str,
    session: &str,
    status: Status,
    when: Timestamp,
) -> Task {
    let mut new = NewTask::new(task_type, json!({}))
        .with_session(session)
        .with_priority(Priority::CRITICAL);
    if let Some(owner) = owner {
        new = new.with_owner(owner);
    }
    let task = submit(store, new, at(0)).await;
    let running = claim_one(store, &task, at(0)).await;
    let outcome = match status {
        Status::Completed => completed(),
        Status::Failed => Outcome::Failed {
            error: error("broke"),
            retry_at: None,
            result: None,
        },
        Status::Cancelled => Outcome::Cancelled,
        other => panic!("{other} is not a terminal status"),
    };
    assert!(finish(store, &running, when, outcome).await);
    let done = get(store, task.id).await;
    assert_eq!((done.status, done.finished_at), (status, Some(when)));
    done
}

async fn delete_finished_deletes_only_matching_old_terminal_tasks_up_to_the_limit(
    store: &dyn Store,
) {
    use Status::{Cancelled, Completed, Failed};
    let alice = Some("alice");
    let a1 = finished_task(store, alice, "build", "s1", Completed, at(1)).await;
    let a2 = finished_task(store, alice, "test", "s1", Failed, at(2)).await;
    let a3 = finished_task(store, alice, "build", "s2", Cancelled, at(3)).await;
    let a4 = finished_task(store, alice, "test", "s2", Completed, at(4)).await;
    let a5 = finished_task(store, alice, "build", "s1", Completed, at(5)).await;
    let a6 = finished_task(store, alice, "build", "s1", Completed, at(10)).await;
    let b1 = finished_task(store, Some("bob"), "build", "s1", Completed, at(1)).await;
    let b2 = finished_task(store, Some("bob"), "build", "s1", Failed, at(2)).await;
    let n1 = finished_task(store, None, "build", "s1", Completed, at(1)).await;

    // Alice's live tasks, however old: running, frozen, queued, scheduled, paused.
    let live_new = || {
        NewTask::new("build", json!({}))
            .with_owner("alice")
            .with_session("s1")
    };
    let running = submit(store, live_new().with_priority(Priority::CRITICAL), at(0)).await;
    claim_one(store, &running, at(0)).await;
    let frozen = submit(store, live_new().with_priority(Priority::CRITICAL), at(0)).await;
    claim_one(store, &frozen, at(0)).await;
    store
        .command(frozen.id, Command::Pause, at(0))
        .await
        .expect("freeze");
    let queued = submit(store, live_new(), at(0)).await;
    let scheduled = submit(store, live_new().with_run_at(at(1_000)), at(0)).await;
    let paused = submit(store, live_new(), at(0)).await;
    store
        .command(paused.id, Command::Pause, at(0))
        .await
        .expect("pause");
    let live = [&running, &frozen, &queued, &scheduled, &paused];
    check_stats(store, "before deleting").await;

    let of_alice = || ListFilter {
        owner: Some("alice".into()),
        ..ListFilter::default()
    };
    let exists = |id: TaskId| async move { store.get(id).await.expect("get").is_some() };

    // A filter that names only live statuses deletes nothing.
    let live_only = ListFilter {
        statuses: vec![
            Status::Queued,
            Status::Scheduled,
            Status::Paused,
            Status::Running,
        ],
        ..of_alice()
    };
    let deleted = store
        .delete_finished(live_only, at(1_000_000), 100)
        .await
        .expect("delete");
    assert_eq!(deleted, 0);
    assert_eq!(all_tasks(store).await.len(), 14);

    // Alice's only, strictly before the time.
    let deleted = store
        .delete_finished(of_alice(), at(3), 100)
        .await
        .expect("delete");
    assert_eq!(deleted, 2);
    assert!(!exists(a1.id).await && !exists(a2.id).await);
    for kept in [&a3, &b1, &b2, &n1] {
        assert!(exists(kept.id).await, "{} was deleted", kept.id);
    }
    check_stats(store, "after deleting alice's oldest").await;

    // Narrowed by status (a live status in the list matches nothing)...
    let cancelled = ListFilter {
        statuses: vec![Cancelled, Status::Running],
        ..of_alice()
    };
    let deleted = store
        .delete_finished(cancelled, at(1_000), 100)
        .await
        .expect("delete");
    assert_eq!(deleted, 1);
    assert!(!exists(a3.id).await);
    // ...by type and session...
    let build_s1 = ListFilter {
        task_type: Some("build".into()),
        session_id: Some("s1".into()),
        ..of_alice()
    };
    let deleted = store
        .delete_finished(build_s1, at(10), 100)
        .await
        .expect("delete");
    assert_eq!(deleted, 1, "a5 only: a6 finished at the time, not before");
    assert!(!exists(a5.id).await && exists(a6.id).await && exists(a4.id).await);
    let tests = ListFilter {
        task_type: Some("test".into()),
        ..of_alice()
    };
    assert_eq!(
        store
            .delete_finished(tests, at(1_000), 100)
            .await
            .expect("delete"),
        1
    );
    assert!(!exists(a4.id).await);
    // ...and by creation time.
    let created_later = ListFilter {
        created_from: Some(at(1)),
        ..of_alice()
    };
    assert_eq!(
        store
            .delete_finished(created_later, at(1_000), 100)
            .await
            .expect("delete"),
        0
    );
    check_stats(store, "after filtered deletes").await;

    // At most `limit`, those that finished first first.
    let of_bob = ListFilter {
        owner: Some("bob".into()),
        ..ListFilter::default()
    };
    let deleted = store
        .delete_finished(of_bob.clone(), at(1_000), 1)
        .await
        .expect("delete");
    assert_eq!(deleted, 1);
    assert!(!exists(b1.id).await && exists(b2.id).await);
    assert_eq!(
        store
            .delete_finished(of_bob.clone(), at(1_000), 0)
            .await
            .expect("delete"),
        0
    );
    assert_eq!(
        store
            .delete_finished(of_bob.clone(), at(1_000), 5)
            .await
            .expect("delete"),
        1
    );
    assert_eq!(
        store
            .delete_finished(of_bob, at(1_000), 5)
            .await
            .expect("delete"),
        0
    );
    check_stats(store, "after deleting with a limit").await;

    // Everything of alice's that finished; then an empty filter takes every owner's.
    assert_eq!(
        store
            .delete_finished(of_alice(), at(1_000_000), usize::MAX)
            .await
            .expect("delete"),
        1
    );
    assert!(!exists(a6.id).await && exists(n1.id).await);
    assert_eq!(
        store
            .delete_finished(ListFilter::default(), at(1_000_000), 100)
            .await
            .expect("delete"),
        1
    );
    assert!(!exists(n1.id).await);

    // Live tasks were never touched; the counts are theirs alone.
    for task in live {
        assert!(exists(task.id).await, "a live task was deleted");
    }
    check_stats(store, "after deleting every finished task").await;
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.total(), 5);
    for status in [Completed, Failed, Cancelled] {
        assert_eq!(stats.count(status), 0, "{status}");
    }
    assert_eq!(
        (
            stats.count(Status::Running),
            stats.count(Status::Paused),
            stats.count(Status::Queued),
            stats.count(Status::Scheduled)
        ),
        (1, 2, 1, 1)
    );
    assert_eq!(stats.by_type.keys().collect::<Vec<_>>(), ["build"]);
}

async fn reassign_owner_moves_every_task_but_those_whose_key_the_new_owner_holds(
    store: &dyn Store,
) {
    let owned = |owner: &str| NewTask::new("build", json!({})).with_owner(owner);
    // "old" has a task with the key "k" that "new" holds too, one with a key of its own, one
    // running and one finished; "other" and a task with no owner look on.
    let conflicting = submit(store, owned("old").with_idempotency_key("k"), at(0)).await;
    let keyed = submit(store, owned("old").with_idempotency_key("k2"), at(1)).await;
    let running = submit(store, owned("old").with_priority(Priority::CRITICAL), at(2)).await;
    claim_one(store, &running, at(3)).await;
    let finished = finished_task(store, Some("old"), "build", "s1", Status::Completed, at(4)).await;
    let newer = submit(store, owned("new").with_idempotency_key("k"), at(5)).await;
    let other = submit(store, owned("other").with_idempotency_key("k2"), at(6)).await;
    let nobody = submit(store, NewTask::new("build", json!({})), at(7)).await;
    let before = all_tasks(store).await;

    assert_eq!(
        store.reassign_owner("old", "new").await.expect("reassign"),
        3
    );

    let owned_by = async |owner: &str| -> HashSet<TaskId> {
        let filter = ListFilter {
            owner: Some(owner.into()),
            ..ListFilter::default()
        };
        list_all(store, filter, PageRequest::MAX_LIMIT)
            .await
            .iter()
            .map(|task| task.id)
            .collect()
    };
    let moved = [keyed.id, running.id, finished.id];
    assert_eq!(
        owned_by("new").await,
        HashSet::from([newer.id, moved[0], moved[1], moved[2]])
    );
    assert_eq!(owned_by("old").await, HashSet::from([conflicting.id]));
    assert_eq!(owned_by("other").await, HashSet::from([other.id]));
    // Nothing else changed: not the other fields of the moved tasks, not the other tasks.
    for task in before {
        let now = get(store, task.id).await;
        if moved.contains(&task.id) {
            assert_eq!(now.owner.as_deref(), Some("new"));
            assert_eq!(
                Task {
                    owner: task.owner.clone(),
                    ..now
                },
                task
            );
        } else {
            assert_eq!(now, task);
        }
    }
    assert_eq!(get(store, nobody.id).await.owner, None);

    // Done once: a second call, or a move to the same owner, moves nothing.
    assert_eq!(store.reassign_owner("old", "new").await.expect("again"), 0);
    assert_eq!(
        store.reassign_owner("new", "new").await.expect("to itself"),
        0
    );
    assert_eq!(owned_by("new").await.len(), 4);
    assert_eq!(
        store.reassign_owner("nobody", "new").await.expect("none"),
        0
    );

    // The keys moved with their tasks: "new" holds "k2" now, "old" holds only "k".
    let resubmit = async |owner: &str, key: &str| {
        let task = owned(owner)
            .with_idempotency_key(key)
            .into_task(TaskId::new(), at(8));
        let mut answers = store.submit(vec![task]).await.expect("submit");
        answers.pop().expect("one answer")
    };
    let again = resubmit("new", "k2").await;
    assert!(!again.created);
    assert_eq!(again.task.id, keyed.id);
    let again = resubmit("old", "k").await;
    assert!(!again.created);
    assert_eq!(again.task.id, conflicting.id);
    assert!(resubmit("old", "k2").await.created);
    check_stats(store, "after reassigning an owner").await;
}

async fn list_filters_by_every_field(store: &dyn Store) {
    // Twelve tasks over two types, three owners, two sessions and twelve creation times.
    let mut tasks = Vec::new();
    for i in 0..12_i64 {
        let mut new = NewTask::new(if i % 2 == 0 { "even" } else { "odd" }, json!(i));
        if i % 3 != 0 {
            new = new.with_owner(if i % 3 == 1 { "alice" } else { "bob" });
        }
        if i % 4 == 0 {
            new = new.with_session("s-1");
        } else if i % 4 == 1 {
            new = new.with_session("s-2");
        }
        tasks.push(submit(store, new, at(i * 10)).await);
    }
    // Give some of them other statuses: 0 and 1 run, 2 is paused, 3 completes, 4 is cancelled.
    let running: Vec<Task> = claim(store, 4, at(200)).await;
    assert_eq!(ids(&running), ids(&tasks[..4]));
    assert!(finish(store, &running[3], at(201), completed()).await);
    assert!(finish(store, &running[2], at(201), interrupted(&running[2])).await);
    store
        .command(tasks[2].id, Command::Pause, at(202))
        .await
        .expect("pause");
    store
        .command(tasks[4].id, Command::Cancel, at(203))
        .await
        .expect("cancel");
    let tasks: Vec<Task> = {
        let mut now = Vec::new();
        for task in &tasks {
            now.push(get(store, task.id).await);
        }
        now
    };

    let check = async |filter: ListFilter, expected: &dyn Fn(usize, &Task) -> bool| {
        let mut want: Vec<TaskId> = tasks
            .iter()
            .enumerate()
            .filter(|(i, task)| expected(*i, task))
            .map(|(_, task)| task.id)
            .collect();
        want.reverse();
        assert!(
            !want.is_empty() || filter.statuses == [Status::Failed],
            "{filter:?} matches something"
        );
        let whole = store
            .list(filter.clone(), PageRequest::first(100))
            .await
            .expect("list");
        assert_eq!(ids(&whole.tasks), want, "{filter:?}");
        assert!(whole.next_cursor.is_none());
        let paged = list_all(store, filter.clone(), 2).await;
        assert_eq!(ids(&paged), want, "{filter:?} in pages of 2");
        for task in &whole.tasks {
            assert_eq!(*task, get(store, task.id).await, "listed tasks are whole");
        }
    };

    check(ListFilter::default(), &|_, _| true).await;
    let statuses = |statuses: Vec<Status>| ListFilter {
        statuses,
        ..ListFilter::default()
    };
    check(statuses(vec![Status::Running]), &|i, _| i == 0 || i == 1).await;
    check(
        statuses(vec![Status::Paused, Status::Completed]),
        &|i, _| i == 2 || i == 3,
    )
    .await;
    check(
        statuses(vec![Status::Queued, Status::Cancelled]),
        &|i, _| i >= 4,
    )
    .await;
    check(statuses(vec![Status::Failed]), &|_, _| false).await;
    let by_type = ListFilter {
        task_type: Some("odd".into()),
        ..ListFilter::default()
    };
    check(by_type, &|i, _| i % 2 == 1).await;
    let by_owner = ListFilter {
        owner: Some("alice".into()),
        ..ListFilter::default()
    };
    check(by_owner, &|i, _| i % 3 == 1).await;
    let by_session = ListFilter {
        session_id: Some("s-2".into()),
        ..ListFilter::default()
    };
    check(by_session, &|i, _| i % 4 == 1).await;
    let from = ListFilter {
        created_from: Some(at(30)),
        ..ListFilter::default()
    };
    check(from, &|i, _| i >= 3).await;
    let until = ListFilter {
        created_until: Some(at(30)),
        ..ListFilter::default()
    };
    check(until, &|i, _| i < 3).await;
    let range = ListFilter {
        created_from: Some(at(25)),
        created_until: Some(at(71)),
        ..ListFilter::default()
    };
    check(range, &|i, _| (3..=7).contains(&i)).await;
    let combined = ListFilter {
        statuses: vec![Status::Queued, Status::Running],
        task_type: Some("even".into()),
        owner: Some("bob".into()),
        session_id: Some("s-1".into()),
        created_from: Some(at(0)),
        created_until: Some(at(120)),
    };
    // Even, owned by bob (i % 3 == 2), in s-1 (i % 4 == 0), queued or running: 8 only.
    check(combined, &|i, _| i == 8).await;
    let nobody = ListFilter {
        owner: Some("carol".into()),
        ..ListFilter::default()
    };
    let page = store
        .list(nobody, PageRequest::first(10))
        .await
        .expect("list");
    assert!(page.tasks.is_empty() && page.next_cursor.is_none());
}

async fn list_pages_newest_first_without_gaps_or_duplicates(store: &dyn Store) {
    let mut submitted = Vec::new();
    for i in 0..21 {
        let kind = if i % 3 == 0 { "third" } else { "rest" };
        submitted.push(submit(store, NewTask::new(kind, json!(i)), at(i)).await);
    }
    let newest_first: Vec<TaskId> = submitted.iter().rev().map(|t| t.id).collect();

    // Pages of 7 over 21 tasks: three full pages, and no cursor after the third.
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(ListFilter::default(), PageRequest { cursor, limit: 7 })
            .await
            .expect("list");
        pages.push(ids(&page.tasks));
        match page.next_cursor {
            // The cursor goes out as text and comes back parsed.
            Some(next) => cursor = Some(next.to_string().parse::<Cursor>().expect("cursor")),
            None => break,
        }
        assert!(pages.len() < 10, "paging does not end");
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [7, 7, 7]);
    let flat: Vec<TaskId> = pages.concat();
    assert_eq!(flat, newest_first);
    assert_eq!(flat.iter().collect::<HashSet<_>>().len(), 21);

    // Pages of 5: the last page is short.
    let sizes: Vec<usize> = {
        let mut sizes = Vec::new();
        let mut cursor = None;
        loop {
            let page = store
                .list(ListFilter::default(), PageRequest { cursor, limit: 5 })
                .await
                .expect("list");
            sizes.push(page.tasks.len());
            match page.next_cursor {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        sizes
    };
    assert_eq!(sizes, [5, 5, 5, 5, 1]);

    // A filtered listing pages through its own matches only.
    let thirds = ListFilter {
        task_type: Some("third".into()),
        ..ListFilter::default()
    };
    let want: Vec<TaskId> = submitted
        .iter()
        .rev()
        .filter(|t| t.task_type == "third")
        .map(|t| t.id)
        .collect();
    assert_eq!(ids(&list_all(store, thirds.clone(), 3).await), want);
    let first = store
        .list(thirds.clone(), PageRequest::first(3))
        .await
        .expect("list");
    assert_eq!(ids(&first.tasks), want[..3]);
    let second = store
        .list(
            thirds,
            PageRequest {
                cursor: first.next_cursor,
                limit: 3,
            },
        )
        .await
        .expect("list");
    assert_eq!(ids(&second.tasks), want[3..6]);

    // Tasks submitted while paging show up on a new listing, not in the pages already begun.
    let first = store
        .list(ListFilter::default(), PageRequest::first(10))
        .await
        .expect("list");
    let newer = submit(store, NewTask::new("rest", json!("new")), at(100)).await;
    let second = store
        .list(
            ListFilter::default(),
            PageRequest {
                cursor: first.next_cursor,
                limit: 10,
            },
        )
        .await
        .expect("list");
    assert_eq!(ids(&second.tasks), newest_first[10..20]);
    let fresh = store
        .list(ListFilter::default(), PageRequest::first(1))
        .await
        .expect("list");
    assert_eq!(ids(&fresh.tasks), [newer.id]);

    // A limit of 0 is clamped to 1.
    let one = store
        .list(ListFilter::default(), PageRequest::first(0))
        .await
        .expect("list");
    assert_eq!(one.tasks.len(), 1);

    for garbage in [
        "",
        "c1.",
        "c1.zz",
        "c2.10",
        "10",
        "c1.-1",
        "c1.ffffffffffffffffff",
    ] {
        match garbage.parse::<Cursor>() {
            Err(Error::InvalidInput { field, message }) => {
                assert_eq!(field, "cursor");
                assert!(message.contains("next_cursor"), "{message}");
            }
            other => panic!("`{garbage}` parsed as {other:?}"),
        }
    }
}

async fn stats_follow_every_kind_of_change(store: &dyn Store) {
    check_stats(store, "of an empty store").await;
    let empty = store.stats().await.expect("stats");
    assert_eq!(empty.total(), 0);
    assert_eq!(
        empty.by_status.len(),
        Status::ALL.len(),
        "every status is present"
    );
    assert!(empty.by_type.is_empty());

    let news = vec![
        NewTask::new("a", json!(1)).with_max_attempts(2),
        NewTask::new("a", json!(2)),
        NewTask::new("b", json!(3)),
        NewTask::new("b", json!(4)).with_run_at(at(50)),
        NewTask::new("c", json!(5)).with_idempotency_key("once"),
    ];
    let tasks = submit_all(store, news, at(0)).await;
    check_stats(store, "after submitting").await;
    let duplicate = NewTask::new("c", json!(6)).with_idempotency_key("once");
    store
        .submit(vec![duplicate.into_task(TaskId::new(), at(1))])
        .await
        .expect("submit");
    check_stats(store, "after a duplicate submission").await;
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (
            stats.total(),
            stats.count(Status::Queued),
            stats.count(Status::Scheduled)
        ),
        (5, 4, 1)
    );
    assert_eq!(
        stats.by_type["b"],
        BTreeMap::from([(Status::Queued, 1), (Status::Scheduled, 1)])
    );

    let claimed = claim(store, 2, at(2)).await;
    assert_eq!(ids(&claimed), ids(&tasks[..2]));
    check_stats(store, "after claiming").await;
    assert!(
        store
            .progress(ProgressUpdate {
                id: claimed[0].id,
                attempt: 1,
                progress: 0.5,
                message: None,
                now: at(3)
            })
            .await
            .expect("progress")
    );
    check_stats(store, "after progress").await;
    assert!(finish(store, &claimed[1], at(4), completed()).await);
    check_stats(store, "after completing").await;
    let failed = Outcome::Failed {
        error: error("x"),
        retry_at: Some(at(20)),
        result: None,
    };
    assert!(finish(store, &claimed[0], at(5), failed).await);
    check_stats(store, "after a failure with a retry").await;
    assert_eq!(store.promote_due(at(50)).await.expect("promote").count, 2);
    check_stats(store, "after promoting").await;
    store
        .command(tasks[2].id, Command::Pause, at(51))
        .await
        .expect("pause");
    check_stats(store, "after pausing").await;
    let _ = store
        .command(tasks[2].id, Command::Pause, at(52))
        .await
        .expect_err("paused twice");
    check_stats(store, "after a refused command").await;
    store
        .command(tasks[2].id, Command::Resume, at(53))
        .await
        .expect("resume");
    check_stats(store, "after resuming").await;
    let running = claim(store, 10, at(54)).await;
    assert_eq!(running.len(), 4);
    check_stats(store, "after claiming everything").await;
    store
        .command(running[0].id, Command::Cancel, at(55))
        .await
        .expect("cancel");
    check_stats(store, "after asking a running task to cancel").await;
    assert!(finish(store, &running[1], at(56), interrupted(&running[1])).await);
    check_stats(store, "after an interruption").await;
    let recovered = store
        .recover(at(56).after(LEASE), Recover::AllRunning)
        .await
        .expect("recover");
    assert_eq!(recovered.len(), 3);
    check_stats(store, "after recovery").await;
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.count(Status::Running), 0);
    assert_eq!(stats.count(Status::Cancelled), 1);
    store
        .command(tasks[1].id, Command::Cancel, at(57))
        .await
        .expect_err("a completed task");
    let pruned = store.prune(at(1_000), 100).await.expect("prune");
    assert_eq!(
        u64::try_from(pruned).expect("small"),
        stats.count(Status::Completed)
            + stats.count(Status::Failed)
            + stats.count(Status::Cancelled)
    );
    check_stats(store, "after pruning").await;
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.total(), stats.count(Status::Queued));
}

// SQLite only.

#[tokio::test]
async fn sqlite_reopening_the_file_keeps_tasks_and_stats() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tasks.sqlite3");
    let (before, stats, running_id) = {
        let store = SqliteStore::open(SqliteConfig::new(&path)).expect("open");
        let news = vec![
            NewTask::new("a", json!({"x": 1}))
                .with_tags(vec!["t".into()])
                .with_owner("o"),
            NewTask::new("b", json!([1]))
                .with_run_at(at(100))
                .with_idempotency_key("k"),
            NewTask::new("a", json!(null)).with_priority(Priority::CRITICAL),
            NewTask::new("c", json!("s")),
        ];
        submit_all(&store, news, at(0)).await;
        let claimed = claim(&store, 2, at(1)).await;
        assert!(
            finish(
                &store,
                &claimed[0],
                at(2),
                Outcome::Completed {
                    result: json!({"r": 1})
                }
            )
            .await
        );
        store.flush().await.expect("flush");
        (
            all_tasks(&store).await,
            store.stats().await.expect("stats"),
            claimed[1].id,
        )
    };
    assert_eq!(before.len(), 4);

    let store = SqliteStore::open(SqliteConfig::new(&path)).expect("reopen");
    assert_eq!(all_tasks(&store).await, before);
    assert_eq!(store.stats().await.expect("stats"), stats);
    check_stats(&store, "after reopening").await;
    assert_eq!(get(&store, running_id).await.status, Status::Running);

    // The idempotency keys hold across a reopen, and the store keeps working.
    let again = NewTask::new("b", json!("again")).with_idempotency_key("k");
    let answers = store
        .submit(vec![again.into_task(TaskId::new(), at(3))])
        .await
        .expect("submit");
    assert!(!answers[0].created);
    let recovered = store
        .recover(at(3), Recover::AllRunning)
        .await
        .expect("recover");
    assert_eq!(ids(&recovered), [running_id]);
    check_stats(&store, "after recovery in a reopened store").await;
}

/// A file from before the attempt history (schema version 2) is migrated: its tasks have an
/// empty history, and the attempts that end from then on are recorded.
#[tokio::test]
async fn sqlite_tasks_from_before_the_attempt_history_have_an_empty_one() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tasks.sqlite3");
    let (done, waiting) = {
        let store = SqliteStore::open(SqliteConfig::new(&path)).expect("open");
        let done = submit(&store, NewTask::new("done", json!({})), at(0)).await;
        let running = claim_one(&store, &done, at(1)).await;
        assert!(finish(&store, &running, at(2), completed()).await);
        let waiting = submit(&store, NewTask::new("waiting", json!({})), at(3)).await;
        store.flush().await.expect("flush");
        (done.id, waiting)
    };
    // Back to version 2, as an older msbd left the file.
    let conn = rusqlite::Connection::open(&path).expect("open the file");
    conn.execute_batch(
        "ALTER TABLE tasks DROP COLUMN fresh_session; ALTER TABLE tasks DROP COLUMN attempts; \
         PRAGMA user_version = 2;",
    )
    .expect("downgrade");
    drop(conn);

    let store = SqliteStore::open(SqliteConfig::new(&path)).expect("reopen");
    let old = get(&store, done).await;
    assert_eq!((old.status, old.attempts.len()), (Status::Completed, 0));
    let running = claim_one(&store, &waiting, at(4)).await;
    assert!(finish(&store, &running, at(5), completed()).await);
    assert_history(
        &store,
        waiting.id,
        &[(1, at(4), at(5), AttemptOutcome::Completed)],
    )
    .await;
}

#[tokio::test]
async fn sqlite_a_new_priority_is_kept_across_a_reopen() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tasks.sqlite3");
    let (a, b) = {
        let store = SqliteStore::open(SqliteConfig::new(&path)).expect("open");
        let low = |name: &str| NewTask::new(name, json!({})).with_priority(Priority::LOW);
        let a = submit(&store, low("a"), at(0)).await;
        let b = submit(&store, low("b"), at(1)).await;
        store
            .command(b.id, Command::SetPriority(Priority::HIGH), at(2))
            .await
            .expect("set priority");
        (a, b)
    };
    let store = SqliteStore::open(SqliteConfig::new(&path)).expect("reopen");
    assert_eq!(get(&store, b.id).await.priority, Priority::HIGH);
    assert_eq!(get(&store, a.id).await.priority, Priority::LOW);
    claim_one(&store, &b, at(3)).await;
    claim_one(&store, &a, at(4)).await;
}

#[tokio::test]
async fn sqlite_refuses_a_second_open_of_the_same_file() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tasks.sqlite3");
    let store = SqliteStore::open(SqliteConfig::new(&path)).expect("open");
    submit(&store, NewTask::new("a", json!({})), at(0)).await;
    match SqliteStore::open(SqliteConfig::new(&path)) {
        Ok(_) => panic!("a second open of a file in use should fail"),
        Err(error) => {
            let text = error.to_string();
            assert!(text.contains("in use"), "{text}");
            assert!(
                text.contains("tasks.sqlite3"),
                "the message names the file: {text}"
            );
        }
    }
    // The first store is unharmed, and once it is closed the file opens again.
    assert_eq!(all_tasks(&store).await.len(), 1);
    drop(store);
    let reopened = SqliteStore::open(SqliteConfig::new(&path)).expect("reopen after close");
    assert_eq!(all_tasks(&reopened).await.len(), 1);
}

/// The plans of the hot queries, read with `EXPLAIN QUERY PLAN` on a connection of our own.
#[tokio::test]
async fn sqlite_hot_queries_use_the_partial_indexes() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tasks.sqlite3");
    let store = SqliteStore::open(SqliteConfig::new(&path)).expect("open");
    let news = (0..200)
        .map(|i| {
            let new = NewTask::new(format!("type-{}", i % 7), json!(i))
                .with_priority(Priority::new((i % 10) as u8).expect("0-9"));
            if i % 5 == 0 {
                new.with_run_at(at(1_000 + i64::from(i)))
            } else {
                new
            }
        })
        .collect();
    submit_all(&store, news, at(0)).await;
    let claimed = claim(&store, 30, at(1)).await;
    for task in &claimed[..10] {
        assert!(finish(&store, task, at(2), completed()).await);
    }
    store.flush().await.expect("flush");

    let conn = rusqlite::Connection::open(&path).expect("a second connection");
    let plan = |sql: &str, params: &[&dyn rusqlite::ToSql]| -> String {
        let mut statement = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect("prepare");
        let rows = statement
            .query_map(params, |row| row.get::<_, String>(3))
            .expect("query")
            .collect::<rusqlite::Result<Vec<String>>>()
            .expect("rows");
        rows.join("\n")
    };

    // The claim query (copied from sqlite.rs).
    let claim_plan = plan(
        "SELECT seq, task_type FROM tasks INDEXED BY tasks_queued \
         WHERE status = 0 AND task_type NOT IN (SELECT value FROM json_each(?1)) \
         ORDER BY priority DESC, seq LIMIT ?2",
        &[&r#"["type-1"]"#, &10_i64],
    );
    assert!(claim_plan.contains("tasks_queued"), "{claim_plan}");
    assert!(
        !claim_plan.contains("TEMP B-TREE"),
        "the claim sorts the queue:\n{claim_plan}"
    );
    assert!(
        !claim_plan.contains("SCAN tasks\n") && !claim_plan.ends_with("SCAN tasks"),
        "{claim_plan}"
    );

    // Promotion of due scheduled tasks, and the next due time.
    let promote_plan = plan(
        "UPDATE tasks SET status = 0, run_at = NULL, updated_at = ?1 WHERE seq IN \
         (SELECT seq FROM tasks INDEXED BY tasks_scheduled WHERE status = 1 AND run_at <= ?1) \
         RETURNING task_type",
        &[&at(1_100).0],
    );
    assert!(promote_plan.contains("tasks_scheduled"), "{promote_plan}");
    let next_due_plan = plan(
        "SELECT min(run_at) FROM tasks INDEXED BY tasks_scheduled WHERE status = 1",
        &[],
    );
    assert!(next_due_plan.contains("tasks_scheduled"), "{next_due_plan}");
    assert!(!next_due_plan.contains("TEMP B-TREE"), "{next_due_plan}");

    // The lease reaper and the pruner.
    let recover_plan = plan(
        "SELECT id FROM tasks INDEXED BY tasks_by_status WHERE status = 3 AND lease_until < ?1",
        &[&at(100).0],
    );
    assert!(recover_plan.contains("tasks_by_status"), "{recover_plan}");
    let prune_plan = plan(
        "SELECT seq FROM tasks INDEXED BY tasks_finished \
         WHERE status >= 4 AND finished_at < ?1 ORDER BY finished_at LIMIT ?2",
        &[&at(100).0, &100_i64],
    );
    assert!(prune_plan.contains("tasks_finished"), "{prune_plan}");
    assert!(!prune_plan.contains("TEMP B-TREE"), "{prune_plan}");

    // The deletion of one owner's finished tasks walks the same index, in its order.
    let delete_plan = plan(
        "SELECT seq FROM tasks INDEXED BY tasks_finished \
         WHERE status >= 4 AND finished_at < ?1 AND status IN (4, 6) AND owner = ?3 \
         ORDER BY finished_at, seq LIMIT ?2",
        &[&at(100).0, &100_i64, &"alice"],
    );
    assert!(delete_plan.contains("tasks_finished"), "{delete_plan}");
    assert!(!delete_plan.contains("TEMP B-TREE"), "{delete_plan}");
}

/// The node every attempt entry names: on a shared store, the node that claimed the attempt
/// (each case runs one node, which claims everything: this one); `None` on a store one process
/// owns.
async fn attempt_node(store: &dyn Store) -> Option<String> {
    let status = store.cluster_status().await.expect("cluster status");
    assert_eq!(status.is_some(), store.is_shared(), "{status:?}");
    status.map(|status| status.node)
}

/// Checks a task's attempt history: the entries `expected` (attempt number, start, end,
/// outcome), in order, each naming this store's node ([`attempt_node`]), and its times in order
/// (each attempt ends after it starts, and before the next one starts). The task as listed has
/// the same history.
async fn assert_history(
    store: &dyn Store,
    id: TaskId,
    expected: &[(u32, Timestamp, Timestamp, AttemptOutcome)],
) -> Task {
    let task = get(store, id).await;
    let node = attempt_node(store).await;
    let want: Vec<AttemptRecord> = expected
        .iter()
        .map(|&(n, started_at, ended_at, outcome)| AttemptRecord {
            n,
            started_at,
            ended_at,
            outcome,
            node: node.clone(),
        })
        .collect();
    assert_eq!(task.attempts, want, "the history of {}", task.task_type);
    for record in &task.attempts {
        assert!(record.started_at <= record.ended_at, "{record:?}");
    }
    for pair in task.attempts.windows(2) {
        assert!(pair[0].n < pair[1].n, "{pair:?}");
        assert!(pair[0].ended_at <= pair[1].started_at, "{pair:?}");
    }
    let listed = all_tasks(store).await;
    let listed = listed.iter().find(|t| t.id == id).expect("listed");
    assert_eq!(listed.attempts, task.attempts, "as listed");
    task
}

async fn the_attempt_history_says_how_each_attempt_ended(store: &dyn Store) {
    use AttemptOutcome::*;
    // Submitted and never run: no history.
    let waiting = submit(
        store,
        NewTask::new("waiting", json!({})).with_run_at(at(10_000)),
        at(0),
    )
    .await;
    assert!(waiting.attempts.is_empty());

    // Completed at once.
    let once = submit(store, NewTask::new("once", json!({})), at(0)).await;
    let running = claim_one(store, &once, at(1)).await;
    assert!(running.attempts.is_empty(), "no entry while it runs");
    assert!(finish(store, &running, at(2), completed()).await);
    assert_history(store, once.id, &[(1, at(1), at(2), Completed)]).await;

    // Failed, retried, completed.
    let retried = submit(
        store,
        NewTask::new("retried", json!({})).with_max_attempts(3),
        at(0),
    )
    .await;
    let running = claim_one(store, &retried, at(10)).await;
    let outcome = Outcome::Failed {
        error: error("boom"),
        retry_at: Some(at(12)),
        result: None,
    };
    assert!(finish(store, &running, at(11), outcome).await);
    assert_history(store, retried.id, &[(1, at(10), at(11), Failed)]).await;
    assert_eq!(store.promote_due(at(12)).await.expect("promote").count, 1);
    let running = claim_one(store, &retried, at(13)).await;
    assert_eq!(
        running.attempts.len(),
        1,
        "a claim answers with the history so far"
    );
    assert!(finish(store, &running, at(14), completed()).await);
    assert_history(
        store,
        retried.id,
        &[(1, at(10), at(11), Failed), (2, at(13), at(14), Completed)],
    )
    .await;

    // Interrupted by a shutdown, run again, completed.
    let interrupted_once = submit(store, NewTask::new("interrupted", json!({})), at(0)).await;
    let running = claim_one(store, &interrupted_once, at(20)).await;
    assert!(finish(store, &running, at(21), interrupted(&running)).await);
    let running = claim_one(store, &interrupted_once, at(22)).await;
    assert!(finish(store, &running, at(23), completed()).await);
    let done = assert_history(
        store,
        interrupted_once.id,
        &[
            (1, at(20), at(21), Interrupted),
            (2, at(22), at(23), Completed),
        ],
    )
    .await;
    assert_eq!(done.interrupted_attempts, 1);

    // Timed out, and rejected: by their error's kind.
    for (kind, outcome) in [
        (FailureKind::Timeout, TimedOut),
        (FailureKind::Rejected, Rejected),
    ] {
        let task = submit(store, NewTask::new(format!("{kind}"), json!({})), at(0)).await;
        let running = claim_one(store, &task, at(30)).await;
        let failed = Outcome::Failed {
            error: TaskError {
                kind,
                message: kind.to_string(),
            },
            retry_at: None,
            result: None,
        };
        assert!(finish(store, &running, at(31), failed).await);
        assert_history(store, task.id, &[(1, at(30), at(31), outcome)]).await;
    }

    // Cancelled while it ran.
    let cancelled = submit(store, NewTask::new("cancelled", json!({})), at(0)).await;
    let running = claim_one(store, &cancelled, at(40)).await;
    assert!(finish(store, &running, at(41), Outcome::Cancelled).await);
    assert_history(store, cancelled.id, &[(1, at(40), at(41), Cancelled)]).await;

    // A fenced-out finish appends nothing.
    assert!(!finish(store, &running, at(42), completed()).await);
    assert_history(store, cancelled.id, &[(1, at(40), at(41), Cancelled)]).await;
    check_stats(store, "after attempts of every kind").await;
}

async fn the_attempt_history_of_a_lost_or_cancelled_attempt(store: &dyn Store) {
    use AttemptOutcome::*;
    let later = |t: i64| at(t).after(LEASE).after(Duration::from_secs(1));
    // Lost, found by the lease reaper or by recovery at start: worker_lost, then run again.
    for (i, which) in [Recover::Expired, Recover::AllRunning]
        .into_iter()
        .enumerate()
    {
        let base = 100 * i as i64;
        let task = submit(store, NewTask::new("lost", json!({})), at(0)).await;
        let running = claim_one(store, &task, at(base + 1)).await;
        let recovered = store
            .recover(later(base + 1), which)
            .await
            .expect("recover");
        assert_eq!(ids(&recovered), [task.id]);
        assert_eq!(
            recovered[0].attempts,
            [AttemptRecord {
                n: 1,
                started_at: at(base + 1),
                ended_at: later(base + 1),
                outcome: WorkerLost,
                node: attempt_node(store).await,
            }],
            "{which:?}: the answer has the entry"
        );
        assert_history(
            store,
            task.id,
            &[(1, at(base + 1), later(base + 1), WorkerLost)],
        )
        .await;
        let again = claim_one(store, &running, at(base + 50)).await;
        assert!(finish(store, &again, at(base + 51), completed()).await);
        assert_history(
            store,
            task.id,
            &[
                (1, at(base + 1), later(base + 1), WorkerLost),
                (2, at(base + 50), at(base + 51), Completed),
            ],
        )
        .await;
    }

    // Lost, and not run again: the entry says worker_lost, the error interrupted.
    let task = submit(
        store,
        NewTask::new("opted-out", json!({})).with_rerun_on_recovery(false),
        at(0),
    )
    .await;
    claim_one(store, &task, at(300)).await;
    store
        .recover(later(300), Recover::Expired)
        .await
        .expect("recover");
    let failed = assert_history(store, task.id, &[(1, at(300), later(300), WorkerLost)]).await;
    assert_eq!(
        (failed.status, failed.error.map(|e| e.kind)),
        (Status::Failed, Some(FailureKind::Interrupted))
    );

    // A cancel asked for while it ran wins over an interruption and over a lost worker.
    for way in 0..2 {
        let base = 400 + 100 * way;
        let task = submit(store, NewTask::new("cancel-asked", json!({})), at(0)).await;
        let running = claim_one(store, &task, at(base)).await;
        store
            .command(task.id, Command::Cancel, at(base + 1))
            .await
            .expect("cancel");
        let ended = later(base);
        if way == 0 {
            assert!(finish(store, &running, ended, interrupted(&running)).await);
        } else {
            store
                .recover(ended, Recover::AllRunning)
                .await
                .expect("recover");
        }
        let done = assert_history(store, task.id, &[(1, at(base), ended, Cancelled)]).await;
        assert_eq!(done.status, Status::Cancelled, "way {way}");
    }
    check_stats(store, "after lost and cancelled attempts").await;
}

async fn the_attempt_history_keeps_the_last_entries(store: &dyn Store) {
    let total = MAX_ATTEMPT_RECORDS as u32 + 5;
    let task = submit(
        store,
        NewTask::new("many", json!({})).with_max_attempts(total),
        at(0),
    )
    .await;
    let mut expected = Vec::new();
    for n in 1..=total {
        let start = at(i64::from(n) * 100);
        let running = claim_one(store, &task, start).await;
        assert_eq!(running.attempt, n);
        // Two of them lost by the reaper (written from the task), the others failed (written by
        // the finish statement).
        let (end, outcome) = if n == 7 || n == 22 {
            let end = start.after(LEASE).after(Duration::from_secs(1));
            store.recover(end, Recover::Expired).await.expect("recover");
            (end, AttemptOutcome::WorkerLost)
        } else if n == total {
            let end = start.after(Duration::from_secs(1));
            assert!(finish(store, &running, end, completed()).await);
            (end, AttemptOutcome::Completed)
        } else {
            let end = start.after(Duration::from_secs(1));
            let outcome = Outcome::Failed {
                error: error("again"),
                retry_at: Some(end),
                result: None,
            };
            assert!(finish(store, &running, end, outcome).await);
            assert_eq!(store.promote_due(end).await.expect("promote").count, 1);
            (end, AttemptOutcome::Failed)
        };
        expected.push((n, start, end, outcome));
        let kept = expected.len().saturating_sub(MAX_ATTEMPT_RECORDS);
        assert_history(store, task.id, &expected[kept..]).await;
    }
    let done = get(store, task.id).await;
    assert_eq!(done.status, Status::Completed);
    assert_eq!(done.attempts.len(), MAX_ATTEMPT_RECORDS);
    assert_eq!(done.attempts[0].n, total + 1 - MAX_ATTEMPT_RECORDS as u32);
}
