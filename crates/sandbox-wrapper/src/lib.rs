//! Sandboxes, sessions and the supervision of msbd's background loops.
//!
//! This crate sits directly above `task-core` and will own:
//!
//! - the sandbox backend trait (create, exec with streaming output, stop, list,
//!   metrics) and its backends: `local`, which runs processes under the strongest
//!   isolation the host offers (cgroups, an unprivileged uid, bubblewrap namespaces,
//!   Landlock and seccomp, rlimits), and `microsandbox`, which talks to the
//!   microsandbox server's JSON-RPC API;
//! - the session manager (idle sessions expire) and the resource manager (limits on
//!   sessions and total memory, least-recently-used eviction, orphan cleanup that
//!   never touches anything that is not ours);
//! - the task handlers registered into the `task-core` engine: `command`, `code`,
//!   and operator-defined task types loaded from a TOML file, with output captured
//!   to a file per task and `::progress::` lines turned into progress reports;
//! - the supervisor: every background loop is a named child with a restart policy,
//!   pause and resume, statistics, health, and graceful shutdown within a deadline.
//!
//! Architecture invariant: this crate knows nothing of MCP or the CLI and never reads
//! the environment; it takes plain config structs from its caller.
//!
//! Nothing is implemented yet.
