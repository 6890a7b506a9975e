//! Benchmarks of ublk-rs; this library is empty, the code is under `benches/`.
//!
//! - `benches/userspace.rs` (criterion): nanoseconds per I/O through the real engine and
//!   target code on the simulated kernel queue, no kernel involved:
//!   `cargo bench -p ublk-benches --bench userspace`.
//! - `libublk-null/`: a null server built on the `libublk` crate, to compare the whole path
//!   through the kernel side by side with `ublk add null`. It is a separate crate outside the
//!   workspace, because libublk needs libclang to build:
//!   `cargo build --release --manifest-path benches/libublk-null/Cargo.toml`.
#![deny(unsafe_op_in_unsafe_fn)]
