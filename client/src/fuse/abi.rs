//! The kernel's FUSE ABI (include/uapi/linux/fuse.h, 7.40 as used here; this kernel speaks 7.45),
//! for the block file's own session: request parsing and reply encoding, written from the uapi
//! header. Only what a one-file filesystem needs is decoded; every other opcode is `Other` and
//! answered ENOSYS.
//!
//! Parsing is pure and total: any byte string gives a request or a `BadRequest`, never a panic
//! (`fuzz_requests` below, and `tests/fuse_abi.rs`). Payloads are `Bytes` slices of the buffer the
//! request was read into, so a WRITE's data reaches the server without a copy.

use bytes::{BufMut, Bytes, BytesMut};

pub const KERNEL_VERSION: u32 = 7;
/// The minor version we implement (FUSE_HAS_RESEND is 7.40).
pub const KERNEL_MINOR_VERSION: u32 = 40;
/// The oldest kernel minor we accept (7.31: the 64-byte INIT reply). FUSE_INIT_EXT (flags2, for
/// resend) needs 7.36; older kernels simply get no resend.
pub const KERNEL_MINOR_MIN: u32 = 31;

pub const IN_HEADER_LEN: usize = 40;
pub const OUT_HEADER_LEN: usize = 16;

// Opcodes.
pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_GETATTR: u32 = 3;
pub const FUSE_SETATTR: u32 = 4;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_READ: u32 = 15;
pub const FUSE_WRITE: u32 = 16;
pub const FUSE_STATFS: u32 = 17;
pub const FUSE_RELEASE: u32 = 18;
pub const FUSE_FSYNC: u32 = 20;
pub const FUSE_GETXATTR: u32 = 22;
pub const FUSE_LISTXATTR: u32 = 23;
pub const FUSE_FLUSH: u32 = 25;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_INTERRUPT: u32 = 36;
pub const FUSE_DESTROY: u32 = 38;
pub const FUSE_BATCH_FORGET: u32 = 42;
pub const FUSE_FALLOCATE: u32 = 43;

// INIT flags (flags, and flags2 << 32 with FUSE_INIT_EXT).
pub const FUSE_ASYNC_READ: u64 = 1 << 0;
pub const FUSE_BIG_WRITES: u64 = 1 << 5;
pub const FUSE_ASYNC_DIO: u64 = 1 << 15;
pub const FUSE_MAX_PAGES: u64 = 1 << 22;
pub const FUSE_INIT_EXT: u64 = 1 << 30;
pub const FUSE_HAS_RESEND: u64 = 1 << 39;

// OPEN reply flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

// SETATTR valid bits.
pub const FATTR_SIZE: u32 = 1 << 3;

/// Notification codes (an out header with `unique` 0 and the code as `error`).
pub const FUSE_NOTIFY_RESEND: i32 = 7;
/// The bit the kernel sets in the `unique` of a request it resends after NOTIFY_RESEND.
pub const FUSE_UNIQUE_RESEND: u64 = 1 << 63;

/// `FUSE_DEV_IOC_CLONE` (`_IOR(229, 0, uint32_t)`): attaches a new /dev/fuse fd to a session.
pub const FUSE_DEV_IOC_CLONE: u64 = 0x8004_e500;

/// The fixed header of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// What the kernel offered in INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
}

/// A request the block file handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Init(InitIn),
    Getattr,
    Setattr {
        valid: u32,
        size: u64,
    },
    Open {
        flags: u32,
    },
    Read {
        offset: u64,
        size: u32,
    },
    /// The data is a slice of the request buffer (no copy).
    Write {
        offset: u64,
        data: Bytes,
    },
    Flush,
    Release,
    Fsync,
    Fallocate {
        offset: u64,
        length: u64,
        mode: u32,
    },
    Statfs,
    Getxattr {
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Lookup,
    /// FORGET, BATCH_FORGET, INTERRUPT: no reply is sent.
    NoReply,
    Destroy,
    /// Anything else: ENOSYS.
    Other(u32),
}

/// A request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub header: InHeader,
    pub op: Op,
}

/// Why a request could not be parsed; answered EINVAL when its header was readable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadRequest {
    #[error("request of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("request header says {header} bytes, {read} were read")]
    Length { unique: u64, header: u32, read: usize },
    #[error("{opcode}: argument truncated")]
    Truncated { unique: u64, opcode: u32 },
}

impl BadRequest {
    /// The request to answer with an error, when there is one.
    pub fn unique(&self) -> Option<u64> {
        match self {
            BadRequest::Truncated { unique, .. } | BadRequest::Length { unique, .. } => Some(*unique),
            BadRequest::Short(_) => None,
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_le_bytes(a))
}

/// Parses one request: `buf` is exactly what one read(2) of /dev/fuse returned.
pub fn parse(buf: Bytes) -> Result<Request, BadRequest> {
    if buf.len() < IN_HEADER_LEN {
        return Err(BadRequest::Short(buf.len()));
    }
    let h = InHeader {
        len: u32_at(&buf, 0).unwrap_or(0),
        opcode: u32_at(&buf, 4).unwrap_or(0),
        unique: u64_at(&buf, 8).unwrap_or(0),
        nodeid: u64_at(&buf, 16).unwrap_or(0),
        uid: u32_at(&buf, 24).unwrap_or(0),
        gid: u32_at(&buf, 28).unwrap_or(0),
        pid: u32_at(&buf, 32).unwrap_or(0),
    };
    if h.len as usize != buf.len() {
        return Err(BadRequest::Length { unique: h.unique, header: h.len, read: buf.len() });
    }
    let arg = &buf[IN_HEADER_LEN..];
    let bad = BadRequest::Truncated { unique: h.unique, opcode: h.opcode };
    let need = |n: usize| if arg.len() < n { Err(bad.clone()) } else { Ok(()) };
    let op = match h.opcode {
        FUSE_INIT => {
            need(16)?;
            let flags_lo = u64::from(u32_at(arg, 12).unwrap_or(0));
            // flags2 (bits 32..) exist only with FUSE_INIT_EXT, from 7.36.
            let flags_hi =
                if flags_lo & FUSE_INIT_EXT != 0 { u64::from(u32_at(arg, 16).unwrap_or(0)) << 32 } else { 0 };
            Op::Init(InitIn {
                major: u32_at(arg, 0).unwrap_or(0),
                minor: u32_at(arg, 4).unwrap_or(0),
                max_readahead: u32_at(arg, 8).unwrap_or(0),
                flags: flags_lo | flags_hi,
            })
        }
        FUSE_GETATTR => Op::Getattr,
        FUSE_SETATTR => {
            need(24)?;
            Op::Setattr { valid: u32_at(arg, 0).unwrap_or(0), size: u64_at(arg, 16).unwrap_or(0) }
        }
        FUSE_OPEN => {
            need(4)?;
            Op::Open { flags: u32_at(arg, 0).unwrap_or(0) }
        }
        FUSE_READ => {
            need(24)?;
            Op::Read { offset: u64_at(arg, 8).unwrap_or(0), size: u32_at(arg, 16).unwrap_or(0) }
        }
        FUSE_WRITE => {
            // fuse_write_in is 40 bytes since 7.9; the data follows it.
            need(40)?;
            let size = u32_at(arg, 16).unwrap_or(0) as usize;
            let start = IN_HEADER_LEN + 40;
            if buf.len() - start != size {
                return Err(bad);
            }
            Op::Write { offset: u64_at(arg, 8).unwrap_or(0), data: buf.slice(start..) }
        }
        FUSE_FLUSH => Op::Flush,
        FUSE_RELEASE => Op::Release,
        FUSE_FSYNC => Op::Fsync,
        FUSE_FALLOCATE => {
            need(28)?;
            Op::Fallocate {
                offset: u64_at(arg, 8).unwrap_or(0),
                length: u64_at(arg, 16).unwrap_or(0),
                mode: u32_at(arg, 24).unwrap_or(0),
            }
        }
        FUSE_STATFS => Op::Statfs,
        FUSE_GETXATTR => {
            need(8)?;
            Op::Getxattr { size: u32_at(arg, 0).unwrap_or(0) }
        }
        FUSE_LISTXATTR => {
            need(8)?;
            Op::Listxattr { size: u32_at(arg, 0).unwrap_or(0) }
        }
        FUSE_LOOKUP => Op::Lookup,
        FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => Op::NoReply,
        FUSE_DESTROY => Op::Destroy,
        other => Op::Other(other),
    };
    Ok(Request { header: h, op })
}

/// The out header for a reply of `payload_len` bytes (error 0) or an error (a negative errno).
pub fn out_header(unique: u64, error: i32, payload_len: usize) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    let len = u32::try_from(OUT_HEADER_LEN + payload_len).unwrap_or(u32::MAX);
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// NOTIFY_RESEND: the kernel puts every request a daemon had read but not answered back on the
/// pending queue (with `FUSE_UNIQUE_RESEND` in their `unique`).
pub fn notify_resend() -> [u8; OUT_HEADER_LEN] {
    out_header(0, FUSE_NOTIFY_RESEND, 0)
}

/// What we answer INIT with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InitOut {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub max_pages: u16,
}

impl InitOut {
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(64);
        b.put_u32_le(self.major);
        b.put_u32_le(self.minor);
        b.put_u32_le(self.max_readahead);
        b.put_u32_le((self.flags & 0xffff_ffff) as u32);
        b.put_u16_le(self.max_background);
        b.put_u16_le(self.congestion_threshold);
        b.put_u32_le(self.max_write);
        b.put_u32_le(1); // time_gran
        b.put_u16_le(self.max_pages);
        b.put_u16_le(0); // map_alignment
        b.put_u32_le((self.flags >> 32) as u32);
        b.put_u32_le(0); // max_stack_depth
        b.put_bytes(0, 24); // unused
        b.freeze()
    }
}

/// The attributes of the one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub size: u64,
    pub blocks: u64,
    pub time_s: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// fuse_attr_out: 16 bytes of validity, then fuse_attr (88).
pub fn attr_out(a: &Attr, valid_s: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(104);
    b.put_u64_le(valid_s);
    b.put_u32_le(0);
    b.put_u32_le(0);
    b.put_u64_le(1); // ino: the root
    b.put_u64_le(a.size);
    b.put_u64_le(a.blocks);
    b.put_u64_le(a.time_s); // atime
    b.put_u64_le(a.time_s); // mtime
    b.put_u64_le(a.time_s); // ctime
    b.put_u32_le(0);
    b.put_u32_le(0);
    b.put_u32_le(0);
    b.put_u32_le(a.mode);
    b.put_u32_le(1); // nlink
    b.put_u32_le(a.uid);
    b.put_u32_le(a.gid);
    b.put_u32_le(0); // rdev
    b.put_u32_le(4096); // blksize
    b.put_u32_le(0); // flags
    b.freeze()
}

pub fn open_out(open_flags: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u64_le(0); // fh
    b.put_u32_le(open_flags);
    b.put_u32_le(0);
    b.freeze()
}

pub fn write_out(size: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(8);
    b.put_u32_le(size);
    b.put_u32_le(0);
    b.freeze()
}

/// fuse_statfs_out for a file of `blocks` 4 KiB blocks.
pub fn statfs_out(blocks: u64) -> Bytes {
    let mut b = BytesMut::with_capacity(80);
    b.put_u64_le(blocks);
    b.put_u64_le(0); // bfree
    b.put_u64_le(0); // bavail
    b.put_u64_le(1); // files
    b.put_u64_le(0); // ffree
    b.put_u32_le(4096); // bsize
    b.put_u32_le(255); // namelen
    b.put_u32_le(4096); // frsize
    b.put_u32_le(0);
    b.put_bytes(0, 24);
    b.freeze()
}

/// fuse_getxattr_out: the size a LISTXATTR / GETXATTR with size 0 asks for.
pub fn xattr_size_out(size: u32) -> Bytes {
    write_out(size)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(opcode: u32, unique: u64, arg: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u32_le((IN_HEADER_LEN + arg.len()) as u32);
        b.put_u32_le(opcode);
        b.put_u64_le(unique);
        b.put_u64_le(1);
        b.put_u32_le(0);
        b.put_u32_le(0);
        b.put_u32_le(42);
        b.put_u32_le(0);
        b.put_slice(arg);
        b.freeze()
    }

    #[test]
    fn init_with_and_without_flags2() {
        let mut arg = vec![];
        for v in [7u32, 45, 1 << 20, (FUSE_INIT_EXT | FUSE_ASYNC_READ) as u32, 1 << 7] {
            arg.extend_from_slice(&v.to_le_bytes());
        }
        arg.resize(64, 0);
        let r = parse(request(FUSE_INIT, 2, &arg)).unwrap();
        let Op::Init(i) = r.op else { panic!("{r:?}") };
        assert_eq!((i.major, i.minor), (7, 45));
        assert_ne!(i.flags & FUSE_HAS_RESEND, 0);
        // Without FUSE_INIT_EXT, what follows the flags is not flags2.
        arg[12..16].copy_from_slice(&(FUSE_ASYNC_READ as u32).to_le_bytes());
        let Op::Init(i) = parse(request(FUSE_INIT, 2, &arg)).unwrap().op else { panic!() };
        assert_eq!(i.flags, FUSE_ASYNC_READ);
        assert_eq!(
            InitOut {
                major: 7,
                minor: 40,
                max_readahead: 0,
                flags: FUSE_HAS_RESEND | FUSE_INIT_EXT,
                max_background: 1,
                congestion_threshold: 1,
                max_write: 1,
                max_pages: 1,
            }
            .encode()
            .len(),
            64
        );
    }

    #[test]
    fn write_data_is_a_slice_of_the_buffer() {
        let mut arg = vec![0u8; 40];
        arg[8..16].copy_from_slice(&4096u64.to_le_bytes());
        arg[16..20].copy_from_slice(&5u32.to_le_bytes());
        arg.extend_from_slice(b"hello");
        let buf = request(FUSE_WRITE, 9, &arg);
        let base = buf.as_ptr() as usize;
        let Op::Write { offset, data } = parse(buf).unwrap().op else { panic!() };
        assert_eq!((offset, &data[..]), (4096, &b"hello"[..]));
        assert_eq!(data.as_ptr() as usize, base + IN_HEADER_LEN + 40, "no copy");
        // A size that disagrees with the data is refused, naming the request.
        arg[16..20].copy_from_slice(&6u32.to_le_bytes());
        assert_eq!(parse(request(FUSE_WRITE, 9, &arg)).unwrap_err().unique(), Some(9));
    }

    #[test]
    fn short_and_mislabelled_requests() {
        assert!(matches!(parse(Bytes::from_static(&[1, 2, 3])), Err(BadRequest::Short(3))));
        let mut r = request(FUSE_READ, 1, &[0; 40]).to_vec();
        r[0] = 200;
        assert!(matches!(parse(Bytes::from(r)), Err(BadRequest::Length { .. })));
        assert_eq!(parse(request(FUSE_READ, 3, &[0; 8])).unwrap_err().unique(), Some(3));
        assert_eq!(parse(request(999, 4, &[])).unwrap().op, Op::Other(999));
    }

    proptest! {
        #[test]
        fn fuzz_requests(bytes in proptest::collection::vec(any::<u8>(), 0..300), opcode in 0u32..60, fix_len in any::<bool>()) {
            let mut b = bytes;
            if b.len() >= IN_HEADER_LEN {
                b[4..8].copy_from_slice(&opcode.to_le_bytes());
                if fix_len {
                    let n = b.len() as u32;
                    b[0..4].copy_from_slice(&n.to_le_bytes());
                }
            }
            let _ = parse(Bytes::from(b));
        }
    }
}
