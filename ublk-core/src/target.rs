//! The block-backend interface every target implements, and how targets stack.
//!
//! A [`Target`] is shared by all queues; each queue thread opens its own [`QueueTarget`]. A
//! target may own other targets as children: when its queue half is opened it opens theirs
//! with [`OpenCtx::open_child`] and keeps the [`Child`] handles. The queue's engine keeps every
//! opened node in one table (the root first, each node before its children), hands each
//! request to its node as an [`Io`], and routes every completion — of a request a node sent
//! to a child, or of an operation it started on the queue's io_uring — back to the node that
//! asked, as a [`Completion`] carrying the token the node chose.
//!
//! A whole kernel request and a sub-request of one are the same type, so a leaf serves both
//! with the same code.

use std::io;
use std::sync::Arc;

use crate::buf::Bounce;
use crate::ctx::QueueCtx;
use crate::io::Geometry;
use crate::request::{Io, NodeId, SubIo};

/// A block backend: the device-wide half of a target.
pub trait Target: Send + Sync + 'static {
    /// Per-queue state, created and used only on that queue's thread.
    type Queue: QueueTarget;

    /// Opens the per-queue half; called on the queue's own thread (once per thread when a
    /// queue is served by several). A node with children opens theirs here with
    /// [`OpenCtx::open_child`].
    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<Self::Queue>;

    /// The size in bytes this target serves, when it knows it. A parent uses it to lay out
    /// its children, and the engine refuses requests sent to a child past it.
    fn size(&self) -> Option<u64> {
        None
    }

    /// Whether the target reads or writes request bytes itself (with [`Io::data`],
    /// [`Io::data_mut`] or the copy methods). Targets that only pass buffers on (the
    /// operations of [`QueueCtx`], sub-requests to children) or ignore data return false and
    /// may run in the zero-copy modes. A node with children answers for its subtree.
    fn needs_data(&self) -> bool {
        true
    }

    /// Whether the target moves request bytes only with the copy methods of [`Io`]
    /// ([`Io::copy_data_to`], [`Io::copy_data_from`], their mapping variants and
    /// [`Io::zero_data`]) or not at all, never through [`Io::data`], [`Io::data_mut`] or file
    /// operations on the request. In [`crate::BufferMode::UserCopy`] such a target gets one
    /// copy per request, straight between the request's pages and its own memory; any other
    /// has its bytes staged in the tag buffer by the engine. A node with children answers
    /// for its subtree.
    fn copies_data(&self) -> bool {
        false
    }

    /// Reads `buf.len()` bytes at `offset` synchronously, from any thread and outside the
    /// queues: direct access for metadata (a mirror's superblock and bitmap, a rebuild's
    /// copy) and for offline tools. Targets that cannot answer leave the default, which
    /// fails with `Unsupported`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let _ = (offset, buf);
        Err(direct_unsupported())
    }

    /// Writes `buf` at `offset` synchronously and durably (on stable storage when it
    /// returns, as a write with FUA), from any thread and outside the queues; see
    /// [`Target::read_at`].
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let _ = (offset, buf);
        Err(direct_unsupported())
    }
}

fn direct_unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "this target has no direct (synchronous) access",
    )
}

/// [`Target`] in a form that can be boxed: what a parent holds its children as, and what a
/// tree built at run time (the `ublk` tool's stack expressions) is made of.
pub trait DynTarget: Send + Sync + 'static {
    /// [`Target::open_queue`], boxed.
    fn open_dyn(&self, ctx: &mut OpenCtx<'_>) -> io::Result<Box<dyn QueueTarget>>;
    /// [`Target::size`].
    fn dyn_size(&self) -> Option<u64>;
    /// [`Target::needs_data`].
    fn dyn_needs_data(&self) -> bool;
    /// [`Target::copies_data`].
    fn dyn_copies_data(&self) -> bool;
    /// [`Target::read_at`].
    fn dyn_read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// [`Target::write_at`].
    fn dyn_write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
}

impl<T: Target> DynTarget for T {
    fn open_dyn(&self, ctx: &mut OpenCtx<'_>) -> io::Result<Box<dyn QueueTarget>> {
        Ok(Box::new(self.open_queue(ctx)?))
    }
    fn dyn_size(&self) -> Option<u64> {
        self.size()
    }
    fn dyn_needs_data(&self) -> bool {
        self.needs_data()
    }
    fn dyn_copies_data(&self) -> bool {
        self.copies_data()
    }
    fn dyn_read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_at(offset, buf)
    }
    fn dyn_write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.write_at(offset, buf)
    }
}

/// A target chosen at run time.
pub type BoxTarget = Arc<dyn DynTarget>;

impl Target for BoxTarget {
    type Queue = Box<dyn QueueTarget>;

    // `(**self)`: the boxed target's own methods, not this impl's (an `Arc<dyn DynTarget>`
    // is itself a `DynTarget` through this very impl).
    fn open_queue(&self, ctx: &mut OpenCtx<'_>) -> io::Result<Self::Queue> {
        (**self).open_dyn(ctx)
    }
    fn size(&self) -> Option<u64> {
        (**self).dyn_size()
    }
    fn needs_data(&self) -> bool {
        (**self).dyn_needs_data()
    }
    fn copies_data(&self) -> bool {
        (**self).dyn_copies_data()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).dyn_read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        (**self).dyn_write_at(offset, buf)
    }
}

/// The per-queue half of a target: a node of the queue's tree.
pub trait QueueTarget: 'static {
    /// Starts one request. Complete it now or later with [`Io::complete`] (or one of its
    /// shorthands), pass it on with [`QueueCtx::forward`], split it over children with
    /// [`QueueCtx::fan_out`] or [`Io::sub`] + [`QueueCtx::send`], or serve it with the
    /// operations of [`QueueCtx`]. A panic here fails this request with `-EIO` and the queue
    /// keeps serving.
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>);

    /// Something this node started finished: a request it sent to a child
    /// ([`QueueCtx::send`]) or an operation on the queue's io_uring. `done.token` is the
    /// token it gave. Nodes that start neither ignore this.
    fn complete(&mut self, done: Completion, ctx: &mut QueueCtx<'_>) {
        let _ = ctx;
        tracing::error!(
            token = done.token,
            "completion for a node that starts no I/O of its own"
        );
    }
}

impl QueueTarget for Box<dyn QueueTarget> {
    fn submit(&mut self, io: Io, ctx: &mut QueueCtx<'_>) {
        (**self).submit(io, ctx)
    }
    fn complete(&mut self, done: Completion, ctx: &mut QueueCtx<'_>) {
        (**self).complete(done, ctx)
    }
}

/// The end of something a node started, delivered to [`QueueTarget::complete`].
#[derive(Debug)]
#[non_exhaustive]
pub struct Completion {
    /// The token the node gave when it started it.
    pub token: u64,
    /// Bytes done, 0, or a negative errno.
    pub result: i32,
    /// For an operation started on a request ([`QueueCtx::read`], [`QueueCtx::write`]):
    /// that request, for the node to complete.
    pub io: Option<Io>,
    /// For a sub-request that failed or fell short: the same request again, detached, to
    /// send to another child (a mirror's read retry) or drop. Sent to the same child it
    /// would most likely fail the same way: bound the retries.
    pub retry: Option<SubIo>,
    /// For a request over a bounce buffer ([`QueueCtx::bounce_io`]): the buffer, back.
    pub bounce: Option<Bounce>,
}

impl Completion {
    pub(crate) fn new(token: u64, result: i32) -> Self {
        Completion {
            token,
            result,
            io: None,
            retry: None,
            bounce: None,
        }
    }
}

/// A node's handle on one of its children, from [`OpenCtx::open_child`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Child(pub(crate) NodeId);

impl Child {
    /// The child's node id.
    pub fn id(self) -> NodeId {
        self.0
    }
}

/// What the engine knows of one node of a queue's tree.
#[derive(Debug, Clone)]
pub(crate) struct NodeMeta {
    pub(crate) parent: Option<NodeId>,
    pub(crate) size: Option<u64>,
    /// The node's address: `/` for the root, `/0/1` for the second child of its first child.
    pub(crate) path: String,
    pub(crate) children: u32,
}

/// The nodes of a queue's tree as they are opened.
pub(crate) struct Tree {
    pub(crate) nodes: Vec<Box<dyn QueueTarget>>,
    pub(crate) meta: Vec<NodeMeta>,
}

/// What a node sees while its queue half is opened: the queue, the device geometry, and
/// the way to open its children.
pub struct OpenCtx<'a> {
    q_id: u16,
    geo: &'a Geometry,
    slots: &'a mut Vec<Option<Box<dyn QueueTarget>>>,
    meta: &'a mut Vec<NodeMeta>,
    current: NodeId,
}

impl std::fmt::Debug for OpenCtx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenCtx")
            .field("q_id", &self.q_id)
            .field("node", &self.current)
            .finish_non_exhaustive()
    }
}

impl OpenCtx<'_> {
    /// The queue's id.
    pub fn q_id(&self) -> u16 {
        self.q_id
    }

    /// The device's size and limits (for the root; a child serves its own size).
    pub fn geometry(&self) -> &Geometry {
        self.geo
    }

    /// The node being opened.
    pub fn node(&self) -> NodeId {
        self.current
    }

    /// Opens `child`'s queue half as a child of the node being opened, and returns the
    /// handle to send it requests with. Children are numbered in the order they are opened.
    pub fn open_child(&mut self, child: &dyn DynTarget) -> io::Result<Child> {
        open_child_at(
            self.q_id,
            self.geo,
            self.slots,
            self.meta,
            self.current,
            child,
        )
    }
}

/// Opens `child` as a child of `current` in the table `slots`/`meta`.
pub(crate) fn open_child_at(
    q_id: u16,
    geo: &Geometry,
    slots: &mut Vec<Option<Box<dyn QueueTarget>>>,
    meta: &mut Vec<NodeMeta>,
    current: NodeId,
    child: &dyn DynTarget,
) -> io::Result<Child> {
    let id =
        NodeId(u32::try_from(slots.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "too many nodes in the tree")
        })?);
    let parent = &mut meta[current.index()];
    let path = if parent.path == "/" {
        format!("/{}", parent.children)
    } else {
        format!("{}/{}", parent.path, parent.children)
    };
    parent.children += 1;
    slots.push(None);
    meta.push(NodeMeta {
        parent: Some(current),
        size: child.dyn_size(),
        path,
        children: 0,
    });
    let queue = child.open_dyn(&mut OpenCtx {
        q_id,
        geo,
        slots,
        meta,
        current: id,
    })?;
    slots[id.index()] = Some(queue);
    Ok(Child(id))
}

/// Opens `root`'s queue half and, through it, the whole tree.
pub(crate) fn open_tree<T: Target>(root: &T, q_id: u16, geo: &Geometry) -> io::Result<Tree> {
    let mut slots: Vec<Option<Box<dyn QueueTarget>>> = vec![None];
    let mut meta = vec![NodeMeta {
        parent: None,
        size: root.size().or(Some(geo.size)),
        path: "/".into(),
        children: 0,
    }];
    let queue = root.open_queue(&mut OpenCtx {
        q_id,
        geo,
        slots: &mut slots,
        meta: &mut meta,
        current: NodeId(0),
    })?;
    slots[0] = Some(Box::new(queue));
    let nodes = slots
        .into_iter()
        .map(|s| s.ok_or_else(|| io::Error::other("a node of the tree was not opened")))
        .collect::<io::Result<_>>()?;
    Ok(Tree { nodes, meta })
}
