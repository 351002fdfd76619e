//! The per-request state machine, free of host calls: facts in, a `Step` (and the
//! counters to bump) out. The host layer carries the step out. What one worker has in
//! flight (coalesced misses, background refreshes) is one of the facts: `Flights`.

use std::{net::SocketAddr, time::Duration};

use crate::{
    bearer,
    cache::{self, Digest, Entry, SlotStore},
    check::{self, HeaderEdit, Verdict},
    claims,
    config::{Config, FailureMode, OnMissingToken},
    flights::{Check, Flights, Joined},
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
    /// Pause without a Check: another request on this worker asked for the same token,
    /// and its verdict is this request's too ([`Flights`] holds it as a waiter).
    Wait,
}

impl From<Check> for Step {
    fn from(check: Check) -> Step {
        Step::Dispatch {
            message: check.message,
            metadata: check.metadata,
            timeout: check.timeout,
        }
    }
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
    pub(crate) digest: Option<Digest>,
    pub(crate) workload_expiry: Option<u64>,
}

impl Pending {
    /// The digest of the presented token, when it can be cached (and so coalesced).
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }
}

/// Who asks, and when.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// The request's HTTP context.
    pub context: u32,
    /// Unix milliseconds now.
    pub now_ms: u64,
    /// Reads the downstream address, when the host tells it: the companion shares its
    /// TokenReview turns by it. Called only for a Check (a hit has no use for it, and
    /// the host call is a fair part of a hit's cost).
    pub peer: fn() -> Option<SocketAddr>,
}

/// The body the companion sends for these cases, so both paths answer alike.
const MISSING_TOKEN: &str = "missing bearer token";
const MALFORMED_TOKEN: &str = "malformed bearer token";
const UNAVAILABLE: &str = "identity service unavailable";

/// A request's headers have arrived. A cache hit continues at once (past the entry's
/// refresh point it also queues one background Check per token on this worker); a miss
/// dispatches a Check, or waits on the one another request on this worker sent for the
/// same token.
pub fn on_request(
    config: &Config,
    headers: &Headers,
    cache: &impl SlotStore,
    flights: &mut Flights,
    arrival: Arrival,
) -> (Decision, Option<Pending>) {
    let now = arrival.now_ms / 1000;
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
    // Read only when a Check needs it: a hit does not (plan/009, the filter's hit path).
    let pending = || Pending {
        digest,
        workload_expiry: token.and_then(claims::expiry),
    };
    if let Some(d) = &digest {
        if let Some(hit) = cache::lookup(cache, &config.cache, d, now) {
            counters.extend([Counter::CacheHits, Counter::Allowed]);
            if hit.refresh {
                flights.refresh(*d, arrival.now_ms, config.timeout, || {
                    let check = background_check(config, headers, credential, (arrival.peer)());
                    (pending(), check)
                });
            }
            let edits = vec![set_authorization(hit.value)];
            let step = Step::Continue(replace_credential(config, edits));
            return (Decision { step, counters }, None);
        }
        counters.push(Counter::CacheMisses);
    }
    let metadata = check::TRACE_HEADERS
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), headers.text(name)?.to_owned())))
        .collect();
    let check = Check {
        message: check::request(config, headers, credential, (arrival.peer)()),
        metadata,
        timeout: config.timeout,
    };
    let pending = pending();
    let step = match digest {
        Some(d) => match flights.join(d, arrival.context, arrival.now_ms, pending.clone(), check) {
            Joined::Lead(check) | Joined::Alone(check) => check.into(),
            Joined::Wait => {
                counters.push(Counter::CoalescedWaits);
                Step::Wait
            }
        },
        None => check.into(),
    };
    (Decision { step, counters }, Some(pending))
}

/// The Check that refreshes a cached entry in the background. It belongs to no client
/// request, so it carries no request id and no trace context: the request that noticed
/// the refresh point is over long before the answer, and a trace or the companion's
/// decision line would name a request that never waited for it. The peer address stays:
/// the companion shares TokenReview turns by it, a Check without one would go ahead of
/// every client past its share, and the client whose traffic keeps this identity hot is
/// the one whose share should pay for keeping it so.
fn background_check(
    config: &Config,
    headers: &Headers,
    credential: &str,
    peer: Option<SocketAddr>,
) -> Check {
    let untraced = headers.without(check::TRACE_HEADERS);
    Check {
        message: check::request(config, &untraced, credential, peer),
        metadata: Vec::new(),
        timeout: config.timeout,
    }
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
    let Some(verdict) = answered(grpc_status, body) else {
        return on_dispatch_failure(config);
    };
    match verdict {
        Verdict::Deny {
            status,
            headers,
            body,
        } => Decision {
            step: Step::Respond {
                status,
                headers,
                body,
            },
            counters: vec![Counter::Denied],
        },
        Verdict::Allow { edits, reuse } => {
            remember(config, pending, &edits, reuse, cache, now);
            Decision {
                step: Step::Continue(replace_credential(config, edits)),
                counters: vec![Counter::Allowed],
            }
        }
    }
}

/// The verdict in a reply: `None` for a gRPC failure or a body that does not decode.
fn answered(grpc_status: u32, body: Option<&[u8]>) -> Option<Verdict> {
    match (grpc_status, body) {
        (0, Some(body)) => check::verdict(body).ok(),
        _ => None,
    }
}

/// A background refresh came back (`grpc_status` 0 with `body`, or a gRPC failure): the
/// counters to bump. An allow replaces the entry (compare-and-swap, as every write); a
/// 401 or 403 removes it, so the next request is checked again and a revocation shows; any
/// other answer (a companion 429 or 503, a timeout, nonsense) leaves the entry to end on
/// time: an outage of the companion must not empty the cache of identities it still
/// serves.
pub fn on_refresh_reply(
    config: &Config,
    pending: &Pending,
    grpc_status: u32,
    body: Option<&[u8]>,
    cache: &impl SlotStore,
    now: u64,
) -> Vec<Counter> {
    let Some(verdict) = answered(grpc_status, body) else {
        return vec![Counter::CacheRefreshErrors];
    };
    match verdict {
        Verdict::Allow { edits, reuse } => {
            remember(config, pending, &edits, reuse, cache, now);
            Vec::new()
        }
        Verdict::Deny {
            status: 401 | 403, ..
        } => {
            if let Some(digest) = &pending.digest {
                // A lost race leaves an entry someone wrote since: theirs to answer for.
                let _ = cache::remove(cache, &config.cache, digest);
            }
            vec![Counter::CacheRefreshDenied]
        }
        Verdict::Deny { .. } => vec![Counter::CacheRefreshErrors],
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
    let window = config.cache.refresh_before_expiry.as_secs();
    let entry = Entry {
        digest,
        workload_expiry: pending.workload_expiry,
        expiry,
        not_after: now.saturating_add(age),
        refresh_at: cache::refresh_at(now, age, expiry, window),
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
