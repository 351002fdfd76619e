//! Validating workload tokens without calling the workload cluster: its published keys
//! (JWKS), kept fresh by one task per cluster, refreshed early for an unknown `kid` at
//! most once per [`ON_DEMAND_MIN_INTERVAL`], and kept when the endpoint fails. Tokens
//! that verified are remembered until their `exp`, while the key set stays the same.

pub mod export;
pub(crate) mod fetch;
pub(crate) mod keys;
pub(crate) mod verify;

use std::{
    sync::{Arc, Mutex, PoisonError, RwLock, Weak},
    time::{Duration, SystemTime},
};

use sha2::{Digest, Sha256};

use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    deny::{Denial, DenyReason, Side},
    identity::Validated,
    metrics::{CacheLabels, JwksFetchLabels, Metrics},
    secret::BearerToken,
};
use fetch::{Endpoint, FetchError, Fetcher};
use keys::{KeySet, Selection};
use verify::Expectations;

/// Unknown-`kid` refreshes per cluster are at least this far apart: a `kid` is chosen
/// by whoever sends the token, so without a floor every forged token would cost a fetch.
pub const ON_DEMAND_MIN_INTERVAL: Duration = Duration::from_secs(30);

/// Most verified tokens remembered per cluster.
const VERIFIED_CACHE_ENTRIES: u64 = 100_000;
/// The verified-token cache counts as the validation cache, as TokenReview's does.
const VALIDATION: CacheLabels = CacheLabels {
    cache: "validation",
};

/// A token that verified, the key set it verified against and the audiences and leeway
/// it satisfied: the entry counts only while that very set is in force and the cluster
/// expects the same (a reload that keeps this validator may change its audiences).
#[derive(Clone)]
struct Verified {
    validated: Validated,
    keys: Arc<KeySet>,
    audiences: Vec<String>,
    leeway: Duration,
}

/// Until the token's `exp` (tokens without one are not kept).
struct UntilExpiry;

impl moka::Expiry<[u8; 32], Verified> for UntilExpiry {
    fn expire_after_create(
        &self,
        _: &[u8; 32],
        verified: &Verified,
        _: std::time::Instant,
    ) -> Option<Duration> {
        let at = verified.validated.expires_at?;
        Some(at.duration_since(SystemTime::now()).unwrap_or_default())
    }
}

/// First wait after a failed fetch; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between failed fetches (never longer than the refresh interval).
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Where a validator's keys come from.
#[derive(Debug, Clone, PartialEq)]
pub enum KeySource {
    /// `jwks_data`: fixed keys, never refreshed.
    Static(KeySet),
    /// `jwks_uri` or `discovery`: fetched and refreshed.
    Remote {
        /// Where from.
        endpoint: Endpoint,
        /// PEM of `ca_file`, when set: the only roots trusted for the fetch.
        ca_pem: Option<Vec<u8>>,
        /// Time between periodic fetches.
        refresh_interval: Duration,
    },
}

/// One cluster's keys and how they are kept fresh. Clones share the keys and the task;
/// the task stops when the last clone is dropped (a reload that removes the cluster).
#[derive(Clone)]
pub struct JwksValidator {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    keys: RwLock<Option<Arc<KeySet>>>,
    remote: Option<Remote>,
    metrics: Arc<Metrics>,
    /// Keyed by SHA-256 of the token; `None` with `--validation-cache-ttl 0`.
    verified: Option<moka::future::Cache<[u8; 32], Verified>>,
}

struct Remote {
    fetcher: Fetcher,
    state: Mutex<RefreshState>,
    /// Counts finished fetch attempts (success or not); checks waiting for an on-demand
    /// refresh wait for it to move.
    attempts: watch::Sender<u64>,
    wake: Arc<Notify>,
    task: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct RefreshState {
    in_flight: bool,
    last_on_demand: Option<Instant>,
    /// The last fetch failed: an unknown `kid` then has no verdict (503, not 401), and
    /// on-demand refreshes may come every FIRST_RETRY so a returning endpoint is seen soon.
    last_failed: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(remote) = &self.remote
            && let Some(task) = remote
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
        {
            task.abort();
        }
    }
}

fn unavailable(detail: impl Into<String>) -> Denial {
    DenyReason::Unavailable(Side::Workload).because(detail)
}

fn invalid(detail: impl Into<String>) -> Denial {
    DenyReason::InvalidToken.because(detail)
}

impl JwksValidator {
    /// A validator for cluster `name` whose tokens carry `issuer`. A remote source starts
    /// its fetch task at once (so this needs a Tokio runtime); `loaded` is notified the
    /// first time keys arrive (readiness waits for it). Fails only when the fetcher
    /// cannot be built (`ca_file`, system roots); a failing endpoint is not an error here.
    pub fn new(
        name: &str,
        issuer: &str,
        source: &KeySource,
        loaded: Arc<Notify>,
        metrics: Arc<Metrics>,
        cache_verified: bool,
    ) -> Result<Self, FetchError> {
        let (keys, remote, interval) = match source {
            KeySource::Static(set) => (Some(Arc::new(set.clone())), None, None),
            KeySource::Remote {
                endpoint,
                ca_pem,
                refresh_interval,
            } => {
                let fetcher = Fetcher::new(issuer, endpoint.clone(), ca_pem.as_deref())?;
                let remote = Remote {
                    fetcher,
                    state: Mutex::new(RefreshState::default()),
                    attempts: watch::channel(0).0,
                    wake: Arc::new(Notify::new()),
                    task: Mutex::new(None),
                };
                (None, Some(remote), Some(*refresh_interval))
            }
        };
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            keys: RwLock::new(keys),
            remote,
            metrics,
            verified: cache_verified.then(|| {
                moka::future::Cache::builder()
                    .max_capacity(VERIFIED_CACHE_ENTRIES)
                    .expire_after(UntilExpiry)
                    .build()
            }),
        });
        if let (Some(remote), Some(interval)) = (&inner.remote, interval) {
            let task = tokio::spawn(refresh_loop(
                Arc::downgrade(&inner),
                remote.wake.clone(),
                interval,
                loaded,
            ));
            *remote.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
        }
        Ok(JwksValidator { inner })
    }

    /// The keys in force, if any were ever loaded.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.inner
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether keys were loaded at least once (static keys always are).
    pub fn has_keys(&self) -> bool {
        self.keys().is_some()
    }

    /// A verdict remembered for this token, if its key set is still the one in force
    /// and its `exp` has not passed. Fresh as of now: verifying again would say the same.
    async fn remembered(
        &self,
        key: Option<&[u8; 32]>,
        expect: &Expectations<'_>,
    ) -> Option<Validated> {
        let (cache, key) = (self.inner.verified.as_ref()?, key?);
        let hit = cache.get(key).await.filter(|hit| {
            let current = self.keys();
            current.is_some_and(|keys| Arc::ptr_eq(&keys, &hit.keys))
                && hit.audiences == expect.audiences
                && hit.leeway == expect.leeway
                && hit
                    .validated
                    .expires_at
                    .is_some_and(|at| at > SystemTime::now())
        });
        let Some(hit) = hit else {
            self.inner
                .metrics
                .cache_misses
                .get_or_create(&VALIDATION)
                .inc();
            return None;
        };
        self.inner
            .metrics
            .cache_hits
            .get_or_create(&VALIDATION)
            .inc();
        Some(Validated {
            validated_at: std::time::Instant::now(),
            from_cache: true,
            ..hit.validated
        })
    }

    /// Verifies `token` against this cluster's keys. An unknown `kid` may wait for one
    /// on-demand refresh; callers bound the wait with their own deadline.
    pub async fn validate(
        &self,
        token: &BearerToken,
        expect: &Expectations<'_>,
    ) -> Result<Validated, Denial> {
        let token = token.expose();
        // Hashed only when there is a cache to look in.
        let key: Option<[u8; 32]> = self
            .inner
            .verified
            .as_ref()
            .map(|_| Sha256::digest(token.as_bytes()).into());
        if let Some(validated) = self.remembered(key.as_ref(), expect).await {
            return Ok(validated);
        }
        let header = verify::header(token)?;
        let mut refreshed = false;
        loop {
            let Some(keys) = self.keys() else {
                return Err(unavailable(format!(
                    "no keys loaded yet for cluster {:?}",
                    self.inner.name
                )));
            };
            match keys.select(header.alg, header.kid.as_deref()) {
                Selection::Keys(candidates) => {
                    let validated = verify::verify(token, &header, &candidates, expect)?;
                    if let (Some(cache), Some(key)) = (&self.inner.verified, key) {
                        let entry = Verified {
                            validated: validated.clone(),
                            keys,
                            audiences: expect.audiences.to_vec(),
                            leeway: expect.leeway,
                        };
                        cache.insert(key, entry).await;
                    }
                    return Ok(validated);
                }
                Selection::Mismatch => {
                    return Err(invalid(format!(
                        "no key for the token's kid fits alg {:?}",
                        header.alg
                    )));
                }
                Selection::UnknownKid if !refreshed => {
                    self.refresh_for_unknown_kid().await?;
                    refreshed = true;
                }
                Selection::UnknownKid => {
                    return Err(invalid("no key with the token's kid after a refresh"));
                }
            }
        }
    }

    /// Asks the task for a fetch (or joins the one in flight) and waits for it. Refused
    /// without waiting when the last on-demand refresh is under 30 s old.
    async fn refresh_for_unknown_kid(&self) -> Result<(), Denial> {
        let Some(remote) = &self.inner.remote else {
            return Err(invalid("no key with the token's kid (fixed jwks_data)"));
        };
        let mut attempts = remote.attempts.subscribe();
        let seen = {
            let mut state = remote.state.lock().unwrap_or_else(PoisonError::into_inner);
            let seen = *attempts.borrow_and_update();
            if !state.in_flight {
                let now = Instant::now();
                let min_interval = if state.last_failed {
                    FIRST_RETRY
                } else {
                    ON_DEMAND_MIN_INTERVAL
                };
                if state
                    .last_on_demand
                    .is_some_and(|at| now.duration_since(at) < min_interval)
                {
                    return Err(if state.last_failed {
                        unavailable("no key with the token's kid and the jwks endpoint is failing")
                    } else {
                        invalid(
                            "no key with the token's kid; refresh skipped (at most one per 30 s)",
                        )
                    });
                }
                state.last_on_demand = Some(now);
                state.in_flight = true;
                info!(
                    workload_cluster = self.inner.name.as_str(),
                    "jwks refresh requested for an unknown kid"
                );
                remote.wake.notify_one();
            }
            seen
        };
        // The caller's deadline bounds this wait; the fetch itself has FETCH_TIMEOUT.
        attempts
            .wait_for(|n| *n > seen)
            .await
            .map_err(|_| unavailable("jwks refresh task stopped"))?;
        let failed = remote
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last_failed;
        if failed {
            // No verdict: the key may exist and we could not fetch it.
            return Err(unavailable(
                "no key with the token's kid and the jwks refresh failed",
            ));
        }
        Ok(())
    }
}

impl std::fmt::Debug for JwksValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwksValidator")
            .field("name", &self.inner.name)
            .field("keys", &self.keys().map(|k| k.kids()))
            .finish()
    }
}

/// Fetches at start, then every `interval`, sooner after failures (backoff) and when
/// woken for an unknown `kid`. Holds the validator only weakly, so dropping the last
/// clone ends the loop (and `Drop` aborts a sleeping one).
async fn refresh_loop(
    inner: Weak<Inner>,
    wake: Arc<Notify>,
    interval: Duration,
    loaded: Arc<Notify>,
) {
    let mut retry = FIRST_RETRY;
    loop {
        let Some(validator) = inner.upgrade() else {
            return;
        };
        let ok = fetch_once(&validator, &loaded).await;
        drop(validator);
        let wait = if ok {
            retry = FIRST_RETRY;
            interval
        } else {
            let wait = retry.min(interval);
            retry = (retry * 2).min(MAX_RETRY);
            wait
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = wake.notified() => {}
        }
    }
}

/// One fetch; returns whether it brought keys.
async fn fetch_once(inner: &Inner, loaded: &Notify) -> bool {
    let Some(remote) = &inner.remote else {
        return false;
    };
    remote
        .state
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .in_flight = true;
    let result = remote.fetcher.fetch().await;
    let ok = result.is_ok();
    let name = inner.name.as_str();
    inner
        .metrics
        .jwks_fetches
        .get_or_create(&JwksFetchLabels {
            cluster: name.to_owned(),
            result: if ok { "ok" } else { "error" },
        })
        .inc();
    match result {
        Ok(set) => {
            let mut keys = inner.keys.write().unwrap_or_else(PoisonError::into_inner);
            let first = keys.is_none();
            let changed = keys.as_ref().is_none_or(|old| **old != set);
            for why in set.skipped() {
                debug!(
                    workload_cluster = name,
                    detail = why.as_str(),
                    "jwks entry skipped"
                );
            }
            if changed {
                info!(
                    workload_cluster = name,
                    keys = set.keys().len(),
                    kids = ?set.kids(),
                    "jwks keys loaded"
                );
            } else {
                debug!(workload_cluster = name, "jwks unchanged");
            }
            // An unchanged set stays the same Arc: verified tokens stay remembered.
            if changed {
                *keys = Some(Arc::new(set));
            }
            drop(keys);
            if first {
                loaded.notify_one();
            }
        }
        Err(error) => {
            let detail = error.to_string();
            let have = inner
                .keys
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .map_or(0, |k| k.keys().len());
            warn!(
                workload_cluster = name,
                detail = detail.as_str(),
                keys = have,
                "jwks refresh failed; keeping the last good keys"
            );
        }
    }
    let mut state = remote.state.lock().unwrap_or_else(PoisonError::into_inner);
    state.in_flight = false;
    state.last_failed = !ok;
    drop(state);
    remote.attempts.send_modify(|n| *n += 1);
    ok
}
