//! The demo greet service (`tokensmith serve`) and its client (`tokensmith greet`).

use std::net::SocketAddr;

use tokensmith_proto::tokensmith::greet::v1::{
    HelloReply, HelloRequest,
    greeter_client::GreeterClient,
    greeter_server::{Greeter, GreeterServer},
};
use tonic::{Request, Response, Status};

use crate::Error;

/// Answers `Hello, <name>!`.
#[derive(Debug, Default)]
pub struct GreetService;

#[tonic::async_trait]
impl Greeter for GreetService {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let name = request.into_inner().name;
        if name.trim().is_empty() {
            return Err(Status::invalid_argument("name must not be empty"));
        }
        Ok(Response::new(HelloReply {
            message: format!("Hello, {name}!"),
        }))
    }
}

/// Serves the greet service on `addr` until SIGINT/SIGTERM.
pub async fn serve(addr: SocketAddr) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let signal = crate::server::shutdown_signal();
    tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "greet service listening");
    tonic::transport::Server::builder()
        .add_service(GreeterServer::new(GreetService))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            signal,
        )
        .await?;
    Ok(())
}

/// Calls the greet service at `server` and returns its message.
pub async fn greet(server: &str, name: &str) -> Result<String, Error> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(server.to_owned()).map_err(|e| Error::Config {
            flag: "--server",
            problem: e.to_string(),
        })?;
    let mut client = GreeterClient::new(endpoint.connect().await?);
    let reply = client
        .say_hello(HelloRequest {
            name: name.to_owned(),
        })
        .await
        .map_err(Error::Greet)?;
    Ok(reply.into_inner().message)
}
