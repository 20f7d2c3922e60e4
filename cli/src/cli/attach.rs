//! `ferrovol attach NAME PATH` and `ferrovol detach PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _};
use ferrovol_client::fuse;
use ferrovol_client::host;
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
    generation: Option<u64>,
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
    let access = match (read_only, generation) {
        (true, _) => fuse::Access::ReadOnly,
        (false, Some(generation)) => fuse::Access::WriterAt { generation },
        (false, None) => fuse::Access::Writer { takeover: force_takeover },
    };
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
    let mut cmd = Command::new(exe);
    cmd.args(&args);
    let cmd = notifying(cmd, Some(&log_path));
    // The error ends with the log's last lines (the reason); the log goes.
    let child = host::start_attach(cmd, path, &log_path, READY_TIMEOUT).inspect_err(|_| {
        let _ = std::fs::remove_file(&log_path);
    })?;
    println!(
        "attached volume {name} at {} (pid {}, log {}); detach with `ferrovol detach {0}`",
        path.display(),
        child.id(),
        log_path.display()
    );
    Ok(())
}

/// `cmd` (a `ferrovol attach` in the foreground) set up to print `ready` once the mount is usable,
/// and to remove `log` when it exits cleanly.
pub fn notifying(mut cmd: Command, log: Option<&Path>) -> Command {
    cmd.env(NOTIFY_ENV, "1");
    if let Some(l) = log {
        cmd.env(LOG_ENV, l);
    }
    cmd
}

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

pub fn detach(path: &Path) -> anyhow::Result<()> {
    host::detach(path)?;
    println!("detached {}", path.display());
    Ok(())
}

/// `ferrovol status --keeper SOCKET`: what the keeper holds.
pub fn keeper_status(socket: &Path, json: bool) -> anyhow::Result<()> {
    let kept =
        fuse::keep::list(socket).with_context(|| format!("cannot ask the keeper at {}", socket.display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&kept)?);
        return Ok(());
    }
    if kept.is_empty() {
        println!("the keeper at {} holds no mount", socket.display());
        return Ok(());
    }
    println!("{:<40} {:<20} {:>10} {:>4}  STATE", "PATH", "VOLUME", "DEPOSITORS", "FDS");
    for k in kept {
        let state = match k.orphan_ms {
            Some(ms) => {
                format!("orphan for {}.{} s (waiting for an attach daemon)", ms / 1000, ms % 1000 / 100)
            }
            None => "served".to_owned(),
        };
        println!("{:<40} {:<20} {:>10} {:>4}  {state}", k.path.display(), k.volume, k.depositors, k.fds);
    }
    Ok(())
}

/// One line of `ferrovol status`: a serving record and what its worker last reported.
#[derive(serde::Serialize)]
struct Line {
    #[serde(flatten)]
    serving: host::Serving,
    /// The worker's client session: requests in flight, reconnects (none before it reported).
    stats: Option<ferrovol_client::SessionStats>,
}

/// `ferrovol status`: the mounts this host serves (from their serving records), with what each
/// worker last reported (requests in flight, reconnects).
pub fn status(json: bool) -> anyhow::Result<()> {
    let all: Vec<Line> = host::servings()
        .into_iter()
        .map(|s| {
            let stats = s.worker.and_then(|w| host::worker_stats(&s.path, w)).map(|w| w.session);
            Line { serving: s, stats }
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no volumes attached on this host");
        return Ok(());
    }
    println!(
        "{:<32} {:<20} {:<22} {:>8} {:>8} {:>8} {:>8} {:>8}  SINCE",
        "PATH", "VOLUME", "SERVER", "HOLDER", "WORKER", "RESTARTS", "INFLIGHT", "RECONN"
    );
    for Line { serving: s, stats } in all {
        let mode = if s.read_only { " (ro)" } else { "" };
        let num = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "{:<32} {:<20} {:<22} {:>8} {:>8} {:>8} {:>8} {:>8}  {}",
            s.path.display(),
            format!("{}{mode}", s.volume),
            s.server,
            s.holder,
            s.worker.map_or("-".to_owned(), |w| w.to_string()),
            s.restarts,
            num(stats.map(|t| t.in_flight as u64)),
            num(stats.map(|t| t.reconnects)),
            ferrovol_proto::format_unix_ms(s.since_unix_ms),
        );
    }
    Ok(())
}
