//! The gRPC listener's bounds: at most `max_connections` connections at once (beyond
//! that the companion stops accepting and the kernel's backlog holds the rest), at most
//! `max_handshakes` handshakes in flight (TLS ones bounded in time), `TCP_NODELAY` on
//! every connection. Streams per connection and keepalive are set on the server.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};
use tonic::transport::server::Connected;
use tracing::{debug, warn};

/// How many connections and handshakes at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Handshakes (TLS) in flight at once.
    pub max_handshakes: usize,
}

/// A served connection; it holds its place among `max_connections` until dropped.
pub struct Connection<S> {
    io: S,
    _permit: OwnedSemaphorePermit,
}

impl<S: Connected> Connected for Connection<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Connection<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Connection<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts on `listener` within `limits` and hands out the connections `handshake`
/// finishes (plain: at once; TLS: `tls::accept`). Handshakes run concurrently, so a slow
/// client cannot stall the accept loop, but never more than `max_handshakes` of them.
pub fn incoming<S, H, F>(
    listener: TcpListener,
    limits: Limits,
    handshake: H,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Connection<S>>>
where
    S: Send + 'static,
    H: Fn(TcpStream) -> F + Send + 'static,
    F: Future<Output = io::Result<S>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    tokio::spawn(async move {
        loop {
            // Waiting for a free place before accepting is what bounds the connections.
            let (Ok(place), Ok(turn)) = (
                connections.clone().acquire_owned().await,
                handshakes.clone().acquire_owned().await,
            ) else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            // No Nagle: small gRPC frames would otherwise wait for delayed ACKs (~40 ms).
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let done = handshake(tcp);
            tokio::spawn(async move {
                let result = done.await;
                drop(turn);
                match result {
                    Ok(io) => {
                        let connection = Connection { io, _permit: place };
                        let _ = tx.send(Ok(connection)).await;
                    }
                    Err(e) => debug!(%peer, error = %e, "handshake failed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
