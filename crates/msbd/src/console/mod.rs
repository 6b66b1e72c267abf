//! The web console under `/ui`: live pages of the tasks, one task (its output following as it
//! is written), the queue, the sessions and the supervised loops, with the actions an
//! operator needs. Server-rendered HTML (`pages.rs`), one small script and one stylesheet
//! compiled into the binary (`assets/`), and server-sent events (`events.rs`) that move what the
//! pages show without reloading them.
//!
//! Every request goes through [`mcp_tools::console::Console`]: the same tool bodies, ownership
//! and checks an MCP client meets.
//!
//! Security (docs/console.md):
//! - who: with `MSB_AUTH_TOKEN` or `MSB_OPERATOR_TOKEN` set, a login form takes a token and
//!   sets an `HttpOnly`, `SameSite=Strict` session cookie (`Path=/ui`); an
//!   `Authorization: Bearer` header is accepted too; a token is never in a URL. The holder of
//!   `MSB_AUTH_TOKEN` is its principal (its own tasks and sessions, as on `/mcp`); the holder
//!   of `MSB_OPERATOR_TOKEN` is the *operator*: every task and session, the queue and the
//!   loops. With neither set, msbd listens on loopback only (as for `/mcp`) and whoever reaches
//!   the console is the operator;
//! - actions: every change is a `POST` under `/ui/` with the page's CSRF token (a SHA-256 of a
//!   secret made at start and the login) and an `Origin` naming this server (or one of
//!   `MSB_HTTP_ALLOWED_ORIGINS`);
//! - every answer carries a strict Content-Security-Policy (scripts and styles from `/ui/assets`
//!   only, no inline code, no frames), `X-Content-Type-Options: nosniff`, `Cache-Control:
//!   no-store`.

mod events;
mod history;
mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use mcp_tools::McpServer;
use mcp_tools::console::{Console, ConsoleError, ListQuery, LoopCommand, TaskCommand};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;

/// The principal of the operator (`MSB_OPERATOR_TOKEN`'s holder).
pub(crate) const OPERATOR_PRINCIPAL: &str = "operator";
/// The session cookie's name.
const COOKIE: &str = "msbd_console";
/// How long a login lasts.
const LOGIN_LASTS: Duration = Duration::from_secs(12 * 3600);
/// The most logins kept at once (the oldest go first).
const MAX_LOGINS: usize = 10_000;

/// The Content-Security-Policy of every console answer.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// What the console needs from the HTTP transport.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConsoleOptions {
    /// `MSB_AUTH_TOKEN`: its holder is its own principal.
    pub(crate) auth_token: Option<String>,
    /// `MSB_OPERATOR_TOKEN`: its holder is the operator.
    pub(crate) operator_token: Option<String>,
    /// Browser origins accepted besides this server's own (`MSB_HTTP_ALLOWED_ORIGINS`).
    pub(crate) allowed_origins: Vec<String>,
}

/// A signed-in browser.
#[derive(Clone, Debug)]
struct Login {
    operator: bool,
    principal: String,
    until: Instant,
}

struct Inner {
    server: McpServer,
    options: ConsoleOptions,
    /// Makes the CSRF tokens (random, made at start).
    secret: [u8; 32],
    logins: Mutex<HashMap<String, Login>>,
    /// The queue's last hour, for the charts.
    history: Arc<history::History>,
    /// Fires when msbd stops: the event streams end.
    stop: CancellationToken,
}

/// The console's state: cheap to clone.
#[derive(Clone)]
pub(crate) struct ConsoleState(Arc<Inner>);

/// Who is asking, and the CSRF token of their pages.
#[derive(Clone)]
pub(crate) struct Viewer {
    pub(crate) console: Console,
    pub(crate) csrf: String,
    /// Whether they signed in with the form (and may sign out).
    pub(crate) signed_in: bool,
}

impl ConsoleState {
    pub(crate) fn new(server: McpServer, options: ConsoleOptions, stop: CancellationToken) -> Self {
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        let history = history::History::follow(server.wrapper().engine().subscribe(), stop.clone());
        ConsoleState(Arc::new(Inner {
            server,
            options,
            secret,
            logins: Mutex::new(HashMap::new()),
            history,
            stop,
        }))
    }

    fn open(&self) -> bool {
        self.0.options.auth_token.is_none() && self.0.options.operator_token.is_none()
    }

    fn logins(&self) -> std::sync::MutexGuard<'_, HashMap<String, Login>> {
        self.0.logins.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn csrf_for(&self, key: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.0.secret);
        hasher.update(b"csrf\0");
        hasher.update(key.as_bytes());
        hex(&hasher.finalize()[..16])
    }

    /// The login a token opens: (operator, principal).
    fn login_for(&self, token: &str) -> Option<(bool, String)> {
        let matches = |expected: &Option<String>| {
            expected
                .as_deref()
                .is_some_and(|e| bool::from(e.as_bytes().ct_eq(token.as_bytes())))
        };
        if matches(&self.0.options.operator_token) {
            Some((true, OPERATOR_PRINCIPAL.to_owned()))
        } else if matches(&self.0.options.auth_token) {
            Some((false, crate::http::principal_for(Some(token))))
        } else {
            None
        }
    }

    fn viewer(&self, operator: bool, principal: &str, key: &str, signed_in: bool) -> Viewer {
        let server = self.0.server.with_principal(principal);
        let server = if operator {
            server.as_operator()
        } else {
            server
        };
        Viewer {
            console: Console::new(server),
            csrf: self.csrf_for(key),
            signed_in,
        }
    }

    /// Who sent `headers`, if anyone msbd knows.
    fn who(&self, headers: &HeaderMap) -> Option<Viewer> {
        if self.open() {
            return Some(self.viewer(true, crate::http::HTTP_PRINCIPAL, "open", false));
        }
        if let Some(token) = crate::http::bearer_token(headers) {
            let (operator, principal) = self.login_for(token)?;
            return Some(self.viewer(operator, &principal, &format!("bearer:{principal}"), false));
        }
        let id = cookie(headers, COOKIE)?;
        let mut logins = self.logins();
        let login = logins.get(id)?.clone();
        if login.until < Instant::now() {
            logins.remove(id);
            return None;
        }
        drop(logins);
        Some(self.viewer(
            login.operator,
            &login.principal,
            &format!("login:{id}"),
            true,
        ))
    }

    fn sign_in(&self, operator: bool, principal: String) -> String {
        let mut id = [0u8; 32];
        rand::fill(&mut id);
        let id = hex(&id);
        let now = Instant::now();
        let mut logins = self.logins();
        logins.retain(|_, login| login.until > now);
        if logins.len() >= MAX_LOGINS
            && let Some(oldest) = logins
                .iter()
                .min_by_key(|(_, login)| login.until)
                .map(|(id, _)| id.clone())
        {
            logins.remove(&oldest);
        }
        logins.insert(
            id.clone(),
            Login {
                operator,
                principal,
                until: now + LOGIN_LASTS,
            },
        );
        id
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value of cookie `name`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.trim())
}

/// The console's routes, under `/ui` (the caller adds the `Host` check and the body limit).
pub(crate) fn router(state: ConsoleState) -> Router {
    let pages = Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/tasks") }))
        .route("/ui/", get(|| async { Redirect::to("/ui/tasks") }))
        .route("/ui/tasks", get(tasks_page))
        .route("/ui/tasks/{id}", get(task_page))
        .route("/ui/tasks/{id}/events", get(events::task_stream))
        .route("/ui/events", get(events::tasks_stream))
        .route("/ui/queue", get(queue_page))
        .route("/ui/sessions", get(sessions_page))
        .route("/ui/supervision", get(supervision_page))
        .route("/ui/tasks/{id}/{action}", post(task_action))
        .route("/ui/queue/{action}", post(queue_action))
        .route("/ui/sessions/{id}/stop", post(stop_session))
        .route("/ui/supervision/{name}/{action}", post(loop_action))
        .route("/ui/logout", post(logout))
        .layer(from_fn_with_state(state.clone(), check_post));
    let open = Router::new()
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/assets/console.js", get(script))
        .route("/ui/assets/console.css", get(stylesheet));
    pages
        .merge(open)
        .layer(from_fn(secure_headers))
        .with_state(state)
}

/// Every console answer: the Content-Security-Policy and its companions.
async fn secure_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Not `no-referrer`: with it, browsers send `Origin: null` on a form's POST.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A console error page (or plain text for a script).
fn refusal(status: StatusCode, message: &str) -> Response {
    (status, pages::error_page(status, message)).into_response()
}

/// Guard of every `POST` but the login: the `Origin` names this server, and the CSRF token
/// (form field `csrf` or header `X-CSRF-Token`) is the sender's.
async fn check_post(State(state): State<ConsoleState>, request: Request, next: Next) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    if let Err(message) = same_origin(&state, request.headers()) {
        return refusal(StatusCode::FORBIDDEN, &message);
    }
    let Some(viewer) = state.who(request.headers()) else {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "sign in first: open /ui/login and give msbd's token",
        );
    };
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(bytes) => bytes,
        Err(_) => return refusal(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large"),
    };
    let given = parts
        .headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            url::form_urlencoded::parse(&bytes)
                .find(|(key, _)| key == "csrf")
                .map(|(_, value)| value.into_owned())
        });
    let valid = given
        .as_deref()
        .is_some_and(|given| bool::from(given.as_bytes().ct_eq(viewer.csrf.as_bytes())));
    if !valid {
        tracing::warn!(path = %parts.uri.path(), "console: refused a POST without this login's CSRF token");
        return refusal(
            StatusCode::FORBIDDEN,
            "this form's CSRF token is missing or not yours: reload the page and try again",
        );
    }
    let mut request = Request::from_parts(parts, axum::body::Body::from(bytes));
    request.extensions_mut().insert(viewer);
    next.run(request).await
}

/// Whether a `POST` comes from a page of this server: its `Origin` is `http(s)://` and the
/// `Host` it was sent to (already checked against the allowed hosts), or an allowed origin.
fn same_origin(state: &ConsoleState, headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Err(
            "the request has no Origin header: the console's actions are sent by its pages in a browser (send Origin with this server's address)".into(),
        );
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let own = [format!("http://{host}"), format!("https://{host}")];
    if own.iter().any(|o| o.eq_ignore_ascii_case(origin))
        || state
            .0
            .options
            .allowed_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin))
    {
        Ok(())
    } else {
        tracing::warn!(%origin, %host, "console: refused a POST from another origin");
        Err(format!(
            "the request comes from {origin}, not from this server's pages: act from the console itself"
        ))
    }
}

/// The viewer of a page: who sent the request, else the page answers with a redirect to the
/// login form.
pub(crate) struct PageViewer(Viewer);

impl axum::extract::FromRequestParts<ConsoleState> for PageViewer {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &ConsoleState,
    ) -> Result<PageViewer, Response> {
        state
            .who(&parts.headers)
            .map(PageViewer)
            .ok_or_else(|| Redirect::to("/ui/login").into_response())
    }
}

async fn script() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    )
}

async fn stylesheet() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn login_page(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    if state.open() || state.who(&headers).is_some_and(|v| !v.signed_in) {
        return Redirect::to("/ui/tasks").into_response();
    }
    pages::login_page(None).into_response()
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn login(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    if let Err(message) = same_origin(&state, &headers) {
        return refusal(StatusCode::FORBIDDEN, &message);
    }
    let Some((operator, principal)) = state.login_for(form.token.trim()) else {
        tracing::warn!("console: a login with a token msbd does not know");
        return (
            StatusCode::UNAUTHORIZED,
            pages::login_page(Some(
                "That token is not msbd's: give MSB_OPERATOR_TOKEN (the operator) or MSB_AUTH_TOKEN.",
            )),
        )
            .into_response();
    };
    let id = state.sign_in(operator, principal);
    let cookie = format!(
        "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}",
        LOGIN_LASTS.as_secs()
    );
    let mut response = Redirect::to("/ui/tasks").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn logout(State(state): State<ConsoleState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie(&headers, COOKIE) {
        state.logins().remove(id);
    }
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("msbd_console=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

/// The query of the task list (and the flash message an action left).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct TasksQuery {
    #[serde(default)]
    pub(crate) status: Option<String>,
    #[serde(default, rename = "type")]
    pub(crate) task_type: Option<String>,
    #[serde(default)]
    pub(crate) tag: Option<String>,
    #[serde(default)]
    pub(crate) owner: Option<String>,
    #[serde(default)]
    pub(crate) session: Option<String>,
    #[serde(default)]
    pub(crate) id: Option<String>,
    #[serde(default)]
    pub(crate) cursor: Option<String>,
    #[serde(default)]
    pub(crate) limit: Option<u32>,
    #[serde(flatten)]
    pub(crate) flash: Flash,
}

/// A message an action left for the page it returns to.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Flash {
    #[serde(default)]
    pub(crate) done: Option<String>,
    #[serde(default)]
    pub(crate) error: Option<String>,
}

async fn tasks_page(PageViewer(viewer): PageViewer, Query(query): Query<TasksQuery>) -> Response {
    if let Some(id) = query
        .id
        .as_deref()
        .map(str::trim)
        .filter(|id| !id.is_empty())
    {
        return Redirect::to(&format!("/ui/tasks/{}", encode(id))).into_response();
    }
    let list = viewer
        .console
        .list(ListQuery {
            status: query.status.clone(),
            task_type: query.task_type.clone(),
            tag: query.tag.clone(),
            session_id: query.session.clone(),
            owner: query.owner.clone(),
            cursor: query.cursor.clone(),
            limit: query.limit.unwrap_or(50),
        })
        .await;
    pages::tasks_page(&viewer, &query, list).into_response()
}

async fn task_page(
    PageViewer(viewer): PageViewer,
    Path(id): Path<String>,
    Query(flash): Query<Flash>,
) -> Response {
    let task = match viewer.console.task(&id).await {
        Ok(task) => task,
        Err(error) => {
            return (
                StatusCode::NOT_FOUND,
                pages::problem_page(&viewer, "Task", &error),
            )
                .into_response();
        }
    };
    let tail = 64 * 1024;
    let stdout = viewer
        .console
        .output(&id, Some("stdout"), None, Some(tail))
        .await
        .ok();
    let stderr = viewer
        .console
        .output(&id, Some("stderr"), None, Some(tail))
        .await
        .ok();
    pages::task_page(&viewer, &task, stdout.as_ref(), stderr.as_ref(), &flash).into_response()
}

/// Where an action sends the browser back to, with what happened.
fn back(to: &str, outcome: Result<String, ConsoleError>) -> Response {
    let (key, text) = match outcome {
        Ok(done) => ("done", done),
        Err(error) => (
            "error",
            format!("{}: {} ({})", error.code, error.message, error.hint),
        ),
    };
    Redirect::to(&format!("{to}?{key}={}", encode(&text))).into_response()
}

fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn message_of(answer: &serde_json::Value, fallback: &str) -> String {
    answer["message"]
        .as_str()
        .map_or_else(|| fallback.to_owned(), str::to_owned)
}

#[derive(Debug, Default, Deserialize)]
struct PriorityForm {
    #[serde(default)]
    priority: String,
}

async fn task_action(
    axum::Extension(viewer): axum::Extension<Viewer>,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<PriorityForm>,
) -> Response {
    let page = format!("/ui/tasks/{}", encode(&id));
    if action == "priority" {
        let outcome = viewer.console.set_priority(&id, &form.priority).await;
        return back(&page, outcome.map(|a| message_of(&a, "priority changed")));
    }
    let Ok(command) = action.parse::<TaskCommand>() else {
        return refusal(
            StatusCode::NOT_FOUND,
            &format!("no task action {action:?}: use cancel, pause, resume, retry or priority"),
        );
    };
    let outcome = viewer.console.act(&id, command).await;
    if command == TaskCommand::Retry
        && let Ok(answer) = &outcome
        && let Some(new) = answer["data"]["task"]["task_id"]
            .as_str()
            .or_else(|| answer["data"]["task_id"].as_str())
    {
        return back(
            &format!("/ui/tasks/{}", encode(new)),
            Ok(format!("Retried as this new task (of {id}).")),
        );
    }
    back(&page, outcome.map(|a| message_of(&a, "done")))
}

#[derive(Debug, Default, Deserialize)]
struct QueueForm {
    #[serde(default)]
    task_type: Option<String>,
    /// For `limits`: the most tasks running at once.
    #[serde(default)]
    max_concurrent: Option<String>,
}

async fn queue_page(
    State(state): State<ConsoleState>,
    PageViewer(viewer): PageViewer,
    Query(flash): Query<Flash>,
) -> Response {
    let queue = viewer.console.queue().await;
    let charts = state.0.history.charts();
    pages::queue_page(&viewer, queue, &charts, &flash).into_response()
}

async fn queue_action(
    axum::Extension(viewer): axum::Extension<Viewer>,
    Path(action): Path<String>,
    Form(form): Form<QueueForm>,
) -> Response {
    let task_type = form.task_type.as_deref();
    let outcome = match action.as_str() {
        "pause" => viewer.console.queue_action(true, task_type).await,
        "resume" => viewer.console.queue_action(false, task_type).await,
        "limits" => {
            let text = form.max_concurrent.as_deref().unwrap_or("").trim();
            match text.parse::<u32>() {
                Ok(max) => viewer.console.set_limits(max, task_type).await,
                Err(_) => Err(ConsoleError {
                    code: "INVALID_ARGUMENT".into(),
                    message: format!("{text:?} is not a number of tasks"),
                    hint: "give a whole number: 1 to 1024 for the queue; for a type, 0 removes its limit"
                        .into(),
                }),
            }
        }
        _ => {
            return refusal(
                StatusCode::NOT_FOUND,
                "no queue action: use pause, resume or limits",
            );
        }
    };
    back("/ui/queue", outcome.map(|a| message_of(&a, "done")))
}

async fn sessions_page(PageViewer(viewer): PageViewer, Query(flash): Query<Flash>) -> Response {
    let sessions = viewer.console.sessions().await;
    pages::sessions_page(&viewer, sessions, &flash).into_response()
}

async fn stop_session(
    axum::Extension(viewer): axum::Extension<Viewer>,
    Path(id): Path<String>,
) -> Response {
    let outcome = viewer.console.stop_session(&id).await;
    back("/ui/sessions", outcome.map(|a| message_of(&a, "stopped")))
}

async fn supervision_page(PageViewer(viewer): PageViewer, Query(flash): Query<Flash>) -> Response {
    let health = viewer.console.health().await;
    let cluster = if viewer.console.is_operator() {
        Some(viewer.console.cluster().await)
    } else {
        None
    };
    pages::supervision_page(&viewer, &health, cluster, &flash).into_response()
}

async fn loop_action(
    axum::Extension(viewer): axum::Extension<Viewer>,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    let Ok(command) = action.parse::<LoopCommand>() else {
        return refusal(
            StatusCode::NOT_FOUND,
            &format!("no loop action {action:?}: use pause, resume or restart"),
        );
    };
    let outcome = viewer.console.loop_action(&name, command).await;
    back(
        "/ui/supervision",
        outcome.map(|_| format!("{name}: {action} done.")),
    )
}
