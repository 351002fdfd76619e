//! Turns for TokenReviews of one workload cluster: at most `--review-max-in-flight` at
//! once, and at most `--review-max-in-flight-per-source` of those for one source address,
//! so one client sending well-formed junk cannot take every turn from the others.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// Why no turn was had within the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every turn of the cluster was taken.
    Cluster,
    /// The source held its whole share.
    Source,
}

/// Who asks, as far as sharing goes: an IPv4 address, or an IPv6 /64 (one host can
/// use a whole /64, so single IPv6 addresses would be no bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SourceKey(IpAddr);

impl SourceKey {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => SourceKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    SourceKey(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

#[derive(Debug, Default)]
struct Shares {
    /// Turns held per source; an entry exists only while it holds one, so the map is
    /// bounded by the cluster's turns.
    held: Mutex<HashMap<SourceKey, usize>>,
    /// Woken whenever a source gives a turn back.
    freed: Notify,
}

/// The turns of one cluster. Clones share them.
#[derive(Debug, Clone)]
pub struct Turns {
    cluster: Arc<Semaphore>,
    per_source: usize,
    shares: Arc<Shares>,
}

/// A held turn; given back when dropped.
#[derive(Debug)]
pub struct Turn {
    _cluster: OwnedSemaphorePermit,
    _source: Option<SourceTurn>,
}

#[derive(Debug)]
struct SourceTurn {
    key: SourceKey,
    shares: Arc<Shares>,
}

impl Drop for SourceTurn {
    fn drop(&mut self) {
        {
            let mut held = self
                .shares
                .held
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = held.get_mut(&self.key) {
                *count -= 1;
                if *count == 0 {
                    held.remove(&self.key);
                }
            }
        }
        self.shares.freed.notify_waiters();
    }
}

impl Turns {
    /// `max_in_flight` turns, `per_source` of them at most for one source (0: no share).
    pub fn new(max_in_flight: usize, per_source: usize) -> Self {
        Turns {
            cluster: Arc::new(Semaphore::new(max_in_flight.max(1))),
            per_source,
            shares: Arc::default(),
        }
    }

    /// Waits at most `wait` for a turn: first the source's share (when `source` is known
    /// and shares are on), then one of the cluster's.
    pub async fn take(&self, source: Option<IpAddr>, wait: Duration) -> Result<Turn, Busy> {
        let until = Instant::now() + wait;
        let source = match source {
            Some(ip) if self.per_source > 0 => {
                Some(self.source_turn(SourceKey::of(ip), until).await?)
            }
            _ => None,
        };
        let cluster = tokio::time::timeout_at(until, self.cluster.clone().acquire_owned())
            .await
            .map_err(|_| Busy::Cluster)?
            .map_err(|_| Busy::Cluster)?;
        Ok(Turn {
            _cluster: cluster,
            _source: source,
        })
    }

    async fn source_turn(&self, key: SourceKey, until: Instant) -> Result<SourceTurn, Busy> {
        loop {
            // Registered before the check, so a turn given back in between still wakes us.
            let freed = self.shares.freed.notified();
            {
                let mut held = self
                    .shares
                    .held
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let count = held.entry(key).or_insert(0);
                if *count < self.per_source {
                    *count += 1;
                    return Ok(SourceTurn {
                        key,
                        shares: self.shares.clone(),
                    });
                }
            }
            if tokio::time::timeout_at(until, freed).await.is_err() {
                return Err(Busy::Source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_millis(50);

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[tokio::test]
    async fn one_source_gets_its_share_and_the_others_the_rest() {
        let turns = Turns::new(4, 2);
        let a1 = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        let _a2 = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        assert_eq!(
            turns.take(ip("10.0.0.1"), WAIT).await.unwrap_err(),
            Busy::Source
        );
        let _b1 = turns.take(ip("10.0.0.2"), WAIT).await.unwrap();
        let _b2 = turns.take(ip("10.0.0.2"), WAIT).await.unwrap();
        // The cluster is full now, whoever asks.
        assert_eq!(
            turns.take(ip("10.0.0.3"), WAIT).await.unwrap_err(),
            Busy::Cluster
        );
        assert_eq!(turns.take(None, WAIT).await.unwrap_err(), Busy::Cluster);
        drop(a1);
        let _a3 = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
    }

    #[tokio::test]
    async fn a_waiting_source_gets_the_turn_its_own_request_gives_back() {
        let turns = Turns::new(4, 1);
        let held = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        let waiter = {
            let turns = turns.clone();
            tokio::spawn(async move { turns.take(ip("10.0.0.1"), Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        assert!(waiter.await.unwrap().is_ok());
        assert!(turns.shares.held.lock().unwrap().len() <= 1);
    }

    #[tokio::test]
    async fn an_ipv6_64_is_one_source_and_mapped_ipv4_is_its_ipv4() {
        let turns = Turns::new(4, 1);
        let _a = turns.take(ip("2001:db8:1:2::1"), WAIT).await.unwrap();
        assert_eq!(
            turns
                .take(ip("2001:db8:1:2:ffff::9"), WAIT)
                .await
                .unwrap_err(),
            Busy::Source
        );
        assert!(turns.take(ip("2001:db8:1:3::1"), WAIT).await.is_ok());
        let _v4 = turns.take(ip("192.0.2.7"), WAIT).await.unwrap();
        assert_eq!(
            turns.take(ip("::ffff:192.0.2.7"), WAIT).await.unwrap_err(),
            Busy::Source
        );
    }

    #[tokio::test]
    async fn without_shares_only_the_cluster_bound_applies() {
        let turns = Turns::new(2, 0);
        let _a = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        let _b = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        assert_eq!(
            turns.take(ip("10.0.0.2"), WAIT).await.unwrap_err(),
            Busy::Cluster
        );
    }
}
