"""Torture (d): 32 clients for 10 minutes; 0 errors, every byte checked, daemon memory bounded.

    python tests/torture/soak.py [--minutes 10] [--clients 32]

Clients are tests/load_worker.py processes (random puts, inline puts, gets, leases,
lookups and deletes over three block sizes, every byte read checked; a quarter of
them on one namespace of overlapping keys) against a 64 MiB host tier over a disk
tier. The daemon's memory is sampled from /proc every 2 s: resident memory minus
the mapped host region (RssShmem) is what the daemon itself allocated, and must
not grow after warm-up (the first quarter of the run) by more than 20% or 32 MiB,
whichever is larger. Errors: any client that fails or reads a wrong byte, any
refusal or internal error the daemon counts, a traceback in its log.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _common import TESTS, daemon, memory, mib, raw_stats, verdict

WORKER = str(TESTS / "load_worker.py")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    a = ap.parse_args()
    seconds = a.minutes * 60
    d = daemon(["--host-bytes", "64MiB", "--set", "host.slab_bytes=2MiB", "--disk-bytes", "256MiB",
                "--set", "disk.segment_bytes=32MiB"])
    problems: list[str] = []
    samples: list[tuple[float, dict]] = []
    t0 = time.monotonic()
    procs = []
    try:
        procs = [subprocess.Popen([sys.executable, WORKER, d.socket, str(seed), str(seconds),
                                   "overlap" if seed % 4 == 0 else "random"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for seed in range(a.clients)]
        next_sample = time.monotonic()
        while any(p.poll() is None for p in procs) and time.monotonic() < t0 + seconds + 120:
            if d.proc.poll() is not None:
                problems.append(f"daemon exited with {d.proc.returncode}")
                break
            if time.monotonic() >= next_sample:
                samples.append((time.monotonic() - t0, memory(d.proc.pid)))
                next_sample += 2.0
            time.sleep(0.2)
        ops = 0
        for p in procs:
            if p.poll() is None:
                p.kill()
                problems.append(f"client {p.pid} still running after the run")
            out = p.communicate()[0]
            if p.returncode != 0 or not out.startswith("ok"):
                problems.append(f"client {p.pid} exited {p.returncode}: {(out.strip().splitlines() or [''])[-1][:300]}")
            else:
                ops += int(out.split()[1])
        if d.proc.poll() is None:
            s = raw_stats(d.socket)
            if s["errors"]:
                problems.append(f"errors counted by the daemon: {s['errors']}")
            if s["leases"] or s["reservations"]:
                problems.append(f"{s['leases']} leases, {s['reservations']} reservations left")
        if "Traceback" in d.log():
            problems.append(f"traceback in the daemon log {d.log_path}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        d.stop()
    warm = [m["private"] for t, m in samples if t >= seconds / 4] or [0]
    first, peak = warm[0], max(warm)
    growth = peak - first
    if samples and growth > max(32 << 20, first * 0.2):
        problems.append(f"daemon memory grew by {mib(growth)} after warm-up ({mib(first)} -> {mib(peak)})")
    for p in problems:
        print("problem:", p)
    rss = [m["rss"] for _, m in samples] or [0]
    return verdict("soak", not problems,
                   f"{a.clients} clients for {a.minutes:g} min, {ops} operations, {len(problems)} problems; "
                   f"daemon private memory {mib(first)} after warm-up, peak {mib(peak)}; "
                   f"RSS with host region {mib(min(rss))}..{mib(max(rss))} over {len(samples)} samples; "
                   f"log {d.log_path}")


if __name__ == "__main__":
    sys.exit(main())
