//! Arbitrary bytes as a compressed image: checked, opened, served; never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ublk_targets::fuzzing::compress_image(data);
});
