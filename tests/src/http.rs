//! A minimal HTTP/1.1 client for talking to Envoy in tests: one connection per call,
//! or a reusable connection for load.

use std::{net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Bytes, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;

use crate::Error;

/// What the client received.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Response headers.
    pub headers: http::HeaderMap,
    /// Body as text.
    pub body: String,
}

impl HttpResponse {
    /// A header's value as text ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// One HTTP/1.1 connection.
pub struct Connection {
    sender: SendRequest<Empty<Bytes>>,
}

impl Connection {
    /// Connects to `addr`.
    pub async fn open(addr: SocketAddr) -> Result<Self, Error> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| Error::Http(format!("connect {addr}: {e}")))?;
        Self::over(stream, addr).await
    }

    /// Connects to `addr` from `local` (any of 127.0.0.0/8 works on loopback): a client
    /// at another address, as the proxy sees it.
    pub async fn open_from(addr: SocketAddr, local: std::net::IpAddr) -> Result<Self, Error> {
        let failed = |e: std::io::Error| Error::Http(format!("connect {addr} from {local}: {e}"));
        let socket = match local {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(failed)?;
        socket.bind(SocketAddr::new(local, 0)).map_err(failed)?;
        let stream = socket.connect(addr).await.map_err(failed)?;
        Self::over(stream, addr).await
    }

    async fn over(stream: tokio::net::TcpStream, addr: SocketAddr) -> Result<Self, Error> {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Error::Http(format!("handshake {addr}: {e}")))?;
        tokio::spawn(connection);
        Ok(Self { sender })
    }

    /// Sends a GET for `path` with `headers` and reads the whole answer (10 s limit).
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<HttpResponse, Error> {
        let raw: Vec<(&str, &[u8])> = headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
        self.get_raw(path, &raw).await
    }

    /// Like `get`, with header values as raw bytes (any byte but CR, LF and NUL). The
    /// host is `mgmt-api.example.com` unless `headers` names one.
    pub async fn get_raw(
        &mut self,
        path: &str,
        headers: &[(&str, &[u8])],
    ) -> Result<HttpResponse, Error> {
        let mut request = Request::get(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            request = request.header("host", "mgmt-api.example.com");
        }
        for (k, v) in headers {
            let value = http::HeaderValue::from_bytes(v)
                .map_err(|e| Error::Http(format!("header {k}: {e}")))?;
            request = request.header(*k, value);
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| Error::Http(e.to_string()))?;
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| Error::Http(e.to_string()))?;
            let response = self
                .sender
                .send_request(request)
                .await
                .map_err(|e| Error::Http(e.to_string()))?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Error::Http(e.to_string()))?
                .to_bytes();
            Ok(HttpResponse {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            })
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| Error::Http(format!("no answer to GET {path} within 10 s")))?
    }
}

/// Sends one GET with raw header values on a new connection.
pub async fn get_raw(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &[u8])],
) -> Result<HttpResponse, Error> {
    Connection::open(addr).await?.get_raw(path, headers).await
}

/// Sends one GET on a new connection.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, Error> {
    Connection::open(addr).await?.get(path, headers).await
}
