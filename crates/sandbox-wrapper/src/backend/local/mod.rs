//! The `local` backend: processes on this host, in a private work directory per session, under
//! the strongest isolation the host offers, detected at start.
//!
//! The layers, strongest first (see `docs/sandboxing.md` for what each one stops):
//! - **cgroups**: memory, process-count and CPU limits per session (the flavor's), and a group
//!   per run so that a timeout or cancel kills the whole tree, escapees included, and a pause
//!   freezes it (v2 where it has controllers, else v1, with a controller-less v2 tree used for
//!   `cgroup.kill` and `cgroup.freeze` where it exists);
//! - **an unprivileged uid** (65534 by default) when msbd runs as root: bubblewrap started as root
//!   would keep every capability inside, so the uid is dropped before bubblewrap runs;
//! - **bubblewrap**: new user, network, pid, mount, ipc and uts namespaces (no network at all), the
//!   host's system read-only, private `/tmp`, `/dev` and `/proc`, `/run` and msbd's data directory
//!   hidden, only the work directory and the volumes writable;
//! - **seccomp**: mounting, module loading, ptrace, namespaces, keyrings, BPF, io_uring and clock
//!   changes refused (loaded by bubblewrap just before the program, or directly without it);
//! - **Landlock** when bubblewrap is absent: writes only in the work directory, no TCP, no
//!   signals or abstract sockets outside the sandbox. A Landlock domain forbids `mount`, which
//!   bubblewrap needs, so the two are not stacked: bubblewrap's mount namespace does that job;
//! - **rlimits** (open files, file size, core dumps; address space when no memory cgroup), a new
//!   session and a parent-death signal, always.
//!
//! Where bubblewrap, the shim and tree-killing cgroups are all there, a session's `command` runs
//! are forked by one spawner living inside the session's sandbox (see `spawner`), each still in
//! a cgroup of its own, instead of each starting a bubblewrap.
//!
//! Each missing layer falls back to the next; [`LocalBackend::isolation_report`] says which ran.

mod cgroup;
mod repl;
mod run_clock;
pub mod shim;
mod spawn;
mod spawner;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::resource::Resource;
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::cgroup::{Cgroups, Group, Limits};
use self::run_clock::RunClock;
use super::{
    BackendError, BoxFuture, EndReason, ExecControl, ExecOutcome, ExecRequest, ExitStatus, Flavor,
    Language, ReplRequest, SandboxBackend, SandboxInfo, SandboxMetrics, SandboxSpec, SweepReport,
    VolumeMapping,
};
use crate::network::{Network, NetworkMode, PROXY_PORT};
use crate::output::{OutputSink, Stream};

/// How much isolation to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IsolationMode {
    /// The strongest the host offers (the default).
    #[default]
    Strongest,
    /// None at all: processes run as msbd's user, with only a new session and the work
    /// directory. For tests and benchmarks that measure the cost of isolation; never for use.
    Off,
}

/// The local backend's configuration.
#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// msbd's data directory (the seccomp program is written there).
    pub data_dir: PathBuf,
    /// The directory that holds the sessions' workspaces; `None`:
    /// [`LocalConfig::sandbox_dir`] picks it.
    pub sandbox_dir: Option<PathBuf>,
    /// This instance's marker, carried by everything it creates (cgroups `msbd-<marker>`,
    /// directories, the `MSBD_SANDBOX` variable of every process), so that the orphan sweep
    /// removes only this instance's leftovers. Keep it stable across restarts of one instance.
    pub instance_marker: String,
    /// How much isolation to use.
    pub isolation: IsolationMode,
    /// When msbd runs as root, each session runs as its own unprivileged user and group, taken
    /// from `sandbox_uid_base .. sandbox_uid_base + sandbox_uid_count` (uid = gid), so that no
    /// session can read another's files whatever else is missing.
    pub sandbox_uid_base: u32,
    /// See `sandbox_uid_base`.
    pub sandbox_uid_count: u32,
    /// The bubblewrap program; `None` looks for `bwrap` in the usual places.
    pub bwrap: Option<PathBuf>,
    /// Host directories bound into every sandbox.
    pub volumes: Vec<VolumeMapping>,
    /// A program that calls [`shim::run_if_requested`] first thing (`msbd`, or this crate's
    /// `msbd-sandbox-shim`), run by bubblewrap to stack Landlock under it. `None`: Landlock is
    /// used only where bubblewrap is missing.
    pub landlock_shim: Option<PathBuf>,
    /// Network for sandboxes: the operator's settings, which the proxy of each session of
    /// policy `allow` follows, and the proxy's counts.
    pub network: Arc<Network>,
    /// Whether each session's `command` runs are forked by a spawner living inside the
    /// session's sandbox (see `docs/sandboxing.md`), where the host allows it (bubblewrap, the
    /// shim, cgroups that kill and freeze a tree); `false`: a bubblewrap per run.
    pub session_spawner: bool,
}

impl LocalConfig {
    /// A configuration with the defaults: strongest isolation, a uid per session from 200000.
    pub fn new(data_dir: impl Into<PathBuf>, instance_marker: impl Into<String>) -> LocalConfig {
        LocalConfig {
            data_dir: data_dir.into(),
            sandbox_dir: None,
            instance_marker: instance_marker.into(),
            isolation: IsolationMode::Strongest,
            sandbox_uid_base: 200_000,
            sandbox_uid_count: 65_536,
            bwrap: None,
            volumes: Vec::new(),
            landlock_shim: None,
            network: Network::new(crate::network::NetworkSettings::default()),
            session_spawner: true,
        }
    }

    /// Whether sandboxes run as users of their own: msbd is root and isolation is on.
    pub fn drops_uid(&self) -> bool {
        self.isolation != IsolationMode::Off
            && self.sandbox_uid_count > 0
            && nix::unistd::geteuid().is_root()
    }

    /// The directory that holds the sessions' workspaces: the one set, else
    /// `<data_dir>/sandboxes`, unless sandboxes run as users of their own and one of the data
    /// directory's parents lets no other user pass through (`/root`, mode 0700): then
    /// [`FALLBACK_SANDBOX_ROOT`]`/<instance marker>`, so that bubblewrap, which runs as the
    /// sandbox's user, can reach every workspace.
    pub fn sandbox_dir(&self) -> PathBuf {
        if let Some(dir) = &self.sandbox_dir {
            return dir.clone();
        }
        let data_dir = self
            .data_dir
            .canonicalize()
            .unwrap_or_else(|_| self.data_dir.clone());
        if self.drops_uid() && closed_to_others(&data_dir).is_some() {
            Path::new(FALLBACK_SANDBOX_ROOT).join(&self.instance_marker)
        } else {
            data_dir.join("sandboxes")
        }
    }
}

/// Where the workspaces go when the data directory lies behind a directory that other users
/// cannot pass through (see [`LocalConfig::sandbox_dir`]).
pub const FALLBACK_SANDBOX_ROOT: &str = "/var/lib/msbd-sandboxes";

/// A directory on the way to a path that users other than its owner and group cannot pass
/// through (no search bit for others), with its mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedDirectory {
    /// The directory.
    pub path: PathBuf,
    /// Its permission bits.
    pub mode: u32,
}

impl std::fmt::Display for ClosedDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (mode {:04o}) lets no other user pass through",
            self.path.display(),
            self.mode
        )
    }
}

/// The first existing directory strictly above `path` (absolute) that other users cannot pass
/// through. Sandboxes run as users of their own when msbd is root: bubblewrap, started as that
/// user, must resolve the workspace's path itself.
pub fn closed_to_others(path: &Path) -> Option<ClosedDirectory> {
    let components = path.components().count();
    first_closed(path, components.saturating_sub(1))
}

/// The first existing directory from the root down to `dir` itself (absolute) that other users
/// cannot pass through: whether they can reach what is inside `dir`.
pub fn closed_on_the_way_into(dir: &Path) -> Option<ClosedDirectory> {
    first_closed(dir, dir.components().count())
}

/// The first of the first `depth` directories along `path` that other users cannot pass.
fn first_closed(path: &Path, depth: usize) -> Option<ClosedDirectory> {
    use std::os::unix::fs::PermissionsExt;
    let mut current = PathBuf::new();
    for component in path.components().take(depth) {
        current.push(component);
        let Ok(meta) = std::fs::metadata(&current) else {
            return None;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if meta.is_dir() && mode & 0o001 == 0 {
            return Some(ClosedDirectory {
                path: current,
                mode,
            });
        }
    }
    None
}

/// How strong the isolation in use is, in one word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IsolationLevel {
    /// Isolation switched off (tests and benchmarks only).
    Off,
    /// Only process-level measures (new session, rlimits): nothing restricts files or network.
    Minimal,
    /// Files and network are restricted (bubblewrap or Landlock), but a layer of the strong level
    /// is missing (cgroups, or the uid drop).
    Standard,
    /// cgroups (limits, whole-tree kill), an unprivileged uid, bubblewrap namespaces and seccomp.
    Strong,
}

impl IsolationLevel {
    /// Its name: `off`, `minimal`, `standard` or `strong`.
    pub fn name(self) -> &'static str {
        match self {
            IsolationLevel::Off => "off",
            IsolationLevel::Minimal => "minimal",
            IsolationLevel::Standard => "standard",
            IsolationLevel::Strong => "strong",
        }
    }
}

impl std::fmt::Display for IsolationLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What isolation the local backend uses, and why not more.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationReport {
    /// The level, in one word.
    pub level: IsolationLevel,
    /// The layers in use, as `+`-joined words.
    pub layers: String,
    /// Layers that are missing, each with why.
    pub missing: Vec<String>,
}

/// The local backend. Cheap to share behind an `Arc`.
pub struct LocalBackend {
    config: LocalConfig,
    /// Where the sessions' workspaces are (resolved, absolute).
    sandbox_root: PathBuf,
    cgroups: Cgroups,
    /// Whether processes run as per-session unprivileged users (msbd is root).
    drop_uid: bool,
    /// The uid offsets in use by live sessions.
    uids: Mutex<std::collections::BTreeSet<u32>>,
    /// Held by `create` and by the orphan sweep, so that a sweep never removes a session made
    /// while it runs.
    lifecycle: tokio::sync::Mutex<()>,
    bwrap: Option<PathBuf>,
    seccomp_file: Option<PathBuf>,
    seccomp: Option<seccompiler::BpfProgram>,
    landlock: bool,
    /// The Landlock shim in use under bubblewrap.
    shim: Option<PathBuf>,
    report: IsolationReport,
    sandboxes: Mutex<HashMap<String, Arc<LocalSandbox>>>,
    next_run: AtomicU64,
    /// Whether `command` runs go through a spawner per session (see [`spawner`]).
    spawners: bool,
}

struct LocalSandbox {
    info: SandboxInfo,
    work_dir: PathBuf,
    /// The user and group its processes run as (when msbd is root), and its uid offset.
    uid: Option<(Uid, Gid, u32)>,
    /// Its network (loopback only, or the host's under policy `host`), IPC and UTS namespaces,
    /// when msbd can make them (root).
    netns: Option<spawn::SessionNamespaces>,
    /// Its network mode.
    network: NetworkMode,
    /// Its proxy (policy `allow`), served until the sandbox is dropped.
    proxy: Option<AbortOnDrop>,
    group: Option<Group>,
    limits: Limits,
    /// The session's interpreters, one per language; a call holds its language's lock.
    interpreters: HashMap<Language, tokio::sync::Mutex<Option<repl::Interpreter>>>,
    /// The session's spawner, started by its first `command` run.
    spawner: tokio::sync::Mutex<SpawnerSlot>,
}

/// A session's spawner, and how many starts of it failed in a row.
#[derive(Default)]
struct SpawnerSlot {
    current: Option<Arc<spawner::SessionSpawner>>,
    failed_starts: u32,
}

/// After this many failed starts in a row, a session's runs each take a bubblewrap of their own.
const SPAWNER_STARTS: u32 = 3;

/// A spawned task aborted when this is dropped (a session's proxy ends with its sandbox).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The processes a session may hold at once, per flavor.
fn pids_limit(flavor: Flavor) -> u64 {
    256 * u64::from(flavor.cpus())
}

const ENV_MARKER: &str = "MSBD_SANDBOX";

/// The work directory, and the session in the marker, of the probe run at start: not a valid
/// session id, so that it never names a session.
const PROBE_SESSION: &str = ".probe";

impl LocalBackend {
    /// Detects what the host offers and prepares the backend. Fails only when the data
    /// directory cannot be used.
    pub fn new(config: LocalConfig) -> Result<LocalBackend, BackendError> {
        if config.instance_marker.is_empty()
            || !config
                .instance_marker
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(BackendError::InvalidRequest(format!(
                "instance marker {:?} must be non-empty letters, digits, '-' or '_'",
                config.instance_marker
            )));
        }
        for volume in &config.volumes {
            check_volume(volume)?;
        }
        let mut config = config;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| BackendError::io(format!("creating {}", config.data_dir.display()), e))?;
        // bubblewrap resolves relative paths inside the sandbox: work with absolute ones.
        config.data_dir = config
            .data_dir
            .canonicalize()
            .map_err(|e| BackendError::io(format!("resolving {}", config.data_dir.display()), e))?;
        let root = config.sandbox_dir();
        std::fs::create_dir_all(&root)
            .map_err(|e| BackendError::io(format!("creating {}", root.display()), e))?;
        set_mode(&root, 0o711)?;
        let root = root
            .canonicalize()
            .map_err(|e| BackendError::io(format!("resolving {}", root.display()), e))?;
        if root.starts_with(&config.data_dir) {
            // Sandbox users pass through the data directory to their workspaces.
            for dir in root
                .ancestors()
                .take_while(|d| d.starts_with(&config.data_dir))
            {
                set_mode(dir, 0o711)?;
            }
        } else if let Some(parent) = root.parent()
            && parent == Path::new(FALLBACK_SANDBOX_ROOT)
        {
            set_mode(parent, 0o711)?;
        }
        config.sandbox_dir = Some(root.clone());
        if config.drops_uid()
            && let Some(shim) = config.landlock_shim.clone()
            && reachable_program(&shim).is_err()
        {
            // bubblewrap binds the shim into the sandbox as the sandbox's user: a copy it can
            // reach, made anew at every start.
            config.landlock_shim = Some(copy_shim(&shim, &root, &config.instance_marker)?);
        }
        let mut backend = LocalBackend {
            sandbox_root: root,
            cgroups: Cgroups::none(),
            drop_uid: false,
            uids: Mutex::new(std::collections::BTreeSet::new()),
            lifecycle: tokio::sync::Mutex::new(()),
            bwrap: None,
            seccomp_file: None,
            seccomp: None,
            landlock: false,
            shim: None,
            report: IsolationReport {
                level: IsolationLevel::Off,
                layers: "setsid".into(),
                missing: vec!["everything: isolation is switched off".into()],
            },
            sandboxes: Mutex::new(HashMap::new()),
            next_run: AtomicU64::new(1),
            spawners: false,
            config,
        };
        // Orphans of its sandboxes (bubblewrap's init, killed background processes) come back to
        // this process to be reaped, rather than piling up as zombies under a slow init.
        spawn::become_subreaper();
        if backend.config.isolation == IsolationMode::Off {
            return Ok(backend);
        }
        backend.detect();
        Ok(backend)
    }

    fn detect(&mut self) {
        let mut missing = Vec::new();
        let root = nix::unistd::geteuid().is_root();
        self.cgroups = Cgroups::detect(&self.config.instance_marker);
        if !self.cgroups.any() {
            missing.push("cgroups: no writable cgroup hierarchy (run as root for limits and whole-tree kill)".into());
        }
        self.drop_uid = root && self.config.sandbox_uid_count > 0;
        match spawn::seccomp_program() {
            Ok(program) => {
                let path = self.config.data_dir.join("seccomp.bpf");
                match std::fs::write(&path, spawn::seccomp_bytes(&program)) {
                    Ok(()) => self.seccomp_file = Some(path),
                    Err(error) => {
                        missing.push(format!("seccomp: cannot write {}: {error}", path.display()))
                    }
                }
                self.seccomp = Some(program);
            }
            Err(error) => missing.push(format!("seccomp: {error}")),
        }
        self.landlock = spawn::landlock_abi() > 0;
        let candidate = self.config.bwrap.clone().or_else(|| {
            ["/usr/bin/bwrap", "/bin/bwrap", "/usr/local/bin/bwrap"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
        });
        match candidate {
            Some(bwrap) => {
                self.bwrap = Some(bwrap);
                if let Err(error) = self.probe() {
                    missing.push(format!("bubblewrap: it failed to start a process here ({error})"));
                    self.bwrap = None;
                }
            }
            None => missing.push(
                "bubblewrap: not installed (apt-get install bubblewrap) — Landlock restricts files and network instead".into(),
            ),
        }
        if self.bwrap.is_some() && self.landlock {
            match self.config.landlock_shim.clone() {
                Some(shim) => {
                    self.shim = Some(shim);
                    if let Err(error) = self.probe() {
                        missing.push(format!(
                            "landlock under bubblewrap: the shim failed to run a process here ({error})"
                        ));
                        self.shim = None;
                    }
                }
                None => missing.push(
                    "landlock under bubblewrap: no shim configured (LocalConfig::landlock_shim)"
                        .into(),
                ),
            }
        }
        if self.bwrap.is_none() && !self.landlock {
            missing.push("landlock: the kernel does not offer it".into());
        }
        if self.bwrap.is_none() {
            missing.push(
                "without bubblewrap: host unix sockets stay reachable, and volumes appear at their host path (no mount namespace)".into(),
            );
        }
        if self.bwrap.is_none() && self.probe().is_err() {
            // Last resort: without seccomp and Landlock, which the probe showed failing.
            missing.push("seccomp/landlock: failed to apply here".into());
            self.seccomp = None;
            self.landlock = false;
        }
        if !root {
            missing.push("uid drop: msbd is not root; sandboxes run as msbd's own user".into());
        }
        let mut layers = Vec::new();
        if let Some(cgroups) = self.cgroups.describe() {
            layers.push(cgroups);
        }
        if self.drop_uid {
            layers.push("uid-per-session".to_owned());
        }
        if self.bwrap.is_some() {
            layers.push("bwrap(user,net,pid,ipc,uts,mount)".into());
            if self.shim.is_some() {
                layers.push(format!("landlock(abi{})", spawn::landlock_abi()));
            }
        } else if self.landlock {
            layers.push(format!("landlock(abi{})", spawn::landlock_abi()));
        }
        if self.seccomp.is_some() {
            layers.push("seccomp".into());
        }
        layers.push("rlimits+setsid+pdeathsig".into());
        // The spawner is the shim binary, bound into the sandbox; each run needs a cgroup of its
        // own to be killed and frozen alone; and bubblewrap must not run as root.
        self.spawners = self.config.session_spawner
            && self.bwrap.is_some()
            && self.shim.is_some()
            && self.cgroups.can_kill_tree()
            && (self.drop_uid || !root);
        let fs_restricted = self.bwrap.is_some() || self.landlock;
        let level = if fs_restricted
            && self.drop_uid
            && self.bwrap.is_some()
            && self.cgroups.can_kill_tree()
            && self.cgroups.limits_memory()
        {
            IsolationLevel::Strong
        } else if fs_restricted {
            IsolationLevel::Standard
        } else {
            IsolationLevel::Minimal
        };
        self.report = IsolationReport {
            level,
            layers: layers.join("+"),
            missing,
        };
    }

    /// Runs `true` under the current layers, to see that they work on this host.
    fn probe(&self) -> Result<(), String> {
        if self.drop_uid && self.bwrap.is_some() {
            // bubblewrap runs as the sandbox's user and must reach the workspace, the shim and
            // the volumes by their paths: say which directory stops it, not just that it failed.
            let id = self.config.sandbox_uid_base;
            if let Some(closed) = closed_on_the_way_into(&self.sandbox_root) {
                return Err(format!(
                    "the sandbox users (uid {id} and up) cannot reach the workspaces under {}: {closed}; use a sandbox directory whose parents every user can pass through (mode o+x)",
                    self.sandbox_root.display()
                ));
            }
            if let Some(shim) = &self.shim
                && let Err(reason) = reachable_program(shim)
            {
                return Err(format!(
                    "the sandbox users (uid {id} and up) cannot reach the shim: {reason}"
                ));
            }
            for volume in &self.config.volumes {
                if let Some(closed) = closed_on_the_way_into(&volume.host) {
                    return Err(format!(
                        "the sandbox users (uid {id} and up) cannot reach volume {}: {closed}",
                        volume.host.display()
                    ));
                }
            }
        }
        let dir = self
            .sandbox_root
            .join(format!("{PROBE_SESSION}-{}", self.config.instance_marker));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let uid = self.drop_uid.then(|| {
            let id = self.config.sandbox_uid_base;
            (Uid::from_raw(id), Gid::from_raw(id))
        });
        self.prepare_work_dir(&dir, uid)
            .map_err(|e| e.to_string())?;
        let argv = vec!["true".to_owned()];
        // A probe cut short (msbd killed while it starts) can leave a process that nobody
        // waits for (bubblewrap's own parent-death signal is racy): it carries the marker, so
        // that the orphan sweep of the next start kills it.
        let env = vec![(
            ENV_MARKER.to_owned(),
            format!("{}/{PROBE_SESSION}", self.config.instance_marker),
        )];
        let launch = self.launch(
            &argv,
            env,
            &dir,
            false,
            Vec::new(),
            (Flavor::Small, uid, None, false),
        );
        let result = spawn::command(launch)
            .and_then(|mut command| {
                let (child, _owned) = spawn::spawn_owned_std(&mut command)?;
                child.wait_with_output()
            })
            .map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        match result {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => {
                let said = String::from_utf8_lossy(&output.stderr);
                let said = said.trim();
                if said.is_empty() {
                    Err(format!("`true` ended with {}", output.status))
                } else {
                    Err(format!("`true` ended with {}: {said}", output.status))
                }
            }
            Err(error) => Err(error),
        }
    }

    /// The isolation in use, and what is missing.
    pub fn isolation_report(&self) -> &IsolationReport {
        &self.report
    }

    /// Whether `command` runs are forked by a spawner per session (see
    /// [`LocalConfig::session_spawner`]) rather than each started by a bubblewrap of its own.
    pub fn uses_session_spawners(&self) -> bool {
        self.spawners
    }

    /// The directory that holds the sessions' workspaces (see [`LocalConfig::sandbox_dir`]).
    pub fn sandbox_root(&self) -> &Path {
        &self.sandbox_root
    }

    /// The work directory of a live sandbox.
    pub fn work_dir(&self, sandbox: &SandboxInfo) -> Result<PathBuf, BackendError> {
        Ok(self.sandbox(sandbox)?.work_dir.clone())
    }

    fn sandbox(&self, info: &SandboxInfo) -> Result<Arc<LocalSandbox>, BackendError> {
        self.lock()
            .get(&info.name)
            .cloned()
            .ok_or_else(|| BackendError::NoSuchSandbox(info.name.clone()))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<LocalSandbox>>> {
        self.sandboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The start of the names of this instance's scratch directories of one kind (sessions
    /// being made, `new`, or removed, `gone`) under `<data_dir>/sandboxes/`: a dot, which no
    /// session id has, the kind and the instance marker.
    fn scratch_prefix(&self, kind: &str) -> String {
        format!(".{kind}-{}-", self.config.instance_marker)
    }

    /// A fresh scratch directory name for a session (see [`LocalBackend::scratch_prefix`]).
    fn scratch_name(&self, kind: &str, session: &str) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        format!(
            "{}{session}-{}-{}",
            self.scratch_prefix(kind),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn sandbox_name(&self, session: &str) -> String {
        format!("msbd-{}-{session}", self.config.instance_marker)
    }

    fn prepare_work_dir(&self, dir: &Path, uid: Option<(Uid, Gid)>) -> Result<(), BackendError> {
        set_mode(dir, 0o700)?;
        if let Some((uid, gid)) = uid {
            nix::unistd::chown(dir, Some(uid), Some(gid)).map_err(|e| {
                BackendError::io(format!("giving {} to uid {uid}", dir.display()), e.into())
            })?;
        }
        Ok(())
    }

    fn launch<'a>(
        &'a self,
        argv: &'a [String],
        env: Vec<(String, String)>,
        work_dir: &'a Path,
        stdin: bool,
        cgroup_procs: Vec<std::os::fd::OwnedFd>,
        (flavor, drop_to, netns, host_net): (
            Flavor,
            Option<(Uid, Gid)>,
            Option<&'a spawn::SessionNamespaces>,
            bool,
        ),
    ) -> spawn::Launch<'a> {
        let off = self.config.isolation == IsolationMode::Off;
        let mut rlimits = Vec::new();
        if !off {
            rlimits.push((Resource::RLIMIT_NOFILE, 4096));
            rlimits.push((Resource::RLIMIT_CORE, 0));
            rlimits.push((Resource::RLIMIT_FSIZE, 4 << 30));
            if !self.cgroups.limits_memory() {
                rlimits.push((Resource::RLIMIT_AS, (flavor.memory_mb() * 2) << 20));
            }
        }
        // Under bubblewrap, the shim stacks Landlock before the program runs.
        let shim = if off || self.bwrap.is_none() {
            None
        } else {
            self.shim.as_deref()
        };
        let argv = match shim {
            Some(_) => {
                let mut wrapped = vec![shim::SHIM_PATH.to_owned(), shim::SHIM_FLAG.to_owned()];
                let mut writable =
                    vec![work_dir.display().to_string(), "/tmp".into(), "/dev".into()];
                writable.extend(
                    self.config
                        .volumes
                        .iter()
                        .filter(|v| !v.read_only)
                        .map(|v| v.guest.display().to_string()),
                );
                for dir in writable {
                    wrapped.extend(["--write".to_owned(), dir]);
                }
                wrapped.push("--".into());
                wrapped.extend(argv.iter().cloned());
                wrapped
            }
            None => argv.to_vec(),
        };
        spawn::Launch {
            argv,
            shim,
            env,
            work_dir,
            volumes: &self.config.volumes,
            hide: std::slice::from_ref(&self.config.data_dir),
            stdin,
            cgroup_procs,
            rlimits,
            drop_to,
            bwrap: self.bwrap.as_deref(),
            seccomp_file: if self.bwrap.is_some() {
                self.seccomp_file.as_deref()
            } else {
                None
            },
            seccomp_direct: if self.bwrap.is_none() {
                self.seccomp.as_ref()
            } else {
                None
            },
            landlock: if self.bwrap.is_none() && self.landlock {
                spawn::landlock_ruleset(work_dir, &self.config.volumes)
            } else {
                None
            },
            // Without bubblewrap, root can still take the network away (Landlock covers TCP
            // only).
            new_netns: !off && !host_net && self.bwrap.is_none() && drop_to.is_some(),
            netns: if off { None } else { netns },
            share_net: host_net,
            keep_fd: None,
        }
    }

    fn environment(
        &self,
        sandbox: &LocalSandbox,
        extra: &[(String, String)],
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), sandbox.work_dir.display().to_string()),
            ("TMPDIR".into(), "/tmp".into()),
            ("LANG".into(), "C.UTF-8".into()),
        ];
        if sandbox.proxy.is_some() {
            env.extend(Network::proxy_env());
        }
        for (key, value) in extra {
            env.retain(|(k, _)| k != key);
            env.push((key.clone(), value.clone()));
        }
        env.retain(|(k, _)| k != ENV_MARKER);
        env.push((
            ENV_MARKER.into(),
            format!(
                "{}/{}",
                self.config.instance_marker, sandbox.info.session_id
            ),
        ));
        env
    }

    /// Starts a run's process in its sandbox (through bubblewrap when there is one), in the
    /// run's cgroup, with the sandbox's environment and the request's.
    fn spawn_run(
        &self,
        sandbox: &LocalSandbox,
        request: &ExecRequest,
        program: &str,
        cgroup_procs: Vec<std::os::fd::OwnedFd>,
    ) -> Result<(tokio::process::Child, Option<spawn::OwnedPid>), BackendError> {
        let env = self.environment(sandbox, &request.env);
        let launch = self.launch(
            &request.argv,
            env,
            &sandbox.work_dir,
            request.stdin.is_some(),
            cgroup_procs,
            (
                sandbox.info.flavor,
                sandbox.uid.map(|(uid, gid, _)| (uid, gid)),
                sandbox.netns.as_ref(),
                sandbox.network == NetworkMode::Host,
            ),
        );
        let spawn_error = |error: std::io::Error| BackendError::Spawn {
            program: program.to_owned(),
            reason: error.to_string(),
        };
        let mut command =
            tokio::process::Command::from(spawn::command(launch).map_err(spawn_error)?);
        command.kill_on_drop(true);
        spawn::spawn_owned(&mut command).map_err(spawn_error)
    }

    /// The run's own cgroup under its session's (when there is one), and its open
    /// `cgroup.procs`, which the spawned process joins before it runs.
    fn run_group(
        &self,
        sandbox: &LocalSandbox,
    ) -> Result<(Option<Group>, Vec<std::os::fd::OwnedFd>), BackendError> {
        let run_name = format!("x-{}", self.next_run.fetch_add(1, Ordering::Relaxed));
        let Some(session_group) = &sandbox.group else {
            return Ok((None, Vec::new()));
        };
        let group = session_group
            .child(&run_name, sandbox.limits, self.cgroups.v2_controllers())
            .map_err(|e| BackendError::io("creating the run's cgroup", e))?;
        let procs = group
            .open_procs()
            .map_err(|e| BackendError::io("opening the run's cgroup", e))?;
        Ok((Some(group), procs))
    }

    /// Runs one process in a sandbox to its end (or timeout, or cancel).
    async fn run(
        &self,
        sandbox: Arc<LocalSandbox>,
        request: ExecRequest,
        output: &OutputSink,
        mut control: ExecControl,
    ) -> Result<ExecOutcome, BackendError> {
        let program = check_request(&request)?;
        let (group, cgroup_procs) = self.run_group(&sandbox)?;
        let mut guard = GroupGuard(group.clone());
        let started = Instant::now();
        // Through the session's spawner where there is one (the run still gets its own cgroup,
        // which the spawner's child joins before it execs); else, or when the spawner fails
        // before the program starts, a bubblewrap of its own.
        let spawned = match &group {
            Some(_) if self.spawners => {
                self.spawn_through_spawner(&sandbox, &request, &cgroup_procs)
                    .await
            }
            _ => None,
        };
        let (mut process, tree) = match spawned {
            Some(run) => {
                let tree = Tree {
                    group: group.clone(),
                    // The cgroup holds the whole run; the leader's pid is not ours to reap,
                    // and may be reused as soon as the spawner reaps it.
                    pid: None,
                    signals_reach_tree: false,
                };
                (Running::Spawned(run), tree)
            }
            None => {
                let (child, owned) = self.spawn_run(&sandbox, &request, program, cgroup_procs)?;
                let tree = Tree {
                    group: group.clone(),
                    pid: child.id().map(|p| p as i32),
                    signals_reach_tree: self.bwrap.is_none(),
                };
                (
                    Running::Direct {
                        child,
                        _owned: owned,
                    },
                    tree,
                )
            }
        };
        let stdin_task = match (process.take_stdin(), request.stdin) {
            (Some(mut pipe), Some(bytes)) => Some(tokio::spawn(async move {
                let _ = pipe.write_all(&bytes).await;
            })),
            _ => None,
        };
        let clock = RunClock::start(request.timeout, &tree, &mut control.paused, output);
        let ended = watch_run(
            &mut process,
            &tree,
            clock,
            request.timeout,
            output,
            &mut control,
        )
        .await;
        if let Some(task) = stdin_task {
            task.abort();
        }
        let duration = started.elapsed();
        if process.lost_its_spawner() {
            output.note("\n[msbd: the session's spawner failed during the run (it ended, and the run with it, or stopped answering); the next run starts a new one]\n");
        }
        // Tokio has reaped the child (or will, if watching it failed): what bubblewrap's init
        // and the run's killed processes left as zombies is reaped now.
        drop(process);
        spawn::reap_orphans();
        let (exit, reason) = ended.map_err(|e| BackendError::io("waiting for the process", e))?;
        let peak_memory_bytes = group.as_ref().and_then(Group::peak_memory);
        let oom = group.as_ref().is_some_and(|g| g.oom_kills() > 0);
        if let Some(group) = guard.take() {
            remove_group(group).await;
        }
        output.flush();
        // A spawner runs only under bubblewrap, and reports as bubblewrap does.
        let through_bwrap = self.bwrap.is_some();
        let exit = exit.map(|status| exit_status(status, through_bwrap));
        let reason = match reason {
            Some(reason) => reason,
            None if oom => EndReason::MemoryLimit,
            None => EndReason::Exited,
        };
        Ok(ExecOutcome {
            exit,
            reason,
            duration_ms: duration.as_millis() as u64,
            peak_memory_bytes,
            isolation: self.report.layers.clone(),
        })
    }

    /// Starts a run's process through its session's spawner, in the run's cgroup (whose open
    /// `cgroup.procs` are `cgroup_procs`). `None` when the run must take a bubblewrap of its own:
    /// no spawner could be had, or it failed before the program started (a spawner that
    /// misbehaved is replaced at the next run).
    async fn spawn_through_spawner(
        &self,
        sandbox: &LocalSandbox,
        request: &ExecRequest,
        cgroup_procs: &[std::os::fd::OwnedFd],
    ) -> Option<spawner::SpawnedRun> {
        let env = self.environment(sandbox, &request.env);
        // Too large for one message: a bubblewrap of its own.
        let bytes = spawner::request(&request.argv, &env, &sandbox.work_dir)?;
        let session_spawner = self.session_spawner(sandbox).await?;
        let expected_uid = sandbox.uid.map(|(uid, _, _)| uid.as_raw());
        match spawner::SpawnedRun::start(
            &session_spawner,
            &bytes,
            request.stdin.is_some(),
            cgroup_procs,
            expected_uid,
        )
        .await
        {
            Ok(run) => Some(run),
            Err(spawner::SpawnError::Spawner(why)) => {
                tracing::warn!(session = %sandbox.info.session_id, %why, "the session's spawner failed; this run takes a bubblewrap of its own and the next one a new spawner");
                session_spawner.mark_broken();
                None
            }
            Err(spawner::SpawnError::Run(why)) => {
                tracing::debug!(session = %sandbox.info.session_id, %why, "the spawner could not start the run; it takes a bubblewrap of its own");
                None
            }
        }
    }

    /// The session's spawner: the live one, else a new one. `None` when none can be had (then
    /// the session's runs take a bubblewrap each).
    async fn session_spawner(
        &self,
        sandbox: &LocalSandbox,
    ) -> Option<Arc<spawner::SessionSpawner>> {
        let mut slot = sandbox.spawner.lock().await;
        if let Some(current) = &slot.current
            && current.alive()
        {
            return Some(Arc::clone(current));
        }
        // Gone or broken: its runs hold it until they end; it is killed after the last.
        slot.current = None;
        if slot.failed_starts >= SPAWNER_STARTS {
            return None;
        }
        match self.start_spawner(sandbox).await {
            Ok(started) => {
                slot.failed_starts = 0;
                let started = Arc::new(started);
                slot.current = Some(Arc::clone(&started));
                Some(started)
            }
            Err(error) => {
                slot.failed_starts += 1;
                tracing::warn!(session = %sandbox.info.session_id, %error, failed_starts = slot.failed_starts, "could not start the session's spawner; this run takes a bubblewrap of its own");
                None
            }
        }
    }

    /// Starts a spawner in the session's sandbox: bubblewrap with the runs' own arguments,
    /// around the shim binary in spawner mode, in a cgroup of its own under the session's.
    async fn start_spawner(
        &self,
        sandbox: &LocalSandbox,
    ) -> Result<spawner::SessionSpawner, BackendError> {
        let Some(session_group) = &sandbox.group else {
            return Err(BackendError::Unavailable(
                "the session has no cgroup".into(),
            ));
        };
        let name = format!("z-{}", self.next_run.fetch_add(1, Ordering::Relaxed));
        let group = session_group
            .child(&name, sandbox.limits, self.cgroups.v2_controllers())
            .map_err(|e| BackendError::io("creating the spawner's cgroup", e))?;
        let mut guard = GroupGuard(Some(group.clone()));
        let procs = group
            .open_procs()
            .map_err(|e| BackendError::io("opening the spawner's cgroup", e))?;
        let (control, theirs) = spawner::Channel::pair()
            .map_err(|e| BackendError::io("making the spawner's socket", e))?;
        // At a number far from bubblewrap's seccomp descriptor (3), which the child sets up.
        let theirs = spawner::dup_above(&theirs, 10)
            .map_err(|e| BackendError::io("placing the spawner's socket", e))?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
        let mut env = self.environment(sandbox, &[]);
        // Marked apart from the runs (`<marker>/<session>/spawner`): the orphan sweep and
        // `stop` still find it by its session.
        for (key, value) in &mut env {
            if key == ENV_MARKER {
                value.push_str(SPAWNER_MARKER_SUFFIX);
            }
        }
        let argv = spawner::argv(fd);
        let mut launch = self.launch(
            &argv,
            env,
            &sandbox.work_dir,
            false,
            procs,
            (
                sandbox.info.flavor,
                sandbox.uid.map(|(uid, gid, _)| (uid, gid)),
                sandbox.netns.as_ref(),
                sandbox.network == NetworkMode::Host,
            ),
        );
        launch.keep_fd = Some(fd);
        let spawn_error = |error: std::io::Error| BackendError::Spawn {
            program: "the session's spawner".into(),
            reason: error.to_string(),
        };
        let mut command =
            tokio::process::Command::from(spawn::command(launch).map_err(spawn_error)?);
        command
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        let (child, owned) = spawn::spawn_owned(&mut command).map_err(spawn_error)?;
        drop(theirs);
        let expected_uid = sandbox.uid.map(|(uid, _, _)| uid.as_raw());
        let started = spawner::SessionSpawner::greet(
            control,
            child,
            owned,
            group,
            expected_uid,
            &sandbox.info.session_id,
        )
        .await
        .map_err(|why| BackendError::Spawn {
            program: "the session's spawner".into(),
            reason: why,
        })?;
        // From here the spawner owns its group.
        guard.take();
        Ok(started)
    }
}

/// A run's process: a bubblewrap (or the program) msbd spawned, or a spawner's child.
enum Running {
    Direct {
        child: tokio::process::Child,
        /// Keeps the child out of the orphan reaper's reach while it is ours.
        _owned: Option<spawn::OwnedPid>,
    },
    Spawned(spawner::SpawnedRun),
}

type OutputPipe = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

impl Running {
    fn take_stdin(&mut self) -> Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> {
        match self {
            Running::Direct { child, .. } => child.stdin.take().map(|p| Box::new(p) as _),
            Running::Spawned(run) => run.stdin.take().map(|p| Box::new(p) as _),
        }
    }

    fn take_output(&mut self) -> (Option<OutputPipe>, Option<OutputPipe>) {
        match self {
            Running::Direct { child, .. } => (
                child.stdout.take().map(|p| Box::new(p) as _),
                child.stderr.take().map(|p| Box::new(p) as _),
            ),
            Running::Spawned(run) => (
                run.stdout.take().map(|p| Box::new(p) as _),
                run.stderr.take().map(|p| Box::new(p) as _),
            ),
        }
    }

    /// Waits for the process to end (cancel-safe).
    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Running::Direct { child, .. } => child.wait().await,
            Running::Spawned(run) => run.wait().await,
        }
    }

    fn lost_its_spawner(&self) -> bool {
        matches!(self, Running::Spawned(run) if run.lost_its_spawner())
    }
}

/// What follows `<marker>/<session>` in the marker of a session's spawner.
const SPAWNER_MARKER_SUFFIX: &str = "/spawner";

impl LocalBackend {
    async fn call_interpreter(
        &self,
        sandbox: Arc<LocalSandbox>,
        request: ReplRequest,
        output: &OutputSink,
        mut control: ExecControl,
    ) -> Result<ExecOutcome, BackendError> {
        let slot = sandbox.interpreters.get(&request.language).ok_or_else(|| {
            BackendError::InvalidRequest(format!("no interpreter for {}", request.language))
        })?;
        let mut slot = slot.lock().await;
        if slot.is_none() {
            *slot = Some(self.start_interpreter(&sandbox, request.language)?);
        }
        let Some(interpreter) = slot.as_mut() else {
            return Err(BackendError::Unavailable(
                "the interpreter did not start".into(),
            ));
        };
        let started = Instant::now();
        let end = interpreter
            .call(&request.code, request.timeout, output, &mut control)
            .await;
        let peak_memory_bytes = interpreter.tree.group.as_ref().and_then(Group::peak_memory);
        let alive = matches!(&end, Ok(end) if end.alive);
        if !alive {
            if let Some(mut dead) = slot.take() {
                dead.tree.kill();
                let _ = dead.child.wait().await;
                if let Some(group) = dead.tree.group.clone() {
                    remove_group(group).await;
                }
            }
            if matches!(&end, Ok(end) if end.reason == EndReason::Exited || end.reason == EndReason::MemoryLimit)
            {
                output.note(&format!(
                    "\n[msbd: the {} interpreter exited; its state is lost and the next call starts a fresh one]\n",
                    request.language
                ));
            }
        }
        let end = end?;
        output.flush();
        Ok(ExecOutcome {
            exit: end.status.map(ExitStatus::Code),
            reason: end.reason,
            duration_ms: started.elapsed().as_millis() as u64,
            peak_memory_bytes,
            isolation: self.report.layers.clone(),
        })
    }

    fn start_interpreter(
        &self,
        sandbox: &LocalSandbox,
        language: Language,
    ) -> Result<repl::Interpreter, BackendError> {
        let argv = repl::driver_argv(language);
        let run_name = format!(
            "r-{}-{}",
            language,
            self.next_run.fetch_add(1, Ordering::Relaxed)
        );
        let group = match &sandbox.group {
            Some(session_group) => Some(
                session_group
                    .child(&run_name, sandbox.limits, self.cgroups.v2_controllers())
                    .map_err(|e| BackendError::io("creating the interpreter's cgroup", e))?,
            ),
            None => None,
        };
        let mut guard = GroupGuard(group.clone());
        let cgroup_procs = match &group {
            Some(group) => group
                .open_procs()
                .map_err(|e| BackendError::io("opening the interpreter's cgroup", e))?,
            None => Vec::new(),
        };
        let env = self.environment(sandbox, &[]);
        let launch = self.launch(
            &argv,
            env,
            &sandbox.work_dir,
            true,
            cgroup_procs,
            (
                sandbox.info.flavor,
                sandbox.uid.map(|(uid, gid, _)| (uid, gid)),
                sandbox.netns.as_ref(),
                sandbox.network == NetworkMode::Host,
            ),
        );
        let spawn_error = |error: std::io::Error| BackendError::Spawn {
            program: argv[0].clone(),
            reason: error.to_string(),
        };
        let mut command =
            tokio::process::Command::from(spawn::command(launch).map_err(spawn_error)?);
        command.kill_on_drop(true);
        let (mut child, owned) = spawn::spawn_owned(&mut command).map_err(spawn_error)?;
        let pid = child.id().map(|p| p as i32);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(BackendError::Unavailable(
                "the interpreter has no pipes".into(),
            ));
        };
        // From here the interpreter's tree owns the group.
        guard.take();
        Ok(repl::Interpreter {
            language,
            child,
            _owned: owned,
            stdin,
            stdout,
            stderr,
            tree: Arc::new(Tree {
                group,
                pid,
                signals_reach_tree: self.bwrap.is_none(),
            }),
        })
    }
}

impl Drop for LocalBackend {
    /// Nothing outlives its owner: the processes of the sandboxes this backend still knows are
    /// killed and their groups removed (their directories stay for the next orphan sweep), and
    /// the instance's base groups go when empty.
    fn drop(&mut self) {
        let sandboxes: Vec<Arc<LocalSandbox>> = self.lock().drain().map(|(_, s)| s).collect();
        for sandbox in sandboxes {
            if let Some(group) = &sandbox.group {
                group.remove(Duration::from_millis(500));
            }
        }
        self.cgroups.remove_bases_if_empty();
    }
}

impl LocalBackend {
    fn make_sandbox(
        &self,
        spec: &SandboxSpec,
        name: String,
        uid: Option<(Uid, Gid, u32)>,
    ) -> Result<SandboxInfo, BackendError> {
        let network = spec.network.mode;
        self.check_network(network, uid.is_some())?;
        // First, before anything is made that a refusal would leave behind. One network
        // namespace per session (root only): runs join it, and bubblewrap need not
        // make one per run. Without it, bubblewrap makes its own, as it does for non-root.
        let (netns, proxy) = match network {
            NetworkMode::Allow => {
                let (netns, listener) =
                    spawn::new_session_namespaces(spawn::SessionNet::OwnWithProxy(PROXY_PORT))
                        .map_err(|e| {
                            BackendError::io("making the session's network namespace and proxy", e)
                        })?;
                let listener = listener
                    .ok_or_else(|| {
                        BackendError::Unavailable("the proxy's socket was not made".into())
                    })
                    .and_then(|l| {
                        tokio::net::TcpListener::from_std(l)
                            .map_err(|e| BackendError::io("serving the session's proxy", e))
                    })?;
                let serve = Arc::clone(&self.config.network).serve(
                    listener,
                    spec.session_id.clone(),
                    spec.network.allow.clone(),
                );
                (Some(netns), Some(AbortOnDrop(tokio::spawn(serve))))
            }
            _ if uid.is_some() => {
                let net = if network == NetworkMode::Host {
                    spawn::SessionNet::Host
                } else {
                    spawn::SessionNet::Own
                };
                match spawn::new_session_namespaces(net) {
                    Ok((netns, _)) => (Some(netns), None),
                    Err(error) => {
                        tracing::warn!(%error, "could not make a network namespace for the session; each run gets its own");
                        (None, None)
                    }
                }
            }
            _ => (None, None),
        };
        let root = self.sandbox_root.clone();
        let home = root.join(&spec.session_id);
        let work_dir = home.join("work");
        // Made under a scratch name that carries the marker, then renamed into place: msbd
        // killed midway leaves a directory the orphan sweep recognizes as this instance's,
        // never one without its marker.
        let scratch = root.join(self.scratch_name("new", &spec.session_id));
        let made = std::fs::create_dir(&scratch)
            .and_then(|()| std::fs::write(scratch.join("marker"), &self.config.instance_marker))
            .and_then(|()| std::fs::create_dir(scratch.join("work")))
            .map_err(|e| BackendError::io(format!("creating {}", scratch.display()), e))
            .and_then(|()| set_mode(&scratch, 0o711));
        let placed = made.and_then(|()| {
            std::fs::rename(&scratch, &home)
                .map_err(|e| BackendError::io(format!("creating {}", home.display()), e))
        });
        if placed.is_err() {
            // Not in place (a directory of that name was left there, say): the old way.
            let _ = std::fs::remove_dir_all(&scratch);
            std::fs::create_dir_all(&work_dir)
                .map_err(|e| BackendError::io(format!("creating {}", work_dir.display()), e))?;
            set_mode(&home, 0o711)?;
            std::fs::write(home.join("marker"), &self.config.instance_marker)
                .map_err(|e| BackendError::io("writing the sandbox marker", e))?;
        }
        self.prepare_work_dir(&work_dir, uid.map(|(u, g, _)| (u, g)))?;
        let limits = Limits {
            memory_bytes: spec.flavor.memory_mb() << 20,
            pids: pids_limit(spec.flavor),
            cpus: spec.flavor.cpus(),
        };
        let group = if self.cgroups.any() {
            Some(
                self.cgroups
                    .session(&spec.session_id, limits)
                    .map_err(|e| BackendError::io("creating the session's cgroup", e))?,
            )
        } else {
            None
        };
        let info = SandboxInfo {
            name: name.clone(),
            session_id: spec.session_id.clone(),
            flavor: spec.flavor,
            work_dir: Some(work_dir.clone()),
        };
        let sandbox = Arc::new(LocalSandbox {
            info: info.clone(),
            work_dir,
            uid,
            netns,
            network,
            proxy,
            group,
            limits,
            interpreters: [Language::Python, Language::Node, Language::Bash]
                .into_iter()
                .map(|l| (l, tokio::sync::Mutex::new(None)))
                .collect(),
            spawner: tokio::sync::Mutex::new(SpawnerSlot::default()),
        });
        self.lock().insert(name, sandbox);
        Ok(info)
    }

    /// Whether this backend can give a session `network`: `host` needs bubblewrap (without it
    /// Landlock takes TCP away), `allow` also needs root (the proxy's socket is made in the
    /// session's network namespace).
    fn check_network(&self, network: NetworkMode, root: bool) -> Result<(), BackendError> {
        let off = self.config.isolation == IsolationMode::Off;
        let refuse = |why: &str| {
            Err(BackendError::InvalidRequest(format!(
                "network \"{network}\" is not available on this msbd: {why}; ask for network \"none\""
            )))
        };
        match network {
            NetworkMode::None => Ok(()),
            NetworkMode::Host if off || self.bwrap.is_some() => Ok(()),
            NetworkMode::Host => refuse(
                "it needs bubblewrap (install the bubblewrap package), which this host lacks",
            ),
            NetworkMode::Allow if off => {
                refuse("isolation is off, so nothing would hold a sandbox to its proxy")
            }
            NetworkMode::Allow if self.bwrap.is_none() || !root => refuse(
                "it needs bubblewrap and msbd running as root (the proxy listens inside the session's own network namespace, which msbd makes as root)",
            ),
            NetworkMode::Allow => Ok(()),
        }
    }

    fn release_uid(&self, offset: u32) {
        self.uids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&offset);
    }
}

/// What to kill or freeze for one run: its cgroup when there is one, else its process group.
struct Tree {
    group: Option<Group>,
    pid: Option<i32>,
    /// Whether signals to the leader's process group reach the whole tree (no bubblewrap,
    /// whose `--new-session` puts the program in a group of its own).
    signals_reach_tree: bool,
}

/// Removes a run's cgroup on every path out of a run, early returns included.
struct GroupGuard(Option<Group>);

impl GroupGuard {
    /// The normal end: hands the group over for an asynchronous removal.
    fn take(&mut self) -> Option<Group> {
        self.0.take()
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            group.remove(Duration::from_millis(200));
        }
    }
}

/// What the output says when a pause cannot freeze the work.
const CANNOT_FREEZE: &str = "\n[msbd: this host cannot freeze a process tree (no cgroup freezer): the task keeps running while paused, and its timeout clock too]\n";

impl Tree {
    fn kill(&self) {
        if let Some(group) = &self.group {
            group.kill();
        }
        if let Some(pid) = self.pid {
            // The run's leader called setsid: its process group has its pid.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    fn thaw_and_kill(&self) {
        self.kill();
        self.freeze(false);
    }

    /// Freezes or thaws the tree; `false` when this host cannot (then the work goes on).
    fn freeze(&self, frozen: bool) -> bool {
        if let Some(group) = &self.group
            && group.freeze(frozen)
        {
            return true;
        }
        if let Some(pid) = self.pid
            && self.signals_reach_tree
        {
            let signal = if frozen {
                nix::sys::signal::Signal::SIGSTOP
            } else {
                nix::sys::signal::Signal::SIGCONT
            };
            return nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal).is_ok();
        }
        false
    }
}

async fn remove_group(group: Group) {
    let _ = tokio::task::spawn_blocking(move || group.remove(Duration::from_secs(2))).await;
}

/// Follows a started run to its end: copies its output, ends it on cancel or at its timeout
/// (whose clock stops while the run is paused), and freezes or thaws it as the pause switch
/// says. Answers its exit status, and why it ended when that was not its own doing.
async fn watch_run(
    process: &mut Running,
    tree: &Tree,
    mut clock: RunClock,
    timeout: Option<Duration>,
    output: &OutputSink,
    control: &mut ExecControl,
) -> std::io::Result<(Option<std::process::ExitStatus>, Option<EndReason>)> {
    let (mut stdout, mut stderr) = process.take_output();
    let mut out_buf = vec![0u8; 16 * 1024];
    let mut err_buf = vec![0u8; 16 * 1024];
    let mut exit: Option<std::process::ExitStatus> = None;
    let mut reason: Option<EndReason> = None;
    let mut drain_until: Option<tokio::time::Instant> = None;
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    while exit.is_none() || stdout.is_some() || stderr.is_some() {
        // Once it exited or is being killed, only its output is left to read.
        let ending = reason.is_some() || exit.is_some();
        let deadline = clock.deadline().filter(|_| !ending);
        tokio::select! {
            read = read_some(&mut stdout, &mut out_buf) => match read {
                Some(n) => output.write(Stream::Stdout, &out_buf[..n]),
                None => stdout = None,
            },
            read = read_some(&mut stderr, &mut err_buf) => match read {
                Some(n) => output.write(Stream::Stderr, &err_buf[..n]),
                None => stderr = None,
            },
            status = process.wait(), if exit.is_none() => {
                exit = Some(status?);
                // What the program left behind (background children) goes with it, so that
                // the pipes close and nothing outlives the run.
                tree.kill();
                drain_until = Some(tokio::time::Instant::now() + Duration::from_secs(1));
            }
            _ = control.cancel.cancelled(), if !ending => {
                reason = Some(EndReason::Cancelled);
                tree.thaw_and_kill();
            }
            _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                let after_ms = timeout.map_or(0, |t| t.as_millis() as u64);
                reason = Some(EndReason::TimedOut { after_ms });
                tree.thaw_and_kill();
            }
            changed = control.paused.changed(), if clock.follows_switch() && !ending => {
                clock.switch_changed(changed, &mut control.paused, tree, output);
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or(far)), if drain_until.is_some() => {
                // Something holds the pipes open past the run's end: stop reading.
                output.note("\n[msbd: output closed: a process outside the run held it open]\n");
                break;
            }
        }
    }
    Ok((exit, reason))
}

async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buffer: &mut [u8],
) -> Option<usize> {
    match pipe {
        Some(pipe) => match pipe.read(buffer).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

/// Checks what a run asks for: its program (returned), arguments and environment.
fn check_request(request: &ExecRequest) -> Result<&String, BackendError> {
    let Some(program) = request.argv.first() else {
        return Err(BackendError::InvalidRequest(
            "the command is empty: give a program to run".into(),
        ));
    };
    if program.is_empty() || request.argv.iter().any(|a| a.contains('\0')) {
        return Err(BackendError::InvalidRequest(
            "the command has an empty program name or a NUL byte in an argument".into(),
        ));
    }
    if let Some((key, _)) = request
        .env
        .iter()
        .find(|(k, v)| k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0'))
    {
        return Err(BackendError::InvalidRequest(format!(
            "environment variable {key:?} is not valid: names must be non-empty without '=' or NUL"
        )));
    }
    Ok(program)
}

/// How a run's process ended. bubblewrap reports its program's death by signal N as exit code
/// 128 + N, the shell's convention; that is read back as the signal (a program that exits
/// 128 + N on its own reads the same, as under any shell).
fn exit_status(status: std::process::ExitStatus, through_bwrap: bool) -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) if through_bwrap && (129..=128 + 64).contains(&code) => {
            ExitStatus::Signal(code - 128)
        }
        (Some(code), _) => ExitStatus::Code(code),
        (None, Some(signal)) => ExitStatus::Signal(signal),
        (None, None) => ExitStatus::Code(-1),
    }
}

/// Whether other users can reach and run `program`; the reason when not.
fn reachable_program(program: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(closed) = closed_to_others(program) {
        return Err(closed.to_string());
    }
    let mode = std::fs::metadata(program)
        .map_err(|e| format!("{}: {e}", program.display()))?
        .permissions()
        .mode();
    if mode & 0o001 == 0 {
        return Err(format!(
            "{} (mode {:04o}) cannot be run by other users",
            program.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

/// Copies the Landlock shim to `<root>/.shim-<marker>` (mode 0755), replacing an older copy
/// at once (a running sandbox keeps the one it started with). The copy takes the shim's
/// modification time, so that a copy of the same size and time is kept as it is, without reading
/// either file (the shim is msbd's own executable: tens of MB).
fn copy_shim(shim: &Path, root: &Path, marker: &str) -> Result<PathBuf, BackendError> {
    use std::os::unix::fs::PermissionsExt;
    let target = root.join(format!(".shim-{marker}"));
    let source = std::fs::metadata(shim)
        .map_err(|e| BackendError::io(format!("reading {}", shim.display()), e))?;
    let modified = source.modified().ok();
    let same = std::fs::metadata(&target).is_ok_and(|copy| {
        copy.permissions().mode() & 0o7777 == 0o755
            && copy.len() == source.len()
            && modified.is_some()
            && copy.modified().ok() == modified
    });
    if same {
        return Ok(target);
    }
    let scratch = root.join(format!(".shim-{marker}.{}", std::process::id()));
    std::fs::copy(shim, &scratch).map_err(|e| {
        BackendError::io(
            format!("copying {} to {}", shim.display(), scratch.display()),
            e,
        )
    })?;
    if let Some(modified) = modified {
        std::fs::File::options()
            .write(true)
            .open(&scratch)
            .and_then(|file| file.set_modified(modified))
            .map_err(|e| BackendError::io(format!("dating {}", scratch.display()), e))?;
    }
    set_mode(&scratch, 0o755)?;
    std::fs::rename(&scratch, &target)
        .map_err(|e| BackendError::io(format!("placing {}", target.display()), e))?;
    Ok(target)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), BackendError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| BackendError::io(format!("setting the mode of {}", path.display()), e))
}

/// Checks a volume mapping: the host directory must exist, and the guest path must be one
/// bubblewrap can mount on: a path that exists on the host (the system is bound read-only, so
/// no new directory can be made in it) or one under `/tmp` (the sandbox's own).
fn check_volume(volume: &VolumeMapping) -> Result<(), BackendError> {
    if !volume.host.is_dir() {
        return Err(BackendError::InvalidRequest(format!(
            "volume {}:{}: the host directory does not exist (create it, or fix the mapping)",
            volume.host.display(),
            volume.guest.display()
        )));
    }
    let guest = &volume.guest;
    if guest == Path::new("/")
        || ["/proc", "/dev", "/sys", "/tmp"]
            .iter()
            .any(|d| guest == Path::new(d))
        || ["/proc", "/dev", "/sys"]
            .iter()
            .any(|d| guest.starts_with(d))
    {
        return Err(BackendError::InvalidRequest(format!(
            "volume {}:{}: the guest path cannot be /, /tmp itself, or under /proc, /dev or /sys: map to a directory such as /data or /tmp/<name>",
            volume.host.display(),
            guest.display()
        )));
    }
    // Sandboxes see the system directories read-only, so no mount point can be made in them.
    let in_system = spawn::SYSTEM_DIRS.iter().any(|d| guest.starts_with(d));
    if in_system && !guest.exists() {
        return Err(BackendError::InvalidRequest(format!(
            "volume {}:{}: the guest path lies in a system directory the sandbox sees read-only and does not exist there; map to a new directory such as /data or /tmp/<name>, or create {}",
            volume.host.display(),
            guest.display(),
            guest.display()
        )));
    }
    Ok(())
}

/// Checks a session id: it names a directory, so only letters, digits, `-` and `_`.
pub fn validate_session_id(session: &str) -> Result<(), BackendError> {
    if session.is_empty()
        || session.len() > 64
        || !session
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(BackendError::InvalidRequest(format!(
            "session id {session:?} is not valid: use 1 to 64 letters, digits, '-' or '_'"
        )));
    }
    Ok(())
}

impl SandboxBackend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn isolation(&self) -> String {
        format!(
            "{} ({})",
            serde_json::to_value(self.report.level)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.report.layers
        )
    }

    fn create<'a>(
        &'a self,
        spec: &'a SandboxSpec,
    ) -> BoxFuture<'a, Result<SandboxInfo, BackendError>> {
        Box::pin(async move {
            validate_session_id(&spec.session_id)?;
            let _lifecycle = self.lifecycle.lock().await;
            let name = self.sandbox_name(&spec.session_id);
            if let Some(existing) = self.lock().get(&name) {
                return Ok(existing.info.clone());
            }
            let uid = if self.drop_uid {
                let offset = {
                    let mut used = self.uids.lock().unwrap_or_else(PoisonError::into_inner);
                    let free = (0..self.config.sandbox_uid_count).find(|o| !used.contains(o));
                    let Some(offset) = free else {
                        return Err(BackendError::Unavailable(format!(
                            "all {} sandbox uids are in use: stop a session or raise the uid range",
                            self.config.sandbox_uid_count
                        )));
                    };
                    used.insert(offset);
                    offset
                };
                let id = self.config.sandbox_uid_base + offset;
                Some((Uid::from_raw(id), Gid::from_raw(id), offset))
            } else {
                None
            };
            let created = self.make_sandbox(spec, name, uid);
            if created.is_err()
                && let Some((_, _, offset)) = uid
            {
                self.release_uid(offset);
            }
            created
        })
    }

    fn exec<'a>(
        &'a self,
        sandbox: &'a SandboxInfo,
        request: ExecRequest,
        output: &'a OutputSink,
        control: ExecControl,
    ) -> BoxFuture<'a, Result<ExecOutcome, BackendError>> {
        Box::pin(async move {
            let sandbox = self.sandbox(sandbox)?;
            self.run(sandbox, request, output, control).await
        })
    }
    fn repl<'a>(
        &'a self,
        sandbox: &'a SandboxInfo,
        request: ReplRequest,
        output: &'a OutputSink,
        control: ExecControl,
    ) -> BoxFuture<'a, Result<ExecOutcome, BackendError>> {
        Box::pin(async move {
            let sandbox = self.sandbox(sandbox)?;
            self.call_interpreter(sandbox, request, output, control)
                .await
        })
    }

    fn stop<'a>(&'a self, sandbox: &'a SandboxInfo) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            // A create of the same session waits until this one is gone for good.
            let _lifecycle = self.lifecycle.lock().await;
            let removed = self.lock().remove(&sandbox.name);
            let Some(sandbox) = removed else {
                return Ok(());
            };
            if let Some(group) = sandbox.group.clone() {
                remove_group(group).await;
            }
            if let Some((_, _, offset)) = sandbox.uid {
                self.release_uid(offset);
            }
            kill_marked_processes(&self.config.instance_marker, |s| {
                s == sandbox.info.session_id
            });
            let root = self.sandbox_root.clone();
            let home = root.join(&sandbox.info.session_id);
            // Out of the way under a scratch name that carries the marker first: msbd killed
            // while the tree is removed (its marker file may go first) leaves a directory the
            // orphan sweep recognizes.
            let scratch = root.join(self.scratch_name("gone", &sandbox.info.session_id));
            let home = match std::fs::rename(&home, &scratch) {
                Ok(()) => scratch,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(_) => home,
            };
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&home))
                .await
                .map_err(|e| BackendError::Unavailable(e.to_string()))?
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|e| BackendError::io("removing the sandbox's directory", e))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxInfo>, BackendError>> {
        Box::pin(async move {
            let mut list: Vec<SandboxInfo> = self.lock().values().map(|s| s.info.clone()).collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(list)
        })
    }

    fn metrics<'a>(
        &'a self,
        sandbox: &'a SandboxInfo,
    ) -> BoxFuture<'a, Result<SandboxMetrics, BackendError>> {
        Box::pin(async move {
            let sandbox = self.sandbox(sandbox)?;
            Ok(match &sandbox.group {
                Some(group) => SandboxMetrics {
                    memory_bytes: group.memory(),
                    peak_memory_bytes: group.peak_memory(),
                    cpu_usage_us: group.cpu_usage_us(),
                    processes: Some(group.process_count()),
                },
                None => SandboxMetrics::default(),
            })
        })
    }

    fn sweep_orphans<'a>(
        &'a self,
        live: &'a HashSet<String>,
    ) -> BoxFuture<'a, Result<SweepReport, BackendError>> {
        Box::pin(async move {
            // No session is made while the sweep runs, so none can be taken for an orphan.
            let _lifecycle = self.lifecycle.lock().await;
            let known: HashSet<String> = self
                .lock()
                .values()
                .map(|s| s.info.session_id.clone())
                .collect();
            let orphan = |session: &str| !live.contains(session) && !known.contains(session);
            let mut report = SweepReport::default();
            for session in self.cgroups.sessions() {
                if orphan(&session) {
                    let group = self.cgroups.session_group(&session);
                    report.processes += group.process_count() as usize;
                    remove_group(group).await;
                    report.cgroups += 1;
                }
            }
            report.processes += kill_marked_processes(&self.config.instance_marker, orphan);
            spawn::reap_orphans();
            let root = self.sandbox_root.clone();
            if let Ok(entries) = std::fs::read_dir(&root) {
                for entry in entries.flatten() {
                    let Some(session) = entry.file_name().to_str().map(str::to_owned) else {
                        continue;
                    };
                    let marker =
                        std::fs::read_to_string(entry.path().join("marker")).unwrap_or_default();
                    // A directory being made or removed when a previous msbd died carries the
                    // marker in its name (no session is made or stopped while the sweep runs).
                    let scratch = ["new", "gone"]
                        .iter()
                        .any(|kind| session.starts_with(&self.scratch_prefix(kind)));
                    if scratch || (marker == self.config.instance_marker && orphan(&session)) {
                        let path = entry.path();
                        let removed =
                            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(path))
                                .await
                                .is_ok_and(|r| r.is_ok());
                        if removed {
                            report.directories += 1;
                        }
                    }
                }
            }
            report.sandboxes = report.cgroups.max(report.directories);
            Ok(report)
        })
    }
}

/// Kills the processes whose environment carries this instance's marker and a session that
/// `select` picks (this finds sandboxed processes even without cgroups). Returns how many.
fn kill_marked_processes(marker: &str, select: impl Fn(&str) -> bool) -> usize {
    let prefix = format!("{ENV_MARKER}={marker}/");
    let mut killed = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let found = environ
            .split(|&b| b == 0)
            .filter_map(|var| std::str::from_utf8(var).ok())
            .find_map(|var| var.strip_prefix(&prefix))
            // A session's spawner carries `<session>/spawner`.
            .map(|rest| rest.split('/').next().unwrap_or(rest));
        if let Some(session) = found
            && select(session)
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        {
            killed += 1;
        }
    }
    killed
}
