//! Prometheus metrics of the companion (prometheus-client). Labels never carry a token,
//! nor a namespace or name (unbounded cardinality): identities belong in the audit log.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// `decision` and `reason` of a check.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// A `DenyReason` name, or `ok`.
    pub reason: &'static str,
}

/// One Kubernetes API call's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeLabels {
    /// The configured cluster name (`workload`, `management`, or a clusters-config name).
    pub cluster: String,
    /// `tokenreview`, `tokenrequest`, `version`, `jwks`, …
    pub verb: &'static str,
    /// HTTP status, or `error` (transport) / `timeout`.
    pub code: String,
}

/// Latency of Kubernetes API calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeLatencyLabels {
    /// The configured cluster name.
    pub cluster: String,
    /// The call.
    pub verb: &'static str,
}

/// Which cache.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `exchange` or `validation`.
    pub cache: &'static str,
}

/// One JWKS (or discovery) fetch.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksFetchLabels {
    /// The workload cluster's configured name.
    pub cluster: String,
    /// `ok` or `error`.
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the companion exports.
pub struct Metrics {
    registry: Registry,
    /// `tokensmith_checks_total{decision,reason}`
    pub checks: Family<CheckLabels, Counter>,
    /// `tokensmith_check_duration_seconds`
    pub check_duration: Histogram,
    /// `tokensmith_checks_in_flight`
    pub checks_in_flight: Gauge,
    /// `tokensmith_kube_requests_total{cluster,verb,code}`
    pub kube_requests: Family<KubeLabels, Counter>,
    /// `tokensmith_kube_request_duration_seconds{cluster,verb}`
    pub kube_duration: Family<KubeLatencyLabels, Histogram, fn() -> Histogram>,
    /// `tokensmith_cache_hits_total{cache}`
    pub cache_hits: Family<CacheLabels, Counter>,
    /// `tokensmith_cache_misses_total{cache}`
    pub cache_misses: Family<CacheLabels, Counter>,
    /// `tokensmith_cache_evictions_total{cache}` (size-bound evictions only).
    pub cache_evictions: Family<CacheLabels, Counter>,
    /// `tokensmith_rate_limited_total`
    pub rate_limited: Counter,
    /// `tokensmith_jwks_fetches_total`
    pub jwks_fetches: Family<JwksFetchLabels, Counter>,
    /// `tokensmith_consented_service_accounts` (`--require-sa-label`)
    pub consented_accounts: Gauge,
}

/// The `code` label of a Kubernetes call's result; kube does not report the status of a
/// success, so the caller names it (`201` for creates).
pub fn code_of<T>(result: &Result<T, kube::Error>, success: &str) -> String {
    match result {
        Ok(_) => success.to_owned(),
        Err(kube::Error::Api(status)) => status.code.to_string(),
        Err(_) => "error".to_owned(),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family. The server makes one and hands it to every stage.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tokensmith");
        let m = Metrics {
            checks: Family::default(),
            check_duration: latency_histogram(),
            checks_in_flight: Gauge::default(),
            kube_requests: Family::default(),
            kube_duration: Family::new_with_constructor(latency_histogram),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            cache_evictions: Family::default(),
            rate_limited: Counter::default(),
            jwks_fetches: Family::default(),
            consented_accounts: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "checks",
            "Checks answered, by decision and reason",
            m.checks.clone(),
        );
        registry.register(
            "check_duration_seconds",
            "Time to answer a check",
            m.check_duration.clone(),
        );
        registry.register(
            "checks_in_flight",
            "Checks being answered now",
            m.checks_in_flight.clone(),
        );
        registry.register(
            "kube_requests",
            "Kubernetes API calls, by cluster, verb and status",
            m.kube_requests.clone(),
        );
        registry.register(
            "kube_request_duration_seconds",
            "Kubernetes API call latency",
            m.kube_duration.clone(),
        );
        registry.register("cache_hits", "Cache hits", m.cache_hits.clone());
        registry.register("cache_misses", "Cache misses", m.cache_misses.clone());
        registry.register(
            "cache_evictions",
            "Entries evicted to keep a cache within its bound",
            m.cache_evictions.clone(),
        );
        registry.register(
            "rate_limited",
            "Checks refused by the per-identity rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "jwks_fetches",
            "JWKS fetches (with discovery), by workload cluster and result",
            m.jwks_fetches.clone(),
        );
        registry.register(
            "consented_service_accounts",
            "Management service accounts carrying the --require-sa-label label",
            m.consented_accounts.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records one Kubernetes API call.
    pub fn kube_call(&self, cluster: &str, verb: &'static str, code: String, latency: Duration) {
        self.kube_requests
            .get_or_create(&KubeLabels {
                cluster: cluster.to_owned(),
                verb,
                code,
            })
            .inc();
        self.kube_duration
            .get_or_create(&KubeLatencyLabels {
                cluster: cluster.to_owned(),
                verb,
            })
            .observe(latency.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_exported_with_the_tokensmith_prefix() {
        let m = Metrics::new();
        m.checks
            .get_or_create(&CheckLabels {
                decision: "deny",
                reason: "invalid_token",
            })
            .inc();
        m.kube_call(
            "workload",
            "tokenreview",
            "201".into(),
            Duration::from_millis(3),
        );
        let text = m.encode();
        assert!(
            text.contains(r#"tokensmith_checks_total{decision="deny",reason="invalid_token"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"tokensmith_kube_requests_total{cluster="workload",verb="tokenreview",code="201"} 1"#
        ));
        assert!(text.contains("tokensmith_kube_request_duration_seconds_count{cluster=\"workload\",verb=\"tokenreview\"} 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
