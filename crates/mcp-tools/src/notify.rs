//! `notifications/tasks`: a client with the tasks extension is told when a task it started
//! changes status (each notification carries the task as `tasks/get` would answer), so that it
//! need not poll. One listener per connection follows the engine's events for the tasks that
//! connection started, and ends once none is left; a task leaves the set when it finishes or
//! when its client can no longer be reached. Clients still poll `tasks/get` when they like: a
//! notification is a courtesy, and a transport that cannot carry it (an HTTP request already
//! answered) loses nothing.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use rmcp::RoleServer;
use rmcp::model::{ServerNotification, TaskStatusNotification, TaskStatusNotificationParams};
use rmcp::service::Peer;
use task_core::{Status, TaskEvent, TaskId};
use tokio::sync::broadcast::error::RecvError;

use crate::server::McpServer;

/// A task's status and attempt, as last told.
type LastTold = (Status, u32);

/// The tasks of one connection that its client is told about.
#[derive(Default)]
pub(crate) struct Watched {
    /// Each task, its client, and the last (status, attempt) told.
    tasks: HashMap<TaskId, (Peer<RoleServer>, Option<LastTold>)>,
    /// Whether the listener runs.
    listening: bool,
}

impl McpServer {
    /// From now on, tells `peer` when task `id` changes status, until it finishes.
    pub(crate) fn notify_status_changes(&self, id: TaskId, peer: Peer<RoleServer>) {
        let start = {
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            watched.tasks.insert(id, (peer, None));
            !std::mem::replace(&mut watched.listening, true)
        };
        let server = self.clone();
        tokio::spawn(async move {
            if start {
                server.listen().await;
            } else {
                // A change between the task's start and now passed unseen: look once.
                server.tell(id).await;
            }
        });
    }

    /// Follows the engine's events for the watched tasks until none is left (or msbd stops
    /// answering waits).
    async fn listen(&self) {
        let engine = self.core.wrapper.engine().clone();
        let mut events = engine.subscribe();
        // What changed before the subscription.
        self.tell_all().await;
        loop {
            {
                let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
                if watched.tasks.is_empty() {
                    watched.listening = false;
                    return;
                }
            }
            let event = tokio::select! {
                event = events.recv() => event,
                () = self.core.waits_end.cancelled() => return,
            };
            match event {
                Ok(TaskEvent::Status { id, .. }) => self.tell(id).await,
                Ok(TaskEvent::Progress { .. }) => {}
                Err(RecvError::Lagged(_)) => self.tell_all().await,
                Err(RecvError::Closed) => {
                    let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
                    watched.tasks.clear();
                    watched.listening = false;
                    return;
                }
            }
        }
    }

    async fn tell_all(&self) {
        let ids: Vec<TaskId> = self
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tasks
            .keys()
            .copied()
            .collect();
        for id in ids {
            self.tell(id).await;
        }
    }

    /// Tells the client of task `id` its status, if it is watched and changed since last told.
    async fn tell(&self, id: TaskId) {
        let peer = match self
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tasks
            .get(&id)
        {
            Some((peer, _)) => peer.clone(),
            None => return,
        };
        let task = match self.core.wrapper.engine().get(id).await {
            Ok(task) => task,
            // Gone (pruned), or the store failed: the client can still ask.
            _ => {
                self.forget(id);
                return;
            }
        };
        let now = (task.status, task.attempt);
        {
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            match watched.tasks.get_mut(&id) {
                Some((_, told)) if *told == Some(now) => return,
                Some((_, told)) => *told = Some(now),
                None => return,
            }
        }
        let Ok(detailed) = self.detailed(&task) else {
            self.forget(id);
            return;
        };
        let notification = ServerNotification::TaskStatusNotification(TaskStatusNotification::new(
            TaskStatusNotificationParams::new(detailed),
        ));
        let sent = peer.send_notification(notification).await;
        if sent.is_err() || task.status.is_terminal() {
            self.forget(id);
        }
    }

    fn forget(&self, id: TaskId) {
        self.watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tasks
            .remove(&id);
    }
}

/// The per-connection state, shared by the clones of one connection's server.
pub(crate) type WatchedTasks = std::sync::Arc<Mutex<Watched>>;
