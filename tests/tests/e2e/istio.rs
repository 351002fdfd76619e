//! What only the Istio-shaped gateway shows: hostile header bytes, other hosts on a
//! shared gateway, the shipped WasmPlugin under load, fail-open, and two plugins in one
//! Envoy. The decision matrix itself runs on this bed in `envoy`.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use serde_json::json;
use tokensmith_tests::{
    Endpoint,
    envoy::{Envoy, bootstrap, cluster, router, wasm_filter},
    http,
    process::filter_wasm,
    upstream::Upstream,
};

use crate::{
    companion::World,
    envoy::{Front, Path, Stage, dead_address, on_both_paths},
};

on_both_paths!(header_bytes_that_are_not_utf8_never_stop_correct_decisions);

/// Checks decided by the companion so far.
async fn checks(world: &World) -> Result<usize> {
    Ok(world
        .companion
        .log_records()
        .await?
        .iter()
        .filter(|r| r["message"] == "check decided")
        .count())
}

async fn header_bytes_that_are_not_utf8_never_stop_correct_decisions(path: Path) -> Result<()> {
    let stage = Stage::start(path, &[]).await?;
    let token = format!(
        "Bearer {}",
        stage.world.workload_token(Duration::from_secs(3600))
    );
    let addr = stage.envoy.addr;
    let path_ = "/api/v1/namespaces/app-prod/secrets";
    for round in 0..3 {
        // Another header not UTF-8, without a token: refused for the missing token.
        // (Never print a body that could be the upstream's echo: it holds tokens.)
        let reply = http::get_raw(addr, path_, &[("x-note", b"caf\xe9")]).await?;
        assert_eq!(reply.status, 401, "round {round}");
        // A credential that is not UTF-8: malformed.
        let reply = http::get_raw(addr, path_, &[("authorization", b"Bearer caf\xe9")]).await?;
        assert_eq!(reply.status, 401, "round {round}");
        // With a valid token beside a header that is not UTF-8: exchanged.
        let reply = http::get_raw(
            addr,
            path_,
            &[
                ("x-note", b"\xff\xfe caf\xe9"),
                ("authorization", token.as_bytes()),
            ],
        )
        .await?;
        assert_eq!(reply.status, 200, "round {round}: {}", reply.body);
    }
    // Afterwards the proxy still decides: a valid token passes, a bad one does not.
    assert_eq!(
        stage
            .get(Some(token.trim_start_matches("Bearer ")))
            .await?
            .status,
        200
    );
    assert_eq!(stage.get(Some("garbage")).await?.status, 401);
    let seen = stage.upstream.seen();
    assert_eq!(seen.len(), 4, "only the valid requests went upstream");
    for request in &seen {
        let forwarded = request
            .header("authorization")
            .trim_start_matches("Bearer ");
        stage.world.management.verify(forwarded)?;
    }
    Ok(())
}

// Only the Istio bed scopes by host (the CUSTOM rule's `hosts`, the plugin's `hosts`).
#[tokio::test]
async fn another_hosts_request_passes_the_custom_provider_untouched() -> Result<()> {
    a_request_for_another_host_passes_untouched_and_costs_no_check(Path::IstioExtAuthz).await
}

#[tokio::test]
async fn another_hosts_request_passes_the_wasm_plugin_untouched() -> Result<()> {
    a_request_for_another_host_passes_untouched_and_costs_no_check(Path::IstioFilter).await
}

async fn a_request_for_another_host_passes_untouched_and_costs_no_check(path: Path) -> Result<()> {
    let stage = Stage::start(path, &[]).await?;
    let theirs = "Bearer another-applications-token";
    for _ in 0..3 {
        let reply = http::get_raw(
            stage.envoy.addr,
            "/their/api",
            &[
                ("host", b"other-app.example.com"),
                ("authorization", theirs.as_bytes()),
            ],
        )
        .await?;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }
    let seen = stage.upstream.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.header("authorization") == theirs));
    assert_eq!(checks(&stage.world).await?, 0, "no Check for another host");
    assert_eq!(stage.world.workload.count(Endpoint::TokenReview), 0);
    // The management host is still guarded.
    assert_eq!(stage.get(None).await?.status, 401);
    Ok(())
}

#[tokio::test]
async fn the_shipped_wasm_plugin_answers_repeats_from_its_cache() -> Result<()> {
    const REQUESTS: usize = 2000;
    const IN_FLIGHT: usize = 32;
    let stage = Stage::start(Path::IstioFilter, &[]).await?;
    let mut tokens = Vec::new();
    for name in ["eso-sa", "reader", "writer", "auditor"] {
        let sa = if name == "eso-sa" {
            stage.world.workload_sa.clone()
        } else {
            stage.world.management.add_service_account("app-prod", name);
            stage.world.workload.add_service_account("app-prod", name)
        };
        tokens.push(format!("Bearer {}", stage.world.workload.mint(&sa).sign()));
    }
    let tokens = Arc::new(tokens);
    let mut workers = Vec::new();
    for worker in 0..IN_FLIGHT {
        let (tokens, addr) = (tokens.clone(), stage.envoy.addr);
        workers.push(tokio::spawn(async move {
            let mut connection = http::Connection::open(addr).await?;
            let mut ok = 0;
            for i in (worker..REQUESTS).step_by(IN_FLIGHT) {
                let token = &tokens[i % tokens.len()];
                let reply = connection.get("/api", &[("authorization", token)]).await?;
                ok += usize::from(reply.status == 200);
            }
            anyhow::Ok(ok)
        }));
    }
    let mut ok = 0;
    for worker in workers {
        ok += worker.await??;
    }
    assert_eq!(ok, REQUESTS);
    let checks = checks(&stage.world).await?;
    assert!(
        checks * 20 <= REQUESTS,
        "{checks} Checks for {REQUESTS} requests: more than 5 %"
    );
    // A request that cost no Check of its own was a hit, or waited on another's Check.
    let hits = stage.envoy.stat("wasmcustom.tokensmith.cache_hits").await?;
    let waits = stage
        .envoy
        .stat("wasmcustom.tokensmith.coalesced_waits")
        .await?;
    assert!(
        (hits + waits) as usize >= REQUESTS - checks,
        "{hits} hits, {waits} coalesced"
    );
    Ok(())
}

#[tokio::test]
async fn the_shipped_wasm_plugin_fails_open_without_the_credential() -> Result<()> {
    let upstream = Upstream::start().await?;
    let front = Front::start(
        Path::IstioFilter,
        dead_address().await?,
        upstream.addr,
        true,
        &json!({}),
    )
    .await?;
    crate::filter::passes_without_the_credential(&front.envoy, &upstream).await
}

#[tokio::test]
async fn two_plugins_in_one_envoy_never_serve_each_others_answers() -> Result<()> {
    // Two companions: `a` trusts the token's workload cluster, `b` another one.
    let a = World::start(&[]).await?;
    let b = World::start(&[]).await?;
    let upstream = Upstream::start().await?;
    let wasm = filter_wasm()?;
    // One Envoy, two listeners, each with the same filter (same code, same VM) for its
    // own companion.
    let mut config = bootstrap(vec![], a.companion.addr, upstream.addr);
    let listener = config["static_resources"]["listeners"][0].clone();
    let mut listeners = Vec::new();
    for (name, cluster_name) in [("a", "tokensmith"), ("b", "tokensmith-b")] {
        let mut l = listener.clone();
        l["name"] = json!(name);
        let hcm = &mut l["filter_chains"][0]["filters"][0]["typed_config"];
        hcm["http_filters"] = json!([
            wasm_filter(&wasm, &json!({"grpc_cluster": cluster_name})),
            router()
        ]);
        listeners.push(l);
    }
    config["static_resources"]["listeners"] = json!(listeners);
    config["static_resources"]["clusters"]
        .as_array_mut()
        .context("clusters")?
        .push(cluster("tokensmith-b", b.companion.addr, true));
    Envoy::validate(&config).await?;
    let envoy = Envoy::start(&config).await?;
    let addrs = envoy.listeners().await?;
    let addr = |name: &str| {
        addrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .context("listener")
    };
    let token = format!("Bearer {}", a.workload_token(Duration::from_secs(3600)));
    let path = "/api/v1/namespaces/app-prod/secrets";
    let headers = [("authorization", token.as_str())];
    assert_eq!(http::get(addr("a")?, path, &headers).await?.status, 200);
    assert_eq!(
        http::get(addr("a")?, path, &headers).await?.status,
        200,
        "a's cache"
    );
    for _ in 0..2 {
        let reply = http::get(addr("b")?, path, &headers).await?;
        assert_eq!(reply.status, 401, "b's companion refuses it");
    }
    assert_eq!(checks(&a).await?, 1);
    assert_eq!(checks(&b).await?, 2, "b never answered from a's entry");
    assert_eq!(upstream.count(), 2);
    Ok(())
}
