//! Our own FUSE session for the block file, on the kernel's ABI (`abi.rs`): mount, INIT once, worker
//! threads on cloned /dev/fuse fds, zero-copy requests and replies, and resuming a live connection
//! from a held fd without INIT.
//!
//! Why not fuser: its `Session` always waits for an INIT, which the kernel sends once per
//! connection, so a new process cannot take over a mounted file; it has no NOTIFY_RESEND; and it
//! lends a WRITE's data only for the call, which forces a copy. A one-file filesystem needs a
//! dozen opcodes, so the session is small enough to own.
//!
//! Resume: a connection lives while any process holds a /dev/fuse fd of it, and requests queue in
//! the kernel meanwhile. A request a worker had read but not answered stays in the processing queue
//! of the fd (the open file) it was read from, as long as that open file lives (a holder keeps a
//! duplicate of it); NOTIFY_RESEND puts such requests back on the pending queue, so a new worker
//! serves them again. Block reads and writes are idempotent, so serving one twice is harmless.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tracing::{debug, warn};

use super::abi::{self, InitOut, Op, Request};

/// A /dev/fuse fd of one connection; replies go to the fd their request was read from.
#[derive(Debug, Clone)]
pub struct Channel {
    fd: Arc<OwnedFd>,
}

impl Channel {
    pub fn new(fd: Arc<OwnedFd>) -> Self {
        Self { fd }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Writes one reply: the out header, then `payload` pieces, in one writev (no copy of them).
    pub fn reply(&self, unique: u64, payload: &[&[u8]]) {
        let len = payload.iter().map(|p| p.len()).sum();
        let header = abi::out_header(unique, 0, len);
        let mut iov = Vec::with_capacity(1 + payload.len());
        iov.push(libc::iovec { iov_base: header.as_ptr() as *mut libc::c_void, iov_len: header.len() });
        for p in payload {
            iov.push(libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() });
        }
        self.write_iov(unique, &iov);
    }

    /// Answers `unique` with `errno` (positive, e.g. libc::EIO).
    pub fn error(&self, unique: u64, errno: i32) {
        let header = abi::out_header(unique, -errno, 0);
        let iov = [libc::iovec { iov_base: header.as_ptr() as *mut libc::c_void, iov_len: header.len() }];
        self.write_iov(unique, &iov);
    }

    /// Asks the kernel to hand us again every request read but not answered on this connection.
    pub fn notify_resend(&self) -> io::Result<()> {
        let n = abi::notify_resend();
        // SAFETY: writes `n.len()` bytes from a live local buffer to an fd we own.
        let rc = unsafe { libc::write(self.raw(), n.as_ptr().cast(), n.len()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn write_iov(&self, unique: u64, iov: &[libc::iovec]) {
        let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: every iovec points into a buffer borrowed for the duration of this call (the
        // header on our stack, the payload slices of the caller); the kernel only reads them.
        let rc = unsafe { libc::writev(self.raw(), iov.as_ptr(), count) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // ENOENT: the request was interrupted or aborted meanwhile; nothing waits for it.
            if e.raw_os_error() != Some(libc::ENOENT) {
                debug!(unique, error = %e, "FUSE reply not delivered");
            }
        }
    }
}

/// What serves the requests: called on the worker threads, it must not block (reply from a task).
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: Request, channel: &Channel);
}

/// Opens /dev/fuse and mounts a FUSE filesystem whose root is the regular file `path` (mounting
/// over a file, as nbdfuse does). Needs root (CAP_SYS_ADMIN).
pub fn mount(path: &Path, fsname: &str, read_only: bool, allow_other: bool) -> io::Result<OwnedFd> {
    use std::ffi::CString;
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    let dev = CString::new("/dev/fuse").map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path; the returned fd is checked before use and then owned.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={raw},rootmode={:o},user_id={uid},group_id={gid},default_permissions",
        meta.mode() & libc::S_IFMT
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    let c = |s: &str| CString::new(s).map_err(io::Error::other);
    let (source, target, fstype, data) = (
        c(fsname)?,
        CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?,
        c("fuse.ferrovol")?,
        c(&data)?,
    );
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if read_only {
        flags |= libc::MS_RDONLY;
    }
    // SAFETY: all four strings are NUL-terminated and live across the call.
    let rc = unsafe {
        libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Unmounts `path` (the workers then see ENODEV and stop).
pub fn unmount(path: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: a NUL-terminated path living across the call.
    if unsafe { libc::umount2(target.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A new /dev/fuse fd attached to the session of `master` (FUSE_DEV_IOC_CLONE): each worker
/// thread reads from its own, so they do not contend for one fd's lock.
pub fn clone_fd(master: &OwnedFd) -> io::Result<OwnedFd> {
    let dev = c"/dev/fuse";
    // SAFETY: a NUL-terminated path; the fd is checked, then owned.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut session: u32 = u32::try_from(master.as_raw_fd()).map_err(io::Error::other)?;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the session's fd) from the pointer we pass.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), abi::FUSE_DEV_IOC_CLONE as _, &mut session as *mut u32) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The read buffer: the largest request (a WRITE of `max_write`, which the kernel raises to at
/// least 4096, plus its 80 bytes of headers, rounded up to a page), and never below the kernel's
/// minimum of 8192.
pub fn buffer_len(max_write: u32) -> usize {
    (max_write.max(4096) as usize + 4096).max(8192)
}

/// Requests up to this size are copied out of the read buffer instead of split off it: a small
/// copy is cheaper than the fresh 1 MiB buffer the next read would need while a small WRITE's
/// data still pins the old one (and it would pin a whole buffer per write in flight). Larger
/// WRITEs are split off, so their data reaches the server without a copy.
const COPY_BELOW: usize = 64 * 1024;

/// Reads one request into `buf` (whose spare capacity is at least `buffer_len`). `Ok(None)`: the
/// filesystem was unmounted (or the connection aborted).
///
/// A fresh buffer is *prefaulted* (a byte written in each page) before the read. The kernel
/// copies a request into the reader's pages after taking it off the queue; for pages not present
/// and writable it takes the slow path of get_user_pages, which fails when a fatal signal is
/// pending, and the kernel then ends the request with EIO. So a worker killed with SIGKILL while
/// one of its threads was waking up could hand one request an EIO instead of leaving it to the
/// resend. Prefaulting narrows that to pages the kernel takes away on its own (NUMA balancing,
/// swap, migration); a splice read would close it (the kernel copies into pipe pages). A process
/// that reads /dev/fuse must never fork: fork write-protects every page for copy-on-write, the
/// buffers of threads already blocked in read() included (the worker starts a holder with
/// posix_spawn, see `supervise::spawn_unforked`).
fn read_request(fd: RawFd, buf: &mut BytesMut, len: usize) -> io::Result<Option<Bytes>> {
    loop {
        let fresh = buf.capacity() - buf.len() < len;
        buf.reserve(len);
        if fresh {
            prefault(buf);
        }
        let spare = buf.spare_capacity_mut();
        // SAFETY: read(2) writes at most `spare.len()` bytes into the spare capacity, which nothing
        // reads before `set_len` marks the bytes written as initialised.
        let n = unsafe { libc::read(fd, spare.as_mut_ptr().cast(), spare.len()) };
        if n >= 0 {
            // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
            unsafe { buf.set_len(buf.len() + n as usize) };
            if buf.len() < COPY_BELOW {
                let frame = Bytes::copy_from_slice(buf);
                buf.clear();
                return Ok(Some(frame));
            }
            return Ok(Some(buf.split().freeze()));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Interrupted, or a request that was interrupted before we read it.
            Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
            // Unmounted, or the connection aborted.
            Some(libc::ENODEV) | Some(libc::ECONNABORTED) => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Writes a byte in each page of `buf`'s spare capacity, so that all of it is present (see
/// [`read_request`]).
fn prefault(buf: &mut BytesMut) {
    let spare = buf.spare_capacity_mut();
    let Some(last) = spare.len().checked_sub(1) else { return };
    // Every page the spare capacity touches: from the start, then each page boundary, then the end
    // (the start need not be page-aligned).
    let skew = (spare.as_ptr() as usize) % 4096;
    let first_boundary = if skew == 0 { 0 } else { 4096 - skew };
    let points =
        std::iter::once(0).chain((first_boundary..spare.len()).step_by(4096)).chain(std::iter::once(last));
    for i in points {
        // SAFETY: `i` is within the spare capacity; a volatile write of an initialised byte to it
        // (the compiler may not drop it: the point is the page fault).
        unsafe { std::ptr::write_volatile(spare[i].as_mut_ptr(), 0) };
    }
}

/// A read buffer of `len` bytes, every page present (see [`read_request`]).
fn read_buffer(len: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(len);
    prefault(&mut buf);
    buf
}

/// Waits for the kernel's INIT on `fd` and answers it: the versions and the flags both sides have.
/// `want` are the flags we ask for. Returns what was agreed (kept to resume later without INIT).
pub fn handshake(fd: &OwnedFd, want: u64, max_write: u32, max_background: u16) -> io::Result<InitOut> {
    let mut buf = read_buffer(buffer_len(max_write));
    let ch = Channel::new(Arc::new(fd.try_clone()?));
    loop {
        let Some(frame) = read_request(fd.as_raw_fd(), &mut buf, buffer_len(max_write))? else {
            return Err(io::Error::other("unmounted before INIT"));
        };
        let req = abi::parse(frame).map_err(io::Error::other)?;
        let Op::Init(init) = req.op else {
            ch.error(req.header.unique, libc::EIO);
            continue;
        };
        if init.major != abi::KERNEL_VERSION || init.minor < abi::KERNEL_MINOR_MIN {
            ch.error(req.header.unique, libc::EPROTO);
            return Err(io::Error::other(format!(
                "the kernel speaks FUSE {}.{}; 7.{}+ is needed",
                init.major,
                init.minor,
                abi::KERNEL_MINOR_MIN
            )));
        }
        let out = InitOut {
            major: abi::KERNEL_VERSION,
            minor: init.minor.min(abi::KERNEL_MINOR_VERSION),
            max_readahead: init.max_readahead.min(max_write),
            flags: init.flags & want,
            max_background,
            congestion_threshold: max_background / 4 * 3,
            max_write,
            max_pages: u16::try_from(max_write / 4096).unwrap_or(u16::MAX),
        };
        let encoded = out.encode();
        ch.reply(req.header.unique, &[&encoded]);
        return Ok(out);
    }
}

/// Serves the connection of `fds` (the first is the one INIT came on, or the held fd of a resume)
/// on one thread per fd until it is unmounted, or until `stop` is set (checked after each request;
/// the fds stay open, so the connection lives on for whoever holds them). With `resend`, asks the
/// kernel first to hand back what a previous worker had taken and not answered.
///
/// Resend only once the previous worker can no longer reach the server: the kernel requeues every
/// request read and not answered on the connection, including ones whose old tasks may still be
/// in flight, and an old WRITE landing after the application overwrote its range would lose data.
/// Idempotence covers a request served twice in order, not out of order.
pub fn run(
    fds: Vec<OwnedFd>,
    negotiated: &InitOut,
    handler: Arc<dyn Handler>,
    resend: bool,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> io::Result<()> {
    let len = buffer_len(negotiated.max_write);
    let channels: Vec<Channel> = fds.into_iter().map(|fd| Channel::new(Arc::new(fd))).collect();
    if resend {
        if negotiated.flags & abi::FUSE_HAS_RESEND == 0 {
            warn!("this kernel cannot resend requests (no FUSE_HAS_RESEND): any a dead worker took are lost");
        } else if let Some(ch) = channels.first() {
            ch.notify_resend()?;
        }
    }
    let mut threads = Vec::with_capacity(channels.len());
    for (i, ch) in channels.into_iter().enumerate() {
        let (handler, stop) = (handler.clone(), stop.clone());
        let t = std::thread::Builder::new().name(format!("ferrovol-fuse-{i}")).spawn(
            move || -> io::Result<()> {
                let mut buf = read_buffer(len);
                let next = |buf: &mut BytesMut| {
                    read_request(ch.raw(), buf, len).inspect_err(|e| {
                        // Said at once: the other workers go on, but this fd is no longer read.
                        warn!(worker = i, error = %e, "FUSE worker stopped: reading /dev/fuse failed")
                    })
                };
                while let Some(frame) = next(&mut buf)? {
                    match abi::parse(frame) {
                        Ok(req) => handler.handle(req, &ch),
                        Err(e) => {
                            warn!(error = %e, "malformed FUSE request");
                            if let Some(unique) = e.unique() {
                                ch.error(unique, libc::EINVAL);
                            }
                        }
                    }
                    if stop.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                }
                Ok(())
            },
        )?;
        threads.push(t);
    }
    let mut result = Ok(());
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(io::Error::other("a FUSE worker thread panicked")),
        }
    }
    result
}
