//! Host helpers shared by the node-side tools (`ferrovol attach`/`up` and the CSI node plugin): the
//! mount table, unmounting, loop devices, and running system tools with their errors kept.

use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// What is mounted at a path: its filesystem type and source, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub fstype: String,
    pub source: String,
    /// The per-mount options (`ro`/`rw`, `noatime`...).
    pub options: Vec<String>,
}

/// Undoes the octal escapes mountinfo uses for blanks and backslashes.
fn unescape(field: &str) -> String {
    field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// The topmost mount exactly at `path`, if any. A path that cannot be resolved (missing, or a dead
/// FUSE mount answering ENOTCONN) falls back to a lexical match, so a broken mount is still found.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // Fields: id parent major:minor root mountpoint options ... - fstype source superopts
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if Path::new(&unescape(fields.get(4)?)) != target {
            return None;
        }
        let dash = fields.iter().position(|f| *f == "-")?;
        Some(MountEntry {
            fstype: (*fields.get(dash + 1)?).to_owned(),
            source: unescape(fields.get(dash + 2)?),
            options: fields.get(5)?.split(',').map(str::to_owned).collect(),
        })
    })
}

/// Every mount point whose source is `source` (a loop device, say).
pub fn mounts_of(source: &str) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let mount_point = PathBuf::from(unescape(fields.get(4)?));
            (unescape(fields.get(dash + 2)?) == source).then_some(mount_point)
        })
        .collect()
}

/// Unmounts `path` now (not lazily): fails with EBUSY while something still uses it.
pub fn unmount(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: a valid NUL-terminated path; umount2 reads it only.
    let rc = unsafe { libc::umount2(c.as_ptr(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Retries `f` while it fails with EBUSY, for about `limit`.
pub fn retry_busy<T>(limit: Duration, mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Runs a system tool; a failure carries the command line and its stderr. Returns its stdout.
pub fn run(cmd: &mut Command) -> io::Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| io::Error::new(e.kind(), format!("cannot run {shown}: {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Starts `cmd` in a session of its own (so it outlives the caller, its terminal and a `kill -9` of
/// it) with stdout piped, and waits up to `timeout` for the line `ready`. Returns the running child;
/// otherwise the child is stopped and reaped, and the error says whether it exited or timed out.
/// The caller sets stderr (a log file) and cleans up what the child may have left (a mount).
pub fn spawn_until_ready(cmd: &mut Command, timeout: Duration) -> io::Result<Child> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    // SAFETY: setsid is async-signal-safe and only detaches the child from our session and terminal.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| io::Error::other("no stdout from the child"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let outcome = rx.recv_timeout(timeout);
    if matches!(&outcome, Ok(line) if line.trim() == "ready") {
        return Ok(child);
    }
    // Anything but `ready` (EOF, another line, silence): stop it, so nothing half-started stays.
    let _ = child.kill();
    let status = child.wait()?;
    Err(match outcome {
        Ok(_) => io::Error::other(format!("it exited before it was ready ({status})")),
        Err(_) => io::Error::new(
            io::ErrorKind::TimedOut,
            format!("it was not ready within {timeout:?}; stopped it"),
        ),
    })
}

/// Starts `cmd` (a foreground attach of the FUSE file `path` that prints `ready`) with
/// [`spawn_until_ready`], its stderr appended to `log`. On failure nothing stays mounted at `path`,
/// and the error ends with the last lines of the log.
pub fn start_attach(mut cmd: Command, path: &Path, log: &Path, timeout: Duration) -> io::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", log.display())))?;
    cmd.env_remove(crate::fuse::supervise::HANDOFF_ENV).stderr(file);
    spawn_until_ready(&mut cmd, timeout).map_err(|e| {
        if mount_at(path).is_some() {
            let _ = unmount(path);
        }
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        let tail = tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
        let msg = if tail.is_empty() {
            format!("attach failed: {e}")
        } else {
            format!("attach failed: {e}: {tail}")
        };
        io::Error::new(e.kind(), msg)
    })
}

/// Unmounts the ferrovol FUSE file at `path` and waits (up to 30 s) for its processes to exit:
/// they release the writer attachment after the unmount, so what follows (a delete, an attach
/// elsewhere) finds the volume free.
pub fn detach(path: &Path) -> io::Result<()> {
    match mount_at(path).map(|m| (m.fstype, m.source)) {
        Some((t, source)) if t.starts_with("fuse") && source.starts_with("ferrovol:") => {}
        Some((t, source)) => {
            return Err(io::Error::other(format!(
                "{} is a {t} mount of {source}, not a ferrovol attachment",
                path.display()
            )))
        }
        None => {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not attached", path.display()),
            ))
        }
    }
    unmount(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            io::Error::new(
                e.kind(),
                format!("{} is busy (open files or a loop device on it): {e}", path.display()),
            )
        } else {
            io::Error::new(e.kind(), format!("cannot unmount {}: {e}", path.display()))
        }
    })?;
    if !wait_serving_exit(path, Duration::from_secs(30)) {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{} is unmounted, but its attach process has not exited after 30 s", path.display()),
        ));
    }
    Ok(())
}

/// Finds a system tool in PATH or the usual sbin directories.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn backing_file_attr(dev: &str) -> PathBuf {
    Path::new("/sys/block").join(Path::new(dev).file_name().unwrap_or_default()).join("loop/backing_file")
}

/// Sets up a loop device over `file` (direct I/O when the kernel takes it: the page cache above the
/// loop device is enough) and returns its path.
pub fn loop_attach(file: &Path, read_only: bool) -> io::Result<String> {
    let mut args = vec!["--find", "--show"];
    if read_only {
        args.push("--read-only");
    }
    let file = file.as_os_str();
    run(Command::new("losetup").args(&args).arg("--direct-io=on").arg(file))
        .or_else(|_| run(Command::new("losetup").args(&args).arg(file)))
}

/// The loop devices whose backing file is `file`.
pub fn loops_of(file: &Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else { return Vec::new() };
    let want = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            (Path::new(backing.trim_end()) == want).then(|| format!("/dev/{name}"))
        })
        .collect()
}

/// Detaches a loop device and waits until the kernel has let go of its backing file. `losetup -d` only
/// marks a device that someone still has open (udev or blkid probing it, a deferred close after an
/// unmount) for release on its last close, so the backing file can stay busy a moment after it returns.
pub fn loop_release(dev: &str) -> io::Result<()> {
    let backing = backing_file_attr(dev);
    if backing.exists() {
        // A device already released (a retry after the timeout below) needs no second -d.
        run(Command::new("losetup").args(["-d", dev]))?;
    }
    for _ in 0..200 {
        if !backing.exists() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(io::Error::other(format!("{dev} is still in use 10 s after `losetup -d` (see `fuser -v {dev}`)")))
}

/// Tells a loop device to pick up its backing file's new size.
pub fn loop_refresh_size(dev: &str) -> io::Result<()> {
    run(Command::new("losetup").args(["-c", dev])).map(drop)
}

/// Whether `path` answers like a dead FUSE mount or a failing device (ENOTCONN, EIO): still mounted,
/// never "gone".
pub fn is_broken_mount_error(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTCONN) | Some(libc::EIO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spawn_until_ready_reports_ready_exit_and_silence() {
        let t = Duration::from_secs(5);
        let mut ok = spawn_until_ready(Command::new("sh").args(["-c", "echo ready; sleep 0.2"]), t).unwrap();
        assert!(ok.wait().unwrap().success());
        let exited = spawn_until_ready(Command::new("sh").args(["-c", "echo nope"]), t).unwrap_err();
        assert!(exited.to_string().contains("exited before it was ready"), "{exited}");
        let silent =
            spawn_until_ready(Command::new("sleep").arg("30"), Duration::from_millis(200)).unwrap_err();
        assert_eq!(silent.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn unescapes_mountinfo_fields() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
    }

    #[test]
    fn root_is_a_mount_point_and_a_fresh_dir_is_not() {
        assert!(mount_at(Path::new("/")).is_some());
        let dir = std::env::temp_dir().join(format!("ferrovol-host-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(mount_at(&dir), None);
        std::fs::remove_dir(&dir).unwrap();
    }

    /// A second taker of a mount's lock waits until the first lets go (another open file
    /// description of the same file: the same as another process).
    #[test]
    fn a_mount_lock_has_one_owner_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("m.img");
        std::fs::write(&mount, b"").unwrap();
        let first = lock_mount(&mount, "test", 99, true).unwrap();
        let busy = lock_mount(&mount, "test", 99, false).unwrap_err();
        assert!(busy.to_string().contains("already"), "{busy}");
        // Another mount (session) at the same path: another lock.
        lock_mount(&mount, "test", 98, false).unwrap().remove();
        let (tx, rx) = std::sync::mpsc::channel();
        let m = mount.clone();
        let t = std::thread::spawn(move || {
            let second = lock_mount(&m, "test", 99, true).unwrap();
            tx.send(()).unwrap();
            second.remove();
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "taken twice at once");
        // Removed by its owner while the second waits: the second locks a new file, never the old one.
        first.remove();
        rx.recv_timeout(Duration::from_secs(5)).expect("the second taker gets it once the first lets go");
        t.join().unwrap();
        assert!(!serving_record(&mount).with_extension(format!("test.{:016x}.lock", 99)).exists());
    }
}

/// The directory of the serving records (see [`serving_record`]).
pub fn serving_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } == 0 && Path::new("/run").is_dir() {
        PathBuf::from("/run/ferrovol/serving")
    } else {
        std::env::temp_dir().join("ferrovol-serving")
    }
}

/// Where the processes serving a FUSE mount record themselves (see [`Serving`]), so that `ferrovol
/// detach` can wait for them to finish (the writer attachment is released after the unmount) and
/// `ferrovol status` can list them: under [`serving_dir`], one file per mount path, named by a
/// stable hash of the canonical path.
pub fn serving_record(mount: &Path) -> PathBuf {
    let canon = std::fs::canonicalize(mount).unwrap_or_else(|_| mount.to_owned());
    // FNV-1a: stable across builds (the recording and the waiting binaries may differ).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canon.as_os_str().as_encoded_bytes() {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    serving_dir().join(format!("{h:016x}.json"))
}

/// The `role` lock of the mount `session` at `path` ("holder" or "worker"; `session` is the
/// mount's client session id, random per mount, which every holder and worker of it knows): an
/// exclusive `flock` on a file beside its serving record, held until the returned lock is dropped
/// (at the latest when the process exits; close-on-exec, so no child inherits it). At most one
/// holder and one worker of a mount run at once, whoever started them: a worker that finds its
/// holder dead starts a holder, and so does an attach daemon that finds the mount orphaned (see
/// `fuse::keep`); the second waits here as a standby (`wait`) until the first is gone, or fails at
/// once (not `wait`). The file locked is always the one at the path (checked after the lock), so
/// a file removed meanwhile ([`MountLock::remove`]) is never held by two processes.
pub fn lock_mount(path: &Path, role: &str, session: u64, wait: bool) -> io::Result<MountLock> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let lock = serving_record(path).with_extension(format!("{role}.{session:016x}.lock"));
    if let Some(dir) = lock.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut said = false;
    loop {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock)?;
        let mut waiting = false;
        loop {
            let flags = if waiting { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(f.as_raw_fd(), flags) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EWOULDBLOCK) if wait => {
                    if !said {
                        said = true;
                        tracing::info!(path = %path.display(), role, "another {role} of this mount runs; waiting for it to end");
                    }
                    waiting = true;
                }
                Some(libc::EWOULDBLOCK) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("another {role} process serves the mount at {} already", path.display()),
                    ))
                }
                _ => return Err(e),
            }
        }
        // Still the file at the path? (Its owner may have removed it while we waited.)
        let held = f.metadata()?;
        match std::fs::metadata(&lock) {
            Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                return Ok(MountLock { file: f, path: lock })
            }
            _ => continue,
        }
    }
}

/// A held [`lock_mount`] lock.
#[derive(Debug)]
pub struct MountLock {
    file: std::fs::File,
    path: PathBuf,
}

impl MountLock {
    /// Removes its file (if it is still the one locked) and releases it: once the mount is over,
    /// so no lock files pile up. A process waiting on the removed file finds it gone and locks a
    /// new one (see [`lock_mount`]).
    pub fn remove(self) {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(held), Ok(now)) = (self.file.metadata(), std::fs::metadata(&self.path)) {
            if held.ino() == now.ino() && held.dev() == now.dev() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// What a serving record says: one mount and the processes that serve it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Serving {
    /// The mounted file.
    pub path: PathBuf,
    pub volume: String,
    pub server: String,
    pub read_only: bool,
    /// The process that holds the mount and exits once it is gone (`detach` waits for it).
    pub holder: u32,
    /// The process that serves the requests, when it is not the holder (our own FUSE session).
    pub worker: Option<u32>,
    /// Workers started after the first (each after one died).
    pub restarts: u32,
    /// When the volume was mounted.
    pub since_unix_ms: u64,
}

impl Serving {
    /// A mount just made by this process, which holds it; no worker yet.
    pub fn started(path: &Path, volume: &str, server: &str, read_only: bool) -> Self {
        Self {
            path: path.to_owned(),
            volume: volume.to_owned(),
            server: server.to_owned(),
            read_only,
            holder: std::process::id(),
            worker: None,
            restarts: 0,
            since_unix_ms: now_unix_ms(),
        }
    }
}

/// Records `state` for its mount (see [`serving_record`]); the record is removed when the returned
/// guard is dropped. Replaced atomically, so a reader never sees half of it.
pub fn record_serving(mut state: Serving) -> io::Result<ServingRecord> {
    if let Ok(canon) = std::fs::canonicalize(&state.path) {
        state.path = canon;
    }
    let record = ServingRecord { path: serving_record(&state.path), state };
    if let Some(dir) = record.path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    record.write()?;
    Ok(record)
}

/// The serving record of one mount; removed on drop.
#[derive(Debug)]
pub struct ServingRecord {
    path: PathBuf,
    state: Serving,
}

impl ServingRecord {
    fn write(&self) -> io::Result<()> {
        let tmp = self.path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(&self.state).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Changes the record (a new worker, say).
    pub fn update(&mut self, change: impl FnOnce(&mut Serving)) -> io::Result<()> {
        change(&mut self.state);
        self.write()
    }
}

impl Drop for ServingRecord {
    fn drop(&mut self) {
        // Only if it is still ours: a holder that took over from us may have rewritten it.
        if read_serving(&self.path).is_some_and(|s| s.holder == self.state.holder) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What a mount's worker reports about its client session, in `HASH.stats.json` beside the
/// serving record, about once a second while it serves (`ferrovol status` shows it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerStats {
    pub worker: u32,
    #[serde(flatten)]
    pub session: crate::SessionStats,
    pub updated_unix_ms: u64,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where the worker of `mount` writes its stats (see [`WorkerStats`]).
pub fn worker_stats_path(mount: &Path) -> PathBuf {
    serving_record(mount).with_extension("stats.json")
}

/// Replaces the worker stats file `file` (atomically).
pub fn write_worker_stats(file: &Path, stats: &WorkerStats) -> io::Result<()> {
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec(stats).map_err(io::Error::other)?)?;
    std::fs::rename(&tmp, file)
}

/// The worker stats of `mount`, if its worker `worker` wrote them within the last 15 s (it
/// rewrites them at least every 10 s; older ones are from a worker that hangs or is stopped).
pub fn worker_stats(mount: &Path, worker: u32) -> Option<WorkerStats> {
    let s: WorkerStats = serde_json::from_slice(&std::fs::read(worker_stats_path(mount)).ok()?).ok()?;
    (s.worker == worker && now_unix_ms().saturating_sub(s.updated_unix_ms) <= 15_000).then_some(s)
}

/// The serving record of `mount`, if there is one.
pub fn serving_of(mount: &Path) -> Option<Serving> {
    read_serving(&serving_record(mount))
}

fn read_serving(path: &Path) -> Option<Serving> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Every mount recorded as served on this host, by path; records of processes that are all dead
/// (killed with SIGKILL, say) are left out.
pub fn servings() -> Vec<Serving> {
    let Ok(dir) = std::fs::read_dir(serving_dir()) else { return Vec::new() };
    let mut all: Vec<Serving> = dir
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".stats.json"))
        .filter_map(|e| read_serving(&e.path()))
        .filter(|s| pid_alive(s.holder) || s.worker.is_some_and(pid_alive))
        .collect();
    all.sort_by(|a, b| a.path.cmp(&b.path));
    all
}

/// Whether process `pid` is running (a zombie, dead and not yet reaped, is not).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // "pid (comm) S ...": the state follows the last ')' (comm may hold anything).
    stat.rsplit(')').next().is_some_and(|rest| !matches!(rest.trim_start().chars().next(), Some('Z' | 'X')))
}

/// Waits (up to `limit`) for the processes recorded as serving `mount` to exit. True when they did
/// (or none was recorded), false when one is still running at the limit. The record is read again
/// each time (a holder that replaced a dead one rewrites it), and the processes last seen in it are
/// waited for even once it is gone (the holder removes it just before it exits).
pub fn wait_serving_exit(mount: &Path, limit: Duration) -> bool {
    let path = serving_record(mount);
    let deadline = std::time::Instant::now() + limit;
    let mut last: Vec<u32> = Vec::new();
    loop {
        if let Some(s) = read_serving(&path) {
            last = [Some(s.holder), s.worker].into_iter().flatten().collect();
        }
        if !last.iter().any(|&p| pid_alive(p)) {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
