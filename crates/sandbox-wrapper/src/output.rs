//! A task's output: captured to a file with a size cap, readable by cursor while the task runs,
//! with `::progress:: <fraction or percent> [message]` lines turned into progress reports.
//!
//! Three files per sink: the combined output (stdout and stderr interleaved as they were read,
//! with msbd's own notes), and each stream alone beside it ([`stream_path`]: `<path>.stdout`,
//! `<path>.stderr`), each under the same cap. [`OutputStream`] names which one a read wants.
//!
//! Memory stays flat whatever a process prints: bytes go straight to the files (and past the
//! cap they are counted, not kept); only a bounded tail per file and one partial line per
//! stream are held.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// How many bytes of output a task keeps by default (10 MiB).
pub const DEFAULT_OUTPUT_CAP: u64 = 10 * 1024 * 1024;

/// How many bytes of the output's end a result carries.
pub const TAIL_BYTES: usize = 4096;

/// The longest line examined for a progress report; longer lines are output, nothing more.
/// Public only for the fuzz targets (`fuzz/fuzz_targets/output_sink.rs`).
#[doc(hidden)]
pub const MAX_PROGRESS_LINE: usize = 4096;

/// Which of a process's streams bytes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// Which of a sink's files a read wants: both streams interleaved, or one alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputStream {
    /// stdout and stderr interleaved as they were read, with msbd's notes (the sink's path).
    #[default]
    Combined,
    /// Standard output alone.
    Stdout,
    /// Standard error alone.
    Stderr,
}

impl OutputStream {
    /// Every choice, in the order they are offered.
    pub const ALL: [OutputStream; 3] = [
        OutputStream::Combined,
        OutputStream::Stdout,
        OutputStream::Stderr,
    ];

    /// Its name: `combined`, `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Combined => "combined",
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }

    /// The choice a name stands for.
    pub fn parse(name: &str) -> Option<OutputStream> {
        OutputStream::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The file that holds this choice of the output whose combined file is `combined`.
    pub fn path(self, combined: &Path) -> PathBuf {
        match self {
            OutputStream::Combined => combined.to_path_buf(),
            OutputStream::Stdout => stream_path(combined, Stream::Stdout),
            OutputStream::Stderr => stream_path(combined, Stream::Stderr),
        }
    }
}

/// The file that holds one stream alone of the output whose combined file is `combined`:
/// `<combined>.stdout` or `<combined>.stderr`.
pub fn stream_path(combined: &Path, stream: Stream) -> PathBuf {
    let mut name = combined.as_os_str().to_owned();
    name.push(match stream {
        Stream::Stdout => ".stdout",
        Stream::Stderr => ".stderr",
    });
    PathBuf::from(name)
}

/// Every file of the output whose combined file is `combined`: it, then stdout's, then stderr's.
pub fn output_files(combined: &Path) -> [PathBuf; 3] {
    OutputStream::ALL.map(|which| which.path(combined))
}

/// A progress report read from a `::progress::` line.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgressLine {
    /// How far along, from 0 to 1.
    pub fraction: f64,
    /// What the process said it is doing.
    pub message: Option<String>,
}

/// Where a running task's output goes. Shared by reference between the reader of a process's
/// pipes and whoever reads the output while it runs.
pub struct OutputSink {
    path: PathBuf,
    cap: u64,
    state: Mutex<SinkState>,
    progress: watch::Sender<Option<ProgressLine>>,
}

struct SinkState {
    /// The combined file.
    combined: CappedFile,
    /// Each stream's own file: stdout, stderr.
    streams: [CappedFile; 2],
    partial: [Vec<u8>; 2],
    /// Whether the partial line of a stream grew past the examined length (then the rest of the
    /// line is not a progress line).
    overlong: [bool; 2],
}

/// One file of a sink: what it kept, what it dropped past the cap, and its last bytes.
struct CappedFile {
    file: Option<File>,
    written: u64,
    dropped: u64,
    tail: Vec<u8>,
}

impl CappedFile {
    fn create(path: &Path) -> std::io::Result<CappedFile> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        Ok(CappedFile {
            file: Some(file),
            written: 0,
            dropped: 0,
            tail: Vec::new(),
        })
    }

    /// Appends bytes: to the file while under the cap, to the tail always.
    fn write(&mut self, cap: u64, bytes: &[u8]) {
        let room = cap.saturating_sub(self.written);
        let keep = (bytes.len() as u64).min(room) as usize;
        if keep > 0 {
            let failed = match self.file.as_mut() {
                Some(file) => file.write_all(&bytes[..keep]).is_err(),
                None => true,
            };
            if failed {
                // A full disk, say: stop writing rather than fail the task.
                self.file = None;
                self.dropped += keep as u64;
            } else {
                self.written += keep as u64;
            }
        }
        self.dropped += (bytes.len() - keep) as u64;
        self.push_tail(bytes);
    }

    /// Appends a note: notes are short, and one may pass the cap by its own length, never more.
    fn note(&mut self, cap: u64, text: &str) {
        if self.written < cap
            && let Some(file) = self.file.as_mut()
            && file.write_all(text.as_bytes()).is_ok()
        {
            self.written += text.len() as u64;
        }
        self.push_tail(text.as_bytes());
    }

    fn push_tail(&mut self, bytes: &[u8]) {
        let tail = &mut self.tail;
        tail.extend_from_slice(&bytes[bytes.len().saturating_sub(TAIL_BYTES)..]);
        if tail.len() > TAIL_BYTES {
            tail.drain(..tail.len() - TAIL_BYTES);
        }
    }

    fn flush(&mut self) {
        if let Some(file) = self.file.as_mut() {
            let _ = file.flush();
        }
    }
}

impl OutputSink {
    /// Creates (or truncates) the output file at `path` and each stream's file beside it
    /// ([`stream_path`]), each keeping at most `cap` bytes.
    pub fn create(path: impl Into<PathBuf>, cap: u64) -> std::io::Result<OutputSink> {
        let path = path.into();
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let combined = CappedFile::create(&path)?;
        let stdout = CappedFile::create(&stream_path(&path, Stream::Stdout))?;
        let stderr = CappedFile::create(&stream_path(&path, Stream::Stderr))?;
        let (progress, _) = watch::channel(None);
        Ok(OutputSink {
            path,
            cap,
            state: Mutex::new(SinkState {
                combined,
                streams: [stdout, stderr],
                partial: [Vec::new(), Vec::new()],
                overlong: [false, false],
            }),
            progress,
        })
    }

    /// The (combined) output file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Follows the progress lines: the receiver always holds the latest one.
    pub fn progress(&self) -> watch::Receiver<Option<ProgressLine>> {
        self.progress.subscribe()
    }

    /// Appends bytes from a stream: to the combined file and the stream's own, each while under
    /// the cap, to their tails always, and through the progress parser.
    pub fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut state = self.lock();
        state.combined.write(self.cap, bytes);
        state.streams[stream.index()].write(self.cap, bytes);
        let latest = scan_progress(&mut state, stream, bytes);
        drop(state);
        if let Some(line) = latest {
            self.progress.send_replace(Some(line));
        }
    }

    /// Appends a note from msbd itself (not the process), such as why the output stopped: to
    /// the combined output only (neither stream's file has it, since the process wrote neither).
    pub fn note(&self, text: &str) {
        self.lock().combined.note(self.cap, text);
    }

    /// Bytes kept in the combined file, bytes dropped past the cap.
    pub fn sizes(&self) -> (u64, u64) {
        let state = self.lock();
        (state.combined.written, state.combined.dropped)
    }

    /// Bytes kept in a stream's own file, bytes dropped past the cap.
    pub fn stream_sizes(&self, stream: Stream) -> (u64, u64) {
        let state = self.lock();
        let file = &state.streams[stream.index()];
        (file.written, file.dropped)
    }

    /// The combined output's last bytes (at most [`TAIL_BYTES`]), as text.
    pub fn tail(&self) -> String {
        String::from_utf8_lossy(&self.lock().combined.tail).into_owned()
    }

    /// One stream's last bytes (at most [`TAIL_BYTES`]), as text.
    pub fn stream_tail(&self, stream: Stream) -> String {
        String::from_utf8_lossy(&self.lock().streams[stream.index()].tail).into_owned()
    }

    /// Flushes the files.
    pub fn flush(&self) {
        let mut state = self.lock();
        state.combined.flush();
        for file in &mut state.streams {
            file.flush();
        }
    }

    fn lock(&self) -> MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Feeds bytes through the line splitter of their stream and returns the last progress line
/// among the lines they complete.
fn scan_progress(state: &mut SinkState, stream: Stream, bytes: &[u8]) -> Option<ProgressLine> {
    let index = stream.index();
    let mut latest = None;
    let mut rest = bytes;
    while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
        let (line, after) = rest.split_at(newline);
        if !state.overlong[index] {
            let partial = &mut state.partial[index];
            let take = line
                .len()
                .min(MAX_PROGRESS_LINE.saturating_sub(partial.len()));
            partial.extend_from_slice(&line[..take]);
            if take == line.len()
                && let Some(progress) = parse_progress_line(&String::from_utf8_lossy(partial))
            {
                latest = Some(progress);
            }
        }
        state.partial[index].clear();
        state.overlong[index] = false;
        rest = &after[1..];
    }
    if !state.overlong[index] {
        let partial = &mut state.partial[index];
        if partial.len() + rest.len() > MAX_PROGRESS_LINE {
            partial.clear();
            state.overlong[index] = true;
        } else {
            partial.extend_from_slice(rest);
        }
    }
    latest
}

/// Reads a `::progress:: <fraction or percent> [message]` line: `0.25`, `25%`, `25 %` and `25` (a bare number above 1 is a percent) all
/// mean a quarter. Other lines, and values outside 0–1 (0–100 %), are not progress.
pub fn parse_progress_line(line: &str) -> Option<ProgressLine> {
    let rest = line
        .trim_end_matches('\r')
        .trim_start()
        .strip_prefix("::progress::")?;
    let rest = rest.trim_start();
    let (number, message) = match rest.find(char::is_whitespace) {
        Some(at) => (&rest[..at], rest[at..].trim()),
        None => (rest, ""),
    };
    let (number, message) = if let Some(value) = number.strip_suffix('%') {
        (value.parse::<f64>().ok()? / 100.0, message)
    } else if let Some(after) = message.strip_prefix('%') {
        (number.parse::<f64>().ok()? / 100.0, after.trim())
    } else {
        // A bare number: a fraction up to 1, a percent above it (`40` is 40 %).
        let value = number.parse::<f64>().ok()?;
        (if value > 1.0 { value / 100.0 } else { value }, message)
    };
    if !number.is_finite() || !(0.0..=1.0).contains(&number) {
        return None;
    }
    Some(ProgressLine {
        fraction: number,
        message: (!message.is_empty()).then(|| message.to_owned()),
    })
}

/// A piece of a task's output read by cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// The bytes read, as text (invalid UTF-8 replaced).
    pub data: String,
    /// Where the next read starts.
    pub next_cursor: u64,
    /// How many bytes the file holds now.
    pub size: u64,
}

/// Reads up to `max` bytes of an output file from byte `cursor` on. A cursor past the end reads
/// nothing (the output may still grow). A chunk never ends inside a UTF-8 character unless the
/// output itself is not UTF-8.
pub fn read_output(path: &Path, cursor: u64, max: usize) -> std::io::Result<OutputChunk> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    read_chunk(&mut file, size, cursor, max)
}

/// [`read_output`] of a file already open, whose size is `size`.
fn read_chunk(file: &mut File, size: u64, cursor: u64, max: usize) -> std::io::Result<OutputChunk> {
    if cursor >= size {
        return Ok(OutputChunk {
            data: String::new(),
            next_cursor: cursor.min(size),
            size,
        });
    }
    file.seek(SeekFrom::Start(cursor))?;
    let want = ((size - cursor) as usize).min(max);
    let mut buffer = vec![0; want];
    file.read_exact(&mut buffer)?;
    // Stop before a character cut in two, so that the next read starts on its first byte.
    let cut = match std::str::from_utf8(&buffer) {
        Ok(_) => buffer.len(),
        Err(error) if error.error_len().is_none() && error.valid_up_to() > 0 => error.valid_up_to(),
        Err(_) => buffer.len(),
    };
    buffer.truncate(cut);
    Ok(OutputChunk {
        data: String::from_utf8_lossy(&buffer).into_owned(),
        next_cursor: cursor + cut as u64,
        size,
    })
}

/// Reads the last `max` bytes (at most) of an output file, starting on the first byte of a
/// character: the offset the read started at, and the chunk (whose `next_cursor` is the end,
/// to read on from).
pub fn read_output_tail(path: &Path, max: usize) -> std::io::Result<(u64, OutputChunk)> {
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut start = size.saturating_sub(max as u64);
    if start > 0 {
        // Skip the continuation bytes of a character cut at the start (at most 3).
        file.seek(SeekFrom::Start(start))?;
        let mut head = [0u8; 3];
        let read = file.read(&mut head)?;
        let skip = head[..read]
            .iter()
            .take_while(|&&b| b & 0xC0 == 0x80)
            .count();
        start += skip as u64;
    }
    let chunk = read_chunk(&mut file, size, start, max)?;
    Ok((start, chunk))
}

#[cfg(test)]
mod tests {
    use super::parse_progress_line;

    #[test]
    fn a_tail_starts_on_a_character_and_ends_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        std::fs::write(&path, "abc\u{e9}\u{e9}xyz").unwrap(); // é is 2 bytes: 3 + 4 + 3 = 10
        let tail = |max| super::read_output_tail(&path, max).unwrap();
        let (start, chunk) = tail(4);
        assert_eq!((start, chunk.data.as_str()), (7, "xyz"), "cut é skipped");
        assert_eq!((chunk.next_cursor, chunk.size), (10, 10));
        let (start, chunk) = tail(5);
        assert_eq!((start, chunk.data.as_str()), (5, "\u{e9}xyz"));
        let (start, chunk) = tail(100);
        assert_eq!((start, chunk.data.as_str()), (0, "abc\u{e9}\u{e9}xyz"));
        std::fs::write(&path, "").unwrap();
        assert_eq!(tail(10).0, 0);
        assert!(tail(10).1.data.is_empty());
    }

    fn read(line: &str) -> Option<(f64, Option<String>)> {
        parse_progress_line(line).map(|p| (p.fraction, p.message))
    }

    #[test]
    fn progress_lines_take_fractions_and_percents() {
        assert_eq!(read("::progress:: 0.25"), Some((0.25, None)));
        assert_eq!(
            read("::progress:: 40% compiling"),
            Some((0.4, Some("compiling".into())))
        );
        assert_eq!(
            read("::progress:: 40 % compiling"),
            Some((0.4, Some("compiling".into())))
        );
        assert_eq!(
            read("::progress:: 40 compiling"),
            Some((0.4, Some("compiling".into())))
        );
        assert_eq!(read("  ::progress:: 1\r"), Some((1.0, None)));
        assert_eq!(read("::progress:: 100"), Some((1.0, None)));
        for bad in [
            "::progress:: 101",
            "::progress:: -1",
            "::progress:: NaN",
            "::progress:: x",
            "progress 5",
            "::progress::",
        ] {
            assert_eq!(read(bad), None, "{bad}");
        }
    }
}
