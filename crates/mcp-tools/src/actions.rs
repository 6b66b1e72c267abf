//! The actions of `manage_background_tasks` ([`TaskAction`]) and `manage_task_queue`
//! ([`QueueAction`]), as types. Each enum is the one list of its tool's actions: its variants
//! give the input schema's `enum` and the `action` argument's description (from their doc
//! comments), the tool's description, and the dispatch (an exhaustive `match`), and parsing an
//! action refuses an unknown one with `UNKNOWN_ACTION`, naming the closest action and the
//! valid ones.

use std::borrow::Cow;
use std::str::FromStr;

use rmcp::schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use strum::{EnumMessage, VariantArray};

use crate::server::ToolError;

/// What `manage_background_tasks` does.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::EnumMessage,
)]
#[strum(serialize_all = "snake_case", ascii_case_insensitive)]
pub enum TaskAction {
    /// Submit task_type with parameters now, with priority and task_config.
    Create,
    /// The same, delayed by delay_seconds or task_config.delay_seconds.
    Schedule,
    /// Cancel the task task_id.
    Cancel,
    /// Hold the task task_id, so that a waiting task does not start and a running one is frozen.
    Pause,
    /// Resume the paused task task_id.
    Resume,
    /// Run the failed, timed-out or cancelled task task_id again, as a new task.
    Retry,
    /// List your tasks, filtered by task_type, status and limit.
    List,
    /// Queue statistics.
    #[strum(to_string = "get_stats", serialize = "stats")]
    GetStats,
    /// Delete your finished tasks older than older_than_seconds, 3600 by default.
    Cleanup,
    /// The task types this server runs.
    #[strum(to_string = "list_types", serialize = "types")]
    ListTypes,
}

/// What `manage_task_queue` does.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::EnumMessage,
)]
#[strum(serialize_all = "snake_case", ascii_case_insensitive)]
pub enum QueueAction {
    /// Queue statistics.
    #[strum(to_string = "get_stats", serialize = "stats")]
    GetStats,
    /// Stop starting queued tasks, of every type or of task_type only, while running tasks go on.
    Pause,
    /// Start queued tasks again, of every type or of task_type only.
    Resume,
    /// Cancel your tasks that have not started, optionally only of task_type or priority.
    #[strum(to_string = "clear_queue", serialize = "clear")]
    ClearQueue,
    /// Set max_concurrent, the most tasks running at once, overall or for task_type.
    #[strum(to_string = "set_limits", serialize = "set_limit")]
    SetLimits,
    /// Give the waiting task task_id a new priority.
    #[strum(to_string = "reorder", serialize = "set_priority")]
    Reorder,
}

/// The actions of one `manage_*` tool.
pub trait Action:
    Copy + FromStr + Into<&'static str> + VariantArray + EnumMessage + 'static
{
    /// The tool that takes these actions.
    const TOOL: &'static str;

    /// The action's name on the wire.
    fn name(self) -> &'static str {
        self.into()
    }

    /// What the action does, in one line (its doc comment).
    fn help(self) -> String {
        self.get_documentation()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Every action's name, in declaration order.
    fn names() -> Vec<&'static str> {
        Self::VARIANTS.iter().map(|a| a.name()).collect()
    }

    /// The names as a sentence: `a, b or c`.
    fn listed() -> String {
        let names = Self::names();
        match names.split_last() {
            Some((last, [])) => (*last).to_owned(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        }
    }

    /// The description of the `action` argument: every action with what it does
    /// (`What to do. create: submit ...; schedule: the same, ...`).
    fn argument_description() -> String {
        let actions: Vec<String> = Self::VARIANTS
            .iter()
            .map(|a| {
                let help = a.help();
                let mut chars = help.trim_end_matches('.').chars();
                let help: String = chars
                    .next()
                    .map(|c| c.to_lowercase().chain(chars).collect())
                    .unwrap_or_default();
                format!("{}: {help}", a.name())
            })
            .collect();
        format!("What to do. {}.", actions.join("; "))
    }
}

impl Action for TaskAction {
    const TOOL: &'static str = "manage_background_tasks";
}

impl Action for QueueAction {
    const TOOL: &'static str = "manage_task_queue";
}

/// The action named by `text` (trimmed, any case, or an alias), or `UNKNOWN_ACTION` naming the
/// closest action and every valid one.
pub(crate) fn parse<A: Action>(text: &str) -> Result<A, ToolError> {
    A::from_str(text.trim()).map_err(|_| unknown_action::<A>(text))
}

/// Checks the `action` argument of a call before it is decoded.
fn check<A: Action>(value: &Value) -> Result<(), ToolError> {
    match value {
        Value::String(text) => parse::<A>(text).map(|_| ()),
        other => Err(unknown_action::<A>(&other.to_string())),
    }
}

/// The refusal of an action `A`'s tool does not take.
fn unknown_action<A: Action>(text: &str) -> ToolError {
    let names = A::names();
    let closest = crate::arguments::closest(A::TOOL, text.trim(), &names);
    let message = match closest {
        Some(known) => format!("action {text:?} is not known; did you mean {known:?}?"),
        None => format!("action {text:?} is not known"),
    };
    ToolError::new("UNKNOWN_ACTION", message, format!("use {}", A::listed()))
}

/// Refuses the `action` of a call to a `manage_*` tool when the tool does not take it, with
/// `UNKNOWN_ACTION` (see [`check`]); anything else passes.
pub(crate) fn check_action(tool: &str, arguments: &Map<String, Value>) -> Result<(), ToolError> {
    let Some(action) = arguments.get("action") else {
        return Ok(());
    };
    match tool {
        TaskAction::TOOL => check::<TaskAction>(action),
        QueueAction::TOOL => check::<QueueAction>(action),
        _ => Ok(()),
    }
}

/// The input schema of an action: a string, one of the names, described action by action.
fn action_schema<A: Action>() -> Schema {
    json_schema!({
        "type": "string",
        "enum": A::names(),
        "description": A::argument_description(),
    })
}

/// Decodes an action as [`parse`] reads it.
fn deserialize_action<'de, A: Action, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<A, D::Error> {
    let text = Cow::<'de, str>::deserialize(deserializer)?;
    parse::<A>(&text).map_err(|e| serde::de::Error::custom(format!("{}; {}", e.message, e.hint)))
}

macro_rules! action_serde {
    ($action:ty) => {
        impl<'de> Deserialize<'de> for $action {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserialize_action(deserializer)
            }
        }

        impl Serialize for $action {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.name())
            }
        }

        impl JsonSchema for $action {
            fn schema_name() -> Cow<'static, str> {
                stringify!($action).into()
            }

            fn inline_schema() -> bool {
                true
            }

            fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
                action_schema::<$action>()
            }
        }
    };
}

action_serde!(TaskAction);
action_serde!(QueueAction);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse_by_name_alias_and_case() {
        assert_eq!(parse::<TaskAction>("create").unwrap(), TaskAction::Create);
        assert_eq!(parse::<TaskAction>(" Pause ").unwrap(), TaskAction::Pause);
        assert_eq!(parse::<TaskAction>("stats").unwrap(), TaskAction::GetStats);
        assert_eq!(TaskAction::GetStats.name(), "get_stats");
        // Written back as JSON, an action is its name, which reads as the same action.
        assert_eq!(serde_json::json!(QueueAction::ClearQueue), "clear_queue");
        assert_eq!(
            parse::<QueueAction>("clear").unwrap(),
            QueueAction::ClearQueue
        );
        assert_eq!(
            parse::<QueueAction>("set_priority").unwrap(),
            QueueAction::Reorder
        );
        assert_eq!(
            TaskAction::names(),
            [
                "create",
                "schedule",
                "cancel",
                "pause",
                "resume",
                "retry",
                "list",
                "get_stats",
                "cleanup",
                "list_types"
            ]
        );
        assert_eq!(
            QueueAction::listed(),
            "get_stats, pause, resume, clear_queue, set_limits or reorder"
        );
    }

    #[test]
    fn an_unknown_action_is_refused_with_the_closest_and_the_valid_ones() {
        let error = parse::<TaskAction>("explode").unwrap_err();
        assert_eq!(error.code, "UNKNOWN_ACTION");
        assert_eq!(error.message, "action \"explode\" is not known");
        assert_eq!(
            error.hint,
            "use create, schedule, cancel, pause, resume, retry, list, get_stats, cleanup or list_types"
        );
        let error = parse::<QueueAction>("pasue").unwrap_err();
        assert_eq!(
            error.message,
            "action \"pasue\" is not known; did you mean \"pause\"?"
        );
        let error = check::<TaskAction>(&Value::from(3)).unwrap_err();
        assert_eq!(error.message, "action \"3\" is not known");
    }

    #[test]
    fn every_action_is_described() {
        for action in TaskAction::VARIANTS {
            assert!(!action.help().is_empty(), "{action:?}");
        }
        for action in QueueAction::VARIANTS {
            assert!(!action.help().is_empty(), "{action:?}");
        }
        let description = QueueAction::argument_description();
        assert!(
            description
                .starts_with("What to do. get_stats: queue statistics; pause: stop starting"),
            "{description}"
        );
    }
}
