//! A TokenReview answer, judged as the reviewer does.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_service::fuzzing::token_review(data));
