//! task-core: durable background tasks — the task model, the state machine, the engine and its
//! stores (in memory, and SQLite as the embedded durable default).
//!
//! It knows nothing of MCP, sandboxes, environment variables or command lines: it can be used
//! alone. Register a handler per task type, submit tasks, and wait for their results:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use serde_json::json;
//! use task_core::store::sqlite::{SqliteConfig, SqliteStore};
//! use task_core::{Engine, NewTask, Status, TaskFailure, handler_fn};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.sqlite3")))?;
//! let engine = Engine::builder(Arc::new(store))
//!     .handler(
//!         "add",
//!         handler_fn(|ctx| async move {
//!             let a = ctx.params()["a"].as_i64().ok_or(TaskFailure::permanent("a is missing"))?;
//!             let b = ctx.params()["b"].as_i64().ok_or(TaskFailure::permanent("b is missing"))?;
//!             ctx.progress(0.5, Some("adding".into())).await?;
//!             Ok(json!(a + b))
//!         }),
//!     )
//!     .build()
//!     .await?;
//! let loops = engine.start();
//!
//! let task = engine.submit(NewTask::new("add", json!({"a": 2, "b": 3}))).await?.task;
//! let done = engine.wait(task.id, Duration::from_secs(10)).await?;
//! assert_eq!(done.status, Status::Completed);
//! assert_eq!(done.result, Some(json!(5)));
//!
//! engine.shutdown(Duration::from_secs(5)).await;
//! loops.stop().await;
//! # Ok(())
//! # }
//! ```
//!
//! The pieces: [`model`] (tasks, priorities, statuses), [`state`] (the one place transitions are
//! decided), [`store`] (the [`store::Store`] trait and its implementations), [`engine`] (the worker
//! pool, leases, retries, events) and [`handler`] (what handlers implement and receive).

pub mod engine;
pub mod error;
pub mod handler;
pub mod model;
pub mod state;
pub mod store;

pub use engine::{Engine, EngineBuilder, EngineConfig, EngineLoops, ShutdownReport, TaskEvent};
pub use error::{Error, Result};
pub use handler::{TaskContext, TaskFailure, TaskHandler, handler_fn};
pub use model::{
    AttemptOutcome, AttemptRecord, FailureKind, Interruption, MAX_ATTEMPT_RECORDS,
    MAX_INTERRUPTED_ATTEMPTS, NewTask, Priority, RetryPolicy, Status, Task, TaskError, TaskId,
    Timestamp,
};
pub use store::{ClusterNode, ClusterStatus, DatabaseStatus};
