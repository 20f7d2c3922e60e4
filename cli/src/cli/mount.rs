//! `ferrovol mount NAME DIR` and `ferrovol umount DIR`: an fs volume as a directory tree.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use ferrovol_client::fuse::files::Ttls;
use ferrovol_client::host;
use ferrovol_proto::VolumeName;

use super::Global;

/// Set for the foreground process that `--background` starts: it prints `ready` once mounted.
const NOTIFY_ENV: &str = "FERROVOL_MOUNT_NOTIFY";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How a mount caches.
#[derive(Debug, Clone, Copy)]
pub struct MountOptions {
    pub read_only: bool,
    pub background: bool,
    pub ttl: Ttls,
    pub sync_writes: bool,
}

fn check_dir(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!("mount directory {} does not exist (mkdir -p {0})", dir.display())
        } else {
            anyhow::anyhow!("mount directory {}: {e}", dir.display())
        }
    })?;
    if !meta.is_dir() {
        bail!(
            "mount directory {} is not a directory (an fs volume is mounted on a directory)",
            dir.display()
        );
    }
    if let Some(host::MountEntry { fstype, source, .. }) = host::mount_at(dir) {
        bail!("{} is already a mount point ({fstype} {source}); unmount it first", dir.display());
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

pub fn mount(global: &Global, name: &VolumeName, dir: &Path, opts: MountOptions) -> anyhow::Result<()> {
    check_dir(dir)?;
    if opts.background {
        return spawn_background(name, dir);
    }
    let mo = ferrovol_client::fuse::files::MountOptions {
        read_only: opts.read_only,
        ttl: opts.ttl,
        sync_writes: opts.sync_writes,
    };
    ferrovol_client::fuse::files::mount(&global.server, global.options()?, name, dir, mo, || {
        if std::env::var_os(NOTIFY_ENV).is_some() {
            println!("ready");
        } else {
            eprintln!(
                "mounted fs volume {name} at {}; Ctrl-C or `ferrovol umount {0}` to unmount",
                dir.display()
            );
        }
    })?;
    Ok(())
}

/// Runs this command in the foreground in a new session and returns once it reports the mount
/// ready, or fails with its log's last lines.
fn spawn_background(name: &VolumeName, dir: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the ferrovol executable")?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--background").collect();
    let log_dir = if Path::new("/run").is_dir() && is_root() {
        PathBuf::from("/run/ferrovol")
    } else {
        std::env::temp_dir()
    };
    std::fs::create_dir_all(&log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;
    let log = log_dir.join(format!("mount-{name}-{}.log", std::process::id()));
    let mut cmd = Command::new(exe);
    cmd.args(&args).env(NOTIFY_ENV, "1");
    let child = host::start_attach(cmd, dir, &log, READY_TIMEOUT)?;
    println!(
        "mounted fs volume {name} at {} (pid {}, log {}); unmount with `ferrovol umount {0}`",
        dir.display(),
        child.id(),
        log.display()
    );
    Ok(())
}

/// Unmounts an fs volume mounted with `ferrovol mount` (its process then exits).
pub fn umount(dir: &Path) -> anyhow::Result<()> {
    match host::mount_at(dir) {
        Some(m) if m.fstype.starts_with("fuse") && m.source.starts_with("ferrovol:") => {}
        Some(m) => {
            bail!("{} is a {} mount of {}, not a ferrovol fs volume", dir.display(), m.fstype, m.source)
        }
        None => bail!("{} is not mounted", dir.display()),
    }
    host::retry_busy(Duration::from_secs(2), || host::unmount(dir)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            anyhow::anyhow!("{} is busy (files open on it, or a process's working directory)", dir.display())
        } else {
            anyhow::anyhow!("cannot unmount {}: {e}", dir.display())
        }
    })?;
    println!("unmounted {}", dir.display());
    Ok(())
}
