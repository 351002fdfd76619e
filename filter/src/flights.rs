//! What one worker (one VM thread: proxy-wasm state is per worker) has in flight with the
//! companion: concurrent misses for one token coalesced onto one Check, and background
//! refreshes of cached entries. Pure bookkeeping under fixed bounds; the host layer sends
//! the Checks, resumes the waiting requests and answers them.
//!
//! Why the root context appears here: Envoy runs every gRPC call on the root context, but
//! the SDK hands the reply to the context that was running when the call was made, and
//! drops it when that context is gone. A Check that must outlive the request that caused
//! it (a background refresh, or a miss whose first request went away while others wait
//! on it) is therefore queued here and sent from the root's tick.

use std::{collections::VecDeque, time::Duration};

use crate::{cache::Digest, flow::Pending};

/// Most requests waiting on one token's Check; past it a request sends its own.
pub const MAX_WAITERS: usize = 128;
/// Most tokens with a coalesced Check in flight; past it a request sends its own.
pub const MAX_TOKENS: usize = 256;
/// Most background refreshes queued or in flight; past it no new one starts (the request
/// is still served from the cache).
pub const MAX_REFRESHES: usize = 64;
/// How long past its own timeout a Check may stay unanswered before it counts as lost
/// (Envoy always answers or times out a call; this only bounds the damage of a bug).
const LOST_AFTER: Duration = Duration::from_secs(1);

/// A Check ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// The encoded CheckRequest.
    pub message: Vec<u8>,
    /// gRPC initial metadata.
    pub metadata: Vec<(String, String)>,
    /// Call deadline.
    pub timeout: Duration,
}

/// A request paused until the Check another request (or the root) sent for the same token
/// answers; it gets the same verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiter {
    /// Its HTTP context.
    pub context: u32,
    /// When its own timeout ends (Unix ms).
    pub deadline_ms: u64,
    /// What it remembers for the reply.
    pub pending: Pending,
    /// Its own Check, for the root to send if the request it waits on goes away.
    check: Check,
}

/// Who sent the Check a token's waiters wait on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asker {
    /// The first request that missed, from its own context.
    Request(u32),
    /// The root, after that request went away (queued, then sent on its tick).
    Root,
}

#[derive(Debug)]
struct Miss {
    asker: Asker,
    /// When the Check was sent (Unix ms) and its timeout: past both, it is lost.
    sent_ms: u64,
    timeout: Duration,
    waiters: Vec<Waiter>,
}

impl Miss {
    fn lost(&self, now_ms: u64) -> bool {
        now_ms
            > self
                .sent_ms
                .saturating_add(millis(self.timeout + LOST_AFTER))
    }
}

/// What a Check the root sent is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A background refresh of this token's cache entry.
    Refresh {
        /// The token.
        digest: Digest,
        /// What the reply is cached with.
        pending: Pending,
    },
    /// The waiters of this token, whose first request went away.
    Miss(Digest),
}

/// Work for the root's tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Job {
    /// Send this background Check; report it with [`Flights::sent`], or
    /// [`Flights::refresh_done`] when it could not be sent.
    Refresh {
        /// The token.
        digest: Digest,
        /// What the reply is cached with.
        pending: Pending,
        /// The Check.
        check: Check,
    },
    /// The request this token's waiters waited on went away: answer `expired` (their own
    /// timeout has passed) as a failed Check, and send `check` (the first remaining
    /// waiter's, its timeout cut to what that waiter has left) for the rest, reporting
    /// it with [`Flights::sent`] as [`Call::Miss`], or [`Flights::settle_root`] when it
    /// could not be sent.
    Ask {
        /// The token.
        digest: Digest,
        /// Waiters past their deadline.
        expired: Vec<Waiter>,
        /// The Check for the others, if any remain.
        check: Option<Check>,
    },
}

/// A missing request's place: the host sends the Check for `Lead` and `Alone`, pauses
/// without one for `Wait`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// First for this token: send it; later misses wait on it.
    Lead(Check),
    /// Another Check for this token is in flight: wait for its verdict.
    Wait,
    /// Past a bound: send it, answering this request only.
    Alone(Check),
}

#[derive(Debug)]
enum Queued {
    Refresh {
        digest: Digest,
        pending: Pending,
        check: Check,
    },
    Ask(Digest),
}

/// One worker's Checks in flight. The tables are small by their bounds (a few hundred
/// entries at most), so they are plain vectors, searched in order: less code in the
/// `.wasm` than hash maps, and only misses and refresh points look.
#[derive(Debug, Default)]
pub struct Flights {
    misses: Table<Digest, Miss>,
    /// Tokens with a refresh queued or in flight, and when it started (Unix ms).
    refreshing: Table<Digest, u64>,
    queue: VecDeque<Queued>,
    /// The root's Checks in flight, by gRPC token.
    calls: Table<u32, Call>,
    /// A tick is armed for the queue.
    ticking: bool,
}

/// A small map: key, value pairs in a vector.
#[derive(Debug)]
struct Table<K, V>(Vec<(K, V)>);

impl<K, V> Default for Table<K, V> {
    fn default() -> Self {
        Table(Vec::new())
    }
}

impl<K: PartialEq, V> Table<K, V> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    fn insert(&mut self, key: K, value: V) {
        match self.get_mut(&key) {
            Some(v) => *v = value,
            None => self.0.push((key, value)),
        }
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        let at = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.swap_remove(at).1)
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.0.retain(|(_, v)| keep(v));
    }
}

impl Flights {
    /// A request (HTTP context `context`, at `now_ms`) missed the cache for `digest` and
    /// would send `check`.
    pub fn join(
        &mut self,
        digest: Digest,
        context: u32,
        now_ms: u64,
        pending: Pending,
        check: Check,
    ) -> Joined {
        if let Some(miss) = self.misses.get_mut(&digest) {
            if miss.lost(now_ms) {
                // Never answered: this request asks again, for the old waiters as well.
                miss.asker = Asker::Request(context);
                miss.sent_ms = now_ms;
                miss.timeout = check.timeout;
                return Joined::Lead(check);
            }
            if miss.waiters.len() >= MAX_WAITERS {
                return Joined::Alone(check);
            }
            miss.waiters.push(Waiter {
                context,
                deadline_ms: now_ms.saturating_add(millis(check.timeout)),
                pending,
                check,
            });
            return Joined::Wait;
        }
        if self.misses.len() >= MAX_TOKENS {
            return Joined::Alone(check);
        }
        let miss = Miss {
            asker: Asker::Request(context),
            sent_ms: now_ms,
            timeout: check.timeout,
            waiters: Vec::new(),
        };
        self.misses.insert(digest, miss);
        Joined::Lead(check)
    }

    /// The Check `context` sent for `digest` is answered (or could not be sent): the
    /// waiters to give the same verdict. Empty unless `context` leads that token's Check.
    pub fn settle(&mut self, digest: &Digest, context: u32) -> Vec<Waiter> {
        self.settle_asked_by(digest, Asker::Request(context))
    }

    /// The root's Check for `digest`'s waiters is answered (or could not be sent).
    pub fn settle_root(&mut self, digest: &Digest) -> Vec<Waiter> {
        self.settle_asked_by(digest, Asker::Root)
    }

    fn settle_asked_by(&mut self, digest: &Digest, asker: Asker) -> Vec<Waiter> {
        match self.misses.get(digest) {
            Some(miss) if miss.asker == asker => self
                .misses
                .remove(digest)
                .map(|m| m.waiters)
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// Request `context` went away before the Check it sent for `digest` was answered:
    /// its reply will not reach anyone, so the root asks again for the waiters.
    pub fn abandon(&mut self, digest: &Digest, context: u32) {
        let Some(miss) = self.misses.get_mut(digest) else {
            return;
        };
        if miss.asker != Asker::Request(context) {
            return;
        }
        if miss.waiters.is_empty() {
            self.misses.remove(digest);
        } else {
            miss.asker = Asker::Root;
            self.queue.push_back(Queued::Ask(*digest));
        }
    }

    /// Waiting request `context` went away: it needs no answer.
    pub fn leave(&mut self, digest: &Digest, context: u32) {
        if let Some(miss) = self.misses.get_mut(digest) {
            miss.waiters.retain(|w| w.context != context);
        }
    }

    /// A hit at `now_ms` past `digest`'s refresh point: queues the background Check
    /// `build` makes, unless one is in flight for that token or `MAX_REFRESHES` are.
    /// Whether it was queued.
    pub fn refresh(
        &mut self,
        digest: Digest,
        now_ms: u64,
        timeout: Duration,
        build: impl FnOnce() -> (Pending, Check),
    ) -> bool {
        let lost = |since: u64| now_ms > since.saturating_add(millis(timeout + LOST_AFTER));
        if self
            .refreshing
            .get(&digest)
            .is_some_and(|&since| !lost(since))
        {
            return false;
        }
        if self.refreshing.len() >= MAX_REFRESHES {
            self.refreshing.retain(|since| !lost(*since));
            if self.refreshing.len() >= MAX_REFRESHES {
                return false;
            }
        }
        let (pending, check) = build();
        self.refreshing.insert(digest, now_ms);
        self.queue.push_back(Queued::Refresh {
            digest,
            pending,
            check,
        });
        true
    }

    /// The background refresh of `digest` is over (answered, or not sent).
    pub fn refresh_done(&mut self, digest: &Digest) {
        self.refreshing.remove(digest);
    }

    /// Whether the root's tick must be armed now (work is queued and none is armed);
    /// if so it counts as armed.
    pub fn arm(&mut self) -> bool {
        let wanted = !self.queue.is_empty() && !self.ticking;
        self.ticking |= wanted;
        wanted
    }

    /// Arming the tick failed: the next request that queues work tries again.
    pub fn disarm(&mut self) {
        self.ticking = false;
    }

    /// The root's tick (at `now_ms`): everything queued, to do now. The tick is disarmed.
    pub fn take_jobs(&mut self, now_ms: u64) -> Vec<Job> {
        self.ticking = false;
        let queued: Vec<Queued> = self.queue.drain(..).collect();
        queued
            .into_iter()
            .filter_map(|q| match q {
                Queued::Refresh {
                    digest,
                    pending,
                    check,
                } => Some(Job::Refresh {
                    digest,
                    pending,
                    check,
                }),
                Queued::Ask(digest) => self.takeover(digest, now_ms),
            })
            .collect()
    }

    fn takeover(&mut self, digest: Digest, now_ms: u64) -> Option<Job> {
        let miss = self.misses.get_mut(&digest)?;
        if miss.asker != Asker::Root {
            return None;
        }
        let (expired, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut miss.waiters)
            .into_iter()
            .partition(|w| w.deadline_ms <= now_ms);
        miss.waiters = waiting;
        // Waiters joined in order, so the first has the least time left.
        let check = miss.waiters.first().map(|first| Check {
            timeout: Duration::from_millis(first.deadline_ms - now_ms),
            ..first.check.clone()
        });
        match &check {
            Some(c) => {
                miss.sent_ms = now_ms;
                miss.timeout = c.timeout;
            }
            None => {
                self.misses.remove(&digest);
            }
        }
        Some(Job::Ask {
            digest,
            expired,
            check,
        })
    }

    /// The root sent `call` as gRPC call `token`.
    pub fn sent(&mut self, token: u32, call: Call) {
        self.calls.insert(token, call);
    }

    /// The root's gRPC call `token` was answered: what it was for.
    pub fn answered(&mut self, token: u32) -> Option<Call> {
        self.calls.remove(&token)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
