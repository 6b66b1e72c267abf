//! Files in and out of a work directory ([`sandbox_wrapper::files`]): every path resolved
//! beneath it by the kernel, whatever a sandboxed process planted there.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use sandbox_wrapper::files::{FileError, Pattern, Workspace};

/// A work directory inside a scratch directory that also holds a "secret" outside it.
struct Scratch {
    _dir: tempfile::TempDir,
    work: std::path::PathBuf,
    secret: std::path::PathBuf,
}

fn scratch() -> Scratch {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "outside").unwrap();
    Scratch {
        _dir: dir,
        work,
        secret,
    }
}

fn is_outside(result: Result<impl std::fmt::Debug, FileError>) -> bool {
    matches!(result, Err(FileError::Outside(_)))
}

/// Refused as leading out, or (a path to write with `..`) before anything is looked at.
fn is_refused(result: Result<impl std::fmt::Debug, FileError>) -> bool {
    matches!(
        result,
        Err(FileError::Outside(_) | FileError::Invalid { .. })
    )
}

#[test]
fn bytes_written_are_read_back_exactly_with_parents_made() {
    let s = scratch();
    let ws = Workspace::open(&s.work).unwrap();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    assert!(ws.write("a/b/c.bin", &bytes, None, false).unwrap(), "new");
    let read = ws.read("a/b/c.bin", 0, 1 << 20).unwrap();
    assert_eq!((read.size, read.bytes.len()), (70_000, 70_000));
    assert_eq!(read.bytes, bytes);
    // By range, past the end, appended, replaced.
    assert_eq!(ws.read("a/b/c.bin", 256, 3).unwrap().bytes, [0, 1, 2]);
    assert!(ws.read("a/b/c.bin", 80_000, 10).unwrap().bytes.is_empty());
    assert!(
        !ws.write("a/b/c.bin", b"xy", None, true).unwrap(),
        "not new"
    );
    assert_eq!(ws.read("a/b/c.bin", 70_000, 10).unwrap().bytes, b"xy");
    ws.write("a/b/c.bin", b"short", Some(0o750), false).unwrap();
    let meta = std::fs::metadata(s.work.join("a/b/c.bin")).unwrap();
    assert_eq!((meta.len(), meta.permissions().mode() & 0o7777), (5, 0o750));
    // An absolute path under the work directory is the same file.
    let absolute = s.work.join("a/b/c.bin");
    assert_eq!(
        ws.read(absolute.to_str().unwrap(), 0, 99).unwrap().bytes,
        b"short"
    );
    assert!(matches!(ws.read("nope", 0, 1), Err(FileError::NotFound(_))));
    assert!(matches!(ws.read("a", 0, 1), Err(FileError::IsDirectory(_))));
    assert!(matches!(
        ws.write(".", b"x", None, false),
        Err(FileError::Invalid { .. })
    ));
    assert!(matches!(
        ws.write("a/..", b"x", None, false),
        Err(FileError::Invalid { .. })
    ));
}

#[test]
fn new_files_and_directories_take_the_work_directorys_owner() {
    if !crate::local::root_or_opt_out("giving files to another uid") {
        return;
    }
    let s = scratch();
    std::os::unix::fs::chown(&s.work, Some(54_321), Some(54_322)).unwrap();
    let ws = Workspace::open(&s.work).unwrap();
    ws.write("made/deep/file.txt", b"hi", None, false).unwrap();
    for path in ["made", "made/deep", "made/deep/file.txt"] {
        let meta = std::fs::symlink_metadata(s.work.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (54_321, 54_322), "{path}");
    }
}

#[test]
fn paths_and_links_that_lead_out_are_refused_and_what_is_outside_is_untouched() {
    let s = scratch();
    let ws = Workspace::open(&s.work).unwrap();
    let secret = s.secret.to_str().unwrap();
    // What a sandboxed process can plant: links out, absolute and relative, to a file and to
    // a directory; a link to the work directory's parent; a magic link.
    std::fs::create_dir(s.work.join("a")).unwrap();
    symlink(&s.secret, s.work.join("to_secret")).unwrap();
    symlink("../secret", s.work.join("up_secret")).unwrap();
    symlink(s.work.parent().unwrap(), s.work.join("parent")).unwrap();
    symlink("/etc", s.work.join("etc")).unwrap();
    symlink("/proc/self/root/etc/passwd", s.work.join("magic")).unwrap();
    for path in [
        "../secret",
        "a/../../secret",
        secret,
        "/etc/passwd",
        "to_secret",
        "up_secret",
        "parent/secret",
        "etc/passwd",
        "magic",
    ] {
        assert!(is_outside(ws.read(path, 0, 100)), "read {path}");
        assert!(
            is_refused(ws.write(path, b"owned", None, false)),
            "write {path}"
        );
        assert!(
            is_refused(ws.write(path, b"owned", None, true)),
            "append {path}"
        );
    }
    assert!(is_outside(ws.write("etc/new-file", b"x", None, false)));
    assert!(is_outside(ws.write("parent/new-dir/x", b"x", None, false)));
    assert!(is_outside(ws.list("etc", None, 1, 100)));
    assert!(is_outside(ws.list("..", None, 1, 100)));
    assert_eq!(std::fs::read_to_string(&s.secret).unwrap(), "outside");
    assert!(!s.work.parent().unwrap().join("new-dir").exists());

    // A link that stays inside is followed.
    std::fs::write(s.work.join("real.txt"), "inside").unwrap();
    symlink("real.txt", s.work.join("alias")).unwrap();
    assert_eq!(ws.read("alias", 0, 100).unwrap().bytes, b"inside");
}

#[test]
fn hard_links_fifos_and_devices_are_refused_without_blocking() {
    let s = scratch();
    let ws = Workspace::open(&s.work).unwrap();
    std::fs::write(s.work.join("one"), "x").unwrap();
    std::fs::hard_link(s.work.join("one"), s.work.join("two")).unwrap();
    assert!(matches!(
        ws.read("two", 0, 9),
        Err(FileError::HardLinked(_, 2))
    ));
    assert!(matches!(
        ws.write("one", b"y", None, false),
        Err(FileError::HardLinked(_, 2))
    ));
    assert_eq!(std::fs::read_to_string(s.work.join("one")).unwrap(), "x");
    nix::unistd::mkfifo(
        &s.work.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(
        ws.read("fifo", 0, 9),
        Err(FileError::NotRegular(_))
    ));
    assert!(matches!(
        ws.write("fifo", b"y", None, false),
        Err(FileError::NotRegular(_))
    ));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn listings_go_as_deep_as_asked_match_globs_and_never_follow_links() {
    let s = scratch();
    let ws = Workspace::open(&s.work).unwrap();
    for path in [
        "src/main.py",
        "src/lib/util.py",
        "src/lib/data.csv",
        "README.md",
    ] {
        ws.write(path, b"x", None, false).unwrap();
    }
    symlink("/etc", s.work.join("etc")).unwrap();
    let paths = |listing: sandbox_wrapper::files::Listing| -> Vec<String> {
        listing.entries.into_iter().map(|e| e.path).collect()
    };
    assert_eq!(
        paths(ws.list(".", None, 1, 100).unwrap()),
        ["README.md", "etc", "src"]
    );
    let all = ws.list("", None, 3, 100).unwrap();
    assert_eq!(
        paths(all.clone()),
        [
            "README.md",
            "etc",
            "src",
            "src/lib",
            "src/lib/data.csv",
            "src/lib/util.py",
            "src/main.py"
        ]
    );
    let kinds: Vec<&str> = all.entries.iter().map(|e| e.kind).collect();
    assert_eq!(kinds[1], "symlink", "listed, not followed");
    let py = Pattern::new("**/*.py").unwrap();
    assert_eq!(
        paths(ws.list(".", Some(&py), 10, 100).unwrap()),
        ["src/lib/util.py", "src/main.py"]
    );
    assert_eq!(
        paths(ws.list("src/lib", None, 1, 100).unwrap()),
        ["src/lib/data.csv", "src/lib/util.py"]
    );
    let cut = ws.list(".", None, 3, 2).unwrap();
    assert!(cut.truncated && cut.entries.len() == 2);
    assert!(matches!(
        ws.list("README.md", None, 1, 9),
        Err(FileError::NotDirectory(_))
    ));
    assert!(Path::new(&s.work).join("src/lib/util.py").is_file());
}

#[test]
fn writes_follow_links_that_stay_inside_and_make_nothing_they_then_refuse() {
    let s = scratch();
    let ws = Workspace::open(&s.work).unwrap();
    std::fs::create_dir(s.work.join("real")).unwrap();
    symlink("real", s.work.join("link")).unwrap();
    // A new directory under a link to a directory inside: made inside the real one.
    ws.write("link/new/f.txt", b"via link", None, false)
        .unwrap();
    assert_eq!(
        std::fs::read(s.work.join("real/new/f.txt")).unwrap(),
        b"via link"
    );
    // `..` in a path to write is refused before anything is made.
    assert!(matches!(
        ws.write("x/../y/f", b"x", None, false),
        Err(FileError::Invalid { .. })
    ));
    assert!(!s.work.join("x").exists() && !s.work.join("y").exists());
    // Permission bits only: a set-user-ID, set-group-ID or sticky bit asked for is dropped.
    ws.write("tool", b"#!/bin/sh\n", Some(0o6755), false)
        .unwrap();
    let mode = std::fs::metadata(s.work.join("tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755);
    // `*` does not cross `/`; `**` does.
    let star = Pattern::new("*.txt").unwrap();
    let names: Vec<String> = ws
        .list(".", Some(&star), 5, 100)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert!(names.is_empty(), "{names:?}");
    let deep = Pattern::new("**/*.txt").unwrap();
    let names: Vec<String> = ws
        .list(".", Some(&deep), 5, 100)
        .unwrap()
        .entries
        .into_iter()
        .map(|e| e.path)
        .collect();
    assert_eq!(
        names,
        ["real/new/f.txt"],
        "links are not followed by listings"
    );
}

#[test]
fn a_file_that_exists_keeps_its_owner_and_a_new_one_takes_the_directorys() {
    if !crate::local::root_or_opt_out("files of other uids") {
        return;
    }
    let s = scratch();
    std::os::unix::fs::chown(&s.work, Some(54_321), Some(54_321)).unwrap();
    std::fs::write(s.work.join("theirs"), "x").unwrap();
    std::os::unix::fs::chown(s.work.join("theirs"), Some(54_400), Some(54_400)).unwrap();
    let ws = Workspace::open(&s.work).unwrap();
    assert!(!ws.write("theirs", b"y", None, false).unwrap(), "not new");
    assert!(ws.write("mine", b"y", None, false).unwrap(), "new");
    let owner = |name: &str| std::fs::metadata(s.work.join(name)).unwrap().uid();
    assert_eq!((owner("theirs"), owner("mine")), (54_400, 54_321));
}

#[test]
fn a_write_that_would_pass_the_size_limit_is_refused_and_changes_nothing() {
    let s = scratch();
    let ws = Workspace::open(&s.work).unwrap().with_max_file_bytes(10);
    ws.write("f", b"12345678", None, false).unwrap();
    assert!(matches!(
        ws.write("f", b"abc", None, true),
        Err(FileError::TooLarge {
            size: 11,
            max: 10,
            ..
        })
    ));
    assert!(matches!(
        ws.write("g", b"12345678901", None, false),
        Err(FileError::TooLarge { size: 11, .. })
    ));
    assert_eq!(std::fs::read(s.work.join("f")).unwrap(), b"12345678");
    ws.write("f", b"0123456789", None, false).unwrap();
    assert_eq!(std::fs::read(s.work.join("f")).unwrap(), b"0123456789");
}
