//! The Tokensmith companion: an Envoy ext_authz v3 gRPC server that validates a
//! workload-cluster service-account token and answers with a management-cluster token
//! for the service account of the same namespace and name.
//!
//! A request flows `authz` (gRPC glue) → `authz::bearer` (header) → `workload` (the
//! cluster the token's issuer names, from `--workload-kubeconfig` or the `clusters` file)
//! → `review` (TokenReview) or `jwks` (signature check) → the cluster's namespace policy
//! → `consent` (`--require-sa-label`) → `exchange` (TokenRequest on the management
//! cluster) → `authz::decision` (the CheckResponse Envoy applies).
#![deny(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod admin;
pub mod authz;
pub mod bearer;
pub mod cli;
pub mod clusters_file;
pub mod config;
pub mod consent;
pub mod deadline;
pub mod deny;
pub mod doctor;
pub mod duration;
pub mod error;
pub mod error_chain;
pub mod exchange;
pub mod greet;
pub mod identity;
pub mod jwks;
pub mod kube_client;
pub mod listener;
pub mod metrics;
pub mod names;
pub mod namespaces;
pub mod ratelimit;
pub mod review;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod workload;

pub use error::Error;
