//! Our own FUSE session for the block file, through the real kernel (root and /dev/fuse; without
//! them FERROVOL-SKIPPED, a failure under CI): it mounts and serves; and a worker that took requests
//! and stopped without answering is replaced by a new one on a held duplicate of the fd, without a
//! new INIT, and NOTIFY_RESEND makes the kernel hand it the lost requests: the application's
//! I/O completes as if nothing happened.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferrovol_client::fuse::abi::{self, Op, Request};
use ferrovol_client::fuse::kernel::{self, Channel, Handler};
use ferrovol_client::fuse::OwnBlockFile;
use ferrovol_client::{ConnectOptions, Session};
use ferrovol_proto::{NodeId, VolumeName};
use ferrovol_server::testing::{privileged, TestServer};

/// A worker that dies: it takes the first `lose` READ or WRITE requests and never answers them,
/// then stops reading (its thread exits; the fd stays open in the test, as a holder would keep it).
struct Dying {
    inner: OwnBlockFile,
    lost: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    lose: u32,
}

impl Handler for Dying {
    fn handle(&self, req: Request, ch: &Channel) {
        match req.op {
            Op::Read { .. } | Op::Write { .. } => {
                if self.lost.fetch_add(1, Ordering::AcqRel) + 1 >= self.lose {
                    self.stop.store(true, Ordering::Release);
                }
            }
            _ => self.inner.handle(req, ch),
        }
    }
}

/// The FUSE connection number of the mount at `path` (the minor of its device).
fn connection_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    libc::minor(std::fs::metadata(path).unwrap().dev())
}

/// Aborts FUSE connection `n` (fusectl, mounted here if it is not yet), failing every request.
fn abort_connection(n: u32) {
    let dir = std::path::Path::new("/sys/fs/fuse/connections");
    if !dir.join(n.to_string()).exists() {
        let _ = std::process::Command::new("mount").args(["-t", "fusectl", "none"]).arg(dir).status();
    }
    let _ = std::fs::write(dir.join(n.to_string()).join("abort"), b"1");
}

/// The new worker: serves everything, and counts the requests the kernel marked as resent.
struct Counting {
    inner: OwnBlockFile,
    resent: Arc<AtomicU32>,
}

impl Handler for Counting {
    fn handle(&self, req: Request, ch: &Channel) {
        if req.header.unique & abi::FUSE_UNIQUE_RESEND != 0 {
            self.resent.fetch_add(1, Ordering::AcqRel);
        }
        self.inner.handle(req, ch);
    }
}

#[test]
fn a_new_worker_resumes_the_connection_and_gets_the_lost_requests_again() {
    if !privileged("a_new_worker_resumes_the_connection_and_gets_the_lost_requests_again", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_token(&dir.path().join("data"), "127.0.0.1:0", None);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let name = VolumeName::try_from("v").unwrap();
    let vol = rt.block_on(async {
        let opts = ConnectOptions { node_id: NodeId::try_from("n").unwrap(), ..ConnectOptions::default() };
        let s = Session::connect(&server.addr.to_string(), opts).await.unwrap();
        s.create_volume(&name, 16 << 20).await.unwrap();
        let g = s.attach_writer(&name, false).await.unwrap();
        s.open_writer(&name, g).await.unwrap()
    });
    let file = dir.path().join("img");
    std::fs::write(&file, b"").unwrap();

    let fd = kernel::mount(&file, "ferrovol:v", false, true).unwrap();
    let want = abi::FUSE_ASYNC_READ | abi::FUSE_BIG_WRITES | abi::FUSE_ASYNC_DIO | abi::FUSE_MAX_PAGES;
    let negotiated =
        kernel::handshake(&fd, want | abi::FUSE_INIT_EXT | abi::FUSE_HAS_RESEND, 1 << 20, 16).unwrap();
    assert_ne!(negotiated.flags & abi::FUSE_HAS_RESEND, 0, "this kernel (6.18) offers FUSE_HAS_RESEND");
    // The holder's duplicate: the same open file, so requests read through `fd` stay queued on it.
    let held = fd.try_clone().unwrap();

    // The first worker serves the open, then takes the write and dies without answering it.
    let stop = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicU32::new(0));
    let dying = Arc::new(Dying {
        inner: OwnBlockFile::new(vol.clone(), rt.handle().clone(), false),
        lost: lost.clone(),
        stop: stop.clone(),
        lose: 1,
    });
    let first = {
        let (n, stop) = (negotiated, stop.clone());
        std::thread::spawn(move || kernel::run(vec![fd], &n, dying, false, &stop))
    };
    let conn = connection_of(&file); // a GETATTR, which the first worker answers
    let app = {
        let file = file.clone();
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&file)
                .unwrap();
            // O_DIRECT needs aligned buffers.
            let mut buf = vec![0u8; 8192];
            let off = buf.as_ptr().align_offset(4096);
            let block = &mut buf[off..off + 4096];
            block.fill(0x5a);
            f.write_all_at(block, 4096).unwrap();
            block.fill(0);
            f.read_exact_at(block, 4096).unwrap();
            block.to_vec()
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !first.is_finished() {
        if std::time::Instant::now() > deadline {
            abort_connection(conn);
            panic!("the application's write never reached the first worker");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    first.join().unwrap().unwrap();
    assert_eq!(lost.load(Ordering::Acquire), 1, "the first worker took the write and stopped");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!app.is_finished(), "the application waits for its write: the request is only lost, not failed");

    // A new worker on the held fd: no INIT, a resend, and the application's I/O completes.
    let resent = Arc::new(AtomicU32::new(0));
    let second = {
        let h = Arc::new(Counting {
            inner: OwnBlockFile::new(vol, rt.handle().clone(), false),
            resent: resent.clone(),
        });
        std::thread::spawn(move || kernel::run(vec![held], &negotiated, h, true, &Arc::default()))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !app.is_finished() {
        if second.is_finished() || std::time::Instant::now() > deadline {
            // Abort the connection so the application (and this test) are not left hanging.
            abort_connection(conn);
            let _ = std::process::Command::new("umount").arg("-l").arg(&file).status();
            panic!("the lost write was not served again after the resume ({:?})", second.is_finished());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let got = app.join().unwrap();
    assert!(got.iter().all(|b| *b == 0x5a), "the resent write landed and the read sees it");
    assert_eq!(resent.load(Ordering::Acquire), 1, "the kernel marked the lost write as resent");
    kernel::unmount(&file).unwrap();
    second.join().unwrap().unwrap();
}

#[test]
fn own_session_serves_a_volume_end_to_end() {
    if !privileged("own_session_serves_a_volume_end_to_end", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with_token(&dir.path().join("data"), "127.0.0.1:0", None);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let name = VolumeName::try_from("e").unwrap();
    let vol = rt.block_on(async {
        let opts = ConnectOptions { node_id: NodeId::try_from("n").unwrap(), ..ConnectOptions::default() };
        let s = Session::connect(&server.addr.to_string(), opts).await.unwrap();
        s.create_volume(&name, 8 << 20).await.unwrap();
        let g = s.attach_writer(&name, false).await.unwrap();
        s.open_writer(&name, g).await.unwrap()
    });
    let file = dir.path().join("img");
    std::fs::write(&file, b"").unwrap();
    let fd = kernel::mount(&file, "ferrovol:e", false, true).unwrap();
    let n = kernel::handshake(
        &fd,
        abi::FUSE_ASYNC_READ | abi::FUSE_MAX_PAGES | abi::FUSE_BIG_WRITES,
        1 << 20,
        16,
    )
    .unwrap();
    assert_eq!(n.max_write, 1 << 20);
    let clone = kernel::clone_fd(&fd).unwrap();
    let h = Arc::new(OwnBlockFile::new(vol, rt.handle().clone(), false));
    let worker = std::thread::spawn(move || kernel::run(vec![fd, clone], &n, h, false, &Arc::default()));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), 8 << 20, "the file is the volume");
    let data: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
    {
        let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(&data, 12345).unwrap();
        f.sync_all().unwrap();
    }
    let mut back = vec![0u8; data.len()];
    std::fs::File::open(&file).unwrap().read_exact_at(&mut back, 12345).unwrap();
    assert!(back == data, "data read back differs");
    // Writes past the end are refused; truncate cannot change the volume's size.
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    assert!(f.write_all_at(b"x", 8 << 20).is_err());
    assert_eq!(f.set_len(4096).unwrap_err().raw_os_error(), Some(libc::EPERM));
    drop(f);
    kernel::unmount(&file).unwrap();
    worker.join().unwrap().unwrap();
}
