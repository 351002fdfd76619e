//! Request handling: read the body, authenticate, play faults, authorise, answer, log.
//! Every path reads the whole request body first: an unread body poisons the keep-alive
//! connection for the next request.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header, request::Parts};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    Caller, Endpoint, RETRY_AFTER_SECONDS, ServiceAccount, Shared, Status, TokenBuilder,
    TokenRequestSpec, TokenReviewSpec,
    calls::{Call, lock},
    objects, protobuf, tokens, watch,
};

/// kube-apiserver's request body limit (3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

type Reply = Response<BoxBody<Bytes, Infallible>>;

/// Who is calling, from the `Authorization` header.
enum Credential {
    Anonymous,
    Caller(Caller),
    Invalid,
}

/// Serves one request and records it in the call log.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Reply, Infallible> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let endpoint = match Endpoint::classify(&path) {
        Endpoint::ListServiceAccounts
            if query(&parts, "watch").is_some_and(|w| w == "true" || w == "1") =>
        {
            Endpoint::WatchServiceAccounts
        }
        endpoint => endpoint,
    };
    shared.calls.arrive(endpoint);
    let mut call = Call::new(endpoint, &parts.method, &path);
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(|collected| collected.to_bytes());

    let reply = respond(&shared, &parts, endpoint, body, &mut call).await;
    call.status = reply.status().as_u16();
    tracing::info!(
        cluster = %shared.name,
        endpoint = ?endpoint,
        method = %parts.method,
        path = %path,
        status = call.status,
        caller = call.caller.as_deref().unwrap_or("-"),
        "request served"
    );
    shared.calls.push(call);
    Ok(reply)
}

async fn respond(
    shared: &Shared,
    parts: &Parts,
    endpoint: Endpoint,
    body: Result<Bytes, Box<dyn std::error::Error + Send + Sync>>,
    call: &mut Call,
) -> Reply {
    let credential = credential(shared, &parts.headers);
    if let Credential::Caller(caller) = &credential {
        call.caller = Some(caller.name.clone());
    }

    let plan = shared.faults.plan(endpoint);
    if let Some(delay) = plan.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(code) = plan.status {
        return fault(code);
    }
    if let Some((code, body)) = plan.body {
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        return reply(code, "application/json", body.into_bytes());
    }

    let body = match body {
        Ok(body) => body,
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return status(Status::too_large());
        }
        Err(error) => {
            return status(Status::bad_request(format!(
                "reading the request body: {error}"
            )));
        }
    };
    let caller = match credential {
        Credential::Invalid => return status(Status::unauthorized()),
        Credential::Anonymous
            if endpoint.is_issuer_discovery()
                && !lock(&shared.store).anonymous_issuer_discovery =>
        {
            return status(Status::forbidden_path(
                "system:anonymous",
                "get",
                parts.uri.path(),
            ));
        }
        Credential::Anonymous if !endpoint.is_public() && !endpoint.is_issuer_discovery() => {
            return status(Status::unauthorized());
        }
        Credential::Anonymous => None,
        Credential::Caller(caller) => Some(caller),
    };

    let path = parts.uri.path();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // `Endpoint::classify` matched the path's shape, so these segments exist.
    let segment = |i: usize| segments.get(i).copied().unwrap_or_default();
    let method = &parts.method;
    let expect = |wanted: Method| {
        (method != wanted).then(|| status(Status::method_not_allowed(method.as_str())))
    };
    match endpoint {
        Endpoint::TokenReview => {
            if let Some(reply) = expect(Method::POST) {
                return reply;
            }
            token_review(shared, caller.as_ref(), &parts.headers, &body, call)
        }
        Endpoint::TokenRequest => {
            if let Some(reply) = expect(Method::POST) {
                return reply;
            }
            let (namespace, name) = (segment(3), segment(5));
            token_request(
                shared,
                caller.as_ref(),
                &parts.headers,
                &body,
                namespace,
                name,
                call,
            )
        }
        Endpoint::GetServiceAccount => {
            if let Some(reply) = expect(Method::GET) {
                return reply;
            }
            get_service_account(
                shared,
                caller.as_ref(),
                &parts.headers,
                segment(3),
                segment(5),
            )
        }
        Endpoint::SelfSubjectAccessReview => {
            if let Some(reply) = expect(Method::POST) {
                return reply;
            }
            self_subject_access_review(shared, caller.as_ref(), &body)
        }
        Endpoint::GetSecret => {
            if let Some(reply) = expect(Method::GET) {
                return reply;
            }
            get_secret(shared, caller.as_ref(), segment(3), segment(5))
        }
        Endpoint::GetNamespace => {
            if let Some(reply) = expect(Method::GET) {
                return reply;
            }
            get_namespace(shared, caller.as_ref(), &parts.headers, segment(3))
        }
        Endpoint::ListServiceAccounts | Endpoint::WatchServiceAccounts => {
            if let Some(reply) = expect(Method::GET) {
                return reply;
            }
            service_accounts(shared, caller.as_ref(), parts, endpoint)
        }
        Endpoint::Version => json_reply(StatusCode::OK, &objects::version()),
        Endpoint::Healthz | Endpoint::Readyz | Endpoint::Livez => text(StatusCode::OK, "ok"),
        Endpoint::Discovery => match objects::discovery(path, &shared.addr.to_string()) {
            Some(document) => json_reply(StatusCode::OK, &document),
            None => status(Status::no_route()),
        },
        Endpoint::OpenIdConfiguration => json_reply(
            StatusCode::OK,
            &objects::openid_configuration(
                &shared.authority.issuer,
                &shared.url,
                &shared.authority.algorithms(),
            ),
        ),
        Endpoint::Jwks => {
            let mut reply = json_reply(StatusCode::OK, &shared.authority.jwks());
            reply.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/jwk-set+json"),
            );
            reply
        }
        Endpoint::Other => status(Status::no_route()),
    }
}

fn credential(shared: &Shared, headers: &HeaderMap) -> Credential {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Credential::Anonymous;
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty());
    match token.and_then(|token| shared.caller(token)) {
        Some(caller) => Credential::Caller(caller),
        None => Credential::Invalid,
    }
}

fn token_review(
    shared: &Shared,
    caller: Option<&Caller>,
    headers: &HeaderMap,
    body: &Bytes,
    call: &mut Call,
) -> Reply {
    let Some(caller) = caller else {
        return status(Status::unauthorized());
    };
    if !caller.rights.token_review {
        return status(Status::forbidden_cluster(
            &caller.name,
            "create",
            "tokenreviews",
            "authentication.k8s.io",
        ));
    }
    if let Some(reply) = require_json(headers) {
        return reply;
    }
    let review: Value = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return status(Status::bad_request(format!(
                "unable to decode TokenReview: {error}"
            )));
        }
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let audiences = strings(&review["spec"]["audiences"]);
    call.token_review = Some(TokenReviewSpec {
        audiences: audiences.clone(),
    });
    if token.is_empty() {
        return status(Status::bad_request(
            "token is required for TokenReview in authentication".to_owned(),
        ));
    }

    let outcome = {
        let store = lock(&shared.store);
        shared.authority.authenticate(token, &audiences, &*store)
    };
    // Real `status` is all omitempty: a rejection has no `authenticated` key at all.
    let review_status = match outcome {
        Ok(ok) => {
            let mut user = json!({"username": ok.user.username, "groups": ok.user.groups});
            if let Some(uid) = ok.user.uid {
                user["uid"] = json!(uid);
            }
            if !ok.user.extra.is_empty() {
                user["extra"] = json!(ok.user.extra);
            }
            json!({"authenticated": true, "user": user, "audiences": ok.audiences})
        }
        Err(rejection) => json!({"user": {}, "error": rejection.0}),
    };
    let mut spec = json!({"token": token});
    if !audiences.is_empty() {
        spec["audiences"] = json!(audiences);
    }
    json_reply(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": review_status,
        }),
    )
}

fn token_request(
    shared: &Shared,
    caller: Option<&Caller>,
    headers: &HeaderMap,
    body: &Bytes,
    namespace: &str,
    name: &str,
    call: &mut Call,
) -> Reply {
    let Some(caller) = caller else {
        return status(Status::unauthorized());
    };
    if !caller.rights.token_request {
        return status(Status::forbidden_named(
            &caller.name,
            "create",
            "serviceaccounts",
            Some("token"),
            name,
            Some(namespace),
        ));
    }
    let content_type = content_type(headers);
    let spec = if content_type == protobuf::CONTENT_TYPE {
        match protobuf::decode_token_request(body) {
            Ok(spec) => spec,
            Err(error) => return status(Status::bad_request(error.to_string())),
        }
    } else if content_type.is_empty() || content_type == "application/json" {
        match serde_json::from_slice::<Value>(body) {
            Ok(request) => TokenRequestSpec {
                audiences: strings(&request["spec"]["audiences"]),
                expiration_seconds: request["spec"]["expirationSeconds"].as_i64(),
                bound_object: request["spec"]["boundObjectRef"]["name"]
                    .as_str()
                    .map(|object| {
                        let kind = request["spec"]["boundObjectRef"]["kind"]
                            .as_str()
                            .unwrap_or_default();
                        (kind.to_owned(), object.to_owned())
                    }),
            },
            Err(error) => {
                return status(Status::bad_request(format!(
                    "unable to decode TokenRequest: {error}"
                )));
            }
        }
    } else {
        return status(Status::unsupported_media_type(&content_type));
    };
    call.token_request = Some(spec.clone());

    let Some(uid) = lock(&shared.store).service_account_uid(namespace, name) else {
        return status(Status::not_found("serviceaccounts", name));
    };
    let audiences = if spec.audiences.is_empty() {
        shared.authority.api_audiences.clone()
    } else {
        spec.audiences.clone()
    };
    let requested = spec
        .expiration_seconds
        .unwrap_or(tokens::DEFAULT_LIFETIME.as_secs() as i64);
    if requested < 600 {
        return status(Status::invalid_expiration(
            requested,
            "may not specify a duration less than 10 minutes",
        ));
    }
    if requested > 1 << 32 {
        return status(Status::invalid_expiration(
            requested,
            "may not specify a duration larger than 2^32 seconds",
        ));
    }
    let mut warning = None;
    let seconds = match shared.max_token_expiration {
        Some(max) if requested > max => {
            warning = Some(format!(
                "requested expiration of {requested} seconds shortened to {max} seconds"
            ));
            max
        }
        _ => requested,
    };

    let now = std::time::SystemTime::now();
    let sa = ServiceAccount {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        uid,
    };
    let mut builder = TokenBuilder::new(shared.authority.clone(), sa)
        .issued_at(now)
        .expiring_in(Duration::from_secs(seconds as u64))
        .audiences(audiences.clone());
    if let Some((kind, object)) = &spec.bound_object
        && kind == "Pod"
    {
        builder = builder.bound_to_pod(object, &tokens::uuid_v4());
    }
    let token = builder.sign();
    crate::leak_audit::register_minted(&token);
    let bound = spec
        .bound_object
        .as_ref()
        .map(|(kind, object)| json!({"kind": kind, "apiVersion": "v1", "name": object}));
    let mut reply = json_reply(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": objects::timestamp(now)},
            "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": bound},
            "status": {
                "token": token,
                "expirationTimestamp": objects::timestamp(now + Duration::from_secs(seconds as u64)),
            },
        }),
    );
    if let Some(text) = warning
        && let Ok(value) = HeaderValue::from_str(&format!("299 - \"{text}\""))
    {
        reply.headers_mut().insert(header::WARNING, value);
    }
    reply
}

fn get_service_account(
    shared: &Shared,
    caller: Option<&Caller>,
    headers: &HeaderMap,
    namespace: &str,
    name: &str,
) -> Reply {
    let Some(caller) = caller else {
        return status(Status::unauthorized());
    };
    if !caller.rights.read {
        return status(Status::forbidden_named(
            &caller.name,
            "get",
            "serviceaccounts",
            None,
            name,
            Some(namespace),
        ));
    }
    let meta = lock(&shared.store)
        .service_accounts
        .get(&(namespace.to_owned(), name.to_owned()))
        .cloned();
    match meta {
        None => status(Status::not_found("serviceaccounts", name)),
        Some(meta) if objects::wants_table(&accept(headers)) => json_reply(
            StatusCode::OK,
            &objects::service_account_table(namespace, name, &meta),
        ),
        Some(meta) => json_reply(
            StatusCode::OK,
            &objects::service_account(namespace, name, &meta),
        ),
    }
}

/// Whether the caller may do what `spec.resourceAttributes` says, by the same rights
/// the other endpoints enforce.
fn self_subject_access_review(shared: &Shared, caller: Option<&Caller>, body: &Bytes) -> Reply {
    let Some(caller) = caller else {
        return status(Status::unauthorized());
    };
    let mut review: Value = match serde_json::from_slice(body) {
        Ok(review) => review,
        Err(error) => {
            return status(Status::bad_request(format!(
                "unable to decode SelfSubjectAccessReview: {error}"
            )));
        }
    };
    let attributes = &review["spec"]["resourceAttributes"];
    let text = |key: &str| attributes[key].as_str().unwrap_or_default().to_owned();
    let (group, resource, subresource, verb, namespace) = (
        text("group"),
        text("resource"),
        text("subresource"),
        text("verb"),
        text("namespace"),
    );
    let rights = caller.rights;
    let allowed = match (
        group.as_str(),
        resource.as_str(),
        subresource.as_str(),
        verb.as_str(),
    ) {
        ("authentication.k8s.io", "tokenreviews", "", "create") => rights.token_review,
        ("", "serviceaccounts", "token", "create") => rights.token_request,
        ("", "serviceaccounts", "", "list" | "watch") => rights.list_service_accounts,
        ("", "serviceaccounts" | "namespaces", "", "get") => rights.read,
        ("", "secrets", "", "get") => {
            rights == super::Rights::ALL
                || lock(&shared.store)
                    .secret_readers
                    .contains(&(caller.name.clone(), namespace.clone()))
        }
        _ => rights == super::Rights::ALL,
    };
    review["status"] = json!({"allowed": allowed});
    if !allowed {
        review["status"]["reason"] = json!("no RBAC rule allows it");
    }
    review["metadata"] = json!({"creationTimestamp": null});
    json_reply(StatusCode::CREATED, &review)
}

/// A Secret, for callers with `get secrets` in its namespace (or everything).
fn get_secret(shared: &Shared, caller: Option<&Caller>, namespace: &str, name: &str) -> Reply {
    let Some(caller) = caller else {
        return status(Status::unauthorized());
    };
    let store = lock(&shared.store);
    let allowed = caller.rights == super::Rights::ALL
        || store
            .secret_readers
            .contains(&(caller.name.clone(), namespace.to_owned()));
    if !allowed {
        return status(Status::forbidden_named(
            &caller.name,
            "get",
            "secrets",
            None,
            name,
            Some(namespace),
        ));
    }
    match store.secrets.get(&(namespace.to_owned(), name.to_owned())) {
        None => status(Status::not_found("secrets", name)),
        Some((meta, data)) => json_reply(
            StatusCode::OK,
            &objects::secret(namespace, name, meta, data),
        ),
    }
}

/// LIST or WATCH of service accounts across namespaces.
fn service_accounts(
    shared: &Shared,
    caller: Option<&Caller>,
    parts: &Parts,
    endpoint: Endpoint,
) -> Reply {
    let Some(caller) = caller else {
        return status(Status::unauthorized());
    };
    let verb = if endpoint == Endpoint::WatchServiceAccounts {
        "watch"
    } else {
        "list"
    };
    if !caller.rights.list_service_accounts {
        return status(Status::forbidden_cluster(
            &caller.name,
            verb,
            "serviceaccounts",
            "",
        ));
    }
    let selector = match watch::Selector::parse(&query(parts, "labelSelector").unwrap_or_default())
    {
        Ok(selector) => selector,
        Err(message) => return status(Status::bad_request(message)),
    };
    let store = lock(&shared.store);
    if endpoint == Endpoint::ListServiceAccounts {
        return json_reply(
            StatusCode::OK,
            &watch::list(
                store.service_accounts.iter(),
                &selector,
                store.resource_version,
            ),
        );
    }
    let current = store.resource_version;
    let version = match query(parts, "resourceVersion").as_deref() {
        None | Some("" | "0") => current,
        Some(text) => match text.parse::<u64>() {
            Ok(version) => version,
            Err(_) => {
                return status(Status::bad_request(format!(
                    "invalid resource version: {text:?}"
                )));
            }
        },
    };
    let timeout = query(parts, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let frames = watch::start(&store.changes, version, current, selector, timeout);
    drop(store);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(frames));
    let mut reply = Response::new(BodyExt::boxed(body));
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    reply
}

/// A query parameter, percent-decoded.
fn query(parts: &Parts, name: &str) -> Option<String> {
    let query = parts.uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn get_namespace(
    shared: &Shared,
    caller: Option<&Caller>,
    headers: &HeaderMap,
    name: &str,
) -> Reply {
    let Some(caller) = caller else {
        return status(Status::unauthorized());
    };
    if !caller.rights.read {
        return status(Status::forbidden_named(
            &caller.name,
            "get",
            "namespaces",
            None,
            name,
            None,
        ));
    }
    let meta = lock(&shared.store).namespaces.get(name).cloned();
    match meta {
        None => status(Status::not_found("namespaces", name)),
        Some(meta) if objects::wants_table(&accept(headers)) => {
            json_reply(StatusCode::OK, &objects::namespace_table(name, &meta))
        }
        Some(meta) => json_reply(StatusCode::OK, &objects::namespace(name, &meta)),
    }
}

/// TokenReview accepts JSON only here (kube clients send JSON; kubectl never reviews).
fn require_json(headers: &HeaderMap) -> Option<Reply> {
    let content_type = content_type(headers);
    (!content_type.is_empty() && content_type != "application/json")
        .then(|| status(Status::unsupported_media_type(&content_type)))
}

/// The media type without parameters, lower case; empty when absent.
fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default()
}

fn accept(headers: &HeaderMap) -> String {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn fault(code: u16) -> Reply {
    let mut reply = status(Status::for_code(code));
    if code == 429 {
        reply
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    }
    reply
}

fn status(body: Status) -> Reply {
    let code = StatusCode::from_u16(body.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_reply(code, &body)
}

fn json_reply(code: StatusCode, body: &impl Serialize) -> Reply {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    reply(code, "application/json", bytes)
}

fn text(code: StatusCode, body: &'static str) -> Reply {
    reply(code, "text/plain; charset=utf-8", body.as_bytes().to_vec())
}

fn reply(code: StatusCode, content_type: &'static str, body: Vec<u8>) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body)).boxed());
    *reply.status_mut() = code;
    let headers = reply.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache, private"),
    );
    if let Ok(audit_id) = HeaderValue::from_str(&tokens::uuid_v4()) {
        headers.insert("audit-id", audit_id);
    }
    reply
}
