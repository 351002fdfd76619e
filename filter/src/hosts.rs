//! Which requests are the filter's: the `hosts` key. A shared gateway serves other
//! applications too; their requests must pass untouched, credential unread.

/// One entry of `hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Every host (`*`).
    Any,
    /// This host name exactly (lower-case).
    Exact(String),
    /// Any host ending in this suffix, which starts with `.` (`*.example.com`).
    Suffix(String),
}

impl HostPattern {
    /// Parses `mgmt.example.com`, `*.example.com` or `*`; names are compared
    /// case-insensitively, so they are kept lower-case. `Err` says what is wrong.
    pub fn parse(pattern: &str) -> Result<HostPattern, String> {
        if pattern == "*" {
            return Ok(HostPattern::Any);
        }
        let (wild, name) = match pattern.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, pattern),
        };
        let labels_ok = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !labels_ok || name.len() > 253 {
            return Err(format!(
                "{pattern:?} is not a host name or `*.suffix` (no port, no scheme, no path)"
            ));
        }
        let name = name.to_ascii_lowercase();
        Ok(if wild {
            HostPattern::Suffix(format!(".{name}"))
        } else {
            HostPattern::Exact(name)
        })
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(name) => host == name,
            HostPattern::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

/// Whether a request whose `:authority` is `authority` is in scope: its host (port and
/// one trailing dot dropped, compared case-insensitively) matches one of `patterns`. An
/// authority that is absent or not UTF-8 matches nothing.
pub fn in_scope(patterns: &[HostPattern], authority: Option<&[u8]>) -> bool {
    let Some(host) = authority
        .and_then(|a| std::str::from_utf8(a).ok())
        .map(host_of)
    else {
        return false;
    };
    let host = host.to_ascii_lowercase();
    patterns.iter().any(|p| p.matches(&host))
}

/// The host of an authority: `[v6]:port` → `[v6]`, `name:port` → `name`, `name.` → `name`.
fn host_of(authority: &str) -> &str {
    let host = if authority.starts_with('[') {
        authority
            .find(']')
            .map_or(authority, |end| &authority[..=end])
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use wasm_bindgen_test::wasm_bindgen_test;

    use super::*;

    fn scope(patterns: &[&str], authority: &[u8]) -> bool {
        let patterns: Vec<_> = patterns
            .iter()
            .map(|p| HostPattern::parse(p).unwrap())
            .collect();
        in_scope(&patterns, Some(authority))
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn exact_names_match_without_port_and_case() {
        for authority in [
            &b"mgmt.example.com"[..],
            b"MGMT.Example.com",
            b"mgmt.example.com:8443",
            b"mgmt.example.com.",
        ] {
            assert!(scope(&["mgmt.example.com"], authority), "{authority:?}");
        }
        for authority in [
            &b"other.example.com"[..],
            b"xmgmt.example.com",
            b"mgmt.example.com.evil",
            b"mgmt.example.com:abc",
            b"caf\xe9",
        ] {
            assert!(!scope(&["mgmt.example.com"], authority), "{authority:?}");
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn wildcards_match_subdomains_only() {
        assert!(scope(&["*.example.com"], b"a.example.com"));
        assert!(scope(&["*.example.com"], b"a.b.example.com:443"));
        assert!(!scope(&["*.example.com"], b"example.com"));
        assert!(!scope(&["*.example.com"], b"aexample.com"));
        assert!(scope(&["*"], b"anything:1"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_request_without_authority_is_out_of_scope() {
        let patterns = [HostPattern::parse("*").unwrap()];
        assert!(!in_scope(&patterns, None));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn bad_patterns_are_refused() {
        for bad in [
            "",
            "*.",
            "a..b",
            "mgmt.example.com:443",
            "https://mgmt",
            "mgmt/x",
            "*mgmt",
            "a.*.b",
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            HostPattern::parse("Mgmt.Example.COM"),
            Ok(HostPattern::Exact("mgmt.example.com".into()))
        );
    }
}
