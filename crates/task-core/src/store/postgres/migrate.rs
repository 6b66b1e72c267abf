//! Versioned migrations: applied in order, all of them in one transaction under an advisory lock,
//! so that nodes starting at once neither race nor apply a migration twice.

use tokio_postgres::Client;

use crate::error::{Error, Result};

use super::{LOCK_CLASS, quoted};

/// The migrations, in order: version, name, SQL (the files in `migrations/postgres`).
pub(super) const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "tasks",
        include_str!("../../../migrations/postgres/0001_tasks.sql"),
    ),
    (
        2,
        "interrupted_attempts",
        include_str!("../../../migrations/postgres/0002_interrupted_attempts.sql"),
    ),
    (
        3,
        "attempt_history",
        include_str!("../../../migrations/postgres/0003_attempt_history.sql"),
    ),
    (
        4,
        "fresh_session",
        include_str!("../../../migrations/postgres/0004_fresh_session.sql"),
    ),
    (
        5,
        "finished_tasks",
        include_str!("../../../migrations/postgres/0005_finished_tasks.sql"),
    ),
];

/// The newest schema version this build knows.
pub(super) fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |(version, _, _)| *version)
}

/// Creates the schema if it is missing and applies the migrations it lacks, in one transaction
/// that holds an advisory lock of this schema: a second node starting at the same moment waits
/// for the first, then finds nothing left to do. Returns the schema version now in force.
///
/// `client`'s search_path must be the schema alone (see `super::connect`).
pub(super) async fn migrate(client: &mut Client, schema: &str) -> Result<i32> {
    let fail =
        |e: tokio_postgres::Error| Error::store("migrating the database", super::describe(&e));
    let tx = client.transaction().await.map_err(fail)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&LOCK_CLASS, &format!("migrate:{schema}")],
    )
    .await
    .map_err(fail)?;
    // Created only when missing: `CREATE SCHEMA IF NOT EXISTS` would need the right to create
    // schemas even when the schema is there.
    let exists = tx
        .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
        .await
        .map_err(fail)?
        .is_some();
    if !exists {
        tx.batch_execute(&format!("CREATE SCHEMA {}", quoted(schema)))
            .await
            .map_err(fail)?;
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (\
            version integer PRIMARY KEY, \
            name text NOT NULL, \
            applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .map_err(fail)?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) AS version FROM schema_migrations",
            &[],
        )
        .await
        .map_err(fail)?
        .try_get("version")
        .map_err(fail)?;
    if current > latest() {
        return Err(Error::Store {
            action: "opening the database",
            message: format!(
                "the schema `{schema}` has version {current}, newer than this build of msbd knows ({}); run a newer msbd, or give this one another schema",
                latest()
            ),
        });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|(v, _, _)| *v > current) {
        tx.batch_execute(sql).await.map_err(|e| Error::Store {
            action: "migrating the database",
            message: format!("migration {version} ({name}): {}", super::describe(&e)),
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(fail)?;
    }
    tx.commit().await.map_err(fail)?;
    Ok(latest())
}
