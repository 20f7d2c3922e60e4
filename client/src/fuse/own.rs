//! The block file on our own FUSE session (`kernel.rs`): the same file as the fuser adapter in
//! `mod.rs`, answered from tasks on the runtime, with a WRITE's data handed to the server as the
//! `Bytes` it was read into (no copy) and a READ's reply written from the received `Bytes`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::warn;

use super::abi::{self, Attr, Op, Request};
use super::kernel::{Channel, Handler};
use super::{errno_code, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE};
use crate::Volume;

/// Attribute validity: 1 s, as the fuser adapter (a grown volume shows its size within it).
const TTL_S: u64 = 1;

#[derive(Debug)]
pub struct OwnBlockFile {
    vol: Volume,
    rt: tokio::runtime::Handle,
    read_only: bool,
    uid: u32,
    gid: u32,
    created_s: u64,
}

impl OwnBlockFile {
    pub fn new(vol: Volume, rt: tokio::runtime::Handle, read_only: bool) -> Self {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let created_s = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs();
        Self { vol, rt, read_only, uid, gid, created_s }
    }

    fn attr(&self, blocks: u64) -> Attr {
        Attr {
            size: self.vol.size(),
            blocks,
            time_s: self.created_s,
            mode: libc::S_IFREG | if self.read_only { 0o444 } else { 0o644 },
            uid: self.uid,
            gid: self.gid,
        }
    }

    /// The attributes, with the allocated size and the size from the server (a volume grown there
    /// shows its new size, and `losetup -c` picks it up).
    fn reply_attr(&self, unique: u64, ch: &Channel) {
        let (vol, ch, fallback) = (self.vol.clone(), ch.clone(), self.attr(0));
        self.rt.spawn(async move {
            let attr = match vol.stat().await {
                Ok(v) => Attr { blocks: v.allocated / 512, size: vol.size(), ..fallback },
                Err(_) => fallback,
            };
            ch.reply(unique, &[&abi::attr_out(&attr, TTL_S)]);
        });
    }

    /// Runs `op` on the runtime and answers with an empty reply or its errno.
    fn done<F>(&self, unique: u64, ch: &Channel, what: &'static str, op: F)
    where
        F: std::future::Future<Output = Result<(), crate::ClientError>> + Send + 'static,
    {
        let ch = ch.clone();
        self.rt.spawn(async move {
            match op.await {
                Ok(()) => ch.reply(unique, &[]),
                Err(e) => {
                    warn!(error = %e, "{what} failed");
                    ch.error(unique, errno_code(&e));
                }
            }
        });
    }
}

impl Handler for OwnBlockFile {
    fn handle(&self, req: Request, ch: &Channel) {
        let u = req.header.unique;
        let size = self.vol.size();
        match req.op {
            Op::Init(_) => ch.error(u, libc::EIO),
            Op::Getattr => self.reply_attr(u, ch),
            Op::Setattr { valid, size: wanted } => {
                // The size is the volume's: resize it with `ferrovol volume resize`, not truncate(2).
                if valid & abi::FATTR_SIZE != 0 && wanted != size {
                    return ch.error(u, libc::EPERM);
                }
                self.reply_attr(u, ch);
            }
            Op::Open { flags } => {
                if self.read_only && flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
                    return ch.error(u, libc::EROFS);
                }
                // As in the fuser adapter: O_DIRECT opens get FOPEN_DIRECT_IO, the only path on
                // which the kernel lets direct writes to one file run in parallel.
                let mut fopen = abi::FOPEN_PARALLEL_DIRECT_WRITES;
                if flags & libc::O_DIRECT as u32 != 0 {
                    fopen |= abi::FOPEN_DIRECT_IO;
                }
                ch.reply(u, &[&abi::open_out(fopen)]);
            }
            Op::Read { offset, size: len } => {
                let end = offset.saturating_add(u64::from(len)).min(size);
                if offset >= end {
                    return ch.reply(u, &[]);
                }
                let n = usize::try_from(end - offset).unwrap_or(0);
                let (vol, ch) = (self.vol.clone(), ch.clone());
                self.rt.spawn(async move {
                    match vol.read_at_parts(offset, n).await {
                        // Written to /dev/fuse straight from the received buffers (pieces of a
                        // large read too: one writev, no join).
                        Ok(parts) => {
                            let slices: Vec<&[u8]> = parts.iter().map(|p| &p[..]).collect();
                            ch.reply(u, &slices);
                        }
                        Err(e) => {
                            warn!(offset, len = n, error = %e, "read failed");
                            ch.error(u, errno_code(&e));
                        }
                    }
                });
            }
            Op::Write { offset, data } => {
                if self.read_only {
                    return ch.error(u, libc::EROFS);
                }
                let end = offset.checked_add(data.len() as u64);
                if end.is_none_or(|e| e > size) {
                    return ch.error(u, if offset >= size { libc::ENOSPC } else { libc::EFBIG });
                }
                let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                let (vol, ch) = (self.vol.clone(), ch.clone());
                self.rt.spawn(async move {
                    match vol.write_at(offset, data).await {
                        Ok(()) => ch.reply(u, &[&abi::write_out(n)]),
                        Err(e) => {
                            warn!(offset, len = n, error = %e, "write failed");
                            ch.error(u, errno_code(&e));
                        }
                    }
                });
            }
            // close(2) promises nothing about durability; fsync does.
            Op::Flush | Op::Release | Op::Destroy => ch.reply(u, &[]),
            Op::Fsync => {
                let vol = self.vol.clone();
                self.done(u, ch, "fsync", async move { vol.flush().await });
            }
            Op::Fallocate { offset, length, mode } => {
                if self.read_only {
                    return ch.error(u, libc::EROFS);
                }
                if offset.checked_add(length).is_none_or(|end| end > size) {
                    return ch.error(u, libc::EINVAL);
                }
                let mode = i32::try_from(mode).unwrap_or(-1);
                let vol = self.vol.clone();
                match mode {
                    // Plain allocation: the volume is thin, nothing to do and no data changes.
                    0 | FALLOC_FL_KEEP_SIZE => ch.reply(u, &[]),
                    m if m == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE => {
                        self.done(u, ch, "trim", async move { vol.trim(offset, length).await })
                    }
                    m if m & !FALLOC_FL_KEEP_SIZE == FALLOC_FL_ZERO_RANGE => self.done(
                        u,
                        ch,
                        "write zeroes",
                        async move { vol.write_zeroes(offset, length).await },
                    ),
                    _ => ch.error(u, libc::EOPNOTSUPP),
                }
            }
            Op::Statfs => ch.reply(u, &[&abi::statfs_out(size / 4096)]),
            // No extended attributes. ENOSYS (not ENODATA) makes the kernel stop asking: it would
            // otherwise look up `security.capability` before writes, a round trip each.
            Op::Getxattr { .. } => ch.error(u, libc::ENOSYS),
            Op::Listxattr { size: 0 } => ch.reply(u, &[&abi::xattr_size_out(0)]),
            Op::Listxattr { .. } => ch.reply(u, &[]),
            Op::Lookup => ch.error(u, libc::ENOENT),
            Op::NoReply => {}
            Op::Other(_) => ch.error(u, libc::ENOSYS),
        }
    }
}
