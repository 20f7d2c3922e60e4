#!/usr/bin/env python3
"""Raw protocol vs fio's nbd engine against nbdkit memory, side by side in one run.

Runs the same jobs (1 MiB sequential read/write, 4 KiB random read/write, at queue depth 1 and 32) against
  ours:  `ferrovol bench raw` -> ferrovol-server (data dir on tmpfs) over TCP 127.0.0.1, one connection
  peer:  fio --ioengine=nbd      -> nbdkit memory plugin               over TCP 127.0.0.1, one connection
interleaved (ours and peer alternate, the order flipping each round), several rounds, and prints the
medians and the ratio ours/peer. Writes the raw samples and medians as JSON.

Usage: benches/scripts/compare_nbd.py [--rounds 3] [--runtime 3] [--size 1G] [--out bench-results/nbd.json]
Installs fio and nbdkit from Debian when missing (needs root).
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

# (label, ferrovol workload, fio rw, block size, queue depth, metric)
JOBS = []
for qd in (1, 32):
    JOBS += [
        (f"seq-read 1M qd{qd}", "seq-read", "read", "1m", qd, "MiB/s"),
        (f"seq-write 1M qd{qd}", "seq-write", "write", "1m", qd, "MiB/s"),
        (f"rand-read 4K qd{qd}", "rand-read", "randread", "4k", qd, "IOPS"),
        (f"rand-write 4K qd{qd}", "rand-write", "randwrite", "4k", qd, "IOPS"),
    ]


def ensure_tools():
    missing = [t for t in ("fio", "nbdkit") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {missing}; install them: apt-get install -y fio nbdkit")
    print(f"installing {missing} from Debian...", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "fio", "nbdkit"], check=True,
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listening on {port}")


def size_bytes(s):
    units = {"k": 10, "m": 20, "g": 30}
    s = s.lower().rstrip("ib").rstrip("b") if s[-1].lower() == "b" else s.lower()
    return int(s[:-1]) << units[s[-1]] if s[-1] in units else int(s)


def run_ours(ferrovol, addr, job, runtime, size):
    _, wl, _, _, qd, metric = job
    out = subprocess.run(
        [ferrovol, "--server", addr, "bench", "raw", "--workload", wl, "--qd", str(qd),
         "--runtime-s", str(runtime), "--size", str(size), "--json"],
        check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    return r["mib_per_s"] if metric == "MiB/s" else r["iops"]


def run_fio(port, job, runtime, size, extra=()):
    _, _, rw, bs, qd, metric = job
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        subprocess.run(
            ["fio", "--name=peer", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}", f"--rw={rw}", f"--bs={bs}",
             f"--iodepth={qd}", f"--size={size}", "--time_based=1", f"--runtime={runtime}",
             "--output-format=json", f"--output={f.name}", *extra],
            check=True, capture_output=True)
        j = json.load(open(f.name))["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    return side["bw"] / 1024.0 if metric == "MiB/s" else side["iops"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per job run")
    ap.add_argument("--size", default="1G", help="volume size / fio size")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results", "nbd.json"))
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()

    ensure_tools()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "ferrovol-server", "-p", "ferrovol-cli"],
                       cwd=ROOT, check=True)
    server_bin = os.path.join(ROOT, "target", "release", "ferrovol-server")
    ferrovol = os.path.join(ROOT, "target", "release", "ferrovol")
    size = size_bytes(args.size)

    shm = tempfile.mkdtemp(prefix="ferrovol-bench-", dir="/dev/shm")
    procs = []
    try:
        srv = subprocess.Popen([server_bin, "--data", os.path.join(shm, "data"), "--listen", "127.0.0.1:0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=dict(os.environ, RUST_LOG="warn"))
        procs.append(srv)
        addr = srv.stdout.readline().strip().removeprefix("listening on ")
        nbd_port = free_port()
        procs.append(subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(nbd_port), "memory", str(size)],
                                      stderr=subprocess.DEVNULL))
        wait_port(nbd_port)

        print(f"prefilling {size >> 20} MiB on both...", flush=True)
        subprocess.run([ferrovol, "--server", addr, "bench", "raw", "--workload", "seq-read", "--runtime-s", "0.1",
                        "--size", str(size), "--prefill", "--json"], check=True, capture_output=True)
        subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{nbd_port}", "--rw=write",
                        "--bs=1m", f"--size={size}", "--iodepth=8"], check=True, capture_output=True)

        samples = {j[0]: {"ours": [], "peer": []} for j in JOBS}
        for rnd in range(args.rounds):
            for job in JOBS:
                order = ["ours", "peer"] if rnd % 2 == 0 else ["peer", "ours"]
                for who in order:
                    v = run_ours(ferrovol, addr, job, args.runtime, size) if who == "ours" \
                        else run_fio(nbd_port, job, args.runtime, size)
                    samples[job[0]][who].append(v)
                print(f"round {rnd + 1}/{args.rounds} {job[0]:<20} ours {samples[job[0]]['ours'][-1]:>10.0f}  "
                      f"peer {samples[job[0]]['peer'][-1]:>10.0f} {job[5]}", flush=True)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(shm, ignore_errors=True)

    rows = []
    print()
    print(f"{'job':<20} {'unit':>6} {'ours (median)':>14} {'nbd (median)':>14} {'ours/nbd':>9}")
    for job in JOBS:
        s = samples[job[0]]
        mo, mp = statistics.median(s["ours"]), statistics.median(s["peer"])
        ratio = mo / mp if mp else float("nan")
        rows.append({"job": job[0], "unit": job[5], "ours": s["ours"], "peer": s["peer"],
                     "ours_median": mo, "peer_median": mp, "ratio": ratio})
        print(f"{job[0]:<20} {job[5]:>6} {mo:>14.0f} {mp:>14.0f} {ratio:>8.2f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"peer": "fio nbd engine -> nbdkit memory (TCP 127.0.0.1)",
                   "ours": "ferrovol bench raw -> ferrovol-server, data dir on tmpfs (TCP 127.0.0.1)",
                   "rounds": args.rounds, "runtime_s": args.runtime, "size": size, "results": rows}, f, indent=2)
    print(f"\nraw samples: {args.out}")


if __name__ == "__main__":
    main()
