//! The real `tokensmith authz` binary over gRPC against two fake API servers: the
//! exchange, every denial, time limits, health, shutdown and the no-token-in-logs rule.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use tokensmith_proto::envoy::{
    config::core::v3::{HeaderMap, HeaderValue, header_value_option::HeaderAppendAction},
    service::auth::v3::{CheckResponse, check_response::HttpResponse},
};
use tokensmith_tests::{
    Endpoint, FakeCluster, Fault, Rights, ServiceAccount,
    companion::{ClusterPair, Companion, envoy_like_check},
};
use tonic_health::pb::health_check_response::ServingStatus;

/// Two clusters with `app-prod/eso-sa` in both, and a companion between them.
pub struct World {
    pub workload: FakeCluster,
    pub management: FakeCluster,
    pub workload_sa: ServiceAccount,
    pub management_sa: ServiceAccount,
    pub companion: Companion,
}

impl World {
    /// Starts everything; the companion with least-privilege callers on both sides.
    pub async fn start(extra: &[&str]) -> Result<World> {
        let ClusterPair {
            workload,
            management,
            workload_sa,
            management_sa,
            reviewer,
            minter,
        } = ClusterPair::start().await?;
        let companion = Companion::start_serving(&reviewer, &minter, extra).await?;
        Ok(World {
            workload,
            management,
            workload_sa,
            management_sa,
            companion,
        })
    }

    /// A fresh workload token of `app-prod/eso-sa` living `lifetime`.
    pub fn workload_token(&self, lifetime: Duration) -> String {
        self.workload
            .mint(&self.workload_sa)
            .expiring_in(lifetime)
            .sign()
    }

    pub async fn check_bearer(&self, token: &str) -> Result<CheckResponse> {
        Ok(self.companion.check_bearer(token).await?)
    }
}

/// What a denial looks like on the wire.
#[derive(Debug)]
pub struct Denied {
    pub grpc: i32,
    pub http: i32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

pub fn denied(response: &CheckResponse) -> Result<Denied> {
    let Some(HttpResponse::DeniedResponse(d)) = &response.http_response else {
        bail!("expected a denial, got {:?}", response.status);
    };
    Ok(Denied {
        grpc: response.status.as_ref().map_or(0, |s| s.code),
        http: d.status.as_ref().map_or(0, |s| s.code),
        headers: d
            .headers
            .iter()
            .filter_map(|h| h.header.as_ref().map(|h| (h.key.clone(), h.value.clone())))
            .collect(),
        body: d.body.clone(),
    })
}

/// The management token an allow puts in `authorization`.
pub fn allowed_token(response: &CheckResponse) -> Result<String> {
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        bail!("expected an allow, got status {:?}", response.status);
    };
    anyhow::ensure!(
        response.status.as_ref().map_or(-1, |s| s.code) == 0,
        "status not OK"
    );
    let [option] = ok.headers.as_slice() else {
        bail!(
            "expected exactly one header mutation, got {}",
            ok.headers.len()
        );
    };
    anyhow::ensure!(option.append.is_none(), "append must stay unset");
    anyhow::ensure!(
        option.append_action == HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        "append_action must be OVERWRITE_IF_EXISTS_OR_ADD"
    );
    let header = option.header.as_ref().context("header")?;
    anyhow::ensure!(header.key == "authorization", "header {}", header.key);
    header
        .value
        .strip_prefix("Bearer ")
        .map(str::to_owned)
        .context("value is not `Bearer <token>`")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn assert_denied(
    world: &World,
    response: &CheckResponse,
    http: i32,
    grpc: i32,
    reason: &str,
) -> Result<Denied> {
    let d = denied(response)?;
    assert_eq!((d.http, d.grpc), (http, grpc), "{d:?}");
    assert!(!d.body.is_empty());
    let last = world.companion.last_decision().await?;
    assert_eq!(last["decision"], "deny");
    assert_eq!(last["reason"], reason, "{last}");
    Ok(d)
}

#[tokio::test]
async fn exchange_keeps_namespace_and_name_and_uses_the_management_issuer() -> Result<()> {
    let world = World::start(&[]).await?;
    let workload_token = world.workload_token(Duration::from_secs(7200));
    let response = world.check_bearer(&workload_token).await?;
    let exchanged = allowed_token(&response)?;
    // Compared, never printed: a failing assert_ne! would put both tokens in the output.
    assert!(exchanged != workload_token, "the workload token came back");

    let w = world.workload.verify(&workload_token)?;
    let m = world
        .management
        .verify(&exchanged)
        .context("management must have signed it")?;
    assert!(world.workload.verify(&exchanged).is_err());
    assert_eq!(m.sub, w.sub);
    assert_eq!(m.sub, "system:serviceaccount:app-prod:eso-sa");
    assert_eq!(
        (m.namespace.as_str(), m.service_account_name.as_str()),
        ("app-prod", "eso-sa")
    );
    assert_eq!(m.iss, world.management.issuer());
    assert_ne!(m.jti, w.jti);
    assert_eq!(m.service_account_uid, world.management_sa.uid);
    assert_ne!(m.service_account_uid, w.service_account_uid);
    // No --audiences: the management API server's own audiences.
    assert_eq!(m.aud, world.management.api_audiences());

    // Exactly one TokenRequest, for the same namespace/name, for --token-expiration.
    let requests: Vec<_> = world
        .management
        .calls()
        .into_iter()
        .filter(|c| c.endpoint == Endpoint::TokenRequest)
        .collect();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        requests[0].path,
        "/api/v1/namespaces/app-prod/serviceaccounts/eso-sa/token"
    );
    assert_eq!(requests[0].caller.as_deref(), Some("tokensmith"));
    let spec = requests[0].token_request.clone().context("spec recorded")?;
    assert_eq!(spec.expiration_seconds, Some(3600));
    assert!(spec.audiences.is_empty());
    assert!(
        (m.exp - now() - 3600).abs() <= 5,
        "exp {} now {}",
        m.exp,
        now()
    );
    assert_eq!(world.workload.count(Endpoint::TokenReview), 1);

    let line = world.companion.last_decision().await?;
    assert_eq!(line["decision"], "allow");
    assert_eq!(line["namespace"], "app-prod");
    assert_eq!(line["service_account"], "eso-sa");
    assert_eq!(line["uid"], world.workload_sa.uid.as_str());
    assert!(line["latency_ms"].is_number());
    Ok(())
}

#[tokio::test]
async fn configured_audiences_are_requested_and_carried_by_the_exchanged_token() -> Result<()> {
    let world = World::start(&["--audiences", "https://mgmt.example.com,vault"]).await?;
    let response = world
        .check_bearer(&world.workload_token(Duration::from_secs(3600)))
        .await?;
    let claims = world.management.verify(&allowed_token(&response)?)?;
    assert_eq!(claims.aud, ["https://mgmt.example.com", "vault"]);
    let spec = world
        .management
        .calls()
        .into_iter()
        .find_map(|c| c.token_request)
        .context("request")?;
    assert_eq!(spec.audiences, ["https://mgmt.example.com", "vault"]);
    Ok(())
}

#[tokio::test]
async fn lifetime_is_bounded_by_the_workload_token_with_the_api_minimum_as_floor() -> Result<()> {
    // Without the exchange cache and with it (the default): longest first, so a cache
    // that ignored the rule would hand each shorter token the longer one's exchange.
    for flags in [&["--cache-max-entries", "0"][..], &[]] {
        lifetimes_follow_the_rule(&World::start(flags).await?)
            .await
            .with_context(|| format!("companion {flags:?}"))?;
    }
    Ok(())
}

/// Each workload token of one identity leads to a TokenRequest for its own bounded
/// lifetime, and the exchanged token never outlives it past the API's 600 s floor.
async fn lifetimes_follow_the_rule(world: &World) -> Result<()> {
    let cases = [
        // (workload token lifetime, expected requested lifetime)
        (Duration::from_secs(4 * 3600), 3600),
        (Duration::from_secs(900), 900),
        (Duration::from_secs(120), 600),
    ];
    for (lifetime, want) in cases {
        world.management.clear_calls();
        let workload_token = world.workload_token(lifetime);
        let w = world.workload.verify(&workload_token)?;
        let m = world
            .management
            .verify(&allowed_token(&world.check_bearer(&workload_token).await?)?)?;
        let spec = world
            .management
            .calls()
            .into_iter()
            .find_map(|c| c.token_request)
            .context("request")?;
        let asked = spec.expiration_seconds.context("expirationSeconds")?;
        assert!(
            (asked - want).abs() <= 2,
            "workload {lifetime:?}: asked {asked}, want {want}"
        );
        // Never more than the 600 s floor past the workload token.
        assert!(
            m.exp <= w.exp.max(now() + 600) + 2,
            "m.exp {} w.exp {}",
            m.exp,
            w.exp
        );
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_long_and_short_lived_tokens_of_one_identity_each_keep_the_lifetime_rule()
-> Result<()> {
    let world = World::start(&[]).await?;
    // Slow TokenRequests, so the short token's miss arrives while the long one's is out.
    world.management.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenRequest),
        delay: Duration::from_millis(600),
    });
    let long = world.workload_token(Duration::from_secs(3600));
    let short = world.workload_token(Duration::from_secs(700));
    let long_check = world.check_bearer(&long);
    let short_check = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        world.check_bearer(&short).await
    };
    let (long_reply, short_reply) = tokio::join!(long_check, short_check);
    for (workload, reply) in [(&long, long_reply?), (&short, short_reply?)] {
        let w = world.workload.verify(workload)?;
        let m = world.management.verify(&allowed_token(&reply)?)?;
        // Never more than the 600 s floor (here: never at all) past the workload token.
        assert!(
            m.exp <= w.exp.max(now() + 600) + 5,
            "exchanged token outlives its workload token by {} s",
            m.exp - w.exp
        );
    }
    // And a later hit for the short token is not the long token's cached exchange.
    let again = world
        .management
        .verify(&allowed_token(&world.check_bearer(&short).await?)?)?;
    assert!(again.exp <= world.workload.verify(&short)?.exp + 5);
    Ok(())
}

#[tokio::test]
async fn warnafter_of_an_extended_token_bounds_the_lifetime() -> Result<()> {
    let world = World::start(&[]).await?;
    let token = world
        .workload
        .mint(&world.workload_sa)
        .expiring_in(Duration::from_secs(365 * 24 * 3600))
        .warn_after(SystemTime::now() + Duration::from_secs(1200))
        .sign();
    allowed_token(&world.check_bearer(&token).await?)?;
    let spec = world
        .management
        .calls()
        .into_iter()
        .find_map(|c| c.token_request)
        .context("request")?;
    let asked = spec.expiration_seconds.context("expirationSeconds")?;
    assert!((asked - 1200).abs() <= 2, "asked {asked}");
    Ok(())
}

#[tokio::test]
async fn service_account_missing_in_management_is_forbidden() -> Result<()> {
    let world = World::start(&[]).await?;
    let ghost = world.workload.add_service_account("app-prod", "ghost");
    let token = world.workload.mint(&ghost).sign();
    let response = world.check_bearer(&token).await?;
    let d = assert_denied(&world, &response, 403, 7, "unknown_service_account").await?;
    assert_eq!(
        d.body,
        "service account not found in the management cluster"
    );
    let calls: Vec<_> = world
        .management
        .calls()
        .into_iter()
        .filter(|c| c.endpoint != Endpoint::Version)
        .collect();
    assert_eq!(
        calls.len(),
        1,
        "only the TokenRequest, no GET first: {calls:?}"
    );
    assert_eq!(
        (calls[0].endpoint, calls[0].status),
        (Endpoint::TokenRequest, 404)
    );
    Ok(())
}

#[tokio::test]
async fn invalid_workload_tokens_are_unauthorized() -> Result<()> {
    let world = World::start(&[]).await?;
    let stranger = FakeCluster::start("stranger").await?;
    let stranger_sa = stranger.add_service_account("app-prod", "eso-sa");
    // The workload cluster's issuer, but keys it never published.
    let forger = FakeCluster::builder("forger")
        .issuer(world.workload.issuer())
        .signing_key(3)
        .start()
        .await?;
    let forged_sa = forger.add_service_account("app-prod", "eso-sa");
    let cases = [
        ("garbage", "not-a-jwt".to_owned(), "invalid_token"),
        (
            "expired",
            world.workload.mint(&world.workload_sa).expired().sign(),
            "invalid_token",
        ),
        // The discovered issuer refuses it before any review.
        (
            "foreign issuer",
            stranger.mint(&stranger_sa).sign(),
            "unknown_issuer",
        ),
        (
            "unpublished key",
            forger.mint(&forged_sa).sign(),
            "invalid_token",
        ),
        (
            "wrong audience",
            world
                .workload
                .mint(&world.workload_sa)
                .audiences(vec!["elsewhere".into()])
                .sign(),
            "invalid_token",
        ),
    ];
    for (what, token, reason) in cases {
        let response = world.check_bearer(&token).await?;
        let d = assert_denied(&world, &response, 401, 16, reason)
            .await
            .context(what)?;
        assert!(
            d.headers.contains(&(
                "www-authenticate".into(),
                "Bearer error=\"invalid_token\"".into()
            )),
            "{what}: {d:?}"
        );
    }
    assert_eq!(world.management.count(Endpoint::TokenRequest), 0);
    Ok(())
}

#[tokio::test]
async fn token_of_a_deleted_service_account_is_unauthorized() -> Result<()> {
    let world = World::start(&[]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    world.workload.delete_service_account("app-prod", "eso-sa");
    let response = world.check_bearer(&token).await?;
    assert_denied(&world, &response, 401, 16, "invalid_token").await?;
    Ok(())
}

#[tokio::test]
async fn a_user_that_is_not_a_service_account_is_forbidden() -> Result<()> {
    // Users authenticate with another issuer's tokens (OIDC): with every issuer
    // reviewed, the API server accepts the user and the companion refuses it.
    let world = World::start(&["--workload-issuer", "*"]).await?;
    let response = world
        .check_bearer(&world.workload.mint_user("alice"))
        .await?;
    assert_denied(&world, &response, 403, 7, "not_service_account").await?;
    assert_eq!(world.management.count(Endpoint::TokenRequest), 0);
    assert_eq!(world.workload.count(Endpoint::TokenReview), 1);
    Ok(())
}

#[tokio::test]
async fn the_discovered_issuer_refuses_other_issuers_before_a_review_and_admits_legacy_tokens()
-> Result<()> {
    let world = World::start(&[]).await?;
    let discovered = world
        .companion
        .log_records()
        .await?
        .into_iter()
        .find(|r| {
            r["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("workload issuer discovered"))
        })
        .context("no discovery logged")?;
    assert_eq!(discovered["issuer"], world.workload.issuer());
    let response = world
        .check_bearer(&world.workload.mint_user("alice"))
        .await?;
    assert_denied(&world, &response, 401, 16, "unknown_issuer").await?;
    assert_eq!(world.workload.count(Endpoint::TokenReview), 0);
    // Legacy Secret-based tokens carry `kubernetes/serviceaccount`: the API server
    // decides. It accepts one while its Secret holds it, and refuses it once the Secret
    // is gone (as clusters that cleaned them up do).
    let legacy = world
        .workload
        .mint(&world.workload_sa)
        .legacy("eso-sa-token-x7k2p")
        .sign();
    world
        .workload
        .add_secret("app-prod", "eso-sa-token-x7k2p", &[("token", &legacy)]);
    let exchanged = allowed_token(&world.check_bearer(&legacy).await?)?;
    assert_eq!(
        world.management.verify(&exchanged)?.sub,
        "system:serviceaccount:app-prod:eso-sa"
    );
    let orphan = world
        .workload
        .mint(&world.workload_sa)
        .legacy("eso-sa-token-deleted")
        .sign();
    let response = world.check_bearer(&orphan).await?;
    assert_denied(&world, &response, 401, 16, "invalid_token").await?;
    assert_eq!(world.workload.count(Endpoint::TokenReview), 2);
    Ok(())
}

#[tokio::test]
async fn without_issuer_discovery_every_issuer_is_reviewed_and_a_warning_says_so() -> Result<()> {
    let pair = ClusterPair::start().await?;
    pair.workload.inject(Fault::Status {
        endpoint: Some(Endpoint::OpenIdConfiguration),
        code: 404,
    });
    let companion = Companion::start_serving(&pair.reviewer, &pair.minter, &[]).await?;
    assert!(
        companion
            .logs()
            .await?
            .contains("the workload API server announces no issuer"),
        "a warning names the gap"
    );
    let user = pair.workload.mint_user("alice");
    let d = denied(&companion.check_bearer(&user).await?)?;
    assert_eq!(d.http, 403, "{d:?}");
    assert_eq!(pair.workload.count(Endpoint::TokenReview), 1);
    Ok(())
}

#[tokio::test]
async fn system_namespaces_are_never_mapped_even_with_a_single_kubeconfig() -> Result<()> {
    let world = World::start(&["--companion-namespace", "tokensmith-system"]).await?;
    for namespace in ["kube-system", "istio-system", "tokensmith-system"] {
        let sa = world.workload.add_service_account(namespace, "admin-sa");
        world.management.add_service_account(namespace, "admin-sa");
        let response = world.check_bearer(&world.workload.mint(&sa).sign()).await?;
        assert_denied(&world, &response, 403, 7, "namespace_not_allowed")
            .await
            .context(namespace)?;
    }
    assert_eq!(world.management.count(Endpoint::TokenRequest), 0);
    Ok(())
}

#[tokio::test]
async fn missing_or_malformed_headers_are_unauthorized_without_calling_kubernetes() -> Result<()> {
    let world = World::start(&[]).await?;
    let response = world.companion.check(&[]).await?;
    let d = assert_denied(&world, &response, 401, 16, "missing_token").await?;
    assert!(
        d.headers
            .contains(&("www-authenticate".into(), "Bearer".into()))
    );
    assert_eq!(d.body, "missing bearer token");
    for header in [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer a b",
        "bearer  x",
        "Bearer a,Bearer b",
    ] {
        let response = world.companion.check(&[("authorization", header)]).await?;
        assert_denied(&world, &response, 401, 16, "malformed_token")
            .await
            .context(header)?;
    }
    assert_eq!(world.workload.count(Endpoint::TokenReview), 0);
    Ok(())
}

#[tokio::test]
async fn raw_header_list_from_encode_raw_headers_is_read() -> Result<()> {
    let world = World::start(&[]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    let mut request = envoy_like_check(&[]);
    let http = request
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .context("http")?;
    http.headers.clear();
    http.header_map = Some(HeaderMap {
        headers: vec![HeaderValue {
            key: "authorization".into(),
            value: String::new(),
            raw_value: format!("Bearer {token}").into_bytes(),
        }],
    });
    let response = world.companion.check_request(request, None).await?;
    world.management.verify(&allowed_token(&response)?)?;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_api_server_is_service_unavailable() -> Result<()> {
    let world = World::start(&[]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    world.management.inject(Fault::Refuse);
    let response = world.check_bearer(&token).await?;
    assert_denied(&world, &response, 503, 14, "unavailable").await?;
    world.management.clear_faults();

    world.workload.inject(Fault::Refuse);
    // A token the companion has not reviewed yet (the first one's review is cached).
    let token = world.workload_token(Duration::from_secs(3599));
    let response = world.check_bearer(&token).await?;
    assert_denied(&world, &response, 503, 14, "unavailable").await?;
    let line = world.companion.last_decision().await?;
    assert_eq!(line["cluster"], "workload");
    assert_eq!(line["level"], "WARN");
    Ok(())
}

#[tokio::test]
async fn throttling_and_server_errors_are_service_unavailable_without_retries() -> Result<()> {
    let world = World::start(&[]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    for code in [429, 500, 503, 504] {
        world.management.clear_calls();
        world.management.inject(Fault::Status {
            endpoint: Some(Endpoint::TokenRequest),
            code,
        });
        let response = world.check_bearer(&token).await?;
        assert_denied(&world, &response, 503, 14, "unavailable")
            .await
            .context(code)?;
        // kube's own retry of 429/503/504 is off: one call per Check.
        assert_eq!(
            world.management.count(Endpoint::TokenRequest),
            1,
            "code {code}"
        );
    }
    Ok(())
}

/// Every way an API server can fail a Check, each run end to end: 503 naming the side,
/// one call (no retry storm).
#[tokio::test]
async fn api_server_failures_on_either_side_are_503_naming_the_side_with_one_call() -> Result<()> {
    // No caches: every Check reviews and exchanges.
    let world = World::start(&["--validation-cache-ttl", "0", "--cache-max-entries", "0"]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    let tokenless = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 3600},
        "status": {"token": "", "expirationTimestamp": "2030-01-01T00:00:00Z"},
    })
    .to_string();
    let status = |endpoint, code| Fault::Status {
        endpoint: Some(endpoint),
        code,
    };
    let cases = [
        (
            "workload",
            Endpoint::TokenReview,
            status(Endpoint::TokenReview, 429),
        ),
        (
            "workload",
            Endpoint::TokenReview,
            status(Endpoint::TokenReview, 500),
        ),
        (
            "workload",
            Endpoint::TokenReview,
            status(Endpoint::TokenReview, 503),
        ),
        // Our own credentials refused by the management side: not the caller's fault.
        (
            "management",
            Endpoint::TokenRequest,
            status(Endpoint::TokenRequest, 401),
        ),
        (
            "management",
            Endpoint::TokenRequest,
            Fault::Body {
                endpoint: Some(Endpoint::TokenRequest),
                code: 201,
                body: tokenless,
            },
        ),
    ];
    for (side, endpoint, fault) in cases {
        let case = format!("{fault:?}");
        let cluster = match side {
            "workload" => &world.workload,
            _ => &world.management,
        };
        cluster.clear_calls();
        cluster.inject(fault);
        let response = world.check_bearer(&token).await?;
        assert_denied(&world, &response, 503, 14, "unavailable")
            .await
            .context(case.clone())?;
        assert_eq!(
            world.companion.last_decision().await?["cluster"],
            side,
            "{case}"
        );
        assert_eq!(cluster.count(endpoint), 1, "{case}: one call, no retry");
        cluster.clear_faults();
    }
    allowed_token(&world.check_bearer(&token).await?)?;
    Ok(())
}

/// The identity is what the TokenReview says, not what the token claims: an
/// authenticator (a webhook, a renamed account) may map a token to another user, and
/// the API server is the authority in TokenReview mode.
#[tokio::test]
async fn the_reviewed_username_not_the_tokens_claims_names_the_identity() -> Result<()> {
    let world = World::start(&[]).await?;
    let other = world
        .workload
        .add_service_account("app-prod", "reviewed-as");
    world
        .management
        .add_service_account("app-prod", "reviewed-as");
    world.workload.inject(Fault::Body {
        endpoint: Some(Endpoint::TokenReview),
        code: 201,
        body: serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "status": {"authenticated": true, "user": {
                "username": "system:serviceaccount:app-prod:reviewed-as", "uid": other.uid,
            }},
        })
        .to_string(),
    });
    let token = world.workload_token(Duration::from_secs(3600));
    let exchanged = allowed_token(&world.check_bearer(&token).await?)?;
    assert_eq!(
        world.management.verify(&exchanged)?.sub,
        "system:serviceaccount:app-prod:reviewed-as"
    );
    let line = world.companion.last_decision().await?;
    assert_eq!(line["service_account"], "reviewed-as", "{line}");
    Ok(())
}

/// A TokenReview that authenticates a service account whose name is not a valid
/// Kubernetes name (a buggy or hostile authenticator) maps to nothing: 403, no TokenRequest.
#[tokio::test]
async fn an_invalid_service_account_name_from_token_review_is_forbidden() -> Result<()> {
    let world = World::start(&[]).await?;
    for username in [
        "system:serviceaccount:App_Prod:eso-sa",
        "system:serviceaccount:app-prod:eso-sa/../admin",
        "system:serviceaccount:app-prod:",
    ] {
        world.workload.inject(Fault::Body {
            endpoint: Some(Endpoint::TokenReview),
            code: 201,
            body: serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "status": {"authenticated": true, "user": {"username": username, "uid": "u-1"}},
            })
            .to_string(),
        });
        let token = world.workload_token(Duration::from_secs(3600));
        let response = world.check_bearer(&token).await?;
        assert_denied(&world, &response, 403, 7, "invalid_service_account_name")
            .await
            .context(username)?;
    }
    assert_eq!(world.management.arrived(Endpoint::TokenRequest), 0);
    Ok(())
}

/// A management API server whose certificate the companion's CA does not sign: 503,
/// and the detail names the handshake (never a token).
#[tokio::test]
async fn a_tls_failure_to_an_api_server_is_503() -> Result<()> {
    use base64::{Engine, engine::general_purpose::STANDARD};
    let pair = ClusterPair::start().await?;
    let stranger = FakeCluster::start("stranger").await?;
    let mut kubeconfig: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&pair.minter)?)?;
    kubeconfig["clusters"][0]["cluster"]["certificate-authority-data"] =
        STANDARD.encode(stranger.ca_pem()).into();
    let dir = tempfile::tempdir()?;
    let minter = dir.path().join("minter.kubeconfig");
    std::fs::write(&minter, serde_json::to_string(&kubeconfig)?)?;
    let companion = Companion::start(&pair.reviewer, &minter, &[]).await?;
    let token = pair.workload.mint(&pair.workload_sa).sign();
    let d = denied(&companion.check_bearer(&token).await?)?;
    assert_eq!((d.http, d.grpc), (503, 14), "{d:?}");
    let line = companion.last_decision().await?;
    assert_eq!(line["cluster"], "management", "{line}");
    assert_eq!(pair.management.arrived(Endpoint::TokenRequest), 0);
    Ok(())
}

#[tokio::test]
async fn companion_credentials_refused_by_the_workload_cluster_are_service_unavailable()
-> Result<()> {
    let workload = FakeCluster::start("workload").await?;
    let management = FakeCluster::start("management").await?;
    let sa = workload.add_service_account("app-prod", "eso-sa");
    management.add_service_account("app-prod", "eso-sa");
    // Allowed to mint but not to review: a workload-side RBAC mistake, not the client's fault.
    let no_review = workload.kubeconfig_with("tokensmith", Rights::NONE)?;
    let companion = Companion::start_serving(&no_review, management.kubeconfig(), &[]).await?;
    let response = companion
        .check(&[(
            "authorization",
            &format!("Bearer {}", workload.mint(&sa).sign()),
        )])
        .await?;
    let d = denied(&response)?;
    assert_eq!((d.http, d.grpc), (503, 14));
    Ok(())
}

#[tokio::test]
async fn token_request_forbidden_by_management_rbac_is_forbidden() -> Result<()> {
    let workload = FakeCluster::start("workload").await?;
    let management = FakeCluster::start("management").await?;
    let sa = workload.add_service_account("app-prod", "eso-sa");
    management.add_service_account("app-prod", "eso-sa");
    let no_mint = management.kubeconfig_with("tokensmith", Rights::NONE)?;
    let companion = Companion::start_serving(workload.kubeconfig(), &no_mint, &[]).await?;
    let response = companion
        .check(&[(
            "authorization",
            &format!("Bearer {}", workload.mint(&sa).sign()),
        )])
        .await?;
    let d = denied(&response)?;
    assert_eq!(
        (d.http, d.grpc, d.body.as_str()),
        (403, 7, "token exchange forbidden")
    );
    Ok(())
}

#[tokio::test]
async fn a_slow_api_server_runs_into_the_kube_timeout() -> Result<()> {
    let world = World::start(&["--kube-timeout", "300ms"]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    world.workload.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenReview),
        delay: Duration::from_secs(3),
    });
    let started = std::time::Instant::now();
    let response = world.check_bearer(&token).await?;
    let elapsed = started.elapsed();
    assert_denied(&world, &response, 503, 14, "deadline_exceeded").await?;
    assert!(
        elapsed < Duration::from_secs(2),
        "answered after {elapsed:?}"
    );
    let line = world.companion.last_decision().await?;
    assert_eq!(line["cluster"], "workload");
    Ok(())
}

#[tokio::test]
async fn envoys_deadline_wins_over_a_longer_kube_timeout() -> Result<()> {
    let world = World::start(&["--kube-timeout", "10s"]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    world.management.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenRequest),
        delay: Duration::from_secs(5),
    });
    let request = envoy_like_check(&[("authorization", &format!("Bearer {token}"))]);
    let started = std::time::Instant::now();
    // grpc-timeout: 800 ms. The companion must answer (with its 503) before that.
    let response = world
        .companion
        .check_request(request, Some(Duration::from_millis(800)))
        .await?;
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "took {:?}",
        started.elapsed()
    );
    assert_denied(&world, &response, 503, 14, "deadline_exceeded").await?;
    let line = world.companion.last_decision().await?;
    assert_eq!(line["cluster"], "management");
    Ok(())
}

#[tokio::test]
async fn health_is_not_serving_until_both_api_servers_answer() -> Result<()> {
    // The workload side down, the management side down, then both.
    for (workload_down, management_down) in [(true, false), (false, true), (true, true)] {
        let case = format!("workload down: {workload_down}, management down: {management_down}");
        let workload = FakeCluster::start("workload").await?;
        let management = FakeCluster::start("management").await?;
        for (cluster, down) in [(&workload, workload_down), (&management, management_down)] {
            if down {
                cluster.inject(Fault::Refuse);
            }
        }
        let mut companion =
            Companion::start(workload.kubeconfig(), management.kubeconfig(), &[]).await?;
        for service in ["", "envoy.service.auth.v3.Authorization"] {
            assert_eq!(
                companion.health(service).await?,
                ServingStatus::NotServing,
                "{case}, service {service:?}"
            );
        }
        if workload_down && management_down {
            // One side back is not enough: once the companion has seen the management
            // API answer, it still waits for the workload one.
            management.clear_faults();
            companion
                .wait_for_log(Duration::from_secs(15), |r| {
                    r["message"] == "API server reachable" && r["cluster"] == "management"
                })
                .await?;
            assert_eq!(
                companion.health("").await?,
                ServingStatus::NotServing,
                "{case}: only the management API answers"
            );
        }
        workload.clear_faults();
        management.clear_faults();
        companion
            .wait_health(ServingStatus::Serving, Duration::from_secs(15))
            .await
            .with_context(|| case.clone())?;
        assert_eq!(
            companion
                .health("envoy.service.auth.v3.Authorization")
                .await?,
            ServingStatus::Serving,
            "{case}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_check_finish_then_exits_cleanly() -> Result<()> {
    let mut world = World::start(&[]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    world.management.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenRequest),
        delay: Duration::from_millis(800),
    });
    let request = envoy_like_check(&[("authorization", &format!("Bearer {token}"))]);
    let mut client = world.companion.client();
    let in_flight = tokio::spawn(async move { client.check(request).await });
    // Signal once the check is inside the companion (its TokenRequest has arrived and
    // is not answered yet).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while world.management.arrived(Endpoint::TokenRequest) == 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "check never reached the management API"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::ensure!(
        world.management.count(Endpoint::TokenRequest) == 0 && !in_flight.is_finished(),
        "the Check must still be in flight when SIGTERM arrives"
    );
    let exit = world
        .companion
        .process()
        .terminate(Duration::from_secs(12))
        .await?;
    assert!(exit.success(), "exit {exit}");
    let response = in_flight.await??.into_inner();
    world.management.verify(&allowed_token(&response)?)?;
    assert!(world.companion.logs().await?.contains("\"draining\""));
    Ok(())
}

#[tokio::test]
async fn no_token_or_part_of_one_reaches_any_log() -> Result<()> {
    // Both log formats, at debug level; the harness audits every output and /metrics
    // too, this names the cases that would tempt a log line: an allow, an expired token,
    // a user, the API server failing, the token under another scheme.
    for format in ["json", "text"] {
        let world = World::start(&["--log-format", format]).await?;
        let good = world.workload_token(Duration::from_secs(3600));
        allowed_token(&world.check_bearer(&good).await?)?;
        let expired = world.workload.mint(&world.workload_sa).expired().sign();
        world.check_bearer(&expired).await?;
        let user = world.workload.mint_user("alice");
        world.check_bearer(&user).await?;
        world.workload.inject(Fault::Status {
            endpoint: None,
            code: 500,
        });
        world.check_bearer(&good).await?;
        world
            .companion
            .check(&[("authorization", &format!("Basic {good}"))])
            .await?;

        let logs = world.companion.logs().await?;
        let decided = logs.lines().filter(|l| l.contains("check decided")).count();
        ensure!(decided == 5, "{format}: {decided} decision lines of 5");
        ensure!(
            !tokensmith_tests::leak_audit::holds_a_piece(&logs),
            "{}",
            tokensmith_tests::leak_audit::finding(&format!("the {format} log"))
        );
    }
    Ok(())
}

#[tokio::test]
async fn malformed_api_answers_carrying_tokens_are_503_and_never_logged() -> Result<()> {
    // No validation cache: every check asks the (faulty) workload API server.
    let world = World::start(&["--validation-cache-ttl", "0"]).await?;
    let good = world.workload_token(Duration::from_secs(3600));
    let minted = world.management.mint(&world.management_sa).sign();
    // A TokenReview answer that echoes spec.token (as kube-apiserver does) in a shape that
    // does not decode.
    world.workload.inject(Fault::Body {
        endpoint: Some(Endpoint::TokenReview),
        code: 201,
        body: serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": good}, "status": {"authenticated": "yes"}
        })
        .to_string(),
    });
    assert_eq!(denied(&world.check_bearer(&good).await?)?.http, 503);
    world.workload.clear_faults();
    // A TokenRequest answer carrying a minted token, with an expiry that is not a time.
    world.management.inject(Fault::Body {
        endpoint: Some(Endpoint::TokenRequest),
        code: 201,
        body: serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "status": {"token": minted, "expirationTimestamp": 12}
        })
        .to_string(),
    });
    assert_eq!(denied(&world.check_bearer(&good).await?)?.http, 503);
    // The same shapes as error answers (kube-client logs those bodies too).
    world.management.inject(Fault::Body {
        endpoint: Some(Endpoint::TokenRequest),
        code: 500,
        body: format!("{{\"kind\":\"Status\",\"message\":{minted:?},\"code\":\"x\"}}"),
    });
    assert_eq!(denied(&world.check_bearer(&good).await?)?.http, 503);

    assert!(world.companion.decisions().await?.len() >= 3);
    let logs = world.companion.logs().await?;
    ensure!(
        !tokensmith_tests::leak_audit::holds_a_piece(&logs),
        "a piece of a token is in the log"
    );
    Ok(())
}

#[tokio::test]
async fn junk_bearers_never_reach_token_review_and_a_real_check_passes_during_a_flood() -> Result<()>
{
    const JUNK: usize = 500;
    let world = World::start(&[]).await?;
    // A slow workload API server: every TokenReview takes 400 ms.
    world.workload.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenReview),
        delay: Duration::from_millis(400),
    });
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let b64 = |v: &str| URL_SAFE_NO_PAD.encode(v);
    let expired = world.workload.mint(&world.workload_sa).expired().sign();
    let junk: Vec<String> = (0..JUNK)
        .map(|i| match i % 4 {
            0 => format!("junk-{i}-not-a-jwt"),
            1 => format!(
                "{}.{}.",
                b64(r#"{"alg":"none"}"#),
                b64(&format!(r#"{{"n":{i}}}"#))
            ),
            2 => format!(
                "{}.{}.c2ln",
                b64(r#"{"alg":"RS256"}"#),
                b64(&format!("[{i}]"))
            ),
            _ => expired.clone(),
        })
        .collect();
    let mut flood = tokio::task::JoinSet::new();
    for token in junk {
        let mut client = world.companion.client();
        flood.spawn(async move {
            let header = format!("Bearer {token}");
            let request =
                tokensmith_tests::companion::envoy_like_check(&[("authorization", &header)]);
            client.check(request).await.map(|r| r.into_inner())
        });
    }
    // The legitimate check runs while the flood is in flight, within Envoy's deadline.
    let good = world.workload_token(Duration::from_secs(3600));
    let mut request = tonic::Request::new(tokensmith_tests::companion::envoy_like_check(&[(
        "authorization",
        &format!("Bearer {good}"),
    )]));
    request.set_timeout(Duration::from_secs(2));
    let reply = world.companion.client().check(request).await?.into_inner();
    allowed_token(&reply)?;
    let mut refused = 0;
    while let Some(answer) = flood.join_next().await {
        assert_eq!(denied(&answer??)?.http, 401);
        refused += 1;
    }
    assert_eq!(refused, JUNK);
    assert_eq!(
        world.workload.count(Endpoint::TokenReview),
        1,
        "only the real token was reviewed"
    );
    Ok(())
}

#[tokio::test]
async fn workload_audiences_are_required_of_the_token_and_of_the_review() -> Result<()> {
    let world = World::start(&["--workload-audiences", "tokensmith"]).await?;
    // A pod's default token (the API server's audience) is not for us.
    let default = world.workload_token(Duration::from_secs(3600));
    assert_eq!(denied(&world.check_bearer(&default).await?)?.http, 401);
    let review = world
        .workload
        .calls()
        .into_iter()
        .find(|c| c.endpoint == Endpoint::TokenReview)
        .context("a TokenReview")?;
    let spec = review.token_review.context("the review's spec")?;
    assert_eq!(spec.audiences, ["tokensmith"], "asked for our audience");
    // A projected token for our audience passes.
    let ours = world
        .workload
        .mint(&world.workload_sa)
        .audiences(vec!["tokensmith".into()])
        .sign();
    allowed_token(&world.check_bearer(&ours).await?)?;
    // An API server that says yes without naming the audience is not audience-aware.
    world.workload.inject(Fault::Body {
        endpoint: Some(Endpoint::TokenReview),
        code: 201,
        body: serde_json::json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "status": {"authenticated": true, "user": {
                "username": "system:serviceaccount:app-prod:eso-sa", "uid": world.workload_sa.uid
            }}
        })
        .to_string(),
    });
    let fresh = world
        .workload
        .mint(&world.workload_sa)
        .audiences(vec!["tokensmith".into()])
        .sign();
    let d = assert_denied(
        &world,
        &world.check_bearer(&fresh).await?,
        401,
        16,
        "invalid_token",
    )
    .await?;
    assert_eq!(d.body, "invalid or expired token");
    Ok(())
}

#[tokio::test]
async fn allowed_namespaces_limit_the_mapping_in_single_mode() -> Result<()> {
    let world = World::start(&["--allow-namespaces", "team-*,kube-system"]).await?;
    // app-prod is not allowed.
    let token = world.workload_token(Duration::from_secs(3600));
    assert_denied(
        &world,
        &world.check_bearer(&token).await?,
        403,
        7,
        "namespace_not_allowed",
    )
    .await?;
    for ns in ["team-a", "kube-system"] {
        let sa = world.workload.add_service_account(ns, "sa");
        world.management.add_service_account(ns, "sa");
        allowed_token(&world.check_bearer(&world.workload.mint(&sa).sign()).await?)
            .with_context(|| format!("{ns} is allowed"))?;
    }
    // Protected namespaces stay refused unless named literally.
    let sa = world.workload.add_service_account("istio-system", "sa");
    world.management.add_service_account("istio-system", "sa");
    let token = world.workload.mint(&sa).sign();
    assert_denied(
        &world,
        &world.check_bearer(&token).await?,
        403,
        7,
        "namespace_not_allowed",
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn well_formed_unknown_tokens_get_few_review_turns_and_cached_identities_pass() -> Result<()>
{
    const FLOOD: usize = 100;
    let world = World::start(&["--review-max-in-flight", "4"]).await?;
    let good = world.workload_token(Duration::from_secs(3600));
    allowed_token(&world.check_bearer(&good).await?)?; // now in the validation cache
    world.workload.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenReview),
        delay: Duration::from_millis(400),
    });
    // Well-formed, unexpired, of the right issuer, but signed by keys nobody trusts:
    // each needs a review.
    let stranger = FakeCluster::builder("stranger")
        .issuer(world.workload.issuer())
        .signing_key(3)
        .start()
        .await?;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        let sa = stranger.add_service_account("app-prod", &format!("sa-{i}"));
        let header = format!("Bearer {}", stranger.mint(&sa).sign());
        let mut client = world.companion.client();
        flood.spawn(async move {
            let request =
                tokensmith_tests::companion::envoy_like_check(&[("authorization", &header)]);
            client.check(request).await.map(|r| r.into_inner())
        });
    }
    // The cached identity needs no turn: it passes at once during the flood.
    let started = std::time::Instant::now();
    allowed_token(&world.check_bearer(&good).await?)?;
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let mut statuses = std::collections::BTreeMap::<i32, usize>::new();
    while let Some(answer) = flood.join_next().await {
        let d = denied(&answer??)?;
        if d.http == 429 {
            assert!(d.headers.contains(&("retry-after".into(), "1".into())));
        }
        *statuses.entry(d.http).or_default() += 1;
    }
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        [401, 429],
        "{statuses:?}"
    );
    let reviews = world.workload.count(Endpoint::TokenReview);
    assert!(
        reviews <= 1 + 8,
        "{reviews} TokenReviews for a flood of {FLOOD}"
    );
    Ok(())
}

#[tokio::test]
async fn with_a_workload_issuer_other_issuers_are_refused_before_any_review() -> Result<()> {
    let world = World::start(&["--workload-issuer", "https://someone-else.example"]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    assert_denied(
        &world,
        &world.check_bearer(&token).await?,
        401,
        16,
        "unknown_issuer",
    )
    .await?;
    assert_eq!(world.workload.count(Endpoint::TokenReview), 0);
    let issuer = world.workload.issuer();
    let world = World::start(&["--workload-issuer", issuer]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    allowed_token(&world.check_bearer(&token).await?)?;
    Ok(())
}

/// The companion of `pair` with `--require-sa-label tokensmith.io/exchange=true` and a
/// minter that may also list and watch service accounts.
async fn consenting(pair: &ClusterPair, extra: &[&str]) -> Result<Companion> {
    let minter = pair.management.kubeconfig_with(
        "tokensmith",
        Rights {
            token_request: true,
            list_service_accounts: true,
            ..Rights::NONE
        },
    )?;
    let mut args = vec!["--require-sa-label", LABEL_REQUIREMENT];
    args.extend_from_slice(extra);
    Ok(Companion::start_serving(&pair.reviewer, &minter, &args).await?)
}

const LABEL_REQUIREMENT: &str = "tokensmith.io/exchange=true";

/// Checks `token` until the answer's HTTP status (200 for an allow) is `want`, for at
/// most `within`; returns how long that took.
async fn until_status(
    companion: &Companion,
    token: &str,
    want: i32,
    within: Duration,
) -> Result<Duration> {
    let started = std::time::Instant::now();
    loop {
        let response = companion.check_bearer(token).await?;
        let got = match denied(&response) {
            Ok(d) => d.http,
            Err(_) => allowed_token(&response).map(|_| 200)?,
        };
        if got == want {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < within,
            "still {got} after {within:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_a_required_label_only_labelled_management_accounts_get_tokens() -> Result<()> {
    let pair = ClusterPair::start().await?;
    let companion = consenting(&pair, &[]).await?;
    let token = pair
        .workload
        .mint(&pair.workload_sa)
        .expiring_in(Duration::from_secs(3600))
        .sign();
    // The same name exists in management, but nobody there consented: 403, no token.
    let d = denied(&companion.check_bearer(&token).await?)?;
    assert_eq!((d.http, d.grpc), (403, 7), "{d:?}");
    assert_eq!(d.body, "service account not enabled for exchange");
    assert_eq!(pair.management.count(Endpoint::TokenRequest), 0);
    let (key, value) = LABEL_REQUIREMENT.split_once('=').context("label")?;
    // A label of another value is not consent.
    assert!(
        pair.management
            .label_service_account("app-prod", "eso-sa", key, Some("false"))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    until_status(&companion, &token, 403, Duration::ZERO).await?;
    // Labelling it takes effect through the watch, within moments.
    pair.management
        .label_service_account("app-prod", "eso-sa", key, Some(value));
    let took = until_status(&companion, &token, 200, Duration::from_secs(3)).await?;
    assert!(took < Duration::from_secs(3), "{took:?}");
    for _ in 0..20 {
        allowed_token(&companion.check_bearer(&token).await?)?;
    }
    // Watched, not fetched per request: one LIST, one open watch, no GETs.
    assert_eq!(pair.management.count(Endpoint::ListServiceAccounts), 1);
    assert_eq!(pair.management.count(Endpoint::WatchServiceAccounts), 1);
    assert_eq!(pair.management.count(Endpoint::GetServiceAccount), 0);
    // Removing the label stops it at once, although the exchange cache holds a token.
    pair.management
        .label_service_account("app-prod", "eso-sa", key, None);
    until_status(&companion, &token, 403, Duration::from_secs(3)).await?;
    let line = companion.last_decision().await?;
    assert_eq!(line["reason"], "not_consented", "{line}");
    assert!(
        line.to_string().contains(LABEL_REQUIREMENT),
        "the log names the label: {line}"
    );
    Ok(())
}

#[tokio::test]
async fn a_lost_watch_is_resumed_and_a_change_made_meanwhile_applies() -> Result<()> {
    let pair = ClusterPair::start().await?;
    let (key, value) = LABEL_REQUIREMENT.split_once('=').context("label")?;
    pair.management
        .label_service_account("app-prod", "eso-sa", key, Some(value));
    let companion = consenting(&pair, &[]).await?;
    let token = pair
        .workload
        .mint(&pair.workload_sa)
        .expiring_in(Duration::from_secs(3600))
        .sign();
    until_status(&companion, &token, 200, Duration::ZERO).await?;
    // The management API server goes away (open watch included) and comes back after
    // the label was removed: the next LIST brings the change.
    pair.management.inject(Fault::Refuse);
    pair.management
        .label_service_account("app-prod", "eso-sa", key, None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    pair.management.clear_faults();
    until_status(&companion, &token, 403, Duration::from_secs(10)).await?;
    assert!(pair.management.count(Endpoint::ListServiceAccounts) >= 2);
    Ok(())
}

#[tokio::test]
async fn without_the_right_to_list_accounts_the_companion_never_serves() -> Result<()> {
    let pair = ClusterPair::start().await?;
    // The pair's minter may mint but not list: no consent list, so nothing is minted.
    let companion = Companion::start(
        &pair.reviewer,
        &pair.minter,
        &["--require-sa-label", LABEL_REQUIREMENT],
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(companion.health("").await?, ServingStatus::NotServing);
    let token = pair.workload.mint(&pair.workload_sa).sign();
    let d = denied(&companion.check_bearer(&token).await?)?;
    assert_eq!(d.http, 503, "{d:?}");
    assert_eq!(pair.management.count(Endpoint::TokenRequest), 0);
    let logs = companion.logs().await?;
    assert!(
        logs.contains("listing the service accounts labelled for exchange failed")
            && logs.contains("cannot list resource"),
        "the log says why"
    );
    Ok(())
}
