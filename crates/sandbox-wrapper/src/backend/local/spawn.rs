//! Starting a process in a local sandbox: the command line (bubblewrap around the program when
//! available), and what the child does between fork and exec (new session, cgroups, rlimits,
//! uid drop, parent-death signal, and Landlock + seccomp when bubblewrap is absent).
//!
//! This is the one module of the crate with `unsafe` code: [`CommandExt::pre_exec`] is unsafe
//! because the closure runs in a forked child where only async-signal-safe calls are sound. The
//! closure below allocates nothing and makes only raw system calls (through `nix` wrappers that
//! are thin over libc); everything it needs is prepared before the fork.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use landlock::RulesetCreated;
use nix::sys::resource::{Resource, setrlimit};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};
use seccompiler::BpfProgram;

use super::cgroup;
use crate::backend::VolumeMapping;

/// The file descriptor number at which bubblewrap finds the seccomp program.
const SECCOMP_FD: i32 = 3;

/// How one process is to be started.
pub(crate) struct Launch<'a> {
    /// The program and its arguments.
    pub(crate) argv: Vec<String>,
    /// The whole environment of the program.
    pub(crate) env: Vec<(String, String)>,
    /// The work directory (also the only writable place, with `/tmp`).
    pub(crate) work_dir: &'a Path,
    /// Host directories bound into the sandbox.
    pub(crate) volumes: &'a [VolumeMapping],
    /// Directories to hide from the sandbox (the data directory, say).
    pub(crate) hide: &'a [PathBuf],
    /// Whether standard input is a pipe (else `/dev/null`).
    pub(crate) stdin: bool,
    /// Open `cgroup.procs` files the child joins before exec.
    pub(crate) cgroup_procs: Vec<OwnedFd>,
    /// Resource limits (soft and hard) set in the child.
    pub(crate) rlimits: Vec<(Resource, u64)>,
    /// The unprivileged user and group to run as, when we are root.
    pub(crate) drop_to: Option<(Uid, Gid)>,
    /// bubblewrap, when used.
    pub(crate) bwrap: Option<&'a Path>,
    /// A file holding the seccomp program for bubblewrap to load.
    pub(crate) seccomp_file: Option<&'a Path>,
    /// The seccomp program to load directly (when bubblewrap is not used).
    pub(crate) seccomp_direct: Option<&'a BpfProgram>,
    /// A Landlock ruleset to enforce (when bubblewrap is not used).
    pub(crate) landlock: Option<RulesetCreated>,
    /// Whether to give the process a network namespace of its own (no network) before the uid
    /// drop: for root without bubblewrap, where Landlock covers TCP only.
    pub(crate) new_netns: bool,
    /// The session's network (loopback only), IPC and UTS namespaces, to join before the uid
    /// drop; bubblewrap then keeps them rather than making them per run, which costs a
    /// millisecond or two.
    pub(crate) netns: Option<&'a SessionNamespaces>,
    /// The Landlock shim to bind into the sandbox (`argv` already runs it).
    pub(crate) shim: Option<&'a Path>,
    /// Whether the process keeps the host's network (network policy `host`) where bubblewrap
    /// makes its namespaces.
    pub(crate) share_net: bool,
    /// A descriptor the program inherits (a session spawner's control socket), at the same
    /// number; it must not be [`SECCOMP_FD`].
    pub(crate) keep_fd: Option<i32>,
}

/// Builds the command for a launch: the program itself, or bubblewrap around it.
pub(crate) fn command(mut launch: Launch<'_>) -> std::io::Result<std::process::Command> {
    let mut command = match launch.bwrap {
        Some(bwrap) => {
            let mut command = std::process::Command::new(bwrap);
            command.args(bwrap_args(&launch));
            if launch.seccomp_file.is_some() {
                command.args(["--seccomp", "3"]);
            }
            command.arg("--").args(&launch.argv);
            command
        }
        None => {
            // The program found on the sandbox's own PATH up front: std spawns with
            // posix_spawn (no copy of this process's page tables) only when it need not search
            // a PATH that differs from its own; argv[0] stays as given.
            let program = resolve_program(&launch.argv[0], &launch.env);
            let mut command = std::process::Command::new(&program);
            command.arg0(&launch.argv[0]).args(&launch.argv[1..]);
            command
        }
    };
    command
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(launch.work_dir)
        .stdin(if launch.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());

    let plain = launch.bwrap.is_none()
        && launch.cgroup_procs.is_empty()
        && launch.rlimits.is_empty()
        && launch.drop_to.is_none()
        && launch.landlock.is_none()
        && launch.seccomp_direct.is_none()
        && !launch.new_netns
        && launch.netns.is_none()
        && launch.keep_fd.is_none();
    if plain {
        // Isolation off: no code between fork and exec, so that the standard library can use
        // posix_spawn; the process still leads a group of its own, for whole-group signals.
        command.process_group(0);
        return Ok(command);
    }
    let seccomp_fd: Option<OwnedFd> = match launch.seccomp_file {
        Some(path) => Some(std::fs::File::open(path)?.into()),
        None => None,
    };
    let cgroup_procs = std::mem::take(&mut launch.cgroup_procs);
    let rlimits = std::mem::take(&mut launch.rlimits);
    let drop_to = launch.drop_to;
    let mut landlock = launch.landlock.take();
    let seccomp_direct: Option<BpfProgram> = launch.seccomp_direct.cloned();
    let new_netns = launch.new_netns && launch.netns.is_none();
    let keep_fd = launch.keep_fd.filter(|fd| *fd != SECCOMP_FD);
    if launch.keep_fd.is_some() && keep_fd.is_none() {
        return Err(std::io::Error::other(
            "the descriptor to keep collides with bubblewrap's seccomp descriptor",
        ));
    }
    let netns: Option<[OwnedFd; 3]> = match launch.netns {
        Some(ns) => Some([
            ns.net.try_clone()?,
            ns.ipc.try_clone()?,
            ns.uts.try_clone()?,
        ]),
        None => None,
    };
    let parent = Pid::this();
    // A hard limit can be lowered, never raised (without CAP_SYS_RESOURCE): never ask for more
    // than the current one.
    let rlimits: Vec<(Resource, u64)> = rlimits
        .into_iter()
        .map(|(resource, limit)| {
            let hard = nix::sys::resource::getrlimit(resource).map_or(limit, |(_, hard)| hard);
            (resource, limit.min(hard))
        })
        .collect();

    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // (setsid, write, setrlimit, dup2, close_range, fcntl, unshare, setgroups, setgid, setuid,
    // prctl, getppid, landlock_restrict_self, seccomp) on values prepared before the fork; it
    // allocates nothing on its success path and returns an error (which std reports to the
    // parent) on failure.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid()?;
            cgroup::join_in_child(&cgroup_procs)?;
            for (resource, limit) in &rlimits {
                setrlimit(*resource, *limit, *limit)?;
            }
            if let Some(fd) = &seccomp_fd
                && nix::libc::dup2(fd.as_raw_fd(), SECCOMP_FD) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing this process inherited without close-on-exec (a socket from a service
            // manager, say) reaches the sandbox: every descriptor above stderr closes at exec,
            // except the seccomp program bubblewrap reads.
            close_inherited_on_exec();
            if seccomp_fd.is_some() && nix::libc::fcntl(SECCOMP_FD, nix::libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = keep_fd
                && nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some([net, ipc, uts]) = &netns {
                nix::sched::setns(net, nix::sched::CloneFlags::CLONE_NEWNET)?;
                nix::sched::setns(ipc, nix::sched::CloneFlags::CLONE_NEWIPC)?;
                nix::sched::setns(uts, nix::sched::CloneFlags::CLONE_NEWUTS)?;
            } else if new_netns {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            }
            if let Some((uid, gid)) = drop_to {
                nix::unistd::setgroups(&[])?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
            }
            // After the uid change, which clears it.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid() != parent {
                // The daemon died between fork and here.
                nix::libc::_exit(137);
            }
            if let Some(ruleset) = landlock.take() {
                ruleset
                    .restrict_self()
                    .map_err(|_| std::io::Error::from_raw_os_error(nix::libc::EPERM))?;
            }
            if let Some(program) = &seccomp_direct {
                seccompiler::apply_filter(program)
                    .map_err(|_| std::io::Error::from_raw_os_error(nix::libc::EPERM))?;
            }
            Ok(())
        });
    }
    Ok(command)
}

/// A program name without a `/` looked up on the `PATH` of `env` (the one the program will
/// run with); the name itself when it has a `/` or is not found there (the spawn then reports
/// it missing).
fn resolve_program(name: &str, env: &[(String, String)]) -> PathBuf {
    if name.contains('/') {
        return PathBuf::from(name);
    }
    let path = env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map_or("", |(_, value)| value.as_str());
    for dir in path.split(':').filter(|d| d.starts_with('/')) {
        let candidate = Path::new(dir).join(name);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return candidate;
            }
        }
    }
    PathBuf::from(name)
}

/// A session's own namespaces, made once and joined by each of its runs.
pub(crate) struct SessionNamespaces {
    net: OwnedFd,
    ipc: OwnedFd,
    uts: OwnedFd,
}

/// The network a session's namespaces give it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SessionNet {
    /// A network namespace of its own with only a loopback interface, up: no route out.
    Own,
    /// The same, plus a socket listening on `127.0.0.1:port` inside it, for msbd's proxy.
    OwnWithProxy(u16),
    /// The host's network namespace.
    Host,
}

/// Makes a session's network namespace (see [`SessionNet`]), IPC namespace and UTS namespace,
/// for its processes to join, and the proxy's listening socket when asked. Needs CAP_SYS_ADMIN
/// (msbd as root). The namespaces live as long as the returned descriptors; a socket stays in
/// the namespace it was made in, whichever thread then serves it.
pub(crate) fn new_session_namespaces(
    net: SessionNet,
) -> std::io::Result<(SessionNamespaces, Option<std::net::TcpListener>)> {
    use nix::sched::CloneFlags;
    // A namespace change affects only the calling thread: do it on a thread of its own.
    std::thread::spawn(
        move || -> std::io::Result<(SessionNamespaces, Option<std::net::TcpListener>)> {
            let mut flags = CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
            if net != SessionNet::Host {
                flags |= CloneFlags::CLONE_NEWNET;
            }
            nix::sched::unshare(flags)?;
            if net != SessionNet::Host {
                loopback_up()?;
            }
            let listener = match net {
                SessionNet::OwnWithProxy(port) => {
                    let socket =
                        std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))?;
                    socket.set_nonblocking(true)?;
                    Some(socket)
                }
                _ => None,
            };
            let open = |kind: &str| -> std::io::Result<OwnedFd> {
                Ok(std::fs::File::open(format!("/proc/thread-self/ns/{kind}"))?.into())
            };
            Ok((
                SessionNamespaces {
                    net: open("net")?,
                    ipc: open("ipc")?,
                    uts: open("uts")?,
                },
                listener,
            ))
        },
    )
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

/// Sets the loopback interface of the current network namespace up (`SIOCSIFFLAGS`).
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::FromRawFd;
    // SAFETY: a socket descriptor owned at once; `ifreq` is plain old data, zeroed, with the
    // interface name written in bounds; both ioctls take a pointer to it.
    unsafe {
        let raw = nix::libc::socket(
            nix::libc::AF_INET,
            nix::libc::SOCK_DGRAM | nix::libc::SOCK_CLOEXEC,
            0,
        );
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(raw);
        let mut request: nix::libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *slot = *byte as nix::libc::c_char;
        }
        if nix::libc::ioctl(socket.as_raw_fd(), nix::libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= (nix::libc::IFF_UP | nix::libc::IFF_RUNNING) as i16;
        if nix::libc::ioctl(socket.as_raw_fd(), nix::libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Marks every descriptor from 3 up close-on-exec: `close_range(CLOSE_RANGE_CLOEXEC)` (Linux
/// 5.11), else one `fcntl` per descriptor up to the descriptor limit. Async-signal-safe.
fn close_inherited_on_exec() {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    // SAFETY: plain system calls on descriptor numbers; no memory is passed.
    unsafe {
        if nix::libc::syscall(
            nix::libc::SYS_close_range,
            3u32,
            u32::MAX,
            CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
        let mut limit = nix::libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let top = if nix::libc::getrlimit(nix::libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur.min(1 << 20) as i32
        } else {
            4096
        };
        for fd in 3..top {
            let flags = nix::libc::fcntl(fd, nix::libc::F_GETFD);
            if flags >= 0 && flags & nix::libc::FD_CLOEXEC == 0 {
                nix::libc::fcntl(fd, nix::libc::F_SETFD, flags | nix::libc::FD_CLOEXEC);
            }
        }
    }
}

/// The host directories a sandbox sees (read-only) under bubblewrap: the system, nothing else.
/// Not `/`: a read-only bind does not stop `connect()` on a unix socket, and the host has
/// sockets (databases, agents) all over `/var`, `/home` and elsewhere.
pub(crate) const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// bubblewrap's arguments: every namespace (so no network), the host's system read-only, a
/// private `/tmp`, `/dev` and `/proc`, the data directory hidden, the work directory and the
/// volumes bound read-write, and death with its parent.
fn bwrap_args(launch: &Launch<'_>) -> Vec<String> {
    let namespaces: &[&str] = if launch.netns.is_some() {
        // The network, IPC and UTS namespaces are the session's, joined before bubblewrap.
        &["--unshare-user", "--unshare-pid", "--unshare-cgroup-try"]
    } else if launch.share_net {
        &["--unshare-all", "--share-net"]
    } else {
        &["--unshare-all"]
    };
    let mut args: Vec<String> = namespaces
        .iter()
        .chain(&["--die-with-parent", "--new-session"])
        .map(|s| (*s).to_owned())
        .collect();
    for dir in SYSTEM_DIRS {
        let path = Path::new(dir);
        match std::fs::read_link(path) {
            // `/bin -> usr/bin` on merged-/usr systems: the same link inside.
            Ok(target) => args.extend([
                "--symlink".into(),
                target.display().to_string(),
                (*dir).into(),
            ]),
            Err(_) if path.is_dir() => {
                args.extend(["--ro-bind".into(), (*dir).into(), (*dir).into()])
            }
            Err(_) => {}
        }
    }
    for (flag, dir) in [("--dev", "/dev"), ("--proc", "/proc"), ("--tmpfs", "/tmp")] {
        args.extend([flag.to_owned(), dir.to_owned()]);
    }
    // Only what lies in a bound system directory is visible, and so needs hiding (the root
    // is bubblewrap's own tmpfs; `/tmp` is a fresh one): a mount per run saved elsewhere.
    for hidden in launch
        .hide
        .iter()
        .filter(|h| SYSTEM_DIRS.iter().any(|d| h.starts_with(d)))
    {
        args.push("--tmpfs".into());
        args.push(hidden.display().to_string());
    }
    let work = launch.work_dir.display().to_string();
    args.extend(["--bind".into(), work.clone(), work.clone()]);
    for volume in launch.volumes {
        args.push(
            if volume.read_only {
                "--ro-bind"
            } else {
                "--bind"
            }
            .into(),
        );
        args.push(volume.host.display().to_string());
        args.push(volume.guest.display().to_string());
    }
    if let Some(shim) = launch.shim {
        args.extend([
            "--ro-bind".into(),
            shim.display().to_string(),
            super::shim::SHIM_PATH.into(),
        ]);
    }
    // The root is bubblewrap's own tmpfs, where the mount points above were made: read-only
    // from here on.
    args.extend(["--remount-ro".into(), "/".into(), "--chdir".into(), work]);
    args
}

/// The system calls a sandboxed program is refused: mounting (old and new mount API), loading
/// kernel code, tracing other processes, entering or making namespaces (`unshare`, `setns`, and
/// `clone` with any `CLONE_NEW*` flag), keyrings, BPF, io_uring, clocks, rebooting. They fail
/// with `ENOSYS`, which is also what makes the C library fall back from `clone3` (whose flags
/// a filter cannot see) to `clone`. Everything else is allowed; the other layers do the rest.
pub(crate) fn seccomp_program() -> Result<BpfProgram, String> {
    use nix::libc;
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };

    let denied: &[i64] = &[
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_syslog,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_io_uring_setup,
        libc::SYS_fanotify_init,
        libc::SYS_clone3,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
    ];
    let namespace_flags = [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWCGROUP,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        0x80, // CLONE_NEWTIME
    ];
    let arch = if cfg!(target_arch = "x86_64") {
        TargetArch::x86_64
    } else if cfg!(target_arch = "aarch64") {
        TargetArch::aarch64
    } else {
        return Err("seccomp filters are built for x86_64 and aarch64 only".into());
    };
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> =
        denied.iter().map(|&nr| (nr, Vec::new())).collect();
    // `clone`'s flags are its first argument on x86_64 and aarch64.
    let clone_rules = namespace_flags
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|condition| SeccompRule::new(vec![condition]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    rules.insert(libc::SYS_clone, clone_rules);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// The program as bytes, the form bubblewrap's `--seccomp` reads.
pub(crate) fn seccomp_bytes(program: &BpfProgram) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(program.len() * 8);
    for instruction in program {
        bytes.extend_from_slice(&instruction.code.to_ne_bytes());
        bytes.push(instruction.jt);
        bytes.push(instruction.jf);
        bytes.extend_from_slice(&instruction.k.to_ne_bytes());
    }
    bytes
}

/// A Landlock ruleset for a process without bubblewrap: read and execute everywhere, write only
/// in the work directory, `/dev` devices and the volumes; no TCP bind or connect; no signals or
/// abstract sockets outside the sandbox. `None` when the kernel lacks Landlock.
pub(crate) fn landlock_ruleset(
    work_dir: &Path,
    volumes: &[VolumeMapping],
) -> Option<RulesetCreated> {
    let mut writable = vec![work_dir.to_path_buf(), PathBuf::from("/dev")];
    writable.extend(
        volumes
            .iter()
            .filter(|v| !v.read_only)
            .map(|v| v.host.clone()),
    );
    landlock_ruleset_writing(writable, true)
}

/// A Landlock ruleset: read and execute everywhere, write only under `writable`; no signals or
/// abstract sockets outside the domain; with `restrict_tcp`, no TCP bind or connect either
/// (under bubblewrap the network namespace already confines TCP to the sandbox's own loopback,
/// which the sandbox may use). `None` when the kernel lacks Landlock or a path cannot be opened.
pub(crate) fn landlock_ruleset_writing(
    writable: Vec<PathBuf>,
    restrict_tcp: bool,
) -> Option<RulesetCreated> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
        RulesetCreatedAttr, Scope, path_beneath_rules,
    };
    let abi = ABI::V6;
    let build = || -> Result<RulesetCreated, landlock::RulesetError> {
        let mut ruleset = Ruleset::default()
            .set_compatibility(CompatLevel::BestEffort)
            .handle_access(AccessFs::from_all(abi))?;
        if restrict_tcp {
            ruleset = ruleset.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?;
        }
        ruleset
            .scope(Scope::AbstractUnixSocket | Scope::Signal)?
            .create()?
            .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))?
            .add_rules(path_beneath_rules(writable, AccessFs::from_all(abi)))
    };
    if landlock_abi() == 0 {
        // Without Landlock in the kernel the ruleset would enforce nothing: report it absent.
        return None;
    }
    build().ok()
}

/// The Landlock ABI version the kernel offers (0: none), asked with
/// `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`.
pub(crate) fn landlock_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
    // SAFETY: this form of the call takes no pointers the kernel reads or writes (NULL, size 0)
    // and returns a number.
    let version = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    version.max(0)
}

// ---------------------------------------------------------------------------------------------
// Reaping orphans.
//
// bubblewrap leaves a zombie behind on every run: its outer process exits as soon as its init
// in the new pid namespace reports the program's status, without waiting for that init, which
// exits a moment later and is reparented. So is anything a sandboxed program left running
// when its tree is killed. Reparented to an init that reaps slowly (or not at all, when msbd
// is pid 1 of a container), such zombies pile up, and they still count against the session's
// pids limit: a burst of short runs in one session then fails with "Can't fork". msbd
// therefore makes itself a child subreaper, so that orphans of its sandboxes come back to it,
// and reaps them after every run and in every orphan sweep.

/// Children the backend spawned and waits for itself (Tokio reaps them): never reaped here.
static OWNED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
/// Held shared while spawning (until the child is in [`OWNED`]), exclusively while reaping, so
/// that a child cannot be reaped between its fork and its registration.
static SPAWN_GATE: RwLock<()> = RwLock::new(());
/// Whether this process is a child subreaper (see [`become_subreaper`]).
static SUBREAPER: AtomicBool = AtomicBool::new(false);

/// Makes this process a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphans of its sandboxes
/// are reparented to it, not to init, and [`reap_orphans`] reaps them. Process-wide; once set,
/// it stays. Returns whether it is set.
pub(crate) fn become_subreaper() -> bool {
    if SUBREAPER.load(Ordering::Acquire) {
        return true;
    }
    let set = nix::sys::prctl::set_child_subreaper(true).is_ok();
    SUBREAPER.store(set, Ordering::Release);
    set
}

/// A child registered as the backend's own until it is dropped (after its owner has waited for
/// it, or has given it to Tokio to reap).
pub(crate) struct OwnedPid(i32);

impl Drop for OwnedPid {
    fn drop(&mut self) {
        lock(&OWNED).remove(&self.0);
    }
}

/// Spawns the command and registers the child as the backend's own, so that [`reap_orphans`]
/// never takes its exit status from Tokio.
pub(crate) fn spawn_owned(
    command: &mut tokio::process::Command,
) -> std::io::Result<(tokio::process::Child, Option<OwnedPid>)> {
    let _gate = SPAWN_GATE.read().unwrap_or_else(PoisonError::into_inner);
    let child = command.spawn()?;
    let owned = child.id().map(|pid| {
        let pid = pid as i32;
        lock(&OWNED).insert(pid);
        OwnedPid(pid)
    });
    Ok((child, owned))
}

/// [`spawn_owned`] for a standard library command (which its caller waits for).
pub(crate) fn spawn_owned_std(
    command: &mut std::process::Command,
) -> std::io::Result<(std::process::Child, OwnedPid)> {
    let _gate = SPAWN_GATE.read().unwrap_or_else(PoisonError::into_inner);
    let child = command.spawn()?;
    let pid = child.id() as i32;
    lock(&OWNED).insert(pid);
    Ok((child, OwnedPid(pid)))
}

/// Reaps the zombie children this process did not spawn itself: orphans reparented to it (see
/// [`become_subreaper`]). A child counts as an orphan of a sandbox only when it is not one of the
/// backend's own children and it left this process's session or process group, as every
/// sandboxed process does (`setsid`, or a group of its own with isolation off); so a child that
/// other code in the process spawned, and will wait for, is left alone. Returns how many were
/// reaped. Cheap: it reads this process's children lists, not all of `/proc`.
pub(crate) fn reap_orphans() -> usize {
    if !SUBREAPER.load(Ordering::Acquire) {
        return 0;
    }
    let _gate = SPAWN_GATE.write().unwrap_or_else(PoisonError::into_inner);
    let owned = lock(&OWNED).clone();
    let (Ok(our_sid), our_pgid) = (nix::unistd::getsid(None), nix::unistd::getpgrp()) else {
        return 0;
    };
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut reaped = 0;
    for task in tasks.flatten() {
        let Ok(children) = std::fs::read_to_string(task.path().join("children")) else {
            continue;
        };
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if owned.contains(&pid) {
                continue;
            }
            let Some((state, pgid, sid)) = zombie_stat(pid) else {
                continue;
            };
            if state != 'Z' || (sid == our_sid.as_raw() && pgid == our_pgid.as_raw()) {
                continue;
            }
            let flags = nix::sys::wait::WaitPidFlag::WNOHANG;
            if let Ok(status) = nix::sys::wait::waitpid(Pid::from_raw(pid), Some(flags))
                && status != nix::sys::wait::WaitStatus::StillAlive
            {
                reaped += 1;
            }
        }
    }
    reaped
}

/// A process's state, process group and session, from `/proc/<pid>/stat`.
fn zombie_stat(pid: i32) -> Option<(char, i32, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: read after its last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgid = fields.next()?.parse().ok()?;
    let sid = fields.next()?.parse().ok()?;
    Some((state, pgid, sid))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::resolve_program;

    fn env(path: &str) -> Vec<(String, String)> {
        vec![
            ("HOME".into(), "/nowhere".into()),
            ("PATH".into(), path.into()),
        ]
    }

    #[test]
    fn programs_are_found_on_the_sandbox_path() {
        let sh = resolve_program("sh", &env("/nonexistent:/usr/bin:/bin"));
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        // A name with a slash is taken as it is; a missing one stays a bare name.
        assert_eq!(
            resolve_program("./run.sh", &env("/bin")),
            PathBuf::from("./run.sh")
        );
        assert_eq!(
            resolve_program("no-such-program-here", &env("/usr/bin:/bin")),
            PathBuf::from("no-such-program-here")
        );
        // Relative PATH entries are ignored; no PATH at all finds nothing.
        assert_eq!(resolve_program("sh", &env("bin")), PathBuf::from("sh"));
        assert_eq!(resolve_program("sh", &[]), PathBuf::from("sh"));
    }
}
