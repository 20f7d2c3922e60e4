//! Serving one volume as a FUSE file in the foreground, until it is unmounted or a signal arrives: the
//! body of `ferrovol attach` and of the CSI node plugin's attach process.

use std::path::Path;

use ferrovol_proto::VolumeName;
use fuser::{Config, MountOption, SessionACL};
use tracing::info;

use super::{abi, BlockFile};
use crate::{ClientError, ConnectOptions, Session};

/// FUSE request threads: one per CPU, at least 2, at most 4. They only read requests and hand them to
/// the runtime, so more than the CPUs only contend for the kernel's request queue lock: on 2 vCPUs, 2
/// threads against 4 measured +12..18% at 4 KiB queue depth 16, +13% at queue depth 1 and +23% on the
/// ext4 fsync job (A/B, 5 rounds, medians; 1 MiB within the noise: reads -10%, writes +15%).
fn fuse_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 4)
}

async fn release_attachment(
    session: &Session,
    name: &VolumeName,
    generation: u64,
) -> Result<(), ClientError> {
    session.release_writer(name, generation).await?;
    info!(volume = %name, generation, "writer attachment released");
    Ok(())
}

/// Why serving a volume stopped early.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot mount volume {name} at {path}: {source}")]
    Mount { name: String, path: String, source: std::io::Error },
    #[error("FUSE session for {path} failed: {source}")]
    Session { path: String, source: std::io::Error },
}

/// The FUSE session settings for a block volume.
pub fn config(name: &VolumeName, read_only: bool) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("ferrovol:{name}")),
        MountOption::Subtype("ferrovol".into()),
        MountOption::DefaultPermissions,
        if read_only { MountOption::RO } else { MountOption::RW },
    ];
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 {
        // Root mounts for others (kubelet, pods, loop devices opened by other processes).
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(fuse_threads());
    config.clone_fd = true;
    config
}

/// How a served volume is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    /// Read-write: take this node's writer attachment (a takeover with `takeover`), and release it
    /// after a clean unmount. A volume held by another node is refused, naming the holder.
    Writer {
        takeover: bool,
    },
    /// Read-write under an attachment someone else set and will clear (the CSI controller's
    /// ControllerPublish): refused with FENCED once `generation` is no longer current.
    WriterAt {
        generation: u64,
    },
}

impl Access {
    pub fn read_only(self) -> bool {
        self == Access::ReadOnly
    }
}

/// Connects, opens `name`, mounts it over the regular file `path` and serves it until it is
/// unmounted (`ferrovol detach`, umount) or SIGTERM/SIGINT arrives (then it unmounts itself; a busy
/// mount stays and keeps being served). `ready` runs once the mount is usable, with the volume's size.
pub fn serve(
    server: &str,
    opts: ConnectOptions,
    name: &VolumeName,
    path: &Path,
    access: Access,
    ready: impl FnOnce(u64),
) -> Result<(), ServeError> {
    if let Some(continued) = super::supervise::continue_role(server, opts.clone(), name, path, access) {
        return continued;
    }
    if own_session() {
        return super::supervise::start(server, opts, name, path, access, fuse_threads(), ready);
    }
    let read_only = access.read_only();
    let rt = super::supervise::runtime()?;
    let (client, vol) = rt.block_on(super::supervise::open(server, opts, name, access))?;
    let generation = vol.generation();
    let size = vol.size();
    let shown = path.display().to_string();
    let fs = BlockFile::new(vol, rt.handle().clone(), read_only);
    let mut session = fuser::Session::new(fs, path, &config(name, read_only))
        .map_err(|source| ServeError::Mount { name: name.to_string(), path: shown.clone(), source })?;
    let mut unmounter = session.unmount_callable();
    unmount_on_signal(&rt, &shown, move || unmounter.unmount());
    info!(volume = %name, path = %shown, size, read_only, "attached");
    // Removed only after the attachment is released below, so `ferrovol detach` can wait for it.
    let _record =
        crate::host::record_serving(crate::host::Serving::started(path, name.as_str(), server, read_only))
            .map_err(|source| ServeError::Session { path: shown.clone(), source })?;
    ready(size);
    session.run().map_err(|source| ServeError::Session { path: shown.clone(), source })?;
    info!(path = %shown, "detached");
    if let Access::Writer { .. } = access {
        // Unmounted cleanly, so nothing can write any more: release the attachment (only if it
        // is still ours: after a takeover this is a no-op).
        rt.block_on(release_attachment(&client, name, generation))?;
    }
    Ok(())
}

/// Whether to serve with our own FUSE session (see `supervise`: the mount survives the death of
/// any one of its processes) instead of fuser: by default as root, which it needs (it mounts with
/// mount(2)). `FERROVOL_FUSE=fuser` forces fuser, which also serves non-root users (through
/// fusermount3), without that continuity.
fn own_session() -> bool {
    match std::env::var("FERROVOL_FUSE").as_deref() {
        Ok("fuser") => false,
        Ok("own") => true,
        // SAFETY: geteuid cannot fail and touches no memory.
        _ => (unsafe { libc::geteuid() }) == 0,
    }
}

/// On SIGTERM/SIGINT, unmounts with `unmount` (a busy mount stays, and keeps being served).
pub(super) fn unmount_on_signal<F>(rt: &tokio::runtime::Runtime, shown: &str, mut unmount: F)
where
    F: FnMut() -> std::io::Result<()> + Send + 'static,
{
    let shown = shown.to_owned();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            info!(path = %shown, "signal received; unmounting");
            match unmount() {
                Ok(()) => return,
                Err(e) => eprintln!("ferrovol: unmount of {shown} failed: {e} (is it still in use?)"),
            }
        }
    });
}

/// The flags we ask the kernel for in INIT on our own session.
pub(super) const OWN_INIT_FLAGS: u64 = abi::FUSE_ASYNC_READ
    | abi::FUSE_BIG_WRITES
    | abi::FUSE_ASYNC_DIO
    | abi::FUSE_MAX_PAGES
    | abi::FUSE_INIT_EXT
    | abi::FUSE_HAS_RESEND;
