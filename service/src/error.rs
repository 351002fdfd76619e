//! What stops or degrades the server. A denied request is not an error: see
//! `deny::DenyReason`.

use std::{net::SocketAddr, path::PathBuf};

use crate::deny::Side;

/// Errors of the companion (configuration, start-up, serving).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or setting has a value we cannot use.
    #[error("{flag}: {problem}")]
    Config {
        /// The flag, e.g. `--token-expiration`.
        flag: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The `--clusters-config` file is unreadable or invalid; `problem` names the cluster
    /// and the field.
    #[error("--clusters-config {}: {problem}", path.display())]
    ClustersConfig {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// `tokensmith jwks` could not read or use what the API server returned.
    #[error("jwks: {0}")]
    Export(String),
    /// A kubeconfig file could not be read or used.
    #[error("{cluster} cluster: kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        /// Which cluster it was meant for.
        cluster: Side,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        source: kube::config::KubeconfigError,
    },
    /// In-cluster configuration was asked for but is not available.
    #[error(
        "{cluster} cluster: in-cluster configuration unavailable (set --{cluster}-kubeconfig outside a pod): {source}"
    )]
    InCluster {
        /// Which cluster it was meant for.
        cluster: Side,
        /// Why it failed.
        source: kube::config::InClusterError,
    },
    /// The Kubernetes client could not be built.
    #[error("{cluster} cluster: cannot build client: {source}")]
    Client {
        /// Which cluster it was meant for.
        cluster: Side,
        /// Why it failed.
        source: kube::Error,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A gRPC transport failed (serving, or connecting as a client).
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The greet service answered with an error.
    #[error("greet: {}", .0.message())]
    Greet(tonic::Status),
    /// `tokensmith doctor` found problems (it printed them).
    #[error("{failed} check(s) failed")]
    Doctor {
        /// How many.
        failed: usize,
    },
    /// The server task ended abnormally.
    #[error("server task: {0}")]
    Task(#[from] tokio::task::JoinError),
}
