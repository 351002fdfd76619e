//! The validated configuration of `tokensmith authz`: types, not strings.

use std::{net::SocketAddr, time::Duration};

use crate::{Error, cli::AuthzArgs, cluster::ClusterSource, exchange::MIN_TOKEN_LIFETIME};

/// How long in-flight checks may take to finish after SIGTERM/SIGINT.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Everything `server::start` needs.
#[derive(Debug, Clone)]
pub struct AuthzConfig {
    /// Where the gRPC server listens.
    pub listen: SocketAddr,
    /// Where TokenReviews go.
    pub workload: ClusterSource,
    /// Where TokenRequests go.
    pub management: ClusterSource,
    /// Longest lifetime requested for an exchanged token.
    pub token_expiration: Duration,
    /// Audiences of exchanged tokens; empty means the API server's default.
    pub audiences: Vec<String>,
    /// Bound on the Kubernetes calls of one check.
    pub kube_timeout: Duration,
    /// How long in-flight checks may take to finish on shutdown.
    pub drain_grace: Duration,
}

impl TryFrom<AuthzArgs> for AuthzConfig {
    type Error = Error;

    fn try_from(args: AuthzArgs) -> Result<Self, Error> {
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
                problem: format!(
                    "{bad:?}: an audience must be non-empty without surrounding spaces"
                ),
            });
        }
        Ok(AuthzConfig {
            listen: SocketAddr::new(args.addr, args.port),
            workload: ClusterSource::from_flag(&args.workload_kubeconfig),
            management: ClusterSource::from_flag(&args.management_kubeconfig),
            token_expiration: args.token_expiration,
            audiences: args.audiences,
            kube_timeout: args.kube_timeout,
            drain_grace: DRAIN_GRACE,
        })
    }
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
        AuthzConfig::try_from(a)
    }

    #[test]
    fn defaults_are_valid() {
        let c = config(&[]).unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:9001");
        assert_eq!(c.workload, ClusterSource::InCluster);
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
}
