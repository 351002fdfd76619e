//! The validated configuration of `tokensmith authz`: types, not strings.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    Error,
    cli::AuthzArgs,
    clusters_file::{self, ClustersConfig},
    consent::{LabelError, LabelRequirement},
    exchange::MIN_TOKEN_LIFETIME,
    kube_client::{ClusterSource, KubeSettings},
    listener::Limits,
    namespaces::Glob,
    tls::TlsFiles,
};

/// Where the pod's namespace is mounted, with its service-account token.
const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The companion's namespace when neither the flag nor the pod says (`deploy/`'s).
pub const DEFAULT_COMPANION_NAMESPACE: &str = "tokensmith-system";

/// Where workload tokens are validated.
#[derive(Debug, Clone)]
pub enum WorkloadsSource {
    /// `--workload-kubeconfig`: one cluster, TokenReview for every token.
    Kubeconfig(SingleCluster),
    /// `--clusters-config`: the validated file, reloaded while serving.
    File {
        /// The file.
        path: PathBuf,
        /// Its content at start.
        config: ClustersConfig,
    },
}

/// How long in-flight checks may take to finish after SIGTERM/SIGINT.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Everything `server::start` needs.
#[derive(Debug, Clone)]
pub struct AuthzConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// Where workload tokens are validated.
    pub workloads: WorkloadsSource,
    /// The companion's own namespace, protected in every cluster's namespace policy.
    pub companion_namespace: String,
    /// Where TokenRequests go.
    pub management: ClusterSource,
    /// `--require-sa-label`: the label a management service account must carry.
    pub require_sa_label: Option<LabelRequirement>,
    /// Longest lifetime requested for an exchanged token.
    pub token_expiration: Duration,
    /// Audiences of exchanged tokens; empty means the API server's default.
    pub audiences: Vec<String>,
    /// Bound on the Kubernetes calls of one check.
    pub kube_timeout: Duration,
    /// Kubernetes client settings (timeout, concurrency, validation cache).
    pub kube: KubeSettings,
    /// Most exchanged tokens cached; 0: no exchange cache.
    pub cache_max_entries: u64,
    /// Per-identity rate limit (checks/s, burst); `None`: unlimited.
    pub rate_limit: Option<(f64, u32)>,
    /// The metrics endpoint.
    pub metrics_addr: SocketAddr,
    /// TLS for the gRPC listener; `None`: plain text (e.g. behind the mesh's mTLS).
    pub tls: Option<TlsFiles>,
    /// Largest gRPC message in either direction.
    pub grpc_max_message_bytes: usize,
    /// Connections and handshakes at once.
    pub listener: Limits,
    /// HTTP/2 streams per connection.
    pub grpc_max_concurrent_streams: u32,
    /// HTTP/2 keepalive PING interval; zero: off.
    pub grpc_keepalive: Duration,
    /// How long in-flight checks may take to finish on shutdown.
    pub drain_grace: Duration,
}

/// `--workload-issuer`: the `iss` the single workload cluster's tokens must carry; any
/// other is refused before a TokenReview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SingleIssuer {
    /// Empty (the default): read from the API server's OIDC discovery at start.
    Discover,
    /// `*`: not checked (an API server with several `--service-account-issuer`s).
    Any,
    /// This issuer.
    Exact(String),
}

impl SingleIssuer {
    fn from_flag(flag: &str) -> Self {
        match flag {
            "" => SingleIssuer::Discover,
            "*" => SingleIssuer::Any,
            issuer => SingleIssuer::Exact(issuer.to_owned()),
        }
    }
}

/// The one workload cluster of `--workload-kubeconfig` and what its flags say of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SingleCluster {
    /// Where the cluster is.
    pub source: ClusterSource,
    /// `--workload-issuer`: which `iss` tokens must carry to be worth a TokenReview.
    pub issuer: SingleIssuer,
    /// `--workload-audiences`.
    pub audiences: Vec<String>,
    /// `--allow-namespaces`.
    pub allow_namespaces: Vec<Glob>,
}

impl TryFrom<AuthzArgs> for AuthzConfig {
    type Error = Error;

    fn try_from(args: AuthzArgs) -> Result<Self, Error> {
        check_bounds(&args)?;
        let tls = tls_files(&args)?;
        let companion_namespace = companion_namespace(
            &args.companion_namespace,
            args.management_kubeconfig.is_empty(),
        );
        let workloads = workloads_source(&args, &companion_namespace)?;
        let require_sa_label = required_label(&args.require_sa_label)?;
        Ok(AuthzConfig {
            listen: SocketAddr::new(args.addr, args.port),
            require_sa_label,
            workloads,
            companion_namespace,
            management: ClusterSource::from_flag(&args.management_kubeconfig),
            token_expiration: args.token_expiration,
            audiences: args.audiences,
            kube_timeout: args.kube_timeout,
            kube: KubeSettings {
                timeout: args.kube_timeout,
                max_concurrency: args.kube_max_concurrency,
                validation_cache_ttl: args.validation_cache_ttl,
                review_max_in_flight: args.review_max_in_flight,
                review_max_in_flight_per_source: args.review_max_in_flight_per_source,
            },
            cache_max_entries: args.cache_max_entries,
            rate_limit: (args.rate_limit > 0.0).then_some((args.rate_limit, args.rate_limit_burst)),
            metrics_addr: args.metrics_addr,
            tls,
            grpc_max_message_bytes: args.grpc_max_message_bytes,
            listener: Limits {
                max_connections: args.grpc_max_connections,
                max_handshakes: args.tls_max_handshakes,
            },
            grpc_max_concurrent_streams: args.grpc_max_concurrent_streams,
            grpc_keepalive: args.grpc_keepalive,
            drain_grace: DRAIN_GRACE,
        })
    }
}

/// The numeric and list flags that need no file: each within its bounds.
fn check_bounds(args: &AuthzArgs) -> Result<(), Error> {
    for (flag, value) in [
        ("--grpc-max-connections", args.grpc_max_connections),
        ("--tls-max-handshakes", args.tls_max_handshakes),
        ("--review-max-in-flight", args.review_max_in_flight),
        (
            "--grpc-max-concurrent-streams",
            args.grpc_max_concurrent_streams as usize,
        ),
    ] {
        if value == 0 {
            return Err(Error::Config {
                flag,
                problem: "must be at least 1".to_owned(),
            });
        }
    }
    if args.review_max_in_flight_per_source > args.review_max_in_flight {
        return Err(Error::Config {
            flag: "--review-max-in-flight-per-source",
            problem: format!(
                "{} is more than --review-max-in-flight ({}); a share is a part of it",
                args.review_max_in_flight_per_source, args.review_max_in_flight
            ),
        });
    }
    if args.token_expiration < MIN_TOKEN_LIFETIME {
        return Err(Error::Config {
            flag: "--token-expiration",
            problem: format!(
                "{} s is below the TokenRequest minimum of {} s",
                args.token_expiration.as_secs(),
                MIN_TOKEN_LIFETIME.as_secs()
            ),
        });
    }
    if args.kube_timeout.is_zero() {
        return Err(Error::Config {
            flag: "--kube-timeout",
            problem: "must be greater than zero".to_owned(),
        });
    }
    if let Some(bad) = args
        .audiences
        .iter()
        .find(|a| a.trim().is_empty() || a.trim() != a.as_str())
    {
        return Err(Error::Config {
            flag: "--audiences",
            problem: format!("{bad:?}: an audience must be non-empty without surrounding spaces"),
        });
    }
    if args.kube_max_concurrency == 0 {
        return Err(Error::Config {
            flag: "--kube-max-concurrency",
            problem: "must be at least 1".to_owned(),
        });
    }
    if !(args.rate_limit.is_finite() && args.rate_limit >= 0.0) {
        return Err(Error::Config {
            flag: "--rate-limit",
            problem: format!("{} is not a rate (checks per second, ≥ 0)", args.rate_limit),
        });
    }
    if args.rate_limit > 0.0 && args.rate_limit_burst == 0 {
        return Err(Error::Config {
            flag: "--rate-limit-burst",
            problem: "must be at least 1 when --rate-limit is set".to_owned(),
        });
    }
    if args.grpc_max_message_bytes < 4096 {
        return Err(Error::Config {
            flag: "--grpc-max-message-bytes",
            problem: format!(
                "{} is too small for a CheckRequest (at least 4096)",
                args.grpc_max_message_bytes
            ),
        });
    }
    Ok(())
}

/// `--tls-cert`, `--tls-key`, `--client-ca`: all or nothing (the CA is optional), read
/// once now so a bad file stops the start.
fn tls_files(args: &AuthzArgs) -> Result<Option<TlsFiles>, Error> {
    let missing = |flag, problem: &str| Error::Config {
        flag,
        problem: problem.to_owned(),
    };
    let files = match (
        args.tls_cert.as_str(),
        args.tls_key.as_str(),
        args.client_ca.as_str(),
    ) {
        ("", "", "") => return Ok(None),
        ("", _, _) => {
            return Err(missing(
                "--tls-cert",
                "is required with --tls-key or --client-ca",
            ));
        }
        (_, "", _) => return Err(missing("--tls-key", "is required with --tls-cert")),
        (cert, key, ca) => TlsFiles {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
            client_ca: (!ca.is_empty()).then(|| PathBuf::from(ca)),
        },
    };
    // Unreadable or mismatched files are a start-up error, not a first-connection one.
    files.load()?;
    Ok(Some(files))
}

/// The one `--workload-kubeconfig` cluster, or the `--clusters-config` file (loaded now),
/// never a mix of their flags.
fn workloads_source(args: &AuthzArgs, companion_namespace: &str) -> Result<WorkloadsSource, Error> {
    Ok(if args.clusters_config.is_empty() {
        let allow_namespaces = args
            .allow_namespaces
            .iter()
            .map(|p| Glob::new(p))
            .collect::<Result<_, _>>()
            .map_err(|e: crate::namespaces::GlobError| Error::Config {
                flag: "--allow-namespaces",
                problem: e.to_string(),
            })?;
        if let Some(bad) = args.workload_audiences.iter().find(|a| a.trim().is_empty()) {
            return Err(Error::Config {
                flag: "--workload-audiences",
                problem: format!("{bad:?} is not an audience"),
            });
        }
        WorkloadsSource::Kubeconfig(SingleCluster {
            source: ClusterSource::from_flag(&args.workload_kubeconfig),
            issuer: SingleIssuer::from_flag(&args.workload_issuer),
            audiences: args.workload_audiences.clone(),
            allow_namespaces,
        })
    } else if let Some(flag) = [
        (!args.workload_issuer.is_empty()).then_some("--workload-issuer"),
        (!args.workload_audiences.is_empty()).then_some("--workload-audiences"),
        (!args.allow_namespaces.is_empty()).then_some("--allow-namespaces"),
    ]
    .into_iter()
    .flatten()
    .next()
    {
        return Err(Error::Config {
            flag,
            problem: "applies to --workload-kubeconfig only; with --clusters-config set \
                      `audiences` and `namespaces.allow` on the cluster in the file"
                .to_owned(),
        });
    } else if !args.workload_kubeconfig.is_empty() {
        return Err(Error::Config {
            flag: "--workload-kubeconfig",
            problem: "cannot be combined with --clusters-config; list the cluster in \
                      the file as `tokenreview: {kubeconfig: …}` with its issuer"
                .to_owned(),
        });
    } else {
        let path = PathBuf::from(&args.clusters_config);
        let config = clusters_file::load(&path, companion_namespace)?;
        WorkloadsSource::File { path, config }
    })
}

/// `--require-sa-label KEY=VALUE`; empty: off.
fn required_label(flag: &str) -> Result<Option<LabelRequirement>, Error> {
    Ok(match flag {
        "" => None,
        text => Some(text.parse().map_err(|e: LabelError| Error::Config {
            flag: "--require-sa-label",
            problem: e.to_string(),
        })?),
    })
}

/// `--companion-namespace`, else the pod's namespace, else [`DEFAULT_COMPANION_NAMESPACE`].
/// The pod's namespace counts only when the management cluster is the pod's own
/// (`in_cluster`): with `--management-kubeconfig` it says nothing about that cluster.
fn companion_namespace(flag: &str, in_cluster: bool) -> String {
    if !flag.is_empty() {
        return flag.to_owned();
    }
    if !in_cluster {
        return DEFAULT_COMPANION_NAMESPACE.to_owned();
    }
    std::fs::read_to_string(POD_NAMESPACE_FILE)
        .ok()
        .map(|ns| ns.trim().to_owned())
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| DEFAULT_COMPANION_NAMESPACE.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn config(extra: &[&str]) -> Result<AuthzConfig, Error> {
        let args = ["tokensmith", "authz"].iter().chain(extra);
        let Command::Authz(a) = Cli::try_parse_from(args).unwrap().command else {
            panic!("authz")
        };
        AuthzConfig::try_from(*a)
    }

    #[test]
    fn workload_audiences_and_allowed_namespaces_are_validated_and_single_mode_only() {
        let c = config(&[
            "--workload-audiences",
            "tokensmith,other",
            "--allow-namespaces",
            "team-*",
        ])
        .unwrap();
        let WorkloadsSource::Kubeconfig(SingleCluster {
            audiences,
            allow_namespaces,
            ..
        }) = c.workloads
        else {
            panic!("single mode")
        };
        assert_eq!(audiences, ["tokensmith", "other"]);
        assert_eq!(allow_namespaces.len(), 1);
        let e = config(&["--allow-namespaces", "Team"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--allow-namespaces") && e.contains("not a namespace pattern"),
            "{e}"
        );
        let e = config(&["--workload-audiences", " "])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--workload-audiences"), "{e}");
        let e = config(&["--clusters-config", "/x.yaml", "--workload-audiences", "a"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("applies to --workload-kubeconfig only"), "{e}");
    }

    #[test]
    fn the_required_label_is_parsed_or_named_in_the_error() {
        let c = config(&["--require-sa-label", "tokensmith.io/exchange=true"]).unwrap();
        assert_eq!(
            c.require_sa_label.map(|l| l.to_string()).as_deref(),
            Some("tokensmith.io/exchange=true")
        );
        assert_eq!(config(&[]).unwrap().require_sa_label, None);
        let e = config(&["--require-sa-label", "tokensmith.io/exchange"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--require-sa-label") && e.contains("not KEY=VALUE"),
            "{e}"
        );
    }

    #[test]
    fn a_source_share_cannot_exceed_the_turns() {
        let e = config(&[
            "--review-max-in-flight",
            "4",
            "--review-max-in-flight-per-source",
            "5",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("--review-max-in-flight-per-source"), "{e}");
        let c = config(&["--review-max-in-flight-per-source", "0"]).unwrap();
        assert_eq!(c.kube.review_max_in_flight_per_source, 0);
    }

    #[test]
    fn the_pods_namespace_is_not_the_companions_in_another_management_cluster() {
        assert_eq!(companion_namespace("ops", false), "ops");
        assert_eq!(companion_namespace("", false), DEFAULT_COMPANION_NAMESPACE);
    }

    #[test]
    fn defaults_are_valid() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:9001");
        assert!(matches!(
            c.workloads,
            WorkloadsSource::Kubeconfig(SingleCluster {
                source: ClusterSource::InCluster,
                ..
            })
        ));
    }

    #[test]
    fn token_expiration_below_the_api_minimum_is_rejected() {
        let e = config(&["--token-expiration", "300"])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--token-expiration: 300 s is below the TokenRequest minimum of 600 s"
        );
    }

    #[test]
    fn zero_kube_timeout_is_rejected() {
        let e = config(&["--kube-timeout", "0"]).unwrap_err().to_string();
        assert_eq!(e, "--kube-timeout: must be greater than zero");
    }

    #[test]
    fn blank_audiences_are_rejected() {
        let e = config(&["--audiences", "a,"]).unwrap_err().to_string();
        assert!(e.starts_with("--audiences: \"\""), "{e}");
    }

    #[test]
    fn clusters_config_and_workload_kubeconfig_are_exclusive() {
        let e = config(&[
            "--clusters-config",
            "/c.yaml",
            "--workload-kubeconfig",
            "/k",
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "--workload-kubeconfig: cannot be combined with --clusters-config; list the cluster in the file as `tokenreview: {kubeconfig: …}` with its issuer"
        );
    }

    #[test]
    fn an_unreadable_clusters_file_is_a_usage_error_naming_it() {
        let e = config(&["--clusters-config", "/nonexistent/clusters.yaml"]).unwrap_err();
        assert!(matches!(e, Error::ClustersConfig { .. }));
        assert_eq!(
            e.to_string(),
            "--clusters-config /nonexistent/clusters.yaml: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn the_companion_namespace_flag_wins() {
        assert_eq!(companion_namespace("ops", true), "ops");
        let c = config(&["--companion-namespace", "ops"]).unwrap();
        assert_eq!(c.companion_namespace, "ops");
    }
}
