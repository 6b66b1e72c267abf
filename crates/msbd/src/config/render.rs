//! What msbd shows of its configuration: `msbd config` ([`render`]), the Markdown reference
//! ([`markdown_reference`], the whole of `docs/configuration.md`), and the values quoted in
//! messages, with passwords hidden and control characters escaped.

use std::fmt::Write as _;

use super::{Group, Loaded, REGENERATE_DOCS, Source, VARIABLES};

/// The text `msbd config` prints: one line per variable, `NAME=value  (source)`, in the order
/// of the reference, with secrets shown only as `(set)` or `(unset)`.
pub fn render(loaded: &Loaded) -> String {
    let mut out = String::new();
    for variable in VARIABLES {
        let value = match ((variable.show)(&loaded.config), variable.secret) {
            (None, _) => "(unset)".to_owned(),
            (Some(_), true) => "(set)".to_owned(),
            (Some(value), false) => printable(&hide_password(&value)),
        };
        let source = loaded
            .sources
            .get(variable.name)
            .copied()
            .unwrap_or(Source::Default);
        let _ = writeln!(out, "{}={value}  ({source})", variable.name);
    }
    out
}

/// The configuration reference in Markdown: the whole content of `docs/configuration.md`.
pub fn markdown_reference() -> String {
    let mut out = String::new();
    out.push_str("# Configuration\n\n");
    let _ = writeln!(
        out,
        "<!-- Generated from crates/msbd/src/config/declarations.rs; do not edit. Regenerate with:\n     \
         {REGENERATE_DOCS} -->\n"
    );
    out.push_str(
        "msbd is configured by `MSB_*` environment variables, a few of which can also be set by \
         a command-line flag. Precedence: a flag overrides the environment, and the environment \
         overrides the default (**flag > environment > default**). `msbd config` prints the \
         effective configuration, one variable per line, with where each value came from; \
         `msbd config --markdown` prints this page.\n\n",
    );
    out.push_str(
        "- A variable set to the empty string counts as unset.\n\
         - Durations are whole seconds (`180`, not `3m`), and at most 365 days.\n\
         - Booleans are `true` or `false`; `1`/`0`, `yes`/`no`, `on`/`off` and \
         `enabled`/`disabled` are accepted too. Choices are not case-sensitive.\n\
         - Every value is checked when msbd starts. Every problem is reported at once, each \
         naming the variable, what is wrong and what to do, and msbd exits with status 2 \
         before it starts anything.\n\
         - A variable that starts with `MSB_` but is not listed here is reported as a warning \
         (it is probably a typo) and ignored.\n\
         - Secrets are never printed: `msbd config` shows them as `(set)` or `(unset)`.\n\
         - The variables that the microsandbox MCP wrapper read keep its names and defaults.\n\n",
    );
    out.push_str("| Variable | Default | Flag |\n|---|---|---|\n");
    for variable in VARIABLES {
        let _ = writeln!(
            out,
            "| [`{name}`](#{anchor}) | {default} | {flag} |",
            name = variable.name,
            anchor = variable.name.to_lowercase(),
            default = table_cell(&variable.default_markdown()),
            flag = variable
                .flag
                .map_or_else(|| "".to_owned(), |flag| format!("`{flag}`")),
        );
    }
    for group in Group::ALL {
        let _ = write!(out, "\n## {}\n", group.title());
        for variable in VARIABLES.iter().filter(|v| v.group == group) {
            let _ = write!(
                out,
                "\n### `{}`\n\n{}\n\n- Type: {}\n- Default: {}\n",
                variable.name,
                variable.doc_paragraph(),
                variable.kind(),
                variable.default_markdown(),
            );
            if let Some(flag) = variable.flag {
                let _ = writeln!(out, "- Flag: `{flag}`");
            }
            if variable.secret {
                out.push_str(
                    "- Secret: never printed; `msbd config` shows `(set)` or `(unset)`.\n",
                );
            }
        }
    }
    out
}

/// A value for a message: as is when it is plain, quoted (with escapes) when it is empty or
/// holds spaces, quotes or control characters; cut to 120 characters.
pub(crate) fn quoted(value: &str) -> String {
    const LIMIT: usize = 120;
    let value = &hide_password(value);
    let cut: String = value.chars().take(LIMIT).collect();
    let cut = if value.chars().count() > LIMIT {
        format!("{cut}...")
    } else {
        cut
    };
    let plain = !cut.is_empty()
        && cut
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\'');
    if plain { cut } else { format!("{cut:?}") }
}

/// A URL with its password, and the value of its `password=` option (a PostgreSQL URL may
/// carry one), replaced by `***`; a text that url::Url cannot read goes to [`hide_password`].
pub(super) fn url_without_password(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return hide_password(text);
    };
    if url.password().is_some() {
        // Only a URL that cannot have a password refuses one, and this one has one.
        let _ = url.set_password(Some("***"));
    }
    if url.query_pairs().any(|(name, _)| name == "password") {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(name, value)| {
                let value = if name == "password" {
                    "***".to_owned()
                } else {
                    value.into_owned()
                };
                (name.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.into()
}

/// Kept by hand beside [`url_without_password`]: it hides the password in any text, such as a
/// value that is not a valid URL quoted in an error message, which url::Url cannot read.
///
/// A value with the password of a URL in it (`scheme://user:password@host`) replaced by `***`.
pub(super) fn hide_password(value: &str) -> String {
    let Some(start) = value.find("://").map(|i| i + 3) else {
        return value.to_owned();
    };
    let authority_end = value[start..]
        .find(['/', '?', '#'])
        .map_or(value.len(), |i| start + i);
    let authority = &value[start..authority_end];
    match authority.rfind('@').and_then(|at| {
        let userinfo = &authority[..at];
        userinfo
            .find(':')
            .map(|colon| (start + colon + 1, start + at))
    }) {
        Some((from, to)) if from < to => {
            hide_password_option(&format!("{}***{}", &value[..from], &value[to..]))
        }
        _ => hide_password_option(value),
    }
}

/// A URL with the value of a `password=` option (a PostgreSQL URL may carry one) replaced by
/// `***`.
fn hide_password_option(value: &str) -> String {
    let Some(at) = value.find(['?', '&']).and_then(|query| {
        value[query..]
            .find("password=")
            .map(|at| query + at + "password=".len())
    }) else {
        return value.to_owned();
    };
    let end = value[at..].find('&').map_or(value.len(), |end| at + end);
    format!("{}***{}", &value[..at], &value[end..])
}

/// A value for `msbd config`: control characters (which could fake a line) escaped.
pub(super) fn printable(value: &str) -> String {
    if value.chars().any(char::is_control) {
        value.escape_debug().to_string()
    } else {
        value.to_owned()
    }
}

/// Escapes a Markdown table cell.
fn table_cell(text: &str) -> String {
    text.replace('|', "\\|")
}
