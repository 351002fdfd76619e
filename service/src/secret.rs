//! Tokens as types that refuse to print. The only way to read one is `expose()`, so
//! every use is easy to find.

use std::{fmt, time::SystemTime};

/// A bearer token presented by a workload. Never logged, displayed or serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// Wraps a token that `bearer` has already checked for shape.
    pub(crate) fn new(token: String) -> Self {
        Self(token)
    }

    /// The token itself, for its few readers: the TokenReview body, the cache keys
    /// (SHA-256 of it), and the unverified parsing and signature check of its claims.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BearerToken(<redacted, {} bytes>)", self.0.len())
    }
}

/// A token minted by the management cluster, with the expiry it reported.
#[derive(Clone)]
pub struct ExchangedToken {
    token: String,
    /// When the management API server says the token expires.
    pub expires_at: SystemTime,
}

impl ExchangedToken {
    /// Wraps a token returned by a TokenRequest.
    pub(crate) fn new(token: String, expires_at: SystemTime) -> Self {
        Self { token, expires_at }
    }

    /// The token itself: for the `authorization` header Envoy forwards upstream only.
    pub fn expose(&self) -> &str {
        &self.token
    }
}

impl fmt::Debug for ExchangedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ExchangedToken(<redacted, {} bytes>, expires_at: {:?})",
            self.token.len(),
            self.expires_at
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_token() {
        let bearer = BearerToken::new("secret-value".into());
        let exchanged = ExchangedToken::new("other-secret".into(), SystemTime::UNIX_EPOCH);
        let printed = format!("{bearer:?} {exchanged:?}");
        assert!(!printed.contains("secret"), "{printed}");
        assert!(printed.contains("12 bytes"), "{printed}");
    }
}
