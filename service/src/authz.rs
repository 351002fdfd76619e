//! The ext_authz `Check` RPC: glue between Envoy's CheckRequest, the decision
//! (`Authorizer::decide`) and the CheckResponse, plus the one log line per decision.

pub mod decision;

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokensmith_proto::envoy::service::auth::v3::{
    CheckRequest, CheckResponse,
    attribute_context::{HttpRequest, Peer},
    authorization_server::Authorization,
};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::deny::{Denial, DenyReason, Side};
use crate::{
    bearer,
    consent::Consent,
    deadline,
    exchange::{
        bounded_lifetime,
        cache::{CachedExchanger, ExchangeKey, Exchanged},
    },
    identity::{Validated, WorkloadIdentity},
    metrics::{CheckLabels, Metrics},
    ratelimit::{Admission, RateLimiter},
    secret::ExchangedToken,
    workload::{WorkloadCluster, Workloads},
};

/// What `decide` concluded.
#[derive(Debug)]
pub enum Outcome {
    /// Forward with the management token.
    Allowed {
        /// The configured name of the workload cluster that vouched for the token.
        workload_cluster: Arc<str>,
        identity: WorkloadIdentity,
        /// The exchanged token.
        token: ExchangedToken,
        /// The lifetime we requested for it.
        lifetime: Duration,
        /// Whether the exchanged token came from the exchange cache.
        cache_hit: bool,
        /// Whether the validation came from the validation cache.
        validation_cached: bool,
        /// How long a proxy may reuse this answer.
        reuse: Duration,
    },
    /// Refuse. `identity` is known when the refusal came after validation.
    Denied {
        /// The workload cluster the token was routed to, when known.
        workload_cluster: Option<Arc<str>>,
        /// Who asked, when known.
        identity: Option<WorkloadIdentity>,
        denial: Denial,
    },
}

/// The exchange itself, independent of gRPC: header in, outcome out. Built from its
/// stages by the server.
#[derive(Clone)]
pub struct Authorizer {
    /// The workload clusters in force.
    pub workloads: Workloads,
    /// TokenRequest, behind the exchange cache.
    pub exchanger: CachedExchanger,
    /// `--rate-limit`, per identity.
    pub limiter: Option<Arc<RateLimiter>>,
    /// `--require-sa-label`.
    pub consent: Option<Consent>,
    /// The longest lifetime requested.
    pub token_expiration: Duration,
    /// The bound on the Kubernetes calls of one Check.
    pub kube_timeout: Duration,
    /// The longest a proxy may reuse an allow: the validation cache's TTL, as long as
    /// we would.
    pub reuse: Duration,
    /// Where every stage counts.
    pub metrics: Arc<Metrics>,
}

impl Authorizer {
    /// Validates the bearer token in `authorization` (from `client_ip`, when known) with
    /// the workload cluster it belongs to, applies that cluster's namespace policy and
    /// exchanges it, with every call done within `budget`.
    pub async fn decide(
        &self,
        authorization: Option<&str>,
        client_ip: Option<IpAddr>,
        budget: Duration,
    ) -> Outcome {
        let deadline = tokio::time::Instant::now() + budget;
        let token = match bearer::parse(authorization) {
            Ok(token) => token,
            Err(e) => return denied(None, None, DenyReason::from(e).into()),
        };
        // The set is read once: a reload during this check does not change its course.
        let cluster = match self.workloads.current().select(&token) {
            Ok(cluster) => cluster,
            Err(denial) => return denied(None, None, denial),
        };
        let source = Some(cluster.name().clone());
        let validation = cluster.validate(&token, client_ip);
        let review = match within(deadline, budget, Side::Workload, validation).await {
            Ok(validated) => validated,
            Err(denial) => return denied(source, None, denial),
        };
        match self.grant(&cluster, &review, deadline, budget).await {
            Ok(grant) => Outcome::Allowed {
                workload_cluster: cluster.name().clone(),
                validation_cached: review.from_cache,
                identity: review.identity,
                token: grant.exchanged.token,
                lifetime: grant.lifetime,
                cache_hit: grant.exchanged.cache_hit,
                reuse: grant.reuse,
            },
            Err(denial) => denied(source, Some(review.identity), denial),
        }
    }

    /// Everything after validation, each step able to refuse the identity: the cluster's
    /// namespace policy, consent, the rate limit, the lifetime rule and the exchange.
    async fn grant(
        &self,
        cluster: &WorkloadCluster,
        review: &Validated,
        deadline: tokio::time::Instant,
        budget: Duration,
    ) -> Result<Grant, Denial> {
        let identity = &review.identity;
        cluster.admit(identity)?;
        // Before the exchange cache too: removing the label stops cached tokens at once.
        if let Some(consent) = &self.consent {
            consent.check(&identity.service_account)?;
        }
        let near_limit = self.admit(cluster, identity).await?;
        let remaining = match review
            .expires_at
            .map(|at| at.duration_since(SystemTime::now()))
        {
            None => None,
            Some(Ok(left)) => Some(left),
            // A JWKS cluster accepted it within its configured leeway (clock skew): the
            // TokenRequest minimum is then the exchanged token's whole life.
            Some(Err(_)) if !cluster.uses_token_review() => Some(Duration::ZERO),
            // The API server accepted it a moment ago, but it has expired since.
            Some(Err(_)) => {
                return Err(DenyReason::InvalidToken.because("token expired during the review"));
            }
        };
        let lifetime = bounded_lifetime(self.token_expiration, remaining);
        // Reusable while our own verdict would be: never near the rate limit, never past
        // the validation's age limit or the workload token's life.
        let reuse = if near_limit {
            Duration::ZERO
        } else {
            let fresh_for = self.reuse.saturating_sub(review.validated_at.elapsed());
            remaining.map_or(fresh_for, |left| fresh_for.min(left))
        };
        let key = ExchangeKey {
            source: cluster.name().to_string(),
            uid: identity.uid.clone(),
            service_account: identity.service_account.clone(),
        };
        let exchange = self.exchanger.exchange(key, lifetime);
        let exchanged = within(deadline, budget, Side::Management, exchange).await?;
        Ok(Grant {
            exchanged,
            lifetime,
            reuse,
        })
    }

    /// `--rate-limit`: whether this identity may go on, and whether it is near its limit
    /// (then no proxy may reuse the answer).
    async fn admit(
        &self,
        cluster: &WorkloadCluster,
        identity: &WorkloadIdentity,
    ) -> Result<bool, Denial> {
        let Some(limiter) = &self.limiter else {
            return Ok(false);
        };
        match limiter
            .admit(cluster.name(), &identity.service_account)
            .await
        {
            Admission::Allowed { near_limit } => Ok(near_limit),
            Admission::Throttled { retry_after } => {
                self.metrics.rate_limited.inc();
                let seconds = u32::try_from(retry_after.as_secs())
                    .unwrap_or(u32::MAX)
                    .saturating_add(1);
                Err(DenyReason::Throttled(seconds).into())
            }
        }
    }
}

/// What the exchange gave an identity, and for how long.
struct Grant {
    exchanged: Exchanged,
    lifetime: Duration,
    reuse: Duration,
}

/// `call`'s answer, or a deadline refusal naming `side` when `deadline` comes first.
async fn within<T>(
    deadline: tokio::time::Instant,
    budget: Duration,
    side: Side,
    call: impl std::future::Future<Output = Result<T, Denial>>,
) -> Result<T, Denial> {
    tokio::time::timeout_at(deadline, call)
        .await
        .unwrap_or_else(|_| Err(out_of_time(side, budget)))
}

fn denied(
    workload_cluster: Option<Arc<str>>,
    identity: Option<WorkloadIdentity>,
    denial: Denial,
) -> Outcome {
    Outcome::Denied {
        workload_cluster,
        identity,
        denial,
    }
}

/// The client's IP as the proxy saw it (`attributes.source.address`), if it is one.
fn source_ip(peer: Option<&Peer>) -> Option<IpAddr> {
    peer?
        .address
        .as_ref()?
        .socket_address
        .as_ref()?
        .address
        .parse()
        .ok()
}

fn out_of_time(cluster: Side, budget: Duration) -> Denial {
    DenyReason::DeadlineExceeded(cluster)
        .because(format!("no answer within the check budget of {budget:?}"))
}

/// The tonic service Envoy calls.
pub struct AuthzService {
    authorizer: Authorizer,
}

impl AuthzService {
    /// Serves `authorizer` over gRPC.
    pub fn new(authorizer: Authorizer) -> Self {
        Self { authorizer }
    }
}

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let started = Instant::now();
        let m = &self.authorizer.metrics;
        let _in_flight = InFlight::enter(m.clone());
        let grpc_timeout = request
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok());
        let budget = deadline::budget(self.authorizer.kube_timeout, grpc_timeout);
        // Never Debug-print the request: its headers carry the token.
        let attributes = request.into_inner().attributes.unwrap_or_default();
        let source = source_ip(attributes.source.as_ref());
        let http = attributes.request.and_then(|r| r.http).unwrap_or_default();
        let request_id = request_id(&http);
        let outcome = match authorization_header(&http) {
            Ok(header) => {
                self.authorizer
                    .decide(header.as_deref(), source, budget)
                    .await
            }
            Err(denial) => denied(None, None, denial),
        };
        let latency = started.elapsed();
        log_decision(&outcome, &request_id, latency);
        let labels = match &outcome {
            Outcome::Allowed { .. } => CheckLabels {
                decision: "allow",
                reason: "ok",
            },
            Outcome::Denied { denial, .. } => CheckLabels {
                decision: "deny",
                reason: denial.reason.as_str(),
            },
        };
        m.checks.get_or_create(&labels).inc();
        m.check_duration.observe(latency.as_secs_f64());
        Ok(Response::new(match &outcome {
            Outcome::Allowed { token, reuse, .. } => decision::allow(token, *reuse),
            Outcome::Denied { denial, .. } => decision::deny(denial.reason),
        }))
    }
}

/// Counts a check in flight until dropped, also when Envoy gives up on it mid-way.
struct InFlight(Arc<Metrics>);

impl InFlight {
    fn enter(metrics: Arc<Metrics>) -> Self {
        metrics.checks_in_flight.inc();
        InFlight(metrics)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.checks_in_flight.dec();
    }
}

/// The `authorization` header, from the header map Envoy sends by default or from the
/// raw header list it sends with `encode_raw_headers`. More than one is malformed.
fn authorization_header(http: &HttpRequest) -> Result<Option<String>, Denial> {
    if let Some(value) = http.headers.get("authorization") {
        return Ok(Some(value.clone()));
    }
    let mut found = http
        .header_map
        .iter()
        .flat_map(|m| &m.headers)
        .filter(|h| h.key.eq_ignore_ascii_case("authorization"));
    let Some(first) = found.next() else {
        return Ok(None);
    };
    let malformed = |detail: &str| DenyReason::MalformedToken.because(detail);
    if found.next().is_some() {
        return Err(malformed("more than one authorization header"));
    }
    if !first.value.is_empty() {
        return Ok(Some(first.value.clone()));
    }
    String::from_utf8(first.raw_value.clone())
        .map(Some)
        .map_err(|_| malformed("authorization header is not UTF-8"))
}

fn request_id(http: &HttpRequest) -> String {
    if http.id.is_empty() {
        http.headers
            .get("x-request-id")
            .cloned()
            .unwrap_or_default()
    } else {
        http.id.clone()
    }
}

/// One line per decision. Fields only; never a token.
fn log_decision(outcome: &Outcome, request_id: &str, latency: Duration) {
    let latency_ms = latency.as_secs_f64() * 1000.0;
    match outcome {
        Outcome::Allowed {
            workload_cluster,
            identity,
            token,
            lifetime,
            cache_hit,
            validation_cached,
            reuse,
        } => {
            let expires_in_s = token
                .expires_at
                .duration_since(SystemTime::now())
                .map_or(0, |d| d.as_secs());
            info!(
                decision = "allow",
                workload_cluster = &**workload_cluster,
                namespace = identity.service_account.namespace(),
                service_account = identity.service_account.name(),
                uid = %identity.uid,
                requested_lifetime_s = lifetime.as_secs(),
                expires_in_s,
                cache_hit,
                validation_cached,
                reuse_s = reuse.as_secs(),
                request_id,
                latency_ms,
                "check decided"
            );
        }
        Outcome::Denied {
            workload_cluster,
            identity,
            denial,
        } => {
            let reason = denial.reason.as_str();
            let workload_cluster = workload_cluster.as_deref().unwrap_or("");
            let cluster = denial.reason.cluster().map_or("", Side::as_str);
            let detail = denial.detail.as_deref().unwrap_or("");
            let status = denial.reason.status().0 as i32;
            // A dependency failure is the operator's problem: warn. A refused client: info.
            macro_rules! decided {
                ($level:ident) => {
                    match identity {
                        Some(id) => $level!(
                            decision = "deny", reason, status, cluster, workload_cluster, detail,
                            namespace = id.service_account.namespace(),
                            service_account = id.service_account.name(),
                            uid = %id.uid, request_id, latency_ms, "check decided"
                        ),
                        None => $level!(
                            decision = "deny", reason, status, cluster, workload_cluster, detail,
                            request_id, latency_ms, "check decided"
                        ),
                    }
                };
            }
            if status == 503 {
                decided!(warn)
            } else {
                decided!(info)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokensmith_proto::envoy::config::core::v3::{HeaderMap, HeaderValue};

    use super::*;

    fn raw(pairs: &[(&str, &[u8])]) -> HttpRequest {
        HttpRequest {
            header_map: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).into(),
                        value: String::new(),
                        raw_value: v.to_vec(),
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn header_comes_from_the_header_map() {
        let http = HttpRequest {
            headers: [("authorization".to_string(), "Bearer a".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(authorization_header(&http), Ok(Some("Bearer a".into())));
    }

    #[test]
    fn header_comes_from_raw_headers_when_envoy_sends_them() {
        let http = raw(&[("x-other", b"1"), ("Authorization", b"Bearer a")]);
        assert_eq!(authorization_header(&http), Ok(Some("Bearer a".into())));
    }

    #[test]
    fn two_raw_authorization_headers_are_malformed() {
        let http = raw(&[
            ("authorization", b"Bearer a"),
            ("authorization", b"Bearer b"),
        ]);
        assert_eq!(
            authorization_header(&http).unwrap_err().reason,
            DenyReason::MalformedToken
        );
    }

    #[test]
    fn non_utf8_raw_header_is_malformed() {
        let http = raw(&[("authorization", b"Bearer \xff")]);
        assert_eq!(
            authorization_header(&http).unwrap_err().reason,
            DenyReason::MalformedToken
        );
    }

    #[test]
    fn no_header_is_none() {
        assert_eq!(authorization_header(&HttpRequest::default()), Ok(None));
    }

    #[test]
    fn request_id_prefers_envoys_id() {
        let mut http = HttpRequest {
            headers: [("x-request-id".to_string(), "h".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(request_id(&http), "h");
        http.id = "e".into();
        assert_eq!(request_id(&http), "e");
    }
}
