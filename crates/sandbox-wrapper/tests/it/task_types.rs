//! Operator-defined task types: loading, load errors, params validation and argv rendering.

use std::time::Duration;

use sandbox_wrapper::task_types::{
    ArgTemplate, MAX_LISTED_ERRORS, ParamsError, TaskTypes, TaskTypesError,
};
use serde_json::json;
use task_core::Priority;

const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/task-types.toml"
);

const THUMBNAIL: &str = r#"
[[task_type]]
name = "ffmpeg_thumbnail"
description = "Extract a thumbnail from a video"
command = ["ffmpeg", "-i", "{input}", "-ss", "{at}", "-frames:v", "1", "{output}"]
timeout_seconds = 120
max_retries = 2
priority = "high"
concurrency = 2
flavor = "small"
[task_type.params_schema]
type = "object"
required = ["input", "output"]
properties.input = { type = "string" }
properties.at = { type = "string", default = "00:00:01" }
properties.output = { type = "string" }
"#;

fn load(text: &str) -> TaskTypes {
    TaskTypes::from_toml_str(text).unwrap_or_else(|error| panic!("{error}"))
}

fn load_error(text: &str) -> TaskTypesError {
    match TaskTypes::from_toml_str(text) {
        Ok(types) => panic!(
            "expected a load error, got {:?}",
            types.names().collect::<Vec<_>>()
        ),
        Err(error) => error,
    }
}

/// A one-type file: `extra` lines added to a valid task type named "t".
fn with(extra: &str) -> String {
    format!("[[task_type]]\nname = \"t\"\ncommand = [\"prog\", \"{{a}}\"]\n{extra}\n")
}

fn assert_contains(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{part:?} is not in:\n{text}");
    }
}

#[test]
fn the_example_file_loads() {
    let types = TaskTypes::load(EXAMPLE).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(
        types.names().collect::<Vec<_>>(),
        ["ffmpeg_thumbnail", "image_resize", "find_large_files"]
    );
    assert_eq!(types.len(), 3);
    let thumbnail = types.get("ffmpeg_thumbnail").unwrap();
    assert!(thumbnail.params_schema().is_some());
    assert_eq!(
        thumbnail
            .render_argv(&json!({"input": "in.mp4", "output": "out.png"}))
            .unwrap(),
        [
            "ffmpeg",
            "-y",
            "-i",
            "in.mp4",
            "-ss",
            "00:00:01",
            "-frames:v",
            "1",
            "out.png"
        ]
    );
    thumbnail
        .validate(&json!({"input": "in.mp4", "output": "out.png", "at": "00:00:05"}))
        .unwrap();
    let resize = types.get("image_resize").unwrap();
    assert_eq!(resize.defaults().priority, Priority::new(6));
    let find = types.get("find_large_files").unwrap();
    assert_eq!(
        find.render_argv(&json!({"dir": "/data", "min_size": "+10M"}))
            .unwrap(),
        [
            "find", "/data", "-type", "f", "-size", "+10M", "-exec", "ls", "-l", "{}", "+"
        ]
    );
    assert!(types.get("nope").is_none());
    assert_eq!(types.iter().count(), 3);
}

#[test]
fn an_empty_file_declares_nothing() {
    let types = load("# nothing yet\n");
    assert!(types.is_empty());
    assert_eq!(types.names().count(), 0);
}

#[test]
fn defaults_are_parsed_onto_task_core_types() {
    let types = load(THUMBNAIL);
    let spec = types.get("ffmpeg_thumbnail").unwrap();
    assert_eq!(spec.name(), "ffmpeg_thumbnail");
    assert_eq!(spec.description(), "Extract a thumbnail from a video");
    let defaults = spec.defaults();
    assert_eq!(defaults.timeout, Some(Duration::from_secs(120)));
    assert_eq!(defaults.max_retries, Some(2));
    assert_eq!(defaults.max_attempts(), Some(3));
    assert_eq!(defaults.priority, Some(Priority::HIGH));
    assert_eq!(defaults.concurrency, Some(2));
    assert_eq!(defaults.flavor.as_deref(), Some("small"));

    let task = spec.new_task(json!({"input": "a"}));
    assert_eq!(task.task_type, "ffmpeg_thumbnail");
    assert_eq!(task.priority, Priority::HIGH);
    assert_eq!(task.max_attempts, 3);
    assert_eq!(task.timeout, Some(Duration::from_secs(120)));
    assert_eq!(task.params, json!({"input": "a"}));

    assert_eq!(
        spec.command(),
        [
            ArgTemplate::Literal("ffmpeg".into()),
            ArgTemplate::Literal("-i".into()),
            ArgTemplate::Param("input".into()),
            ArgTemplate::Literal("-ss".into()),
            ArgTemplate::Param("at".into()),
            ArgTemplate::Literal("-frames:v".into()),
            ArgTemplate::Literal("1".into()),
            ArgTemplate::Param("output".into()),
        ]
    );
    assert_eq!(
        spec.placeholders().collect::<Vec<_>>(),
        ["input", "at", "output"]
    );
}

#[test]
fn defaults_are_all_optional() {
    let types = load("[[task_type]]\nname = \"bare\"\ncommand = [\"true\"]\n");
    let spec = types.get("bare").unwrap();
    assert_eq!(spec.description(), "");
    assert!(spec.params_schema().is_none());
    assert_eq!(spec.defaults(), &Default::default());
    let task = spec.new_task(json!({}));
    assert_eq!(task.priority, Priority::NORMAL);
    assert_eq!(task.max_attempts, 1);
    assert_eq!(task.timeout, None);
    assert_eq!(spec.render_argv(&json!(null)).unwrap(), ["true"]);
}

#[test]
fn priorities_are_names_or_numbers() {
    for (written, expected) in [
        ("\"low\"", 2),
        ("\"normal\"", 5),
        ("\"Critical\"", 9),
        ("0", 0),
        ("9", 9),
        ("\"7\"", 7),
    ] {
        let types = load(&with(&format!("priority = {written}")));
        assert_eq!(
            types.get("t").unwrap().defaults().priority,
            Priority::new(expected),
            "{written}"
        );
    }
}

#[test]
fn every_flavor_is_accepted() {
    for flavor in ["small", "medium", "large"] {
        let types = load(&with(&format!("flavor = \"{flavor}\"")));
        assert_eq!(
            types.get("t").unwrap().defaults().flavor.as_deref(),
            Some(flavor)
        );
    }
}

#[test]
fn bad_toml_is_reported_with_line_and_column() {
    let error = load_error("[[task_type]]\nname = \"t\"\ncommand = [\"a\"\n");
    assert!(matches!(error, TaskTypesError::Toml { .. }), "{error:?}");
    assert_eq!(error.line(), Some(3));
    assert_contains(
        &error.to_string(),
        &[
            "task types, line 3, column",
            "not valid TOML",
            "fix the syntax",
        ],
    );
}

#[test]
fn errors_from_a_file_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("types.toml");
    std::fs::write(&path, "[[task_type]]\nname = \"Bad\"\ncommand = [\"x\"]\n").unwrap();
    let error = TaskTypes::load(&path).unwrap_err();
    assert_contains(
        &error.to_string(),
        &[
            &format!("task types file {}", path.display()),
            "line 2, column 8",
            "task type \"Bad\", field `name`",
            "not a valid task type name",
        ],
    );

    let missing = dir.path().join("absent.toml");
    let error = TaskTypes::load(&missing).unwrap_err();
    assert!(matches!(error, TaskTypesError::Read { .. }), "{error:?}");
    assert_contains(
        &error.to_string(),
        &["cannot read the task types file", "absent.toml"],
    );
}

#[test]
fn duplicate_names_are_refused() {
    let text = "[[task_type]]\nname = \"dup\"\ncommand = [\"a\"]\n\n[[task_type]]\nname = \"dup\"\ncommand = [\"b\"]\n";
    let error = load_error(text);
    assert_eq!(error.task_type(), Some("dup"));
    assert_eq!(error.field(), Some("name"));
    assert_contains(
        &error.to_string(),
        &[
            "line 6, column 8: task type \"dup\", field `name`",
            "already used by task type #1 (line 1)",
            "rename or remove one",
        ],
    );
}

#[test]
fn invalid_and_reserved_names_are_refused() {
    for name in [
        "",
        "Upper",
        "9lives",
        "has space",
        "semi;colon",
        "_under",
        "ünï",
    ] {
        let error = load_error(&format!(
            "[[task_type]]\nname = \"{name}\"\ncommand = [\"x\"]\n"
        ));
        assert_eq!(error.field(), Some("name"), "{name}");
        assert_contains(
            &error.to_string(),
            &["is not a valid task type name", "a lowercase letter first"],
        );
    }
    let long = format!("a{}", "b".repeat(64));
    let error = load_error(&format!(
        "[[task_type]]\nname = \"{long}\"\ncommand = [\"x\"]\n"
    ));
    assert_contains(&error.to_string(), &["not a valid task type name"]);
    let longest = format!("a{}", "b".repeat(63));
    load(&format!(
        "[[task_type]]\nname = \"{longest}\"\ncommand = [\"x\"]\n"
    ));
    load("[[task_type]]\nname = \"a0_.-z\"\ncommand = [\"x\"]\n");

    for reserved in ["command", "code"] {
        let error = load_error(&format!(
            "[[task_type]]\nname = \"{reserved}\"\ncommand = [\"x\"]\n"
        ));
        assert_eq!(error.task_type(), Some(reserved));
        assert_contains(
            &error.to_string(),
            &["name of a built-in task type", "choose another name"],
        );
    }

    let error = load_error("[[task_type]]\ncommand = [\"x\"]\n");
    assert_eq!(error.task_type(), None);
    assert_contains(
        &error.to_string(),
        &["task type #1, field `name`", "needs a name"],
    );

    let error = load_error("[[task_type]]\nname = 3\ncommand = [\"x\"]\n");
    assert_eq!(error.field(), Some("name"));
    assert_contains(&error.to_string(), &["task type #1", "invalid type"]);
}

#[test]
fn empty_or_missing_commands_are_refused() {
    let error = load_error("[[task_type]]\nname = \"t\"\ncommand = []\n");
    assert_eq!(error.field(), Some("command"));
    assert_contains(
        &error.to_string(),
        &["task type \"t\", field `command`", "the command is empty"],
    );

    let error = load_error("[[task_type]]\nname = \"t\"\n");
    assert_eq!(error.field(), Some("command"));
    assert_contains(&error.to_string(), &["needs a command"]);

    let error = load_error("[[task_type]]\nname = \"t\"\ncommand = \"ffmpeg -i x\"\n");
    assert_eq!(error.field(), Some("command"));
    assert_contains(&error.to_string(), &["expected a list"]);

    let error = load_error("[[task_type]]\nname = \"t\"\ncommand = [\"{prog}\", \"x\"]\n");
    assert_contains(
        &error.to_string(),
        &["the program", "a param may not choose what runs"],
    );

    let error = load_error("[[task_type]]\nname = \"t\"\ncommand = [\"\", \"x\"]\n");
    assert_contains(&error.to_string(), &["the program", "is empty"]);
}

#[test]
fn unknown_keys_are_refused() {
    let error = load_error(&with("timeout = 5"));
    assert_eq!(error.task_type(), Some("t"));
    assert_eq!(error.field(), Some("timeout"));
    assert_eq!(error.line(), Some(4));
    assert_contains(
        &error.to_string(),
        &[
            "line 4, column 1",
            "task type \"t\", field `timeout`",
            "unknown field `timeout`",
            "timeout_seconds",
            "remove it or correct its spelling",
        ],
    );

    let error = load_error("[[task_types]]\nname = \"t\"\ncommand = [\"x\"]\n");
    assert!(matches!(error, TaskTypesError::Toml { .. }), "{error:?}");
    assert_contains(
        &error.to_string(),
        &["unknown field `task_types`", "only [[task_type]] tables"],
    );

    let error = load_error(&with(
        "[task_type.params_schema]\ntype = \"object\"\nproperties.a = { type = \"string\" }\n[task_type.extra]\nx = 1",
    ));
    assert_eq!(error.field(), Some("extra"));

    let error = load_error(
        "task_type = [\n  { name = \"a\", command = [\"x\"] },\n  { name = \"b\", command = [\"y\"], bogus = 1 },\n]\n",
    );
    assert_eq!(error.task_type(), Some("b"));
    assert_eq!(error.field(), Some("bogus"));
    assert_eq!(error.line(), Some(3));

    let error = load_error("[task_type]\nname = \"t\"\ncommand = [\"x\"]\n");
    assert!(matches!(error, TaskTypesError::Toml { .. }), "{error:?}");
    assert_contains(
        &error.to_string(),
        &["[[task_type]] tables (with double brackets)"],
    );
}

#[test]
fn task_types_may_be_written_as_an_inline_array() {
    let types = load(
        "task_type = [\n  { name = \"a\", command = [\"x\", \"{p}\"] },\n  { name = \"b\", command = [\"y\"] },\n]\n",
    );
    assert_eq!(types.names().collect::<Vec<_>>(), ["a", "b"]);
    assert!(types.contains("a"));
}

#[test]
fn bad_priorities_are_refused() {
    for (written, expected) in [
        ("\"urgent\"", "`urgent` is not a priority"),
        ("10", "`10` is not a priority"),
        ("-1", "`-1` is not a priority"),
        ("1.5", "not a float"),
    ] {
        let error = load_error(&with(&format!("priority = {written}")));
        assert_eq!(error.field(), Some("priority"), "{written}");
        assert_contains(&error.to_string(), &[expected, "task type \"t\""]);
    }
    let error = load_error(&with("priority = \"urgent\""));
    assert_contains(&error.to_string(), &["from 0 (lowest) to 9", "line 4"]);
}

#[test]
fn bad_flavors_are_refused() {
    let error = load_error(&with("flavor = \"huge\""));
    assert_eq!(error.field(), Some("flavor"));
    assert_contains(
        &error.to_string(),
        &["\"huge\" is not a flavor", "small, medium, large"],
    );
    let error = load_error(&with("flavor = \"Small\""));
    assert_eq!(error.field(), Some("flavor"));
}

#[test]
fn zero_and_negative_numbers_are_refused() {
    let error = load_error(&with("timeout_seconds = 0"));
    assert_eq!(error.field(), Some("timeout_seconds"));
    assert_contains(
        &error.to_string(),
        &["a timeout of 0 seconds", "at least 1", "line 4, column 19"],
    );

    let error = load_error(&with("timeout_seconds = -5"));
    assert_eq!(error.field(), Some("timeout_seconds"));
    assert_contains(&error.to_string(), &["whole number"]);

    let error = load_error(&with("timeout_seconds = \"120\""));
    assert_eq!(error.field(), Some("timeout_seconds"));
    assert_contains(&error.to_string(), &["invalid type: string"]);

    let error = load_error(&with("concurrency = 0"));
    assert_eq!(error.field(), Some("concurrency"));
    assert_contains(&error.to_string(), &["at least 1"]);

    let error = load_error(&with("max_retries = -1"));
    assert_eq!(error.field(), Some("max_retries"));

    let types = load(&with("max_retries = 0"));
    assert_eq!(types.get("t").unwrap().defaults().max_attempts(), Some(1));
}

#[test]
fn schemas_that_do_not_compile_are_refused() {
    let error = load_error(&with(
        "[task_type.params_schema]\ntype = \"objekt\"\nproperties.a = { type = \"string\" }",
    ));
    assert_eq!(error.task_type(), Some("t"));
    assert_eq!(error.field(), Some("params_schema"));
    assert_contains(
        &error.to_string(),
        &[
            "task type \"t\", field `params_schema`",
            "not a valid JSON Schema",
        ],
    );

    let error = load_error(&with(
        "[task_type.params_schema]\n\"$ref\" = \"https://example.com/schema.json\"\nproperties.a = { type = \"string\" }",
    ));
    assert_eq!(error.field(), Some("params_schema"));
    assert_contains(&error.to_string(), &["not a valid JSON Schema"]);

    let error = load_error(&with("params_schema = \"object\""));
    assert_eq!(error.field(), Some("params_schema"));
}

#[test]
fn placeholders_must_be_declared_in_the_schema() {
    let error = load_error(&with(
        "[task_type.params_schema]\ntype = \"object\"\nproperties.b = { type = \"string\" }",
    ));
    assert_eq!(error.field(), Some("command"));
    assert_contains(
        &error.to_string(),
        &[
            "the placeholder {a} is not declared in params_schema.properties",
            "properties.a = { type = \"string\" }",
        ],
    );

    let error = load_error(&with(
        "[task_type.params_schema]\ntype = \"object\"\nproperties.a = { type = \"array\", default = [1] }",
    ));
    assert_eq!(error.field(), Some("params_schema"));
    assert_contains(
        &error.to_string(),
        &["the default of param \"a\" is an array"],
    );
}

#[test]
fn a_placeholder_must_be_a_whole_element() {
    let error = load_error("[[task_type]]\nname = \"t\"\ncommand = [\"prog\", \"--x={a}\"]\n");
    assert_eq!(error.field(), Some("command"));
    assert_eq!(error.line(), Some(3));
    assert_contains(
        &error.to_string(),
        &[
            "the element \"--x={a}\" mixes the placeholder {a} with other text",
            "a placeholder must be a whole element",
            "{{a}}",
        ],
    );
    let error = load_error("[[task_type]]\nname = \"t\"\ncommand = [\"prog\", \"{a}{b}\"]\n");
    assert_contains(&error.to_string(), &["mixes the placeholder {a}"]);

    // Escapes and braces that are no placeholder stay literal.
    let types = load(
        "[[task_type]]\nname = \"t\"\ncommand = [\"prog\", \"{{a}}\", \"x={{b}}\", \"{}\", \"{.k}\", \"{print $1}\", \"{ a }\"]\n",
    );
    let spec = types.get("t").unwrap();
    assert_eq!(spec.placeholders().count(), 0);
    assert_eq!(
        spec.render_argv(&json!({})).unwrap(),
        ["prog", "{a}", "x={b}", "{}", "{.k}", "{print $1}", "{ a }"]
    );
}

#[test]
fn validation_errors_come_from_the_schema_validator() {
    let types = load(THUMBNAIL);
    let spec = types.get("ffmpeg_thumbnail").unwrap();
    spec.validate(&json!({"input": "a.mp4", "output": "b.png"}))
        .unwrap();

    let error = spec.validate(&json!({"input": "a.mp4"})).unwrap_err();
    assert_eq!(
        error.to_string(),
        "params for task type \"ffmpeg_thumbnail\" are invalid: \"output\" is a required property (at /)"
    );
    assert_eq!(error.task_type(), "ffmpeg_thumbnail");

    let error = spec
        .validate(&json!({"input": 3, "at": false}))
        .unwrap_err();
    let ParamsError::Invalid {
        errors, omitted, ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert_eq!(*omitted, 0);
    assert_contains(
        &error.to_string(),
        &[
            "\"output\" is a required property (at /)",
            "3 is not of type \"string\" (at /input)",
            "false is not of type \"string\" (at /at)",
        ],
    );

    let error = spec.validate(&json!([1, 2])).unwrap_err();
    assert_contains(&error.to_string(), &["is not of type \"object\" (at /)"]);

    let types = load(&with(
        "[task_type.params_schema]\ntype = \"object\"\nproperties.a = { type = \"string\", format = \"email\" }",
    ));
    let spec = types.get("t").unwrap();
    spec.validate(&json!({"a": "someone@example.com"})).unwrap();
    let error = spec.validate(&json!({"a": "not an address"})).unwrap_err();
    assert_contains(
        &error.to_string(),
        &["\"not an address\" is not a \"email\" (at /a)"],
    );
    let error = spec.validate(&json!([1, 2])).unwrap_err();
    assert_contains(&error.to_string(), &["is not of type \"object\" (at /)"]);
}

#[test]
fn validation_lists_at_most_ten_errors() {
    let mut text = String::from(
        "[[task_type]]\nname = \"many\"\ncommand = [\"x\"]\n[task_type.params_schema]\ntype = \"object\"\n",
    );
    let mut params = serde_json::Map::new();
    for index in 0..15 {
        text.push_str(&format!("properties.p{index} = {{ type = \"string\" }}\n"));
        params.insert(format!("p{index}"), json!(index));
    }
    let types = load(&text);
    let error = types
        .get("many")
        .unwrap()
        .validate(&params.into())
        .unwrap_err();
    let ParamsError::Invalid {
        errors, omitted, ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert_eq!(errors.len(), MAX_LISTED_ERRORS);
    assert_eq!(*omitted, 5);
    assert_contains(&error.to_string(), &["; and 5 more"]);
}

#[test]
fn without_a_schema_any_object_validates() {
    let types = load(&with(""));
    let spec = types.get("t").unwrap();
    spec.validate(&json!({"anything": [1, 2]})).unwrap();
    spec.validate(&json!(null)).unwrap();
    let error = spec.validate(&json!("text")).unwrap_err();
    assert!(
        matches!(error, ParamsError::NotAnObject { .. }),
        "{error:?}"
    );
    assert_contains(
        &error.to_string(),
        &["must be a JSON object", "not a string"],
    );
}

#[test]
fn rendering_passes_shell_metacharacters_as_one_untouched_argument() {
    let types = load(THUMBNAIL);
    let spec = types.get("ffmpeg_thumbnail").unwrap();
    let hostile = "; rm -rf / #";
    let argv = spec
        .render_argv(&json!({"input": hostile, "output": "$(reboot) `id` | > x && \"'\n"}))
        .unwrap();
    assert_eq!(
        argv,
        [
            "ffmpeg",
            "-i",
            hostile,
            "-ss",
            "00:00:01",
            "-frames:v",
            "1",
            "$(reboot) `id` | > x && \"'\n",
        ]
    );
    assert_eq!(argv.len(), spec.command().len());

    // A value that looks like a placeholder is not expanded again.
    let argv = spec
        .render_argv(&json!({"input": "{output}", "output": "o", "at": "{{x}}"}))
        .unwrap();
    assert_eq!(argv[2], "{output}");
    assert_eq!(argv[4], "{{x}}");
}

#[test]
fn rendering_writes_numbers_and_booleans_as_json_text() {
    let types = load(
        "[[task_type]]\nname = \"t\"\ncommand = [\"prog\", \"{n}\", \"{f}\", \"{b}\", \"{n}\"]\n",
    );
    let spec = types.get("t").unwrap();
    assert_eq!(
        spec.render_argv(&json!({"n": 3, "f": 2.5, "b": true}))
            .unwrap(),
        ["prog", "3", "2.5", "true", "3"]
    );
    assert_eq!(
        spec.render_argv(&json!({"n": -7, "f": 1e3, "b": false}))
            .unwrap(),
        ["prog", "-7", "1000.0", "false", "-7"]
    );
}

#[test]
fn rendering_refuses_what_cannot_be_one_argument() {
    let types = load(THUMBNAIL);
    let spec = types.get("ffmpeg_thumbnail").unwrap();
    for (value, kind) in [
        (json!(["a", "b"]), "an array"),
        (json!({"k": 1}), "an object"),
        (json!(null), "null"),
    ] {
        let error = spec
            .render_argv(&json!({"input": value, "output": "o"}))
            .unwrap_err();
        assert!(
            matches!(error, ParamsError::Unsupported { .. }),
            "{error:?}"
        );
        assert_contains(
            &error.to_string(),
            &[
                &format!("param \"input\" of task type \"ffmpeg_thumbnail\" is {kind}"),
                "give a string, a number or a boolean",
            ],
        );
    }

    let error = spec
        .render_argv(&json!({"input": "a\0b", "output": "o"}))
        .unwrap_err();
    assert!(matches!(error, ParamsError::NulByte { .. }), "{error:?}");

    let error = spec.render_argv(&json!([1])).unwrap_err();
    assert!(
        matches!(error, ParamsError::NotAnObject { .. }),
        "{error:?}"
    );
}

#[test]
fn missing_params_take_the_schema_default_or_are_refused() {
    let types = load(THUMBNAIL);
    let spec = types.get("ffmpeg_thumbnail").unwrap();
    let argv = spec
        .render_argv(&json!({"input": "i", "output": "o"}))
        .unwrap();
    assert_eq!(argv[4], "00:00:01");
    let argv = spec
        .render_argv(&json!({"input": "i", "output": "o", "at": "00:01:00"}))
        .unwrap();
    assert_eq!(argv[4], "00:01:00");

    let error = spec.render_argv(&json!({"input": "i"})).unwrap_err();
    assert_eq!(
        error,
        ParamsError::Missing {
            task_type: "ffmpeg_thumbnail".into(),
            param: "output".into(),
        }
    );
    assert_eq!(
        error.to_string(),
        "task type \"ffmpeg_thumbnail\" needs the param \"output\", which is missing and has no default: add \"output\" to the params"
    );

    let types = load(&with(""));
    let error = types
        .get("t")
        .unwrap()
        .render_argv(&json!(null))
        .unwrap_err();
    assert_contains(&error.to_string(), &["needs the param \"a\""]);
}

#[test]
fn task_types_are_shareable_between_threads() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<TaskTypes>();
    assert_send_sync::<TaskTypesError>();
    assert_send_sync::<ParamsError>();
}
