//! File operations on fs volumes (the FS_* opcodes), against the volume's mounted ext4.
//!
//! - **Nodes** are the filesystem's own file handles (name_to_handle_at), packed in a u64: stable
//!   across server restarts, so the server keeps no inode table and a client's node ids stay valid.
//!   An inode is reached again with open_by_handle_at (as root: it needs CAP_DAC_READ_SEARCH).
//! - **Credentials**: each operation that checks permissions runs with the caller's fsuid, fsgid
//!   and groups, set on the worker thread alone (setfsuid/setfsgid, and the raw setgroups syscall,
//!   which, unlike glibc's wrapper, changes only the calling thread). A non-zero fsuid drops the
//!   thread's filesystem capabilities, so the kernel checks permissions exactly as for the caller.
//!   A WRITE (permission was checked at open) switches only when the file has set-user-ID /
//!   set-group-ID bits, which a write as the caller may drop, or is not the caller's own.
//!   The worker threads have a umask of their own (unshare(CLONE_FS)), 0: the client's umask is
//!   applied to the mode it sends.
//! - **Open files** (`fh`): a table per mount; each entry remembers the client session that opened
//!   it and is closed when that session has had no connection for `LOCK_LEASE` (a reconnect keeps
//!   them, unlinked-but-open files included). A READ/WRITE/FSYNC whose fh is not in the table (the
//!   server restarted) opens the node again with the flags the client
//!   sends along: a server restart is invisible to open files (except files unlinked while open,
//!   which die with the server's fds, as on NFS).
//!
//! The trust boundary is the node: like NFS with AUTH_SYS, the server believes the uid a node's
//! kernel reports for its callers (root included).

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use ferrovol_proto::fs::*;
use ferrovol_proto::{ErrorReply, Opcode};

use crate::store::fsmount::FsMount;

/// Open files one mount keeps for one client session (then EMFILE).
pub const FILES_PER_CONNECTION_MAX: usize = 4096;
/// The share of the server's fd budget for files and locks (see `budget`) one node may hold (a
/// session id is the client's to choose: the node is what bounds a client).
const NODE_SHARE: usize = 4;
/// Worker threads for file operations.
const WORKERS: usize = 16;

// ---------------------------------------------------------------------------------------------------
// The worker pool

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting for a worker. A condvar wakes exactly one idle worker per job (a channel behind a
/// mutex woke the next waiter for the mutex as well: two wakeups per request).
struct Pool {
    jobs: Mutex<std::collections::VecDeque<Job>>,
    ready: std::sync::Condvar,
    workers: std::sync::atomic::AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    static STARTED: std::sync::Once = std::sync::Once::new();
    let pool = POOL.get_or_init(|| Pool {
        jobs: Mutex::default(),
        ready: std::sync::Condvar::new(),
        workers: std::sync::atomic::AtomicUsize::new(0),
    });
    STARTED.call_once(|| {
        for i in 0..WORKERS {
            let spawned = std::thread::Builder::new().name(format!("ferrovol-fs-{i}")).spawn(move || {
                // SAFETY: unshare(CLONE_FS) gives this thread its own umask and cwd; umask(0) then
                // changes only this thread's. Neither touches memory.
                unsafe {
                    if libc::unshare(libc::CLONE_FS) == 0 {
                        libc::umask(0);
                    } else {
                        tracing::error!(
                            "unshare(CLONE_FS) failed: modes of new files get the server's umask too"
                        );
                    }
                }
                loop {
                    let job = {
                        let mut jobs = pool.jobs.lock().unwrap_or_else(|p| p.into_inner());
                        loop {
                            if let Some(job) = jobs.pop_front() {
                                break job;
                            }
                            jobs = pool.ready.wait(jobs).unwrap_or_else(|p| p.into_inner());
                        }
                    };
                    job();
                }
            });
            match spawned {
                Ok(_) => {
                    pool.workers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => tracing::error!(error = %e, "cannot start a file worker thread"),
            }
        }
    });
    pool
}

/// Runs `f` on a file worker thread (it may block: disk I/O, fsync). `false`: no worker could be
/// started, and `f` is dropped.
/// Whether `op` may write to the filesystem (and so block in it while it is frozen): anything but
/// the operations that only read (the mount is `noatime`) and lock (the kernel's, in memory).
pub fn may_change(op: &FsOp) -> bool {
    match op {
        FsOp::Lookup { .. }
        | FsOp::Getattr
        | FsOp::Readdir { .. }
        | FsOp::Read { .. }
        | FsOp::Readlink
        | FsOp::Statfs
        | FsOp::Getlk { .. }
        | FsOp::Setlk { .. }
        | FsOp::Lseek { .. }
        | FsOp::Getxattr { .. }
        | FsOp::Listxattr => false,
        FsOp::Open { flags } => *flags as libc::c_int & libc::O_TRUNC != 0,
        _ => true,
    }
}

pub fn submit(f: impl FnOnce() + Send + 'static) -> bool {
    let pool = pool();
    if pool.workers.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        return false;
    }
    pool.jobs.lock().unwrap_or_else(|p| p.into_inner()).push_back(Box::new(f));
    pool.ready.notify_one();
    true
}

// ---------------------------------------------------------------------------------------------------
// Credentials

/// The caller's credentials on this thread until dropped; then root's again.
struct AsCaller {
    /// The worker's capabilities, to raise again (a caller other than root runs with none).
    caps: Option<[CapData; 2]>,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// _LINUX_CAPABILITY_VERSION_3: two `CapData` (64 capability bits).
const CAP_VERSION_3: u32 = 0x2008_0522;

/// This thread's capabilities (pid 0: the calling thread).
fn caps_get() -> io::Result<[CapData; 2]> {
    let mut h = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut d = [CapData::default(); 2];
    // SAFETY: capget reads the header and fills two CapData, the layout version 3 takes.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(d)
}

/// Sets this thread's capabilities (capabilities are per thread).
fn caps_set(d: &[CapData; 2]) -> io::Result<()> {
    let mut h = CapHeader { version: CAP_VERSION_3, pid: 0 };
    // SAFETY: capset reads the header and two CapData.
    if unsafe { libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

thread_local! {
    /// The worker thread's own capabilities (as root), read once.
    static ROOT_CAPS: std::cell::Cell<Option<[CapData; 2]>> = const { std::cell::Cell::new(None) };
}

fn as_caller(c: &Creds) -> io::Result<AsCaller> {
    // The worker's own capabilities, read as root (once per thread).
    let root = match (c.uid, ROOT_CAPS.get()) {
        (0, _) => None,
        (_, Some(caps)) => Some(caps),
        (_, None) => {
            let caps = caps_get()?;
            ROOT_CAPS.set(Some(caps));
            Some(caps)
        }
    };
    let groups = &c.groups[..c.groups.len().min(FS_GROUPS_MAX)];
    // SAFETY: setgroups reads `groups.len()` gid_t values from the pointer, which points at that
    // many u32s (gid_t is u32 on Linux). The raw syscall changes this thread's groups only.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut guard = AsCaller { caps: None };
    // setfsuid/setfsgid report nothing: ask again (-1 changes nothing and returns the current
    // value), so an id that did not take (no CAP_SETUID) fails the operation instead of running
    // it as root. The guard restores root on the way out either way.
    // SAFETY: plain syscalls on this thread's credentials.
    let ok = unsafe {
        libc::setfsgid(c.gid);
        libc::setfsuid(c.uid);
        libc::setfsgid(u32::MAX) as u32 == c.gid && libc::setfsuid(u32::MAX) as u32 == c.uid
    };
    if !ok {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    // Last: changing the ids above needs CAP_SETUID / CAP_SETGID.
    if let Some(root) = root {
        // A caller other than root has no capabilities at all. A non-zero fsuid drops only the
        // filesystem ones; CAP_SYS_ADMIN would still read and write trusted.* xattrs, and
        // CAP_SETFCAP set file capabilities (security.capability) that another node would
        // honour when it runs the file.
        let mut none = root;
        for d in &mut none {
            d.effective = 0;
        }
        guard.caps = Some(root);
        caps_set(&none)?;
    }
    Ok(guard)
}

impl Drop for AsCaller {
    fn drop(&mut self) {
        if let Some(caps) = &self.caps {
            if let Err(e) = caps_set(caps) {
                // The thread would go on without its capabilities: every later operation would
                // fail (EPERM), never run with more rights than it should.
                tracing::error!(error = %e, "cannot raise a file worker's capabilities again");
            }
        }
        // SAFETY: as in `as_caller`; an empty group list.
        unsafe {
            libc::setfsuid(0);
            libc::setfsgid(0);
            libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<u32>());
        }
    }
}

/// Whether a write to `fd` by `uid` must run as the caller: the file has set-user-ID or
/// set-group-ID (a write by someone without CAP_FSETID drops them; since Linux 6.2 set-group-ID
/// without group execute too, unless the writer is in the group), or is not the caller's own
/// (so that a chmod u+s by its owner cannot be overtaken by another user's write checked before
/// it). File capabilities need no check: the kernel drops them on any write, root's too. True
/// when in doubt.
fn write_needs_caller(fd: RawFd, uid: u32) -> bool {
    fstat(fd).map_or(true, |st| {
        st.st_mode & libc::S_IFMT != libc::S_IFREG
            || st.st_mode & (libc::S_ISUID | libc::S_ISGID) != 0
            || st.st_uid != uid
    })
}

// ---------------------------------------------------------------------------------------------------
// Handles and nodes

/// `struct file_handle` with room for an 8-byte handle (ext4's FILEID_INO32_GEN).
#[repr(C)]
struct Handle {
    bytes: u32,
    kind: i32,
    data: [u8; 8],
}

/// FILEID_INO32_GEN: a 32-bit inode number and a 32-bit generation.
const FILEID_INO32_GEN: i32 = 1;

/// A kernel value in a u32 field (all of these fit in practice; a larger one saturates).
fn sat<T: TryInto<u32>>(v: T) -> u32 {
    v.try_into().unwrap_or(u32::MAX)
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The packed file handle of `name` in `dirfd` (or of `dirfd` itself with AT_EMPTY_PATH).
pub fn handle_of(dirfd: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<u64> {
    let mut h = Handle { bytes: 8, kind: 0, data: [0; 8] };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `h` is a file_handle with `bytes` = 8 bytes of room after its header; the kernel
    // writes at most that (else EOVERFLOW). `name` is NUL-terminated.
    check(unsafe {
        libc::name_to_handle_at(dirfd, name.as_ptr(), (&raw mut h).cast(), &mut mount_id, flags)
    })?;
    if h.kind != FILEID_INO32_GEN || h.bytes != 8 {
        return Err(io::Error::other(format!(
            "file handle type {} of {} bytes: not an ext4 inode handle",
            h.kind, h.bytes
        )));
    }
    Ok(u64::from_le_bytes(h.data))
}

fn fd_of(r: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: a new fd from a successful call, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(check(r)?) })
}

fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    // SAFETY: `struct stat` is plain data; all zeros is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `struct stat` into `st`.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st)
}

/// The attributes of `fd`, inode `node`.
fn attr_of(fd: RawFd, node: u64) -> io::Result<Attr> {
    let st = fstat(fd)?;
    Ok(Attr {
        node,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: (st.st_atime, sat(st.st_atime_nsec)),
        mtime: (st.st_mtime, sat(st.st_mtime_nsec)),
        ctime: (st.st_ctime, sat(st.st_ctime_nsec)),
        mode: st.st_mode,
        nlink: sat(st.st_nlink),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: sat(st.st_rdev),
        blksize: sat(st.st_blksize),
    })
}

fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

fn xattr_cname(n: &Bytes) -> CString {
    // The codec refused names with a NUL.
    CString::new(n.to_vec()).unwrap_or_default()
}

/// A getxattr/listxattr result of at most `FS_XATTR_SIZE_MAX` bytes: `call` fills the buffer it
/// is given and returns the length (or -1).
fn xattr_read(call: impl Fn(&mut [u8]) -> libc::ssize_t) -> io::Result<FsReply> {
    let mut buf = vec![0u8; FS_XATTR_SIZE_MAX];
    let n = call(&mut buf);
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(usize::try_from(n).unwrap_or(0));
    Ok(FsReply::Data(Bytes::from(buf)))
}

fn cname(n: &FsName) -> CString {
    // FsName holds no NUL.
    CString::new(n.as_bytes()).unwrap_or_default()
}

impl FsMount {
    fn node_of_handle(&self, h: u64) -> u64 {
        if h == self.root_handle {
            NODE_ROOT
        } else {
            h
        }
    }

    /// Opens `node` with `flags` (O_PATH for a reference) as root.
    fn open_node(&self, node: u64, flags: libc::c_int) -> io::Result<OwnedFd> {
        let data = if node == NODE_ROOT { self.root_handle } else { node };
        let mut h = Handle { bytes: 8, kind: FILEID_INO32_GEN, data: data.to_le_bytes() };
        // SAFETY: `h` is a valid file_handle of 8 bytes; the root fd is open.
        fd_of(unsafe {
            libc::open_by_handle_at(self.root.as_raw_fd(), (&raw mut h).cast(), flags | libc::O_CLOEXEC)
        })
    }

    fn path_of(&self, node: u64) -> io::Result<OwnedFd> {
        self.open_node(node, libc::O_PATH)
    }

    /// The attributes of the inode `fd` refers to.
    fn attr(&self, fd: RawFd) -> io::Result<Attr> {
        let node = self.node_of_handle(handle_of(fd, c"", libc::AT_EMPTY_PATH)?);
        attr_of(fd, node)
    }

    /// The entry `name` in `dir` (no symlink followed).
    fn entry(&self, dir: RawFd, name: &CStr) -> io::Result<Attr> {
        // SAFETY: `name` is NUL-terminated; openat returns a new fd or -1.
        let fd = fd_of(unsafe {
            libc::openat(dir, name.as_ptr(), libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        })?;
        self.attr(fd.as_raw_fd())
    }
}

// ---------------------------------------------------------------------------------------------------
// The fd budget

/// The fds that open files and locks of every mount may hold together: what RLIMIT_NOFILE leaves
/// after connections and volumes (`raise_fd_limit` lifts the soft limit first).
fn budget() -> usize {
    static BUDGET: OnceLock<usize> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let soft = usize::try_from(nofile().0).unwrap_or(usize::MAX);
        // Connections (1024 at most), volumes and the process's own: keep 4096, or half of a
        // small limit.
        soft.saturating_sub(4096).max(soft / 2).max(64)
    })
}

fn nofile() -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills a valid struct rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return (1024, 1024);
    }
    (r.rlim_cur, r.rlim_max)
}

/// Lifts the soft RLIMIT_NOFILE to the hard one (open files of fs volumes hold an fd each). Returns
/// the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let (soft, hard) = nofile();
    if soft < hard {
        let r = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: setrlimit reads a valid struct rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } == 0 {
            return hard;
        }
    }
    soft
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    per_node: HashMap<Arc<str>, usize>,
}

fn held() -> &'static Mutex<Held> {
    static HELD: OnceLock<Mutex<Held>> = OnceLock::new();
    HELD.get_or_init(Mutex::default)
}

/// An fd that an open file or a lock holds, counted against the server's budget and its node's
/// share of it until dropped.
#[derive(Debug)]
pub struct HeldFd {
    fd: OwnedFd,
    node: Arc<str>,
}

impl HeldFd {
    /// Counts `fd` for `node`, or refuses: EMFILE past the node's share, ENFILE past the budget.
    fn new(fd: OwnedFd, node: &Arc<str>) -> io::Result<Self> {
        Self::within(fd, node, budget())
    }

    fn within(fd: OwnedFd, node: &Arc<str>, budget: usize) -> io::Result<Self> {
        let mut h = held().lock().unwrap_or_else(|p| p.into_inner());
        if h.total >= budget {
            // Rate-limited: a client hitting the budget in a loop must not flood the log.
            crate::listener::refusal(|| {
                tracing::warn!(budget, "fs volumes hold as many fds as the server may: ENFILE")
            });
            return Err(io::Error::from_raw_os_error(libc::ENFILE));
        }
        let n = h.per_node.get(node).copied().unwrap_or(0);
        if n >= (budget / NODE_SHARE).max(1) {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        h.total += 1;
        h.per_node.insert(node.clone(), n + 1);
        Ok(Self { fd, node: node.clone() })
    }
}

impl Drop for HeldFd {
    fn drop(&mut self) {
        let mut h = held().lock().unwrap_or_else(|p| p.into_inner());
        h.total = h.total.saturating_sub(1);
        if let Some(n) = h.per_node.get_mut(&self.node) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                h.per_node.remove(&self.node);
            }
        }
    }
}

impl AsRawFd for HeldFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

// ---------------------------------------------------------------------------------------------------
// Open files

#[derive(Debug)]
struct OpenFile {
    fd: Arc<HeldFd>,
    conn: u64,
}

/// The open files of one mount.
#[derive(Debug, Default)]
pub struct Files {
    map: Mutex<HashMap<u64, OpenFile>>,
    per_conn: Mutex<HashMap<u64, usize>>,
}

/// fh numbers: unique within a server's life, and (a random start) unlikely to be reused by the
/// next one, so a client's fh from before a restart is either found or reopened, never confused.
fn next_fh() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| AtomicU64::new((u64::from(rand::random::<u32>()) << 32) | 1))
        .fetch_add(1, Ordering::Relaxed)
}

impl Files {
    fn insert(&self, fh: u64, fd: OwnedFd, cx: &Context) -> io::Result<Arc<HeldFd>> {
        let conn = cx.session;
        let fd = HeldFd::new(fd, &cx.node)?;
        {
            let mut counts = self.per_conn.lock().unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(conn).or_default();
            if *n >= FILES_PER_CONNECTION_MAX {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            *n += 1;
        }
        let fd = Arc::new(fd);
        let old =
            self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, OpenFile { fd: fd.clone(), conn });
        if let Some(old) = old {
            self.uncount(old.conn);
        }
        Ok(fd)
    }

    fn uncount(&self, conn: u64) {
        let mut counts = self.per_conn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&conn) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&conn);
            }
        }
    }

    fn get(&self, fh: u64) -> Option<Arc<HeldFd>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&fh).map(|f| f.fd.clone())
    }

    fn remove(&self, fh: u64) {
        let old = self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh);
        if let Some(old) = old {
            self.uncount(old.conn);
        }
    }

    /// Closes what client session `conn` opened (it is gone).
    pub fn close_session(&self, conn: u64) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, f| f.conn != conn);
        self.per_conn.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn);
    }

    /// Closes every file (the mount goes).
    pub fn clear(&self) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.per_conn.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The open flags a reopen keeps (access mode and write semantics).
fn reopen_flags(flags: u32) -> libc::c_int {
    (flags as libc::c_int)
        & (libc::O_ACCMODE | libc::O_APPEND | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME)
}

/// The client's open flags the server honours: access mode and write semantics, O_TRUNC and (for
/// CREATE) O_EXCL. Never O_NOFOLLOW, O_DIRECTORY, O_PATH or O_TMPFILE (which would change what is
/// opened), nor O_DIRECT (the server's buffers are not aligned; its loop device is direct
/// already), nor O_NONBLOCK / O_NOCTTY / O_ASYNC.
fn open_flags(flags: u32) -> libc::c_int {
    reopen_flags(flags) | ((flags as libc::c_int) & (libc::O_TRUNC | libc::O_EXCL)) | libc::O_CLOEXEC
}

/// The file type bits of the inode `fd` refers to.
fn type_of(fd: RawFd) -> io::Result<u32> {
    Ok(fstat(fd)?.st_mode & libc::S_IFMT)
}

/// Refuses anything but a regular file: the server opens no devices (the mount is nodev too),
/// FIFOs (an open would block a worker) or sockets for a client.
fn regular(fd: RawFd) -> io::Result<()> {
    match type_of(fd)? {
        libc::S_IFREG => Ok(()),
        libc::S_IFDIR => Err(io::Error::from_raw_os_error(libc::EISDIR)),
        // What a client kernel opens locally: the server never does.
        _ => Err(io::Error::from_raw_os_error(libc::ENXIO)),
    }
}

fn is_write(flags: u32) -> bool {
    let acc = (flags as libc::c_int) & libc::O_ACCMODE;
    acc == libc::O_WRONLY || acc == libc::O_RDWR || (flags as libc::c_int) & libc::O_TRUNC != 0
}

// ---------------------------------------------------------------------------------------------------
// The operations

/// Who asks, and through what.
#[derive(Debug, Clone)]
pub struct Context {
    /// The fs volume is open read-only on this connection.
    pub read_only: bool,
    /// The client session (HELLO `session`): its locks outlive one connection (see `Locks`).
    pub session: u64,
    /// The node the connection proved to be ("" for an admin's): its share of the fd budget.
    pub node: Arc<str>,
    /// What the connection caches, for FS_NOTIFY (a client that takes notices).
    pub watcher: Option<Arc<crate::notify::Watcher>>,
    /// The client agreed to FEATURE_FS_OPEN_INLINE.
    pub inline: bool,
}

fn errno_reply(op: Opcode, e: io::Error) -> ErrorReply {
    let errno = e.raw_os_error().unwrap_or(libc::EIO);
    ErrorReply::errno(errno as u32, format!("{op}: {e}"))
}

fn mutates(op: &FsOp) -> bool {
    match op {
        FsOp::Lookup { .. }
        | FsOp::Getattr
        | FsOp::Readdir { .. }
        | FsOp::Read { .. }
        | FsOp::Release { .. }
        | FsOp::Fsync { .. }
        | FsOp::Readlink
        | FsOp::Statfs
        | FsOp::Getlk { .. }
        | FsOp::Setlk { .. }
        | FsOp::Flush { .. }
        | FsOp::Lseek { .. }
        | FsOp::Getxattr { .. }
        | FsOp::Listxattr => false,
        FsOp::Open { flags } => is_write(*flags),
        _ => true,
    }
}

/// Runs one file operation (on a file worker thread: it blocks).
pub fn execute(m: &FsMount, cx: &Context, node: u64, creds: &Creds, op: FsOp) -> Result<FsReply, ErrorReply> {
    let opcode = op.opcode();
    if cx.read_only && mutates(&op) {
        return Err(errno_reply(opcode, io::Error::from_raw_os_error(libc::EROFS)));
    }
    let mut notices = notices_of(m, node, &op);
    // Watched before the operation reads anything: a change by another client in between is then
    // heard of. (A node first met in the reply can still miss a change made while this call
    // ran; the attribute lifetime bounds that.)
    if let Some(w) = &cx.watcher {
        w.saw(std::iter::once(node).chain(other_nodes(&op)));
    }
    let truncating_create =
        matches!(&op, FsOp::Create { flags, .. } if *flags as libc::c_int & libc::O_TRUNC != 0);
    let reply = execute_inner(m, cx, node, creds, op).map_err(|e| errno_reply(opcode, e))?;
    if let Some(w) = &cx.watcher {
        w.saw(nodes_in(&reply));
    }
    if let (true, FsReply::Created { attr, .. }) = (truncating_create, &reply) {
        // An existing file the caller's kernel thought absent, truncated: its data changed.
        if !m.watchers.is_empty() {
            notices.push(Notice::Inode { node: attr.node, offset: 0, len: 0 });
        }
    }
    m.watchers.publish(cx.session, &notices);
    Ok(reply)
}

/// What other clients must drop from their caches once `op` on `node` has succeeded.
fn notices_of(m: &FsMount, node: u64, op: &FsOp) -> Vec<Notice> {
    let attrs = |node| Notice::Inode { node, offset: -1, len: 0 };
    let entry = |parent, name: &FsName| Notice::Entry { parent, name: name.clone() };
    let off = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let len = |v: u64| i64::try_from(v).unwrap_or(0);
    if m.watchers.is_empty() {
        return Vec::new();
    }
    match op {
        FsOp::Setattr(sa) if sa.valid & SETATTR_SIZE != 0 => {
            vec![Notice::Inode { node, offset: off(sa.size.min(i64::MAX as u64)), len: 0 }]
        }
        FsOp::Setattr(_) => vec![attrs(node)],
        FsOp::Mkdir { name, .. }
        | FsOp::Mknod { name, .. }
        | FsOp::Create { name, .. }
        | FsOp::Symlink { name, .. } => vec![entry(node, name), attrs(node)],
        FsOp::Open { flags } if *flags as libc::c_int & libc::O_TRUNC != 0 => {
            vec![Notice::Inode { node, offset: 0, len: 0 }]
        }
        FsOp::Write { offset, data, .. } => {
            vec![Notice::Inode { node, offset: off(*offset), len: len(data.len() as u64) }]
        }
        FsOp::Fallocate { offset, len: l, .. } => {
            vec![Notice::Inode { node, offset: off(*offset), len: len(*l) }]
        }
        FsOp::CopyRange { out_node, out_offset, len: l, .. } => {
            vec![Notice::Inode { node: *out_node, offset: off(*out_offset), len: len(*l) }]
        }
        FsOp::Unlink { name } | FsOp::Rmdir { name } => {
            // Which inode goes, found before it goes. DELETE (the other kernels drop the inode
            // too) only for its last name: a file with other links lives on under them.
            let dir = m.path_of(node);
            let n = cname(name);
            let child = dir.as_ref().ok().and_then(|d| {
                let links = stat_at(d.as_raw_fd(), &n).ok()?;
                let child = handle_of(d.as_raw_fd(), &n, 0).ok()?;
                Some((child, links))
            });
            match child {
                Some((child, (mode, nlink))) if mode & libc::S_IFMT == libc::S_IFDIR || nlink <= 1 => {
                    vec![
                        Notice::Delete { parent: node, child, name: name.clone() },
                        attrs(node),
                        attrs(child),
                    ]
                }
                Some((child, _)) => vec![entry(node, name), attrs(node), attrs(child)],
                None => vec![entry(node, name), attrs(node)],
            }
        }
        FsOp::Rename { name, new_parent, new_name, .. } => {
            let mut v = vec![entry(node, name), entry(*new_parent, new_name), attrs(node)];
            if *new_parent != node {
                v.push(attrs(*new_parent));
            }
            v
        }
        FsOp::Link { new_parent, new_name } => {
            vec![entry(*new_parent, new_name), attrs(*new_parent), attrs(node)]
        }
        FsOp::Setxattr { .. } | FsOp::Removexattr { .. } => vec![attrs(node)],
        _ => Vec::new(),
    }
}

/// The type bits and link count of `name` in `dirfd` (not following a symlink).
fn stat_at(dirfd: RawFd, name: &CStr) -> io::Result<(u32, u64)> {
    // SAFETY: a zeroed struct stat is valid (all integers).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated; fstatat fills `st`.
    check(unsafe { libc::fstatat(dirfd, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok((st.st_mode, st.st_nlink))
}

/// Nodes a request names besides its own.
fn other_nodes(op: &FsOp) -> Option<u64> {
    match op {
        FsOp::Rename { new_parent, .. } | FsOp::Link { new_parent, .. } => Some(*new_parent),
        FsOp::CopyRange { out_node, .. } => Some(*out_node),
        _ => None,
    }
}

/// Nodes a reply hands the client (its kernel may cache them).
fn nodes_in(reply: &FsReply) -> Vec<u64> {
    match reply {
        FsReply::Entry(a) | FsReply::Created { attr: a, .. } => vec![a.node],
        FsReply::Dir { entries, .. } => entries.iter().map(|e| e.attr.node).collect(),
        _ => Vec::new(),
    }
}

fn open_file(m: &FsMount, cx: &Context, node: u64, fh: u64, flags: u32) -> io::Result<Arc<HeldFd>> {
    if let Some(fd) = m.files.get(fh) {
        return Ok(fd);
    }
    // Not ours (a restart, or another connection's that went away): open it again, if it is a
    // regular file (a node is only a handle: check before opening anything for real).
    regular(m.path_of(node)?.as_raw_fd())?;
    let fd = m.open_node(node, reopen_flags(flags))?;
    m.files.insert(fh, fd, cx)
}

/// A file offset from the wire: beyond i64 it is EINVAL, as for the syscalls.
fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn pread_bytes(fd: RawFd, offset: u64, len: u32) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len as usize);
    while buf.len() < len as usize {
        let at = offset + buf.len() as u64;
        let want = len as usize - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..want];
        // SAFETY: pread writes at most `spare.len()` bytes into the spare capacity, which nothing
        // reads before `set_len` marks the written bytes initialised.
        let n = unsafe { libc::pread(fd, spare.as_mut_ptr().cast(), spare.len(), at as libc::off_t) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        // SAFETY: the kernel initialised `n` more bytes.
        unsafe { buf.set_len(buf.len() + n as usize) };
    }
    Ok(buf.freeze())
}

/// What a read-only open (`asked`: the client's flags; O_DIRECT bypasses the client's cache, so
/// none) of a small file returns with it: the whole file, if it still has the size `attr` says.
/// Empty otherwise, and on a read error (a concurrent truncate or extend, EIO): the client then
/// reads as usual, and the open does not fail for it.
fn inline_data(fd: RawFd, asked: libc::c_int, attr: &Attr) -> Bytes {
    let size = u32::try_from(attr.size).unwrap_or(u32::MAX);
    let small = size != 0 && size <= FS_OPEN_INLINE_MAX;
    if !small || asked & libc::O_ACCMODE != libc::O_RDONLY || asked & libc::O_DIRECT != 0 {
        return Bytes::new();
    }
    pread_bytes(fd, 0, size).ok().filter(|d| d.len() as u64 == attr.size).unwrap_or_default()
}

fn execute_inner(m: &FsMount, cx: &Context, node: u64, creds: &Creds, op: FsOp) -> io::Result<FsReply> {
    Ok(match op {
        FsOp::Lookup { name } => {
            let dir = m.path_of(node)?;
            let _c = as_caller(creds)?;
            FsReply::Entry(m.entry(dir.as_raw_fd(), &cname(&name))?)
        }
        FsOp::Getattr => {
            let fd = m.path_of(node)?;
            FsReply::Attr(m.attr(fd.as_raw_fd())?)
        }
        FsOp::Setattr(s) => {
            let fd = m.path_of(node)?;
            let path = proc_path(fd.as_raw_fd());
            let kind = type_of(fd.as_raw_fd())?;
            // Through /proc a symlink's mode or size would be its target's: refused, as lchmod is.
            if kind == libc::S_IFLNK && s.valid & (SETATTR_MODE | SETATTR_SIZE) != 0 {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            if kind != libc::S_IFREG && s.valid & SETATTR_SIZE != 0 {
                let e = if kind == libc::S_IFDIR { libc::EISDIR } else { libc::EINVAL };
                return Err(io::Error::from_raw_os_error(e));
            }
            let c = as_caller(creds)?;
            if s.valid & SETATTR_SIZE != 0 {
                let open = if s.fh != 0 { m.files.get(s.fh) } else { None };
                match open {
                    // SAFETY: ftruncate on an open fd.
                    Some(f) => check(unsafe { libc::ftruncate(f.as_raw_fd(), s.size as libc::off_t) })?,
                    // SAFETY: `path` is NUL-terminated.
                    None => check(unsafe { libc::truncate(path.as_ptr(), s.size as libc::off_t) })?,
                };
            }
            if s.valid & (SETATTR_UID | SETATTR_GID) != 0 {
                let uid = if s.valid & SETATTR_UID != 0 { s.uid } else { u32::MAX };
                let gid = if s.valid & SETATTR_GID != 0 { s.gid } else { u32::MAX };
                // SAFETY: fchownat on an open fd with an empty path.
                check(unsafe {
                    libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH)
                })?;
            }
            if s.valid & SETATTR_MODE != 0 {
                // SAFETY: `path` is NUL-terminated.
                check(unsafe { libc::chmod(path.as_ptr(), s.mode & 0o7777) })?;
            }
            if s.valid & (SETATTR_ATIME | SETATTR_MTIME) != 0 {
                let t = |set: u32, now: u32, (sec, nsec): (i64, u32)| {
                    if s.valid & set == 0 {
                        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }
                    } else if s.valid & now != 0 {
                        libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW }
                    } else {
                        libc::timespec { tv_sec: sec, tv_nsec: i64::from(nsec) }
                    }
                };
                let times = [
                    t(SETATTR_ATIME, SETATTR_ATIME_NOW, s.atime),
                    t(SETATTR_MTIME, SETATTR_MTIME_NOW, s.mtime),
                ];
                // On the inode itself (a symlink's own times too), not through /proc.
                // SAFETY: an open fd, an empty path; `times` holds two timespecs.
                check(unsafe {
                    libc::utimensat(fd.as_raw_fd(), c"".as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH)
                })?;
            }
            drop(c);
            FsReply::Attr(m.attr(fd.as_raw_fd())?)
        }
        FsOp::Readdir { cookie, max_entries } => readdir(m, node, creds, cookie, max_entries)?,
        FsOp::Mkdir { name, mode, umask } => {
            let dir = m.path_of(node)?;
            let n = cname(&name);
            let _c = as_caller(creds)?;
            // SAFETY: `n` is NUL-terminated.
            check(unsafe { libc::mkdirat(dir.as_raw_fd(), n.as_ptr(), mode & !umask & 0o7777) })?;
            FsReply::Entry(m.entry(dir.as_raw_fd(), &n)?)
        }
        FsOp::Mknod { name, mode, umask, rdev } => {
            let dir = m.path_of(node)?;
            let n = cname(&name);
            let _c = as_caller(creds)?;
            let mode = (mode & libc::S_IFMT) | (mode & !umask & 0o7777);
            // SAFETY: `n` is NUL-terminated.
            check(unsafe { libc::mknodat(dir.as_raw_fd(), n.as_ptr(), mode, libc::dev_t::from(rdev)) })?;
            FsReply::Entry(m.entry(dir.as_raw_fd(), &n)?)
        }
        FsOp::Create { name, flags, mode, umask } => {
            let dir = m.path_of(node)?;
            let n = cname(&name);
            let c = as_caller(creds)?;
            // Never through a symlink (it could point anywhere on the server), and never blocking
            // on a FIFO someone made under that name meanwhile.
            let flags = open_flags(flags) | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_NONBLOCK;
            // SAFETY: `n` is NUL-terminated.
            let fd =
                fd_of(unsafe { libc::openat(dir.as_raw_fd(), n.as_ptr(), flags, mode & !umask & 0o7777) })?;
            drop(c);
            if regular(fd.as_raw_fd()).is_err() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            let attr = m.attr(fd.as_raw_fd())?;
            let fh = next_fh();
            m.files.insert(fh, fd, cx)?;
            FsReply::Created { attr, fh }
        }
        FsOp::Open { flags } => {
            let fd = m.path_of(node)?;
            regular(fd.as_raw_fd())?;
            let path = proc_path(fd.as_raw_fd());
            let asked = flags as libc::c_int;
            let c = as_caller(creds)?;
            // SAFETY: `path` is NUL-terminated.
            let file = fd_of(unsafe { libc::open(path.as_ptr(), open_flags(flags) & !libc::O_EXCL) })?;
            drop(c);
            // After an O_TRUNC too: the size the opener will see.
            let attr = attr_of(file.as_raw_fd(), node)?;
            let data = if cx.inline { inline_data(file.as_raw_fd(), asked, &attr) } else { Bytes::new() };
            let fh = next_fh();
            m.files.insert(fh, file, cx)?;
            FsReply::Opened { attr, fh, data }
        }
        FsOp::Read { fh, flags, offset, len } => {
            let fd = open_file(m, cx, node, fh, flags)?;
            FsReply::Data(pread_bytes(fd.as_raw_fd(), offset, len)?)
        }
        FsOp::Write { fh, flags, offset, data } => {
            let fd = open_file(m, cx, node, fh, flags)?;
            // The caller's rights were checked when the file was opened; what a write still does
            // as the caller is drop set-user-ID / set-group-ID bits (the kernel keeps them for a
            // writer with CAP_FSETID, as root is). Where the caller owns the file and it has
            // none, a write as root is the same write, without switching credentials twice (ten
            // syscalls, each a new `struct cred`). The volume reserves no blocks for root
            // (`fsmount::mkfs`) and has no quotas, so root's writes have no more room than the
            // caller's (with quotas, CAP_SYS_RESOURCE would pass a hard limit: check then).
            let _c = if creds.uid != 0 && write_needs_caller(fd.as_raw_fd(), creds.uid) {
                Some(as_caller(creds)?)
            } else {
                None
            };
            let mut done = 0usize;
            while done < data.len() {
                let rest = &data[done..];
                // SAFETY: pwrite reads `rest.len()` bytes from `rest`.
                let n = unsafe {
                    libc::pwrite(
                        fd.as_raw_fd(),
                        rest.as_ptr().cast(),
                        rest.len(),
                        (offset + done as u64) as libc::off_t,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    if done > 0 {
                        break;
                    }
                    return Err(e);
                }
                if n == 0 {
                    break;
                }
                done += n as usize;
            }
            FsReply::Written(u32::try_from(done).unwrap_or(u32::MAX))
        }
        FsOp::Release { fh } => {
            m.files.remove(fh);
            FsReply::Done
        }
        FsOp::Fsync { fh, flags: _, datasync } => {
            // fh 0: the inode itself (a directory's fsync); an fh the server does not know is
            // synced through a short-lived fd (fsync needs no write access), not kept.
            let held = m.files.get(fh).filter(|_| fh != 0);
            let short;
            let fd: &dyn AsRawFd = match &held {
                Some(fd) => fd.as_ref(),
                None => {
                    short = m.open_node(node, libc::O_RDONLY | libc::O_NONBLOCK)?;
                    &short
                }
            };
            if type_of(fd.as_raw_fd())? != libc::S_IFDIR {
                regular(fd.as_raw_fd())?;
            }
            // SAFETY: fsync/fdatasync on an open fd.
            check(unsafe {
                if datasync {
                    libc::fdatasync(fd.as_raw_fd())
                } else {
                    libc::fsync(fd.as_raw_fd())
                }
            })?;
            FsReply::Done
        }
        FsOp::Unlink { name } => {
            let dir = m.path_of(node)?;
            let _c = as_caller(creds)?;
            // SAFETY: the name is NUL-terminated.
            check(unsafe { libc::unlinkat(dir.as_raw_fd(), cname(&name).as_ptr(), 0) })?;
            FsReply::Done
        }
        FsOp::Rmdir { name } => {
            let dir = m.path_of(node)?;
            let _c = as_caller(creds)?;
            // SAFETY: the name is NUL-terminated.
            check(unsafe { libc::unlinkat(dir.as_raw_fd(), cname(&name).as_ptr(), libc::AT_REMOVEDIR) })?;
            FsReply::Done
        }
        FsOp::Rename { name, new_parent, new_name, flags } => {
            let dir = m.path_of(node)?;
            let new_dir = if new_parent == node { None } else { Some(m.path_of(new_parent)?) };
            let new_fd = new_dir.as_ref().map_or(dir.as_raw_fd(), |d| d.as_raw_fd());
            let _c = as_caller(creds)?;
            // SAFETY: both names are NUL-terminated; the fds are open.
            check(unsafe {
                libc::renameat2(
                    dir.as_raw_fd(),
                    cname(&name).as_ptr(),
                    new_fd,
                    cname(&new_name).as_ptr(),
                    flags,
                )
            })?;
            FsReply::Done
        }
        FsOp::Link { new_parent, new_name } => {
            let fd = m.path_of(node)?;
            let dir = m.path_of(new_parent)?;
            let n = cname(&new_name);
            let _c = as_caller(creds)?;
            // Through /proc (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH, which the caller's
            // fsuid drops).
            // SAFETY: both paths are NUL-terminated.
            check(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc_path(fd.as_raw_fd()).as_ptr(),
                    dir.as_raw_fd(),
                    n.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })?;
            FsReply::Entry(m.entry(dir.as_raw_fd(), &n)?)
        }
        FsOp::Symlink { name, target } => {
            let dir = m.path_of(node)?;
            let n = cname(&name);
            let t = CString::new(target.to_vec()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            let _c = as_caller(creds)?;
            // SAFETY: both strings are NUL-terminated.
            check(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) })?;
            FsReply::Entry(m.entry(dir.as_raw_fd(), &n)?)
        }
        FsOp::Readlink => {
            let fd = m.path_of(node)?;
            let mut buf = vec![0u8; FS_SYMLINK_LEN_MAX + 1];
            // SAFETY: readlinkat writes at most `buf.len()` bytes into `buf`.
            let n =
                unsafe { libc::readlinkat(fd.as_raw_fd(), c"".as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            buf.truncate(n as usize);
            FsReply::Data(Bytes::from(buf))
        }
        // Extended attributes: through /proc/self/fd of the node's O_PATH fd, which reaches the
        // inode itself (a symlink's own attributes, never its target's), as the caller (the
        // kernel checks user.* against the file's mode, trusted.* needs root).
        FsOp::Getxattr { name } => {
            // Held until the call is done: the path names this fd.
            let fd = m.path_of(node)?;
            let path = proc_path(fd.as_raw_fd());
            let name = xattr_cname(&name);
            let _c = as_caller(creds)?;
            xattr_read(|buf| {
                // SAFETY: both strings are NUL-terminated; getxattr writes at most `buf.len()` bytes.
                unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
            })?
        }
        FsOp::Listxattr => {
            // Held until the call is done: the path names this fd.
            let fd = m.path_of(node)?;
            let path = proc_path(fd.as_raw_fd());
            let _c = as_caller(creds)?;
            xattr_read(|buf| {
                // SAFETY: `path` is NUL-terminated; listxattr writes at most `buf.len()` bytes.
                unsafe { libc::listxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
            })?
        }
        FsOp::Setxattr { name, value, flags } => {
            // Held until the call is done: the path names this fd.
            let fd = m.path_of(node)?;
            let path = proc_path(fd.as_raw_fd());
            let name = xattr_cname(&name);
            let flags = flags as libc::c_int & (libc::XATTR_CREATE | libc::XATTR_REPLACE);
            let _c = as_caller(creds)?;
            // SAFETY: both strings are NUL-terminated; setxattr reads `value.len()` bytes of it.
            check(unsafe {
                libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), flags)
            })?;
            FsReply::Done
        }
        FsOp::Removexattr { name } => {
            // Held until the call is done: the path names this fd.
            let fd = m.path_of(node)?;
            let path = proc_path(fd.as_raw_fd());
            let name = xattr_cname(&name);
            let _c = as_caller(creds)?;
            // SAFETY: both strings are NUL-terminated.
            check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })?;
            FsReply::Done
        }
        FsOp::Getlk { lock } => {
            let fd = m.locks.fd(m, cx, lock.owner, node)?;
            let mut fl = flock_of(&lock);
            // SAFETY: fcntl F_OFD_GETLK reads and fills `fl`, a valid struct flock.
            check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) })?;
            FsReply::Lock(lock_of(&fl, lock.owner))
        }
        FsOp::Setlk { lock } => {
            let fd = m.locks.fd(m, cx, lock.owner, node)?;
            let fl = flock_of(&lock);
            // SAFETY: fcntl F_OFD_SETLK reads `fl`, a valid struct flock.
            let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
            if r < 0 {
                let e = io::Error::last_os_error();
                // A conflict is EAGAIN whatever the kernel says (EACCES is allowed too).
                return Err(if e.raw_os_error() == Some(libc::EACCES) {
                    io::Error::from_raw_os_error(libc::EAGAIN)
                } else {
                    e
                });
            }
            FsReply::Done
        }
        FsOp::Flush { owner } => {
            m.locks.drop_owner(cx.session, owner, node);
            FsReply::Done
        }
        FsOp::Fallocate { fh, flags, mode, offset, len } => {
            let fd = open_file(m, cx, node, fh, flags)?;
            let (offset, len) = (off_t(offset)?, off_t(len)?);
            // As the caller (it may clear set-user-ID, and needs write access like a write).
            let _c = as_caller(creds)?;
            // SAFETY: fallocate on an open fd; the kernel checks the mode bits.
            check(unsafe { libc::fallocate(fd.as_raw_fd(), mode as libc::c_int, offset, len) })?;
            FsReply::Done
        }
        FsOp::Lseek { fh, flags, offset, whence } => {
            let fd = open_file(m, cx, node, fh, flags)?;
            // SAFETY: lseek on an open fd (this fd's position is nobody else's).
            let at = unsafe { libc::lseek(fd.as_raw_fd(), off_t(offset)?, whence as libc::c_int) };
            if at < 0 {
                return Err(io::Error::last_os_error());
            }
            FsReply::Offset(at as u64)
        }
        FsOp::CopyRange { fh, flags, offset, out_node, out_fh, out_flags, out_offset, len } => {
            let src = open_file(m, cx, node, fh, flags)?;
            let dst = open_file(m, cx, out_node, out_fh, out_flags)?;
            let (mut off_in, mut off_out) = (off_t(offset)?, off_t(out_offset)?);
            // One reply says how much was copied, in a u32: at most 1 GiB per request.
            let len = usize::try_from(len.min(1 << 30)).unwrap_or(1 << 30);
            let _c = as_caller(creds)?;
            // SAFETY: two open fds and two offsets the call updates; no flags.
            let n = unsafe {
                libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, len, 0)
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            FsReply::Written(u32::try_from(n).unwrap_or(u32::MAX))
        }
        FsOp::Statfs => {
            // SAFETY: a zeroed statvfs is valid; fstatvfs fills it.
            let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
            // SAFETY: the root fd is open; `st` is writable.
            check(unsafe { libc::fstatvfs(m.root.as_raw_fd(), &mut st) })?;
            FsReply::Statfs(FsStat {
                blocks: st.f_blocks,
                bfree: st.f_bfree,
                bavail: st.f_bavail,
                files: st.f_files,
                ffree: st.f_ffree,
                bsize: sat(st.f_bsize),
                namelen: sat(st.f_namemax),
                frsize: sat(st.f_frsize),
            })
        }
    })
}

// ---------------------------------------------------------------------------------------------------
// Locks

/// Lock fds one client session may have (one per lock owner and inode; then ENOLCK).
pub const LOCK_FDS_PER_SESSION_MAX: usize = 4096;
/// How long a client session's locks outlive its last connection (a reconnect within it keeps
/// them; a node that is gone loses them after it).
pub const LOCK_LEASE: std::time::Duration = std::time::Duration::from_secs(15);

/// The locks of one mount. Each (client session, lock owner, inode) gets an open file description
/// of its own, and its locks are the kernel's OFD locks on it: the kernel arbitrates ranges,
/// splitting and merging, and read/write conflicts between owners, of every node. Closing that fd
/// drops its locks: at FLUSH (the owner closed the file), and when the session is gone for
/// `LOCK_LEASE`. flock locks arrive as whole-file locks of an owner that is one open file, so
/// they exclude POSIX locks of others on the same file (as over NFS).
#[derive(Debug, Default)]
pub struct Locks {
    fds: Mutex<HashMap<(u64, u64, u64), Arc<HeldFd>>>,
    /// Connections per client session that have the volume open.
    sessions: Mutex<HashMap<u64, usize>>,
    /// Sessions with no connection left, and when their lease ends (one reaper thread per mount
    /// watches them while any is waiting).
    leases: Mutex<Leases>,
}

#[derive(Debug, Default)]
struct Leases {
    ends: HashMap<u64, std::time::Instant>,
    reaper: bool,
}

impl Locks {
    /// No lock is held (by a connected session, or a disconnected one in its lease).
    pub fn is_empty(&self) -> bool {
        self.fds.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    fn fd(&self, m: &FsMount, cx: &Context, owner: u64, node: u64) -> io::Result<Arc<HeldFd>> {
        let session = cx.session;
        let key = (session, owner, node);
        if let Some(fd) = self.fds.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(fd.clone());
        }
        // Files and directories only (never a device or a FIFO); read-write where it can be (write
        // locks need it), else read-only.
        let kind = type_of(m.path_of(node)?.as_raw_fd())?;
        if kind != libc::S_IFREG && kind != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let fd = match m.open_node(node, libc::O_RDWR) {
            Ok(fd) => fd,
            Err(_) => m.open_node(node, libc::O_RDONLY)?,
        };
        let fd = HeldFd::new(fd, &cx.node)?;
        let mut fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        if fds.keys().filter(|(s, _, _)| *s == session).count() >= LOCK_FDS_PER_SESSION_MAX {
            return Err(io::Error::from_raw_os_error(libc::ENOLCK));
        }
        Ok(fds.entry(key).or_insert_with(|| Arc::new(fd)).clone())
    }

    /// Drops every lock (the mount goes).
    pub fn clear(&self) {
        self.fds.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn drop_owner(&self, session: u64, owner: u64, node: u64) {
        self.fds.lock().unwrap_or_else(|p| p.into_inner()).remove(&(session, owner, node));
    }

    /// A connection of `session` opened the volume (a reconnect within the lease keeps what the
    /// session held).
    pub fn session_up(&self, session: u64) {
        *self.sessions.lock().unwrap_or_else(|p| p.into_inner()).entry(session).or_default() += 1;
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).ends.remove(&session);
    }

    /// A connection of `session` is gone: once none is left for `LOCK_LEASE`, its locks and its
    /// open `files` go.
    pub fn session_down(self: &Arc<Self>, session: u64, files: &Arc<Files>) {
        self.session_down_after(session, files, LOCK_LEASE);
    }

    fn session_down_after(self: &Arc<Self>, session: u64, files: &Arc<Files>, lease: std::time::Duration) {
        {
            let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            let Some(n) = s.get_mut(&session) else { return };
            *n = n.saturating_sub(1);
            if *n > 0 {
                return;
            }
            s.remove(&session);
        }
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases.ends.insert(session, std::time::Instant::now() + lease);
        if leases.reaper {
            return;
        }
        let (weak_locks, weak_files) = (Arc::downgrade(self), Arc::downgrade(files));
        let spawned = std::thread::Builder::new()
            .name("ferrovol-lock-lease".into())
            .spawn(move || reap(&weak_locks, &weak_files));
        match spawned {
            Ok(_) => leases.reaper = true,
            Err(e) => {
                // No thread: release at once rather than never.
                tracing::warn!(error = %e, "cannot start the lock lease thread: releasing at once");
                leases.ends.remove(&session);
                drop(leases);
                self.expire(session, files);
            }
        }
    }

    /// Drops what `session` held (its lease ended).
    fn expire(&self, session: u64, files: &Files) {
        // Held until everything is dropped: a session that reconnects meanwhile waits, and then
        // starts afresh rather than lose a lock it took in between. (Lock order: sessions, then
        // files, then fds; nothing takes them the other way round.)
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.contains_key(&session) {
            return;
        }
        files.close_session(session);
        let mut fds = self.fds.lock().unwrap_or_else(|p| p.into_inner());
        let before = fds.len();
        fds.retain(|(s, _, _), _| *s != session);
        if fds.len() != before {
            tracing::info!(
                session = format!("{session:016x}"),
                released = before - fds.len(),
                "a client session's locks expired"
            );
        }
        drop(sessions);
    }

    /// Sessions waiting for their lease to end (for tests).
    pub fn leases_waiting(&self) -> usize {
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).ends.len()
    }
}

/// The lease thread of one mount: expires sessions as their leases end, and stops when none is
/// waiting (or the mount is gone).
fn reap(locks: &std::sync::Weak<Locks>, files: &std::sync::Weak<Files>) {
    loop {
        let (Some(l), Some(f)) = (locks.upgrade(), files.upgrade()) else { return };
        let now = std::time::Instant::now();
        let (due, next) = {
            let mut leases = l.leases.lock().unwrap_or_else(|p| p.into_inner());
            if leases.ends.is_empty() {
                leases.reaper = false;
                return;
            }
            let due: Vec<u64> = leases.ends.iter().filter(|(_, end)| **end <= now).map(|(s, _)| *s).collect();
            for s in &due {
                leases.ends.remove(s);
            }
            (due, leases.ends.values().min().copied())
        };
        for session in due {
            l.expire(session, &f);
        }
        drop((l, f));
        // Wake at the next end, and at least every second (to notice the mount going).
        let wait = next.map_or(std::time::Duration::ZERO, |n| n.saturating_duration_since(now));
        std::thread::sleep(
            wait.clamp(std::time::Duration::from_millis(10), std::time::Duration::from_secs(1)),
        );
    }
}

fn flock_of(l: &Lock) -> libc::flock {
    // SAFETY: a zeroed struct flock is valid (all integers).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // F_RDLCK, F_WRLCK, F_UNLCK and SEEK_SET are 0..=2: they fit a short.
    let short = |v: libc::c_int| libc::c_short::try_from(v).unwrap_or(0);
    fl.l_type = short(match l.kind {
        LOCK_READ => libc::F_RDLCK,
        LOCK_WRITE => libc::F_WRLCK,
        _ => libc::F_UNLCK,
    });
    fl.l_whence = short(libc::SEEK_SET);
    fl.l_start = i64::try_from(l.start).unwrap_or(i64::MAX);
    // `end` past i64 (u64::MAX, or the kernel's OFFSET_MAX): to the end of the file.
    fl.l_len = if l.end >= i64::MAX as u64 { 0 } else { i64::try_from(l.end - l.start + 1).unwrap_or(0) };
    fl
}

fn lock_of(fl: &libc::flock, owner: u64) -> Lock {
    let kind = match i32::from(fl.l_type) {
        libc::F_RDLCK => LOCK_READ,
        libc::F_WRLCK => LOCK_WRITE,
        _ => LOCK_UNLOCK,
    };
    let start = u64::try_from(fl.l_start).unwrap_or(0);
    let end = if fl.l_len <= 0 { u64::MAX } else { start.saturating_add(fl.l_len as u64 - 1) };
    // OFD locks have no pid (-1): the owner is on another node.
    Lock { owner, start, end, kind, pid: 0 }
}

/// READDIR: entries after `cookie` with their attributes. The directory is opened as the caller
/// (read permission); the entries are looked at as root (their attributes come with the names, as
/// readdirplus needs).
fn readdir(m: &FsMount, node: u64, creds: &Creds, cookie: u64, max_entries: u32) -> io::Result<FsReply> {
    let pathfd = m.path_of(node)?;
    let dir = {
        let _c = as_caller(creds)?;
        // SAFETY: the path is NUL-terminated.
        fd_of(unsafe {
            libc::open(
                proc_path(pathfd.as_raw_fd()).as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?
    };
    // SAFETY: lseek on an open directory fd (ext4 directory positions are hash cookies, valid across opens).
    if unsafe { libc::lseek(dir.as_raw_fd(), cookie as libc::off_t, libc::SEEK_SET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut entries = Vec::new();
    let mut buf = vec![0u8; 32 << 10];
    loop {
        // SAFETY: getdents64 writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            return Ok(FsReply::Dir { entries, eof: true });
        }
        // At most `buf.len()`.
        let n = usize::try_from(n).unwrap_or(0).min(buf.len());
        let mut at = 0usize;
        while at + 19 <= n {
            // struct linux_dirent64: d_ino u64, d_off i64, d_reclen u16, d_type u8, d_name.
            let rec = &buf[at..n];
            let d_off = i64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
            let reclen = usize::from(u16::from_ne_bytes([rec[16], rec[17]]));
            if reclen < 19 || reclen > rec.len() {
                return Err(io::Error::other("malformed directory record"));
            }
            let name_bytes = &rec[19..reclen];
            let name_len = name_bytes.iter().position(|b| *b == 0).unwrap_or(name_bytes.len());
            let name = &name_bytes[..name_len];
            at += reclen;
            let Ok(fs_name) = FsName::new(Bytes::copy_from_slice(name)) else { continue };
            let Ok(cname) = CString::new(name) else { continue };
            // The root's `..` is above the mount: it is the root itself, as for `/`.
            let looked = if node == NODE_ROOT && name == b".." {
                m.attr(dir.as_raw_fd())
            } else {
                m.entry(dir.as_raw_fd(), &cname)
            };
            match looked {
                Ok(attr) => entries.push(DirEntry { cookie: d_off as u64, name: fs_name, attr }),
                // Gone since getdents: skip it.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            }
            if entries.len() >= max_entries as usize {
                // More may follow: the client asks again from the last cookie.
                return Ok(FsReply::Dir { entries, eof: false });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The tests here count process-wide things (threads, the fd budget): one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn devnull() -> OwnedFd {
        OwnedFd::from(std::fs::File::open("/dev/null").unwrap())
    }

    fn lease_threads() -> usize {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| c.trim() == "ferrovol-lock-l")
            .count()
    }

    fn until(what: &str, f: impl Fn() -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn one_lease_thread_serves_every_closing_session() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let (locks, files) = (Arc::new(Locks::default()), Arc::new(Files::default()));
        let node: Arc<str> = Arc::from("a");
        // 300 sessions that each held a lock and went away, as an OPEN/close loop makes them.
        for session in 1..=300u64 {
            locks.session_up(session);
            let fd = Arc::new(HeldFd::new(devnull(), &node).unwrap());
            locks.fds.lock().unwrap().insert((session, 7, 1), fd);
            locks.session_down_after(session, &files, Duration::from_millis(200));
        }
        assert_eq!(locks.leases_waiting(), 300);
        assert_eq!(lease_threads(), 1, "one lease thread per mount, not one per closed session");
        // Session 300 comes back within its lease: it keeps its lock.
        locks.session_up(300);
        until("the leases to end", || locks.leases_waiting() == 0);
        until("the locks to go", || locks.fds.lock().unwrap().len() == 1);
        assert!(locks.fds.lock().unwrap().contains_key(&(300, 7, 1)));
        until("the lease thread to stop", || lease_threads() == 0);
        // A later close starts it again.
        locks.session_down_after(300, &files, Duration::from_millis(20));
        until("the last lock to go", || locks.fds.lock().unwrap().is_empty());
        until("the lease thread to stop again", || lease_threads() == 0);
    }

    #[test]
    fn the_fd_budget_bounds_each_node_and_the_server() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let [a, b, c, d, e]: [Arc<str>; 5] = ["a", "b", "c", "d", "e"].map(Arc::from);
        let base = held().lock().unwrap().total;
        let budget = base + 8; // 2 per node
        let mut kept = Vec::new();
        for n in [&a, &a, &b, &b, &c, &c, &d] {
            kept.push(HeldFd::within(devnull(), n, budget).unwrap());
        }
        let err = HeldFd::within(devnull(), &a, budget).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EMFILE), "a node past its share");
        kept.push(HeldFd::within(devnull(), &d, budget).unwrap());
        let err = HeldFd::within(devnull(), &e, budget).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENFILE), "the server past its budget");
        // Closing gives the fd back to its node and to the server.
        kept.remove(0);
        kept.push(HeldFd::within(devnull(), &e, budget).unwrap());
        let err = HeldFd::within(devnull(), &a, budget).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENFILE), "what a closed went to e");
        drop(kept);
        assert_eq!(held().lock().unwrap().total, base);
        assert!(!held().lock().unwrap().per_node.contains_key(&a));
    }
}
