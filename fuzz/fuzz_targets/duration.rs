//! Durations: plain seconds and Go durations.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_service::fuzzing::duration(data));
