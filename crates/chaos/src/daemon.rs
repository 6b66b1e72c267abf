//! The msbd process under test: started on one data directory, killed with SIGKILL, started
//! again, stopped with SIGTERM at the end. Each start is a new generation with its own MCP
//! connection; callers whose connection was lost wait for the next generation.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::mcp::{CallError, Connection};

/// How to start msbd.
#[derive(Clone, Debug)]
pub(crate) struct DaemonConfig {
    /// The msbd binary.
    pub(crate) msbd: PathBuf,
    /// The environment it gets (on top of a cleaned copy of ours, without any `MSB_*`).
    pub(crate) env: Vec<(String, String)>,
    /// Where each generation's standard error goes (`msbd-<generation>.log`).
    pub(crate) log_dir: PathBuf,
}

/// The msbd process and its connection.
pub(crate) struct Daemon {
    config: DaemonConfig,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    child: Option<Child>,
    conn: Option<Arc<Connection>>,
    generation: u64,
    /// The current generation answered `initialize`.
    up: bool,
    /// The run is over: waiters give up.
    closed: bool,
    /// Every pid msbd ran as.
    pids: Vec<u32>,
}

impl Daemon {
    /// A daemon that is not started yet.
    pub(crate) fn new(config: DaemonConfig) -> Daemon {
        Daemon {
            config,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("daemon lock")
    }

    /// Starts a new generation of msbd (not initialized yet). Returns its generation number.
    pub(crate) fn spawn(&self) -> anyhow::Result<(u64, Arc<Connection>)> {
        let mut state = self.lock();
        anyhow::ensure!(state.child.is_none(), "msbd is already running");
        let generation = state.generation + 1;
        let log = self.config.log_dir.join(format!("msbd-{generation}.log"));
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(&self.config.msbd);
        command
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("MSB_") {
                command.env_remove(key);
            }
        }
        command.envs(self.config.env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", self.config.msbd.display()))?;
        let stdin = child.stdin.take().context("msbd's stdin")?;
        let stdout = child.stdout.take().context("msbd's stdout")?;
        let conn = Connection::new(stdin, stdout);
        state.pids.push(child.id());
        state.child = Some(child);
        state.conn = Some(Arc::clone(&conn));
        state.generation = generation;
        state.up = false;
        self.changed.notify_all();
        Ok((generation, conn))
    }

    /// Initializes a generation's connection; once it answers, callers get it.
    pub(crate) fn initialize(
        &self,
        generation: u64,
        conn: &Connection,
        timeout: Duration,
    ) -> Result<(), CallError> {
        conn.initialize(timeout)?;
        let mut state = self.lock();
        if state.generation == generation && state.child.is_some() {
            state.up = true;
            self.changed.notify_all();
        }
        Ok(())
    }

    /// SIGKILLs msbd and reaps it. Returns when it was killed, or `None` if it was not running
    /// (or had already exited: after a SIGTERM, say).
    pub(crate) fn kill(&self) -> Option<Instant> {
        let mut state = self.lock();
        let mut child = state.child.take()?;
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        let _ = child.kill();
        let killed = Instant::now();
        let _ = child.wait();
        if let Some(conn) = state.conn.take() {
            conn.close();
        }
        state.up = false;
        self.changed.notify_all();
        (!exited).then_some(killed)
    }

    /// Sends SIGTERM (a graceful shutdown starts) without waiting. Returns whether msbd was
    /// running.
    pub(crate) fn sigterm(&self) -> bool {
        let state = self.lock();
        let Some(child) = state.child.as_ref() else {
            return false;
        };
        let Ok(pid) = i32::try_from(child.id()) else {
            return false;
        };
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .is_ok()
    }

    /// Whether msbd exited on its own (not killed by us): its exit status and log, and the
    /// daemon is then marked down so that it can be started again.
    pub(crate) fn exited_on_its_own(&self) -> Option<(ExitStatus, PathBuf)> {
        let mut state = self.lock();
        let status = state.child.as_mut()?.try_wait().ok()??;
        state.child = None;
        if let Some(conn) = state.conn.take() {
            conn.close();
        }
        state.up = false;
        self.changed.notify_all();
        let log = self
            .config
            .log_dir
            .join(format!("msbd-{}.log", state.generation));
        Some((status, log))
    }

    /// The current connection once msbd is up, waiting up to `timeout`.
    pub(crate) fn current(&self, timeout: Duration) -> Option<(u64, Arc<Connection>)> {
        self.wait_for(0, timeout)
    }

    /// The connection of a generation after `generation`, once it is up, waiting up to
    /// `timeout`.
    pub(crate) fn wait_for(&self, after: u64, timeout: Duration) -> Option<(u64, Arc<Connection>)> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if state.up && state.generation > after {
                return state.conn.clone().map(|c| (state.generation, c));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .expect("daemon lock")
                .0;
        }
    }

    /// The generation now running.
    pub(crate) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Every pid msbd ran as.
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.lock().pids.clone()
    }

    /// Stops msbd gracefully: SIGTERM, then waits up to `timeout` for it to exit (SIGKILL after
    /// that). Returns its exit status and how long it took.
    pub(crate) fn terminate(&self, timeout: Duration) -> anyhow::Result<(ExitStatus, Duration)> {
        let mut state = self.lock();
        state.up = false;
        self.changed.notify_all();
        let mut child = state.child.take().context("msbd is not running")?;
        let conn = state.conn.take();
        drop(state);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).context("pid")?);
        let started = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).context("SIGTERM")?;
        loop {
            if let Some(status) = child.try_wait().context("waiting for msbd")? {
                if let Some(conn) = conn {
                    conn.close();
                }
                return Ok((status, started.elapsed()));
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!(
                    "msbd did not exit within {timeout:?} of SIGTERM (killed it; see its log)"
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends the run: every waiter gives up.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        self.changed.notify_all();
    }

    /// The log of a generation.
    pub(crate) fn log_path(&self, generation: u64) -> PathBuf {
        self.config.log_dir.join(format!("msbd-{generation}.log"))
    }
}

/// The last lines of a log file, for a failure message.
pub(crate) fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
