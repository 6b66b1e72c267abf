//! `msbd task submit|list|show|logs|wait|cancel|retry`: the background-task tools
//! (`submit_task`, `list_tasks`, `check_task_status`, `get_task_result`, `read_task_output`,
//! `wait_for_tasks`, `cancel_task`, `manage_background_tasks` action `retry`).

use std::io::Write as _;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use mcp_tools::client::ToolClient;
use serde_json::{Map, Value, json};

use super::table::{Column, Table};
use super::{Context, EXIT_CODES, Exit, Output, is_final, print_json, seconds_text, text, usage};

/// The task commands.
#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Submit a task and print its id (`msbd task submit -- make test` runs a command).
    #[command(after_help = EXIT_CODES)]
    Submit(SubmitArgs),
    /// List your tasks, newest first, as a table.
    List(ListArgs),
    /// Show a task: status, progress, ETA, attempts, error and result.
    Show(IdArgs),
    /// Print a task's output; with -f, follow it as it is written until the task ends.
    Logs(LogsArgs),
    /// Wait until tasks finish: a progress bar per task on a terminal, a line per status
    /// change otherwise. Exits 0 if every task completed.
    #[command(after_help = EXIT_CODES)]
    Wait(WaitArgs),
    /// Cancel a task (a running one has its processes killed).
    Cancel(IdArgs),
    /// Run a failed, timed-out or cancelled task again as a new task, and print the new id.
    Retry(IdArgs),
}

/// `msbd task submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The task type: command, code, or one the operator defined [default: command].
    #[arg(long = "type", value_name = "TYPE")]
    task_type: Option<String>,
    /// One parameter of the task: KEY=VALUE (VALUE is a string) or KEY:=JSON (VALUE is JSON,
    /// such as timeout_seconds:=30 or argv:='["ls","-l"]'). Repeatable.
    #[arg(long = "param", short = 'p', value_name = "KEY=VALUE")]
    param: Vec<String>,
    /// The task's parameters as one JSON object (--param entries are added to it).
    #[arg(long = "params", value_name = "JSON")]
    params: Option<String>,
    /// Priority: 0–9 or low, normal, high, critical.
    #[arg(long, value_name = "PRIORITY")]
    priority: Option<String>,
    /// The longest one attempt may run, in seconds.
    #[arg(long = "timeout", value_name = "SECONDS")]
    timeout_seconds: Option<f64>,
    /// How many times to retry a failed attempt.
    #[arg(long, value_name = "N")]
    max_retries: Option<u32>,
    /// Start no earlier than this many seconds from now.
    #[arg(long = "delay", value_name = "SECONDS")]
    delay_seconds: Option<f64>,
    /// A tag, for `task list --tag`. Repeatable.
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// The sandbox session to run in [default: a fresh one].
    #[arg(long = "session", value_name = "SESSION")]
    session_id: Option<String>,
    /// A key that makes submitting twice return the first task.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Wait for the task as `task wait` does, and exit with its outcome.
    #[arg(long)]
    wait: bool,
    /// The command of a `command` task: one argument is a shell line (run with /bin/sh -c),
    /// several are a program and its arguments.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// `msbd task list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only tasks in this status: pending, scheduled, running, paused, completed, failed,
    /// timeout, cancelled, active, finished or all.
    #[arg(long, value_name = "STATUS")]
    status: Option<String>,
    /// Only tasks of this type.
    #[arg(long = "type", value_name = "TYPE")]
    task_type: Option<String>,
    /// Only tasks with this tag.
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,
    /// Only tasks submitted to this session.
    #[arg(long = "session", value_name = "SESSION")]
    session_id: Option<String>,
    /// The most tasks to list (1 to 500) [default: 20].
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
    /// The next page: the cursor the previous page printed.
    #[arg(long, value_name = "CURSOR")]
    cursor: Option<String>,
}

/// A command that takes one task id.
#[derive(Debug, Args)]
pub struct IdArgs {
    /// The task's id.
    #[arg(value_name = "ID")]
    id: String,
}

/// `msbd task logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The task's id.
    #[arg(value_name = "ID")]
    id: String,
    /// Follow the output as it is written, until the task ends.
    #[arg(short, long)]
    follow: bool,
    /// Which output.
    #[arg(long, value_enum, default_value_t = Stream::Combined)]
    stream: Stream,
}

/// The streams `read_task_output` reads.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum Stream {
    /// stdout and stderr interleaved as they were written.
    Combined,
    /// stdout alone.
    Stdout,
    /// stderr alone.
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Combined => "combined",
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// `msbd task wait`.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// The tasks' ids.
    #[arg(value_name = "ID", required = true)]
    ids: Vec<String>,
    /// Give up after this many seconds (exit code 6) [default: wait as long as it takes].
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
}

/// Runs a task command.
pub(super) async fn run(context: &Context, command: TaskCommand) -> Exit {
    let client = match context.connect().await {
        Ok(client) => client,
        Err(exit) => return exit,
    };
    let exit = match command {
        TaskCommand::Submit(args) => submit(context, &client, args).await,
        TaskCommand::List(args) => list(context, &client, &args).await,
        TaskCommand::Show(args) => show(context, &client, &args.id).await,
        TaskCommand::Logs(args) => logs(context, &client, &args).await,
        TaskCommand::Wait(args) => wait(context, &client, &args.ids, args.timeout).await,
        TaskCommand::Cancel(args) => cancel(context, &client, &args.id).await,
        TaskCommand::Retry(args) => retry(context, &client, &args.id).await,
    };
    client.close().await;
    exit
}

/// Calls a tool; on failure, prints why and gives the exit code.
async fn call(
    context: &Context,
    client: &ToolClient,
    tool: &str,
    arguments: Value,
) -> Result<Value, Exit> {
    client
        .call(tool, arguments)
        .await
        .map_err(|error| context.report(&error))
}

/// The arguments of `submit_task` that `args` give, or a usage error.
fn submit_arguments(args: &SubmitArgs) -> Result<Value, String> {
    let mut params = match &args.params {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(other) => return Err(format!("--params must be a JSON object, not {other}")),
            Err(error) => return Err(format!("--params is not valid JSON: {error}")),
        },
    };
    for entry in &args.param {
        let (key, value) = if let Some((key, json)) = entry.split_once(":=") {
            let value = serde_json::from_str::<Value>(json).map_err(|error| {
                format!("--param {entry}: the value after := is not valid JSON: {error}")
            })?;
            (key, value)
        } else if let Some((key, value)) = entry.split_once('=') {
            (key, Value::String(value.to_owned()))
        } else {
            return Err(format!(
                "--param {entry}: give KEY=VALUE (a string) or KEY:=JSON"
            ));
        };
        if key.is_empty() {
            return Err(format!("--param {entry}: the key is empty"));
        }
        params.insert(key.to_owned(), value);
    }
    let task_type = args.task_type.as_deref().unwrap_or("command");
    if !args.command.is_empty() {
        if task_type != "command" {
            return Err(format!(
                "a command after `--` makes a `command` task, but --type is {task_type}"
            ));
        }
        if params.contains_key("command") || params.contains_key("argv") {
            return Err(
                "give the command either after `--` or as a parameter (command, argv), not both"
                    .to_owned(),
            );
        }
        if let [line] = args.command.as_slice() {
            params.insert("command".to_owned(), Value::String(line.clone()));
        } else {
            params.insert("argv".to_owned(), json!(args.command));
        }
    } else if task_type == "command"
        && !params.contains_key("command")
        && !params.contains_key("argv")
    {
        return Err(
            "nothing to run: give the command after `--` (msbd task submit -- make test), or --param command=... / --type for another task type"
                .to_owned(),
        );
    }
    let mut arguments = json!({"task_type": task_type, "params": params});
    let object = arguments.as_object_mut().expect("an object");
    if let Some(priority) = &args.priority {
        let value = priority
            .parse::<u8>()
            .map_or_else(|_| json!(priority), |number| json!(number));
        object.insert("priority".to_owned(), value);
    }
    if let Some(seconds) = args.timeout_seconds {
        object.insert("timeout_seconds".to_owned(), json!(seconds));
    }
    if let Some(retries) = args.max_retries {
        object.insert("max_retries".to_owned(), json!(retries));
    }
    if let Some(seconds) = args.delay_seconds {
        object.insert("delay_seconds".to_owned(), json!(seconds));
    }
    if !args.tags.is_empty() {
        object.insert("tags".to_owned(), json!(args.tags));
    }
    if let Some(session) = &args.session_id {
        object.insert("session_id".to_owned(), json!(session));
    }
    if let Some(key) = &args.idempotency_key {
        object.insert("idempotency_key".to_owned(), json!(key));
    }
    Ok(arguments)
}

/// `task submit`: prints the id (with `--json`, the answer); with `--wait`, then waits.
async fn submit(context: &Context, client: &ToolClient, args: SubmitArgs) -> Exit {
    let arguments = match submit_arguments(&args) {
        Ok(arguments) => arguments,
        Err(problem) => return usage(&problem),
    };
    let answer = match call(context, client, "submit_task", arguments).await {
        Ok(answer) => answer,
        Err(exit) => return exit,
    };
    let id = text(&answer, "task_id").to_owned();
    if args.wait {
        if !context.out.json {
            println!("{id}");
        }
        return wait(context, client, &[id], None).await;
    }
    if context.out.json {
        print_json(&answer);
    } else {
        println!("{id}");
        if answer["deduplicated"] == true {
            eprintln!(
                "msbd: a task with this idempotency key existed already ({}); nothing new was submitted",
                text(&answer, "status")
            );
        }
    }
    Exit::Success
}

/// `task list`: a table of the tasks (with `--json`, the answer of `list_tasks`).
async fn list(context: &Context, client: &ToolClient, args: &ListArgs) -> Exit {
    let mut arguments = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(value) = value {
            arguments.insert(key.to_owned(), value);
        }
    };
    put("status", args.status.as_ref().map(|s| json!(s)));
    put("task_type", args.task_type.as_ref().map(|s| json!(s)));
    put("tag", args.tag.as_ref().map(|s| json!(s)));
    put("session_id", args.session_id.as_ref().map(|s| json!(s)));
    put("limit", args.limit.map(|n| json!(n)));
    put("cursor", args.cursor.as_ref().map(|s| json!(s)));
    let answer = match call(context, client, "list_tasks", Value::Object(arguments)).await {
        Ok(answer) => answer,
        Err(exit) => return exit,
    };
    if context.out.json {
        print_json(&answer);
        return Exit::Success;
    }
    let tasks = answer["tasks"].as_array().cloned().unwrap_or_default();
    if tasks.is_empty() {
        println!("No tasks.");
    } else {
        let mut table = Table::new(vec![
            Column::fixed("ID"),
            Column::shrinkable("TYPE"),
            Column::fixed("STATUS"),
            Column::fixed("DONE"),
            Column::shrinkable("CREATED"),
            Column::shrinkable("MESSAGE"),
        ]);
        for task in &tasks {
            let status = text(task, "status");
            let message = if task.get("error").is_some_and(|e| !e.is_null()) {
                one_line(text(task, "error"))
            } else {
                text(task, "progress_message").to_owned()
            };
            table.row(vec![
                (text(task, "task_id").to_owned(), None),
                (text(task, "task_type").to_owned(), None),
                (status.to_owned(), Some(context.out.status(status))),
                (percent(task), None),
                (text(task, "created_at").to_owned(), None),
                (message, None),
            ]);
        }
        print!("{}", table.render(context.out.width));
    }
    if let Some(cursor) = answer["next_cursor"].as_str() {
        eprintln!("More tasks: msbd task list --cursor {cursor}");
    }
    Exit::Success
}

/// A text on one line (an error's lines joined by spaces).
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A task's progress as `40%`.
fn percent(task: &Value) -> String {
    task["progress"]
        .as_f64()
        .map_or_else(String::new, |p| format!("{}%", p.round() as i64))
}

/// `task show`: the status and, once finished, the result.
async fn show(context: &Context, client: &ToolClient, id: &str) -> Exit {
    let mut view = match call(context, client, "check_task_status", json!({"task_id": id})).await {
        Ok(view) => view,
        Err(exit) => return exit,
    };
    let status = text(&view, "status").to_owned();
    if is_final(&status) {
        match call(context, client, "get_task_result", json!({"task_id": id})).await {
            Ok(result) => {
                if let Some(value) = result.get("result").filter(|r| !r.is_null()) {
                    view["result"] = value.clone();
                }
            }
            Err(exit) => return exit,
        }
    }
    if context.out.json {
        print_json(&view);
    } else {
        print!("{}", show_text(&context.out, &view));
    }
    Exit::Success
}

/// The readable layout of a task (`check_task_status`'s answer, with `result` when finished).
fn show_text(out: &Output, view: &Value) -> String {
    let mut lines: Vec<(&str, String)> = Vec::new();
    let status = text(view, "status");
    lines.push(("task", text(view, "task_id").to_owned()));
    lines.push(("type", text(view, "task_type").to_owned()));
    let mut status_line = out.status(status);
    if let Some(progress) = view["progress"].as_f64() {
        status_line.push_str(&format!(", {}% done", progress.round() as i64));
    }
    if !is_final(status)
        && let Some(eta) = view["eta_seconds"].as_f64()
    {
        status_line.push_str(&format!(", about {} left", seconds_text(eta)));
    }
    if view["cancel_requested"] == true {
        status_line.push_str(" (being cancelled)");
    }
    lines.push(("status", status_line));
    if let Some(message) = view["progress_message"].as_str() {
        lines.push(("progress", message.to_owned()));
    }
    if let Some(priority) = view["priority"].as_u64() {
        lines.push(("priority", priority.to_string()));
    }
    if let Some(attempt) = view["attempt"].as_u64() {
        let mut line = format!("{attempt} of {}", view["max_attempts"]);
        if let Some(interrupted) = view["interrupted_attempts"].as_u64() {
            line.push_str(&format!(" ({interrupted} interrupted by msbd going away)"));
        }
        lines.push(("attempt", line));
    }
    if let Some(attempts) = view["attempts"].as_array().filter(|a| !a.is_empty()) {
        let outcomes: Vec<String> = attempts
            .iter()
            .map(|a| format!("#{} {}", a["attempt"], text(a, "outcome")))
            .collect();
        lines.push(("attempts", outcomes.join(", ")));
    }
    for (label, key) in [
        ("session", "session_id"),
        ("created", "created_at"),
        ("run at", "run_at"),
        ("started", "started_at"),
        ("finished", "completed_at"),
    ] {
        if let Some(value) = view[key].as_str() {
            lines.push((label, value.to_owned()));
        }
    }
    if let Some(tags) = view["tags"].as_array().filter(|t| !t.is_empty()) {
        let tags: Vec<&str> = tags.iter().filter_map(Value::as_str).collect();
        lines.push(("tags", tags.join(", ")));
    }
    if let Some(error) = view["error"].as_str() {
        lines.push(("error", out.paint(error, "31")));
    }
    if let Some(failure) = view.get("failure").filter(|f| f.is_object()) {
        lines.push(("failure", run_summary(failure)));
    }
    let mut output_tail = None;
    if let Some(result) = view.get("result").filter(|r| !r.is_null()) {
        if result.get("exit_code").is_some() || result.get("reason").is_some() {
            lines.push(("result", run_summary(result)));
            output_tail = result["output_tail"].as_str().filter(|t| !t.is_empty());
        } else {
            let pretty = serde_json::to_string_pretty(result).unwrap_or_default();
            lines.push(("result", pretty.replace('\n', "\n            ")));
        }
    }
    let mut shown = String::new();
    for (label, value) in lines {
        shown.push_str(&format!("{label:<11} {value}\n"));
    }
    if let Some(tail) = output_tail {
        shown.push_str("output (its end):\n");
        for line in tail.lines() {
            shown.push_str(&format!("  {line}\n"));
        }
    }
    shown
}

/// How a process ran: `exit code 0 after 12 ms, 64 bytes of output`.
fn run_summary(run: &Value) -> String {
    let mut parts = Vec::new();
    match (run["exit_code"].as_i64(), run["signal"].as_i64()) {
        (Some(code), _) => parts.push(format!("exit code {code}")),
        (None, Some(signal)) => parts.push(format!("killed by signal {signal}")),
        (None, None) => {}
    }
    if let Some(reason) = run["reason"].as_str().filter(|r| *r != "exited") {
        parts.push(reason.to_owned());
    }
    if let Some(ms) = run["duration_ms"].as_u64() {
        parts.push(format!("after {ms} ms"));
    }
    if let Some(bytes) = run["output_bytes"].as_u64() {
        parts.push(format!("{bytes} bytes of output"));
    }
    if let Some(stderr) = run["stderr_tail"].as_str().filter(|s| !s.is_empty()) {
        parts.push(format!("stderr ends with: {}", stderr.trim_end()));
    }
    parts.join(", ")
}

/// How long `logs -f` waits before asking again when there was nothing new.
const FOLLOW_PAUSE: Duration = Duration::from_millis(200);

/// `task logs`: what output there is, or (`-f`) everything until the task ends. With
/// `--json`, each answer of `read_task_output` as one JSON line.
async fn logs(context: &Context, client: &ToolClient, args: &LogsArgs) -> Exit {
    let mut cursor: u64 = 0;
    let mut attempt: Option<u64> = None;
    let mut stdout = std::io::stdout().lock();
    loop {
        let chunk = match call(
            context,
            client,
            "read_task_output",
            json!({"task_id": args.id, "cursor": cursor, "stream": args.stream.as_str()}),
        )
        .await
        {
            Ok(chunk) => chunk,
            Err(exit) => return exit,
        };
        let this_attempt = chunk["attempt"].as_u64().unwrap_or(0);
        if let Some(previous) = attempt
            && this_attempt > previous
        {
            // A new attempt: its output is read from its start.
            eprintln!("msbd: attempt {this_attempt} started; its output follows");
            attempt = Some(this_attempt);
            cursor = 0;
            continue;
        }
        attempt = Some(this_attempt);
        let data = text(&chunk, "data");
        let wrote = if context.out.json {
            !data.is_empty() && writeln!(stdout, "{chunk}").is_ok()
        } else {
            !data.is_empty() && stdout.write_all(data.as_bytes()).is_ok()
        };
        if stdout.flush().is_err() {
            // The reader went away (a closed pipe): nothing more to do.
            return Exit::Success;
        }
        let next = chunk["next_cursor"].as_u64().unwrap_or(cursor);
        let size = chunk["size"].as_u64().unwrap_or(next);
        cursor = next;
        if chunk["complete"] == true {
            return Exit::Success;
        }
        if next < size {
            continue;
        }
        if !args.follow {
            return Exit::Success;
        }
        if !wrote {
            tokio::time::sleep(FOLLOW_PAUSE).await;
        }
    }
}

/// The longest `wait` lets `wait_for_tasks` wait before looking at the tasks again (to move
/// the bars); it answers earlier when a task finishes.
const WAIT_ROUND: f64 = 0.5;

/// What `wait` shows of one task.
struct Watched {
    id: String,
    /// The status last shown.
    status: String,
    /// Its bar, on a terminal.
    bar: Option<ProgressBar>,
    /// The answer of `check_task_status` last seen.
    view: Value,
}

/// `task wait`: until every task has finished or `timeout` runs out. On a terminal, a
/// progress bar per task on stderr and a line per task at the end; otherwise a line per
/// status change; with `--json`, only the final answer of `wait_for_tasks`.
async fn wait(
    context: &Context,
    client: &ToolClient,
    ids: &[String],
    timeout: Option<f64>,
) -> Exit {
    let deadline =
        timeout.map(|seconds| Instant::now() + Duration::from_secs_f64(seconds.max(0.0)));
    let mut unique: Vec<String> = Vec::new();
    for id in ids {
        if !unique.contains(id) {
            unique.push(id.clone());
        }
    }
    let bars_width = console::Term::stderr()
        .size_checked()
        .map_or(80, |(_, columns)| usize::from(columns));
    let bars = (!context.out.json && context.out.stderr_terminal)
        .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    let style = ProgressStyle::with_template("{prefix} [{bar:24}] {pos:>3}% {wide_msg}")
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    let mut watched: Vec<Watched> = unique
        .iter()
        .map(|id| Watched {
            id: id.clone(),
            status: String::new(),
            bar: bars.as_ref().map(|bars| {
                let bar = bars.add(ProgressBar::new(100));
                bar.set_style(style.clone());
                bar.set_prefix(bar_name(id, bars_width));
                bar
            }),
            view: Value::Null,
        })
        .collect();
    let timed_out = loop {
        for task in watched.iter_mut().filter(|t| !is_final(&t.status)) {
            let view = match call(
                context,
                client,
                "check_task_status",
                json!({"task_id": task.id}),
            )
            .await
            {
                Ok(view) => view,
                Err(exit) => {
                    abandon_bars(&watched);
                    return exit;
                }
            };
            show_change(&context.out, task, view);
        }
        let going: Vec<&str> = watched
            .iter()
            .filter(|t| !is_final(&t.status))
            .map(|t| t.id.as_str())
            .collect();
        if going.is_empty() {
            break false;
        }
        let mut round = WAIT_ROUND;
        if let Some(deadline) = deadline {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs_f64();
            if left <= 0.0 {
                break true;
            }
            round = round.min(left);
        }
        if let Err(exit) = call(
            context,
            client,
            "wait_for_tasks",
            json!({"task_ids": going, "mode": "any", "timeout": round}),
        )
        .await
        {
            abandon_bars(&watched);
            return exit;
        }
    };
    abandon_bars(&watched);
    let all_completed = watched.iter().all(|t| t.status == "completed");
    if context.out.json {
        let answer = call(
            context,
            client,
            "wait_for_tasks",
            json!({"task_ids": unique, "mode": "all", "timeout": 0}),
        )
        .await;
        match answer {
            Ok(answer) => print_json(&answer),
            Err(exit) => return exit,
        }
    } else if bars.is_some() {
        // The bars were on stderr: the outcome goes to stdout too.
        for task in &watched {
            println!("{}", status_line(&context.out, task));
        }
    }
    if timed_out {
        if !context.out.json {
            let going = watched.iter().filter(|t| !is_final(&t.status)).count();
            eprintln!(
                "msbd: --timeout ran out with {going} of {} task(s) still going",
                watched.len()
            );
        }
        Exit::TimedOut
    } else if all_completed {
        Exit::Success
    } else {
        Exit::NotCompleted
    }
}

/// The width from which a bar shows the whole task id.
const WHOLE_ID_WIDTH: usize = 110;

/// The name of a task's bar: its id, or on a narrow terminal (under [`WHOLE_ID_WIDTH`]) its
/// last 12 characters (a UUIDv7's random end; the outcome lines have the whole id), so that
/// the message keeps room.
fn bar_name(id: &str, width: usize) -> String {
    let count = id.chars().count();
    if width >= WHOLE_ID_WIDTH || count <= 13 {
        id.to_owned()
    } else {
        let end: String = id.chars().skip(count - 12).collect();
        format!("…{end}")
    }
}

/// Shows what changed of a task: its bar, or a line when its status changed.
fn show_change(out: &Output, task: &mut Watched, view: Value) {
    let status = text(&view, "status").to_owned();
    let changed = status != task.status;
    task.status = status;
    task.view = view;
    if let Some(bar) = &task.bar {
        let progress = task.view["progress"].as_f64().unwrap_or(0.0);
        bar.set_position(progress.clamp(0.0, 100.0).round() as u64);
        let mut message = task.status.clone();
        if let Some(detail) = task.view["progress_message"].as_str() {
            message.push_str(&format!(" · {detail}"));
        }
        if !is_final(&task.status)
            && let Some(eta) = task.view["eta_seconds"].as_f64()
        {
            message.push_str(&format!(" · ETA {}", seconds_text(eta)));
        }
        if let Some(error) = task.view["error"]
            .as_str()
            .filter(|_| is_final(&task.status))
        {
            message.push_str(&format!(" · {}", one_line(error)));
        }
        if is_final(&task.status) {
            bar.finish_with_message(message);
        } else {
            bar.set_message(message);
        }
    } else if changed && !out.json {
        println!("{}", status_line(out, task));
    }
}

/// `ID: status` (`ID: failed: why`).
fn status_line(out: &Output, task: &Watched) -> String {
    let mut line = format!("{}: {}", task.id, out.status(&task.status));
    if is_final(&task.status)
        && task.status != "completed"
        && let Some(error) = task.view["error"].as_str()
    {
        line.push_str(&format!(": {}", one_line(error)));
    }
    line
}

/// Leaves every bar as it stands (the terminal keeps them), and ends the line of the last one:
/// the cursor is still at its end, and what is printed next needs a line of its own.
fn abandon_bars(watched: &[Watched]) {
    let mut any = false;
    for bar in watched.iter().filter_map(|t| t.bar.as_ref()) {
        any = true;
        if !bar.is_finished() {
            bar.abandon();
        }
    }
    if any {
        eprintln!();
    }
}

/// `task cancel`.
async fn cancel(context: &Context, client: &ToolClient, id: &str) -> Exit {
    match call(context, client, "cancel_task", json!({"task_id": id})).await {
        Ok(answer) if context.out.json => print_json(&answer),
        Ok(answer) => println!("{}", text(&answer, "message")),
        Err(exit) => return exit,
    }
    Exit::Success
}

/// `task retry`: prints the new task's id (its message on stderr).
async fn retry(context: &Context, client: &ToolClient, id: &str) -> Exit {
    let answer = match call(
        context,
        client,
        "manage_background_tasks",
        json!({"action": "retry", "task_id": id}),
    )
    .await
    {
        Ok(answer) => answer,
        Err(exit) => return exit,
    };
    if context.out.json {
        print_json(&answer);
    } else {
        println!("{}", text(&answer, "task_id"));
        eprintln!("{}", text(&answer, "message"));
    }
    Exit::Success
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use serde_json::json;

    use super::{SubmitArgs, submit_arguments};

    /// `msbd task submit ARGS`, parsed.
    #[derive(clap::Parser)]
    struct Submit {
        #[command(flatten)]
        args: SubmitArgs,
    }

    fn arguments(args: &[&str]) -> Result<serde_json::Value, String> {
        let parsed = Submit::try_parse_from(std::iter::once("submit").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        submit_arguments(&parsed.args)
    }

    #[test]
    fn bars_name_tasks_by_their_ids_end_on_a_narrow_terminal() {
        let id = "01a24db7-f5e6-7000-bd9a-de69e8197b33";
        assert_eq!(super::bar_name(id, 120), id);
        assert_eq!(super::bar_name(id, 80), "…de69e8197b33");
        assert_eq!(super::bar_name("short", 80), "short");
    }

    #[test]
    fn a_command_after_the_dashes_is_a_shell_line_or_an_argv() {
        assert_eq!(
            arguments(&["--", "echo hi; sleep 1"]).unwrap(),
            json!({"task_type": "command", "params": {"command": "echo hi; sleep 1"}})
        );
        assert_eq!(
            arguments(&["--tag", "a", "--priority", "high", "--", "ls", "-l"]).unwrap(),
            json!({"task_type": "command", "params": {"argv": ["ls", "-l"]}, "tags": ["a"], "priority": "high"})
        );
        assert_eq!(
            arguments(&["--priority", "7", "--timeout", "5", "--", "true"]).unwrap(),
            json!({"task_type": "command", "params": {"command": "true"}, "priority": 7, "timeout_seconds": 5.0})
        );
    }

    #[test]
    fn params_come_from_json_and_key_value_pairs() {
        assert_eq!(
            arguments(&[
                "--type",
                "code",
                "--params",
                r#"{"language": "python"}"#,
                "-p",
                "code=print(1)",
                "-p",
                "timeout_seconds:=3",
            ])
            .unwrap(),
            json!({"task_type": "code", "params": {"language": "python", "code": "print(1)", "timeout_seconds": 3}})
        );
        assert!(arguments(&[]).unwrap_err().contains("nothing to run"));
        assert!(
            arguments(&["-p", "novalue"])
                .unwrap_err()
                .contains("KEY=VALUE")
        );
        assert!(arguments(&["-p", "a:=nope"]).unwrap_err().contains("JSON"));
        assert!(
            arguments(&["--params", "[1]"])
                .unwrap_err()
                .contains("object")
        );
        assert!(
            arguments(&["--type", "code", "--", "ls"])
                .unwrap_err()
                .contains("--type is code")
        );
        assert!(
            arguments(&["-p", "command=ls", "--", "ls"])
                .unwrap_err()
                .contains("not both")
        );
    }
}
