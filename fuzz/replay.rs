//! Replays a fuzz target's committed corpus through its entry point: included by the
//! companion's and the filter's `fuzzing` tests (`#[path]`), which crates share no
//! test helper otherwise. Not a fuzz target.

use std::{fs, path::PathBuf};

/// Corpus files stay small (the largest seed also sets libFuzzer's `-max_len`).
pub const MAX_INPUT_BYTES: u64 = 64 * 1024;

/// Replays `fuzz/corpus/<target>/*` through `entry`; returns how many files ran.
pub fn replay(target: &str, entry: fn(&[u8])) -> usize {
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
