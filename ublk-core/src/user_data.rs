//! The layout of `user_data` on a queue's io_uring, in one place.
//!
//! Every SQE a queue ring carries belongs to one of five owners, told apart by the bits set:
//!
//! | bits set            | owner                                   | low bits            |
//! |---------------------|-----------------------------------------|---------------------|
//! | none                | a ublk FETCH / COMMIT_AND_FETCH command | the tag (< 4096)    |
//! | [`WAKE`] (bit 32)   | the poll on the queue's wakeup eventfd  | 0                   |
//! | [`BATCH`] (bit 34)  | a `UBLK_F_BATCH_IO` command             | kind and id         |
//! | [`BUF_CMD`] (62)    | REGISTER/UNREGISTER_IO_BUF of a tag     | the tag             |
//! | [`NODE_OP`] (63)    | an operation a target node started      | its key in the queue's op slab |
//!
//! Targets never see these values: an operation a node starts is answered to that node with
//! the token it chose (see [`crate::QueueCtx`]), whatever its key here.

/// The wakeup eventfd's poll.
pub(crate) const WAKE: u64 = 1 << 32;
/// Commands of [`crate::batch`] (kind and id in the bits below).
pub(crate) const BATCH: u64 = 1 << 34;
/// The engine's REGISTER/UNREGISTER_IO_BUF commands (manual zero-copy); the tag below.
pub(crate) const BUF_CMD: u64 = 1 << 62;
/// Operations target nodes started through [`crate::QueueCtx`]; the op-slab key below.
pub(crate) const NODE_OP: u64 = 1 << 63;

/// Who a completion on the queue ring belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// A fetch or commit of this tag.
    Tag(u16),
    /// The wakeup poll.
    Wake,
    /// A batch command (decoded by [`crate::batch`]).
    Batch,
    /// A buffer registration command for this tag.
    BufCmd(u16),
    /// A node's operation, by op-slab key.
    NodeOp(u32),
}

impl Owner {
    /// Decodes `user_data`.
    pub(crate) fn of(user_data: u64) -> Owner {
        if user_data & NODE_OP != 0 {
            Owner::NodeOp(user_data as u32)
        } else if user_data & BUF_CMD != 0 {
            Owner::BufCmd(user_data as u16)
        } else if user_data & BATCH != 0 {
            Owner::Batch
        } else if user_data & WAKE != 0 {
            Owner::Wake
        } else {
            Owner::Tag(user_data as u16)
        }
    }

    /// Encodes this owner as `user_data` (batch commands encode their own).
    pub(crate) fn user_data(self) -> u64 {
        match self {
            Owner::Tag(tag) => u64::from(tag),
            Owner::Wake => WAKE,
            Owner::Batch => BATCH,
            Owner::BufCmd(tag) => BUF_CMD | u64::from(tag),
            Owner::NodeOp(key) => NODE_OP | u64::from(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_and_never_collide() {
        let all = [
            Owner::Tag(0),
            Owner::Tag(4095),
            Owner::Wake,
            Owner::Batch,
            Owner::BufCmd(7),
            Owner::NodeOp(0),
            Owner::NodeOp(u32::MAX),
        ];
        for o in all {
            assert_eq!(Owner::of(o.user_data()), o);
        }
        // A batch command's id and kind sit below its bit and never reach the others.
        assert_eq!(Owner::of(BATCH | 0xffff | (3 << 16)), Owner::Batch);
    }
}
