//! A JWKS document read into a key set (`jwks_data`, a fetched `jwks_uri`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_service::fuzzing::jwks(data));
