//! The streamable HTTP transport's sessions: rmcp's in-memory session manager, each session's
//! transport wrapped in a [`FastLane`], and quick calls answered on the HTTP request's own task.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_core::Stream;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::session::{
    EventStore, RestoreOutcome, ServerSseMessage, SessionId, SessionManager,
};

use crate::fast_lane::Opened;
use crate::{FastLane, McpServer};

/// rmcp's in-memory sessions, each served over a [`FastLane`], with one shortcut.
///
/// rmcp hands each request of a session to the session's worker task, which passes it to the
/// session's service loop, whose answer goes back through the worker to the HTTP response's
/// stream: each hand-off can wake a parked thread. A quick read-only call of an open session
/// (what [`FastLane`] answers itself: [`AT_ONCE_TOOLS`](crate::AT_ONCE_TOOLS), and `tasks/get`
/// from a tasks client) is answered here instead, where rmcp asks for the request's stream,
/// on the HTTP request's own task: the stream holds the answer and ends. rmcp has checked the
/// request by then (session, headers, protocol version), and the answer is the one the
/// session's lane would write. Everything else goes through the session as rmcp made it.
///
/// rmcp ends a session whose worker has heard nothing for its keep-alive (5 minutes): a quick
/// call goes through the session at least every 30 s (`THROUGH_SESSION_EVERY`), so that a client
/// that only polls keeps its session.
///
/// What differs from the session's way: the answer's event stream has no priming event and
/// its one event no id (there is nothing to resume: the stream ends with the answer), and its
/// headers go out with the answer (a read that waits, on PostgreSQL, shows nothing until it
/// is done); between the end of a session's service and rmcp's forgetting the session, its
/// quick calls are still answered where rmcp would answer an error. After a second
/// `initialize` on a session, its calls all go through the session.
pub struct FastLaneSessions {
    inner: LocalSessionManager,
    /// The server every session's fast lane answers for (the one principal of HTTP).
    server: Arc<McpServer>,
    /// What each session's lane knows once the session is open, for as long as the lane
    /// lives (a session that ends drops its lane).
    lanes: Mutex<Lanes>,
}

/// How often a session's quick calls go through the session anyway (see [`FastLaneSessions`]).
const THROUGH_SESSION_EVERY: Duration = Duration::from_secs(30);
const _: () = assert!(
    THROUGH_SESSION_EVERY.as_secs() * 4 <= SessionConfig::DEFAULT_KEEP_ALIVE.as_secs(),
    "quick calls must reach a session well within its keep-alive"
);

#[derive(Default)]
struct Lanes {
    open: HashMap<SessionId, Lane>,
    /// How many sessions there were at the last sweep of the ended ones.
    swept_at: usize,
}

struct Lane {
    /// What the session's lane knows once the session is open.
    opened: Weak<OnceLock<Opened>>,
    /// When a request last went through the session.
    through_session: Instant,
}

impl FastLaneSessions {
    /// Sessions whose fast lanes answer for `server` (with its principal).
    pub fn new(server: McpServer) -> FastLaneSessions {
        FastLaneSessions {
            inner: LocalSessionManager::default(),
            server: Arc::new(server),
            lanes: Mutex::new(Lanes::default()),
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wraps a new session's transport in a lane, and notes the lane.
    fn lane<T: rmcp::transport::Transport<rmcp::RoleServer>>(
        &self,
        id: &SessionId,
        transport: T,
    ) -> FastLane<T> {
        let lane = FastLane::with_server(transport, Arc::clone(&self.server));
        let mut lanes = self.lanes();
        lanes.open.insert(
            id.clone(),
            Lane {
                opened: lane.opened(),
                through_session: Instant::now(),
            },
        );
        // Sessions that end without a `DELETE` leave dead entries: swept whenever the map
        // has doubled since the last sweep.
        if lanes.open.len() >= 2 * lanes.swept_at.max(16) {
            lanes.open.retain(|_, lane| lane.opened.strong_count() > 0);
            lanes.swept_at = lanes.open.len();
        }
        lane
    }

    /// What the lane of session `id` knows, if the session is open and its next request may
    /// be answered here.
    fn opened(&self, id: &SessionId) -> Option<Arc<OnceLock<Opened>>> {
        self.lanes().answer_here(id, Instant::now())
    }
}

impl Lanes {
    /// What the lane of session `id` knows, if the session is open and its request at `now`
    /// may be answered here; `None` when it goes through the session (which is then noted).
    fn answer_here(&mut self, id: &SessionId, now: Instant) -> Option<Arc<OnceLock<Opened>>> {
        let lane = self.open.get_mut(id)?;
        if now.saturating_duration_since(lane.through_session) >= THROUGH_SESSION_EVERY {
            lane.through_session = now;
            return None;
        }
        let opened = lane.opened.upgrade()?;
        opened.get().is_some().then_some(opened)
    }
}

/// A request's stream: the answer made here, or the session's.
enum Answered<S> {
    Here(Option<ServerSseMessage>),
    Session(Pin<Box<S>>),
}

impl<S: Stream<Item = ServerSseMessage>> Stream for Answered<S> {
    type Item = ServerSseMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ServerSseMessage>> {
        match self.get_mut() {
            Answered::Here(answer) => Poll::Ready(answer.take()),
            Answered::Session(stream) => stream.as_mut().poll_next(cx),
        }
    }
}

impl SessionManager for FastLaneSessions {
    type Error = <LocalSessionManager as SessionManager>::Error;
    type Transport = FastLane<<LocalSessionManager as SessionManager>::Transport>;

    async fn create_session(&self) -> Result<(SessionId, Self::Transport), Self::Error> {
        let (id, transport) = self.inner.create_session().await?;
        let lane = self.lane(&id, transport);
        Ok((id, lane))
    }

    async fn initialize_session(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        self.inner.initialize_session(id, message).await
    }

    async fn has_session(&self, id: &SessionId) -> Result<bool, Self::Error> {
        self.inner.has_session(id).await
    }

    async fn close_session(&self, id: &SessionId) -> Result<(), Self::Error> {
        self.lanes().open.remove(id);
        self.inner.close_session(id).await
    }

    async fn create_stream(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        if let Some(opened) = self.opened(id)
            && let Some(opened) = opened.get()
            && let Some((request, answering)) = opened.take_call(&self.server, &message)
        {
            drop(message);
            let response = opened.response(request, answering.await);
            return Ok(Answered::Here(Some(ServerSseMessage::from_message(
                response,
            ))));
        }
        let stream = self.inner.create_stream(id, message).await?;
        Ok(Answered::Session(Box::pin(stream)))
    }

    async fn accept_message(
        &self,
        id: &SessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<(), Self::Error> {
        self.inner.accept_message(id, message).await
    }

    async fn create_standalone_stream(
        &self,
        id: &SessionId,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.inner.create_standalone_stream(id).await
    }

    async fn resume(
        &self,
        id: &SessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = ServerSseMessage> + Send + Sync + 'static, Self::Error> {
        self.inner.resume(id, last_event_id).await
    }

    async fn restore_session(
        &self,
        id: SessionId,
    ) -> Result<RestoreOutcome<Self::Transport>, Self::Error> {
        Ok(match self.inner.restore_session(id.clone()).await? {
            RestoreOutcome::Restored(transport) => {
                RestoreOutcome::Restored(self.lane(&id, transport))
            }
            RestoreOutcome::AlreadyPresent => RestoreOutcome::AlreadyPresent,
            _ => RestoreOutcome::NotSupported,
        })
    }

    fn event_store(&self) -> Option<Arc<dyn EventStore>> {
        self.inner.event_store()
    }
}

#[cfg(test)]
mod tests {
    use rmcp::model::ProtocolVersion;

    use super::*;

    /// A session whose calls are all answered here still sends one through itself every
    /// [`THROUGH_SESSION_EVERY`] (rmcp would end it after its keep-alive otherwise); a lane
    /// that is not open, or whose session ended, is not answered here.
    #[test]
    fn a_session_answered_here_still_hears_from_its_client() {
        let mut lanes = Lanes::default();
        let start = Instant::now();
        let opened = Arc::new(OnceLock::new());
        let id: SessionId = Arc::from("s1");
        lanes.open.insert(
            id.clone(),
            Lane {
                opened: Arc::downgrade(&opened),
                through_session: start,
            },
        );
        let second = Duration::from_secs(1);
        assert!(
            lanes.answer_here(&id, start + second).is_none(),
            "not open yet"
        );
        opened
            .set(Opened::new(ProtocolVersion::default(), false))
            .unwrap();
        assert!(lanes.answer_here(&id, start + second).is_some());
        let later = start + THROUGH_SESSION_EVERY;
        assert!(
            lanes.answer_here(&id, later).is_none(),
            "through the session"
        );
        assert!(
            lanes.answer_here(&id, later + second).is_some(),
            "and noted"
        );
        assert!(
            lanes
                .answer_here(&id, later + THROUGH_SESSION_EVERY)
                .is_none(),
            "again a period later"
        );
        assert!(
            lanes.answer_here(&Arc::from("s2"), later).is_none(),
            "unknown"
        );
        drop(opened);
        assert!(
            lanes.answer_here(&id, later + second * 2).is_none(),
            "ended"
        );
    }
}
