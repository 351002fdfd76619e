//! Starting, health-reporting and draining the ext_authz server.

use std::{net::SocketAddr, time::Duration};

use tokensmith_proto::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{info, warn};

use crate::{
    Error,
    authz::{Authorizer, AuthzService},
    cluster::{self, Cluster},
    config::AuthzConfig,
    exchange::Exchanger,
    review::Reviewer,
};

/// The gRPC service name Envoy and the health checks use.
const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// A running ext_authz server. Tests start one on port 0 and read `addr`.
pub struct Running {
    /// The address actually bound.
    pub addr: SocketAddr,
    health: HealthReporter,
    shutdown: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    startup: JoinHandle<()>,
    drain_grace: Duration,
}

/// Builds both clients, binds, and serves. Health is NOT_SERVING until a start-up check
/// has reached both API servers; checks are answered meanwhile (and fail with 503 if a
/// cluster is really down).
pub async fn start(config: AuthzConfig) -> Result<Running, Error> {
    let workload =
        cluster::client(Cluster::Workload, &config.workload, config.kube_timeout).await?;
    let management =
        cluster::client(Cluster::Management, &config.management, config.kube_timeout).await?;
    let authorizer = Authorizer::new(
        Reviewer::new(workload.clone()),
        Exchanger::new(management.clone(), config.audiences.clone()),
        config.token_expiration,
        config.kube_timeout,
    );

    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Bind {
        addr: config.listen,
        source,
    })?;

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let startup = tokio::spawn(startup_check(
        [
            (Cluster::Workload, workload),
            (Cluster::Management, management),
        ],
        health.clone(),
        config.kube_timeout,
    ));

    let (shutdown, stop) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(AuthorizationServer::new(AuthzService::new(authorizer)))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stop.await;
                },
            ),
    );
    info!(%addr, "ext_authz server listening");
    Ok(Running {
        addr,
        health,
        shutdown,
        server,
        startup,
        drain_grace: config.drain_grace,
    })
}

impl Running {
    /// Serves until SIGTERM or SIGINT, then drains.
    pub async fn wait(mut self) -> Result<(), Error> {
        tokio::select! {
            () = shutdown_signal() => {}
            result = &mut self.server => {
                self.startup.abort();
                return Ok(result??);
            }
        }
        let grace = self.drain_grace;
        self.drain(grace).await
    }

    /// Reports NOT_SERVING, stops accepting, and lets in-flight checks finish within
    /// `grace`; whatever is still running then is cut off.
    pub async fn drain(mut self, grace: Duration) -> Result<(), Error> {
        info!(grace_s = grace.as_secs_f64(), "draining");
        self.startup.abort();
        set_health(&self.health, ServingStatus::NotServing).await;
        let _ = self.shutdown.send(());
        match tokio::time::timeout(grace, &mut self.server).await {
            Ok(result) => result??,
            Err(_) => {
                warn!(
                    grace_s = grace.as_secs_f64(),
                    "in-flight checks outlived the grace period; closing"
                );
                self.server.abort();
            }
        }
        info!("stopped");
        Ok(())
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(AUTHZ_SERVICE, status).await;
}

/// Reaches each API server (`GET /version`) until both answer, then reports SERVING.
async fn startup_check(
    clusters: [(Cluster, kube::Client); 2],
    health: HealthReporter,
    timeout: Duration,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut all_ok = true;
        for (cluster, client) in &clusters {
            match tokio::time::timeout(timeout, client.apiserver_version()).await {
                Ok(Ok(version)) => {
                    tracing::debug!(cluster = cluster.as_str(), version = %version.git_version, "API server reachable")
                }
                Ok(Err(e)) => {
                    all_ok = false;
                    warn!(cluster = cluster.as_str(), detail = %cluster::describe(&e), "API server not reachable yet");
                }
                Err(_) => {
                    all_ok = false;
                    warn!(
                        cluster = cluster.as_str(),
                        timeout_s = timeout.as_secs_f64(),
                        "API server did not answer in time"
                    );
                }
            }
        }
        if all_ok {
            set_health(&health, ServingStatus::Serving).await;
            info!("both API servers reachable; serving");
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    info!("shutdown signal received");
}
