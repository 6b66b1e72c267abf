//! Sessions and resources against the real local backend: fresh and named sessions, reuse and
//! sharing, id and flavor checks, the session and memory limits with and without LRU eviction,
//! idle expiry, stop, stop_all, and the orphan sweep through the manager. `ResourceManager::admit`
//! is also tested on its own, as the pure function it is.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sandbox_wrapper::Clock;
use sandbox_wrapper::backend::local::{LocalBackend, LocalConfig};
use sandbox_wrapper::backend::{BackendError, Flavor, SandboxBackend};
use sandbox_wrapper::session::{
    CLAIM_KEPT, Holding, LimitRemedy, ResourceManager, SessionConfig, SessionError, SessionLease,
    SessionManager, SessionStatus,
};

/// Stops every sandbox its backend still holds when dropped, so that a failing test leaves no
/// cgroup or directory behind (a test that passes has stopped them already).
struct Cleanup(Arc<LocalBackend>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let backend = self.0.clone();
        // Drop cannot await: stop them on a runtime of their own, on a thread of their own.
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                for sandbox in backend.list().await.unwrap_or_default() {
                    let _ = backend.stop(&sandbox).await;
                }
            });
        })
        .join();
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    marker: String,
    manager: SessionManager,
    _cleanup: Cleanup,
}

/// A session manager on a real local backend with its own data directory and its own instance
/// marker, so that concurrent tests never sweep each other.
fn fixture(config: SessionConfig) -> Fixture {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = tempfile::tempdir().unwrap();
    let marker = format!(
        "sess{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let backend = Arc::new(
        LocalBackend::new(LocalConfig::new(dir.path().join("data"), marker.clone())).unwrap(),
    );
    let report = backend.isolation_report();
    eprintln!(
        "isolation: {:?} — {} (missing: {:?})",
        report.level, report.layers, report.missing
    );
    let manager = SessionManager::new(backend.clone(), config);
    Fixture {
        dir,
        marker,
        manager,
        _cleanup: Cleanup(backend),
    }
}

/// Limits for a test: generous timeouts, the given limits.
fn limits(max_sessions: usize, max_total_memory_mb: u64, lru_eviction: bool) -> SessionConfig {
    SessionConfig {
        max_sessions,
        max_total_memory_mb,
        lru_eviction,
        ..SessionConfig::default()
    }
}

impl Fixture {
    async fn acquire(&self, id: &str) -> SessionLease {
        self.manager
            .acquire(Some(id), None, "python", None)
            .await
            .unwrap()
    }

    async fn acquire_flavor(&self, id: &str, flavor: Flavor) -> SessionLease {
        self.manager
            .acquire(Some(id), Some(flavor), "python", None)
            .await
            .unwrap()
    }

    /// Makes (or reuses) a session and leaves it idle; returns its work directory.
    async fn idle(&self, id: &str, flavor: Flavor) -> PathBuf {
        let lease = self.acquire_flavor(id, flavor).await;
        work_dir(&lease)
    }

    /// Uses a session for a moment, making it the most recently used.
    async fn touch(&self, id: &str) {
        drop(self.acquire(id).await);
    }

    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.manager.live_ids().into_iter().collect();
        ids.sort();
        ids
    }

    fn sandboxes_dir(&self) -> PathBuf {
        self.dir.path().join("data").join("sandboxes")
    }
}

fn work_dir(lease: &SessionLease) -> PathBuf {
    lease
        .sandbox()
        .work_dir
        .clone()
        .expect("a local sandbox has a work directory")
}

/// The error of an acquire that must fail (a lease has no `Debug`, so no `unwrap_err`).
fn refused(result: Result<SessionLease, SessionError>) -> SessionError {
    match result {
        Ok(lease) => panic!(
            "expected a refusal, got session {:?} ({:?})",
            lease.id(),
            lease.sandbox()
        ),
        Err(error) => error,
    }
}

fn is_fresh_id(id: &str) -> bool {
    id.len() == 21
        && id.starts_with('s')
        && id[1..]
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
}

// ---------------------------------------------------------------------------------------------
// Acquire: fresh, named, reused, shared.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_without_an_id_makes_a_fresh_session_running_while_leased_and_ready_after() {
    let f = fixture(SessionConfig::default());
    let lease = f.manager.acquire(None, None, "python", None).await.unwrap();
    let id = lease.id().to_owned();
    assert!(is_fresh_id(&id), "{id:?} is not `s` and 20 hex digits");
    assert_eq!(lease.sandbox().session_id, id);
    assert!(work_dir(&lease).is_dir());

    let info = f.manager.get(&id).unwrap();
    assert_eq!(info.status, SessionStatus::Running, "{info:?}");
    assert_eq!(info.running_tasks, 1);
    assert_eq!(info.flavor, Flavor::Small, "the default flavor");
    assert_eq!(info.template, "python");
    assert_eq!(info.sandbox.as_deref(), Some(lease.sandbox().name.as_str()));
    assert!(
        lease.sandbox().name.contains(&f.marker),
        "{:?} does not carry the instance marker {:?}",
        lease.sandbox().name,
        f.marker
    );

    let other = f.manager.acquire(None, None, "python", None).await.unwrap();
    assert!(is_fresh_id(other.id()), "{:?}", other.id());
    assert_ne!(other.id(), id, "two fresh sessions got the same id");
    assert_ne!(work_dir(&other), work_dir(&lease));

    drop(lease);
    let after = f.manager.get(&id).unwrap();
    assert_eq!(after.status, SessionStatus::Ready, "{after:?}");
    assert_eq!(after.running_tasks, 0);
    assert!(
        after.last_used_at >= info.last_used_at,
        "{after:?} {info:?}"
    );
    assert_eq!(
        f.manager.get(other.id()).unwrap().status,
        SessionStatus::Running
    );
    assert_eq!(f.manager.list().len(), 2);
    assert_eq!(f.manager.resource_stats().sessions, 2);
    drop(other);
    assert_eq!(f.manager.stop_all().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_with_an_id_makes_the_session_on_first_use_and_reuses_it_after() {
    let f = fixture(SessionConfig::default());
    assert!(matches!(
        f.manager.get("mine"),
        Err(SessionError::NotFound(_))
    ));
    let first = f.acquire("mine").await;
    assert_eq!(first.id(), "mine");
    assert_eq!(first.sandbox().session_id, "mine");
    let dir = work_dir(&first);
    assert!(dir.starts_with(f.sandboxes_dir().join("mine")), "{dir:?}");
    std::fs::write(dir.join("kept.txt"), "still here").unwrap();
    let sandbox = first.sandbox().clone();
    let created = f.manager.get("mine").unwrap().created_at;
    drop(first);

    let again = f.acquire("mine").await;
    assert_eq!(again.sandbox(), &sandbox, "reuse made another sandbox");
    assert_eq!(work_dir(&again), dir);
    assert_eq!(
        std::fs::read_to_string(dir.join("kept.txt")).unwrap(),
        "still here"
    );
    let info = f.manager.get("mine").unwrap();
    assert_eq!(info.created_at, created, "reuse re-created the session");
    assert_eq!(info.status, SessionStatus::Running);
    assert_eq!(f.ids(), ["mine"]);
    drop(again);
    assert_eq!(f.manager.stop_all().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_acquire_of_the_same_id_shares_the_session() {
    let f = fixture(SessionConfig::default());
    // Both race to make it: one makes it, the other waits for it and joins.
    let (one, two) = tokio::join!(
        tokio::spawn({
            let manager = f.manager.clone();
            async move { manager.acquire(Some("shared"), None, "python", None).await }
        }),
        tokio::spawn({
            let manager = f.manager.clone();
            async move { manager.acquire(Some("shared"), None, "python", None).await }
        }),
    );
    let one = one.unwrap().unwrap();
    let two = two.unwrap().unwrap();
    assert_eq!(one.sandbox(), two.sandbox());
    assert_eq!(f.ids(), ["shared"]);
    let info = f.manager.get("shared").unwrap();
    assert_eq!(info.running_tasks, 2, "{info:?}");
    assert_eq!(info.status, SessionStatus::Running);

    // A third, while both are held.
    let three = f.acquire("shared").await;
    assert_eq!(three.sandbox(), one.sandbox());
    assert_eq!(f.manager.get("shared").unwrap().running_tasks, 3);

    drop(three);
    drop(one);
    let info = f.manager.get("shared").unwrap();
    assert_eq!(
        (info.running_tasks, info.status),
        (1, SessionStatus::Running)
    );
    drop(two);
    let info = f.manager.get("shared").unwrap();
    assert_eq!((info.running_tasks, info.status), (0, SessionStatus::Ready));
    assert_eq!(f.manager.stop_all().await, 1);
}

// ---------------------------------------------------------------------------------------------
// Refusals: ids and flavors.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_session_id_is_refused_with_a_message_naming_the_rule() {
    let f = fixture(SessionConfig::default());
    let long = "a".repeat(65);
    for bad in ["../x", "", long.as_str(), "a/b", "a b", "é"] {
        let error = refused(f.manager.acquire(Some(bad), None, "python", None).await);
        assert!(
            matches!(
                error,
                SessionError::Backend(BackendError::InvalidRequest(_))
            ),
            "{bad:?}: {error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("1 to 64 letters, digits, '-' or '_'"),
            "{bad:?}: {message}"
        );
        assert!(message.contains(&format!("{bad:?}")), "{bad:?}: {message}");
    }
    assert!(f.manager.list().is_empty());
    assert!(!f.dir.path().join("data").join("x").exists());
    assert!(!f.dir.path().join("x").exists());

    // The boundary: 64 characters, and every allowed kind of character, are fine.
    let longest = "b".repeat(64);
    drop(f.acquire(&longest).await);
    drop(f.acquire("Az09-_").await);
    assert_eq!(f.manager.list().len(), 2);
    assert_eq!(f.manager.stop_all().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flavor_mismatch_on_an_existing_session_is_refused_naming_both_flavors() {
    let f = fixture(SessionConfig::default());
    f.idle("sized", Flavor::Medium).await;

    let error = refused(
        f.manager
            .acquire(Some("sized"), Some(Flavor::Small), "python", None)
            .await,
    );
    match &error {
        SessionError::FlavorMismatch { id, has, asked } => {
            assert_eq!(
                (id.as_str(), *has, *asked),
                ("sized", Flavor::Medium, Flavor::Small)
            );
        }
        other => panic!("expected FlavorMismatch, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains("medium") && message.contains("small") && message.contains("sized"),
        "{message}"
    );
    assert!(message.contains("omit flavor"), "{message}");

    // Refused while busy too, and the refusal takes no share of it.
    let held = f.acquire("sized").await;
    let error = refused(
        f.manager
            .acquire(Some("sized"), Some(Flavor::Large), "python", None)
            .await,
    );
    assert!(error.to_string().contains("large"), "{error}");
    let info = f.manager.get("sized").unwrap();
    assert_eq!((info.flavor, info.running_tasks), (Flavor::Medium, 1));
    drop(held);

    // The same flavor, or none, is fine.
    drop(f.acquire_flavor("sized", Flavor::Medium).await);
    drop(f.acquire("sized").await);
    assert_eq!(f.manager.get("sized").unwrap().running_tasks, 0);
    assert_eq!(f.manager.stop_all().await, 1);
}

// ---------------------------------------------------------------------------------------------
// The session limit.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_session_limit_lru_eviction_stops_the_least_recently_used_idle_session() {
    let f = fixture(limits(2, 100 * 1024, true));
    let a = f.idle("a", Flavor::Small).await;
    let b = f.idle("b", Flavor::Small).await;
    // "a" was made first but used last: "b" is the least recently used.
    f.touch("a").await;

    let c = f.acquire("c").await;
    assert!(
        !b.exists(),
        "the evicted session's work directory is still there"
    );
    assert!(matches!(f.manager.get("b"), Err(SessionError::NotFound(_))));
    assert!(a.is_dir(), "the recently used session was evicted");
    assert!(work_dir(&c).is_dir());
    assert_eq!(f.ids(), ["a", "c"]);
    assert_eq!(f.manager.resource_stats().sessions, 2);

    // Again: "a" is now the only idle one, so it goes even though "c" is newer.
    let d = f.acquire("d").await;
    assert!(!a.exists());
    assert_eq!(f.ids(), ["c", "d"]);
    drop((c, d));
    assert_eq!(f.manager.stop_all().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_session_limit_with_every_session_busy_the_error_is_sessions_limit_reached() {
    let f = fixture(limits(2, 100 * 1024, true));
    let a = f.acquire("a").await;
    let b = f.acquire("b").await;

    let error = refused(f.manager.acquire(None, None, "python", None).await);
    match &error {
        SessionError::LimitReached {
            limit,
            current,
            max,
            ..
        } => assert_eq!((*limit, *current, *max), ("sessions", 2, 2)),
        other => panic!("expected LimitReached, got {other:?}"),
    }
    let message = error.to_string();
    assert!(message.contains("sessions limit reached"), "{message}");
    assert!(message.contains("busy"), "{message}");
    assert!(message.contains("wait for one to finish"), "{message}");
    assert!(message.contains("raise the session limit"), "{message}");
    // A named new session is refused the same way, and nothing busy was touched.
    let error = refused(f.manager.acquire(Some("c"), None, "python", None).await);
    assert!(
        matches!(
            error,
            SessionError::LimitReached {
                limit: "sessions",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(!f.sandboxes_dir().join("c").exists());
    assert!(work_dir(&a).is_dir() && work_dir(&b).is_dir());
    assert_eq!(f.ids(), ["a", "b"]);

    // Joining an existing session is not a new session: it is not refused at the limit.
    let a2 = f.acquire("a").await;
    assert_eq!(f.manager.get("a").unwrap().running_tasks, 2);

    // Once one is idle, a new session evicts it.
    let b_dir = work_dir(&b);
    drop(b);
    let c = f.acquire("c").await;
    assert!(!b_dir.exists());
    assert_eq!(f.ids(), ["a", "c"]);
    drop((a, a2, c));
    assert_eq!(f.manager.stop_all().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_lru_eviction_the_session_limit_refuses_naming_the_limit_and_the_settings() {
    let f = fixture(limits(1, 100 * 1024, false));
    let a = f.idle("a", Flavor::Small).await;

    let error = refused(f.manager.acquire(Some("b"), None, "python", None).await);
    assert!(
        matches!(
            error,
            SessionError::LimitReached {
                limit: "sessions",
                current: 1,
                max: 1,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("sessions limit reached"), "{message}");
    assert!(message.contains("raise the session limit"), "{message}");
    assert!(message.contains("enable LRU eviction"), "{message}");
    // The idle session was not evicted, and nothing of "b" was made.
    assert!(a.is_dir());
    assert_eq!(f.ids(), ["a"]);
    assert!(!f.sandboxes_dir().join("b").exists());
    assert_eq!(f.manager.get("a").unwrap().status, SessionStatus::Ready);

    // Reusing the session that is there still works; stopping it makes room.
    f.touch("a").await;
    f.manager.stop("a").await.unwrap();
    drop(f.acquire("b").await);
    assert_eq!(f.ids(), ["b"]);
    assert_eq!(f.manager.stop_all().await, 1);
}

// ---------------------------------------------------------------------------------------------
// The memory limit.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_larger_than_the_memory_limit_is_refused_outright() {
    let f = fixture(limits(10, 3072, true));
    let dirs = [
        f.idle("a", Flavor::Small).await,
        f.idle("b", Flavor::Small).await,
        f.idle("c", Flavor::Small).await,
    ];

    let error = refused(
        f.manager
            .acquire(None, Some(Flavor::Large), "python", None)
            .await,
    );
    assert!(
        matches!(
            error,
            SessionError::LimitReached {
                limit: "memory",
                max: 3072,
                unit: " MB",
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("memory limit reached"), "{message}");
    assert!(message.contains("3072 MB"), "{message}");
    assert!(message.contains("4096 MB"), "{message}");
    assert!(message.contains("large"), "{message}");
    assert!(
        message.contains("raise the total memory limit"),
        "{message}"
    );
    // Nothing was evicted for a session that could never fit.
    assert_eq!(f.ids(), ["a", "b", "c"]);
    assert!(dirs.iter().all(|d| d.is_dir()));
    assert_eq!(f.manager.resource_stats().memory_mb, 3072);
    assert_eq!(f.manager.stop_all().await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_medium_session_evicts_idle_small_ones_oldest_used_first() {
    let f = fixture(limits(10, 3072, true));
    let a = f.idle("a", Flavor::Small).await;
    let b = f.idle("b", Flavor::Small).await;
    let c = f.idle("c", Flavor::Small).await;
    // Least recently used first: b, c, a.
    f.touch("a").await;

    // 3072 held + 2048 wanted: two of the three must go, the two least recently used.
    let m = f.acquire_flavor("m", Flavor::Medium).await;
    assert!(!b.exists(), "b (least recently used) was kept");
    assert!(!c.exists(), "c (second least recently used) was kept");
    assert!(a.is_dir(), "a (most recently used) was evicted");
    assert_eq!(f.ids(), ["a", "m"]);
    let stats = f.manager.resource_stats();
    assert_eq!((stats.sessions, stats.memory_mb), (2, 3072), "{stats:?}");
    let m_dir = work_dir(&m);
    drop(m);

    // Now "m" is older than "a": a small one needs 1024 more, and exactly the older one goes,
    // although it is the bigger one.
    f.touch("a").await;
    let d = f.acquire_flavor("d", Flavor::Small).await;
    assert!(!m_dir.exists(), "m (least recently used) was kept");
    assert!(a.is_dir(), "a (most recently used) was evicted");
    assert_eq!(f.ids(), ["a", "d"]);
    assert_eq!(f.manager.resource_stats().memory_mb, 2048);
    drop(d);
    assert_eq!(f.manager.stop_all().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_medium_session_is_refused_when_only_busy_sessions_could_make_room() {
    let f = fixture(limits(10, 3072, true));
    let a = f.acquire_flavor("a", Flavor::Small).await;
    let b = f.acquire_flavor("b", Flavor::Small).await;
    let c = f.idle("c", Flavor::Small).await;

    // Evicting the one idle session frees 1024, not enough for 2048: refuse, and evict nothing.
    let error = refused(
        f.manager
            .acquire(None, Some(Flavor::Medium), "python", None)
            .await,
    );
    assert!(
        matches!(
            error,
            SessionError::LimitReached {
                limit: "memory",
                current: 3072,
                max: 3072,
                ..
            }
        ),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("2048 MB"), "{message}");
    assert!(message.contains("3072 MB"), "{message}");
    assert!(
        c.is_dir(),
        "an idle session was evicted for a refused request"
    );
    assert_eq!(f.ids(), ["a", "b", "c"]);
    drop((a, b));
    assert_eq!(f.manager.stop_all().await, 3);
}

// ---------------------------------------------------------------------------------------------
// ResourceManager::admit, on its own.
// ---------------------------------------------------------------------------------------------

fn held(id: &str, flavor: Flavor, busy: bool, last_used: f64) -> Holding {
    Holding {
        id: id.to_owned(),
        memory_mb: flavor.memory_mb(),
        busy,
        last_used,
    }
}

enum Want {
    /// Exactly these evictions, in this order.
    Evict(&'static [&'static str]),
    /// Exactly one eviction, any of these (a tie).
    EvictOneOf(&'static [&'static str]),
    /// Refused at this limit, with this in the message.
    Refuse(&'static str, &'static str),
}

/// A case of `admit`: its name, the limits (`max_sessions`, `max_total_memory_mb`,
/// `lru_eviction`), the sessions held, the flavor asked for, and the answer wanted.
type Case = (&'static str, (usize, u64, bool), Vec<Holding>, Flavor, Want);

#[test]
fn admit_evicts_least_recently_used_idle_sessions_and_never_busy_ones() {
    use Flavor::{Large, Medium, Small};
    const BIG: u64 = 100 * 1024;
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("nothing held", (2, BIG, true), vec![], Small, Want::Evict(&[])),
        ("room left", (3, BIG, true),
            vec![held("a", Small, false, 1.0), held("b", Small, true, 2.0)],
            Small, Want::Evict(&[])),
        ("exactly at the memory limit fits", (10, 3072, true),
            vec![held("a", Small, false, 1.0)], Medium, Want::Evict(&[])),
        ("session limit: the least recently used idle one goes", (2, BIG, true),
            vec![held("a", Small, false, 3.0), held("b", Small, false, 1.0)],
            Small, Want::Evict(&["b"])),
        ("session limit: a busy oldest is skipped", (3, BIG, true),
            vec![held("a", Small, true, 1.0), held("b", Small, false, 2.0),
                 held("c", Small, false, 3.0)],
            Small, Want::Evict(&["b"])),
        ("session limit: a tie between idle ones evicts one of them", (2, BIG, true),
            vec![held("a", Small, false, 5.0), held("b", Small, false, 5.0)],
            Small, Want::EvictOneOf(&["a", "b"])),
        ("session limit: a tie between busy and idle evicts the idle one", (2, BIG, true),
            vec![held("a", Small, true, 5.0), held("b", Small, false, 5.0)],
            Small, Want::Evict(&["b"])),
        ("session limit: a tie, the busy one listed last", (2, BIG, true),
            vec![held("b", Small, false, 5.0), held("a", Small, true, 5.0)],
            Small, Want::Evict(&["b"])),
        ("session limit: every session busy", (2, BIG, true),
            vec![held("a", Small, true, 1.0), held("b", Small, true, 2.0)],
            Small, Want::Refuse("sessions", "wait for one to finish")),
        ("memory: as many as needed, oldest first", (10, 3072, true),
            vec![held("c", Small, false, 3.0), held("a", Small, false, 1.0),
                 held("b", Small, false, 2.0)],
            Medium, Want::Evict(&["a", "b"])),
        ("memory: LRU order, not size order", (10, 6144, true),
            vec![held("big", Large, false, 2.0), held("small", Small, false, 1.0)],
            Medium, Want::Evict(&["small"])),
        ("memory: a busy one is never evicted, even if that alone would fit", (10, 5120, true),
            vec![held("busy", Large, true, 1.0), held("idle", Small, false, 2.0)],
            Medium, Want::Refuse("memory", "wait for a busy one to finish")),
        ("memory: a tie evicts one of the tied, not both", (10, 3072, true),
            vec![held("a", Small, false, 7.0), held("b", Small, false, 7.0),
                 held("c", Small, true, 1.0)],
            Small, Want::EvictOneOf(&["a", "b"])),
        ("both limits: one eviction serves both", (2, 3072, true),
            vec![held("m", Medium, false, 1.0), held("s", Small, false, 2.0)],
            Small, Want::Evict(&["m"])),
        ("a flavor larger than the limit, nothing held", (10, 3072, true),
            vec![], Large, Want::Refuse("memory", "4096 MB on its own")),
        ("a flavor larger than the limit evicts nothing", (10, 3072, true),
            vec![held("a", Small, false, 1.0)], Large,
            Want::Refuse("memory", "use a smaller flavor")),
        ("eviction off: session limit", (1, BIG, false),
            vec![held("a", Small, false, 1.0)],
            Small, Want::Refuse("sessions", "enable LRU eviction")),
        ("eviction off: memory limit", (10, 2048, false),
            vec![held("a", Small, false, 1.0)],
            Medium, Want::Refuse("memory", "enable LRU eviction")),
        ("eviction off: room left is still fine", (2, BIG, false),
            vec![held("a", Small, false, 1.0)], Small, Want::Evict(&[])),
    ];
    for (name, (max_sessions, max_total_memory_mb, lru_eviction), holdings, flavor, want) in cases {
        let resources =
            ResourceManager::new(&limits(max_sessions, max_total_memory_mb, lru_eviction));
        let got = resources.admit(&holdings, flavor);
        if let Ok(evicted) = &got {
            for id in evicted {
                let holding = holdings.iter().find(|h| &h.id == id);
                assert!(
                    holding.is_some_and(|h| !h.busy),
                    "{name}: evicted {id:?}, which is busy or unknown"
                );
            }
            let unique: HashSet<&String> = evicted.iter().collect();
            assert_eq!(unique.len(), evicted.len(), "{name}: {evicted:?}");
        }
        match (want, got) {
            (Want::Evict(ids), Ok(evicted)) => assert_eq!(evicted, ids, "{name}"),
            (Want::EvictOneOf(ids), Ok(evicted)) => assert!(
                evicted.len() == 1 && ids.contains(&evicted[0].as_str()),
                "{name}: evicted {evicted:?}, wanted one of {ids:?}"
            ),
            (Want::Refuse(limit, hint), Err(error)) => {
                match &error {
                    SessionError::LimitReached { limit: got, .. } => {
                        assert_eq!(*got, limit, "{name}: {error:?}")
                    }
                    other => panic!("{name}: expected LimitReached, got {other:?}"),
                }
                let message = error.to_string();
                assert!(
                    message.starts_with(&format!("{limit} limit reached")),
                    "{name}: {message}"
                );
                assert!(message.contains(hint), "{name}: {hint:?} not in: {message}");
            }
            (Want::Refuse(limit, _), Ok(evicted)) => {
                panic!("{name}: expected a {limit} refusal, got evictions {evicted:?}")
            }
            (_, Err(error)) => panic!("{name}: expected evictions, got {error}"),
        }
    }
}

#[test]
fn admit_reports_the_figures_of_a_memory_refusal() {
    let resources = ResourceManager::new(&limits(10, 3072, true));
    let holdings = vec![
        held("a", Flavor::Small, true, 1.0),
        held("b", Flavor::Small, true, 2.0),
    ];
    match resources.admit(&holdings, Flavor::Medium) {
        Err(SessionError::LimitReached {
            limit: "memory",
            current,
            max,
            unit,
            remedy,
        }) => {
            assert_eq!((current, max, unit), (2048, 3072, " MB"));
            assert_eq!(
                remedy,
                LimitRemedy::WaitForBusy {
                    busy: 2,
                    memory_for: Some((Flavor::Medium, 2048)),
                }
            );
            assert!(remedy.to_string().contains("2048 MB"), "{remedy}");
        }
        other => panic!("{:?}", other.map_err(|e| e.to_string())),
    }
    match resources.admit(&holdings, Flavor::Small) {
        Ok(evicted) => assert!(evicted.is_empty(), "{evicted:?}"),
        Err(error) => panic!("{error}"),
    }
}

/// `current` is "what is in use now": refusing a flavor that can never fit must not claim that
/// nothing is in use when sessions hold memory.
#[test]
fn refusing_an_oversized_flavor_reports_the_memory_actually_in_use() {
    let resources = ResourceManager::new(&limits(10, 3072, true));
    let holdings = vec![
        held("a", Flavor::Small, false, 1.0),
        held("b", Flavor::Small, false, 2.0),
        held("c", Flavor::Small, true, 3.0),
    ];
    let error = resources
        .admit(&holdings, Flavor::Large)
        .expect_err("a large session cannot fit in 3072 MB");
    let message = error.to_string();
    match error {
        SessionError::LimitReached {
            limit: "memory",
            current,
            ..
        } => assert_eq!(
            current, 3072,
            "3 small sessions hold 3072 MB, but the refusal says: {message}"
        ),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Idle expiry.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_idle_stops_an_idle_session_after_the_timeout_but_never_a_busy_one() {
    // The session manager's own clock, moved by hand: idleness is measured on it, not on the
    // time the test takes.
    let timeout = Duration::from_secs(1800);
    let clock = Clock::manual();
    let f = fixture(SessionConfig {
        session_timeout: timeout,
        clock: clock.clone(),
        ..SessionConfig::default()
    });
    let busy = f.acquire("busy").await;
    let busy_dir = work_dir(&busy);
    let idle = f.acquire("idle").await;
    let idle_dir = work_dir(&idle);
    drop(idle);

    // Up to the timeout itself: nothing expires.
    assert_eq!(f.manager.expire_idle().await.unwrap(), 0);
    clock.advance(timeout);
    assert_eq!(
        f.manager.expire_idle().await.unwrap(),
        0,
        "an idle session expired at its timeout, not after it"
    );
    assert_eq!(f.manager.expired_total(), 0);

    // Past the timeout: the idle one goes, the busy one stays however long it has run.
    clock.advance(Duration::from_millis(1));
    let expired = f.manager.expire_idle().await.unwrap();
    assert_eq!(expired, 1);
    assert!(matches!(
        f.manager.get("idle"),
        Err(SessionError::NotFound(_))
    ));
    assert!(
        !idle_dir.exists(),
        "the expired session's work directory is left"
    );
    let info = f.manager.get("busy").unwrap();
    assert_eq!(
        (info.status, info.running_tasks),
        (SessionStatus::Running, 1)
    );
    assert!(busy_dir.is_dir());
    assert_eq!(f.manager.expired_total(), 1);

    // A second round finds nothing more while the lease is held.
    assert_eq!(f.manager.expire_idle().await.unwrap(), 0);
    assert_eq!(f.manager.expired_total(), 1);

    // Released, its idle clock starts now (not when it was made), and it expires in its turn.
    drop(busy);
    assert_eq!(
        f.manager.expire_idle().await.unwrap(),
        0,
        "a just-released session expired at once"
    );
    clock.advance(timeout / 2);
    assert_eq!(f.manager.expire_idle().await.unwrap(), 0);
    clock.advance(timeout / 2 + Duration::from_millis(1));
    assert_eq!(f.manager.expire_idle().await.unwrap(), 1);
    assert!(f.manager.list().is_empty(), "{:?}", f.manager.list());
    assert!(!busy_dir.exists());
    assert_eq!(f.manager.expired_total(), 2);
}

// ---------------------------------------------------------------------------------------------
// Stop and stop_all.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_of_an_unknown_session_is_not_found_with_a_helpful_message() {
    let f = fixture(SessionConfig::default());
    let error = f.manager.stop("nope").await.unwrap_err();
    assert!(
        matches!(&error, SessionError::NotFound(id) if id == "nope"),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("\"nope\""), "{message}");
    assert!(message.contains("does not exist"), "{message}");
    assert!(message.contains("omit session_id"), "{message}");

    // A known one stops, reports itself stopped, and is unknown afterwards.
    let dir = f.idle("known", Flavor::Small).await;
    let info = f.manager.stop("known").await.unwrap();
    assert_eq!(info.id, "known");
    assert_eq!(info.status, SessionStatus::Stopped);
    assert!(
        !dir.exists(),
        "the stopped session's work directory is left"
    );
    assert!(!f.sandboxes_dir().join("known").exists());
    assert!(matches!(
        f.manager.stop("known").await,
        Err(SessionError::NotFound(_))
    ));
    assert!(matches!(
        f.manager.get("known"),
        Err(SessionError::NotFound(_))
    ));
    assert!(f.manager.list().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_all_stops_everything_and_afterwards_acquire_is_shutting_down() {
    let f = fixture(SessionConfig::default());
    let a = f.idle("a", Flavor::Small).await;
    let b = f.idle("b", Flavor::Medium).await;
    let busy = f.acquire("c").await;
    let c = work_dir(&busy);

    assert_eq!(f.manager.stop_all().await, 3);
    assert!(f.manager.list().is_empty());
    assert_eq!(f.manager.resource_stats().sessions, 0);
    for dir in [&a, &b, &c] {
        assert!(!dir.exists(), "{dir:?} is left after stop_all");
    }

    let error = refused(f.manager.acquire(None, None, "python", None).await);
    assert!(matches!(error, SessionError::ShuttingDown), "{error:?}");
    assert!(error.to_string().contains("shutting down"), "{error}");
    let error = refused(f.manager.acquire(Some("a"), None, "python", None).await);
    assert!(matches!(error, SessionError::ShuttingDown), "{error:?}");
    assert!(!f.sandboxes_dir().join("a").exists());

    // The lease of a stopped session can still be dropped, harmlessly.
    drop(busy);
    assert!(f.manager.list().is_empty());
    assert_eq!(f.manager.stop_all().await, 0);
}

/// A lease belongs to the session it was taken on: when that session is stopped and a new one is
/// made under the same id, dropping the old lease must not count as the end of a task of the new
/// one (else the new session looks idle while a task runs in it, and is evicted or expired under
/// it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_of_a_stopped_session_does_not_release_a_new_session_with_the_same_id() {
    let f = fixture(limits(1, 100 * 1024, true));
    let old = f.acquire("reused").await;
    f.manager.stop("reused").await.unwrap();
    let new = f.acquire("reused").await;
    assert_eq!(f.manager.get("reused").unwrap().running_tasks, 1);

    drop(old);
    let info = f.manager.get("reused").unwrap();
    assert_eq!(
        (info.status, info.running_tasks),
        (SessionStatus::Running, 1),
        "dropping the stopped session's lease released the new session: {info:?}"
    );
    // Its consequence: at the limit, a new session must be refused, not evict the busy one.
    let error = refused(f.manager.acquire(None, None, "python", None).await);
    assert!(
        matches!(
            error,
            SessionError::LimitReached {
                limit: "sessions",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(work_dir(&new).is_dir());
    drop(new);
    assert_eq!(f.manager.stop_all().await, 1);
}

// ---------------------------------------------------------------------------------------------
// The orphan sweep.
// ---------------------------------------------------------------------------------------------

/// A second manager on the same data directory and marker (as after a restart), with a backend
/// of its own; and its cleanup.
fn second_manager(f: &Fixture) -> (SessionManager, Cleanup) {
    let backend = Arc::new(
        LocalBackend::new(LocalConfig::new(
            f.dir.path().join("data"),
            f.marker.clone(),
        ))
        .unwrap(),
    );
    (
        SessionManager::new(backend.clone(), SessionConfig::default()),
        Cleanup(backend),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_orphans_removes_a_session_this_manager_does_not_know_and_keeps_a_live_one() {
    let f = fixture(SessionConfig::default());
    let orphan = f.idle("orphan", Flavor::Small).await;
    let (second, _cleanup) = second_manager(&f);
    let live = second
        .acquire(Some("live"), None, "python", None)
        .await
        .unwrap();
    let live_dir = work_dir(&live);
    let idle_live = second
        .acquire(Some("idle-live"), None, "python", None)
        .await
        .unwrap();
    let idle_live_dir = work_dir(&idle_live);
    drop(idle_live);
    assert_eq!(second.resource_stats().total_cleanup_cycles, 0);

    let report = second.sweep_orphans().await.unwrap();
    eprintln!("sweep: {report:?}");
    assert_eq!(report.directories, 1, "{report:?}");
    assert!(!orphan.exists(), "the orphan's work directory is left");
    assert!(!f.sandboxes_dir().join("orphan").exists());
    assert!(live_dir.is_dir(), "a live (busy) session was swept");
    assert!(idle_live_dir.is_dir(), "a live (idle) session was swept");
    let mut ids: Vec<String> = second.live_ids().into_iter().collect();
    ids.sort();
    assert_eq!(ids, ["idle-live", "live"]);

    let stats = second.resource_stats();
    assert_eq!(stats.total_cleanup_cycles, 1, "{stats:?}");
    assert_eq!(
        stats.total_orphans_cleaned, report.sandboxes as u64,
        "{stats:?}"
    );
    assert!(stats.total_orphans_cleaned >= 1, "{stats:?}");

    // A second round finds nothing: a cycle more, no orphan more.
    let again = second.sweep_orphans().await.unwrap();
    assert_eq!(again.total(), 0, "{again:?}");
    let after = second.resource_stats();
    assert_eq!(after.total_cleanup_cycles, 2);
    assert_eq!(after.total_orphans_cleaned, stats.total_orphans_cleaned);
    assert!(live_dir.is_dir() && idle_live_dir.is_dir());

    drop(live);
    assert_eq!(second.stop_all().await, 2);
    f.manager.stop_all().await;
}

/// `total_orphans_cleaned` is documented as the orphans removed: one orphaned session is one
/// orphan, however many of its parts (cgroup, directory) the sweep removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_orphans_cleaned_counts_one_orphaned_session_once() {
    let f = fixture(SessionConfig::default());
    f.idle("orphan", Flavor::Small).await;
    let (second, _cleanup) = second_manager(&f);
    let report = second.sweep_orphans().await.unwrap();
    eprintln!("sweep: {report:?}");
    assert_eq!(report.sandboxes, 1, "{report:?}");
    let stats = second.resource_stats();
    f.manager.stop_all().await;
    assert_eq!(
        stats.total_orphans_cleaned, 1,
        "one orphaned session counted as {} orphans (sweep report {report:?})",
        stats.total_orphans_cleaned
    );
}

// ---------------------------------------------------------------------------------------------
// Claims: who owns a session.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_one_owners_and_lasts_as_long_as_its_kind_says() {
    let clock = Clock::manual();
    let f = fixture(SessionConfig {
        clock: clock.clone(),
        ..SessionConfig::default()
    });
    let m = &f.manager;

    // A named session: the first owner's; the same owner again is fine, another is refused.
    m.claim("build", "alice", false).unwrap();
    m.claim("build", "alice", false).unwrap();
    let refused = m.claim("build", "bob", false).unwrap_err();
    assert!(
        matches!(&refused, SessionError::Claimed(id) if id == "build"),
        "{refused:?}"
    );
    assert!(m.claimed_by("build", "alice") && !m.claimed_by("build", "bob"));
    assert!(!m.claimed_by("nobody-claimed-this", "alice"));

    // A fresh session: claimed for its task's owner, and forgotten when it ends.
    let fresh = sandbox_wrapper::session::fresh_session_id();
    assert_eq!(fresh.len(), 21, "{fresh}");
    assert_ne!(fresh, sandbox_wrapper::session::fresh_session_id());
    m.claim(&fresh, "alice", true).unwrap();
    assert!(m.claim(&fresh, "bob", true).is_err());
    drop(f.acquire(&fresh).await);
    drop(f.acquire("build").await);
    assert_eq!(m.claim_count(), 2);
    m.stop(&fresh).await.unwrap();
    assert!(
        !m.claimed_by(&fresh, "alice"),
        "a fresh session's claim outlived it"
    );
    m.claim(&fresh, "bob", true)
        .expect("an ended fresh session's id is free again");

    // A fresh session that a client then named is kept like a named one.
    let reused = sandbox_wrapper::session::fresh_session_id();
    m.claim(&reused, "alice", true).unwrap();
    m.claim(&reused, "alice", false).unwrap();
    drop(f.acquire(&reused).await);
    m.stop(&reused).await.unwrap();
    assert!(m.claimed_by(&reused, "alice"));

    // A named session's claim outlives it by CLAIM_KEPT (a follow-up task keeps the name).
    m.stop("build").await.unwrap();
    assert!(m.claimed_by("build", "alice"));
    assert!(m.claim("build", "bob", false).is_err());
    clock.advance(CLAIM_KEPT);
    m.expire_idle().await.unwrap();
    assert!(
        m.claimed_by("build", "alice"),
        "forgotten at CLAIM_KEPT, not after it"
    );

    // A claim of a live session stays however old; a claim whose session never came goes.
    m.claim("waiting", "carol", false).unwrap();
    drop(f.acquire("live").await);
    m.claim("live", "carol", false).unwrap();
    clock.advance(CLAIM_KEPT + Duration::from_secs(1));
    m.expire_idle().await.unwrap();
    assert!(!m.claimed_by("build", "alice"), "kept past CLAIM_KEPT");
    assert!(!m.claimed_by("waiting", "carol"), "kept past CLAIM_KEPT");
    assert!(!m.claimed_by(&fresh, "bob"));
    // (the live session itself is idle past the session timeout by now, and expired.)
    m.claim("live2", "dave", false).unwrap();
    let lease = f.acquire("live2").await;
    clock.advance(CLAIM_KEPT + Duration::from_secs(1));
    m.expire_idle().await.unwrap();
    assert!(
        m.claimed_by("live2", "dave"),
        "a live session lost its claim"
    );
    m.claim("build", "bob", false)
        .expect("a forgotten claim leaves the name free");
    drop(lease);
}
