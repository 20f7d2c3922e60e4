//! Test helpers: the in-process server lives in `ferrovol_server::testing`.
#![allow(dead_code)]

pub use ferrovol_server::testing::TestServer;

/// Reads 4 KiB at offset 0 of `path` with O_DIRECT (past the page cache, to the FUSE worker).
pub fn read_direct(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path)?;
    let mut buf = vec![0u8; 8192];
    let skew = buf.as_ptr().align_offset(4096);
    let aligned = &mut buf[skew..skew + 4096];
    // SAFETY: pread into a valid, 4 KiB-aligned buffer of 4 KiB.
    let n = unsafe { libc::pread(f.as_raw_fd(), aligned.as_mut_ptr().cast(), 4096, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(aligned[..usize::try_from(n).unwrap_or(0)].to_vec())
}
