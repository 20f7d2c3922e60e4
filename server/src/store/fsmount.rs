//! The filesystem of an fs volume: made with mkfs.ext4 on the volume's data file at create, mounted
//! by the server through a loop device at `DIR/volumes/NAME/mnt` when first opened, and found
//! mounted again after a server restart (the kernel keeps the mount when the server dies).
//!
//! ext4, because its file handles are 8 bytes (inode number and generation: a node id fits a u64)
//! and it is the filesystem every node already has tools for. Growing it needs resize2fs on the
//! mounted filesystem, which needs CAP_SYS_RESOURCE (see server/README.md, "fs volumes").

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use tracing::{info, warn};

use crate::error::{StoreError, StoreResult};

/// The mount point inside a volume's directory.
pub const MOUNT_DIR: &str = "mnt";

/// Runs a host tool, with its stderr in the error.
fn run(cmd: &mut Command) -> StoreResult<String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| {
        StoreError::Io(std::io::Error::other(format!("cannot run {what}: {e} (is it installed?)")))
    })?;
    if !out.status.success() {
        return Err(StoreError::Io(std::io::Error::other(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Makes an empty ext4 filesystem on `data` (a regular file of the volume's size).
pub fn mkfs(data: &Path) -> StoreResult<()> {
    // No discard (the file is sparse already), lazy init (the file stays thin), no blocks reserved
    // for root (it is a shared volume, not a system disk). `-T default -I 256` whatever the size:
    // mke2fs would give a volume under 512 MiB 1 KiB blocks and 128-byte inodes ("small"), whose
    // timestamps have no nanoseconds and end in 2038, and whose xattr values stop near 1 KiB.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-m", "0", "-T", "default", "-I", "256"])
        .args(["-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"])
        .arg(data))?;
    Ok(())
}

/// Whether `path` is a mount point now (in this process's mount namespace).
pub(crate) fn mounted_at(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = path.as_os_str().as_bytes();
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| unescape(m).as_slice() == want))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// A mounted fs volume.
#[derive(Debug)]
pub struct FsMount {
    pub mount_point: PathBuf,
    /// The mount's root directory, opened for reading (open_by_handle_at refuses an O_PATH
    /// `mount_fd`): node 1.
    pub root: OwnedFd,
    /// The root directory's own file handle, packed (it is answered as node 1).
    pub root_handle: u64,
    /// Files open through it (see `files`).
    pub files: std::sync::Arc<crate::files::Files>,
    /// Its byte-range locks (see `files::Locks`).
    pub locks: std::sync::Arc<crate::files::Locks>,
    /// The connections that cache its inodes (see `notify`).
    pub watchers: crate::notify::Watchers,
    /// True while frozen for a point-in-time copy (`freeze`).
    pub frozen: tokio::sync::watch::Sender<bool>,
}

impl FsMount {
    /// Mounts the filesystem on `data` at `dir/mnt`, or takes the mount that is already there (a
    /// restarted server finds its predecessor's).
    pub fn mount(dir: &Path, data: &Path) -> StoreResult<Self> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(StoreError::InvalidArgument(
                "fs volumes need a server running as root (it mounts them, and runs each file operation \
                 with its caller's credentials)"
                    .into(),
            ));
        }
        let mount_point = dir.join(MOUNT_DIR);
        std::fs::create_dir_all(&mount_point)?;
        // mountinfo holds canonical paths.
        let mount_point = std::fs::canonicalize(&mount_point)?;
        if mounted_at(&mount_point) {
            info!(mount = %mount_point.display(), "fs volume already mounted (kept by the kernel); reusing it");
        } else {
            // A loop device with direct I/O (the data file's pages are not cached twice), mounted,
            // then detached: autoclear frees it at unmount.
            // A loop device already on the data file (a mount elsewhere, by another server
            // process or mount namespace): a second mount of one ext4 would corrupt it.
            not_attached(data)?;
            // A grow that stopped after the data file grew (a crash, a failed resize2fs) is
            // finished now, before anything else sees the filesystem; if it cannot be, the
            // volume is served at its old size all the same.
            let file_len = std::fs::metadata(data)?.len();
            match fs_bytes(data) {
                Ok(fs) if fs.saturating_add(GROW_SLACK) < file_len => {
                    if let Err(e) = grow_offline(data) {
                        warn!(data = %data.display(), error = %e, "cannot finish growing the filesystem; mounting it as it is");
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(data = %data.display(), error = %e, "cannot read the filesystem's size"),
            }
            let dev = run(Command::new("losetup").args(["--find", "--show", "--direct-io=on"]).arg(data))?;
            // nodev, nosuid, noexec: the server never opens a device, runs a program or honours a
            // set-user-ID bit that a client made; the bits are still stored and shown.
            let mounted = run(Command::new("mount")
                .args(["-t", "ext4", "-o", "noatime,nodev,nosuid,noexec"])
                .arg(&dev)
                .arg(&mount_point));
            if let Err(e) = run(Command::new("losetup").arg("-d").arg(&dev)) {
                warn!(device = %dev, error = %e, "cannot mark the loop device for release at unmount");
            }
            mounted?;
            info!(mount = %mount_point.display(), device = %dev, "fs volume mounted");
        }
        let c = CString::new(mount_point.as_os_str().as_bytes())
            .map_err(|_| StoreError::InvalidArgument("mount point holds a NUL".into()))?;
        // SAFETY: `c` is a valid NUL-terminated path; open returns a new fd or -1.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        let root_handle =
            crate::files::handle_of(root.as_raw_fd(), c"", libc::AT_EMPTY_PATH).map_err(|e| {
                StoreError::Io(std::io::Error::other(format!(
                    "file handles on {}: {e}",
                    mount_point.display()
                )))
            })?;
        Ok(Self {
            mount_point,
            root,
            root_handle,
            files: Default::default(),
            locks: Default::default(),
            watchers: Default::default(),
            frozen: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Whether it is frozen now: a change waits for the thaw before it takes a file worker (a
    /// worker blocked in a frozen filesystem would be one less for every other fs volume).
    pub fn is_frozen(&self) -> bool {
        *self.frozen.borrow()
    }

    /// Freezes the filesystem until the guard drops: everything written back, the journal emptied,
    /// each new change held (its caller waits; reads go on). The image is then clean as it stands.
    pub fn freeze(&self) -> StoreResult<Frozen<'_>> {
        self.frozen.send_replace(true);
        // SAFETY: FIFREEZE takes a valid fd of the filesystem and an unused int argument.
        if unsafe { libc::ioctl(self.root.as_raw_fd(), FIFREEZE, 0) } != 0 {
            let e = std::io::Error::last_os_error();
            self.frozen.send_replace(false);
            return Err(StoreError::Io(std::io::Error::other(format!(
                "cannot freeze {} for a point-in-time copy: {e}",
                self.mount_point.display()
            ))));
        }
        Ok(Frozen(self))
    }

    /// Writes back what is dirty (before a freeze: less for it to write while writes wait).
    pub fn sync(&self) {
        // SAFETY: syncfs on a valid fd.
        unsafe { libc::syncfs(self.root.as_raw_fd()) };
    }

    /// Writes everything back and unmounts (the loop device goes with it). `EBUSY` when something
    /// on the server still uses it.
    pub fn unmount(self) -> StoreResult<()> {
        // Open files and lock fds would keep the mount busy.
        self.files.clear();
        self.locks.clear();
        // SAFETY: syncfs on a valid fd.
        unsafe { libc::syncfs(self.root.as_raw_fd()) };
        // Our own fd on the root would keep the mount busy.
        drop(self.root);
        run(Command::new("umount").arg(&self.mount_point))?;
        info!(mount = %self.mount_point.display(), "fs volume unmounted");
        Ok(())
    }
}

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` of linux/fs.h (not in the libc crate).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn thaw(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: FITHAW takes a valid fd of the filesystem and an unused int argument.
    if unsafe { libc::ioctl(fd, FITHAW, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A frozen fs volume (`FsMount::freeze`); thawed on drop.
#[derive(Debug)]
pub struct Frozen<'a>(&'a FsMount);

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(e) = thaw(self.0.root.as_raw_fd()) {
            warn!(mount = %self.0.mount_point.display(), error = %e, "cannot thaw the fs volume after its copy");
        }
        self.0.frozen.send_replace(false);
    }
}

/// Thaws the filesystem mounted in volume directory `dir` if it was left frozen (a server killed
/// during a snapshot's freeze); nothing when it is not mounted or not frozen.
pub fn thaw_left_frozen(dir: &Path) {
    let mp = dir.join(MOUNT_DIR);
    let mp = std::fs::canonicalize(&mp).unwrap_or(mp);
    if !mounted_at(&mp) {
        return;
    }
    let Ok(root) = std::fs::File::open(&mp) else { return };
    // EINVAL: it was not frozen.
    if thaw(root.as_raw_fd()).is_ok() {
        warn!(mount = %mp.display(), "fs volume was left frozen (a snapshot cut short); thawed it");
    }
}

/// Whether this process may grow a mounted ext4 (EXT4_IOC_RESIZE_FS needs CAP_SYS_RESOURCE,
/// which some hosts withhold even from root: this one does).
pub fn can_grow_online() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status").ok().is_some_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
    })
}

/// Grows the mounted ext4 at `mount_point` to its data file's new size: the loop device is told
/// its capacity changed, then resize2fs grows the filesystem in place (needs `can_grow_online`).
pub fn grow_online(mount_point: &Path) -> StoreResult<()> {
    let dev = run(Command::new("findmnt").args(["-n", "-o", "SOURCE", "--mountpoint"]).arg(mount_point))?;
    run(Command::new("losetup").arg("-c").arg(&dev))?;
    run(Command::new("resize2fs").arg(&dev))?;
    info!(mount = %mount_point.display(), device = %dev, "fs volume grown online");
    Ok(())
}

/// Grows the unmounted ext4 in `data` to the file's size: a forced check first (resize2fs wants
/// one since the last mount), then resize2fs on the image (0.2 s for 8 -> 16 GiB here).
pub fn grow_offline(data: &Path) -> StoreResult<()> {
    // -p: fixes only what is safe to fix unattended; exit 1 means it fixed something.
    let out = Command::new("e2fsck").args(["-f", "-p"]).arg(data).output().map_err(|e| {
        StoreError::Io(std::io::Error::other(format!("cannot run e2fsck: {e} (is it installed?)")))
    })?;
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(StoreError::Io(std::io::Error::other(format!(
            "e2fsck of {} before growing it failed ({}): {} {}",
            data.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))));
    }
    run(Command::new("resize2fs").arg(data))?;
    info!(data = %data.display(), "fs volume grown");
    Ok(())
}

/// Refuses (`BUSY`) a data file already on a loop device (a mount elsewhere, by another server
/// process or mount namespace): a second mount of one ext4, or resize2fs under a mounted one,
/// would corrupt it.
pub fn not_attached(data: &Path) -> StoreResult<()> {
    let attached = run(Command::new("losetup").arg("-j").arg(data))?;
    if attached.is_empty() {
        return Ok(());
    }
    Err(StoreError::Busy(format!(
        "{} is attached to a loop device ({attached}) that this server did not mount: refusing to mount \
         or grow it twice",
        data.display()
    )))
}

/// The size of the ext4 in `data`, from its superblock.
pub fn fs_bytes(data: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    std::fs::File::open(data)?.read_exact_at(&mut sb, 1024)?;
    let u32_at = |at: usize| u64::from(u32::from_le_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]]));
    if u32_at(0x38) & 0xffff != 0xef53 {
        return Err(std::io::Error::other("no ext4 superblock"));
    }
    // s_blocks_count_hi counts only with the 64bit feature (s_feature_incompat 0x80).
    let hi = if u32_at(0x60) & 0x80 != 0 { u32_at(0x150) } else { 0 };
    Ok(((hi << 32) | u32_at(0x4)) << (10 + u32_at(0x18).min(6)))
}

/// Slack below which a data file larger than its filesystem is left as it is at mount (resize2fs
/// leaves out a last block group too small to hold its own metadata).
const GROW_SLACK: u64 = 64 << 20;

/// Unmounts what a volume directory may still have mounted (before a delete).
pub fn unmount_dir(dir: &Path) -> StoreResult<()> {
    let mp = dir.join(MOUNT_DIR);
    let mp = std::fs::canonicalize(&mp).unwrap_or(mp);
    if mounted_at(&mp) {
        run(Command::new("umount").arg(&mp))?;
    }
    Ok(())
}
