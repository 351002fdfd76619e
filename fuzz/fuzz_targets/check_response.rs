//! The companion's CheckResponse as the filter reads it (`check::verdict`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_filter::fuzzing::check_response(data));
