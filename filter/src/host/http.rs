//! One request: gather the headers, ask `flow`, carry out its `Step`.

use std::rc::Rc;

use proxy_wasm::{
    hostcalls,
    traits::{Context, HttpContext},
    types::Action,
};

use super::{
    abi::{self, Buffer, Level},
    log, now,
    root::Plugin,
};
use crate::{
    check::{self, HeaderEdit},
    flow::{self, Decision, Pending, Step},
    headers::{self, Headers},
};

/// The HTTP context of one request.
pub(super) struct RequestContext {
    id: u32,
    plugin: Rc<Plugin>,
    /// The gRPC call we wait for, and what the request remembers meanwhile.
    pending: Option<(u32, Pending)>,
}

impl RequestContext {
    pub(super) fn new(id: u32, plugin: Rc<Plugin>) -> Self {
        Self {
            id,
            plugin,
            pending: None,
        }
    }

    /// Carries out a decision; returns what the headers callback should answer.
    fn perform(&mut self, decision: Decision, pending: Option<Pending>) -> Action {
        self.plugin.metrics.bump(&decision.counters);
        match decision.step {
            Step::Continue(edits) => match apply(&edits) {
                Ok(()) => Action::Continue,
                Err((name, e)) => {
                    // A credential left in place must not go upstream: refuse instead.
                    log(
                        Level::Error,
                        self.id,
                        &format!("cannot edit header {name:?} ({e:?})"),
                    );
                    self.perform(flow::on_host_failure(), None)
                }
            },
            Step::Respond {
                status,
                headers,
                body,
            } => {
                if let Err(e) =
                    abi::send_response(status, &headers::encode(&headers), body.as_bytes())
                {
                    log(
                        Level::Error,
                        self.id,
                        &format!("cannot answer the client ({e:?})"),
                    );
                }
                Action::Pause
            }
            Step::Dispatch {
                message,
                metadata,
                timeout,
            } => {
                let metadata: Vec<(&str, &[u8])> = metadata
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_bytes()))
                    .collect();
                // The SDK's call, as it must register the callout; it returns an error
                // for every status Envoy gives for a GrpcService argument.
                match hostcalls::dispatch_grpc_call(
                    &self.plugin.upstream,
                    check::SERVICE,
                    check::METHOD,
                    metadata,
                    Some(&message),
                    timeout,
                ) {
                    Ok(token) => {
                        self.pending = pending.map(|p| (token, p));
                        Action::Pause
                    }
                    Err(status) => {
                        // Nothing is paused yet: answer now.
                        log(
                            Level::Error,
                            self.id,
                            &format!("cannot call the companion ({status:?})"),
                        );
                        let failure = flow::on_dispatch_failure(&self.plugin.config);
                        self.perform(failure, None)
                    }
                }
            }
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
        let body = if status == 0 {
            abi::buffer(Buffer::GrpcReceive, size)
        } else {
            let message = abi::grpc_message().unwrap_or_default();
            log(
                Level::Warn,
                self.id,
                &format!(
                    "companion call failed: gRPC {status} {}",
                    String::from_utf8_lossy(&message)
                ),
            );
            None
        };
        let plugin = self.plugin.clone();
        let decision = flow::on_check_reply(
            &plugin.config,
            &pending,
            status,
            body.as_deref(),
            &plugin.cache,
            now(),
        );
        if self.perform(decision, None) == Action::Continue
            && let Err(e) = abi::resume_request()
        {
            log(Level::Error, self.id, &format!("cannot resume ({e:?})"));
        }
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
        // Envoy's `source.address` property: "ip:port" text (brackets for IPv6).
        let peer = abi::property(&["source", "address"])
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|text| text.parse().ok());
        let (decision, pending) =
            flow::on_request(&plugin.config, &headers, &plugin.cache, now(), peer);
        self.perform(decision, pending)
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
