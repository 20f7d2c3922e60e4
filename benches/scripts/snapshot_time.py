#!/usr/bin/env python3
"""How long snapshots, restores and clones take: a 1 GiB volume with 512 MiB written (the first half,
by `ferrovol bench raw --prefill`, then grown), on data dirs of three kinds, a few rounds, medians.

- xfs (a loop-mounted image with reflink=1): the reflink path;
- ext4 (a directory on the root filesystem) and tmpfs: the copy path.

Times are wall clock as the CLI sees them: `snapshot create --wait` (until ready), `volume create
--from-snapshot`, `volume create --from-volume`. The first includes the writeback of the volume's
dirty pages where the filesystem does it before sharing extents (xfs), or the copy's own sync.

With `--type fs`: an fs volume of 2 GiB with 512 MiB written through `ferrovol mount` (dd, then
fsync), and a writer on the mount (create + 4 KiB write + fsync of one file, in a loop) while the
snapshot is cut; it reports the writer's longest wait too (the time the filesystem was frozen, as
an application sees it).

    sudo benches/scripts/snapshot_time.py --bin target/release [--rounds 3] [--type block|fs]
"""
import argparse, os, shutil, statistics, subprocess, tempfile, threading, time

MIB = 1 << 20


def sh(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def timed(cmd):
    t = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.monotonic() - t


def one_round(bin_dir, data_dir):
    server, cli = os.path.join(bin_dir, "ferrovol-server"), os.path.join(bin_dir, "ferrovol")
    srv = subprocess.Popen([server, "--data", data_dir, "--listen", "127.0.0.1:0"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        addr = srv.stdout.readline().split()[-1]
        c = [cli, "--server", addr]
        sh(*c, "bench", "raw", "--workload", "seq-write", "--runtime-s", "0.2", "--volume", "v",
           "--size", "512MiB", "--prefill", "--json")
        sh(*c, "volume", "resize", "v", "--size", "1GiB")
        snap = timed(c + ["snapshot", "create", "s", "--volume", "v", "--wait"])
        restore = timed(c + ["volume", "create", "r", "--from-snapshot", "s"])
        clone = timed(c + ["volume", "create", "k", "--from-volume", "v"])
        return snap, restore, clone
    finally:
        srv.terminate()
        srv.wait()


def one_round_fs(bin_dir, data_dir):
    server, cli = os.path.join(bin_dir, "ferrovol-server"), os.path.join(bin_dir, "ferrovol")
    srv = subprocess.Popen([server, "--data", data_dir, "--listen", "127.0.0.1:0"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    mnt = tempfile.mkdtemp(prefix="ferrovol-snap-mnt-")
    c = []
    try:
        addr = srv.stdout.readline().split()[-1]
        c = [cli, "--server", addr, "--node-id", "bench"]
        sh(*c, "volume", "create", "v", "--size", "2Gi", "--type", "fs")
        sh(*c, "mount", "v", mnt, "--background")
        sh("dd", "if=/dev/urandom", f"of={mnt}/data", "bs=1M", "count=512", "conv=fsync", "status=none")
        stop, worst = threading.Event(), [0.0]

        def writer():
            while not stop.is_set():
                t = time.monotonic()
                fd = os.open(f"{mnt}/w", os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
                os.close(fd)
                worst[0] = max(worst[0], time.monotonic() - t)

        th = threading.Thread(target=writer)
        th.start()
        time.sleep(0.5)
        snap = timed(c + ["snapshot", "create", "s", "--volume", "v", "--wait"])
        time.sleep(0.2)
        stop.set()
        th.join()
        restore = timed(c + ["volume", "create", "r", "--from-snapshot", "s"])
        clone = timed(c + ["volume", "create", "k", "--from-volume", "v"])
        return snap, restore, clone, worst[0]
    finally:
        if c:
            subprocess.run(c + ["umount", mnt], capture_output=True)
        srv.terminate()
        srv.wait()
        os.rmdir(mnt)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--type", choices=["block", "fs"], default="block")
    a = ap.parse_args()
    round_of = one_round_fs if a.type == "fs" else one_round
    cols = 4 if a.type == "fs" else 3
    work = tempfile.mkdtemp(prefix="ferrovol-snap-", dir="/var/tmp")
    img, mnt = os.path.join(work, "xfs.img"), os.path.join(work, "xfs")
    os.mkdir(mnt)
    with open(img, "wb") as f:
        f.truncate(8 << 30)
    dev = sh("losetup", "-f", "--show", img)
    try:
        sh("mkfs.xfs", "-q", "-m", "reflink=1", dev)
        sh("mount", dev, mnt)
        shm = tempfile.mkdtemp(prefix="ferrovol-snap-", dir="/dev/shm")
        kinds = {"xfs (reflink)": mnt, "ext4 (copy)": work, "tmpfs (copy)": shm}
        res = {k: [] for k in kinds}
        for r in range(a.rounds):
            for kind, base in kinds.items():
                d = os.path.join(base, f"d{r}")
                res[kind].append(round_of(a.bin, d))
                shutil.rmtree(d, ignore_errors=True)
        extra = f" {'worst write':>12}" if cols == 4 else ""
        print(f"{'data dir':<16} {'snapshot':>10} {'restore':>10} {'clone':>10}{extra}   ({a.type}; seconds, median of {a.rounds})")
        for kind, rows in res.items():
            med = [statistics.median(x[i] for x in rows) for i in range(cols)]
            extra = f" {med[3]:>12.3f}" if cols == 4 else ""
            print(f"{kind:<16} {med[0]:>10.2f} {med[1]:>10.2f} {med[2]:>10.2f}{extra}   all: {[tuple(round(v, 3) for v in x) for x in rows]}")
        shutil.rmtree(shm, ignore_errors=True)
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
