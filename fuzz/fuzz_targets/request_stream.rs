//! Arbitrary request streams against every target, checked against the reference model.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ublk_targets::fuzzing::request_stream(data);
});
