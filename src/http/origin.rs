//! `NEXUS_ALLOWED_ORIGINS`: which browser origins may open a socket.
//!
//! Semantics follow Phoenix's `check_origin` list form: each entry is `scheme://host:port`
//! where scheme and port may be left out (`//host`, `host`) and then match anything, and a
//! host `*.example.com` matches `example.com` and every subdomain. Hosts compare
//! case-insensitively. No `Origin` header is always allowed (non-browser clients).

/// One allowed-origin entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginEntry {
    scheme: Option<String>,
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

/// Parsed parts of an `Origin` header or of an entry.
struct Parts<'a> {
    scheme: Option<&'a str>,
    host: &'a str,
    port: Option<u16>,
}

fn split(s: &str) -> Option<Parts<'_>> {
    let (scheme, rest) = match s.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, s.strip_prefix("//").unwrap_or(s)),
    };
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.is_empty() {
        return None;
    }
    // `[::1]:4000` splits at the last colon; `[::1]` does not parse a port and stays whole.
    let (host, port) = match rest.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>())) {
        Some((h, Ok(port))) => (h, Some(port)),
        _ => (rest, None),
    };
    if host.is_empty() {
        return None;
    }
    Some(Parts { scheme, host, port })
}

impl OriginEntry {
    /// Parses one entry; `None` if it is not an origin.
    pub fn parse(s: &str) -> Option<OriginEntry> {
        let p = split(s.trim())?;
        let (wildcard, host) = match p.host.strip_prefix("*.") {
            Some(h) => (true, h),
            None => (false, p.host),
        };
        Some(OriginEntry {
            scheme: p.scheme.map(str::to_ascii_lowercase),
            host: host.to_ascii_lowercase(),
            wildcard,
            port: p.port,
        })
    }

    fn matches(&self, origin: &Parts<'_>) -> bool {
        let host = origin.host.to_ascii_lowercase();
        let host_ok = host == self.host
            || (self.wildcard
                && host.len() > self.host.len()
                && host.ends_with(&self.host)
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.');
        let scheme_ok = match (&self.scheme, origin.scheme) {
            (None, _) => true,
            (Some(s), Some(o)) => s.eq_ignore_ascii_case(o),
            (Some(_), None) => false,
        };
        let port_ok = self.port.is_none() || self.port == origin.port.or(default_port(origin.scheme));
        host_ok && scheme_ok && port_ok
    }
}

fn default_port(scheme: Option<&str>) -> Option<u16> {
    match scheme {
        Some(s) if s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("ws") => Some(80),
        Some(s) if s.eq_ignore_ascii_case("https") || s.eq_ignore_ascii_case("wss") => Some(443),
        _ => None,
    }
}

/// The allowed origins; empty allows every origin.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    entries: Vec<OriginEntry>,
}

impl OriginPolicy {
    /// A policy from parsed entries (empty = allow all).
    pub fn new(entries: Vec<OriginEntry>) -> OriginPolicy {
        OriginPolicy { entries }
    }

    /// Whether a request with this `Origin` header value (if any) may connect.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        if self.entries.is_empty() {
            return true;
        }
        match split(origin.trim()) {
            Some(parts) => self.entries.iter().any(|e| e.matches(&parts)),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(list: &[&str]) -> OriginPolicy {
        OriginPolicy::new(list.iter().map(|s| OriginEntry::parse(s).expect("entry")).collect())
    }

    #[test]
    fn empty_policy_allows_all() {
        assert!(OriginPolicy::default().allows(Some("https://evil.test")));
        assert!(OriginPolicy::default().allows(None));
    }

    #[test]
    fn exact_scheme_host_port() {
        let p = policy(&["https://chat.example.com"]);
        assert!(p.allows(Some("https://chat.example.com")));
        assert!(p.allows(Some("https://CHAT.example.com:8443")));
        assert!(!p.allows(Some("http://chat.example.com")));
        assert!(!p.allows(Some("https://evil.example.com")));
        assert!(!p.allows(Some("null")));
        assert!(p.allows(None));
    }

    #[test]
    fn port_and_wildcards() {
        let p = policy(&["//localhost:4000", "https://*.other.com"]);
        assert!(p.allows(Some("http://localhost:4000")));
        assert!(!p.allows(Some("http://localhost:4001")));
        assert!(p.allows(Some("https://other.com")));
        assert!(p.allows(Some("https://a.b.other.com")));
        assert!(!p.allows(Some("https://notother.com")));
    }
}
