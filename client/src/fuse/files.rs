//! The fs-volume filesystem on fuser: each kernel request becomes one FS request to the server,
//! written to the socket by the FUSE thread that read it and answered by the connection's reader
//! when the reply comes (fuser replies are `Send`), so many are in flight and none waits for a
//! hand-off to another thread.
//!
//! The kernel's inode numbers *are* the server's nodes (its filesystem's file handles, stable
//! across server restarts), so this side keeps no inode table: a restarted client, or a server
//! restart, leaves nothing to rebuild. Permissions are checked twice: by the kernel here
//! (`default_permissions`, on the attributes it has) and by the server, which runs every operation
//! with the caller's uid, gid and groups.
//!
//! Coherence: close-to-open (every open drops the file's cached pages and attributes, so the next
//! read or stat asks the server), plus the server's FS_NOTIFY notices: when another client changes
//! an inode or an entry this one may cache, the server says so within milliseconds and [`Watch`]
//! drops it from the kernel's caches (FUSE notifications). The attribute and entry caches
//! (`attr_ttl` / `entry_ttl`) therefore only bound how long a missed notice (a reconnect) can
//! leave something stale.
//!
//! Writes are asynchronous unless the mount says otherwise (see `writes`): close and fsync
//! still wait for them, so close-to-open holds.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ferrovol_proto::fs::*;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use tracing::debug;

use super::writes::Writes;
use crate::{ClientError, Volume};

/// Largest READ / WRITE the kernel sends.
pub const FS_MAX_WRITE: u32 = 1 << 20;

/// Cache lifetimes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ttls {
    pub attr: Duration,
    pub entry: Duration,
}

impl Ttls {
    /// What `ferrovol mount` and the CSI driver use: the server's notices keep the caches
    /// coherent, this bounds a missed one.
    pub const STANDARD: Ttls = Ttls { attr: Duration::from_secs(1), entry: Duration::from_secs(1) };
}

/// An fs volume as a directory tree.
#[derive(Debug)]
pub struct FsFiles {
    vol: Volume,
    rt: tokio::runtime::Handle,
    ttl: Ttls,
    /// (inode, lock owner) that took a lock: their close sends FS_FLUSH (others need no round trip).
    locked: Arc<Mutex<HashSet<(u64, u64)>>>,
    /// The open flags of each fh (the server opens a file again with them after a restart; the
    /// kernel does not send them with every request).
    flags: Arc<Mutex<std::collections::HashMap<u64, u32>>>,
    /// The inodes the kernel holds, with their lookup counts (what a `Notice::All` drops).
    cached: Cached,
    /// Set once the session is mounted (see `Watch::start`).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// Writes in flight, when they are asynchronous (see `writes`); `None`: every write waits for
    /// the server (`--sync-writes`).
    writes: Option<Arc<Writes>>,
    /// Attributes (and a small file's bytes) that came with an OPEN, for the GETATTR and READ
    /// the kernel sends next (see `open`).
    opened: Opened,
}

/// Inode -> the attributes an OPEN returned, and when; and for a small file opened read-only,
/// its bytes. The kernel's next GETATTR of the inode takes the attributes, and its READs through
/// that fh the bytes, instead of a round trip (close-to-open: they are as fresh as the open). Any
/// other request on the inode (a write through another fh above all), or a notice from the
/// server, drops both.
#[derive(Debug, Clone, Default)]
struct Opened(Arc<Mutex<OpenedAttrs>>);

#[derive(Debug, Default)]
struct OpenedAttrs {
    attrs: std::collections::HashMap<u64, (Attr, std::time::Instant)>,
    /// Inode -> (fh, the whole file as of the open, when).
    data: std::collections::HashMap<u64, (u64, Bytes, std::time::Instant)>,
    /// Bumped by every drop: what an OPEN returned is kept only if nothing was dropped between
    /// its sending and its reply (a change sent or noticed meanwhile may postdate it).
    epoch: u64,
}

impl Opened {
    fn lock(&self) -> std::sync::MutexGuard<'_, OpenedAttrs> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken when an OPEN is sent, for `put`.
    fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    fn put(&self, node: u64, a: Attr, fh: u64, data: Bytes, epoch: u64) {
        let mut m = self.lock();
        if m.epoch == epoch {
            let now = std::time::Instant::now();
            m.attrs.insert(node, (a, now));
            if !data.is_empty() {
                // A copy: the reply is a slice of the connection's read buffer (256 KiB and up),
                // which a kept slice would pin.
                m.data.insert(node, (fh, Bytes::copy_from_slice(&data), now));
            }
        }
    }

    fn drop_node(&self, node: u64) {
        let mut m = self.lock();
        m.epoch += 1;
        m.attrs.remove(&node);
        m.data.remove(&node);
    }

    fn clear(&self) {
        let mut m = self.lock();
        m.epoch += 1;
        m.attrs.clear();
        m.data.clear();
    }

    /// READ of `size` bytes at `offset` through `fh`, answered from what its OPEN returned less
    /// than `ttl` ago (shorter at the end of the file, as a READ is). Kept for the next READ:
    /// the kernel may read a file in several pieces.
    fn read(&self, node: u64, fh: u64, offset: u64, size: u32, ttl: Duration) -> Option<Bytes> {
        let m = self.lock();
        let (held, data, at) = m.data.get(&node)?;
        if *held != fh || at.elapsed() >= ttl {
            return None;
        }
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        Some(data.slice(start..end))
    }

    /// The attributes of `node` from an OPEN less than `ttl` ago, with what is left of `ttl`.
    fn take(&self, node: u64, ttl: Duration) -> Option<(Attr, Duration)> {
        let (a, at) = self.lock().attrs.remove(&node)?;
        let age = at.elapsed();
        (age < ttl).then(|| (a, ttl - age))
    }
}

/// Inode -> lookup count, as the kernel counts them (FORGET takes them back).
#[derive(Debug, Clone, Default)]
struct Cached(Arc<Mutex<std::collections::HashMap<u64, u64>>>);

impl Cached {
    fn add(&self, node: u64) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(node).or_default() += 1;
    }

    fn forget(&self, node: u64, n: u64) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = m.get_mut(&node) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                m.remove(&node);
            }
        }
    }

    fn nodes(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.0.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        v.push(NODE_ROOT);
        v
    }
}

/// Applies a mount's FS_NOTIFY notices to the kernel's caches, on a thread of its own: an
/// invalidation of an entry waits for its directory's lock, which a request in progress may hold
/// until its reply comes, so it must never run where replies are handled.
#[derive(Debug)]
pub struct Watch {
    notices: crate::Notices,
    cached: Cached,
    opened: Opened,
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

impl Watch {
    /// Starts applying notices through the mounted session's `notifier`.
    pub fn start(self, notifier: fuser::Notifier) -> std::io::Result<std::thread::JoinHandle<()>> {
        let _ = self.notifier.set(notifier.clone());
        std::thread::Builder::new().name("ferrovol-notify".into()).spawn(move || {
            while let Some(notices) = self.notices.recv() {
                for n in notices {
                    match &n {
                        Notice::Inode { node, .. } | Notice::Delete { child: node, .. } => {
                            self.opened.drop_node(*node)
                        }
                        Notice::All => self.opened.clear(),
                        Notice::Entry { .. } => {}
                    }
                    apply(&notifier, &self.cached, n);
                }
            }
        })
    }
}

fn apply(notifier: &fuser::Notifier, cached: &Cached, n: Notice) {
    // ENOENT: the kernel does not have it (nothing to drop). Anything else is only logged: a
    // notice is an optimisation of coherence, the caches' TTLs bound what a lost one costs.
    let r = match &n {
        Notice::Inode { node, offset, len } => notifier.inval_inode(INodeNo(*node), *offset, *len),
        Notice::Entry { parent, name } => {
            notifier.inval_entry(INodeNo(*parent), OsStr::from_bytes(name.as_bytes()))
        }
        Notice::Delete { parent, child, name } => {
            let name = OsStr::from_bytes(name.as_bytes());
            notifier
                .delete(INodeNo(*parent), INodeNo(*child), name)
                .or_else(|_| notifier.inval_entry(INodeNo(*parent), name))
        }
        Notice::All => {
            let nodes = cached.nodes();
            debug!(inodes = nodes.len(), "notices were lost: dropping every cached inode");
            for node in nodes {
                let _ = notifier.inval_inode(INodeNo(node), 0, 0);
            }
            Ok(())
        }
    };
    match r {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => debug!(notice = ?n, error = %e, "notice not applied"),
    }
}

/// Between two attempts at a lock someone else holds (doubling from the first).
const LOCK_RETRY_FIRST: Duration = Duration::from_millis(1);
const LOCK_RETRY_MAX: Duration = Duration::from_millis(50);

impl FsFiles {
    pub fn new(vol: Volume, rt: tokio::runtime::Handle, ttl: Ttls, sync_writes: bool) -> Self {
        Self {
            vol,
            rt,
            ttl,
            locked: Arc::default(),
            flags: Arc::default(),
            cached: Cached::default(),
            notifier: Arc::default(),
            writes: (!sync_writes).then(|| Arc::new(Writes::new(super::writes::WRITES_IN_FLIGHT_BYTES))),
            opened: Opened::default(),
        }
    }

    /// Before a request on `node`: its writes in flight have ended (true if it waited).
    fn settle(&self, node: INodeNo) -> bool {
        self.writes.as_ref().is_some_and(|w| w.settle(node.0))
    }

    /// Before a close or fsync: `node`'s writes have ended, and a failure `fh` has not been
    /// told of is reported now (see `writes`).
    fn settle_and_take_error(&self, node: INodeNo, fh: FileHandle) -> Result<(), Errno> {
        match &self.writes {
            Some(w) => w.settle_and_take_error(node.0, fh.0).map_err(Errno::from_i32),
            None => Ok(()),
        }
    }

    /// Before a request whose reply may carry any inode's attributes: every write in flight
    /// has ended (so no reply gives the kernel a size from before a write it was told is done).
    fn barrier(&self) {
        if let Some(w) = &self.writes {
            w.barrier()
        }
    }

    /// What applies the server's notices once the session is mounted (`Watch::start`); notices
    /// are queued from now on.
    pub fn watch(&self) -> Watch {
        Watch {
            notices: self.vol.notices(),
            cached: self.cached.clone(),
            opened: self.opened.clone(),
            notifier: self.notifier.clone(),
        }
    }

    fn flags_of(&self, fh: FileHandle) -> u32 {
        self.flags.lock().unwrap_or_else(|p| p.into_inner()).get(&fh.0).copied().unwrap_or(0)
    }

    /// Whether `owner` ever took a lock on `ino` (and forgets it: the caller drops its locks).
    fn had_locks(&self, ino: INodeNo, owner: Option<LockOwner>) -> Option<u64> {
        let owner = owner?.0;
        self.locked.lock().unwrap_or_else(|p| p.into_inner()).remove(&(ino.0, owner)).then_some(owner)
    }

    /// Sends `op` on `node` as the caller of `req` and hands the reply (or the error) to `done`.
    fn call(
        &self,
        req: &Request,
        groups: bool,
        node: INodeNo,
        op: FsOp,
        done: impl FnOnce(Result<FsReply, Errno>) + Send + 'static,
    ) {
        let (creds, cached) = creds_of(req, groups);
        let opcode = op.opcode();
        // What an OPEN returned may predate a change sent before it and answered after it (the
        // server's workers may run the two in either order): dropped when a change is sent and
        // again when it is answered, before anyone is told it is done.
        // (An OPEN's own answer is what it keeps: dropped on answer only if it truncated.)
        let changes = !matches!(op, FsOp::Getattr | FsOp::Read { .. });
        if changes {
            self.opened.drop_node(node.0);
        }
        let answered =
            changes && !matches!(op, FsOp::Open { flags } if flags as libc::c_int & libc::O_TRUNC == 0);
        let opened = self.opened.clone();
        let done = move |r| {
            if answered {
                opened.drop_node(node.0);
            }
            done(r)
        };
        let errno = move |e: ClientError| {
            let errno = errno_of(&e);
            if errno == libc::EIO {
                tracing::warn!(%opcode, error = %e, "file operation failed");
            } else {
                debug!(%opcode, error = %e, "file operation refused");
            }
            Errno::from_i32(errno)
        };
        // Groups from the cache that may have grown since (setgroups): a refusal is asked again
        // with the ones the process has now, if they differ.
        let again = cached.then(|| (op.clone(), creds.clone(), req.pid(), self.vol.clone(), self.rt.clone()));
        self.vol.fs_start(&self.rt, node.0, creds, op, move |r| match (r, again) {
            (Err(e), Some((op, creds, pid, vol, rt)))
                if matches!(errno_of(&e), libc::EACCES | libc::EPERM) =>
            {
                rt.spawn(async move {
                    let groups = GROUPS.reread(pid, creds.uid, creds.gid);
                    if groups == creds.groups {
                        return done(Err(errno(e)));
                    }
                    done(vol.fs(node.0, Creds { groups, ..creds }, op).await.map_err(errno))
                });
            }
            (r, _) => done(r.map_err(errno)),
        });
    }

    fn entry(&self, req: &Request, parent: INodeNo, op: FsOp, reply: ReplyEntry) {
        self.barrier();
        let (ttl, cached) = (self.ttl, self.cached.clone());
        self.call(req, true, parent, op, move |r| match r {
            Ok(FsReply::Entry(a)) => {
                cached.add(a.node);
                reply.entry(&ttl.entry, &file_attr(&a), Generation(0))
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn empty(&self, req: &Request, node: INodeNo, op: FsOp, reply: ReplyEmpty) {
        self.call(req, true, node, op, move |r| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }
}

fn xattr_name(n: &OsStr) -> Result<Bytes, Errno> {
    // The kernel sends 1..=255 bytes; anything else is not a name (ERANGE, as for a long one).
    ferrovol_proto::fs::xattr_name(n.as_bytes()).map_err(|_| Errno::ERANGE)
}

/// A value or a name list for a caller that asked with buffer `size` (0: only the length).
fn xattr_reply(r: Result<FsReply, Errno>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(FsReply::Data(d)) => {
            let len = u32::try_from(d.len()).unwrap_or(u32::MAX);
            if size == 0 {
                reply.size(len)
            } else if len > size {
                reply.error(Errno::ERANGE)
            } else {
                reply.data(&d)
            }
        }
        Ok(_) => reply.error(Errno::EIO),
        Err(e) => reply.error(e),
    }
}

/// The errno an application gets for a failed request.
pub fn errno_of(e: &ClientError) -> i32 {
    match e {
        // Only a real errno reaches the application (0 would read as success).
        ClientError::Errno { errno, .. } => match i32::try_from(*errno) {
            Ok(e @ 1..=4095) => e,
            _ => libc::EIO,
        },
        other => super::errno_code(other),
    }
}

/// The caller's credentials, with its supplementary groups if `groups` (where they matter: reads
/// and writes were checked at open); true if those came from the cache (see `GroupsCache`).
fn creds_of(req: &Request, groups: bool) -> (Creds, bool) {
    let (uid, gid) = (req.uid(), req.gid());
    let (groups, cached) = if groups { GROUPS.of(req.pid(), uid, gid) } else { (Vec::new(), false) };
    (Creds { uid, gid, groups }, cached)
}

/// Supplementary groups by (pid, uid, gid), read from /proc/PID/status and kept for
/// `GROUPS_TTL`: the read costs ~30 us of a FUSE thread per request (a third of a LOOKUP's round
/// trip here), and a process's groups rarely change. A process that changes its uid or gid is
/// read again at once (new key). One that drops supplementary groups alone is checked by the
/// kernel with its current ones first (`default_permissions`: mode bits, not ACLs), so for up to
/// that second the server's check with the old ones lets through what the kernel's cached mode
/// bits allowed and the server's current ones (or an ACL entry naming a dropped group) would
/// not; a new thread that reuses a dead one's id with the same uid and gid within the second
/// gets its groups likewise. One that gains groups could be refused
/// what it may now do: a refusal (EACCES, EPERM) of a request sent with cached groups is sent
/// again with the groups read afresh, if they differ (`FsFiles::call`).
struct GroupsCache(Mutex<std::collections::HashMap<ProcessIds, (std::time::Instant, Vec<u32>)>>);

/// pid, uid, gid.
type ProcessIds = (u32, u32, u32);

const GROUPS_TTL: Duration = Duration::from_secs(1);
/// Entries kept before the cache starts over (a fork storm must not grow it without bound).
const GROUPS_CACHED_MAX: usize = 4096;

static GROUPS: std::sync::LazyLock<GroupsCache> = std::sync::LazyLock::new(|| GroupsCache(Mutex::default()));

impl GroupsCache {
    /// The groups, and whether they came from the cache.
    fn of(&self, pid: u32, uid: u32, gid: u32) -> (Vec<u32>, bool) {
        let now = std::time::Instant::now();
        if let Some((at, g)) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&(pid, uid, gid)) {
            if now.duration_since(*at) < GROUPS_TTL {
                return (g.clone(), true);
            }
        }
        (self.reread(pid, uid, gid), false)
    }

    /// Reads the groups from /proc (outside the lock: other FUSE threads go on meanwhile).
    fn reread(&self, pid: u32, uid: u32, gid: u32) -> Vec<u32> {
        let (key, now) = ((pid, uid, gid), std::time::Instant::now());
        let groups = groups_of(pid);
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= GROUPS_CACHED_MAX {
            m.retain(|_, (at, _)| now.duration_since(*at) < GROUPS_TTL);
            if m.len() >= GROUPS_CACHED_MAX {
                m.clear();
            }
        }
        m.insert(key, (now, groups.clone()));
        groups
    }
}

/// Whether thread `pid` has a signal pending that it neither blocks nor ignores (its blocking
/// lock request is then given up with EINTR; a killed process has SIGKILL pending).
fn signal_pending(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        // Gone: nobody waits any more.
        return true;
    };
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = mask("SigPnd:") | mask("ShdPnd:");
    pending & !(mask("SigBlk:") | mask("SigIgn:")) != 0
}

fn groups_of(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Vec::new() };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).take(FS_GROUPS_MAX).collect())
        .unwrap_or_default()
}

fn time((s, ns): (i64, u32)) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, ns)
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + Duration::from_nanos(u64::from(ns))
    }
}

fn wire_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, ns) = (i64::try_from(d.as_secs()).unwrap_or(i64::MAX), d.subsec_nanos());
            if ns == 0 {
                (-s, 0)
            } else {
                (-s - 1, 1_000_000_000 - ns)
            }
        }
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.node),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.ctime),
        kind: kind(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn name(n: &OsStr) -> Result<FsName, Errno> {
    if n.len() > FS_NAME_LEN_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    match FsName::new(Bytes::copy_from_slice(n.as_bytes())) {
        Ok(n) if !n.is_dot() => Ok(n),
        _ => Err(Errno::EINVAL),
    }
}

impl Filesystem for FsFiles {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(FS_MAX_WRITE);
        let _ = config.set_max_readahead(FS_MAX_WRITE);
        let _ = config.add_capabilities(
            // Locks go to the server, so they hold across nodes.
            InitFlags::FUSE_POSIX_LOCKS
                | InitFlags::FUSE_FLOCK_LOCKS
                | InitFlags::FUSE_MAX_PAGES
                | InitFlags::FUSE_DO_READDIRPLUS
                | InitFlags::FUSE_AUTO_INVAL_DATA
                | InitFlags::FUSE_PARALLEL_DIROPS
                | InitFlags::FUSE_ATOMIC_O_TRUNC
                | InitFlags::FUSE_ASYNC_DIO,
        );
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        Ok(())
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.cached.forget(ino.0, nlookup);
    }

    fn lookup(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEntry) {
        match name(n) {
            Ok(name) => self.entry(req, parent, FsOp::Lookup { name }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let waited = self.settle(ino);
        let ttl = self.ttl;
        // Not after waiting for writes: they may postdate the open.
        if let Some((a, left)) = self.opened.take(ino.0, ttl.attr).filter(|_| !waited) {
            return reply.attr(&left, &file_attr(&a));
        }
        self.call(req, false, ino, FsOp::Getattr, move |r| match r {
            Ok(FsReply::Attr(a)) => reply.attr(&ttl.attr, &file_attr(&a)),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut s = SetAttr { fh: fh.map_or(0, |f| f.0), ..SetAttr::default() };
        if let Some(m) = mode {
            s.valid |= SETATTR_MODE;
            s.mode = m;
        }
        if let Some(u) = uid {
            s.valid |= SETATTR_UID;
            s.uid = u;
        }
        if let Some(g) = gid {
            s.valid |= SETATTR_GID;
            s.gid = g;
        }
        if let Some(n) = size {
            s.valid |= SETATTR_SIZE;
            s.size = n;
        }
        match atime {
            Some(TimeOrNow::Now) => s.valid |= SETATTR_ATIME | SETATTR_ATIME_NOW,
            Some(TimeOrNow::SpecificTime(t)) => {
                s.valid |= SETATTR_ATIME;
                s.atime = wire_time(t);
            }
            None => {}
        }
        match mtime {
            Some(TimeOrNow::Now) => s.valid |= SETATTR_MTIME | SETATTR_MTIME_NOW,
            Some(TimeOrNow::SpecificTime(t)) => {
                s.valid |= SETATTR_MTIME;
                s.mtime = wire_time(t);
            }
            None => {}
        }
        let ttl = self.ttl;
        self.settle(ino);
        self.call(req, true, ino, FsOp::Setattr(s), move |r| match r {
            Ok(FsReply::Attr(a)) => reply.attr(&ttl.attr, &file_attr(&a)),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, n: &OsStr, size: u32, reply: ReplyXattr) {
        let name = match xattr_name(n) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.call(req, true, ino, FsOp::Getxattr { name }, move |r| xattr_reply(r, size, reply));
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.call(req, true, ino, FsOp::Listxattr, move |r| xattr_reply(r, size, reply));
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        n: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let name = match xattr_name(n) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if value.len() > FS_XATTR_SIZE_MAX {
            return reply.error(Errno::E2BIG);
        }
        let flags = u32::try_from(flags).unwrap_or(0);
        if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 || flags == XATTR_CREATE | XATTR_REPLACE {
            return reply.error(Errno::EINVAL);
        }
        let op = FsOp::Setxattr { name, value: Bytes::copy_from_slice(value), flags };
        self.empty(req, ino, op, reply);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        match xattr_name(n) {
            Ok(name) => self.empty(req, ino, FsOp::Removexattr { name }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.call(req, false, ino, FsOp::Readlink, move |r| match r {
            Ok(FsReply::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        match name(n) {
            Ok(name) => self.entry(req, parent, FsOp::Mknod { name, mode, umask, rdev }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, n: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match name(n) {
            Ok(name) => self.entry(req, parent, FsOp::Mkdir { name, mode, umask }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        match name(n) {
            Ok(name) => self.empty(req, parent, FsOp::Unlink { name }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, n: &OsStr, reply: ReplyEmpty) {
        match name(n) {
            Ok(name) => self.empty(req, parent, FsOp::Rmdir { name }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link: &OsStr, target: &Path, reply: ReplyEntry) {
        let t = target.as_os_str().as_bytes();
        if t.is_empty() || t.len() > FS_SYMLINK_LEN_MAX {
            return reply.error(Errno::ENAMETOOLONG);
        }
        match name(link) {
            Ok(name) => {
                self.entry(req, parent, FsOp::Symlink { name, target: Bytes::copy_from_slice(t) }, reply)
            }
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        new_parent: INodeNo,
        new_n: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, new_name) = match (name(n), name(new_n)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let flags = flags.bits();
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0 {
            // RENAME_WHITEOUT is for overlay filesystems.
            return reply.error(Errno::EINVAL);
        }
        self.empty(req, parent, FsOp::Rename { name, new_parent: new_parent.0, new_name, flags }, reply);
    }

    fn link(&self, req: &Request, ino: INodeNo, new_parent: INodeNo, new_n: &OsStr, reply: ReplyEntry) {
        match name(new_n) {
            Ok(new_name) => self.entry(req, ino, FsOp::Link { new_parent: new_parent.0, new_name }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let flags = flags.0 as u32;
        // Before the request (`call` drops the inode's entry, which bumps the epoch), and before
        // waiting for writes (whose answers bump it too).
        let epoch = self.opened.epoch() + 1;
        // After this inode's writes: an O_TRUNC must not overtake them, and the attributes it
        // returns must include them.
        self.settle(ino);
        let (known, notifier, opened) = (self.flags.clone(), self.notifier.clone(), self.opened.clone());
        let writes = self.writes.clone();
        self.call(req, true, ino, FsOp::Open { flags }, move |r| match r {
            Ok(FsReply::Opened { attr, fh, data }) => {
                known.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, flags);
                if let Some(w) = &writes {
                    w.opened(fh, ino.0, flags as i32 & libc::O_ACCMODE != libc::O_RDONLY);
                }
                // Close-to-open: the attributes (the size above all) are asked for again after
                // an open, whatever their TTL; the open's own answer them (no round trip).
                // Attributes only: this takes no inode lock, so it may run while the kernel
                // waits for this reply.
                // A small file's bytes too, when opened read-only: its first READ is answered
                // here.
                opened.put(ino.0, attr, fh, data, epoch);
                if let Some(n) = notifier.get() {
                    let _ = n.inval_inode(ino, -1, 0);
                }
                reply.opened(FileHandle(fh), open_flags(flags))
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // Every write of the inode first, not only overlapping ones: a short read of a file that
        // a write in flight extends would shrink the kernel's idea of its size. Not from the
        // open's bytes after waiting for writes (they may postdate the open).
        let waited = self.settle(ino);
        if let Some(d) = self.opened.read(ino.0, fh.0, offset, size, self.ttl.attr).filter(|_| !waited) {
            return reply.data(&d);
        }
        let op = FsOp::Read { fh: fh.0, flags: flags.0 as u32, offset, len: size.min(FS_MAX_WRITE) };
        self.call(req, false, ino, op, move |r| match r {
            // Written to /dev/fuse straight from the received buffer.
            Ok(FsReply::Data(d)) => reply.data(&d),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // fuser lends the buffer only for this call: one copy (the block file's own session has none).
        // At most max_write (1 MiB): the kernel sends no more.
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let op = FsOp::Write { fh: fh.0, flags: flags.0 as u32, offset, data: Bytes::copy_from_slice(data) };
        // O_SYNC / O_DSYNC promise the data is stable when write returns; O_APPEND writes must
        // reach the server in the order they were made (it appends each where the file ends).
        let ordered = (libc::O_SYNC | libc::O_DSYNC | libc::O_APPEND) as u32;
        let Some(writes) = self.writes.as_ref().filter(|_| flags.0 as u32 & ordered == 0) else {
            self.settle(ino);
            return self.call(req, false, ino, op, move |r| match r {
                Ok(FsReply::Written(n)) => reply.written(n),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            });
        };
        let started = match writes.begin(ino.0, fh.0, offset, len.into()) {
            Ok(s) => s,
            // An earlier write of this inode failed: this one reports it.
            Err(e) => return reply.error(Errno::from_i32(e)),
        };
        self.call(req, false, ino, op, move |r| {
            started.end(match r {
                Ok(FsReply::Written(n)) if n == len => Ok(()),
                // The server's pwrite stopped short: the file system is full.
                Ok(FsReply::Written(_)) => Err(libc::ENOSPC),
                Ok(_) => Err(libc::EIO),
                Err(e) => Err(e.code()),
            })
        });
        reply.written(len);
    }

    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        // Close-to-open: at close every write is on the server, and one that failed is reported
        // here. A close drops the owner's POSIX locks on the file.
        let written = self.settle_and_take_error(ino, fh);
        let Some(owner) = self.had_locks(ino, Some(lock_owner)) else {
            return match written {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            };
        };
        self.call(req, false, ino, FsOp::Flush { owner }, move |r| match (written, r) {
            (Err(e), _) | (Ok(()), Err(e)) => reply.error(e),
            (Ok(()), Ok(_)) => reply.ok(),
        });
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let lock = Lock { owner: lock_owner.0, start, end, kind: typ as u32, pid };
        self.settle(ino);
        self.call(req, false, ino, FsOp::Getlk { lock }, move |r| match r {
            Ok(FsReply::Lock(l)) => {
                let end = if l.end == u64::MAX { i64::MAX as u64 } else { l.end };
                reply.locked(l.start, end, l.kind as i32, l.pid)
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let lock = Lock { owner: lock_owner.0, start, end, kind: typ as u32, pid };
        // What was written under a lock is on the server before the lock changes hands.
        self.settle(ino);
        let (vol, locked, creds) = (self.vol.clone(), self.locked.clone(), creds_of(req, false).0);
        let opened = self.opened.clone();
        let caller = req.pid();
        self.rt.spawn(async move {
            // A blocking lock is asked for again until it is had, or the caller got a signal
            // (then EINTR, as fcntl F_SETLKW gives): nothing waits on the server.
            let mut pause = LOCK_RETRY_FIRST;
            loop {
                match vol.fs(ino.0, creds.clone(), FsOp::Setlk { lock }).await {
                    Ok(_) => {
                        if lock.kind != LOCK_UNLOCK {
                            locked.lock().unwrap_or_else(|p| p.into_inner()).insert((ino.0, lock.owner));
                        }
                        // What was written under the lock before it came is read from the server.
                        opened.drop_node(ino.0);
                        return reply.ok();
                    }
                    Err(e) if sleep && errno_of(&e) == libc::EAGAIN => {
                        if signal_pending(caller) {
                            return reply.error(Errno::EINTR);
                        }
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(LOCK_RETRY_MAX);
                    }
                    Err(e) => return reply.error(Errno::from_i32(errno_of(&e))),
                }
            }
        });
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // The last close of an open file: its writes end first (they use its fh on the server),
        // then its flock locks (an owner of its own) go.
        self.settle(ino);
        if let Some(w) = &self.writes {
            w.released(fh.0);
        }
        let owner = self.had_locks(ino, lock_owner);
        self.flags.lock().unwrap_or_else(|p| p.into_inner()).remove(&fh.0);
        let Some(owner) = owner else {
            return self.call(req, false, ino, FsOp::Release { fh: fh.0 }, move |r| match r {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(e),
            });
        };
        let (vol, creds) = (self.vol.clone(), creds_of(req, false).0);
        self.opened.drop_node(ino.0);
        self.rt.spawn(async move {
            if let Err(e) = vol.fs(ino.0, creds.clone(), FsOp::Flush { owner }).await {
                debug!(error = %e, "dropping flock locks at release failed");
            }
            match vol.fs(ino.0, creds, FsOp::Release { fh: fh.0 }).await {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(Errno::from_i32(errno_of(&e))),
            }
        });
    }

    fn fsync(&self, req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        // Every write before it is on the server (or its failure is reported) before the fsync.
        if let Err(e) = self.settle_and_take_error(ino, fh) {
            return reply.error(e);
        }
        let flags = self.flags_of(fh);
        self.call(req, false, ino, FsOp::Fsync { fh: fh.0, flags, datasync }, move |r| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn fsyncdir(&self, req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        // The directory itself is fsynced on the server (fh 0): a rename then fsync(dir) is durable.
        self.call(req, false, ino, FsOp::Fsync { fh: 0, flags: 0, datasync }, move |r| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn readdir(&self, req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let op = FsOp::Readdir { cookie: offset, max_entries: FS_READDIR_ENTRIES_MAX };
        self.call(req, true, ino, op, move |r| match r {
            Ok(FsReply::Dir { entries, .. }) => {
                for e in entries {
                    if reply.add(
                        INodeNo(e.attr.node),
                        e.cookie,
                        kind(e.attr.mode),
                        OsStr::from_bytes(e.name.as_bytes()),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.barrier();
        let op = FsOp::Readdir { cookie: offset, max_entries: 64 };
        let (ttl, cached) = (self.ttl, self.cached.clone());
        self.call(req, true, ino, op, move |r| match r {
            Ok(FsReply::Dir { entries, .. }) => {
                for e in entries {
                    let name = OsStr::from_bytes(e.name.as_bytes());
                    if reply.add(
                        INodeNo(e.attr.node),
                        e.cookie,
                        name,
                        &ttl.entry,
                        &file_attr(&e.attr),
                        Generation(0),
                    ) {
                        break;
                    }
                    // The kernel counts a lookup for each entry but `.` and `..`.
                    if name != "." && name != ".." {
                        cached.add(e.attr.node);
                    }
                }
                reply.ok();
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.settle(ino);
        let op =
            FsOp::Fallocate { fh: fh.0, flags: self.flags_of(fh), mode: mode as u32, offset, len: length };
        self.empty(req, ino, op, reply);
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let (Ok(offset), Ok(whence)) = (u64::try_from(offset), u32::try_from(whence)) else {
            return reply.error(Errno::EINVAL);
        };
        // The kernel answers SEEK_SET/CUR/END itself; only DATA and HOLE come here.
        self.settle(ino);
        let op = FsOp::Lseek { fh: fh.0, flags: self.flags_of(fh), offset, whence };
        self.call(req, false, ino, op, move |r| match r {
            Ok(FsReply::Offset(o)) => reply.offset(i64::try_from(o).unwrap_or(i64::MAX)),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // Both files on this volume (the kernel sends it only then): copied on the server, no data
        // on the wire.
        self.settle(ino_in);
        self.settle(ino_out);
        self.opened.drop_node(ino_out.0);
        let op = FsOp::CopyRange {
            fh: fh_in.0,
            flags: self.flags_of(fh_in),
            offset: offset_in,
            out_node: ino_out.0,
            out_fh: fh_out.0,
            out_flags: self.flags_of(fh_out),
            out_offset: offset_out,
            len,
        };
        self.call(req, false, ino_in, op, move |r| match r {
            Ok(FsReply::Written(n)) => reply.written(n),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.call(req, false, ino, FsOp::Statfs, move |r| match r {
            Ok(FsReply::Statfs(s)) => {
                reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize)
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        n: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = match name(n) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.barrier();
        let (ttl, known, cached, writes) =
            (self.ttl, self.flags.clone(), self.cached.clone(), self.writes.clone());
        let flags = flags as u32;
        self.call(req, true, parent, FsOp::Create { name, flags, mode, umask }, move |r| match r {
            Ok(FsReply::Created { attr, fh }) => {
                cached.add(attr.node);
                // A reopen after a server restart must not create or truncate again.
                let reopen = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32;
                known.lock().unwrap_or_else(|p| p.into_inner()).insert(fh, reopen);
                if let Some(w) = &writes {
                    w.opened(fh, attr.node, flags as i32 & libc::O_ACCMODE != libc::O_RDONLY);
                }
                reply.created(&ttl.entry, &file_attr(&attr), Generation(0), FileHandle(fh), open_flags(flags))
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }
}

/// How the kernel treats an open file: O_DIRECT opens bypass its page cache.
fn open_flags(flags: u32) -> FopenFlags {
    if flags as i32 & libc::O_DIRECT != 0 {
        FopenFlags::FOPEN_DIRECT_IO
    } else {
        FopenFlags::empty()
    }
}

/// How long an unmount waits for writes still in flight.
const UNMOUNT_WRITES_WAIT: Duration = Duration::from_secs(30);

/// How `mount` serves an fs volume.
#[derive(Debug, Clone, Copy, Default)]
pub struct MountOptions {
    pub read_only: bool,
    pub ttl: Ttls,
    /// Every write waits for the server's answer (see `writes` for the default).
    pub sync_writes: bool,
}

/// The FUSE session settings for an fs volume.
pub fn config(name: &ferrovol_proto::VolumeName, read_only: bool) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("ferrovol:{name}")),
        fuser::MountOption::Subtype("ferrovol".into()),
        fuser::MountOption::DefaultPermissions,
        if read_only { fuser::MountOption::RO } else { fuser::MountOption::RW },
    ];
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        // Every user of the node sees it (permissions are checked as each caller).
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8));
    config.clone_fd = true;
    config
}

/// Mounts fs volume `name` at `dir` and serves it in the foreground until it is unmounted
/// (`ferrovol umount`, umount(8)) or SIGTERM/SIGINT unmounts it; `ready` runs once it is
/// mounted. The body of `ferrovol mount` and of the CSI node plugin's mount process.
pub fn mount(
    server: &str,
    opts: crate::ConnectOptions,
    name: &ferrovol_proto::VolumeName,
    dir: &Path,
    mo: MountOptions,
    ready: impl FnOnce(),
) -> Result<(), super::serve::ServeError> {
    use super::serve::ServeError;
    let shown = dir.display().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ferrovol-mount")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    // No polling for replies (FERROVOL_POLL_US sets a window): a file system's requests are
    // many small ones from a few threads, and a polling reader takes the CPU the FUSE threads and
    // the server need. On 2 vCPUs, against 100 us: 4 KiB random reads +50%, 1 MiB reads +3%, a
    // 22,337-file tar x 18% faster with half the mount's CPU (/tmp A/B, 2 rounds each).
    let mut opts = opts;
    opts.poll = Duration::from_micros(
        std::env::var("FERROVOL_POLL_US").ok().and_then(|v| v.parse().ok()).unwrap_or(0),
    );
    let session = rt.block_on(crate::Session::connect(server, opts))?;
    let info = rt.block_on(session.stat_volume(name))?;
    if info.kind != ferrovol_proto::codec::VOLUME_KIND_FS {
        return Err(ServeError::Client(ClientError::InvalidArgument(format!(
            "volume {name} is a block volume: attach it with `ferrovol attach {name} FILE` (mount takes fs volumes)"
        ))));
    }
    let vol = rt.block_on(session.open_fs(name, mo.read_only))?;
    let fs = FsFiles::new(vol, rt.handle().clone(), mo.ttl, mo.sync_writes);
    let watch = fs.watch();
    let writes = fs.writes.clone();
    let mut fuse = fuser::Session::new(fs, dir, &config(name, mo.read_only))
        .map_err(|source| ServeError::Mount { name: name.to_string(), path: shown.clone(), source })?;
    let mut unmounter = fuse.unmount_callable();
    super::serve::unmount_on_signal(&rt, &shown, move || unmounter.unmount());
    watch.start(fuse.notifier()).map_err(|source| ServeError::Session { path: shown.clone(), source })?;
    let _record =
        crate::host::record_serving(crate::host::Serving::started(dir, name.as_str(), server, mo.read_only))
            .map_err(|source| ServeError::Session { path: shown.clone(), source })?;
    tracing::info!(volume = %name, path = %shown, read_only = mo.read_only, "mounted");
    ready();
    let served = fuse.run().map_err(|source| ServeError::Session { path: shown.clone(), source });
    // Every close waited for its writes, but a write may still be in flight (one of a mapping
    // written back after the last close, or a lazy unmount): it ends before the connection
    // does, or, with the server away that long, is reported as lost.
    if let Some(w) = writes {
        let lost = w.barrier_for(UNMOUNT_WRITES_WAIT);
        if lost > 0 {
            tracing::error!(path = %shown, bytes = lost, "unmounted with writes the server never answered: they may be lost");
        }
    }
    served?;
    tracing::info!(path = %shown, "unmounted");
    drop(session);
    Ok(())
}
