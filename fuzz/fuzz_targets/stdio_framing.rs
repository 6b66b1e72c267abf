//! The stdio transport's framing: `mcp_tools::transport::LimitedLines`, which passes newline-delimited
//! JSON-RPC lines through up to a size limit and replaces longer ones.
//!
//! The input's first bytes choose the limit, the size of the reader's buffer, the sizes of the
//! chunks the underlying reader yields and where it answers `Pending`; the rest is the stream.
//! `LimitedLines` is polled by hand (no runtime).
//!
//! Asserts its promise: the output is, in order, each input line within the limit passed
//! through unchanged (with its newline, or without one for a last unterminated line), and for
//! each line over the limit either nothing or one replacement line: a JSON-RPC request for
//! `mcp_tools::REQUEST_TOO_LARGE_METHOD` whose params give the line's length and the limit,
//! under an id that rmcp accepts (an integer or a string) and that, when the oversized line is
//! itself a request rmcp would read, is that request's id. Nothing else; no panic; it ends.

#![no_main]

use std::collections::HashSet;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use mcp_tools::REQUEST_TOO_LARGE_METHOD;
use mcp_tools::transport::LimitedLines;
use serde::Deserialize;
use serde_json::Value;
use tokio::io::{AsyncRead, ReadBuf};

/// The bytes of the input that set up the run, before the stream itself.
const HEADER: usize = 7;

fuzz_target!(|data: &[u8]| {
    let Some((header, stream)) = data.split_first_chunk::<HEADER>() else {
        return;
    };
    let limit = usize::from(header[0]);
    let read_size = 1 + usize::from(header[1]) * 4;
    let chunk_sizes = [header[2], header[3], header[4], header[5]].map(|b| 1 + usize::from(b));
    let pending_mask = header[6];

    let reader = ChunkedReader {
        data: stream,
        at: 0,
        chunk_sizes,
        chunk: 0,
        pending_mask,
        pending_now: true,
    };
    let output = read_all(LimitedLines::new(reader, limit), read_size);
    let expected = model(stream, limit);
    if let Err(problem) = matches(&expected, &output, limit, &mut HashSet::new()) {
        panic!(
            "{problem}\nlimit {limit}\ninput  {:?}\noutput {:?}",
            String::from_utf8_lossy(stream),
            String::from_utf8_lossy(&output)
        );
    }
});

/// An in-memory reader that yields its data in the chunk sizes given, cycling through them,
/// and answers `Pending` once before each chunk whose bit is set in `pending_mask`.
struct ChunkedReader<'a> {
    data: &'a [u8],
    at: usize,
    chunk_sizes: [usize; 4],
    chunk: usize,
    pending_mask: u8,
    pending_now: bool,
}

impl AsyncRead for ChunkedReader<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pending_now && this.pending_mask & (1 << (this.chunk % 8)) != 0 {
            this.pending_now = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.pending_now = true;
        let size = this.chunk_sizes[this.chunk % 4]
            .min(buf.remaining())
            .min(this.data.len() - this.at);
        buf.put_slice(&this.data[this.at..this.at + size]);
        this.at += size;
        this.chunk += 1;
        Poll::Ready(Ok(()))
    }
}

/// Everything `reader` yields until its end, read `read_size` bytes at most at a time.
fn read_all(mut reader: LimitedLines<ChunkedReader<'_>>, read_size: usize) -> Vec<u8> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut output = Vec::new();
    let mut buffer = vec![0; read_size];
    let mut polls = 0usize;
    loop {
        polls += 1;
        assert!(polls < 10_000_000, "LimitedLines does not end");
        let mut read = ReadBuf::new(&mut buffer);
        match Pin::new(&mut reader).poll_read(&mut cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => break,
            Poll::Ready(Ok(())) => output.extend_from_slice(read.filled()),
            Poll::Ready(Err(error)) => panic!("an in-memory read failed: {error}"),
            Poll::Pending => {}
        }
    }
    // At the end, it stays at the end.
    let mut read = ReadBuf::new(&mut buffer);
    let again = Pin::new(&mut reader).poll_read(&mut cx, &mut read);
    assert!(
        matches!(again, Poll::Ready(Ok(()))) && read.filled().is_empty(),
        "LimitedLines yields more after its end"
    );
    output
}

/// What the output must be made of, line by line.
enum Expected<'a> {
    /// These exact bytes (a line within the limit, with its newline if it had one).
    Pass(&'a [u8]),
    /// A line over the limit (without its newline): nothing, or its replacement request.
    Oversized(&'a [u8]),
}

fn model(stream: &[u8], limit: usize) -> Vec<Expected<'_>> {
    let mut expected = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let (content, with_newline) = match rest.iter().position(|&b| b == b'\n') {
            Some(at) => (&rest[..at], &rest[..=at]),
            None => (rest, rest),
        };
        expected.push(if content.len() <= limit {
            Expected::Pass(with_newline)
        } else {
            Expected::Oversized(content)
        });
        rest = &rest[with_newline.len()..];
    }
    expected
}

/// Whether `output` is what `expected` allows (trying both readings of an oversized line
/// where the output is ambiguous). `failed` remembers the (expected, output) suffixes, by
/// length, already found not to match, so that the search stays polynomial.
fn matches(
    mut expected: &[Expected<'_>],
    mut output: &[u8],
    limit: usize,
    failed: &mut HashSet<(usize, usize)>,
) -> Result<(), String> {
    loop {
        if failed.contains(&(expected.len(), output.len())) {
            return Err("(as before)".to_owned());
        }
        let Some((first, more)) = expected.split_first() else {
            return if output.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "unexpected output at the end: {:?}",
                    String::from_utf8_lossy(output)
                ))
            };
        };
        match first {
            Expected::Pass(bytes) => match output.strip_prefix(*bytes) {
                Some(after) => {
                    expected = more;
                    output = after;
                }
                None => {
                    return Err(format!(
                        "the line {:?} did not pass through unchanged; output there: {:?}",
                        String::from_utf8_lossy(bytes),
                        String::from_utf8_lossy(&output[..output.len().min(bytes.len() + 40)])
                    ));
                }
            },
            Expected::Oversized(line) => {
                let replaced = match output.iter().position(|&b| b == b'\n') {
                    Some(end) => check_replacement(&output[..end], line, limit)
                        .and_then(|()| matches(more, &output[end + 1..], limit, failed)),
                    None => Err("no replacement line".to_owned()),
                };
                // Or it was dropped. When neither reading fits, the problem reported is the
                // replacement's if the output there looks like one, else what followed.
                let outcome = replaced.or_else(|replacement_problem| {
                    matches(more, output, limit, failed).map_err(|dropped_problem| {
                        let looks_replaced =
                            output.split(|&b| b == b'\n').next().is_some_and(|first| {
                                String::from_utf8_lossy(first).contains(REQUEST_TOO_LARGE_METHOD)
                            });
                        if looks_replaced {
                            format!(
                                "an oversized line ({} bytes, {:?}): {replacement_problem}",
                                line.len(),
                                String::from_utf8_lossy(&line[..line.len().min(80)])
                            )
                        } else {
                            dropped_problem
                        }
                    })
                });
                if outcome.is_err() {
                    failed.insert((expected.len(), output.len()));
                }
                return outcome;
            }
        }
    }
}

/// The fields of a JSON-RPC request that matter here, read as rmcp would: an `id` key given
/// twice is an error.
#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    id: Option<Value>,
}

/// Whether `replacement` is the replacement request for the oversized `line`.
fn check_replacement(replacement: &[u8], line: &[u8], limit: usize) -> Result<(), String> {
    let value: Value = serde_json::from_slice(replacement).map_err(|e| {
        format!(
            "the replacement {:?} is not JSON: {e}",
            String::from_utf8_lossy(replacement)
        )
    })?;
    let id = &value["id"];
    let wanted = serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": REQUEST_TOO_LARGE_METHOD,
        "params": { "bytes": line.len(), "limit": limit },
    });
    if value != wanted {
        return Err(format!("the replacement {value} is not {wanted}"));
    }
    if !(id.is_string() || id.is_i64()) {
        return Err(format!("the replacement's id {id} is not one rmcp accepts"));
    }
    // An oversized line that rmcp would read as a request with an id: a JSON object whose one
    // `id` is an integer or a string.
    if serde_json::from_slice::<Value>(line).is_ok_and(|line| line.is_object())
        && let Ok(Request { id: Some(original) }) = serde_json::from_slice::<Request>(line)
        && (original.is_string() || original.is_i64())
        && *id != original
    {
        return Err(format!(
            "the replacement's id {id} is not the request's id {original}"
        ));
    }
    Ok(())
}
