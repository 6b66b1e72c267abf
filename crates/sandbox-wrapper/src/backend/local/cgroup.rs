//! Control groups for the local backend: limits on memory, processes and CPU, and whole-tree
//! kill and freeze, on whatever the host offers.
//!
//! Three shapes are handled, detected at start:
//! - cgroup v2 with controllers (the unified hierarchy at `/sys/fs/cgroup`): limits, `cgroup.kill`
//!   and `cgroup.freeze` in one tree;
//! - cgroup v1 hierarchies (`/sys/fs/cgroup/{memory,pids,cpu,freezer}`) for limits and freezing,
//!   possibly beside a controller-less v2 tree (`/sys/fs/cgroup/unified`) that still offers
//!   `cgroup.kill` and `cgroup.freeze`;
//! - nothing writable: no cgroups (the caller falls back to process groups and namespaces).
//!
//! Our groups live under `<the daemon's own group>/msbd-<instance marker>/` in each hierarchy
//! used: one group per session (`s-<session>`, holding the flavor's limits) and one per run
//! (`s-<session>/x-<run>`), so that a run can be frozen or killed alone, escapees included.

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The kind of hierarchy a directory belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// cgroup v1 `memory`.
    Memory,
    /// cgroup v1 `pids`.
    Pids,
    /// cgroup v1 `cpu`.
    Cpu,
    /// cgroup v1 `freezer`.
    Freezer,
    /// cgroup v2 (with or without controllers).
    Unified,
}

/// The hierarchies we can use, found at start.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cgroups {
    /// `(kind, our base directory)` for each usable hierarchy.
    bases: Vec<(Kind, PathBuf)>,
    /// Whether the unified hierarchy has memory, pids and cpu controllers enabled for us.
    v2_controllers: bool,
}

/// The groups of one session or run, one directory per hierarchy.
#[derive(Clone, Debug, Default)]
pub(crate) struct Group {
    dirs: Vec<(Kind, PathBuf)>,
}

/// The limits of a session's group.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) memory_bytes: u64,
    pub(crate) pids: u64,
    pub(crate) cpus: u32,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl Cgroups {
    /// Finds the hierarchies this process may create groups in, and creates our base group
    /// (`msbd-<marker>`) in each. Hierarchies we cannot write are skipped.
    pub(crate) fn detect(marker: &str) -> Cgroups {
        let own = own_groups();
        let mut found = Cgroups::default();
        let root = Path::new(CGROUP_ROOT);
        // A pure v2 host: the unified hierarchy is mounted at the root itself.
        if root.join("cgroup.controllers").exists() {
            let relative = own.get("").cloned().unwrap_or_default();
            let parent = root.join(relative.trim_start_matches('/'));
            let base = parent.join(format!("msbd-{marker}"));
            if fs::create_dir_all(&base).is_ok() && base.join("cgroup.procs").exists() {
                let wanted = ["memory", "pids", "cpu"];
                let available =
                    fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
                let mut enabled = wanted
                    .iter()
                    .all(|c| available.split_whitespace().any(|a| a == *c));
                if !enabled {
                    // Ask the parent to hand the controllers down (works where we own it).
                    let request: String = wanted.iter().map(|c| format!("+{c} ")).collect();
                    enabled =
                        fs::write(parent.join("cgroup.subtree_control"), request.trim()).is_ok();
                }
                if enabled {
                    let request: String = wanted.iter().map(|c| format!("+{c} ")).collect();
                    enabled =
                        fs::write(base.join("cgroup.subtree_control"), request.trim()).is_ok();
                }
                found.v2_controllers = enabled;
                found.bases.push((Kind::Unified, base));
            }
            return found;
        }
        let v1 = [
            (Kind::Memory, "memory"),
            (Kind::Pids, "pids"),
            (Kind::Cpu, "cpu"),
            (Kind::Freezer, "freezer"),
        ];
        for (kind, name) in v1 {
            let mount = root.join(name);
            if !mount.join("cgroup.procs").exists() {
                continue;
            }
            let relative = own
                .iter()
                .find(|(controllers, _)| controllers.split(',').any(|c| c == name))
                .map(|(_, path)| path.clone())
                .unwrap_or_default();
            let base = mount
                .join(relative.trim_start_matches('/'))
                .join(format!("msbd-{marker}"));
            if fs::create_dir_all(&base).is_ok() && base.join("cgroup.procs").exists() {
                found.bases.push((kind, base));
            }
        }
        let unified = root.join("unified");
        if unified.join("cgroup.procs").exists() {
            let relative = own.get("").cloned().unwrap_or_default();
            let base = unified
                .join(relative.trim_start_matches('/'))
                .join(format!("msbd-{marker}"));
            if fs::create_dir_all(&base).is_ok() && base.join("cgroup.kill").exists() {
                found.bases.push((Kind::Unified, base));
                // The v2 tree kills and freezes: the v1 freezer would only add one more
                // migration to every start.
                if let Some(at) = found.bases.iter().position(|(k, _)| *k == Kind::Freezer) {
                    let (_, freezer) = found.bases.remove(at);
                    let _ = fs::remove_dir(freezer);
                }
            }
        }
        found
    }

    /// No cgroups at all (isolation off, or nothing usable).
    pub(crate) fn none() -> Cgroups {
        Cgroups::default()
    }

    /// Whether memory limits (and so out-of-memory kills) are enforced.
    pub(crate) fn limits_memory(&self) -> bool {
        self.has(Kind::Memory) || self.v2_controllers
    }

    /// Whether the unified (v2) hierarchy carries the limits.
    pub(crate) fn v2_controllers(&self) -> bool {
        self.v2_controllers
    }

    /// Whether a whole tree can be killed at once (escapees included).
    pub(crate) fn can_kill_tree(&self) -> bool {
        self.has(Kind::Unified) || self.has(Kind::Freezer)
    }

    /// Whether anything is usable.
    pub(crate) fn any(&self) -> bool {
        !self.bases.is_empty()
    }

    /// A short description: `v1(memory,pids,cpu,freezer)+v2(kill,freeze)`.
    pub(crate) fn describe(&self) -> Option<String> {
        let mut v1 = Vec::new();
        let mut parts = Vec::new();
        for (kind, _) in &self.bases {
            match kind {
                Kind::Memory => v1.push("memory"),
                Kind::Pids => v1.push("pids"),
                Kind::Cpu => v1.push("cpu"),
                Kind::Freezer => v1.push("freezer"),
                Kind::Unified => {}
            }
        }
        if !v1.is_empty() {
            parts.push(format!("cgroup-v1({})", v1.join(",")));
        }
        if self.has(Kind::Unified) {
            if self.v2_controllers {
                parts.push("cgroup-v2(memory,pids,cpu,kill,freeze)".to_owned());
            } else {
                parts.push("cgroup-v2(kill,freeze)".to_owned());
            }
        }
        (!parts.is_empty()).then(|| parts.join("+"))
    }

    /// Removes our base groups where they are empty (a group with leftovers stays for the
    /// next instance's orphan sweep).
    pub(crate) fn remove_bases_if_empty(&self) {
        for (_, base) in &self.bases {
            let _ = fs::remove_dir(base);
        }
    }

    fn has(&self, kind: Kind) -> bool {
        self.bases.iter().any(|(k, _)| *k == kind)
    }

    /// Creates (or finds) the group of a session, with its limits.
    pub(crate) fn session(&self, session: &str, limits: Limits) -> std::io::Result<Group> {
        let mut group = Group::default();
        for (kind, base) in &self.bases {
            let dir = base.join(format!("s-{session}"));
            fs::create_dir_all(&dir)?;
            apply_limits(*kind, &dir, limits, self.v2_controllers)?;
            if *kind == Kind::Unified && self.v2_controllers {
                let _ = fs::write(dir.join("cgroup.subtree_control"), "+memory +pids +cpu");
            }
            group.dirs.push((*kind, dir));
        }
        Ok(group)
    }

    /// The session groups of this instance that exist now, by session id.
    pub(crate) fn sessions(&self) -> Vec<String> {
        let mut sessions = Vec::new();
        for (_, base) in &self.bases {
            let Ok(entries) = fs::read_dir(base) else {
                continue;
            };
            for entry in entries.flatten() {
                if let Some(session) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("s-"))
                    && !sessions.iter().any(|s| s == session)
                {
                    sessions.push(session.to_owned());
                }
            }
        }
        sessions
    }

    /// The group of a session, whether or not it exists.
    pub(crate) fn session_group(&self, session: &str) -> Group {
        Group {
            dirs: self
                .bases
                .iter()
                .map(|(kind, base)| (*kind, base.join(format!("s-{session}"))))
                .collect(),
        }
    }
}

impl Group {
    /// Creates the group of one run inside this (session) group, limited like its session so
    /// that an out-of-memory kill is seen on the run itself.
    pub(crate) fn child(
        &self,
        name: &str,
        limits: Limits,
        v2_controllers: bool,
    ) -> std::io::Result<Group> {
        let mut group = Group::default();
        for (kind, parent) in &self.dirs {
            let dir = parent.join(name);
            fs::create_dir_all(&dir)?;
            apply_limits(*kind, &dir, limits, v2_controllers)?;
            group.dirs.push((*kind, dir));
        }
        Ok(group)
    }

    /// Opens each hierarchy's `cgroup.procs` for writing, for a child process to join the
    /// group (by writing `0`) before it execs. The files close on exec.
    pub(crate) fn open_procs(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|(_, dir)| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// Whether the group and its sub-groups are empty of processes (or gone).
    pub(crate) fn is_empty(&self) -> bool {
        self.dirs
            .iter()
            .all(|(_, dir)| all_procs_under(dir).is_empty())
    }

    /// Kills every process in the group and its descendants, escapees included: `cgroup.kill`
    /// on v2, else freeze, kill each, thaw on the v1 freezer, else a kill of each listed process.
    pub(crate) fn kill(&self) -> usize {
        let before = self.all_procs().len();
        if let Some((_, dir)) = self.dirs.iter().find(|(k, _)| *k == Kind::Unified)
            && fs::write(dir.join("cgroup.kill"), "1").is_ok()
        {
            return before;
        }
        if let Some((_, dir)) = self.dirs.iter().find(|(k, _)| *k == Kind::Freezer) {
            let _ = fs::write(dir.join("freezer.state"), "FROZEN");
            wait_frozen(dir);
            for pid in all_procs_under(dir) {
                kill_pid(pid);
            }
            // A sub-group frozen on its own (a paused run) stays frozen when its parent thaws,
            // and a killed process in it cannot die until it thaws.
            thaw_all_under(dir);
            return before;
        }
        for pid in self.all_procs() {
            kill_pid(pid);
        }
        before
    }

    /// Freezes (`true`) or thaws every process of the group.
    pub(crate) fn freeze(&self, frozen: bool) -> bool {
        if let Some((_, dir)) = self.dirs.iter().find(|(k, _)| *k == Kind::Unified) {
            return fs::write(dir.join("cgroup.freeze"), if frozen { "1" } else { "0" }).is_ok();
        }
        if let Some((_, dir)) = self.dirs.iter().find(|(k, _)| *k == Kind::Freezer) {
            let state = if frozen { "FROZEN" } else { "THAWED" };
            return fs::write(dir.join("freezer.state"), state).is_ok();
        }
        false
    }

    /// The highest memory use of the group, in bytes, where measured.
    pub(crate) fn peak_memory(&self) -> Option<u64> {
        let (kind, dir) = self
            .dirs
            .iter()
            .find(|(k, _)| matches!(k, Kind::Memory | Kind::Unified))?;
        let file = match kind {
            Kind::Memory => "memory.max_usage_in_bytes",
            _ => "memory.peak",
        };
        read_u64(&dir.join(file))
    }

    /// Memory in use now, in bytes.
    pub(crate) fn memory(&self) -> Option<u64> {
        let (kind, dir) = self
            .dirs
            .iter()
            .find(|(k, _)| matches!(k, Kind::Memory | Kind::Unified))?;
        let file = match kind {
            Kind::Memory => "memory.usage_in_bytes",
            _ => "memory.current",
        };
        read_u64(&dir.join(file))
    }

    /// CPU time used, in microseconds.
    pub(crate) fn cpu_usage_us(&self) -> Option<u64> {
        for (kind, dir) in &self.dirs {
            match kind {
                Kind::Cpu => {
                    // The cpu hierarchy may be co-mounted with cpuacct; use it when present.
                    if let Some(ns) = read_u64(&dir.join("cpuacct.usage")) {
                        return Some(ns / 1000);
                    }
                }
                Kind::Unified => {
                    let stat = fs::read_to_string(dir.join("cpu.stat")).ok()?;
                    return stat
                        .lines()
                        .find_map(|l| l.strip_prefix("usage_usec "))
                        .and_then(|v| v.trim().parse().ok());
                }
                _ => {}
            }
        }
        None
    }

    /// Whether the group (or one of its sub-groups) holds process `pid`, in every hierarchy.
    pub(crate) fn holds(&self, pid: i32) -> bool {
        !self.dirs.is_empty()
            && self
                .dirs
                .iter()
                .all(|(_, dir)| all_procs_under(dir).contains(&pid))
    }

    /// How many processes the group holds.
    pub(crate) fn process_count(&self) -> u64 {
        self.all_procs().len() as u64
    }

    /// How many times the memory limit killed a process in this group.
    pub(crate) fn oom_kills(&self) -> u64 {
        for (kind, dir) in &self.dirs {
            let (file, key) = match kind {
                Kind::Memory => ("memory.oom_control", "oom_kill "),
                Kind::Unified => ("memory.events", "oom_kill "),
                _ => continue,
            };
            if let Ok(text) = fs::read_to_string(dir.join(file))
                && let Some(count) = text
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.trim().parse().ok())
            {
                return count;
            }
        }
        0
    }

    /// Kills what is left and removes the group's directories (children first). Waits up to
    /// `patience` for the processes to die.
    pub(crate) fn remove(&self, patience: Duration) -> bool {
        if !self.is_empty() {
            self.kill();
        }
        let until = Instant::now() + patience;
        let mut removed = true;
        for (_, dir) in &self.dirs {
            removed &= remove_tree(dir, until);
        }
        removed
    }

    fn all_procs(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .dirs
            .iter()
            .flat_map(|(_, d)| all_procs_under(d))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }
}

/// Removes a group directory and its sub-groups, waiting for their processes to go.
fn remove_tree(dir: &Path, until: Instant) -> bool {
    if !dir.exists() {
        return true;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path(), until);
            }
        }
    }
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return true,
            Err(_) if Instant::now() < until => {
                for pid in procs(dir) {
                    kill_pid(pid);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return false,
        }
    }
}

fn apply_limits(
    kind: Kind,
    dir: &Path,
    limits: Limits,
    v2_controllers: bool,
) -> std::io::Result<()> {
    match kind {
        Kind::Memory => {
            fs::write(
                dir.join("memory.limit_in_bytes"),
                limits.memory_bytes.to_string(),
            )?;
            // Without swap accounting the file is absent; the limit above is what counts then.
            let _ = fs::write(
                dir.join("memory.memsw.limit_in_bytes"),
                limits.memory_bytes.to_string(),
            );
        }
        Kind::Pids => fs::write(dir.join("pids.max"), limits.pids.to_string())?,
        Kind::Cpu => {
            let period = 100_000u64;
            fs::write(dir.join("cpu.cfs_period_us"), period.to_string())?;
            fs::write(
                dir.join("cpu.cfs_quota_us"),
                (period * u64::from(limits.cpus)).to_string(),
            )?;
        }
        Kind::Unified if v2_controllers => {
            fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
            let _ = fs::write(dir.join("memory.swap.max"), "0");
            fs::write(dir.join("pids.max"), limits.pids.to_string())?;
            let period = 100_000u64;
            fs::write(
                dir.join("cpu.max"),
                format!("{} {period}", period * u64::from(limits.cpus)),
            )?;
        }
        Kind::Freezer | Kind::Unified => {}
    }
    Ok(())
}

fn thaw_all_under(dir: &Path) {
    let _ = fs::write(dir.join("freezer.state"), "THAWED");
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                thaw_all_under(&entry.path());
            }
        }
    }
}

fn wait_frozen(dir: &Path) {
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        match fs::read_to_string(dir.join("freezer.state")) {
            Ok(state) if state.trim() == "FROZEN" => return,
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            Err(_) => return,
        }
    }
}

fn procs(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn all_procs_under(dir: &Path) -> Vec<i32> {
    let mut pids = procs(dir);
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(all_procs_under(&entry.path()));
            }
        }
    }
    pids
}

fn kill_pid(pid: i32) {
    if pid > 1 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// This process's groups from `/proc/self/cgroup`: controller list (empty for v2) → path.
fn own_groups() -> std::collections::HashMap<String, String> {
    fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some((controllers.to_owned(), path.to_owned()))
        })
        .collect()
}

/// Writes `0` (this process) into each open `cgroup.procs`. Called in a child between fork and
/// exec: no allocation, only `write(2)`.
pub(crate) fn join_in_child(fds: &[OwnedFd]) -> nix::Result<()> {
    for fd in fds {
        nix::unistd::write(fd, b"0")?;
    }
    Ok(())
}
