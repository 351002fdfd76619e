//! Per-identity rate limiting: a token bucket per workload cluster and service account
//! (cluster B's `ns/x` is not cluster A's), kept in a bounded map
//! whose idle buckets expire (a bucket idle for `burst / rate` seconds is full again, so
//! forgetting it changes nothing).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::identity::ServiceAccountRef;

/// Most identities tracked at once; beyond it the least recently used bucket goes.
const MAX_IDENTITIES: u64 = 100_000;

/// The answer for one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go on. `near_limit`: less than half the burst is left, so a proxy should not
    /// reuse this answer (its requests would then bypass the limit).
    Allowed {
        /// Under half the burst left.
        near_limit: bool,
    },
    /// Refuse; a token is available again after this long.
    Throttled {
        /// For `retry-after`.
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Takes one token from `bucket` at `now`, refilling at `rate` per second up to `burst`.
fn take(bucket: &mut Bucket, rate: f64, burst: f64, now: Instant) -> Admission {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
    bucket.updated = now;
    if bucket.tokens >= 1.0 {
        bucket.tokens -= 1.0;
        Admission::Allowed {
            near_limit: bucket.tokens < burst / 2.0,
        }
    } else {
        let wait = (1.0 - bucket.tokens) / rate;
        Admission::Throttled {
            retry_after: Duration::from_secs_f64(wait),
        }
    }
}

/// Token buckets per service account.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: moka::future::Cache<(Arc<str>, ServiceAccountRef), Arc<Mutex<Bucket>>>,
}

impl RateLimiter {
    /// `rate` checks per second per identity, bursts of up to `burst`.
    pub fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        let idle = Duration::from_secs_f64(burst / rate) + Duration::from_secs(1);
        Self {
            rate,
            burst,
            buckets: moka::future::Cache::builder()
                .max_capacity(MAX_IDENTITIES)
                .time_to_idle(idle)
                .build(),
        }
    }

    /// Admits or throttles one check of `identity` from workload cluster `cluster`.
    pub async fn admit(&self, cluster: &Arc<str>, identity: &ServiceAccountRef) -> Admission {
        let now = Instant::now();
        let burst = self.burst;
        let bucket = self
            .buckets
            .get_with((cluster.clone(), identity.clone()), async move {
                Arc::new(Mutex::new(Bucket {
                    tokens: burst,
                    updated: now,
                }))
            })
            .await;
        match bucket.lock() {
            Ok(mut b) => take(&mut b, self.rate, self.burst, now),
            // A poisoned bucket only means another check panicked mid-update: admit.
            Err(_) => Admission::Allowed { near_limit: true },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_throttles_until_refilled() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 3.0,
            updated: t0,
        };
        for near_limit in [false, true, true] {
            assert_eq!(
                take(&mut b, 1.0, 3.0, t0),
                Admission::Allowed { near_limit }
            );
        }
        let Admission::Throttled { retry_after } = take(&mut b, 1.0, 3.0, t0) else {
            panic!("throttled")
        };
        assert!(
            (retry_after.as_secs_f64() - 1.0).abs() < 1e-6,
            "{retry_after:?}"
        );
        assert!(matches!(
            take(&mut b, 1.0, 3.0, t0 + Duration::from_millis(1000)),
            Admission::Allowed { .. }
        ));
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(matches!(
                take(&mut b, 1.0, 3.0, later),
                Admission::Allowed { .. }
            ));
        }
        assert!(matches!(
            take(&mut b, 1.0, 3.0, later),
            Admission::Throttled { .. }
        ));
    }

    #[tokio::test]
    async fn identities_have_separate_buckets() {
        let limiter = RateLimiter::new(0.001, 1);
        let a = ServiceAccountRef::new("ns", "a").unwrap();
        let b = ServiceAccountRef::new("ns", "b").unwrap();
        let (east, west): (Arc<str>, Arc<str>) = ("east".into(), "west".into());
        let allowed = Admission::Allowed { near_limit: true };
        assert_eq!(limiter.admit(&east, &a).await, allowed);
        assert!(matches!(
            limiter.admit(&east, &a).await,
            Admission::Throttled { .. }
        ));
        assert_eq!(limiter.admit(&east, &b).await, allowed);
        assert_eq!(
            limiter.admit(&west, &a).await,
            allowed,
            "the same name in another cluster is another identity"
        );
    }
}
