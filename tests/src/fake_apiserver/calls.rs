//! The call log: one entry per request the fake API server answered, for assertions such as
//! "exactly one TokenRequest for app-prod/eso-sa". Tokens are never recorded.

use std::sync::Mutex;

use http::Method;

/// Which API the request was for, classified by path alone (a wrong method still counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /apis/authentication.k8s.io/v1/tokenreviews`
    TokenReview,
    /// `POST /api/v1/namespaces/{ns}/serviceaccounts/{name}/token`
    TokenRequest,
    /// `POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews`
    SelfSubjectAccessReview,
    /// `GET /api/v1/namespaces/{ns}/serviceaccounts/{name}`
    GetServiceAccount,
    /// `GET /api/v1/namespaces/{ns}`
    GetNamespace,
    /// `GET /api/v1/namespaces/{ns}/secrets/{name}`
    GetSecret,
    /// `GET /api/v1/serviceaccounts` (cluster scope, optional `labelSelector`)
    ListServiceAccounts,
    /// `GET /api/v1/serviceaccounts?watch=true`: a watch, counted when it opens
    WatchServiceAccounts,
    /// `GET /version`
    Version,
    /// `GET /healthz`
    Healthz,
    /// `GET /readyz`
    Readyz,
    /// `GET /livez`
    Livez,
    /// `/api`, `/api/v1`, `/apis`, `/apis/authentication.k8s.io[/v1]`: what kubectl reads first.
    Discovery,
    /// `GET /.well-known/openid-configuration`
    OpenIdConfiguration,
    /// `GET /openid/v1/jwks`
    Jwks,
    /// Anything else (answered 404).
    Other,
}

impl Endpoint {
    /// Classifies a request path (without query string).
    pub fn classify(path: &str) -> Endpoint {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match segments.as_slice() {
            ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => Endpoint::TokenReview,
            [
                "apis",
                "authorization.k8s.io",
                "v1",
                "selfsubjectaccessreviews",
            ] => Endpoint::SelfSubjectAccessReview,
            ["api", "v1", "namespaces", _, "serviceaccounts", _, "token"] => Endpoint::TokenRequest,
            ["api", "v1", "namespaces", _, "serviceaccounts", _] => Endpoint::GetServiceAccount,
            ["api", "v1", "namespaces", _, "secrets", _] => Endpoint::GetSecret,
            ["api", "v1", "namespaces", _] => Endpoint::GetNamespace,
            ["api", "v1", "serviceaccounts"] => Endpoint::ListServiceAccounts,
            ["version"] => Endpoint::Version,
            ["healthz"] => Endpoint::Healthz,
            ["readyz"] => Endpoint::Readyz,
            ["livez"] => Endpoint::Livez,
            ["api"] | ["api", "v1"] | ["apis"] => Endpoint::Discovery,
            ["apis", "authentication.k8s.io"] | ["apis", "authentication.k8s.io", "v1"] => {
                Endpoint::Discovery
            }
            [".well-known", "openid-configuration"] => Endpoint::OpenIdConfiguration,
            ["openid", "v1", "jwks"] => Endpoint::Jwks,
            _ => Endpoint::Other,
        }
    }

    /// Whether the real API server serves this endpoint without credentials by default
    /// (`system:public-info-viewer` is bound to `system:unauthenticated`).
    pub fn is_public(self) -> bool {
        matches!(
            self,
            Endpoint::Version | Endpoint::Healthz | Endpoint::Readyz | Endpoint::Livez
        )
    }

    /// Issuer discovery (`system:service-account-issuer-discovery`): any authenticated
    /// caller here, anonymous ones only once bound.
    pub fn is_issuer_discovery(self) -> bool {
        matches!(self, Endpoint::OpenIdConfiguration | Endpoint::Jwks)
    }
}

/// The parsed `spec` of a TokenRequest, as the server understood it (JSON or protobuf body).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenRequestSpec {
    /// `spec.audiences` as sent (empty when absent).
    pub audiences: Vec<String>,
    /// `spec.expirationSeconds` as sent (`None` when absent).
    pub expiration_seconds: Option<i64>,
    /// `spec.boundObjectRef` as `(kind, name)`, when sent.
    pub bound_object: Option<(String, String)>,
}

/// The parsed `spec` of a TokenReview, without the token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenReviewSpec {
    /// `spec.audiences` as sent (empty when absent).
    pub audiences: Vec<String>,
}

/// One answered request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// What the path asked for.
    pub endpoint: Endpoint,
    /// HTTP method, upper case.
    pub method: String,
    /// Request path without query string.
    pub path: String,
    /// The status code the server answered with (after faults).
    pub status: u16,
    /// The authenticated caller's user name; `None` when anonymous or not authenticated.
    pub caller: Option<String>,
    /// For TokenRequests whose body parsed: the spec.
    pub token_request: Option<TokenRequestSpec>,
    /// For TokenReviews whose body parsed: the spec without the token.
    pub token_review: Option<TokenReviewSpec>,
}

impl Call {
    pub(crate) fn new(endpoint: Endpoint, method: &Method, path: &str) -> Call {
        Call {
            endpoint,
            method: method.as_str().to_owned(),
            path: path.to_owned(),
            status: 0,
            caller: None,
            token_request: None,
            token_review: None,
        }
    }
}

/// Append-only, shared between the server task and the test.
#[derive(Debug, Default)]
pub(crate) struct CallLog {
    calls: Mutex<Vec<Call>>,
    /// Requests counted as they arrive, before any fault or answer: a test can tell a
    /// request in flight from one answered.
    arrivals: Mutex<Vec<Endpoint>>,
}

impl CallLog {
    pub(crate) fn arrive(&self, endpoint: Endpoint) {
        lock(&self.arrivals).push(endpoint);
    }

    pub(crate) fn arrived(&self, endpoint: Endpoint) -> usize {
        lock(&self.arrivals)
            .iter()
            .filter(|e| **e == endpoint)
            .count()
    }

    pub(crate) fn push(&self, call: Call) {
        lock(&self.calls).push(call);
    }

    pub(crate) fn snapshot(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    pub(crate) fn count(&self, endpoint: Endpoint) -> usize {
        lock(&self.calls)
            .iter()
            .filter(|call| call.endpoint == endpoint)
            .count()
    }

    pub(crate) fn clear(&self) {
        lock(&self.calls).clear();
        lock(&self.arrivals).clear();
    }
}

/// Locks a mutex, recovering from poisoning: a panicking test must not wedge the server.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::Endpoint;

    #[test]
    fn paths_classify_like_the_real_api() {
        let table = [
            (
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Endpoint::TokenReview,
            ),
            (
                "/api/v1/namespaces/app/serviceaccounts/sa/token",
                Endpoint::TokenRequest,
            ),
            (
                "/api/v1/namespaces/app/serviceaccounts/sa",
                Endpoint::GetServiceAccount,
            ),
            ("/api/v1/namespaces/app", Endpoint::GetNamespace),
            ("/version", Endpoint::Version),
            ("/livez", Endpoint::Livez),
            ("/api", Endpoint::Discovery),
            ("/apis/authentication.k8s.io/v1", Endpoint::Discovery),
            (
                "/.well-known/openid-configuration",
                Endpoint::OpenIdConfiguration,
            ),
            ("/openid/v1/jwks", Endpoint::Jwks),
            ("/api/v1/namespaces/app/pods", Endpoint::Other),
        ];
        for (path, endpoint) in table {
            assert_eq!(Endpoint::classify(path), endpoint, "{path}");
        }
    }
}
