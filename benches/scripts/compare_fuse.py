#!/usr/bin/env python3
"""The FUSE block file, side by side with its peers, in one run (needs root).

Targets (all 1 GiB, data in RAM):
  ours:    ferrovol-server (data dir on tmpfs) + `ferrovol attach` (FUSE file over TCP 127.0.0.1)
  nbdfuse: nbdkit memory + nbdfuse (FUSE file over NBD on TCP 127.0.0.1)
  bindfs:  bindfs over tmpfs (a FUSE passthrough: the FUSE ceiling on this machine)
fio jobs (direct I/O): psync qd1 and libaio qd16 x {1 MiB seq read, 1 MiB seq write, 4 KiB rand read,
4 KiB rand write}, each with the CPU it cost: the serving processes' (from /proc, per GiB or per 100k
requests) and fio's own (its system time holds the kernel's FUSE work). File-system jobs, on ext4 over a loop device (direct-io) over ours and over nbdfuse:
metadata (create, stat, delete 10,000 files) and fsync-heavy (create + 4 KiB write + fsync per file), plus
the same on a loop device over a plain tmpfs file (no FUSE, no network): the ceiling of those jobs.
Targets alternate within each round, the order rotating every round; medians and ratios are printed,
raw samples saved as JSON, and a PNG plot drawn (matplotlib, installed from PyPI when missing).

Usage: sudo benches/scripts/compare_fuse.py [--rounds 3] [--runtime 3] [--out bench-results/fuse.json]
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 1 << 30
FS_NAMES = ["ours", "nbdfuse", "local"]
FIO_JOBS = [(eng, qd, rw, bs) for eng, qd in (("psync", 1), ("libaio", 16))
            for rw, bs in (("read", "1m"), ("write", "1m"), ("randread", "4k"), ("randwrite", "4k"))]


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout.strip()


def ensure_tools():
    need = {"fio": "fio", "nbdkit": "nbdkit", "nbdfuse": "libnbd-bin", "bindfs": "bindfs",
            "mkfs.ext4": "e2fsprogs", "losetup": "mount"}
    missing = sorted({pkg for tool, pkg in need.items() if shutil.which(tool) is None})
    if missing:
        print(f"installing {missing} from Debian...", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, what, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def fio(path, eng, qd, rw, bs, runtime):
    """Returns (MiB/s or IOPS, GiB moved, requests, fio's own CPU seconds: user + system)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        sh("fio", "--name=j", f"--filename={path}", f"--ioengine={eng}", f"--iodepth={qd}", f"--rw={rw}",
           f"--bs={bs}", "--direct=1", f"--size={SIZE}", "--time_based=1", f"--runtime={runtime}",
           "--output-format=json", f"--output={f.name}")
        j = json.load(open(f.name))["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    value = side["bw"] / 1024.0 if bs == "1m" else side["iops"]
    fio_cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100.0 * j["job_runtime"] / 1000.0
    return value, side["io_bytes"] / 2**30, side["total_ios"], fio_cpu


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """User + system CPU seconds of these processes so far (all their threads)."""
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / TICK


def pids_of(name, pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def fs_jobs(mnt, files):
    """Returns (metadata ops/s, fsync files/s) on the mounted file system."""
    d = os.path.join(mnt, "meta")
    os.makedirs(d, exist_ok=True)
    t = time.perf_counter()
    for i in range(files):
        with open(os.path.join(d, f"f{i}"), "w") as f:
            f.write("x")
    for i in range(files):
        os.stat(os.path.join(d, f"f{i}"))
    for i in range(files):
        os.unlink(os.path.join(d, f"f{i}"))
    meta = 3 * files / (time.perf_counter() - t)
    return meta, fsync_job(d, max(files // 20, 50))


def fsync_job(d, n):
    """Creates n files in d, each with 4 KiB written and fsynced; returns files/s (then deletes them)."""
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results", "fuse.json"))
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (FUSE mounts, loop devices)")
    ensure_tools()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "ferrovol-server", "-p", "ferrovol-cli"],
                       cwd=ROOT, check=True)
    rel = os.path.join(ROOT, "target", "release")
    ferrovol = os.path.join(rel, "ferrovol")
    shm = tempfile.mkdtemp(prefix="ferrovol-fuse-bench-", dir="/dev/shm")
    procs, mounts, loops = [], [], []
    try:
        srv = subprocess.Popen([os.path.join(rel, "ferrovol-server"), "--data", f"{shm}/data",
                                "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=dict(os.environ, RUST_LOG="warn"))
        procs.append(srv)
        addr = srv.stdout.readline().strip().removeprefix("listening on ")
        env = dict(os.environ, FERROVOL_SERVER=addr, RUST_LOG="warn")
        subprocess.run([ferrovol, "volume", "create", "bench", "--size", str(SIZE)], check=True, env=env,
                       capture_output=True)
        ours = f"{shm}/ours.img"
        open(ours, "w").close()
        subprocess.run([ferrovol, "attach", "bench", ours, "--background"], check=True, env=env,
                       capture_output=True)
        mounts.append(ours)

        port = free_port()
        procs.append(subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "memory", str(SIZE)],
                                      stderr=subprocess.DEVNULL))
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, "nbdkit")
        os.makedirs(f"{shm}/nbdmnt")
        procs.append(subprocess.Popen(["nbdfuse", f"{shm}/nbdmnt/nbd", "--tcp", "127.0.0.1", str(port)],
                                      stderr=subprocess.DEVNULL))
        wait_for(lambda: os.path.exists(f"{shm}/nbdmnt/nbd") and os.path.getsize(f"{shm}/nbdmnt/nbd") == SIZE,
                 "nbdfuse")
        mounts.append(f"{shm}/nbdmnt")
        nbd = f"{shm}/nbdmnt/nbd"

        os.makedirs(f"{shm}/raw")
        os.makedirs(f"{shm}/bindmnt")
        sh("truncate", "-s", str(SIZE), f"{shm}/raw/file")
        sh("bindfs", f"{shm}/raw", f"{shm}/bindmnt")
        mounts.append(f"{shm}/bindmnt")
        bind = f"{shm}/bindmnt/file"

        targets = {"ours": ours, "nbdfuse": nbd, "bindfs": bind}
        # The processes that serve each target: the CPU a node pays for it (the kernel's share of
        # FUSE is counted with fio's system time).
        served = json.loads(subprocess.run([ferrovol, "status", "--json"], check=True, capture_output=True,
                                           text=True, env=env).stdout)
        ours_pids = [srv.pid] + [p for s in served if s["path"] == ours for p in (s["holder"], s["worker"]) if p]
        servers = {"ours": ours_pids, "nbdfuse": [procs[1].pid, procs[2].pid],
                   "bindfs": pids_of("bindfs", f"bindfs {shm}/raw")}
        print("serving processes:", servers, flush=True)
        print("prefilling...", flush=True)
        for p in targets.values():
            sh("fio", "--name=fill", f"--filename={p}", "--rw=write", "--bs=1m", "--direct=1", f"--size={SIZE}",
               "--ioengine=libaio", "--iodepth=8")

        names = list(targets)
        samples = {f"{e} qd{q} {rw} {bs}": {n: [] for n in names} for e, q, rw, bs in FIO_JOBS}
        # CPU seconds per GiB (1 MiB jobs) or per 100k requests (4 KiB jobs): serving processes,
        # and fio's own (its system time includes the kernel's FUSE work).
        cpu = {k: {n: {"serve": [], "fio": []} for n in names} for k in samples}
        for rnd in range(args.rounds):
            order = names[rnd % 3:] + names[:rnd % 3]
            for e, q, rw, bs in FIO_JOBS:
                key = f"{e} qd{q} {rw} {bs}"
                for n in order:
                    before = cpu_seconds(servers[n])
                    value, gib, ios, fio_cpu = fio(targets[n], e, q, rw, bs, args.runtime)
                    serve = cpu_seconds(servers[n]) - before
                    per = gib if bs == "1m" else ios / 1e5
                    samples[key][n].append(value)
                    cpu[key][n]["serve"].append(serve / per)
                    cpu[key][n]["fio"].append(fio_cpu / per)
                print(f"round {rnd + 1} {key:<26} " + "  ".join(f"{n} {samples[key][n][-1]:>9.0f}" for n in names),
                      flush=True)

        # ext4 over a loop device over each block path, and over a plain tmpfs file (no FUSE, no
        # network): the ceiling any block path could reach on these jobs.
        fs = {}
        fs_targets = dict(targets, local=f"{shm}/raw/local.img")
        sh("truncate", "-s", str(SIZE), fs_targets["local"])
        for n in FS_NAMES:
            dev = sh("losetup", "--find", "--show", "--direct-io=on", fs_targets[n])
            loops.append(dev)
            sh("mkfs.ext4", "-q", "-F", dev)
            mnt = f"{shm}/ext4-{n}"
            os.makedirs(mnt)
            sh("mount", dev, mnt)
            mounts.insert(0, mnt)
        for rnd in range(args.rounds):
            for n in FS_NAMES[rnd % 3:] + FS_NAMES[:rnd % 3]:
                m, s = fs_jobs(f"{shm}/ext4-{n}", args.files)
                fs.setdefault(n, {"metadata": [], "fsync": []})
                fs[n]["metadata"].append(m)
                fs[n]["fsync"].append(s)
                print(f"round {rnd + 1} ext4 on {n:<8} metadata {m:>8.0f} ops/s  fsync {s:>7.0f} files/s", flush=True)
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", m], capture_output=True)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(shm, ignore_errors=True)

    med = statistics.median
    rows = []
    print()
    print(f"{'job':<28} {'unit':>6} {'ours':>9} {'nbdfuse':>9} {'bindfs':>9} {'ours/nbdfuse':>13} {'ours/bindfs':>12}")
    for key, s in samples.items():
        unit = "MiB/s" if key.endswith("1m") else "IOPS"
        o, nb, bi = med(s["ours"]), med(s["nbdfuse"]), med(s["bindfs"])
        rows.append({"job": key, "unit": unit, "samples": s, "ours": o, "nbdfuse": nb, "bindfs": bi,
                     "ours_per_nbdfuse": o / nb, "ours_per_bindfs": o / bi})
        print(f"{key:<28} {unit:>6} {o:>9.0f} {nb:>9.0f} {bi:>9.0f} {o / nb:>12.2f}x {o / bi:>11.2f}x")
        rows[-1]["cpu"] = {n: {k: med(v) for k, v in c.items()} for n, c in cpu[key].items()}
    print("\nCPU seconds per GiB (1 MiB jobs) or per 100k requests (4 KiB jobs), medians: serving processes"
          " + fio (user + system; the kernel's FUSE work is in fio's system time)")
    print(f"{'job':<28} {'ours':>14} {'nbdfuse':>14} {'bindfs':>14}")
    for r in rows:
        c = r["cpu"]
        print(f"{r['job']:<28} " + " ".join(f"{c[n]['serve']:>6.2f} + {c[n]['fio']:>5.2f}" for n in names))
    for job, unit in (("metadata", "ops/s"), ("fsync", "files/s")):
        o, nb, lo = med(fs["ours"][job]), med(fs["nbdfuse"][job]), med(fs["local"][job])
        rows.append({"job": f"ext4 {job}", "unit": unit, "samples": {n: fs[n][job] for n in fs},
                     "ours": o, "nbdfuse": nb, "local": lo, "ours_per_nbdfuse": o / nb,
                     "local_per_nbdfuse": lo / nb})
        print(f"{'ext4 ' + job:<28} {unit:>6} {o:>9.0f} {nb:>9.0f} {'-':>9} {o / nb:>12.2f}x {'-':>12}")
    print("\next4 on a loop device over a plain tmpfs file (no FUSE, no network), the ceiling for any block path:")
    for r in rows[-2:]:
        print(f"{r['job']:<28} {r['unit']:>6} {r['local']:>9.0f}   = {r['local_per_nbdfuse']:.2f}x nbdfuse, "
              f"ours at {r['ours'] / r['local']:.0%} of it")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"rounds": args.rounds, "runtime_s": args.runtime, "files": args.files, "results": rows}, f,
                  indent=2)
    print(f"\nraw samples: {args.out}")
    plot(rows, args.out.rsplit(".", 1)[0] + ".png")


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=False)
        try:
            import matplotlib
        except ImportError:
            print("matplotlib unavailable; no plot")
            return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fio_rows = [r for r in rows if "bindfs" in r]
    fig, ax = plt.subplots(figsize=(12, 5))
    xs = range(len(fio_rows))
    w = 0.27
    for i, (name, color) in enumerate((("ours", "tab:green"), ("nbdfuse", "tab:blue"), ("bindfs", "tab:gray"))):
        vals = [r[name] / r["bindfs"] for r in fio_rows]
        ax.bar([x + (i - 1) * w for x in xs], vals, w, label=name, color=color)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["job"] for r in fio_rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative to bindfs (FUSE ceiling) = 1.0")
    ax.set_title("FUSE block file: fio direct I/O, medians (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
