//! The `msbd` daemon: configuration, transports and process lifecycle (the binary in
//! `main.rs` is its command line).
//!
//! This crate sits on top of every other crate and owns the `MSB_*` configuration (read
//! from the environment into one typed struct, [`config`]), tracing (to stderr, never
//! stdout), the stdio and HTTP transports, and signal handling with a graceful shutdown. It
//! is the only crate that reads the environment, parses flags or installs signal handlers.
//!
//! It is a library as well as a binary so that the fuzz targets (`fuzz/`) can reach the
//! configuration parser and the stdio framing; nothing else depends on it.

pub mod config;
pub mod doctor;
mod http;
mod metrics;
pub mod serve;
pub mod stdio;
