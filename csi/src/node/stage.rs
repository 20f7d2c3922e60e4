//! NodeStageVolume and NodeUnstageVolume: the FUSE attach (a long-lived process of its own), the
//! loop device, mkfs on first use, the mount at the staging path; and their reverse. Each step
//! checks the kernel's state (mount table, loop devices) and the on-disk record before acting, so
//! re-running after a crash of this plugin finishes or undoes exactly what was set up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferrovol_client::attachd::{self, AttachRequest};
use ferrovol_client::host::{self, mount_at};
use tracing::{info, warn};

use super::sys::{is_mounted, pid_alive, unmount_now};
use super::{attach_command, Inner};
use crate::error::{CsiError, CsiResult};
use crate::state::Staged;
use crate::validate::{Access, FsType};

/// How long stage waits for the attach process to have the FUSE file ready.
const ATTACH_READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Inner {
    /// Starts the attach process for `st` (unless its FUSE file is already served) and waits until
    /// the file is ready. The process is in its own session, so it outlives this plugin.
    fn ensure_attached(&self, st: &mut Staged) -> CsiResult<()> {
        if let Some(m) = mount_at(&st.image) {
            if m.fstype.starts_with("fuse") {
                if std::fs::metadata(&st.image).is_err_and(|e| host::is_broken_mount_error(&e)) {
                    return Err(CsiError::internal(format!(
                        "the attach process of {} died (its FUSE file answers ENOTCONN); unstage and stage again",
                        st.volume_id
                    )));
                }
                return Ok(());
            }
            return Err(CsiError::internal(format!(
                "{} is a {} mount, not ours",
                st.image.display(),
                m.fstype
            )));
        }
        std::fs::write(&st.image, b"")
            .map_err(|e| CsiError::step(&format!("cannot create {}", st.image.display()), e))?;
        let log_path = self.state.log(&st.volume_id);
        let req = AttachRequest {
            volume: st.volume_id.clone(),
            path: st.image.clone(),
            read_only: st.read_only,
            generation: if st.read_only { None } else { st.generation },
            io_timeout_s: Some(self.config.io_timeout.as_secs()),
            log: Some(log_path.clone()),
        };
        if let Some(socket) = &self.config.attachd {
            return self.attach_through(socket, st, &req);
        }
        let cmd = attach_command(&self.exe, &self.config, &req);
        // Its own session: a restart (or kill -9) of this plugin does not take the FUSE file down.
        match host::start_attach(cmd, &st.image, &log_path, ATTACH_READY_TIMEOUT) {
            Ok(mut child) => {
                st.attach_pid = Some(child.id());
                info!(volume = %st.volume_id, pid = child.id(), image = %st.image.display(), "attached");
                // Reap it when it exits, so no zombie stays behind while this plugin runs.
                std::thread::spawn(move || child.wait());
                Ok(())
            }
            Err(e) => Err(CsiError::internal(format!("attach of {}: {e}", st.volume_id))),
        }
    }

    /// Attaches through the node's attach daemon, which runs the mount's processes (in a container
    /// that restarts of this plugin do not touch). It must speak for this node.
    fn attach_through(&self, socket: &Path, st: &mut Staged, req: &AttachRequest) -> CsiResult<()> {
        let unavailable = |e: std::io::Error| CsiError::Unavailable(format!("attach daemon: {e}"));
        let status =
            attachd::call(socket, &attachd::Request::Status, Duration::from_secs(10)).map_err(unavailable)?;
        if let attachd::Reply::Status { node_id, .. } = &status {
            if node_id != self.config.node_id.as_str() {
                return Err(CsiError::precondition(format!(
                    "the attach daemon at {} speaks for node {node_id}, this plugin for node {}; give both the same NODE_ID",
                    socket.display(),
                    self.config.node_id
                )));
            }
        }
        let wait = ATTACH_READY_TIMEOUT + Duration::from_secs(10);
        match attachd::call(socket, &attachd::Request::Attach(req.clone()), wait) {
            Ok(attachd::Reply::Attached { holder, .. }) => {
                st.attach_pid = Some(holder);
                info!(volume = %st.volume_id, holder, image = %st.image.display(), "attached through the attach daemon");
                Ok(())
            }
            Ok(other) => Err(CsiError::internal(format!("attach daemon: unexpected reply {other:?}"))),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                Err(unavailable(e))
            }
            Err(e) => Err(CsiError::internal(format!("attach of {}: {e}", st.volume_id))),
        }
    }

    /// An fs volume: its mount process (`__mount`, in its own session like an attach process)
    /// FUSE-mounts the server's files at the staging path.
    fn ensure_fs_mounted(&self, st: &mut Staged) -> CsiResult<()> {
        if let Some(m) = mount_at(&st.staging_path) {
            if m.fstype.starts_with("fuse") && m.source == format!("ferrovol:{}", st.volume_id) {
                if std::fs::metadata(&st.staging_path).is_err_and(|e| host::is_broken_mount_error(&e)) {
                    return Err(CsiError::internal(format!(
                        "the mount process of {} died (its mount answers ENOTCONN); unstage and stage again",
                        st.volume_id
                    )));
                }
                return Ok(());
            }
            return Err(CsiError::AlreadyExists(format!(
                "{} already has another mount ({} {})",
                st.staging_path.display(),
                m.fstype,
                m.source
            )));
        }
        std::fs::create_dir_all(&st.staging_path)
            .map_err(|e| CsiError::step(&format!("cannot create {}", st.staging_path.display()), e))?;
        let log_path = self.state.log(&st.volume_id);
        let cmd =
            super::mount_command(&self.exe, &self.config, &st.volume_id, &st.staging_path, st.read_only);
        match host::start_attach(cmd, &st.staging_path, &log_path, ATTACH_READY_TIMEOUT) {
            Ok(mut child) => {
                st.attach_pid = Some(child.id());
                info!(volume = %st.volume_id, pid = child.id(), staging = %st.staging_path.display(), "mounted");
                std::thread::spawn(move || child.wait());
                Ok(())
            }
            Err(e) => Err(CsiError::internal(format!("mount of fs volume {}: {e}", st.volume_id))),
        }
    }

    fn ensure_loop(&self, st: &mut Staged) -> CsiResult<String> {
        if let Some(dev) = st.loop_dev.clone() {
            if host::loops_of(&st.image).contains(&dev) {
                return Ok(dev);
            }
        }
        let dev = match host::loops_of(&st.image).into_iter().next() {
            Some(dev) => dev,
            None => host::loop_attach(&st.image, st.read_only).map_err(|e| CsiError::step("losetup", e))?,
        };
        st.loop_dev = Some(dev.clone());
        Ok(dev)
    }

    /// mkfs only when the device holds nothing; then mount at the staging path.
    fn ensure_mounted(&self, st: &Staged, dev: &str) -> CsiResult<()> {
        if let Some(m) = mount_at(&st.staging_path) {
            if m.source == dev {
                return Ok(());
            }
            return Err(CsiError::AlreadyExists(format!(
                "{} already has another mount ({} {})",
                st.staging_path.display(),
                m.fstype,
                m.source
            )));
        }
        let fs = FsType::parse(&st.fs_type).ok_or_else(|| {
            CsiError::internal(format!("staging record of {} names fs {:?}", st.volume_id, st.fs_type))
        })?;
        let probe = Command::new("blkid")
            .args(["-p", "-s", "TYPE", "-o", "value", dev])
            .output()
            .map_err(|e| CsiError::step("blkid", e))?;
        match probe.status.code() {
            Some(0) => {
                let found = String::from_utf8_lossy(&probe.stdout).trim().to_owned();
                if found != fs.as_str() {
                    return Err(CsiError::precondition(format!(
                        "volume {} holds a {found} filesystem, not the requested {fs}; refusing to reformat it",
                        st.volume_id
                    )));
                }
            }
            Some(2) => {
                if st.read_only {
                    return Err(CsiError::precondition(format!(
                        "volume {} is blank and staged read-only: nothing to mount and no right to format",
                        st.volume_id
                    )));
                }
                let (mkfs, flags) = fs.mkfs();
                host::run(Command::new(&mkfs).args(flags).arg(dev)).map_err(|e| CsiError::step(&mkfs, e))?;
                info!(volume = %st.volume_id, fs = %fs, dev, "formatted (first use)");
            }
            _ => {
                return Err(CsiError::step(
                    &format!("blkid -p {dev}"),
                    String::from_utf8_lossy(&probe.stderr).trim().to_owned(),
                ))
            }
        }
        std::fs::create_dir_all(&st.staging_path)
            .map_err(|e| CsiError::step(&format!("cannot create {}", st.staging_path.display()), e))?;
        let mut opts: Vec<String> = st.mount_flags.clone();
        if st.read_only {
            opts.push("ro".into());
        }
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fs.as_str()]);
        if !opts.is_empty() {
            cmd.args(["-o", &opts.join(",")]);
        }
        host::run(cmd.arg(dev).arg(&st.staging_path)).map_err(|e| CsiError::step("mount", e))?;
        Ok(())
    }

    /// Spec: "If the volume corresponding to the `volume_id` has already been staged to the
    /// `staging_target_path`, and is identical to the specified `volume_capability` the Plugin MUST
    /// reply 0 OK"; staged there incompatibly: ALREADY_EXISTS. Beyond the node's volume limit
    /// (NodeGetInfo's `max_volumes_per_node`): RESOURCE_EXHAUSTED.
    pub(super) fn stage(
        &self,
        id: &str,
        staging: PathBuf,
        access: Access,
        read_only: bool,
        generation: Option<u64>,
    ) -> CsiResult<()> {
        let mut st = match self.load(id)? {
            Some(st) => {
                let same = st.staging_path == staging
                    && st.fs == access.fs
                    && st.block == access.block
                    && (st.block || st.fs_type == access.fs_type.as_str())
                    && st.read_only == read_only;
                if !same {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {id} is already staged at {} ({}, read_only {}), incompatible with this request",
                        st.staging_path.display(),
                        if st.block { "block" } else { st.fs_type.as_str() },
                        st.read_only
                    )));
                }
                st
            }
            None => {
                let limit = self.volume_limit;
                let staged = self.state.count();
                if limit > 0 && staged >= usize::try_from(limit).unwrap_or(usize::MAX) {
                    return Err(CsiError::ResourceExhausted(format!(
                        "node {} already has {staged} volumes staged, its limit (--max-volumes-per-node {limit}); \
                         unstage one first",
                        self.config.node_id
                    )));
                }
                Staged {
                    volume_id: id.to_owned(),
                    staging_path: staging,
                    fs: access.fs,
                    block: access.block,
                    fs_type: access.fs_type.as_str().to_owned(),
                    mount_flags: access.mount_flags.clone(),
                    read_only,
                    generation,
                    image: self.state.image(id),
                    attach_pid: None,
                    loop_dev: None,
                    targets: vec![],
                    exclusive_target: None,
                }
            }
        };
        // Record the intent first: a crash from here on leaves a record unstage can follow.
        self.save(&st)?;
        if st.fs {
            self.ensure_fs_mounted(&mut st)?;
            self.save(&st)?;
            info!(volume = id, staging = %st.staging_path.display(), "staged (fs volume)");
            return Ok(());
        }
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

    /// Spec: "If the volume corresponding to the `volume_id` is not staged to the
    /// `staging_target_path`, the Plugin MUST reply 0 OK." Never deletes through a live mount.
    pub(super) fn unstage(&self, id: &str, staging: &Path) -> CsiResult<()> {
        let st = self.load(id)?;
        if let Some(st) = &st {
            if let Some(t) = st.targets.iter().find(|t| is_mounted(t)) {
                return Err(CsiError::precondition(format!(
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
                return Err(CsiError::precondition(format!("{dev} is still mounted at {}", mp.display())));
            }
            host::loop_release(dev).map_err(|e| CsiError::step("losetup -d", e))?;
        }
        // An fs volume's mount process exits once the staging path is unmounted.
        if st.fs && !host::wait_serving_exit(&st.staging_path, Duration::from_secs(10)) {
            warn!(volume = id, "the mount process still runs after its unmount");
        }
        // 3. The FUSE file; its attach process exits when it is unmounted.
        if is_mounted(&st.image) {
            unmount_now(&st.image)?;
        }
        // Its processes (holder and worker: see ferrovol_client::fuse::supervise) exit once it is
        // unmounted, the worker after releasing the writer attachment. They are found by their
        // serving record (a holder that replaced a dead one rewrites it), the first attach
        // process by its pid.
        if !host::wait_serving_exit(&st.image, Duration::from_secs(10)) {
            warn!(volume = id, "the processes serving the FUSE file still run after its unmount");
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
        self.state.remove(id).map_err(|e| CsiError::step("cannot remove the staging record", e))?;
        info!(volume = id, staging = %staging.display(), "unstaged");
        Ok(())
    }
}
