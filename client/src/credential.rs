//! This node's credential: issued by the server when the node enrolls with the join token, kept in
//! a file only root (or the user) can read, and presented in every HELLO from then on (see
//! PROTOCOL.md, "Identity"). Shared by a session's connections and reconnects.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{ClientError, Result};

#[derive(Debug)]
pub(crate) struct Credentials {
    /// Where the credential is kept (`ConnectOptions::credential_file`); `None`: memory only.
    file: Option<PathBuf>,
    /// The credential once known (read from the file, or issued on enrollment).
    known: Mutex<Option<String>>,
}

impl Credentials {
    pub(crate) fn new(file: Option<PathBuf>) -> Self {
        Self { file, known: Mutex::new(None) }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What to present in HELLO: this node's credential if it has one, else `fallback` (the join
    /// token, or the admin token). The file is re-read while no credential is known, so a
    /// credential another process of this node just got is picked up.
    pub(crate) fn token(&self, fallback: &str) -> String {
        let mut known = self.known();
        if known.is_none() {
            *known = self.file.as_deref().and_then(read_credential);
        }
        known.clone().unwrap_or_else(|| fallback.to_owned())
    }

    /// Like [`Credentials::token`], but reads the file again even if a credential is known.
    pub(crate) fn reread(&self, fallback: &str) -> String {
        let fresh = self.file.as_deref().and_then(read_credential);
        let mut known = self.known();
        if fresh.is_some() {
            known.clone_from(&fresh);
        }
        fresh.unwrap_or_else(|| fallback.to_owned())
    }

    /// Keeps a credential the server just issued, in memory and (atomically, mode 0600) in the file.
    pub(crate) fn enrolled(&self, credential: &str) -> Result<()> {
        *self.known() = Some(credential.to_owned());
        let Some(path) = &self.file else { return Ok(()) };
        write_credential(path, credential).map_err(|e| ClientError::Connect {
            addr: String::new(),
            reason: format!(
                "enrolled, but cannot save the node credential to {}: {e}; an admin must `ferrovol node \
                 reset` this node before it can connect again",
                path.display()
            ),
        })
    }
}

fn read_credential(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

fn write_credential(path: &Path, credential: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp =
        dir.join(format!(".{}.tmp", path.file_name().map_or("credential".into(), |n| n.to_string_lossy())));
    {
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(credential.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The default credential file for `node` talking to `server`: under
/// `/var/lib/ferrovol-client/credentials` as root (not in `/var/lib/ferrovol`, `ferrovol up`'s data
/// dir), else `$XDG_STATE_HOME/ferrovol/credentials` (or `~/.local/state/...`); one file per node
/// and server address, since each server issues its own.
pub fn default_credential_file(node: &str, server: &str) -> Option<PathBuf> {
    // SAFETY: geteuid cannot fail and touches no memory.
    let base = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/ferrovol-client")
    } else if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|s| !s.is_empty()) {
        PathBuf::from(state).join("ferrovol")
    } else {
        PathBuf::from(std::env::var_os("HOME")?).join(".local/state/ferrovol")
    };
    let safe = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '_' }).collect()
    };
    Some(base.join("credentials").join(format!("{}@{}", safe(node), safe(server))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_in_memory_and_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/cred");
        let c = Credentials::new(Some(file.clone()));
        assert_eq!(c.token("join"), "join");
        c.enrolled("secret").unwrap();
        assert_eq!(c.token("join"), "secret");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "secret\n");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        // Another process of the node finds it.
        assert_eq!(Credentials::new(Some(file)).token("join"), "secret");
        let p = default_credential_file("node/1", "127.0.0.1:7700").unwrap();
        assert!(p.ends_with("credentials/node_1@127.0.0.1_7700"), "{}", p.display());
    }
}
