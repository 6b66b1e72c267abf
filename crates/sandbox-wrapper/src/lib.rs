//! sandbox-wrapper: sandboxes, sessions and resources, the task handlers that run in sandboxes,
//! and the supervisor of every background loop — usable without MCP.
//!
//! Start a [`Wrapper`] on a task store, open a session, run a command task in it, read its
//! output, and shut down gracefully:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use sandbox_wrapper::output::OutputStream;
//! use sandbox_wrapper::{Wrapper, WrapperConfig};
//! use serde_json::json;
//! use task_core::store::sqlite::{SqliteConfig, SqliteStore};
//! use task_core::{NewTask, Status};
//!
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = SqliteStore::open(SqliteConfig::new(dir.path().join("tasks.sqlite3")))?;
//! let wrapper = Wrapper::start(Arc::new(store), WrapperConfig::new(dir.path())).await?;
//! println!("isolation: {}", wrapper.isolation());
//!
//! // A session is made on first use of its id; its work directory and interpreters persist
//! // from one task to the next until it is stopped or idle past the session timeout.
//! let task = NewTask::new(
//!     "command",
//!     json!({"command": "echo hello from $(pwd) > greeting; cat greeting", "session_id": "demo"}),
//! );
//! let id = wrapper.submit(task).await?.task.id;
//! let done = wrapper.engine().wait(id, Duration::from_secs(30)).await?;
//! assert_eq!(done.status, Status::Completed);
//! assert_eq!(done.result.as_ref().unwrap()["exit_code"], 0);
//!
//! // Each attempt's output is a file, readable by cursor (also while the attempt runs).
//! let output = wrapper.read_output(id, done.attempt, OutputStream::Combined, 0, 64 * 1024)?;
//! assert!(output.expect("attempt 1 wrote output").data.starts_with("hello from "));
//! assert_eq!(wrapper.sessions().get("demo")?.id, "demo");
//!
//! let health = wrapper.health_check().await;
//! println!("{}", serde_json::to_string_pretty(&health)?);
//!
//! let report = wrapper.graceful_shutdown(Duration::from_secs(10)).await;
//! assert_eq!(report.status, sandbox_wrapper::supervisor::ShutdownStatus::Success);
//! # Ok(())
//! # }
//! ```
//!
//! The pieces:
//! - [`backend`]: the sandbox backend trait (create, exec with streaming output, REPL, stop,
//!   list, metrics, orphan sweep) and its backends: [`backend::local`], which runs processes
//!   under the strongest isolation the host offers (cgroups, an unprivileged uid, bubblewrap
//!   namespaces, seccomp, Landlock, rlimits), and [`backend::microsandbox`], a client of the
//!   microsandbox server's JSON-RPC API;
//! - [`output`]: a task's output captured to a capped file, readable by cursor, with
//!   `::progress::` lines turned into progress reports;
//! - [`session`]: sessions (made on first use, expired when idle) and the resource manager
//!   (limits on sessions and memory, least-recently-used eviction);
//! - [`files`]: files in and out of a session's work directory, resolved beneath it by the
//!   kernel (`openat2`);
//! - [`network`]: network policies per session (`none`, `allow` through msbd's filtering
//!   proxy, `host`);
//! - [`handlers`]: the `command` and `code` task types, and operator-defined ones from
//!   [`task_types`] (a TOML file);
//! - [`supervisor`]: every background loop is a named child with a restart policy, pause and
//!   resume, statistics, health, and shutdown in reverse start order within a deadline;
//! - [`wrapper`]: the facade over all of it;
//! - [`stable`]: the one FNV-1a hash (its values persist) and the one Unix-seconds clock.
//!
//! Architecture invariant: this crate knows nothing of MCP or the CLI and never reads the
//! environment; it takes plain config structs from its caller.

pub mod backend;
pub mod files;
pub mod handlers;
pub mod network;
pub mod output;
pub mod session;
pub mod stable;
pub mod supervisor;
pub mod task_types;
pub mod wrapper;

pub use stable::{Clock, fnv1a_64, unix_now};
pub use wrapper::{Wrapper, WrapperConfig, WrapperError};
