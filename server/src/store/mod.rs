//! The volume store: a data dir holding one directory per volume.
//!
//! ```text
//! DIR/ferrovol.json            marker: format, layout version, server id
//! DIR/volumes/NAME/data        sparse data file, exactly the volume's size
//! DIR/volumes/NAME/meta.json   VolumeMeta, replaced atomically
//! DIR/volumes/.creating-NAME   a create in progress (removed at startup)
//! DIR/volumes/.deleting-NAME-N a delete in progress (removed at startup)
//! ```
//! Names are validated `VolumeName`s, so they are always a single safe path component.

pub mod meta;
pub mod volume;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ferrovol_proto::limits::{LIST_ENTRIES_MAX, VOLUME_SIZE_ALIGN, VOLUME_SIZE_MAX};
use ferrovol_proto::{Labels, NodeId, VolumeInfo, VolumeName};
use tracing::{info, warn};

use self::meta::*;
pub use self::volume::Volume;
use crate::error::{StoreError, StoreResult};

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    volumes_dir: PathBuf,
    server_id: String,
    /// Registered nodes (NODE_REGISTER), mirrored in `nodes.json`.
    nodes: Mutex<BTreeMap<String, u64>>,
    volumes: Mutex<BTreeMap<VolumeName, Arc<Volume>>>,
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn dir_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::DataDir(format!("{}: {e}", path.display()))
}

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
                let mut entries = fs::read_dir(root).map_err(|e| dir_err(root, e))?;
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
            let meta = read_meta(&path).map_err(StoreError::DataDir)?;
            if meta.name != name.as_str() {
                return Err(dir_err(&path, format!("metadata names volume {:?}", meta.name)));
            }
            let vol = open_volume(name.clone(), &path, meta)?;
            volumes.insert(name, Arc::new(vol));
        }
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
        info!(dir = %root.display(), volumes = volumes.len(), nodes = nodes.len(), server_id = %marker.server_id, "data dir open");
        Ok(Self {
            root: root.to_owned(),
            volumes_dir,
            server_id: marker.server_id,
            volumes: Mutex::new(volumes),
            nodes: Mutex::new(nodes),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<VolumeName, Arc<Volume>>> {
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, name: &VolumeName) -> StoreResult<Arc<Volume>> {
        self.lock().get(name).cloned().ok_or_else(|| StoreError::NotFound(name.to_string()))
    }

    /// Creates a volume: built under a temporary name, then renamed into place, so a crash never leaves
    /// a half-made volume under its real name.
    pub fn create(&self, name: &VolumeName, size: u64, labels: &Labels) -> StoreResult<VolumeInfo> {
        validate_size(size)?;
        ferrovol_proto::validate_labels(labels)?;
        let mut vols = self.lock();
        if let Some(existing) = vols.get(name) {
            let _ = existing;
            return Err(StoreError::AlreadyExists(name.to_string()));
        }
        let tmp = self.volumes_dir.join(format!(".creating-{name}"));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp)?;
        let result = (|| -> StoreResult<VolumeMeta> {
            let data = File::create(tmp.join(DATA_FILE))?;
            data.set_len(size)?;
            data.sync_all()?;
            let meta = VolumeMeta {
                version: 1,
                name: name.to_string(),
                kind: KIND_BLOCK.into(),
                size,
                created_unix_ms: now_unix_ms(),
                generation: 0,
                owner: None,
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
        vols.insert(name.clone(), vol);
        info!(volume = %name, size, "volume created");
        Ok(info)
    }

    /// Deletes a volume. Refused while any connection has it open or a node holds its writer
    /// attachment: never delete data that may still be in use.
    pub fn delete(&self, name: &VolumeName) -> StoreResult<()> {
        let mut vols = self.lock();
        let vol = vols.get(name).cloned().ok_or_else(|| StoreError::NotFound(name.to_string()))?;
        let opens = vol.opens.load(Ordering::Acquire);
        if opens > 0 {
            return Err(StoreError::Busy(format!("volume {name} is open on {opens} connection(s)")));
        }
        if let Some(owner) = vol.owner() {
            return Err(StoreError::Busy(format!(
                "volume {name} is attached for writing by node {owner:?}; clear the attachment first"
            )));
        }
        let doomed = self.volumes_dir.join(format!(".deleting-{name}-{}", now_unix_ms()));
        fs::rename(&vol.dir, &doomed)?;
        sync_dir(&self.volumes_dir)?;
        vols.remove(name);
        drop(vols);
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
            let map = self.lock();
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

    pub fn attach_set(&self, name: &VolumeName, node: &NodeId) -> StoreResult<u64> {
        let generation = self.get(name)?.attach_set(node)?;
        info!(volume = %name, node = %node, generation, "writer attachment set");
        Ok(generation)
    }

    pub fn attach_clear(&self, name: &VolumeName, node: &NodeId) -> StoreResult<()> {
        self.get(name)?.attach_clear(node)?;
        info!(volume = %name, node = %node, "writer attachment cleared");
        Ok(())
    }

    /// Records `node` as known (persistently); returns when it was first registered.
    pub fn node_register(&self, node: &NodeId) -> StoreResult<u64> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = nodes.get(node.as_str()) {
            return Ok(*t);
        }
        if nodes.len() >= ferrovol_proto::limits::NODES_MAX {
            return Err(StoreError::NoSpace);
        }
        let now = now_unix_ms();
        let mut next = NodesFile { nodes: nodes.clone() };
        next.nodes.insert(node.as_str().to_owned(), now);
        let path = self.root.join(NODES_FILE);
        let json = serde_json::to_vec_pretty(&next).map_err(|e| dir_err(&path, e))?;
        replace_file(&path, &json)?;
        *nodes = next.nodes;
        info!(node = %node, "node registered");
        Ok(now)
    }

    pub fn node_stat(&self, node: &NodeId) -> StoreResult<u64> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(node.as_str()).copied().ok_or_else(|| StoreError::NodeNotFound(node.to_string()))
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
            let map = self.lock();
            (map.values().map(|v| v.size()).sum(), map.len() as u64)
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
        let vols: Vec<_> = self.lock().values().cloned().collect();
        for v in vols {
            v.flush()?;
        }
        Ok(())
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
        store.create(&name("a"), 1 << 20, &Labels::new()).unwrap();
        store.create(&name("b"), 8192, &Labels::new()).unwrap();
        assert!(matches!(
            store.create(&name("a"), 1 << 20, &Labels::new()),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(matches!(
            store.create(&name("c"), 1000, &Labels::new()),
            Err(StoreError::InvalidArgument(_))
        ));
        assert!(matches!(store.create(&name("c"), 0, &Labels::new()), Err(StoreError::InvalidArgument(_))));
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
        assert_eq!(store.attach_set(&name("a"), &node).unwrap(), 1);
        assert!(matches!(store.delete(&name("a")), Err(StoreError::Busy(_))));
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        let b = store.get(&name("b")).unwrap();
        assert_eq!(b.size(), 16384);
        assert_eq!(&b.read(12288, 4).unwrap()[..], b"tail");
        assert_eq!(store.get(&name("a")).unwrap().owner().as_deref(), Some("n1"));
        store.attach_clear(&name("a"), &node).unwrap();
        store.delete(&name("a")).unwrap();
        assert!(matches!(store.get(&name("a")), Err(StoreError::NotFound(_))));
        assert!(matches!(store.delete(&name("a")), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn nodes_and_capacity_persist() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = NodeId::try_from("node-a").unwrap();
        assert!(matches!(store.node_stat(&a), Err(StoreError::NodeNotFound(_))));
        let t = store.node_register(&a).unwrap();
        assert_eq!(store.node_register(&a).unwrap(), t, "registering again keeps the first time");
        store.create(&name("v"), 1 << 30, &Labels::new()).unwrap();
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
        store.create(&name("v"), 8192, &Labels::new()).unwrap();
        let v = store.get(&name("v")).unwrap();
        let a = NodeId::try_from("a").unwrap();
        let b = NodeId::try_from("b").unwrap();
        v.check_writer(&b).unwrap();
        v.attach_set(&a).unwrap();
        assert_eq!(v.attach_set(&a).unwrap(), 1, "idempotent");
        assert!(matches!(v.attach_set(&b), Err(StoreError::AttachedElsewhere { .. })));
        assert!(matches!(v.check_writer(&b), Err(StoreError::Fenced { .. })));
        v.check_writer(&a).unwrap();
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
