//! One request: gather the headers, ask `flow`, carry out its `Step`.

use std::rc::Rc;

use proxy_wasm::{
    hostcalls,
    traits::{Context, HttpContext},
    types::{Action, BufferType, LogLevel, MapType},
};

use super::{log, metrics::Metrics, now, shared_data::SharedData};
use crate::{
    check::{self, HeaderEdit},
    config::Config,
    flow::{self, Decision, Pending, Step},
};

/// The HTTP context of one request.
pub(super) struct RequestContext {
    id: u32,
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    /// The gRPC call we wait for, and what the request remembers meanwhile.
    pending: Option<(u32, Pending)>,
}

impl RequestContext {
    pub(super) fn new(id: u32, config: Rc<Config>, metrics: Rc<Metrics>) -> Self {
        Self {
            id,
            config,
            metrics,
            pending: None,
        }
    }

    /// Carries out a decision; returns what the headers callback should answer.
    fn perform(&mut self, decision: Decision, pending: Option<Pending>) -> Action {
        self.metrics.bump(&decision.counters);
        match decision.step {
            Step::Continue(edits) => {
                apply(&edits);
                Action::Continue
            }
            Step::Respond {
                status,
                headers,
                body,
            } => {
                respond(status, &headers, &body);
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
                match hostcalls::dispatch_grpc_call(
                    &self.config.grpc_cluster,
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
                        // E.g. an unknown cluster: nothing is paused yet, answer now.
                        log(
                            LogLevel::Error,
                            self.id,
                            &format!("cannot call the companion ({status:?})"),
                        );
                        let failure = flow::on_dispatch_failure(&self.config);
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
            hostcalls::get_buffer(BufferType::GrpcReceiveBuffer, 0, size)
                .ok()
                .flatten()
        } else {
            let message = hostcalls::get_grpc_status()
                .ok()
                .and_then(|(_, m)| m)
                .unwrap_or_default();
            log(
                LogLevel::Warn,
                self.id,
                &format!("companion call failed: gRPC {status} {message}"),
            );
            None
        };
        let decision =
            flow::on_check_reply(&self.config, &pending, status, body.as_deref(), &SharedData);
        if self.perform(decision, None) == Action::Continue {
            let _ = hostcalls::resume_http_request();
        }
    }
}

impl HttpContext for RequestContext {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let headers = hostcalls::get_map(MapType::HttpRequestHeaders).unwrap_or_default();
        let (decision, pending) = flow::on_request(&self.config, &headers, &SharedData, now());
        self.perform(decision, pending)
    }
}

fn apply(edits: &[HeaderEdit]) {
    let map = MapType::HttpRequestHeaders;
    let present = |name: &str| hostcalls::get_map_value(map, name).ok().flatten().is_some();
    for edit in edits {
        let _ = match edit {
            HeaderEdit::Set(name, value) => hostcalls::set_map_value(map, name, Some(value)),
            HeaderEdit::Add(name, value) => hostcalls::add_map_value(map, name, value),
            HeaderEdit::SetIfAbsent(name, value) if !present(name) => {
                hostcalls::set_map_value(map, name, Some(value))
            }
            HeaderEdit::SetIfPresent(name, value) if present(name) => {
                hostcalls::set_map_value(map, name, Some(value))
            }
            HeaderEdit::SetIfAbsent(..) | HeaderEdit::SetIfPresent(..) => Ok(()),
            HeaderEdit::Remove(name) => hostcalls::set_map_value(map, name, None),
        };
    }
}

fn respond(status: u32, headers: &[(String, String)], body: &str) {
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let _ = hostcalls::send_http_response(status, headers, Some(body.as_bytes()));
}
