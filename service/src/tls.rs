//! TLS for the gRPC listener (rustls, ring): server certificate, optional client-CA for
//! mTLS, and files re-read when they change so cert-manager rotation needs no restart
//! and never drops the listener. New connections get the newest good configuration.

use std::{
    io,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{info, warn};

use crate::Error;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Where the TLS material lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to (mTLS); `None`: no client auth.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// Builds a server configuration from the files (HTTP/2 only, as gRPC needs).
    pub fn load(&self) -> Result<Arc<ServerConfig>, Error> {
        let bad = |flag: &'static str, problem: String| Error::Config { flag, problem };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.cert)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| bad("--tls-cert", format!("{}: {e}", self.cert.display())))?;
        if certs.is_empty() {
            return Err(bad(
                "--tls-cert",
                format!("{}: no certificate", self.cert.display()),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| bad("--tls-key", format!("{}: {e}", self.key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("--tls-cert", e.to_string()))?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                let cas = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| bad("--client-ca", format!("{}: {e}", path.display())))?;
                for ca in cas {
                    roots
                        .add(ca)
                        .map_err(|e| bad("--client-ca", format!("{}: {e}", path.display())))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| bad("--client-ca", format!("{}: {e}", path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| bad("--tls-key", format!("does not match --tls-cert: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The files' current contents, to notice a change (kubelet swaps symlinks, so
    /// modification times of the paths alone are not reliable).
    fn fingerprint(&self) -> Vec<Vec<u8>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|p| std::fs::read(p).unwrap_or_default())
            .collect()
    }
}

/// A TLS server configuration that follows its files.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl ReloadingTls {
    /// Loads the files once; fails on bad ones (at start-up, a bad file is fatal).
    pub fn new(files: TlsFiles) -> Result<Arc<Self>, Error> {
        let config = files.load()?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(config),
        }))
    }

    fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the files whenever they change; a bad new file keeps the old config.
    pub async fn watch(self: Arc<Self>) {
        let mut seen = self.files.fingerprint();
        loop {
            tokio::time::sleep(RELOAD_INTERVAL).await;
            let now = self.files.fingerprint();
            if now == seen {
                continue;
            }
            seen = now;
            match self.files.load() {
                Ok(config) => {
                    if let Ok(mut c) = self.current.write() {
                        *c = config;
                    }
                    info!("TLS certificate reloaded");
                }
                Err(e) => {
                    warn!(error = %e, "TLS files changed but are not usable; keeping the previous ones")
                }
            }
        }
    }
}

/// A TLS connection tonic can serve.
pub struct TlsConnection(TlsStream<TcpStream>);

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Finishes the TLS handshake of an accepted connection with the newest configuration,
/// within [`HANDSHAKE_TIMEOUT`].
pub async fn accept(tls: Arc<ReloadingTls>, tcp: TcpStream) -> io::Result<TlsConnection> {
    let acceptor = TlsAcceptor::from(tls.current());
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Ok(TlsConnection(stream)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "TLS handshake timed out",
        )),
    }
}
