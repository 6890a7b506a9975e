//! The few librados and librbd functions the RBD target needs, declared by hand from
//! `rados/librados.h` and `rbd/librbd.h` (Ceph 16), and the small safe types that own their
//! handles: [`Cluster`] (a connection) → [`IoCtx`] (a pool) → [`Image`] (an open image),
//! each keeping its parent alive so teardown runs image, pool, cluster — and [`AioQueue`],
//! one queue's asynchronous I/O on an image.
//!
//! This is the only module of the crate with `unsafe` code.
//!
//! Completions: librbd runs a completion's callback on its own finisher thread. The callback
//! here only pushes the finished request onto its queue's list and bumps the queue's eventfd
//! — what librbd's own image notification (`rbd_set_image_notification`,
//! `rbd_poll_io_events`) does, but per queue rather than per image handle, so all queues
//! share one image handle (no exclusive-lock hand-offs between handles of one process) and
//! each finds its own completions. The queue thread polls the eventfd on its io_uring and
//! collects every finished request in one batch ([`AioQueue::reap`]).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type RadosT = *mut c_void;
type IoCtxT = *mut c_void;
type ImageT = *mut c_void;
type CompletionT = *mut c_void;
type CallbackT = Option<unsafe extern "C" fn(CompletionT, *mut c_void)>;

#[link(name = "rados")]
extern "C" {
    fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
    fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    fn rados_conf_parse_env(cluster: RadosT, var: *const c_char) -> c_int;
    fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    fn rados_conf_get(
        cluster: RadosT,
        option: *const c_char,
        buf: *mut c_char,
        len: usize,
    ) -> c_int;
    fn rados_connect(cluster: RadosT) -> c_int;
    fn rados_shutdown(cluster: RadosT);
    fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, ioctx: *mut IoCtxT) -> c_int;
    fn rados_ioctx_destroy(ioctx: IoCtxT);
    fn rados_mon_command(
        cluster: RadosT,
        cmd: *const *const c_char,
        cmdlen: usize,
        inbuf: *const c_char,
        inbuflen: usize,
        outbuf: *mut *mut c_char,
        outbuflen: *mut usize,
        outs: *mut *mut c_char,
        outslen: *mut usize,
    ) -> c_int;
    fn rados_buffer_free(buf: *mut c_char);
}

#[link(name = "rbd")]
extern "C" {
    fn rbd_create(io: IoCtxT, name: *const c_char, size: u64, order: *mut c_int) -> c_int;
    fn rbd_open(io: IoCtxT, name: *const c_char, image: *mut ImageT, snap: *const c_char) -> c_int;
    fn rbd_close(image: ImageT) -> c_int;
    fn rbd_get_size(image: ImageT, size: *mut u64) -> c_int;
    fn rbd_read(image: ImageT, ofs: u64, len: usize, buf: *mut c_char) -> isize;
    fn rbd_write(image: ImageT, ofs: u64, len: usize, buf: *const c_char) -> isize;
    fn rbd_flush(image: ImageT) -> c_int;
    fn rbd_aio_create_completion(arg: *mut c_void, cb: CallbackT, c: *mut CompletionT) -> c_int;
    fn rbd_aio_get_return_value(c: CompletionT) -> isize;
    fn rbd_aio_release(c: CompletionT);
    fn rbd_aio_readv(
        image: ImageT,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: CompletionT,
    ) -> c_int;
    fn rbd_aio_writev(
        image: ImageT,
        iov: *const libc::iovec,
        iovcnt: c_int,
        off: u64,
        c: CompletionT,
    ) -> c_int;
    fn rbd_aio_discard(image: ImageT, off: u64, len: u64, c: CompletionT) -> c_int;
    fn rbd_aio_write_zeroes(
        image: ImageT,
        off: u64,
        len: usize,
        c: CompletionT,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    fn rbd_aio_flush(image: ImageT, c: CompletionT) -> c_int;
}

/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zero by writing, keep the extent allocated.
const WRITE_ZEROES_THICK: c_int = 1;

fn cstring(what: &str, text: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {text:?} holds a NUL byte"),
        )
    })
}

/// An `io::Error` for the negative errno `r`, prefixed with what failed.
fn errno_error(r: i64, what: impl std::fmt::Display) -> io::Error {
    let errno = i32::try_from(-r).unwrap_or(libc::EIO);
    let os = io::Error::from_raw_os_error(errno);
    io::Error::new(os.kind(), format!("{what}: {os}"))
}

/// How [`Cluster::connect`] reaches a cluster.
#[derive(Debug, Clone)]
pub struct ConnectOptions<'a> {
    /// The configuration file; `None` reads Ceph's default places (`$CEPH_CONF`,
    /// `/etc/ceph/ceph.conf`, `~/.ceph/config`, `./ceph.conf`).
    pub conf: Option<&'a Path>,
    /// The client's id (`admin` for `client.admin`).
    pub id: &'a str,
    /// How long connecting and each monitor operation may take before failing.
    pub timeout: Duration,
    /// Extra configuration options, set after the file is read.
    pub options: &'a [(&'a str, &'a str)],
}

/// A connection to a Ceph cluster (`rados_t`). Shut down when the last owner (this, or an
/// [`IoCtx`] opened from it) is dropped.
#[derive(Debug)]
pub struct Cluster {
    raw: RadosT,
    mon_host: String,
}

// SAFETY: librados handles may be used from any thread and concurrently (librados is
// thread-safe); the pointer is only freed in Drop, when no other owner remains.
unsafe impl Send for Cluster {}
// SAFETY: as above: every librados call used here may run concurrently on one handle.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Connects, failing within about `o.timeout` when no monitor answers.
    pub fn connect(o: &ConnectOptions<'_>) -> io::Result<Arc<Cluster>> {
        let id = cstring("client id", o.id)?;
        let mut raw: RadosT = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer and `id` a NUL-terminated string that
        // librados copies.
        let r = unsafe { rados_create(&mut raw, id.as_ptr()) };
        if r < 0 {
            return Err(errno_error(r.into(), "cannot create a Ceph client handle"));
        }
        // From here on Drop shuts the handle down, whatever fails.
        let mut cluster = Cluster {
            raw,
            mon_host: String::new(),
        };
        let conf = o
            .conf
            .map(|p| cstring("configuration path", &p.to_string_lossy()))
            .transpose()?;
        let conf_ptr = conf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: `raw` is a live handle not yet connected; the path is NUL-terminated or
        // NULL (the default search), as the function allows.
        let r = unsafe { rados_conf_read_file(cluster.raw, conf_ptr) };
        if r < 0 {
            return Err(match o.conf {
                Some(p) => errno_error(
                    r.into(),
                    format!("cannot read the Ceph configuration {}", p.display()),
                ),
                None => errno_error(
                    r.into(),
                    "no Ceph configuration found ($CEPH_CONF, /etc/ceph/ceph.conf): give conf=",
                ),
            });
        }
        // SAFETY: a live, unconnected handle; NULL means the CEPH_ARGS variable.
        unsafe { rados_conf_parse_env(cluster.raw, std::ptr::null()) };
        let secs = o.timeout.as_secs().max(1).to_string();
        let timeouts = [
            ("client_mount_timeout", secs.as_str()),
            ("rados_mon_op_timeout", secs.as_str()),
        ];
        for (key, value) in timeouts.iter().chain(o.options) {
            cluster.set(key, value)?;
        }
        cluster.mon_host = cluster.get("mon_host").unwrap_or_default();
        // SAFETY: a live, configured handle; connecting twice is not possible here.
        let r = unsafe { rados_connect(cluster.raw) };
        if r < 0 {
            let errno = -r;
            let what = if errno == libc::ETIMEDOUT || errno == libc::ENOTCONN {
                format!(
                    "no Ceph monitor answered within {secs} s (mon_host {})",
                    cluster.mon_host
                )
            } else if errno == libc::EACCES || errno == libc::EPERM {
                format!(
                    "permission denied: the monitors refused client.{} (check its key)",
                    o.id
                )
            } else {
                format!("cannot connect to the Ceph monitors ({})", cluster.mon_host)
            };
            return Err(errno_error(r.into(), what));
        }
        Ok(Arc::new(cluster))
    }

    fn set(&self, key: &str, value: &str) -> io::Result<()> {
        let (k, v) = (cstring("option", key)?, cstring("value", value)?);
        // SAFETY: a live handle; both strings are NUL-terminated and copied by librados.
        let r = unsafe { rados_conf_set(self.raw, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(errno_error(r.into(), format!("Ceph option {key}={value}")));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<String> {
        let k = cstring("option", key).ok()?;
        let mut buf = vec![0u8; 1024];
        // SAFETY: `buf` is writable for its whole length, which is what is passed; librados
        // NUL-terminates what it writes.
        let r = unsafe { rados_conf_get(self.raw, k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return None;
        }
        CStr::from_bytes_until_nul(&buf)
            .ok()
            .map(|s| s.to_string_lossy().into_owned())
    }

    /// The monitors' addresses as configured.
    pub fn mon_host(&self) -> &str {
        &self.mon_host
    }

    /// Sends one monitor command (JSON, as the `ceph` tool does: `{"prefix": "osd new",
    /// ...}`) and returns its output buffer and status text.
    pub fn mon_command(&self, json: &str) -> io::Result<(Vec<u8>, String)> {
        let cmd = cstring("monitor command", json)?;
        let cmds = [cmd.as_ptr()];
        let (mut out, mut out_len) = (std::ptr::null_mut::<c_char>(), 0usize);
        let (mut outs, mut outs_len) = (std::ptr::null_mut::<c_char>(), 0usize);
        // SAFETY: `cmds` holds one NUL-terminated string alive for the call; no input
        // buffer; the four out-pointers are valid, and what librados returns through them is
        // copied and freed below with rados_buffer_free.
        let r = unsafe {
            rados_mon_command(
                self.raw,
                cmds.as_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut outs,
                &mut outs_len,
            )
        };
        // SAFETY: each buffer is either NULL or `len` bytes allocated by librados, read once
        // here and freed exactly once.
        let take = |p: *mut c_char, len: usize| unsafe {
            if p.is_null() {
                Vec::new()
            } else {
                let v = std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec();
                rados_buffer_free(p);
                v
            }
        };
        let out = take(out, out_len);
        let status = String::from_utf8_lossy(&take(outs, outs_len)).into_owned();
        if r < 0 {
            return Err(errno_error(
                r.into(),
                format!("monitor command {json}: {status}"),
            ));
        }
        Ok((out, status))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle is live and no IoCtx uses it (each holds an Arc of this).
        unsafe { rados_shutdown(self.raw) }
    }
}

/// An I/O context on one pool (`rados_ioctx_t`), keeping its [`Cluster`] alive.
#[derive(Debug)]
pub struct IoCtx {
    raw: IoCtxT,
    pool: String,
    _cluster: Arc<Cluster>,
}

// SAFETY: a librados I/O context may be used from several threads at once for the calls made
// here (opening and creating images); it is destroyed only in Drop.
unsafe impl Send for IoCtx {}
// SAFETY: as above.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    /// Opens `pool`.
    pub fn new(cluster: &Arc<Cluster>, pool: &str) -> io::Result<Arc<IoCtx>> {
        let name = cstring("pool name", pool)?;
        let mut raw: IoCtxT = std::ptr::null_mut();
        // SAFETY: a connected cluster handle, a NUL-terminated name and a valid out-pointer.
        let r = unsafe { rados_ioctx_create(cluster.raw, name.as_ptr(), &mut raw) };
        if r < 0 {
            let what = match -r {
                libc::ENOENT => format!("pool {pool} does not exist"),
                libc::EACCES | libc::EPERM => format!("permission denied on pool {pool}"),
                _ => format!("cannot open pool {pool}"),
            };
            return Err(errno_error(r.into(), what));
        }
        Ok(Arc::new(IoCtx {
            raw,
            pool: pool.to_owned(),
            _cluster: Arc::clone(cluster),
        }))
    }

    /// Creates an image of `size` bytes with the cluster's default format and features.
    pub fn create_image(&self, name: &str, size: u64) -> io::Result<()> {
        let cname = cstring("image name", name)?;
        let mut order: c_int = 0;
        // SAFETY: a live ioctx, a NUL-terminated name, and `order` (0: the default object
        // size) valid for librbd to write back.
        let r = unsafe { rbd_create(self.raw, cname.as_ptr(), size, &mut order) };
        if r < 0 {
            return Err(errno_error(
                r.into(),
                format!("cannot create image {}/{name}", self.pool),
            ));
        }
        Ok(())
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: the context is live and no image uses it (each holds an Arc of this).
        unsafe { rados_ioctx_destroy(self.raw) }
    }
}

/// An open RBD image (`rbd_image_t`), keeping its [`IoCtx`] alive. Closed when the last owner
/// — including requests still in flight — lets go.
#[derive(Debug)]
pub struct Image {
    raw: ImageT,
    _ioctx: Arc<IoCtx>,
}

// SAFETY: librbd image handles are thread-safe: reads, writes, flushes and asynchronous
// submissions may come from any thread concurrently; it is closed only in Drop.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Opens `name` in `ioctx`'s pool, at snapshot `snap` (read-only) if given.
    pub fn open(ioctx: &Arc<IoCtx>, name: &str, snap: Option<&str>) -> io::Result<Arc<Image>> {
        let cname = cstring("image name", name)?;
        let csnap = snap.map(|s| cstring("snapshot name", s)).transpose()?;
        let snap_ptr = csnap.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let mut raw: ImageT = std::ptr::null_mut();
        // SAFETY: a live ioctx, NUL-terminated names (snapshot NULL for the head) and a
        // valid out-pointer.
        let r = unsafe { rbd_open(ioctx.raw, cname.as_ptr(), &mut raw, snap_ptr) };
        if r < 0 {
            let pool = &ioctx.pool;
            let what = match (-r, snap) {
                (libc::ENOENT, None) => format!("image {pool}/{name} does not exist"),
                (libc::ENOENT, Some(s)) => {
                    format!("image {pool}/{name} or its snapshot {s} does not exist")
                }
                (libc::EACCES | libc::EPERM, _) => {
                    format!("permission denied opening image {pool}/{name}")
                }
                _ => format!("cannot open image {pool}/{name}"),
            };
            return Err(errno_error(r.into(), what));
        }
        Ok(Arc::new(Image {
            raw,
            _ioctx: Arc::clone(ioctx),
        }))
    }

    /// The image's size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: a live image and a valid out-pointer.
        let r = unsafe { rbd_get_size(self.raw, &mut size) };
        if r < 0 {
            return Err(errno_error(r.into(), "cannot read the image size"));
        }
        Ok(size)
    }

    /// Reads `buf.len()` bytes at `offset`, synchronously.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        // SAFETY: `buf` is writable for its length for the whole (synchronous) call.
        let r = unsafe { rbd_read(self.raw, offset, buf.len(), buf.as_mut_ptr().cast()) };
        match usize::try_from(r) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("rbd read at {offset}: {n} of {} bytes", buf.len()),
            )),
            Err(_) => Err(errno_error(r as i64, format!("rbd read at {offset}"))),
        }
    }

    /// Writes `buf` at `offset`, synchronously (not flushed: see [`Image::flush`]).
    pub fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        // SAFETY: `buf` is readable for its length for the whole (synchronous) call.
        let r = unsafe { rbd_write(self.raw, offset, buf.len(), buf.as_ptr().cast()) };
        match usize::try_from(r) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("rbd write at {offset}: {n} of {} bytes", buf.len()),
            )),
            Err(_) => Err(errno_error(r as i64, format!("rbd write at {offset}"))),
        }
    }

    /// Waits until every write so far is on the OSDs.
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: a live image.
        let r = unsafe { rbd_flush(self.raw) };
        if r < 0 {
            return Err(errno_error(r.into(), "rbd flush"));
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the image is live, and no request is in flight on it: each holds an Arc of
        // this Image until the queue reclaims it.
        let r = unsafe { rbd_close(self.raw) };
        if r < 0 {
            tracing::warn!(
                "closing an rbd image: {}",
                errno_error(r.into(), "rbd_close")
            );
        }
    }
}

/// Where one queue's finished requests gather, and the eventfd that says so.
#[derive(Debug)]
struct Sink {
    done: Mutex<Vec<usize>>,
    eventfd: Arc<File>,
}

/// One asynchronous request while librbd has it: boxed, so its address (the completion's
/// argument) and its iovec stay put; it owns the data buffer librbd reads or fills.
struct Pending {
    token: u64,
    buf: Vec<u8>,
    iov: libc::iovec,
    comp: CompletionT,
    sink: Arc<Sink>,
    _image: Arc<Image>,
}

/// Called by librbd on its finisher thread when a request completes.
unsafe extern "C" fn on_complete(_c: CompletionT, arg: *mut c_void) {
    let pending = arg.cast::<Pending>();
    // SAFETY: `arg` is the Box<Pending> leaked at submission, reclaimed only by the queue
    // after it appears in `done`, which happens below: it is live here. The Arc is cloned
    // first because the queue may free the Pending as soon as it is pushed.
    let sink = unsafe { Arc::clone(&(*pending).sink) };
    match sink.done.lock() {
        Ok(mut done) => done.push(pending as usize),
        Err(poisoned) => poisoned.into_inner().push(pending as usize),
    }
    // A full counter already means "wake up"; nothing else can fail on an eventfd.
    let _ = (&*sink.eventfd).write(&1u64.to_ne_bytes());
}

/// A finished asynchronous request.
#[derive(Debug)]
pub struct AioDone {
    /// The token given at submission.
    pub token: u64,
    /// Bytes done or 0, or a negative errno.
    pub result: i64,
    /// The request's buffer, back (empty for requests without data).
    pub buf: Vec<u8>,
}

/// Which asynchronous operation to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioOp {
    /// Read `buf.len()` bytes at the offset into the buffer.
    Read,
    /// Write the buffer at the offset.
    Write,
    /// Discard `len` bytes at the offset.
    Discard(u64),
    /// Zero `len` bytes at the offset; `thick` keeps them allocated.
    WriteZeroes {
        /// Bytes to zero.
        len: u64,
        /// Write the zeroes rather than deallocate.
        thick: bool,
    },
    /// Flush every write completed so far.
    Flush,
}

/// One queue's asynchronous I/O on a shared [`Image`]: requests go out with
/// [`AioQueue::submit`]; when [`AioQueue::eventfd`] turns readable, [`AioQueue::reap`] hands
/// back the finished ones. Dropping it waits (boundedly) for requests still in flight.
#[derive(Debug)]
pub struct AioQueue {
    image: Arc<Image>,
    sink: Arc<Sink>,
    in_flight: usize,
}

impl AioQueue {
    /// A queue on `image` with its own eventfd.
    pub fn new(image: &Arc<Image>) -> io::Result<AioQueue> {
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(AioQueue {
            image: Arc::clone(image),
            sink: Arc::new(Sink {
                done: Mutex::new(Vec::new()),
                eventfd: Arc::new(file),
            }),
            in_flight: 0,
        })
    }

    /// The eventfd that turns readable when requests finish.
    pub fn eventfd(&self) -> &Arc<File> {
        &self.sink.eventfd
    }

    /// Requests submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts `op` at `offset` over `buf` (the data of a read or write; empty otherwise).
    /// On failure to start, the buffer comes back with the negative errno.
    pub fn submit(
        &mut self,
        op: AioOp,
        offset: u64,
        buf: Vec<u8>,
        token: u64,
    ) -> Result<(), (i32, Vec<u8>)> {
        let mut pending = Box::new(Pending {
            token,
            buf,
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            comp: std::ptr::null_mut(),
            sink: Arc::clone(&self.sink),
            _image: Arc::clone(&self.image),
        });
        pending.iov = libc::iovec {
            iov_base: pending.buf.as_mut_ptr().cast(),
            iov_len: pending.buf.len(),
        };
        let raw = Box::into_raw(pending);
        let mut comp: CompletionT = std::ptr::null_mut();
        // SAFETY: `raw` stays valid until reclaimed (below on failure, or in `reap` after the
        // callback) and `comp` is a valid out-pointer.
        let r = unsafe { rbd_aio_create_completion(raw.cast(), Some(on_complete), &mut comp) };
        if r < 0 {
            // SAFETY: no completion exists, so nothing else refers to `raw`.
            let pending = unsafe { Box::from_raw(raw) };
            return Err((r, pending.buf));
        }
        let image = self.image.raw;
        // SAFETY: `raw` is live and ours until submission succeeds; the iovec points into
        // its buffer (a Vec whose heap block does not move while the Box lives), and the Box
        // is reclaimed only after librbd completes the request, so the memory outlives the
        // I/O. Lengths fit: a request is at most a few MiB.
        let r = unsafe {
            (*raw).comp = comp;
            let iov: *const libc::iovec = &(*raw).iov;
            match op {
                AioOp::Read => rbd_aio_readv(image, iov, 1, offset, comp),
                AioOp::Write => rbd_aio_writev(image, iov, 1, offset, comp),
                AioOp::Discard(len) => rbd_aio_discard(image, offset, len, comp),
                AioOp::WriteZeroes { len, thick } => rbd_aio_write_zeroes(
                    image,
                    offset,
                    usize::try_from(len).unwrap_or(usize::MAX),
                    comp,
                    if thick { WRITE_ZEROES_THICK } else { 0 },
                    0,
                ),
                AioOp::Flush => rbd_aio_flush(image, comp),
            }
        };
        if r < 0 {
            // SAFETY: librbd refused the request before taking it, so the completion will
            // never fire: release it and take the Box back.
            let pending = unsafe {
                rbd_aio_release(comp);
                Box::from_raw(raw)
            };
            return Err((r, pending.buf));
        }
        self.in_flight += 1;
        Ok(())
    }

    /// Clears the eventfd and returns every request finished since the last call.
    pub fn reap(&mut self) -> Vec<AioDone> {
        let mut count = [0u8; 8];
        // Nonblocking: EAGAIN when nothing is pending is harmless.
        let _ = (&*self.sink.eventfd).read(&mut count);
        let ready = match self.sink.done.lock() {
            Ok(mut done) => std::mem::take(&mut *done),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        };
        ready
            .into_iter()
            .map(|p| {
                // SAFETY: each address is a Box<Pending> leaked in `submit` whose callback has
                // run (it pushed the address), so librbd no longer touches the buffer; it is
                // pushed once and taken once, so it is reclaimed once. Its completion is
                // released once, as librbd requires (releasing after the callback is allowed).
                let pending = unsafe { Box::from_raw(p as *mut Pending) };
                // SAFETY: the completion is live until released right after.
                let result = unsafe {
                    let r = rbd_aio_get_return_value(pending.comp);
                    rbd_aio_release(pending.comp);
                    r
                };
                self.in_flight = self.in_flight.saturating_sub(1);
                let Pending { token, buf, .. } = *pending;
                AioDone {
                    token,
                    result: result as i64,
                    buf,
                }
            })
            .collect()
    }
}

impl Drop for AioQueue {
    fn drop(&mut self) {
        // A request's buffer must outlive it: wait for the ones in flight (librbd completes
        // or fails every request eventually); past the deadline they are leaked, not freed.
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.in_flight > 0 && Instant::now() < deadline {
            drop(self.reap());
            if self.in_flight > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if self.in_flight > 0 {
            tracing::warn!(
                in_flight = self.in_flight,
                "rbd requests still in flight at exit: their buffers are leaked"
            );
        }
    }
}
