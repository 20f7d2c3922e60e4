//! Privileged end-to-end tests of `ferrovol attach` through the real kernel path: a FUSE mount over a
//! file, real reads and writes, fsync, fallocate, detach and re-attach, and a server crash in between.
//! They need root and /dev/fuse. Without them they print FERROVOL-SKIPPED and pass, except under CI
//! (FERROVOL_REQUIRE_PRIVILEGED=1), where they fail instead.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{read_direct, TestServer};
use ferrovol_server::testing::privileged;

fn ferrovol(server: &str, args: &[&str]) -> Output {
    ferrovol_as("test-node", server, args)
}

fn ferrovol_as(node: &str, server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(args)
        .env("FERROVOL_SERVER", server)
        .env("FERROVOL_TOKEN", "tok")
        .env("FERROVOL_NODE_ID", node)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_mounted(path: &Path) -> bool {
    let canon = std::fs::canonicalize(path).unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

/// Detaches (lazily, whatever happened) when the test ends.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.0.exists() && is_mounted(&self.0) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

fn attach(server: &str, vol: &str, path: &Path, extra: &[&str]) -> Mounted {
    attach_with(server, vol, path, extra, None)
}

/// With `FERROVOL_FUSE` set to `fuse` ("fuser" or "own": which FUSE session serves it).
fn attach_with(server: &str, vol: &str, path: &Path, extra: &[&str], fuse: Option<&str>) -> Mounted {
    let mut args = vec!["attach", vol, path.to_str().unwrap(), "--background"];
    args.extend_from_slice(extra);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovol"));
    cmd.args(&args)
        .env("FERROVOL_SERVER", server)
        .env("FERROVOL_TOKEN", "tok")
        .env("FERROVOL_NODE_ID", "test-node")
        .env("RUST_LOG", "warn");
    if let Some(f) = fuse {
        cmd.env("FERROVOL_FUSE", f);
    }
    ok(&cmd.output().unwrap());
    assert!(is_mounted(path));
    Mounted(path.to_owned())
}

fn detach(server: &str, m: &Mounted) {
    ok(&ferrovol(server, &["detach", m.0.to_str().unwrap()]));
    // The attach process exits once the kernel has let go.
    for _ in 0..100 {
        if !is_mounted(&m.0) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} still mounted after detach", m.0.display());
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn read_all(path: &Path, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).unwrap();
    let mut out = vec![0u8; len];
    f.read_exact(&mut out).unwrap();
    out
}

#[test]
fn write_read_detach_reattach_crash_fuser() {
    if !privileged("write_read_detach_reattach_crash_fuser", &[]) {
        return;
    }
    write_read_detach_reattach_crash_on(Some("fuser"));
}

/// The same through our own FUSE session (client/src/fuse/kernel.rs; the default as root).
#[test]
fn write_read_detach_reattach_crash_own_session() {
    if !privileged("write_read_detach_reattach_crash_own_session", &[]) {
        return;
    }
    write_read_detach_reattach_crash_on(Some("own"));
}

fn write_read_detach_reattach_crash_on(fuse: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = TestServer::start(&data_dir, "127.0.0.1:0");
    let addr = server.addr.to_string();
    ok(&ferrovol(&addr, &["volume", "create", "e2e", "--size", "256MiB"]));
    let img = dir.path().join("e2e.img");
    std::fs::write(&img, b"").unwrap();
    let m = attach_with(&addr, "e2e", &img, &[], fuse);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 256 << 20);

    // 256 MiB of random data through the file, fsync'ed, read back by checksum.
    let data = pattern(1, 256 << 20);
    {
        let mut f = OpenOptions::new().write(true).open(&img).unwrap();
        for chunk in data.chunks(4 << 20) {
            f.write_all(chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let want = crc32fast::hash(&data);
    assert_eq!(crc32fast::hash(&read_all(&img, 256 << 20)), want);
    // stat shows the allocated blocks.
    assert!(std::fs::metadata(&img).unwrap().blocks() * 512 >= 255 << 20);

    // Detach and re-attach: the data is on the server, not in a page cache.
    detach(&addr, &m);
    let m = attach_with(&addr, "e2e", &img, &[], fuse);
    assert_eq!(crc32fast::hash(&read_all(&img, 256 << 20)), want);

    // The server crashes and comes back while attached: fsync'ed data survives, I/O resumes.
    let extra = pattern(2, 1 << 20);
    {
        let mut f = OpenOptions::new().write(true).open(&img).unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(&extra).unwrap();
        f.sync_all().unwrap();
    }
    server.kill();
    let server = TestServer::start(&data_dir, &addr);
    let mut f = std::fs::File::open(&img).unwrap();
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    // Bypass the page cache so the read really goes to the restarted server.
    // SAFETY: posix_fadvise on a valid fd touches no memory.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut back = vec![0u8; 1 << 20];
    f.read_exact(&mut back).unwrap();
    assert_eq!(back, extra);
    drop(f);

    // fallocate(PUNCH_HOLE) reaches the server as TRIM and lowers its allocated bytes.
    let before = std::fs::metadata(&img).unwrap().blocks();
    {
        let f = OpenOptions::new().write(true).open(&img).unwrap();
        // SAFETY: fallocate on a valid fd with plain integers.
        let rc = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                128 << 20,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
    std::thread::sleep(Duration::from_millis(1100)); // attribute cache TTL
    let after = std::fs::metadata(&img).unwrap().blocks();
    assert!(after * 512 + (100 << 20) < before * 512, "blocks {before} -> {after}");
    detach(&addr, &m);
    drop(server);
}

#[test]
fn read_only_and_mount_errors() {
    if !privileged("read_only_and_mount_errors", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let addr = server.addr.to_string();
    ok(&ferrovol(&addr, &["volume", "create", "ro", "--size", "16MiB"]));
    let img = dir.path().join("ro.img");

    // A missing mount path: a clear error, nothing mounted.
    let out = ferrovol(&addr, &["attach", "ro", img.to_str().unwrap(), "--background"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    // An unknown volume: the error comes back from the server, nothing mounted.
    std::fs::write(&img, b"").unwrap();
    let out = ferrovol(&addr, &["attach", "nope", img.to_str().unwrap(), "--background"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&img));

    let m = attach(&addr, "ro", &img, &["--read-only"]);
    // Already mounted: refused.
    let out = ferrovol(&addr, &["attach", "ro", img.to_str().unwrap(), "--background"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already a mount point"));
    // Read-only refuses writes, reads work.
    let err = OpenOptions::new().write(true).open(&img).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert_eq!(read_all(&img, 4096), vec![0u8; 4096]);
    detach(&addr, &m);
    // Detaching what is not attached: a clear error.
    let out = ferrovol(&addr, &["detach", img.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not attached"));
}

#[test]
fn server_lost_is_eio_after_the_timeout_and_sigterm_detaches() {
    if !privileged("server_lost_is_eio_after_the_timeout_and_sigterm_detaches", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let addr = server.addr.to_string();
    ok(&ferrovol(&addr, &["volume", "create", "gone", "--size", "16MiB"]));
    let img = dir.path().join("gone.img");
    std::fs::write(&img, b"").unwrap();
    let out =
        ferrovol(&addr, &["--io-timeout-s", "2", "attach", "gone", img.to_str().unwrap(), "--background"]);
    ok(&out);
    let m = Mounted(img.clone());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pid: i32 = stdout.split("(pid ").nth(1).and_then(|s| s.split(',').next()).unwrap().parse().unwrap();
    assert_eq!(read_direct(&img).unwrap(), vec![0u8; 4096]);

    // The server goes away for good: I/O waits for the reconnect up to the timeout, then fails with EIO.
    server.kill();
    let t = std::time::Instant::now();
    let err = read_direct(&img).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10), "waited {waited:?}");

    // SIGTERM to the attach process unmounts cleanly.
    // SAFETY: kill(2) with a pid and a signal.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    for _ in 0..250 {
        if !is_mounted(&img) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_mounted(&img), "still mounted after SIGTERM");
    drop(m);
}

/// One writer per volume, enforced by the server for every client: a second read-write attach, from
/// another node or from the same one, fails naming the holder; readers are unlimited; a takeover
/// fences the old holder at once; delete is refused while the attachment exists, even with nobody
/// connected; the holder's clean detach releases it.
#[test]
fn one_writer_per_volume() {
    if !privileged("one_writer_per_volume", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let server = TestServer::start(&data_dir, "127.0.0.1:0");
    let addr = server.addr.to_string();
    ok(&ferrovol(&addr, &["volume", "create", "solo", "--size", "16MiB"]));
    let img = |n: &str| {
        let p = dir.path().join(format!("{n}.img"));
        std::fs::write(&p, b"").unwrap();
        p
    };
    let attach_as = |node: &str, path: &Path, extra: &[&str]| {
        let mut args = vec!["attach", "solo", path.to_str().unwrap(), "--background"];
        args.extend_from_slice(extra);
        ferrovol_as(node, &addr, &args)
    };
    let (a_img, b_img, b2_img, r_img) = (img("a"), img("b"), img("b2"), img("r"));
    ok(&attach_as("node-a", &a_img, &[]));
    let a = Mounted(a_img.clone());
    let data = pattern(7, 1 << 20);
    write_direct(&a_img, 0, &data).unwrap();

    // Another node, read-write: refused, naming the holder, how long, and what to do.
    let out = attach_as("node-b", &b_img, &[]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("\"node-a\"") && e.contains("ago") && e.contains("--force-takeover"), "{e}");
    assert!(!is_mounted(&b_img));
    // The same node again (a second process): refused too.
    let out = attach_as("node-a", &b_img, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already open for writing"), "{}", stderr(&out));
    assert!(!is_mounted(&b_img));
    // Readers are unlimited and see the writer's data.
    ok(&attach_as("node-b", &r_img, &["--read-only"]));
    let r = Mounted(r_img.clone());
    assert_eq!(read_range_direct(&r_img, 0, 1 << 20), data);
    // The volume shows its writer; delete is refused.
    let stat = ferrovol(&addr, &["volume", "stat", "solo", "--json"]);
    ok(&stat);
    assert!(String::from_utf8_lossy(&stat.stdout).contains("node-a"));
    let out = ferrovol(&addr, &["volume", "delete", "solo"]);
    assert!(
        !out.status.success() && stderr(&out).contains("attached for writing by node"),
        "{}",
        stderr(&out)
    );

    // Takeover: node-b gets it; node-a's next write is refused at once (EROFS from FENCED).
    ok(&attach_as("node-b", &b2_img, &["--force-takeover"]));
    let b = Mounted(b2_img.clone());
    let err = write_direct(&a_img, 0, &pattern(8, 4096)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let newer = pattern(9, 1 << 20);
    write_direct(&b2_img, 0, &newer).unwrap();
    assert_eq!(read_range_direct(&r_img, 0, 1 << 20), newer);
    detach(&addr, &a); // the old holder's release must not release node-b's attachment
    let stat = ferrovol(&addr, &["volume", "stat", "solo", "--json"]);
    assert!(String::from_utf8_lossy(&stat.stdout).contains("node-b"));

    // The attachment outlives the server and every connection: right after a restart, with the
    // writer's process stopped, delete is still refused.
    detach(&addr, &r);
    server.kill();
    let server = TestServer::start(&data_dir, &addr);
    let out = ferrovol(&addr, &["volume", "delete", "solo"]);
    assert!(!out.status.success() && stderr(&out).contains("node-b"), "{}", stderr(&out));
    // node-b's clean detach releases it; then delete works.
    detach(&addr, &b);
    let stat = ferrovol(&addr, &["volume", "stat", "solo", "--json"]);
    assert!(
        !String::from_utf8_lossy(&stat.stdout).contains("node-b"),
        "{}",
        String::from_utf8_lossy(&stat.stdout)
    );
    ok(&ferrovol(&addr, &["volume", "delete", "solo"]));
    drop(server);
}

fn write_direct(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path)?;
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut().copy_from_slice(data);
    f.write_all_at(buf.as_mut(), offset)?;
    f.sync_all()
}

fn read_range_direct(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).unwrap();
    let mut buf = AlignedBuf::new(len);
    f.read_exact_at(buf.as_mut(), offset).unwrap();
    buf.as_mut().to_vec()
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: a non-zero size with a valid alignment.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}
