//! A task's output sink (`sandbox_wrapper::output::OutputSink`): the line splitter that feeds
//! `::progress::` lines to the parser, per stream, across writes, and the cap, the file and
//! the tail.
//!
//! The input's first byte chooses the cap; then come writes, each a header byte (bit 0: the
//! stream; the other bits: the length, 127 for "the rest") and its bytes.
//!
//! Asserts, against a model that splits each stream's bytes into whole lines: the latest
//! progress the sink reports is the last progress line (of at most `MAX_PROGRESS_LINE` bytes)
//! among the lines completed so far, whatever the writes' sizes and interleaving; the file
//! holds the first `cap` bytes written, and the rest is counted as dropped; the tail is the
//! last `TAIL_BYTES` bytes written; and the same of each stream's own file and tail, for the
//! bytes of that stream alone. No panic.

#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sandbox_wrapper::output::{
    MAX_PROGRESS_LINE, OutputSink, ProgressLine, Stream, TAIL_BYTES, parse_progress_line,
    stream_path,
};

/// The output file, one per fuzzing process, created anew for each input.
static PATH: LazyLock<PathBuf> = LazyLock::new(|| {
    // In memory where the machine has it: a file written for every input is the slow part.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("msbd-fuzz-output-sink-{}", std::process::id()))
});

fuzz_target!(|data: &[u8]| {
    let Some((&cap, mut rest)) = data.split_first() else {
        return;
    };
    let cap = u64::from(cap) * 41;
    let sink = OutputSink::create(&*PATH, cap).expect("the output file can be created");
    let progress = sink.progress();

    let mut all = Vec::new();
    let mut each: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut model = Model::default();
    while let Some((&header, after)) = rest.split_first() {
        let index = usize::from(header & 1);
        let len = match usize::from(header >> 1) {
            127 => after.len(),
            len => len.min(after.len()),
        };
        let (bytes, after) = after.split_at(len);
        let stream = [Stream::Stdout, Stream::Stderr][index];
        sink.write(stream, bytes);
        model.write(index, bytes);
        all.extend_from_slice(bytes);
        each[index].extend_from_slice(bytes);
        rest = after;

        // After every write, the latest progress is the model's.
        assert_eq!(
            *progress.borrow(),
            model.latest,
            "stdout line so far {:?}\nstderr line so far {:?}",
            String::from_utf8_lossy(&model.partial[0]),
            String::from_utf8_lossy(&model.partial[1])
        );
    }

    let total = all.len() as u64;
    let (written, dropped) = sink.sizes();
    assert_eq!(written, total.min(cap));
    assert_eq!(dropped, total - written);
    sink.flush();
    let file = std::fs::read(&*PATH).expect("the output file can be read");
    assert_eq!(file, &all[..written as usize]);
    let tail = &all[all.len().saturating_sub(TAIL_BYTES)..];
    assert_eq!(sink.tail(), String::from_utf8_lossy(tail));

    for (stream, bytes) in [Stream::Stdout, Stream::Stderr].into_iter().zip(&each) {
        let total = bytes.len() as u64;
        let (written, dropped) = sink.stream_sizes(stream);
        assert_eq!(written, total.min(cap), "{stream:?}");
        assert_eq!(dropped, total - written, "{stream:?}");
        let file = std::fs::read(stream_path(&PATH, stream)).expect("a stream's file can be read");
        assert_eq!(file, &bytes[..written as usize], "{stream:?}");
        let tail = &bytes[bytes.len().saturating_sub(TAIL_BYTES)..];
        assert_eq!(sink.stream_tail(stream), String::from_utf8_lossy(tail), "{stream:?}");
    }
});

/// The simplest splitter: each stream's current line whole, whatever its length.
#[derive(Default)]
struct Model {
    partial: [Vec<u8>; 2],
    latest: Option<ProgressLine>,
}

impl Model {
    fn write(&mut self, index: usize, bytes: &[u8]) {
        for &byte in bytes {
            if byte != b'\n' {
                self.partial[index].push(byte);
                continue;
            }
            let line = std::mem::take(&mut self.partial[index]);
            if line.len() <= MAX_PROGRESS_LINE
                && let Some(progress) = parse_progress_line(&String::from_utf8_lossy(&line))
            {
                self.latest = Some(progress);
            }
        }
    }
}
