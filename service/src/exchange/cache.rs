//! The exchange cache: management tokens kept while comfortably valid, refreshed ahead of
//! time, with concurrent misses for one identity coalesced into one TokenRequest.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use moka::{Expiry, notification::RemovalCause};

use super::Exchanger;
use crate::{
    deny::Denial,
    identity::ServiceAccountRef,
    metrics::{CacheLabels, Metrics},
    secret::ExchangedToken,
};

/// A cached token is never served if it would outlive what a fresh exchange gives by
/// more than this (clock granularity between our clock and the API server's).
const LIFETIME_SLACK: Duration = Duration::from_secs(5);
/// The least margin kept before a cached token's expiry.
const MIN_MARGIN: Duration = Duration::from_secs(60);

/// Who a cached token is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExchangeKey {
    /// The configured name of the workload cluster the identity came from.
    pub source: String,
    /// The workload service account's UID: a recreated account starts afresh.
    pub uid: String,
    pub service_account: ServiceAccountRef,
}

/// A management token and where it came from.
#[derive(Debug)]
pub struct Exchanged {
    pub token: ExchangedToken,
    /// Whether the exchange cache served it.
    pub cache_hit: bool,
}

impl Exchanged {
    fn fresh(token: ExchangedToken) -> Self {
        Exchanged {
            token,
            cache_hit: false,
        }
    }
}

/// A cached exchange and its schedule.
#[derive(Debug, Clone)]
struct Cached {
    token: ExchangedToken,
    /// Last moment it is served (expiry − margin).
    serve_until: SystemTime,
    /// From here on a hit also starts a background refresh (expiry − 2·margin).
    refresh_from: SystemTime,
}

impl Cached {
    /// Margin = max(20 % of the token's remaining lifetime, 60 s).
    fn new(token: ExchangedToken, now: SystemTime) -> Self {
        let lifetime = token.expires_at.duration_since(now).unwrap_or_default();
        let margin = (lifetime / 5).max(MIN_MARGIN);
        let serve_until = token.expires_at.checked_sub(margin).unwrap_or(now);
        let refresh_from = token.expires_at.checked_sub(margin * 2).unwrap_or(now);
        Self {
            token,
            serve_until,
            refresh_from,
        }
    }
}

/// moka drops an entry when it stops being servable.
struct ServeUntil;

impl Expiry<ExchangeKey, Cached> for ServeUntil {
    fn expire_after_create(&self, _: &ExchangeKey, value: &Cached, _: Instant) -> Option<Duration> {
        Some(
            value
                .serve_until
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        )
    }

    fn expire_after_update(
        &self,
        key: &ExchangeKey,
        value: &Cached,
        at: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, at)
    }
}

/// An [`Exchanger`] with a bounded cache in front.
#[derive(Clone)]
pub struct CachedExchanger {
    inner: Exchanger,
    cache: moka::future::Cache<ExchangeKey, Cached>,
    refreshing: Arc<Mutex<HashSet<ExchangeKey>>>,
    refresh_timeout: Duration,
    enabled: bool,
    metrics: Arc<Metrics>,
}

const LABELS: CacheLabels = CacheLabels { cache: "exchange" };

impl CachedExchanger {
    /// Caches at most `max_entries` tokens (0: no caching, every call exchanges);
    /// background refreshes get `refresh_timeout`.
    pub fn new(
        inner: Exchanger,
        max_entries: u64,
        refresh_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let evictions = metrics.cache_evictions.get_or_create(&LABELS).clone();
        let cache = moka::future::Cache::builder()
            .max_capacity(max_entries)
            .expire_after(ServeUntil)
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    evictions.inc();
                }
            })
            .build();
        Self {
            inner,
            cache,
            refreshing: Arc::default(),
            refresh_timeout,
            enabled: max_entries > 0,
            metrics,
        }
    }

    /// A management token for `key`, valid at most `lifetime` from now (+ slack), always:
    /// from the cache when one is comfortably valid, else from one TokenRequest shared by
    /// the concurrent callers it suits (one whose token would outlive this caller's bound
    /// makes its own).
    pub async fn exchange(
        &self,
        key: ExchangeKey,
        lifetime: Duration,
    ) -> Result<Exchanged, Denial> {
        if !self.enabled {
            return self
                .inner
                .exchange(&key.service_account, lifetime)
                .await
                .map(Exchanged::fresh);
        }
        let now = SystemTime::now();
        let latest_allowed = now + lifetime + LIFETIME_SLACK;
        if let Some(cached) = self.cache.get(&key).await {
            if now < cached.serve_until && cached.token.expires_at <= latest_allowed {
                self.metrics.cache_hits.get_or_create(&LABELS).inc();
                if now >= cached.refresh_from {
                    self.refresh_in_background(key, lifetime);
                }
                return Ok(Exchanged {
                    token: cached.token,
                    cache_hit: true,
                });
            }
            // Stale, or would outlive this workload token: exchange afresh.
            self.cache.invalidate(&key).await;
        }
        self.metrics.cache_misses.get_or_create(&LABELS).inc();
        let inner = self.inner.clone();
        let sa = key.service_account.clone();
        let cached = self
            .cache
            .try_get_with(key.clone(), async move {
                let token = inner.exchange(&sa, lifetime).await?;
                Ok::<_, Denial>(Cached::new(token, SystemTime::now()))
            })
            .await
            .map_err(|shared: Arc<Denial>| (*shared).clone())?;
        // moka enforces its bound in housekeeping; run it on misses (rare by design) so
        // the bound and the eviction count hold now, not at some later operation.
        self.cache.run_pending_tasks().await;
        if cached.token.expires_at > latest_allowed {
            // Another caller's exchange, for a longer-lived workload token of the same
            // identity: this one must not outlive ours. Ask for our own, uncached.
            let token = self.inner.exchange(&key.service_account, lifetime).await?;
            return Ok(Exchanged::fresh(token));
        }
        Ok(Exchanged::fresh(cached.token))
    }

    /// One background TokenRequest per key at a time; its result replaces the entry.
    fn refresh_in_background(&self, key: ExchangeKey, lifetime: Duration) {
        let first = self
            .refreshing
            .lock()
            .map(|mut set| set.insert(key.clone()));
        if !matches!(first, Ok(true)) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let exchange = this.inner.exchange(&key.service_account, lifetime);
            match tokio::time::timeout(this.refresh_timeout, exchange).await {
                Ok(Ok(token)) => {
                    this.cache
                        .insert(key.clone(), Cached::new(token, SystemTime::now()))
                        .await
                }
                Ok(Err(denial)) => tracing::warn!(
                    namespace = key.service_account.namespace(),
                    service_account = key.service_account.name(),
                    reason = denial.reason.as_str(),
                    "refresh-ahead failed; the cached token serves until its margin"
                ),
                Err(_) => tracing::warn!("refresh-ahead timed out"),
            }
            if let Ok(mut set) = this.refreshing.lock() {
                set.remove(&key);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(expires_in: Duration, now: SystemTime) -> ExchangedToken {
        ExchangedToken::new("t".into(), now + expires_in)
    }

    #[test]
    fn the_margin_is_a_fifth_of_the_lifetime_but_at_least_a_minute() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Cached::new(token(Duration::from_secs(3600), now), now);
        assert_eq!(hour.serve_until, now + Duration::from_secs(2880));
        assert_eq!(hour.refresh_from, now + Duration::from_secs(2160));
        let short = Cached::new(token(Duration::from_secs(600), now), now);
        assert_eq!(short.serve_until, now + Duration::from_secs(480));
        assert_eq!(short.refresh_from, now + Duration::from_secs(360));
        let tiny = Cached::new(token(Duration::from_secs(100), now), now);
        assert_eq!(tiny.serve_until, now + Duration::from_secs(40));
        assert!(
            tiny.refresh_from <= now,
            "already inside the refresh window"
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn a_cached_token_stops_serving_a_fifth_of_its_life_and_a_minute_before_expiry(
                life in 0u64..=2 * 365 * 24 * 3600,
            ) {
                let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
                let life = Duration::from_secs(life);
                let cached = Cached::new(token(life, now), now);
                let expires_at = now + life;
                prop_assert!(cached.serve_until + MIN_MARGIN <= expires_at);
                prop_assert!(cached.serve_until + life / 5 <= expires_at);
                prop_assert!(cached.refresh_from <= cached.serve_until);
                // The margin is no larger than it must be: it leaves 80 % of a long life.
                if life >= MIN_MARGIN * 5 {
                    prop_assert_eq!(cached.serve_until, expires_at - life / 5);
                }
            }
        }
    }
}
