//! Tokensmith as a proxy-wasm HTTP filter: reads the workload's bearer token inside Envoy,
//! asks the companion (`envoy.service.auth.v3.Authorization/Check`) over gRPC, applies
//! its answer, and keeps exchanged tokens in a bounded cache in the proxy's shared data.
//!
//! Everything but `host` is pure Rust, tested natively and on wasm32-unknown-unknown;
//! `host` (the only module that names `proxy_wasm`) exists only on wasm32-wasi.
#![deny(missing_docs)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod bearer;
pub mod cache;
pub mod check;
pub mod claims;
pub mod config;
pub mod flights;
pub mod flow;
/// Entry points of the fuzz targets (`fuzz/`) and their corpus replay; not an API.
#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod headers;
pub mod hosts;
pub mod metrics;

#[cfg(all(target_arch = "wasm32", target_os = "wasi"))]
mod host;

/// Errors of the filter's pure logic.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    /// The plugin configuration is unusable; names the key and the problem.
    #[error("plugin config: `{key}`: {problem}")]
    Config {
        /// The key, dotted for nested ones (`cache.slots`).
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The companion's reply is not a CheckResponse.
    #[error("companion reply is not a CheckResponse: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The companion's CheckResponse has no status: no verdict, so not an allow.
    #[error("companion reply has no status")]
    NoStatus,
}
