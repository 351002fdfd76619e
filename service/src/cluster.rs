//! Kubernetes clients for the two clusters, each built from an explicit source (never
//! `Config::infer()`, which would quietly fall back to whatever `~/.kube/config` names),
//! and the one function that turns a failed call into a deny reason.

use std::{fmt, path::PathBuf, time::Duration};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::{Error, authz::decision::DenyReason};

/// Which of the two clusters a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cluster {
    /// Where workloads and their tokens live; we call TokenReview there.
    Workload,
    /// Where the exchanged tokens come from; we call TokenRequest there.
    Management,
}

impl Cluster {
    /// `workload` or `management`, as logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Cluster::Workload => "workload",
            Cluster::Management => "management",
        }
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a cluster's address and credentials come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSource {
    /// A kubeconfig file (its current context).
    Kubeconfig(PathBuf),
    /// The pod's service account (`KUBERNETES_SERVICE_HOST` and the mounted token).
    InCluster,
}

impl ClusterSource {
    /// An empty flag value means in-cluster, as in the original tool.
    pub fn from_flag(path: &str) -> Self {
        if path.is_empty() {
            ClusterSource::InCluster
        } else {
            ClusterSource::Kubeconfig(PathBuf::from(path))
        }
    }
}

/// How much later than `--kube-timeout` the client's connect timeout fires.
const BACKSTOP_MARGIN: Duration = Duration::from_millis(500);

/// Builds a client that connects within about `timeout` and that never
/// retries on its own: a Check has one budget, and a 429/503 from an API server is
/// better answered with a 503 now than retried into the caller's deadline (and into an
/// API server that is already overloaded).
pub async fn client(
    cluster: Cluster,
    source: &ClusterSource,
    settings: &KubeSettings,
) -> Result<kube::Client, Error> {
    let timeout = settings.timeout;
    let mut config = match source {
        ClusterSource::Kubeconfig(path) => {
            let file = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                cluster,
                path: path.clone(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    cluster,
                    path: path.clone(),
                    source,
                })?
        }
        ClusterSource::InCluster => {
            kube::Config::incluster().map_err(|source| Error::InCluster { cluster, source })?
        }
    };
    // Every call is bounded by an explicit deadline (the Check's, or a timeout around
    // start-up checks and background refreshes). `read_timeout`/`write_timeout` stay
    // unset on purpose: kube applies them to the pooled connection's idle read, so idle
    // keep-alive connections die every few seconds and a request racing with that death
    // fails ("connection error: timed out") — found by the 500-request concurrency test.
    config.connect_timeout = Some(timeout + BACKSTOP_MARGIN);
    config.default_retry = false;
    let builder = kube::client::ClientBuilder::try_from(config)
        .map_err(|source| Error::Client { cluster, source })?;
    // At most this many calls in flight to this API server; the rest wait for a slot
    // within their Check's deadline, so a burst cannot stampede it.
    let limit = tower::limit::ConcurrencyLimitLayer::new(settings.max_concurrency);
    Ok(builder.with_layer(&limit).build())
}

/// How the companion talks to API servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KubeSettings {
    /// `--kube-timeout`: the bound on one Check's calls (and the clients' backstop).
    pub timeout: Duration,
    /// `--kube-max-concurrency`: calls in flight per API server.
    pub max_concurrency: usize,
    /// `--validation-cache-ttl`: how long a TokenReview answer is reused (0: never).
    pub validation_cache_ttl: Duration,
    /// `--review-max-in-flight`: TokenReviews in flight per workload cluster.
    pub review_max_in_flight: usize,
    /// `--review-max-in-flight-per-source`: of those, most for one source (0: no share).
    pub review_max_in_flight_per_source: usize,
}

impl KubeSettings {
    /// Defaults for tests and tools: 5 s, 32 in flight, 10 s validation cache.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self {
            timeout,
            max_concurrency: 32,
            validation_cache_ttl: Duration::from_secs(10),
            review_max_in_flight: 16,
            review_max_in_flight_per_source: 4,
        }
    }
}

/// What a failed Kubernetes call means for the request. `not_found` and `forbidden` are
/// the reasons a 404 or 403 stands for on this call; every other failure is the
/// cluster's (or our own credentials') problem, so the client gets a 503.
pub fn classify(
    error: &kube::Error,
    cluster: Cluster,
    not_found: Option<DenyReason>,
    forbidden: Option<DenyReason>,
) -> DenyReason {
    match error {
        kube::Error::Api(status) => match status.code {
            404 => not_found.unwrap_or(DenyReason::Unavailable(cluster)),
            403 => forbidden.unwrap_or(DenyReason::Unavailable(cluster)),
            _ => DenyReason::Unavailable(cluster),
        },
        other if timed_out(other) => DenyReason::DeadlineExceeded(cluster),
        _ => DenyReason::Unavailable(cluster),
    }
}

/// Whether a transport error is the client's own timeout firing (the backstop timeouts
/// set in [`client`]).
fn timed_out(error: &kube::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// A log-safe description of a failed call: the API's status message, or the error
/// chain of a transport failure. Neither carries request headers or bodies.
pub fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} {}: {}", status.code, status.reason, status.message)
        }
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                text.push_str(": ");
                text.push_str(&cause.to_string());
                source = cause.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Status::failure("m", "R").with_code(code).boxed())
    }

    #[test]
    fn api_status_codes_map_to_reasons() {
        let not_found = Some(DenyReason::UnknownServiceAccount);
        let forbidden = Some(DenyReason::ExchangeForbidden);
        let m = Cluster::Management;
        let table = [
            (404, DenyReason::UnknownServiceAccount),
            (403, DenyReason::ExchangeForbidden),
            (401, DenyReason::Unavailable(m)),
            (422, DenyReason::Unavailable(m)),
            (429, DenyReason::Unavailable(m)),
            (500, DenyReason::Unavailable(m)),
            (503, DenyReason::Unavailable(m)),
            (504, DenyReason::Unavailable(m)),
        ];
        for (code, want) in table {
            assert_eq!(
                classify(&api(code), m, not_found, forbidden),
                want,
                "{code}"
            );
        }
    }

    #[test]
    fn without_a_meaning_for_404_or_403_they_are_unavailability() {
        let w = Cluster::Workload;
        assert_eq!(
            classify(&api(404), w, None, None),
            DenyReason::Unavailable(w)
        );
        assert_eq!(
            classify(&api(403), w, None, None),
            DenyReason::Unavailable(w)
        );
    }

    #[test]
    fn transport_errors_are_unavailability() {
        let error = kube::Error::Service("connection refused".into());
        assert_eq!(
            classify(&error, Cluster::Workload, None, None),
            DenyReason::Unavailable(Cluster::Workload)
        );
        assert!(describe(&error).contains("connection refused"));
    }

    #[test]
    fn the_clients_own_timeout_is_a_deadline() {
        let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        let error = kube::Error::Service(Box::new(timeout));
        assert_eq!(
            classify(&error, Cluster::Management, None, None),
            DenyReason::DeadlineExceeded(Cluster::Management)
        );
    }

    #[test]
    fn empty_flag_means_in_cluster() {
        assert_eq!(ClusterSource::from_flag(""), ClusterSource::InCluster);
        assert_eq!(
            ClusterSource::from_flag("/k"),
            ClusterSource::Kubeconfig(PathBuf::from("/k"))
        );
    }
}
