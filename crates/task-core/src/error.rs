//! The errors of task-core, named in the words of its domain.

use std::path::PathBuf;

use crate::model::TaskId;
use crate::state::IllegalTransition;

/// What went wrong, said so that a person knows what to do next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No such task (or not visible to the caller).
    #[error(
        "no task with id {id}: it never existed, or it was pruned after its retention period; list tasks to see the ids that exist"
    )]
    TaskNotFound {
        /// The id that was asked for.
        id: TaskId,
    },
    /// The task's status does not allow what was asked.
    #[error("task {id}: {transition}")]
    IllegalTransition {
        /// The task.
        id: TaskId,
        /// The status and the refused event.
        transition: IllegalTransition,
    },
    /// A progress value outside 0.0–1.0, or not a number.
    #[error("progress must be a number from 0.0 to 1.0, got {value}")]
    InvalidProgress {
        /// The value given.
        value: f64,
    },
    /// A result over the size cap.
    #[error(
        "the result is {size} bytes, over the limit of {limit} bytes: return a smaller result, or write large data to a file and return its path"
    )]
    ResultTooLarge {
        /// The serialized size.
        size: usize,
        /// The cap.
        limit: usize,
    },
    /// No handler for the task's type.
    #[error(
        "no handler is registered for task type `{task_type}`; the registered types are: {known}"
    )]
    UnknownTaskType {
        /// The type asked for.
        task_type: String,
        /// The registered types, comma-separated.
        known: String,
    },
    /// A field of a request is not acceptable.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// The field.
        field: &'static str,
        /// What is wrong with it and what would be right.
        message: String,
    },
    /// Something this engine or store does not do.
    #[error("{message}")]
    NotSupported {
        /// What is not supported and what to do instead.
        message: String,
    },
    /// The engine is stopping.
    #[error(
        "the task engine is shutting down and accepts no new work; try again once it has restarted"
    )]
    ShuttingDown,
    /// A write of a running attempt that no longer holds the task (its lease expired and the
    /// task was recovered, or it was cancelled).
    #[error(
        "attempt {attempt} of task {id} no longer holds the task (its lease expired or it was stopped); its write was refused"
    )]
    Fenced {
        /// The task.
        id: TaskId,
        /// The attempt that tried to write.
        attempt: u32,
    },
    /// The store failed.
    #[error("the task store failed while {action}: {message}")]
    Store {
        /// What the store was doing.
        action: &'static str,
        /// The underlying error.
        message: String,
    },
    /// The store's file cannot be written: it, or its file system, is read-only.
    #[error(
        "the task store failed while {action}: {message} — {} cannot be written (a read-only file or file system): make it writable, or keep the store in a writable directory, and restart msbd",
        path.display()
    )]
    StoreReadOnly {
        /// What the store was doing.
        action: &'static str,
        /// The store's file.
        path: PathBuf,
        /// The underlying error.
        message: String,
    },
}

impl Error {
    /// A store failure while doing `action`.
    pub fn store(action: &'static str, error: impl std::fmt::Display) -> Error {
        Error::Store {
            action,
            message: error.to_string(),
        }
    }
}

/// The result type of task-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;
