//! The shared store: one PostgreSQL database holding the queue of several msbd nodes, the way
//! River, Oban and graphile-worker do.
//!
//! # Semantics
//! The same as the SQLite store, request for request (the conformance suite is the contract):
//! idempotency keys per owner, priorities then submission order, scheduled tasks promoted when
//! due, per-type room in claims, every write of a running attempt fenced by
//! `status = running AND attempt = n`, commands, recovery, pruning, listing by cursor, and counts.
//! Two things differ because the store is shared:
//! - [`Recover::AllRunning`] takes only the attempts this node claimed (its process is the one
//!   known to be gone), never those of other nodes. Still, an engine on a shared store should not
//!   recover at start: build it with [`PostgresStore::engine_config`] (or, not knowing the
//!   store's type, [`Store::engine_config`]), which turns `recover_running_at_start` off, and let
//!   the lease reaper recover expired leases.
//! - A task bound to a session (`session_id` set) is claimed only by the node it was submitted
//!   to, because sessions and their sandboxes live on one node; tasks without a session, or with
//!   a session made for them alone ([`crate::Task::fresh_session`]), run on any node (see
//!   [`PostgresConfig::session_affinity`]).
//!
//! # How it goes fast, and stays fast
//! - **Group commit.** Every write request goes over a channel to the store's writers
//!   ([`PostgresConfig::writers`], two by default), each owning a connection. A writer takes
//!   whatever requests are waiting (up to [`PostgresConfig::max_batch`]), runs them in one
//!   transaction, and answers each only after the commit; while it commits, the next writer takes
//!   what arrived meanwhile, so commits overlap and PostgreSQL flushes their WAL together. `BEGIN`
//!   goes out with the first statement and `COMMIT` with the count update and the notice, in one
//!   round trip each. Finishes that arrive together are written with two statements in all (one
//!   `SELECT … FOR UPDATE` of the held rows, one `UPDATE … FROM unnest(…)`), and a submission of
//!   many tasks is one `INSERT … SELECT FROM unnest(…)`.
//! - **Claims** are one statement: `UPDATE … WHERE seq = ANY(ARRAY(SELECT … ORDER BY priority
//!   DESC, seq LIMIT n FOR UPDATE SKIP LOCKED))`, so nodes claiming at once skip each other's rows
//!   instead of waiting, and the update is a primary-key lookup whatever the batch size.
//! - **Finished tasks leave the hot table.** `tasks` holds the tasks that are not finished; the
//!   transaction that finishes a task (a finish, a command, a recovery, a release of a cancelled
//!   claim) moves its row to `tasks_done` (the same columns, its `seq` kept), finishes that come
//!   together in one `DELETE … RETURNING` feeding an `INSERT`. So the table that every claim,
//!   finish and heartbeat writes, and that vacuum visits with all its indexes, stays the size of
//!   the live work however many finished tasks retention keeps (the sustained bench fell to a
//!   quarter of its rate past 3 M kept rows when they shared the table). `tasks_done` is written
//!   once per task and deleted from by the pruner. Reads (get, list, counts of timed-out tasks)
//!   take both tables in one statement, so a task that moves meanwhile shows once; listings
//!   merge both by `seq`. Idempotency keys are in `task_keys` ((owner, key) → id): a submission
//!   takes its key there before inserting, so a key is unique across both tables with no race
//!   against a finish moving the task that holds it, and leaves with its task.
//! - **Partial indexes only** on the hot paths (`tasks_queued` on the queue, `tasks_scheduled`,
//!   `tasks_held`, and `tasks_finished` for rows a node of an older build finished in place,
//!   which the pruner moves), so the queue index holds the queue.
//! - **Plans pinned.** The writers' sessions turn off sequential scans, bitmap scans and sorts
//!   (only as a cost: a statement with no other way still runs). Measured: on a fresh table that
//!   autovacuum had not analyzed yet, the planner took the queue for a few rows and sorted all of
//!   it on every claim (100 ms per claim at 50,000 queued tasks, instead of 0.2 ms), and hashed
//!   the whole table to update a batch of 1,000 rows. This is PostgreSQL's form of the SQLite
//!   store's `INDEXED BY`.
//! - **Against bloat:** short transactions; heartbeats and progress reports change no indexed
//!   column and the table keeps free room on its pages (`fillfactor = 80`), so they are HOT updates
//!   (no new index entries); autovacuum is set to run early on the task table; counts by type and
//!   status are partial sums per node (no row that every node updates); the pruner deletes old
//!   finished tasks from `tasks_done` in batches; the maintenance leader vacuums `tasks` itself when dead
//!   row versions pile up ([`PostgresConfig::vacuum_check`]), rather than wait for
//!   autovacuum's once-a-minute visit.
//!
//! # Wake-ups
//! A transaction that makes work ready (a task queued, a scheduled task with its due time, a
//! retry) ends with `pg_notify` on the store's channel. Each store listens on a connection of its
//! own and hands the other nodes' notices to [`PostgresStore::next_wakeup`];
//! [`PostgresStore::run_wakeups`] forwards them to an engine ([`crate::Engine::wake`],
//! [`crate::Engine::note_due`]); [`Store::wakeups`] offers that loop to a runner that does not
//! know the store's type (sandbox-wrapper supervises it). The engine's idle poll stays as a slow
//! safety net.
//!
//! # Maintenance on one node
//! The listening connection also tries to take a session advisory lock of the schema:
//! [`PostgresStore::is_maintenance_leader`] (and [`Store::is_maintenance_leader`]) says whether
//! this node holds it. The lease reaper and
//! the pruner should run only there; when the node dies its connection closes, the lock is free,
//! and another node takes it within [`PostgresConfig::leader_retry`].
//!
//! # Which nodes are there
//! [`PostgresStore::cluster_status`] (and [`Store::cluster_status`]) lists the nodes connected
//! to the schema, from the advisory locks their listening connections hold, with the leader
//! among them, and the database's figures (size, the task table's live and dead rows, its last
//! vacuum, connections). Every entry of a task's attempt history names the node that ran the
//! attempt ([`crate::AttemptRecord::node`]): the node that claimed it, also when another node's
//! reaper recovered it.
//!
//! # When the database goes away
//! Connections are reopened with exponential backoff (with jitter). Meanwhile
//! [`Store::health`] says `degraded`, and requests wait up to
//! [`PostgresConfig::unavailable_wait`] for the database before failing. A request is answered
//! only after its transaction committed, so nothing acknowledged is lost; a transaction whose
//! connection broke before `COMMIT` was sent is run again on the new connection. When a
//! connection breaks while `COMMIT` is in flight, the writer settles it on the next connection:
//! a transaction that holds a request not safe to repeat (a submission, a claim, a finish, a
//! command...) asked for its transaction id just before `COMMIT`, in the same round trip, and
//! `txid_status` tells whether it committed (its answers go out: a claim's tasks are handed to
//! the engine instead of being left running with no worker) or rolled back (its requests run
//! again). Such a transaction waits for the database however long it is away (only the
//! database can tell; the store's closing ends the wait), and one the database still runs (it
//! has not noticed the broken connection) is ended with `pg_terminate_backend` and asked about
//! again. Only when it cannot be known (the id's answer was lost too, or the database still
//! runs the transaction [`PostgresConfig::unavailable_wait`] after that) are requests that are
//! safe to repeat (heartbeats, progress, promotion) repeated and the others failed with an error
//! that says so (the engine asks again until the finish is recorded, fenced by its attempt
//! number, or the engine stops; then lease expiry settles it, as if its worker had died).
//!
//! Leases run out while the database is away, because no node can renew them: after an outage
//! the reaper must give live nodes time to reconnect and renew before it takes tasks back.
//! [`PostgresStore::healthy_for`] says how long this node has been reaching the database
//! again; sandbox-wrapper's reaper waits until it exceeds two lease periods.
//!
//! # Connections
//! `writers + 2` per store: the writers, a reader (gets, listings and counts, pipelined on one
//! connection), and the listener; one more on the maintenance leader, for its vacuums. Plain TCP or Unix sockets; TLS is not built in. Sessions are
//! long-lived and keep settings (`search_path`, the plan settings): a pooler in transaction
//! mode (PgBouncer) between msbd and PostgreSQL is not supported, and `LISTEN` needs a session
//! anyway.

mod cluster;
mod listen;
mod migrate;
mod rows;
mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::{Engine, EngineConfig};
use crate::error::{Error, Result};
use crate::model::{Task, TaskId, Timestamp};
use crate::store::common::{self, HealthCell, HealthPart};
use crate::store::{
    ClaimRequest, ClusterStatus, Command, Cursor, Finish, Heartbeat, HeartbeatReply, ListFilter,
    Page, PageRequest, ProgressUpdate, Promoted, Recover, Stats, Store, StoreFuture, StoreHealth,
    Submitted, WakeupLoop,
};

use listen::Wakeups;
use rows::{COLUMNS, task_from_row, uuid};
use writer::{Answer, Pending, Request};

/// The first key of every advisory lock this store takes ("msbd" in ASCII); the second is a hash
/// of what is locked (the schema's migrations, its maintenance, a node's name).
const LOCK_CLASS: i32 = 0x6d73_6264;

/// The claim statement, for tests that check its plan (parameters: excluded types, node,
/// limit, now, lease end).
#[doc(hidden)]
pub const CLAIM_SQL: &str = writer::CLAIM;

/// The idle poll of an engine on a shared store (see [`PostgresStore::engine_config`]): a safety
/// net, slow because wake-ups come by `NOTIFY`.
pub const SAFETY_POLL: Duration = Duration::from_secs(5);

/// How to connect a [`PostgresStore`].
#[derive(Clone)]
pub struct PostgresConfig {
    /// Where the database is: a URL (`postgres://user:password@host:5432/database`) or a
    /// libpq key=value string. TLS modes other than `disable` and `prefer` are not supported.
    pub url: String,
    /// The schema that holds the store's tables (created, with its tables, if missing). Nodes that
    /// share a queue use the same schema; letters, digits and `_` only.
    pub schema: String,
    /// This node's name: unique among the nodes connected at once (a second node with the same
    /// name is refused), recorded on every attempt it claims, and the home of the tasks bound to
    /// a session that are submitted through it. Keep it stable across restarts of the node.
    pub node_id: String,
    /// Whether a task bound to a session runs only on the node it was submitted to. A task whose
    /// session was made for it alone ([`crate::Task::fresh_session`]) is bound to none.
    pub session_affinity: bool,
    /// The most requests committed in one transaction.
    pub max_batch: usize,
    /// How many writing connections take turns at the requests (see the module docs). More of
    /// them overlap more commits; each is a connection of the database's.
    pub writers: usize,
    /// How long a request waits for an unreachable database before it fails.
    pub unavailable_wait: Duration,
    /// The first pause between attempts to reconnect; it doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// The longest pause between attempts to reconnect.
    pub reconnect_max: Duration,
    /// How long one attempt to connect may take.
    pub connect_timeout: Duration,
    /// How often a node that is not the maintenance leader tries to become it, and the leader
    /// checks that its listening connection is alive.
    pub leader_retry: Duration,
    /// How often the maintenance leader looks at the task table's dead row versions, and
    /// vacuums it when they exceed `vacuum_min_dead` and a tenth of its live rows. `None`
    /// leaves it to autovacuum alone, whose launcher visits each database only once a minute
    /// by default: long enough for a busy queue to leave millions of dead versions (the
    /// sustained bench fell from 8,800 to 3,600 tasks/s in 5 minutes that way).
    pub vacuum_check: Option<Duration>,
    /// The fewest dead row versions worth a vacuum (see `vacuum_check`).
    pub vacuum_min_dead: i64,
}

impl std::fmt::Debug for PostgresConfig {
    /// Leaves the URL out: it may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("schema", &self.schema)
            .field("node_id", &self.node_id)
            .field("session_affinity", &self.session_affinity)
            .field("max_batch", &self.max_batch)
            .field("writers", &self.writers)
            .field("unavailable_wait", &self.unavailable_wait)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("leader_retry", &self.leader_retry)
            .field("vacuum_check", &self.vacuum_check)
            .field("vacuum_min_dead", &self.vacuum_min_dead)
            .finish_non_exhaustive()
    }
}

impl PostgresConfig {
    /// The defaults for the database at `url`, as node `node_id`: schema `msbd`, session
    /// affinity on, two writers committing batches of up to 1,024 requests, requests that wait
    /// up to 10 s for an unreachable database, reconnection after 50 ms doubling up to 5 s, and
    /// a leader check every 2 s.
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> PostgresConfig {
        PostgresConfig {
            url: url.into(),
            schema: "msbd".into(),
            node_id: node_id.into(),
            session_affinity: true,
            max_batch: 1_024,
            writers: 2,
            unavailable_wait: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            leader_retry: Duration::from_secs(2),
            vacuum_check: Some(Duration::from_secs(10)),
            vacuum_min_dead: 50_000,
        }
    }
}

/// What other nodes made ready since the last [`PostgresStore::next_wakeup`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wakeup {
    /// Tasks were queued: claim.
    pub queued: bool,
    /// The earliest due time of the scheduled tasks announced: promote then.
    pub due: Option<Timestamp>,
}

/// The PostgreSQL task store. See the module docs.
pub struct PostgresStore {
    shared: Arc<Shared>,
    /// `None` only while the store is closed.
    writer: Option<mpsc::UnboundedSender<Pending>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

/// What the store's tasks share.
struct Shared {
    pg: tokio_postgres::Config,
    config: PostgresConfig,
    /// The schema, quoted as an identifier.
    schema_ident: String,
    /// The `NOTIFY` channel of the schema.
    channel: String,
    health: Health,
    wakeups: Wakeups,
    leader: AtomicBool,
    reader: Reader,
    /// Every task the store spawns: writer, listener, connection drivers.
    tracker: TaskTracker,
}

impl PostgresStore {
    /// Connects to the database, creates the schema or migrates it to this build's version, and
    /// starts the writer and the listener. Fails with a clear error when the database cannot be
    /// reached, the URL is not valid, or another connected node has the same `node_id`.
    pub async fn connect(config: PostgresConfig) -> Result<PostgresStore> {
        check_identifier("schema", &config.schema)?;
        if config.node_id.is_empty() || config.node_id.len() > 200 {
            return Err(Error::InvalidInput {
                field: "node_id",
                message: "must be 1 to 200 bytes long".into(),
            });
        }
        let mut pg: tokio_postgres::Config =
            config.url.parse().map_err(|e| Error::InvalidInput {
                field: "database url",
                message: format!(
                    "{e}; expected postgres://user:password@host:port/database or key=value pairs"
                ),
            })?;
        if pg.get_application_name().is_none() {
            pg.application_name(format!("msbd {}", config.node_id));
        }
        pg.connect_timeout(config.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        let tracker = TaskTracker::new();
        let shared = Arc::new(Shared {
            schema_ident: quoted(&config.schema),
            channel: format!("msbd_{}", config.schema),
            pg,
            config,
            health: Health::default(),
            wakeups: Wakeups::default(),
            leader: AtomicBool::new(false),
            reader: Reader::default(),
            tracker: tracker.clone(),
        });

        let mut writers = Vec::new();
        for _ in 0..shared.config.writers.max(1) {
            writers.push(
                writer::WriteConn::open(&shared)
                    .await
                    .map_err(|e| shared.unreachable("connecting to the database", &e))?,
            );
        }
        migrate::migrate(writers[0].client_mut(), &shared.config.schema).await?;
        shared.reader.get(&shared).await?;
        let listening = listen::open(&shared).await?;

        let cancel = CancellationToken::new();
        let (sender, receiver) = mpsc::unbounded_channel();
        let requests: writer::Requests = Arc::new(tokio::sync::Mutex::new(receiver));
        for (index, conn) in writers.into_iter().enumerate() {
            tracker.spawn(writer::run(
                Arc::clone(&shared),
                index,
                conn,
                Arc::clone(&requests),
                cancel.clone(),
            ));
        }
        tracker.spawn(listen::run(Arc::clone(&shared), listening, cancel.clone()));
        tracker.spawn(run_vacuums(Arc::clone(&shared), cancel.clone()));
        Ok(PostgresStore {
            shared,
            writer: Some(sender),
            cancel,
            tracker,
        })
    }

    /// The engine settings for a store shared by several nodes: `config` with
    /// `recover_running_at_start` off (a task found running at start may belong to a live node:
    /// only expired leases are recovered, by the lease reaper) and an idle poll of at least
    /// [`SAFETY_POLL`] (wake-ups come by `NOTIFY`; see [`PostgresStore::run_wakeups`]).
    pub fn engine_config(config: EngineConfig) -> EngineConfig {
        EngineConfig {
            recover_running_at_start: false,
            idle_poll: config.idle_poll.max(SAFETY_POLL),
            ..config
        }
    }

    /// This node's name.
    pub fn node_id(&self) -> &str {
        &self.shared.config.node_id
    }

    /// The schema that holds the tables.
    pub fn schema(&self) -> &str {
        &self.shared.config.schema
    }

    /// The schema version this build migrates to.
    pub fn schema_version() -> i32 {
        migrate::latest()
    }

    /// Whether this node holds the maintenance lock: the lease reaper and the pruner should run
    /// here and nowhere else. Cheap (no I/O). Two nodes may both believe it for a moment after a
    /// connection broke unnoticed; the reaper and the pruner are safe to run twice.
    pub fn is_maintenance_leader(&self) -> bool {
        self.shared.leader.load(Ordering::Acquire)
    }

    /// How long this node has reached the database without a problem since its last
    /// connection problem went away (`Duration::MAX` when it had none since it was opened);
    /// `None` while it has one. After an
    /// outage, leases that ran out meanwhile say nothing about their workers: a lease reaper
    /// should wait until this is longer than the nodes need to reconnect and renew them
    /// (sandbox-wrapper waits two lease periods).
    pub fn healthy_for(&self) -> Option<Duration> {
        self.shared.health.healthy_for()
    }

    /// Waits until other nodes make work ready (or this node's listening connection was
    /// re-established, when notices may have been missed: then both fields say "look now").
    pub async fn next_wakeup(&self) -> Wakeup {
        self.shared.wakeups.next().await
    }

    /// Forwards [`PostgresStore::next_wakeup`] to `engine` until `cancel` fires: the loop that runs
    /// beside the engine's own on a shared store, so that a task submitted on another node starts
    /// here without waiting for the idle poll.
    pub async fn run_wakeups(&self, engine: &Engine, cancel: CancellationToken) -> Result<()> {
        loop {
            let wakeup = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                wakeup = self.next_wakeup() => wakeup,
            };
            if let Some(at) = wakeup.due {
                engine.note_due(at);
            }
            if wakeup.queued {
                engine.wake();
            }
        }
    }

    /// Stops the writer once every request already sent is answered, stops the listener (giving
    /// up the maintenance lock), and closes the connections.
    pub async fn close(mut self) {
        self.shut();
        let tracker = self.tracker.clone();
        drop(self);
        tracker.close();
        tracker.wait().await;
    }

    fn shut(&mut self) {
        self.writer.take();
        self.cancel.cancel();
    }

    fn write<T: Send + 'static>(
        &self,
        request: Request,
        extract: fn(Answer) -> Option<T>,
    ) -> StoreFuture<'_, T> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            request,
            reply,
            since: Instant::now(),
            tries: 0,
        };
        let sent = match &self.writer {
            Some(sender) => sender.send(pending).is_ok(),
            None => false,
        };
        Box::pin(async move {
            if !sent {
                return Err(closed());
            }
            let answer = answer.await.unwrap_or_else(|_| Err(closed()))?;
            extract(answer)
                .ok_or_else(|| Error::store("writing", "the writer answered another request"))
        })
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.shared.config.schema)
            .field("node_id", &self.shared.config.node_id)
            .finish_non_exhaustive()
    }
}

impl Drop for PostgresStore {
    /// Stops the store's tasks: the writer ends after answering the requests already sent, the
    /// listener at once. [`PostgresStore::close`] waits for them.
    fn drop(&mut self) {
        self.shut();
    }
}

fn closed() -> Error {
    Error::Store {
        action: "sending a request",
        message: "the store is closed".into(),
    }
}

/// Checks a database URL (or key=value string) the way [`PostgresStore::connect`] reads it,
/// without connecting: `Err` says what is wrong. TLS is not built in, so an `sslmode` that
/// requires it is refused.
pub fn check_url(url: &str) -> std::result::Result<(), String> {
    let config = url
        .parse::<tokio_postgres::Config>()
        .map_err(|e| e.to_string())?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err("sslmode=require needs TLS, which this build does not have".into());
    }
    Ok(())
}

/// Refuses a name that is not a plain SQL identifier.
fn check_identifier(field: &'static str, name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name.len() <= 40
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if plain {
        Ok(())
    } else {
        Err(Error::InvalidInput {
            field,
            message: format!(
                "`{}` is not usable: 1 to 40 letters, digits or `_`, not starting with a digit",
                name.chars().take(60).collect::<String>()
            ),
        })
    }
}

/// A name quoted as an SQL identifier.
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A PostgreSQL error in words: the server's message and code, or the client's error, with a
/// hint for the causes a person can fix.
fn describe(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            let words = cause.to_string();
            if !text.contains(&words) {
                text.push_str(": ");
                text.push_str(&words);
            }
            source = cause.source();
        }
        return text;
    };
    let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
    if let Some(detail) = db.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    let code = db.code().code();
    if code == "22021" || code == "22P05" {
        text.push_str(
            " — PostgreSQL text cannot hold the NUL character (\\u0000): remove it from the task's strings",
        );
    }
    text
}

/// Whether an error means the connection is gone (closed, broken, or the server shutting down or
/// terminating the session), as opposed to an error of one statement.
fn is_lost(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    match error.as_db_error() {
        // A client-side error (a value of the wrong type, say) is not a broken connection;
        // an I/O error is.
        None => std::error::Error::source(error).is_some_and(|cause| cause.is::<std::io::Error>()),
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || code.starts_with("57P") || code == "53300"
        }
    }
}

impl Shared {
    /// Where the database is, without credentials, for messages.
    fn target(&self) -> String {
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .zip(self.pg.get_ports().iter().chain(std::iter::repeat(&5432)))
            .map(|(host, port)| match host {
                tokio_postgres::config::Host::Tcp(name) => format!("{name}:{port}"),
                tokio_postgres::config::Host::Unix(path) => {
                    format!("{}/.s.PGSQL.{port}", path.display())
                }
            })
            .collect();
        let database = self.pg.get_dbname().unwrap_or("(default database)");
        format!("{} database {database}", hosts.join(","))
    }

    /// The error of a database that cannot be reached.
    fn unreachable(&self, action: &'static str, error: &tokio_postgres::Error) -> Error {
        Error::Store {
            action,
            message: format!(
                "cannot reach PostgreSQL at {}: {}; check that it runs and accepts this user",
                self.target(),
                describe(error)
            ),
        }
    }

    /// Opens a connection whose search_path is the store's schema, with its driver spawned.
    async fn connect(&self) -> std::result::Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.pg.connect(NoTls).await?;
        self.tracker.spawn(async move {
            let _ = connection.await;
        });
        client
            .batch_execute(&format!("SET search_path TO {}", self.schema_ident))
            .await?;
        Ok(client)
    }
}

/// On the maintenance leader, every `vacuum_check`: vacuums the task table when its dead row
/// versions pile up, on a connection of its own (a `VACUUM` on the listening connection would
/// hold back the wake-ups it receives). Errors are logged and tried again next time.
async fn run_vacuums(shared: Arc<Shared>, cancel: CancellationToken) {
    let Some(every) = shared.config.vacuum_check else {
        return;
    };
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if !shared.leader.load(Ordering::Acquire) {
            client = None;
            continue;
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            client = shared.connect().await.ok();
        }
        let Some(conn) = client.as_ref() else {
            continue;
        };
        let started = Instant::now();
        let vacuumed = tokio::select! {
            _ = cancel.cancelled() => return,
            vacuumed = vacuum_if_needed(conn, shared.config.vacuum_min_dead) => vacuumed,
        };
        match vacuumed {
            Ok(Some((live, dead))) => tracing::debug!(
                live,
                dead,
                took_ms = started.elapsed().as_millis() as u64,
                "vacuumed the task table"
            ),
            Ok(None) => {}
            Err(error) => {
                tracing::debug!(error = %describe(&error), "vacuuming the task table failed");
                client = None;
            }
        }
    }
}

/// Vacuums the task table if its dead row versions exceed `min_dead` and a tenth of its live
/// rows; returns the live and dead counts it acted on.
async fn vacuum_if_needed(
    client: &Client,
    min_dead: i64,
) -> std::result::Result<Option<(i64, i64)>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT n_live_tup, n_dead_tup FROM pg_stat_user_tables WHERE relid = 'tasks'::regclass",
            &[],
        )
        .await?
    else {
        return Ok(None);
    };
    let (live, dead): (i64, i64) = (row.try_get("n_live_tup")?, row.try_get("n_dead_tup")?);
    if dead < min_dead.max(live / 10) {
        return Ok(None);
    }
    client.batch_execute("VACUUM tasks").await?;
    Ok(Some((live, dead)))
}

/// Exponential backoff with jitter.
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(config: &PostgresConfig) -> Backoff {
        Backoff {
            next: config.reconnect_min,
            min: config.reconnect_min,
            max: config.reconnect_max.max(config.reconnect_min),
        }
    }

    /// The next pause: the current step, drawn from its upper half.
    fn pause(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let millis = step.as_millis() as u64;
        Duration::from_millis(millis / 2 + rand::random_range(0..=millis - millis / 2))
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The parts of the store whose failures show in its health.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    /// A writer, by its number.
    Writer(usize),
    Reader,
    Listener,
    /// Another connected node has this node's name.
    NodeName,
}

impl HealthPart for Part {
    fn unhealthy(self) -> bool {
        self == Part::NodeName
    }
}

/// The store's health as its tasks see it (see [`Store::health`]): the shared cell, with a log
/// line when a part starts failing and when it works again.
#[derive(Default)]
struct Health(HealthCell<Part>);

impl Health {
    /// Records a problem of `part`; logs it when it is new.
    fn failing(&self, part: Part, problem: String) {
        if self.0.failing(part, problem.clone()) {
            tracing::warn!(part = ?part, %problem, "the PostgreSQL task store is degraded");
        }
    }

    /// Records that `part` works again.
    fn working(&self, part: Part) {
        if self.0.working(part) {
            tracing::info!(part = ?part, "the PostgreSQL task store works again");
        }
    }

    /// How long the store has had no problem; `None` while it has one.
    fn healthy_for(&self) -> Option<Duration> {
        self.0.healthy_for()
    }

    fn get(&self) -> StoreHealth {
        self.0.get()
    }
}

/// The reading connection: gets, listings and counts, pipelined on one connection and reopened
/// when it breaks.
#[derive(Default)]
struct Reader {
    current: Mutex<Option<Arc<ReadConn>>>,
    /// Held while reconnecting, so that one caller reconnects and the others wait for it.
    reconnecting: tokio::sync::Mutex<()>,
}

struct ReadConn {
    client: Client,
    get: Statement,
    stats: Statement,
    /// Statements prepared when first used (listings, the cluster's status), by their SQL.
    lists: Mutex<HashMap<String, Statement>>,
}

impl Reader {
    /// The current connection, reopened (waiting up to `unavailable_wait`) if it broke.
    async fn get(&self, shared: &Shared) -> Result<Arc<ReadConn>> {
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let _guard = self.reconnecting.lock().await;
        if let Some(conn) = self.live() {
            return Ok(conn);
        }
        let deadline = Instant::now() + shared.config.unavailable_wait;
        let mut backoff = Backoff::new(&shared.config);
        loop {
            match ReadConn::open(shared).await {
                Ok(conn) => {
                    let conn = Arc::new(conn);
                    *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(Arc::clone(&conn));
                    shared.health.working(Part::Reader);
                    return Ok(conn);
                }
                Err(error) => {
                    let error = shared.unreachable("reading", &error);
                    shared.health.failing(Part::Reader, error.to_string());
                    if Instant::now() >= deadline {
                        return Err(error);
                    }
                    tokio::time::sleep(backoff.pause()).await;
                }
            }
        }
    }

    fn live(&self) -> Option<Arc<ReadConn>> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|conn| !conn.client.is_closed())
            .cloned()
    }
}

impl ReadConn {
    async fn open(shared: &Shared) -> std::result::Result<ReadConn, tokio_postgres::Error> {
        let client = shared.connect().await?;
        let get = client
            .prepare(&format!(
                "SELECT {COLUMNS} FROM tasks WHERE id = $1 \
                 UNION ALL SELECT {COLUMNS} FROM tasks_done WHERE id = $1"
            ))
            .await?;
        let stats = client
            .prepare(
                "SELECT task_type, status, sum(count)::bigint AS count FROM task_counts \
                 GROUP BY task_type, status",
            )
            .await?;
        Ok(ReadConn {
            client,
            get,
            stats,
            lists: Mutex::new(HashMap::new()),
        })
    }

    async fn list_statement(
        &self,
        sql: &str,
    ) -> std::result::Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self
            .lists
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sql)
        {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        let mut lists = self.lists.lock().unwrap_or_else(|p| p.into_inner());
        if lists.len() >= 256 {
            lists.clear();
        }
        lists.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }
}

impl PostgresStore {
    /// Decides what a failed read does: once, when the connection broke, it is tried again on a
    /// new connection (`Ok`); otherwise it fails.
    fn read_failed(
        &self,
        action: &'static str,
        error: &tokio_postgres::Error,
        retried: &mut bool,
    ) -> Result<()> {
        let shared = &self.shared;
        if is_lost(error) && !*retried {
            *retried = true;
            let problem = shared.unreachable(action, error).to_string();
            shared.health.failing(Part::Reader, problem);
            Ok(())
        } else {
            Err(Error::store(action, describe(error)))
        }
    }

    async fn fetch(&self, id: TaskId) -> Result<Option<Task>> {
        let key = uuid(id);
        let mut retried = false;
        loop {
            let conn = self.shared.reader.get(&self.shared).await?;
            match conn.client.query_opt(&conn.get, &[&key]).await {
                Ok(row) => return row.map(|row| task_from_row(&row)).transpose(),
                Err(error) => self.read_failed("reading a task", &error, &mut retried)?,
            }
        }
    }

    async fn list_page(&self, filter: ListFilter, page: PageRequest) -> Result<Page> {
        let limit = page.clamped_limit();
        let upper = page
            .cursor
            .map_or(i64::MAX, |c| c.0.min(i64::MAX as u64) as i64);
        let mut values = writer::Values::default();
        let mut clauses = vec![format!("seq < {}", values.push(upper))];
        if !filter.statuses.is_empty() {
            clauses.push(common::status_in(&filter.statuses));
        }
        clauses.extend(common::field_clauses(&filter, &mut values));
        let limit_param = values.push(i64::try_from(limit + 1).unwrap_or(i64::MAX));
        // Both tables, newest first by `seq` (a finished task keeps its own): each by its
        // primary key, merged. One statement, one snapshot: a task that moves between them
        // meanwhile shows once.
        let clauses = clauses.join(" AND ");
        let sql = format!(
            "SELECT * FROM ((SELECT {COLUMNS}, seq FROM tasks WHERE {clauses} \
             ORDER BY seq DESC LIMIT {limit_param}) UNION ALL \
             (SELECT {COLUMNS}, seq FROM tasks_done WHERE {clauses} \
             ORDER BY seq DESC LIMIT {limit_param})) AS both_tables \
             ORDER BY seq DESC LIMIT {limit_param}"
        );
        let mut retried = false;
        let rows = loop {
            let conn = self.shared.reader.get(&self.shared).await?;
            let rows = match conn.list_statement(&sql).await {
                Ok(statement) => conn.client.query(&statement, &values.refs()).await,
                Err(error) => Err(error),
            };
            match rows {
                Ok(rows) => break rows,
                Err(error) => self.read_failed("listing tasks", &error, &mut retried)?,
            }
        };
        let mut tasks = Vec::with_capacity(rows.len());
        let mut last_seq = None;
        for row in rows.iter().take(limit) {
            tasks.push(task_from_row(row)?);
            last_seq = Some(rows::seq_of(row)?);
        }
        let next_cursor = if rows.len() > limit {
            last_seq.map(|seq| Cursor(seq as u64))
        } else {
            None
        };
        Ok(Page { tasks, next_cursor })
    }

    /// The nodes connected to this store's schema and the state of the database (see
    /// [`Store::cluster_status`], which answers this): two queries on the reading connection.
    /// A node is known by the advisory lock its listening connection holds, and named by that
    /// connection's `application_name` (`msbd <node_id>`): a node whose URL sets another
    /// `application_name`, or whose name is over 58 bytes or not printable ASCII, is not listed
    /// (this node always is, while its listening connection is open).
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        let config = &self.shared.config;
        let mut retried = false;
        let (nodes, database) = loop {
            let conn = self.shared.reader.get(&self.shared).await?;
            let read = async {
                let nodes = conn.list_statement(cluster::NODES).await?;
                let database = conn.list_statement(cluster::DATABASE).await?;
                let node_params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                    [&LOCK_CLASS, &config.schema, &config.node_id];
                let database_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] =
                    [&config.schema];
                // Pipelined: both go out before either answer is read.
                let (nodes, database) = tokio::join!(
                    conn.client.query(&nodes, &node_params),
                    conn.client.query_one(&database, &database_params),
                );
                Ok::<_, tokio_postgres::Error>((nodes?, database?))
            };
            match read.await {
                Ok(read) => break read,
                Err(error) => self.read_failed(cluster::ACTION, &error, &mut retried)?,
            }
        };
        Ok(ClusterStatus {
            node: config.node_id.clone(),
            nodes: cluster::nodes(&nodes, &config.node_id)?,
            database: cluster::database(&database)?,
        })
    }

    async fn count_timed_out(&self) -> Result<std::collections::BTreeMap<String, u64>> {
        // Finished tasks are in `tasks_done`, but for any a node of an older build left.
        let sql = format!(
            "SELECT task_type, sum(count)::int8 AS count FROM ({0} UNION ALL {1}) AS both_tables \
             GROUP BY task_type",
            common::timed_out_sql(),
            common::timed_out_sql().replacen("FROM tasks ", "FROM tasks_done ", 1)
        );
        let mut retried = false;
        let rows = loop {
            let conn = self.shared.reader.get(&self.shared).await?;
            match conn.client.query(&sql, &[]).await {
                Ok(rows) => break rows,
                Err(error) => self.read_failed("counting timed-out tasks", &error, &mut retried)?,
            }
        };
        let mut counts = std::collections::BTreeMap::new();
        for row in rows {
            let task_type: String = row
                .try_get("task_type")
                .map_err(|e| Error::store("counting timed-out tasks", e))?;
            let count: i64 = row
                .try_get("count")
                .map_err(|e| Error::store("counting timed-out tasks", e))?;
            counts.insert(task_type, u64::try_from(count).unwrap_or(0));
        }
        Ok(counts)
    }

    async fn counts(&self) -> Result<Stats> {
        let mut retried = false;
        let rows = loop {
            let conn = self.shared.reader.get(&self.shared).await?;
            match conn.client.query(&conn.stats, &[]).await {
                Ok(rows) => break rows,
                Err(error) => self.read_failed("counting tasks", &error, &mut retried)?,
            }
        };
        let mut stats = Stats::empty();
        for row in rows {
            let task_type: String = row
                .try_get("task_type")
                .map_err(|e| Error::store("counting tasks", e))?;
            let code: i16 = row
                .try_get("status")
                .map_err(|e| Error::store("counting tasks", e))?;
            let count: i64 = row
                .try_get("count")
                .map_err(|e| Error::store("counting tasks", e))?;
            if count != 0 {
                stats.add(&task_type, rows::status(code)?, count);
            }
        }
        Ok(stats)
    }
}

impl Store for PostgresStore {
    fn submit(&self, tasks: Vec<Task>) -> StoreFuture<'_, Vec<Submitted>> {
        self.write(Request::Submit(tasks), |answer| match answer {
            Answer::Submitted(submitted) => Some(submitted),
            _ => None,
        })
    }

    fn submit_and_claim(
        &self,
        tasks: Vec<Task>,
        request: ClaimRequest,
    ) -> StoreFuture<'_, (Vec<Submitted>, Vec<Task>)> {
        self.write(
            Request::SubmitAndClaim(tasks, request),
            |answer| match answer {
                Answer::SubmittedAndClaimed(submitted, claimed) => Some((submitted, claimed)),
                _ => None,
            },
        )
    }

    fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, Vec<Task>> {
        self.write(Request::Claim(request), |answer| match answer {
            Answer::Tasks(tasks) => Some(tasks),
            _ => None,
        })
    }

    fn promote_due(&self, now: Timestamp) -> StoreFuture<'_, Promoted> {
        self.write(Request::Promote(now), |answer| match answer {
            Answer::Promoted(promoted) => Some(promoted),
            _ => None,
        })
    }

    fn finish(&self, finish: Finish) -> StoreFuture<'_, bool> {
        self.write(Request::Finish(finish), |answer| match answer {
            Answer::Applied(applied) => Some(applied),
            _ => None,
        })
    }

    fn progress(&self, update: ProgressUpdate) -> StoreFuture<'_, bool> {
        self.write(Request::Progress(update), |answer| match answer {
            Answer::Applied(applied) => Some(applied),
            _ => None,
        })
    }

    fn heartbeat(&self, heartbeat: Heartbeat) -> StoreFuture<'_, HeartbeatReply> {
        self.write(Request::Heartbeat(heartbeat), |answer| match answer {
            Answer::Heartbeat(reply) => Some(reply),
            _ => None,
        })
    }

    fn command(&self, id: TaskId, command: Command, now: Timestamp) -> StoreFuture<'_, Task> {
        self.write(Request::Command(id, command, now), |answer| match answer {
            Answer::Task(task) => Some(*task),
            _ => None,
        })
    }

    fn release(&self, held: Vec<(TaskId, u32)>, now: Timestamp) -> StoreFuture<'_, usize> {
        self.write(Request::Release(held, now), |answer| match answer {
            Answer::Count(count) => Some(count),
            _ => None,
        })
    }

    fn recover(&self, now: Timestamp, which: Recover) -> StoreFuture<'_, Vec<Task>> {
        self.write(Request::Recover(now, which), |answer| match answer {
            Answer::Tasks(tasks) => Some(tasks),
            _ => None,
        })
    }

    fn prune(&self, before: Timestamp, limit: usize) -> StoreFuture<'_, usize> {
        self.write(Request::Prune(before, limit), |answer| match answer {
            Answer::Count(count) => Some(count),
            _ => None,
        })
    }

    fn delete_finished(
        &self,
        filter: ListFilter,
        finished_before: Timestamp,
        limit: usize,
    ) -> StoreFuture<'_, usize> {
        self.write(
            Request::DeleteFinished(filter, finished_before, limit),
            |answer| match answer {
                Answer::Count(count) => Some(count),
                _ => None,
            },
        )
    }

    fn reassign_owner(&self, from: &str, to: &str) -> StoreFuture<'_, u64> {
        self.write(
            Request::ReassignOwner(from.to_owned(), to.to_owned()),
            |answer| match answer {
                Answer::Moved(moved) => Some(moved),
                _ => None,
            },
        )
    }

    fn get(&self, id: TaskId) -> StoreFuture<'_, Option<Task>> {
        Box::pin(self.fetch(id))
    }

    fn list(&self, filter: ListFilter, page: PageRequest) -> StoreFuture<'_, Page> {
        Box::pin(self.list_page(filter, page))
    }

    fn stats(&self) -> StoreFuture<'_, Stats> {
        Box::pin(self.counts())
    }

    fn timed_out(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, u64>> {
        Box::pin(self.count_timed_out())
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.write(Request::Flush, |answer| match answer {
            Answer::Done => Some(()),
            _ => None,
        })
    }

    fn health(&self) -> StoreHealth {
        self.shared.health.get()
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn engine_config(&self, config: EngineConfig) -> EngineConfig {
        PostgresStore::engine_config(config)
    }

    fn is_maintenance_leader(&self) -> bool {
        PostgresStore::is_maintenance_leader(self)
    }

    fn healthy_for(&self) -> Option<Duration> {
        PostgresStore::healthy_for(self)
    }

    fn cluster_status(&self) -> StoreFuture<'_, Option<ClusterStatus>> {
        Box::pin(async { PostgresStore::cluster_status(self).await.map(Some) })
    }

    fn wakeups(self: Arc<Self>) -> Option<WakeupLoop> {
        Some(Arc::new(
            move |engine: Engine, cancel: CancellationToken| {
                let store = self.clone();
                Box::pin(async move { store.run_wakeups(&engine, cancel).await })
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked_and_quoted() {
        assert!(check_identifier("schema", "msbd").is_ok());
        assert!(check_identifier("schema", "t_01ab").is_ok());
        assert!(check_identifier("schema", "1abc").is_err());
        assert!(check_identifier("schema", "a-b").is_err());
        assert!(check_identifier("schema", "").is_err());
        assert!(check_identifier("schema", "a\"b").is_err());
        assert_eq!(quoted("msbd"), "\"msbd\"");
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling_with_jitter() {
        let mut config = PostgresConfig::new("postgres://localhost/test", "n");
        config.reconnect_min = Duration::from_millis(100);
        config.reconnect_max = Duration::from_millis(400);
        let mut backoff = Backoff::new(&config);
        let pauses: Vec<u128> = (0..5).map(|_| backoff.pause().as_millis()).collect();
        assert!((50..=100).contains(&pauses[0]), "{pauses:?}");
        assert!((100..=200).contains(&pauses[1]), "{pauses:?}");
        assert!(
            pauses[2..].iter().all(|p| (200..=400).contains(p)),
            "{pauses:?}"
        );
        backoff.reset();
        assert!(backoff.pause().as_millis() <= 100);
    }
}
