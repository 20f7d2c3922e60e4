//! The volume store: a data dir holding one directory per volume.
//!
//! ```text
//! DIR/ferrovol.json            marker: format, layout version, server id
//! DIR/volumes/NAME/data        sparse data file, exactly the volume's size
//! DIR/volumes/NAME/meta.json   VolumeMeta, replaced atomically
//! DIR/volumes/.creating-NAME   a create in progress (removed at startup)
//! DIR/volumes/.deleting-NAME-N a delete in progress (removed at startup)
//! DIR/snapshots/...            snapshots (see `snapshot`)
//! ```
//! Names are validated `VolumeName`s, so they are always a single safe path component.

mod copy;
pub mod fsmount;
pub mod meta;
mod snapshot;
pub mod volume;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ferrovol_proto::limits::{LIST_ENTRIES_MAX, VOLUME_SIZE_ALIGN, VOLUME_SIZE_MAX};
use ferrovol_proto::{Labels, NodeId, VolumeInfo, VolumeName, VolumeSource};
use tracing::{error, info, warn};

use self::meta::*;
pub use self::volume::Volume;
use crate::error::{StoreError, StoreResult};

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    volumes_dir: PathBuf,
    server_id: String,
    /// Known nodes and their credential hashes, mirrored in `nodes.json`.
    nodes: Mutex<BTreeMap<String, NodeEntry>>,
    /// The volume map, and the names reserved by a create or delete in progress. Held only for map
    /// operations, never across I/O: creates and deletes reserve the name, do their I/O unlocked and
    /// come back to publish the result.
    volumes: Mutex<Volumes>,
    snapshots_dir: PathBuf,
    /// Shared with the background copies, which publish or remove their snapshot when done.
    snapshots: Arc<Mutex<snapshot::Snapshots>>,
    /// Pace of background copies, bytes/s (0 = unlimited).
    copy_rate: Arc<std::sync::atomic::AtomicU64>,
    /// Copies running (see `snapshot::COPY_JOBS_MAX`).
    copy_jobs: Arc<std::sync::atomic::AtomicUsize>,
    /// `DIR/ferrovol.lock`, flock'ed for the store's life: one server per data dir.
    _lock: File,
}

/// The lock file: held (flock, exclusive) by the server using the data dir, and holding its pid.
pub const LOCK_FILE: &str = "ferrovol.lock";

/// Takes the data dir's lock, or says who holds it. The kernel releases it when the process dies,
/// however it dies, so a stale lock cannot outlive its server.
fn lock_data_dir(root: &Path) -> StoreResult<File> {
    use std::io::{Read, Seek, Write};
    use std::os::unix::io::AsRawFd;
    let path = root.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| dir_err(&path, e))?;
    // SAFETY: flock on an fd we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(dir_err(&path, format!("cannot lock: {e}")));
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        let who = if holder.is_empty() { "another process".to_owned() } else { format!("pid {holder}") };
        return Err(StoreError::DataDir(format!(
            "{} is in use by another ferrovol server ({who}); one server per data dir",
            root.display()
        )));
    }
    let pid = format!("{}\n", std::process::id());
    let written = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| file.write_all(pid.as_bytes()));
    written.map_err(|e| dir_err(&path, e))?;
    Ok(file)
}
#[derive(Debug, Default)]
struct Volumes {
    map: BTreeMap<VolumeName, Arc<Volume>>,
    /// Being created or deleted: OPEN, CREATE and DELETE of these names are refused meanwhile.
    busy: std::collections::BTreeSet<VolumeName>,
    /// Volumes found at startup that could not be loaded, and why: not served, and their names are
    /// not reused (their data is still on disk for an operator to look at).
    broken: BTreeMap<VolumeName, String>,
}

impl Volumes {
    fn get(&self, name: &VolumeName) -> StoreResult<Arc<Volume>> {
        if let Some(why) = self.broken.get(name) {
            return Err(StoreError::Io(std::io::Error::other(format!(
                "volume {name} could not be loaded at startup: {why}"
            ))));
        }
        self.map.get(name).cloned().ok_or_else(|| StoreError::NotFound(name.to_string()))
    }
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn dir_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::DataDir(format!("{}: {e}", path.display()))
}

/// The smallest fs volume.
pub const FS_SIZE_MIN: u64 = 32 << 20;

pub fn validate_size(size: u64) -> StoreResult<()> {
    if size == 0 || !size.is_multiple_of(VOLUME_SIZE_ALIGN) || size > VOLUME_SIZE_MAX {
        return Err(StoreError::InvalidArgument(format!(
            "size {size} must be a non-zero multiple of {VOLUME_SIZE_ALIGN} bytes, at most {VOLUME_SIZE_MAX}"
        )));
    }
    Ok(())
}

impl Store {
    /// Opens (or initialises, when missing or empty) a data dir. Refuses a directory it does not
    /// understand, saying why, rather than guessing.
    pub fn open(root: &Path) -> StoreResult<Self> {
        fs::create_dir_all(root).map_err(|e| dir_err(root, e))?;
        let lock = lock_data_dir(root)?;
        let marker_path = root.join(MARKER_FILE);
        let marker = match fs::read(&marker_path) {
            Ok(bytes) => {
                let m: DataDirMarker = serde_json::from_slice(&bytes)
                    .map_err(|e| dir_err(&marker_path, format!("unreadable marker: {e}")))?;
                if m.format != MARKER_FORMAT {
                    return Err(dir_err(
                        &marker_path,
                        format!("format {:?} is not {MARKER_FORMAT:?}", m.format),
                    ));
                }
                if m.version != LAYOUT_VERSION {
                    return Err(dir_err(
                        &marker_path,
                        format!(
                            "layout version {} is not supported (this server knows {LAYOUT_VERSION})",
                            m.version
                        ),
                    ));
                }
                m
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut entries = fs::read_dir(root)
                    .map_err(|e| dir_err(root, e))?
                    .filter(|e| e.as_ref().map_or(true, |e| e.file_name() != LOCK_FILE));
                if let Some(entry) = entries.next() {
                    let entry = entry.map_err(|e| dir_err(root, e))?;
                    return Err(dir_err(
                        root,
                        format!(
                            "not empty (holds {:?}) and has no {MARKER_FILE}: refusing to use a directory \
                             that is not a ferrovol data dir",
                            entry.file_name()
                        ),
                    ));
                }
                let m = DataDirMarker {
                    format: MARKER_FORMAT.into(),
                    version: LAYOUT_VERSION,
                    server_id: format!("{:016x}", rand::random::<u64>()),
                };
                fs::create_dir_all(root.join("volumes")).map_err(|e| dir_err(root, e))?;
                sync_dir(root).map_err(|e| dir_err(root, e))?;
                let json = serde_json::to_vec_pretty(&m).map_err(|e| dir_err(&marker_path, e))?;
                replace_file(&marker_path, &json).map_err(|e| dir_err(&marker_path, e))?;
                info!(dir = %root.display(), "initialised a new data dir");
                m
            }
            Err(e) => return Err(dir_err(&marker_path, e)),
        };
        let volumes_dir = root.join("volumes");
        fs::create_dir_all(&volumes_dir).map_err(|e| dir_err(&volumes_dir, e))?;
        let mut volumes = BTreeMap::new();
        let mut broken = BTreeMap::new();
        for entry in fs::read_dir(&volumes_dir).map_err(|e| dir_err(&volumes_dir, e))? {
            let entry = entry.map_err(|e| dir_err(&volumes_dir, e))?;
            let path = entry.path();
            let fname = entry.file_name();
            let fname = fname.to_string_lossy();
            if fname.starts_with(".creating-") || fname.starts_with(".deleting-") {
                warn!(path = %path.display(), "removing leftover of an interrupted create/delete");
                fs::remove_dir_all(&path).map_err(|e| dir_err(&path, e))?;
                continue;
            }
            let name = VolumeName::try_from(fname.as_ref())
                .map_err(|e| dir_err(&path, format!("not a volume directory name: {e}")))?;
            // A volume that cannot be loaded is reported by name and skipped: the others are served.
            let loaded = read_meta(&path).map_err(StoreError::DataDir).and_then(|meta| {
                if meta.name != name.as_str() {
                    return Err(dir_err(&path, format!("metadata names volume {:?}", meta.name)));
                }
                open_volume(name.clone(), &path, meta)
            });
            match loaded {
                Ok(vol) => {
                    if vol.is_fs() {
                        // A predecessor killed while it froze the filesystem for a snapshot left it
                        // frozen: every write to it, a delete's unmount or a grow would wait forever.
                        fsmount::thaw_left_frozen(&path);
                    }
                    volumes.insert(name, Arc::new(vol));
                }
                Err(e) => {
                    error!(volume = %name, error = %e, "volume cannot be loaded; not serving it");
                    broken.insert(name, e.to_string());
                }
            }
        }
        let snapshots_dir = root.join("snapshots");
        let snapshots = snapshot::load(&snapshots_dir)?;
        let nodes_path = root.join(NODES_FILE);
        let nodes = match fs::read(&nodes_path) {
            Ok(bytes) => {
                serde_json::from_slice::<NodesFile>(&bytes)
                    .map_err(|e| dir_err(&nodes_path, format!("unreadable node list: {e}")))?
                    .nodes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(dir_err(&nodes_path, e)),
        };
        info!(dir = %root.display(), volumes = volumes.len(), snapshots = snapshots.len(), nodes = nodes.len(),
            server_id = %marker.server_id, "data dir open");
        Ok(Self {
            root: root.to_owned(),
            volumes_dir,
            server_id: marker.server_id,
            volumes: Mutex::new(Volumes { map: volumes, busy: Default::default(), broken }),
            snapshots_dir,
            snapshots: Arc::new(Mutex::new(snapshots)),
            copy_rate: Arc::default(),
            copy_jobs: Arc::default(),
            _lock: lock,
            nodes: Mutex::new(nodes),
        })
    }

    /// Paces the copies of snapshots and clones to `bytes_per_s` (0 = unlimited).
    pub fn set_copy_rate(&self, bytes_per_s: u64) {
        self.copy_rate.store(bytes_per_s, Ordering::Relaxed);
    }

    /// Unmounts every mounted fs volume (a clean shutdown).
    pub fn unmount_all(&self) {
        let vols: Vec<Arc<Volume>> = self.lock().map.values().filter(|v| v.is_fs()).cloned().collect();
        for v in vols {
            if let Err(e) = v.unmount_fs() {
                warn!(volume = %v.name(), error = %e, "cannot unmount fs volume; the next server reuses the mount");
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Volumes> {
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &VolumeName) -> StoreResult<Arc<Volume>> {
        self.lock().get(name)
    }

    /// Counts a new open of `name` (undone by decrementing `Volume::opens`), under the same lock as
    /// DELETE's check: a volume is never deleted between being found and being counted as open.
    pub fn open_volume(&self, name: &VolumeName) -> StoreResult<Arc<Volume>> {
        let vols = self.lock();
        if vols.busy.contains(name) {
            return Err(StoreError::Busy(format!("volume {name} is being created or deleted")));
        }
        let vol = vols.get(name)?;
        vol.opens.fetch_add(1, Ordering::AcqRel);
        Ok(vol)
    }

    /// Reserves `name` for a create or delete; released by `Reserved`'s drop.
    fn reserve<'a>(&'a self, vols: &mut Volumes, name: &VolumeName) -> StoreResult<Reserved<'a>> {
        if !vols.busy.insert(name.clone()) {
            return Err(StoreError::Busy(format!("volume {name} is being created or deleted")));
        }
        Ok(Reserved { store: self, name: name.clone() })
    }

    /// Creates a volume: built under a temporary name, then renamed into place, so a crash never leaves
    /// a half-made volume under its real name. With a `source` it starts as a copy of a snapshot or
    /// (a clone) of a volume at this moment; `size` 0 then means the source's size.
    pub fn create(
        &self,
        name: &VolumeName,
        kind: u8,
        size: u64,
        labels: &Labels,
        source: Option<&VolumeSource>,
    ) -> StoreResult<VolumeInfo> {
        if size != 0 || source.is_none() {
            validate_size(size)?;
        }
        ferrovol_proto::validate_labels(labels)?;
        let fs = kind == ferrovol_proto::codec::VOLUME_KIND_FS;
        // With a source, the size (when given) is at least the source's, already an fs volume's.
        if fs && source.is_none() && size < FS_SIZE_MIN {
            return Err(StoreError::InvalidArgument(format!(
                "volume {name}: an fs volume is at least {} MiB (its ext4 journal and metadata)",
                FS_SIZE_MIN >> 20
            )));
        }
        let reserved = {
            let mut vols = self.lock();
            if vols.map.contains_key(name) || vols.broken.contains_key(name) {
                return Err(StoreError::AlreadyExists(name.to_string()));
            }
            self.reserve(&mut vols, name)?
        };
        let tmp = self.volumes_dir.join(format!(".creating-{name}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp)?;
        let result = (|| -> StoreResult<VolumeMeta> {
            let data = File::options().read(true).write(true).create_new(true).open(tmp.join(DATA_FILE))?;
            let size = match source {
                None => size,
                Some(src) => self.fill_from(&data, name, fs, size, src)?,
            };
            let source_len = data.metadata()?.len();
            data.set_len(size)?;
            match source {
                _ if !fs => {}
                None => fsmount::mkfs(&tmp.join(DATA_FILE))?,
                // Made larger than its source: the filesystem grows with it now, unmounted.
                Some(_) if size > source_len => fsmount::grow_offline(&tmp.join(DATA_FILE))?,
                Some(_) => {}
            }
            data.sync_all()?;
            let meta = VolumeMeta {
                version: 1,
                name: name.to_string(),
                kind: if fs { KIND_FS } else { KIND_BLOCK }.into(),
                size,
                created_unix_ms: now_unix_ms(),
                generation: 0,
                owner: None,
                attached_unix_ms: 0,
                labels: labels.clone(),
            };
            write_meta(&tmp, &meta)?;
            Ok(meta)
        })();
        let meta = match result {
            Ok(m) => m,
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let final_dir = self.volumes_dir.join(name.as_str());
        fs::rename(&tmp, &final_dir)?;
        sync_dir(&self.volumes_dir)?;
        let vol = Arc::new(open_volume(name.clone(), &final_dir, meta)?);
        let info = vol.info();
        self.lock().map.insert(name.clone(), vol);
        drop(reserved);
        match source {
            None => info!(volume = %name, size = info.size, "volume created"),
            Some(src) => {
                info!(volume = %name, size = info.size, source = ?src, "volume created from a source")
            }
        }
        Ok(info)
    }

    /// Fills a new volume's data file from `source` (a reflink where the filesystem can, else a
    /// sparse copy); returns the volume's size: `size`, or the source's when `size` is 0.
    fn fill_from(
        &self,
        data: &File,
        name: &VolumeName,
        fs: bool,
        size: u64,
        source: &VolumeSource,
    ) -> StoreResult<u64> {
        // A block image is no filesystem of ours, and an fs one is ext4 metadata a block volume's
        // user did not ask for: the kinds must match.
        let same_kind = |what: String, source_fs: bool| -> StoreResult<()> {
            if source_fs == fs {
                return Ok(());
            }
            let k = |f: bool| if f { "an fs" } else { "a block" };
            Err(StoreError::InvalidArgument(format!(
                "volume {name}: {what} is of {} volume, so the volume made from it is {} volume too \
                 (asked for {} volume)",
                k(source_fs),
                k(source_fs),
                k(fs)
            )))
        };
        let check = |source_size: u64| -> StoreResult<u64> {
            match size {
                0 => Ok(source_size),
                s if s < source_size => Err(StoreError::TooSmall(format!(
                    "volume {name}: size {s} is smaller than its source ({source_size} bytes); a volume made \
                     from a snapshot or a volume is at least as large as it"
                ))),
                s => Ok(s),
            }
        };
        // Restores and clones copy within the request, so they are not paced (the caller waits),
        // but they count against the copies running at once.
        match source {
            VolumeSource::Snapshot(snap) => {
                let (image, image_size, image_fs) = self.snapshot_image(snap)?;
                same_kind(format!("snapshot {snap}"), image_fs)?;
                let size = check(image_size)?;
                let _slot = snapshot::CopySlot::take(&self.copy_jobs)?;
                if !copy::reflink(data, &image)? {
                    data.set_len(image_size)?;
                    copy::CopyJob::new(data.try_clone()?, image_size)
                        .run(&image, &std::sync::atomic::AtomicU64::new(0))
                        .map_err(|e| {
                            StoreError::Io(std::io::Error::other(format!("copying snapshot {snap}: {e}")))
                        })?;
                }
                Ok(size)
            }
            VolumeSource::Volume(src) => {
                let vol = self.get(src)?;
                same_kind(format!("volume {src}"), vol.is_fs())?;
                check(vol.size())?;
                let _slot = snapshot::CopySlot::take(&self.copy_jobs)?;
                if vol.is_fs() {
                    return check(vol.fs_snapshot_to(data)?.0);
                }
                let source_size = match vol.snapshot_to(data)? {
                    volume::PointInTime::Reflinked(s) | volume::PointInTime::Copied(s) => s,
                    volume::PointInTime::Copying(job) => {
                        let copied = data
                            .set_len(job.size())
                            .map_err(|e| e.to_string())
                            .and_then(|()| job.run(vol.data_file(), &std::sync::atomic::AtomicU64::new(0)));
                        vol.end_copy(&job);
                        copied.map_err(|e| {
                            StoreError::Io(std::io::Error::other(format!("cloning volume {src}: {e}")))
                        })?;
                        job.size()
                    }
                };
                check(source_size)
            }
        }
    }

    /// Deletes a volume. Refused while any connection has it open, and while a node holds its writer
    /// attachment (persisted: it holds across server restarts and while the holder is away) unless
    /// `force` (the caller checked that it is an admin): never delete data that may still be in use.
    pub fn delete(&self, name: &VolumeName, force: bool) -> StoreResult<()> {
        let (vol, reserved) = {
            let mut vols = self.lock();
            let vol = vols.get(name)?;
            let opens = vol.opens.load(Ordering::Acquire);
            // The owner check and the mark are one step under the volume's metadata lock, so an
            // ATTACH_SET either lands before (and is seen here) or after (and is refused).
            vol.mark_deleting(|owner| match (owner, force) {
                (Some(owner), false) => Err(StoreError::Busy(format!(
                    "volume {name} is attached for writing by node {owner:?}; detach it there (or an \
                     admin may force the delete once that node is known to be gone)"
                ))),
                _ if opens > 0 => {
                    Err(StoreError::Busy(format!("volume {name} is open on {opens} connection(s)")))
                }
                _ => Ok(()),
            })?;
            // From here OPEN of this name is refused, so `opens` stays 0.
            match self.reserve(&mut vols, name) {
                Ok(r) => (vol, r),
                Err(e) => {
                    vol.unmark_deleting();
                    return Err(e);
                }
            }
        };
        if let Err(e) = vol.unmount_fs() {
            vol.unmark_deleting();
            return Err(e);
        }
        let doomed = self.volumes_dir.join(format!(".deleting-{name}-{}", now_unix_ms()));
        if let Err(e) = fs::rename(&vol.dir, &doomed) {
            vol.unmark_deleting();
            return Err(e.into());
        }
        sync_dir(&self.volumes_dir)?;
        // Its series go while the name is still reserved: a volume made again under it starts anew.
        crate::metrics::metrics().forget(name.as_str());
        self.lock().map.remove(name);
        drop(reserved);
        if let Err(e) = fs::remove_dir_all(&doomed) {
            warn!(path = %doomed.display(), error = %e, "could not remove deleted volume; startup will retry");
        }
        info!(volume = %name, "volume deleted");
        Ok(())
    }

    /// Volumes in name order, strictly after `start_after`; `more` tells whether the list was cut.
    pub fn list(&self, start_after: Option<&VolumeName>, max_entries: u32) -> (Vec<VolumeInfo>, bool) {
        let max = max_entries.clamp(1, LIST_ENTRIES_MAX) as usize;
        let vols: Vec<Arc<Volume>> = {
            let vols = self.lock();
            let map = &vols.map;
            let iter: Box<dyn Iterator<Item = (&VolumeName, &Arc<Volume>)>> = match start_after {
                Some(s) => Box::new(
                    map.range::<VolumeName, _>((std::ops::Bound::Excluded(s), std::ops::Bound::Unbounded)),
                ),
                None => Box::new(map.iter()),
            };
            iter.take(max + 1).map(|(_, v)| v.clone()).collect()
        };
        let more = vols.len() > max;
        (vols.iter().take(max).map(|v| v.info()).collect(), more)
    }

    pub fn resize(&self, name: &VolumeName, size: u64) -> StoreResult<VolumeInfo> {
        validate_size(size)?;
        let vol = self.get(name)?;
        vol.resize(size)?;
        info!(volume = %name, size, "volume resized");
        Ok(vol.info())
    }

    /// Sets `node`'s writer attachment (see [`Volume::attach_set`]). A takeover from *another*
    /// node needs an admin (`admin`): a node may not fence another one on its own say-so.
    pub fn attach_set(&self, name: &VolumeName, node: &NodeId, force: bool, admin: bool) -> StoreResult<u64> {
        let vol = self.get(name)?;
        let before = vol.info();
        let generation = vol.attach_set(node, force, admin)?;
        if generation != before.generation {
            match before.owner {
                Some(old) if force => {
                    warn!(volume = %name, node = %node, from = %old, generation, "writer attachment taken over")
                }
                _ => info!(volume = %name, node = %node, generation, "writer attachment set"),
            }
        }
        Ok(generation)
    }

    pub fn attach_clear(&self, name: &VolumeName, node: &NodeId, generation: u64) -> StoreResult<()> {
        self.get(name)?.attach_clear(node, generation)?;
        info!(volume = %name, node = %node, "writer attachment cleared");
        Ok(())
    }

    fn lock_nodes(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeEntry>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `change` to a copy of the node table and makes it durable, then current.
    fn change_nodes<T>(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, NodeEntry>) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let mut nodes = self.lock_nodes();
        let mut next = NodesFile { nodes: nodes.clone() };
        let out = change(&mut next.nodes)?;
        if next.nodes.len() > ferrovol_proto::limits::NODES_MAX {
            return Err(StoreError::NoSpace);
        }
        let path = self.root.join(NODES_FILE);
        let json = serde_json::to_vec_pretty(&next).map_err(|e| dir_err(&path, e))?;
        replace_file(&path, &json)?;
        *nodes = next.nodes;
        Ok(out)
    }

    /// Records `node` as known (persistently); returns when it was first registered.
    pub fn node_register(&self, node: &NodeId) -> StoreResult<u64> {
        if let Some(e) = self.lock_nodes().get(node.as_str()) {
            return Ok(e.registered_unix_ms);
        }
        let t = self.change_nodes(|nodes| {
            let e = nodes.entry(node.as_str().to_owned()).or_insert(NodeEntry {
                registered_unix_ms: now_unix_ms(),
                credential_sha256: None,
                enroll: false,
            });
            Ok(e.registered_unix_ms)
        })?;
        info!(node = %node, "node registered");
        Ok(t)
    }

    pub fn node_stat(&self, node: &NodeId) -> StoreResult<u64> {
        let nodes = self.lock_nodes();
        nodes
            .get(node.as_str())
            .map(|e| e.registered_unix_ms)
            .ok_or_else(|| StoreError::NodeNotFound(node.to_string()))
    }

    /// The SHA-256 (hex) of `node`'s credential, if it is enrolled.
    pub fn node_credential(&self, node: &NodeId) -> Option<String> {
        self.lock_nodes().get(node.as_str()).and_then(|e| e.credential_sha256.clone())
    }

    /// Enrolls `node` with a credential whose SHA-256 (hex) is `credential_sha256`; registers it if
    /// it was not. Refused (`AlreadyExists`) when it already has a credential: an enrolled identity
    /// is never replaced by whoever holds the join token.
    pub fn node_enroll(&self, node: &NodeId, credential_sha256: String) -> StoreResult<()> {
        self.change_nodes(|nodes| {
            let e = nodes.entry(node.as_str().to_owned()).or_insert(NodeEntry {
                registered_unix_ms: now_unix_ms(),
                credential_sha256: None,
                enroll: true,
            });
            if e.credential_sha256.is_some() {
                return Err(StoreError::AlreadyExists(format!("node {node}")));
            }
            if !e.enroll {
                return Err(StoreError::Forbidden(format!(
                    "node {node} is registered but has no credential (registered before credentials \
                     existed, or without one); an admin must `ferrovol node reset {node}` before it \
                     can enroll"
                )));
            }
            e.credential_sha256 = Some(credential_sha256);
            e.enroll = false;
            Ok(())
        })?;
        info!(node = %node, "node enrolled");
        Ok(())
    }

    /// Forgets `node`'s credential (admin: a node that lost it, or one to lock out until it enrolls
    /// again). Its registration stays. `NodeNotFound` for a node never registered.
    pub fn node_reset(&self, node: &NodeId) -> StoreResult<()> {
        self.change_nodes(|nodes| {
            let e = nodes.get_mut(node.as_str()).ok_or_else(|| StoreError::NodeNotFound(node.to_string()))?;
            e.credential_sha256 = None;
            e.enroll = true;
            Ok(())
        })?;
        warn!(node = %node, "node credential reset; the node must enroll again");
        Ok(())
    }

    /// Capacity of the filesystem holding the data dir, and what the volumes were given.
    pub fn stat(&self) -> StoreResult<ferrovol_proto::StoreStat> {
        let c = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes())
            .map_err(|_| dir_err(&self.root, "path contains NUL"))?;
        // SAFETY: statvfs is plain data; an all-zero value is valid and the kernel overwrites it.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid NUL-terminated path and a pointer to a properly sized, writable struct.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return Err(dir_err(&self.root, std::io::Error::last_os_error()));
        }
        let frsize = st.f_frsize;
        let (provisioned_bytes, volumes) = {
            let vols = self.lock();
            (vols.map.values().map(|v| v.size()).sum(), vols.map.len() as u64)
        };
        Ok(ferrovol_proto::StoreStat {
            total_bytes: st.f_blocks.saturating_mul(frsize),
            // f_bavail: what an unprivileged process may still use (the root reserve is not ours).
            free_bytes: st.f_bavail.saturating_mul(frsize),
            provisioned_bytes,
            volumes,
        })
    }

    /// fdatasync every volume (shutdown).
    pub fn flush_all(&self) -> StoreResult<()> {
        let vols: Vec<_> = self.lock().map.values().cloned().collect();
        for v in vols {
            v.flush()?;
        }
        Ok(())
    }
}

/// A name reserved by a create or delete in progress; released on drop, whatever the outcome.
struct Reserved<'a> {
    store: &'a Store,
    name: VolumeName,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.store.lock().busy.remove(&self.name);
    }
}

fn open_volume(name: VolumeName, dir: &Path, meta: VolumeMeta) -> StoreResult<Volume> {
    let data_path = dir.join(DATA_FILE);
    let file =
        OpenOptions::new().read(true).write(true).open(&data_path).map_err(|e| dir_err(&data_path, e))?;
    let len = file.metadata().map_err(|e| dir_err(&data_path, e))?.len();
    validate_size(meta.size).map_err(|e| dir_err(dir, e))?;
    if len != meta.size {
        // A resize interrupted between growing the file and writing the metadata: the metadata is
        // authoritative (the grown range was never acknowledged to anyone).
        warn!(volume = %name, file_len = len, meta_size = meta.size, "data file size differs from metadata; fixing");
        file.set_len(meta.size).map_err(|e| dir_err(&data_path, e))?;
        file.sync_all().map_err(|e| dir_err(&data_path, e))?;
    }
    Volume::open(name, dir.to_owned(), file, meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> VolumeName {
        VolumeName::try_from(s).unwrap()
    }

    #[test]
    fn create_list_resize_delete_persist() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .create(&name("a"), ferrovol_proto::codec::VOLUME_KIND_BLOCK, 1 << 20, &Labels::new(), None)
            .unwrap();
        store
            .create(&name("b"), ferrovol_proto::codec::VOLUME_KIND_BLOCK, 8192, &Labels::new(), None)
            .unwrap();
        assert!(matches!(
            store.create(&name("a"), ferrovol_proto::codec::VOLUME_KIND_BLOCK, 1 << 20, &Labels::new(), None),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(matches!(
            store.create(&name("c"), ferrovol_proto::codec::VOLUME_KIND_BLOCK, 1000, &Labels::new(), None),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            store.create(&name("c"), ferrovol_proto::codec::VOLUME_KIND_BLOCK, 0, &Labels::new(), None),
            Err(StoreError::InvalidArgument(_))
        ));
        let (l, more) = store.list(None, 1);
        assert_eq!((l.len(), more, l[0].name.as_str()), (1, true, "a"));
        let (l, more) = store.list(Some(&name("a")), 10);
        assert_eq!((l.len(), more, l[0].name.as_str()), (1, false, "b"));
        store.resize(&name("b"), 16384).unwrap();
        assert!(matches!(store.resize(&name("b"), 4096), Err(StoreError::InvalidArgument(_))));
        let v = store.get(&name("b")).unwrap();
        v.write(12288, b"tail").unwrap();
        assert_eq!(&v.read(12288, 4).unwrap()[..], b"tail");
        let node = NodeId::try_from("n1").unwrap();
        assert_eq!(store.attach_set(&name("a"), &node, false, false).unwrap(), 1);
        assert!(matches!(store.delete(&name("a"), false), Err(StoreError::Busy(_))));
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let b = store.get(&name("b")).unwrap();
        assert_eq!(b.size(), 16384);
        assert_eq!(&b.read(12288, 4).unwrap()[..], b"tail");
        assert_eq!(store.get(&name("a")).unwrap().owner().as_deref(), Some("n1"));
        assert!(matches!(store.attach_clear(&name("a"), &node, 7), Err(StoreError::Fenced(_))));
        store.attach_clear(&name("a"), &node, 1).unwrap();
        store.delete(&name("a"), false).unwrap();
        assert!(matches!(store.get(&name("a")), Err(StoreError::NotFound(_))));
        assert!(matches!(store.delete(&name("a"), false), Err(StoreError::NotFound(_))));

        // A forced delete overrides a recorded attachment, never an open volume.
        store.attach_set(&name("b"), &node, false, false).unwrap();
        let opened = store.open_volume(&name("b")).unwrap();
        assert!(matches!(store.delete(&name("b"), true), Err(StoreError::Busy(_))));
        opened.opens.fetch_sub(1, Ordering::AcqRel);
        store.delete(&name("b"), true).unwrap();
    }

    #[test]
    fn nodes_and_capacity_persist() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = NodeId::try_from("node-a").unwrap();
        assert!(matches!(store.node_stat(&a), Err(StoreError::NodeNotFound(_))));
        let t = store.node_register(&a).unwrap();
        assert_eq!(store.node_register(&a).unwrap(), t, "registering again keeps the first time");
        store
            .create(&name("v"), ferrovol_proto::codec::VOLUME_KIND_BLOCK, 1 << 30, &Labels::new(), None)
            .unwrap();
        let st = store.stat().unwrap();
        assert_eq!((st.provisioned_bytes, st.volumes), (1 << 30, 1));
        assert!(st.total_bytes >= st.free_bytes && st.total_bytes > 0);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.node_stat(&a).unwrap(), t);
    }

    #[test]
    fn fencing_and_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .create(&name("v"), ferrovol_proto::codec::VOLUME_KIND_BLOCK, 8192, &Labels::new(), None)
            .unwrap();
        let v = store.get(&name("v")).unwrap();
        let a = NodeId::try_from("a").unwrap();
        let b = NodeId::try_from("b").unwrap();
        let write = |g: u64| v.fenced(g, || v.write(0, b"x"));
        assert!(matches!(v.open_writer(&a, 0, 1), Err(StoreError::Fenced(_))), "no attachment, no writer");
        assert_eq!(v.attach_set(&a, false, false).unwrap(), 1);
        assert_eq!(v.attach_set(&a, false, false).unwrap(), 1, "idempotent");
        let e = v.attach_set(&b, false, false).unwrap_err();
        assert!(
            matches!(&e, StoreError::AttachedElsewhere(m) if m.contains("\"a\"") && m.contains("ago")),
            "{e}"
        );
        assert!(matches!(v.open_writer(&b, 1, 2), Err(StoreError::AttachedElsewhere(_))));
        assert!(matches!(v.open_writer(&a, 2, 1), Err(StoreError::Fenced(_))), "stale generation");
        v.open_writer(&a, 1, 1).unwrap();
        v.open_writer(&a, 1, 1).unwrap(); // the same session again (a second connection)
        assert!(matches!(v.open_writer(&a, 1, 9), Err(StoreError::Busy(_))), "another session of a");
        write(1).unwrap();
        // A takeover fences generation 1, even for the same node.
        // Taking it from another node needs an admin (a node may not fence another on its own).
        assert!(matches!(v.attach_set(&b, true, false), Err(StoreError::Forbidden(_))));
        assert_eq!(v.attach_set(&b, true, true).unwrap(), 2);
        assert!(matches!(write(1), Err(StoreError::Fenced(_))));
        v.open_writer(&b, 2, 3).unwrap();
        write(2).unwrap();
        v.close_writer(1, 1); // an old handle closing does not release the new session
        assert!(matches!(v.open_writer(&b, 2, 4), Err(StoreError::Busy(_))));
        v.close_writer(2, 3);
        v.open_writer(&b, 2, 4).unwrap();
        assert!(matches!(v.attach_clear(&a, 0), Err(StoreError::AttachedElsewhere(_))));
        v.attach_clear(&b, 2).unwrap();
        assert!(matches!(write(2), Err(StoreError::Fenced(_))), "released: fenced too");
        assert!(matches!(v.write(8190, b"xyz"), Err(StoreError::OutOfRange { .. })));
        assert!(matches!(v.read(u64::MAX, 2), Err(StoreError::OutOfRange { .. })));
        v.write(0, &[1u8; 8192]).unwrap();
        v.trim(0, 4096).unwrap();
        v.write_zeroes(4096, 100).unwrap();
        let r = v.read(0, 8192).unwrap();
        assert!(r[..4196].iter().all(|b| *b == 0));
        assert!(r[4196..].iter().all(|b| *b == 1));
    }

    #[test]
    fn node_credentials_persist_and_old_node_lists_load() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        // A node list written before credentials existed.
        fs::write(dir.path().join(NODES_FILE), br#"{"nodes":{"old":1700000000000}}"#).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = NodeId::try_from("old").unwrap();
        assert_eq!(store.node_stat(&old).unwrap(), 1_700_000_000_000);
        assert_eq!(store.node_credential(&old), None);
        // Registered without a credential: the join token alone cannot claim it; a reset can.
        assert!(matches!(store.node_enroll(&old, "aa".into()), Err(StoreError::Forbidden(_))));
        store.node_reset(&old).unwrap();
        store.node_enroll(&old, "aa".into()).unwrap();
        assert!(matches!(store.node_enroll(&old, "bb".into()), Err(StoreError::AlreadyExists(_))));
        let new = NodeId::try_from("new").unwrap();
        store.node_enroll(&new, "cc".into()).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.node_credential(&old).as_deref(), Some("aa"));
        assert_eq!(store.node_stat(&old).unwrap(), 1_700_000_000_000, "registration time kept");
        assert_eq!(store.node_credential(&new).as_deref(), Some("cc"));
        store.node_reset(&old).unwrap();
        assert_eq!(store.node_credential(&old), None);
        assert!(matches!(
            store.node_reset(&NodeId::try_from("x").unwrap()),
            Err(StoreError::NodeNotFound(_))
        ));
        store.node_enroll(&old, "dd".into()).unwrap();
    }

    #[test]
    fn thin_volumes_take_no_address_space_and_a_bad_volume_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // 16 TiB where the filesystem allows it (ext4 with 4 KiB blocks stops just below).
        let size = [16u64 << 40, (16u64 << 40) - (1 << 30), 1 << 40]
            .into_iter()
            .find(|s| {
                let probe = dir.path().join("probe");
                let ok = File::create(&probe).and_then(|f| f.set_len(*s)).is_ok();
                let _ = fs::remove_file(&probe);
                ok
            })
            .unwrap();
        for i in 0..10 {
            store
                .create(
                    &name(&format!("thin{i}")),
                    ferrovol_proto::codec::VOLUME_KIND_BLOCK,
                    size,
                    &Labels::new(),
                    None,
                )
                .unwrap();
        }
        drop(store);
        fs::write(dir.path().join("volumes/thin3/meta.json"), b"{ not json").unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in [0, 1, 2, 4, 5, 6, 7, 8, 9] {
            let v = store.get(&name(&format!("thin{i}"))).unwrap();
            v.write(size - 4096, b"end").unwrap();
            assert_eq!(&v.read(size - 4096, 3).unwrap()[..], b"end");
        }
        let e = store.get(&name("thin3")).unwrap_err().to_string();
        assert!(e.contains("thin3") && e.contains("could not be loaded"), "{e}");
        assert!(matches!(
            store.create(
                &name("thin3"),
                ferrovol_proto::codec::VOLUME_KIND_BLOCK,
                4096,
                &Labels::new(),
                None
            ),
            Err(StoreError::AlreadyExists(_))
        ));
    }

    #[test]
    fn a_data_file_cut_short_fails_the_read_not_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .create(&name("v"), ferrovol_proto::codec::VOLUME_KIND_BLOCK, 1 << 20, &Labels::new(), None)
            .unwrap();
        let v = store.get(&name("v")).unwrap();
        v.write(0, &[7u8; 8192]).unwrap();
        // Truncated behind the server's back (a mapping would SIGBUS here).
        File::options().write(true).open(dir.path().join("volumes/v/data")).unwrap().set_len(4096).unwrap();
        assert_eq!(&v.read(0, 4096).unwrap()[..], &[7u8; 4096][..]);
        let e = v.read(0, 65536).unwrap_err();
        assert!(matches!(e, StoreError::Io(_)), "{e}");
    }

    #[test]
    fn one_store_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("in use by another ferrovol server"), "{err}");
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(first);
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn refuses_foreign_dirs_and_cleans_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("precious.txt"), b"x").unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a ferrovol data dir"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        fs::create_dir(dir.path().join("volumes/.creating-x")).unwrap();
        fs::create_dir(dir.path().join("volumes/BAD")).unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not a volume directory name"), "{err}");
        fs::remove_dir(dir.path().join("volumes/BAD")).unwrap();
        Store::open(dir.path()).unwrap();
        assert!(!dir.path().join("volumes/.creating-x").exists());

        fs::write(
            dir.path().join(MARKER_FILE),
            br#"{"format":"ferrovol-data","version":99,"server_id":"x"}"#,
        )
        .unwrap();
        let err = Store::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("layout version 99"), "{err}");
    }
}
