//! The wire below rmcp's transports: what msbd's stdio and HTTP servers wrap around them.
//!
//! - [`stdio`]: [`LimitedLines`], the newline-delimited input with a size limit;
//! - [`http`]: [`FastLaneSessions`], the streamable HTTP session manager whose sessions answer
//!   quick calls on a [`FastLane`](crate::FastLane).
//!
//! msbd owns the sockets, signals and configuration; the JSON-RPC they carry is built here.

pub mod http;
pub mod stdio;

pub use http::FastLaneSessions;
pub use stdio::LimitedLines;
