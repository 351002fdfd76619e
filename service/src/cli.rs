//! The command line, compatible with the original Go tool (`authz`, `serve`, `greet`,
//! `version`). Every flag can also come from a `TOKENSMITH_*` environment variable.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{duration, names};

/// Tokensmith: exchange workload-cluster service-account tokens for management-cluster ones.
#[derive(Debug, Parser)]
#[command(name = "tokensmith", version, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Log level.
    #[arg(long, global = true, env = "TOKENSMITH_LOG_LEVEL", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// Log format.
    #[arg(long, global = true, env = "TOKENSMITH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Envoy ext_authz gRPC server that exchanges tokens.
    Authz(Box<AuthzArgs>),
    /// Run the demo greet gRPC service.
    Serve(ServeArgs),
    /// Call the demo greet service and print its answer.
    Greet(GreetArgs),
    /// Print a --clusters-config entry for a cluster, read through its API server.
    Jwks(JwksArgs),
    /// Check a deployment with the flags of `authz`: API servers, rights, keys, clocks,
    /// the reviewer token; exit 0 only when every check passes.
    Doctor(Box<DoctorArgs>),
    /// Print the version.
    Version,
}

/// Flags of `tokensmith authz`.
#[derive(Debug, Clone, Args)]
pub struct AuthzArgs {
    /// Address to listen on.
    #[arg(long, env = "TOKENSMITH_ADDR", default_value = "0.0.0.0")]
    pub addr: IpAddr,
    /// gRPC port to listen on.
    #[arg(long, env = "TOKENSMITH_PORT", default_value_t = 9001)]
    pub port: u16,
    /// Kubeconfig of the workload cluster (TokenReview); empty means in-cluster. Not
    /// together with --clusters-config.
    #[arg(long, env = "TOKENSMITH_WORKLOAD_KUBECONFIG", default_value = "")]
    pub workload_kubeconfig: String,
    /// Issuer (`iss`) of the workload cluster's tokens: any other (but the legacy
    /// kubernetes/serviceaccount) is refused before a TokenReview. Empty: discovered from
    /// the API server's /.well-known/openid-configuration at start; `*`: not checked.
    /// With --workload-kubeconfig only.
    #[arg(long, env = "TOKENSMITH_WORKLOAD_ISSUER", default_value = "")]
    pub workload_issuer: String,
    /// Audience the workload tokens must carry (repeatable or comma-separated): sent as
    /// TokenReview spec.audiences and checked in its answer. None means the workload API
    /// server's own audiences (any pod's default token). With --workload-kubeconfig only.
    #[arg(
        long = "workload-audiences",
        env = "TOKENSMITH_WORKLOAD_AUDIENCES",
        value_delimiter = ','
    )]
    pub workload_audiences: Vec<String>,
    /// Namespaces that may be mapped (globs: *, ?; repeatable or comma-separated); none
    /// means all but the protected ones, which only a literal entry opens. With
    /// --workload-kubeconfig only.
    #[arg(
        long = "allow-namespaces",
        env = "TOKENSMITH_ALLOW_NAMESPACES",
        value_delimiter = ','
    )]
    pub allow_namespaces: Vec<String>,
    /// YAML file of workload clusters (JWKS or TokenReview each, with namespace policy),
    /// reloaded when it changes; replaces --workload-kubeconfig. Empty means none.
    #[arg(long, env = "TOKENSMITH_CLUSTERS_CONFIG", default_value = "")]
    pub clusters_config: String,
    /// Namespace of the companion in the management cluster, protected from mapping
    /// like kube-system; empty means the pod's own namespace when the management cluster
    /// is the pod's own (no --management-kubeconfig), else tokensmith-system.
    #[arg(long, env = "TOKENSMITH_COMPANION_NAMESPACE", default_value = "")]
    pub companion_namespace: String,
    /// Kubeconfig of the management cluster (TokenRequest); empty means in-cluster.
    #[arg(long, env = "TOKENSMITH_MANAGEMENT_KUBECONFIG", default_value = "")]
    pub management_kubeconfig: String,
    /// Mint tokens only for management service accounts carrying this label (KEY=VALUE,
    /// e.g. tokensmith.io/exchange=true); others get 403. Watched (needs list and watch on
    /// serviceaccounts; a list unconfirmed for 10 min gives 503). Empty: no label required.
    #[arg(long, env = "TOKENSMITH_REQUIRE_SA_LABEL", default_value = "")]
    pub require_sa_label: String,
    /// Longest lifetime of an exchanged token (seconds, or with a unit: 90m, 1h); also
    /// capped by the workload token's remaining life, never below 600 s.
    #[arg(long, env = "TOKENSMITH_TOKEN_EXPIRATION", default_value = "3600", value_parser = duration::parse)]
    pub token_expiration: Duration,
    /// Audience of the exchanged tokens (repeatable or comma-separated); none means the
    /// management API server's own audiences.
    #[arg(
        long = "audiences",
        env = "TOKENSMITH_AUDIENCES",
        value_delimiter = ','
    )]
    pub audiences: Vec<String>,
    /// Time limit for the Kubernetes calls of one check (seconds, or 500ms, 2s); Envoy's
    /// own deadline (grpc-timeout) applies when sooner.
    #[arg(long, env = "TOKENSMITH_KUBE_TIMEOUT", default_value = "5s", value_parser = duration::parse)]
    pub kube_timeout: Duration,
    /// Most Kubernetes calls in flight per API server; more wait for a slot within
    /// their check's deadline.
    #[arg(long, env = "TOKENSMITH_KUBE_MAX_CONCURRENCY", default_value_t = 32)]
    pub kube_max_concurrency: usize,
    /// Most exchanged tokens cached (0 turns the exchange cache off).
    #[arg(long, env = "TOKENSMITH_CACHE_MAX_ENTRIES", default_value_t = 10_000)]
    pub cache_max_entries: u64,
    /// How long a TokenReview answer is reused (never past the token's expiry; a hit past
    /// 70 % of it revalidates in the background). 0 turns the validation cache off, and
    /// the JWKS verified-token cache too.
    #[arg(long, env = "TOKENSMITH_VALIDATION_CACHE_TTL", default_value = "10s", value_parser = duration::parse)]
    pub validation_cache_ttl: Duration,
    /// TokenReviews in flight per workload cluster, for tokens not in the validation
    /// cache; a check that finds none free within 0.5 s gets 429, so unknown tokens
    /// cannot take every API-server slot.
    #[arg(long, env = "TOKENSMITH_REVIEW_MAX_IN_FLIGHT", default_value_t = 16)]
    pub review_max_in_flight: usize,
    /// A client address's share of those (an IPv6 /64 counts as one; 0 = none): a client
    /// past its share may use idle turns, but waits behind every client within theirs.
    #[arg(
        long,
        env = "TOKENSMITH_REVIEW_MAX_IN_FLIGHT_PER_SOURCE",
        default_value_t = 4
    )]
    pub review_max_in_flight_per_source: usize,
    /// Checks per second allowed per service account (0 = no limit); past it, 429.
    #[arg(long, env = "TOKENSMITH_RATE_LIMIT", default_value_t = 0.0)]
    pub rate_limit: f64,
    /// Burst of checks allowed per service account above the rate.
    #[arg(long, env = "TOKENSMITH_RATE_LIMIT_BURST", default_value_t = 20)]
    pub rate_limit_burst: u32,
    /// Address of the metrics endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "TOKENSMITH_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: std::net::SocketAddr,
    /// PEM certificate chain: serve gRPC over TLS (reloaded when the file changes).
    #[arg(long, env = "TOKENSMITH_TLS_CERT", default_value = "")]
    pub tls_cert: String,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "TOKENSMITH_TLS_KEY", default_value = "")]
    pub tls_key: String,
    /// PEM CA bundle: require client certificates signed by it (mTLS).
    #[arg(long, env = "TOKENSMITH_CLIENT_CA", default_value = "")]
    pub client_ca: String,
    /// Largest gRPC message accepted or sent.
    #[arg(long, env = "TOKENSMITH_GRPC_MAX_MESSAGE_BYTES", default_value_t = 1024 * 1024)]
    pub grpc_max_message_bytes: usize,
    /// Most gRPC connections served at once; beyond it new ones wait to be accepted.
    #[arg(long, env = "TOKENSMITH_GRPC_MAX_CONNECTIONS", default_value_t = 1024)]
    pub grpc_max_connections: usize,
    /// Most HTTP/2 streams (Checks in flight) per connection.
    #[arg(
        long,
        env = "TOKENSMITH_GRPC_MAX_CONCURRENT_STREAMS",
        default_value_t = 256
    )]
    pub grpc_max_concurrent_streams: u32,
    /// Most TLS handshakes in flight at once (each has 10 s to finish).
    #[arg(long, env = "TOKENSMITH_TLS_MAX_HANDSHAKES", default_value_t = 64)]
    pub tls_max_handshakes: usize,
    /// HTTP/2 keepalive PING interval (0 turns it off); an unanswered PING closes the
    /// connection after 10 s.
    #[arg(long, env = "TOKENSMITH_GRPC_KEEPALIVE", default_value = "30s", value_parser = duration::parse)]
    pub grpc_keepalive: Duration,
}

/// Flags of `tokensmith doctor`: those of `authz`, plus where to check minting.
#[derive(Debug, Clone, Args)]
pub struct DoctorArgs {
    /// Management namespace where minting tokens must be allowed (repeatable or
    /// comma-separated); default: those --allow-namespaces or the clusters file name
    /// outright.
    #[arg(long = "namespace", value_delimiter = ',')]
    pub namespaces: Vec<String>,
    /// Minting is granted cluster-wide on purpose
    /// (deploy/components/cluster-wide-token-minting): check that grant instead of
    /// flagging it.
    #[arg(long)]
    pub cluster_wide_minting: bool,
    /// The flags of `authz`.
    #[command(flatten)]
    pub authz: AuthzArgs,
}

/// Flags of `tokensmith serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TOKENSMITH_SERVE_ADDR", default_value = "0.0.0.0")]
    pub addr: IpAddr,
    /// Port to listen on.
    #[arg(long, env = "TOKENSMITH_SERVE_PORT", default_value_t = 8080)]
    pub port: u16,
}

/// Flags of `tokensmith greet`.
#[derive(Debug, Clone, Args)]
pub struct GreetArgs {
    /// Name to greet.
    #[arg(long, env = "TOKENSMITH_GREET_NAME", default_value = "World")]
    pub name: String,
    /// URL of the greet service.
    #[arg(
        long,
        env = "TOKENSMITH_GREET_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
}

/// Flags of `tokensmith jwks`.
#[derive(Debug, Clone, Args)]
pub struct JwksArgs {
    /// Kubeconfig of the workload cluster to read (its current context).
    #[arg(long, env = "TOKENSMITH_JWKS_KUBECONFIG")]
    pub kubeconfig: PathBuf,
    /// Name of the cluster entry (a DNS-1123 label); default: from the context's name.
    #[arg(long, env = "TOKENSMITH_JWKS_NAME", value_parser = parse_cluster_name)]
    pub name: Option<String>,
}

fn parse_cluster_name(value: &str) -> Result<String, names::NotALabel> {
    names::check_label(value).map(|()| value.to_owned())
}

/// Log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogLevel {
    /// Everything, including per-call detail.
    Debug,
    /// Decisions and lifecycle.
    Info,
    /// Problems that need attention.
    Warn,
    /// Failures only.
    Error,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authz_defaults_match_the_original_tool() {
        let cli = Cli::try_parse_from(["tokensmith", "authz"]).unwrap();
        let Command::Authz(a) = cli.command else {
            panic!("authz")
        };
        assert_eq!(a.addr.to_string(), "0.0.0.0");
        assert_eq!(a.port, 9001);
        assert_eq!(a.workload_kubeconfig, "");
        assert_eq!(a.token_expiration, Duration::from_secs(3600));
        assert_eq!(a.kube_timeout, Duration::from_secs(5));
        assert!(a.audiences.is_empty());
        assert_eq!(
            (cli.log_level, cli.log_format),
            (LogLevel::Info, LogFormat::Json)
        );
    }

    #[test]
    fn audiences_repeat_or_split_on_commas() {
        let cli = Cli::try_parse_from([
            "tokensmith",
            "authz",
            "--audiences",
            "a,b",
            "--audiences",
            "c",
        ])
        .unwrap();
        let Command::Authz(a) = cli.command else {
            panic!("authz")
        };
        assert_eq!(a.audiences, ["a", "b", "c"]);
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

#[cfg(test)]
mod readme {
    //! The README's flag table must match `tokensmith authz --help`.

    use clap::CommandFactory;

    use super::Cli;

    #[test]
    fn readme_flag_table_matches_the_authz_command() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("## Configuration (`tokensmith authz`)")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("README has the configuration section");
        let mut documented: Vec<(String, String)> = section
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(|c| c.trim().trim_matches('`')).collect();
                (cells[1].to_owned(), cells[2].to_owned())
            })
            .collect();
        documented.sort();

        let cli = Cli::command();
        let authz = cli.find_subcommand("authz").expect("authz subcommand");
        let mut actual: Vec<(String, String)> = authz
            .get_arguments()
            .chain(cli.get_arguments())
            .filter_map(|a| {
                let long = a.get_long()?;
                let env = a.get_env()?.to_string_lossy().into_owned();
                Some((format!("--{long}"), env))
            })
            .collect();
        actual.sort();
        actual.dedup();
        assert_eq!(documented, actual);
    }
}
