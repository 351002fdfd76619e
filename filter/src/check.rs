//! The Check RPC as the filter speaks it: building the CheckRequest (the fields Envoy's
//! ext_authz filter sends for these headers) and reading the CheckResponse.

use std::collections::HashMap;

use prost::Message;
use tokensmith_proto::envoy::{
    config::core::v3::{HeaderValueOption, header_value_option::HeaderAppendAction},
    service::auth::v3::{
        AttributeContext, CheckRequest, CheckResponse,
        attribute_context::{HttpRequest, Request},
        check_response::HttpResponse,
    },
};

use crate::{Error, config::Config};

/// The gRPC service and method the filter calls.
pub const SERVICE: &str = "envoy.service.auth.v3.Authorization";
/// The method.
pub const METHOD: &str = "Check";

/// Request headers sent to the companion as gRPC metadata too, for tracing.
pub const TRACE_HEADERS: &[&str] = &[
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
];

/// One change to the request headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderEdit {
    /// Replace (or add) the header.
    Set(String, String),
    /// Add one more value.
    Add(String, String),
    /// Set only if absent.
    SetIfAbsent(String, String),
    /// Set only if present.
    SetIfPresent(String, String),
    /// Remove the header.
    Remove(String),
}

/// The companion's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Continue, with these edits (header mutations first, then removals).
    Allow(Vec<HeaderEdit>),
    /// Answer the client with this.
    Deny {
        /// HTTP status (403 when the companion gave none, as Envoy does).
        status: u32,
        /// Response headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: String,
    },
}

/// The encoded CheckRequest for a request with `headers` (lower-case names, as the host
/// gives them): `:method`, `:path`, `:authority`, `:scheme` into their fields, the
/// configured `forward_headers` into the header map, and the credential always as
/// `authorization`, the header the companion reads.
pub fn request(config: &Config, headers: &[(String, String)], credential: &str) -> Vec<u8> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut map = HashMap::new();
    for name in &config.forward_headers {
        // Envoy joins repeated headers with "," in this map.
        let values: Vec<&str> = headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect();
        if !values.is_empty() {
            map.insert(name.clone(), values.join(","));
        }
    }
    map.remove(&config.header);
    map.insert("authorization".to_owned(), credential.to_owned());
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: get("x-request-id"),
                    method: get(":method"),
                    path: get(":path"),
                    host: get(":authority"),
                    scheme: get(":scheme"),
                    size: -1,
                    headers: map,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
    .encode_to_vec()
}

/// Reads a CheckResponse the way Envoy's ext_authz filter does: status code 0 allows
/// (with the OkHttpResponse's mutations), any other code denies with the
/// DeniedHttpResponse's status (403 if none), headers and body.
pub fn verdict(body: &[u8]) -> Result<Verdict, Error> {
    let response = CheckResponse::decode(body)?;
    let code = response.status.as_ref().map_or(0, |s| s.code);
    if code == 0 {
        let mut edits = Vec::new();
        if let Some(HttpResponse::OkResponse(ok)) = response.http_response {
            edits.extend(ok.headers.into_iter().filter_map(edit));
            edits.extend(
                ok.headers_to_remove
                    .into_iter()
                    .map(|h| HeaderEdit::Remove(h.to_ascii_lowercase())),
            );
        }
        return Ok(Verdict::Allow(edits));
    }
    let denied = match response.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d,
        _ => Default::default(),
    };
    let status = denied
        .status
        .and_then(|s| u32::try_from(s.code).ok())
        .filter(|s| (100..=599).contains(s))
        .unwrap_or(403);
    let headers = denied
        .headers
        .into_iter()
        .filter_map(|o| o.header)
        .map(|h| (h.key.to_ascii_lowercase(), h.value))
        .collect();
    Ok(Verdict::Deny {
        status,
        headers,
        body: denied.body,
    })
}

fn edit(option: HeaderValueOption) -> Option<HeaderEdit> {
    let header = option.header?;
    let (name, value) = (header.key.to_ascii_lowercase(), header.value);
    // The deprecated `append` wins when set, as in Envoy; unset means append_action.
    if let Some(append) = option.append {
        return Some(if append {
            HeaderEdit::Add(name, value)
        } else {
            HeaderEdit::Set(name, value)
        });
    }
    Some(match HeaderAppendAction::try_from(option.append_action) {
        Ok(HeaderAppendAction::AppendIfExistsOrAdd) => HeaderEdit::Add(name, value),
        Ok(HeaderAppendAction::AddIfAbsent) => HeaderEdit::SetIfAbsent(name, value),
        Ok(HeaderAppendAction::OverwriteIfExists) => HeaderEdit::SetIfPresent(name, value),
        Ok(HeaderAppendAction::OverwriteIfExistsOrAdd) | Err(_) => HeaderEdit::Set(name, value),
    })
}

#[cfg(test)]
mod tests {
    use tokensmith_proto::envoy::{
        config::core::v3::HeaderValue,
        service::auth::v3::{DeniedHttpResponse, OkHttpResponse},
        r#type::v3::HttpStatus,
    };
    use tokensmith_proto::google::rpc::Status;
    use wasm_bindgen_test::wasm_bindgen_test;

    use super::*;

    fn config() -> Config {
        Config::parse(br#"{"grpc_cluster":"c","header":"x-token","forward_headers":[":method",":path","x-request-id","x-extra"]}"#)
            .unwrap()
    }

    fn option(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: key.into(),
                value: value.into(),
                raw_value: vec![],
            }),
            append: None,
            append_action: action as i32,
            keep_empty_value: false,
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn check_request_carries_the_credential_as_authorization_and_forwarded_headers() {
        let headers: Vec<(String, String)> = [
            (":method", "GET"),
            (":path", "/api?x=1"),
            (":authority", "mgmt"),
            (":scheme", "https"),
            ("x-request-id", "r1"),
            ("x-extra", "a"),
            ("x-extra", "b"),
            ("x-token", "Bearer w"),
            ("cookie", "secret"),
        ]
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
        let bytes = request(&config(), &headers, "Bearer w");
        let http = CheckRequest::decode(bytes.as_slice())
            .unwrap()
            .attributes
            .unwrap()
            .request
            .unwrap()
            .http
            .unwrap();
        assert_eq!(
            (http.method.as_str(), http.path.as_str(), http.host.as_str()),
            ("GET", "/api?x=1", "mgmt")
        );
        assert_eq!((http.id.as_str(), http.scheme.as_str()), ("r1", "https"));
        assert_eq!(
            http.headers.get("authorization").map(String::as_str),
            Some("Bearer w")
        );
        assert_eq!(http.headers.get("x-extra").map(String::as_str), Some("a,b"));
        assert!(
            !http.headers.contains_key("cookie"),
            "only forward_headers are sent"
        );
        assert!(!http.headers.contains_key("x-token"));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn ok_response_mutations_honour_every_append_action() {
        let response = CheckResponse {
            status: Some(Status {
                code: 0,
                message: String::new(),
                details: vec![],
            }),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![
                    option(
                        "Authorization",
                        "Bearer m",
                        HeaderAppendAction::OverwriteIfExistsOrAdd,
                    ),
                    option("x-a", "1", HeaderAppendAction::AppendIfExistsOrAdd),
                    option("x-b", "2", HeaderAppendAction::AddIfAbsent),
                    option("x-c", "3", HeaderAppendAction::OverwriteIfExists),
                ],
                headers_to_remove: vec!["X-Gone".into()],
            })),
        };
        assert_eq!(
            verdict(&response.encode_to_vec()).unwrap(),
            Verdict::Allow(vec![
                HeaderEdit::Set("authorization".into(), "Bearer m".into()),
                HeaderEdit::Add("x-a".into(), "1".into()),
                HeaderEdit::SetIfAbsent("x-b".into(), "2".into()),
                HeaderEdit::SetIfPresent("x-c".into(), "3".into()),
                HeaderEdit::Remove("x-gone".into()),
            ])
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn denied_response_gives_status_headers_and_body() {
        let response = CheckResponse {
            status: Some(Status {
                code: 16,
                message: "invalid_token".into(),
                details: vec![],
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: 401 }),
                headers: vec![option(
                    "WWW-Authenticate",
                    "Bearer",
                    HeaderAppendAction::OverwriteIfExistsOrAdd,
                )],
                body: "invalid or expired token".into(),
            })),
        };
        assert_eq!(
            verdict(&response.encode_to_vec()).unwrap(),
            Verdict::Deny {
                status: 401,
                headers: vec![("www-authenticate".into(), "Bearer".into())],
                body: "invalid or expired token".into()
            }
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_denial_without_a_status_is_403_like_envoy() {
        let response = CheckResponse {
            status: Some(Status {
                code: 7,
                message: String::new(),
                details: vec![],
            }),
            http_response: None,
        };
        assert!(matches!(
            verdict(&response.encode_to_vec()).unwrap(),
            Verdict::Deny { status: 403, .. }
        ));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn garbage_is_a_decode_error() {
        assert!(matches!(verdict(b"\xff\xff\xff"), Err(Error::Decode(_))));
    }
}
