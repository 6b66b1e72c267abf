//! The writer: one task that owns the writing connection and commits the requests waiting for it
//! in one transaction (group commit), answering each only after the commit.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Statement};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::model::{MAX_ATTEMPT_RECORDS, Status, Task, TaskId, Timestamp};
use crate::state::decide;
use crate::store::{
    ClaimRequest, Command, Finish, Heartbeat, HeartbeatReply, ListFilter, Outcome, ProgressUpdate,
    Promoted, Recover, Submitted, apply,
};

use super::listen::payload;
use crate::store::common::{
    Bind, CountChange, attempts_text, field_clauses, finished_statuses, json_text, millis,
    net_counts, sql_held, sql_leased, sql_status, sql_terminal, tags_text,
};

use super::rows::{COLUMNS, STORED, big, code, seq_of, status, task_from_row, uuid};
use super::{Backoff, Part, Shared, describe, is_lost};

/// A write request.
pub(super) enum Request {
    Submit(Vec<Task>),
    SubmitAndClaim(Vec<Task>, ClaimRequest),
    Claim(ClaimRequest),
    Promote(Timestamp),
    Finish(Finish),
    /// A finish run again because the connection broke while its commit was in flight: if it is
    /// fenced out now, it may be by its own first run, which the task's record tells.
    FinishAgain(Finish),
    Progress(ProgressUpdate),
    Heartbeat(Heartbeat),
    Command(TaskId, Command, Timestamp),
    /// Attempts claimed but never started, given back (not repeatable: the attempt number a
    /// release restores is the one the task's next claim takes again).
    Release(Vec<(TaskId, u32)>, Timestamp),
    Recover(Timestamp, Recover),
    Prune(Timestamp, usize),
    DeleteFinished(ListFilter, Timestamp, usize),
    /// From one owner to another.
    ReassignOwner(String, String),
    Flush,
}

impl Request {
    /// Whether running the request twice does what running it once does, so that it may be run
    /// again when a commit's outcome is unknown.
    fn repeatable(&self) -> bool {
        matches!(
            self,
            Request::Promote(_)
                | Request::Progress(_)
                | Request::Heartbeat(_)
                | Request::FinishAgain(_)
                | Request::Flush
        )
    }
}

/// The answer to a write request.
pub(super) enum Answer {
    Submitted(Vec<Submitted>),
    SubmittedAndClaimed(Vec<Submitted>, Vec<Task>),
    Tasks(Vec<Task>),
    Promoted(Promoted),
    Applied(bool),
    Heartbeat(HeartbeatReply),
    Task(Box<Task>),
    Count(usize),
    Moved(u64),
    Done,
}

/// A request waiting for its answer.
pub(super) struct Pending {
    pub(super) request: Request,
    pub(super) reply: oneshot::Sender<Result<Answer>>,
    /// When it was sent: it waits at most `unavailable_wait` for an unreachable database.
    pub(super) since: Instant,
    /// How many times its transaction was cut off by a broken connection.
    pub(super) tries: u32,
}

/// How many times a writer yields to other tasks for more requests before it starts a
/// transaction.
const LINGER_YIELDS: usize = 3;

/// How many times a request is run again after its connection broke under it, before it fails.
const MAX_TRIES: u32 = 5;

type PgError = tokio_postgres::Error;

/// The writing connection, with its prepared statements.
pub(super) struct WriteConn {
    client: Client,
    statements: HashMap<String, Statement>,
    /// A transaction was begun and `BEGIN` is not sent yet: it goes out with the next statement,
    /// in the same round trip.
    begin_pending: bool,
    /// The connection's server process (`pg_backend_pid`).
    backend: Option<i32>,
}

impl WriteConn {
    pub(super) async fn open(shared: &Shared) -> std::result::Result<WriteConn, PgError> {
        let client = shared.connect().await?;
        // Every statement of the writer is meant to walk an index (the claim the queue index,
        // in its order; the others primary-key or id lookups). Pinned here, as `INDEXED BY` pins
        // them in SQLite: with statistics that lag behind the table (a fresh table, a burst of
        // submissions before autovacuum analyzes it) the planner takes the queue for a few rows,
        // then sorts all of it on every claim, or hashes the whole table to update a batch.
        // A statement with no other way still runs: these settings only make the others costly.
        client
            .batch_execute(
                "SET enable_seqscan = off; SET enable_bitmapscan = off; SET enable_sort = off",
            )
            .await?;
        let backend = client
            .query_one("SELECT pg_backend_pid() AS pid", &[])
            .await?
            .try_get("pid")
            .ok();
        Ok(WriteConn {
            client,
            statements: HashMap::new(),
            begin_pending: false,
            backend,
        })
    }

    pub(super) fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    async fn statement(&mut self, sql: &str) -> std::result::Result<Statement, PgError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        if self.statements.len() >= 256 {
            self.statements.clear();
        }
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Vec<Row>, PgError> {
        let statement = self.statement(sql).await?;
        if std::mem::take(&mut self.begin_pending) {
            let (begun, rows) = tokio::join!(
                biased;
                self.client.batch_execute("BEGIN"),
                self.client.query(&statement, params),
            );
            begun?;
            return rows;
        }
        self.client.query(&statement, params).await
    }

    async fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<u64, PgError> {
        let statement = self.statement(sql).await?;
        if std::mem::take(&mut self.begin_pending) {
            let (begun, changed) = tokio::join!(
                biased;
                self.client.batch_execute("BEGIN"),
                self.client.execute(&statement, params),
            );
            begun?;
            return changed;
        }
        self.client.execute(&statement, params).await
    }
}

/// Runs the writer until the store is closed and every request sent is answered.
/// The requests of a store, taken by its writers in turn.
pub(super) type Requests = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Pending>>>;

/// Runs writer number `index` until the store is closed and every request sent is answered.
/// The writers of a store take turns at the channel: each takes what is waiting, and commits it
/// while the next one takes what arrives meanwhile, so that their commits overlap (PostgreSQL
/// flushes the WAL of commits that wait together once).
///
/// `closing` fires when the store closes: a transaction in doubt then stops waiting for the
/// database.
pub(super) async fn run(
    shared: Arc<Shared>,
    index: usize,
    first: WriteConn,
    requests: Requests,
    closing: CancellationToken,
) {
    let max_batch = shared.config.max_batch.max(1);
    let mut conn = Some(first);
    let mut backoff = Backoff::new(&shared.config);
    let mut batch: Vec<Pending> = Vec::with_capacity(max_batch);
    // The transaction of the first requests of `batch`, when its commit was cut off.
    let mut doubt: Option<InDoubt> = None;
    loop {
        if batch.is_empty() {
            let mut receiver = requests.lock().await;
            match receiver.recv().await {
                Some(pending) => batch.push(pending),
                None => return,
            }
            take_waiting(&mut receiver, &mut batch, max_batch);
            // Requests come in bursts (the finishes of a claimed batch): let the tasks that are
            // about to send theirs run first, a few times, before the transaction starts.
            for _ in 0..LINGER_YIELDS {
                if batch.len() >= max_batch {
                    break;
                }
                tokio::task::yield_now().await;
                take_waiting(&mut receiver, &mut batch, max_batch);
            }
        } else if let Ok(mut receiver) = requests.try_lock() {
            take_waiting(&mut receiver, &mut batch, max_batch);
        }
        let live = match conn.as_mut() {
            Some(live) if !live.client.is_closed() => live,
            _ => {
                conn = None;
                match WriteConn::open(&shared).await {
                    Ok(opened) => {
                        backoff.reset();
                        conn.insert(opened)
                    }
                    Err(error) => {
                        let error = shared.unreachable("writing", &error);
                        shared
                            .health
                            .failing(Part::Writer(index), error.to_string());
                        // A transaction in doubt waits for the database however long it
                        // is away, since only the database can say whether it committed (a
                        // claim given up on would leave its tasks running with no worker),
                        // unless the store is closing. The other requests wait at most
                        // `unavailable_wait`.
                        if closing.is_cancelled()
                            && let Some(open) = doubt.take()
                        {
                            fail_unknown(&mut batch, open.answers.len(), &error);
                        }
                        let in_doubt = doubt.as_ref().map_or(0, |open| open.answers.len());
                        let oldest = batch[in_doubt..].iter().map(|p| p.since).min();
                        if oldest.is_some_and(|at| at.elapsed() >= shared.config.unavailable_wait) {
                            for pending in batch.drain(in_doubt..) {
                                let _ = pending.reply.send(Err(error.clone()));
                            }
                        }
                        if !batch.is_empty() {
                            tokio::select! {
                                _ = tokio::time::sleep(backoff.pause()) => {}
                                _ = closing.cancelled(), if doubt.is_some() => {}
                            }
                        }
                        continue;
                    }
                }
            }
        };
        if let Some(open) = doubt.take() {
            // Settle the transaction cut off on the last connection before anything else.
            match fate(live, open.xid).await {
                Ok(Fate::Committed) => {
                    shared.health.working(Part::Writer(index));
                    let settled: Vec<Pending> = batch.drain(..open.answers.len()).collect();
                    for (pending, answer) in settled.into_iter().zip(open.answers) {
                        let _ = pending.reply.send(answer);
                    }
                }
                // Nothing of it was written: its requests run again.
                Ok(Fate::RolledBack) => {}
                Ok(Fate::Running)
                    if open
                        .running_since
                        .is_none_or(|at| at.elapsed() < shared.config.unavailable_wait) =>
                {
                    // The server has not noticed that the connection is gone (a network break
                    // rather than a crash): end its process, which ends the transaction one
                    // way or the other, and ask again.
                    if open.running_since.is_none()
                        && let Some(pid) = open.backend
                    {
                        let _ = live
                            .client
                            .execute("SELECT pg_terminate_backend($1)", &[&pid])
                            .await;
                    }
                    doubt = Some(InDoubt {
                        running_since: open.running_since.or(Some(Instant::now())),
                        ..open
                    });
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(Fate::Running | Fate::Forgotten) => {
                    let error = Error::store(
                        "committing",
                        "the database could not say whether the transaction committed",
                    );
                    fail_unknown(&mut batch, open.answers.len(), &error);
                }
                Err(error) => {
                    let error = Error::store("committing", describe(&error));
                    if !live.client.is_closed() {
                        fail_unknown(&mut batch, open.answers.len(), &error);
                    } else {
                        // Ask again on the next connection.
                        shared
                            .health
                            .failing(Part::Writer(index), error.to_string());
                        conn = None;
                        doubt = Some(open);
                    }
                }
            }
            continue;
        }
        if let Err(broken) = commit_group(live, &shared, index, &mut batch).await {
            // The connection broke: the requests left in the batch run again on a new one, a
            // few times at most (a transaction in doubt is settled first; its requests wait).
            let Broken {
                error: lost,
                doubt: cut_off,
            } = broken;
            shared.health.failing(Part::Writer(index), lost.to_string());
            conn = None;
            if cut_off.is_some() {
                doubt = cut_off;
                continue;
            }
            let mut kept = Vec::with_capacity(batch.len());
            for mut pending in batch.drain(..) {
                pending.tries += 1;
                if pending.tries >= MAX_TRIES {
                    let _ = pending.reply.send(Err(lost.clone()));
                } else {
                    kept.push(pending);
                }
            }
            batch = kept;
        }
    }
}

/// Moves the requests waiting in the channel to `batch`, up to `max_batch`.
fn take_waiting(
    receiver: &mut mpsc::UnboundedReceiver<Pending>,
    batch: &mut Vec<Pending>,
    max_batch: usize,
) {
    while batch.len() < max_batch {
        match receiver.try_recv() {
            Ok(pending) => batch.push(pending),
            Err(_) => break,
        }
    }
}

/// Why a transaction did not commit.
enum Failed {
    /// A deadlock or a serialization failure with another node's transaction: try again.
    Conflict(Error),
    /// A statement failed (bad data, a broken constraint): the transaction rolled back.
    Statement(Error),
    /// The connection broke; `committing`: while `COMMIT` was in flight, so the outcome is not
    /// known.
    Lost { error: Error, committing: bool },
    /// The connection broke while `COMMIT` was in flight, but the transaction's id is known:
    /// the database can say how it ended.
    InDoubt { error: Error, doubt: InDoubt },
}

/// A transaction whose connection broke while its `COMMIT` was in flight: its id (asked for
/// just before `COMMIT`, in the same round trip) and the answers its requests get if it
/// committed. On the next connection, the writer asks `txid_status` how it ended: committed,
/// the answers go out; rolled back (a crash before the commit record was flushed, say), the
/// requests run again. So a claim whose answer was lost does not leave its tasks running with
/// no worker (they would be failed as `worker_lost` when their lease ran out), and a submission
/// is not refused with "it may or may not have been made".
pub(super) struct InDoubt {
    xid: i64,
    /// The server process of the broken connection: when the database still runs the
    /// transaction (it has not noticed that the connection is gone), it is told to end it.
    backend: Option<i32>,
    /// When the database was first seen still running the transaction.
    running_since: Option<Instant>,
    /// The answers of the first `answers.len()` requests of the batch.
    answers: Vec<Result<Answer>>,
}

/// A connection that broke under a batch, and the transaction left in doubt, if any.
pub(super) struct Broken {
    error: Error,
    doubt: Option<InDoubt>,
}

impl From<Error> for Broken {
    fn from(error: Error) -> Broken {
        Broken { error, doubt: None }
    }
}

/// Commits `batch` and answers its requests, emptying it. When a statement fails, runs each
/// request in a transaction of its own, so that one bad request fails alone. Returns the error
/// when the connection broke, leaving in `batch` the requests still to run (and with it the
/// transaction left in doubt, whose requests are the first of `batch`).
async fn commit_group(
    conn: &mut WriteConn,
    shared: &Shared,
    index: usize,
    batch: &mut Vec<Pending>,
) -> std::result::Result<(), Broken> {
    let mut conflicts = 0;
    loop {
        let requests: Vec<&Request> = batch.iter().map(|p| &p.request).collect();
        match transaction(conn, shared, &requests).await {
            Ok(answers) => {
                shared.health.working(Part::Writer(index));
                for (pending, answer) in batch.drain(..).zip(answers) {
                    let _ = pending.reply.send(answer);
                }
                return Ok(());
            }
            Err(Failed::Conflict(_)) if conflicts < 3 => conflicts += 1,
            Err(Failed::Conflict(error) | Failed::Statement(error)) => {
                if batch.len() == 1 {
                    let pending = batch.remove(0);
                    let _ = pending.reply.send(Err(error));
                    return Ok(());
                }
                return one_by_one(conn, shared, index, batch).await;
            }
            Err(Failed::Lost { error, committing }) => {
                if committing {
                    let all = batch.len();
                    fail_unknown(batch, all, &error);
                }
                return Err(error.into());
            }
            Err(Failed::InDoubt { error, doubt }) => {
                return Err(Broken {
                    error,
                    doubt: Some(doubt),
                });
            }
        }
    }
}

/// Runs each request of `batch` in a transaction of its own.
async fn one_by_one(
    conn: &mut WriteConn,
    shared: &Shared,
    index: usize,
    batch: &mut Vec<Pending>,
) -> std::result::Result<(), Broken> {
    while !batch.is_empty() {
        let mut answers = match transaction(conn, shared, &[&batch[0].request]).await {
            Ok(answers) => answers,
            Err(Failed::Conflict(error) | Failed::Statement(error)) => vec![Err(error)],
            Err(Failed::Lost { error, committing }) => {
                if committing {
                    // Only the first request was in the transaction; the others never ran.
                    fail_unknown(batch, 1, &error);
                }
                return Err(error.into());
            }
            Err(Failed::InDoubt { error, doubt }) => {
                return Err(Broken {
                    error,
                    doubt: Some(doubt),
                });
            }
        };
        let pending = batch.remove(0);
        let _ = pending.reply.send(
            answers
                .pop()
                .unwrap_or_else(|| Err(Error::store("writing", "no answer"))),
        );
    }
    shared.health.working(Part::Writer(index));
    Ok(())
}

/// Fails the first `count` requests of `batch`, whose commit may or may not have happened,
/// keeping those safe to repeat (a finish is repeated as [`Request::FinishAgain`]).
fn fail_unknown(batch: &mut Vec<Pending>, count: usize, error: &Error) {
    let mut kept = Vec::with_capacity(batch.len());
    let rest = batch.split_off(count.min(batch.len()));
    for mut pending in batch.drain(..) {
        if let Request::Finish(_) = pending.request
            && let Request::Finish(finish) = std::mem::replace(&mut pending.request, Request::Flush)
        {
            pending.request = Request::FinishAgain(finish);
        }
        if pending.request.repeatable() {
            kept.push(pending);
        } else {
            let _ = pending.reply.send(Err(Error::Store {
                action: "committing",
                message: format!(
                    "the connection to the database broke while the change was being committed, so it may or may not have been made (read the task to see): {error}"
                ),
            }));
        }
    }
    kept.extend(rest);
    *batch = kept;
}

/// What a transaction changed besides its rows: counts, and the work it made ready.
#[derive(Default)]
struct Effects {
    counts: Vec<CountChange>,
    /// A task became claimable.
    queued: bool,
    /// The earliest `run_at` of tasks that became scheduled.
    due: Option<i64>,
}

impl Effects {
    fn moved(&mut self, task_type: &str, from: Option<Status>, to: Option<Status>) {
        self.counts.push(CountChange {
            task_type: task_type.to_owned(),
            from,
            to,
        });
        match to {
            Some(Status::Queued) if from != Some(Status::Queued) => self.queued = true,
            _ => {}
        }
    }

    fn scheduled(&mut self, run_at: Option<Timestamp>) {
        if let Some(at) = run_at {
            self.due = Some(self.due.map_or(at.0, |due| due.min(at.0)));
        }
    }

    /// Notes a task that moved to `task.status`.
    fn task(&mut self, task: &Task, from: Option<Status>) {
        self.moved(&task.task_type, from, Some(task.status));
        if task.status == Status::Scheduled {
            self.scheduled(task.run_at);
        }
    }
}

/// How a request failed inside a transaction.
enum Exec {
    /// Refused before it wrote anything (an illegal transition, an unknown task): the
    /// transaction goes on for the other requests.
    Refused(Error),
    /// Failed after it may have written: the transaction must not commit.
    Abort(Error),
    /// A statement failed.
    Db(PgError),
}

impl From<PgError> for Exec {
    fn from(error: PgError) -> Exec {
        Exec::Db(error)
    }
}

fn classify(error: PgError, action: &'static str, committing: bool) -> Failed {
    let words = Error::store(action, describe(&error));
    if is_lost(&error) {
        return Failed::Lost {
            error: words,
            committing,
        };
    }
    match error.code().map(|c| c.code()) {
        Some("40P01" | "40001") => Failed::Conflict(words),
        _ => Failed::Statement(words),
    }
}

/// Runs `requests` in one transaction and commits it; the answers are in their order.
async fn transaction(
    conn: &mut WriteConn,
    shared: &Shared,
    requests: &[&Request],
) -> std::result::Result<Vec<Result<Answer>>, Failed> {
    if requests.iter().all(|r| matches!(r, Request::Flush)) {
        return Ok(requests.iter().map(|_| Ok(Answer::Done)).collect());
    }
    // `BEGIN` goes out with the first statement (see `WriteConn::begin`).
    conn.begin_pending = true;
    let mut effects = Effects::default();
    let mut answers = Vec::with_capacity(requests.len());
    let mut index = 0;
    let mut failure = None;
    while index < requests.len() {
        // Finishes that come together are written together (when no task repeats among them).
        let mut end = index;
        let mut ids = HashSet::new();
        while let Some(Request::Finish(finish)) = requests.get(end)
            && ids.insert(finish.id)
        {
            end += 1;
        }
        let result = if end > index {
            let finishes: Vec<&Finish> = requests[index..end]
                .iter()
                .filter_map(|r| match r {
                    Request::Finish(finish) => Some(finish),
                    _ => None,
                })
                .collect();
            finish_all(conn, &finishes, &mut effects)
                .await
                .map(|applied| {
                    answers.extend(applied.into_iter().map(|a| Ok(Answer::Applied(a))));
                })
        } else {
            end = index + 1;
            match execute(conn, shared, requests[index], &mut effects).await {
                Ok(answer) => {
                    answers.push(Ok(answer));
                    Ok(())
                }
                Err(Exec::Refused(error)) => {
                    answers.push(Err(error));
                    Ok(())
                }
                Err(other) => Err(other),
            }
        };
        if let Err(error) = result {
            failure = Some(error);
            break;
        }
        index = end;
    }
    if let Some(failure) = failure {
        let failed = match failure {
            Exec::Db(error) => classify(error, "writing", false),
            Exec::Abort(error) | Exec::Refused(error) => Failed::Statement(error),
        };
        // Nothing to roll back when nothing was sent.
        if !std::mem::take(&mut conn.begin_pending)
            && let Err(error) = conn.client.batch_execute("ROLLBACK").await
        {
            return Err(classify(error, "rolling back", false));
        }
        return Err(failed);
    }
    // The transaction's id is asked for when it holds a request not safe to repeat, so that a
    // commit whose answer is lost can be settled (see `InDoubt`).
    let ask_xid = requests.iter().any(|r| !r.repeatable());
    match commit(conn, shared, &effects, ask_xid).await {
        Ok(()) => Ok(answers),
        Err(Failed::InDoubt { error, doubt }) => Err(Failed::InDoubt {
            error,
            doubt: InDoubt { answers, ..doubt },
        }),
        Err(failed) => Err(failed),
    }
}

/// The upsert of this node's partial counts.
const COUNTS: &str = "INSERT INTO task_counts (node, task_type, status, count) \
    SELECT $1, t, s, c FROM unnest($2::text[], $3::int2[], $4::int8[]) AS u(t, s, c) \
    ON CONFLICT (node, task_type, status) DO UPDATE SET count = task_counts.count + excluded.count";

/// Writes the transaction's count changes (this node's partial sums) and its wake-up notice,
/// and commits: all in one round trip (the statements are sent without waiting for each other's
/// answers). A statement that fails makes PostgreSQL answer the `COMMIT` with a rollback.
///
/// With `ask_xid`, the transaction's id goes in the same round trip, just before `COMMIT`
/// (`txid_current_if_assigned`, so that a transaction that wrote nothing is not given one, and
/// its commit stays free of a WAL flush): when the connection then breaks before the `COMMIT`
/// is answered, the failure is [`Failed::InDoubt`] (with no answers yet), or no failure at all
/// when the transaction had written nothing.
async fn commit(
    conn: &mut WriteConn,
    shared: &Shared,
    effects: &Effects,
    ask_xid: bool,
) -> std::result::Result<(), Failed> {
    let net = net_counts(&effects.counts);
    let notice = (effects.queued || effects.due.is_some())
        .then(|| payload(effects.queued, effects.due, &shared.config.node_id));
    if conn.begin_pending && net.is_empty() && notice.is_none() {
        // No statement was sent: there is no transaction to commit.
        conn.begin_pending = false;
        return Ok(());
    }
    let prepare = |e| classify(e, "writing", false);
    let counts = match net.is_empty() {
        true => None,
        false => Some(conn.statement(COUNTS).await.map_err(prepare)?),
    };
    let notify = match notice {
        Some(_) => Some(
            conn.statement("SELECT pg_notify($1, $2)")
                .await
                .map_err(prepare)?,
        ),
        None => None,
    };
    let xid = match ask_xid {
        true => Some(
            conn.statement("SELECT txid_current_if_assigned() AS xid")
                .await
                .map_err(prepare)?,
        ),
        false => None,
    };
    let types: Vec<&str> = net.keys().map(|(t, _)| *t).collect();
    let statuses: Vec<i16> = net.keys().map(|(_, s)| code(*s)).collect();
    let deltas: Vec<i64> = net.values().copied().collect();
    let begin = std::mem::take(&mut conn.begin_pending);
    let client = &conn.client;
    let (begun, counted, notified, asked, committed) = tokio::join!(
        biased;
        async {
            match begin {
                true => client.batch_execute("BEGIN").await,
                false => Ok(()),
            }
        },
        async {
            match &counts {
                Some(statement) => client
                    .execute(statement, &[&shared.config.node_id, &types, &statuses, &deltas])
                    .await
                    .map(drop),
                None => Ok(()),
            }
        },
        async {
            match (&notify, &notice) {
                (Some(statement), Some(notice)) => client
                    .execute(statement, &[&shared.channel, notice])
                    .await
                    .map(drop),
                _ => Ok(()),
            }
        },
        async {
            match &xid {
                Some(statement) => client
                    .query_one(statement, &[])
                    .await
                    .and_then(|row| row.try_get::<_, Option<i64>>("xid"))
                    .map(Some),
                None => Ok(None),
            }
        },
        client.batch_execute("COMMIT"),
    );
    for result in [begun, counted, notified] {
        if let Err(error) = result {
            // Rolled back by the server, unless the connection broke: then it is not known.
            return Err(classify(error, "committing", true));
        }
    }
    let xid = match asked {
        Ok(xid) => xid,
        Err(error) => return Err(classify(error, "committing", true)),
    };
    match committed.map_err(|e| classify(e, "committing", true)) {
        Ok(()) => Ok(()),
        Err(Failed::Lost {
            error,
            committing: true,
        }) => match xid {
            Some(Some(xid)) => Err(Failed::InDoubt {
                error,
                doubt: InDoubt {
                    xid,
                    backend: conn.backend,
                    running_since: None,
                    answers: Vec::new(),
                },
            }),
            // It had written nothing: committed or not, its answers hold.
            Some(None) => Ok(()),
            None => Err(Failed::Lost {
                error,
                committing: true,
            }),
        },
        Err(failed) => Err(failed),
    }
}

/// How a transaction left in doubt ended, as the database tells (`txid_status`).
enum Fate {
    Committed,
    RolledBack,
    /// Still running: the server has not yet noticed that its connection is gone.
    Running,
    /// Too old for the database to remember.
    Forgotten,
}

/// Asks the database how the transaction `xid` ended.
async fn fate(conn: &mut WriteConn, xid: i64) -> std::result::Result<Fate, PgError> {
    let row = conn
        .client
        .query_one("SELECT txid_status($1) AS status", &[&xid])
        .await?;
    Ok(
        match row.try_get::<_, Option<String>>("status")?.as_deref() {
            Some("committed") => Fate::Committed,
            Some("aborted") => Fate::RolledBack,
            Some(_) => Fate::Running,
            None => Fate::Forgotten,
        },
    )
}

async fn execute(
    conn: &mut WriteConn,
    shared: &Shared,
    request: &Request,
    effects: &mut Effects,
) -> std::result::Result<Answer, Exec> {
    let node = shared.config.node_id.as_str();
    match request {
        Request::Submit(tasks) => Ok(Answer::Submitted(
            submit(conn, shared, tasks, effects).await?,
        )),
        Request::SubmitAndClaim(tasks, claim_request) => {
            let submitted = submit(conn, shared, tasks, effects).await?;
            let claimed = claim(conn, node, claim_request, effects).await?;
            Ok(Answer::SubmittedAndClaimed(submitted, claimed))
        }
        Request::Claim(claim_request) => Ok(Answer::Tasks(
            claim(conn, node, claim_request, effects).await?,
        )),
        Request::Promote(now) => Ok(Answer::Promoted(promote(conn, *now, effects).await?)),
        Request::Finish(finish) => {
            let applied = finish_all(conn, &[finish], effects).await?;
            Ok(Answer::Applied(applied.first().copied().unwrap_or(false)))
        }
        Request::FinishAgain(finish) => {
            let applied = finish_all(conn, &[finish], effects).await?;
            if applied.first().copied().unwrap_or(false) {
                return Ok(Answer::Applied(true));
            }
            // Fenced out: by its own first run if the record ends this attempt at its time.
            let rows = conn
                .query(
                    concat!(
                        "SELECT 1 FROM tasks WHERE id = $1 AND attempt = $2 AND updated_at = $3 \
                         AND NOT ",
                        sql_leased!(),
                        " UNION ALL SELECT 1 FROM tasks_done WHERE id = $1 AND attempt = $2 \
                         AND updated_at = $3"
                    ),
                    &[&uuid(finish.id), &i64::from(finish.attempt), &finish.now.0],
                )
                .await?;
            Ok(Answer::Applied(!rows.is_empty()))
        }
        Request::Progress(update) => Ok(Answer::Applied(progress(conn, update).await?)),
        Request::Heartbeat(heartbeat) => {
            Ok(Answer::Heartbeat(heartbeat_all(conn, heartbeat).await?))
        }
        Request::Command(id, command, now) => Ok(Answer::Task(Box::new(
            apply_command(conn, *id, *command, *now, effects).await?,
        ))),
        Request::Release(held, now) => Ok(Answer::Count(
            release(conn, node, held, *now, effects).await?,
        )),
        Request::Recover(now, which) => Ok(Answer::Tasks(
            recover(conn, node, *now, *which, effects).await?,
        )),
        Request::Prune(before, limit) => {
            Ok(Answer::Count(prune(conn, *before, *limit, effects).await?))
        }
        Request::DeleteFinished(filter, before, limit) => Ok(Answer::Count(
            delete_finished(conn, filter, *before, *limit, effects).await?,
        )),
        Request::ReassignOwner(from, to) => {
            Ok(Answer::Moved(reassign_owner(conn, from, to).await?))
        }
        Request::Flush => Ok(Answer::Done),
    }
}

/// The columns a submission writes, in the order of [`SUBMIT`]'s arrays.
const SUBMIT: &str = "INSERT INTO tasks (id, task_type, params, priority, status, attempt, \
    max_attempts, retry_base_ms, retry_max_ms, timeout_ms, run_at, idempotency_key, owner, \
    session_id, created_at, updated_at, tags, home_node, interrupted_attempts, rerun_on_recovery, \
    fresh_session) \
    SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int2[], $5::int2[], $6::int8[], \
    $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::text[], $13::text[], \
    $14::text[], $15::int8[], $16::int8[], $17::text[], $18::text[], $19::int8[], $20::bool[], \
    $21::bool[]) RETURNING id";

/// Takes the idempotency keys of a submission's tasks in `task_keys`, in their order: returns
/// the ids of the tasks that got theirs. A key taken already (by an older task, whichever table
/// holds it, or by one earlier in the same submission) is skipped; a key another transaction is
/// taking makes this one wait for it to end.
const TAKE_KEYS: &str = "INSERT INTO task_keys (owner, key, id) \
    SELECT coalesce(o, ''), k, i FROM unnest($1::text[], $2::text[], $3::uuid[]) AS u(o, k, i) \
    ON CONFLICT (owner, key) DO NOTHING RETURNING id";

/// The task that holds an idempotency key (`$1` the owner, `$2` the key), in either table.
static KEY_HOLDER: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let holder = "(SELECT id FROM task_keys WHERE owner = coalesce($1::text, '') AND key = $2)";
    format!(
        "SELECT {COLUMNS} FROM tasks WHERE id = {holder} \
         UNION ALL SELECT {COLUMNS} FROM tasks_done WHERE id = {holder}"
    )
});

/// Inserts the tasks in one statement, in their order, after taking their idempotency keys in
/// another ([`TAKE_KEYS`], only when some have one); a task whose key (with its owner) is taken,
/// by an older task or one earlier in the same submission, is not inserted but answered with the
/// task that has it.
async fn submit(
    conn: &mut WriteConn,
    shared: &Shared,
    tasks: &[Task],
    effects: &mut Effects,
) -> std::result::Result<Vec<Submitted>, Exec> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let node = shared.config.node_id.as_str();
    // The keys first: a task whose key is taken is not inserted.
    let keyed: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.idempotency_key.is_some())
        .collect();
    let mut kept: HashSet<uuid::Uuid> = HashSet::new();
    if !keyed.is_empty() {
        let owners: Vec<Option<&str>> = keyed.iter().map(|t| t.owner.as_deref()).collect();
        let keys: Vec<Option<&str>> = keyed.iter().map(|t| t.idempotency_key.as_deref()).collect();
        let ids: Vec<uuid::Uuid> = keyed.iter().map(|t| uuid(t.id)).collect();
        for row in conn.query(TAKE_KEYS, &[&owners, &keys, &ids]).await? {
            kept.insert(row.try_get("id")?);
        }
    }
    let chosen: Vec<&Task> = tasks
        .iter()
        .filter(|t| t.idempotency_key.is_none() || kept.contains(&uuid(t.id)))
        .collect();
    let tasks_in = tasks;
    let tasks = &chosen;
    let ids: Vec<uuid::Uuid> = tasks.iter().map(|t| uuid(t.id)).collect();
    let types: Vec<&str> = tasks.iter().map(|t| t.task_type.as_str()).collect();
    let params: Vec<String> = tasks.iter().map(|t| json_text(&t.params)).collect();
    let priorities: Vec<i16> = tasks.iter().map(|t| i16::from(t.priority.get())).collect();
    let statuses: Vec<i16> = tasks.iter().map(|t| code(t.status)).collect();
    let attempts: Vec<i64> = tasks.iter().map(|t| i64::from(t.attempt)).collect();
    let max_attempts: Vec<i64> = tasks.iter().map(|t| i64::from(t.max_attempts)).collect();
    let bases: Vec<i64> = tasks.iter().map(|t| big(t.retry.base_delay_ms)).collect();
    let maxes: Vec<i64> = tasks.iter().map(|t| big(t.retry.max_delay_ms)).collect();
    let timeouts: Vec<Option<i64>> = tasks.iter().map(|t| millis(t.timeout)).collect();
    let run_ats: Vec<Option<i64>> = tasks.iter().map(|t| t.run_at.map(|at| at.0)).collect();
    let keys: Vec<Option<&str>> = tasks.iter().map(|t| t.idempotency_key.as_deref()).collect();
    let owners: Vec<Option<&str>> = tasks.iter().map(|t| t.owner.as_deref()).collect();
    let sessions: Vec<Option<&str>> = tasks.iter().map(|t| t.session_id.as_deref()).collect();
    let created: Vec<i64> = tasks.iter().map(|t| t.created_at.0).collect();
    let updated: Vec<i64> = tasks.iter().map(|t| t.updated_at.0).collect();
    let tags: Vec<Option<String>> = tasks.iter().map(|t| tags_text(&t.tags)).collect();
    let interrupted: Vec<i64> = tasks
        .iter()
        .map(|t| i64::from(t.interrupted_attempts))
        .collect();
    let reruns: Vec<bool> = tasks.iter().map(|t| t.rerun_on_recovery).collect();
    let fresh: Vec<bool> = tasks.iter().map(|t| t.fresh_session).collect();
    // A session made for the task alone binds it to no node: any node can make it.
    let homes: Vec<Option<&str>> = tasks
        .iter()
        .map(|t| {
            let bound = t.session_id.is_some() && !t.fresh_session;
            (shared.config.session_affinity && bound).then_some(node)
        })
        .collect();
    let inserted: HashSet<uuid::Uuid> = if tasks.is_empty() {
        HashSet::new()
    } else {
        conn.query(
            SUBMIT,
            &[
                &ids,
                &types,
                &params,
                &priorities,
                &statuses,
                &attempts,
                &max_attempts,
                &bases,
                &maxes,
                &timeouts,
                &run_ats,
                &keys,
                &owners,
                &sessions,
                &created,
                &updated,
                &tags,
                &homes,
                &interrupted,
                &reruns,
                &fresh,
            ],
        )
        .await?
        .iter()
        .map(|row| row.try_get("id"))
        .collect::<std::result::Result<_, _>>()?
    };
    let mut out = Vec::with_capacity(tasks_in.len());
    for task in tasks_in {
        if inserted.contains(&uuid(task.id)) {
            effects.task(task, None);
            out.push(Submitted {
                task: task.clone(),
                created: true,
            });
            continue;
        }
        // Not inserted: only an idempotency key does that (a taken id is an error).
        let rows = conn
            .query(&KEY_HOLDER, &[&task.owner, &task.idempotency_key])
            .await?;
        let existing = rows.first().ok_or_else(|| {
            Exec::Abort(Error::store(
                "submitting",
                "the task holding this idempotency key was deleted at the same moment; submit again",
            ))
        })?;
        out.push(Submitted {
            task: task_from_row(existing).map_err(Exec::Abort)?,
            created: false,
        });
    }
    Ok(out)
}

/// Claims in one statement: the head of the queue, skipping rows that other transactions hold.
/// The rows are then updated by `seq = ANY(ARRAY(…))`, a primary-key lookup whatever the batch
/// size (a join with the head can make the planner hash the whole table).
pub(super) const CLAIM: &str = concat!(
    "UPDATE tasks SET status = ",
    sql_status!(running),
    ", attempt = attempt + 1, \
    started_at = $4, updated_at = $4, lease_until = $5, run_at = NULL, progress = NULL, \
    progress_message = NULL, claimed_by = $2 \
    WHERE seq = ANY(ARRAY(SELECT seq FROM tasks \
    WHERE status = ",
    sql_status!(queued),
    " AND task_type <> ALL($1::text[]) AND (home_node IS NULL OR home_node = $2) \
    ORDER BY priority DESC, seq LIMIT $3 FOR UPDATE SKIP LOCKED))"
);

/// The head of the queue, locked, for a claim with per-type room.
const CANDIDATES: &str = concat!(
    "SELECT seq, task_type FROM tasks WHERE status = ",
    sql_status!(queued),
    " AND task_type <> ALL($1::text[]) AND (home_node IS NULL OR home_node = $2) \
    ORDER BY priority DESC, seq LIMIT $3 FOR UPDATE SKIP LOCKED"
);

/// Starts the attempts of locked queued rows.
const MARK: &str = concat!(
    "UPDATE tasks SET status = ",
    sql_status!(running),
    ", attempt = attempt + 1, started_at = $3, \
    updated_at = $3, lease_until = $4, run_at = NULL, progress = NULL, progress_message = NULL, \
    claimed_by = $2 WHERE seq = ANY($1::bigint[])"
);

/// Claims in queue order, honouring per-type room.
async fn claim(
    conn: &mut WriteConn,
    node: &str,
    request: &ClaimRequest,
    effects: &mut Effects,
) -> std::result::Result<Vec<Task>, Exec> {
    if request.max == 0 {
        return Ok(Vec::new());
    }
    let now = request.now.0;
    let lease = request.lease_until.0;
    let mut claimed: Vec<(i64, Task)> = Vec::new();
    if request.type_room.is_empty() {
        let rows = conn
            .query(
                &format!("{CLAIM} RETURNING {COLUMNS}, seq"),
                &[
                    &request.exclude_types,
                    &node,
                    &big(request.max as u64),
                    &now,
                    &lease,
                ],
            )
            .await?;
        for row in &rows {
            claimed.push((
                seq_of(row).map_err(Exec::Abort)?,
                task_from_row(row).map_err(Exec::Abort)?,
            ));
        }
    } else {
        let mut excluded = request.exclude_types.clone();
        let mut taken_by_type: HashMap<String, usize> = HashMap::new();
        loop {
            let want = request.max - claimed.len();
            if want == 0 {
                break;
            }
            let rows = conn
                .query(CANDIDATES, &[&excluded, &node, &big(want as u64)])
                .await?;
            let mut picked: Vec<i64> = Vec::new();
            let mut skipped = false;
            for row in &rows {
                let seq: i64 = row.try_get("seq")?;
                let task_type: String = row.try_get("task_type")?;
                if let Some(room) = request.room_for(&task_type) {
                    let taken = taken_by_type.entry(task_type.clone()).or_insert(0);
                    if *taken >= room {
                        skipped = true;
                        if !excluded.contains(&task_type) {
                            excluded.push(task_type);
                        }
                        continue;
                    }
                    *taken += 1;
                }
                picked.push(seq);
            }
            if !picked.is_empty() {
                let marked = conn
                    .query(
                        &format!("{MARK} RETURNING {COLUMNS}, seq"),
                        &[&picked, &node, &now, &lease],
                    )
                    .await?;
                for row in &marked {
                    claimed.push((
                        seq_of(row).map_err(Exec::Abort)?,
                        task_from_row(row).map_err(Exec::Abort)?,
                    ));
                }
            }
            // A short head is the whole queue; a head with nothing skipped was all taken.
            if rows.len() < want || !skipped {
                break;
            }
        }
    }
    claimed.sort_by_key(|(seq, task)| (std::cmp::Reverse(task.priority), *seq));
    for (_, task) in &claimed {
        effects.moved(&task.task_type, Some(Status::Queued), Some(Status::Running));
    }
    Ok(claimed.into_iter().map(|(_, task)| task).collect())
}

async fn promote(
    conn: &mut WriteConn,
    now: Timestamp,
    effects: &mut Effects,
) -> std::result::Result<Promoted, Exec> {
    let queued = decide(Status::Scheduled, crate::state::Event::Promote)
        .map_err(|t| Exec::Refused(Error::store("promoting", t)))?;
    let promoted = conn
        .query(
            concat!(
                "UPDATE tasks SET status = $2, run_at = NULL, updated_at = $1 \
                 WHERE seq = ANY(ARRAY(SELECT seq FROM tasks WHERE status = ",
                sql_status!(scheduled),
                " AND run_at <= $1 ORDER BY run_at FOR UPDATE SKIP LOCKED)) RETURNING task_type"
            ),
            &[&now.0, &code(queued)],
        )
        .await?;
    for row in &promoted {
        let task_type: String = row.try_get("task_type")?;
        effects.moved(&task_type, Some(Status::Scheduled), Some(queued));
    }
    let next_due: Option<i64> = conn
        .query(
            concat!(
                "SELECT min(run_at) AS next_due FROM tasks WHERE status = ",
                sql_status!(scheduled)
            ),
            &[],
        )
        .await?
        .first()
        .map(|row| row.try_get("next_due"))
        .transpose()?
        .flatten();
    Ok(Promoted {
        count: promoted.len(),
        next_due: next_due.map(Timestamp),
    })
}

/// The rows held by running (or frozen) attempts among `ids`, locked in `seq` order.
const HELD: &str = concat!(
    "SELECT seq, id, attempt, task_type, cancel_requested, status FROM tasks \
    WHERE id = ANY($1::uuid[]) AND ",
    sql_held!(),
    " ORDER BY seq FOR UPDATE"
);

/// Ends many attempts at once, appending each attempt's entry to the task's history
/// (`attempts`, trimmed to the last [`MAX_ATTEMPT_RECORDS`], 20): it ended at `u_updated_at`
/// with the outcome named `u_outcome`, run by the node that claimed it (`claimed_by`, as
/// `node`: left out when there is none, as [`crate::AttemptRecord::node`] serializes).
const FINISH: &str = concat!(
    "UPDATE tasks SET status = u_status, \
    result = CASE WHEN u_result IS NOT NULL OR u_error_kind IS NOT NULL THEN u_result \
    ELSE result END, \
    progress = CASE WHEN u_status = ",
    sql_status!(completed),
    " THEN 1.0 WHEN u_status IN (",
    sql_status!(queued),
    ", ",
    sql_status!(scheduled),
    ") THEN NULL ELSE progress END, \
    progress_message = CASE WHEN u_status IN (",
    sql_status!(queued),
    ", ",
    sql_status!(scheduled),
    ") THEN NULL ELSE progress_message END, \
    error_kind = coalesce(u_error_kind, error_kind), \
    error_message = coalesce(u_error_message, error_message), \
    run_at = u_run_at, finished_at = u_finished_at, updated_at = u_updated_at, \
    interrupted_attempts = least(interrupted_attempts + u_extra, 4294967295), \
    attempts = (CASE WHEN jsonb_array_length(attempts) >= 20 THEN attempts - 0 ELSE attempts END) \
    || jsonb_build_array(jsonb_build_object('n', attempt, \
    'started_at', coalesce(started_at, u_updated_at), 'ended_at', u_updated_at, \
    'outcome', u_outcome) || CASE WHEN claimed_by IS NULL THEN '{}'::jsonb \
    ELSE jsonb_build_object('node', claimed_by) END), \
    lease_until = NULL, cancel_requested = false \
    FROM unnest($1::int8[], $2::int2[], $3::text[], $4::int2[], $5::text[], $6::int8[], \
    $7::int8[], $8::int8[], $9::int8[], $10::text[]) AS u(u_seq, u_status, u_result, u_error_kind, \
    u_error_message, u_run_at, u_finished_at, u_updated_at, u_extra, u_outcome) \
    WHERE seq = u_seq AND seq = ANY($1::int8[])"
);
const _: () = assert!(MAX_ATTEMPT_RECORDS == 20, "FINISH trims to 20 entries");

/// Ends many attempts that finish their tasks (completed, failed, cancelled): as [`FINISH`]
/// would update the rows, but the rows leave `tasks` and their finished form goes to
/// `tasks_done`, in one statement (the same parameters as [`FINISH`]).
const FINISH_DONE: &str = concat!(
    "WITH gone AS (DELETE FROM tasks \
    USING unnest($1::int8[], $2::int2[], $3::text[], $4::int2[], $5::text[], $6::int8[], \
    $7::int8[], $8::int8[], $9::int8[], $10::text[]) AS u(u_seq, u_status, u_result, u_error_kind, \
    u_error_message, u_run_at, u_finished_at, u_updated_at, u_extra, u_outcome) \
    WHERE seq = u_seq AND seq = ANY($1::int8[]) RETURNING tasks.*, u.*) \
    INSERT INTO tasks_done (seq, id, task_type, params, priority, status, attempt, \
    max_attempts, retry_base_ms, retry_max_ms, timeout_ms, run_at, idempotency_key, owner, \
    session_id, progress, progress_message, result, error_kind, error_message, created_at, \
    started_at, updated_at, finished_at, tags, lease_until, cancel_requested, home_node, \
    claimed_by, interrupted_attempts, rerun_on_recovery, attempts, fresh_session) \
    SELECT seq, id, task_type, params, priority, u_status, attempt, \
    max_attempts, retry_base_ms, retry_max_ms, timeout_ms, u_run_at, idempotency_key, owner, \
    session_id, CASE WHEN u_status = ",
    sql_status!(completed),
    " THEN 1.0 ELSE progress END, progress_message, \
    CASE WHEN u_result IS NOT NULL OR u_error_kind IS NOT NULL THEN u_result ELSE result END, \
    coalesce(u_error_kind, error_kind), coalesce(u_error_message, error_message), created_at, \
    started_at, u_updated_at, u_finished_at, tags, NULL, false, home_node, \
    claimed_by, least(interrupted_attempts + u_extra, 4294967295), rerun_on_recovery, \
    (CASE WHEN jsonb_array_length(attempts) >= 20 THEN attempts - 0 ELSE attempts END) \
    || jsonb_build_array(jsonb_build_object('n', attempt, \
    'started_at', coalesce(started_at, u_updated_at), 'ended_at', u_updated_at, \
    'outcome', u_outcome) || CASE WHEN claimed_by IS NULL THEN '{}'::jsonb \
    ELSE jsonb_build_object('node', claimed_by) END), fresh_session FROM gone"
);

/// The rows of one of the finish statements ([`FINISH`], [`FINISH_DONE`]), as its arrays.
#[derive(Default)]
struct FinishRows<'a> {
    seqs: Vec<i64>,
    statuses: Vec<i16>,
    results: Vec<Option<String>>,
    error_kinds: Vec<Option<i16>>,
    error_messages: Vec<Option<&'a str>>,
    run_ats: Vec<Option<i64>>,
    finished_ats: Vec<Option<i64>>,
    updated_ats: Vec<i64>,
    extras: Vec<i64>,
    outcomes: Vec<&'a str>,
}

impl FinishRows<'_> {
    async fn write(&self, conn: &mut WriteConn, sql: &str) -> std::result::Result<(), Exec> {
        if self.seqs.is_empty() {
            return Ok(());
        }
        conn.execute(
            sql,
            &[
                &self.seqs,
                &self.statuses,
                &self.results,
                &self.error_kinds,
                &self.error_messages,
                &self.run_ats,
                &self.finished_ats,
                &self.updated_ats,
                &self.extras,
                &self.outcomes,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Ends the attempts of `finishes` (no task twice) with two statements: a read of the rows
/// their attempts still hold (the fence), and one update of those. Says which were applied.
async fn finish_all(
    conn: &mut WriteConn,
    finishes: &[&Finish],
    effects: &mut Effects,
) -> std::result::Result<Vec<bool>, Exec> {
    let ids: Vec<uuid::Uuid> = finishes.iter().map(|f| uuid(f.id)).collect();
    let mut held: HashMap<uuid::Uuid, (i64, i64, String, bool, i16)> = HashMap::new();
    for row in conn.query(HELD, &[&ids]).await? {
        held.insert(
            row.try_get("id")?,
            (
                row.try_get("seq")?,
                row.try_get("attempt")?,
                row.try_get("task_type")?,
                row.try_get("cancel_requested")?,
                row.try_get("status")?,
            ),
        );
    }
    let mut applied = Vec::with_capacity(finishes.len());
    // The attempts that end their tasks, and those that do not (retries).
    let mut done = FinishRows::default();
    let mut again = FinishRows::default();
    let cancelled = Outcome::Cancelled;
    for (finish, id) in finishes.iter().zip(&ids) {
        let Some((seq, attempt, task_type, cancel_requested, held_status)) = held.get(id) else {
            applied.push(false);
            continue;
        };
        if *attempt != i64::from(finish.attempt) {
            applied.push(false);
            continue;
        }
        let outcome = if *cancel_requested && finish.outcome.yields_to_cancel() {
            // As `apply::settle` decides: a task whose cancel was asked for is not retried.
            &cancelled
        } else {
            &finish.outcome
        };
        let to = decide(Status::Running, outcome.event())
            .map_err(|t| Exec::Abort(Error::store("finishing", t)))?;
        let (result, error, run_at, extra) = match outcome {
            Outcome::Completed { result } => (Some(json_text(result)), None, None, 0),
            Outcome::Failed {
                error,
                retry_at,
                result,
            } => (result.as_ref().map(json_text), Some(error), *retry_at, 0),
            Outcome::Interrupted { error, .. } => (None, Some(error), None, 1),
            Outcome::Cancelled => (None, None, None, 0),
        };
        let rows = if to.is_terminal() {
            &mut done
        } else {
            &mut again
        };
        rows.seqs.push(*seq);
        rows.statuses.push(code(to));
        rows.results.push(result);
        rows.error_kinds
            .push(error.map(|e| i16::from(e.kind.code())));
        rows.error_messages.push(error.map(|e| e.message.as_str()));
        rows.run_ats.push(run_at.map(|t| t.0));
        rows.finished_ats
            .push(to.is_terminal().then_some(finish.now.0));
        rows.updated_ats.push(finish.now.0);
        rows.extras.push(extra);
        rows.outcomes.push(outcome.attempt_outcome().as_str());
        effects.moved(
            task_type,
            Some(status(*held_status).map_err(Exec::Abort)?),
            Some(to),
        );
        if to == Status::Scheduled {
            effects.scheduled(run_at);
        }
        applied.push(true);
    }
    again.write(conn, FINISH).await?;
    done.write(conn, FINISH_DONE).await?;
    Ok(applied)
}

async fn progress(
    conn: &mut WriteConn,
    update: &ProgressUpdate,
) -> std::result::Result<bool, Exec> {
    let changed = conn
        .execute(
            concat!(
                "UPDATE tasks SET progress = $3, progress_message = coalesce($4, progress_message), \
                 updated_at = $5 WHERE id = $1 AND attempt = $2 AND ",
                sql_held!()
            ),
            &[
                &uuid(update.id),
                &i64::from(update.attempt),
                &update.progress,
                &update.message,
                &update.now.0,
            ],
        )
        .await?;
    Ok(changed == 1)
}

/// Renews the leases of the attempts still held, skipping rows another transaction has locked
/// (a finish, a command, or another writer's batch that holds earlier rows): waiting for them
/// deadlocked with the finishes on the node's other writer, since a transaction of several
/// requests does not take its locks in one order (each deadlock stalls both for PostgreSQL's
/// `deadlock_timeout`, 1 s by default; the sustained bench hit several a minute).
const HEARTBEAT: &str = concat!(
    "UPDATE tasks SET lease_until = $3 \
    FROM unnest($1::uuid[], $2::int8[]) AS h(h_id, h_attempt) \
    WHERE id = h_id AND attempt = h_attempt \
    AND seq = ANY(ARRAY(SELECT seq FROM tasks WHERE id = ANY($1::uuid[]) AND ",
    sql_held!(),
    " ORDER BY seq FOR UPDATE SKIP LOCKED)) AND ",
    sql_held!(),
    " RETURNING id, attempt, cancel_requested"
);

/// Of the attempts a heartbeat did not renew, those whose rows still show them running (their
/// rows were locked by another transaction): not lost, renewed by the next heartbeat.
const STILL_HELD: &str = concat!(
    "SELECT id, attempt FROM tasks WHERE id = ANY($1::uuid[]) AND ",
    sql_held!()
);

async fn heartbeat_all(
    conn: &mut WriteConn,
    heartbeat: &Heartbeat,
) -> std::result::Result<HeartbeatReply, Exec> {
    let mut reply = HeartbeatReply::default();
    if heartbeat.held.is_empty() {
        return Ok(reply);
    }
    let ids: Vec<uuid::Uuid> = heartbeat.held.iter().map(|(id, _)| uuid(*id)).collect();
    let attempts: Vec<i64> = heartbeat.held.iter().map(|(_, a)| i64::from(*a)).collect();
    let renewed: HashMap<(uuid::Uuid, i64), bool> = conn
        .query(HEARTBEAT, &[&ids, &attempts, &heartbeat.lease_until.0])
        .await?
        .iter()
        .map(|row| {
            Ok((
                (row.try_get("id")?, row.try_get("attempt")?),
                row.try_get("cancel_requested")?,
            ))
        })
        .collect::<std::result::Result<_, PgError>>()?;
    let missing: Vec<uuid::Uuid> = heartbeat
        .held
        .iter()
        .filter(|(id, attempt)| !renewed.contains_key(&(uuid(*id), i64::from(*attempt))))
        .map(|(id, _)| uuid(*id))
        .collect();
    let mut still_held = HashSet::new();
    if !missing.is_empty() {
        for row in conn.query(STILL_HELD, &[&missing]).await? {
            still_held.insert((
                row.try_get::<_, uuid::Uuid>("id")?,
                row.try_get::<_, i64>("attempt")?,
            ));
        }
    }
    for (id, attempt) in &heartbeat.held {
        let key = (uuid(*id), i64::from(*attempt));
        match renewed.get(&key) {
            Some(true) => reply.cancel_requested.push(*id),
            Some(false) => {}
            None if still_held.contains(&key) => {}
            None => reply.lost.push(*id),
        }
    }
    Ok(reply)
}

/// A task read to be changed by the functions of [`apply`], then written back by [`save`].
struct Loaded {
    seq: i64,
    task: Task,
    /// Read from `tasks_done`: finished, and moved out of `tasks`.
    done: bool,
    /// The node that claimed its last attempt (`claimed_by`): the one that ran it.
    claimed_by: Option<String>,
}

impl Loaded {
    /// Reads a row of `SELECT {COLUMNS}, seq, claimed_by`.
    fn from_row(row: &Row) -> std::result::Result<Loaded, Exec> {
        Ok(Loaded {
            seq: seq_of(row).map_err(Exec::Abort)?,
            task: task_from_row(row).map_err(Exec::Abort)?,
            done: false,
            claimed_by: row.try_get("claimed_by").map_err(|e| {
                Exec::Abort(Error::store(
                    "reading a task",
                    format!("column claimed_by: {e}"),
                ))
            })?,
        })
    }

    /// Applies `change` to the task; the attempt entry it appends, if it appends one (the end
    /// of an attempt), names the node that ran the attempt, as the finish statement's do.
    fn apply<T>(&mut self, change: impl FnOnce(&mut Task) -> Result<T>) -> Result<T> {
        let last = self.task.attempts.last().cloned();
        let answer = change(&mut self.task)?;
        if self.task.attempts.last() != last.as_ref()
            && let Some(entry) = self.task.attempts.last_mut()
        {
            entry.node.clone_from(&self.claimed_by);
        }
        Ok(answer)
    }
}

/// Reads one task with its `seq` and the node that claimed it, locked for the rest of the
/// transaction. A finished task is read from `tasks_done` (marked `done`), unlocked: nothing
/// changes a finished task but an owner's reassignment and its deletion.
async fn load(conn: &mut WriteConn, id: TaskId) -> std::result::Result<Option<Loaded>, Exec> {
    let rows = conn
        .query(
            &format!("SELECT {COLUMNS}, seq, claimed_by FROM tasks WHERE id = $1 FOR UPDATE"),
            &[&uuid(id)],
        )
        .await?;
    if let Some(row) = rows.first() {
        return Loaded::from_row(row).map(Some);
    }
    // Not in `tasks`, or moved out by a transaction that committed while this one waited for
    // the row: this statement's snapshot is newer, so it sees the moved row.
    let rows = conn
        .query(
            &format!("SELECT {COLUMNS}, seq, claimed_by FROM tasks_done WHERE id = $1"),
            &[&uuid(id)],
        )
        .await?;
    rows.first()
        .map(|row| {
            Loaded::from_row(row).map(|mut loaded| {
                loaded.done = true;
                loaded
            })
        })
        .transpose()
}

/// Moves the rows of `seqs` (tasks that just finished) from `tasks` to `tasks_done`, as they
/// are. Rows already gone (moved by another transaction) are skipped.
static MOVE_DONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH gone AS (DELETE FROM tasks WHERE seq = ANY($1::int8[]) RETURNING {STORED}) \
         INSERT INTO tasks_done ({STORED}) SELECT {STORED} FROM gone"
    )
});

async fn move_done(conn: &mut WriteConn, seqs: &[i64]) -> std::result::Result<(), Exec> {
    if !seqs.is_empty() {
        conn.execute(&MOVE_DONE, &[&seqs]).await?;
    }
    Ok(())
}

/// Writes back the fields that commands and recovery change (the priority among them). Of the
/// result, only its clearing (a recovery's new error) is written: neither gives one.
async fn save(conn: &mut WriteConn, seq: i64, task: &Task) -> std::result::Result<(), Exec> {
    conn.execute(
        "UPDATE tasks SET status = $2, attempt = $3, max_attempts = $4, run_at = $5, \
         error_kind = $6, error_message = $7, updated_at = $8, finished_at = $9, \
         lease_until = $10, cancel_requested = $11, priority = $12, progress = $13, \
         progress_message = $14, interrupted_attempts = $15, attempts = $16::text::jsonb, \
         result = CASE WHEN $17 THEN NULL ELSE result END \
         WHERE seq = $1",
        &[
            &seq,
            &code(task.status),
            &i64::from(task.attempt),
            &i64::from(task.max_attempts),
            &task.run_at.map(|t| t.0),
            &task.error.as_ref().map(|e| i16::from(e.kind.code())),
            &task.error.as_ref().map(|e| e.message.as_str()),
            &task.updated_at.0,
            &task.finished_at.map(|t| t.0),
            &task.lease_until.map(|t| t.0),
            &task.cancel_requested,
            &i16::from(task.priority.get()),
            &task.progress,
            &task.progress_message,
            &i64::from(task.interrupted_attempts),
            &attempts_text(&task.attempts),
            &task.result.is_none(),
        ],
    )
    .await?;
    Ok(())
}

async fn apply_command(
    conn: &mut WriteConn,
    id: TaskId,
    command: Command,
    now: Timestamp,
    effects: &mut Effects,
) -> std::result::Result<Task, Exec> {
    let mut loaded = load(conn, id)
        .await?
        .ok_or(Exec::Refused(Error::TaskNotFound { id }))?;
    let before = loaded.task.status;
    // Refused before anything is written.
    loaded
        .apply(|task| apply::command(task, command, now))
        .map_err(Exec::Refused)?;
    if loaded.done {
        // No command applies to a finished task: `apply::command` refuses them all.
        return Err(Exec::Abort(Error::store(
            "applying a command",
            format!("a command changed the finished task {id}"),
        )));
    }
    save(conn, loaded.seq, &loaded.task).await?;
    if loaded.task.status.is_terminal() {
        move_done(conn, &[loaded.seq]).await?;
    }
    if loaded.task.status != before {
        effects.task(&loaded.task, Some(before));
    }
    Ok(loaded.task)
}

/// The rows of attempts to give back, locked in `seq` order.
static RELEASING: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {COLUMNS}, seq, claimed_by FROM tasks WHERE id = ANY($1::uuid[]) \
         ORDER BY seq FOR UPDATE"
    )
});

/// Writes what [`apply::release`] changed, for many rows at once, and clears their claims.
const RELEASE: &str = "UPDATE tasks SET status = u_status, attempt = u_attempt, \
    started_at = u_started_at, updated_at = u_updated_at, finished_at = u_finished_at, \
    lease_until = NULL, cancel_requested = false, claimed_by = NULL \
    FROM unnest($1::int8[], $2::int2[], $3::int8[], $4::int8[], $5::int8[], $6::int8[]) \
    AS u(u_seq, u_status, u_attempt, u_started_at, u_updated_at, u_finished_at) \
    WHERE seq = u_seq AND seq = ANY($1::int8[])";

/// Gives back attempts of this node claimed but never started, as [`apply::release`] does (at
/// a shutdown, a pause, or when claimed-ahead tasks waited too long), with three statements
/// however many: a read of the rows, locked; one update of those still held by the attempt
/// given back (their claims cleared with it); and the move of those a cancel finished.
async fn release(
    conn: &mut WriteConn,
    node: &str,
    held: &[(TaskId, u32)],
    now: Timestamp,
    effects: &mut Effects,
) -> std::result::Result<usize, Exec> {
    if held.is_empty() {
        return Ok(0);
    }
    // The attempts named for each task, in their order: the first that the task's row still
    // holds is given back (then the task holds none of the others).
    let mut attempts: HashMap<TaskId, Vec<u32>> = HashMap::with_capacity(held.len());
    for (id, attempt) in held {
        attempts.entry(*id).or_default().push(*attempt);
    }
    let ids: Vec<uuid::Uuid> = attempts.keys().map(|id| uuid(*id)).collect();
    let rows = conn.query(&RELEASING, &[&ids]).await?;
    let mut seqs = Vec::new();
    let mut statuses = Vec::new();
    let mut numbers = Vec::new();
    let mut started = Vec::new();
    let mut updated = Vec::new();
    let mut finished = Vec::new();
    let mut moved = Vec::new();
    for row in &rows {
        let mut loaded = Loaded::from_row(row)?;
        if loaded.claimed_by.as_deref() != Some(node) {
            continue;
        }
        let before = loaded.task.status;
        let named = attempts.get(&loaded.task.id).map_or(&[][..], Vec::as_slice);
        if !named
            .iter()
            .any(|attempt| apply::release(&mut loaded.task, *attempt, now))
        {
            continue;
        }
        let task = &loaded.task;
        seqs.push(loaded.seq);
        statuses.push(code(task.status));
        numbers.push(i64::from(task.attempt));
        started.push(task.started_at.map(|t| t.0));
        updated.push(task.updated_at.0);
        finished.push(task.finished_at.map(|t| t.0));
        if task.status.is_terminal() {
            moved.push(loaded.seq);
        }
        effects.task(task, Some(before));
    }
    if !seqs.is_empty() {
        conn.execute(
            RELEASE,
            &[&seqs, &statuses, &numbers, &started, &updated, &finished],
        )
        .await?;
    }
    move_done(conn, &moved).await?;
    Ok(seqs.len())
}

async fn recover(
    conn: &mut WriteConn,
    node: &str,
    now: Timestamp,
    which: Recover,
    effects: &mut Effects,
) -> std::result::Result<Vec<Task>, Exec> {
    let rows = match which {
        // Rows another transaction holds are being finished or changed: not stale now.
        Recover::Expired => {
            conn.query(
                &format!(
                    "SELECT {COLUMNS}, seq, claimed_by FROM tasks WHERE {} AND lease_until < $1 \
                     ORDER BY seq FOR UPDATE SKIP LOCKED",
                    sql_leased!()
                ),
                &[&now.0],
            )
            .await?
        }
        // This node's attempts only: other nodes' are alive as far as this one knows.
        Recover::AllRunning => {
            conn.query(
                &format!(
                    "SELECT {COLUMNS}, seq, claimed_by FROM tasks WHERE {} \
                     AND claimed_by = $1 ORDER BY seq FOR UPDATE",
                    sql_held!()
                ),
                &[&node],
            )
            .await?
        }
    };
    let mut recovered = Vec::with_capacity(rows.len());
    let mut finished = Vec::new();
    for row in &rows {
        let mut loaded = Loaded::from_row(row)?;
        let before = loaded.task.status;
        loaded
            .apply(|task| apply::recover(task, now))
            .map_err(Exec::Abort)?;
        save(conn, loaded.seq, &loaded.task).await?;
        if loaded.task.status.is_terminal() {
            finished.push(loaded.seq);
        }
        effects.task(&loaded.task, Some(before));
        recovered.push(loaded.task);
    }
    move_done(conn, &finished).await?;
    Ok(recovered)
}

/// Folds every node's partial counts into the node `''`, keeping the sums (run by the pruner).
const FOLD_COUNTS: &str = "WITH moved AS (DELETE FROM task_counts WHERE node <> '' \
    RETURNING task_type, status, count) \
    INSERT INTO task_counts (node, task_type, status, count) \
    SELECT '', task_type, status, sum(count) FROM moved GROUP BY task_type, status \
    ON CONFLICT (node, task_type, status) DO UPDATE SET count = task_counts.count + excluded.count";

/// Moves finished tasks still in `tasks` to `tasks_done`, up to `$1` of them: none, when every
/// node runs this build (each moves the tasks it finishes); those a node of an older build
/// finished, or any a failed move left. Rows another transaction holds are left for later.
static SWEEP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH gone AS (DELETE FROM tasks WHERE seq = ANY(ARRAY(SELECT seq FROM tasks WHERE {} \
         ORDER BY finished_at, seq LIMIT $1 FOR UPDATE SKIP LOCKED)) RETURNING {STORED}) \
         INSERT INTO tasks_done ({STORED}) SELECT {STORED} FROM gone",
        sql_terminal!()
    )
});

/// Deletes `tasks_done` rows chosen by `$chosen` (a `SELECT seq FROM tasks_done …`) with their
/// idempotency keys; returns each deleted task's type and status.
fn delete_done_sql(chosen: &str) -> String {
    format!(
        "WITH gone AS (DELETE FROM tasks_done WHERE seq = ANY(ARRAY({chosen})) \
         RETURNING id, task_type, status, owner, idempotency_key), \
         keys AS (DELETE FROM task_keys USING gone WHERE gone.idempotency_key IS NOT NULL \
         AND task_keys.owner = coalesce(gone.owner, '') AND task_keys.key = gone.idempotency_key \
         AND task_keys.id = gone.id) \
         SELECT task_type, status FROM gone"
    )
}

static PRUNE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    delete_done_sql(
        "SELECT seq FROM tasks_done WHERE finished_at < $1 ORDER BY finished_at, seq LIMIT $2 \
         FOR UPDATE SKIP LOCKED",
    )
});

async fn prune(
    conn: &mut WriteConn,
    before: Timestamp,
    limit: usize,
    effects: &mut Effects,
) -> std::result::Result<usize, Exec> {
    conn.execute(&SWEEP, &[&big(limit as u64)]).await?;
    let removed = conn.query(&PRUNE, &[&before.0, &big(limit as u64)]).await?;
    for row in &removed {
        let task_type: String = row.try_get("task_type")?;
        let code: i16 = row.try_get("status")?;
        effects.moved(&task_type, Some(status(code).map_err(Exec::Abort)?), None);
    }
    conn.execute(FOLD_COUNTS, &[]).await?;
    conn.execute("DELETE FROM task_counts WHERE count = 0", &[])
        .await?;
    Ok(removed.len())
}

/// Deletes the oldest finished tasks that match `filter`: the pruner's query with the filter's
/// conditions added.
async fn delete_finished(
    conn: &mut WriteConn,
    filter: &ListFilter,
    before: Timestamp,
    limit: usize,
    effects: &mut Effects,
) -> std::result::Result<usize, Exec> {
    let Some(statuses) = finished_statuses(filter).filter(|_| limit > 0) else {
        return Ok(0);
    };
    let mut values = Values::default();
    let mut clauses = vec![
        sql_terminal!().to_owned(),
        format!("finished_at < {}", values.push(before.0)),
    ];
    clauses.extend(statuses);
    clauses.extend(field_clauses(filter, &mut values));
    conn.execute(&SWEEP, &[&big(limit as u64)]).await?;
    let limit = values.push(big(limit as u64));
    let sql = delete_done_sql(&format!(
        "SELECT seq FROM tasks_done WHERE {} ORDER BY finished_at, seq LIMIT {limit} \
         FOR UPDATE SKIP LOCKED",
        clauses.join(" AND ")
    ));
    let removed = conn.query(&sql, &values.refs()).await?;
    for row in &removed {
        let task_type: String = row.try_get("task_type")?;
        let code: i16 = row.try_get("status")?;
        effects.moved(&task_type, Some(status(code).map_err(Exec::Abort)?), None);
    }
    Ok(removed.len())
}

/// Gives `$1`'s tasks to `$2` in one statement, but for those whose idempotency key `$2` already
/// holds (the key table's primary key would refuse them): their keys first, then the tasks of
/// both tables that have no key or whose key moved. No count changes: the counts are by type
/// and status. The owner has no index of its own: a scan of the tables, for a request made once
/// at start. Two nodes that run it at once do not conflict: the second waits for the first's
/// row locks, then finds those rows no longer `$1`'s. A task submitted under `$2` with one of
/// the keys by another node at the same moment (its key not yet visible to the statement) makes
/// it fail on the key table's primary key: then nothing moved, and it may be asked again. A
/// task `$1` owns that finishes while the statement runs (moving to `tasks_done`) may keep its
/// owner: asking again moves it.
const REASSIGN_OWNER: &str = "WITH owned AS (\
    SELECT id, idempotency_key FROM tasks WHERE owner = $1::text \
    UNION ALL SELECT id, idempotency_key FROM tasks_done WHERE owner = $1::text), \
    keys AS (UPDATE task_keys SET owner = $2::text WHERE id IN \
    (SELECT id FROM owned WHERE idempotency_key IS NOT NULL) \
    AND NOT EXISTS (SELECT 1 FROM task_keys AS taken WHERE taken.owner = $2::text \
    AND taken.key = task_keys.key) RETURNING id), \
    live AS (UPDATE tasks SET owner = $2::text WHERE owner = $1::text \
    AND (idempotency_key IS NULL OR id IN (SELECT id FROM keys)) RETURNING 1), \
    done AS (UPDATE tasks_done SET owner = $2::text WHERE owner = $1::text \
    AND (idempotency_key IS NULL OR id IN (SELECT id FROM keys)) RETURNING 1) \
    SELECT (SELECT count(*) FROM live) + (SELECT count(*) FROM done) AS moved";

/// See [`crate::store::Store::reassign_owner`]: one statement ([`REASSIGN_OWNER`]).
async fn reassign_owner(
    conn: &mut WriteConn,
    from: &str,
    to: &str,
) -> std::result::Result<u64, Exec> {
    if from == to {
        return Ok(0);
    }
    let row = conn.query(REASSIGN_OWNER, &[&from, &to]).await?;
    let moved: i64 = match row.first() {
        Some(row) => row.try_get("moved")?,
        None => 0,
    };
    Ok(u64::try_from(moved).unwrap_or(0))
}

/// The values bound to a statement built at run time, numbered as they are pushed.
#[derive(Default)]
pub(super) struct Values(Vec<Box<dyn ToSql + Sync + Send>>);

impl Values {
    /// Adds a value; returns its placeholder (`$n`).
    pub(super) fn push(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.0.push(Box::new(value));
        format!("${}", self.0.len())
    }

    pub(super) fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.0
            .iter()
            .map(|value| value.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// Binds as `$n`, cast to the value's type (a placeholder compared with a column of another
/// type would otherwise take that type).
impl Bind for Values {
    fn text(&mut self, value: String) -> String {
        format!("{}::text", self.push(value))
    }

    fn int(&mut self, value: i64) -> String {
        format!("{}::int8", self.push(value))
    }
}
