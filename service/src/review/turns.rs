//! Turns for TokenReviews of one workload cluster: at most `--review-max-in-flight` at
//! once. A client (source address) within its `--review-max-in-flight-per-source` share
//! is served before any client past its own, so one client sending well-formed junk can
//! take idle turns but never keeps another client waiting for more than one review.

use std::{
    collections::{HashMap, VecDeque},
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{sync::oneshot, time::Instant};

/// No turn came within the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// Whether the client was past its share (so clients within theirs went first).
    pub past_share: bool,
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

/// Waiters within their share (`[0]`) are handed a freed turn before those past it.
#[derive(Debug, Default)]
struct State {
    free: usize,
    waiting: [VecDeque<oneshot::Sender<()>>; 2],
    /// Per source: turns held or waited for. An entry exists only while non-zero, so the
    /// map is bounded by turns and waiters.
    claimed: HashMap<SourceKey, usize>,
}

impl State {
    fn claim(&mut self, key: SourceKey) {
        *self.claimed.entry(key).or_insert(0) += 1;
    }

    fn unclaim(&mut self, key: SourceKey) {
        if let Some(count) = self.claimed.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.claimed.remove(&key);
            }
        }
    }

    /// Hands a freed turn to the first live waiter, within-share ones first.
    fn hand_over(&mut self) {
        for queue in &mut self.waiting {
            while let Some(waiter) = queue.pop_front() {
                if waiter.send(()).is_ok() {
                    return;
                }
            }
        }
        self.free += 1;
    }
}

/// The turns of one cluster. Clones share them.
#[derive(Debug, Clone)]
pub struct Turns {
    state: Arc<Mutex<State>>,
    per_source: usize,
}

/// A held turn; handed on when dropped.
#[derive(Debug)]
pub struct Turn {
    state: Arc<Mutex<State>>,
    source: Option<SourceKey>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if let Some(key) = self.source {
            state.unclaim(key);
        }
        state.hand_over();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A waiter in a queue, until it holds a turn (`settled`) or gives up. Dropped unsettled
/// — timed out, or its future cancelled — it withdraws its claim and passes on a turn
/// that was handed to it meanwhile, so no turn is ever lost.
struct Waiting {
    state: Arc<Mutex<State>>,
    key: Option<SourceKey>,
    handed: oneshot::Receiver<()>,
    settled: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        self.handed.close();
        let got_one = self.handed.try_recv().is_ok();
        let mut state = lock(&self.state);
        if let Some(key) = self.key {
            state.unclaim(key);
        }
        if got_one {
            state.hand_over();
        }
    }
}

impl Turns {
    /// `max_in_flight` turns; a client past `per_source` of them waits behind the others
    /// (0: no shares, first come first served).
    pub fn new(max_in_flight: usize, per_source: usize) -> Self {
        Turns {
            state: Arc::new(Mutex::new(State {
                free: max_in_flight.max(1),
                ..State::default()
            })),
            per_source,
        }
    }

    /// Waits at most `wait` for a turn. A free turn is taken at once by anyone.
    pub async fn take(&self, source: Option<IpAddr>, wait: Duration) -> Result<Turn, Busy> {
        let until = Instant::now() + wait;
        let key = source.filter(|_| self.per_source > 0).map(SourceKey::of);
        let (handed, past_share) = {
            let mut state = lock(&self.state);
            let past_share =
                key.is_some_and(|k| state.claimed.get(&k).copied().unwrap_or(0) >= self.per_source);
            if let Some(k) = key {
                state.claim(k);
            }
            if state.free > 0 {
                state.free -= 1;
                return Ok(self.turn(key));
            }
            let (tx, rx) = oneshot::channel();
            state.waiting[usize::from(past_share)].push_back(tx);
            (rx, past_share)
        };
        // From here the wait can also end by this future being dropped (the Check's
        // deadline, a reset stream): the guard then gives back a turn handed to it.
        let mut waiting = Waiting {
            state: self.state.clone(),
            key,
            handed,
            settled: false,
        };
        let outcome = tokio::time::timeout_at(until, &mut waiting.handed).await;
        // Too late, unless the turn was handed over just now: then it is ours to use.
        let handed = matches!(outcome, Ok(Ok(()))) || {
            waiting.handed.close();
            waiting.handed.try_recv().is_ok()
        };
        if handed {
            waiting.settled = true;
            return Ok(self.turn(key));
        }
        Err(Busy { past_share })
    }

    fn turn(&self, source: Option<SourceKey>) -> Turn {
        Turn {
            state: self.state.clone(),
            source,
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

    fn waiter(turns: &Turns, source: &str) -> tokio::task::JoinHandle<Result<Turn, Busy>> {
        let (turns, source) = (turns.clone(), ip(source));
        tokio::spawn(async move { turns.take(source, Duration::from_secs(5)).await })
    }

    #[tokio::test]
    async fn idle_turns_go_to_anyone_and_none_left_is_busy() {
        let turns = Turns::new(3, 1);
        let _held: Vec<Turn> =
            futures::future::try_join_all((0..3).map(|_| turns.take(ip("10.0.0.1"), WAIT)))
                .await
                .unwrap();
        assert_eq!(
            turns.take(ip("10.0.0.2"), WAIT).await.unwrap_err(),
            Busy { past_share: false }
        );
        assert_eq!(
            turns.take(ip("10.0.0.1"), WAIT).await.unwrap_err(),
            Busy { past_share: true }
        );
    }

    #[tokio::test]
    async fn a_freed_turn_goes_to_a_client_within_its_share_first() {
        let turns = Turns::new(2, 1);
        let first = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        let _second = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        // The flooding client queued first, the other client after it.
        let flood = waiter(&turns, "10.0.0.1");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let other = waiter(&turns, "10.0.0.2");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        let _other = other
            .await
            .unwrap()
            .expect("the other client is served first");
        assert!(!flood.is_finished());
        flood.abort();
    }

    #[tokio::test]
    async fn turns_are_not_lost_to_waiters_that_give_up() {
        let turns = Turns::new(2, 1);
        for _ in 0..50 {
            let held = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
            let late = tokio::spawn({
                let turns = turns.clone();
                async move { turns.take(ip("10.0.0.2"), Duration::from_millis(1)).await }
            });
            let _also = turns.take(ip("10.0.0.3"), WAIT).await;
            drop(held);
            let _ = late.await;
        }
        let _a = turns.take(ip("10.0.0.4"), Duration::ZERO).await.unwrap();
        let _b = turns.take(ip("10.0.0.5"), Duration::ZERO).await.unwrap();
        assert!(lock(&turns.state).claimed.len() <= 2);
    }

    #[tokio::test]
    async fn a_waiter_dropped_after_a_turn_was_handed_to_it_passes_the_turn_on() {
        let turns = Turns::new(1, 1);
        let held = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        let mut waiter = Box::pin(turns.take(ip("10.0.0.2"), Duration::from_secs(5)));
        // Polled once: it is queued.
        tokio::select! {
            biased;
            _ = &mut waiter => panic!("no turn was free"),
            () = tokio::task::yield_now() => {}
        }
        // The turn goes to the queued waiter, whose Check is then cancelled (deadline,
        // reset) before it ever runs again.
        drop(held);
        drop(waiter);
        let _again = turns
            .take(ip("10.0.0.3"), Duration::ZERO)
            .await
            .expect("the turn came back");
        assert_eq!(
            lock(&turns.state).claimed.len(),
            1,
            "only 10.0.0.3 holds a claim"
        );
    }

    #[tokio::test]
    async fn a_cancelled_waiter_withdraws_its_claim() {
        let turns = Turns::new(1, 1);
        let _held = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        for _ in 0..3 {
            let mut waiter = Box::pin(turns.take(ip("10.0.0.2"), Duration::from_secs(5)));
            tokio::select! {
                biased;
                _ = &mut waiter => panic!("no turn was free"),
                () = tokio::task::yield_now() => {}
            }
        }
        // Three cancelled waits left no claim behind: 10.0.0.2 is within its share.
        assert!(
            !lock(&turns.state)
                .claimed
                .contains_key(&SourceKey::of("10.0.0.2".parse().unwrap()))
        );
    }

    #[tokio::test]
    async fn an_ipv6_64_is_one_client_and_mapped_ipv4_is_its_ipv4() {
        assert_eq!(
            SourceKey::of("2001:db8:1:2::1".parse().unwrap()),
            SourceKey::of("2001:db8:1:2:ffff::9".parse().unwrap())
        );
        assert_ne!(
            SourceKey::of("2001:db8:1:2::1".parse().unwrap()),
            SourceKey::of("2001:db8:1:3::1".parse().unwrap())
        );
        assert_eq!(
            SourceKey::of("::ffff:192.0.2.7".parse().unwrap()),
            SourceKey::of("192.0.2.7".parse().unwrap())
        );
    }

    #[tokio::test]
    async fn without_shares_it_is_first_come_first_served() {
        let turns = Turns::new(1, 0);
        let first = turns.take(ip("10.0.0.1"), WAIT).await.unwrap();
        let flood = waiter(&turns, "10.0.0.1");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let other = waiter(&turns, "10.0.0.2");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        let _flood = flood
            .await
            .unwrap()
            .expect("the first waiter is served first");
        other.abort();
    }
}
