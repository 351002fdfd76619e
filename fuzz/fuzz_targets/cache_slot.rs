//! A shared-data cache slot (`cache::Entry::decode`), and its round trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokensmith_filter::fuzzing::cache_slot(data));
