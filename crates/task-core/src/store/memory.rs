//! An in-memory store: for tests and for work that need not survive the process.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::model::{IdMap, Status, Task, TaskId, Timestamp};
use crate::store::{
    ClaimRequest, Command, Cursor, Finish, Heartbeat, HeartbeatReply, ListFilter, Page,
    PageRequest, ProgressUpdate, Promoted, Recover, Stats, Store, StoreFuture, Submitted, apply,
};

/// A store that keeps tasks in memory, with the same semantics as the durable stores.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave an index half-updated (each update is
        // applied in full before any call that could panic), so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Default)]
struct State {
    next_seq: u64,
    tasks: IdMap<Entry>,
    by_seq: BTreeSet<(u64, TaskId)>,
    indexes: Indexes,
    idempotency: HashMap<(String, String), TaskId>,
    stats: Stats,
}

struct Entry {
    seq: u64,
    task: Task,
}

/// The orders in which the store finds tasks by status.
#[derive(Default)]
struct Indexes {
    queued: BTreeSet<(Reverse<u8>, u64, TaskId)>,
    scheduled: BTreeSet<(Timestamp, u64, TaskId)>,
    running: BTreeSet<(u64, TaskId)>,
    finished: BTreeSet<(Timestamp, u64, TaskId)>,
}

/// Where a task sits in [`Indexes`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Queued(Reverse<u8>, u64, TaskId),
    Scheduled(Timestamp, u64, TaskId),
    Running(u64, TaskId),
    Finished(Timestamp, u64, TaskId),
    Unindexed,
}

impl Slot {
    fn of(seq: u64, task: &Task) -> Slot {
        let id = task.id;
        match task.status {
            Status::Queued => Slot::Queued(Reverse(task.priority.get()), seq, id),
            Status::Scheduled => Slot::Scheduled(task.run_at.unwrap_or_default(), seq, id),
            // A frozen task (paused while its attempt runs) holds a lease like a running one:
            // recovery must find it.
            Status::Running => Slot::Running(seq, id),
            Status::Paused if task.lease_until.is_some() => Slot::Running(seq, id),
            Status::Completed | Status::Failed | Status::Cancelled => {
                Slot::Finished(task.finished_at.unwrap_or_default(), seq, id)
            }
            Status::Paused => Slot::Unindexed,
        }
    }
}

impl Indexes {
    fn insert(&mut self, slot: Slot) {
        match slot {
            Slot::Queued(p, seq, id) => self.queued.insert((p, seq, id)),
            Slot::Scheduled(at, seq, id) => self.scheduled.insert((at, seq, id)),
            Slot::Running(seq, id) => self.running.insert((seq, id)),
            Slot::Finished(at, seq, id) => self.finished.insert((at, seq, id)),
            Slot::Unindexed => false,
        };
    }

    fn remove(&mut self, slot: Slot) {
        match slot {
            Slot::Queued(p, seq, id) => self.queued.remove(&(p, seq, id)),
            Slot::Scheduled(at, seq, id) => self.scheduled.remove(&(at, seq, id)),
            Slot::Running(seq, id) => self.running.remove(&(seq, id)),
            Slot::Finished(at, seq, id) => self.finished.remove(&(at, seq, id)),
            Slot::Unindexed => false,
        };
    }
}

impl State {
    /// Runs `change` on a task in place, keeping the indexes and counts in step with it.
    fn update<R>(&mut self, id: TaskId, change: impl FnOnce(&mut Task) -> R) -> Option<R> {
        let entry = self.tasks.get_mut(&id)?;
        let before = (entry.task.status, Slot::of(entry.seq, &entry.task));
        let result = change(&mut entry.task);
        let after = (entry.task.status, Slot::of(entry.seq, &entry.task));
        if before.1 != after.1 {
            self.indexes.remove(before.1);
            self.indexes.insert(after.1);
        }
        if before.0 != after.0 {
            self.stats.moved(&entry.task.task_type, before.0, after.0);
        }
        Some(result)
    }

    fn insert(&mut self, task: Task) {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.indexes.insert(Slot::of(seq, &task));
        self.by_seq.insert((seq, task.id));
        if let Some(key) = &task.idempotency_key {
            self.idempotency
                .insert(idempotency_slot(&task.owner, key), task.id);
        }
        self.stats.add(&task.task_type, task.status, 1);
        self.tasks.insert(task.id, Entry { seq, task });
    }

    fn remove(&mut self, id: TaskId) {
        if let Some(entry) = self.tasks.remove(&id) {
            self.indexes.remove(Slot::of(entry.seq, &entry.task));
            self.by_seq.remove(&(entry.seq, id));
            if let Some(key) = entry.task.idempotency_key.clone() {
                self.idempotency
                    .remove(&idempotency_slot(&entry.task.owner, &key));
            }
            self.stats.add(&entry.task.task_type, entry.task.status, -1);
        }
    }

    /// See [`Store::reassign_owner`].
    fn reassign_owner(&mut self, from: &str, to: &str) -> u64 {
        if from == to {
            return 0;
        }
        let State {
            tasks, idempotency, ..
        } = self;
        let mut moved = 0;
        for entry in tasks.values_mut() {
            let task = &mut entry.task;
            if task.owner.as_deref() != Some(from) {
                continue;
            }
            if let Some(key) = &task.idempotency_key {
                let taken = (to.to_owned(), key.clone());
                if idempotency.contains_key(&taken) {
                    continue;
                }
                idempotency.remove(&(from.to_owned(), key.clone()));
                idempotency.insert(taken, task.id);
            }
            task.owner = Some(to.to_owned());
            moved += 1;
        }
        moved
    }

    fn claim(&mut self, request: &ClaimRequest) -> Vec<Task> {
        let candidates = pick_claimable(
            self.indexes.queued.iter().map(|(_, _, id)| *id),
            request,
            |id| &self.tasks[id].task.task_type,
        );
        let mut claimed = Vec::with_capacity(candidates.len());
        for id in candidates {
            let done = self.update(id, |task| {
                apply::claim(task, request.now, request.lease_until).map(|()| task.clone())
            });
            if let Some(Ok(task)) = done {
                claimed.push(task);
            }
        }
        claimed
    }
}

/// Picks up to `request.max` ids from `queue` (in claim order), skipping the types that have no
/// room left.
fn pick_claimable<'a>(
    queue: impl Iterator<Item = TaskId>,
    request: &ClaimRequest,
    type_of: impl Fn(&TaskId) -> &'a String,
) -> Vec<TaskId> {
    let mut picked = Vec::new();
    if request.max == 0 {
        return picked;
    }
    let limited = !request.exclude_types.is_empty() || !request.type_room.is_empty();
    let mut taken_by_type: HashMap<&str, usize> = HashMap::new();
    for id in queue {
        if limited {
            let task_type = type_of(&id);
            if let Some(room) = request.room_for(task_type) {
                let taken = taken_by_type.entry(task_type.as_str()).or_insert(0);
                if *taken >= room {
                    continue;
                }
                *taken += 1;
            }
        }
        picked.push(id);
        if picked.len() == request.max {
            break;
        }
    }
    picked
}

/// Where an idempotency key is kept: per owner, with no owner and an empty owner the same (as in
/// the SQL stores).
fn idempotency_slot(owner: &Option<String>, key: &str) -> (String, String) {
    (owner.clone().unwrap_or_default(), key.to_owned())
}

fn ready<T: Send + 'static>(value: Result<T>) -> StoreFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

impl Store for MemoryStore {
    fn submit(&self, tasks: Vec<Task>) -> StoreFuture<'_, Vec<Submitted>> {
        let mut state = self.lock();
        // All or nothing, as in the SQL stores: an id already taken refuses the whole batch.
        let mut ids = std::collections::HashSet::with_capacity(tasks.len());
        if let Some(task) = tasks
            .iter()
            .find(|task| state.tasks.contains_key(&task.id) || !ids.insert(task.id))
        {
            return ready(Err(Error::store(
                "inserting a task",
                format!("the id {} is already taken", task.id),
            )));
        }
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            let existing = task.idempotency_key.as_ref().and_then(|key| {
                state
                    .idempotency
                    .get(&idempotency_slot(&task.owner, key))
                    .copied()
            });
            match existing.and_then(|id| state.tasks.get(&id)) {
                Some(entry) => out.push(Submitted {
                    task: entry.task.clone(),
                    created: false,
                }),
                None => {
                    out.push(Submitted {
                        task: task.clone(),
                        created: true,
                    });
                    state.insert(task);
                }
            }
        }
        ready(Ok(out))
    }

    fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, Vec<Task>> {
        let claimed = self.lock().claim(&request);
        ready(Ok(claimed))
    }

    fn promote_due(&self, now: Timestamp) -> StoreFuture<'_, Promoted> {
        let mut state = self.lock();
        let due: Vec<TaskId> = state
            .indexes
            .scheduled
            .iter()
            .take_while(|(at, _, _)| *at <= now)
            .map(|(_, _, id)| *id)
            .collect();
        for id in &due {
            state.update(*id, |task| apply::promote(task, now));
        }
        let next_due = state.indexes.scheduled.first().map(|(at, _, _)| *at);
        ready(Ok(Promoted {
            count: due.len(),
            next_due,
        }))
    }

    fn finish(&self, finish: Finish) -> StoreFuture<'_, bool> {
        let applied = self
            .lock()
            .update(finish.id, |task| apply::finish(task, &finish))
            .unwrap_or(false);
        ready(Ok(applied))
    }

    fn release(&self, held: Vec<(TaskId, u32)>, now: Timestamp) -> StoreFuture<'_, usize> {
        let mut state = self.lock();
        let released = held
            .into_iter()
            .filter(|(id, attempt)| {
                state
                    .update(*id, |task| apply::release(task, *attempt, now))
                    .unwrap_or(false)
            })
            .count();
        ready(Ok(released))
    }

    fn progress(&self, update: ProgressUpdate) -> StoreFuture<'_, bool> {
        let ProgressUpdate {
            id,
            attempt,
            progress,
            message,
            now,
        } = update;
        let applied = self
            .lock()
            .update(id, |task| {
                apply::progress(task, attempt, progress, message, now)
            })
            .unwrap_or(false);
        ready(Ok(applied))
    }

    fn heartbeat(&self, heartbeat: Heartbeat) -> StoreFuture<'_, HeartbeatReply> {
        let mut state = self.lock();
        let mut reply = HeartbeatReply::default();
        for (id, attempt) in heartbeat.held {
            match state.tasks.get_mut(&id) {
                Some(entry) if apply::holds(&entry.task, attempt) => {
                    entry.task.lease_until = Some(heartbeat.lease_until);
                    if entry.task.cancel_requested {
                        reply.cancel_requested.push(id);
                    }
                }
                _ => reply.lost.push(id),
            }
        }
        ready(Ok(reply))
    }

    fn command(&self, id: TaskId, command: Command, now: Timestamp) -> StoreFuture<'_, Task> {
        let result = self
            .lock()
            .update(id, |task| {
                apply::command(task, command, now).map(|()| task.clone())
            })
            .unwrap_or(Err(Error::TaskNotFound { id }));
        ready(result)
    }

    fn recover(&self, now: Timestamp, which: Recover) -> StoreFuture<'_, Vec<Task>> {
        let mut state = self.lock();
        let stale: Vec<TaskId> = state
            .indexes
            .running
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| {
                which == Recover::AllRunning
                    || state.tasks[id]
                        .task
                        .lease_until
                        .is_none_or(|until| until < now)
            })
            .collect();
        let mut recovered = Vec::with_capacity(stale.len());
        for id in stale {
            if let Some(Ok(task)) =
                state.update(id, |task| apply::recover(task, now).map(|()| task.clone()))
            {
                recovered.push(task);
            }
        }
        ready(Ok(recovered))
    }

    fn prune(&self, before: Timestamp, limit: usize) -> StoreFuture<'_, usize> {
        let mut state = self.lock();
        let old: Vec<TaskId> = state
            .indexes
            .finished
            .iter()
            .take_while(|(at, _, _)| *at < before)
            .take(limit)
            .map(|(_, _, id)| *id)
            .collect();
        for id in &old {
            state.remove(*id);
        }
        ready(Ok(old.len()))
    }

    fn delete_finished(
        &self,
        filter: ListFilter,
        finished_before: Timestamp,
        limit: usize,
    ) -> StoreFuture<'_, usize> {
        let mut state = self.lock();
        let doomed: Vec<TaskId> = state
            .indexes
            .finished
            .iter()
            .take_while(|(at, _, _)| *at < finished_before)
            .map(|(_, _, id)| *id)
            .filter(|id| filter.matches_finished(&state.tasks[id].task))
            .take(limit)
            .collect();
        for id in &doomed {
            state.remove(*id);
        }
        ready(Ok(doomed.len()))
    }

    fn reassign_owner(&self, from: &str, to: &str) -> StoreFuture<'_, u64> {
        let moved = self.lock().reassign_owner(from, to);
        ready(Ok(moved))
    }

    fn get(&self, id: TaskId) -> StoreFuture<'_, Option<Task>> {
        let task = self.lock().tasks.get(&id).map(|entry| entry.task.clone());
        ready(Ok(task))
    }

    fn list(&self, filter: ListFilter, page: PageRequest) -> StoreFuture<'_, Page> {
        let state = self.lock();
        let limit = page.clamped_limit();
        let upper = page.cursor.map_or(u64::MAX, |c| c.0);
        let mut tasks = Vec::new();
        let mut last_seq = None;
        let mut more = false;
        for (seq, id) in state
            .by_seq
            .range(..(upper, TaskId::from_bytes([0; 16])))
            .rev()
        {
            let task = &state.tasks[id].task;
            if !filter.matches(task) {
                continue;
            }
            if tasks.len() == limit {
                more = true;
                break;
            }
            tasks.push(task.clone());
            last_seq = Some(*seq);
        }
        let next_cursor = if more { last_seq.map(Cursor) } else { None };
        ready(Ok(Page { tasks, next_cursor }))
    }

    fn stats(&self) -> StoreFuture<'_, Stats> {
        let stats = self.lock().stats.clone();
        ready(Ok(stats))
    }

    fn timed_out(&self) -> StoreFuture<'_, std::collections::BTreeMap<String, u64>> {
        let mut counts = std::collections::BTreeMap::new();
        for entry in self.lock().tasks.values() {
            let task = &entry.task;
            if task.status == Status::Failed
                && task
                    .error
                    .as_ref()
                    .is_some_and(|e| e.kind == crate::model::FailureKind::Timeout)
            {
                *counts.entry(task.task_type.clone()).or_insert(0) += 1;
            }
        }
        ready(Ok(counts))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        ready(Ok(()))
    }
}
