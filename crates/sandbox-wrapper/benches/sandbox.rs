//! Benchmarks of sandboxed tasks end to end, run by `cargo xtask bench` (or
//! `cargo bench -p sandbox-wrapper --bench sandbox [-- FILTER]`).
//!
//! A plain program (`harness = false`), like task-core's `engine` bench: it builds its own Tokio
//! runtime (multi-thread, 2 workers), measures, prints one line per figure and a summary table,
//! and writes the figures as one JSON object (name → number) to
//! `$MSBD_BENCH_PARTS_DIR/sandbox.json` (or, without that variable, to
//! `target/bench/parts/sandbox.json` in the workspace).
//!
//! The figures: the wall-clock time from just before `Wrapper::submit` to `Engine::wait` returning
//! the completed task, one task at a time, on a [`Wrapper`] started with `Wrapper::start` on a
//! SQLite store in a temporary directory, always in the same session (`session_id`), so that the
//! session is created, and the interpreter started, by the first of 20 warm-up runs, outside the
//! 200 measured ones:
//! - `sandbox_command_e2e_ms`: a `command` task `{"argv": ["true"]}`, strongest isolation;
//! - `sandbox_command_bare_e2e_ms`: the same with `IsolationMode::Off`;
//! - `sandbox_code_python_e2e_ms`: a `code` task `{"language": "python", "code": "1+1"}`,
//!   strongest isolation;
//! - `sandbox_command_vs_bwrap_ratio`: `sandbox_command_e2e_ms` over `diag_sandbox_bwrap_true_ms`
//!   (bubblewrap alone around `true` with the same namespaces, spawned directly), both medians of
//!   the same run: what msbd adds to bubblewrap's own cost, whatever the host (target <= 1.3).
//!
//! Each is the median; the part also holds its 90th percentile (`…_p90_ms`) and the isolation
//! level it ran under (`…_isolation_level`: 0 off, 1 minimal, 2 standard, 3 strong; a part holds
//! only numbers, so the layers in words are printed, not stored).
//!
//! Diagnostics, each layer alone, to see which costs what (medians, in ms):
//! - `diag_sandbox_engine_noop_e2e_ms`: the engine alone on SQLite, a no-op handler, submit → wait;
//! - `diag_sandbox_local_exec_true_ms`, `diag_sandbox_local_exec_bare_true_ms`:
//!   `LocalBackend::exec` of `true` in a live session (no engine, no handler), strongest isolation
//!   and isolation off, with a pause switch whose sender stays alive (as the handlers pass the
//!   engine's);
//! - `diag_sandbox_local_exec_closed_pause_true_ms`: the same (strongest) with
//!   `ExecControl::new`, whose pause sender is dropped at once: the backend's wait loop replaces
//!   a closed pause receiver by another closed one and spins for as long as the process runs
//!   (see its `_cpu_ms`);
//! - `diag_sandbox_handler_command_true_ms`, `diag_sandbox_handler_command_bare_true_ms`: the
//!   `command` handler's own time (`CommandHandler::run`: session lease, output file, the backend's
//!   exec, the result) for `{"argv": ["true"]}`, in an engine on SQLite over the same backend;
//! - `diag_sandbox_spawn_true_ms`: `std::process::Command::new("true")`, spawn and wait;
//! - `diag_sandbox_tokio_spawn_true_ms`: the same through `tokio::process` with piped stdout and
//!   stderr read to their end, as the backend does;
//! - `diag_sandbox_tokio_fork_true_ms`: the same forced through `fork` (by setting the uid to our
//!   own) instead of `posix_spawn`, as the backend's `pre_exec` forces it;
//! - `diag_sandbox_bwrap_true_ms`: `bwrap` with exactly the backend's arguments (read back from
//!   `/proc/1/cmdline` inside a sandbox: every namespace, the system read-only, private `/dev`,
//!   `/proc`, `/tmp`, the data directory hidden, the work directory bound, the seccomp program)
//!   around `true`, as the session's user (the work directory's owner), without cgroups. Where
//!   runs go through the session's spawner, pid 1 is the spawner's bubblewrap, whose arguments
//!   up to `--` are those a run of its own would get;
//! - `diag_sandbox_bwrap_share_net_true_ms`: the same with `--share-net` (no network namespace);
//! - `diag_sandbox_cgroup_run_ms`: what the backend does with a run's cgroups, without a process:
//!   create the run's group with its limits in each hierarchy the backend uses, open its
//!   `cgroup.procs`, kill (`cgroup.kill`), read the peak memory and OOM count, remove.
//!
//! Also the CPU time this whole process (every thread: Tokio's workers, SQLite's, the blocking
//! pool) used per run: `diag_sandbox_command_e2e_cpu_ms` and so on for the figures, and
//! `diag_…_cpu_ms` for the backend and handler diagnostics. A run that spins shows here.
//!
//! Everything is set up first (the wrappers, backends and engines; sessions are made by their first
//! run), then each measurement runs its 220 times in a row, one after the other. (Taking turns instead, one run of
//! each per round, slowed the cheap ones by up to 2× in trials, presumably because the kernel was
//! still tearing down the previous bubblewrap run's namespaces; back to back, a measurement pays
//! only for its own.)
//!
//! An optional argument keeps only the figures whose name contains it; arguments that start with
//! `--` (cargo passes `--bench`) are ignored.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sandbox_wrapper::backend::local::{IsolationLevel, IsolationMode, LocalBackend, LocalConfig};
use sandbox_wrapper::backend::{
    ExecControl, ExecRequest, Flavor, SandboxBackend, SandboxInfo, SandboxSpec,
};
use sandbox_wrapper::handlers::{CommandHandler, HandlerShared};
use sandbox_wrapper::output::{DEFAULT_OUTPUT_CAP, OutputSink};
use sandbox_wrapper::session::{SessionConfig, SessionManager};
use sandbox_wrapper::{Wrapper, WrapperConfig};
use serde_json::{Value, json};
use task_core::store::Store;
use task_core::store::sqlite::{SqliteConfig, SqliteStore};
use task_core::{
    Engine, EngineLoops, NewTask, Status, Task, TaskContext, TaskFailure, TaskHandler, handler_fn,
};
use tokio::io::AsyncReadExt;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

type BenchError = Box<dyn std::error::Error + Send + Sync>;
type BenchResult<T> = Result<T, BenchError>;

/// Runs of each measurement thrown away first (the first creates the session, or starts the
/// interpreter).
const WARMUP: usize = 20;
/// Runs of each measurement kept.
const SAMPLES: usize = 200;
/// The longest a single task may take before the bench gives up.
const TASK_TIMEOUT: Duration = Duration::from_secs(60);
/// The `PATH` the backend gives sandboxed processes.
const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

const COMMAND: &str = "sandbox_command_e2e_ms";
const COMMAND_BARE: &str = "sandbox_command_bare_e2e_ms";
const CODE_PYTHON: &str = "sandbox_code_python_e2e_ms";
/// The figures and their targets (at most, in ms).
const FIGURES: [(&str, f64); 3] = [(COMMAND, 10.0), (COMMAND_BARE, 2.0), (CODE_PYTHON, 5.0)];

/// `sandbox_command_e2e_ms` over `diag_sandbox_bwrap_true_ms`, both medians of the same run.
const VS_BWRAP: &str = "sandbox_command_vs_bwrap_ratio";
/// Its target (at most).
const VS_BWRAP_TARGET: f64 = 1.3;

const DIAG_ENGINE: &str = "diag_sandbox_engine_noop_e2e_ms";
const DIAG_LOCAL: &str = "diag_sandbox_local_exec_true_ms";
const DIAG_LOCAL_CLOSED_PAUSE: &str = "diag_sandbox_local_exec_closed_pause_true_ms";
const DIAG_LOCAL_BARE: &str = "diag_sandbox_local_exec_bare_true_ms";
const DIAG_HANDLER: &str = "diag_sandbox_handler_command_true_ms";
const DIAG_HANDLER_BARE: &str = "diag_sandbox_handler_command_bare_true_ms";
const DIAG_SPAWN: &str = "diag_sandbox_spawn_true_ms";
const DIAG_TOKIO_SPAWN: &str = "diag_sandbox_tokio_spawn_true_ms";
const DIAG_TOKIO_FORK: &str = "diag_sandbox_tokio_fork_true_ms";
const DIAG_BWRAP: &str = "diag_sandbox_bwrap_true_ms";
const DIAG_BWRAP_SHARE_NET: &str = "diag_sandbox_bwrap_share_net_true_ms";
const DIAG_CGROUP: &str = "diag_sandbox_cgroup_run_ms";
/// The diagnostics, in the order they run and are reported.
const DIAGS: [&str; 12] = [
    DIAG_ENGINE,
    DIAG_SPAWN,
    DIAG_TOKIO_SPAWN,
    DIAG_TOKIO_FORK,
    DIAG_HANDLER_BARE,
    DIAG_LOCAL_BARE,
    DIAG_HANDLER,
    DIAG_LOCAL,
    DIAG_LOCAL_CLOSED_PAUSE,
    DIAG_BWRAP,
    DIAG_BWRAP_SHARE_NET,
    DIAG_CGROUP,
];

fn main() -> BenchResult<()> {
    let filter = std::env::args().skip(1).find(|arg| !arg.starts_with("--"));
    let matches = |names: &[String]| {
        filter
            .as_deref()
            .is_none_or(|f| names.iter().any(|name| name.contains(f)))
    };
    let mut wanted: Vec<&'static str> = FIGURES
        .iter()
        .map(|(name, _)| *name)
        .filter(|name| matches(&latency_names(name)))
        .collect();
    wanted.extend(
        DIAGS
            .into_iter()
            .filter(|name| matches(&[(*name).to_owned()])),
    );
    // The ratio needs both of its measurements.
    if matches(&[VS_BWRAP.to_owned()]) {
        for name in [COMMAND, DIAG_BWRAP] {
            if !wanted.contains(&name) {
                wanted.push(name);
            }
        }
    }
    if wanted.is_empty() {
        eprintln!(
            "no bench matches the filter {filter:?}; the names are {}, {}",
            FIGURES.map(|(name, _)| name).join(", "),
            DIAGS.join(", ")
        );
    }

    let runtime = runtime()?;
    let results = if wanted.is_empty() {
        Vec::new()
    } else {
        on_workers(&runtime, run(wanted))?
    };
    drop(runtime);

    let median_of = |name: &str| {
        results
            .iter()
            .find(|result| result.name == name)
            .map(|result| percentile_ms(&result.samples, 50.0))
    };
    let vs_bwrap = median_of(COMMAND).zip(median_of(DIAG_BWRAP));
    let mut part = Part::default();
    for result in results {
        match FIGURES.iter().find(|(name, _)| *name == result.name) {
            Some((_, target)) => part.latency(result, *target),
            None => part.diag(result),
        }
    }
    if let Some((command, bwrap)) = vs_bwrap {
        part.ratio(VS_BWRAP, command / bwrap, VS_BWRAP_TARGET, command, bwrap);
    }
    let path = part.write()?;
    println!();
    print!("{}", part.table());
    println!("(written to {})", path.display());
    Ok(())
}

/// Runs a future as a task of the runtime, so that it runs on the 2 worker threads (as the
/// daemon's work would) rather than on this thread, a third one.
fn on_workers<T: Send + 'static>(
    runtime: &Runtime,
    future: impl Future<Output = BenchResult<T>> + Send + 'static,
) -> BenchResult<T> {
    runtime.block_on(runtime.spawn(future))?
}

fn runtime() -> BenchResult<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------------
// Probes: one timed run of one thing each.

type ProbeFuture = Pin<Box<dyn Future<Output = BenchResult<Sample>> + Send>>;
/// Checks the first run's task (what it printed, say).
type Check = Box<dyn Fn(&Task) -> BenchResult<()> + Send>;

/// One timed run.
struct Sample {
    elapsed: Duration,
    /// The task, for the figures that run one.
    task: Option<Task>,
    /// For a handler's time: the whole task's, submit → wait.
    e2e: Option<Duration>,
}

impl Sample {
    fn timed(elapsed: Duration) -> Sample {
        Sample {
            elapsed,
            task: None,
            e2e: None,
        }
    }
}

/// Something measured: a figure or a diagnostic.
struct Probe {
    name: &'static str,
    /// The isolation it runs under, in words.
    isolation: Option<String>,
    /// Checks the first run's task (what it printed, say).
    check: Option<Check>,
    once: Box<dyn FnMut(usize) -> ProbeFuture + Send>,
}

/// What a probe measured.
struct Measured {
    name: &'static str,
    isolation: Option<String>,
    samples: Vec<Duration>,
    /// The CPU time this process used per kept run.
    cpu: Duration,
}

/// Everything the probes use, kept to be torn down at the end.
#[derive(Default)]
struct Setup {
    dirs: Vec<tempfile::TempDir>,
    wrappers: Vec<(Wrapper, String)>,
    engines: Vec<(Engine, EngineLoops)>,
    backends: Vec<(Arc<LocalBackend>, SandboxInfo, String)>,
    sessions: Vec<SessionManager>,
    /// Pause senders kept alive for the probes whose pause switch stays open.
    pause_senders: Vec<watch::Sender<bool>>,
}

async fn run(wanted: Vec<&'static str>) -> BenchResult<Vec<Measured>> {
    let mut setup = Setup::default();
    let result = match probes(&mut setup, &wanted).await {
        Ok(probes) => measure(probes).await,
        Err(error) => Err(error),
    };
    let torn_down = setup.tear_down().await;
    let measured = result?;
    torn_down?;
    Ok(measured)
}

/// Sets up what the wanted probes need and makes them, in the order of `wanted`.
async fn probes(setup: &mut Setup, wanted: &[&'static str]) -> BenchResult<Vec<Probe>> {
    let wants = |names: &[&str]| names.iter().any(|name| wanted.contains(name));
    let mut probes = Vec::new();

    if wants(&[COMMAND, CODE_PYTHON]) {
        let wrapper = setup.wrapper(IsolationMode::Strongest).await?;
        if wants(&[COMMAND]) {
            probes.push(task_probe(
                COMMAND,
                &wrapper,
                "command",
                json!({"argv": ["true"], "session_id": "bench-command"}),
                None,
            ));
        }
        if wants(&[CODE_PYTHON]) {
            let check = |task: &Task| -> BenchResult<()> {
                let tail = task
                    .result
                    .as_ref()
                    .and_then(|r| r["output_tail"].as_str())
                    .unwrap_or_default();
                if tail.trim() == "2" {
                    Ok(())
                } else {
                    Err(format!("python printed {tail:?} for 1+1, not 2").into())
                }
            };
            probes.push(task_probe(
                CODE_PYTHON,
                &wrapper,
                "code",
                json!({"language": "python", "code": "1+1", "session_id": "bench-python"}),
                Some(Box::new(check)),
            ));
        }
    }
    if wants(&[COMMAND_BARE]) {
        let wrapper = setup.wrapper(IsolationMode::Off).await?;
        probes.push(task_probe(
            COMMAND_BARE,
            &wrapper,
            "command",
            json!({"argv": ["true"], "session_id": "bench-bare"}),
            None,
        ));
    }
    if wants(&[DIAG_ENGINE]) {
        probes.push(setup.engine_probe().await?);
    }
    if wants(&[DIAG_SPAWN]) {
        probes.push(blocking_probe(DIAG_SPAWN, None, std_spawn_true));
    }
    if wants(&[DIAG_TOKIO_SPAWN]) {
        probes.push(Probe {
            name: DIAG_TOKIO_SPAWN,
            isolation: None,
            check: None,
            once: Box::new(|_| Box::pin(tokio_spawn_true(false))),
        });
    }
    if wants(&[DIAG_TOKIO_FORK]) {
        probes.push(Probe {
            name: DIAG_TOKIO_FORK,
            isolation: None,
            check: None,
            once: Box::new(|_| Box::pin(tokio_spawn_true(true))),
        });
    }
    if wants(&[DIAG_HANDLER_BARE, DIAG_LOCAL_BARE]) {
        let (backend, sandbox, _) = setup.backend(IsolationMode::Off).await?;
        let dir = setup.dir()?;
        if wants(&[DIAG_HANDLER_BARE]) {
            probes.push(setup.handler_probe(DIAG_HANDLER_BARE, &backend).await?);
        }
        if wants(&[DIAG_LOCAL_BARE]) {
            let pause = setup.pause_sender();
            probes.push(local_exec_probe(
                DIAG_LOCAL_BARE,
                &backend,
                &sandbox,
                &dir,
                Some(pause),
            ));
        }
    }
    let strong = [
        DIAG_HANDLER,
        DIAG_LOCAL,
        DIAG_LOCAL_CLOSED_PAUSE,
        DIAG_BWRAP,
        DIAG_BWRAP_SHARE_NET,
        DIAG_CGROUP,
    ];
    if wants(&strong) {
        let (backend, sandbox, marker) = setup.backend(IsolationMode::Strongest).await?;
        let dir = setup.dir()?;
        if wants(&[DIAG_HANDLER]) {
            probes.push(setup.handler_probe(DIAG_HANDLER, &backend).await?);
        }
        if wants(&[DIAG_LOCAL]) {
            let pause = setup.pause_sender();
            probes.push(local_exec_probe(
                DIAG_LOCAL,
                &backend,
                &sandbox,
                &dir,
                Some(pause),
            ));
        }
        if wants(&[DIAG_LOCAL_CLOSED_PAUSE]) {
            probes.push(local_exec_probe(
                DIAG_LOCAL_CLOSED_PAUSE,
                &backend,
                &sandbox,
                &dir,
                None,
            ));
        }
        // These copy what the backend does, from outside it: when that fails (the backend
        // changed), they are skipped, not the bench.
        let isolation = Some(backend.isolation());
        for (name, share_net) in [(DIAG_BWRAP, false), (DIAG_BWRAP_SHARE_NET, true)] {
            if wants(&[name]) {
                match BwrapRun::new(&backend, &sandbox, &dir, share_net).await {
                    Ok(bwrap) => {
                        probes.push(blocking_probe(name, isolation.clone(), move || bwrap.run()))
                    }
                    Err(error) => eprintln!("  {name} skipped: {error}"),
                }
            }
        }
        if wants(&[DIAG_CGROUP]) {
            match CgroupRun::new(&marker, &sandbox.session_id) {
                Ok(mut cgroups) => {
                    probes.push(blocking_probe(DIAG_CGROUP, None, move || cgroups.run()))
                }
                Err(error) => eprintln!("  {DIAG_CGROUP} skipped: {error}"),
            }
        }
    }
    // In the order of `wanted` (figures first, then the diagnostics as listed).
    probes.sort_by_key(|probe| wanted.iter().position(|name| *name == probe.name));
    Ok(probes)
}

/// Runs each probe `WARMUP + SAMPLES` times in a row, keeping the last `SAMPLES`, one probe
/// after the other.
async fn measure(probes: Vec<Probe>) -> BenchResult<Vec<Measured>> {
    let mut measured = Vec::with_capacity(probes.len());
    for mut probe in probes {
        let mut samples = Vec::with_capacity(SAMPLES);
        let mut cpu_before = Duration::ZERO;
        for run in 0..WARMUP + SAMPLES {
            if run == WARMUP {
                cpu_before = cpu_time()?;
            }
            let sample = (probe.once)(run).await?;
            if run == 0 {
                first_run(&probe, &sample)?;
            }
            if run >= WARMUP {
                samples.push(sample);
            }
        }
        let cpu = cpu_time()?.saturating_sub(cpu_before) / SAMPLES as u32;
        task_breakdown(probe.name, &samples);
        let mut e2e: Vec<Duration> = samples.iter().filter_map(|s| s.e2e).collect();
        if !e2e.is_empty() {
            e2e.sort_unstable();
            println!(
                "  {}: that engine's submit → wait median {:.3} ms",
                probe.name,
                ms(e2e[(e2e.len() - 1) / 2])
            );
        }
        measured.push(Measured {
            name: probe.name,
            isolation: probe.isolation,
            samples: samples.into_iter().map(|s| s.elapsed).collect(),
            cpu,
        });
    }
    Ok(measured)
}

/// Checks and prints the first run of a probe that runs tasks (it creates the session).
fn first_run(probe: &Probe, sample: &Sample) -> BenchResult<()> {
    let Some(task) = &sample.task else {
        return Ok(());
    };
    if let Some(check) = &probe.check {
        check(task)?;
    }
    println!(
        "  {}: first run (creates the session{}) {:.1} ms; the task ran under {}",
        probe.name,
        if task.task_type == "code" {
            ", starts the interpreter"
        } else {
            ""
        },
        ms(sample.elapsed),
        task.result
            .as_ref()
            .and_then(|r| r["isolation"].as_str())
            .unwrap_or("?"),
    );
    Ok(())
}

/// Prints where a task's time went as its own millisecond timestamps and result say.
fn task_breakdown(name: &str, samples: &[Sample]) {
    let tasks: Vec<&Task> = samples.iter().filter_map(|s| s.task.as_ref()).collect();
    if tasks.is_empty() {
        return;
    }
    let mut queued = Vec::new();
    let mut running = Vec::new();
    let mut backend = Vec::new();
    for task in tasks {
        let started = task.started_at.unwrap_or(task.created_at);
        let finished = task.finished_at.unwrap_or(task.updated_at);
        queued.push((started.0 - task.created_at.0) as f64);
        running.push((finished.0 - started.0) as f64);
        if let Some(d) = task.result.as_ref().and_then(|r| r["duration_ms"].as_f64()) {
            backend.push(d);
        }
    }
    println!(
        "  {name}: by the tasks' own ms timestamps, median created → started {} ms, started → finished {} ms; the backend's duration_ms median {} ms",
        median_text(&mut queued),
        median_text(&mut running),
        median_text(&mut backend),
    );
}

/// A probe that submits a task to a wrapper and waits for it.
fn task_probe(
    name: &'static str,
    wrapper: &Wrapper,
    task_type: &'static str,
    params: Value,
    check: Option<Check>,
) -> Probe {
    let isolation = Some(wrapper.isolation().to_owned());
    let wrapper = wrapper.clone();
    Probe {
        name,
        isolation,
        check,
        once: Box::new(move |_| {
            let wrapper = wrapper.clone();
            let params = params.clone();
            Box::pin(async move {
                let before = Instant::now();
                let id = wrapper
                    .submit(wrapper.new_task(task_type, params))
                    .await?
                    .task
                    .id;
                let task = wrapper.engine().wait(id, TASK_TIMEOUT).await?;
                let elapsed = before.elapsed();
                if task.status != Status::Completed {
                    return Err(format!(
                        "{task_type} task {id} ended {} instead of completed: {:?}",
                        task.status, task.error
                    )
                    .into());
                }
                Ok(Sample {
                    elapsed,
                    task: Some(task),
                    e2e: None,
                })
            })
        }),
    }
}

/// A probe that runs a blocking function (on the worker that runs the measurements).
fn blocking_probe(
    name: &'static str,
    isolation: Option<String>,
    mut run: impl FnMut() -> BenchResult<Duration> + Send + 'static,
) -> Probe {
    Probe {
        name,
        isolation,
        check: None,
        once: Box::new(move |_| {
            let result = run().map(Sample::timed);
            Box::pin(async move { result })
        }),
    }
}

/// `LocalBackend::exec` of `true`; with `pause`, the control's pause receiver has a live sender.
fn local_exec_probe(
    name: &'static str,
    backend: &Arc<LocalBackend>,
    sandbox: &SandboxInfo,
    outputs: &Path,
    pause: Option<watch::Receiver<bool>>,
) -> Probe {
    let isolation = Some(backend.isolation());
    let (backend, sandbox, outputs) = (backend.clone(), sandbox.clone(), outputs.to_path_buf());
    Probe {
        name,
        isolation,
        check: None,
        once: Box::new(move |run| {
            let (backend, sandbox) = (backend.clone(), sandbox.clone());
            let sink_path = outputs.join(format!("{name}-{run}.log"));
            let control = match &pause {
                Some(paused) => ExecControl {
                    cancel: CancellationToken::new(),
                    paused: paused.clone(),
                },
                None => ExecControl::new(CancellationToken::new()),
            };
            Box::pin(async move {
                let sink = OutputSink::create(sink_path, DEFAULT_OUTPUT_CAP)?;
                let request = ExecRequest {
                    argv: vec!["true".into()],
                    ..ExecRequest::default()
                };
                let before = Instant::now();
                let outcome = backend.exec(&sandbox, request, &sink, control).await?;
                let elapsed = before.elapsed();
                if !outcome.success() {
                    let output = std::fs::read_to_string(sink.path()).unwrap_or_default();
                    return Err(format!(
                        "`true` in the sandbox ended {outcome:?}; its output: {output:?}"
                    )
                    .into());
                }
                Ok(Sample::timed(elapsed))
            })
        }),
    }
}

impl Setup {
    fn dir(&mut self) -> BenchResult<PathBuf> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().to_path_buf();
        self.dirs.push(dir);
        Ok(path)
    }

    /// A wrapper on a fresh data directory with a SQLite store in it.
    async fn wrapper(&mut self, isolation: IsolationMode) -> BenchResult<Wrapper> {
        let dir = self.dir()?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(
            dir.join("tasks.sqlite3"),
        ))?);
        let mut config = WrapperConfig::new(dir.join("data"));
        config.isolation = isolation;
        // The strongest isolation stacks Landlock under bubblewrap through the shim.
        config.landlock_shim = Some(env!("CARGO_BIN_EXE_msbd-sandbox-shim").into());
        let wrapper = Wrapper::start(store, config).await?;
        println!("  wrapper isolation: {}", wrapper.isolation());
        let marker = wrapper.instance_marker().to_owned();
        self.wrappers.push((wrapper.clone(), marker));
        Ok(wrapper)
    }

    /// A local backend on a fresh data directory, with a session `diag`.
    async fn backend(
        &mut self,
        isolation: IsolationMode,
    ) -> BenchResult<(Arc<LocalBackend>, SandboxInfo, String)> {
        let dir = self.dir()?;
        let marker = format!(
            "bench{}{}",
            std::process::id(),
            match isolation {
                IsolationMode::Off => "off",
                IsolationMode::Strongest => "strong",
            }
        );
        let mut config = LocalConfig::new(dir.join("data"), marker.clone());
        config.isolation = isolation;
        config.landlock_shim = Some(env!("CARGO_BIN_EXE_msbd-sandbox-shim").into());
        let backend = Arc::new(LocalBackend::new(config)?);
        println!("  local backend isolation: {}", backend.isolation());
        let spec = SandboxSpec {
            session_id: "diag".into(),
            flavor: Flavor::Small,
            template: "python".into(),
            volumes: Vec::new(),
            network: Default::default(),
        };
        let sandbox = backend.create(&spec).await?;
        self.backends
            .push((backend.clone(), sandbox.clone(), marker.clone()));
        Ok((backend, sandbox, marker))
    }

    fn pause_sender(&mut self) -> watch::Receiver<bool> {
        let (sender, receiver) = watch::channel(false);
        self.pause_senders.push(sender);
        receiver
    }

    /// The engine alone: SQLite store, a no-op handler, one task at a time, submit → wait.
    async fn engine_probe(&mut self) -> BenchResult<Probe> {
        let dir = self.dir()?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(
            dir.join("noop.sqlite3"),
        ))?);
        let engine = Engine::builder(store)
            .handler(
                "noop",
                handler_fn(|_ctx| async { Ok::<_, TaskFailure>(Value::Null) }),
            )
            .build()
            .await?;
        let loops = engine.start();
        self.engines.push((engine.clone(), loops));
        Ok(Probe {
            name: DIAG_ENGINE,
            isolation: None,
            check: None,
            once: Box::new(move |_| {
                let engine = engine.clone();
                Box::pin(async move {
                    let before = Instant::now();
                    let id = engine
                        .submit(NewTask::new("noop", Value::Null))
                        .await?
                        .task
                        .id;
                    let task = engine.wait(id, TASK_TIMEOUT).await?;
                    let elapsed = before.elapsed();
                    if task.status != Status::Completed {
                        return Err(format!("noop task ended {}", task.status).into());
                    }
                    Ok(Sample::timed(elapsed))
                })
            }),
        })
    }

    /// The `command` handler alone, timed inside an engine on SQLite, over `backend`: each run
    /// submits `{"argv": ["true"]}` in one session and takes the handler's time.
    async fn handler_probe(
        &mut self,
        name: &'static str,
        backend: &Arc<LocalBackend>,
    ) -> BenchResult<Probe> {
        let dir = self.dir()?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig::new(
            dir.join("handler.sqlite3"),
        ))?);
        let sessions = SessionManager::new(backend.clone(), SessionConfig::default());
        self.sessions.push(sessions.clone());
        let shared = Arc::new(HandlerShared {
            sessions,
            outputs_dir: dir.join("outputs"),
            output_cap: DEFAULT_OUTPUT_CAP,
            network: Default::default(),
        });
        let times = Arc::new(Mutex::new(Vec::new()));
        let handler = Timed {
            inner: CommandHandler::new(shared),
            times: times.clone(),
        };
        let engine = Engine::builder(store)
            .handler("command", handler)
            .build()
            .await?;
        let loops = engine.start();
        self.engines.push((engine.clone(), loops));
        let params = json!({"argv": ["true"], "session_id": "bench-handler"});
        Ok(Probe {
            name,
            isolation: Some(backend.isolation()),
            check: None,
            once: Box::new(move |_| {
                let (engine, times, params) = (engine.clone(), times.clone(), params.clone());
                Box::pin(async move {
                    let before = Instant::now();
                    let id = engine
                        .submit(NewTask::new("command", params))
                        .await?
                        .task
                        .id;
                    let task = engine.wait(id, TASK_TIMEOUT).await?;
                    let e2e = before.elapsed();
                    if task.status != Status::Completed {
                        return Err(format!(
                            "command task ended {}: {:?}",
                            task.status, task.error
                        )
                        .into());
                    }
                    let handler = times
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .pop()
                        .ok_or("the handler's time was not recorded")?;
                    Ok(Sample {
                        elapsed: handler,
                        task: None,
                        e2e: Some(e2e),
                    })
                })
            }),
        })
    }

    /// Shuts the wrappers down gracefully, stops the engine and the backends' sessions, and
    /// removes the (empty) base cgroups the backends leave behind.
    async fn tear_down(self) -> BenchResult<()> {
        let mut errors = Vec::new();
        for (wrapper, marker) in self.wrappers {
            let report = wrapper.graceful_shutdown(Duration::from_secs(10)).await;
            println!(
                "  graceful_shutdown ({}): {} in {:.3} s, {} sandboxes stopped, errors {:?}",
                wrapper.isolation(),
                report.status,
                report.duration_seconds,
                report.sandboxes_stopped,
                report.errors
            );
            if report.status != sandbox_wrapper::supervisor::ShutdownStatus::Success {
                errors.push(format!("graceful_shutdown ended {}", report.status));
            }
            remove_base_cgroups(&marker);
        }
        for (engine, loops) in self.engines {
            engine.shutdown(Duration::from_secs(10)).await;
            loops.stop().await;
        }
        for sessions in self.sessions {
            sessions.stop_all().await;
        }
        for (backend, sandbox, marker) in self.backends {
            if let Err(error) = backend.stop(&sandbox).await {
                errors.push(format!("stopping the diagnostic session: {error}"));
            }
            remove_base_cgroups(&marker);
        }
        drop(self.dirs);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; ").into())
        }
    }
}

/// A handler that records how long another one takes.
struct Timed<H> {
    inner: H,
    times: Arc<Mutex<Vec<Duration>>>,
}

impl<H: TaskHandler> TaskHandler for Timed<H> {
    async fn run(&self, context: TaskContext) -> Result<Value, TaskFailure> {
        let before = Instant::now();
        let result = self.inner.run(context).await;
        self.times
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(before.elapsed());
        result
    }

    fn validate(&self, params: &Value) -> Result<(), String> {
        self.inner.validate(params)
    }
}

/// The CPU time (user and system, every thread) this process has used.
fn cpu_time() -> BenchResult<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF)?;
    let micros = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    Ok(micros(usage.user_time()) + micros(usage.system_time()))
}

// ---------------------------------------------------------------------------------------------
// Diagnostics without the backend.

fn std_spawn_true() -> BenchResult<Duration> {
    let before = Instant::now();
    let status = std::process::Command::new("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    let elapsed = before.elapsed();
    if !status.success() {
        return Err(format!("`true` ended {status}").into());
    }
    Ok(elapsed)
}

/// `true` through `tokio::process`; with `fork`, made to take `fork` rather than `posix_spawn`
/// (the standard library cannot `posix_spawn` with a uid to set).
async fn tokio_spawn_true(fork: bool) -> BenchResult<Sample> {
    let before = Instant::now();
    let mut command = tokio::process::Command::new("true");
    command
        .env_clear()
        .env("PATH", SANDBOX_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if fork {
        command.uid(nix::unistd::geteuid().as_raw());
    }
    let mut child = command.spawn()?;
    let mut sink = Vec::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout.read_to_end(&mut sink).await?;
    }
    if let Some(mut stderr) = child.stderr.take() {
        stderr.read_to_end(&mut sink).await?;
    }
    let status = child.wait().await?;
    let elapsed = before.elapsed();
    if !status.success() {
        return Err(format!("`true` ended {status}").into());
    }
    Ok(Sample::timed(elapsed))
}

/// `bwrap` with exactly the backend's arguments around `true`, started as the session's user,
/// without cgroups.
struct BwrapRun {
    bwrap: PathBuf,
    /// bubblewrap's options, up to (without) `--seccomp FD` and `--`.
    options: Vec<String>,
    /// The seccomp program's file, when the backend passes one.
    seccomp: Option<PathBuf>,
    /// The work directory's owner, when root.
    user: Option<(u32, u32)>,
}

impl BwrapRun {
    /// Reads the backend's bubblewrap command line back from inside a sandbox (`/proc/1/cmdline`
    /// in its pid namespace is bubblewrap's own), then swaps the program for `true`.
    async fn new(
        backend: &LocalBackend,
        sandbox: &SandboxInfo,
        outputs: &Path,
        share_net: bool,
    ) -> BenchResult<Self> {
        let sink = OutputSink::create(outputs.join("cmdline.log"), DEFAULT_OUTPUT_CAP)?;
        let (_pause, paused) = watch::channel(false);
        let control = ExecControl {
            cancel: CancellationToken::new(),
            paused,
        };
        let request = ExecRequest {
            argv: vec!["cat".into(), "/proc/1/cmdline".into()],
            ..ExecRequest::default()
        };
        let outcome = backend.exec(sandbox, request, &sink, control).await?;
        let cmdline = std::fs::read(sink.path())?;
        if !outcome.success() {
            return Err(format!("reading bubblewrap's command line ended {outcome:?}").into());
        }
        let argv: Vec<String> = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some((program, args)) = argv.split_first() else {
            return Err("the sandbox's pid 1 has an empty command line".into());
        };
        if !program.ends_with("bwrap") {
            return Err(format!("the sandbox's pid 1 is {program:?}, not bubblewrap").into());
        }
        let end = args
            .iter()
            .position(|a| a == "--")
            .ok_or("no `--` in bubblewrap's command line")?;
        // <data dir>/sandboxes/<session>/work
        let work_dir = backend.work_dir(sandbox)?;
        let data_dir = work_dir
            .ancestors()
            .nth(3)
            .ok_or("the work directory is not under a data directory")?;
        let mut options = Vec::new();
        let mut seccomp = None;
        let mut rest = args[..end].iter();
        while let Some(arg) = rest.next() {
            if arg == "--seccomp" {
                rest.next();
                seccomp = Some(data_dir.join("seccomp.bpf"));
            } else {
                options.push(arg.clone());
            }
        }
        if share_net {
            options.push("--share-net".into());
        }
        let user = if nix::unistd::geteuid().is_root() {
            let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&work_dir)?);
            Some((owner, owner))
        } else {
            None
        };
        if !share_net {
            println!("  the backend runs: {}", argv.join(" "));
        }
        Ok(BwrapRun {
            bwrap: PathBuf::from(program),
            options,
            seccomp,
            user,
        })
    }

    fn run(&self) -> BenchResult<Duration> {
        let before = Instant::now();
        let mut command = std::process::Command::new(&self.bwrap);
        command.args(&self.options);
        // Opened afresh for each run, as the backend does (a shared descriptor would be read to
        // its end by the first run).
        let seccomp = match &self.seccomp {
            Some(path) => {
                let (fd, file) = open_inheritable(path)?;
                command.args(["--seccomp", &fd.to_string()]);
                Some(file)
            }
            None => None,
        };
        command
            .args(["--", "true"])
            .env_clear()
            .env("PATH", SANDBOX_PATH)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = self.user {
            std::os::unix::process::CommandExt::uid(&mut command, uid);
            std::os::unix::process::CommandExt::gid(&mut command, gid);
        }
        let output = command.output()?;
        drop(seccomp);
        let elapsed = before.elapsed();
        if !output.status.success() {
            return Err(format!(
                "bwrap … true ended {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        Ok(elapsed)
    }
}

/// Opens a file on a descriptor that children inherit (for bubblewrap's `--seccomp FD`).
fn open_inheritable(path: &Path) -> BenchResult<(i32, std::fs::File)> {
    let file = std::fs::File::open(path)?;
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )?;
    Ok((std::os::fd::AsRawFd::as_raw_fd(&file), file))
}

/// The cgroup hierarchies the backend uses, found as it finds them, each with the backend's
/// base group `msbd-<marker>` in it: `(kind, directory)`.
fn cgroup_bases(marker: &str) -> Vec<(&'static str, PathBuf)> {
    let own: Vec<(String, String)> = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect();
    let relative = |controller: &str| {
        own.iter()
            .find(|(controllers, _)| {
                if controller.is_empty() {
                    controllers.is_empty()
                } else {
                    controllers.split(',').any(|c| c == controller)
                }
            })
            .map(|(_, path)| path.trim_start_matches('/').to_owned())
            .unwrap_or_default()
    };
    let root = Path::new("/sys/fs/cgroup");
    let base = |mount: PathBuf, controller: &str| {
        mount
            .join(relative(controller))
            .join(format!("msbd-{marker}"))
    };
    if root.join("cgroup.controllers").exists() {
        return vec![("unified", base(root.to_path_buf(), ""))];
    }
    let mut bases: Vec<(&'static str, PathBuf)> = ["memory", "pids", "cpu", "freezer"]
        .into_iter()
        .map(|kind| (kind, base(root.join(kind), kind)))
        .collect();
    bases.push(("unified", base(root.join("unified"), "")));
    bases.retain(|(_, dir)| dir.join("cgroup.procs").exists());
    bases
}

/// Removes the backend's base groups `msbd-<marker>`, which it leaves behind (empty).
fn remove_base_cgroups(marker: &str) {
    for (_, base) in cgroup_bases(marker) {
        let _ = std::fs::remove_dir(base);
    }
}

/// What the backend does with a run's cgroups (`Group::child`, `open_procs`, `kill`,
/// `peak_memory`, `oom_kills`, `remove`), without a process in them, beside a live session's
/// groups.
struct CgroupRun {
    sessions: Vec<(&'static str, PathBuf)>,
    limits_v2: bool,
    memory: String,
    pids: String,
    quota: String,
    next: u64,
}

impl CgroupRun {
    fn new(marker: &str, session: &str) -> BenchResult<Self> {
        let sessions: Vec<(&'static str, PathBuf)> = cgroup_bases(marker)
            .into_iter()
            .map(|(kind, base)| (kind, base.join(format!("s-{session}"))))
            .filter(|(_, dir)| dir.exists())
            .collect();
        if sessions.is_empty() {
            return Err("the backend made no session cgroups to measure beside".into());
        }
        let limits_v2 = sessions
            .iter()
            .any(|(kind, dir)| *kind == "unified" && dir.join("memory.max").exists());
        Ok(CgroupRun {
            sessions,
            limits_v2,
            memory: (Flavor::Small.memory_mb() << 20).to_string(),
            pids: (256 * u64::from(Flavor::Small.cpus())).to_string(),
            quota: (100_000 * u64::from(Flavor::Small.cpus())).to_string(),
            next: 0,
        })
    }

    fn run(&mut self) -> BenchResult<Duration> {
        self.next += 1;
        let before = Instant::now();
        let mut dirs = Vec::with_capacity(self.sessions.len());
        for (kind, parent) in &self.sessions {
            let dir = parent.join(format!("x-bench-{}", self.next));
            std::fs::create_dir_all(&dir)?;
            match *kind {
                "memory" => {
                    std::fs::write(dir.join("memory.limit_in_bytes"), &self.memory)?;
                    let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), &self.memory);
                }
                "pids" => std::fs::write(dir.join("pids.max"), &self.pids)?,
                "cpu" => {
                    std::fs::write(dir.join("cpu.cfs_period_us"), "100000")?;
                    std::fs::write(dir.join("cpu.cfs_quota_us"), &self.quota)?;
                }
                "unified" if self.limits_v2 => {
                    std::fs::write(dir.join("memory.max"), &self.memory)?;
                    let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                    std::fs::write(dir.join("pids.max"), &self.pids)?;
                    std::fs::write(dir.join("cpu.max"), format!("{} 100000", self.quota))?;
                }
                _ => {}
            }
            dirs.push((*kind, dir));
        }
        let procs = dirs
            .iter()
            .map(|(_, dir)| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(procs);
        // The end of a run: kill the tree, read the peak memory and the OOM count, remove.
        if let Some((_, dir)) = dirs.iter().find(|(kind, _)| *kind == "unified") {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        for (kind, dir) in &dirs {
            match *kind {
                "memory" => {
                    let _ = std::fs::read_to_string(dir.join("memory.max_usage_in_bytes"));
                    let _ = std::fs::read_to_string(dir.join("memory.oom_control"));
                }
                "unified" if self.limits_v2 => {
                    let _ = std::fs::read_to_string(dir.join("memory.peak"));
                    let _ = std::fs::read_to_string(dir.join("memory.events"));
                }
                _ => {}
            }
        }
        for (_, dir) in &dirs {
            let _ = std::fs::read_to_string(dir.join("cgroup.procs"))?;
            std::fs::remove_dir(dir)?;
        }
        Ok(before.elapsed())
    }
}

// ---------------------------------------------------------------------------------------------
// The part file and the table.

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// The nearest-rank percentile of samples, in ms, rounded to µs.
fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    (ms(sorted[rank.clamp(1, sorted.len()) - 1]) * 1e3).round() / 1e3
}

/// More percentiles, to see the shape: `p10 …, p25 …, p75 …, p99 …`.
fn spread(samples: &[Duration]) -> String {
    [10.0, 25.0, 75.0, 99.0]
        .map(|p| format!("p{p} {:.3}", percentile_ms(samples, p)))
        .join(", ")
}

fn median_text(values: &mut [f64]) -> String {
    if values.is_empty() {
        return "?".into();
    }
    values.sort_by(f64::total_cmp);
    format!("{}", values[(values.len() - 1) / 2])
}

/// The names an end-to-end figure writes: median, p90, isolation level.
fn latency_names(name: &str) -> [String; 3] {
    let stem = name.strip_suffix("_ms").unwrap_or(name);
    [
        name.to_owned(),
        format!("{stem}_p90_ms"),
        format!("{stem}_isolation_level"),
    ]
}

/// The level alone of an isolation in words (`strong` of `strong (cgroup-v1…)`).
fn level_word(isolation: &str) -> String {
    isolation
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The isolation level in `Wrapper::isolation` (`strong (…)`) as a number: 0 off, 1 minimal,
/// 2 standard, 3 strong.
fn level_number(isolation: &str) -> BenchResult<u8> {
    let word = isolation.split_whitespace().next().unwrap_or_default();
    let level: IsolationLevel = serde_json::from_value(Value::String(word.to_owned()))
        .map_err(|e| format!("isolation level {word:?}: {e}"))?;
    Ok(match level {
        IsolationLevel::Off => 0,
        IsolationLevel::Minimal => 1,
        IsolationLevel::Standard => 2,
        IsolationLevel::Strong => 3,
    })
}

#[derive(Default)]
struct Part {
    /// The part file's entries, in order.
    entries: Vec<(String, Value)>,
    /// The table: figure, median, p90, target, status, isolation.
    rows: Vec<[String; 6]>,
}

impl Part {
    fn latency(&mut self, measured: Measured, target_ms: f64) {
        let name = measured.name;
        let [_, p90_name, level_name] = latency_names(name);
        let median = percentile_ms(&measured.samples, 50.0);
        let p90 = percentile_ms(&measured.samples, 90.0);
        let status = if median <= target_ms { "met" } else { "MISSED" };
        let isolation = measured.isolation.unwrap_or_default();
        println!(
            "{name}: median {median:.3} ms, p90 {p90:.3} ms over {SAMPLES} runs ({})  [target <= {target_ms} ms: {status}]  isolation: {isolation}",
            spread(&measured.samples)
        );
        self.entries.push((name.to_owned(), json!(median)));
        self.entries.push((p90_name, json!(p90)));
        match level_number(&isolation) {
            Ok(level) => self.entries.push((level_name, json!(level))),
            Err(error) => eprintln!("  (isolation level not stored: {error})"),
        }
        self.cpu(name, measured.cpu);
        self.rows.push([
            name.to_owned(),
            format!("{median:.3} ms"),
            format!("{p90:.3} ms"),
            format!("<= {target_ms} ms"),
            status.to_owned(),
            level_word(&isolation),
        ]);
    }

    /// A ratio of two medians of this run, with its target (at most).
    fn ratio(&mut self, name: &str, ratio: f64, target: f64, over: f64, under: f64) {
        let status = if ratio <= target { "met" } else { "MISSED" };
        println!(
            "{name}: {ratio:.2} ({over:.3} ms over {under:.3} ms)  [target <= {target}: {status}]"
        );
        self.entries
            .push((name.to_owned(), json!((ratio * 100.0).round() / 100.0)));
        self.rows.push([
            name.to_owned(),
            format!("{ratio:.2}"),
            String::new(),
            format!("<= {target}"),
            status.to_owned(),
            String::new(),
        ]);
    }

    fn diag(&mut self, measured: Measured) {
        let name = measured.name;
        let median = percentile_ms(&measured.samples, 50.0);
        let p90 = percentile_ms(&measured.samples, 90.0);
        println!(
            "{name}: median {median:.3} ms, p90 {p90:.3} ms over {SAMPLES} runs ({})",
            spread(&measured.samples)
        );
        self.entries.push((name.to_owned(), json!(median)));
        if name.contains("_local_exec_") || name.contains("_handler_") {
            self.cpu(name, measured.cpu);
        }
        self.rows.push([
            name.to_owned(),
            format!("{median:.3} ms"),
            format!("{p90:.3} ms"),
            String::new(),
            String::new(),
            level_word(&measured.isolation.unwrap_or_default()),
        ]);
    }

    /// Stores (and prints) the CPU time per run as `diag_<stem>_cpu_ms`.
    fn cpu(&mut self, name: &str, cpu: Duration) {
        let stem = name.strip_suffix("_ms").unwrap_or(name);
        let stem = stem.strip_prefix("diag_").unwrap_or(stem);
        let cpu_name = format!("diag_{stem}_cpu_ms");
        let cpu_ms = (ms(cpu) * 1e3).round() / 1e3;
        println!("  {name}: this process used {cpu_ms:.3} ms of CPU per run");
        self.entries.push((cpu_name, json!(cpu_ms)));
    }

    fn write(&self) -> BenchResult<PathBuf> {
        let dir = match std::env::var_os("MSBD_BENCH_PARTS_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/parts"),
        };
        std::fs::create_dir_all(&dir)?;
        let object: serde_json::Map<String, Value> = self.entries.iter().cloned().collect();
        let path = dir.join("sandbox.json");
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&Value::Object(object))? + "\n",
        )?;
        Ok(path)
    }

    fn table(&self) -> String {
        let header = ["figure", "median", "p90", "target", "status", "isolation"].map(String::from);
        let mut widths = [0; 6];
        for row in std::iter::once(&header).chain(&self.rows) {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for (index, row) in std::iter::once(&header).chain(&self.rows).enumerate() {
            for (column, (cell, width)) in row.iter().zip(widths).enumerate() {
                let pad = " ".repeat(width - cell.chars().count());
                let sep = if column == 0 { "" } else { " | " };
                if column == 1 || column == 2 {
                    let _ = write!(out, "{sep}{pad}{cell}");
                } else {
                    let _ = write!(out, "{sep}{cell}{pad}");
                }
            }
            out = out.trim_end().to_owned();
            out.push('\n');
            if index == 0 {
                let total = widths.iter().sum::<usize>() + 3 * (widths.len() - 1);
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        out
    }
}
