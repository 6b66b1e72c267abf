//! The local backend against real processes: containment (files, secrets, network), limits
//! (processes, memory, output), whole-tree kill on timeout and cancel, pause. Every test prints
//! the isolation it ran under, and asserts what that level promises.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_wrapper::backend::local::{IsolationLevel, LocalBackend, LocalConfig};
use sandbox_wrapper::backend::{
    EndReason, ExecControl, ExecOutcome, ExecRequest, ExitStatus, Flavor, SandboxBackend,
    SandboxInfo, SandboxSpec,
};
use sandbox_wrapper::output::OutputSink;
use tokio_util::sync::CancellationToken;

pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) backend: Arc<LocalBackend>,
    /// This fixture's own instance marker, so that concurrent tests never sweep each other.
    pub(crate) marker: String,
}

pub(crate) fn fixture() -> Fixture {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The workspaces under the data directory (see `LocalConfig::sandbox_dir`): the sandbox
    // users pass through it when the tests run as root.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = format!("test{}-{}", std::process::id(), rand_suffix());
    let mut config = LocalConfig::new(dir.path().join("data"), marker.clone());
    config.landlock_shim = Some(shim());
    let backend = LocalBackend::new(config).unwrap();
    let report = backend.isolation_report();
    eprintln!(
        "isolation: {:?} — {} (missing: {:?})",
        report.level, report.layers, report.missing
    );
    Fixture {
        dir,
        backend: Arc::new(backend),
        marker,
    }
}

impl Fixture {
    pub(crate) fn level(&self) -> IsolationLevel {
        self.backend.isolation_report().level
    }

    /// Whether this host gives the level (and root, when `root`) a test checks. When it does
    /// not, the test fails, unless `MSBD_TEST_ALLOW_UNPRIVILEGED` is set: then it says what it
    /// skipped and returns false.
    pub(crate) fn offers(&self, level: IsolationLevel, root: bool, what: &str) -> bool {
        if self.level() >= level && (is_root() || !root) {
            return true;
        }
        opt_out(&format!(
            "{what} (needs level {level}{}; this host gives {} as {})",
            if root { " and root" } else { "" },
            self.level(),
            if is_root() { "root" } else { "a user" }
        ));
        false
    }

    pub(crate) async fn session(&self, id: &str) -> SandboxInfo {
        self.backend
            .create(&SandboxSpec {
                session_id: id.into(),
                flavor: Flavor::Small,
                template: "python".into(),
                volumes: Vec::new(),
                network: Default::default(),
            })
            .await
            .unwrap()
    }

    pub(crate) async fn sh(&self, sandbox: &SandboxInfo, script: &str) -> (ExecOutcome, String) {
        self.sh_with(
            sandbox,
            script,
            Some(Duration::from_secs(30)),
            CancellationToken::new(),
        )
        .await
    }

    pub(crate) async fn sh_with(
        &self,
        sandbox: &SandboxInfo,
        script: &str,
        timeout: Option<Duration>,
        cancel: CancellationToken,
    ) -> (ExecOutcome, String) {
        let sink = OutputSink::create(
            self.dir.path().join(format!("out-{}", rand_suffix())),
            1 << 20,
        )
        .unwrap();
        let outcome = self
            .backend
            .exec(
                sandbox,
                ExecRequest {
                    argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                    timeout,
                    ..ExecRequest::default()
                },
                &sink,
                ExecControl::new(cancel),
            )
            .await
            .unwrap();
        let text = std::fs::read_to_string(sink.path()).unwrap();
        (outcome, text)
    }
}

/// This crate's Landlock shim, built by Cargo for the tests.
pub(crate) fn shim() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_msbd-sandbox-shim"))
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed).to_string()
}

/// This process's resident memory, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether a process with this marker value in its environment is alive.
pub(crate) fn marked_processes(marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(environ) = std::fs::read(entry.path().join("environ"))
            && environ
                .split(|&b| b == 0)
                .any(|var| var == format!("MSBD_SANDBOX={marker}").as_bytes())
        {
            pids.push(pid);
        }
    }
    pids
}

pub(crate) async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_command_and_reports_its_exit() {
    let fixture = fixture();
    let sandbox = fixture.session("basic").await;
    let (outcome, text) = fixture
        .sh(&sandbox, "echo hello; echo oops >&2; exit 3")
        .await;
    assert_eq!(outcome.exit, Some(ExitStatus::Code(3)), "{outcome:?}");
    assert_eq!(outcome.reason, EndReason::Exited);
    assert!(text.contains("hello") && text.contains("oops"), "{text}");
    let (outcome, text) = fixture.sh(&sandbox, "pwd; echo $HOME").await;
    assert!(outcome.success(), "{outcome:?} {text}");
    let work = sandbox.work_dir.as_ref().unwrap().display().to_string();
    assert_eq!(text.lines().next(), Some(work.as_str()), "{text}");
    fixture.backend.stop(&sandbox).await.unwrap();
    assert!(!Path::new(&work).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_process_cannot_write_outside_its_work_directory() {
    let fixture = fixture();
    if !fixture.offers(IsolationLevel::Standard, false, "restricting files") {
        return;
    }
    let ours = fixture.session("writer").await;
    let other = fixture.session("victim").await;
    let other_dir = other.work_dir.clone().unwrap();
    let script = format!(
        "echo x > /etc/msbd-escape && echo WROTE-ETC; \
         echo x > {other}/stolen && echo WROTE-OTHER; \
         ln -s {other} link && echo x > link/through-link && echo WROTE-LINK; \
         ln -s /etc etclink && echo x > etclink/msbd-escape2 && echo WROTE-ETC-LINK; \
         echo x > mine && echo WROTE-MINE",
        other = other_dir.display()
    );
    let (_, text) = fixture.sh(&ours, &script).await;
    assert!(text.contains("WROTE-MINE"), "{text}");
    for escape in ["WROTE-ETC\n", "WROTE-OTHER", "WROTE-LINK", "WROTE-ETC-LINK"] {
        assert!(!text.contains(escape), "{escape} in: {text}");
    }
    assert!(!Path::new("/etc/msbd-escape").exists());
    assert!(!Path::new("/etc/msbd-escape2").exists());
    assert!(!other_dir.join("stolen").exists());
    assert!(!other_dir.join("through-link").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_process_cannot_read_a_root_only_file() {
    let fixture = fixture();
    if !fixture.offers(IsolationLevel::Standard, true, "a uid drop") {
        return;
    }
    // Outside /tmp, which the sandbox sees as its own empty tmpfs.
    let secret_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "TOP-SECRET-VALUE").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(secret_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sandbox = fixture.session("reader").await;
    let (_, text) = fixture
        .sh(
            &sandbox,
            &format!("cat {}; cat /etc/shadow; id -u", secret.display()),
        )
        .await;
    assert!(!text.contains("TOP-SECRET-VALUE"), "{text}");
    assert!(!text.contains("root:"), "{text}");
    assert!(!text.lines().any(|l| l == "0"), "ran as root: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_process_cannot_reach_the_hosts_loopback() {
    let fixture = fixture();
    if !fixture.offers(IsolationLevel::Standard, false, "taking the network away") {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let sandbox = fixture.session("net").await;
    let (_, text) = fixture
        .sh(
            &sandbox,
            &format!("(echo hi > /dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo CONNECTED || echo REFUSED"),
        )
        .await;
    // The shell may be dash (no /dev/tcp): then try python.
    let (_, text2) = fixture
        .sh(
            &sandbox,
            &format!(
                "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}), 2); print(\"CONNECTED\")' 2>&1 || echo REFUSED"
            ),
        )
        .await;
    assert!(
        !text.contains("CONNECTED") && !text2.contains("CONNECTED"),
        "{text} {text2}"
    );
    // Its own loopback works: a server and a client inside the sandbox.
    let (_, own) = fixture
        .sh(
            &sandbox,
            "python3 -c 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", 0)); s.listen(); c = socket.create_connection(s.getsockname(), 2); print(\"LOOPBACK-OK\")'",
        )
        .await;
    assert!(own.contains("LOOPBACK-OK"), "{own}");
    assert!(listener.accept().is_err(), "the listener saw a connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_stopped_by_the_pids_limit() {
    let fixture = fixture();
    if !fixture.offers(IsolationLevel::Strong, true, "a pids limit") {
        return;
    }
    let sandbox = fixture.session("bomb").await;
    // Spawn far more than the limit (256 for small); each child sleeps, so they accumulate.
    let (outcome, text) = fixture
        .sh_with(
            &sandbox,
            "i=0; while [ $i -lt 2000 ]; do sleep 30 & i=$((i+1)); done 2>/dev/null; echo DONE",
            Some(Duration::from_secs(20)),
            CancellationToken::new(),
        )
        .await;
    eprintln!("fork bomb: {outcome:?}");
    // Either the shell saw fork fail (and went on), or it died of it; the machine is fine and
    // nothing is left.
    assert!(
        outcome.reason == EndReason::Exited,
        "{outcome:?} {}",
        &text[..text.len().min(500)]
    );
    eventually("the bomb's processes to be gone", || {
        marked_processes(&format!("{}/bomb", marker_of(&fixture))).is_empty()
    })
    .await;
}

/// bubblewrap's init in each run's pid namespace outlives the run by a moment and is reparented;
/// escaped background processes too. Until someone reaps them they count against the session's
/// pids limit (256 for small): reparented to a slow init, a burst of short runs failed with
/// "bwrap: Can't fork for pid 1" after about 250 runs. The backend reaps them itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_runs_in_one_session_never_runs_into_its_own_leftovers() {
    let fixture = fixture();
    let sandbox = fixture.session("burst").await;
    let runs = 400;
    for run in 0..runs {
        // Each run also leaves a background process behind, killed with the run.
        let (outcome, text) = fixture.sh(&sandbox, "sleep 5 & true").await;
        assert!(
            outcome.success(),
            "run {run} of {runs} under {:?}: {outcome:?} {text}",
            fixture.level()
        );
    }
    // What is left for this process to reap is at most the last run's stragglers.
    let zombies = zombie_children_outside_our_session();
    assert!(zombies.len() <= 4, "zombie children left: {zombies:?}");
    fixture.backend.stop(&sandbox).await.unwrap();
}

/// This process's zombie children in other sessions (sandboxed processes all are).
fn zombie_children_outside_our_session() -> Vec<i32> {
    let our_sid = nix::unistd::getsid(None).unwrap().as_raw();
    let mut zombies = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
                .split_whitespace()
                .collect();
            if rest[0] == "Z" && rest[3].parse::<i32>().unwrap() != our_sid {
                zombies.push(pid);
            }
        }
    }
    zombies
}

fn marker_of(fixture: &Fixture) -> String {
    fixture.marker.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_killed_and_reported() {
    let fixture = fixture();
    if !fixture.offers(IsolationLevel::Strong, false, "a memory cgroup") {
        return;
    }
    let sandbox = fixture.session("hog").await;
    let (outcome, _) = fixture
        .sh(
            &sandbox,
            "python3 -c 'x = []\nwhile True: x.append(bytearray(64 << 20))'",
        )
        .await;
    eprintln!("memory hog: {outcome:?}");
    assert_eq!(outcome.reason, EndReason::MemoryLimit, "{outcome:?}");
    assert_eq!(outcome.reason.to_string(), "killed: memory limit");
    assert!(
        outcome.peak_memory_bytes.unwrap() > 512 << 20,
        "{outcome:?}"
    );
}

/// Set for the child process of [`an_output_flood_is_capped_and_leaves_the_daemons_memory_flat`].
const FLOOD_CHILD: &str = "SANDBOX_WRAPPER_FLOOD_CHILD";

/// The child of [`an_output_flood_is_capped_and_leaves_the_daemons_memory_flat`]: alone in its
/// process, it runs a 300 MB flood through a sink capped at 1 MiB, checks the cap, and prints how
/// much its resident memory grew.
#[test]
fn flood_child() {
    if std::env::var_os(FLOOD_CHILD).is_none() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let fixture = fixture();
        let sandbox = fixture.session("flood-child").await;
        let sink = OutputSink::create(fixture.dir.path().join("flood.out"), 1 << 20).unwrap();
        let before = rss_bytes();
        let outcome = fixture
            .backend
            .exec(
                &sandbox,
                ExecRequest {
                    argv: vec![
                        "/bin/sh".into(),
                        "-c".into(),
                        "head -c 300000000 /dev/zero | tr '\\0' x; echo; echo END".into(),
                    ],
                    timeout: Some(Duration::from_secs(60)),
                    ..ExecRequest::default()
                },
                &sink,
                ExecControl::new(CancellationToken::new()),
            )
            .await
            .unwrap();
        assert!(outcome.success(), "{outcome:?}");
        let grown = rss_bytes().saturating_sub(before);
        let (kept, dropped) = sink.sizes();
        assert_eq!(kept, 1 << 20);
        assert!(dropped >= 300_000_000 - (1 << 20), "{dropped}");
        assert_eq!(std::fs::metadata(sink.path()).unwrap().len(), 1 << 20);
        assert!(sink.tail().ends_with("END\n"), "{:?}", &sink.tail()[..20]);
        println!("grew {grown}");
    });
}

#[test]
fn an_output_flood_is_capped_and_leaves_the_daemons_memory_flat() {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "local::flood_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FLOOD_CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let grown: u64 = stdout
        .lines()
        .find_map(|l| l.split("grew ").nth(1))
        .unwrap_or_else(|| {
            panic!(
                "the child said nothing: {stdout} {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })
        .trim()
        .parse()
        .unwrap();
    eprintln!(
        "resident memory grew by {} KiB while 300 MB of output went through",
        grown / 1024
    );
    assert!(
        grown < 16 << 20,
        "the daemon's memory grew by {grown} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaping_double_fork_is_gone_after_timeout_and_after_cancel() {
    let fixture = fixture();
    let marker = marker_of(&fixture);
    // A grandchild that starts its own session (escaping kill(-pgid)) and outlives its parent.
    let script = "setsid sh -c 'sleep 300' & sleep 300";
    let sandbox = fixture.session("escape1").await;
    let (outcome, _) = fixture
        .sh_with(
            &sandbox,
            script,
            Some(Duration::from_millis(500)),
            CancellationToken::new(),
        )
        .await;
    assert_eq!(outcome.reason, EndReason::TimedOut { after_ms: 500 });
    assert_eq!(outcome.reason.to_string(), "timed out after 500 ms");
    eventually("the timed-out tree to be gone", || {
        marked_processes(&format!("{marker}/escape1")).is_empty()
    })
    .await;

    let sandbox = fixture.session("escape2").await;
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    let backend_marker = format!("{marker}/escape2");
    let watcher = tokio::spawn(async move {
        eventually("the escapee to start", || {
            marked_processes(&backend_marker).len() >= 3
        })
        .await;
        trigger.cancel();
    });
    let (outcome, _) = fixture
        .sh_with(&sandbox, script, Some(Duration::from_secs(60)), cancel)
        .await;
    watcher.await.unwrap();
    assert_eq!(outcome.reason, EndReason::Cancelled);
    eventually("the cancelled tree to be gone", || {
        marked_processes(&format!("{marker}/escape2")).is_empty()
    })
    .await;
    eprintln!("isolation: {}", outcome.isolation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_run_is_frozen_and_its_timeout_clock_stops() {
    let fixture = fixture();
    let sandbox = fixture.session("pause").await;
    let sink = OutputSink::create(fixture.dir.path().join("pause.out"), 1 << 20).unwrap();
    let (pause, paused) = tokio::sync::watch::channel(false);
    let control = ExecControl {
        cancel: CancellationToken::new(),
        paused,
    };
    let request = ExecRequest {
        // Prints a tick every 50 ms for 1.5 s, under a 1 s timeout that only holds while paused
        // time is not counted.
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "i=0; while [ $i -lt 10 ]; do echo tick; sleep 0.05; i=$((i+1)); done".into(),
        ],
        timeout: Some(Duration::from_millis(1500)),
        ..ExecRequest::default()
    };
    let run = fixture.backend.exec(&sandbox, request, &sink, control);
    let steer = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        pause.send_replace(true);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let frozen_at = sink.sizes().0;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let still = sink.sizes().0;
        pause.send_replace(false);
        (frozen_at, still)
    };
    let (outcome, (frozen_at, still)) = tokio::join!(run, steer);
    let outcome = outcome.unwrap();
    assert_eq!(frozen_at, still, "output grew while frozen");
    assert!(
        outcome.success(),
        "the paused time counted against the timeout: {outcome:?}"
    );
    assert!(outcome.duration_ms >= 1500, "{outcome:?}");
    let text = std::fs::read_to_string(sink.path()).unwrap();
    assert_eq!(text.matches("tick").count(), 10, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orphan_sweep_removes_only_this_instances_leftovers() {
    let fixture = fixture();
    let sandbox = fixture.session("left").await;
    let keep = fixture.session("kept").await;
    // Leave a process running in "left", then forget the session as a crash would.
    let backend = fixture.backend.clone();
    let sink = OutputSink::create(fixture.dir.path().join("left.out"), 1 << 20).unwrap();
    let run = tokio::spawn({
        let sandbox = sandbox.clone();
        async move {
            backend
                .exec(
                    &sandbox,
                    ExecRequest {
                        argv: vec!["/bin/sh".into(), "-c".into(), "sleep 300".into()],
                        ..ExecRequest::default()
                    },
                    &sink,
                    ExecControl::new(CancellationToken::new()),
                )
                .await
        }
    });
    let marker = marker_of(&fixture);
    eventually("the sleeper to start", || {
        !marked_processes(&format!("{marker}/left")).is_empty()
    })
    .await;
    // A fresh backend on the same data directory knows no session: both are orphans unless live.
    let second = LocalBackend::new(LocalConfig::new(
        fixture.dir.path().join("data"),
        marker.clone(),
    ))
    .unwrap();
    let live: HashSet<String> = ["kept".to_owned()].into();
    let report = second.sweep_orphans(&live).await.unwrap();
    eprintln!("sweep: {report:?}");
    assert!(report.directories >= 1, "{report:?}");
    eventually("the orphan's process to be gone", || {
        marked_processes(&format!("{marker}/left")).is_empty()
    })
    .await;
    assert!(!sandbox.work_dir.as_ref().unwrap().exists());
    assert!(keep.work_dir.as_ref().unwrap().exists());
    let _ = run.await;
}

async fn code(
    fixture: &Fixture,
    sandbox: &SandboxInfo,
    language: sandbox_wrapper::backend::Language,
    source: &str,
) -> (ExecOutcome, String) {
    let sink = OutputSink::create(
        fixture.dir.path().join(format!("code-{}", rand_suffix())),
        1 << 20,
    )
    .unwrap();
    let outcome = fixture
        .backend
        .repl(
            sandbox,
            sandbox_wrapper::backend::ReplRequest {
                language,
                code: source.into(),
                timeout: Some(Duration::from_secs(30)),
            },
            &sink,
            ExecControl::new(CancellationToken::new()),
        )
        .await
        .unwrap();
    (outcome, std::fs::read_to_string(sink.path()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interpreter_state_persists_within_a_session_and_not_across() {
    use sandbox_wrapper::backend::Language;
    let fixture = fixture();
    let one = fixture.session("repl-one").await;
    let two = fixture.session("repl-two").await;

    let (outcome, text) = code(
        &fixture,
        &one,
        Language::Python,
        "import math\nx = 40\ndef f(y):\n    return x + y",
    )
    .await;
    assert!(outcome.success(), "{outcome:?} {text}");
    assert_eq!(text, "");
    let (outcome, text) = code(&fixture, &one, Language::Python, "f(2)").await;
    assert!(outcome.success(), "{outcome:?} {text}");
    assert_eq!(text, "42\n");
    let (outcome, text) = code(
        &fixture,
        &one,
        Language::Python,
        "print(math.floor(2.5), end='')",
    )
    .await;
    assert_eq!((outcome.success(), text.as_str()), (true, "2"));
    let (outcome, text) = code(&fixture, &two, Language::Python, "x").await;
    assert_eq!(outcome.exit, Some(ExitStatus::Code(1)), "{text}");
    assert!(text.contains("NameError"), "{text}");

    let (outcome, text) = code(
        &fixture,
        &one,
        Language::Node,
        "var n = 20; function g(a) { return n + a }",
    )
    .await;
    assert!(outcome.success(), "{outcome:?} {text}");
    let (outcome, text) = code(&fixture, &one, Language::Node, "g(22)").await;
    assert_eq!(
        (outcome.success(), text.as_str()),
        (true, "42\n"),
        "{outcome:?}"
    );
    let (_, text) = code(&fixture, &two, Language::Node, "typeof g").await;
    assert_eq!(text, "'undefined'\n");

    let (outcome, _) = code(
        &fixture,
        &one,
        Language::Bash,
        "v=41\nw() { echo $((v + 1)); }",
    )
    .await;
    assert!(outcome.success(), "{outcome:?}");
    let (outcome, text) = code(&fixture, &one, Language::Bash, "w").await;
    assert_eq!((outcome.success(), text.as_str()), (true, "42\n"));
    let (_, text) = code(&fixture, &two, Language::Bash, "echo \"[$v]\"").await;
    assert_eq!(text, "[]\n");
    eprintln!("isolation: {}", outcome.isolation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_bound_into_the_sandbox() {
    use sandbox_wrapper::backend::VolumeMapping;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("input.txt"), "from the host").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = LocalConfig::new(
        dir.path().join("data"),
        format!("vol{}", std::process::id()),
    );
    config.volumes = vec![
        VolumeMapping::parse(&format!("{}:/tmp/shared", shared.display())).unwrap(),
        VolumeMapping::parse(&format!("{}:/data/in:ro", shared.display())).unwrap(),
    ];
    let backend = Arc::new(LocalBackend::new(config).unwrap());
    let fixture = Fixture {
        dir,
        backend,
        marker: format!("vol{}", std::process::id()),
    };
    let sandbox = fixture.session("volumes").await;
    let (outcome, text) = fixture
        .sh(
            &sandbox,
            "cat /tmp/shared/input.txt; echo; echo back > /tmp/shared/output.txt; cat /data/in/input.txt; echo; echo x > /data/in/nope || echo READ-ONLY",
        )
        .await;
    assert!(outcome.success(), "{outcome:?} {text}");
    if fixture.backend.isolation_report().layers.contains("bwrap") {
        // (stderr and stdout interleave as they come: count, do not compare positions)
        assert_eq!(text.matches("from the host").count(), 2, "{text}");
        assert!(text.contains("READ-ONLY\n"), "{text}");
    }
    assert_eq!(
        std::fs::read_to_string(shared.join("output.txt")).unwrap(),
        "back\n"
    );

    // A guest path bubblewrap could not create is refused up front, with what to do.
    let mut config = LocalConfig::new(fixture.dir.path().join("data2"), "volbad");
    config.volumes =
        vec![VolumeMapping::parse(&format!("{}:/usr/no-such-dir", shared.display())).unwrap()];
    let error = LocalBackend::new(config).err().unwrap().to_string();
    assert!(
        error.contains("system directory") && error.contains("/tmp/<name>"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandboxed_process_cannot_make_namespaces_mount_or_reach_host_sockets_or_fds() {
    let fixture = fixture();
    if !fixture.offers(IsolationLevel::Strong, false, "the strong level") {
        return;
    }
    // A host unix socket anyone may connect to, outside /tmp.
    let socket_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let socket_path = socket_dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    // A descriptor this process holds without close-on-exec, as a service manager might pass.
    let file = std::fs::File::open("/etc/hostname").unwrap();
    use std::os::fd::AsRawFd;
    let leaked = 117;
    // SAFETY: dup2 onto an unused descriptor number; closed at the end of the test.
    #[allow(unsafe_code)]
    unsafe {
        assert!(nix::libc::dup2(file.as_raw_fd(), leaked) == leaked);
    }
    let sandbox = fixture.session("escape-tools").await;
    let script = format!(
        "unshare -U true 2>/dev/null && echo UNSHARED; \
         perl -e 'exit(syscall(56, 0x10000000 | 17, 0, 0, 0, 0) == -1 ? 1 : 0)' 2>/dev/null && echo CLONED-USERNS; \
         mount -t tmpfs none /tmp 2>/dev/null && echo MOUNTED; \
         perl -e 'syscall(438, 0, 0, 0); print \"GETFD-ERRNO-\", $!+0, \"\\n\"'; \
         python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect(\"{socket}\"); print(\"CONNECTED\")' 2>/dev/null; \
         ls /proc/self/fd; echo END",
        socket = socket_path.display()
    );
    let (outcome, text) = fixture.sh(&sandbox, &script).await;
    // SAFETY: closes the descriptor made above.
    #[allow(unsafe_code)]
    unsafe {
        nix::libc::close(leaked);
    }
    eprintln!("{text}");
    assert!(outcome.success(), "{outcome:?}");
    assert!(text.ends_with("END\n"), "{text}");
    for escape in ["UNSHARED", "CLONED-USERNS", "MOUNTED", "CONNECTED"] {
        assert!(!text.contains(escape), "{escape}: {text}");
    }
    assert!(
        !text.lines().any(|l| l == leaked.to_string()),
        "fd {leaked} leaked: {text}"
    );
    // pidfd_getfd (438), which takes another process's descriptor, is refused by seccomp
    // (ENOSYS, 38) before the kernel looks at its arguments (else EBADF, 9).
    assert!(text.contains("GETFD-ERRNO-38\n"), "{text}");
    assert!(
        listener.accept().is_err(),
        "the host socket saw a connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_off_runs_plainly_and_still_kills_on_timeout() {
    use sandbox_wrapper::backend::local::IsolationMode;
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("off{}", std::process::id());
    let mut config = LocalConfig::new(dir.path().join("data"), marker.clone());
    config.isolation = IsolationMode::Off;
    let backend = Arc::new(LocalBackend::new(config).unwrap());
    assert_eq!(backend.isolation_report().level, IsolationLevel::Off);
    let fixture = Fixture {
        dir,
        backend,
        marker: marker.clone(),
    };
    let sandbox = fixture.session("plain").await;
    let (outcome, text) = fixture.sh(&sandbox, "echo plain").await;
    assert!(outcome.success(), "{outcome:?}");
    assert_eq!(text, "plain\n");
    let (outcome, _) = fixture
        .sh_with(
            &sandbox,
            "sleep 300 & sleep 300",
            Some(Duration::from_millis(300)),
            CancellationToken::new(),
        )
        .await;
    assert_eq!(outcome.reason, EndReason::TimedOut { after_ms: 300 });
    eventually("the plain run's processes to be gone", || {
        marked_processes(&format!("{marker}/plain")).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_death_by_signal_is_reported_as_the_signal() {
    let fixture = fixture();
    let sandbox = fixture.session("signal").await;
    let (outcome, _) = fixture.sh(&sandbox, "kill -TERM $$").await;
    assert_eq!(outcome.exit, Some(ExitStatus::Signal(15)), "{outcome:?}");
    assert_eq!(outcome.reason, EndReason::Exited);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn landlock_is_stacked_under_bubblewrap() {
    let fixture = fixture();
    let layers = &fixture.backend.isolation_report().layers;
    if !(layers.contains("bwrap") && layers.contains("landlock")) {
        opt_out(&format!(
            "Landlock stacked under bubblewrap (layers here: {layers})"
        ));
        return;
    }
    let sandbox = fixture.session("stacked").await;
    // PID 1 is bubblewrap's init, the same user but outside the Landlock domain: Landlock's
    // signal scoping (ABI 6) refuses the signal; bubblewrap alone would allow it.
    let (outcome, text) = fixture
        .sh(
            &sandbox,
            "kill -0 1 2>/dev/null && echo SIGNALLED || echo REFUSED; echo x > mine && echo WROTE",
        )
        .await;
    assert!(outcome.success(), "{outcome:?} {text}");
    assert_eq!(text, "REFUSED\nWROTE\n");
}

/// msbd killed while it starts can leave the process of its isolation probe behind
/// (bubblewrap's parent-death signal is racy; found by `cargo xtask chaos`): the probe carries
/// the instance's marker, so that the orphan sweep of the next start kills it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_left_by_the_start_probe_is_swept_at_the_next_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // The probe runs as an unprivileged uid when the tests run as root.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A bubblewrap whose probe leaves a process running, as one cut short by a kill does.
    let leaky = dir.path().join("leaky-bwrap");
    std::fs::write(
        &leaky,
        "#!/bin/sh\nsleep 300 </dev/null >/dev/null 2>&1 &\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&leaky, std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = format!("test{}-probe-{}", std::process::id(), rand_suffix());
    let data = dir.path().join("data");
    let mut config = LocalConfig::new(&data, marker.clone());
    config.bwrap = Some(leaky);
    let _first = LocalBackend::new(config).unwrap();
    let probe = format!("{marker}/.probe");
    eventually("the probe's leftover to carry the marker", || {
        !marked_processes(&probe).is_empty()
    })
    .await;
    // The next start sweeps it (isolation off: no probe of its own).
    let mut config = LocalConfig::new(&data, marker.clone());
    config.isolation = sandbox_wrapper::backend::local::IsolationMode::Off;
    let second = LocalBackend::new(config).unwrap();
    let report = second.sweep_orphans(&HashSet::new()).await.unwrap();
    assert!(report.processes >= 1, "{report:?}");
    eventually("the probe's leftover to be gone", || {
        marked_processes(&probe).is_empty()
    })
    .await;
    // Reap it.
    second.sweep_orphans(&HashSet::new()).await.unwrap();
}

/// msbd killed while it makes or removes a session's directory left an empty directory without
/// a marker file that no sweep ever removed (found by `cargo xtask chaos`). Session directories
/// are now made and removed under scratch names that carry the instance's marker
/// (`.new-<marker>-…`, `.gone-<marker>-…`); the orphan sweep removes those, and only this
/// instance's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directories_left_half_made_or_half_removed_are_swept() {
    let fixture = fixture();
    let sandbox = fixture.session("whole").await;
    let root = fixture.dir.path().join("data").join("sandboxes");
    assert_eq!(
        std::fs::read_to_string(root.join("whole").join("marker")).unwrap(),
        fixture.marker
    );
    // What a kill leaves: one half made (no marker file yet), one half removed, and another
    // instance's.
    let marker = &fixture.marker;
    let half_made = root.join(format!(".new-{marker}-made-1-0"));
    std::fs::create_dir_all(half_made.join("work")).unwrap();
    let half_removed = root.join(format!(".gone-{marker}-removed-1-1"));
    std::fs::create_dir_all(half_removed.join("work").join("sub")).unwrap();
    let other = root.join(".new-someoneelse-made-1-0");
    std::fs::create_dir_all(&other).unwrap();
    let live: HashSet<String> = ["whole".to_owned()].into();
    let report = fixture.backend.sweep_orphans(&live).await.unwrap();
    assert!(!half_made.exists(), "{report:?}");
    assert!(!half_removed.exists(), "{report:?}");
    assert!(other.exists());
    assert!(root.join("whole").join("work").exists());
    // Stopping the session leaves nothing of it, not even a scratch name.
    fixture.backend.stop(&sandbox).await.unwrap();
    let left: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec![".new-someoneelse-made-1-0".to_owned()]);
}

/// Whether a test that needs root can run: it fails without root unless
/// `MSBD_TEST_ALLOW_UNPRIVILEGED` is set, and then says it skipped.
pub(crate) fn root_or_opt_out(what: &str) -> bool {
    if is_root() {
        return true;
    }
    opt_out(&format!("{what} (needs root)"));
    false
}

/// A test that cannot check what it claims on this host fails, unless
/// `MSBD_TEST_ALLOW_UNPRIVILEGED` is set: then it says what it skipped.
fn opt_out(what: &str) {
    assert!(
        std::env::var_os("MSBD_TEST_ALLOW_UNPRIVILEGED").is_some(),
        "this host cannot test {what}: run the tests as root on a host with bubblewrap and cgroups, or set MSBD_TEST_ALLOW_UNPRIVILEGED=1 to skip such tests"
    );
    eprintln!("SKIPPED (MSBD_TEST_ALLOW_UNPRIVILEGED is set): this host cannot test {what}");
}

/// The level and workspace directory of a backend on `data_dir` (made fresh), with a session
/// that ran a command writing in its work directory.
async fn level_and_root(data_dir: &Path, marker: &str) -> (IsolationLevel, std::path::PathBuf) {
    let mut config = LocalConfig::new(data_dir, marker);
    config.landlock_shim = Some(shim());
    let backend = LocalBackend::new(config).unwrap();
    let report = backend.isolation_report().clone();
    eprintln!(
        "{}: {} — {} (missing: {:?}; workspaces in {})",
        data_dir.display(),
        report.level,
        report.layers,
        report.missing,
        backend.sandbox_root().display()
    );
    let spec = SandboxSpec {
        session_id: "reach".into(),
        flavor: Flavor::Small,
        template: "python".into(),
        volumes: Vec::new(),
        network: Default::default(),
    };
    let sandbox = backend.create(&spec).await.unwrap();
    let sink = OutputSink::create(data_dir.join("reach.out"), 1 << 16).unwrap();
    let request = ExecRequest {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo written > f && cat f && cat \"$HOME/f\"".into(),
        ],
        timeout: Some(Duration::from_secs(30)),
        ..ExecRequest::default()
    };
    let outcome = backend
        .exec(
            &sandbox,
            request,
            &sink,
            ExecControl::new(CancellationToken::new()),
        )
        .await
        .unwrap();
    let output = std::fs::read_to_string(sink.path()).unwrap();
    assert!(outcome.success(), "{outcome:?}: {output}");
    assert_eq!(output, "written\nwritten\n");
    backend.stop(&sandbox).await.unwrap();
    (report.level, backend.sandbox_root().to_path_buf())
}

/// Run as root on the defaults, the data directory is under `/root` (mode 0700): bubblewrap,
/// started as the sandbox's own user, could not reach the workspaces there and every sandbox
/// silently ran at the standard level. The workspaces now go where that user can reach them,
/// and the level is the one an open directory gets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_behind_a_private_directory_gets_the_same_isolation_as_an_open_one() {
    use std::os::unix::fs::PermissionsExt;
    let open = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let private = tempfile::tempdir().unwrap();
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let marker = format!("test{}-private-{}", std::process::id(), rand_suffix());
    let (open_level, _) = level_and_root(&open.path().join("data"), &format!("{marker}o")).await;
    let (private_level, root) = level_and_root(&private.path().join("data"), &marker).await;
    assert_eq!(private_level, open_level);
    if is_root() {
        let fallback = Path::new(sandbox_wrapper::backend::local::FALLBACK_SANDBOX_ROOT);
        assert_eq!(root, fallback.join(&marker));
        std::fs::remove_dir_all(&root).unwrap();
        if open_level < IsolationLevel::Strong {
            eprintln!(
                "this host does not offer the strong level: compared {open_level} with {private_level}"
            );
        }
    } else {
        assert!(root.starts_with(private.path()), "{}", root.display());
    }
}

/// A workspace directory set behind a directory the sandbox users cannot pass through: the
/// report names that directory and its mode, rather than "`true` ended with exit status 1".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_directory_the_sandbox_users_cannot_reach_is_named_in_the_report() {
    use std::os::unix::fs::PermissionsExt;
    if !root_or_opt_out("running sandboxes as users of their own") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let marker = format!("test{}-closed-{}", std::process::id(), rand_suffix());
    let mut config = LocalConfig::new(dir.path().join("data"), marker);
    config.sandbox_dir = Some(closed.join("workspaces"));
    config.landlock_shim = Some(shim());
    let backend = LocalBackend::new(config).unwrap();
    let report = backend.isolation_report();
    assert!(report.level < IsolationLevel::Strong, "{report:?}");
    let missing = report.missing.join("; ");
    assert!(
        missing.contains(&format!(
            "{} (mode 0700) lets no other user pass through",
            closed.display()
        )),
        "{missing}"
    );
}

/// msbd run from a clone under `/root` (`cargo run --release`): its own executable, the Landlock
/// shim, is behind a directory the sandbox users cannot pass through, and bubblewrap could not
/// bind it. A copy they can reach is made beside the workspaces, and Landlock is stacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_behind_a_private_directory_is_copied_where_the_sandbox_users_reach_it() {
    use std::os::unix::fs::PermissionsExt;
    if !root_or_opt_out("running sandboxes as users of their own") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let hidden_shim = closed.join("msbd-sandbox-shim");
    std::fs::copy(shim(), &hidden_shim).unwrap();
    let marker = format!("test{}-shim-{}", std::process::id(), rand_suffix());
    let mut config = LocalConfig::new(dir.path().join("data"), marker.clone());
    config.landlock_shim = Some(hidden_shim);
    let backend = LocalBackend::new(config.clone()).unwrap();
    let report = backend.isolation_report();
    eprintln!("{report:?}");
    let copy = backend.sandbox_root().join(format!(".shim-{marker}"));
    assert!(copy.is_file(), "{}", copy.display());
    // The next start finds the same bytes there and keeps the copy rather than writing it again.
    let first = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&copy).unwrap());
    drop(LocalBackend::new(config).unwrap());
    let second = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&copy).unwrap());
    assert_eq!(first, second, "the unchanged shim was copied again");
    if fixture().level() == IsolationLevel::Strong {
        assert!(report.layers.contains("landlock("), "{report:?}");
        assert!(
            !report.missing.iter().any(|m| m.contains("shim")),
            "{report:?}"
        );
    }
}

/// A `code` task's traceback showed a frame of msbd's own driver (`File "<string>", line 19`):
/// only the user's frames are shown, in Python and in Node, and a syntax error reads as Python
/// prints one for a script.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracebacks_show_the_users_code_and_not_the_driver() {
    use sandbox_wrapper::backend::Language;
    let fixture = fixture();
    let sandbox = fixture.session("traceback").await;
    let (outcome, output) = code(
        &fixture,
        &sandbox,
        Language::Python,
        "def f():\n    raise ValueError('boom')\nf()",
    )
    .await;
    assert!(!outcome.success(), "{output}");
    assert!(
        output.contains("Traceback (most recent call last)"),
        "{output}"
    );
    assert!(
        output.contains("File \"<msbd>\", line 3, in <module>"),
        "{output}"
    );
    assert!(output.contains("File \"<msbd>\", line 2, in f"), "{output}");
    assert!(output.contains("ValueError: boom"), "{output}");
    assert!(!output.contains("<string>"), "{output}");

    let (outcome, output) = code(&fixture, &sandbox, Language::Python, "x = (").await;
    assert!(!outcome.success(), "{output}");
    assert!(output.contains("File \"<msbd>\", line 1"), "{output}");
    assert!(output.contains("SyntaxError"), "{output}");
    assert!(
        !output.contains("<string>") && !output.contains("ast.py"),
        "{output}"
    );

    let (outcome, output) = code(
        &fixture,
        &sandbox,
        Language::Node,
        "function f() { throw new Error('boom'); }\nf();",
    )
    .await;
    assert!(!outcome.success(), "{output}");
    assert!(output.contains("Error: boom"), "{output}");
    assert!(output.contains("at f (<msbd>:1:"), "{output}");
    assert!(
        !output.contains("node:vm") && !output.contains("[eval]"),
        "{output}"
    );
}
