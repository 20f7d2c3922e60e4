//! Point-in-time copies of a volume's data file, for snapshots and clones.
//!
//! Two ways, tried in this order:
//! - **Reflink** (`FICLONE`, on xfs and btrfs): the copy shares the source's extents and is made at
//!   once, while the volume's writes are held off (its fence taken exclusively), so it is exactly
//!   the content at that moment.
//! - **Copy before write**: a [`CopyJob`] registered with the volume at one moment (again under
//!   the exclusive fence, so no write is half done) copies the data file sparsely, chunk by chunk,
//!   in the background while the volume stays writable. A write, TRIM or WRITE_ZEROES to a chunk
//!   not copied yet first copies that chunk's old content (see `Volume::preserve`). So every chunk
//!   of the copy holds the content of the moment of registration: either it was copied before any
//!   change reached it, or the first change copied it first.
//!
//! Holes are skipped (SEEK_DATA): a chunk still a hole while not yet copied was a hole at the
//! moment of registration (any change to it since would have copied it first), and the copy is a
//! sparse file of the same size, so it reads as zeros there too.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// The unit of copying and of copy-before-write.
pub const CHUNK: u64 = 1 << 20;

/// Stripes of the per-chunk locks.
const LOCK_STRIPES: usize = 64;

/// `FICLONE` (`_IOW(0x94, 9, int)`): makes `dst` share all of `src`'s extents.
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Makes `dst` a reflink of all of `src`. `Ok(false)` when the filesystem cannot (no reflink
/// support, or the two files are on different filesystems): the caller copies instead.
pub fn reflink(dst: &File, src: &File) -> std::io::Result<bool> {
    // SAFETY: FICLONE takes the source fd as its integer argument; no memory of ours is involved.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::ENOSYS) => Ok(false),
        _ => Err(e),
    }
}

/// A point-in-time copy of the first `size` bytes of a source file into `dst`, in progress.
#[derive(Debug)]
pub struct CopyJob {
    dst: File,
    size: u64,
    /// One bit per chunk: copied (or a hole, or beyond `size`).
    done: Vec<AtomicU64>,
    /// Bytes of `size` copied or skipped so far (progress).
    copied: AtomicU64,
    /// Striped by chunk: held while one chunk is checked and copied, so the background copy and
    /// copy-before-write of the same chunk never run at once, while writes to other chunks go on.
    chunk_locks: [Mutex<()>; LOCK_STRIPES],
    /// Stop: the snapshot was deleted, or a copy-before-write failed (the message says why).
    stopped: AtomicBool,
    failure: Mutex<Option<String>>,
}

impl CopyJob {
    pub fn new(dst: File, size: u64) -> Self {
        let chunks = size.div_ceil(CHUNK);
        let words = usize::try_from(chunks.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            dst,
            size,
            done: (0..words).map(|_| AtomicU64::new(0)).collect(),
            copied: AtomicU64::new(0),
            chunk_locks: std::array::from_fn(|_| Mutex::new(())),
            stopped: AtomicBool::new(false),
            failure: Mutex::new(None),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed).min(self.size)
    }

    fn is_done(&self, chunk: u64) -> bool {
        let (w, b) = ((chunk / 64) as usize, chunk % 64);
        self.done[w].load(Ordering::Acquire) & (1 << b) != 0
    }

    /// Marks `chunk` done (after its copy, with its stripe lock held).
    fn mark_done(&self, chunk: u64) {
        let (w, b) = ((chunk / 64) as usize, chunk % 64);
        let before = self.done[w].fetch_or(1 << b, Ordering::AcqRel);
        if before & (1 << b) == 0 {
            self.copied.fetch_add(self.chunk_len(chunk), Ordering::Relaxed);
        }
    }

    fn chunk_len(&self, chunk: u64) -> u64 {
        CHUNK.min(self.size - chunk * CHUNK)
    }

    /// Marks chunks `from..to` done because the source has only holes there. No lock is needed: a
    /// chunk still a hole and not done holds zeros as of the moment of registration (any change
    /// since would have copied it and marked it done first), which the sparse copy already reads
    /// as; and marking a chunk done again changes nothing. Whole words at a time, so a huge thin
    /// volume's holes are skipped quickly.
    fn mark_holes(&self, from: u64, to: u64) {
        let mut c = from;
        while c < to {
            let (w, b) = ((c / 64) as usize, c % 64);
            let n = (64 - b).min(to - c);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << b };
            let before = self.done[w].fetch_or(mask, Ordering::AcqRel);
            let newly = mask & !before;
            let mut bytes = u64::from(newly.count_ones()) * CHUNK;
            let last = self.size.div_ceil(CHUNK) - 1;
            if last / 64 == w as u64 && newly & (1 << (last % 64)) != 0 {
                bytes = bytes - CHUNK + self.chunk_len(last);
            }
            self.copied.fetch_add(bytes, Ordering::Relaxed);
            c += n;
        }
    }

    /// Stops the job (a deleted snapshot): the background copy ends at its next chunk.
    pub fn stop(&self, why: &str) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(why.to_owned());
        }
        self.stopped.store(true, Ordering::Release);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    fn failure(&self) -> String {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| "stopped".into())
    }

    /// Copies `chunk` of `src` unless it is done; an all-zero chunk is left a hole in the copy.
    fn copy_chunk(&self, src: &File, chunk: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let stripe = usize::try_from(chunk % LOCK_STRIPES as u64).unwrap_or(0);
        let _held = self.chunk_locks[stripe].lock().unwrap_or_else(|p| p.into_inner());
        if self.is_done(chunk) {
            return Ok(());
        }
        let start = chunk * CHUNK;
        let len = usize::try_from(CHUNK.min(self.size - start)).unwrap_or(usize::MAX);
        buf.resize(len, 0);
        src.read_exact_at(buf, start)?;
        if buf.iter().any(|&b| b != 0) {
            self.dst.write_all_at(buf, start)?;
        }
        self.mark_done(chunk);
        Ok(())
    }

    /// Sleeps until `copied` bytes since `started` are within `rate` bytes/s, in short steps so a
    /// stop is seen promptly.
    fn pace(&self, started: std::time::Instant, copied: u64, rate: u64) {
        if rate == 0 {
            return;
        }
        let due = std::time::Duration::from_secs_f64(copied as f64 / rate as f64);
        while started.elapsed() < due && !self.is_stopped() {
            std::thread::sleep((due - started.elapsed()).min(std::time::Duration::from_millis(50)));
        }
    }

    /// Before `[offset, offset + len)` of the source changes: copies the old content of its chunks
    /// that are not copied yet. A failure stops the job (the copy is then unusable) but never fails
    /// the write: a snapshot must not cost the volume its writes.
    pub fn preserve(&self, src: &File, offset: u64, len: u64) {
        if self.is_stopped() || len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let mut buf = Vec::new();
        for chunk in offset / CHUNK..end.div_ceil(CHUNK) {
            if self.is_done(chunk) {
                continue;
            }
            if let Err(e) = self.copy_chunk(src, chunk, &mut buf) {
                self.stop(&format!("copying the old content of a range about to be written failed: {e}"));
                return;
            }
        }
    }

    /// The background copy: every chunk not done yet, skipping holes, at most `rate` bytes/s of
    /// data copied (0 = unlimited; read at every chunk, so a change applies to running copies).
    /// Returns when all are done, or the error that stopped it.
    pub fn run(&self, src: &File, rate: &AtomicU64) -> Result<(), String> {
        self.copy(src, rate)?;
        self.dst.sync_all().map_err(|e| format!("syncing the copy failed: {e}"))
    }

    /// `run` without its final sync: the caller syncs the copy (after thawing what it froze).
    pub fn copy(&self, src: &File, rate: &AtomicU64) -> Result<(), String> {
        let chunks = self.size.div_ceil(CHUNK);
        let started = std::time::Instant::now();
        let mut copied_here = 0u64;
        let mut buf = Vec::with_capacity(usize::try_from(CHUNK).unwrap_or(usize::MAX));
        let mut chunk = 0;
        while chunk < chunks {
            if self.is_stopped() {
                return Err(self.failure());
            }
            if self.is_done(chunk) {
                chunk += 1;
                continue;
            }
            let start = chunk * CHUNK;
            // The next data at or after this chunk: every chunk wholly before it is a hole.
            let next_data = match seek_data(src, start) {
                Ok(Some(d)) => d.min(self.size),
                Ok(None) => self.size,
                Err(e) => return Err(format!("finding the data of the source failed: {e}")),
            };
            let first_data_chunk = next_data / CHUNK;
            if first_data_chunk > chunk {
                let to = first_data_chunk.min(chunks);
                self.mark_holes(chunk, to);
                chunk = to;
                continue;
            }
            self.copy_chunk(src, chunk, &mut buf).map_err(|e| format!("copying failed: {e}"))?;
            copied_here += CHUNK;
            self.pace(started, copied_here, rate.load(Ordering::Relaxed));
            chunk += 1;
        }
        if self.is_stopped() {
            return Err(self.failure());
        }
        Ok(())
    }
}

impl CopyJob {
    /// Brings a finished copy up to date with `src`: every chunk that differs now is copied again
    /// (zeros where `src` has a hole). Chunks that are holes in both are skipped; the rest are read
    /// from both and compared, which costs little where both are still in the page cache (a
    /// copy just made). Returns the bytes rewritten; an error once `deadline` has passed.
    pub fn refresh(&self, src: &File, deadline: std::time::Instant) -> Result<u64, String> {
        let chunks = self.size.div_ceil(CHUNK);
        let (mut now, mut copied) = (Vec::new(), Vec::new());
        let mut rewritten = 0;
        let mut chunk = 0;
        while chunk < chunks {
            if std::time::Instant::now() > deadline {
                return Err(format!("not done in time ({} of {} MiB compared)", chunk, chunks));
            }
            let start = chunk * CHUNK;
            let next = |f: &File| -> Result<u64, String> {
                Ok(seek_data(f, start).map_err(|e| format!("finding data failed: {e}"))?.unwrap_or(self.size))
            };
            let first_data_chunk = next(src)?.min(next(&self.dst)?) / CHUNK;
            if first_data_chunk > chunk {
                chunk = first_data_chunk;
                continue;
            }
            let len = usize::try_from(CHUNK.min(self.size - start)).unwrap_or(usize::MAX);
            now.resize(len, 0);
            copied.resize(len, 0);
            src.read_exact_at(&mut now, start).map_err(|e| format!("reading the source failed: {e}"))?;
            self.dst
                .read_exact_at(&mut copied, start)
                .map_err(|e| format!("reading the copy failed: {e}"))?;
            if now != copied {
                self.dst.write_all_at(&now, start).map_err(|e| format!("updating the copy failed: {e}"))?;
                rewritten += len as u64;
            }
            chunk += 1;
        }
        Ok(rewritten)
    }
}

/// `lseek(SEEK_DATA)`: the first data offset at or after `from`, `None` when only a hole follows.
/// A filesystem without hole reporting answers `from` itself (all data), which is still correct.
fn seek_data(f: &File, from: u64) -> std::io::Result<Option<u64>> {
    let off = libc::off_t::try_from(from).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on an fd we own; no memory is involved. (The fd's offset is never used for I/O:
    // every read and write of a data file is positioned.)
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure
mod tests {
    use super::*;

    fn file_with(len: u64, writes: &[(u64, &[u8])]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(len).unwrap();
        for (off, data) in writes {
            f.write_all_at(data, *off).unwrap();
        }
        (dir, f)
    }

    fn read_all(f: &File, len: u64) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn copies_data_and_keeps_holes() {
        let size = 5 * CHUNK + 4096;
        let (_d1, src) = file_with(size, &[(0, b"head"), (3 * CHUNK + 7, b"middle"), (size - 4, b"tail")]);
        let (_d2, dst) = file_with(size, &[]);
        let job = CopyJob::new(dst.try_clone().unwrap(), size);
        job.run(&src, &AtomicU64::new(0)).unwrap();
        assert_eq!(job.copied(), size);
        assert_eq!(read_all(&dst, size), read_all(&src, size));
    }

    #[test]
    fn a_refresh_brings_a_copy_up_to_date_and_rewrites_only_what_changed() {
        let size = 6 * CHUNK + 4096;
        let (_d1, src) = file_with(size, &[(0, &[1u8; 4096]), (2 * CHUNK, &[2u8; 8192]), (size - 3, b"end")]);
        let (_d2, dst) = file_with(size, &[]);
        let job = CopyJob::new(dst.try_clone().unwrap(), size);
        job.copy(&src, &AtomicU64::new(0)).unwrap();
        assert_eq!(
            job.refresh(&src, std::time::Instant::now() + std::time::Duration::from_secs(60)).unwrap(),
            0,
            "nothing changed"
        );
        // Changed after the copy: data in a copied chunk, in a hole, and a chunk made a hole.
        src.write_all_at(b"changed", 2 * CHUNK + 100).unwrap();
        src.write_all_at(&[5u8; 4096], 4 * CHUNK).unwrap();
        // SAFETY: fallocate on an fd we own, plain integers.
        let rc = unsafe {
            libc::fallocate(
                src.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                CHUNK as libc::off_t,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(
            job.refresh(&src, std::time::Instant::now() + std::time::Duration::from_secs(60)).unwrap(),
            3 * CHUNK
        );
        assert_eq!(read_all(&dst, size), read_all(&src, size));
    }

    #[test]
    fn writes_during_the_copy_do_not_reach_it() {
        let size = 4 * CHUNK;
        let (_d1, src) = file_with(size, &[(0, &[1u8; 4096]), (2 * CHUNK, &[2u8; 4096])]);
        let before = read_all(&src, size);
        let (_d2, dst) = file_with(size, &[]);
        let job = CopyJob::new(dst.try_clone().unwrap(), size);
        // Changes after the moment of registration: each preserves first, as Volume does.
        job.preserve(&src, 0, 10);
        src.write_all_at(&[9u8; 10], 0).unwrap();
        job.preserve(&src, CHUNK + 5, 4096); // a hole at registration, written now
        src.write_all_at(&[8u8; 4096], CHUNK + 5).unwrap();
        job.preserve(&src, 2 * CHUNK, 4096);
        src.write_all_at(&[0u8; 4096], 2 * CHUNK).unwrap();
        job.run(&src, &AtomicU64::new(0)).unwrap();
        assert_eq!(read_all(&dst, size), before);
        assert_ne!(read_all(&src, size), before);
    }

    #[test]
    fn holes_are_marked_by_words_and_counted_once() {
        let size = 200 * CHUNK + 4096;
        let (_d, dst) = file_with(4096, &[]);
        let job = CopyJob::new(dst, size);
        job.mark_holes(3, 130);
        job.mark_holes(100, 201);
        assert_eq!(job.copied(), size - 3 * CHUNK);
        assert!((3..201).all(|c| job.is_done(c)) && !job.is_done(2));
        job.mark_holes(0, 201);
        assert_eq!(job.copied(), size);
    }

    #[test]
    fn a_stopped_job_reports_why() {
        let (_d1, src) = file_with(2 * CHUNK, &[(0, b"x")]);
        let (_d2, dst) = file_with(2 * CHUNK, &[]);
        let job = CopyJob::new(dst, 2 * CHUNK);
        job.stop("snapshot deleted");
        assert_eq!(job.run(&src, &AtomicU64::new(0)).unwrap_err(), "snapshot deleted");
    }
}
