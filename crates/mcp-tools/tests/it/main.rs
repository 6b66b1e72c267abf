//! mcp-tools' integration tests: one test binary, one module per subject, and the one way
//! they wait for something to become true.

mod docs;
mod tools;

use std::fmt::Display;
use std::time::{Duration, Instant};

/// Waits until `condition` holds, checking it at once and then every few milliseconds (10 ms,
/// doubling up to 100 ms), and returns what it gave. `condition` answers `Ok(value)` when it
/// holds, else `Err(what it saw)`; if it still does not hold `within`, the test fails with the
/// last thing it saw.
pub(crate) async fn wait_until<T, E: Display>(
    within: Duration,
    mut condition: impl AsyncFnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        match condition().await {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "not so within {within:?}: {seen}"
            ),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
