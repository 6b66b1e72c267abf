//! The stdio transport's input side: newline-delimited JSON-RPC from stdin, with a size limit.
//!
//! rmcp's line codec would buffer a line of any length. [`limit_lines`] passes each line
//! through unchanged up to `MSB_MAX_REQUEST_BYTES`; a longer one is skipped as it streams in
//! (never held in memory) and replaced by a small request for
//! [`mcp_tools::REQUEST_TOO_LARGE_METHOD`] under the same id, which the server answers with a
//! JSON-RPC error that names the limit. A long line without a readable id (a notification) is
//! dropped with a warning. The server goes on serving either way.

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// How many bytes at the start of an oversized line are searched for its id.
const ID_WINDOW: usize = 4096;

/// Copies `input` to `output` line by line, replacing lines over `limit` bytes (without the
/// newline) as the module says. Ends at the end of `input` (or when `output` is closed).
pub(crate) async fn limit_lines<R, W>(
    mut input: R,
    mut output: W,
    limit: usize,
) -> std::io::Result<()>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut line: Vec<u8> = Vec::new();
    // Bytes of the current line seen so far, and whether it is being skipped.
    let mut seen = 0usize;
    let mut skipping = false;
    let mut head: Vec<u8> = Vec::new();
    loop {
        let available = input.fill_buf().await?;
        if available.is_empty() {
            // End of input: a last line without a newline goes through as it is.
            if !skipping && !line.is_empty() {
                output.write_all(&line).await?;
                output.flush().await?;
            }
            return Ok(());
        }
        let (chunk, ends_line) = match memchr_newline(available) {
            Some(at) => (&available[..=at], true),
            None => (available, false),
        };
        let taken = chunk.len();
        let content = if ends_line {
            &chunk[..taken - 1]
        } else {
            chunk
        };
        if !skipping {
            if seen + content.len() > limit {
                skipping = true;
                head = line;
                head.extend_from_slice(
                    &content[..(ID_WINDOW.saturating_sub(head.len())).min(content.len())],
                );
                head.truncate(ID_WINDOW);
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        } else if head.len() < ID_WINDOW {
            head.extend_from_slice(&content[..(ID_WINDOW - head.len()).min(content.len())]);
        }
        seen += content.len();
        input.consume(taken);
        if ends_line {
            if skipping {
                match request_id(&head) {
                    Some(id) => {
                        let replacement = format!(
                            "{{\"jsonrpc\":\"2.0\",\"id\":{id},\"method\":\"{}\",\"params\":{{\"bytes\":{seen},\"limit\":{limit}}}}}\n",
                            mcp_tools::REQUEST_TOO_LARGE_METHOD
                        );
                        output.write_all(replacement.as_bytes()).await?;
                    }
                    None => tracing::warn!(
                        bytes = seen,
                        limit,
                        "dropped a message over MSB_MAX_REQUEST_BYTES that carries no request id"
                    ),
                }
                head = Vec::new();
                skipping = false;
            } else {
                output.write_all(&line).await?;
                line.clear();
            }
            output.flush().await?;
            seen = 0;
        }
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

/// The JSON text of a request's `"id"` (a number or a string), from the start of its line.
fn request_id(head: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    let mut from = 0;
    while let Some(at) = text[from..].find("\"id\"") {
        let rest = text[from + at + 4..].trim_start();
        if let Some(value) = rest.strip_prefix(':') {
            let value = value.trim_start();
            if let Some(string) = value.strip_prefix('"') {
                let mut end = None;
                let mut escaped = false;
                for (i, c) in string.char_indices() {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end?;
                return Some(format!("\"{}\"", &string[..end]));
            }
            let digits: String = value
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '-')
                .collect();
            if !digits.is_empty() && digits.parse::<i64>().is_ok() {
                return Some(digits);
            }
            return None;
        }
        from += at + 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::{limit_lines, request_id};

    async fn run(input: &[u8], limit: usize) -> String {
        let mut output = Vec::new();
        limit_lines(
            tokio::io::BufReader::with_capacity(7, input),
            &mut output,
            limit,
        )
        .await
        .unwrap();
        String::from_utf8(output).unwrap()
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
    fn ids_are_read_as_json() {
        assert_eq!(
            request_id(br#"{"jsonrpc":"2.0","id": 42,"#),
            Some("42".into())
        );
        assert_eq!(
            request_id(br#"{"id":"a\"b","method""#),
            Some(r#""a\"b""#.into())
        );
        assert_eq!(request_id(br#"{"method":"x","params":{"#), None);
        assert_eq!(request_id(br#"{"id":null}"#), None);
    }
}
