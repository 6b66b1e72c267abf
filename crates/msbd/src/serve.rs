//! `msbd serve`: start the wrapper on the configured store, serve MCP over stdio or HTTP, and
//! shut down gracefully on SIGTERM or SIGINT (or, over stdio, when the client closes stdin)
//! within `MSB_SHUTDOWN_TIMEOUT`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use mcp_tools::{McpServer, ServerOptions};
use rmcp::ServiceExt;
use sandbox_wrapper::Wrapper;
use task_core::store::Store;
use task_core::store::postgres::{PostgresConfig, PostgresStore};
use task_core::store::sqlite::{SqliteConfig, SqliteStore};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Database, Loaded, Transport};

/// Serves until a signal or the end of stdin; the exit status says how it went.
pub fn run(loaded: Loaded) -> ExitCode {
    let config = loaded.config;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("msbd cannot serve: {error:#}");
            eprintln!("msbd: {error:#}");
            match error.downcast_ref::<sandbox_wrapper::WrapperError>() {
                // A configuration the host cannot meet, as for any other bad setting.
                Some(sandbox_wrapper::WrapperError::IsolationBelowRequired { .. }) => {
                    eprintln!(
                        "msbd: run `msbd doctor` for what each layer needs, or set MSB_ISOLATION=strongest to start with what this host offers"
                    );
                    ExitCode::from(2)
                }
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The store the configuration names, and the same store again when it is shared with other
/// nodes (PostgreSQL).
async fn open_store(
    config: &Config,
) -> anyhow::Result<(Arc<dyn Store>, Option<Arc<PostgresStore>>)> {
    let path = match &config.database {
        Database::Sqlite { path } => path,
        Database::Postgres { url } => {
            let pg = PostgresConfig {
                schema: config.database_schema.clone(),
                // A task's own fresh session can be made on any node: only the sessions
                // clients name bind their tasks to a node.
                portable_session: Some(mcp_tools::is_fresh_session_id),
                ..PostgresConfig::new(url.clone(), config.node_id.clone())
            };
            let store = PostgresStore::connect(pg).await.with_context(|| {
                format!(
                    "opening the shared task store at {} (MSB_DATABASE_URL), schema {} \
                     (MSB_DATABASE_SCHEMA), as node {} (MSB_NODE_ID)",
                    config.database.url(),
                    config.database_schema,
                    config.node_id
                )
            })?;
            tracing::info!(
                database = %config.database.url(),
                schema = %config.database_schema,
                node = %config.node_id,
                "the task store is shared (PostgreSQL)"
            );
            let store = Arc::new(store);
            return Ok((store.clone(), Some(store)));
        }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating the directory of the task store, {}",
                dir.display()
            )
        })?;
    }
    let mut sqlite = SqliteConfig::new(path);
    sqlite.cache_kib =
        u32::try_from(config.sqlite_cache_mb.saturating_mul(1024)).unwrap_or(u32::MAX);
    let store = SqliteStore::open(sqlite).with_context(|| {
        format!(
            "opening the task store {} (MSB_DATABASE_URL)",
            path.display()
        )
    })?;
    Ok((Arc::new(store), None))
}

/// The MCP server's options from the configuration.
pub(crate) fn server_options(config: &Config) -> ServerOptions {
    ServerOptions {
        server_version: env!("CARGO_PKG_VERSION").into(),
        supervision_tools: config.supervision_tools,
        default_timeout: config.execution_timeout,
        retention: config.task_retention,
        volumes: config.volumes.clone(),
        ..ServerOptions::default()
    }
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "creating the data directory {} (MSB_DATA_DIR)",
            config.data_dir.display()
        )
    })?;
    let (store, shared_store) = open_store(&config).await?;
    let own_exe: Option<PathBuf> = std::env::current_exe().ok();
    let mut wrapper_config = config.wrapper_config(own_exe)?;
    wrapper_config.shared_store = shared_store;
    let wrapper = Wrapper::start(store, wrapper_config)
        .await
        .context("starting the sandbox wrapper")?;
    tracing::info!(
        transport = ?config.transport,
        data_dir = %config.data_dir.display(),
        isolation = %wrapper.isolation(),
        "msbd is serving"
    );
    let server = McpServer::new(wrapper.clone(), server_options(&config));
    let shutdown = CancellationToken::new();
    let signals = watch_signals(shutdown.clone())?;

    let served = match config.transport {
        Transport::Stdio => serve_stdio(server, &config, shutdown.clone()).await,
        Transport::Http => serve_http(server, &config, shutdown.clone()).await,
    };
    if let Err(error) = &served {
        tracing::error!("the transport failed: {error:#}");
    }
    shutdown.cancel();
    signals.abort();
    tracing::info!(
        timeout_s = config.shutdown_timeout.as_secs(),
        "shutting down"
    );
    let report = wrapper.graceful_shutdown(config.shutdown_timeout).await;
    tracing::info!(
        status = ?report.status,
        duration_s = report.duration_seconds,
        errors = ?report.errors,
        "msbd stopped"
    );
    Ok(if served.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// SIGTERM and SIGINT cancel `shutdown`; a second one exits at once.
fn watch_signals(shutdown: CancellationToken) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(tokio::spawn(async move {
        let mut received = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            received += 1;
            if received == 1 {
                tracing::info!("{name}: shutting down gracefully (again to stop at once)");
                shutdown.cancel();
            } else {
                tracing::warn!("{name} again: stopping at once");
                std::process::exit(130);
            }
        }
    }))
}

/// MCP over stdin and stdout until the client closes stdin or `shutdown` fires.
async fn serve_stdio(
    server: McpServer,
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (stdin, stdout) = rmcp::transport::io::stdio_pipes();
    // Lines over the size limit never reach rmcp (see `stdio.rs`).
    let stdin = crate::stdio::LimitedLines::new(stdin, config.max_request_bytes);
    // Quick read-only calls are answered where they are read (see `mcp_tools::FastLane`).
    let transport = mcp_tools::FastLane::new(
        rmcp::transport::async_rw::AsyncRwTransport::new_server(stdin, stdout),
        server.clone(),
    );
    let running = server
        .serve(transport)
        .await
        .context("starting the MCP session on stdio")?;
    let cancel = running.cancellation_token();
    tokio::select! {
        ended = running.waiting() => {
            if let Err(error) = ended {
                tracing::warn!(%error, "the stdio session ended with an error");
            }
            tracing::info!("the client closed stdin");
        }
        () = shutdown.cancelled() => {
            cancel.cancel();
        }
    }
    Ok(())
}

/// MCP over streamable HTTP, with health, readiness and metrics, until `shutdown` fires.
async fn serve_http(
    server: McpServer,
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("listening on {} (MSB_HTTP_ADDR)", config.http_addr))?;
    let address = listener.local_addr().unwrap_or(config.http_addr);
    let readiness = Arc::new(crate::http::Readiness::new());
    let options = crate::http::HttpOptions {
        listen: address,
        auth_token: config.auth_token.as_ref().map(|t| t.expose().to_owned()),
        max_request_bytes: config.max_request_bytes,
        allowed_hosts: config.http_allowed_hosts.clone(),
        allowed_origins: config.http_allowed_origins.clone(),
    };
    tracing::info!(%address, "serving MCP over HTTP at /mcp");
    eprintln!("msbd: listening on http://{address}/mcp");
    let serving = crate::http::serve(
        listener,
        server,
        options,
        readiness.clone(),
        shutdown.clone(),
    );
    readiness.set_ready();
    let result = serving.await;
    readiness.set_draining();
    result
}
