//! The block-volume FUSE filesystem: the mount point (a regular file) *is* the volume, as with nbdfuse.
//!
//! A thin adapter (STYLE.md #8): each kernel request is answered from a task on the tokio runtime, so
//! many are in flight at once; `errno` is the one mapping from client errors to `Errno`. There is no
//! kernel inode state beyond the root, so a restarted client rebuilds nothing.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ferrovol_proto::Status;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags, KernelConfig,
    LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tracing::{debug, warn};

use crate::{ClientError, Volume};

pub mod abi;
pub mod files;
pub mod keep;
pub mod kernel;
mod own;
mod serve;
pub mod supervise;
pub mod writes;
pub use own::OwnBlockFile;
pub use serve::{config, serve, Access, ServeError};

/// Largest request the kernel may send (its limit here: 256 pages).
pub const MAX_WRITE: u32 = 1 << 20;
const TTL: Duration = Duration::from_secs(1);
/// fallocate(2) modes.
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// The one mapping from client errors to errno values.
pub fn errno_code(e: &ClientError) -> i32 {
    match e.status() {
        Some(Status::ReadOnly) => libc::EROFS,
        Some(Status::Fenced) => libc::EROFS,
        Some(Status::NoSpace) => libc::ENOSPC,
        Some(Status::OutOfRange) | Some(Status::InvalidArgument) => libc::EINVAL,
        _ => libc::EIO,
    }
}

/// [`errno_code`] for fuser.
pub fn errno(e: &ClientError) -> Errno {
    Errno::from_i32(errno_code(e))
}

#[derive(Debug)]
pub struct BlockFile {
    vol: Volume,
    rt: tokio::runtime::Handle,
    read_only: bool,
    uid: u32,
    gid: u32,
    created: SystemTime,
}

impl BlockFile {
    pub fn new(vol: Volume, rt: tokio::runtime::Handle, read_only: bool) -> Self {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Self { vol, rt, read_only, uid, gid, created: SystemTime::now() }
    }

    fn attr(&self, allocated: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: self.vol.size(),
            blocks: allocated.div_ceil(512),
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind: FileType::RegularFile,
            perm: if self.read_only { 0o444 } else { 0o644 },
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }

    /// The attributes with the allocated size from the server (`stat` shows thin provisioning).
    fn reply_attr(&self, reply: ReplyAttr) {
        let vol = self.vol.clone();
        let fallback = self.attr(0);
        self.rt.spawn(async move {
            // The size comes from the same STAT, so a volume grown on the server (CSI expansion)
            // shows its new size here, and `losetup -c` picks it up.
            match vol.stat().await {
                Ok(v) => {
                    reply.attr(&TTL, &FileAttr { blocks: v.allocated / 512, size: vol.size(), ..fallback })
                }
                Err(e) => {
                    debug!(error = %e, "stat failed; answering without allocation");
                    reply.attr(&TTL, &fallback)
                }
            }
        });
    }
}

impl Filesystem for BlockFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        // Several direct I/Os of one file reach us at once; large requests.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO | InitFlags::FUSE_MAX_PAGES);
        // The kernel keeps at most this many requests in flight per mount (default 12 / 9).
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        Ok(())
    }

    fn lookup(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::ENOTDIR);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        self.reply_attr(reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The size is the volume's: resize it with `ferrovol volume resize`, not truncate(2).
        if size.is_some_and(|s| s != self.vol.size()) {
            return reply.error(Errno::EPERM);
        }
        self.reply_attr(reply);
    }

    fn open(&self, _req: &Request, _ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // An O_DIRECT open (fio --direct=1, a loop device with direct-io) gets FOPEN_DIRECT_IO: only on
        // that path does the kernel honour FOPEN_PARALLEL_DIRECT_WRITES and let direct writes to the
        // one file run in parallel; through the page-cache path it takes the inode lock for each one,
        // which serialised them. Buffered opens keep the page cache.
        let mut fopen = FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        if flags.0 & libc::O_DIRECT != 0 {
            fopen |= FopenFlags::FOPEN_DIRECT_IO;
        }
        reply.opened(FileHandle(0), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = offset.saturating_add(u64::from(size)).min(self.vol.size());
        if offset >= end {
            return reply.data(&[]);
        }
        let len = usize::try_from(end - offset).unwrap_or(0);
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            match vol.read_at(offset, len).await {
                // Written to /dev/fuse straight from the received buffer.
                Ok(data) => reply.data(&data),
                Err(e) => {
                    warn!(offset, len, error = %e, "read failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > self.vol.size()) {
            return reply.error(if offset >= self.vol.size() { Errno::ENOSPC } else { Errno::EFBIG });
        }
        // fuser lends the request buffer only for this call: the one copy of a write on the client.
        let bytes = Bytes::copy_from_slice(data);
        let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            match vol.write_at(offset, bytes).await {
                Ok(()) => reply.written(n),
                Err(e) => {
                    warn!(offset, len = n, error = %e, "write failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        // close(2) promises nothing about durability; fsync does.
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let vol = self.vol.clone();
        self.rt.spawn(async move {
            match vol.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    warn!(error = %e, "fsync failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.read_only {
            return reply.error(Errno::EROFS);
        }
        if offset.checked_add(length).is_none_or(|end| end > self.vol.size()) {
            return reply.error(Errno::EINVAL);
        }
        let vol = self.vol.clone();
        let punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
        let zero = FALLOC_FL_ZERO_RANGE;
        match mode {
            // Plain allocation: the volume is thin, nothing to do and no data changes.
            0 | FALLOC_FL_KEEP_SIZE => reply.ok(),
            m if m == punch => {
                self.rt.spawn(async move {
                    match vol.trim(offset, length).await {
                        Ok(()) => reply.ok(),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
            m if m & !FALLOC_FL_KEEP_SIZE == zero => {
                self.rt.spawn(async move {
                    match vol.write_zeroes(offset, length).await {
                        Ok(()) => reply.ok(),
                        Err(e) => reply.error(errno(&e)),
                    }
                });
            }
            _ => reply.error(Errno::EOPNOTSUPP),
        }
    }

    /// No extended attributes (asked for by SELinux-aware tools on every open).
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.vol.size() / 4096;
        reply.statfs(blocks, 0, 0, 1, 0, 4096, 255, 4096);
    }
}
