//! Kubernetes clients for the two clusters, each built from an explicit source (never
//! `Config::infer()`, which would quietly fall back to whatever `~/.kube/config` names),
//! and the one function that turns a failed call into a deny reason.

use std::{path::PathBuf, time::Duration};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::{Error, deny::Side};

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
    cluster: Side,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_flag_means_in_cluster() {
        assert_eq!(ClusterSource::from_flag(""), ClusterSource::InCluster);
        assert_eq!(
            ClusterSource::from_flag("/k"),
            ClusterSource::Kubeconfig(PathBuf::from("/k"))
        );
    }
}
