//! Arbitrary device parameters and size strings.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ublk_targets::fuzzing::params(data);
});
