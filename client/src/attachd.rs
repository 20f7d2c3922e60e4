//! The node attach daemon (`ferrovol attachd`, or `ferrovol-csi --mode attachd` in Kubernetes)
//! and its API: one JSON request line and one JSON reply line per connection on its unix socket
//! (owner-only, so only root on the node can call it). The CSI node plugin calls it instead of
//! starting attach processes itself, so that a restart of the plugin touches no mount.
//!
//! The daemon starts one attach process (the mount's holder, which starts its worker: see
//! [`crate::fuse::supervise`]) per attach request, in a session of its own: the daemon can die,
//! restart or be upgraded without touching a mount. With a keeper, every holder and worker
//! deposits its mount with it (see [`crate::fuse::keep`]); the daemon claims the mounts whose
//! processes are all gone (its container was killed, say) and starts a holder for each, which
//! resumes the connection: nothing is unmounted.

use std::collections::HashSet;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::fuse::{keep, supervise};
use crate::host::{self, Serving};

/// Where `ferrovol attachd` listens by default.
pub const DEFAULT_SOCKET: &str = "/run/ferrovol/attachd.sock";
/// Where the keeper listens by default (see [`crate::fuse::keep`]).
pub const DEFAULT_KEEPER: &str = "/run/ferrovol/keeper.sock";
/// The largest request or reply line either side reads.
const MAX_LINE: u64 = 1 << 20;

/// Attach `volume` over the regular file `path`, as `ferrovol attach` does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachRequest {
    pub volume: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Open read-write under this writer attachment generation (taken by the caller, as CSI's
    /// ControllerPublish does); without it, the attach takes the node's attachment itself.
    #[serde(default)]
    pub generation: Option<u64>,
    /// Seconds the mount's I/O waits for a lost server before EIO (default: the daemon's).
    #[serde(default)]
    pub io_timeout_s: Option<u64>,
    /// Where the mount's processes log (default: under /run/ferrovol/attachd).
    #[serde(default)]
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Attach(AttachRequest),
    /// Unmount `path` and wait for its processes to exit (the writer attachment is released).
    Detach {
        path: PathBuf,
    },
    /// The mounts served on this node.
    List,
    /// The daemon itself, and the mounts.
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// `already`: the volume was attached there before this request (attach is idempotent).
    Attached {
        holder: u32,
        log: Option<PathBuf>,
        already: bool,
    },
    Detached,
    Mounts {
        mounts: Vec<Serving>,
    },
    Status {
        pid: u32,
        version: String,
        node_id: String,
        server: String,
        keeper: Option<PathBuf>,
        mounts: Vec<Serving>,
    },
    Error {
        message: String,
    },
}

/// Sends `req` to the attach daemon at `socket` and returns its reply; an `Error` reply is an
/// `Err` with the daemon's message.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> io::Result<Reply> {
    let conn = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot reach the attach daemon at {}: {e}", socket.display()))
    })?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req).map_err(io::Error::other)?;
    line.push(b'\n');
    (&conn).write_all(&line)?;
    let reply = read_line(&conn)?
        .ok_or_else(|| io::Error::other("the attach daemon closed the connection without a reply"))?;
    match serde_json::from_str::<Reply>(&reply)
        .map_err(|e| io::Error::other(format!("malformed reply from the attach daemon: {e}")))?
    {
        Reply::Error { message } => Err(io::Error::other(message)),
        r => Ok(r),
    }
}

/// One line (without its newline), at most [`MAX_LINE`] bytes; `None` at EOF.
pub fn read_line(conn: &UnixStream) -> io::Result<Option<String>> {
    let mut line = String::new();
    let n = BufReader::new(io::Read::take(conn, MAX_LINE)).read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if !line.ends_with('\n') {
        return Err(io::Error::other(format!("line longer than {MAX_LINE} bytes or cut short")));
    }
    line.pop();
    Ok(Some(line))
}

/// How long an attach request waits for its mount to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the daemon asks the keeper for orphans.
const CLAIM_EVERY: Duration = Duration::from_millis(500);

/// Builds the command of a mount's first holder: a foreground attach that prints `ready` on stdout
/// once the mount is usable. (The daemon sets the keeper in its environment, and its log.)
pub type HolderCommand = Box<dyn Fn(&AttachRequest) -> io::Result<Command> + Send + Sync>;

/// What the attach daemon runs with.
pub struct DaemonConfig {
    pub socket: PathBuf,
    /// The keeper every mount is deposited with, and orphans are claimed from.
    pub keeper: Option<PathBuf>,
    /// Where mounts log by default.
    pub log_dir: PathBuf,
    /// For `status`: the node id and server its holders use, and its version.
    pub node_id: String,
    pub server: String,
    pub version: String,
    pub holder: HolderCommand,
}

impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("socket", &self.socket)
            .field("keeper", &self.keeper)
            .field("log_dir", &self.log_dir)
            .field("node_id", &self.node_id)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

struct Daemon {
    config: DaemonConfig,
    /// Paths with an attach or detach in progress.
    busy: Mutex<HashSet<PathBuf>>,
}

/// Serves the attach daemon until the process ends.
pub fn serve(config: DaemonConfig) -> io::Result<()> {
    let bound = keep::bind_socket(&config.socket, "attach daemon")?;
    std::fs::create_dir_all(&config.log_dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", config.log_dir.display())))?;
    let mounts = host::servings();
    info!(socket = %config.socket.display(), keeper = ?config.keeper, mounts = mounts.len(), "attach daemon listening");
    if let Some(k) = config.keeper.clone() {
        std::thread::Builder::new().name("ferrovol-claim".into()).spawn(move || claim_loop(&k))?;
    }
    let daemon = Arc::new(Daemon { config, busy: Mutex::default() });
    for conn in bound.listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let daemon = daemon.clone();
        let spawned = std::thread::Builder::new().name("ferrovol-attachd".into()).spawn(move || {
            if let Err(e) = daemon.connection(&conn) {
                warn!(error = %e, "request failed");
            }
        });
        if let Err(e) = spawned {
            // Out of threads: this request is dropped (the caller sees EOF), the daemon goes on.
            warn!(error = %e, "cannot start a thread for a request");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Claims every orphan the keeper holds and starts a holder for each, forever.
fn claim_loop(keeper: &Path) {
    let mut said = false;
    loop {
        match keep::claim(keeper) {
            Ok(Some((spec, fds))) => {
                said = false;
                match supervise::adopt(&spec, &fds) {
                    Ok(mut child) => {
                        let (pid, path) = (child.id(), spec.path.clone());
                        warn!(path = %path.display(), volume = %spec.volume, holder = pid,
                            "adopted an orphaned mount (its processes were gone); a new worker resumes it");
                        let reaper = std::thread::Builder::new().name("ferrovol-reap".into()).spawn(move || {
                            match child.wait() {
                                Ok(s) if s.success() => info!(path = %path.display(), holder = pid, "adopted holder exited"),
                                Ok(s) => warn!(path = %path.display(), holder = pid, status = %s, "adopted holder exited"),
                                Err(e) => warn!(path = %path.display(), holder = pid, error = %e, "cannot wait for the adopted holder"),
                            }
                        });
                        if let Err(e) = reaper {
                            warn!(error = %e, "cannot start a thread to reap the adopted holder (it stays a zombie when it exits)");
                        }
                    }
                    Err(e) => {
                        warn!(path = %spec.path.display(), exe = %spec.exe.display(), error = %e,
                            "cannot start a holder for an orphaned mount")
                    }
                }
                continue; // more may wait
            }
            Ok(None) => said = false,
            Err(e) if !said => {
                said = true;
                warn!(keeper = %keeper.display(), error = %e, "cannot reach the keeper; retrying");
            }
            Err(_) => {}
        }
        std::thread::sleep(CLAIM_EVERY);
    }
}

impl Daemon {
    fn connection(&self, conn: &UnixStream) -> io::Result<()> {
        conn.set_read_timeout(Some(Duration::from_secs(10)))?;
        let Some(line) = read_line(conn)? else { return Ok(()) };
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => self.handle(req).unwrap_or_else(|e| Reply::Error { message: e.to_string() }),
            Err(e) => Reply::Error { message: format!("malformed request: {e}") },
        };
        let mut out = serde_json::to_vec(&reply).map_err(io::Error::other)?;
        out.push(b'\n');
        (&*conn).write_all(&out)
    }

    fn handle(&self, req: Request) -> io::Result<Reply> {
        let c = &self.config;
        match req {
            Request::List => Ok(Reply::Mounts { mounts: host::servings() }),
            Request::Status => Ok(Reply::Status {
                pid: std::process::id(),
                version: c.version.clone(),
                node_id: c.node_id.clone(),
                server: c.server.clone(),
                keeper: c.keeper.clone(),
                mounts: host::servings(),
            }),
            Request::Attach(a) => {
                let _busy = self.lock(&a.path)?;
                self.attach(&a)
            }
            Request::Detach { path } => {
                let _busy = self.lock(&path)?;
                host::detach(&path)?;
                info!(path = %path.display(), "detached");
                Ok(Reply::Detached)
            }
        }
    }

    fn lock(&self, path: &Path) -> io::Result<Busy<'_>> {
        let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        if !self.busy.lock().unwrap_or_else(PoisonError::into_inner).insert(canon.clone()) {
            return Err(io::Error::other(format!(
                "an attach or detach of {} is already in progress",
                path.display()
            )));
        }
        Ok(Busy { daemon: self, path: canon })
    }

    fn attach(&self, a: &AttachRequest) -> io::Result<Reply> {
        let name: ferrovol_proto::VolumeName =
            a.volume.parse().map_err(|e| io::Error::other(format!("volume name {:?}: {e}", a.volume)))?;
        // Idempotent: the same volume already served there is a success.
        if let Some(m) = host::mount_at(&a.path) {
            let ours = m.fstype.starts_with("fuse") && m.source == format!("ferrovol:{name}");
            let live = host::serving_of(&a.path).filter(|s| s.volume == name.as_str());
            let shown = a.path.display();
            return match (ours, live) {
                (true, Some(s)) if !host::pid_alive(s.holder) => Err(io::Error::other(format!(
                    "{shown} is a mount of {name} whose processes are being restarted; try again in a moment"
                ))),
                (true, Some(s)) if s.read_only == a.read_only => {
                    Ok(Reply::Attached { holder: s.holder, log: None, already: true })
                }
                (true, Some(s)) => Err(io::Error::other(format!(
                    "{shown} is attached already with read_only {}; detach it first",
                    s.read_only
                ))),
                (true, None) => Err(io::Error::other(format!(
                    "{shown} is a mount of {name} that no process serves; detach it first"
                ))),
                (false, _) => Err(io::Error::other(format!(
                    "{shown} is already a mount point ({} {}); detach it first",
                    m.fstype, m.source
                ))),
            };
        }
        let log = a.log.clone().unwrap_or_else(|| {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            self.config.log_dir.join(format!("{name}-{ms}.log"))
        });
        let mut cmd = (self.config.holder)(a)?;
        match &self.config.keeper {
            Some(k) => cmd.env(keep::KEEPER_ENV, k),
            None => cmd.env_remove(keep::KEEPER_ENV),
        };
        let mut child = host::start_attach(cmd, &a.path, &log, READY_TIMEOUT)?;
        let holder = child.id();
        info!(volume = %name, path = %a.path.display(), holder, "attached");
        std::thread::spawn(move || child.wait());
        Ok(Reply::Attached { holder, log: Some(log), already: false })
    }
}

struct Busy<'a> {
    daemon: &'a Daemon,
    path: PathBuf,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.daemon.busy.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire form is what PROTOCOL-free callers (a shell with socat) can write by hand.
    #[test]
    fn requests_read_as_documented() {
        let r: Request = serde_json::from_str(r#"{"op":"attach","volume":"v","path":"/x"}"#).unwrap();
        assert_eq!(
            r,
            Request::Attach(AttachRequest {
                volume: "v".into(),
                path: "/x".into(),
                read_only: false,
                generation: None,
                io_timeout_s: None,
                log: None
            })
        );
        assert_eq!(serde_json::to_string(&Request::List).unwrap(), r#"{"op":"list"}"#);
        assert_eq!(
            serde_json::to_string(&Reply::Error { message: "m".into() }).unwrap(),
            r#"{"reply":"error","message":"m"}"#
        );
    }
}
