-- Attempts that ended because msbd went away (a shutdown, a crash, a lost node) no longer count
-- against max_attempts: they are counted here instead. rerun_on_recovery: whether such an
-- attempt runs again (true, the default) or the task fails with kind `interrupted`.
--
-- Both columns have constant defaults: adding them rewrites no row. Recorded as version 2.

ALTER TABLE tasks
    ADD COLUMN interrupted_attempts bigint NOT NULL DEFAULT 0,
    ADD COLUMN rerun_on_recovery boolean NOT NULL DEFAULT true;
