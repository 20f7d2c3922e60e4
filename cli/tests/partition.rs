//! Silent network partitions, for real: the server runs in a network namespace of its own behind a
//! veth pair, and nftables drops every packet both ways (this kernel has no netem). Through the
//! real path (FUSE file, loop device, ext4):
//! - a 27 s partition with `--io-timeout-s 30` under ext4 writes + fsync: no EIO, ext4 stays
//!   read-write, and the writes resume within 5 s of the heal;
//! - a 60 s partition: I/O fails with EIO only after the timeout, and a request issued after the
//!   heal succeeds within 5 s.
//!
//! Needs root, /dev/fuse, `ip` and `nft`: FERROVOL-SKIPPED otherwise (a failure under CI).
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrovol_client::host;
use ferrovol_server::testing::privileged;

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A network namespace holding the server, a veth pair to it, and an nftables table that can cut
/// it off silently. Everything is removed on drop.
struct Net {
    ns: String,
    host_if: String,
    table: String,
    server_ip: String,
}

impl Net {
    fn new() -> Net {
        let id = std::process::id() % 10_000;
        let net = Net {
            ns: format!("fvp{id}"),
            host_if: format!("fvh{id}"),
            table: format!("fvp{id}"),
            server_ip: format!("10.213.{}.2", id % 250),
        };
        let peer = format!("fvn{id}");
        let host_ip = format!("10.213.{}.1/30", id % 250);
        let ns_ip = format!("{}/30", net.server_ip);
        let _ = Command::new("ip").args(["netns", "del", &net.ns]).output();
        sh(&["ip", "netns", "add", &net.ns]);
        sh(&["ip", "link", "add", &net.host_if, "type", "veth", "peer", "name", &peer]);
        sh(&["ip", "link", "set", &peer, "netns", &net.ns]);
        sh(&["ip", "addr", "add", &host_ip, "dev", &net.host_if]);
        sh(&["ip", "link", "set", &net.host_if, "up"]);
        sh(&["ip", "netns", "exec", &net.ns, "ip", "addr", "add", &ns_ip, "dev", &peer]);
        sh(&["ip", "netns", "exec", &net.ns, "ip", "link", "set", &peer, "up"]);
        sh(&["ip", "netns", "exec", &net.ns, "ip", "link", "set", "lo", "up"]);
        net
    }

    /// Drops everything to and from the server, without a reset or an ICMP error.
    fn cut(&self) {
        let rules = format!(
            "table inet {t} {{\n chain in {{ type filter hook input priority -10; iifname \"{i}\" drop; }}\n \
             chain out {{ type filter hook output priority -10; oifname \"{i}\" drop; }}\n}}\n",
            t = self.table,
            i = self.host_if
        );
        let mut nft = Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft");
    }

    fn heal(&self) {
        sh(&["nft", "delete", "table", "inet", &self.table]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).output();
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A server inside the namespace: its thread joins the namespace before it builds its runtime, so
/// the listening socket (and every thread the server starts) lives there.
fn server_in(net: &Net, data: &Path) -> String {
    let (ns, ip, data) = (net.ns.clone(), net.server_ip.clone(), data.to_owned());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
        // SAFETY: setns with an fd of a network namespace; it changes only this thread.
        assert_eq!(unsafe { libc::setns(std::os::unix::io::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async {
            let config = ferrovol_server::ServerConfig::new(&data, format!("{ip}:0").parse().unwrap());
            let server = ferrovol_server::Server::bind(config).await.unwrap();
            tx.send(server.local_addr().unwrap().to_string()).unwrap();
            server.run(std::future::pending()).await.unwrap();
        });
    });
    rx.recv().unwrap()
}

fn ferrovol(server: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(["--server", server, "--io-timeout-s", "30"])
        .args(args)
        .env("FERROVOL_NODE_ID", "partitioned")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmounts what the test mounted, whatever happened.
struct Cleanup(Vec<PathBuf>, Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(p).output();
        }
        for d in &self.1 {
            let _ = Command::new("losetup").args(["-d", d]).output();
        }
    }
}

/// When a create + write + fsync finished, and how.
type Completion = (Instant, Result<(), String>);

fn is_rw(mount: &Path) -> bool {
    host::mount_at(mount).is_some_and(|m| m.options.iter().any(|o| o == "rw"))
}

#[test]
fn silent_partitions_are_ridden_out_and_recovered_from_quickly() {
    if !privileged(
        "silent_partitions_are_ridden_out_and_recovered_from_quickly",
        &["ip", "nft", "losetup", "mkfs.ext4"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let net = Net::new();
    let addr = server_in(&net, &dir.path().join("data"));
    let mut cleanup = Cleanup(vec![], vec![]);
    ok(&ferrovol(&addr, &["volume", "create", "fs", "--size", "128MiB"]));
    ok(&ferrovol(&addr, &["volume", "create", "raw", "--size", "16MiB"]));

    // Phase 1: ext4 over the FUSE file, a writer doing create + write + fsync in a loop.
    let img = dir.path().join("fs.img");
    std::fs::write(&img, b"").unwrap();
    ok(&ferrovol(&addr, &["attach", "fs", img.to_str().unwrap(), "--background"]));
    cleanup.0.push(img.clone());
    let dev = host::loop_attach(&img, false).unwrap();
    cleanup.1.push(dev.clone());
    host::run(Command::new("mkfs.ext4").args(["-q", &dev])).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    host::run(Command::new("mount").arg(&dev).arg(&mnt)).unwrap();
    cleanup.0.push(mnt.clone());

    let stop = Arc::new(AtomicBool::new(false));
    let done: Arc<Mutex<Vec<Completion>>> = Arc::default();
    let writer = {
        let (stop, done, mnt) = (stop.clone(), done.clone(), mnt.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = (|| -> std::io::Result<()> {
                    let mut f = std::fs::File::create(mnt.join(format!("f{}", i % 500)))?;
                    f.write_all(&[i as u8; 4096])?;
                    f.sync_all()
                })();
                done.lock().unwrap().push((Instant::now(), r.map_err(|e| e.to_string())));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    net.cut();
    let cut_at = Instant::now();
    std::thread::sleep(Duration::from_secs(27));
    net.heal();
    let healed = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    let done = done.lock().unwrap();
    let errors: Vec<_> = done.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(errors.is_empty(), "writes failed across a 27 s partition: {errors:?}");
    assert!(is_rw(&mnt), "ext4 went read-only");
    let during = done.iter().filter(|(t, _)| *t > cut_at + Duration::from_secs(1) && *t < healed).count();
    assert!(
        during <= 1,
        "{during} fsyncs completed while the server was cut off: the partition did not hold"
    );
    let first_after = done.iter().find(|(t, _)| *t >= healed).map(|(t, _)| *t - healed);
    println!("27 s partition: {} fsyncs, first completion {first_after:?} after the heal", done.len());
    assert!(
        first_after.is_some_and(|d| d < Duration::from_secs(5)),
        "writes resumed {first_after:?} after the heal"
    );
    drop(done);
    host::run(Command::new("umount").arg(&mnt)).unwrap();
    cleanup.0.pop();
    host::loop_release(&dev).unwrap();
    cleanup.1.pop();

    // Phase 2: 60 s, on a raw FUSE file with direct I/O: EIO after the timeout (not before, not
    // twice as late), and a request issued after the heal succeeds within 5 s.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, b"").unwrap();
    ok(&ferrovol(&addr, &["attach", "raw", raw.to_str().unwrap(), "--background"]));
    cleanup.0.push(raw.clone());
    let file =
        std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&raw).unwrap();
    let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
    // SAFETY: a non-zero size with a valid alignment; freed below.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    // SAFETY: ptr is a live allocation of 4096 bytes, used only in this test.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, 4096) };
    file.write_all_at(buf, 0).unwrap();
    net.cut();
    let cut_at = Instant::now();
    let e = file.write_all_at(buf, 4096).unwrap_err();
    let failed_after = cut_at.elapsed();
    println!("60 s partition: the write failed with {e} after {failed_after:?}");
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        failed_after >= Duration::from_secs(29) && failed_after < Duration::from_secs(36),
        "EIO after {failed_after:?}, not after the 30 s timeout"
    );
    std::thread::sleep(Duration::from_secs(60).saturating_sub(cut_at.elapsed()));
    net.heal();
    let healed = Instant::now();
    file.write_all_at(buf, 8192).unwrap();
    let took = healed.elapsed();
    println!("60 s partition: a write issued at the heal took {took:?}");
    assert!(took < Duration::from_secs(5), "I/O resumed {took:?} after the heal");
    file.read_exact_at(buf, 0).unwrap();
    drop(file);
    // SAFETY: allocated above with this layout.
    unsafe { std::alloc::dealloc(ptr, layout) };
    ok(&ferrovol(&addr, &["detach", raw.to_str().unwrap()]));
    cleanup.0.pop();
}
