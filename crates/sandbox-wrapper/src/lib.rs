//! Sandboxes, sessions and the supervision of msbd's background loops.
//!
//! This crate sits directly above `task-core`:
//!
//! - [`backend`]: the sandbox backend trait (create, exec with streaming output, stop, list,
//!   metrics, orphan sweep) and its backends: [`backend::local`], which runs processes under the
//!   strongest isolation the host offers (cgroups, an unprivileged uid, bubblewrap namespaces,
//!   Landlock and seccomp, rlimits), and [`backend::microsandbox`], which talks to the
//!   microsandbox server's JSON-RPC API;
//! - [`output`]: a task's output captured to a capped file, readable by cursor, with
//!   `::progress::` lines turned into progress reports;
//! - [`task_types`]: operator-defined task types loaded from a TOML file;
//! - [`supervisor`]: every background loop is a named child with a restart policy, pause and
//!   resume, statistics, health, and shutdown in reverse start order within a deadline.
//!
//! Architecture invariant: this crate knows nothing of MCP or the CLI and never reads the
//! environment; it takes plain config structs from its caller.

pub mod backend;
pub mod handlers;
pub mod output;
pub mod session;
pub mod supervisor;
pub mod task_types;
pub mod wrapper;

pub use wrapper::{Wrapper, WrapperConfig};
