//! Arbitrary bytes as mirror metadata: superblock, bitmap block and layout arithmetic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    ublk_targets::fuzzing::mirror_meta(data);
});
