-- Whether a task's session was made for it alone (it named none): such a task binds to no node,
-- whatever the session affinity (any node can make its session). Before, msbd told these
-- sessions by the form of their id; tasks stored before say false, and keep the home node they
-- were given at submission.
--
-- A constant default: adding the column rewrites no row. Recorded as version 4.

ALTER TABLE tasks ADD COLUMN fresh_session boolean NOT NULL DEFAULT false;
