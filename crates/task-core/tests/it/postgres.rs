//! The PostgreSQL store beyond the conformance suite: several nodes on one queue, wake-ups by
//! `NOTIFY`, migrations, leadership, and connections that break.
//!
//! Every test runs in a schema of its own, created by the store and dropped afterwards, in the
//! database at `MSB_TEST_DATABASE_URL` (by default `postgres://postgres@127.0.0.1:5432/test`).
//! A database that cannot be reached fails the tests: CI starts PostgreSQL.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use task_core::store::postgres::{PostgresConfig, PostgresStore};
use task_core::store::{ClaimRequest, Command, Finish, Outcome, Recover, Store, StoreStatus};
use task_core::{
    AttemptOutcome, ClusterStatus, Engine, EngineConfig, NewTask, Status, TaskFailure, TaskId,
    Timestamp, handler_fn,
};
use tokio_postgres::{Client, NoTls};

use crate::commit_cutter::CommitCutter;

/// The database the tests use.
pub(crate) fn database_url() -> String {
    std::env::var("MSB_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A plain connection for the tests' own statements (not the store's).
pub(crate) async fn admin() -> Client {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap_or_else(|e| {
        panic!(
            "cannot reach the test database at {url} ({e}); start PostgreSQL (CI does) or set MSB_TEST_DATABASE_URL"
        )
    });
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A schema of one test: a fresh name, dropped (with everything in it) when the value is dropped.
pub(crate) struct TestSchema {
    pub(crate) name: String,
}

impl TestSchema {
    pub(crate) fn new() -> TestSchema {
        let id = TaskId::new().to_string().replace('-', "");
        TestSchema {
            name: format!("t_{}", &id[id.len() - 16..]),
        }
    }

    /// The settings of a node on this schema.
    pub(crate) fn config(&self, node: &str) -> PostgresConfig {
        PostgresConfig {
            schema: self.name.clone(),
            ..PostgresConfig::new(database_url(), node)
        }
    }

    /// The settings of a node on this schema that reaches the database at `url` (through a
    /// proxy, say), reconnecting quickly.
    pub(crate) fn config_at(&self, url: String, node: &str) -> PostgresConfig {
        PostgresConfig {
            schema: self.name.clone(),
            reconnect_min: Duration::from_millis(20),
            reconnect_max: Duration::from_millis(100),
            ..PostgresConfig::new(url, node)
        }
    }

    /// How many tasks it holds: the rows of its two task tables.
    pub(crate) async fn rows(&self, admin: &Client) -> i64 {
        self.rows_in(admin, "tasks").await + self.rows_in(admin, "tasks_done").await
    }

    /// How many rows its table `table` holds.
    pub(crate) async fn rows_in(&self, admin: &Client, table: &str) -> i64 {
        admin
            .query_one(
                &format!("SELECT count(*) FROM \"{}\".{table}", self.name),
                &[],
            )
            .await
            .expect("count")
            .get(0)
    }

    /// A store of node `node` on this schema.
    pub(crate) async fn store(&self, node: &str) -> PostgresStore {
        let url = database_url();
        PostgresStore::connect(self.config(node))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot open the PostgreSQL store on {url}: {e}; start PostgreSQL (CI does) or set MSB_TEST_DATABASE_URL"
                )
            })
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let name = self.name.clone();
        // On a thread of its own: dropped inside a runtime, which cannot block on another.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let client = admin().await;
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE"))
                    .await
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("dropping the test schema {}: {error}", self.name);
        }
    }
}

fn request(max: usize, now: Timestamp) -> ClaimRequest {
    ClaimRequest {
        max,
        now,
        lease_until: now.after(Duration::from_secs(30)),
        exclude_types: Vec::new(),
        type_room: Vec::new(),
    }
}

fn tasks(count: usize, now: Timestamp) -> Vec<task_core::Task> {
    (0..count)
        .map(|i| NewTask::new("job", json!(i)).into_task(TaskId::new(), now))
        .collect()
}

/// The backends of a node's store (its application name is `msbd <node>`).
async fn backends_of(admin: &Client, node: &str) -> Vec<i32> {
    admin
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("msbd {node}")],
        )
        .await
        .expect("pg_stat_activity")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_claiming_at_once_never_claim_the_same_task() {
    const TASKS: usize = 3_000;
    let schema = TestSchema::new();
    let a = Arc::new(schema.store("node-a").await);
    let b = Arc::new(schema.store("node-b").await);
    for chunk in tasks(TASKS, Timestamp::now()).chunks(500) {
        a.submit(chunk.to_vec()).await.expect("submit");
    }
    let drain = |store: Arc<PostgresStore>| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = store
                    .claim(request(25, Timestamp::now()))
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    return mine;
                }
                for task in claimed {
                    let finish = Finish {
                        id: task.id,
                        attempt: task.attempt,
                        now: Timestamp::now(),
                        outcome: Outcome::Completed { result: json!(1) },
                    };
                    assert!(store.finish(finish).await.expect("finish"), "fenced out");
                    mine.push(task.id);
                }
            }
        })
    };
    let (from_a, from_b) = tokio::join!(drain(Arc::clone(&a)), drain(Arc::clone(&b)));
    let (from_a, from_b) = (from_a.expect("node a"), from_b.expect("node b"));
    assert!(
        !from_a.is_empty() && !from_b.is_empty(),
        "both nodes claimed ({} and {})",
        from_a.len(),
        from_b.len()
    );
    let mut seen = HashSet::new();
    for id in from_a.iter().chain(&from_b) {
        assert!(seen.insert(*id), "task {id} was claimed twice");
    }
    assert_eq!(seen.len(), TASKS);
    let stats = b.stats().await.expect("stats");
    assert_eq!(stats.count(Status::Completed), TASKS as u64, "{stats:?}");
    assert_eq!(stats.total(), TASKS as u64);
}

/// A node gives back only its own claims: another node's claim of the same attempt number
/// (the number a give-back restores is the one the next claim takes again) is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gives_back_only_the_claims_it_holds() {
    let schema = TestSchema::new();
    let a = schema.store("node-a").await;
    let b = schema.store("node-b").await;
    a.submit(tasks(1, Timestamp::now())).await.expect("submit");
    let claimed = a.claim(request(1, Timestamp::now())).await.expect("claim");
    let held = vec![(claimed[0].id, claimed[0].attempt)];
    assert_eq!(b.release(held.clone(), Timestamp::now()).await.unwrap(), 0);
    assert_eq!(a.release(held.clone(), Timestamp::now()).await.unwrap(), 1);
    let again = b.claim(request(1, Timestamp::now())).await.expect("claim");
    assert_eq!(
        (again[0].id, again[0].attempt),
        (claimed[0].id, claimed[0].attempt),
        "node-b claims the same attempt number"
    );
    assert_eq!(
        a.release(held, Timestamp::now()).await.unwrap(),
        0,
        "node-a gave back node-b's claim"
    );
    let task = b.get(claimed[0].id).await.unwrap().expect("task");
    assert_eq!(task.status, Status::Running);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_submitted_on_one_node_wakes_the_other() {
    let schema = TestSchema::new();
    let a = schema.store("node-a").await;
    let b = Arc::new(schema.store("node-b").await);

    // The store hands the other node's notice over.
    let waiting = tokio::spawn({
        let b = Arc::clone(&b);
        async move {
            let wakeup = b.next_wakeup().await;
            (wakeup, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let sent = Instant::now();
    a.submit(tasks(1, Timestamp::now())).await.expect("submit");
    let (wakeup, woken) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken within 5 s")
        .expect("the waiter");
    assert!(wakeup.queued, "{wakeup:?}");
    let latency = woken.duration_since(sent);
    assert!(latency < Duration::from_millis(500), "{latency:?}");
    eprintln!("NOTIFY wake-up latency: {latency:?}");

    // A node's own notices do not wake it.
    b.submit(tasks(1, Timestamp::now())).await.expect("submit");
    let own = tokio::time::timeout(Duration::from_millis(300), b.next_wakeup()).await;
    assert!(own.is_err(), "woken by its own notice: {own:?}");

    // End to end: an engine on node b, idle poll of a minute, runs a task submitted on node a.
    let claim_all = b.claim(request(10, Timestamp::now())).await.expect("claim");
    assert_eq!(claim_all.len(), 2, "the two tasks above");
    let engine = Engine::builder(Arc::clone(&b) as Arc<dyn Store>)
        .handler(
            "job",
            handler_fn(|_ctx| async { Ok::<_, TaskFailure>(Value::Null) }),
        )
        .config(PostgresStore::engine_config(EngineConfig {
            idle_poll: Duration::from_secs(60),
            ..EngineConfig::default()
        }))
        .build()
        .await
        .expect("engine");
    assert!(!engine.config().recover_running_at_start);
    let loops = engine.start();
    let cancel = tokio_util::sync::CancellationToken::new();
    let forward = tokio::spawn({
        let (b, engine, cancel) = (Arc::clone(&b), engine.clone(), cancel.clone());
        async move { b.run_wakeups(&engine, cancel).await }
    });
    // Let the dispatcher go idle first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    let task = a
        .submit(tasks(1, Timestamp::now()))
        .await
        .expect("submit")
        .remove(0)
        .task;
    let done = engine
        .wait(task.id, Duration::from_secs(10))
        .await
        .expect("wait");
    let elapsed = sent.elapsed();
    assert_eq!(done.status, Status::Completed);
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    eprintln!("submitted on node a, completed on node b in {elapsed:?}");

    // A scheduled task of node a is announced with its due time, and node b promotes it then.
    let due = Timestamp::now().after(Duration::from_millis(300));
    let scheduled = a
        .submit(vec![
            NewTask::new("job", json!("later"))
                .with_run_at(due)
                .into_task(TaskId::new(), Timestamp::now()),
        ])
        .await
        .expect("submit")
        .remove(0)
        .task;
    assert_eq!(scheduled.status, Status::Scheduled);
    let done = engine
        .wait(scheduled.id, Duration::from_secs(10))
        .await
        .expect("wait");
    assert_eq!(done.status, Status::Completed);
    assert!(done.started_at.is_some_and(|at| at >= due));

    cancel.cancel();
    forward.await.expect("forwarder").expect("forwarding");
    engine.shutdown(Duration::from_secs(5)).await;
    loops.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_when_nodes_start_at_once() {
    let schema = TestSchema::new();
    let starts = (0..4).map(|i| {
        let config = schema.config(&format!("node-{i}"));
        tokio::spawn(async move { PostgresStore::connect(config).await })
    });
    let mut stores = Vec::new();
    for start in starts {
        stores.push(start.await.expect("a start").expect("every node starts"));
    }
    let admin = admin().await;
    let versions = async |admin: &Client| -> Vec<(i32, String)> {
        admin
            .query(
                &format!(
                    "SELECT version, name FROM \"{}\".schema_migrations ORDER BY version",
                    schema.name
                ),
                &[],
            )
            .await
            .expect("schema_migrations")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    };
    let before = versions(&admin).await;
    assert_eq!(
        before,
        [
            (1, "tasks".to_owned()),
            (2, "interrupted_attempts".to_owned()),
            (3, "attempt_history".to_owned()),
            (4, "fresh_session".to_owned()),
            (5, "finished_tasks".to_owned())
        ],
        "each migration applied once"
    );
    assert_eq!(PostgresStore::schema_version(), 5);
    // Once more, with tasks in the store: nothing changes, nothing is lost.
    stores[0]
        .submit(tasks(3, Timestamp::now()))
        .await
        .expect("submit");
    drop(stores);
    let again = schema.store("node-0").await;
    assert_eq!(versions(&admin).await, before);
    assert_eq!(again.stats().await.expect("stats").total(), 3);
    drop(again);

    // Tasks from before the attempt history (version 2) get an empty one, and are not in a
    // fresh session (version 4).
    admin
        .batch_execute(&format!(
            "DROP TABLE \"{0}\".tasks_done, \"{0}\".task_keys; \
             CREATE UNIQUE INDEX tasks_idempotency ON \"{0}\".tasks \
             ((coalesce(owner, '')), idempotency_key) WHERE idempotency_key IS NOT NULL; \
             ALTER TABLE \"{0}\".tasks DROP COLUMN attempts, DROP COLUMN fresh_session; \
             DELETE FROM \"{0}\".schema_migrations WHERE version >= 3",
            schema.name
        ))
        .await
        .expect("back to version 2");
    let migrated = schema.store("node-0").await;
    assert_eq!(versions(&admin).await, before);
    let page = migrated
        .list(
            task_core::store::ListFilter::default(),
            task_core::store::PageRequest {
                cursor: None,
                limit: 10,
            },
        )
        .await
        .expect("list");
    assert_eq!(page.tasks.len(), 3);
    assert!(page.tasks.iter().all(|t| t.attempts.is_empty()));
    assert!(page.tasks.iter().all(|t| !t.fresh_session));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_reopened_and_nothing_acknowledged_is_lost() {
    let schema = TestSchema::new();
    let mut config = schema.config("node-k");
    config.reconnect_min = Duration::from_millis(20);
    config.reconnect_max = Duration::from_millis(200);
    let store = Arc::new(PostgresStore::connect(config).await.expect("store"));
    let admin = admin().await;
    assert_eq!(
        store.healthy_for(),
        Some(Duration::MAX),
        "no problem since the store opened"
    );

    // Submissions go on while the store's connections are killed again and again.
    let writer = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            let mut acknowledged = Vec::new();
            let mut failed = 0;
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                match store.submit(tasks(5, Timestamp::now())).await {
                    Ok(submitted) => acknowledged.extend(submitted.into_iter().map(|s| s.task.id)),
                    Err(_) => failed += 1,
                }
            }
            (acknowledged, failed)
        }
    });
    let mut kills = 0;
    let mut degraded_seen = false;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for pid in backends_of(&admin, "node-k").await {
            admin
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await
                .expect("terminate");
            kills += 1;
        }
        // Reads notice the broken connection too, and reconnect.
        let _ = store.stats().await;
        degraded_seen |= store.health().status == StoreStatus::Degraded;
    }
    let (acknowledged, failed) = writer.await.expect("writer");
    assert!(kills >= 6, "{kills} backends killed");
    assert!(
        acknowledged.len() > 100,
        "{} acknowledged",
        acknowledged.len()
    );
    eprintln!(
        "{kills} backends killed; {} tasks acknowledged, {failed} submissions failed; degraded seen: {degraded_seen}",
        acknowledged.len()
    );

    // Every acknowledged task is there, once.
    let stats = store.stats().await.expect("stats after the kills");
    // Healthy again (the listener may take a moment longer), and recently: a reaper counts from
    // the end of the outage, not from the opening.
    let waited = Instant::now();
    let healthy_for = loop {
        if let Some(healthy_for) = store.healthy_for() {
            break healthy_for;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "never healthy again: {:?}",
            store.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        healthy_for < Duration::from_secs(60),
        "healthy for {healthy_for:?}: the outage was not noticed"
    );
    for id in &acknowledged {
        assert!(
            store.get(*id).await.expect("get").is_some(),
            "{id} was lost"
        );
    }
    let total = schema.rows(&admin).await;
    // A submission whose commit's outcome was unknown may exist without an acknowledgement.
    assert!(total as usize >= acknowledged.len());
    assert_eq!(stats.total(), total as u64, "the counts match the rows");

    // The store works and is healthy again; its listener is back too.
    store
        .submit(tasks(1, Timestamp::now()))
        .await
        .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.health().status != StoreStatus::Healthy {
        assert!(Instant::now() < deadline, "{:?}", store.health());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = store.stats().await;
    }
    // The writers, the reader and the listener.
    let expected = schema.config("node-k").writers + 2;
    assert_eq!(backends_of(&admin, "node-k").await.len(), expected);
}

/// The answer to a `COMMIT` is lost (the connection breaks after the server committed and
/// before the store heard it): the store asks the database how the transaction ended and
/// answers as if nothing had happened. A claim's tasks are handed over rather than left
/// running with no worker (the lease reaper would fail them as `worker_lost`), a submission is
/// acknowledged (not refused with "it may or may not have been made"), a finish is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_settled_by_asking_the_database() {
    let schema = TestSchema::new();
    let cutter = CommitCutter::start(&database_url()).await;
    let config = schema.config_at(cutter.url(&database_url()), "node-c");
    let store = PostgresStore::connect(config).await.expect("store");
    let admin = admin().await;
    let now = Timestamp::now();

    cutter.arm();
    let submitted = store.submit(tasks(10, now)).await.expect("submit");
    assert_eq!(cutter.cut(), 1, "the submission's commit answer was lost");
    assert_eq!(submitted.len(), 10);

    cutter.arm();
    let claimed = store.claim(request(4, now)).await.expect("claim");
    assert_eq!(cutter.cut(), 2, "the claim's commit answer was lost");
    assert_eq!(claimed.len(), 4, "the tasks the claim took are handed over");
    assert!(
        claimed
            .iter()
            .all(|t| t.attempt == 1 && t.status == Status::Running)
    );

    cutter.arm();
    let first = &claimed[0];
    let applied = store
        .finish(Finish {
            id: first.id,
            attempt: first.attempt,
            now: Timestamp::now(),
            outcome: Outcome::Completed { result: json!(1) },
        })
        .await
        .expect("finish");
    assert_eq!(cutter.cut(), 3, "the finish's commit answer was lost");
    assert!(applied, "the finish is recorded, and said to be");

    // The rows say the same: ten tasks, the four claimed ones running (or completed) on this
    // node at attempt 1, the others queued and never attempted; the counts agree.
    let rows = admin
        .query(
            &format!(
                "SELECT id::text, status, attempt, claimed_by FROM \"{0}\".tasks \
                 UNION ALL SELECT id::text, status, attempt, claimed_by FROM \"{0}\".tasks_done",
                schema.name
            ),
            &[],
        )
        .await
        .expect("rows");
    assert_eq!(rows.len(), 10, "each submitted task once");
    let claimed_ids: HashSet<String> = claimed.iter().map(|t| t.id.to_string()).collect();
    for row in &rows {
        let (id, status, attempt, node): (String, i16, i64, Option<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if id == first.id.to_string() {
            assert_eq!((status, attempt), (4, 1), "{id}: completed");
        } else if claimed_ids.contains(&id) {
            assert_eq!((status, attempt), (3, 1), "{id}: running");
            assert_eq!(node.as_deref(), Some("node-c"));
        } else {
            assert_eq!((status, attempt), (0, 0), "{id}: queued, never attempted");
        }
    }

    // The connection breaks before the server sees the `COMMIT`: the transaction is rolled
    // back (the database says so once its backend is gone), and its requests run again.
    cutter.arm_before();
    let more = store
        .submit(tasks(5, Timestamp::now()))
        .await
        .expect("submit");
    assert_eq!(cutter.cut(), 4, "the submission's commit was cut off");
    assert_eq!(more.len(), 5);
    cutter.arm_before();
    let claimed_again = store
        .claim(request(2, Timestamp::now()))
        .await
        .expect("claim");
    assert_eq!(cutter.cut(), 5, "the claim's commit was cut off");
    assert_eq!(claimed_again.len(), 2);
    assert!(claimed_again.iter().all(|t| t.attempt == 1));

    let total = schema.rows(&admin).await;
    assert_eq!(total, 15, "each submitted task once");
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (
            stats.count(Status::Queued),
            stats.count(Status::Running),
            stats.count(Status::Completed)
        ),
        (9, 5, 1),
        "the counts agree with the rows"
    );
}

/// A transaction in doubt is settled however long the database stays away (only the database
/// can say whether it committed), and one the database still runs, because it has not noticed
/// that the connection broke, is ended by the store and then settled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_in_doubt_outlasts_a_long_outage_and_a_hung_transaction() {
    let schema = TestSchema::new();
    let cutter = CommitCutter::start(&database_url()).await;
    let mut config = schema.config_at(cutter.url(&database_url()), "node-d");
    config.unavailable_wait = Duration::from_millis(300);
    let store = PostgresStore::connect(config).await.expect("store");
    let admin = admin().await;
    let now = Timestamp::now();
    store.submit(tasks(6, now)).await.expect("submit");

    // The claim's answer is lost, then the database cannot be reached for five times the
    // store's wait: the claim waits it out and hands its tasks over.
    cutter.blackout_after_cut(Duration::from_millis(1_500));
    cutter.arm();
    let claimed = store
        .claim(request(3, now))
        .await
        .expect("a claim in doubt waits for the database");
    assert_eq!(cutter.cut(), 1);
    assert_eq!(claimed.len(), 3);

    // The `COMMIT` never reaches the server, whose side of the connection stays open: the
    // database still runs the transaction, the store ends its server process, the transaction
    // rolls back, and the claim runs again.
    cutter.blackout_after_cut(Duration::ZERO);
    cutter.arm_hold();
    let claimed_again = store
        .claim(request(2, Timestamp::now()))
        .await
        .expect("a claim whose transaction hung runs again");
    assert_eq!(cutter.cut(), 2);
    assert_eq!(claimed_again.len(), 2);

    let rows = admin
        .query(
            &format!(
                "SELECT status, attempt, count(*) FROM \"{}\".tasks GROUP BY 1, 2 ORDER BY 1",
                schema.name
            ),
            &[],
        )
        .await
        .expect("rows");
    let groups: Vec<(i16, i64, i64)> = rows
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        groups,
        [(0, 0, 1), (3, 1, 5)],
        "five running at their first attempt, one queued"
    );
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.count(Status::Queued), stats.count(Status::Running)),
        (1, 5)
    );
}

#[tokio::test]
async fn a_second_node_with_the_same_name_is_refused() {
    let schema = TestSchema::new();
    let first = schema.store("twin").await;
    let error = match PostgresStore::connect(schema.config("twin")).await {
        Ok(_) => panic!("a second node named twin was let in"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("another msbd node named `twin`"), "{error}");
    first.close().await;
    // Once the first is gone, the name is free.
    schema.store("twin").await.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_leadership_fails_over_when_the_leader_goes() {
    let schema = TestSchema::new();
    let quick = |node: &str| PostgresConfig {
        leader_retry: Duration::from_millis(100),
        ..schema.config(node)
    };
    let a = PostgresStore::connect(quick("lead-a")).await.expect("a");
    let b = PostgresStore::connect(quick("lead-b")).await.expect("b");
    assert!(a.is_maintenance_leader());
    assert!(!b.is_maintenance_leader());

    // The leader goes: its connection closes, and the other node takes the lock.
    let before = Instant::now();
    a.close().await;
    while !b.is_maintenance_leader() {
        assert!(
            before.elapsed() < Duration::from_secs(5),
            "no failover within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("maintenance failover took {:?}", before.elapsed());
}

/// The names of the nodes a cluster status lists, in its order.
fn names(status: &ClusterStatus) -> Vec<&str> {
    status.nodes.iter().map(|node| node.name.as_str()).collect()
}

/// The nodes of a schema, their leader and the database, seen from each node; the nodes of
/// another schema in the same database (one of them with the same name) are not listed; a node
/// that closes leaves the list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_status_lists_the_nodes_of_the_schema_and_its_leader() {
    let schema = TestSchema::new();
    let other = TestSchema::new();
    let a = schema.store("a").await;
    let b = Arc::new(schema.store("b").await);
    let other_a = other.store("a").await;
    let other_c = other.store("c").await;
    a.submit(tasks(3, Timestamp::now())).await.expect("submit");
    // A vacuum, so that the last vacuum's time is known.
    let admin = admin().await;
    admin
        .batch_execute(&format!("VACUUM \"{}\".tasks", schema.name))
        .await
        .expect("vacuum");

    let started = Timestamp::now();
    let from_a = a.cluster_status().await.expect("status from a");
    let b_dyn: Arc<dyn Store> = Arc::clone(&b) as Arc<dyn Store>;
    let from_b = b_dyn
        .cluster_status()
        .await
        .expect("status from b")
        .expect("a shared store has a cluster status");
    for (status, own) in [(&from_a, "a"), (&from_b, "b")] {
        assert_eq!(status.node, own);
        assert_eq!(names(status), ["a", "b"], "{status:#?}");
        let selves: Vec<&str> = status
            .nodes
            .iter()
            .filter(|n| n.is_self)
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(selves, [own], "{status:#?}");
        // The first store opened took the maintenance lock.
        let leaders: Vec<&str> = status
            .nodes
            .iter()
            .filter(|n| n.is_leader)
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(leaders, ["a"], "{status:#?}");
        for node in &status.nodes {
            let since = node.connected_since_ms.expect("connected since");
            assert!(
                since <= started.0 && since > started.0 - 600_000,
                "{node:?}"
            );
            if database_url().contains("@127.0.0.1") {
                assert_eq!(node.client_addr.as_deref(), Some("127.0.0.1"), "{node:?}");
            }
        }
        let database = &status.database;
        assert!(
            database.server_version.starts_with(char::is_numeric),
            "{database:?}"
        );
        assert!(
            database.database_size_bytes.unwrap_or(0) > 0,
            "{database:?}"
        );
        assert!(database.live_tasks.is_some_and(|n| n >= 0), "{database:?}");
        assert!(database.dead_tasks.is_some_and(|n| n >= 0), "{database:?}");
        let vacuumed = database.last_vacuum_ms.expect("vacuumed");
        assert!(
            vacuumed <= Timestamp::now().0 && vacuumed > started.0 - 600_000,
            "{database:?}"
        );
        // Four connections per store (two writers, a reader, a listener), four stores, and
        // the test's own.
        assert!(database.connections.unwrap_or(0) >= 17, "{database:?}");
        assert!(
            database.max_connections.unwrap_or(0) >= database.connections.unwrap_or(0),
            "{database:?}"
        );
    }
    assert!(a.is_maintenance_leader() && !b.is_maintenance_leader());
    assert_eq!(
        from_a.nodes[0].connected_since_ms,
        from_b.nodes[0].connected_since_ms
    );

    // The other schema sees its own nodes only, the leader among them.
    let seen = other_c
        .cluster_status()
        .await
        .expect("status of the other schema");
    assert_eq!(names(&seen), ["a", "c"]);
    assert!(
        seen.nodes[0].is_leader && !seen.nodes[1].is_leader,
        "{seen:#?}"
    );
    assert!(!seen.nodes[0].is_self && seen.nodes[1].is_self, "{seen:#?}");
    other_a.close().await;
    other_c.close().await;

    // Through the engine, as mcp-tools asks.
    let engine = Engine::builder(Arc::clone(&b_dyn))
        .config(b_dyn.engine_config(EngineConfig::default()))
        .build()
        .await
        .expect("engine");
    let through = engine
        .cluster_status()
        .await
        .expect("status through the engine")
        .expect("a shared store has a cluster status");
    assert_eq!(
        (through.node.as_str(), names(&through)),
        ("b", vec!["a", "b"])
    );
    drop(engine);
    drop(b_dyn);

    // Node b goes: its backend ends a moment after its connection closes.
    match Arc::try_unwrap(b) {
        Ok(b) => b.close().await,
        Err(_) => panic!("node b's store is still shared"),
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = a.cluster_status().await.expect("status from a");
        if names(&status) == ["a"] {
            assert!(status.nodes[0].is_self && status.nodes[0].is_leader);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node b is still listed 10 s after it closed: {status:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.close().await;
}

/// A node whose connections do not carry `msbd <node_id>` as their `application_name` (its URL
/// sets another, or its name is longer than PostgreSQL keeps) cannot be named from another node,
/// which leaves it out; it still lists itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_others_cannot_name_still_lists_itself() {
    let schema = TestSchema::new();
    let a = schema.store("a").await;
    let url = database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let custom = PostgresStore::connect(PostgresConfig {
        url: format!("{url}{separator}application_name=ops"),
        ..schema.config("custom")
    })
    .await
    .expect("a node with its own application_name");
    let long_name = "n".repeat(100);
    let long = schema.store(&long_name).await;

    let seen = custom.cluster_status().await.expect("status");
    assert_eq!(names(&seen), ["a", "custom"], "{seen:#?}");
    assert!(seen.nodes[1].is_self && !seen.nodes[1].is_leader);
    let seen = long.cluster_status().await.expect("status");
    assert_eq!(names(&seen), ["a", long_name.as_str()], "{seen:#?}");
    assert!(seen.nodes[1].is_self);
    let seen = a.cluster_status().await.expect("status");
    assert_eq!(names(&seen), ["a"], "{seen:#?}");
    for store in [a, custom, long] {
        store.close().await;
    }
}

/// Each entry of a task's attempt history names the node that ran the attempt: written by the
/// finish statement, by a recovery on another node (the lost attempt is still the one that
/// ran it), and after a cancel asked for on another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_attempt_names_the_node_that_ran_it() {
    let schema = TestSchema::new();
    let a = schema.store("a").await;
    let b = schema.store("b").await;
    let node_of = |task: &task_core::Task| -> Vec<(u32, AttemptOutcome, Option<String>)> {
        task.attempts
            .iter()
            .map(|r| (r.n, r.outcome, r.node.clone()))
            .collect()
    };
    let named = |n: u32, outcome: AttemptOutcome, node: &str| (n, outcome, Some(node.to_owned()));
    async fn claim_on(store: &PostgresStore, id: TaskId) -> task_core::Task {
        let claimed = store
            .claim(request(1, Timestamp::now()))
            .await
            .expect("claim");
        assert_eq!(claimed.iter().map(|t| t.id).collect::<Vec<_>>(), [id]);
        claimed.into_iter().next().expect("claimed")
    }
    async fn finish(store: &PostgresStore, task: &task_core::Task, outcome: Outcome) -> bool {
        store
            .finish(Finish {
                id: task.id,
                attempt: task.attempt,
                now: Timestamp::now(),
                outcome,
            })
            .await
            .expect("finish")
    }

    // Submitted on a, run and finished on b.
    let task = a.submit(tasks(1, Timestamp::now())).await.expect("submit")[0]
        .task
        .clone();
    let running = claim_on(&b, task.id).await;
    assert!(finish(&b, &running, Outcome::Completed { result: json!(1) }).await);
    let done = a.get(task.id).await.expect("get").expect("the task");
    assert_eq!(node_of(&done), [named(1, AttemptOutcome::Completed, "b")]);

    // Run on a, whose worker is lost: b's reaper recovers it, and the entry names a. Then b
    // runs it again.
    let task = b.submit(tasks(1, Timestamp::now())).await.expect("submit")[0]
        .task
        .clone();
    let running = claim_on(&a, task.id).await;
    let expired = Timestamp::now().after(Duration::from_secs(31));
    let recovered = b.recover(expired, Recover::Expired).await.expect("recover");
    assert_eq!(recovered.len(), 1);
    let lost = [named(1, AttemptOutcome::WorkerLost, "a")];
    assert_eq!(node_of(&recovered[0]), lost, "the recovery's answer");
    let again = claim_on(&b, task.id).await;
    assert_eq!(node_of(&again), lost, "the claim's answer");
    // a's worker comes back too late: fenced out, nothing appended.
    assert!(!finish(&a, &running, Outcome::Completed { result: json!(1) }).await);
    assert!(finish(&b, &again, Outcome::Completed { result: json!(2) }).await);
    let done = b.get(task.id).await.expect("get").expect("the task");
    assert_eq!(
        node_of(&done),
        [lost[0].clone(), named(2, AttemptOutcome::Completed, "b")]
    );

    // Run on a, cancelled on b: the attempt a ran ends cancelled, by a's finish or by a's own
    // recovery after a restart.
    for by_finish in [true, false] {
        let task = a.submit(tasks(1, Timestamp::now())).await.expect("submit")[0]
            .task
            .clone();
        let running = claim_on(&a, task.id).await;
        let asked = b
            .command(task.id, Command::Cancel, Timestamp::now())
            .await
            .expect("cancel");
        assert!(asked.cancel_requested && asked.attempts.is_empty());
        if by_finish {
            assert!(finish(&a, &running, Outcome::Cancelled).await);
        } else {
            let recovered = a
                .recover(Timestamp::now(), Recover::AllRunning)
                .await
                .expect("recover");
            assert_eq!(recovered.len(), 1);
        }
        let done = b.get(task.id).await.expect("get").expect("the task");
        assert_eq!(done.status, Status::Cancelled);
        assert_eq!(
            node_of(&done),
            [named(1, AttemptOutcome::Cancelled, "a")],
            "by finish: {by_finish}"
        );
    }
    a.close().await;
    b.close().await;
}

/// The capabilities of a shared store, asked through `dyn Store` as sandbox-wrapper asks them
/// (it does not know which store it has): the answers of the PostgreSQL store's own methods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_trait_answers_as_the_postgres_store_does() {
    let schema = TestSchema::new();
    let a: Arc<dyn Store> = Arc::new(schema.store("trait-a").await);
    let b = Arc::new(schema.store("trait-b").await);
    let b_dyn: Arc<dyn Store> = Arc::clone(&b) as Arc<dyn Store>;
    assert!(a.is_shared() && b_dyn.is_shared());

    let asked = EngineConfig {
        idle_poll: Duration::from_millis(10),
        ..EngineConfig::default()
    };
    let config = b_dyn.engine_config(asked.clone());
    let inherent = PostgresStore::engine_config(asked);
    assert!(!config.recover_running_at_start);
    assert_eq!(config.idle_poll, inherent.idle_poll);
    assert!(config.idle_poll > Duration::from_millis(10));

    // The first store opened took the maintenance lock.
    assert!(a.is_maintenance_leader());
    assert!(!b_dyn.is_maintenance_leader());
    assert_eq!(b_dyn.is_maintenance_leader(), b.is_maintenance_leader());
    let healthy = b_dyn.healthy_for().expect("healthy");
    assert!(healthy > Duration::ZERO);

    // Its wake-up loop, run on node b's engine (idle poll of a minute), starts a task submitted
    // on node a at once.
    let engine = Engine::builder(Arc::clone(&b_dyn))
        .handler(
            "job",
            handler_fn(|_ctx| async { Ok::<_, TaskFailure>(Value::Null) }),
        )
        .config(b_dyn.engine_config(EngineConfig {
            idle_poll: Duration::from_secs(60),
            ..EngineConfig::default()
        }))
        .build()
        .await
        .expect("engine");
    let loops = engine.start();
    let wakeups = Arc::clone(&b_dyn).wakeups().expect("a wake-up loop");
    let cancel = tokio_util::sync::CancellationToken::new();
    let forward = tokio::spawn(wakeups(engine.clone(), cancel.clone()));
    // Let the dispatcher go idle first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    let task = a
        .submit(tasks(1, Timestamp::now()))
        .await
        .expect("submit")
        .remove(0)
        .task;
    let done = engine
        .wait(task.id, Duration::from_secs(10))
        .await
        .expect("wait");
    assert_eq!(done.status, Status::Completed);
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );

    cancel.cancel();
    forward.await.expect("forwarder").expect("forwarding");
    engine.shutdown(Duration::from_secs(5)).await;
    loops.stop().await;
}

#[tokio::test]
async fn an_unreachable_database_fails_with_a_clear_error() {
    let mut config = PostgresConfig::new("postgres://postgres@127.0.0.1:1/test", "n");
    config.connect_timeout = Duration::from_secs(2);
    let error = match PostgresStore::connect(config).await {
        Ok(_) => panic!("connected to port 1"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("cannot reach PostgreSQL at 127.0.0.1:1"),
        "{error}"
    );
    assert!(
        !error.contains("postgres@"),
        "no credentials in messages: {error}"
    );
    let error = match PostgresStore::connect(PostgresConfig::new("nonsense://", "n")).await {
        Ok(_) => panic!("a bad URL was accepted"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("database url"), "{error}");
}

#[tokio::test]
async fn tasks_bound_to_a_session_run_on_their_node_only() {
    let schema = TestSchema::new();
    let a = schema.store("home").await;
    let b = schema.store("away").await;
    let now = Timestamp::now();
    let bound = NewTask::new("job", json!("bound"))
        .with_session("s-1")
        .with_priority(task_core::Priority::CRITICAL)
        .into_task(TaskId::new(), now);
    let free = NewTask::new("job", json!("free")).into_task(TaskId::new(), now);
    // A session made for the task alone binds it to no node.
    let fresh = NewTask::new("job", json!("fresh"))
        .with_fresh_session("s0123456789abcdef0123")
        .with_priority(task_core::Priority::HIGH)
        .into_task(TaskId::new(), now);
    a.submit(vec![bound.clone(), free.clone(), fresh.clone()])
        .await
        .expect("submit");
    let away: Vec<TaskId> = b
        .claim(request(10, now))
        .await
        .expect("claim")
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(away, [fresh.id, free.id]);
    let home: Vec<TaskId> = a
        .claim(request(10, now))
        .await
        .expect("claim")
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(home, [bound.id]);
}

/// The plan of the claim on a table of 20,000 tasks, half of them finished: the queue's partial
/// index, in its order (no sort), never the whole table. (The store plans each execution for its
/// values, as `EXPLAIN` with values does: a generic plan sorts the queue.)
#[tokio::test]
async fn the_claim_walks_the_queue_index() {
    let schema = TestSchema::new();
    let store = Arc::new(schema.store("plan").await);
    let now = Timestamp::now();
    for chunk in tasks(20_000, now).chunks(2_000) {
        store.submit(chunk.to_vec()).await.expect("submit");
    }
    for _ in 0..10 {
        // Finished all at once, so that the writer commits them in groups.
        let finishes: Vec<_> = store
            .claim(request(1_000, now))
            .await
            .expect("claim")
            .into_iter()
            .map(|task| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let finish = Finish {
                        id: task.id,
                        attempt: task.attempt,
                        now,
                        outcome: Outcome::Completed { result: json!(1) },
                    };
                    store.finish(finish).await.expect("finish")
                })
            })
            .collect();
        for finish in finishes {
            assert!(finish.await.expect("a finish"));
        }
    }
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "SET search_path TO \"{}\"; ANALYZE tasks",
            schema.name
        ))
        .await
        .expect("analyze");
    let plan: Vec<String> = admin
        .query(
            &format!("EXPLAIN {}", task_core::store::postgres::CLAIM_SQL),
            &[&Vec::<String>::new(), &"plan", &64_i64, &now.0, &now.0],
        )
        .await
        .expect("explain")
        .iter()
        .map(|row| row.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("tasks_queued"), "{plan}");
    assert!(!plan.contains("Sort"), "the claim sorts the queue:\n{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}

/// Store throughput: submit in batches of 1,000, then two nodes claim in batches of 64 and
/// finish each task as its own request (grouped by the writer), as an engine does. Prints the
/// rate; `MSB_PG_THROUGHPUT_TASKS` sets the count (10,000 by default). Run it in release for a
/// number worth reporting:
/// `cargo test --release -p task-core --test it postgres::store_throughput -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_throughput_of_submit_claim_and_finish() {
    let count: usize = std::env::var("MSB_PG_THROUGHPUT_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10_000);
    let writers: usize = std::env::var("MSB_PG_WRITERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    let schema = TestSchema::new();
    let node = async |name: &str| {
        let config = PostgresConfig {
            writers,
            ..schema.config(name)
        };
        Arc::new(PostgresStore::connect(config).await.expect("a node"))
    };
    let nodes = [node("bench-a").await, node("bench-b").await];
    let report = throughput(&nodes, count, 64).await;
    eprintln!("{report}");
}

/// Runs `count` no-op tasks through `nodes`: submits them in batches of 1,000, then each node
/// claims up to `batch` at a time and finishes every claimed task as a request of its own, all
/// at once. Returns a line with the rates.
pub(crate) async fn throughput(nodes: &[Arc<PostgresStore>], count: usize, batch: usize) -> String {
    let started = Instant::now();
    for (index, chunk) in tasks(count, Timestamp::now()).chunks(1_000).enumerate() {
        nodes[index % nodes.len()]
            .submit(chunk.to_vec())
            .await
            .expect("submit");
    }
    let submitted = started.elapsed();
    let started = Instant::now();
    let mut workers = Vec::new();
    for node in nodes {
        let node = Arc::clone(node);
        workers.push(tokio::spawn(async move {
            let mut done = 0;
            loop {
                let claimed = node
                    .claim(request(batch, Timestamp::now()))
                    .await
                    .expect("claim");
                if claimed.is_empty() {
                    return done;
                }
                let finishes = claimed.into_iter().map(|task| {
                    let node = Arc::clone(&node);
                    tokio::spawn(async move {
                        node.finish(Finish {
                            id: task.id,
                            attempt: task.attempt,
                            now: Timestamp::now(),
                            outcome: Outcome::Completed {
                                result: Value::Null,
                            },
                        })
                        .await
                        .expect("finish")
                    })
                });
                for finish in finishes.collect::<Vec<_>>() {
                    assert!(finish.await.expect("a finish"));
                    done += 1;
                }
            }
        }));
    }
    let mut finished = 0;
    for worker in workers {
        finished += worker.await.expect("a worker");
    }
    let run = started.elapsed();
    assert_eq!(finished, count);
    format!(
        "postgres store, {} nodes, {count} tasks: submit {:.0} tasks/s; claim+finish {:.0} tasks/s ({:.2} s)",
        nodes.len(),
        count as f64 / submitted.as_secs_f64(),
        count as f64 / run.as_secs_f64(),
        run.as_secs_f64()
    )
}

/// The engine's burn-down on two nodes: two engines (concurrency 64 each) on two stores of one
/// schema run `MSB_PG_THROUGHPUT_TASKS` no-op tasks (5,000 by default), submitted beforehand in
/// batches of 1,000 while the queues are paused. Prints the rate; run it in release for a number
/// worth reporting (the shape of the `engine_postgres_tasks_per_s` benchmark):
/// `cargo test --release -p task-core --test it postgres::engine_burn_down -- --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_burn_down_on_two_nodes() {
    let count: usize = std::env::var("MSB_PG_THROUGHPUT_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(5_000);
    let writers: usize = std::env::var("MSB_PG_WRITERS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2);
    let schema = TestSchema::new();
    let mut engines = Vec::new();
    for name in ["burn-a", "burn-b"] {
        let config = PostgresConfig {
            writers,
            ..schema.config(name)
        };
        let store = Arc::new(PostgresStore::connect(config).await.expect("a node"));
        let engine = Engine::builder(Arc::clone(&store) as Arc<dyn Store>)
            .handler(
                "job",
                handler_fn(|_ctx| async { Ok::<_, TaskFailure>(Value::Null) }),
            )
            .config(PostgresStore::engine_config(EngineConfig {
                concurrency: 64,
                lease: Duration::from_secs(10),
                heartbeat_interval: Duration::from_secs(3),
                ..EngineConfig::default()
            }))
            .build()
            .await
            .expect("engine");
        engine.pause_queue();
        engines.push((store, engine));
    }
    let started = Instant::now();
    for (index, chunk) in (0..count)
        .map(|i| NewTask::new("job", json!(i)))
        .collect::<Vec<_>>()
        .chunks(1_000)
        .enumerate()
    {
        engines[index % 2]
            .1
            .submit_many(chunk.to_vec())
            .await
            .expect("submit");
    }
    let submitted = started.elapsed();
    let mut running = Vec::new();
    for (store, engine) in &engines {
        let cancel = tokio_util::sync::CancellationToken::new();
        let forward = tokio::spawn({
            let (store, engine, cancel) = (Arc::clone(store), engine.clone(), cancel.clone());
            async move { store.run_wakeups(&engine, cancel).await }
        });
        running.push((engine.start(), cancel, forward));
    }
    let started = Instant::now();
    for (_, engine) in &engines {
        engine.resume_queue();
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        // Read through either node; while the database restarts, reads fail for a moment.
        let Ok(stats) = engines[0].1.stats().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let ended = stats.count(Status::Completed)
            + stats.count(Status::Failed)
            + stats.count(Status::Cancelled);
        if ended == count as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "not done in 600 s: {stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let run = started.elapsed();
    eprintln!(
        "engine burn-down, 2 nodes x 64, {writers} writers each, {count} tasks: {:.0} tasks/s ({:.2} s); submit {:.0} tasks/s",
        count as f64 / run.as_secs_f64(),
        run.as_secs_f64(),
        count as f64 / submitted.as_secs_f64()
    );
    for ((_, engine), (loops, cancel, forward)) in engines.iter().zip(running) {
        engine.shutdown(Duration::from_secs(10)).await;
        cancel.cancel();
        forward.await.expect("forwarder").expect("forwarding");
        loops.stop().await;
    }
    let stats = engines[0].0.stats().await.expect("stats");
    eprintln!("counts at the end: {:?}", stats.by_status);
    assert_eq!(stats.count(Status::Completed), count as u64, "{stats:?}");
    assert_eq!(stats.total(), count as u64);
}

/// The maintenance leader vacuums the task table once dead row versions pile up past its
/// threshold (here 200, checked every 100 ms), without waiting for autovacuum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_vacuums_the_task_table_when_dead_rows_pile_up() {
    let schema = TestSchema::new();
    let store = PostgresStore::connect(PostgresConfig {
        vacuum_check: Some(Duration::from_millis(100)),
        vacuum_min_dead: 200,
        ..schema.config("node-v")
    })
    .await
    .expect("store");
    assert!(store.is_maintenance_leader());
    let admin = admin().await;
    let vacuums = async || -> i64 {
        admin
            .query_one(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'tasks'",
                &[&schema.name],
            )
            .await
            .expect("vacuum count")
            .get(0)
    };
    assert_eq!(vacuums().await, 0);
    // 500 tasks claimed and finished: two dead versions each.
    store
        .submit(tasks(500, Timestamp::now()))
        .await
        .expect("submit");
    let claimed = store
        .claim(request(500, Timestamp::now()))
        .await
        .expect("claim");
    for task in &claimed {
        let finish = Finish {
            id: task.id,
            attempt: task.attempt,
            now: Timestamp::now(),
            outcome: Outcome::Completed {
                result: Value::Null,
            },
        };
        assert!(store.finish(finish).await.expect("finish"));
    }
    let waited = Instant::now();
    while vacuums().await == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the task table was never vacuumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.close().await;
}
