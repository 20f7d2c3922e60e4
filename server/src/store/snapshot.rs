//! Snapshots: read-only point-in-time images of block volumes, kept beside the volumes.
//!
//! ```text
//! DIR/snapshots/NAME/data          the image (a reflink of the volume, or a sparse copy)
//! DIR/snapshots/NAME/meta.json     SnapshotMeta; `ready` once the image is complete and durable
//! DIR/snapshots/.creating-NAME     a create in progress (removed at startup)
//! DIR/snapshots/.deleting-NAME-N   a delete in progress (removed at startup)
//! ```
//! A snapshot is listed as soon as its moment is fixed. A reflinked one is ready at once; a copied
//! one becomes ready when its background copy is done and synced. One found not ready at startup
//! was interrupted (its source has changed since, so it cannot be finished) and is removed.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ferrovol_proto::limits::LIST_ENTRIES_MAX;
use ferrovol_proto::{Labels, SnapshotInfo, VolumeName};
use tracing::{error, info, warn};

use super::copy::CopyJob;
use super::meta::*;
use super::volume::PointInTime;
use super::{dir_err, now_unix_ms, Store};
use crate::error::{StoreError, StoreResult};

#[derive(Debug)]
pub struct Snapshot {
    name: VolumeName,
    dir: PathBuf,
    /// Serialises finishing (or failing) the copy with a delete of this snapshot.
    state: Mutex<SnapshotState>,
}

#[derive(Debug)]
struct SnapshotState {
    meta: SnapshotMeta,
    /// The background copy, while it runs (progress).
    job: Option<Arc<CopyJob>>,
    /// Deleted (or failed and removed): the copy's end must not publish it.
    gone: bool,
}

impl Snapshot {
    fn lock(&self) -> MutexGuard<'_, SnapshotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn info(&self) -> SnapshotInfo {
        let st = self.lock();
        let m = &st.meta;
        let allocated = fs::metadata(self.dir.join(DATA_FILE))
            .map(|md| std::os::unix::fs::MetadataExt::blocks(&md) * 512)
            .unwrap_or(0);
        SnapshotInfo {
            name: self.name.clone(),
            source: VolumeName::try_from(m.source.as_str()).unwrap_or_else(|_| self.name.clone()),
            size: m.size,
            allocated,
            created_unix_ms: m.created_unix_ms,
            ready: m.ready,
            copied_bytes: match (&st.job, m.ready) {
                (_, true) => m.size,
                (Some(job), false) => job.copied(),
                (None, false) => 0,
            },
            labels: m.labels.clone(),
            kind: if m.kind == KIND_FS {
                ferrovol_proto::codec::VOLUME_KIND_FS
            } else {
                ferrovol_proto::codec::VOLUME_KIND_BLOCK
            },
        }
    }

    pub fn source(&self) -> String {
        self.lock().meta.source.clone()
    }
}

/// The snapshot map, and names reserved by a create or delete in progress.
#[derive(Debug, Default)]
pub(crate) struct Snapshots {
    map: BTreeMap<VolumeName, Arc<Snapshot>>,
    busy: BTreeSet<VolumeName>,
    /// Found at startup but unreadable: not served, names not reused.
    broken: BTreeMap<VolumeName, String>,
}

impl Snapshots {
    fn get(&self, name: &VolumeName) -> StoreResult<Arc<Snapshot>> {
        if let Some(why) = self.broken.get(name) {
            return Err(StoreError::Io(std::io::Error::other(format!(
                "snapshot {name} could not be loaded at startup: {why}"
            ))));
        }
        self.map.get(name).cloned().ok_or_else(|| StoreError::SnapshotNotFound(name.to_string()))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
}

/// Loads `dir` (created if missing) at startup: leftovers of interrupted creates and deletes, and
/// snapshots whose copy never finished, are removed; unreadable ones are reported and skipped.
pub(crate) fn load(dir: &Path) -> StoreResult<Snapshots> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| dir_err(dir, e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent).map_err(|e| dir_err(parent, e))?;
        }
    }
    let mut out = Snapshots::default();
    for entry in fs::read_dir(dir).map_err(|e| dir_err(dir, e))? {
        let entry = entry.map_err(|e| dir_err(dir, e))?;
        let path = entry.path();
        let fname = entry.file_name();
        let fname = fname.to_string_lossy();
        if fname.starts_with(".creating-") || fname.starts_with(".deleting-") {
            warn!(path = %path.display(), "removing leftover of an interrupted snapshot create/delete");
            fs::remove_dir_all(&path).map_err(|e| dir_err(&path, e))?;
            continue;
        }
        let name = VolumeName::try_from(fname.as_ref())
            .map_err(|e| dir_err(&path, format!("not a snapshot directory name: {e}")))?;
        match read_snapshot_meta(&path) {
            Ok(meta) if meta.name != name.as_str() => {
                let why = format!("metadata names snapshot {:?}", meta.name);
                error!(snapshot = %name, error = %why, "snapshot cannot be loaded; not serving it");
                out.broken.insert(name, why);
            }
            Ok(meta) if !meta.ready => {
                warn!(snapshot = %name, source = %meta.source,
                    "removing a snapshot whose copy was interrupted (the server stopped before it was done)");
                fs::remove_dir_all(&path).map_err(|e| dir_err(&path, e))?;
            }
            Ok(meta) => {
                let snap = Snapshot {
                    name: name.clone(),
                    dir: path,
                    state: Mutex::new(SnapshotState { meta, job: None, gone: false }),
                };
                out.map.insert(name, Arc::new(snap));
            }
            Err(why) => {
                error!(snapshot = %name, error = %why, "snapshot cannot be loaded; not serving it");
                out.broken.insert(name, why);
            }
        }
    }
    Ok(out)
}

/// Copies of snapshots and clones running at once, store-wide (each holds a thread, a bitmap of
/// its volume's size and disk bandwidth); beyond it SNAPSHOT_CREATE and VOLUME_CREATE from a source
/// get BUSY.
pub const COPY_JOBS_MAX: usize = 16;

/// One of the `COPY_JOBS_MAX` copy slots; freed on drop.
#[derive(Debug)]
pub(crate) struct CopySlot(Arc<std::sync::atomic::AtomicUsize>);

impl CopySlot {
    pub(crate) fn take(count: &Arc<std::sync::atomic::AtomicUsize>) -> StoreResult<Self> {
        use std::sync::atomic::Ordering;
        let n = count.fetch_add(1, Ordering::AcqRel);
        if n >= COPY_JOBS_MAX {
            count.fetch_sub(1, Ordering::AcqRel);
            return Err(StoreError::Busy(format!(
                "{COPY_JOBS_MAX} snapshot or clone copies are already running; retry when one is done"
            )));
        }
        Ok(Self(count.clone()))
    }
}

impl Drop for CopySlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A snapshot name reserved by a create or delete; released on drop.
struct Reserved {
    snaps: Arc<Mutex<Snapshots>>,
    name: VolumeName,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.snaps.lock().unwrap_or_else(|p| p.into_inner()).busy.remove(&self.name);
    }
}

fn io_err(e: std::io::Error) -> StoreError {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        StoreError::NoSpace
    } else {
        StoreError::Io(e)
    }
}

impl Store {
    fn snaps(&self) -> MutexGuard<'_, Snapshots> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reserve_snapshot(&self, snaps: &mut Snapshots, name: &VolumeName) -> StoreResult<Reserved> {
        if !snaps.busy.insert(name.clone()) {
            return Err(StoreError::Busy(format!("snapshot {name} is being created or deleted")));
        }
        Ok(Reserved { snaps: self.snapshots.clone(), name: name.clone() })
    }

    /// Cuts a snapshot of volume `source` (see the module comment). Returns once its moment is fixed:
    /// ready when reflinked, else with its copy running in the background.
    pub fn snapshot_create(
        &self,
        name: &VolumeName,
        source: &VolumeName,
        labels: &Labels,
    ) -> StoreResult<SnapshotInfo> {
        ferrovol_proto::validate_labels(labels)?;
        let reserved = {
            let mut snaps = self.snaps();
            if let Some(s) = snaps.map.get(name) {
                return Err(StoreError::SnapshotExists(format!(
                    "snapshot {name} already exists (of volume {})",
                    s.source()
                )));
            }
            if snaps.broken.contains_key(name) {
                return Err(StoreError::SnapshotExists(format!(
                    "snapshot {name} already exists (unreadable)"
                )));
            }
            self.reserve_snapshot(&mut snaps, name)?
        };
        let vol = self.get(source)?;
        let slot = CopySlot::take(&self.copy_jobs)?;
        let tmp = self.snapshots_dir.join(format!(".creating-{name}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(io_err)?;
        let started = std::time::Instant::now();
        let made = (|| -> StoreResult<(File, PointInTime)> {
            let data = File::options().read(true).write(true).create_new(true).open(tmp.join(DATA_FILE))?;
            let how = if vol.is_fs() {
                match vol.fs_snapshot_to(&data)? {
                    (size, true) => PointInTime::Reflinked(size),
                    (size, false) => PointInTime::Copied(size),
                }
            } else {
                vol.snapshot_to(&data)?
            };
            Ok((data, how))
        })();
        let (data, how) = match made {
            Ok(x) => x,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let (size, job) = match &how {
            PointInTime::Reflinked(size) | PointInTime::Copied(size) => (*size, None),
            PointInTime::Copying(job) => (job.size(), Some(job.clone())),
        };
        let meta = SnapshotMeta {
            version: 1,
            name: name.to_string(),
            source: source.to_string(),
            size,
            created_unix_ms: now_unix_ms(),
            ready: job.is_none(),
            method: if matches!(how, PointInTime::Reflinked(_)) { "reflink" } else { "copy" }.into(),
            labels: labels.clone(),
            kind: if vol.is_fs() { KIND_FS } else { KIND_BLOCK }.into(),
        };
        let final_dir = self.snapshots_dir.join(name.as_str());
        let mut renamed = false;
        let published = (|| -> StoreResult<()> {
            data.set_len(size)?;
            if job.is_none() {
                data.sync_all()?;
            }
            write_snapshot_meta(&tmp, &meta)?;
            fs::rename(&tmp, &final_dir)?;
            renamed = true;
            sync_dir(&self.snapshots_dir)?;
            Ok(())
        })();
        if let Err(e) = published {
            if let Some(job) = &job {
                job.stop("the snapshot could not be created");
                vol.end_copy(job);
            }
            let _ = fs::remove_dir_all(if renamed { &final_dir } else { &tmp });
            return Err(e);
        }
        let snap = Arc::new(Snapshot {
            name: name.clone(),
            dir: final_dir,
            state: Mutex::new(SnapshotState { meta, job: job.clone(), gone: false }),
        });
        self.snaps().map.insert(name.clone(), snap.clone());
        drop(reserved);
        let info = snap.info();
        match job {
            None => {
                info!(snapshot = %name, volume = %source, size, method = %snap.lock().meta.method,
                    ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "snapshot created")
            }
            Some(job) => {
                info!(snapshot = %name, volume = %source, size, "snapshot cut; copying in the background");
                let snaps = self.snapshots.clone();
                let rate = self.copy_rate.clone();
                let (snap2, vol2, job2) = (snap.clone(), vol.clone(), job.clone());
                let thread =
                    std::thread::Builder::new().name(format!("ferrovol-snap-{name}")).spawn(move || {
                        let _slot = slot;
                        finish_copy(&snaps, &snap2, &vol2, &job2, &rate, started)
                    });
                if let Err(e) = thread {
                    // Undo all of it: a job left registered would tax every write from now on.
                    job.stop("its copy thread could not be started");
                    vol.end_copy(&job);
                    snap.lock().gone = true;
                    self.snaps().map.remove(name);
                    let _ = fs::remove_dir_all(&snap.dir);
                    return Err(StoreError::Io(e));
                }
            }
        }
        Ok(info)
    }

    pub fn snapshot_stat(&self, name: &VolumeName) -> StoreResult<SnapshotInfo> {
        let snap = self.snaps().get(name)?;
        Ok(snap.info())
    }

    /// Snapshots in name order strictly after `start_after`, only `source`'s when given.
    pub fn snapshot_list(
        &self,
        source: Option<&VolumeName>,
        start_after: Option<&VolumeName>,
        max_entries: u32,
    ) -> (Vec<SnapshotInfo>, bool) {
        let max = max_entries.clamp(1, LIST_ENTRIES_MAX) as usize;
        let all: Vec<Arc<Snapshot>> = {
            let snaps = self.snaps();
            snaps
                .map
                .iter()
                .filter(|(n, _)| start_after.is_none_or(|s| *n > s))
                .map(|(_, s)| s.clone())
                .collect()
        };
        let mut out = Vec::new();
        let mut more = false;
        for s in all {
            if source.is_some_and(|src| s.source() != src.as_str()) {
                continue;
            }
            if out.len() == max {
                more = true;
                break;
            }
            out.push(s.info());
        }
        (out, more)
    }

    /// Deletes a snapshot; a copy still running is stopped. Volumes created from it are not
    /// affected (they are copies or reflinks of their own).
    pub fn snapshot_delete(&self, name: &VolumeName) -> StoreResult<()> {
        let (snap, reserved) = {
            let mut snaps = self.snaps();
            let snap = snaps.get(name)?;
            let r = self.reserve_snapshot(&mut snaps, name)?;
            (snap, r)
        };
        let copying = {
            let mut st = snap.lock();
            if st.gone {
                return Err(StoreError::SnapshotNotFound(name.to_string()));
            }
            st.gone = true;
            if let Some(job) = &st.job {
                job.stop("the snapshot was deleted");
            }
            st.job.is_some()
        };
        let doomed = self.snapshots_dir.join(format!(".deleting-{name}-{}", now_unix_ms()));
        if let Err(e) = fs::rename(&snap.dir, &doomed) {
            if copying {
                // Its copy is stopped for good: it is gone from the API, and startup removes its
                // not-ready files.
                self.snaps().map.remove(name);
            } else {
                snap.lock().gone = false;
            }
            return Err(io_err(e));
        }
        self.snaps().map.remove(name);
        if let Err(e) = sync_dir(&self.snapshots_dir) {
            warn!(snapshot = %name, error = %e, "syncing the snapshots dir after a delete failed");
        }
        drop(reserved);
        if let Err(e) = fs::remove_dir_all(&doomed) {
            warn!(path = %doomed.display(), error = %e, "could not remove deleted snapshot; startup will retry");
        }
        info!(snapshot = %name, "snapshot deleted");
        Ok(())
    }

    /// Opens a ready snapshot's image for a new volume: the file and its size. The open file stays
    /// valid even if the snapshot is deleted meanwhile.
    pub(crate) fn snapshot_image(&self, name: &VolumeName) -> StoreResult<(File, u64, bool)> {
        let snap = self.snaps().get(name)?;
        let st = snap.lock();
        if st.gone {
            return Err(StoreError::SnapshotNotFound(name.to_string()));
        }
        if !st.meta.ready {
            let done = st.job.as_ref().map_or(0, |j| j.copied());
            return Err(StoreError::Busy(format!(
                "snapshot {name} is not ready yet: its copy is {}% done",
                done * 100 / st.meta.size.max(1)
            )));
        }
        let file = File::open(snap.dir.join(DATA_FILE)).map_err(io_err)?;
        Ok((file, st.meta.size, st.meta.kind == KIND_FS))
    }
}

/// The background copy of a snapshot: when it is done the snapshot is made ready (durably); when
/// it fails, the snapshot is removed (never presented as ready), unless it was deleted meanwhile.
fn finish_copy(
    snaps: &Arc<Mutex<Snapshots>>,
    snap: &Arc<Snapshot>,
    vol: &Arc<super::Volume>,
    job: &Arc<CopyJob>,
    rate: &std::sync::atomic::AtomicU64,
    started: std::time::Instant,
) {
    let copied = job.run(vol.data_file(), rate);
    vol.end_copy(job);
    let next = {
        let st = snap.lock();
        if st.gone {
            return;
        }
        let mut next = st.meta.clone();
        next.ready = true;
        next
    };
    // The metadata is written (two fsyncs) without the snapshot's lock, so stats and lists never
    // wait on them; a delete meanwhile is seen below.
    let recorded = copied.and_then(|()| {
        write_snapshot_meta(&snap.dir, &next).map_err(|e| format!("recording it as ready failed: {e}"))
    });
    let mut st = snap.lock();
    if st.gone {
        return;
    }
    let failure = match recorded {
        Ok(()) => {
            st.meta = next;
            st.job = None;
            info!(snapshot = %snap.name, size = st.meta.size,
                ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "snapshot copy done; ready");
            return;
        }
        Err(why) => why,
    };
    st.gone = true;
    st.job = None;
    drop(st);
    error!(snapshot = %snap.name, error = %failure, "snapshot copy failed; removing the snapshot");
    // Out of the way under another name first: once the name leaves the map, a new snapshot of the
    // same name may be created at the same path.
    let parent = snap.dir.parent().map(Path::to_path_buf).unwrap_or_default();
    let doomed = parent.join(format!(".deleting-{}-{}", snap.name, now_unix_ms()));
    let moved = fs::rename(&snap.dir, &doomed).and_then(|()| sync_dir(&parent));
    {
        let mut s = snaps.lock().unwrap_or_else(|p| p.into_inner());
        if s.map.get(&snap.name).is_some_and(|cur| Arc::ptr_eq(cur, snap)) {
            s.map.remove(&snap.name);
        }
    }
    if let Err(e) = moved.and_then(|()| fs::remove_dir_all(&doomed)) {
        warn!(path = %snap.dir.display(), error = %e, "could not remove the failed snapshot; startup will");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_at_once_are_capped() {
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let slots: Vec<CopySlot> = (0..COPY_JOBS_MAX).map(|_| CopySlot::take(&count).unwrap()).collect();
        assert!(matches!(CopySlot::take(&count), Err(StoreError::Busy(_))));
        drop(slots);
        assert_eq!(count.load(std::sync::atomic::Ordering::Acquire), 0);
        assert!(CopySlot::take(&count).is_ok());
    }
}
