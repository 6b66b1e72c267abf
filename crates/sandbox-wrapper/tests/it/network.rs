//! The network proxy on its own, on this host's loopback (no sandbox, no root): what it lets
//! through, what it refuses with which answer, and what it counts. The proxy inside real
//! sandboxes is tested end to end in msbd (`network::a_session_reaches_only_what_its_policy_allows`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sandbox_wrapper::network::{AddressRule, AllowRule, Network, NetworkSettings, Refusal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server that answers every request with `saw <request line>` and closes.
async fn web_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
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
                let text = String::from_utf8_lossy(&head).into_owned();
                let body = format!("saw {}", text.replace("\r\n", "|"));
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    port
}

/// Sends `request` to the proxy and reads until it closes (or 10 s pass).
async fn exchange(proxy: u16, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", proxy)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_lets_through_only_allowed_names_and_counts_what_it_refuses() {
    let server = web_server().await;
    let other = web_server().await;
    let settings = NetworkSettings {
        private_allowed: vec![AddressRule::parse(&format!("127.0.0.1:{server}")).unwrap()],
        hosts: HashMap::from([
            (
                "allowed.test".to_owned(),
                vec!["127.0.0.1".parse().unwrap()],
            ),
            (
                "service.test".to_owned(),
                vec!["127.0.0.1".parse().unwrap()],
            ),
        ]),
        ..NetworkSettings::default()
    };
    let network = Network::new(settings);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap().port();
    let allow = vec![
        AllowRule::parse(&format!("allowed.test:{server}")).unwrap(),
        AllowRule::parse(&format!("service.test:{other}")).unwrap(),
    ];
    let serving = tokio::spawn(Arc::clone(&network).serve(listener, "s1".into(), allow));

    // Plain HTTP: sent on in origin form, with the checked name as Host, one request only.
    let answer = exchange(
        proxy,
        format!("GET http://allowed.test:{server}/a?b HTTP/1.1\r\nHost: evil.test\r\nProxy-Connection: keep-alive\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains(&format!(
            "saw GET /a?b HTTP/1.1|Host: allowed.test:{server}|Connection: close||"
        )),
        "{answer}"
    );
    // CONNECT: a tunnel, then anything.
    let answer = exchange(
        proxy,
        format!("CONNECT allowed.test:{server} HTTP/1.1\r\n\r\nGET /tunnelled HTTP/1.1\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200")
            && answer.contains("saw GET /tunnelled"),
        "{answer}"
    );
    // SOCKS5, by name.
    let mut socks = TcpStream::connect(("127.0.0.1", proxy)).await.unwrap();
    socks.write_all(&[5, 1, 0]).await.unwrap();
    let mut chosen = [0u8; 2];
    socks.read_exact(&mut chosen).await.unwrap();
    assert_eq!(chosen, [5, 0]);
    let name = b"allowed.test";
    let mut request = vec![5, 1, 0, 3, name.len() as u8];
    request.extend_from_slice(name);
    request.extend_from_slice(&server.to_be_bytes());
    socks.write_all(&request).await.unwrap();
    let mut reply = [0u8; 10];
    socks.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[1], 0, "SOCKS reply {reply:?}");
    socks
        .write_all(b"GET /socks HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    socks.read_to_end(&mut answer).await.unwrap();
    assert!(String::from_utf8_lossy(&answer).contains("saw GET /socks"));

    // Refused, each with its reason.
    for (request, reason, status) in [
        (
            format!("GET http://denied.test:{server}/ HTTP/1.1\r\n\r\n"),
            "is not on this session's allow-list",
            "403",
        ),
        (
            format!("CONNECT allowed.test:{} HTTP/1.1\r\n\r\n", server + 1),
            "is not on this session's allow-list",
            "403",
        ),
        (
            format!("GET http://127.0.0.1:{server}/ HTTP/1.1\r\n\r\n"),
            "is an address",
            "403",
        ),
        (
            format!("CONNECT 2130706433:{server} HTTP/1.1\r\n\r\n"),
            "is an address",
            "403",
        ),
        (
            format!("CONNECT service.test:{other} HTTP/1.1\r\n\r\n"),
            "which sandboxes may not reach",
            "403",
        ),
        (
            format!("CONNECT bad\\.name.test:{server} HTTP/1.1\r\n\r\n"),
            "is not a host name",
            "400",
        ),
        (
            "GET /local HTTP/1.1\r\n\r\n".to_owned(),
            "is not a proxy request",
            "400",
        ),
    ] {
        let answer = exchange(proxy, request.as_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")) && answer.contains(reason),
            "{request:?}: {answer}"
        );
    }
    let refused: HashMap<&str, u64> = network
        .stats
        .refused()
        .into_iter()
        .map(|(reason, count)| (reason.as_str(), count))
        .collect();
    assert_eq!(refused[Refusal::NotAllowed.as_str()], 2, "{refused:?}");
    assert_eq!(refused[Refusal::Address.as_str()], 2, "{refused:?}");
    assert_eq!(refused[Refusal::PrivateAddress.as_str()], 1, "{refused:?}");
    assert_eq!(refused[Refusal::BadRequest.as_str()], 2, "{refused:?}");
    assert_eq!(network.stats.allowed(), 3);

    // The session ends: its proxy stops answering.
    serving.abort();
    let _ = serving.await;
    assert!(TcpStream::connect(("127.0.0.1", proxy)).await.is_err());
}
