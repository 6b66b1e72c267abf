//! The queue's last hour, kept in memory for the console's charts: tasks finished per minute
//! (completed, and failed or cancelled) and the median wait from queued to started per minute.
//! Drawn from the engine's broadcast of task events by one task the console owns (it ends with
//! msbd's `stop`), never from the store. It starts empty at each start of msbd; a task already
//! waiting at start has no wait sample, and events the listener missed because it fell behind
//! (the broadcast is bounded) are not counted: the charts are a view, the store is the record.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use task_core::{Status, TaskEvent, TaskId};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Minutes kept.
const MINUTES: usize = 60;
/// The most tasks followed at once between queued and started (then new ones go unmeasured).
const FOLLOWED: usize = 100_000;
/// The most wait samples kept per minute (the first ones of the minute).
const SAMPLES: usize = 1_000;

/// One minute of the queue.
#[derive(Clone, Debug, Default)]
struct Minute {
    /// Minutes since the epoch.
    at: u64,
    completed: u64,
    failed: u64,
    started: u64,
    /// Waits from queued to started, in milliseconds.
    waits: Vec<f64>,
}

#[derive(Default)]
struct State {
    minutes: VecDeque<Minute>,
    waiting: HashMap<TaskId, Instant>,
}

/// The last hour of the queue.
#[derive(Default)]
pub(crate) struct History {
    state: Mutex<State>,
}

fn minute_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

impl History {
    /// Starts following `events` until `stop` fires.
    pub(crate) fn follow(
        mut events: broadcast::Receiver<TaskEvent>,
        stop: CancellationToken,
    ) -> Arc<History> {
        let history = Arc::new(History::default());
        let recorder = Arc::clone(&history);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => return,
                    event = events.recv() => event,
                };
                match event {
                    Ok(TaskEvent::Status { id, status, .. }) => recorder.record(id, status),
                    Ok(TaskEvent::Progress { .. }) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "the console's history missed task events");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        history
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn record(&self, id: TaskId, status: Status) {
        let now = minute_now();
        let mut state = self.state();
        if state.minutes.back().is_none_or(|m| m.at != now) {
            state.minutes.push_back(Minute {
                at: now,
                ..Minute::default()
            });
            while state.minutes.len() > MINUTES {
                state.minutes.pop_front();
            }
        }
        match status {
            Status::Queued => {
                if state.waiting.len() < FOLLOWED {
                    state.waiting.insert(id, Instant::now());
                }
            }
            Status::Running => {
                let waited = state.waiting.remove(&id);
                if let Some(minute) = state.minutes.back_mut() {
                    minute.started += 1;
                    if let Some(since) = waited
                        && minute.waits.len() < SAMPLES
                    {
                        minute.waits.push(since.elapsed().as_secs_f64() * 1000.0);
                    }
                }
            }
            Status::Completed | Status::Failed | Status::Cancelled => {
                state.waiting.remove(&id);
                if let Some(minute) = state.minutes.back_mut() {
                    if status == Status::Completed {
                        minute.completed += 1;
                    } else {
                        minute.failed += 1;
                    }
                }
            }
            Status::Scheduled | Status::Paused => {
                state.waiting.remove(&id);
            }
        }
    }

    /// The last hour, one entry per minute, oldest first (minutes with no event are zeros):
    /// (minutes ago, completed, failed or cancelled, started, median wait in ms).
    fn hour(&self) -> Vec<(u64, u64, u64, u64, Option<f64>)> {
        let now = minute_now();
        let state = self.state();
        (0..MINUTES as u64)
            .rev()
            .map(|ago| {
                let at = now.saturating_sub(ago);
                match state.minutes.iter().find(|m| m.at == at) {
                    Some(m) => {
                        let mut waits = m.waits.clone();
                        waits.sort_by(f64::total_cmp);
                        let median = waits.get(waits.len() / 2).copied();
                        (ago, m.completed, m.failed, m.started, median)
                    }
                    None => (ago, 0, 0, 0, None),
                }
            })
            .collect()
    }

    /// The two charts of the queue page, as inline SVG (styled by the console's stylesheet).
    pub(crate) fn charts(&self) -> String {
        let hour = self.hour();
        let finished: u64 = hour.iter().map(|m| m.1 + m.2).sum();
        let mut out = String::new();
        let _ = write!(
            out,
            "<div class=\"charts\"><figure><figcaption>Finished per minute, last hour ({finished} in all; <span class=\"key ok\">completed</span> <span class=\"key bad\">failed or cancelled</span>)</figcaption>"
        );
        let top = hour.iter().map(|m| m.1 + m.2).max().unwrap_or(0).max(1) as f64;
        out.push_str(&svg_open("chart-throughput", top, ""));
        for (index, (ago, completed, failed, _, _)) in hour.iter().enumerate() {
            let x = index as f64 * 10.0;
            let ok_h = *completed as f64 / top * 100.0;
            let bad_h = *failed as f64 / top * 100.0;
            let _ = write!(
                out,
                "<rect class=\"ok\" x=\"{x}\" y=\"{:.2}\" width=\"8\" height=\"{ok_h:.2}\"><title>{ago} min ago: {completed} completed, {failed} failed or cancelled</title></rect>",
                100.0 - ok_h
            );
            if *failed > 0 {
                let _ = write!(
                    out,
                    "<rect class=\"bad\" x=\"{x}\" y=\"{:.2}\" width=\"8\" height=\"{bad_h:.2}\"></rect>",
                    100.0 - ok_h - bad_h
                );
            }
        }
        out.push_str("</svg></figure>");
        let waits: Vec<Option<f64>> = hour.iter().map(|m| m.4).collect();
        let top = waits.iter().flatten().copied().fold(0.0, f64::max).max(1.0);
        let _ = write!(
            out,
            "<figure><figcaption>Median wait from queued to started, per minute (highest {top:.1} ms)</figcaption>"
        );
        out.push_str(&svg_open("chart-latency", top, " ms"));
        let mut points = String::new();
        for (index, wait) in waits.iter().enumerate() {
            if let Some(wait) = wait {
                let x = index as f64 * 10.0 + 4.0;
                let y = 100.0 - wait / top * 100.0;
                let _ = write!(points, "{x:.1},{y:.2} ");
                let _ = write!(
                    out,
                    "<circle class=\"dot\" cx=\"{x:.1}\" cy=\"{y:.2}\" r=\"1.6\"><title>{} min ago: {wait:.1} ms</title></circle>",
                    hour[index].0
                );
            }
        }
        let _ = write!(
            out,
            "<polyline class=\"line\" points=\"{}\"></polyline></svg></figure></div>",
            points.trim_end()
        );
        out
    }
}

/// The frame of a chart: 60 minutes across, `top` at the top.
fn svg_open(id: &str, top: f64, unit: &str) -> String {
    format!(
        "<svg id=\"{id}\" class=\"chart\" viewBox=\"-2 -10 604 124\" role=\"img\" preserveAspectRatio=\"none\">\
         <line class=\"axis\" x1=\"0\" y1=\"100\" x2=\"600\" y2=\"100\"></line>\
         <text class=\"tick\" x=\"0\" y=\"-1\">{top:.0}{unit}</text>\
         <text class=\"tick\" x=\"0\" y=\"112\">60 min ago</text>\
         <text class=\"tick end\" x=\"600\" y=\"112\">now</text>"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_counts_once_in_its_minute_with_its_wait() {
        let history = History::default();
        let (a, b) = (TaskId::new(), TaskId::new());
        history.record(a, Status::Queued);
        history.record(b, Status::Queued);
        history.record(a, Status::Running);
        history.record(a, Status::Completed);
        history.record(b, Status::Cancelled);
        let hour = history.hour();
        assert_eq!(hour.len(), MINUTES);
        let (ago, completed, failed, started, wait) = *hour.last().unwrap();
        assert_eq!((ago, completed, failed, started), (0, 1, 1, 1));
        assert!(wait.is_some_and(|w| w >= 0.0));
        assert!(
            history.state().waiting.is_empty(),
            "finished tasks are not followed"
        );
        let svg = history.charts();
        assert!(svg.contains("2 in all"), "{svg}");
        assert!(
            svg.contains("0 min ago: 1 completed, 1 failed or cancelled"),
            "{svg}"
        );
    }
}
