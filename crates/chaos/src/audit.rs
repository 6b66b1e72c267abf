//! Reading msbd's store file directly (while msbd is down: after a kill, and after the final
//! stop), the side-effect log, and what msbd leaves on the host.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rusqlite::{Connection, OpenFlags};
use task_core::{FailureKind, Status};

use crate::tracker::Inner;
use crate::workload::Kind;

/// The store's status codes (task-core's `Status::code`).
const RUNNING: u8 = 3;
/// The first final status code (completed, failed, cancelled follow).
const FIRST_TERMINAL: u8 = 4;
/// The failure kind of an attempt msbd's going away cut short, for a task that does not run
/// again (task-core's `FailureKind::Interrupted`).
const INTERRUPTED: u8 = 3;
/// How many interrupted attempts a task survives (task-core's `MAX_INTERRUPTED_ATTEMPTS`).
const MAX_INTERRUPTED_ATTEMPTS: u64 = 3;
/// The failure kind of a plain error.
const ERROR: u8 = 0;

/// Opens the store file for reading without changing it: the same `unix-excl` VFS msbd uses
/// (so the WAL index lives in memory and no `-shm` file is needed), read-only.
fn open_read_only(db: &Path) -> anyhow::Result<Connection> {
    let conn = Connection::open_with_flags_and_vfs(
        db,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        c"unix-excl",
    )
    .with_context(|| format!("opening {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(2))?;
    Ok(conn)
}

/// A task id as the tools write it, from the store's 16 bytes.
fn id_text(bytes: &[u8]) -> String {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if hex.len() != 32 {
        return hex;
    }
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The tasks the store records as running (id and attempt): read right after a kill, these are
/// the attempts the kill cut short.
pub(crate) fn running_tasks(db: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let conn = open_read_only(db)?;
    let mut statement = conn.prepare("SELECT id, attempt FROM tasks WHERE status = ?1")?;
    let rows = statement.query_map([RUNNING], |row| {
        Ok((
            id_text(&row.get::<_, Vec<u8>>(0)?),
            u64::from(row.get::<_, u32>(1)?),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One task as the store records it.
#[derive(Clone, Debug)]
struct Row {
    id: String,
    task_type: String,
    status: u8,
    attempt: u64,
    max_attempts: u64,
    /// Attempts cut short by msbd's going away (kills, stops): they do not count.
    interrupted_attempts: u64,
    key: Option<String>,
    owner: Option<String>,
    error_kind: Option<u8>,
    error_message: Option<String>,
    finished_at: Option<i64>,
    lease_until: Option<i64>,
    cancel_requested: bool,
}

impl Row {
    /// The status as the tools name it.
    fn wire_status(&self) -> &'static str {
        let failure = self.error_kind.and_then(FailureKind::from_code);
        Status::from_code(self.status).map_or("unknown", |status| {
            mcp_tools::wire::status_name_of(status, failure)
        })
    }
}

/// What the audit of the store and the side-effect log found.
#[derive(Debug, Default)]
pub(crate) struct StoreAudit {
    /// Accepted tasks the store records in a final status.
    pub(crate) terminal: usize,
    /// Accepted tasks missing from the store or not final there.
    pub(crate) lost: usize,
    /// Tasks created twice for one key, or completions recorded twice.
    pub(crate) duplicated: usize,
    /// What failed, one message each.
    pub(crate) failures: Vec<String>,
    /// Runs of `note` and `flaky` tasks beyond those a clean run needs: re-executions after
    /// kills (at-least-once delivery), not failures.
    pub(crate) reexecutions: usize,
    /// Other facts worth a line.
    pub(crate) info: Vec<String>,
    /// Tasks in the store whose submission was never answered (`execute_command` calls cut
    /// short by a kill).
    pub(crate) unanswered: usize,
    /// Final outcomes: (kind, status) → count.
    pub(crate) outcomes: BTreeMap<(Kind, String), usize>,
}

/// Audits the store file after the final stop against what the run saw through the tools, and
/// the side-effect log (`effects_log`) against the store.
pub(crate) fn audit_store(
    db: &Path,
    seen: &Inner,
    effects_log: &Path,
) -> anyhow::Result<StoreAudit> {
    let conn = open_read_only(db)?;
    let mut audit = StoreAudit::default();
    let integrity: String = conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
    if integrity != "ok" {
        audit.failures.push(format!(
            "the store file fails its integrity check: {integrity}"
        ));
    }
    let mut statement = conn.prepare(
        "SELECT id, task_type, status, attempt, max_attempts, idempotency_key, owner, error_kind, \
         error_message, finished_at, lease_until, cancel_requested, interrupted_attempts FROM tasks",
    )?;
    let rows: Vec<Row> = statement
        .query_map([], |row| {
            Ok(Row {
                id: id_text(&row.get::<_, Vec<u8>>(0)?),
                task_type: row.get(1)?,
                status: row.get(2)?,
                attempt: u64::from(row.get::<_, u32>(3)?),
                max_attempts: u64::from(row.get::<_, u32>(4)?),
                key: row.get(5)?,
                owner: row.get(6)?,
                error_kind: row.get(7)?,
                error_message: row.get(8)?,
                finished_at: row.get(9)?,
                lease_until: row.get(10)?,
                cancel_requested: row.get(11)?,
                interrupted_attempts: u64::from(row.get::<_, u32>(12)?),
            })
        })?
        .collect::<Result<_, _>>()?;

    // The counts table against a count of the rows.
    let mut counted: BTreeMap<(String, u8), i64> = BTreeMap::new();
    for row in &rows {
        *counted
            .entry((row.task_type.clone(), row.status))
            .or_insert(0) += 1;
    }
    let mut recorded: BTreeMap<(String, u8), i64> = BTreeMap::new();
    let mut statement = conn.prepare("SELECT task_type, status, count FROM task_counts")?;
    for entry in statement.query_map([], |row| {
        Ok((
            row.get::<_, String>(0)?,
            row.get::<_, u8>(1)?,
            row.get::<_, i64>(2)?,
        ))
    })? {
        let (task_type, status, count) = entry?;
        if count != 0 {
            recorded.insert((task_type, status), count);
        }
    }
    if counted != recorded {
        audit.failures.push(format!(
            "the store's task_counts table disagrees with its tasks: counted {counted:?}, recorded {recorded:?}"
        ));
    }

    // Each key is one task, and each task of the run was accepted.
    let mut by_key: HashMap<&str, Vec<&Row>> = HashMap::new();
    for row in &rows {
        if let Some(key) = &row.key {
            by_key.entry(key.as_str()).or_default().push(row);
        }
    }
    let planned: HashMap<&str, usize> = seen
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.key.as_str(), i))
        .collect();
    for (key, found) in &by_key {
        if found.len() > 1 {
            audit.duplicated += found.len() - 1;
            audit.failures.push(format!(
                "{} tasks carry the idempotency key {key}",
                found.len()
            ));
        }
        match planned.get(key) {
            Some(&index) if seen.tasks[index].id.is_none() => audit.failures.push(format!(
                "task {} (key {key}) is in the store but its submission was never answered",
                found[0].id
            )),
            Some(_) => {}
            None => audit.failures.push(format!(
                "task {} has a key this run never used: {key}",
                found[0].id
            )),
        }
    }
    // Every task in the store must be final, also those whose submission was never answered
    // (an `execute_command` cut short by a kill, say).
    let by_id: HashMap<&str, &Row> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    for row in &rows {
        if !seen.by_id.contains_key(&row.id) {
            audit.unanswered += 1;
            if row.status < FIRST_TERMINAL {
                audit.lost += 1;
                audit.failures.push(format!(
                    "task {} (a submission whose answer was lost, {}) never finished: the store has it {}",
                    row.id,
                    row.task_type,
                    row.wire_status()
                ));
            }
        }
    }

    // Side effects: the runs of each `note` and `flaky` task.
    let runs = read_effects(effects_log)?;

    for (index, task) in seen.tasks.iter().enumerate() {
        let Some(id) = &task.id else { continue };
        let Some(row) = by_id.get(id.as_str()).copied() else {
            audit.lost += 1;
            audit.failures.push(format!(
                "task {id} (#{index}, key {}) was accepted but is not in the store",
                task.key
            ));
            continue;
        };
        if task.kind != Kind::Exec && row.key.as_deref() != Some(task.key.as_str()) {
            audit.failures.push(format!(
                "task {id} (#{index}) has the key {:?} in the store, not {}",
                row.key, task.key
            ));
        }
        let status = row.wire_status();
        *audit
            .outcomes
            .entry((task.kind, status.to_owned()))
            .or_insert(0) += 1;
        if row.status < FIRST_TERMINAL {
            audit.lost += 1;
            audit.failures.push(format!(
                "task {id} (#{index}, {}) never finished: the store has it {status} (attempt {} of {})",
                task.kind.name(),
                row.attempt,
                row.max_attempts
            ));
            continue;
        }
        audit.terminal += 1;
        if row.owner.as_deref() != Some("stdio") {
            audit.failures.push(format!(
                "task {id}: owner {:?}, not the stdio principal",
                row.owner
            ));
        }
        if row.finished_at.is_none() || row.lease_until.is_some() || row.cancel_requested {
            audit.failures.push(format!(
                "task {id} is {status} but finished_at {:?}, lease_until {:?}, cancel_requested {}",
                row.finished_at, row.lease_until, row.cancel_requested
            ));
        }
        // Attempts that kills and stops cut short do not count against the limit.
        if row.attempt.saturating_sub(row.interrupted_attempts) > row.max_attempts {
            audit.failures.push(format!(
                "task {id} ran {} attempts ({} interrupted) of at most {}",
                row.attempt, row.interrupted_attempts, row.max_attempts
            ));
        }
        // What the tools showed first must be what the store holds at the end.
        match &task.terminal {
            Some(first) => {
                let finished = row.finished_at.map(rfc3339);
                if first.status != status
                    || (first.completed_at.is_some() && first.completed_at != finished)
                {
                    audit.duplicated += 1;
                    audit.failures.push(format!(
                        "task {id}: the tools showed it {} at {:?}, the store ends with {status} at {finished:?}: its end was recorded twice",
                        first.status, first.completed_at
                    ));
                }
            }
            None => audit.failures.push(format!(
                "task {id} is {status} in the store but the tools never showed it finished"
            )),
        }
        let times = runs
            .get(task.key.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        check_outcome(&mut audit, id, task, row, status);
        if task.kind.logs() {
            let finished_ms = row.finished_at.unwrap_or(i64::MAX);
            let late: Vec<i64> = times
                .iter()
                .map(|ns| ns.div_euclid(1_000_000))
                .filter(|ms| *ms > finished_ms)
                .collect();
            if !late.is_empty() {
                audit.duplicated += 1;
                audit.failures.push(format!(
                    "task {id} ({}) ran again after its end ({status}) was recorded at {}: runs at {late:?} ms",
                    task.kind.name(),
                    rfc3339(finished_ms)
                ));
            }
            let count = times.len() as u64;
            if count > row.attempt {
                audit.failures.push(format!(
                    "task {id} ({}) ran {count} times in {} attempts: a run without a claim",
                    task.kind.name(),
                    row.attempt
                ));
            }
            let needed = match task.kind {
                Kind::Flaky => 2,
                _ => 1,
            };
            if row.status == FIRST_TERMINAL && count < needed {
                audit.failures.push(format!(
                    "task {id} ({}) is completed but ran only {count} time(s) (needs {needed})",
                    task.kind.name()
                ));
            }
            if row.status == FIRST_TERMINAL {
                audit.reexecutions += count.saturating_sub(needed) as usize;
            } else {
                audit.reexecutions += count.saturating_sub(needed - 1) as usize;
            }
        }
    }
    Ok(audit)
}

/// Whether a task ended the way its kind allows.
fn check_outcome(
    audit: &mut StoreAudit,
    id: &str,
    task: &crate::tracker::TaskRec,
    row: &Row,
    status: &str,
) {
    let cancel_sent = task.cancel_answered;
    // A kill or a stop never uses up a task's attempts: no task of this run opts out of
    // reruns, so one fails for msbd's going away only past the interruption limit.
    let interrupted_too_often =
        row.error_kind == Some(INTERRUPTED) && row.interrupted_attempts > MAX_INTERRUPTED_ATTEMPTS;
    let ok = match status {
        "cancelled" => cancel_sent,
        "completed" => task.kind != Kind::Fail,
        "failed" => match task.kind {
            Kind::Fail => row.error_kind == Some(ERROR) || interrupted_too_often,
            // Its first run fails and a retry follows: it completes, whatever the kills.
            _ => interrupted_too_often,
        },
        _ => false,
    };
    if !ok {
        audit.failures.push(format!(
            "task {id} ({}, {} attempt(s) of {}): ended {status} (failure kind {:?}: {:?}){}",
            task.kind.name(),
            row.attempt,
            row.max_attempts,
            row.error_kind,
            row.error_message
                .as_deref()
                .map(|m| m.chars().take(300).collect::<String>()),
            if cancel_sent {
                ", after a cancel"
            } else {
                ", and nobody cancelled it"
            }
        ));
    }
    if task.cancel_acked && status != "cancelled" {
        audit.info.push(format!(
            "task {id}: cancel acknowledged while running, but its attempt ended first ({status})"
        ));
    }
}

/// The side-effect log: key → the times (ns since the epoch) of each run.
fn read_effects(path: &Path) -> anyhow::Result<HashMap<String, Vec<i64>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut runs: HashMap<String, Vec<i64>> = HashMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("run"), Some(key), Some(ns)) = (words.next(), words.next(), words.next())
            && let Ok(ns) = ns.parse::<i64>()
        {
            runs.entry(key.to_owned()).or_default().push(ns);
        }
    }
    Ok(runs)
}

/// A time in milliseconds since the epoch as the tools write it (`2026-11-22T07:10:07.574Z`).
pub(crate) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What msbd left behind: processes (its own pids, anything carrying its sandbox marker or
/// naming its data directory), cgroups (`msbd-<marker>` in any hierarchy) and sandbox work
/// directories. One message per leftover.
pub(crate) fn leftovers(data_dir: &Path, marker: &str, msbd_pids: &[u32]) -> Vec<String> {
    let mut found = Vec::new();
    let own = std::process::id();
    let env_prefix = format!("MSBD_SANDBOX={marker}/");
    let data_text = data_dir.display().to_string();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == own {
                continue;
            }
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // A zombie is gone but for its exit status; it is its parent's to reap.
            if stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
            {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let marked = environ
                .split(|b| *b == 0)
                .any(|var| var.starts_with(env_prefix.as_bytes()));
            if msbd_pids.contains(&pid) || marked || cmdline.contains(&data_text) {
                found.push(format!("process {pid} is still alive: {}", cmdline.trim()));
            }
        }
    }
    let name = format!("msbd-{marker}");
    let mut stack: Vec<(PathBuf, usize)> = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            if entry.file_name().to_str() == Some(name.as_str()) {
                let children: Vec<String> = std::fs::read_dir(&path)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                found.push(format!(
                    "cgroup {} is still there (groups in it: {children:?})",
                    path.display()
                ));
            } else if depth < 6 {
                stack.push((path, depth + 1));
            }
        }
    }
    let sandboxes = data_dir.join("sandboxes");
    for entry in std::fs::read_dir(&sandboxes)
        .into_iter()
        .flatten()
        .flatten()
    {
        found.push(format!(
            "sandbox directory {} is still there",
            entry.path().display()
        ));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::{id_text, rfc3339};

    #[test]
    fn times_are_written_as_the_tools_write_them() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_331_407_574), "2026-11-22T07:10:07.574Z");
        assert_eq!(rfc3339(951_782_400_001), "2000-02-29T00:00:00.001Z");
    }

    #[test]
    fn ids_are_hyphenated_hex() {
        let bytes: Vec<u8> = (0u8..16).collect();
        assert_eq!(id_text(&bytes), "00010203-0405-0607-0809-0a0b0c0d0e0f");
    }
}
