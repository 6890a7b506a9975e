//! The faulty target: a wrapper node that passes I/O through to its child and, when told,
//! fails chosen operations with `EIO` — everywhere or in a byte range, always or every Nth —
//! or delays them. The rule can be changed while the device runs (`ublk fault`), so a test can
//! break a mirror leg in the middle of fio and heal it later.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ublk_zc::{BoxTarget, Child, Completion, Io, Op, OpenCtx, QueueCtx, QueueTarget, Target};

/// Which operations a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOps {
    /// Reads.
    Read,
    /// Writes (and write-zeroes).
    Write,
    /// Flushes.
    Flush,
    /// Every operation.
    All,
}

impl FaultOps {
    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultOps::Read => "read",
            FaultOps::Write => "write",
            FaultOps::Flush => "flush",
            FaultOps::All => "all",
        }
    }

    /// The set a command-line name stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            FaultOps::Read,
            FaultOps::Write,
            FaultOps::Flush,
            FaultOps::All,
        ]
        .into_iter()
        .find(|o| o.name() == name)
    }

    fn matches(self, op: Op) -> bool {
        match self {
            FaultOps::Read => op == Op::Read,
            FaultOps::Write => matches!(op, Op::Write | Op::WriteZeroes),
            FaultOps::Flush => op == Op::Flush,
            FaultOps::All => true,
        }
    }
}

/// What to do to matching operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    /// The operations it applies to.
    pub ops: FaultOps,
    /// Only operations overlapping `[offset, offset + len)` (in this node's offsets); `None`
    /// for the whole device. A flush has no range and matches any.
    pub range: Option<(u64, u64)>,
    /// Only every Nth matching operation (1: all of them), counted by each queue on its own.
    pub every: u64,
    /// Fail them with `EIO`.
    pub fail: bool,
    /// Delay them by this much first.
    pub delay: Duration,
}

impl FaultRule {
    fn matches(&self, io: &Io) -> bool {
        self.matches_range(io.op(), io.offset(), u64::from(io.len()))
    }

    fn matches_range(&self, op: Op, offset: u64, len: u64) -> bool {
        if !self.ops.matches(op) {
            return false;
        }
        match self.range {
            Some((start, rlen)) if op != Op::Flush => {
                let end = offset.saturating_add(len);
                offset < start.saturating_add(rlen) && end > start
            }
            _ => true,
        }
    }
}

/// The rule shared by every queue of one faulty node; queues re-read it when its
/// generation changes.
#[derive(Debug, Default)]
pub struct FaultSwitch {
    generation: AtomicU64,
    rule: Mutex<Option<FaultRule>>,
}

impl FaultSwitch {
    /// Sets (`Some`) or clears (`None`) the rule.
    pub fn set(&self, rule: Option<FaultRule>) {
        *self.rule.lock().unwrap_or_else(|e| e.into_inner()) = rule;
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The rule in force.
    pub fn get(&self) -> Option<FaultRule> {
        *self.rule.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A pass-through node with switchable fault injection.
pub struct Faulty {
    child: BoxTarget,
    switch: Arc<FaultSwitch>,
}

impl std::fmt::Debug for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faulty")
            .field("rule", &self.switch.get())
            .finish_non_exhaustive()
    }
}

impl Faulty {
    /// Wraps `child`, starting with `rule` (`None`: pass everything through).
    pub fn new(child: BoxTarget, rule: Option<FaultRule>) -> Self {
        let switch = Arc::new(FaultSwitch::default());
        switch.set(rule);
        Faulty { child, switch }
    }

    /// The switch that changes the rule at run time.
    pub fn switch(&self) -> Arc<FaultSwitch> {
        Arc::clone(&self.switch)
    }
}

impl Target for Faulty {
    type Queue = FaultyQueue;

    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<FaultyQueue> {
        Ok(FaultyQueue {
            child: ctx.open_child(&*self.child)?,
            switch: Arc::clone(&self.switch),
            seen: u64::MAX,
            rule: None,
            matched: 0,
        })
    }

    fn size(&self) -> Option<u64> {
        self.child.dyn_size()
    }

    fn needs_data(&self) -> bool {
        self.child.dyn_needs_data()
    }

    fn copies_data(&self) -> bool {
        self.child.dyn_copies_data()
    }

    /// Passes through, unless the rule in force matches a read of this range: then it is
    /// delayed and failed as the rule says (`every` does not apply).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.direct(Op::Read, offset, buf.len())?;
        self.child.dyn_read_at(offset, buf)
    }

    /// As [`Faulty::read_at`], for writes.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.direct(Op::Write, offset, buf.len())?;
        self.child.dyn_write_at(offset, buf)
    }
}

impl Faulty {
    /// Applies the rule to a direct access.
    fn direct(&self, op: Op, offset: u64, len: usize) -> io::Result<()> {
        let Some(rule) = self.switch.get() else {
            return Ok(());
        };
        if !rule.matches_range(op, offset, len as u64) {
            return Ok(());
        }
        std::thread::sleep(rule.delay);
        if rule.fail {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

/// One queue of a [`Faulty`] node.
#[derive(Debug)]
pub struct FaultyQueue {
    child: Child,
    switch: Arc<FaultSwitch>,
    /// The switch generation `rule` was read at.
    seen: u64,
    rule: Option<FaultRule>,
    /// Matching operations seen under the current rule (for `every`).
    matched: u64,
}

/// Token of a delayed operation that then fails.
const FAIL: u64 = 1;
/// Token of a delayed operation that then passes through.
const PASS: u64 = 0;

impl QueueTarget for FaultyQueue {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        let generation = self.switch.generation.load(Ordering::Acquire);
        if generation != self.seen {
            self.seen = generation;
            self.rule = self.switch.get();
            self.matched = 0;
        }
        let Some(rule) = self.rule.filter(|r| r.matches(&io)) else {
            return ctx.forward(self.child, io);
        };
        self.matched += 1;
        if self.matched % rule.every.max(1) != 0 {
            return ctx.forward(self.child, io);
        }
        let token = if rule.fail { FAIL } else { PASS };
        if !rule.delay.is_zero() {
            ctx.timeout(rule.delay, Some(io), token);
        } else if rule.fail {
            io.fail(libc::EIO);
        } else {
            ctx.forward(self.child, io);
        }
    }

    fn complete(&mut self, done: Completion, ctx: &mut QueueCtx<'_>) {
        let Some(io) = done.io else {
            tracing::error!("faulty: a timer ended without its request");
            return;
        };
        if done.token == FAIL {
            io.fail(libc::EIO);
        } else {
            ctx.forward(self.child, io);
        }
    }
}
