//! Stdin for the stdio transport ([`SpinningStdin`]): a pipe that, after an answer went out on
//! stdout ([`Stdout`] arms it), keeps trying for a short while ([`SPIN`]) before it waits for
//! the next request.
//!
//! An MCP client calls, reads the answer, and calls again. Between an answer and the next call,
//! a thread that waits in the kernel lets its CPU halt; on a virtual machine whose guest halts
//! at once (`guest_halt_poll_ns` 0, as on the Intel host of docs/benchmarks.md), waking it for the
//! next call costs an interrupt to a halted vCPU, and the call then runs on cold caches: a quick
//! call over stdio took about 90 µs there, where the same call pinned to one CPU took 24 µs.
//! Trying the pipe for a while after each answer keeps the thread running through a client's
//! quick turn (a loop of `check_task_status`, or `tasks/get` polls).
//!
//! What it costs: nothing in an idle session (the spin follows an answer, never silence), and
//! no answer's delay: the spin holds its thread, so it is armed only by an answer written when
//! no other call is under way (`mcp_tools::FastLane::with_settled` says when that is; a call
//! that overlaps another, or a notification written while a call runs, arms nothing). A spin
//! that finds nothing turns spinning off until a request comes in again. On one CPU there is
//! no spinning at all: it would only keep the client from sending its next call.
//!
//! Not for HTTP: tried on the HTTP server's connections, it made calls slower (about 340 to
//! 410–490 µs, spinning in the thread or yielding between tries), because an answer there goes
//! out in parts (the headers of an event stream, then its event) through another task.

use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;

/// How long a read that finds nothing keeps trying, after an answer went out.
pub(crate) const SPIN: Duration = Duration::from_micros(150);

/// Whether a reader spins.
#[derive(Default)]
struct Spinner {
    /// The last spin found nothing: no spinning until a read brings something.
    quiet: bool,
}

impl Spinner {
    /// Reads `fd` itself (not Tokio's idea of whether it is ready, which changes only when the
    /// reactor, which this thread is not polling meanwhile, hears from the kernel) until
    /// something comes or [`SPIN`] has passed: `None` when nothing came.
    fn spin(&mut self, fd: impl AsFd, buf: &mut ReadBuf<'_>) -> Option<std::io::Result<()>> {
        if self.quiet || buf.remaining() == 0 {
            return None;
        }
        let until = Instant::now() + SPIN;
        loop {
            match nix::unistd::read(&fd, buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Some(Ok(()));
                }
                Err(Errno::EAGAIN | Errno::EINTR) => {}
                Err(errno) => return Some(Err(errno.into())),
            }
            if Instant::now() >= until {
                self.quiet = true;
                return None;
            }
            std::hint::spin_loop();
        }
    }

    /// Notes what a read brought.
    fn read(&mut self, buf: &ReadBuf<'_>, before: usize) {
        if buf.filled().len() > before {
            self.quiet = false;
        }
    }
}

/// Stdin as a pipe, read as the module says.
pub(crate) struct SpinningStdin {
    pipe: pipe::Receiver,
    /// Set when an answer went out ([`Stdout`]): the next read spins before it waits.
    armed: Arc<AtomicBool>,
    spinner: Spinner,
}

impl SpinningStdin {
    /// Stdin, when it is a pipe (what an MCP client that starts msbd gives it) and this
    /// process may use more than one CPU; `None` for anything else (a terminal, a file, a
    /// socket), which the caller reads another way. On one CPU a spin would only keep the
    /// client from running and sending its next call.
    ///
    /// The pipe is opened again through `/proc/self/fd/0`, so that its `O_NONBLOCK` belongs to
    /// this reader alone (not to the process's stdin, which children may inherit).
    pub(crate) fn open(armed: Arc<AtomicBool>) -> Option<SpinningStdin> {
        if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
            return None;
        }
        // Opened non-blocking: the open of a pipe whose writer is gone would wait forever. A
        // terminal opened here must not become msbd's controlling terminal.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits())
            .open("/proc/self/fd/0")
            .ok()?;
        if !file.metadata().ok()?.file_type().is_fifo() {
            return None;
        }
        let pipe = pipe::Receiver::from_file(file).ok()?;
        Some(SpinningStdin {
            pipe,
            armed,
            spinner: Spinner::default(),
        })
    }
}

impl AsyncRead for SpinningStdin {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if this.armed.swap(false, Ordering::AcqRel)
            && let Some(result) = this.spinner.spin(&this.pipe, buf)
        {
            this.spinner.read(buf, before);
            return Poll::Ready(result);
        }
        let polled = Pin::new(&mut this.pipe).poll_read(cx, buf);
        this.spinner.read(buf, before);
        polled
    }
}

/// Stdin as the stdio transport reads it: spinning on a pipe, else rmcp's reader.
pub(crate) enum Stdin {
    /// A pipe (see [`SpinningStdin`]).
    Pipe(SpinningStdin),
    /// Anything else, read by rmcp's reader.
    Other(rmcp::transport::io::StdioReader),
}

impl AsyncRead for Stdin {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stdin::Pipe(pipe) => Pin::new(pipe).poll_read(cx, buf),
            Stdin::Other(other) => Pin::new(other).poll_read(cx, buf),
        }
    }
}

/// Stdout for the stdio transport: rmcp's writer, which arms the stdin's spin (see
/// [`SpinningStdin`]) each time it has written while `settled` says that no call is under way.
pub(crate) struct Stdout {
    pub(crate) inner: rmcp::transport::io::StdioWriter,
    pub(crate) armed: Arc<AtomicBool>,
    pub(crate) settled: Arc<AtomicBool>,
}

impl AsyncWrite for Stdout {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written
            && n > 0
            && this.settled.load(Ordering::Acquire)
        {
            this.armed.store(true, Ordering::Release);
        }
        written
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
