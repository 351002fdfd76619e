//! TokenReview against the workload cluster: is this token valid, and whose is it?

pub mod turns;

use std::{
    collections::HashSet,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use serde::Deserialize;

use sha2::{Digest, Sha256};

use crate::{
    deny::{self, Denial, DenyReason, Side},
    identity::{ServiceAccountRef, Validated, WorkloadIdentity},
    metrics::{self, CacheLabels, Metrics},
    secret::BearerToken,
};
use turns::Turns;

/// Most tokens whose review is remembered at once.
const VALIDATION_CACHE_ENTRIES: u64 = 100_000;
/// How long a TokenReview may wait for a turn before its check is answered 429.
const TURN_WAIT: Duration = Duration::from_millis(500);
/// An accepted verdict this far into its TTL (in tenths) is refreshed in the background
/// on its next hit, so a hot identity never waits for an inline review.
const REFRESH_AFTER_TENTHS: u32 = 7;
/// How long a rejection is remembered: enough to absorb a retry storm, short enough
/// that a token that starts working (clock skew, new SA) is not refused for long.
const REJECTION_TTL: Duration = Duration::from_secs(1);

/// What the validation cache remembers: an answer the API server gave (not a failure to
/// get one: those are never kept).
type Answer = Result<Validated, Denial>;

/// Keeps an accepted token until min(ttl, its expiry), a rejection for at most 1 s.
struct AnswerExpiry {
    ttl: Duration,
}

impl moka::Expiry<[u8; 32], Answer> for AnswerExpiry {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        answer: &Answer,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(match answer {
            Ok(review) => {
                let left = review.expires_at.map_or(self.ttl, |at| {
                    at.duration_since(SystemTime::now()).unwrap_or_default()
                });
                self.ttl.min(left)
            }
            Err(_) => self.ttl.min(REJECTION_TTL),
        })
    }

    // A refreshed verdict starts its own TTL (moka would keep the old expiry).
    fn expire_after_update(
        &self,
        key: &[u8; 32],
        answer: &Answer,
        at: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, answer, at)
    }
}

/// Whether a refusal is the cluster's verdict on the token (worth remembering), not a
/// failure to get one (503-class) or a missing turn (429).
fn is_verdict(denial: &Denial) -> bool {
    !denial.reason.is_dependency_failure() && !matches!(denial.reason, DenyReason::Throttled(_))
}

fn lock(set: &Mutex<HashSet<[u8; 32]>>) -> std::sync::MutexGuard<'_, HashSet<[u8; 32]>> {
    set.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why a readiness question to the workload API server got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{}", deny::describe(.0))]
    Kube(kube::Error),
    #[error("{0}")]
    Request(http::Error),
}

/// Validates workload tokens with the workload cluster's TokenReview API.
#[derive(Clone)]
pub struct Reviewer {
    /// The workload cluster's configured name, for metrics.
    cluster: Arc<str>,
    client: kube::Client,
    api: Api<TokenReview>,
    audiences: Vec<String>,
    /// Keyed by SHA-256 of the token, never the token itself; `None` when the TTL is 0.
    cache: Option<moka::future::Cache<[u8; 32], Answer>>,
    /// Turns for TokenReviews in flight: tokens not in the cache wait briefly for one or
    /// get 429, so a flood of unknown tokens cannot hold every API-server slot; cached
    /// ones need none.
    turns: Turns,
    metrics: Arc<Metrics>,
    ttl: Duration,
    /// Tokens (by cache key) whose verdict is being refreshed now: one review each.
    refreshing: Arc<Mutex<HashSet<[u8; 32]>>>,
}

const VALIDATION: CacheLabels = CacheLabels {
    cache: "validation",
};

impl Reviewer {
    /// A reviewer using `client` (built for the workload cluster). Non-empty `audiences`
    /// go into the TokenReview, so the API server also checks `aud`; empty means the API
    /// server's own audiences.
    /// Answers are reused for `validation_ttl` (0: never).
    /// TokenReviews run only with one of `turns`.
    pub fn new(
        cluster: Arc<str>,
        client: kube::Client,
        audiences: Vec<String>,
        validation_ttl: Duration,
        turns: Turns,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache = (!validation_ttl.is_zero()).then(|| {
            moka::future::Cache::builder()
                .max_capacity(VALIDATION_CACHE_ENTRIES)
                .expire_after(AnswerExpiry {
                    ttl: validation_ttl,
                })
                .build()
        });
        Self {
            cluster,
            turns,
            api: Api::all(client.clone()),
            client,
            audiences,
            cache,
            metrics,
            ttl: validation_ttl,
            refreshing: Arc::default(),
        }
    }

    /// Whether the API server answers `GET /version` within `timeout` (readiness).
    pub async fn reachable(&self, timeout: Duration) -> Result<(), ProbeError> {
        match tokio::time::timeout(timeout, self.client.apiserver_version()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ProbeError::Kube(e)),
            Err(_) => Err(ProbeError::Timeout(timeout)),
        }
    }

    /// The issuer the API server announces in its OIDC discovery document
    /// (`/.well-known/openid-configuration`, readable by every service account).
    /// `Ok(None)` when it definitely has none to tell (discovery off, 403 or 404, no
    /// `issuer`); `Err` for a failure worth retrying.
    pub async fn discover_issuer(&self, timeout: Duration) -> Result<Option<String>, ProbeError> {
        #[derive(Deserialize)]
        struct Discovery {
            issuer: Option<String>,
        }
        let request = http::Request::get("/.well-known/openid-configuration")
            .body(Vec::new())
            .map_err(ProbeError::Request)?;
        match tokio::time::timeout(timeout, self.client.request::<Discovery>(request)).await {
            Err(_) => Err(ProbeError::Timeout(timeout)),
            Ok(Ok(document)) => Ok(document.issuer.filter(|i| !i.is_empty())),
            Ok(Err(kube::Error::Api(status))) if matches!(status.code, 401 | 403 | 404) => Ok(None),
            Ok(Err(e)) => Err(ProbeError::Kube(e)),
        }
    }

    /// Asks the workload cluster about `token` (or reuses its recent answer). Only an
    /// authenticated service account with valid namespace and name passes. Concurrent
    /// reviews of one token make one call. `source` is the client's address, for its
    /// share of the turns.
    pub async fn review(
        &self,
        token: &BearerToken,
        source: Option<IpAddr>,
    ) -> Result<Validated, Denial> {
        let Some(cache) = &self.cache else {
            return self.ask(token, source).await;
        };
        let key: [u8; 32] = Sha256::digest(token.expose().as_bytes()).into();
        let m = &self.metrics;
        if let Some(answer) = cache.get(&key).await {
            m.cache_hits.get_or_create(&VALIDATION).inc();
            let refresh_after = self.ttl * REFRESH_AFTER_TENTHS / 10;
            if answer
                .as_ref()
                .is_ok_and(|v| v.validated_at.elapsed() >= refresh_after)
            {
                self.refresh_in_background(key, token.clone());
            }
            return answer.map(|r| Validated {
                from_cache: true,
                ..r
            });
        }
        m.cache_misses.get_or_create(&VALIDATION).inc();
        cache
            .try_get_with(key, async {
                match self.ask(token, source).await {
                    Ok(review) => Ok(Ok(review)),
                    // The cluster's own verdict on the token: remember it briefly.
                    Err(d) if is_verdict(&d) => Ok(Err(d)),
                    // No turn, or no answer: nothing to remember, try again next time.
                    Err(d) => Err(d),
                }
            })
            .await
            .map_err(|shared| (*shared).clone())?
    }

    /// Replaces `key`'s verdict with a fresh review, unless one is under way. A review that
    /// gets no answer leaves the old verdict to expire at its time.
    fn refresh_in_background(&self, key: [u8; 32], token: BearerToken) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        let refreshing = self.refreshing.clone();
        if !lock(&refreshing).insert(key) {
            return;
        }
        let reviewer = self.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(reviewer.ttl, reviewer.ask(&token, None)).await;
            match answer {
                Ok(Ok(validated)) => cache.insert(key, Ok(validated)).await,
                Ok(Err(denial)) if is_verdict(&denial) => cache.insert(key, Err(denial)).await,
                Ok(Err(_)) | Err(_) => {}
            }
            lock(&refreshing).remove(&key);
        });
    }

    async fn ask(&self, token: &BearerToken, source: Option<IpAddr>) -> Result<Validated, Denial> {
        // A short wait absorbs ordinary bursts; past it the caller hears 429 at once
        // instead of queueing behind a flood until its deadline.
        let _turn = self.turns.take(source, TURN_WAIT).await.map_err(|busy| {
            let whose = if busy.past_share {
                "; this client is past its --review-max-in-flight-per-source share"
            } else {
                ""
            };
            DenyReason::Throttled(1).because(format!(
                    "--review-max-in-flight TokenReviews in flight for cluster {:?} for {TURN_WAIT:?}{whose}",
                    &*self.cluster
                ))
        })?;
        let started = std::time::Instant::now();
        let request = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.expose().to_owned()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let response = self.api.create(&PostParams::default(), &request).await;
        self.metrics.kube_call(
            &self.cluster,
            "tokenreview",
            metrics::code_of(&response, "201"),
            started.elapsed(),
        );
        let response = response.map_err(|e| {
            deny::classify(&e, Side::Workload, None, None).because(deny::describe(&e))
        })?;
        verdict(response, &self.audiences, token)
    }
}

/// What a TokenReview answer says about `token`, reviewed for `audiences`: only an
/// authenticated service account with a valid namespace and name passes, and, when we
/// asked for audiences, only one granted at least one of them.
pub fn verdict(
    answer: TokenReview,
    audiences: &[String],
    token: &BearerToken,
) -> Result<Validated, Denial> {
    let status = answer.status.unwrap_or_default();
    // A real API server omits `authenticated` when it rejects a token.
    if status.authenticated != Some(true) {
        return Err(Denial {
            reason: DenyReason::InvalidToken,
            detail: status.error,
        });
    }
    // An audience-aware API server names the audiences the token is good for; none of
    // ours means the token is not for us (RFC 8693-style replay across services).
    if !audiences.is_empty() {
        let granted = status.audiences.unwrap_or_default();
        if !granted.iter().any(|a| audiences.contains(a)) {
            return Err(DenyReason::InvalidToken.because(format!(
                "TokenReview granted audiences {granted:?}, none of {audiences:?}"
            )));
        }
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    // Usernames identify a principal, they are not credentials.
    let service_account = ServiceAccountRef::from_username(&username)
        .map_err(|e| DenyReason::from(e).because(format!("user {username:?}")))?;
    Ok(Validated {
        identity: WorkloadIdentity {
            service_account,
            uid: user.uid.unwrap_or_default(),
        },
        expires_at: intended_expiry(token),
        validated_at: std::time::Instant::now(),
        from_cache: false,
    })
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
