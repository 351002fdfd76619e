//! Certificates for TLS tests: a server CA and a client CA (rcgen), server certificates
//! written to files the companion reads, and gRPC clients with or without a client
//! certificate.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, sync::Mutex};

use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::Error;

fn tls_error(e: impl std::fmt::Display) -> Error {
    Error::Process(format!("test PKI: {e}"))
}

/// Paths of the companion's TLS files.
pub struct ServerFiles {
    /// `--tls-cert`
    pub cert: PathBuf,
    /// `--tls-key`
    pub key: PathBuf,
    /// `--client-ca`
    pub client_ca: PathBuf,
}

/// Two CAs and the files the companion reads; rewritten in place to rotate.
pub struct TestPki {
    dir: tempfile::TempDir,
    server_ca: (CertificateParams, KeyPair, String),
    client_ca: (CertificateParams, KeyPair, String),
    client: (String, String),
    served: Mutex<Vec<(String, Vec<u8>)>>,
}

fn ca(name: &str) -> Result<(CertificateParams, KeyPair, String), Error> {
    let key = KeyPair::generate().map_err(tls_error)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.clone().self_signed(&key).map_err(tls_error)?;
    Ok((params, key, cert.pem()))
}

impl TestPki {
    /// Fresh CAs (ECDSA: fast) and a client certificate from the client CA.
    pub fn new() -> Result<Self, Error> {
        let dir = tempfile::tempdir().map_err(tls_error)?;
        let server_ca = ca("tokensmith test server CA")?;
        let client_ca = ca("tokensmith test client CA")?;
        let client_key = KeyPair::generate().map_err(tls_error)?;
        let mut params =
            CertificateParams::new(vec!["istio-ingressgateway".to_owned()]).map_err(tls_error)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "gateway");
        let issuer = Issuer::from_params(&client_ca.0, &client_ca.1);
        let client_cert = params.signed_by(&client_key, &issuer).map_err(tls_error)?;
        std::fs::write(dir.path().join("client-ca.pem"), &client_ca.2).map_err(tls_error)?;
        Ok(Self {
            dir,
            server_ca,
            client_ca,
            client: (client_cert.pem(), client_key.serialize_pem()),
            served: Mutex::new(Vec::new()),
        })
    }

    /// (Re)writes the server certificate and key, labelled `name`.
    pub fn write_server(&self, name: &str) -> Result<ServerFiles, Error> {
        let key = KeyPair::generate().map_err(tls_error)?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).map_err(tls_error)?;
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = Issuer::from_params(&self.server_ca.0, &self.server_ca.1);
        let cert = params.signed_by(&key, &issuer).map_err(tls_error)?;
        if let Ok(mut served) = self.served.lock() {
            served.push((name.to_owned(), cert.der().to_vec()));
        }
        let files = ServerFiles {
            cert: self.dir.path().join("tls.crt"),
            key: self.dir.path().join("tls.key"),
            client_ca: self.dir.path().join("client-ca.pem"),
        };
        // Key first: a reader that sees the new certificate also finds its key.
        std::fs::write(&files.key, key.serialize_pem()).map_err(tls_error)?;
        std::fs::write(&files.cert, cert.pem()).map_err(tls_error)?;
        Ok(files)
    }

    /// A gRPC channel over TLS, with the client certificate when `with_cert`, proven by
    /// one health check (with TLS 1.3 a missing client certificate shows only then).
    pub async fn client(&self, addr: SocketAddr, with_cert: bool) -> Result<Channel, Error> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.server_ca.2))
            .domain_name("localhost");
        if with_cert {
            tls = tls.identity(Identity::from_pem(&self.client.0, &self.client.1));
        }
        let channel = Channel::from_shared(format!("https://{addr}"))
            .map_err(tls_error)?
            .tls_config(tls)
            .map_err(tls_error)?
            .connect()
            .await
            .map_err(tls_error)?;
        tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map_err(tls_error)?;
        Ok(channel)
    }

    /// The label of the certificate the server at `addr` presents now.
    pub async fn served_name(&self, addr: SocketAddr) -> Result<String, Error> {
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls::pki_types::pem::PemObject::from_pem_slice(self.server_ca.2.as_bytes())
            .map_err(tls_error)?;
        roots.add(ca).map_err(tls_error)?;
        let client_chain: Vec<CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(self.client.0.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(tls_error)?;
        let client_key =
            rustls::pki_types::pem::PemObject::from_pem_slice(self.client.1.as_bytes())
                .map_err(tls_error)?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_root_certificates(roots)
        .with_client_auth_cert(client_chain, client_key)
        .map_err(tls_error)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(tls_error)?;
        let name = ServerName::try_from("localhost").map_err(tls_error)?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(tls_error)?;
        let der = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .ok_or_else(|| tls_error("no server certificate"))?;
        let served = self.served.lock().map_err(tls_error)?;
        served
            .iter()
            .find(|(_, d)| *d == der)
            .map(|(n, _)| n.clone())
            .ok_or_else(|| tls_error("the server presents a certificate this PKI never wrote"))
    }

    /// PEM of the CA that signs the server certificates.
    pub fn server_ca_pem(&self) -> &str {
        &self.server_ca.2
    }

    /// The client CA's PEM.
    pub fn client_ca_pem(&self) -> &str {
        &self.client_ca.2
    }
}
