//! The Tokensmith companion: an Envoy ext_authz v3 gRPC server that validates a
//! workload-cluster service-account token and answers with a management-cluster token
//! for the service account of the same namespace and name.
//!
//! A request flows `authz` (gRPC glue) → `bearer` (header) → `workload` (the cluster
//! the token's issuer names, from `--workload-kubeconfig` or the `clusters_file`) →
//! `review` (TokenReview) or `jwks` (signature check) → the cluster's `namespaces`
//! policy → `consent` (`--require-sa-label`) → `exchange` (TokenRequest on the management
//! cluster) → `authz::decision` (the CheckResponse Envoy applies). Every stage refuses
//! with a `deny::Denial`; `deny` imports none of them. Only the modules the binary and the
//! tests use are public.
#![deny(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub(crate) mod admin;
pub(crate) mod authz;
pub(crate) mod bearer;
pub mod cli;
pub(crate) mod clusters_file;
pub mod config;
pub mod consent;
pub(crate) mod deadline;
pub mod deny;
pub mod doctor;
pub mod duration;
pub mod error;
pub(crate) mod error_chain;
pub(crate) mod exchange;
/// Entry points of the fuzz targets (`fuzz/`) and their corpus replay; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod greet;
pub(crate) mod identity;
pub mod jwks;
pub(crate) mod kube_client;
pub(crate) mod listener;
pub mod metrics;
pub(crate) mod names;
pub(crate) mod namespaces;
pub(crate) mod ratelimit;
pub(crate) mod review;
pub(crate) mod secret;
pub mod server;
pub mod telemetry;
pub(crate) mod tls;
pub(crate) mod workload;

pub use error::Error;
