//! The `msbd` daemon: configuration, transports and process lifecycle (the binary in
//! `main.rs` is its command line).
//!
//! This crate sits on top of every other crate and owns the `MSB_*` configuration (read
//! from the environment into one typed struct, [`config`]), tracing (to stderr, never
//! stdout), the stdio and HTTP transports, and signal handling with a graceful shutdown. It
//! is the only crate that reads the environment, parses flags or installs signal handlers.
//! [`cli`] is the command-line client of a running msbd (`msbd task`, `queue`, `sessions`,
//! `health`).
//!
//! It is a library as well as a binary so that the fuzz targets (`fuzz/`) can reach the
//! configuration parser and the stdio framing; nothing else depends on it.

pub mod cli;
pub mod config;
mod console;
pub mod doctor;
mod hosts;
mod http;
mod metrics;
pub mod serve;
mod spin;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rmcp::ServerHandler as _;
    use sandbox_wrapper::{Wrapper, WrapperConfig};
    use task_core::store::Store;
    use task_core::store::memory::MemoryStore;

    /// The version MCP clients read in `initialize` (`serverInfo.version`) is msbd's own, the one
    /// `msbd --version` prints, and a real one.
    #[tokio::test]
    async fn the_server_info_version_is_msbds() {
        let version = env!("CARGO_PKG_VERSION");
        assert_ne!(version, "0.0.0");
        let home = ("HOME".to_owned(), "/home/ada".to_owned());
        let loaded = crate::config::load([home], &crate::config::Overrides::default()).unwrap();
        let options = crate::serve::server_options(&loaded.config);
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let wrapper = Wrapper::start(store, WrapperConfig::new(dir.path().join("data")))
            .await
            .unwrap();
        let info = mcp_tools::McpServer::new(wrapper.clone(), options).get_info();
        assert_eq!(info.server_info.name, "msbd");
        assert_eq!(info.server_info.version, version);
        wrapper
            .graceful_shutdown(std::time::Duration::from_secs(5))
            .await;
    }
}
