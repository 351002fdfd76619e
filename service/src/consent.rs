//! Management-side consent (`--require-sa-label KEY=VALUE`): a token is minted only for a
//! management service account that carries the label. A LIST + WATCH of the labelled
//! accounts keeps the set in memory, so no Check waits on the API server for it.

use std::{
    collections::HashSet,
    fmt,
    str::FromStr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::{
    api::{Api, ListParams, WatchEvent, WatchParams},
    core::ObjectMeta,
};
use tracing::{info, warn};

use crate::{
    deny::{self, Denial, DenyReason, Side},
    identity::ServiceAccountRef,
    metrics::Metrics,
    names::is_subdomain,
};

/// How long the API server keeps one watch open before we resume it (kube-rs's default).
const WATCH_SECONDS: u32 = 290;
/// Slack past `WATCH_SECONDS` before a silent watch is taken for a dead connection.
const WATCH_SLACK: Duration = Duration::from_secs(30);
/// Retry pacing after a failed LIST or WATCH: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// A `KEY=VALUE` label requirement, validated as Kubernetes validates labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelRequirement {
    key: String,
    value: String,
}

/// Why a `--require-sa-label` value is not a label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    /// No `=`.
    #[error("{0:?} is not KEY=VALUE")]
    Shape(String),
    /// The key is not `[prefix/]name`.
    #[error(
        "label key {0:?} is not [DNS-subdomain prefix/]name (name: 1–63 of [A-Za-z0-9-_.], alphanumeric at both ends)"
    )]
    Key(String),
    /// The value is not a label value.
    #[error(
        "label value {0:?} is not a label value (at most 63 of [A-Za-z0-9-_.], alphanumeric at both ends)"
    )]
    Value(String),
}

/// A label name or value: at most 63 of `[A-Za-z0-9-_.]`, alphanumeric at both ends;
/// `allow_empty` for values.
fn is_label_part(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let bytes = s.as_bytes();
    bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
}

impl FromStr for LabelRequirement {
    type Err = LabelError;

    fn from_str(text: &str) -> Result<Self, LabelError> {
        let (key, value) = text
            .split_once('=')
            .ok_or_else(|| LabelError::Shape(text.to_owned()))?;
        let key_ok = match key.rsplit_once('/') {
            Some((prefix, name)) => is_subdomain(prefix) && is_label_part(name, false),
            None => is_label_part(key, false),
        };
        if !key_ok {
            return Err(LabelError::Key(key.to_owned()));
        }
        if !is_label_part(value, true) {
            return Err(LabelError::Value(value.to_owned()));
        }
        Ok(LabelRequirement {
            key: key.to_owned(),
            value: value.to_owned(),
        })
    }
}

impl fmt::Display for LabelRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// How long the set stays in force without the API server confirming it (a LIST, or a
/// watch that ends normally or sends an event). A healthy watch confirms it at least
/// every `WATCH_SECONDS`; past this bound, say a lost `list` right while TokenRequests
/// still work, a removed label must not go unseen for ever.
pub const STALE_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
struct Accounts {
    /// When the API server last confirmed the set; `None` before the first LIST, when
    /// nothing is known.
    confirmed: Option<Instant>,
    labelled: HashSet<(String, String)>,
}

/// The set of management service accounts that carry the required label, kept current by
/// a background watch. Clones share it.
#[derive(Clone)]
pub struct Consent {
    required: Arc<LabelRequirement>,
    accounts: Arc<RwLock<Accounts>>,
    stale_after: Duration,
    metrics: Arc<Metrics>,
}

impl Consent {
    /// Starts watching `client`'s service accounts for `required`; the task ends with the
    /// runtime.
    pub fn watch(
        client: kube::Client,
        required: LabelRequirement,
        metrics: Arc<Metrics>,
    ) -> Consent {
        let consent = Consent {
            required: Arc::new(required),
            accounts: Arc::default(),
            stale_after: STALE_AFTER,
            metrics,
        };
        tokio::spawn(consent.clone().run(Api::all(client)));
        consent
    }

    /// Whether a LIST has answered, so `check` can give verdicts.
    pub fn synced(&self) -> bool {
        self.read(|a| a.confirmed.is_some())
    }

    /// Ok when `service_account` carries the label. Before the first LIST, or when the
    /// set was last confirmed more than [`STALE_AFTER`] ago, 503: the management side's
    /// answer is not known.
    pub fn check(&self, service_account: &ServiceAccountRef) -> Result<(), Denial> {
        let key = (
            service_account.namespace().to_owned(),
            service_account.name().to_owned(),
        );
        let (confirmed, labelled) = self.read(|a| (a.confirmed, a.labelled.contains(&key)));
        let Some(confirmed) = confirmed else {
            return Err(DenyReason::Unavailable(Side::Management)
                .because("service accounts labelled for exchange not listed yet"));
        };
        if confirmed.elapsed() > self.stale_after {
            return Err(DenyReason::Unavailable(Side::Management).because(format!(
                "service accounts labelled for exchange last confirmed {} s ago",
                confirmed.elapsed().as_secs()
            )));
        }
        if !labelled {
            return Err(DenyReason::NotConsented.because(format!(
                "the management service account lacks the label {}",
                self.required
            )));
        }
        Ok(())
    }

    fn read<T>(&self, f: impl FnOnce(&Accounts) -> T) -> T {
        f(&self
            .accounts
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn write(&self, f: impl FnOnce(&mut Accounts)) {
        f(&mut self
            .accounts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner));
        let count = self.read(|a| a.labelled.len());
        self.metrics
            .consented_accounts
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// LIST, then WATCH from the list's version until the watch ends or fails; again
    /// from a fresh LIST after a failure (a 410 included). The last known set stays in
    /// force meanwhile: a TokenRequest needs the same API server anyway.
    async fn run(self, api: Api<ServiceAccount>) {
        let selector = self.required.to_string();
        let mut backoff = BACKOFF.0;
        loop {
            match self.list(&api, &selector).await {
                Ok(mut version) => loop {
                    let started = std::time::Instant::now();
                    match self.follow(&api, &selector, &version).await {
                        // A watch that ends at once (a proxy closing streams) must not
                        // turn into a tight loop of watch requests.
                        Ok(next) if started.elapsed() < BACKOFF.0 => {
                            version = next;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(BACKOFF.1);
                        }
                        Ok(next) => {
                            backoff = BACKOFF.0;
                            version = next;
                        }
                        Err(e) => {
                            warn!(
                                cluster = "management",
                                detail = %e,
                                "service-account watch ended; listing again"
                            );
                            break;
                        }
                    }
                },
                Err(e) => {
                    warn!(
                        cluster = "management",
                        detail = %e,
                        retry_in_s = backoff.as_secs(),
                        "listing the service accounts labelled for exchange failed"
                    );
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }

    /// Replaces the set with a LIST; returns the list's resourceVersion.
    async fn list(&self, api: &Api<ServiceAccount>, selector: &str) -> Result<String, WatchError> {
        let started = std::time::Instant::now();
        let listed = api.list(&ListParams::default().labels(selector)).await;
        self.metrics.kube_call(
            "management",
            "list_serviceaccounts",
            crate::metrics::code_of(&listed, "200"),
            started.elapsed(),
        );
        let listed = listed?;
        let labelled: HashSet<_> = listed
            .items
            .iter()
            .filter_map(|sa| key(&sa.metadata))
            .collect();
        let first = !self.synced();
        let count = labelled.len();
        self.write(|a| {
            a.labelled = labelled;
            a.confirmed = Some(Instant::now());
        });
        if first {
            info!(label = %self.required, accounts = count, "service accounts labelled for exchange listed");
        }
        Ok(listed.metadata.resource_version.unwrap_or_default())
    }

    /// Applies one watch's events; returns the version to resume from, or why a fresh
    /// LIST is needed.
    async fn follow(
        &self,
        api: &Api<ServiceAccount>,
        selector: &str,
        version: &str,
    ) -> Result<String, WatchError> {
        // Bookmarks keep the resume version fresh in a quiet cluster, so a resumed watch
        // does not meet 410 and a full relist after compaction.
        let params = WatchParams::default()
            .labels(selector)
            .timeout(WATCH_SECONDS);
        let mut version = version.to_owned();
        let watched = async {
            let stream = api.watch(&params, &version).await?;
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                let (present, sa) = match event? {
                    WatchEvent::Added(sa) | WatchEvent::Modified(sa) => (true, sa),
                    WatchEvent::Deleted(sa) => (false, sa),
                    WatchEvent::Bookmark(mark) => {
                        version = mark.metadata.resource_version;
                        continue;
                    }
                    WatchEvent::Error(status) => {
                        return Err(WatchError::Status {
                            message: status.message,
                            code: status.code,
                        });
                    }
                };
                if let Some(next) = &sa.metadata.resource_version {
                    version.clone_from(next);
                }
                // A watch on a selector reports an account that lost the label as
                // DELETED; the check below also covers a server that sends MODIFIED.
                let keep = present && carries(&sa.metadata, &self.required);
                let key = key(&sa.metadata);
                self.write(|a| {
                    a.confirmed = Some(Instant::now());
                    match key {
                        Some(key) if keep => a.labelled.insert(key),
                        Some(key) => a.labelled.remove(&key),
                        None => false,
                    };
                });
            }
            self.write(|a| a.confirmed = Some(Instant::now()));
            Ok(())
        };
        let bound = Duration::from_secs(u64::from(WATCH_SECONDS)) + WATCH_SLACK;
        match tokio::time::timeout(bound, watched).await {
            Ok(Ok(())) => Ok(version),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(WatchError::Outlived(bound)),
        }
    }
}

/// Why a LIST or WATCH gave no usable answer.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error("{}", deny::describe(.0))]
    Kube(#[from] kube::Error),
    #[error("{message} ({code})")]
    Status { message: String, code: u16 },
    #[error("the watch outlived its timeout of {0:?} (connection lost?)")]
    Outlived(Duration),
}

fn key(meta: &ObjectMeta) -> Option<(String, String)> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

fn carries(meta: &ObjectMeta, required: &LabelRequirement) -> bool {
    meta.labels
        .as_ref()
        .and_then(|labels| labels.get(&required.key))
        .is_some_and(|value| *value == required.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_requirements_are_validated_like_kubernetes_labels() {
        for good in [
            "tokensmith.io/exchange=true",
            "exchange=",
            "a=b",
            "example.com/x_y.z=A-1",
        ] {
            assert!(good.parse::<LabelRequirement>().is_ok(), "{good}");
        }
        for (bad, error) in [
            ("exchange", LabelError::Shape("exchange".into())),
            ("=true", LabelError::Key("".into())),
            ("Bad_Prefix/x=true", LabelError::Key("Bad_Prefix/x".into())),
            ("-x=true", LabelError::Key("-x".into())),
            ("x=-true", LabelError::Value("-true".into())),
            ("x=a b", LabelError::Value("a b".into())),
        ] {
            assert_eq!(bad.parse::<LabelRequirement>(), Err(error), "{bad}");
        }
        let long = format!("x={}", "v".repeat(64));
        assert!(long.parse::<LabelRequirement>().is_err());
    }

    #[test]
    fn the_requirement_is_its_own_selector() {
        let required: LabelRequirement = "tokensmith.io/exchange=true".parse().unwrap();
        assert_eq!(required.to_string(), "tokensmith.io/exchange=true");
    }

    #[test]
    fn only_labelled_accounts_pass_and_nothing_before_the_first_list() {
        let consent = Consent {
            required: Arc::new("tokensmith.io/exchange=true".parse().unwrap()),
            accounts: Arc::default(),
            stale_after: STALE_AFTER,
            metrics: Arc::default(),
        };
        let sa = ServiceAccountRef::new("app-prod", "eso-sa").unwrap();
        let other = ServiceAccountRef::new("app-prod", "other").unwrap();
        let before = consent.check(&sa).unwrap_err();
        assert_eq!(before.reason, DenyReason::Unavailable(Side::Management));
        consent.write(|a| {
            a.confirmed = Some(Instant::now());
            a.labelled.insert(("app-prod".into(), "eso-sa".into()));
        });
        assert!(consent.check(&sa).is_ok());
        let refused = consent.check(&other).unwrap_err();
        assert_eq!(refused.reason, DenyReason::NotConsented);
        assert!(
            refused
                .detail
                .unwrap()
                .contains("tokensmith.io/exchange=true")
        );
    }

    #[test]
    fn a_set_nobody_confirmed_for_too_long_gives_no_verdict() {
        let consent = Consent {
            required: Arc::new("tokensmith.io/exchange=true".parse().unwrap()),
            accounts: Arc::default(),
            stale_after: Duration::from_millis(50),
            metrics: Arc::default(),
        };
        let sa = ServiceAccountRef::new("app-prod", "eso-sa").unwrap();
        consent.write(|a| {
            a.confirmed = Some(Instant::now());
            a.labelled.insert(("app-prod".into(), "eso-sa".into()));
        });
        assert!(consent.check(&sa).is_ok());
        std::thread::sleep(Duration::from_millis(60));
        let stale = consent.check(&sa).unwrap_err();
        assert_eq!(stale.reason, DenyReason::Unavailable(Side::Management));
        assert!(stale.detail.unwrap().contains("last confirmed"));
        consent.write(|a| a.confirmed = Some(Instant::now()));
        assert!(consent.check(&sa).is_ok());
    }
}
