//! Replays every file of the fuzz corpora (`fuzz/corpus/*`) through the fuzz targets' bodies,
//! so `cargo test` on stable Rust covers them, regressions included.

use std::path::PathBuf;

fn corpus(name: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    let out: Vec<_> = files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect();
    assert!(!out.is_empty(), "corpus {name} is empty");
    out
}

#[test]
fn request_stream_corpus_replays_clean() {
    for (path, data) in corpus("request_stream") {
        let result = std::panic::catch_unwind(|| ublk_targets::fuzzing::request_stream(&data));
        assert!(result.is_ok(), "{} fails", path.display());
    }
}

#[test]
fn params_corpus_replays_clean() {
    for (path, data) in corpus("params") {
        let result = std::panic::catch_unwind(|| ublk_targets::fuzzing::params(&data));
        assert!(result.is_ok(), "{} fails", path.display());
    }
}

#[test]
fn mirror_meta_corpus_replays_clean() {
    for (path, data) in corpus("mirror_meta") {
        let result = std::panic::catch_unwind(|| ublk_targets::fuzzing::mirror_meta(&data));
        assert!(result.is_ok(), "{} fails", path.display());
    }
}

#[test]
fn compress_image_corpus_replays_clean() {
    for (path, data) in corpus("compress_image") {
        let result = std::panic::catch_unwind(|| ublk_targets::fuzzing::compress_image(&data));
        assert!(result.is_ok(), "{} fails", path.display());
    }
}

/// Writes the hand-made seeds of `fuzz/corpus/compress_image`: run with `--ignored` after a
/// format change. Each is the steering byte and patches over the base image (see
/// `fuzzing::compress_image`), or a raw child.
#[test]
#[ignore = "writes into the source tree"]
fn write_compress_image_seeds() {
    // The base image's layout: 64 KiB logical on a 128 KiB child.
    const MAP_A: usize = 8192;
    const MAP_B: usize = 12288;
    const JOURNAL: usize = 16384;
    const DATA: usize = 32768;
    let patch = |at: usize, bytes: &[u8]| {
        let mut v = ((at / 2) as u16).to_le_bytes().to_vec();
        v.push(bytes.len() as u8);
        v.extend_from_slice(bytes);
        v
    };
    let with = |mode: u8, patches: &[Vec<u8>]| {
        let mut v = vec![mode];
        for p in patches {
            v.extend_from_slice(p);
        }
        v
    };
    let seeds: [(&str, Vec<u8>); 14] = [
        ("base", with(0, &[])),
        ("base-resealed", with(2 | 4 << 2, &[])),
        ("blank", vec![1]),
        ("empty", vec![]),
        ("superblock-a-torn", with(0, &[patch(200, &[0xff])])),
        (
            "both-superblocks-torn",
            with(0, &[patch(200, &[0xff]), patch(4096 + 200, &[0xff])]),
        ),
        (
            "superblock-size-forged",
            with(
                2,
                &[
                    patch(32, &(1u64 << 40).to_le_bytes()),
                    patch(4096 + 32, &(1u64 << 40).to_le_bytes()),
                ],
            ),
        ),
        ("map-a-flipped", with(0, &[patch(MAP_A + 64, &[0x5a; 8])])),
        ("map-b-flipped", with(0, &[patch(MAP_B + 64, &[0x5a; 8])])),
        (
            "map-entries-forged",
            with(
                2,
                &[
                    patch(MAP_A + 16, &[1, 0, 0, 0, 0, 0x10, 0x40, 0]),
                    patch(MAP_B + 16, &[1, 0, 0, 0, 0, 0x10, 0x40, 0]),
                ],
            ),
        ),
        (
            // Block 0's entry in both checkpoints: 64 bytes 48 bytes into sector 0 (format
            // version 2's packing), over the extent that is there.
            "map-entry-packed-forged",
            with(
                2,
                &[
                    patch(MAP_A + 16, &[0, 0, 0, 0, 0, 0x40, 0x40, 0x03]),
                    patch(MAP_B + 16, &[0, 0, 0, 0, 0, 0x40, 0x40, 0x03]),
                ],
            ),
        ),
        ("journal-torn", with(0, &[patch(JOURNAL + 40, &[0xee; 16])])),
        (
            "journal-record-forged",
            with(
                2 | 9 << 2,
                &[patch(
                    JOURNAL + 24,
                    &[3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0x20, 0],
                )],
            ),
        ),
        ("extent-flipped", with(4 << 2, &[patch(DATA + 20, &[0; 4])])),
    ];
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/compress_image");
    std::fs::create_dir_all(&dir).expect("corpus directory");
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).expect("seed written");
    }
}

/// Writes the hand-made seeds of `fuzz/corpus/mirror_meta`: run with `--ignored` after a
/// format change. Each is the fuzz target's steering byte followed by a block.
#[test]
#[ignore = "writes into the source tree"]
fn write_mirror_meta_seeds() {
    use ublk_targets::mirror::meta::{
        encode_bitmap_block, Layout, LegRecord, LegState, Superblock, BITMAP_BYTES, BLOCK,
    };
    let uuid = *b"\x6b\xa7\xb8\x10\x9d\xad\x41\xd1\x80\xb4\x00\xc0\x4f\xd4\x30\xc8";
    let record = |state, rebuild_offset| LegRecord {
        state,
        rebuild_offset,
    };
    let sb = Superblock {
        uuid,
        leg_index: 1,
        events: 7,
        layout: Layout::for_leg(1 << 30, 1 << 20).expect("1 GiB legs"),
        legs: vec![
            record(LegState::InSync, 0),
            record(LegState::Rebuilding, 5 << 20),
            record(LegState::Missing, 0),
        ],
    };
    let mut superblock = vec![0; BLOCK];
    sb.encode(&mut superblock).expect("valid superblock");
    let bits: Vec<u8> = (0..BITMAP_BYTES).map(|i| (i % 3 == 0) as u8).collect();
    let mut bitmap = vec![0; BLOCK];
    encode_bitmap_block(2, &uuid, &bits, &mut bitmap).expect("a full block of bits");
    let with = |mode: u8, block: &[u8]| [&[mode][..], block].concat();
    let layout = |leg: u64, shift: u8| {
        let mut v = vec![4];
        v.extend_from_slice(&leg.to_le_bytes());
        v.extend_from_slice(&[shift, 0, 0, 0, 0, 0, 0, 0]);
        v
    };
    let seeds: [(&str, Vec<u8>); 9] = [
        ("superblock", with(0, &superblock)),
        ("superblock-resealed", with(1, &superblock)),
        ("bitmap-block", with(0, &bitmap)),
        ("bitmap-block-wrong-index", with(8, &bitmap)),
        ("blank", with(0, &[0; BLOCK])),
        ("empty", vec![]),
        ("short", with(3, b"UBLKMIR1\x01\0\0\0")),
        ("layout-1g-leg-1m-regions", layout(1 << 30, 20)),
        ("layout-huge-leg-4k-regions", layout(1 << 50, 12)),
    ];
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/mirror_meta");
    std::fs::create_dir_all(&dir).expect("corpus directory");
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).expect("seed written");
    }
}
