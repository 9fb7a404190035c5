//! See `spooky::fuzzing::h3_request_head` for the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spooky::fuzzing::h3_request_head(data));
