//! The upstream behind Envoy in tests: answers 200 with a JSON echo of what it received
//! and records every request, so tests can assert what reached it (and that nothing did).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{Json, Router, extract::State, http::HeaderMap, http::Method, http::Uri};
use tokio::task::JoinHandle;

use crate::Error;

/// One request as the upstream saw it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Headers (lower-case names; repeated headers joined with ", ").
    pub headers: BTreeMap<String, String>,
}

impl Seen {
    /// A header's value ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
}

/// A running echo upstream.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Upstream {
    /// Starts on 127.0.0.1, a free port.
    pub async fn start() -> Result<Self, Error> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Http(format!("bind upstream: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Http(e.to_string()))?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new().fallback(echo).with_state(seen.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, seen, task })
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many requests arrived.
    pub fn count(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
        if std::thread::panicking() {
            return;
        }
        let leaked = self.seen().into_iter().find_map(|seen| {
            if crate::leak_audit::holds_a_piece(&seen.path) {
                return Some("the path".to_owned());
            }
            seen.headers
                .iter()
                .find(|(name, value)| crate::leak_audit::upstream_header_leaks(name, value))
                .map(|(name, _)| format!("header `{name}`"))
        });
        if let Some(place) = leaked {
            // The upstream may receive a minted token as `authorization` and nothing else
            // of any token; a failed drop fails the test.
            #[allow(clippy::panic)]
            {
                panic!(
                    "{}",
                    crate::leak_audit::finding(&format!(
                        "{place} of a request the upstream received"
                    ))
                );
            }
        }
    }
}

async fn echo(
    State(seen): State<Arc<Mutex<Vec<Seen>>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Json<Seen> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let request = Seen {
        method: method.to_string(),
        path: uri.to_string(),
        headers: map,
    };
    if let Ok(mut s) = seen.lock() {
        s.push(request.clone());
    }
    Json(request)
}
