//! Refusals: why a request is denied, the one table of what each reason shows the client
//! (status, gRPC code, body, challenge), and what a failed Kubernetes call means. Every
//! stage returns these; only `authz::decision` turns them into a CheckResponse.

use std::fmt;

use crate::{error_chain, identity::IdentityError};

use tokensmith_proto::envoy::r#type::v3::StatusCode;

/// Which of the two clusters a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Where workloads and their tokens live; we call TokenReview there.
    Workload,
    /// Where the exchanged tokens come from; we call TokenRequest there.
    Management,
}

impl Side {
    /// `workload` or `management`, as logged.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Workload => "workload",
            Side::Management => "management",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal and, for the log only, what the cluster said about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Why: decides the status the client sees.
    pub reason: DenyReason,
    /// Details for operators (an API status message, an error chain). Never a token.
    pub detail: Option<String>,
}

impl DenyReason {
    /// This refusal, with what operators should read about it in the log.
    pub fn because(self, detail: impl Into<String>) -> Denial {
        Denial {
            reason: self,
            detail: Some(detail.into()),
        }
    }
}

impl From<IdentityError> for DenyReason {
    fn from(error: IdentityError) -> Self {
        match error {
            IdentityError::NotServiceAccount => DenyReason::NotServiceAccount,
            IdentityError::InvalidName => DenyReason::InvalidServiceAccountName,
        }
    }
}

impl From<DenyReason> for Denial {
    fn from(reason: DenyReason) -> Self {
        Denial {
            reason,
            detail: None,
        }
    }
}

/// Why a request was refused. `Check` answers each with an OK RPC carrying a
/// `DeniedHttpResponse` and a matching non-OK `status`, so Envoy treats it as a denial
/// (never as a transport error subject to fail-open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// No `authorization` header.
    MissingToken,
    /// An `authorization` header that is not `Bearer <token>`.
    MalformedToken,
    /// The workload cluster does not accept the token (bad, expired, foreign, revoked).
    InvalidToken,
    /// The token's issuer is none of the configured workload clusters'.
    UnknownIssuer,
    /// The token is valid but belongs to a user that is not a service account.
    NotServiceAccount,
    /// A service-account username whose namespace or name is not a valid name.
    InvalidServiceAccountName,
    /// No service account of that namespace/name in the management cluster.
    UnknownServiceAccount,
    /// The management cluster refused to mint a token for that service account.
    ExchangeForbidden,
    /// The workload cluster may not map into that namespace (its namespace policy).
    NamespaceNotAllowed,
    /// `--require-sa-label`: the management service account does not carry the label.
    NotConsented,
    /// A cluster did not answer within the Check's budget.
    DeadlineExceeded(Side),
    /// A cluster is unreachable, overloaded, failing or refuses our own credentials.
    Unavailable(Side),
    /// The identity exceeded `--rate-limit`; retry after this many seconds.
    Throttled(u32),
}

/// gRPC codes used in `CheckResponse.status` (google.rpc.Code).
pub(crate) mod grpc_code {
    pub const OK: i32 = 0;
    pub const PERMISSION_DENIED: i32 = 7;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

impl DenyReason {
    /// The HTTP status the client sees and the gRPC code Envoy reads.
    pub fn status(self) -> (StatusCode, i32) {
        use DenyReason::*;
        match self {
            MissingToken | MalformedToken | InvalidToken | UnknownIssuer => {
                (StatusCode::Unauthorized, grpc_code::UNAUTHENTICATED)
            }
            NotServiceAccount
            | InvalidServiceAccountName
            | UnknownServiceAccount
            | ExchangeForbidden
            | NamespaceNotAllowed
            | NotConsented => (StatusCode::Forbidden, grpc_code::PERMISSION_DENIED),
            DeadlineExceeded(_) | Unavailable(_) => {
                (StatusCode::ServiceUnavailable, grpc_code::UNAVAILABLE)
            }
            Throttled(_) => (StatusCode::TooManyRequests, grpc_code::RESOURCE_EXHAUSTED),
        }
    }

    /// Whether this is a failure to reach a dependency (503-class) rather than a verdict
    /// on the request: such answers are never cached.
    pub fn is_dependency_failure(self) -> bool {
        matches!(
            self,
            DenyReason::DeadlineExceeded(_) | DenyReason::Unavailable(_)
        )
    }

    /// The reason as logged (`reason` field): stable, snake_case.
    pub fn as_str(self) -> &'static str {
        use DenyReason::*;
        match self {
            MissingToken => "missing_token",
            MalformedToken => "malformed_token",
            InvalidToken => "invalid_token",
            UnknownIssuer => "unknown_issuer",
            NotServiceAccount => "not_service_account",
            InvalidServiceAccountName => "invalid_service_account_name",
            UnknownServiceAccount => "unknown_service_account",
            ExchangeForbidden => "exchange_forbidden",
            NamespaceNotAllowed => "namespace_not_allowed",
            NotConsented => "not_consented",
            DeadlineExceeded(_) => "deadline_exceeded",
            Unavailable(_) => "unavailable",
            Throttled(_) => "throttled",
        }
    }

    /// The short body the client reads. Never holds a token.
    pub fn body(self) -> &'static str {
        use DenyReason::*;
        match self {
            MissingToken => "missing bearer token",
            MalformedToken => "malformed bearer token",
            InvalidToken => "invalid or expired token",
            UnknownIssuer => "token issuer is not trusted",
            NotServiceAccount => "token does not belong to a service account",
            InvalidServiceAccountName => "service account name is not valid",
            UnknownServiceAccount => "service account not found in the management cluster",
            ExchangeForbidden => "token exchange forbidden",
            NamespaceNotAllowed => "namespace not allowed for this workload cluster",
            NotConsented => "service account not enabled for exchange",
            DeadlineExceeded(_) => "identity service timed out",
            Unavailable(_) => "identity service unavailable",
            Throttled(_) => "too many requests",
        }
    }

    /// The cluster involved, for reasons that are about one.
    pub fn cluster(self) -> Option<Side> {
        match self {
            DenyReason::DeadlineExceeded(c) | DenyReason::Unavailable(c) => Some(c),
            _ => None,
        }
    }

    /// `www-authenticate` for 401s (RFC 6750 §3): no error code when no token was sent.
    pub fn challenge(self) -> Option<&'static str> {
        match self {
            DenyReason::MissingToken => Some("Bearer"),
            DenyReason::MalformedToken | DenyReason::InvalidToken | DenyReason::UnknownIssuer => {
                Some("Bearer error=\"invalid_token\"")
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a failed Kubernetes call means for the request. `not_found` and `forbidden` are
/// the reasons a 404 or 403 stands for on this call; every other failure is the
/// cluster's (or our own credentials') problem, so the client gets a 503.
pub fn classify(
    error: &kube::Error,
    cluster: Side,
    not_found: Option<DenyReason>,
    forbidden: Option<DenyReason>,
) -> DenyReason {
    match error {
        kube::Error::Api(status) => match status.code {
            404 => not_found.unwrap_or(DenyReason::Unavailable(cluster)),
            403 => forbidden.unwrap_or(DenyReason::Unavailable(cluster)),
            _ => DenyReason::Unavailable(cluster),
        },
        other if timed_out(other) => DenyReason::DeadlineExceeded(cluster),
        _ => DenyReason::Unavailable(cluster),
    }
}

/// Whether a transport error is the client's own timeout firing (the backstop timeouts
/// set in [`client`]).
fn timed_out(error: &kube::Error) -> bool {
    error_chain::causes(error).any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
    })
}

/// A log-safe description of a failed call: the API's status message, or the error
/// chain of a transport failure. Neither carries request headers or bodies.
pub fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} {}: {}", status.code, status.reason, status.message)
        }
        other => error_chain::describe(other),
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Status::failure("m", "R").with_code(code).boxed())
    }

    #[test]
    fn api_status_codes_map_to_reasons() {
        let not_found = Some(DenyReason::UnknownServiceAccount);
        let forbidden = Some(DenyReason::ExchangeForbidden);
        let m = Side::Management;
        let table = [
            (404, DenyReason::UnknownServiceAccount),
            (403, DenyReason::ExchangeForbidden),
            (401, DenyReason::Unavailable(m)),
            (422, DenyReason::Unavailable(m)),
            (429, DenyReason::Unavailable(m)),
            (500, DenyReason::Unavailable(m)),
            (503, DenyReason::Unavailable(m)),
            (504, DenyReason::Unavailable(m)),
        ];
        for (code, want) in table {
            assert_eq!(
                classify(&api(code), m, not_found, forbidden),
                want,
                "{code}"
            );
        }
    }

    #[test]
    fn without_a_meaning_for_404_or_403_they_are_unavailability() {
        let w = Side::Workload;
        assert_eq!(
            classify(&api(404), w, None, None),
            DenyReason::Unavailable(w)
        );
        assert_eq!(
            classify(&api(403), w, None, None),
            DenyReason::Unavailable(w)
        );
    }

    #[test]
    fn transport_errors_are_unavailability() {
        let error = kube::Error::Service("connection refused".into());
        assert_eq!(
            classify(&error, Side::Workload, None, None),
            DenyReason::Unavailable(Side::Workload)
        );
        assert!(describe(&error).contains("connection refused"));
    }

    #[test]
    fn the_clients_own_timeout_is_a_deadline() {
        let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");
        let error = kube::Error::Service(Box::new(timeout));
        assert_eq!(
            classify(&error, Side::Management, None, None),
            DenyReason::DeadlineExceeded(Side::Management)
        );
    }
}
