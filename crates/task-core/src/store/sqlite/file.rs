//! The store file: opening connections to it, its lock, the checkpointer that also watches that
//! the file is still there, and the hints added to errors that name a cause in the file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::error::{Error, Result};

use super::writer::WriteOp;
use super::{HealthCell, Part};

/// Opens a connection through SQLite's `unix-excl` VFS: the process takes an exclusive lock on
/// the file once and keeps the WAL index in its own memory, so that transactions take no file
/// locks (a store file belongs to one process anyway; see the module docs). Other connections of
/// this process (reader, checkpointer) share that memory.
pub(super) fn open_connection(path: &Path) -> Result<Connection> {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    Connection::open_with_flags_and_vfs(path, flags, c"unix-excl")
        .map_err(|e| Error::store("opening the database", format!("{}: {e}", path.display())))
}

/// How long opening waits for a lock held by someone else. A lock can outlive its store for a
/// moment: a process forked at the instant the store closed holds a copy of the lock until it
/// executes its program.
pub(super) const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Takes the store's lock, waiting up to [`LOCK_WAIT`] while another holder has it.
pub(super) fn take_lock(lock: &File) -> std::result::Result<(), std::fs::TryLockError> {
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

pub(super) fn lock_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push("-lock");
    path.with_file_name(name)
}

/// How often the checkpointer copies the WAL back into the database file.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);

/// Checkpoints the WAL from its own connection, so that the writer never stops for a checkpoint
/// (and its fsyncs) in the middle of a burst. The writer still checkpoints by itself if the WAL
/// outgrows `wal_autocheckpoint` pages, as a safety net.
pub(super) fn run_checkpointer(conn: Connection, stop: mpsc::Receiver<()>, watch: Watch) {
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
                watch.health.failing(Part::Writes, error.to_string());
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
pub(super) struct Watch {
    pub(super) path: PathBuf,
    pub(super) identity: Option<(u64, u64)>,
    pub(super) health: Arc<HealthCell>,
    pub(super) writer: mpsc::Sender<WriteOp>,
}

/// The device and inode of a file, `None` when it does not exist.
pub(super) fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Adds what to do to a store error whose SQLite message names a known cause; a read-only file
/// becomes [`Error::StoreReadOnly`], which says it.
pub(super) fn with_hint(error: Error, file: &Path) -> Error {
    let Error::Store { action, message } = error else {
        return error;
    };
    let path = file.display();
    let hint = if message.contains("database or disk is full") {
        format!(
            "the disk holding {path} is full: free space there; msbd keeps answering reads and takes writes again as soon as there is room"
        )
    } else if message.contains("readonly database") || message.contains("Read-only file system") {
        return Error::StoreReadOnly {
            action,
            path: file.to_path_buf(),
            message,
        };
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
