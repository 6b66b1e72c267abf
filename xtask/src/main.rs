//! Project automation for msbd, run as `cargo xtask <command>`.
//!
//! All automation lives here, in Rust, so that it runs the same on a developer's
//! machine and in CI. Run `cargo xtask help` for the list of commands.
//!
//! This crate is never a dependency of any other crate in the workspace.

mod bench;
mod chaos;
mod ci;
mod fuzz;
#[cfg(test)]
mod tidy;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::bail;

const HELP: &str = "\
Usage: cargo xtask <command>

Commands:
  ci                       Run every check that CI runs: fmt, clippy, tests,
                           doctests and rustdoc, stopping at the first failure.
  bench [-- <args>...]     Run the benchmarks, merge their results into
                           target/bench/results.json and print them as a table.
                           Arguments after `--` go to each bench binary
                           (for example a name filter).
  load [-- <phase>]        Load msbd (release build) over HTTP: 50 clients for 60 s,
                           then 100,000 tasks behind a paused queue; prints and
                           writes target/load/results.json; fails on any error,
                           RSS growth over 10% or unbounded memory. A phase name
                           (`clients` or `paused`) runs only that phase; the
                           MSBD_LOAD_* variables set the sizes (see
                           crates/msbd/benches/load.rs).
  fuzz [--seconds N | --runs N] [TARGET...]
                           Run the cargo-fuzz targets in fuzz/ (default: all, 60 s
                           each) on the stable toolchain; fails on a crash
                           (docs/fuzzing.md). Needs `cargo install cargo-fuzz`.
  chaos [--tasks N] [--kills K] [--seed S]
                           Crash chaos: the release msbd driven over MCP with N
                           tasks (default 20,000), SIGKILLed and restarted K times
                           (default 10); checks nothing is lost or done twice and
                           nothing is left behind (docs/reliability.md).
  help                     Print this message.
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprint!("{HELP}");
        bail!("no command given");
    };
    match command.as_str() {
        "ci" => {
            reject_arguments("ci", rest)?;
            ci::run()
        }
        "bench" => {
            let extra_args = match rest.split_first() {
                None => &[][..],
                Some((separator, extra)) if separator == "--" => extra,
                Some((unexpected, _)) => bail!(
                    "unexpected argument `{unexpected}` for `bench`: \
                     pass arguments for the bench binary after `--`, \
                     as in `cargo xtask bench -- <filter>`"
                ),
            };
            bench::run(extra_args)
        }
        "load" => {
            let extra_args = match rest.split_first() {
                None => &[][..],
                Some((separator, extra)) if separator == "--" => extra,
                Some((unexpected, _)) => bail!(
                    "unexpected argument `{unexpected}` for `load`: pass a phase after `--`, \
                     as in `cargo xtask load -- clients`"
                ),
            };
            let sh = xshell::Shell::new()?;
            sh.change_dir(project_root());
            print_step_header("load: msbd over HTTP under 50 clients, then a paused queue");
            xshell::cmd!(
                sh,
                "cargo bench --locked -p msbd --bench load -- {extra_args...}"
            )
            .run()?;
            Ok(())
        }
        "fuzz" => fuzz::run(rest),
        "chaos" => chaos::run(rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        unknown => {
            eprint!("{HELP}");
            bail!("unknown command `{unknown}`: see the list above")
        }
    }
}

fn reject_arguments(command: &str, rest: &[String]) -> anyhow::Result<()> {
    if let Some(unexpected) = rest.first() {
        bail!("unexpected argument `{unexpected}`: `{command}` takes no arguments");
    }
    Ok(())
}

/// The root of the Cargo workspace, the parent of this crate's directory.
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one directory below the workspace root")
        .to_path_buf()
}

/// Prints a header that makes the start of a step easy to find in a long log.
/// The command that the step runs is echoed by `xshell` right after it.
fn print_step_header(step: &str) {
    eprintln!();
    eprintln!("==> {step}");
}
