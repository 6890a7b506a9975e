//! RAID-1 over N children (being written).

pub mod meta;
