//! `ferrovol up` end to end (privileged): the whole stack comes up, ext4 takes real file operations,
//! Ctrl-C tears everything down (no mount, no loop device left), the filesystem checks clean, and a
//! second `up` finds the same files. Without root and /dev/fuse: FERROVOL-SKIPPED (a failure under CI).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use ferrovol_server::testing::privileged;

fn is_mounted(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else { return false };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

/// Starts `ferrovol up` and waits for its "ready" line.
fn up(data: &Path, mount: &Path) -> Child {
    up_with(data, mount, &[])
}

/// `ferrovol up` with `extra` arguments.
fn up_with(data: &Path, mount: &Path, extra: &[&str]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(["up", "--data", data.to_str().unwrap(), "--mount", mount.to_str().unwrap(), "--size", "64MiB"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Read its stdout on a thread (and keep draining it, so teardown messages never block on a full
    // pipe); wait for "ready:" here with a deadline, so a stuck start fails instead of hanging.
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines() {
            let _ = tx.send(line.unwrap_or_default());
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with("ready:") => break,
            Ok(line) => seen.push_str(&format!("{line}\n")),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("ferrovol up exited before ready: {seen} {:?}", child.wait())
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("ferrovol up not ready within 60 s: {seen}")
            }
        }
    }
    assert!(is_mounted(mount));
    child
}

/// Waits for `child` to exit; kills it and fails after `limit` (a test never hangs).
fn wait_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ferrovol up (pid {}) did not exit within {limit:?} of Ctrl-C", child.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ctrl-C, then: exit 0, nothing mounted, no loop device left for this process.
fn stop(mut child: Child, mount: &Path) {
    let pid = child.id();
    // SAFETY: kill(2) with a valid pid and signal.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    assert!(status.success(), "ferrovol up exited with {status}");
    assert!(!is_mounted(mount), "{} still mounted", mount.display());
    let loops = String::from_utf8(Command::new("losetup").arg("-a").output().unwrap().stdout).unwrap();
    assert!(!loops.contains(&format!("up-{pid}")), "loop device left behind: {loops}");
}

/// Checks the filesystem offline: the volume attached read-only under a plain server, fsck -n.
fn fsck_offline(dir: &Path, data: &Path) {
    let server = TestServer::start_with_token(data, "127.0.0.1:0", None);
    let img = dir.join("check.img");
    std::fs::write(&img, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args([
            "--server",
            &server.addr.to_string(),
            "attach",
            "default",
            img.to_str().unwrap(),
            "--read-only",
            "--background",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fsck = Command::new("fsck.ext4").args(["-n", "-f", img.to_str().unwrap()]).output().unwrap();
    let report =
        format!("{}{}", String::from_utf8_lossy(&fsck.stdout), String::from_utf8_lossy(&fsck.stderr));
    assert!(fsck.status.success(), "fsck -n found problems: {report}");
    println!("fsck -n: {}", String::from_utf8_lossy(&fsck.stdout).lines().last().unwrap_or_default());
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(["detach", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..100 {
        if !is_mounted(&img) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn up_twice_keeps_files_and_fsck_is_clean() {
    if !privileged("up_twice_keeps_files_and_fsck_is_clean", &["losetup", "mkfs.ext4", "fsck.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mnt = dir.path().join("mnt");

    let child = up(&data, &mnt);
    // Real file-system work: many small files, renames, deletes, a larger file, fsync.
    for i in 0..300 {
        std::fs::write(mnt.join(format!("f{i}")), format!("file {i}\n")).unwrap();
    }
    for i in 0..100 {
        std::fs::rename(mnt.join(format!("f{i}")), mnt.join(format!("renamed{i}"))).unwrap();
    }
    for i in 100..200 {
        std::fs::remove_file(mnt.join(format!("f{i}"))).unwrap();
    }
    let big: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    {
        let mut f = std::fs::File::create(mnt.join("big.bin")).unwrap();
        f.write_all(&big).unwrap();
        f.sync_all().unwrap();
    }
    stop(child, &mnt);

    fsck_offline(dir.path(), &data);

    // Up again: same files, no reformat.
    let child = up(&data, &mnt);
    assert_eq!(std::fs::read_to_string(mnt.join("renamed5")).unwrap(), "file 5\n");
    assert_eq!(std::fs::read_to_string(mnt.join("f250")).unwrap(), "file 250\n");
    assert!(!mnt.join("f150").exists());
    assert_eq!(std::fs::read(mnt.join("big.bin")).unwrap(), big);
    assert_eq!(std::fs::read_dir(&mnt).unwrap().count(), 200 + 1 + 1); // files + big.bin + lost+found
    stop(child, &mnt);
}

/// Ctrl-C while the filesystem is in use: nothing is pulled from under it (the mount, and everything
/// that backs it, stays up); once it is free, the next Ctrl-C tears down cleanly.
#[test]
fn busy_mount_is_kept_until_free() {
    if !privileged("busy_mount_is_kept_until_free", &["losetup", "mkfs.ext4", "fsck.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, mnt) = (dir.path().join("data"), dir.path().join("mnt"));
    let child = up(&data, &mnt);
    let mut open = std::fs::File::create(mnt.join("held-open")).unwrap();
    // SAFETY: kill(2) with a valid pid and signal.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    std::thread::sleep(Duration::from_secs(4)); // umount retries for about 2 s
    assert!(is_mounted(&mnt), "a busy mount was taken down");
    // Still served: writes through the open file land and are durable.
    open.write_all(b"still here\n").unwrap();
    open.sync_all().unwrap();
    drop(open);
    stop(child, &mnt);
    let child = up(&data, &mnt);
    assert_eq!(std::fs::read_to_string(mnt.join("held-open")).unwrap(), "still here\n");
    stop(child, &mnt);
}

/// A second `ferrovol up` on the same data dir (another mount point) refuses at once, naming the
/// process that holds the data dir, and the first one keeps working; the filesystem checks clean.
#[test]
fn second_up_on_one_data_dir_refuses() {
    if !privileged("second_up_on_one_data_dir_refuses", &["losetup", "mkfs.ext4", "fsck.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, mnt, mnt2) = (dir.path().join("data"), dir.path().join("mnt"), dir.path().join("mnt2"));
    let first = up(&data, &mnt);
    std::fs::write(mnt.join("one"), b"first\n").unwrap();
    let second = Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(["up", "--data", data.to_str().unwrap(), "--mount", mnt2.to_str().unwrap(), "--size", "64MiB"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second up on the same data dir started: {err}");
    assert!(
        err.contains("in use by another ferrovol server") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
    assert!(!is_mounted(&mnt2));
    // The first one is untouched.
    std::fs::write(mnt.join("two"), b"still first\n").unwrap();
    std::fs::File::open(mnt.join("two")).unwrap().sync_all().unwrap();
    assert_eq!(std::fs::read_to_string(mnt.join("one")).unwrap(), "first\n");
    stop(first, &mnt);
    fsck_offline(dir.path(), &data);
    let first = up(&data, &mnt);
    assert_eq!(std::fs::read_to_string(mnt.join("two")).unwrap(), "still first\n");
    stop(first, &mnt);
}

/// `ferrovol up` killed with SIGKILL leaves a dead FUSE file, a bound loop device and an ext4
/// mount behind: the next `up` finds them (the pid is gone), cleans them up and starts, and what
/// was fsynced is there.
#[test]
fn stale_run_after_sigkill_is_cleaned_up() {
    if !privileged("stale_run_after_sigkill_is_cleaned_up", &["losetup", "mkfs.ext4", "fsck.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, mnt) = (dir.path().join("data"), dir.path().join("mnt"));
    let mut first = up(&data, &mnt);
    {
        let mut f = std::fs::File::create(mnt.join("kept")).unwrap();
        f.write_all(b"fsynced\n").unwrap();
        f.sync_all().unwrap();
    }
    let pid = first.id();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(is_mounted(&mnt), "the kill left the mount behind (the case under test)");
    let second = up(&data, &mnt);
    assert_eq!(std::fs::read_to_string(mnt.join("kept")).unwrap(), "fsynced\n");
    let loops = String::from_utf8(Command::new("losetup").arg("-a").output().unwrap().stdout).unwrap();
    assert!(!loops.contains(&format!("up-{pid}/")), "the dead run's loop device is still bound: {loops}");
    assert!(!Path::new(&format!("/run/ferrovol/up-{pid}")).exists());
    stop(second, &mnt);
}

/// Ctrl-C in the middle of the start (here: right after the loop device, while ext4 is being made):
/// everything set up so far is undone, nothing is left mounted or bound.
#[test]
fn ctrl_c_during_start_undoes_everything() {
    if !privileged("ctrl_c_during_start_undoes_everything", &["losetup", "mkfs.ext4", "fsck.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (data, mnt) = (dir.path().join("data"), dir.path().join("mnt"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(["up", "--data", data.to_str().unwrap(), "--mount", mnt.to_str().unwrap(), "--size", "1GiB"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "up exited early: {seen}");
        seen.push_str(&line);
        if line.starts_with("loop:") {
            break;
        }
    }
    // SAFETY: kill(2) with a valid pid and signal.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    assert!(!status.success(), "an interrupted start is a failed start: {seen}{rest}");
    assert!(rest.contains("undoing"), "{rest}");
    assert!(!is_mounted(&mnt));
    let loops = String::from_utf8(Command::new("losetup").arg("-a").output().unwrap().stdout).unwrap();
    assert!(!loops.contains(&format!("up-{pid}/")), "loop device left behind: {loops}");
    assert!(!Path::new(&format!("/run/ferrovol/up-{pid}")).exists(), "{seen}{rest}");
    // And the next start works.
    let again = up(&data, &mnt);
    stop(again, &mnt);
}

/// `up --type fs`: the embedded server serves an fs volume, FUSE-mounted at the mount point with
/// no loop device; Ctrl-C unmounts it and the server's own mount of it; the next `up` finds the
/// files, and refuses to take a block volume of that name as an fs volume.
#[test]
fn up_type_fs_serves_files_and_keeps_them() {
    if !privileged("up_type_fs_serves_files_and_keeps_them", &["losetup", "mkfs.ext4"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mnt = dir.path().join("mnt");
    let child = up_with(&data, &mnt, &["--type", "fs"]);
    let m = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let canon = std::fs::canonicalize(&mnt).unwrap();
    let line = m.lines().find(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap())).unwrap();
    assert!(line.contains("fuse") && line.contains("ferrovol:default"), "{line}");
    std::fs::create_dir(mnt.join("d")).unwrap();
    for i in 0..100 {
        std::fs::write(mnt.join(format!("d/f{i}")), format!("file {i}\n")).unwrap();
    }
    std::fs::rename(mnt.join("d/f1"), mnt.join("moved")).unwrap();
    let pid = child.id();
    stop(child, &mnt);
    let loops = String::from_utf8(Command::new("losetup").arg("-a").output().unwrap().stdout).unwrap();
    assert!(!loops.contains(data.to_str().unwrap()), "the server's loop device stayed: {loops} (pid {pid})");
    assert!(!is_mounted(&data.join("volumes/default/mnt")), "the server's mount of the volume stayed");

    let child = up_with(&data, &mnt, &["--type", "fs"]);
    assert_eq!(std::fs::read_to_string(mnt.join("moved")).unwrap(), "file 1\n");
    assert_eq!(std::fs::read_dir(mnt.join("d")).unwrap().count(), 99);
    stop(child, &mnt);
    // A block volume of that name is not taken as an fs volume.
    let block = dir.path().join("block-data");
    let child = up(&block, &mnt);
    stop(child, &mnt);
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(["up", "--data", block.to_str().unwrap(), "--mount", mnt.to_str().unwrap(), "--type", "fs"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a block volume"), "{err}");
    assert!(!is_mounted(&mnt));
}
