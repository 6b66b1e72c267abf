//! The per-session spawner (see `docs/sandboxing.md`): what runs of one session share, what
//! stays apart between sessions, and that a run's own guarantees (its tree killed at its end and
//! at its timeout) hold when a spawner forks it. Each test prints the isolation it ran under.

use std::time::Duration;

use sandbox_wrapper::backend::local::{IsolationLevel, LocalBackend, LocalConfig};
use sandbox_wrapper::backend::{
    EndReason, ExecControl, ExecOutcome, ExecRequest, ExitStatus, SandboxBackend, SandboxInfo,
};
use sandbox_wrapper::output::OutputSink;
use tokio_util::sync::CancellationToken;

use crate::local::{Fixture, eventually, fixture, marked_processes};

/// What pid 1 of a run's pid namespace shows when a spawner forked the run.
const SPAWNER_FLAG: &str = "--msbd-session-spawner";

/// Host processes whose command line contains `needle`.
fn processes_running(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline"))
            && String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(needle)
        {
            pids.push(pid);
        }
    }
    pids
}

/// The spawner's processes of a session (bubblewrap, its init, the spawner), by their marker.
fn spawner_processes(fixture: &Fixture, session: &str) -> Vec<i32> {
    marked_processes(&format!("{}/{session}/spawner", fixture.marker))
}

/// Whether this host runs sessions through spawners; when it should and does not, fails.
fn spawners_in_use(fixture: &Fixture) -> bool {
    if !fixture.offers(IsolationLevel::Strong, true, "session spawners") {
        return false;
    }
    assert!(
        fixture.backend.uses_session_spawners(),
        "strong isolation as root, and no session spawner: {:?}",
        fixture.backend.isolation_report()
    );
    true
}

/// Every command line in the run's pid namespace, one per line.
const LIST_PROCESSES: &str =
    "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f 2>/dev/null; echo; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_of_one_session_share_its_spawner_and_sessions_stay_apart() {
    let fixture = fixture();
    if !spawners_in_use(&fixture) {
        return;
    }
    let a = fixture.session("spawn-a").await;
    let b = fixture.session("spawn-b").await;
    let (outcome, text) = fixture.sh(&a, "tr '\\0' ' ' < /proc/1/cmdline").await;
    assert!(outcome.success(), "{outcome:?} {text}");
    assert!(text.contains(SPAWNER_FLAG), "pid 1 of a run: {text}");
    eprintln!("isolation: {}", outcome.isolation);
    // The spawner (pid 2, under bubblewrap's init) is not dumpable: a run of its own session
    // cannot open its descriptors or read its memory.
    let (_, text) = fixture
        .sh(
            &a,
            "tr '\\0' ' ' < /proc/2/cmdline; echo; ls /proc/2/fd > /dev/null 2>&1 && echo FDS-OPEN; head -c1 /proc/2/mem > /dev/null 2>&1 && echo MEM-OPEN; echo done",
        )
        .await;
    assert!(text.contains(SPAWNER_FLAG), "pid 2 of a run: {text}");
    assert!(
        !text.contains("FDS-OPEN") && !text.contains("MEM-OPEN"),
        "{text}"
    );

    let cancel = CancellationToken::new();
    let long = fixture.sh_with(
        &a,
        "exec sleep 4242",
        Some(Duration::from_secs(60)),
        cancel.clone(),
    );
    let checks = async {
        eventually("a's sleeper to start", || {
            !processes_running("sleep 4242").is_empty()
        })
        .await;
        // Runs of one session share its pid namespace: another run of a sees the sleeper...
        let (_, seen_by_a) = fixture.sh(&a, LIST_PROCESSES).await;
        // ... a run of b does not, and cannot signal it: `kill -9 -1` sends SIGKILL to every
        // process b may signal (b's own spawner among them).
        let (_, seen_by_b) = fixture.sh(&b, LIST_PROCESSES).await;
        let (killer, _) = fixture.sh(&b, "kill -9 -1; sleep 5").await;
        let alive_after_kill = !processes_running("sleep 4242").is_empty();
        // b lost its spawner to its own kill, and gets a new one.
        let (again, text) = fixture.sh(&b, "echo again").await;
        assert!(
            again.success() && text.contains("again"),
            "{again:?} {text}"
        );
        cancel.cancel();
        (seen_by_a, seen_by_b, killer, alive_after_kill)
    };
    let ((outcome, _), (seen_by_a, seen_by_b, killer, alive_after_kill)) =
        tokio::join!(long, checks);
    assert!(seen_by_a.contains("sleep 4242"), "{seen_by_a}");
    assert!(!seen_by_b.contains("sleep 4242"), "{seen_by_b}");
    assert_eq!(killer.exit, Some(ExitStatus::Signal(9)), "{killer:?}");
    assert!(alive_after_kill, "b's kill -9 -1 reached a's run");
    assert_eq!(outcome.reason, EndReason::Cancelled, "{outcome:?}");
    eventually("a's sleeper to be gone", || {
        processes_running("sleep 4242").is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_leftovers_die_at_its_end_and_at_its_timeout_and_the_spawner_lives_on() {
    let fixture = fixture();
    if !spawners_in_use(&fixture) {
        return;
    }
    let session = "spawn-left";
    let sandbox = fixture.session(session).await;
    // A grandchild in a session of its own, left behind by a run that exits at once.
    let (outcome, text) = fixture
        .sh(
            &sandbox,
            "setsid sh -c 'sleep 4343' & tr '\\0' ' ' < /proc/1/cmdline",
        )
        .await;
    assert!(outcome.success(), "{outcome:?} {text}");
    assert!(text.contains(SPAWNER_FLAG), "pid 1 of a run: {text}");
    let spawner = spawner_processes(&fixture, session);
    assert!(!spawner.is_empty(), "no spawner process found");
    eventually("the leftover to be killed with its run", || {
        processes_running("sleep 4343").is_empty()
    })
    .await;

    let (outcome, _) = fixture
        .sh_with(
            &sandbox,
            "setsid sh -c 'sleep 4344' & exec sleep 300",
            Some(Duration::from_millis(500)),
            CancellationToken::new(),
        )
        .await;
    assert_eq!(outcome.reason, EndReason::TimedOut { after_ms: 500 });
    eventually("the timed-out run's tree to be gone", || {
        processes_running("sleep 4344").is_empty()
    })
    .await;
    // Nothing of the runs is left, and the spawner is the same one.
    eventually("the runs' processes to be gone", || {
        marked_processes(&format!("{}/{session}", fixture.marker)).is_empty()
    })
    .await;
    assert_eq!(spawner_processes(&fixture, session), spawner);
    let (outcome, _) = fixture.sh(&sandbox, "true").await;
    assert!(outcome.success(), "{outcome:?}");
    assert_eq!(spawner_processes(&fixture, session), spawner);
    fixture.backend.stop(&sandbox).await.unwrap();
    eventually("the spawner to go with its session", || {
        spawner_processes(&fixture, session).is_empty()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_spawner_dies_reports_its_run_killed_and_gets_a_new_one() {
    let fixture = fixture();
    if !spawners_in_use(&fixture) {
        return;
    }
    let session = "spawn-dead";
    let sandbox = fixture.session(session).await;
    let cancel = CancellationToken::new();
    let long = fixture.sh_with(
        &sandbox,
        "exec sleep 4545",
        Some(Duration::from_secs(60)),
        cancel,
    );
    let kill = async {
        eventually("the sleeper to start", || {
            !processes_running("sleep 4545").is_empty()
        })
        .await;
        let spawner = spawner_processes(&fixture, session);
        assert!(!spawner.is_empty());
        for pid in &spawner {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        spawner
    };
    let ((outcome, text), old) = tokio::join!(long, kill);
    assert_eq!(outcome.exit, Some(ExitStatus::Signal(9)), "{outcome:?}");
    assert!(text.contains("spawner failed during the run"), "{text}");
    eventually("the run to be gone", || {
        processes_running("sleep 4545").is_empty()
    })
    .await;
    let (outcome, text) = fixture.sh(&sandbox, "tr '\\0' ' ' < /proc/1/cmdline").await;
    assert!(outcome.success(), "{outcome:?} {text}");
    assert!(text.contains(SPAWNER_FLAG), "pid 1 of a run: {text}");
    let new = spawner_processes(&fixture, session);
    assert!(!new.is_empty() && new.iter().all(|pid| !old.contains(pid)));
}

/// A backend like the fixture's, with the spawner switched off.
fn without_spawners(dir: &std::path::Path, marker: &str) -> LocalBackend {
    let mut config = LocalConfig::new(dir.join("data"), marker);
    config.landlock_shim = Some(crate::local::shim());
    config.session_spawner = false;
    LocalBackend::new(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switched_off_each_run_takes_a_bubblewrap_of_its_own() {
    let fixture = fixture();
    if !fixture.offers(IsolationLevel::Standard, false, "bubblewrap") {
        return;
    }
    let marker = format!("{}-off", fixture.marker);
    let backend = without_spawners(fixture.dir.path(), &marker);
    assert!(!backend.uses_session_spawners());
    let sandbox: SandboxInfo = backend
        .create(&sandbox_wrapper::backend::SandboxSpec {
            session_id: "no-spawner".into(),
            flavor: Default::default(),
            template: "python".into(),
            volumes: Vec::new(),
            network: Default::default(),
        })
        .await
        .unwrap();
    let other = Fixture {
        dir: tempfile::tempdir().unwrap(),
        backend: std::sync::Arc::new(backend),
        marker,
    };
    let (outcome, text) = other.sh(&sandbox, "tr '\\0' ' ' < /proc/1/cmdline").await;
    assert!(outcome.success(), "{outcome:?} {text}");
    assert!(!text.contains(SPAWNER_FLAG), "{text}");
    assert!(spawner_processes(&other, "no-spawner").is_empty());
}

/// Runs a request and returns its outcome and output.
async fn exec(
    backend: &LocalBackend,
    sandbox: &SandboxInfo,
    request: ExecRequest,
    out: &std::path::Path,
) -> (ExecOutcome, String) {
    let sink = OutputSink::create(out, 1 << 20).unwrap();
    let outcome = backend
        .exec(
            sandbox,
            request,
            &sink,
            ExecControl::new(CancellationToken::new()),
        )
        .await
        .unwrap();
    (outcome, std::fs::read_to_string(sink.path()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_reads_the_same_through_a_spawner_as_through_its_own_bubblewrap() {
    let fixture = fixture();
    if !spawners_in_use(&fixture) {
        return;
    }
    let plain = without_spawners(fixture.dir.path(), &format!("{}-plain", fixture.marker));
    let spec = sandbox_wrapper::backend::SandboxSpec {
        session_id: "same".into(),
        flavor: Default::default(),
        template: "python".into(),
        volumes: Vec::new(),
        network: Default::default(),
    };
    let spawned = fixture.backend.create(&spec).await.unwrap();
    let own = plain.create(&spec).await.unwrap();
    let sh = |script: &str| vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()];
    let requests = [
        ExecRequest {
            argv: sh(
                "read x; echo got $x; echo $FOO; [ \"$PWD\" = \"$HOME\" ] && echo at-home; echo oops >&2; exit 7",
            ),
            env: vec![("FOO".into(), "bar".into())],
            stdin: Some(b"hello\n".to_vec()),
            timeout: Some(Duration::from_secs(30)),
        },
        ExecRequest {
            argv: sh("kill -TERM $$"),
            ..ExecRequest::default()
        },
        ExecRequest {
            argv: sh("exit 130"),
            ..ExecRequest::default()
        },
        ExecRequest {
            argv: vec!["no-such-program-here".into()],
            ..ExecRequest::default()
        },
        ExecRequest {
            argv: vec!["/no/such/program".into()],
            ..ExecRequest::default()
        },
        // A script without `#!` runs under /bin/sh, as execvp runs it.
        ExecRequest {
            argv: sh("printf 'echo plain script $1\\n' > plain.sh; chmod +x plain.sh"),
            ..ExecRequest::default()
        },
        ExecRequest {
            argv: vec!["./plain.sh".into(), "one".into()],
            ..ExecRequest::default()
        },
        ExecRequest {
            argv: sh(
                "ulimit -n; ulimit -c; ulimit -f; cat /proc/self/status | grep -E '^(Cap|Seccomp|NoNewPrivs)'; ls -a /tmp | wc -l; (echo x > /etc/x) 2>/dev/null || echo no-etc",
            ),
            ..ExecRequest::default()
        },
    ];
    for (n, request) in requests.into_iter().enumerate() {
        let dir = fixture.dir.path();
        let (a, a_text) = exec(
            &fixture.backend,
            &spawned,
            request.clone(),
            &dir.join(format!("a{n}")),
        )
        .await;
        let (b, b_text) = exec(&plain, &own, request.clone(), &dir.join(format!("b{n}"))).await;
        eprintln!("{:?}: {a:?}\n{a_text}", request.argv);
        assert_eq!(
            (a.exit, a.reason, &a.isolation),
            (b.exit, b.reason, &b.isolation),
            "{:?}",
            request.argv
        );
        // stdout and stderr are two pipes: only the order of their lines may differ.
        let lines = |text: &str| {
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            lines.sort();
            lines
        };
        assert_eq!(lines(&a_text), lines(&b_text), "{:?}", request.argv);
    }
}

/// The spawner process itself (not its bubblewrap) of a session.
fn the_spawner(fixture: &Fixture, session: &str) -> i32 {
    let found: Vec<i32> = spawner_processes(fixture, session)
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.starts_with(b"/.msbd/shim\0--msbd-session-spawner\0"))
        })
        .collect();
    assert_eq!(found.len(), 1, "{found:?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_spawner_delays_runs_but_never_hangs_them() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let fixture = fixture();
    if !spawners_in_use(&fixture) {
        return;
    }
    let session = "spawn-stopped";
    let sandbox = fixture.session(session).await;
    let within = |what: &'static str| {
        move |ran: Result<(ExecOutcome, String), tokio::time::error::Elapsed>| {
            ran.unwrap_or_else(|_| panic!("{what} hung"))
        }
    };
    // Stopped while a run is under way: the run's end is still seen (from its pidfd), with its
    // status read from the zombie, and said.
    let run = fixture.sh(&sandbox, "sleep 1; exit 3");
    let stop = async {
        eventually("the run to start", || {
            !marked_processes(&format!("{}/{session}", fixture.marker)).is_empty()
        })
        .await;
        kill(
            Pid::from_raw(the_spawner(&fixture, session)),
            Signal::SIGSTOP,
        )
        .unwrap();
    };
    let (ran, ()) = tokio::join!(tokio::time::timeout(Duration::from_secs(20), run), stop);
    let (outcome, text) = within("the run under a stopped spawner")(ran);
    assert_eq!(outcome.exit, Some(ExitStatus::Code(3)), "{outcome:?}");
    assert!(text.contains("spawner failed during the run"), "{text}");
    // The next run gets a new spawner.
    let ran =
        tokio::time::timeout(Duration::from_secs(20), fixture.sh(&sandbox, "echo fresh")).await;
    let (outcome, text) = within("the run after")(ran);
    assert!(
        outcome.success() && text.contains("fresh"),
        "{outcome:?} {text}"
    );
    // Stopped between runs: the next run waits for its answer (10 s), then takes a bubblewrap
    // of its own.
    kill(
        Pid::from_raw(the_spawner(&fixture, session)),
        Signal::SIGSTOP,
    )
    .unwrap();
    let ran = tokio::time::timeout(
        Duration::from_secs(30),
        fixture.sh(&sandbox, "tr '\\0' ' ' < /proc/1/cmdline"),
    )
    .await;
    let (outcome, text) = within("the run with a stopped spawner")(ran);
    assert!(outcome.success(), "{outcome:?} {text}");
    assert!(!text.contains(SPAWNER_FLAG), "{text}");
    let ran = tokio::time::timeout(
        Duration::from_secs(20),
        fixture.sh(&sandbox, "tr '\\0' ' ' < /proc/1/cmdline"),
    )
    .await;
    let (outcome, text) = within("the run after that")(ran);
    assert!(
        outcome.success() && text.contains(SPAWNER_FLAG),
        "{outcome:?} {text}"
    );
}
