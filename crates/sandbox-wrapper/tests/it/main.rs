//! Integration tests of sandbox-wrapper: one binary, one module per area.
mod files;
mod local;
mod microsandbox;
mod network;
mod output;
mod session;
mod spawner;
mod supervisor;
mod task_types;
mod wrapper;
