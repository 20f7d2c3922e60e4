//! NodePublishVolume and NodeUnpublishVolume: a bind mount of the staging mount (or, for raw block,
//! of the loop device node) at the pod's target, read-only when asked; and its removal.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferrovol_client::host::{self, mount_at};
use tracing::{info, warn};

use super::sys::{is_mounted, unmount_now};
use super::Inner;
use crate::error::{CsiError, CsiResult};
use crate::validate::Access;

impl Inner {
    /// Spec: "If the volume corresponding to the `volume_id` has already been published at the
    /// specified `target_path`, and is compatible with the specified `volume_capability` and
    /// `readonly` flag, the Plugin MUST reply 0 OK"; published there incompatibly: ALREADY_EXISTS.
    /// "If this RPC failed, or the CO does not know if it failed or not, it MAY choose to call
    /// NodePublishVolume again." And for SINGLE_NODE_SINGLE_WRITER: a volume "published at a
    /// different `target_path`" MUST get FAILED_PRECONDITION (SINGLE_NODE_MULTI_WRITER volumes may be
    /// published at several targets).
    pub(super) fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: PathBuf,
        access: &Access,
        read_only: bool,
    ) -> CsiResult<()> {
        let mut st = self.load(id)?.ok_or_else(|| {
            CsiError::precondition(format!("volume {id} is not staged on this node (NodeStageVolume first)"))
        })?;
        if st.staging_path != staging {
            return Err(CsiError::precondition(format!(
                "volume {id} is staged at {}, not {}",
                st.staging_path.display(),
                staging.display()
            )));
        }
        if st.block != access.block {
            return Err(CsiError::invalid(format!(
                "volume {id} is staged as {} but published as {}",
                if st.block { "block" } else { "mount" },
                if access.block { "block" } else { "mount" }
            )));
        }
        let read_only = read_only || st.read_only;
        if let Some(m) = mount_at(&target) {
            if st.targets.contains(&target) {
                let is_ro = m.options.iter().any(|o| o == "ro");
                let same_mode = (st.exclusive_target.as_ref() == Some(&target)) == access.single_publish;
                if is_ro == read_only && same_mode {
                    return Ok(());
                }
            }
            return Err(CsiError::AlreadyExists(format!(
                "{} is already mounted ({} {}) in an incompatible way",
                target.display(),
                m.fstype,
                m.source
            )));
        }
        // One target at a time for SINGLE_NODE_SINGLE_WRITER, whichever of the two came first.
        let others: Vec<&PathBuf> = st.targets.iter().filter(|t| **t != target && is_mounted(t)).collect();
        let exclusive_elsewhere = st.exclusive_target.as_ref().filter(|t| **t != target && is_mounted(t));
        if let Some(other) =
            exclusive_elsewhere.or(if access.single_publish { others.first().copied() } else { None })
        {
            return Err(CsiError::precondition(format!(
                "volume {id} is already published at {} and its access mode is SINGLE_NODE_SINGLE_WRITER: \
                 one target at a time (SINGLE_NODE_MULTI_WRITER allows several)",
                other.display()
            )));
        }
        let source: PathBuf = if st.block {
            let dev =
                st.loop_dev.clone().ok_or_else(|| CsiError::precondition("staged without a loop device"))?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| CsiError::step("cannot create the target's parent", e))?;
            }
            // A raw block target is a file. Some callers create a directory there; an empty one
            // (never a mount point: checked above) is replaced, anything else is refused.
            if target.is_dir() {
                std::fs::remove_dir(&target).map_err(|e| {
                    CsiError::precondition(format!(
                        "block target {} is a non-empty directory: {e}",
                        target.display()
                    ))
                })?;
            }
            if !target.exists() {
                std::fs::write(&target, b"")
                    .map_err(|e| CsiError::step(&format!("cannot create {}", target.display()), e))?;
            }
            dev.into()
        } else {
            std::fs::create_dir_all(&target)
                .map_err(|e| CsiError::step(&format!("cannot create {}", target.display()), e))?;
            st.staging_path.clone()
        };
        if !st.targets.contains(&target) {
            st.targets.push(target.clone());
        }
        if access.single_publish {
            st.exclusive_target = Some(target.clone());
        } else if st.exclusive_target.as_ref() == Some(&target) {
            st.exclusive_target = None;
        }
        self.save(&st)?;
        host::run(Command::new("mount").arg("--bind").arg(&source).arg(&target))
            .map_err(|e| CsiError::step("bind mount", e))?;
        if read_only {
            if let Err(e) = host::run(Command::new("mount").args(["-o", "remount,bind,ro"]).arg(&target)) {
                let _ = host::unmount(&target);
                return Err(CsiError::step("read-only remount", e));
            }
        }
        info!(volume = id, target = %target.display(), read_only, "published");
        Ok(())
    }

    /// Spec: "If the volume corresponding to the `volume_id` is not published at the specified
    /// `target_path`, the Plugin MUST reply 0 OK." The SP "MUST delete the file or directory it
    /// created at this path" — only once nothing is mounted there, and never recursively.
    pub(super) fn unpublish(&self, id: &str, target: &Path) -> CsiResult<()> {
        // A stacked mount (published twice by mistake) comes off layer by layer.
        for _ in 0..4 {
            if !is_mounted(target) {
                break;
            }
            unmount_now(target)?;
        }
        if is_mounted(target) {
            return Err(CsiError::internal(format!(
                "{} is still mounted after unmounting",
                target.display()
            )));
        }
        match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => {
                if let Err(e) = std::fs::remove_dir(target) {
                    warn!(target = %target.display(), error = %e, "target directory left in place");
                }
            }
            Ok(_) => {
                let _ = std::fs::remove_file(target);
            }
            Err(_) => {}
        }
        if ferrovol_proto::VolumeName::try_from(id).is_ok() {
            if let Some(mut st) = self.load(id)? {
                st.targets.retain(|t| t != target);
                if st.exclusive_target.as_deref() == Some(target) {
                    st.exclusive_target = None;
                }
                self.save(&st)?;
            }
        }
        info!(volume = id, target = %target.display(), "unpublished");
        Ok(())
    }
}
