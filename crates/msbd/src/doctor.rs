//! `msbd doctor`: what this host gives msbd, checked for real. It starts a local backend on a
//! scratch directory, runs processes and interpreters in a sandbox under the strongest isolation
//! the host offers, opens the task store, and prints one line per check. The exit status is 0
//! when msbd can serve, 1 when something it needs is broken.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sandbox_wrapper::backend::local::{IsolationLevel, LocalBackend};
use sandbox_wrapper::backend::{ExecControl, ExecRequest, Flavor, SandboxBackend, SandboxSpec};
use sandbox_wrapper::output::OutputSink;
use task_core::store::Store;
use task_core::store::sqlite::{SqliteConfig, SqliteStore};
use tokio_util::sync::CancellationToken;

use crate::config::{BackendChoice, Config, Database};

/// One check's outcome.
struct Check {
    name: &'static str,
    ok: bool,
    /// A failed check that msbd can live without (an interpreter, a weaker isolation).
    optional: bool,
    detail: String,
}

/// Runs every check, prints them, and says whether msbd can serve.
pub async fn run(config: &Config, own_exe: Option<PathBuf>) -> bool {
    let mut checks = Vec::new();
    match config.backend {
        BackendChoice::Local => sandbox_checks(config, own_exe, &mut checks).await,
        BackendChoice::Microsandbox => checks.push(Check {
            name: "sandbox backend",
            ok: true,
            optional: false,
            detail: format!(
                "microsandbox at {} (not contacted by doctor; msbd serve checks it at start)",
                config.server_url
            ),
        }),
    }
    checks.push(store_check(config).await);
    let mut healthy = true;
    for check in &checks {
        let mark = match (check.ok, check.optional) {
            (true, _) => "ok  ",
            (false, true) => "warn",
            (false, false) => "FAIL",
        };
        println!("[{mark}] {}: {}", check.name, check.detail);
        healthy &= check.ok || check.optional;
    }
    println!(
        "{}",
        if healthy {
            "msbd can serve on this host."
        } else {
            "msbd cannot serve as configured: fix the FAIL lines above."
        }
    );
    healthy
}

async fn sandbox_checks(config: &Config, own_exe: Option<PathBuf>, checks: &mut Vec<Check>) {
    // Exactly what `msbd serve` would start with (data directory, workspaces, shim, volumes,
    // uid), under a marker of its own so that a running msbd's orphan sweep leaves it alone.
    let wrapper = match config.wrapper_config(own_exe) {
        Ok(wrapper) => wrapper,
        Err(error) => {
            checks.push(Check {
                name: "isolation",
                ok: false,
                optional: false,
                detail: format!("{error:#}"),
            });
            return;
        }
    };
    let mut local = wrapper.local_config();
    local.sandbox_dir = Some(local.sandbox_dir());
    local.instance_marker = format!("doctor{}", std::process::id());
    let scratch = std::env::temp_dir().join(format!("msbd-doctor-{}", std::process::id()));
    if let Err(error) = std::fs::create_dir_all(&scratch) {
        checks.push(Check {
            name: "isolation",
            ok: false,
            optional: false,
            detail: format!("cannot create {}: {error}", scratch.display()),
        });
        return;
    }
    let backend = match LocalBackend::new(local) {
        Ok(backend) => backend,
        Err(error) => {
            checks.push(Check {
                name: "isolation",
                ok: false,
                optional: false,
                detail: format!("the local backend cannot start: {error}"),
            });
            let _ = std::fs::remove_dir_all(&scratch);
            return;
        }
    };
    let report = backend.isolation_report().clone();
    let mut detail = format!(
        "{}: {} (workspaces in {})",
        report.level,
        report.layers,
        backend.sandbox_root().display()
    );
    if !report.missing.is_empty() {
        detail.push_str(&format!("; missing: {}", report.missing.join("; ")));
    }
    let required = wrapper.required_isolation;
    if let Some(required) = required.filter(|r| report.level < *r) {
        detail.push_str(&format!(
            "; MSB_ISOLATION={required} requires at least {required}: msbd serve refuses to start"
        ));
    } else if report.level < IsolationLevel::Strong
        && report.missing.iter().any(|m| m.contains("cannot reach"))
    {
        detail.push_str(
            "; set MSB_SANDBOX_DIR to a directory whose parents every user can pass through",
        );
    }
    checks.push(Check {
        name: "isolation",
        ok: report.level >= IsolationLevel::Strong,
        optional: required.is_none_or(|r| report.level >= r),
        detail,
    });
    let spec = SandboxSpec {
        session_id: format!("doctor-{}", std::process::id()),
        flavor: Flavor::Small,
        template: "python".into(),
        volumes: Vec::new(),
        network: Default::default(),
    };
    let sandbox = match backend.create(&spec).await {
        Ok(sandbox) => sandbox,
        Err(error) => {
            checks.push(Check {
                name: "sandbox",
                ok: false,
                optional: false,
                detail: format!("cannot make a sandbox: {error}"),
            });
            let _ = std::fs::remove_dir_all(&scratch);
            return;
        }
    };
    let runs: [(&'static str, &[&str], bool); 4] = [
        ("run a command", &["/bin/sh", "-c", "echo ok"], false),
        ("python3", &["python3", "--version"], true),
        ("node", &["node", "--version"], true),
        ("bash", &["bash", "--version"], true),
    ];
    for (name, argv, optional) in runs {
        let sink_path = scratch.join(format!("{name}.out").replace(' ', "-"));
        let sink = match OutputSink::create(&sink_path, 64 * 1024) {
            Ok(sink) => sink,
            Err(error) => {
                checks.push(Check {
                    name,
                    ok: false,
                    optional,
                    detail: error.to_string(),
                });
                continue;
            }
        };
        let request = ExecRequest {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            timeout: Some(Duration::from_secs(20)),
            ..ExecRequest::default()
        };
        let started = Instant::now();
        let outcome = backend
            .exec(
                &sandbox,
                request,
                &sink,
                ExecControl::new(CancellationToken::new()),
            )
            .await;
        let output = std::fs::read_to_string(sink.path()).unwrap_or_default();
        let first = output.lines().next().unwrap_or("").trim().to_owned();
        let check = match outcome {
            Ok(outcome) if outcome.success() => Check {
                name,
                ok: true,
                optional,
                detail: format!(
                    "{first} (in the sandbox, {} ms)",
                    started.elapsed().as_millis()
                ),
            },
            Ok(outcome) => Check {
                name,
                ok: false,
                optional,
                detail: format!("{:?} {}: {first}", outcome.exit, outcome.reason),
            },
            Err(error) => Check {
                name,
                ok: false,
                optional,
                detail: error.to_string(),
            },
        };
        checks.push(check);
    }
    let _ = backend.stop(&sandbox).await;
    drop(backend);
    let _ = std::fs::remove_dir_all(&scratch);
}

async fn store_check(config: &Config) -> Check {
    let checked = match &config.database {
        Database::Sqlite { path } => sqlite_check(path).await,
        Database::Postgres { url } => postgres_check(config, url).await,
    };
    let (ok, detail) = match checked {
        Ok(detail) => (true, detail),
        Err(detail) => (false, detail),
    };
    Check {
        name: "task store",
        ok,
        optional: false,
        detail,
    }
}

async fn postgres_check(config: &Config, url: &str) -> Result<String, String> {
    use task_core::store::Store as _;
    use task_core::store::postgres::{PostgresConfig, PostgresStore};
    // Under a name of its own: the node's may be in use by the running msbd.
    let node = format!("{}-doctor-{}", config.node_id, std::process::id());
    let pg = PostgresConfig {
        schema: config.database_schema.clone(),
        ..PostgresConfig::new(url, node)
    };
    let shown = config.database.url();
    let store = PostgresStore::connect(pg)
        .await
        .map_err(|e| format!("cannot open {shown}: {e}"))?;
    let stats = store.stats().await;
    store.close().await;
    let stats = stats.map_err(|e| format!("cannot read {shown}: {e}"))?;
    Ok(format!(
        "PostgreSQL at {shown}, schema {} (version {}; {} tasks; node {})",
        config.database_schema,
        PostgresStore::schema_version(),
        stats.total(),
        config.node_id
    ))
}

async fn sqlite_check(path: &Path) -> Result<String, String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let existed = path.exists();
    let store = SqliteStore::open(SqliteConfig::new(path))
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let stats = store
        .stats()
        .await
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(format!(
        "SQLite at {} ({}; {} tasks)",
        path.display(),
        if existed { "existing" } else { "new" },
        stats.total()
    ))
}
