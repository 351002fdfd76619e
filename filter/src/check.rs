//! The Check RPC as the filter speaks it: building the CheckRequest (the fields Envoy's
//! ext_authz filter sends for these headers) and reading the CheckResponse.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use prost::Message;
use tokensmith_proto::envoy::{
    config::core::v3::{
        Address, GrpcService, HeaderValueOption, SocketAddress, grpc_service::EnvoyGrpc,
        grpc_service::TargetSpecifier, header_value_option::HeaderAppendAction,
    },
    service::auth::v3::{
        AttributeContext, CheckRequest, CheckResponse,
        attribute_context::{HttpRequest, Peer, Request},
        check_response::HttpResponse,
    },
};

use crate::{Error, config::Config, headers::Headers};

/// The key of the companion's reuse limit (seconds) in `CheckResponse.dynamic_metadata`.
pub use tokensmith_proto::REUSE_METADATA_KEY as REUSE_KEY;

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

impl HeaderEdit {
    /// The header it changes.
    pub fn name(&self) -> &str {
        match self {
            HeaderEdit::Set(name, _)
            | HeaderEdit::Add(name, _)
            | HeaderEdit::SetIfAbsent(name, _)
            | HeaderEdit::SetIfPresent(name, _)
            | HeaderEdit::Remove(name) => name,
        }
    }
}

/// The companion's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Continue, with these edits (header mutations first, then removals).
    Allow {
        /// The edits.
        edits: Vec<HeaderEdit>,
        /// How long a proxy may reuse this answer, when the companion says.
        reuse: Option<Duration>,
    },
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

/// The `upstream` argument of `dispatch_grpc_call`: a serialized GrpcService naming the
/// cluster and the `:authority` (Envoy tries this before a bare cluster name). Written as
/// two merged `envoy_grpc` messages so every length fits one byte and the bytes stay
/// UTF-8, as the SDK's `&str` parameter requires (config bounds both names).
pub fn grpc_service(config: &Config) -> String {
    let part = |envoy_grpc: EnvoyGrpc| {
        GrpcService {
            target_specifier: Some(TargetSpecifier::EnvoyGrpc(envoy_grpc)),
            timeout: None,
        }
        .encode_to_vec()
    };
    let bytes = [
        part(EnvoyGrpc {
            cluster_name: config.grpc_cluster.clone(),
            authority: String::new(),
        }),
        part(EnvoyGrpc {
            cluster_name: String::new(),
            authority: config.grpc_authority.clone(),
        }),
    ]
    .concat();
    // Config admits only names that keep it UTF-8; the cluster name is the fallback.
    String::from_utf8(bytes).unwrap_or_else(|_| config.grpc_cluster.clone())
}

/// The encoded CheckRequest for a request with `headers`: `:method`, `:path`,
/// `:authority`, `:scheme` into their fields, the configured `forward_headers` into the
/// header map, and the credential always as `authorization`, the header the companion
/// reads. Values that are not UTF-8 cannot travel in these string fields: they are left
/// out (the credential has been checked to be UTF-8 before).
pub fn request(
    config: &Config,
    headers: &Headers,
    credential: &str,
    peer: Option<SocketAddr>,
) -> Vec<u8> {
    let get = |name: &str| headers.text(name).unwrap_or_default().to_owned();
    let mut map = HashMap::new();
    for name in &config.forward_headers {
        // Envoy joins repeated headers with "," in this map.
        let values: Vec<&str> = headers
            .values(name)
            .filter_map(|v| std::str::from_utf8(v).ok())
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
            // As Envoy's ext_authz fills `source`: the downstream peer's socket address.
            source: peer.map(|peer| Peer {
                address: Some(Address {
                    socket_address: Some(SocketAddress {
                        address: peer.ip().to_string(),
                        port_value: u32::from(peer.port()),
                    }),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
    .encode_to_vec()
}

/// Reads a CheckResponse the way Envoy's ext_authz filter does: status code 0 allows
/// (with the OkHttpResponse's mutations), any other code denies with the
/// DeniedHttpResponse's status (403 if none), headers and body. Unlike Envoy, a response
/// without a status is an error, never an allow.
pub fn verdict(body: &[u8]) -> Result<Verdict, Error> {
    let response = CheckResponse::decode(body)?;
    let code = response.status.as_ref().ok_or(Error::NoStatus)?.code;
    if code == 0 {
        let reuse = reuse_limit(response.dynamic_metadata.as_ref());
        let mut edits = Vec::new();
        if let Some(HttpResponse::OkResponse(ok)) = response.http_response {
            edits.extend(ok.headers.into_iter().filter_map(edit));
            edits.extend(
                ok.headers_to_remove
                    .into_iter()
                    .map(|h| HeaderEdit::Remove(h.to_ascii_lowercase())),
            );
        }
        return Ok(Verdict::Allow { edits, reuse });
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

/// The companion's `tokensmith_reuse_s`, if it sent one; a value that is not a
/// non-negative number means no reuse at all.
fn reuse_limit(metadata: Option<&prost_types::Struct>) -> Option<Duration> {
    use prost_types::value::Kind;
    let kind = metadata?.fields.get(REUSE_KEY)?.kind.as_ref();
    Some(match kind {
        Some(Kind::NumberValue(s)) if s.is_finite() && *s >= 0.0 => {
            Duration::from_secs_f64(s.min(86_400.0))
        }
        _ => Duration::ZERO,
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
        let headers = Headers::from_pairs(&[
            (":method", &b"GET"[..]),
            (":path", b"/api?x=1"),
            (":authority", b"mgmt"),
            (":scheme", b"https"),
            ("x-request-id", b"r1"),
            ("x-extra", b"a"),
            ("x-extra", b"caf\xe9"),
            ("x-extra", b"b"),
            ("x-token", b"Bearer w"),
            ("cookie", b"secret"),
        ]);
        let peer = "[2001:db8::7]:4431".parse().ok();
        let bytes = request(&config(), &headers, "Bearer w", peer);
        let attributes = CheckRequest::decode(bytes.as_slice())
            .unwrap()
            .attributes
            .unwrap();
        let source = attributes.source.unwrap().address.unwrap();
        let socket = source.socket_address.unwrap();
        assert_eq!(
            (socket.address.as_str(), socket.port_value),
            ("2001:db8::7", 4431)
        );
        let http = attributes.request.unwrap().http.unwrap();
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
            dynamic_metadata: None,
        };
        assert_eq!(
            verdict(&response.encode_to_vec()).unwrap(),
            Verdict::Allow {
                edits: vec![
                    HeaderEdit::Set("authorization".into(), "Bearer m".into()),
                    HeaderEdit::Add("x-a".into(), "1".into()),
                    HeaderEdit::SetIfAbsent("x-b".into(), "2".into()),
                    HeaderEdit::SetIfPresent("x-c".into(), "3".into()),
                    HeaderEdit::Remove("x-gone".into()),
                ],
                reuse: None,
            }
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
            dynamic_metadata: None,
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
            dynamic_metadata: None,
        };
        assert!(matches!(
            verdict(&response.encode_to_vec()).unwrap(),
            Verdict::Deny { status: 403, .. }
        ));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn the_grpc_service_names_cluster_and_authority_and_stays_utf8() {
        let config = Config::parse(
            br#"{"grpc_cluster":"outbound|9001||tokensmith.tokensmith-system.svc.cluster.local"}"#,
        )
        .unwrap();
        let service = GrpcService::decode(grpc_service(&config).as_bytes()).unwrap();
        let Some(TargetSpecifier::EnvoyGrpc(envoy)) = service.target_specifier else {
            panic!("envoy_grpc")
        };
        assert_eq!(envoy.cluster_name, config.grpc_cluster);
        assert_eq!(
            envoy.authority,
            "tokensmith.tokensmith-system.svc.cluster.local"
        );
        // The longest names config admits still give a UTF-8 argument.
        let long = "a".repeat(crate::config::MAX_GRPC_NAME);
        let json = format!(r#"{{"grpc_cluster":"{long}","grpc_authority":"{long}"}}"#);
        let config = Config::parse(json.as_bytes()).unwrap();
        let arg = grpc_service(&config);
        assert_ne!(arg, config.grpc_cluster, "not the fallback");
        let Some(TargetSpecifier::EnvoyGrpc(envoy)) = GrpcService::decode(arg.as_bytes())
            .unwrap()
            .target_specifier
        else {
            panic!("envoy_grpc")
        };
        assert_eq!((envoy.cluster_name, envoy.authority), (long.clone(), long));
    }

    fn ok_with(metadata: Option<prost_types::Struct>) -> Vec<u8> {
        CheckResponse {
            status: Some(Status::default()),
            http_response: None,
            dynamic_metadata: metadata,
        }
        .encode_to_vec()
    }

    fn reuse_of(body: &[u8]) -> Option<Duration> {
        match verdict(body).unwrap() {
            Verdict::Allow { reuse, .. } => reuse,
            Verdict::Deny { .. } => panic!("not an allow"),
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn the_companions_reuse_limit_is_read_from_dynamic_metadata() {
        use prost_types::{Struct, Value, value::Kind};
        let with = |kind: Kind| {
            ok_with(Some(Struct {
                fields: [(REUSE_KEY.to_owned(), Value { kind: Some(kind) })].into(),
            }))
        };
        assert_eq!(reuse_of(&ok_with(None)), None);
        assert_eq!(
            reuse_of(&with(Kind::NumberValue(7.0))),
            Some(Duration::from_secs(7))
        );
        for junk in [
            Kind::NumberValue(-1.0),
            Kind::NumberValue(f64::NAN),
            Kind::StringValue("10".into()),
        ] {
            assert_eq!(reuse_of(&with(junk)), Some(Duration::ZERO));
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_response_without_status_is_an_error_not_an_allow() {
        let response = CheckResponse {
            status: None,
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse::default())),
            dynamic_metadata: None,
        };
        assert!(matches!(
            verdict(&response.encode_to_vec()),
            Err(Error::NoStatus)
        ));
        assert!(matches!(verdict(b""), Err(Error::NoStatus)));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn garbage_is_a_decode_error() {
        assert!(matches!(verdict(b"\xff\xff\xff"), Err(Error::Decode(_))));
    }
}
