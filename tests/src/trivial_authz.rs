//! The ext_authz floor of `make bench`: a gRPC Check server that allows every request
//! and overwrites `authorization` with one fixed value, doing nothing else. Envoy →
//! this server measures what ext_authz itself costs, so the companion's ratio to it is
//! the cost of the companion's own work.

use std::net::SocketAddr;

use tokensmith_proto::{
    envoy::{
        config::core::v3::{
            HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
        },
        service::auth::v3::{
            CheckRequest, CheckResponse, OkHttpResponse,
            authorization_server::{Authorization, AuthorizationServer},
            check_response::HttpResponse,
        },
    },
    google::rpc::Status,
};

use crate::Error;

/// A running always-OK ext_authz server on 127.0.0.1; stops when dropped.
pub struct TrivialAuthz {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TrivialAuthz {
    /// Binds 127.0.0.1 on a free port and serves until dropped.
    pub async fn start() -> Result<Self, Error> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| Error::Process(format!("bind trivial ext_authz: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Process(e.to_string()))?;
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                // As the companion does: Nagle would add delayed-ACK stalls to the floor.
                .tcp_nodelay(true)
                .add_service(AuthorizationServer::new(AllowAll))
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "trivial ext_authz server stopped");
            }
        });
        Ok(Self { addr, task })
    }
}

impl Drop for TrivialAuthz {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct AllowAll;

#[tonic::async_trait]
impl Authorization for AllowAll {
    async fn check(
        &self,
        _: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(Status {
                code: 0,
                message: String::new(),
                details: Vec::new(),
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: "authorization".to_owned(),
                        value: "Bearer trivial".to_owned(),
                        raw_value: Vec::new(),
                    }),
                    append: None,
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    keep_empty_value: false,
                }],
                headers_to_remove: Vec::new(),
            })),
            dynamic_metadata: None,
        }))
    }
}
