//! Operator-defined task types, loaded from a TOML file.
//!
//! Besides the built-in task types `command` and `code`, an operator may declare task types of
//! their own: a name, a command template, an optional JSON Schema for the params, and defaults.
//! A caller then submits `{"task_type": "ffmpeg_thumbnail", "params": {...}}` and never writes a
//! command line. This module reads and checks such a file ([`TaskTypes::load`],
//! [`TaskTypes::from_toml_str`]); it never reads the environment (the daemon finds the file
//! through `MSB_TASK_TYPES_FILE` and passes the path). `examples/task-types.toml` at the root of
//! the repository is a documented example.
//!
//! # The file format
//!
//! The file holds nothing but `[[task_type]]` tables, one per task type (a file with none is
//! valid and declares nothing):
//!
//! ```toml
//! [[task_type]]
//! name = "ffmpeg_thumbnail"
//! description = "Extract a thumbnail from a video"
//! command = ["ffmpeg", "-i", "{input}", "-ss", "{at}", "-frames:v", "1", "{output}"]
//! timeout_seconds = 120
//! max_retries = 2
//! priority = "high"
//! concurrency = 2
//! flavor = "small"
//!
//! [task_type.params_schema]
//! type = "object"
//! required = ["input", "output"]
//! properties.input = { type = "string" }
//! properties.at = { type = "string", default = "00:00:01" }
//! properties.output = { type = "string" }
//! ```
//!
//! | key | required | meaning |
//! |-----|----------|---------|
//! | `name` | yes | `[a-z][a-z0-9_.-]{0,63}`, unique in the file, and not `command` or `code` (built in) |
//! | `description` | no | free text for people and tool listings |
//! | `command` | yes | the program and its arguments, a list of strings (see below) |
//! | `timeout_seconds` | no | default timeout of one attempt, at least 1 |
//! | `max_retries` | no | default number of retries after a failed attempt (0 for none) |
//! | `priority` | no | default priority: `low`, `normal`, `high`, `critical`, or a number from 0 to 9 |
//! | `concurrency` | no | at most this many tasks of this type run at once, at least 1 |
//! | `flavor` | no | the sandbox size: `small`, `medium` or `large` |
//! | `rerun_on_recovery` | no | `true` (the default): an attempt cut short by msbd's going away (a shutdown, a crash) runs again; `false`: the task fails with kind `interrupted` instead |
//! | `params_schema` | no | a JSON Schema, written as a TOML table, that the params must match |
//!
//! Any other key is refused, so a misspelt key is caught when the file is loaded rather than
//! silently ignored.
//!
//! # Command templates
//!
//! The command is an argv, never a shell line: no shell ever sees it, so a param's value cannot
//! inject anything, whatever characters it holds. Each element is one of:
//!
//! - a **placeholder**: an element that is exactly `{name}` (a letter or `_`, then letters,
//!   digits, `_` or `-`). It is replaced by the value of the param `name` as **one whole argv
//!   element**: a string as is, a number or a boolean by its JSON text (`3`, `2.5`, `true`).
//!   An array, an object or `null` is refused. A missing param takes the `default` that
//!   `params_schema` gives it in `properties.<name>.default`; without one, the task is refused.
//! - a **literal**, passed as is, except that `{{` stands for `{` and `}}` for `}`.
//!
//! A placeholder must be the entire element: an element such as `"--size={width}"` or
//! `"{a}{b}"` is refused when the file is loaded, with a message saying so. Split it into two
//! elements (`"--size", "{width}"`) when the program accepts that; write `{{width}}` for a
//! literal `{width}`. Braces that do not form a placeholder (`{}`, `{.name}`, `{print $1}`) are
//! literal text and need no escaping. The program (the first element) must be a non-empty
//! literal: a param never chooses what runs.
//!
//! When `params_schema` is given, every placeholder must be declared in its top-level
//! `properties`, and a declared `default` of a placeholder must be a string, a number or a
//! boolean. The schema is compiled once, when the file is loaded (remote `$ref`s are not
//! fetched); a schema that does not compile is a load error naming the task type. Its
//! `format` keywords are checked (`format = "email"` refuses a string that is not an address),
//! not merely annotations.
//!
//! # Defaults
//!
//! [`TaskTypeDefaults`] carries the optional defaults, mapped onto task-core's types:
//! `max_retries` becomes `max_attempts = max_retries + 1`
//! ([`TaskTypeDefaults::max_attempts`]), `priority` a [`Priority`], `timeout_seconds` a
//! [`Duration`]. [`TaskTypeSpec::new_task`] builds a [`NewTask`] with them applied; the caller
//! then overrides what the submission sets explicitly. `concurrency` and `flavor` are for the
//! dispatcher and the session manager.
//!
//! # Errors
//!
//! A file that cannot be loaded gives a [`TaskTypesError`] naming the file, the line and
//! column, the task type and the field, and saying what to do. Params that do not fit give a
//! [`ParamsError`] naming the task type (and the param), with the schema validator's own words.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use task_core::{NewTask, Priority};
use toml::Spanned;

/// The names of the built-in task types, which an operator-defined type may not take.
pub const RESERVED_NAMES: [&str; 2] = ["command", "code"];

/// The flavors (sandbox sizes) a task type may ask for.
pub const FLAVORS: [&str; 3] = ["small", "medium", "large"];

/// The longest a task type's name may be, in bytes (all its characters are ASCII).
pub const MAX_NAME_LEN: usize = 64;

/// The most schema errors a [`ParamsError::Invalid`] lists; the rest are counted.
pub const MAX_LISTED_ERRORS: usize = 10;

/// The operator-defined task types of one file, in file order, looked up by name.
#[derive(Clone, Debug, Default)]
pub struct TaskTypes {
    specs: Vec<TaskTypeSpec>,
    by_name: HashMap<String, usize>,
}

impl TaskTypes {
    /// Reads and checks the task types file at `path`.
    ///
    /// # Errors
    ///
    /// [`TaskTypesError::Read`] when the file cannot be read; otherwise as
    /// [`TaskTypes::from_toml_str`], with the path named in the error.
    pub fn load(path: impl AsRef<Path>) -> Result<TaskTypes, TaskTypesError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| TaskTypesError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Parser {
            origin: Some(path),
            text: &text,
        }
        .parse()
    }

    /// Reads and checks task types from TOML text, in the format the [module](self) describes.
    ///
    /// # Errors
    ///
    /// [`TaskTypesError::Toml`] when the text is not TOML or holds something other than
    /// `[[task_type]]` tables; [`TaskTypesError::TaskType`] when one task type is wrong (an
    /// invalid, reserved or repeated name, an empty or malformed command, an unknown key, a bad
    /// priority, flavor, timeout or concurrency, or a params schema that does not compile or
    /// does not declare a placeholder).
    pub fn from_toml_str(text: &str) -> Result<TaskTypes, TaskTypesError> {
        Parser { origin: None, text }.parse()
    }

    /// The task type of this name, if the file declares one.
    pub fn get(&self, name: &str) -> Option<&TaskTypeSpec> {
        self.by_name.get(name).map(|&index| &self.specs[index])
    }

    /// Whether the file declares a task type of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Every task type, in file order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &TaskTypeSpec> + '_ {
        self.specs.iter()
    }

    /// Every task type's name, in file order.
    pub fn names(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.specs.iter().map(|spec| spec.name.as_str())
    }

    /// How many task types there are.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }
}

impl<'a> IntoIterator for &'a TaskTypes {
    type Item = &'a TaskTypeSpec;
    type IntoIter = std::slice::Iter<'a, TaskTypeSpec>;

    fn into_iter(self) -> Self::IntoIter {
        self.specs.iter()
    }
}

/// One element of a command template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgTemplate {
    /// Passed as is (the file's `{{` and `}}` already turned into `{` and `}`).
    Literal(String),
    /// Replaced by the value of the param of this name, as one whole argv element.
    Param(String),
}

/// The defaults of a task type, each optional; see the [module](self) for how they map onto
/// task-core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskTypeDefaults {
    /// The longest one attempt may run (`timeout_seconds`, never zero).
    pub timeout: Option<Duration>,
    /// How many times a failed attempt is retried (`max_retries`).
    pub max_retries: Option<u32>,
    /// The priority (`priority`).
    pub priority: Option<Priority>,
    /// At most this many tasks of the type run at once (`concurrency`, never zero).
    pub concurrency: Option<usize>,
    /// The sandbox size: one of [`FLAVORS`] (`flavor`).
    pub flavor: Option<String>,
    /// Whether an attempt cut short by msbd's going away runs again (`rerun_on_recovery`).
    pub rerun_on_recovery: Option<bool>,
}

impl TaskTypeDefaults {
    /// task-core's `max_attempts` for `max_retries`: one more (saturating).
    pub fn max_attempts(&self) -> Option<u32> {
        self.max_retries.map(|retries| retries.saturating_add(1))
    }
}

/// One operator-defined task type, checked, with its params schema compiled.
#[derive(Clone, Debug)]
pub struct TaskTypeSpec {
    name: String,
    description: String,
    command: Vec<ArgTemplate>,
    params_schema: Option<Value>,
    validator: Option<jsonschema::Validator>,
    defaults: TaskTypeDefaults,
}

impl TaskTypeSpec {
    /// Its name, the `task_type` callers submit.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its description (empty when the file gives none).
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Its command template: the program (always a [`ArgTemplate::Literal`]) and its arguments.
    pub fn command(&self) -> &[ArgTemplate] {
        &self.command
    }

    /// The JSON Schema of its params, as the file wrote it, if any.
    pub fn params_schema(&self) -> Option<&Value> {
        self.params_schema.as_ref()
    }

    /// Its defaults.
    pub fn defaults(&self) -> &TaskTypeDefaults {
        &self.defaults
    }

    /// The names of the params its command uses, in command order (a name used twice appears
    /// twice).
    pub fn placeholders(&self) -> impl Iterator<Item = &str> + '_ {
        self.command.iter().filter_map(|element| match element {
            ArgTemplate::Param(name) => Some(name.as_str()),
            ArgTemplate::Literal(_) => None,
        })
    }

    /// A task of this type with these params and the type's defaults applied (priority,
    /// attempts, timeout); what the file leaves out keeps [`NewTask::new`]'s value.
    pub fn new_task(&self, params: Value) -> NewTask {
        let mut task = NewTask::new(self.name.clone(), params);
        if let Some(priority) = self.defaults.priority {
            task = task.with_priority(priority);
        }
        if let Some(attempts) = self.defaults.max_attempts() {
            task = task.with_max_attempts(attempts);
        }
        if let Some(timeout) = self.defaults.timeout {
            task = task.with_timeout(timeout);
        }
        if let Some(rerun) = self.defaults.rerun_on_recovery {
            task = task.with_rerun_on_recovery(rerun);
        }
        task
    }

    /// Checks params against the type's schema.
    ///
    /// Without a schema, any JSON object (or `null`, for no params) passes.
    ///
    /// # Errors
    ///
    /// [`ParamsError::Invalid`] listing the validator's messages (at most
    /// [`MAX_LISTED_ERRORS`], the rest counted) with where in the params each applies;
    /// [`ParamsError::NotAnObject`] when there is no schema and the params are not an object.
    pub fn validate(&self, params: &Value) -> Result<(), ParamsError> {
        let Some(validator) = &self.validator else {
            return match params {
                Value::Object(_) | Value::Null => Ok(()),
                other => Err(ParamsError::NotAnObject {
                    task_type: self.name.clone(),
                    found: json_kind(other),
                }),
            };
        };
        let mut iter = validator.iter_errors(params);
        let errors: Vec<String> = iter
            .by_ref()
            .take(MAX_LISTED_ERRORS)
            .map(|error| {
                let at = error.instance_path().as_str();
                format!("{error} (at {})", if at.is_empty() { "/" } else { at })
            })
            .collect();
        if errors.is_empty() {
            return Ok(());
        }
        let omitted = iter.count();
        Err(ParamsError::Invalid {
            task_type: self.name.clone(),
            errors,
            omitted,
        })
    }

    /// The argv to run for these params: each placeholder replaced by its param's value as one
    /// whole element (see the [module](self)). Nothing is shell-interpolated.
    ///
    /// This does not check the params against the schema: call [`TaskTypeSpec::validate`]
    /// first.
    ///
    /// # Errors
    ///
    /// [`ParamsError::NotAnObject`] when the params are neither an object nor `null`;
    /// [`ParamsError::Missing`] when a placeholder's param is absent and has no default;
    /// [`ParamsError::Unsupported`] when its value is an array, an object or `null`;
    /// [`ParamsError::NulByte`] when its string holds a NUL byte.
    pub fn render_argv(&self, params: &Value) -> Result<Vec<String>, ParamsError> {
        let empty = serde_json::Map::new();
        let object = match params {
            Value::Object(object) => object,
            Value::Null => &empty,
            other => {
                return Err(ParamsError::NotAnObject {
                    task_type: self.name.clone(),
                    found: json_kind(other),
                });
            }
        };
        self.command
            .iter()
            .map(|element| match element {
                ArgTemplate::Literal(text) => Ok(text.clone()),
                ArgTemplate::Param(name) => {
                    let value = object
                        .get(name)
                        .or_else(|| self.schema_default(name))
                        .ok_or_else(|| ParamsError::Missing {
                            task_type: self.name.clone(),
                            param: name.clone(),
                        })?;
                    self.argument(name, value)
                }
            })
            .collect()
    }

    /// The `default` the schema declares for a param, if any.
    fn schema_default(&self, param: &str) -> Option<&Value> {
        self.params_schema
            .as_ref()?
            .get("properties")?
            .get(param)?
            .get("default")
    }

    /// One argv element from a param's value.
    fn argument(&self, param: &str, value: &Value) -> Result<String, ParamsError> {
        let text = match value {
            Value::String(text) => text.clone(),
            Value::Number(number) => number.to_string(),
            Value::Bool(flag) => flag.to_string(),
            other => {
                return Err(ParamsError::Unsupported {
                    task_type: self.name.clone(),
                    param: param.to_owned(),
                    found: json_kind(other),
                });
            }
        };
        if text.contains('\0') {
            return Err(ParamsError::NulByte {
                task_type: self.name.clone(),
                param: param.to_owned(),
            });
        }
        Ok(text)
    }
}

/// Why params do not fit a task type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParamsError {
    /// The params do not match the type's schema.
    #[error(
        "params for task type \"{task_type}\" are invalid: {}{}",
        errors.join("; "),
        more_errors(*omitted)
    )]
    Invalid {
        /// The task type.
        task_type: String,
        /// The schema validator's messages, each followed by where in the params it applies
        /// (`(at /output)`); at most [`MAX_LISTED_ERRORS`].
        errors: Vec<String>,
        /// How many more errors there were.
        omitted: usize,
    },
    /// The params are not a JSON object.
    #[error(
        "params for task type \"{task_type}\" must be a JSON object of named params (or null for none), not {found}"
    )]
    NotAnObject {
        /// The task type.
        task_type: String,
        /// What they are instead: `an array`, `a string`...
        found: &'static str,
    },
    /// A param the command needs is absent and the schema gives it no default.
    #[error(
        "task type \"{task_type}\" needs the param \"{param}\", which is missing and has no default: add \"{param}\" to the params"
    )]
    Missing {
        /// The task type.
        task_type: String,
        /// The missing param.
        param: String,
    },
    /// A param the command uses is not a string, a number or a boolean.
    #[error(
        "param \"{param}\" of task type \"{task_type}\" is {found}, but it becomes one command argument: give a string, a number or a boolean"
    )]
    Unsupported {
        /// The task type.
        task_type: String,
        /// The param.
        param: String,
        /// What it is: `an array`, `an object` or `null`.
        found: &'static str,
    },
    /// A string param the command uses holds a NUL byte, which no argv element can carry.
    #[error(
        "param \"{param}\" of task type \"{task_type}\" contains a NUL byte, which no command argument can hold: remove it"
    )]
    NulByte {
        /// The task type.
        task_type: String,
        /// The param.
        param: String,
    },
}

impl ParamsError {
    /// The task type the params were for.
    pub fn task_type(&self) -> &str {
        match self {
            ParamsError::Invalid { task_type, .. }
            | ParamsError::NotAnObject { task_type, .. }
            | ParamsError::Missing { task_type, .. }
            | ParamsError::Unsupported { task_type, .. }
            | ParamsError::NulByte { task_type, .. } => task_type,
        }
    }
}

fn more_errors(omitted: usize) -> String {
    match omitted {
        0 => String::new(),
        n => format!("; and {n} more"),
    }
}

/// Why a task types file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TaskTypesError {
    /// The file could not be read.
    #[error(
        "cannot read the task types file {}: {source}; check that the path is right and that the daemon may read it",
        path.display()
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The reason.
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML, or holds something other than `[[task_type]]` tables.
    #[error("{}{}: {message}", origin_label(origin.as_deref()), position(*line, *column))]
    Toml {
        /// The file, when loaded from one.
        origin: Option<PathBuf>,
        /// The line (from 1) where the problem is, when known.
        line: Option<u32>,
        /// The column (from 1, in characters) where the problem is, when known.
        column: Option<u32>,
        /// What is wrong (with toml's own words) and what to do.
        message: String,
    },
    /// One task type is wrong.
    #[error(
        "{}{}: {}{}: {message}",
        origin_label(origin.as_deref()),
        position(*line, *column),
        task_type_label(task_type.as_deref(), *entry),
        field.as_deref().map(|field| format!(", field `{field}`")).unwrap_or_default()
    )]
    TaskType {
        /// The file, when loaded from one.
        origin: Option<PathBuf>,
        /// Which `[[task_type]]` table it is, from 1, in file order.
        entry: usize,
        /// Its name, when it has one (even an invalid one).
        task_type: Option<String>,
        /// The key at fault, when one is.
        field: Option<String>,
        /// The line (from 1) where the problem is, when known.
        line: Option<u32>,
        /// The column (from 1, in characters) where the problem is, when known.
        column: Option<u32>,
        /// What is wrong and what to do.
        message: String,
    },
}

impl TaskTypesError {
    /// The name of the task type at fault, when the error is about one that has a name.
    pub fn task_type(&self) -> Option<&str> {
        match self {
            TaskTypesError::TaskType { task_type, .. } => task_type.as_deref(),
            _ => None,
        }
    }

    /// The key at fault, when the error is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            TaskTypesError::TaskType { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    /// The line (from 1) of the problem, when known.
    pub fn line(&self) -> Option<u32> {
        match self {
            TaskTypesError::Toml { line, .. } | TaskTypesError::TaskType { line, .. } => *line,
            TaskTypesError::Read { .. } => None,
        }
    }
}

fn origin_label(origin: Option<&Path>) -> String {
    match origin {
        Some(path) => format!("task types file {}", path.display()),
        None => "task types".to_owned(),
    }
}

fn position(line: Option<u32>, column: Option<u32>) -> String {
    match (line, column) {
        (Some(line), Some(column)) => format!(", line {line}, column {column}"),
        (Some(line), None) => format!(", line {line}"),
        _ => String::new(),
    }
}

fn task_type_label(name: Option<&str>, entry: usize) -> String {
    match name {
        Some(name) => format!("task type \"{name}\""),
        None => format!("task type #{entry}"),
    }
}

/// The file as serde reads it. Every key is checked: unknown ones are refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    task_type: Vec<Spanned<RawTaskType>>,
}

/// One `[[task_type]]` table as serde reads it; what serde cannot check is checked after.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTaskType {
    name: Option<Spanned<String>>,
    description: Option<String>,
    command: Option<Spanned<Vec<Spanned<String>>>>,
    timeout_seconds: Option<Spanned<u64>>,
    max_retries: Option<u32>,
    priority: Option<Spanned<toml::Value>>,
    concurrency: Option<Spanned<usize>>,
    flavor: Option<Spanned<String>>,
    rerun_on_recovery: Option<bool>,
    params_schema: Option<Spanned<toml::Table>>,
}

/// The file read loosely, only to find which task type and key a serde error is about.
#[derive(Deserialize)]
struct LooseFile {
    #[serde(default)]
    task_type: Vec<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
}

/// Reads one text, knowing where it came from.
struct Parser<'a> {
    origin: Option<&'a Path>,
    text: &'a str,
}

impl Parser<'_> {
    fn parse(&self) -> Result<TaskTypes, TaskTypesError> {
        let raw: RawFile = toml::from_str(self.text).map_err(|error| self.serde_error(&error))?;
        let mut types = TaskTypes::default();
        let mut first_lines: Vec<u32> = Vec::new();
        for (index, entry) in raw.task_type.into_iter().enumerate() {
            let span = entry.span();
            let name_span = entry.get_ref().name.as_ref().map(Spanned::span);
            let spec = self.check(index + 1, span.clone(), entry.into_inner())?;
            if let Some(&first) = types.by_name.get(&spec.name) {
                let line = first_lines[first];
                return Err(self.task_error(
                    index + 1,
                    Some(&spec.name),
                    Some("name"),
                    name_span,
                    format!(
                        "the name \"{}\" is already used by task type #{} (line {line}); names must be unique: rename or remove one of them",
                        spec.name,
                        first + 1
                    ),
                ));
            }
            first_lines.push(self.line_col(span.start).0);
            types.by_name.insert(spec.name.clone(), types.specs.len());
            types.specs.push(spec);
        }
        Ok(types)
    }

    /// Checks one task type (entry number `entry`, from 1) and compiles its schema.
    fn check(
        &self,
        entry: usize,
        span: Range<usize>,
        raw: RawTaskType,
    ) -> Result<TaskTypeSpec, TaskTypesError> {
        let raw_name = raw.name.as_ref().map(|name| name.get_ref().as_str());
        let fail = |field: &str, at: Option<Range<usize>>, message: String| {
            self.task_error(entry, raw_name, Some(field), at, message)
        };

        let Some(name) = &raw.name else {
            return Err(fail(
                "name",
                Some(span),
                "every task type needs a name, such as name = \"ffmpeg_thumbnail\"".to_owned(),
            ));
        };
        if let Err(problem) = check_name(name.get_ref()) {
            return Err(fail("name", Some(name.span()), problem));
        }

        let Some(command) = &raw.command else {
            return Err(fail(
                "command",
                Some(span),
                "every task type needs a command: the program and its arguments as a list of strings, such as command = [\"ffmpeg\", \"-i\", \"{input}\"]".to_owned(),
            ));
        };
        if command.get_ref().is_empty() {
            return Err(fail(
                "command",
                Some(command.span()),
                "the command is empty: give the program and its arguments, such as command = [\"ffmpeg\", \"-i\", \"{input}\"]".to_owned(),
            ));
        }
        let mut template = Vec::with_capacity(command.get_ref().len());
        for element in command.get_ref() {
            let parsed = parse_element(element.get_ref())
                .map_err(|problem| fail("command", Some(element.span()), problem))?;
            template.push(parsed);
        }
        match &template[0] {
            ArgTemplate::Param(param) => {
                return Err(fail(
                    "command",
                    Some(command.get_ref()[0].span()),
                    format!(
                        "the program (the command's first element) is the placeholder {{{param}}}, but a param may not choose what runs: name the program itself"
                    ),
                ));
            }
            ArgTemplate::Literal(program) if program.is_empty() => {
                return Err(fail(
                    "command",
                    Some(command.get_ref()[0].span()),
                    "the program (the command's first element) is empty: name the program to run"
                        .to_owned(),
                ));
            }
            ArgTemplate::Literal(_) => {}
        }

        let mut defaults = TaskTypeDefaults {
            max_retries: raw.max_retries,
            rerun_on_recovery: raw.rerun_on_recovery,
            ..TaskTypeDefaults::default()
        };
        if let Some(timeout) = &raw.timeout_seconds {
            if *timeout.get_ref() == 0 {
                return Err(fail(
                    "timeout_seconds",
                    Some(timeout.span()),
                    "a timeout of 0 seconds would stop every task at once: give at least 1, or leave timeout_seconds out for no default timeout".to_owned(),
                ));
            }
            defaults.timeout = Some(Duration::from_secs(*timeout.get_ref()));
        }
        if let Some(priority) = &raw.priority {
            let parsed = parse_priority(priority.get_ref())
                .map_err(|problem| fail("priority", Some(priority.span()), problem))?;
            defaults.priority = Some(parsed);
        }
        if let Some(concurrency) = &raw.concurrency {
            if *concurrency.get_ref() == 0 {
                return Err(fail(
                    "concurrency",
                    Some(concurrency.span()),
                    "a concurrency of 0 would never run a task of this type: give at least 1, or leave concurrency out for no limit of its own".to_owned(),
                ));
            }
            defaults.concurrency = Some(*concurrency.get_ref());
        }
        if let Some(flavor) = &raw.flavor {
            if !FLAVORS.contains(&flavor.get_ref().as_str()) {
                return Err(fail(
                    "flavor",
                    Some(flavor.span()),
                    format!(
                        "\"{}\" is not a flavor: use one of {}",
                        flavor.get_ref(),
                        FLAVORS.join(", ")
                    ),
                ));
            }
            defaults.flavor = Some(flavor.get_ref().clone());
        }

        let (params_schema, validator) = match &raw.params_schema {
            None => (None, None),
            Some(table) => {
                let at = Some(table.span());
                let schema = table_to_json(table.get_ref())
                    .map_err(|problem| fail("params_schema", at.clone(), problem))?;
                let validator = jsonschema::options()
                    .should_validate_formats(true)
                    .build(&schema)
                    .map_err(|error| {
                        let path = error.instance_path().as_str();
                        let path = if path.is_empty() { "/" } else { path };
                        fail(
                            "params_schema",
                            at.clone(),
                            format!(
                                "the schema is not a valid JSON Schema: {error} (at {path} in the schema); fix it (remote $ref are not fetched: inline what they point to)"
                            ),
                        )
                    })?;
                check_placeholders(&template, &schema).map_err(|(field, problem)| {
                    let at = if field == "command" {
                        Some(command.span())
                    } else {
                        at.clone()
                    };
                    fail(field, at, problem)
                })?;
                (Some(schema), Some(validator))
            }
        };

        Ok(TaskTypeSpec {
            name: name.get_ref().clone(),
            description: raw.description.unwrap_or_default(),
            command: template,
            params_schema,
            validator,
            defaults,
        })
    }

    /// Turns serde's error about the whole file into one that names the task type and key.
    fn serde_error(&self, error: &toml::de::Error) -> TaskTypesError {
        let span = error.span();
        let (line, column) = match &span {
            Some(span) => {
                let (line, column) = self.line_col(span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        if let Err(syntax) = toml::from_str::<toml::Table>(self.text) {
            return TaskTypesError::Toml {
                origin: self.origin.map(Path::to_path_buf),
                line,
                column,
                message: format!(
                    "this is not valid TOML: {}; fix the syntax there",
                    syntax.message().trim_end()
                ),
            };
        }
        let message = friendly(error.message().trim_end());
        let located = span.as_ref().and_then(|span| self.locate(span.start));
        match located {
            Some((entry, name, field)) => {
                let hint = if message.starts_with("unknown field") {
                    "; remove it or correct its spelling"
                } else {
                    "; correct the value"
                };
                TaskTypesError::TaskType {
                    origin: self.origin.map(Path::to_path_buf),
                    entry,
                    task_type: name,
                    field,
                    line,
                    column,
                    message: format!("{message}{hint}"),
                }
            }
            None => TaskTypesError::Toml {
                origin: self.origin.map(Path::to_path_buf),
                line,
                column,
                message: format!(
                    "{message}; the file holds only [[task_type]] tables (with double brackets), each declaring one task type"
                ),
            },
        }
    }

    /// Which task type (entry number, name) and key an offset falls in.
    fn locate(&self, offset: usize) -> Option<(usize, Option<String>, Option<String>)> {
        let loose: LooseFile = toml::from_str(self.text).ok()?;
        let contains = |span: Range<usize>| span.contains(&offset);
        let describe = |index: usize, table: &BTreeMap<Spanned<String>, Spanned<toml::Value>>| {
            let name = table
                .get("name")
                .and_then(|name| name.get_ref().as_str())
                .map(str::to_owned);
            (index + 1, name)
        };
        for (index, entry) in loose.task_type.iter().enumerate() {
            for (key, value) in entry.get_ref() {
                if contains(key.span()) || contains(value.span()) {
                    let (entry, name) = describe(index, entry.get_ref());
                    return Some((entry, name, Some(key.get_ref().clone())));
                }
            }
        }
        loose
            .task_type
            .iter()
            .enumerate()
            .find(|(_, entry)| contains(entry.span()))
            .map(|(index, entry)| {
                let (entry, name) = describe(index, entry.get_ref());
                (entry, name, None)
            })
    }

    fn task_error(
        &self,
        entry: usize,
        name: Option<&str>,
        field: Option<&str>,
        at: Option<Range<usize>>,
        message: String,
    ) -> TaskTypesError {
        let (line, column) = match at {
            Some(span) => {
                let (line, column) = self.line_col(span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        TaskTypesError::TaskType {
            origin: self.origin.map(Path::to_path_buf),
            entry,
            task_type: name.map(str::to_owned),
            field: field.map(str::to_owned),
            line,
            column,
            message,
        }
    }

    /// The line and column (both from 1; the column in characters) of a byte offset.
    fn line_col(&self, offset: usize) -> (u32, u32) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        let column = before[line_start..].chars().count() + 1;
        let narrow = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        (narrow(line), narrow(column))
    }
}

/// Checks a task type's name: why it is not acceptable, if it is not.
fn check_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_.-".contains(c))
        && name.len() <= MAX_NAME_LEN;
    if !well_formed {
        return Err(format!(
            "\"{}\" is not a valid task type name: use 1 to {MAX_NAME_LEN} characters, a lowercase letter first, then lowercase letters, digits, '_', '.' or '-'",
            name.escape_debug()
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(format!(
            "\"{name}\" is the name of a built-in task type ({}); choose another name",
            RESERVED_NAMES.join(", ")
        ));
    }
    Ok(())
}

/// Reads a priority written as a name or a number.
fn parse_priority(value: &toml::Value) -> Result<Priority, String> {
    match value {
        toml::Value::String(text) => text.parse().map_err(|error| format!("{error}")),
        toml::Value::Integer(number) => number
            .to_string()
            .parse()
            .map_err(|error| format!("{error}")),
        other => Err(format!(
            "a priority is a name (low, normal, high, critical) or a number from 0 to 9, not a {}",
            other.type_str()
        )),
    }
}

/// The length of the placeholder `{name}` that `text` starts with, if it starts with one.
fn placeholder_len(text: &str) -> Option<usize> {
    let rest = text.strip_prefix('{')?;
    let end = rest.find('}')?;
    let name = &rest[..end];
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    valid.then_some(end + 2)
}

/// Reads one command element: a whole-element placeholder, or a literal with `{{`/`}}` escapes.
fn parse_element(raw: &str) -> Result<ArgTemplate, String> {
    if raw.contains('\0') {
        return Err(format!(
            "the element \"{}\" contains a NUL byte, which no command argument can hold: remove it",
            raw.escape_debug()
        ));
    }
    if placeholder_len(raw) == Some(raw.len()) {
        return Ok(ArgTemplate::Param(raw[1..raw.len() - 1].to_owned()));
    }
    let bytes = raw.as_bytes();
    let mut literal = String::with_capacity(raw.len());
    let mut copied = 0;
    let mut index = 0;
    while index < bytes.len() {
        let doubled = bytes.get(index + 1) == Some(&bytes[index]);
        match bytes[index] {
            brace @ (b'{' | b'}') if doubled => {
                literal.push_str(&raw[copied..index]);
                literal.push(char::from(brace));
                index += 2;
                copied = index;
            }
            b'{' => {
                if let Some(len) = placeholder_len(&raw[index..]) {
                    let placeholder = &raw[index..index + len];
                    let inner = &placeholder[1..len - 1];
                    return Err(format!(
                        "the element \"{raw}\" mixes the placeholder {placeholder} with other text, but a placeholder must be a whole element (it becomes exactly one argument): split it into separate elements, such as \"--option\", \"{placeholder}\", if the program accepts that; or write {{{{{inner}}}}} for a literal \"{placeholder}\""
                    ));
                }
                index += 1;
            }
            _ => index += 1,
        }
    }
    literal.push_str(&raw[copied..]);
    Ok(ArgTemplate::Literal(literal))
}

/// With a schema: checks that every placeholder is declared in `properties` and that its
/// `default`, if any, can be an argument. The error names the key at fault.
fn check_placeholders(
    template: &[ArgTemplate],
    schema: &Value,
) -> Result<(), (&'static str, String)> {
    let properties = schema.get("properties").and_then(Value::as_object);
    for element in template {
        let ArgTemplate::Param(param) = element else {
            continue;
        };
        let Some(property) = properties.and_then(|properties| properties.get(param)) else {
            return Err((
                "command",
                format!(
                    "the placeholder {{{param}}} is not declared in params_schema.properties: declare it (such as properties.{param} = {{ type = \"string\" }}) or remove the placeholder"
                ),
            ));
        };
        if let Some(default) = property.get("default")
            && !matches!(
                default,
                Value::String(_) | Value::Number(_) | Value::Bool(_)
            )
        {
            return Err((
                "params_schema",
                format!(
                    "the default of param \"{param}\" is {}, but the placeholder {{{param}}} becomes one command argument: make the default a string, a number or a boolean",
                    json_kind(default)
                ),
            ));
        }
    }
    Ok(())
}

/// A TOML table as JSON.
fn table_to_json(table: &toml::Table) -> Result<Value, String> {
    table
        .iter()
        .map(|(key, value)| Ok((key.clone(), toml_to_json(value)?)))
        .collect::<Result<serde_json::Map<_, _>, String>>()
        .map(Value::Object)
}

/// A TOML value as JSON (a date or time becomes its text).
fn toml_to_json(value: &toml::Value) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(text) => Value::String(text.clone()),
        toml::Value::Integer(number) => Value::from(*number),
        toml::Value::Float(number) => serde_json::Number::from_f64(*number)
            .map(Value::Number)
            .ok_or_else(|| {
                format!(
                    "the schema holds {number}, which JSON cannot represent: use a finite number"
                )
            })?,
        toml::Value::Boolean(flag) => Value::Bool(*flag),
        toml::Value::Datetime(datetime) => Value::String(datetime.to_string()),
        toml::Value::Array(items) => {
            Value::Array(items.iter().map(toml_to_json).collect::<Result<_, _>>()?)
        }
        toml::Value::Table(table) => table_to_json(table)?,
    })
}

/// What kind of JSON value this is, with its article, for messages.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde's wording, with Rust type names turned into words.
fn friendly(message: &str) -> String {
    message
        .replace("expected u64", "expected a whole number of at least 0")
        .replace(
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        )
        .replace("expected usize", "expected a whole number of at least 0")
        .replace("expected a sequence", "expected a list")
        .replace("expected a map", "expected a table")
}
