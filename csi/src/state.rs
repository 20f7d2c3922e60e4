//! What the node plugin must know after a restart, on disk: one JSON record per staged volume (where
//! it is staged, its loop device, its attach process, where it is published), written atomically
//! (temp file, fsync, rename) before and after every step, so a plugin killed mid-operation finds
//! exactly what was set up.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub volume_id: String,
    pub staging_path: PathBuf,
    /// An fs volume: a FUSE mount of the server's files at the staging path (no image, no loop).
    #[serde(default)]
    pub fs: bool,
    pub block: bool,
    pub fs_type: String,
    pub mount_flags: Vec<String>,
    pub read_only: bool,
    /// The writer attachment generation from ControllerPublish's publish context: the attach
    /// process opens the volume under it, and is fenced once it is no longer current.
    #[serde(default)]
    pub generation: Option<u64>,
    /// The FUSE file the attach process serves the volume on.
    pub image: PathBuf,
    pub attach_pid: Option<u32>,
    pub loop_dev: Option<String>,
    /// NodePublish targets (bind mounts).
    pub targets: Vec<PathBuf>,
    /// The target of a SINGLE_NODE_SINGLE_WRITER publish: while it is published, no other target
    /// may be.
    #[serde(default)]
    pub exclusive_target: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn open(root: &Path) -> std::io::Result<Self> {
        for sub in ["volumes", "images", "logs"] {
            fs::create_dir_all(root.join(sub))?;
        }
        Ok(Self { root: root.to_owned() })
    }

    /// `id` is a valid ferrovol volume name (checked by the caller), so it is a safe file name.
    fn record(&self, id: &str) -> PathBuf {
        self.root.join("volumes").join(format!("{id}.json"))
    }

    pub fn image(&self, id: &str) -> PathBuf {
        self.root.join("images").join(format!("{id}.img"))
    }

    pub fn log(&self, id: &str) -> PathBuf {
        self.root.join("logs").join(format!("attach-{id}.log"))
    }

    /// How many volumes have a staging record (staged, or being staged or unstaged).
    pub fn count(&self) -> usize {
        fs::read_dir(self.root.join("volumes"))
            .map(|d| {
                d.filter_map(Result::ok).filter(|e| e.path().extension().is_some_and(|x| x == "json")).count()
            })
            .unwrap_or(0)
    }

    pub fn load(&self, id: &str) -> std::io::Result<Option<Staged>> {
        match fs::read(self.record(id)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                std::io::Error::other(format!("{}: not a staging record: {e}", self.record(id).display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, st: &Staged) -> std::io::Result<()> {
        let path = self.record(&st.volume_id);
        let tmp = path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(st).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
    }

    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        match fs::remove_file(self.record(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        assert_eq!(s.load("v").unwrap(), None);
        let st = Staged {
            volume_id: "v".into(),
            staging_path: "/s".into(),
            fs: false,
            block: false,
            fs_type: "ext4".into(),
            mount_flags: vec![],
            read_only: false,
            generation: Some(3),
            image: s.image("v"),
            attach_pid: Some(7),
            loop_dev: None,
            targets: vec!["/t".into()],
            exclusive_target: None,
        };
        s.save(&st).unwrap();
        assert_eq!(s.load("v").unwrap(), Some(st));
        s.remove("v").unwrap();
        s.remove("v").unwrap();
        assert_eq!(s.load("v").unwrap(), None);
    }
}
