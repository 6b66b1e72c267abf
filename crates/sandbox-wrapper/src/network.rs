//! Network for sandboxes, by policy, per session: `none` (no route out, the default), `allow`
//! (outbound only to an allow-list of names, through a filtering proxy msbd runs), `host` (the
//! host's network, when the operator enables it).
//!
//! Under `allow` the session's network namespace holds one listening socket,
//! `127.0.0.1:3128`, made by msbd inside that namespace and served by msbd from the host: the
//! sandbox's only way out. `HTTP_PROXY`, `HTTPS_PROXY` and `ALL_PROXY` point at it, so pip, npm,
//! git and curl use it. The proxy speaks HTTP `CONNECT` (for TLS and anything else over TCP) and
//! plain HTTP proxying. For each request it checks the name and port against the session's
//! allow-list, resolves the name on the host (never in the sandbox, which has no resolver it can
//! reach), refuses addresses of the host's loopback, link-local and private ranges unless the
//! operator allows them, and refuses raw IP addresses. Every refusal is logged with the session
//! and the name asked for, and counted ([`NetworkStats`]).
//!
//! A session's policy is fixed when the session is made: a later call cannot widen it, and
//! nothing inside the sandbox can (it holds no capability in the network namespace, which
//! belongs to the host's user namespace).

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The port the proxy listens on inside a sandbox of policy `allow` (on its own loopback).
pub const PROXY_PORT: u16 = 3128;

/// The longest request head the proxy reads.
const MAX_HEAD: usize = 64 * 1024;
/// How long a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a name lookup may take, and (separately) connecting to its addresses.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// The most addresses of one name tried.
const MAX_ADDRESSES: usize = 8;
/// The most connections one session's proxy holds at once (more wait to be accepted).
const SESSION_CONNECTIONS: usize = 128;
/// The most connections all proxies hold at once.
const ALL_CONNECTIONS: usize = 1024;
/// A connection through the proxy that moves no byte for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Every refusal is logged, up to this many per session in a second (a sandbox in a loop would
/// otherwise fill the disk); past it they are counted, and their number is logged with the
/// next one logged.
const REFUSALS_LOGGED_PER_SECOND: u32 = 20;

/// A session's network mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum NetworkMode {
    /// No network: a loopback interface of its own and nothing else.
    #[default]
    None,
    /// Outbound only to the allow-list, through msbd's proxy.
    Allow,
    /// The host's network.
    Host,
}

impl NetworkMode {
    /// Reads `none`, `allow` or `host`.
    pub fn parse(text: &str) -> Result<NetworkMode, String> {
        match text {
            "none" => Ok(NetworkMode::None),
            "allow" => Ok(NetworkMode::Allow),
            "host" => Ok(NetworkMode::Host),
            other => Err(format!(
                "network {other:?} is not a policy: use \"none\" (no network), \"allow\" (only the allowed names, through msbd's proxy) or \"host\" (the host's network, when the operator enables it)"
            )),
        }
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::None => "none",
            NetworkMode::Allow => "allow",
            NetworkMode::Host => "host",
        }
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which ports a rule allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Ports {
    /// 80 and 443 (a rule written without a port).
    Web,
    /// This one.
    One(u16),
    /// Every port (`:*`).
    Any,
}

impl Ports {
    fn allows(self, port: u16) -> bool {
        match self {
            Ports::Web => port == 80 || port == 443,
            Ports::One(one) => port == one,
            Ports::Any => true,
        }
    }

    /// Whether every port `self` allows, `wider` allows too.
    fn within(self, wider: Ports) -> bool {
        match (self, wider) {
            (_, Ports::Any) => true,
            (Ports::Any, _) => false,
            (Ports::Web, Ports::Web) => true,
            (Ports::Web, Ports::One(_)) => false,
            (Ports::One(port), wider) => wider.allows(port),
        }
    }
}

/// One entry of an allow-list: a domain name (`pypi.org`: that name only) or a suffix
/// (`.githubusercontent.com` or `*.githubusercontent.com`: every name under it, not the name
/// itself), with a port (`:8080`), every port (`:*`), or none (80 and 443). `*` alone stands
/// for every name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AllowRule {
    /// The name, lower case, without the leading `.` of a suffix; empty for `*`.
    name: String,
    suffix: bool,
    ports: Ports,
}

impl AllowRule {
    /// Reads a rule: `pypi.org`, `.githubusercontent.com`, `*.example.com`, `example.com:8080`,
    /// `example.com:*`, `*`.
    pub fn parse(text: &str) -> Result<AllowRule, String> {
        let text = text.trim();
        let bad = |why: &str| {
            format!(
                "{text:?} is not a network rule ({why}): write a name (\"pypi.org\"), a suffix (\".githubusercontent.com\"), either with \":port\" or \":*\" (else ports 80 and 443), or \"*\" for every name"
            )
        };
        let (host, ports) = match text.rsplit_once(':') {
            Some((host, "*")) => (host, Ports::Any),
            Some((host, port)) => match port.parse::<u16>() {
                Ok(port) if port > 0 => (host, Ports::One(port)),
                _ => return Err(bad("the port must be 1 to 65535 or *")),
            },
            None => (text, Ports::Web),
        };
        if host == "*" {
            return Ok(AllowRule {
                name: String::new(),
                suffix: true,
                ports,
            });
        }
        let (name, suffix) = match host.strip_prefix("*.").or_else(|| host.strip_prefix('.')) {
            Some(rest) => (rest, true),
            None => (host, false),
        };
        let name = name.to_ascii_lowercase();
        if name.parse::<IpAddr>().is_ok() {
            return Err(bad(
                "an address, not a name: names are resolved by msbd, and addresses are never allowed by themselves",
            ));
        }
        if !valid_name(&name) {
            return Err(bad("a name is letters, digits, '-', '_' and '.'"));
        }
        Ok(AllowRule {
            name,
            suffix,
            ports,
        })
    }

    /// Whether a connection to `name` (lower case) on `port` is allowed by this rule.
    fn allows(&self, name: &str, port: u16) -> bool {
        let named = if self.name.is_empty() {
            true
        } else if self.suffix {
            name.len() > self.name.len()
                && name.ends_with(&self.name)
                && name.as_bytes()[name.len() - self.name.len() - 1] == b'.'
        } else {
            name == self.name
        };
        named && self.ports.allows(port)
    }

    /// Whether everything this rule allows, `wider` allows too.
    fn within(&self, wider: &AllowRule) -> bool {
        if !self.ports.within(wider.ports) {
            return false;
        }
        if wider.name.is_empty() {
            return true;
        }
        if self.name.is_empty() {
            return false;
        }
        match (self.suffix, wider.suffix) {
            (false, false) | (true, true) if self.name == wider.name => true,
            (_, true) => AllowRule {
                name: wider.name.clone(),
                suffix: true,
                ports: Ports::Any,
            }
            .allows(&self.name, 1),
            _ => false,
        }
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.name.is_empty(), self.suffix) {
            (true, _) => f.write_str("*")?,
            (false, true) => write!(f, ".{}", self.name)?,
            (false, false) => f.write_str(&self.name)?,
        }
        match self.ports {
            Ports::Web => Ok(()),
            Ports::One(port) => write!(f, ":{port}"),
            Ports::Any => f.write_str(":*"),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// An address range the proxy may connect to although it is loopback, link-local or private:
/// `127.0.0.1`, `10.0.0.0/8`, `10.0.0.0/8:5432`, `[fd00::/8]:443`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressRule {
    network: IpAddr,
    prefix: u8,
    port: Option<u16>,
}

impl AddressRule {
    /// Reads `address[/prefix][:port]` (an IPv6 range with a port in brackets:
    /// `[fd00::/8]:443`).
    pub fn parse(text: &str) -> Result<AddressRule, String> {
        let text = text.trim();
        let bad = |why: &str| {
            format!(
                "{text:?} is not an address range ({why}): write \"127.0.0.1\", \"10.0.0.0/8\", \"10.0.0.0/8:5432\", \"fd00::/8\" or \"[fd00::/8]:443\""
            )
        };
        let (range, port) = if let Some(rest) = text.strip_prefix('[') {
            let (range, after) = rest.split_once(']').ok_or_else(|| bad("no closing ]"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => Some(port.parse::<u16>().map_err(|_| bad("bad port"))?),
                None if after.is_empty() => None,
                None => return Err(bad("text after ]")),
            };
            (range, port)
        } else if text.matches(':').count() == 1 {
            let (range, port) = text.split_once(':').unwrap_or((text, ""));
            (
                range,
                Some(port.parse::<u16>().map_err(|_| bad("bad port"))?),
            )
        } else {
            (text, None)
        };
        let (address, prefix) = match range.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (range, None),
        };
        let network: IpAddr = address.parse().map_err(|_| bad("not an IP address"))?;
        let most = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= most)
                .ok_or_else(|| bad("bad prefix length"))?,
            None => most,
        };
        Ok(AddressRule {
            network,
            prefix,
            port,
        })
    }

    fn allows(&self, address: SocketAddr) -> bool {
        if self.port.is_some_and(|port| port != address.port()) {
            return false;
        }
        let bits = |ip: IpAddr| -> Option<u128> {
            match (ip, self.network) {
                (IpAddr::V4(ip), IpAddr::V4(_)) => Some(u128::from(u32::from(ip)) << 96),
                (IpAddr::V6(ip), IpAddr::V6(_)) => Some(u128::from(ip)),
                _ => None,
            }
        };
        let (Some(have), Some(want)) = (bits(address.ip()), bits(self.network)) else {
            return false;
        };
        // An IPv4 address sits in the top 32 bits: the prefix counts from the top either way.
        let mask = match self.prefix {
            0 => 0,
            prefix => u128::MAX << (128 - u32::from(prefix)),
        };
        have & mask == want & mask
    }
}

impl fmt::Display for AddressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let most = if self.network.is_ipv4() { 32 } else { 128 };
        let range = if self.prefix == most {
            self.network.to_string()
        } else {
            format!("{}/{}", self.network, self.prefix)
        };
        match (self.port, self.network) {
            (Some(port), IpAddr::V6(_)) => write!(f, "[{range}]:{port}"),
            (Some(port), IpAddr::V4(_)) => write!(f, "{range}:{port}"),
            (None, _) => f.write_str(&range),
        }
    }
}

/// Whether an address is one anybody on the internet could reach: not loopback, link-local,
/// private, shared (CGNAT), multicast, documentation, benchmarking or reserved.
pub fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let segments = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (segments[0] & 0xfe00) == 0xfc00 // unique local
                || (segments[0] & 0xffc0) == 0xfe80 // link-local
                || (segments[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
                || (segments[0] == 0x2001 && segments[1] == 0x0db8) // documentation
                || (segments[0] == 0x0064 && segments[1] == 0xff9b) // NAT64
                || (segments[0] == 0x2002) // 6to4 (embeds an IPv4 address)
                || segments[..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible
        }
    }
}

/// The addresses of this host's own interfaces (a name that resolves to one reaches the
/// host's services, whatever range it is in).
fn own_addresses() -> Vec<IpAddr> {
    nix::ifaddrs::getifaddrs()
        .map(|all| {
            all.filter_map(|ifaddr| {
                let address = ifaddr.address?;
                if let Some(v4) = address.as_sockaddr_in() {
                    Some(IpAddr::V4(v4.ip()))
                } else {
                    address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                }
            })
            .collect()
        })
        .unwrap_or_default()
}

fn is_public_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    !(v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && v4.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || v4.octets() == [168, 63, 129, 16] // Azure's host (WireServer)
        || a >= 240)
}

/// What the operator decides about network: the default policy, the names every `allow`
/// session may reach, what callers may add, whether `host` may be used, which private
/// addresses the proxy may reach, and names the proxy resolves itself.
#[derive(Clone, Debug, Default)]
pub struct NetworkSettings {
    /// The policy of a session whose caller names none.
    pub default_mode: NetworkMode,
    /// What every session of policy `allow` may reach.
    pub allow: Vec<AllowRule>,
    /// The rules within which a caller may add names to its session's allow-list (empty: none).
    pub caller_may_add: Vec<AllowRule>,
    /// Whether a session may have the host's network.
    pub host_allowed: bool,
    /// Loopback, link-local or private addresses the proxy may connect to all the same.
    pub private_allowed: Vec<AddressRule>,
    /// Names the proxy resolves to these addresses without asking DNS.
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// The names of the settings above, as the operator knows them, for messages.
    pub names: NetworkSettingNames,
}

/// What the operator calls each network setting (its daemon passes the names it reads).
#[derive(Clone, Debug)]
pub struct NetworkSettingNames {
    /// The setting that lists what every `allow` session may reach.
    pub allow: String,
    /// The setting that bounds what callers may add.
    pub caller_allow: String,
    /// The setting that enables `host`.
    pub host: String,
    /// The setting that lists the private addresses the proxy may reach.
    pub private: String,
}

impl Default for NetworkSettingNames {
    fn default() -> NetworkSettingNames {
        NetworkSettingNames {
            allow: "the allow-list setting".to_owned(),
            caller_allow: "the setting of what callers may add".to_owned(),
            host: "the host-network setting".to_owned(),
            private: "the private-addresses setting".to_owned(),
        }
    }
}

/// A session's network policy: its mode and, for `allow`, its allow-list.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct NetworkPolicy {
    /// The mode.
    pub mode: NetworkMode,
    /// What it may reach, under `allow` (empty otherwise).
    pub allow: Vec<AllowRule>,
}

impl NetworkPolicy {
    /// The policy with no network.
    pub fn none() -> NetworkPolicy {
        NetworkPolicy::default()
    }

    /// Describes it: `none`, `host`, or `allow pypi.org, .githubusercontent.com`.
    pub fn describe(&self) -> String {
        match self.mode {
            NetworkMode::Allow => format!(
                "allow {}",
                self.allow
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            mode => mode.to_string(),
        }
    }
}

impl NetworkSettings {
    /// The policy a caller gets that asks for `mode` (none: the default) and adds `extra` names
    /// to the allow-list, or why it may not have it.
    pub fn policy(&self, mode: Option<&str>, extra: &[String]) -> Result<NetworkPolicy, String> {
        let mode = match mode {
            Some(text) => NetworkMode::parse(text)?,
            None if !extra.is_empty() => NetworkMode::Allow,
            None => self.default_mode,
        };
        match mode {
            NetworkMode::None | NetworkMode::Host if !extra.is_empty() => Err(format!(
                "network_allow adds names to a session of network \"allow\"; this one is {mode:?}: drop network_allow, or ask for network \"allow\""
            )),
            NetworkMode::None => Ok(NetworkPolicy::none()),
            NetworkMode::Host if !self.host_allowed => Err(format!(
                "network \"host\" is off on this msbd: the operator enables it with {}; ask for \"allow\" (with network_allow) or \"none\"",
                self.names.host
            )),
            NetworkMode::Host => Ok(NetworkPolicy {
                mode,
                allow: Vec::new(),
            }),
            NetworkMode::Allow => {
                let mut allow = self.allow.clone();
                for text in extra {
                    let rule = AllowRule::parse(text).map_err(|e| format!("network_allow: {e}"))?;
                    if !self.caller_may_add.iter().any(|wider| rule.within(wider)) {
                        return Err(format!(
                            "network_allow: {rule} is not within what callers may add on this msbd ({}): the operator sets it with {}",
                            if self.caller_may_add.is_empty() {
                                "nothing".to_owned()
                            } else {
                                join(&self.caller_may_add)
                            },
                            self.names.caller_allow
                        ));
                    }
                    if !allow.contains(&rule) {
                        allow.push(rule);
                    }
                }
                if allow.is_empty() {
                    return Err(format!(
                        "network \"allow\" with nothing to allow: name what the session may reach with network_allow (within {}), or the operator lists names in {}",
                        self.names.caller_allow, self.names.allow
                    ));
                }
                Ok(NetworkPolicy { mode, allow })
            }
        }
    }
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why the proxy refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The name and port are not on the session's allow-list.
    NotAllowed,
    /// A raw address was asked for.
    Address,
    /// Every address of the name is loopback, link-local or private (and not allowed).
    PrivateAddress,
    /// The name did not resolve.
    Unresolved,
    /// Not a request the proxy understands.
    BadRequest,
}

impl Refusal {
    /// Every reason, in the order of [`NetworkStats::refused`].
    pub const ALL: [Refusal; 5] = [
        Refusal::NotAllowed,
        Refusal::Address,
        Refusal::PrivateAddress,
        Refusal::Unresolved,
        Refusal::BadRequest,
    ];

    /// Its name (a metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::Address => "address",
            Refusal::PrivateAddress => "private_address",
            Refusal::Unresolved => "unresolved",
            Refusal::BadRequest => "bad_request",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// The proxy's counts since msbd started.
#[derive(Debug, Default)]
pub struct NetworkStats {
    allowed: AtomicU64,
    refused: [AtomicU64; 5],
    failed: AtomicU64,
}

impl NetworkStats {
    /// Connections made for a sandbox.
    pub fn allowed(&self) -> u64 {
        self.allowed.load(Ordering::Relaxed)
    }

    /// Connections refused, by reason.
    pub fn refused(&self) -> Vec<(Refusal, u64)> {
        Refusal::ALL
            .iter()
            .map(|r| (*r, self.refused[r.index()].load(Ordering::Relaxed)))
            .collect()
    }

    /// Allowed connections that could not be made (the server did not answer, say).
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// What every session's proxy shares: the operator's settings, the counts, and the bound on
/// connections held at once.
#[derive(Debug)]
pub struct Network {
    /// The operator's settings.
    pub settings: NetworkSettings,
    /// The counts.
    pub stats: NetworkStats,
    connections: Arc<tokio::sync::Semaphore>,
}

impl Network {
    /// Network with these settings.
    pub fn new(settings: NetworkSettings) -> Arc<Network> {
        Arc::new(Network {
            settings,
            stats: NetworkStats::default(),
            connections: Arc::new(tokio::sync::Semaphore::new(ALL_CONNECTIONS)),
        })
    }

    /// The environment a sandbox of policy `allow` gets, so that its programs use the proxy.
    pub fn proxy_env() -> Vec<(String, String)> {
        let url = format!("http://127.0.0.1:{PROXY_PORT}");
        let mut env = Vec::new();
        for key in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
            env.push((key.to_owned(), url.clone()));
            env.push((key.to_ascii_lowercase(), url.clone()));
        }
        for key in ["NO_PROXY", "no_proxy"] {
            env.push((key.to_owned(), "localhost,127.0.0.1,::1".to_owned()));
        }
        env
    }

    /// Serves the proxy of one session on `listener` (in the session's network namespace)
    /// until the task is aborted.
    pub async fn serve(
        self: Arc<Network>,
        listener: TcpListener,
        session: String,
        allow: Vec<AllowRule>,
    ) {
        let allow = Arc::new(allow);
        let session: Arc<str> = session.into();
        let mine = Arc::new(tokio::sync::Semaphore::new(SESSION_CONNECTIONS));
        let log = Arc::new(RefusalLog::default());
        // Every connection lives in this set: when the session ends (this task is aborted),
        // they all end with it.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            while connections.try_join_next().is_some() {}
            // A session at its limit waits before accepting more; so does one when all
            // proxies together are.
            let Ok(own) = Arc::clone(&mine).acquire_owned().await else {
                return;
            };
            let Ok(shared) = Arc::clone(&self.connections).acquire_owned().await else {
                return;
            };
            let Ok((client, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let _ = client.set_nodelay(true);
            let network = Arc::clone(&self);
            let allow = Arc::clone(&allow);
            let session = Arc::clone(&session);
            let log = Arc::clone(&log);
            connections.spawn(async move {
                network.handle(client, &session, &allow, &log).await;
                drop((own, shared));
            });
        }
    }

    async fn handle(
        &self,
        mut client: TcpStream,
        session: &str,
        allow: &[AllowRule],
        log: &RefusalLog,
    ) {
        // SOCKS5 starts with its version, 5; an HTTP request with a method's first letter.
        let mut first = [0u8; 1];
        match tokio::time::timeout(HEAD_TIMEOUT, client.peek(&mut first)).await {
            Ok(Ok(1)) if first[0] == SOCKS_VERSION => {
                self.socks(client, session, allow, log).await;
                return;
            }
            Ok(Ok(1..)) => {}
            _ => return,
        }
        let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
            Ok(Ok(Some(head))) => head,
            // Closed, too slow, or too long: nothing to answer.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return,
        };
        let request = match Request::parse(&head.bytes[..head.end]) {
            Ok(request) => request,
            Err(why) => {
                self.refuse(&mut client, session, log, "?", 0, Refusal::BadRequest, &why)
                    .await;
                return;
            }
        };
        let upstream = match self
            .connect(session, allow, &request.host, request.port)
            .await
        {
            Ok(upstream) => upstream,
            Err((refusal, why)) => {
                self.refuse(
                    &mut client,
                    session,
                    log,
                    &request.host,
                    request.port,
                    refusal,
                    &why,
                )
                .await;
                return;
            }
        };
        let Some(mut upstream) = upstream else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let _ = client
                .write_all(
                    format!(
                        "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nmsbd's proxy could not connect to {}:{}\n",
                        request.host, request.port
                    )
                    .as_bytes(),
                )
                .await;
            return;
        };
        self.stats.allowed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(session, host = %request.host, port = request.port, "proxy connection");
        let rest = &head.bytes[head.end..];
        let started = if request.connect {
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .and(upstream.write_all(rest).await)
        } else {
            let mut forward = request.origin_head();
            forward.extend_from_slice(rest);
            upstream.write_all(&forward).await
        };
        if started.is_ok() {
            copy_until_idle(client, upstream).await;
        }
    }

    /// Checks `host:port` against the allow-list and the address rules and connects:
    /// `Ok(None)` when allowed but no address answered.
    async fn connect(
        &self,
        session: &str,
        allow: &[AllowRule],
        host: &str,
        port: u16,
    ) -> Result<Option<TcpStream>, (Refusal, String)> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() {
            return Err((
                Refusal::Address,
                format!(
                    "{host} is an address; this sandbox may reach names on its allow-list only"
                ),
            ));
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        if !valid_name(&name) {
            return Err((
                Refusal::BadRequest,
                format!(
                    "{} is not a host name (letters, digits, '-', '_' and '.')",
                    host.escape_debug()
                ),
            ));
        }
        // `134744072`, `8.8.8.8.`, `0x8.0x8.0x8.0x8`: the resolver reads these as addresses.
        let last = name.rsplit('.').next().unwrap_or_default();
        if last.bytes().all(|b| b.is_ascii_digit()) || last.starts_with("0x") {
            return Err((
                Refusal::Address,
                format!(
                    "{name} is an address; this sandbox may reach names on its allow-list only"
                ),
            ));
        }
        if !allow.iter().any(|rule| rule.allows(&name, port)) {
            return Err((
                Refusal::NotAllowed,
                format!(
                    "{name}:{port} is not on this session's allow-list ({})",
                    join(allow)
                ),
            ));
        }
        let addresses: Vec<SocketAddr> = match self.settings.hosts.get(&name) {
            Some(ips) => ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
            None => match tokio::time::timeout(
                CONNECT_TIMEOUT,
                // Fully qualified: the host's search domains do not apply.
                tokio::net::lookup_host((format!("{name}."), port)),
            )
            .await
            {
                Ok(Ok(found)) => found.collect(),
                Ok(Err(error)) => {
                    return Err((
                        Refusal::Unresolved,
                        format!("{name} does not resolve: {error}"),
                    ));
                }
                Err(_) => {
                    return Err((
                        Refusal::Unresolved,
                        format!("looking up {name} took too long"),
                    ));
                }
            },
        };
        let own = own_addresses();
        let usable: Vec<SocketAddr> = addresses
            .iter()
            .copied()
            .filter(|a| {
                (is_public(a.ip()) && !own.contains(&a.ip().to_canonical()))
                    || self.settings.private_allowed.iter().any(|r| r.allows(*a))
            })
            .take(MAX_ADDRESSES)
            .collect();
        if usable.is_empty() {
            return Err((
                if addresses.is_empty() {
                    Refusal::Unresolved
                } else {
                    Refusal::PrivateAddress
                },
                format!(
                    "{name} resolves to {} only, which sandboxes may not reach (loopback, link-local, private, or this host's own; the operator allows such addresses with {})",
                    join(&addresses),
                    self.settings.names.private
                ),
            ));
        }
        // One deadline for all of them.
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        for address in usable {
            if let Ok(Ok(stream)) =
                tokio::time::timeout_at(deadline, TcpStream::connect(address)).await
            {
                let _ = stream.set_nodelay(true);
                return Ok(Some(stream));
            }
        }
        tracing::debug!(session, host = %name, port, "no address of an allowed name answered");
        Ok(None)
    }

    #[allow(clippy::too_many_arguments, reason = "one refusal's facts, said once")]
    async fn refuse(
        &self,
        client: &mut TcpStream,
        session: &str,
        log: &RefusalLog,
        host: &str,
        port: u16,
        refusal: Refusal,
        why: &str,
    ) {
        self.record_refusal(session, log, host, port, refusal, why);
        let status = if refusal == Refusal::BadRequest {
            "400 Bad Request"
        } else {
            "403 Forbidden"
        };
        let body = format!("msbd refused this connection: {why}\n");
        let _ = client
            .write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let _ = client.shutdown().await;
    }

    /// Counts a refusal and logs it (at most once a second per session).
    fn record_refusal(
        &self,
        session: &str,
        log: &RefusalLog,
        host: &str,
        port: u16,
        refusal: Refusal,
        why: &str,
    ) {
        self.stats.refused[refusal.index()].fetch_add(1, Ordering::Relaxed);
        if let Some(unlogged) = log.may_log() {
            // Control characters escaped: a sandbox cannot write lines into msbd's log.
            tracing::warn!(
                session,
                host = printable(host),
                port,
                reason = refusal.as_str(),
                unlogged,
                "network: refused a connection from a sandbox: {}",
                printable(why)
            );
        }
    }

    /// A SOCKS5 client (RFC 1928): no authentication, `CONNECT` to a domain name only, checked
    /// as an HTTP `CONNECT` is.
    async fn socks(
        &self,
        mut client: TcpStream,
        session: &str,
        allow: &[AllowRule],
        log: &RefusalLog,
    ) {
        let request =
            match tokio::time::timeout(HEAD_TIMEOUT, read_socks_request(&mut client)).await {
                Ok(Ok(request)) => request,
                Ok(Err(SocksProblem::Closed)) | Err(_) => return,
                Ok(Err(SocksProblem::Refuse(reply, refusal, why))) => {
                    self.record_refusal(session, log, "?", 0, refusal, &why);
                    let _ = client.write_all(&socks_reply(reply)).await;
                    return;
                }
            };
        let (host, port) = match request {
            SocksTarget::Name(host, port) => (host, port),
            SocksTarget::Address(address) => {
                let why = format!(
                    "{address} is an address; this sandbox may reach names on its allow-list only (use socks5h, which sends the name)"
                );
                self.record_refusal(
                    session,
                    log,
                    &address.ip().to_string(),
                    address.port(),
                    Refusal::Address,
                    &why,
                );
                let _ = client.write_all(&socks_reply(SOCKS_NOT_ALLOWED)).await;
                return;
            }
        };
        let upstream = match self.connect(session, allow, &host, port).await {
            Ok(Some(upstream)) => upstream,
            Ok(None) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let _ = client.write_all(&socks_reply(SOCKS_REFUSED)).await;
                return;
            }
            Err((refusal, why)) => {
                self.record_refusal(session, log, &host, port, refusal, &why);
                let reply = if refusal == Refusal::Unresolved {
                    SOCKS_UNREACHABLE
                } else {
                    SOCKS_NOT_ALLOWED
                };
                let _ = client.write_all(&socks_reply(reply)).await;
                return;
            }
        };
        self.stats.allowed.fetch_add(1, Ordering::Relaxed);
        if client.write_all(&socks_reply(0)).await.is_ok() {
            copy_until_idle(client, upstream).await;
        }
    }
}

const SOCKS_VERSION: u8 = 5;
/// SOCKS5 replies: connection not allowed by ruleset, host unreachable, connection refused,
/// command not supported, address type not supported.
const SOCKS_NOT_ALLOWED: u8 = 2;
const SOCKS_UNREACHABLE: u8 = 4;
const SOCKS_REFUSED: u8 = 5;
const SOCKS_BAD_COMMAND: u8 = 7;
const SOCKS_BAD_ADDRESS: u8 = 8;

/// Where a SOCKS5 client asks to go.
enum SocksTarget {
    Name(String, u16),
    Address(SocketAddr),
}

/// Why a SOCKS5 exchange ends before a connection.
enum SocksProblem {
    /// The client closed or broke off.
    Closed,
    /// Answer with this reply; count and log the refusal.
    Refuse(u8, Refusal, String),
}

impl From<std::io::Error> for SocksProblem {
    fn from(_: std::io::Error) -> SocksProblem {
        SocksProblem::Closed
    }
}

/// A SOCKS5 reply with an empty IPv4 bound address.
fn socks_reply(code: u8) -> [u8; 10] {
    [SOCKS_VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Reads a SOCKS5 greeting (choosing no authentication) and a `CONNECT` request.
async fn read_socks_request(client: &mut TcpStream) -> Result<SocksTarget, SocksProblem> {
    let mut greeting = [0u8; 2];
    client.read_exact(&mut greeting).await?;
    let mut methods = vec![0u8; usize::from(greeting[1])];
    client.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        client.write_all(&[SOCKS_VERSION, 0xff]).await?;
        return Err(SocksProblem::Closed);
    }
    client.write_all(&[SOCKS_VERSION, 0]).await?;
    let mut head = [0u8; 4];
    client.read_exact(&mut head).await?;
    if head[0] != SOCKS_VERSION || head[1] != 1 {
        return Err(SocksProblem::Refuse(
            SOCKS_BAD_COMMAND,
            Refusal::BadRequest,
            format!(
                "SOCKS command {} is not CONNECT (the only one msbd's proxy takes)",
                head[1]
            ),
        ));
    }
    let target = match head[3] {
        1 => {
            let mut ip = [0u8; 4];
            client.read_exact(&mut ip).await?;
            SocksTarget::Address(SocketAddr::new(IpAddr::from(ip), 0))
        }
        4 => {
            let mut ip = [0u8; 16];
            client.read_exact(&mut ip).await?;
            SocksTarget::Address(SocketAddr::new(IpAddr::from(ip), 0))
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len).await?;
            let mut name = vec![0u8; usize::from(len[0])];
            client.read_exact(&mut name).await?;
            let name = String::from_utf8(name).map_err(|_| {
                SocksProblem::Refuse(
                    SOCKS_BAD_ADDRESS,
                    Refusal::BadRequest,
                    "the SOCKS name is not text".to_owned(),
                )
            })?;
            SocksTarget::Name(name, 0)
        }
        other => {
            return Err(SocksProblem::Refuse(
                SOCKS_BAD_ADDRESS,
                Refusal::BadRequest,
                format!("SOCKS address type {other} is not known"),
            ));
        }
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port).await?;
    let port = u16::from_be_bytes(port);
    Ok(match target {
        SocksTarget::Name(name, _) => SocksTarget::Name(name, port),
        SocksTarget::Address(address) => SocksTarget::Address(SocketAddr::new(address.ip(), port)),
    })
}

/// `text` with its control characters (line breaks among them) escaped.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// How many refusals a session's proxy logged in the current second, and how many it has not
/// logged since it last did.
#[derive(Default)]
struct RefusalLog {
    window: std::sync::Mutex<Option<(std::time::Instant, u32)>>,
    unlogged: AtomicU64,
}

impl RefusalLog {
    /// `Some(refusals not logged before this one)` when this one may be logged.
    fn may_log(&self) -> Option<u64> {
        let mut window = self
            .window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now();
        let logged = match *window {
            Some((since, logged)) if now.duration_since(since) < Duration::from_secs(1) => logged,
            _ => {
                *window = Some((now, 0));
                0
            }
        };
        if logged >= REFUSALS_LOGGED_PER_SECOND {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if let Some((_, count)) = window.as_mut() {
            *count += 1;
        }
        Some(self.unlogged.swap(0, Ordering::Relaxed))
    }
}

/// Copies both ways until either side closes or nothing moves for [`IDLE_TIMEOUT`].
async fn copy_until_idle(client: TcpStream, upstream: TcpStream) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let moved = AtomicU64::new(0);
    let up = one_way(&mut client_read, &mut upstream_write, &moved);
    let down = one_way(&mut upstream_read, &mut client_write, &moved);
    let watch = async {
        let mut seen = 0;
        loop {
            tokio::time::sleep(IDLE_TIMEOUT).await;
            let now = moved.load(Ordering::Relaxed);
            if now == seen {
                return;
            }
            seen = now;
        }
    };
    tokio::select! {
        ((), ()) = async { tokio::join!(up, down) } => {}
        () = watch => {}
    }
}

/// Copies one way until end of file or an error, counting the pieces moved; then closes the
/// writing side.
async fn one_way(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    moved: &AtomicU64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                moved.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let _ = to.shutdown().await;
}

/// A request head read from a client, and what came after it.
struct Head {
    bytes: Vec<u8>,
    /// Where the head ends (after its blank line).
    end: usize,
}

/// Reads until the end of the request head: `None` when the client closed first or sent more
/// than [`MAX_HEAD`] bytes without ending it.
async fn read_head(client: &mut TcpStream) -> std::io::Result<Option<Head>> {
    let mut bytes = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let read = client.read(&mut chunk).await?;
        if read == 0 {
            return Ok(None);
        }
        let from = bytes.len().saturating_sub(3);
        bytes.extend_from_slice(&chunk[..read]);
        if let Some(at) = bytes[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            let end = from + at + 4;
            return Ok(Some(Head { bytes, end }));
        }
        if bytes.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

/// A proxy request: `CONNECT host:port` or a plain HTTP request in absolute form.
#[derive(Debug, PartialEq)]
struct Request {
    connect: bool,
    host: String,
    port: u16,
    method: String,
    /// The path and query (plain HTTP).
    path: String,
    version: String,
    /// The header lines after the request line (plain HTTP).
    headers: Vec<String>,
}

impl Request {
    fn parse(head: &[u8]) -> Result<Request, String> {
        let text =
            std::str::from_utf8(head).map_err(|_| "the request head is not text".to_owned())?;
        let mut lines = text.split("\r\n");
        let first = lines.next().unwrap_or_default();
        let mut parts = first.split(' ');
        let (Some(method), Some(target), Some(version), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("{first:?} is not an HTTP request line"));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(format!("{version:?} is not HTTP/1.x"));
        }
        let headers: Vec<String> = lines
            .take_while(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        if method == "CONNECT" {
            let (host, port) = split_authority(target, None)?;
            return Ok(Request {
                connect: true,
                host,
                port,
                method: method.to_owned(),
                path: String::new(),
                version: version.to_owned(),
                headers,
            });
        }
        let Some(rest) = target.strip_prefix("http://") else {
            return Err(format!(
                "{target:?} is not a proxy request: ask for http://name/… or CONNECT name:port (https goes through CONNECT)"
            ));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) => (&rest[..at], &rest[at..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_owned()
        };
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let (host, port) = split_authority(authority, Some(80))?;
        Ok(Request {
            connect: false,
            host,
            port,
            method: method.to_owned(),
            path,
            version: version.to_owned(),
            headers,
        })
    }

    /// The head to send the server of a plain HTTP request: origin form, the proxy's own
    /// headers dropped, one request per connection.
    fn origin_head(&self) -> Vec<u8> {
        let mut head = format!("{} {} {}\r\n", self.method, self.path, self.version);
        for line in &self.headers {
            let name = line.split(':').next().unwrap_or_default().trim();
            if name.eq_ignore_ascii_case("proxy-connection")
                || name.eq_ignore_ascii_case("proxy-authorization")
                || name.eq_ignore_ascii_case("connection")
                || name.eq_ignore_ascii_case("keep-alive")
                || name.eq_ignore_ascii_case("host")
            {
                continue;
            }
            head.push_str(line);
            head.push_str("\r\n");
        }
        // The server sees the name that was checked, not one the client chose.
        if self.port == 80 {
            head.push_str(&format!("Host: {}\r\n", self.host));
        } else {
            head.push_str(&format!("Host: {}:{}\r\n", self.host, self.port));
        }
        head.push_str("Connection: close\r\n\r\n");
        head.into_bytes()
    }
}

/// `name:port`, `[v6]:port`, or (with a default port) `name`.
fn split_authority(authority: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let bad = || format!("{authority:?} is not name:port");
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(bad()),
        };
        (format!("[{host}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), Some(port)),
            None => (authority.to_owned(), None),
        }
    };
    let port = match port {
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(bad)?,
        None => default_port.ok_or_else(bad)?,
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(texts: &[&str]) -> Vec<AllowRule> {
        texts.iter().map(|t| AllowRule::parse(t).unwrap()).collect()
    }

    #[test]
    fn rules_match_names_suffixes_and_ports() {
        let allow = rules(&[
            "pypi.org",
            ".githubusercontent.com",
            "example.com:8080",
            "any.test:*",
        ]);
        let ok = |name: &str, port| allow.iter().any(|r| r.allows(name, port));
        assert!(ok("pypi.org", 443) && ok("pypi.org", 80));
        assert!(!ok("pypi.org", 22), "no port: 80 and 443 only");
        assert!(!ok("files.pypi.org", 443), "a name is that name only");
        assert!(ok("raw.githubusercontent.com", 443));
        assert!(
            !ok("githubusercontent.com", 443),
            "a suffix is names under it"
        );
        assert!(
            !ok("evilgithubusercontent.com", 443),
            "a suffix starts at a dot"
        );
        assert!(ok("example.com", 8080) && !ok("example.com", 443));
        assert!(ok("any.test", 5));
        assert_eq!(
            AllowRule::parse("*.Example.COM").unwrap().to_string(),
            ".example.com"
        );
        for bad in [
            "",
            "a b",
            "10.0.0.1",
            "x.com:0",
            "x.com:70000",
            "x..com",
            "::1",
        ] {
            assert!(AllowRule::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn callers_add_only_within_what_the_operator_lets_them() {
        let settings = NetworkSettings {
            allow: rules(&["pypi.org"]),
            caller_may_add: rules(&[".example.com", "api.test:8443"]),
            ..NetworkSettings::default()
        };
        let policy = settings
            .policy(
                Some("allow"),
                &["docs.example.com".into(), ".a.example.com:443".into()],
            )
            .unwrap();
        assert_eq!(
            policy.describe(),
            "allow pypi.org, docs.example.com, .a.example.com:443"
        );
        for refused in ["example.com", "evil.test", "api.test", "docs.example.com:*"] {
            let error = settings
                .policy(Some("allow"), &[refused.into()])
                .unwrap_err();
            assert!(error.contains("what callers may add"), "{refused}: {error}");
        }
        assert!(
            settings
                .policy(Some("allow"), &["api.test:8443".into()])
                .is_ok()
        );
        // The default is none; names alone ask for allow.
        assert_eq!(settings.policy(None, &[]).unwrap(), NetworkPolicy::none());
        assert_eq!(
            settings
                .policy(None, &["x.example.com".into()])
                .unwrap()
                .mode,
            NetworkMode::Allow
        );
        let error = settings.policy(Some("host"), &[]).unwrap_err();
        assert!(error.contains("the host-network setting"), "{error}");
        assert!(
            settings
                .policy(Some("none"), &["x.example.com".into()])
                .is_err()
        );
        assert!(
            settings
                .policy(Some("wide"), &[])
                .unwrap_err()
                .contains("\"allow\"")
        );
        let empty = NetworkSettings::default();
        assert!(
            empty
                .policy(Some("allow"), &[])
                .unwrap_err()
                .contains("nothing to allow")
        );
    }

    #[test]
    fn only_public_addresses_unless_allowed() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "151.101.0.223", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        let rule = AddressRule::parse("127.0.0.0/8:5432").unwrap();
        assert!(rule.allows("127.0.0.2:5432".parse().unwrap()));
        assert!(!rule.allows("127.0.0.2:5433".parse().unwrap()));
        assert!(!rule.allows("[::1]:5432".parse().unwrap()));
        let one = AddressRule::parse("10.0.0.1").unwrap();
        assert!(
            one.allows("10.0.0.1:80".parse().unwrap())
                && !one.allows("10.0.0.2:80".parse().unwrap())
        );
        let v6 = AddressRule::parse("[fd00::/8]:443").unwrap();
        assert!(
            v6.allows("[fd12::1]:443".parse().unwrap())
                && !v6.allows("[fe80::1]:443".parse().unwrap())
        );
        let all = AddressRule::parse("0.0.0.0/0").unwrap();
        assert!(all.allows("10.9.8.7:1".parse().unwrap()));
        assert_eq!(v6.to_string(), "[fd00::/8]:443");
        for bad in ["", "10.0.0.0/33", "x", "[::1", "10.0.0.1:x"] {
            assert!(AddressRule::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn every_refusal_is_logged_until_a_flood() {
        let log = RefusalLog::default();
        let logged: Vec<Option<u64>> = (0..25).map(|_| log.may_log()).collect();
        assert!(logged[..20].iter().all(|l| *l == Some(0)), "{logged:?}");
        assert!(logged[20..].iter().all(Option::is_none), "{logged:?}");
        // The next second, the next one logged says how many were not.
        *log.window.lock().unwrap() =
            Some((std::time::Instant::now() - Duration::from_secs(2), 20));
        assert_eq!(log.may_log(), Some(5));
    }

    #[test]
    fn what_a_sandbox_sends_cannot_break_a_log_line() {
        assert_eq!(printable("a\nb\r\tc it's"), "a\\nb\\r\\tc it's");
    }

    #[test]
    fn requests_are_read_in_both_forms() {
        let connect =
            Request::parse(b"CONNECT pypi.org:443 HTTP/1.1\r\nHost: pypi.org:443\r\n\r\n").unwrap();
        assert!(connect.connect);
        assert_eq!((connect.host.as_str(), connect.port), ("pypi.org", 443));
        let plain = Request::parse(
            b"GET http://user@example.com:8080/a?b HTTP/1.1\r\nHost: example.com\r\nProxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            (plain.host.as_str(), plain.port, plain.path.as_str()),
            ("example.com", 8080, "/a?b")
        );
        let head = String::from_utf8(plain.origin_head()).unwrap();
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\nAccept: */*\r\nHost: example.com:8080\r\nConnection: close\r\n\r\n"
        );
        let v6 = Request::parse(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(v6.host, "[::1]");
        for bad in [
            &b"GET /local HTTP/1.1\r\n\r\n"[..],
            b"CONNECT pypi.org HTTP/1.1\r\n\r\n",
            b"GET https://x.com/ HTTP/1.1\r\n\r\n",
            b"nonsense\r\n\r\n",
            b"GET http://x.com/ SPDY/3\r\n\r\n",
        ] {
            assert!(
                Request::parse(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
