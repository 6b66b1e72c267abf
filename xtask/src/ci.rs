//! `cargo xtask ci`: every check that CI runs, in order, stopping at the first failure.
//!
//! The steps are: rustfmt, clippy, doctests and tests (with cargo-nextest when it is
//! installed, else `cargo test`), the interoperability check with the official Python MCP SDK
//! (`interop/python_client.py` against the built `msbd`, with the Python named by
//! `MSBD_INTEROP_PYTHON`, else `target/interop-venv/bin/python`; `.ci/run` makes that
//! environment), the one with the official TypeScript MCP SDK (`node
//! interop/typescript/client.mjs` against the same `msbd`, over stdio and streamable HTTP; it
//! fails on any console output, such as the schema validator's warnings; `.ci/run` installs the
//! SDK with `npm ci --prefix interop/typescript`), a short run of every fuzz target (`cargo
//! xtask fuzz`), a reduced crash-chaos run (`cargo xtask chaos`: about 2,000 tasks, 3 kills),
//! and rustdoc with warnings denied.

use xshell::{Shell, cmd};

use crate::{print_step_header, project_root};

pub(crate) fn run() -> anyhow::Result<()> {
    let sh = Shell::new()?;
    sh.change_dir(project_root());

    print_step_header("format");
    cmd!(sh, "cargo fmt --all -- --check").run()?;

    print_step_header("lint");
    cmd!(
        sh,
        "cargo clippy --workspace --all-targets --locked -- -D warnings"
    )
    .run()?;

    if nextest_is_installed(&sh) {
        // nextest does not run doctests, so they get a step of their own. It comes
        // first so that the log closes on nextest's summary of the real tests.
        print_step_header("doctests");
        cmd!(sh, "cargo test --workspace --doc --locked").run()?;

        print_step_header("tests (cargo-nextest)");
        cmd!(sh, "cargo nextest run --workspace --locked --no-fail-fast").run()?;
    } else {
        // Without nextest, `cargo test` runs the doctests as well.
        print_step_header("tests (cargo test: cargo-nextest is not installed)");
        cmd!(sh, "cargo test --workspace --locked").run()?;
    }

    print_step_header("interoperability: the official Python MCP SDK drives msbd over stdio");
    let python = std::env::var_os("MSBD_INTEROP_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| project_root().join("target/interop-venv/bin/python"));
    if !python.exists() {
        anyhow::bail!(
            "no Python with the MCP SDK at {}: run `python3 -m venv target/interop-venv && target/interop-venv/bin/pip install mcp` (as .ci/run does), or point MSBD_INTEROP_PYTHON at one",
            python.display()
        );
    }
    cmd!(sh, "cargo build --locked -p msbd").run()?;
    let msbd = project_root().join("target/debug/msbd");
    cmd!(sh, "{python} interop/python_client.py {msbd}").run()?;

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
    cmd!(sh, "node interop/typescript/client.mjs {msbd}").run()?;

    crate::fuzz::ci_smoke()?;

    crate::chaos::ci_reduced()?;

    print_step_header("rustdoc (warnings denied)");
    let _rustdocflags = sh.push_env("RUSTDOCFLAGS", "-D warnings");
    cmd!(sh, "cargo doc --workspace --no-deps --locked").run()?;

    print_step_header("ci: all checks passed");
    Ok(())
}

fn nextest_is_installed(sh: &Shell) -> bool {
    cmd!(sh, "cargo nextest --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok()
}
