//! The Landlock shim: one step between bubblewrap and the sandboxed program, so that Landlock
//! is stacked under bubblewrap as a second layer.
//!
//! Landlock cannot be applied before bubblewrap runs: a Landlock domain forbids `mount`, which
//! bubblewrap needs to build the sandbox. So bubblewrap runs the shim instead of the program;
//! the shim (inside the finished sandbox, as the session's user, under seccomp already) applies
//! a Landlock ruleset — write only in the work directory, `/tmp`, `/dev` and the volumes; no
//! signals or abstract sockets outside the domain (TCP is left to bubblewrap's network
//! namespace) — and execs the program.
//!
//! Any executable whose `main` calls [`run_if_requested`] first can be the shim: the
//! `msbd-sandbox-shim` program of this crate, or `msbd` itself. Configure it with
//! [`LocalConfig::landlock_shim`](super::LocalConfig::landlock_shim).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

/// The first argument that makes a program act as the shim.
pub const SHIM_FLAG: &str = "--msbd-landlock-shim";

/// The path where the shim appears inside a sandbox.
pub(crate) const SHIM_PATH: &str = "/.msbd/shim";

/// If this process was started as the shim (`<program> --msbd-landlock-shim --write <dir>...
/// -- <argv>...`), applies Landlock and execs the program: it never returns then (it exits 126
/// when it cannot). If it was started as a session's spawner (`<program>
/// --msbd-session-spawner <fd>`, which the shim runs under Landlock), it serves the session's
/// runs until msbd lets it go, then exits. Otherwise it returns at once. Call it first thing in
/// `main`, before any thread starts: the spawner forks, and must be single-threaded.
pub fn run_if_requested() {
    let args: Vec<OsString> = std::env::args_os().collect();
    let error = match args.get(1) {
        Some(flag) if flag == SHIM_FLAG => run(&args[2..]),
        // A session's spawner (see `spawner`): started by the shim itself, under Landlock.
        Some(flag) if super::spawner::is_flag(flag) => {
            let error = super::spawner::serve(&args[2..]);
            eprintln!("msbd session spawner: {error}");
            std::process::exit(126);
        }
        _ => return,
    };
    eprintln!("msbd sandbox shim: {error}");
    std::process::exit(126);
}

/// Applies the ruleset and execs; returns only on failure.
fn run(args: &[OsString]) -> String {
    let mut writable = Vec::new();
    let mut rest = args.iter();
    loop {
        match rest.next() {
            Some(flag) if flag == "--write" => match rest.next() {
                Some(path) => writable.push(PathBuf::from(path)),
                None => return "--write needs a path".into(),
            },
            Some(flag) if flag == "--" => break,
            Some(other) => return format!("unexpected argument {other:?}"),
            None => return "no program to run (expected `-- <program> [args]`)".into(),
        }
    }
    let argv: Vec<&OsString> = rest.collect();
    let Some(program) = argv.first() else {
        return "no program to run".into();
    };
    // TCP stays to bubblewrap's network namespace (the sandbox's own loopback is usable).
    let Some(ruleset) = super::spawn::landlock_ruleset_writing(writable, false) else {
        return "Landlock is not available here".into();
    };
    if let Err(error) = ruleset.restrict_self() {
        return format!("applying Landlock failed: {error}");
    }
    let error = std::process::Command::new(program).args(&argv[1..]).exec();
    format!("could not run {program:?}: {error}")
}
