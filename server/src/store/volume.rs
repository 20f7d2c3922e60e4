//! One volume: a sparse data file, its read-only shared mapping, and its metadata.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use bytes::Bytes;
use ferrovol_proto::{NodeId, VolumeInfo, VolumeName};
use memmap2::Mmap;

use super::meta::{write_meta, VolumeMeta};
use crate::error::{StoreError, StoreResult};

/// An open volume. Shared by every connection that OPENed it (`Arc<Volume>`).
#[derive(Debug)]
pub struct Volume {
    pub(crate) name: VolumeName,
    pub(crate) dir: PathBuf,
    file: File,
    /// The whole data file mapped read-only and shared, as `Bytes` (`Bytes::from_owner`): a READ reply
    /// is a slice of it, sent to the socket straight from the page cache. Replaced on growth; old
    /// mappings stay valid for replies still in flight because a volume never shrinks.
    map: RwLock<Bytes>,
    size: AtomicU64,
    /// Serialises metadata changes; held across their fsyncs, so the write path never takes it.
    meta: Mutex<VolumeMeta>,
    /// The writer attachment as the write path checks it: a copy of `meta.owner`, replaced (briefly)
    /// after the metadata is durable, so a write never waits for a metadata fsync.
    owner: RwLock<Option<String>>,
    /// Connections that have this volume OPEN (delete refuses while > 0).
    pub(crate) opens: AtomicU32,
    /// Recent fdatasync time (ns, moving average): decides whether a FLUSH runs inline.
    flush_ns: AtomicU64,
}

/// A FLUSH whose recent fdatasyncs took less than this runs inline on the connection's thread (two
/// thread wakeups saved, tens of microseconds each here); slower ones go to the blocking pool so a
/// long sync never stalls the connection.
const INLINE_FLUSH_NS: u64 = 100_000;

/// Moving average of sync times: 1/4 weight for the new sample, which is capped at 10x the inline
/// limit so one very slow sync is forgotten after a few fast ones.
fn next_average(old: u64, sample_ns: u64) -> u64 {
    old - old / 4 + sample_ns.min(10 * INLINE_FLUSH_NS) / 4
}

/// The mapping as an owner for `Bytes::from_owner`.
struct MapOwner(Mmap);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn map_file(file: &File) -> std::io::Result<Bytes> {
    // SAFETY: the mapping is read-only and MAP_SHARED over a file that only this server modifies (through
    // pwrite/fallocate, which keep the page cache coherent with the mapping) and never shrinks while
    // mapped, so reads through it cannot fault. Content may change under a reader; readers treat it as a
    // snapshot of unspecified age, exactly like a concurrent pread. Someone truncating the file from
    // outside the server could cause SIGBUS; the data dir is the server's own (documented).
    let map = unsafe { Mmap::map(file)? };
    Ok(Bytes::from_owner(MapOwner(map)))
}

fn io_err(e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        StoreError::NoSpace
    } else {
        StoreError::Io(e)
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate takes a valid open fd and plain integers; it touches no memory of ours.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Volume {
    pub(crate) fn open(name: VolumeName, dir: PathBuf, file: File, meta: VolumeMeta) -> StoreResult<Self> {
        let map = map_file(&file)?;
        Ok(Self {
            name,
            dir,
            file,
            map: RwLock::new(map),
            size: AtomicU64::new(meta.size),
            owner: RwLock::new(meta.owner.clone()),
            meta: Mutex::new(meta),
            opens: AtomicU32::new(0),
            // Starts just above the limit: the first flushes go to the pool and are measured.
            flush_ns: AtomicU64::new(2 * INLINE_FLUSH_NS),
        })
    }

    pub fn name(&self) -> &VolumeName {
        &self.name
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn lock_meta(&self) -> std::sync::MutexGuard<'_, VolumeMeta> {
        // A panic while holding the lock cannot leave the struct half-updated (fields are assigned after
        // the disk write succeeded), so a poisoned lock is still consistent.
        self.meta.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> StoreResult<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::OutOfRange { offset, len, size }),
        }
    }

    /// Fencing: may a session of `node` write? Yes when nobody holds the writer attachment, or `node` does.
    pub fn check_writer(&self, node: &NodeId) -> StoreResult<()> {
        let owner = self.owner.read().unwrap_or_else(|p| p.into_inner());
        match &*owner {
            Some(owner) if owner != node.as_str() => Err(StoreError::Fenced { owner: owner.clone() }),
            _ => Ok(()),
        }
    }

    /// Reads `len` bytes at `offset`: a slice of the shared mapping, no copy.
    pub fn read(&self, offset: u64, len: u32) -> StoreResult<Bytes> {
        self.check_range(offset, u64::from(len))?;
        let map = self.map.read().unwrap_or_else(|p| p.into_inner()).clone();
        let start = usize::try_from(offset).map_err(|_| StoreError::InvalidArgument("offset".into()))?;
        let end = start + len as usize;
        if end > map.len() {
            // Cannot happen: the mapping is replaced before the size grows. Refuse instead of panicking.
            return Err(StoreError::OutOfRange { offset, len: u64::from(len), size: map.len() as u64 });
        }
        Ok(map.slice(start..end))
    }

    /// Writes into the page cache (pwrite: the one copy of a write on the server).
    pub fn write(&self, offset: u64, data: &[u8]) -> StoreResult<()> {
        self.check_range(offset, data.len() as u64)?;
        self.file.write_all_at(data, offset).map_err(io_err)
    }

    /// Makes every acknowledged write durable (fdatasync).
    pub fn flush(&self) -> StoreResult<()> {
        let t = std::time::Instant::now();
        let r = self.file.sync_data().map_err(io_err);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let old = self.flush_ns.load(Ordering::Relaxed);
        self.flush_ns.store(next_average(old, ns), Ordering::Relaxed);
        r
    }

    /// Whether recent flushes were fast enough to run inline (see `INLINE_FLUSH_NS`).
    pub fn flush_is_fast(&self) -> bool {
        self.flush_ns.load(Ordering::Relaxed) < INLINE_FLUSH_NS
    }

    /// Deallocates a range: it reads back as zeros and stops counting as allocated.
    pub fn trim(&self, offset: u64, len: u32) -> StoreResult<()> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(());
        }
        fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, u64::from(len))
            .map_err(io_err)
    }

    /// Zeroes a range without data on the wire: ZERO_RANGE, else a punched hole, else written zeros.
    pub fn write_zeroes(&self, offset: u64, len: u32) -> StoreResult<()> {
        self.check_range(offset, u64::from(len))?;
        if len == 0 {
            return Ok(());
        }
        let len64 = u64::from(len);
        match fallocate(&self.file, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len64) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => return Err(io_err(e)),
            Err(_) => {}
        }
        match fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len64) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => return Err(io_err(e)),
            Err(_) => {}
        }
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len64 {
            let n = usize::try_from(len64 - done).unwrap_or(usize::MAX).min(zeros.len());
            self.file.write_all_at(&zeros[..n], offset + done).map_err(io_err)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Bytes of storage the data file occupies.
    pub fn allocated(&self) -> u64 {
        self.file.metadata().map(|m| m.blocks() * 512).unwrap_or(0)
    }

    pub fn info(&self) -> VolumeInfo {
        let meta = self.lock_meta().clone();
        VolumeInfo {
            name: self.name.clone(),
            kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
            size: meta.size,
            allocated: self.allocated(),
            created_unix_ms: meta.created_unix_ms,
            generation: meta.generation,
            owner: meta.owner.as_deref().and_then(|o| NodeId::try_from(o).ok()),
            labels: meta.labels.clone(),
        }
    }

    pub fn owner(&self) -> Option<String> {
        self.owner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish_owner(&self, owner: Option<String>) {
        *self.owner.write().unwrap_or_else(|p| p.into_inner()) = owner;
    }

    /// Grows the volume. Shrinking is refused: it would destroy data under a filesystem and invalidate
    /// mappings that READ replies in flight still reference.
    pub fn resize(&self, new_size: u64) -> StoreResult<()> {
        let mut meta = self.lock_meta();
        if new_size == meta.size {
            return Ok(());
        }
        if new_size < meta.size {
            return Err(StoreError::InvalidArgument(format!(
                "shrinking a volume is not supported ({} -> {new_size} bytes)",
                meta.size
            )));
        }
        // Order: grow the file durably, then the mapping, then the metadata, then the visible size. A
        // crash before the metadata write leaves a file longer than its metadata, which startup trims.
        self.file.set_len(new_size).map_err(io_err)?;
        self.file.sync_all().map_err(io_err)?;
        let map = map_file(&self.file)?;
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = map;
        let mut next = meta.clone();
        next.size = new_size;
        write_meta(&self.dir, &next).map_err(io_err)?;
        *meta = next;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Sets the writer attachment to `node`. Idempotent for the same node; refused while another node
    /// holds it. Returns the attachment generation.
    pub fn attach_set(&self, node: &NodeId) -> StoreResult<u64> {
        let mut meta = self.lock_meta();
        match &meta.owner {
            Some(owner) if owner == node.as_str() => return Ok(meta.generation),
            Some(owner) => return Err(StoreError::AttachedElsewhere { owner: owner.clone() }),
            None => {}
        }
        let mut next = meta.clone();
        next.owner = Some(node.as_str().to_owned());
        next.generation += 1;
        write_meta(&self.dir, &next).map_err(io_err)?;
        self.publish_owner(next.owner.clone());
        *meta = next;
        Ok(meta.generation)
    }

    /// Clears the writer attachment held by `node`. Idempotent when nobody holds it; refused when
    /// another node does.
    pub fn attach_clear(&self, node: &NodeId) -> StoreResult<()> {
        let mut meta = self.lock_meta();
        match &meta.owner {
            None => return Ok(()),
            Some(owner) if owner != node.as_str() => {
                return Err(StoreError::AttachedElsewhere { owner: owner.clone() })
            }
            Some(_) => {}
        }
        let mut next = meta.clone();
        next.owner = None;
        next.generation += 1;
        write_meta(&self.dir, &next).map_err(io_err)?;
        self.publish_owner(None);
        *meta = next;
        Ok(())
    }
}

#[cfg(test)]
mod flush_tests {
    use super::*;

    #[test]
    fn inline_only_while_recent_syncs_were_fast() {
        let mut avg = 2 * INLINE_FLUSH_NS; // a new volume
        assert!(avg >= INLINE_FLUSH_NS);
        for _ in 0..4 {
            avg = next_average(avg, 5_000); // tmpfs: microseconds
        }
        assert!(avg < INLINE_FLUSH_NS, "fast syncs go inline after a few");
        avg = next_average(avg, 3_000_000_000); // one 3 s sync (a disk under writeback)
        assert!(avg >= INLINE_FLUSH_NS, "a slow sync sends the next ones to the pool at once");
        for _ in 0..12 {
            avg = next_average(avg, 5_000);
        }
        assert!(avg < INLINE_FLUSH_NS, "and it is forgotten after fast ones");
    }
}
