//! The PostgreSQL store's history table: a task that finishes leaves `tasks` for `tasks_done` in
//! the transaction that finishes it, whatever finishes it, and every read, command, key and
//! deletion still sees it; a database of schema version 4 has its finished tasks moved there.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use task_core::store::postgres::PostgresStore;
use task_core::store::{
    ClaimRequest, Command, Finish, ListFilter, Outcome, PageRequest, Recover, Store,
};
use task_core::{Error, NewTask, Status, Task, TaskId, Timestamp};
use tokio_postgres::Client;

use crate::postgres::{TestSchema, admin};

fn request(max: usize, now: Timestamp) -> ClaimRequest {
    ClaimRequest {
        max,
        now,
        lease_until: now.after(Duration::from_secs(30)),
        exclude_types: Vec::new(),
        type_room: Vec::new(),
    }
}

fn task(new: NewTask, now: Timestamp) -> Task {
    new.into_task(TaskId::new(), now)
}

/// Every task of `store` that `filter` matches, newest first, read in pages of `limit`.
async fn list_all(store: &PostgresStore, filter: &ListFilter, limit: usize) -> Vec<TaskId> {
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(filter.clone(), PageRequest { cursor, limit })
            .await
            .expect("list");
        assert!(page.tasks.len() <= limit);
        ids.extend(page.tasks.iter().map(|t| t.id));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return ids,
        }
    }
}

/// The ids of the rows of `table`.
async fn ids_in(admin: &Client, schema: &TestSchema, table: &str) -> HashSet<String> {
    admin
        .query(
            &format!("SELECT id::text FROM \"{}\".{table}", schema.name),
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn failure(kind: task_core::model::FailureKind) -> task_core::model::TaskError {
    task_core::model::TaskError {
        kind,
        message: "it failed".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_move_to_the_history_table_and_stay_readable() {
    use task_core::model::FailureKind;
    let schema = TestSchema::new();
    let store = schema.store("h").await;
    let admin = admin().await;
    let now = Timestamp::now();
    let mut submitted = vec![
        task(
            NewTask::new("job", json!(0))
                .with_idempotency_key("k0")
                .with_owner("alice"),
            now,
        ),
        task(NewTask::new("job", json!(1)).with_owner("alice"), now),
        task(NewTask::new("job", json!(2)), now),
        task(NewTask::new("job", json!(3)), now),
        task(NewTask::new("job", json!(4)), now),
        task(NewTask::new("job", json!(5)), now),
    ];
    // The fourth fails when its worker is lost, rather than running again.
    submitted[3].rerun_on_recovery = false;
    let t: Vec<TaskId> = submitted.iter().map(|t| t.id).collect();
    store.submit(submitted).await.expect("submit");

    // A cancel of a queued task finishes it: it moves at once.
    let cancelled = store
        .command(t[5], Command::Cancel, Timestamp::now())
        .await
        .expect("cancel");
    assert_eq!(cancelled.status, Status::Cancelled);

    let claimed = store
        .claim(request(4, Timestamp::now()))
        .await
        .expect("claim");
    let claimed_ids: Vec<TaskId> = claimed.iter().map(|t| t.id).collect();
    assert_eq!(claimed_ids, t[..4]);
    let finish = |id: TaskId, outcome: Outcome| Finish {
        id,
        attempt: 1,
        now: Timestamp::now(),
        outcome,
    };
    // Finished together, as a batch of the engine's would be: two end their tasks, one is
    // retried later and stays.
    let (a, b, c) = tokio::join!(
        store.finish(finish(
            t[0],
            Outcome::Completed {
                result: json!("done")
            }
        )),
        store.finish(finish(
            t[1],
            Outcome::Failed {
                error: failure(FailureKind::Timeout),
                retry_at: None,
                result: None,
            }
        )),
        store.finish(finish(
            t[2],
            Outcome::Failed {
                error: failure(FailureKind::Error),
                retry_at: Some(Timestamp::now().after(Duration::from_secs(3_600))),
                result: None,
            }
        )),
    );
    assert!(a.expect("finish") && b.expect("finish") && c.expect("finish"));

    let hot = ids_in(&admin, &schema, "tasks").await;
    let done = ids_in(&admin, &schema, "tasks_done").await;
    let names = |ids: &[TaskId]| -> HashSet<String> { ids.iter().map(|i| i.to_string()).collect() };
    assert_eq!(hot, names(&[t[2], t[3], t[4]]), "the unfinished tasks");
    assert_eq!(done, names(&[t[0], t[1], t[5]]), "the finished tasks");

    // Reads see both tables.
    let completed = store.get(t[0]).await.expect("get").expect("found");
    assert_eq!(completed.status, Status::Completed);
    assert_eq!(completed.result, Some(json!("done")));
    assert_eq!(completed.progress, Some(1.0));
    assert_eq!(completed.attempts.len(), 1);
    assert_eq!(completed.attempts[0].node.as_deref(), Some("h"));
    assert!(completed.finished_at.is_some() && completed.lease_until.is_none());
    let failed = store.get(t[1]).await.expect("get").expect("found");
    assert_eq!(failed.status, Status::Failed);
    assert_eq!(failed.error.map(|e| e.kind), Some(FailureKind::Timeout));
    assert_eq!(
        store.get(t[2]).await.expect("get").expect("found").status,
        Status::Scheduled
    );
    let newest_first: Vec<TaskId> = t.iter().rev().copied().collect();
    for limit in [1, 2, 4, 100] {
        assert_eq!(
            list_all(&store, &ListFilter::default(), limit).await,
            newest_first,
            "pages of {limit}"
        );
    }
    let filter = ListFilter {
        statuses: vec![Status::Completed, Status::Scheduled],
        ..ListFilter::default()
    };
    assert_eq!(list_all(&store, &filter, 1).await, [t[2], t[0]]);
    let alice = ListFilter {
        owner: Some("alice".into()),
        ..ListFilter::default()
    };
    assert_eq!(list_all(&store, &alice, 1).await, [t[1], t[0]]);
    let timed_out = store.timed_out().await.expect("timed out");
    assert_eq!(timed_out.get("job"), Some(&1));

    // Commands on a finished task are refused, naming its status.
    let refused = store
        .command(t[0], Command::Cancel, Timestamp::now())
        .await
        .expect_err("a completed task cannot be cancelled");
    assert!(
        matches!(refused, Error::IllegalTransition { id, .. } if id == t[0]),
        "{refused}"
    );
    assert!(refused.to_string().contains("completed"), "{refused}");
    let refused = store
        .command(t[5], Command::Resume, Timestamp::now())
        .await
        .expect_err("a cancelled task cannot be resumed");
    assert!(refused.to_string().contains("cancelled"), "{refused}");

    // A key held by a finished task still answers with that task.
    let again = store
        .submit(vec![task(
            NewTask::new("job", json!("again"))
                .with_idempotency_key("k0")
                .with_owner("alice"),
            Timestamp::now(),
        )])
        .await
        .expect("submit again");
    assert!(!again[0].created);
    assert_eq!(again[0].task.id, t[0]);
    assert_eq!(again[0].task.status, Status::Completed);

    // A cancel of a claimed task that is given back finishes it: it moves.
    let t4 = store
        .claim(request(1, Timestamp::now()))
        .await
        .expect("claim");
    assert_eq!(t4.iter().map(|t| t.id).collect::<Vec<_>>(), [t[4]]);
    store
        .command(t[4], Command::Cancel, Timestamp::now())
        .await
        .expect("cancel a running task");
    assert_eq!(
        store
            .release(vec![(t[4], 1)], Timestamp::now())
            .await
            .expect("release"),
        1
    );
    assert_eq!(
        store.get(t[4]).await.expect("get").expect("found").status,
        Status::Cancelled
    );
    // A recovery that fails a task moves it too.
    let recovered = store
        .recover(Timestamp::now(), Recover::AllRunning)
        .await
        .expect("recover");
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].id, t[3]);
    assert_eq!(recovered[0].status, Status::Failed);
    assert_eq!(
        ids_in(&admin, &schema, "tasks").await,
        names(&[t[2]]),
        "only the scheduled task is left"
    );

    // The owner's tasks move to another owner in both tables, with their keys.
    assert_eq!(
        store
            .reassign_owner("alice", "bob")
            .await
            .expect("reassign"),
        2
    );
    let bob = ListFilter {
        owner: Some("bob".into()),
        ..ListFilter::default()
    };
    assert_eq!(list_all(&store, &bob, 10).await, [t[1], t[0]]);
    let under_bob = store
        .submit(vec![task(
            NewTask::new("job", json!("bob"))
                .with_idempotency_key("k0")
                .with_owner("bob"),
            Timestamp::now(),
        )])
        .await
        .expect("submit under bob");
    assert!(!under_bob[0].created);
    assert_eq!(under_bob[0].task.id, t[0]);

    let stats = store.stats().await.expect("stats");
    assert_eq!(
        [
            Status::Queued,
            Status::Scheduled,
            Status::Running,
            Status::Completed,
            Status::Failed,
            Status::Cancelled
        ]
        .map(|s| stats.count(s)),
        [0, 1, 0, 1, 2, 2]
    );

    // Deleting and pruning take finished tasks from the history table, with their keys.
    let deleted = store
        .delete_finished(
            ListFilter {
                statuses: vec![Status::Cancelled],
                ..ListFilter::default()
            },
            Timestamp::now().after(Duration::from_secs(60)),
            10,
        )
        .await
        .expect("delete");
    assert_eq!(deleted, 2);
    let pruned = store
        .prune(Timestamp::now().after(Duration::from_secs(60)), 10)
        .await
        .expect("prune");
    assert_eq!(pruned, 3);
    assert!(ids_in(&admin, &schema, "tasks_done").await.is_empty());
    assert!(store.get(t[0]).await.expect("get").is_none());
    let keys: i64 = admin
        .query_one(
            &format!("SELECT count(*) FROM \"{}\".task_keys", schema.name),
            &[],
        )
        .await
        .expect("keys")
        .get(0);
    assert_eq!(keys, 0, "the key went with its task");
    let fresh = store
        .submit(vec![task(
            NewTask::new("job", json!("new"))
                .with_idempotency_key("k0")
                .with_owner("bob"),
            Timestamp::now(),
        )])
        .await
        .expect("submit after the prune");
    assert!(fresh[0].created, "the key is free again");
    let stats = store.stats().await.expect("stats");
    assert_eq!(stats.total(), 2);
}

/// Submissions of one key on one node while the task holding it finishes on another: each key
/// has one task, and every submission is answered with it, whether it found the task in `tasks`
/// or in `tasks_done`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stays_unique_while_its_task_moves() {
    let schema = TestSchema::new();
    let a = schema.store("a").await;
    let b = schema.store("b").await;
    let admin = admin().await;
    for round in 0..40 {
        let key = format!("key-{round}");
        let now = Timestamp::now();
        let first = a
            .submit(vec![task(
                NewTask::new("job", json!(round)).with_idempotency_key(key.clone()),
                now,
            )])
            .await
            .expect("submit");
        let id = first[0].task.id;
        let claimed = a.claim(request(1, now)).await.expect("claim");
        assert_eq!(claimed[0].id, id);
        let (finished, second) = tokio::join!(
            a.finish(Finish {
                id,
                attempt: 1,
                now: Timestamp::now(),
                outcome: Outcome::Completed { result: json!(1) },
            }),
            b.submit(vec![task(
                NewTask::new("job", json!("dup")).with_idempotency_key(key.clone()),
                Timestamp::now(),
            )]),
        );
        assert!(finished.expect("finish"));
        let second = second.expect("submit the same key");
        assert!(!second[0].created, "round {round}");
        assert_eq!(second[0].task.id, id, "round {round}");
    }
    let rows: i64 = admin
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM \"{0}\".tasks) + \
                 (SELECT count(*) FROM \"{0}\".tasks_done)",
                schema.name
            ),
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 40);
}

/// A database made by a build of schema version 4 (finished tasks in `tasks`, keys in its unique
/// index) is migrated: the finished tasks move to `tasks_done` with their `seq`, the keys to
/// `task_keys`, and everything reads, answers keys and prunes as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_moves_an_old_databases_finished_tasks() {
    let schema = TestSchema::new();
    let admin = admin().await;
    let name = &schema.name;
    let mut old = format!(
        "CREATE SCHEMA \"{name}\"; SET search_path TO \"{name}\"; \
         CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now());"
    );
    for sql in [
        include_str!("../../migrations/postgres/0001_tasks.sql"),
        include_str!("../../migrations/postgres/0002_interrupted_attempts.sql"),
        include_str!("../../migrations/postgres/0003_attempt_history.sql"),
        include_str!("../../migrations/postgres/0004_fresh_session.sql"),
    ] {
        old.push_str(sql);
        old.push(';');
    }
    old.push_str(
        "INSERT INTO schema_migrations (version, name) VALUES (1, 'tasks'), \
         (2, 'interrupted_attempts'), (3, 'attempt_history'), (4, 'fresh_session');",
    );
    // Three tasks: queued with a key and no owner, completed with a key and an owner, failed
    // by a timeout; the counts as the old build kept them.
    let ids: Vec<TaskId> = (0..3).map(|_| TaskId::new()).collect();
    let rows = [
        (ids[0], 0, "NULL", "'q'", "NULL", "NULL", "NULL"),
        (ids[1], 4, "'o'", "'c'", "1000", "NULL", "'\"r\"'"),
        (ids[2], 5, "NULL", "NULL", "2000", "1", "NULL"),
    ];
    for (id, status, owner, key, finished, kind, result) in rows {
        old.push_str(&format!(
            "INSERT INTO tasks (id, task_type, params, priority, status, attempt, max_attempts, \
             retry_base_ms, retry_max_ms, idempotency_key, owner, created_at, updated_at, \
             finished_at, error_kind, error_message, result) VALUES ('{id}', 'job', 'null', 0, \
             {status}, 1, 3, 1000, 60000, {key}, {owner}, 1, 1, {finished}, {kind}, \
             CASE WHEN {kind} IS NULL THEN NULL ELSE 'too slow' END, {result});"
        ));
    }
    old.push_str(
        "INSERT INTO task_counts (node, task_type, status, count) VALUES \
         ('', 'job', 0, 1), ('', 'job', 4, 1), ('', 'job', 5, 1); RESET search_path;",
    );
    admin
        .batch_execute(&old)
        .await
        .expect("a schema at version 4");

    let store = schema.store("m").await;
    let versions: Vec<i32> = admin
        .query(
            &format!("SELECT version FROM \"{name}\".schema_migrations ORDER BY version"),
            &[],
        )
        .await
        .expect("versions")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5]);
    assert_eq!(
        ids_in(&admin, &schema, "tasks").await,
        HashSet::from([ids[0].to_string()])
    );
    assert_eq!(
        ids_in(&admin, &schema, "tasks_done").await,
        HashSet::from([ids[1].to_string(), ids[2].to_string()])
    );
    let completed = store.get(ids[1]).await.expect("get").expect("found");
    assert_eq!(completed.status, Status::Completed);
    assert_eq!(completed.result, Some(json!("r")));
    assert_eq!(
        store.timed_out().await.expect("timed out").get("job"),
        Some(&1)
    );
    // The keys: of the finished task under its owner, of the queued one under none.
    for (owner, key, holder) in [(Some("o"), "c", ids[1]), (None, "q", ids[0])] {
        let mut new = NewTask::new("job", json!("again")).with_idempotency_key(key);
        if let Some(owner) = owner {
            new = new.with_owner(owner);
        }
        let again = store
            .submit(vec![task(new, Timestamp::now())])
            .await
            .expect("submit");
        assert!(!again[0].created, "{key}");
        assert_eq!(again[0].task.id, holder, "{key}");
    }
    // A new task takes a `seq` after the old ones: the newest first.
    let newer = store
        .submit(vec![task(
            NewTask::new("job", json!("new")),
            Timestamp::now(),
        )])
        .await
        .expect("submit");
    let listed = list_all(&store, &ListFilter::default(), 1).await;
    assert_eq!(listed, [newer[0].task.id, ids[2], ids[1], ids[0]]);
    // The finished tasks are pruned from the history table, their keys with them.
    assert_eq!(store.prune(Timestamp(3_000), 10).await.expect("prune"), 2);
    let free = store
        .submit(vec![task(
            NewTask::new("job", json!("free"))
                .with_idempotency_key("c")
                .with_owner("o"),
            Timestamp::now(),
        )])
        .await
        .expect("submit");
    assert!(free[0].created);
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.count(Status::Queued), stats.total()),
        (3, 3),
        "the old queued task, and two new ones"
    );
}
