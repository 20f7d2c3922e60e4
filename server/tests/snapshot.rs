//! Snapshots and clones through a real server on 127.0.0.1: an image holds every write acknowledged
//! before the create and none sent after its answer, while the volume keeps being written; volumes
//! restored from snapshots and cloned from volumes hold exactly that image; snapshots outlive their
//! source; an unfinished copy never survives a kill -9 as a ready snapshot; and on xfs the reflink
//! path makes snapshots ready at once.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use ferrovol_proto::*;
use ferrovol_server::testing::TestServer;

const MIB: u64 = 1 << 20;

fn create(c: &mut RawClient, vol: &str, size: u64, source: Option<VolumeSource>) -> Response {
    c.call(Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: name(vol),
        size,
        labels: Labels::new(),
        source,
    })
}

fn snapshot(c: &mut RawClient, snap: &str, vol: &str) -> Result<SnapshotInfo, ErrorReply> {
    match c
        .call(Request::SnapshotCreate { name: name(snap), source: name(vol), labels: Labels::new() })
        .result
    {
        Ok(Reply::Snapshot(s)) => Ok(s),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    }
}

fn stat(c: &mut RawClient, snap: &str) -> Result<SnapshotInfo, ErrorReply> {
    match c.call(Request::SnapshotStat { name: name(snap) }).result {
        Ok(Reply::Snapshot(s)) => Ok(s),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    }
}

fn wait_ready(c: &mut RawClient, snap: &str) -> SnapshotInfo {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = stat(c, snap).unwrap_or_else(|e| panic!("snapshot {snap}: {e}"));
        if s.ready {
            assert_eq!(s.copied_bytes, s.size);
            return s;
        }
        assert!(s.copied_bytes <= s.size);
        assert!(Instant::now() < deadline, "snapshot {snap} not ready after 2 minutes: {s:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pipelined writes: all sent, then all answered OK.
fn write_all(c: &mut RawClient, h: VolumeHandle, writes: &[(u64, Bytes)]) {
    for chunk in writes.chunks(32) {
        for (offset, data) in chunk {
            c.send(&Request::Write { handle: h, offset: *offset, data: data.clone(), fua: false });
        }
        for _ in chunk {
            let r = c.recv().expect("connection closed");
            assert_eq!(r.result, Ok(Reply::Done), "write failed");
        }
    }
}

fn read_volume(c: &mut RawClient, vol: &str) -> Vec<u8> {
    let (h, size) = match c.call(Request::Open { name: name(vol), read_only: true, generation: 0 }).result {
        Ok(Reply::Opened { handle, size, .. }) => (handle, size),
        other => panic!("open {vol}: {other:?}"),
    };
    let mut out = Vec::with_capacity(size as usize);
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(MIB) as u32;
        match c.call(Request::Read { handle: h, offset, len }).result {
            Ok(Reply::Data(d)) => out.extend_from_slice(&d),
            other => panic!("read {vol} at {offset}: {other:?}"),
        }
        offset += u64::from(len);
    }
    assert_eq!(c.call(Request::Close { handle: h }).result, Ok(Reply::Done));
    out
}

fn same(a: &[u8], b: &[u8], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        panic!("{what}: first difference at byte {i} (MiB {})", i as u64 / MIB);
    }
}

/// An open-mode server whose copies run at 64 MiB/s, so that the test's writes race them.
fn open_server(dir: &Path) -> (TestServer, RawClient) {
    let mut config = ferrovol_server::ServerConfig::new(dir, "127.0.0.1:0".parse().unwrap());
    config.copy_bytes_per_s = 64 << 20;
    let srv = TestServer::start_config(config);
    let c = RawClient::hello(srv.addr, "node-a", "");
    (srv, c)
}

#[test]
fn snapshot_holds_the_moment_of_its_create_while_writes_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, mut c) = open_server(dir.path());
    let size = 128 * MIB;
    assert_eq!(status(&create(&mut c, "v", size, None)), Status::Ok);
    let h = open(&mut c, "v");
    // Every other MiB written (the rest are holes), all acknowledged before the create.
    let before: Vec<(u64, Bytes)> =
        (0..128).step_by(2).map(|i| (i * MIB, Bytes::from(pattern(i, MIB as usize)))).collect();
    write_all(&mut c, h, &before);
    let expected = read_volume(&mut c, "v");

    // Made before the create: generating it takes longer than the copy.
    let after: Vec<(u64, Bytes)> =
        (0..128).rev().map(|i| (i * MIB, Bytes::from(pattern(1000 + i, MIB as usize)))).collect();
    let s = snapshot(&mut c, "s1", "v").unwrap();
    assert_eq!((s.source.as_str(), s.size), ("v", size));
    // Right after the answer, overwrite everything from the end backwards (the copy, if there is
    // one, goes forwards), fill the holes, punch one range and zero another.
    write_all(&mut c, h, &after);
    let r = c.call(Request::Trim { handle: h, offset: 10 * MIB, len: 3 * MIB as u32 });
    assert_eq!(r.result, Ok(Reply::Done));
    let r = c.call(Request::WriteZeroes { handle: h, offset: 20 * MIB, len: 2 * MIB as u32, fua: false });
    assert_eq!(r.result, Ok(Reply::Done));
    let ready = wait_ready(&mut c, "s1");
    assert!(ready.allocated > 0 && ready.allocated <= size);

    // Restored: exactly the image of the moment of the create.
    assert_eq!(status(&create(&mut c, "r", 0, Some(VolumeSource::Snapshot(name("s1"))))), Status::Ok);
    same(&read_volume(&mut c, "r"), &expected, "volume restored from the snapshot");
    // The source has everything written since.
    assert_ne!(read_volume(&mut c, "v")[..MIB as usize], expected[..MIB as usize]);

    // Listing: by source, and all.
    assert_eq!(snapshot(&mut c, "s2", "v").map(|s| s.name), Ok(name("s2")));
    assert_eq!(status(&create(&mut c, "w", MIB, None)), Status::Ok);
    snapshot(&mut c, "s3", "w").unwrap();
    let list = |c: &mut RawClient, source: Option<&str>, start_after: Option<&str>, max_entries: u32| match c
        .call(Request::SnapshotList {
            source: source.map(name),
            start_after: start_after.map(name),
            max_entries,
        })
        .result
    {
        Ok(Reply::SnapshotList { entries, more }) => {
            (entries.into_iter().map(|e| e.name.to_string()).collect::<Vec<_>>(), more)
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(list(&mut c, None, None, 256), (vec!["s1".into(), "s2".into(), "s3".into()], false));
    assert_eq!(list(&mut c, Some("v"), None, 1), (vec!["s1".into()], true));
    assert_eq!(list(&mut c, Some("v"), Some("s1"), 1), (vec!["s2".into()], false));
    assert_eq!(list(&mut c, Some("w"), None, 10), (vec!["s3".into()], false));

    // The source goes away; its snapshots stay usable.
    assert_eq!(c.call(Request::Close { handle: h }).result, Ok(Reply::Done));
    let node = NodeId::try_from("node-a").unwrap();
    assert_eq!(c.call(Request::AttachClear { name: name("v"), node, generation: 0 }).result, Ok(Reply::Done));
    assert_eq!(c.call(Request::VolumeDelete { name: name("v"), force: false }).result, Ok(Reply::Done));
    assert_eq!(stat(&mut c, "s1").map(|s| s.ready), Ok(true));
    assert_eq!(
        status(&create(&mut c, "r2", size + MIB, Some(VolumeSource::Snapshot(name("s1"))))),
        Status::Ok
    );
    let r2 = read_volume(&mut c, "r2");
    same(&r2[..size as usize], &expected, "restored after the source was deleted");
    assert!(r2[size as usize..].iter().all(|b| *b == 0), "the grown tail reads as zeros");
    // Deleting the snapshot leaves the volumes made from it alone.
    assert_eq!(c.call(Request::SnapshotDelete { name: name("s1") }).result, Ok(Reply::Done));
    same(&read_volume(&mut c, "r"), &expected, "restored volume after its snapshot was deleted");
}

#[test]
fn snapshot_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let (_srv, mut c) = open_server(dir.path());
    assert_eq!(status(&create(&mut c, "v", 8 * MIB, None)), Status::Ok);
    let e = snapshot(&mut c, "s", "nope").unwrap_err();
    assert_eq!(e.status, Status::NotFound, "{e}");
    snapshot(&mut c, "s", "v").unwrap();
    let e = snapshot(&mut c, "s", "v").unwrap_err();
    assert_eq!(e.status, Status::AlreadyExists);
    assert!(e.message.contains("of volume v"), "{e}");
    wait_ready(&mut c, "s");
    let e = create(&mut c, "small", 4 * MIB, Some(VolumeSource::Snapshot(name("s"))));
    assert_eq!(status(&e), Status::OutOfRange, "{e:?}");
    let e = create(&mut c, "small", 4 * MIB, Some(VolumeSource::Volume(name("v"))));
    assert_eq!(status(&e), Status::OutOfRange, "{e:?}");
    assert_eq!(
        status(&create(&mut c, "x", 0, Some(VolumeSource::Snapshot(name("missing"))))),
        Status::NotFound
    );
    assert_eq!(
        status(&create(&mut c, "x", 0, Some(VolumeSource::Volume(name("missing"))))),
        Status::NotFound
    );
    assert_eq!(status(&create(&mut c, "x", 0, None)), Status::InvalidArgument, "size 0 needs a source");
    assert_eq!(stat(&mut c, "missing").unwrap_err().status, Status::NotFound);
    assert_eq!(status(&c.call(Request::SnapshotDelete { name: name("missing") })), Status::NotFound);
    // Nothing half-made was left under the refused names.
    assert_eq!(status(&c.call(Request::VolumeStat { name: name("small") })), Status::NotFound);
    assert_eq!(status(&c.call(Request::VolumeStat { name: name("x") })), Status::NotFound);
}

/// A writer streams numbered 4 KiB writes, one at a time, spread over the whole volume, while a
/// clone is made. The clone must hold a prefix of that stream: every write acknowledged before the
/// create was sent, and nothing beyond the write in flight when its answer came.
#[test]
fn clone_is_a_point_in_time_of_a_volume_being_written() {
    let dir = tempfile::tempdir().unwrap();
    let (srv, mut c) = open_server(dir.path());
    let size = 256 * MIB;
    assert_eq!(status(&create(&mut c, "v", size, None)), Status::Ok);
    // Data everywhere, so a copy (where there is no reflink) has work to do.
    let base: Vec<(u64, Bytes)> =
        (0..256).map(|i| (i * MIB, Bytes::from(vec![0xEEu8; MIB as usize]))).collect();
    let h = open(&mut c, "v");
    write_all(&mut c, h, &base);
    assert_eq!(c.call(Request::Close { handle: h }).result, Ok(Reply::Done));

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let offset_of = |i: u64| (i % 256) * MIB + (i / 256) * 4096;
    let writer = {
        let (acked, stop, addr): (_, _, SocketAddr) = (acked.clone(), stop.clone(), srv.addr);
        std::thread::spawn(move || {
            let mut w = RawClient::hello(addr, "node-a", "");
            let h = open(&mut w, "v");
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) && i < 256 * 200 {
                let data = Bytes::from(i.to_le_bytes().repeat(512));
                let r = w.call(Request::Write { handle: h, offset: offset_of(i), data, fua: false });
                assert_eq!(r.result, Ok(Reply::Done));
                i += 1;
                acked.store(i, Ordering::Release);
            }
        })
    };
    while acked.load(Ordering::Acquire) < 300 {
        std::thread::sleep(Duration::from_millis(1));
    }
    let low = acked.load(Ordering::Acquire);
    let r = create(&mut c, "clone", 0, Some(VolumeSource::Volume(name("v"))));
    let high = acked.load(Ordering::Acquire) + 1; // at most one more was in flight
    assert_eq!(status(&r), Status::Ok, "{r:?}");
    std::thread::sleep(Duration::from_millis(100)); // writes after the clone, which must not show
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    let total = acked.load(Ordering::Acquire);
    assert!(total > high, "the writer kept writing after the clone ({total} > {high})");

    let clone = read_volume(&mut c, "clone");
    let in_clone = |i: u64| {
        let at = offset_of(i) as usize;
        clone[at..at + 8] == i.to_le_bytes()
    };
    // The writes in the clone are exactly 0..k for some k.
    let k = (0..total).take_while(|&i| in_clone(i)).count() as u64;
    for i in k..total {
        let at = offset_of(i) as usize;
        assert!(
            clone[at..at + 4096].iter().all(|b| *b == 0xEE),
            "write {i} (after the first missing one, {k}) is in the clone"
        );
    }
    assert!(k >= low, "writes acknowledged before the clone are missing: {k} < {low}");
    assert!(k <= high, "writes made after the clone's answer are in it: {k} > {high}");
}

#[test]
fn an_unfinished_copy_never_survives_a_crash_as_ready() {
    let dir = tempfile::tempdir().unwrap();
    // Copies at 8 MiB/s: 64 MiB of data take 8 s, and the kill comes long before.
    let slow = [std::ffi::OsStr::new("--copy-mib-per-s"), std::ffi::OsStr::new("8")];
    let (mut child, addr) = spawn_server_with(dir.path(), "127.0.0.1:0", &slow);
    let mut c = RawClient::hello(addr, "node-a", "");
    let size = 128 * MIB;
    assert_eq!(status(&create(&mut c, "v", size, None)), Status::Ok);
    let h = open(&mut c, "v");
    let data: Vec<(u64, Bytes)> =
        (0..64).map(|i| (i * 2 * MIB, Bytes::from(vec![i as u8 + 1; MIB as usize]))).collect();
    write_all(&mut c, h, &data);
    let s = snapshot(&mut c, "s", "v").unwrap();
    if s.ready {
        println!("the data dir reflinks: this test is about the copy path, nothing to check");
        child.kill().unwrap();
        child.wait().unwrap();
        return;
    }
    // Not ready: it cannot be restored yet, and says how far it is.
    let e = create(&mut c, "r", 0, Some(VolumeSource::Snapshot(name("s"))));
    assert_eq!(status(&e), Status::Busy, "{e:?}");
    let Err(e) = &e.result else { unreachable!() };
    assert!(e.message.contains("not ready"), "{e}");
    assert!(!stat(&mut c, "s").unwrap().ready, "the copy finished before the kill; make the volume larger");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let (mut child, addr) = spawn_server(dir.path(), "127.0.0.1:0");
    let mut c = RawClient::hello(addr, "node-a", "");
    assert_eq!(stat(&mut c, "s").unwrap_err().status, Status::NotFound, "an interrupted copy was kept");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("snapshots")).unwrap().collect();
    assert!(leftovers.is_empty(), "snapshot files left behind: {leftovers:?}");
    // The name is free again, and a new snapshot completes.
    snapshot(&mut c, "s", "v").unwrap();
    wait_ready(&mut c, "s");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Runs `cmd`, panicking with its output when it fails.
fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// An xfs filesystem on a loop device, mounted for the test's life.
struct Xfs {
    mnt: std::path::PathBuf,
    dev: String,
    _dir: tempfile::TempDir,
}

impl Xfs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img).unwrap().set_len(2 << 30).unwrap();
        let dev = run(std::process::Command::new("losetup").args(["-f", "--show"]).arg(&img));
        run(std::process::Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&dev));
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        run(std::process::Command::new("mount").arg(&dev).arg(&mnt));
        Self { mnt, dev, _dir: dir }
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        // An fs volume's mount inside (a failed test) and its loop device, freed asynchronously,
        // keep the xfs busy a moment: lazily unmounted then.
        let _ = std::process::Command::new("umount").arg("-R").arg("-l").arg(&self.mnt).status();
        let _ = std::process::Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn on_xfs_snapshots_and_clones_are_reflinks() {
    if !ferrovol_server::testing::privileged(
        "on_xfs_snapshots_and_clones_are_reflinks",
        &["losetup", "mkfs.xfs", "mount"],
    ) {
        return;
    }
    let xfs = Xfs::new();
    let data_dir = xfs.mnt.join("data");
    let srv = TestServer::start_with_token(&data_dir, "127.0.0.1:0", None);
    let mut c = RawClient::hello(srv.addr, "node-a", "");
    let size = 128 * MIB;
    assert_eq!(status(&create(&mut c, "v", size, None)), Status::Ok);
    let h = open(&mut c, "v");
    let data: Vec<(u64, Bytes)> =
        (0..64).map(|i| (i * 2 * MIB, Bytes::from(vec![i as u8 + 1; MIB as usize]))).collect();
    write_all(&mut c, h, &data);
    let expected = read_volume(&mut c, "v");
    let t = Instant::now();
    let s = snapshot(&mut c, "s", "v").unwrap();
    let took = t.elapsed();
    assert!(s.ready, "xfs with reflink=1 reflinks: the snapshot is ready at once ({s:?})");
    assert_eq!(s.copied_bytes, size);
    println!("reflink snapshot of {} MiB written: {took:?}", size / MIB / 2);
    let after: Vec<(u64, Bytes)> =
        (0..64).map(|i| (i * 2 * MIB + 4096, Bytes::from(vec![0xA5; MIB as usize]))).collect();
    write_all(&mut c, h, &after);
    assert_eq!(status(&create(&mut c, "r", 0, Some(VolumeSource::Snapshot(name("s"))))), Status::Ok);
    same(&read_volume(&mut c, "r"), &expected, "restored from a reflinked snapshot");
    let now = read_volume(&mut c, "v");
    assert_eq!(status(&create(&mut c, "cl", 0, Some(VolumeSource::Volume(name("v"))))), Status::Ok);
    same(&read_volume(&mut c, "cl"), &now, "a reflinked clone");

    // An fs volume, mounted by the server (opened): frozen across a reflink, so ready at once and
    // a clean filesystem.
    if ferrovol_server::testing::privileged(
        "on_xfs_snapshots_and_clones_are_reflinks (fs)",
        &["mkfs.ext4", "dumpe2fs"],
    ) {
        let r = c.call(Request::VolumeCreate {
            kind: ferrovol_proto::codec::VOLUME_KIND_FS,
            name: name("f"),
            size: 64 * MIB,
            labels: Labels::new(),
            source: None,
        });
        assert!(r.result.is_ok(), "{r:?}");
        match c.call(Request::Open { name: name("f"), read_only: false, generation: 0 }).result {
            Ok(Reply::Opened { .. }) => {}
            other => panic!("open of the fs volume: {other:?}"),
        }
        let s = snapshot(&mut c, "fs-s", "f").unwrap();
        // Told as a block one's to a client that did not ask for kinds (HELLO features 7)...
        assert!(s.ready && s.kind == ferrovol_proto::codec::VOLUME_KIND_BLOCK, "{s:?}");
        // ...and as it is to one that did.
        let mut kc = RawClient::connect(srv.addr);
        let Request::Hello(mut hello) = hello_request("node-a", "") else { unreachable!() };
        hello.features |= ferrovol_proto::opcode::FEATURE_SNAPSHOT_KIND;
        assert!(kc.call(Request::Hello(hello)).result.is_ok());
        match kc.call(Request::SnapshotStat { name: name("fs-s") }).result {
            Ok(Reply::Snapshot(s)) => assert_eq!(s.kind, ferrovol_proto::codec::VOLUME_KIND_FS, "{s:?}"),
            other => panic!("{other:?}"),
        }
        match kc.call(Request::SnapshotList { source: None, start_after: None, max_entries: 10 }).result {
            Ok(Reply::SnapshotList { entries, .. }) => {
                let kinds: Vec<(&str, u8)> = entries.iter().map(|s| (s.name.as_str(), s.kind)).collect();
                assert_eq!(kinds, [("fs-s", 1), ("s", 0)]);
            }
            other => panic!("{other:?}"),
        }
        let meta = std::fs::read_to_string(data_dir.join("snapshots/fs-s/meta.json")).unwrap();
        assert!(meta.contains("\"method\": \"reflink\"") && meta.contains("\"kind\": \"fs\""), "{meta}");
        let sb =
            run(std::process::Command::new("dumpe2fs").arg("-h").arg(data_dir.join("snapshots/fs-s/data")));
        assert!(sb.contains("Filesystem features:") && !sb.contains("needs_recovery"), "{sb}");
    }
    drop(c);
    drop(srv);
    // The server's mount of the fs volume, should its stop have left it (xfs would stay busy).
    let _ = std::process::Command::new("umount").arg("-l").arg(data_dir.join("volumes/f/mnt")).status();
}
