//! The in-process tier: the companion's `server::start` on port 0 inside the test, Check
//! driven directly over gRPC. For the logic that needs neither Envoy nor a process of its
//! own; the tests beside it start the real binary.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use tokensmith_proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tokensmith_service::{
    cli::{Cli, Command},
    config::AuthzConfig,
    server::{self, Running},
};
use tokensmith_tests::{companion::ClusterPair, companion::envoy_like_check, http};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    companion::{allowed_token, denied},
    production::sample,
};

/// A companion inside this test, and a client of it.
struct InProcess {
    running: Running,
    client: AuthorizationClient<Channel>,
}

impl InProcess {
    /// `tokensmith authz` with the pair's least-privilege kubeconfigs and `extra` flags,
    /// parsed as the binary parses them, serving once health says so.
    async fn start(pair: &ClusterPair, extra: &[&str]) -> Result<InProcess> {
        let mut argv: Vec<String> = [
            "tokensmith",
            "authz",
            "--addr",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--workload-kubeconfig",
        ]
        .map(str::to_owned)
        .into();
        argv.push(pair.reviewer.display().to_string());
        argv.push("--management-kubeconfig".to_owned());
        argv.push(pair.minter.display().to_string());
        argv.extend(extra.iter().map(|s| (*s).to_owned()));
        let Command::Authz(args) = Cli::try_parse_from(argv)?.command else {
            bail!("not the authz command");
        };
        let running = server::start(AuthzConfig::try_from(*args)?).await?;
        let channel = Channel::from_shared(format!("http://{}", running.addr))?
            .connect()
            .await?;
        let mut health = HealthClient::new(channel.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = health
                .check(HealthCheckRequest::default())
                .await?
                .into_inner()
                .status;
            if status == ServingStatus::Serving as i32 {
                break;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "never SERVING (health {status})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(InProcess {
            running,
            client: AuthorizationClient::new(channel),
        })
    }

    async fn check_bearer(
        &mut self,
        token: &str,
    ) -> Result<tokensmith_proto::envoy::service::auth::v3::CheckResponse> {
        let request = envoy_like_check(&[("authorization", &format!("Bearer {token}"))]);
        Ok(self.client.check(request).await?.into_inner())
    }

    async fn metrics(&self) -> Result<String> {
        let reply = http::get(self.running.metrics_addr, "/metrics", &[]).await?;
        ensure!(reply.status == 200, "/metrics answered {}", reply.status);
        Ok(reply.body)
    }
}

#[tokio::test]
async fn an_exchange_in_process_mints_for_the_same_namespace_and_name() -> Result<()> {
    let pair = ClusterPair::start().await?;
    let mut companion = InProcess::start(&pair, &[]).await?;
    let token = pair
        .workload
        .mint(&pair.workload_sa)
        .expiring_in(Duration::from_secs(3600))
        .sign();
    let exchanged = allowed_token(&companion.check_bearer(&token).await?)?;
    let claims = pair
        .management
        .verify(&exchanged)
        .context("the management cluster signed it")?;
    ensure!(
        claims.sub == "system:serviceaccount:app-prod:eso-sa",
        "minted for {}",
        claims.sub
    );
    let missing = companion
        .client
        .check(envoy_like_check(&[]))
        .await?
        .into_inner();
    ensure!(denied(&missing)?.http == 401, "no token must be 401");
    let stranger = pair.workload.add_service_account("app-prod", "no-twin");
    let orphan = pair.workload.mint(&stranger).sign();
    ensure!(
        denied(&companion.check_bearer(&orphan).await?)?.http == 403,
        "an account the management cluster lacks must be 403"
    );
    companion.running.drain(Duration::from_secs(1)).await?;
    Ok(())
}

/// Metrics are handed to each server, not a process global: two companions in one process
/// count only their own checks.
#[tokio::test]
async fn two_servers_in_one_process_count_only_their_own_checks() -> Result<()> {
    let pair = ClusterPair::start().await?;
    let mut busy = InProcess::start(&pair, &[]).await?;
    let idle = InProcess::start(&pair, &[]).await?;
    let token = pair.workload.mint(&pair.workload_sa).sign();
    for _ in 0..3 {
        allowed_token(&busy.check_bearer(&token).await?)?;
    }
    let allows = r#"tokensmith_checks_total{decision="allow",reason="ok"}"#;
    let busy_text = busy.metrics().await?;
    let idle_text = idle.metrics().await?;
    ensure!(
        sample(&busy_text, allows) == Some(3.0),
        "the busy server counts its 3 allows:\n{busy_text}"
    );
    ensure!(
        !idle_text.contains(allows),
        "the idle server counts none:\n{idle_text}"
    );
    busy.running.drain(Duration::from_secs(1)).await?;
    idle.running.drain(Duration::from_secs(1)).await?;
    Ok(())
}
