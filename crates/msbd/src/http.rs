//! The HTTP transport (axum 0.8):
//!
//! - `/mcp`: MCP over streamable HTTP (rmcp's [`StreamableHttpService`]), one [`McpServer`] per
//!   MCP session, all serving one principal: `"http"` without a bearer token, else
//!   `"token:"` and 32 hex digits (128 bits) of the token's SHA-256 ([`principal_for`]; so the
//!   tasks made with a token are still its own after a restart, and invisible without it); each
//!   session's transport is `mcp_tools::FastLane` ([`FastLaneSessions`]);
//! - `/healthz`: liveness, `200 {"status":"ok"}` while the process serves;
//! - `/readyz`: readiness, `200 {"status":"ready"}` once the owner says so ([`Readiness`]),
//!   `503 {"status":"starting"}` or `503 {"status":"draining"}` otherwise;
//! - `/metrics`: the Prometheus exposition ([`crate::metrics`]);
//! - anything else: `404` with a JSON body.
//!
//! A `DELETE /mcp` that ends a session answers `204 No Content` (rmcp answers `202`, which
//! MCP clients such as the Python SDK take for a failure).
//!
//! Shutting down ([`Stopping`]): from `shutdown` on, msbd drains its running tasks; `/readyz`
//! answers `503 {"status":"draining"}`, and a new request to `/mcp` (other than a `DELETE`
//! that ends a session) is refused with `503` and `Retry-After` while the requests under way
//! (a tool call waiting for its task, an open stream) go on. At `stop` the sessions end and
//! the server returns once its open requests have finished.
//!
//! Guards, in the order they apply to `/mcp` and `/metrics`:
//! 1. the `Host` header must name this server: a loopback name, the listen address, or one of
//!    [`HttpOptions::allowed_hosts`] (else `403`; against DNS rebinding). rmcp checks it again on
//!    `/mcp`, and checks `Origin` against [`HttpOptions::allowed_origins`] when that is not
//!    empty;
//! 2. with a token ([`HttpOptions::auth_token`]), `Authorization: Bearer <token>` (compared in
//!    constant time; else `401` with `WWW-Authenticate: Bearer`);
//! 3. a body over [`HttpOptions::max_request_bytes`] is refused with `413`, whether it declares
//!    its length or is sent in chunks (it is read up to the limit, never further).
//!
//! `/healthz` and `/readyz` need no token and say nothing beyond their status; the body limit
//! applies to them too. Every error answer is JSON: `{"error": "what happened and what to do"}`.
//!
//! With a token, before it serves anything, the transport gives the token's principal the tasks
//! that earlier builds stored under its former name ([`adopt_legacy_tasks`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use mcp_tools::McpServer;
use mcp_tools::transport::FastLaneSessions;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use task_core::Engine;
use task_core::store::{ListFilter, PageRequest};
use tokio_util::sync::CancellationToken;

use crate::hosts::HostPort;
use crate::metrics::{self, Metrics};

/// The principal of HTTP clients when no token is configured.
pub(crate) const HTTP_PRINCIPAL: &str = "http";

/// What the HTTP transport needs from the configuration (plain values; `main` fills them).
#[derive(Clone, Debug)]
pub(crate) struct HttpOptions {
    /// The address msbd was asked to listen on (`MSB_HTTP_ADDR` / `--listen`); its IP and
    /// `IP:port` are accepted in the `Host` header.
    pub(crate) listen: SocketAddr,
    /// The bearer token every request to `/mcp` and `/metrics` must carry (`MSB_AUTH_TOKEN`);
    /// `None` for no authentication.
    pub(crate) auth_token: Option<String>,
    /// The largest request body accepted, in bytes (`MSB_MAX_REQUEST_BYTES`).
    pub(crate) max_request_bytes: usize,
    /// Further `Host` values accepted besides the loopback names and the listen address
    /// (`name` for any port, or `name:port`).
    pub(crate) allowed_hosts: Vec<String>,
    /// The browser origins accepted on `/mcp` (`scheme://host[:port]`, `:*` for any port);
    /// empty disables the `Origin` check, as in rmcp.
    pub(crate) allowed_origins: Vec<String>,
    /// The operator's token (`MSB_OPERATOR_TOKEN`): its holder sees every task in the web
    /// console.
    pub(crate) operator_token: Option<String>,
    /// Whether `/mcp` is served: not on the console's own listener beside the stdio transport
    /// (`MSB_CONSOLE_ADDR`), where only the console, the probes and the metrics are.
    pub(crate) serve_mcp: bool,
    /// The `Retry-After` of a request refused while draining (`MSB_SHUTDOWN_TIMEOUT`: by then
    /// msbd has stopped, and a supervisor has started it again, or another node serves).
    pub(crate) retry_after: Duration,
}

/// The two steps of a shutdown.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stopping {
    /// Fires when the drain begins: new MCP requests are refused (`503`), those under way go
    /// on.
    pub(crate) shutdown: CancellationToken,
    /// Fires when the drain is over: the MCP sessions end and the server stops.
    pub(crate) stop: CancellationToken,
}

/// Where msbd stands, as `/readyz` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReadinessState {
    /// Still starting: not ready for traffic.
    Starting,
    /// Serving.
    Ready,
    /// Shutting down: no new traffic, please.
    Draining,
}

impl ReadinessState {
    /// The name `/readyz` answers.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            ReadinessState::Starting => "starting",
            ReadinessState::Ready => "ready",
            ReadinessState::Draining => "draining",
        }
    }
}

/// The readiness of the daemon, shared between its owner (`main`, which flips it) and `/readyz`.
/// It starts as [`ReadinessState::Starting`]; draining is final.
#[derive(Debug)]
pub(crate) struct Readiness {
    /// The state, as its code (0 starting, 1 ready, 2 draining).
    state: AtomicU8,
}

/// The code of [`ReadinessState::Starting`].
const STARTING: u8 = 0;
/// The code of [`ReadinessState::Ready`].
const READY: u8 = 1;
/// The code of [`ReadinessState::Draining`].
const DRAINING: u8 = 2;

impl Default for Readiness {
    fn default() -> Self {
        Readiness::new()
    }
}

impl Readiness {
    /// Starting.
    pub(crate) const fn new() -> Readiness {
        Readiness {
            state: AtomicU8::new(STARTING),
        }
    }

    /// Ready for traffic (ignored once draining: a shutdown is not undone).
    pub(crate) fn set_ready(&self) {
        let _ = self
            .state
            .compare_exchange(STARTING, READY, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Shutting down: `/readyz` answers 503 from now on.
    pub(crate) fn set_draining(&self) {
        self.state.store(DRAINING, Ordering::Release);
    }

    /// The current state.
    pub(crate) fn state(&self) -> ReadinessState {
        match self.state.load(Ordering::Acquire) {
            STARTING => ReadinessState::Starting,
            READY => ReadinessState::Ready,
            _ => ReadinessState::Draining,
        }
    }
}

/// What the routes and guards share.
#[derive(Clone)]
struct AppState {
    /// For `/readyz`.
    readiness: Arc<Readiness>,
    /// For `/healthz` and `/readyz`.
    wrapper: sandbox_wrapper::Wrapper,
    /// For `/metrics`.
    metrics: Arc<Metrics>,
    /// The expected bearer token.
    auth_token: Option<Arc<str>>,
    /// The body limit.
    max_request_bytes: usize,
    /// The accepted `Host` values.
    allowed_hosts: Arc<[HostPort]>,
    /// Fired when the drain begins.
    shutdown: CancellationToken,
    /// The `Retry-After` header of a refusal while draining.
    retry_after: HeaderValue,
}

/// Serves MCP (and health, readiness and metrics) on `listener`. When `stopping.shutdown`
/// fires, `readiness` is set to draining and new MCP requests are refused with `503`; when
/// `stopping.stop` fires, it stops gracefully: no new connections, MCP sessions end (rmcp's
/// token is a child of `stop`), open requests finish.
///
/// It owns the metrics collector ([`Metrics::start`]) for as long as it serves, and stops it
/// before returning.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    server: McpServer,
    options: HttpOptions,
    readiness: Arc<Readiness>,
    stopping: Stopping,
) -> anyhow::Result<()> {
    if let Some(token) = options.auth_token.as_deref()
        && let Err(error) = adopt_legacy_tasks(server.wrapper().engine(), token).await
    {
        tracing::error!(
            %error,
            "giving the token's principal the tasks stored under its former name failed: its clients do not see those tasks until a later start moves them"
        );
    }
    let Stopping { shutdown, stop } = stopping;
    let local = listener
        .local_addr()
        .context("reading the address of the HTTP listener")?;
    let metrics = Metrics::start(server.wrapper().clone(), stop.child_token());
    let app = router(
        server,
        &options,
        local,
        Arc::clone(&readiness),
        &metrics,
        &Stopping {
            shutdown: shutdown.clone(),
            stop: stop.clone(),
        },
    );
    if options.serve_mcp {
        tracing::info!(
            address = %local,
            authentication = options.auth_token.is_some(),
            "serving MCP over HTTP at /mcp, the web console at /ui"
        );
    } else {
        tracing::info!(address = %local, "serving the web console at /ui");
    }
    // No Nagle delay: a JSON-RPC answer (or an event of a stream) goes out as soon as it is
    // written, not after the client's delayed ACK (up to 40 ms per call otherwise).
    let listener =
        axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
            }
        });
    let draining = {
        let readiness = Arc::clone(&readiness);
        let shutdown = shutdown.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = stop.cancelled() => {}
            }
            readiness.set_draining();
        })
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            stop.cancelled().await;
            readiness.set_draining();
        })
        .await
        .context("serving HTTP");
    draining.abort();
    metrics.stop().await;
    served
}

/// The application: routes and guards.
fn router(
    server: McpServer,
    options: &HttpOptions,
    local: SocketAddr,
    readiness: Arc<Readiness>,
    metrics: &Arc<Metrics>,
    stopping: &Stopping,
) -> Router {
    let hosts = allowed_hosts(options, local);
    let principal = principal_for(options.auth_token.as_deref());
    let wrapper = server.wrapper().clone();
    let console_server = server.clone();
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts.clone())
        .with_allowed_origins(options.allowed_origins.clone())
        .with_cancellation_token(stopping.stop.child_token())
        .with_max_request_body_bytes(options.max_request_bytes);
    let sessions = Arc::new(FastLaneSessions::new(server.with_principal(&principal)));
    let mcp = StreamableHttpService::new(
        move || Ok(server.with_principal(&principal)),
        sessions,
        config,
    );
    let state = AppState {
        readiness,
        wrapper,
        metrics: Arc::clone(metrics),
        auth_token: options.auth_token.as_deref().map(Arc::from),
        max_request_bytes: options.max_request_bytes,
        allowed_hosts: hosts
            .iter()
            .filter_map(|entry| match HostPort::parse(entry) {
                Ok(host) => Some(host),
                Err(reason) => {
                    tracing::warn!(%entry, %reason, "an allowed host that cannot be read is left out");
                    None
                }
            })
            .collect(),
        shutdown: stopping.shutdown.clone(),
        retry_after: HeaderValue::from(options.retry_after.as_secs().max(1)),
    };
    // Layers wrap what is above them: the last one runs first.
    let mcp = if options.serve_mcp {
        Router::new()
            .route_service("/mcp", mcp)
            .layer(from_fn_with_state(state.clone(), refuse_while_draining))
            .layer(axum::middleware::from_fn(session_ended_is_no_content))
    } else {
        drop(mcp);
        Router::new()
    };
    let guarded = mcp
        .route("/metrics", get(metrics_page))
        .layer(from_fn_with_state(state.clone(), limit_body))
        .layer(from_fn_with_state(state.clone(), require_bearer))
        .layer(from_fn_with_state(state.clone(), check_host));
    let console = crate::console::router(crate::console::ConsoleState::new(
        console_server,
        crate::console::ConsoleOptions {
            auth_token: options.auth_token.clone(),
            operator_token: options.operator_token.clone(),
            allowed_origins: options.allowed_origins.clone(),
        },
        stopping.stop.clone(),
    ))
    .layer(from_fn_with_state(state.clone(), limit_body))
    .layer(from_fn_with_state(state.clone(), check_host));
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(from_fn_with_state(state.clone(), limit_body));
    open.merge(guarded)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .merge(console)
}

/// The `Host` values accepted: the loopback names with and without the port, the listen
/// address (as configured and as bound), and the operator's.
fn allowed_hosts(options: &HttpOptions, local: SocketAddr) -> Vec<String> {
    let mut hosts: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for addr in [options.listen, local] {
        let port = addr.port();
        hosts.push(format!("localhost:{port}"));
        hosts.push(format!("127.0.0.1:{port}"));
        hosts.push(format!("[::1]:{port}"));
        hosts.push(addr.ip().to_string());
        hosts.push(addr.to_string());
    }
    hosts.extend(options.allowed_hosts.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    hosts.retain(|host| seen.insert(host.clone()));
    hosts
}

/// The principal of HTTP clients: [`HTTP_PRINCIPAL`] without a token, else `token:` and the
/// first 128 bits of the token's SHA-256 in 32 hex digits. It owns tasks in the store, so it
/// stays the same across restarts and builds; the token itself is never stored, and its name
/// tells nothing of it.
pub(crate) fn principal_for(token: Option<&str>) -> String {
    match token {
        None => HTTP_PRINCIPAL.to_owned(),
        Some(token) => {
            let digest = Sha256::digest(token.as_bytes());
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("token:{hex}")
        }
    }
}

/// The principal that msbd builds up to commit 7d717a8 gave a token: `token:` and its 64-bit
/// FNV-1a hash ([`sandbox_wrapper::fnv1a_64`]) in 16 hex digits. It stays only to find the
/// tasks those builds stored under it, for [`adopt_legacy_tasks`]; nothing is created under it
/// any more. It may go once no store written by those builds is left to open.
fn legacy_principal_for(token: &str) -> String {
    format!("token:{:016x}", sandbox_wrapper::fnv1a_64(token.as_bytes()))
}

/// What [`adopt_legacy_tasks`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Adopted {
    /// Tasks given to the token's principal.
    pub(crate) moved: u64,
    /// Tasks left under the former name: the principal holds their idempotency key already.
    pub(crate) left: usize,
}

/// Gives the token's principal ([`principal_for`]) the tasks stored under its former name
/// ([`legacy_principal_for`]), so that the token's clients still see and cancel them after the
/// upgrade. One write; run at every start with a token, before serving (after the first, it
/// finds nothing to move). A task whose idempotency key the principal already holds stays
/// where it is (two tasks of one owner cannot share a key): only tasks submitted with one key
/// under both names are, as when nodes of both builds share a queue. Those that stay are
/// counted by listing the former name's tasks. Logs how many moved (info) and how many stayed
/// (warn).
///
/// Neither the move nor the listing has an index on the owner to use: each reads the whole
/// task table once, at start.
pub(crate) async fn adopt_legacy_tasks(engine: &Engine, token: &str) -> task_core::Result<Adopted> {
    let legacy = legacy_principal_for(token);
    let current = principal_for(Some(token));
    let moved = engine.reassign_owner(&legacy, &current).await?;
    if moved > 0 {
        tracing::info!(
            moved,
            from = %legacy,
            to = %current,
            "gave the token's principal the tasks stored under its former name (earlier builds named it with FNV-1a, this one with SHA-256)"
        );
    }
    let filter = ListFilter {
        owner: Some(legacy.clone()),
        ..ListFilter::default()
    };
    let mut left = 0;
    let mut cursor = None;
    loop {
        let page = engine
            .list(
                filter.clone(),
                PageRequest {
                    cursor,
                    limit: PageRequest::MAX_LIMIT,
                },
            )
            .await?;
        left += page.tasks.len();
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    if left > 0 {
        tracing::warn!(
            left,
            owner = %legacy,
            "tasks stay under the token's former principal, invisible to its clients: the principal holds their idempotency keys already"
        );
    }
    Ok(Adopted { moved, left })
}

/// Whether `given` equals `expected`, in constant time for equal lengths (`subtle`; a length
/// mismatch answers at once, which tells nothing about the token's bytes).
fn constant_time_eq(expected: &[u8], given: &[u8]) -> bool {
    expected.ct_eq(given).into()
}

/// The token of an `Authorization: Bearer <token>` header, if the request has one.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A JSON error answer.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// Guard: the `Host` header names this server.
async fn check_host(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let written = match request.headers().get(header::HOST) {
        Some(value) => value.to_str().ok().map(str::to_owned),
        None => request.uri().authority().map(|a| a.as_str().to_owned()),
    };
    let Some((written, given)) =
        written.and_then(|text| HostPort::parse(&text).ok().map(|host| (text, host)))
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "the request has no valid Host header: send one that names this server",
        );
    };
    if !state.allowed_hosts.iter().any(|entry| entry.allows(&given)) {
        tracing::warn!(host = %written, "refused a request with a Host header that is not allowed (possible DNS rebinding)");
        return error(
            StatusCode::FORBIDDEN,
            "the Host header does not name this server: connect through localhost, the address msbd listens on, or a host name the operator allowed",
        );
    }
    next.run(request).await
}

/// Guard: with a token configured, the request carries it.
///
/// Kept instead of tower-http's `ValidateRequestHeaderLayer::bearer`: that one answers a bare
/// `401` (no JSON body, no `WWW-Authenticate` challenge) and compares the header in variable time.
async fn require_bearer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(expected) = &state.auth_token else {
        return next.run(request).await;
    };
    let (challenge, message) = match bearer_token(request.headers()) {
        Some(given) if constant_time_eq(expected.as_bytes(), given.as_bytes()) => {
            return next.run(request).await;
        }
        Some(_) => (
            r#"Bearer realm="msbd", error="invalid_token""#,
            "the bearer token is not valid: send `Authorization: Bearer <token>` with the token msbd was started with (MSB_AUTH_TOKEN)",
        ),
        None => (
            r#"Bearer realm="msbd""#,
            "authentication required: send `Authorization: Bearer <token>` with the token msbd was started with (MSB_AUTH_TOKEN)",
        ),
    };
    let mut response = error(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// Guard: the body is at most `max_request_bytes`. It is read (up to the limit) before the
/// route sees it: a declared length over the limit is refused before reading anything, a
/// chunked body as soon as it passes the limit.
///
/// Kept instead of tower-http's `RequestBodyLimitLayer`: that one answers a declared excess with
/// a plain-text `413` and leaves a chunked excess to the route (rmcp), not the JSON `413` with
/// `Connection: close` that clients get here.
async fn limit_body(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.max_request_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    if declared.is_some_and(|length| length > u64::try_from(limit).unwrap_or(u64::MAX)) {
        return too_large(limit);
    }
    let (parts, body) = request.into_parts();
    match Limited::new(body, limit).collect().await {
        Ok(collected) => {
            let request = Request::from_parts(parts, Body::from(collected.to_bytes()));
            next.run(request).await
        }
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => too_large(limit),
        Err(error) => self::error(
            StatusCode::BAD_REQUEST,
            format!("the request body could not be read ({error}): send it again"),
        ),
    }
}

/// On `/mcp` while draining: a new request is refused with `503` and `Retry-After`, except a
/// `DELETE` that ends a session (the client is cleaning up).
async fn refuse_while_draining(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if !state.shutdown.is_cancelled() || request.method() == Method::DELETE {
        return next.run(request).await;
    }
    let seconds = state.retry_after.to_str().unwrap_or("1").to_owned();
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "msbd is shutting down (it lets its running tasks finish and takes no new requests): \
             try again in {seconds} s, once it has restarted"
        ),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, state.retry_after.clone());
    response
}

/// On `/mcp`: a `DELETE` that ended a session answers `204 No Content` rather than rmcp's
/// `202 Accepted` (the session is gone when the answer is sent; the Python MCP SDK reports
/// any status but 200 and 204 as "Session termination failed").
async fn session_ended_is_no_content(request: Request, next: Next) -> Response {
    let delete = request.method() == Method::DELETE;
    let mut response = next.run(request).await;
    if delete && response.status() == StatusCode::ACCEPTED {
        *response.status_mut() = StatusCode::NO_CONTENT;
    }
    response
}

/// The answer to a body over the limit.
fn too_large(limit: usize) -> Response {
    let mut response = error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "the request body is larger than {limit} bytes, the limit set by MSB_MAX_REQUEST_BYTES: send a smaller request, or raise MSB_MAX_REQUEST_BYTES"
        ),
    );
    // The rest of an unread body would be taken for the next request: end the connection.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `/healthz`: 200 while msbd is `healthy` or `degraded` (serving, with something the operator
/// should look at), 503 when `unhealthy` (something needs an operator or a restart, such as a
/// store whose file was deleted). It needs no token; with the token (or when none is set), the
/// body also names each component that is not healthy and why (paths and host details that a
/// stranger should not read).
async fn healthz(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (status, mut body) = health_summary(&state).await;
    let trusted = match &state.auth_token {
        None => true,
        Some(expected) => bearer_token(&headers)
            .is_some_and(|given| constant_time_eq(expected.as_bytes(), given.as_bytes())),
    };
    if !trusted {
        body = json!({"status": body["status"]});
    }
    (status, axum::Json(body)).into_response()
}

/// The overall health, with every component that is not healthy (and the store's problem).
async fn health_summary(state: &AppState) -> (StatusCode, Value) {
    let report = state.wrapper.health_check().await;
    let components = serde_json::to_value(&report.components).unwrap_or(Value::Null);
    let not_healthy: serde_json::Map<String, Value> = components
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, c)| c["status"].as_str().is_some_and(|s| s != "healthy"))
        .map(|(name, c)| {
            let detail = c
                .get("problem")
                .or_else(|| c.get("isolation_report").and_then(|r| r.get("missing")))
                .cloned()
                .unwrap_or(Value::Null);
            (
                name.clone(),
                json!({"status": c["status"], "detail": detail}),
            )
        })
        .collect();
    let status = serde_json::to_value(report.status).unwrap_or(Value::Null);
    let code = if report.status == sandbox_wrapper::supervisor::HealthStatus::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, json!({"status": status, "not_healthy": not_healthy}))
}

/// `/readyz`: 200 once serving, 503 while starting, draining, or unhealthy.
async fn readyz(State(state): State<AppState>) -> Response {
    let ready = state.readiness.state();
    if ready == ReadinessState::Ready {
        let (code, body) = health_summary(&state).await;
        if code != StatusCode::OK {
            return (
                code,
                axum::Json(json!({"status": "unhealthy", "health": body})),
            )
                .into_response();
        }
        return (
            StatusCode::OK,
            axum::Json(json!({ "status": ready.as_str() })),
        )
            .into_response();
    }
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({ "status": ready.as_str() })),
    )
        .into_response()
}

/// `/metrics`.
async fn metrics_page(State(state): State<AppState>) -> Response {
    let text = state.metrics.render().await;
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(metrics::CONTENT_TYPE),
        )],
        text,
    )
        .into_response()
}

/// Any other path.
async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "no such path: msbd serves /mcp (MCP over streamable HTTP), /healthz, /readyz and /metrics",
    )
}

/// A known path with a method it does not serve.
async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "this method is not served here: use GET for /healthz, /readyz and /metrics",
    )
}

#[cfg(test)]
mod tests {
    //! Real TCP on 127.0.0.1, a real wrapper on a SQLite store in a temporary directory.

    use std::time::{Duration, Instant};

    use mcp_tools::ServerOptions;
    use rmcp::ServiceExt as _;
    use rmcp::model::CallToolRequestParams;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    use sandbox_wrapper::{Wrapper, WrapperConfig};
    use serde_json::Value;
    use task_core::store::Store;
    use task_core::store::sqlite::{SqliteConfig, SqliteStore};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::task::JoinHandle;

    use super::*;

    /// The token of the tests that need one.
    const TOKEN: &str = "s3cret-token";

    /// A real MCP `initialize` request.
    const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"http-test","version":"0.0.0"}}}"#;

    /// A served msbd: its address, readiness, and what stops it.
    struct Fixture {
        /// The store and the wrapper's data, removed at the end.
        _dir: tempfile::TempDir,
        /// Where it listens.
        addr: SocketAddr,
        /// What `/readyz` reports.
        readiness: Arc<Readiness>,
        /// Stops it.
        shutdown: Stopping,
        /// The serving task.
        served: JoinHandle<anyhow::Result<()>>,
        /// The MCP server (and through it the wrapper).
        server: McpServer,
    }

    impl Fixture {
        /// Serves a fresh daemon on 127.0.0.1 (any port) with `token` and the body limit.
        async fn start(token: Option<&str>, max_request_bytes: usize) -> Fixture {
            Fixture::start_on(Vec::new(), token, max_request_bytes).await
        }

        /// [`Fixture::start`] on a store that holds `tasks` already.
        async fn start_on(
            tasks: Vec<task_core::Task>,
            token: Option<&str>,
            max_request_bytes: usize,
        ) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let store: Arc<dyn Store> = Arc::new(
                SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.sqlite3"))).unwrap(),
            );
            if !tasks.is_empty() {
                store.submit(tasks).await.unwrap();
            }
            let mut config = WrapperConfig::new(dir.path().join("data"));
            config.engine.concurrency = 2;
            let wrapper = Wrapper::start(store, config).await.unwrap();
            let server = McpServer::new(wrapper, ServerOptions::default());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let options = HttpOptions {
                listen: addr,
                auth_token: token.map(str::to_owned),
                operator_token: None,
                serve_mcp: true,
                max_request_bytes,
                allowed_hosts: vec!["msbd.internal".into()],
                allowed_origins: Vec::new(),
                retry_after: Duration::from_secs(7),
            };
            let readiness = Arc::new(Readiness::new());
            let shutdown = Stopping::default();
            let served = tokio::spawn(serve(
                listener,
                server.clone(),
                options,
                Arc::clone(&readiness),
                shutdown.clone(),
            ));
            Fixture {
                _dir: dir,
                addr,
                readiness,
                shutdown,
                served,
                server,
            }
        }

        /// The URL of `path` on this server.
        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        /// Shuts down: the server must return promptly and cleanly.
        async fn stop(self) {
            self.shutdown.shutdown.cancel();
            self.shutdown.stop.cancel();
            let served = tokio::time::timeout(Duration::from_secs(15), self.served)
                .await
                .expect("the HTTP server stops within 15 s of the shutdown");
            served.unwrap().unwrap();
            assert_eq!(self.readiness.state(), ReadinessState::Draining);
            self.server
                .wrapper()
                .graceful_shutdown(Duration::from_secs(5))
                .await;
        }
    }

    /// A plain HTTP client (no TLS).
    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    /// An MCP `initialize` POST, with `token` as bearer token if given.
    async fn initialize(fixture: &Fixture, token: Option<&str>) -> reqwest::Response {
        let mut request = client()
            .post(fixture.url("/mcp"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(INITIALIZE);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// The answer's body as JSON.
    async fn json_body(response: reqwest::Response) -> Value {
        let text = response.text().await.unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }

    /// Writes `request` as is on a new connection and reads the answer until the server closes
    /// it: (status, the whole answer as text).
    async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(15), stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&answer).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
        (status, text)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_token_is_required_on_mcp_and_metrics_only() {
        let fixture = Fixture::start(Some(TOKEN), 1 << 20).await;

        for token in [
            None,
            Some("wrong"),
            Some("s3cret-tokeN"),
            Some("s3cret-token-longer"),
        ] {
            let response = initialize(&fixture, token).await;
            assert_eq!(response.status(), 401, "token {token:?}");
            let challenge = response.headers()["www-authenticate"].to_str().unwrap();
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            let body = json_body(response).await;
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains("Authorization: Bearer"),
                "{body}"
            );
        }
        // Another scheme is no bearer token.
        let response = client()
            .get(fixture.url("/metrics"))
            .header("authorization", format!("Basic {TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        let response = client().get(fixture.url("/metrics")).send().await.unwrap();
        assert_eq!(response.status(), 401);

        // The right token opens /mcp (a real initialize) and /metrics.
        let response = initialize(&fixture, Some(TOKEN)).await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().contains_key("mcp-session-id"));
        let body = response.text().await.unwrap();
        assert!(body.contains("\"serverInfo\""), "{body}");
        let response = client()
            .get(fixture.url("/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);

        // Health and readiness need no token, and without it say nothing more than their
        // status (degraded where the host lacks an isolation layer).
        let response = client().get(fixture.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body = json_body(response).await;
        assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");
        assert!(["healthy", "degraded"].contains(&body["status"].as_str().unwrap()));
        let response = client()
            .get(fixture.url("/healthz"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert!(json_body(response).await["not_healthy"].is_object());
        let response = client().get(fixture.url("/readyz")).send().await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(json_body(response).await, json!({"status": "starting"}));

        fixture.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn oversized_bodies_are_refused_and_the_server_keeps_serving() {
        let fixture = Fixture::start(None, 1024).await;

        // With a Content-Length.
        let response = client()
            .post(fixture.url("/mcp"))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(vec![b' '; 256 * 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
        let body = json_body(response).await;
        let message = body["error"].as_str().unwrap();
        assert!(message.contains("MSB_MAX_REQUEST_BYTES"), "{message}");
        assert!(message.contains("1024"), "{message}");

        // Chunked, without a Content-Length: refused once past the limit.
        let chunk = "x".repeat(1000);
        let mut request = format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            fixture.addr.port()
        );
        for _ in 0..3 {
            request.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
        }
        request.push_str("0\r\n\r\n");
        let (status, answer) = raw(fixture.addr, request.as_bytes()).await;
        assert_eq!(status, 413, "{answer}");
        assert!(answer.contains("MSB_MAX_REQUEST_BYTES"), "{answer}");

        // A chunked body under the limit goes through.
        let request = format!(
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{INITIALIZE}\r\n0\r\n\r\n",
            fixture.addr.port(),
            INITIALIZE.len()
        );
        let (status, answer) = raw(fixture.addr, request.as_bytes()).await;
        assert_eq!(status, 200, "{answer}");

        // Still serving.
        assert_eq!(initialize(&fixture, None).await.status(), 200);
        let response = client().get(fixture.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);

        fixture.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_foreign_host_header_is_refused() {
        let fixture = Fixture::start(None, 1 << 20).await;
        let port = fixture.addr.port();
        let post = |host: &str| {
            format!(
                "POST /mcp HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{INITIALIZE}",
                INITIALIZE.len()
            )
        };
        for host in [
            format!("evil.example:{port}"),
            "evil.example".to_owned(),
            format!("127.0.0.1.evil.example:{port}"),
            format!("127.0.0.2:{port}"),
        ] {
            let (status, answer) = raw(fixture.addr, post(&host).as_bytes()).await;
            assert_eq!(status, 403, "{host}: {answer}");
            assert!(answer.contains("Host header"), "{answer}");
            let get = format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            let (status, answer) = raw(fixture.addr, get.as_bytes()).await;
            assert_eq!(status, 403, "{host}: {answer}");
        }
        for host in [
            format!("localhost:{port}"),
            format!("LOCALHOST:{port}"),
            format!("127.0.0.1:{port}"),
            "localhost".to_owned(),
            format!("msbd.internal:{port}"),
        ] {
            let (status, answer) = raw(fixture.addr, post(&host).as_bytes()).await;
            assert_eq!(status, 200, "{host}: {answer}");
        }
        fixture.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readiness_follows_its_owner_and_health_is_the_health_check() {
        let fixture = Fixture::start(None, 1 << 20).await;
        let readyz = || async {
            let response = client().get(fixture.url("/readyz")).send().await.unwrap();
            let status = response.status().as_u16();
            (status, json_body(response).await)
        };
        assert_eq!(readyz().await, (503, json!({"status": "starting"})));
        fixture.readiness.set_ready();
        assert_eq!(readyz().await, (200, json!({"status": "ready"})));
        fixture.readiness.set_draining();
        assert_eq!(readyz().await, (503, json!({"status": "draining"})));
        fixture.readiness.set_ready(); // draining is final
        assert_eq!(readyz().await, (503, json!({"status": "draining"})));
        let response = client().get(fixture.url("/healthz")).send().await.unwrap();
        // Draining is not a health problem: healthz still answers 200 with the health check.
        assert_eq!(response.status(), 200);
        let body = json_body(response).await;
        assert!(
            ["healthy", "degraded"].contains(&body["status"].as_str().unwrap()),
            "{body}"
        );
        fixture.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn metrics_expose_every_family_and_count_a_completed_task() {
        let fixture = Fixture::start(None, 1 << 20).await;
        let scrape = || async {
            let response = client().get(fixture.url("/metrics")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            assert!(
                content_type.starts_with("text/plain; version=0.0.4"),
                "{content_type}"
            );
            response.text().await.unwrap()
        };
        let text = scrape().await;
        for (family, kind) in [
            ("msbd_up", "gauge"),
            ("msbd_tasks", "gauge"),
            ("msbd_queue_depth", "gauge"),
            ("msbd_tasks_running", "gauge"),
            ("msbd_leases_lost_total", "counter"),
            ("msbd_task_duration_seconds", "histogram"),
            ("msbd_loop_healthy", "gauge"),
            ("msbd_loop_runs_total", "counter"),
            ("msbd_loop_errors_total", "counter"),
            ("msbd_loop_restarts_total", "counter"),
            ("msbd_sandbox_isolation", "gauge"),
            ("msbd_sessions", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} {kind}\n")),
                "{family}: {text}"
            );
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
        }
        assert!(text.contains("\nmsbd_up 1\n"), "{text}");
        assert!(text.contains("\nmsbd_queue_depth 0\n"), "{text}");
        assert!(text.contains("\nmsbd_sessions 0\n"), "{text}");
        assert!(text.contains("\nmsbd_leases_lost_total 0\n"), "{text}");
        assert!(text.contains("msbd_loop_runs_total{loop=\""), "{text}");
        assert!(text.contains("msbd_loop_healthy{loop=\""), "{text}");
        // The level the backend reports is the one set to 1, and only it.
        let level = fixture
            .server
            .wrapper()
            .isolation_report()
            .expect("the local backend reports its isolation")
            .level;
        for other in ["off", "minimal", "standard", "strong"] {
            let value = u8::from(other == level.name());
            assert!(
                text.contains(&format!(
                    "\nmsbd_sandbox_isolation{{level=\"{other}\"}} {value}\n"
                )),
                "{other}: {text}"
            );
        }

        let wrapper = fixture.server.wrapper();
        let submitted = wrapper
            .submit(wrapper.new_task("command", json!({"command": "true"})))
            .await
            .unwrap();
        let id = submitted.task.id;
        let deadline = Instant::now() + Duration::from_secs(60);
        let text = loop {
            let text = scrape().await;
            if text.contains("msbd_task_duration_seconds_count{type=\"command\"} 1\n") {
                break text;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} not counted in 60 s: {:?}\n{text}",
                wrapper.engine().get(id).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            wrapper.engine().get(id).await.unwrap().status,
            task_core::Status::Completed
        );
        assert!(
            text.contains("msbd_tasks{type=\"command\",status=\"completed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("msbd_tasks{type=\"command\",status=\"pending\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("msbd_task_duration_seconds_bucket{type=\"command\",le=\"+Inf\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("msbd_task_duration_seconds_sum{type=\"command\"} "));
        fixture.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_paths_and_methods_answer_json() {
        let fixture = Fixture::start(Some(TOKEN), 1 << 20).await;
        for path in ["/", "/nope", "/mcp/extra", "/metrics/x"] {
            let response = client()
                .get(fixture.url(path))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 404, "{path}");
            let body = json_body(response).await;
            assert!(body["error"].as_str().unwrap().contains("/mcp"), "{body}");
        }
        // No token needed to be told a path does not exist.
        let response = client().get(fixture.url("/nope")).send().await.unwrap();
        assert_eq!(response.status(), 404);
        let response = client().post(fixture.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 405);
        assert!(json_body(response).await["error"].is_string());
        fixture.stop().await;
    }

    /// A whole MCP session with rmcp's own streamable HTTP client, with a token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_rmcp_client_lists_tools_and_checks_a_task_over_http() {
        let fixture = Fixture::start(Some(TOKEN), 1 << 20).await;
        let transport = StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(fixture.url("/mcp")).auth_header(TOKEN),
        );
        let client = ().serve(transport).await.unwrap();
        let tools = client.list_all_tools().await.unwrap();
        let names: Vec<&str> = tools.iter().map(|tool| &*tool.name).collect();
        for name in ["submit_task", "check_task_status", "list_tasks"] {
            assert!(names.contains(&name), "{names:?}");
        }

        let call = |tool: &'static str, arguments: Value| {
            let client = &client;
            async move {
                let result = client
                    .call_tool(
                        CallToolRequestParams::new(tool)
                            .with_arguments(arguments.as_object().unwrap().clone()),
                    )
                    .await
                    .unwrap();
                assert_ne!(result.is_error, Some(true), "{tool}: {result:?}");
                result.structured_content.unwrap()
            }
        };
        let created = call(
            "submit_task",
            json!({"task_type": "command", "params": {"command": "true"}}),
        )
        .await;
        let id = created["task_id"].as_str().unwrap().to_owned();
        let status = call("check_task_status", json!({"task_id": id})).await;
        assert_eq!(status["task_id"], id.as_str(), "{status}");

        // The task belongs to the token's principal, not to "http".
        let task_id: task_core::TaskId = id.parse().unwrap();
        let task = fixture
            .server
            .wrapper()
            .engine()
            .get(task_id)
            .await
            .unwrap();
        assert_eq!(
            task.owner.as_deref(),
            Some(principal_for(Some(TOKEN)).as_str())
        );

        // A shutdown with the client still connected ends its session and returns promptly.
        fixture.stop().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), client.cancel()).await;
    }

    #[test]
    fn principals_are_stable_hashes_of_the_token() {
        assert_eq!(principal_for(None), "http");
        // `printf a | sha256sum`: ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb
        assert_eq!(
            principal_for(Some("a")),
            "token:ca978112ca1bbdcafac231b39a23dc4d"
        );
        assert_ne!(principal_for(Some("b")), principal_for(Some("a")));
        // The name earlier builds stored: FNV-1a 64 of "a".
        assert_eq!(legacy_principal_for("a"), "token:af63dc4c8601ec8c");
    }

    /// With a token, the tasks stored under its former principal are its own before the first
    /// request is answered; one whose idempotency key the principal holds already stays, and
    /// the next start finds nothing more to move.
    #[tokio::test]
    async fn a_token_gets_the_tasks_stored_under_its_former_principal() {
        let legacy = legacy_principal_for(TOKEN);
        let current = principal_for(Some(TOKEN));
        // Independently: FNV-1a 64 of the token, and `printf s3cret-token | sha256sum`.
        assert_eq!(legacy, "token:ce325eed0762b90b");
        assert_eq!(current, "token:a81e611a041b13f078bf8ebe5dab4d4f");
        // Scheduled far ahead, so that they wait as they are.
        let later = task_core::Timestamp::now().after(Duration::from_secs(86_400));
        let task = |owner: &str, key: Option<&str>| {
            let mut new = task_core::NewTask::new("command", json!({"command": "true"}))
                .with_owner(owner)
                .with_run_at(later);
            if let Some(key) = key {
                new = new.with_idempotency_key(key);
            }
            new.into_task(task_core::TaskId::new(), task_core::Timestamp::now())
        };
        let old = [task(&legacy, None), task(&legacy, Some("k2"))];
        let conflicting = task(&legacy, Some("k"));
        let newer = task(&current, Some("k"));
        let another = task("token:00000000000000aa", None);
        let tasks = vec![
            old[0].clone(),
            old[1].clone(),
            conflicting.clone(),
            newer.clone(),
            another.clone(),
        ];
        let fixture = Fixture::start_on(tasks, Some(TOKEN), 1 << 20).await;
        // Any answer comes after the move.
        let response = client().get(fixture.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);

        let engine = fixture.server.wrapper().engine();
        let owner = async |task: &task_core::Task| engine.get(task.id).await.unwrap().owner;
        for task in old.iter().chain([&newer]) {
            assert_eq!(owner(task).await.as_deref(), Some(current.as_str()));
        }
        assert_eq!(owner(&conflicting).await, conflicting.owner);
        assert_eq!(owner(&another).await, another.owner);
        assert_eq!(
            adopt_legacy_tasks(engine, TOKEN).await.unwrap(),
            Adopted { moved: 0, left: 1 }
        );
        fixture.stop().await;
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"abc", b""));
        assert!(constant_time_eq(b"", b""));

        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        for (value, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("Bearer", None),
            ("Bearer ", None),
            ("Basic abc", None),
        ] {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(bearer_token(&headers), token, "{value:?}");
        }
    }

    #[test]
    fn host_matching_follows_rmcp() {
        let allowed = allowed_hosts(
            &HttpOptions {
                listen: "[::1]:7000".parse().unwrap(),
                auth_token: None,
                operator_token: None,
                serve_mcp: true,
                max_request_bytes: 1,
                allowed_hosts: vec!["Example.COM".into()],
                allowed_origins: Vec::new(),
                retry_after: Duration::from_secs(1),
            },
            "[::1]:7000".parse().unwrap(),
        );
        let allowed: Vec<HostPort> = allowed
            .iter()
            .map(|entry| HostPort::parse(entry).unwrap())
            .collect();
        let ok = |host: &str| {
            let given = HostPort::parse(host).unwrap();
            allowed.iter().any(|entry| entry.allows(&given))
        };
        assert!(ok("[::1]:7000"));
        assert!(ok("[::1]"));
        assert!(ok("localhost:7000"));
        assert!(ok("example.com:1234"));
        assert!(!ok("localhost.evil:7000"));
        assert!(!ok("127.0.0.2:7000"));
    }
}
