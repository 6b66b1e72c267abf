//! What runs a task: the [`TaskHandler`] trait, the [`TaskContext`] a handler receives, and
//! [`TaskFailure`], the error a handler returns.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::engine::{Control, Inner, StopReason};
use crate::error::Result;
use crate::model::TaskId;

/// Runs the tasks of one type.
///
/// The handler gets a [`TaskContext`] with the task's params, a cancellation token (cancelled when
/// the task is cancelled, times out, loses its lease, or the engine shuts down: return soon after,
/// or the engine drops the future after a grace period), and a way to report progress.
pub trait TaskHandler: Send + Sync + 'static {
    /// Runs one attempt of a task and returns its result.
    fn run(
        &self,
        context: TaskContext,
    ) -> impl Future<Output = std::result::Result<Value, TaskFailure>> + Send;

    /// Checks a task's params when it is submitted, so that bad params are refused at once
    /// (with this message) instead of failing when the task runs. Accepts anything by default.
    fn validate(&self, params: &Value) -> std::result::Result<(), String> {
        let _ = params;
        Ok(())
    }
}

/// A handler made of a closure; see [`handler_fn`].
pub struct FnHandler<F>(F);

/// Makes a handler of an async closure: `handler_fn(|ctx| async move { Ok(json!(1)) })`.
pub fn handler_fn<F, Fut>(function: F) -> FnHandler<F>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Value, TaskFailure>> + Send + 'static,
{
    FnHandler(function)
}

impl<F, Fut> TaskHandler for FnHandler<F>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<Value, TaskFailure>> + Send + 'static,
{
    fn run(
        &self,
        context: TaskContext,
    ) -> impl Future<Output = std::result::Result<Value, TaskFailure>> + Send {
        (self.0)(context)
    }
}

pub(crate) type HandlerFuture =
    Pin<Box<dyn Future<Output = std::result::Result<Value, TaskFailure>> + Send + 'static>>;

/// A handler behind a pointer, so that handlers of different types sit in one table.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    fn start(self: Arc<Self>, context: TaskContext) -> HandlerFuture;
    fn check(&self, params: &Value) -> std::result::Result<(), String>;
}

impl<H: TaskHandler> ErasedHandler for H {
    fn start(self: Arc<Self>, context: TaskContext) -> HandlerFuture {
        Box::pin(async move { self.run(context).await })
    }

    fn check(&self, params: &Value) -> std::result::Result<(), String> {
        self.validate(params)
    }
}

/// Why an attempt failed, as the handler says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFailure {
    /// A readable message.
    pub message: String,
    /// Whether another attempt could succeed (then the task is retried while attempts remain).
    pub retryable: bool,
    /// What the failed attempt produced, as facts a program can read (an exit code, say): kept
    /// as the task's [`crate::Task::result`] beside its error. `None`: only the message.
    pub result: Option<Value>,
}

impl TaskFailure {
    /// A failure that another attempt might not repeat.
    pub fn retryable(message: impl Into<String>) -> TaskFailure {
        TaskFailure {
            message: message.into(),
            retryable: true,
            result: None,
        }
    }

    /// A failure that retrying cannot fix (bad params, say).
    pub fn permanent(message: impl Into<String>) -> TaskFailure {
        TaskFailure {
            message: message.into(),
            retryable: false,
            result: None,
        }
    }

    /// The same failure, with what the attempt produced (see [`TaskFailure::result`]).
    pub fn with_result(mut self, result: Value) -> TaskFailure {
        self.result = Some(result);
        self
    }
}

impl fmt::Display for TaskFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any error converts into a retryable failure, so that `?` works in handlers.
impl<E: std::error::Error> From<E> for TaskFailure {
    fn from(error: E) -> TaskFailure {
        TaskFailure::retryable(error.to_string())
    }
}

/// What a handler knows of the task it runs.
pub struct TaskContext {
    pub(crate) id: TaskId,
    pub(crate) task_type: Arc<str>,
    pub(crate) params: Value,
    pub(crate) attempt: u32,
    pub(crate) max_attempts: u32,
    pub(crate) session_id: Option<String>,
    pub(crate) fresh_session: bool,
    pub(crate) owner: Option<String>,
    pub(crate) control: Arc<Control>,
    pub(crate) engine: Arc<Inner>,
}

impl TaskContext {
    /// The task's id.
    pub fn id(&self) -> TaskId {
        self.id
    }

    /// The task's type.
    pub fn task_type(&self) -> &str {
        &self.task_type
    }

    /// The task's params.
    pub fn params(&self) -> &Value {
        &self.params
    }

    /// Takes the params out of the context.
    pub fn take_params(&mut self) -> Value {
        std::mem::take(&mut self.params)
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The most attempts the task may have.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The session the task runs in, if any.
    pub fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    /// Whether the session was made for this task alone ([`crate::Task::fresh_session`]).
    pub fn fresh_session(&self) -> bool {
        self.fresh_session
    }

    /// The principal that submitted the task, if it named one.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    /// Cancelled when the attempt must stop.
    pub fn cancellation(&self) -> &CancellationToken {
        self.control.token()
    }

    /// Follows whether the task is paused while it runs (`true`: frozen). A handler that can
    /// freeze its work (a sandboxed process tree, say) freezes it while this is `true`; the
    /// engine's timeout clock stops meanwhile. Handlers that cannot may ignore it: their work
    /// goes on, and the task shows `paused` until resumed.
    ///
    /// A receiver taken while the task is paused reports a change at once (its first
    /// `changed()` returns), so that a handler that only waits for changes still freezes.
    pub fn paused(&self) -> tokio::sync::watch::Receiver<bool> {
        let mut paused = self.control.pause_receiver();
        if *paused.borrow() {
            paused.mark_changed();
        }
        paused
    }

    /// Whether the attempt must stop.
    pub fn is_cancelled(&self) -> bool {
        self.control.stopping()
    }

    /// Whether the attempt is being stopped because it ran out of time (the task's timeout):
    /// the engine records the failure as a timeout, keeping the result of the
    /// [`TaskFailure`] the handler returns, so that it can say what the work had done.
    pub fn timed_out(&self) -> bool {
        self.control.reason() == StopReason::TimedOut
    }

    /// Reports progress, from 0.0 to 1.0, with an optional message. Fails on a value out of range
    /// (or NaN), and with [`crate::Error::Fenced`] when this attempt no longer holds the task:
    /// then the handler should stop.
    pub async fn progress(&self, fraction: f64, message: Option<String>) -> Result<()> {
        self.engine
            .report_progress(self.id, self.attempt, fraction, message)
            .await
    }
}
