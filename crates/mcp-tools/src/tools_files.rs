//! The file tools: `write_file`, `read_file`, `list_files`: files in and out of a session's
//! work directory (sandbox-wrapper's `files` resolves every path beneath it).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::schemars::JsonSchema;
use rmcp::{ErrorData as McpError, tool, tool_router};
use sandbox_wrapper::files::{
    FileEntry, FileError, MAX_LIST_DEPTH, MAX_LIST_ENTRIES, MAX_LIST_VISITS, Workspace,
};
use sandbox_wrapper::session::SessionError;
use serde::{Deserialize, Serialize};

use crate::server::{McpServer, ToolError, answer, finish};

/// The most bytes one `read_file` returns when it does not say.
const DEFAULT_READ_BYTES: u64 = 1024 * 1024;

/// How a file's content travels in a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(rename_all = "lowercase")]
pub enum FileEncoding {
    /// As UTF-8 text.
    #[default]
    Text,
    /// As base64 of the bytes (any file, binary included).
    Base64,
}

/// `write_file`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// The session: one of yours, or a new id (the session is made).
    pub session_id: String,
    /// The file: relative to the session's work directory (where commands run), or absolute
    /// under it. Missing parent directories are made.
    pub path: String,
    /// What to write (as `encoding` says).
    pub content: String,
    /// "text" (default): `content` is the text; "base64": `content` is base64 of the bytes.
    #[serde(default)]
    pub encoding: Option<FileEncoding>,
    /// The file's permission bits in octal, such as "0755" (default "0644" for a new file).
    #[serde(default)]
    pub mode: Option<String>,
    /// Add to the end of the file instead of replacing it (to write a file larger than one
    /// request in pieces).
    #[serde(default)]
    pub append: Option<bool>,
}

/// `read_file`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// The session (one of yours).
    pub session_id: String,
    /// The file: relative to the session's work directory, or absolute under it.
    pub path: String,
    /// The byte to start at (default 0).
    #[serde(default)]
    pub offset: Option<u64>,
    /// The most bytes to return (default 1048576; at most the server's file limit).
    #[serde(default)]
    pub length: Option<u64>,
    /// "text" (default; a file that is not UTF-8 is refused: read it as base64) or "base64".
    #[serde(default)]
    pub encoding: Option<FileEncoding>,
}

/// `list_files`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
pub struct ListFilesArgs {
    /// The session (one of yours).
    pub session_id: String,
    /// The directory: relative to the session's work directory (default: the work directory
    /// itself), or absolute under it.
    #[serde(default)]
    pub path: Option<String>,
    /// Only the entries whose path (relative to the work directory) matches this glob, such as
    /// "*.py" or "src/**/*.rs".
    #[serde(default)]
    pub glob: Option<String>,
    /// How many levels to go down (1, the default: the directory's own entries; at most 10).
    /// Symbolic links are listed, never followed.
    #[serde(default)]
    pub depth: Option<u32>,
}

/// The answer of `write_file`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct WriteFileAnswer {
    /// The session.
    pub session_id: String,
    /// The file, relative to the work directory.
    pub path: String,
    /// Where the session's processes find it.
    pub absolute_path: String,
    /// How many bytes were written.
    pub bytes_written: u64,
    /// Whether the file is new.
    pub created: bool,
}

/// The answer of `read_file`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct ReadFileAnswer {
    /// The session.
    pub session_id: String,
    /// The file, relative to the work directory.
    pub path: String,
    /// "text" or "base64": how `content` carries the bytes.
    pub encoding: FileEncoding,
    /// The bytes read.
    pub content: String,
    /// Where they start.
    pub offset: u64,
    /// How many bytes were read.
    pub length: u64,
    /// Where the next read starts.
    pub next_offset: u64,
    /// The file's size.
    pub size: u64,
    /// Whether the read reached the end of the file.
    pub complete: bool,
}

/// The answer of `list_files`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct ListFilesAnswer {
    /// The session.
    pub session_id: String,
    /// The directory listed, relative to the work directory.
    pub path: String,
    /// How many entries.
    pub count: usize,
    /// The entries, sorted by path.
    pub entries: Vec<FileView>,
    /// Whether the listing was cut short at 1000 entries (narrow it with path, glob or depth).
    pub truncated: bool,
}

/// One entry of `list_files`.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
pub struct FileView {
    /// Its path, relative to the work directory.
    pub path: String,
    /// "file", "directory", "symlink" or "other".
    pub kind: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its permission bits in octal, such as "0644".
    pub mode: String,
    /// When it last changed (Unix seconds).
    pub modified_at: i64,
}

impl From<FileEntry> for FileView {
    fn from(entry: FileEntry) -> FileView {
        FileView {
            path: entry.path,
            kind: entry.kind.to_owned(),
            size: entry.size,
            mode: entry.mode,
            modified_at: entry.modified_at,
        }
    }
}

#[tool_router(router = file_tools, vis = "pub(crate)")]
impl McpServer {
    #[tool(
        description = "Write a file into a session's work directory (where its commands run): path relative to it (parent directories are made); content as text, or base64 with encoding=\"base64\" for binary files; mode such as \"0755\"; append=true adds to the end. A new session_id makes the session. Paths that lead out of the work directory (.., absolute paths elsewhere, symbolic links pointing out) are refused.",
        output_schema = schema_for_output::<WriteFileAnswer>()
    )]
    async fn write_file(
        &self,
        Parameters(args): Parameters<WriteFileArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.write(args).await)
    }

    #[tool(
        description = "Read a file of a session's work directory: by byte range (offset, length; default up to 1 MiB), as text or with encoding=\"base64\" (binary files). next_offset and complete say where to read on.",
        output_schema = schema_for_output::<ReadFileAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn read_file(
        &self,
        Parameters(args): Parameters<ReadFileArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.read(args).await)
    }

    #[tool(
        description = "List a directory of a session's work directory: path (default the work directory), glob to filter (\"*.py\", \"src/**/*.rs\"), depth levels (default 1, at most 10). Each entry: path, kind (file, directory, symlink, other), size, mode, modified_at. Symbolic links are listed, not followed.",
        output_schema = schema_for_output::<ListFilesAnswer>(),
        annotations(read_only_hint = true)
    )]
    async fn list_files(
        &self,
        Parameters(args): Parameters<ListFilesArgs>,
    ) -> Result<CallToolResult, McpError> {
        finish(self.list_dir(args).await)
    }
}

impl McpServer {
    async fn write(&self, args: WriteFileArgs) -> Result<CallToolResult, ToolError> {
        crate::tools_sandbox::check_session_id(&args.session_id)?;
        let bytes = match args.encoding.unwrap_or_default() {
            FileEncoding::Text => args.content.into_bytes(),
            FileEncoding::Base64 => BASE64.decode(args.content.trim()).map_err(|e| {
                ToolError::invalid(
                    format!("content is not valid base64: {e}"),
                    "encode the file's bytes with standard base64 (with padding), or pass text with encoding \"text\"",
                )
            })?,
        };
        let mode = args.mode.as_deref().map(parse_mode).transpose()?;
        let limit = self.core.options.max_file_bytes;
        if bytes.len() as u64 > limit {
            return Err(too_large(bytes.len() as u64, limit));
        }
        let session = &args.session_id;
        // A session of another principal is not found; a new id is claimed and made.
        self.claim_session(session)?;
        let workspace = match self.core.wrapper.sessions().workspace(session) {
            Ok(workspace) => workspace,
            Err(SessionError::NotFound(_)) => {
                let lease = self
                    .core
                    .wrapper
                    .sessions()
                    .acquire(Some(session), None, "python", None)
                    .await
                    .map_err(|e| ToolError::new("OPERATION_FAILED", format!("cannot make session {session:?}: {e}"), "try again, or stop a session you no longer need (get_sessions lists them)"))?;
                drop(lease);
                self.workspace(session)?
            }
            Err(other) => return Err(self.session_error(session, other)),
        };
        let path = args.path.clone();
        let append = args.append.unwrap_or(false);
        let length = bytes.len() as u64;
        // File I/O runs off the async workers: a slow disk stalls only this call.
        let workspace = workspace.with_max_file_bytes(limit);
        let (workspace, created) = blocking(move || {
            let created = workspace
                .write(&path, &bytes, mode, append)
                .map_err(file_error)?;
            Ok((workspace, created))
        })
        .await?;
        let path = &args.path;
        let relative = workspace.relative(path).map_err(file_error)?;
        let written = WriteFileAnswer {
            session_id: session.clone(),
            path: relative.display().to_string(),
            absolute_path: workspace.root_path().join(&relative).display().to_string(),
            bytes_written: length,
            created,
        };
        let text = format!(
            "{} {} bytes to {} in session {session}.",
            if append { "Appended" } else { "Wrote" },
            written.bytes_written,
            written.absolute_path
        );
        Ok(answer(text, &written))
    }

    async fn read(&self, args: ReadFileArgs) -> Result<CallToolResult, ToolError> {
        crate::tools_sandbox::check_session_id(&args.session_id)?;
        let limit = self.core.options.max_file_bytes;
        let length = args.length.unwrap_or(DEFAULT_READ_BYTES.min(limit));
        if length == 0 || length > limit {
            return Err(ToolError::invalid(
                format!("length {length} is out of range"),
                format!("give 1 to {limit} bytes; read on from next_offset for more"),
            ));
        }
        let workspace = self.workspace(&args.session_id)?;
        let offset = args.offset.unwrap_or(0);
        let encoding = args.encoding.unwrap_or_default();
        let path = args.path.clone();
        let (workspace, read) = blocking(move || {
            let read = workspace
                .read(&path, offset, length as usize)
                .map_err(file_error)?;
            Ok((workspace, read))
        })
        .await?;
        let mut bytes = read.bytes;
        let content = match encoding {
            FileEncoding::Base64 => BASE64.encode(&bytes),
            FileEncoding::Text => match std::str::from_utf8(&bytes) {
                Ok(text) => text.to_owned(),
                // A character cut at the end of the range: stop before it.
                Err(error) if error.error_len().is_none() && error.valid_up_to() > 0 => {
                    bytes.truncate(error.valid_up_to());
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                Err(_) => {
                    return Err(ToolError::invalid(
                        format!("{:?} is not UTF-8 text", args.path),
                        "read it with encoding \"base64\"",
                    ));
                }
            },
        };
        let relative = workspace.relative(&args.path).map_err(file_error)?;
        let length = bytes.len() as u64;
        let start = offset.min(read.size);
        let next_offset = start + length;
        let answer_body = ReadFileAnswer {
            session_id: args.session_id.clone(),
            path: relative.display().to_string(),
            encoding,
            content,
            offset: start,
            length,
            next_offset,
            size: read.size,
            complete: next_offset >= read.size,
        };
        let mut text = match encoding {
            FileEncoding::Text => answer_body.content.clone(),
            FileEncoding::Base64 => format!("[{length} bytes as base64 in `content`]"),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&if answer_body.complete {
            format!(
                "[bytes {start}..{next_offset} of {}; end of file]",
                read.size
            )
        } else {
            format!(
                "[bytes {start}..{next_offset} of {}; read on with offset={next_offset}]",
                read.size
            )
        });
        Ok(answer(text, &answer_body))
    }

    async fn list_dir(&self, args: ListFilesArgs) -> Result<CallToolResult, ToolError> {
        crate::tools_sandbox::check_session_id(&args.session_id)?;
        // A glob across directories means to look into them.
        let deep = args
            .glob
            .as_deref()
            .is_some_and(|g| g.contains('/') || g.contains("**"));
        let depth = args.depth.unwrap_or(if deep { MAX_LIST_DEPTH } else { 1 });
        if depth == 0 || depth > MAX_LIST_DEPTH {
            return Err(ToolError::invalid(
                format!("depth {depth} is out of range"),
                format!("give 1 to {MAX_LIST_DEPTH}"),
            ));
        }
        let pattern = args
            .glob
            .as_deref()
            .map(sandbox_wrapper::files::Pattern::new)
            .transpose()
            .map_err(|e| {
                ToolError::invalid(
                    format!("glob {:?} is not valid: {e}", args.glob.as_deref().unwrap_or("")),
                    "use * (any characters but /), ? (one character), [abc], and ** for any directories",
                )
            })?;
        let workspace = self.workspace(&args.session_id)?;
        let path = args.path.clone().unwrap_or_else(|| ".".to_owned());
        let (relative, listing) = blocking(move || {
            let listing = workspace
                .list(&path, pattern.as_ref(), depth, MAX_LIST_ENTRIES)
                .map_err(file_error)?;
            let relative = workspace.relative(&path).map_err(file_error)?;
            Ok((relative, listing))
        })
        .await?;
        let entries: Vec<FileView> = listing.entries.into_iter().map(FileView::from).collect();
        let mut text = entries
            .iter()
            .map(|e| {
                format!(
                    "{} {:>10} {}{}",
                    e.mode,
                    e.size,
                    e.path,
                    if e.kind == "directory" { "/" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        if entries.is_empty() {
            text = "No entries.".to_owned();
        }
        if listing.truncated {
            text.push_str(&format!(
                "\n[cut short (at {MAX_LIST_ENTRIES} entries, or {MAX_LIST_VISITS} looked at): narrow it with path, glob or depth]"
            ));
        }
        let listed = ListFilesAnswer {
            session_id: args.session_id.clone(),
            path: relative.display().to_string(),
            count: entries.len(),
            entries,
            truncated: listing.truncated,
        };
        Ok(answer(text, &listed))
    }

    fn session_error(&self, session: &str, error: SessionError) -> ToolError {
        match error {
            SessionError::NotFound(_) => self.session_not_found(session),
            other => ToolError::new("OPERATION_FAILED", other.to_string(), "try again"),
        }
    }

    /// The work directory of one of this principal's live sessions.
    fn workspace(&self, session: &str) -> Result<Workspace, ToolError> {
        if !self.owns_session(session) {
            return Err(self.session_not_found(session));
        }
        self.core
            .wrapper
            .sessions()
            .workspace(session)
            .map_err(|e| self.session_error(session, e))
    }
}

/// A file error as a tool error: refusals are the caller's to fix.
fn file_error(error: FileError) -> ToolError {
    match error {
        FileError::TooLarge { size, max, .. } => too_large(size, max),
        FileError::NotFound(_) => ToolError::new(
            "FILE_NOT_FOUND",
            error.to_string(),
            "list_files shows what is there",
        ),
        FileError::Io { .. } | FileError::Unsupported => {
            ToolError::new("OPERATION_FAILED", error.to_string(), "try again")
        }
        _ => ToolError::invalid(
            error.to_string(),
            "give a path inside the session's work directory, relative to it",
        ),
    }
}

fn too_large(size: u64, limit: u64) -> ToolError {
    ToolError::invalid(
        format!("the file would be {size} bytes, more than the server's limit of {limit}"),
        "write a smaller file (the operator sets the limit)",
    )
}

/// Permission bits in octal: "755", "0755" or "0o755".
fn parse_mode(text: &str) -> Result<u32, ToolError> {
    let digits = text.trim().trim_start_matches("0o");
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 && !digits.is_empty() => Ok(mode),
        _ => Err(ToolError::invalid(
            format!(
                "mode {text:?} is not permission bits in octal (0000 to 0777; write_file sets no set-user-ID, set-group-ID or sticky bit)"
            ),
            "give octal digits such as \"0644\" or \"0755\"",
        )),
    }
}

/// Runs file I/O on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ToolError> + Send + 'static,
) -> Result<T, ToolError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        ToolError::new(
            "OPERATION_FAILED",
            format!("a file operation failed: {e}"),
            "try again",
        )
    })?
}
