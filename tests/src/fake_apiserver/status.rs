//! `meta/v1 Status` objects, the body of every API error, built field for field as the real
//! API server writes them (same keys, same order, same messages).

use serde::Serialize;

/// A Kubernetes `Status` failure body.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: Empty,
    status: &'static str,
    /// Human-readable text, e.g. `serviceaccounts "x" not found`.
    pub message: String,
    /// Machine-readable cause, e.g. `NotFound`; empty for codes without one.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details>,
    /// The HTTP status code, repeated in the body.
    pub code: u16,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
struct Empty {}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
struct Details {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    causes: Vec<Cause>,
    #[serde(rename = "retryAfterSeconds", skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u32>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
struct Cause {
    #[serde(skip_serializing_if = "str::is_empty")]
    reason: &'static str,
    message: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    field: &'static str,
}

/// Seconds a client is told to wait in a 429's `Retry-After` header and `retryAfterSeconds`.
pub const RETRY_AFTER_SECONDS: u32 = 1;

impl Status {
    fn failure(
        code: u16,
        reason: &'static str,
        message: String,
        details: Option<Details>,
    ) -> Status {
        Status {
            kind: "Status",
            api_version: "v1",
            metadata: Empty {},
            status: "Failure",
            message,
            reason,
            details,
            code,
        }
    }

    /// 401 for a missing, unknown or invalid bearer token.
    pub fn unauthorized() -> Status {
        Status::failure(401, "Unauthorized", "Unauthorized".to_owned(), None)
    }

    /// 403 for a cluster-scoped resource, e.g. `tokenreviews.authentication.k8s.io`.
    pub fn forbidden_cluster(
        user: &str,
        verb: &str,
        resource: &'static str,
        group: &'static str,
    ) -> Status {
        let qualified = if group.is_empty() {
            resource.to_owned()
        } else {
            format!("{resource}.{group}")
        };
        Status::failure(
            403,
            "Forbidden",
            format!(
                "{qualified} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{group}\" at the cluster scope"
            ),
            Some(Details {
                group: Some(group).filter(|g| !g.is_empty()),
                kind: Some(resource),
                ..Details::default()
            }),
        )
    }

    /// 403 for a non-resource URL such as `/openid/v1/jwks`.
    pub fn forbidden_path(user: &str, verb: &str, path: &str) -> Status {
        Status::failure(
            403,
            "Forbidden",
            format!("forbidden: User \"{user}\" cannot {verb} path \"{path}\""),
            Some(Details::default()),
        )
    }

    /// 403 for a named object, e.g. `namespaces "app"` or `serviceaccounts "eso-sa"` (with an
    /// optional subresource such as `token`). `namespace` is `None` for cluster-scoped objects.
    pub fn forbidden_named(
        user: &str,
        verb: &str,
        resource: &'static str,
        subresource: Option<&str>,
        name: &str,
        namespace: Option<&str>,
    ) -> Status {
        let full = match subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.to_owned(),
        };
        let scope = match namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        Status::failure(
            403,
            "Forbidden",
            format!(
                "{resource} \"{name}\" is forbidden: User \"{user}\" cannot {verb} resource \"{full}\" in API group \"\" {scope}"
            ),
            Some(Details {
                name: Some(name.to_owned()),
                kind: Some(resource),
                ..Details::default()
            }),
        )
    }

    /// 404 for a named object, e.g. `serviceaccounts "x" not found`.
    pub fn not_found(resource: &'static str, name: &str) -> Status {
        Status::failure(
            404,
            "NotFound",
            format!("{resource} \"{name}\" not found"),
            Some(Details {
                name: Some(name.to_owned()),
                kind: Some(resource),
                ..Details::default()
            }),
        )
    }

    /// 404 for a path the server does not serve.
    pub fn no_route() -> Status {
        Status::failure(
            404,
            "NotFound",
            "the server could not find the requested resource".to_owned(),
            Some(Details::default()),
        )
    }

    /// 405 for a known path with the wrong method.
    pub fn method_not_allowed(method: &str) -> Status {
        Status::failure(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
            Some(Details::default()),
        )
    }

    /// 400 for a body the server could not decode.
    pub fn bad_request(message: String) -> Status {
        Status::failure(400, "BadRequest", message, None)
    }

    /// 413 for a body above the server's limit.
    pub fn too_large() -> Status {
        Status::failure(
            413,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728".to_owned(),
            None,
        )
    }

    /// 415 for a content type the endpoint does not accept.
    pub fn unsupported_media_type(content_type: &str) -> Status {
        Status::failure(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (got {content_type})"
            ),
            None,
        )
    }

    /// 422 for a TokenRequest whose `spec.expirationSeconds` is out of range. kube-apiserver
    /// names no object here (`TokenRequest.authentication.k8s.io "" is invalid`).
    pub fn invalid_expiration(seconds: i64, problem: &str) -> Status {
        let detail = format!("Invalid value: {seconds}: {problem}");
        Status::failure(
            422,
            "Invalid",
            format!(
                "TokenRequest.authentication.k8s.io \"\" is invalid: spec.expirationSeconds: {detail}"
            ),
            Some(Details {
                group: Some("authentication.k8s.io"),
                kind: Some("TokenRequest"),
                causes: vec![Cause {
                    reason: "FieldValueInvalid",
                    message: detail,
                    field: "spec.expirationSeconds",
                }],
                ..Details::default()
            }),
        )
    }

    /// The body the API server sends with `code` when it fails on its own (used by faults):
    /// 429 TooManyRequests (with `retryAfterSeconds`), 500 InternalError, 503 ServiceUnavailable,
    /// 504 Timeout, and the client-error codes with their usual reasons.
    pub fn for_code(code: u16) -> Status {
        let (reason, message) = match code {
            400 => (
                "BadRequest",
                "the server rejected our request for an unknown reason",
            ),
            401 => ("Unauthorized", "Unauthorized"),
            403 => ("Forbidden", "forbidden: injected fault"),
            404 => (
                "NotFound",
                "the server could not find the requested resource",
            ),
            409 => ("Conflict", "the server reported a conflict"),
            410 => ("Expired", "the resource has expired"),
            422 => (
                "Invalid",
                "the server rejected our request due to an error in our request",
            ),
            429 => (
                "TooManyRequests",
                "Too many requests, please try again later.",
            ),
            500 => ("InternalError", "Internal error occurred: injected fault"),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "Timeout: request did not complete within requested timeout - context deadline exceeded",
            ),
            _ => ("", "injected fault"),
        };
        let details = match code {
            429 => Some(Details {
                retry_after_seconds: Some(RETRY_AFTER_SECONDS),
                ..Details::default()
            }),
            500 => Some(Details {
                causes: vec![Cause {
                    reason: "",
                    message: "injected fault".to_owned(),
                    field: "",
                }],
                ..Details::default()
            }),
            _ => None,
        };
        Status::failure(code, reason, message.to_owned(), details)
    }
}

#[cfg(test)]
mod tests {
    use super::Status;

    #[test]
    fn unauthorized_body_matches_the_real_api_server_byte_for_byte() {
        let body = serde_json::to_string(&Status::unauthorized()).unwrap();
        assert_eq!(
            body,
            r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#
        );
    }

    #[test]
    fn forbidden_token_request_names_the_subresource_and_namespace() {
        let status = Status::forbidden_named(
            "bob",
            "create",
            "serviceaccounts",
            Some("token"),
            "eso-sa",
            Some("app-prod"),
        );
        assert_eq!(
            status.message,
            r#"serviceaccounts "eso-sa" is forbidden: User "bob" cannot create resource "serviceaccounts/token" in API group "" in the namespace "app-prod""#
        );
    }

    #[test]
    fn too_many_requests_carries_retry_after_seconds() {
        let body = serde_json::to_value(Status::for_code(429)).unwrap();
        assert_eq!(body["reason"], "TooManyRequests");
        assert_eq!(body["details"]["retryAfterSeconds"], 1);
    }
}
