//! `/metrics`: msbd's state in the Prometheus text exposition format (version 0.0.4), written
//! by hand.
//!
//! Families (every one always has its `# HELP` and `# TYPE` lines, even with no samples):
//!
//! | name | type | labels | from |
//! | --- | --- | --- | --- |
//! | `msbd_up` | gauge | | always 1 while msbd answers |
//! | `msbd_tasks` | gauge | `type`, `status` | the task store's counts ([`task_core::store::Stats`]) |
//! | `msbd_queue_depth` | gauge | | tasks waiting: pending + scheduled |
//! | `msbd_tasks_running` | gauge | | tasks running |
//! | `msbd_leases_lost_total` | counter | | running attempts of this process stopped because their lease was lost ([`task_core::Engine::leases_lost`]) |
//! | `msbd_task_duration_seconds` | histogram | `type` | started → finished of each task that finished while this process ran |
//! | `msbd_loop_healthy` | gauge | `loop` | 1 when the supervised loop is healthy, else 0 |
//! | `msbd_loop_runs_total` | counter | `loop` | the loop's cycles |
//! | `msbd_loop_errors_total` | counter | `loop` | the loop's errors |
//! | `msbd_loop_restarts_total` | counter | `loop` | the loop's restarts |
//! | `msbd_sandbox_isolation` | gauge | `level` | 1 for the local backend's isolation level (`off`, `minimal`, `standard`, `strong`), 0 for the others; absent with microsandbox |
//! | `msbd_sessions` | gauge | | active sandbox sessions |
//!
//! Status names are those of the MCP tools: `pending` (the core's `queued`), `scheduled`,
//! `paused`, `running`, `completed`, `failed`, `cancelled`.
//!
//! The duration histogram is fed by a collector ([`Metrics::start`]): one Tokio task that
//! follows the engine's events and, for each task that reaches a terminal status, reads the task
//! to take its `started_at` → `finished_at`. Its owner is whoever holds the [`Metrics`] (the HTTP
//! transport, [`crate::http::serve`], for as long as it serves); it stops when its cancellation
//! token fires or when [`Metrics::stop`] is called, which also waits for it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

use sandbox_wrapper::Wrapper;
use sandbox_wrapper::backend::local::IsolationLevel;
use task_core::{Status, TaskEvent};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The content type of the exposition.
pub(crate) const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The upper bounds of the duration histogram's buckets, in seconds (`+Inf` comes on top).
const BUCKETS: [f64; 14] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// The most task types the histogram keeps apart; the durations of any further type are
/// counted under [`OTHER_TYPE`], so that the exposition cannot grow without bound.
const MAX_TYPES: usize = 256;

/// The `type` label of the durations of types beyond [`MAX_TYPES`].
const OTHER_TYPE: &str = "_other";

/// The state behind `/metrics` that is not read afresh at each scrape: the task-duration
/// histogram and the collector that feeds it. Shared by `Arc`; see the module docs for who owns
/// it.
pub(crate) struct Metrics {
    /// The daemon: the task store's counts and the loops' statistics are read at each scrape.
    wrapper: Wrapper,
    /// Durations by task type.
    durations: Mutex<BTreeMap<String, Histogram>>,
    /// Stops the collector.
    cancel: CancellationToken,
    /// The collector's task, taken by [`Metrics::stop`] to wait for it.
    collector: Mutex<Option<JoinHandle<()>>>,
}

/// One histogram: a count per bucket (not cumulative), the sum and the count.
#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Observations per bucket of [`BUCKETS`]; the last slot is above the last bound.
    buckets: [u64; BUCKETS.len() + 1],
    /// The sum of the observations, in seconds.
    sum: f64,
    /// How many observations.
    count: u64,
}

impl Histogram {
    /// Records one observation of `seconds` (negative or not-a-number values count as 0).
    fn observe(&mut self, seconds: f64) {
        let seconds = if seconds.is_finite() && seconds > 0.0 {
            seconds
        } else {
            0.0
        };
        let slot = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        self.buckets[slot] = self.buckets[slot].saturating_add(1);
        self.sum += seconds;
        self.count = self.count.saturating_add(1);
    }
}

impl Metrics {
    /// Starts the duration collector on the current Tokio runtime and returns the state that
    /// `/metrics` renders. The collector subscribes before this returns (a task that finishes
    /// afterwards is counted) and runs until `cancel` fires or [`Metrics::stop`] is called.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime.
    pub(crate) fn start(wrapper: Wrapper, cancel: CancellationToken) -> Arc<Metrics> {
        let events = wrapper.engine().subscribe();
        let metrics = Arc::new(Metrics {
            wrapper,
            durations: Mutex::new(BTreeMap::new()),
            cancel,
            collector: Mutex::new(None),
        });
        let handle = tokio::spawn(collect(Arc::downgrade(&metrics), events));
        *metrics
            .collector
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(handle);
        metrics
    }

    /// Stops the collector and waits for it to end. Calling it again does nothing.
    pub(crate) async fn stop(&self) {
        self.cancel.cancel();
        let handle = self
            .collector
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle
            && let Err(error) = handle.await
        {
            tracing::warn!(%error, "the metrics collector ended abnormally");
        }
    }

    /// Records that a task of `task_type` ran for `seconds`.
    fn observe(&self, task_type: &str, seconds: f64) {
        let mut durations = self
            .durations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = if durations.contains_key(task_type) || durations.len() < MAX_TYPES {
            task_type
        } else {
            OTHER_TYPE
        };
        durations
            .entry(key.to_owned())
            .or_default()
            .observe(seconds);
    }

    /// The whole exposition, read afresh from the store and the supervisor. A store that cannot
    /// be read leaves the task families without samples (and says why in a comment); every other
    /// family is still there.
    pub(crate) async fn render(&self) -> String {
        let stats = self.wrapper.engine().stats().await;
        let background = self.wrapper.get_background_task_status();
        let durations = self
            .durations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut out = Exposition::default();

        out.family("msbd_up", "gauge", "1 while msbd serves.");
        out.sample("msbd_up", &[], 1);

        out.family(
            "msbd_tasks",
            "gauge",
            "Tasks in the store, by type and status.",
        );
        match &stats {
            Ok(stats) => {
                for (task_type, counts) in &stats.by_type {
                    for status in Status::ALL {
                        let count = counts.get(&status).copied().unwrap_or(0);
                        out.sample(
                            "msbd_tasks",
                            &[("type", task_type), ("status", status_name(status))],
                            count,
                        );
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading the task counts for /metrics failed");
                out.comment(&format!("the task counts could not be read: {error}"));
            }
        }

        out.family(
            "msbd_queue_depth",
            "gauge",
            "Tasks waiting to run: pending plus scheduled.",
        );
        out.family("msbd_tasks_running", "gauge", "Tasks running.");
        if let Ok(stats) = &stats {
            let waiting = stats
                .count(Status::Queued)
                .saturating_add(stats.count(Status::Scheduled));
            out.sample("msbd_queue_depth", &[], waiting);
            out.sample("msbd_tasks_running", &[], stats.count(Status::Running));
        }
        out.family(
            "msbd_leases_lost_total",
            "counter",
            "Running attempts of this process stopped because their lease was lost (the task was recovered elsewhere, or its lease ran out unrenewed).",
        );
        out.sample(
            "msbd_leases_lost_total",
            &[],
            self.wrapper.engine().leases_lost(),
        );

        out.family(
            "msbd_task_duration_seconds",
            "histogram",
            "How long tasks ran, from start to finish, by type (tasks that finished while this process ran).",
        );
        for (task_type, histogram) in &durations {
            out.histogram("msbd_task_duration_seconds", task_type, histogram);
        }

        let loops = &background.components.loops;
        out.family(
            "msbd_loop_healthy",
            "gauge",
            "1 when the supervised background loop is healthy, else 0.",
        );
        for (name, child) in loops {
            out.sample(
                "msbd_loop_healthy",
                &[("loop", name)],
                u64::from(child.healthy),
            );
        }
        out.family(
            "msbd_loop_runs_total",
            "counter",
            "Cycles run by the background loop.",
        );
        for (name, child) in loops {
            out.sample("msbd_loop_runs_total", &[("loop", name)], child.cycles);
        }
        out.family(
            "msbd_loop_errors_total",
            "counter",
            "Errors of the background loop: failed cycles, errors returned and panics.",
        );
        for (name, child) in loops {
            out.sample("msbd_loop_errors_total", &[("loop", name)], child.errors);
        }
        out.family(
            "msbd_loop_restarts_total",
            "counter",
            "Restarts of the background loop, automatic and explicit.",
        );
        for (name, child) in loops {
            out.sample(
                "msbd_loop_restarts_total",
                &[("loop", name)],
                child.restarts,
            );
        }

        if let Some(report) = self.wrapper.isolation_report() {
            out.family(
                "msbd_sandbox_isolation",
                "gauge",
                "1 for the isolation level local sandboxes run under, 0 for the others (below strong: the health check says what is missing).",
            );
            for level in [
                IsolationLevel::Off,
                IsolationLevel::Minimal,
                IsolationLevel::Standard,
                IsolationLevel::Strong,
            ] {
                out.sample(
                    "msbd_sandbox_isolation",
                    &[("level", level.name())],
                    u64::from(report.level == level),
                );
            }
        }

        out.family("msbd_sessions", "gauge", "Active sandbox sessions.");
        let sessions = background.components.session_manager.active_sessions;
        out.sample(
            "msbd_sessions",
            &[],
            u64::try_from(sessions).unwrap_or(u64::MAX),
        );

        out.text
    }
}

/// The collector: until its owner stops it (or the [`Metrics`] is gone, or the engine's
/// channel closes), records the duration of every task that reaches a terminal status.
async fn collect(
    metrics: std::sync::Weak<Metrics>,
    mut events: tokio::sync::broadcast::Receiver<TaskEvent>,
) {
    let Some(cancel) = metrics.upgrade().map(|m| m.cancel.clone()) else {
        return;
    };
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            event = events.recv() => event,
        };
        let id = match event {
            Ok(TaskEvent::Status { id, status, .. }) if status.is_terminal() => id,
            Ok(_) => continue,
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(
                    missed,
                    "the metrics collector fell behind: some task durations are not counted"
                );
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        let Some(metrics) = metrics.upgrade() else {
            return;
        };
        let task = tokio::select! {
            () = cancel.cancelled() => return,
            task = metrics.wrapper.engine().get(id) => task,
        };
        match task {
            Ok(task) => {
                if let (Some(started), Some(finished)) = (task.started_at, task.finished_at) {
                    let millis = finished.0.saturating_sub(started.0).max(0);
                    // Milliseconds to seconds; precision beyond 2^53 ms is not a concern.
                    let seconds = millis as f64 / 1000.0;
                    metrics.observe(&task.task_type, seconds);
                }
            }
            Err(error) => {
                tracing::debug!(%error, task = %id, "the metrics collector could not read a finished task");
            }
        }
    }
}

/// A status's name in the exposition: the MCP tools' names (`pending` for the core's `queued`).
fn status_name(status: Status) -> &'static str {
    match status {
        Status::Queued => "pending",
        Status::Scheduled => "scheduled",
        Status::Paused => "paused",
        Status::Running => "running",
        Status::Completed => "completed",
        Status::Failed => "failed",
        Status::Cancelled => "cancelled",
    }
}

/// The exposition being written.
#[derive(Default)]
struct Exposition {
    /// The text so far.
    text: String,
}

impl Exposition {
    /// The `# HELP` and `# TYPE` lines of a family.
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// A comment line.
    fn comment(&mut self, text: &str) {
        let _ = writeln!(self.text, "# {}", escape_help(text));
    }

    /// One sample with integer value.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        let _ = writeln!(self.text, "{name}{} {value}", render_labels(labels));
    }

    /// The samples of one histogram: cumulative buckets, `+Inf`, sum and count.
    fn histogram(&mut self, name: &str, task_type: &str, histogram: &Histogram) {
        let mut cumulative = 0u64;
        for (bound, count) in BUCKETS.iter().zip(histogram.buckets.iter()) {
            cumulative = cumulative.saturating_add(*count);
            let le = bound.to_string();
            let labels = render_labels(&[("type", task_type), ("le", &le)]);
            let _ = writeln!(self.text, "{name}_bucket{labels} {cumulative}");
        }
        let labels = render_labels(&[("type", task_type), ("le", "+Inf")]);
        let _ = writeln!(self.text, "{name}_bucket{labels} {}", histogram.count);
        let labels = render_labels(&[("type", task_type)]);
        let _ = writeln!(self.text, "{name}_sum{labels} {}", histogram.sum);
        let _ = writeln!(self.text, "{name}_count{labels} {}", histogram.count);
    }
}

/// `{a="x",b="y"}`, or nothing without labels.
fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut out = String::from("{");
    for (i, (name, value)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"{}\"", escape_label_value(value));
    }
    out.push('}');
    out
}

/// A label value as the text format wants it: backslash, double quote and line feed escaped.
fn escape_label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Help (and comment) text as the text format wants it: backslash and line feed escaped.
fn escape_help(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("x\ny"), "x\\ny");
        assert_eq!(
            render_labels(&[("type", "we\"ird"), ("status", "ok")]),
            r#"{type="we\"ird",status="ok"}"#
        );
        assert_eq!(render_labels(&[]), "");
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut histogram = Histogram::default();
        histogram.observe(0.02);
        histogram.observe(3.0);
        histogram.observe(1e9);
        histogram.observe(f64::NAN);
        histogram.observe(-5.0);
        let mut out = Exposition::default();
        out.histogram("h", "command", &histogram);
        let text = out.text;
        assert!(
            text.contains("h_bucket{type=\"command\",le=\"0.01\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{type=\"command\",le=\"0.05\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{type=\"command\",le=\"5\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{type=\"command\",le=\"3600\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("h_bucket{type=\"command\",le=\"+Inf\"} 5\n"),
            "{text}"
        );
        assert!(text.contains("h_count{type=\"command\"} 5\n"), "{text}");
    }

    #[test]
    fn every_status_has_a_name() {
        let names: Vec<_> = Status::ALL.into_iter().map(status_name).collect();
        assert_eq!(
            names,
            [
                "pending",
                "scheduled",
                "paused",
                "running",
                "completed",
                "failed",
                "cancelled"
            ]
        );
    }
}
