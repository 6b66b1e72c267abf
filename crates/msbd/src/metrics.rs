//! `/metrics`: msbd's state in the Prometheus text exposition format (version 0.0.4), written
//! by `prometheus-client`'s encoder (`encoding::prometheus_text`): names, escaping, histogram
//! buckets and the grouping of each family are the crate's.
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
//! | `msbd_network_connections_total` | counter | `outcome` | connections sandboxes made through msbd's proxy (`allowed`), and allowed ones no address answered (`failed`) ([`sandbox_wrapper::network::NetworkStats`]) |
//! | `msbd_network_refused_total` | counter | `reason` | connections the proxy refused: `not_allowed`, `address`, `private_address`, `unresolved`, `bad_request` |
//!
//! `msbd_tasks` has one sample per status for every registered task type (0 for a type with no
//! task) and for every type that still has tasks in the store. Status names are those of the MCP
//! tools: `pending` (the core's `queued`), `scheduled`, `paused`, `running`, `completed`,
//! `failed`, `timeout` (a failed task whose last attempt ran out of time, counted from the
//! tasks at each scrape: [`task_core::store::Store::timed_out`]; `failed` does not count these),
//! `cancelled`.
//!
//! Each family is one group: `# HELP`, `# TYPE`, then its samples. The values are read afresh at
//! each scrape into a [`Snapshot`], a `prometheus-client` collector that writes the families in
//! the order above; counters are declared without `_total`, which the encoder appends.
//!
//! The duration histogram is fed by a collector ([`Metrics::start`]): one Tokio task that
//! follows the engine's events and, for each task that reaches a terminal status, reads the task
//! to take its `started_at` → `finished_at`. Its owner is whoever holds the [`Metrics`] (the HTTP
//! transport, [`crate::http::serve`], for as long as it serves); it stops when its cancellation
//! token fires or when [`Metrics::stop`] is called, which also waits for it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, PoisonError};

// A status is named in the exposition as the MCP tools name it (`pending` for `Queued`).
use mcp_tools::wire::core_status_name as status_name;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sandbox_wrapper::Wrapper;
use sandbox_wrapper::backend::local::IsolationLevel;
use task_core::{Status, TaskEvent};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The content type of the exposition (text format 0.0.4).
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

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

/// A new duration histogram, with the buckets of [`BUCKETS`].
fn new_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Records one observation of `seconds` (negative or not-a-number values count as 0).
fn observe(histogram: &Histogram, seconds: f64) {
    let seconds = if seconds.is_finite() && seconds > 0.0 {
        seconds
    } else {
        0.0
    };
    histogram.observe(seconds);
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
        observe(
            durations
                .entry(key.to_owned())
                .or_insert_with(new_histogram),
            seconds,
        );
    }

    /// The whole exposition, read afresh from the store and the supervisor. A store that cannot
    /// be read leaves the task families without samples (and says why in a comment); every other
    /// family is still there.
    pub(crate) async fn render(&self) -> String {
        let stats = self.wrapper.engine().stats().await;
        // Failed tasks whose attempt ran out of time show as `timeout`, as clients see them.
        let timed_out = match self.wrapper.engine().store().timed_out().await {
            Ok(counts) => counts,
            Err(error) => {
                tracing::warn!(%error, "counting timed-out tasks for /metrics failed");
                BTreeMap::new()
            }
        };
        let registered = self.wrapper.engine().task_types();
        let background = self.wrapper.get_background_task_status();
        let durations = self
            .durations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut note = None;
        let tasks = match &stats {
            Ok(stats) => {
                // Every registered type (with no task yet, its counts are 0) and every type that
                // still has tasks in the store (one no longer registered included), each with
                // every status.
                let mut types: BTreeSet<&str> = stats.by_type.keys().map(String::as_str).collect();
                types.extend(registered.iter().map(String::as_str));
                let none = BTreeMap::new();
                let mut samples = Vec::new();
                for task_type in types {
                    let counts = stats.by_type.get(task_type).unwrap_or(&none);
                    let timeouts = timed_out.get(task_type).copied().unwrap_or(0);
                    for status in Status::ALL {
                        let count = counts.get(&status).copied().unwrap_or(0);
                        if status == Status::Failed {
                            let timeouts = timeouts.min(count);
                            samples.push((task_type.to_owned(), "failed", count - timeouts));
                            samples.push((task_type.to_owned(), "timeout", timeouts));
                        } else {
                            samples.push((task_type.to_owned(), status_name(status), count));
                        }
                    }
                }
                Some(samples)
            }
            Err(error) => {
                tracing::warn!(%error, "reading the task counts for /metrics failed");
                note = Some(format!("the task counts could not be read: {error}"));
                None
            }
        };
        let stats = stats.as_ref().ok();
        let snapshot = Snapshot {
            tasks,
            waiting: stats.map(|stats| {
                stats
                    .count(Status::Queued)
                    .saturating_add(stats.count(Status::Scheduled))
            }),
            running: stats.map(|stats| stats.count(Status::Running)),
            leases_lost: self.wrapper.engine().leases_lost(),
            network_connections: (
                self.wrapper.network().stats.allowed(),
                self.wrapper.network().stats.failed(),
            ),
            network_refused: self
                .wrapper
                .network()
                .stats
                .refused()
                .into_iter()
                .map(|(reason, count)| (reason.as_str(), count))
                .collect(),
            durations: durations.into_iter().collect(),
            loops: background
                .components
                .loops
                .iter()
                .map(|(name, child)| {
                    let counts = LoopCounts {
                        healthy: child.healthy,
                        runs: child.cycles,
                        errors: child.errors,
                        restarts: child.restarts,
                    };
                    (name.clone(), counts)
                })
                .collect(),
            isolation: self.wrapper.isolation_report().map(|report| report.level),
            sessions: u64::try_from(background.components.session_manager.active_sessions)
                .unwrap_or(u64::MAX),
        };
        exposition(snapshot, note.as_deref())
    }
}

/// The exposition of a snapshot, after a comment line with `note` if there is one.
fn exposition(snapshot: Snapshot, note: Option<&str>) -> String {
    let mut text = String::new();
    if let Some(note) = note {
        let _ = writeln!(
            text,
            "# {}",
            note.replace('\\', "\\\\").replace('\n', "\\n")
        );
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    // Writing to a String cannot fail, and the collector only fails when its writer does.
    let _ = prometheus_text::encode(&mut text, &registry);
    text
}

/// What `/metrics` shows, read at one scrape.
#[derive(Debug, Default)]
struct Snapshot {
    /// `msbd_tasks`: type, status name and count; `None` when the store could not be read.
    tasks: Option<Vec<(String, &'static str, u64)>>,
    /// `msbd_queue_depth`, when the store could be read.
    waiting: Option<u64>,
    /// `msbd_tasks_running`, when the store could be read.
    running: Option<u64>,
    /// `msbd_leases_lost_total`.
    leases_lost: u64,
    /// `msbd_task_duration_seconds`, by type.
    durations: Vec<(String, Histogram)>,
    /// The supervised loops' numbers, by name.
    loops: Vec<(String, LoopCounts)>,
    /// The local backend's isolation level (none with microsandbox).
    isolation: Option<IsolationLevel>,
    /// `msbd_sessions`.
    sessions: u64,
    /// `msbd_network_connections_total`: allowed, failed.
    network_connections: (u64, u64),
    /// `msbd_network_refused_total`, by reason.
    network_refused: Vec<(&'static str, u64)>,
}

/// A family of the loops' numbers: name, help, type and the number it shows.
type LoopFamily = (
    &'static str,
    &'static str,
    MetricType,
    fn(&LoopCounts) -> u64,
);

/// One supervised loop's numbers.
#[derive(Debug)]
struct LoopCounts {
    /// Whether it is healthy.
    healthy: bool,
    /// Its cycles.
    runs: u64,
    /// Its errors.
    errors: u64,
    /// Its restarts.
    restarts: u64,
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        use MetricType::{Counter, Gauge};

        let up = encoder.encode_descriptor("msbd_up", "1 while msbd serves.", None, Gauge)?;
        ConstGauge::new(1_u64).encode(up)?;

        let mut family = encoder.encode_descriptor(
            "msbd_tasks",
            "Tasks in the store, by type and status.",
            None,
            Gauge,
        )?;
        for (task_type, status, count) in self.tasks.iter().flatten() {
            let labels = [("type", task_type.as_str()), ("status", status)];
            ConstGauge::new(*count).encode(family.encode_family(&labels)?)?;
        }

        let family = encoder.encode_descriptor(
            "msbd_queue_depth",
            "Tasks waiting to run: pending plus scheduled.",
            None,
            Gauge,
        )?;
        if let Some(waiting) = self.waiting {
            ConstGauge::new(waiting).encode(family)?;
        }
        let family =
            encoder.encode_descriptor("msbd_tasks_running", "Tasks running.", None, Gauge)?;
        if let Some(running) = self.running {
            ConstGauge::new(running).encode(family)?;
        }
        // Counters are named without `_total`: the encoder appends it.
        let family = encoder.encode_descriptor(
            "msbd_leases_lost",
            "Running attempts of this process stopped because their lease was lost (the task was recovered elsewhere, or its lease ran out unrenewed).",
            None,
            Counter,
        )?;
        ConstCounter::new(self.leases_lost).encode(family)?;

        let mut family = encoder.encode_descriptor(
            "msbd_task_duration_seconds",
            "How long tasks ran, from start to finish, by type (tasks that finished while this process ran).",
            None,
            MetricType::Histogram,
        )?;
        for (task_type, histogram) in &self.durations {
            histogram.encode(family.encode_family(&[("type", task_type.as_str())])?)?;
        }

        let loops: [LoopFamily; 4] = [
            (
                "msbd_loop_healthy",
                "1 when the supervised background loop is healthy, else 0.",
                Gauge,
                |counts| u64::from(counts.healthy),
            ),
            (
                "msbd_loop_runs",
                "Cycles run by the background loop.",
                Counter,
                |counts| counts.runs,
            ),
            (
                "msbd_loop_errors",
                "Errors of the background loop: failed cycles, errors returned and panics.",
                Counter,
                |counts| counts.errors,
            ),
            (
                "msbd_loop_restarts",
                "Restarts of the background loop, automatic and explicit.",
                Counter,
                |counts| counts.restarts,
            ),
        ];
        for (name, help, kind, value) in loops {
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for (loop_name, counts) in &self.loops {
                let labels = [("loop", loop_name.as_str())];
                let sample = family.encode_family(&labels)?;
                if kind == Counter {
                    ConstCounter::new(value(counts)).encode(sample)?;
                } else {
                    ConstGauge::new(value(counts)).encode(sample)?;
                }
            }
        }

        if let Some(level) = self.isolation {
            let mut family = encoder.encode_descriptor(
                "msbd_sandbox_isolation",
                "1 for the isolation level local sandboxes run under, 0 for the others (below strong: the health check says what is missing).",
                None,
                Gauge,
            )?;
            for each in [
                IsolationLevel::Off,
                IsolationLevel::Minimal,
                IsolationLevel::Standard,
                IsolationLevel::Strong,
            ] {
                let labels = [("level", each.name())];
                let sample = family.encode_family(&labels)?;
                ConstGauge::new(u64::from(level == each)).encode(sample)?;
            }
        }

        let family =
            encoder.encode_descriptor("msbd_sessions", "Active sandbox sessions.", None, Gauge)?;
        ConstGauge::new(self.sessions).encode(family)?;

        let mut family = encoder.encode_descriptor(
            "msbd_network_connections",
            "Connections sandboxes made through msbd's network proxy (allowed), and allowed ones that no address of the name answered (failed).",
            None,
            Counter,
        )?;
        let (allowed, failed) = self.network_connections;
        for (outcome, count) in [("allowed", allowed), ("failed", failed)] {
            let labels = [("outcome", outcome)];
            let sample = family.encode_family(&labels)?;
            ConstCounter::new(count).encode(sample)?;
        }

        let mut family = encoder.encode_descriptor(
            "msbd_network_refused",
            "Connections from sandboxes that msbd's network proxy refused, by reason (each is logged with its session and the name asked for).",
            None,
            Counter,
        )?;
        for (reason, count) in &self.network_refused {
            let labels = [("reason", *reason)];
            let sample = family.encode_family(&labels)?;
            ConstCounter::new(*count).encode(sample)?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_and_notes_are_escaped() {
        let weird = "we\"ird\\type\nname";
        let snapshot = Snapshot {
            tasks: Some(vec![(weird.to_owned(), "pending", 3)]),
            ..Snapshot::default()
        };
        let text = exposition(snapshot, Some("a\\b\nc"));
        assert!(text.starts_with("# a\\\\b\\nc\n"), "{text}");
        assert!(
            text.contains("msbd_tasks{type=\"we\\\"ird\\\\type\\nname\",status=\"pending\"} 3\n"),
            "{text}"
        );
        let families = text_format::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let tasks = &families.iter().find(|f| f.name == "msbd_tasks").unwrap();
        assert_eq!(tasks.samples[0].1["type"], weird);
        // Without a readable store, the task families are there without samples.
        let text = exposition(Snapshot::default(), None);
        let families = text_format::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for name in ["msbd_tasks", "msbd_queue_depth", "msbd_tasks_running"] {
            let family = families.iter().find(|f| f.name == name).unwrap();
            assert!(family.samples.is_empty(), "{name}\n{text}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let histogram = new_histogram();
        for seconds in [0.02, 3.0, 1e9, f64::NAN, -5.0] {
            observe(&histogram, seconds);
        }
        let snapshot = Snapshot {
            durations: vec![("command".to_owned(), histogram)],
            ..Snapshot::default()
        };
        let text = exposition(snapshot, None);
        text_format::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let h = "msbd_task_duration_seconds";
        for (le, count) in [("0.01", 2), ("0.05", 3), ("5", 4), ("3600", 4), ("+Inf", 5)] {
            let line = format!("{h}_bucket{{type=\"command\",le=\"{le}\"}} {count}\n");
            assert!(text.contains(&line), "{line}{text}");
        }
        assert!(
            text.contains(&format!("{h}_count{{type=\"command\"}} 5\n")),
            "{text}"
        );
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

    /// A strict reader of the Prometheus text exposition format 0.0.4
    /// (<https://prometheus.io/docs/instrumenting/exposition_formats/>), written against the
    /// format's rules because the one parser crate (`prometheus-parse`) skips lines it cannot
    /// read, splits labels naively and does not check grouping. Beyond the format's rules it
    /// requires what msbd promises: every family has `# HELP` then `# TYPE`, before its samples.
    mod text_format {
        use std::collections::{BTreeMap, BTreeSet};

        /// One family: its name, type, help and samples (name, labels, value), in order.
        #[derive(Debug)]
        pub(super) struct Family {
            pub(super) name: String,
            pub(super) kind: String,
            pub(super) help: String,
            pub(super) samples: Vec<(String, BTreeMap<String, String>, f64)>,
        }

        /// `[a-zA-Z_:][a-zA-Z0-9_:]*` (with `colons`), else `[a-zA-Z_][a-zA-Z0-9_]*`.
        fn is_name(name: &str, colons: bool) -> bool {
            let ok = |c: char, first: bool| {
                c == '_'
                    || c.is_ascii_alphabetic()
                    || (colons && c == ':')
                    || (!first && c.is_ascii_digit())
            };
            let mut chars = name.chars();
            chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
        }

        /// A sample value: a Go float (`+Inf`, `-Inf`, `NaN` included).
        fn value(text: &str) -> Result<f64, String> {
            match text {
                "+Inf" => Ok(f64::INFINITY),
                "-Inf" => Ok(f64::NEG_INFINITY),
                "NaN" => Ok(f64::NAN),
                _ if text
                    .chars()
                    .all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
                {
                    text.parse().map_err(|e| format!("value {text:?}: {e}"))
                }
                _ => Err(format!("value {text:?} is not a number")),
            }
        }

        /// One sample line: name, labels, value (an optional timestamp is checked and dropped).
        fn sample(line: &str) -> Result<(String, BTreeMap<String, String>, f64), String> {
            let end = line.find(['{', ' ']).ok_or("a sample without a value")?;
            let name = &line[..end];
            if !is_name(name, true) {
                return Err(format!("bad metric name {name:?}"));
            }
            let mut rest = &line[end..];
            let mut labels = BTreeMap::new();
            if let Some(after) = rest.strip_prefix('{') {
                let mut chars = after.char_indices().peekable();
                loop {
                    // A label name up to '=', or the closing brace.
                    let start = chars.peek().map(|(i, _)| *i).ok_or("unclosed labels")?;
                    if after[start..].starts_with('}') {
                        rest = &after[start + 1..];
                        break;
                    }
                    let eq = after[start..].find('=').ok_or("a label without '='")? + start;
                    let label = &after[start..eq];
                    if !is_name(label, false) || label.starts_with("__") {
                        return Err(format!("bad label name {label:?}"));
                    }
                    while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                        chars.next();
                    }
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return Err(format!("the value of label {label} is not quoted"));
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().ok_or("an unterminated label value")?.1 {
                            '"' => break,
                            '\\' => match chars.next().ok_or("a dangling backslash")?.1 {
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                'n' => value.push('\n'),
                                c => return Err(format!("bad escape \\{c} in a label value")),
                            },
                            '\n' => return Err("a raw line feed in a label value".into()),
                            c => value.push(c),
                        }
                    }
                    if labels.insert(label.to_owned(), value).is_some() {
                        return Err(format!("label {label} given twice"));
                    }
                    match chars.peek().map(|(_, c)| *c) {
                        Some(',') => {
                            chars.next();
                        }
                        Some('}') => {}
                        other => return Err(format!("{other:?} after a label value")),
                    }
                }
            }
            let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
            let mut fields = rest.split(' ');
            let value = value(fields.next().unwrap_or_default())?;
            if let Some(timestamp) = fields.next() {
                timestamp
                    .parse::<i64>()
                    .map_err(|e| format!("timestamp {timestamp:?}: {e}"))?;
            }
            if fields.next().is_some() {
                return Err("more than a value and a timestamp".into());
            }
            Ok((name.to_owned(), labels, value))
        }

        /// Whether a sample called `sample` belongs to `family`.
        fn belongs(sample: &str, family: &Family) -> bool {
            let suffixes: &[&str] = match family.kind.as_str() {
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                _ => &[""],
            };
            suffixes
                .iter()
                .any(|suffix| sample.strip_suffix(suffix) == Some(family.name.as_str()))
        }

        /// Reads a whole exposition, or says which line breaks which rule.
        pub(super) fn parse(text: &str) -> Result<Vec<Family>, String> {
            if !text.ends_with('\n') {
                return Err("the exposition does not end with a line feed".into());
            }
            let mut families: Vec<Family> = Vec::new();
            let mut closed: BTreeSet<String> = BTreeSet::new();
            let mut series: BTreeSet<String> = BTreeSet::new();
            for (number, line) in text.lines().enumerate() {
                let at = |e: String| format!("line {}: {e}: {line:?}", number + 1);
                if line.is_empty() {
                    continue;
                }
                if let Some(comment) = line.strip_prefix('#') {
                    let mut words = comment.trim_start().splitn(3, ' ');
                    let keyword = words.next().unwrap_or_default();
                    if keyword != "HELP" && keyword != "TYPE" {
                        continue;
                    }
                    let name = words.next().unwrap_or_default();
                    let rest = words.next().unwrap_or_default();
                    if !is_name(name, true) {
                        return Err(at(format!("bad metric name {name:?}")));
                    }
                    let open = families
                        .last()
                        .is_some_and(|f| f.name == name && f.samples.is_empty());
                    if !open {
                        if closed.contains(name) || families.iter().any(|f| f.name == name) {
                            return Err(at(format!(
                                "{name} is declared again, apart from its group"
                            )));
                        }
                        if let Some(previous) = families.last() {
                            closed.insert(previous.name.clone());
                        }
                        if keyword != "HELP" {
                            return Err(at(format!("{name}: TYPE before HELP")));
                        }
                        families.push(Family {
                            name: name.to_owned(),
                            kind: String::new(),
                            help: String::new(),
                            samples: Vec::new(),
                        });
                    }
                    let family = families.last_mut().expect("pushed");
                    if keyword == "HELP" {
                        if open {
                            return Err(at(format!("{name} has a second HELP")));
                        }
                        family.help = rest.to_owned();
                    } else {
                        if !family.kind.is_empty() {
                            return Err(at(format!("{name} has a second TYPE")));
                        }
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest)
                        {
                            return Err(at(format!("unknown type {rest:?}")));
                        }
                        family.kind = rest.to_owned();
                    }
                    continue;
                }
                let (name, labels, value) = sample(line).map_err(at)?;
                let family = families
                    .last_mut()
                    .filter(|f| belongs(&name, f))
                    .ok_or_else(|| at(format!("{name} is not in the group of its own family")))?;
                if family.kind.is_empty() {
                    return Err(at(format!("a sample of {} before its TYPE", family.name)));
                }
                if family.kind == "histogram"
                    && name.ends_with("_bucket")
                    && !labels.contains_key("le")
                {
                    return Err(at("a bucket without le".into()));
                }
                if !series.insert(format!("{name}{labels:?}")) {
                    return Err(at("the same series twice".into()));
                }
                family.samples.push((name, labels, value));
            }
            if let Some(f) = families.iter().find(|f| f.kind.is_empty()) {
                return Err(format!("{} has HELP but no TYPE", f.name));
            }
            Ok(families)
        }
    }

    #[test]
    fn the_text_format_reader_rejects_what_the_format_forbids() {
        let good = "# HELP a A.\n# TYPE a gauge\na 1\n# HELP b B.\n# TYPE b counter\nb{x=\"q\\\"\\\\\\n\"} 2\n";
        let families = text_format::parse(good).unwrap();
        assert_eq!(families.len(), 2);
        assert_eq!(families[1].samples[0].1["x"], "q\"\\\n");
        for (bad, why) in [
            // The shape /metrics had: two families declared, then both sampled.
            (
                "# HELP a A.\n# TYPE a gauge\n# HELP b B.\n# TYPE b gauge\na 1\nb 2\n",
                "group",
            ),
            (
                "# HELP a A.\n# TYPE a gauge\na 1\n# HELP b B.\n# TYPE b gauge\nb 2\na 3\n",
                "group",
            ),
            ("a 1\n", "group"),
            ("# HELP a A.\na 1\n", "before its TYPE"),
            ("# TYPE a gauge\na 1\n", "TYPE before HELP"),
            ("# HELP a A.\n# TYPE a gauge\na{x=\"1} 1\n", "unterminated"),
            ("# HELP a A.\n# TYPE a gauge\na{x=1} 1\n", "quoted"),
            ("# HELP a A.\n# TYPE a gauge\na one\n", "not a number"),
            ("# HELP a A.\n# TYPE a gauge\na 1\na 2\n", "twice"),
            ("# HELP a A.\n# TYPE a gauge\na 1", "line feed"),
            (
                "# HELP h H.\n# TYPE h histogram\nh_bucket 1\n",
                "without le",
            ),
        ] {
            let error = text_format::parse(bad).expect_err(bad);
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_whole_exposition_is_well_formed_and_counts_every_status_of_every_type() {
        use sandbox_wrapper::WrapperConfig;
        use task_core::store::Store;
        use task_core::store::sqlite::{SqliteConfig, SqliteStore};

        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.sqlite3"))).unwrap(),
        );
        let wrapper = Wrapper::start(store, WrapperConfig::new(dir.path().join("data")))
            .await
            .unwrap();
        let metrics = Metrics::start(wrapper.clone(), CancellationToken::new());
        let submitted = wrapper
            .submit(wrapper.new_task("command", serde_json::json!({"command": "true"})))
            .await
            .unwrap();
        // One that runs out of time: `timeout` for clients, so for /metrics too.
        wrapper
            .submit(
                wrapper
                    .new_task("command", serde_json::json!({"command": "sleep 30"}))
                    .with_timeout(std::time::Duration::from_millis(300)),
            )
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let text = loop {
            let text = metrics.render().await;
            if text.contains("msbd_task_duration_seconds_count{type=\"command\"} 2\n") {
                break text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "task {} not counted in 60 s:\n{text}",
                submitted.task.id
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let families = text_format::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));

        let names: Vec<&str> = families.iter().map(|f| f.name.as_str()).collect();
        for expected in [
            "msbd_up",
            "msbd_tasks",
            "msbd_queue_depth",
            "msbd_tasks_running",
            "msbd_leases_lost_total",
            "msbd_task_duration_seconds",
            "msbd_loop_healthy",
            "msbd_loop_runs_total",
            "msbd_loop_errors_total",
            "msbd_loop_restarts_total",
            "msbd_sandbox_isolation",
            "msbd_sessions",
            "msbd_network_connections_total",
            "msbd_network_refused_total",
        ] {
            assert!(names.contains(&expected), "{expected} missing: {names:?}");
        }
        for family in &families {
            assert!(!family.help.is_empty(), "{}", family.name);
        }
        let family = |name: &str| families.iter().find(|f| f.name == name).unwrap();
        assert_eq!(family("msbd_queue_depth").samples.len(), 1);
        assert_eq!(family("msbd_tasks_running").samples.len(), 1);

        // Every registered type, those with no task included (`code`), has every status the
        // tools document, `paused` included.
        let tasks = &family("msbd_tasks").samples;
        let types = wrapper.engine().task_types();
        assert!(types.contains(&"code".to_owned()), "{types:?}");
        for task_type in &types {
            for status in [
                "pending",
                "scheduled",
                "paused",
                "running",
                "completed",
                "failed",
                "timeout",
                "cancelled",
            ] {
                let found: Vec<f64> = tasks
                    .iter()
                    .filter(|(_, l, _)| l["type"] == *task_type && l["status"] == status)
                    .map(|(_, _, v)| *v)
                    .collect();
                let expected =
                    if task_type == "command" && (status == "completed" || status == "timeout") {
                        1.0
                    } else {
                        0.0
                    };
                assert_eq!(found, [expected], "{task_type} {status}\n{text}");
            }
        }

        metrics.stop().await;
        wrapper
            .graceful_shutdown(std::time::Duration::from_secs(5))
            .await;
    }
}
