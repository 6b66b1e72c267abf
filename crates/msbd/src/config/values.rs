//! The types of the raw values: each parses the text of a variable, with a reason that says
//! what is expected when it cannot.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::str::FromStr;

use sandbox_wrapper::backend::VolumeMapping;
use sandbox_wrapper::network::{AddressRule, AllowRule};
use serde::{Deserialize, Deserializer};

use super::render::quoted;
use super::{Database, Secret, log_filter_builder};

/// The type of a variable's value, as read from its text.
pub(super) trait Value: Sized {
    /// What values it takes, in words, for the reference.
    fn kind() -> String;
    /// Parses a variable's text (never empty: an empty variable counts as unset).
    fn parse(text: &str) -> Result<Self, String>;
    /// The value as a variable would be written.
    fn describe(&self) -> String;
}

/// Implements `Deserialize` (what envy calls) through [`Value::parse`].
macro_rules! deserialize_with_parse {
    ($($ty:ty),+ $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                <$ty as Value>::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    )+};
}

deserialize_with_parse!(
    ServerUrl,
    Secret,
    Seconds,
    Count,
    Switch,
    PathValue,
    Volumes,
    DatabaseUrl,
    SqlName,
    NodeName,
    Addr,
    LogFilter,
    HostList,
    OriginList,
    NetRules,
    AddrRules,
    NameMap,
);

impl<'de, T: Named> Deserialize<'de> for Choice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Choice::<T>::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A whole number of seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Seconds(pub(super) u64);

/// A whole number (a count, or bytes, or MB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Count(pub(super) u64);

/// A boolean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Switch(pub(super) bool);

/// One of a closed set of names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Choice<T>(pub(super) T);

/// A path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PathValue(pub(super) PathBuf);

/// The microsandbox server's URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServerUrl(pub(super) String);

/// Volume mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Volumes(pub(super) Vec<VolumeMapping>);

/// A database URL or path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct DatabaseUrl(pub(super) Database);

/// An SQL name (a schema).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SqlName(pub(super) String);

/// A node's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NodeName(pub(super) String);

/// The host name (the default node name): the kernel's, made a valid [`NodeName`]; `msbd`
/// when there is none.
pub(super) fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() {
        "msbd".to_owned()
    } else {
        name
    }
}

/// An IP address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Addr(pub(super) SocketAddr);

/// The address to listen on among those a host name resolves to: the first IPv4 loopback
/// address, else the first loopback address, else the first address (so `localhost` gives
/// 127.0.0.1, or ::1 on a host without IPv4 loopback).
pub(super) fn pick_listen_addr(addrs: impl IntoIterator<Item = SocketAddr>) -> Option<SocketAddr> {
    let addrs: Vec<SocketAddr> = addrs.into_iter().collect();
    let loopback = |a: &&SocketAddr| a.ip().to_canonical().is_loopback();
    addrs
        .iter()
        .find(|a| a.is_ipv4() && loopback(a))
        .or_else(|| addrs.iter().find(loopback))
        .or_else(|| addrs.first())
        .copied()
}

/// A tracing filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LogFilter(pub(super) String);

/// `Host` header values (`name` or `name:port`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct HostList(pub(super) Vec<String>);

/// Browser origins (`scheme://host[:port]`) or `null`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct OriginList(pub(super) Vec<String>);

/// Network allow-list rules (`pypi.org`, `.githubusercontent.com`, `example.com:8080`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NetRules(pub(super) Vec<AllowRule>);

/// Address ranges (`127.0.0.1`, `10.0.0.0/8:5432`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct AddrRules(pub(super) Vec<AddressRule>);

/// Names and the addresses the proxy gives them (`name=address`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct NameMap(pub(super) Vec<(String, IpAddr)>);

/// Splits a comma-separated list and parses each entry, gathering every problem.
fn list_of<T>(
    text: &str,
    parse: impl Fn(&str) -> Result<T, String>,
    how: &str,
) -> Result<Vec<T>, String> {
    let mut items = Vec::new();
    let mut problems = Vec::new();
    for entry in text.split(',').map(str::trim) {
        if entry.is_empty() {
            problems.push("an entry is empty (two commas?)".to_owned());
            continue;
        }
        match parse(entry) {
            Ok(item) => items.push(item),
            Err(problem) => problems.push(problem),
        }
    }
    if problems.is_empty() {
        Ok(items)
    } else {
        Err(format!("{}; {how}", problems.join("; ")))
    }
}

impl Value for NetRules {
    fn kind() -> String {
        "comma-separated names (`pypi.org`), suffixes (`.githubusercontent.com`), each with an optional `:PORT` or `:*`".to_owned()
    }

    fn parse(text: &str) -> Result<NetRules, String> {
        list_of(
            text,
            AllowRule::parse,
            "separate rules with commas, such as pypi.org,.pythonhosted.org,.githubusercontent.com",
        )
        .map(NetRules)
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Value for AddrRules {
    fn kind() -> String {
        "comma-separated addresses or ranges (`10.0.0.0/8`), each with an optional `:PORT`"
            .to_owned()
    }

    fn parse(text: &str) -> Result<AddrRules, String> {
        list_of(
            text,
            AddressRule::parse,
            "separate ranges with commas, such as 10.1.0.0/16,127.0.0.1:8080",
        )
        .map(AddrRules)
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Value for NameMap {
    fn kind() -> String {
        "comma-separated `NAME=ADDRESS`".to_owned()
    }

    fn parse(text: &str) -> Result<NameMap, String> {
        list_of(
            text,
            |entry| {
                let (name, address) = entry
                    .split_once('=')
                    .ok_or_else(|| format!("{} has no =", quoted(entry)))?;
                let rule = AllowRule::parse(name)?;
                if name.contains(':') || rule.to_string() != name.trim().to_ascii_lowercase() {
                    return Err(format!("{} is not a plain name", quoted(name)));
                }
                let address: IpAddr = address
                    .trim()
                    .parse()
                    .map_err(|_| format!("{} is not an IP address", quoted(address)))?;
                Ok((name.trim().to_ascii_lowercase(), address))
            },
            "write each as name=address, such as mirror.internal=10.1.2.3",
        )
        .map(NameMap)
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|(name, address)| format!("{name}={address}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The digits of a whole number, or why the text is not one.
fn whole_number(text: &str, what: &str, example: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits = text.strip_prefix('+').unwrap_or(text);
    if let Some(rest) = digits.strip_prefix('-')
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    {
        return Err(format!(
            "must not be negative; use {what} such as {example}"
        ));
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "is not {what}; write digits only, without a unit, such as {example}"
        ));
    }
    digits
        .parse::<u64>()
        .map_err(|_| format!("is too large; use {what} such as {example}"))
}

impl Value for Seconds {
    fn kind() -> String {
        "whole seconds".to_owned()
    }

    fn parse(text: &str) -> Result<Seconds, String> {
        let trimmed = text.trim();
        // The microsandbox wrapper took some durations as floats ("180.0"): a fraction of
        // zeros is accepted, any other fraction is not.
        if let Some((whole, fraction)) = trimmed.split_once('.')
            && !whole.is_empty()
            && whole.bytes().all(|b| b.is_ascii_digit())
            && fraction.bytes().all(|b| b.is_ascii_digit())
        {
            if !fraction.is_empty() && fraction.bytes().all(|b| b == b'0') {
                return whole_number(whole, "a whole number of seconds", "180").map(Seconds);
            }
            return Err(format!(
                "durations are whole seconds; round it, to {} for example",
                whole
                    .parse::<u64>()
                    .map_or_else(|_| whole.to_owned(), |w| (w.saturating_add(1)).to_string())
            ));
        }
        whole_number(trimmed, "a whole number of seconds", "180").map(Seconds)
    }

    fn describe(&self) -> String {
        self.0.to_string()
    }
}

impl Value for Count {
    fn kind() -> String {
        "whole number".to_owned()
    }

    fn parse(text: &str) -> Result<Count, String> {
        whole_number(text, "a whole number", "10").map(Count)
    }

    fn describe(&self) -> String {
        self.0.to_string()
    }
}

impl Value for Switch {
    fn kind() -> String {
        "boolean (`true` or `false`)".to_owned()
    }

    fn parse(text: &str) -> Result<Switch, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" | "enabled" => Ok(Switch(true)),
            "false" | "0" | "no" | "off" | "disabled" => Ok(Switch(false)),
            _ => Err(
                "is not a boolean; use true or false (1/0, yes/no, on/off and \
                      enabled/disabled are accepted too)"
                    .to_owned(),
            ),
        }
    }

    fn describe(&self) -> String {
        self.0.to_string()
    }
}

impl<T: Named> Value for Choice<T> {
    fn kind() -> String {
        let names: Vec<String> = T::VARIANTS.iter().map(|name| format!("`{name}`")).collect();
        format!("one of {}", names.join(", "))
    }

    fn parse(text: &str) -> Result<Choice<T>, String> {
        text.trim().parse().map(Choice).map_err(|_| {
            format!(
                "is not one of the choices; use one of: {}",
                T::VARIANTS.join(", ")
            )
        })
    }

    fn describe(&self) -> String {
        let name: &'static str = self.0.into();
        name.to_owned()
    }
}

/// The enums a variable chooses from (their names come from strum's derives, in lower case
/// and read without regard to case).
pub(super) trait Named:
    Copy + FromStr + Into<&'static str> + strum::VariantNames + 'static
{
}

impl<T: Copy + FromStr + Into<&'static str> + strum::VariantNames + 'static> Named for T {}

impl Value for PathValue {
    fn kind() -> String {
        "path".to_owned()
    }

    fn parse(text: &str) -> Result<PathValue, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty; give a path".to_owned());
        }
        Ok(PathValue(PathBuf::from(text)))
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

impl Value for ServerUrl {
    fn kind() -> String {
        "URL (`http://HOST:PORT`)".to_owned()
    }

    fn parse(text: &str) -> Result<ServerUrl, String> {
        const EXAMPLE: &str = "use one such as http://127.0.0.1:5555";
        let text = text.trim();
        let lower = text.to_ascii_lowercase();
        if !lower.starts_with("http://") && !lower.starts_with("https://") {
            return Err(format!("is not an http:// URL; {EXAMPLE}"));
        }
        // Kept by hand: url::Url would take spaces in the path, percent-encoded.
        if text.contains(char::is_whitespace) {
            return Err(format!("has no host or holds spaces; {EXAMPLE}"));
        }
        // The backend's HTTP client (reqwest) reads the URL with url::Url too.
        let url = url::Url::parse(text).map_err(|error| match error {
            url::ParseError::EmptyHost => format!("has no host or holds spaces; {EXAMPLE}"),
            error => format!("is not a URL ({error}); {EXAMPLE}"),
        })?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err("must not have a query or fragment; use http://HOST[:PORT]".to_owned());
        }
        // As written (url::Url would add a `/`): the backend appends `/api/v1/rpc` to it.
        Ok(ServerUrl(text.trim_end_matches('/').to_owned()))
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

impl Value for Secret {
    fn kind() -> String {
        "secret string".to_owned()
    }

    fn parse(text: &str) -> Result<Secret, String> {
        let text = text.trim();
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "contains spaces or characters that cannot be sent in an HTTP header; \
                        set it again with visible ASCII characters only"
                    .to_owned(),
            );
        }
        Ok(Secret(text.to_owned()))
    }

    fn describe(&self) -> String {
        "(set)".to_owned()
    }
}

impl Value for Addr {
    fn kind() -> String {
        "address and port (`IP:PORT` or `HOST:PORT`)".to_owned()
    }

    fn parse(text: &str) -> Result<Addr, String> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Addr(addr));
        }
        let usage = "use an address and port such as 127.0.0.1:8765, [::1]:8765, \
                     localhost:8765, or 0.0.0.0:8765 for every interface";
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("is not an address and port; {usage}"));
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("has no valid port (0 to 65535) after the colon; {usage}"))?;
        if host.is_empty() || host.contains([':', '[', ']', ' ', '/']) {
            return Err(format!(
                "is not an address and port (an IPv6 address goes in brackets, as in \
                 [::1]:{port}); {usage}"
            ));
        }
        match (host, port).to_socket_addrs() {
            Ok(addrs) => pick_listen_addr(addrs).map(Addr).ok_or_else(|| {
                format!(
                    "the host name {host} resolves to no address; use an IP address such as \
                     127.0.0.1:{port}"
                )
            }),
            Err(error) => Err(format!(
                "the host name {host} could not be resolved ({error}); use an IP address such \
                 as 127.0.0.1:{port}"
            )),
        }
    }

    fn describe(&self) -> String {
        self.0.to_string()
    }
}

impl Value for LogFilter {
    fn kind() -> String {
        "level or tracing filter".to_owned()
    }

    fn parse(text: &str) -> Result<LogFilter, String> {
        const USE: &str = "use trace, debug, info, warn, error or off, or tracing directives \
                           such as info,msbd=debug";
        let text = text.trim();
        if text.is_empty() {
            return Err(format!("is empty; {USE}"));
        }
        for directive in text.split(',').map(str::trim) {
            // Kept by hand: tracing skips an empty directive, but two commas are most likely a
            // mistake in what was meant.
            if directive.is_empty() {
                return Err(format!("has an empty directive (two commas?); {USE}"));
            }
            if let Err(error) = log_filter_builder().parse(directive) {
                let form = if directive.contains('=') {
                    "which is not TARGET=LEVEL"
                } else {
                    "which tracing does not accept"
                };
                return Err(format!(
                    "has the directive {directive:?}, {form} ({error}); {USE}"
                ));
            }
            // Kept by hand: tracing takes a bare word for a target, so a lone misspelt level
            // would silently log nothing; a module path (`msbd::config`) or a word among other
            // directives is still taken as a target.
            let lone_word = !text.contains(',')
                && !directive.contains("::")
                && !directive.contains(['=', '[', '{']);
            if lone_word
                && directive
                    .parse::<tracing_subscriber::filter::LevelFilter>()
                    .is_err()
            {
                // The microsandbox wrapper took Python's level names.
                let hint = match directive.to_ascii_lowercase().as_str() {
                    "warning" => " (Python's WARNING is warn here)",
                    "critical" | "fatal" => " (Python's CRITICAL is error here)",
                    _ => "",
                };
                return Err(format!("is not a level{hint}; {USE}"));
            }
        }
        Ok(LogFilter(text.to_owned()))
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

impl Value for DatabaseUrl {
    fn kind() -> String {
        "`sqlite://PATH` or a path".to_owned()
    }

    fn parse(text: &str) -> Result<DatabaseUrl, String> {
        const FORMS: &str = "use sqlite://PATH or a file path, or unset MSB_DATABASE_URL for \
                             tasks.sqlite3 in the data directory";
        let text = text.trim();
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            return match task_core::store::postgres::check_url(text) {
                Ok(()) => Ok(DatabaseUrl(Database::Postgres {
                    url: text.to_owned(),
                })),
                Err(reason) => Err(format!(
                    "is not a PostgreSQL URL msbd can use ({reason}); write \
                     postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
                )),
            };
        }
        let path = if let Some(rest) = lower.strip_prefix("sqlite://").map(|_| &text[9..]) {
            rest
        } else if let Some(rest) = lower.strip_prefix("sqlite:").map(|_| &text[7..]) {
            rest
        } else if let Some((scheme, _)) = text.split_once("://")
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(format!(
                "the scheme {:?} is not supported; {FORMS}",
                scheme.to_ascii_lowercase()
            ));
        } else {
            text
        };
        if path.is_empty() {
            return Err(format!("names no file; {FORMS}"));
        }
        if path.starts_with(":memory:") || path.contains("mode=memory") {
            return Err(format!(
                "an in-memory database would lose every task when msbd stops; {FORMS}"
            ));
        }
        if text.len() != path.len() && path.contains('?') {
            return Err(format!(
                "URL options (after `?`) are not supported; {FORMS}"
            ));
        }
        Ok(DatabaseUrl(Database::Sqlite {
            path: PathBuf::from(path),
        }))
    }

    fn describe(&self) -> String {
        self.0.url()
    }
}

impl Value for SqlName {
    fn kind() -> String {
        "SQL name (letters, digits, `_`)".to_owned()
    }

    fn parse(text: &str) -> Result<SqlName, String> {
        let text = text.trim();
        let plain = text.len() <= 63
            && text.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain {
            return Err(
                "is not a plain SQL name: use up to 63 letters, digits and `_`, not starting \
                 with a digit, such as msbd"
                    .to_owned(),
            );
        }
        Ok(SqlName(text.to_owned()))
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

impl Value for NodeName {
    fn kind() -> String {
        "name (letters, digits, `.`, `_`, `-`)".to_owned()
    }

    fn parse(text: &str) -> Result<NodeName, String> {
        let text = text.trim();
        let plain = !text.is_empty()
            && text.len() <= 64
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !plain {
            return Err(
                "is not a node name: use 1 to 64 letters, digits, `.`, `_` and `-`, such as \
                 worker-1"
                    .to_owned(),
            );
        }
        Ok(NodeName(text.to_owned()))
    }

    fn describe(&self) -> String {
        self.0.clone()
    }
}

impl Value for Volumes {
    fn kind() -> String {
        "comma-separated `host:guest[:ro]` mappings".to_owned()
    }

    fn parse(text: &str) -> Result<Volumes, String> {
        let text = text.trim();
        let items: Vec<String> = if text.starts_with('[') {
            serde_json::from_str(text).map_err(|error| {
                format!(
                    "is not a JSON array of strings in double quotes ({error}); write \
                     [\"/host:/guest\", ...] or comma-separated mappings such as \
                     /srv/data:/data:ro,/srv/out:/out"
                )
            })?
        } else if text.starts_with('{') {
            return Err(
                "is a JSON object, not a list of mappings; write comma-separated \
                        mappings such as /srv/data:/data:ro,/srv/out:/out"
                    .to_owned(),
            );
        } else {
            text.split(',').map(|item| item.trim().to_owned()).collect()
        };
        let mut volumes: Vec<VolumeMapping> = Vec::new();
        let mut problems = Vec::new();
        for (index, item) in items.iter().enumerate() {
            if item.is_empty() {
                continue;
            }
            match VolumeMapping::parse(item) {
                Ok(volume) => {
                    if volumes.iter().any(|v| v.guest == volume.guest) {
                        problems.push(format!(
                            "mapping {} maps {} a second time",
                            index + 1,
                            volume.guest.display()
                        ));
                    } else {
                        volumes.push(volume);
                    }
                }
                Err(error) => problems.push(format!("mapping {}: {error}", index + 1)),
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "{}; write each mapping as /host/dir:/guest/dir, or /host/dir:/guest/dir:ro for \
                 read-only, separated by commas",
                problems.join("; ")
            ));
        }
        Ok(Volumes(volumes))
    }

    fn describe(&self) -> String {
        self.0
            .iter()
            .map(|volume| {
                format!(
                    "{}:{}{}",
                    volume.host.display(),
                    volume.guest.display(),
                    if volume.read_only { ":ro" } else { "" }
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Value for HostList {
    fn kind() -> String {
        "comma-separated `HOST` or `HOST:PORT`".to_owned()
    }

    fn parse(text: &str) -> Result<HostList, String> {
        let mut hosts = Vec::new();
        let mut problems = Vec::new();
        for entry in text.split(',').map(str::trim) {
            match host_entry(entry) {
                Ok(()) => hosts.push(entry.to_owned()),
                Err(problem) if !problems.contains(&problem) => problems.push(problem),
                Err(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "{}; list host names or IP addresses, each with an optional :PORT, separated by \
                 commas, such as msbd.example.com,192.0.2.10:8765",
                problems.join("; ")
            ));
        }
        Ok(HostList(hosts))
    }

    fn describe(&self) -> String {
        self.0.join(",")
    }
}

impl Value for OriginList {
    fn kind() -> String {
        "comma-separated origins (`http[s]://HOST[:PORT]`) or `null`".to_owned()
    }

    fn parse(text: &str) -> Result<OriginList, String> {
        let mut origins = Vec::new();
        let mut problems = Vec::new();
        for entry in text.split(',').map(str::trim) {
            match origin_entry(entry) {
                Ok(origin) => origins.push(origin),
                Err(problem) if !problems.contains(&problem) => problems.push(problem),
                Err(_) => {}
            }
        }
        if !problems.is_empty() {
            return Err(format!(
                "{}; list origins as browsers send them (a scheme and a host, with the port \
                 unless it is the scheme's default), separated by commas, such as \
                 https://app.example.com,http://localhost:3000, or null",
                problems.join("; ")
            ));
        }
        Ok(OriginList(origins))
    }

    fn describe(&self) -> String {
        self.0.join(",")
    }
}

/// Checks one entry of `MSB_HTTP_ALLOWED_HOSTS`: `HOST` or `HOST:PORT` (an IPv6 address in
/// brackets, or bare without a port). The problem names the entry.
fn host_entry(entry: &str) -> Result<(), String> {
    if entry.is_empty() {
        return Err("an entry is empty (two commas?)".to_owned());
    }
    let named = quoted(entry);
    if entry.contains(char::is_whitespace) {
        return Err(format!("the entry {named} holds spaces"));
    }
    if let Some((scheme, rest)) = entry.split_once("://") {
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let host = if host.is_empty() {
            "msbd.example.com"
        } else {
            host
        };
        return Err(format!(
            "the entry {named} has a scheme ({scheme}://): give only the host, such as {}",
            quoted(host)
        ));
    }
    if let Some(at) = entry.find(['/', '?', '#']) {
        let host = &entry[..at];
        let host = if host.is_empty() {
            "msbd.example.com"
        } else {
            host
        };
        return Err(format!(
            "the entry {named} has a path: give only the host, such as {}",
            quoted(host)
        ));
    }
    crate::hosts::HostPort::parse(entry)
        .map(drop)
        .map_err(|reason| format!("the entry {named} {reason}"))
}

/// Checks one entry of `MSB_HTTP_ALLOWED_ORIGINS`: `http://` or `https://`, a host and an
/// optional port (`:*` for any), or `null`; answers it without a trailing `/`. The problem
/// names the entry.
fn origin_entry(entry: &str) -> Result<String, String> {
    if entry.is_empty() {
        return Err("an entry is empty (two commas?)".to_owned());
    }
    let named = quoted(entry);
    if entry.contains(char::is_whitespace) {
        return Err(format!("the entry {named} holds spaces"));
    }
    if entry.eq_ignore_ascii_case("null") {
        return Ok("null".to_owned());
    }
    let lower = entry.to_ascii_lowercase();
    let scheme_len = if lower.starts_with("http://") {
        "http://".len()
    } else if lower.starts_with("https://") {
        "https://".len()
    } else if let Some((scheme, _)) = entry.split_once("://") {
        return Err(format!(
            "the entry {named} has the scheme {scheme}://; an origin is http:// or https://"
        ));
    } else {
        return Err(format!(
            "the entry {named} has no scheme; write it as browsers send it, such as {}",
            quoted(&format!("https://{entry}"))
        ));
    };
    // The scheme is ASCII, so `scheme_len` is a character boundary of `entry` too.
    let (scheme, rest) = entry.split_at(scheme_len);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if let Some(at) = rest.find(['/', '?', '#']) {
        return Err(format!(
            "the entry {named} has a path; an origin is only a scheme, a host and a port, such \
             as {}",
            quoted(&format!("{scheme}{}", &rest[..at]))
        ));
    }
    crate::hosts::check_origin_authority(rest, true)
        .map_err(|reason| format!("the entry {named} {reason}"))?;
    Ok(format!("{scheme}{rest}"))
}
