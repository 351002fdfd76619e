//! The production companion over gRPC: exchange and validation caches, metrics and
//! probes, TLS and mTLS with reload, and the per-identity rate limit.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokensmith_proto::envoy::service::auth::v3::CheckResponse;
use tokensmith_tests::{
    Endpoint, FakeCluster,
    companion::{Companion, envoy_like_check},
    http,
    tls::TestPki,
};

use crate::companion::{World, allowed_token, denied};

/// The companion's `/metrics` text.
pub(crate) async fn scrape(companion: &Companion) -> Result<String> {
    let addr = companion.metrics_addr.context("metrics endpoint")?;
    let reply = http::get(addr, "/metrics", &[]).await?;
    ensure!(reply.status == 200, "/metrics answered {}", reply.status);
    Ok(reply.body)
}

/// The value of one sample line in the exposition (0 when absent).
pub(crate) fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn concurrent_first_checks_of_one_identity_make_one_token_request() -> Result<()> {
    let world = World::start(&[]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    let mut calls = Vec::new();
    for _ in 0..20 {
        let mut client = world.companion.client();
        let request = envoy_like_check(&[("authorization", &format!("Bearer {token}"))]);
        calls.push(tokio::spawn(async move { client.check(request).await }));
    }
    let mut tokens = std::collections::HashSet::new();
    for call in calls {
        tokens.insert(allowed_token(&call.await??.into_inner())?);
    }
    assert_eq!(tokens.len(), 1, "everyone got the one exchanged token");
    assert_eq!(world.management.count(Endpoint::TokenRequest), 1);
    Ok(())
}

#[tokio::test]
async fn a_hot_identity_is_refreshed_ahead_of_expiry() -> Result<()> {
    // The management API caps tokens at 122 s: margin 60 s, so an entry is served for
    // 62 s and refreshed in the background after 2 s (the API's expiry has whole
    // seconds, so up to one second earlier).
    let workload = FakeCluster::start("workload").await?;
    let management = FakeCluster::builder("management")
        .max_token_expiration(Duration::from_secs(122))
        .start()
        .await?;
    let sa = workload.add_service_account("app-prod", "eso-sa");
    management.add_service_account("app-prod", "eso-sa");
    let companion =
        Companion::start_serving(workload.kubeconfig(), management.kubeconfig(), &[]).await?;
    let bearer = format!("Bearer {}", workload.mint(&sa).sign());
    let first = allowed_token(&companion.check(&[("authorization", &bearer)]).await?)?;
    assert_eq!(management.count(Endpoint::TokenRequest), 1);
    // Waiting into the refresh window is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let hit = allowed_token(&companion.check(&[("authorization", &bearer)]).await?)?;
    assert!(hit == first, "served from the cache while it refreshes");
    // The background TokenRequest lands in the cache once its answer is back: poll for
    // the new token (compared, never printed).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = allowed_token(&companion.check(&[("authorization", &bearer)]).await?)?;
        if now != first {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the refreshed token never replaced the old one"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(management.count(Endpoint::TokenRequest), 2);
    Ok(())
}

#[tokio::test]
async fn the_exchange_cache_stays_within_its_bound() -> Result<()> {
    let world = World::start(&["--cache-max-entries", "2"]).await?;
    for i in 0..6 {
        let name = format!("sa-{i}");
        world.management.add_service_account("app-prod", &name);
        let sa = world.workload.add_service_account("app-prod", &name);
        allowed_token(&world.check_bearer(&world.workload.mint(&sa).sign()).await?)?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(&world.companion).await?;
        if sample(
            &text,
            r#"tokensmith_cache_evictions_total{cache="exchange"}"#,
        )
        .is_some_and(|evicted| evicted >= 4.0)
        {
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no evictions recorded:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn token_reviews_are_cached_for_the_validation_ttl_only() -> Result<()> {
    let world = World::start(&["--validation-cache-ttl", "1s"]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    // Every answer counts, not only the API calls: a cache that answered wrongly
    // would pass on call counts alone.
    let allows = |response: CheckResponse| -> Result<()> {
        world.management.verify(&allowed_token(&response)?)?;
        Ok(())
    };
    allows(world.check_bearer(&token).await?)?;
    allows(world.check_bearer(&token).await?)?;
    assert_eq!(world.workload.count(Endpoint::TokenReview), 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    allows(world.check_bearer(&token).await?)?;
    assert_eq!(
        world.workload.count(Endpoint::TokenReview),
        2,
        "the TTL has passed"
    );
    // Revoked (its service account deleted): refused once the TTL has passed, not served
    // from what was remembered.
    world.workload.delete_service_account("app-prod", "eso-sa");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let d = denied(&world.check_bearer(&token).await?)?;
    ensure!(d.http == 401, "a revoked token after the TTL: {d:?}");
    assert_eq!(world.workload.count(Endpoint::TokenReview), 3);
    // A rejection (of a well-formed token of the right issuer that the API server does
    // not accept: signed with keys it never published) is kept for at most a second.
    let stranger = tokensmith_tests::FakeCluster::builder("stranger")
        .issuer(world.workload.issuer())
        .signing_key(3)
        .start()
        .await?;
    let foreign = stranger
        .mint(&stranger.add_service_account("app-prod", "eso-sa"))
        .sign();
    let refused = |response: CheckResponse| -> Result<()> {
        let d = denied(&response)?;
        ensure!(d.http == 401, "the stranger's token: {d:?}");
        Ok(())
    };
    refused(world.check_bearer(&foreign).await?)?;
    refused(world.check_bearer(&foreign).await?)?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    refused(world.check_bearer(&foreign).await?)?;
    assert_eq!(world.workload.count(Endpoint::TokenReview), 5);
    Ok(())
}

#[tokio::test]
async fn metrics_count_what_happened() -> Result<()> {
    let world = World::start(&[]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    world.check_bearer(&token).await?;
    world.check_bearer(&token).await?;
    world.companion.check(&[]).await?;
    let text = scrape(&world.companion).await?;
    let want = [
        (
            r#"tokensmith_checks_total{decision="allow",reason="ok"}"#,
            2.0,
        ),
        (
            r#"tokensmith_checks_total{decision="deny",reason="missing_token"}"#,
            1.0,
        ),
        (
            r#"tokensmith_kube_requests_total{cluster="management",verb="tokenrequest",code="201"}"#,
            1.0,
        ),
        (
            r#"tokensmith_kube_requests_total{cluster="workload",verb="tokenreview",code="201"}"#,
            1.0,
        ),
        (r#"tokensmith_cache_hits_total{cache="exchange"}"#, 1.0),
        (r#"tokensmith_cache_hits_total{cache="validation"}"#, 1.0),
        ("tokensmith_check_duration_seconds_count", 3.0),
        ("tokensmith_checks_in_flight", 0.0),
    ];
    for (series, value) in want {
        // A series that is missing is a failure, not a zero.
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    }
    assert!(
        !tokensmith_tests::leak_audit::holds_a_piece(&text),
        "a piece of a token in /metrics"
    );
    let addr = world.companion.metrics_addr.context("metrics")?;
    assert_eq!(http::get(addr, "/healthz", &[]).await?.status, 200);
    assert_eq!(http::get(addr, "/readyz", &[]).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn readyz_follows_the_api_servers_at_start() -> Result<()> {
    let workload = FakeCluster::start("workload").await?;
    let management = FakeCluster::start("management").await?;
    management.inject(tokensmith_tests::Fault::Refuse);
    let companion = Companion::start(workload.kubeconfig(), management.kubeconfig(), &[]).await?;
    let addr = companion.metrics_addr.context("metrics")?;
    assert_eq!(http::get(addr, "/readyz", &[]).await?.status, 503);
    assert_eq!(http::get(addr, "/healthz", &[]).await?.status, 200);
    management.clear_faults();
    companion
        .wait_health(
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            Duration::from_secs(15),
        )
        .await?;
    assert_eq!(http::get(addr, "/readyz", &[]).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn the_rate_limit_answers_429_past_the_burst() -> Result<()> {
    let world = World::start(&["--rate-limit", "0.1", "--rate-limit-burst", "3"]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    for _ in 0..3 {
        allowed_token(&world.check_bearer(&token).await?)?;
    }
    let d = denied(&world.check_bearer(&token).await?)?;
    assert_eq!(
        (d.http, d.grpc, d.body.as_str()),
        (429, 8, "too many requests")
    );
    let retry_after: u64 = d
        .headers
        .iter()
        .find(|(k, _)| k == "retry-after")
        .context("retry-after")?
        .1
        .parse()?;
    assert!((1..=10).contains(&retry_after), "retry-after {retry_after}");
    let line = world.companion.last_decision().await?;
    ensure!(
        line["reason"] == "throttled" && line["status"] == 429,
        "{line}"
    );
    let text = scrape(&world.companion).await?;
    assert_eq!(
        sample(
            &text,
            r#"tokensmith_checks_total{decision="deny",reason="throttled"}"#
        ),
        Some(1.0),
        "{text}"
    );
    // Another identity has its own bucket.
    let other = world.workload.add_service_account("app-prod", "other");
    world.management.add_service_account("app-prod", "other");
    allowed_token(
        &world
            .check_bearer(&world.workload.mint(&other).sign())
            .await?,
    )?;
    Ok(())
}

#[tokio::test]
async fn tls_and_mtls_accept_the_right_clients_and_reload_certificates() -> Result<()> {
    let workload = FakeCluster::start("workload").await?;
    let management = FakeCluster::start("management").await?;
    let pki = TestPki::new()?;
    let files = pki.write_server("first")?;
    let tls_args = [
        "--tls-cert",
        files.cert.to_str().context("path")?,
        "--tls-key",
        files.key.to_str().context("path")?,
        "--client-ca",
        files.client_ca.to_str().context("path")?,
    ];
    let companion =
        Companion::start(workload.kubeconfig(), management.kubeconfig(), &tls_args).await?;
    // A client with a certificate from the client CA gets through; its server check
    // sees the first certificate.
    let good = pki.client(companion.addr, true).await?;
    assert_eq!(pki.served_name(companion.addr).await?, "first");
    let response =
        tokensmith_proto::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            good,
        )
        .check(envoy_like_check(&[]))
        .await?;
    assert_eq!(
        denied(&response.into_inner())?.http,
        401,
        "reached the companion"
    );
    // Without a client certificate, or in plain text: refused.
    ensure!(
        pki.client(companion.addr, false).await.is_err(),
        "a client without a certificate got in"
    );
    ensure!(
        companion.plain_check().await.is_err(),
        "a plain-text client got in"
    );
    // Rotate the server certificate in place: new connections see it, no restart.
    pki.write_server("second")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pki.served_name(companion.addr).await? != "second" {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "certificate not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test]
async fn the_exchange_cache_works_through_envoy() -> Result<()> {
    let stage = crate::envoy::Stage::start(crate::envoy::Path::ExtAuthz, &[]).await?;
    let token = stage.world.workload_token(Duration::from_secs(3600));
    for _ in 0..5 {
        assert_eq!(stage.get(Some(&token)).await?.status, 200);
    }
    assert_eq!(stage.world.management.count(Endpoint::TokenRequest), 1);
    let audit: Vec<_> = stage
        .world
        .companion
        .log_records()
        .await?
        .into_iter()
        .filter(|r| r["message"] == "check decided")
        .collect();
    assert_eq!(audit.len(), 5);
    assert_eq!(audit.iter().filter(|r| r["cache_hit"] == true).count(), 4);
    Ok(())
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_until_one_closes() -> Result<()> {
    // The harness's own channel is one of the two.
    let world = World::start(&["--grpc-max-connections", "2"]).await?;
    let addr = world.companion.addr;
    let channel = |timeout: Duration| {
        Ok::<_, anyhow::Error>(
            tonic::transport::Channel::from_shared(format!("http://{addr}"))?
                .timeout(timeout)
                .connect_lazy(),
        )
    };
    let check = |channel: tonic::transport::Channel| async move {
        tokensmith_proto::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
            channel,
        )
        .check(envoy_like_check(&[]))
        .await
    };
    let second = channel(Duration::from_secs(5))?;
    check(second.clone()).await?;
    let third = channel(Duration::from_millis(800))?;
    ensure!(
        check(third.clone()).await.is_err(),
        "a third connection was served"
    );
    drop(second);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while check(third.clone()).await.is_err() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the waiting connection was never served"
        );
    }
    Ok(())
}

#[tokio::test]
async fn sockets_that_never_say_hello_cannot_hold_more_than_the_handshake_limit() -> Result<()> {
    let workload = FakeCluster::start("workload").await?;
    let management = FakeCluster::start("management").await?;
    let pki = TestPki::new()?;
    let files = pki.write_server("only")?;
    let args = [
        "--tls-cert",
        files.cert.to_str().context("path")?,
        "--tls-key",
        files.key.to_str().context("path")?,
        "--tls-max-handshakes",
        "1",
    ];
    let companion = Companion::start(workload.kubeconfig(), management.kubeconfig(), &args).await?;
    assert_eq!(pki.served_name(companion.addr).await?, "only");
    // A socket that says nothing holds the one handshake turn…
    let idle = tokio::net::TcpStream::connect(companion.addr).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waited =
        tokio::time::timeout(Duration::from_secs(1), pki.served_name(companion.addr)).await;
    ensure!(
        waited.is_err(),
        "a second handshake ran beside the idle one"
    );
    // …until it goes away.
    drop(idle);
    let name = tokio::time::timeout(Duration::from_secs(3), pki.served_name(companion.addr))
        .await
        .context("handshake after the idle socket closed")??;
    assert_eq!(name, "only");
    Ok(())
}

/// A hit late in a verdict's TTL is served and revalidated in the background, so the
/// identity's next check, past the old verdict's TTL, still finds a cached verdict; a
/// revocation shows within the TTL all the same.
#[tokio::test]
async fn a_hot_identity_is_revalidated_ahead_and_a_revocation_still_shows() -> Result<()> {
    let world = World::start(&["--validation-cache-ttl", "2s"]).await?;
    let token = world.workload_token(Duration::from_secs(3600));
    allowed_token(&world.check_bearer(&token).await?)?;
    ensure!(world.workload.count(Endpoint::TokenReview) == 1);
    // Past 70 % of the TTL: served from the cache, one review starts behind it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    allowed_token(&world.check_bearer(&token).await?)?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        world.workload.count(Endpoint::TokenReview) == 2,
        "one background review, got {}",
        world.workload.count(Endpoint::TokenReview)
    );
    // 2.5 s after the first verdict, which has expired by now: the refreshed one serves.
    tokio::time::sleep(Duration::from_millis(700)).await;
    allowed_token(&world.check_bearer(&token).await?)?;
    let last = world.companion.last_decision().await?;
    ensure!(
        last["validation_cached"] == true,
        "the check past the first TTL must find the refreshed verdict: {last}"
    );
    ensure!(world.workload.count(Endpoint::TokenReview) == 2);

    // Revoked: the verdict cached now is at most 2 s old, then the review says no.
    world.workload.delete_service_account("app-prod", "eso-sa");
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let refused = world.check_bearer(&token).await?;
    ensure!(
        denied(&refused)?.http == 401,
        "a revoked token must be refused within the TTL"
    );
    Ok(())
}
