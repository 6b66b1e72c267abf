//! The cursor tokens of task listings (`list_tasks`' `cursor` / `next_cursor`, and
//! `manage_background_tasks(action="list")`): `task_core::store::Cursor`, whose text form
//! (`Display`) is what clients get and pass back (`FromStr`).
//!
//! (`read_task_output`'s cursor is a plain byte offset, a JSON number decoded by serde: the
//! `tool_args` target covers its decoding and `output_cursor` what `read_output` does with it.)
//!
//! Asserts: decoding arbitrary text never panics, and its error echoes a bounded part of the
//! input; a decoded cursor encodes to a token that decodes to the same cursor and re-encodes to
//! the same text (canonical form); every position encodes to a token that decodes back to it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use task_core::store::Cursor;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match text.parse::<Cursor>() {
        Ok(cursor) => {
            let token = cursor.to_string();
            assert!(token.starts_with("c1."), "{token:?}");
            let again: Cursor = token
                .parse()
                .unwrap_or_else(|e| panic!("{token:?} (from {text:?}) does not decode: {e}"));
            assert_eq!(again, cursor, "{text:?} -> {token:?}");
            assert_eq!(again.to_string(), token, "{text:?} -> {token:?}");
        }
        Err(error) => {
            // The message quotes at most 40 characters of what was given.
            let message = error.to_string();
            assert!(
                message.chars().count() <= 400,
                "an unbounded error message: {message:?}"
            );
        }
    }

    // Encoding: every position (a listing's sequence number) makes a token that decodes back.
    if let Some(bytes) = data.get(..8) {
        let position = u64::from_le_bytes(bytes.try_into().expect("eight bytes"));
        let token = format!("c1.{position:x}");
        let cursor: Cursor = token
            .parse()
            .unwrap_or_else(|e| panic!("{token:?} does not decode: {e}"));
        assert_eq!(cursor.to_string(), token);
    }
});
