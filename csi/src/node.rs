//! Node: stage (FUSE attach in a long-lived process of its own, loop device, mkfs on first use, mount
//! at the staging path), publish (bind mount into the pod, or the loop device node for raw block),
//! and the reverse, each idempotent and safe to re-run after a crash of this plugin: every step checks
//! the kernel's state (mount table, loop devices) and the on-disk record before acting.
//!
//! Never deletes through a live mount: a path is removed only once the mount table no longer lists it,
//! and only with a non-recursive removal. A path answering ENOTCONN or EIO is a broken mount, still
//! mounted, never "gone".

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrovol_client::host::{self, mount_at};
use ferrovol_proto::csi::node_server::Node;
use ferrovol_proto::csi::node_service_capability::{rpc, Rpc, Type as CapType};
use ferrovol_proto::csi::{self as pb, NodeServiceCapability};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::controller::{check_capability, check_capability_or, require, status_of, volume_id, Access};
use crate::locks::VolumeLocks;
use crate::state::{Staged, StateDir};
use crate::{Config, ServerLink, TOPOLOGY_KEY};

/// How long stage waits for the attach process to have the FUSE file ready.
const ATTACH_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The hidden subcommand of `ferrovol-csi` that serves one attached volume.
pub const ATTACH_SUBCOMMAND: &str = "__attach";

#[derive(Debug)]
struct Inner {
    config: Config,
    state: StateDir,
    exe: PathBuf,
}

#[derive(Debug)]
pub struct NodeService {
    inner: Arc<Inner>,
    link: Arc<ServerLink>,
    locks: VolumeLocks,
}

impl NodeService {
    pub fn new(config: Config, link: Arc<ServerLink>, locks: VolumeLocks) -> anyhow::Result<Self> {
        let state = StateDir::open(&config.state_dir)
            .map_err(|e| anyhow::anyhow!("cannot use the state dir {}: {e}", config.state_dir.display()))?;
        let exe =
            std::env::current_exe().map_err(|e| anyhow::anyhow!("cannot find our own executable: {e}"))?;
        Ok(Self { inner: Arc::new(Inner { config, state, exe }), link, locks })
    }

    /// Runs a blocking node operation off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| Status::internal(format!("node operation panicked: {e}")))?
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Status {
    Status::internal(format!("{what}: {e}"))
}

fn path_of(s: &str, field: &str) -> Result<PathBuf, Status> {
    let p = PathBuf::from(require(s, field)?);
    if !p.is_absolute() {
        return Err(Status::invalid_argument(format!("{field} must be an absolute path, got {s:?}")));
    }
    Ok(p)
}

/// Whether something is mounted at `path`, including a broken mount that no longer answers.
fn is_mounted(path: &Path) -> bool {
    mount_at(path).is_some() || std::fs::metadata(path).is_err_and(|e| host::is_broken_mount_error(&e))
}

fn unmount_now(path: &Path) -> Result<(), Status> {
    host::retry_busy(Duration::from_secs(3), || host::unmount(path)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            Status::failed_precondition(format!("{} is busy (still in use): {e}", path.display()))
        } else {
            internal(&format!("unmount {}", path.display()), e)
        }
    })
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

impl Inner {
    fn save(&self, st: &Staged) -> Result<(), Status> {
        self.state.save(st).map_err(|e| internal("cannot record the staging state", e))
    }

    fn load(&self, id: &str) -> Result<Option<Staged>, Status> {
        self.state.load(id).map_err(|e| internal("cannot read the staging state", e))
    }

    /// Starts the attach process for `st` (unless its FUSE file is already served) and waits until
    /// the file is ready. The process is in its own session, so it outlives this plugin.
    fn ensure_attached(&self, st: &mut Staged) -> Result<(), Status> {
        if let Some(m) = mount_at(&st.image) {
            if m.fstype.starts_with("fuse") {
                if std::fs::metadata(&st.image).is_err_and(|e| host::is_broken_mount_error(&e)) {
                    return Err(Status::internal(format!(
                        "the attach process of {} died (its FUSE file answers ENOTCONN); unstage and stage again",
                        st.volume_id
                    )));
                }
                return Ok(());
            }
            return Err(Status::internal(format!(
                "{} is a {} mount, not ours",
                st.image.display(),
                m.fstype
            )));
        }
        std::fs::write(&st.image, b"")
            .map_err(|e| internal(&format!("cannot create {}", st.image.display()), e))?;
        let log_path = self.state.log(&st.volume_id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| internal(&format!("cannot open {}", log_path.display()), e))?;
        let c = &self.config;
        let mut cmd = Command::new(&self.exe);
        cmd.arg(ATTACH_SUBCOMMAND)
            .args(["--server", &c.server, "--node-id", c.node_id.as_str()])
            .args(["--io-timeout-s", &c.io_timeout.as_secs().to_string()])
            .args(["--volume", &st.volume_id])
            .arg("--path")
            .arg(&st.image)
            .env("FERROVOL_TOKEN", &c.token)
            .env("FERROVOL_CREDENTIAL_FILE", &c.credential_file)
            .env_remove("FERROVOL_TLS_CA")
            .env_remove("FERROVOL_TLS_CERT")
            .env_remove("FERROVOL_TLS_KEY")
            .stderr(log);
        if let Some(t) = &c.tls_files {
            cmd.env("FERROVOL_TLS_CA", &t.ca);
            if let Some((cert, key)) = &t.cert {
                cmd.env("FERROVOL_TLS_CERT", cert).env("FERROVOL_TLS_KEY", key);
            }
        }
        if st.read_only {
            cmd.arg("--read-only");
        } else if let Some(g) = st.generation {
            cmd.args(["--generation", &g.to_string()]);
        }
        // Its own session: a restart (or kill -9) of this plugin does not take the FUSE file down.
        match host::spawn_until_ready(&mut cmd, ATTACH_READY_TIMEOUT) {
            Ok(mut child) => {
                st.attach_pid = Some(child.id());
                info!(volume = %st.volume_id, pid = child.id(), image = %st.image.display(), "attached");
                // Reap it when it exits, so no zombie stays behind while this plugin runs.
                std::thread::spawn(move || child.wait());
                Ok(())
            }
            Err(e) => {
                if mount_at(&st.image).is_some() {
                    let _ = host::unmount(&st.image);
                }
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
                Err(Status::internal(format!("attach of {} failed: {e}: {tail}", st.volume_id)))
            }
        }
    }

    fn ensure_loop(&self, st: &mut Staged) -> Result<String, Status> {
        if let Some(dev) = st.loop_dev.clone() {
            if host::loops_of(&st.image).contains(&dev) {
                return Ok(dev);
            }
        }
        let dev = match host::loops_of(&st.image).into_iter().next() {
            Some(dev) => dev,
            None => host::loop_attach(&st.image, st.read_only).map_err(|e| internal("losetup", e))?,
        };
        st.loop_dev = Some(dev.clone());
        Ok(dev)
    }

    /// mkfs only when the device holds nothing; then mount at the staging path.
    fn ensure_mounted(&self, st: &Staged, dev: &str) -> Result<(), Status> {
        if let Some(m) = mount_at(&st.staging_path) {
            if m.source == dev {
                return Ok(());
            }
            return Err(Status::already_exists(format!(
                "{} already has another mount ({} {})",
                st.staging_path.display(),
                m.fstype,
                m.source
            )));
        }
        let probe = Command::new("blkid")
            .args(["-p", "-s", "TYPE", "-o", "value", dev])
            .output()
            .map_err(|e| internal("blkid", e))?;
        match probe.status.code() {
            Some(0) => {
                let found = String::from_utf8_lossy(&probe.stdout).trim().to_owned();
                if found != st.fs_type {
                    return Err(Status::failed_precondition(format!(
                        "volume {} holds a {found} filesystem, not the requested {}; refusing to reformat it",
                        st.volume_id, st.fs_type
                    )));
                }
            }
            Some(2) => {
                if st.read_only {
                    return Err(Status::failed_precondition(format!(
                        "volume {} is blank and staged read-only: nothing to mount and no right to format",
                        st.volume_id
                    )));
                }
                let mkfs = format!("mkfs.{}", st.fs_type);
                let mut cmd = Command::new(&mkfs);
                if st.fs_type.starts_with("ext") {
                    cmd.args(["-q", "-F"]);
                } else {
                    cmd.arg("-q");
                }
                host::run(cmd.arg(dev)).map_err(|e| internal(&mkfs, e))?;
                info!(volume = %st.volume_id, fs = %st.fs_type, dev, "formatted (first use)");
            }
            _ => {
                return Err(internal(
                    &format!("blkid -p {dev}"),
                    String::from_utf8_lossy(&probe.stderr).trim().to_owned(),
                ))
            }
        }
        std::fs::create_dir_all(&st.staging_path)
            .map_err(|e| internal(&format!("cannot create {}", st.staging_path.display()), e))?;
        let mut opts: Vec<String> = st.mount_flags.clone();
        if st.read_only {
            opts.push("ro".into());
        }
        let mut cmd = Command::new("mount");
        cmd.args(["-t", &st.fs_type]);
        if !opts.is_empty() {
            cmd.args(["-o", &opts.join(",")]);
        }
        host::run(cmd.arg(dev).arg(&st.staging_path)).map_err(|e| internal("mount", e))?;
        Ok(())
    }

    fn stage(
        &self,
        id: &str,
        staging: PathBuf,
        access: Access,
        read_only: bool,
        generation: Option<u64>,
    ) -> Result<(), Status> {
        let mut st = match self.load(id)? {
            Some(st) => {
                let same = st.staging_path == staging
                    && st.block == access.block
                    && (st.block || st.fs_type == access.fs_type)
                    && st.read_only == read_only;
                if !same {
                    return Err(Status::already_exists(format!(
                        "volume {id} is already staged at {} ({}, read_only {}), incompatible with this request",
                        st.staging_path.display(),
                        if st.block { "block".into() } else { st.fs_type.clone() },
                        st.read_only
                    )));
                }
                st
            }
            None => Staged {
                volume_id: id.to_owned(),
                staging_path: staging,
                block: access.block,
                fs_type: access.fs_type.clone(),
                mount_flags: access.mount_flags.clone(),
                read_only,
                generation,
                image: self.state.image(id),
                attach_pid: None,
                loop_dev: None,
                targets: vec![],
            },
        };
        // Record the intent first: a crash from here on leaves a record unstage can follow.
        self.save(&st)?;
        self.ensure_attached(&mut st)?;
        self.save(&st)?;
        let dev = self.ensure_loop(&mut st)?;
        self.save(&st)?;
        if !st.block {
            self.ensure_mounted(&st, &dev)?;
        }
        info!(volume = id, staging = %st.staging_path.display(), dev, "staged");
        Ok(())
    }

    fn unstage(&self, id: &str, staging: &Path) -> Result<(), Status> {
        let st = self.load(id)?;
        if let Some(st) = &st {
            if let Some(t) = st.targets.iter().find(|t| is_mounted(t)) {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is still published at {}; unpublish it first",
                    t.display()
                )));
            }
        }
        // 1. The staging mount (also when broken: ENOTCONN/EIO means mounted).
        if is_mounted(staging) {
            unmount_now(staging)?;
        }
        let Some(st) = st else {
            return Ok(()); // nothing else of ours (already unstaged, or never staged here)
        };
        // 2. The loop device, once nothing has it mounted.
        // Found by backing file, not by the record: a recorded device may since back something else.
        for dev in &host::loops_of(&st.image) {
            if let Some(mp) = host::mounts_of(dev).first() {
                return Err(Status::failed_precondition(format!(
                    "{dev} is still mounted at {}",
                    mp.display()
                )));
            }
            host::loop_release(dev).map_err(|e| internal("losetup -d", e))?;
        }
        // 3. The FUSE file; its attach process exits when it is unmounted.
        if is_mounted(&st.image) {
            unmount_now(&st.image)?;
        }
        if let Some(pid) = st.attach_pid {
            let deadline = Instant::now() + Duration::from_secs(10);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if pid_alive(pid) {
                warn!(volume = id, pid, "attach process still running after its unmount");
            }
        }
        // 4. Our own files, now that nothing is mounted on them.
        if !is_mounted(&st.image) {
            let _ = std::fs::remove_file(&st.image);
            let _ = std::fs::remove_file(self.state.log(id));
        }
        self.state.remove(id).map_err(|e| internal("cannot remove the staging record", e))?;
        info!(volume = id, staging = %staging.display(), "unstaged");
        Ok(())
    }

    fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: PathBuf,
        access: &Access,
        read_only: bool,
    ) -> Result<(), Status> {
        let mut st = self.load(id)?.ok_or_else(|| {
            Status::failed_precondition(format!(
                "volume {id} is not staged on this node (NodeStageVolume first)"
            ))
        })?;
        if st.staging_path != staging {
            return Err(Status::failed_precondition(format!(
                "volume {id} is staged at {}, not {}",
                st.staging_path.display(),
                staging.display()
            )));
        }
        if st.block != access.block {
            return Err(Status::invalid_argument(format!(
                "volume {id} is staged as {} but published as {}",
                if st.block { "block" } else { "mount" },
                if access.block { "block" } else { "mount" }
            )));
        }
        let read_only = read_only || st.read_only;
        if let Some(m) = mount_at(&target) {
            if st.targets.contains(&target) {
                let is_ro = m.options.iter().any(|o| o == "ro");
                if is_ro == read_only {
                    return Ok(());
                }
            }
            return Err(Status::already_exists(format!(
                "{} is already mounted ({} {}) in an incompatible way",
                target.display(),
                m.fstype,
                m.source
            )));
        }
        let source: PathBuf = if st.block {
            let dev = st
                .loop_dev
                .clone()
                .ok_or_else(|| Status::failed_precondition("staged without a loop device"))?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| internal("cannot create the target's parent", e))?;
            }
            // A raw block target is a file. Some callers create a directory there; an empty one
            // (never a mount point: checked above) is replaced, anything else is refused.
            if target.is_dir() {
                std::fs::remove_dir(&target).map_err(|e| {
                    Status::failed_precondition(format!(
                        "block target {} is a non-empty directory: {e}",
                        target.display()
                    ))
                })?;
            }
            if !target.exists() {
                std::fs::write(&target, b"")
                    .map_err(|e| internal(&format!("cannot create {}", target.display()), e))?;
            }
            dev.into()
        } else {
            std::fs::create_dir_all(&target)
                .map_err(|e| internal(&format!("cannot create {}", target.display()), e))?;
            st.staging_path.clone()
        };
        if !st.targets.contains(&target) {
            st.targets.push(target.clone());
        }
        self.save(&st)?;
        host::run(Command::new("mount").arg("--bind").arg(&source).arg(&target))
            .map_err(|e| internal("bind mount", e))?;
        if read_only {
            if let Err(e) = host::run(Command::new("mount").args(["-o", "remount,bind,ro"]).arg(&target)) {
                let _ = host::unmount(&target);
                return Err(internal("read-only remount", e));
            }
        }
        info!(volume = id, target = %target.display(), read_only, "published");
        Ok(())
    }

    fn unpublish(&self, id: &str, target: &Path) -> Result<(), Status> {
        // A stacked mount (published twice by mistake) comes off layer by layer.
        for _ in 0..4 {
            if !is_mounted(target) {
                break;
            }
            unmount_now(target)?;
        }
        if is_mounted(target) {
            return Err(Status::internal(format!("{} is still mounted after unmounting", target.display())));
        }
        // Remove what NodePublish created: never recursively, and only once nothing is mounted there.
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
                self.save(&st)?;
            }
        }
        info!(volume = id, target = %target.display(), "unpublished");
        Ok(())
    }

    fn expand(&self, id: &str, required: u64) -> Result<u64, Status> {
        let st = self
            .load(id)?
            .ok_or_else(|| Status::not_found(format!("volume {id} is not staged on this node")))?;
        let dev =
            st.loop_dev.clone().ok_or_else(|| Status::failed_precondition("staged without a loop device"))?;
        // The FUSE file shows the server's new size once its attributes are refreshed (1 s cache).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let len = std::fs::metadata(&st.image).map_err(|e| internal("stat of the FUSE file", e))?.len();
            if len >= required {
                break;
            }
            if Instant::now() > deadline {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is still {len} bytes on this node; was ControllerExpandVolume done?"
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        host::loop_refresh_size(&dev).map_err(|e| internal("losetup -c", e))?;
        if !st.block {
            if st.fs_type.starts_with("ext") && !has_capability(CAP_SYS_RESOURCE) {
                return Err(Status::failed_precondition(format!(
                    "the device of volume {id} has grown to {} bytes, but growing a mounted {} needs \
                     CAP_SYS_RESOURCE, which this plugin lacks (run the node container privileged)",
                    device_size(&dev).unwrap_or(0),
                    st.fs_type
                )));
            }
            match st.fs_type.as_str() {
                "xfs" => host::run(Command::new("xfs_growfs").arg(&st.staging_path)).map(drop),
                _ => host::run(Command::new("resize2fs").arg(&dev)).map(drop),
            }
            .map_err(|e| internal("growing the filesystem", e))?;
        }
        let size = device_size(&dev).unwrap_or(required);
        info!(volume = id, size, "expanded on the node");
        Ok(size)
    }
}

/// linux/capability.h: needed by ext4's online resize.
const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << cap) != 0)
}

fn device_size(dev: &str) -> Option<u64> {
    let name = Path::new(dev).file_name()?.to_str()?;
    let sectors: u64 =
        std::fs::read_to_string(format!("/sys/block/{name}/size")).ok()?.trim().parse().ok()?;
    Some(sectors * 512)
}

fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs is plain data; an all-zero value is valid and the kernel overwrites it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a pointer to a properly sized, writable struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn node_cap(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability { r#type: Some(CapType::Rpc(Rpc { r#type: t as i32 })) }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        require(&req.volume_id, "volume_id")?;
        let staging = path_of(&req.staging_target_path, "staging_target_path")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        // A mount capability without fs_type takes the StorageClass's fsType (volume_context).
        let default_fs =
            req.volume_context.get(crate::controller::PARAM_FS_TYPE).map_or("ext4", String::as_str);
        let access = check_capability_or(cap, default_fs).map_err(Status::invalid_argument)?;
        let name = volume_id(&req.volume_id)?;
        let read_only =
            access.reader_only || req.publish_context.get("readonly").is_some_and(|v| v == "true");
        let _guard = self.locks.try_lock(name.as_str())?;
        // A volume the server does not know is NOT_FOUND, before anything is set up.
        if self.inner.load(name.as_str())?.is_none() {
            let session = self.link.session().await?;
            session.stat_volume(&name).await.map_err(|e| status_of(&e))?;
        }
        // A read-write stage runs under the generation ControllerPublish set (fenced once another
        // publish takes over); without one (no attacher), the attach process takes the attachment.
        let generation = match req.publish_context.get("generation") {
            Some(g) if !read_only => Some(g.parse::<u64>().map_err(|_| {
                Status::invalid_argument(format!("publish_context generation {g:?} is not a number"))
            })?),
            _ => None,
        };
        let id = name.to_string();
        self.blocking(move |n| n.stage(&id, staging, access, read_only, generation)).await?;
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        require(&req.volume_id, "volume_id")?;
        let staging = path_of(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.locks.try_lock(&req.volume_id)?;
        let id = match ferrovol_proto::VolumeName::try_from(req.volume_id.as_str()) {
            Ok(n) => n.to_string(),
            // Not a ferrovol name: never staged by us; only make sure nothing stays mounted there.
            Err(_) => {
                self.blocking(move |_| if is_mounted(&staging) { unmount_now(&staging) } else { Ok(()) })
                    .await?;
                return Ok(Response::new(pb::NodeUnstageVolumeResponse {}));
            }
        };
        self.blocking(move |n| n.unstage(&id, &staging)).await?;
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        require(&req.volume_id, "volume_id")?;
        let staging = path_of(&req.staging_target_path, "staging_target_path")?;
        let target = path_of(&req.target_path, "target_path")?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let access = check_capability(cap).map_err(Status::invalid_argument)?;
        let name = volume_id(&req.volume_id)?;
        let read_only = req.readonly || access.reader_only;
        let _guard = self.locks.try_lock(name.as_str())?;
        // podInfoOnMount: who the volume is published for, for the logs.
        let pod =
            |k: &str| req.volume_context.get(&format!("csi.storage.k8s.io/{k}")).cloned().unwrap_or_default();
        info!(volume = %name, pod = %pod("pod.name"), namespace = %pod("pod.namespace"), "publishing");
        let id = name.to_string();
        self.blocking(move |n| n.publish(&id, &staging, target, &access, read_only)).await?;
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        require(&req.volume_id, "volume_id")?;
        let target = path_of(&req.target_path, "target_path")?;
        let _guard = self.locks.try_lock(&req.volume_id)?;
        let id = req.volume_id.clone();
        self.blocking(move |n| n.unpublish(&id, &target)).await?;
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let name = volume_id(&req.volume_id)?;
        let path = path_of(&req.volume_path, "volume_path")?;
        let id = name.to_string();
        self.blocking(move |n| {
            let st = n
                .load(&id)?
                .ok_or_else(|| Status::not_found(format!("volume {id} is not staged on this node")))?;
            if !st.targets.contains(&path) && st.staging_path != path {
                return Err(Status::not_found(format!("{} is not a path of volume {id}", path.display())));
            }
            if std::fs::symlink_metadata(&path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
                return Err(Status::not_found(format!("{} does not exist", path.display())));
            }
            let condition = match std::fs::metadata(&st.image) {
                Err(e) => pb::VolumeCondition {
                    abnormal: true,
                    message: format!(
                        "the volume's FUSE file does not answer ({e}); its attach process may have died"
                    ),
                },
                Ok(_) if st.attach_pid.is_some_and(|p| !pid_alive(p)) && mount_at(&st.image).is_none() => {
                    pb::VolumeCondition {
                        abnormal: true,
                        message: "the volume's attach process is gone".into(),
                    }
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
                let v = statvfs(&path).map_err(|e| internal(&format!("statvfs {}", path.display()), e))?;
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
        })
        .await
        .map(Response::new)
    }

    async fn node_expand_volume(
        &self,
        request: Request<pb::NodeExpandVolumeRequest>,
    ) -> Result<Response<pb::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        let name = volume_id(&req.volume_id)?;
        let path = path_of(&req.volume_path, "volume_path")?;
        if let Some(cap) = &req.volume_capability {
            check_capability(cap).map_err(Status::invalid_argument)?;
        }
        let required = req.capacity_range.as_ref().map_or(0, |r| r.required_bytes.max(0).unsigned_abs());
        let _guard = self.locks.try_lock(name.as_str())?;
        if !path.exists() {
            return Err(Status::not_found(format!("volume_path {} does not exist", path.display())));
        }
        let id = name.to_string();
        let size = self.blocking(move |n| n.expand(&id, required)).await?;
        Ok(Response::new(pb::NodeExpandVolumeResponse { capacity_bytes: to_i64(size) }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use rpc::Type::*;
        let capabilities =
            [StageUnstageVolume, GetVolumeStats, ExpandVolume, VolumeCondition, SingleNodeMultiWriter]
                .into_iter()
                .map(node_cap)
                .collect();
        Ok(Response::new(pb::NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        // Registering here (kubelet calls this when it registers the plugin) makes the node known to
        // the server, so the controller can tell real nodes from typos in ControllerPublishVolume.
        let session = self.link.session().await?;
        session.register_node(&self.inner.config.node_id).await.map_err(|e| status_of(&e))?;
        let server_id = session.server_info().server_id.clone();
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.inner.config.node_id.to_string(),
            max_volumes_per_node: self.inner.config.max_volumes_per_node,
            accessible_topology: Some(pb::Topology {
                segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), server_id)]),
            }),
        }))
    }
}
