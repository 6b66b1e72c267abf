//! What the run submits: each task's kind, tool and arguments, drawn from the seed, and the
//! operator-defined task types it uses.

use std::time::Duration;

use serde_json::{Value, json};

use crate::rng::Rng;

/// The kinds of task the run submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// The `noop` type: `true`.
    Noop,
    /// The `note` type: appends one line to the side-effect log.
    Note,
    /// The `flaky` type: logs, fails its first attempt, succeeds after (submitted with retries).
    Flaky,
    /// A `command` task: `echo`.
    Echo,
    /// A `command` task that sleeps a little (so that kills find tasks running).
    Sleep,
    /// A `command` task that fails (exit code 3), sometimes with a retry.
    Fail,
    /// A `noop` task with a delay (scheduled first).
    Delayed,
    /// `execute_command`: a command whose answer waits for its end (no idempotency key, so a
    /// call whose answer is lost is made again, and the first task is nobody's to follow).
    Exec,
}

impl Kind {
    /// The kind's name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Noop => "noop",
            Kind::Note => "note",
            Kind::Flaky => "flaky",
            Kind::Echo => "echo",
            Kind::Sleep => "sleep",
            Kind::Fail => "fail",
            Kind::Delayed => "delayed",
            Kind::Exec => "exec",
        }
    }

    /// Whether the task leaves lines in the side-effect log.
    pub(crate) fn logs(self) -> bool {
        matches!(self, Kind::Note | Kind::Flaky)
    }
}

/// One task of the run.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    /// What it is.
    pub(crate) kind: Kind,
    /// The tool that submits it.
    pub(crate) tool: &'static str,
    /// The tool's arguments.
    pub(crate) args: Value,
    /// Its idempotency key (also its key in the side-effect log).
    pub(crate) key: String,
    /// When to cancel it, after it was accepted.
    pub(crate) cancel_after: Option<Duration>,
    /// When to pause it, after it was accepted, and how long to leave it paused.
    pub(crate) pause: Option<(Duration, Duration)>,
}

/// The stream of the plan's random numbers.
const PLAN_STREAM: u64 = 1;

/// The plan of task `index` of a run with `seed`.
pub(crate) fn plan(seed: u64, index: u64) -> Plan {
    let mut rng = Rng::for_item(seed, PLAN_STREAM, index);
    let key = format!("c{seed:x}-{index}");
    let roll = rng.below(100);
    let kind = match roll {
        0..30 => Kind::Noop,
        30..45 => Kind::Note,
        45..57 => Kind::Flaky,
        57..77 => Kind::Echo,
        77..85 => Kind::Sleep,
        85..92 => Kind::Fail,
        92..95 => Kind::Exec,
        _ => Kind::Delayed,
    };
    let (task_type, params, retries, delay) = match kind {
        Kind::Noop => ("noop", json!({}), rng.below(3), None),
        Kind::Note => ("note", json!({"key": key}), rng.below(2), None),
        Kind::Flaky => ("flaky", json!({"key": key}), rng.between(2, 3), None),
        Kind::Echo => (
            "command",
            json!({"command": format!("echo chaos {index}")}),
            rng.below(2),
            None,
        ),
        Kind::Sleep => (
            "command",
            json!({"command": format!("sleep {}.{}", rng.below(2), rng.between(2, 9))}),
            rng.below(2),
            None,
        ),
        Kind::Fail => (
            "command",
            json!({"command": "echo failing on purpose; exit 3"}),
            rng.below(2),
            None,
        ),
        Kind::Delayed => (
            "noop",
            json!({}),
            rng.below(2),
            Some(0.2 + rng.unit() * 1.3),
        ),
        Kind::Exec => {
            let args = json!({"command": format!("echo exec {index}"), "timeout": 60});
            return Plan {
                kind,
                tool: "execute_command",
                args,
                key,
                cancel_after: None,
                pause: None,
            };
        }
    };
    let priority = rng.below(10);
    // Some commands share a few named sessions (the others get a fresh one each).
    let session =
        (kind == Kind::Echo && rng.chance(0.25)).then(|| format!("chaos-shared-{}", rng.below(3)));
    let cancel_after = if rng.chance(match kind {
        Kind::Sleep => 0.5,
        Kind::Delayed => 0.2,
        _ => 0.03,
    }) {
        Some(Duration::from_millis(rng.below(1_500)))
    } else {
        None
    };
    // Some get paused (a running one is frozen) and resumed a little later.
    let pause = (matches!(kind, Kind::Sleep | Kind::Noop) && rng.chance(0.2)).then(|| {
        (
            Duration::from_millis(rng.below(800)),
            Duration::from_millis(rng.between(100, 1_500)),
        )
    });
    let tool_roll = rng.below(100);
    let (tool, args) = if tool_roll < 5 {
        let mut config = json!({
            "idempotency_key": key,
            "max_retries": retries,
            "timeout_seconds": 60,
        });
        if let Some(delay) = delay {
            config["delay_seconds"] = json!(delay);
        }
        if let Some(session) = &session {
            config["session_id"] = json!(session);
        }
        (
            "manage_background_tasks",
            json!({
                "action": "create",
                "task_type": task_type,
                "parameters": params,
                "priority": priority,
                "task_config": config,
            }),
        )
    } else {
        let tool = if tool_roll < 50 {
            "create_background_task"
        } else {
            "submit_task"
        };
        let mut args = json!({
            "task_type": task_type,
            "params": params,
            "priority": priority,
            "max_retries": retries,
            "timeout_seconds": 60,
            "idempotency_key": key,
            "tags": ["chaos", kind.name()],
        });
        if let Some(delay) = delay {
            args["delay_seconds"] = json!(delay);
        }
        if let Some(session) = &session {
            args["session_id"] = json!(session);
        }
        (tool, args)
    };
    Plan {
        kind,
        tool,
        args,
        key,
        cancel_after,
        pause,
    }
}

/// The operator-defined task types of the run (`MSB_TASK_TYPES_FILE`). The side-effect log is
/// the volume mapped at `/effects`: `log` (one line per run of a `note` or `flaky` task:
/// `run <key> <nanoseconds since the epoch>`) and `m/` (the markers of `flaky` tasks).
pub(crate) const TASK_TYPES: &str = r#"# Written by msbd-chaos.
[[task_type]]
name = "noop"
description = "chaos: does nothing"
command = ["true"]
timeout_seconds = 60

[[task_type]]
name = "note"
description = "chaos: appends a line to the side-effect log"
command = ["/bin/sh", "-c", "echo \"run $1 $(date +%s%N)\" >> /effects/log", "note", "{key}"]
timeout_seconds = 60

[task_type.params_schema]
type = "object"
required = ["key"]
additionalProperties = false
properties.key = { type = "string", pattern = "^[a-z0-9-]{1,64}$" }

[[task_type]]
name = "flaky"
description = "chaos: logs, fails its first attempt, then succeeds"
command = ["/bin/sh", "-c", "echo \"run $1 $(date +%s%N)\" >> /effects/log; if [ -e \"/effects/m/$1\" ]; then exit 0; fi; : > \"/effects/m/$1\"; exit 1", "flaky", "{key}"]
timeout_seconds = 60
max_retries = 2

[task_type.params_schema]
type = "object"
required = ["key"]
additionalProperties = false
properties.key = { type = "string", pattern = "^[a-z0-9-]{1,64}$" }
"#;

#[cfg(test)]
mod tests {
    use super::{Kind, plan};

    #[test]
    fn plans_are_reproducible_and_varied() {
        let a: Vec<String> = (0..200).map(|i| plan(9, i).args.to_string()).collect();
        let b: Vec<String> = (0..200).map(|i| plan(9, i).args.to_string()).collect();
        assert_eq!(a, b);
        for kind in [
            Kind::Noop,
            Kind::Note,
            Kind::Flaky,
            Kind::Echo,
            Kind::Sleep,
            Kind::Fail,
            Kind::Delayed,
            Kind::Exec,
        ] {
            assert!(
                (0..400).any(|i| plan(9, i).kind == kind),
                "{kind:?} never drawn"
            );
        }
        assert!((0..400).any(|i| plan(9, i).cancel_after.is_some()));
        assert!((0..400).any(|i| plan(9, i).pause.is_some()));
    }
}
