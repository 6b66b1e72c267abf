//! `read_task_output`'s cursor: a byte offset into a task's output file, read with
//! `sandbox_wrapper::output::read_output(path, cursor, max)`.
//!
//! The input's first 9 bytes choose a cursor (any `u64`) and `max` (1 to 256 bytes); the rest
//! is the output file. Asserts: no cursor panics; a cursor at or past the end reads nothing
//! and points at the end; a read moves the cursor forward by 1 to `max` bytes and never past
//! the end; reading from 0, passing each answer's `next_cursor` back, reaches the end; when the
//! output is UTF-8 and `max` is at least 4 (the longest character), the chunks put together are
//! exactly the output.

#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sandbox_wrapper::output::read_output;

/// The output file, one per fuzzing process, written anew for each input.
static PATH: LazyLock<PathBuf> = LazyLock::new(|| {
    // In memory where the machine has it: a file written for every input is the slow part.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("msbd-fuzz-output-cursor-{}", std::process::id()))
});

fuzz_target!(|data: &[u8]| {
    let Some((header, output)) = data.split_first_chunk::<9>() else {
        return;
    };
    let cursor = u64::from_le_bytes(header[..8].try_into().expect("eight bytes"));
    // Small cursors most of the time, so that they land inside the output.
    let cursor = if cursor >> 63 == 0 {
        cursor % (output.len() as u64 + 8)
    } else {
        cursor
    };
    let max = 1 + usize::from(header[8]);
    std::fs::write(&*PATH, output).expect("the output file can be written");
    let size = output.len() as u64;

    let chunk = read_output(&PATH, cursor, max).expect("the output file can be read");
    assert_eq!(chunk.size, size);
    if cursor >= size {
        assert!(chunk.data.is_empty());
        assert_eq!(chunk.next_cursor, size);
    } else {
        assert!(
            chunk.next_cursor > cursor && chunk.next_cursor <= (cursor + max as u64).min(size),
            "cursor {cursor}, max {max}, size {size}: next {}",
            chunk.next_cursor
        );
    }

    // Paging from the start.
    let mut at = 0;
    let mut text = String::new();
    while at < size {
        let chunk = read_output(&PATH, at, max).expect("the output file can be read");
        assert!(
            chunk.next_cursor > at && chunk.next_cursor <= (at + max as u64).min(size),
            "cursor {at}, max {max}, size {size}: next {}",
            chunk.next_cursor
        );
        text.push_str(&chunk.data);
        at = chunk.next_cursor;
    }
    if max >= 4
        && let Ok(whole) = std::str::from_utf8(output)
    {
        assert_eq!(text, whole, "max {max}");
    }
});
