//! A session's process spawner: one long-lived process inside the session's sandbox (its
//! bubblewrap namespaces, its uid, seccomp and Landlock) that forks each `command` run of the
//! session, instead of a new bubblewrap per run.
//!
//! Started once per session by bubblewrap, like any sandboxed program (through the Landlock
//! shim, which then execs the shim binary again with [`SPAWNER_FLAG`]); msbd talks to it over a
//! `SOCK_SEQPACKET` control socket. Per run, msbd sends the run's argv, environment and work
//! directory with four descriptors: the run's stdin, stdout and stderr, and one end of a fresh
//! socket pair for the run (its *sync* socket). The spawner forks a child that starts a session of
//! its own, takes the three standard descriptors, says `R` on the sync socket and waits. The
//! kernel attaches the sender's credentials to that message, so msbd reads the child's pid *in
//! the host's pid namespace*, moves the child into the run's own cgroup (it writes
//! `cgroup.procs` from outside the sandbox), and answers `G`; only then does the child exec the
//! program. When the child ends, the spawner (its parent) reaps it and sends `X` and the raw wait
//! status on the sync socket. The sync descriptor is close-on-exec: the program never holds it.
//!
//! msbd trusts nothing it reads from the spawner beyond these few bytes: it sits inside the
//! sandbox. Every wait for the spawner has a deadline, and any failure before the child execs
//! makes the run fall back to a bubblewrap of its own (the run has not started then).
//!
//! The spawner is single-threaded (a fresh exec of the shim binary that starts no threads), so
//! its forked children may allocate before they exec.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use nix::libc;
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

/// The first argument that makes the shim binary act as a session's spawner; the second is the
/// control socket's descriptor number.
pub(crate) const SPAWNER_FLAG: &str = "--msbd-session-spawner";

/// The spawner is up (on the control socket, once).
const HELLO: u8 = b'H';
/// A run's child is forked and waits to be moved into its cgroup (child → msbd).
const READY: u8 = b'R';
/// The child may exec (msbd → child).
const GO: u8 = b'G';
/// The child ended; the raw wait status follows (spawner → msbd).
const EXITED: u8 = b'X';
/// The spawner could not fork; the errno follows (spawner → msbd).
const FORK_FAILED: u8 = b'F';

/// The largest request (argv and environment as JSON) sent to a spawner; a larger one runs in a
/// bubblewrap of its own.
pub(crate) const MAX_REQUEST: usize = 160 * 1024;

/// One run, as msbd asks the spawner for it.
#[derive(Serialize, Deserialize)]
struct Request {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
}

// ---------------------------------------------------------------------------------------------
// Inside the sandbox.

/// Serves runs on the control socket whose number is the first of `args` until msbd closes it
/// (then exits 0). Returns only on failure, with why.
pub(crate) fn serve(args: &[OsString]) -> String {
    let Some(fd) = args
        .first()
        .and_then(|a| a.to_str())
        .and_then(|a| a.parse::<RawFd>().ok())
        .filter(|fd| *fd > 2)
    else {
        return format!("{SPAWNER_FLAG} needs the control socket's descriptor number");
    };
    // SAFETY: msbd passed this descriptor open to this process, which owns it from here on.
    let control = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(control.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        return format!("the control socket: {}", std::io::Error::last_os_error());
    }
    // Not dumpable: the session's programs (same uid) can neither read its memory nor open its
    // descriptors through /proc.
    if let Err(error) = nix::sys::prctl::set_dumpable(false) {
        return format!("prctl(PR_SET_DUMPABLE): {error}");
    }
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGCHLD);
    if let Err(error) = mask.thread_block() {
        return format!("blocking SIGCHLD: {error}");
    }
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    let signals = match SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
    {
        Ok(signals) => signals,
        Err(error) => return format!("signalfd: {error}"),
    };
    if let Err(error) = socket::send(control.as_raw_fd(), &[HELLO], MsgFlags::MSG_NOSIGNAL) {
        return format!("saying hello: {error}");
    }
    let mut runs: HashMap<i32, OwnedFd> = HashMap::new();
    let mut buffer = vec![0u8; MAX_REQUEST + 1024];
    loop {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let (control_ready, signalled) = {
            let mut fds = [
                PollFd::new(control.as_fd(), PollFlags::POLLIN),
                PollFd::new(signals.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(error) => return format!("poll: {error}"),
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if signalled {
            while let Ok(Some(_)) = signals.read_signal() {}
            reap(&mut runs);
        }
        if control_ready {
            match receive(&control, &mut buffer) {
                Received::Closed => std::process::exit(0),
                Received::Nothing => {}
                Received::Run(request, fds) => start(
                    request,
                    fds,
                    &control,
                    signals.as_fd().as_raw_fd(),
                    &mut runs,
                ),
                Received::Failed(error) => return format!("reading the control socket: {error}"),
            }
        }
    }
}

enum Received {
    /// msbd closed the control socket.
    Closed,
    /// A message that asked for nothing usable (its descriptors are closed).
    Nothing,
    Run(Request, [OwnedFd; 4]),
    Failed(nix::errno::Errno),
}

fn receive(control: &OwnedFd, buffer: &mut [u8]) -> Received {
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut fds = Vec::new();
    let (bytes, truncated) = {
        let mut iov = [IoSliceMut::new(buffer)];
        let message = match socket::recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(message) => message,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return Received::Nothing,
            Err(error) => return Received::Failed(error),
        };
        if let Ok(cmsgs) = message.cmsgs() {
            for cmsg in cmsgs {
                if let ControlMessageOwned::ScmRights(list) = cmsg {
                    // SAFETY: the kernel just installed these descriptors in this process.
                    fds.extend(
                        list.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        let truncated = message
            .flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
        (message.bytes, truncated)
    };
    if bytes == 0 && fds.is_empty() {
        return Received::Closed;
    }
    let Ok(fds): Result<[OwnedFd; 4], _> = fds.try_into() else {
        return Received::Nothing;
    };
    if truncated {
        return Received::Nothing;
    }
    match serde_json::from_slice::<Request>(&buffer[..bytes]) {
        Ok(request) if !request.argv.is_empty() => Received::Run(request, fds),
        _ => Received::Nothing,
    }
}

/// What a child needs, made before the fork.
struct Prepared {
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// The paths to try, in order (the program, or each `PATH` entry joined with it).
    candidates: Vec<CString>,
    cwd: CString,
    /// The program as given, for the error message.
    program: OsString,
}

fn prepare(request: Request) -> Option<Prepared> {
    let program = request.argv[0].clone();
    let argv = request
        .argv
        .into_iter()
        .map(CString::new)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let path = request
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone());
    let envp = request
        .env
        .into_iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let candidates = if program.contains('/') {
        vec![CString::new(program.clone()).ok()?]
    } else {
        // As execvp: each PATH entry in turn (an empty entry is the current directory).
        path.as_deref()
            .unwrap_or("/usr/local/bin:/usr/bin:/bin")
            .split(':')
            .map(|dir| {
                let dir = if dir.is_empty() { "." } else { dir };
                CString::new(format!("{dir}/{program}"))
            })
            .collect::<Result<Vec<_>, _>>()
            .ok()?
    };
    Some(Prepared {
        argv,
        envp,
        candidates,
        cwd: CString::new(request.cwd).ok()?,
        program: program.into(),
    })
}

/// Forks the child of one run; the parent keeps the run's sync socket to report its end.
fn start(
    request: Request,
    [stdin, stdout, stderr, sync]: [OwnedFd; 4],
    control: &OwnedFd,
    signals: RawFd,
    runs: &mut HashMap<i32, OwnedFd>,
) {
    let Some(prepared) = prepare(request) else {
        // Dropping the sync socket tells msbd (end of file before `R`).
        return;
    };
    let parent = nix::unistd::getpid();
    // SAFETY: this process is single-threaded (see the module's documentation), so the child
    // may run ordinary code until it execs or exits; it never returns from `child`.
    match unsafe { nix::unistd::fork() } {
        Err(errno) => {
            let mut message = vec![FORK_FAILED];
            message.extend_from_slice(&(errno as i32).to_le_bytes());
            let _ = socket::send(sync.as_raw_fd(), &message, MsgFlags::MSG_NOSIGNAL);
        }
        Ok(nix::unistd::ForkResult::Child) => child(
            &prepared,
            [&stdin, &stdout, &stderr, &sync],
            [control.as_raw_fd(), signals],
            runs,
            parent,
        ),
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            runs.insert(child.as_raw(), sync);
        }
    }
}

/// The forked child: becomes the run's process and execs the program, or exits.
fn child(
    prepared: &Prepared,
    [stdin, stdout, stderr, sync]: [&OwnedFd; 4],
    spawners: [RawFd; 2],
    runs: &HashMap<i32, OwnedFd>,
    parent: nix::unistd::Pid,
) -> ! {
    // SAFETY: plain system calls on descriptors and values this process owns; the process
    // execs or exits at the end, so the descriptors closed here by number are never used again.
    unsafe {
        for fd in spawners
            .into_iter()
            .chain(runs.values().map(AsRawFd::as_raw_fd))
        {
            libc::close(fd);
        }
        let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::setsid();
        // Dies with the spawner, as a bubblewrap's program dies with bubblewrap.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() != parent.as_raw() {
            libc::_exit(137);
        }
        for (fd, target) in [(stdin, 0), (stdout, 1), (stderr, 2)] {
            if libc::dup2(fd.as_raw_fd(), target) < 0 {
                libc::_exit(127);
            }
        }
        // The kernel attaches this process's credentials: msbd reads its pid from them.
        if libc::send(
            sync.as_raw_fd(),
            [READY].as_ptr().cast(),
            1,
            libc::MSG_NOSIGNAL,
        ) != 1
        {
            libc::_exit(127);
        }
        let mut answer = [0u8; 1];
        let read = libc::recv(sync.as_raw_fd(), answer.as_mut_ptr().cast(), 1, 0);
        if read != 1 || answer[0] != GO {
            libc::_exit(127);
        }
        if libc::chdir(prepared.cwd.as_ptr()) < 0 {
            fail(
                &prepared.program,
                &format!("cannot enter {:?}", prepared.cwd),
                std::io::Error::last_os_error(),
            );
        }
        let mut argv: Vec<*const libc::c_char> = prepared.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = prepared.envp.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let mut error = std::io::Error::from_raw_os_error(libc::ENOENT);
        let mut denied = None;
        for candidate in &prepared.candidates {
            libc::execve(candidate.as_ptr(), argv.as_ptr(), envp.as_ptr());
            error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::ENOEXEC) {
                // As execvp: a file without a known format is a shell script.
                let mut script: Vec<*const libc::c_char> =
                    vec![c"/bin/sh".as_ptr(), candidate.as_ptr()];
                script.extend(&argv[1..]);
                libc::execve(c"/bin/sh".as_ptr(), script.as_ptr(), envp.as_ptr());
                error = std::io::Error::from_raw_os_error(libc::ENOEXEC);
            }
            match error.raw_os_error() {
                Some(libc::ENOENT | libc::ENOTDIR) => {}
                Some(libc::EACCES) => {
                    denied = Some(std::io::Error::from_raw_os_error(libc::EACCES))
                }
                _ => break,
            }
        }
        fail(&prepared.program, "could not run", denied.unwrap_or(error));
    }
}

/// Says on the run's stderr why its program did not start, as the Landlock shim does, and exits
/// 126.
fn fail(program: &OsString, what: &str, error: std::io::Error) -> ! {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "msbd sandbox shim: {what} {program:?}: {error}"
    );
    // SAFETY: ends the process at once.
    unsafe { libc::_exit(126) }
}

/// Reaps the ended children and reports each one's wait status on its run's sync socket.
fn reap(runs: &mut HashMap<i32, OwnedFd>) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a pointer to a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if let Some(sync) = runs.remove(&pid) {
            let mut message = vec![EXITED];
            message.extend_from_slice(&status.to_le_bytes());
            let _ = socket::send(sync.as_raw_fd(), &message, MsgFlags::MSG_NOSIGNAL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// In msbd.

/// How long msbd waits for a spawner to say hello, or for a run's child to say it is ready.
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

/// msbd's end of a socket to a spawner or to one of its runs.
pub(crate) struct Channel(AsyncFd<OwnedFd>);

/// A message from the spawner side, with the sender's pid and uid (in msbd's namespaces).
pub(crate) struct Message {
    pub(crate) bytes: Vec<u8>,
    pub(crate) pid: Option<i32>,
    pub(crate) uid: Option<u32>,
}

impl Channel {
    /// A new socket pair: msbd's end (which receives the senders' credentials), and the end to
    /// hand over.
    pub(crate) fn pair() -> std::io::Result<(Channel, OwnedFd)> {
        let (ours, theirs) = socket::socketpair(
            socket::AddressFamily::Unix,
            socket::SockType::SeqPacket,
            None,
            socket::SockFlag::SOCK_CLOEXEC | socket::SockFlag::SOCK_NONBLOCK,
        )?;
        socket::setsockopt(&ours, socket::sockopt::PassCred, &true)?;
        // The other end blocks: the spawner and its children wait on it.
        // SAFETY: fcntl on a descriptor we own.
        unsafe {
            let flags = libc::fcntl(theirs.as_raw_fd(), libc::F_GETFL);
            if flags < 0
                || libc::fcntl(theirs.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: an `OwnedFd` is open and keeps its descriptor until the `AsyncFd` drops it.
        let ours = unsafe { AsyncFd::register_with_interest(ours, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok((Channel(ours), theirs))
    }

    /// Sends bytes, and descriptors with them; never waits (a full socket is an error).
    pub(crate) fn send(&self, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let iov = [IoSlice::new(bytes)];
        let rights = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
        let sent = socket::sendmsg::<()>(
            self.0.get_ref().as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        if sent != bytes.len() {
            return Err(std::io::Error::other("a short send on a packet socket"));
        }
        Ok(())
    }

    /// The next message, or `None` at end of file.
    pub(crate) async fn receive(&self) -> std::io::Result<Option<Message>> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| receive_now(fd.get_ref())) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// [`Channel::receive`] within [`DEADLINE`].
    pub(crate) async fn receive_soon(&self) -> std::io::Result<Option<Message>> {
        tokio::time::timeout(DEADLINE, self.receive())
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", DEADLINE.as_secs()),
                )
            })?
    }
}

fn receive_now(fd: &OwnedFd) -> std::io::Result<Option<Message>> {
    let mut buffer = [0u8; 16];
    let mut cmsg = nix::cmsg_space!(socket::UnixCredentials);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    let message = socket::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let bytes = message.bytes;
    let (mut pid, mut uid) = (None, None);
    if let Ok(cmsgs) = message.cmsgs() {
        for cmsg in cmsgs {
            match cmsg {
                ControlMessageOwned::ScmCredentials(credentials) => {
                    pid = Some(credentials.pid()).filter(|p| *p > 0);
                    uid = Some(credentials.uid());
                }
                ControlMessageOwned::ScmRights(list) => {
                    // Nothing is expected from the sandbox side: closed at once.
                    for fd in list {
                        // SAFETY: the kernel just installed this descriptor in this process.
                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
                _ => {}
            }
        }
    }
    if bytes == 0 {
        return Ok(None);
    }
    Ok(Some(Message {
        bytes: buffer[..bytes.min(buffer.len())].to_vec(),
        pid,
        uid,
    }))
}

/// The request bytes for one run.
pub(crate) fn request(
    argv: &[String],
    env: &[(String, String)],
    cwd: &std::path::Path,
) -> Option<Vec<u8>> {
    let request = Request {
        argv: argv.to_vec(),
        env: env.to_vec(),
        cwd: cwd.to_str()?.to_owned(),
    };
    let bytes = serde_json::to_vec(&request).ok()?;
    (bytes.len() <= MAX_REQUEST).then_some(bytes)
}

/// What a message from the spawner side says.
pub(crate) enum Said {
    Hello,
    Ready,
    Exited(std::process::ExitStatus),
    ForkFailed(std::io::Error),
    Garbage,
}

pub(crate) fn parse(bytes: &[u8]) -> Said {
    use std::os::unix::process::ExitStatusExt;
    let number = || -> Option<i32> { Some(i32::from_le_bytes(bytes.get(1..5)?.try_into().ok()?)) };
    match (bytes.first(), bytes.len()) {
        (Some(&HELLO), 1) => Said::Hello,
        (Some(&READY), 1) => Said::Ready,
        (Some(&EXITED), 5) => number().map_or(Said::Garbage, |s| {
            Said::Exited(std::process::ExitStatus::from_raw(s))
        }),
        (Some(&FORK_FAILED), 5) => number().map_or(Said::Garbage, |e| {
            Said::ForkFailed(std::io::Error::from_raw_os_error(e))
        }),
        _ => Said::Garbage,
    }
}

/// The answer that lets a ready child exec.
pub(crate) const GO_AHEAD: [u8; 1] = [GO];

/// The spawner's path in the sandbox's argv (the shim binary, bound at the shim's path), with
/// its flag and the control socket's number.
pub(crate) fn argv(control_fd: RawFd) -> Vec<String> {
    vec![
        super::shim::SHIM_PATH.to_owned(),
        SPAWNER_FLAG.to_owned(),
        control_fd.to_string(),
    ]
}

/// Whether an argument is the spawner's flag (for the shim's entry point).
pub(crate) fn is_flag(arg: &std::ffi::OsStr) -> bool {
    arg.as_bytes() == SPAWNER_FLAG.as_bytes()
}

/// A copy of `fd` at a number at least `min`, close-on-exec.
pub(crate) fn dup_above(fd: &OwnedFd, min: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: fcntl on a descriptor we own; the new descriptor is owned at once.
    unsafe {
        let new = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min);
        if new < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(new))
    }
}

/// A live spawner, as msbd holds it.
pub(crate) struct SessionSpawner {
    control: Channel,
    /// bubblewrap around it (killed when this is dropped).
    child: std::sync::Mutex<tokio::process::Child>,
    _owned: Option<super::spawn::OwnedPid>,
    /// Its cgroup (bubblewrap, its init and the spawner), removed when this is dropped.
    group: Option<super::cgroup::Group>,
    /// Set when it misbehaved: the next run starts a new one.
    broken: std::sync::atomic::AtomicBool,
    /// Copies what it says on stderr to the log.
    _stderr: Option<super::AbortOnDrop>,
}

impl SessionSpawner {
    /// Waits for a just-started spawner's hello (within [`DEADLINE`]); kills it when none comes.
    pub(crate) async fn greet(
        control: Channel,
        mut child: tokio::process::Child,
        owned: Option<super::spawn::OwnedPid>,
        group: super::cgroup::Group,
        expected_uid: Option<u32>,
        session: &str,
    ) -> Result<SessionSpawner, String> {
        let stderr = child.stderr.take().map(|stderr| {
            let session = session.to_owned();
            super::AbortOnDrop(tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(%session, "session spawner: {line}");
                }
            }))
        });
        let spawner = SessionSpawner {
            control,
            child: std::sync::Mutex::new(child),
            _owned: owned,
            group: Some(group),
            broken: std::sync::atomic::AtomicBool::new(false),
            _stderr: stderr,
        };
        let hello = spawner.control.receive_soon().await;
        match hello {
            Ok(Some(message))
                if matches!(parse(&message.bytes), Said::Hello)
                    && (expected_uid.is_none() || message.uid == expected_uid) =>
            {
                Ok(spawner)
            }
            Ok(Some(_)) => Err("it said something other than hello".into()),
            Ok(None) => {
                let status = spawner.lock_child().try_wait().ok().flatten();
                Err(match status {
                    Some(status) => format!("it ended before it was ready ({status})"),
                    None => "it closed its socket before it was ready".into(),
                })
            }
            Err(error) => Err(format!("waiting for it: {error}")),
        }
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, tokio::process::Child> {
        self.child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether it runs and has not misbehaved.
    pub(crate) fn alive(&self) -> bool {
        !self.broken.load(std::sync::atomic::Ordering::Acquire)
            && matches!(self.lock_child().try_wait(), Ok(None))
    }

    /// Marks it for replacement at the next run.
    pub(crate) fn mark_broken(&self) {
        self.broken
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for SessionSpawner {
    fn drop(&mut self) {
        let _ = self.lock_child().start_kill();
        if let Some(group) = self.group.take() {
            group.remove(Duration::from_millis(200));
        }
    }
}

/// Why a run did not start through the spawner (it then takes a bubblewrap of its own).
pub(crate) enum SpawnError {
    /// The spawner misbehaved (no answer, a wrong one, a closed socket): replace it.
    Spawner(String),
    /// This run could not start there (a fork or a cgroup move failed); the spawner is fine.
    Run(String),
}

/// A run started through a spawner.
pub(crate) struct SpawnedRun {
    sync: Channel,
    pub(crate) stdin: Option<tokio::net::unix::pipe::Sender>,
    pub(crate) stdout: Option<tokio::net::unix::pipe::Receiver>,
    pub(crate) stderr: Option<tokio::net::unix::pipe::Receiver>,
    /// Whether the spawner failed (ended, or stopped answering) before it reported the run's
    /// end.
    lost: bool,
    /// Kept until the run ends: a replaced spawner lives on until its last run ends.
    spawner: Arc<SessionSpawner>,
    /// The child's pid in msbd's namespace, and a pidfd that becomes readable when it ends (none
    /// where the kernel lacks `pidfd_open`): a run whose spawner stops answering still ends.
    pid: i32,
    leader: Option<AsyncFd<OwnedFd>>,
    /// When the child has ended: the spawner's report is awaited until then, no longer.
    report_by: Option<tokio::time::Instant>,
}

/// How long after a run's child ends its spawner may take to report it.
const REPORT_GRACE: Duration = Duration::from_secs(5);

/// A pidfd for a process (Linux 5.3), registered with Tokio; `None` where it cannot be had.
fn pidfd(pid: i32) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor, owned at once.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just made this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    // SAFETY: an `OwnedFd` is open and keeps its descriptor until the `AsyncFd` drops it.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

/// A zombie's wait status, from `/proc/<pid>/stat` (its 52nd field, `exit_code`), while nobody
/// has reaped it.
fn zombie_status(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    if fields.first() != Some(&"Z") {
        return None;
    }
    fields.get(52 - 3)?.parse().ok()
}

use std::sync::Arc;

/// Waits until a pidfd says its process ended.
async fn ended(leader: &Option<AsyncFd<OwnedFd>>) -> std::io::Result<()> {
    match leader {
        Some(fd) => fd.readable().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

impl SpawnedRun {
    /// Asks the spawner for a run (`request` made by [`request`]), moves its child into the run's
    /// cgroup (whose open `cgroup.procs` are `cgroup_procs`) and lets it exec.
    pub(crate) async fn start(
        spawner: &Arc<SessionSpawner>,
        request: &[u8],
        stdin: bool,
        cgroup_procs: &[OwnedFd],
        expected_uid: Option<u32>,
    ) -> Result<SpawnedRun, SpawnError> {
        let local = |what: &str, error: std::io::Error| SpawnError::Run(format!("{what}: {error}"));
        let (sync, theirs) = Channel::pair().map_err(|e| local("a socket pair", e))?;
        let pipe = || -> std::io::Result<(OwnedFd, OwnedFd)> {
            Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
        };
        let receiver = |fd: OwnedFd| {
            tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
                .map_err(|e| local("watching a pipe", e))
        };
        let (out_read, out_write) = pipe().map_err(|e| local("a pipe", e))?;
        let stdout = receiver(out_read)?;
        let (err_read, err_write) = pipe().map_err(|e| local("a pipe", e))?;
        let stderr = receiver(err_read)?;
        let (stdin_ours, stdin_theirs) = if stdin {
            let (read, write) = pipe().map_err(|e| local("a pipe", e))?;
            let write = tokio::net::unix::pipe::Sender::from_owned_fd(write)
                .map_err(|e| local("watching a pipe", e))?;
            (Some(write), read)
        } else {
            let null = std::fs::File::open("/dev/null").map_err(|e| local("/dev/null", e))?;
            (None, OwnedFd::from(null))
        };
        spawner
            .control
            .send(
                request,
                &[
                    stdin_theirs.as_raw_fd(),
                    out_write.as_raw_fd(),
                    err_write.as_raw_fd(),
                    theirs.as_raw_fd(),
                ],
            )
            .map_err(|e| SpawnError::Spawner(format!("sending the run: {e}")))?;
        // The spawner and its child hold these now: the pipes end when the run's processes
        // close them.
        drop((stdin_theirs, out_write, err_write, theirs));
        let message = match sync.receive_soon().await {
            Ok(Some(message)) => message,
            Ok(None) => {
                return Err(SpawnError::Spawner(
                    "it dropped the run without a word".into(),
                ));
            }
            Err(error) => return Err(SpawnError::Spawner(format!("the run's child: {error}"))),
        };
        match parse(&message.bytes) {
            Said::Ready => {}
            Said::ForkFailed(error) => return Err(SpawnError::Run(format!("fork: {error}"))),
            _ => return Err(SpawnError::Spawner("an unexpected answer".into())),
        }
        let Some(pid) = message.pid else {
            return Err(SpawnError::Spawner(
                "the child's pid was not visible".into(),
            ));
        };
        if expected_uid.is_some() && message.uid != expected_uid {
            return Err(SpawnError::Spawner(format!(
                "the child runs as uid {:?}, not {expected_uid:?}",
                message.uid
            )));
        }
        // The kernel vouches for the pid (a process may name another only with CAP_SYS_ADMIN
        // over its pid namespace, which nothing in the sandbox has); it must also be one of the
        // spawner's own, in the spawner's cgroup, before msbd moves it anywhere.
        if let Some(group) = &spawner.group
            && !group.holds(pid)
        {
            return Err(SpawnError::Spawner(format!(
                "the child's pid {pid} is not in the spawner's cgroup"
            )));
        }
        // Into the run's own cgroup before it execs: all it starts is the run's.
        let text = pid.to_string();
        for procs in cgroup_procs {
            if let Err(error) = nix::unistd::write(procs, text.as_bytes()) {
                // Dropping the sync socket ends the waiting child.
                return Err(SpawnError::Run(format!(
                    "moving the child into the run's cgroup: {error}"
                )));
            }
        }
        let leader = pidfd(pid);
        sync.send(&GO_AHEAD, &[])
            .map_err(|e| SpawnError::Spawner(format!("letting the child go: {e}")))?;
        // The child runs from here. (Its pidfd was made while it waited for the go, so it is the
        // child's: the pid cannot be reused before the child is reaped.)
        Ok(SpawnedRun {
            pid,
            leader,
            report_by: None,
            sync,
            stdin: stdin_ours,
            stdout: Some(stdout),
            stderr: Some(stderr),
            lost: false,
            spawner: Arc::clone(spawner),
        })
    }

    /// Waits for the spawner's report of the run's end (cancel-safe). When the spawner goes
    /// away first, the run went with it: reported as killed by SIGKILL. When the child ended and
    /// the spawner does not report it within [`REPORT_GRACE`] (it was stopped, say), the status
    /// is read from the zombie where it can be, else reported as SIGKILL.
    pub(crate) async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            let watching = self.leader.is_some() && self.report_by.is_none();
            tokio::select! {
                message = self.sync.receive() => match message? {
                    Some(message) => {
                        if let Said::Exited(status) = parse(&message.bytes) {
                            return Ok(status);
                        }
                    }
                    None => {
                        self.lost = true;
                        self.spawner.mark_broken();
                        return Ok(std::process::ExitStatus::from_raw(libc::SIGKILL));
                    }
                },
                ended = ended(&self.leader), if watching => {
                    ended?;
                    self.report_by = Some(tokio::time::Instant::now() + REPORT_GRACE);
                }
                _ = tokio::time::sleep_until(self.report_by.unwrap_or(far)), if self.report_by.is_some() => {
                    self.lost = true;
                    self.spawner.mark_broken();
                    let status = zombie_status(self.pid).unwrap_or(libc::SIGKILL);
                    return Ok(std::process::ExitStatus::from_raw(status));
                }
            }
        }
    }

    /// Whether the spawner failed before it reported the run's end.
    pub(crate) fn lost_its_spawner(&self) -> bool {
        self.lost
    }
}
