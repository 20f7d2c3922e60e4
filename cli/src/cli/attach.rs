//! `ferrovol attach NAME PATH` and `ferrovol detach PATH`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use ferrovol_client::fuse::BlockFile;
use ferrovol_client::Session;
use ferrovol_proto::VolumeName;
use fuser::{Config, MountOption, SessionACL};
use tracing::info;

use super::Global;

/// Set in the environment of the foreground process that `--background` starts: it prints `ready` on
/// stdout once the mount is usable.
const NOTIFY_ENV: &str = "FERROVOL_ATTACH_NOTIFY";
/// The background process's log file, removed when it exits cleanly (kept for post-mortems otherwise).
const LOG_ENV: &str = "FERROVOL_ATTACH_LOG";
/// How long `--background` waits for the mount.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// FUSE request threads.
const FUSE_THREADS: usize = 4;

/// The filesystem type and source of what is mounted exactly at `path` (from /proc/self/mountinfo).
pub fn mounted_fstype(path: &Path) -> Option<(String, String)> {
    let canon = std::fs::canonicalize(path).ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mountpoint options ... - fstype source superopts
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mp = fields.get(4)?;
        let mp =
            mp.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\");
        if Path::new(&mp) != canon {
            return None;
        }
        let dash = fields.iter().position(|f| *f == "-")?;
        Some(((*fields.get(dash + 1)?).to_owned(), (*fields.get(dash + 2)?).to_owned()))
    })
}

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
    if let Some((fstype, source)) = mounted_fstype(path) {
        bail!("mount path {} is already a mount point ({fstype} {source}); detach it first", path.display());
    }
    Ok(())
}

/// The FUSE session settings for a block volume (shared by `attach` and `up`).
pub fn fuse_config(name: &VolumeName, read_only: bool) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("ferrovol:{name}")),
        MountOption::Subtype("ferrovol".into()),
        MountOption::DefaultPermissions,
        if read_only { MountOption::RO } else { MountOption::RW },
    ];
    if is_root() {
        // Root mounts for others (kubelet, pods, loop devices opened by other processes).
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    config
}

pub fn attach(
    global: &Global,
    name: &VolumeName,
    path: &Path,
    read_only: bool,
    background: bool,
) -> anyhow::Result<()> {
    check_mount_point(path)?;
    if background {
        return spawn_background(name, path);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ferrovol-io")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let vol = rt.block_on(async {
        let session = Session::connect(&global.server, global.options()).await?;
        let vol = session.open(name, read_only).await?;
        anyhow::Ok(vol)
    })?;
    let size = vol.size();
    let fs = BlockFile::new(vol, rt.handle().clone(), read_only);
    let config = fuse_config(name, read_only);
    let mut session = fuser::Session::new(fs, path, &config)
        .with_context(|| format!("cannot mount volume {name} at {}", path.display()))?;
    let mut unmounter = session.unmount_callable();
    let shown = path.display().to_string();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!(path = %shown, "signal received; unmounting");
        if let Err(e) = unmounter.unmount() {
            eprintln!("ferrovol: unmount of {shown} failed: {e} (is it still in use?)");
        }
    });
    info!(volume = %name, path = %path.display(), size, read_only, "attached");
    if std::env::var_os(NOTIFY_ENV).is_some() {
        println!("ready");
    } else {
        eprintln!(
            "attached volume {name} at {} ({} bytes); Ctrl-C or `ferrovol detach {0}` to detach",
            path.display(),
            size
        );
    }
    session.run().with_context(|| format!("FUSE session for {} failed", path.display()))?;
    info!(path = %path.display(), "detached");
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
    cmd.args(&args)
        .env(NOTIFY_ENV, "1")
        .env(LOG_ENV, &log_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe and only detaches the child from our session and terminal, so
    // it survives the shell that started it.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the attach process")?;
    let stdout = child.stdout.take().context("no stdout from the attach process")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(line) if line.trim() == "ready" => {
            println!(
                "attached volume {name} at {} (pid {}, log {}); detach with `ferrovol detach {0}`",
                path.display(),
                child.id(),
                log_path.display()
            );
            Ok(())
        }
        Ok(_) => {
            let status = child.wait()?;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let _ = std::fs::remove_file(&log_path);
            eprint!("{log}");
            bail!("attach failed ({status})")
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            if mounted_fstype(path).is_some() {
                let _ = unmount(path);
            }
            bail!("the mount was not ready within {READY_TIMEOUT:?}; gave up")
        }
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// Unmounts `path` now (not lazily): fails with EBUSY while something still uses it.
pub fn unmount(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it only.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

pub fn detach(path: &Path) -> anyhow::Result<()> {
    match mounted_fstype(path) {
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
    println!("detached {}", path.display());
    Ok(())
}
