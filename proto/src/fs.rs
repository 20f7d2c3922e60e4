//! File operations on fs volumes: the payloads of the `FS_*` opcodes (see PROTOCOL.md, "File
//! operations").
//!
//! Every FS request addresses an fs volume OPENed on the connection (header `handle`) and one of its
//! inodes (`node`, first in the payload), and carries the caller's credentials. A node is the
//! server filesystem's own file handle packed in a u64 (ext4: inode number and generation), so it
//! stays the same across server restarts and a client needs no table of its own; the root
//! directory is always [`NODE_ROOT`]. Names are bytes (not necessarily UTF-8), one path component.

use bytes::{BufMut, Bytes, BytesMut};

use crate::codec::{PayloadError, Reader};
use crate::limits::LIST_ENTRIES_MAX;
use crate::opcode::Opcode;

/// The root directory of every fs volume.
pub const NODE_ROOT: u64 = 1;
/// One path component.
pub const FS_NAME_LEN_MAX: usize = 255;
/// A symlink's target.
pub const FS_SYMLINK_LEN_MAX: usize = 4095;
/// Supplementary groups carried per request (more are cut: the first ones count).
pub const FS_GROUPS_MAX: usize = 32;
/// An extended attribute's name (with its namespace: `user.`, `trusted.`, `security.`...).
pub const FS_XATTR_NAME_MAX: usize = 255;
/// An extended attribute's value, and a LISTXATTR reply (the kernel's XATTR_SIZE_MAX).
pub const FS_XATTR_SIZE_MAX: usize = 65536;
/// The largest file whose bytes come with its read-only FS_OPEN (`FsReply::Opened`): most source
/// and configuration files, whose open + read is then one round trip, not two. A wasted inline
/// read (an open that never reads) costs the server a page-cache copy of at most this.
pub const FS_OPEN_INLINE_MAX: u32 = 16 * 1024;
/// SETXATTR flags (the values of setxattr(2)).
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;
/// Entries in one READDIR reply.
pub const FS_READDIR_ENTRIES_MAX: u32 = LIST_ENTRIES_MAX;

/// SETATTR `valid` bits: which fields to set.
pub const SETATTR_MODE: u32 = 1 << 0;
pub const SETATTR_UID: u32 = 1 << 1;
pub const SETATTR_GID: u32 = 1 << 2;
pub const SETATTR_SIZE: u32 = 1 << 3;
pub const SETATTR_ATIME: u32 = 1 << 4;
pub const SETATTR_MTIME: u32 = 1 << 5;
/// With `SETATTR_ATIME` / `SETATTR_MTIME`: the server's current time (utimensat UTIME_NOW).
pub const SETATTR_ATIME_NOW: u32 = 1 << 6;
pub const SETATTR_MTIME_NOW: u32 = 1 << 7;
const SETATTR_KNOWN: u32 = (1 << 8) - 1;

/// RENAME flags (the values of renameat2).
pub const RENAME_NOREPLACE: u32 = 1 << 0;
pub const RENAME_EXCHANGE: u32 = 1 << 1;

/// Lock types (the values of F_RDLCK, F_WRLCK, F_UNLCK).
pub const LOCK_READ: u32 = 0;
pub const LOCK_WRITE: u32 = 1;
pub const LOCK_UNLOCK: u32 = 2;

/// A byte-range lock: `start..=end` (`end` u64::MAX: to the end of the file, however it grows),
/// held by `owner` (the client's lock owner: a process's files, or one open file for flock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lock {
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    pub kind: u32,
    pub pid: u32,
}

/// Who asks: the operation runs with these credentials on the server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// A validated name: 1..=255 bytes, no `/` or NUL. Requests refuse `.` and `..` too (READDIR
/// replies carry them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FsName(Bytes);

impl FsName {
    pub fn new(b: impl Into<Bytes>) -> Result<Self, PayloadError> {
        let b = b.into();
        if b.is_empty() || b.len() > FS_NAME_LEN_MAX {
            return Err(PayloadError::Invalid("a name is 1 to 255 bytes"));
        }
        if b.contains(&b'/') || b.contains(&0) {
            return Err(PayloadError::Invalid("a name holds no '/' and no NUL"));
        }
        Ok(Self(b))
    }

    /// `.` or `..`.
    pub fn is_dot(&self) -> bool {
        &self.0[..] == b"." || &self.0[..] == b".."
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// What SETATTR changes (`valid` says which fields count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetAttr {
    pub valid: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    /// The open file the change comes through (ftruncate), 0 if none: lets the server truncate a
    /// file its caller opened for writing although its mode no longer allows writes.
    pub fh: u64,
}

/// One FS operation and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsOp {
    Lookup {
        name: FsName,
    },
    Getattr,
    Setattr(SetAttr),
    /// Entries after `cookie` (0: from the start), with their attributes (readdirplus).
    Readdir {
        cookie: u64,
        max_entries: u32,
    },
    Mkdir {
        name: FsName,
        mode: u32,
        umask: u32,
    },
    Mknod {
        name: FsName,
        mode: u32,
        umask: u32,
        rdev: u32,
    },
    /// Creates (O_CREAT, with the open `flags`) and opens.
    Create {
        name: FsName,
        flags: u32,
        mode: u32,
        umask: u32,
    },
    Open {
        flags: u32,
    },
    /// `flags`: the open flags of `fh`, for the server to open the file again after a restart.
    Read {
        fh: u64,
        flags: u32,
        offset: u64,
        len: u32,
    },
    Write {
        fh: u64,
        flags: u32,
        offset: u64,
        data: Bytes,
    },
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
        flags: u32,
        datasync: bool,
    },
    Unlink {
        name: FsName,
    },
    Rmdir {
        name: FsName,
    },
    Rename {
        name: FsName,
        new_parent: u64,
        new_name: FsName,
        flags: u32,
    },
    /// A new name in `new_parent` for `node`.
    Link {
        new_parent: u64,
        new_name: FsName,
    },
    Symlink {
        name: FsName,
        target: Bytes,
    },
    Readlink,
    Statfs,
    /// The first lock that would conflict with `lock` (or `kind` UNLOCK: none).
    Getlk {
        lock: Lock,
    },
    /// Takes or releases `lock`, without waiting: a conflict is errno EAGAIN. A client waits for
    /// a lock by asking again (as NFSv4 clients do), so a waiter the application abandons (a
    /// signal) leaves nothing behind on the server.
    Setlk {
        lock: Lock,
    },
    /// `owner` closed a file of the inode: its locks there go (POSIX: any close drops them).
    Flush {
        owner: u64,
    },
    /// fallocate(2) on an open file: `mode` its flags (KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE...).
    Fallocate {
        fh: u64,
        flags: u32,
        mode: u32,
        offset: u64,
        len: u64,
    },
    /// lseek(2) SEEK_DATA (3) or SEEK_HOLE (4) from `offset`.
    Lseek {
        fh: u64,
        flags: u32,
        offset: u64,
        whence: u32,
    },
    /// copy_file_range(2) from this node's `fh` to `out_node`'s `out_fh`, on the server.
    CopyRange {
        fh: u64,
        flags: u32,
        offset: u64,
        out_node: u64,
        out_fh: u64,
        out_flags: u32,
        out_offset: u64,
        len: u64,
    },
    /// The whole value (at most `FS_XATTR_SIZE_MAX`); the client answers size queries from it.
    Getxattr {
        name: Bytes,
    },
    Setxattr {
        name: Bytes,
        value: Bytes,
        flags: u32,
    },
    /// The names, each NUL-terminated, as listxattr(2) gives them.
    Listxattr,
    Removexattr {
        name: Bytes,
    },
}

impl FsOp {
    pub fn opcode(&self) -> Opcode {
        match self {
            FsOp::Lookup { .. } => Opcode::FsLookup,
            FsOp::Getattr => Opcode::FsGetattr,
            FsOp::Setattr(_) => Opcode::FsSetattr,
            FsOp::Readdir { .. } => Opcode::FsReaddir,
            FsOp::Mkdir { .. } => Opcode::FsMkdir,
            FsOp::Mknod { .. } => Opcode::FsMknod,
            FsOp::Create { .. } => Opcode::FsCreate,
            FsOp::Open { .. } => Opcode::FsOpen,
            FsOp::Read { .. } => Opcode::FsRead,
            FsOp::Write { .. } => Opcode::FsWrite,
            FsOp::Release { .. } => Opcode::FsRelease,
            FsOp::Fsync { .. } => Opcode::FsFsync,
            FsOp::Unlink { .. } => Opcode::FsUnlink,
            FsOp::Rmdir { .. } => Opcode::FsRmdir,
            FsOp::Rename { .. } => Opcode::FsRename,
            FsOp::Link { .. } => Opcode::FsLink,
            FsOp::Symlink { .. } => Opcode::FsSymlink,
            FsOp::Readlink => Opcode::FsReadlink,
            FsOp::Statfs => Opcode::FsStatfs,
            FsOp::Getlk { .. } => Opcode::FsGetlk,
            FsOp::Setlk { .. } => Opcode::FsSetlk,
            FsOp::Flush { .. } => Opcode::FsFlush,
            FsOp::Fallocate { .. } => Opcode::FsFallocate,
            FsOp::Lseek { .. } => Opcode::FsLseek,
            FsOp::CopyRange { .. } => Opcode::FsCopyRange,
            FsOp::Getxattr { .. } => Opcode::FsGetxattr,
            FsOp::Setxattr { .. } => Opcode::FsSetxattr,
            FsOp::Listxattr => Opcode::FsListxattr,
            FsOp::Removexattr { .. } => Opcode::FsRemovexattr,
        }
    }

    /// Whether doing it twice is the same as once, so that a request in flight across a reconnect
    /// may be sent again. The others fail with the connection instead: a re-sent RENAME_EXCHANGE
    /// would swap back, an O_APPEND write land twice, an UNLINK remove a file made meanwhile.
    pub fn idempotent(&self) -> bool {
        match self {
            FsOp::Lookup { .. }
            | FsOp::Getattr
            | FsOp::Setattr(_)
            | FsOp::Readdir { .. }
            | FsOp::Open { .. }
            | FsOp::Read { .. }
            | FsOp::Release { .. }
            | FsOp::Fsync { .. }
            | FsOp::Readlink
            | FsOp::Statfs
            | FsOp::Getlk { .. }
            | FsOp::Setlk { .. }
            | FsOp::Flush { .. }
            | FsOp::Lseek { .. }
            | FsOp::Fallocate { .. }
            | FsOp::CopyRange { .. }
            | FsOp::Getxattr { .. }
            | FsOp::Listxattr => true,
            // XATTR_CREATE fails the second time; a plain set or a replace does not.
            FsOp::Setxattr { flags, .. } => flags & XATTR_CREATE == 0,
            FsOp::Removexattr { .. } => false,
            // 0o2000: O_APPEND.
            FsOp::Write { flags, .. } => flags & 0o2000 == 0,
            FsOp::Mkdir { .. } | FsOp::Mknod { .. } | FsOp::Create { .. } => false,
            FsOp::Unlink { .. }
            | FsOp::Rmdir { .. }
            | FsOp::Rename { .. }
            | FsOp::Link { .. }
            | FsOp::Symlink { .. } => false,
        }
    }

    /// Payload bytes this operation puts in flight (READ length, WRITE data).
    pub fn data_len(&self) -> u32 {
        match self {
            FsOp::Read { len, .. } => *len,
            FsOp::Write { data, .. } => u32::try_from(data.len()).unwrap_or(u32::MAX),
            _ => 0,
        }
    }
}

/// Attributes of an inode (a `stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub node: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// Type and permission bits, as in st_mode.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// Encoded size of an [`Attr`].
pub const ATTR_LEN: usize = 8 * 3 + 12 * 3 + 4 * 6;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Where the next READDIR starts to continue after this entry.
    pub cookie: u64,
    pub name: FsName,
    pub attr: Attr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStat {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// The answer to an FS operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsReply {
    /// LOOKUP, MKDIR, MKNOD, LINK, SYMLINK: the inode (its node is in the attributes).
    Entry(Attr),
    /// GETATTR, SETATTR.
    Attr(Attr),
    /// CREATE.
    Created {
        attr: Attr,
        fh: u64,
    },
    /// OPEN: the new fh, and the file's attributes as of the open (the client answers the
    /// kernel's next GETATTR with them instead of another round trip). For a read-only open of a
    /// regular file of at most [`FS_OPEN_INLINE_MAX`] bytes, `data` is the whole file as of the
    /// open (`attr.size` bytes), so its first READ needs no round trip either; empty otherwise.
    Opened {
        attr: Attr,
        fh: u64,
        data: Bytes,
    },
    Dir {
        entries: Vec<DirEntry>,
        eof: bool,
    },
    /// WRITE: bytes written.
    Written(u32),
    Statfs(FsStat),
    /// READ, READLINK, GETXATTR, LISTXATTR.
    Data(Bytes),
    /// GETLK: the conflicting lock (`kind` UNLOCK: none).
    Lock(Lock),
    /// LSEEK: the offset found.
    Offset(u64),
    /// RELEASE, FSYNC, UNLINK, RMDIR, RENAME.
    Done,
}

fn put_time(p: &mut BytesMut, (s, ns): (i64, u32)) {
    p.put_i64_le(s);
    p.put_u32_le(ns);
}

fn get_time(r: &mut Reader<'_>) -> Result<(i64, u32), PayloadError> {
    let s = r.u64()? as i64;
    let ns = r.u32()?;
    if ns >= 1_000_000_000 {
        return Err(PayloadError::Invalid("nanoseconds out of range"));
    }
    Ok((s, ns))
}

fn put_name(p: &mut BytesMut, n: &FsName) {
    // At most 255 bytes (checked by FsName::new).
    p.put_u8(u8::try_from(n.0.len()).unwrap_or(u8::MAX));
    p.put_slice(&n.0[..n.0.len().min(255)]);
}

/// A name in a request: never `.` or `..`.
fn get_name(r: &mut Reader<'_>) -> Result<FsName, PayloadError> {
    let n = get_entry_name(r)?;
    if n.is_dot() {
        return Err(PayloadError::Invalid("a name is not '.' or '..'"));
    }
    Ok(n)
}

fn get_entry_name(r: &mut Reader<'_>) -> Result<FsName, PayloadError> {
    let len = usize::from(r.u8()?);
    FsName::new(Bytes::copy_from_slice(r.take(len)?))
}

pub fn put_attr(p: &mut BytesMut, a: &Attr) {
    p.put_u64_le(a.node);
    p.put_u64_le(a.size);
    p.put_u64_le(a.blocks);
    put_time(p, a.atime);
    put_time(p, a.mtime);
    put_time(p, a.ctime);
    p.put_u32_le(a.mode);
    p.put_u32_le(a.nlink);
    p.put_u32_le(a.uid);
    p.put_u32_le(a.gid);
    p.put_u32_le(a.rdev);
    p.put_u32_le(a.blksize);
}

fn get_attr(r: &mut Reader<'_>) -> Result<Attr, PayloadError> {
    Ok(Attr {
        node: r.u64()?,
        size: r.u64()?,
        blocks: r.u64()?,
        atime: get_time(r)?,
        mtime: get_time(r)?,
        ctime: get_time(r)?,
        mode: r.u32()?,
        nlink: r.u32()?,
        uid: r.u32()?,
        gid: r.u32()?,
        rdev: r.u32()?,
        blksize: r.u32()?,
    })
}

/// The payload before the data of an FS request: node, credentials, then the operation's fields.
/// For WRITE the data follows (sent as a second slice, never copied); READ and WRITE carry their
/// offset and length in the header.
pub(crate) fn encode_request(node: u64, creds: &Creds, op: &FsOp) -> BytesMut {
    let mut p = BytesMut::with_capacity(64);
    p.put_u64_le(node);
    p.put_u32_le(creds.uid);
    p.put_u32_le(creds.gid);
    let groups = &creds.groups[..creds.groups.len().min(FS_GROUPS_MAX)];
    p.put_u8(u8::try_from(groups.len()).unwrap_or(0));
    for g in groups {
        p.put_u32_le(*g);
    }
    match op {
        FsOp::Lookup { name } | FsOp::Unlink { name } | FsOp::Rmdir { name } => put_name(&mut p, name),
        FsOp::Getattr | FsOp::Readlink | FsOp::Statfs => {}
        FsOp::Setattr(s) => {
            p.put_u32_le(s.valid);
            p.put_u32_le(s.mode);
            p.put_u32_le(s.uid);
            p.put_u32_le(s.gid);
            p.put_u64_le(s.size);
            put_time(&mut p, s.atime);
            put_time(&mut p, s.mtime);
            p.put_u64_le(s.fh);
        }
        FsOp::Readdir { cookie, max_entries } => {
            p.put_u64_le(*cookie);
            p.put_u32_le(*max_entries);
        }
        FsOp::Mkdir { name, mode, umask } => {
            p.put_u32_le(*mode);
            p.put_u32_le(*umask);
            put_name(&mut p, name);
        }
        FsOp::Mknod { name, mode, umask, rdev } => {
            p.put_u32_le(*mode);
            p.put_u32_le(*umask);
            p.put_u32_le(*rdev);
            put_name(&mut p, name);
        }
        FsOp::Create { name, flags, mode, umask } => {
            p.put_u32_le(*flags);
            p.put_u32_le(*mode);
            p.put_u32_le(*umask);
            put_name(&mut p, name);
        }
        FsOp::Open { flags } => p.put_u32_le(*flags),
        FsOp::Read { fh, flags, .. } | FsOp::Write { fh, flags, .. } => {
            p.put_u64_le(*fh);
            p.put_u32_le(*flags);
        }
        FsOp::Release { fh } => p.put_u64_le(*fh),
        FsOp::Fsync { fh, flags, datasync } => {
            p.put_u64_le(*fh);
            p.put_u32_le(*flags);
            p.put_u8(u8::from(*datasync));
        }
        FsOp::Rename { name, new_parent, new_name, flags } => {
            p.put_u32_le(*flags);
            p.put_u64_le(*new_parent);
            put_name(&mut p, name);
            put_name(&mut p, new_name);
        }
        FsOp::Link { new_parent, new_name } => {
            p.put_u64_le(*new_parent);
            put_name(&mut p, new_name);
        }
        FsOp::Symlink { name, target } => {
            put_name(&mut p, name);
            p.put_u16_le(u16::try_from(target.len()).unwrap_or(u16::MAX));
            p.put_slice(target);
        }
        FsOp::Getlk { lock } => put_lock(&mut p, lock),
        FsOp::Setlk { lock } => put_lock(&mut p, lock),
        FsOp::Flush { owner } => p.put_u64_le(*owner),
        FsOp::Fallocate { fh, flags, mode, offset, len } => {
            p.put_u64_le(*fh);
            p.put_u32_le(*flags);
            p.put_u32_le(*mode);
            p.put_u64_le(*offset);
            p.put_u64_le(*len);
        }
        FsOp::Lseek { fh, flags, offset, whence } => {
            p.put_u64_le(*fh);
            p.put_u32_le(*flags);
            p.put_u64_le(*offset);
            p.put_u32_le(*whence);
        }
        FsOp::CopyRange { fh, flags, offset, out_node, out_fh, out_flags, out_offset, len } => {
            p.put_u64_le(*fh);
            p.put_u32_le(*flags);
            p.put_u64_le(*offset);
            p.put_u64_le(*out_node);
            p.put_u64_le(*out_fh);
            p.put_u32_le(*out_flags);
            p.put_u64_le(*out_offset);
            p.put_u64_le(*len);
        }
        FsOp::Getxattr { name } | FsOp::Removexattr { name } => put_xattr_name(&mut p, name),
        FsOp::Setxattr { name, value, flags } => {
            p.put_u32_le(*flags);
            put_xattr_name(&mut p, name);
            p.put_u32_le(u32::try_from(value.len()).unwrap_or(u32::MAX));
            p.put_slice(value);
        }
        FsOp::Listxattr => {}
    }
    p
}

fn put_xattr_name(p: &mut BytesMut, n: &Bytes) {
    // At most 255 bytes (checked where the op is made: `xattr_name`).
    p.put_u8(u8::try_from(n.len()).unwrap_or(u8::MAX));
    p.put_slice(&n[..n.len().min(FS_XATTR_NAME_MAX)]);
}

/// An extended attribute's name as the wire carries it: 1 to 255 bytes, no NUL.
pub fn xattr_name(name: &[u8]) -> Result<Bytes, PayloadError> {
    if name.is_empty() || name.len() > FS_XATTR_NAME_MAX || name.contains(&0) {
        return Err(PayloadError::Invalid("an xattr name is 1 to 255 bytes without NUL"));
    }
    Ok(Bytes::copy_from_slice(name))
}

fn get_xattr_name(r: &mut Reader<'_>) -> Result<Bytes, PayloadError> {
    let len = usize::from(r.u8()?);
    xattr_name(r.take(len)?)
}

fn put_lock(p: &mut BytesMut, l: &Lock) {
    p.put_u64_le(l.owner);
    p.put_u64_le(l.start);
    p.put_u64_le(l.end);
    p.put_u32_le(l.kind);
    p.put_u32_le(l.pid);
}

fn get_lock(r: &mut Reader<'_>) -> Result<Lock, PayloadError> {
    let l = Lock { owner: r.u64()?, start: r.u64()?, end: r.u64()?, kind: r.u32()?, pid: r.u32()? };
    if l.kind > LOCK_UNLOCK {
        return Err(PayloadError::Invalid("lock type is 0 (read), 1 (write) or 2 (unlock)"));
    }
    if l.end < l.start {
        return Err(PayloadError::Invalid("a lock ends before it starts"));
    }
    Ok(l)
}

/// Parses an FS request payload. `offset`/`length` come from the header; `payload` is the whole
/// payload (a WRITE's data is split off it, not copied). The reader is left at the end.
pub(crate) fn parse_request(
    op: Opcode,
    offset: u64,
    length: u32,
    payload: &Bytes,
    r: &mut Reader<'_>,
) -> Result<(u64, Creds, FsOp), PayloadError> {
    let node = r.u64()?;
    if node == 0 {
        return Err(PayloadError::Invalid("node 0 does not exist"));
    }
    let uid = r.u32()?;
    let gid = r.u32()?;
    if uid == u32::MAX || gid == u32::MAX {
        // -1 means "unchanged" to setfsuid: the operation would run as the server.
        return Err(PayloadError::Invalid("uid and gid 4294967295 are not ids"));
    }
    let n = usize::from(r.u8()?);
    if n > FS_GROUPS_MAX {
        return Err(PayloadError::TooLong { len: n, max: FS_GROUPS_MAX });
    }
    let mut groups = Vec::with_capacity(n);
    for _ in 0..n {
        groups.push(r.u32()?);
    }
    let creds = Creds { uid, gid, groups };
    let fsop = match op {
        Opcode::FsLookup => FsOp::Lookup { name: get_name(r)? },
        Opcode::FsUnlink => FsOp::Unlink { name: get_name(r)? },
        Opcode::FsRmdir => FsOp::Rmdir { name: get_name(r)? },
        Opcode::FsGetattr => FsOp::Getattr,
        Opcode::FsReadlink => FsOp::Readlink,
        Opcode::FsStatfs => FsOp::Statfs,
        Opcode::FsSetattr => {
            let s = SetAttr {
                valid: r.u32()?,
                mode: r.u32()?,
                uid: r.u32()?,
                gid: r.u32()?,
                size: r.u64()?,
                atime: get_time(r)?,
                mtime: get_time(r)?,
                fh: r.u64()?,
            };
            if s.valid & !SETATTR_KNOWN != 0 {
                return Err(PayloadError::Invalid("unknown SETATTR bits"));
            }
            FsOp::Setattr(s)
        }
        Opcode::FsReaddir => {
            let cookie = r.u64()?;
            let max_entries = r.u32()?;
            if max_entries == 0 || max_entries > FS_READDIR_ENTRIES_MAX {
                return Err(PayloadError::Invalid("max_entries must be 1..=256"));
            }
            FsOp::Readdir { cookie, max_entries }
        }
        Opcode::FsMkdir => {
            let (mode, umask) = (r.u32()?, r.u32()?);
            FsOp::Mkdir { mode, umask, name: get_name(r)? }
        }
        Opcode::FsMknod => {
            let (mode, umask, rdev) = (r.u32()?, r.u32()?, r.u32()?);
            FsOp::Mknod { mode, umask, rdev, name: get_name(r)? }
        }
        Opcode::FsCreate => {
            let (flags, mode, umask) = (r.u32()?, r.u32()?, r.u32()?);
            FsOp::Create { flags, mode, umask, name: get_name(r)? }
        }
        Opcode::FsOpen => FsOp::Open { flags: r.u32()? },
        Opcode::FsRead => {
            let (fh, flags) = (r.u64()?, r.u32()?);
            if length > crate::limits::READ_LEN_MAX {
                return Err(PayloadError::TooLong {
                    len: length as usize,
                    max: crate::limits::READ_LEN_MAX as usize,
                });
            }
            FsOp::Read { fh, flags, offset, len: length }
        }
        Opcode::FsWrite => {
            let (fh, flags) = (r.u64()?, r.u32()?);
            let rest = r.remaining();
            if rest != length as usize {
                return Err(PayloadError::Invalid("FS_WRITE length differs from its data"));
            }
            let data = payload.slice(payload.len() - rest..);
            r.take(rest)?;
            FsOp::Write { fh, flags, offset, data }
        }
        Opcode::FsRelease => FsOp::Release { fh: r.u64()? },
        Opcode::FsFsync => {
            let (fh, flags) = (r.u64()?, r.u32()?);
            let datasync = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(PayloadError::Invalid("datasync is 0 or 1")),
            };
            FsOp::Fsync { fh, flags, datasync }
        }
        Opcode::FsRename => {
            let flags = r.u32()?;
            if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
                || flags == RENAME_NOREPLACE | RENAME_EXCHANGE
            {
                return Err(PayloadError::Invalid("RENAME flags: NOREPLACE or EXCHANGE, not both"));
            }
            let new_parent = r.u64()?;
            FsOp::Rename { flags, new_parent, name: get_name(r)?, new_name: get_name(r)? }
        }
        Opcode::FsLink => FsOp::Link { new_parent: r.u64()?, new_name: get_name(r)? },
        Opcode::FsSymlink => {
            let name = get_name(r)?;
            let len = usize::from(r.u16()?);
            if len == 0 || len > FS_SYMLINK_LEN_MAX {
                return Err(PayloadError::Invalid("a symlink target is 1 to 4095 bytes"));
            }
            let target = Bytes::copy_from_slice(r.take(len)?);
            if target.contains(&0) {
                return Err(PayloadError::Invalid("a symlink target holds no NUL"));
            }
            FsOp::Symlink { name, target }
        }
        Opcode::FsGetlk => FsOp::Getlk { lock: get_lock(r)? },
        Opcode::FsSetlk => FsOp::Setlk { lock: get_lock(r)? },
        Opcode::FsFlush => FsOp::Flush { owner: r.u64()? },
        Opcode::FsFallocate => {
            FsOp::Fallocate { fh: r.u64()?, flags: r.u32()?, mode: r.u32()?, offset: r.u64()?, len: r.u64()? }
        }
        Opcode::FsLseek => {
            let (fh, flags, offset, whence) = (r.u64()?, r.u32()?, r.u64()?, r.u32()?);
            if whence != 3 && whence != 4 {
                return Err(PayloadError::Invalid("FS_LSEEK takes SEEK_DATA (3) or SEEK_HOLE (4)"));
            }
            FsOp::Lseek { fh, flags, offset, whence }
        }
        Opcode::FsCopyRange => {
            let (fh, flags, offset) = (r.u64()?, r.u32()?, r.u64()?);
            let out_node = r.u64()?;
            if out_node == 0 {
                return Err(PayloadError::Invalid("node 0 does not exist"));
            }
            FsOp::CopyRange {
                fh,
                flags,
                offset,
                out_node,
                out_fh: r.u64()?,
                out_flags: r.u32()?,
                out_offset: r.u64()?,
                len: r.u64()?,
            }
        }
        Opcode::FsGetxattr => FsOp::Getxattr { name: get_xattr_name(r)? },
        Opcode::FsRemovexattr => FsOp::Removexattr { name: get_xattr_name(r)? },
        Opcode::FsListxattr => FsOp::Listxattr,
        Opcode::FsSetxattr => {
            let flags = r.u32()?;
            if flags & !(XATTR_CREATE | XATTR_REPLACE) != 0 || flags == XATTR_CREATE | XATTR_REPLACE {
                return Err(PayloadError::Invalid("SETXATTR flags: CREATE or REPLACE, not both"));
            }
            let name = get_xattr_name(r)?;
            let len = r.u32()? as usize;
            if len > FS_XATTR_SIZE_MAX {
                return Err(PayloadError::TooLong { len, max: FS_XATTR_SIZE_MAX });
            }
            let value = payload.slice(payload.len() - r.remaining()..).slice(..len.min(r.remaining()));
            r.take(len)?;
            FsOp::Setxattr { name, value, flags }
        }
        _ => return Err(PayloadError::Invalid("not an FS opcode")),
    };
    if !matches!(op, Opcode::FsRead | Opcode::FsWrite) && (offset != 0 || length != 0) {
        return Err(PayloadError::Invalid("unused header fields must be zero"));
    }
    Ok((node, creds, fsop))
}

/// Notices in one FS_NOTIFY frame.
pub const FS_NOTICES_MAX: usize = 1024;

/// What another client changed, for a client to drop from its caches (the kernel's, through FUSE
/// notifications).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The inode's attributes changed, and (`offset` >= 0) its data in `offset..offset + len`
    /// (`len` <= 0: to the end of the file).
    Inode { node: u64, offset: i64, len: i64 },
    /// `name` in directory `parent` was created, removed or renamed.
    Entry { parent: u64, name: FsName },
    /// `name` in `parent`, which was `child`, was removed.
    Delete { parent: u64, child: u64, name: FsName },
    /// Anything may have changed (notices were lost): drop everything cached.
    All,
}

const NOTICE_INODE: u8 = 1;
const NOTICE_ENTRY: u8 = 2;
const NOTICE_DELETE: u8 = 3;
const NOTICE_ALL: u8 = 4;

/// The payload of an FS_NOTIFY frame: notices for the fs volume open as `handle`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notices {
    pub handle: crate::types::VolumeHandle,
    pub notices: Vec<Notice>,
}

pub(crate) fn put_notices(p: &mut BytesMut, n: &Notices) {
    let notices = &n.notices[..n.notices.len().min(FS_NOTICES_MAX)];
    p.put_u32_le(n.handle.0);
    // At most FS_NOTICES_MAX.
    p.put_u16_le(u16::try_from(notices.len()).unwrap_or(u16::MAX));
    for notice in notices {
        match notice {
            Notice::Inode { node, offset, len } => {
                p.put_u8(NOTICE_INODE);
                p.put_u64_le(*node);
                p.put_i64_le(*offset);
                p.put_i64_le(*len);
            }
            Notice::Entry { parent, name } => {
                p.put_u8(NOTICE_ENTRY);
                p.put_u64_le(*parent);
                put_name(p, name);
            }
            Notice::Delete { parent, child, name } => {
                p.put_u8(NOTICE_DELETE);
                p.put_u64_le(*parent);
                p.put_u64_le(*child);
                put_name(p, name);
            }
            Notice::All => p.put_u8(NOTICE_ALL),
        }
    }
}

pub(crate) fn get_notices(r: &mut Reader<'_>) -> Result<Notices, PayloadError> {
    let handle = crate::types::VolumeHandle(r.u32()?);
    let n = usize::from(r.u16()?);
    if n > FS_NOTICES_MAX {
        return Err(PayloadError::Invalid("too many notices"));
    }
    let mut notices = Vec::with_capacity(n);
    for _ in 0..n {
        notices.push(match r.u8()? {
            NOTICE_INODE => Notice::Inode { node: r.u64()?, offset: r.u64()? as i64, len: r.u64()? as i64 },
            NOTICE_ENTRY => Notice::Entry { parent: r.u64()?, name: get_name(r)? },
            NOTICE_DELETE => Notice::Delete { parent: r.u64()?, child: r.u64()?, name: get_name(r)? },
            NOTICE_ALL => Notice::All,
            _ => return Err(PayloadError::Invalid("unknown notice kind")),
        });
    }
    Ok(Notices { handle, notices })
}

pub(crate) fn encode_reply(p: &mut BytesMut, reply: &FsReply) -> Option<Bytes> {
    match reply {
        FsReply::Entry(a) | FsReply::Attr(a) => put_attr(p, a),
        FsReply::Created { attr, fh } => {
            put_attr(p, attr);
            p.put_u64_le(*fh);
        }
        FsReply::Opened { attr, fh, data } => {
            put_attr(p, attr);
            p.put_u64_le(*fh);
            // At most FS_OPEN_INLINE_MAX bytes: one small copy, in the frame it travels in.
            p.extend_from_slice(data);
        }
        FsReply::Dir { entries, eof } => {
            p.put_u32_le(u32::try_from(entries.len()).unwrap_or(u32::MAX));
            p.put_u8(u8::from(*eof));
            for e in entries {
                p.put_u64_le(e.cookie);
                put_name(p, &e.name);
                put_attr(p, &e.attr);
            }
        }
        FsReply::Written(n) => p.put_u32_le(*n),
        FsReply::Statfs(s) => {
            p.put_u64_le(s.blocks);
            p.put_u64_le(s.bfree);
            p.put_u64_le(s.bavail);
            p.put_u64_le(s.files);
            p.put_u64_le(s.ffree);
            p.put_u32_le(s.bsize);
            p.put_u32_le(s.namelen);
            p.put_u32_le(s.frsize);
        }
        // The payload itself (READ data: the buffer pread filled, no copy).
        FsReply::Data(d) => return Some(d.clone()),
        FsReply::Lock(l) => put_lock(p, l),
        FsReply::Offset(o) => p.put_u64_le(*o),
        FsReply::Done => {}
    }
    None
}

pub(crate) fn parse_reply(op: Opcode, payload: &Bytes, r: &mut Reader<'_>) -> Result<FsReply, PayloadError> {
    Ok(match op {
        Opcode::FsLookup | Opcode::FsMkdir | Opcode::FsMknod | Opcode::FsLink | Opcode::FsSymlink => {
            FsReply::Entry(get_attr(r)?)
        }
        Opcode::FsGetattr | Opcode::FsSetattr => FsReply::Attr(get_attr(r)?),
        Opcode::FsCreate => FsReply::Created { attr: get_attr(r)?, fh: r.u64()? },
        Opcode::FsOpen => {
            let (attr, fh) = (get_attr(r)?, r.u64()?);
            let n = r.remaining();
            if n > FS_OPEN_INLINE_MAX as usize {
                return Err(PayloadError::TooLong { len: n, max: FS_OPEN_INLINE_MAX as usize });
            }
            if n != 0 && n as u64 != attr.size {
                return Err(PayloadError::Invalid("inline data is not the whole file"));
            }
            r.take(n)?;
            FsReply::Opened { attr, fh, data: payload.slice(payload.len() - n..) }
        }
        Opcode::FsReaddir => {
            let n = r.u32()?;
            if n > FS_READDIR_ENTRIES_MAX {
                return Err(PayloadError::Invalid("too many directory entries"));
            }
            let eof = r.u8()? != 0;
            let mut entries = Vec::with_capacity(n as usize);
            for _ in 0..n {
                entries.push(DirEntry { cookie: r.u64()?, name: get_entry_name(r)?, attr: get_attr(r)? });
            }
            FsReply::Dir { entries, eof }
        }
        Opcode::FsWrite => FsReply::Written(r.u32()?),
        Opcode::FsStatfs => FsReply::Statfs(FsStat {
            blocks: r.u64()?,
            bfree: r.u64()?,
            bavail: r.u64()?,
            files: r.u64()?,
            ffree: r.u64()?,
            bsize: r.u32()?,
            namelen: r.u32()?,
            frsize: r.u32()?,
        }),
        Opcode::FsGetlk => FsReply::Lock(get_lock(r)?),
        Opcode::FsLseek => FsReply::Offset(r.u64()?),
        Opcode::FsCopyRange => FsReply::Written(r.u32()?),
        Opcode::FsRead | Opcode::FsReadlink | Opcode::FsGetxattr | Opcode::FsListxattr => {
            r.take(r.remaining())?;
            FsReply::Data(payload.clone())
        }
        _ => FsReply::Done,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::codec::{split_request, split_response, Reply, Request, Response};
    use crate::types::{RequestId, VolumeHandle};

    fn n(s: &str) -> FsName {
        FsName::new(Bytes::copy_from_slice(s.as_bytes())).unwrap()
    }

    fn round_trip(op: FsOp) {
        let req = Request::Fs {
            handle: VolumeHandle(4),
            node: 0x1234_5678_9abc,
            creds: Creds { uid: 7, gid: 8, groups: vec![1, 2, 3] },
            op,
        };
        let mut buf = BytesMut::from(&req.encode(RequestId(1)).to_bytes()[..]);
        let (_, back) = Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn every_request_round_trips() {
        let attr = SetAttr {
            valid: SETATTR_MODE | SETATTR_MTIME,
            mode: 0o644,
            mtime: (-5, 7),
            ..SetAttr::default()
        };
        for op in [
            FsOp::Lookup { name: n("a") },
            FsOp::Getattr,
            FsOp::Setattr(attr),
            FsOp::Readdir { cookie: 99, max_entries: 10 },
            FsOp::Mkdir { name: n("d"), mode: 0o755, umask: 0o22 },
            FsOp::Mknod { name: n("p"), mode: 0o010_600, umask: 0, rdev: 0 },
            FsOp::Create { name: n("f"), flags: 0o1101, mode: 0o600, umask: 0o77 },
            FsOp::Open { flags: 2 },
            FsOp::Read { fh: 5, flags: 0, offset: 1 << 40, len: 4096 },
            FsOp::Write { fh: 5, flags: 1, offset: 3, data: Bytes::from_static(b"xyz") },
            FsOp::Release { fh: 5 },
            FsOp::Fsync { fh: 5, flags: 0, datasync: true },
            FsOp::Unlink { name: n("f") },
            FsOp::Rmdir { name: n("d") },
            FsOp::Rename { name: n("a"), new_parent: 1, new_name: n("b"), flags: RENAME_EXCHANGE },
            FsOp::Link { new_parent: 1, new_name: n("h") },
            FsOp::Symlink { name: n("s"), target: Bytes::from_static(b"../t") },
            FsOp::Readlink,
            FsOp::Statfs,
            FsOp::Getlk { lock: Lock { owner: 1, start: 0, end: u64::MAX, kind: LOCK_WRITE, pid: 9 } },
            FsOp::Setlk { lock: Lock { owner: 1, start: 5, end: 9, kind: LOCK_READ, pid: 0 } },
            FsOp::Flush { owner: 1 },
            FsOp::Fallocate { fh: 2, flags: 2, mode: 3, offset: 4096, len: 8192 },
            FsOp::Lseek { fh: 2, flags: 0, offset: 10, whence: 4 },
            FsOp::CopyRange {
                fh: 2,
                flags: 0,
                offset: 0,
                out_node: 77,
                out_fh: 3,
                out_flags: 1,
                out_offset: 5,
                len: 1 << 30,
            },
            FsOp::Getxattr { name: Bytes::from_static(b"user.a/b") },
            FsOp::Setxattr {
                name: Bytes::from_static(b"user.x"),
                value: Bytes::from_static(b"v\0w"),
                flags: 2,
            },
            FsOp::Setxattr { name: Bytes::from_static(b"trusted.y"), value: Bytes::new(), flags: 0 },
            FsOp::Listxattr,
            FsOp::Removexattr { name: Bytes::from_static(b"user.x") },
        ] {
            round_trip(op);
        }
    }

    #[test]
    fn xattr_requests_refuse_bad_names_values_and_flags() {
        assert!(xattr_name(b"").is_err());
        assert!(xattr_name(b"user.a\0b").is_err());
        assert!(xattr_name(&[b'u'; 256]).is_err());
        assert!(xattr_name(&[b'u'; 255]).is_ok());
        let encode = |op: FsOp| {
            let req = Request::Fs { handle: VolumeHandle(1), node: 1, creds: Creds::default(), op };
            BytesMut::from(&req.encode(RequestId(1)).to_bytes()[..])
        };
        let both = FsOp::Setxattr { name: Bytes::from_static(b"user.a"), value: Bytes::new(), flags: 3 };
        let big = FsOp::Setxattr {
            name: Bytes::from_static(b"user.a"),
            value: Bytes::from(vec![0u8; FS_XATTR_SIZE_MAX + 1]),
            flags: 0,
        };
        let nul = FsOp::Getxattr { name: Bytes::from_static(b"user.\0") };
        for (op, status) in [
            (both, crate::Status::BadRequest),
            (big, crate::Status::TooLarge),
            (nul, crate::Status::BadRequest),
        ] {
            let mut buf = encode(op);
            let e = Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap_err();
            assert_eq!(e.status, status, "{}", e.message);
        }
    }

    #[test]
    fn every_reply_round_trips() {
        let a = Attr { node: 9, size: 10, mode: 0o100_644, atime: (1, 2), ..Attr::default() };
        for (op, reply) in [
            (Opcode::FsLookup, FsReply::Entry(a)),
            (Opcode::FsGetattr, FsReply::Attr(a)),
            (Opcode::FsCreate, FsReply::Created { attr: a, fh: 3 }),
            (Opcode::FsOpen, FsReply::Opened { attr: a, fh: 3, data: Bytes::new() }),
            (Opcode::FsOpen, FsReply::Opened { attr: a, fh: 3, data: Bytes::from_static(b"0123456789") }),
            (
                Opcode::FsReaddir,
                FsReply::Dir { entries: vec![DirEntry { cookie: 4, name: n(".."), attr: a }], eof: true },
            ),
            (Opcode::FsWrite, FsReply::Written(12)),
            (Opcode::FsStatfs, FsReply::Statfs(FsStat { blocks: 1, bsize: 4096, ..FsStat::default() })),
            (Opcode::FsRead, FsReply::Data(Bytes::from_static(b"data"))),
            (Opcode::FsGetxattr, FsReply::Data(Bytes::from_static(b"value"))),
            (Opcode::FsListxattr, FsReply::Data(Bytes::from_static(b"user.a\0user.b\0"))),
            (Opcode::FsSetxattr, FsReply::Done),
            (Opcode::FsUnlink, FsReply::Done),
            (Opcode::FsGetlk, FsReply::Lock(Lock { owner: 0, start: 1, end: 2, kind: LOCK_UNLOCK, pid: 3 })),
        ] {
            let resp = Response::ok(RequestId(2), op, Reply::Fs(reply));
            let mut buf = BytesMut::from(&resp.encode().to_bytes()[..]);
            assert_eq!(Response::parse(split_response(&mut buf).unwrap().unwrap()).unwrap(), resp);
        }
    }

    #[test]
    fn notices_round_trip_with_their_golden_bytes() {
        let notices = Notices {
            handle: VolumeHandle(3),
            notices: vec![
                Notice::Inode { node: 9, offset: -1, len: 0 },
                Notice::Entry { parent: 1, name: n("a") },
                Notice::Delete { parent: 1, child: 9, name: n("b") },
                Notice::All,
            ],
        };
        let resp = Response::ok(RequestId(0), Opcode::FsNotify, Reply::Notify(notices));
        let frame = resp.encode();
        #[rustfmt::skip]
        let payload: &[u8] = &[
            3, 0, 0, 0, 4, 0,                                      // handle 3, 4 notices
            1, 9, 0, 0, 0, 0, 0, 0, 0,                             // INODE node 9
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,        //   offset -1 (attributes only)
            0, 0, 0, 0, 0, 0, 0, 0,                                //   len 0
            2, 1, 0, 0, 0, 0, 0, 0, 0, 1, b'a',                    // ENTRY parent 1, "a"
            3, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, b'b', // DELETE 1, child 9, "b"
            4,                                                     // ALL
        ];
        assert_eq!(&frame.payload[..], payload);
        let mut buf = BytesMut::from(&frame.to_bytes()[..]);
        assert_eq!(Response::parse(split_response(&mut buf).unwrap().unwrap()).unwrap(), resp);
        // A kind the client does not know, and more notices than a frame may hold, are refused.
        let mut bad = payload.to_vec();
        bad[6] = 9;
        assert!(get_notices(&mut Reader::new(&bad)).is_err());
        let mut many = vec![3, 0, 0, 0];
        many.extend_from_slice(&(u16::try_from(FS_NOTICES_MAX).unwrap() + 1).to_le_bytes());
        many.resize(many.len() + FS_NOTICES_MAX + 1, NOTICE_ALL);
        assert!(get_notices(&mut Reader::new(&many)).is_err());
        // A client never sends one.
        let mut buf = BytesMut::from(&frame.to_bytes()[..]);
        let raw = split_response(&mut buf).unwrap().unwrap();
        let mut req = BytesMut::new();
        let h = crate::RequestHeader {
            version: crate::limits::PROTOCOL_VERSION,
            request_id: RequestId(5),
            opcode: Opcode::FsNotify as u8,
            payload_len: u32::try_from(raw.payload.len()).unwrap(),
            payload_crc: crc32fast::hash(&raw.payload),
            ..Default::default()
        };
        req.extend_from_slice(&h.encode());
        req.extend_from_slice(&raw.payload);
        let e = Request::parse(split_request(&mut req).unwrap().unwrap()).unwrap_err();
        assert_eq!(e.status, crate::Status::BadRequest);
    }

    #[test]
    fn hostile_names_and_fields_are_refused() {
        for bad in [&b""[..], b"a/b", b"a\0b", &[b'x'; 256][..]] {
            assert!(FsName::new(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
        // `.` and `..` in a request, unknown SETATTR bits, node 0, both RENAME flags.
        let mut bad_frames = Vec::new();
        let creds = Creds::default();
        let dot = FsName::new(Bytes::from_static(b"..")).unwrap();
        bad_frames.push(Request::Fs {
            handle: VolumeHandle(1),
            node: 1,
            creds: creds.clone(),
            op: FsOp::Unlink { name: dot },
        });
        bad_frames.push(Request::Fs {
            handle: VolumeHandle(1),
            node: 1,
            creds: creds.clone(),
            op: FsOp::Setattr(SetAttr { valid: 1 << 20, ..SetAttr::default() }),
        });
        bad_frames.push(Request::Fs {
            handle: VolumeHandle(1),
            node: 0,
            creds: creds.clone(),
            op: FsOp::Getattr,
        });
        bad_frames.push(Request::Fs {
            handle: VolumeHandle(1),
            node: 1,
            creds,
            op: FsOp::Rename { name: n("a"), new_parent: 1, new_name: n("b"), flags: 3 },
        });
        for req in bad_frames {
            let mut buf = BytesMut::from(&req.encode(RequestId(1)).to_bytes()[..]);
            let e = Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap_err();
            assert_eq!(e.status, crate::Status::BadRequest, "{req:?}");
        }
    }
}
