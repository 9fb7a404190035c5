//! See `spooky::fuzzing::retry_token` for the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spooky::fuzzing::retry_token(data));
