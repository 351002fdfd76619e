//! Test harness for Tokensmith: a fake Kubernetes API server over real HTTPS
//! (TokenReview, TokenRequest, discovery, JWKS), with faults and a call log.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bench;
pub mod companion;
pub mod envoy;
pub mod fake_apiserver;
pub mod http;
pub mod istio;
pub mod leak_audit;
pub mod manifests;
pub mod process;
pub mod tls;
pub mod trivial_authz;
pub mod upstream;

pub use fake_apiserver::{
    Call, Claims, Endpoint, FakeCluster, FakeClusterBuilder, Fault, Rights, ServiceAccount,
    TokenBuilder, TokenRequestSpec,
};

use std::{net::SocketAddr, path::PathBuf};

/// What can go wrong while setting up or using the harness. Test code usually wraps it in
/// `anyhow::Result`; library code returns it instead of panicking.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server was asked to listen somewhere other than the loopback interface.
    #[error("refusing to listen on {addr}: the fake API server binds loopback addresses only")]
    NotLoopback { addr: SocketAddr },
    /// Binding or reading the listening socket failed.
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A file (kubeconfig, CA bundle, token) could not be written.
    #[error("write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// There is no checked-in signing key with this index.
    #[error("signing key {index}: only keys 0..{count} exist in tests/fixtures")]
    NoSuchSigningKey { index: usize, count: usize },
    /// A checked-in key or generated certificate was unusable.
    #[error("key material: {0}")]
    KeyMaterial(String),
    /// The serving certificate could not be generated.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the generated certificate or configuration.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// A manifest or CRD file could not be read or parsed.
    #[error("manifest: {0}")]
    Manifest(String),
    /// `FakeCluster::verify` rejected a token; the text says why.
    #[error("token rejected: {0}")]
    InvalidToken(String),
    /// A protobuf request body could not be decoded.
    #[error("protobuf body: {0}")]
    Protobuf(String),
    /// A child process (the companion) could not be started, reached or stopped.
    #[error("process: {0}")]
    Process(String),
    /// Envoy could not be found, configured or started.
    #[error("envoy: {0}")]
    Envoy(String),
    /// An HTTP exchange with Envoy or an upstream failed.
    #[error("http: {0}")]
    Http(String),
    /// A JSON document could not be serialised.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}
