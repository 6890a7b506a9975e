//! Examples for ublk-rs live beside this file; see `hello_ram.rs`.
