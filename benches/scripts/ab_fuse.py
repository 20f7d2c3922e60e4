#!/usr/bin/env python3
"""A/B test of two builds through the FUSE file, side by side in one run (needs root).

Each side gets its own ferrovol-server (data dir on tmpfs), its own 1 GiB volume attached with its own
`ferrovol` binary, and, for the `fsync` job, its own 256 MiB volume with ext4 on a direct-io loop device.
Jobs run one round at a time, A and B alternating (the order flips every round); medians, the ratio B/A
and the raw samples are printed. Run it once with the same binary on both sides (an A/A run) to see
the harness's own spread on the machine: on the 2 vCPU VM it was -12%..+5%.

Jobs: ENGINE:QD:RW:BS fio jobs with direct I/O (e.g. psync:1:randread:4k, libaio:16:write:1m), and
`fsync` (create + 4 KiB write + fsync per file, 400 files, on ext4).

Usage: sudo benches/scripts/ab_fuse.py --a OLD/ferrovol --b NEW/ferrovol [--server-a S] [--server-b S]
                                      [--env-a K=V] [--env-b K=V] [--rounds 5] [--runtime 3] [JOB ...]
E.g. fuser vs our own FUSE session, one build: --a B --b B --env-b FERROVOL_FUSE=own.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_fuse import ROOT, fio, fsync_job, sh  # noqa: E402  (the same jobs as the comparison)

DEFAULT_JOBS = ["psync:1:randread:4k", "libaio:16:randwrite:4k", "libaio:16:read:1m", "fsync"]


def run_job(target, ext4_mnt, job, runtime):
    """One sample of `job` on one side: fio on its volume file, or the fsync job on its ext4."""
    if job == "fsync":
        d = os.path.join(ext4_mnt, "fsync")
        os.makedirs(d, exist_ok=True)
        return fsync_job(d, 400)
    eng, qd, rw, bs = job.split(":")
    return fio(target, eng, qd, rw, bs, runtime)[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rel = os.path.join(ROOT, "target", "release")
    ap.add_argument("--a", required=True, help="ferrovol binary of side A")
    ap.add_argument("--b", required=True, help="ferrovol binary of side B")
    ap.add_argument("--server-a", default=os.path.join(rel, "ferrovol-server"))
    ap.add_argument("--server-b", default=os.path.join(rel, "ferrovol-server"))
    ap.add_argument("--env-a", action="append", default=[], help="KEY=VALUE for side A's attach (repeatable)")
    ap.add_argument("--env-b", action="append", default=[], help="KEY=VALUE for side B's attach, e.g. FERROVOL_FUSE=own")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("jobs", nargs="*", default=DEFAULT_JOBS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (FUSE mounts, loop devices)")
    for tool in ("fio", "losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing (benches/scripts/compare_fuse.py installs it)")
    shm = tempfile.mkdtemp(prefix="ferrovol-ab-", dir="/dev/shm")
    sides = {"A": (args.a, args.server_a), "B": (args.b, args.server_b)}
    envs = {tag: dict(kv.split("=", 1) for kv in kvs) for tag, kvs in (("A", args.env_a), ("B", args.env_b))}
    procs, mounts, loops, files, ext4 = [], [], [], {}, {}
    try:
        for tag, (client, server) in sides.items():
            srv = subprocess.Popen([server, "--data", f"{shm}/data-{tag}", "--listen", "127.0.0.1:0"],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env=dict(os.environ, RUST_LOG="warn"))
            procs.append(srv)
            addr = srv.stdout.readline().strip().removeprefix("listening on ")
            for vol, size in (("fio", "1GiB"), ("fs", "256MiB")):
                sh(client, "volume", "create", vol, "--size", size, "--server", addr)
                path = f"{shm}/{tag}-{vol}.img"
                open(path, "w").close()
                subprocess.run([client, "attach", vol, path, "--background", "--server", addr],
                               check=True, capture_output=True, env=dict(os.environ, **envs[tag]))
                mounts.append(path)
            files[tag] = f"{shm}/{tag}-fio.img"
            sh("fio", "--name=fill", f"--filename={files[tag]}", "--rw=write", "--bs=1m", "--direct=1",
               "--size=1g", "--ioengine=libaio", "--iodepth=8")
            if "fsync" in args.jobs:
                dev = sh("losetup", "--find", "--show", "--direct-io=on", f"{shm}/{tag}-fs.img")
                loops.append(dev)
                sh("mkfs.ext4", "-q", "-F", dev)
                ext4[tag] = f"{shm}/{tag}-ext4"
                os.makedirs(ext4[tag])
                sh("mount", dev, ext4[tag])
                mounts.insert(0, ext4[tag])
        samples = {j: {"A": [], "B": []} for j in args.jobs}
        for rnd in range(args.rounds):
            for job in args.jobs:
                for tag in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
                    samples[job][tag].append(run_job(files[tag], ext4.get(tag), job, args.runtime))
            print(f"round {rnd + 1}/{args.rounds} done", flush=True)
    finally:
        for m in mounts:
            subprocess.run(["umount", m], capture_output=True)
            if m in ext4.values():
                time.sleep(0.2)
        for dev in loops:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        time.sleep(0.5)
        for m in mounts:
            subprocess.run(["umount", "-l", m], capture_output=True)
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(shm, ignore_errors=True)
    print(f"\n{'job':<26} {'A':>10} {'B':>10} {'B/A':>6}  samples")
    for job, s in samples.items():
        a, b = statistics.median(s["A"]), statistics.median(s["B"])
        print(f"{job:<26} {a:>10.0f} {b:>10.0f} {b / a:>6.2f}  A={[round(x) for x in s['A']]} "
              f"B={[round(x) for x in s['B']]}")


if __name__ == "__main__":
    main()
