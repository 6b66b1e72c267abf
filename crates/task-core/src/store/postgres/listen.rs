//! The listening connection: other nodes' wake-ups (`LISTEN`/`NOTIFY`), the lock that keeps this
//! node's name unique, and the maintenance lock (leader election), reopened with backoff when it
//! breaks.

use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, oneshot};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::model::Timestamp;

use super::{Backoff, LOCK_CLASS, Part, Shared, Wakeup, describe, quoted};

/// The wake-ups received and not yet taken, and a way to wait for them.
#[derive(Default)]
pub(super) struct Wakeups {
    pending: Mutex<Option<Wakeup>>,
    notify: Notify,
}

impl Wakeups {
    /// Adds a wake-up to those waiting to be taken.
    pub(super) fn add(&self, wakeup: Wakeup) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let merged = match *pending {
            Some(before) => Wakeup {
                queued: before.queued || wakeup.queued,
                due: match (before.due, wakeup.due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
            },
            None => wakeup,
        };
        *pending = Some(merged);
        drop(pending);
        self.notify.notify_one();
    }

    /// Takes the wake-ups received so far, waiting for one if there are none.
    pub(super) async fn next(&self) -> Wakeup {
        loop {
            if let Some(wakeup) = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                return wakeup;
            }
            // A wake-up added after the look above leaves a permit: this returns at once.
            self.notify.notified().await;
        }
    }
}

/// The payload of a notice: whether tasks were queued, the earliest due time announced, and the
/// node that sent it: `q 1700000000000 node-a`, with `-` for "no".
pub(super) fn payload(queued: bool, due: Option<i64>, node: &str) -> String {
    let due = due.map_or_else(|| "-".to_owned(), |at| at.to_string());
    format!("{} {due} {node}", if queued { "q" } else { "-" })
}

/// Reads a payload; `None` for one of this node's own or one that is not ours.
fn parse(payload: &str, own_node: &str) -> Option<Wakeup> {
    let mut parts = payload.splitn(3, ' ');
    let queued = parts.next()? == "q";
    let due = match parts.next()? {
        "-" => None,
        at => Some(Timestamp(at.parse().ok()?)),
    };
    let node = parts.next()?;
    (node != own_node).then_some(Wakeup { queued, due })
}

/// An open listening connection.
pub(super) struct Listening {
    client: Client,
    /// Fires when the connection ends.
    ended: oneshot::Receiver<()>,
}

/// Opens the listening connection: `LISTEN` on the schema's channel, this node's name lock, and
/// an attempt at the maintenance lock.
pub(super) async fn open(shared: &Arc<Shared>) -> Result<Listening> {
    let unreachable = |e: tokio_postgres::Error| shared.unreachable("listening for wake-ups", &e);
    let (client, mut connection) = shared.pg.connect(NoTls).await.map_err(unreachable)?;
    let (ended_tx, ended) = oneshot::channel();
    let driver_shared = Arc::clone(shared);
    shared.tracker.spawn(async move {
        let own = driver_shared.config.node_id.as_str();
        while let Some(Ok(message)) = poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(notice) = message
                && let Some(wakeup) = parse(notice.payload(), own)
            {
                driver_shared.wakeups.add(wakeup);
            }
        }
        let _ = ended_tx.send(());
    });
    client
        .batch_execute(&format!(
            "SET search_path TO {}; LISTEN {}",
            shared.schema_ident,
            quoted(&shared.channel)
        ))
        .await
        .map_err(unreachable)?;
    let name_free: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2)) AS taken",
            &[
                &LOCK_CLASS,
                &format!("node:{}:{}", shared.config.schema, shared.config.node_id),
            ],
        )
        .await
        .and_then(|row| row.try_get("taken"))
        .map_err(unreachable)?;
    if !name_free {
        let problem = format!(
            "another msbd node named `{}` is connected to this database (schema `{}`): give every node a name of its own",
            shared.config.node_id, shared.config.schema
        );
        shared.health.failing(Part::NodeName, problem.clone());
        return Err(Error::Store {
            action: "connecting to the database",
            message: problem,
        });
    }
    shared.health.working(Part::NodeName);
    try_lead(shared, &client).await;
    Ok(Listening { client, ended })
}

/// Tries to take the maintenance lock of the schema; records whether this node holds it.
/// Returns `false` when the connection failed.
async fn try_lead(shared: &Shared, client: &Client) -> bool {
    let taken = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2)) AS taken",
            &[
                &LOCK_CLASS,
                &format!("maintenance:{}", shared.config.schema),
            ],
        )
        .await
        .and_then(|row| row.try_get::<_, bool>("taken"));
    match taken {
        Ok(taken) => {
            if taken && !shared.leader.swap(true, Ordering::AcqRel) {
                tracing::info!(node = %shared.config.node_id, "this node runs the store's maintenance (lease reaper, pruner)");
            }
            true
        }
        Err(error) => {
            tracing::debug!(error = %describe(&error), "trying the maintenance lock failed");
            false
        }
    }
}

/// Keeps a listening connection open until `cancel` fires: reopens it with backoff when it
/// breaks (then wakes the engine, since notices may have been missed), tries the maintenance
/// lock while another node holds it, and checks that the connection is alive.
pub(super) async fn run(shared: Arc<Shared>, first: Listening, cancel: CancellationToken) {
    let mut backoff = Backoff::new(&shared.config);
    let mut current = Some(first);
    loop {
        let listening = match current.take() {
            Some(listening) => listening,
            None => {
                let opened = tokio::select! {
                    _ = cancel.cancelled() => return,
                    opened = open(&shared) => opened,
                };
                match opened {
                    Ok(listening) => {
                        shared.health.working(Part::Listener);
                        backoff.reset();
                        shared.wakeups.add(Wakeup {
                            queued: true,
                            due: Some(Timestamp(0)),
                        });
                        listening
                    }
                    Err(error) => {
                        shared.health.failing(
                            Part::Listener,
                            format!(
                                "wake-ups from other nodes are not received (the engine's idle poll still finds their tasks): {error}"
                            ),
                        );
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(backoff.pause()) => continue,
                        }
                    }
                }
            }
        };
        let Listening { client, mut ended } = listening;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut ended => break,
                _ = tokio::time::sleep(shared.config.leader_retry) => {
                    let alive = if shared.leader.load(Ordering::Acquire) {
                        tokio::time::timeout(shared.config.connect_timeout, client.simple_query("SELECT 1"))
                            .await
                            .is_ok_and(|answer| answer.is_ok())
                    } else {
                        tokio::time::timeout(shared.config.connect_timeout, try_lead(&shared, &client))
                            .await
                            .unwrap_or(false)
                    };
                    if !alive {
                        break;
                    }
                }
            }
        }
        drop(client);
        if shared.leader.swap(false, Ordering::AcqRel) {
            tracing::warn!("this node lost the maintenance lock with its listening connection");
        }
        shared.health.failing(
            Part::Listener,
            "the connection that receives other nodes' wake-ups was lost; reconnecting (the engine's idle poll still finds their tasks)".into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_round_trip_and_a_nodes_own_are_ignored() {
        let text = payload(true, Some(1_700_000_000_000), "node a");
        assert_eq!(
            parse(&text, "node b"),
            Some(Wakeup {
                queued: true,
                due: Some(Timestamp(1_700_000_000_000))
            })
        );
        assert_eq!(parse(&text, "node a"), None);
        assert_eq!(
            parse(&payload(false, None, "x"), "y"),
            Some(Wakeup {
                queued: false,
                due: None
            })
        );
        assert_eq!(parse("garbage", "y"), None);
    }

    #[tokio::test]
    async fn wakeups_merge_until_taken() {
        let wakeups = Wakeups::default();
        wakeups.add(Wakeup {
            queued: false,
            due: Some(Timestamp(20)),
        });
        wakeups.add(Wakeup {
            queued: true,
            due: Some(Timestamp(10)),
        });
        assert_eq!(
            wakeups.next().await,
            Wakeup {
                queued: true,
                due: Some(Timestamp(10))
            }
        );
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(20), wakeups.next());
        assert!(waiting.await.is_err(), "nothing is pending");
    }
}
