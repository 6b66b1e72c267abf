//! The writer: one thread that owns the writing connection and commits the requests waiting for
//! it in one transaction (group commit), answering each only after the commit.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::model::{MAX_ATTEMPT_RECORDS, Status, Task, TaskId, Timestamp};
use crate::state::{Event, decide};
use crate::store::common::{
    CountChange, attempts_text, field_clauses, finished_statuses, json_text, millis, net_counts,
    sql_held, sql_leased, sql_status, sql_terminal, tags_text,
};
use crate::store::{
    ClaimRequest, Command, Finish, Heartbeat, HeartbeatReply, ListFilter, Outcome, ProgressUpdate,
    Promoted, Recover, Stats, Submitted, apply,
};

use super::file::{lock_path, with_hint};
use super::rows::{COLUMNS, SEQ_AFTER_COLUMNS, task_from_row};
use super::{HealthCell, Part, closed};

/// Ends an attempt. It also appends the attempt's entry to the `attempts` column, trimmed to
/// the last [`MAX_ATTEMPT_RECORDS`] (20): `?8` is when it ended, `?10` its outcome's name. (The
/// attempt started at `started_at`: a running task has one.) The result goes with the error:
/// an outcome with a result or an error replaces the result (a failure without one clears an
/// earlier attempt's); a cancel keeps both.
pub(super) const FINISH: &str = concat!(
    "UPDATE OR FAIL tasks SET status = ?2, \
    result = CASE WHEN ?3 IS NOT NULL OR ?4 IS NOT NULL THEN ?3 ELSE result END, \
    progress = CASE WHEN ?2 = ",
    sql_status!(completed),
    " THEN 1.0 WHEN ?2 IN (",
    sql_status!(queued),
    ", ",
    sql_status!(scheduled),
    ") THEN NULL ELSE progress END, \
    progress_message = CASE WHEN ?2 IN (",
    sql_status!(queued),
    ", ",
    sql_status!(scheduled),
    ") THEN NULL ELSE progress_message END, \
    error_kind = coalesce(?4, error_kind), error_message = coalesce(?5, error_message), \
    run_at = ?6, finished_at = ?7, updated_at = ?8, \
    interrupted_attempts = interrupted_attempts + ?9, \
    attempts = json_insert(CASE WHEN json_array_length(attempts) >= 20 \
    THEN json_remove(attempts, '$[0]') ELSE attempts END, '$[#]', json_object('n', attempt, \
    'started_at', coalesce(started_at, ?8), 'ended_at', ?8, 'outcome', ?10)), \
    lease_until = NULL, cancel_requested = 0 WHERE seq = ?1"
);
const _: () = assert!(MAX_ATTEMPT_RECORDS == 20, "FINISH trims to 20 entries");

pub(super) type Reply<T> = oneshot::Sender<Result<T>>;

pub(super) enum WriteOp {
    Submit(Vec<Task>, Reply<Vec<Submitted>>),
    SubmitAndClaim(Vec<Task>, ClaimRequest, Reply<(Vec<Submitted>, Vec<Task>)>),
    Claim(ClaimRequest, Reply<Vec<Task>>),
    Promote(Timestamp, Reply<Promoted>),
    Finish(Finish, Reply<bool>),
    Release(Vec<(TaskId, u32)>, Timestamp, Reply<usize>),
    Progress(ProgressUpdate, Reply<bool>),
    Heartbeat(Heartbeat, Reply<HeartbeatReply>),
    Command(TaskId, Command, Timestamp, Reply<Task>),
    Recover(Timestamp, Recover, Reply<Vec<Task>>),
    Prune(Timestamp, usize, Reply<usize>),
    DeleteFinished(ListFilter, Timestamp, usize, Reply<usize>),
    /// From one owner to another.
    ReassignOwner(String, String, Reply<u64>),
    Flush(Reply<()>),
    /// The store file was deleted or replaced under the open store: copy what the open
    /// database holds back to its path and refuse writes from then on (see [`Writer::restore`]).
    Restore,
}

/// An answer held until the transaction commits.
pub(super) type PendingReply = Box<dyn FnOnce(Option<&Error>) + Send>;

pub(super) fn pending<T: Send + 'static>(reply: Reply<T>, result: Result<T>) -> PendingReply {
    Box::new(move |commit_error| {
        let answer = match commit_error {
            Some(error) => Err(error.clone()),
            None => result,
        };
        let _ = reply.send(answer);
    })
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) stats: Arc<Mutex<Stats>>,
    pub(super) max_batch: usize,
    pub(super) health: Arc<HealthCell>,
    pub(super) path: PathBuf,
    /// Set once the file was deleted under the store: why every write is refused.
    pub(super) frozen: Option<Error>,
    /// The lock on the restored copy, held until the store closes.
    pub(super) restored_lock: Option<File>,
}

impl Writer {
    pub(super) fn run(mut self, requests: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Some(first) = next_request(&requests) {
            if matches!(first, WriteOp::Restore) {
                self.restore();
                continue;
            }
            batch.push(first);
            while batch.len() < self.max_batch {
                match requests.try_recv() {
                    Ok(WriteOp::Restore) => {
                        self.commit_batch(&mut batch);
                        self.restore();
                    }
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if let Some(error) = &self.frozen {
                for op in batch.drain(..) {
                    fail_op(op, error);
                }
                continue;
            }
            self.commit_batch(&mut batch);
        }
        if self.frozen.is_some() {
            return;
        }
        let _ = self
            .conn
            .execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);");
    }

    fn commit_batch(&mut self, batch: &mut Vec<WriteOp>) {
        let mut replies: Vec<PendingReply> = Vec::with_capacity(batch.len());
        let mut counts = Vec::new();
        if batch.is_empty() {
            return;
        }
        if let Err(error) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            let error = with_hint(Error::store("starting a transaction", error), &self.path);
            self.health.failing(Part::Writes, error.to_string());
            for op in batch.drain(..) {
                fail_op(op, &error);
            }
            return;
        }
        let mut broken = None;
        for op in batch.drain(..) {
            if broken.is_some() {
                fail_op(op, broken.as_ref().unwrap_or(&closed()));
                continue;
            }
            replies.push(self.execute(op, &mut counts));
            if self.conn.is_autocommit() {
                // SQLite rolled the transaction back (a full disk, an I/O error): nothing in it
                // holds, so every request of the batch fails.
                broken = Some(Error::store(
                    "writing",
                    format!(
                        "the transaction was rolled back by SQLite: is the disk holding {} full or failing? msbd keeps answering reads and tries writes again as they come",
                        self.path.display()
                    ),
                ));
            }
        }
        let net = net_counts(&counts);
        let outcome = match broken {
            Some(error) => Err(error),
            None => self.write_counts(&net).and_then(|()| {
                self.conn
                    .execute_batch("COMMIT")
                    .map_err(|e| with_hint(Error::store("committing", e), &self.path))
            }),
        };
        match outcome {
            Ok(()) => {
                if self.health.working(Part::Writes) {
                    tracing::info!("the task store takes writes again");
                }
                let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                for ((task_type, status), delta) in net {
                    stats.add(task_type, status, delta);
                }
                drop(stats);
                for reply in replies {
                    reply(None);
                }
            }
            Err(error) => {
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                if self.health.failing(Part::Writes, error.to_string()) {
                    tracing::error!(%error, "a group commit failed; its requests were refused (logged again only once writes have worked in between)");
                }
                for reply in replies {
                    reply(Some(&error));
                }
            }
        }
    }

    /// The store file was deleted (or replaced) while open. Everything committed is still in
    /// the open database, but it would be gone once msbd exits: write a copy of it back to the
    /// path (recreating the directory; beside the path if another file took it), lock the copy
    /// like a freshly opened store, and refuse every write from now on so that the copy stays
    /// complete. A restart opens the copy and recovers the tasks that were running.
    fn restore(&mut self) {
        if self.frozen.is_some() {
            return;
        }
        let target = if self.path.exists() {
            let mut name = self.path.as_os_str().to_owned();
            name.push(format!(".restored-{}", Timestamp::now().as_millis()));
            PathBuf::from(name)
        } else {
            self.path.clone()
        };
        let copied = (|| -> std::result::Result<(), String> {
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            self.conn
                .execute("VACUUM INTO ?1", [target.to_string_lossy()])
                .map_err(|e| format!("copying the open database to {}: {e}", target.display()))?;
            if target == self.path {
                let lock = OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(lock_path(&target))
                    .map_err(|e| format!("recreating the lock file: {e}"))?;
                if lock.try_lock().is_ok() {
                    self.restored_lock = Some(lock);
                }
            }
            Ok(())
        })();
        let problem = match copied {
            Ok(()) => format!(
                "the task store file {} was deleted or replaced while msbd was running; msbd wrote everything it holds to {} and refuses new writes so that the copy stays complete: restart msbd to go on (it opens the copy{} and recovers the tasks that were running)",
                self.path.display(),
                target.display(),
                if target == self.path {
                    ""
                } else {
                    " once you move it to the store's path"
                },
            ),
            Err(error) => format!(
                "the task store file {} was deleted or replaced while msbd was running, and copying what msbd holds back failed ({error}): keep msbd running, free the path or fix the directory, and restart msbd only after a copy exists; until then new writes are refused",
                self.path.display(),
            ),
        };
        tracing::error!("{problem}");
        self.health.only(Part::File, problem.clone());
        self.frozen = Some(Error::Store {
            action: "writing",
            message: problem,
        });
    }

    /// Adds the batch's net changes to the persistent counts, in its transaction.
    fn write_counts(&mut self, net: &BTreeMap<(&str, Status), i64>) -> Result<()> {
        let mut emptied = false;
        for ((task_type, status), delta) in net {
            self.conn
                .prepare_cached(
                    "INSERT INTO task_counts (task_type, status, count) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (task_type, status) DO UPDATE SET count = count + excluded.count",
                )
                .and_then(|mut s| s.execute(params![task_type, status.code(), delta]))
                .map_err(|e| Error::store("updating the task counts", e))?;
            emptied |= *delta < 0;
        }
        if emptied {
            self.conn
                .prepare_cached("DELETE FROM task_counts WHERE count <= 0")
                .and_then(|mut s| s.execute([]))
                .map_err(|e| Error::store("updating the task counts", e))?;
        }
        Ok(())
    }

    fn execute(&mut self, op: WriteOp, counts: &mut Vec<CountChange>) -> PendingReply {
        match op {
            WriteOp::Submit(tasks, reply) => {
                let answer = self.atomically(counts, |w, counts| w.submit(tasks, counts));
                pending(reply, answer)
            }
            WriteOp::SubmitAndClaim(tasks, request, reply) => {
                let answer = self.atomically(counts, |w, counts| {
                    let submitted = w.submit(tasks, counts)?;
                    Ok((submitted, w.claim(&request, counts)?))
                });
                pending(reply, answer)
            }
            WriteOp::Claim(request, reply) => {
                let answer = self.atomically(counts, |w, counts| w.claim(&request, counts));
                pending(reply, answer)
            }
            WriteOp::Recover(now, which, reply) => {
                let answer = self.atomically(counts, |w, counts| w.recover(now, which, counts));
                pending(reply, answer)
            }
            WriteOp::Release(held, now, reply) => {
                let answer = self.atomically(counts, |w, counts| w.release(&held, now, counts));
                pending(reply, answer)
            }
            // The others write with at most one statement, which SQLite applies whole or not
            // at all (a heartbeat's renewals are independent of each other).
            WriteOp::Promote(now, reply) => pending(reply, self.promote(now, counts)),
            WriteOp::Finish(finish, reply) => pending(reply, self.finish(&finish, counts)),
            WriteOp::Progress(update, reply) => pending(reply, self.progress(update)),
            WriteOp::Heartbeat(heartbeat, reply) => pending(reply, self.heartbeat(&heartbeat)),
            WriteOp::Command(id, command, now, reply) => {
                pending(reply, self.command(id, command, now, counts))
            }
            WriteOp::Prune(before, limit, reply) => {
                pending(reply, self.prune(before, limit, counts))
            }
            WriteOp::DeleteFinished(filter, before, limit, reply) => {
                pending(reply, self.delete_finished(&filter, before, limit, counts))
            }
            WriteOp::ReassignOwner(from, to, reply) => {
                pending(reply, self.reassign_owner(&from, &to))
            }
            WriteOp::Flush(reply) => pending(reply, Ok(())),
            // Handled by `run` before a batch forms; never part of one.
            WriteOp::Restore => Box::new(|_| {}),
        }
    }

    /// Runs a request of several statements inside a savepoint, so that a request that fails
    /// leaves nothing behind in the group's transaction (and no count changes).
    fn atomically<T>(
        &mut self,
        counts: &mut Vec<CountChange>,
        request: impl FnOnce(&mut Self, &mut Vec<CountChange>) -> Result<T>,
    ) -> Result<T> {
        self.conn
            .execute_batch("SAVEPOINT request")
            .map_err(|e| Error::store("starting a savepoint", e))?;
        let mark = counts.len();
        let result = request(self, counts);
        let end = match &result {
            Ok(_) => "RELEASE request",
            Err(_) => {
                counts.truncate(mark);
                "ROLLBACK TO request; RELEASE request"
            }
        };
        match self.conn.execute_batch(end) {
            Ok(()) => result,
            Err(error) => {
                counts.truncate(mark);
                Err(Error::store("ending a savepoint", error))
            }
        }
    }

    fn submit(
        &mut self,
        tasks: Vec<Task>,
        counts: &mut Vec<CountChange>,
    ) -> Result<Vec<Submitted>> {
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            if let Some(key) = &task.idempotency_key {
                let existing = self
                    .conn
                    .prepare_cached(&format!(
                        "SELECT {COLUMNS} FROM tasks WHERE coalesce(owner, '') = coalesce(?1, '') AND idempotency_key = ?2"
                    ))
                    .and_then(|mut s| s.query_row(params![task.owner, key], task_from_row).optional())
                    .map_err(|e| Error::store("looking up an idempotency key", e))?;
                if let Some(existing) = existing {
                    out.push(Submitted {
                        task: existing,
                        created: false,
                    });
                    continue;
                }
            }
            self.conn
                .prepare_cached(
                    "INSERT OR FAIL INTO tasks (id, task_type, params, priority, status, attempt, max_attempts, \
                     retry_base_ms, retry_max_ms, timeout_ms, run_at, idempotency_key, owner, session_id, \
                     created_at, updated_at, tags, interrupted_attempts, rerun_on_recovery, fresh_session) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        &task.id.as_bytes()[..],
                        task.task_type,
                        json_text(&task.params),
                        task.priority.get(),
                        task.status.code(),
                        task.attempt,
                        task.max_attempts,
                        i64::try_from(task.retry.base_delay_ms).unwrap_or(i64::MAX),
                        i64::try_from(task.retry.max_delay_ms).unwrap_or(i64::MAX),
                        millis(task.timeout),
                        task.run_at.map(|t| t.0),
                        task.idempotency_key,
                        task.owner,
                        task.session_id,
                        task.created_at.0,
                        task.updated_at.0,
                        tags_text(&task.tags),
                        task.interrupted_attempts,
                        task.rerun_on_recovery,
                        task.fresh_session,
                    ])
                })
                .map_err(|e| Error::store("inserting a task", e))?;
            counts.push(CountChange {
                task_type: task.task_type.clone(),
                from: None,
                to: Some(task.status),
            });
            out.push(Submitted {
                task,
                created: true,
            });
        }
        Ok(out)
    }

    /// Claims in queue order, honouring per-type room: reads the head of the queue, then marks
    /// each task it takes (no `UPDATE … RETURNING`, which costs SQLite an ephemeral table per
    /// statement). When a type runs out of room, it asks again without that type.
    fn claim(
        &mut self,
        request: &ClaimRequest,
        counts: &mut Vec<CountChange>,
    ) -> Result<Vec<Task>> {
        let mut claimed = Vec::new();
        let mut excluded: Vec<String> = request.exclude_types.clone();
        let mut taken_by_type: Vec<(String, usize)> = Vec::new();
        while claimed.len() < request.max {
            let candidates = self.queue_head(&excluded, request.max - claimed.len())?;
            if candidates.is_empty() {
                break;
            }
            let mut type_full = false;
            for (seq, mut task) in candidates {
                if let Some(room) = request.room_for(&task.task_type) {
                    let taken = match taken_by_type.iter_mut().find(|(t, _)| *t == task.task_type) {
                        Some((_, taken)) => taken,
                        None => {
                            taken_by_type.push((task.task_type.clone(), 0));
                            &mut taken_by_type.last_mut().expect("just pushed").1
                        }
                    };
                    if *taken >= room {
                        // The queue order continues past this type: ask again without it.
                        excluded.push(task.task_type);
                        type_full = true;
                        break;
                    }
                    *taken += 1;
                }
                let before = task.status;
                apply::claim(&mut task, request.now, request.lease_until)?;
                self.conn
                    .prepare_cached(
                        "UPDATE OR FAIL tasks SET status = ?2, attempt = ?3, started_at = ?4, updated_at = ?5, \
                         lease_until = ?6, run_at = NULL, progress = NULL, progress_message = NULL WHERE seq = ?1",
                    )
                    .and_then(|mut s| {
                        s.execute(params![
                            seq,
                            task.status.code(),
                            task.attempt,
                            task.started_at.map(|t| t.0),
                            task.updated_at.0,
                            task.lease_until.map(|t| t.0),
                        ])
                    })
                    .map_err(|e| Error::store("claiming a task", e))?;
                counts.push(CountChange {
                    task_type: task.task_type.clone(),
                    from: Some(before),
                    to: Some(task.status),
                });
                claimed.push(task);
            }
            if !type_full {
                break;
            }
        }
        Ok(claimed)
    }

    /// The first `limit` queued tasks of the types not excluded, in claim order, with their `seq`.
    fn queue_head(&mut self, excluded: &[String], limit: usize) -> Result<Vec<(i64, Task)>> {
        // Without exclusions, the statement has no `NOT IN`: one ephemeral table less.
        let exclusion = if excluded.is_empty() {
            ""
        } else {
            "AND task_type NOT IN (SELECT value FROM json_each(?2))"
        };
        let excluded_json = serde_json::to_string(excluded).unwrap_or_else(|_| "[]".into());
        let mut statement = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS}, seq FROM tasks INDEXED BY tasks_queued \
                 WHERE status = {} {exclusion} ORDER BY priority DESC, seq LIMIT ?1",
                sql_status!(queued)
            ))
            .map_err(|e| Error::store("finding tasks to claim", e))?;
        let values = params![limit as i64, excluded_json];
        statement
            .query_map(&values[..if excluded.is_empty() { 1 } else { 2 }], |row| {
                Ok((row.get(SEQ_AFTER_COLUMNS)?, task_from_row(row)?))
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| Error::store("finding tasks to claim", e))
    }

    /// The `seq`, type, cancel request and status of a task that attempt `attempt` still holds
    /// (the fence): running, or frozen (paused while its attempt runs, lease kept).
    fn held(&mut self, id: TaskId, attempt: u32) -> Result<Option<(i64, String, bool, Status)>> {
        self.conn
            .prepare_cached(concat!(
                "SELECT seq, task_type, cancel_requested, status FROM tasks \
                 WHERE id = ?1 AND attempt = ?2 AND ",
                sql_held!()
            ))
            .and_then(|mut s| {
                s.query_row(params![&id.as_bytes()[..], attempt], |row| {
                    let code: u8 = row.get("status")?;
                    Ok((
                        row.get("seq")?,
                        row.get("task_type")?,
                        row.get("cancel_requested")?,
                        Status::from_code(code).unwrap_or(Status::Running),
                    ))
                })
                .optional()
            })
            .map_err(|e| Error::store("checking a lease", e))
    }

    fn promote(&mut self, now: Timestamp, counts: &mut Vec<CountChange>) -> Result<Promoted> {
        let queued =
            decide(Status::Scheduled, Event::Promote).map_err(|t| Error::store("promoting", t))?;
        let promoted: Vec<String> = self
            .conn
            .prepare_cached(concat!(
                "UPDATE tasks SET status = ?2, run_at = NULL, updated_at = ?1 WHERE seq IN \
                 (SELECT seq FROM tasks INDEXED BY tasks_scheduled WHERE status = ",
                sql_status!(scheduled),
                " AND run_at <= ?1) RETURNING task_type"
            ))
            .and_then(|mut s| {
                s.query_map(params![now.0, queued.code()], |row| row.get("task_type"))?
                    .collect()
            })
            .map_err(|e| Error::store("promoting scheduled tasks", e))?;
        let next_due: Option<i64> = self
            .conn
            .prepare_cached(concat!(
                "SELECT min(run_at) AS next_due FROM tasks INDEXED BY tasks_scheduled \
                 WHERE status = ",
                sql_status!(scheduled)
            ))
            .and_then(|mut s| s.query_row([], |row| row.get("next_due")))
            .map_err(|e| Error::store("finding the next scheduled task", e))?;
        let count = promoted.len();
        counts.extend(promoted.into_iter().map(|task_type| CountChange {
            task_type,
            from: Some(Status::Scheduled),
            to: Some(queued),
        }));
        Ok(Promoted {
            count,
            next_due: next_due.map(Timestamp),
        })
    }

    fn finish(&mut self, finish: &Finish, counts: &mut Vec<CountChange>) -> Result<bool> {
        let Some((seq, task_type, cancel_requested, held_status)) =
            self.held(finish.id, finish.attempt)?
        else {
            return Ok(false);
        };
        let cancelled = Outcome::Cancelled;
        let outcome = if cancel_requested && finish.outcome.yields_to_cancel() {
            // As `apply::settle` decides: a task whose cancel was asked for is not retried.
            &cancelled
        } else {
            &finish.outcome
        };
        let to =
            decide(Status::Running, outcome.event()).map_err(|t| Error::store("finishing", t))?;
        let (result, error, run_at, interrupted) = match outcome {
            Outcome::Completed { result } => (Some(json_text(result)), None, None, 0),
            Outcome::Failed {
                error,
                retry_at,
                result,
            } => (result.as_ref().map(json_text), Some(error), *retry_at, 0),
            Outcome::Interrupted { error, .. } => (None, Some(error), None, 1),
            Outcome::Cancelled => (None, None, None, 0),
        };
        let finished_at = to.is_terminal().then_some(finish.now.0);
        self.conn
            .prepare_cached(FINISH)
            .and_then(|mut s| {
                s.execute(params![
                    seq,
                    to.code(),
                    result,
                    error.map(|e| e.kind.code()),
                    error.map(|e| e.message.as_str()),
                    run_at.map(|t| t.0),
                    finished_at,
                    finish.now.0,
                    interrupted,
                    outcome.attempt_outcome().as_str(),
                ])
            })
            .map_err(|e| Error::store("finishing a task", e))?;
        counts.push(CountChange {
            task_type,
            from: Some(held_status),
            to: Some(to),
        });
        Ok(true)
    }

    fn progress(&mut self, update: ProgressUpdate) -> Result<bool> {
        let changed = self
            .conn
            .prepare_cached(concat!(
                "UPDATE OR FAIL tasks SET progress = ?3, \
                 progress_message = coalesce(?4, progress_message), updated_at = ?5 \
                 WHERE id = ?1 AND attempt = ?2 AND ",
                sql_held!()
            ))
            .and_then(|mut s| {
                s.execute(params![
                    &update.id.as_bytes()[..],
                    update.attempt,
                    update.progress,
                    update.message,
                    update.now.0
                ])
            })
            .map_err(|e| Error::store("recording progress", e))?;
        Ok(changed == 1)
    }

    fn heartbeat(&mut self, heartbeat: &Heartbeat) -> Result<HeartbeatReply> {
        let mut reply = HeartbeatReply::default();
        for (id, attempt) in &heartbeat.held {
            let Some((seq, _, cancel_requested, _)) = self.held(*id, *attempt)? else {
                reply.lost.push(*id);
                continue;
            };
            self.conn
                .prepare_cached("UPDATE OR FAIL tasks SET lease_until = ?2 WHERE seq = ?1")
                .and_then(|mut s| s.execute(params![seq, heartbeat.lease_until.0]))
                .map_err(|e| Error::store("renewing leases", e))?;
            if cancel_requested {
                reply.cancel_requested.push(*id);
            }
        }
        Ok(reply)
    }

    fn load(&mut self, id: TaskId) -> Result<Option<Task>> {
        self.conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM tasks WHERE id = ?1"))
            .and_then(|mut s| s.query_row([&id.as_bytes()[..]], task_from_row).optional())
            .map_err(|e| Error::store("reading a task", e))
    }

    /// Writes back the fields that commands and recovery change. The priority is among them,
    /// so that the queue index (priority, then age) orders the next claim by the new one. Of
    /// the result, only its clearing (a recovery's new error) is written: neither gives one.
    fn save(&mut self, task: &Task) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE tasks SET status = ?2, attempt = ?3, max_attempts = ?4, run_at = ?5, \
                 error_kind = ?6, error_message = ?7, updated_at = ?8, finished_at = ?9, \
                 lease_until = ?10, cancel_requested = ?11, priority = ?12, progress = ?13, \
                 progress_message = ?14, interrupted_attempts = ?15, attempts = ?16, \
                 result = CASE WHEN ?17 THEN NULL ELSE result END, started_at = ?18 WHERE id = ?1",
            )
            .and_then(|mut s| {
                s.execute(params![
                    &task.id.as_bytes()[..],
                    task.status.code(),
                    task.attempt,
                    task.max_attempts,
                    task.run_at.map(|t| t.0),
                    task.error.as_ref().map(|e| e.kind.code()),
                    task.error.as_ref().map(|e| e.message.as_str()),
                    task.updated_at.0,
                    task.finished_at.map(|t| t.0),
                    task.lease_until.map(|t| t.0),
                    task.cancel_requested,
                    task.priority.get(),
                    task.progress,
                    task.progress_message,
                    task.interrupted_attempts,
                    attempts_text(&task.attempts),
                    task.result.is_none(),
                    task.started_at.map(|t| t.0),
                ])
            })
            .map_err(|e| Error::store("updating a task", e))?;
        Ok(())
    }

    fn command(
        &mut self,
        id: TaskId,
        command: Command,
        now: Timestamp,
        counts: &mut Vec<CountChange>,
    ) -> Result<Task> {
        let mut task = self.load(id)?.ok_or(Error::TaskNotFound { id })?;
        let before = task.status;
        apply::command(&mut task, command, now)?;
        self.save(&task)?;
        counts.push(CountChange {
            task_type: task.task_type.clone(),
            from: Some(before),
            to: Some(task.status),
        });
        Ok(task)
    }

    /// Gives back attempts claimed but never started: as [`apply::release`] does, one task at
    /// a time (rare: at a shutdown, a pause, or when claimed-ahead tasks waited too long).
    fn release(
        &mut self,
        held: &[(TaskId, u32)],
        now: Timestamp,
        counts: &mut Vec<CountChange>,
    ) -> Result<usize> {
        let mut released = 0;
        for (id, attempt) in held {
            let Some(mut task) = self.load(*id)? else {
                continue;
            };
            let before = task.status;
            if !apply::release(&mut task, *attempt, now) {
                continue;
            }
            self.save(&task)?;
            counts.push(CountChange {
                task_type: task.task_type.clone(),
                from: Some(before),
                to: Some(task.status),
            });
            released += 1;
        }
        Ok(released)
    }

    fn recover(
        &mut self,
        now: Timestamp,
        which: Recover,
        counts: &mut Vec<CountChange>,
    ) -> Result<Vec<Task>> {
        let sql = match which {
            Recover::Expired => format!(
                "SELECT {COLUMNS} FROM tasks INDEXED BY tasks_by_status \
                 WHERE {} AND lease_until < ?1",
                sql_leased!()
            ),
            // Running, and frozen (paused while running: they hold a lease).
            Recover::AllRunning => format!(
                "SELECT {COLUMNS} FROM tasks INDEXED BY tasks_by_status \
                 WHERE {} AND ?1 IS NOT NULL",
                sql_held!()
            ),
        };
        let stale: Vec<Task> = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| s.query_map([now.0], task_from_row)?.collect())
            .map_err(|e| Error::store("finding expired leases", e))?;
        let mut recovered = Vec::with_capacity(stale.len());
        for mut task in stale {
            let before = task.status;
            apply::recover(&mut task, now)?;
            self.save(&task)?;
            counts.push(CountChange {
                task_type: task.task_type.clone(),
                from: Some(before),
                to: Some(task.status),
            });
            recovered.push(task);
        }
        Ok(recovered)
    }

    fn prune(
        &mut self,
        before: Timestamp,
        limit: usize,
        counts: &mut Vec<CountChange>,
    ) -> Result<usize> {
        let removed: Vec<(String, u8)> = self
            .conn
            .prepare_cached(concat!(
                "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks INDEXED BY tasks_finished \
                 WHERE ",
                sql_terminal!(),
                " AND finished_at < ?1 ORDER BY finished_at LIMIT ?2) RETURNING task_type, status"
            ))
            .and_then(|mut s| {
                s.query_map(params![before.0, limit as i64], |row| {
                    Ok((row.get("task_type")?, row.get("status")?))
                })?
                .collect()
            })
            .map_err(|e| Error::store("pruning finished tasks", e))?;
        let count = removed.len();
        counts.extend(removed.into_iter().map(|(task_type, code)| CountChange {
            task_type,
            from: Status::from_code(code),
            to: None,
        }));
        Ok(count)
    }

    /// Deletes the oldest finished tasks that match `filter`, in one statement: the pruner's
    /// query (on the finished index) with the filter's conditions added.
    fn delete_finished(
        &mut self,
        filter: &ListFilter,
        before: Timestamp,
        limit: usize,
        counts: &mut Vec<CountChange>,
    ) -> Result<usize> {
        let Some(statuses) = finished_statuses(filter).filter(|_| limit > 0) else {
            return Ok(0);
        };
        let mut values: Vec<rusqlite::types::Value> = vec![
            before.0.into(),
            i64::try_from(limit).unwrap_or(i64::MAX).into(),
        ];
        let mut clauses = vec![sql_terminal!().to_owned(), "finished_at < ?1".to_owned()];
        clauses.extend(statuses);
        clauses.extend(field_clauses(filter, &mut values));
        let sql = format!(
            "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks INDEXED BY tasks_finished \
             WHERE {} ORDER BY finished_at, seq LIMIT ?2) RETURNING task_type, status",
            clauses.join(" AND ")
        );
        let removed: Vec<(String, u8)> = self
            .conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_map(rusqlite::params_from_iter(values.iter()), |row| {
                    Ok((row.get("task_type")?, row.get("status")?))
                })?
                .collect()
            })
            .map_err(|e| Error::store("deleting finished tasks", e))?;
        let count = removed.len();
        counts.extend(removed.into_iter().map(|(task_type, code)| CountChange {
            task_type,
            from: Status::from_code(code),
            to: None,
        }));
        Ok(count)
    }

    /// See [`crate::store::Store::reassign_owner`]: one statement ([`REASSIGN_OWNER`]).
    fn reassign_owner(&mut self, from: &str, to: &str) -> Result<u64> {
        if from == to {
            return Ok(0);
        }
        let moved = self
            .conn
            .prepare_cached(REASSIGN_OWNER)
            .and_then(|mut s| s.execute(params![from, to]))
            .map_err(|e| Error::store("reassigning tasks to another owner", e))?;
        Ok(moved as u64)
    }
}

/// Gives `?1`'s tasks to `?2` in one statement, but for those whose idempotency key `?2`
/// already holds (the unique index `tasks_idempotency` would refuse them). No count changes:
/// the counts are by type and status. The owner has no index of its own: a scan of the table,
/// for a request made once at start.
const REASSIGN_OWNER: &str = "UPDATE OR FAIL tasks SET owner = ?2 WHERE owner = ?1 AND NOT EXISTS \
    (SELECT 1 FROM tasks AS taken WHERE coalesce(taken.owner, '') = ?2 \
    AND taken.idempotency_key = tasks.idempotency_key)";

pub(super) fn fail_op(op: WriteOp, error: &Error) {
    let error = error.clone();
    match op {
        WriteOp::Submit(_, reply) => drop(reply.send(Err(error))),
        WriteOp::SubmitAndClaim(_, _, reply) => drop(reply.send(Err(error))),
        WriteOp::Claim(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Promote(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Finish(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Release(_, _, reply) => drop(reply.send(Err(error))),
        WriteOp::Progress(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Heartbeat(_, reply) => drop(reply.send(Err(error))),
        WriteOp::Command(_, _, _, reply) => drop(reply.send(Err(error))),
        WriteOp::Recover(_, _, reply) => drop(reply.send(Err(error))),
        WriteOp::Prune(_, _, reply) => drop(reply.send(Err(error))),
        WriteOp::DeleteFinished(_, _, _, reply) => drop(reply.send(Err(error))),
        WriteOp::ReassignOwner(_, _, reply) => drop(reply.send(Err(error))),
        WriteOp::Flush(reply) => drop(reply.send(Err(error))),
        WriteOp::Restore => {}
    }
}

/// How long the writer keeps looking for the next request (yielding its core in between) before
/// it sleeps on the channel.
pub(super) const WRITER_SPIN: Duration = Duration::from_micros(300);

/// The next write request. Requests come in bursts (a claim follows a submit, a finish follows a
/// claim), so the writer first looks for one for a short while, yielding its core in between,
/// before it sleeps on the channel: waking a sleeping thread costs more than the looking.
/// `None` once the store is closed.
pub(super) fn next_request(requests: &mpsc::Receiver<WriteOp>) -> Option<WriteOp> {
    let spin_until = Instant::now() + WRITER_SPIN;
    loop {
        match requests.try_recv() {
            Ok(op) => return Some(op),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if Instant::now() < spin_until => {
                std::thread::yield_now()
            }
            Err(mpsc::TryRecvError::Empty) => return requests.recv().ok(),
        }
    }
}
