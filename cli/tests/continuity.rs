//! Continuity of a mounted block volume through the real kernel path (root, /dev/fuse, fio; without
//! them FERROVOL-SKIPPED, a failure under CI): `ferrovol attach` serves the mount with two processes,
//! a holder and a worker (client/src/fuse/supervise.rs), and either can be killed with SIGKILL at
//! any moment while fio writes and verifies: the application sees no error and no lost write.
//!
//! Rounds are bounded for CI (`FERROVOL_KILL_ROUNDS`, default 20); benches/scripts/continuity.py
//! runs longer and reports the stalls.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{read_direct, TestServer};
use ferrovol_client::host::Serving;
use ferrovol_server::testing::privileged;

fn ferrovol(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrovol"))
        .args(args)
        .env("FERROVOL_SERVER", server)
        .env("FERROVOL_NODE_ID", "cont-node")
        .env("FERROVOL_TOKEN", "tok")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kill9(pid: u32) {
    // SAFETY: kill(2) with a pid and a signal.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0, "kill {pid}");
}

fn rounds() -> u32 {
    std::env::var("FERROVOL_KILL_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

/// A small xorshift: random moments without a dependency.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
        Self(u64::from(t.subsec_nanos()) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The mount's serving record, as `ferrovol status --json` shows it.
fn serving(server: &str, img: &Path) -> Option<Serving> {
    let all: Vec<Serving> = serde_json::from_str(&ok(&ferrovol(server, &["status", "--json"]))).unwrap();
    let img = std::fs::canonicalize(img).unwrap_or_else(|_| img.to_owned());
    all.into_iter().find(|s| s.path == img)
}

fn alive(pid: u32) -> bool {
    // A zombie (dead, not yet reaped) is not alive.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

/// Waits until the mount has a live worker other than `old`, and returns it.
fn next_worker(server: &str, img: &Path, old: Option<u32>) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(w) = serving(server, img).and_then(|s| s.worker) {
            if Some(w) != old && alive(w) {
                return w;
            }
        }
        assert!(Instant::now() < deadline, "no new worker for {} within 20 s", img.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the mount has a live holder other than `old`, and returns it.
fn next_holder(server: &str, img: &Path, old: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = serving(server, img) {
            if s.holder != old && alive(s.holder) {
                return s.holder;
            }
        }
        assert!(Instant::now() < deadline, "no new holder for {} within 20 s", img.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// fio with `--verify=crc32c` over the first `size` of `file`: 4 KiB random writes at queue depth
/// 16, direct, then every block read back and checked. A distinct seed per run, so a write lost in
/// one run cannot be hidden by the same bytes from an earlier one.
fn fio(file: &Path, size: &str, seed: u64, extra: &[&str]) -> Child {
    Command::new("fio")
        .args(["--name=cont", "--direct=1", "--ioengine=libaio", "--iodepth=16", "--rw=randwrite", "--bs=4k"])
        .args(["--verify=crc32c", "--verify_state_save=0", "--output-format=json"])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .arg(format!("--randseed={seed}"))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits for fio and asserts it saw no error: exit 0, and error 0 in its report. Returns the
/// longest write completion it saw (the stall a kill caused).
fn fio_done(mut child: Child, what: &str) -> Duration {
    // A request lost for good would hang fio: a bounded wait turns that into a failure.
    let deadline = Instant::now() + Duration::from_secs(300);
    while running(&mut child) {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: fio still running after 300 s (a request never answered?)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // The JSON report, after any lines fio printed before it (verify errors go there).
    let report: serde_json::Value =
        stdout.find('{').and_then(|i| serde_json::from_str(&stdout[i..]).ok()).unwrap_or_default();
    let job = &report["jobs"][0];
    assert!(
        out.status.success(),
        "{what}: fio failed ({}): error {} {}; stderr: {stderr}; stdout before the report: {}",
        out.status,
        job["error"],
        job["desc"],
        &stdout[..stdout.find('{').unwrap_or(stdout.len())]
    );
    assert_eq!(job["error"], 0, "{what}: fio reported an error: {stderr}");
    assert!(!stderr.contains("verify"), "{what}: {stderr}");
    Duration::from_nanos(job["write"]["clat_ns"]["max"].as_u64().unwrap_or(0))
}

fn running(child: &mut Child) -> bool {
    child.try_wait().unwrap().is_none()
}

struct Attached {
    server: String,
    img: PathBuf,
    /// The log of its processes (`attach --background` names it).
    log: Option<PathBuf>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the holder and the workers said, for the failure's diagnosis.
            if let Some(log) = self.log.as_ref().and_then(|l| std::fs::read_to_string(l).ok()) {
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- attach log (last 40 lines) ---");
                tail.iter().rev().for_each(|l| eprintln!("{l}"));
            }
        }
        if ferrovol_client::host::mount_at(&self.img).is_some() {
            let out = ferrovol(&self.server, &["detach", self.img.to_str().unwrap()]);
            if !out.status.success() {
                // Still busy (a test that failed mid-way): detach it from the tree; its processes
                // exit once the last user lets go.
                let _ = Command::new("umount").arg("-l").arg(&self.img).status();
            }
        }
    }
}

fn attach(server: &str, dir: &Path, vol: &str, size: &str) -> Attached {
    attach_with(server, dir, vol, size, &[])
}

/// With `global` flags before the subcommand (`--io-timeout-s 2`).
fn attach_with(server: &str, dir: &Path, vol: &str, size: &str, global: &[&str]) -> Attached {
    ok(&ferrovol(server, &["volume", "create", vol, "--size", size]));
    let img = dir.join(format!("{vol}.img"));
    std::fs::write(&img, b"").unwrap();
    let mut args = global.to_vec();
    args.extend(["attach", vol, img.to_str().unwrap(), "--background"]);
    let out = ok(&ferrovol(server, &args));
    let log = out.split(", log ").nth(1).and_then(|s| s.split(')').next()).map(PathBuf::from);
    Attached { server: server.to_owned(), img, log }
}

/// Kills the mount's worker `rounds` times at random moments while fio writes and verifies
/// (starting a new fio run, with a new seed, whenever one finishes), then checks every run.
/// `target` is what fio writes to (the FUSE file, or a file on the filesystem above it).
fn kill_workers_under(server: &str, img: &Path, target: &Path, size: &str, extra: &[&str], kills: u32) {
    let mut rng = Rng::new();
    let mut worker = next_worker(server, img, None);
    let (mut done, mut seed, mut stalls) = (0, 1, Vec::new());
    while done < kills {
        let mut job = fio(target, size, seed, extra);
        while done < kills && running(&mut job) {
            std::thread::sleep(Duration::from_millis(20 + rng.below(280)));
            if !running(&mut job) {
                break;
            }
            kill9(worker);
            done += 1;
            worker = next_worker(server, img, Some(worker));
        }
        stalls.push(fio_done(job, &format!("fio run {seed} (after {done} kills)")));
        seed += 1;
    }
    // One more full run on the last worker: the volume is still right.
    stalls.push(fio_done(fio(target, size, seed, extra), "the last fio run"));
    let s = serving(server, img).unwrap();
    assert!(s.restarts >= kills, "{} restarts recorded, {kills} kills", s.restarts);
    stalls.sort();
    eprintln!(
        "{kills} worker kills over {} fio runs: longest write {:?}, median run's longest {:?}",
        stalls.len(),
        stalls[stalls.len() - 1],
        stalls[stalls.len() / 2]
    );
}

#[test]
fn the_worker_and_the_holder_die_under_fio_and_nothing_is_lost() {
    if !privileged("the_worker_and_the_holder_die_under_fio_and_nothing_is_lost", &["fio"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let addr = server.addr.to_string();
    let a = attach(&addr, dir.path(), "cont", "128MiB");

    // 1. The worker, killed at random moments.
    kill_workers_under(&addr, &a.img, &a.img, "48M", &[], rounds());

    // 2. The holder, then the worker it left (now watched by the new holder it started), and
    //    again: each fio run (a new seed each) goes on without an error.
    let mut under_load = 0;
    for round in 0..3 {
        let mut job = fio(&a.img, "48M", 100 + round, &[]);
        std::thread::sleep(Duration::from_millis(100));
        let s = serving(&addr, &a.img).unwrap();
        kill9(s.holder);
        let holder = next_holder(&addr, &a.img, s.holder);
        std::thread::sleep(Duration::from_millis(100));
        let worker = s.worker.unwrap();
        kill9(worker);
        next_worker(&addr, &a.img, Some(worker));
        under_load += u32::from(running(&mut job));
        assert_eq!(serving(&addr, &a.img).unwrap().holder, holder, "the new holder stays");
        fio_done(job, &format!("fio across holder kill {round}"));
    }
    assert!(under_load > 0, "every fio run ended before its kills: nothing was tested under load");

    // 3. Detach still works, waits for the processes, and releases the writer attachment.
    let s = serving(&addr, &a.img).unwrap();
    ok(&ferrovol(&addr, &["detach", a.img.to_str().unwrap()]));
    assert!(ferrovol_client::host::mount_at(&a.img).is_none());
    assert!(!alive(s.holder) && !s.worker.is_some_and(alive), "processes left after detach: {s:?}");
    let list = ok(&ferrovol(&addr, &["volume", "stat", "cont"]));
    assert!(!list.contains("cont-node"), "the writer attachment is still held: {list}");
    assert!(serving(&addr, &a.img).is_none());
}

/// ext4 on a direct-I/O loop device over the FUSE file, and fio writing files with an fsync after
/// every write: worker kills give no EIO, ext4 stays read-write, and fsck finds it clean.
#[test]
fn ext4_over_the_mount_survives_worker_kills() {
    if !privileged("ext4_over_the_mount_survives_worker_kills", &["fio", "mkfs.ext4", "e2fsck", "losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let addr = server.addr.to_string();
    let a = attach(&addr, dir.path(), "cext4", "256MiB");
    let dev = ferrovol_client::host::loop_attach(&a.img, false).unwrap();
    struct Loop(String);
    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = ferrovol_client::host::loop_release(&self.0);
        }
    }
    let lo = Loop(dev.clone());
    ok(&Command::new("mkfs.ext4").args(["-q", "-F", &dev]).output().unwrap());
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    ok(&Command::new("mount").arg(&dev).arg(&mnt).output().unwrap());
    struct Mnt(PathBuf);
    impl Drop for Mnt {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let m = Mnt(mnt.clone());

    let kills = (rounds() / 2).max(1);
    kill_workers_under(&addr, &a.img, &mnt.join("f"), "24M", &["--fsync=1", "--direct=0"], kills);
    let opts = ferrovol_client::host::mount_at(&mnt).unwrap().options;
    assert!(opts.iter().any(|o| o == "rw"), "ext4 is no longer read-write: {opts:?}");

    drop(m);
    let fsck = Command::new("e2fsck").args(["-f", "-n", &dev]).output().unwrap();
    assert!(fsck.status.success(), "fsck: {}", String::from_utf8_lossy(&fsck.stdout));
    drop(lo);
}

/// A worker killed while the server is down: the new one cannot connect, so after `io_timeout` the
/// application gets EIO (as from a running worker), not an endless wait; once the server is back,
/// the same worker serves again, and the data is there.
#[test]
fn a_worker_restarted_while_the_server_is_down_fails_io_then_serves_again() {
    if !privileged("a_worker_restarted_while_the_server_is_down_fails_io_then_serves_again", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data, "127.0.0.1:0");
    let addr = server.addr.to_string();
    let a = attach_with(&addr, dir.path(), "down", "16MiB", &["--io-timeout-s", "2"]);
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(&a.img).unwrap();
        f.write_all(&block).unwrap();
        f.sync_all().unwrap();
    }
    server.kill();
    let worker = next_worker(&addr, &a.img, None);
    kill9(worker);
    let started = Instant::now();
    let err = read_direct(&a.img).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(15),
        "EIO after {waited:?}"
    );

    let _server = TestServer::start(&data, &addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match read_direct(&a.img) {
            Ok(got) => {
                assert_eq!(got, block, "the data written before the outage");
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "still failing 20 s after the server came back: {e}")
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(serving(&addr, &a.img).unwrap().worker != Some(worker));
}

/// A child process killed (and reaped) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ferrovol keeper` (or `attachd`) from `exe`, with the node's flags, its log at `log`; waits for
/// its socket to answer.
fn daemon(exe: &Path, server: &str, args: &[&str], socket: &Path, log: &Path) -> Daemon {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let child = Command::new(exe)
        .args(args)
        .env("FERROVOL_SERVER", server)
        .env("FERROVOL_NODE_ID", "cont-node")
        .env("FERROVOL_TOKEN", "tok")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "{args:?}: no socket within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

fn call(
    socket: &Path,
    req: &ferrovol_client::attachd::Request,
) -> std::io::Result<ferrovol_client::attachd::Reply> {
    ferrovol_client::attachd::call(socket, req, Duration::from_secs(90))
}

/// Waits until the keeper holds `img` deposited by `n` live processes (the holder and the worker).
fn kept_by(keeper: &Path, img: &Path, n: usize) {
    let img = std::fs::canonicalize(img).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = ferrovol_client::fuse::keep::list(keeper).unwrap_or_default();
        if list.iter().any(|k| k.path == img && k.depositors == n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the keeper does not hold {} from {n} processes: {list:?}",
            img.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the mount's holder and worker together (both stopped first, so neither starts the other
/// again), as the death of their container does; returns the new holder once one serves.
fn kill_both(server: &str, img: &Path) -> u32 {
    let s = serving(server, img).unwrap();
    let pids = [Some(s.holder), s.worker].into_iter().flatten().collect::<Vec<_>>();
    for &p in &pids {
        // SAFETY: kill(2) with a pid and a signal.
        unsafe { libc::kill(p as i32, libc::SIGSTOP) };
    }
    for &p in &pids {
        kill9(p);
    }
    let holder = next_holder(server, img, s.holder);
    next_worker(server, img, s.worker);
    holder
}

/// The node attach daemon and the keeper (client/src/fuse/keep.rs): a mount attached through
/// `ferrovol attachd --keeper` outlives the death of its holder and worker together (the keeper
/// holds its connection, the daemon starts a holder for the orphan), of the daemon itself, and of
/// the keeper (everything deposits again with the next one), under fio with verify: no error.
/// An adopted holder runs the binary now at the deposited path (an upgrade takes effect).
#[test]
fn attachd_and_the_keeper_keep_a_mount_through_the_death_of_every_process() {
    if !privileged("attachd_and_the_keeper_keep_a_mount_through_the_death_of_every_process", &["fio"]) {
        return;
    }
    use ferrovol_client::attachd::{AttachRequest, Reply, Request};
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let addr = server.addr.to_string();
    // The daemons run from a copy, so that the test can replace the binary at that path.
    let exe = dir.path().join("bin/ferrovol");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_ferrovol"), &exe).unwrap();
    let (keeper_sock, attachd_sock) = (dir.path().join("keeper.sock"), dir.path().join("attachd.sock"));
    let log = dir.path().join("daemons.log");
    let keeper_args = ["keeper", "--socket", keeper_sock.to_str().unwrap()];
    let attachd_args =
        ["attachd", "--socket", attachd_sock.to_str().unwrap(), "--keeper", keeper_sock.to_str().unwrap()];
    let mut keeper = daemon(&exe, &addr, &keeper_args, &keeper_sock, &log);
    let mut attachd = daemon(&exe, &addr, &attachd_args, &attachd_sock, &log);
    struct ShowLog(PathBuf);
    impl Drop for ShowLog {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let text = std::fs::read_to_string(&self.0).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                eprintln!("--- daemons' log (last 40 lines) ---");
                tail.iter().rev().for_each(|l| eprintln!("{l}"));
            }
        }
    }
    let _show = ShowLog(log.clone());

    ok(&ferrovol(&addr, &["volume", "create", "kept", "--size", "128MiB"]));
    let img = dir.path().join("kept.img");
    std::fs::write(&img, b"").unwrap();
    let req = Request::Attach(AttachRequest {
        volume: "kept".into(),
        path: img.clone(),
        read_only: false,
        generation: None,
        io_timeout_s: None,
        log: Some(dir.path().join("kept.log")),
    });
    let Reply::Attached { already: false, .. } = call(&attachd_sock, &req).unwrap() else {
        panic!("not attached")
    };
    let a = Attached { server: addr.clone(), img: img.clone(), log: Some(dir.path().join("kept.log")) };
    // Attach is idempotent; another volume at the same path, an unknown volume and a malformed
    // request get errors that say what is wrong.
    let Reply::Attached { already: true, .. } = call(&attachd_sock, &req).unwrap() else {
        panic!("not idempotent")
    };
    let mut other = match &req {
        Request::Attach(r) => r.clone(),
        _ => unreachable!(),
    };
    other.volume = "nosuch".into();
    let err = call(&attachd_sock, &Request::Attach(other.clone())).unwrap_err().to_string();
    assert!(err.contains("already a mount point"), "{err}");
    other.path = dir.path().join("nosuch.img");
    std::fs::write(&other.path, b"").unwrap();
    let err = call(&attachd_sock, &Request::Attach(other)).unwrap_err().to_string();
    assert!(err.contains("nosuch") && err.contains("not found"), "{err}");
    {
        use std::io::Write;
        let mut c = std::os::unix::net::UnixStream::connect(&attachd_sock).unwrap();
        c.write_all(b"{\"op\":\"explode\"}\n").unwrap();
        let reply = ferrovol_client::attachd::read_line(&c).unwrap().unwrap();
        assert!(reply.contains("malformed request"), "{reply}");
    }
    kept_by(&keeper_sock, &img, 2);
    let table = ok(&ferrovol(&addr, &["status", "--keeper", keeper_sock.to_str().unwrap()]));
    assert!(table.contains("kept") && table.contains("served"), "{table}");

    // 1. Holder and worker killed together, under load: the daemon adopts the orphan.
    let first = serving(&addr, &img).unwrap();
    let mut under_load = 0;
    for round in 0..3 {
        if round == 2 {
            // An upgrade: a new binary (a new file) at the path the mount's processes run from.
            std::fs::remove_file(&exe).unwrap();
            std::fs::copy(env!("CARGO_BIN_EXE_ferrovol"), &exe).unwrap();
        }
        let mut job = fio(&img, "48M", 300 + round, &[]);
        std::thread::sleep(Duration::from_millis(200));
        let holder = kill_both(&addr, &img);
        under_load += u32::from(running(&mut job));
        fio_done(job, &format!("fio across the death of holder and worker {round}"));
        kept_by(&keeper_sock, &img, 2);
        if round == 2 {
            let exe_now = std::fs::read_link(format!("/proc/{holder}/exe")).unwrap();
            assert_eq!(exe_now, exe, "the adopted holder runs the binary now at the path");
        }
    }
    assert!(under_load > 0, "every fio run ended before its kills: nothing was tested under load");

    // 2. The daemon killed under load: the mount does not notice (the same holder and worker);
    //    a new one reports it. A second keeper on the same socket is refused.
    let before = serving(&addr, &img).unwrap();
    let mut second = Command::new(&exe).args(keeper_args).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(&mut second) {
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second keeper on the same socket was not refused: it serves");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = second.wait_with_output().unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("another keeper is serving"), "{said}");
    let mut job = fio(&img, "48M", 400, &[]);
    std::thread::sleep(Duration::from_millis(200));
    kill9(attachd.0.id());
    let _ = attachd.0.wait();
    let mut under_load = u32::from(running(&mut job));
    attachd = daemon(&exe, &addr, &attachd_args, &attachd_sock, &log);
    let Reply::Status { mounts, keeper: Some(_), .. } = call(&attachd_sock, &Request::Status).unwrap() else {
        panic!("no status")
    };
    assert!(mounts.iter().any(|m| m.volume == "kept"), "{mounts:?}");
    fio_done(job, "fio across the attach daemon's death");
    let after = serving(&addr, &img).unwrap();
    assert_eq!((after.holder, after.worker), (before.holder, before.worker), "the mount's processes changed");

    // 3. The keeper killed under load: holder and worker deposit again with the next one, which
    //    can then save the mount from the death of both.
    let mut job = fio(&img, "48M", 500, &[]);
    std::thread::sleep(Duration::from_millis(200));
    kill9(keeper.0.id());
    let _ = keeper.0.wait();
    keeper = daemon(&exe, &addr, &keeper_args, &keeper_sock, &log);
    kept_by(&keeper_sock, &img, 2);
    kill_both(&addr, &img);
    under_load += u32::from(running(&mut job));
    fio_done(job, "fio across the keeper's death and then the mount's processes'");
    assert!(under_load > 0, "fio ended before the daemon's and the keeper's deaths: not tested under load");
    // One restart per death of both (the adopted holder's first worker); a worker that failed to
    // start once would add one, not more.
    let restarts = serving(&addr, &img).unwrap().restarts;
    assert!((4..=6).contains(&restarts), "{restarts} restarts for 4 deaths of holder and worker");
    assert_eq!(serving(&addr, &img).unwrap().since_unix_ms, first.since_unix_ms, "the same mount");

    // 4. Detach through the daemon: unmounted, the processes gone, the keeper lets go.
    let s = serving(&addr, &img).unwrap();
    assert_eq!(call(&attachd_sock, &Request::Detach { path: img.clone() }).unwrap(), Reply::Detached);
    assert!(ferrovol_client::host::mount_at(&img).is_none());
    assert!(!alive(s.holder) && !s.worker.is_some_and(alive), "processes left after detach: {s:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ferrovol_client::fuse::keep::list(&keeper_sock).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the keeper still holds the unmounted mount");
        std::thread::sleep(Duration::from_millis(50));
    }
    let stat = ok(&ferrovol(&addr, &["volume", "stat", "kept"]));
    assert!(!stat.contains("cont-node"), "the writer attachment is still held: {stat}");
    drop(a);
    drop((keeper, attachd));
}

/// A mount whose processes all died and that no attach daemon adopts is let go by the keeper after
/// its orphan timeout: the application gets ENOTCONN, not an endless wait. (This test also caught
/// a worker dying by SIGKILL handing a request EIO: a thread it woke took the request just queued
/// and could not fault its fresh buffer in; see `read_request` in client/src/fuse/kernel.rs. It
/// failed about one run in five before the buffers were prefaulted.)
#[test]
fn an_orphan_nobody_adopts_fails_after_the_keepers_timeout() {
    if !privileged("an_orphan_nobody_adopts_fails_after_the_keepers_timeout", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), "127.0.0.1:0");
    let addr = server.addr.to_string();
    let keeper_sock = dir.path().join("keeper.sock");
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_ferrovol"));
    let keeper_args = ["keeper", "--socket", keeper_sock.to_str().unwrap(), "--orphan-timeout-s", "2"];
    let _keeper = daemon(&exe, &addr, &keeper_args, &keeper_sock, &dir.path().join("keeper.log"));
    ok(&ferrovol(&addr, &["volume", "create", "lost", "--size", "16MiB"]));
    let img = dir.path().join("lost.img");
    std::fs::write(&img, b"").unwrap();
    let out = Command::new(&exe)
        .args(["attach", "lost", img.to_str().unwrap(), "--background"])
        .env("FERROVOL_SERVER", &addr)
        .env("FERROVOL_NODE_ID", "cont-node")
        .env("FERROVOL_TOKEN", "tok")
        .env("FERROVOL_KEEPER", &keeper_sock)
        .output()
        .unwrap();
    let said = ok(&out);
    let log = said.split(", log ").nth(1).and_then(|s| s.split(')').next()).map(PathBuf::from);
    let _a = Attached { server: addr.clone(), img: img.clone(), log };
    kept_by(&keeper_sock, &img, 2);
    // The holder first, alone: the worker forks a new one (fork makes the worker's buffers
    // copy-on-write, which must not turn the next request into an EIO when the worker dies).
    let first = serving(&addr, &img).unwrap();
    kill9(first.holder);
    next_holder(&addr, &img, first.holder);
    kept_by(&keeper_sock, &img, 2);
    let s = serving(&addr, &img).unwrap();
    for p in [s.holder, s.worker.unwrap()] {
        // SAFETY: kill(2) with a pid and a signal.
        unsafe { libc::kill(p as i32, libc::SIGSTOP) };
    }
    kill9(s.holder);
    kill9(s.worker.unwrap());
    // A read waits (the keeper holds the connection), then fails once the keeper lets go.
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let path = img.clone();
    std::thread::spawn(move || tx.send(read_direct(&path)));
    let got =
        rx.recv_timeout(Duration::from_secs(20)).expect("the read still waits 20 s after the orphan timeout");
    let err = got.unwrap_err();
    // The waiting request is ended by the abort (ECONNABORTED); a later one gets ENOTCONN.
    assert!(matches!(err.raw_os_error(), Some(libc::ECONNABORTED | libc::ENOTCONN)), "{err}");
    let later = read_direct(&img).unwrap_err();
    assert_eq!(later.raw_os_error(), Some(libc::ENOTCONN), "{later}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "failed before the timeout: {:?}",
        started.elapsed()
    );
}

/// `ferrovol status` shows each worker's requests in flight and its reconnects: a read waiting for
/// a server that is down is in flight; once the server is back it is answered, and the reconnect
/// is counted.
#[test]
fn status_reports_requests_in_flight_and_reconnects() {
    if !privileged("status_reports_requests_in_flight_and_reconnects", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = TestServer::start(&data, "127.0.0.1:0");
    let addr = server.addr.to_string();
    let a = attach(&addr, dir.path(), "seen", "16MiB");
    let stats = |want: &dyn Fn(&serde_json::Value) -> bool, what: &str| -> serde_json::Value {
        let img = std::fs::canonicalize(&a.img).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let all: serde_json::Value =
                serde_json::from_str(&ok(&ferrovol(&addr, &["status", "--json"]))).unwrap();
            let line = all.as_array().unwrap().iter().find(|l| l["path"] == img.to_str().unwrap()).cloned();
            if let Some(s) = line.map(|l| l["stats"].clone()).filter(|s| want(s)) {
                return s;
            }
            assert!(Instant::now() < deadline, "status never showed {what}: {all}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let first = stats(&|s| s["connections"].as_u64() >= Some(1) && s["in_flight"] == 0, "an idle worker");
    assert_eq!(first["reconnects"], 0, "{first}");
    let table = ok(&ferrovol(&addr, &["status"]));
    assert!(table.contains("INFLIGHT") && table.contains("RECONN"), "{table}");

    server.kill();
    let img = a.img.clone();
    let read = std::thread::spawn(move || read_direct(&img));
    stats(&|s| s["in_flight"].as_u64() >= Some(1), "the waiting read in flight");
    let _server = TestServer::start(&data, &addr);
    read.join().unwrap().unwrap();
    stats(&|s| s["reconnects"].as_u64() >= Some(1) && s["in_flight"] == 0, "the reconnect counted");
    // Detached while the server runs (the worker releases the writer attachment on its way out);
    // the stats file goes with the worker.
    let stats_file = ferrovol_client::host::worker_stats_path(&a.img);
    assert!(stats_file.exists());
    drop(a);
    assert!(!stats_file.exists(), "the worker's stats are left behind");
}
