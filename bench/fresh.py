"""The first puts into a new daemon's host region, with host.populate on and off.

    .venv/bin/python bench/fresh.py [--host 1GiB] [--block 1MiB] [--batch 32] [--rounds 3]

Each round starts a new daemon per case (a host tier only, 4 KiB pages), waits, with
host.populate on, until STATS says the whole region is populated (the time that took is the
populate column), then fills the region once from a client that has just connected: put_many of
blocks in batches, every page of it touched for the first time in this daemon's life. The
ceiling, timed right before each fill in the same process, is memcpy of the same bytes into one
preallocated buffer; the ratio is the fill's speed over it. Faults are this process's minor page
faults per MiB put.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _daemon import start_kvtierd  # noqa: E402

from kvtierd import Client  # noqa: E402
from kvtierd.config import format_size, parse_size  # noqa: E402


def wait_populated(sock: str, timeout: float = 300.0) -> float:
    """Seconds from now until the default domain's region is populated."""
    t0 = time.perf_counter()
    with Client(sock) as c:
        while True:
            d = c.stats()["domains"]["default"]
            if d["populated_bytes"] >= d["capacity_bytes"]:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError("the host region was not populated in time")
            time.sleep(0.005)


def one_fill(host: int, block: int, batch: int, populate: bool, data: list[bytes]) -> dict:
    with tempfile.TemporaryDirectory(prefix="kvtierd-bench-") as tmp:
        proc, sock = start_kvtierd(Path(tmp), host, "--set", f"host.populate={str(populate).lower()}")
        try:
            pop_s = wait_populated(sock) if populate else 0.0
            nblocks = (host - (64 << 20)) // block // batch * batch     # room left for slab rounding
            total = nblocks * block
            sink = memoryview(bytearray(total))

            def memcpy() -> None:
                for i in range(nblocks):
                    sink[i * block:(i + 1) * block] = data[i % batch]

            memcpy()                                   # the destination's pages, faulted in untimed
            t0 = time.perf_counter()
            memcpy()
            ceiling = time.perf_counter() - t0
            with Client(sock) as c:
                ns = c.namespace("fresh", block_size=block)
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                for s in range(0, nblocks, batch):
                    stored = ns.put_many([b"k%d" % i for i in range(s, s + batch)], data)
                    if stored != batch:
                        raise RuntimeError(f"only {stored} of {batch} blocks stored at block {s}")
                fill = time.perf_counter() - t0
                flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
            return {"gbps": total / fill / 1e9, "ratio": ceiling / fill, "faults": flt / (total >> 20),
                    "populate_s": pop_s, "ceiling_gbps": total / ceiling / 1e9}
        finally:
            proc.terminate()
            proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="1GiB")
    ap.add_argument("--block", default="1MiB")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    host, block = parse_size(a.host), parse_size(a.block)
    data = [os.urandom(block) for _ in range(a.batch)]
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(a.rounds):
        for populate in (True, False):               # alternated: drift on a shared machine hits both
            runs[populate].append(one_fill(host, block, a.batch, populate, data))
    print(f"first fill of a new daemon's {format_size(host)} host region (4 KiB pages), "
          f"{format_size(block)} blocks in batches of {a.batch}, {a.rounds} rounds (median, range)")
    print(f"{'host.populate':<14} {'populate s':>11} {'fill GB/s':>16} {'memcpy GB/s':>12} "
          f"{'ratio to memcpy':>18} {'faults/MiB':>11}")
    for populate in (True, False):
        rs = runs[populate]

        def col(key: str, fmt: str) -> str:
            v = [r[key] for r in rs]
            return f"{statistics.median(v):{fmt}} ({min(v):{fmt}}-{max(v):{fmt}})"
        print(f"{'on' if populate else 'off':<14} {col('populate_s', '.2f') if populate else '-':>11} "
              f"{col('gbps', '.2f'):>16} {statistics.median(r['ceiling_gbps'] for r in rs):>12.1f} "
              f"{col('ratio', '.2f'):>18} {statistics.median(r['faults'] for r in rs):>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
