//! [`FastLane`]: a transport wrapper that answers the quick read-only calls on the task that
//! read them.
//!
//! rmcp's service hands every request to a task of its own, whose answer goes back through a
//! channel to the service loop, which hands the write to yet another task: three hand-offs,
//! each of which can wake a parked thread, for a call whose work (one store read) takes a
//! few microseconds. [`FastLane`] sits between rmcp's service and its transport: a
//! `tools/call` of a tool in [`AT_ONCE_TOOLS`], and `tasks/get` from a client that declared the
//! tasks extension (what such a client polls), is run where it was read and, if it finishes
//! without waiting (a SQLite point read does), its answer is written at once; if it must wait
//! (a listing on SQLite's reader thread, any PostgreSQL read), it goes on on a task of its own
//! and its answer is written when ready, while reading goes on. Every other message, a call
//! before the session is initialized and a call whose `_meta` holds more than a progress token
//! (per-request protocol metadata, say) go to rmcp unchanged. The answer is the one rmcp would
//! send: the same handler body, the same shaping of results and errors for the negotiated
//! protocol version (checked by `mcp-tools/tests/it/tools.rs`, which compares both ways).
//!
//! Like rmcp's loop, reading never waits for a write (a write the transport cannot take at
//! once, as an HTTP session's worker confirming it, goes on on a task), and when the client
//! closes its side the answers still being made are written first (for up to [`DRAIN`]). One
//! difference: a `notifications/cancelled` for a lane call still being made does not stop its
//! answer (these calls only read, and answer within a store read).

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, ClientNotification, ClientRequest, ErrorCode, GetMeta, GetTaskParams,
    JsonRpcMessage, ProtocolVersion, RequestId, ServerResult,
};
use rmcp::service::{RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::Transport;
use rmcp::{ErrorData as McpError, RoleServer};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::McpServer;

/// The tools [`FastLane`] answers itself: they read the store and answer, and never wait for
/// a task, send notifications or depend on the client's capabilities.
pub const AT_ONCE_TOOLS: [&str; 3] = ["check_task_status", "list_tasks", "read_task_output"];

/// How long answers still being made or written are waited for once the client has closed
/// its side (as long as rmcp waits for its own).
const DRAIN: Duration = Duration::from_secs(5);

type Answer = Result<ServerResult, McpError>;
type Answering = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// A [`Transport`] that answers quick read-only tool calls itself (see the module docs).
pub struct FastLane<T: Transport<RoleServer>> {
    inner: T,
    server: Arc<McpServer>,
    /// The protocol version of the `initialize` answer sent, once sent.
    negotiated: Option<ProtocolVersion>,
    /// Whether the client declared the tasks extension in its `initialize`.
    tasks_client: bool,
    /// Set once the client said `notifications/initialized` after that answer; shared with
    /// whoever answers this session's quick calls elsewhere ([`FastLane::opened`]).
    opened: Arc<OnceLock<Opened>>,
    /// Writes that did not finish at once (an HTTP session's worker confirms each): reading
    /// never waits for a write, as rmcp's own loop never does.
    sends: JoinSet<()>,
    /// Answers of calls that had to wait, from their tasks, and how many are still coming.
    finished_tx: mpsc::UnboundedSender<(RequestId, Answer)>,
    finished_rx: mpsc::UnboundedReceiver<(RequestId, Answer)>,
    outstanding: usize,
    /// The client closed its side: what is outstanding is answered, then `receive` ends.
    ended: bool,
    /// Requests passed to rmcp and not answered yet (as far as this lane sees: a request the
    /// client cancels may never be answered, and then this stays above 0).
    with_rmcp: usize,
    /// Set while no call is under way, here or in rmcp (see [`FastLane::with_settled`]).
    settled: Option<Arc<AtomicBool>>,
    /// Quick calls taken from their lines below rmcp's transport (see [`quick_lines`]).
    quick: Option<mpsc::UnboundedReceiver<(RequestId, Answering)>>,
}

impl<T: Transport<RoleServer>> FastLane<T> {
    /// Wraps `inner`, answering for `server` (the handler rmcp serves on the same connection).
    pub fn new(inner: T, server: McpServer) -> FastLane<T> {
        FastLane::with_server(inner, Arc::new(server))
    }

    /// [`FastLane::new`] with a server shared with others.
    pub(crate) fn with_server(inner: T, server: Arc<McpServer>) -> FastLane<T> {
        let (finished_tx, finished_rx) = mpsc::unbounded_channel();
        FastLane {
            inner,
            server,
            negotiated: None,
            tasks_client: false,
            opened: Arc::new(OnceLock::new()),
            sends: JoinSet::new(),
            finished_tx,
            finished_rx,
            outstanding: 0,
            ended: false,
            with_rmcp: 0,
            settled: None,
            quick: None,
        }
    }

    /// Keeps `settled` set while no call is under way (none waiting for its answer, here or in
    /// rmcp), and cleared otherwise, so that the transport below can tell an answer that ends
    /// all work from one written while other calls go on (msbd's stdin spins after the first
    /// kind only).
    pub fn with_settled(mut self, settled: Arc<AtomicBool>) -> FastLane<T> {
        settled.store(true, Ordering::Release);
        self.settled = Some(settled);
        self
    }

    /// Also answers the quick calls that `lines` (the other half of `queue`, in the reader
    /// under this lane's transport) takes from their lines: see [`quick_lines`].
    pub fn with_quick_lines(mut self, queue: QuickQueue) -> FastLane<T> {
        self.opened = queue.opened;
        self.quick = Some(queue.calls);
        self
    }

    /// Updates the `settled` flag after the counts changed.
    fn note_settled(&self) {
        if let Some(settled) = &self.settled {
            settled.store(
                self.with_rmcp == 0 && self.outstanding == 0,
                Ordering::Release,
            );
        }
    }

    /// Hands `message` to rmcp, counting it if it is a request.
    fn hand_to_rmcp(
        &mut self,
        message: RxJsonRpcMessage<RoleServer>,
    ) -> RxJsonRpcMessage<RoleServer> {
        if let JsonRpcMessage::Request(_) = &message {
            self.with_rmcp += 1;
            self.note_settled();
        }
        message
    }

    /// What answers this session's quick calls elsewhere needs, set once the session is
    /// open; it lives as long as this lane.
    pub(crate) fn opened(&self) -> Weak<OnceLock<Opened>> {
        Arc::downgrade(&self.opened)
    }

    /// Writes an answer: at once if the transport takes it without waiting, else on a task
    /// of its own (in [`FastLane::sends`]). Never suspends, so it cannot be cancelled halfway.
    async fn write(&mut self, id: RequestId, answer: Answer) {
        let response = shape(self.negotiated.as_ref(), id, answer);
        let mut sending = Box::pin(self.inner.send(response));
        let polled = std::future::poll_fn(|cx| Poll::Ready(sending.as_mut().poll(cx))).await;
        match polled {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(error)) => {
                tracing::warn!(%error, "could not write an answer to the client");
            }
            Poll::Pending => {
                self.sends.spawn(async move {
                    if let Err(error) = sending.await {
                        tracing::warn!(%error, "could not write an answer to the client");
                    }
                });
            }
        }
    }

    /// Answers a quick call: polled once here, so that a call that finishes without waiting is
    /// answered with no hand-off; else it goes on on a task of its own.
    async fn answer(&mut self, id: RequestId, mut answering: Answering) {
        let polled = std::future::poll_fn(|cx| Poll::Ready(answering.as_mut().poll(cx))).await;
        match polled {
            Poll::Ready(answer) => self.write(id, answer).await,
            Poll::Pending => {
                self.outstanding += 1;
                self.note_settled();
                let finished = self.finished_tx.clone();
                tokio::spawn(async move {
                    let answer = answering.await;
                    let _ = finished.send((id, answer));
                });
            }
        }
    }

    /// Answers the quick calls taken from their lines and not answered yet (the input ended,
    /// or rmcp closes the transport).
    async fn answer_queued(&mut self) {
        while let Some((id, answering)) =
            self.quick.as_mut().and_then(|quick| quick.try_recv().ok())
        {
            self.answer(id, answering).await;
        }
    }

    /// Answers the calls still being made and finishes the writes under way, for up to
    /// [`DRAIN`]. Cancelled halfway, it takes up where it was on its next call.
    async fn drain(&mut self) {
        let deadline = tokio::time::Instant::now() + DRAIN;
        while self.outstanding > 0 {
            match tokio::time::timeout_at(deadline, self.finished_rx.recv()).await {
                Ok(Some((id, answer))) => {
                    self.outstanding -= 1;
                    self.write(id, answer).await;
                }
                Ok(None) | Err(_) => break,
            }
        }
        while !self.sends.is_empty() {
            if tokio::time::timeout_at(deadline, self.sends.join_next())
                .await
                .is_err()
            {
                tracing::warn!("answers still being written when the connection closed");
                break;
            }
        }
    }
}

impl<T: Transport<RoleServer>> Transport<RoleServer> for FastLane<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        if let JsonRpcMessage::Response(response) = &item
            && let ServerResult::InitializeResult(initialized) = &response.result
        {
            self.negotiated = Some(initialized.protocol_version.clone());
        }
        if let JsonRpcMessage::Response(_) | JsonRpcMessage::Error(_) = &item {
            self.with_rmcp = self.with_rmcp.saturating_sub(1);
            self.note_settled();
        }
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        loop {
            if self.ended {
                self.answer_queued().await;
                self.drain().await;
                return None;
            }
            let message = tokio::select! {
                biased;
                Some(written) = self.sends.join_next(), if !self.sends.is_empty() => {
                    if let Err(error) = written {
                        tracing::warn!(%error, "a write of an answer failed");
                    }
                    continue;
                }
                Some((id, answer)) = self.finished_rx.recv() => {
                    self.outstanding -= 1;
                    self.note_settled();
                    self.write(id, answer).await;
                    continue;
                }
                Some((id, answering)) = next_quick(&mut self.quick) => {
                    self.answer(id, answering).await;
                    continue;
                }
                message = self.inner.receive() => message,
            };
            let Some(message) = message else {
                self.ended = true;
                continue;
            };
            if let JsonRpcMessage::Request(request) = &message
                && let ClientRequest::InitializeRequest(initialize) = &request.request
            {
                self.tasks_client = initialize.params.capabilities.supports_tasks();
                if let Some(opened) = self.opened.get() {
                    opened.stale.store(true, Ordering::Release);
                }
                return Some(self.hand_to_rmcp(message));
            }
            if let JsonRpcMessage::Notification(notification) = &message
                && let ClientNotification::InitializedNotification(_) = notification.notification
            {
                if let Some(negotiated) = self.negotiated.clone() {
                    let _ = self.opened.set(Opened::new(negotiated, self.tasks_client));
                }
                return Some(message);
            }
            let quick = self
                .opened
                .get()
                .and_then(|opened| opened.take_call(&self.server, &message));
            let Some((id, answering)) = quick else {
                return Some(self.hand_to_rmcp(message));
            };
            drop(message);
            self.answer(id, answering).await;
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.answer_queued().await;
        self.drain().await;
        self.inner.close().await
    }
}

/// What is known of a session once it is open (the client said `notifications/initialized`
/// after the `initialize` answer): what its quick calls' answers depend on.
#[derive(Debug)]
pub(crate) struct Opened {
    /// The protocol version of the `initialize` answer.
    negotiated: ProtocolVersion,
    /// Whether the client declared the tasks extension in its `initialize`.
    tasks_client: bool,
    /// Set when the client sends `initialize` again: rmcp answers it and shapes its answers
    /// for what it negotiates then, and every call goes to rmcp from then on.
    stale: AtomicBool,
}

impl Opened {
    pub(crate) fn new(negotiated: ProtocolVersion, tasks_client: bool) -> Opened {
        Opened {
            negotiated,
            tasks_client,
            stale: AtomicBool::new(false),
        }
    }

    /// Whether this session's quick calls may be answered outside rmcp.
    fn live(&self) -> bool {
        !self.stale.load(Ordering::Acquire)
    }

    /// Starts answering `message` for `server` if it is a quick call (`None`: it is for
    /// rmcp).
    pub(crate) fn take_call(
        &self,
        server: &Arc<McpServer>,
        message: &RxJsonRpcMessage<RoleServer>,
    ) -> Option<(RequestId, Answering)> {
        let JsonRpcMessage::Request(request) = message else {
            return None;
        };
        if !self.live() {
            return None;
        }
        // rmcp moves a request's `_meta` into its extensions as it decodes it. A progress
        // token (rmcp's client sends one with every request) means nothing to these calls;
        // anything else (per-request protocol metadata, say) is for rmcp to read.
        let meta = request.request.get_meta();
        if meta.0.0.keys().any(|key| key != "progressToken") {
            return None;
        }
        let answering = match &request.request {
            ClientRequest::CallToolRequest(call)
                if call.params.meta.is_none()
                    && call.params.input_responses.is_none()
                    && call.params.request_state.is_none() =>
            {
                call_tool(server, &call.params)?
            }
            ClientRequest::GetTaskRequest(get) => self.get_task(server, &get.params)?,
            _ => return None,
        };
        Some((request.id.clone(), answering))
    }

    /// Starts answering `tasks/get`, if this session's client declared the tasks extension
    /// (both callers have checked that the session is live).
    fn get_task(&self, server: &Arc<McpServer>, params: &GetTaskParams) -> Option<Answering> {
        if !self.tasks_client {
            return None;
        }
        let answer = Arc::clone(server).task_at_once(params);
        Some(Box::pin(Guarded(Box::pin(async move {
            answer.await.map(ServerResult::GetTaskResult)
        }))))
    }

    /// The JSON-RPC answer to a quick call of this session.
    pub(crate) fn response(&self, id: RequestId, answer: Answer) -> TxJsonRpcMessage<RoleServer> {
        shape(Some(&self.negotiated), id, answer)
    }
}

/// Starts answering a call of a quick tool (`None`: not one, or not one answered here now).
fn call_tool(server: &Arc<McpServer>, params: &CallToolRequestParams) -> Option<Answering> {
    let answer = Arc::clone(server).answer_at_once(params)?;
    Some(Box::pin(Guarded(Box::pin(async move {
        Ok(ServerResult::CallToolResult(answer.await))
    }))))
}

/// The next quick call taken from its line, when there is a queue of them.
async fn next_quick(
    quick: &mut Option<mpsc::UnboundedReceiver<(RequestId, Answering)>>,
) -> Option<(RequestId, Answering)> {
    match quick {
        Some(quick) => quick.recv().await,
        None => std::future::pending().await,
    }
}

/// The JSON-RPC answer, shaped as rmcp shapes results and errors for the negotiated version
/// (`handle_request`).
fn shape(
    negotiated: Option<&ProtocolVersion>,
    id: RequestId,
    answer: Answer,
) -> TxJsonRpcMessage<RoleServer> {
    let current = negotiated.is_some_and(|v| v.as_str() >= ProtocolVersion::V_2026_07_28.as_str());
    match answer {
        Ok(mut result) => {
            if current {
                result.fill_missing_cache_hints();
            } else {
                result.strip_result_type_for_legacy_peer();
            }
            JsonRpcMessage::response(result, id)
        }
        Err(mut error) => {
            if current && error.code == ErrorCode::RESOURCE_NOT_FOUND {
                error.code = ErrorCode::INVALID_PARAMS;
            }
            JsonRpcMessage::error(error, Some(id))
        }
    }
}

/// The reader's half of a [`quick_lines`] pair: see [`QuickLines::take_line`].
pub struct QuickLines {
    server: Arc<McpServer>,
    opened: Arc<OnceLock<Opened>>,
    calls: mpsc::UnboundedSender<(RequestId, Answering)>,
}

/// The lane's half of a [`quick_lines`] pair (see [`FastLane::with_quick_lines`]).
pub struct QuickQueue {
    opened: Arc<OnceLock<Opened>>,
    calls: mpsc::UnboundedReceiver<(RequestId, Answering)>,
}

/// A way for quick calls to skip rmcp's decoding of their lines.
///
/// rmcp's transport decodes every line into its message types, a generic decode (untagged
/// enums, buffered and tried in turn) that took about a fifth of msbd's time per quick call
/// over stdio. The reader under that transport (msbd's
/// [`LimitedLines`](crate::transport::LimitedLines)) gives each line to
/// [`QuickLines::take_line`] first: a quick call of an open session, in the plain shape clients
/// send (the fields JSON-RPC and the call define, a `_meta` holding at most a progress token),
/// is decoded into its own types and started at once, and its answer is queued for the lane
/// ([`FastLane::with_quick_lines`]), which writes it as it writes the answers of the quick calls
/// it gets from rmcp. Any other line goes on to rmcp unchanged.
pub fn quick_lines(server: McpServer) -> (QuickLines, QuickQueue) {
    let opened = Arc::new(OnceLock::new());
    let (calls_tx, calls_rx) = mpsc::unbounded_channel();
    (
        QuickLines {
            server: Arc::new(server),
            opened: Arc::clone(&opened),
            calls: calls_tx,
        },
        QuickQueue {
            opened,
            calls: calls_rx,
        },
    )
}

/// Lines longer than this are not looked at: quick calls are short, and a long line (a
/// `submit_task` with a script) should not be searched.
const QUICK_LINE_MAX: usize = 4096;

/// A JSON-RPC request line, its params left undecoded.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestLine<'a> {
    jsonrpc: &'a str,
    id: RequestId,
    method: &'a str,
    #[serde(borrow)]
    params: &'a serde_json::value::RawValue,
}

/// `tools/call` params, in the plain shape.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CallLine {
    name: String,
    #[serde(default)]
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(rename = "_meta", default)]
    meta: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `tasks/get` params, in the plain shape.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GetTaskLine {
    #[serde(rename = "taskId")]
    task_id: String,
    #[serde(rename = "_meta", default)]
    meta: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Whether a `_meta` holds a progress token at most (which these calls do not use).
fn progress_only(meta: Option<&serde_json::Map<String, serde_json::Value>>) -> bool {
    meta.is_none_or(|meta| meta.keys().all(|key| key == "progressToken"))
}

/// Whether a JSON text is an object (serde's derived types also read arrays, as their fields
/// in order, which rmcp's message types refuse).
fn is_object(json: &[u8]) -> bool {
    json.trim_ascii_start().first() == Some(&b'{')
}

impl QuickLines {
    /// Takes `line` (one JSON-RPC message, without its newline) if it is a quick call of an
    /// open session: its answer is started and queued for the lane. `false`: the line goes
    /// on to rmcp.
    pub fn take_line(&self, line: &[u8]) -> bool {
        let Some(opened) = self.opened.get().filter(|opened| opened.live()) else {
            return false;
        };
        if line.len() > QUICK_LINE_MAX || self.calls.is_closed() || !is_object(line) {
            return false;
        }
        let Ok(request) = serde_json::from_slice::<RequestLine<'_>>(line) else {
            return false;
        };
        if request.jsonrpc != "2.0" || !is_object(request.params.get().as_bytes()) {
            return false;
        }
        let answering = match request.method {
            "tools/call" => {
                let Ok(call) = serde_json::from_str::<CallLine>(request.params.get()) else {
                    return false;
                };
                if !progress_only(call.meta.as_ref()) {
                    return false;
                }
                let mut params = CallToolRequestParams::new(call.name);
                if let Some(arguments) = call.arguments {
                    params = params.with_arguments(arguments);
                }
                call_tool(&self.server, &params)
            }
            "tasks/get" => {
                let Ok(get) = serde_json::from_str::<GetTaskLine>(request.params.get()) else {
                    return false;
                };
                if !progress_only(get.meta.as_ref()) {
                    return false;
                }
                opened.get_task(&self.server, &GetTaskParams::new(get.task_id))
            }
            _ => None,
        };
        let Some(answering) = answering else {
            return false;
        };
        self.calls.send((request.id, answering)).is_ok()
    }
}

/// A call's answer that turns a panic in its body into an internal error: the body runs on
/// the connection's own loop, which a bug in one call must not end.
struct Guarded(Answering);

impl Future for Guarded {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let answering = &mut self.get_mut().0;
        match catch_unwind(AssertUnwindSafe(|| answering.as_mut().poll(cx))) {
            Ok(polled) => polled,
            Err(_) => Poll::Ready(Err(McpError::internal_error(
                "msbd failed while answering this call (a bug: please report it); try the call again",
                None,
            ))),
        }
    }
}
