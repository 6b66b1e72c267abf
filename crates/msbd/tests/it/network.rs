//! Network by policy, end to end: the release binary, an MCP client, strong sandboxes, and test
//! servers on this host's 127.0.0.1. Names are mapped to 127.0.0.1 by the proxy's own table
//! (`MSB_NETWORK_HOSTS`), so nothing leaves the machine; one server's port is allowed as a
//! private address (`MSB_NETWORK_PRIVATE`), the other stands for the host's own loopback services.

use std::path::Path;
use std::process::Stdio;

use rmcp::ServiceExt;
use rmcp::transport::TokioChildProcess;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Client, Connection, MSBD, call, ok};
use crate::hostile::{is_root, opt_out};

/// Whether this host can run the test (root and bubblewrap); if not, fails unless
/// `MSBD_TEST_ALLOW_UNPRIVILEGED` is set, and then says what it skipped.
fn can_test() -> bool {
    let bwrap = ["/usr/bin/bwrap", "/usr/local/bin/bwrap", "/bin/bwrap"]
        .iter()
        .any(|p| Path::new(p).exists());
    if is_root() && bwrap {
        return true;
    }
    opt_out("network policies in strong sandboxes (needs root and bubblewrap)");
    false
}

/// A web server on 127.0.0.1 that answers every request with `<name> saw <request line>`.
async fn web_server(name: &'static str) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
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
                let text = String::from_utf8_lossy(&head);
                let line = text.lines().next().unwrap_or_default();
                let body = format!("{name} saw {line}\n");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    port
}

async fn start(data_dir: &Path, allowed_port: u16) -> Connection {
    let mut command = tokio::process::Command::new(MSBD);
    command
        .arg("serve")
        .env("MSB_DATA_DIR", data_dir)
        .env("MSB_LOG_LEVEL", "warn")
        .env("MSB_ISOLATION", "strong")
        .env("MSB_NETWORK_ALLOW", format!("allowed.test:{allowed_port}"))
        .env("MSB_NETWORK_CALLER_ALLOW", ".test:*")
        .env(
            "MSB_NETWORK_HOSTS",
            "allowed.test=127.0.0.1,denied.test=127.0.0.1,service.test=127.0.0.1",
        )
        .env("MSB_NETWORK_PRIVATE", format!("127.0.0.1:{allowed_port}"))
        .env("MSB_NETWORK_HOST", "true")
        .stderr(Stdio::inherit());
    Client::default()
        .serve(TokioChildProcess::new(command).unwrap())
        .await
        .unwrap()
}

/// Runs a shell line in a session and returns what it printed (it must exit 0).
async fn run(client: &Connection, session: &str, extra: Value, line: &str) -> String {
    let mut arguments = json!({"command": line, "session_id": session, "timeout": 60});
    for (key, value) in extra.as_object().unwrap() {
        arguments[key] = value.clone();
    }
    let answer = ok(client, "execute_command", arguments).await;
    assert_eq!(answer["exit_code"], 0, "{line}: {answer}");
    answer["output_tail"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reaches_only_what_its_policy_allows() {
    if !can_test() {
        return;
    }
    let allowed = web_server("allowed").await;
    let service = web_server("host-service").await;
    let dir = tempfile::tempdir().unwrap();
    let client = start(&dir.path().join("data"), allowed).await;

    // Policy allow: the operator's name, plus one the caller adds (within `.test:*`).
    let allow = json!({"network": "allow", "network_allow": [format!("service.test:{service}")]});
    let out = run(
        &client,
        "net",
        allow.clone(),
        &format!(
            "curl -sS --max-time 20 http://allowed.test:{allowed}/plain; \
             curl -sS --max-time 20 --proxytunnel http://allowed.test:{allowed}/tunnel; \
             curl -sS --max-time 20 --socks5-hostname 127.0.0.1:3128 http://allowed.test:{allowed}/socks; \
             python3 -c \"import urllib.request; print(urllib.request.urlopen('http://allowed.test:{allowed}/urllib', timeout=20).read().decode())\""
        ),
    )
    .await;
    for seen in [
        "allowed saw GET /plain HTTP/1.1",
        "allowed saw GET /tunnel HTTP/1.1",
        "allowed saw GET /socks HTTP/1.1",
        "allowed saw GET /urllib HTTP/1.1",
    ] {
        assert!(out.contains(seen), "{seen:?} missing from:\n{out}");
    }

    // Refused: a name not on the list, a raw address through the proxy, the host's own
    // loopback service under an allowed name, and a DNS lookup from inside.
    // (curl's complaints go to /dev/null: stdout and stderr are two pipes, and a line of one
    // can land in the middle of a line of the other in the combined output.)
    let out = run(
        &client,
        "net",
        json!({}),
        &format!(
            "code() {{ curl -sS -o /dev/null -w '%{{http_code}}' --max-time 20 \"$@\" 2>/dev/null; echo \" exit=$?\"; }}; \
             echo \"denied: $(code http://denied.test:{allowed}/)\"; \
             echo \"raw: $(code --noproxy '' -x http://127.0.0.1:3128 http://127.0.0.1:{allowed}/)\"; \
             echo \"tunnel-raw: $(code --noproxy '' -p -x http://127.0.0.1:3128 http://127.0.0.1:{allowed}/)\"; \
             echo \"service: $(code http://service.test:{service}/)\"; \
             echo \"numeric: $(code --noproxy '' -x http://127.0.0.1:3128 http://2130706433:{allowed}/)\"; \
             echo \"socks-denied: $(code --socks5-hostname 127.0.0.1:3128 http://denied.test:{allowed}/)\"; \
             echo \"socks-address: $(code --noproxy '' --socks5 127.0.0.1:3128 http://127.0.0.1:{allowed}/)\"; \
             echo \"direct: $(code --noproxy '*' http://127.0.0.1:{allowed}/)\"; \
             getent hosts example.com >/dev/null 2>&1; echo \"dns: exit=$?\"; \
             python3 -c \"import socket; socket.getaddrinfo('allowed.test', 80)\" 2>/dev/null; echo \"py-dns: exit=$?\""
        ),
    )
    .await;
    let line = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} line in:\n{out}"))
            .to_owned()
    };
    assert!(line("denied").contains("403"), "{out}");
    assert!(line("raw").contains("403"), "{out}");
    // CONNECT refused: curl fails (the proxy's 403 is the tunnel's, not a page's).
    assert!(!line("tunnel-raw").contains("exit=0"), "{out}");
    assert!(line("service").contains("403"), "{out}");
    // 2130706433 is 127.0.0.1 to a resolver: an address, refused before any lookup.
    assert!(line("numeric").contains("403"), "{out}");
    // Through SOCKS5: a name not allowed, and an address (socks5 without h sends one).
    assert!(!line("socks-denied").contains("exit=0"), "{out}");
    assert!(!line("socks-address").contains("exit=0"), "{out}");
    // Not through the proxy: nothing listens on the sandbox's own loopback there.
    assert!(!line("direct").contains("exit=0"), "{out}");
    assert!(!line("dns").contains("exit=0"), "{out}");
    assert!(!line("py-dns").contains("exit=0"), "{out}");

    // The session cannot be widened by a later call.
    for wider in [
        json!({"network": "host"}),
        json!({"network": "allow", "network_allow": ["other.test"]}),
        json!({"network": "none"}),
    ] {
        let mut arguments = json!({"command": "true", "session_id": "net"});
        for (key, value) in wider.as_object().unwrap() {
            arguments[key] = value.clone();
        }
        let answer = call(&client, "execute_command", arguments).await;
        let text = format!("{answer:?}");
        assert!(
            text.contains("has network allow allowed.test") && text.contains("never widened"),
            "{wider}: {text}"
        );
    }
    // A caller may not add what the operator does not let it.
    let refused = call(
        &client,
        "execute_command",
        json!({"command": "true", "network": "allow", "network_allow": ["pypi.org"]}),
    )
    .await;
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    assert!(
        format!("{refused:?}").contains("MSB_NETWORK_CALLER_ALLOW"),
        "{refused:?}"
    );

    // Policy none (the default): no proxy, no route.
    let out = run(
        &client,
        "quiet",
        json!({}),
        &format!(
            "echo \"proxy=${{HTTP_PROXY:-unset}}\"; \
             curl -sS --max-time 5 -o /dev/null http://allowed.test:{allowed}/ 2>/dev/null; echo \"name: exit=$?\"; \
             curl -sS --max-time 5 -o /dev/null http://127.0.0.1:{allowed}/ 2>/dev/null; echo \"address: exit=$?\""
        ),
    )
    .await;
    assert!(out.contains("proxy=unset"), "{out}");
    assert!(
        !out.contains("name: exit=0") && !out.contains("address: exit=0"),
        "{out}"
    );

    // Policy host (enabled here): the host's own loopback, directly.
    let out = run(
        &client,
        "wide",
        json!({"network": "host"}),
        &format!("curl -sS --max-time 20 http://127.0.0.1:{service}/host"),
    )
    .await;
    assert!(out.contains("host-service saw GET /host"), "{out}");

    let sessions = ok(&client, "get_sessions", json!({})).await;
    let network_of = |id: &str| {
        sessions["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["session_id"] == id)
            .map(|s| s["network"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(
        network_of("net"),
        format!("allow allowed.test:{allowed}, service.test:{service}")
    );
    assert_eq!(network_of("quiet"), "none");
    assert_eq!(network_of("wide"), "host");
    client.cancel().await.unwrap();
}
