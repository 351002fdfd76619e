//! The in-proxy cache of exchanged tokens: a fixed number of shared-data slots (the
//! bound), each addressed by a hash of the whole presented token and holding that
//! token's full digest, so an entry is never served for another token. Slot keys carry
//! the plugin's scope, so two plugins or two configurations never share an entry.

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
    /// The header value to set (`Bearer <exchanged token>`).
    pub value: String,
}

const VERSION: u8 = 2;
const HEADER_LEN: usize = 1 + 32 + 8 + 8 + 8;
/// How often an insert retries after losing a compare-and-swap race.
const MAX_ATTEMPTS: usize = 4;

/// The digest of a presented token.
pub fn digest(token: &str) -> Digest {
    Sha256::digest(token.as_bytes()).into()
}

/// The slot of a digest among `slots`.
pub fn slot(digest: &Digest, slots: u32) -> u32 {
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % slots.max(1)
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
    /// value.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.value.len());
        out.push(VERSION);
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&self.workload_expiry.unwrap_or(0).to_be_bytes());
        out.extend_from_slice(&self.expiry.to_be_bytes());
        out.extend_from_slice(&self.not_after.to_be_bytes());
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
        let value = String::from_utf8(bytes[HEADER_LEN..].to_vec()).ok()?;
        Some(Entry {
            digest,
            workload_expiry: (workload != 0).then_some(workload),
            expiry,
            not_after,
            value,
        })
    }

    /// Whether this entry may answer for `digest` at `now`: same token, within its age
    /// limit, outside the refresh window of the exchanged token, and before the workload
    /// token's expiry.
    pub fn serves(&self, digest: &Digest, now: u64, refresh_before_expiry: u64) -> bool {
        self.digest == *digest
            && now < self.not_after
            && now.saturating_add(refresh_before_expiry) < self.expiry
            && self.workload_expiry.is_none_or(|w| now < w)
    }
}

/// The cached header value for `digest`, if a serving entry is there.
pub fn lookup(
    store: &impl SlotStore,
    config: &CacheConfig,
    digest: &Digest,
    now: u64,
) -> Option<String> {
    if !config.enabled {
        return None;
    }
    let (bytes, _) = store.load(slot(digest, config.slots)).ok()?;
    let entry = Entry::decode(&bytes?)?;
    entry
        .serves(digest, now, config.refresh_before_expiry.as_secs())
        .then_some(entry.value)
}

/// Stores `entry` in its slot, replacing whatever is there (the slot count is the
/// bound; the newest exchange wins), with compare-and-swap so concurrent workers never
/// interleave. An entry for the same token that lives and serves at least as long is
/// kept.
pub fn insert(
    store: &impl SlotStore,
    config: &CacheConfig,
    entry: &Entry,
) -> Result<(), StoreError> {
    if !config.enabled {
        return Ok(());
    }
    let slot = slot(&entry.digest, config.slots);
    let bytes = entry.encode();
    for _ in 0..MAX_ATTEMPTS {
        let (current, cas) = store.load(slot)?;
        if let Some(existing) = current.as_deref().and_then(Entry::decode)
            && existing.digest == entry.digest
            && existing.expiry >= entry.expiry
            && existing.not_after >= entry.not_after
        {
            return Ok(());
        }
        match store.store(slot, &bytes, cas) {
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
            value: format!("Bearer m-{token}"),
        }
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
        insert(&store, &c, &entry("a", 4000)).unwrap();
        assert_eq!(
            lookup(&store, &c, &digest("a"), 1000),
            Some("Bearer m-a".into())
        );
        assert_eq!(lookup(&store, &c, &digest("b"), 1000), None);
        insert(&store, &c, &entry("b", 4000)).unwrap();
        assert_eq!(
            lookup(&store, &c, &digest("a"), 1000),
            None,
            "evicted by the newer exchange"
        );
        assert_eq!(
            lookup(&store, &c, &digest("b"), 1000),
            Some("Bearer m-b".into())
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nothing_is_served_inside_the_refresh_window_or_after_the_workload_token_expires() {
        let store = MemoryStore::default();
        let c = config(8);
        insert(&store, &c, &entry("a", 4000)).unwrap();
        assert!(lookup(&store, &c, &digest("a"), 3939).is_some());
        assert_eq!(
            lookup(&store, &c, &digest("a"), 3940),
            None,
            "refresh window"
        );
        let short_workload = Entry {
            workload_expiry: Some(2000),
            ..entry("a", 4000)
        };
        let store = MemoryStore::default();
        insert(&store, &c, &short_workload).unwrap();
        assert!(lookup(&store, &c, &digest("a"), 1999).is_some());
        assert_eq!(
            lookup(&store, &c, &digest("a"), 2000),
            None,
            "workload token expired"
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn nothing_is_served_past_its_age_limit() {
        let store = MemoryStore::default();
        let c = config(8);
        let young = Entry {
            not_after: 1060,
            ..entry("a", 4000)
        };
        insert(&store, &c, &young).unwrap();
        assert!(lookup(&store, &c, &digest("a"), 1059).is_some());
        assert_eq!(lookup(&store, &c, &digest("a"), 1060), None, "too old");
        // A re-check after the age limit stores the same token again, serving longer.
        let renewed = Entry {
            not_after: 1120,
            ..young
        };
        insert(&store, &c, &renewed).unwrap();
        assert!(lookup(&store, &c, &digest("a"), 1100).is_some());
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
            insert(&store, &c, &entry(token, 4000)).unwrap();
        }
        clear(&store, 4);
        for token in ["a", "b", "c", "d", "e"] {
            assert_eq!(lookup(&store, &c, &digest(token), 1000), None);
        }
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_lost_compare_and_swap_is_retried() {
        let store = MemoryStore::default();
        let c = config(8);
        *store.conflicts.borrow_mut() = 2;
        insert(&store, &c, &entry("a", 4000)).unwrap();
        assert_eq!(*store.stores.borrow(), 3);
        assert_eq!(
            lookup(&store, &c, &digest("a"), 1000),
            Some("Bearer m-a".into())
        );
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn endless_conflicts_give_up_without_writing() {
        let store = MemoryStore::default();
        let c = config(8);
        *store.conflicts.borrow_mut() = 100;
        assert_eq!(
            insert(&store, &c, &entry("a", 4000)),
            Err(StoreError::CasMismatch)
        );
        assert_eq!(*store.stores.borrow(), MAX_ATTEMPTS);
        assert_eq!(lookup(&store, &c, &digest("a"), 1000), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_longer_lived_entry_for_the_same_token_is_kept() {
        let store = MemoryStore::default();
        let c = config(8);
        insert(&store, &c, &entry("a", 4000)).unwrap();
        insert(&store, &c, &entry("a", 3000)).unwrap();
        assert_eq!(*store.stores.borrow(), 1);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn a_disabled_cache_neither_stores_nor_serves() {
        let store = MemoryStore::default();
        let c = CacheConfig {
            enabled: false,
            ..config(8)
        };
        insert(&store, &c, &entry("a", 4000)).unwrap();
        assert_eq!(*store.stores.borrow(), 0);
        assert_eq!(lookup(&store, &c, &digest("a"), 1000), None);
    }

    #[wasm_bindgen_test(unsupported = test)]
    fn slots_stay_within_the_bound() {
        for token in ["a", "b", "c", "d", "e"] {
            assert!(slot(&digest(token), 3) < 3);
        }
    }
}
