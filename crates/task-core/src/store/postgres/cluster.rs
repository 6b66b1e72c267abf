//! The cluster's status as the database sees it ([`crate::store::Store::cluster_status`]): the
//! nodes connected to the schema, the maintenance leader, and the database's figures.
//!
//! A node is known by the advisory locks of its listening connection (see `listen.rs`): it holds
//! `(LOCK_CLASS, hashtext('node:<schema>:<node_id>'))` while it is connected, and the leader
//! also `(LOCK_CLASS, hashtext('maintenance:<schema>'))`. A lock carries only the hash, so the
//! name is read from the connection's `application_name` (`msbd <node_id>`, set by
//! [`super::PostgresStore::connect`]) and checked against the hash: only the nodes of this
//! store's schema (and database) count. A node whose URL sets an `application_name` of its own,
//! whose name is longer than PostgreSQL keeps of it (63 bytes with the `msbd ` prefix), or whose
//! name has characters other than printable ASCII (PostgreSQL replaces them), cannot be named
//! that way and is left out, unless it is the node asking (whose name is known).

use tokio_postgres::Row;

use crate::error::Result;
use crate::store::{ClusterNode, DatabaseStatus};

/// What the errors of this module say was being done.
pub(super) const ACTION: &str = "reading the cluster's status";

/// The nodes of the schema connected now. Parameters: the lock class (`int4`), the schema, this
/// node's name. A lock's key is an `int4` and `pg_locks` shows it as an `oid`: a negative hash
/// is compared through the `int4 → oid` cast, which keeps its bits.
pub(super) const NODES: &str = "SELECT n.name, \
    (extract(epoch FROM a.backend_start) * 1000)::int8 AS connected_since_ms, \
    host(a.client_addr) AS client_addr, \
    EXISTS (SELECT 1 FROM pg_locks m WHERE m.pid = l.pid AND m.locktype = 'advisory' \
        AND m.granted AND m.database = l.database AND m.classid = $1::int4::oid \
        AND m.objid = hashtext('maintenance:' || $2::text)::oid AND m.objsubid = 2) AS is_leader \
    FROM pg_locks l \
    JOIN pg_stat_activity a ON a.pid = l.pid \
    CROSS JOIN LATERAL (SELECT CASE \
        WHEN l.objid = hashtext('node:' || $2::text || ':' || $3::text)::oid THEN $3::text \
        WHEN a.application_name LIKE 'msbd %' \
            AND l.objid = hashtext('node:' || $2::text || ':' || substr(a.application_name, 6))::oid \
            THEN substr(a.application_name, 6) \
        END AS name) n \
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
    AND l.classid = $1::int4::oid \
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
    AND n.name IS NOT NULL";

/// The database's figures, in one row. Parameter: the schema (for its task tables' statistics: the
/// rows are those of `tasks` and `tasks_done` together, the last vacuum that of `tasks`).
pub(super) const DATABASE: &str = "SELECT current_setting('server_version') AS server_version, \
    CASE WHEN has_database_privilege(current_database(), 'CONNECT') \
        THEN pg_database_size(current_database()) END AS database_size_bytes, \
    s.n_live_tup + coalesce(d.n_live_tup, 0) AS live_tasks, \
    s.n_dead_tup + coalesce(d.n_dead_tup, 0) AS dead_tasks, \
    (extract(epoch FROM greatest(s.last_vacuum, s.last_autovacuum)) * 1000)::int8 \
        AS last_vacuum_ms, \
    (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
        AND backend_type = 'client backend') AS connections, \
    current_setting('max_connections')::int8 AS max_connections \
    FROM (SELECT 1) AS one \
    LEFT JOIN pg_stat_user_tables s ON s.schemaname = $1::text AND s.relname = 'tasks' \
    LEFT JOIN pg_stat_user_tables d ON d.schemaname = $1::text AND d.relname = 'tasks_done'";

/// Reads one column by its name, naming it in the error.
fn column<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, name: &str) -> Result<T> {
    super::rows::column_of(row, name, ACTION)
}

/// The nodes of [`NODES`]' rows, sorted by name; `own` is the name of the node asking.
pub(super) fn nodes(rows: &[Row], own: &str) -> Result<Vec<ClusterNode>> {
    let mut nodes = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = column(row, "name")?;
        nodes.push(ClusterNode {
            is_self: name == own,
            name,
            is_leader: column(row, "is_leader")?,
            connected_since_ms: column(row, "connected_since_ms")?,
            client_addr: column(row, "client_addr")?,
        });
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

/// The database's figures from [`DATABASE`]'s row.
pub(super) fn database(row: &Row) -> Result<DatabaseStatus> {
    Ok(DatabaseStatus {
        server_version: column(row, "server_version")?,
        database_size_bytes: column(row, "database_size_bytes")?,
        live_tasks: column(row, "live_tasks")?,
        dead_tasks: column(row, "dead_tasks")?,
        last_vacuum_ms: column(row, "last_vacuum_ms")?,
        connections: column(row, "connections")?,
        max_connections: column(row, "max_connections")?,
    })
}
