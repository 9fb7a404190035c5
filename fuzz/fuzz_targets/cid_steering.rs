//! See `spooky::fuzzing::cid_steering` for the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spooky::fuzzing::cid_steering(data));
