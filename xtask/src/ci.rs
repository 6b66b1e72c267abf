//! `cargo xtask ci`: every check that CI runs, in order, stopping at the first failure.
//!
//! The steps are: rustfmt, clippy, one build of the workspace's tests and binaries (which every
//! later step reuses: nothing is compiled twice), doctests and tests (with cargo-nextest when it is
//! installed, else `cargo test`), the interoperability check with the official Python MCP SDK
//! (`interop/python_client.py` against the built `msbd`, with the Python named by
//! `MSBD_INTEROP_PYTHON`, else `target/interop-venv/bin/python`; `.ci/run` makes one in its
//! cache, `~/.cache/msbd-ci`, and names it), the one with the official TypeScript MCP SDK (`node
//! interop/typescript/client.mjs` against the same `msbd`, over stdio and streamable HTTP; it
//! fails on any console output, such as the schema validator's warnings; `.ci/run` installs the
//! SDK with `npm ci --prefix interop/typescript`), the web console in headless Chromium
//! (`interop/console_browser.py`, Selenium from the same Python; screenshots in
//! `target/console-screenshots`), both it and the command-line tests (`MSBD_CLI_TEST_BINARY`)
//! on the release `msbd` (built as a stage of its own), a short run of every fuzz target (`cargo
//! xtask fuzz`), a reduced crash-chaos run on the debug binaries that step built (`cargo xtask
//! chaos` runs the full one in release: about 2,000 tasks, 3 kills here), and rustdoc with
//! warnings denied. The time of each stage is printed at the end.

use std::time::{Duration, Instant};

use xshell::{Shell, cmd};

use crate::{print_step_header, project_root};

pub(crate) fn run() -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    let mut stages = Stages::default();
    let outcome = run_stages(&sh, &mut stages);
    stages.print();
    outcome?;
    print_step_header("ci: all checks passed");
    Ok(())
}

/// The Python with the MCP SDK and Selenium: `MSBD_INTEROP_PYTHON`, else
/// `target/interop-venv/bin/python`.
fn interop_python() -> anyhow::Result<std::path::PathBuf> {
    let python = std::env::var_os("MSBD_INTEROP_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| project_root().join("target/interop-venv/bin/python"));
    if !python.exists() {
        anyhow::bail!(
            "no Python with the MCP SDK at {}: run `python3 -m venv target/interop-venv && target/interop-venv/bin/pip install mcp selenium` (as .ci/run does), or point MSBD_INTEROP_PYTHON at one",
            python.display()
        );
    }
    Ok(python)
}

/// How long each stage took, printed at the end (also when one failed).
#[derive(Default)]
struct Stages {
    done: Vec<(&'static str, Duration)>,
}

impl Stages {
    fn time(
        &mut self,
        name: &'static str,
        stage: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let outcome = stage();
        self.done.push((name, started.elapsed()));
        outcome
    }

    fn print(&self) {
        print_step_header("ci: time per stage");
        let total: Duration = self.done.iter().map(|(_, took)| *took).sum();
        for (name, took) in &self.done {
            eprintln!("{:>8.1} s  {name}", took.as_secs_f64());
        }
        eprintln!("{:>8.1} s  in all", total.as_secs_f64());
    }
}

fn run_stages(sh: &Shell, stages: &mut Stages) -> anyhow::Result<()> {
    stages.time("format", || {
        print_step_header("format");
        Ok(cmd!(sh, "cargo fmt --all -- --check").run()?)
    })?;

    stages.time("lint", || {
        print_step_header("lint");
        Ok(cmd!(
            sh,
            "cargo clippy --workspace --all-targets --locked -- -D warnings"
        )
        .run()?)
    })?;

    // One build for every later stage: the test binaries, and the `msbd` and `msbd-chaos`
    // binaries with the features the test build unifies (a `cargo build -p msbd` would resolve
    // features differently and compile much of the workspace again).
    stages.time("build", || {
        print_step_header("build: the workspace's tests and binaries, once");
        Ok(cmd!(sh, "cargo build --workspace --tests --bins --locked").run()?)
    })?;

    // The release `msbd`, which the command-line tests and the browser test drive (as users
    // run it); everything else uses the debug build above.
    stages.time("build (release msbd)", || {
        print_step_header("build: the release msbd, for the CLI and browser tests");
        Ok(cmd!(sh, "cargo build --release --locked -p msbd --bin msbd").run()?)
    })?;
    let release_msbd = crate::chaos::target_dir().join("release").join("msbd");
    let _cli_binary = sh.push_env("MSBD_CLI_TEST_BINARY", &release_msbd);

    if nextest_is_installed(sh) {
        // nextest does not run doctests, so they get a step of their own.
        stages.time("doctests", || {
            print_step_header("doctests");
            Ok(cmd!(sh, "cargo test --workspace --doc --locked").run()?)
        })?;
        stages.time("tests", || {
            print_step_header("tests (cargo-nextest)");
            Ok(cmd!(sh, "cargo nextest run --workspace --locked --no-fail-fast").run()?)
        })?;
    } else {
        // Without nextest, `cargo test` runs the doctests as well.
        stages.time("tests", || {
            print_step_header("tests (cargo test: cargo-nextest is not installed)");
            Ok(cmd!(sh, "cargo test --workspace --locked").run()?)
        })?;
    }

    let debug = crate::chaos::target_dir().join("debug");
    let msbd = debug.join("msbd");
    stages.time("interop: Python SDK", || {
        print_step_header("interoperability: the official Python MCP SDK drives msbd over stdio");
        let python = interop_python()?;
        Ok(cmd!(sh, "{python} interop/python_client.py {msbd}").run()?)
    })?;

    stages.time("interop: TypeScript SDK", || {
        print_step_header(
            "interoperability: the official TypeScript MCP SDK drives msbd over stdio and streamable HTTP",
        );
        let sdk = project_root().join("interop/typescript/node_modules/@modelcontextprotocol/sdk");
        if !sdk.exists() {
            anyhow::bail!(
                "the TypeScript MCP SDK is not installed at {}: run `npm ci --prefix interop/typescript` (as .ci/run does)",
                sdk.display()
            );
        }
        Ok(cmd!(sh, "node interop/typescript/client.mjs {msbd}").run()?)
    })?;

    stages.time("console: Chromium", || {
        print_step_header(
            "the web console in headless Chromium (WebDriver), against the release msbd",
        );
        let python = interop_python()?;
        let shots = crate::chaos::target_dir().join("console-screenshots");
        Ok(cmd!(
            sh,
            "{python} interop/console_browser.py {release_msbd} {shots}"
        )
        .run()?)
    })?;

    stages.time("fuzz (short runs)", crate::fuzz::ci_smoke)?;

    stages.time("chaos (reduced)", || crate::chaos::ci_reduced(&debug))?;

    stages.time("rustdoc", || {
        print_step_header("rustdoc (warnings denied)");
        let _rustdocflags = sh.push_env("RUSTDOCFLAGS", "-D warnings");
        Ok(cmd!(sh, "cargo doc --workspace --no-deps --locked").run()?)
    })
}

fn nextest_is_installed(sh: &Shell) -> bool {
    cmd!(sh, "cargo nextest --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok()
}
