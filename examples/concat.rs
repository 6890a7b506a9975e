//! A new inner target in a few dozen lines: `concat` joins its children end to end, like
//! md's linear mode. A request that crosses from one child into the next is fanned out as
//! two sub-requests — views of the request's own memory, zero-copy when the children pass
//! bytes on — and the engine joins them. No `unsafe`, no bookkeeping of its own.
//!
//! `cargo run --example concat` (as root, with `ublk_drv` loaded) serves a 32 MiB + 64 MiB RAM
//! concatenation as /dev/ublkbN until Ctrl-C; `cargo test --example concat` checks it on the
//! simulated queue.

use std::io;
use std::sync::Arc;

use ublk_targets::ram::Ram;
use ublk_zc::{
    copies_data_all, needs_data_any, BoxTarget, Child, DeviceBuilder, Io, Op, OpenCtx, QueueCtx,
    QueueTarget, Target,
};

/// Children end to end: child `i` holds device bytes `starts[i]..starts[i + 1]`.
struct Concat {
    children: Vec<BoxTarget>,
    starts: Vec<u64>,
}

impl Concat {
    fn new(children: Vec<BoxTarget>) -> io::Result<Self> {
        let mut starts = vec![0];
        for c in &children {
            let size = c
                .dyn_size()
                .ok_or_else(|| io::Error::other("child without a size"))?;
            starts.push(starts[starts.len() - 1] + size);
        }
        Ok(Concat { children, starts })
    }
}

impl Target for Concat {
    type Queue = ConcatQueue;

    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<ConcatQueue> {
        let children = self.children.iter().map(|c| ctx.open_child(&**c));
        Ok(ConcatQueue {
            children: children.collect::<io::Result<_>>()?,
            starts: self.starts.clone(),
        })
    }
    fn size(&self) -> Option<u64> {
        self.starts.last().copied()
    }
    fn needs_data(&self) -> bool {
        needs_data_any(&self.children)
    }
    fn copies_data(&self) -> bool {
        copies_data_all(&self.children)
    }
}

struct ConcatQueue {
    children: Vec<Child>,
    starts: Vec<u64>,
}

impl QueueTarget for ConcatQueue {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        let req = io.block_io();
        let mut fan = ctx.fan_out(io); // completes `io` when every piece has
        if req.op == Op::Flush {
            for &child in &self.children {
                let _ = fan.send(child, 0, 0, 0);
            }
            return;
        }
        let (mut at, end) = (req.offset, req.offset + u64::from(req.len));
        while at < end {
            let i = self.starts.partition_point(|&s| s <= at) - 1;
            let n = end.min(self.starts[i + 1]) - at;
            // Bounds are checked: a bad piece fails the request, it never reaches past it.
            let _ = fan.send(
                self.children[i],
                (at - req.offset) as u32,
                n as u32,
                at - self.starts[i],
            );
            at += n;
        }
    }
}

fn concat_of_ram(sizes: &[u64]) -> io::Result<(Concat, Vec<Ram>)> {
    let rams = sizes
        .iter()
        .map(|&s| Ram::new(s))
        .collect::<io::Result<Vec<_>>>()?;
    let children = rams
        .iter()
        .map(|r| Arc::new(r.clone()) as BoxTarget)
        .collect();
    Ok((Concat::new(children)?, rams))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (concat, _) = concat_of_ram(&[32 << 20, 64 << 20])?;
    let size = concat.size().unwrap_or(0);
    DeviceBuilder::new().size(size).queues(2).run(concat)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ublk_core::sim::SimQueue;
    use ublk_zc::Geometry;

    #[test]
    fn a_write_across_the_seam_lands_on_both_children() {
        let (concat, rams) = concat_of_ram(&[64 << 10, 64 << 10]).expect("memory");
        let geo = Geometry {
            size: 128 << 10,
            logical_block_size: 512,
            max_io: 64 << 10,
        };
        let mut q = SimQueue::new(&concat, geo, 4).expect("queue");
        let data: Vec<u8> = (0..16384u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(q.write((64 << 10) - 8192, &data), Ok(16384));
        assert_eq!(q.read((64 << 10) - 8192, 16384), Ok(data.clone()));
        let child_geo = Geometry {
            size: 64 << 10,
            ..geo
        };
        let mut first = SimQueue::new(&rams[0], child_geo, 1).expect("child queue");
        assert_eq!(
            first.read((64 << 10) - 8192, 8192),
            Ok(data[..8192].to_vec())
        );
        let mut second = SimQueue::new(&rams[1], child_geo, 1).expect("child queue");
        assert_eq!(second.read(0, 8192), Ok(data[8192..].to_vec()));
    }
}
