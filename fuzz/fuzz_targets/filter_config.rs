//! The filter's plugin configuration (`Config::parse`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_filter::fuzzing::config(data));
