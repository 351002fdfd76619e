//! One request: gather the headers, ask `flow`, carry out its `Step`; and the pieces the
//! root shares to send a Check and to answer a request paused in another context.

use std::{net::SocketAddr, rc::Rc, time::Duration};

use proxy_wasm::{
    hostcalls,
    traits::{Context, HttpContext},
    types::{Action, Status},
};

use super::{
    abi::{self, Buffer, Level},
    log, now, now_ms,
    root::Plugin,
};
use crate::{
    cache::Digest,
    check::{self, HeaderEdit},
    flights::Check,
    flow::{self, Arrival, Decision, Pending, Step},
    headers::{self, Headers},
};

/// The HTTP context of one request.
pub(super) struct RequestContext {
    id: u32,
    plugin: Rc<Plugin>,
    /// The gRPC call we wait for, and what the request remembers meanwhile.
    pending: Option<(u32, Pending)>,
    /// The token whose Check, sent by another request, this one waits on.
    waiting: Option<Digest>,
}

impl RequestContext {
    pub(super) fn new(id: u32, plugin: Rc<Plugin>) -> Self {
        Self {
            id,
            plugin,
            pending: None,
            waiting: None,
        }
    }

    /// Carries out a decision; returns what the headers callback should answer.
    fn perform(&mut self, decision: Decision, pending: Option<Pending>) -> Action {
        match decision.step {
            Step::Dispatch {
                message,
                metadata,
                timeout,
            } => {
                self.plugin.metrics.bump(&decision.counters);
                let check = Check {
                    message,
                    metadata,
                    timeout,
                };
                match dispatch(&self.plugin, &check) {
                    Ok(token) => {
                        self.pending = pending.map(|p| (token, p));
                        Action::Pause
                    }
                    Err(status) => {
                        // Nothing is paused yet: answer now (and give up the lead).
                        log(
                            Level::Error,
                            self.id,
                            &format!("cannot call the companion ({status:?})"),
                        );
                        let failure = flow::on_dispatch_failure(&self.plugin.config);
                        let waiters = pending
                            .as_ref()
                            .and_then(Pending::digest)
                            .map(|d| self.plugin.flights.borrow_mut().settle(d, self.id))
                            .unwrap_or_default();
                        for waiter in waiters {
                            answer(&self.plugin, waiter.context, failure.clone());
                        }
                        finish(&self.plugin, self.id, failure)
                    }
                }
            }
            Step::Wait => {
                self.plugin.metrics.bump(&decision.counters);
                self.waiting = pending.as_ref().and_then(Pending::digest).copied();
                Action::Pause
            }
            Step::Continue(_) | Step::Respond { .. } => finish(&self.plugin, self.id, decision),
        }
    }
}

impl Context for RequestContext {
    fn on_grpc_call_response(&mut self, token: u32, status: u32, size: usize) {
        let Some((expected, pending)) = self.pending.take() else {
            return;
        };
        if expected != token {
            self.pending = Some((expected, pending));
            return;
        }
        let body = reply_body(self.id, status, size);
        let plugin = self.plugin.clone();
        let decision = flow::on_check_reply(
            &plugin.config,
            &pending,
            status,
            body.as_deref(),
            &plugin.cache,
            now(),
        );
        let waiters = pending
            .digest()
            .map(|d| plugin.flights.borrow_mut().settle(d, self.id))
            .unwrap_or_default();
        // Our own request first, while it is the effective context; then each waiter,
        // in its own context, with the same verdict and its own edits or answer.
        if finish(&plugin, self.id, decision.clone()) == Action::Continue
            && let Err(e) = abi::resume_request()
        {
            log(Level::Error, self.id, &format!("cannot resume ({e:?})"));
        }
        for waiter in waiters {
            answer(&plugin, waiter.context, decision.clone());
        }
    }

    fn on_done(&mut self) -> bool {
        {
            let mut flights = self.plugin.flights.borrow_mut();
            // Gone before its Check was answered: the SDK drops that reply, so the root
            // asks again for whoever waits on it.
            if let Some((_, pending)) = self.pending.take()
                && let Some(digest) = pending.digest()
            {
                flights.abandon(digest, self.id);
            }
            if let Some(digest) = self.waiting.take() {
                flights.leave(&digest, self.id);
            }
        }
        self.plugin.wake_root();
        true
    }
}

impl HttpContext for RequestContext {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let headers = abi::request_header_pairs()
            .ok()
            .and_then(|bytes| Headers::decode(&bytes));
        let Some(headers) = headers else {
            // No headers to decide on: the companion could not be asked either.
            log(Level::Error, self.id, "cannot read the request headers");
            let failure = flow::on_dispatch_failure(&self.plugin.config);
            return self.perform(failure, None);
        };
        let plugin = self.plugin.clone();
        let arrival = Arrival {
            context: self.id,
            now_ms: now_ms(),
            peer,
        };
        let (decision, pending) = {
            let mut flights = plugin.flights.borrow_mut();
            flow::on_request(
                &plugin.config,
                &headers,
                &plugin.cache,
                &mut flights,
                arrival,
            )
        };
        plugin.wake_root();
        self.perform(decision, pending)
    }
}

/// The downstream address: Envoy's `source.address` property, "ip:port" text (brackets
/// for IPv6).
fn peer() -> Option<SocketAddr> {
    abi::property(&["source", "address"])
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|text| text.parse().ok())
}

/// Sends `check` to the companion; the reply goes to the context running now (the SDK
/// records it so), whatever context is effective.
pub(super) fn dispatch(plugin: &Plugin, check: &Check) -> Result<u32, Status> {
    let metadata: Vec<(&str, &[u8])> = check
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()))
        .collect();
    // The SDK's call, as it must register the callout; it returns an error for every
    // status Envoy gives for a GrpcService argument.
    hostcalls::dispatch_grpc_call(
        &plugin.upstream,
        check::SERVICE,
        check::METHOD,
        metadata,
        Some(&check.message),
        check.timeout.max(Duration::from_millis(1)),
    )
}

/// The body of the gRPC reply being handled (`None` for a failed call, which is logged
/// for context `id`).
pub(super) fn reply_body(id: u32, status: u32, size: usize) -> Option<Vec<u8>> {
    if status == 0 {
        return abi::buffer(Buffer::GrpcReceive, size);
    }
    let message = abi::grpc_message().unwrap_or_default();
    log(
        Level::Warn,
        id,
        &format!(
            "companion call failed: gRPC {status} {}",
            String::from_utf8_lossy(&message)
        ),
    );
    None
}

/// Carries out `decision` for the request paused in `context`, from another context's
/// callback: makes it the effective context, then continues or answers it. A request
/// that is gone by now needs nothing.
pub(super) fn answer(plugin: &Plugin, context: u32, decision: Decision) {
    if abi::set_effective_context(context).is_err() {
        log(Level::Info, context, "request went away before its answer");
        return;
    }
    if finish(plugin, context, decision) == Action::Continue
        && let Err(e) = abi::resume_request()
    {
        log(Level::Error, context, &format!("cannot resume ({e:?})"));
    }
}

/// Carries out a final decision (continue or answer) on the effective context `id`.
fn finish(plugin: &Plugin, id: u32, decision: Decision) -> Action {
    plugin.metrics.bump(&decision.counters);
    match decision.step {
        Step::Continue(edits) => match apply(&edits) {
            Ok(()) => Action::Continue,
            Err((name, e)) => {
                // A credential left in place must not go upstream: refuse instead.
                log(
                    Level::Error,
                    id,
                    &format!("cannot edit header {name:?} ({e:?})"),
                );
                finish(plugin, id, flow::on_host_failure())
            }
        },
        Step::Respond {
            status,
            headers,
            body,
        } => {
            if let Err(e) = abi::send_response(status, &headers::encode(&headers), body.as_bytes())
            {
                log(
                    Level::Error,
                    id,
                    &format!("cannot answer the client ({e:?})"),
                );
            }
            Action::Pause
        }
        // Not a final decision (flow never gives one where this is called): refuse.
        Step::Dispatch { .. } | Step::Wait => finish(plugin, id, flow::on_host_failure()),
    }
}

/// Applies header edits in order; stops at the first the host refuses, naming its header.
fn apply(edits: &[HeaderEdit]) -> Result<(), (&str, abi::HostStatus)> {
    let present = |name: &str| {
        abi::request_header_pairs()
            .ok()
            .and_then(|bytes| Headers::decode(&bytes))
            .is_some_and(|h| h.contains(name))
    };
    for edit in edits {
        let result = match edit {
            HeaderEdit::Set(name, value) => abi::set_request_header(name, value),
            HeaderEdit::Add(name, value) => abi::add_request_header(name, value),
            HeaderEdit::SetIfAbsent(name, value) if !present(name) => {
                abi::set_request_header(name, value)
            }
            HeaderEdit::SetIfPresent(name, value) if present(name) => {
                abi::set_request_header(name, value)
            }
            HeaderEdit::SetIfAbsent(..) | HeaderEdit::SetIfPresent(..) => Ok(()),
            HeaderEdit::Remove(name) => abi::remove_request_header(name),
        };
        result.map_err(|e| (edit.name(), e))?;
    }
    Ok(())
}
