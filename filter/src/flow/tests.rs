//! The request state machine against an in-memory slot store.

use prost::Message;
use tokensmith_proto::envoy::{
    config::core::v3::{HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction},
    service::auth::v3::{
        CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
        check_response::HttpResponse,
    },
    r#type::v3::HttpStatus,
};
use tokensmith_proto::google::rpc::Status;
use wasm_bindgen_test::wasm_bindgen_test;

use super::*;
use crate::{cache::tests::MemoryStore, claims::tests::jwt};

const NOW: u64 = 1_000_000;

fn config(extra: &str) -> Config {
    Config::parse(format!(r#"{{"grpc_cluster":"tokensmith"{extra}}}"#).as_bytes()).unwrap()
}

/// A request to `mgmt` with these extra headers.
fn request_with(extra: &[(&str, &[u8])]) -> Headers {
    let mut pairs: Vec<(&str, &[u8])> = vec![
        (":method", b"GET"),
        (":path", b"/p"),
        (":authority", b"mgmt"),
        ("x-request-id", b"r1"),
    ];
    pairs.extend_from_slice(extra);
    Headers::from_pairs(&pairs)
}

fn headers(credential: Option<&str>) -> Headers {
    match credential {
        Some(c) => request_with(&[("authorization", c.as_bytes())]),
        None => request_with(&[]),
    }
}

fn workload_token(exp: u64) -> String {
    jwt(&format!(
        r#"{{"sub":"system:serviceaccount:app-prod:eso-sa","exp":{exp}}}"#
    ))
}

fn ok_reply(exchanged: &str) -> Vec<u8> {
    CheckResponse {
        status: Some(Status {
            code: 0,
            message: String::new(),
            details: vec![],
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![HeaderValueOption {
                header: Some(HeaderValue {
                    key: "authorization".into(),
                    value: format!("Bearer {exchanged}"),
                    raw_value: vec![],
                }),
                append: None,
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                keep_empty_value: false,
            }],
            headers_to_remove: vec![],
        })),
        dynamic_metadata: None,
    }
    .encode_to_vec()
}

/// An OK reply whose dynamic metadata limits reuse to `seconds`.
fn ok_reply_reusable_for(exchanged: &str, seconds: f64) -> Vec<u8> {
    use prost_types::{Struct, Value, value::Kind};
    let mut reply = CheckResponse::decode(ok_reply(exchanged).as_slice()).unwrap();
    reply.dynamic_metadata = Some(Struct {
        fields: [(
            check::REUSE_KEY.to_owned(),
            Value {
                kind: Some(Kind::NumberValue(seconds)),
            },
        )]
        .into(),
    });
    reply.encode_to_vec()
}

/// The HTTP attributes of an encoded CheckRequest.
fn sent(
    message: &[u8],
) -> tokensmith_proto::envoy::service::auth::v3::attribute_context::HttpRequest {
    CheckRequest::decode(message)
        .unwrap()
        .attributes
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap()
}

/// Runs one request through dispatch and an OK reply; returns the reply's decision.
fn exchange(config: &Config, store: &MemoryStore, token: &str, exchanged: &str) -> Decision {
    let (decision, pending) = on_request(
        config,
        &headers(Some(&format!("Bearer {token}"))),
        store,
        NOW,
        None,
    );
    assert!(
        matches!(decision.step, Step::Dispatch { .. }),
        "{decision:?}"
    );
    on_check_reply(
        config,
        &pending.unwrap(),
        0,
        Some(&ok_reply(exchanged)),
        store,
        NOW,
    )
}

#[wasm_bindgen_test(unsupported = test)]
fn a_missing_token_is_denied_like_the_companion_does() {
    let (d, pending) = on_request(
        &config(""),
        &headers(None),
        &MemoryStore::default(),
        NOW,
        None,
    );
    assert!(pending.is_none());
    assert_eq!(d.counters, [Counter::Requests, Counter::Denied]);
    let Step::Respond {
        status,
        headers,
        body,
    } = d.step
    else {
        panic!("{:?}", d.step)
    };
    assert_eq!((status, body.as_str()), (401, "missing bearer token"));
    assert!(headers.contains(&("www-authenticate".into(), "Bearer".into())));
}

#[wasm_bindgen_test(unsupported = test)]
fn a_missing_token_passes_untouched_when_configured() {
    let (d, _) = on_request(
        &config(r#","on_missing_token":"allow""#),
        &headers(None),
        &MemoryStore::default(),
        NOW,
        None,
    );
    assert_eq!(d.step, Step::Continue(vec![]));
}

#[wasm_bindgen_test(unsupported = test)]
fn a_cache_miss_dispatches_a_check_with_trace_metadata() {
    let token = workload_token(NOW + 3600);
    let (d, pending) = on_request(
        &config(""),
        &headers(Some(&format!("Bearer {token}"))),
        &MemoryStore::default(),
        NOW,
        None,
    );
    assert_eq!(d.counters, [Counter::Requests, Counter::CacheMisses]);
    let Step::Dispatch {
        message,
        metadata,
        timeout,
    } = d.step
    else {
        panic!("{:?}", d.step)
    };
    assert_eq!(timeout, Duration::from_millis(1000));
    assert_eq!(metadata, [("x-request-id".to_owned(), "r1".to_owned())]);
    let http = sent(&message);
    assert_eq!(http.headers["authorization"], format!("Bearer {token}"));
    assert_eq!(pending.unwrap().workload_expiry, Some(NOW + 3600));
}

#[wasm_bindgen_test(unsupported = test)]
fn an_allow_sets_the_new_token_and_the_next_request_is_a_cache_hit() {
    let c = config("");
    let store = MemoryStore::default();
    let token = workload_token(NOW + 3600);
    let exchanged = jwt(&format!(r#"{{"exp":{}}}"#, NOW + 1800));
    let d = exchange(&c, &store, &token, &exchanged);
    assert_eq!(d.counters, [Counter::Allowed]);
    let want = Step::Continue(vec![HeaderEdit::Set(
        "authorization".into(),
        format!("Bearer {exchanged}"),
    )]);
    assert_eq!(d.step, want);

    let (hit, pending) = on_request(
        &c,
        &headers(Some(&format!("Bearer {token}"))),
        &store,
        NOW + 10,
        None,
    );
    assert!(pending.is_none(), "no Check on a hit");
    assert_eq!(
        hit.counters,
        [Counter::Requests, Counter::CacheHits, Counter::Allowed]
    );
    assert_eq!(hit.step, want);

    // Another token never gets this entry.
    let other = workload_token(NOW + 3601);
    let (miss, _) = on_request(
        &c,
        &headers(Some(&format!("Bearer {other}"))),
        &store,
        NOW + 10,
        None,
    );
    assert!(matches!(miss.step, Step::Dispatch { .. }));
}

#[wasm_bindgen_test(unsupported = test)]
fn a_cached_exchange_ends_with_the_workload_tokens_life_and_before_its_own_expiry() {
    let c = config(r#","cache":{"refresh_before_expiry_s":60,"max_age_s":3600}"#);
    let store = MemoryStore::default();
    let token = workload_token(NOW + 100);
    exchange(
        &c,
        &store,
        &token,
        &jwt(&format!(r#"{{"exp":{}}}"#, NOW + 700)),
    );
    let request = headers(Some(&format!("Bearer {token}")));
    assert_eq!(
        on_request(&c, &request, &store, NOW + 99, None).1,
        None,
        "still served"
    );
    assert!(
        on_request(&c, &request, &store, NOW + 100, None)
            .1
            .is_some(),
        "workload token over: ask again"
    );

    let long_lived = workload_token(NOW + 100_000);
    exchange(
        &c,
        &store,
        &long_lived,
        &jwt(&format!(r#"{{"exp":{}}}"#, NOW + 700)),
    );
    let request = headers(Some(&format!("Bearer {long_lived}")));
    assert_eq!(on_request(&c, &request, &store, NOW + 639, None).1, None);
    assert!(
        on_request(&c, &request, &store, NOW + 640, None)
            .1
            .is_some(),
        "inside the refresh window"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn a_denial_is_sent_to_the_client_as_the_companion_wrote_it() {
    let c = config("");
    let (_, pending) = on_request(
        &c,
        &headers(Some("Bearer x")),
        &MemoryStore::default(),
        NOW,
        None,
    );
    let reply = CheckResponse {
        status: Some(Status {
            code: 7,
            message: String::new(),
            details: vec![],
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: 403 }),
            headers: vec![],
            body: "token exchange forbidden".into(),
        })),
        dynamic_metadata: None,
    };
    let d = on_check_reply(
        &c,
        &pending.unwrap(),
        0,
        Some(&reply.encode_to_vec()),
        &MemoryStore::default(),
        NOW,
    );
    assert_eq!(d.counters, [Counter::Denied]);
    assert_eq!(
        d.step,
        Step::Respond {
            status: 403,
            headers: vec![],
            body: "token exchange forbidden".into()
        }
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn companion_failures_follow_failure_mode_and_never_forward_the_token() {
    let store = MemoryStore::default();
    for (mode, want_status) in [("deny", Some(503)), ("allow", None)] {
        let c = config(&format!(r#","failure_mode":"{mode}""#));
        let (_, pending) = on_request(&c, &headers(Some("Bearer x")), &store, NOW, None);
        let pending = pending.unwrap();
        for d in [
            on_check_reply(&c, &pending, 14, None, &store, NOW),
            on_check_reply(&c, &pending, 0, Some(b"\xff\xff"), &store, NOW),
            on_check_reply(&c, &pending, 0, None, &store, NOW),
            // An empty body decodes to a CheckResponse without status: no verdict.
            on_check_reply(&c, &pending, 0, Some(b""), &store, NOW),
            on_dispatch_failure(&c),
        ] {
            assert_eq!(d.counters, [Counter::Errors]);
            match (want_status, d.step) {
                (Some(s), Step::Respond { status, body, .. }) => {
                    assert_eq!((status, body.as_str()), (s, "identity service unavailable"))
                }
                (None, Step::Continue(edits)) => {
                    assert_eq!(edits, [HeaderEdit::Remove("authorization".into())])
                }
                (_, other) => panic!("{mode}: {other:?}"),
            }
        }
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn a_custom_credential_header_is_removed_when_authorization_is_set() {
    let c = config(r#","header":"x-workload-token""#);
    let store = MemoryStore::default();
    let token = workload_token(NOW + 3600);
    let credential = format!("Bearer {token}");
    let request = request_with(&[("x-workload-token", credential.as_bytes())]);
    let (d, pending) = on_request(&c, &request, &store, NOW, None);
    let Step::Dispatch { message, .. } = d.step else {
        panic!()
    };
    let http = sent(&message);
    assert_eq!(http.headers["authorization"], format!("Bearer {token}"));
    let exchanged = jwt(&format!(r#"{{"exp":{}}}"#, NOW + 1800));
    let d = on_check_reply(
        &c,
        &pending.unwrap(),
        0,
        Some(&ok_reply(&exchanged)),
        &store,
        NOW,
    );
    assert_eq!(
        d.step,
        Step::Continue(vec![
            HeaderEdit::Remove("x-workload-token".into()),
            HeaderEdit::Set("authorization".into(), format!("Bearer {exchanged}")),
        ])
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn unparseable_credentials_are_checked_but_never_cached() {
    let c = config("");
    let store = MemoryStore::default();
    let (d, pending) = on_request(&c, &headers(Some("Basic abc")), &store, NOW, None);
    assert_eq!(d.counters, [Counter::Requests]);
    assert!(matches!(d.step, Step::Dispatch { .. }));
    on_check_reply(
        &c,
        &pending.unwrap(),
        0,
        Some(&ok_reply(&jwt(r#"{"exp":9999999999}"#))),
        &store,
        NOW,
    );
    assert_eq!(*store.stores.borrow(), 0);
}

fn respond(d: &Decision) -> (u32, &str, Option<&str>) {
    let Step::Respond {
        status,
        headers,
        body,
    } = &d.step
    else {
        panic!("{:?}", d.step)
    };
    let challenge = headers
        .iter()
        .find(|(k, _)| k == "www-authenticate")
        .map(|(_, v)| v.as_str());
    (*status, body.as_str(), challenge)
}

#[wasm_bindgen_test(unsupported = test)]
fn a_credential_that_is_not_utf8_or_repeated_is_malformed_without_a_check() {
    let c = config("");
    let store = MemoryStore::default();
    let token = format!("Bearer {}", workload_token(NOW + 3600));
    for request in [
        request_with(&[("authorization", b"Bearer caf\xe9")]),
        request_with(&[("authorization", b"\xff\xfe")]),
        request_with(&[
            ("authorization", token.as_bytes()),
            ("authorization", token.as_bytes()),
        ]),
    ] {
        let (d, pending) = on_request(&c, &request, &store, NOW, None);
        assert!(pending.is_none(), "no Check");
        assert_eq!(d.counters, [Counter::Requests, Counter::Denied]);
        assert_eq!(
            respond(&d),
            (
                401,
                "malformed bearer token",
                Some("Bearer error=\"invalid_token\"")
            )
        );
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn other_headers_that_are_not_utf8_are_passed_over() {
    let c = config(r#","forward_headers":[":path","x-note"]"#);
    let token = format!("Bearer {}", workload_token(NOW + 3600));
    let request = request_with(&[
        ("x-note", b"caf\xe9"),
        ("x-request-id", b"\xff"),
        ("authorization", token.as_bytes()),
    ]);
    let (d, pending) = on_request(&c, &request, &MemoryStore::default(), NOW, None);
    assert!(pending.is_some());
    let Step::Dispatch { message, .. } = d.step else {
        panic!("{:?}", d.step)
    };
    let http = sent(&message);
    assert!(!http.headers.contains_key("x-note"));
    assert_eq!(http.headers["authorization"], token);
    assert_eq!(http.id, "r1", "the first x-request-id is UTF-8");
}

#[wasm_bindgen_test(unsupported = test)]
fn requests_for_other_hosts_pass_untouched_and_unread() {
    let c = config(r#","hosts":["mgmt.example.com","*.mgmt.example.com"]"#);
    let store = MemoryStore::default();
    for authority in [&b"app.example.com"[..], b"example.com", b"caf\xe9"] {
        let request = Headers::from_pairs(&[
            (":authority", authority),
            ("authorization", b"Bearer someone-elses"),
        ]);
        let (d, pending) = on_request(&c, &request, &store, NOW, None);
        assert!(pending.is_none());
        assert_eq!(d.counters, [Counter::Requests, Counter::OtherHost]);
        assert_eq!(d.step, Step::Continue(vec![]), "nothing removed");
    }
    for authority in [&b"mgmt.example.com:443"[..], b"a.mgmt.example.com"] {
        let request = Headers::from_pairs(&[(":authority", authority)]);
        let (d, _) = on_request(&c, &request, &store, NOW, None);
        assert_eq!(respond(&d).0, 401, "ours: a missing token is refused");
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn an_entry_serves_for_the_smaller_of_max_age_and_the_companions_limit() {
    let token = workload_token(NOW + 3600);
    let exchanged = jwt(&format!(r#"{{"exp":{}}}"#, NOW + 3600));
    let request = headers(Some(&format!("Bearer {token}")));
    for (max_age, reuse, served_for) in [
        (60, None, 60),
        (60, Some(10.0), 10),
        (5, Some(10.0), 5),
        (60, Some(0.0), 0),
        (0, None, 0),
    ] {
        let c = config(&format!(r#","cache":{{"max_age_s":{max_age}}}"#));
        let store = MemoryStore::default();
        let (_, pending) = on_request(&c, &request, &store, NOW, None);
        let body = match reuse {
            Some(r) => ok_reply_reusable_for(&exchanged, r),
            None => ok_reply(&exchanged),
        };
        on_check_reply(&c, &pending.unwrap(), 0, Some(&body), &store, NOW);
        let hit = |at: u64| on_request(&c, &request, &store, at, None).1.is_none();
        let case = format!("max_age {max_age}, reuse {reuse:?}");
        if served_for > 0 {
            assert!(hit(NOW + served_for - 1), "{case}: served");
        }
        assert!(!hit(NOW + served_for), "{case}: asks again");
    }
}
