//! The request validators every service shares: required fields, ids, paths, capabilities,
//! StorageClass and VolumeSnapshotClass parameters, capacity ranges, and the pagination tokens.
//! Pure functions: their tests need no root, no server and no kernel.

use std::collections::HashMap;
use std::path::PathBuf;

use ferrovol_proto::csi::volume_capability::access_mode::Mode;
use ferrovol_proto::csi::volume_capability::AccessType;
use ferrovol_proto::csi::{self as pb, VolumeCapability};
use ferrovol_proto::limits::{VOLUME_SIZE_ALIGN, VOLUME_SIZE_MAX};
use ferrovol_proto::{NodeId, VolumeName};

use crate::error::{CsiError, CsiResult};

/// Size of a volume whose CreateVolume gives no capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Smallest volume we create (a filesystem needs some room).
pub const MIN_SIZE: u64 = 1 << 20;
/// StorageClass parameter: the filesystem made on first use (also `csi.storage.k8s.io/fstype`, which
/// the external-provisioner turns into the capability's fs_type).
pub const PARAM_FS_TYPE: &str = "fsType";
/// StorageClass parameter: `block` (a block volume with a filesystem of the node's, one writer
/// node), `fs` (an fs volume: files served by the server, many writer nodes), or `auto` (the
/// default: fs for the multi-node access modes, block for the others).
pub const PARAM_TYPE: &str = "type";

/// Which kind of ferrovol volume backs a CSI volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Block,
    Fs,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Block => "block",
            Kind::Fs => "fs",
        }
    }

    /// The kind of a volume the server reports.
    pub fn of(info: &ferrovol_proto::VolumeInfo) -> Self {
        if info.kind == ferrovol_proto::codec::VOLUME_KIND_FS {
            Kind::Fs
        } else {
            Kind::Block
        }
    }
}

/// A capability only an fs volume serves: several writer nodes, as a mount. (ReadOnlyMany stays a
/// block volume: many nodes may mount one filesystem read-only, from a snapshot or raw.)
fn multi_writer(cap: &VolumeCapability) -> bool {
    let mode = cap.access_mode.as_ref().map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown));
    matches!(mode, Some(Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter))
        && matches!(cap.access_type, Some(AccessType::Mount(_)))
}

/// The kind CreateVolume makes: the `type` parameter, or with `auto` (or none) fs when any
/// capability asks for several writer nodes.
pub fn kind_for(params: &HashMap<String, String>, caps: &[VolumeCapability]) -> CsiResult<Kind> {
    match params.get(PARAM_TYPE).map(String::as_str) {
        Some("block") => Ok(Kind::Block),
        Some("fs") => Ok(Kind::Fs),
        None | Some("auto") => Ok(if caps.iter().any(multi_writer) { Kind::Fs } else { Kind::Block }),
        Some(other) => {
            Err(CsiError::invalid(format!("parameter {PARAM_TYPE}={other:?}: one of fs, block, auto")))
        }
    }
}

/// The filesystems the node plugin knows how to make and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Ext3,
    Xfs,
}

impl FsType {
    pub const ALL: [FsType; 3] = [FsType::Ext4, FsType::Ext3, FsType::Xfs];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Ext3 => "ext3",
            FsType::Xfs => "xfs",
        }
    }

    /// The mkfs program and its flags before the device (quiet; ext's `-F` for a whole device).
    pub fn mkfs(self) -> (String, &'static [&'static str]) {
        let flags: &'static [&'static str] = match self {
            FsType::Ext4 | FsType::Ext3 => &["-q", "-F"],
            FsType::Xfs => &["-q"],
        };
        (format!("mkfs.{}", self.as_str()), flags)
    }

    /// Whether a mounted filesystem of this type is grown through its device (resize2fs) rather
    /// than through its mount point (xfs_growfs).
    pub fn grows_by_device(self) -> bool {
        matches!(self, FsType::Ext4 | FsType::Ext3)
    }

    fn names() -> String {
        Self::ALL.map(FsType::as_str).join(", ")
    }
}

impl std::fmt::Display for FsType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn require<'a>(value: &'a str, field: &str) -> CsiResult<&'a str> {
    if value.is_empty() {
        return Err(CsiError::invalid(format!("{field} is required")));
    }
    Ok(value)
}

/// A volume id from the CO. One that is not a valid ferrovol name cannot exist.
pub fn volume_id(id: &str) -> CsiResult<VolumeName> {
    require(id, "volume_id")?;
    VolumeName::try_from(id).map_err(|e| CsiError::not_found(format!("volume {id:?} does not exist ({e})")))
}

/// A snapshot id from the CO. One that is not a valid ferrovol name cannot exist.
pub fn snapshot_id(id: &str) -> CsiResult<VolumeName> {
    require(id, "snapshot_id")?;
    VolumeName::try_from(id).map_err(|e| CsiError::not_found(format!("snapshot {id:?} does not exist ({e})")))
}

pub fn node_id(id: &str) -> CsiResult<NodeId> {
    require(id, "node_id")?;
    NodeId::try_from(id).map_err(|e| CsiError::not_found(format!("node {id:?} cannot exist ({e})")))
}

/// A path field: required (INVALID_ARGUMENT when empty). A relative path cannot be where a volume
/// is staged or published, so it is `NOT_FOUND` for the lookups (stats, expand) that take one.
pub fn path_of(s: &str, field: &str) -> CsiResult<PathBuf> {
    let p = PathBuf::from(require(s, field)?);
    if !p.is_absolute() {
        return Err(CsiError::invalid(format!("{field} must be an absolute path, got {s:?}")));
    }
    Ok(p)
}

/// What a capability asks for, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// An fs volume (a FUSE mount of the server's files; never `block`).
    pub fs: bool,
    pub block: bool,
    /// The filesystem of a mount capability (unused for block).
    pub fs_type: FsType,
    pub mount_flags: Vec<String>,
    /// The mode only lets the volume be read.
    pub reader_only: bool,
    /// SINGLE_NODE_SINGLE_WRITER: one publish at a time, even on its node.
    pub single_publish: bool,
}

/// Checks one capability of a block volume: an access type, a mode we serve, a filesystem we can
/// make (ext4 when the capability names none).
pub fn check_capability(cap: &VolumeCapability) -> Result<Access, String> {
    check_capability_or(cap, FsType::Ext4)
}

/// [`check_capability_or`] for a volume of `kind`. An fs volume serves every access mode (the
/// server arbitrates between writers), as a mount only, of the server's ext4.
pub fn check_capability_of(cap: &VolumeCapability, kind: Kind, default_fs: FsType) -> Result<Access, String> {
    if kind == Kind::Block {
        return check_capability_or(cap, default_fs);
    }
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .ok_or("access_mode is required")?;
    let reader_only = match mode {
        Mode::Unknown => return Err("access_mode is required".into()),
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => true,
        _ => false,
    };
    match cap.access_type.as_ref().ok_or("access_type (block or mount) is required")? {
        AccessType::Block(_) => Err("an fs volume is a shared directory tree, not a block device:                                      use access type mount, or the StorageClass parameter type: block"
            .into()),
        AccessType::Mount(m) if !m.fs_type.is_empty() && m.fs_type != "ext4" => Err(format!(
            "fs_type {:?}: an fs volume's filesystem is the server's ext4 (give ext4 or none, or type: block)",
            m.fs_type
        )),
        AccessType::Mount(m) => Ok(Access {
            fs: true,
            block: false,
            fs_type: FsType::Ext4,
            mount_flags: m.mount_flags.clone(),
            reader_only,
            single_publish: mode == Mode::SingleNodeSingleWriter,
        }),
    }
}

/// [`check_capability`], with `default_fs` for a mount capability that names no filesystem.
pub fn check_capability_or(cap: &VolumeCapability, default_fs: FsType) -> Result<Access, String> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .ok_or("access_mode is required")?;
    let reader_only = match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => false,
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => true,
        Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(format!(
                "access mode {} is not supported by a block volume (its filesystem has one writer node): \
                 use the StorageClass parameter type: fs (or auto) for a volume many nodes write",
                mode.as_str_name()
            ))
        }
        Mode::Unknown => return Err("access_mode is required".into()),
    };
    let single_publish = mode == Mode::SingleNodeSingleWriter;
    match cap.access_type.as_ref().ok_or("access_type (block or mount) is required")? {
        AccessType::Block(_) => Ok(Access {
            fs: false,
            block: true,
            fs_type: default_fs,
            mount_flags: vec![],
            reader_only,
            single_publish,
        }),
        AccessType::Mount(m) => {
            let fs_type = if m.fs_type.is_empty() {
                default_fs
            } else {
                FsType::parse(&m.fs_type).ok_or_else(|| {
                    format!("fs_type {:?} is not supported (one of {})", m.fs_type, FsType::names())
                })?
            };
            Ok(Access {
                fs: false,
                block: false,
                fs_type,
                mount_flags: m.mount_flags.clone(),
                reader_only,
                single_publish,
            })
        }
    }
}

pub fn check_capabilities(caps: &[VolumeCapability], kind: Kind) -> CsiResult<()> {
    if caps.is_empty() {
        return Err(CsiError::invalid("volume_capabilities is required"));
    }
    for cap in caps {
        check_capability_of(cap, kind, FsType::Ext4).map_err(CsiError::InvalidArgument)?;
    }
    Ok(())
}

/// StorageClass parameters we understand; anything else is a typo the user should hear about. Keys of
/// the CO's own (`csi.storage.k8s.io/...`) pass.
pub fn check_parameters(params: &HashMap<String, String>) -> CsiResult<()> {
    for (k, v) in params {
        if k.starts_with("csi.storage.k8s.io/") {
            continue;
        }
        match k.as_str() {
            PARAM_FS_TYPE if FsType::parse(v).is_some() => {}
            PARAM_FS_TYPE => {
                return Err(CsiError::invalid(format!("parameter fsType={v:?}: one of {}", FsType::names())))
            }
            PARAM_TYPE if ["fs", "block", "auto"].contains(&v.as_str()) => {}
            PARAM_TYPE => {
                return Err(CsiError::invalid(format!(
                    "parameter {PARAM_TYPE}={v:?}: one of fs, block, auto"
                )))
            }
            _ => {
                return Err(CsiError::invalid(format!(
                    "unknown StorageClass parameter {k:?} (known: {PARAM_FS_TYPE}, {PARAM_TYPE})"
                )))
            }
        }
    }
    Ok(())
}

/// VolumeSnapshotClass parameters: ferrovol has none of its own (a snapshot is a reflink or a
/// copy, chosen by the server's filesystem); the CO's own keys (`csi.storage.k8s.io/...`) pass.
pub fn check_snapshot_parameters(params: &HashMap<String, String>) -> CsiResult<()> {
    match params.keys().find(|k| !k.starts_with("csi.storage.k8s.io/")) {
        Some(k) => Err(CsiError::invalid(format!(
            "unknown VolumeSnapshotClass parameter {k:?} (ferrovol takes none)"
        ))),
        None => Ok(()),
    }
}

/// The size to create for a capacity range: the smallest aligned size >= required_bytes (or the
/// default), within limit_bytes.
pub fn size_for(range: Option<&pb::CapacityRange>) -> CsiResult<u64> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if required < 0 || limit < 0 {
        return Err(CsiError::invalid("capacity_range bytes must not be negative"));
    }
    let (required, limit) = (required.unsigned_abs(), limit.unsigned_abs());
    if limit != 0 && limit < required {
        return Err(CsiError::invalid(format!("limit_bytes {limit} is below required_bytes {required}")));
    }
    let wanted = if required == 0 {
        if limit == 0 {
            DEFAULT_SIZE
        } else {
            limit.min(DEFAULT_SIZE)
        }
    } else {
        required
    };
    let size = wanted.max(MIN_SIZE).div_ceil(VOLUME_SIZE_ALIGN) * VOLUME_SIZE_ALIGN;
    if size > VOLUME_SIZE_MAX || (limit != 0 && size > limit) {
        return Err(CsiError::OutOfRange(format!(
            "no volume size fits required_bytes {required} and limit_bytes {limit} (sizes are multiples of \
             {VOLUME_SIZE_ALIGN} between {MIN_SIZE} and {VOLUME_SIZE_MAX})"
        )));
    }
    Ok(size)
}

/// The size of a volume made from a source of `source_size` bytes: the source's size, or more when
/// the range requires more; OUT_OF_RANGE when the range's limit is below the source (the spec: the
/// capacity range MUST be honoured, even from a source).
pub fn size_from_source(range: Option<&pb::CapacityRange>, source_size: u64) -> CsiResult<u64> {
    let asked = match range {
        Some(r) if r.required_bytes != 0 || r.limit_bytes != 0 => Some(size_for(Some(r))?),
        _ => None,
    };
    let limit = range.map_or(0, |r| r.limit_bytes.max(0).unsigned_abs());
    if limit != 0 && limit < source_size {
        return Err(CsiError::OutOfRange(format!(
            "the source is {source_size} bytes, above limit_bytes {limit}: a volume is at least as large as its source"
        )));
    }
    Ok(asked.map_or(source_size, |a| a.max(source_size)))
}

pub fn fits(size: u64, range: Option<&pb::CapacityRange>) -> bool {
    let (required, limit) = range
        .map_or((0, 0), |r| (r.required_bytes.max(0).unsigned_abs(), r.limit_bytes.max(0).unsigned_abs()));
    size >= required && (limit == 0 || size <= limit)
}

/// Pagination tokens: self-describing (the last name of the previous page, with a check), so a
/// token stays valid after the entry it names is deleted, and one we never issued ("invalid-token",
/// or a bare name) is refused with ABORTED as the spec asks. `kind` keeps volume and snapshot tokens
/// apart.
pub fn page_token(kind: &str, last: &VolumeName) -> String {
    format!("{kind}1.{}.{:08x}", last.as_str(), token_check(kind, last.as_str()))
}

/// The name a token of ours continues after; `Ok(None)` for an empty token.
pub fn parse_page_token(kind: &str, token: &str) -> CsiResult<Option<VolumeName>> {
    if token.is_empty() {
        return Ok(None);
    }
    let refused = || CsiError::Aborted(format!("starting_token {token:?} was not issued by this driver"));
    let rest = token.strip_prefix(kind).and_then(|r| r.strip_prefix("1.")).ok_or_else(refused)?;
    let (name, check) = rest.rsplit_once('.').ok_or_else(refused)?;
    let check = u32::from_str_radix(check, 16).map_err(|_| refused())?;
    if check != token_check(kind, name) {
        return Err(refused());
    }
    VolumeName::try_from(name).map(Some).map_err(|_| refused())
}

fn token_check(kind: &str, name: &str) -> u32 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("ferrovol-csi page token\0{kind}\0{name}").as_bytes());
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn range(required: i64, limit: i64) -> pb::CapacityRange {
        pb::CapacityRange { required_bytes: required, limit_bytes: limit }
    }

    #[test]
    fn sizes_honour_the_capacity_range() {
        assert_eq!(size_for(None).unwrap(), DEFAULT_SIZE);
        assert_eq!(size_for(Some(&range(10 << 20, 0))).unwrap(), 10 << 20);
        assert_eq!(size_for(Some(&range(10_000_001, 0))).unwrap(), 10_002_432);
        assert_eq!(size_for(Some(&range(1, 0))).unwrap(), MIN_SIZE);
        assert_eq!(size_for(Some(&range(0, 64 << 20))).unwrap(), 64 << 20);
        assert!(matches!(size_for(Some(&range(5, 4))), Err(CsiError::InvalidArgument(_))));
        assert!(matches!(size_for(Some(&range(100, 200))), Err(CsiError::OutOfRange(_))));
        assert!(matches!(size_for(Some(&range(-1, 0))), Err(CsiError::InvalidArgument(_))));
        assert!(fits(10 << 20, Some(&range(10 << 20, 0))));
        assert!(!fits(10 << 20, Some(&range(11 << 20, 0))));
    }

    #[test]
    fn sizes_from_a_source() {
        let src = 8 << 20;
        assert_eq!(size_from_source(None, src).unwrap(), src);
        assert_eq!(size_from_source(Some(&range(0, 0)), src).unwrap(), src);
        assert_eq!(size_from_source(Some(&range(4 << 20, 0)), src).unwrap(), src, "never below the source");
        assert_eq!(size_from_source(Some(&range(16 << 20, 0)), src).unwrap(), 16 << 20);
        assert!(matches!(size_from_source(Some(&range(0, 4 << 20)), src), Err(CsiError::OutOfRange(_))));
    }

    #[test]
    fn capabilities() {
        let cap = |t: Option<AccessType>, mode: Mode| VolumeCapability {
            access_type: t,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        };
        let mount =
            |fs: &str| Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }));
        assert_eq!(check_capability(&cap(mount(""), Mode::SingleNodeWriter)).unwrap().fs_type, FsType::Ext4);
        assert_eq!(
            check_capability(&cap(mount("xfs"), Mode::SingleNodeWriter)).unwrap().fs_type,
            FsType::Xfs
        );
        let block =
            check_capability(&cap(Some(AccessType::Block(BlockVolume {})), Mode::SingleNodeReaderOnly));
        assert!(block.unwrap().reader_only);
        let single = check_capability(&cap(mount(""), Mode::SingleNodeSingleWriter)).unwrap();
        assert!(single.single_publish && !single.reader_only);
        assert!(!check_capability(&cap(mount(""), Mode::SingleNodeMultiWriter)).unwrap().single_publish);
        assert!(check_capability(&cap(mount("zfs"), Mode::SingleNodeWriter)).is_err());
        assert!(check_capability(&cap(mount(""), Mode::MultiNodeMultiWriter)).is_err());
        assert!(check_capability(&cap(None, Mode::SingleNodeWriter)).is_err());
        assert!(check_capability(&VolumeCapability { access_type: mount(""), access_mode: None }).is_err());
    }

    #[test]
    fn fs_volumes_serve_every_mode_as_mounts_of_ext4() {
        let cap = |t: Option<AccessType>, mode: Mode| VolumeCapability {
            access_type: t,
            access_mode: Some(AccessMode { mode: mode as i32 }),
        };
        let mount =
            |fs: &str| Some(AccessType::Mount(MountVolume { fs_type: fs.into(), ..Default::default() }));
        let raw = Some(AccessType::Block(BlockVolume {}));
        let p = |v: &str| HashMap::from([(PARAM_TYPE.to_owned(), v.to_owned())]);
        let rwx = cap(mount("ext4"), Mode::MultiNodeMultiWriter);
        let rwo = cap(mount("ext4"), Mode::SingleNodeWriter);
        // auto (or none): the multi-node writer modes make fs volumes, the others block volumes.
        assert_eq!(kind_for(&HashMap::new(), std::slice::from_ref(&rwx)).unwrap(), Kind::Fs);
        let rox = cap(mount(""), Mode::MultiNodeReaderOnly);
        assert_eq!(
            kind_for(&p("auto"), &[rwo.clone(), rox]).unwrap(),
            Kind::Block,
            "ReadOnlyMany stays block"
        );
        assert_eq!(kind_for(&p("auto"), &[rwo.clone(), rwx.clone()]).unwrap(), Kind::Fs);
        let raw_rwx = cap(raw.clone(), Mode::MultiNodeMultiWriter);
        assert_eq!(kind_for(&p("auto"), &[raw_rwx]).unwrap(), Kind::Block, "raw block is never fs");
        assert_eq!(kind_for(&p("auto"), std::slice::from_ref(&rwo)).unwrap(), Kind::Block);
        assert_eq!(kind_for(&p("fs"), std::slice::from_ref(&rwo)).unwrap(), Kind::Fs);
        assert_eq!(kind_for(&p("block"), std::slice::from_ref(&rwx)).unwrap(), Kind::Block);
        assert!(kind_for(&p("nfs"), &[]).is_err());
        assert!(check_parameters(&p("fs")).is_ok() && check_parameters(&p("nfs")).is_err());
        for mode in [Mode::MultiNodeMultiWriter, Mode::MultiNodeSingleWriter, Mode::SingleNodeWriter] {
            let a = check_capability_of(&cap(mount(""), mode), Kind::Fs, FsType::Xfs).unwrap();
            assert!(a.fs && !a.block && !a.reader_only && a.fs_type == FsType::Ext4, "{mode:?}");
        }
        let ro = check_capability_of(&cap(mount("ext4"), Mode::MultiNodeReaderOnly), Kind::Fs, FsType::Ext4);
        assert!(ro.unwrap().reader_only);
        assert!(check_capability_of(&cap(raw.clone(), Mode::MultiNodeMultiWriter), Kind::Fs, FsType::Ext4)
            .is_err());
        assert!(check_capability_of(&cap(mount("xfs"), Mode::MultiNodeMultiWriter), Kind::Fs, FsType::Ext4)
            .is_err());
        // Block volumes still refuse the multi-node writer modes.
        assert!(check_capability_of(&rwx, Kind::Block, FsType::Ext4).is_err());
        assert!(check_capabilities(&[rwx], Kind::Fs).is_ok());
    }

    #[test]
    fn tokens_are_ours_and_outlive_their_entry() {
        let n = VolumeName::try_from("pvc-1").unwrap();
        let t = page_token("v", &n);
        assert_eq!(parse_page_token("v", &t).unwrap(), Some(n.clone()));
        assert_eq!(parse_page_token("v", "").unwrap(), None);
        for bad in ["invalid-token", "pvc-1", "v1.pvc-1.00000000", "v1.pvc-1", &page_token("s", &n)] {
            assert!(matches!(parse_page_token("v", bad), Err(CsiError::Aborted(_))), "{bad}");
        }
    }

    #[test]
    fn fields_and_parameters() {
        assert!(matches!(require("", "name"), Err(CsiError::InvalidArgument(_))));
        assert!(matches!(volume_id("Not/A/Name"), Err(CsiError::NotFound(_))));
        assert!(matches!(volume_id(""), Err(CsiError::InvalidArgument(_))));
        assert!(matches!(path_of("some/path", "volume_path"), Err(CsiError::InvalidArgument(_))));
        let p = |k: &str, v: &str| HashMap::from([(k.to_owned(), v.to_owned())]);
        assert!(check_parameters(&p("fsType", "xfs")).is_ok());
        assert!(check_parameters(&p("fsType", "zfs")).is_err());
        assert!(check_parameters(&p("csi.storage.k8s.io/pvc/name", "x")).is_ok());
        assert!(check_parameters(&p("replicas", "3")).is_err());
        assert!(check_snapshot_parameters(&p("csi.storage.k8s.io/volumesnapshot/name", "s")).is_ok());
        assert!(check_snapshot_parameters(&p("retention", "7d")).is_err());
    }
}
