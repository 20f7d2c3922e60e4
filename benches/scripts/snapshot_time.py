#!/usr/bin/env python3
"""How long snapshots, restores and clones take: a 1 GiB volume with 512 MiB written (the first half,
by `ferrovol bench raw --prefill`, then grown), on data dirs of three kinds, a few rounds, medians.

- xfs (a loop-mounted image with reflink=1): the reflink path;
- ext4 (a directory on the root filesystem) and tmpfs: the copy path.

Times are wall clock as the CLI sees them: `snapshot create --wait` (until ready), `volume create
--from-snapshot`, `volume create --from-volume`. The first includes the writeback of the volume's
dirty pages where the filesystem does it before sharing extents (xfs), or the copy's own sync.

    sudo benches/scripts/snapshot_time.py --bin target/release [--rounds 3]
"""
import argparse, os, shutil, statistics, subprocess, tempfile, time

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
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
                res[kind].append(one_round(a.bin, d))
                shutil.rmtree(d, ignore_errors=True)
        print(f"{'data dir':<16} {'snapshot':>10} {'restore':>10} {'clone':>10}   (seconds, median of {a.rounds})")
        for kind, rows in res.items():
            med = [statistics.median(x[i] for x in rows) for i in range(3)]
            print(f"{kind:<16} {med[0]:>10.2f} {med[1]:>10.2f} {med[2]:>10.2f}   all: {[tuple(round(v, 2) for v in x) for x in rows]}")
        shutil.rmtree(shm, ignore_errors=True)
    finally:
        subprocess.run(["umount", mnt], capture_output=True)
        subprocess.run(["losetup", "-d", dev], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
