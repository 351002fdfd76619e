//! The `--clusters-config` file: which workload clusters may present tokens, how each is
//! validated (JWKS or TokenReview) and which namespaces each may map into. Parsed and
//! checked in full before use; every error names the cluster and the field.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;

use crate::namespaces::{Glob, NamespacePolicy};
use crate::{
    Error, duration,
    jwks::{KeySource, fetch, keys::KeySet},
    names,
};

/// Default clock skew tolerated on `exp`, `nbf` and `iat`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Largest `leeway` accepted.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Default time between periodic JWKS fetches.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Bounds of `refresh_interval`.
pub const REFRESH_INTERVAL_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));

/// A validated clusters file.
#[derive(Debug, Clone)]
pub struct ClustersConfig {
    /// The clusters, in file order.
    pub clusters: Vec<ClusterSpec>,
    /// Files the configuration read besides itself (`ca_file`, kubeconfigs): a change to
    /// one of them is a change to the configuration.
    pub files: Vec<PathBuf>,
}

/// One workload cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Unique name, a DNS-1123 label; logged as `workload_cluster`.
    pub name: String,
    /// The `iss` of its tokens; unique. Tokens are routed to the cluster by it.
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any.
    pub audiences: Vec<String>,
    /// Which namespaces it may map into.
    pub namespaces: NamespacePolicy,
    /// How its tokens are validated.
    pub method: Method,
}

/// How a cluster's tokens are validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// TokenReview on the cluster's API server.
    TokenReview {
        /// The kubeconfig to reach it with.
        kubeconfig: PathBuf,
    },
    /// Signature checks against the cluster's published keys.
    Jwks {
        /// Where the keys come from.
        source: KeySource,
        /// Clock skew tolerated on the time claims.
        leeway: Duration,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    clusters: Option<Vec<serde_yaml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Option<String>,
    issuer: Option<String>,
    jwks_uri: Option<String>,
    jwks_data: Option<Value>,
    discovery: Option<bool>,
    audiences: Option<Vec<String>>,
    ca_file: Option<PathBuf>,
    tokenreview: Option<RawTokenReview>,
    namespaces: Option<RawNamespaces>,
    leeway: Option<RawDuration>,
    refresh_interval: Option<RawDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenReview {
    kubeconfig: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespaces {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// `30` (seconds) or `30s`, `500ms`, `5m`, `1h`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(u64),
    Text(String),
}

impl RawDuration {
    fn parse(&self) -> Result<Duration, String> {
        match self {
            RawDuration::Seconds(s) => Ok(Duration::from_secs(*s)),
            RawDuration::Text(t) => duration::parse(t).map_err(|e| e.to_string()),
        }
    }
}

/// Reads and validates the file at `path`. `own_namespace` is protected in every
/// cluster's namespace policy.
pub fn load(path: &Path, own_namespace: &str) -> Result<ClustersConfig, Error> {
    let problem = |problem: String| Error::ClustersConfig {
        path: path.to_owned(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    parse(&text, base, own_namespace).map_err(problem)
}

/// Parses and validates a clusters file. Relative paths resolve against `base`.
pub fn parse(text: &str, base: &Path, own_namespace: &str) -> Result<ClustersConfig, String> {
    let raw: RawFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let entries = raw.clusters.unwrap_or_default();
    if entries.is_empty() {
        return Err("clusters: at least one cluster is required".to_owned());
    }
    let mut clusters: Vec<ClusterSpec> = Vec::with_capacity(entries.len());
    let mut files = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut issuers: HashMap<String, usize> = HashMap::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let label = match entry.get("name").and_then(serde_yaml::Value::as_str) {
            Some(name) => format!("cluster {name:?} (clusters[{index}])"),
            None => format!("clusters[{index}]"),
        };
        let spec =
            cluster(entry, base, own_namespace, &mut files).map_err(|e| format!("{label}: {e}"))?;
        if let Some(first) = names.insert(spec.name.clone(), index) {
            return Err(format!(
                "{label}: name: {:?} is already used by clusters[{first}]",
                spec.name
            ));
        }
        if let Some(first) = issuers.insert(spec.issuer.clone(), index) {
            return Err(format!(
                "{label}: issuer: {:?} is already used by clusters[{first}]",
                spec.issuer
            ));
        }
        clusters.push(spec);
    }
    Ok(ClustersConfig { clusters, files })
}

fn read(
    base: &Path,
    path: &Path,
    field: &str,
    files: &mut Vec<PathBuf>,
) -> Result<Vec<u8>, String> {
    let path = base.join(path);
    let bytes = std::fs::read(&path).map_err(|e| format!("{field}: {}: {e}", path.display()))?;
    files.push(path);
    Ok(bytes)
}

fn cluster(
    entry: serde_yaml::Value,
    base: &Path,
    own_namespace: &str,
    files: &mut Vec<PathBuf>,
) -> Result<ClusterSpec, String> {
    let raw: RawCluster = serde_yaml::from_value(entry).map_err(|e| e.to_string())?;
    let name = raw.name.ok_or("name: required")?;
    names::check_label(&name).map_err(|e| format!("name: {e}"))?;
    let issuer = raw.issuer.ok_or("issuer: required")?;
    if issuer.is_empty() || issuer.trim() != issuer {
        return Err("issuer: must be non-empty without surrounding spaces".to_owned());
    }

    let discovery = raw.discovery == Some(true);
    let chosen: Vec<&str> = [
        ("jwks_uri", raw.jwks_uri.is_some()),
        ("jwks_data", raw.jwks_data.is_some()),
        ("discovery", discovery),
        ("tokenreview", raw.tokenreview.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect();
    match chosen.as_slice() {
        [] => {
            return Err(
                "one of jwks_uri, jwks_data, discovery: true or tokenreview is required".to_owned(),
            );
        }
        [_] => {}
        [first, second, ..] => {
            return Err(format!(
                "{second}: cannot be combined with {first}; choose one validation method"
            ));
        }
    }
    let remote = raw.jwks_uri.is_some() || discovery;
    if raw.ca_file.is_some() && !remote {
        return Err("ca_file: only for jwks_uri or discovery".to_owned());
    }
    if raw.refresh_interval.is_some() && !remote {
        return Err("refresh_interval: only for jwks_uri or discovery".to_owned());
    }
    if raw.leeway.is_some() && raw.tokenreview.is_some() {
        return Err("leeway: only for JWKS validation (the API server checks times)".to_owned());
    }

    let method = if let Some(review) = raw.tokenreview {
        let kubeconfig = review
            .kubeconfig
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or("tokenreview.kubeconfig: required")?;
        let path = base.join(&kubeconfig);
        kube::config::Kubeconfig::read_from(&path)
            .map_err(|e| format!("tokenreview.kubeconfig: {}: {e}", path.display()))?;
        files.push(path.clone());
        Method::TokenReview { kubeconfig: path }
    } else {
        let leeway = match &raw.leeway {
            Some(l) => l.parse().map_err(|e| format!("leeway: {e}"))?,
            None => DEFAULT_LEEWAY,
        };
        if leeway > MAX_LEEWAY {
            return Err(format!(
                "leeway: {} s is more than the {} s allowed",
                leeway.as_secs(),
                MAX_LEEWAY.as_secs()
            ));
        }
        let source = if let Some(data) = raw.jwks_data {
            // A mapping (the original format), or the JWKS JSON as one string.
            let document = match data {
                Value::String(json) => serde_json::from_str(&json)
                    .map_err(|e| format!("jwks_data: not a JSON document: {e}"))?,
                other => other,
            };
            KeySource::Static(KeySet::from_json(&document).map_err(|e| format!("jwks_data: {e}"))?)
        } else {
            let endpoint = match raw.jwks_uri {
                Some(uri) if fetch::is_https_url(&uri) => fetch::Endpoint::Uri(uri),
                Some(_) => return Err("jwks_uri: must be an https:// URL".to_owned()),
                None if fetch::is_https_url(&issuer) => fetch::Endpoint::Discovery,
                None => {
                    return Err(
                        "discovery: the issuer must be an https:// URL to discover from".to_owned(),
                    );
                }
            };
            let ca_pem = match &raw.ca_file {
                Some(path) => {
                    let pem = read(base, path, "ca_file", files)?;
                    fetch::roots(&pem).map_err(|e| format!("ca_file: {}: {e}", path.display()))?;
                    Some(pem)
                }
                None => None,
            };
            let refresh_interval = match &raw.refresh_interval {
                Some(r) => r.parse().map_err(|e| format!("refresh_interval: {e}"))?,
                None => DEFAULT_REFRESH_INTERVAL,
            };
            let (min, max) = REFRESH_INTERVAL_BOUNDS;
            if refresh_interval < min || refresh_interval > max {
                return Err(format!(
                    "refresh_interval: must be between {} s and {} s",
                    min.as_secs(),
                    max.as_secs()
                ));
            }
            KeySource::Remote {
                endpoint,
                ca_pem,
                refresh_interval,
            }
        };
        Method::Jwks { source, leeway }
    };

    let audiences = match raw.audiences {
        None => Vec::new(),
        Some(list) if list.is_empty() => {
            return Err("audiences: empty; leave it out to accept any audience".to_owned());
        }
        Some(list) => {
            if let Some(bad) = list.iter().find(|a| a.is_empty() || a.trim() != a.as_str()) {
                return Err(format!(
                    "audiences: {bad:?}: an audience must be non-empty without surrounding spaces"
                ));
            }
            list
        }
    };

    let raw_namespaces = raw.namespaces.unwrap_or(RawNamespaces {
        allow: Vec::new(),
        deny: Vec::new(),
    });
    let globs = |list: &[String], field: &str| -> Result<Vec<Glob>, String> {
        list.iter()
            .enumerate()
            .map(|(i, p)| Glob::new(p).map_err(|e| format!("namespaces.{field}[{i}]: {e}")))
            .collect()
    };
    let namespaces = NamespacePolicy::new(
        globs(&raw_namespaces.allow, "allow")?,
        globs(&raw_namespaces.deny, "deny")?,
        own_namespace,
    );

    Ok(ClusterSpec {
        name,
        issuer,
        audiences,
        namespaces,
        method,
    })
}

#[cfg(test)]
mod tests;
