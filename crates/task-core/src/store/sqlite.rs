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

mod file;
mod migrate;
mod reader;
mod rows;
mod writer;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::model::{Task, TaskId, Timestamp};
use crate::store::common::{self, HealthPart};
use crate::store::{
    ClaimRequest, Command, Finish, Heartbeat, HeartbeatReply, ListFilter, Page, PageRequest,
    ProgressUpdate, Promoted, Recover, Stats, Store, StoreFuture, StoreHealth, Submitted,
};

use file::{
    Watch, file_identity, lock_path, open_connection, run_checkpointer, take_lock, with_hint,
};
use migrate::{configure, migrate};
use reader::{ReadOp, get_task, load_stats, run_reader};
use writer::{WriteOp, Writer};

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

/// The parts of the store whose failures show in its health.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    /// Writes and checkpoints: their problems pass once a write commits again.
    Writes,
    /// The file was deleted or replaced under the open store: writes are refused until an
    /// operator restarts msbd on the copy (see [`Writer::restore`]).
    File,
}

impl HealthPart for Part {
    fn unhealthy(self) -> bool {
        self == Part::File
    }
}

/// The store's health as its threads see it (see [`Store::health`]).
type HealthCell = common::HealthCell<Part>;

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

    fn release(&self, held: Vec<(TaskId, u32)>, now: Timestamp) -> StoreFuture<'_, usize> {
        self.write(|reply| WriteOp::Release(held, now, reply))
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

    fn reassign_owner(&self, from: &str, to: &str) -> StoreFuture<'_, u64> {
        let (from, to) = (from.to_owned(), to.to_owned());
        self.write(|reply| WriteOp::ReassignOwner(from, to, reply))
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
