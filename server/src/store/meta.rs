//! On-disk formats of the data dir, and atomic replacement of small files.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// `DIR/ferrovol.json`: marks a directory as a ferrovol data dir of a given layout version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DataDirMarker {
    pub format: String,
    pub version: u32,
    pub server_id: String,
}

pub const MARKER_FILE: &str = "ferrovol.json";
pub const MARKER_FORMAT: &str = "ferrovol-data";
pub const LAYOUT_VERSION: u32 = 1;

/// `DIR/volumes/NAME/meta.json`: everything about a volume except its data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeMeta {
    pub version: u32,
    pub name: String,
    pub kind: String,
    pub size: u64,
    pub created_unix_ms: u64,
    /// Incremented at every change of the writer attachment.
    pub generation: u64,
    /// Node id holding the writer attachment.
    pub owner: Option<String>,
    /// When `owner` took the attachment (unix ms); 0 in metadata written before it was recorded.
    #[serde(default)]
    pub attached_unix_ms: u64,
    /// Set at creation (VOLUME_CREATE labels); absent in metadata written before labels existed.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: ferrovol_proto::Labels,
}

/// `DIR/snapshots/NAME/meta.json`: a snapshot's facts; its image is `DIR/snapshots/NAME/data`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub version: u32,
    pub name: String,
    /// The volume it is an image of.
    pub source: String,
    pub size: u64,
    pub created_unix_ms: u64,
    /// The image is complete and durable. A snapshot found not ready at startup is an interrupted
    /// copy, and is removed.
    pub ready: bool,
    /// "reflink" or "copy".
    pub method: String,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: ferrovol_proto::Labels,
    /// The source's kind (`KIND_BLOCK`, `KIND_FS`); absent (block) in metadata written before fs
    /// snapshots existed, and for block ones (so a server of that time still reads them).
    #[serde(default = "kind_block", skip_serializing_if = "is_block")]
    pub kind: String,
}

fn kind_block() -> String {
    KIND_BLOCK.into()
}

fn is_block(kind: &str) -> bool {
    kind == KIND_BLOCK
}

pub fn write_snapshot_meta(dir: &Path, meta: &SnapshotMeta) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
    replace_file(&dir.join(META_FILE), &json)
}

pub fn read_snapshot_meta(dir: &Path) -> Result<SnapshotMeta, String> {
    let path = dir.join(META_FILE);
    let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > 64 << 10 {
        return Err(format!("{}: {} bytes is too large for a metadata file", path.display(), bytes.len()));
    }
    let meta: SnapshotMeta = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not valid snapshot metadata: {e}", path.display()))?;
    if meta.version != 1 {
        return Err(format!("{}: metadata version {} is not supported", path.display(), meta.version));
    }
    Ok(meta)
}

/// Nodes known to this server (NODE_REGISTER, or enrolled by HELLO with the join token).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodesFile {
    pub nodes: std::collections::BTreeMap<String, NodeEntry>,
}

/// One node: when it was first registered, and the SHA-256 (hex) of its credential once enrolled.
/// The credential itself is never stored: only the node has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "NodeEntryOnDisk")]
pub struct NodeEntry {
    pub registered_unix_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_sha256: Option<String>,
    /// An admin reset the node: it may enroll (again) with the join token. A node registered
    /// without a credential otherwise (before credentials existed, or by NODE_REGISTER in open
    /// mode) may not: whoever holds the join token could claim it and its attachments.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enroll: bool,
}

/// Layout 1 wrote a bare registration time per node; both forms are read.
#[derive(Deserialize)]
#[serde(untagged)]
enum NodeEntryOnDisk {
    Registered(u64),
    Entry {
        registered_unix_ms: u64,
        #[serde(default)]
        credential_sha256: Option<String>,
        #[serde(default)]
        enroll: bool,
    },
}

impl From<NodeEntryOnDisk> for NodeEntry {
    fn from(e: NodeEntryOnDisk) -> Self {
        match e {
            NodeEntryOnDisk::Registered(t) => {
                NodeEntry { registered_unix_ms: t, credential_sha256: None, enroll: false }
            }
            NodeEntryOnDisk::Entry { registered_unix_ms, credential_sha256, enroll } => {
                NodeEntry { registered_unix_ms, credential_sha256, enroll }
            }
        }
    }
}

pub const NODES_FILE: &str = "nodes.json";
pub const META_FILE: &str = "meta.json";
pub const DATA_FILE: &str = "data";
pub const KIND_BLOCK: &str = "block";
/// An fs volume: the data file holds an ext4 the server mounts (see `fsmount`).
pub const KIND_FS: &str = "fs";

/// Replaces `path` atomically and durably: write a temp file beside it, fsync it, rename it over
/// `path`, fsync the directory. A crash leaves either the old or the new content, never a mix.
pub fn replace_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| std::io::Error::other("path has no parent"))?;
    let file_name = path.file_name().ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

pub fn write_meta(dir: &Path, meta: &VolumeMeta) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(meta).map_err(std::io::Error::other)?;
    replace_file(&dir.join(META_FILE), &json)
}

pub fn read_meta(dir: &Path) -> Result<VolumeMeta, String> {
    let path = dir.join(META_FILE);
    let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() > 64 << 10 {
        return Err(format!("{}: {} bytes is too large for a metadata file", path.display(), bytes.len()));
    }
    let meta: VolumeMeta = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not valid volume metadata: {e}", path.display()))?;
    if meta.version != 1 {
        return Err(format!("{}: metadata version {} is not supported", path.display(), meta.version));
    }
    Ok(meta)
}
