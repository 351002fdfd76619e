//! Wire-level checks: a wrong field number must fail here, not only inside Envoy.

use prost::Message;

use crate::envoy::config::core::v3::{
    GrpcService, HeaderValue, HeaderValueOption,
    grpc_service::{EnvoyGrpc, TargetSpecifier},
    header_value_option::HeaderAppendAction,
};
use crate::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
    attribute_context::{HttpRequest, Request},
    check_response::HttpResponse,
};
use crate::envoy::r#type::v3::{HttpStatus, StatusCode};
use crate::google::rpc::Status;

/// Protobuf tag byte for a field number and wire type (fields < 16).
fn tag(field: u8, wire_type: u8) -> u8 {
    (field << 3) | wire_type
}
const LEN: u8 = 2;
const VARINT: u8 = 0;

#[test]
fn descriptor_set_decodes_and_names_upstream_packages() {
    let fds = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
    let packages: Vec<_> = fds
        .file
        .iter()
        .filter_map(|f| f.package.as_deref())
        .collect();
    for want in [
        "envoy.service.auth.v3",
        "envoy.config.core.v3",
        "envoy.type.v3",
        "google.rpc",
    ] {
        assert!(
            packages.contains(&want),
            "missing package {want}: {packages:?}"
        );
    }
}

#[test]
fn ok_response_header_uses_upstream_field_numbers() {
    let response = CheckResponse {
        status: Some(Status {
            code: 0,
            message: String::new(),
            details: vec![],
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "a".into(),
                    value: "b".into(),
                    raw_value: vec![],
                }),
                append: None,
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                keep_empty_value: false,
            }],
            headers_to_remove: vec!["x".into()],
        })),
        dynamic_metadata: None,
    };
    // HeaderValue{key=1 "a", value=2 "b"}
    let header_value = [tag(1, LEN), 1, b'a', tag(2, LEN), 1, b'b'];
    // HeaderValueOption{header=1, append_action=3 (OVERWRITE_IF_EXISTS_OR_ADD = 2)}
    let mut option = vec![tag(1, LEN), header_value.len() as u8];
    option.extend_from_slice(&header_value);
    option.extend_from_slice(&[tag(3, VARINT), 2]);
    // OkHttpResponse{headers=2, headers_to_remove=5}
    let mut ok = vec![tag(2, LEN), option.len() as u8];
    ok.extend_from_slice(&option);
    ok.extend_from_slice(&[tag(5, LEN), 1, b'x']);
    // CheckResponse{status=1 (empty), ok_response=3}
    let mut want = vec![tag(1, LEN), 0, tag(3, LEN), ok.len() as u8];
    want.extend_from_slice(&ok);
    assert_eq!(response.encode_to_vec(), want);
}

#[test]
fn denied_response_uses_upstream_field_numbers() {
    let response = CheckResponse {
        status: Some(Status {
            code: 16,
            message: String::new(),
            details: vec![],
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: StatusCode::Unauthorized as i32,
            }),
            headers: vec![],
            body: "no".into(),
        })),
        dynamic_metadata: None,
    };
    // HttpStatus{code=1: 401 as varint = 0x91 0x03}
    let http_status = [tag(1, VARINT), 0x91, 0x03];
    let mut denied = vec![tag(1, LEN), http_status.len() as u8];
    denied.extend_from_slice(&http_status);
    denied.extend_from_slice(&[tag(3, LEN), 2, b'n', b'o']);
    // CheckResponse{status=1 {code=1: 16}, denied_response=2}
    let mut want = vec![
        tag(1, LEN),
        2,
        tag(1, VARINT),
        16,
        tag(2, LEN),
        denied.len() as u8,
    ];
    want.extend_from_slice(&denied);
    assert_eq!(response.encode_to_vec(), want);
}

#[test]
fn check_request_headers_decode_from_upstream_field_numbers() {
    // headers map entry {key=1 "k", value=2 "v"}
    let entry = [tag(1, LEN), 1, b'k', tag(2, LEN), 1, b'v'];
    // HttpRequest{id=1 "i", method=2 "GET", headers=3, path=4 "/p", host=5 "h"}
    let mut http = vec![
        tag(1, LEN),
        1,
        b'i',
        tag(2, LEN),
        3,
        b'G',
        b'E',
        b'T',
        tag(3, LEN),
        entry.len() as u8,
    ];
    http.extend_from_slice(&entry);
    http.extend_from_slice(&[tag(4, LEN), 2, b'/', b'p', tag(5, LEN), 1, b'h']);
    // Request{http=2}, AttributeContext{request=4}, CheckRequest{attributes=1}
    let mut request = vec![tag(2, LEN), http.len() as u8];
    request.extend_from_slice(&http);
    let mut attributes = vec![tag(4, LEN), request.len() as u8];
    attributes.extend_from_slice(&request);
    let mut bytes = vec![tag(1, LEN), attributes.len() as u8];
    bytes.extend_from_slice(&attributes);

    let decoded = CheckRequest::decode(bytes.as_slice()).unwrap();
    let want = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "i".into(),
                    method: "GET".into(),
                    headers: [("k".to_string(), "v".to_string())].into(),
                    path: "/p".into(),
                    host: "h".into(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    };
    assert_eq!(decoded, want);
}

#[test]
fn raw_header_map_is_field_13() {
    // HttpRequest{header_map=13 (two-byte tag 0x6a), HeaderMap{headers=1 {key=1 "k", raw_value=3 "v"}}}
    let value = [tag(1, LEN), 1, b'k', tag(3, LEN), 1, b'v'];
    let mut map = vec![tag(1, LEN), value.len() as u8];
    map.extend_from_slice(&value);
    let mut http = vec![(13 << 3) | LEN, map.len() as u8];
    http.extend_from_slice(&map);
    let decoded = HttpRequest::decode(http.as_slice()).unwrap();
    let header = &decoded.header_map.unwrap().headers[0];
    assert_eq!(
        (header.key.as_str(), header.raw_value.as_slice()),
        ("k", &b"v"[..])
    );
}

#[test]
fn grpc_service_uses_upstream_field_numbers() {
    let service = GrpcService {
        target_specifier: Some(TargetSpecifier::EnvoyGrpc(EnvoyGrpc {
            cluster_name: "c".into(),
            authority: "a".into(),
        })),
        timeout: None,
    };
    // GrpcService{envoy_grpc=1 {cluster_name=1 "c", authority=2 "a"}}
    let want = [tag(1, LEN), 6, tag(1, LEN), 1, b'c', tag(2, LEN), 1, b'a'];
    assert_eq!(service.encode_to_vec(), want);
}

#[test]
fn dynamic_metadata_is_field_four() {
    let response = CheckResponse {
        status: None,
        http_response: None,
        dynamic_metadata: Some(prost_types::Struct::default()),
    };
    assert_eq!(response.encode_to_vec(), [tag(4, LEN), 0]);
}
