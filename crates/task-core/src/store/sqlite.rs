//! The embedded durable store: one SQLite file in WAL mode, written by a single writer thread
//! that commits in groups.
//!
//! # How it goes fast
//! Every write request goes over a channel to one writer thread that owns the write connection.
//! The writer takes whatever requests are waiting (up to [`SqliteConfig::max_batch`]), runs them
//! all in one `BEGIN IMMEDIATE … COMMIT`, and only then answers each of them. So a busy engine pays
//! for one commit per batch, not per state change, and no caller is told "done" before its change
//! is committed. Reads go to a second connection on a reader thread, and WAL checkpoints to a
//! third on a thread of its own, so the writer never stops for a checkpoint's fsyncs. Beyond
//! that, what measurably mattered on a 2-core VM:
//! - hot queries use partial indexes pinned with `INDEXED BY` (a planner that picks the wrong
//!   index sorts the whole queue on every claim), and there is no index that only one rare query
//!   uses (the lease reaper scans the few running entries of the status index);
//! - claims and finishes read the row, then update it by rowid: `UPDATE … RETURNING` costs an
//!   ephemeral table per statement, which measured as half the cost of a claim;
//! - counts by type and status live in a small table updated once per commit, not in an index
//!   updated on every change, so opening a store of a million tasks scans nothing;
//! - connections use SQLite's `unix-excl` VFS: the process locks the file once and keeps the WAL
//!   index in its own memory, so transactions make no `fcntl` calls (`strace -c` counted about 9
//!   per request before);
//! - a submission to an idle engine claims in the same transaction (one commit before the task
//!   starts, not two), and the writer looks for the next request briefly before it sleeps.
//!
//! # Durability
//! With [`Synchronous::Normal`] (the default) SQLite does not fsync the WAL at each commit: every
//! acknowledged change survives a crash of the process (a panic, `SIGKILL`, the OOM killer),
//! because the committed WAL frames are already in the operating system's cache; a crash of the
//! operating system or a power loss may lose the last transactions before the next checkpoint.
//! [`Synchronous::Full`] fsyncs the WAL at each commit, one fsync per group, and survives power
//! loss as well, at some cost in throughput. msbd uses `Normal` by default because its failure
//! model is the daemon dying, and because group commit would make `Full` cost one fsync per batch
//! anyway; operators who need power-loss durability choose `Full`.
//!
//! # Exclusive ownership
//! One process owns a store file at a time: opening takes an advisory lock on `<file>-lock`, and a
//! second open fails with a clear error; the `unix-excl` VFS also keeps other processes (a
//! `sqlite3` shell, say) out of the file while it is open. Because of that, every task found
//! `running` when the store opens belongs to a process that is gone; the engine recovers them at
//! once.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, Row, params};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::model::{
    AttemptRecord, FailureKind, MAX_ATTEMPT_RECORDS, Priority, RetryPolicy, Status, Task,
    TaskError, TaskId, Timestamp,
};
use crate::state::{Event, decide};
use crate::store::{
    ClaimRequest, Command, Cursor, Finish, Heartbeat, HeartbeatReply, ListFilter, Outcome, Page,
    PageRequest, ProgressUpdate, Promoted, Recover, Stats, Store, StoreFuture, StoreHealth,
    StoreStatus, Submitted, apply,
};

/// How hard SQLite works to make each commit durable. See the module docs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Synchronous {
    /// Survives a crash of the process; may lose the last commits on power loss.
    #[default]
    Normal,
    /// Survives power loss too: one fsync per group commit.
    Full,
}

/// How to open a [`SqliteStore`].
#[derive(Clone, Debug)]
pub struct SqliteConfig {
    /// The database file. Its directory must exist.
    pub path: PathBuf,
    /// The durability of a commit.
    pub synchronous: Synchronous,
    /// The page cache of the writer connection, in KiB.
    pub cache_kib: u32,
    /// The most requests committed in one transaction.
    pub max_batch: usize,
}

impl SqliteConfig {
    /// The defaults for a file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> SqliteConfig {
        SqliteConfig {
            path: path.into(),
            synchronous: Synchronous::Normal,
            cache_kib: 32 * 1024,
            max_batch: 1_024,
        }
    }
}

/// The SQLite task store. See the module docs.
pub struct SqliteStore {
    // `None` only while the store is dropped.
    writer: Option<mpsc::Sender<WriteOp>>,
    reader: Option<mpsc::Sender<ReadOp>>,
    /// A connection for point reads on the caller's thread (see [`SqliteStore::get`]).
    inline_reader: Mutex<Connection>,
    checkpointer: Option<mpsc::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<Mutex<Stats>>,
    health: Arc<HealthCell>,
    path: PathBuf,
    _lock: File,
}

/// The schema, one migration per entry; `PRAGMA user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    task_type TEXT NOT NULL,
    params TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    max_attempts INTEGER NOT NULL,
    retry_base_ms INTEGER NOT NULL,
    retry_max_ms INTEGER NOT NULL,
    timeout_ms INTEGER,
    run_at INTEGER,
    idempotency_key TEXT,
    owner TEXT,
    session_id TEXT,
    progress REAL,
    progress_message TEXT,
    result TEXT,
    error_kind INTEGER,
    error_message TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    updated_at INTEGER NOT NULL,
    finished_at INTEGER,
    tags TEXT,
    lease_until INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tasks_queued ON tasks (priority DESC, seq) WHERE status = 0;
CREATE INDEX tasks_scheduled ON tasks (run_at) WHERE status = 1;
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE status >= 4;
CREATE INDEX tasks_by_status ON tasks (status, seq);
CREATE TABLE task_counts (
    task_type TEXT NOT NULL,
    status INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (task_type, status)
) WITHOUT ROWID;
CREATE UNIQUE INDEX tasks_idempotency ON tasks (coalesce(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"#,
    r#"
ALTER TABLE tasks ADD COLUMN interrupted_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN rerun_on_recovery INTEGER NOT NULL DEFAULT 1;
"#,
    // How each attempt ended (`Task::attempts`): a JSON array of {n, started_at, ended_at,
    // outcome}, appended to by the statement that records an attempt's end. Existing tasks
    // start with an empty history.
    r#"
ALTER TABLE tasks ADD COLUMN attempts TEXT NOT NULL DEFAULT '[]';
"#,
];

/// The columns of a task, in the order [`task_from_row`] reads them.
const COLUMNS: &str = "id, task_type, params, priority, status, attempt, max_attempts, \
    retry_base_ms, retry_max_ms, timeout_ms, run_at, idempotency_key, owner, session_id, \
    progress, progress_message, result, error_kind, error_message, created_at, started_at, \
    updated_at, finished_at, tags, lease_until, cancel_requested, interrupted_attempts, \
    rerun_on_recovery, attempts";

/// The index of `seq` in a row that has it after [`COLUMNS`].
const SEQ: usize = 29;

/// Ends an attempt. It also appends the attempt's entry to the `attempts` column, trimmed to
/// the last [`MAX_ATTEMPT_RECORDS`] (20): `?8` is when it ended, `?10` its outcome's name. (The
/// attempt started at `started_at`: a running task has one.)
const FINISH: &str = "UPDATE OR FAIL tasks SET status = ?2, result = coalesce(?3, result), \
    progress = CASE WHEN ?2 = 4 THEN 1.0 WHEN ?2 IN (0, 1) THEN NULL ELSE progress END, \
    progress_message = CASE WHEN ?2 IN (0, 1) THEN NULL ELSE progress_message END, \
    error_kind = coalesce(?4, error_kind), error_message = coalesce(?5, error_message), \
    run_at = ?6, finished_at = ?7, updated_at = ?8, \
    interrupted_attempts = interrupted_attempts + ?9, \
    attempts = json_insert(CASE WHEN json_array_length(attempts) >= 20 \
    THEN json_remove(attempts, '$[0]') ELSE attempts END, '$[#]', json_object('n', attempt, \
    'started_at', coalesce(started_at, ?8), 'ended_at', ?8, 'outcome', ?10)), \
    lease_until = NULL, cancel_requested = 0 WHERE seq = ?1";
const _: () = assert!(MAX_ATTEMPT_RECORDS == 20, "FINISH trims to 20 entries");

impl SqliteStore {
    /// Opens (creating if needed) the store file, runs pending migrations, and starts the writer
    /// and reader threads.
    pub fn open(config: SqliteConfig) -> Result<SqliteStore> {
        let path = config.path.clone();
        SqliteStore::open_inner(config).map_err(|error| with_hint(error, &path))
    }

    fn open_inner(config: SqliteConfig) -> Result<SqliteStore> {
        let lock_path = lock_path(&config.path);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                Error::store(
                    "opening the lock file",
                    format!("{}: {e}", lock_path.display()),
                )
            })?;
        take_lock(&lock).map_err(|error| Error::Store {
            action: "opening the database",
            message: match error {
                std::fs::TryLockError::WouldBlock => format!(
                    "{} is in use by another process (its lock {} is held); stop the other msbd or give this one another data directory",
                    config.path.display(),
                    lock_path.display()
                ),
                std::fs::TryLockError::Error(error) => {
                    format!("locking {} failed: {error}", lock_path.display())
                }
            },
        })?;

        let mut writer = open_connection(&config.path)?;
        configure(&writer, &config, false)?;
        migrate(&mut writer)?;
        // Tasks hold whatever clients send: readable by this user only (SQLite gives the WAL
        // and shared-memory files the database's mode).
        for suffix in ["", "-wal", "-shm"] {
            let mut name = config.path.as_os_str().to_owned();
            name.push(suffix);
            let path = std::path::PathBuf::from(name);
            if path.exists() {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(
                    |e| {
                        Error::store(
                            "restricting the database file",
                            format!("{}: {e}", path.display()),
                        )
                    },
                )?;
            }
        }
        let stats = load_stats(&writer)?;
        let reader = open_connection(&config.path)?;
        configure(&reader, &config, true)?;
        let checkpoints = open_connection(&config.path)?;
        configure(&checkpoints, &config, true)?;
        let inline_reader = open_connection(&config.path)?;
        configure(&inline_reader, &config, true)?;

        let stats = Arc::new(Mutex::new(stats));
        let health = Arc::new(HealthCell::default());
        let identity = file_identity(&config.path);
        let (write_tx, write_rx) = mpsc::channel();
        let (read_tx, read_rx) = mpsc::channel();
        let writer_stats = Arc::clone(&stats);
        let max_batch = config.max_batch.max(1);
        let writer_health = Arc::clone(&health);
        let writer_path = config.path.clone();
        let writer_thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                Writer {
                    conn: writer,
                    stats: writer_stats,
                    max_batch,
                    health: writer_health,
                    path: writer_path,
                    frozen: None,
                    restored_lock: None,
                }
                .run(write_rx)
            })
            .map_err(|e| Error::store("starting the writer thread", e))?;
        let reader_thread = std::thread::Builder::new()
            .name("sqlite-reader".into())
            .spawn(move || run_reader(reader, read_rx))
            .map_err(|e| Error::store("starting the reader thread", e))?;
        let (checkpoint_tx, checkpoint_rx) = mpsc::channel();
        let watch = Watch {
            path: config.path.clone(),
            identity,
            health: Arc::clone(&health),
            writer: write_tx.clone(),
        };
        let checkpoint_thread = std::thread::Builder::new()
            .name("sqlite-checkpointer".into())
            .spawn(move || run_checkpointer(checkpoints, checkpoint_rx, watch))
            .map_err(|e| Error::store("starting the checkpoint thread", e))?;
        Ok(SqliteStore {
            writer: Some(write_tx),
            reader: Some(read_tx),
            inline_reader: Mutex::new(inline_reader),
            checkpointer: Some(checkpoint_tx),
            threads: vec![writer_thread, reader_thread, checkpoint_thread],
            stats,
            health,
            path: config.path,
            _lock: lock,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> WriteOp,
    ) -> StoreFuture<'_, T> {
        let (tx, rx) = oneshot::channel();
        let sent = match &self.writer {
            Some(sender) => sender.send(make(tx)).is_ok(),
            None => false,
        };
        Box::pin(async move {
            if !sent {
                return Err(closed());
            }
            rx.await.unwrap_or_else(|_| Err(closed()))
        })
    }

    fn read<T: Send + 'static>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> ReadOp,
    ) -> StoreFuture<'_, T> {
        let (tx, rx) = oneshot::channel();
        let sent = match &self.reader {
            Some(sender) => sender.send(make(tx)).is_ok(),
            None => false,
        };
        Box::pin(async move {
            if !sent {
                return Err(closed());
            }
            rx.await.unwrap_or_else(|_| Err(closed()))
        })
    }
}

impl SqliteStore {
    /// See [`Store::health`].
    fn current_health(&self) -> StoreHealth {
        self.health.get()
    }
}

impl Drop for SqliteStore {
    /// Stops the threads after every accepted write is committed, and closes the file.
    fn drop(&mut self) {
        self.writer.take();
        self.reader.take();
        self.checkpointer.take();
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn closed() -> Error {
    Error::Store {
        action: "sending a request",
        message: "the store is closed (or its thread stopped after an error; see the log)".into(),
    }
}

/// Opens a connection through SQLite's `unix-excl` VFS: the process takes an exclusive lock on
/// the file once and keeps the WAL index in its own memory, so that transactions take no file
/// locks (a store file belongs to one process anyway; see the module docs). Other connections of
/// this process (reader, checkpointer) share that memory.
fn open_connection(path: &Path) -> Result<Connection> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    Connection::open_with_flags_and_vfs(path, flags, c"unix-excl")
        .map_err(|e| Error::store("opening the database", format!("{}: {e}", path.display())))
}

/// How long opening waits for a lock held by someone else. A lock can outlive its store for a
/// moment: a process forked at the instant the store closed holds a copy of the lock until it
/// executes its program.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Takes the store's lock, waiting up to [`LOCK_WAIT`] while another holder has it.
fn take_lock(lock: &File) -> std::result::Result<(), std::fs::TryLockError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match lock.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push("-lock");
    path.with_file_name(name)
}

fn configure(conn: &Connection, config: &SqliteConfig, reader: bool) -> Result<()> {
    let synchronous = match config.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    let cache = if reader {
        config.cache_kib / 4
    } else {
        config.cache_kib
    };
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| Error::store("configuring", e))?;
    conn.set_prepared_statement_cache_capacity(64);
    let journal: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(|e| Error::store("turning on the WAL", e))?;
    if !journal.eq_ignore_ascii_case("wal") {
        return Err(Error::store(
            "turning on the WAL",
            format!("journal mode is {journal}"),
        ));
    }
    // The checkpointer thread keeps the WAL short; the writer's own checkpoint is a safety net
    // for when the checkpointer falls behind (about 40 MiB of WAL).
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {synchronous}; PRAGMA cache_size = -{cache}; PRAGMA temp_store = MEMORY; \
         PRAGMA wal_autocheckpoint = 10000;"
    ))
    .map_err(|e| Error::store("configuring", e))?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(|e| Error::store("reading the schema version", e))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(Error::Store {
            action: "opening the database",
            message: format!(
                "the file has schema version {version}, newer than this build knows ({}); run a newer msbd",
                MIGRATIONS.len()
            ),
        });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn
            .transaction()
            .map_err(|e| Error::store("migrating", e))?;
        tx.execute_batch(migration)
            .map_err(|e| Error::store("migrating", e))?;
        tx.pragma_update(None, "user_version", (index + 1) as i64)
            .map_err(|e| Error::store("migrating", e))?;
        tx.commit().map_err(|e| Error::store("migrating", e))?;
    }
    Ok(())
}

fn load_stats(conn: &Connection) -> Result<Stats> {
    let mut stats = Stats::empty();
    let mut statement = conn
        .prepare("SELECT task_type, status, count FROM task_counts")
        .map_err(|e| Error::store("counting tasks", e))?;
    let rows = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, u8>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .map_err(|e| Error::store("counting tasks", e))?;
    for row in rows {
        let (task_type, code, count) = row.map_err(|e| Error::store("counting tasks", e))?;
        let status = Status::from_code(code)
            .ok_or_else(|| Error::store("counting tasks", format!("unknown status code {code}")))?;
        stats.add(&task_type, status, count);
    }
    Ok(stats)
}

fn task_from_row(row: &Row<'_>) -> rusqlite::Result<Task> {
    fn bad(index: usize, message: String) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Integer,
            message.into(),
        )
    }
    let id: [u8; 16] = row.get(0)?;
    let params: String = row.get(2)?;
    let priority: u8 = row.get(3)?;
    let status: u8 = row.get(4)?;
    let result: Option<String> = row.get(16)?;
    let error_kind: Option<u8> = row.get(17)?;
    let tags: Option<String> = row.get(23)?;
    let error = match error_kind {
        Some(code) => Some(TaskError {
            kind: FailureKind::from_code(code)
                .ok_or_else(|| bad(17, format!("failure kind {code}")))?,
            message: row.get::<_, Option<String>>(18)?.unwrap_or_default(),
        }),
        None => None,
    };
    Ok(Task {
        id: TaskId::from_bytes(id),
        task_type: row.get(1)?,
        params: serde_json::from_str(&params).map_err(|e| bad(2, e.to_string()))?,
        priority: Priority::new(priority).ok_or_else(|| bad(3, format!("priority {priority}")))?,
        status: Status::from_code(status).ok_or_else(|| bad(4, format!("status {status}")))?,
        attempt: row.get(5)?,
        max_attempts: row.get(6)?,
        retry: RetryPolicy {
            base_delay_ms: row.get::<_, i64>(7)?.max(0) as u64,
            max_delay_ms: row.get::<_, i64>(8)?.max(0) as u64,
        },
        timeout: row
            .get::<_, Option<i64>>(9)?
            .map(|ms| Duration::from_millis(ms.max(0) as u64)),
        run_at: row.get::<_, Option<i64>>(10)?.map(Timestamp),
        idempotency_key: row.get(11)?,
        owner: row.get(12)?,
        session_id: row.get(13)?,
        progress: row.get(14)?,
        progress_message: row.get(15)?,
        result: match result {
            Some(text) => Some(serde_json::from_str(&text).map_err(|e| bad(16, e.to_string()))?),
            None => None,
        },
        error,
        created_at: Timestamp(row.get(19)?),
        started_at: row.get::<_, Option<i64>>(20)?.map(Timestamp),
        updated_at: Timestamp(row.get(21)?),
        finished_at: row.get::<_, Option<i64>>(22)?.map(Timestamp),
        tags: match tags {
            Some(text) => serde_json::from_str(&text).map_err(|e| bad(23, e.to_string()))?,
            None => Vec::new(),
        },
        lease_until: row.get::<_, Option<i64>>(24)?.map(Timestamp),
        cancel_requested: row.get(25)?,
        interrupted_attempts: row.get(26)?,
        rerun_on_recovery: row.get(27)?,
        attempts: serde_json::from_str(&row.get::<_, String>(28)?)
            .map_err(|e| bad(28, e.to_string()))?,
    })
}

/// A task's attempt history as the `attempts` column keeps it.
fn attempts_text(attempts: &[AttemptRecord]) -> String {
    // Serializing records of numbers and names cannot fail.
    serde_json::to_string(attempts).unwrap_or_else(|_| "[]".into())
}

fn json_text(value: &Value) -> String {
    // Serializing a `Value` cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

fn tags_text(tags: &[String]) -> Option<String> {
    if tags.is_empty() {
        None
    } else {
        serde_json::to_string(tags).ok()
    }
}

fn millis(duration: Option<Duration>) -> Option<i64> {
    duration.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

type Reply<T> = oneshot::Sender<Result<T>>;

enum WriteOp {
    Submit(Vec<Task>, Reply<Vec<Submitted>>),
    SubmitAndClaim(Vec<Task>, ClaimRequest, Reply<(Vec<Submitted>, Vec<Task>)>),
    Claim(ClaimRequest, Reply<Vec<Task>>),
    Promote(Timestamp, Reply<Promoted>),
    Finish(Finish, Reply<bool>),
    Progress(ProgressUpdate, Reply<bool>),
    Heartbeat(Heartbeat, Reply<HeartbeatReply>),
    Command(TaskId, Command, Timestamp, Reply<Task>),
    Recover(Timestamp, Recover, Reply<Vec<Task>>),
    Prune(Timestamp, usize, Reply<usize>),
    DeleteFinished(ListFilter, Timestamp, usize, Reply<usize>),
    Flush(Reply<()>),
    /// The store file was deleted or replaced under the open store: copy what the open
    /// database holds back to its path and refuse writes from then on (see [`Writer::restore`]).
    Restore,
}

enum ReadOp {
    Get(TaskId, Reply<Option<Task>>),
    List(ListFilter, PageRequest, Reply<Page>),
    TimedOut(Reply<BTreeMap<String, u64>>),
}

/// An answer held until the transaction commits.
type PendingReply = Box<dyn FnOnce(Option<&Error>) + Send>;

fn pending<T: Send + 'static>(reply: Reply<T>, result: Result<T>) -> PendingReply {
    Box::new(move |commit_error| {
        let answer = match commit_error {
            Some(error) => Err(error.clone()),
            None => result,
        };
        let _ = reply.send(answer);
    })
}

/// A change of the counts, applied once its transaction commits.
struct CountChange {
    task_type: String,
    from: Option<Status>,
    to: Option<Status>,
}

/// The net change of each (type, status) count in a batch; zero changes left out.
fn net_counts(changes: &[CountChange]) -> BTreeMap<(&str, Status), i64> {
    let mut net: BTreeMap<(&str, Status), i64> = BTreeMap::new();
    for change in changes {
        if let Some(from) = change.from {
            *net.entry((change.task_type.as_str(), from)).or_insert(0) -= 1;
        }
        if let Some(to) = change.to {
            *net.entry((change.task_type.as_str(), to)).or_insert(0) += 1;
        }
    }
    net.retain(|_, delta| *delta != 0);
    net
}

struct Writer {
    conn: Connection,
    stats: Arc<Mutex<Stats>>,
    max_batch: usize,
    health: Arc<HealthCell>,
    path: PathBuf,
    /// Set once the file was deleted under the store: why every write is refused.
    frozen: Option<Error>,
    /// The lock on the restored copy, held until the store closes.
    restored_lock: Option<File>,
}

impl Writer {
    fn run(mut self, requests: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = next_request(&requests) {
            if matches!(first, WriteOp::Restore) {
                self.restore();
                continue;
            }
            batch.push(first);
            while batch.len() < self.max_batch {
                match requests.try_recv() {
                    Ok(WriteOp::Restore) => {
                        self.commit_batch(&mut batch);
                        self.restore();
                    }
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if let Some(error) = &self.frozen {
                for op in batch.drain(..) {
                    fail_op(op, error);
                }
                continue;
            }
            self.commit_batch(&mut batch);
        }
        if self.frozen.is_some() {
            return;
        }
        let _ = self
            .conn
            .execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);");
    }

    fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let mut replies: Vec<PendingReply> = Vec::with_capacity(batch.len());
        let mut counts = Vec::new();
        if batch.is_empty() {
            return;
        }
        if let Err(error) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let error = with_hint(Error::store("starting a transaction", error), &self.path);
            self.health.degraded(&error);
            for op in batch.drain(..) {
                fail_op(op, &error);
            }
            return;
        }
        let mut broken = None;
        for op in batch.drain(..) {
            if broken.is_some() {
                fail_op(op, broken.as_ref().unwrap_or(&closed()));
                continue;
            }
            replies.push(self.execute(op, &mut counts));
            if self.conn.is_autocommit() {
                // SQLite rolled the transaction back (a full disk, an I/O error): nothing in it
                // holds, so every request of the batch fails.
                broken = Some(Error::store(
                    "writing",
                    format!(
                        "the transaction was rolled back by SQLite: is the disk holding {} full or failing? msbd keeps answering reads and tries writes again as they come",
                        self.path.display()
                    ),
                ));
            }
        }
        let net = net_counts(&counts);
        let outcome = match broken {
            Some(error) => Err(error),
            None => self.write_counts(&net).and_then(|()| {
                self.conn
                    .execute_batch("COMMIT")
                    .map_err(|e| with_hint(Error::store("committing", e), &self.path))
            }),
        };
        match outcome {
            Ok(()) => {
                self.health.written();
                let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                for ((task_type, status), delta) in net {
                    stats.add(task_type, status, delta);
                }
                drop(stats);
                for reply in replies {
                    reply(None);
                }
            }
            Err(error) => {
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                if self.health.degraded(&error) {
                    tracing::error!(%error, "a group commit failed; its requests were refused (logged again only once writes have worked in between)");
                }
                for reply in replies {
                    reply(Some(&error));
                }
            }
        }
    }

    /// The store file was deleted (or replaced) while open. Everything committed is still in
    /// the open database, but it would be gone once msbd exits: write a copy of it back to the
    /// path (recreating the directory; beside the path if another file took it), lock the copy
    /// like a freshly opened store, and refuse every write from now on so that the copy stays
    /// complete. A restart opens the copy and recovers the tasks that were running.
    fn restore(&mut self) {
        if self.frozen.is_some() {
            return;
        }
        let target = if self.path.exists() {
            let mut name = self.path.as_os_str().to_owned();
            name.push(format!(".restored-{}", Timestamp::now().as_millis()));
            PathBuf::from(name)
        } else {
            self.path.clone()
        };
        let copied = (|| -> std::result::Result<(), String> {
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            self.conn
                .execute("VACUUM INTO ?1", [target.to_string_lossy()])
                .map_err(|e| format!("copying the open database to {}: {e}", target.display()))?;
            if target == self.path {
                let lock = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(lock_path(&target))
                    .map_err(|e| format!("recreating the lock file: {e}"))?;
                if lock.try_lock().is_ok() {
                    self.restored_lock = Some(lock);
                }
            }
            Ok(())
        })();
        let problem = match copied {
            Ok(()) => format!(
                "the task store file {} was deleted or replaced while msbd was running; msbd wrote everything it holds to {} and refuses new writes so that the copy stays complete: restart msbd to go on (it opens the copy{} and recovers the tasks that were running)",
                self.path.display(),
                target.display(),
                if target == self.path {
                    ""
                } else {
                    " once you move it to the store's path"
                },
            ),
            Err(error) => format!(
                "the task store file {} was deleted or replaced while msbd was running, and copying what msbd holds back failed ({error}): keep msbd running, free the path or fix the directory, and restart msbd only after a copy exists; until then new writes are refused",
                self.path.display(),
            ),
        };
        tracing::error!("{problem}");
        self.health.unhealthy(problem.clone());
        self.frozen = Some(Error::Store {
            action: "writing",
            message: problem,
        });
    }

    /// Adds the batch's net changes to the persistent counts, in its transaction.
    fn write_counts(&mut self, net: &BTreeMap<(&str, Status), i64>) -> Result<()> {
        let mut emptied = false;
        for ((task_type, status), delta) in net {
            self.conn
                .prepare_cached(
                    "INSERT INTO task_counts (task_type, status, count) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (task_type, status) DO UPDATE SET count = count + excluded.count",
                )
                .and_then(|mut s| s.execute(params![task_type, status.code(), delta]))
                .map_err(|e| Error::store("updating the task counts", e))?;
            emptied |= *delta < 0;
        }
        if emptied {
            self.conn
                .prepare_cached("DELETE FROM task_counts WHERE count <= 0")
                .and_then(|mut s| s.execute([]))
                .map_err(|e| Error::store("updating the task counts", e))?;
        }
        Ok(())
    }

    fn execute(&mut self, op: WriteOp, counts: &mut Vec<CountChange>) -> PendingReply {
        match op {
            WriteOp::Submit(tasks, reply) => {
                let answer = self.atomically(counts, |w, counts| w.submit(tasks, counts));
                pending(reply, answer)
            }
            WriteOp::SubmitAndClaim(tasks, request, reply) => {
                let answer = self.atomically(counts, |w, counts| {
                    let submitted = w.submit(tasks, counts)?;
                    Ok((submitted, w.claim(&request, counts)?))
                });
                pending(reply, answer)
            }
            WriteOp::Claim(request, reply) => {
                let answer = self.atomically(counts, |w, counts| w.claim(&request, counts));
                pending(reply, answer)
            }
            WriteOp::Recover(now, which, reply) => {
                let answer = self.atomically(counts, |w, counts| w.recover(now, which, counts));
                pending(reply, answer)
            }
            // The others write with at most one statement, which SQLite applies whole or not
            // at all (a heartbeat's renewals are independent of each other).
            WriteOp::Promote(now, reply) => pending(reply, self.promote(now, counts)),
            WriteOp::Finish(finish, reply) => pending(reply, self.finish(&finish, counts)),
            WriteOp::Progress(update, reply) => pending(reply, self.progress(update)),
            WriteOp::Heartbeat(heartbeat, reply) => pending(reply, self.heartbeat(&heartbeat)),
            WriteOp::Command(id, command, now, reply) => {
                pending(reply, self.command(id, command, now, counts))
            }
            WriteOp::Prune(before, limit, reply) => {
                pending(reply, self.prune(before, limit, counts))
            }
            WriteOp::DeleteFinished(filter, before, limit, reply) => {
                pending(reply, self.delete_finished(&filter, before, limit, counts))
            }
            WriteOp::Flush(reply) => pending(reply, Ok(())),
            // Handled by `run` before a batch forms; never part of one.
            WriteOp::Restore => Box::new(|_| {}),
        }
    }

    /// Runs a request of several statements inside a savepoint, so that a request that fails
    /// leaves nothing behind in the group's transaction (and no count changes).
    fn atomically<T>(
        &mut self,
        counts: &mut Vec<CountChange>,
        request: impl FnOnce(&mut Self, &mut Vec<CountChange>) -> Result<T>,
    ) -> Result<T> {
        self.conn
            .execute_batch("SAVEPOINT request")
            .map_err(|e| Error::store("starting a savepoint", e))?;
        let mark = counts.len();
        let result = request(self, counts);
        let end = match &result {
            Ok(_) => "RELEASE request",
            Err(_) => {
                counts.truncate(mark);
                "ROLLBACK TO request; RELEASE request"
            }
        };
        match self.conn.execute_batch(end) {
            Ok(()) => result,
            Err(error) => {
                counts.truncate(mark);
                Err(Error::store("ending a savepoint", error))
            }
        }
    }

    fn submit(
        &mut self,
        tasks: Vec<Task>,
        counts: &mut Vec<CountChange>,
    ) -> Result<Vec<Submitted>> {
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            if let Some(key) = &task.idempotency_key {
                let existing = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM tasks WHERE coalesce(owner, '') = coalesce(?1, '') AND idempotency_key = ?2"
                    ))
                    .and_then(|mut s| s.query_row(params![task.owner, key], task_from_row).optional())
                    .map_err(|e| Error::store("looking up an idempotency key", e))?;
                if let Some(existing) = existing {
                    out.push(Submitted {
                        task: existing,
                        created: false,
                    });
                    continue;
                }
            }
            self.conn
                .prepare_cached(
                    "INSERT OR FAIL INTO tasks (id, task_type, params, priority, status, attempt, max_attempts, \
                     retry_base_ms, retry_max_ms, timeout_ms, run_at, idempotency_key, owner, session_id, \
                     created_at, updated_at, tags, interrupted_attempts, rerun_on_recovery) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        &task.id.as_bytes()[..],
                        task.task_type,
                        json_text(&task.params),
                        task.priority.get(),
                        task.status.code(),
                        task.attempt,
                        task.max_attempts,
                        i64::try_from(task.retry.base_delay_ms).unwrap_or(i64::MAX),
                        i64::try_from(task.retry.max_delay_ms).unwrap_or(i64::MAX),
                        millis(task.timeout),
                        task.run_at.map(|t| t.0),
                        task.idempotency_key,
                        task.owner,
                        task.session_id,
                        task.created_at.0,
                        task.updated_at.0,
                        tags_text(&task.tags),
                        task.interrupted_attempts,
                        task.rerun_on_recovery,
                    ])
                })
                .map_err(|e| Error::store("inserting a task", e))?;
            counts.push(CountChange {
                task_type: task.task_type.clone(),
                from: None,
                to: Some(task.status),
            });
            out.push(Submitted {
                task,
                created: true,
            });
        }
        Ok(out)
    }

    /// Claims in queue order, honouring per-type room: reads the head of the queue, then marks
    /// each task it takes (no `UPDATE … RETURNING`, which costs SQLite an ephemeral table per
    /// statement). When a type runs out of room, it asks again without that type.
    fn claim(
        &mut self,
        request: &ClaimRequest,
        counts: &mut Vec<CountChange>,
    ) -> Result<Vec<Task>> {
        let mut claimed = Vec::new();
        let mut excluded: Vec<String> = request.exclude_types.clone();
        let mut taken_by_type: Vec<(String, usize)> = Vec::new();
        while claimed.len() < request.max {
            let candidates = self.queue_head(&excluded, request.max - claimed.len())?;
            if candidates.is_empty() {
                break;
            }
            let mut type_full = false;
            for (seq, mut task) in candidates {
                if let Some(room) = request.room_for(&task.task_type) {
                    let taken = match taken_by_type.iter_mut().find(|(t, _)| *t == task.task_type) {
                        Some((_, taken)) => taken,
                        None => {
                            taken_by_type.push((task.task_type.clone(), 0));
                            &mut taken_by_type.last_mut().expect("just pushed").1
                        }
                    };
                    if *taken >= room {
                        // The queue order continues past this type: ask again without it.
                        excluded.push(task.task_type);
                        type_full = true;
                        break;
                    }
                    *taken += 1;
                }
                let before = task.status;
                apply::claim(&mut task, request.now, request.lease_until)?;
                self.conn
                    .prepare_cached(
                        "UPDATE OR FAIL tasks SET status = ?2, attempt = ?3, started_at = ?4, updated_at = ?5, \
                         lease_until = ?6, run_at = NULL, progress = NULL, progress_message = NULL WHERE seq = ?1",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            seq,
                            task.status.code(),
                            task.attempt,
                            task.started_at.map(|t| t.0),
                            task.updated_at.0,
                            task.lease_until.map(|t| t.0),
                        ])
                    })
                    .map_err(|e| Error::store("claiming a task", e))?;
                counts.push(CountChange {
                    task_type: task.task_type.clone(),
                    from: Some(before),
                    to: Some(task.status),
                });
                claimed.push(task);
            }
            if !type_full {
                break;
            }
        }
        Ok(claimed)
    }

    /// The first `limit` queued tasks of the types not excluded, in claim order, with their `seq`.
    fn queue_head(&mut self, excluded: &[String], limit: usize) -> Result<Vec<(i64, Task)>> {
        // Without exclusions, the statement has no `NOT IN`: one ephemeral table less.
        let exclusion = if excluded.is_empty() {
            ""
        } else {
            "AND task_type NOT IN (SELECT value FROM json_each(?2))"
        };
        let excluded_json = serde_json::to_string(excluded).unwrap_or_else(|_| "[]".into());
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS}, seq FROM tasks INDEXED BY tasks_queued \
                 WHERE status = 0 {exclusion} ORDER BY priority DESC, seq LIMIT ?1"
            ))
            .map_err(|e| Error::store("finding tasks to claim", e))?;
        let values = params![limit as i64, excluded_json];
        statement
            .query_map(&values[..if excluded.is_empty() { 1 } else { 2 }], |row| {
                Ok((row.get(SEQ)?, task_from_row(row)?))
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| Error::store("finding tasks to claim", e))
    }

    /// The `seq`, type, cancel request and status of a task that attempt `attempt` still holds
    /// (the fence): running, or frozen (paused while its attempt runs, lease kept).
    fn held(&mut self, id: TaskId, attempt: u32) -> Result<Option<(i64, String, bool, Status)>> {
        self.conn
            .prepare_cached(
                "SELECT seq, task_type, cancel_requested, status FROM tasks WHERE id = ?1 AND attempt = ?2 \
                 AND (status = 3 OR (status = 2 AND lease_until IS NOT NULL))",
            )
            .and_then(|mut s| {
                s.query_row(params![&id.as_bytes()[..], attempt], |row| {
                    let code: u8 = row.get(3)?;
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        Status::from_code(code).unwrap_or(Status::Running),
                    ))
                })
                .optional()
            })
            .map_err(|e| Error::store("checking a lease", e))
    }

    fn promote(&mut self, now: Timestamp, counts: &mut Vec<CountChange>) -> Result<Promoted> {
        let queued =
            decide(Status::Scheduled, Event::Promote).map_err(|t| Error::store("promoting", t))?;
        let promoted: Vec<String> = self
            .conn
            .prepare_cached(
                "UPDATE tasks SET status = ?2, run_at = NULL, updated_at = ?1 WHERE seq IN \
                 (SELECT seq FROM tasks INDEXED BY tasks_scheduled WHERE status = 1 AND run_at <= ?1) \
                 RETURNING task_type",
            )
            .and_then(|mut s| s.query_map(params![now.0, queued.code()], |row| row.get(0))?.collect())
            .map_err(|e| Error::store("promoting scheduled tasks", e))?;
        let next_due: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT min(run_at) FROM tasks INDEXED BY tasks_scheduled WHERE status = 1",
            )
            .and_then(|mut s| s.query_row([], |row| row.get(0)))
            .map_err(|e| Error::store("finding the next scheduled task", e))?;
        let count = promoted.len();
        counts.extend(promoted.into_iter().map(|task_type| CountChange {
            task_type,
            from: Some(Status::Scheduled),
            to: Some(queued),
        }));
        Ok(Promoted {
            count,
            next_due: next_due.map(Timestamp),
        })
    }

    fn finish(&mut self, finish: &Finish, counts: &mut Vec<CountChange>) -> Result<bool> {
        let Some((seq, task_type, cancel_requested, held_status)) =
            self.held(finish.id, finish.attempt)?
        else {
            return Ok(false);
        };
        let cancelled = Outcome::Cancelled;
        let outcome = if cancel_requested && finish.outcome.yields_to_cancel() {
            // As `apply::settle` decides: a task whose cancel was asked for is not retried.
            &cancelled
        } else {
            &finish.outcome
        };
        let to =
            decide(Status::Running, outcome.event()).map_err(|t| Error::store("finishing", t))?;
        let (result, error, run_at, interrupted) = match outcome {
            Outcome::Completed { result } => (Some(json_text(result)), None, None, 0),
            Outcome::Failed { error, retry_at } => (None, Some(error), *retry_at, 0),
            Outcome::Interrupted { error, .. } => (None, Some(error), None, 1),
            Outcome::Cancelled => (None, None, None, 0),
        };
        let finished_at = to.is_terminal().then_some(finish.now.0);
        self.conn
            .prepare_cached(FINISH)
            .and_then(|mut s| {
                s.execute(params![
                    seq,
                    to.code(),
                    result,
                    error.map(|e| e.kind.code()),
                    error.map(|e| e.message.as_str()),
                    run_at.map(|t| t.0),
                    finished_at,
                    finish.now.0,
                    interrupted,
                    outcome.attempt_outcome().as_str(),
                ])
            })
            .map_err(|e| Error::store("finishing a task", e))?;
        counts.push(CountChange {
            task_type,
            from: Some(held_status),
            to: Some(to),
        });
        Ok(true)
    }

    fn progress(&mut self, update: ProgressUpdate) -> Result<bool> {
        let changed = self
            .conn
            .prepare_cached(
                "UPDATE OR FAIL tasks SET progress = ?3, progress_message = coalesce(?4, progress_message), updated_at = ?5 \
                 WHERE id = ?1 AND attempt = ?2 AND (status = 3 OR (status = 2 AND lease_until IS NOT NULL))",
            )
            .and_then(|mut s| {
                s.execute(params![
                    &update.id.as_bytes()[..],
                    update.attempt,
                    update.progress,
                    update.message,
                    update.now.0
                ])
            })
            .map_err(|e| Error::store("recording progress", e))?;
        Ok(changed == 1)
    }

    fn heartbeat(&mut self, heartbeat: &Heartbeat) -> Result<HeartbeatReply> {
        let mut reply = HeartbeatReply::default();
        for (id, attempt) in &heartbeat.held {
            let Some((seq, _, cancel_requested, _)) = self.held(*id, *attempt)? else {
                reply.lost.push(*id);
                continue;
            };
            self.conn
                .prepare_cached("UPDATE OR FAIL tasks SET lease_until = ?2 WHERE seq = ?1")
                .and_then(|mut s| s.execute(params![seq, heartbeat.lease_until.0]))
                .map_err(|e| Error::store("renewing leases", e))?;
            if cancel_requested {
                reply.cancel_requested.push(*id);
            }
        }
        Ok(reply)
    }

    fn load(&mut self, id: TaskId) -> Result<Option<Task>> {
        self.conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"))
            .and_then(|mut s| s.query_row([&id.as_bytes()[..]], task_from_row).optional())
            .map_err(|e| Error::store("reading a task", e))
    }

    /// Writes back the fields that commands and recovery change. The priority is among them,
    /// so that the queue index (priority, then age) orders the next claim by the new one.
    fn save(&mut self, task: &Task) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE tasks SET status = ?2, attempt = ?3, max_attempts = ?4, run_at = ?5, \
                 error_kind = ?6, error_message = ?7, updated_at = ?8, finished_at = ?9, \
                 lease_until = ?10, cancel_requested = ?11, priority = ?12, progress = ?13, \
                 progress_message = ?14, interrupted_attempts = ?15, attempts = ?16 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    &task.id.as_bytes()[..],
                    task.status.code(),
                    task.attempt,
                    task.max_attempts,
                    task.run_at.map(|t| t.0),
                    task.error.as_ref().map(|e| e.kind.code()),
                    task.error.as_ref().map(|e| e.message.as_str()),
                    task.updated_at.0,
                    task.finished_at.map(|t| t.0),
                    task.lease_until.map(|t| t.0),
                    task.cancel_requested,
                    task.priority.get(),
                    task.progress,
                    task.progress_message,
                    task.interrupted_attempts,
                    attempts_text(&task.attempts),
                ])
            })
            .map_err(|e| Error::store("updating a task", e))?;
        Ok(())
    }

    fn command(
        &mut self,
        id: TaskId,
        command: Command,
        now: Timestamp,
        counts: &mut Vec<CountChange>,
    ) -> Result<Task> {
        let mut task = self.load(id)?.ok_or(Error::TaskNotFound { id })?;
        let before = task.status;
        apply::command(&mut task, command, now)?;
        self.save(&task)?;
        counts.push(CountChange {
            task_type: task.task_type.clone(),
            from: Some(before),
            to: Some(task.status),
        });
        Ok(task)
    }

    fn recover(
        &mut self,
        now: Timestamp,
        which: Recover,
        counts: &mut Vec<CountChange>,
    ) -> Result<Vec<Task>> {
        let sql = match which {
            Recover::Expired => format!(
                "SELECT {COLUMNS} FROM tasks INDEXED BY tasks_by_status WHERE status IN (2, 3) AND lease_until < ?1"
            ),
            // Running, and frozen (paused while running: they hold a lease).
            Recover::AllRunning => format!(
                "SELECT {COLUMNS} FROM tasks INDEXED BY tasks_by_status WHERE (status = 3 OR (status = 2 AND lease_until IS NOT NULL)) AND ?1 IS NOT NULL"
            ),
        };
        let stale: Vec<Task> = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.query_map([now.0], task_from_row)?.collect())
            .map_err(|e| Error::store("finding expired leases", e))?;
        let mut recovered = Vec::with_capacity(stale.len());
        for mut task in stale {
            let before = task.status;
            apply::recover(&mut task, now)?;
            self.save(&task)?;
            counts.push(CountChange {
                task_type: task.task_type.clone(),
                from: Some(before),
                to: Some(task.status),
            });
            recovered.push(task);
        }
        Ok(recovered)
    }

    fn prune(
        &mut self,
        before: Timestamp,
        limit: usize,
        counts: &mut Vec<CountChange>,
    ) -> Result<usize> {
        let removed: Vec<(String, u8)> = self
            .conn
            .prepare_cached(
                "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks INDEXED BY tasks_finished \
                 WHERE status >= 4 AND finished_at < ?1 ORDER BY finished_at LIMIT ?2) RETURNING task_type, status",
            )
            .and_then(|mut s| {
                s.query_map(params![before.0, limit as i64], |row| Ok((row.get(0)?, row.get(1)?)))?.collect()
            })
            .map_err(|e| Error::store("pruning finished tasks", e))?;
        let count = removed.len();
        counts.extend(removed.into_iter().map(|(task_type, code)| CountChange {
            task_type,
            from: Status::from_code(code),
            to: None,
        }));
        Ok(count)
    }

    /// Deletes the oldest finished tasks that match `filter`, in one statement: the pruner's
    /// query (on the finished index) with the filter's conditions added.
    fn delete_finished(
        &mut self,
        filter: &ListFilter,
        before: Timestamp,
        limit: usize,
        counts: &mut Vec<CountChange>,
    ) -> Result<usize> {
        // The terminal statuses the filter names (all of them when it names none): a
        // non-terminal status in the filter matches nothing here.
        let statuses: Vec<Status> = Status::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .filter(|s| filter.statuses.is_empty() || filter.statuses.contains(s))
            .collect();
        if statuses.is_empty() || limit == 0 {
            return Ok(0);
        }
        let mut values: Vec<rusqlite::types::Value> = vec![
            before.0.into(),
            i64::try_from(limit).unwrap_or(i64::MAX).into(),
        ];
        let mut clauses = vec!["status >= 4".to_owned(), "finished_at < ?1".to_owned()];
        if statuses.len() < 3 {
            clauses.push(status_in(&statuses));
        }
        clauses.extend(field_clauses(filter, &mut values));
        let sql = format!(
            "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks INDEXED BY tasks_finished \
             WHERE {} ORDER BY finished_at, seq LIMIT ?2) RETURNING task_type, status",
            clauses.join(" AND ")
        );
        let removed: Vec<(String, u8)> = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_map(rusqlite::params_from_iter(values.iter()), |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?
                .collect()
            })
            .map_err(|e| Error::store("deleting finished tasks", e))?;
        let count = removed.len();
        counts.extend(removed.into_iter().map(|(task_type, code)| CountChange {
            task_type,
            from: Status::from_code(code),
            to: None,
        }));
        Ok(count)
    }
}

fn fail_op(op: WriteOp, error: &Error) {
    let error = error.clone();
    match op {
        WriteOp::Submit(_, reply) => drop(reply.send(Err(error))),
        WriteOp::SubmitAndClaim(_, _, reply) => drop(reply.send(Err(error))),
        WriteOp::Claim(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Promote(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Finish(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Progress(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Heartbeat(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Command(_, _, _, reply) => drop(reply.send(Err(error))),
        WriteOp::Recover(_, _, reply) => drop(reply.send(Err(error))),
        WriteOp::Prune(_, _, reply) => drop(reply.send(Err(error))),
        WriteOp::DeleteFinished(_, _, _, reply) => drop(reply.send(Err(error))),
        WriteOp::Flush(reply) => drop(reply.send(Err(error))),
        WriteOp::Restore => {}
    }
}

/// How long the writer keeps looking for the next request (yielding its core in between) before
/// it sleeps on the channel.
const WRITER_SPIN: Duration = Duration::from_micros(300);

/// The next write request. Requests come in bursts (a claim follows a submit, a finish follows a
/// claim), so the writer first looks for one for a short while, yielding its core in between,
/// before it sleeps on the channel: waking a sleeping thread costs more than the looking.
/// `None` once the store is closed.
fn next_request(requests: &mpsc::Receiver<WriteOp>) -> Option<WriteOp> {
    let spin_until = Instant::now() + WRITER_SPIN;
    loop {
        match requests.try_recv() {
            Ok(op) => return Some(op),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if Instant::now() < spin_until => {
                std::thread::yield_now()
            }
            Err(mpsc::TryRecvError::Empty) => return requests.recv().ok(),
        }
    }
}

/// How often the checkpointer copies the WAL back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);

/// Checkpoints the WAL from its own connection, so that the writer never stops for a checkpoint
/// (and its fsyncs) in the middle of a burst. The writer still checkpoints by itself if the WAL
/// outgrows `wal_autocheckpoint` pages, as a safety net.
fn run_checkpointer(conn: Connection, stop: mpsc::Receiver<()>, watch: Watch) {
    let mut failing = false;
    let mut restored = false;
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        if !restored && file_identity(&watch.path) != watch.identity {
            // The file was deleted or replaced: checkpointing into it would only lose more.
            restored = true;
            let _ = watch.writer.send(WriteOp::Restore);
            continue;
        }
        if restored {
            continue;
        }
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Err(error) if !failing => {
                failing = true;
                let error = with_hint(Error::store("checkpointing the WAL", error), &watch.path);
                tracing::warn!(%error, "a WAL checkpoint failed; the WAL grows until one works (logged again only after one has worked)");
                watch.health.degraded(&error);
            }
            Err(_) => {}
            Ok(()) if failing => {
                failing = false;
                tracing::info!("WAL checkpoints work again");
            }
            Ok(()) => {}
        }
    }
}

/// What the checkpointer watches besides the WAL: that the store file is still the one opened.
struct Watch {
    path: PathBuf,
    identity: Option<(u64, u64)>,
    health: Arc<HealthCell>,
    writer: mpsc::Sender<WriteOp>,
}

/// The device and inode of a file, `None` when it does not exist.
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The store's health as its threads see it (see [`Store::health`]).
#[derive(Default)]
struct HealthCell {
    state: Mutex<StoreHealth>,
}

impl HealthCell {
    /// Records a failed write; true when the store was healthy until now (worth a log line).
    fn degraded(&self, error: &Error) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.status == StoreStatus::Unhealthy {
            return false;
        }
        let first = state.status == StoreStatus::Healthy;
        state.status = StoreStatus::Degraded;
        state.problem = Some(error.to_string());
        if first {
            state.since_ms = Some(Timestamp::now().as_millis());
        }
        first
    }

    /// Records that writes are refused until an operator acts.
    fn unhealthy(&self, problem: String) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.status = StoreStatus::Unhealthy;
        state.problem = Some(problem);
        state.since_ms = Some(Timestamp::now().as_millis());
    }

    /// Records a committed write: a passing problem has passed.
    fn written(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.status == StoreStatus::Degraded {
            tracing::info!("the task store takes writes again");
            *state = StoreHealth::default();
        }
    }

    fn get(&self) -> StoreHealth {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Adds what to do to a store error whose SQLite message names a known cause.
fn with_hint(error: Error, path: &Path) -> Error {
    let Error::Store { action, message } = error else {
        return error;
    };
    let path = path.display();
    let hint = if message.contains("database or disk is full") {
        format!(
            "the disk holding {path} is full: free space there; msbd keeps answering reads and takes writes again as soon as there is room"
        )
    } else if message.contains("readonly database") || message.contains("Read-only file system") {
        format!(
            "{path} cannot be written (a read-only file or file system): make it writable, or point MSB_DATA_DIR at a writable directory, and restart msbd"
        )
    } else if message.contains("file is not a database")
        || message.contains("database disk image is malformed")
    {
        format!(
            "{path} is damaged or is not a task store: stop msbd and move the file aside (msbd then starts an empty store; it never deletes the file), or restore it from a backup; `sqlite3 {path} .recover` may salvage its tasks"
        )
    } else if message.contains("disk I/O error") {
        format!(
            "reading or writing {path} failed at the disk: check the disk and the kernel log; msbd tries again as requests come"
        )
    } else if message.contains("unable to open database file") {
        format!("{path} cannot be opened: check that its directory exists and is writable by msbd")
    } else {
        return Error::Store { action, message };
    };
    Error::Store {
        action,
        message: format!("{message} — {hint}"),
    }
}

/// One task by id.
fn get_task(conn: &Connection, id: TaskId) -> Result<Option<Task>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"))
        .and_then(|mut s| s.query_row([&id.as_bytes()[..]], task_from_row).optional())
        .map_err(|e| Error::store("reading a task", e))
}

fn run_reader(conn: Connection, requests: mpsc::Receiver<ReadOp>) {
    while let Ok(op) = requests.recv() {
        match op {
            ReadOp::Get(id, reply) => {
                let _ = reply.send(get_task(&conn, id));
            }
            ReadOp::List(filter, page, reply) => {
                let _ = reply.send(list(&conn, &filter, &page));
            }
            ReadOp::TimedOut(reply) => {
                let _ = reply.send(timed_out(&conn));
            }
        }
    }
}

/// The condition `status IN (…)` of these statuses (their codes are written in the SQL).
fn status_in(statuses: &[Status]) -> String {
    let codes: Vec<String> = statuses.iter().map(|s| s.code().to_string()).collect();
    format!("status IN ({})", codes.join(", "))
}

/// The conditions of a filter's fields other than its statuses, each with its value appended
/// to `values` and bound as `?n` after the values already there.
fn field_clauses(filter: &ListFilter, values: &mut Vec<rusqlite::types::Value>) -> Vec<String> {
    let mut clauses = Vec::new();
    let mut bind = |clause: String, value: rusqlite::types::Value, clauses: &mut Vec<String>| {
        values.push(value);
        clauses.push(clause.replace('?', &format!("?{}", values.len())));
    };
    if let Some(task_type) = &filter.task_type {
        bind(
            "task_type = ?".into(),
            task_type.clone().into(),
            &mut clauses,
        );
    }
    if let Some(owner) = &filter.owner {
        bind("owner = ?".into(), owner.clone().into(), &mut clauses);
    }
    if let Some(session) = &filter.session_id {
        bind(
            "session_id = ?".into(),
            session.clone().into(),
            &mut clauses,
        );
    }
    if let Some(from) = filter.created_from {
        bind("created_at >= ?".into(), from.0.into(), &mut clauses);
    }
    if let Some(until) = filter.created_until {
        bind("created_at < ?".into(), until.0.into(), &mut clauses);
    }
    clauses
}

fn timed_out(conn: &Connection) -> Result<BTreeMap<String, u64>> {
    let sql = format!(
        "SELECT task_type, count(*) FROM tasks WHERE status = {} AND error_kind = {} \
         GROUP BY task_type",
        Status::Failed.code(),
        crate::model::FailureKind::Timeout.code()
    );
    let counting = |e| Error::store("counting timed-out tasks", e);
    let mut statement = conn.prepare_cached(&sql).map_err(counting)?;
    let rows = statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
        })
        .map_err(counting)?;
    let mut counts = BTreeMap::new();
    for row in rows {
        let (task_type, count) = row.map_err(counting)?;
        counts.insert(task_type, u64::try_from(count).unwrap_or(0));
    }
    Ok(counts)
}

fn list(conn: &Connection, filter: &ListFilter, page: &PageRequest) -> Result<Page> {
    let limit = page.clamped_limit();
    let mut clauses = vec!["seq < ?1".to_owned()];
    let mut values: Vec<rusqlite::types::Value> = vec![rusqlite::types::Value::Integer(
        page.cursor
            .map_or(i64::MAX, |c| c.0.min(i64::MAX as u64) as i64),
    )];
    if !filter.statuses.is_empty() {
        clauses.push(status_in(&filter.statuses));
    }
    clauses.extend(field_clauses(filter, &mut values));
    let sql = format!(
        "SELECT {COLUMNS}, seq FROM tasks WHERE {} ORDER BY seq DESC LIMIT {}",
        clauses.join(" AND "),
        limit + 1
    );
    let mut rows: Vec<(i64, Task)> = conn
        .prepare_cached(&sql)
        .and_then(|mut s| {
            s.query_map(rusqlite::params_from_iter(values.iter()), |row| {
                // `seq` follows the task's columns.
                Ok((row.get(SEQ)?, task_from_row(row)?))
            })?
            .collect()
        })
        .map_err(|e| Error::store("listing tasks", e))?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|(seq, _)| Cursor(*seq as u64))
    } else {
        None
    };
    Ok(Page {
        tasks: rows.into_iter().map(|(_, task)| task).collect(),
        next_cursor,
    })
}

impl Store for SqliteStore {
    fn submit(&self, tasks: Vec<Task>) -> StoreFuture<'_, Vec<Submitted>> {
        self.write(|reply| WriteOp::Submit(tasks, reply))
    }

    fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, Vec<Task>> {
        self.write(|reply| WriteOp::Claim(request, reply))
    }

    fn submit_and_claim(
        &self,
        tasks: Vec<Task>,
        request: ClaimRequest,
    ) -> StoreFuture<'_, (Vec<Submitted>, Vec<Task>)> {
        self.write(|reply| WriteOp::SubmitAndClaim(tasks, request, reply))
    }

    fn promote_due(&self, now: Timestamp) -> StoreFuture<'_, Promoted> {
        self.write(|reply| WriteOp::Promote(now, reply))
    }

    fn finish(&self, finish: Finish) -> StoreFuture<'_, bool> {
        self.write(|reply| WriteOp::Finish(finish, reply))
    }

    fn progress(&self, update: ProgressUpdate) -> StoreFuture<'_, bool> {
        self.write(|reply| WriteOp::Progress(update, reply))
    }

    fn heartbeat(&self, heartbeat: Heartbeat) -> StoreFuture<'_, HeartbeatReply> {
        self.write(|reply| WriteOp::Heartbeat(heartbeat, reply))
    }

    fn command(&self, id: TaskId, command: Command, now: Timestamp) -> StoreFuture<'_, Task> {
        self.write(|reply| WriteOp::Command(id, command, now, reply))
    }

    fn recover(&self, now: Timestamp, which: Recover) -> StoreFuture<'_, Vec<Task>> {
        self.write(|reply| WriteOp::Recover(now, which, reply))
    }

    fn prune(&self, before: Timestamp, limit: usize) -> StoreFuture<'_, usize> {
        self.write(|reply| WriteOp::Prune(before, limit, reply))
    }

    fn delete_finished(
        &self,
        filter: ListFilter,
        finished_before: Timestamp,
        limit: usize,
    ) -> StoreFuture<'_, usize> {
        self.write(|reply| WriteOp::DeleteFinished(filter, finished_before, limit, reply))
    }

    /// A point read by primary key takes microseconds and, in WAL mode, never waits for the
    /// writer: it runs on the caller's thread when the inline connection is free (saving the
    /// two thread hand-offs of the reader thread, most of a read's latency), else on the reader
    /// thread.
    fn get(&self, id: TaskId) -> StoreFuture<'_, Option<Task>> {
        if let Ok(conn) = self.inline_reader.try_lock() {
            let task = get_task(&conn, id);
            return Box::pin(std::future::ready(task));
        }
        self.read(|reply| ReadOp::Get(id, reply))
    }

    fn list(&self, filter: ListFilter, page: PageRequest) -> StoreFuture<'_, Page> {
        self.read(|reply| ReadOp::List(filter, page, reply))
    }

    fn timed_out(&self) -> StoreFuture<'_, BTreeMap<String, u64>> {
        self.read(ReadOp::TimedOut)
    }

    fn stats(&self) -> StoreFuture<'_, Stats> {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(std::future::ready(Ok(stats)))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        self.write(WriteOp::Flush)
    }

    fn health(&self) -> StoreHealth {
        self.current_health()
    }
}
