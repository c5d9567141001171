"""Put/get throughput of 1 MiB blocks: inline (bytes in the frame) vs shared memory.

Starts its own daemon (host tier only), measures a plain memcpy of the same
bytes in the same run as the ceiling, and prints GB/s and the ratio to it.

    python bench/core.py [--block 1MiB] [--blocks 256] [--batch 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _daemon import start_kvtierd

from kvtierd import Client
from kvtierd.config import format_size, parse_size


def best_rate(nbytes: int, fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", default="1MiB")
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    bs = parse_size(a.block)
    total = bs * a.blocks
    data = [np.random.default_rng(i).integers(0, 256, bs, dtype=np.uint8).tobytes() for i in range(a.blocks)]

    # Ceiling: copying the same bytes once into a preallocated buffer (what the shm path must do).
    dst = bytearray(total)
    dv = memoryview(dst)

    def memcpy():
        for i, b in enumerate(data):
            dv[i * bs:(i + 1) * bs] = b
    ceiling = best_rate(total, memcpy, a.rounds)

    rows = []
    with tempfile.TemporaryDirectory(prefix="kvtierd-bench-") as tmp:
        proc, _ = start_kvtierd(Path(tmp), total * 2 + (64 << 20))
        try:
            with Client(Path(tmp) / "kvtierd.sock") as c:
                for path in ("shared memory", "inline"):
                    ns = c.namespace(f"bench-{path}", block_size=bs)
                    gen = [0]

                    def put():
                        gen[0] += 1
                        keys = [b"%d-%d" % (gen[0], i) for i in range(a.blocks)]
                        for s in range(0, a.blocks, a.batch):
                            ks, bl = keys[s:s + a.batch], data[s:s + a.batch]
                            n = ns.put_many(ks, bl) if path == "shared memory" else ns.put_inline(ks, bl)
                            assert n == len(ks)
                        ns.delete(keys)

                    keys = [b"get-%d" % i for i in range(a.blocks)]
                    ns.put_many(keys, data)

                    def get():
                        for s in range(0, a.blocks, a.batch):
                            ks = keys[s:s + a.batch]
                            out = ns.get_many(ks) if path == "shared memory" else ns.get_inline(ks)
                            assert out[0] is not None

                    rows.append((path, "put", best_rate(total, put, a.rounds)))
                    rows.append((path, "get", best_rate(total, get, a.rounds)))
                    if path == "shared memory":
                        # get_into copies into buffers the caller reuses: no allocation, no page faults.
                        outs = [bytearray(bs) for _ in range(a.batch)]

                        def get_into():
                            for s in range(0, a.blocks, a.batch):
                                assert all(ns.get_into(keys[s:s + a.batch], outs))
                        rows.append((path, "get_into", best_rate(total, get_into, a.rounds)))
        finally:
            proc.terminate()
            proc.wait(30)

    print(f"\nkvtierd put/get, {format_size(bs)} blocks, {a.blocks} blocks per round, batches of {a.batch}, "
          f"median of {a.rounds} rounds, {os.cpu_count()} cores")
    print(f"{'path':<15} {'op':<9} {'GB/s':>7} {'ratio to memcpy':>16}")
    print(f"{'memcpy ceiling':<15} {'':<9} {ceiling:>7.2f} {1.0:>16.2f}")
    for path, op, rate in rows:
        print(f"{path:<15} {op:<9} {rate:>7.2f} {rate / ceiling:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
