//! msbd's integration tests, end to end against the built binary: one test binary, one module
//! per subject (run one with `cargo nextest run -p msbd --test it -E 'test(/^hostile::/)'`).

mod cli;
mod cluster;
mod common;
mod console;
mod e2e_http;
mod e2e_stdio;
mod hostile;
mod network;
