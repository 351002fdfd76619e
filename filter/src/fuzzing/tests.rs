//! The committed corpus of each filter fuzz target, replayed through the same entry
//! point natively on the stable toolchain: every input the fuzzer once found (crashes included)
//! stays a test. A missing or empty corpus fails; it never passes vacuously.

use std::{fs, path::PathBuf};

use super::*;

/// Corpus files stay small (the largest seed also sets libFuzzer's `-max_len`).
const MAX_INPUT_BYTES: u64 = 64 * 1024;

/// Replays `fuzz/corpus/<target>/*` through `entry`; returns how many files ran.
fn replay(target: &str, entry: fn(&[u8])) -> usize {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    assert!(
        fuzz.join("fuzz_targets")
            .join(format!("{target}.rs"))
            .is_file(),
        "fuzz/fuzz_targets/{target}.rs is missing: the replayed target must be a fuzzed one"
    );
    let dir = fuzz.join("corpus").join(target);
    let files = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz/corpus/{target}: {e}"))
        .map(|entry| entry.expect("a corpus entry").path())
        .filter(|path| path.is_file())
        .collect::<Vec<_>>();
    assert!(!files.is_empty(), "fuzz/corpus/{target} is empty");
    for path in &files {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let size = fs::metadata(path).expect("corpus file metadata").len();
        assert!(
            size <= MAX_INPUT_BYTES,
            "fuzz/corpus/{target}/{name}: {size} bytes; keep corpus files under 64 KiB"
        );
        let input = fs::read(path).expect("a readable corpus file");
        // The entry's own panic message names the invariant; this names the file.
        if std::panic::catch_unwind(|| entry(&input)).is_err() {
            panic!("fuzz/corpus/{target}/{name} breaks an invariant (message above)");
        }
    }
    files.len()
}

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
