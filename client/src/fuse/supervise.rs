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
use super::kernel::{self, Channel, Handler};
use super::serve::{Access, ServeError};
use super::OwnBlockFile;
use crate::host::Serving;
use crate::{ClientError, ConnectOptions, Session, Volume};

/// The environment variable that carries a [`Handoff`] to a process started as a holder or worker.
pub const HANDOFF_ENV: &str = "FERROVOL_FUSE_HANDOFF";

/// A worker that dies before it is up is restarted after a pause, doubling from the first to the
/// last while that goes on.
const RESTART_PAUSE_MIN: Duration = Duration::from_millis(100);
const RESTART_PAUSE_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Role {
    Worker,
    Holder,
}

/// What a holder or worker is handed when it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Handoff {
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
}

/// Whether this process was started as the holder or worker of a mount that already exists: the
/// command line's own checks ("already a mount point") and `--background` do not apply to it.
pub fn continuing() -> bool {
    std::env::var_os(HANDOFF_ENV).is_some()
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The handoff this process was started with, and the fds it names, taken over (once).
fn take_handoff() -> io::Result<Option<(Handoff, Vec<OwnedFd>, UnixStream)>> {
    let Some(raw) = std::env::var_os(HANDOFF_ENV) else { return Ok(None) };
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Err(io::Error::other("the FUSE handoff was already taken"));
    }
    let h: Handoff = serde_json::from_str(&raw.to_string_lossy())
        .map_err(|e| io::Error::other(format!("malformed {HANDOFF_ENV}: {e}")))?;
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
    let link = UnixStream::from(own(h.link)?);
    if fds.is_empty() {
        return Err(io::Error::other(format!("{HANDOFF_ENV} names no /dev/fuse fd")));
    }
    Ok(Some((h, fds, link)))
}

/// This binary, by path (after an upgrade replaced it on disk, the new one).
fn exe() -> io::Result<PathBuf> {
    let p = std::env::current_exe()?;
    let s = p.as_os_str().to_string_lossy();
    Ok(match s.strip_suffix(" (deleted)") {
        Some(orig) => PathBuf::from(orig),
        None => p,
    })
}

/// Starts this command line again as `h.role`, handing it `fds` and `link` (its end of the link).
fn spawn(h: &Handoff, fds: &[OwnedFd], link: &OwnedFd) -> io::Result<std::process::Child> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).chain([link.as_raw_fd()]).collect();
    let handoff = Handoff { fds: raw[..raw.len() - 1].to_vec(), link: link.as_raw_fd(), ..h.clone() };
    let mut cmd = Command::new(exe()?);
    cmd.args(std::env::args_os().skip(1))
        .env(HANDOFF_ENV, serde_json::to_string(&handoff).map_err(io::Error::other)?)
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

/// Whether the FUSE connection of `fd` is still alive (not unmounted, not aborted): the kernel
/// reports POLLERR on its fds once it is over.
pub fn connection_alive(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd on our stack, zero timeout.
    let rc = unsafe { libc::poll(&mut p, 1, 0) };
    rc >= 0 && p.revents & (libc::POLLERR | libc::POLLNVAL) == 0
}

/// Waits for process `pid` (not our child) to exit, through a pidfd.
fn wait_exit(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(raw) = RawFd::try_from(raw) else { return };
    if raw < 0 {
        return; // ESRCH: already gone.
    }
    // SAFETY: a fresh fd returned to us.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd on our stack; a pidfd becomes readable when the process exits.
    while unsafe { libc::poll(&mut p, 1, -1) } < 0 {}
}

fn runtime() -> Result<tokio::runtime::Runtime, ServeError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ferrovol-io")
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)
}

/// Connects and opens `name` as the mount's workers do, and returns the volume and the writer
/// generation it is open under.
async fn open(
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
    // Open it here first, so every refusal (unknown volume, attached elsewhere) comes before the
    // mount, in this process's own words. The worker opens it again under the same session.
    let (generation, size) = rt.block_on(async {
        let (session, vol) = open(server, opts, name, access).await?;
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
        peer: std::process::id(),
        size,
        since_unix_ms: now_unix_ms(),
    };
    info!(volume = %name, path = %shown, size, read_only, minor = init.minor, "mounted (own FUSE session)");
    let serving = Serving {
        path: path.to_owned(),
        volume: name.to_string(),
        server: server.to_owned(),
        read_only,
        holder: std::process::id(),
        worker: None,
        restarts: 0,
        since_unix_ms: handoff.since_unix_ms,
    };
    hold(&rt, serving, fds, handoff, None, Some(Box::new(ready)))
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The holder's loop: keeps a worker serving `fds` while the mount lives. `adopted`: the worker
/// that is already running (our parent, for a holder started by a worker whose holder died), with
/// our end of its link. `ready` runs once the first worker reports the mount usable.
fn hold(
    rt: &tokio::runtime::Runtime,
    serving: Serving,
    fds: Vec<OwnedFd>,
    mut handoff: Handoff,
    adopted: Option<(u32, UnixStream)>,
    mut ready: Option<Box<dyn FnOnce(u64) + '_>>,
) -> Result<(), ServeError> {
    let path = &serving.path.clone();
    let shown = path.display().to_string();
    let session_err = |source| ServeError::Session { path: shown.clone(), source };
    // Removed when this returns; `ferrovol detach` waits for that.
    let mut record = crate::host::record_serving(serving).map_err(session_err)?;
    let target = path.to_owned();
    super::serve::unmount_on_signal(rt, &shown, move || kernel::unmount(&target));
    if let Some((pid, link)) = adopted {
        info!(path = %shown, worker = pid, "holding the mount again (the previous holder died)");
        wait_exit(pid);
        drop(link);
        if !connection_alive(&fds[0]) {
            info!(path = %shown, "unmounted");
            return Ok(());
        }
        warn!(path = %shown, worker = pid, "the FUSE worker died; starting a new one (its requests are resent)");
        handoff.resend = true;
        let _ = record.update(|s| s.restarts += 1);
    }
    let mut pause = RESTART_PAUSE_MIN;
    loop {
        let (ours, theirs) = UnixStream::pair().map_err(session_err)?;
        let theirs = OwnedFd::from(theirs);
        handoff.role = Role::Worker;
        handoff.peer = std::process::id();
        let mut child = spawn(&handoff, &fds, &theirs).map_err(|e| {
            if ready.is_some() {
                let _ = kernel::unmount(path);
            }
            session_err(e)
        })?;
        drop(theirs);
        let pid = child.id();
        if let Err(e) = record.update(|s| s.worker = Some(pid)) {
            warn!(path = %shown, error = %e, "cannot update the serving record");
        }
        // A worker is up once it has connected and opened the volume (a resumed one: and asked
        // for the resend); it says so, or closes the link by dying.
        let mut line = String::new();
        let _ = BufReader::new(&ours).read_line(&mut line);
        let up = line.trim() == "ready";
        if let Some(ready) = ready.take() {
            // The first worker: the mount is usable once it is up.
            if !up {
                let status = child.wait().map_err(session_err)?;
                let _ = kernel::unmount(path);
                return Err(session_err(io::Error::other(match line.trim().strip_prefix("error ") {
                    Some(reason) => reason.to_owned(),
                    None => format!("the FUSE worker exited before it was ready ({status})"),
                })));
            }
            info!(path = %shown, worker = pid, "attached");
            ready(handoff.size);
        } else if up {
            info!(path = %shown, worker = pid, resend = handoff.resend, "FUSE worker serving");
        }
        let status = child.wait().map_err(session_err)?;
        drop(ours);
        if !connection_alive(&fds[0]) {
            if !status.success() {
                warn!(path = %shown, %status, "the FUSE worker died after the unmount");
            }
            info!(path = %shown, "unmounted");
            return Ok(());
        }
        warn!(path = %shown, worker = pid, %status, "the FUSE worker died; starting a new one (its requests are resent)");
        handoff.resend = true;
        let _ = record.update(|s| s.restarts += 1);
        // A worker that was up is replaced at once. One that died before it was up (the server
        // unreachable past its retries, say) is retried after a pause that grows while that
        // goes on, so a worker that cannot start does not spin.
        if up {
            pause = RESTART_PAUSE_MIN;
        } else {
            warn!(path = %shown, ?pause, "the FUSE worker died before it was up; pausing before the next");
            std::thread::sleep(pause);
            pause = (pause * 2).min(RESTART_PAUSE_MAX);
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
    Some(match h.role {
        Role::Worker => work(server, opts, name, path, access, h, fds, link),
        Role::Holder => runtime().and_then(|rt| {
            let peer = h.peer;
            // What the previous holder recorded (restarts, since), now with us as the holder.
            let before = crate::host::serving_of(path);
            let serving = Serving {
                path: path.to_owned(),
                volume: name.to_string(),
                server: server.to_owned(),
                read_only: access.read_only(),
                holder: std::process::id(),
                worker: Some(peer),
                restarts: before.as_ref().map_or(0, |b| b.restarts),
                since_unix_ms: before.map_or(h.since_unix_ms, |b| b.since_unix_ms),
            };
            hold(&rt, serving, fds, h, Some((peer, link)), None)
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
        )
    )
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
    let retry_for = opts.io_timeout;
    let at = if read_only { Access::ReadOnly } else { Access::WriterAt { generation: h.generation } };
    // Every connection is up (and every old one of the session retired) before the resend.
    let deadline = Instant::now() + retry_for;
    let opened = rt.block_on(async {
        loop {
            match open(server, opts.clone(), name, at).await {
                Ok(ok) => return Ok(ok),
                Err(e) if permanent(&e) || Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    warn!(error = %e, "cannot reach the server yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let handler: Arc<dyn Handler> = match &opened {
        Ok((_, vol)) => Arc::new(OwnBlockFile::new(vol.clone(), rt.handle().clone(), read_only)),
        Err(e) if h.resend && permanent(e) => {
            warn!(volume = %name, error = %e, "the volume cannot be opened any more; answering EIO");
            Arc::new(Unavailable)
        }
        Err(e) => {
            // Said to the holder, which reports it (a first start) or starts another worker.
            let _ = writeln!(link, "error {e}");
            return Err(ServeError::Session { path: shown, source: io::Error::other(e.to_string()) });
        }
    };
    let serving = fds.iter().map(OwnedFd::try_clone).collect::<io::Result<Vec<_>>>().map_err(session_err)?;
    let _ = link.write_all(b"ready\n");
    let held = Arc::new(fds);
    {
        let (held, h, shown) = (held.clone(), h.clone(), shown.clone());
        std::thread::Builder::new()
            .name("ferrovol-holder-watch".into())
            .spawn(move || watch_holder(link, held, h, &shown))
            .map_err(session_err)?;
    }
    info!(volume = %name, path = %shown, resend = h.resend, "serving");
    kernel::run(serving, &h.init, handler, h.resend, &Arc::default()).map_err(session_err)?;
    info!(path = %shown, "unmounted");
    if let (Ok((session, vol)), Access::Writer { .. }) = (&opened, access) {
        // Unmounted, so nothing can write any more: release the attachment (a no-op if it was
        // taken over meanwhile).
        let generation = vol.generation();
        rt.block_on(session.release_writer(name, generation))?;
        info!(volume = %name, generation, "writer attachment released");
    }
    Ok(())
}

/// The worker's watch on its holder: when the link reports the holder dead and the mount still
/// lives, starts a new holder, hands it the fds, and watches that one.
fn watch_holder(mut link: UnixStream, held: Arc<Vec<OwnedFd>>, mut h: Handoff, shown: &str) {
    let mut child: Option<std::process::Child> = None;
    loop {
        let mut b = [0u8; 16];
        loop {
            match link.read(&mut b) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if let Some(mut c) = child.take() {
            let _ = c.wait();
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
                spawn(&h, &held, &theirs).map(|c| (ours, c))
            }) {
                Ok((ours, c)) => {
                    info!(path = %shown, holder = c.id(), "new holder started");
                    link = ours;
                    child = Some(c);
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
