//! Benchmarks of ublk-rs, and the simulated-queue I/O loop they share.
//!
//! - `benches/userspace.rs` (criterion): nanoseconds per I/O through the real engine and
//!   target code on the simulated kernel queue, no kernel involved:
//!   `cargo bench -p ublk-benches --bench userspace`.
//! - `src/bin/sim-ios.rs`: the same I/O loop as a plain program running a given number of
//!   I/Os, which `cargo xtask bench --instructions` runs under callgrind (or `perf stat`) to
//!   count the instructions per I/O: a figure that does not move with the host's load.
//! - `benches/compress.rs` (criterion): the compressing target's block path against raw
//!   `lz4_flex`.
//! - `libublk-null/`: a null server built on the `libublk` crate, to compare the whole path
//!   through the kernel side by side with `ublk add null`. It is a separate crate outside the
//!   workspace, because libublk needs libclang to build:
//!   `cargo build --release --manifest-path benches/libublk-null/Cargo.toml`.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod simloop;
