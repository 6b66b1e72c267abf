//! `msbd serve`: start the wrapper on the configured store, serve MCP over stdio or HTTP, and
//! shut down gracefully on SIGTERM or SIGINT (or, over stdio, when the client closes stdin)
//! within `MSB_SHUTDOWN_TIMEOUT`.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use mcp_tools::{McpServer, ServerOptions};
use rmcp::ServiceExt;
use rmcp::service::ServerInitializeError;
use sandbox_wrapper::Wrapper;
use sandbox_wrapper::supervisor::ShutdownStatus;
use sandbox_wrapper::wrapper::GracefulShutdownReport;
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
    let code = match runtime.block_on(serve(config)) {
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
    };
    // Not a plain drop: a read of stdin that never ends (stdin is a terminal, or a client that
    // sends nothing) sits on a blocking thread, which a drop of the runtime would wait for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

/// The store the configuration names. One shared with other nodes (PostgreSQL) says so itself
/// ([`Store::is_shared`] and the capabilities the wrapper asks of it).
async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let path = match &config.database {
        Database::Sqlite { path } => path,
        Database::Postgres { url } => {
            let pg = PostgresConfig {
                schema: config.database_schema.clone(),
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
            return Ok(Arc::new(store));
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
    let store = SqliteStore::open(sqlite).map_err(|error| {
        // A read-only store can also be kept elsewhere: say how.
        let elsewhere = match error {
            task_core::Error::StoreReadOnly { .. } => {
                "; to keep it in another, writable directory, point MSB_DATA_DIR there"
            }
            _ => "",
        };
        anyhow::Error::new(error).context(format!(
            "opening the task store {} (MSB_DATABASE_URL){elsewhere}",
            path.display()
        ))
    })?;
    Ok(Arc::new(store))
}

/// The MCP server's options from the configuration.
pub(crate) fn server_options(config: &Config) -> ServerOptions {
    ServerOptions {
        server_version: env!("CARGO_PKG_VERSION").into(),
        supervision_tools: config.supervision_tools,
        default_timeout: config.execution_timeout,
        call_wait: config.call_wait,
        max_file_bytes: config.max_file_bytes,
        retention: config.task_retention,
        volumes: config.volumes.clone(),
        ..ServerOptions::default()
    }
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    // First, so that a signal while the wrapper starts is a graceful shutdown too.
    let shutdown = CancellationToken::new();
    let signals = watch_signals(shutdown.clone())?;
    std::fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "creating the data directory {} (MSB_DATA_DIR)",
            config.data_dir.display()
        )
    })?;
    let store = open_store(&config).await?;
    let own_exe: Option<PathBuf> = std::env::current_exe().ok();
    let wrapper_config = config.wrapper_config(own_exe)?;
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

    // `shutdown` (a signal) starts the drain: the transport keeps answering, refusing new
    // calls, while running tasks finish; `stop` ends the transport once the drain is over.
    let stop = CancellationToken::new();
    let transport = async {
        match config.transport {
            Transport::Stdio => {
                serve_stdio(server.clone(), &config, shutdown.clone(), stop.clone()).await
            }
            Transport::Http => {
                serve_http(server.clone(), &config, shutdown.clone(), stop.clone()).await
            }
        }
    };
    tokio::pin!(transport);
    let mut served = tokio::select! {
        served = &mut transport => Some(served),
        () = shutdown.cancelled() => None,
    };
    if let Some(Err(error)) = &served {
        tracing::error!("the transport failed: {error:#}");
    }
    shutdown.cancel();
    server.start_draining();
    tracing::info!(
        timeout_s = config.shutdown_timeout.as_secs(),
        "shutting down: running tasks may finish, new calls are refused"
    );
    let report = {
        let draining = wrapper.graceful_shutdown(config.shutdown_timeout);
        tokio::pin!(draining);
        loop {
            tokio::select! {
                report = &mut draining => break report,
                ended = &mut transport, if served.is_none() => served = Some(ended),
            }
        }
    };
    // The calls still under way are answered before the transport ends (those waiting for a
    // task that the drain put back in the queue say so now).
    server.stop_waiting();
    if server.calls_under_way() > 0 {
        if !server.calls_answered(TRANSPORT_STOP).await {
            tracing::warn!(
                calls = server.calls_under_way(),
                "tool calls still under way when the transport stops: they get no answer"
            );
        }
        // Their answers are handed to the transport as they return: a moment for the writes.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let served = match served {
        Some(served) => served,
        None => match tokio::time::timeout(TRANSPORT_STOP, transport).await {
            Ok(served) => served,
            Err(_) => {
                tracing::warn!(
                    "the transport did not stop within {} s of the drain's end",
                    TRANSPORT_STOP.as_secs()
                );
                Ok(())
            }
        },
    };
    signals.abort();
    let summary = shutdown_summary(&report, config.shutdown_timeout);
    if report.status == ShutdownStatus::Success {
        tracing::info!("{summary}");
    } else {
        tracing::warn!("{summary}");
    }
    Ok(if served.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// How long the transport may take to stop once the drain is over (open HTTP requests and
/// streams are ended by then).
const TRANSPORT_STOP: Duration = Duration::from_secs(5);

/// The shutdown report in one line, e.g. `msbd stopped: drained in 1.2 s; 2 tasks were
/// running, 0 interrupted; 1 sandbox stopped; 9 of 9 loops stopped; no errors`.
fn shutdown_summary(report: &GracefulShutdownReport, timeout: Duration) -> String {
    fn count(n: usize, one: &str, many: &str) -> String {
        format!("{n} {}", if n == 1 { one } else { many })
    }
    let mut line = format!("msbd stopped: drained in {:.1} s", report.duration_seconds);
    if report.status == ShutdownStatus::Timeout {
        line.push_str(&format!(
            " (past its {} s, MSB_SHUTDOWN_TIMEOUT)",
            timeout.as_secs_f64()
        ));
    }
    line.push_str(&format!(
        "; {} running, {} interrupted",
        count(report.tasks_running_at_start, "task was", "tasks were"),
        report.tasks_interrupted
    ));
    if report.tasks_interrupted > 0 {
        line.push_str(" (queued again for the next start)");
    }
    line.push_str(&format!(
        "; {} stopped; {} of {} loops stopped",
        count(report.sandboxes_stopped, "sandbox", "sandboxes"),
        report.components_stopped,
        report.components_expected
    ));
    if report.errors.is_empty() {
        line.push_str("; no errors");
    } else {
        line.push_str(&format!(
            "; {}: {}",
            count(report.errors.len(), "error", "errors"),
            report.errors.join("; ")
        ));
    }
    line
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

/// What msbd says on stderr when its stdin is a terminal: someone started it by hand.
const WAITING_ON_A_TERMINAL: &str = "msbd: serving MCP on stdin/stdout; waiting for an MCP \
     client (msbd is meant to be started by one, which speaks JSON-RPC on its stdin; \
     Ctrl-C or Ctrl-D to stop)";

/// MCP over stdin and stdout until the client closes stdin, or `shutdown` fires before a
/// client said `initialize`, or `stop` fires. Between `shutdown` and `stop` (the drain) the
/// session goes on: calls under way are answered, new tool calls are refused
/// ([`McpServer::start_draining`]).
async fn serve_stdio(
    server: McpServer,
    config: &Config,
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    if std::io::stdin().is_terminal() {
        eprintln!("{WAITING_ON_A_TERMINAL}");
    }
    // The web console beside stdio: its own listener, with no `/mcp`.
    let console = match config.console_addr {
        Some(addr) => Some(serve_console(server.clone(), config, addr, &shutdown, &stop).await?),
        None => None,
    };
    let served = serve_stdio_session(server, config, shutdown.clone(), stop.clone()).await;
    if let Some(console) = console {
        // The client is gone: msbd drains and stops, and the console with it (at `stop`).
        shutdown.cancel();
        stop.cancelled().await;
        match console.await {
            Ok(Err(error)) => tracing::warn!(%error, "the web console ended with an error"),
            Err(error) => tracing::warn!(%error, "the web console's task failed"),
            Ok(Ok(())) => {}
        }
    }
    served
}

/// The web console on its own listener (`MSB_CONSOLE_ADDR`), for a daemon that serves MCP on
/// stdio; the task that serves it until `stop`.
async fn serve_console(
    server: McpServer,
    config: &Config,
    addr: std::net::SocketAddr,
    shutdown: &CancellationToken,
    stop: &CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (MSB_CONSOLE_ADDR)"))?;
    let address = listener.local_addr().unwrap_or(addr);
    let options = crate::http::HttpOptions {
        listen: address,
        auth_token: config.auth_token.as_ref().map(|t| t.expose().to_owned()),
        operator_token: config
            .operator_token
            .as_ref()
            .map(|t| t.expose().to_owned()),
        serve_mcp: false,
        max_request_bytes: config.max_request_bytes,
        allowed_hosts: config.http_allowed_hosts.clone(),
        allowed_origins: config.http_allowed_origins.clone(),
        retry_after: config.shutdown_timeout,
    };
    eprintln!("msbd: the web console is at http://{address}/ui");
    let readiness = Arc::new(crate::http::Readiness::new());
    readiness.set_ready();
    let stopping = crate::http::Stopping {
        shutdown: shutdown.clone(),
        stop: stop.clone(),
    };
    Ok(tokio::spawn(crate::http::serve(
        listener, server, options, readiness, stopping,
    )))
}

/// The MCP session on stdin and stdout (see [`serve_stdio`]).
async fn serve_stdio_session(
    server: McpServer,
    config: &Config,
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let (stdin, stdout) = rmcp::transport::io::stdio_pipes();
    // A pipe is read by a reader that spins a little after each answer (see `crate::spin`).
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stdin = match crate::spin::SpinningStdin::open(Arc::clone(&armed)) {
        Some(pipe) => {
            // rmcp's reader of the same pipe is not needed: its descriptor closes here.
            drop(stdin);
            crate::spin::Stdin::Pipe(pipe)
        }
        None => crate::spin::Stdin::Other(stdin),
    };
    let settled = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let stdout = crate::spin::Stdout {
        inner: stdout,
        armed,
        settled: Arc::clone(&settled),
    };
    // Lines over the size limit never reach rmcp (see `mcp_tools::transport::stdio`), and
    // quick calls are decoded there without rmcp (see `mcp_tools::quick_lines`).
    let (quick_lines, quick_queue) = mcp_tools::quick_lines(server.clone());
    let stdin = mcp_tools::transport::LimitedLines::new(stdin, config.max_request_bytes)
        .with_quick_lines(quick_lines);
    // Quick read-only calls are answered where they are read (see `mcp_tools::FastLane`).
    let transport = mcp_tools::FastLane::new(
        rmcp::transport::async_rw::AsyncRwTransport::new_server(stdin, stdout),
        server.clone(),
    )
    .with_settled(settled)
    .with_quick_lines(quick_queue);
    // rmcp waits for the client's `initialize` without looking at any token: a signal before
    // it (nobody connected, or a client that never speaks) ends the wait here.
    let handshake = tokio::select! {
        handshake = server.serve(transport) => handshake,
        () = shutdown.cancelled() => {
            tracing::info!("stopping before any MCP client connected");
            return Ok(());
        }
    };
    let running = match handshake {
        Ok(running) => running,
        Err(ServerInitializeError::ConnectionClosed(_)) => {
            tracing::info!("stdin closed before any MCP client connected");
            return Ok(());
        }
        Err(error) => return Err(error).context("starting the MCP session on stdio"),
    };
    let cancel = running.cancellation_token();
    tokio::select! {
        ended = running.waiting() => {
            if let Err(error) = ended {
                tracing::warn!(%error, "the stdio session ended with an error");
            }
            tracing::info!("the client closed stdin");
        }
        () = stop.cancelled() => {
            cancel.cancel();
        }
    }
    Ok(())
}

/// MCP over streamable HTTP, with health, readiness and metrics. From `shutdown` on (the
/// drain) new MCP requests are refused with 503 and requests under way go on; `stop` ends
/// the sessions and the server.
async fn serve_http(
    server: McpServer,
    config: &Config,
    shutdown: CancellationToken,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| format!("listening on {} (MSB_HTTP_ADDR)", config.http_addr))?;
    let address = listener.local_addr().unwrap_or(config.http_addr);
    let readiness = Arc::new(crate::http::Readiness::new());
    let options = crate::http::HttpOptions {
        listen: address,
        auth_token: config.auth_token.as_ref().map(|t| t.expose().to_owned()),
        operator_token: config
            .operator_token
            .as_ref()
            .map(|t| t.expose().to_owned()),
        serve_mcp: true,
        max_request_bytes: config.max_request_bytes,
        allowed_hosts: config.http_allowed_hosts.clone(),
        allowed_origins: config.http_allowed_origins.clone(),
        retry_after: config.shutdown_timeout,
    };
    tracing::info!(%address, "serving MCP over HTTP at /mcp");
    eprintln!("msbd: listening on http://{address}/mcp");
    let serving = crate::http::serve(
        listener,
        server,
        options,
        readiness.clone(),
        crate::http::Stopping { shutdown, stop },
    );
    readiness.set_ready();
    let result = serving.await;
    readiness.set_draining();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> GracefulShutdownReport {
        GracefulShutdownReport {
            status: ShutdownStatus::Success,
            start_time: 0.0,
            end_time: 1.23,
            duration_seconds: 1.23,
            components_stopped: 6,
            components_expected: 6,
            tasks_running_at_start: 0,
            tasks_interrupted: 0,
            sandboxes_stopped: 1,
            error_count: 0,
            errors: Vec::new(),
        }
    }

    #[test]
    fn the_shutdown_report_is_one_readable_line() {
        let timeout = Duration::from_secs(30);
        assert_eq!(
            shutdown_summary(&report(), timeout),
            "msbd stopped: drained in 1.2 s; 0 tasks were running, 0 interrupted; \
             1 sandbox stopped; 6 of 6 loops stopped; no errors"
        );
        let late = GracefulShutdownReport {
            status: ShutdownStatus::Timeout,
            duration_seconds: 31.04,
            components_stopped: 5,
            tasks_running_at_start: 1,
            tasks_interrupted: 1,
            sandboxes_stopped: 2,
            error_count: 2,
            errors: vec![
                "loop \"orphans\" aborted at the deadline".into(),
                "flushing the store: disk full".into(),
            ],
            ..report()
        };
        assert_eq!(
            shutdown_summary(&late, timeout),
            "msbd stopped: drained in 31.0 s (past its 30 s, MSB_SHUTDOWN_TIMEOUT); \
             1 task was running, 1 interrupted (queued again for the next start); \
             2 sandboxes stopped; 5 of 6 loops stopped; 2 errors: loop \"orphans\" aborted \
             at the deadline; flushing the store: disk full"
        );
    }
}
