//! Tool argument decoding in `mcp-tools`: how a `tools/call`'s `arguments` object becomes a
//! tool's typed argument struct (rmcp's `Parameters<T>`, which is
//! `serde_json::from_value(Value::Object(arguments))`), how a failure is explained
//! (`mcp_tools::explain_argument_errors`), and the conversions the tools then apply to the
//! decoded values (priorities, status filters, session ids, `task_config`).
//!
//! The input is arbitrary bytes; those that are a JSON object are decoded as the arguments of
//! every tool that takes arguments. Asserts: nothing panics; a decoded value, written back as
//! JSON, decodes to the same value; a failure becomes an `INVALID_ARGUMENT` tool error that
//! names the tool and carries serde's reason; a priority that converts is within 0 to 9.

#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use mcp_tools::wire::{
    CheckStatusArgs, GetResultArgs, ListArgs, ManageQueueArgs, ManageTasksArgs, PriorityArg,
    ReadOutputArgs, SubmitArgs, SubmitOptions, TaskIdArgs, parse_status_filter,
};
use mcp_tools::{
    ExecuteCodeArgs, ExecuteCommandArgs, GetSessionsArgs, StopSessionArgs, explain_argument_errors,
};
use rmcp::model::{CallToolResponse, CallToolResult, ContentBlock};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(arguments) = serde_json::from_slice::<Map<String, Value>>(data) else {
        return;
    };
    for tool in ["create_background_task", "submit_task"] {
        decode(tool, &arguments, submit_json, |args: &SubmitArgs| {
            check_options(&args.options())
        });
    }
    decode("check_task_status", &arguments, check_status_json, |args| {
        status_filter(args.status_filter.as_deref());
    });
    decode("get_task_result", &arguments, get_result_json, |_| {});
    decode("cancel_task", &arguments, task_id_json, |_| {});
    decode("list_tasks", &arguments, list_json, |args| {
        status_filter(args.status.as_deref());
        session_id(args.session_id.as_deref());
        // The listing cursor: the `cursor` target fuzzes its decoding.
        if let Some(cursor) = &args.cursor {
            let _ = cursor.parse::<task_core::store::Cursor>();
        }
    });
    decode("read_task_output", &arguments, read_output_json, |_| {});
    decode(
        "manage_background_tasks",
        &arguments,
        manage_tasks_json,
        |args| {
            priority(args.priority.as_ref());
            status_filter(args.status.as_deref());
            // The tool decodes `task_config` as submission options.
            if let Some(config) = args.task_config.clone().filter(|c| !c.is_null())
                && let Ok(options) = serde_json::from_value::<SubmitOptions>(config)
            {
                check_options(&options);
            }
        },
    );
    decode("manage_task_queue", &arguments, manage_queue_json, |args| {
        priority(args.priority.as_ref());
    });
    decode("execute_code", &arguments, execute_code_json, |args| {
        session_id(args.session_id.as_deref());
    });
    decode(
        "execute_command",
        &arguments,
        execute_command_json,
        |args| {
            session_id(args.session_id.as_deref());
        },
    );
    decode("get_sessions", &arguments, get_sessions_json, |args| {
        session_id(args.session_id.as_deref());
    });
    decode("stop_session", &arguments, stop_session_json, |args| {
        session_id(Some(&args.session_id));
    });
});

/// Decodes `arguments` as `tool`'s argument type `T`, as rmcp does, and checks the outcome.
fn decode<T: DeserializeOwned + Debug>(
    tool: &str,
    arguments: &Map<String, Value>,
    to_json: fn(&T) -> Value,
    after: impl Fn(&T),
) {
    match serde_json::from_value::<T>(Value::Object(arguments.clone())) {
        Ok(args) => {
            after(&args);
            let written = to_json(&args);
            let again: T = serde_json::from_value(written.clone()).unwrap_or_else(|e| {
                panic!("{tool}: {args:?} written as {written} does not decode: {e}")
            });
            assert_eq!(
                format!("{args:?}"),
                format!("{again:?}"),
                "{tool}: {written} decodes to another value"
            );
        }
        Err(error) => {
            // What rmcp answers, then what msbd makes of it.
            let rmcp_answer =
                CallToolResponse::Complete(CallToolResult::error(vec![ContentBlock::text(
                    format!("failed to deserialize parameters: {error}"),
                )]));
            let CallToolResponse::Complete(result) = explain_argument_errors(tool, rmcp_answer)
            else {
                panic!("{tool}: the explained answer is not a complete tool result");
            };
            assert_eq!(result.is_error, Some(true), "{tool}: not a tool error");
            assert_eq!(result.content.len(), 1, "{tool}: {result:?}");
            let text = &result.content[0]
                .as_text()
                .unwrap_or_else(|| panic!("{tool}: {result:?} is not text"))
                .text;
            let prefix = format!("Error INVALID_ARGUMENT: the arguments of {tool} are not valid: ");
            assert!(text.starts_with(&prefix), "{tool}: {text:?}");
            let reason = error.to_string();
            assert!(
                text.contains(reason.trim_matches(|c: char| c == ':' || c.is_whitespace())),
                "{tool}: {text:?} lost serde's reason {reason:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the tools do with decoded values.

fn priority(priority: Option<&PriorityArg>) {
    if let Some(Ok(priority)) = priority.map(PriorityArg::to_priority) {
        assert!(priority.get() <= 9, "priority {}", priority.get());
    }
}

fn status_filter(filter: Option<&str>) {
    let _ = parse_status_filter(filter);
}

fn session_id(session: Option<&str>) {
    if let Some(session) = session
        && sandbox_wrapper::backend::local::validate_session_id(session).is_ok()
    {
        // A valid session id names a directory: never a path.
        assert!(
            !session.is_empty() && !session.contains(['/', '.', '\0']),
            "session id {session:?} accepted"
        );
    }
}

fn check_options(options: &SubmitOptions) {
    priority(options.priority.as_ref());
    session_id(options.session_id.as_deref());
}

// ---------------------------------------------------------------------------------------------
// The decoded values written back as JSON, field by field (the argument types only derive
// `Deserialize`). `None` fields are left out, as a client would.

/// An object of the fields that are set.
fn object<const N: usize>(fields: [(&str, Option<Value>); N]) -> Value {
    Value::Object(
        fields
            .into_iter()
            .filter_map(|(name, value)| Some((name.to_owned(), value?)))
            .collect(),
    )
}

fn opt<T: serde::Serialize>(value: &Option<T>) -> Option<Value> {
    value.as_ref().map(|v| json!(v))
}

fn priority_json(priority: &Option<PriorityArg>) -> Option<Value> {
    priority.as_ref().map(|p| match p {
        PriorityArg::Number(n) => json!(n),
        PriorityArg::Name(name) => json!(name),
    })
}

fn submit_json(args: &SubmitArgs) -> Value {
    let o = &args.options();
    object([
        ("task_type", Some(json!(args.task_type))),
        ("params", opt(&args.params)),
        ("priority", priority_json(&o.priority)),
        ("timeout_seconds", opt(&o.timeout_seconds)),
        ("max_retries", opt(&o.max_retries)),
        ("delay_seconds", opt(&o.delay_seconds)),
        ("idempotency_key", opt(&o.idempotency_key)),
        ("session_id", opt(&o.session_id)),
        ("tags", opt(&o.tags)),
    ])
}

fn check_status_json(args: &CheckStatusArgs) -> Value {
    object([
        ("task_id", opt(&args.task_id)),
        ("task_type", opt(&args.task_type)),
        ("status_filter", opt(&args.status_filter)),
        ("limit", opt(&args.limit)),
    ])
}

fn get_result_json(args: &GetResultArgs) -> Value {
    object([
        ("task_id", Some(json!(args.task_id))),
        ("wait", opt(&args.wait)),
        ("timeout", opt(&args.timeout)),
    ])
}

fn task_id_json(args: &TaskIdArgs) -> Value {
    object([("task_id", Some(json!(args.task_id)))])
}

fn list_json(args: &ListArgs) -> Value {
    object([
        ("status", opt(&args.status)),
        ("task_type", opt(&args.task_type)),
        ("session_id", opt(&args.session_id)),
        ("tag", opt(&args.tag)),
        ("limit", opt(&args.limit)),
        ("cursor", opt(&args.cursor)),
    ])
}

fn read_output_json(args: &ReadOutputArgs) -> Value {
    object([
        ("task_id", Some(json!(args.task_id))),
        ("cursor", opt(&args.cursor)),
        ("max_bytes", opt(&args.max_bytes)),
    ])
}

fn manage_tasks_json(args: &ManageTasksArgs) -> Value {
    object([
        ("action", Some(json!(args.action))),
        ("task_id", opt(&args.task_id)),
        ("task_type", opt(&args.task_type)),
        ("parameters", opt(&args.parameters)),
        ("priority", priority_json(&args.priority)),
        ("task_config", opt(&args.task_config)),
        ("delay_seconds", opt(&args.delay_seconds)),
        ("status", opt(&args.status)),
        ("limit", opt(&args.limit)),
        ("older_than_seconds", opt(&args.older_than_seconds)),
    ])
}

fn manage_queue_json(args: &ManageQueueArgs) -> Value {
    object([
        ("action", Some(json!(args.action))),
        ("task_type", opt(&args.task_type)),
        ("priority", priority_json(&args.priority)),
        ("max_concurrent", opt(&args.max_concurrent)),
        ("task_id", opt(&args.task_id)),
    ])
}

fn execute_code_json(args: &ExecuteCodeArgs) -> Value {
    object([
        ("code", Some(json!(args.code))),
        ("template", opt(&args.template)),
        ("session_id", opt(&args.session_id)),
        ("flavor", opt(&args.flavor)),
        ("timeout", opt(&args.timeout)),
    ])
}

fn execute_command_json(args: &ExecuteCommandArgs) -> Value {
    object([
        ("command", Some(json!(args.command))),
        ("template", opt(&args.template)),
        ("session_id", opt(&args.session_id)),
        ("flavor", opt(&args.flavor)),
        ("timeout", opt(&args.timeout)),
    ])
}

fn get_sessions_json(args: &GetSessionsArgs) -> Value {
    object([("session_id", opt(&args.session_id))])
}

fn stop_session_json(args: &StopSessionArgs) -> Value {
    object([("session_id", Some(json!(args.session_id)))])
}
