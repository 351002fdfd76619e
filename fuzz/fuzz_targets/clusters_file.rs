//! The `--clusters-config` file, parsed and validated.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_service::fuzzing::clusters_file(data));
