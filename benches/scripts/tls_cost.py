#!/usr/bin/env python3
"""The cost of TLS on the wire: `ferrovol bench raw` against one ferrovol-server build, plaintext and
TLS (rustls, certificates from `ferrovol tls generate`), interleaved round by round, data dir on tmpfs.
Prints medians, the ratio TLS/plain, and the CPU seconds both processes used per GiB or per 100k ops.

    benches/scripts/tls_cost.py --bin target/release [--rounds 3] [--runtime 3]
"""
import argparse, json, os, shutil, statistics, subprocess, tempfile

JOBS = [("seq-read", 1), ("seq-write", 1), ("seq-read", 32), ("rand-read", 1), ("rand-write", 1), ("rand-read", 32)]


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=3.0)
    a = ap.parse_args()
    server, client = os.path.join(a.bin, "ferrovol-server"), os.path.join(a.bin, "ferrovol")
    pki = tempfile.mkdtemp(prefix="ferrovol-tls-")
    subprocess.run([client, "tls", "generate", pki, "--name", "127.0.0.1"], check=True, capture_output=True)
    results = {}
    for r in range(a.rounds):
        for mode in (["plain", "tls"] if r % 2 == 0 else ["tls", "plain"]):
            shm = tempfile.mkdtemp(prefix="ferrovol-tls-", dir="/dev/shm")
            args = [server, "--data", shm + "/d", "--listen", "127.0.0.1:0"]
            cargs = []
            if mode == "tls":
                args += ["--tls-cert", pki + "/server.pem", "--tls-key", pki + "/server-key.pem"]
                cargs = ["--tls-ca", pki + "/ca.pem"]
            srv = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            addr = srv.stdout.readline().split()[-1]
            prefill = ["--prefill"]
            for wl, qd in JOBS:
                cmd = [client, "--server", addr, *cargs, "bench", "raw", "--workload", wl, "--qd", str(qd),
                       "--runtime-s", str(a.runtime), "--size", "256MiB", "--json", *prefill]
                prefill = []
                s0 = cpu_of(srv.pid)
                p = subprocess.run(cmd, capture_output=True, text=True, check=True)
                s1 = cpu_of(srv.pid)
                j = json.loads(p.stdout)
                results.setdefault((wl, qd), {}).setdefault(mode, []).append((j, s1 - s0))
            srv.terminate()
            srv.wait()
            shutil.rmtree(shm, ignore_errors=True)
    shutil.rmtree(pki, ignore_errors=True)
    print(f"{'job':18} {'plain':>12} {'tls':>12} {'tls/plain':>9}  server CPU s per GiB or 100k ops (plain / tls)")
    for (wl, qd), d in results.items():
        seq = wl.startswith("seq")
        key = "mib_per_s" if seq else "iops"
        med = {m: statistics.median(x[0][key] for x in d[m]) for m in d}
        def cpu(m):
            per = [c / ((x["mib_per_s"] * x["seconds"] / 1024) if seq else (x["ops"] / 1e5)) for x, c in d[m]]
            return statistics.median(per)
        unit = "MiB/s" if seq else "IOPS"
        print(f"{wl + ' qd' + str(qd):18} {med['plain']:9.0f} {unit[:5]:5} {med['tls']:7.0f} {med['tls'] / med['plain']:9.2f}  "
              f"{cpu('plain'):.2f} / {cpu('tls'):.2f}")


if __name__ == "__main__":
    main()
