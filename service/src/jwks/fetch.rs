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

use super::keys::KeySet;

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

/// Reads PEM certificates into a root store; at least one is required.
pub fn roots(pem: &[u8]) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
        store
            .add(cert)
            .map_err(|e| format!("unusable certificate: {e}"))?;
    }
    if store.is_empty() {
        return Err("no PEM certificate in it".to_owned());
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
    pub fn new(issuer: &str, endpoint: Endpoint, ca_pem: Option<&[u8]>) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = match ca_pem {
            Some(pem) => {
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("TLS configuration: {e}"))?
                    .with_root_certificates(roots(pem)?)
                    .with_no_client_auth();
                HttpsConnectorBuilder::new().with_tls_config(config)
            }
            None => HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(provider)
                .map_err(|e| format!("no system CA certificates ({e}); set ca_file"))?,
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
    pub async fn fetch(&self) -> Result<KeySet, String> {
        let uri = self.jwks_uri().await?;
        let document = self.get_json(&uri).await.inspect_err(|_| {
            // The discovered address may be what changed: ask again next time.
            *self
                .discovered
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        })?;
        KeySet::from_json(&document).map_err(|e| format!("{uri}: {e}"))
    }

    async fn jwks_uri(&self) -> Result<String, String> {
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
                // OIDC Discovery §4.3: the document must be about the issuer we asked for.
                if document.get("issuer").and_then(Value::as_str) != Some(self.issuer.as_str()) {
                    return Err(format!("{url}: issuer does not match {:?}", self.issuer));
                }
                let uri = document
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .filter(|u| is_https_url(u))
                    .ok_or_else(|| format!("{url}: no https jwks_uri"))?
                    .to_owned();
                *self
                    .discovered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(uri.clone());
                Ok(uri)
            }
        }
    }

    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let request = http::Request::get(url)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{url}: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| error_chain(&e))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("HTTP {}", status.as_u16()));
            }
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the body: {e}"))?
                .to_bytes();
            serde_json::from_slice::<Value>(&body).map_err(|_| "body is not JSON".to_owned())
        };
        match tokio::time::timeout(FETCH_TIMEOUT, exchange).await {
            Ok(result) => result.map_err(|e| format!("{url}: {e}")),
            Err(_) => Err(format!("{url}: no answer within {FETCH_TIMEOUT:?}")),
        }
    }
}

/// An error with its causes, `a: b: c` (hyper's own message alone says little).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
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
        assert_eq!(roots(b"hello").unwrap_err(), "no PEM certificate in it");
    }
}
