//! An OIDC discovery document, read for its `jwks_uri`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_service::fuzzing::discovery(data));
