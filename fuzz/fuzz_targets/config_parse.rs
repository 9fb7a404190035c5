//! See `spooky::fuzzing::config_parse` for the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spooky::fuzzing::config_parse(data));
