//! See `spooky::fuzzing::reload_apply` for the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spooky::fuzzing::reload_apply(data));
