//! `cargo xtask fuzz`: run the cargo-fuzz targets in `fuzz/` (see `docs/fuzzing.md`).
//!
//! `cargo xtask fuzz [--seconds N | --runs N] [TARGET...]` builds the targets once, then runs
//! each one named (default: all of [`TARGETS`]) for `N` seconds (default 60) or `N`
//! executions, with `cargo fuzz run --sanitizer none TARGET`: optimised, with debug
//! assertions and overflow checks (cargo-fuzz's default; `--release` would turn them off). It
//! needs no nightly toolchain (no sanitizer) and installs nothing: without cargo-fuzz it says
//! to run `cargo install cargo-fuzz --locked`.
//!
//! Each target reads its corpus, `fuzz/corpus/TARGET/` (kept by the machine, not committed;
//! new inputs are saved there), and its committed seeds, `fuzz/seeds/TARGET/`, when there are
//! any. A crash (a panic or a failed assertion) is saved in `fuzz/artifacts/TARGET/` and fails
//! the command, after the other targets have run; `docs/fuzzing.md` says how to replay and
//! minimise it. Every target runs even when one fails, and the summary names the failures.
//!
//! [`ci_smoke`] is the short run of every target that `cargo xtask ci` does, built unoptimized
//! (`--dev`) to save the optimized build's minutes.

use std::fs;
use std::path::Path;

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

use crate::{print_step_header, project_root};

/// One fuzz target (a `[[bin]]` of `fuzz/Cargo.toml`).
struct Target {
    name: &'static str,
    /// libFuzzer's `-max_len` when its default (4096 bytes) is too short to reach a limit the
    /// target checks.
    max_len: Option<usize>,
}

/// Every fuzz target, in the order they run. Add new ones here and in `fuzz/Cargo.toml`.
const TARGETS: &[Target] = &[
    // mcp-tools: a tools/call's `arguments` decoded as each tool's argument struct.
    Target {
        name: "tool_args",
        max_len: None,
    },
    // msbd: the stdio framing (`LimitedLines`); lines past its 4096-byte id window.
    Target {
        name: "stdio_framing",
        max_len: Some(16_384),
    },
    // sandbox-wrapper: the task types TOML file.
    Target {
        name: "task_types_toml",
        max_len: None,
    },
    // msbd: the `MSB_*` configuration.
    Target {
        name: "config",
        max_len: None,
    },
    // sandbox-wrapper: the `::progress::` line parser.
    Target {
        name: "progress",
        max_len: None,
    },
    // sandbox-wrapper: the output sink's line splitter (lines past 4096 bytes), cap and tail.
    Target {
        name: "output_sink",
        max_len: Some(16_384),
    },
    // task-core: the cursor tokens of task listings.
    Target {
        name: "cursor",
        max_len: None,
    },
    // sandbox-wrapper: `read_task_output`'s byte-offset cursor into an output file.
    Target {
        name: "output_cursor",
        max_len: None,
    },
];

/// How long each target runs.
#[derive(Clone, Copy)]
enum Budget {
    /// `-max_total_time`.
    Seconds(u64),
    /// `-runs`: this many executions.
    Runs(u64),
}

/// Unset for cargo-fuzz: the fuzz crate is a workspace of its own, built in `fuzz/target`
/// whatever target directory the caller uses for the main workspace.
const TARGET_DIR_VAR: &str = "CARGO_TARGET_DIR";

/// The seconds each target runs in `cargo xtask ci`.
const CI_SECONDS: u64 = 12;

/// The seconds each target runs in `cargo xtask fuzz` by default.
const DEFAULT_SECONDS: u64 = 60;

/// The libFuzzer options every run gets: a unit that takes a minute is a hang, and the final
/// statistics give the number of executions.
const COMMON_OPTIONS: [&str; 2] = ["-timeout=60", "-print_final_stats=1"];

/// `cargo xtask fuzz [--seconds N | --runs N] [TARGET...]`.
pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut budget = None;
    let mut names = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        match flag {
            "--seconds" | "--runs" => {
                let value = inline
                    .or_else(|| args.next().cloned())
                    .with_context(|| format!("`{flag}` needs a number, as in `{flag} 60`"))?;
                let number: u64 =
                    value.parse().ok().filter(|n| *n > 0).with_context(|| {
                        format!("`{flag} {value}`: give a whole number above 0")
                    })?;
                if budget.is_some() {
                    bail!("give one of `--seconds` and `--runs`, once");
                }
                budget = Some(if flag == "--seconds" {
                    Budget::Seconds(number)
                } else {
                    Budget::Runs(number)
                });
            }
            flag if flag.starts_with('-') => bail!(
                "unknown option `{flag}` for `fuzz`: it takes `--seconds N` or `--runs N`, then target names"
            ),
            name => match TARGETS.iter().find(|t| t.name == name) {
                Some(target) => names.push(target),
                None => bail!(
                    "no fuzz target `{name}`: the targets are {}",
                    target_names()
                ),
            },
        }
    }
    let targets: Vec<&Target> = if names.is_empty() {
        TARGETS.iter().collect()
    } else {
        names
    };
    fuzz(
        &targets,
        budget.unwrap_or(Budget::Seconds(DEFAULT_SECONDS)),
        Build::Release,
    )
}

/// The short run of every target for `cargo xtask ci`: a crash, or a target that no longer
/// builds, fails it.
pub(crate) fn ci_smoke() -> anyhow::Result<()> {
    let targets: Vec<&Target> = TARGETS.iter().collect();
    fuzz(&targets, Budget::Seconds(CI_SECONDS), Build::Dev)
}

/// How the targets are built.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Build {
    /// Optimized (cargo-fuzz's default): the most executions per second, for long runs.
    Release,
    /// Unoptimized (`--dev`): built in about a quarter of the time (2.5 min against about 10
    /// on this machine kind, from nothing), which is what a few seconds per target in CI can
    /// afford; still thousands of executions per second.
    Dev,
}

fn fuzz(targets: &[&Target], budget: Budget, build: Build) -> anyhow::Result<()> {
    let profile: &[&str] = match build {
        Build::Release => &[],
        Build::Dev => &["--dev"],
    };
    let root = project_root();
    let sh = Shell::new()?;
    sh.change_dir(&root);
    require_cargo_fuzz(&sh)?;

    // `cargo fuzz` has no `--locked`: this fails first if fuzz/Cargo.lock, the fuzz workspace's
    // own committed lockfile, would have to change.
    print_step_header("fuzz: check fuzz/Cargo.lock and fetch its crates");
    cmd!(sh, "cargo fetch --locked --manifest-path fuzz/Cargo.toml").run()?;

    print_step_header("fuzz: build every target");
    cmd!(sh, "cargo fuzz build {profile...} --sanitizer none")
        .env_remove(TARGET_DIR_VAR)
        .run()?;

    let mut failed = Vec::new();
    for target in targets {
        let name = target.name;
        let budget_text = match budget {
            Budget::Seconds(seconds) => format!("{seconds} s"),
            Budget::Runs(runs) => format!("{runs} executions"),
        };
        print_step_header(&format!("fuzz: {name} ({budget_text})"));
        let corpus = root.join("fuzz/corpus").join(name);
        fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let seeds = root.join("fuzz/seeds").join(name);
        let mut corpora = vec![corpus.display().to_string()];
        if has_files(&seeds) {
            // Read, never written: libFuzzer saves new inputs in the first directory only.
            corpora.push(seeds.display().to_string());
        }
        let mut options: Vec<String> = COMMON_OPTIONS.iter().map(|o| (*o).to_owned()).collect();
        options.push(match budget {
            Budget::Seconds(seconds) => format!("-max_total_time={seconds}"),
            Budget::Runs(runs) => format!("-runs={runs}"),
        });
        if let Some(max_len) = target.max_len {
            options.push(format!("-max_len={max_len}"));
        }
        let outcome = cmd!(
            sh,
            "cargo fuzz run {profile...} --sanitizer none {name} {corpora...} -- {options...}"
        )
        .env_remove(TARGET_DIR_VAR)
        .run();
        if let Err(error) = outcome {
            eprintln!("fuzz: {name} failed: {error}");
            failed.push(name);
        }
    }

    if !failed.is_empty() {
        bail!(
            "fuzz target(s) {} failed: the crashing inputs are in fuzz/artifacts/<target>/; \
             replay one with `cargo fuzz run --sanitizer none \
             <target> <file>` (docs/fuzzing.md)",
            failed.join(", ")
        );
    }
    print_step_header(&format!(
        "fuzz: {} target(s) ran without a crash",
        targets.len()
    ));
    Ok(())
}

fn require_cargo_fuzz(sh: &Shell) -> anyhow::Result<()> {
    let installed = cmd!(sh, "cargo fuzz --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok();
    if !installed {
        bail!(
            "cargo-fuzz is not installed: run `cargo install cargo-fuzz --locked` (it works \
             with the stable toolchain: the targets run without a sanitizer)"
        );
    }
    Ok(())
}

fn has_files(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some())
}

fn target_names() -> String {
    TARGETS
        .iter()
        .map(|t| format!("`{}`", t.name))
        .collect::<Vec<_>>()
        .join(", ")
}
