//! Starting, health-reporting and draining the ext_authz server.

use std::{net::SocketAddr, time::Duration};

use tokensmith_proto::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{debug, info, warn};

use crate::{
    Error,
    authz::{Authorizer, AuthzService},
    cluster::{self, Cluster},
    clusters::reload,
    config::{AuthzConfig, WorkloadsSource},
    exchange::Exchanger,
    workload::Workloads,
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
    reload: Option<JoinHandle<()>>,
    drain_grace: Duration,
}

/// Builds the clients, binds, and serves. Health is NOT_SERVING until the management API
/// server answered and at least one workload cluster can validate tokens (see
/// [`startup_check`]); checks are answered meanwhile (and fail with 503 if a cluster is
/// really down). With `--clusters-config`, the file is reloaded while serving.
pub async fn start(config: AuthzConfig) -> Result<Running, Error> {
    let workloads = match &config.workloads {
        WorkloadsSource::Kubeconfig(source) => {
            Workloads::single(source, config.kube_timeout).await?
        }
        WorkloadsSource::File {
            path,
            config: clusters,
        } => {
            let workloads = Workloads::from_config(clusters, path, config.kube_timeout).await?;
            let names: Vec<&str> = clusters.clusters.iter().map(|c| c.name.as_str()).collect();
            info!(
                path = %path.display(),
                generation = 1,
                clusters = ?names,
                companion_namespace = config.companion_namespace.as_str(),
                "clusters config loaded"
            );
            workloads
        }
    };
    let management =
        cluster::client(Cluster::Management, &config.management, config.kube_timeout).await?;
    let authorizer = Authorizer::new(
        workloads.clone(),
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
        management,
        workloads.clone(),
        health.clone(),
        config.kube_timeout,
    ));
    let reload = match config.workloads {
        WorkloadsSource::File {
            path,
            config: clusters,
        } => Some(tokio::spawn(reload::watch(
            path,
            config.companion_namespace.clone(),
            workloads,
            clusters,
        ))),
        WorkloadsSource::Kubeconfig(_) => None,
    };

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
        reload,
        drain_grace: config.drain_grace,
    })
}

impl Running {
    /// Serves until SIGTERM or SIGINT, then drains.
    pub async fn wait(mut self) -> Result<(), Error> {
        tokio::select! {
            () = shutdown_signal() => {}
            result = &mut self.server => {
                self.stop_background();
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
        self.stop_background();
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

impl Running {
    fn stop_background(&mut self) {
        self.startup.abort();
        if let Some(reload) = self.reload.take() {
            reload.abort();
        }
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(AUTHZ_SERVICE, status).await;
}

/// Reports SERVING once the management API server answered `GET /version` and at least
/// one workload cluster is ready (a TokenReview cluster's API server answered, a JWKS
/// cluster has keys). With `--workload-kubeconfig` alone that is "both API servers". A
/// cluster that is not ready does not hold the others back; once SERVING, the server
/// stays so until it drains (keys are never dropped, only replaced).
async fn startup_check(
    management: kube::Client,
    workloads: Workloads,
    health: HealthReporter,
    timeout: Duration,
) {
    let mut backoff = Duration::from_millis(200);
    let mut management_ok = false;
    loop {
        if !management_ok {
            match tokio::time::timeout(timeout, management.apiserver_version()).await {
                Ok(Ok(version)) => {
                    management_ok = true;
                    debug!(cluster = "management", version = %version.git_version, "API server reachable");
                }
                Ok(Err(e)) => {
                    warn!(cluster = "management", detail = %cluster::describe(&e), "API server not reachable yet");
                }
                Err(_) => warn!(
                    cluster = "management",
                    timeout_s = timeout.as_secs_f64(),
                    "API server did not answer in time"
                ),
            }
        }
        let set = workloads.current();
        let mut ready = Vec::new();
        for workload in set.clusters() {
            match workload.ready(timeout).await {
                Ok(()) => ready.push(workload.name().to_string()),
                Err(detail) if workload.uses_token_review() => warn!(
                    cluster = "workload",
                    workload_cluster = &**workload.name(),
                    detail,
                    "API server not reachable yet"
                ),
                Err(detail) => debug!(
                    workload_cluster = &**workload.name(),
                    detail, "workload cluster not ready yet"
                ),
            }
        }
        if management_ok && !ready.is_empty() {
            set_health(&health, ServingStatus::Serving).await;
            if set.is_single() {
                info!("both API servers reachable; serving");
            } else {
                info!(ready = ?ready, "management API server and workload clusters ready; serving");
            }
            return;
        }
        // Keys arriving for a JWKS cluster end the wait early.
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = workloads.keys_loaded().notified() => {}
        }
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
