//! Bookkeeping for a node that joins its children's answers with a rule of its own.
//!
//! [`crate::QueueCtx::fan_out`] joins with the default rule (all must succeed, first error
//! wins) inside the engine. A node with another rule — a mirror acknowledging a write when any
//! in-sync leg took it, a read retried on another leg — sends sub-requests with
//! [`crate::QueueCtx::send`] and gets each answer as a [`crate::Completion`]. [`Joins`] keeps
//! the parked requests, the answers still expected and a per-request state of the node's
//! choosing, keyed by the token the node sends with.

use slab::Slab;

use crate::Io;

/// How the answers to one request came out, for the usual rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Answers that succeeded (served their whole range).
    pub ok: u32,
    /// Answers that failed.
    pub failed: u32,
    /// The first error seen (a negative errno).
    pub first_error: Option<i32>,
}

impl Verdict {
    /// Records one answer: `result` out of `ok_result` (a short count is `-EIO`).
    pub fn record(&mut self, result: i32, ok_result: i32) {
        if result == ok_result {
            self.ok += 1;
        } else {
            self.failed += 1;
            self.first_error
                .get_or_insert(if result < 0 { result } else { -libc::EIO });
        }
    }

    /// The default rule: every answer succeeded, else the first error.
    pub fn all_ok(&self) -> Result<(), i32> {
        match self.first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A mirror's write rule: any answer succeeded, else the first error.
    pub fn any_ok(&self) -> Result<(), i32> {
        match (self.ok, self.first_error) {
            (0, Some(e)) => Err(e),
            (0, None) => Err(-libc::EIO),
            _ => Ok(()),
        }
    }
}

/// A parked request, the answers it still waits for, and the node's state for it.
#[derive(Debug)]
struct Parked<S> {
    io: Io,
    left: u32,
    state: S,
}

/// Requests a node parked while its children answer, keyed by the token it sends with.
#[derive(Debug)]
pub struct Joins<S = Verdict> {
    parked: Slab<Parked<S>>,
}

impl<S> Default for Joins<S> {
    fn default() -> Self {
        Joins {
            parked: Slab::new(),
        }
    }
}

impl<S> Joins<S> {
    /// No request parked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parks `io`, which waits for `answers` answers, with `state`; returns the token to send
    /// its sub-requests with.
    pub fn park(&mut self, io: Io, answers: u32, state: S) -> u64 {
        self.parked.insert(Parked {
            io,
            left: answers,
            state,
        }) as u64
    }

    /// The parked request (to make sub-requests of it).
    pub fn io(&self, token: u64) -> Option<&Io> {
        self.parked.get(token as usize).map(|p| &p.io)
    }

    /// The node's state for the parked request.
    pub fn state_mut(&mut self, token: u64) -> Option<&mut S> {
        self.parked.get_mut(token as usize).map(|p| &mut p.state)
    }

    /// Expects `n` more answers (a retry sent to another child).
    pub fn expect_more(&mut self, token: u64, n: u32) {
        if let Some(p) = self.parked.get_mut(token as usize) {
            p.left += n;
        }
    }

    /// One answer arrived; when it was the last one expected, the request and its state are
    /// handed back for the node to complete.
    pub fn answered(&mut self, token: u64) -> Option<(Io, S)> {
        let p = self.parked.get_mut(token as usize)?;
        p.left = p.left.saturating_sub(1);
        if p.left > 0 {
            return None;
        }
        let p = self.parked.remove(token as usize);
        Some((p.io, p.state))
    }

    /// Requests parked.
    pub fn len(&self) -> usize {
        self.parked.len()
    }

    /// True when none is parked.
    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_their_rules() {
        let mut v = Verdict::default();
        v.record(4096, 4096);
        v.record(-libc::EIO, 4096);
        assert_eq!(v.any_ok(), Ok(()));
        assert_eq!(v.all_ok(), Err(-libc::EIO));
        let mut short = Verdict::default();
        short.record(512, 4096);
        assert_eq!(short.any_ok(), Err(-libc::EIO));
        assert_eq!(Verdict::default().any_ok(), Err(-libc::EIO));
    }
}
