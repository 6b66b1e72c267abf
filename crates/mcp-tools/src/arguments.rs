//! The contract of tool arguments as clients see it: which argument names each tool takes (a
//! name it does not take is refused, with the closest one it does take), and the input and
//! output schemas it publishes, in standard JSON Schema.
//!
//! Unknown arguments are checked before a call is decoded, in [`McpServer`]'s `call_tool` (rmcp's
//! router and the tasks extension) and in the fast lane ([`McpServer::answer_at_once`]), so that
//! both give the same answer; the argument structs also carry `#[serde(deny_unknown_fields)]`,
//! which makes their schemas say `"additionalProperties": false`.
//!
//! [`McpServer`]: crate::McpServer
//! [`McpServer::answer_at_once`]: crate::McpServer::answer_at_once

use rmcp::model::JsonObject;
use rmcp::schemars::Schema;
use rmcp::schemars::transform::{Transform, transform_subschemas};
use serde::Deserialize;
use serde::de::{self, Visitor};
use serde_json::Value;

use crate::server::ToolError;
use crate::tools_sandbox::{ExecuteCodeArgs, ExecuteCommandArgs, GetSessionsArgs, StopSessionArgs};
use crate::wire::{
    CheckStatusArgs, GetResultArgs, ListArgs, ManageQueueArgs, ManageTasksArgs, ReadOutputArgs,
    SubmitArgs, SubmitOptions, TaskIdArgs,
};

/// Every argument name a tool accepts: the names of its input schema's properties and their
/// aliases (serde's, which are the only ones: see docs/tools.md), in the order of its argument
/// struct. `None` for a tool msbd does not serve. Public only for `tests/it/docs.rs`, which checks
/// that docs/tools.md names each one.
#[doc(hidden)]
pub fn accepted_arguments(tool: &str) -> Option<&'static [&'static str]> {
    Some(match tool {
        "create_background_task" | "submit_task" => fields_of::<SubmitArgs>(),
        "check_task_status" => fields_of::<CheckStatusArgs>(),
        "get_task_result" => fields_of::<GetResultArgs>(),
        "cancel_task" => fields_of::<TaskIdArgs>(),
        "list_tasks" => fields_of::<ListArgs>(),
        "read_task_output" => fields_of::<ReadOutputArgs>(),
        "manage_background_tasks" => fields_of::<ManageTasksArgs>(),
        "manage_task_queue" => fields_of::<ManageQueueArgs>(),
        "execute_code" => fields_of::<ExecuteCodeArgs>(),
        "execute_command" => fields_of::<ExecuteCommandArgs>(),
        "get_sessions" => fields_of::<GetSessionsArgs>(),
        "stop_session" => fields_of::<StopSessionArgs>(),
        "get_volume_mappings"
        | "health_check"
        | "get_background_task_status"
        | "restart_background_tasks"
        | "pause_background_tasks"
        | "resume_background_tasks" => &[],
        _ => return None,
    })
}

/// The field names (with aliases) a struct's derived `Deserialize` accepts: serde hands them to
/// `deserialize_struct`, where this catches them. Empty for a type that is not such a struct
/// (one with a `#[serde(flatten)]` field is not).
fn fields_of<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldsProbe(&mut fields));
    fields
}

/// A deserializer that only notes the fields a struct asks for (see [`fields_of`]).
struct FieldsProbe<'a>(&'a mut &'static [&'static str]);

impl<'de> de::Deserializer<'de> for FieldsProbe<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("only its fields were wanted"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Refuses the arguments of a call to `tool` that it does not take, with `INVALID_ARGUMENT`
/// naming each and the closest name it takes (or, when none is close, the names it takes); and
/// an `action` the tool does not take, with `UNKNOWN_ACTION` (see [`crate::actions`]).
/// `input_schema` is the tool's published one: its properties are the names listed.
pub(crate) fn check_arguments(
    tool: &str,
    arguments: Option<&JsonObject>,
    input_schema: &JsonObject,
) -> Result<(), ToolError> {
    let Some(arguments) = arguments.filter(|a| !a.is_empty()) else {
        return Ok(());
    };
    let properties = input_schema.get("properties").and_then(Value::as_object);
    let accepted = accepted_arguments(tool);
    // No allocation on the way of a good call (the fast lane's calls take a few microseconds).
    let known = |name: &str| match accepted {
        Some(names) => names.contains(&name),
        None => properties.is_some_and(|p| p.contains_key(name)),
    };
    if arguments.keys().all(|name| known(name)) {
        return crate::actions::check_action(tool, arguments);
    }
    let schema_names: Vec<&str> = properties
        .map(|p| p.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let accepted: Vec<&str> = accepted.map_or_else(|| schema_names.clone(), <[_]>::to_vec);
    let unknown: Vec<&str> = arguments
        .keys()
        .map(String::as_str)
        .filter(|name| !known(name))
        .collect();
    Err(unknown_arguments(tool, &unknown, &accepted, &schema_names))
}

/// Refuses the fields of `manage_background_tasks`' `task_config` (submission options) that are
/// not options, as [`check_arguments`] refuses arguments.
pub(crate) fn check_task_config(config: &JsonObject) -> Result<(), ToolError> {
    let accepted = fields_of::<SubmitOptions>();
    let unknown: Vec<&str> = config
        .keys()
        .map(String::as_str)
        .filter(|name| !accepted.contains(name))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    let mut error = unknown_arguments("task_config", &unknown, accepted, accepted);
    error.message = error
        .message
        .replacen("unknown argument", "unknown task_config field", 1);
    error.hint = "rename or remove the unknown field and call again; task_config holds only submission options (the description of manage_background_tasks lists them)".into();
    Err(error)
}

/// The error for the `unknown` arguments of a call to `tool`, which accepts the names
/// `accepted` and lists `listed` (its schema's properties; aliases are not listed).
fn unknown_arguments(
    tool: &str,
    unknown: &[&str],
    accepted: &[&str],
    listed: &[&str],
) -> ToolError {
    // The listed names in the order of the argument struct (the schema's may be alphabetical).
    let mut names: Vec<&str> = accepted
        .iter()
        .copied()
        .filter(|n| listed.contains(n))
        .collect();
    names.extend(listed.iter().copied().filter(|n| !accepted.contains(n)));
    let takes = if names.is_empty() {
        format!("{tool} takes no arguments")
    } else {
        format!(
            "{tool} takes {}",
            names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let suggestions: Vec<Option<&str>> = unknown
        .iter()
        .map(|name| closest(tool, name, accepted))
        .collect();
    let message = match (unknown, suggestions.as_slice()) {
        ([name], [Some(known)]) => format!("unknown argument `{name}`; did you mean `{known}`?"),
        ([name], _) => format!("unknown argument `{name}`; {takes}"),
        _ => {
            let named: Vec<String> = unknown
                .iter()
                .zip(&suggestions)
                .map(|(name, known)| match known {
                    Some(known) => format!("`{name}` (did you mean `{known}`?)"),
                    None => format!("`{name}`"),
                })
                .collect();
            let mut message = format!("unknown arguments {}", named.join(", "));
            if suggestions.iter().any(Option::is_none) {
                message.push_str(&format!("; {takes}"));
            }
            message
        }
    };
    let hint = if names.is_empty() {
        format!("call {tool} with no arguments ({{}})")
    } else {
        format!(
            "rename or remove {} and call again; the input schema of {tool} (tools/list) describes each argument",
            if unknown.len() == 1 { "it" } else { "them" }
        )
    };
    ToolError::invalid(message, hint)
}

/// The name among `known` that an unknown argument of `tool` most likely meant, if one is
/// close enough: the same name but for case and separators (`taskId`, `task-id`), a name a few
/// typing errors away (`priorty`), or the only name that has it as a word (`timeout` for
/// `timeout_seconds`; `id` only for the id of what the tool is about, `task_id` in
/// `check_task_status`) or that it has as its first words (`status` for `status_filter`).
pub(crate) fn closest<'a>(tool: &str, unknown: &str, known: &[&'a str]) -> Option<&'a str> {
    let wanted = squashed(unknown);
    if wanted.is_empty() {
        return None;
    }
    if let Some(known) = known.iter().find(|k| squashed(k) == wanted) {
        return Some(known);
    }
    let allowed = match wanted.chars().count() {
        0..=3 => 1,
        4..=7 => 2,
        _ => 3,
    };
    let typo = known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(&wanted, &squashed(k)), *k))
        .filter(|(distance, _)| *distance <= allowed)
        .min_by_key(|(distance, _)| *distance);
    if let Some((_, known)) = typo {
        return Some(known);
    }
    let unknown_words = words(unknown);
    // The tool's words, also without a plural `s` (`get_sessions` is about a session).
    let mut tool_words = words(tool);
    let singular: Vec<String> = tool_words
        .iter()
        .filter_map(|w| w.strip_suffix('s').map(str::to_owned))
        .collect();
    tool_words.extend(singular);
    let containing: Vec<&'a str> = known
        .iter()
        .copied()
        .filter(|k| {
            let known_words = words(k);
            if let [word] = unknown_words.as_slice()
                && known_words.contains(word)
            {
                // `id` alone is too common a word: only the id of what the tool is about.
                return word != "id"
                    || known_words
                        .iter()
                        .filter(|w| *w != "id")
                        .all(|w| tool_words.contains(w));
            }
            unknown_words.len() > known_words.len() && unknown_words.starts_with(&known_words)
        })
        .collect();
    match containing.as_slice() {
        [only] => Some(only),
        _ => None,
    }
}

/// A name in lower case without separators: `taskId`, `task-id` and `task_id` are the same.
fn squashed(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// The words of a name: split at `_`, `-`, spaces and lower-to-upper case changes, lower-cased.
fn words(name: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut previous_lower = false;
    for c in name.chars() {
        if !c.is_alphanumeric() {
            previous_lower = false;
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
            continue;
        }
        if c.is_uppercase() && previous_lower && !word.is_empty() {
            words.push(std::mem::take(&mut word));
        }
        previous_lower = c.is_lowercase() || c.is_ascii_digit();
        word.extend(c.to_lowercase());
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

// ---------------------------------------------------------------------------------------------
// Published schemas.

/// The `format` values of JSON Schema 2020-12 (validation vocabulary, section 7.3). schemars adds
/// others (`uint64`, `int32`, `double`...) that validators do not know, and warn about.
const STANDARD_FORMATS: [&str; 19] = [
    "date-time",
    "date",
    "time",
    "duration",
    "email",
    "idn-email",
    "hostname",
    "idn-hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uuid",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "regex",
];

/// Whether a `format` value is one of JSON Schema's own.
pub(crate) fn is_standard_format(format: &str) -> bool {
    STANDARD_FORMATS.contains(&format)
}

/// Drops the non-standard `format` of every (sub)schema, keeping what it said about the sign:
/// an unsigned integer gets `"minimum": 0` (schemars gives most of them one already).
struct StandardFormats;

impl Transform for StandardFormats {
    fn transform(&mut self, schema: &mut Schema) {
        if let Some(object) = schema.as_object_mut()
            && let Some(Value::String(format)) = object.get("format")
            && !is_standard_format(format)
        {
            let unsigned = format.starts_with("uint");
            object.remove("format");
            if unsigned
                && !object.contains_key("minimum")
                && !object.contains_key("exclusiveMinimum")
            {
                object.insert("minimum".into(), 0.into());
            }
        }
        transform_subschemas(self, schema);
    }
}

/// A tool's input schema as msbd publishes it: standard formats only, and
/// `"additionalProperties": false` at the top (msbd refuses any other argument: see
/// [`check_arguments`]).
pub(crate) fn standard_input_schema(schema: &JsonObject) -> JsonObject {
    let mut object = standard_schema(schema);
    object.insert("additionalProperties".into(), Value::Bool(false));
    object
}

/// A schema with standard formats only.
pub(crate) fn standard_schema(schema: &JsonObject) -> JsonObject {
    let mut schema = Schema::from(schema.clone());
    StandardFormats.transform(&mut schema);
    match schema.to_value() {
        Value::Object(object) => object,
        _ => unreachable!("a schema made from an object stays an object"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_accepted_names_are_the_fields_and_their_aliases() {
        assert_eq!(
            accepted_arguments("check_task_status").unwrap(),
            ["task_id", "task_type", "status_filter", "limit"]
        );
        let submit = accepted_arguments("submit_task").unwrap();
        assert!(submit.contains(&"params") && submit.contains(&"parameters"));
        assert!(submit.contains(&"priority") && submit.contains(&"tags"));
        assert_eq!(accepted_arguments("health_check").unwrap(), [] as [&str; 0]);
        assert_eq!(accepted_arguments("no_such_tool"), None);
        // task_config of manage_background_tasks.
        assert!(fields_of::<SubmitOptions>().contains(&"idempotency_key"));
    }

    #[test]
    fn the_closest_name_is_suggested_only_when_it_is_close() {
        let status = ["task_id", "task_type", "status_filter", "limit"];
        let list = [
            "status",
            "task_type",
            "session_id",
            "tag",
            "limit",
            "cursor",
        ];
        let submit = accepted_arguments("submit_task").unwrap();
        for (tool, unknown, known, expected) in [
            ("check_task_status", "taskId", &status[..], Some("task_id")),
            ("check_task_status", "TaskID", &status, Some("task_id")),
            ("check_task_status", "task-id", &status, Some("task_id")),
            ("check_task_status", "id", &status, Some("task_id")),
            (
                "check_task_status",
                "status",
                &status,
                Some("status_filter"),
            ),
            ("check_task_status", "limt", &status, Some("limit")),
            ("check_task_status", "verbose", &status, None),
            ("list_tasks", "statuss", &list, Some("status")),
            ("list_tasks", "status_filter", &list, Some("status")),
            ("list_tasks", "id", &list, None),
            ("list_tasks", "tags", &list, Some("tag")),
            ("submit_task", "priorty", submit, Some("priority")),
            ("submit_task", "timeout", submit, Some("timeout_seconds")),
            ("submit_task", "type", submit, Some("task_type")),
            ("submit_task", "retries", submit, Some("max_retries")),
            ("submit_task", "taskType", submit, Some("task_type")),
            ("submit_task", "x", submit, None),
            ("submit_task", "", submit, None),
            ("health_check", "verbose", &[], None),
        ] {
            assert_eq!(
                closest(tool, unknown, known),
                expected,
                "{tool}: {unknown} among {known:?}"
            );
        }
    }

    fn message(tool: &str, arguments: Value) -> Option<String> {
        let schema = json!({"type": "object", "properties": {}});
        let mut schema = schema.as_object().unwrap().clone();
        if let Some(names) = accepted_arguments(tool) {
            let properties = names.iter().map(|n| (n.to_string(), json!({}))).collect();
            schema.insert("properties".into(), Value::Object(properties));
        }
        check_arguments(tool, arguments.as_object(), &schema)
            .err()
            .map(|e| format!("{}\n{}", e.message, e.hint))
    }

    #[test]
    fn unknown_arguments_are_named_with_what_was_meant() {
        assert_eq!(message("check_task_status", json!({"task_id": "x"})), None);
        assert_eq!(message("check_task_status", json!({})), None);
        assert_eq!(message("submit_task", json!({"parameters": {}})), None);
        let text = message("check_task_status", json!({"taskId": "x"})).unwrap();
        assert!(
            text.starts_with("unknown argument `taskId`; did you mean `task_id`?\n"),
            "{text}"
        );
        let text = message("check_task_status", json!({"verbose": true})).unwrap();
        assert!(
            text.starts_with(
                "unknown argument `verbose`; check_task_status takes `task_id`, `task_type`, `status_filter`, `limit`\n"
            ),
            "{text}"
        );
        let text = message("health_check", json!({"verbose": true})).unwrap();
        assert_eq!(
            text,
            "unknown argument `verbose`; health_check takes no arguments\ncall health_check with no arguments ({})"
        );
        let text = message("list_tasks", json!({"statuss": "x", "zzz": 1})).unwrap();
        assert!(
            text.starts_with(
                "unknown arguments `statuss` (did you mean `status`?), `zzz`; list_tasks takes `status`,"
            ),
            "{text}"
        );
    }

    #[test]
    fn published_schemas_keep_only_standard_formats() {
        let schema = json!({
            "type": "object",
            "properties": {
                "a": {"type": "integer", "format": "uint64", "minimum": 0},
                "b": {"type": ["integer", "null"], "format": "uint32"},
                "c": {"type": "number", "format": "double"},
                "d": {"type": "string", "format": "date-time"},
                "e": {"anyOf": [{"type": "integer", "format": "int64"}, {"type": "string"}]},
                "f": {"type": "array", "items": {"type": "integer", "format": "uint8", "minimum": 0, "maximum": 255}},
                "format": {"type": "string", "format": "uri"}
            },
            "$defs": {"G": {"type": "integer", "format": "uint"}}
        });
        let published = standard_input_schema(schema.as_object().unwrap());
        assert_eq!(
            Value::Object(published),
            json!({
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": 0},
                    "b": {"type": ["integer", "null"], "minimum": 0},
                    "c": {"type": "number"},
                    "d": {"type": "string", "format": "date-time"},
                    "e": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
                    "f": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}},
                    "format": {"type": "string", "format": "uri"}
                },
                "$defs": {"G": {"type": "integer", "minimum": 0}},
                "additionalProperties": false
            })
        );
    }
}
