//! `ferrovol attach NAME PATH` and `ferrovol detach PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use ferrovol_client::fuse;
use ferrovol_client::host::{self, unmount};
use ferrovol_proto::VolumeName;

use super::Global;

/// Set in the environment of the foreground process that `--background` starts: it prints `ready` on
/// stdout once the mount is usable.
const NOTIFY_ENV: &str = "FERROVOL_ATTACH_NOTIFY";
/// The background process's log file, removed when it exits cleanly (kept for post-mortems otherwise).
const LOG_ENV: &str = "FERROVOL_ATTACH_LOG";
/// How long `--background` waits for the mount.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn check_mount_point(path: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "mount path {} does not exist (create an empty file first: touch {0})",
                path.display()
            )
        } else {
            anyhow::anyhow!("mount path {}: {e}", path.display())
        }
    })?;
    if !meta.is_file() {
        bail!("mount path {} is not a regular file (a block volume is mounted over a file)", path.display());
    }
    if let Some(host::MountEntry { fstype, source, .. }) = host::mount_at(path) {
        bail!("mount path {} is already a mount point ({fstype} {source}); detach it first", path.display());
    }
    Ok(())
}

pub fn attach(
    global: &Global,
    name: &VolumeName,
    path: &Path,
    read_only: bool,
    background: bool,
    force_takeover: bool,
) -> anyhow::Result<()> {
    // A holder or worker of an existing mount (see `fuse::supervise`) runs this same command line
    // again: the mount is there already, and it is in the background already.
    if !fuse::supervise::continuing() {
        check_mount_point(path)?;
        if background {
            return spawn_background(name, path);
        }
    }
    let notify = std::env::var_os(NOTIFY_ENV).is_some();
    let access =
        if read_only { fuse::Access::ReadOnly } else { fuse::Access::Writer { takeover: force_takeover } };
    fuse::serve(&global.server, global.options()?, name, path, access, |size| {
        if notify {
            println!("ready");
        } else {
            eprintln!(
                "attached volume {name} at {} ({size} bytes); Ctrl-C or `ferrovol detach {0}` to detach",
                path.display()
            );
        }
    })?;
    if let Some(log) = std::env::var_os(LOG_ENV) {
        let _ = std::fs::remove_file(log);
    }
    Ok(())
}

/// Runs this same command in the foreground in a new session, and returns once it reports the mount
/// ready (exit 0) or fails (its log is shown; nothing stays mounted). The background process logs to
/// a file, so it holds none of the caller's pipes open.
fn spawn_background(name: &VolumeName, path: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the ferrovol executable")?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--background").collect();
    let log_dir = if Path::new("/run").is_dir() && is_root() {
        PathBuf::from("/run/ferrovol")
    } else {
        std::env::temp_dir()
    };
    std::fs::create_dir_all(&log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;
    let log_path = log_dir.join(format!("attach-{name}-{}.log", std::process::id()));
    let log =
        std::fs::File::create(&log_path).with_context(|| format!("cannot create {}", log_path.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(&args).env(NOTIFY_ENV, "1").env(LOG_ENV, &log_path).stderr(log);
    match host::spawn_until_ready(&mut cmd, READY_TIMEOUT) {
        Ok(child) => {
            println!(
                "attached volume {name} at {} (pid {}, log {}); detach with `ferrovol detach {0}`",
                path.display(),
                child.id(),
                log_path.display()
            );
            Ok(())
        }
        Err(e) => {
            if host::mount_at(path).is_some() {
                let _ = unmount(path);
            }
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_file(&log_path);
            eprint!("{log}");
            bail!("attach failed: {e}")
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

pub fn detach(path: &Path) -> anyhow::Result<()> {
    match host::mount_at(path).map(|m| (m.fstype, m.source)) {
        Some((t, source)) if t.starts_with("fuse") && source.starts_with("ferrovol:") => {}
        Some((t, source)) => {
            bail!("{} is a {t} mount of {source}, not a ferrovol attachment", path.display())
        }
        None => bail!("{} is not attached", path.display()),
    }
    unmount(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            anyhow::anyhow!("{} is busy (open files or a loop device on it): {e}", path.display())
        } else {
            anyhow::anyhow!("cannot unmount {}: {e}", path.display())
        }
    })?;
    // The attach process releases the writer attachment after the unmount: wait for it, so that
    // what follows a detach (a delete, an attach elsewhere) finds the volume free.
    if !host::wait_serving_exit(path, Duration::from_secs(30)) {
        eprintln!("ferrovol: the attach process of {} has not exited after 30 s", path.display());
    }
    println!("detached {}", path.display());
    Ok(())
}

/// `ferrovol status`: the mounts this host serves (from their serving records).
pub fn status(json: bool) -> anyhow::Result<()> {
    let all = host::servings();
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no volumes attached on this host");
        return Ok(());
    }
    println!(
        "{:<32} {:<20} {:<22} {:>8} {:>8} {:>8}  SINCE",
        "PATH", "VOLUME", "SERVER", "HOLDER", "WORKER", "RESTARTS"
    );
    for s in all {
        let mode = if s.read_only { " (ro)" } else { "" };
        println!(
            "{:<32} {:<20} {:<22} {:>8} {:>8} {:>8}  {}",
            s.path.display(),
            format!("{}{mode}", s.volume),
            s.server,
            s.holder,
            s.worker.map_or("-".to_owned(), |w| w.to_string()),
            s.restarts,
            ferrovol_proto::format_unix_ms(s.since_unix_ms),
        );
    }
    Ok(())
}
