//! One queue of a mirror: writes to every leg that holds the range, reads from one leg with
//! retries on others, flushes to every leg.

use std::ops::Range;
use std::sync::atomic::Ordering::*;
use std::sync::Arc;

use slab::Slab;
use ublk_zc::{Child, Completion, Io, Op, QueueCtx, QueueTarget};

use super::meta::LegState;
use super::shared::{Shared, DIRTY, WAKE};

/// Bits of a token that name the leg; the rest is the request's slab key.
const LEG_BITS: u32 = 5;
const LEG_MASK: u64 = (1 << LEG_BITS) - 1;

/// A request waiting for its legs' answers.
#[derive(Debug)]
struct Req {
    io: Io,
    left: u32,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Read {
        leg: usize,
        /// Legs tried, as a bit mask.
        tried: u32,
        /// Legs that failed it, to repair once another leg served it.
        failed: u32,
        error: i32,
    },
    /// A write, discard or write-zeroes; a flush with the flushes it stands for.
    Write {
        regions: Range<u64>,
        ok: bool,
        error: Option<i32>,
        /// The superblock generation that must be durable before the answer (legs failed).
        sb: u64,
        flushes: Vec<Io>,
    },
}

/// One queue of a [`super::Mirror`].
#[derive(Debug)]
pub struct MirrorQueue {
    shared: Arc<Shared>,
    legs: Vec<Child>,
    /// The leg generations the children were opened at.
    leg_gens: Vec<u64>,
    generation: u64,
    registered: bool,
    reqs: Slab<Req>,
    /// Writes waiting for a region being copied, or for a rebuild cursor to pass them.
    blocked: Vec<Io>,
    /// Writes waiting for their bits to be durable (they hold their regions' counts).
    held: Vec<Io>,
    /// Answers waiting for a superblock generation: `(io, result, generation, flushes)`.
    acks: Vec<(Io, i32, u64, Vec<Io>)>,
    /// Reads in flight per leg, for balancing.
    reading: Vec<u32>,
    /// Where the last read ended, and on which leg: a sequential stream stays there.
    last: Option<(usize, u64)>,
    /// Where the next tie-break starts.
    turn: usize,
    flushing: bool,
    flush_wait: Vec<Io>,
}

impl MirrorQueue {
    pub(crate) fn new(shared: Arc<Shared>, legs: Vec<Child>) -> Self {
        let n = legs.len();
        let leg_gens = shared
            .legs
            .iter()
            .map(|l| l.generation.load(SeqCst))
            .collect();
        let generation = shared.generation.load(SeqCst);
        MirrorQueue {
            shared,
            legs,
            leg_gens,
            generation,
            registered: false,
            reqs: Slab::new(),
            blocked: Vec::new(),
            held: Vec::new(),
            acks: Vec::new(),
            reading: vec![0; n],
            last: None,
            turn: 0,
            flushing: false,
            flush_wait: Vec::new(),
        }
    }

    /// Opens replaced legs' new targets.
    fn refresh(&mut self, ctx: &mut QueueCtx<'_>) {
        if !self.registered {
            self.registered = true;
            self.shared.register(ctx.notifier());
        }
        let generation = self.shared.generation.load(SeqCst);
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        for (i, leg) in self.shared.legs.iter().enumerate() {
            let g = leg.generation.load(SeqCst);
            if g == self.leg_gens[i] {
                continue;
            }
            match ctx.open_child(&*leg.target()) {
                Ok(child) => {
                    self.legs[i] = child;
                    self.leg_gens[i] = g;
                }
                Err(e) => {
                    let why = format!("opening the new leg {i} on queue {}: {e}", ctx.q_id());
                    self.shared.fail_leg(i, &why);
                }
            }
        }
    }

    fn leg_offset(&self, offset: u64) -> u64 {
        self.shared.layout.data_offset + offset
    }

    /// Whether leg `i` holds `[a, b)`: in sync, or rebuilt past it — and, where the legs may
    /// differ (a resync pending), only the source leg unless `fallback`. Every read path asks
    /// this; nothing reads a range from a leg that does not hold it.
    fn holds(&self, i: usize, a: u64, b: u64, fallback: bool) -> bool {
        let s = &self.shared;
        let leg = &s.legs[i];
        let ok = leg.holds(b);
        if !ok || fallback || s.resync_left.load(SeqCst) == 0 {
            return ok;
        }
        let regions = s.layout.regions_of(a, b - a);
        let differs = regions
            .into_iter()
            .any(|r| s.regions[r as usize].resync.load(SeqCst));
        !differs || s.source() == Some(i)
    }

    /// The leg to read `[a, b)` from, not one of `tried`.
    fn pick_read(&self, a: u64, b: u64, tried: u32) -> Option<usize> {
        let n = self.legs.len();
        let usable = |i: usize, fallback| tried & (1 << i) == 0 && self.holds(i, a, b, fallback);
        if let Some((leg, end)) = self.last {
            if end == a && usable(leg, false) {
                return Some(leg);
            }
        }
        // Ties go round-robin, so even one read at a time spreads over the legs.
        let order = (0..n).map(|k| (self.turn + k) % n);
        let best = order
            .clone()
            .filter(|&i| usable(i, false))
            .min_by_key(|&i| self.reading[i]);
        best.or_else(|| {
            order
                .filter(|&i| usable(i, true))
                .min_by_key(|&i| self.reading[i])
        })
    }

    fn send_read(&mut self, key: usize, leg: usize, ctx: &mut QueueCtx<'_>) {
        let req = &self.reqs[key];
        let (a, len) = (req.io.offset(), req.io.len());
        match req.io.sub(0, len, self.leg_offset(a)) {
            Ok(sub) => {
                self.reading[leg] += 1;
                self.turn = leg + 1;
                self.last = Some((leg, a + u64::from(len)));
                ctx.send(self.legs[leg], sub, token(key, leg));
            }
            Err(_) => {
                let req = self.reqs.remove(key);
                req.io.fail(libc::EINVAL);
            }
        }
    }

    fn read(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        let (a, b) = (io.offset(), io.offset() + u64::from(io.len()));
        let Some(leg) = self.pick_read(a, b, 0) else {
            return io.fail(libc::EIO);
        };
        let key = self.reqs.insert(Req {
            io,
            left: 1,
            kind: Kind::Read {
                leg,
                tried: 1 << leg,
                failed: 0,
                error: -libc::EIO,
            },
        });
        self.send_read(key, leg, ctx);
    }

    /// A write, discard or write-zeroes. `held`: its regions' counts are already taken.
    fn write(&mut self, io: Io, held: bool, ctx: &mut QueueCtx<'_>) {
        // Borrowed, not cloned: an `Arc` clone per request would bounce its count's cache
        // line between the queues.
        let s = &*self.shared;
        let (a, len) = (io.offset(), u64::from(io.len()));
        let b = a + len;
        let regions = s.layout.regions_of(a, len);
        if !held {
            for r in regions.clone() {
                s.regions[r as usize].inflight.fetch_add(1, SeqCst);
            }
        }
        if s.must_wait(&regions, a, b) {
            s.release(regions);
            return self.blocked.push(io);
        }
        let mut all_dirty = true;
        for r in regions.clone() {
            let region = &s.regions[r as usize];
            if region.state.load(SeqCst) == DIRTY {
                if !region.touched.load(Relaxed) {
                    region.touched.store(true, Relaxed);
                }
            } else {
                all_dirty = false;
            }
        }
        if !all_dirty && !s.mark_dirty(regions.clone()) {
            if s.broken.load(SeqCst) {
                s.release(regions);
                return io.fail(libc::EIO);
            }
            return self.held.push(io);
        }
        let mut targets = 0u32;
        for (i, leg) in s.legs.iter().enumerate() {
            targets |= u32::from(leg.holds(b)) << i;
        }
        if targets == 0 {
            s.release(regions);
            return io.fail(libc::EIO);
        }
        let offset = s.layout.data_offset + a;
        let key = self.reqs.insert(Req {
            io,
            left: targets.count_ones(),
            kind: Kind::Write {
                regions,
                ok: false,
                error: None,
                sb: 0,
                flushes: Vec::new(),
            },
        });
        let mut refused = 0u32;
        for leg in legs_of(targets) {
            match self.reqs[key].io.sub(0, len as u32, offset) {
                Ok(sub) => ctx.send(self.legs[leg], sub, token(key, leg)),
                Err(_) => refused |= 1 << leg,
            }
        }
        for leg in legs_of(refused) {
            self.write_answer(key, leg, -libc::EINVAL);
        }
    }

    fn flush(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        if self.flushing {
            // Coalesced: one flush to the legs after the one in flight serves all waiting.
            return self.flush_wait.push(io);
        }
        self.start_flush(io, Vec::new(), ctx);
    }

    fn start_flush(&mut self, io: Io, flushes: Vec<Io>, ctx: &mut QueueCtx<'_>) {
        let s = &*self.shared;
        let targets: Vec<usize> = (0..self.legs.len())
            .filter(|&i| matches!(s.legs[i].state(), LegState::InSync | LegState::Rebuilding))
            .collect();
        self.flushing = true;
        let key = self.reqs.insert(Req {
            io,
            left: targets.len() as u32,
            kind: Kind::Write {
                regions: 0..0,
                ok: false,
                error: None,
                sb: 0,
                flushes,
            },
        });
        for leg in targets {
            match self.reqs[key].io.sub(0, 0, 0) {
                Ok(sub) => ctx.send(self.legs[leg], sub, token(key, leg)),
                Err(_) => self.write_answer(key, leg, -libc::EINVAL),
            }
        }
    }

    /// One leg answered a write (or flush) `key`.
    fn write_answer(&mut self, key: usize, leg: usize, res: i32) {
        let s = &*self.shared;
        let Some(req) = self.reqs.get_mut(key) else {
            return;
        };
        let want = match req.io.op() {
            Op::Write => req.io.len() as i32,
            _ => 0,
        };
        let Kind::Write {
            ok, error, sb: gen, ..
        } = &mut req.kind
        else {
            return;
        };
        if res == want {
            *ok |= s.legs[leg].state() == LegState::InSync;
        } else {
            let err = if res < 0 { res } else { -libc::EIO };
            let what = if want == 0 { "flush/discard" } else { "write" };
            let why = format!(
                "{what} failed on leg {leg} ({}): {}",
                s.legs[leg].name(),
                std::io::Error::from_raw_os_error(-err)
            );
            match s.fail_leg(leg, &why) {
                Some(g) => *gen = (*gen).max(g),
                None => {
                    error.get_or_insert(err);
                }
            }
        }
        req.left -= 1;
        if req.left > 0 {
            return;
        }
        let req = self.reqs.remove(key);
        let Kind::Write {
            regions,
            ok,
            error,
            sb,
            flushes,
        } = req.kind
        else {
            return;
        };
        let is_flush = req.io.op() == Op::Flush;
        s.release(regions);
        let res = if ok {
            want
        } else {
            error.unwrap_or(-libc::EIO)
        };
        if sb > s.sb_durable.load(SeqCst) {
            self.acks.push((req.io, res, sb, flushes));
        } else {
            answer(req.io, res, flushes);
        }
        if is_flush {
            self.flushing = false;
        }
    }

    fn read_answer(&mut self, key: usize, leg: usize, done: Completion, ctx: &mut QueueCtx<'_>) {
        self.reading[leg] = self.reading[leg].saturating_sub(1);
        let Some(req) = self.reqs.get_mut(key) else {
            return;
        };
        let want = req.io.len() as i32;
        if done.result == want {
            let req = self.reqs.remove(key);
            let (a, b) = (req.io.offset(), req.io.offset() + u64::from(want as u32));
            if let Kind::Read { failed, .. } = req.kind {
                self.repair_failed(failed, a, b);
            }
            return req.io.complete(want);
        }
        let s = &*self.shared;
        let (a, b) = (req.io.offset(), req.io.offset() + u64::from(req.io.len()));
        let err = if done.result < 0 {
            done.result
        } else {
            -libc::EIO
        };
        let why = format!(
            "read of {a}..{b} failed on leg {leg} ({}): {}",
            s.legs[leg].name(),
            std::io::Error::from_raw_os_error(-err)
        );
        let Kind::Read {
            tried,
            error,
            failed,
            ..
        } = &mut req.kind
        else {
            return;
        };
        *error = err;
        *failed |= 1 << leg;
        let tried_now = *tried;
        let next = self.pick_read(a, b, tried_now);
        match (next, done.retry) {
            (Some(next), Some(retry)) => {
                if let Some(Req {
                    kind: Kind::Read { tried, leg, .. },
                    ..
                }) = self.reqs.get_mut(key)
                {
                    *tried |= 1 << next;
                    *leg = next;
                }
                self.reading[next] += 1;
                ctx.send(self.legs[next], retry, token(key, next));
            }
            _ => {
                // No leg could serve it: the legs that failed stay (there is nothing to
                // repair them from), and the error goes up.
                let req = self.reqs.remove(key);
                req.io.complete(err);
                tracing::error!("mirror: {why}; no other leg holds {a}..{b}");
            }
        }
    }

    /// Legs in `failed` could not read `[a, b)`, which another leg served: rewrite it there.
    fn repair_failed(&self, failed: u32, a: u64, b: u64) {
        for leg in 0..self.legs.len() {
            if failed & (1 << leg) != 0 {
                let why = format!("read of {a}..{b} failed on leg {leg}");
                self.shared.repair(leg, a, b, &why);
            }
        }
    }

    /// The daemon moved: retry blocked and held writes, answer what it made durable.
    fn wake(&mut self, ctx: &mut QueueCtx<'_>) {
        for io in std::mem::take(&mut self.held) {
            self.write(io, true, ctx);
        }
        for io in std::mem::take(&mut self.blocked) {
            self.write(io, false, ctx);
        }
        let durable = self.shared.sb_durable.load(SeqCst);
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.acks)
            .into_iter()
            .partition(|a| a.2 <= durable);
        self.acks = waiting;
        for (io, res, _, flushes) in ready {
            answer(io, res, flushes);
        }
    }

    fn after(&mut self, ctx: &mut QueueCtx<'_>) {
        if !self.flushing && !self.flush_wait.is_empty() {
            let mut waiting = std::mem::take(&mut self.flush_wait).into_iter();
            if let Some(first) = waiting.next() {
                self.start_flush(first, waiting.collect(), ctx);
            }
        }
    }
}

/// Completes a request and the flushes it stood for.
fn answer(io: Io, res: i32, flushes: Vec<Io>) {
    for f in flushes {
        if res < 0 {
            f.complete(res);
        } else {
            f.complete_ok();
        }
    }
    io.complete(res);
}

/// The legs in a bit mask, lowest first.
fn legs_of(mask: u32) -> impl Iterator<Item = usize> {
    (0..32).filter(move |i| mask & (1 << i) != 0)
}

fn token(key: usize, leg: usize) -> u64 {
    ((key as u64) << LEG_BITS) | leg as u64
}

impl QueueTarget for MirrorQueue {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        self.refresh(ctx);
        match io.op() {
            Op::Read => self.read(io, ctx),
            Op::Write | Op::Discard | Op::WriteZeroes => self.write(io, false, ctx),
            Op::Flush => self.flush(io, ctx),
            _ => io.fail(libc::EOPNOTSUPP),
        }
    }

    fn complete(&mut self, done: Completion, ctx: &mut QueueCtx<'_>) {
        self.refresh(ctx);
        if done.token == WAKE {
            self.wake(ctx);
        } else {
            let key = (done.token >> LEG_BITS) as usize;
            let leg = (done.token & LEG_MASK) as usize;
            match self
                .reqs
                .get(key)
                .map(|r| matches!(r.kind, Kind::Read { .. }))
            {
                Some(true) => self.read_answer(key, leg, done, ctx),
                Some(false) => self.write_answer(key, leg, done.result),
                None => tracing::error!(token = done.token, "mirror: answer for no request"),
            }
        }
        self.after(ctx);
    }
}
