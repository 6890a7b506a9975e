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
