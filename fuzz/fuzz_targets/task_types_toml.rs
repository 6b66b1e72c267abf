//! The task types file: `sandbox_wrapper::task_types::TaskTypes::from_toml_str`.
//!
//! Asserts: it never panics; an error's line is within the text; a file that loads holds what
//! the module documents: unique names of the documented form (and not a built-in type's),
//! commands whose program is a non-empty literal and whose placeholders are well-formed names,
//! no NUL byte anywhere in a command, timeouts and concurrency of at least 1, a known flavor, a
//! schema that declares every placeholder with a scalar default if any; rendering the argv puts
//! each param's value in exactly its placeholder's element; and the task types, written back
//! as TOML (literals escaped with `{{`/`}}`), load to the same task types.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox_wrapper::task_types::{
    ArgTemplate, FLAVORS, MAX_NAME_LEN, RESERVED_NAMES, TaskTypeSpec, TaskTypes,
};
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let types = match TaskTypes::from_toml_str(text) {
        Ok(types) => types,
        Err(error) => {
            let _ = error.to_string();
            if let Some(line) = error.line() {
                let lines = text.split('\n').count();
                assert!(
                    line >= 1 && line as usize <= lines,
                    "line {line} of a text of {lines} lines: {error}"
                );
            }
            return;
        }
    };
    let mut seen = std::collections::HashSet::new();
    for spec in &types {
        check_spec(spec);
        assert!(seen.insert(spec.name()), "{} twice", spec.name());
        assert!(types.contains(spec.name()));
        assert_eq!(
            types.get(spec.name()).map(TaskTypeSpec::name),
            Some(spec.name())
        );
    }
    assert_eq!(types.len(), seen.len());

    // Written back as TOML, the task types load to the same ones.
    let written = write_back(&types);
    let again = TaskTypes::from_toml_str(&written)
        .unwrap_or_else(|e| panic!("written back as\n{written}\nthey do not load: {e}"));
    assert_eq!(again.len(), types.len(), "{written}");
    for (one, other) in types.iter().zip(&again) {
        assert_eq!(one.name(), other.name(), "{written}");
        assert_eq!(one.description(), other.description(), "{written}");
        assert_eq!(one.command(), other.command(), "{written}");
        assert_eq!(one.defaults(), other.defaults(), "{written}");
        assert_eq!(one.params_schema(), other.params_schema(), "{written}");
    }
});

fn check_spec(spec: &TaskTypeSpec) {
    let name = spec.name();
    let mut chars = name.chars();
    assert!(
        chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c))
            && name.len() <= MAX_NAME_LEN,
        "name {name:?}"
    );
    assert!(!RESERVED_NAMES.contains(&name), "reserved name {name:?}");

    let command = spec.command();
    assert!(
        matches!(command.first(), Some(ArgTemplate::Literal(program)) if !program.is_empty()),
        "{name}: program {:?}",
        command.first()
    );
    for element in command {
        match element {
            ArgTemplate::Literal(text) => assert!(!text.contains('\0'), "{name}: NUL in {text:?}"),
            ArgTemplate::Param(param) => {
                let mut chars = param.chars();
                assert!(
                    chars
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                    "{name}: placeholder {param:?}"
                );
            }
        }
    }

    let defaults = spec.defaults();
    assert!(defaults.timeout.is_none_or(|t| t.as_secs() >= 1), "{name}");
    assert!(defaults.concurrency.is_none_or(|c| c >= 1), "{name}");
    assert!(
        defaults
            .flavor
            .as_deref()
            .is_none_or(|f| FLAVORS.contains(&f)),
        "{name}"
    );
    assert!(defaults.priority.is_none_or(|p| p.get() <= 9), "{name}");

    if let Some(schema) = spec.params_schema() {
        for param in spec.placeholders() {
            let property = schema
                .get("properties")
                .and_then(|p| p.get(param))
                .unwrap_or_else(|| panic!("{name}: placeholder {param} is not declared"));
            assert!(
                property
                    .get("default")
                    .is_none_or(|d| d.is_string() || d.is_number() || d.is_boolean()),
                "{name}: the default of {param} is not a scalar"
            );
        }
    }

    // Each param's value lands in exactly its placeholder's element, whole.
    let params: Map<String, Value> = spec
        .placeholders()
        .map(|param| (param.to_owned(), Value::String(format!("value of {param}"))))
        .collect();
    let params = Value::Object(params);
    let argv = spec
        .render_argv(&params)
        .unwrap_or_else(|e| panic!("{name}: every param given, yet {e}"));
    assert_eq!(argv.len(), command.len(), "{name}");
    for (element, argument) in command.iter().zip(&argv) {
        match element {
            ArgTemplate::Literal(text) => assert_eq!(argument, text, "{name}"),
            ArgTemplate::Param(param) => {
                assert_eq!(*argument, format!("value of {param}"), "{name}")
            }
        }
    }
    let _ = spec.validate(&params);
    let _ = spec.validate(&Value::Null);
    let _ = spec.render_argv(&Value::Null);
    let task = spec.new_task(params);
    assert_eq!(task.task_type, name);
}

/// The task types as a TOML file.
fn write_back(types: &TaskTypes) -> String {
    let tables: Vec<toml::Value> = types
        .iter()
        .map(|spec| {
            let mut table = toml::Table::new();
            table.insert("name".into(), spec.name().into());
            if !spec.description().is_empty() {
                table.insert("description".into(), spec.description().into());
            }
            let command: Vec<toml::Value> = spec
                .command()
                .iter()
                .map(|element| match element {
                    ArgTemplate::Literal(text) => text.replace('{', "{{").replace('}', "}}"),
                    ArgTemplate::Param(param) => format!("{{{param}}}"),
                })
                .map(toml::Value::String)
                .collect();
            table.insert("command".into(), command.into());
            let defaults = spec.defaults();
            let integer = |n: u64| toml::Value::Integer(i64::try_from(n).expect("from TOML"));
            if let Some(timeout) = defaults.timeout {
                table.insert("timeout_seconds".into(), integer(timeout.as_secs()));
            }
            if let Some(retries) = defaults.max_retries {
                table.insert("max_retries".into(), integer(retries.into()));
            }
            if let Some(priority) = defaults.priority {
                table.insert("priority".into(), integer(priority.get().into()));
            }
            if let Some(concurrency) = defaults.concurrency {
                table.insert("concurrency".into(), integer(concurrency as u64));
            }
            if let Some(flavor) = &defaults.flavor {
                table.insert("flavor".into(), flavor.as_str().into());
            }
            if let Some(schema) = spec.params_schema() {
                table.insert("params_schema".into(), json_to_toml(schema));
            }
            toml::Value::Table(table)
        })
        .collect();
    let mut file = toml::Table::new();
    file.insert("task_type".into(), tables.into());
    toml::to_string(&file).expect("a TOML table serializes")
}

/// A JSON value (that came from TOML: no null) as TOML.
fn json_to_toml(value: &Value) -> toml::Value {
    match value {
        Value::Null => panic!("a schema read from TOML holds a null"),
        Value::Bool(flag) => toml::Value::Boolean(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(integer) => toml::Value::Integer(integer),
            None => toml::Value::Float(number.as_f64().expect("a finite number")),
        },
        Value::String(text) => toml::Value::String(text.clone()),
        Value::Array(items) => toml::Value::Array(items.iter().map(json_to_toml).collect()),
        Value::Object(map) => toml::Value::Table(
            map.iter()
                .map(|(key, value)| (key.clone(), json_to_toml(value)))
                .collect(),
        ),
    }
}
