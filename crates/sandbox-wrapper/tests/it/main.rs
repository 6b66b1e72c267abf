//! Integration tests of sandbox-wrapper: one binary, one module per area.
mod local;
mod microsandbox;
mod session;
mod supervisor;
mod task_types;
mod wrapper;
