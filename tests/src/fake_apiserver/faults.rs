//! Injected failures: slow answers, error statuses and refused connections.

use std::{sync::Mutex, time::Duration};

use super::{Endpoint, calls::lock};

/// A failure the fake API server plays until cleared.
///
/// A fault scoped to `Some(endpoint)` wins over one scoped to `None` (all endpoints) of the same
/// kind. A `Latency` and a `Status` fault combine: the error comes late.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Wait `delay` (after reading the request body), then answer as usual.
    Latency {
        /// `None` applies to every endpoint.
        endpoint: Option<Endpoint>,
        /// How long to hold the answer.
        delay: Duration,
    },
    /// Answer `code` with the `Status` object the real server sends for it (see
    /// `Status::for_code`); 429 also carries `Retry-After`.
    Status {
        /// `None` applies to every endpoint.
        endpoint: Option<Endpoint>,
        /// HTTP status code, e.g. 500, 503 or 429.
        code: u16,
    },
    /// Answer `code` with this JSON `body` instead of the real answer: a response of an
    /// unexpected shape (tests put real tokens in it, as kube-apiserver echoes them).
    Body {
        /// `None` applies to every endpoint.
        endpoint: Option<Endpoint>,
        /// HTTP status code (200/201: a "success" that does not decode).
        code: u16,
        /// The JSON text.
        body: String,
    },
    /// Accept TCP connections and drop them at once, before TLS: clients see a reset or EOF.
    Refuse,
    /// Accept TCP connections and answer the TLS handshake with plain text: clients see a
    /// handshake failure (a proxy or load balancer in the way that does not speak TLS).
    NotTls,
}

/// What applies to one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) delay: Option<Duration>,
    pub(crate) status: Option<u16>,
    pub(crate) body: Option<(u16, String)>,
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    inner: Mutex<Vec<Fault>>,
}

impl Faults {
    /// Adds `fault`, replacing an earlier fault of the same kind and scope.
    pub(crate) fn inject(&self, fault: Fault) {
        let mut faults = lock(&self.inner);
        faults.retain(|existing| !same_slot(existing, &fault));
        faults.push(fault);
    }

    pub(crate) fn clear(&self) {
        lock(&self.inner).clear();
    }

    pub(crate) fn refuse(&self) -> bool {
        lock(&self.inner)
            .iter()
            .any(|fault| matches!(fault, Fault::Refuse))
    }

    pub(crate) fn not_tls(&self) -> bool {
        lock(&self.inner)
            .iter()
            .any(|fault| matches!(fault, Fault::NotTls))
    }

    pub(crate) fn plan(&self, endpoint: Endpoint) -> Plan {
        let faults = lock(&self.inner);
        let delays = faults.iter().filter_map(|fault| match fault {
            Fault::Latency { endpoint, delay } => Some((*endpoint, *delay)),
            _ => None,
        });
        let delay = most_specific(delays, endpoint);
        let codes = faults.iter().filter_map(|fault| match fault {
            Fault::Status { endpoint, code } => Some((*endpoint, *code)),
            _ => None,
        });
        let status = most_specific(codes, endpoint);
        let bodies = faults.iter().filter_map(|fault| match fault {
            Fault::Body {
                endpoint,
                code,
                body,
            } => Some((*endpoint, (*code, body.clone()))),
            _ => None,
        });
        let body = most_specific(bodies, endpoint);
        Plan {
            delay,
            status,
            body,
        }
    }
}

/// The value scoped to `endpoint` if any, else the one scoped to every endpoint.
fn most_specific<T>(
    scoped: impl Iterator<Item = (Option<Endpoint>, T)>,
    endpoint: Endpoint,
) -> Option<T> {
    let mut global = None;
    for (scope, value) in scoped {
        match scope {
            Some(ep) if ep == endpoint => return Some(value),
            None => global = Some(value),
            Some(_) => {}
        }
    }
    global
}

fn same_slot(a: &Fault, b: &Fault) -> bool {
    match (a, b) {
        (Fault::Latency { endpoint: x, .. }, Fault::Latency { endpoint: y, .. }) => x == y,
        (Fault::Status { endpoint: x, .. }, Fault::Status { endpoint: y, .. }) => x == y,
        (Fault::Body { endpoint: x, .. }, Fault::Body { endpoint: y, .. }) => x == y,
        (Fault::Refuse, Fault::Refuse) | (Fault::NotTls, Fault::NotTls) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Fault, Faults, Plan};
    use crate::Endpoint;

    #[test]
    fn an_endpoint_fault_wins_over_a_global_one_and_kinds_combine() {
        let faults = Faults::default();
        faults.inject(Fault::Status {
            endpoint: None,
            code: 503,
        });
        faults.inject(Fault::Status {
            endpoint: Some(Endpoint::TokenRequest),
            code: 429,
        });
        faults.inject(Fault::Latency {
            endpoint: Some(Endpoint::TokenRequest),
            delay: Duration::from_millis(5),
        });
        assert_eq!(
            faults.plan(Endpoint::TokenRequest),
            Plan {
                delay: Some(Duration::from_millis(5)),
                status: Some(429),
                body: None,
            }
        );
        assert_eq!(
            faults.plan(Endpoint::TokenReview),
            Plan {
                delay: None,
                status: Some(503),
                body: None,
            }
        );
    }

    #[test]
    fn injecting_again_replaces_the_same_kind_and_scope() {
        let faults = Faults::default();
        faults.inject(Fault::Status {
            endpoint: Some(Endpoint::TokenReview),
            code: 500,
        });
        faults.inject(Fault::Status {
            endpoint: Some(Endpoint::TokenReview),
            code: 503,
        });
        assert_eq!(faults.plan(Endpoint::TokenReview).status, Some(503));
        faults.clear();
        assert_eq!(faults.plan(Endpoint::TokenReview), Plan::default());
    }
}
