//! A TCP proxy between a store and PostgreSQL that breaks a connection at a `COMMIT`. Armed
//! with [`CommitCutter::arm`], it forwards the server's messages up to the `CommandComplete` of
//! the next `COMMIT`, then closes the client's connection without it: the transaction
//! committed (the server said so), the client only sees its connection break while it waited
//! for the answer, as when the server crashes or the network breaks at that moment. Armed with
//! [`CommitCutter::arm_before`], it closes both connections instead of forwarding the next
//! `COMMIT`: the server rolls the transaction back, the client sees the same broken
//! connection. Armed with [`CommitCutter::arm_hold`], it keeps the server's side of the
//! connection open instead, with the `COMMIT` never sent: the server goes on running the
//! transaction, as after a network break it has not noticed. [`CommitCutter::blackout_after_cut`]
//! makes it refuse new connections for a while after a cut, as a database that stays away.
//! Real PostgreSQL behind it; only the connection is cut.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub(crate) struct CommitCutter {
    port: u16,
    upstream: String,
    /// How many `COMMIT` answers are still to be lost.
    armed: Arc<AtomicUsize>,
    /// How many `COMMIT`s are still to be dropped before the server sees them.
    armed_before: Arc<AtomicUsize>,
    /// How many `COMMIT`s are still to be held back with the server's connection kept open.
    armed_hold: Arc<AtomicUsize>,
    /// How long new connections are refused after a cut, and until when.
    blackout: Arc<Mutex<(Duration, Option<Instant>)>>,
    /// How many were lost.
    cut: Arc<AtomicUsize>,
}

impl CommitCutter {
    /// Starts a proxy in front of the server of `database_url` (host and port only).
    pub(crate) async fn start(database_url: &str) -> CommitCutter {
        let config: tokio_postgres::Config = database_url.parse().expect("database url");
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            other => panic!("the commit cutter needs a TCP database url, not {other:?}"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = format!("{host}:{port}");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let cutter = CommitCutter {
            port: listener.local_addr().expect("address").port(),
            upstream: upstream.clone(),
            armed: Arc::new(AtomicUsize::new(0)),
            armed_before: Arc::new(AtomicUsize::new(0)),
            armed_hold: Arc::new(AtomicUsize::new(0)),
            blackout: Arc::new(Mutex::new((Duration::ZERO, None))),
            cut: Arc::new(AtomicUsize::new(0)),
        };
        let counters = Counters {
            armed: cutter.armed.clone(),
            armed_before: cutter.armed_before.clone(),
            armed_hold: cutter.armed_hold.clone(),
            blackout: cutter.blackout.clone(),
            cut: cutter.cut.clone(),
        };
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let refused = counters
                    .blackout
                    .lock()
                    .unwrap()
                    .1
                    .is_some_and(|until| Instant::now() < until);
                if refused {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let counters = counters.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        relay(client, server, counters).await;
                    }
                });
            }
        });
        cutter
    }

    /// `database_url` with this proxy as its server (and TLS off: the proxy reads the messages).
    pub(crate) fn url(&self, database_url: &str) -> String {
        let replaced =
            database_url.replacen(&self.upstream, &format!("127.0.0.1:{}", self.port), 1);
        assert_ne!(
            replaced, database_url,
            "the url names its server as {}",
            self.upstream
        );
        let separator = if replaced.contains('?') { '&' } else { '?' };
        format!("{replaced}{separator}sslmode=disable")
    }

    /// Loses the answer to the next `COMMIT` (on whichever connection sends it).
    pub(crate) fn arm(&self) {
        self.armed.fetch_add(1, Ordering::SeqCst);
    }

    /// Drops the next `COMMIT` before the server sees it, and closes the connection.
    pub(crate) fn arm_before(&self) {
        self.armed_before.fetch_add(1, Ordering::SeqCst);
    }

    /// Holds the next `COMMIT` back and closes the client's connection, keeping the server's open
    /// (for a minute): the server goes on running the transaction.
    pub(crate) fn arm_hold(&self) {
        self.armed_hold.fetch_add(1, Ordering::SeqCst);
    }

    /// After each cut from now on, refuses new connections for `period`.
    pub(crate) fn blackout_after_cut(&self, period: Duration) {
        self.blackout.lock().unwrap().0 = period;
    }

    /// How many connections were cut at a `COMMIT` so far (either way).
    pub(crate) fn cut(&self) -> usize {
        self.cut.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct Counters {
    armed: Arc<AtomicUsize>,
    armed_before: Arc<AtomicUsize>,
    armed_hold: Arc<AtomicUsize>,
    blackout: Arc<Mutex<(Duration, Option<Instant>)>>,
    cut: Arc<AtomicUsize>,
}

impl Counters {
    /// Counts a cut, and starts the blackout that follows it.
    fn cut(&self) {
        let mut blackout = self.blackout.lock().unwrap();
        if !blackout.0.is_zero() {
            blackout.1 = Some(Instant::now() + blackout.0);
        }
        self.cut.fetch_add(1, Ordering::SeqCst);
    }
}

/// Takes one from `counter` if it is above zero.
fn take(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// The length of the message at the start of `bytes` (a type byte, then a length that counts
/// itself), when it is all there.
fn message_end(bytes: &[u8]) -> Option<usize> {
    let length = u32::from_be_bytes(bytes.get(1..5)?.try_into().ok()?) as usize;
    let end = 1 + length;
    (bytes.len() >= end).then_some(end)
}

async fn relay(client: TcpStream, server: TcpStream, counters: Counters) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    // How many `ReadyForQuery` the server owes for what was forwarded to it: one for the
    // startup, one per `Sync` and per simple `Query`.
    let owed = Arc::new(AtomicUsize::new(0));
    // Client to server, message by message once the startup message (untyped: a length that
    // counts itself, then the body) went through.
    let upward = {
        let counters = counters.clone();
        let owed = owed.clone();
        tokio::spawn(async move {
            let mut pending: Vec<u8> = Vec::new();
            let mut buffer = vec![0u8; 64 * 1024];
            let mut started = false;
            let mut started_before = false;
            loop {
                let read = match client_read.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => read,
                };
                pending.extend_from_slice(&buffer[..read]);
                let mut complete = 0;
                loop {
                    let rest = &pending[complete..];
                    let end = if started {
                        match message_end(rest) {
                            Some(end) => end,
                            None => break,
                        }
                    } else {
                        let Some(length) = rest.get(..4) else { break };
                        let length = u32::from_be_bytes(length.try_into().expect("four")) as usize;
                        if rest.len() < length {
                            break;
                        }
                        started = true;
                        length
                    };
                    let message = &rest[..end];
                    if message[0] == b'Q' && &message[5..] == b"COMMIT\0" {
                        if take(&counters.armed_before) {
                            // What came before goes out; then the server sees the connection
                            // close (this half is dropped), answers what it got, and rolls
                            // back.
                            let _ = server_write.write_all(&pending[..complete]).await;
                            counters.cut();
                            return None;
                        }
                        if take(&counters.armed_hold) {
                            // What came before goes out; the server's side stays open.
                            let _ = server_write.write_all(&pending[..complete]).await;
                            counters.cut();
                            return Some(server_write);
                        }
                    }
                    if !started_before || matches!(message[0], b'S' | b'Q') {
                        owed.fetch_add(1, Ordering::SeqCst);
                    }
                    started_before = true;
                    complete += end;
                }
                if server_write.write_all(&pending[..complete]).await.is_err() {
                    break;
                }
                pending.drain(..complete);
            }
            None
        })
    };
    // Server to client, message by message (the first message the server sends is already
    // typed: no TLS negotiation with sslmode=disable).
    let mut pending: Vec<u8> = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut upward = upward;
    let mut upward_done = false;
    let mut held = None;
    let mut answered = 0;
    'relay: loop {
        let read = tokio::select! {
            read = server_read.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            },
            ended = &mut upward, if !upward_done => {
                upward_done = true;
                match ended {
                    // The `COMMIT` is held back: the client's connection closes, the
                    // server's stays open.
                    Ok(Some(server_write)) => {
                        held = Some(server_write);
                        if answered >= owed.load(Ordering::SeqCst) {
                            break;
                        }
                        continue;
                    }
                    _ => continue,
                }
            }
        };
        pending.extend_from_slice(&buffer[..read]);
        let mut complete = 0;
        while let Some(end) = message_end(&pending[complete..]) {
            let message = &pending[complete..complete + end];
            if message[0] == b'C' && &message[5..] == b"COMMIT\0" && take(&counters.armed) {
                // Everything before the answer goes out; the answer and the rest do not.
                let _ = client_write.write_all(&pending[..complete]).await;
                counters.cut();
                break 'relay;
            }
            if message[0] == b'Z' {
                answered += 1;
            }
            complete += end;
        }
        if client_write.write_all(&pending[..complete]).await.is_err() {
            break;
        }
        pending.drain(..complete);
        // Held back: the client gets the answers to what went before the `COMMIT`, then its
        // connection closes.
        if held.is_some() && answered >= owed.load(Ordering::SeqCst) {
            break;
        }
    }
    upward.abort();
    let _ = client_write.shutdown().await;
    drop(client_write);
    if let Some(server_write) = held {
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop((server_write, server_read));
    }
}
