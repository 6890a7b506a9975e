//! The `UBLK_F_BATCH_IO` transport of one queue: tags arrive in batches from one multishot
//! FETCH_IO_CMDS and results leave in batches through COMMIT_IO_CMDS.
//!
//! - At start, PREP_IO_CMDS hands the kernel every tag with its buffer address (one element
//!   per tag), which makes the queue ready.
//! - FETCH_IO_CMDS is a multishot uring_cmd that selects a buffer from a provided-buffer group
//!   and writes the tags of ready requests into it (u16 each); each CQE names the buffer (its
//!   id in the CQE flags) and the bytes written (`res`). The buffer is given back to the group
//!   once its tags are read. A CQE without `IORING_CQE_F_MORE` ends the multishot (for
//!   instance when the group ran out of buffers) and the fetch is armed again; `-ENODEV`
//!   (UBLK_IO_RES_ABORT) means the queue is going away and ends fetching.
//! - COMMIT_IO_CMDS carries many results; its CQE's `res` is the bytes of the element array
//!   the kernel handled, and the rest is submitted again.
//!
//! Every buffer an in-flight SQE refers to (the fetch buffers, PREP and COMMIT element arrays)
//! is owned by [`BatchIo`] and stays allocated until that SQE's completion; if the value is
//! dropped earlier, the memory is leaked rather than freed under the kernel.

use std::io;
use std::mem::{size_of, ManuallyDrop};
use std::os::fd::RawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::mmap::{page_size, round_up, Mapping};
use crate::{pod, sys};

/// `IORING_URING_CMD_MULTISHOT` (include/uapi/linux/io_uring.h): the uring_cmd may post many
/// CQEs.
const IORING_URING_CMD_MULTISHOT: u32 = 1 << 1;
/// Offsets of `uring_cmd_flags` (u32) and `buf_group` (u16) in `struct io_uring_sqe`.
const SQE_URING_CMD_FLAGS: usize = 28;
const SQE_BUF_GROUP: usize = 40;

/// Tags one fetch buffer holds; the kernel posts at most 128 tags per CQE.
const TAGS_PER_FETCH: usize = 128;
const FETCH_BUF_BYTES: usize = TAGS_PER_FETCH * size_of::<u16>();
/// Fetch buffers in the group: more than one, so the kernel can post again before the loop
/// turn that gives a used buffer back.
const FETCH_BUFS: u16 = 16;
/// The queue ring's provided-buffer group for fetches (nothing else on the ring uses one).
const FETCH_GROUP: u16 = 1;

/// `user_data` bit of the commands this module pushes; the kind and an id sit below it.
const BATCH_OP: u64 = crate::user_data::BATCH;
const KIND_SHIFT: u32 = 16;
const KIND_PREP: u64 = 1;
const KIND_FETCH: u64 = 2;
const KIND_COMMIT: u64 = 3;
const KIND_PROVIDE: u64 = 4;

fn token(kind: u64, id: u16) -> u64 {
    BATCH_OP | kind << KIND_SHIFT | u64::from(id)
}

const _: () = assert!(size_of::<sys::ublk_elem_header>() == 8);

/// How the elements of PREP and COMMIT arrays look for the queue's buffer mode. Arrays are
/// kept as 8-byte words: each element is its `ublk_elem_header`, followed in the copy modes
/// by the tag's buffer address (`UBLK_BATCH_F_HAS_BUF_ADDR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ElemLayout {
    /// Elements carry the tag's buffer address (the kernel copies to and from it).
    pub buf_addr: bool,
    /// The header's `buf_index` gives the buffer-table slot for `UBLK_F_AUTO_BUF_REG` (the
    /// tag, as in the per-request protocol).
    pub auto_buf_reg: bool,
}

impl ElemLayout {
    fn words(self) -> usize {
        if self.buf_addr {
            2
        } else {
            1
        }
    }

    fn bytes(self) -> usize {
        self.words() * size_of::<u64>()
    }

    fn flags(self) -> u16 {
        if self.buf_addr {
            sys::UBLK_BATCH_F_HAS_BUF_ADDR
        } else {
            0
        }
    }

    /// Appends `tag`'s element with `result` to `out`.
    fn push(self, out: &mut Vec<u64>, tag: u16, result: i32, buf_addr: u64) {
        let buf_index = if self.auto_buf_reg { tag } else { 0 };
        out.push(header_word(tag, buf_index, result));
        if self.buf_addr {
            out.push(buf_addr);
        }
    }
}

/// A `ublk_elem_header` as the 8-byte word it occupies in an element array.
fn header_word(tag: u16, buf_index: u16, result: i32) -> u64 {
    let header = sys::ublk_elem_header {
        tag,
        buf_index,
        result,
    };
    u64::from_ne_bytes(pod::to_cmd_bytes(&header))
}

/// The tag of a header word.
fn header_tag(word: u64) -> u16 {
    pod::from_bytes::<sys::ublk_elem_header>(&word.to_ne_bytes())
        .expect("a word holds a whole header (size checked above)")
        .tag
}

/// The 16 command bytes of `struct ublk_batch_io`.
fn batch_cmd(q_id: u16, flags: u16, nr_elem: u16, elem_bytes: u8) -> [u8; 16] {
    pod::to_cmd_bytes(&sys::ublk_batch_io {
        q_id,
        flags,
        nr_elem,
        elem_bytes,
        ..Default::default()
    })
}

/// Turns `sqe` into a multishot uring_cmd that selects its buffer from `group`. The io_uring
/// crate's `UringCmd16` has no setters for these two fields.
fn set_multishot_group(sqe: &mut squeue::Entry, group: u16) {
    const { assert!(size_of::<squeue::Entry>() == 64) };
    let base = (sqe as *mut squeue::Entry).cast::<u8>();
    // `Entry` is a repr(C) wrapper of the 64-byte `struct io_uring_sqe` (size checked above),
    // made only of integers and unions of integers, so any bytes are valid; the offsets are
    // those of `uring_cmd_flags` and `buf_group` in the UAPI layout, inside the 64 bytes.
    // SAFETY: in-bounds unaligned writes of valid bytes through the unique `&mut` (above).
    unsafe {
        base.add(SQE_URING_CMD_FLAGS)
            .cast::<u32>()
            .write_unaligned(IORING_URING_CMD_MULTISHOT);
        base.add(SQE_BUF_GROUP).cast::<u16>().write_unaligned(group);
    }
}

/// One COMMIT_IO_CMDS array and how far the kernel got through it.
#[derive(Debug, Default)]
struct Commit {
    /// The elements, as words (see [`ElemLayout`]).
    elems: Vec<u64>,
    /// Words of elements the kernel has handled (or refused) so far.
    done: usize,
    in_flight: bool,
}

/// The batch transport of one queue. Tags are validated (`< depth`) before they are handed
/// out; results are gathered with [`BatchIo::queue_result`] and sent with
/// [`BatchIo::submit_commits`], one command per loop turn.
#[derive(Debug)]
pub(crate) struct BatchIo {
    fd: RawFd,
    q_id: u16,
    layout: ElemLayout,
    /// The buffer address of each tag (its arena buffer), sent in every element of the copy
    /// modes.
    buf_addrs: Vec<u64>,
    /// `FETCH_BUFS` buffers of `FETCH_BUF_BYTES`, provided to the ring as group
    /// `FETCH_GROUP`. Memory the kernel writes tags into: read only with volatile loads.
    /// Dropped by hand: leaked instead while the kernel may still write into it.
    fetch_bufs: ManuallyDrop<Mapping>,
    /// A fetch command is armed (or its SQE is queued).
    fetching: bool,
    prep: Vec<u64>,
    prep_in_flight: bool,
    /// Results drained this loop turn, not yet sent (element words).
    pending: Vec<u64>,
    commits: Vec<Commit>,
}

impl BatchIo {
    /// A transport for queue `q_id` of the device whose char device is `fd`; tag `t`'s buffer
    /// is at `buf_addrs[t]` (sent only if `layout.buf_addr`).
    pub(crate) fn new(
        fd: RawFd,
        q_id: u16,
        buf_addrs: Vec<u64>,
        layout: ElemLayout,
    ) -> io::Result<Self> {
        let len = round_up(FETCH_BUF_BYTES * usize::from(FETCH_BUFS), page_size())
            .expect("a few KiB round up without overflow");
        let depth = buf_addrs.len();
        Ok(BatchIo {
            fd,
            q_id,
            layout,
            buf_addrs,
            fetch_bufs: ManuallyDrop::new(Mapping::anonymous(len)?),
            fetching: false,
            prep: Vec::new(),
            prep_in_flight: false,
            pending: Vec::with_capacity(depth * layout.words()),
            commits: Vec::new(),
        })
    }

    /// Whether the kernel still delivers requests: false once the fetch ended with ABORT.
    pub(crate) fn fetching(&self) -> bool {
        self.fetching
    }

    /// Whether no COMMIT is waiting for its completion.
    pub(crate) fn commits_idle(&self) -> bool {
        !self.commits.iter().any(|c| c.in_flight)
    }

    /// Provides the fetch buffers, prepares every tag (waiting for the kernel's answer, which
    /// is what makes the queue ready), then arms the multishot fetch. `ring` must have
    /// nothing else in flight.
    pub(crate) fn start(&mut self, ring: &mut IoUring) -> io::Result<()> {
        let provide = opcode::ProvideBuffers::new(
            self.fetch_bufs.as_ptr(),
            FETCH_BUF_BYTES as i32,
            FETCH_BUFS,
            FETCH_GROUP,
            0,
        )
        .build()
        .user_data(token(KIND_PROVIDE, u16::MAX));
        self.push(ring, &provide)?;

        let mut prep = Vec::with_capacity(self.buf_addrs.len() * self.layout.words());
        for (tag, &addr) in self.buf_addrs.iter().enumerate() {
            self.layout.push(&mut prep, tag as u16, 0, addr);
        }
        self.prep = prep;
        let nr_elem = u16::try_from(self.buf_addrs.len()).expect("depth <= 4096");
        let prep = opcode::UringCmd16::new(types::Fd(self.fd), sys::UBLK_U_IO_PREP_IO_CMDS)
            .cmd(batch_cmd(
                self.q_id,
                self.layout.flags(),
                nr_elem,
                self.layout.bytes() as u8,
            ))
            .addr(Some(self.prep.as_ptr() as u64))
            .build()
            .user_data(token(KIND_PREP, 0));
        self.prep_in_flight = true;
        self.push(ring, &prep)?;

        let mut waiting = 2;
        while waiting > 0 {
            ring.submit_and_wait(1)?;
            let cqes: Vec<_> = ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (user_data, res) in cqes {
                waiting -= 1;
                let what = if user_data == token(KIND_PREP, 0) {
                    self.prep_in_flight = false;
                    "PREP_IO_CMDS"
                } else {
                    "providing the fetch buffers"
                };
                if res < 0 {
                    return Err(io::Error::other(format!(
                        "the kernel rejected {what}: {}",
                        io::Error::from_raw_os_error(-res)
                    )));
                }
            }
        }
        self.prep = Vec::new();
        self.arm_fetch(ring)
    }

    fn arm_fetch(&mut self, ring: &mut IoUring) -> io::Result<()> {
        let mut fetch = opcode::UringCmd16::new(types::Fd(self.fd), sys::UBLK_U_IO_FETCH_IO_CMDS)
            .cmd(batch_cmd(self.q_id, 0, 0, size_of::<u16>() as u8))
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(token(KIND_FETCH, 0));
        set_multishot_group(&mut fetch, FETCH_GROUP);
        self.fetching = true;
        self.push(ring, &fetch)
    }

    fn provide(&mut self, ring: &mut IoUring, bid: u16) -> io::Result<()> {
        let ptr = self
            .fetch_bufs
            .range(u64::from(bid) * FETCH_BUF_BYTES as u64, FETCH_BUF_BYTES)
            .expect("bid < FETCH_BUFS, so the buffer lies inside the mapping");
        let sqe = opcode::ProvideBuffers::new(ptr, FETCH_BUF_BYTES as i32, 1, FETCH_GROUP, bid)
            .build()
            .user_data(token(KIND_PROVIDE, bid));
        self.push(ring, &sqe)
    }

    /// Handles the completion of one of this module's commands. Tags of newly fetched
    /// requests (each below the depth) are appended to `tags`.
    pub(crate) fn complete(
        &mut self,
        (user_data, res, flags): (u64, i32, u32),
        ring: &mut IoUring,
        tags: &mut Vec<u16>,
    ) -> io::Result<()> {
        let id = (user_data & 0xffff) as u16;
        match (user_data & !BATCH_OP) >> KIND_SHIFT {
            KIND_FETCH => self.fetched(res, flags, ring, tags),
            KIND_COMMIT => self.committed(usize::from(id), res, ring),
            KIND_PROVIDE if res < 0 => Err(io::Error::other(format!(
                "providing fetch buffer {id}: {}",
                io::Error::from_raw_os_error(-res)
            ))),
            KIND_PROVIDE => Ok(()),
            _ => {
                tracing::error!(q = self.q_id, user_data, res, "unexpected batch completion");
                Ok(())
            }
        }
    }

    fn fetched(
        &mut self,
        res: i32,
        flags: u32,
        ring: &mut IoUring,
        tags: &mut Vec<u16>,
    ) -> io::Result<()> {
        if let Some(bid) = cqueue::buffer_select(flags) {
            if bid >= FETCH_BUFS {
                return Err(io::Error::other(format!(
                    "the kernel filled fetch buffer {bid} of {FETCH_BUFS}"
                )));
            }
            let bytes = usize::try_from(res).unwrap_or(0).min(FETCH_BUF_BYTES);
            let base = self
                .fetch_bufs
                .range(u64::from(bid) * FETCH_BUF_BYTES as u64, FETCH_BUF_BYTES)
                .expect("bid < FETCH_BUFS, so the buffer lies inside the mapping")
                .cast::<u16>();
            let depth = self.buf_addrs.len();
            for i in 0..bytes / size_of::<u16>() {
                // i < TAGS_PER_FETCH, so the u16 lies inside buffer `bid` (in the mapping, page
                // aligned, so aligned for u16). The kernel wrote it before posting this CQE and
                // cannot write it again until the buffer is provided again below.
                // SAFETY: in bounds, aligned, not written concurrently (above); a volatile read
                // forms no reference to that memory.
                let tag = unsafe { base.add(i).read_volatile() };
                if usize::from(tag) < depth {
                    tags.push(tag);
                } else {
                    tracing::error!(q = self.q_id, tag, "fetched tag beyond the queue depth");
                }
            }
            self.provide(ring, bid)?;
        }
        if cqueue::more(flags) {
            return Ok(());
        }
        self.fetching = false;
        match res {
            sys::UBLK_IO_RES_ABORT => {
                tracing::debug!(q = self.q_id, "batch fetch aborted: queue going away");
                Ok(())
            }
            r if r >= 0 || r == -libc::ENOBUFS => self.arm_fetch(ring),
            r => Err(io::Error::other(format!(
                "FETCH_IO_CMDS failed: {}",
                io::Error::from_raw_os_error(-r)
            ))),
        }
    }

    /// Adds `tag`'s result to the next COMMIT_IO_CMDS.
    pub(crate) fn queue_result(&mut self, tag: u16, result: i32) {
        let buf_addr = self.buf_addrs.get(usize::from(tag)).copied().unwrap_or(0);
        self.layout.push(&mut self.pending, tag, result, buf_addr);
    }

    /// Sends every queued result in one COMMIT_IO_CMDS.
    pub(crate) fn submit_commits(&mut self, ring: &mut IoUring) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let slot = match self.commits.iter().position(|c| !c.in_flight) {
            Some(slot) => slot,
            None => {
                self.commits.push(Commit::default());
                self.commits.len() - 1
            }
        };
        let commit = &mut self.commits[slot];
        commit.elems.clear();
        std::mem::swap(&mut commit.elems, &mut self.pending);
        commit.done = 0;
        self.send_commit(slot, ring)
    }

    /// Submits the unhandled rest of commit `slot`.
    fn send_commit(&mut self, slot: usize, ring: &mut IoUring) -> io::Result<()> {
        let commit = &mut self.commits[slot];
        let rest = &commit.elems[commit.done..];
        let nr_elem = u16::try_from(rest.len() / self.layout.words())
            .expect("each tag at most once: <= depth");
        let id = u16::try_from(slot).expect("fewer commits in flight than tags");
        let sqe = opcode::UringCmd16::new(types::Fd(self.fd), sys::UBLK_U_IO_COMMIT_IO_CMDS)
            .cmd(batch_cmd(
                self.q_id,
                self.layout.flags(),
                nr_elem,
                self.layout.bytes() as u8,
            ))
            .addr(Some(rest.as_ptr() as u64))
            .build()
            .user_data(token(KIND_COMMIT, id));
        commit.in_flight = true;
        self.push(ring, &sqe)
    }

    fn committed(&mut self, slot: usize, res: i32, ring: &mut IoUring) -> io::Result<()> {
        let (q_id, words, elem_bytes) = (self.q_id, self.layout.words(), self.layout.bytes());
        let Some(commit) = self.commits.get_mut(slot).filter(|c| c.in_flight) else {
            tracing::error!(q = q_id, slot, res, "completion of a commit not in flight");
            return Ok(());
        };
        commit.in_flight = false;
        let rest = (commit.elems.len() - commit.done) / words;
        if res < 0 {
            // Nothing was handled: the first element is the one the kernel refused.
            let tag = header_tag(commit.elems[commit.done]);
            if res == sys::UBLK_IO_RES_ABORT {
                tracing::debug!(q = q_id, tag, "commit refused: queue going away");
            } else {
                tracing::error!(q = q_id, tag, res, "the kernel refused a commit");
            }
            commit.done += words;
        } else {
            let handled = res as usize / elem_bytes;
            if res as usize % elem_bytes != 0 || handled > rest || handled == 0 {
                tracing::error!(q = q_id, res, rest, "malformed COMMIT_IO_CMDS result");
                commit.done = commit.elems.len();
            } else {
                commit.done += handled * words;
            }
        }
        if commit.done < commit.elems.len() {
            self.send_commit(slot, ring)?;
        }
        Ok(())
    }

    fn push(&mut self, ring: &mut IoUring, sqe: &squeue::Entry) -> io::Result<()> {
        loop {
            // Every SQE built here refers only to memory `self` owns (the fetch buffers, the
            // PREP array, a COMMIT array) and marks it in flight before pushing; that memory is
            // neither moved nor freed until the completion clears the mark, and `Drop` leaks
            // whatever is still marked.
            // SAFETY: so the SQE's memory outlives the operation (above).
            if unsafe { ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            ring.submit()?;
        }
    }
}

impl Drop for BatchIo {
    fn drop(&mut self) {
        // The kernel may still write fetched tags into provided buffers, or read arrays of
        // commands it has not completed, until the ring is gone; leak those rather than free
        // memory under it.
        if self.fetching {
            tracing::debug!(
                q = self.q_id,
                "fetch still armed: its buffers are left to the kernel"
            );
        } else {
            // SAFETY: the only drop of the field, which is not used afterwards; no fetch is
            // armed, so nothing selects (and writes into) the provided buffers any more.
            unsafe { ManuallyDrop::drop(&mut self.fetch_bufs) };
        }
        if self.prep_in_flight {
            std::mem::forget(std::mem::take(&mut self.prep));
        }
        for commit in self.commits.iter_mut().filter(|c| c.in_flight) {
            std::mem::forget(std::mem::take(&mut commit.elems));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `struct ublk_batch_io` in ublk_cmd.h: `__u16 q_id; __u16 flags; __u16 nr_elem;
    /// __u8 elem_bytes; __u8 reserved; __u64 reserved2;`.
    #[test]
    fn command_bytes_follow_the_uapi_layout() {
        let cmd = batch_cmd(3, sys::UBLK_BATCH_F_HAS_BUF_ADDR, 100, 16);
        assert_eq!(u16::from_ne_bytes([cmd[0], cmd[1]]), 3);
        assert_eq!(
            u16::from_ne_bytes([cmd[2], cmd[3]]),
            sys::UBLK_BATCH_F_HAS_BUF_ADDR
        );
        assert_eq!(u16::from_ne_bytes([cmd[4], cmd[5]]), 100);
        assert_eq!(cmd[6], 16);
        assert_eq!(cmd[7..], [0; 9], "reserved bytes are zero");
    }

    #[test]
    fn multishot_fetch_sets_flags_and_group() {
        let mut sqe = opcode::UringCmd16::new(types::Fd(5), sys::UBLK_U_IO_FETCH_IO_CMDS)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT);
        set_multishot_group(&mut sqe, 0x1234);
        let base = (&sqe as *const squeue::Entry).cast::<u8>();
        // SAFETY: reads inside the 64-byte SQE at the offsets written above.
        let (flags, group, fd) = unsafe {
            (
                base.add(SQE_URING_CMD_FLAGS).cast::<u32>().read_unaligned(),
                base.add(SQE_BUF_GROUP).cast::<u16>().read_unaligned(),
                base.add(4).cast::<i32>().read_unaligned(),
            )
        };
        assert_eq!((flags, group, fd), (IORING_URING_CMD_MULTISHOT, 0x1234, 5));
    }

    /// `struct ublk_elem_header` in ublk_cmd.h: `__u16 tag; __u16 buf_index; __s32 result;`.
    #[test]
    fn element_words_follow_the_uapi_layout() {
        let b = header_word(0x1234, 0x5678, -5).to_ne_bytes();
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), 0x1234);
        assert_eq!(u16::from_ne_bytes([b[2], b[3]]), 0x5678);
        assert_eq!(i32::from_ne_bytes([b[4], b[5], b[6], b[7]]), -5);
        assert_eq!(header_tag(header_word(77, 1, 2)), 77);

        let mut words = Vec::new();
        let copy = ElemLayout {
            buf_addr: true,
            auto_buf_reg: false,
        };
        copy.push(&mut words, 3, 4096, 0xdead_0000);
        assert_eq!(words, [header_word(3, 0, 4096), 0xdead_0000]);
        assert_eq!(
            (copy.bytes(), copy.flags()),
            (16, sys::UBLK_BATCH_F_HAS_BUF_ADDR)
        );

        words.clear();
        let zero_copy = ElemLayout {
            buf_addr: false,
            auto_buf_reg: true,
        };
        zero_copy.push(&mut words, 9, 0, 0xdead_0000);
        assert_eq!(words, [header_word(9, 9, 0)]);
        assert_eq!((zero_copy.bytes(), zero_copy.flags()), (8, 0));
    }

    #[test]
    fn tokens_do_not_collide_with_other_user_data() {
        use crate::user_data::Owner;
        assert_eq!(Owner::of(token(KIND_COMMIT, 7)), Owner::Batch);
        assert_eq!(Owner::of(token(KIND_PROVIDE, u16::MAX)), Owner::Batch);
        assert_eq!(Owner::of(4095), Owner::Tag(4095));
        assert_eq!(token(KIND_FETCH, 9) & 0xffff, 9);
    }
}
