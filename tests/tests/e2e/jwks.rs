//! Many workload clusters through `--clusters-config`: the real `tokensmith authz` over
//! gRPC against fake API servers that publish (and rotate) their keys — issuer routing,
//! signature and claim checks, the JWKS lifecycle, namespace policy, live reload,
//! `tokensmith jwks` — and the happy path and a denial through a real Envoy.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, ensure};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokensmith_proto::envoy::service::auth::v3::CheckResponse;
use tokensmith_tests::{
    Endpoint, FakeCluster, Fault, Rights, ServiceAccount,
    companion::Companion,
    envoy::{Envoy, ExtAuthz, bootstrap, ext_authz_filter, wasm_filter},
    http,
    process::{filter_wasm, tokensmith_bin},
    upstream::Upstream,
};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::{
    companion::{allowed_token, denied},
    production::{sample, scrape},
};

/// How long a log line (a reload, a refresh) may take to appear.
const LOG_WAIT: Duration = Duration::from_secs(20);

/// The management cluster, a scratch directory for clusters files and CA bundles, and the
/// kubeconfig the companion mints with.
struct Scene {
    management: FakeCluster,
    minter: PathBuf,
    dir: tempfile::TempDir,
}

impl Scene {
    async fn new() -> Result<Scene> {
        let management = FakeCluster::start("management").await?;
        let minter = management.kubeconfig_with("tokensmith", Rights::TOKEN_REQUEST)?;
        Ok(Scene {
            management,
            minter,
            dir: tempfile::tempdir()?,
        })
    }

    /// `cluster`'s CA bundle, written next to the clusters files.
    fn ca_file(&self, cluster: &FakeCluster) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("{}-ca.pem", cluster.name()));
        std::fs::write(&path, cluster.ca_pem())?;
        Ok(path)
    }

    /// A clusters-file entry validating `cluster`'s tokens against its `/openid/v1/jwks`.
    fn jwks_entry(&self, cluster: &FakeCluster, extra: &str) -> Result<String> {
        Ok(format!(
            "- name: {}\n  issuer: {}\n  jwks_uri: {}/openid/v1/jwks\n  ca_file: {}\n{extra}",
            cluster.name(),
            cluster.issuer(),
            cluster.url(),
            self.ca_file(cluster)?.display()
        ))
    }

    /// Writes `clusters.yaml` (or `file`) with `entries`.
    fn write(&self, file: &str, entries: &[String]) -> Result<PathBuf> {
        let path = self.dir.path().join(file);
        std::fs::write(&path, format!("clusters:\n{}", entries.concat()))?;
        Ok(path)
    }

    fn args<'a>(&'a self, config: &'a Path, extra: &[&'a str]) -> Vec<&'a std::ffi::OsStr> {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "--clusters-config".as_ref(),
            config.as_os_str(),
            "--management-kubeconfig".as_ref(),
            self.minter.as_os_str(),
        ];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        args
    }

    /// The companion on `config`, SERVING, with the keys of every JWKS cluster in `names`
    /// loaded (so call counts no longer move on their own).
    async fn companion(&self, config: &Path, names: &[&str], extra: &[&str]) -> Result<Companion> {
        let mut companion = Companion::start_serving_with_args(&self.args(config, extra)).await?;
        for name in names {
            keys_loaded(&mut companion, name).await?;
        }
        Ok(companion)
    }

    /// Creates `namespace/name` in the management cluster, as an operator grants access.
    fn grant(&self, namespace: &str, name: &str) {
        self.management.add_service_account(namespace, name);
    }
}

/// A workload cluster signing with RSA fixture `key` (distinct keys keep clusters apart).
/// A workload cluster whose keys anonymous callers may read: the ClusterRoleBinding
/// docs/multi-cluster.md asks for (a cluster refuses them without it).
async fn workload(name: &str, key: usize) -> Result<FakeCluster> {
    published(FakeCluster::builder(name).signing_key(key)).await
}

/// Starts `builder`'s cluster with anonymous issuer discovery bound.
async fn published(builder: tokensmith_tests::FakeClusterBuilder) -> Result<FakeCluster> {
    let cluster = builder.start().await?;
    cluster.bind_anonymous_issuer_discovery();
    Ok(cluster)
}

async fn keys_loaded(companion: &mut Companion, name: &str) -> Result<Value> {
    Ok(companion
        .wait_for_log(LOG_WAIT, |r| {
            r["message"] == "jwks keys loaded" && r["workload_cluster"] == name
        })
        .await?)
}

async fn check(companion: &Companion, token: &str) -> Result<CheckResponse> {
    Ok(companion.check_bearer(token).await?)
}

/// Checks `token`, expects an allow whose decision names `cluster`; returns the
/// management token.
async fn allowed(companion: &Companion, token: &str, cluster: &str) -> Result<String> {
    let response = check(companion, token).await?;
    let line = companion.last_decision().await?;
    let exchanged = allowed_token(&response).with_context(|| format!("decision: {line}"))?;
    ensure!(line["decision"] == "allow", "{line}");
    ensure!(line["workload_cluster"] == cluster, "{line}");
    Ok(exchanged)
}

/// Checks `token`, expects a denial with `http` status and `reason`; returns the
/// decision record.
async fn refused(companion: &Companion, token: &str, http: i32, reason: &str) -> Result<Value> {
    let response = check(companion, token).await?;
    let d = denied(&response)?;
    ensure!(d.http == http, "status {} (wanted {http}): {d:?}", d.http);
    let line = companion.last_decision().await?;
    ensure!(line["reason"] == reason, "reason (wanted {reason}): {line}");
    Ok(line)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The payload segment of `token`, decoded.
fn payload(token: &str) -> Result<Value> {
    let segment = token.split('.').nth(1).context("no payload")?;
    Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment)?)?)
}

/// A token with `header` over `claims` and the raw `signature`.
fn forge(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(signature)
    )
}

#[tokio::test]
async fn two_workload_clusters_are_told_apart_by_issuer_without_calling_them() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let west = workload("west", 3).await?;
    let east_sa = east.add_service_account("app-prod", "eso-sa");
    let west_sa = west.add_service_account("app-dev", "builder");
    scene.grant("app-prod", "eso-sa");
    scene.grant("app-dev", "builder");
    let config = scene.write(
        "clusters.yaml",
        &[scene.jwks_entry(&east, "")?, scene.jwks_entry(&west, "")?],
    )?;
    let companion = scene.companion(&config, &["east", "west"], &[]).await?;

    let m = allowed(&companion, &east.mint(&east_sa).sign(), "east").await?;
    let claims = scene.management.verify(&m)?;
    assert_eq!(claims.sub, "system:serviceaccount:app-prod:eso-sa");
    let m = allowed(&companion, &west.mint(&west_sa).sign(), "west").await?;
    assert_eq!(
        scene.management.verify(&m)?.sub,
        "system:serviceaccount:app-dev:builder"
    );

    // Claiming east's issuer does not make west's key trusted for it.
    let impostor = west.mint(&west_sa).issuer(east.issuer()).sign();
    let line = refused(&companion, &impostor, 401, "invalid_token").await?;
    assert_eq!(line["workload_cluster"], "east");

    // JWKS clusters are never called with tokens; one TokenRequest per allow.
    for cluster in [&east, &west] {
        assert_eq!(
            cluster.count(Endpoint::TokenReview),
            0,
            "{}",
            cluster.name()
        );
    }
    assert_eq!(scene.management.count(Endpoint::TokenRequest), 2);
    Ok(())
}

#[tokio::test]
async fn a_token_from_an_unknown_issuer_is_unauthorized_and_reaches_no_cluster() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let stranger = workload("stranger", 3).await?;
    let sa = stranger.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;

    let line = refused(
        &companion,
        &stranger.mint(&sa).sign(),
        401,
        "unknown_issuer",
    )
    .await?;
    assert_eq!(
        line["detail"],
        format!("issuer {:?} is not configured", stranger.issuer())
    );
    assert_eq!(line["workload_cluster"], "");
    let d = denied(&check(&companion, &stranger.mint(&sa).sign()).await?)?;
    assert!(
        d.headers.contains(&(
            "www-authenticate".into(),
            "Bearer error=\"invalid_token\"".into()
        )),
        "{d:?}"
    );
    assert_eq!(d.body, "token issuer is not trusted");
    let line = refused(&companion, "opaque-token", 401, "unknown_issuer").await?;
    assert_eq!(line["detail"], "no iss claim (not a JWT?)");

    assert_eq!(stranger.calls().len(), 0, "the stranger is never contacted");
    assert_eq!(
        east.count(Endpoint::Jwks),
        1,
        "no refresh for a foreign token"
    );
    assert_eq!(scene.management.count(Endpoint::TokenRequest), 0);
    Ok(())
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_old_tokens_work_while_still_published() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let before = east.mint(&sa).sign();
    allowed(&companion, &before, "east").await?;

    east.rotate_signing_key(2, true)?;
    let after = east.mint(&sa).sign();
    ensure!(jsonwebtoken::decode_header(&after)?.kid != jsonwebtoken::decode_header(&before)?.kid);
    allowed(&companion, &after, "east").await?;
    assert_eq!(
        east.count(Endpoint::Jwks),
        2,
        "start-up fetch + one for the new kid"
    );
    // The old key is still published, so still in the refreshed set: no fetch needed.
    allowed(&companion, &before, "east").await?;
    allowed(&companion, &east.mint(&sa).sign(), "east").await?;
    assert_eq!(east.count(Endpoint::Jwks), 2);
    let requested = companion
        .log_records()
        .await?
        .iter()
        .filter(|r| r["message"] == "jwks refresh requested for an unknown kid")
        .count();
    assert_eq!(requested, 1);
    Ok(())
}

#[tokio::test]
async fn a_key_dropped_from_the_jwks_stops_validating_after_the_refresh() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let before = east.mint(&sa).sign();
    allowed(&companion, &before, "east").await?;

    east.rotate_signing_key(2, false)?;
    allowed(&companion, &east.mint(&sa).sign(), "east").await?;
    let line = refused(&companion, &before, 401, "invalid_token").await?;
    assert_eq!(
        line["detail"],
        "no key with the token's kid; refresh skipped (at most one per 30 s)"
    );
    assert_eq!(east.count(Endpoint::Jwks), 2);
    Ok(())
}

/// A token that verified is not verified again while the key set stays the same, even
/// across a periodic refresh that brings the same keys; `--validation-cache-ttl 0` turns
/// that off. (A set that loses the key: the test above.)
#[tokio::test]
async fn a_verified_token_is_remembered_while_its_key_set_stays_the_same() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let entry = scene.jwks_entry(&east, "  refresh_interval: 1s\n")?;
    let config = scene.write("clusters.yaml", &[entry])?;
    let hits = r#"tokensmith_cache_hits_total{cache="validation"}"#;
    let token = east.mint(&sa).sign();

    let companion = scene.companion(&config, &["east"], &[]).await?;
    allowed(&companion, &token, "east").await?;
    let before = sample(&scrape(&companion).await?, hits).unwrap_or(0.0);
    allowed(&companion, &token, "east").await?;
    ensure!(
        sample(&scrape(&companion).await?, hits) == Some(before + 1.0),
        "the second check must be answered from the verified-token cache"
    );
    // Past a periodic refresh of the same keys: still remembered.
    let fetches = east.count(Endpoint::Jwks);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ensure!(
        east.count(Endpoint::Jwks) > fetches,
        "no periodic refresh happened"
    );
    allowed(&companion, &token, "east").await?;
    ensure!(
        sample(&scrape(&companion).await?, hits) == Some(before + 2.0),
        "an unchanged key set must keep the verified tokens"
    );

    let uncached = scene
        .companion(&config, &["east"], &["--validation-cache-ttl", "0"])
        .await?;
    allowed(&uncached, &token, "east").await?;
    allowed(&uncached, &token, "east").await?;
    let text = scrape(&uncached).await?;
    ensure!(
        sample(
            &text,
            r#"tokensmith_checks_total{decision="allow",reason="ok"}"#
        ) == Some(2.0)
            && matches!(sample(&text, hits), None | Some(0.0)),
        "--validation-cache-ttl 0 remembers nothing:\n{text}"
    );
    Ok(())
}

/// A reload that keeps a cluster's keys (and so its validator) but narrows its audiences
/// must not let a remembered token through on the old terms.
#[tokio::test]
async fn a_remembered_token_meets_the_audiences_of_a_reloaded_file() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let any = scene.jwks_entry(&east, "")?;
    let mut volume = ConfigMapVolume::new(
        scene.dir.path().join("volume"),
        &format!("clusters:\n{any}"),
    )?;
    let mut companion = scene.companion(&volume.path(), &["east"], &[]).await?;
    let token = east.mint(&sa).sign();
    allowed(&companion, &token, "east").await?;
    allowed(&companion, &token, "east").await?;

    let narrow = scene.jwks_entry(&east, "  audiences: [only-this-service]\n")?;
    volume.publish(&format!("clusters:\n{narrow}"))?;
    reloaded(&mut companion, 2).await?;
    ensure!(
        east.count(Endpoint::Jwks) == 1,
        "the reload must keep the keys, or the case is not tested"
    );
    refused(&companion, &token, 401, "invalid_token").await?;
    Ok(())
}

#[tokio::test]
async fn forged_kids_cause_at_most_one_jwks_refresh_per_interval() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;

    // Ten at once (they join the one refresh or are refused without one), ten after.
    let mut in_flight = Vec::new();
    for i in 0..10 {
        let token = east.mint(&sa).kid(&format!("forged-{i}")).sign();
        let mut client = companion.client();
        let request = tokensmith_tests::companion::envoy_like_check(&[(
            "authorization",
            &format!("Bearer {token}"),
        )]);
        in_flight.push(tokio::spawn(async move { client.check(request).await }));
    }
    for task in in_flight {
        let response = task.await??.into_inner();
        assert_eq!(denied(&response)?.http, 401);
    }
    for i in 10..20 {
        let token = east.mint(&sa).kid(&format!("forged-{i}")).sign();
        refused(&companion, &token, 401, "invalid_token").await?;
    }
    assert_eq!(
        east.count(Endpoint::Jwks),
        2,
        "the start-up fetch and a single on-demand refresh"
    );
    let lines = companion.decisions().await?;
    assert_eq!(lines.len(), 20);
    assert!(lines.iter().all(|l| l["reason"] == "invalid_token"));
    // The real key still works, without another fetch.
    allowed(&companion, &east.mint(&sa).sign(), "east").await?;
    assert_eq!(east.count(Endpoint::Jwks), 2);
    Ok(())
}

#[tokio::test]
async fn alg_none_hmac_mismatched_alg_crit_and_tampered_claims_are_rejected() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    scene.grant("kube-system", "eso-sa");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let kid = east.key_id();
    let claims = payload(&east.mint(&sa).sign())?;
    let public_jwk = east.jwks()["keys"][0].to_string();

    let mut hs256 = Header::new(Algorithm::HS256);
    hs256.kid = Some(kid.clone());
    let hmac_with_public_key = jsonwebtoken::encode(
        &hs256,
        &claims,
        &EncodingKey::from_secret(public_jwk.as_bytes())?,
    )?;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            forge(&json!({"alg": "none", "kid": kid}), &claims, b""),
            "alg none is not allowed",
        ),
        (
            "HS256 keyed with the public key",
            hmac_with_public_key,
            "alg HS256 is not allowed",
        ),
        (
            "ES256 header on the RSA key's kid",
            forge(&json!({"alg": "ES256", "kid": kid}), &claims, &[1; 64]),
            "no key for the token's kid fits alg ES256",
        ),
        (
            "a real PS256 signature by a key published for RS256",
            east.mint(&sa).algorithm(Algorithm::PS256).sign(),
            "no key for the token's kid fits alg PS256",
        ),
        (
            "crit header",
            east.mint(&sa).crit(&["exp"]).sign(),
            "crit header parameter present",
        ),
        (
            "sub naming another namespace than the claims",
            east.mint(&sa)
                .claim("sub", json!("system:serviceaccount:kube-system:eso-sa"))
                .sign(),
            "sub does not match the kubernetes.io claims",
        ),
        (
            "payload swapped under a good signature",
            {
                let good = east.mint(&sa).sign();
                let mut parts = good.split('.');
                let (h, _, s) = (parts.next(), parts.next(), parts.next());
                let mut swapped = claims.clone();
                swapped["kubernetes.io"]["namespace"] = json!("kube-system");
                swapped["sub"] = json!("system:serviceaccount:kube-system:eso-sa");
                format!(
                    "{}.{}.{}",
                    h.unwrap_or_default(),
                    b64(swapped.to_string().as_bytes()),
                    s.unwrap_or_default()
                )
            },
            "bad signature",
        ),
    ];
    for (what, token, detail) in &cases {
        let line = refused(&companion, token, 401, "invalid_token")
            .await
            .context(*what)?;
        assert_eq!(line["detail"], *detail, "{what}");
    }
    assert_eq!(
        east.count(Endpoint::Jwks),
        1,
        "none of these may cause a refresh"
    );
    assert_eq!(scene.management.count(Endpoint::TokenRequest), 0);
    Ok(())
}

#[tokio::test]
async fn audiences_are_enforced_when_configured() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write(
        "clusters.yaml",
        &[scene.jwks_entry(&east, "  audiences: [tokensmith]\n")?],
    )?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let right = east
        .mint(&sa)
        .audiences(vec!["tokensmith".into(), "vault".into()])
        .sign();
    allowed(&companion, &right, "east").await?;
    // Default audience: the cluster's own API (the issuer) — not ours.
    let line = refused(&companion, &east.mint(&sa).sign(), 401, "invalid_token").await?;
    assert_eq!(line["detail"], "aud has none of the accepted audiences");
    let none = east.mint(&sa).claim("aud", Value::Null).sign();
    let line = refused(&companion, &none, 401, "invalid_token").await?;
    assert_eq!(line["detail"], "aud missing but audiences are required");
    Ok(())
}

#[tokio::test]
async fn expired_not_yet_valid_and_future_tokens_are_rejected_beyond_the_leeway() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let now = now();
    let at = |secs: i64| UNIX_EPOCH + Duration::from_secs(secs as u64);

    let line = refused(
        &companion,
        &east.mint(&sa).expired().sign(),
        401,
        "invalid_token",
    )
    .await?;
    assert_eq!(line["detail"], "token expired");
    let future = east
        .mint(&sa)
        .not_before(at(now + 600))
        .expiring_in(Duration::from_secs(3600))
        .sign();
    let line = refused(&companion, &future, 401, "invalid_token").await?;
    assert_eq!(line["detail"], "token not valid yet (nbf)");
    let issued_later = east
        .mint(&sa)
        .issued_at(at(now + 600))
        .not_before(at(now))
        .sign();
    let line = refused(&companion, &issued_later, 401, "invalid_token").await?;
    assert_eq!(line["detail"], "token issued in the future (iat)");

    // Within the 30 s leeway: accepted, and the exchanged token gets the 600 s floor.
    let just_expired = east.mint(&sa).claim("exp", json!(now - 10)).sign();
    allowed(&companion, &just_expired, "east").await?;
    let line = companion.last_decision().await?;
    assert_eq!(line["requested_lifetime_s"], 600);
    let skewed = east.mint(&sa).not_before(at(now + 10)).sign();
    allowed(&companion, &skewed, "east").await?;
    Ok(())
}

#[tokio::test]
async fn oversize_tokens_are_refused_before_parsing() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let big = east
        .mint(&sa)
        .claim("padding", json!("x".repeat(13 * 1024)))
        .sign();
    ensure!(big.len() > 16 * 1024, "{} bytes", big.len());
    refused(&companion, &big, 401, "malformed_token").await?;
    assert_eq!(east.count(Endpoint::Jwks), 1);
    Ok(())
}

/// A real cluster refuses anonymous key reads until an operator binds issuer discovery
/// to `system:unauthenticated`: the companion says so (HTTP 403, in the warning the
/// troubleshooting table names) and answers 503, not 401, until the keys load.
#[tokio::test]
async fn without_the_anonymous_discovery_binding_keys_are_refused_and_checks_are_503() -> Result<()>
{
    let scene = Scene::new().await?;
    let east = FakeCluster::builder("east").signing_key(1).start().await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write(
        "clusters.yaml",
        &[scene.jwks_entry(&east, "  refresh_interval: 1s\n")?],
    )?;
    let mut companion = Companion::start_with_args(&scene.args(&config, &[])).await?;
    let warning = companion
        .wait_for_log(LOG_WAIT, |r| {
            r["workload_cluster"] == "east"
                && r["level"] == "WARN"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.ends_with("/openid/v1/jwks: HTTP 403"))
        })
        .await?;
    ensure!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains("jwks")),
        "{warning}"
    );
    let token = east.mint(&sa).sign();
    ensure!(denied(&check(&companion, &token).await?)?.http == 503);
    east.bind_anonymous_issuer_discovery();
    keys_loaded(&mut companion, "east").await?;
    allowed(&companion, &token, "east").await?;
    Ok(())
}

#[tokio::test]
async fn a_failing_jwks_endpoint_keeps_the_cached_keys_in_service() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write(
        "clusters.yaml",
        &[scene.jwks_entry(&east, "  refresh_interval: 1s\n")?],
    )?;
    let mut companion = scene.companion(&config, &["east"], &[]).await?;
    east.inject(Fault::Status {
        endpoint: Some(Endpoint::Jwks),
        code: 503,
    });
    let warning = companion
        .wait_for_log(LOG_WAIT, |r| {
            r["message"] == "jwks refresh failed; keeping the last good keys"
        })
        .await?;
    assert_eq!(warning["level"], "WARN");
    assert_eq!(warning["workload_cluster"], "east");
    assert_eq!(warning["keys"], 1);
    assert!(
        warning["detail"]
            .as_str()
            .unwrap_or("")
            .ends_with("/openid/v1/jwks: HTTP 503"),
        "{warning}"
    );
    allowed(&companion, &east.mint(&sa).sign(), "east").await?;

    // Down altogether: still served from the cache.
    east.inject(Fault::Refuse);
    allowed(&companion, &east.mint(&sa).sign(), "east").await?;
    Ok(())
}

#[tokio::test]
async fn jwks_and_tokenreview_clusters_mix_and_each_sees_only_its_own_tokens() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let west = workload("west", 3).await?;
    let east_sa = east.add_service_account("app-prod", "eso-sa");
    let west_sa = west.add_service_account("app-prod", "eso-sa");
    let west_system = west.add_service_account("kube-system", "admin");
    scene.grant("app-prod", "eso-sa");
    scene.grant("kube-system", "admin");
    let reviewer = west.kubeconfig_with("tokensmith-reviewer", Rights::TOKEN_REVIEW)?;
    let west_entry = format!(
        "- name: west\n  issuer: {}\n  tokenreview:\n    kubeconfig: {}\n",
        west.issuer(),
        reviewer.display()
    );
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?, west_entry])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;

    allowed(&companion, &west.mint(&west_sa).sign(), "west").await?;
    assert_eq!(west.count(Endpoint::TokenReview), 1);
    allowed(&companion, &east.mint(&east_sa).sign(), "east").await?;
    assert_eq!(
        west.count(Endpoint::TokenReview),
        1,
        "east's token never went west"
    );
    assert_eq!(east.count(Endpoint::TokenReview), 0);
    // The namespace policy holds for TokenReview clusters too, before any TokenRequest.
    let line = refused(
        &companion,
        &west.mint(&west_system).sign(),
        403,
        "namespace_not_allowed",
    )
    .await?;
    assert_eq!(line["workload_cluster"], "west");
    assert_eq!(scene.management.count(Endpoint::TokenRequest), 2);
    // Metrics name each cluster: west's TokenReviews, east's JWKS fetches.
    let text = crate::production::scrape(&companion).await?;
    let series = r#"tokensmith_kube_requests_total{cluster="west",verb="tokenreview",code="201"}"#;
    assert_eq!(
        crate::production::sample(&text, series),
        Some(2.0),
        "{text}"
    );
    let fetches = r#"tokensmith_jwks_fetches_total{cluster="east",result="ok"}"#;
    assert!(
        crate::production::sample(&text, fetches) >= Some(1.0),
        "{text}"
    );
    Ok(())
}

#[tokio::test]
async fn namespace_policy_protects_system_namespaces_and_applies_allow_and_deny() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let west = workload("west", 3).await?;
    let namespaces = [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "istio-system",
        "ops",
        "app-prod",
        "team-a",
        "team-secret",
    ];
    for ns in namespaces {
        scene.grant(ns, "sa");
    }
    let config = scene.write(
        "clusters.yaml",
        &[
            scene.jwks_entry(&east, "")?,
            scene.jwks_entry(
                &west,
                "  namespaces:\n    allow: [kube-system, \"team-*\"]\n    deny: [team-secret]\n",
            )?,
        ],
    )?;
    let companion = scene
        .companion(
            &config,
            &["east", "west"],
            &["--companion-namespace", "ops"],
        )
        .await?;
    let token = |cluster: &FakeCluster, ns: &str| {
        let sa = cluster.add_service_account(ns, "sa");
        cluster.mint(&sa).sign()
    };

    // east: defaults only.
    for ns in [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "istio-system",
        "ops",
    ] {
        let line = refused(&companion, &token(&east, ns), 403, "namespace_not_allowed")
            .await
            .context(ns)?;
        assert_eq!(
            line["detail"],
            format!(
                "namespace {ns:?}: protected namespace; only a literal namespaces.allow entry opens it"
            )
        );
        assert_eq!(line["namespace"], ns);
    }
    allowed(&companion, &token(&east, "app-prod"), "east").await?;
    allowed(&companion, &token(&east, "team-secret"), "east").await?;

    // west: allow [kube-system, team-*], deny [team-secret].
    allowed(&companion, &token(&west, "kube-system"), "west").await?;
    allowed(&companion, &token(&west, "team-a"), "west").await?;
    let line = refused(
        &companion,
        &token(&west, "team-secret"),
        403,
        "namespace_not_allowed",
    )
    .await?;
    assert_eq!(
        line["detail"],
        "namespace \"team-secret\": matches namespaces.deny pattern \"team-secret\""
    );
    let line = refused(
        &companion,
        &token(&west, "app-prod"),
        403,
        "namespace_not_allowed",
    )
    .await?;
    assert_eq!(
        line["detail"],
        "namespace \"app-prod\": matches no namespaces.allow pattern"
    );
    refused(
        &companion,
        &token(&west, "istio-system"),
        403,
        "namespace_not_allowed",
    )
    .await?;
    let d = denied(&check(&companion, &token(&west, "istio-system")).await?)?;
    assert_eq!(
        (d.grpc, d.body.as_str()),
        (7, "namespace not allowed for this workload cluster")
    );

    // Denials cost the management cluster nothing.
    assert_eq!(scene.management.count(Endpoint::TokenRequest), 4);
    Ok(())
}

/// A ConfigMap volume: `clusters.yaml` → `..data/clusters.yaml`, `..data` → a version
/// directory, swapped atomically the way kubelet does.
struct ConfigMapVolume {
    root: PathBuf,
    versions: usize,
}

impl ConfigMapVolume {
    fn new(root: PathBuf, content: &str) -> Result<ConfigMapVolume> {
        std::fs::create_dir_all(&root)?;
        let mut volume = ConfigMapVolume { root, versions: 0 };
        volume.publish(content)?;
        std::os::unix::fs::symlink("..data/clusters.yaml", volume.root.join("clusters.yaml"))?;
        Ok(volume)
    }

    fn path(&self) -> PathBuf {
        self.root.join("clusters.yaml")
    }

    fn publish(&mut self, content: &str) -> Result<()> {
        self.versions += 1;
        let version = format!("..2026_v{}", self.versions);
        std::fs::create_dir(self.root.join(&version))?;
        std::fs::write(self.root.join(&version).join("clusters.yaml"), content)?;
        let tmp = self.root.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp)?;
        std::fs::rename(&tmp, self.root.join("..data"))?;
        Ok(())
    }
}

async fn reloaded(companion: &mut Companion, generation: u64) -> Result<Value> {
    Ok(companion
        .wait_for_log(LOG_WAIT, |r| {
            r["message"] == "clusters config reloaded" && r["generation"] == generation
        })
        .await?)
}

#[tokio::test]
async fn a_changed_clusters_file_is_reloaded_and_a_bad_one_is_rejected() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let west = workload("west", 3).await?;
    let east_sa = east.add_service_account("app-prod", "eso-sa");
    let west_sa = west.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let east_entry = scene.jwks_entry(&east, "")?;
    let west_entry = scene.jwks_entry(&west, "")?;
    let mut volume = ConfigMapVolume::new(
        scene.dir.path().join("volume"),
        &format!("clusters:\n{east_entry}"),
    )?;
    let mut companion = scene.companion(&volume.path(), &["east"], &[]).await?;
    refused(
        &companion,
        &west.mint(&west_sa).sign(),
        401,
        "unknown_issuer",
    )
    .await?;

    // A good new version: west joins; east keeps its keys (no refetch).
    volume.publish(&format!("clusters:\n{east_entry}{west_entry}"))?;
    let line = reloaded(&mut companion, 2).await?;
    assert_eq!(line["clusters"], "[\"east\", \"west\"]");
    keys_loaded(&mut companion, "west").await?;
    allowed(&companion, &west.mint(&west_sa).sign(), "west").await?;
    allowed(&companion, &east.mint(&east_sa).sign(), "east").await?;
    assert_eq!(
        east.count(Endpoint::Jwks),
        1,
        "an unchanged cluster keeps its keys"
    );

    // A bad version: rejected, logged once, the running config stays.
    volume.publish(&format!("clusters:\n{east_entry}{east_entry}"))?;
    let error = companion
        .wait_for_log(LOG_WAIT, |r| {
            r["message"] == "clusters config rejected; keeping the running config"
        })
        .await?;
    assert_eq!(error["level"], "ERROR");
    assert!(
        error["error"].as_str().unwrap_or("").ends_with(
            "cluster \"east\" (clusters[1]): name: \"east\" is already used by clusters[0]"
        ),
        "{error}"
    );
    allowed(&companion, &west.mint(&west_sa).sign(), "west").await?;
    allowed(&companion, &east.mint(&east_sa).sign(), "east").await?;

    // A later good version applies again: west leaves.
    volume.publish(&format!("clusters:\n{east_entry}"))?;
    reloaded(&mut companion, 3).await?;
    refused(
        &companion,
        &west.mint(&west_sa).sign(),
        401,
        "unknown_issuer",
    )
    .await?;
    allowed(&companion, &east.mint(&east_sa).sign(), "east").await?;
    let rejected = companion
        .log_records()
        .await?
        .iter()
        .filter(|r| r["message"] == "clusters config rejected; keeping the running config")
        .count();
    assert_eq!(
        rejected, 1,
        "a bad version is reported once, not every poll"
    );
    Ok(())
}

#[tokio::test]
async fn legacy_secret_tokens_with_flat_claims_validate_under_the_legacy_issuer() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("ci", "deployer");
    scene.grant("ci", "deployer");
    let entry = format!(
        "- name: legacy\n  issuer: kubernetes/serviceaccount\n  jwks_uri: {}/openid/v1/jwks\n  ca_file: {}\n",
        east.url(),
        scene.ca_file(&east)?.display()
    );
    let config = scene.write("clusters.yaml", &[entry])?;
    let companion = scene.companion(&config, &["legacy"], &[]).await?;
    let token = east.mint(&sa).legacy("deployer-token-x7k2p").sign();
    ensure!(payload(&token)?.get("exp").is_none());
    let m = allowed(&companion, &token, "legacy").await?;
    assert_eq!(
        scene.management.verify(&m)?.sub,
        "system:serviceaccount:ci:deployer"
    );
    let line = companion.last_decision().await?;
    assert_eq!(line["uid"], sa.uid.as_str());
    // No exp: the exchanged token lives --token-expiration.
    assert_eq!(line["requested_lifetime_s"], 3600);
    // The cluster's projected tokens carry another issuer, not configured here.
    refused(&companion, &east.mint(&sa).sign(), 401, "unknown_issuer").await?;
    Ok(())
}

#[tokio::test]
async fn es256_tokens_verify_against_an_ec_key_set() -> Result<()> {
    let scene = Scene::new().await?;
    let east = published(FakeCluster::builder("east").ec_signing_key()).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    assert_eq!(east.jwks()["keys"][0]["kty"], "EC");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let token = east.mint(&sa).sign();
    assert_eq!(jsonwebtoken::decode_header(&token)?.alg, Algorithm::ES256);
    allowed(&companion, &token, "east").await?;
    Ok(())
}

#[tokio::test]
async fn discovery_finds_the_jwks_uri_through_the_issuer() -> Result<()> {
    let scene = Scene::new().await?;
    let east = published(FakeCluster::builder("east").signing_key(1).issuer_is_url()).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let entry = format!(
        "- name: east\n  issuer: {}\n  discovery: true\n  ca_file: {}\n",
        east.issuer(),
        scene.ca_file(&east)?.display()
    );
    let config = scene.write("clusters.yaml", &[entry])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    allowed(&companion, &east.mint(&sa).sign(), "east").await?;
    assert_eq!(east.count(Endpoint::OpenIdConfiguration), 1);
    assert_eq!(east.count(Endpoint::Jwks), 1);
    Ok(())
}

#[tokio::test]
async fn tokensmith_jwks_prints_an_entry_the_companion_accepts() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let output = tokio::process::Command::new(tokensmith_bin()?)
        .args(["jwks", "--kubeconfig"])
        .arg(east.kubeconfig())
        .env_remove("KUBECONFIG")
        .output()
        .await?;
    ensure!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    let document: Value = serde_yaml::from_str(&text)?;
    let entry = &document["clusters"][0];
    // Named after the kubeconfig's current context.
    assert_eq!(entry["name"], "east");
    assert_eq!(entry["issuer"], east.issuer());
    assert_eq!(entry["jwks_data"], east.jwks());
    assert_eq!(east.count(Endpoint::OpenIdConfiguration), 1);
    assert_eq!(east.count(Endpoint::Jwks), 1);

    let config = scene.dir.path().join("from-jwks.yaml");
    std::fs::write(&config, &text)?;
    let companion = Companion::start_serving_with_args(&scene.args(&config, &[])).await?;
    allowed(&companion, &east.mint(&sa).sign(), "east").await?;
    assert_eq!(
        east.count(Endpoint::Jwks),
        1,
        "jwks_data: no fetch at run time"
    );

    let named = tokio::process::Command::new(tokensmith_bin()?)
        .args(["jwks", "--name", "prod-east", "--kubeconfig"])
        .arg(east.kubeconfig())
        .output()
        .await?;
    let document: Value = serde_yaml::from_slice(&named.stdout)?;
    assert_eq!(document["clusters"][0]["name"], "prod-east");
    let bad = tokio::process::Command::new(tokensmith_bin()?)
        .args(["jwks", "--name", "Prod_East", "--kubeconfig"])
        .arg(east.kubeconfig())
        .output()
        .await?;
    assert_eq!(bad.status.code(), Some(2), "a bad --name is a usage error");
    Ok(())
}

#[tokio::test]
async fn health_waits_for_keys_but_one_ready_cluster_is_enough() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let west = workload("west", 3).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    east.inject(Fault::Status {
        endpoint: Some(Endpoint::Jwks),
        code: 500,
    });

    // Only east, and its keys can't be fetched: not ready.
    let only_east = scene.write("east.yaml", &[scene.jwks_entry(&east, "")?])?;
    let mut lonely = Companion::start_with_args(&scene.args(&only_east, &[])).await?;
    lonely
        .wait_for_log(LOG_WAIT, |r| {
            r["message"] == "jwks refresh failed; keeping the last good keys"
        })
        .await?;
    assert_eq!(lonely.health("").await?, ServingStatus::NotServing);
    let line = refused(&lonely, &east.mint(&sa).sign(), 503, "unavailable").await?;
    assert_eq!(line["detail"], "no keys loaded yet for cluster \"east\"");
    assert_eq!(line["cluster"], "workload");
    assert_eq!(line["workload_cluster"], "east");

    // With west beside it, west's keys are enough to serve.
    let both = scene.write(
        "both.yaml",
        &[scene.jwks_entry(&east, "")?, scene.jwks_entry(&west, "")?],
    )?;
    let companion = scene.companion(&both, &["west"], &[]).await?;
    assert_eq!(companion.health("").await?, ServingStatus::Serving);

    // east recovers (retries back off from 1 s): both companions pick its keys up.
    east.clear_faults();
    lonely.wait_health(ServingStatus::Serving, LOG_WAIT).await?;
    allowed(&lonely, &east.mint(&sa).sign(), "east").await?;
    Ok(())
}

/// Runs `tokensmith authz ARGS` to its exit (for start-up failures).
async fn run_authz(args: Vec<std::ffi::OsString>) -> Result<std::process::Output> {
    Ok(tokio::process::Command::new(tokensmith_bin()?)
        .arg("authz")
        .args(args)
        .env_remove("KUBECONFIG")
        .output()
        .await?)
}

#[tokio::test]
async fn configuration_errors_exit_64_naming_the_cluster_and_the_field() -> Result<()> {
    let scene = Scene::new().await?;
    let config = scene.write(
        "bad.yaml",
        &[
            "- name: east\n  issuer: https://east.example\n  jwks_uri: http://east.example/keys\n"
                .to_owned(),
        ],
    )?;
    let output = run_authz(vec![
        "--clusters-config".into(),
        config.clone().into(),
        "--management-kubeconfig".into(),
        scene.minter.clone().into(),
    ])
    .await?;
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "--clusters-config {}: cluster \"east\" (clusters[0]): jwks_uri: must be an https:// URL",
            config.display()
        )),
        "{stderr}"
    );

    let output = run_authz(vec![
        "--clusters-config".into(),
        config.into(),
        "--workload-kubeconfig".into(),
        scene.management.kubeconfig().into(),
    ])
    .await?;
    assert_eq!(output.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("--workload-kubeconfig: cannot be combined with --clusters-config"),
    );
    Ok(())
}

#[tokio::test]
async fn no_token_or_part_of_one_reaches_any_log_on_the_jwks_path() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let stranger = workload("stranger", 3).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    let system = east.add_service_account("kube-system", "eso-sa");
    let stranger_sa = stranger.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write(
        "clusters.yaml",
        &[scene.jwks_entry(&east, "  audiences: [tokensmith]\n")?],
    )?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let mint = |sa: &ServiceAccount| east.mint(sa).audiences(vec!["tokensmith".into()]);

    let good = mint(&sa).sign();
    let exchanged = allowed(&companion, &good, "east").await?;
    let claims = payload(&good)?;
    let tokens = vec![
        good.clone(),
        exchanged,
        mint(&sa).kid("forged").sign(),
        mint(&sa).expired().sign(),
        mint(&sa).crit(&["exp"]).sign(),
        mint(&system).sign(),
        east.mint(&sa).sign(),
        stranger.mint(&stranger_sa).sign(),
        forge(&json!({"alg": "none"}), &claims, b"x"),
        mint(&sa)
            .claim("padding", json!("y".repeat(13 * 1024)))
            .sign(),
    ];
    for token in &tokens[2..] {
        check(&companion, token).await?;
    }
    let logs = companion.logs().await?;
    assert!(
        companion.decisions().await?.len() >= tokens.len() - 1,
        "{logs}"
    );
    for token in &tokens {
        for part in std::iter::once(token.as_str()).chain(token.split('.')) {
            // Segments shorter than a few characters (`e30`) prove nothing either way.
            if part.len() >= 8 {
                assert!(
                    !logs.contains(part),
                    "a token segment appears in the companion's logs"
                );
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn through_envoy_a_jwks_token_is_exchanged_and_an_unknown_issuer_is_refused() -> Result<()> {
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let stranger = workload("stranger", 3).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    let stranger_sa = stranger.add_service_account("app-prod", "eso-sa");
    let management_sa = scene.management.add_service_account("app-prod", "eso-sa");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let upstream = Upstream::start().await?;
    let bootstrap = bootstrap(
        vec![ext_authz_filter(&ExtAuthz::recommended(companion.addr))],
        companion.addr,
        upstream.addr,
    );
    Envoy::validate(&bootstrap).await?;
    let envoy = Envoy::start(&bootstrap).await?;
    let path = "/api/v1/namespaces/app-prod/secrets";

    let token = east.mint(&sa).sign();
    let reply = http::get(
        envoy.addr,
        path,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let forwarded = seen[0]
        .header("authorization")
        .strip_prefix("Bearer ")
        .context("bearer upstream")?;
    let claims = scene.management.verify(forwarded)?;
    assert_eq!(claims.sub, "system:serviceaccount:app-prod:eso-sa");
    assert_eq!(claims.service_account_uid, management_sa.uid);
    for part in token.split('.') {
        assert!(!seen[0].header("authorization").contains(part));
    }

    let foreign = stranger.mint(&stranger_sa).sign();
    let reply = http::get(
        envoy.addr,
        path,
        &[("authorization", &format!("Bearer {foreign}"))],
    )
    .await?;
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert_eq!(reply.body, "token issuer is not trusted");
    assert_eq!(
        reply.header("www-authenticate"),
        "Bearer error=\"invalid_token\""
    );
    assert_eq!(upstream.count(), 1, "a denial never reaches the upstream");
    Ok(())
}

#[tokio::test]
async fn a_namespace_policy_change_reaches_the_wasm_filter_within_the_companions_reuse_limit()
-> Result<()> {
    const REUSE_S: u64 = 2;
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let entry = scene.jwks_entry(&east, "")?;
    let mut volume = ConfigMapVolume::new(
        scene.dir.path().join("volume"),
        &format!("clusters:\n{entry}"),
    )?;
    // The companion would reuse its own verdict 2 s; the filter's own max age is 60 s.
    let ttl = format!("{REUSE_S}s");
    let mut companion = scene
        .companion(&volume.path(), &["east"], &["--validation-cache-ttl", &ttl])
        .await?;
    let upstream = Upstream::start().await?;
    let filter = wasm_filter(
        &filter_wasm()?,
        &json!({"grpc_cluster": "tokensmith", "cache": {"max_age_s": 60}}),
    );
    let envoy = Envoy::start(&bootstrap(vec![filter], companion.addr, upstream.addr)).await?;
    let bearer = format!("Bearer {}", east.mint(&sa).sign());
    let headers = [("authorization", bearer.as_str())];
    let get = || http::get(envoy.addr, "/api", &headers);
    assert_eq!(get().await?.status, 200);
    assert_eq!(get().await?.status, 200);
    assert_eq!(
        companion.decisions().await?.len(),
        1,
        "the second was a filter cache hit"
    );

    volume.publish(&format!(
        "clusters:\n{entry}  namespaces:\n    deny: [app-prod]\n"
    ))?;
    reloaded(&mut companion, 2).await?;
    let changed = std::time::Instant::now();
    // The behaviour under test is time: poll until the filter asks again and is refused.
    let mut status = get().await?.status;
    while status == 200 && changed.elapsed() < Duration::from_secs(REUSE_S + 3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = get().await?.status;
    }
    assert_eq!(status, 403, "refused once the reuse limit ran out");
    assert!(
        changed.elapsed() <= Duration::from_secs(REUSE_S + 1),
        "took {:?}",
        changed.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn malformed_jwks_and_discovery_answers_carrying_tokens_are_never_logged() -> Result<()> {
    let scene = Scene::new().await?;
    let east = published(FakeCluster::builder("east").signing_key(1).issuer_is_url()).await?;
    let west = workload("west", 3).await?;
    let east_sa = east.add_service_account("app-prod", "eso-sa");
    let west_sa = west.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let east_token = east.mint(&east_sa).sign();
    let west_token = west.mint(&west_sa).sign();
    // Discovery and JWKS answers of the wrong shape, each carrying a real token.
    east.inject(Fault::Body {
        endpoint: Some(Endpoint::OpenIdConfiguration),
        code: 200,
        body: json!({"issuer": east.issuer(), "jwks_uri": [east_token]}).to_string(),
    });
    west.inject(Fault::Body {
        endpoint: Some(Endpoint::Jwks),
        code: 200,
        body: json!({"keys": west_token}).to_string(),
    });
    let east_entry = format!(
        "- name: east\n  issuer: {}\n  discovery: true\n  ca_file: {}\n",
        east.issuer(),
        scene.ca_file(&east)?.display()
    );
    let config = scene.write("clusters.yaml", &[east_entry, scene.jwks_entry(&west, "")?])?;
    let mut companion = Companion::start_with_args(&scene.args(&config, &[])).await?;
    // Both fetches failed (and were logged) before any check.
    for cluster in ["east", "west"] {
        companion
            .wait_for_log(LOG_WAIT, |r| {
                r["workload_cluster"] == cluster && r["level"] != "INFO"
            })
            .await?;
    }
    for token in [&east_token, &west_token] {
        let d = denied(&check(&companion, token).await?)?;
        assert_eq!(d.http, 503, "no keys: no verdict");
    }
    let logs = companion.logs().await?;
    assert!(
        !tokensmith_tests::leak_audit::holds_a_piece(&logs),
        "a piece of a token is in the log"
    );
    Ok(())
}

#[tokio::test]
async fn a_jwks_outage_during_a_rotation_is_503_for_new_keys_and_heals_within_seconds() -> Result<()>
{
    let scene = Scene::new().await?;
    let east = workload("east", 1).await?;
    let sa = east.add_service_account("app-prod", "eso-sa");
    scene.grant("app-prod", "eso-sa");
    let config = scene.write("clusters.yaml", &[scene.jwks_entry(&east, "")?])?;
    let companion = scene.companion(&config, &["east"], &[]).await?;
    let old_key_token = east.mint(&sa).sign();
    allowed(&companion, &old_key_token, "east").await?;

    // The issuer rotates while its JWKS endpoint fails.
    east.inject(Fault::Status {
        endpoint: Some(Endpoint::Jwks),
        code: 500,
    });
    east.rotate_signing_key(2, true)?;
    let new_key_token = east.mint(&sa).sign();
    let line = refused(&companion, &new_key_token, 503, "unavailable").await?;
    let text = crate::production::scrape(&companion).await?;
    let failed = r#"tokensmith_jwks_fetches_total{cluster="east",result="error"}"#;
    assert!(
        crate::production::sample(&text, failed) >= Some(1.0),
        "{text}"
    );
    assert_eq!(line["cluster"], "workload", "{line}");
    refused(&companion, &new_key_token, 503, "unavailable").await?;
    allowed(&companion, &old_key_token, "east").await?;

    // The endpoint is back: the new key is fetched on demand, within seconds.
    east.clear_faults();
    let back = std::time::Instant::now();
    loop {
        let response = check(&companion, &new_key_token).await?;
        if allowed_token(&response).is_ok() {
            break;
        }
        ensure!(denied(&response)?.http == 503, "only 503 while healing");
        ensure!(
            back.elapsed() < Duration::from_secs(5),
            "not healed within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
