//! ServiceAccount LIST and WATCH at cluster scope, filtered by a `labelSelector` of
//! `key=value` terms, as kube-apiserver's watch cache serves them: a watch resumes after the
//! `resourceVersion` it names, an object that starts matching the selector arrives as
//! ADDED and one that stops matching as DELETED, and a version older than the kept history
//! ends the watch with an ERROR event carrying 410 Expired.

use std::{collections::BTreeMap, collections::VecDeque, convert::Infallible, time::Duration};

use bytes::Bytes;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::{Meta, objects, status::Status};

/// Events kept for watches that resume from an older version.
const HISTORY: usize = 1024;

/// The longest a watch stays open without `timeoutSeconds` (kube-apiserver picks 30–60 min).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

/// One change of a service account. `after` is `None` for a deletion.
#[derive(Debug, Clone)]
pub(crate) struct Change {
    resource_version: u64,
    namespace: String,
    name: String,
    before: Option<Meta>,
    after: Option<Meta>,
}

/// The change log watches read: a bounded history and a channel for live changes.
#[derive(Debug)]
pub(crate) struct Changes {
    history: VecDeque<Change>,
    live: broadcast::Sender<Change>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            history: VecDeque::new(),
            live: broadcast::channel(HISTORY).0,
        }
    }
}

impl Changes {
    /// Records a change at `resource_version` (already taken from the store's counter).
    pub(crate) fn record(
        &mut self,
        resource_version: u64,
        namespace: &str,
        name: &str,
        before: Option<Meta>,
        after: Option<Meta>,
    ) {
        let change = Change {
            resource_version,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            before,
            after,
        };
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(change.clone());
        // No receiver is fine: nobody is watching.
        let _ = self.live.send(change);
    }

    /// The changes after `version` and a receiver for the ones to come, taken together
    /// (under the store's lock) so none falls between them. `Err` when `version` is older
    /// than the history.
    fn resume(
        &self,
        version: u64,
        current: u64,
    ) -> Result<(Vec<Change>, broadcast::Receiver<Change>), u64> {
        let oldest = self.history.front().map_or(current, |c| c.resource_version);
        if version + 1 < oldest && version < current {
            return Err(oldest);
        }
        let replay = self
            .history
            .iter()
            .filter(|c| c.resource_version > version)
            .cloned()
            .collect();
        Ok((replay, self.live.subscribe()))
    }
}

/// A `labelSelector` of equality terms (`a=b`, `a==b`, comma-separated); empty matches all.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector(Vec<(String, String)>);

impl Selector {
    /// Parses the query parameter; other operators are answered 400 as unsupported here.
    pub(crate) fn parse(text: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for term in text.split(',').filter(|t| !t.trim().is_empty()) {
            let (key, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("unable to parse requirement: {term:?}"))?;
            if key.ends_with('!') {
                return Err(format!(
                    "the fake supports only equality selectors: {term:?}"
                ));
            }
            terms.push((key.trim().to_owned(), value.trim().to_owned()));
        }
        Ok(Selector(terms))
    }

    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// `GET /api/v1/serviceaccounts`: the matching accounts and the list's version.
pub(crate) fn list<'a>(
    accounts: impl Iterator<Item = (&'a (String, String), &'a Meta)>,
    selector: &Selector,
    resource_version: u64,
) -> Value {
    let items: Vec<Value> = accounts
        .filter(|(_, meta)| selector.matches(&meta.labels))
        .map(|((namespace, name), meta)| objects::service_account(namespace, name, meta))
        .collect();
    json!({
        "kind": "ServiceAccountList",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "items": items,
    })
}

/// What a watch sends for `change` under `selector`, if anything.
fn event(change: &Change, selector: &Selector) -> Option<Value> {
    let was = change
        .before
        .as_ref()
        .is_some_and(|m| selector.matches(&m.labels));
    let is = change
        .after
        .as_ref()
        .is_some_and(|m| selector.matches(&m.labels));
    let (kind, shown) = match (was, is, &change.after, &change.before) {
        (false, true, Some(after), _) => ("ADDED", after.clone()),
        (true, true, Some(after), _) => ("MODIFIED", after.clone()),
        (true, false, _, Some(before)) => {
            // The last state the watcher saw, at the version of its going.
            let mut gone = before.clone();
            gone.resource_version = change.resource_version;
            ("DELETED", gone)
        }
        _ => return None,
    };
    Some(json!({
        "type": kind,
        "object": objects::service_account(&change.namespace, &change.name, &shown),
    }))
}

fn line(value: &Value) -> Result<Frame<Bytes>, Infallible> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    Ok(Frame::data(Bytes::from(bytes)))
}

fn expired(version: u64, oldest: u64) -> Value {
    let mut status = serde_json::to_value(Status::for_code(410)).unwrap_or_default();
    status["message"] = json!(format!("too old resource version: {version} ({oldest})"));
    json!({"type": "ERROR", "object": status})
}

/// Starts a watch after `version`: the frames of a chunked body, sent by a task that ends
/// at the timeout, when the client goes away or when the cluster stops.
pub(crate) fn start(
    changes: &Changes,
    version: u64,
    current: u64,
    selector: Selector,
    timeout: Option<Duration>,
) -> mpsc::Receiver<Result<Frame<Bytes>, Infallible>> {
    let (frames, body) = mpsc::channel(64);
    let resumed = changes.resume(version, current);
    let until = tokio::time::Instant::now() + timeout.unwrap_or(DEFAULT_TIMEOUT);
    tokio::spawn(async move {
        let (replay, mut live) = match resumed {
            Ok(resumed) => resumed,
            Err(oldest) => {
                let _ = frames.send(line(&expired(version, oldest))).await;
                return;
            }
        };
        for change in &replay {
            if let Some(event) = event(change, &selector)
                && frames.send(line(&event)).await.is_err()
            {
                return;
            }
        }
        let mut seen = replay.last().map_or(version, |c| c.resource_version);
        loop {
            let change = tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                () = frames.closed() => return,
                change = live.recv() => change,
            };
            match change {
                Ok(change) if change.resource_version <= seen => {}
                Ok(change) => {
                    seen = change.resource_version;
                    if let Some(event) = event(&change, &selector)
                        && frames.send(line(&event)).await.is_err()
                    {
                        return;
                    }
                }
                // The watcher fell behind the channel: as the real server does, end it
                // with 410 so the client lists again.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = frames.send(line(&expired(seen, seen + 1))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    body
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn meta(version: u64, labels: &[(&str, &str)]) -> Meta {
        Meta {
            uid: "u".to_owned(),
            created: SystemTime::now(),
            resource_version: version,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn change(before: Option<Meta>, after: Option<Meta>) -> Change {
        Change {
            resource_version: 9,
            namespace: "ns".to_owned(),
            name: "sa".to_owned(),
            before,
            after,
        }
    }

    fn kind(value: Option<Value>) -> Option<String> {
        value.map(|v| v["type"].as_str().unwrap_or_default().to_owned())
    }

    #[test]
    fn label_transitions_are_added_and_deleted_for_a_selector() {
        let selector = Selector::parse("tokensmith.io/exchange=true").unwrap();
        let on = [("tokensmith.io/exchange", "true")];
        let labelled = change(Some(meta(1, &[])), Some(meta(9, &on)));
        let unlabelled = change(Some(meta(1, &on)), Some(meta(9, &[])));
        let deleted = change(Some(meta(1, &on)), None);
        let unrelated = change(Some(meta(1, &[])), Some(meta(9, &[])));
        assert_eq!(kind(event(&labelled, &selector)).as_deref(), Some("ADDED"));
        assert_eq!(
            kind(event(&unlabelled, &selector)).as_deref(),
            Some("DELETED")
        );
        assert_eq!(kind(event(&deleted, &selector)).as_deref(), Some("DELETED"));
        assert_eq!(kind(event(&unrelated, &selector)), None);
        assert_eq!(
            kind(event(&unrelated, &Selector::default())).as_deref(),
            Some("MODIFIED")
        );
    }

    #[test]
    fn a_version_older_than_the_history_is_expired() {
        let mut changes = Changes::default();
        for version in 1..=(HISTORY as u64 + 10) {
            changes.record(version, "ns", "sa", None, Some(meta(version, &[])));
        }
        let current = HISTORY as u64 + 10;
        assert!(changes.resume(3, current).is_err());
        let (replay, _) = changes.resume(current - 2, current).unwrap();
        assert_eq!(replay.len(), 2);
        assert!(changes.resume(current, current).unwrap().0.is_empty());
    }

    #[test]
    fn selectors_take_equality_terms_only() {
        assert!(Selector::parse("a=b,c==d").is_ok());
        assert!(Selector::parse("a!=b").is_err());
        assert!(Selector::parse("a").is_err());
        assert!(Selector::parse("").unwrap().matches(&BTreeMap::new()));
    }
}
