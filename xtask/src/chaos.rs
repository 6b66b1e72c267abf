//! `cargo xtask chaos [--tasks N] [--kills K] [--seed S]`: crash chaos. Builds `msbd` and
//! `msbd-chaos` in release and runs the harness (`crates/chaos`): it drives msbd over MCP with
//! N tasks (default 20,000), SIGKILLs and restarts it K times (default 10), and checks that no
//! task is lost or completed twice, that the tasks running at each kill are recovered within the
//! lease plus one second, and that nothing of msbd is left after its graceful stop. It prints
//! `chaos: N accepted, N terminal, 0 lost, 0 duplicated, K kills` and fails when a check fails.
//! The seed (printed at the start) replays the same plan. `cargo xtask ci` runs a reduced run
//! ([`ci_reduced`]) on the debug binaries its build stage made.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use xshell::{Shell, cmd};

use crate::{print_step_header, project_root};

/// The full run's defaults.
const TASKS: u64 = 20_000;
const KILLS: u64 = 10;

/// The reduced run of `cargo xtask ci`.
const CI_TASKS: u64 = 2_000;
const CI_KILLS: u64 = 3;

/// `cargo xtask chaos` with its arguments.
pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    let mut tasks = TASKS;
    let mut kills = KILLS;
    let mut seed = None;
    let mut given = args.iter();
    while let Some(flag) = given.next() {
        let value = given
            .next()
            .with_context(|| format!("`{flag}` needs a value"))?;
        let number: u64 = value
            .parse()
            .with_context(|| format!("`{flag} {value}`: not a whole number"))?;
        match flag.as_str() {
            "--tasks" => tasks = number,
            "--kills" => kills = number,
            "--seed" => seed = Some(number),
            other => bail!(
                "unexpected argument `{other}` for `chaos`: it takes --tasks N, --kills K and --seed S"
            ),
        }
    }
    chaos(tasks, kills, seed)
}

/// The reduced chaos run of `cargo xtask ci`: about 2,000 tasks and 3 kills.
/// Runs on the `msbd` and `msbd-chaos` already built in `binaries` (the checks do not depend on
/// the build's speed: recovery is timed against the lease).
pub(crate) fn ci_reduced(binaries: &Path) -> anyhow::Result<()> {
    for binary in ["msbd", "msbd-chaos"] {
        if !binaries.join(binary).is_file() {
            bail!(
                "{} is missing: the reduced chaos run uses the binaries of `cargo build --workspace --tests --bins` (the ci build stage)",
                binaries.join(binary).display()
            );
        }
    }
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    print_step_header(&format!(
        "chaos: {CI_TASKS} tasks over MCP, {CI_KILLS} SIGKILLs and restarts of the debug msbd"
    ));
    run_harness(&sh, binaries, CI_TASKS, CI_KILLS, None)
}

fn chaos(tasks: u64, kills: u64, seed: Option<u64>) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    print_step_header(&format!(
        "chaos: {tasks} tasks over MCP, {kills} SIGKILLs and restarts of the release msbd"
    ));
    cmd!(sh, "cargo build --release -p msbd -p msbd-chaos --locked").run()?;
    run_harness(&sh, &target_dir().join("release"), tasks, kills, seed)
}

fn run_harness(
    sh: &Shell,
    binaries: &Path,
    tasks: u64,
    kills: u64,
    seed: Option<u64>,
) -> anyhow::Result<()> {
    let msbd = binaries.join("msbd");
    let harness = binaries.join("msbd-chaos");
    let tasks = tasks.to_string();
    let kills = kills.to_string();
    let seed: Vec<String> = seed
        .map(|s| vec!["--seed".to_owned(), s.to_string()])
        .unwrap_or_default();
    cmd!(
        sh,
        "{harness} --msbd {msbd} --tasks {tasks} --kills {kills} {seed...}"
    )
    .run()
    .context("the chaos run failed (its output says which check, and the seed to replay it)")?;
    Ok(())
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `target` in the workspace.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                project_root().join(dir)
            }
        }
        _ => project_root().join("target"),
    }
}
