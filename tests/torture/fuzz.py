"""Torture (a): 100k fuzzed frames, valid ops on open namespaces mixed in; 0 crashes, 0 INTERNAL, blocks exact.

    python tests/torture/fuzz.py [--frames 100000] [--connections 4] [--seed 1]

The frames are spread over several connections in turn (each a tests/fuzz_frames.py
FrameFuzzer with its own seed), over a 4 MiB host tier on a disk tier so the fuzzed
writes keep demotion, disk reads and compaction busy. After the run: the daemon is
alive, replied INTERNAL to nothing, logged no traceback, holds no lease or
reservation, and every block it still has is byte-exact (the sentinels all there).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from _common import daemon, left_behind, verdict
from fuzz_frames import FrameFuzzer, Violation, verify_stored


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    d = daemon(["--host-bytes", "4MiB", "--set", "host.slab_bytes=1MiB", "--disk-bytes", "256MiB",
                "--set", "disk.segment_bytes=16MiB"])
    codes: collections.Counter = collections.Counter()
    problems = []
    served = checked = transient = 0
    t0 = time.monotonic()
    try:
        per = a.frames // a.connections
        for i in range(a.connections):
            fz = None
            try:
                fz = FrameFuzzer(d.socket, a.seed * 1000 + i)
                fz.run(per)
            except (Violation, OSError) as e:
                problems.append(f"connection {i}: {type(e).__name__}: {e}")
            finally:
                if fz is not None:
                    codes.update(fz.codes)
                    served += fz.served
                    transient += fz.transient_misses
                    fz.close()
            if d.proc.poll() is not None:
                problems.append(f"daemon exited with {d.proc.returncode}")
                break
        if d.proc.poll() is None:
            with d.client() as c:
                try:
                    checked = verify_stored(c)
                except Violation as e:
                    problems.append(str(e))
            problems += left_behind(d)
        elif "Traceback" in d.log():
            problems.append(f"traceback in the daemon log {d.log_path}")
    finally:
        d.stop()
    for p in problems:
        print("problem:", p)
    frames = sum(codes.values())
    return verdict("fuzz", not problems,
                   f"{frames} frames in {time.monotonic() - t0:.0f} s, {codes['OK']} OK, {codes['INTERNAL']} INTERNAL, "
                   f"{served} blocks served and checked, {checked} stored blocks exact after, "
                   f"{transient} times a sentinel read missed and a retry found it; log {d.log_path}")


if __name__ == "__main__":
    sys.exit(main())
