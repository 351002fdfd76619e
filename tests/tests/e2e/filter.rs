//! The wasm filter's own cases in a real Envoy (V8): the in-proxy cache, its background
//! refresh, coalesced misses, configuration errors, and what `failure_mode` does when the
//! companion is away.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tokensmith_tests::{
    Endpoint, Fault,
    envoy::{Envoy, bootstrap, wasm_filter},
    http,
    process::filter_wasm,
    upstream::Upstream,
};
use tokio::{io::AsyncWriteExt, time::Instant};

use crate::envoy::{Path, Stage, dead_address};

#[tokio::test]
async fn a_repeated_token_is_served_from_the_cache_without_a_check() -> Result<()> {
    let stage = Stage::start(Path::Filter, &[]).await?;
    let token = stage.world.workload_token(Duration::from_secs(3600));
    for _ in 0..5 {
        assert_eq!(stage.get(Some(&token)).await?.status, 200);
    }
    // One exchange for five requests: the companion was asked once.
    assert_eq!(stage.world.workload.count(Endpoint::TokenReview), 1);
    assert_eq!(stage.world.management.count(Endpoint::TokenRequest), 1);
    let e = &stage.envoy;
    assert_eq!(e.stat("wasmcustom.tokensmith.requests").await?, 5);
    assert_eq!(e.stat("wasmcustom.tokensmith.cache_misses").await?, 1);
    assert_eq!(e.stat("wasmcustom.tokensmith.cache_hits").await?, 4);
    assert_eq!(e.stat("wasmcustom.tokensmith.allowed").await?, 5);
    // Every request carried the same exchanged token to the upstream.
    let seen = stage.upstream.seen();
    let first = seen[0].header("authorization");
    assert!(seen.iter().all(|s| s.header("authorization") == first));
    stage
        .world
        .management
        .verify(first.trim_start_matches("Bearer "))?;
    Ok(())
}

#[tokio::test]
async fn half_as_many_identities_as_slots_are_all_served_from_the_cache() -> Result<()> {
    // 128 identities in 256 slots: with direct mapping about a fifth of them would
    // collide and cost a Check on every request for ever.
    const IDENTITIES: usize = 128;
    // Long reuse on both sides, so only placement can make a second-round miss.
    let config = json!({"cache": {"slots": 256, "max_age_s": 900}});
    let long_reuse = ["--validation-cache-ttl", "15m"];
    let stage = Stage::start_with(Path::Filter, &long_reuse, &config).await?;
    let world = &stage.world;
    let mut tokens = Vec::new();
    for i in 0..IDENTITIES {
        let name = format!("sa-{i}");
        world.management.add_service_account("app-prod", &name);
        let sa = world.workload.add_service_account("app-prod", &name);
        tokens.push(world.workload.mint(&sa).sign());
    }
    let mut connection = http::Connection::open(stage.envoy.addr).await?;
    for token in tokens.iter().chain(&tokens) {
        let reply = connection
            .get("/", &[("authorization", &format!("Bearer {token}"))])
            .await?;
        anyhow::ensure!(reply.status == 200, "status {}", reply.status);
    }
    let e = &stage.envoy;
    assert_eq!(
        e.stat("wasmcustom.tokensmith.cache_misses").await?,
        IDENTITIES as u64,
        "only the first round asks the companion"
    );
    assert_eq!(
        e.stat("wasmcustom.tokensmith.cache_hits").await?,
        IDENTITIES as u64
    );
    Ok(())
}

/// One slot for two identities: each lookup must check the stored token digest, or one
/// workload would be sent upstream with the other's management token.
#[tokio::test]
async fn one_slot_never_serves_one_identitys_token_to_another() -> Result<()> {
    let config = json!({"cache": {"slots": 1}});
    let stage = Stage::start_with(Path::Filter, &[], &config).await?;
    let world = &stage.world;
    let mut tokens = Vec::new();
    for name in ["sa-a", "sa-b"] {
        world.management.add_service_account("app-prod", name);
        let sa = world.workload.add_service_account("app-prod", name);
        tokens.push((name, world.workload.mint(&sa).sign()));
    }
    for (_, token) in [&tokens[0], &tokens[1], &tokens[0]] {
        anyhow::ensure!(stage.get(Some(token)).await?.status == 200);
    }
    let seen = stage.upstream.seen();
    anyhow::ensure!(seen.len() == 3, "{} requests upstream", seen.len());
    for (request, (name, _)) in seen.iter().zip([&tokens[0], &tokens[1], &tokens[0]]) {
        let forwarded = request
            .header("authorization")
            .trim_start_matches("Bearer ");
        let claims = world.management.verify(forwarded)?;
        anyhow::ensure!(
            claims.sub == format!("system:serviceaccount:app-prod:{name}"),
            "{name}'s request went upstream as {}",
            claims.sub
        );
    }
    let e = &stage.envoy;
    assert_eq!(e.stat("wasmcustom.tokensmith.cache_misses").await?, 3);
    assert_eq!(world.workload.count(Endpoint::TokenReview), 2);
    Ok(())
}

#[tokio::test]
async fn a_new_workload_token_leads_to_a_new_exchange() -> Result<()> {
    let stage = Stage::start(Path::Filter, &[]).await?;
    let first = stage.world.workload_token(Duration::from_secs(3600));
    let second = stage.world.workload_token(Duration::from_secs(3600));
    assert_eq!(stage.get(Some(&first)).await?.status, 200);
    assert_eq!(stage.get(Some(&second)).await?.status, 200);
    assert_eq!(stage.get(Some(&first)).await?.status, 200);
    // The filter asked the companion once per new token (the third was a filter cache
    // hit); each token was reviewed once.
    let checks = stage
        .world
        .companion
        .log_records()
        .await?
        .into_iter()
        .filter(|r| r["message"] == "check decided")
        .count();
    assert_eq!(checks, 2);
    assert_eq!(stage.world.workload.count(Endpoint::TokenReview), 2);
    Ok(())
}

/// The management token the upstream saw on the latest request.
fn last_forwarded(upstream: &Upstream) -> Result<String> {
    let seen = upstream.seen().pop().context("upstream called")?;
    Ok(seen.header("authorization").to_owned())
}

async fn get_on(connection: &mut http::Connection, header: &str) -> Result<u16> {
    Ok(connection
        .get("/", &[("authorization", header)])
        .await?
        .status)
}

/// Past the refresh point a hit is still served at once, with the cached token, while one
/// background Check (from the worker's root context) fetches the next one; the requests
/// after it lands carry the new token.
#[tokio::test]
async fn a_hit_inside_the_refresh_window_is_served_at_once_and_refreshed_in_the_background()
-> Result<()> {
    // Exchanged tokens live 600 s; with a 597 s window an entry is fresh for ~3 s.
    let config = json!({"cache": {"refresh_before_expiry_s": 597}});
    // The companion's own exchange cache off, so a refresh shows as a new token.
    let companion = ["--token-expiration", "600", "--cache-max-entries", "0"];
    let stage = Stage::start_filter_on_one_worker(&companion, &config).await?;
    let world = &stage.world;
    let header = format!("Bearer {}", world.workload_token(Duration::from_secs(3600)));
    let mut connection = http::Connection::open(stage.envoy.addr).await?;
    assert_eq!(get_on(&mut connection, &header).await?, 200);
    let first = last_forwarded(&stage.upstream)?;
    assert_eq!(world.management.count(Endpoint::TokenRequest), 1);
    // Waiting for the refresh window is the behaviour under test, not a readiness wait.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // The next exchange is slow: a request that waited for it would show.
    let slow = Duration::from_millis(1500);
    world.management.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenRequest),
        delay: slow,
    });
    let started = Instant::now();
    assert_eq!(get_on(&mut connection, &header).await?, 200);
    assert!(started.elapsed() < slow, "the hit waited for the refresh");
    assert_eq!(
        last_forwarded(&stage.upstream)?,
        first,
        "inside the window the cached token is served"
    );

    // Until the background Check lands every hit is served the old token, and none
    // starts another; then the new token goes upstream.
    let deadline = Instant::now() + Duration::from_secs(10);
    let renewed = loop {
        assert_eq!(get_on(&mut connection, &header).await?, 200);
        let forwarded = last_forwarded(&stage.upstream)?;
        if forwarded != first {
            break forwarded;
        }
        anyhow::ensure!(Instant::now() < deadline, "the refresh never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    world
        .management
        .verify(renewed.trim_start_matches("Bearer "))?;
    assert_eq!(world.management.count(Endpoint::TokenRequest), 2);
    assert_eq!(
        world.companion.decisions().await?.len(),
        2,
        "one background Check"
    );
    let e = &stage.envoy;
    assert_eq!(e.stat("wasmcustom.tokensmith.cache_refreshes").await?, 1);
    assert_eq!(e.stat("wasmcustom.tokensmith.cache_misses").await?, 1);
    assert_eq!(
        e.stat("wasmcustom.tokensmith.cache_refresh_errors").await?,
        0
    );
    Ok(())
}

/// Requests that miss for the same token on one worker while its Check is out wait for
/// that Check: the companion is asked once, and each request gets the verdict.
#[tokio::test]
async fn concurrent_first_requests_for_one_token_on_one_worker_make_one_check() -> Result<()> {
    const REQUESTS: usize = 8;
    let stage = Stage::start_filter_on_one_worker(&[], &json!({})).await?;
    let world = &stage.world;
    // A slow review keeps the first Check out while the others arrive.
    world.workload.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenReview),
        delay: Duration::from_millis(500),
    });
    let header = format!("Bearer {}", world.workload_token(Duration::from_secs(3600)));
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..REQUESTS {
        let (addr, header) = (stage.envoy.addr, header.clone());
        requests.spawn(async move {
            let mut connection = http::Connection::open(addr).await?;
            get_on(&mut connection, &header).await
        });
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status??, 200);
    }
    assert_eq!(world.companion.decisions().await?.len(), 1, "one Check");
    assert_eq!(world.workload.count(Endpoint::TokenReview), 1);
    assert_eq!(world.management.count(Endpoint::TokenRequest), 1);
    let seen = stage.upstream.seen();
    assert_eq!(seen.len(), REQUESTS);
    let first = seen[0].header("authorization");
    assert!(seen.iter().all(|s| s.header("authorization") == first));
    world
        .management
        .verify(first.trim_start_matches("Bearer "))?;
    let e = &stage.envoy;
    assert_eq!(
        e.stat("wasmcustom.tokensmith.cache_misses").await?,
        REQUESTS as u64
    );
    assert_eq!(
        e.stat("wasmcustom.tokensmith.coalesced_waits").await?,
        REQUESTS as u64 - 1
    );
    assert_eq!(
        e.stat("wasmcustom.tokensmith.allowed").await?,
        REQUESTS as u64
    );
    Ok(())
}

/// The request whose Check others wait on goes away (its client disconnects): its reply
/// would reach no one, so the worker's root asks again and the waiters still get theirs.
#[tokio::test]
async fn waiters_are_answered_when_the_request_they_waited_on_goes_away() -> Result<()> {
    const WAITERS: u64 = 3;
    // The first Check is slow enough (3 s of its 5) for Envoy to see the hang-up first.
    let config = json!({"timeout_ms": 5000});
    let stage = Stage::start_filter_on_one_worker(&[], &config).await?;
    let world = &stage.world;
    world.workload.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenReview),
        delay: Duration::from_secs(3),
    });
    let header = format!("Bearer {}", world.workload_token(Duration::from_secs(3600)));
    let addr = stage.envoy.addr;
    // Written by hand, so that hanging up really closes the socket.
    let mut first = tokio::net::TcpStream::connect(addr).await?;
    let request =
        format!("GET / HTTP/1.1\r\nhost: mgmt-api.example.com\r\nauthorization: {header}\r\n\r\n");
    first.write_all(request.as_bytes()).await?;
    let e = &stage.envoy;
    // Polled, as neither event has a line to wait for: the filter sent the first Check,
    // then every waiter joined it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while e.stat("wasmcustom.tokensmith.cache_misses").await? == 0 {
        anyhow::ensure!(Instant::now() < deadline, "the first Check never went out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..WAITERS {
        let header = header.clone();
        waiters.spawn(async move {
            let mut connection = http::Connection::open(addr).await?;
            get_on(&mut connection, &header).await
        });
    }
    loop {
        let joined = e.stat("wasmcustom.tokensmith.coalesced_waits").await?;
        if joined == WAITERS {
            break;
        }
        let hits = e.stat("wasmcustom.tokensmith.cache_hits").await?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "{joined} of {WAITERS} waiters joined ({hits} cache hits)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first client hangs up before its answer.
    drop(first);
    while let Some(status) = waiters.join_next().await {
        assert_eq!(status??, 200);
    }
    assert_eq!(
        world.companion.decisions().await?.len(),
        2,
        "the abandoned Check and the root's"
    );
    let seen = stage.upstream.seen();
    assert_eq!(
        seen.len(),
        WAITERS as usize,
        "the first request never went upstream"
    );
    let forwarded = seen[0].header("authorization");
    assert!(seen.iter().all(|s| s.header("authorization") == forwarded));
    world
        .management
        .verify(forwarded.trim_start_matches("Bearer "))?;
    Ok(())
}

#[tokio::test]
async fn a_bad_plugin_configuration_is_refused_by_envoy() -> Result<()> {
    let upstream = Upstream::start().await?;
    let dead = dead_address().await?;
    let filter = wasm_filter(
        &filter_wasm()?,
        &json!({"grpc_cluster": "tokensmith", "cache": {"slots": 0}}),
    );
    let config = bootstrap(vec![filter], dead, upstream.addr);
    let error = match Envoy::start(&config).await {
        Ok(_) => anyhow::bail!("Envoy started with a bad plugin configuration"),
        Err(e) => e.to_string(),
    };
    assert!(
        error.contains(
            "plugin config: `cache.slots`: must be a whole number from 1 to 65536, got 0"
        ),
        "the log names the key and the problem:\n{error}"
    );
    Ok(())
}

/// Envoy with the filter in front of `companion`, and what the upstream saw.
async fn filter_envoy(
    companion: std::net::SocketAddr,
    config: serde_json::Value,
) -> Result<(Envoy, Upstream)> {
    let upstream = Upstream::start().await?;
    let filter = wasm_filter(&filter_wasm()?, &config);
    let envoy = Envoy::start(&bootstrap(vec![filter], companion, upstream.addr)).await?;
    Ok((envoy, upstream))
}

#[tokio::test]
async fn companion_down_fails_closed_with_503_by_default() -> Result<()> {
    let (envoy, upstream) =
        filter_envoy(dead_address().await?, json!({"grpc_cluster": "tokensmith"})).await?;
    let reply = http::get(envoy.addr, "/", &[("authorization", "Bearer abc")]).await?;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "identity service unavailable")
    );
    assert_eq!(upstream.count(), 0);
    assert_eq!(envoy.stat("wasmcustom.tokensmith.errors").await?, 1);
    Ok(())
}

#[tokio::test]
async fn companion_down_with_failure_mode_allow_passes_without_the_workload_token() -> Result<()> {
    let config = json!({"grpc_cluster": "tokensmith", "failure_mode": "allow"});
    let (envoy, upstream) = filter_envoy(dead_address().await?, config).await?;
    passes_without_the_credential(&envoy, &upstream).await
}

/// With the companion away and `failure_mode: allow`, a request passes unauthenticated:
/// its credential is removed, never forwarded.
pub async fn passes_without_the_credential(envoy: &Envoy, upstream: &Upstream) -> Result<()> {
    let reply = http::get(
        envoy.addr,
        "/",
        &[("authorization", "Bearer workload-secret")],
    )
    .await?;
    assert_eq!(reply.status, 200);
    let seen = upstream.seen().pop().context("upstream called")?;
    assert_eq!(
        seen.header("authorization"),
        "",
        "the credential must be removed"
    );
    assert!(!seen.headers.values().any(|v| v.contains("workload-secret")));
    Ok(())
}

#[tokio::test]
async fn an_unknown_grpc_cluster_is_answered_at_once_per_failure_mode() -> Result<()> {
    let dead = dead_address().await?;
    let (envoy, upstream) = filter_envoy(dead, json!({"grpc_cluster": "no-such-cluster"})).await?;
    let reply = http::get(envoy.addr, "/", &[("authorization", "Bearer abc")]).await?;
    assert_eq!(reply.status, 503);
    let config = json!({"grpc_cluster": "no-such-cluster", "failure_mode": "allow"});
    let (open, open_upstream) = filter_envoy(dead, config).await?;
    let reply = http::get(open.addr, "/", &[("authorization", "Bearer abc")]).await?;
    assert_eq!(reply.status, 200);
    assert_eq!(open_upstream.seen()[0].header("authorization"), "");
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn a_missing_token_can_be_let_through_untouched() -> Result<()> {
    let config = json!({"grpc_cluster": "tokensmith", "on_missing_token": "allow"});
    let (envoy, upstream) = filter_envoy(dead_address().await?, config).await?;
    let reply = http::get(envoy.addr, "/", &[("x-other", "1")]).await?;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.seen()[0].header("x-other"), "1");
    Ok(())
}
