//! Starting, health-reporting and draining the ext_authz server.

use std::sync::Arc;
use std::{net::SocketAddr, time::Duration};

use tokensmith_proto::envoy::service::auth::v3::authorization_server::AuthorizationServer;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic_health::{ServingStatus, server::HealthReporter};
use tracing::{debug, info, warn};

use crate::{
    Error, admin,
    authz::{Authorizer, AuthzService},
    config::{AuthzConfig, WorkloadsSource},
    consent::Consent,
    deny::{self, Side},
    exchange::{Exchanger, cache::CachedExchanger},
    kube_client, listener,
    metrics::Metrics,
    ratelimit::RateLimiter,
    tls::{self, ReloadingTls},
    workload::Workloads,
    workload::reload,
};

/// How long an HTTP/2 keepalive PING may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gRPC service name Envoy and the health checks use.
const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// A running ext_authz server. The in-process tests start one on port 0 and read `addr`.
pub struct Running {
    /// The address actually bound.
    pub addr: SocketAddr,
    /// The metrics endpoint's bound address.
    pub metrics_addr: SocketAddr,
    health: Health,
    /// Installed before the server says it listens.
    signal: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
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
    // One registry per process, as Prometheus expects; every stage counts into it.
    let metrics = Arc::new(Metrics::new());
    let workloads = workloads(&config, &metrics).await?;
    let management =
        kube_client::client(Side::Management, &config.management, &config.kube).await?;
    let consent = config
        .require_sa_label
        .clone()
        .map(|label| Consent::watch(management.clone(), label, metrics.clone()));
    let authorizer = authorizer(&config, &workloads, &management, consent.clone(), &metrics);
    let tls = config.tls.clone().map(ReloadingTls::new).transpose()?;

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

    let (reporter, health_service) = tonic_health::server::health_reporter();
    let health = Health {
        reporter,
        ready: admin::Readiness::default(),
    };
    health.set(ServingStatus::NotServing).await;
    let metrics_addr = admin::serve(config.metrics_addr, metrics, health.ready.clone()).await?;
    let startup = tokio::spawn(startup_check(
        management,
        consent,
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
    let stop = async {
        let _ = stop.await;
    };
    let limit = config.grpc_max_message_bytes;
    let keepalive = (!config.grpc_keepalive.is_zero()).then_some(config.grpc_keepalive);
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(config.grpc_max_concurrent_streams)
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(keepalive.map(|_| KEEPALIVE_TIMEOUT))
        .add_service(health_service)
        .add_service(
            AuthorizationServer::new(AuthzService::new(authorizer))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        );
    let limits = config.listener;
    let server = match tls {
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            listener::incoming(listener, limits, |tcp| async move { Ok(tcp) }),
            stop,
        )),
        Some(tls) => {
            tokio::spawn(tls.clone().watch());
            let incoming =
                listener::incoming(listener, limits, move |tcp| tls::accept(tls.clone(), tcp));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
        }
    };
    let signal: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(shutdown_signal());
    info!(%addr, tls = config.tls.is_some(), mtls = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()), "ext_authz server listening");
    Ok(Running {
        addr,
        metrics_addr,
        health,
        signal: Some(signal),
        shutdown,
        server,
        startup,
        reload,
        drain_grace: config.drain_grace,
    })
}

/// The workload clusters of `--workload-kubeconfig` or of the clusters file.
async fn workloads(config: &AuthzConfig, metrics: &Arc<Metrics>) -> Result<Workloads, Error> {
    Ok(match &config.workloads {
        WorkloadsSource::Kubeconfig(single) => {
            Workloads::single(single, config.kube, &config.companion_namespace, metrics).await?
        }
        WorkloadsSource::File {
            path,
            config: clusters,
        } => {
            let workloads = Workloads::from_config(clusters, path, config.kube, metrics).await?;
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
    })
}

/// The Check handler's stages, wired to one another and to `metrics`.
fn authorizer(
    config: &AuthzConfig,
    workloads: &Workloads,
    management: &kube::Client,
    consent: Option<Consent>,
    metrics: &Arc<Metrics>,
) -> Authorizer {
    let exchanger = CachedExchanger::new(
        Exchanger::new(
            management.clone(),
            config.audiences.clone(),
            metrics.clone(),
        ),
        config.cache_max_entries,
        config.kube_timeout,
        metrics.clone(),
    );
    Authorizer {
        workloads: workloads.clone(),
        exchanger,
        limiter: config
            .rate_limit
            .map(|(rate, burst)| Arc::new(RateLimiter::new(rate, burst))),
        consent,
        token_expiration: config.token_expiration,
        kube_timeout: config.kube_timeout,
        reuse: config.kube.validation_cache_ttl,
        metrics: metrics.clone(),
    }
}

impl Running {
    /// Serves until SIGTERM or SIGINT, then drains.
    pub async fn wait(mut self) -> Result<(), Error> {
        let signal = self.signal.take();
        tokio::select! {
            () = async { match signal { Some(s) => s.await, None => std::future::pending().await } } => {}
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
        self.health.set(ServingStatus::NotServing).await;
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

/// gRPC health and the metrics endpoint's `/readyz`, always set together.
#[derive(Clone)]
struct Health {
    reporter: HealthReporter,
    ready: admin::Readiness,
}

impl Health {
    async fn set(&self, status: ServingStatus) {
        self.ready.set(status == ServingStatus::Serving);
        self.reporter.set_service_status("", status).await;
        self.reporter
            .set_service_status(AUTHZ_SERVICE, status)
            .await;
    }
}

/// Reports SERVING once the management API server answered `GET /version` and at least
/// one workload cluster is ready (a TokenReview cluster's API server answered, a JWKS
/// cluster has keys), and with `--require-sa-label` the labelled service accounts were
/// listed. With `--workload-kubeconfig` alone that is "both API servers". A
/// cluster that is not ready does not hold the others back; once SERVING, the server
/// stays so until it drains (keys are never dropped, only replaced).
async fn startup_check(
    management: kube::Client,
    consent: Option<Consent>,
    workloads: Workloads,
    health: Health,
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
                    warn!(cluster = "management", detail = %deny::describe(&e), "API server not reachable yet");
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
                    detail = %detail,
                    "API server not reachable yet"
                ),
                Err(detail) => debug!(
                    workload_cluster = &**workload.name(),
                    detail = %detail,
                    "workload cluster not ready yet"
                ),
            }
        }
        // With --require-sa-label, nothing can be minted before the labelled list is in.
        let consent_ok = consent.as_ref().is_none_or(Consent::synced);
        if management_ok && consent_ok && !ready.is_empty() {
            health.set(ServingStatus::Serving).await;
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

/// Installs the SIGTERM and SIGINT handlers at once (so a signal that arrives before
/// the future is awaited is not lost to the default action) and resolves on either.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate());
    let interrupt = signal(SignalKind::interrupt());
    async move {
        match (terminate, interrupt) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (term, int) => {
                let error = term
                    .err()
                    .or(int.err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                warn!(
                    error,
                    "cannot listen for SIGTERM/SIGINT; stop the process with SIGKILL"
                );
                std::future::pending::<()>().await;
            }
        }
        info!("shutdown signal received");
    }
}
