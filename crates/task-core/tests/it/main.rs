//! task-core's integration tests, one binary with a module per subject.

mod commit_cutter;
mod conformance;
mod crash;
mod engine;
mod postgres;
mod postgres_history;
mod properties;
mod transitions;
