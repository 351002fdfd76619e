//! The in-proxy cache of exchanged tokens: a fixed number of shared-data slots (the
//! bound), placed two-choice set-associatively by a hash of the whole presented token,
//! each holding that token's full digest, so an entry is never served for another token.
//! Slot keys carry the plugin's scope, so two plugins or two configurations never share
//! an entry.

use sha2::{Digest as _, Sha256};

use crate::config::CacheConfig;

/// SHA-256 of a presented token.
pub type Digest = [u8; 32];

/// Where slots live: proxy-wasm shared data on the host, memory in tests. Writes are
/// compare-and-swap against the token `load` returned.
pub trait SlotStore {
    /// The bytes in `slot` (if any) and the CAS token to replace them with.
    fn load(&self, slot: u32) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    /// Writes `bytes` to `slot` if it still holds what `cas` named.
    fn store(&self, slot: u32, bytes: &[u8], cas: Option<u32>) -> Result<(), StoreError>;
}

/// Why a slot could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another worker changed the slot since it was read.
    CasMismatch,
    /// The host refused the call.
    Host,
}

/// One cached exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// SHA-256 of the presented (workload) token.
    pub digest: Digest,
    /// When the workload token's intended life ends (Unix s), if it says.
    pub workload_expiry: Option<u64>,
    /// When the exchanged token expires (Unix s).
    pub expiry: u64,
    /// Served until then at the latest (Unix s): stored + min(max age, companion's limit).
    pub not_after: u64,
    /// From then on (Unix s) a hit also asks for a background refresh: see [`refresh_at`].
    pub refresh_at: u64,
    /// The header value to set (`Bearer <exchanged token>`).
    pub value: String,
}

const VERSION: u8 = 3;
const HEADER_LEN: usize = 1 + 32 + 8 + 8 + 8 + 8;
/// How often an insert retries after losing a compare-and-swap race.
const MAX_ATTEMPTS: usize = 4;

/// The digest of a presented token.
pub fn digest(token: &str) -> Digest {
    Sha256::digest(token.as_bytes()).into()
}

/// Ways per set.
pub const WAYS: u32 = 4;

/// The least time (s) between storing an entry and its refresh point, so a companion that
/// keeps answering with the same exchanged token costs one background Check a second per
/// worker at most, not one per round trip.
const MIN_REFRESH_GAP_S: u64 = 1;

/// When an entry stored at `now`, served for `age` seconds, for an exchanged token
/// expiring at `expiry`, starts asking for a background refresh: `window` before the
/// exchanged token's expiry, or at 70 % of its age (the companion revalidates its own
/// verdicts at the same point), whichever comes first; never sooner than a second after
/// `now`. A refresh point at or past the end of use means no refresh ahead.
pub fn refresh_at(now: u64, age: u64, expiry: u64, window: u64) -> u64 {
    let by_expiry = expiry.saturating_sub(window);
    let by_age = now.saturating_add((age.saturating_mul(7)).div_ceil(10));
    by_expiry
        .min(by_age)
        .max(now.saturating_add(MIN_REFRESH_GAP_S))
}

/// The slots a digest may occupy among `slots`: the ways of its two candidate sets (from
/// two independent parts of the digest), the first set's first. With fewer than `WAYS`
/// slots all of them form one set; a remainder past the last whole set is unused.
pub fn candidates(digest: &Digest, slots: u32) -> Vec<u32> {
    let slots = slots.max(1);
    let ways = WAYS.min(slots);
    let sets = slots / ways;
    let set = |at: usize| {
        u32::from_be_bytes([digest[at], digest[at + 1], digest[at + 2], digest[at + 3]]) % sets
    };
    let (first, second) = (set(0), set(4));
    let mut out: Vec<u32> = (0..ways).map(|w| first * ways + w).collect();
    if second != first {
        out.extend((0..ways).map(|w| second * ways + w));
    }
    out
}

/// The scope of a plugin's slots: a digest of its name, root id and whole configuration
/// (every setting, the companion's cluster and the cache's included).
pub fn scope(plugin_name: &[u8], root_id: &[u8], configuration: &[u8]) -> String {
    let mut hash = Sha256::new();
    for part in [plugin_name, root_id, configuration] {
        hash.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
        hash.update(part);
    }
    hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The shared-data key of a slot in `scope`.
pub fn key(scope: &str, slot: u32) -> String {
    format!("tokensmith.{scope}.cache.{slot}")
}

impl Entry {
    /// Serialized form: version, digest, workload expiry (0 = none), expiry, not after,
    /// refresh point, value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.value.len());
        out.push(VERSION);
        out.extend_from_slice(&self.digest);
        // 0 stands for none: an expiry at the epoch is written as 1 s past it, which is as
        // long gone for any real clock (else it would read back as no expiry at all).
        let workload = self.workload_expiry.map_or(0, |w| w.max(1));
        out.extend_from_slice(&workload.to_be_bytes());
        out.extend_from_slice(&self.expiry.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
        out.extend_from_slice(&self.refresh_at.to_be_bytes());
        out.extend_from_slice(self.value.as_bytes());
        out
    }

    /// Parses `encode`'s output; anything else (another version, torn bytes) is `None`.
    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        if bytes.len() < HEADER_LEN || bytes[0] != VERSION {
            return None;
        }
        let digest: Digest = bytes[1..33].try_into().ok()?;
        let workload = u64::from_be_bytes(bytes[33..41].try_into().ok()?);
        let expiry = u64::from_be_bytes(bytes[41..49].try_into().ok()?);
        let not_after = u64::from_be_bytes(bytes[49..57].try_into().ok()?);
        let refresh_at = u64::from_be_bytes(bytes[57..65].try_into().ok()?);
        let value = String::from_utf8(bytes[HEADER_LEN..].to_vec()).ok()?;
        Some(Entry {
            digest,
            workload_expiry: (workload != 0).then_some(workload),
            expiry,
            not_after,
            refresh_at,
            value,
        })
    }

    /// Whether this entry can still answer anyone at `now` (else its slot is free).
    fn alive(&self, now: u64) -> bool {
        now < self.not_after && now < self.expiry && self.workload_expiry.is_none_or(|w| now < w)
    }

    /// Whether this entry may answer for `digest` at `now`: same token, within its age
    /// limit, before the exchanged token's expiry, and before the workload token's.
    pub fn serves(&self, digest: &Digest, now: u64) -> bool {
        self.digest == *digest && self.alive(now)
    }
}

/// A serving entry, as a lookup found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The header value to set.
    pub value: String,
    /// Past its refresh point: serve it, and ask the companion again in the background.
    pub refresh: bool,
}

/// The cached header value for `digest`, if a serving entry is there.
pub fn lookup(
    store: &impl SlotStore,
    config: &CacheConfig,
    digest: &Digest,
    now: u64,
) -> Option<Hit> {
    if !config.enabled {
        return None;
    }
    let (_, entry, _) = find(store, config, digest)?;
    // A token has one entry: this one answers, or nothing does.
    entry.serves(digest, now).then_some(Hit {
        refresh: now >= entry.refresh_at,
        value: entry.value,
    })
}

/// The token's own entry among its candidate slots: slot, entry, CAS token.
fn find(
    store: &impl SlotStore,
    config: &CacheConfig,
    digest: &Digest,
) -> Option<(u32, Entry, Option<u32>)> {
    candidates(digest, config.slots)
        .into_iter()
        .find_map(|slot| {
            let Ok((Some(bytes), cas)) = store.load(slot) else {
                return None;
            };
            let entry = Entry::decode(&bytes).filter(|e| e.digest == *digest)?;
            Some((slot, entry, cas))
        })
}

/// Empties the token's entry (the companion refused the token on a background Check:
/// the next request must be checked again), compare-and-swap like every write.
pub fn remove(
    store: &impl SlotStore,
    config: &CacheConfig,
    digest: &Digest,
) -> Result<(), StoreError> {
    for _ in 0..MAX_ATTEMPTS {
        let Some((slot, _, cas)) = find(store, config, digest) else {
            return Ok(());
        };
        match store.store(slot, &[], cas) {
            Err(StoreError::CasMismatch) => continue,
            other => return other,
        }
    }
    Err(StoreError::CasMismatch)
}

/// One candidate slot as read: where, what it holds, its CAS token.
struct Seen {
    slot: u32,
    entry: Option<Entry>,
    cas: Option<u32>,
}

/// A free way (empty, or serving no one at `now`) of the candidate set with the most
/// free ways, the first set on a tie.
fn emptier_set(seen: &[Seen], now: u64) -> Option<&Seen> {
    let free = |s: &&Seen| s.entry.as_ref().is_none_or(|e| !e.alive(now));
    let ways = (WAYS as usize).min(seen.len());
    let (first, second) = seen.split_at(ways);
    let count = |set: &[Seen]| set.iter().filter(free).count();
    let set = if count(second) > count(first) {
        second
    } else {
        first
    };
    set.iter().find(free)
}

/// Stores `entry` (at `now`) among its candidate slots, with compare-and-swap so
/// concurrent workers never interleave: over the token's own entry, unless that lives,
/// serves and waits for its refresh at least as long (then it is kept); else in an empty
/// or expired way; else over the candidate nearest its end of use. The slot count stays
/// the bound.
pub fn insert(
    store: &impl SlotStore,
    config: &CacheConfig,
    entry: &Entry,
    now: u64,
) -> Result<(), StoreError> {
    if !config.enabled {
        return Ok(());
    }
    let bytes = entry.encode();
    let slots = candidates(&entry.digest, config.slots);
    for _ in 0..MAX_ATTEMPTS {
        let mut seen = Vec::with_capacity(slots.len());
        for &slot in &slots {
            let (current, cas) = store.load(slot)?;
            let entry = current.as_deref().and_then(Entry::decode);
            seen.push(Seen { slot, entry, cas });
        }
        let own = seen
            .iter()
            .find(|s| s.entry.as_ref().is_some_and(|e| e.digest == entry.digest));
        let target = match own {
            Some(Seen {
                entry: Some(existing),
                ..
            }) if existing.expiry >= entry.expiry
                && existing.not_after >= entry.not_after
                && existing.refresh_at >= entry.refresh_at =>
            {
                return Ok(());
            }
            Some(own) => own,
            // Two choices only balance if the emptier set is taken.
            None => emptier_set(&seen, now)
                .or_else(|| {
                    seen.iter().min_by_key(|s| {
                        s.entry.as_ref().map_or((0, 0), |e| (e.not_after, e.expiry))
                    })
                })
                .ok_or(StoreError::Host)?,
        };
        match store.store(target.slot, &bytes, target.cas) {
            Err(StoreError::CasMismatch) => continue,
            other => return other,
        }
    }
    Err(StoreError::CasMismatch)
}

/// Empties the first `slots` slots of `store` (a scope given up on reconfiguration), so
/// shared data holds at most one configuration's entries per plugin.
pub fn clear(store: &impl SlotStore, slots: u32) {
    for slot in 0..slots {
        if let Ok((Some(bytes), cas)) = store.load(slot)
            && !bytes.is_empty()
        {
            // A lost race means someone rewrote it: nothing to clear then.
            let _ = store.store(slot, &[], cas);
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod properties;

#[cfg(test)]
pub(crate) mod tests {
    use std::{cell::RefCell, collections::HashMap, time::Duration};

    use wasm_bindgen_test::wasm_bindgen_test;

    use super::*;

    /// Shared data in memory, with CAS tokens and injectable conflicts.
    #[derive(Default)]
    pub(crate) struct MemoryStore {
        slots: RefCell<HashMap<u32, (Vec<u8>, u32)>>,
        /// How many upcoming stores fail with CasMismatch (after bumping the slot, as a
        /// concurrent writer would).
        pub(crate) conflicts: RefCell<usize>,
        pub(crate) stores: RefCell<usize>,
    }

    impl SlotStore for MemoryStore {
        fn load(&self, slot: u32) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            Ok(match self.slots.borrow().get(&slot) {
                Some((bytes, cas)) => (Some(bytes.clone()), Some(*cas)),
                None => (None, None),
            })
        }

        fn store(&self, slot: u32, bytes: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
            *self.stores.borrow_mut() += 1;
            let mut slots = self.slots.borrow_mut();
            if *self.conflicts.borrow() > 0 {
                *self.conflicts.borrow_mut() -= 1;
                let bumped = slots.get(&slot).map_or(1, |(_, c)| c + 1);
                slots.insert(slot, (b"someone else".to_vec(), bumped));
                return Err(StoreError::CasMismatch);
            }
            let current = slots.get(&slot).map(|(_, c)| *c);
            if cas.is_some() && cas != current {
                return Err(StoreError::CasMismatch);
            }
            slots.insert(slot, (bytes.to_vec(), current.map_or(1, |c| c + 1)));
            Ok(())
        }
    }

    fn config(slots: u32) -> CacheConfig {
        CacheConfig {
            enabled: true,
            slots,
            refresh_before_expiry: Duration::from_secs(60),
            max_age: Duration::from_secs(60),
        }
    }

    fn entry(token: &str, expiry: u64) -> Entry {
        Entry {
            digest: digest(token),
            workload_expiry: Some(5000),
            expiry,
            not_after: 10_000,
            refresh_at: expiry - 60,
            value: format!("Bearer m-{token}"),
        }
    }

    fn value(store: &MemoryStore, c: &CacheConfig, token: &str, now: u64) -> Option<String> {
        lookup(store, c, &digest(token), now).map(|hit| hit.value)
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn entries_round_trip_through_their_encoding() {
        let e = entry("w", 4000);
        assert_eq!(Entry::decode(&e.encode()), Some(e));
        let none = Entry {
            workload_expiry: None,
            ..entry("w", 4000)
        };
        assert_eq!(Entry::decode(&none.encode()), Some(none));
        assert_eq!(Entry::decode(b"short"), None);
        let mut other_version = entry("w", 4000).encode();
        other_version[0] = 9;
        assert_eq!(Entry::decode(&other_version), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_stored_token_is_served_for_the_same_token_only() {
        let store = MemoryStore::default();
        // One slot: every token collides, so only the digest keeps them apart.
        let c = config(1);
        insert(&store, &c, &entry("a", 4000), 1000).unwrap();
        assert_eq!(value(&store, &c, "a", 1000), Some("Bearer m-a".into()));
        assert_eq!(value(&store, &c, "b", 1000), None);
        insert(&store, &c, &entry("b", 4000), 1000).unwrap();
        assert_eq!(
            value(&store, &c, "a", 1000),
            None,
            "evicted by the newer exchange"
        );
        assert_eq!(value(&store, &c, "b", 1000), Some("Bearer m-b".into()));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn past_its_refresh_point_an_entry_is_served_and_asks_for_a_refresh_until_it_expires() {
        let store = MemoryStore::default();
        let c = config(8);
        insert(&store, &c, &entry("a", 4000), 1000).unwrap();
        let hit = |now| lookup(&store, &c, &digest("a"), now);
        assert_eq!(hit(3939).map(|h| h.refresh), Some(false));
        assert_eq!(hit(3940).map(|h| h.refresh), Some(true), "refresh window");
        assert_eq!(hit(3999).map(|h| h.refresh), Some(true));
        assert_eq!(hit(4000), None, "the exchanged token expired");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nothing_is_served_after_the_workload_token_expires() {
        let c = config(8);
        let short_workload = Entry {
            workload_expiry: Some(2000),
            ..entry("a", 4000)
        };
        let store = MemoryStore::default();
        insert(&store, &c, &short_workload, 1000).unwrap();
        assert!(value(&store, &c, "a", 1999).is_some());
        assert_eq!(value(&store, &c, "a", 2000), None, "workload token expired");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn the_refresh_point_is_the_window_or_seven_tenths_of_the_age_and_never_at_once() {
        assert_eq!(refresh_at(1000, 600, 1700, 60), 1420, "70 % of 600 s");
        assert_eq!(refresh_at(1000, 600, 1400, 60), 1340, "60 s before expiry");
        assert_eq!(refresh_at(1000, 10, 5000, 60), 1007);
        assert_eq!(
            refresh_at(1000, 1, 5000, 60),
            1001,
            "a 1 s entry: never ahead"
        );
        // Stored inside the window already: a second later, not on the next hit.
        assert_eq!(refresh_at(1000, 60, 1030, 60), 1001);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn removing_empties_the_tokens_entry_only() {
        let store = MemoryStore::default();
        let c = config(1);
        insert(&store, &c, &entry("a", 4000), 1000).unwrap();
        remove(&store, &c, &digest("b")).unwrap();
        assert!(value(&store, &c, "a", 1000).is_some(), "not b's entry");
        *store.conflicts.borrow_mut() = 1;
        remove(&store, &c, &digest("a")).unwrap();
        // The conflicting writer left something that is not a's entry: nothing to remove.
        assert_eq!(value(&store, &c, "a", 1000), None);
        insert(&store, &c, &entry("a", 4000), 1000).unwrap();
        remove(&store, &c, &digest("a")).unwrap();
        assert_eq!(value(&store, &c, "a", 1000), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nothing_is_served_past_its_age_limit() {
        let store = MemoryStore::default();
        let c = config(8);
        let young = Entry {
            not_after: 1060,
            ..entry("a", 4000)
        };
        insert(&store, &c, &young, 1000).unwrap();
        assert!(value(&store, &c, "a", 1059).is_some());
        assert_eq!(value(&store, &c, "a", 1060), None, "too old");
        // A re-check after the age limit stores the same token again, serving longer.
        let renewed = Entry {
            not_after: 1120,
            ..young
        };
        insert(&store, &c, &renewed, 1000).unwrap();
        assert!(value(&store, &c, "a", 1100).is_some());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn scopes_differ_by_plugin_root_and_configuration() {
        let base = scope(b"istio-system.tokensmith", b"", b"{}");
        assert_eq!(base.len(), 16);
        assert_eq!(base, scope(b"istio-system.tokensmith", b"", b"{}"));
        for other in [
            scope(b"istio-system.other", b"", b"{}"),
            scope(b"istio-system.tokensmith", b"r", b"{}"),
            scope(b"istio-system.tokensmith", b"", b"{ }"),
            // Length prefixes keep the parts apart.
            scope(b"istio-system.tokensmit", b"h", b"{}"),
        ] {
            assert_ne!(base, other);
        }
        assert_eq!(key("ab", 7), "tokensmith.ab.cache.7");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn clearing_empties_every_slot() {
        let store = MemoryStore::default();
        let c = config(4);
        for token in ["a", "b", "c", "d", "e"] {
            insert(&store, &c, &entry(token, 4000), 1000).unwrap();
        }
        clear(&store, 4);
        for token in ["a", "b", "c", "d", "e"] {
            assert_eq!(value(&store, &c, token, 1000), None);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_lost_compare_and_swap_is_retried() {
        let store = MemoryStore::default();
        let c = config(8);
        *store.conflicts.borrow_mut() = 2;
        insert(&store, &c, &entry("a", 4000), 1000).unwrap();
        assert_eq!(*store.stores.borrow(), 3);
        assert_eq!(value(&store, &c, "a", 1000), Some("Bearer m-a".into()));
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn endless_conflicts_give_up_without_writing() {
        let store = MemoryStore::default();
        let c = config(8);
        *store.conflicts.borrow_mut() = 100;
        assert_eq!(
            insert(&store, &c, &entry("a", 4000), 1000),
            Err(StoreError::CasMismatch)
        );
        assert_eq!(*store.stores.borrow(), MAX_ATTEMPTS);
        assert_eq!(value(&store, &c, "a", 1000), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_longer_lived_entry_for_the_same_token_is_kept() {
        let store = MemoryStore::default();
        let c = config(8);
        insert(&store, &c, &entry("a", 4000), 1000).unwrap();
        insert(&store, &c, &entry("a", 3000), 1000).unwrap();
        assert_eq!(*store.stores.borrow(), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_disabled_cache_neither_stores_nor_serves() {
        let store = MemoryStore::default();
        let c = CacheConfig {
            enabled: false,
            ..config(8)
        };
        insert(&store, &c, &entry("a", 4000), 1000).unwrap();
        assert_eq!(*store.stores.borrow(), 0);
        assert_eq!(value(&store, &c, "a", 1000), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn candidate_slots_stay_within_the_bound_and_are_distinct() {
        for slots in [1, 3, 4, 5, 8, 4096, 65_536] {
            for token in ["a", "b", "c", "d", "e", "f"] {
                let mut found = candidates(&digest(token), slots);
                assert!(found.len() <= 2 * WAYS as usize && !found.is_empty());
                assert!(found.iter().all(|&s| s < slots), "{slots}: {found:?}");
                found.sort_unstable();
                found.dedup();
                assert_eq!(found.len(), candidates(&digest(token), slots).len());
            }
        }
        assert_eq!(candidates(&digest("a"), 3), [0, 1, 2]);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn half_as_many_identities_as_slots_all_stay_cached() {
        // Direct mapping loses about a fifth of these to collisions, for ever.
        let store = MemoryStore::default();
        let c = config(4096);
        let tokens: Vec<String> = (0..2048).map(|i| format!("token-{i}")).collect();
        for token in &tokens {
            insert(&store, &c, &entry(token, 4000), 1000).unwrap();
        }
        let cached = tokens
            .iter()
            .filter(|t| value(&store, &c, t, 1000).is_some())
            .count();
        assert_eq!(cached, tokens.len());
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_full_set_gives_up_its_entry_nearest_the_end_of_use() {
        // Four slots: one set, which every token's two choices name.
        let store = MemoryStore::default();
        let c = config(4);
        for (token, not_after) in [("a", 9000), ("b", 7000), ("c", 9500), ("d", 8000)] {
            let e = Entry {
                not_after,
                ..entry(token, 10_000)
            };
            insert(&store, &c, &e, 1000).unwrap();
        }
        insert(&store, &c, &entry("e", 10_000), 1000).unwrap();
        let kept: Vec<&str> = ["a", "b", "c", "d", "e"]
            .into_iter()
            .filter(|t| value(&store, &c, t, 1000).is_some())
            .collect();
        assert_eq!(kept, ["a", "c", "d", "e"], "b ended soonest");
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_way_that_serves_no_one_is_taken_before_any_eviction() {
        let store = MemoryStore::default();
        let c = config(4);
        for (token, not_after) in [("a", 9000), ("b", 1500), ("c", 9500), ("d", 8000)] {
            let e = Entry {
                not_after,
                ..entry(token, 10_000)
            };
            insert(&store, &c, &e, 1000).unwrap();
        }
        // At 2000, b serves no one: its way is free although d ends sooner than a and c.
        insert(&store, &c, &entry("e", 10_000), 2000).unwrap();
        for token in ["a", "c", "d", "e"] {
            assert!(value(&store, &c, token, 2000).is_some(), "{token}");
        }
    }
}
