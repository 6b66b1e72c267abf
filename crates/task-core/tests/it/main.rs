//! task-core's integration tests, one binary with a module per subject.

mod conformance;
mod crash;
mod engine;
mod properties;
mod transitions;
