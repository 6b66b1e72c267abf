//! The console's server-sent events: `/ui/events` (every change of a task the viewer may see:
//! event `task`, the task as `check_task_status` shows it) and `/ui/tasks/{id}/events` (that
//! task's changes, and its stdout and stderr as they are written: event `output`, `{"stream",
//! "text"}`). A stream that fell behind the engine's events sends `resync` (the page reloads).
//!
//! Changes come from the engine's broadcast of task events, never from polling the store; what
//! arrives together is read once per task. Output is read from the task's files every
//! [`OUTPUT_EVERY`] while it runs (msbd has no notification of a write); each event's `id` is
//! the two cursors, so a reconnecting browser (`Last-Event-ID`) goes on where it was.

use std::collections::{BTreeSet, HashSet};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use mcp_tools::console::Console;
use serde::Deserialize;
use serde_json::{Value, json};
use task_core::{TaskEvent, TaskId};
use tokio::sync::{broadcast, mpsc};

use super::ConsoleState;

/// How often a running task's output files are read for what is new.
const OUTPUT_EVERY: Duration = Duration::from_millis(200);
/// The most output bytes one read takes.
const OUTPUT_CHUNK: u64 = 64 * 1024;
/// The most tasks remembered as not the viewer's (then the memory starts again).
const UNSEEN_KEPT: usize = 10_000;

/// The events a handler sends, as a stream for [`Sse`].
struct Events(mpsc::Receiver<Event>);

impl futures_core::Stream for Events {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|event| event.map(Ok))
    }
}

fn sse(events: mpsc::Receiver<Event>) -> Response {
    Sse::new(Events(events))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn json_event(name: &str, value: &Value) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(value).unwrap_or_default())
}

/// `/ui/events`: every change of the viewer's tasks (the operator's: every task).
pub(super) async fn tasks_stream(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
) -> Response {
    let Some(viewer) = state.who(&headers) else {
        return (StatusCode::UNAUTHORIZED, "sign in first").into_response();
    };
    let (sender, receiver) = mpsc::channel(256);
    let events = viewer.console.server().wrapper().engine().subscribe();
    let stop = state.0.stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = follow_tasks(viewer.console, events, &sender) => {}
            () = stop.cancelled() => {}
            () = sender.closed() => {}
        }
    });
    sse(receiver)
}

/// Sends the task of every event the console may see until the browser goes.
async fn follow_tasks(
    console: Console,
    mut events: broadcast::Receiver<TaskEvent>,
    sender: &mpsc::Sender<Event>,
) {
    let mut unseen: HashSet<TaskId> = HashSet::new();
    loop {
        let mut ids = BTreeSet::new();
        match events.recv().await {
            Ok(event) => {
                ids.insert(event.task_id());
            }
            Err(broadcast::error::RecvError::Lagged(_)) => {
                if sender
                    .send(Event::default().event("resync").data("{}"))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
        // What came meanwhile is read once per task.
        loop {
            match events.try_recv() {
                Ok(event) => {
                    ids.insert(event.task_id());
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => {
                    if sender
                        .send(Event::default().event("resync").data("{}"))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        for id in ids {
            if unseen.contains(&id) {
                continue;
            }
            match console.task(&id.to_string()).await {
                Ok(task) => {
                    if sender.send(json_event("task", &task)).await.is_err() {
                        return;
                    }
                }
                Err(_) => {
                    if unseen.len() >= UNSEEN_KEPT {
                        unseen.clear();
                    }
                    unseen.insert(id);
                }
            }
        }
    }
}

/// Where a task page's output stands.
#[derive(Debug, Default, Deserialize)]
pub(super) struct Cursors {
    #[serde(default)]
    stdout: Option<u64>,
    #[serde(default)]
    stderr: Option<u64>,
}

/// `/ui/tasks/{id}/events`: one task's changes and output.
pub(super) async fn task_stream(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<Cursors>,
) -> Response {
    let Some(viewer) = state.who(&headers) else {
        return (StatusCode::UNAUTHORIZED, "sign in first").into_response();
    };
    let Ok(task) = viewer.console.task(&id).await else {
        return (StatusCode::NOT_FOUND, "no such task of yours").into_response();
    };
    let Some(task_id) = task["task_id"]
        .as_str()
        .and_then(|t| t.parse::<TaskId>().ok())
    else {
        return (StatusCode::NOT_FOUND, "no such task of yours").into_response();
    };
    // A reconnecting browser says where it was.
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|text| text.split_once(':'))
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    let cursors = match resumed {
        Some((stdout, stderr)) => [stdout, stderr],
        None => [query.stdout.unwrap_or(0), query.stderr.unwrap_or(0)],
    };
    let (sender, receiver) = mpsc::channel(64);
    let events = viewer.console.server().wrapper().engine().subscribe();
    let stop = state.0.stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = follow_task(viewer.console, task_id, cursors, events, &sender) => {}
            () = stop.cancelled() => {}
            () = sender.closed() => {}
        }
    });
    sse(receiver)
}

async fn follow_task(
    console: Console,
    id: TaskId,
    mut cursors: [u64; 2],
    mut events: broadcast::Receiver<TaskEvent>,
    sender: &mpsc::Sender<Event>,
) {
    let text_id = id.to_string();
    // What changed between the page's rendering and this subscription.
    if let Ok(task) = console.task(&text_id).await
        && sender.send(json_event("task", &task)).await.is_err()
    {
        return;
    }
    let mut attempt = None;
    let mut done = false;
    let mut tick = tokio::time::interval(OUTPUT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(event) if event.task_id() == id => {
                    if let Ok(task) = console.task(&text_id).await
                        && sender.send(json_event("task", &task)).await.is_err()
                    {
                        return;
                    }
                    done = false;
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    if let Ok(task) = console.task(&text_id).await
                        && sender.send(json_event("task", &task)).await.is_err()
                    {
                        return;
                    }
                    done = false;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick(), if !done => {
                match read_output(&console, &text_id, &mut cursors, &mut attempt, sender).await {
                    Some(complete) => done = complete,
                    None => return,
                }
            }
        }
    }
}

/// Sends what is new in both streams; whether both are complete (`None`: the browser went).
async fn read_output(
    console: &Console,
    id: &str,
    cursors: &mut [u64; 2],
    attempt: &mut Option<u64>,
    sender: &mpsc::Sender<Event>,
) -> Option<bool> {
    let mut complete = true;
    for (index, stream) in ["stdout", "stderr"].into_iter().enumerate() {
        loop {
            let Ok(chunk) = console
                .output(id, Some(stream), Some(cursors[index]), None)
                .await
            else {
                return Some(true);
            };
            // A new attempt writes new files, read from their start.
            let this = chunk["attempt"].as_u64();
            if attempt.is_some() && this != *attempt {
                *cursors = [0, 0];
                *attempt = this;
                return Some(false);
            }
            *attempt = this;
            let next = chunk["next_cursor"].as_u64().unwrap_or(cursors[index]);
            let data = chunk["data"].as_str().unwrap_or_default();
            if next > cursors[index] {
                cursors[index] = next;
                let event = json_event("output", &json!({ "stream": stream, "text": data }))
                    .id(format!("{}:{}", cursors[0], cursors[1]));
                if sender.send(event).await.is_err() {
                    return None;
                }
            }
            if next.saturating_sub(chunk["cursor"].as_u64().unwrap_or(next)) < OUTPUT_CHUNK {
                complete &= chunk["complete"].as_bool().unwrap_or(false);
                break;
            }
        }
    }
    Some(complete)
}
