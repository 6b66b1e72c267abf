//! `msbd-chaos`: crash chaos for msbd (run by `cargo xtask chaos`).
//!
//! It starts the release `msbd serve` (MCP over stdio; the stdio principal is the same for every
//! start, so the tasks of a killed msbd stay this client's after a restart) on a fresh data
//! directory, submits tasks through the MCP tools from several threads (no-op task types, short
//! commands, some failing, some flaky with retries, some delayed, some cancelled), SIGKILLs msbd
//! at random moments (some during its start), restarts it on the same data directory each time,
//! and at the end, after a graceful stop, checks:
//! - every accepted task reached exactly one final status (through the tools, and in the store
//!   file read directly), and each idempotency key made one task;
//! - no completion was recorded twice: no task seen final was ever seen unfinished again or
//!   with another final status or time, the store ends with what the tools first showed, its
//!   counts table matches its rows, and no `note` or `flaky` task ran after its end was
//!   recorded (their runs are logged on a volume);
//! - after each kill, the tasks the store had running were recovered within the lease (30 s)
//!   plus one second;
//! - no process, cgroup or sandbox directory of msbd is left.
//!
//! It prints one closing line, `chaos: N accepted, N terminal, 0 lost, 0 duplicated, K kills`,
//! and exits non-zero when any check failed. The seed makes the plan (tasks, kill points)
//! reproducible; the timing of a run is not.

mod audit;
mod daemon;
mod mcp;
mod rng;
mod tracker;
mod workload;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::json;

use crate::daemon::{Daemon, DaemonConfig, log_tail};
use crate::mcp::{CallError, Connection, ToolAnswer};
use crate::rng::Rng;
use crate::tracker::{Tracker, is_terminal};
use crate::workload::{Kind, Plan};

/// msbd's lease (task-core's default `EngineConfig::lease`; not configurable).
const LEASE: Duration = Duration::from_secs(30);
/// How long the tasks running at a kill may take to be recovered.
const RECOVERY_LIMIT: Duration = Duration::from_secs(31);
/// How long any one call may take before msbd counts as hung.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long msbd may take to answer `initialize` after a start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// msbd's graceful shutdown deadline (`MSB_SHUTDOWN_TIMEOUT`): short, so that a SIGTERM during
/// the run interrupts the tasks that outlast it (they are queued again for the next start).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

const USAGE: &str = "\
Usage: msbd-chaos --msbd PATH [--tasks N] [--kills K] [--seed S] [--dir DIR] [--keep]
                  [--concurrency C] [--submitters T] [--backlog B] [--max-minutes M]
                  [--log-level LEVEL]

  --msbd PATH       the msbd binary to test (a release build)
  --tasks N         tasks to submit (default 20000)
  --kills K         SIGKILLs of msbd (default 10)
  --seed S          the seed of the plan (default: from the clock; printed)
  --dir DIR         the run's directory (default: a new one under the temp directory);
                    removed after a run that passed unless --keep
  --concurrency C   MSB_MAX_CONCURRENT_TASKS (default 12)
  --submitters T    client threads submitting (default 4)
  --backlog B       the most accepted tasks not finished yet (default 400)
  --max-minutes M   give up after this long (default 60)
  --log-level L     MSB_LOG_LEVEL of msbd (default warn); logs go to DIR/logs/
";

/// The command line.
#[derive(Clone, Debug)]
struct Args {
    msbd: PathBuf,
    tasks: usize,
    kills: usize,
    seed: u64,
    dir: Option<PathBuf>,
    keep: bool,
    concurrency: usize,
    submitters: usize,
    backlog: usize,
    max_minutes: u64,
    log_level: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        msbd: PathBuf::new(),
        tasks: 20_000,
        kills: 10,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 & 0xffff_ffff),
        dir: None,
        keep: false,
        concurrency: 12,
        submitters: 4,
        backlog: 400,
        max_minutes: 60,
        log_level: "warn".into(),
    };
    let mut given = std::env::args().skip(1);
    while let Some(flag) = given.next() {
        if flag == "--keep" {
            args.keep = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            print!("{USAGE}");
            std::process::exit(0);
        }
        let value = given
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = || {
            value
                .parse::<u64>()
                .with_context(|| format!("{flag}: {value:?} is not a whole number"))
        };
        match flag.as_str() {
            "--msbd" => args.msbd = PathBuf::from(&value),
            "--tasks" => args.tasks = number()? as usize,
            "--kills" => args.kills = number()? as usize,
            "--seed" => args.seed = number()?,
            "--dir" => args.dir = Some(PathBuf::from(&value)),
            "--concurrency" => args.concurrency = number()?.max(1) as usize,
            "--submitters" => args.submitters = number()?.max(1) as usize,
            "--backlog" => args.backlog = number()?.max(1) as usize,
            "--max-minutes" => args.max_minutes = number()?.max(1),
            "--log-level" => args.log_level = value,
            other => anyhow::bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    anyhow::ensure!(
        !args.msbd.as_os_str().is_empty(),
        "--msbd is required\n{USAGE}"
    );
    anyhow::ensure!(args.tasks > 0, "--tasks must be at least 1");
    args.msbd = args
        .msbd
        .canonicalize()
        .with_context(|| format!("finding {}", args.msbd.display()))?;
    Ok(args)
}

/// Recovery after kills, measured.
#[derive(Clone, Default, Debug)]
struct Recovery {
    /// Tasks the store had running at a kill.
    tasks: usize,
    /// The longest time from a kill to a task's recovery seen through the tools.
    longest: Duration,
    /// The longest time from a kill to msbd answering `initialize` again.
    longest_start: Duration,
    /// Kills that came while msbd was starting (before it was initialized).
    during_start: usize,
    /// Kills that came during a graceful shutdown (after a SIGTERM).
    during_stop: usize,
    /// Kills timed for a submission or cancel in flight.
    in_flight: usize,
}

/// What the run's threads share.
struct Run {
    args: Args,
    plans: Vec<Plan>,
    daemon: Daemon,
    tracker: Tracker,
    db: PathBuf,
    next: AtomicUsize,
    submitters_left: AtomicUsize,
    killer_done: AtomicBool,
    stop: AtomicBool,
    /// Cancels, pauses and resumes to do, by when.
    cancels: Mutex<BinaryHeap<Reverse<(Instant, usize, Action)>>>,
    cancels_in_flight: AtomicUsize,
    /// Submissions sent and not answered yet.
    submits_in_flight: AtomicUsize,
    kills: AtomicUsize,
    failures: Mutex<Vec<String>>,
    recovery: Mutex<Recovery>,
    started: Instant,
}

impl Run {
    fn fail(&self, message: String) {
        eprintln!("chaos: FAILURE: {message}");
        self.failures.lock().expect("failures lock").push(message);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn elapsed(&self) -> String {
        format!("{:.1} s", self.started.elapsed().as_secs_f64())
    }

    /// A live connection: the current one (`after` 0), or one newer than a lost one.
    fn connection(&self, after: u64) -> Option<(u64, Arc<Connection>)> {
        loop {
            if self.stopped() {
                return None;
            }
            if let Some(found) = self.daemon.wait_for(after, Duration::from_millis(500)) {
                return Some(found);
            }
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("chaos: error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let args = parse_args()?;
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => {
            std::env::temp_dir().join(format!("msbd-chaos-{}-{}", args.seed, std::process::id()))
        }
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let data_dir = dir.join("data");
    let effects = dir.join("effects");
    let logs = dir.join("logs");
    for made in [&data_dir, &effects.join("m"), &logs] {
        std::fs::create_dir_all(made).with_context(|| format!("creating {}", made.display()))?;
    }
    let dir = dir.canonicalize()?;
    let data_dir = data_dir.canonicalize()?;
    let effects = effects.canonicalize()?;
    // Sandboxed tasks run as unprivileged users: they must be able to reach and write the log.
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", path.display()))
    };
    for ancestor in dir.ancestors().skip(1) {
        let current = std::fs::metadata(ancestor)?.permissions().mode();
        if current & 0o001 == 0 {
            anyhow::bail!(
                "{} is not searchable by other users, so sandboxed tasks cannot reach the run's volume; give --dir elsewhere",
                ancestor.display()
            );
        }
    }
    mode(&dir, 0o755)?;
    mode(&effects, 0o777)?;
    mode(&effects.join("m"), 0o1777)?;
    let effects_log = effects.join("log");
    std::fs::write(&effects_log, "")?;
    mode(&effects_log, 0o666)?;
    let task_types = dir.join("task-types.toml");
    std::fs::write(&task_types, workload::TASK_TYPES)?;

    let env: Vec<(String, String)> = [
        ("MSB_DATA_DIR", data_dir.display().to_string()),
        ("MSB_TASK_TYPES_FILE", task_types.display().to_string()),
        (
            "MSB_SHARED_VOLUME_PATH",
            format!("{}:/effects", effects.display()),
        ),
        ("MSB_MAX_CONCURRENT_TASKS", args.concurrency.to_string()),
        (
            "MSB_MAX_SESSIONS",
            (args.concurrency * 2).max(10).to_string(),
        ),
        ("MSB_TASK_RETENTION", "0".into()),
        (
            "MSB_SHUTDOWN_TIMEOUT",
            SHUTDOWN_TIMEOUT.as_secs().to_string(),
        ),
        ("MSB_LOG_LEVEL", args.log_level.clone()),
        ("MSB_EXECUTION_TIMEOUT", "60".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    println!(
        "chaos: seed {} ({} tasks, {} kills, concurrency {}); msbd {}; run directory {}",
        args.seed,
        args.tasks,
        args.kills,
        args.concurrency,
        args.msbd.display(),
        dir.display()
    );
    let plans: Vec<Plan> = (0..args.tasks as u64)
        .map(|i| workload::plan(args.seed, i))
        .collect();
    let tracker = Tracker::new(plans.iter().map(|p| (p.kind, p.key.clone())).collect());
    let daemon = Daemon::new(DaemonConfig {
        msbd: args.msbd.clone(),
        env,
        log_dir: logs.clone(),
    });
    let run = Arc::new(Run {
        submitters_left: AtomicUsize::new(args.submitters),
        args: args.clone(),
        plans,
        daemon,
        tracker,
        db: data_dir.join("tasks.sqlite3"),
        next: AtomicUsize::new(0),
        killer_done: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        cancels: Mutex::new(BinaryHeap::new()),
        cancels_in_flight: AtomicUsize::new(0),
        submits_in_flight: AtomicUsize::new(0),
        kills: AtomicUsize::new(0),
        failures: Mutex::new(Vec::new()),
        recovery: Mutex::new(Recovery::default()),
        started: Instant::now(),
    });

    let (generation, conn) = run.daemon.spawn()?;
    if let Err(error) = run.daemon.initialize(generation, &conn, START_TIMEOUT) {
        anyhow::bail!(
            "msbd did not start: {error}; its log ends with:\n{}",
            log_tail(&run.daemon.log_path(generation), 30)
        );
    }

    let mut threads = Vec::new();
    for n in 0..args.submitters {
        let run = Arc::clone(&run);
        threads.push(spawn_named(format!("submitter-{n}"), move || {
            submitter(&run);
            run.submitters_left.fetch_sub(1, Ordering::AcqRel);
        }));
    }
    {
        let run = Arc::clone(&run);
        threads.push(spawn_named("canceller".into(), move || canceller(&run)));
    }
    {
        let run = Arc::clone(&run);
        threads.push(spawn_named("poller".into(), move || poller(&run)));
    }
    {
        let run = Arc::clone(&run);
        threads.push(spawn_named("killer".into(), move || {
            killer(&run);
            run.killer_done.store(true, Ordering::Release);
        }));
    }

    // Wait for the work to be done, reporting progress.
    let deadline = run.started + Duration::from_secs(args.max_minutes * 60);
    let mut last_report = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let submitted = run.submitters_left.load(Ordering::Acquire) == 0;
        let killed = run.killer_done.load(Ordering::Acquire);
        let cancels_done = run.cancels.lock().expect("cancels").is_empty()
            && run.cancels_in_flight.load(Ordering::Acquire) == 0;
        let open = run.tracker.open();
        if submitted && killed && cancels_done && open == 0 {
            break;
        }
        if killed && let Some((status, log)) = run.daemon.exited_on_its_own() {
            run.fail(format!(
                "msbd exited on its own ({status}); its log ends with:\n{}",
                log_tail(&log, 30)
            ));
            restart(&run);
        }
        if Instant::now() > deadline {
            let stuck: Vec<String> = run.tracker.open_ids().into_iter().take(10).collect();
            run.fail(format!(
                "the run did not finish within {} minutes: submitters done {submitted}, kills done {killed}, {open} tasks not finished (some: {stuck:?})",
                args.max_minutes
            ));
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            let inner = run.tracker.lock();
            eprintln!(
                "chaos: {}: {} accepted, {} finished, {} kills, {:.0} tasks/s",
                run.elapsed(),
                inner.accepted,
                inner.terminal,
                run.kills.load(Ordering::Acquire),
                inner.terminal as f64 / run.started.elapsed().as_secs_f64()
            );
        }
    }
    run.stop.store(true, Ordering::Release);
    for thread in threads {
        if thread.join().is_err() {
            run.fail("a thread of the harness panicked".into());
        }
    }
    let work_done = run.started.elapsed();

    // Every accepted task, as the tools show it now.
    let final_views = final_pass(&run);

    // The graceful stop.
    let stop = run
        .daemon
        .terminate(SHUTDOWN_TIMEOUT + Duration::from_secs(15));
    let generation = run.daemon.generation();
    match &stop {
        Ok((status, took)) if status.success() => {
            println!(
                "chaos: msbd stopped gracefully in {:.1} s",
                took.as_secs_f64()
            );
        }
        Ok((status, _)) => run.fail(format!(
            "msbd's graceful stop ended with {status}; its log ends with:\n{}",
            log_tail(&run.daemon.log_path(generation), 30)
        )),
        Err(error) => run.fail(format!(
            "{error:#}; its log ends with:\n{}",
            log_tail(&run.daemon.log_path(generation), 30)
        )),
    }
    run.daemon.close();
    // Leave a moment for the kernel to finish tearing down what msbd stopped.
    std::thread::sleep(Duration::from_millis(300));

    let marker = sandbox_wrapper::wrapper::marker_for(&data_dir);
    let leftovers = audit::leftovers(&data_dir, &marker, &run.daemon.pids());
    for leftover in &leftovers {
        run.fail(format!("left behind after the graceful stop: {leftover}"));
    }

    let inner = run.tracker.lock();
    let store = match audit::audit_store(&run.db, &inner, &effects_log) {
        Ok(store) => store,
        Err(error) => {
            run.fail(format!("auditing the store file failed: {error:#}"));
            audit::StoreAudit::default()
        }
    };
    for failure in &store.failures {
        run.fail(failure.clone());
    }
    // The tools' final view: every accepted task final.
    let mut lost_ids: HashSet<String> = HashSet::new();
    for task in &inner.tasks {
        let Some(id) = &task.id else { continue };
        match final_views.as_ref().map(|v| v.contains(id)) {
            Some(true) => {}
            Some(false) => {
                lost_ids.insert(id.clone());
            }
            None => {}
        }
    }
    if !lost_ids.is_empty() {
        let some: Vec<&String> = lost_ids.iter().take(10).collect();
        run.fail(format!(
            "{} accepted tasks were not final in the tools' last listing (some: {some:?})",
            lost_ids.len()
        ));
    }
    let violations = inner.violations.clone();
    let accepted = inner.accepted;
    let unanswered = inner.tasks.iter().filter(|t| t.id.is_none()).count();
    let lost = store.lost.max(lost_ids.len());
    let duplicated = inner.duplicated + store.duplicated;
    let kills = run.kills.load(Ordering::Acquire);
    let recovery = run.recovery.lock().expect("recovery").clone();

    // The summary.
    println!(
        "chaos: work done in {:.1} s ({:.0} tasks/s), {} s in all",
        work_done.as_secs_f64(),
        accepted as f64 / work_done.as_secs_f64(),
        run.started.elapsed().as_secs()
    );
    let outcomes: Vec<String> = store
        .outcomes
        .iter()
        .map(|((kind, status), n)| format!("{} {status} {n}", kind.name()))
        .collect();
    println!("chaos: outcomes: {}", outcomes.join(", "));
    println!(
        "chaos: recovery: {} tasks running at the kills, all recovered within {:.2} s of their kill (limit {} s: lease {} s + 1 s); msbd answered again within {:.2} s of a kill; kills: {} during a start, {} during a graceful stop, {} timed for a call in flight",
        recovery.tasks,
        recovery.longest.as_secs_f64(),
        RECOVERY_LIMIT.as_secs(),
        LEASE.as_secs(),
        recovery.longest_start.as_secs_f64(),
        recovery.during_start,
        recovery.during_stop,
        recovery.in_flight
    );
    println!(
        "chaos: at-least-once (not failures): {} re-executions of logged tasks after kills; {} submissions retried after a lost answer ({} found the task already made, {} made it then); {} tasks of calls whose answer was lost (all final)",
        store.reexecutions,
        inner.deduplicated_answers + inner.resubmitted_fresh,
        inner.deduplicated_answers,
        inner.resubmitted_fresh,
        store.unanswered
    );
    for note in store.info.iter().take(5) {
        println!("chaos: note: {note}");
    }
    if store.info.len() > 5 {
        println!("chaos: note: … and {} more such", store.info.len() - 5);
    }
    drop(inner);
    let failures = run.failures.lock().expect("failures").clone();
    let mut problems = failures.len() + violations.len();
    if kills < args.kills {
        problems += 1;
        println!(
            "chaos: FAILURE: only {kills} of {} kills happened",
            args.kills
        );
    }
    if unanswered > 0 {
        problems += 1;
        println!("chaos: FAILURE: {unanswered} submissions were never accepted");
    }
    if problems > 0 {
        println!("chaos: {} problem(s):", problems);
        for message in violations.iter().chain(failures.iter()).take(40) {
            println!("  - {message}");
        }
        if problems > 40 {
            println!("  … and {} more", problems - 40);
        }
    }
    println!(
        "chaos: {accepted} accepted, {} terminal, {lost} lost, {duplicated} duplicated, {kills} kills",
        store.terminal
    );
    let passed = problems == 0 && lost == 0 && duplicated == 0 && accepted == args.tasks;
    if passed {
        if !args.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
    } else {
        println!(
            "chaos: FAILED; the run's files (logs, store) are in {}; replay the plan with --tasks {} --kills {} --seed {}",
            dir.display(),
            args.tasks,
            args.kills,
            args.seed
        );
    }
    Ok(passed)
}

fn spawn_named(name: String, body: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(body)
        .expect("starting a thread")
}

/// Submits tasks, in index order across the submitters, keeping at most `backlog` unfinished.
fn submitter(run: &Run) {
    loop {
        let index = run.next.fetch_add(1, Ordering::AcqRel);
        let Some(plan) = run.plans.get(index) else {
            return;
        };
        while run.tracker.open() >= run.args.backlog {
            if run.stopped() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let mut after = 0;
        let mut retried = false;
        loop {
            let Some((generation, conn)) = run.connection(after) else {
                return;
            };
            let sent = Instant::now();
            run.submits_in_flight.fetch_add(1, Ordering::AcqRel);
            let answer = conn.tool(plan.tool, plan.args.clone(), CALL_TIMEOUT);
            run.submits_in_flight.fetch_sub(1, Ordering::AcqRel);
            match answer {
                Ok(ToolAnswer::Ok(answer)) => {
                    let received = Instant::now();
                    run.tracker
                        .accepted(index, &answer, retried, sent, received);
                    let mut actions = run.cancels.lock().expect("cancels");
                    if let Some(delay) = plan.cancel_after {
                        actions.push(Reverse((received + delay, index, Action::Cancel)));
                    }
                    if let Some((delay, _)) = plan.pause {
                        actions.push(Reverse((received + delay, index, Action::Pause)));
                    }
                    break;
                }
                Ok(ToolAnswer::Error(text)) if text.contains("SHUTTING_DOWN") => {
                    retried = true;
                    std::thread::sleep(Duration::from_millis(50));
                }
                // A failed run of `execute_command` is a tool error that names its task.
                Ok(ToolAnswer::Error(text))
                    if plan.kind == Kind::Exec && task_id_in(&text).is_some() =>
                {
                    let id = task_id_in(&text).unwrap_or_default();
                    run.tracker.accepted(
                        index,
                        &json!({"task_id": id, "status": ""}),
                        retried,
                        sent,
                        Instant::now(),
                    );
                    break;
                }
                Ok(ToolAnswer::Error(text)) => {
                    run.fail(format!(
                        "the submission of task #{index} ({}) was refused: {text}",
                        plan.kind.name()
                    ));
                    break;
                }
                Err(CallError::Lost) => {
                    retried = true;
                    after = generation;
                }
                Err(error) => {
                    run.fail(format!(
                        "the submission of task #{index} failed: {error} (generation {generation})"
                    ));
                    retried = true;
                    after = generation;
                }
            }
        }
    }
}

/// What the action thread does to a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    /// `cancel_task`.
    Cancel,
    /// `manage_background_tasks(action="pause")`, then a resume.
    Pause,
    /// `manage_background_tasks(action="resume")`.
    Resume,
}

/// Cancels, pauses and resumes the tasks planned for it, when their time comes.
fn canceller(run: &Run) {
    loop {
        let due = {
            let mut cancels = run.cancels.lock().expect("cancels");
            match cancels.peek() {
                Some(Reverse((at, _, _))) if *at <= Instant::now() => {
                    let Reverse((_, index, action)) = cancels.pop().expect("peeked");
                    run.cancels_in_flight.fetch_add(1, Ordering::AcqRel);
                    Some((index, action))
                }
                _ => None,
            }
        };
        let Some((index, action)) = due else {
            if run.stopped() && run.cancels.lock().expect("cancels").is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let id = run.tracker.lock().tasks[index].id.clone();
        if let Some(id) = id {
            act(run, index, &id, action);
        }
        run.cancels_in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn act(run: &Run, index: usize, id: &str, action: Action) {
    let (tool, args) = match action {
        Action::Cancel => ("cancel_task", json!({"task_id": id})),
        Action::Pause => (
            "manage_background_tasks",
            json!({"action": "pause", "task_id": id}),
        ),
        Action::Resume => (
            "manage_background_tasks",
            json!({"action": "resume", "task_id": id}),
        ),
    };
    let mut after = 0;
    loop {
        let Some((generation, conn)) = run.connection(after) else {
            return;
        };
        let sent = Instant::now();
        match conn.tool(tool, args.clone(), CALL_TIMEOUT) {
            Ok(ToolAnswer::Ok(answer)) => {
                let received = Instant::now();
                match action {
                    Action::Cancel => {
                        run.tracker
                            .cancel_answered(index, answer["cancelled"].as_bool().unwrap_or(false));
                        run.tracker.observe(&answer, sent, received);
                    }
                    Action::Pause => {
                        run.tracker.observe(&answer["task"], sent, received);
                        let resume_after = run.plans[index].pause.map_or(Duration::ZERO, |p| p.1);
                        run.cancels.lock().expect("cancels").push(Reverse((
                            received + resume_after,
                            index,
                            Action::Resume,
                        )));
                    }
                    Action::Resume => run.tracker.observe(&answer["task"], sent, received),
                }
                return;
            }
            Ok(ToolAnswer::Error(text)) if text.contains("SHUTTING_DOWN") => {
                std::thread::sleep(Duration::from_millis(50));
            }
            // The task finished (or, for a resume, was recovered after a kill) first.
            Ok(ToolAnswer::Error(text))
                if action != Action::Cancel && text.contains("ILLEGAL_TRANSITION") =>
            {
                if action == Action::Pause {
                    return;
                }
                // A resume refused: the task must not be left paused.
                let sent = Instant::now();
                if let Ok(ToolAnswer::Ok(view)) =
                    conn.tool("check_task_status", json!({"task_id": id}), CALL_TIMEOUT)
                {
                    run.tracker.observe(&view, sent, Instant::now());
                    if view["status"] == "paused" {
                        run.fail(format!(
                            "resuming task {id} was refused though it is paused: {text}"
                        ));
                    }
                }
                return;
            }
            Ok(ToolAnswer::Error(text)) => {
                run.fail(format!("{tool}({args}) was refused: {text}"));
                return;
            }
            Err(CallError::Lost) => after = generation,
            Err(error) => {
                run.fail(format!("{tool}({args}) failed: {error}"));
                after = generation;
            }
        }
    }
}

/// Follows the tasks: the active ones by listing, the others one by one, until the run stops.
fn poller(run: &Run) {
    while !run.stopped() {
        let Some((_, conn)) = run.daemon.current(Duration::from_millis(200)) else {
            continue;
        };
        let mut active: HashSet<String> = HashSet::new();
        let mut cursor: Option<String> = None;
        let mut lost = false;
        loop {
            let mut args = json!({"status": "active", "limit": 500});
            if let Some(cursor) = &cursor {
                args["cursor"] = json!(cursor);
            }
            let sent = Instant::now();
            match conn.tool("list_tasks", args, CALL_TIMEOUT) {
                Ok(ToolAnswer::Ok(page)) => {
                    let received = Instant::now();
                    for view in page["tasks"].as_array().into_iter().flatten() {
                        run.tracker.observe(view, sent, received);
                        if let Some(id) = view["task_id"].as_str() {
                            active.insert(id.to_owned());
                        }
                    }
                    cursor = page["next_cursor"].as_str().map(str::to_owned);
                    if cursor.is_none() {
                        break;
                    }
                }
                Ok(ToolAnswer::Error(text)) => {
                    if !text.contains("SHUTTING_DOWN") {
                        run.fail(format!("list_tasks failed: {text}"));
                    }
                    lost = true;
                    break;
                }
                Err(CallError::Lost) => {
                    lost = true;
                    break;
                }
                Err(error) => {
                    run.fail(format!("list_tasks failed: {error}"));
                    lost = true;
                    break;
                }
            }
        }
        if lost {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        for id in run.tracker.open_ids() {
            if active.contains(&id) || run.stopped() {
                continue;
            }
            let sent = Instant::now();
            match conn.tool("check_task_status", json!({"task_id": id}), CALL_TIMEOUT) {
                Ok(ToolAnswer::Ok(view)) => run.tracker.observe(&view, sent, Instant::now()),
                Ok(ToolAnswer::Error(text)) => {
                    if !text.contains("SHUTTING_DOWN") {
                        run.fail(format!("check_task_status({id}) failed: {text}"));
                    }
                    break;
                }
                Err(CallError::Lost) => break,
                Err(error) => {
                    run.fail(format!("check_task_status({id}) failed: {error}"));
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The stream of the killer's random numbers.
const KILL_STREAM: u64 = 2;

/// Kills msbd `kills` times: at random numbers of finished tasks, after a random delay, or timed
/// for a call in flight, or during a graceful stop, and now and then again while it starts;
/// restarts it each time and checks the recovery.
fn killer(run: &Run) {
    let mut rng = Rng::for_item(run.args.seed, KILL_STREAM, 0);
    let total = run.args.kills;
    let tasks = run.args.tasks as u64;
    // Points in the run, as numbers of tasks seen finished: spread over its whole length.
    let mut points: Vec<u64> = (0..total)
        .map(|_| tasks * 2 / 100 + rng.below((tasks * 93 / 100).max(1)))
        .collect();
    points.sort_unstable();
    let mut done = 0;
    while done < total {
        // Wait for the kill point, restarting msbd if it died on its own meanwhile.
        let point = points[done] as usize;
        loop {
            if run.stopped() {
                return;
            }
            if let Some((status, log)) = run.daemon.exited_on_its_own() {
                run.fail(format!(
                    "msbd exited on its own ({status}); its log ends with:\n{}",
                    log_tail(&log, 30)
                ));
                restart(run);
            }
            let (finished, open) = {
                let inner = run.tracker.lock();
                (inner.terminal, inner.accepted - inner.terminal)
            };
            let all_done = run.submitters_left.load(Ordering::Acquire) == 0 && open == 0;
            if finished >= point || all_done {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mode = rng.below(100);
        if mode < 35 {
            // While a submission or a cancel is on its way: its answer is lost.
            let until = Instant::now() + Duration::from_secs(3);
            while run.submits_in_flight.load(Ordering::Acquire) == 0
                && run.cancels_in_flight.load(Ordering::Acquire) == 0
                && Instant::now() < until
            {
                std::thread::yield_now();
            }
            run.recovery.lock().expect("recovery").in_flight += 1;
        } else if mode < 50 {
            // During a graceful shutdown: SIGTERM first.
            std::thread::sleep(Duration::from_millis(rng.below(500)));
            if run.daemon.sigterm() {
                run.recovery.lock().expect("recovery").during_stop += 1;
            }
            std::thread::sleep(Duration::from_millis(rng.below(300)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.below(1_000)));
        }
        let Some(killed) = run.daemon.kill() else {
            // It had stopped already (a graceful stop that finished first): not a kill.
            eprintln!(
                "chaos: {}: msbd had already stopped gracefully; starting it again",
                run.elapsed()
            );
            restart(run);
            continue;
        };
        done += 1;
        run.kills.store(done, Ordering::Release);
        let mut killed_at = killed;
        let mut running = read_running(run, done);
        // Start again; now and then kill it again while it starts.
        loop {
            let spawned = match run.daemon.spawn() {
                Ok(spawned) => spawned,
                Err(error) => {
                    run.fail(format!("restarting msbd failed: {error:#}"));
                    run.stop.store(true, Ordering::Release);
                    return;
                }
            };
            if done < total && rng.chance(0.2) {
                std::thread::sleep(Duration::from_millis(rng.below(400)));
                if let Some(killed) = run.daemon.kill() {
                    done += 1;
                    run.kills.store(done, Ordering::Release);
                    run.recovery.lock().expect("recovery").during_start += 1;
                    killed_at = killed;
                    running = read_running(run, done);
                    continue;
                }
            }
            let (generation, conn) = spawned;
            match run.daemon.initialize(generation, &conn, START_TIMEOUT) {
                Ok(()) => break,
                Err(error) => {
                    run.fail(format!(
                        "msbd did not come back after kill {done}: {error}; its log ends with:\n{}",
                        log_tail(&run.daemon.log_path(generation), 30)
                    ));
                    run.daemon.kill();
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        let back = killed_at.elapsed();
        eprintln!(
            "chaos: {}: kill {done}/{total}: {} tasks were running; msbd answered again after {:.2} s",
            run.elapsed(),
            running.len(),
            back.as_secs_f64()
        );
        {
            let mut recovery = run.recovery.lock().expect("recovery");
            recovery.longest_start = recovery.longest_start.max(back);
        }
        check_recovery(run, killed_at, &running, done);
    }
}

/// The tasks the store had running when msbd was killed.
fn read_running(run: &Run, kill: usize) -> Vec<(String, u64)> {
    match audit::running_tasks(&run.db) {
        Ok(running) => running,
        Err(error) => {
            run.fail(format!(
                "reading the store after kill {kill} failed: {error:#}"
            ));
            Vec::new()
        }
    }
}

/// Starts msbd again after it died on its own.
fn restart(run: &Run) {
    for _ in 0..3 {
        let Ok((generation, conn)) = run.daemon.spawn() else {
            continue;
        };
        if run
            .daemon
            .initialize(generation, &conn, START_TIMEOUT)
            .is_ok()
        {
            return;
        }
        run.daemon.kill();
    }
    run.fail("msbd could not be started again".into());
    run.stop.store(true, Ordering::Release);
}

/// Checks that each task running at a kill is recovered (queued again, running a new attempt,
/// or final) within [`RECOVERY_LIMIT`] of the kill.
fn check_recovery(run: &Run, killed_at: Instant, running: &[(String, u64)], kill: usize) {
    let deadline = killed_at + RECOVERY_LIMIT;
    let mut after = 0;
    for (id, attempt) in running {
        loop {
            let Some((generation, conn)) = run.connection(after) else {
                return;
            };
            let sent = Instant::now();
            match conn.tool("check_task_status", json!({"task_id": id}), CALL_TIMEOUT) {
                Ok(ToolAnswer::Ok(view)) => {
                    let received = Instant::now();
                    run.tracker.observe(&view, sent, received);
                    let status = view["status"].as_str().unwrap_or("");
                    let now_attempt = view["attempt"].as_u64().unwrap_or(0);
                    if status != "running" || now_attempt > *attempt {
                        let took = received - killed_at;
                        let mut recovery = run.recovery.lock().expect("recovery");
                        recovery.tasks += 1;
                        recovery.longest = recovery.longest.max(took);
                        if took > RECOVERY_LIMIT {
                            drop(recovery);
                            run.fail(format!(
                                "task {id} (attempt {attempt} running at kill {kill}) was recovered only {:.2} s after the kill (limit {} s)",
                                took.as_secs_f64(),
                                RECOVERY_LIMIT.as_secs()
                            ));
                        }
                        break;
                    }
                    if Instant::now() > deadline {
                        run.fail(format!(
                            "task {id} (attempt {attempt} running at kill {kill}) was still running attempt {now_attempt} {:.2} s after the kill (limit {} s)",
                            killed_at.elapsed().as_secs_f64(),
                            RECOVERY_LIMIT.as_secs()
                        ));
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(ToolAnswer::Error(text)) => {
                    run.fail(format!(
                        "check_task_status({id}) after kill {kill} failed: {text}"
                    ));
                    break;
                }
                // Killed again meanwhile: the next kill checks it again.
                Err(CallError::Lost) => return,
                Err(error) => {
                    run.fail(format!(
                        "check_task_status({id}) after kill {kill} failed: {error}"
                    ));
                    after = generation;
                }
            }
        }
    }
}

/// Lists every task through the tools once the work is done: the ids of the accepted tasks seen
/// final, or `None` when the listing failed.
fn final_pass(run: &Run) -> Option<HashSet<String>> {
    let Some((_, conn)) = run.daemon.current(Duration::from_secs(5)) else {
        run.fail("msbd was not up for the final listing".into());
        return None;
    };
    let mut finals = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = json!({"status": "all", "limit": 500});
        if let Some(cursor) = &cursor {
            args["cursor"] = json!(cursor);
        }
        let sent = Instant::now();
        match conn.tool("list_tasks", args, CALL_TIMEOUT) {
            Ok(ToolAnswer::Ok(page)) => {
                let received = Instant::now();
                for view in page["tasks"].as_array().into_iter().flatten() {
                    run.tracker.observe(view, sent, received);
                    if let (Some(id), Some(status)) =
                        (view["task_id"].as_str(), view["status"].as_str())
                        && is_terminal(status)
                    {
                        finals.insert(id.to_owned());
                    }
                }
                cursor = page["next_cursor"].as_str().map(str::to_owned);
                if cursor.is_none() {
                    return Some(finals);
                }
            }
            Ok(ToolAnswer::Error(text)) => {
                run.fail(format!("the final list_tasks failed: {text}"));
                return None;
            }
            Err(error) => {
                run.fail(format!("the final list_tasks failed: {error}"));
                return None;
            }
        }
    }
}

/// The first task id (a hyphenated UUID) in a text.
fn task_id_in(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(35)).find_map(|start| {
        let candidate = &bytes[start..start + 36];
        let shaped = candidate.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        });
        shaped.then(|| String::from_utf8_lossy(candidate).into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::task_id_in;

    #[test]
    fn task_ids_are_found_in_error_texts() {
        assert_eq!(
            task_id_in("the task is cancelled\n[Session: s1] [Status: cancelled] [Task: 01a23b12-07cb-7009-8dfe-08c9aa63963e]").as_deref(),
            Some("01a23b12-07cb-7009-8dfe-08c9aa63963e")
        );
        assert_eq!(task_id_in("no id here"), None);
    }
}
