//! The MCP surface of msbd: an [`McpServer`] (an rmcp `ServerHandler`) over a started
//! [`sandbox_wrapper::Wrapper`].
//!
//! - Background-task tools (`create_background_task`, `submit_task`, `check_task_status`,
//!   `get_task_result`, `wait_for_tasks`, `cancel_task`, `list_tasks`, `read_task_output`,
//!   `manage_background_tasks`, `manage_task_queue`), sandbox tools (`execute_code`,
//!   `execute_command`, `get_sessions`, `stop_session`, `get_volume_mappings`), file tools
//!   (`write_file`, `read_file`, `list_files`) and supervision
//!   tools (`health_check`, `get_background_task_status`, `restart_background_tasks`,
//!   `pause_background_tasks`, `resume_background_tasks`; listed only when enabled). Each has
//!   an input schema with descriptions, a structured answer with its output schema, and a text
//!   answer for clients that ignore structured output.
//! - The MCP tasks extension, served from the durable task store: for a client that declares
//!   it, `execute_command` and `execute_code` answer with a task whose id is msbd's task id;
//!   `tasks/get` and `tasks/cancel` work across restarts.
//! - Progress: `notifications/progress` to a caller that sent a progress token, for the task it
//!   runs (`execute_*`) or awaits (`get_task_result(wait=true)`, `wait_for_tasks`). No call
//!   waits longer than the caller's `wait_seconds`/`timeout` or the server's call wait: a
//!   task still going is answered with its id and where it stands.
//! - Ownership: tasks and sessions belong to the principal that made them; another
//!   principal's are "not found".
//! - Errors: a malformed request is a JSON-RPC error (rmcp answers it); a call that cannot be
//!   done is a tool error (`isError: true`) whose text says what happened and what to do.
//!
//! - A client ([`client`]): msbd's command line calls the tools of a running msbd over
//!   streamable HTTP through it.
//!
//! Architecture invariant: this is the only crate that knows MCP and JSON-RPC. It never reads
//! the environment, parses flags or installs signal handlers. Its wire types ([`wire`]) are its
//! own, converted by hand from the core types.

mod actions;
mod arguments;
pub mod client;
pub mod console;
mod fast_lane;
mod notify;
mod server;
mod tools_files;
mod tools_sandbox;
mod tools_supervision;
mod tools_tasks;
pub mod transport;
pub mod wire;

#[doc(hidden)]
pub use arguments::accepted_arguments;
pub use fast_lane::{AT_ONCE_TOOLS, FastLane, QuickLines, QuickQueue, quick_lines};
#[doc(hidden)]
pub use server::explain_argument_errors;
pub use server::{
    McpServer, REQUEST_TOO_LARGE_METHOD, STDIO_PRINCIPAL, SUPERVISION_TOOLS, ServerOptions,
    TASK_TOOLS,
};
pub use tools_files::{
    FileEncoding, FileView, ListFilesAnswer, ListFilesArgs, ReadFileAnswer, ReadFileArgs,
    WriteFileAnswer, WriteFileArgs,
};
pub use tools_sandbox::{
    ExecuteCodeArgs, ExecuteCommandArgs, ExecutionAnswer, GetSessionsArgs, SessionView,
    SessionsAnswer, StopAnswer, StopSessionArgs, VolumeView, VolumesAnswer,
};
pub use tools_supervision::{
    BackgroundComponents, BackgroundTasksAnswer, EngineView, Health, HealthAnswer,
    HealthComponentsView, IsolationLevelView, IsolationView, LoopActionAnswer, LoopActionStatus,
    LoopState, LoopView, ResourceManagerView, SandboxView, SessionManagerView, StoreView,
};
