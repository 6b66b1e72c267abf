//! `cargo xtask bench`: run the benchmarks and merge their results.
//!
//! Each bench binary ([`BENCH_TARGETS`]: task-core's `engine`, sandbox-wrapper's
//! `sandbox`, msbd's `mcp`) writes one JSON object per bench, mapping a result name to a number, into a
//! file in `target/bench/parts/`. The directory's absolute path is also passed to the
//! bench binaries in the environment variable named by [`PARTS_DIR_ENV`]. Arguments
//! after `--` (a name filter, say) go to every binary. After every bench has run, the
//! parts are merged into `target/bench/results.json` and printed as a table.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use serde_json::{Number, Value};
use xshell::{Shell, cmd};

use crate::{print_step_header, project_root};

/// Environment variable through which the bench binaries learn where to write.
const PARTS_DIR_ENV: &str = "MSBD_BENCH_PARTS_DIR";

/// One `cargo bench` invocation: a bench target of a package.
struct BenchTarget {
    package: &'static str,
    bench: &'static str,
}

/// Every bench that `cargo xtask bench` runs, in order. Add new ones here.
const BENCH_TARGETS: &[BenchTarget] = &[
    // The task engine and its stores: writes `engine.json`.
    BenchTarget {
        package: "task-core",
        bench: "engine",
    },
    // Sandboxed tasks end to end through the wrapper, and where their time goes: writes
    // `sandbox.json`.
    BenchTarget {
        package: "sandbox-wrapper",
        bench: "sandbox",
    },
    // The MCP surface: round trips over stdio and HTTP to the built binary, and durable
    // `tasks/get` against rmcp's in-memory task manager: writes `mcp.json`.
    BenchTarget {
        package: "msbd",
        bench: "mcp",
    },
    // An agent's working day: files in and out of a session, and a fetch through the network
    // proxy against the host's network: writes `agent.json`.
    BenchTarget {
        package: "msbd",
        bench: "agent",
    },
    // The web console: the task page over a million tasks, the lag of its live events, its CPU
    // with ten consoles connected: writes `console.json`.
    BenchTarget {
        package: "msbd",
        bench: "console",
    },
];

pub(crate) fn run(extra_args: &[String]) -> anyhow::Result<()> {
    let sh = Shell::new()?;
    let root = project_root();
    sh.change_dir(&root);

    let bench_dir = target_dir(&root).join("bench");
    let parts_dir = bench_dir.join("parts");
    if parts_dir.exists() {
        fs::remove_dir_all(&parts_dir)
            .with_context(|| format!("cannot remove old results in {}", parts_dir.display()))?;
    }
    fs::create_dir_all(&parts_dir)
        .with_context(|| format!("cannot create {}", parts_dir.display()))?;
    let _env = sh.push_env(PARTS_DIR_ENV, &parts_dir);

    for BenchTarget { package, bench } in BENCH_TARGETS {
        print_step_header(&format!("bench: {package} / {bench}"));
        if extra_args.is_empty() {
            cmd!(sh, "cargo bench --locked -p {package} --bench {bench}").run()?;
        } else {
            cmd!(
                sh,
                "cargo bench --locked -p {package} --bench {bench} -- {extra_args...}"
            )
            .run()?;
        }
    }

    let results = merge_parts(&parts_dir)?;
    let results_file = bench_dir.join("results.json");
    let json = serde_json::to_string_pretty(&results)?;
    fs::write(&results_file, json + "\n")
        .with_context(|| format!("cannot write {}", results_file.display()))?;

    print_step_header(&format!("results (also in {})", results_file.display()));
    print!("{}", format_table(&results));
    Ok(())
}

/// The target directory that cargo uses: `CARGO_TARGET_DIR`, else `<root>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Reads every `*.json` file in `parts_dir` and merges them into one map from
/// name to value. A name that appears in two parts is an error.
fn merge_parts(parts_dir: &Path) -> anyhow::Result<BTreeMap<String, Number>> {
    let mut part_files = Vec::new();
    for entry in
        fs::read_dir(parts_dir).with_context(|| format!("cannot read {}", parts_dir.display()))?
    {
        let path = entry?.path();
        if path
            .extension()
            .is_some_and(|extension| extension == "json")
        {
            part_files.push(path);
        }
    }
    part_files.sort();
    if part_files.is_empty() {
        bail!(
            "the benches wrote no results: expected JSON files in {}",
            parts_dir.display()
        );
    }

    let mut merged = BTreeMap::new();
    for path in &part_files {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let part =
            parse_part(&text).with_context(|| format!("bad bench result in {}", path.display()))?;
        for (name, value) in part {
            if merged.contains_key(&name) {
                bail!(
                    "bench result `{name}` in {} was already reported by another part",
                    path.display()
                );
            }
            merged.insert(name, value);
        }
    }
    Ok(merged)
}

/// Parses one part: a JSON object whose every value is a number.
fn parse_part(text: &str) -> anyhow::Result<Vec<(String, Number)>> {
    let Value::Object(object) = serde_json::from_str(text)? else {
        bail!("expected a JSON object mapping names to numbers");
    };
    object
        .into_iter()
        .map(|(name, value)| match value {
            Value::Number(number) => Ok((name, number)),
            other => bail!("`{name}` is {other}, expected a number"),
        })
        .collect()
}

/// Formats results as a two-column table, names left-aligned, values right-aligned.
fn format_table(results: &BTreeMap<String, Number>) -> String {
    let values: Vec<String> = results.values().map(Number::to_string).collect();
    let name_width = results.keys().map(String::len).chain(["name".len()]).max();
    let name_width = name_width.unwrap_or_default();
    let value_width = values.iter().map(String::len).chain(["value".len()]).max();
    let value_width = value_width.unwrap_or_default();

    let mut table = format!("{:<name_width$} | {:>value_width$}\n", "name", "value");
    table.push_str(&format!(
        "{}-+-{}\n",
        "-".repeat(name_width),
        "-".repeat(value_width)
    ));
    for (name, value) in results.keys().zip(&values) {
        table.push_str(&format!("{name:<name_width$} | {value:>value_width$}\n"));
    }
    table
}

#[cfg(test)]
mod tests {
    use super::{format_table, merge_parts, parse_part};

    #[test]
    fn parse_part_accepts_an_object_of_numbers() {
        let part = parse_part(r#"{"b": 2.5, "a": 1}"#).unwrap();
        let mut names: Vec<&str> = part.iter().map(|(name, _)| name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn parse_part_rejects_a_value_that_is_not_a_number() {
        let error = parse_part(r#"{"a": "fast"}"#).unwrap_err();
        assert_eq!(error.to_string(), r#"`a` is "fast", expected a number"#);
    }

    #[test]
    fn merge_parts_combines_files_and_rejects_duplicates() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-test-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("one.json"), r#"{"z_ops": 10, "a_ms": 0.5}"#).unwrap();
        std::fs::write(dir.join("two.json"), r#"{"m_count": 3}"#).unwrap();
        std::fs::write(dir.join("ignored.txt"), "not json").unwrap();

        let merged = merge_parts(&dir).unwrap();
        let table = format_table(&merged);
        assert_eq!(
            table,
            "name    | value\n\
             --------+------\n\
             a_ms    |   0.5\n\
             m_count |     3\n\
             z_ops   |    10\n"
        );

        std::fs::write(dir.join("three.json"), r#"{"a_ms": 1}"#).unwrap();
        let error = merge_parts(&dir).unwrap_err();
        assert!(error.to_string().contains("`a_ms`"), "{error}");

        std::fs::remove_dir_all(&dir).unwrap();
    }
}
