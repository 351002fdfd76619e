//! The bearer token in an `authorization` header value (RFC 6750 §2.1).

use crate::{deny::DenyReason, secret::BearerToken};

/// The largest token we accept. Kubernetes service-account tokens are 1–2 KiB; the
/// bound keeps a hostile header from costing more than a rejection.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Why a header does not carry a usable bearer token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// No `authorization` header at all.
    Missing,
    /// A header that is not `Bearer <one token>`.
    Malformed,
}

impl From<BearerError> for DenyReason {
    fn from(error: BearerError) -> Self {
        match error {
            BearerError::Missing => DenyReason::MissingToken,
            BearerError::Malformed => DenyReason::MalformedToken,
        }
    }
}

/// Extracts the token from `Bearer <token>`: scheme case-insensitive, exactly one space,
/// one non-empty token of RFC 6750 `b64token` characters (so no whitespace, control
/// characters or commas, which is how Envoy joins duplicate headers), at most
/// [`MAX_TOKEN_BYTES`].
pub fn parse(header: Option<&str>) -> Result<BearerToken, BearerError> {
    let value = header.ok_or(BearerError::Missing)?;
    let (scheme, token) = value.split_once(' ').ok_or(BearerError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("bearer") || !is_b64token(token) {
        return Err(BearerError::Malformed);
    }
    Ok(BearerToken::new(token.to_owned()))
}

/// `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`
fn is_b64token(token: &str) -> bool {
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return false;
    }
    let body = token.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_is_case_insensitive() {
        for header in [
            "Bearer abc.def-_~+/==",
            "bearer abc.def-_~+/==",
            "BEARER abc.def-_~+/==",
        ] {
            assert_eq!(
                parse(Some(header)).unwrap().expose(),
                "abc.def-_~+/==",
                "{header}"
            );
        }
    }

    #[test]
    fn missing_header_is_missing() {
        assert_eq!(parse(None), Err(BearerError::Missing));
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES + 1));
        for header in [
            "",
            "Bearer",
            "Bearer ",
            "bearer  x",
            "Bearer x y",
            "Bearer x ",
            "Basic dXNlcjpwYXNz",
            "Bearerx y",
            "Bearer a\tb",
            "Bearer a\u{1}b",
            "Bearer a,Bearer b",
            "Bearer ===",
            "Bearer a=b",
            "Bearer ä",
            long.as_str(),
        ] {
            assert_eq!(
                parse(Some(header)),
                Err(BearerError::Malformed),
                "{header:?}"
            );
        }
    }

    #[test]
    fn longest_allowed_token_is_accepted() {
        let header = format!("Bearer {}", "a".repeat(MAX_TOKEN_BYTES));
        assert_eq!(
            parse(Some(&header)).unwrap().expose().len(),
            MAX_TOKEN_BYTES
        );
    }
}
