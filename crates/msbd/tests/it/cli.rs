//! The command-line client (`msbd task|queue|sessions|health`, docs/cli.md) against the built
//! `msbd serve --transport http` with a token: every command, its text and `--json` output,
//! its exit codes, a refused token and an unreachable address, and `task wait`'s progress bars
//! and `NO_COLOR` under a pseudo-terminal.
//!
//! They run the binary named by `MSBD_CLI_TEST_BINARY` when it is set (`cargo xtask ci` names
//! the release build there), else the debug build of this test run; each test prints which.

use std::io::Read as _;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{MSBD, wait_until};

/// The `msbd` under test: `MSBD_CLI_TEST_BINARY`, else this build's.
fn msbd() -> String {
    let binary = std::env::var("MSBD_CLI_TEST_BINARY").unwrap_or_else(|_| MSBD.to_owned());
    assert!(
        Path::new(&binary).is_file(),
        "MSBD_CLI_TEST_BINARY names {binary}, which is not a file: build it (`cargo build --release -p msbd`) or unset the variable"
    );
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| println!("the CLI tests run {binary}"));
    binary
}

const TOKEN: &str = "cli-token-0123456789abcdef";

/// A running `msbd serve --transport http`.
struct Daemon {
    /// Killed on drop.
    _child: tokio::process::Child,
    /// `127.0.0.1:PORT`.
    addr: String,
}

impl Daemon {
    async fn start(data_dir: &Path, extra_env: &[(&str, &str)]) -> Daemon {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let child = tokio::process::Command::new(msbd())
            .args(["serve", "--transport", "http", "--listen", &addr])
            .env("MSB_DATA_DIR", data_dir)
            .env("MSB_AUTH_TOKEN", TOKEN)
            .env(
                "MSB_LOG_LEVEL",
                std::env::var("MSBD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("MSB_SHUTDOWN_TIMEOUT", "5")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let ready = format!("http://{addr}/readyz");
        wait_until(Duration::from_secs(30), async || {
            match reqwest::get(&ready).await {
                Ok(response) if response.status() == 200 => Ok(()),
                Ok(response) => Err(format!("msbd never became ready: {}", response.status())),
                Err(error) => Err(format!("msbd never became ready: {error}")),
            }
        })
        .await;
        Daemon {
            _child: child,
            addr,
        }
    }

    /// `msbd ARGS` as the command line, with this daemon's address and token in the
    /// environment (and neither `NO_COLOR` nor `COLUMNS`).
    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(msbd());
        command
            .args(args)
            .env("MSB_HTTP_ADDR", &self.addr)
            .env("MSB_AUTH_TOKEN", TOKEN)
            .env_remove("NO_COLOR")
            .env_remove("COLUMNS")
            .stdin(Stdio::null());
        command
    }

    /// Runs `msbd ARGS` (at most two minutes).
    async fn run(&self, args: &[&str]) -> Run {
        let output = tokio::time::timeout(Duration::from_secs(120), self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("msbd {args:?} did not end within 2 minutes"))
            .unwrap();
        Run::from(args, output)
    }

    /// `msbd ARGS`, which must succeed.
    async fn ok(&self, args: &[&str]) -> Run {
        let run = self.run(args).await;
        assert_eq!(run.code, 0, "{run}");
        run
    }

    /// `msbd ARGS --json`, which must succeed: its JSON.
    async fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let run = self.ok(&args).await;
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {run}"))
    }

    /// Submits a command task: its id.
    async fn submit(&self, command: &str) -> String {
        let run = self.ok(&["task", "submit", "--", command]).await;
        let id = run.stdout.trim().to_owned();
        assert_eq!(id.len(), 36, "{run}");
        id
    }

    /// Polls `task show --json` until the task is in `status`.
    async fn wait_status(&self, id: &str, status: &str) -> Value {
        wait_until(Duration::from_secs(60), async || {
            let view = self.json(&["task", "show", id]).await;
            if view["status"] == status {
                Ok(view)
            } else {
                Err(format!("task {id} is not {status}: {view}"))
            }
        })
        .await
    }
}

/// What a run of the command line gave.
struct Run {
    args: String,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(args: &[&str], output: Output) -> Run {
        Run {
            args: args.join(" "),
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "msbd {}: exit {}\n--- stdout\n{}--- stderr\n{}",
            self.args, self.code, self.stdout, self.stderr
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_task_command_against_a_running_msbd() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]).await;

    // submit: the id alone on stdout; --json: submit_task's answer.
    let quick = daemon.submit("echo quick").await;
    let submitted = daemon
        .json(&[
            "task",
            "submit",
            "--tag",
            "cli",
            "-p",
            "command=echo tagged",
        ])
        .await;
    assert_eq!(submitted["status"], "pending", "{submitted}");
    let tagged = submitted["task_id"].as_str().unwrap().to_owned();
    // A usage error of our own: exit 2, nothing submitted.
    let nothing = daemon.run(&["task", "submit"]).await;
    assert_eq!(nothing.code, 2, "{nothing}");
    assert!(nothing.stderr.contains("nothing to run"), "{nothing}");
    // msbd's refusal of the arguments: its text, exit 2.
    let refused = daemon
        .run(&["task", "submit", "--type", "shell", "-p", "x=1"])
        .await;
    assert_eq!(refused.code, 2, "{refused}");
    assert!(
        refused.stderr.contains("Error INVALID_TASK_TYPE")
            && refused.stderr.contains("What to do:"),
        "{refused}"
    );

    // logs -f of a task that prints lines over 2 s: every line, and it ends with the task.
    let lines = daemon
        .submit("for i in 1 2 3 4 5; do echo line$i; sleep 0.4; done")
        .await;
    let started = Instant::now();
    let logs = daemon.ok(&["task", "logs", "-f", &lines]).await;
    assert_eq!(logs.stdout, "line1\nline2\nline3\nline4\nline5\n", "{logs}");
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "logs -f returned before the task could have printed its lines: {:?}",
        started.elapsed()
    );
    let view = daemon.json(&["task", "show", &lines]).await;
    assert_eq!(view["status"], "completed", "{view}");
    // Without -f: what there is; --stream picks one stream.
    let both = daemon.submit("echo out; echo err >&2").await;
    daemon.wait_status(&both, "completed").await;
    let stderr = daemon
        .ok(&["task", "logs", &both, "--stream", "stderr"])
        .await;
    assert_eq!(stderr.stdout, "err\n", "{stderr}");
    let combined = daemon.ok(&["task", "logs", &both]).await;
    assert!(
        combined.stdout.contains("out\n") && combined.stdout.contains("err\n"),
        "{combined}"
    );

    // list: a table with a header and every task, not cut off a terminal; --json: list_tasks.
    daemon.wait_status(&quick, "completed").await;
    let table = daemon.ok(&["task", "list"]).await;
    let header = table.stdout.lines().next().unwrap();
    for column in ["ID", "TYPE", "STATUS", "DONE", "CREATED", "MESSAGE"] {
        assert!(header.contains(column), "{table}");
    }
    let row = table
        .stdout
        .lines()
        .find(|line| line.starts_with(&quick))
        .unwrap_or_else(|| panic!("{quick} is not listed: {table}"));
    assert!(row.contains("completed") && row.contains("100%"), "{table}");
    // The columns are aligned: STATUS starts at the same place on every line.
    let at = header.find("STATUS").unwrap();
    assert!(row[at..].starts_with("completed"), "{table}");
    assert!(
        !table.stdout.contains('\x1b'),
        "colour off a terminal: {table}"
    );
    let listed = daemon.json(&["task", "list", "--tag", "cli"]).await;
    assert_eq!(listed["count"], 1, "{listed}");
    assert_eq!(listed["tasks"][0]["task_id"], tagged.as_str(), "{listed}");
    let page = daemon.json(&["task", "list", "--limit", "2"]).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let next = daemon
        .json(&["task", "list", "--limit", "2", "--cursor", &cursor])
        .await;
    assert_ne!(next["tasks"][0]["task_id"], page["tasks"][0]["task_id"]);
    let more = daemon.ok(&["task", "list", "--limit", "2"]).await;
    assert!(
        more.stderr.contains(&format!("--cursor {cursor}")),
        "{more}"
    );

    // show: a readable layout with the result.
    let show = daemon.ok(&["task", "show", &quick]).await;
    for expected in [
        format!("task        {quick}"),
        "status      completed, 100% done".to_owned(),
        "attempt     1 of 1".to_owned(),
        "result      exit code 0".to_owned(),
        "  quick".to_owned(),
    ] {
        assert!(show.stdout.contains(&expected), "{expected:?} in {show}");
    }
    let missing = daemon
        .run(&["task", "show", "01a24dac-0000-7000-8000-000000000000"])
        .await;
    assert_eq!(missing.code, 4, "{missing}");
    assert!(
        missing.stderr.starts_with("Error TASK_NOT_FOUND: ")
            && missing.stderr.contains("\nWhat to do: "),
        "{missing}"
    );

    // wait on three tasks, one of which fails: a line per status change, exit code 1.
    let one = daemon.submit("sleep 1; echo one").await;
    let failing = daemon.submit("sleep 0.5; echo broken >&2; exit 3").await;
    let three = daemon.submit("echo three").await;
    let waited = daemon.run(&["task", "wait", &one, &failing, &three]).await;
    assert_eq!(waited.code, 1, "{waited}");
    assert!(
        waited.stdout.contains(&format!("{one}: completed\n"))
            && waited.stdout.contains(&format!("{three}: completed\n"))
            && waited
                .stdout
                .contains(&format!("{failing}: failed: exit code 3")),
        "{waited}"
    );
    for line in waited.stdout.lines() {
        assert!(
            [&one, &failing, &three]
                .iter()
                .any(|id| line.starts_with(id.as_str())),
            "a line that is not a status change: {line:?} in {waited}"
        );
    }
    // Each status is printed once per task at most.
    let completed_lines = waited
        .stdout
        .lines()
        .filter(|l| l == &format!("{one}: completed"))
        .count();
    assert_eq!(completed_lines, 1, "{waited}");
    let all_good = daemon.run(&["task", "wait", &one, &three]).await;
    assert_eq!(all_good.code, 0, "{all_good}");
    let as_json = daemon
        .run(&["task", "wait", &one, &failing, "--json"])
        .await;
    assert_eq!(as_json.code, 1, "{as_json}");
    let as_json: Value = serde_json::from_str(&as_json.stdout).unwrap();
    assert_eq!(
        (as_json["done"].as_bool(), as_json["finished"].as_u64()),
        (Some(true), Some(2))
    );

    // submit --wait: the id, the status changes, the outcome as exit code.
    let submitted = daemon
        .run(&["task", "submit", "--wait", "--", "echo hello; exit 4"])
        .await;
    assert_eq!(submitted.code, 1, "{submitted}");
    let id = submitted.stdout.lines().next().unwrap();
    assert_eq!(id.len(), 36, "{submitted}");
    assert!(
        submitted
            .stdout
            .contains(&format!("{id}: failed: exit code 4")),
        "{submitted}"
    );
    let help = daemon.ok(&["task", "wait", "--help"]).await;
    assert!(
        help.stdout.contains("6  `task wait --timeout` ran out"),
        "{help}"
    );

    // retry of the failed task: a new id, tagged retry_of.
    let retried = daemon.ok(&["task", "retry", &failing]).await;
    let new_id = retried.stdout.trim();
    assert_eq!(new_id.len(), 36, "{retried}");
    assert_ne!(new_id, failing);
    let view = daemon.json(&["task", "show", new_id]).await;
    assert!(
        view["tags"]
            .as_array()
            .unwrap()
            .contains(&Value::String(format!("retry_of:{failing}"))),
        "{view}"
    );
    // Retrying a completed task is msbd's refusal: exit 5.
    let illegal = daemon.run(&["task", "retry", &quick]).await;
    assert_eq!(illegal.code, 5, "{illegal}");
    assert!(
        illegal.stderr.contains("Error ILLEGAL_TRANSITION"),
        "{illegal}"
    );

    // cancel: the status becomes cancelled; wait then exits 1.
    let long = daemon.submit("sleep 60").await;
    daemon.wait_status(&long, "running").await;
    let cancel = daemon.ok(&["task", "cancel", &long]).await;
    assert!(cancel.stdout.contains(&long), "{cancel}");
    daemon.wait_status(&long, "cancelled").await;
    let waited = daemon.run(&["task", "wait", &long]).await;
    assert_eq!(waited.code, 1, "{waited}");
    assert!(
        waited.stdout.contains(&format!("{long}: cancelled")),
        "{waited}"
    );
    // A wait that runs out: exit 6.
    let sleeper = daemon.submit("sleep 60").await;
    let timed_out = daemon
        .run(&["task", "wait", &sleeper, "--timeout", "0.5"])
        .await;
    assert_eq!(timed_out.code, 6, "{timed_out}");
    assert!(
        timed_out.stderr.contains("--timeout ran out"),
        "{timed_out}"
    );
    daemon.ok(&["task", "cancel", &sleeper]).await;

    // queue: pause, stats, resume.
    let paused = daemon.ok(&["queue", "pause"]).await;
    assert!(paused.stdout.contains("paused"), "{paused}");
    let stats = daemon.json(&["queue", "stats"]).await;
    assert_eq!(stats["queue_statistics"]["queue_paused"], true, "{stats}");
    let held = daemon.submit("echo held").await;
    let stats = daemon.ok(&["queue", "stats"]).await;
    assert!(
        stats.stdout.contains("queue        paused") && stats.stdout.contains("queued       1"),
        "{stats}"
    );
    daemon.ok(&["queue", "resume"]).await;
    let stats = daemon.json(&["queue", "stats"]).await;
    assert_eq!(stats["queue_statistics"]["queue_paused"], false, "{stats}");
    daemon.ok(&["task", "wait", &held]).await;

    // sessions: the tasks' sessions, as a table and as JSON.
    let sessions = daemon.json(&["sessions"]).await;
    assert!(sessions["count"].as_u64().unwrap() >= 1, "{sessions}");
    let session = sessions["sessions"][0]["session_id"].as_str().unwrap();
    let table = daemon.ok(&["sessions"]).await;
    assert!(
        table.stdout.starts_with("SESSION") && table.stdout.contains(session),
        "{table}"
    );
    let unknown = daemon
        .run(&["sessions", "--session", "snosuchsession"])
        .await;
    assert_eq!(unknown.code, 4, "{unknown}");

    // health: without the supervision tools (HTTP's default), from /healthz with the token.
    let health = daemon.ok(&["health"]).await;
    assert!(
        health.stdout.starts_with("msbd is healthy")
            || health.stdout.starts_with("msbd is degraded"),
        "{health}"
    );
    let health = daemon.json(&["health"]).await;
    assert!(health["not_healthy"].is_object(), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_an_unreachable_address_and_the_health_tool() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[("MSB_SUPERVISION_TOOLS", "true")]).await;
    let wrong = daemon
        .run(&["task", "list", "--token", "not-the-token"])
        .await;
    assert_eq!(wrong.code, 3, "{wrong}");
    assert!(
        wrong.stderr.contains("refused the token") && wrong.stderr.contains("MSB_AUTH_TOKEN"),
        "{wrong}"
    );
    let none = daemon
        .command(&["sessions"])
        .env_remove("MSB_AUTH_TOKEN")
        .output()
        .await
        .unwrap();
    let none = Run::from(&["sessions"], none);
    assert_eq!(none.code, 3, "{none}");
    assert!(none.stderr.contains("none was given"), "{none}");

    // Nothing listens on a port just released.
    let free = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let unreachable = daemon
        .run(&["queue", "stats", "--addr", &free.to_string()])
        .await;
    assert_eq!(unreachable.code, 3, "{unreachable}");
    assert!(
        unreachable
            .stderr
            .contains(&format!("msbd is not reachable at http://{free}"))
            && unreachable.stderr.contains("msbd serve --transport http")
            && unreachable.stderr.contains("MSB_HTTP_ADDR"),
        "{unreachable}"
    );
    let bad_addr = daemon
        .run(&["health", "--addr", "https://example.com"])
        .await;
    assert_eq!(bad_addr.code, 2, "{bad_addr}");
    let bad_flag = daemon.run(&["task", "list", "--no-such-flag"]).await;
    assert_eq!(bad_flag.code, 2, "{bad_flag}");
    let help = daemon.ok(&["task", "--help"]).await;
    assert!(help.stdout.contains("Exit codes:"), "{help}");

    // With the supervision tools, health is health_check's report.
    let health = daemon.json(&["health"]).await;
    assert!(health["components"]["task_engine"].is_object(), "{health}");
    let text = daemon.ok(&["health"]).await;
    assert!(text.stdout.contains("task_engine"), "{text}");
}

/// Runs `msbd ARGS` on a pseudo-terminal of `columns` columns (stdin, stdout and stderr):
/// its exit code and everything it wrote.
fn run_on_terminal(
    daemon: &Daemon,
    args: &[&str],
    columns: u16,
    env: &[(&str, &str)],
) -> (i32, String) {
    let size = nix::pty::Winsize {
        ws_row: 40,
        ws_col: columns,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(&size, None).unwrap();
    let mut command = std::process::Command::new(msbd());
    command
        .args(args)
        .env("MSB_HTTP_ADDR", &daemon.addr)
        .env("MSB_AUTH_TOKEN", TOKEN)
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .env_remove("COLUMNS")
        .envs(env.iter().copied())
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::from(pty.slave.try_clone().unwrap()))
        .stderr(Stdio::from(pty.slave));
    let mut child = command.spawn().unwrap();
    drop(command);
    // The command's copies of the terminal are closed now: reading ends (EIO) once the child
    // has exited.
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            match master.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buffer[..n]),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let status = crate::common::wait_until_blocking(Duration::from_secs(120), || {
        match child.try_wait().unwrap() {
            Some(status) => Ok(status),
            None => Err(format!("msbd {args:?} is still running on the terminal")),
        }
    });
    (status.code().unwrap_or(-1), reader.join().unwrap())
}

/// Text without ANSI escape sequences.
fn without_escapes(text: &str) -> String {
    let mut plain = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_wait_draws_progress_bars_and_no_color_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path(), &[]).await;
    let id = daemon
        .submit("for p in 20 40 60 80; do echo \"::progress:: $p stepping\"; sleep 0.4; done")
        .await;
    let (code, seen) =
        tokio::task::block_in_place(|| run_on_terminal(&daemon, &["task", "wait", &id], 120, &[]));
    assert_eq!(code, 0, "{seen}");
    // A bar: the id, brackets with = inside, a percentage, the progress message, redrawn in
    // place with escape sequences; then the outcome line.
    assert!(seen.contains(&id), "{seen:?}");
    assert!(seen.contains("stepping"), "the progress message: {seen:?}");
    assert!(seen.contains("[====="), "a bar: {seen:?}");
    assert!(seen.contains("100%"), "{seen:?}");
    assert!(
        seen.contains('\x1b') || seen.contains('\r'),
        "redrawn in place: {seen:?}"
    );
    assert!(
        without_escapes(&seen).contains(&format!("\n{id}: completed")),
        "the outcome, on a line of its own: {seen:?}"
    );

    // Colours on a terminal, none with NO_COLOR; the table fits the terminal's width.
    let (code, coloured) =
        tokio::task::block_in_place(|| run_on_terminal(&daemon, &["task", "list"], 80, &[]));
    assert_eq!(code, 0, "{coloured}");
    assert!(
        coloured.contains("\x1b[32mcompleted\x1b[0m"),
        "{coloured:?}"
    );
    for line in without_escapes(&coloured).lines() {
        assert!(
            line.trim_end_matches('\r').chars().count() <= 80,
            "{line:?} is wider than 80"
        );
    }
    assert!(coloured.contains(&id), "ids are never cut: {coloured:?}");
    let (code, plain) = tokio::task::block_in_place(|| {
        run_on_terminal(&daemon, &["task", "list"], 80, &[("NO_COLOR", "1")])
    });
    assert_eq!(code, 0, "{plain}");
    assert!(plain.contains("completed"), "{plain:?}");
    assert!(!plain.contains('\x1b'), "NO_COLOR: {plain:?}");
}
