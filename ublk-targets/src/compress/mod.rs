//! A compressing node: a logical device stored compressed in its child (issue #11). This
//! first step holds the on-disk format ([`format`]) and the block codec; the target follows.

#[allow(dead_code)] // used by the target, which lands next
mod codec;
pub mod format;
