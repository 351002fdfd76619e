//! Fetching a key set over HTTPS: directly from `jwks_uri`, or through OIDC discovery
//! (`<issuer>/.well-known/openid-configuration`). No credentials are sent, redirects are
//! not followed, every fetch is bounded in time and size.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};
use serde_json::Value;

use super::keys::{KeyError, KeySet};
use crate::error_chain;

/// Longest a fetch (connect, TLS, request, body) may take. A check waits for an
/// on-demand fetch only until its own deadline; the fetch goes on for later checks.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest discovery document or key set we read.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Where the keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A fixed `jwks_uri`.
    Uri(String),
    /// `jwks_uri` from the issuer's discovery document.
    Discovery,
}

/// Why a fetcher could not be built or a fetch brought no key set. No credentials are
/// sent, so messages hold URLs, status codes and transport causes, never a token.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("not PEM: {source}")]
    NotPem {
        /// The PEM parser's reason.
        source: rustls::pki_types::pem::Error,
    },
    #[error("unusable certificate: {source}")]
    UnusableCertificate {
        /// rustls's reason.
        source: rustls::Error,
    },
    #[error("no PEM certificate in it")]
    NoCertificate,
    #[error("TLS configuration: {source}")]
    Tls {
        /// rustls's reason.
        source: rustls::Error,
    },
    #[error("no system CA certificates ({source}); set ca_file")]
    NoSystemRoots {
        /// Why loading them failed.
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    Request {
        url: String,
        /// Why the request could not be built.
        source: http::Error,
    },
    /// Connecting, TLS or sending failed.
    // The message walks the causes: hyper's own text alone says little.
    #[error("{url}: {}", error_chain::describe(source))]
    Transport {
        url: String,
        /// The client's error.
        source: hyper_util::client::legacy::Error,
    },
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: reading the body: {source}")]
    Body {
        url: String,
        /// The body's or the limit's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{url}: body is not JSON")]
    NotJson { url: String },
    #[error("{url}: no answer within {after:?}")]
    Timeout {
        url: String,
        /// How long we waited.
        after: Duration,
    },
    #[error("{url}: issuer does not match {issuer:?}")]
    IssuerMismatch {
        /// The discovery document's address.
        url: String,
        /// The issuer we asked about.
        issuer: String,
    },
    #[error("{url}: no https jwks_uri")]
    NoJwksUri {
        /// The discovery document's address.
        url: String,
    },
    #[error("{url}: {source}")]
    Keys {
        /// The `jwks_uri`.
        url: String,
        /// What is wrong with the set.
        source: KeyError,
    },
}

/// Reads PEM certificates into a root store; at least one is required.
pub fn roots(pem: &[u8]) -> Result<RootCertStore, FetchError> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|source| FetchError::NotPem { source })?;
        store
            .add(cert)
            .map_err(|source| FetchError::UnusableCertificate { source })?;
    }
    if store.is_empty() {
        return Err(FetchError::NoCertificate);
    }
    Ok(store)
}

/// The discovery document's address for `issuer` (OIDC Discovery 1.0 §4: a trailing
/// slash of the issuer is dropped before the suffix).
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

/// Whether `url` is an absolute `https://` URL with a host.
pub fn is_https_url(url: &str) -> bool {
    url.parse::<http::Uri>()
        .is_ok_and(|u| u.scheme_str() == Some("https") && u.host().is_some_and(|h| !h.is_empty()))
}

/// The `jwks_uri` of a discovery document fetched from `url` for `issuer`: an absolute
/// `https://` URL, from a document about that very issuer (OIDC Discovery §4.3).
pub fn discovered_jwks_uri(
    document: &Value,
    issuer: &str,
    url: &str,
) -> Result<String, FetchError> {
    if document.get("issuer").and_then(Value::as_str) != Some(issuer) {
        return Err(FetchError::IssuerMismatch {
            url: url.to_owned(),
            issuer: issuer.to_owned(),
        });
    }
    document
        .get("jwks_uri")
        .and_then(Value::as_str)
        .filter(|u| is_https_url(u))
        .map(str::to_owned)
        .ok_or_else(|| FetchError::NoJwksUri {
            url: url.to_owned(),
        })
}

/// Fetches one cluster's key set.
pub struct Fetcher {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    issuer: String,
    endpoint: Endpoint,
    /// The `jwks_uri` discovery found, kept until a fetch from it fails.
    discovered: Mutex<Option<String>>,
}

impl Fetcher {
    /// A fetcher trusting `ca_pem` alone when given, else the system's roots.
    pub fn new(
        issuer: &str,
        endpoint: Endpoint,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, FetchError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = match ca_pem {
            Some(pem) => {
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|source| FetchError::Tls { source })?
                    .with_root_certificates(roots(pem)?)
                    .with_no_client_auth();
                HttpsConnectorBuilder::new().with_tls_config(config)
            }
            None => HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(provider)
                .map_err(|source| FetchError::NoSystemRoots { source })?,
        };
        let connector = builder.https_only().enable_http1().build();
        Ok(Fetcher {
            client: Client::builder(TokioExecutor::new()).build(connector),
            issuer: issuer.to_owned(),
            endpoint,
            discovered: Mutex::new(None),
        })
    }

    /// Fetches and parses the key set. Errors are log-safe descriptions.
    pub async fn fetch(&self) -> Result<KeySet, FetchError> {
        let uri = self.jwks_uri().await?;
        let document = self.get_json(&uri).await.inspect_err(|_| {
            // The discovered address may be what changed: ask again next time.
            *self
                .discovered
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        })?;
        KeySet::from_json(&document).map_err(|source| FetchError::Keys { url: uri, source })
    }

    async fn jwks_uri(&self) -> Result<String, FetchError> {
        match &self.endpoint {
            Endpoint::Uri(uri) => Ok(uri.clone()),
            Endpoint::Discovery => {
                let known = self
                    .discovered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                if let Some(uri) = known {
                    return Ok(uri);
                }
                let url = discovery_url(&self.issuer);
                let document = self.get_json(&url).await?;
                let uri = discovered_jwks_uri(&document, &self.issuer, &url)?;
                *self
                    .discovered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(uri.clone());
                Ok(uri)
            }
        }
    }

    async fn get_json(&self, url: &str) -> Result<Value, FetchError> {
        let at = || url.to_owned();
        let request = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|source| FetchError::Request { url: at(), source })?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|source| FetchError::Transport { url: at(), source })?;
            let status = response.status();
            if !status.is_success() {
                return Err(FetchError::Http {
                    url: at(),
                    status: status.as_u16(),
                });
            }
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|source| FetchError::Body { url: at(), source })?
                .to_bytes();
            serde_json::from_slice::<Value>(&body).map_err(|_| FetchError::NotJson { url: at() })
        };
        tokio::time::timeout(FETCH_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(FetchError::Timeout {
                    url: at(),
                    after: FETCH_TIMEOUT,
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_url_drops_a_trailing_slash() {
        assert_eq!(
            discovery_url("https://issuer.example/"),
            "https://issuer.example/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://issuer.example/a"),
            "https://issuer.example/a/.well-known/openid-configuration"
        );
    }

    #[test]
    fn only_https_urls_with_a_host_pass() {
        assert!(is_https_url("https://127.0.0.1:6443/openid/v1/jwks"));
        assert!(!is_https_url("http://issuer.example/keys"));
        assert!(!is_https_url("https:///keys"));
        assert!(!is_https_url("/openid/v1/jwks"));
        assert!(!is_https_url("kubernetes/serviceaccount"));
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        assert_eq!(
            roots(b"hello").unwrap_err().to_string(),
            "no PEM certificate in it"
        );
    }
}
