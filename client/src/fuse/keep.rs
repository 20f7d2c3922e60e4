//! The keeper: a third holder of every mount's /dev/fuse fds, in another failure domain than the
//! holder and worker (see [`super::supervise`]), so that a mount survives the death of both at once.
//!
//! In Kubernetes the holder and the worker of every mount run in the attach daemon's container
//! (`ferrovol attachd`): a crash, OOM kill or rollout of that container kills them all together.
//! The CSI node plugin, in another pod, runs the keeper. Every holder and worker *deposits* its
//! mount with the keeper: it sends the fds (SCM_RIGHTS over a unix socket) with what is needed to
//! start a holder again (its command line, environment, log and handoff), and keeps that
//! connection open. The keeper learns that all of a mount's processes are gone when the last of
//! their connections closes; the mount is then an *orphan*: its connection lives (the keeper holds
//! fds) and its requests wait in the kernel. An attach daemon that starts *claims* orphans and
//! starts a holder for each, which starts a worker that resumes the connection and asks for the
//! resend. When the keeper dies instead, every holder and worker deposits again with the next one.
//!
//! Processes find the keeper through [`KEEPER_ENV`] (inherited by every holder and worker).
//!
//! **Messages.** Each is a 4-byte little-endian length and that much JSON, sent with one
//! `sendmsg`, the fds (if any) as its ancillary data. The two sides take turns (request, reply),
//! so fds never arrive with bytes of another message.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::supervise::connection_alive;

/// The environment variable naming the keeper's socket; unset: no keeper.
pub const KEEPER_ENV: &str = "FERROVOL_KEEPER";
/// The largest message (its JSON) either side accepts.
const MAX_MESSAGE: usize = 1 << 20;
/// The most fds one message carries (a mount has one per FUSE thread).
pub const MAX_FDS: usize = 64;
/// How long a claimed orphan is not handed out again: the claimer's holder deposits within it.
const CLAIM_HOLD: Duration = Duration::from_secs(15);
/// How often depositors try again to reach a keeper that is gone.
const REDEPOSIT_EVERY: Duration = Duration::from_secs(1);
/// How long either side waits for the other's message (the first one of a connection, a reply).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the keeper holds an orphan that no attach daemon adopts, by default: then it closes
/// the fds, and the mount fails (ENOTCONN) instead of making its applications wait for ever.
pub const DEFAULT_ORPHAN_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// What a holder or worker deposits: enough to start a holder for the mount again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Spec {
    /// The mounted file (canonical).
    pub path: PathBuf,
    pub volume: String,
    /// "holder" or "worker": who deposited it.
    pub role: String,
    pub pid: u32,
    /// The binary (absolute) and its arguments, as the depositor runs them.
    pub exe: PathBuf,
    pub args: Vec<String>,
    pub cwd: PathBuf,
    /// The depositor's environment (without its handoff).
    pub env: Vec<(String, String)>,
    /// The depositor's log file (its stderr, when that is a file): the new holder appends to it.
    pub log: Option<PathBuf>,
    /// The mount's handoff (see [`super::supervise`]), with the fds renumbered on the way.
    pub handoff: serde_json::Value,
}

/// What the keeper holds for one mount, as `list` reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Kept {
    pub path: PathBuf,
    pub volume: String,
    /// Live processes that deposited it (0: an orphan).
    pub depositors: usize,
    /// Milliseconds since its last depositor left, for an orphan.
    pub orphan_ms: Option<u64>,
    pub fds: usize,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    /// With the fds; the connection then stays open for as long as the depositor lives.
    Deposit {
        spec: Box<Spec>,
    },
    /// One orphan deposited by `program` (the file name of the claimer's binary: it adopts
    /// only its own program's mounts), if there is one.
    Claim {
        program: String,
    },
    List,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
enum Reply {
    Kept,
    /// With the fds.
    Orphan {
        spec: Box<Spec>,
    },
    NoOrphan,
    List {
        mounts: Vec<Kept>,
    },
    Error {
        message: String,
    },
}

/// Sends one message with `fds` as its ancillary data.
fn send(stream: &UnixStream, msg: &impl Serialize, fds: &[RawFd]) -> io::Result<()> {
    let json = serde_json::to_vec(msg).map_err(io::Error::other)?;
    if json.len() > MAX_MESSAGE {
        return Err(io::Error::other(format!(
            "keeper message of {} bytes (the limit is {MAX_MESSAGE})",
            json.len()
        )));
    }
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "{} fds in one keeper message (the limit is {MAX_FDS})",
            fds.len()
        )));
    }
    let mut data = Vec::with_capacity(4 + json.len());
    data.extend_from_slice(&u32::try_from(json.len()).unwrap_or(u32::MAX).to_le_bytes());
    data.extend_from_slice(&json);
    // Control buffer: one SCM_RIGHTS cmsg, aligned for cmsghdr.
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(u32::try_from(fd_bytes).unwrap_or(0)) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut sent = 0;
    while sent < data.len() {
        let mut iov =
            libc::iovec { iov_base: data[sent..].as_ptr() as *mut libc::c_void, iov_len: data.len() - sent };
        // SAFETY: an all-zero msghdr is valid (no name, no iov, no control).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points to `space` bytes, enough for one cmsg of `fd_bytes`
            // (CMSG_SPACE); CMSG_FIRSTHDR is then non-null and CMSG_DATA has room for the fds.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(u32::try_from(fd_bytes).unwrap_or(0)) as _;
                std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
            }
        }
        // SAFETY: msg points to valid buffers that outlive the call; MSG_NOSIGNAL: a closed peer is
        // EPIPE, not SIGPIPE.
        let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Receives one message and the fds that came with it; `None` at EOF before a message.
fn recv<T: DeserializeOwned>(stream: &UnixStream) -> io::Result<Option<(T, Vec<OwnedFd>)>> {
    let mut len = [0u8; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space =
        unsafe { libc::CMSG_SPACE(u32::try_from(MAX_FDS * std::mem::size_of::<RawFd>()).unwrap_or(0)) }
            as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut fds = Vec::new();
    let n = loop {
        let mut iov = libc::iovec { iov_base: len.as_mut_ptr().cast(), iov_len: len.len() };
        // SAFETY: an all-zero msghdr is valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the buffers outlive the call; MSG_CMSG_CLOEXEC: received fds are close-on-exec.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: the kernel filled msg_control with msg_controllen bytes of cmsgs; each SCM_RIGHTS
        // cmsg carries (cmsg_len - CMSG_LEN(0)) / sizeof(int) fds that are now ours alone.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(c);
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other(format!(
                "fds of a keeper message were lost: more than {MAX_FDS}, or this process has no fd left"
            )));
        }
        break n as usize;
    };
    if n == 0 {
        return Ok(None);
    }
    let mut r = stream;
    r.read_exact(&mut len[n..])?;
    let size = u32::from_le_bytes(len) as usize;
    if size > MAX_MESSAGE {
        return Err(io::Error::other(format!("keeper message of {size} bytes (the limit is {MAX_MESSAGE})")));
    }
    let mut json = vec![0u8; size];
    r.read_exact(&mut json)?;
    let msg = serde_json::from_slice(&json)
        .map_err(|e| io::Error::other(format!("malformed keeper message: {e}")))?;
    Ok(Some((msg, fds)))
}

struct Entry {
    /// Which entry (a depositor counts down only the entry it counted up).
    id: u64,
    spec: Spec,
    fds: Vec<OwnedFd>,
    depositors: usize,
    orphan_since: Option<Instant>,
    claimed_until: Option<Instant>,
    warned: bool,
}

/// A mount: its path and its client session id (random per mount, in every handoff), so that a
/// new mount at the path of a lazily unmounted one is another.
type Key = (PathBuf, u64);
type Table = Arc<Mutex<HashMap<Key, Entry>>>;

static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Serves the keeper on `listener` until the process ends (one thread per connection: two per
/// mount, few; each must send its first message within [`MESSAGE_TIMEOUT`]). Entries whose FUSE
/// connection is over (unmounted) are dropped within a second, and orphans that no attach daemon
/// adopts within `orphan_timeout` too (their mount then fails with ENOTCONN).
pub fn serve(bound: Bound, orphan_timeout: Duration) -> io::Result<()> {
    let table: Table = Arc::default();
    {
        let table = table.clone();
        std::thread::Builder::new().name("ferrovol-keeper-sweep".into()).spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            sweep(&table, orphan_timeout);
        })?;
    }
    for conn in bound.listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "keeper: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let table = table.clone();
        let spawned = std::thread::Builder::new().name("ferrovol-keeper".into()).spawn(move || {
            if let Err(e) = connection(&conn, &table) {
                warn!(error = %e, "keeper: connection failed");
            }
        });
        if let Err(e) = spawned {
            // Out of threads: this connection is dropped (its depositor tries again), the keeper goes on.
            warn!(error = %e, "keeper: cannot start a thread for a connection");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

fn lock(table: &Table) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

fn sweep(table: &Table, orphan_timeout: Duration) {
    let mut t = lock(table);
    t.retain(|(path, _), e| {
        if !connection_alive(&e.fds[0]) {
            info!(path = %path.display(), "keeper: the mount is gone; its fds are closed");
            return false;
        }
        if let Some(since) = e.orphan_since {
            if since.elapsed() > orphan_timeout {
                warn!(path = %path.display(), volume = %e.spec.volume, ?orphan_timeout,
                    "keeper: no attach daemon adopted this mount in time; closing its fds (its I/O fails with ENOTCONN)");
                return false;
            }
            if !e.warned && since.elapsed() > Duration::from_secs(30) {
                e.warned = true;
                warn!(path = %path.display(), volume = %e.spec.volume,
                    "keeper: this mount has had no process for 30 s (no attach daemon adopted it yet); its requests wait");
            }
        }
        true
    });
}

/// Whether `fd` is /dev/fuse (character device 10:229): what the keeper accepts.
fn is_fuse_device(fd: &OwnedFd) -> bool {
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat fills the stat buffer on our stack for an fd we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && libc::major(st.st_rdev) == 10
        && libc::minor(st.st_rdev) == 229
}

/// Counts a depositor down when its connection ends, however it ends.
struct Depositor<'a> {
    table: &'a Table,
    key: Key,
    id: u64,
}

impl Drop for Depositor<'_> {
    fn drop(&mut self) {
        let mut t = lock(self.table);
        let Some(e) = t.get_mut(&self.key).filter(|e| e.id == self.id) else { return };
        e.depositors = e.depositors.saturating_sub(1);
        if e.depositors > 0 {
            return;
        }
        if connection_alive(&e.fds[0]) {
            warn!(path = %self.key.0.display(), volume = %e.spec.volume,
                "keeper: every process of the mount is gone; holding it for an attach daemon to adopt");
            e.orphan_since = Some(Instant::now());
        } else {
            t.remove(&self.key);
        }
    }
}

fn connection(conn: &UnixStream, table: &Table) -> io::Result<()> {
    conn.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
    while let Some((req, fds)) = recv::<Request>(conn)? {
        match req {
            Request::Deposit { spec } => {
                let spec = *spec;
                if fds.is_empty() || !fds.iter().all(is_fuse_device) || !connection_alive(&fds[0]) {
                    send(conn, &Reply::Error { message: "no live /dev/fuse fd deposited".into() }, &[])?;
                    continue;
                }
                let key = (spec.path.clone(), session_of(&spec));
                let id = {
                    let mut t = lock(table);
                    match t.get_mut(&key) {
                        // The same mount: one more live depositor (the fds kept are as good).
                        Some(e) if connection_alive(&e.fds[0]) => {
                            e.depositors += 1;
                            e.orphan_since = None;
                            e.claimed_until = None;
                            e.warned = false;
                            let most = connections(&e.spec).max(connections(&spec));
                            if spec.role == "holder" || e.spec.role != "holder" {
                                e.spec = spec;
                            }
                            // The most connections any worker opened: an adopted worker retires them all.
                            if let Some(h) = e.spec.handoff.as_object_mut() {
                                h.insert("connections".into(), most.into());
                            }
                            e.id
                        }
                        _ => {
                            info!(path = %key.0.display(), volume = %spec.volume, fds = fds.len(), "keeper: holding");
                            let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let entry = Entry {
                                id,
                                spec,
                                fds,
                                depositors: 1,
                                orphan_since: None,
                                claimed_until: None,
                                warned: false,
                            };
                            t.insert(key.clone(), entry);
                            id
                        }
                    }
                };
                // Counted down when this ends, whatever happens from here on.
                let _depositor = Depositor { table, key, id };
                send(conn, &Reply::Kept, &[])?;
                // The depositor keeps the connection until it dies: wait for that.
                conn.set_read_timeout(None)?;
                let mut b = [0u8; 64];
                let mut r = conn;
                while !matches!(r.read(&mut b), Ok(0) | Err(_)) {}
                return Ok(());
            }
            Request::Claim { program } => claim_one(conn, table, &program)?,
            Request::List => {
                let mut mounts: Vec<Kept> = lock(table)
                    .values()
                    .map(|e| Kept {
                        path: e.spec.path.clone(),
                        volume: e.spec.volume.clone(),
                        depositors: e.depositors,
                        orphan_ms: e
                            .orphan_since
                            .map(|s| u64::try_from(s.elapsed().as_millis()).unwrap_or(u64::MAX)),
                        fds: e.fds.len(),
                    })
                    .collect();
                mounts.sort_by(|a, b| a.path.cmp(&b.path));
                send(conn, &Reply::List { mounts }, &[])?;
            }
        }
    }
    Ok(())
}

fn session_of(spec: &Spec) -> u64 {
    spec.handoff.get("session").and_then(serde_json::Value::as_u64).unwrap_or(0)
}

/// The file name of a binary (a running one's may end in " (deleted)").
pub fn program_name(exe: &Path) -> String {
    let name = exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name.trim_end_matches(" (deleted)").to_owned()
}

fn connections(spec: &Spec) -> u64 {
    spec.handoff.get("connections").and_then(serde_json::Value::as_u64).unwrap_or(0)
}

/// Hands one orphan (a copy of its fds) to the claimer; it is not handed out again for
/// [`CLAIM_HOLD`] once the claimer has it.
fn claim_one(conn: &UnixStream, table: &Table, program: &str) -> io::Result<()> {
    let found = {
        let mut t = lock(table);
        let now = Instant::now();
        t.iter_mut()
            .find(|(_, e)| {
                e.depositors == 0
                    && e.orphan_since.is_some()
                    && e.claimed_until.is_none_or(|u| u <= now)
                    && program_name(&e.spec.exe) == program
                    && connection_alive(&e.fds[0])
            })
            .map(|(k, e)| {
                // Not handed to a second claimer meanwhile; released again if this one fails.
                e.claimed_until = Some(now + CLAIM_HOLD);
                (k.clone(), e.id, e.spec.clone(), e.fds.iter().map(OwnedFd::try_clone).collect())
            })
    };
    let Some((key, id, spec, dup)) = found else { return send(conn, &Reply::NoOrphan, &[]) };
    let release = || {
        if let Some(e) = lock(table).get_mut(&key).filter(|e| e.id == id) {
            e.claimed_until = None;
        }
    };
    let fds: Vec<OwnedFd> = match dup {
        Ok(f) => f,
        Err(e) => {
            release();
            return send(conn, &Reply::Error { message: format!("cannot copy the orphan's fds: {e}") }, &[]);
        }
    };
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    if let Err(e) = send(conn, &Reply::Orphan { spec: Box::new(spec) }, &raw) {
        release();
        return Err(e);
    }
    info!(path = %key.0.display(), "keeper: orphan handed to an attach daemon");
    Ok(())
}

/// A bound, owner-only socket, and the lock that makes it ours (see [`bind_socket`]).
#[derive(Debug)]
pub struct Bound {
    pub listener: UnixListener,
    /// `flock`ed for the life of the process: one server per socket path.
    _lock: std::fs::File,
}

/// Binds the keeper's (or attach daemon's) socket at `path`, owner-only from the start (bound
/// under a temporary name, then renamed into place). One process per path: a lock file beside it
/// (`PATH.lock`, `flock`ed for the process's life) refuses a second one; a socket file left by a
/// dead one is replaced.
pub fn bind_socket(path: &Path, what: &str) -> io::Result<Bound> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another {what} is serving {} (it holds {})", path.display(), lock_path.display()),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    // Bound in a directory only the owner can enter, made owner-only there, then moved into place:
    // no one else can connect in between.
    let dir = PathBuf::from(format!("{}.{}.d", path.display(), std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let tmp = dir.join("s");
    let bound = UnixListener::bind(&tmp).and_then(|listener| {
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Bound { listener: bound?, _lock: lock })
}

/// An I/O error with what timed out said in words (a read timeout is EAGAIN otherwise).
fn worded(e: io::Error, what: &str) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            io::Error::new(io::ErrorKind::TimedOut, format!("{what}: no answer within {MESSAGE_TIMEOUT:?}"))
        }
        _ => e,
    }
}

/// Deposits the mount with the keeper at `keeper` from a thread of its own, and again each time
/// the keeper comes back after it died, for as long as the FUSE connection of `fds` lives. The
/// connection to the keeper is close-on-exec: only this process holds it, so its EOF tells the
/// keeper this process is gone.
pub fn deposit_forever(keeper: PathBuf, spec: Spec, fds: Vec<OwnedFd>) {
    let shown = spec.path.display().to_string();
    let spawned = std::thread::Builder::new().name("ferrovol-deposit".into()).spawn(move || {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let mut said = false;
        while connection_alive(&fds[0]) {
            let deposited = UnixStream::connect(&keeper).and_then(|conn| {
                conn.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
                send(&conn, &Request::Deposit { spec: Box::new(spec.clone()) }, &raw)?;
                let reply = recv::<Reply>(&conn).map_err(|e| worded(e, "the keeper"))?;
                conn.set_read_timeout(None)?;
                match reply {
                    Some((Reply::Kept, _)) => Ok(conn),
                    Some((Reply::Error { message }, _)) => Err(io::Error::other(message)),
                    other => Err(io::Error::other(format!("unexpected keeper reply {other:?}"))),
                }
            });
            match deposited {
                Ok(conn) => {
                    info!(path = %spec.path.display(), keeper = %keeper.display(), "deposited with the keeper");
                    said = false;
                    let mut b = [0u8; 64];
                    let mut r = &conn;
                    while !matches!(r.read(&mut b), Ok(0) | Err(_)) {}
                    if connection_alive(&fds[0]) {
                        warn!(path = %spec.path.display(), "the keeper is gone; depositing again once it is back");
                    }
                }
                Err(e) if !said => {
                    said = true;
                    warn!(path = %spec.path.display(), keeper = %keeper.display(), error = %e,
                        "cannot deposit with the keeper; retrying every second");
                }
                Err(_) => {}
            }
            std::thread::sleep(REDEPOSIT_EVERY);
        }
    });
    if let Err(e) = spawned {
        warn!(path = %shown, error = %e, "cannot start the keeper deposit thread");
    }
}

/// Claims one orphan from the keeper at `keeper`: its spec and its fds (ours now).
pub fn claim(keeper: &Path) -> io::Result<Option<(Spec, Vec<OwnedFd>)>> {
    let conn = UnixStream::connect(keeper)?;
    conn.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
    let program = std::env::current_exe().map(|e| program_name(&e)).unwrap_or_default();
    send(&conn, &Request::Claim { program }, &[])?;
    match recv::<Reply>(&conn).map_err(|e| worded(e, "the keeper"))? {
        Some((Reply::Orphan { spec }, fds)) if !fds.is_empty() => Ok(Some((*spec, fds))),
        Some((Reply::NoOrphan, _)) => Ok(None),
        Some((Reply::Error { message }, _)) => Err(io::Error::other(message)),
        other => Err(io::Error::other(format!("unexpected keeper reply {other:?}"))),
    }
}

/// What the keeper at `keeper` holds.
pub fn list(keeper: &Path) -> io::Result<Vec<Kept>> {
    let conn = UnixStream::connect(keeper)?;
    conn.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
    send(&conn, &Request::List, &[])?;
    match recv::<Reply>(&conn).map_err(|e| worded(e, "the keeper"))? {
        Some((Reply::List { mounts }, _)) => Ok(mounts),
        Some((Reply::Error { message }, _)) => Err(io::Error::other(message)),
        other => Err(io::Error::other(format!("unexpected keeper reply {other:?}"))),
    }
}

/// The keeper this process deposits with, if any ([`KEEPER_ENV`]).
pub fn configured() -> Option<PathBuf> {
    std::env::var_os(KEEPER_ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// A keeper socket that is written to and read back: fds cross, and a malformed message is an
/// error, never a panic.
#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn messages_carry_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, mut w) = UnixStream::pair().unwrap();
        send(&a, &Request::List, &[r.as_raw_fd()]).unwrap();
        let (req, fds) = recv::<Request>(&b).unwrap().unwrap();
        assert!(matches!(req, Request::List));
        assert_eq!(fds.len(), 1);
        // The received fd is the same socket: what is written to `w` is read through it.
        w.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        UnixStream::from(fds.into_iter().next().unwrap()).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
        // Malformed and oversized messages are errors.
        let mut raw = &a;
        raw.write_all(&3u32.to_le_bytes()).unwrap();
        raw.write_all(b"{{{").unwrap();
        assert!(recv::<Request>(&b).is_err());
        raw.write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(recv::<Request>(&b).unwrap_err().to_string().contains("limit"));
        drop(a);
        assert!(recv::<Request>(&b).unwrap().is_none());
    }
}
