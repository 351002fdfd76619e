//! A TokenRequest answer, read for its token and expiry.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_service::fuzzing::token_request(data));
