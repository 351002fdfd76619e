//! The committed corpus of each filter fuzz target, replayed through the same entry
//! point natively on the stable toolchain: every input the fuzzer once found (crashes included)
//! stays a test. A missing or empty corpus fails; it never passes vacuously.

use std::{fs, path::PathBuf};

use super::*;

#[path = "../../../fuzz/replay.rs"]
mod corpus;
use corpus::replay;

#[test]
fn every_bearer_corpus_input_keeps_the_invariants() {
    replay("bearer", bearer);
}

#[test]
fn every_filter_config_corpus_input_keeps_the_invariants() {
    replay("filter_config", config);
}

#[test]
fn every_check_response_corpus_input_keeps_the_invariants() {
    replay("check_response", check_response);
}

#[test]
fn every_cache_slot_corpus_input_keeps_the_invariants() {
    replay("cache_slot", cache_slot);
}

/// The corpus holds a slot of today's encoding, so the fuzzer starts from real entries: a
/// change of the slot layout must re-seed it (from `Entry::encode`).
#[test]
fn the_cache_slot_corpus_holds_a_slot_of_the_current_encoding() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/cache_slot");
    let stored = fs::read(corpus.join("stored-entry")).unwrap();
    let entry = Entry::decode(&stored).expect("stored-entry decodes with today's layout");
    assert!(entry.value.starts_with("Bearer "));
}
