//! The schema and its migrations (`PRAGMA user_version` counts those applied), and the settings
//! of every connection.

use std::time::Duration;

use rusqlite::Connection;

use crate::error::{Error, Result};

use super::{SqliteConfig, Synchronous};

/// The schema, one migration per entry; `PRAGMA user_version` counts those applied.
pub(super) const MIGRATIONS: &[&str] = &[
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
    // Whether the task's session was made for it alone (`Task::fresh_session`). Tasks stored
    // before say no: their sessions are kept as named ones.
    r#"
ALTER TABLE tasks ADD COLUMN fresh_session INTEGER NOT NULL DEFAULT 0;
"#,
];

pub(super) fn configure(conn: &Connection, config: &SqliteConfig, reader: bool) -> Result<()> {
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
        .query_row("PRAGMA journal_mode = WAL", [], |row| {
            row.get("journal_mode")
        })
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

pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get("user_version"))
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
