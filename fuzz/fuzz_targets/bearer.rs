//! The `authorization` header: the companion's `bearer::parse`; the filter's header-map
//! decoding and token extraction.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tokensmith_service::fuzzing::bearer(data);
    tokensmith_filter::fuzzing::bearer(data);
});
