//! Sessions and the resources they hold.
//!
//! A session is a sandbox that lives across tasks: its work directory, its interpreters, its
//! flavor's share of memory. [`SessionManager`] creates sessions on first use (with the id a
//! client names, or a fresh one), marks them busy while tasks run in them, expires those idle
//! longer than the session timeout (the session cleanup loop), and stops them. [`ResourceManager`]
//! decides whether a new session fits: at most `max_sessions`, at most `max_total_memory_mb` of
//! flavor memory summed; at a limit it names the least recently used idle sessions to evict (when
//! eviction is on) or refuses with an error that names the limit and what to do. It also keeps
//! the orphan sweep's statistics.
//!
//! The session manager is also the one record of who owns a session (its *claims*): a task's
//! owner claims the session the task names when it is submitted, and the session made for a task
//! that named none when the task starts. Another owner's claim is refused
//! ([`SessionError::Claimed`]). A claim lasts while its session does; the claim of a session a
//! client named outlives it by [`CLAIM_KEPT`], so that a follow-up task keeps the name, and one
//! whose session never came (its task still queued, or given up) is forgotten after as long.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::{
    BackendError, Flavor, SandboxBackend, SandboxInfo, SandboxMetrics, SandboxSpec, SweepReport,
};
use crate::network::NetworkPolicy;
use crate::stable::Clock;

/// Limits and timings of sessions.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// A session idle (no task running) longer than this is stopped (`MSB_SESSION_TIMEOUT`).
    pub session_timeout: Duration,
    /// How often the session cleanup loop runs (`MSB_CLEANUP_INTERVAL`).
    pub cleanup_interval: Duration,
    /// How often the orphan cleanup loop runs (`MSB_ORPHAN_CLEANUP_INTERVAL`).
    pub orphan_cleanup_interval: Duration,
    /// The most sessions at once (`MSB_MAX_SESSIONS`).
    pub max_sessions: usize,
    /// The most flavor memory summed over sessions, in MiB (`MSB_MAX_TOTAL_MEMORY_MB`).
    pub max_total_memory_mb: u64,
    /// Whether to stop the least recently used idle session to make room
    /// (`MSB_ENABLE_LRU_EVICTION`).
    pub lru_eviction: bool,
    /// The flavor of a session when none is asked for (`MSB_DEFAULT_FLAVOR`).
    pub default_flavor: Flavor,
    /// The network policy of a session when none is asked for (`MSB_NETWORK`,
    /// `MSB_NETWORK_ALLOW`).
    pub default_network: NetworkPolicy,
    /// The clock that idleness, creation and use times are read from: the system's, or a
    /// manual one in tests.
    pub clock: Clock,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            session_timeout: Duration::from_secs(1800),
            cleanup_interval: Duration::from_secs(60),
            orphan_cleanup_interval: Duration::from_secs(600),
            max_sessions: 10,
            max_total_memory_mb: 10 * 1024,
            lru_eviction: true,
            default_flavor: Flavor::Small,
            default_network: NetworkPolicy::none(),
            clock: Clock::system(),
        }
    }
}

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Its sandbox is being made.
    Creating,
    /// Idle, ready for work.
    Ready,
    /// At least one task runs in it.
    Running,
    /// Stopped; it holds nothing.
    Stopped,
}

/// What is known of a session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Its id.
    pub id: String,
    /// Its template (`python`, `node`, ...).
    pub template: String,
    /// Its size.
    pub flavor: Flavor,
    /// Where it is in its life.
    pub status: SessionStatus,
    /// When it was made, in Unix seconds.
    pub created_at: f64,
    /// When a task last started or ended in it, in Unix seconds.
    pub last_used_at: f64,
    /// Tasks running in it now.
    pub running_tasks: usize,
    /// The backend's name for its sandbox.
    pub sandbox: Option<String>,
    /// Its network policy (`none`, `host`, or `allow` and what it may reach).
    pub network: String,
}

/// Why a session could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// A limit is reached and nothing could be evicted.
    #[error("{limit} limit reached: {current} in use, at most {max}{unit}. {remedy}")]
    LimitReached {
        /// `sessions` or `memory`.
        limit: &'static str,
        /// What is in use now (sessions, or MiB).
        current: u64,
        /// The limit.
        max: u64,
        /// ` MB` for memory, empty for sessions.
        unit: &'static str,
        /// What would lift it, as facts (its `Display` words them for an agent; the names of the
        /// operator's settings are the daemon's to add).
        remedy: LimitRemedy,
    },
    /// No session has that id.
    #[error(
        "session {0:?} does not exist (it expired, was stopped, or never existed); omit session_id to get a new one"
    )]
    NotFound(String),
    /// The session exists with another flavor.
    #[error(
        "session {id:?} is {has}, not {asked}: omit flavor, or use another session for a {asked} sandbox"
    )]
    FlavorMismatch {
        /// The session.
        id: String,
        /// Its flavor.
        has: Flavor,
        /// The flavor asked for.
        asked: Flavor,
    },
    /// The session exists with another network policy, which a later call may not change.
    #[error(
        "session {id:?} has network {has}, not {asked}: a session's network is set when it is made and never widened; omit network (and network_allow), or use another session"
    )]
    NetworkMismatch {
        /// The session.
        id: String,
        /// Its policy, described.
        has: String,
        /// The policy asked for, described.
        asked: String,
    },
    /// The session is claimed by another owner.
    #[error("session {0:?} belongs to another owner")]
    Claimed(String),
    /// The manager is stopping.
    #[error("sessions are shutting down; no new work is accepted")]
    ShuttingDown,
    /// The session's files are not on this host (the microsandbox backend keeps them in its
    /// VM), or it is still being made.
    #[error("the files of session {0:?} cannot be reached from msbd: {1}")]
    NoFiles(String, &'static str),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// What would lift a session or memory limit that refused a session: the facts behind the advice
/// in [`SessionError::LimitReached`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitRemedy {
    /// The flavor alone needs more memory than the limit allows.
    SmallerFlavor {
        /// The flavor asked for.
        flavor: Flavor,
        /// What it needs, in MiB.
        need_mb: u64,
    },
    /// Eviction is on, but every session that could make room is busy running tasks.
    WaitForBusy {
        /// Sessions running tasks.
        busy: usize,
        /// The flavor asked for, when memory is the limit (`None` for the session count).
        memory_for: Option<(Flavor, u64)>,
    },
    /// Eviction is off: idle sessions are kept, so the limit holds until one is stopped.
    EvictionOff {
        /// The flavor asked for, when memory is the limit (`None` for the session count).
        memory_for: Option<(Flavor, u64)>,
    },
}

impl std::fmt::Display for LimitRemedy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LimitRemedy::SmallerFlavor { flavor, need_mb } => write!(
                f,
                "a {flavor} session needs {need_mb} MB on its own: use a smaller flavor, or have \
                 the operator raise the total memory limit"
            ),
            LimitRemedy::WaitForBusy {
                busy,
                memory_for: None,
            } => write!(
                f,
                "all {busy} busy sessions are running tasks: wait for one to finish, reuse a \
                 session, stop one, or have the operator raise the session limit"
            ),
            LimitRemedy::WaitForBusy {
                memory_for: Some((flavor, need_mb)),
                ..
            } => write!(
                f,
                "a {flavor} session needs {need_mb} MB more: use a smaller flavor, stop a \
                 session, wait for a busy one to finish, or have the operator raise the total \
                 memory limit"
            ),
            LimitRemedy::EvictionOff { memory_for: None } => f.write_str(
                "reuse a session, stop one, or have the operator enable LRU eviction of idle \
                 sessions or raise the session limit",
            ),
            LimitRemedy::EvictionOff {
                memory_for: Some((flavor, need_mb)),
            } => write!(
                f,
                "a {flavor} session needs {need_mb} MB more: use a smaller flavor, stop a \
                 session, or have the operator enable LRU eviction of idle sessions or raise the \
                 total memory limit"
            ),
        }
    }
}

/// A session in use by one task: the session stays `running` (and is not expired or evicted)
/// until the lease is dropped.
pub struct SessionLease {
    manager: Arc<Inner>,
    id: String,
    /// Which incarnation of the id this lease belongs to: a session stopped and made again
    /// under the same id is another one, which this lease must not release.
    generation: u64,
    sandbox: SandboxInfo,
}

impl SessionLease {
    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The session's sandbox.
    pub fn sandbox(&self) -> &SandboxInfo {
        &self.sandbox
    }
}

impl Drop for SessionLease {
    fn drop(&mut self) {
        let mut sessions = self.manager.lock();
        if let Some(entry) = sessions.get_mut(&self.id)
            && entry.generation == self.generation
        {
            entry.running = entry.running.saturating_sub(1);
            entry.last_used = self.manager.config.clock.now();
        }
    }
}

/// Decides whether a new session fits, and what to evict to make room.
#[derive(Clone, Debug)]
pub struct ResourceManager {
    max_sessions: usize,
    max_total_memory_mb: u64,
    lru_eviction: bool,
    orphan_cycles: Arc<AtomicU64>,
    orphans_cleaned: Arc<AtomicU64>,
}

/// A session as the resource manager sees it.
#[derive(Clone, Debug)]
pub struct Holding {
    /// The session.
    pub id: String,
    /// Its flavor's memory, in MiB.
    pub memory_mb: u64,
    /// Whether a task runs in it (then it cannot be evicted).
    pub busy: bool,
    /// When it was last used, in Unix seconds.
    pub last_used: f64,
}

/// Resource statistics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceStats {
    /// Sessions alive.
    pub sessions: usize,
    /// The limit on sessions.
    pub max_sessions: usize,
    /// Flavor memory held, in MiB.
    pub memory_mb: u64,
    /// The limit on flavor memory, in MiB.
    pub max_total_memory_mb: u64,
    /// Whether LRU eviction is on.
    pub lru_eviction: bool,
    /// Orphan sweeps run.
    pub total_cleanup_cycles: u64,
    /// Orphans removed by them.
    pub total_orphans_cleaned: u64,
}

impl ResourceManager {
    /// A resource manager with these limits.
    pub fn new(config: &SessionConfig) -> ResourceManager {
        ResourceManager {
            max_sessions: config.max_sessions,
            max_total_memory_mb: config.max_total_memory_mb,
            lru_eviction: config.lru_eviction,
            orphan_cycles: Arc::new(AtomicU64::new(0)),
            orphans_cleaned: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Decides whether a session of `flavor` fits beside `holdings`: the ids to evict first
    /// (least recently used idle sessions), or the limit that refuses it.
    pub fn admit(&self, holdings: &[Holding], flavor: Flavor) -> Result<Vec<String>, SessionError> {
        let want = flavor.memory_mb();
        if want > self.max_total_memory_mb {
            return Err(SessionError::LimitReached {
                limit: "memory",
                current: holdings.iter().map(|h| h.memory_mb).sum(),
                max: self.max_total_memory_mb,
                unit: " MB",
                remedy: LimitRemedy::SmallerFlavor {
                    flavor,
                    need_mb: want,
                },
            });
        }
        let mut idle: Vec<&Holding> = holdings.iter().filter(|h| !h.busy).collect();
        idle.sort_by(|a, b| a.last_used.total_cmp(&b.last_used));
        let mut sessions = holdings.len();
        let mut memory: u64 = holdings.iter().map(|h| h.memory_mb).sum();
        let mut evict = Vec::new();
        let mut candidates = idle.into_iter();
        loop {
            let over_sessions = sessions + 1 > self.max_sessions;
            let over_memory = memory + want > self.max_total_memory_mb;
            if !over_sessions && !over_memory {
                return Ok(evict);
            }
            let next = if self.lru_eviction {
                candidates.next()
            } else {
                None
            };
            let Some(victim) = next else {
                let busy = holdings.iter().filter(|h| h.busy).count();
                return Err(if over_sessions {
                    SessionError::LimitReached {
                        limit: "sessions",
                        current: holdings.len() as u64,
                        max: self.max_sessions as u64,
                        unit: "",
                        remedy: if self.lru_eviction {
                            LimitRemedy::WaitForBusy {
                                busy,
                                memory_for: None,
                            }
                        } else {
                            LimitRemedy::EvictionOff { memory_for: None }
                        },
                    }
                } else {
                    let memory_for = Some((flavor, want));
                    SessionError::LimitReached {
                        limit: "memory",
                        current: holdings.iter().map(|h| h.memory_mb).sum(),
                        max: self.max_total_memory_mb,
                        unit: " MB",
                        remedy: if self.lru_eviction {
                            LimitRemedy::WaitForBusy { busy, memory_for }
                        } else {
                            LimitRemedy::EvictionOff { memory_for }
                        },
                    }
                });
            };
            sessions -= 1;
            memory -= victim.memory_mb;
            evict.push(victim.id.clone());
        }
    }

    /// Records an orphan sweep.
    pub fn record_sweep(&self, report: &SweepReport) {
        self.orphan_cycles.fetch_add(1, Ordering::Relaxed);
        self.orphans_cleaned
            .fetch_add(report.sandboxes as u64, Ordering::Relaxed);
    }
}

/// The sessions of one msbd instance.
#[derive(Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn SandboxBackend>,
    config: SessionConfig,
    resources: ResourceManager,
    sessions: Mutex<HashMap<String, Entry>>,
    /// Who owns which session (see the module docs): sessions live, about to be made, or
    /// named by a client lately.
    claims: Mutex<HashMap<String, Claim>>,
    /// Serializes admission, so that two new sessions cannot both take the last room.
    admission: tokio::sync::Mutex<()>,
    closed: std::sync::atomic::AtomicBool,
    expired_total: AtomicU64,
    generations: AtomicU64,
    started_at: f64,
}

struct Entry {
    generation: u64,
    template: String,
    flavor: Flavor,
    network: NetworkPolicy,
    created: f64,
    last_used: f64,
    running: usize,
    sandbox: Option<SandboxInfo>,
}

/// Who owns a session.
struct Claim {
    owner: Arc<str>,
    /// Made for one task that named no session: the claim ends with the session.
    fresh: bool,
    /// When it was claimed, or when its session ended (clock seconds).
    since: f64,
}

/// How long the claim of a session that is not live is kept: after a named session ends, or
/// while a claimed session waits to be made.
pub const CLAIM_KEPT: Duration = Duration::from_secs(24 * 3600);

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn claims(&self) -> MutexGuard<'_, HashMap<String, Claim>> {
        self.claims.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A session ended: a fresh session's claim goes with it; a named one's is kept
    /// [`CLAIM_KEPT`] from now.
    fn ended(&self, id: &str) {
        let mut claims = self.claims();
        match claims.get_mut(id) {
            Some(claim) if claim.fresh => {
                claims.remove(id);
            }
            Some(claim) => claim.since = self.config.clock.now(),
            None => {}
        }
    }
}

/// A fresh session id: `s` and 20 random hex digits (80 bits: knowing it is what lets a client
/// name the session again, so it is not guessable).
pub fn fresh_session_id() -> String {
    format!("s{:020x}", rand::random::<u128>() >> 48)
}

impl SessionManager {
    /// A session manager on a backend.
    pub fn new(backend: Arc<dyn SandboxBackend>, config: SessionConfig) -> SessionManager {
        let started_at = config.clock.now();
        SessionManager {
            inner: Arc::new(Inner {
                backend,
                resources: ResourceManager::new(&config),
                config,
                sessions: Mutex::new(HashMap::new()),
                claims: Mutex::new(HashMap::new()),
                admission: tokio::sync::Mutex::new(()),
                closed: std::sync::atomic::AtomicBool::new(false),
                expired_total: AtomicU64::new(0),
                generations: AtomicU64::new(0),
                started_at,
            }),
        }
    }

    /// The backend sessions run on.
    pub fn backend(&self) -> &Arc<dyn SandboxBackend> {
        &self.inner.backend
    }

    /// The settings.
    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    /// The resource manager.
    pub fn resources(&self) -> &ResourceManager {
        &self.inner.resources
    }

    /// Takes a session for one task: the named one (made if it does not exist yet), or a new
    /// one. Makes room by evicting idle sessions, or refuses at a limit. `network`: the policy
    /// asked for (a named session that has another refuses); `None`, the session's own, or the
    /// default for a new one.
    pub async fn acquire(
        &self,
        id: Option<&str>,
        flavor: Option<Flavor>,
        template: &str,
        network: Option<&NetworkPolicy>,
    ) -> Result<SessionLease, SessionError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(SessionError::ShuttingDown);
        }
        if let Some(id) = id {
            crate::backend::local::validate_session_id(id)?;
            if let Some(lease) = self.take_existing(id, flavor, network)? {
                return Ok(lease);
            }
        }
        let _admission = inner.admission.lock().await;
        // It may have been made while we waited.
        if let Some(id) = id
            && let Some(lease) = self.take_existing(id, flavor, network)?
        {
            return Ok(lease);
        }
        let flavor = flavor.unwrap_or(inner.config.default_flavor);
        let network = network.unwrap_or(&inner.config.default_network).clone();
        let id = id.map_or_else(fresh_session_id, str::to_owned);
        // Evict what admission names; if a victim got busy meanwhile (a task took it), nothing
        // was freed: look again, a few times at most.
        let mut rounds = 0;
        loop {
            let holdings: Vec<Holding> = inner
                .lock()
                .iter()
                .map(|(id, e)| Holding {
                    id: id.clone(),
                    memory_mb: e.flavor.memory_mb(),
                    busy: e.running > 0 || e.sandbox.is_none(),
                    last_used: e.last_used,
                })
                .collect();
            let evict = inner.resources.admit(&holdings, flavor)?;
            let mut all_freed = true;
            for victim in evict {
                tracing::info!(session = %victim, "evicting the least recently used idle session to make room");
                all_freed &= self.stop_if_idle_admitted(&victim).await?;
            }
            rounds += 1;
            if all_freed || rounds == 5 {
                break;
            }
        }
        let created = self.inner.config.clock.now();
        let generation = inner.generations.fetch_add(1, Ordering::Relaxed);
        inner.lock().insert(
            id.clone(),
            Entry {
                generation,
                template: template.to_owned(),
                flavor,
                network: network.clone(),
                created,
                last_used: created,
                running: 1,
                sandbox: None,
            },
        );
        let spec = SandboxSpec {
            session_id: id.clone(),
            flavor,
            template: template.to_owned(),
            volumes: Vec::new(),
            network,
        };
        // If this future is dropped while the backend creates (a handler past its grace, say),
        // the half-made entry must not stay behind holding room forever.
        let mut pending = PendingEntry {
            inner,
            id: &id,
            generation,
            armed: true,
        };
        let created = inner.backend.create(&spec).await;
        pending.armed = false;
        drop(pending);
        match created {
            Ok(sandbox) => {
                if let Some(entry) = inner.lock().get_mut(&id) {
                    entry.sandbox = Some(sandbox.clone());
                }
                Ok(SessionLease {
                    manager: inner.clone(),
                    id,
                    generation,
                    sandbox,
                })
            }
            Err(error) => {
                inner.lock().remove(&id);
                inner.ended(&id);
                Err(error.into())
            }
        }
    }

    fn take_existing(
        &self,
        id: &str,
        flavor: Option<Flavor>,
        network: Option<&NetworkPolicy>,
    ) -> Result<Option<SessionLease>, SessionError> {
        let mut sessions = self.inner.lock();
        let Some(entry) = sessions.get_mut(id) else {
            return Ok(None);
        };
        if let Some(asked) = network
            && *asked != entry.network
        {
            return Err(SessionError::NetworkMismatch {
                id: id.to_owned(),
                has: entry.network.describe(),
                asked: asked.describe(),
            });
        }
        if let Some(asked) = flavor
            && asked != entry.flavor
        {
            return Err(SessionError::FlavorMismatch {
                id: id.to_owned(),
                has: entry.flavor,
                asked,
            });
        }
        let Some(sandbox) = entry.sandbox.clone() else {
            // Still being made by another task: wait for admission, which the maker holds.
            return Ok(None);
        };
        entry.running += 1;
        entry.last_used = self.inner.config.clock.now();
        Ok(Some(SessionLease {
            manager: self.inner.clone(),
            id: id.to_owned(),
            generation: entry.generation,
            sandbox,
        }))
    }

    /// Stops a session if no task runs in it. Takes the admission lock, so that no acquire of
    /// the same id can make it again before its sandbox is gone.
    async fn stop_if_idle(&self, id: &str) -> Result<bool, SessionError> {
        let _admission = self.inner.admission.lock().await;
        self.stop_if_idle_admitted(id).await
    }

    /// [`SessionManager::stop_if_idle`] for a caller that holds the admission lock.
    async fn stop_if_idle_admitted(&self, id: &str) -> Result<bool, SessionError> {
        let sandbox = {
            let mut sessions = self.inner.lock();
            match sessions.get(id) {
                Some(entry) if entry.running == 0 => sessions.remove(id).and_then(|e| e.sandbox),
                _ => return Ok(false),
            }
        };
        self.inner.ended(id);
        if let Some(sandbox) = sandbox {
            self.inner.backend.stop(&sandbox).await?;
        }
        Ok(true)
    }

    /// Stops a session: kills what runs in it and removes its files.
    pub async fn stop(&self, id: &str) -> Result<SessionInfo, SessionError> {
        // No acquire makes the id again until its sandbox is gone.
        let _admission = self.inner.admission.lock().await;
        let entry = self
            .inner
            .lock()
            .remove(id)
            .ok_or_else(|| SessionError::NotFound(id.to_owned()))?;
        self.inner.ended(id);
        if let Some(sandbox) = &entry.sandbox {
            self.inner.backend.stop(sandbox).await?;
        }
        Ok(info(id, &entry, SessionStatus::Stopped))
    }

    /// Forgets a session whose sandbox is gone (the backend stopped it, or its server lost
    /// it), so that the next use of the id makes a fresh one.
    pub fn forget(&self, lease: &SessionLease) -> bool {
        let mut sessions = self.inner.lock();
        match sessions.get(&lease.id) {
            Some(entry) if entry.generation == lease.generation => {
                sessions.remove(&lease.id);
                drop(sessions);
                self.inner.ended(&lease.id);
                true
            }
            _ => false,
        }
    }

    /// Stops every session (at shutdown); no new session is made afterwards.
    pub async fn stop_all(&self) -> usize {
        self.inner.closed.store(true, Ordering::Release);
        let _admission = self.inner.admission.lock().await;
        let entries: Vec<(String, Entry)> = self.inner.lock().drain().collect();
        let mut stopped = 0;
        for (id, entry) in entries {
            if let Some(sandbox) = entry.sandbox {
                match self.inner.backend.stop(&sandbox).await {
                    Ok(()) => stopped += 1,
                    Err(error) => tracing::warn!(session = %id, %error, "could not stop a session"),
                }
            }
        }
        stopped
    }

    /// One session.
    pub fn get(&self, id: &str) -> Result<SessionInfo, SessionError> {
        let sessions = self.inner.lock();
        let entry = sessions
            .get(id)
            .ok_or_else(|| SessionError::NotFound(id.to_owned()))?;
        Ok(info(id, entry, status_of(entry)))
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let sessions = self.inner.lock();
        let mut list: Vec<SessionInfo> = sessions
            .iter()
            .map(|(id, e)| info(id, e, status_of(e)))
            .collect();
        list.sort_by(|a, b| a.created_at.total_cmp(&b.created_at).then(a.id.cmp(&b.id)));
        list
    }

    /// The work directory of live session `id`, open for [`crate::files`]; the access counts
    /// as a use (the session's idle time starts again).
    pub fn workspace(&self, id: &str) -> Result<crate::files::Workspace, SessionError> {
        let work_dir = {
            let mut sessions = self.inner.lock();
            let entry = sessions
                .get_mut(id)
                .ok_or_else(|| SessionError::NotFound(id.to_owned()))?;
            let Some(sandbox) = &entry.sandbox else {
                return Err(SessionError::NoFiles(
                    id.to_owned(),
                    "it is still being made; try again in a moment",
                ));
            };
            let Some(work_dir) = sandbox.work_dir.clone() else {
                return Err(SessionError::NoFiles(
                    id.to_owned(),
                    "its backend keeps them inside its sandbox",
                ));
            };
            entry.last_used = self.inner.config.clock.now();
            work_dir
        };
        crate::files::Workspace::open(&work_dir).map_err(|e| match e {
            crate::files::FileError::Unsupported => SessionError::NoFiles(
                id.to_owned(),
                "this host's kernel cannot resolve paths beneath a directory (openat2, Linux 5.6 and later)",
            ),
            other => SessionError::Backend(crate::backend::BackendError::Unavailable(
                other.to_string(),
            )),
        })
    }

    /// The ids of live sessions.
    pub fn live_ids(&self) -> HashSet<String> {
        self.inner.lock().keys().cloned().collect()
    }

    /// Claims session `id` for `owner`: done when nobody had claimed it, or `owner` had;
    /// [`SessionError::Claimed`] when another owner has. `fresh`: the session is made for one
    /// task that named none, and the claim ends with it (a session also named by a client is
    /// not fresh, whichever claim came first).
    pub fn claim(&self, id: &str, owner: &str, fresh: bool) -> Result<(), SessionError> {
        let now = self.inner.config.clock.now();
        let mut claims = self.inner.claims();
        match claims.get_mut(id) {
            Some(claim) if *claim.owner == *owner => {
                claim.fresh &= fresh;
                claim.since = now;
                Ok(())
            }
            Some(_) => Err(SessionError::Claimed(id.to_owned())),
            None => {
                claims.insert(
                    id.to_owned(),
                    Claim {
                        owner: owner.into(),
                        fresh,
                        since: now,
                    },
                );
                Ok(())
            }
        }
    }

    /// What live session `id`'s sandbox uses now (memory, CPU time, processes), as far as the
    /// backend measures it: every field is `None` for a session whose sandbox is still being
    /// made, and where the host gives no measure (no cgroups, say).
    pub async fn usage(&self, id: &str) -> Result<SandboxMetrics, SessionError> {
        let sandbox = self
            .inner
            .lock()
            .get(id)
            .ok_or_else(|| SessionError::NotFound(id.to_owned()))?
            .sandbox
            .clone();
        match sandbox {
            Some(sandbox) => Ok(self.inner.backend.metrics(&sandbox).await?),
            None => Ok(SandboxMetrics::default()),
        }
    }

    /// Who has claimed session `id`, if anyone.
    pub fn owner_of(&self, id: &str) -> Option<String> {
        self.inner
            .claims()
            .get(id)
            .map(|claim| claim.owner.to_string())
    }

    /// Whether `owner` has claimed session `id`.
    pub fn claimed_by(&self, id: &str, owner: &str) -> bool {
        self.inner
            .claims()
            .get(id)
            .is_some_and(|claim| *claim.owner == *owner)
    }

    /// How many claims are kept (live sessions, sessions about to be made, named sessions
    /// that ended lately).
    pub fn claim_count(&self) -> usize {
        self.inner.claims().len()
    }

    /// Forgets the claims of sessions that are not live and were claimed, or ended, longer
    /// than [`CLAIM_KEPT`] ago. Part of each round of the session cleanup loop.
    fn forget_old_claims(&self) {
        let cutoff = self.inner.config.clock.now() - CLAIM_KEPT.as_secs_f64();
        let sessions = self.inner.lock();
        self.inner
            .claims()
            .retain(|id, claim| claim.since >= cutoff || sessions.contains_key(id));
    }

    /// One round of the session cleanup loop: stops sessions idle longer than the timeout, and
    /// forgets old claims of sessions that are gone. Returns how many sessions it stopped.
    pub async fn expire_idle(&self) -> Result<u64, SessionError> {
        self.forget_old_claims();
        let timeout = self.inner.config.session_timeout.as_secs_f64();
        let cutoff = self.inner.config.clock.now() - timeout;
        let idle: Vec<String> = self
            .inner
            .lock()
            .iter()
            .filter(|(_, e)| e.running == 0 && e.sandbox.is_some() && e.last_used < cutoff)
            .map(|(id, _)| id.clone())
            .collect();
        let mut expired = 0;
        for id in idle {
            if self.stop_if_idle(&id).await? {
                tracing::info!(session = %id, "stopped a session idle longer than the session timeout");
                expired += 1;
            }
        }
        self.inner
            .expired_total
            .fetch_add(expired, Ordering::Relaxed);
        Ok(expired)
    }

    /// One round of the orphan cleanup loop: removes this instance's sandboxes that belong to no
    /// live session. Returns what it removed.
    pub async fn sweep_orphans(&self) -> Result<SweepReport, SessionError> {
        let live = self.live_ids();
        let report = self.inner.backend.sweep_orphans(&live).await?;
        self.inner.resources.record_sweep(&report);
        if report.total() > 0 {
            tracing::warn!(?report, "removed orphaned sandboxes");
        }
        Ok(report)
    }

    /// Resource statistics.
    pub fn resource_stats(&self) -> ResourceStats {
        let sessions = self.inner.lock();
        ResourceStats {
            sessions: sessions.len(),
            max_sessions: self.inner.resources.max_sessions,
            memory_mb: sessions.values().map(|e| e.flavor.memory_mb()).sum(),
            max_total_memory_mb: self.inner.resources.max_total_memory_mb,
            lru_eviction: self.inner.resources.lru_eviction,
            total_cleanup_cycles: self.inner.resources.orphan_cycles.load(Ordering::Relaxed),
            total_orphans_cleaned: self.inner.resources.orphans_cleaned.load(Ordering::Relaxed),
        }
    }

    /// Sessions expired since start.
    pub fn expired_total(&self) -> u64 {
        self.inner.expired_total.load(Ordering::Relaxed)
    }

    /// When the manager started, in Unix seconds.
    pub fn started_at(&self) -> f64 {
        self.inner.started_at
    }
}

/// Removes a session entry whose creation was abandoned (see `acquire`).
struct PendingEntry<'a> {
    inner: &'a Arc<Inner>,
    id: &'a str,
    generation: u64,
    armed: bool,
}

impl Drop for PendingEntry<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut sessions = self.inner.lock();
        if sessions
            .get(self.id)
            .is_some_and(|e| e.generation == self.generation)
        {
            sessions.remove(self.id);
            drop(sessions);
            self.inner.ended(self.id);
        }
    }
}

fn status_of(entry: &Entry) -> SessionStatus {
    match (&entry.sandbox, entry.running) {
        (None, _) => SessionStatus::Creating,
        (Some(_), 0) => SessionStatus::Ready,
        (Some(_), _) => SessionStatus::Running,
    }
}

fn info(id: &str, entry: &Entry, status: SessionStatus) -> SessionInfo {
    SessionInfo {
        id: id.to_owned(),
        template: entry.template.clone(),
        flavor: entry.flavor,
        status,
        created_at: entry.created,
        last_used_at: entry.last_used,
        network: entry.network.describe(),
        running_tasks: entry.running,
        sandbox: entry.sandbox.as_ref().map(|s| s.name.clone()),
    }
}
