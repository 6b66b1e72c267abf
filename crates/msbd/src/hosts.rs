//! Hosts as the HTTP transport reads them: one parser for the `Host` header of a request, the
//! entries of `MSB_HTTP_ALLOWED_HOSTS` and the host of each `MSB_HTTP_ALLOWED_ORIGINS` entry.
//! It reads with the `http` crate's [`Authority`] (as rmcp does), and refuses in words what a
//! `Host` cannot carry.

use std::net::Ipv6Addr;

use axum::http::uri::Authority;

/// A host and a port, as a `Host` header or an allowed-host entry names them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostPort {
    /// The name in lower case, or the address (an IPv6 one without brackets, in its shortest
    /// form).
    host: String,
    /// The port; `None` when none is written.
    port: Option<u16>,
}

impl HostPort {
    /// Reads `HOST`, `HOST:PORT`, `[IPV6]`, `[IPV6]:PORT` or a bare IPv6 address: a name
    /// (letters, digits, `-`, `.`, `_`), an IPv4 address or an IPv6 address, and a port from 1
    /// to 65535. The error says what is wrong, worded to follow the entry's name.
    pub(crate) fn parse(text: &str) -> Result<HostPort, String> {
        if let Ok(address) = text.parse::<Ipv6Addr>() {
            return Ok(HostPort {
                host: address.to_string(),
                port: None,
            });
        }
        parse_authority(text)
    }

    /// A host and port known to be well formed (an address msbd listens on, a loopback name).
    pub(crate) fn new(host: &str, port: Option<u16>) -> HostPort {
        HostPort {
            host: normalize(host),
            port,
        }
    }

    /// Whether a request's `Host` (`given`) matches this allowed entry: the same host, and the
    /// same port unless the entry names none (as rmcp compares them).
    pub(crate) fn allows(&self, given: &HostPort) -> bool {
        self.host == given.host && self.port.is_none_or(|port| given.port == Some(port))
    }
}

/// Checks the host and port of an origin (`HOST`, `HOST:PORT`, or `HOST:*` when `any_port`).
pub(crate) fn check_origin_authority(text: &str, any_port: bool) -> Result<(), String> {
    // `:*` (any port) is rmcp's own form for origins, which [`Authority`] does not read.
    match text.strip_suffix(":*") {
        Some(base) if any_port => match parse_authority(base)? {
            HostPort { port: Some(_), .. } => {
                Err("has two ports, one of them `:*`: keep one".to_owned())
            }
            HostPort { port: None, .. } => Ok(()),
        },
        _ => parse_authority(text).map(drop),
    }
}

/// [`HostPort::parse`] without the bare IPv6 address (which only a `Host` list may hold).
fn parse_authority(text: &str) -> Result<HostPort, String> {
    let parsed: Authority = text.parse().map_err(|_| refused_authority(text))?;
    let host = parsed.host();
    // The port as written: what follows the host (no `@` is let through, so no user name).
    let after_host = parsed.as_str().get(host.len()..).unwrap_or_default();
    if host.is_empty() {
        return Err("names no host".to_owned());
    }
    if host.contains('*') {
        return Err("has a wildcard, which is not supported: list each name".to_owned());
    }
    if let Some(inside) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        if inside.parse::<Ipv6Addr>().is_err() {
            return Err(format!(
                "has {inside:?} in brackets, which is not an IPv6 address"
            ));
        }
        // Kept by hand: [`Authority`] takes any URI characters in a name (and a user name
        // before `@`), but a `Host` header carries only a name or an address.
    } else if parsed.as_str().contains('@')
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err("is not a host name or IP address".to_owned());
    }
    let port = match after_host.strip_prefix(':') {
        None if after_host.is_empty() => None,
        None => return Err("has text after the ] that is not a :PORT".to_owned()),
        Some(port) => Some(port),
    };
    let port = match port {
        None => None,
        Some(written) => match parsed.port_u16() {
            Some(port) if port > 0 && written.bytes().all(|b| b.is_ascii_digit()) => Some(port),
            _ => {
                return Err(format!(
                    "has the port {}, which is not a number from 1 to 65535",
                    crate::config::quoted(written)
                ));
            }
        },
    };
    Ok(HostPort::new(host, port))
}

/// A host without IPv6 brackets, in lower case; an IPv6 address in its shortest form.
fn normalize(host: &str) -> String {
    let bare = host.trim_matches(['[', ']']);
    match bare.parse::<Ipv6Addr>() {
        Ok(address) => address.to_string(),
        Err(_) => bare.to_ascii_lowercase(),
    }
}

/// Why [`Authority`] refused `text`, in words.
fn refused_authority(text: &str) -> String {
    if !text.starts_with('[') && text.matches(':').count() > 1 {
        "has more than one `:`; write an IPv6 address in brackets, such as [2001:db8::1]:8765"
            .to_owned()
    } else if text.is_empty() || text.starts_with(':') {
        "names no host".to_owned()
    } else if text.starts_with('[') && !text.contains(']') {
        "has a [ without its ]".to_owned()
    } else {
        "is not a host name or IP address".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_read_as_headers_and_entries_write_them() {
        let read = |text: &str| HostPort::parse(text).map(|h| (h.host, h.port));
        assert_eq!(read("Example.COM"), Ok(("example.com".into(), None)));
        assert_eq!(read("10.0.0.5:9000"), Ok(("10.0.0.5".into(), Some(9000))));
        assert_eq!(read("[0:0::1]:7000"), Ok(("::1".into(), Some(7000))));
        assert_eq!(read("::1"), Ok(("::1".into(), None)));
        assert_eq!(read("[::1]"), Ok(("::1".into(), None)));
        for (bad, why) in [
            ("", "names no host"),
            (":80", "names no host"),
            ("a:b:c", "more than one `:`"),
            ("[::1", "without its ]"),
            ("[nope]", "not an IPv6 address"),
            ("*.example.com", "wildcard"),
            ("user@host", "not a host name"),
            ("exa$mple", "not a host name"),
            ("host:0", "not a number from 1 to 65535"),
            ("host:99999", "not a number from 1 to 65535"),
        ] {
            let error = HostPort::parse(bad).expect_err(bad);
            assert!(error.contains(why), "{bad:?}: {error}");
        }
    }

    #[test]
    fn an_entry_without_a_port_allows_any() {
        let allows = |entry: &str, given: &str| {
            HostPort::parse(entry)
                .unwrap()
                .allows(&HostPort::parse(given).unwrap())
        };
        assert!(allows("example.com", "EXAMPLE.com:1234"));
        assert!(allows("example.com:80", "example.com:80"));
        assert!(!allows("example.com:80", "example.com:81"));
        assert!(!allows("example.com:80", "example.com"));
        assert!(allows("::1", "[::1]:7000"));
        assert!(!allows("localhost", "localhost.evil"));
    }

    #[test]
    fn origins_may_take_any_port() {
        assert_eq!(check_origin_authority("app.example.com:*", true), Ok(()));
        assert_eq!(check_origin_authority("[::1]:*", true), Ok(()));
        assert!(check_origin_authority("app.example.com:*", false).is_err());
        let two = check_origin_authority("app.example.com:80:*", true).unwrap_err();
        assert!(two.contains("two ports"), "{two}");
    }
}
