//! NodeExpandVolume (the loop device follows the volume's new size, then the filesystem grows) and
//! NodeGetVolumeStats (usage and condition of a staged or published volume).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferrovol_client::host::{self, mount_at};
use ferrovol_proto::csi as pb;
use tracing::info;

use super::sys::{device_size, has_capability, pid_alive, statvfs, CAP_SYS_RESOURCE};
use super::Inner;
use crate::error::{CsiError, CsiResult};
use crate::state::Staged;
use crate::validate::{require, FsType};

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Inner {
    /// The staging record of `id` and the path, which must be where it is staged or published here.
    /// Spec (NodeGetVolumeStats, NodeExpandVolume): a volume "not found" or a path where it is not:
    /// NOT_FOUND. A relative path cannot be one of them, so it is NOT_FOUND too; only an empty field
    /// is INVALID_ARGUMENT.
    pub(super) fn lookup(&self, id: &str, path: &str, field: &str) -> CsiResult<(Staged, PathBuf)> {
        require(path, field)?;
        let st = self
            .load(id)?
            .ok_or_else(|| CsiError::not_found(format!("volume {id} is not staged on this node")))?;
        let path = PathBuf::from(path);
        if !st.targets.contains(&path) && st.staging_path != path {
            return Err(CsiError::not_found(format!(
                "{} is not a path of volume {id} on this node",
                path.display()
            )));
        }
        if std::fs::symlink_metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            return Err(CsiError::not_found(format!("{} does not exist", path.display())));
        }
        Ok((st, path))
    }

    /// Spec: NodeExpandVolume MUST be idempotent: a filesystem that already fills the device (the
    /// volume grew before it was staged, so mkfs used the new size) is OK. The grow is run, and only
    /// its own failure is reported: resize2fs without CAP_SYS_RESOURCE still answers "Nothing to do"
    /// for such a filesystem.
    pub(super) fn expand(&self, st: &Staged, required: u64) -> CsiResult<u64> {
        let id = &st.volume_id;
        if st.fs {
            return Err(CsiError::precondition(format!(
                "volume {id} is an fs volume: it grows on the server, there is nothing to grow on the node"
            )));
        }
        let dev =
            st.loop_dev.clone().ok_or_else(|| CsiError::precondition("staged without a loop device"))?;
        // The FUSE file shows the server's new size once its attributes are refreshed (1 s cache).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let len =
                std::fs::metadata(&st.image).map_err(|e| CsiError::step("stat of the FUSE file", e))?.len();
            if len >= required {
                break;
            }
            if Instant::now() > deadline {
                return Err(CsiError::precondition(format!(
                    "volume {id} is still {len} bytes on this node; was ControllerExpandVolume done?"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        host::loop_refresh_size(&dev).map_err(|e| CsiError::step("losetup -c", e))?;
        if !st.block {
            let fs = FsType::parse(&st.fs_type).ok_or_else(|| {
                CsiError::internal(format!("staging record of {id} names fs {:?}", st.fs_type))
            })?;
            let grown = if fs.grows_by_device() {
                host::run(Command::new("resize2fs").arg(&dev))
            } else {
                host::run(Command::new("xfs_growfs").arg(&st.staging_path))
            };
            if let Err(e) = grown {
                let hint = if fs.grows_by_device() && !has_capability(CAP_SYS_RESOURCE) {
                    " (growing a mounted ext filesystem needs CAP_SYS_RESOURCE, which this plugin lacks: run \
                     the node container privileged)"
                } else {
                    ""
                };
                return Err(CsiError::internal(format!(
                    "the device of volume {id} has grown to {} bytes, but growing its {fs} failed: {e}{hint}",
                    device_size(&dev).unwrap_or(0)
                )));
            }
        }
        let size = device_size(&dev).unwrap_or(required);
        info!(volume = %id, size, "expanded on the node");
        Ok(size)
    }

    pub(super) fn stats(&self, st: &Staged, path: &Path) -> CsiResult<pb::NodeGetVolumeStatsResponse> {
        // What the node serves: the FUSE file of a block volume, the mount of an fs volume.
        let served = if st.fs { &st.staging_path } else { &st.image };
        let condition = match std::fs::metadata(served) {
            Err(e) => pb::VolumeCondition {
                abnormal: true,
                message: format!(
                    "the volume's FUSE file does not answer ({e}); its attach process may have died"
                ),
            },
            Ok(_) if st.attach_pid.is_some_and(|p| !pid_alive(p)) && mount_at(served).is_none() => {
                pb::VolumeCondition { abnormal: true, message: "the volume's attach process is gone".into() }
            }
            Ok(_) => pb::VolumeCondition { abnormal: false, message: "attached and answering".into() },
        };
        let usage = if st.block {
            let total = st.loop_dev.as_deref().and_then(device_size).unwrap_or(0);
            vec![pb::VolumeUsage {
                total: to_i64(total),
                unit: pb::volume_usage::Unit::Bytes as i32,
                ..Default::default()
            }]
        } else {
            let v = statvfs(path).map_err(|e| CsiError::step(&format!("statvfs {}", path.display()), e))?;
            let frsize = v.f_frsize;
            let (blocks, bfree, bavail) = (v.f_blocks, v.f_bfree, v.f_bavail);
            let (files, ffree) = (v.f_files, v.f_ffree);
            vec![
                pb::VolumeUsage {
                    available: to_i64(bavail * frsize),
                    total: to_i64(blocks * frsize),
                    used: to_i64(blocks.saturating_sub(bfree) * frsize),
                    unit: pb::volume_usage::Unit::Bytes as i32,
                },
                pb::VolumeUsage {
                    available: to_i64(ffree),
                    total: to_i64(files),
                    used: to_i64(files.saturating_sub(ffree)),
                    unit: pb::volume_usage::Unit::Inodes as i32,
                },
            ]
        };
        Ok(pb::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) })
    }
}
