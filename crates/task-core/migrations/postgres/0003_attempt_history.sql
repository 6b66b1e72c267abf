-- How each attempt of a task ended (Task::attempts): a JSON array of
-- {"n", "started_at", "ended_at", "outcome"}, oldest first, appended to by the statement that
-- records an attempt's end (a finish, an interruption, a recovery) and trimmed there to the last
-- 20 entries. Existing tasks start with an empty history.
--
-- The default is a constant: adding the column rewrites no row. Recorded as version 3.

ALTER TABLE tasks ADD COLUMN attempts jsonb NOT NULL DEFAULT '[]'::jsonb;
