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

fn headers(credential: Option<&str>) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = [
        (":method", "GET"),
        (":path", "/p"),
        (":authority", "mgmt"),
        ("x-request-id", "r1"),
    ]
    .iter()
    .map(|(k, v)| ((*k).into(), (*v).into()))
    .collect();
    if let Some(c) = credential {
        h.push(("authorization".into(), c.into()));
    }
    h
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
    }
    .encode_to_vec()
}

/// Runs one request through dispatch and an OK reply; returns the reply's decision.
fn exchange(config: &Config, store: &MemoryStore, token: &str, exchanged: &str) -> Decision {
    let (decision, pending) = on_request(
        config,
        &headers(Some(&format!("Bearer {token}"))),
        store,
        NOW,
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
    )
}

#[wasm_bindgen_test(unsupported = test)]
fn a_missing_token_is_denied_like_the_companion_does() {
    let (d, pending) = on_request(&config(""), &headers(None), &MemoryStore::default(), NOW);
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
    let http = CheckRequest::decode(message.as_slice())
        .unwrap()
        .attributes
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap();
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
    );
    assert!(matches!(miss.step, Step::Dispatch { .. }));
}

#[wasm_bindgen_test(unsupported = test)]
fn a_cached_exchange_ends_with_the_workload_tokens_life_and_before_its_own_expiry() {
    let c = config(r#","cache":{"refresh_before_expiry_s":60}"#);
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
        on_request(&c, &request, &store, NOW + 99).1,
        None,
        "still served"
    );
    assert!(
        on_request(&c, &request, &store, NOW + 100).1.is_some(),
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
    assert_eq!(on_request(&c, &request, &store, NOW + 639).1, None);
    assert!(
        on_request(&c, &request, &store, NOW + 640).1.is_some(),
        "inside the refresh window"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn a_denial_is_sent_to_the_client_as_the_companion_wrote_it() {
    let c = config("");
    let (_, pending) = on_request(&c, &headers(Some("Bearer x")), &MemoryStore::default(), NOW);
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
    };
    let d = on_check_reply(
        &c,
        &pending.unwrap(),
        0,
        Some(&reply.encode_to_vec()),
        &MemoryStore::default(),
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
        let (_, pending) = on_request(&c, &headers(Some("Bearer x")), &store, NOW);
        let pending = pending.unwrap();
        for d in [
            on_check_reply(&c, &pending, 14, None, &store),
            on_check_reply(&c, &pending, 0, Some(b"\xff\xff"), &store),
            on_check_reply(&c, &pending, 0, None, &store),
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
    let mut request = headers(None);
    request.push(("x-workload-token".into(), format!("Bearer {token}")));
    let (d, pending) = on_request(&c, &request, &store, NOW);
    let Step::Dispatch { message, .. } = d.step else {
        panic!()
    };
    let http = CheckRequest::decode(message.as_slice())
        .unwrap()
        .attributes
        .unwrap()
        .request
        .unwrap()
        .http
        .unwrap();
    assert_eq!(http.headers["authorization"], format!("Bearer {token}"));
    let exchanged = jwt(&format!(r#"{{"exp":{}}}"#, NOW + 1800));
    let d = on_check_reply(
        &c,
        &pending.unwrap(),
        0,
        Some(&ok_reply(&exchanged)),
        &store,
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
    let (d, pending) = on_request(&c, &headers(Some("Basic abc")), &store, NOW);
    assert_eq!(d.counters, [Counter::Requests]);
    assert!(matches!(d.step, Step::Dispatch { .. }));
    on_check_reply(
        &c,
        &pending.unwrap(),
        0,
        Some(&ok_reply(&jwt(r#"{"exp":9999999999}"#))),
        &store,
    );
    assert_eq!(*store.stores.borrow(), 0);
}
