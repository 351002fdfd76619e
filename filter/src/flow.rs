//! The per-request state machine, free of host calls: facts in, a `Step` (and the
//! counters to bump) out. The host layer carries the step out.

use std::{net::SocketAddr, time::Duration};

use crate::{
    bearer,
    cache::{self, Digest, Entry, SlotStore},
    check::{self, HeaderEdit, Verdict},
    claims,
    config::{Config, FailureMode, OnMissingToken},
    headers::Headers,
    hosts,
    metrics::Counter,
};

/// What the host should do next with the request it is holding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Forward upstream after applying these header edits, in order.
    Continue(Vec<HeaderEdit>),
    /// Answer the client; the upstream never sees the request.
    Respond {
        /// HTTP status.
        status: u32,
        /// Response headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: String,
    },
    /// Ask the companion, then pause until [`on_check_reply`].
    Dispatch {
        /// The encoded CheckRequest.
        message: Vec<u8>,
        /// gRPC initial metadata (request id and trace headers).
        metadata: Vec<(String, String)>,
        /// Call deadline.
        timeout: Duration,
    },
}

/// A step and the counters it accounts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What to do.
    pub step: Step,
    /// What to count.
    pub counters: Vec<Counter>,
}

/// What a paused request remembers until the companion answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    digest: Option<Digest>,
    workload_expiry: Option<u64>,
}

/// The body the companion sends for these cases, so both paths answer alike.
const MISSING_TOKEN: &str = "missing bearer token";
const MALFORMED_TOKEN: &str = "malformed bearer token";
const UNAVAILABLE: &str = "identity service unavailable";

/// A request's headers have arrived (`now`: Unix seconds) from `peer` (the downstream
/// address, when the host tells it: the companion shares its TokenReview turns by it).
pub fn on_request(
    config: &Config,
    headers: &Headers,
    cache: &impl SlotStore,
    now: u64,
    peer: Option<SocketAddr>,
) -> (Decision, Option<Pending>) {
    let mut counters = vec![Counter::Requests];
    if let Some(patterns) = &config.hosts
        && !hosts::in_scope(patterns, headers.values(":authority").next())
    {
        // Another application's request: its credential is not ours to read.
        counters.push(Counter::OtherHost);
        return (
            Decision {
                step: Step::Continue(Vec::new()),
                counters,
            },
            None,
        );
    }
    let mut values = headers.values(&config.header);
    let credential = match (values.next(), values.next()) {
        (None, _) => {
            let step = match config.on_missing_token {
                OnMissingToken::Allow => Step::Continue(Vec::new()),
                OnMissingToken::Deny => {
                    counters.push(Counter::Denied);
                    text_response(401, MISSING_TOKEN, Some("Bearer"))
                }
            };
            return (Decision { step, counters }, None);
        }
        // Two credentials, or one that is not UTF-8: malformed, as the companion says of
        // the same requests through ext_authz.
        (Some(_), Some(_)) => None,
        (Some(value), None) => std::str::from_utf8(value).ok(),
    };
    let Some(credential) = credential else {
        counters.push(Counter::Denied);
        let challenge = Some("Bearer error=\"invalid_token\"");
        let step = text_response(401, MALFORMED_TOKEN, challenge);
        return (Decision { step, counters }, None);
    };
    let token = bearer::token(credential);
    let digest = token.filter(|_| config.cache.enabled).map(cache::digest);
    if let Some(d) = &digest {
        if let Some(value) = cache::lookup(cache, &config.cache, d, now) {
            counters.extend([Counter::CacheHits, Counter::Allowed]);
            let step = Step::Continue(replace_credential(config, vec![set_authorization(value)]));
            return (Decision { step, counters }, None);
        }
        counters.push(Counter::CacheMisses);
    }
    let metadata = check::TRACE_HEADERS
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), headers.text(name)?.to_owned())))
        .collect();
    let step = Step::Dispatch {
        message: check::request(config, headers, credential, peer),
        metadata,
        timeout: config.timeout,
    };
    let pending = Pending {
        digest,
        workload_expiry: token.and_then(claims::expiry),
    };
    (Decision { step, counters }, Some(pending))
}

/// The companion answered: `grpc_status` 0 with `body`, or a gRPC failure (`now`: Unix
/// seconds).
pub fn on_check_reply(
    config: &Config,
    pending: &Pending,
    grpc_status: u32,
    body: Option<&[u8]>,
    cache: &impl SlotStore,
    now: u64,
) -> Decision {
    let verdict = match (grpc_status, body) {
        (0, Some(body)) => check::verdict(body),
        _ => return on_dispatch_failure(config),
    };
    match verdict {
        Ok(Verdict::Deny {
            status,
            headers,
            body,
        }) => Decision {
            step: Step::Respond {
                status,
                headers,
                body,
            },
            counters: vec![Counter::Denied],
        },
        Ok(Verdict::Allow { edits, reuse }) => {
            remember(config, pending, &edits, reuse, cache, now);
            Decision {
                step: Step::Continue(replace_credential(config, edits)),
                counters: vec![Counter::Allowed],
            }
        }
        Err(_) => on_dispatch_failure(config),
    }
}

/// The companion could not be asked (dispatch failed, timeout, gRPC error, nonsense).
pub fn on_dispatch_failure(config: &Config) -> Decision {
    let step = match config.failure_mode {
        FailureMode::Deny => text_response(503, UNAVAILABLE, None),
        // Unauthenticated, never with the workload token.
        FailureMode::Allow => Step::Continue(vec![HeaderEdit::Remove(config.header.clone())]),
    };
    Decision {
        step,
        counters: vec![Counter::Errors],
    }
}

/// The host refused a header edit the decision needs: 503, whatever `failure_mode`
/// says, since the request cannot be forwarded as decided.
pub fn on_host_failure() -> Decision {
    Decision {
        step: text_response(503, UNAVAILABLE, None),
        counters: vec![Counter::Errors],
    }
}

fn set_authorization(value: String) -> HeaderEdit {
    HeaderEdit::Set("authorization".to_owned(), value)
}

/// Unless an edit already replaces the credential header, remove it first: the workload
/// token must never reach the upstream.
fn replace_credential(config: &Config, mut edits: Vec<HeaderEdit>) -> Vec<HeaderEdit> {
    let replaced = edits.iter().any(|e| match e {
        HeaderEdit::Set(name, _) | HeaderEdit::SetIfPresent(name, _) | HeaderEdit::Remove(name) => {
            *name == config.header
        }
        HeaderEdit::Add(..) | HeaderEdit::SetIfAbsent(..) => false,
    });
    if !replaced {
        edits.insert(0, HeaderEdit::Remove(config.header.clone()));
    }
    edits
}

/// Caches an allow that is exactly "set authorization to a bearer token with an expiry"
/// (what the companion answers) for at most `cache.max_age` and never longer than the
/// companion's `reuse` limit; anything richer is not replayed from the cache.
fn remember(
    config: &Config,
    pending: &Pending,
    edits: &[HeaderEdit],
    reuse: Option<Duration>,
    cache: &impl SlotStore,
    now: u64,
) {
    let (Some(digest), [HeaderEdit::Set(name, value)]) = (pending.digest, edits) else {
        return;
    };
    if name != "authorization" {
        return;
    }
    let Some(expiry) = bearer::token(value).and_then(claims::expiry) else {
        return;
    };
    let age = reuse
        .map_or(config.cache.max_age, |r| r.min(config.cache.max_age))
        .as_secs();
    if age == 0 {
        return;
    }
    let entry = Entry {
        digest,
        workload_expiry: pending.workload_expiry,
        expiry,
        not_after: now.saturating_add(age),
        value: value.clone(),
    };
    // A lost race or a full host is not the request's problem: it is allowed either way.
    let _ = cache::insert(cache, &config.cache, &entry, now);
}

fn text_response(status: u32, body: &str, challenge: Option<&str>) -> Step {
    let mut headers = vec![(
        "content-type".to_owned(),
        "text/plain; charset=utf-8".to_owned(),
    )];
    if let Some(c) = challenge {
        headers.push(("www-authenticate".to_owned(), c.to_owned()));
    }
    Step::Respond {
        status,
        headers,
        body: body.to_owned(),
    }
}

#[cfg(test)]
mod tests;
