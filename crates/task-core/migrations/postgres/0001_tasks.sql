-- The task table of msbd's PostgreSQL store, its queue indexes, and the counts by type and status.
--
-- Run by `PostgresStore::connect` inside one transaction under an advisory lock, with the
-- connection's search_path set to the store's schema; recorded in schema_migrations as version 1.
-- Status codes: 0 queued, 1 scheduled, 2 paused, 3 running, 4 completed, 5 failed, 6 cancelled.

CREATE TABLE tasks (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id uuid NOT NULL UNIQUE,
    task_type text NOT NULL,
    params text NOT NULL,
    priority smallint NOT NULL,
    status smallint NOT NULL,
    attempt bigint NOT NULL,
    max_attempts bigint NOT NULL,
    retry_base_ms bigint NOT NULL,
    retry_max_ms bigint NOT NULL,
    timeout_ms bigint,
    run_at bigint,
    idempotency_key text,
    owner text,
    session_id text,
    progress double precision,
    progress_message text,
    result text,
    error_kind smallint,
    error_message text,
    created_at bigint NOT NULL,
    started_at bigint,
    updated_at bigint NOT NULL,
    finished_at bigint,
    tags text,
    lease_until bigint,
    cancel_requested boolean NOT NULL DEFAULT false,
    -- The node that owns the task's session: only it claims the task (NULL: any node).
    home_node text,
    -- The node that claimed the latest attempt.
    claimed_by text
) WITH (
    -- Room on each page for the new versions of heartbeats and progress reports, which change
    -- no indexed column and so stay on their page (HOT updates, no index entries, no bloat).
    fillfactor = 80,
    -- A queue turns its rows over all the time: vacuum early and without throttling, so that
    -- dead versions do not pile up at the head of the queue index.
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05,
    autovacuum_vacuum_cost_delay = 0
);

-- The claim: queued tasks by priority, then submission order. Partial, so that it holds only
-- the queue, however many finished tasks the table keeps.
CREATE INDEX tasks_queued ON tasks (priority DESC, seq) WHERE status = 0;
-- Promotion of scheduled tasks whose run_at has come, and the next due time.
CREATE INDEX tasks_scheduled ON tasks (run_at) WHERE status = 1;
-- The retention pruner, oldest first.
CREATE INDEX tasks_finished ON tasks (finished_at, seq) WHERE status >= 4;
-- The lease reaper: running and paused tasks. It names no lease column, so that renewing a
-- lease changes no indexed column (a HOT update).
CREATE INDEX tasks_held ON tasks (seq) WHERE status IN (2, 3);
-- Idempotency keys, per owner (no owner and the empty owner are the same).
CREATE UNIQUE INDEX tasks_idempotency ON tasks ((coalesce(owner, '')), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Counts by type and status, as partial sums: each node adds its own changes to its own rows
-- (no row is contended by two nodes), and the pruner folds every node's rows into the node ''.
-- The counts are the sums over nodes.
CREATE TABLE task_counts (
    node text NOT NULL,
    task_type text NOT NULL,
    status smallint NOT NULL,
    count bigint NOT NULL,
    PRIMARY KEY (node, task_type, status)
) WITH (fillfactor = 50, autovacuum_vacuum_threshold = 100, autovacuum_vacuum_scale_factor = 0);
