//! Interpreters whose state lives on between calls: one long-lived python, node or bash process
//! per session and language, driven by a small script over its standard input.
//!
//! The protocol: msbd writes one line per call (JSON `{"code": ...}` for python and node, base64
//! of the code for bash); the driver runs the code with its output going to its own stdout and
//! stderr (so it streams into the task's output as it comes), then writes `\n<token> <status>`
//! on stdout and `\n<token>` on stderr. The token is random per call and sent with the call, so
//! no output of an earlier call can end a later one; code that goes looking for its own call's
//! token can end that call early, which only fools the code itself. As in a REPL, python and
//! node print the value of a last expression. A timeout or cancel kills the interpreter (its
//! state is lost; the next call starts a fresh one), and the result says so.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};

use super::Tree;
use super::run_clock::RunClock;
use crate::backend::{BackendError, EndReason, ExecControl, Language};
use crate::output::{OutputSink, Stream};

const PYTHON_DRIVER: &str = r#"
import ast, json, os, sys, traceback
proto = os.fdopen(os.dup(0), "r")
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
sys.stdin = open(os.devnull)
scope = {"__name__": "__main__", "__builtins__": __builtins__}
for line in proto:
    ok = True
    request = json.loads(line)
    token = request["token"]
    try:
        tree = ast.parse(request["code"], "<msbd>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<msbd>", "exec"), scope)
        if last is not None:
            value = eval(compile(last, "<msbd>", "eval"), scope)
            if value is not None:
                print(repr(value))
    except SystemExit as exit:
        ok = exit.code in (None, 0)
    except SyntaxError as error:
        ok = False
        traceback.print_exception(type(error), error, None)
    except BaseException as error:
        ok = False
        frames = error.__traceback__
        while frames is not None and frames.tb_frame.f_code.co_filename == "<string>":
            frames = frames.tb_next
        traceback.print_exception(type(error), error, frames)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.stdout.write("\n%s %d\n" % (token, 0 if ok else 1))
    sys.stdout.flush()
    sys.stderr.write("\n%s\n" % token)
    sys.stderr.flush()
"#;

const NODE_DRIVER: &str = r#"
const vm = require('vm');
const util = require('util');
const readline = require('readline');
globalThis.require = require;
const lines = readline.createInterface({ input: process.stdin });
let queue = Promise.resolve();
const done = (token, ok) => new Promise((resolve) => {
  process.stdout.write('\n' + token + ' ' + (ok ? 0 : 1) + '\n', () => {
    process.stderr.write('\n' + token + '\n', resolve);
  });
});
lines.on('line', (line) => {
  queue = queue.then(async () => {
    let ok = true;
    const request = JSON.parse(line);
    try {
      let value = vm.runInThisContext(request.code, { filename: '<msbd>' });
      if (value && typeof value.then === 'function') value = await value;
      if (value !== undefined) console.log(util.inspect(value));
    } catch (error) {
      ok = false;
      const stack = error && error.stack ? String(error.stack) : String(error);
      console.error(stack.split('\n').filter((l) => !/^\s+at /.test(l) || l.includes('<msbd>')).join('\n'));
    }
    await done(request.token, ok);
  });
});
"#;

const BASH_DRIVER: &str = r#"
exec 3<&0 </dev/null
while IFS=' ' read -r __msbd_token __msbd_line <&3; do
  eval "$(printf '%s' "$__msbd_line" | base64 -d)"
  __msbd_status=$?
  printf '\n%s %d\n' "$__msbd_token" "$__msbd_status"
  printf '\n%s\n' "$__msbd_token" >&2
done
"#;

/// The program and arguments that start a language's driver.
pub(crate) fn driver_argv(language: Language) -> Vec<String> {
    let (program, flag, script) = match language {
        Language::Python => ("python3", "-c", PYTHON_DRIVER),
        Language::Node => ("node", "-e", NODE_DRIVER),
        Language::Bash => ("bash", "-c", BASH_DRIVER),
    };
    let mut argv = vec![program.to_owned()];
    if language == Language::Python {
        argv.push("-u".into());
    }
    if language == Language::Bash {
        argv.extend(["--noprofile".into(), "--norc".into()]);
    }
    argv.extend([flag.to_owned(), script.to_owned()]);
    argv
}

/// A random token, fresh per interpreter.
pub(crate) fn new_token() -> String {
    format!(
        "__MSBD_REPL_{:016x}{:016x}__",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// A live interpreter.
pub(crate) struct Interpreter {
    pub(crate) language: Language,
    pub(crate) child: Child,
    /// Keeps the child out of the orphan reaper's reach while it is ours.
    pub(crate) _owned: Option<super::spawn::OwnedPid>,
    pub(crate) stdin: ChildStdin,
    pub(crate) stdout: ChildStdout,
    pub(crate) stderr: ChildStderr,
    pub(crate) tree: Arc<Tree>,
}

/// How a call ended.
pub(crate) struct CallEnd {
    /// The status the driver reported (0 ok, 1 error), or none when the interpreter died.
    pub(crate) status: Option<i32>,
    /// Why it ended.
    pub(crate) reason: EndReason,
    /// Whether the interpreter is still usable.
    pub(crate) alive: bool,
}

/// Splits a stream at the token: passes through what comes before it, holds back what could be
/// the token's beginning.
struct Splitter {
    marker: Vec<u8>,
    pending: Vec<u8>,
    found: bool,
    after: Vec<u8>,
}

impl Splitter {
    fn new(token: &str) -> Splitter {
        let mut marker = b"\n".to_vec();
        marker.extend_from_slice(token.as_bytes());
        Splitter {
            marker,
            pending: Vec::new(),
            found: false,
            after: Vec::new(),
        }
    }

    /// Feeds bytes; returns those that are surely output.
    fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        if self.found {
            self.after.extend_from_slice(bytes);
            return Vec::new();
        }
        self.pending.extend_from_slice(bytes);
        if let Some(at) = find(&self.pending, &self.marker) {
            self.found = true;
            self.after = self.pending.split_off(at + self.marker.len());
            self.pending.truncate(at);
            return std::mem::take(&mut self.pending);
        }
        // Hold back only a tail that could be the marker's beginning (the longest suffix of
        // the pending bytes that is a prefix of the marker): everything else is output now, so
        // a running call's output and progress lines are seen as they come.
        let longest = (self.marker.len() - 1).min(self.pending.len());
        let keep = (1..=longest)
            .rev()
            .find(|&n| self.pending[self.pending.len() - n..] == self.marker[..n])
            .unwrap_or(0);
        let out = self.pending.len() - keep;
        let rest = self.pending.split_off(out);
        std::mem::replace(&mut self.pending, rest)
    }

    /// What is held back (no token came): output after all.
    fn rest(&mut self) -> Vec<u8> {
        if self.found {
            Vec::new()
        } else {
            std::mem::take(&mut self.pending)
        }
    }

    /// The status after the token on stdout (` 0\n`), once the line is complete.
    fn status(&self) -> Option<Option<i32>> {
        let newline = self.after.iter().position(|&b| b == b'\n')?;
        let text = String::from_utf8_lossy(&self.after[..newline]);
        Some(text.trim().parse().ok())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Interpreter {
    /// Runs one call: sends the code, streams the output until the driver reports the end, the
    /// timeout passes or the call is cancelled.
    pub(crate) async fn call(
        &mut self,
        code: &str,
        timeout: Option<Duration>,
        output: &OutputSink,
        control: &mut ExecControl,
    ) -> Result<CallEnd, BackendError> {
        let token = new_token();
        let line = match self.language {
            Language::Bash => format!("{token} {}", base64(code.as_bytes())),
            _ => serde_json::json!({ "code": code, "token": token }).to_string(),
        };
        let mut request = line.into_bytes();
        request.push(b'\n');
        if let Err(error) = self.stdin.write_all(&request).await {
            return Err(BackendError::Unavailable(format!(
                "the {} interpreter is gone ({error}); run the code again to start a fresh one",
                self.language
            )));
        }
        let mut out = Splitter::new(&token);
        let mut err = Splitter::new(&token);
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        let mut out_open = true;
        let mut err_open = true;
        let mut clock = RunClock::start(timeout, &self.tree, &mut control.paused, output);
        // Whatever was held back as a possible token start is output after all.
        let flush = |out: &mut Splitter, err: &mut Splitter| {
            let rest = out.rest();
            if !rest.is_empty() {
                output.write(Stream::Stdout, &rest);
            }
            let rest = err.rest();
            if !rest.is_empty() {
                output.write(Stream::Stderr, &rest);
            }
        };
        loop {
            if let Some(status) = out.status()
                && (err.found || !err_open)
            {
                return Ok(CallEnd {
                    status,
                    reason: EndReason::Exited,
                    alive: true,
                });
            }
            let deadline = clock.deadline();
            tokio::select! {
                read = self.stdout.read(&mut out_buf), if out_open => match read {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => {
                        let pass = out.feed(&out_buf[..n]);
                        if !pass.is_empty() {
                            output.write(Stream::Stdout, &pass);
                        }
                    }
                },
                read = self.stderr.read(&mut err_buf), if err_open => match read {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => {
                        let pass = err.feed(&err_buf[..n]);
                        if !pass.is_empty() {
                            output.write(Stream::Stderr, &pass);
                        }
                    }
                },
                // Both pipes closed without the token: the interpreter died (or closed them and
                // lives on, which the deadline and cancel below still catch).
                _ = self.child.wait(), if !out_open && !err_open => {
                    flush(&mut out, &mut err);
                    let oom = self.tree.group.as_ref().is_some_and(|g| g.oom_kills() > 0);
                    return Ok(CallEnd {
                        status: None,
                        reason: if oom { EndReason::MemoryLimit } else { EndReason::Exited },
                        alive: false,
                    });
                }
                _ = control.cancel.cancelled() => {
                    flush(&mut out, &mut err);
                    self.tree.kill();
                    self.tree.freeze(false);
                    return Ok(CallEnd { status: None, reason: EndReason::Cancelled, alive: false });
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    flush(&mut out, &mut err);
                    self.tree.kill();
                    self.tree.freeze(false);
                    let after_ms = timeout.map_or(0, |t| t.as_millis() as u64);
                    return Ok(CallEnd { status: None, reason: EndReason::TimedOut { after_ms }, alive: false });
                }
                changed = control.paused.changed(), if clock.follows_switch() => {
                    clock.switch_changed(changed, &mut control.paused, &self.tree, output);
                }
            }
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                text.push('=');
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"echo $x\n"), "ZWNobyAkeAo=");
    }

    #[test]
    fn the_splitter_passes_output_and_stops_at_the_token() {
        let mut splitter = Splitter::new("TOK");
        let mut passed = splitter.feed(b"hello\nwor");
        passed.extend(splitter.feed(b"ld\n"));
        passed.extend(splitter.feed(b"\nTO"));
        assert!(splitter.status().is_none());
        passed.extend(splitter.feed(b"K 1\n"));
        assert_eq!(passed, b"hello\nworld\n");
        assert_eq!(splitter.status(), Some(Some(1)));
    }

    #[test]
    fn the_splitter_holds_back_only_what_could_start_the_token() {
        let mut splitter = Splitter::new("TOKEN");
        // Nothing here can begin the token: all of it passes at once.
        assert_eq!(
            splitter.feed(b"::progress:: 50 half"),
            b"::progress:: 50 half"
        );
        // A tail that could: held back until the next bytes say.
        assert_eq!(splitter.feed(b" done\nTO"), b" done");
        assert_eq!(splitter.feed(b"P"), b"\nTOP");
    }
}
