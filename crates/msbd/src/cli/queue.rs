//! `msbd queue stats|pause|resume`: the tool `manage_task_queue` (actions `get_stats`,
//! `pause`, `resume`).

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{Context, Exit, Output, print_json, text};

/// The queue commands.
#[derive(Debug, Subcommand)]
pub enum QueueCommand {
    /// Queue statistics: waiting, running and finished tasks, limits, whether it is paused.
    Stats,
    /// Stop starting queued tasks (running ones go on) until `queue resume` or a restart.
    Pause(TypeArgs),
    /// Start queued tasks again.
    Resume(TypeArgs),
}

/// Pausing or resuming one task type only.
#[derive(Debug, Args)]
pub struct TypeArgs {
    /// Only this task type [default: the whole queue].
    #[arg(long = "type", value_name = "TYPE")]
    task_type: Option<String>,
}

/// Runs a queue command.
pub(super) async fn run(context: &Context, command: QueueCommand) -> Exit {
    let client = match context.connect().await {
        Ok(client) => client,
        Err(exit) => return exit,
    };
    let arguments = match &command {
        QueueCommand::Stats => json!({"action": "get_stats"}),
        QueueCommand::Pause(args) | QueueCommand::Resume(args) => {
            let action = if matches!(command, QueueCommand::Pause(_)) {
                "pause"
            } else {
                "resume"
            };
            match &args.task_type {
                Some(task_type) => json!({"action": action, "task_type": task_type}),
                None => json!({"action": action}),
            }
        }
    };
    let answer = client.call("manage_task_queue", arguments).await;
    client.close().await;
    let answer = match answer {
        Ok(answer) => answer,
        Err(error) => return context.report(&error),
    };
    if context.out.json {
        print_json(&answer);
    } else if matches!(command, QueueCommand::Stats) {
        print!("{}", stats_text(&context.out, &answer["queue_statistics"]));
    } else {
        println!("{}", text(&answer, "message"));
    }
    Exit::Success
}

/// The readable layout of `queue_statistics`.
fn stats_text(out: &Output, stats: &Value) -> String {
    let count = |key: &str| stats[key].as_u64().unwrap_or(0);
    let mut lines = Vec::new();
    let paused_types: Vec<&str> = stats["paused_types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let state = if stats["queue_paused"] == true {
        out.paint("paused", "33")
    } else if !paused_types.is_empty() {
        format!("running (paused types: {})", paused_types.join(", "))
    } else {
        out.paint("running", "32")
    };
    lines.push(format!("queue        {state}"));
    let by_priority = join_counts(&stats["by_priority"]);
    let mut queued = count("total_queued").to_string();
    if !by_priority.is_empty() {
        queued.push_str(&format!(" ({by_priority})"));
    }
    lines.push(format!("queued       {queued}"));
    lines.push(format!("running      {}", count("running_tasks")));
    lines.push(format!("paused       {}", count("paused_tasks")));
    lines.push(format!("at once      at most {}", count("max_concurrent")));
    lines.push(format!(
        "finished     {} completed, {} failed, {} cancelled (of {} created)",
        count("total_tasks_completed"),
        count("total_tasks_failed"),
        count("total_tasks_cancelled"),
        count("total_tasks_created"),
    ));
    if let Some(by_type) = stats["by_type"].as_object().filter(|t| !t.is_empty()) {
        lines.push("by type".to_owned());
        for (task_type, statuses) in by_type {
            lines.push(format!("  {task_type:<10} {}", join_counts(statuses)));
        }
    }
    lines.iter().map(|line| format!("{line}\n")).collect()
}

/// `{"low": 1, "normal": 2}` as `low 1, normal 2`.
fn join_counts(counts: &Value) -> String {
    counts
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, n)| format!("{name} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
