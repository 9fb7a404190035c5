//! See `spooky::fuzzing::datagram_entry` for the invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spooky::fuzzing::datagram_entry(data));
