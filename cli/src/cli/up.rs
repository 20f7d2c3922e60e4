//! `ferrovol up`: the whole stack in one process, on loopback. An embedded server keeps its data in
//! `--data`; the volume is attached through FUSE over a file, a loop device is set up on that file, ext4
//! is created on first use only, and mounted at `--mount`. Ctrl-C or SIGTERM tears it all down in
//! reverse order, leaving no mount or loop device behind; running it again finds the same files.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use ferrovol_client::fuse::BlockFile;
use ferrovol_client::{ConnectOptions, Session};
use ferrovol_proto::{format_size, Status, VolumeName};
use ferrovol_server::{Server, ServerConfig};

use ferrovol_client::host::{self, unmount};

/// One undo step.
type Undo = Box<dyn FnMut() -> anyhow::Result<()>>;

/// Undo steps, run in reverse order on exit or on a failed start.
#[derive(Default)]
struct Teardown {
    steps: Vec<(String, Undo)>,
}

impl Teardown {
    fn push(&mut self, what: impl Into<String>, f: impl FnMut() -> anyhow::Result<()> + 'static) {
        self.steps.push((what.into(), Box::new(f)));
    }

    /// Undoes steps from the last one. Stops at the first failure and keeps everything below it: a
    /// layer that is still mounted must keep its backing (loop device, FUSE file, server), or data
    /// written to it would be lost. Returns whether everything was undone.
    fn run(&mut self) -> bool {
        while let Some((what, mut f)) = self.steps.pop() {
            match f() {
                Ok(()) => println!("  {what}"),
                Err(e) => {
                    eprintln!("ferrovol up: not {what}: {e:#}");
                    // Not done: keep the step (steps are retryable) and everything below it.
                    self.steps.push((what, f));
                    return false;
                }
            }
        }
        true
    }
}

/// Unmounts, retrying while the mount is busy (a shell still inside it, say).
fn umount_retry(target: &Path) -> anyhow::Result<()> {
    for attempt in 0..10 {
        let out = Command::new("umount").arg(target).output().context("cannot run umount")?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if !err.contains("busy") || attempt == 9 {
            bail!("umount {}: {}", target.display(), err.trim());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

pub fn up(data: &Path, mount: &Path, size: u64, name: &VolumeName, fs: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`ferrovol up` needs root (FUSE mount, loop device, mkfs, mount)");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing (modprobe fuse)");
    }
    for tool in ["losetup", "blkid", "mkfs.ext4", "mount", "umount"] {
        if host::which(tool).is_none() {
            bail!("{tool} is not installed (Debian: apt-get install util-linux e2fsprogs mount)");
        }
    }
    std::fs::create_dir_all(mount).with_context(|| format!("cannot create {}", mount.display()))?;
    clean_stale_runs();
    if let Some(host::MountEntry { fstype: t, source, .. }) = host::mount_at(mount) {
        let holder =
            run_of_loop(&source).map(|pid| format!(" by `ferrovol up` (pid {pid})")).unwrap_or_default();
        bail!("{} is already a mount point ({t} {source}){holder}", mount.display());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ferrovol-up")
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    // Signals are ours from the first step: Ctrl-C while mkfs runs (which also stops mkfs, in the
    // same process group) or at any other step makes the start fail, and what was set up is undone.
    let stop = Arc::new(Stop::default());
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (mut term, mut int) = rt.block_on(async {
            anyhow::Ok((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
        })?;
        let stop = stop.clone();
        rt.spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                stop.raise();
            }
        });
    }
    let mut teardown = Teardown::default();
    let result = start(&rt, data, mount, size, name, fs, &mut teardown, &stop);
    match result {
        Ok(()) => {
            println!("ready: volume {name} is mounted at {} (Ctrl-C to stop)", mount.display());
            println!(
                "       use it like any directory (cp, editors, databases); the data lives in {} and \
                 comes back with the next `ferrovol up`",
                data.display()
            );
            let mut seen = 0;
            loop {
                rt.block_on(stop.wait(&mut seen));
                println!("stopping:");
                if teardown.run() {
                    println!("stopped cleanly");
                    return Ok(());
                }
                // Something above is still in use: keep serving it rather than pull its storage away.
                eprintln!(
                    "ferrovol up: still running; close what uses {} and press Ctrl-C again",
                    mount.display()
                );
            }
        }
        Err(e) => {
            eprintln!("ferrovol up: {e:#}");
            println!("undoing what was set up:");
            if !teardown.run() {
                eprintln!("ferrovol up: could not undo everything (see above)");
            }
            bail!("start failed")
        }
    }
}

/// Ctrl-C / SIGTERM, counted: raised by the signal task, checked between the start's steps and
/// awaited once running.
struct Stop {
    signals: tokio::sync::watch::Sender<u64>,
}

impl Default for Stop {
    fn default() -> Self {
        Self { signals: tokio::sync::watch::channel(0).0 }
    }
}

impl Stop {
    fn raise(&self) {
        self.signals.send_modify(|n| *n += 1);
    }

    /// Fails the start if a signal came during it.
    fn check(&self) -> anyhow::Result<()> {
        if *self.signals.borrow() > 0 {
            bail!("interrupted");
        }
        Ok(())
    }

    /// Waits for a signal after the `seen`-th (each counts once).
    async fn wait(&self, seen: &mut u64) {
        let mut rx = self.signals.subscribe();
        let n = rx.wait_for(|n| *n > *seen).await.map(|n| *n);
        if let Ok(n) = n {
            *seen = n;
        }
    }
}

const RUN_DIR: &str = "/run/ferrovol";

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// The pid of the `ferrovol up` run whose image file backs loop device `dev`, if any.
fn run_of_loop(dev: &str) -> Option<i32> {
    let name = dev.strip_prefix("/dev/")?;
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    let rest = Path::new(backing.trim()).strip_prefix(RUN_DIR).ok()?;
    rest.iter().next()?.to_str()?.strip_prefix("up-")?.parse().ok()
}

/// Cleans up after `ferrovol up` runs that died without a teardown (kill -9, OOM): their ext4
/// mount (on a loop device over a FUSE file nobody serves any more), the loop device, the dead FUSE
/// mount and the run dir. Runs whose process is alive are left alone. What was fsynced is on the
/// server; the rest died with the process.
fn clean_stale_runs() {
    let Ok(entries) = std::fs::read_dir(RUN_DIR) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.strip_prefix("up-")?.parse::<i32>().ok())
        else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        let images: Vec<PathBuf> =
            std::fs::read_dir(&dir).map_or(vec![], |d| d.flatten().map(|e| e.path()).collect());
        for img in images.iter().filter(|p| p.extension().is_some_and(|e| e == "img")) {
            for dev in host::loops_of(img) {
                for m in host::mounts_of(&dev) {
                    let _ = Command::new("umount").arg("-l").arg(&m).output();
                    println!(
                        "cleanup: unmounted {} (left by a ferrovol up, pid {pid}, that died)",
                        m.display()
                    );
                }
                if host::loop_release(&dev).is_ok() {
                    println!("cleanup: released {dev}");
                }
            }
            if host::mount_at(img).is_some() {
                let _ = Command::new("umount").arg("-l").arg(img).output();
            }
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            println!("cleanup: removed {} (pid {pid} is gone)", dir.display());
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn start(
    rt: &tokio::runtime::Runtime,
    data: &Path,
    mount: &Path,
    size: u64,
    name: &VolumeName,
    fs: bool,
    teardown: &mut Teardown,
    stop: &Stop,
) -> anyhow::Result<()> {
    // 1. The embedded server, on loopback, with a random token so other local users cannot connect.
    let token = format!("{:032x}", rand::random::<u128>());
    let mut config = ServerConfig::new(data, "127.0.0.1:0".parse()?);
    config.auth.admin_token = Some(token.clone());
    let server = rt.block_on(Server::bind(config))?;
    let addr = server.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = rt.spawn(server.run(async {
        let _ = stop_rx.await;
    }));
    let handle = rt.handle().clone();
    let mut server_stop = Some((stop_tx, server_task));
    teardown.push("server stopped (volumes flushed)", move || {
        if let Some((stop_tx, server_task)) = server_stop.take() {
            let _ = stop_tx.send(());
            handle.block_on(server_task)??;
        }
        Ok(())
    });
    println!("server: data in {}, listening on {addr} (loopback only)", data.display());
    stop.check()?;

    let opts = ConnectOptions { token, node_id: "ferrovol-up".parse()?, ..ConnectOptions::default() };
    if fs {
        // No reply polling for a file system (see `fuse::files::mount`).
        let opts = ConnectOptions { poll: Duration::ZERO, ..opts };
        return start_fs(rt, &addr.to_string(), opts, mount, size, name, teardown, stop);
    }
    // 2. The volume: created on first use, reused after.
    let (session, vol) = rt.block_on(async {
        let session = Session::connect(&addr.to_string(), opts).await?;
        match session.stat_volume(name).await {
            Ok(v) => {
                println!("volume: reusing {name} ({})", format_size(v.size));
                if v.size != size {
                    println!(
                        "        (its size stays {}; `--size` applies on creation)",
                        format_size(v.size)
                    );
                }
            }
            Err(e) if e.status() == Some(Status::NotFound) => {
                let v = session.create_volume(name, size).await?;
                println!("volume: created {name} ({})", format_size(v.size));
            }
            Err(e) => return Err(anyhow::Error::from(e)),
        }
        // The writer attachment: the data dir lock already keeps a second `up` out, and this
        // keeps out any other client of the same server while the volume is mounted.
        let generation = session.attach_writer(name, false).await?;
        let vol = session.open_writer(name, generation).await?;
        anyhow::Ok((session, vol))
    })?;
    let (generation, handle, volume) = (vol.generation(), rt.handle().clone(), name.clone());
    teardown.push("released the writer attachment", move || {
        Ok(handle.block_on(session.release_writer(&volume, generation))?)
    });
    stop.check()?;

    // 3. FUSE attach over a file in /run.
    let run_dir = PathBuf::from(format!("/run/ferrovol/up-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let img = run_dir.join(format!("{name}.img"));
    std::fs::write(&img, b"").with_context(|| format!("cannot create {}", img.display()))?;
    let dir = run_dir.clone();
    teardown.push(format!("removed {}", run_dir.display()), move || Ok(std::fs::remove_dir_all(&dir)?));
    let fs = BlockFile::new(vol, rt.handle().clone(), false);
    let fuse_config = ferrovol_client::fuse::config(name, false);
    let session = fuser::Session::new(fs, &img, &fuse_config)
        .with_context(|| format!("cannot FUSE-mount the volume at {}", img.display()))?;
    let background = session.spawn().context("cannot start the FUSE session")?;
    let mut background = Some(background);
    let fuse_file = img.clone();
    teardown.push(format!("detached {}", img.display()), move || {
        // Unmount first (fails with EBUSY, retryably, while something still has the file open), then
        // let the FUSE session end.
        if host::mount_at(&fuse_file).is_some() {
            host::retry_busy(Duration::from_secs(2), || unmount(&fuse_file))
                .with_context(|| format!("unmount {}", fuse_file.display()))?;
        }
        if let Some(b) = background.take() {
            b.join()?;
        }
        Ok(())
    });
    println!("attach: volume {name} is the file {}", img.display());
    stop.check()?;

    // 4. A loop device over it (direct I/O: the page cache above the loop device is enough).
    let loopdev = host::loop_attach(&img, false)?;
    let dev = loopdev.clone();
    teardown.push(format!("released {loopdev}"), move || Ok(host::loop_release(&dev)?));
    println!("loop:   {loopdev}");
    stop.check()?;

    // 5. ext4 on first use only: never format a device that already holds something.
    let probe = Command::new("blkid").args(["-p", &loopdev]).output().context("cannot run blkid")?;
    match probe.status.code() {
        Some(0) => println!("fs:     found an existing filesystem on {loopdev}; not formatting"),
        Some(2) => {
            host::run(Command::new("mkfs.ext4").args(["-q", "-F", "-L", name.as_str(), &loopdev]))?;
            println!("fs:     {loopdev} was blank; created ext4");
        }
        _ => bail!("blkid -p {loopdev} failed: {}", String::from_utf8_lossy(&probe.stderr).trim()),
    }
    stop.check()?;

    // 6. Mount.
    let mount_s = mount.to_string_lossy().into_owned();
    host::run(Command::new("mount").args([loopdev.as_str(), &mount_s]))?;
    let target = mount.to_owned();
    teardown.push(format!("unmounted {}", mount.display()), move || umount_retry(&target));
    println!("mount:  {loopdev} on {} (ext4)", mount.display());
    Ok(())
}

/// `up --type fs`: an fs volume (created on first use), FUSE-mounted at `mount`: no loop device,
/// no mkfs here (the server made its ext4), and other nodes may mount it too.
#[allow(clippy::too_many_arguments)]
fn start_fs(
    rt: &tokio::runtime::Runtime,
    addr: &str,
    opts: ConnectOptions,
    mount: &Path,
    size: u64,
    name: &VolumeName,
    teardown: &mut Teardown,
    stop: &Stop,
) -> anyhow::Result<()> {
    use ferrovol_client::fuse::files::{FsFiles, Ttls};
    let vol = rt.block_on(async {
        let session = Session::connect(addr, opts).await?;
        match session.stat_volume(name).await {
            Ok(v) if v.kind != ferrovol_proto::codec::VOLUME_KIND_FS => bail!(
                "volume {name} is a block volume: run `ferrovol up` without --type fs, or pick another --volume"
            ),
            Ok(v) => println!("volume: reusing fs volume {name} ({})", format_size(v.size)),
            Err(e) if e.status() == Some(Status::NotFound) => {
                let kind = ferrovol_proto::codec::VOLUME_KIND_FS;
                let v = session.create_volume_of_kind(name, kind, size, Default::default(), None).await?;
                println!("volume: created fs volume {name} ({}; the server made its ext4)", format_size(v.size));
            }
            Err(e) => return Err(anyhow::Error::from(e)),
        }
        anyhow::Ok(session.open_fs(name, false).await?)
    })?;
    stop.check()?;
    let fs = FsFiles::new(vol, rt.handle().clone(), Ttls::STANDARD, false);
    let watch = fs.watch();
    let session = fuser::Session::new(fs, mount, &ferrovol_client::fuse::files::config(name, false))
        .with_context(|| format!("cannot FUSE-mount volume {name} at {}", mount.display()))?;
    watch.start(session.notifier()).context("cannot start the notice thread")?;
    let mut background = Some(session.spawn().context("cannot start the FUSE session")?);
    let target = mount.to_owned();
    teardown.push(format!("unmounted {}", mount.display()), move || {
        if host::mount_at(&target).is_some() {
            host::retry_busy(Duration::from_secs(2), || unmount(&target))
                .with_context(|| format!("unmount {}", target.display()))?;
        }
        if let Some(b) = background.take() {
            b.join()?;
        }
        Ok(())
    });
    println!("mount:  fs volume {name} on {} (FUSE, files served by the server)", mount.display());
    Ok(())
}
