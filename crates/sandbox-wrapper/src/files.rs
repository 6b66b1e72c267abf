//! Files in and out of a session's work directory: what the `write_file`, `read_file` and
//! `list_files` tools do.
//!
//! Every path is resolved beneath the work directory by the kernel: `openat2` with
//! `RESOLVE_BENEATH` (and no magic links), so `..` past the top, an absolute path elsewhere and a
//! symbolic link that leads out (which a sandboxed process can plant) are refused by the system
//! call itself, never by looking at the string. Only regular files with a single link are read
//! or written (a hard link is another way to a file outside), and they are opened without
//! blocking (a FIFO planted in their place cannot hang msbd). Files and directories msbd makes
//! take the work directory's owner (the session's own uid when sandboxes drop to one), so the
//! session's processes can use them.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid};
use serde::Serialize;

/// The glob patterns of [`Workspace::list`] (`*`, `?`, `[abc]`, `**`).
pub use glob::Pattern;

/// How many entries one listing returns at most.
pub const MAX_LIST_ENTRIES: usize = 1000;
/// How deep a listing goes at most.
pub const MAX_LIST_DEPTH: u32 = 10;
/// How many entries one listing looks at, at most (matching or not): a listing of a huge tree
/// with a glob that matches little stops there, `truncated`.
pub const MAX_LIST_VISITS: usize = 100_000;

/// Why a file operation was refused or failed. Each says what was wrong with the path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path leads out of the work directory (`..`, an absolute path elsewhere, a symbolic
    /// link that points out).
    #[error(
        "{0:?} is outside the session's work directory (paths are resolved beneath it; `..`, other absolute paths and symbolic links that lead out are refused)"
    )]
    Outside(String),
    /// Nothing is there.
    #[error("{0:?} does not exist in the session's work directory")]
    NotFound(String),
    /// A directory where a file was expected.
    #[error("{0:?} is a directory")]
    IsDirectory(String),
    /// A file (or something else) where a directory was expected.
    #[error("{0:?} is not a directory")]
    NotDirectory(String),
    /// Not a regular file (a device, a FIFO, a socket).
    #[error("{0:?} is not a regular file")]
    NotRegular(String),
    /// A regular file with more than one hard link.
    #[error("{0:?} has {1} hard links; files are read and written only through their one link")]
    HardLinked(String, u64),
    /// The file would be larger than the workspace allows.
    #[error("{path:?} would be {size} bytes, more than the limit of {max}")]
    TooLarge {
        /// The path as given.
        path: String,
        /// The size it would have.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A path that cannot be a file's.
    #[error("{path:?} is not a valid path: {reason}")]
    Invalid {
        /// The path as given.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The host's kernel has no `openat2` (Linux before 5.6): files cannot be reached safely.
    #[error(
        "this host's kernel cannot resolve paths beneath a directory (openat2, Linux 5.6 and later): file access is off"
    )]
    Unsupported,
    /// Anything else the host refused.
    #[error("{path:?}: {source}")]
    Io {
        /// The path as given.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// One entry of a listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileEntry {
    /// Its path, relative to the work directory.
    pub path: String,
    /// `file`, `directory`, `symlink` or `other`.
    pub kind: &'static str,
    /// Its size in bytes (of the link itself, for a symbolic link).
    pub size: u64,
    /// Its permission bits, such as `0644`.
    pub mode: String,
    /// When it last changed (Unix seconds).
    pub modified_at: i64,
}

/// A listing: the entries, and whether more were left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    /// The entries, sorted by path.
    pub entries: Vec<FileEntry>,
    /// Whether [`MAX_LIST_ENTRIES`] (or the caller's limit) cut it short.
    pub truncated: bool,
}

/// What a read returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRead {
    /// The bytes from `offset` on.
    pub bytes: Vec<u8>,
    /// The file's size.
    pub size: u64,
}

/// The work directory of a live session, open.
#[derive(Debug)]
pub struct Workspace {
    root: OwnedFd,
    /// Where it is on the host (also where the session's processes see it).
    root_path: PathBuf,
    owner: (Uid, Gid),
    /// The largest file a write may leave ([`Workspace::with_max_file_bytes`]).
    max_file_bytes: u64,
}

/// The resolution every path gets: beneath the work directory, no magic links.
fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

impl Workspace {
    /// Opens the work directory at `root_path`.
    pub fn open(root_path: &Path) -> Result<Workspace, FileError> {
        let shown = root_path.display().to_string();
        let root = nix::fcntl::open(
            root_path,
            OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| io(&shown, e))?;
        let stat = fstat(&root).map_err(|e| io(&shown, e))?;
        // openat2 is there (or the whole feature is off, rather than falling back to strings).
        match openat2(&root, ".", how(OFlag::O_PATH | OFlag::O_DIRECTORY)) {
            Err(Errno::ENOSYS) => return Err(FileError::Unsupported),
            Err(error) => return Err(io(&shown, error)),
            Ok(_) => {}
        }
        Ok(Workspace {
            root,
            root_path: root_path.to_owned(),
            owner: (Uid::from_raw(stat.st_uid), Gid::from_raw(stat.st_gid)),
            max_file_bytes: u64::MAX,
        })
    }

    /// Refuses writes that would leave a file larger than `max` bytes ([`FileError::TooLarge`]),
    /// appends included.
    pub fn with_max_file_bytes(mut self, max: u64) -> Workspace {
        self.max_file_bytes = max;
        self
    }

    /// Where the work directory is (the session's processes see it at the same path).
    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    /// `path` as given (relative to the work directory, or absolute under it), relative to the
    /// work directory: `.` for the directory itself.
    pub fn relative(&self, path: &str) -> Result<PathBuf, FileError> {
        if path.contains('\0') {
            return Err(FileError::Invalid {
                path: path.to_owned(),
                reason: "it holds a NUL byte",
            });
        }
        let given = Path::new(path);
        let relative = if given.is_absolute() {
            match given.strip_prefix(&self.root_path) {
                Ok(rest) => rest.to_owned(),
                Err(_) => return Err(FileError::Outside(path.to_owned())),
            }
        } else {
            given.to_owned()
        };
        if relative.as_os_str().is_empty() {
            return Ok(PathBuf::from("."));
        }
        Ok(relative)
    }

    /// Writes `bytes` to the file at `path` (made, with its missing parent directories, or
    /// replaced; added to its end when `append`); `mode` sets its permission bits (default 0644
    /// for a new file). Answers whether the file is new.
    pub fn write(
        &self,
        path: &str,
        bytes: &[u8],
        mode: Option<u32>,
        append: bool,
    ) -> Result<bool, FileError> {
        let relative = self.relative(path)?;
        let (Some(Component::Normal(_)), Some(parent)) =
            (relative.components().next_back(), relative.parent())
        else {
            return Err(FileError::Invalid {
                path: path.to_owned(),
                reason: "it names no file (it ends in `..`, or is the work directory)",
            });
        };
        if relative
            .components()
            .any(|c| matches!(c, Component::ParentDir))
        {
            // Refused before anything is made (`x/../y` would make `x` first).
            return Err(FileError::Invalid {
                path: path.to_owned(),
                reason: "a path to write holds no `..`: name the file from the work directory down",
            });
        }
        self.directory(path, parent, true)?;
        // Permission bits only: never set-user-ID, set-group-ID or sticky.
        let bits = Mode::from_bits_truncate(mode.unwrap_or(0o644) & 0o777);
        let mut flags = OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        if append {
            flags |= OFlag::O_APPEND;
        }
        // Made here (O_EXCL: it did not exist, whatever a sandboxed process does meanwhile),
        // or else opened as it is; both from the top, resolved beneath it.
        let (fd, created) = match openat2(
            &self.root,
            &relative,
            how(flags | OFlag::O_CREAT | OFlag::O_EXCL).mode(bits),
        ) {
            Ok(fd) => (fd, true),
            Err(Errno::EEXIST) => (
                openat2(&self.root, &relative, how(flags)).map_err(|e| resolve_error(path, e))?,
                false,
            ),
            Err(error) => return Err(resolve_error(path, error)),
        };
        let stat = fstat(&fd).map_err(|e| io(path, e))?;
        check_regular(path, &stat)?;
        let kept = if append {
            stat.st_size.max(0) as u64
        } else {
            0
        };
        let size = kept.saturating_add(bytes.len() as u64);
        if size > self.max_file_bytes {
            return Err(FileError::TooLarge {
                path: path.to_owned(),
                size,
                max: self.max_file_bytes,
            });
        }
        let file = std::fs::File::from(fd);
        if !append {
            // Emptied once it is known to be a regular file of its own (never by O_TRUNC at
            // open, which would empty whatever the path led to first).
            file.set_len(0).map_err(|e| io_std(path, e))?;
        }
        if created {
            nix::unistd::fchown(&file, Some(self.owner.0), Some(self.owner.1))
                .map_err(|e| io(path, e))?;
        }
        if created || mode.is_some() {
            nix::sys::stat::fchmod(&file, bits).map_err(|e| io(path, e))?;
        }
        (&file).write_all(bytes).map_err(|e| io_std(path, e))?;
        Ok(created)
    }

    /// Reads up to `length` bytes of the file at `path` from byte `offset` on.
    pub fn read(&self, path: &str, offset: u64, length: usize) -> Result<FileRead, FileError> {
        let relative = self.relative(path)?;
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let fd = openat2(&self.root, &relative, how(flags)).map_err(|e| resolve_error(path, e))?;
        let stat = fstat(&fd).map_err(|e| io(path, e))?;
        check_regular(path, &stat)?;
        let size = stat.st_size.max(0) as u64;
        let file = std::fs::File::from(fd);
        let want = size.saturating_sub(offset).min(length as u64) as usize;
        let mut bytes = vec![0; want];
        let mut filled = 0;
        while filled < want {
            match file.read_at(&mut bytes[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => return Err(io_std(path, error)),
            }
        }
        bytes.truncate(filled);
        Ok(FileRead { bytes, size })
    }

    /// Lists the directory at `path`: its entries, and theirs down to `depth` levels (1: the
    /// directory's own entries), never following a symbolic link; those whose path (relative
    /// to the work directory) matches `glob`, when given; at most `limit` of them.
    pub fn list(
        &self,
        path: &str,
        glob: Option<&Pattern>,
        depth: u32,
        limit: usize,
    ) -> Result<Listing, FileError> {
        let relative = self.relative(path)?;
        let dir = self.directory(path, &relative, false)?;
        let mut entries = Vec::new();
        let mut truncated = false;
        let start = if relative == Path::new(".") {
            PathBuf::new()
        } else {
            relative
        };
        self.walk(
            dir,
            &start,
            depth.clamp(1, MAX_LIST_DEPTH),
            glob,
            limit,
            &mut entries,
            &mut truncated,
            &mut 0,
        )?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Listing { entries, truncated })
    }

    #[allow(clippy::too_many_arguments)]
    fn walk(
        &self,
        dir: OwnedFd,
        at: &Path,
        depth: u32,
        glob: Option<&Pattern>,
        limit: usize,
        entries: &mut Vec<FileEntry>,
        truncated: &mut bool,
        visits: &mut usize,
    ) -> Result<(), FileError> {
        let shown = at.display().to_string();
        let mut names = Vec::new();
        {
            let mut listing =
                nix::dir::Dir::from_fd(dir.try_clone().map_err(|e| io_std(&shown, e))?)
                    .map_err(|e| io(&shown, e))?;
            for entry in listing.iter() {
                let entry = entry.map_err(|e| io(&shown, e))?;
                let name = entry.file_name().to_bytes();
                if name == b"." || name == b".." {
                    continue;
                }
                names.push(std::ffi::OsStr::from_bytes(name).to_owned());
            }
        }
        names.sort();
        for name in names {
            if entries.len() >= limit {
                *truncated = true;
                return Ok(());
            }
            let path = at.join(&name);
            let stat = match fstatat(
                &dir,
                name.as_os_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(stat) => stat,
                // Gone since it was listed.
                Err(Errno::ENOENT) => continue,
                Err(error) => return Err(io(&path.display().to_string(), error)),
            };
            let kind = kind_of(&stat);
            *visits += 1;
            if *visits > MAX_LIST_VISITS {
                *truncated = true;
                return Ok(());
            }
            let options = glob::MatchOptions {
                require_literal_separator: true,
                ..glob::MatchOptions::new()
            };
            if glob.is_none_or(|glob| glob.matches_path_with(&path, options)) {
                entries.push(FileEntry {
                    path: path.display().to_string(),
                    kind,
                    size: stat.st_size.max(0) as u64,
                    mode: format!("{:04o}", stat.st_mode & 0o7777),
                    modified_at: stat.st_mtime,
                });
            }
            if kind == "directory" && depth > 1 {
                let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
                let how = how(flags).resolve(beneath() | ResolveFlag::RESOLVE_NO_SYMLINKS);
                match openat2(&dir, name.as_os_str(), how) {
                    Ok(sub) => self.walk(
                        sub,
                        &path,
                        depth - 1,
                        glob,
                        limit,
                        entries,
                        truncated,
                        visits,
                    )?,
                    // Replaced meanwhile, or not readable: left out.
                    Err(_) => continue,
                }
            }
        }
        Ok(())
    }

    /// The directory at `relative` (beneath the work directory), made with its missing parents
    /// when `make` is set.
    fn directory(&self, path: &str, relative: &Path, make: bool) -> Result<OwnedFd, FileError> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let target = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        match openat2(&self.root, target, how(flags)) {
            Ok(dir) => return Ok(dir),
            Err(Errno::ENOENT) if make => {}
            Err(error) => return Err(resolve_error(path, error)),
        }
        // Walk down from the top, one name at a time, making what is missing: each prefix is
        // opened from the top, resolved beneath it (a link that stays inside is followed, one
        // that leads out refused), and a missing name is made inside the directory just opened.
        let mut dir = openat2(&self.root, ".", how(flags)).map_err(|e| resolve_error(path, e))?;
        let mut prefix = PathBuf::new();
        for component in target.components() {
            let name = match component {
                Component::CurDir => continue,
                Component::Normal(name) => name,
                _ => return Err(FileError::Outside(path.to_owned())),
            };
            prefix.push(name);
            dir = match openat2(&self.root, &prefix, how(flags)) {
                Ok(next) => next,
                Err(Errno::ENOENT) => match mkdirat(&dir, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) => {
                        let made = openat2(&self.root, &prefix, how(flags))
                            .map_err(|e| resolve_error(path, e))?;
                        nix::unistd::fchown(&made, Some(self.owner.0), Some(self.owner.1))
                            .map_err(|e| io(path, e))?;
                        made
                    }
                    Err(Errno::EEXIST) => openat2(&self.root, &prefix, how(flags))
                        .map_err(|e| resolve_error(path, e))?,
                    Err(error) => return Err(io(path, error)),
                },
                Err(error) => return Err(resolve_error(path, error)),
            };
        }
        Ok(dir)
    }
}

fn how(flags: OFlag) -> OpenHow {
    OpenHow::new().flags(flags).resolve(beneath())
}

fn kind_of(stat: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symlink",
        _ => "other",
    }
}

/// Only a regular file with a single link is read or written.
fn check_regular(path: &str, stat: &FileStat) -> Result<(), FileError> {
    match kind_of(stat) {
        "file" if stat.st_nlink > 1 => Err(FileError::HardLinked(path.to_owned(), stat.st_nlink)),
        "file" => Ok(()),
        "directory" => Err(FileError::IsDirectory(path.to_owned())),
        _ => Err(FileError::NotRegular(path.to_owned())),
    }
}

/// The error of a path resolution, in words.
fn resolve_error(path: &str, error: Errno) -> FileError {
    match error {
        // RESOLVE_BENEATH refused to leave the directory; a magic link, or a loop.
        Errno::EXDEV | Errno::ELOOP => FileError::Outside(path.to_owned()),
        Errno::ENOENT => FileError::NotFound(path.to_owned()),
        Errno::EISDIR => FileError::IsDirectory(path.to_owned()),
        Errno::ENOTDIR => FileError::NotDirectory(path.to_owned()),
        // Opened without blocking, a FIFO with no reader (or a device without its driver).
        Errno::ENXIO => FileError::NotRegular(path.to_owned()),
        Errno::ENOSYS => FileError::Unsupported,
        other => io(path, other),
    }
}

fn io(path: &str, error: Errno) -> FileError {
    FileError::Io {
        path: path.to_owned(),
        source: error.into(),
    }
}

fn io_std(path: &str, error: std::io::Error) -> FileError {
    FileError::Io {
        path: path.to_owned(),
        source: error,
    }
}
