//! Properties of the slot encoding: whatever an insert writes, a lookup reads back as the
//! same entry, and whatever a slot holds that decodes is exactly what encoding writes.

use proptest::prelude::*;

use super::*;

/// Unix seconds, the edges included: 0 is also how the encoding writes "none".
fn times() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0), Just(1), Just(u64::MAX), any::<u64>()]
}

fn entries() -> impl Strategy<Value = Entry> {
    (
        any::<[u8; 32]>(),
        proptest::option::of(times()),
        times(),
        times(),
        times(),
        // Header values as the companion sets them, and any other text.
        prop_oneof![
            "[A-Za-z0-9._~+/-]{1,64}".prop_map(|t| format!("Bearer {t}")),
            any::<String>(),
        ],
    )
        .prop_map(
            |(digest, workload_expiry, expiry, not_after, refresh_at, value)| Entry {
                digest,
                workload_expiry,
                expiry,
                not_after,
                refresh_at,
                value,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_entry_decodes_from_its_encoding_as_itself(entry in entries()) {
        // 0 encodes "no workload expiry", so an expiry at the epoch comes back 1 s later:
        // still long past, never read as "none" (which would outlive the workload token).
        let expected = Entry {
            workload_expiry: entry.workload_expiry.map(|w| w.max(1)),
            ..entry.clone()
        };
        prop_assert_eq!(Entry::decode(&entry.encode()), Some(expected));
    }

    #[test]
    fn a_decoded_entry_serves_exactly_when_the_original_would(
        entry in entries(),
        // Any real clock: past the epoch.
        now in prop_oneof![Just(1u64), 1u64..],
    ) {
        let decoded = Entry::decode(&entry.encode()).unwrap();
        prop_assert_eq!(decoded.serves(&entry.digest, now), entry.serves(&entry.digest, now));
    }

    #[test]
    fn every_slot_that_decodes_re_encodes_to_the_same_bytes(
        entry in entries(),
        flip in any::<(usize, u8)>(),
    ) {
        // Start from a real slot, disturb one byte anywhere (version, digest, times,
        // value): if it still decodes, it must be exactly what encoding writes.
        let mut bytes = entry.encode();
        let at = flip.0 % bytes.len();
        bytes[at] ^= flip.1;
        if let Some(decoded) = Entry::decode(&bytes) {
            prop_assert_eq!(decoded.encode(), bytes);
        }
    }

    #[test]
    fn a_torn_slot_never_decodes(entry in entries(), cut in any::<usize>()) {
        let bytes = entry.encode();
        let cut = cut % HEADER_LEN;
        prop_assert_eq!(Entry::decode(&bytes[..cut]), None);
    }
}
