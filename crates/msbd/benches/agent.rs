//! Benchmarks of an agent's working day, run by `cargo xtask bench` (or
//! `cargo bench -p msbd --bench agent [-- FILTER]`). A plain program (`harness = false`) that
//! writes its figures (name → number) to `$MSBD_BENCH_PARTS_DIR/agent.json` (else
//! `target/bench/parts/agent.json`).
//!
//! - `files_write_read_mib_per_s`: 8 MiB of random bytes written into a session with
//!   `write_file` (base64, in 2 MiB pieces with `append`: one call's request is capped at 4 MiB
//!   by default) and read back with `read_file` (2 MiB pieces), through MCP stdio to the built
//!   `msbd serve`; the figure is the bytes moved (8 MiB in, 8 MiB out) over the time of both,
//!   the median of 5 rounds (the bytes read back are checked). `diag_files_write_mib_per_s`
//!   and `diag_files_read_mib_per_s` are each half on its own.
//! - `sandbox_proxy_fetch_ms`: `execute_command` (submit to done) of `curl` fetching a 1 KiB page
//!   from a test server on 127.0.0.1 through msbd's proxy, in a strong sandbox of network
//!   `allow` (the name mapped to 127.0.0.1 by `MSB_NETWORK_HOSTS`); the median of 40 runs.
//!   `diag_sandbox_host_fetch_ms` is the same `curl` in a sandbox of network `host` (straight
//!   to the server), measured in turns in the same run, and `sandbox_proxy_vs_host_ratio` the
//!   ratio (target ≤ 1.5). Needs root and bubblewrap; without them the figure is left out and
//!   the bench says why.
//!
//! An optional argument keeps only the figures whose name contains it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;
type Connection = RunningService<RoleClient, Client>;

const FILE_BYTES: usize = 8 << 20;
const PIECE: usize = 2 << 20;
const FILE_ROUNDS: usize = 5;
const FETCHES: usize = 40;

#[derive(Clone)]
struct Client;

impl ClientHandler for Client {
    fn get_info(&self) -> ClientConfig {
        ClientConfig::new(
            ClientCapabilities::default(),
            Implementation::new("bench", "0.0.0"),
        )
    }
}

fn main() -> BenchResult<()> {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut part = serde_json::Map::new();
    runtime.block_on(async {
        if wanted("files_write_read_mib_per_s") {
            let (both, write, read) = files().await?;
            println!("files_write_read_mib_per_s: {both:.1} (target >= 100); write alone {write:.1}, read alone {read:.1}");
            part.insert("files_write_read_mib_per_s".into(), json!(round(both)));
            part.insert("diag_files_write_mib_per_s".into(), json!(round(write)));
            part.insert("diag_files_read_mib_per_s".into(), json!(round(read)));
        }
        if wanted("sandbox_proxy_fetch_ms") {
            match proxy_fetch().await? {
                Some((proxy, host)) => {
                    let ratio = proxy / host;
                    println!("sandbox_proxy_fetch_ms: {proxy:.2}; network host: {host:.2}; sandbox_proxy_vs_host_ratio {ratio:.2} (target <= 1.5)");
                    part.insert("sandbox_proxy_fetch_ms".into(), json!(round(proxy)));
                    part.insert("diag_sandbox_host_fetch_ms".into(), json!(round(host)));
                    part.insert("sandbox_proxy_vs_host_ratio".into(), json!(round(ratio)));
                }
                None => println!(
                    "sandbox_proxy_fetch_ms: not measured: it needs root and bubblewrap (a strong sandbox with a network namespace of its own)"
                ),
            }
        }
        BenchResult::Ok(())
    })?;
    let dir = std::env::var_os("MSBD_BENCH_PARTS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench/parts"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("agent.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(part))? + "\n",
    )?;
    println!("(written to {})", path.display());
    Ok(())
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

async fn start(data_dir: &std::path::Path, env: &[(&str, String)]) -> BenchResult<Connection> {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_msbd"));
    command
        .arg("serve")
        .env("MSB_DATA_DIR", data_dir)
        .env("MSB_LOG_LEVEL", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    Ok(Client.serve(TokioChildProcess::new(command)?).await?)
}

async fn call(client: &Connection, tool: &str, arguments: Value) -> BenchResult<Value> {
    let arguments = arguments
        .as_object()
        .cloned()
        .ok_or("arguments must be an object")?;
    let result = client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
        .await?;
    if result.is_error == Some(true) {
        return Err(format!("{tool} failed: {result:?}").into());
    }
    result
        .structured_content
        .ok_or_else(|| format!("{tool}: no structured answer").into())
}

/// Bytes that do not compress, from a simple generator (xorshift).
fn noise(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect()
}

async fn files() -> BenchResult<(f64, f64, f64)> {
    let dir = tempfile::tempdir()?;
    let client = start(&dir.path().join("data"), &[]).await?;
    let bytes = noise(FILE_BYTES);
    let pieces: Vec<String> = bytes
        .chunks(PIECE)
        .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
        .collect();
    let mib = FILE_BYTES as f64 / f64::from(1 << 20);
    let (mut both, mut writes, mut reads) = (Vec::new(), Vec::new(), Vec::new());
    // One round more than measured: the first makes the session.
    for round in 0..=FILE_ROUNDS {
        let path = format!("blob-{round}.bin");
        let started = Instant::now();
        for (index, piece) in pieces.iter().enumerate() {
            call(
                &client,
                "write_file",
                json!({"session_id": "files", "path": path, "content": piece, "encoding": "base64", "append": index > 0}),
            )
            .await?;
        }
        let written = started.elapsed();
        let mut back = Vec::with_capacity(FILE_BYTES);
        while back.len() < FILE_BYTES {
            let answer = call(
                &client,
                "read_file",
                json!({"session_id": "files", "path": path, "offset": back.len(), "length": PIECE, "encoding": "base64"}),
            )
            .await?;
            let content = answer["content"]
                .as_str()
                .ok_or("read_file gave no content")?;
            let piece = base64::engine::general_purpose::STANDARD.decode(content)?;
            if piece.is_empty() {
                return Err("read_file stopped short".into());
            }
            back.extend_from_slice(&piece);
        }
        let total = started.elapsed();
        if back != bytes {
            return Err("the bytes read back differ from those written".into());
        }
        if round > 0 {
            both.push(2.0 * mib / total.as_secs_f64());
            writes.push(mib / written.as_secs_f64());
            reads.push(mib / (total - written).as_secs_f64());
        }
    }
    client.cancel().await?;
    Ok((median(&mut both), median(&mut writes), median(&mut reads)))
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// A web server on 127.0.0.1 that answers every request with 1 KiB.
async fn page_server() -> BenchResult<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = "x".repeat(1024);
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nConnection: close\r\n\r\n{body}"
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(port)
}

async fn proxy_fetch() -> BenchResult<Option<(f64, f64)>> {
    let bwrap = ["/usr/bin/bwrap", "/usr/local/bin/bwrap", "/bin/bwrap"]
        .iter()
        .any(|p| std::path::Path::new(p).exists());
    if !is_root() || !bwrap {
        return Ok(None);
    }
    let port = page_server().await?;
    let dir = tempfile::tempdir()?;
    let client = start(
        &dir.path().join("data"),
        &[
            ("MSB_ISOLATION", "strong".to_owned()),
            ("MSB_NETWORK_ALLOW", format!("bench.test:{port}")),
            ("MSB_NETWORK_HOSTS", "bench.test=127.0.0.1".to_owned()),
            ("MSB_NETWORK_PRIVATE", format!("127.0.0.1:{port}")),
            ("MSB_NETWORK_HOST", "true".to_owned()),
        ],
    )
    .await?;
    let runs = [
        (
            "allow",
            json!({"network": "allow"}),
            format!("curl -sS -o /dev/null --max-time 10 http://bench.test:{port}/"),
        ),
        (
            "host",
            json!({"network": "host"}),
            format!("curl -sS -o /dev/null --max-time 10 http://127.0.0.1:{port}/"),
        ),
    ];
    let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    // One round more than measured: the first makes the sessions.
    for round in 0..=FETCHES {
        for (index, (session, network, line)) in runs.iter().enumerate() {
            let mut arguments = json!({"command": line, "session_id": session});
            if round == 0 {
                for (key, value) in network.as_object().into_iter().flatten() {
                    arguments[key] = value.clone();
                }
            }
            let started = Instant::now();
            let answer = call(&client, "execute_command", arguments).await?;
            let took = started.elapsed();
            if answer["exit_code"] != 0 {
                return Err(format!("curl in session {session} failed: {answer}").into());
            }
            if round > 0 {
                times[index].push(took.as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.cancel().await?;
    let [mut proxy, mut host] = times;
    Ok(Some((median(&mut proxy), median(&mut host))))
}
