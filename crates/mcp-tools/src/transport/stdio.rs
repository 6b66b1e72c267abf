//! The stdio transport's input side: newline-delimited JSON-RPC from stdin, with a size limit.
//!
//! rmcp's line codec would buffer a line of any length. [`LimitedLines`] passes each line
//! through unchanged up to the request size limit; a longer one is skipped as it streams in
//! (never held in memory) and replaced by a small request for
//! [`crate::REQUEST_TOO_LARGE_METHOD`] under the same id, which the server answers with a
//! JSON-RPC error that names the limit. A long line without a readable id (a notification) is
//! dropped with a warning. The server goes on serving either way.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::fast_lane::QuickLines;

/// How many bytes at the start of an oversized line are searched for its id.
const ID_WINDOW: usize = 4096;

/// An [`AsyncRead`] over newline-delimited messages that passes each line through unchanged
/// up to `limit` bytes (without the newline) and replaces longer ones as the module says. It
/// reads on the caller's task (no thread or task in between), holding at most one chunk of
/// input and `limit` bytes of the current line.
pub struct LimitedLines<R> {
    inner: R,
    limit: usize,
    /// Bytes ready for the reader.
    out: Vec<u8>,
    /// Where the reader is in `out`.
    out_at: usize,
    /// The current line so far (passed on once its end shows it is within the limit).
    line: Vec<u8>,
    /// Whether the current line is over the limit (being skipped).
    skipping: bool,
    /// The first bytes of a skipped line, for its id.
    head: Vec<u8>,
    /// Bytes of the current line seen so far.
    seen: usize,
    /// The inner reader has ended.
    done: bool,
    scratch: Box<[u8]>,
    /// Where quick calls are taken from their lines (see [`crate::fast_lane::quick_lines`]).
    quick: Option<QuickLines>,
}

impl<R> LimitedLines<R> {
    /// Wraps `inner`.
    pub fn new(inner: R, limit: usize) -> LimitedLines<R> {
        LimitedLines {
            inner,
            limit,
            out: Vec::new(),
            out_at: 0,
            line: Vec::new(),
            skipping: false,
            head: Vec::new(),
            seen: 0,
            done: false,
            scratch: vec![0; 64 * 1024].into_boxed_slice(),
            quick: None,
        }
    }

    /// Gives every whole line within the limit to `quick` first: a line it takes is not
    /// passed on.
    pub fn with_quick_lines(mut self, quick: QuickLines) -> LimitedLines<R> {
        self.quick = Some(quick);
        self
    }

    /// Whether `line` (with its newline) was taken as a quick call.
    fn taken(&self, line: &[u8]) -> bool {
        let Some(quick) = &self.quick else {
            return false;
        };
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        quick.take_line(line)
    }

    /// Takes in a chunk of input.
    fn take(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            let (content, ends_line, taken) = match memchr_newline(input) {
                Some(at) => (&input[..at], true, at + 1),
                None => (input, false, input.len()),
            };
            if !self.skipping && self.seen + content.len() > self.limit {
                self.skipping = true;
                self.head = std::mem::take(&mut self.line);
                self.head.truncate(ID_WINDOW);
            }
            if self.skipping {
                let room = ID_WINDOW.saturating_sub(self.head.len()).min(content.len());
                self.head.extend_from_slice(&content[..room]);
            } else if ends_line && self.line.is_empty() {
                // The common case: a whole line in one chunk goes straight out.
                if !self.taken(&input[..taken]) {
                    self.out.extend_from_slice(&input[..taken]);
                }
            } else {
                self.line.extend_from_slice(&input[..taken]);
            }
            self.seen += content.len();
            if ends_line {
                if self.skipping {
                    self.replace_skipped();
                } else if self.taken(&self.line) {
                    self.line.clear();
                } else {
                    self.out.append(&mut self.line);
                }
                self.seen = 0;
            }
            input = &input[taken..];
        }
    }

    /// Ends a skipped line: a request for the error under its id, or nothing.
    fn replace_skipped(&mut self) {
        match request_id(&self.head) {
            Some(id) => {
                let replacement = serde_json::json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "method": crate::REQUEST_TOO_LARGE_METHOD,
                    "params": { "bytes": self.seen, "limit": self.limit },
                });
                self.out
                    .extend_from_slice(replacement.to_string().as_bytes());
                self.out.push(b'\n');
            }
            None => tracing::warn!(
                bytes = self.seen,
                limit = self.limit,
                "dropped a message over the request size limit that carries no request id"
            ),
        }
        self.head = Vec::new();
        self.skipping = false;
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for LimitedLines<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_at < this.out.len() {
                let n = (this.out.len() - this.out_at).min(buf.remaining());
                buf.put_slice(&this.out[this.out_at..this.out_at + n]);
                this.out_at += n;
                if this.out_at == this.out.len() {
                    this.out.clear();
                    this.out_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.done {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => {
                    let filled = read.filled().len();
                    if filled == 0 {
                        this.done = true;
                        // A last line without a newline goes through as it is.
                        if !this.skipping {
                            let rest = std::mem::take(&mut this.line);
                            this.out.extend_from_slice(&rest);
                        }
                        continue;
                    }
                    let scratch = std::mem::take(&mut this.scratch);
                    this.take(&scratch[..filled]);
                    this.scratch = scratch;
                }
            }
        }
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

/// The JSON text of a request's `"id"` (an integer or a string), from the start of its line.
///
/// Only the top-level key counts (not an `"id"` inside `params`), and the id is written back as
/// JSON, so that the replacement request is always one rmcp reads, under the request's own id.
/// `None` when the window holds no such id (then the line is dropped).
fn request_id(head: &[u8]) -> Option<serde_json::Value> {
    let text = String::from_utf8_lossy(head);
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'"' => {
                let end = string_end(bytes, at)?;
                if depth == 1
                    && &text[at..end] == "\"id\""
                    && let Some(value) = text[end..].trim_start().strip_prefix(':')
                {
                    return id_value(value.trim_start());
                }
                at = end;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at += 1;
    }
    None
}

/// Where the JSON string whose opening quote is at `start` ends: just after its closing quote.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut escaped = false;
    for (i, &byte) in bytes.iter().enumerate().skip(start + 1) {
        match (escaped, byte) {
            (true, _) => escaped = false,
            (false, b'\\') => escaped = true,
            (false, b'"') => return Some(i + 1),
            _ => {}
        }
    }
    None
}

/// An id, checked: a string, or an integer that fits in `i64` and ends where the value ends
/// (not `007`, `1.5`, `1e3`, nor one the window cuts).
fn id_value(value: &str) -> Option<serde_json::Value> {
    if value.starts_with('"') {
        let end = string_end(value.as_bytes(), 0)?;
        let id: String = serde_json::from_str(&value[..end]).ok()?;
        return Some(id.into());
    }
    let end = value.find(|c: char| !(c.is_ascii_digit() || c == '-'))?;
    let (number, rest) = value.split_at(end);
    if !rest.starts_with([',', '}', ' ', '\t', '\r', '\n']) {
        return None;
    }
    let id: i64 = serde_json::from_str(number).ok()?;
    Some(id.into())
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use serde_json::json;

    use super::{LimitedLines, request_id};

    async fn run(input: &[u8], limit: usize) -> String {
        // The input in small pieces, so that lines span chunks.
        let (mut writer, reader) = tokio::io::duplex(7);
        let input = input.to_vec();
        let feeding = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(5) {
                writer.write_all(piece).await.unwrap();
            }
        });
        let mut output = String::new();
        LimitedLines::new(reader, limit)
            .read_to_string(&mut output)
            .await
            .unwrap();
        feeding.await.unwrap();
        output
    }

    #[tokio::test]
    async fn short_lines_pass_unchanged_and_long_ones_become_an_error_request() {
        let big = format!(
            "{{\"jsonrpc\":\"2.0\",\"id\":17,\"method\":\"tools/call\",\"params\":{{\"x\":\"{}\"}}}}\n",
            "a".repeat(500)
        );
        let input = format!("{{\"id\":1}}\n{big}{{\"id\":2}}\nlast");
        let output = run(input.as_bytes(), 100).await;
        let lines: Vec<&str> = output.lines().collect();
        assert_eq!(lines[0], "{\"id\":1}");
        assert!(
            lines[1].contains("\"id\":17") && lines[1].contains("msbd/request_too_large"),
            "{}",
            lines[1]
        );
        assert!(
            lines[1].contains(&format!("\"bytes\":{}", big.len() - 1)),
            "{}",
            lines[1]
        );
        assert_eq!(lines[2], "{\"id\":2}");
        assert_eq!(lines[3], "last");
        let value: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(value["params"]["limit"], 100);
    }

    #[tokio::test]
    async fn a_long_notification_is_dropped() {
        let input = format!(
            "{{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"params\":\"{}\"}}\n{{\"id\":3}}\n",
            "b".repeat(300)
        );
        assert_eq!(run(input.as_bytes(), 50).await, "{\"id\":3}\n");
    }

    #[test]
    fn only_the_top_level_id_counts_and_it_is_written_as_json() {
        // Found by the `stdio_framing` fuzz target: an `"id"` inside `params` was taken for the
        // request's, and an id that is not valid JSON (`007`) or not an integer (`1.5`, read as
        // 1) was copied into the replacement.
        assert_eq!(
            request_id(
                br#"{"jsonrpc":"2.0","method":"tools/call","params":{"arguments":{"id":5}},"id":"r\"9","#
            ),
            Some(json!("r\"9"))
        );
        assert_eq!(
            request_id(br#"{"params":{"x":"\"id\":3"},"id":7}"#),
            Some(json!(7))
        );
        assert_eq!(request_id(br#"{"id":007,"x":"#), None);
        assert_eq!(request_id(br#"{"id":1.5,"x":"#), None);
        assert_eq!(request_id(br#"{"id":"a\qb","x":"#), None);
        // Cut by the window: the number may go on.
        assert_eq!(request_id(br#"{"id":12"#), None);
        assert_eq!(request_id(br#"{"id":"\u00e9","#), Some(json!("\u{e9}")));
        assert_eq!(request_id(br#"{"id" : -42 ,"#), Some(json!(-42)));
    }

    #[tokio::test]
    async fn replacements_are_json_rpc_requests_under_the_request_id() {
        // The input on which the `stdio_framing` fuzz target failed, over a limit of 20 bytes.
        let input = concat!(
            r#"{"id": -42, "method":"dddddddddddddddddddddddddddddddddddddddd"}"#,
            "\n",
            r#"{"id":"\u00e9\\","x":"eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee"}"#,
            "\n",
            r#"{"id":007,"x":"ffffffffffffffffffffffffffffff"}"#,
            "\n",
            r#"{"id":1.5,"x":"gggggggggggggggggggggggggggggg"}"#,
            "\n",
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"arguments":{"id":5}},"id":"r"}"#,
            "\n",
        );
        let output = run(input.as_bytes(), 20).await;
        let ids: Vec<serde_json::Value> = output
            .lines()
            .map(|line| {
                let request: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(request["method"], crate::REQUEST_TOO_LARGE_METHOD, "{line}");
                request["id"].clone()
            })
            .collect();
        assert_eq!(ids, [json!(-42), "\u{e9}\\".into(), "r".into()]);
    }

    #[test]
    fn ids_are_read_as_json() {
        assert_eq!(
            request_id(br#"{"jsonrpc":"2.0","id": 42,"#),
            Some(json!(42))
        );
        assert_eq!(request_id(br#"{"id":"a\"b","method""#), Some(json!("a\"b")));
        assert_eq!(request_id(br#"{"method":"x","params":{"#), None);
        assert_eq!(request_id(br#"{"id":null}"#), None);
    }
}
