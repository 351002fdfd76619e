//! `tokensmith-load`: a bounded load run on 127.0.0.1 against a real companion (and
//! Envoy), with fake API servers behind it. Prints throughput and latency percentiles.
//!
//!   cargo run --release -p tokensmith-tests --bin tokensmith-load -- --scenario all

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use tokensmith_proto::envoy::service::auth::v3::check_response::HttpResponse;
use tokensmith_tests::{
    FakeCluster, Rights,
    companion::{Companion, envoy_like_check},
    envoy::{Envoy, ExtAuthz, bootstrap, ext_authz_filter, wasm_filter},
    http,
    process::filter_wasm,
    upstream::Upstream,
};

/// Load scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// gRPC Checks straight to the companion, one identity over and over (cache hits).
    CompanionHot,
    /// gRPC Checks straight to the companion, a new identity each time (TokenReview +
    /// TokenRequest every time).
    CompanionCold,
    /// HTTP through Envoy's ext_authz to the companion, one identity.
    EnvoyExtAuthz,
    /// HTTP through Envoy with the Tokensmith wasm filter, one identity.
    EnvoyFilter,
    /// Every scenario in turn.
    All,
}

#[derive(Debug, Parser)]
#[command(about = "Bounded load runs against a local companion and Envoy")]
struct Args {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,
    /// Requests per scenario (at most 100,000).
    #[arg(long, default_value_t = 5000)]
    requests: usize,
    /// Requests in flight (at most 256).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

struct Report {
    name: &'static str,
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Report {
    fn print(&mut self) {
        self.latencies.sort();
        let pct = |p: f64| {
            let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
            self.latencies[i].as_secs_f64() * 1000.0
        };
        println!(
            "| {:<16} | {:>7} | {:>9.0} | {:>8.2} | {:>8.2} | {:>8.2} |",
            self.name,
            self.latencies.len(),
            self.latencies.len() as f64 / self.wall.as_secs_f64(),
            pct(0.5),
            pct(0.99),
            pct(1.0),
        );
    }
}

/// Runs `requests` calls of `call(i)` with `concurrency` in flight; every call must succeed.
async fn drive<F, Fut>(
    name: &'static str,
    requests: usize,
    concurrency: usize,
    call: F,
) -> Result<Report>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let call = call.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in (w..requests).step_by(concurrency) {
                let t = Instant::now();
                call(i).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    for w in workers {
        latencies.extend(w.await??);
    }
    Ok(Report {
        name,
        latencies,
        wall: started.elapsed(),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.requests == 0
        || args.requests > 100_000
        || args.concurrency == 0
        || args.concurrency > 256
    {
        bail!("--requests must be 1..=100000 and --concurrency 1..=256");
    }
    let workload = FakeCluster::start("workload").await?;
    let management = FakeCluster::start("management").await?;
    let sa = workload.add_service_account("app-prod", "eso-sa");
    management.add_service_account("app-prod", "eso-sa");
    let reviewer = workload.kubeconfig_with("tokensmith", Rights::TOKEN_REVIEW)?;
    let minter = management.kubeconfig_with("tokensmith", Rights::TOKEN_REQUEST)?;
    let companion =
        Arc::new(Companion::start_serving(&reviewer, &minter, &["--log-level", "info"]).await?);
    let token = Arc::new(
        workload
            .mint(&sa)
            .expiring_in(Duration::from_secs(3600))
            .sign(),
    );
    let scenarios = match args.scenario {
        Scenario::All => vec![
            Scenario::CompanionHot,
            Scenario::CompanionCold,
            Scenario::EnvoyExtAuthz,
            Scenario::EnvoyFilter,
        ],
        one => vec![one],
    };
    println!("| scenario         | requests | req/s     | p50 ms   | p99 ms   | max ms   |");
    println!("|------------------|---------:|----------:|---------:|---------:|---------:|");
    for scenario in scenarios {
        let (n, c) = (args.requests, args.concurrency);
        let mut report = match scenario {
            Scenario::CompanionHot => {
                let (companion, token) = (companion.clone(), token.clone());
                drive("companion hot", n, c, move |_| {
                    let (companion, token) = (companion.clone(), token.clone());
                    async move { expect_allow(&companion, &token).await }
                })
                .await?
            }
            Scenario::CompanionCold => {
                // A distinct identity per request: nothing to reuse.
                let cold = n.min(2000);
                let mut tokens = Vec::with_capacity(cold);
                for i in 0..cold {
                    let name = format!("cold-{i}");
                    management.add_service_account("app-prod", &name);
                    tokens.push(
                        workload
                            .mint(&workload.add_service_account("app-prod", &name))
                            .sign(),
                    );
                }
                let (companion, tokens) = (companion.clone(), Arc::new(tokens));
                drive("companion cold", cold, c, move |i| {
                    let (companion, tokens) = (companion.clone(), tokens.clone());
                    async move { expect_allow(&companion, &tokens[i]).await }
                })
                .await?
            }
            Scenario::EnvoyExtAuthz | Scenario::EnvoyFilter => {
                let upstream = Upstream::start().await?;
                let filter = if scenario == Scenario::EnvoyFilter {
                    wasm_filter(
                        &filter_wasm()?,
                        &serde_json::json!({"grpc_cluster": "tokensmith"}),
                    )
                } else {
                    ext_authz_filter(&ExtAuthz::recommended(companion.addr))
                };
                let envoy =
                    Envoy::start(&bootstrap(vec![filter], companion.addr, upstream.addr)).await?;
                let addr = envoy.addr;
                let name = if scenario == Scenario::EnvoyFilter {
                    "envoy + filter"
                } else {
                    "envoy + ext_authz"
                };
                let bearer = Arc::new(format!("Bearer {token}"));
                let connections: Arc<Vec<tokio::sync::Mutex<http::Connection>>> = Arc::new({
                    let mut v = Vec::new();
                    for _ in 0..c {
                        v.push(tokio::sync::Mutex::new(http::Connection::open(addr).await?));
                    }
                    v
                });
                let report = drive(name, n, c, move |i| {
                    let (connections, bearer) = (connections.clone(), bearer.clone());
                    async move {
                        let mut connection = connections[i % connections.len()].lock().await;
                        let reply = connection
                            .get(
                                "/api/v1/namespaces/app-prod/secrets",
                                &[("authorization", &bearer)],
                            )
                            .await?;
                        if reply.status != 200 {
                            bail!("HTTP {}: {}", reply.status, reply.body);
                        }
                        Ok(())
                    }
                })
                .await?;
                drop(envoy);
                report
            }
            Scenario::All => continue,
        };
        report.print();
    }
    Ok(())
}

async fn expect_allow(companion: &Companion, token: &str) -> Result<()> {
    let response = companion
        .check_request(
            envoy_like_check(&[("authorization", &format!("Bearer {token}"))]),
            Some(Duration::from_secs(5)),
        )
        .await
        .context("Check failed")?;
    match response.http_response {
        Some(HttpResponse::OkResponse(_)) => Ok(()),
        _ => bail!("denied: {:?}", response.status.map(|s| s.message)),
    }
}
