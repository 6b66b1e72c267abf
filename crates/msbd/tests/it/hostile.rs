//! Hostile environments, end to end against the built binary: a full disk, a read-only data
//! directory, a data directory deleted while msbd runs, a corrupted or truncated store, a
//! store locked by another msbd, and a host without bubblewrap or writable cgroups. Each time
//! msbd must say what is wrong (log, health, the failed call), keep serving what it still can,
//! and lose nothing it had acknowledged; the tests check the store file itself after msbd
//! stopped.
//!
//! Full disks, read-only mounts and hidden host features need root (tmpfs and bind mounts in a
//! mount namespace of their own). Without root those tests fail, unless
//! `MSBD_TEST_ALLOW_UNPRIVILEGED` is set: then they say what they skipped and return.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::common::{Client, Connection, MSBD, call, ok, wait_status, wait_until};
use rmcp::ServiceExt;
use rmcp::transport::TokioChildProcess;
use serde_json::{Value, json};
use task_core::store::Store;
use task_core::store::sqlite::{SqliteConfig, SqliteStore};

pub(crate) fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// A test that cannot check what it claims on this host fails, unless
/// `MSBD_TEST_ALLOW_UNPRIVILEGED` is set: then it says what it skipped.
pub(crate) fn opt_out(what: &str) {
    assert!(
        std::env::var_os("MSBD_TEST_ALLOW_UNPRIVILEGED").is_some(),
        "this host cannot test {what}: run the tests as root, or set MSBD_TEST_ALLOW_UNPRIVILEGED=1 to skip such tests"
    );
    eprintln!("SKIPPED (MSBD_TEST_ALLOW_UNPRIVILEGED is set): this host cannot test {what}");
}

fn run(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// A mount made for one test, unmounted when dropped.
struct Mount(PathBuf);

impl Mount {
    /// A tmpfs of `size` (such as "8m") at a fresh directory, or `None` without root.
    fn tmpfs(size: &str) -> Option<(tempfile::TempDir, Mount)> {
        if !is_root() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("mnt");
        std::fs::create_dir(&at).unwrap();
        let options = format!("size={size}");
        assert!(
            run(
                "mount",
                &["-t", "tmpfs", "-o", &options, "tmpfs", at.to_str().unwrap()]
            ),
            "mount tmpfs"
        );
        Some((dir, Mount(at)))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.0.to_str().unwrap()]);
    }
}

fn command(program: &str, data_dir: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(program);
    command
        .env("MSB_DATA_DIR", data_dir)
        .env("MSB_LOG_LEVEL", "warn")
        .env("MSB_SHUTDOWN_TIMEOUT", "10")
        .stderr(Stdio::inherit());
    command
}

async fn start(data_dir: &Path) -> Connection {
    let mut command = command(MSBD, data_dir);
    command.arg("serve");
    Client::default()
        .serve(TokioChildProcess::new(command).unwrap())
        .await
        .unwrap()
}

async fn submit(client: &Connection, shell: &str) -> String {
    let answer = ok(
        client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": shell}}),
    )
    .await;
    answer["task_id"].as_str().unwrap().to_owned()
}

fn text(result: &rmcp::model::CallToolResult) -> String {
    result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn store_health(client: &Connection) -> Value {
    ok(client, "health_check", json!({})).await["components"]["task_store"].clone()
}

/// Closes the connection and opens the store file once msbd has let go of it.
async fn stop_and_open(client: Connection, path: &Path) -> SqliteStore {
    client.cancel().await.unwrap();
    wait_until(Duration::from_secs(30), async || {
        SqliteStore::open(SqliteConfig::new(path))
            .map_err(|error| format!("the store at {} does not open: {error}", path.display()))
    })
    .await
}

async fn status_in(store: &SqliteStore, id: &str) -> String {
    let task = store
        .get(id.parse().unwrap())
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("task {id} was lost"));
    task.status.to_string()
}

/// Writes into `path` until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.flush();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_clearly_keeps_answering_reads_and_recovers() {
    let Some((_dir, mount)) = Mount::tmpfs("16m") else {
        opt_out("a full disk (a small tmpfs, which needs root)");
        return;
    };
    let data = mount.0.clone();
    let client = start(&data).await;
    let before = submit(&client, "echo before").await;
    wait_status(&client, &before, "completed").await;

    let filler = data.join("filler");
    fill(&filler);
    let refused = call(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "echo refused"}}),
    )
    .await;
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    let message = text(&refused);
    assert!(
        message.contains("is full") && message.contains(data.to_str().unwrap()),
        "the failed call says the disk is full and where: {message}"
    );
    // Reads still work, and health says what is wrong.
    let status = ok(&client, "check_task_status", json!({"task_id": before})).await;
    assert_eq!(status["status"], "completed");
    let health = store_health(&client).await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["problem"].as_str().unwrap().contains("is full"),
        "{health}"
    );

    std::fs::remove_file(&filler).unwrap();
    let after = submit(&client, "echo after").await;
    wait_status(&client, &after, "completed").await;
    let health = store_health(&client).await;
    assert_eq!(health["status"], "healthy", "{health}");

    let store = stop_and_open(client, &data.join("tasks.sqlite3")).await;
    assert_eq!(status_in(&store, &before).await, "completed");
    assert_eq!(status_in(&store, &after).await, "completed");
}

/// Linux refuses to make a mount read-only while files on it are open for writing (EBUSY), and
/// msbd keeps its store open: a data directory can only be read-only when msbd starts on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_directory_stops_msbd_with_what_to_do_and_loses_nothing() {
    let Some((dir, mount)) = Mount::tmpfs("64m") else {
        opt_out("a read-only data directory (a bind mount, which needs root)");
        return;
    };
    let client = start(&mount.0).await;
    let id = submit(&client, "echo kept").await;
    wait_status(&client, &id, "completed").await;
    drop(stop_and_open(client, &mount.0.join("tasks.sqlite3")).await);

    let data = dir.path().join("read-only");
    std::fs::create_dir(&data).unwrap();
    assert!(run(
        "mount",
        &["--bind", mount.0.to_str().unwrap(), data.to_str().unwrap()]
    ));
    let _bind = Mount(data.clone());
    assert!(run(
        "mount",
        &["-o", "remount,bind,ro", data.to_str().unwrap()]
    ));
    let (code, stderr) = serve_alone(&data);
    assert_ne!(code, Some(0), "msbd cannot serve on a read-only store");
    assert!(
        stderr.contains("cannot be written") && stderr.contains(data.to_str().unwrap()),
        "stderr says what is wrong and what to do: {stderr}"
    );
    drop(_bind);
    let store = SqliteStore::open(SqliteConfig::new(mount.0.join("tasks.sqlite3"))).unwrap();
    assert_eq!(status_in(&store, &id).await, "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_deleted_while_running_is_restored_and_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let client = start(&data).await;
    let mut done = Vec::new();
    for n in 0..3 {
        let id = submit(&client, &format!("echo {n}")).await;
        wait_status(&client, &id, "completed").await;
        done.push(id);
    }
    let long = submit(&client, "sleep 60").await;
    wait_status(&client, &long, "running").await;

    // The directory goes at once (moved away, then deleted as `rm -rf` would). Deleting it in
    // place over and over until it stays gone would also delete the copy msbd writes back into
    // it, which is the very thing this test checks: under load that happened.
    let gone = dir.path().join("deleted");
    std::fs::rename(&data, &gone).unwrap();
    wait_until(
        Duration::from_secs(5),
        async || match std::fs::remove_dir_all(&gone) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("cannot delete {}: {error}", gone.display()))
            }
            _ => Ok(()),
        },
    )
    .await;
    let health = wait_until(Duration::from_secs(15), async || {
        let health = store_health(&client).await;
        if health["status"] == "unhealthy" {
            Ok(health)
        } else {
            Err(format!("the store never said unhealthy: {health}"))
        }
    })
    .await;
    let problem = health["problem"].as_str().unwrap();
    assert!(
        problem.contains("deleted") && problem.contains("restart msbd"),
        "{problem}"
    );
    let refused = call(
        &client,
        "submit_task",
        json!({"task_type": "command", "params": {"command": "echo refused"}}),
    )
    .await;
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    assert!(text(&refused).contains("deleted"), "{}", text(&refused));
    // Reads go on.
    let status = ok(&client, "check_task_status", json!({"task_id": done[0]})).await;
    assert_eq!(status["status"], "completed");

    let store = stop_and_open(client, &data.join("tasks.sqlite3")).await;
    for id in &done {
        assert_eq!(status_in(&store, id).await, "completed");
    }
    // Running when the copy was made (the next msbd recovers it), or failed when its sandbox
    // vanished with the directory first: either way recorded, not lost.
    let long_status = status_in(&store, &long).await;
    assert!(
        ["running", "failed"].contains(&long_status.as_str()),
        "{long_status}"
    );
}

/// `msbd serve` on `data_dir` with no client: its exit status and what it wrote to stderr.
fn serve_alone(data_dir: &Path) -> (Option<i32>, String) {
    let output = std::process::Command::new(MSBD)
        .arg("serve")
        .env("MSB_DATA_DIR", data_dir)
        .env("MSB_LOG_LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_or_truncated_store_stops_msbd_with_what_to_do_and_is_kept() {
    // A real store to damage.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let client = start(&data).await;
    let id = submit(&client, "echo kept").await;
    wait_status(&client, &id, "completed").await;
    drop(stop_and_open(client, &data.join("tasks.sqlite3")).await);
    let file = data.join("tasks.sqlite3");
    let good = std::fs::read(&file).unwrap();

    let truncated = good[..good.len().min(5000)].to_vec();
    let mut garbage = good.clone();
    garbage[..32].copy_from_slice(b"this is not a database, at all!!");
    for (what, bytes) in [("truncated", truncated), ("corrupted", garbage)] {
        std::fs::write(&file, &bytes).unwrap();
        for suffix in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(data.join(format!("tasks.sqlite3{suffix}")));
        }
        let (code, stderr) = serve_alone(&data);
        assert_ne!(code, Some(0), "{what}: msbd must not serve on it");
        assert!(
            stderr.contains("damaged or is not a task store")
                && stderr.contains(file.to_str().unwrap())
                && stderr.contains("move the file aside"),
            "{what}: stderr says what is wrong and what to do: {stderr}"
        );
        assert_eq!(
            std::fs::read(&file).unwrap(),
            bytes,
            "{what}: msbd left the file as it was"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_locked_by_another_msbd_is_refused_and_the_first_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let client = start(dir.path()).await;
    let (code, stderr) = serve_alone(dir.path());
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("in use by another process") && stderr.contains("stop the other msbd"),
        "{stderr}"
    );
    let id = submit(&client, "echo still serving").await;
    wait_status(&client, &id, "completed").await;
    client.cancel().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_bubblewrap_or_writable_cgroups_runs_tasks_and_says_what_is_missing() {
    if !is_root() || !run("sh", &["-c", "command -v unshare >/dev/null"]) {
        opt_out("a host without bubblewrap or cgroups (hiding them needs root and unshare)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let stderr_path = dir.path().join("stderr.log");
    // In a mount namespace of its own: every cgroup mount read-only, bwrap replaced by an
    // empty file (as if not installed).
    let script = format!(
        "set -e
         for m in $(awk '$3 ~ /^cgroup/ {{print $2}}' /proc/self/mounts); do mount -o remount,bind,ro \"$m\" 2>/dev/null || mount -o remount,ro \"$m\"; done
         for b in /usr/bin/bwrap /bin/bwrap /usr/local/bin/bwrap; do if [ -e \"$b\" ]; then mount --bind /dev/null \"$b\"; fi; done
         exec {MSBD} serve"
    );
    let mut command = command("unshare", &data);
    command.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let client = Client::default().serve(transport).await.unwrap();
    let id = submit(&client, "echo weaker but running").await;
    wait_status(&client, &id, "completed").await;
    let health = ok(&client, "health_check", json!({})).await;
    let sandbox = &health["components"]["sandbox"];
    assert_eq!(sandbox["status"], "degraded", "{sandbox}");
    let missing = sandbox["isolation_report"]["missing"].to_string();
    assert!(
        missing.contains("cgroups") && missing.contains("bubblewrap"),
        "{missing}"
    );
    client.cancel().await.unwrap();
    let log = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        log.contains("sandbox isolation is")
            && log.contains("not strong")
            && log.contains("cgroups"),
        "the log warns: {log}"
    );
    assert_eq!(
        log.matches("not strong").count(),
        1,
        "the downgrade is logged once: {log}"
    );
}

/// `msbd doctor` with these variables (and no others of msbd's): its exit status and output.
fn doctor(env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let mut command = std::process::Command::new(MSBD);
    command
        .arg("doctor")
        .env_remove("XDG_DATA_HOME")
        .env_remove("MSB_DATA_DIR")
        .stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    (
        output.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The level on doctor's isolation line, and the workspace directory it names.
fn doctor_isolation(output: &str) -> (String, PathBuf) {
    let line = output
        .lines()
        .find(|l| l.contains("] isolation: "))
        .unwrap_or_else(|| panic!("no isolation line: {output}"));
    let rest = line.split("] isolation: ").nth(1).unwrap();
    let level = rest.split(':').next().unwrap().to_owned();
    let workspaces = rest
        .split("(workspaces in ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("no workspace directory: {line}"));
    (level, PathBuf::from(workspaces))
}

/// Root's home is mode 0700, so the default data directory (`$HOME/.local/share/msbd`) lay
/// where the sandbox users, which bubblewrap runs as, could not reach: `serve` ran every
/// sandbox at the standard level while `doctor`, which checked a scratch directory under
/// `/tmp`, promised strong. On the same defaults both now report the same level, the one an
/// open home gets, and a task runs under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_and_serve_give_the_same_isolation_on_the_default_data_directory_of_a_private_home()
{
    use std::os::unix::fs::PermissionsExt;
    let open_home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open_home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (code, output) = doctor(&[("HOME", open_home.path())]);
    assert_eq!(code, Some(0), "{output}");
    let (open_level, _) = doctor_isolation(&output);

    let home = tempfile::tempdir().unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let (code, output) = doctor(&[("HOME", home.path())]);
    assert_eq!(code, Some(0), "{output}");
    let (doctor_level, workspaces) = doctor_isolation(&output);
    eprintln!("open home: {open_level}; private home: doctor says {doctor_level} ({output})");
    assert_eq!(doctor_level, open_level);
    if is_root() {
        assert!(
            !workspaces.starts_with(home.path()),
            "the workspaces are out of the private home: {}",
            workspaces.display()
        );
    }

    let mut command = tokio::process::Command::new(MSBD);
    command
        .arg("serve")
        .env_remove("XDG_DATA_HOME")
        .env_remove("MSB_DATA_DIR")
        .env("HOME", home.path())
        .env("MSB_LOG_LEVEL", "warn")
        .stderr(Stdio::inherit());
    let client = Client::default()
        .serve(TokioChildProcess::new(command).unwrap())
        .await
        .unwrap();
    let health = ok(&client, "health_check", json!({})).await;
    let serve_level = health["components"]["sandbox"]["isolation_report"]["level"].clone();
    assert_eq!(serve_level, json!(doctor_level), "{health}");
    let id = submit(&client, "echo in the workspace > f && cat f").await;
    wait_status(&client, &id, "completed").await;
    let done = ok(&client, "get_task_result", json!({"task_id": id})).await;
    assert!(done.to_string().contains("in the workspace"), "{done}");
    client.cancel().await.unwrap();
    if is_root() {
        let _ = std::fs::remove_dir_all(&workspaces);
    }
}

/// `MSB_ISOLATION=strong` on a host, or a configuration, that cannot give it: `serve` stops
/// with exit status 2 and says which layer failed and why; `doctor` fails the same check.
#[test]
fn a_required_isolation_level_that_cannot_be_had_stops_serve_with_status_2_naming_the_cause() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let workspaces = closed.join("workspaces");
    let data = dir.path().join("data");
    // As root, strong is had here only with reachable workspaces; without root, never.
    let expected_cause = if is_root() {
        format!(
            "{} (mode 0700) lets no other user pass through",
            closed.display()
        )
    } else {
        "uid drop: msbd is not root".to_owned()
    };
    let run = |program_args: &[&str]| {
        let output = std::process::Command::new(MSBD)
            .args(program_args)
            .env("MSB_DATA_DIR", &data)
            .env("MSB_SANDBOX_DIR", &workspaces)
            .env("MSB_ISOLATION", "strong")
            .env("MSB_LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (
            output.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        )
    };
    let (code, said) = run(&["serve"]);
    assert_eq!(code, Some(2), "{said}");
    assert!(said.contains("below the required strong"), "{said}");
    assert!(said.contains(&expected_cause), "{said}");
    let (code, said) = run(&["doctor"]);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("[FAIL] isolation"), "{said}");
    assert!(said.contains(&expected_cause), "{said}");
}
