//! The workload clusters a token may come from: which one a token belongs to (by its
//! unverified `iss`), how that cluster validates it (TokenReview or JWKS), and which
//! namespaces it may map into. The set is swapped whole when the clusters file changes.

pub mod reload;

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, OnceLock, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    Error,
    clusters_file::{ClusterSpec, ClustersConfig, DEFAULT_LEEWAY, Method},
    config::{SingleCluster, SingleIssuer},
    deny::{Denial, DenyReason, Side},
    identity::{Validated, WorkloadIdentity},
    jwks::{JwksValidator, KeySource, verify},
    kube_client::{self, ClusterSource, KubeSettings},
    metrics::Metrics,
    namespaces::NamespacePolicy,
    review::{ProbeError, Reviewer, turns::Turns},
    secret::BearerToken,
};

/// The name of the one cluster of `--workload-kubeconfig`, as logged.
pub const SINGLE_CLUSTER_NAME: &str = "workload";

/// Longest issuer quoted in a log line: the value is not secret, but attacker-chosen.
const MAX_LOGGED_ISSUER: usize = 200;

/// How one cluster's tokens are validated. An enum, not a trait object: there are two
/// known ways, chosen per cluster by the configuration.
#[derive(Clone)]
pub enum Validator {
    /// TokenReview on the cluster's API server.
    TokenReview(Box<Reviewer>),
    /// Signature checks against its published keys.
    Jwks(JwksValidator),
}

/// One workload cluster, ready to validate tokens.
pub struct WorkloadCluster {
    name: Arc<str>,
    issuer: String,
    audiences: Vec<String>,
    leeway: Duration,
    namespaces: Option<NamespacePolicy>,
    validator: Validator,
    /// The JWKS source it was built from, to keep the validator across reloads.
    jwks_source: Option<KeySource>,
    /// `--workload-kubeconfig` only: the `iss` a token needs to be worth a TokenReview.
    expected_issuer: ExpectedIssuer,
}

/// The single cluster's issuer check: set from the flag, or once discovered.
#[derive(Default)]
struct ExpectedIssuer {
    issuer: OnceLock<String>,
    /// Discovery still to be tried (`--workload-issuer` empty and no definite answer yet).
    discover: AtomicBool,
}

impl ExpectedIssuer {
    fn new(flag: &SingleIssuer) -> Self {
        let expected = ExpectedIssuer::default();
        match flag {
            SingleIssuer::Exact(issuer) => {
                let _ = expected.issuer.set(issuer.clone());
            }
            SingleIssuer::Discover => expected.discover.store(true, Ordering::Relaxed),
            SingleIssuer::Any => {}
        }
        expected
    }

    /// Whether `token` may be reviewed: its `iss` is the expected one, or the legacy
    /// Secret-token issuer the API server also accepts. Anything goes while none is known.
    fn check(&self, token: &BearerToken) -> Result<(), Denial> {
        let Some(expected) = self.issuer.get() else {
            return Ok(());
        };
        match verify::unverified_issuer(token.expose()) {
            Some(iss) if iss == *expected || iss == verify::LEGACY_ISSUER => Ok(()),
            Some(_) => Err(DenyReason::UnknownIssuer.because(
                "iss is not the workload cluster's issuer (--workload-issuer)".to_owned(),
            )),
            // Not a JWT at all: that is a bad token, not a stranger's.
            None => Err(DenyReason::InvalidToken.because("no iss claim (not a JWT?)")),
        }
    }
}

impl WorkloadCluster {
    /// The configured name (`workload` for `--workload-kubeconfig`).
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Validates `token` with this cluster's method. Only an authenticated service
    /// account with valid namespace and name passes.
    /// `source` is the client's address, for its share of the TokenReview turns.
    pub async fn validate(
        &self,
        token: &BearerToken,
        source: Option<std::net::IpAddr>,
    ) -> Result<Validated, Denial> {
        match &self.validator {
            Validator::TokenReview(reviewer) => {
                // Junk never reaches the API server: the shape is checked here first.
                verify::prevalidate(token.expose(), self.leeway)?;
                reviewer.review(token, source).await
            }
            Validator::Jwks(jwks) => {
                let expect = verify::Expectations {
                    issuer: &self.issuer,
                    audiences: &self.audiences,
                    leeway: self.leeway,
                };
                jwks.validate(token, &expect).await
            }
        }
    }

    /// Applies the namespace policy.
    pub fn admit(&self, identity: &WorkloadIdentity) -> Result<(), Denial> {
        let Some(policy) = &self.namespaces else {
            return Ok(());
        };
        let namespace = identity.service_account.namespace();
        policy.admits(namespace).map_err(|why| {
            DenyReason::NamespaceNotAllowed.because(format!("namespace {namespace:?}: {why}"))
        })
    }

    /// Whether the cluster can validate tokens now: a TokenReview cluster's API server
    /// answers, a JWKS cluster has keys. `Err` says why not.
    pub async fn ready(&self, timeout: Duration) -> Result<(), NotReady> {
        match &self.validator {
            Validator::TokenReview(reviewer) => {
                reviewer
                    .reachable(timeout)
                    .await
                    .map_err(NotReady::Unreachable)?;
                self.discover_issuer(reviewer, timeout).await
            }
            Validator::Jwks(jwks) if jwks.has_keys() => Ok(()),
            Validator::Jwks(_) => Err(NotReady::NoKeys),
        }
    }

    /// With `--workload-issuer` empty, asks the API server for its issuer until it gives a
    /// definite answer: the issuer, or that it has none to tell (then tokens of any
    /// issuer are reviewed, as with `*`).
    async fn discover_issuer(
        &self,
        reviewer: &Reviewer,
        timeout: Duration,
    ) -> Result<(), NotReady> {
        let expected = &self.expected_issuer;
        if !expected.discover.load(Ordering::Relaxed) {
            return Ok(());
        }
        match reviewer.discover_issuer(timeout).await {
            Ok(Some(issuer)) => {
                tracing::info!(
                    cluster = "workload",
                    issuer = issuer.as_str(),
                    "workload issuer discovered; tokens of other issuers are refused before a TokenReview"
                );
                let _ = expected.issuer.set(issuer);
            }
            Ok(None) => tracing::warn!(
                cluster = "workload",
                "the workload API server announces no issuer (OIDC discovery off?); every \
                 token costs a TokenReview: set --workload-issuer"
            ),
            Err(e) => return Err(NotReady::Discovery(e)),
        }
        expected.discover.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Whether it validates with TokenReview.
    pub fn uses_token_review(&self) -> bool {
        matches!(self.validator, Validator::TokenReview(_))
    }
}

/// Why a workload cluster cannot validate tokens yet.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("{0}")]
    Unreachable(ProbeError),
    #[error("issuer discovery: {0}")]
    Discovery(ProbeError),
    #[error("no JWKS keys loaded yet")]
    NoKeys,
}

/// The clusters in force: either the one `--workload-kubeconfig` cluster, which gets every
/// token, or the clusters of the file, each getting the tokens of its issuer.
pub struct WorkloadSet {
    clusters: Vec<Arc<WorkloadCluster>>,
    by_issuer: HashMap<String, Arc<WorkloadCluster>>,
    single: bool,
    generation: u64,
}

impl WorkloadSet {
    /// The cluster `token` belongs to, by its unverified `iss` (checked again, with the
    /// signature, by JWKS validation). With `--workload-kubeconfig` alone, that cluster.
    pub fn select(&self, token: &BearerToken) -> Result<Arc<WorkloadCluster>, Denial> {
        let unknown = |detail: String| DenyReason::UnknownIssuer.because(detail);
        if self.single
            && let Some(only) = self.clusters.first()
        {
            // Another issuer's token costs no TokenReview.
            only.expected_issuer.check(token)?;
            return Ok(only.clone());
        }
        let issuer = verify::unverified_issuer(token.expose())
            .ok_or_else(|| unknown("no iss claim (not a JWT?)".to_owned()))?;
        self.by_issuer.get(&issuer).cloned().ok_or_else(|| {
            let shown: String = issuer.chars().take(MAX_LOGGED_ISSUER).collect();
            unknown(format!("issuer {shown:?} is not configured"))
        })
    }

    /// The clusters, in configuration order.
    pub fn clusters(&self) -> &[Arc<WorkloadCluster>] {
        &self.clusters
    }

    /// Whether this is the `--workload-kubeconfig` cluster alone.
    pub fn is_single(&self) -> bool {
        self.single
    }
}

/// The handle the authorizer reads and the reloader swaps. Clones share the set.
#[derive(Clone)]
pub struct Workloads {
    current: Arc<RwLock<Arc<WorkloadSet>>>,
    loaded: Arc<Notify>,
    settings: KubeSettings,
    metrics: Arc<Metrics>,
}

impl Workloads {
    /// The `--workload-kubeconfig` cluster alone: TokenReview for every token, no issuer
    /// routing. Its namespace policy is the safe default (the system namespaces and the
    /// companion's own are refused): a workload-cluster admin can create any service
    /// account name, and opening those namespaces takes a clusters file that says so.
    pub async fn single(
        single: &SingleCluster,
        settings: KubeSettings,
        companion_namespace: &str,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, Error> {
        let client = kube_client::client(Side::Workload, &single.source, &settings).await?;
        let only = Arc::new(WorkloadCluster {
            name: Arc::from(SINGLE_CLUSTER_NAME),
            issuer: String::new(),
            expected_issuer: ExpectedIssuer::new(&single.issuer),
            audiences: single.audiences.clone(),
            leeway: DEFAULT_LEEWAY,
            namespaces: Some(NamespacePolicy::new(
                single.allow_namespaces.clone(),
                Vec::new(),
                companion_namespace,
            )),
            validator: Validator::TokenReview(Box::new(Reviewer::new(
                Arc::from(SINGLE_CLUSTER_NAME),
                client,
                single.audiences.clone(),
                settings.validation_cache_ttl,
                Turns::new(
                    settings.review_max_in_flight,
                    settings.review_max_in_flight_per_source,
                ),
                metrics.clone(),
            ))),
            jwks_source: None,
        });
        let set = WorkloadSet {
            clusters: vec![only],
            by_issuer: HashMap::new(),
            single: true,
            generation: 1,
        };
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(set))),
            loaded: Arc::new(Notify::new()),
            settings,
            metrics: metrics.clone(),
        })
    }

    /// The clusters of a clusters file. JWKS clusters start fetching their keys now.
    pub async fn from_config(
        config: &ClustersConfig,
        path: &Path,
        settings: KubeSettings,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, Error> {
        let loaded = Arc::new(Notify::new());
        let inputs = Inputs {
            path,
            settings,
            metrics,
            loaded: &loaded,
        };
        let set = build(config, inputs, None).await?;
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(set))),
            loaded,
            settings,
            metrics: metrics.clone(),
        })
    }

    /// Replaces the set with one built from `config`, keeping the validator (keys, fetch
    /// task, refresh limit) of every JWKS cluster whose entry is unchanged. Checks in
    /// flight finish with the set they started with. Returns the new generation.
    pub async fn replace(&self, config: &ClustersConfig, path: &Path) -> Result<u64, Error> {
        let previous = self.current();
        let inputs = Inputs {
            path,
            settings: self.settings,
            metrics: &self.metrics,
            loaded: &self.loaded,
        };
        let set = build(config, inputs, Some(&previous)).await?;
        let generation = set.generation;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
        Ok(generation)
    }

    /// The set in force.
    pub fn current(&self) -> Arc<WorkloadSet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Notified when a JWKS cluster loads its first keys (readiness waits on it).
    pub fn keys_loaded(&self) -> &Arc<Notify> {
        &self.loaded
    }
}

/// What building a cluster takes besides its entry.
struct Inputs<'a> {
    /// The clusters file, for error messages.
    path: &'a Path,
    settings: KubeSettings,
    metrics: &'a Arc<Metrics>,
    /// Notified when a JWKS cluster loads its first keys.
    loaded: &'a Arc<Notify>,
}

async fn build(
    config: &ClustersConfig,
    inputs: Inputs<'_>,
    previous: Option<&WorkloadSet>,
) -> Result<WorkloadSet, Error> {
    let mut clusters = Vec::with_capacity(config.clusters.len());
    for spec in &config.clusters {
        let reusable = previous.and_then(|p| {
            p.clusters.iter().find(|old| {
                *old.name == *spec.name
                    && old.issuer == spec.issuer
                    && matches!(&spec.method, Method::Jwks { source, .. }
                        if old.jwks_source.as_ref() == Some(source))
            })
        });
        let cluster = cluster(spec, &inputs, reusable.map(|c| &c.validator)).await?;
        clusters.push(Arc::new(cluster));
    }
    let by_issuer = clusters
        .iter()
        .map(|c| (c.issuer.clone(), c.clone()))
        .collect();
    Ok(WorkloadSet {
        clusters,
        by_issuer,
        single: false,
        generation: previous.map_or(1, |p| p.generation + 1),
    })
}

async fn cluster(
    spec: &ClusterSpec,
    inputs: &Inputs<'_>,
    reuse: Option<&Validator>,
) -> Result<WorkloadCluster, Error> {
    let settings = inputs.settings;
    let problem = |field: &str, e: &dyn std::fmt::Display| Error::ClustersConfig {
        path: inputs.path.to_owned(),
        problem: format!("cluster {:?}: {field}: {e}", spec.name),
    };
    let (validator, leeway, jwks_source) = match &spec.method {
        Method::TokenReview { kubeconfig } => {
            let source = ClusterSource::Kubeconfig(kubeconfig.clone());
            let client = kube_client::client(Side::Workload, &source, &settings)
                .await
                .map_err(|e| problem("tokenreview.kubeconfig", &e))?;
            let reviewer = Reviewer::new(
                Arc::from(spec.name.as_str()),
                client,
                spec.audiences.clone(),
                settings.validation_cache_ttl,
                Turns::new(
                    settings.review_max_in_flight,
                    settings.review_max_in_flight_per_source,
                ),
                inputs.metrics.clone(),
            );
            (
                Validator::TokenReview(Box::new(reviewer)),
                DEFAULT_LEEWAY,
                None,
            )
        }
        Method::Jwks { source, leeway } => {
            let validator = match reuse {
                Some(existing) => existing.clone(),
                None => Validator::Jwks(
                    JwksValidator::new(
                        &spec.name,
                        &spec.issuer,
                        source,
                        inputs.loaded.clone(),
                        inputs.metrics.clone(),
                        !settings.validation_cache_ttl.is_zero(),
                    )
                    .map_err(|e| problem("jwks", &e))?,
                ),
            };
            (validator, *leeway, Some(source.clone()))
        }
    };
    Ok(WorkloadCluster {
        name: Arc::from(spec.name.as_str()),
        issuer: spec.issuer.clone(),
        audiences: spec.audiences.clone(),
        leeway,
        namespaces: Some(spec.namespaces.clone()),
        validator,
        jwks_source,
        expected_issuer: ExpectedIssuer::default(),
    })
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use serde_json::json;

    use super::*;

    fn b64(value: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(value.to_string())
    }

    /// A JWT-shaped token claiming `iss` (unsigned: selection reads, never trusts, it).
    fn token(iss: &str) -> BearerToken {
        BearerToken::new(format!(
            "{}.{}.c2ln",
            b64(&json!({"alg": "RS256"})),
            b64(&json!({ "iss": iss }))
        ))
    }

    fn config(names: &[&str]) -> ClustersConfig {
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xffu8; 256]);
        let entries: String = names
            .iter()
            .map(|name| {
                format!(
                    "- name: {name}\n  issuer: https://{name}.example\n  jwks_data: {{keys: [{{kty: RSA, kid: k, n: {n}, e: AQAB}}]}}\n"
                )
            })
            .collect();
        crate::clusters_file::parse(&format!("clusters:\n{entries}"), Path::new("."), "ops")
            .unwrap()
    }

    #[tokio::test]
    async fn tokens_are_routed_by_their_unverified_issuer() {
        let workloads = Workloads::from_config(
            &config(&["east", "west"]),
            Path::new("c.yaml"),
            crate::kube_client::KubeSettings::with_timeout(Duration::from_secs(1)),
            &Arc::default(),
        )
        .await
        .unwrap();
        let set = workloads.current();
        assert_eq!(set.generation, 1);
        assert!(!set.is_single());
        let picked = set.select(&token("https://west.example")).ok().unwrap();
        assert_eq!(&**picked.name(), "west");

        let unknown = set.select(&token("https://south.example")).err().unwrap();
        assert_eq!(unknown.reason, DenyReason::UnknownIssuer);
        assert_eq!(
            unknown.detail.as_deref(),
            Some("issuer \"https://south.example\" is not configured")
        );
        let long = set.select(&token(&"x".repeat(500))).err().unwrap();
        assert_eq!(
            long.detail.unwrap().len(),
            200 + "issuer \"\" is not configured".len()
        );
        let opaque = set
            .select(&BearerToken::new("opaque".into()))
            .err()
            .unwrap();
        assert_eq!(
            (opaque.reason, opaque.detail.as_deref()),
            (DenyReason::UnknownIssuer, Some("no iss claim (not a JWT?)"))
        );
    }

    #[tokio::test]
    async fn a_reload_keeps_unchanged_jwks_clusters_and_replaces_the_rest() {
        let path = Path::new("c.yaml");
        let workloads = Workloads::from_config(
            &config(&["east", "west"]),
            path,
            crate::kube_client::KubeSettings::with_timeout(Duration::from_secs(1)),
            &Arc::default(),
        )
        .await
        .unwrap();
        let keys_of = |set: &WorkloadSet, name: &str| {
            let cluster = set
                .clusters()
                .iter()
                .find(|c| &*c.name == name)
                .cloned()
                .unwrap();
            match &cluster.validator {
                Validator::Jwks(jwks) => jwks.keys().unwrap(),
                Validator::TokenReview(_) => panic!("jwks expected"),
            }
        };
        let before = workloads.current();
        let mut changed = config(&["east", "west", "north"]);
        // west's entry changes (another issuer): a new validator.
        changed.clusters[1].issuer = "https://west-2.example".into();
        let generation = workloads.replace(&changed, path).await.unwrap();
        assert_eq!(generation, 2);
        let after = workloads.current();
        assert!(Arc::ptr_eq(
            &keys_of(&before, "east"),
            &keys_of(&after, "east")
        ));
        assert!(!Arc::ptr_eq(
            &keys_of(&before, "west"),
            &keys_of(&after, "west")
        ));
        assert!(after.select(&token("https://west.example")).is_err());
        assert!(after.select(&token("https://north.example")).is_ok());
        // The old set is untouched for checks still holding it.
        assert!(before.select(&token("https://west.example")).is_ok());
    }

    #[test]
    fn the_namespace_policy_applies_per_cluster() {
        let spec = &config(&["east"]).clusters[0];
        let cluster = WorkloadCluster {
            name: Arc::from("east"),
            issuer: spec.issuer.clone(),
            audiences: Vec::new(),
            leeway: DEFAULT_LEEWAY,
            namespaces: Some(spec.namespaces.clone()),
            validator: Validator::Jwks(
                JwksValidator::new(
                    "east",
                    &spec.issuer,
                    match &spec.method {
                        Method::Jwks { source, .. } => source,
                        Method::TokenReview { .. } => panic!("jwks expected"),
                    },
                    Arc::new(Notify::new()),
                    Arc::default(),
                    true,
                )
                .unwrap(),
            ),
            jwks_source: None,
            expected_issuer: ExpectedIssuer::default(),
        };
        let identity = |ns: &str| WorkloadIdentity {
            service_account: crate::identity::ServiceAccountRef::new(ns, "sa").unwrap(),
            uid: String::new(),
        };
        assert!(cluster.admit(&identity("app")).is_ok());
        let denial = cluster.admit(&identity("ops")).unwrap_err();
        assert_eq!(denial.reason, DenyReason::NamespaceNotAllowed);
        assert_eq!(
            denial.detail.as_deref(),
            Some(
                "namespace \"ops\": protected namespace; only a literal namespaces.allow entry opens it"
            )
        );
    }
}
