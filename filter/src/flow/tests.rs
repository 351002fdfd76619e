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
use crate::{cache::tests::MemoryStore, claims::tests::jwt, flights::Job};

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

/// One request at `now` (Unix s) on a worker with nothing in flight.
fn arrive(
    config: &Config,
    headers: &Headers,
    cache: &MemoryStore,
    now: u64,
) -> (Decision, Option<Pending>) {
    on_request(config, headers, cache, &mut Flights::default(), at(1, now))
}

/// Request context `context` arriving at `now` (Unix s).
fn at(context: u32, now: u64) -> Arrival {
    Arrival {
        context,
        now_ms: now * 1000,
        peer: || None,
    }
}

/// Runs one request through dispatch and an OK reply; returns the reply's decision.
fn exchange(config: &Config, store: &MemoryStore, token: &str, exchanged: &str) -> Decision {
    let (decision, pending) = arrive(
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
        NOW,
    )
}

#[wasm_bindgen_test(unsupported = test)]
fn a_missing_token_is_denied_like_the_companion_does() {
    let (d, pending) = arrive(&config(""), &headers(None), &MemoryStore::default(), NOW);
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
    let (d, _) = arrive(
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
    let (d, pending) = arrive(
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

    let (hit, pending) = arrive(
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
    let (miss, _) = arrive(
        &c,
        &headers(Some(&format!("Bearer {other}"))),
        &store,
        NOW + 10,
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
        arrive(&c, &request, &store, NOW + 99).1,
        None,
        "still served"
    );
    assert!(
        arrive(&c, &request, &store, NOW + 100).1.is_some(),
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
    let mut flights = Flights::default();
    let mut hit = |now| on_request(&c, &request, &store, &mut flights, at(1, now));
    assert_eq!(hit(NOW + 639).1, None);
    assert_eq!(
        hit(NOW + 640).1,
        None,
        "inside the refresh window: still served"
    );
    assert_eq!(hit(NOW + 699).1, None);
    assert!(
        hit(NOW + 700).1.is_some(),
        "the exchanged token expired: a plain miss"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn a_denial_is_sent_to_the_client_as_the_companion_wrote_it() {
    let c = config("");
    let (_, pending) = arrive(&c, &headers(Some("Bearer x")), &MemoryStore::default(), NOW);
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
        let (_, pending) = arrive(&c, &headers(Some("Bearer x")), &store, NOW);
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
    let (d, pending) = arrive(&c, &request, &store, NOW);
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
    let (d, pending) = arrive(&c, &headers(Some("Basic abc")), &store, NOW);
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
        let (d, pending) = arrive(&c, &request, &store, NOW);
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
    let (d, pending) = arrive(&c, &request, &MemoryStore::default(), NOW);
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
        let (d, pending) = arrive(&c, &request, &store, NOW);
        assert!(pending.is_none());
        assert_eq!(d.counters, [Counter::Requests, Counter::OtherHost]);
        assert_eq!(d.step, Step::Continue(vec![]), "nothing removed");
    }
    for authority in [&b"mgmt.example.com:443"[..], b"a.mgmt.example.com"] {
        let request = Headers::from_pairs(&[(":authority", authority)]);
        let (d, _) = arrive(&c, &request, &store, NOW);
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
        let (_, pending) = arrive(&c, &request, &store, NOW);
        let body = match reuse {
            Some(r) => ok_reply_reusable_for(&exchanged, r),
            None => ok_reply(&exchanged),
        };
        on_check_reply(&c, &pending.unwrap(), 0, Some(&body), &store, NOW);
        let hit = |at: u64| arrive(&c, &request, &store, at).1.is_none();
        let case = format!("max_age {max_age}, reuse {reuse:?}");
        if served_for > 0 {
            assert!(hit(NOW + served_for - 1), "{case}: served");
        }
        assert!(!hit(NOW + served_for), "{case}: asks again");
    }
}

/// A store holding `token`'s exchange (done at NOW, refresh window 60 s, max age 3600 s,
/// exchanged token expiring at NOW + 700: the refresh point is NOW + 640).
fn cached(token: &str) -> (Config, MemoryStore) {
    let c = config(r#","cache":{"refresh_before_expiry_s":60,"max_age_s":3600}"#);
    let store = MemoryStore::default();
    exchange(&c, &store, token, &exchanged(NOW + 700));
    (c, store)
}

fn exchanged(exp: u64) -> String {
    jwt(&format!(r#"{{"exp":{exp},"sub":"m"}}"#))
}

fn continued_with(d: &Decision) -> &str {
    let Step::Continue(edits) = &d.step else {
        panic!("{:?}", d.step)
    };
    match edits.as_slice() {
        [HeaderEdit::Set(name, value)] if name == "authorization" => value,
        other => panic!("{other:?}"),
    }
}

/// The background Check the tick would send now (panics unless exactly one is queued).
fn background(flights: &mut Flights) -> (Digest, Pending, Check) {
    assert!(flights.arm(), "work for the root");
    match flights.take_jobs(NOW * 1000).as_slice() {
        [
            Job::Refresh {
                digest,
                pending,
                check,
            },
        ] => (*digest, pending.clone(), check.clone()),
        other => panic!("{other:?}"),
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn a_hit_past_the_refresh_point_is_served_at_once_and_queues_one_background_check() {
    let token = workload_token(NOW + 100_000);
    let (c, store) = cached(&token);
    let credential = format!("Bearer {token}");
    let request = request_with(&[
        ("authorization", credential.as_bytes()),
        (
            "traceparent",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
    ]);
    let mut flights = Flights::default();
    let arrival = Arrival {
        peer: || "10.0.0.7:5555".parse().ok(),
        ..at(1, NOW + 640)
    };
    let (d, pending) = on_request(&c, &request, &store, &mut flights, arrival);
    assert!(pending.is_none(), "the request does not wait");
    assert_eq!(
        d.counters,
        [Counter::Requests, Counter::CacheHits, Counter::Allowed]
    );
    assert_eq!(
        continued_with(&d),
        format!("Bearer {}", exchanged(NOW + 700))
    );

    let (digest, _, check) = background(&mut flights);
    assert_eq!(digest, cache::digest(&token));
    assert_eq!(check.timeout, Duration::from_millis(1000));
    assert!(check.metadata.is_empty(), "no request id or trace context");
    let sent = CheckRequest::decode(check.message.as_slice()).unwrap();
    let attributes = sent.attributes.unwrap();
    let http = attributes.request.unwrap().http.unwrap();
    assert_eq!(http.id, "", "not the triggering request's id");
    assert!(!http.headers.contains_key("x-request-id"));
    assert!(!http.headers.contains_key("traceparent"));
    assert_eq!(http.headers["authorization"], credential);
    let source = attributes.source.unwrap().address.unwrap().socket_address;
    assert_eq!(source.unwrap().address, "10.0.0.7", "its TokenReview share");

    // A second hit while that Check is out: served, nothing more for the root.
    let (again, _) = on_request(&c, &request, &store, &mut flights, at(2, NOW + 641));
    assert_eq!(continued_with(&again), continued_with(&d));
    assert!(!flights.arm());
    assert_eq!(flights.take_jobs(NOW * 1000), []);
}

#[wasm_bindgen_test(unsupported = test)]
fn an_allowed_refresh_replaces_the_entry_and_the_next_hit_carries_the_new_token() {
    let token = workload_token(NOW + 100_000);
    let (c, store) = cached(&token);
    let request = headers(Some(&format!("Bearer {token}")));
    let mut flights = Flights::default();
    on_request(&c, &request, &store, &mut flights, at(1, NOW + 640));
    let (digest, pending, _) = background(&mut flights);
    let renewed = exchanged(NOW + 1400);
    let counters = on_refresh_reply(
        &c,
        &pending,
        0,
        Some(&ok_reply(&renewed)),
        &store,
        NOW + 640,
    );
    assert_eq!(counters, []);
    flights.refresh_done(&digest);

    let (d, _) = on_request(&c, &request, &store, &mut flights, at(2, NOW + 641));
    assert_eq!(continued_with(&d), format!("Bearer {renewed}"));
    assert!(
        !flights.arm(),
        "the new entry is far from its refresh point"
    );
}

#[wasm_bindgen_test(unsupported = test)]
fn a_refused_refresh_removes_the_entry_and_other_failures_leave_it_to_end_on_time() {
    let token = workload_token(NOW + 100_000);
    let denial = |status: i32| {
        CheckResponse {
            status: Some(Status {
                code: 7,
                message: String::new(),
                details: vec![],
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: status }),
                headers: vec![],
                body: "no".into(),
            })),
            dynamic_metadata: None,
        }
        .encode_to_vec()
    };
    // What came back (gRPC status, body), what it counts as, whether the entry stays.
    type Case = (&'static str, u32, Option<Vec<u8>>, Counter, bool);
    let cases: [Case; 6] = [
        (
            "403",
            0,
            Some(denial(403)),
            Counter::CacheRefreshDenied,
            false,
        ),
        (
            "401",
            0,
            Some(denial(401)),
            Counter::CacheRefreshDenied,
            false,
        ),
        (
            "429",
            0,
            Some(denial(429)),
            Counter::CacheRefreshErrors,
            true,
        ),
        (
            "503",
            0,
            Some(denial(503)),
            Counter::CacheRefreshErrors,
            true,
        ),
        ("deadline", 4, None, Counter::CacheRefreshErrors, true),
        (
            "nonsense",
            0,
            Some(b"\xff\xff".to_vec()),
            Counter::CacheRefreshErrors,
            true,
        ),
    ];
    for (what, grpc, body, counter, kept) in cases {
        let (c, store) = cached(&token);
        let request = headers(Some(&format!("Bearer {token}")));
        let mut flights = Flights::default();
        on_request(&c, &request, &store, &mut flights, at(1, NOW + 640));
        let (_, pending, _) = background(&mut flights);
        let counters = on_refresh_reply(&c, &pending, grpc, body.as_deref(), &store, NOW + 640);
        assert_eq!(counters, [counter], "{what}");
        let (next, _) = arrive(&c, &request, &store, NOW + 641);
        match next.step {
            Step::Continue(_) => assert!(kept, "{what}: the entry must be gone"),
            Step::Dispatch { .. } => assert!(!kept, "{what}: the entry must stay"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[wasm_bindgen_test(unsupported = test)]
fn concurrent_misses_for_one_token_send_one_check_and_share_its_verdict() {
    let c = config("");
    let store = MemoryStore::default();
    let token = workload_token(NOW + 3600);
    let request = headers(Some(&format!("Bearer {token}")));
    let mut flights = Flights::default();
    let (first, pending) = on_request(&c, &request, &store, &mut flights, at(1, NOW));
    assert!(matches!(first.step, Step::Dispatch { .. }), "{first:?}");
    for context in [2, 3] {
        let (d, waiting) = on_request(&c, &request, &store, &mut flights, at(context, NOW));
        assert_eq!(d.step, Step::Wait, "no second Check");
        assert_eq!(
            d.counters,
            [
                Counter::Requests,
                Counter::CacheMisses,
                Counter::CoalescedWaits
            ]
        );
        assert!(waiting.is_some());
    }
    // Another token is not held up by this one.
    let other = headers(Some(&format!("Bearer {}", workload_token(NOW + 3601))));
    let (d, _) = on_request(&c, &other, &store, &mut flights, at(4, NOW));
    assert!(matches!(d.step, Step::Dispatch { .. }), "{d:?}");

    let pending = pending.unwrap();
    let digest = *pending.digest().unwrap();
    let reply = ok_reply(&exchanged(NOW + 1800));
    let verdict = on_check_reply(&c, &pending, 0, Some(&reply), &store, NOW);
    assert_eq!(
        flights.settle(&digest, 2),
        [],
        "only the first request leads"
    );
    let waiters: Vec<u32> = flights
        .settle(&digest, 1)
        .iter()
        .map(|w| w.context)
        .collect();
    assert_eq!(waiters, [2, 3], "each gets the verdict: {verdict:?}");
    assert_eq!(flights.settle(&digest, 1), [], "settled once");
}

#[wasm_bindgen_test(unsupported = test)]
fn tokens_that_are_not_cached_are_not_coalesced_either() {
    let c = config("");
    let store = MemoryStore::default();
    let mut flights = Flights::default();
    for context in [1, 2] {
        let (d, _) = on_request(
            &c,
            &headers(Some("Basic abc")),
            &store,
            &mut flights,
            at(context, NOW),
        );
        assert!(matches!(d.step, Step::Dispatch { .. }), "{d:?}");
    }
}

thread_local! {
    static PEER_ASKED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// A peer source that counts how often it is asked.
fn counted_peer() -> Option<SocketAddr> {
    PEER_ASKED.with(|n| n.set(n.get() + 1));
    "10.0.0.7:5555".parse().ok()
}

#[wasm_bindgen_test(unsupported = test)]
fn a_hit_before_its_refresh_point_never_asks_the_host_for_the_peer() {
    let token = workload_token(NOW + 100_000);
    let (c, store) = cached(&token);
    let request = headers(Some(&format!("Bearer {token}")));
    let arrival = Arrival {
        peer: counted_peer,
        ..at(1, NOW + 1)
    };
    PEER_ASKED.with(|n| n.set(0));
    let (d, _) = on_request(&c, &request, &store, &mut Flights::default(), arrival);
    assert_eq!(
        d.counters,
        [Counter::Requests, Counter::CacheHits, Counter::Allowed]
    );
    assert_eq!(PEER_ASKED.with(|n| n.get()), 0, "a hit needs no peer");

    // A miss does: its Check carries the address.
    let other = workload_token(NOW + 200_000);
    let (d, _) = on_request(
        &c,
        &headers(Some(&format!("Bearer {other}"))),
        &store,
        &mut Flights::default(),
        arrival,
    );
    assert!(matches!(d.step, Step::Dispatch { .. }), "{:?}", d.step);
    assert_eq!(PEER_ASKED.with(|n| n.get()), 1);
}
