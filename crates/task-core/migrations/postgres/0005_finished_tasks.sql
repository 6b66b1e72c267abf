-- Finished tasks leave the task table. `tasks` holds only the tasks that are not finished (the
-- queue, scheduled, paused and running ones): the table that claims scan, every write updates
-- and (auto)vacuum visits, with its indexes, stays as small as the live work however many
-- finished tasks retention keeps. A task moves to `tasks_done` in the transaction that finishes
-- it (a finish, a cancel, a recovery that fails it), keeping its `seq`, so that listings by
-- `seq` see one sequence across both tables. `tasks_done` is append-only but for the pruner's
-- deletes (and the rare owner reassignment): its rows are written once, so vacuuming it is
-- cheap and seldom needed.
--
-- Idempotency keys move to `task_keys`, one row per (owner, key) whichever table holds the task:
-- a submission claims its key there first, so that a key stays unique per owner across both
-- tables with no race against a finish moving the task that holds it. A key goes with its task
-- when the task is pruned or deleted. Owner '' stands for no owner, as before.
--
-- Run under the migration lock in one transaction: the finished tasks of the existing table
-- move here in it. Recorded as version 5.

CREATE TABLE tasks_done (LIKE tasks INCLUDING DEFAULTS) WITH (
    autovacuum_vacuum_insert_scale_factor = 0.2,
    autovacuum_analyze_scale_factor = 0.05
);
ALTER TABLE tasks_done ADD PRIMARY KEY (seq);
ALTER TABLE tasks_done ADD CONSTRAINT tasks_done_id_key UNIQUE (id);
-- The pruner, oldest first.
CREATE INDEX tasks_done_finished ON tasks_done (finished_at, seq);

WITH moved AS (DELETE FROM tasks WHERE status >= 4 RETURNING *)
INSERT INTO tasks_done SELECT * FROM moved;

CREATE TABLE task_keys (
    owner text NOT NULL,
    key text NOT NULL,
    id uuid NOT NULL,
    PRIMARY KEY (owner, key)
);
INSERT INTO task_keys (owner, key, id)
    SELECT coalesce(owner, ''), idempotency_key, id FROM tasks WHERE idempotency_key IS NOT NULL
    UNION ALL
    SELECT coalesce(owner, ''), idempotency_key, id FROM tasks_done
        WHERE idempotency_key IS NOT NULL;

-- The keys are unique in `task_keys` now; the task table's index of them is one index less to
-- keep up.
DROP INDEX tasks_idempotency;
