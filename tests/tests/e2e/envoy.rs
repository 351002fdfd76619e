//! Both delivery paths through a real Envoy — the native ext_authz filter (as Istio's
//! CUSTOM provider configures it) and the Tokensmith wasm filter — against one scenario
//! matrix: what the client and the upstream see.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokensmith_tests::{
    Endpoint, FakeCluster, Fault,
    envoy::{Envoy, ExtAuthz, bootstrap, ext_authz_filter, wasm_filter},
    http::{self, HttpResponse},
    istio::{self, Sidecar},
    process::{filter_wasm, workspace_root},
    upstream::Upstream,
};

use crate::companion::World;

/// How the request reaches the companion, and how the Envoy in front is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Envoy's `envoy.filters.http.ext_authz` (Istio CUSTOM provider), plain bed.
    ExtAuthz,
    /// The Tokensmith proxy-wasm filter (Istio WasmPlugin), plain bed.
    Filter,
    /// ext_authz as istiod renders a CUSTOM provider, through the companion's sidecar.
    IstioExtAuthz,
    /// The filter as istiod delivers the shipped WasmPlugin, through the sidecar.
    IstioFilter,
}

/// The shipped WasmPlugin's `pluginConfig` (what the Istio bed runs, unchanged).
pub fn shipped_plugin_config() -> Result<Value> {
    let text = std::fs::read_to_string(workspace_root().join("wasmplugin/wasmplugin.yaml"))?;
    let plugin: serde_yaml::Value = serde_yaml::from_str(&text)?;
    Ok(serde_json::to_value(&plugin["spec"]["pluginConfig"])?)
}

/// The HTTP filter for a plain-bed `path` in front of a companion at `companion`.
/// `fail_open` maps to `failure_mode_allow` / `failure_mode: allow`; `filter_config`
/// adds plugin keys.
pub fn path_filter(
    path: Path,
    companion: SocketAddr,
    fail_open: bool,
    filter_config: &Value,
) -> Result<Value> {
    Ok(match path {
        Path::ExtAuthz | Path::IstioExtAuthz => {
            let mut settings = ExtAuthz::recommended(companion);
            settings.failure_mode_allow = fail_open;
            if let Some(ms) = filter_config.get("timeout_ms").and_then(Value::as_u64) {
                settings.timeout = Duration::from_millis(ms);
            }
            ext_authz_filter(&settings)
        }
        Path::Filter | Path::IstioFilter => {
            let config = plugin_config(
                json!({"grpc_cluster": "tokensmith", "timeout_ms": 2000}),
                fail_open,
                filter_config,
            );
            wasm_filter(&filter_wasm()?, &config)
        }
    })
}

/// `base` with `failure_mode: allow` when `fail_open`, then `extra`'s keys on top.
fn plugin_config(mut base: Value, fail_open: bool, extra: &Value) -> Value {
    if fail_open {
        base["failure_mode"] = json!("allow");
    }
    for (k, v) in extra.as_object().into_iter().flatten() {
        base[k] = v.clone();
    }
    base
}

/// The Envoy (and, on the Istio bed, the sidecar) in front of a companion.
pub struct Front {
    pub envoy: Envoy,
    pub sidecar: Option<Sidecar>,
}

impl Front {
    /// Starts `path`'s Envoy in front of `companion`, forwarding to `upstream`.
    pub async fn start(
        path: Path,
        companion: SocketAddr,
        upstream: SocketAddr,
        fail_open: bool,
        filter_config: &Value,
    ) -> Result<Front> {
        if matches!(path, Path::ExtAuthz | Path::Filter) {
            let filter = path_filter(path, companion, fail_open, filter_config)?;
            let config = bootstrap(vec![filter], companion, upstream);
            Envoy::validate(&config).await?;
            return Ok(Front {
                envoy: Envoy::start(&config).await?,
                sidecar: None,
            });
        }
        let timeout_s = filter_config
            .get("timeout_ms")
            .and_then(Value::as_u64)
            .map_or(2, |ms| ms.div_ceil(1000));
        let filter_config = filter_config.clone();
        let (envoy, sidecar) = istio::start_gateway(companion, upstream, "gateway", |dir| {
            Ok(match path {
                Path::IstioFilter => {
                    let config = plugin_config(
                        shipped_plugin_config()
                            .map_err(|e| tokensmith_tests::Error::Envoy(e.to_string()))?,
                        fail_open,
                        &filter_config,
                    );
                    vec![istio::wasm_plugin_filter(
                        dir,
                        istio::PLUGIN_NAME,
                        &filter_wasm()?,
                        &config,
                    )?]
                }
                _ => istio::custom_provider_filters(timeout_s, fail_open),
            })
        })
        .await?;
        Ok(Front {
            envoy,
            sidecar: Some(sidecar),
        })
    }
}

/// A World plus an upstream and an Envoy in front of the companion.
pub struct Stage {
    pub world: World,
    pub upstream: Upstream,
    pub envoy: Envoy,
    pub path: Path,
    _sidecar: Option<Sidecar>,
}

impl Stage {
    pub async fn start(path: Path, extra: &[&str]) -> Result<Stage> {
        Self::start_with(path, extra, &json!({})).await
    }

    pub async fn start_with(path: Path, extra: &[&str], filter_config: &Value) -> Result<Stage> {
        let world = World::start(extra).await?;
        let upstream = Upstream::start().await?;
        let front = Front::start(
            path,
            world.companion.addr,
            upstream.addr,
            false,
            filter_config,
        )
        .await?;
        Ok(Stage {
            world,
            upstream,
            envoy: front.envoy,
            path,
            _sidecar: front.sidecar,
        })
    }

    /// The wasm filter on the plain bed, its Envoy on one worker thread: every request
    /// meets the same VM, so what the filter keeps per worker (coalesced misses,
    /// background refreshes) is what the test sees.
    pub async fn start_filter_on_one_worker(
        extra: &[&str],
        filter_config: &Value,
    ) -> Result<Stage> {
        let world = World::start(extra).await?;
        let upstream = Upstream::start().await?;
        let companion = world.companion.addr;
        let filter = path_filter(Path::Filter, companion, false, filter_config)?;
        let config = bootstrap(vec![filter], companion, upstream.addr);
        let envoy = Envoy::start_with_workers(&config, 1).await?;
        Ok(Stage {
            world,
            upstream,
            envoy,
            path: Path::Filter,
            _sidecar: None,
        })
    }

    pub async fn get(&self, token: Option<&str>) -> Result<HttpResponse> {
        let header = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = header
            .iter()
            .map(|h| ("authorization", h.as_str()))
            .collect();
        let path = "/api/v1/namespaces/app-prod/secrets";
        Ok(http::get(self.envoy.addr, path, &headers).await?)
    }

    /// Requests this path allowed / denied, by Envoy's or the filter's own counters.
    pub async fn counted(&self, what: &str) -> Result<u64> {
        let name = match (self.path, what) {
            (Path::ExtAuthz, "allowed") => "http.ingress.ext_authz.ok",
            (Path::ExtAuthz, "denied") => "http.ingress.ext_authz.denied",
            (Path::IstioExtAuthz, "allowed") => "http.outbound_0.0.0.0_8080.ext_authz.ok",
            (Path::IstioExtAuthz, "denied") => "http.outbound_0.0.0.0_8080.ext_authz.denied",
            (Path::Filter | Path::IstioFilter, "allowed") => "wasmcustom.tokensmith.allowed",
            (Path::Filter | Path::IstioFilter, "denied") => "wasmcustom.tokensmith.denied",
            _ => anyhow::bail!("no counter for {what}"),
        };
        Ok(self.envoy.stat(name).await?)
    }
}

/// Runs each named `async fn(Path) -> Result<()>` once per path and bed, as four tests.
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn through_ext_authz() -> anyhow::Result<()> {
                super::$name(super::Path::ExtAuthz).await
            }
            #[tokio::test]
            async fn through_the_wasm_filter() -> anyhow::Result<()> {
                super::$name(super::Path::Filter).await
            }
            #[tokio::test]
            async fn through_ext_authz_as_istio_renders_it() -> anyhow::Result<()> {
                super::$name(super::Path::IstioExtAuthz).await
            }
            #[tokio::test]
            async fn through_the_wasm_plugin_as_istio_renders_it() -> anyhow::Result<()> {
                super::$name(super::Path::IstioFilter).await
            }
        }
    )*};
}
pub(crate) use on_both_paths;

on_both_paths!(
    upstream_receives_a_management_token_never_the_workload_token,
    denials_reach_the_client_and_never_the_upstream,
    api_servers_down_or_slow_are_service_unavailable,
    companion_503_and_429_denials_hold_even_with_fail_open,
    five_hundred_requests_at_32_in_flight_all_get_their_own_identity,
    one_client_flooding_forged_tokens_leaves_the_review_turns_of_others,
);

/// A client at 127.0.0.2 sends 40 forged tokens at once (the workload issuer, keys it
/// never published: each needs a TokenReview, slowed to 400 ms); a client at 127.0.0.3
/// with a real token that was never reviewed still gets its turn at once. Envoy names
/// the client in the CheckRequest's `source` (ext_authz), the filter from its
/// `source.address` property.
async fn one_client_flooding_forged_tokens_leaves_the_review_turns_of_others(
    path: Path,
) -> Result<()> {
    const FLOOD: usize = 40;
    let limits = [
        "--review-max-in-flight",
        "8",
        "--review-max-in-flight-per-source",
        "2",
    ];
    let stage = Stage::start(path, &limits).await?;
    let forger = FakeCluster::builder("forger")
        .issuer(stage.world.workload.issuer())
        .signing_key(3)
        .start()
        .await?;
    stage.world.workload.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenReview),
        delay: Duration::from_millis(400),
    });
    let addr = stage.envoy.addr;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..FLOOD {
        let sa = forger.add_service_account("app-prod", &format!("sa-{i}"));
        let header = format!("Bearer {}", forger.mint(&sa).sign());
        flood.spawn(async move {
            let mut connection = http::Connection::open_from(addr, [127, 0, 0, 2].into()).await?;
            anyhow::Ok(
                connection
                    .get("/", &[("authorization", &header)])
                    .await?
                    .status,
            )
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let token = stage.world.workload_token(Duration::from_secs(3600));
    let mut other = http::Connection::open_from(addr, [127, 0, 0, 3].into()).await?;
    let reply = other
        .get("/", &[("authorization", &format!("Bearer {token}"))])
        .await?;
    assert_eq!(
        reply.status, 200,
        "the other client was starved: {}",
        reply.body
    );
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    while let Some(status) = flood.join_next().await {
        *statuses.entry(status??).or_default() += 1;
    }
    assert!(
        statuses.keys().all(|s| [401, 429].contains(s)),
        "{statuses:?}"
    );
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= FLOOD / 2,
        "the flooding client keeps to its share: {statuses:?}"
    );
    Ok(())
}

/// An address where nothing listens (bound, then released).
pub async fn dead_address() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?)
}

async fn upstream_receives_a_management_token_never_the_workload_token(path: Path) -> Result<()> {
    let stage = Stage::start(path, &[]).await?;
    let workload_token = stage.world.workload_token(Duration::from_secs(3600));
    let reply = stage.get(Some(&workload_token)).await?;
    assert_eq!(reply.status, 200, "{}", reply.body);

    let seen = stage.upstream.seen();
    assert_eq!(seen.len(), 1);
    let forwarded = seen[0]
        .header("authorization")
        .strip_prefix("Bearer ")
        .context("bearer upstream")?;
    let claims = stage.world.management.verify(forwarded)?;
    assert_eq!(claims.sub, "system:serviceaccount:app-prod:eso-sa");
    assert_eq!(claims.service_account_uid, stage.world.management_sa.uid);
    for (name, value) in &seen[0].headers {
        for part in workload_token.split('.') {
            assert!(
                !value.contains(part),
                "workload token segment in upstream header {name}"
            );
        }
    }
    assert_eq!(stage.counted("allowed").await?, 1);
    Ok(())
}

async fn denials_reach_the_client_and_never_the_upstream(path: Path) -> Result<()> {
    let stage = Stage::start(path, &[]).await?;
    let w = &stage.world.workload;
    let stranger = FakeCluster::start("stranger").await?;
    let stranger_sa = stranger.add_service_account("app-prod", "eso-sa");
    let ghost = w.add_service_account("app-prod", "ghost");
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("missing header", None, 401),
        ("garbage", Some("garbage".into()), 401),
        (
            "expired",
            Some(w.mint(&stage.world.workload_sa).expired().sign()),
            401,
        ),
        (
            "foreign issuer",
            Some(stranger.mint(&stranger_sa).sign()),
            401,
        ),
        // User tokens come from another issuer: refused before any review.
        ("not a service account", Some(w.mint_user("alice")), 401),
        ("missing in management", Some(w.mint(&ghost).sign()), 403),
    ];
    for (what, token, status) in &cases {
        let reply = stage.get(token.as_deref()).await?;
        assert_eq!(reply.status, *status, "{what}: {}", reply.body);
        assert!(!reply.body.is_empty(), "{what}: a short reason in the body");
        if *status == 401 {
            assert!(
                reply.header("www-authenticate").starts_with("Bearer"),
                "{what}"
            );
        }
    }
    let malformed = http::get(stage.envoy.addr, "/", &[("authorization", "Token abc")]).await?;
    assert_eq!(malformed.status, 401);
    assert_eq!(stage.upstream.count(), 0, "the upstream must not be called");
    assert_eq!(stage.counted("denied").await?, cases.len() as u64 + 1);
    Ok(())
}

async fn api_servers_down_or_slow_are_service_unavailable(path: Path) -> Result<()> {
    let stage = Stage::start(path, &["--kube-timeout", "300ms"]).await?;
    let token = stage.world.workload_token(Duration::from_secs(3600));

    stage.world.workload.inject(Fault::Refuse);
    let reply = stage.get(Some(&token)).await?;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "identity service unavailable")
    );
    stage.world.workload.clear_faults();

    stage.world.management.inject(Fault::Status {
        endpoint: Some(Endpoint::TokenRequest),
        code: 500,
    });
    assert_eq!(stage.get(Some(&token)).await?.status, 503);
    stage.world.management.clear_faults();

    stage.world.management.inject(Fault::Latency {
        endpoint: Some(Endpoint::TokenRequest),
        delay: Duration::from_secs(2),
    });
    let reply = stage.get(Some(&token)).await?;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (503, "identity service timed out")
    );
    assert_eq!(stage.upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn companion_down_is_503_with_status_on_error_and_envoys_default_would_be_403() -> Result<()>
{
    let upstream = Upstream::start().await?;
    let dead = dead_address().await?;
    let recommended = Envoy::start(&bootstrap(
        vec![ext_authz_filter(&ExtAuthz::recommended(dead))],
        dead,
        upstream.addr,
    ))
    .await?;
    let reply = http::get(recommended.addr, "/", &[("authorization", "Bearer abc")]).await?;
    assert_eq!(reply.status, 503);

    // Without status_on_error Envoy answers 403, which hides an outage as a denial.
    let mut filter = ext_authz_filter(&ExtAuthz::recommended(dead));
    filter["typed_config"]
        .as_object_mut()
        .context("typed_config")?
        .remove("status_on_error");
    let defaults = Envoy::start(&bootstrap(vec![filter], dead, upstream.addr)).await?;
    let reply = http::get(defaults.addr, "/", &[("authorization", "Bearer abc")]).await?;
    assert_eq!(reply.status, 403);
    assert_eq!(upstream.count(), 0);
    Ok(())
}

async fn companion_503_and_429_denials_hold_even_with_fail_open(path: Path) -> Result<()> {
    // The companion's own denials through a fail-open Envoy / filter: its rate limit
    // (429, RESOURCE_EXHAUSTED; Envoy versions have differed on whether that code is a
    // denial) and a dependency down (503).
    let world = World::start(&["--rate-limit", "0.2", "--rate-limit-burst", "1"]).await?;
    let upstream = Upstream::start().await?;
    let front = Front::start(path, world.companion.addr, upstream.addr, true, &json!({})).await?;
    let envoy = &front.envoy;
    let get = |token: String| async move {
        http::get(
            envoy.addr,
            "/",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await
    };
    let first = get(world.workload_token(Duration::from_secs(3600))).await?;
    assert_eq!(first.status, 200, "{}", first.body);
    // Another token of the same identity: a miss in the filter's cache too, so a Check,
    // and the identity's bucket is empty.
    let throttled = get(world.workload_token(Duration::from_secs(3600))).await?;
    assert_eq!(
        (throttled.status, throttled.body.as_str()),
        (429, "too many requests")
    );
    let retry_after: u64 = throttled.header("retry-after").parse()?;
    // One check per 5 s: the wait is what is left of those 5 s, rounded up.
    assert!((1..=5).contains(&retry_after), "retry-after {retry_after}");

    let other = world.workload.add_service_account("app-prod", "other");
    world.management.add_service_account("app-prod", "other");
    world.management.inject(Fault::Refuse);
    let down = get(world.workload.mint(&other).sign()).await?;
    assert_eq!(down.status, 503, "{}", down.body);
    assert_eq!(upstream.count(), 1, "fail-open must not let these through");
    Ok(())
}

async fn five_hundred_requests_at_32_in_flight_all_get_their_own_identity(
    path: Path,
) -> Result<()> {
    const REQUESTS: usize = 500;
    const IN_FLIGHT: usize = 32;
    // The companion's caches off: every request takes the whole exchange path. A long
    // deadline: this is about correctness under concurrency, not latency on 2 cores.
    let caches_off = ["--cache-max-entries", "0", "--validation-cache-ttl", "0"];
    let stage = Stage::start_with(path, &caches_off, &json!({"timeout_ms": 10000})).await?;
    let names = ["eso-sa", "reader", "writer", "auditor"];
    let mut tokens = Vec::new();
    for name in names {
        let sa = if name == "eso-sa" {
            stage.world.workload_sa.clone()
        } else {
            stage.world.management.add_service_account("app-prod", name);
            stage.world.workload.add_service_account("app-prod", name)
        };
        tokens.push((name, stage.world.workload.mint(&sa).sign()));
    }
    let tokens = Arc::new(tokens);
    let addr = stage.envoy.addr;
    let mut workers = Vec::new();
    for worker in 0..IN_FLIGHT {
        let tokens = tokens.clone();
        workers.push(tokio::spawn(async move {
            let mut connection = http::Connection::open(addr).await?;
            let mut statuses = HashMap::<u16, usize>::new();
            for i in (worker..REQUESTS).step_by(IN_FLIGHT) {
                let (name, token) = &tokens[i % tokens.len()];
                let reply = connection
                    .get(
                        &format!("/who/{name}"),
                        &[("authorization", &format!("Bearer {token}"))],
                    )
                    .await?;
                *statuses.entry(reply.status).or_default() += 1;
            }
            anyhow::Ok(statuses)
        }));
    }
    let mut statuses = HashMap::<u16, usize>::new();
    for worker in workers {
        for (status, n) in worker.await?? {
            *statuses.entry(status).or_default() += n;
        }
    }
    assert_eq!(statuses, HashMap::from([(200, REQUESTS)]));
    // Every forwarded token belongs to the service account the path names.
    let seen = stage.upstream.seen();
    assert_eq!(seen.len(), REQUESTS);
    for request in seen {
        let name = request.path.trim_start_matches("/who/");
        let token = request
            .header("authorization")
            .trim_start_matches("Bearer ");
        let claims = stage.world.management.verify(token)?;
        assert_eq!(claims.service_account_name, name);
    }
    Ok(())
}
