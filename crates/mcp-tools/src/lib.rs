//! The MCP surface of msbd.
//!
//! This crate sits above `sandbox-wrapper` and `task-core` and will own:
//!
//! - the MCP tools for background tasks (`create_background_task`, `submit_task`,
//!   `check_task_status`, `get_task_result`, `cancel_task`, `list_tasks`,
//!   `read_task_output`, ...), for sandboxes (`execute_code`, `execute_command`,
//!   `get_sessions`, `stop_session`, ...) and for supervision (`health_check`,
//!   `pause_background_tasks`, ...), each with an input schema and structured output;
//! - the MCP tasks extension, served from the durable task store;
//! - progress notifications;
//! - the wire types, which are this crate's own and are converted by hand from the
//!   core types.
//!
//! Architecture invariant: this is the only crate that knows MCP and JSON-RPC. It
//! never reads the environment, parses flags or installs signal handlers.
//!
//! Nothing is implemented yet.
