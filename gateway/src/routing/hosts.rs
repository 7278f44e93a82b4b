//! Host names to values: the lookup both routing (a request's `Host` to its
//! tenant) and TLS (a ClientHello's SNI to a certificate) make, so that the
//! two can never disagree about which tenant a name belongs to.
//!
//! A name is looked up among the exact names first; then, if it has more
//! than one label, its parent domain among the one-label wildcards
//! (`*.example.org` matches `a.example.org`, not `example.org` nor
//! `a.b.example.org`).

use std::collections::HashMap;

/// Exact host names and one-label wildcards (`*.example.org`), each mapped
/// to a `T`; names are stored as the config writes them (lower-case,
/// without a port or a trailing dot).
#[derive(Debug, Clone)]
pub struct HostMap<T> {
    exact: HashMap<String, T>,
    /// Keyed by the wildcard's parent domain (`example.org` for
    /// `*.example.org`).
    wildcard: HashMap<String, T>,
}

impl<T> Default for HostMap<T> {
    fn default() -> Self {
        HostMap {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }
}

impl<T> HostMap<T> {
    /// Maps `pattern` (an exact name, or `*.` and a parent domain) to
    /// `value`, replacing what it mapped to before.
    pub fn insert(&mut self, pattern: &str, value: T) {
        match pattern.strip_prefix("*.") {
            Some(parent) => self.wildcard.insert(parent.to_owned(), value),
            None => self.exact.insert(pattern.to_owned(), value),
        };
    }

    /// The value of `name` (already normalized: see [`normalize_host`]):
    /// its exact entry, else its parent domain's wildcard.
    pub fn get(&self, name: &str) -> Option<&T> {
        if let Some(v) = self.exact.get(name) {
            return Some(v);
        }
        match name.split_once('.') {
            Some((label, parent)) if !label.is_empty() => self.wildcard.get(parent),
            _ => None,
        }
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

/// A request's host is not a host name or address with an optional port
/// (RFC 9110 section 7.2; RFC 3986 section 3.2.2): no user info, no
/// whitespace, no empty labels, a port of digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidHost;

/// A `Host` value as tenants' host names are written: without the port,
/// lower-case, without one trailing dot; `None` if it is malformed.
pub fn normalize_host(host: &str) -> Option<String> {
    let (name, port) = if host.starts_with('[') {
        // An IPv6 literal: up to its closing bracket.
        let end = host.find(']')?;
        let literal = &host[..=end];
        let ok = literal[1..end]
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'));
        if !ok || end < 2 {
            return None;
        }
        let rest = &host[end + 1..];
        if !rest.is_empty() && !rest.starts_with(':') {
            return None;
        }
        (literal, rest.strip_prefix(':'))
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    if name.starts_with('[') {
        return Some(name.to_ascii_lowercase());
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        });
    valid.then(|| name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_headers_lose_their_port_case_and_trailing_dot() {
        let n = |h: &str| normalize_host(h);
        assert_eq!(
            n("Chat.Example.COM:8080").as_deref(),
            Some("chat.example.com")
        );
        assert_eq!(n("example.org.").as_deref(), Some("example.org"));
        assert_eq!(n("[::1]:8080").as_deref(), Some("[::1]"));
        assert_eq!(n("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(n("127.0.0.1").as_deref(), Some("127.0.0.1"));
    }

    #[test]
    fn malformed_hosts_are_refused() {
        for bad in [
            "user@chat.acme.com",
            "chat.acme.com:abc",
            "chat.acme.com:",
            "chat.acme.com..",
            "a..b",
            "chat.acme.com\tx",
            "",
            ":80",
            "[::1",
            "[zz]",
            "[::1]x",
            "a.com:123456",
        ] {
            assert_eq!(normalize_host(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn exact_names_win_over_wildcards_and_wildcards_match_one_label() {
        let mut m = HostMap::default();
        m.insert("*.example.org", 1);
        m.insert("chat.example.org", 2);
        m.insert("example.com", 3);
        assert_eq!(m.get("chat.example.org"), Some(&2));
        assert_eq!(m.get("a.example.org"), Some(&1));
        assert_eq!(m.get("example.org"), None);
        assert_eq!(m.get("a.b.example.org"), None);
        assert_eq!(m.get("example.com"), Some(&3));
        assert_eq!(m.get("x.example.com"), None);
    }
}
