//! Opcodes, request flags, feature bits and status codes: the numbers on the wire.

use std::fmt;

/// What a request asks for. The numbering groups session (0x0_), control (0x1_) and data (0x2_)
/// operations; numbers are never reused.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Opcode {
    /// Handshake: version range, features, node id, token. Must be the first request.
    Hello = 0x01,
    /// A no-op round trip: the client's heartbeat while idle, and its probe of a connection that
    /// stopped answering.
    Ping = 0x02,
    VolumeCreate = 0x10,
    VolumeDelete = 0x11,
    VolumeList = 0x12,
    VolumeStat = 0x13,
    VolumeResize = 0x14,
    /// Set the volume's writer attachment (fencing owner).
    AttachSet = 0x15,
    /// Clear the volume's writer attachment.
    AttachClear = 0x16,
    /// Capacity of the server's data dir (for CSI GetCapacity).
    StoreStat = 0x17,
    /// Records a node as known (the CSI node plugin, when kubelet registers it).
    NodeRegister = 0x18,
    /// Whether a node is known, and since when.
    NodeStat = 0x19,
    /// Admin: forget a node's credential, so that it can enroll again with the join token.
    NodeReset = 0x1a,
    /// A point-in-time, read-only image of a block volume.
    SnapshotCreate = 0x1b,
    SnapshotDelete = 0x1c,
    SnapshotList = 0x1d,
    SnapshotStat = 0x1e,
    Open = 0x20,
    Close = 0x21,
    Read = 0x22,
    Write = 0x23,
    Flush = 0x24,
    Trim = 0x25,
    WriteZeroes = 0x26,
    // File operations on fs volumes (payloads in `fs`).
    FsLookup = 0x30,
    FsGetattr = 0x31,
    FsSetattr = 0x32,
    FsReaddir = 0x33,
    FsMkdir = 0x34,
    FsMknod = 0x35,
    FsCreate = 0x36,
    FsOpen = 0x37,
    FsRead = 0x38,
    FsWrite = 0x39,
    FsRelease = 0x3a,
    FsFsync = 0x3b,
    FsUnlink = 0x3c,
    FsRmdir = 0x3d,
    FsRename = 0x3e,
    FsLink = 0x3f,
    FsSymlink = 0x40,
    FsReadlink = 0x41,
    FsStatfs = 0x42,
    FsGetlk = 0x43,
    FsSetlk = 0x44,
    /// A lock owner closed a file: its locks on the inode go.
    FsFlush = 0x45,
    FsFallocate = 0x46,
    /// SEEK_DATA / SEEK_HOLE.
    FsLseek = 0x47,
    /// A copy between two open files, done on the server.
    FsCopyRange = 0x48,
    /// Extended attributes: a value, set one (XATTR_CREATE / XATTR_REPLACE), the names, remove one.
    FsGetxattr = 0x49,
    FsSetxattr = 0x4a,
    FsListxattr = 0x4b,
    FsRemovexattr = 0x4c,
    /// Server to client only, request id 0: changes other clients made to inodes and entries this
    /// connection has seen (payload `fs::Notices`). Sent to connections that asked for
    /// `FEATURE_FS_NOTIFY`.
    FsNotify = 0x50,
}

impl Opcode {
    pub const ALL: [Opcode; 54] = [
        Opcode::Hello,
        Opcode::Ping,
        Opcode::VolumeCreate,
        Opcode::VolumeDelete,
        Opcode::VolumeList,
        Opcode::VolumeStat,
        Opcode::VolumeResize,
        Opcode::AttachSet,
        Opcode::AttachClear,
        Opcode::StoreStat,
        Opcode::NodeRegister,
        Opcode::NodeStat,
        Opcode::NodeReset,
        Opcode::SnapshotCreate,
        Opcode::SnapshotDelete,
        Opcode::SnapshotList,
        Opcode::SnapshotStat,
        Opcode::Open,
        Opcode::Close,
        Opcode::Read,
        Opcode::Write,
        Opcode::Flush,
        Opcode::Trim,
        Opcode::WriteZeroes,
        Opcode::FsLookup,
        Opcode::FsGetattr,
        Opcode::FsSetattr,
        Opcode::FsReaddir,
        Opcode::FsMkdir,
        Opcode::FsMknod,
        Opcode::FsCreate,
        Opcode::FsOpen,
        Opcode::FsRead,
        Opcode::FsWrite,
        Opcode::FsRelease,
        Opcode::FsFsync,
        Opcode::FsUnlink,
        Opcode::FsRmdir,
        Opcode::FsRename,
        Opcode::FsLink,
        Opcode::FsSymlink,
        Opcode::FsReadlink,
        Opcode::FsStatfs,
        Opcode::FsGetlk,
        Opcode::FsSetlk,
        Opcode::FsFlush,
        Opcode::FsFallocate,
        Opcode::FsLseek,
        Opcode::FsCopyRange,
        Opcode::FsGetxattr,
        Opcode::FsSetxattr,
        Opcode::FsListxattr,
        Opcode::FsRemovexattr,
        Opcode::FsNotify,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Opcode::Hello => "HELLO",
            Opcode::Ping => "PING",
            Opcode::VolumeCreate => "VOLUME_CREATE",
            Opcode::VolumeDelete => "VOLUME_DELETE",
            Opcode::VolumeList => "VOLUME_LIST",
            Opcode::VolumeStat => "VOLUME_STAT",
            Opcode::VolumeResize => "VOLUME_RESIZE",
            Opcode::AttachSet => "ATTACH_SET",
            Opcode::AttachClear => "ATTACH_CLEAR",
            Opcode::StoreStat => "STORE_STAT",
            Opcode::NodeRegister => "NODE_REGISTER",
            Opcode::NodeStat => "NODE_STAT",
            Opcode::NodeReset => "NODE_RESET",
            Opcode::SnapshotCreate => "SNAPSHOT_CREATE",
            Opcode::SnapshotDelete => "SNAPSHOT_DELETE",
            Opcode::SnapshotList => "SNAPSHOT_LIST",
            Opcode::SnapshotStat => "SNAPSHOT_STAT",
            Opcode::Open => "OPEN",
            Opcode::Close => "CLOSE",
            Opcode::Read => "READ",
            Opcode::Write => "WRITE",
            Opcode::Flush => "FLUSH",
            Opcode::Trim => "TRIM",
            Opcode::WriteZeroes => "WRITE_ZEROES",
            Opcode::FsLookup => "FS_LOOKUP",
            Opcode::FsGetattr => "FS_GETATTR",
            Opcode::FsSetattr => "FS_SETATTR",
            Opcode::FsReaddir => "FS_READDIR",
            Opcode::FsMkdir => "FS_MKDIR",
            Opcode::FsMknod => "FS_MKNOD",
            Opcode::FsCreate => "FS_CREATE",
            Opcode::FsOpen => "FS_OPEN",
            Opcode::FsRead => "FS_READ",
            Opcode::FsWrite => "FS_WRITE",
            Opcode::FsRelease => "FS_RELEASE",
            Opcode::FsFsync => "FS_FSYNC",
            Opcode::FsUnlink => "FS_UNLINK",
            Opcode::FsRmdir => "FS_RMDIR",
            Opcode::FsRename => "FS_RENAME",
            Opcode::FsLink => "FS_LINK",
            Opcode::FsSymlink => "FS_SYMLINK",
            Opcode::FsReadlink => "FS_READLINK",
            Opcode::FsStatfs => "FS_STATFS",
            Opcode::FsGetlk => "FS_GETLK",
            Opcode::FsSetlk => "FS_SETLK",
            Opcode::FsFlush => "FS_FLUSH",
            Opcode::FsFallocate => "FS_FALLOCATE",
            Opcode::FsLseek => "FS_LSEEK",
            Opcode::FsCopyRange => "FS_COPY_RANGE",
            Opcode::FsGetxattr => "FS_GETXATTR",
            Opcode::FsSetxattr => "FS_SETXATTR",
            Opcode::FsListxattr => "FS_LISTXATTR",
            Opcode::FsRemovexattr => "FS_REMOVEXATTR",
            Opcode::FsNotify => "FS_NOTIFY",
        }
    }

    /// Data operations address an OPENed volume by handle and are idempotent: a client may re-send
    /// them after a reconnect.
    pub fn is_data(self) -> bool {
        matches!(self, Opcode::Read | Opcode::Write | Opcode::Flush | Opcode::Trim | Opcode::WriteZeroes)
    }

    /// File operations: they address an OPENed fs volume by handle, and one of its inodes.
    pub fn is_fs(self) -> bool {
        (Opcode::FsLookup as u8..=Opcode::FsRemovexattr as u8).contains(&(self as u8))
    }
}

impl TryFrom<u8> for Opcode {
    type Error = u8;
    fn try_from(v: u8) -> Result<Self, u8> {
        Opcode::ALL.iter().copied().find(|op| *op as u8 == v).ok_or(v)
    }
}

impl fmt::Display for Opcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Request header flag: WRITE / WRITE_ZEROES is acknowledged only once durable (forced unit access).
pub const FLAG_FUA: u16 = 1 << 0;
/// OPEN: open read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// ATTACH_SET: take the writer attachment over from another holder (fences it). VOLUME_DELETE (admin
/// only): delete although a writer attachment is recorded (its holder is known to be gone).
pub const FLAG_FORCE: u16 = 1 << 2;
/// Every flag bit this version defines; a request with any other bit set is refused.
pub const FLAGS_KNOWN: u16 = FLAG_FUA | FLAG_READ_ONLY | FLAG_FORCE;

/// HELLO reply `session_flags`: the session authenticated with the admin credential.
pub const SESSION_ADMIN: u8 = 1 << 0;
/// HELLO reply `session_flags`: the node was enrolled by this HELLO; `credential` is its new secret.
pub const SESSION_ENROLLED: u8 = 1 << 1;

/// Feature bits exchanged in HELLO (the server answers with the intersection).
pub const FEATURE_FUA: u64 = 1 << 0;
pub const FEATURE_TRIM: u64 = 1 << 1;
pub const FEATURE_WRITE_ZEROES: u64 = 1 << 2;
/// The client applies FS_NOTIFY frames (cache invalidations of fs volumes).
pub const FEATURE_FS_NOTIFY: u64 = 1 << 3;
/// The client takes a small file's bytes with its FS_OPEN reply (`fs::FS_OPEN_INLINE_MAX`); a
/// client without it gets the reply as before (an older parser refuses trailing bytes).
pub const FEATURE_FS_OPEN_INLINE: u64 = 1 << 4;
/// The client reads the kinds of snapshots (a trailer after SnapshotInfo, present when one is of
/// an fs volume); a client without it is told every snapshot is of a block volume (an older
/// parser refuses trailing bytes), and a restore of an fs one as a block volume is refused.
pub const FEATURE_SNAPSHOT_KIND: u64 = 1 << 5;
pub const FEATURES_ALL: u64 = FEATURE_FUA
    | FEATURE_TRIM
    | FEATURE_WRITE_ZEROES
    | FEATURE_FS_NOTIFY
    | FEATURE_FS_OPEN_INLINE
    | FEATURE_SNAPSHOT_KIND;

/// The outcome of a request. `Ok` is 0; every failure has its own code so callers can branch on it.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    Ok = 0,
    /// The frame or its payload is malformed (bad lengths, trailing bytes, bad UTF-8, unknown flags).
    BadRequest = 1,
    /// The protocol version is not supported.
    UnsupportedVersion = 2,
    /// Wrong or missing token.
    AuthFailed = 3,
    UnknownOpcode = 4,
    /// The payload CRC32 does not match.
    Checksum = 5,
    /// A length exceeds a protocol limit.
    TooLarge = 6,
    InvalidName = 7,
    NotFound = 8,
    AlreadyExists = 9,
    /// Offset + length is beyond the end of the volume.
    OutOfRange = 10,
    /// Write to a volume opened read-only.
    ReadOnly = 11,
    /// Write refused: the volume's writer attachment belongs to another node.
    Fenced = 12,
    /// Unknown or closed volume handle.
    BadHandle = 13,
    /// Request before HELLO, or HELLO twice.
    NotReady = 14,
    /// Storage I/O failed on the server.
    Io = 15,
    /// The server's storage is full.
    NoSpace = 16,
    /// The server is shutting down; retry on another connection later.
    ShuttingDown = 17,
    /// ATTACH_SET while another node holds the writer attachment.
    AttachedElsewhere = 18,
    /// An argument is out of its domain (unaligned size, zero size, shrinking resize...).
    InvalidArgument = 19,
    /// The volume is in use (delete of an attached or open volume).
    Busy = 20,
    /// A bug on the server; details are in its log.
    Internal = 21,
    /// Authenticated, but this session may not do that (another node's attachment, a forced delete
    /// without the admin credential).
    Forbidden = 22,
    /// A write on a connection that a newer HELLO of the same client session and slot retired (see
    /// HELLO). The client reconnects and sends it again: it never reaches the application.
    Replaced = 23,
    /// A file operation failed on the server's filesystem: the error reply carries the errno
    /// (ENOENT, EACCES, EEXIST...), which the client hands to the application as it is.
    Errno = 24,
}

impl Status {
    pub const ALL: [Status; 25] = [
        Status::Ok,
        Status::BadRequest,
        Status::UnsupportedVersion,
        Status::AuthFailed,
        Status::UnknownOpcode,
        Status::Checksum,
        Status::TooLarge,
        Status::InvalidName,
        Status::NotFound,
        Status::AlreadyExists,
        Status::OutOfRange,
        Status::ReadOnly,
        Status::Fenced,
        Status::BadHandle,
        Status::NotReady,
        Status::Io,
        Status::NoSpace,
        Status::ShuttingDown,
        Status::AttachedElsewhere,
        Status::InvalidArgument,
        Status::Busy,
        Status::Internal,
        Status::Forbidden,
        Status::Replaced,
        Status::Errno,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::BadRequest => "malformed request",
            Status::UnsupportedVersion => "unsupported protocol version",
            Status::AuthFailed => "authentication failed",
            Status::UnknownOpcode => "unknown opcode",
            Status::Checksum => "payload checksum mismatch",
            Status::TooLarge => "length exceeds a protocol limit",
            Status::InvalidName => "invalid name",
            Status::NotFound => "no such volume",
            Status::AlreadyExists => "volume already exists",
            Status::OutOfRange => "offset or length beyond the end of the volume",
            Status::ReadOnly => "volume is open read-only",
            Status::Fenced => "refused: this session does not hold the volume's current writer attachment",
            Status::BadHandle => "unknown volume handle",
            Status::NotReady => "handshake required first",
            Status::Io => "storage I/O error on the server",
            Status::NoSpace => "no space left on the server",
            Status::ShuttingDown => "server is shutting down",
            Status::AttachedElsewhere => "volume is attached for writing by another node",
            Status::InvalidArgument => "invalid argument",
            Status::Busy => "volume is in use",
            Status::Internal => "internal server error",
            Status::Forbidden => "not allowed for this session",
            Status::Replaced => "this connection was replaced by a newer one of the same client session",
            Status::Errno => "file operation failed",
        }
    }
}

impl TryFrom<u16> for Status {
    type Error = u16;
    fn try_from(v: u16) -> Result<Self, u16> {
        Status::ALL.iter().copied().find(|s| *s as u16 == v).ok_or(v)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcode_round_trip_and_unknown() {
        for op in Opcode::ALL {
            assert_eq!(Opcode::try_from(op as u8), Ok(op));
        }
        let known: Vec<u8> = Opcode::ALL.iter().map(|o| *o as u8).collect();
        for v in 0..=u8::MAX {
            if !known.contains(&v) {
                assert_eq!(Opcode::try_from(v), Err(v));
            }
        }
    }

    #[test]
    fn status_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::try_from(s as u16), Ok(s));
        }
        assert_eq!(Status::try_from(999), Err(999));
    }
}
