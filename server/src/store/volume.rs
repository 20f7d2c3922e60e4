//! One volume: a sparse data file and its metadata. Reads are `pread`s into a buffer of the reply's
//! own (see `Volume::read` for why not a memory mapping).

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use ferrovol_proto::{NodeId, VolumeInfo, VolumeName};

use super::copy::{reflink, CopyJob};
use super::fsmount::FsMount;
use super::meta::{write_meta, VolumeMeta};
use crate::error::{StoreError, StoreResult};

/// An open volume. Shared by every connection that OPENed it (`Arc<Volume>`).
#[derive(Debug)]
pub struct Volume {
    pub(crate) name: VolumeName,
    pub(crate) dir: PathBuf,
    file: File,
    size: AtomicU64,
    /// Serialises metadata changes; held across their fsyncs, so the write path never takes it.
    meta: Mutex<VolumeMeta>,
    /// The writer attachment as the data path sees it (a copy of the metadata's owner, generation
    /// and time). Every write holds it shared across its generation check and its pwrite; an
    /// attachment change takes it exclusively, after the metadata is durable, to publish the new
    /// one. So once a takeover or release has been answered, no write of the old holder can land,
    /// not even one that was already in flight on its connection. OPEN reads it too, so it never
    /// waits for a metadata fsync (which holds `meta`).
    fence: RwLock<Attachment>,
    /// Who writes under the current generation: one client session at a time, so two processes of
    /// one node (two `ferrovol attach` of the same volume) cannot both mount it read-write.
    writers: Mutex<WriterSession>,
    /// Connections that have this volume OPEN (delete refuses while > 0).
    pub(crate) opens: AtomicU32,
    /// A DELETE is under way (set under the metadata lock): attachments are refused.
    deleting: std::sync::atomic::AtomicBool,
    /// Recent fdatasync time (ns, moving average): decides whether a FLUSH runs inline.
    flush_ns: AtomicU64,
    /// Point-in-time copies in progress (snapshots and clones that could not be reflinked): every
    /// change first preserves the old content for them (see `copy`). `copying` is their count, the
    /// write path's one atomic load while there are none.
    copies: RwLock<Vec<Arc<CopyJob>>>,
    copying: AtomicUsize,
    /// An fs volume (its data file holds a filesystem the server mounts and serves file by file).
    fs: bool,
    /// The fs volume's mount, from its first OPEN until it is deleted or the server stops.
    mount: Mutex<Option<Arc<FsMount>>>,
    /// One grow or point-in-time copy of the fs volume at a time (see `grow_fs`,
    /// `fs_snapshot_to`; an unmount is refused meanwhile), and whether a grow runs unmounted
    /// (`OFFLINE_*`): a mount is refused meanwhile.
    grow_lock: Mutex<()>,
    offline: std::sync::atomic::AtomicU8,
}

/// The longest an fs volume stays frozen for a copy (`Volume::fs_snapshot_to`): well under the
/// clients' I/O timeout (30 s by default), whose waiting writes would fail past it.
const FREEZE_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// What holds an unmounted fs volume off its mount (`Volume::offline`).
const OFFLINE_NONE: u8 = 0;
const OFFLINE_GROW: u8 = 1;

/// Clears `Volume::offline` when the work it marks ends, however it ends.
struct Offline<'a>(&'a std::sync::atomic::AtomicU8);

impl Drop for Offline<'_> {
    fn drop(&mut self) {
        self.0.store(OFFLINE_NONE, Ordering::Release);
    }
}

/// How [`Volume::snapshot_to`] made its point-in-time copy.
#[derive(Debug)]
pub(crate) enum PointInTime {
    /// Reflinked: complete, of this size.
    Reflinked(u64),
    /// Copied already (an fs volume's, frozen across the copy): complete, of this size.
    Copied(u64),
    /// Registered copy-before-write job: run it, then `end_copy` it.
    Copying(Arc<CopyJob>),
}

/// A volume's writer attachment, as published to the data path (see `Volume::fence`).
#[derive(Debug, Clone, Default)]
struct Attachment {
    generation: u64,
    owner: Option<String>,
    attached_unix_ms: u64,
}

impl Attachment {
    fn of(meta: &VolumeMeta) -> Self {
        Self {
            generation: meta.generation,
            owner: meta.owner.clone(),
            attached_unix_ms: meta.attached_unix_ms,
        }
    }
}

/// The client session that holds read-write handles of a volume under one attachment generation.
#[derive(Debug, Default, Clone, Copy)]
struct WriterSession {
    generation: u64,
    session: u64,
    handles: u32,
}

/// "3m 12s": how long something has been held, for error messages.
pub(crate) fn held_for(since_unix_ms: u64) -> String {
    if since_unix_ms == 0 {
        return "an unknown time".into();
    }
    let s = super::now_unix_ms().saturating_sub(since_unix_ms) / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
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

pub(crate) use ferrovol_proto::format_unix_ms;

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
        let fs = match meta.kind.as_str() {
            super::meta::KIND_BLOCK => false,
            super::meta::KIND_FS => true,
            other => {
                return Err(StoreError::DataDir(format!(
                    "{}: volume kind {other:?} is not known to this server",
                    dir.display()
                )))
            }
        };
        Ok(Self {
            fs,
            mount: Mutex::new(None),
            grow_lock: Mutex::new(()),
            offline: std::sync::atomic::AtomicU8::new(OFFLINE_NONE),
            name,
            dir,
            file,
            size: AtomicU64::new(meta.size),
            fence: RwLock::new(Attachment::of(&meta)),
            writers: Mutex::new(WriterSession::default()),
            meta: Mutex::new(meta),
            opens: AtomicU32::new(0),
            deleting: std::sync::atomic::AtomicBool::new(false),
            // Starts just above the limit: the first flushes go to the pool and are measured.
            flush_ns: AtomicU64::new(2 * INLINE_FLUSH_NS),
            copies: RwLock::new(Vec::new()),
            copying: AtomicUsize::new(0),
        })
    }

    /// Makes `dst` a point-in-time copy of the volume, at one moment while no write is under way
    /// (the fence held exclusively): a reflink, complete at once, where the filesystem can;
    /// otherwise a copy-before-write job registered at that moment, for the caller to run.
    pub(crate) fn snapshot_to(&self, dst: &File) -> StoreResult<PointInTime> {
        // Write back what is dirty first, outside the fence: FICLONE writes back the source's
        // dirty pages before sharing extents, and under the fence that would hold every write off
        // for as long as the whole writeback takes. What arrives meanwhile is little.
        self.file.sync_data().map_err(io_err)?;
        // The copy job (its bitmap is proportional to the size) is made outside the fence too.
        let mut job = Arc::new(CopyJob::new(dst.try_clone().map_err(io_err)?, self.size()));
        let _no_writes = self.fence.write().unwrap_or_else(|p| p.into_inner());
        let size = self.size();
        if reflink(dst, &self.file).map_err(io_err)? {
            return Ok(PointInTime::Reflinked(size));
        }
        if job.size() != size {
            // Grown in between (sizes only grow): rare, so it is made again, under the fence.
            job = Arc::new(CopyJob::new(dst.try_clone().map_err(io_err)?, size));
        }
        self.copies.write().unwrap_or_else(|p| p.into_inner()).push(job.clone());
        self.copying.fetch_add(1, Ordering::AcqRel);
        Ok(PointInTime::Copying(job))
    }

    /// A copy job of [`Volume::snapshot_to`] is over (done, failed or stopped): writes no longer
    /// preserve for it.
    pub(crate) fn end_copy(&self, job: &Arc<CopyJob>) {
        let mut copies = self.copies.write().unwrap_or_else(|p| p.into_inner());
        let before = copies.len();
        copies.retain(|j| !Arc::ptr_eq(j, job));
        if copies.len() < before {
            self.copying.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// The data file, for a copy job's reads.
    pub(crate) fn data_file(&self) -> &File {
        &self.file
    }

    /// Before `[offset, offset + len)` changes: lets every copy in progress save the old content.
    fn preserve(&self, offset: u64, len: u64) {
        if self.copying.load(Ordering::Acquire) == 0 {
            return;
        }
        for job in self.copies.read().unwrap_or_else(|p| p.into_inner()).iter() {
            job.preserve(&self.file, offset, len);
        }
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

    /// Runs `write` (a pwrite, TRIM or WRITE_ZEROES) only if `generation` is still the volume's
    /// writer attachment generation, holding the fence shared until it is done (see `fence`).
    pub fn fenced<T>(&self, generation: u64, write: impl FnOnce() -> StoreResult<T>) -> StoreResult<T> {
        let current = self.fence.read().unwrap_or_else(|p| p.into_inner());
        if current.generation != generation {
            drop(current);
            return Err(StoreError::Fenced(format!(
                "volume {}: the writer attachment this handle was opened under (generation {generation}) \
                 is no longer current ({}); it was released or taken over",
                self.name,
                self.holder_description()
            )));
        }
        write()
    }

    /// "held by node X (generation 4) for 3m 2s" or "no writer attachment".
    fn holder_description(&self) -> String {
        let meta = self.fence.read().unwrap_or_else(|p| p.into_inner()).clone();
        match &meta.owner {
            Some(o) => format!(
                "held by node {o:?}, generation {}, for {}",
                meta.generation,
                held_for(meta.attached_unix_ms)
            ),
            None => "no writer attachment now".into(),
        }
    }

    /// Admits a read-write OPEN by `session` of `node` under `generation`: `node` must hold the
    /// writer attachment and `generation` must be current, and no other client session may have the
    /// volume open for writing under it. Undone by [`Volume::close_writer`].
    pub fn open_writer(&self, node: &NodeId, generation: u64, session: u64) -> StoreResult<()> {
        let meta = self.fence.read().unwrap_or_else(|p| p.into_inner()).clone();
        match &meta.owner {
            None => {
                return Err(StoreError::Fenced(format!(
                    "volume {} has no writer attachment: take it (ATTACH_SET) before opening it read-write",
                    self.name
                )))
            }
            Some(o) if o != node.as_str() => {
                return Err(StoreError::AttachedElsewhere(format!(
                    "volume {} is attached for writing by node {o:?} (for {}), not by \"{node}\"",
                    self.name,
                    held_for(meta.attached_unix_ms)
                )))
            }
            Some(_) if meta.generation != generation => {
                return Err(StoreError::Fenced(format!(
                    "volume {}: generation {generation} is not the current writer attachment ({}): \
                     it was released or taken over",
                    self.name, meta.generation
                )))
            }
            Some(_) => {}
        }
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if w.handles > 0 && w.generation == generation && w.session != session {
            return Err(StoreError::Busy(format!(
                "volume {} is already open for writing by another client of node \"{node}\"; one writer \
                 at a time (detach the other one first)",
                self.name
            )));
        }
        if w.handles == 0 || w.generation != generation {
            *w = WriterSession { generation, session, handles: 0 };
        }
        w.handles += 1;
        Ok(())
    }

    /// A read-write handle opened by [`Volume::open_writer`] is closed.
    pub fn close_writer(&self, generation: u64, session: u64) {
        let mut w = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        if w.generation == generation && w.session == session {
            w.handles = w.handles.saturating_sub(1);
        }
    }

    /// Reads `len` bytes at `offset` with `pread` into a new buffer, which becomes the reply payload.
    ///
    /// One copy (page cache -> buffer) where a shared mapping would need none, measured as the price
    /// of three properties a mapping cannot give: a media error or a file cut short behind the
    /// server's back fails this one request with an I/O status instead of killing the server with
    /// SIGBUS; the reply's CRC is computed over a private buffer, so a write landing during the read
    /// can no longer make the CRC disagree with the bytes sent; and address space is not spent on
    /// volume sizes (a mapping of every volume made ten 16 TiB thin volumes unloadable).
    pub fn read(&self, offset: u64, len: u32) -> StoreResult<Bytes> {
        self.check_range(offset, u64::from(len))?;
        let len = len as usize;
        let mut buf = BytesMut::with_capacity(len);
        while buf.len() < len {
            let at = offset + buf.len() as u64;
            let at = libc::off_t::try_from(at).map_err(|_| StoreError::InvalidArgument("offset".into()))?;
            let filled = buf.len();
            let spare = buf.spare_capacity_mut();
            let want = (len - filled).min(spare.len());
            // SAFETY: pread writes at most `want` bytes into the spare capacity of `buf`, which has at
            // least that much room; nothing reads those bytes before `set_len` marks the ones written.
            let n = unsafe { libc::pread(self.file.as_raw_fd(), spare.as_mut_ptr().cast(), want, at) };
            match n {
                n if n > 0 => {
                    // SAFETY: pread initialised the first `n` (<= `want`) spare bytes.
                    unsafe { buf.set_len(buf.len() + n as usize) };
                }
                0 => {
                    return Err(StoreError::Io(std::io::Error::other(format!(
                        "volume {}: the data file ends before {} (cut short outside the server?)",
                        self.name,
                        offset + buf.len() as u64
                    ))))
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(io_err(e));
                    }
                }
            }
        }
        Ok(buf.freeze())
    }

    /// Writes into the page cache (pwrite: the one copy of a write on the server).
    pub fn write(&self, offset: u64, data: &[u8]) -> StoreResult<()> {
        self.check_range(offset, data.len() as u64)?;
        self.preserve(offset, data.len() as u64);
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
        self.preserve(offset, u64::from(len));
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
        self.preserve(offset, len64);
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
            kind: if self.fs {
                ferrovol_proto::codec::VOLUME_KIND_FS
            } else {
                ferrovol_proto::codec::VOLUME_KIND_BLOCK
            },
            size: meta.size,
            allocated: self.allocated(),
            created_unix_ms: meta.created_unix_ms,
            generation: meta.generation,
            owner: meta.owner.as_deref().and_then(|o| NodeId::try_from(o).ok()),
            attached_unix_ms: if meta.owner.is_some() { meta.attached_unix_ms } else { 0 },
            labels: meta.labels.clone(),
        }
    }

    /// An fs volume (served file by file, never as blocks).
    pub fn is_fs(&self) -> bool {
        self.fs
    }

    /// The fs volume's mount: mounted at the first call (or found mounted, after a restart).
    pub fn fs_mount(&self) -> StoreResult<Arc<FsMount>> {
        if !self.fs {
            return Err(StoreError::InvalidArgument(format!(
                "volume {} is a block volume, not an fs volume",
                self.name
            )));
        }
        self.fs_mount_locked(&mut self.mount.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// `fs_mount` under the mount lock, held by the caller.
    fn fs_mount_locked(&self, m: &mut Option<Arc<FsMount>>) -> StoreResult<Arc<FsMount>> {
        if let Some(m) = &*m {
            return Ok(m.clone());
        }
        // A delete unmounts it, then moves its directory: never mounted again in between.
        if self.deleting.load(Ordering::Acquire) {
            return Err(StoreError::NotFound(format!("{} (being deleted)", self.name)));
        }
        if self.offline.load(Ordering::Acquire) == OFFLINE_GROW {
            return Err(StoreError::Busy(format!(
                "fs volume {} is being grown (e2fsck and resize2fs); try again in a moment",
                self.name
            )));
        }
        let mount = Arc::new(FsMount::mount(&self.dir, &self.dir.join(super::meta::DATA_FILE))?);
        *m = Some(mount.clone());
        Ok(mount)
    }

    /// The fs volume's mount if mounted by this server.
    pub fn mounted(&self) -> Option<Arc<FsMount>> {
        self.mount.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Unmounts the fs volume (delete, shutdown). `BUSY` while a request still uses the mount.
    pub(crate) fn unmount_fs(&self) -> StoreResult<()> {
        if !self.fs {
            return Ok(());
        }
        // Not under a grow or a point-in-time copy (which may mount it meanwhile).
        let Ok(_one) = self.grow_lock.try_lock() else {
            return Err(StoreError::Busy(format!(
                "fs volume {} is being grown or copied for a snapshot or a clone; try again in a moment",
                self.name
            )));
        };
        let mut m = self.mount.lock().unwrap_or_else(|p| p.into_inner());
        match m.take().map(Arc::try_unwrap) {
            Some(Ok(mount)) => mount.unmount()?,
            Some(Err(shared)) => {
                *m = Some(shared);
                return Err(StoreError::Busy(format!("fs volume {} is in use", self.name)));
            }
            // Mounted by an earlier server process and not opened since.
            None => super::fsmount::unmount_dir(&self.dir)?,
        }
        Ok(())
    }

    pub fn owner(&self) -> Option<String> {
        self.lock_meta().owner.clone()
    }

    /// Writes `next` durably, then publishes its generation to the write path (see `fence`).
    fn commit_attachment(&self, meta: &mut VolumeMeta, next: VolumeMeta) -> StoreResult<()> {
        write_meta(&self.dir, &next).map_err(io_err)?;
        *self.fence.write().unwrap_or_else(|p| p.into_inner()) = Attachment::of(&next);
        *meta = next;
        Ok(())
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
        if self.fs {
            let old = meta.size;
            drop(meta);
            return self.grow_fs(old, new_size);
        }
        self.grow_file(&mut meta, new_size)
    }

    /// Grows an fs volume (from `old` bytes): the data file and metadata, then its ext4. In place
    /// while mounted if the server may (CAP_SYS_RESOURCE); else unmounted, which needs a moment
    /// when no client has the volume open and no disconnected session holds files or locks in
    /// its lease (refused, `BUSY`, otherwise; nothing changes). Meanwhile an OPEN that would mount
    /// it is refused (`BUSY`) rather than waiting on a connection's thread, and the metadata lock
    /// is not held across e2fsck and resize2fs (a stat, list or delete does not wait for them).
    /// An offline grow that fails before the filesystem grew puts the file back, so a retry does
    /// it all again; a crash in between is finished at the next mount (`FsMount::mount`).
    fn grow_fs(&self, old: u64, new_size: u64) -> StoreResult<()> {
        let _one = self.grow_lock.lock().unwrap_or_else(|p| p.into_inner());
        if self.lock_meta().size != old {
            return Err(StoreError::Busy(format!("volume {} was resized meanwhile; try again", self.name)));
        }
        let data = self.dir.join(super::meta::DATA_FILE);
        let mount_point = self.dir.join(super::fsmount::MOUNT_DIR);
        let mount_point = std::fs::canonicalize(&mount_point).unwrap_or(mount_point);
        let mut m = self.mount.lock().unwrap_or_else(|p| p.into_inner());
        let mounted = m.is_some() || super::fsmount::mounted_at(&mount_point);
        if mounted && super::fsmount::can_grow_online() {
            drop(m);
            self.grow_file(&mut self.lock_meta(), new_size)?;
            return super::fsmount::grow_online(&mount_point).map_err(|e| {
                StoreError::Io(std::io::Error::other(format!(
                    "volume {} grew to {new_size} bytes but its filesystem did not: {e}; its next mount \
                     finishes the grow",
                    self.name
                )))
            });
        }
        if mounted {
            let opens = self.opens.load(Ordering::Acquire);
            if opens > 0 {
                return Err(StoreError::Busy(format!(
                    "fs volume {} is open by {opens} client handle(s): growing its ext4 while it is \
                     mounted needs CAP_SYS_RESOURCE, which this server lacks; give the server that \
                     capability, or grow the volume while no client has it mounted",
                    self.name
                )));
            }
            match m.take().map(Arc::try_unwrap) {
                Some(Ok(mount)) if !mount.files.is_empty() || !mount.locks.is_empty() => {
                    *m = Some(Arc::new(mount));
                    return Err(StoreError::Busy(format!(
                        "fs volume {}: a disconnected client still holds open files or locks on it (kept \
                         15 s for its reconnect); try again later",
                        self.name
                    )));
                }
                Some(Ok(mount)) => mount.unmount()?,
                Some(Err(shared)) => {
                    *m = Some(shared);
                    return Err(StoreError::Busy(format!(
                        "fs volume {}: file operations are in flight; try again",
                        self.name
                    )));
                }
                None => super::fsmount::unmount_dir(&self.dir)?,
            }
        }
        self.offline.store(OFFLINE_GROW, Ordering::Release);
        let offline = Offline(&self.offline);
        drop(m);
        // The unmount frees its loop device asynchronously (autoclear runs from a work queue).
        let mut attached = super::fsmount::not_attached(&data);
        for _ in 0..40 {
            if attached.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            attached = super::fsmount::not_attached(&data);
        }
        let grown = attached.and_then(|()| self.grow_file(&mut self.lock_meta(), new_size)).and_then(|()| {
            super::fsmount::grow_offline(&data).inspect_err(|_| {
                // Not grown at all: the file goes back to its old size, so a retry redoes it.
                if super::fsmount::fs_bytes(&data).is_ok_and(|fs| fs <= old) {
                    if let Err(e) = self.put_back(old) {
                        tracing::warn!(volume = %self.name, error = %e, "cannot put the data file back after a failed grow");
                    }
                }
            })
        });
        drop(offline);
        grown
    }

    /// Makes `dst` a complete point-in-time copy of the fs volume, a clean filesystem (no journal
    /// to replay); returns its size and whether it was reflinked. The filesystem is mounted (if it
    /// was not) and frozen (FIFREEZE: ext4 writes everything back, empties its journal and holds
    /// each new change, whose caller waits) across a reflink of the data file or, where the data
    /// dir cannot reflink, across the second pass of a copy: the first copies the allocated data
    /// while writes go on, the second compares each chunk with the source and copies it again
    /// where it differs (the writes to the data file come from the loop device, not through the
    /// block path, so the copy-before-write of block snapshots cannot see them). The frozen pass
    /// is given up (`BUSY`) after `FREEZE_MAX`. The copy is not synced yet: the caller syncs it.
    pub(crate) fn fs_snapshot_to(&self, dst: &File) -> StoreResult<(u64, bool)> {
        let _one = self.grow_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Mounted under the lock (or taken over from an earlier server process): a copy of an
        // unmounted image would need mounts held off, and a reconnecting client refused.
        let mount = self.fs_mount_locked(&mut self.mount.lock().unwrap_or_else(|p| p.into_inner()))?;
        let size = self.size();
        let failed = |e: String| {
            StoreError::Io(std::io::Error::other(format!("copying fs volume {}: {e}", self.name)))
        };
        mount.sync();
        {
            let _frozen = mount.freeze()?;
            if reflink(dst, &self.file).map_err(io_err)? {
                return Ok((size, true));
            }
        }
        dst.set_len(size).map_err(io_err)?;
        let job = CopyJob::new(dst.try_clone().map_err(io_err)?, size);
        job.copy(&self.file, &AtomicU64::new(0)).map_err(failed)?;
        // Copied whole while frozen, 1 GiB on this machine's ext4 kept writers waiting 4.8 s; the
        // second pass mostly compares pages still cached (0.23 s).
        mount.sync();
        let started = std::time::Instant::now();
        let frozen = mount.freeze()?;
        let rewritten = job.refresh(&self.file, started + FREEZE_MAX).map_err(|e| {
            StoreError::Busy(format!(
                "fs volume {}: the point-in-time copy was given up after {} s frozen (its writes wait \
                 meanwhile, and a client's fail after its I/O timeout): {e}; the data dir cannot \
                 reflink, so the frozen pass compares all the volume's data. Try again when it is \
                 less busy, or put the data dir on XFS (reflink=1) or btrfs",
                self.name,
                FREEZE_MAX.as_secs()
            ))
        })?;
        drop(frozen);
        tracing::info!(volume = %self.name, rewritten, frozen_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "fs volume copied");
        Ok((size, false))
    }

    /// Undoes `grow_file` for a filesystem that did not grow: the metadata first (a crash then
    /// leaves a file longer than its metadata, which startup trims), then the file.
    fn put_back(&self, old: u64) -> StoreResult<()> {
        let mut meta = self.lock_meta();
        let mut next = meta.clone();
        next.size = old;
        write_meta(&self.dir, &next).map_err(io_err)?;
        *meta = next;
        self.size.store(old, Ordering::Release);
        self.file.set_len(old).map_err(io_err)?;
        self.file.sync_all().map_err(io_err)
    }

    /// Grows the data file and the metadata (a block volume's whole resize).
    fn grow_file(&self, meta: &mut VolumeMeta, new_size: u64) -> StoreResult<()> {
        // Order: grow the file durably, then the metadata, then the visible size. A crash before the
        // metadata write leaves a file longer than its metadata, which startup trims.
        self.file.set_len(new_size).map_err(io_err)?;
        self.file.sync_all().map_err(io_err)?;
        let mut next = meta.clone();
        next.size = new_size;
        write_meta(&self.dir, &next).map_err(io_err)?;
        *meta = next;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// DELETE: checks the holder with `check` and marks the volume as being deleted, in one step
    /// under the metadata lock (see `attach_set`).
    pub(crate) fn mark_deleting(
        &self,
        check: impl FnOnce(Option<&str>) -> StoreResult<()>,
    ) -> StoreResult<()> {
        let meta = self.lock_meta();
        check(meta.owner.as_deref())?;
        self.deleting.store(true, Ordering::Release);
        Ok(())
    }

    pub(crate) fn unmark_deleting(&self) {
        let _meta = self.lock_meta();
        self.deleting.store(false, Ordering::Release);
    }

    /// Sets the writer attachment to `node` and returns its generation. Without `force`: idempotent
    /// while `node` holds it, refused while another node does (the error names the holder and since
    /// when). With `force` (a takeover): always a new generation, which fences every earlier holder,
    /// `node`'s own earlier sessions included.
    ///
    /// `admin`: the caller may take the attachment over from *another* node; without it such a
    /// takeover is `Forbidden`. Checked here, under the metadata lock, so the holder cannot change
    /// between the check and the takeover.
    pub fn attach_set(&self, node: &NodeId, force: bool, admin: bool) -> StoreResult<u64> {
        if self.fs {
            return Err(StoreError::InvalidArgument(format!(
                "volume {} is an fs volume: many nodes mount it at once (ferrovol mount), so it has no \
                 writer attachment",
                self.name
            )));
        }
        let mut meta = self.lock_meta();
        if self.deleting.load(Ordering::Acquire) {
            return Err(StoreError::NotFound(format!("{} (being deleted)", self.name)));
        }
        match &meta.owner {
            Some(owner) if owner != node.as_str() && force && !admin => {
                return Err(StoreError::Forbidden(format!(
                    "taking volume {} over from node {owner:?} needs the admin credential",
                    self.name
                )))
            }
            Some(owner) if owner == node.as_str() && !force => return Ok(meta.generation),
            Some(owner) if owner != node.as_str() && !force => {
                return Err(StoreError::AttachedElsewhere(format!(
                    "volume {} is attached for writing by node {owner:?} since {} ({} ago, generation \
                     {}); detach it there first, or take it over (--force-takeover) only if that node \
                     is known to be dead",
                    self.name,
                    format_unix_ms(meta.attached_unix_ms),
                    held_for(meta.attached_unix_ms),
                    meta.generation
                )))
            }
            _ => {}
        }
        let mut next = meta.clone();
        next.owner = Some(node.as_str().to_owned());
        next.generation += 1;
        next.attached_unix_ms = super::now_unix_ms();
        self.commit_attachment(&mut meta, next)?;
        Ok(meta.generation)
    }

    /// Clears the writer attachment held by `node`, if it is `generation` (0: any generation).
    /// Idempotent when nobody holds it; refused when another node or another generation does (an
    /// old holder must not release its successor's attachment).
    pub fn attach_clear(&self, node: &NodeId, generation: u64) -> StoreResult<()> {
        let mut meta = self.lock_meta();
        match &meta.owner {
            None => return Ok(()),
            Some(owner) if owner != node.as_str() => {
                return Err(StoreError::AttachedElsewhere(format!(
                    "volume {} is attached for writing by node {owner:?}, not by \"{node}\"",
                    self.name
                )))
            }
            Some(_) if generation != 0 && generation != meta.generation => {
                return Err(StoreError::Fenced(format!(
                    "volume {}: generation {generation} is no longer the writer attachment (now {}); \
                     it was taken over, so it is not released",
                    self.name, meta.generation
                )))
            }
            Some(_) => {}
        }
        let mut next = meta.clone();
        next.owner = None;
        next.generation += 1;
        next.attached_unix_ms = 0;
        self.commit_attachment(&mut meta, next)
    }
}

#[cfg(test)]
mod flush_tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(format_unix_ms(1), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_unix_ms(1_796_119_445_000), "2026-12-01 10:04:05 UTC");
    }

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
