//! Several msbd nodes on one PostgreSQL queue, end to end: the built binary, over stdio, on the
//! database at `MSB_TEST_DATABASE_URL` (by default `postgres://postgres@127.0.0.1:5432/test`,
//! which `.ci/run` starts), each test in a schema of its own, dropped afterwards.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Client, Connection, ok, wait_status};
use rmcp::ServiceExt;
use rmcp::transport::TokioChildProcess;
use serde_json::json;
use tokio_postgres::NoTls;

const MSBD: &str = env!("CARGO_BIN_EXE_msbd");

fn database_url() -> String {
    std::env::var("MSB_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn admin() -> tokio_postgres::Client {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach {url} ({e}): start PostgreSQL (CI does)"));
    tokio::spawn(connection);
    client
}

/// A schema of one test, dropped at the end.
struct Schema(String);

impl Schema {
    fn new() -> Schema {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        Schema(format!(
            "e2e_{}_{}",
            std::process::id(),
            nanos % 1_000_000_000
        ))
    }

    async fn drop_it(self) {
        admin()
            .await
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.0))
            .await
            .unwrap();
    }
}

async fn node(data_dir: &Path, schema: &Schema, name: &str) -> Connection {
    let mut command = tokio::process::Command::new(MSBD);
    command
        .arg("serve")
        .env("MSB_DATA_DIR", data_dir)
        .env("MSB_DATABASE_URL", database_url())
        .env("MSB_DATABASE_SCHEMA", &schema.0)
        .env("MSB_NODE_ID", name)
        .env("MSB_MAX_CONCURRENT_TASKS", "2")
        .env("MSB_LOG_LEVEL", "warn")
        .env("MSB_SHUTDOWN_TIMEOUT", "10")
        .stderr(Stdio::inherit());
    Client::default()
        .serve(TokioChildProcess::new(command).unwrap())
        .await
        .unwrap()
}

/// Two nodes share the queue: tasks submitted through one run on both (a task's own fresh
/// session binds it to no node), each is seen the same through either node, and a task bound
/// to a session its client named runs only on the node it was submitted through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_queue() {
    let schema = Schema::new();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(dir_a.path(), &schema, "node-a").await;
    let b = node(dir_b.path(), &schema, "node-b").await;

    let mut ids = Vec::new();
    for n in 0..16 {
        let submitted = ok(
            &a,
            "submit_task",
            json!({"task_type": "command", "params": {"command": format!("sleep 0.3; echo {n}")}}),
        )
        .await;
        ids.push(submitted["task_id"].as_str().unwrap().to_owned());
    }
    let bound = ok(
        &a,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "echo bound"}, "session_id": "kept-on-a"}),
    )
    .await["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for id in ids.iter().chain([&bound]) {
        // Seen through the other node too: one store.
        let view = wait_status(&b, id, "completed").await;
        assert_eq!(view["task_id"], id.as_str());
    }
    let result = ok(&b, "get_task_result", json!({"task_id": ids[3]})).await;
    assert!(result.to_string().contains('3'), "{result}");

    let db = admin().await;
    let rows = db
        .query(
            &format!(
                "SELECT claimed_by, count(*) FROM {}.tasks GROUP BY claimed_by ORDER BY 1",
                schema.0
            ),
            &[],
        )
        .await
        .unwrap();
    let by_node: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        by_node.len(),
        2,
        "both nodes should have run tasks: {by_node:?}"
    );
    let home: Option<String> = db
        .query_one(
            &format!(
                "SELECT claimed_by FROM {}.tasks WHERE session_id = 'kept-on-a'",
                schema.0
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(home.as_deref(), Some("node-a"));

    // A second node under a name in use is refused, saying so.
    let started = Instant::now();
    let dir_c = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new(MSBD)
        .arg("serve")
        .env("MSB_DATA_DIR", dir_c.path())
        .env("MSB_DATABASE_URL", database_url())
        .env("MSB_DATABASE_SCHEMA", &schema.0)
        .env("MSB_NODE_ID", "node-b")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("node-b"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));

    a.cancel().await.unwrap();
    b.cancel().await.unwrap();
    schema.drop_it().await;
}
