//! The `::progress::` line parser (`sandbox_wrapper::output::parse_progress_line`).
//!
//! Asserts: it never panics; a line it reads has a finite fraction within [0, 1] and a message
//! that is absent or non-empty and trimmed; a line that does not start (after spaces) with
//! `::progress::` is never progress.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sandbox_wrapper::output::parse_progress_line;

fuzz_target!(|data: &[u8]| {
    // The output sink hands the parser each line as lossy UTF-8, without its newline.
    let line = String::from_utf8_lossy(data);
    let Some(progress) = parse_progress_line(&line) else {
        return;
    };
    assert!(
        progress.fraction.is_finite() && (0.0..=1.0).contains(&progress.fraction),
        "fraction {} out of [0, 1] for {line:?}",
        progress.fraction
    );
    assert!(
        line.trim_start().starts_with("::progress::"),
        "{line:?} is not a progress line"
    );
    if let Some(message) = &progress.message {
        assert!(!message.is_empty(), "empty message for {line:?}");
        assert_eq!(message.trim(), message, "untrimmed message for {line:?}");
    }
});
