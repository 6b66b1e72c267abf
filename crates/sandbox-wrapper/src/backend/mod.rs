//! The sandbox backend trait and the types every backend shares: what a sandbox is made of
//! ([`SandboxSpec`], [`Flavor`], [`VolumeMapping`]), what runs in one ([`ExecRequest`],
//! [`ReplRequest`]), how a run is steered from outside ([`ExecControl`]: cancel, pause) and what
//! it reports ([`ExecOutcome`], [`EndReason`]).
//!
//! Backends: [`local`] (processes on this host under the strongest isolation it offers) and
//! [`microsandbox`] (a client of the microsandbox server's JSON-RPC API).

pub mod local;
pub mod microsandbox;

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::output::OutputSink;

/// A boxed future, as the backend trait returns them (so that backends sit behind `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A sandbox's size: what it may use of CPU and memory.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    Default,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase", ascii_case_insensitive)]
pub enum Flavor {
    /// 1 CPU, 1024 MB.
    #[default]
    Small,
    /// 2 CPUs, 2048 MB.
    Medium,
    /// 4 CPUs, 4096 MB.
    Large,
}

impl Flavor {
    /// All flavors, smallest first.
    pub const ALL: [Flavor; 3] = [Flavor::Small, Flavor::Medium, Flavor::Large];

    /// How many CPUs the flavor may use.
    pub fn cpus(self) -> u32 {
        match self {
            Flavor::Small => 1,
            Flavor::Medium => 2,
            Flavor::Large => 4,
        }
    }

    /// How much memory the flavor may use, in MiB.
    pub fn memory_mb(self) -> u64 {
        match self {
            Flavor::Small => 1024,
            Flavor::Medium => 2048,
            Flavor::Large => 4096,
        }
    }

    /// The flavor's name: `small`, `medium` or `large`.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Parses `small`, `medium` or `large`.
    pub fn parse(name: &str) -> Result<Flavor, BackendError> {
        match name {
            "small" => Ok(Flavor::Small),
            "medium" => Ok(Flavor::Medium),
            "large" => Ok(Flavor::Large),
            other => Err(BackendError::InvalidRequest(format!(
                "unknown flavor {other:?}: use \"small\" (1 CPU, 1024 MB), \"medium\" (2 CPUs, \
                 2048 MB) or \"large\" (4 CPUs, 4096 MB)"
            ))),
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A host directory made visible inside sandboxes (`host:guest`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMapping {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where it appears inside the sandbox.
    pub guest: PathBuf,
    /// Whether the sandbox may only read it.
    pub read_only: bool,
}

impl VolumeMapping {
    /// Parses `host:guest`, `host:guest:ro` or `host:guest:rw` (read-write is the default).
    /// Both paths must be absolute.
    pub fn parse(text: &str) -> Result<VolumeMapping, BackendError> {
        let parts: Vec<&str> = text.split(':').collect();
        let (host, guest, read_only) = match parts.as_slice() {
            [host, guest] => (*host, *guest, false),
            [host, guest, "ro"] => (*host, *guest, true),
            [host, guest, "rw"] => (*host, *guest, false),
            _ => {
                return Err(BackendError::InvalidRequest(format!(
                    "volume mapping {text:?} is not `host:guest` or `host:guest:ro`"
                )));
            }
        };
        if !host.starts_with('/') || !guest.starts_with('/') {
            return Err(BackendError::InvalidRequest(format!(
                "volume mapping {text:?}: both paths must be absolute"
            )));
        }
        Ok(VolumeMapping {
            host: PathBuf::from(host),
            guest: PathBuf::from(guest),
            read_only,
        })
    }
}

/// What a new sandbox is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxSpec {
    /// The id of the session that owns it (unique among live sandboxes of one instance).
    pub session_id: String,
    /// Its size.
    pub flavor: Flavor,
    /// The image or template (`python`, `node`; the local backend ignores it).
    pub template: String,
    /// Host directories bound into it.
    pub volumes: Vec<VolumeMapping>,
    /// Its network policy.
    pub network: crate::network::NetworkPolicy,
}

/// A live sandbox, as its backend names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// The backend's name for it (carries this instance's marker).
    pub name: String,
    /// The session that owns it, as recorded in its marker.
    pub session_id: String,
    /// Its size.
    pub flavor: Flavor,
    /// Where its files live on the host, when it has a directory here.
    pub work_dir: Option<PathBuf>,
}

/// A command to run in a sandbox.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program and its arguments (never passed through a shell by the backend).
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Bytes written to the command's standard input (then closed); none means `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// How long the command may run (paused time not counted); none means no limit.
    pub timeout: Option<Duration>,
}

/// The languages whose interpreter state a session keeps from one call to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// Python 3.
    Python,
    /// Node.js.
    Node,
    /// Bash.
    Bash,
}

impl Language {
    /// The language's name: `python`, `node` or `bash`.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Node => "node",
            Language::Bash => "bash",
        }
    }

    /// Parses `python`, `node` or `bash` (and the aliases `python3`, `javascript`, `js`, `sh`).
    pub fn parse(name: &str) -> Result<Language, BackendError> {
        match name {
            "python" | "python3" => Ok(Language::Python),
            "node" | "javascript" | "js" => Ok(Language::Node),
            "bash" | "sh" => Ok(Language::Bash),
            other => Err(BackendError::InvalidRequest(format!(
                "unknown language {other:?}: use \"python\", \"node\" or \"bash\""
            ))),
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Code to run in a session's interpreter, whose state persists between calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplRequest {
    /// The language.
    pub language: Language,
    /// The code.
    pub code: String,
    /// How long the code may run (paused time not counted); none means no limit.
    pub timeout: Option<Duration>,
}

/// How a run is steered while it goes: cancelled, or paused and resumed.
#[derive(Clone, Debug)]
pub struct ExecControl {
    /// Cancelled when the run should stop (the backend kills the whole process tree).
    pub cancel: CancellationToken,
    /// `true` while the run should be frozen (its timeout clock stops too).
    pub paused: watch::Receiver<bool>,
}

impl ExecControl {
    /// A control that is never paused: only `cancel` steers the run.
    pub fn new(cancel: CancellationToken) -> ExecControl {
        let (sender, paused) = watch::channel(false);
        // With its sender gone the receiver keeps its value and never changes; backends stop
        // watching it once they see that.
        drop(sender);
        ExecControl { cancel, paused }
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// Why a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EndReason {
    /// The program exited on its own (whatever its code).
    Exited,
    /// It ran longer than its timeout.
    TimedOut {
        /// The timeout, in milliseconds.
        after_ms: u64,
    },
    /// It was cancelled.
    Cancelled,
    /// The memory limit killed it.
    MemoryLimit,
    /// A signal from outside msbd killed it.
    Killed,
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndReason::Exited => f.write_str("exited"),
            EndReason::TimedOut { after_ms } => {
                if after_ms % 1000 == 0 {
                    write!(f, "timed out after {} s", after_ms / 1000)
                } else {
                    write!(f, "timed out after {after_ms} ms")
                }
            }
            EndReason::Cancelled => f.write_str("cancelled"),
            EndReason::MemoryLimit => f.write_str("killed: memory limit"),
            EndReason::Killed => f.write_str("killed by a signal"),
        }
    }
}

/// What a finished run reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecOutcome {
    /// How the process ended; none when the backend could not tell.
    pub exit: Option<ExitStatus>,
    /// Why it ended.
    pub reason: EndReason,
    /// How long it ran, paused time included.
    pub duration_ms: u64,
    /// The peak memory of its process tree, where the host measures it.
    pub peak_memory_bytes: Option<u64>,
    /// The isolation it ran under (`cgroup-v1+uid+bwrap+seccomp+rlimits`, say).
    pub isolation: String,
}

impl ExecOutcome {
    /// Whether the program exited with code 0.
    pub fn success(&self) -> bool {
        self.reason == EndReason::Exited && self.exit == Some(ExitStatus::Code(0))
    }
}

/// A sandbox's resource use, as far as the backend measures it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxMetrics {
    /// Memory in use now, in bytes.
    pub memory_bytes: Option<u64>,
    /// The highest memory use seen, in bytes.
    pub peak_memory_bytes: Option<u64>,
    /// CPU time used, in microseconds.
    pub cpu_usage_us: Option<u64>,
    /// Processes alive now.
    pub processes: Option<u64>,
}

/// What an orphan sweep removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SweepReport {
    /// Sandboxes (or their process trees) stopped.
    pub sandboxes: usize,
    /// Processes killed.
    pub processes: usize,
    /// Control groups removed.
    pub cgroups: usize,
    /// Work directories removed.
    pub directories: usize,
}

impl SweepReport {
    /// Everything removed, summed.
    pub fn total(&self) -> usize {
        self.sandboxes + self.processes + self.cgroups + self.directories
    }
}

/// What went wrong in a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request cannot be run as given.
    #[error("{0}")]
    InvalidRequest(String),
    /// No live sandbox has that name.
    #[error("sandbox {0:?} does not exist (it was stopped, or never created)")]
    NoSuchSandbox(String),
    /// The program could not be started.
    #[error("could not start {program:?}: {reason}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        reason: String,
    },
    /// The backend's server or the host refused or failed.
    #[error("{0}")]
    Unavailable(String),
    /// An I/O error on the host.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    /// Wraps an I/O error with what was being done.
    pub fn io(action: impl Into<String>, source: std::io::Error) -> BackendError {
        BackendError::Io {
            action: action.into(),
            source,
        }
    }
}

/// A place where sandboxes run.
///
/// Every sandbox a backend creates carries this instance's marker, so that [`list`] and
/// [`sweep_orphans`] see only this instance's sandboxes and never touch anything else.
///
/// [`list`]: SandboxBackend::list
/// [`sweep_orphans`]: SandboxBackend::sweep_orphans
pub trait SandboxBackend: Send + Sync + 'static {
    /// The backend's name: `local` or `microsandbox`.
    fn name(&self) -> &'static str;

    /// The isolation its sandboxes run under, in words (`cgroup-v1+uid+bwrap+...`).
    fn isolation(&self) -> String;

    /// Creates a sandbox and returns its name.
    fn create<'a>(
        &'a self,
        spec: &'a SandboxSpec,
    ) -> BoxFuture<'a, Result<SandboxInfo, BackendError>>;

    /// Runs a command in a sandbox, writing its output to `output`, until it ends, times out or
    /// is cancelled through `control`.
    fn exec<'a>(
        &'a self,
        sandbox: &'a SandboxInfo,
        request: ExecRequest,
        output: &'a OutputSink,
        control: ExecControl,
    ) -> BoxFuture<'a, Result<ExecOutcome, BackendError>>;

    /// Runs code in the sandbox's interpreter for its language, whose state persists from one
    /// call to the next within the sandbox.
    fn repl<'a>(
        &'a self,
        sandbox: &'a SandboxInfo,
        request: ReplRequest,
        output: &'a OutputSink,
        control: ExecControl,
    ) -> BoxFuture<'a, Result<ExecOutcome, BackendError>>;

    /// Stops a sandbox: kills everything in it and frees what it holds.
    fn stop<'a>(&'a self, sandbox: &'a SandboxInfo) -> BoxFuture<'a, Result<(), BackendError>>;

    /// This instance's live sandboxes (never another's).
    fn list(&self) -> BoxFuture<'_, Result<Vec<SandboxInfo>, BackendError>>;

    /// A sandbox's resource use.
    fn metrics<'a>(
        &'a self,
        sandbox: &'a SandboxInfo,
    ) -> BoxFuture<'a, Result<SandboxMetrics, BackendError>>;

    /// Removes this instance's sandboxes whose session is not in `live` (left by a crash, say),
    /// and nothing that is not this instance's.
    fn sweep_orphans<'a>(
        &'a self,
        live: &'a HashSet<String>,
    ) -> BoxFuture<'a, Result<SweepReport, BackendError>>;
}
