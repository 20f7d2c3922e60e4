//! The file operations of fs volumes through the raw protocol against the real server binary:
//! the server's own checks (credentials, read-only handles, symlinks, devices and FIFOs, hostile
//! ids), which a FUSE client's kernel would mostly refuse before they reach it, and a real kill -9
//! of the server process. They need root (the server mounts the volume).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::process::Command;

use bytes::Bytes;
use common::*;
use ferrovol_proto::codec::VOLUME_KIND_FS;
use ferrovol_proto::fs::*;
use ferrovol_proto::*;

const ROOT: Creds = Creds { uid: 0, gid: 0, groups: Vec::new() };

fn nobody() -> Creds {
    Creds { uid: 65534, gid: 65534, groups: vec![] }
}

fn fs(c: &mut RawClient, h: VolumeHandle, node: u64, creds: &Creds, op: FsOp) -> Result<FsReply, ErrorReply> {
    match c.call(Request::Fs { handle: h, node, creds: creds.clone(), op }).result {
        Ok(Reply::Fs(r)) => Ok(r),
        Ok(other) => panic!("not an FS reply: {other:?}"),
        Err(e) => Err(e),
    }
}

fn errno(r: Result<FsReply, ErrorReply>) -> u32 {
    match r {
        Err(e) if e.status == Status::Errno => e.errno,
        other => panic!("expected an errno, got {other:?}"),
    }
}

fn n(s: &str) -> FsName {
    FsName::new(Bytes::copy_from_slice(s.as_bytes())).unwrap()
}

fn node_of(r: Result<FsReply, ErrorReply>) -> u64 {
    match r {
        Ok(FsReply::Entry(a)) | Ok(FsReply::Attr(a)) | Ok(FsReply::Created { attr: a, .. }) => a.node,
        other => panic!("expected an entry, got {other:?}"),
    }
}

fn open_fs(c: &mut RawClient, read_only: bool) -> VolumeHandle {
    match c.call(Request::Open { name: name("v"), read_only, generation: 0 }).result {
        Ok(Reply::Opened { handle, .. }) => handle,
        other => panic!("open: {other:?}"),
    }
}

/// Kills the server and unmounts its mount of the volume when the test ends, however it ends.
struct Cleanup(std::path::PathBuf, Option<std::process::Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut s) = self.1.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A server on a data dir of its own with fs volume "v" (64 MiB), and a client that opened it
/// read-write. `None`: the test cannot run here (it said why).
struct FsServer {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    addr: std::net::SocketAddr,
    cleanup: Cleanup,
    c: RawClient,
    h: VolumeHandle,
}

fn fs_server(test: &str) -> Option<FsServer> {
    if !ferrovol_server::testing::privileged(test, &["mkfs.ext4", "losetup"]) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::canonicalize(dir.path()).unwrap().join("data");
    let (server, addr) = spawn_server(&data, "127.0.0.1:0");
    let cleanup = Cleanup(data.join("volumes/v/mnt"), Some(server));
    let mut c = RawClient::hello(addr, "n1", "");
    let r = c.call(Request::VolumeCreate {
        kind: VOLUME_KIND_FS,
        name: name("v"),
        size: 64 << 20,
        labels: Labels::new(),
        source: None,
    });
    assert!(r.result.is_ok(), "{r:?}");
    let h = open_fs(&mut c, false);
    Some(FsServer { _dir: dir, data, addr, cleanup, c, h })
}

#[test]
fn the_server_checks_every_file_operation_itself() {
    let Some(FsServer { _dir, data, addr, mut cleanup, mut c, h }) =
        fs_server("the_server_checks_every_file_operation_itself")
    else {
        return;
    };

    // Credentials: nobody may not write the root-owned 0755 root; root may; an error leaves the
    // worker thread as root again (more rounds than there are workers).
    for i in 0..40 {
        let denied = fs(
            &mut c,
            h,
            NODE_ROOT,
            &nobody(),
            FsOp::Mkdir { name: n(&format!("x{i}")), mode: 0o755, umask: 0 },
        );
        assert_eq!(errno(denied), libc::EACCES as u32);
        let made =
            fs(&mut c, h, NODE_ROOT, &ROOT, FsOp::Mkdir { name: n(&format!("r{i}")), mode: 0o755, umask: 0 });
        assert!(made.is_ok(), "{made:?}");
    }
    let public =
        node_of(fs(&mut c, h, NODE_ROOT, &ROOT, FsOp::Mkdir { name: n("pub"), mode: 0o777, umask: 0 }));
    let created =
        fs(&mut c, h, public, &nobody(), FsOp::Create { name: n("f"), flags: 0o2, mode: 0o644, umask: 0o22 });
    let Ok(FsReply::Created { attr, fh }) = created else { panic!("{created:?}") };
    assert_eq!((attr.uid, attr.gid, attr.mode & 0o7777), (65534, 65534, 0o644));
    // Group membership comes from the request: gid 4242's group-writable directory.
    let grp = node_of(fs(&mut c, h, NODE_ROOT, &ROOT, FsOp::Mkdir { name: n("grp"), mode: 0o775, umask: 0 }));
    let chgrp = SetAttr { valid: SETATTR_GID, gid: 4242, ..SetAttr::default() };
    assert!(fs(&mut c, h, grp, &ROOT, FsOp::Setattr(chgrp)).is_ok());
    let member = Creds { uid: 1000, gid: 1000, groups: vec![4242] };
    assert!(fs(&mut c, h, grp, &member, FsOp::Mkdir { name: n("m"), mode: 0o755, umask: 0 }).is_ok());
    let outsider = Creds { uid: 1000, gid: 1000, groups: vec![] };
    assert_eq!(
        errno(fs(&mut c, h, grp, &outsider, FsOp::Mkdir { name: n("o"), mode: 0o755, umask: 0 })),
        libc::EACCES as u32
    );

    // A write by a caller without CAP_FSETID drops set-user-ID, set-group-ID (without group
    // execute too, unless the writer is in the group: Linux 6.2+) and file capabilities, as a
    // local write would, on its own files (where the server may write as root) and others'.
    // vfs_cap_data revision 2: CAP_NET_BIND_SERVICE permitted.
    let cap = Bytes::from_static(&[0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let capname = Bytes::from_static(b"security.capability");
    for (name, owner, group_root, mode, xattr, kept) in [
        ("suid", nobody(), false, 0o4777, false, 0o777),
        ("sgid", nobody(), false, 0o2777, false, 0o777),
        ("sgid-noexec-member", nobody(), false, 0o2767, false, 0o2767),
        // The writer's own file, in a group it is not in.
        ("sgid-noexec-own", nobody(), true, 0o2767, false, 0o767),
        ("sgid-noexec-other", ROOT, false, 0o2767, false, 0o767),
        ("suid-other", ROOT, false, 0o4777, false, 0o777),
        ("capable", nobody(), false, 0o777, true, 0o777),
        ("plain", nobody(), false, 0o777, false, 0o777),
    ] {
        let create = FsOp::Create { name: n(name), flags: 0o1, mode: 0o777, umask: 0 };
        let created = fs(&mut c, h, public, &owner, create);
        let Ok(FsReply::Created { attr: f, fh: cfh }) = created else { panic!("{created:?}") };
        assert!(fs(&mut c, h, f.node, &owner, FsOp::Release { fh: cfh }).is_ok());
        let chmod = SetAttr { valid: SETATTR_MODE, mode, ..SetAttr::default() };
        if group_root {
            let chgrp = SetAttr { valid: SETATTR_GID, gid: 0, ..SetAttr::default() };
            assert!(fs(&mut c, h, f.node, &ROOT, FsOp::Setattr(chgrp)).is_ok(), "{name}");
        }
        let chmoder = if group_root { &ROOT } else { &owner };
        assert!(fs(&mut c, h, f.node, chmoder, FsOp::Setattr(chmod)).is_ok(), "{name}");
        if xattr {
            let set = FsOp::Setxattr { name: capname.clone(), value: cap.clone(), flags: 0 };
            assert!(fs(&mut c, h, f.node, &ROOT, set).is_ok());
        }
        let Ok(FsReply::Attr(a)) = fs(&mut c, h, f.node, &ROOT, FsOp::Getattr) else { panic!("{name}") };
        assert_eq!(a.mode & 0o7777, mode, "{name}: mode before the write");
        let opened = fs(&mut c, h, f.node, &nobody(), FsOp::Open { flags: 0o1 });
        let Ok(FsReply::Opened { fh: wfh, .. }) = opened else { panic!("{name}: {opened:?}") };
        let write = FsOp::Write { fh: wfh, flags: 0o1, offset: 0, data: Bytes::from_static(b"x") };
        assert_eq!(fs(&mut c, h, f.node, &nobody(), write).unwrap(), FsReply::Written(1), "{name}");
        let Ok(FsReply::Attr(a)) = fs(&mut c, h, f.node, &ROOT, FsOp::Getattr) else { panic!("{name}") };
        assert_eq!((a.mode & 0o7777, a.size), (kept, 1), "{name}: mode after a write by nobody");
        let got = fs(&mut c, h, f.node, &ROOT, FsOp::Getxattr { name: capname.clone() });
        assert_eq!(errno(got), libc::ENODATA as u32, "{name}: file capabilities kept after a write");
        assert!(fs(&mut c, h, f.node, &ROOT, FsOp::Release { fh: wfh }).is_ok());
    }

    // A symlink is never followed on the server: not by CREATE, not out of the volume.
    for target in ["/etc/passwd", "../../../../../../etc/passwd"] {
        let made = fs(
            &mut c,
            h,
            NODE_ROOT,
            &ROOT,
            FsOp::Symlink { name: n("esc"), target: Bytes::copy_from_slice(target.as_bytes()) },
        );
        assert!(made.is_ok(), "{made:?}");
        let e = errno(fs(
            &mut c,
            h,
            NODE_ROOT,
            &ROOT,
            FsOp::Create { name: n("esc"), flags: 0o1, mode: 0o644, umask: 0 },
        ));
        assert!(e == libc::ELOOP as u32 || e == libc::EEXIST as u32, "create through a symlink: errno {e}");
        assert!(fs(&mut c, h, NODE_ROOT, &ROOT, FsOp::Unlink { name: n("esc") }).is_ok());
    }

    // Devices and FIFOs may be made (the client's kernel opens them locally) but the server opens
    // none of them, and a FIFO never blocks a worker.
    let dev = node_of(fs(
        &mut c,
        h,
        NODE_ROOT,
        &ROOT,
        FsOp::Mknod { name: n("null"), mode: libc::S_IFCHR | 0o666, umask: 0, rdev: (1 << 8) | 3 },
    ));
    let fifo = node_of(fs(
        &mut c,
        h,
        NODE_ROOT,
        &ROOT,
        FsOp::Mknod { name: n("fifo"), mode: libc::S_IFIFO | 0o666, umask: 0, rdev: 0 },
    ));
    for node in [dev, fifo] {
        assert_eq!(errno(fs(&mut c, h, node, &ROOT, FsOp::Open { flags: 0o2 })), libc::ENXIO as u32);
        // The reopen path (an fh the server does not know) refuses it too.
        let read = FsOp::Read { fh: 0xdead_beef, flags: 0, offset: 0, len: 16 };
        assert_eq!(errno(fs(&mut c, h, node, &ROOT, read)), libc::ENXIO as u32);
        let lock = Lock { owner: 1, start: 0, end: u64::MAX, kind: LOCK_WRITE, pid: 1 };
        assert_eq!(errno(fs(&mut c, h, node, &ROOT, FsOp::Setlk { lock })), libc::EINVAL as u32);
    }

    // Hostile ids: uid -1 would mean "unchanged" (root) to setfsuid.
    let bad = Creds { uid: u32::MAX, gid: 0, groups: vec![] };
    let r = c.call(Request::Fs { handle: h, node: NODE_ROOT, creds: bad, op: FsOp::Getattr });
    assert_eq!(status(&r), Status::BadRequest);

    // A read-only handle refuses every change with EROFS, whatever the caller.
    let ro = open_fs(&mut c, true);
    let changes = [
        FsOp::Mkdir { name: n("ro"), mode: 0o755, umask: 0 },
        FsOp::Create { name: n("ro"), flags: 0o1, mode: 0o644, umask: 0 },
        FsOp::Unlink { name: n("pub") },
        FsOp::Rmdir { name: n("r0") },
        FsOp::Setattr(SetAttr { valid: SETATTR_MODE, mode: 0o700, ..SetAttr::default() }),
        FsOp::Open { flags: 0o2 },
        FsOp::Rename { name: n("r1"), new_parent: NODE_ROOT, new_name: n("r2"), flags: 0 },
        FsOp::Symlink { name: n("s"), target: Bytes::from_static(b"t") },
    ];
    for op in changes {
        assert_eq!(errno(fs(&mut c, ro, NODE_ROOT, &ROOT, op.clone())), libc::EROFS as u32, "{op:?}");
    }
    let write = FsOp::Write { fh, flags: 0o2, offset: 0, data: Bytes::from_static(b"no") };
    assert_eq!(errno(fs(&mut c, ro, attr.node, &ROOT, write)), libc::EROFS as u32);

    // Data through the open file, then a real kill -9 of the server process: the restarted server
    // takes over the mount the kernel kept (one loop device, not two) and the old fh still works.
    let write = FsOp::Write { fh, flags: 0o2, offset: 0, data: Bytes::from_static(b"before the crash") };
    assert_eq!(fs(&mut c, h, attr.node, &ROOT, write).unwrap(), FsReply::Written(16));
    assert!(fs(&mut c, h, attr.node, &ROOT, FsOp::Fsync { fh, flags: 0o2, datasync: false }).is_ok());
    // A read-only open of a small file brings the whole file with it, to a client that asked for
    // that in HELLO; one for writing, of a file over 16 KiB, or to a client that did not, does not.
    let mut ic = RawClient::connect(addr);
    let Request::Hello(mut hello) = hello_request("n1", "") else { unreachable!() };
    hello.features |= ferrovol_proto::opcode::FEATURE_FS_OPEN_INLINE;
    assert!(ic.call(Request::Hello(hello)).result.is_ok());
    let ih = open_fs(&mut ic, false);
    let o_direct = libc::O_DIRECT as u32;
    for (inl, flags, size, inline) in [(true, 0, 16, true), (false, 0, 16, false), (true, 0o2, 16, false)]
        .into_iter()
        .chain([(true, o_direct, 16, false), (true, 0, FS_OPEN_INLINE_MAX as u64, true)])
        .chain([(true, 0, FS_OPEN_INLINE_MAX as u64 + 1, false)])
    {
        let grow = FsOp::Setattr(SetAttr { valid: SETATTR_SIZE, size, ..SetAttr::default() });
        assert!(fs(&mut c, h, attr.node, &ROOT, grow).is_ok());
        let (c, h) = if inl { (&mut ic, ih) } else { (&mut c, h) };
        let opened = fs(c, h, attr.node, &ROOT, FsOp::Open { flags });
        let Ok(FsReply::Opened { attr: a, fh: o, data }) = opened else { panic!("{opened:?}") };
        assert_eq!(a.size, size);
        let mut want = b"before the crash".to_vec();
        want.resize(size as usize, 0);
        if inline {
            assert_eq!(data, want, "flags {flags:o}, {size} bytes");
        } else {
            assert!(data.is_empty(), "flags {flags:o}, {size} bytes: {} bytes inline", data.len());
        }
        assert!(fs(c, h, attr.node, &ROOT, FsOp::Release { fh: o }).is_ok());
    }
    drop(ic);
    let shrink = FsOp::Setattr(SetAttr { valid: SETATTR_SIZE, size: 16, ..SetAttr::default() });
    assert!(fs(&mut c, h, attr.node, &ROOT, shrink).is_ok());
    let mut server = cleanup.1.take().unwrap();
    server.kill().unwrap();
    server.wait().unwrap();
    let (server, addr) = spawn_server(&data, &addr.to_string());
    cleanup.1 = Some(server);
    let mut c = RawClient::hello(addr, "n1", "");
    let h = open_fs(&mut c, false);
    let loops = Command::new("losetup").arg("-j").arg(data.join("volumes/v/data")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&loops.stdout).lines().count(), 1, "{loops:?}");
    let read = FsOp::Read { fh, flags: 0o2, offset: 0, len: 64 };
    assert_eq!(
        fs(&mut c, h, attr.node, &ROOT, read).unwrap(),
        FsReply::Data(Bytes::from_static(b"before the crash"))
    );
    drop(cleanup);
}

/// File workers serve every client: a peer that sends reads and never reads the replies must not
/// hold them. With the worker blocked on writing that peer's reply (the first cut of "workers
/// write their own replies"), every worker ends up waiting on it and another client's GETATTR
/// never comes back (the raw client's 10 s read timeout fails the test).
#[test]
fn a_peer_that_stops_reading_holds_no_file_worker() {
    let Some(FsServer { _dir, addr, cleanup: _cleanup, mut c, h, .. }) =
        fs_server("a_peer_that_stops_reading_holds_no_file_worker")
    else {
        return;
    };
    let created =
        fs(&mut c, h, NODE_ROOT, &ROOT, FsOp::Create { name: n("big"), flags: 0o2, mode: 0o644, umask: 0 });
    let Ok(FsReply::Created { attr, fh }) = created else { panic!("{created:?}") };
    const MIB: u32 = 1 << 20;
    let write = FsOp::Write { fh, flags: 0o2, offset: 0, data: Bytes::from(pattern(7, MIB as usize)) };
    assert_eq!(fs(&mut c, h, attr.node, &ROOT, write).unwrap(), FsReply::Written(MIB));

    // 200 reads of 1 MiB, none of whose replies is read (far more than the socket buffers hold,
    // and than there are workers).
    const READS: usize = 200;
    for _ in 0..READS {
        let op = FsOp::Read { fh, flags: 0o2, offset: 0, len: MIB };
        c.send(&Request::Fs { handle: h, node: attr.node, creds: ROOT.clone(), op });
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut other = RawClient::hello(addr, "n2", "");
    let h2 = open_fs(&mut other, true);
    for _ in 0..40 {
        let r = fs(&mut other, h2, NODE_ROOT, &ROOT, FsOp::Getattr);
        assert!(matches!(r, Ok(FsReply::Attr(_))), "{r:?}");
    }
    // The stalled peer still gets every reply, whole, once it reads.
    for _ in 0..READS {
        let r = c.recv().expect("a reply");
        assert!(matches!(&r.result, Ok(Reply::Fs(FsReply::Data(d))) if d.len() == MIB as usize), "{r:?}");
    }
}
