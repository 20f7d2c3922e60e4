//! Host facts and small host actions the node services share: mounts, unmounts, processes,
//! capabilities, device sizes, statvfs.

use std::path::Path;
use std::time::Duration;

use ferrovol_client::host::{self, mount_at};

use crate::error::{CsiError, CsiResult};

/// Whether something is mounted at `path`, including a broken mount that no longer answers.
pub fn is_mounted(path: &Path) -> bool {
    mount_at(path).is_some() || std::fs::metadata(path).is_err_and(|e| host::is_broken_mount_error(&e))
}

/// Unmounts `path`, retrying a few seconds while it is busy; still busy: FAILED_PRECONDITION.
pub fn unmount_now(path: &Path) -> CsiResult<()> {
    host::retry_busy(Duration::from_secs(3), || host::unmount(path)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EBUSY) {
            CsiError::precondition(format!("{} is busy (still in use): {e}", path.display()))
        } else {
            CsiError::step(&format!("unmount {}", path.display()), e)
        }
    })
}

pub fn pid_alive(pid: u32) -> bool {
    ferrovol_client::host::pid_alive(pid)
}

/// linux/capability.h: needed by ext4's online resize.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << cap) != 0)
}

pub fn device_size(dev: &str) -> Option<u64> {
    let name = Path::new(dev).file_name()?.to_str()?;
    let sectors: u64 =
        std::fs::read_to_string(format!("/sys/block/{name}/size")).ok()?.trim().parse().ok()?;
    Some(sectors * 512)
}

pub fn statvfs(path: &Path) -> std::io::Result<libc::statvfs> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statvfs is plain data; an all-zero value is valid and the kernel overwrites it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a pointer to a properly sized, writable struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st)
}

/// The default attach limit of a node: the loop driver's fixed device count when it has one
/// (`max_loop`), else 256. Each staged volume costs one loop device, one attach process (about
/// 10 MiB resident) and one FUSE connection.
pub fn default_volume_limit() -> i64 {
    let fixed = std::fs::read_to_string("/sys/module/loop/parameters/max_loop")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or(0);
    if fixed > 0 {
        fixed
    } else {
        256
    }
}
