//! `docs/tools.md` documents every tool the server lists: a section whose heading names the
//! tool in backticks, which mentions each top-level input property of the tool's schema, and
//! each other name the tool accepts for one (an alias), in backticks, and has a heading
//! ``Action `name` `` for each action it takes; and it has no section for a tool that no longer
//! exists.

use std::sync::Arc;
use std::time::Duration;

use mcp_tools::{McpServer, ServerOptions};
use sandbox_wrapper::{Wrapper, WrapperConfig};
use task_core::store::Store;
use task_core::store::memory::MemoryStore;

/// Where the reference lives, from this crate.
const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/tools.md");

/// A Markdown heading: its level (number of `#`) and text.
fn heading(line: &str) -> Option<(usize, &str)> {
    let level = line.chars().take_while(|&c| c == '#').count();
    let text = line[level..].strip_prefix(' ')?;
    (1..=6).contains(&level).then_some((level, text.trim()))
}

/// The headings of `doc` (outside fenced code blocks): the offset of each heading's line, its
/// level and its text.
fn headings(doc: &str) -> Vec<(usize, usize, &str)> {
    let mut found = Vec::new();
    let mut fenced = false;
    let mut offset = 0;
    for line in doc.split_inclusive('\n') {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && let Some((level, text)) = heading(line) {
            found.push((offset, level, text));
        }
        offset += line.len();
    }
    found
}

/// The section of `doc` whose heading contains `` `name` ``: from that heading to the next
/// heading of the same or a higher level. `None` when no heading names the tool.
fn section<'a>(doc: &'a str, name: &str) -> Option<&'a str> {
    let needle = format!("`{name}`");
    let all = headings(doc);
    let at = all.iter().position(|(_, _, text)| text.contains(&needle))?;
    let (begin, own, _) = all[at];
    let end = all[at + 1..]
        .iter()
        .find(|(_, level, _)| *level <= own)
        .map_or(doc.len(), |(offset, _, _)| *offset);
    Some(&doc[begin..end])
}

/// The backticked names of headings that consist of nothing but one backticked snake_case name
/// (the form of a tool's section heading, `### `submit_task``).
fn tool_headings(doc: &str) -> Vec<String> {
    headings(doc)
        .into_iter()
        .filter_map(|(_, _, text)| {
            let name = text.strip_prefix('`')?.strip_suffix('`')?;
            (name.contains('_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .then(|| name.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docs_tools_md_covers_every_tool_and_argument() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let wrapper = Wrapper::start(store, WrapperConfig::new(dir.path().join("data")))
        .await
        .unwrap();
    // The default options list every tool, the supervision tools included.
    let server = McpServer::new(wrapper, ServerOptions::default());
    let tools = server.tools();
    server.wrapper().stop(Duration::from_secs(5)).await;

    let doc = std::fs::read_to_string(DOC_PATH)
        .unwrap_or_else(|e| panic!("cannot read {DOC_PATH}: {e}; docs/tools.md must exist"));
    let mut problems = Vec::new();
    for tool in &tools {
        let name = &*tool.name;
        let Some(text) = section(&doc, name) else {
            problems.push(format!(
                "tool `{name}` has no section: add a heading containing `{name}` (in backticks)"
            ));
            continue;
        };
        let properties = tool
            .input_schema
            .get("properties")
            .and_then(|p| p.as_object())
            .map(|p| p.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        for property in &properties {
            if !text.contains(&format!("`{property}`")) {
                problems.push(format!(
                    "the section of `{name}` does not mention its argument `{property}` (in backticks)"
                ));
            }
        }
        // Each action of a `manage_*` tool (its schema's `enum`) has a heading of its own.
        let actions = tool
            .input_schema
            .get("properties")
            .and_then(|p| p.get("action"))
            .and_then(|a| a.get("enum"))
            .and_then(|e| e.as_array())
            .cloned()
            .unwrap_or_default();
        for action in actions.iter().filter_map(|a| a.as_str()) {
            let heading = format!("Action `{action}`");
            if !headings(text).iter().any(|(_, _, h)| *h == heading) {
                problems.push(format!(
                    "the section of `{name}` has no heading \"{heading}\" for its action `{action}`"
                ));
            }
        }
        let accepted = mcp_tools::accepted_arguments(name).unwrap_or_default();
        for alias in accepted
            .iter()
            .filter(|a| !properties.contains(&a.to_string()))
        {
            let text = text.to_lowercase();
            if !text.contains(&format!("alias `{alias}`"))
                && !text.contains(&format!("alias: `{alias}`"))
            {
                problems.push(format!(
                    "the section of `{name}` does not say that it accepts `{alias}` (write \"alias `{alias}`\")"
                ));
            }
        }
    }
    let names: Vec<&str> = tools.iter().map(|t| &*t.name).collect();
    for documented in tool_headings(&doc) {
        if !names.contains(&documented.as_str()) {
            problems.push(format!(
                "the section `{documented}` documents a tool the server does not list: remove or rename it"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "docs/tools.md is out of date with the tools msbd serves:\n- {}\nUpdate docs/tools.md \
         (and capture real answers for new examples: python3 interop/capture_examples.py target/debug/msbd).",
        problems.join("\n- ")
    );
}

#[test]
fn sections_end_at_the_next_heading_of_the_same_level() {
    let doc = "# T\n## `a_b`\ntext `x`\n### action `y`\n```sh\n# `c_d`\n```\n## `c_d`\n`w`\n";
    assert_eq!(
        section(doc, "a_b"),
        Some("## `a_b`\ntext `x`\n### action `y`\n```sh\n# `c_d`\n```\n")
    );
    assert_eq!(section(doc, "c_d"), Some("## `c_d`\n`w`\n"));
    assert_eq!(section(doc, "e_f"), None);
    assert_eq!(tool_headings(doc), vec!["a_b", "c_d"]);
}
