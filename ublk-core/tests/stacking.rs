//! The stacking interface on the simulated queue: a node with its own join rule over two
//! children (a toy mirror: writes to both, reads from one with a retry on the other), bounce
//! buffers lent to a child, notifications from another thread, and the engine's guards (a
//! child cannot be sent past its end, a read's sub-requests cannot overlap).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ublk_core::io::{BlockIo, IoFlags, Op};
use ublk_core::sim::SimQueue;
use ublk_core::{
    Bounce, BoxTarget, Child, Completion, Geometry, Io, OpenCtx, QueueCtx, QueueTarget, Target,
};

const SIZE: u64 = 64 << 10;

/// A memory leaf that fails reads of the bytes in `bad`.
struct Mem {
    bytes: Mutex<Vec<u8>>,
    bad: Mutex<Option<(u64, u64)>>,
}

impl Mem {
    fn new() -> Arc<Mem> {
        Arc::new(Mem {
            bytes: Mutex::new(vec![0; SIZE as usize]),
            bad: Mutex::new(None),
        })
    }
}

struct MemQ(Arc<Mem>);

/// A [`Mem`] leaf as a target.
#[derive(Clone)]
struct Leaf(Arc<Mem>);

impl Target for Leaf {
    type Queue = MemQ;
    fn open_queue(&self, _: &mut OpenCtx<'_>) -> io::Result<MemQ> {
        Ok(MemQ(Arc::clone(&self.0)))
    }
    fn size(&self) -> Option<u64> {
        Some(SIZE)
    }
}

impl QueueTarget for MemQ {
    fn submit(&mut self, mut io: Io, _: &mut QueueCtx<'_>) {
        let (off, len) = (io.offset() as usize, io.len() as usize);
        match io.op() {
            Op::Write => {
                let data = io.data().expect("copy mode").to_vec();
                self.0.bytes.lock().unwrap()[off..off + len].copy_from_slice(&data);
                io.complete_ok();
            }
            Op::Read => {
                if let Some((b, n)) = *self.0.bad.lock().unwrap() {
                    if (off as u64) < b + n && (off + len) as u64 > b {
                        return io.fail(libc::EIO);
                    }
                }
                let src = self.0.bytes.lock().unwrap()[off..off + len].to_vec();
                io.data_mut().expect("copy mode").copy_from_slice(&src);
                io.complete_ok();
            }
            _ => io.complete_ok(),
        }
    }
}

/// Two legs: writes go to both (success when both did), reads to leg 0 and, if that fails,
/// to leg 1; a flush reads the first 4 KiB of leg 1 into a bounce buffer and checks it
/// matches leg 0's, and a discard waits for a notification from another thread.
struct Mirror(Vec<BoxTarget>, Arc<Mutex<Option<Vec<u8>>>>);

struct MirrorQ {
    legs: Vec<Child>,
    parked: slab::Slab<(Io, u32, i32)>,
    bounce_seen: Arc<Mutex<Option<Vec<u8>>>>,
}

impl Target for Mirror {
    type Queue = MirrorQ;
    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<MirrorQ> {
        Ok(MirrorQ {
            legs: vec![ctx.open_child(&*self.0[0])?, ctx.open_child(&*self.0[1])?],
            parked: slab::Slab::new(),
            bounce_seen: Arc::clone(&self.1),
        })
    }
    fn size(&self) -> Option<u64> {
        Some(SIZE)
    }
}

const BOUNCE: u64 = u64::MAX;
/// Tokens of notifications: this bit and the parked request's key.
const NOTICE: u64 = 1 << 62;
/// Tokens of reads already retried on leg 1: this bit and the key.
const RETRIED: u64 = 1 << 61;

impl QueueTarget for MirrorQ {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        let req = io.block_io();
        match req.op {
            Op::Write => {
                let subs: Vec<_> = (0..2)
                    .map(|_| io.sub(0, req.len, req.offset).expect("whole range"))
                    .collect();
                let key = self.parked.insert((io, 2, 0)) as u64;
                for (leg, sub) in self.legs.clone().into_iter().zip(subs) {
                    ctx.send(leg, sub, key);
                }
            }
            Op::Read => {
                let sub = io.sub(0, req.len, req.offset).expect("whole range");
                let key = self.parked.insert((io, 1, 0)) as u64;
                ctx.send(self.legs[0], sub, key);
            }
            Op::Flush => {
                let read = BlockIo {
                    op: Op::Read,
                    offset: 0,
                    len: 4096,
                    flags: IoFlags::default(),
                };
                let sub = ctx
                    .bounce_io(read, Bounce::new(4096).expect("bounce"))
                    .expect("fits");
                ctx.send(self.legs[1], sub, BOUNCE);
                io.complete_ok();
            }
            _ => {
                let key = self.parked.insert((io, 1, 0)) as u64;
                let notifier = ctx.notifier();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(20));
                    notifier.notify(NOTICE | key, 0);
                });
            }
        }
    }

    fn complete(&mut self, done: Completion, ctx: &mut QueueCtx<'_>) {
        if done.token == BOUNCE {
            let buf = done.bounce.expect("the bounce comes back");
            *self.bounce_seen.lock().unwrap() = Some(buf.as_slice().to_vec());
            return;
        }
        let key = (done.token & !(NOTICE | RETRIED)) as usize;
        if let Some(retry) = done.retry {
            // A failed read on leg 0: the same request, once, to leg 1.
            if retry.block_io().op == Op::Read && done.token & RETRIED == 0 {
                return ctx.send(self.legs[1], retry, key as u64 | RETRIED);
            }
        }
        let (_, left, err) = &mut self.parked[key];
        *left -= 1;
        if done.result < 0 {
            *err = done.result;
        }
        if *left == 0 {
            let (io, _, err) = self.parked.remove(key);
            if err < 0 {
                io.complete(err);
            } else {
                io.complete_ok();
            }
        }
    }
}

fn geo() -> Geometry {
    Geometry {
        size: SIZE,
        logical_block_size: 512,
        max_io: 32 << 10,
    }
}

fn mirror_of(a: &Arc<Mem>, b: &Arc<Mem>) -> Mirror {
    let leg = |m: &Arc<Mem>| Arc::new(Leaf(Arc::clone(m))) as BoxTarget;
    Mirror(vec![leg(a), leg(b)], Arc::default())
}

#[test]
fn a_node_with_its_own_rule_writes_both_legs_and_retries_reads() {
    let (a, b) = (Mem::new(), Mem::new());
    let mirror = mirror_of(&a, &b);
    let mut q = SimQueue::new(&mirror, geo(), 8).expect("queue");
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 249) as u8 + 1).collect();
    assert_eq!(q.write(4096, &data), Ok(8192));
    assert_eq!(&a.bytes.lock().unwrap()[4096..12288], &data[..]);
    assert_eq!(&b.bytes.lock().unwrap()[4096..12288], &data[..]);
    // Leg 0 fails the read: leg 1 serves it.
    *a.bad.lock().unwrap() = Some((4096, 512));
    assert_eq!(q.read(4096, 8192), Ok(data.clone()));
    // Both fail: the error reaches the reader.
    *b.bad.lock().unwrap() = Some((8192, 512));
    assert_eq!(q.read(4096, 8192), Err(-libc::EIO));
    assert_eq!(q.in_service(), 0);
    let stats = q.stats().snapshot();
    let leg0 = stats
        .iter()
        .find(|s| s.path == "/0")
        .expect("leg 0 counted");
    assert_eq!((leg0.writes, leg0.errors), (1, 2));
}

#[test]
fn bounce_buffers_come_back_with_the_child_data() {
    let (a, b) = (Mem::new(), Mem::new());
    b.bytes.lock().unwrap()[..4096].fill(7);
    let mirror = mirror_of(&a, &b);
    let mut q = SimQueue::new(&mirror, geo(), 8).expect("queue");
    assert_eq!(q.op(ublk_core::sys::UBLK_IO_OP_FLUSH, 0, 0, 0), Ok(0));
    // The bounce read ran in the same loop turn as the flush, and its buffer came back.
    assert_eq!(mirror.1.lock().unwrap().as_deref(), Some(&[7u8; 4096][..]));
    assert_eq!(q.in_service(), 0);
}

#[test]
fn notifications_from_another_thread_reach_the_node() {
    let mirror = mirror_of(&Mem::new(), &Mem::new());
    let mut q = SimQueue::new(&mirror, geo(), 8).expect("queue");
    // A discard is parked until the other thread's notice arrives.
    assert_eq!(q.op(ublk_core::sys::UBLK_IO_OP_DISCARD, 0, 0, 4096), Ok(0));
}

/// A node that misuses sub-requests: past the child's end, and overlapping read pieces.
struct Reckless(BoxTarget);
struct RecklessQ(Child);

impl Target for Reckless {
    type Queue = RecklessQ;
    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<RecklessQ> {
        Ok(RecklessQ(ctx.open_child(&*self.0)?))
    }
}

impl QueueTarget for RecklessQ {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        let len = io.len();
        let mut fan = ctx.fan_out(io);
        if fan.request().op == Op::Read {
            fan.send(self.0, 0, len, 0).expect("first piece");
            // Overlaps the first piece: refused, and the request fails.
            assert!(fan.send(self.0, 0, len, 0).is_err());
        } else {
            // Past the child's end: the engine fails the piece with EINVAL.
            fan.send(self.0, 0, len, SIZE)
                .expect("in the request's bounds");
        }
    }
}

#[test]
fn children_cannot_be_sent_past_their_end_or_overlapping_reads() {
    let r = Reckless(Arc::new(Leaf(Mem::new())));
    let geo = geo();
    let mut q = SimQueue::new(&r, geo, 4).expect("queue");
    assert_eq!(q.write(0, &[1; 4096]), Err(-libc::EINVAL));
    assert_eq!(q.read(0, 4096), Err(-libc::EINVAL));
    assert_eq!(q.in_service(), 0);
}
