//! Several msbd nodes on one PostgreSQL queue, end to end: the built binary, over stdio, on the
//! database at `MSB_TEST_DATABASE_URL` (by default `postgres://postgres@127.0.0.1:5432/test`,
//! which `.ci/run` starts), each test in a schema of its own, dropped afterwards.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{Client, Connection, MSBD, args, ok, wait_status, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::TokioChildProcess;
use serde_json::json;
use tokio_postgres::NoTls;

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

fn node_command(data_dir: &Path, schema: &Schema, name: &str) -> tokio::process::Command {
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
    command
}

async fn node(data_dir: &Path, schema: &Schema, name: &str) -> Connection {
    let command = node_command(data_dir, schema, name);
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
                "SELECT claimed_by, count(*) FROM (SELECT * FROM {0}.tasks UNION ALL SELECT * FROM {0}.tasks_done) AS tasks GROUP BY claimed_by ORDER BY 1",
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
                "SELECT claimed_by FROM (SELECT * FROM {0}.tasks UNION ALL SELECT * FROM {0}.tasks_done) AS tasks WHERE session_id = 'kept-on-a'",
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

/// The lease of the kill test's nodes, in seconds (`MSB_LEASE_TIMEOUT`); its reaper then looks
/// every second.
const KILL_TEST_LEASE_S: i64 = 5;

/// Three nodes share 10,000 tasks (run without isolation, see below); one is stopped and
/// SIGKILLed while it runs some. The other two recover its running tasks once their leases run
/// out (within the lease plus the reaper's interval, with a second of slack, counted from when
/// it stopped), and every task ends exactly once: completed, after one attempt, or two for the
/// tasks the dead node was running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_tasks_are_recovered_by_the_others() {
    const TASKS: usize = 10_000;
    let schema = Schema::new();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let types = dirs[0].path().join("task-types.toml");
    // With retries: an attempt cut off by its node's death counts as an attempt, and a task
    // with none left is failed (kind `lost`) rather than run again.
    std::fs::write(
        &types,
        "[[task_type]]\nname = \"noop\"\ndescription = \"does nothing\"\ncommand = [\"true\"]\nmax_retries = 2\n",
    )
    .unwrap();
    let start = |i: usize, name: &'static str| {
        let mut command = node_command(dirs[i].path(), &schema, name);
        command
            .env("MSB_TASK_TYPES_FILE", &types)
            .env("MSB_LEASE_TIMEOUT", KILL_TEST_LEASE_S.to_string())
            .env("MSB_MAX_CONCURRENT_TASKS", "4")
            // What is tested is the shared queue, not the sandbox: plain processes keep 10,000
            // tasks within a minute on two cores (bubblewrap takes about three).
            .env("MSB_ISOLATION", "off");
        command
    };
    let serve = async |command| {
        Client::default()
            .serve(TokioChildProcess::new(command).unwrap())
            .await
            .unwrap()
    };
    let a = serve(start(0, "node-a")).await;
    let b = serve(start(1, "node-b")).await;
    // node-c's database connections carry a name of their own, to be found in
    // pg_stat_activity.
    let c_application_name = format!("msbd-{}-node-c", schema.0);
    let victim = {
        let mut command = start(2, "node-c");
        let url = database_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        command.env(
            "MSB_DATABASE_URL",
            format!("{url}{separator}application_name={c_application_name}"),
        );
        TokioChildProcess::new(command).unwrap()
    };
    let victim_pid = victim.id().expect("node-c's pid");
    let c = Client::default().serve(victim).await.unwrap();

    // Queued first (a paused queue is paused on its node only), then run by all three at once,
    // so that node-c dies with work left for the others. Submitted through all three, so every
    // node's intake is exercised.
    for via in [&a, &b, &c] {
        ok(via, "manage_task_queue", json!({"action": "pause"})).await;
    }
    let mut ids = std::collections::HashSet::with_capacity(TASKS);
    for n in 0..TASKS {
        let via = [&a, &b, &c][n % 3];
        let submitted = ok(
            via,
            "submit_task",
            json!({"task_type": "noop", "params": {}}),
        )
        .await;
        ids.insert(submitted["task_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), TASKS);
    for via in [&a, &b, &c] {
        ok(via, "manage_task_queue", json!({"action": "resume"})).await;
    }

    // Kill node-c once it has finished some tasks and is running others: stopped (SIGSTOP)
    // first, so that what it was running when it stopped working can be read once its
    // statements under way have landed, and started again to try anew if that was nothing.
    let db = admin().await;
    let t = &schema.0;
    let count = async |sql: String| -> i64 { db.query_one(&sql, &[]).await.unwrap().get(0) };
    let running_on_c_sql = format!(
        "SELECT id::text FROM (SELECT * FROM {t}.tasks UNION ALL SELECT * FROM {t}.tasks_done) AS tasks WHERE claimed_by = 'node-c' AND status = 3"
    );
    // node-c's connections: its statements still under way, and whether it has any left.
    let c_busy_sql = format!(
        "SELECT count(*) FILTER (WHERE state NOT LIKE 'idle%'), count(*) FROM pg_stat_activity \
         WHERE application_name = '{c_application_name}'"
    );
    let c_connections = async || -> (i64, i64) {
        let row = db.query_one(&c_busy_sql, &[]).await.unwrap();
        (row.get(0), row.get(1))
    };
    let victim = Pid::from_raw(victim_pid as i32);
    let mut attempts = 0;
    let stopped_at_ms = loop {
        attempts += 1;
        wait_until(Duration::from_secs(120), async || {
            let done_by_c = count(format!(
                "SELECT count(*) FROM (SELECT * FROM {t}.tasks UNION ALL SELECT * FROM {t}.tasks_done) AS tasks WHERE claimed_by = 'node-c' AND status >= 4"
            ))
            .await;
            let running_on_c = count(format!(
                "SELECT count(*) FROM (SELECT * FROM {t}.tasks UNION ALL SELECT * FROM {t}.tasks_done) AS tasks WHERE claimed_by = 'node-c' AND status = 3"
            ))
            .await;
            if done_by_c >= 100 && running_on_c > 0 {
                Ok(())
            } else {
                Err(format!(
                    "node-c never got going: {done_by_c} done, {running_on_c} running"
                ))
            }
        })
        .await;
        kill(victim, Signal::SIGSTOP).unwrap();
        // From here on node-c does nothing: its leases are no longer renewed.
        let stopped_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        // A statement node-c had already sent (a commit, say) lands before looking: none of
        // its connections is still working on one (a transaction left open stays open, and
        // dies with it).
        wait_until(Duration::from_secs(10), async || {
            match c_connections().await {
                (0, _) => Ok(()),
                (busy, all) => Err(format!("{busy} of node-c's {all} connections are busy")),
            }
        })
        .await;
        let running: Vec<String> = db
            .query(&running_on_c_sql, &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        if !running.is_empty() {
            kill(victim, Signal::SIGKILL).unwrap();
            break stopped_at_ms;
        }
        assert!(
            attempts < 20,
            "node-c was running nothing each of the {attempts} times it was stopped"
        );
        kill(victim, Signal::SIGCONT).unwrap();
    };
    drop(c);
    // Once node-c's connections are gone, nothing it sent can land any more.
    wait_until(Duration::from_secs(30), async || {
        match c_connections().await {
            (_, 0) => Ok(()),
            (_, all) => Err(format!("node-c still has {all} connections")),
        }
    })
    .await;
    // What node-c was running when it died: nobody else can have touched these rows yet
    // (their leases are live for seconds more).
    let orphans: Vec<String> = db
        .query(&running_on_c_sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!orphans.is_empty());

    wait_until(Duration::from_secs(600), async || {
        let finished = count(format!("SELECT count(*) FROM (SELECT * FROM {t}.tasks UNION ALL SELECT * FROM {t}.tasks_done) AS tasks WHERE status >= 4")).await;
        if finished == TASKS as i64 {
            Ok(())
        } else {
            Err(format!("only {finished} of {TASKS} tasks finished"))
        }
    })
    .await;

    // Every task ended once (a task row is unique and ends at most once), completed, and ran
    // once unless node-c died under it; then it ran twice and keeps the first attempt's error,
    // `worker_lost`.
    let rows = db
        .query(
            &format!(
                "SELECT id::text, status, attempt, claimed_by, started_at, error_kind FROM (SELECT * FROM {t}.tasks UNION ALL SELECT * FROM {t}.tasks_done) AS tasks"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), TASKS);
    let mut slowest_ms = 0;
    for row in &rows {
        let (id, status, attempt, claimed_by, started_at, error_kind): (
            String,
            i16,
            i64,
            String,
            i64,
            Option<i16>,
        ) = (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
        );
        assert!(ids.contains(&id), "{id} was never submitted");
        assert_eq!(status, 4, "{id} should have completed");
        if orphans.contains(&id) {
            assert_eq!(attempt, 2, "{id}: the dead node's attempt, then one more");
            assert_ne!(claimed_by, "node-c", "{id} was recovered by another node");
            assert_eq!(
                error_kind,
                Some(2),
                "{id}: its first attempt was lost (worker_lost)"
            );
            let took = started_at - stopped_at_ms;
            slowest_ms = slowest_ms.max(took);
        } else {
            assert_eq!((attempt, error_kind), (1, None), "{id} ran once");
        }
    }
    let bound_ms = (KILL_TEST_LEASE_S + 1 + 1) * 1000;
    assert!(
        slowest_ms <= bound_ms,
        "the last of {} orphaned tasks restarted {slowest_ms} ms after node-c stopped (bound {bound_ms} ms)",
        orphans.len()
    );
    eprintln!(
        "{} tasks over 3 nodes; node-c killed running {} (stopped {attempts} time(s) to find it running some), all restarted elsewhere within {slowest_ms} ms of its stop (lease {KILL_TEST_LEASE_S} s)",
        TASKS,
        orphans.len()
    );

    a.cancel().await.unwrap();
    b.cancel().await.unwrap();
    schema.drop_it().await;
}

/// A PostgreSQL server of one test, on a port of its own, in a temporary directory: the test
/// restarts it without disturbing the shared server other tests use. As root, the server's
/// programs run as the `postgres` user (PostgreSQL refuses to run as root).
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn start() -> PrivatePostgres {
        let bin = std::env::var_os("MSB_TEST_PG_BIN")
            .map(std::path::PathBuf::from)
            .or_else(|| {
                let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                    .filter(|bin| bin.join("pg_ctl").exists())
                    .collect();
                found.sort();
                found.pop()
            })
            .expect(
                "no PostgreSQL programs in /usr/lib/postgresql/*/bin: install postgresql (CI \
                 does) or set MSB_TEST_PG_BIN to the directory of initdb and pg_ctl",
            );
        let dir = tempfile::tempdir().unwrap();
        if nix::unistd::geteuid().is_root() {
            let status = std::process::Command::new("chown")
                .args(["postgres:"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown postgres: {}", dir.path().display());
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = PrivatePostgres { dir, bin, port };
        server.run(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        server.start_again();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let mut command = if nix::unistd::geteuid().is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(&program);
            command
        } else {
            std::process::Command::new(&program)
        };
        let output = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &options,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server the hard way: every backend killed, no checkpoint, crash recovery at
    /// the next start.
    fn crash(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = std::process::Command::new(self.bin.join("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        if nix::unistd::geteuid().is_root() {
            let _ = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .args(["-D", &self.data(), "-m", "immediate", "stop"])
                .output();
        }
    }
}

/// PostgreSQL crashes and comes back while two nodes run tasks: the nodes say `degraded`
/// meanwhile, reconnect, and every task, including those submitted while the database was
/// down, ends exactly once (one row each, completed, and the per-status counts agree with
/// the rows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_loses_nothing() {
    const TASKS: usize = 1_500;
    let server = PrivatePostgres::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let types = dirs[0].path().join("task-types.toml");
    std::fs::write(
        &types,
        "[[task_type]]\nname = \"noop\"\ndescription = \"does nothing\"\ncommand = [\"true\"]\n",
    )
    .unwrap();
    let schema = "restart";
    let start = |i: usize, name: &str| {
        let mut command = tokio::process::Command::new(MSBD);
        command
            .arg("serve")
            .env("MSB_DATA_DIR", dirs[i].path())
            .env("MSB_DATABASE_URL", server.url())
            .env("MSB_DATABASE_SCHEMA", schema)
            .env("MSB_NODE_ID", name)
            .env("MSB_TASK_TYPES_FILE", &types)
            .env("MSB_LEASE_TIMEOUT", "5")
            .env("MSB_MAX_CONCURRENT_TASKS", "4")
            .env("MSB_LOG_LEVEL", "error")
            .env("MSB_SHUTDOWN_TIMEOUT", "10")
            .stderr(Stdio::inherit());
        TokioChildProcess::new(command).unwrap()
    };
    let a = Client::default().serve(start(0, "node-a")).await.unwrap();
    let b = Client::default().serve(start(1, "node-b")).await.unwrap();

    let mut ids = std::collections::HashSet::new();
    for n in 0..TASKS {
        let via = if n % 2 == 0 { &a } else { &b };
        let submitted = ok(
            via,
            "submit_task",
            json!({"task_type": "noop", "params": {}}),
        )
        .await;
        ids.insert(submitted["task_id"].as_str().unwrap().to_owned());
    }

    let connect = async || {
        let (client, connection) = tokio_postgres::connect(&server.url(), NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    };
    let db = connect().await;
    let finished_sql = format!(
        "SELECT count(*) FROM (SELECT * FROM {schema}.tasks UNION ALL SELECT * FROM {schema}.tasks_done) AS tasks WHERE status >= 4"
    );
    wait_until(Duration::from_secs(120), async || {
        let finished: i64 = db.query_one(&finished_sql, &[]).await.unwrap().get(0);
        if finished >= (TASKS / 4) as i64 {
            Ok(())
        } else {
            Err(format!("{finished} finished"))
        }
    })
    .await;

    server.crash();
    // Submitted while the database is down: each call waits for it (up to 10 s) and then
    // answers, so what it acknowledges is stored.
    let during = {
        let peer = a.peer().clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..5 {
                let request = CallToolRequestParams::new("submit_task")
                    .with_arguments(args(json!({"task_type": "noop", "params": {}})));
                let answer = peer.call_tool(request).await.unwrap();
                assert_ne!(answer.is_error, Some(true), "{answer:?}");
                let submitted = answer.structured_content.unwrap();
                ids.push(submitted["task_id"].as_str().unwrap().to_owned());
            }
            ids
        })
    };
    wait_until(Duration::from_secs(10), async || {
        let health = ok(&b, "health_check", json!({})).await;
        if health["components"]["task_store"]["status"] == "degraded" {
            Ok(())
        } else {
            Err(format!("the task store never said degraded: {health}"))
        }
    })
    .await;
    // The outage lasts two seconds more (a length of time, not a wait for something).
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.start_again();
    ids.extend(during.await.unwrap());
    let total = TASKS + 5;
    assert_eq!(ids.len(), total);

    let db = connect().await;
    wait_until(Duration::from_secs(300), async || {
        let finished: i64 = db.query_one(&finished_sql, &[]).await.unwrap().get(0);
        if finished == total as i64 {
            Ok(())
        } else {
            Err(format!("only {finished} of {total} tasks finished"))
        }
    })
    .await;
    let rows = db
        .query(
            &format!(
                "SELECT id::text, status, attempt, error_message, claimed_by FROM (SELECT * FROM {schema}.tasks UNION ALL SELECT * FROM {schema}.tasks_done) AS tasks"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), total, "one row per acknowledged task");
    for row in &rows {
        let (id, status): (String, i16) = (row.get(0), row.get(1));
        assert!(ids.contains(&id), "{id} was never acknowledged");
        let (attempt, error, node): (i64, Option<String>, Option<String>) =
            (row.get(2), row.get(3), row.get(4));
        assert_eq!(
            status, 4,
            "{id} should have completed (attempt {attempt} on {node:?}, error {error:?})"
        );
    }
    let counted: i64 = db
        .query_one(
            &format!(
                "SELECT coalesce(sum(count), 0)::bigint FROM {schema}.task_counts WHERE status = 4"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        counted, total as i64,
        "the counts record each completion once"
    );
    let health = ok(&a, "health_check", json!({})).await;
    assert_eq!(
        health["components"]["task_store"]["status"], "healthy",
        "{health}"
    );

    a.cancel().await.unwrap();
    b.cancel().await.unwrap();
}

/// The console of one node shows every node, the maintenance leader and the database, and a
/// task's page names the node that ran each attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_nodes_the_leader_and_where_each_attempt_ran() {
    let schema = Schema::new();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut command = node_command(dir_a.path(), &schema, "node-a");
    command.env("MSB_CONSOLE_ADDR", format!("127.0.0.1:{port}"));
    let a = Client::default()
        .serve(TokioChildProcess::new(command).unwrap())
        .await
        .unwrap();
    let b = node(dir_b.path(), &schema, "node-b").await;
    let base = format!("http://127.0.0.1:{port}");
    let get = async |path: &str| -> Result<String, String> {
        let response = reqwest::get(format!("{base}{path}"))
            .await
            .map_err(|e| e.to_string())?;
        response.text().await.map_err(|e| e.to_string())
    };

    // No token: loopback's console, whose user is the operator, sees both nodes.
    let html = wait_until(Duration::from_secs(20), async || {
        let html = get("/ui/supervision").await?;
        if html.contains("data-node=\"node-a\"") && html.contains("data-node=\"node-b\"") {
            Ok(html)
        } else {
            Err(format!("both nodes are not listed: {html}"))
        }
    })
    .await;
    assert_eq!(
        html.matches("maintenance leader").count(),
        1,
        "one leader: {html}"
    );
    let own = &html[html.find("data-node=\"node-a\"").unwrap()..];
    assert!(
        own[..own.find("</tr>").unwrap()].contains("this node"),
        "{html}"
    );
    assert!(html.contains("id=\"database\""), "{html}");
    assert!(
        html.contains("PostgreSQL</dt><dd>1"),
        "the server's version: {html}"
    );

    // A task kept on node b by its session, failing once: both attempts ran on b.
    let id = ok(
        &b,
        "submit_task",
        json!({
            "task_type": "command",
            "params": {"command": "exit 3"},
            "session_id": "kept-on-b",
            "max_retries": 1,
        }),
    )
    .await["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_status(&a, &id, "failed").await;
    let html = get(&format!("/ui/tasks/{id}")).await.unwrap();
    assert!(html.contains("attempt 1 started on node-b"), "{html}");
    assert!(html.contains("attempt 2 started on node-b"), "{html}");
    let task = ok(&a, "check_task_status", json!({"task_id": id})).await;
    let nodes: Vec<&str> = task["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|attempt| attempt["node"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(nodes, ["node-b", "node-b"], "{task}");

    // Node b goes: node a's console stops listing it.
    b.cancel().await.unwrap();
    wait_until(Duration::from_secs(30), async || {
        let html = get("/ui/supervision").await?;
        if html.contains("data-node=\"node-b\"") {
            Err("node-b is still listed".to_owned())
        } else {
            Ok(())
        }
    })
    .await;
    a.cancel().await.unwrap();
    schema.drop_it().await;
}
