//! TokenReview against the workload cluster: is this token valid, and whose is it?

use std::time::{Duration, SystemTime};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde::Deserialize;

use crate::{
    authz::{Denial, decision::DenyReason},
    cluster::{self, Cluster},
    identity::{IdentityError, ServiceAccountRef, WorkloadIdentity},
    secret::BearerToken,
};

/// Validates workload tokens with the workload cluster's TokenReview API.
#[derive(Clone)]
pub struct Reviewer {
    client: kube::Client,
    api: Api<TokenReview>,
    audiences: Vec<String>,
}

/// A token the workload cluster accepted, and when it stops being valid.
#[derive(Debug, Clone)]
pub struct Review {
    /// Whose token it is.
    pub identity: WorkloadIdentity,
    /// When the token's intended life ends (`min(exp, kubernetes.io.warnafter)`), if it
    /// says; `None` for tokens without `exp`, such as legacy secret-based ones.
    pub expires_at: Option<SystemTime>,
}

impl Reviewer {
    /// A reviewer using `client` (built for the workload cluster). Non-empty `audiences`
    /// go into the TokenReview, so the API server also checks `aud`; empty means the API
    /// server's own audiences.
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        Self {
            api: Api::all(client.clone()),
            client,
            audiences,
        }
    }

    /// Whether the API server answers `GET /version` within `timeout` (readiness).
    pub async fn reachable(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.client.apiserver_version()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(cluster::describe(&e)),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    /// Asks the workload cluster about `token`. Only an authenticated service account
    /// with valid namespace and name passes.
    pub async fn review(&self, token: &BearerToken) -> Result<Review, Denial> {
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.expose().to_owned()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let response = self
            .api
            .create(&PostParams::default(), &request)
            .await
            .map_err(|e| Denial {
                reason: cluster::classify(&e, Cluster::Workload, None, None),
                detail: Some(cluster::describe(&e)),
            })?;
        let status = response.status.unwrap_or_default();
        // A real API server omits `authenticated` when it rejects a token.
        if status.authenticated != Some(true) {
            return Err(Denial {
                reason: DenyReason::InvalidToken,
                detail: status.error,
            });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let service_account = ServiceAccountRef::from_username(&username).map_err(|e| Denial {
            reason: match e {
                IdentityError::NotServiceAccount => DenyReason::NotServiceAccount,
                IdentityError::InvalidName => DenyReason::InvalidServiceAccountName,
            },
            // Usernames identify a principal, they are not credentials.
            detail: Some(format!("user {username:?}")),
        })?;
        Ok(Review {
            identity: WorkloadIdentity {
                service_account,
                uid: user.uid.unwrap_or_default(),
            },
            expires_at: intended_expiry(token),
        })
    }
}

#[derive(Deserialize)]
struct ExpiryClaims {
    exp: Option<i64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<KubernetesClaims>,
}

#[derive(Deserialize)]
struct KubernetesClaims {
    warnafter: Option<i64>,
}

/// Reads `exp` and `kubernetes.io.warnafter` from a token the API server has just
/// accepted (so its signature is already checked). Kubelet extends projected tokens to
/// a year by default and marks the intended expiry with `warnafter`; the earlier of the
/// two is the life we bound the exchanged token by.
pub fn intended_expiry(token: &BearerToken) -> Option<SystemTime> {
    let payload = token.expose().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: ExpiryClaims = serde_json::from_slice(&bytes).ok()?;
    let warn_after = claims.kubernetes.and_then(|k| k.warnafter);
    let at = match (claims.exp, warn_after) {
        (Some(exp), Some(warn)) => exp.min(warn),
        (Some(t), None) | (None, Some(t)) => t,
        (None, None) => return None,
    };
    let secs = u64::try_from(at).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(claims: serde_json::Value) -> BearerToken {
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        BearerToken::new(format!(
            "{}.{}.sig",
            b64(br#"{"alg":"RS256"}"#),
            b64(claims.to_string().as_bytes())
        ))
    }

    fn at(secs: u64) -> Option<SystemTime> {
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn expiry_is_exp() {
        assert_eq!(
            intended_expiry(&token(serde_json::json!({"exp": 2000}))),
            at(2000)
        );
    }

    #[test]
    fn warnafter_shortens_an_extended_token() {
        let t = token(serde_json::json!({"exp": 9000, "kubernetes.io": {"warnafter": 3000}}));
        assert_eq!(intended_expiry(&t), at(3000));
    }

    #[test]
    fn tokens_without_expiry_or_not_jwts_have_none() {
        assert_eq!(
            intended_expiry(&token(serde_json::json!({"sub": "x"}))),
            None
        );
        assert_eq!(intended_expiry(&BearerToken::new("opaque".into())), None);
        assert_eq!(intended_expiry(&BearerToken::new("a.!!!.c".into())), None);
        assert_eq!(
            intended_expiry(&token(serde_json::json!({"exp": -5}))),
            None
        );
    }
}
