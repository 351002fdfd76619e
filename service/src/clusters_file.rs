//! The `--clusters-config` file: which workload clusters may present tokens, how each is
//! validated (JWKS or TokenReview) and which namespaces each may map into. [`parse`]
//! turns the text into a validated configuration without touching the file system;
//! [`load`] reads the file and the files it names. Every error names the cluster and
//! the field.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::Value;

use crate::{
    Error,
    duration::{self, DurationError},
    jwks::{
        KeySource,
        fetch::{self, FetchError},
        keys::{KeyError, KeySet},
    },
    names::{self, NotALabel},
    namespaces::{Glob, GlobError, NamespacePolicy},
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
    /// Files the configuration names (`ca_file`, kubeconfigs), resolved against its
    /// directory: [`load`] reads them, and a change to one is a change to the
    /// configuration.
    pub files: Vec<NamedFile>,
}

impl ClustersConfig {
    /// The paths of [`ClustersConfig::files`].
    pub fn file_paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| f.path.clone()).collect()
    }
}

/// A file the configuration names, and for which cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    /// Resolved against the configuration's directory.
    pub path: PathBuf,
    /// Index into [`ClustersConfig::clusters`].
    cluster: usize,
    /// `ca_file` or `tokenreview.kubeconfig`.
    field: FileField,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileField {
    CaFile,
    Kubeconfig,
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
    fn parse(&self, field: &'static str) -> Result<Duration, EntryError> {
        match self {
            RawDuration::Seconds(s) => Ok(Duration::from_secs(*s)),
            RawDuration::Text(t) => {
                duration::parse(t).map_err(|source| EntryError::Duration { field, source })
            }
        }
    }
}

/// Why a clusters file is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ClustersError {
    #[error("{0}")]
    Yaml(#[from] serde_yaml::Error),
    #[error("clusters: at least one cluster is required")]
    NoClusters,
    #[error("{0}")]
    Read(std::io::Error),
    #[error("{cluster}: {problem}")]
    Entry {
        /// Which entry, by name and position.
        cluster: String,
        /// What is wrong with it (boxed: the kubeconfig and YAML errors are large).
        problem: Box<EntryError>,
    },
}

/// What is wrong with one cluster's entry; the text starts with the field.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("{0}")]
    Shape(serde_yaml::Error),
    #[error("{field}: required")]
    Required { field: &'static str },
    #[error("name: {0}")]
    Name(NotALabel),
    #[error("issuer: must be non-empty without surrounding spaces")]
    Issuer,
    #[error("{field}: {value:?} is already used by clusters[{first}]")]
    Duplicate {
        /// `name` or `issuer`.
        field: &'static str,
        /// The repeated value.
        value: String,
        /// The entry that has it first.
        first: usize,
    },
    #[error("one of jwks_uri, jwks_data, discovery: true or tokenreview is required")]
    NoMethod,
    #[error("{second}: cannot be combined with {first}; choose one validation method")]
    TwoMethods {
        /// The first one set, in the order above.
        first: &'static str,
        /// The next one.
        second: &'static str,
    },
    #[error("{field}: only for jwks_uri or discovery")]
    RemoteOnly { field: &'static str },
    #[error("leeway: only for JWKS validation (the API server checks times)")]
    LeewayWithTokenReview,
    #[error("{field}: {source}")]
    Duration {
        field: &'static str,
        source: DurationError,
    },
    #[error("leeway: {} s is more than the {} s allowed", .0.as_secs(), MAX_LEEWAY.as_secs())]
    LeewayTooLong(Duration),
    #[error(
        "refresh_interval: must be between {} s and {} s",
        REFRESH_INTERVAL_BOUNDS.0.as_secs(),
        REFRESH_INTERVAL_BOUNDS.1.as_secs()
    )]
    RefreshInterval,
    #[error("jwks_data: not a JSON document: {0}")]
    JwksJson(serde_json::Error),
    #[error("jwks_data: {0}")]
    JwksData(KeyError),
    #[error("jwks_uri: must be an https:// URL")]
    JwksUriNotHttps,
    #[error("discovery: the issuer must be an https:// URL to discover from")]
    DiscoveryNotHttps,
    #[error("audiences: empty; leave it out to accept any audience")]
    NoAudiences,
    #[error("audiences: {0:?}: an audience must be non-empty without surrounding spaces")]
    Audience(String),
    #[error("namespaces.{list}[{index}]: {source}")]
    Namespace {
        /// `allow` or `deny`.
        list: &'static str,
        /// Position in the list.
        index: usize,
        source: GlobError,
    },
    #[error("{field}: {}: {source}", path.display())]
    File {
        /// `ca_file` or `tokenreview.kubeconfig`.
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tokenreview.kubeconfig: {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("ca_file: {}: {source}", path.display())]
    CaFile { path: PathBuf, source: FetchError },
}

/// Reads and validates the file at `path` and the files it names. `own_namespace` is
/// protected in every cluster's namespace policy.
pub fn load(path: &Path, own_namespace: &str) -> Result<ClustersConfig, Error> {
    let problem = |problem: ClustersError| Error::ClustersConfig {
        path: path.to_owned(),
        problem: problem.to_string(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(ClustersError::Read(e)))?;
    let base = path.parent().unwrap_or_else(|| Path::new("."));
    let config = parse(&text, base, own_namespace).map_err(problem)?;
    read_named_files(config).map_err(problem)
}

/// Parses and validates a clusters file, reading nothing: the files it names are listed
/// in [`ClustersConfig::files`] (relative paths resolved against `base`) for
/// [`load`] to read.
pub fn parse(
    text: &str,
    base: &Path,
    own_namespace: &str,
) -> Result<ClustersConfig, ClustersError> {
    let raw: RawFile = serde_yaml::from_str(text)?;
    let entries = raw.clusters.unwrap_or_default();
    if entries.is_empty() {
        return Err(ClustersError::NoClusters);
    }
    let mut config = ClustersConfig {
        clusters: Vec::with_capacity(entries.len()),
        files: Vec::new(),
    };
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut issuers: HashMap<String, usize> = HashMap::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let label = entry_label(&entry, index);
        let in_entry = |problem| ClustersError::Entry {
            cluster: label.clone(),
            problem: Box::new(problem),
        };
        let (spec, files) = cluster(entry, base, own_namespace).map_err(in_entry)?;
        for (field, value, seen) in [
            ("name", &spec.name, &mut names),
            ("issuer", &spec.issuer, &mut issuers),
        ] {
            if let Some(first) = seen.insert(value.clone(), index) {
                let value = value.clone();
                return Err(in_entry(EntryError::Duplicate {
                    field,
                    value,
                    first,
                }));
            }
        }
        config
            .files
            .extend(files.into_iter().map(|(field, path)| NamedFile {
                path,
                cluster: index,
                field,
            }));
        config.clusters.push(spec);
    }
    Ok(config)
}

/// `cluster "east" (clusters[0])`, or `clusters[0]` for an entry without a name.
fn entry_label(entry: &serde_yaml::Value, index: usize) -> String {
    match entry.get("name").and_then(serde_yaml::Value::as_str) {
        Some(name) => format!("cluster {name:?} (clusters[{index}])"),
        None => format!("clusters[{index}]"),
    }
}

/// Reads each named file and checks it is what its field says: a kubeconfig, or a PEM
/// bundle (kept, as the only roots trusted for that cluster's key fetches).
fn read_named_files(mut config: ClustersConfig) -> Result<ClustersConfig, ClustersError> {
    for file in &config.files {
        let spec = &mut config.clusters[file.cluster];
        let in_entry = |problem| ClustersError::Entry {
            cluster: format!("cluster {:?} (clusters[{}])", spec.name, file.cluster),
            problem: Box::new(problem),
        };
        let path = file.path.clone();
        match file.field {
            FileField::Kubeconfig => {
                kube::config::Kubeconfig::read_from(&path)
                    .map_err(|source| in_entry(EntryError::Kubeconfig { path, source }))?;
            }
            FileField::CaFile => {
                let pem = std::fs::read(&path).map_err(|source| {
                    in_entry(EntryError::File {
                        field: "ca_file",
                        path: path.clone(),
                        source,
                    })
                })?;
                fetch::roots(&pem).map_err(|source| {
                    in_entry(EntryError::CaFile {
                        path: path.clone(),
                        source,
                    })
                })?;
                if let Method::Jwks {
                    source: KeySource::Remote { ca_pem, .. },
                    ..
                } = &mut spec.method
                {
                    *ca_pem = Some(pem);
                }
            }
        }
    }
    Ok(config)
}

/// One entry, and the files it names.
fn cluster(
    entry: serde_yaml::Value,
    base: &Path,
    own_namespace: &str,
) -> Result<(ClusterSpec, Vec<(FileField, PathBuf)>), EntryError> {
    let raw: RawCluster = serde_yaml::from_value(entry).map_err(EntryError::Shape)?;
    let name = raw
        .name
        .clone()
        .ok_or(EntryError::Required { field: "name" })?;
    names::check_label(&name).map_err(EntryError::Name)?;
    let issuer = raw
        .issuer
        .clone()
        .ok_or(EntryError::Required { field: "issuer" })?;
    if issuer.is_empty() || issuer.trim() != issuer {
        return Err(EntryError::Issuer);
    }
    check_method_fields(&raw)?;
    let mut files = Vec::new();
    let method = if let Some(review) = &raw.tokenreview {
        let kubeconfig = review
            .kubeconfig
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or(EntryError::Required {
                field: "tokenreview.kubeconfig",
            })?;
        let path = base.join(kubeconfig);
        files.push((FileField::Kubeconfig, path.clone()));
        Method::TokenReview { kubeconfig: path }
    } else {
        if let Some(ca_file) = &raw.ca_file {
            files.push((FileField::CaFile, base.join(ca_file)));
        }
        jwks_method(&raw, &issuer)?
    };
    let spec = ClusterSpec {
        name,
        issuer,
        audiences: audiences(raw.audiences)?,
        namespaces: namespace_policy(raw.namespaces, own_namespace)?,
        method,
    };
    Ok((spec, files))
}

/// Exactly one validation method, and only the fields that go with it.
fn check_method_fields(raw: &RawCluster) -> Result<(), EntryError> {
    let discovery = raw.discovery == Some(true);
    let chosen: Vec<&'static str> = [
        ("jwks_uri", raw.jwks_uri.is_some()),
        ("jwks_data", raw.jwks_data.is_some()),
        ("discovery", discovery),
        ("tokenreview", raw.tokenreview.is_some()),
    ]
    .into_iter()
    .filter_map(|(field, set)| set.then_some(field))
    .collect();
    match chosen.as_slice() {
        [] => return Err(EntryError::NoMethod),
        [_] => {}
        [first, second, ..] => {
            return Err(EntryError::TwoMethods { first, second });
        }
    }
    let remote = raw.jwks_uri.is_some() || discovery;
    if raw.ca_file.is_some() && !remote {
        return Err(EntryError::RemoteOnly { field: "ca_file" });
    }
    if raw.refresh_interval.is_some() && !remote {
        return Err(EntryError::RemoteOnly {
            field: "refresh_interval",
        });
    }
    if raw.leeway.is_some() && raw.tokenreview.is_some() {
        return Err(EntryError::LeewayWithTokenReview);
    }
    Ok(())
}

/// Inline keys, or where to fetch them; the CA bundle is read later, by [`load`].
fn jwks_method(raw: &RawCluster, issuer: &str) -> Result<Method, EntryError> {
    let leeway = match &raw.leeway {
        Some(l) => l.parse("leeway")?,
        None => DEFAULT_LEEWAY,
    };
    if leeway > MAX_LEEWAY {
        return Err(EntryError::LeewayTooLong(leeway));
    }
    let source = if let Some(data) = &raw.jwks_data {
        // A mapping (the original format), or the JWKS JSON as one string.
        let document = match data {
            Value::String(json) => serde_json::from_str(json).map_err(EntryError::JwksJson)?,
            other => other.clone(),
        };
        KeySource::Static(KeySet::from_json(&document).map_err(EntryError::JwksData)?)
    } else {
        let endpoint = match &raw.jwks_uri {
            Some(uri) if fetch::is_https_url(uri) => fetch::Endpoint::Uri(uri.clone()),
            Some(_) => return Err(EntryError::JwksUriNotHttps),
            None if fetch::is_https_url(issuer) => fetch::Endpoint::Discovery,
            None => return Err(EntryError::DiscoveryNotHttps),
        };
        let refresh_interval = match &raw.refresh_interval {
            Some(r) => r.parse("refresh_interval")?,
            None => DEFAULT_REFRESH_INTERVAL,
        };
        let (min, max) = REFRESH_INTERVAL_BOUNDS;
        if refresh_interval < min || refresh_interval > max {
            return Err(EntryError::RefreshInterval);
        }
        KeySource::Remote {
            endpoint,
            ca_pem: None,
            refresh_interval,
        }
    };
    Ok(Method::Jwks { source, leeway })
}

/// Absent: any audience. Present: a non-empty list of non-empty, unpadded values.
fn audiences(list: Option<Vec<String>>) -> Result<Vec<String>, EntryError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    if list.is_empty() {
        return Err(EntryError::NoAudiences);
    }
    if let Some(bad) = list.iter().find(|a| a.is_empty() || a.trim() != a.as_str()) {
        return Err(EntryError::Audience(bad.clone()));
    }
    Ok(list)
}

fn namespace_policy(
    raw: Option<RawNamespaces>,
    own_namespace: &str,
) -> Result<NamespacePolicy, EntryError> {
    let raw = raw.unwrap_or(RawNamespaces {
        allow: Vec::new(),
        deny: Vec::new(),
    });
    let globs = |list: &[String], name: &'static str| -> Result<Vec<Glob>, EntryError> {
        list.iter()
            .enumerate()
            .map(|(index, p)| {
                Glob::new(p).map_err(|source| EntryError::Namespace {
                    list: name,
                    index,
                    source,
                })
            })
            .collect()
    };
    Ok(NamespacePolicy::new(
        globs(&raw.allow, "allow")?,
        globs(&raw.deny, "deny")?,
        own_namespace,
    ))
}

#[cfg(test)]
mod tests;
