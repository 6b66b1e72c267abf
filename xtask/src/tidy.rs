//! Project conventions, checked by ordinary tests.
//!
//! Every Rust file under `crates/` and `xtask/`:
//! - starts with a `//!` doc comment, if it is a `lib.rs` or `main.rs` outside a
//!   `tests/` directory, or any file inside a `src/` directory;
//! - has no trailing whitespace and no tab characters.
//!
//! Every `Cargo.toml` there has no trailing whitespace either.
//!
//! The layers (docs/architecture.md), in the crates' `src/` and manifests:
//! - only msbd reads the environment (`std::env`); the Landlock shim reads its own arguments,
//!   and is excepted by name;
//! - `rmcp` is used by mcp-tools and msbd only, not below;
//! - no `MSB_` (msbd's settings) outside comments below msbd: typed errors carry the facts;
//! - `tokio_postgres` is used only in task-core's store module.

use std::{
    fs,
    path::{Component, Path, PathBuf},
};

use crate::project_root;

#[test]
fn rust_files_are_tidy() {
    let root = project_root();
    let mut problems = Vec::new();
    for path in files_to_check(&root) {
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        let relative = path.strip_prefix(&root).unwrap_or(&path);
        let is_rust = path.extension().is_some_and(|extension| extension == "rs");
        if is_rust && needs_module_doc(relative) && !starts_with_module_doc(&text) {
            problems.push(format!(
                "{}: does not start with a `//!` doc comment saying what this module is for",
                relative.display()
            ));
        }
        for (index, line) in text.lines().enumerate() {
            let line_number = index + 1;
            if line.ends_with([' ', '\t']) {
                problems.push(format!(
                    "{}:{line_number}: trailing whitespace",
                    relative.display()
                ));
            }
            if is_rust && line.contains('\t') {
                problems.push(format!(
                    "{}:{line_number}: tab character (indent with spaces)",
                    relative.display()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "tidy found {} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The crates below msbd, which never read the environment.
const BELOW_MSBD: &[&str] = &["task-core", "sandbox-wrapper", "mcp-tools"];

/// The crates below mcp-tools, which never speak MCP.
const BELOW_MCP_TOOLS: &[&str] = &["task-core", "sandbox-wrapper"];

/// Files allowed to use `std::env` below msbd, and why.
const ENV_EXCEPTIONS: &[(&str, &str)] = &[(
    "crates/sandbox-wrapper/src/backend/local/shim.rs",
    "the Landlock shim is a program of its own inside the sandbox: it reads its arguments",
)];

#[test]
fn layers_do_not_leak() {
    let root = project_root();
    let mut problems = Vec::new();
    for path in files_to_check(&root) {
        let relative = path.strip_prefix(&root).unwrap_or(&path);
        let relative_text = relative.to_string_lossy().replace('\\', "/");
        let Some(krate) = relative_text
            .strip_prefix("crates/")
            .and_then(|rest| rest.split('/').next())
        else {
            continue;
        };
        let in_src = relative_text.starts_with(&format!("crates/{krate}/src/"));
        let manifest = relative_text == format!("crates/{krate}/Cargo.toml");
        if !in_src && !manifest {
            continue;
        }
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", path.display()));
        let code: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim_start().starts_with("//"))
            .collect();
        let mut check = |forbidden: &str, rule: &str| {
            for (index, line) in &code {
                if line.contains(forbidden) {
                    problems.push(format!(
                        "{relative_text}:{}: `{forbidden}`: {rule}",
                        index + 1
                    ));
                }
            }
        };
        if in_src
            && BELOW_MSBD.contains(&krate)
            && !ENV_EXCEPTIONS
                .iter()
                .any(|(file, _)| *file == relative_text)
        {
            check(
                "std::env",
                "only msbd reads the environment; pass the value down in a config struct",
            );
        }
        if in_src && BELOW_MSBD.contains(&krate) {
            check(
                "MSB_",
                "msbd's settings are msbd's words: below it, an error carries the facts (a \
                 typed error, or the setting's name passed in by the caller) and msbd or \
                 mcp-tools says what to change",
            );
        }
        if BELOW_MCP_TOOLS.contains(&krate) {
            check("rmcp", "MCP belongs to mcp-tools and msbd, not below");
        }
        if in_src && !relative_text.starts_with("crates/task-core/src/store/") {
            check(
                "tokio_postgres",
                "PostgreSQL types stay in task-core's store module; add a capability to `Store`",
            );
        }
        // The wrapper and the MCP surface run on whichever store msbd chose (serve.rs, doctor.rs):
        // what a shared store asks of them is a capability of `Store`.
        if in_src && ["sandbox-wrapper", "mcp-tools"].contains(&krate) {
            for forbidden in ["PostgresStore", "store::postgres"] {
                check(
                    forbidden,
                    "only msbd chooses the PostgreSQL store; above task-core, ask the `Store` \
                     trait (`is_shared`, `engine_config`, `is_maintenance_leader`, \
                     `healthy_for`, `wakeups`)",
                );
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the layers leak in {} place(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn module_doc_rule_applies_where_intended() {
    assert!(needs_module_doc(Path::new("crates/task-core/src/lib.rs")));
    assert!(needs_module_doc(Path::new(
        "crates/task-core/src/store/sqlite.rs"
    )));
    assert!(needs_module_doc(Path::new("crates/msbd/src/main.rs")));
    assert!(needs_module_doc(Path::new(
        "crates/task-core/benches/engine/main.rs"
    )));
    assert!(!needs_module_doc(Path::new(
        "crates/task-core/tests/it/main.rs"
    )));
    assert!(!needs_module_doc(Path::new(
        "crates/task-core/tests/it/store.rs"
    )));
    assert!(!needs_module_doc(Path::new(
        "crates/task-core/benches/engine.rs"
    )));

    assert!(starts_with_module_doc("\n//! Tasks.\n"));
    assert!(!starts_with_module_doc("// Tasks.\n"));
    assert!(!starts_with_module_doc("use std::fs;\n"));
}

/// The Rust files and manifests under `crates/` and `xtask/`, skipping build output
/// and hidden directories.
fn files_to_check(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![root.join("crates"), root.join("xtask")];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with('.') || name == "target" {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else if name.ends_with(".rs") || name == "Cargo.toml" {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Whether a file, given relative to the workspace root, must start with `//!`.
fn needs_module_doc(relative: &Path) -> bool {
    let in_directory = |wanted: &str| {
        relative
            .components()
            .any(|component| component == Component::Normal(wanted.as_ref()))
    };
    if in_directory("tests") {
        return false;
    }
    let file_name = relative.file_name().unwrap_or_default();
    in_directory("src") || file_name == "lib.rs" || file_name == "main.rs"
}

fn starts_with_module_doc(text: &str) -> bool {
    text.lines()
        .find(|line| !line.trim().is_empty())
        .is_some_and(|line| line.trim_start().starts_with("//!"))
}
