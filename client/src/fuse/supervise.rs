//! Continuity of a mounted block file on our own FUSE session: two processes, a *holder* and a
//! *worker*, each hold every /dev/fuse fd of the connection, so either one can die and the mount
//! lives on (the kernel keeps a FUSE connection while any process holds an fd of it, and queues
//! its requests meanwhile).
//!
//! - The holder is the process that was started (`ferrovol attach`, the CSI plugin's attach
//!   process). It checks the volume, mounts, answers INIT, and starts the worker, handing it the
//!   fds. Whenever the worker dies while the mount lives, it starts a new one, which resumes the
//!   connection without INIT and asks the kernel to resend what the dead one had taken. It
//!   unmounts on SIGTERM/SIGINT, and exits once the mount is gone.
//! - The worker connects to the server and serves the requests. If the holder dies, the worker
//!   starts a new holder (which adopts it) and hands it the fds.
//!
//! Both roles are this same command line, executed again: a handoff in the environment
//! ([`HANDOFF_ENV`]) names the role, the inherited fds and what INIT negotiated. So a restart
//! picks up the binary now installed at the same path: replacing the binary and killing the
//! worker upgrades it in place.
//!
//! **Fencing the dead worker.** A restarted worker connects under the client session id of the
//! first one, with as many connections: the server takes each of its HELLOs as a reconnect of the
//! same slot, which retires the old connection and waits for that connection's writes in flight.
//! Only once every connection is up does the worker ask for the resend. So no WRITE of the dead
//! worker can land after a resent one (or after a newer write of the application).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrovol_proto::VolumeName;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::abi::{InitOut, Op, Request};
use super::keep;
use super::kernel::{self, Channel, Handler};
use super::serve::{Access, ServeError};
use super::OwnBlockFile;
use crate::host::Serving;
use crate::{ClientError, ConnectOptions, Session, Volume};

/// The environment variable that carries a [`Handoff`] to a process started as a holder or worker.
pub const HANDOFF_ENV: &str = "FERROVOL_FUSE_HANDOFF";

/// A worker that dies before it is up, or more than [`QUICK_DEATHS_FREE`] times in a row within
/// [`QUICK_DEATH`] of its start, is restarted after a pause, doubling from the first to the last
/// while that goes on.
const RESTART_PAUSE_MIN: Duration = Duration::from_millis(100);
const RESTART_PAUSE_MAX: Duration = Duration::from_secs(2);
const QUICK_DEATH: Duration = Duration::from_secs(1);
const QUICK_DEATHS_FREE: u32 = 3;
/// And whatever kills them: more than this many deaths within the window pause too.
const DEATHS_WINDOW: Duration = Duration::from_secs(2);
const DEATHS_PER_WINDOW: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    Worker,
    Holder,
}

/// What a holder or worker is handed when it starts. Fields added later get `#[serde(default)]`,
/// so a newer binary (a restart after an upgrade) reads what an older one handed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Handoff {
    /// [`HANDOFF_VERSION`] of the binary that wrote it (0: written before handoffs had one); a
    /// binary refuses a handoff newer than it knows.
    #[serde(default)]
    version: u32,
    role: Role,
    /// The connection's /dev/fuse fds, as numbered in the new process (inherited).
    fds: Vec<RawFd>,
    /// The new process's end of the link socket to its peer: EOF on it means the peer died.
    link: RawFd,
    /// The client session id every worker of this mount speaks as (see the module docs).
    session: u64,
    /// The writer attachment generation the volume is opened under (ignored read-only).
    generation: u64,
    /// What INIT negotiated, once, for the whole life of the connection.
    init: InitOut,
    /// Worker: ask the kernel to resend the requests a dead worker had taken.
    resend: bool,
    /// The pid of the peer (a new holder's worker, which is its parent).
    peer: u32,
    /// The volume's size when it was mounted (for the holder's messages).
    size: u64,
    /// When it was mounted (for `ferrovol status`).
    since_unix_ms: u64,
    /// How many connections every worker opens: at least as many as any worker before it opened
    /// (each reports its count with `ready`), so each slot of a dead worker is retired by a new
    /// HELLO (see the module docs), whatever the defaults of the binary that runs next.
    #[serde(default)]
    connections: usize,
}

const HANDOFF_VERSION: u32 = 1;

/// Whether this process was started as the holder or worker of a mount that already exists: the
/// command line's own checks ("already a mount point") and `--background` do not apply to it.
pub fn continuing() -> bool {
    std::env::var_os(HANDOFF_ENV).is_some()
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The handoff this process was started with, and the fds it names, taken over (once).
/// A handoff, the fds it names, and the link to the peer (none for a holder of an orphan).
type Taken = (Handoff, Vec<OwnedFd>, Option<UnixStream>);

fn take_handoff() -> io::Result<Option<Taken>> {
    let Some(raw) = std::env::var_os(HANDOFF_ENV) else { return Ok(None) };
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(io::Error::other("the FUSE handoff was already taken"));
    }
    let h: Handoff = serde_json::from_str(&raw.to_string_lossy())
        .map_err(|e| io::Error::other(format!("malformed {HANDOFF_ENV}: {e}")))?;
    if h.version > HANDOFF_VERSION {
        return Err(io::Error::other(format!(
            "{HANDOFF_ENV} is version {}; this binary reads up to {HANDOFF_VERSION}",
            h.version
        )));
    }
    let own = |fd: RawFd| -> io::Result<OwnedFd> {
        // SAFETY: F_GETFD only reads the flags of `fd`; it fails for an fd that is not open.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::other(format!("{HANDOFF_ENV} names fd {fd}, which is not open")));
        }
        // Not inherited by what this process starts, unless it hands it on explicitly.
        // SAFETY: F_SETFD on an open fd only sets its close-on-exec flag.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // SAFETY: the fd was inherited for us alone (the parent named it in the handoff, which is
        // taken once), so nothing else in this process owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let fds = h.fds.iter().map(|&fd| own(fd)).collect::<io::Result<Vec<_>>>()?;
    // No link: a holder started for an orphan (see `keep`), whose worker and holder are gone.
    let link = match (h.link, h.role) {
        (-1, Role::Holder) => None,
        (fd, _) => Some(UnixStream::from(own(fd)?)),
    };
    if fds.is_empty() {
        return Err(io::Error::other(format!("{HANDOFF_ENV} names no /dev/fuse fd")));
    }
    Ok(Some((h, fds, link)))
}

/// Where this binary is installed (its path, even if the file there was replaced or removed).
fn installed_exe() -> io::Result<PathBuf> {
    let p = std::env::current_exe()?;
    Ok(match p.as_os_str().to_string_lossy().strip_suffix(" (deleted)") {
        Some(orig) => PathBuf::from(orig),
        None => p,
    })
}

/// This binary, by path: after an upgrade replaced it on disk, the new one. If nothing is at the
/// path any more, the running binary itself (`/proc/self/exe` still executes a deleted file).
fn exe() -> io::Result<PathBuf> {
    let p = std::env::current_exe()?;
    let s = p.as_os_str().to_string_lossy();
    let at = match s.strip_suffix(" (deleted)") {
        Some(orig) => PathBuf::from(orig),
        None => p,
    };
    Ok(if at.is_file() { at } else { PathBuf::from("/proc/self/exe") })
}

/// Starts this command line again as `h.role`, handing it `fds` and `link` (its end of the link).
fn spawn(h: &Handoff, fds: &[OwnedFd], link: &OwnedFd) -> io::Result<std::process::Child> {
    let mut cmd = Command::new(exe()?);
    cmd.args(std::env::args_os().skip(1));
    spawn_with(cmd, h, fds, Some(link))
}

/// Starts this command line again as `h.role` from the worker, without fork: the worker's FUSE
/// threads sit in read() on buffers that fork would make copy-on-write, and a request copied into
/// such a page while the worker is being killed gets EIO (see `kernel::read_request`). Without a
/// `pre_exec` closure, std spawns with posix_spawn (vfork semantics: the parent's pages are not
/// touched). The fds are handed as inheritable duplicates made for the spawn and closed after it
/// (only this thread of the worker starts processes). No setsid: the worker has a session of its
/// own already, which the new holder shares.
fn spawn_unforked(h: &Handoff, fds: &[OwnedFd], link: &OwnedFd) -> io::Result<std::process::Child> {
    let inheritable = |fd: &OwnedFd| -> io::Result<OwnedFd> {
        // SAFETY: F_DUPFD duplicates an fd we own into the lowest free number >= 3, without
        // close-on-exec; the new fd is ours alone.
        let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 3) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by F_DUPFD and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    };
    let dups = fds.iter().chain([link]).map(inheritable).collect::<io::Result<Vec<_>>>()?;
    let raw: Vec<RawFd> = dups.iter().map(AsRawFd::as_raw_fd).collect();
    let handoff = Handoff { fds: raw[..fds.len()].to_vec(), link: raw[fds.len()], ..h.clone() };
    let mut cmd = Command::new(exe()?);
    cmd.args(std::env::args_os().skip(1))
        .env(HANDOFF_ENV, serde_json::to_string(&handoff).map_err(io::Error::other)?)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let child = cmd.spawn();
    drop(dups);
    child
}

/// Starts `cmd` as `h.role` with `fds` (and `link`, if any) inherited and named in its handoff, in
/// a session of its own, its stdin and stdout on /dev/null. It forks (a `pre_exec` closure): not
/// for the worker, which uses [`spawn_unforked`].
fn spawn_with(
    mut cmd: Command,
    h: &Handoff,
    fds: &[OwnedFd],
    link: Option<&OwnedFd>,
) -> io::Result<std::process::Child> {
    let raw: Vec<RawFd> = fds.iter().chain(link).map(AsRawFd::as_raw_fd).collect();
    let handoff =
        Handoff { fds: raw[..fds.len()].to_vec(), link: link.map_or(-1, AsRawFd::as_raw_fd), ..h.clone() };
    cmd.env(HANDOFF_ENV, serde_json::to_string(&handoff).map_err(io::Error::other)?)
        // Not the caller's pipes: `--background` waits for the holder's stdout to say ready.
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: between fork and exec the closure only calls fcntl and setsid, which are
    // async-signal-safe, on fds that are open in this process; `raw` was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &raw {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Its own session: a Ctrl-C in the caller's terminal goes to the holder, which unmounts.
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
}

/// What this process deposits with the keeper (see [`super::keep`]) for the mount at `path`: how
/// to start a holder for it again. `None` when the command line or environment is not UTF-8.
fn spec(role: Role, path: &Path, volume: &str, h: &Handoff) -> Option<keep::Spec> {
    let args = std::env::args_os().skip(1).map(|a| a.into_string().ok()).collect::<Option<Vec<_>>>()?;
    let env = std::env::vars_os()
        .filter(|(k, _)| k != HANDOFF_ENV)
        .map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect::<Option<Vec<_>>>()?;
    let log = std::fs::read_link("/proc/self/fd/2").ok().filter(|p| p.is_file());
    Some(keep::Spec {
        path: std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned()),
        volume: volume.to_owned(),
        role: match role {
            Role::Holder => "holder",
            Role::Worker => "worker",
        }
        .to_owned(),
        pid: std::process::id(),
        // Where the binary is installed (not /proc/self/exe: the adopter runs what is there then).
        exe: installed_exe().ok()?,
        args,
        cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
        env,
        log,
        handoff: serde_json::to_value(h).ok()?,
    })
}

/// Deposits the mount with the keeper, if this process has one (see [`super::keep`]).
fn deposit(role: Role, path: &Path, volume: &str, h: &Handoff, fds: &[OwnedFd]) {
    let Some(keeper) = keep::configured() else { return };
    let Some(spec) = spec(role, path, volume, h) else {
        warn!(path = %path.display(), "the command line or environment is not UTF-8: not deposited with the keeper");
        return;
    };
    match fds.iter().map(OwnedFd::try_clone).collect::<io::Result<Vec<_>>>() {
        Ok(dup) => keep::deposit_forever(keeper, spec, dup),
        Err(e) => warn!(path = %path.display(), error = %e, "cannot deposit with the keeper"),
    }
}

/// Starts a holder for an orphan claimed from the keeper (see [`super::keep`]): the deposited
/// command line and environment, as a holder without a worker, which starts one that resumes the
/// connection and asks for the resend. The binary is the one now at the deposited path (an
/// upgrade takes effect). Returns the holder.
pub fn adopt(spec: &keep::Spec, fds: &[OwnedFd]) -> io::Result<std::process::Child> {
    let h: Handoff = serde_json::from_value(spec.handoff.clone())
        .map_err(|e| io::Error::other(format!("the deposited handoff is malformed: {e}")))?;
    if h.version > HANDOFF_VERSION {
        return Err(io::Error::other(format!(
            "the deposited handoff is version {}; this binary reads up to {HANDOFF_VERSION}",
            h.version
        )));
    }
    // Only mounts of this same program: what the daemon executes as root is its own binary (the
    // one now at the deposited path, so an upgrade takes effect).
    let ours = std::env::current_exe()?;
    if keep::program_name(&spec.exe) != keep::program_name(&ours) {
        return Err(io::Error::other(format!(
            "the mount was deposited by {}, not by this program ({}); it is not adopted here",
            spec.exe.display(),
            ours.display()
        )));
    }
    let h = Handoff { role: Role::Holder, resend: true, peer: 0, ..h };
    let mut cmd = Command::new(&spec.exe);
    cmd.args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(if spec.cwd.is_dir() { spec.cwd.as_path() } else { Path::new("/") });
    match spec.log.as_ref().map(|l| std::fs::OpenOptions::new().append(true).open(l)) {
        Some(Ok(f)) => {
            cmd.stderr(f);
        }
        _ => {
            cmd.stderr(Stdio::null());
        }
    }
    spawn_with(cmd, &h, fds, None)
}

/// Whether the FUSE connection of `fd` is still alive (not unmounted, not aborted): the kernel
/// reports POLLERR on its fds once it is over.
/// A poll that fails (other than EINTR, which is retried) says nothing: taken as alive.
pub fn connection_alive(fd: &OwnedFd) -> bool {
    loop {
        let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd on our stack, zero timeout.
        let rc = unsafe { libc::poll(&mut p, 1, 0) };
        if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        return rc < 0 || p.revents & (libc::POLLERR | libc::POLLNVAL) == 0;
    }
}

/// Why the connection is over, for the log: unmounted, or aborted with the mount left in place
/// (fusectl's `abort`: it answers ENOTCONN until someone unmounts it).
fn log_over(path: &Path, shown: &str) {
    if crate::host::mount_at(path).is_some() {
        warn!(path = %shown, "the FUSE connection was aborted; the mount answers ENOTCONN until it is unmounted");
    } else {
        info!(path = %shown, "unmounted");
    }
}

/// Reads `link` until its peer has closed it, which happens when the peer process is gone (only
/// that process holds the other end: it is close-on-exec, never inherited).
fn wait_eof(mut link: &UnixStream) {
    let mut b = [0u8; 16];
    loop {
        match link.read(&mut b) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The runtime of a process serving a mount: one I/O thread (the FUSE threads only hand requests
/// to it).
pub(super) fn runtime() -> Result<tokio::runtime::Runtime, ServeError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ferrovol-io")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)
}

/// Connects and opens `name` as the mount's workers do, and returns the volume and the writer
/// generation it is open under.
pub(super) async fn open(
    server: &str,
    opts: ConnectOptions,
    name: &VolumeName,
    access: Access,
) -> Result<(Session, Volume), ClientError> {
    let session = Session::connect(server, opts).await?;
    let vol = match access {
        Access::ReadOnly => session.open(name, true).await?,
        Access::Writer { takeover } => {
            let generation = session.attach_writer(name, takeover).await?;
            session.open_writer(name, generation).await?
        }
        Access::WriterAt { generation } => session.open_writer(name, generation).await?,
    };
    Ok((session, vol))
}

/// What the first process of a mount does (see the module docs): checks and opens the volume,
/// mounts `path`, answers INIT, starts the worker, and holds the fds until the mount is gone.
pub(super) fn start(
    server: &str,
    mut opts: ConnectOptions,
    name: &VolumeName,
    path: &Path,
    access: Access,
    threads: usize,
    ready: impl FnOnce(u64),
) -> Result<(), ServeError> {
    let read_only = access.read_only();
    let rt = runtime()?;
    let session_id = rand::random::<u64>() | 1;
    opts.session_id = Some(session_id);
    let opts_connections = opts.connections;
    // Open it here first, so every refusal (unknown volume, attached elsewhere) comes before the
    // mount, in this process's own words. The worker opens it again under the same session.
    let (generation, size) = rt.block_on(async {
        let (session, vol) = open(server, opts.clone(), name, access).await?;
        let out = (vol.generation(), vol.size());
        drop(vol);
        drop(session);
        Ok::<_, ClientError>(out)
    })?;
    let shown = path.display().to_string();
    let mount_err = |source| ServeError::Mount { name: name.to_string(), path: shown.clone(), source };
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let fd = kernel::mount(path, &format!("ferrovol:{name}"), read_only, root).map_err(mount_err)?;
    let session_err = |source| ServeError::Session { path: shown.clone(), source };
    let undo = |e: io::Error| {
        // Never leave a dead mount (ENOTCONN) behind.
        let _ = kernel::unmount(path);
        session_err(e)
    };
    let init = kernel::handshake(&fd, super::serve::OWN_INIT_FLAGS, super::MAX_WRITE, 128).map_err(undo)?;
    if init.flags & super::abi::FUSE_HAS_RESEND == 0 {
        // Without NOTIFY_RESEND (kernels before 6.9), requests a dead worker had taken would wait
        // forever: serve in this process, so the mount ends with it (ENOTCONN), as with fuser.
        warn!(path = %shown, "this kernel cannot resend FUSE requests: serving without a separate worker");
        return serve_here(&rt, server, opts, name, path, (access, generation), fd, threads, &init, ready);
    }
    let mut fds = vec![fd];
    for _ in 1..threads {
        fds.push(kernel::clone_fd(&fds[0]).map_err(undo)?);
    }
    let handoff = Handoff {
        role: Role::Worker,
        fds: Vec::new(),
        link: -1,
        session: session_id,
        generation,
        init,
        resend: false,
        version: HANDOFF_VERSION,
        peer: std::process::id(),
        size,
        since_unix_ms: 0,
        connections: opts_connections,
    };
    info!(volume = %name, path = %shown, size, read_only, minor = init.minor, "mounted (own FUSE session)");
    let serving = Serving::started(path, name.as_str(), server, read_only);
    let handoff = Handoff { since_unix_ms: serving.since_unix_ms, ..handoff };
    hold(&rt, serving, fds, handoff, None, Some(Box::new(ready)))
}

/// Serves the mount in this process (no worker, no continuity): where the kernel cannot resend.
#[allow(clippy::too_many_arguments)]
fn serve_here(
    rt: &tokio::runtime::Runtime,
    server: &str,
    opts: ConnectOptions,
    name: &VolumeName,
    path: &Path,
    (access, generation): (Access, u64),
    fd: OwnedFd,
    threads: usize,
    init: &InitOut,
    ready: impl FnOnce(u64),
) -> Result<(), ServeError> {
    let shown = path.display().to_string();
    // Under the attachment taken (or checked) a moment ago: no second takeover.
    let at = if access.read_only() { Access::ReadOnly } else { Access::WriterAt { generation } };
    let undo = |e: io::Error| {
        let _ = kernel::unmount(path);
        ServeError::Session { path: shown.clone(), source: e }
    };
    let opened = rt.block_on(open(server, opts, name, at));
    let (session, vol) = opened.map_err(|e| {
        let _ = kernel::unmount(path);
        ServeError::Client(e)
    })?;
    let mut fds = vec![fd];
    for _ in 1..threads {
        fds.push(kernel::clone_fd(&fds[0]).map_err(undo)?);
    }
    let record =
        crate::host::record_serving(Serving::started(path, name.as_str(), server, access.read_only()))
            .map_err(undo)?;
    let target = path.to_owned();
    super::serve::unmount_on_signal(rt, &shown, move || kernel::unmount(&target));
    ready(vol.size());
    let handler = Arc::new(OwnBlockFile::new(vol, rt.handle().clone(), access.read_only()));
    kernel::run(fds, init, handler, false, &Arc::default()).map_err(undo)?;
    log_over(path, &shown);
    if let Access::Writer { .. } = access {
        rt.block_on(session.release_writer(name, generation))?;
    }
    drop(record);
    Ok(())
}

/// Holds the mount (see [`hold_mount`]) under its holder lock (see `host::lock_mount`): a second
/// holder of the same connection waits as a standby, except the first, which fails (and unmounts).
fn hold(
    rt: &tokio::runtime::Runtime,
    serving: Serving,
    fds: Vec<OwnedFd>,
    handoff: Handoff,
    adopted: Option<(u32, UnixStream)>,
    ready: Option<Box<dyn FnOnce(u64) + '_>>,
) -> Result<(), ServeError> {
    let path = serving.path.clone();
    let shown = path.display().to_string();
    let lock = match crate::host::lock_mount(&path, "holder", handoff.session, ready.is_none()) {
        Ok(l) => Some(l),
        Err(e) if ready.is_some() => {
            let _ = kernel::unmount(&path);
            return Err(ServeError::Session { path: shown, source: e });
        }
        Err(e) => {
            warn!(path = %shown, error = %e, "cannot take the holder lock; holding the mount without it");
            None
        }
    };
    let probe = fds[0].try_clone().ok();
    let over = |probe: &Option<OwnedFd>| probe.as_ref().is_some_and(|fd| !connection_alive(fd));
    let result = if over(&probe) {
        // Unmounted while this one waited as a standby.
        log_over(&path, &shown);
        Ok(())
    } else {
        hold_mount(rt, serving, fds, handoff, adopted, ready)
    };
    if let Some(lock) = lock {
        if over(&probe) {
            lock.remove();
        }
    }
    result
}

/// The holder's loop: keeps a worker serving `fds` while the mount lives. `adopted`: the worker
/// that is already running (our parent, for a holder started by a worker whose holder died), with
/// our end of its link. `ready` runs once the first worker reports the mount usable; until then,
/// every failure unmounts (nothing half-made stays). After that, nothing makes the holder give up
/// while the connection lives: it is what keeps the mount alive.
fn hold_mount(
    rt: &tokio::runtime::Runtime,
    serving: Serving,
    fds: Vec<OwnedFd>,
    mut handoff: Handoff,
    adopted: Option<(u32, UnixStream)>,
    mut ready: Option<Box<dyn FnOnce(u64) + '_>>,
) -> Result<(), ServeError> {
    let path = &serving.path.clone();
    let volume = serving.volume.clone();
    let shown = path.display().to_string();
    let failed = |e: io::Error| {
        let _ = kernel::unmount(path);
        ServeError::Session { path: shown.clone(), source: e }
    };
    // Removed when this returns; `ferrovol detach` waits for that.
    let mut record = match crate::host::record_serving(serving) {
        Ok(r) => Some(r),
        Err(e) if ready.is_some() => return Err(failed(e)),
        Err(e) => {
            warn!(path = %shown, error = %e, "cannot write the serving record; holding the mount without it");
            None
        }
    };
    let mut note = |change: &dyn Fn(&mut Serving)| {
        if let Some(r) = record.as_mut() {
            if let Err(e) = r.update(change) {
                warn!(path = %shown, error = %e, "cannot update the serving record");
            }
        }
    };
    let target = path.to_owned();
    super::serve::unmount_on_signal(rt, &shown, move || kernel::unmount(&target));
    deposit(Role::Holder, path, &volume, &handoff, &fds);
    if let Some((pid, link)) = adopted {
        info!(path = %shown, worker = pid, "holding the mount again (the previous holder died)");
        wait_eof(&link);
        drop(link);
        if !connection_alive(&fds[0]) {
            log_over(path, &shown);
            return Ok(());
        }
        warn!(path = %shown, worker = pid, "the FUSE worker died; starting a new one (its requests are resent)");
        handoff.resend = true;
        note(&|s| s.restarts += 1);
    }
    let mut pause = RESTART_PAUSE_MIN;
    let mut quick_deaths = 0u32;
    let mut deaths = std::collections::VecDeque::new();
    loop {
        handoff.role = Role::Worker;
        handoff.peer = std::process::id();
        let spawned = UnixStream::pair().and_then(|(ours, theirs)| {
            let theirs = OwnedFd::from(theirs);
            spawn(&handoff, &fds, &theirs).map(|child| (ours, child))
        });
        let (ours, mut child) = match spawned {
            Ok(c) => c,
            Err(e) if ready.is_some() => return Err(failed(e)),
            // Later on, the mount must keep a worker: keep trying (its requests wait meanwhile).
            Err(e) => {
                warn!(path = %shown, error = %e, ?pause, "cannot start a FUSE worker; retrying");
                std::thread::sleep(pause);
                pause = (pause * 2).min(RESTART_PAUSE_MAX);
                if !connection_alive(&fds[0]) {
                    log_over(path, &shown);
                    return Ok(());
                }
                continue;
            }
        };
        let started = Instant::now();
        let pid = child.id();
        note(&|s| s.worker = Some(pid));
        // A worker is up once it has connected and opened the volume (a resumed one: and asked
        // for the resend); it says so, or closes the link by dying.
        let mut line = String::new();
        let _ = BufReader::new(&ours).read_line(&mut line);
        let mut words = line.split_whitespace();
        let up = words.next() == Some("ready");
        if let Some(n) = words.next().and_then(|n| n.parse::<usize>().ok()) {
            handoff.connections = handoff.connections.max(n);
        }
        if let Some(ready) = ready.take() {
            // The first worker: the mount is usable once it is up.
            if !up {
                let status = child.wait();
                return Err(failed(io::Error::other(match line.trim().strip_prefix("error ") {
                    Some(reason) => reason.to_owned(),
                    None => format!(
                        "the FUSE worker exited before it was ready ({})",
                        status.map_or_else(|e| e.to_string(), |s| s.to_string())
                    ),
                })));
            }
            if !connection_alive(&fds[0]) {
                // Unmounted (a signal) while the worker was starting: nothing to report as attached.
                let _ = child.wait();
                log_over(path, &shown);
                return Err(ServeError::Session {
                    path: shown.clone(),
                    source: io::Error::other("unmounted before it was attached"),
                });
            }
            info!(path = %shown, worker = pid, "attached");
            ready(handoff.size);
        } else if up {
            info!(path = %shown, worker = pid, resend = handoff.resend, "FUSE worker serving");
        }
        // Its link closes when its process is gone; then it is reaped.
        wait_eof(&ours);
        let exit = child.wait();
        let killed = exit.as_ref().is_ok_and(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.signal() == Some(libc::SIGKILL)
        });
        let status = exit.map_or_else(|e| e.to_string(), |s| s.to_string());
        drop(ours);
        if !connection_alive(&fds[0]) {
            log_over(path, &shown);
            return Ok(());
        }
        warn!(path = %shown, worker = pid, %status, "the FUSE worker died; starting a new one (its requests are resent)");
        handoff.resend = true;
        note(&|s| s.restarts += 1);
        // A worker that was up is replaced at once, unless workers keep crashing within a second
        // of their start (a request that crashes every one of them, say; SIGKILL comes from
        // outside and does not count): then, and for one that died before it was up, the next
        // waits a pause that doubles while that goes on, so a worker that cannot live does not spin.
        quick_deaths = if killed || (up && started.elapsed() >= QUICK_DEATH) { 0 } else { quick_deaths + 1 };
        // Whatever the cause (the OOM killer sends SIGKILL too), no more than a bounded rate.
        deaths.push_back(Instant::now());
        while deaths.front().is_some_and(|t| t.elapsed() > DEATHS_WINDOW) {
            deaths.pop_front();
        }
        if !up || quick_deaths > QUICK_DEATHS_FREE || deaths.len() > DEATHS_PER_WINDOW {
            warn!(path = %shown, ?pause, "FUSE workers keep dying; pausing before the next");
            std::thread::sleep(pause);
            pause = (pause * 2).min(RESTART_PAUSE_MAX);
        } else {
            pause = RESTART_PAUSE_MIN;
        }
    }
}

/// Runs this process as what its handoff says, if it has one: a worker serving the mount, or a
/// holder adopting it. `None`: no handoff, the caller starts a mount.
pub(super) fn continue_role(
    server: &str,
    opts: ConnectOptions,
    name: &VolumeName,
    path: &Path,
    access: Access,
) -> Option<Result<(), ServeError>> {
    let shown = path.display().to_string();
    let (h, fds, link) = match take_handoff() {
        Ok(None) => return None,
        Ok(Some(t)) => t,
        Err(source) => return Some(Err(ServeError::Session { path: shown, source })),
    };
    Some(match (h.role, link) {
        (Role::Worker, Some(link)) => work(server, opts, name, path, access, h, fds, link),
        (Role::Worker, None) => unreachable!("take_handoff gives every worker a link"),
        (Role::Holder, link) => runtime().and_then(|rt| {
            let peer = h.peer;
            // What the previous holder recorded (restarts, since), now with us as the holder.
            let before = crate::host::serving_of(path);
            let serving = Serving {
                worker: link.is_some().then_some(peer),
                // An orphan's worker is a restart too (its last one died with its holder).
                restarts: before.as_ref().map_or(0, |b| b.restarts) + u32::from(link.is_none()),
                since_unix_ms: before.map_or(h.since_unix_ms, |b| b.since_unix_ms),
                ..Serving::started(path, name.as_str(), server, access.read_only())
            };
            match link {
                Some(link) => hold(&rt, serving, fds, h, Some((peer, link)), None),
                None => {
                    // An orphan (see `keep`): no worker runs; the first one started resumes.
                    warn!(path = %shown, "holding an orphaned mount again (its holder and worker were gone)");
                    hold(&rt, serving, fds, Handoff { resend: true, ..h }, None, None)
                }
            }
        }),
    })
}

/// Answers every request with EIO: what a worker serves when the volume can no longer be opened
/// (taken over by another node, deleted), so the application gets errors instead of waiting.
#[derive(Debug)]
struct Unavailable;

impl Handler for Unavailable {
    fn handle(&self, req: Request, ch: &Channel) {
        match req.op {
            Op::NoReply => {}
            Op::Destroy | Op::Flush | Op::Release => ch.reply(req.header.unique, &[]),
            _ => ch.error(req.header.unique, libc::EIO),
        }
    }
}

/// Whether an open failed for good (not because the server is unreachable for now).
fn permanent(e: &ClientError) -> bool {
    use ferrovol_proto::Status;
    matches!(
        e.status(),
        Some(
            Status::NotFound
                | Status::Fenced
                | Status::AttachedElsewhere
                | Status::Forbidden
                | Status::ReadOnly
                | Status::AuthFailed
        )
    )
}

/// A handler that can be replaced while the workers run: a resumed worker that could not reach
/// the server within `io_timeout` answers EIO (as a running one would) until it can.
struct Switch(std::sync::RwLock<Arc<dyn Handler>>);

impl Handler for Switch {
    fn handle(&self, req: Request, ch: &Channel) {
        let current = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        current.handle(req, ch);
    }
}

/// The worker: connects under the mount's session, opens the volume, tells the holder it is
/// ready, and serves the connection until it is unmounted. If the holder dies, starts a new one.
#[allow(clippy::too_many_arguments)]
fn work(
    server: &str,
    mut opts: ConnectOptions,
    name: &VolumeName,
    path: &Path,
    access: Access,
    h: Handoff,
    fds: Vec<OwnedFd>,
    mut link: UnixStream,
) -> Result<(), ServeError> {
    let shown = path.display().to_string();
    let session_err = |source| ServeError::Session { path: shown.clone(), source };
    let rt = runtime()?;
    let read_only = access.read_only();
    opts.session_id = Some(h.session);
    opts.connections = opts.connections.max(h.connections);
    let opts_connections = opts.connections;
    let at = if read_only { Access::ReadOnly } else { Access::WriterAt { generation: h.generation } };
    // One worker at a time, before its HELLOs retire anyone's connections: a second one (started by
    // a second holder) waits here until the first is gone. See `host::lock_mount`.
    let lock = match crate::host::lock_mount(path, "worker", h.session, true) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(path = %shown, error = %e, "cannot take the worker lock; serving without it");
            None
        }
    };
    if !connection_alive(&fds[0]) {
        // Unmounted while this one waited for the lock.
        log_over(path, &shown);
        if let Some(l) = lock {
            l.remove();
        }
        return Ok(());
    }
    // Every connection is up (and with it every old connection of the session retired: the dead
    // worker is fenced) before the resend.
    let deadline = Instant::now() + opts.io_timeout;
    let opened = rt.block_on(async {
        let mut last = None;
        let attempts = async {
            loop {
                match open(server, opts.clone(), name, at).await {
                    Ok(ok) => return Ok(ok),
                    Err(e) if permanent(&e) => return Err(e),
                    Err(e) => {
                        warn!(error = %e, "cannot reach the server yet; retrying");
                        last = Some(e.to_string());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        };
        // The whole wait is bounded, not just the gaps between attempts (one attempt alone may
        // take a connect timeout and an I/O timeout).
        match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), attempts).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Connect {
                addr: server.to_owned(),
                reason: last.unwrap_or_else(|| "no answer within the I/O timeout".into()),
            }),
        }
    });
    // Where this worker serves from once it can (a retry that succeeds later fills it in).
    let served: Arc<std::sync::Mutex<Option<(Session, Volume)>>> = Arc::default();
    let (handler, resend): (Arc<dyn Handler>, bool) = match opened {
        Ok((session, vol)) => {
            let file = Arc::new(OwnBlockFile::new(vol.clone(), rt.handle().clone(), read_only));
            *served.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((session, vol));
            (file, h.resend)
        }
        Err(e) if !h.resend => {
            // A first start: said to the holder, which reports it and unmounts.
            let _ = writeln!(link, "error {e}");
            return Err(ServeError::Session { path: shown, source: io::Error::other(e.to_string()) });
        }
        Err(e) => {
            // Resumed, and the volume cannot be opened: answer EIO (the requests the dead worker
            // had taken too: they are resent, and nothing of theirs reaches the server), so the
            // application gets errors instead of waiting. If the server was only unreachable,
            // keep trying, and serve again once it answers.
            warn!(volume = %name, error = %e, "the volume cannot be opened; answering EIO");
            let switch = Arc::new(Switch(std::sync::RwLock::new(Arc::new(Unavailable))));
            if !permanent(&e) {
                let (switch, served, server, name) =
                    (switch.clone(), served.clone(), server.to_owned(), name.clone());
                let handle = rt.handle().clone();
                rt.spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        match open(&server, opts.clone(), &name, at).await {
                            Ok((session, vol)) => {
                                let file: Arc<dyn Handler> =
                                    Arc::new(OwnBlockFile::new(vol.clone(), handle, read_only));
                                *switch.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = file;
                                *served.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                                    Some((session, vol));
                                info!(volume = %name, "the server answers again; serving");
                                return;
                            }
                            Err(e) if permanent(&e) => {
                                warn!(volume = %name, error = %e, "the volume cannot be opened; EIO stays");
                                return;
                            }
                            Err(_) => {}
                        }
                    }
                });
            }
            (switch, true)
        }
    };
    let serving = fds.iter().map(OwnedFd::try_clone).collect::<io::Result<Vec<_>>>().map_err(session_err)?;
    let _ = writeln!(link, "ready {}", opts_connections);
    // With the connections it opened: a worker adopted from the keeper retires every one of them.
    deposit(Role::Worker, path, name.as_str(), &Handoff { connections: opts_connections, ..h.clone() }, &fds);
    let held = Arc::new(fds);
    {
        let (held, h, shown) = (held.clone(), h.clone(), shown.clone());
        std::thread::Builder::new()
            .name("ferrovol-holder-watch".into())
            .spawn(move || watch_holder(link, held, h, &shown))
            .map_err(session_err)?;
    }
    info!(volume = %name, path = %shown, resend, "serving");
    let reporter = report_stats(path, served.clone());
    kernel::run(serving, &h.init, handler, resend, &Arc::default()).map_err(session_err)?;
    log_over(path, &shown);
    reporter.stop();
    if let Some(l) = lock {
        l.remove();
    }
    let served = served.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
    if let (Some((session, vol)), Access::Writer { .. }) = (served, access) {
        // Unmounted, so nothing can write any more: release the attachment (a no-op if it was
        // taken over meanwhile).
        let generation = vol.generation();
        rt.block_on(session.release_writer(name, generation))?;
        info!(volume = %name, generation, "writer attachment released");
    }
    Ok(())
}

/// Writes the worker's session counters beside the serving record (see `host::WorkerStats`) when
/// they change, checked every second, and at least every 10 s (so a reader can tell a stale file),
/// until [`Reporter::stop`].
fn report_stats(path: &Path, served: Arc<std::sync::Mutex<Option<(Session, Volume)>>>) -> Reporter {
    // Computed once: each computation canonicalizes the path, a FUSE request to this very mount.
    let file = crate::host::worker_stats_path(path);
    let stopped = Arc::new(std::sync::Mutex::new(false));
    let reporter = Reporter { file: file.clone(), stopped: stopped.clone() };
    let spawned = std::thread::Builder::new().name("ferrovol-stats".into()).spawn(move || {
        let mut last: Option<(crate::SessionStats, Instant)> = None;
        let mut said = false;
        loop {
            let now = served.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref().map(|(s, _)| s.stats());
            let stats = now.unwrap_or_default();
            if last.is_none_or(|(l, at)| l != stats || at.elapsed() >= Duration::from_secs(10)) {
                let record = crate::host::WorkerStats {
                    worker: std::process::id(),
                    session: stats,
                    updated_unix_ms: crate::host::now_unix_ms(),
                };
                // Under the flag's lock: no write after `stop` removed the file.
                let stopped = stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if *stopped {
                    return;
                }
                match crate::host::write_worker_stats(&file, &record) {
                    Ok(()) => last = Some((stats, Instant::now())),
                    Err(e) if !said => {
                        said = true;
                        warn!(file = %file.display(), error = %e, "cannot write the worker's stats; retrying");
                    }
                    Err(_) => {}
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the stats thread");
    }
    reporter
}

/// Stops [`report_stats`].
struct Reporter {
    file: PathBuf,
    stopped: Arc<std::sync::Mutex<bool>>,
}

impl Reporter {
    /// No more writes; the file is removed.
    fn stop(self) {
        *self.stopped.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = true;
        let _ = std::fs::remove_file(&self.file);
    }
}

/// The worker's watch on its holder: when the link reports the holder dead and the mount still
/// lives, starts a new holder, hands it the fds, and watches that one. A holder that dies within
/// [`QUICK_DEATH`] of its start is replaced after a pause that doubles while that goes on.
fn watch_holder(mut link: UnixStream, held: Arc<Vec<OwnedFd>>, mut h: Handoff, shown: &str) {
    let mut child: Option<(std::process::Child, Instant)> = None;
    let mut pause = RESTART_PAUSE_MIN;
    loop {
        wait_eof(&link);
        if let Some((mut c, started)) = child.take() {
            let _ = c.wait();
            if started.elapsed() < QUICK_DEATH {
                std::thread::sleep(pause);
                pause = (pause * 2).min(RESTART_PAUSE_MAX);
            } else {
                pause = RESTART_PAUSE_MIN;
            }
        }
        if !connection_alive(&held[0]) {
            return;
        }
        warn!(path = %shown, "the holder of the mount died; starting a new one");
        loop {
            match UnixStream::pair().and_then(|(ours, theirs)| {
                let theirs = OwnedFd::from(theirs);
                h.role = Role::Holder;
                h.peer = std::process::id();
                spawn_unforked(&h, &held, &theirs).map(|c| (ours, c))
            }) {
                Ok((ours, c)) => {
                    info!(path = %shown, holder = c.id(), "new holder started");
                    link = ours;
                    child = Some((c, Instant::now()));
                    break;
                }
                Err(e) => {
                    warn!(path = %shown, error = %e, "cannot start a new holder; retrying in 1 s");
                    std::thread::sleep(Duration::from_secs(1));
                    if !connection_alive(&held[0]) {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handoff written by the first build of this code (no `version`, no `connections`) is read
    /// by this one: a restart after an upgrade must not strand the mount.
    #[test]
    fn an_older_handoff_is_read() {
        let old = r#"{"role":"worker","fds":[5,6],"link":7,"session":99,"generation":3,
            "init":{"major":7,"minor":45,"max_readahead":131072,"flags":0,"max_background":128,
            "congestion_threshold":96,"max_write":1048576,"max_pages":256},
            "resend":true,"peer":42,"size":1048576,"since_unix_ms":1}"#;
        let h: Handoff = serde_json::from_str(old).unwrap();
        assert_eq!((h.version, h.connections, h.session, h.fds.len()), (0, 0, 99, 2));
        let newer = serde_json::to_string(&Handoff { version: HANDOFF_VERSION + 1, ..h }).unwrap();
        assert!(serde_json::from_str::<Handoff>(&newer).unwrap().version > HANDOFF_VERSION);
    }
}
