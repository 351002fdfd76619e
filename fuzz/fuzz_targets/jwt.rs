//! JWT header and claims parsing, pre-validation, and verification against a fixed key set.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_service::fuzzing::jwt(data));
