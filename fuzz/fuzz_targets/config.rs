//! msbd's configuration: `msbd::config::load` over arbitrary variables, then
//! `msbd::config::render` (what `msbd config` prints).
//!
//! The input is a list of records separated by NUL bytes (an environment holds none). A
//! record's first byte chooses its name: one of the `MSB_*` variables of the `variables!` table
//! (most of the time), `HOME`, `XDG_DATA_HOME`, an arbitrary `MSB_` name or an arbitrary name
//! (these two take `NAME=value` from the record); the rest of the record is the value, as lossy
//! UTF-8 like `config::environment`. The first byte of the input chooses the flags
//! (`Overrides`).
//!
//! Asserts: it never panics; an error names a declared variable; a loaded configuration
//! renders one line per variable, in the order of `VARIABLES`, without control characters; a
//! secret (`MSB_AUTH_TOKEN`, `MSB_API_KEY`) never shows in the rendering, the warnings, the
//! error messages or the `Debug` output (more often than with another secret in its place).

#![no_main]

use std::net::SocketAddr;
use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;
use msbd::config::{self, Overrides, Transport, VARIABLES};

/// The longest arbitrary variable name made.
const MAX_NAME_CHARS: usize = 48;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, records)) = data.split_first() else {
        return;
    };
    let overrides = overrides(flags);
    let vars: Vec<(String, String)> = records
        .split(|&b| b == 0)
        .filter_map(|record| {
            let (&selector, value) = record.split_first()?;
            let value = String::from_utf8_lossy(value).into_owned();
            let choice = usize::from(selector) % (VARIABLES.len() + 4);
            Some(match choice.checked_sub(VARIABLES.len()) {
                None if VARIABLES[choice].name == "MSB_HTTP_ADDR" => {
                    ("MSB_HTTP_ADDR".to_owned(), without_dns(value))
                }
                None => (VARIABLES[choice].name.to_owned(), value),
                Some(0) => ("HOME".to_owned(), value),
                Some(1) => ("XDG_DATA_HOME".to_owned(), value),
                Some(other) => {
                    let (name, value) = value.split_once('=').unwrap_or((&value, ""));
                    // Names as long as real ones: an unknown name costs an edit distance to
                    // every variable, which makes long ones slow to fuzz (and nothing else).
                    let name: String = name.chars().take(MAX_NAME_CHARS).collect();
                    let prefix = if other == 2 { "MSB_" } else { "" };
                    (format!("{prefix}{name}"), value.to_owned())
                }
            })
        })
        .collect();

    // The secrets given that can be told apart from everything else printed: at least as long
    // as a valid token, and not part of another name or value. A secret may still equal text
    // printed for another reason (such as an example in a message), so the check is
    // differential: the same variables with each secret changed (every letter and digit
    // rotated, which keeps a token valid) must print the secret as often. A leak prints it
    // more often with the secret given.
    let is_secret = |name: &str| VARIABLES.iter().any(|v| v.secret && v.name == name);
    let secrets: Vec<String> = vars
        .iter()
        .filter(|(name, _)| is_secret(name))
        .map(|(_, value)| value.trim().to_owned())
        .filter(|secret| {
            secret.len() >= 16
                && !vars.iter().any(|(name, value)| {
                    name.contains(secret.as_str())
                        || (value.trim() != secret && value.contains(secret.as_str()))
                })
        })
        .collect();
    let printed_anyway = if secrets.is_empty() {
        String::new()
    } else {
        let changed: Vec<(String, String)> = vars
            .iter()
            .map(|(name, value)| {
                let value = if is_secret(name) {
                    value.chars().map(rotate).collect()
                } else {
                    value.clone()
                };
                (name.clone(), value)
            })
            .collect();
        everything_printed(&config::load(changed, &overrides))
    };
    let hidden = |what: &str, text: &str| {
        for secret in &secrets {
            let anyway = printed_anyway.matches(secret.as_str()).count();
            assert!(
                text.matches(secret.as_str()).count() <= anyway,
                "{what} shows the secret {secret:?}:\n{text}"
            );
        }
    };

    match config::load(vars.clone(), &overrides) {
        Ok(loaded) => {
            let rendered = config::render(&loaded);
            let lines: Vec<&str> = rendered.split_terminator('\n').collect();
            assert_eq!(lines.len(), VARIABLES.len(), "{rendered}");
            for (line, variable) in lines.iter().zip(VARIABLES) {
                assert!(
                    line.starts_with(&format!("{}=", variable.name)),
                    "{line:?} is not {}",
                    variable.name
                );
                assert!(!line.chars().any(char::is_control), "{line:?}");
            }
            hidden("the rendering", &rendered);
            hidden("the warnings", &loaded.warnings.join("\n"));
            hidden("Debug", &format!("{loaded:?}"));
        }
        Err(errors) => {
            assert!(!errors.errors.is_empty(), "an error without a problem");
            for error in &errors.errors {
                assert!(
                    VARIABLES.iter().any(|v| v.name == error.variable),
                    "{} is not a variable",
                    error.variable
                );
                hidden("an error", &error.message);
            }
            hidden("the warnings", &errors.warnings.join("\n"));
            hidden("Debug", &format!("{errors:?}"));
        }
    }
});

/// Every text a load's outcome prints, each as it is printed: the messages as they are, not
/// only inside `Debug`, which escapes some characters (`\u{19e59}`) so that a secret holding
/// them would not be found there.
fn everything_printed(outcome: &Result<config::Loaded, config::ConfigErrors>) -> String {
    match outcome {
        Ok(loaded) => format!(
            "{}\n{}\n{loaded:?}",
            config::render(loaded),
            loaded.warnings.join("\n")
        ),
        Err(errors) => {
            let messages: Vec<&str> = errors.errors.iter().map(|e| e.message.as_str()).collect();
            format!(
                "{}\n{}\n{errors:?}",
                messages.join("\n"),
                errors.warnings.join("\n")
            )
        }
    }
}

/// A letter or digit rotated by one (`a` → `b`, `z` → `a`, `9` → `0`); anything else as is.
fn rotate(c: char) -> char {
    let next = |first: u8, len: u8| char::from(first + ((c as u8 - first + 1) % len));
    match c {
        'a'..='z' => next(b'a', 26),
        'A'..='Z' => next(b'A', 26),
        '0'..='9' => next(b'0', 10),
        other => other,
    }
}

/// `MSB_HTTP_ADDR` as given, except that a host name msbd would resolve becomes `localhost`
/// (resolved from /etc/hosts): the fuzzer must not send a DNS query per input.
fn without_dns(value: String) -> String {
    if value.trim().parse::<SocketAddr>().is_ok() {
        return value;
    }
    match value.trim().rsplit_once(':') {
        // The hosts msbd::config resolves (the others are refused before any lookup).
        Some((host, port))
            if host != "localhost"
                && !host.is_empty()
                && !host.contains([':', '[', ']', ' ', '/'])
                && port.parse::<u16>().is_ok() =>
        {
            format!("localhost:{port}")
        }
        _ => value,
    }
}

/// The flags, from the bits of one byte.
fn overrides(flags: u8) -> Overrides {
    let bit = |n: u8| flags & (1 << n) != 0;
    Overrides {
        transport: match (bit(0), bit(1)) {
            (false, false) => None,
            (true, false) => Some(Transport::Stdio),
            (_, true) => Some(Transport::Http),
        },
        listen: bit(2).then(|| {
            if bit(3) {
                SocketAddr::from(([0, 0, 0, 0], 8765)).to_string()
            } else {
                "localhost:0".to_owned()
            }
        }),
        data_dir: bit(4).then(|| PathBuf::from(if bit(3) { "relative/dir" } else { "/srv/msbd" })),
        log_level: match (bit(5), bit(6)) {
            (false, _) => None,
            (true, false) => Some("debug".to_owned()),
            (true, true) => Some("msbd=trace,not a directive!".to_owned()),
        },
        // `--console`: a loopback address, or one beyond it (which needs a token).
        console: bit(7).then(|| {
            if bit(3) {
                SocketAddr::from(([0, 0, 0, 0], 8766)).to_string()
            } else {
                "127.0.0.1:0".to_owned()
            }
        }),
    }
}
