//! A node with its own join rule, built on [`Joins`] and [`Verdict`]: writes go to every
//! child and succeed when any child took them (a mirror's rule), on the simulated queue.

use std::io;
use std::sync::Arc;

use ublk_core::sim::SimQueue;
use ublk_zc::{
    BoxTarget, Child, Completion, Geometry, Io, Joins, OpenCtx, QueueCtx, QueueTarget, Target,
    Verdict,
};

const SIZE: u64 = 1 << 20;

/// A leaf that accepts everything, or fails everything with EIO.
#[derive(Clone, Copy)]
struct Leaf(bool);

impl Target for Leaf {
    type Queue = Leaf;
    fn open_queue(&self, _: &mut OpenCtx<'_>) -> io::Result<Leaf> {
        Ok(*self)
    }
    fn size(&self) -> Option<u64> {
        Some(SIZE)
    }
    fn needs_data(&self) -> bool {
        false
    }
}

impl QueueTarget for Leaf {
    fn submit(&mut self, io: Io, _: &mut QueueCtx<'_>) {
        if self.0 {
            io.complete_ok()
        } else {
            io.fail(libc::EIO)
        }
    }
}

/// Sends every request to all children; succeeds if any (`any`) or all of them did.
struct Fan {
    children: Vec<BoxTarget>,
    any: bool,
}

struct FanQ {
    children: Vec<Child>,
    joins: Joins,
    any: bool,
}

impl Target for Fan {
    type Queue = FanQ;
    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<FanQ> {
        let children = self.children.iter().map(|c| ctx.open_child(&**c));
        Ok(FanQ {
            children: children.collect::<io::Result<_>>()?,
            joins: Joins::new(),
            any: self.any,
        })
    }
    fn size(&self) -> Option<u64> {
        Some(SIZE)
    }
    fn needs_data(&self) -> bool {
        false
    }
}

impl QueueTarget for FanQ {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        let req = io.block_io();
        let subs: Vec<_> = self
            .children
            .iter()
            .map(|_| io.sub(0, req.len, req.offset))
            .collect::<io::Result<_>>()
            .expect("the whole range of a write");
        let token = self.joins.park(io, subs.len() as u32, Verdict::default());
        for (&child, sub) in self.children.iter().zip(subs) {
            ctx.send(child, sub, token);
        }
    }

    fn complete(&mut self, done: Completion, _: &mut QueueCtx<'_>) {
        let ok = self.joins.io(done.token).map_or(0, |io| io.len() as i32);
        if let Some(v) = self.joins.state_mut(done.token) {
            v.record(done.result, ok);
        }
        if let Some((io, v)) = self.joins.answered(done.token) {
            let rule = if self.any { v.any_ok() } else { v.all_ok() };
            match rule {
                Ok(()) => io.complete_ok(),
                Err(e) => io.complete(e),
            }
        }
    }
}

fn write_through(any: bool, leaves: &[bool]) -> Result<i32, i32> {
    let fan = Fan {
        children: leaves
            .iter()
            .map(|&ok| Arc::new(Leaf(ok)) as BoxTarget)
            .collect(),
        any,
    };
    let geo = Geometry {
        size: SIZE,
        logical_block_size: 512,
        max_io: 64 << 10,
    };
    let mut q = SimQueue::new(&fan, geo, 4).expect("queue");
    let r = q.write(8192, &[3; 4096]);
    assert_eq!(q.in_service(), 0);
    r
}

#[test]
fn any_ok_succeeds_while_one_child_takes_the_write() {
    assert_eq!(write_through(true, &[true, false, false]), Ok(4096));
    assert_eq!(write_through(true, &[false, false]), Err(-libc::EIO));
    assert_eq!(write_through(false, &[true, false]), Err(-libc::EIO));
    assert_eq!(write_through(false, &[true, true]), Ok(4096));
}
