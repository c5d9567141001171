"""What host.verify_on_acquire costs a reader: acquire + copy-out of 1 MiB blocks with and without it.

Starts two daemons (host tier only), one with the checksum check on acquire and one without, stores the
same blocks in each, then times acquire + copy into a preallocated buffer + release in batches, best of
--rounds; a plain memcpy of the same bytes in the same run is the ceiling. Prints GB/s, the ratio to the
ceiling and the cost of the check as a fraction of load throughput (the default stays on while that is
under 10%).

    python bench/verify_cost.py [--block 1MiB] [--blocks 256] [--batch 32] [--rounds 7]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _daemon import Daemon

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvtierd import Client  # noqa: E402
from kvtierd.config import format_size, parse_size  # noqa: E402


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", default="1MiB")
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    size = parse_size(a.block)
    total = size * a.blocks
    data = [np.random.default_rng(i).bytes(size) for i in range(a.blocks)]
    out = np.empty(total, dtype=np.uint8)
    src = np.frombuffer(b"".join(data), dtype=np.uint8)
    ceiling = total / best(lambda: np.copyto(out, src), a.rounds) / 1e9
    rates = {}
    for verify in ("true", "false"):
        with tempfile.TemporaryDirectory() as tmp:
            d = Daemon(Path(tmp), ["--host-bytes", str(total * 2 + (64 << 20)), "--disk-bytes", "0",
                                   "--set", f"host.verify_on_acquire={verify}"]).start()
            try:
                with Client(d.sock) as c:
                    ns = c.namespace("verify-cost", size)
                    keys = [b"k%d" % i for i in range(a.blocks)]
                    ns.put_many(keys, data)

                    def load() -> None:
                        pos = 0
                        for i in range(0, a.blocks, a.batch):
                            with ns.acquire(keys[i:i + a.batch]) as lease:
                                for v in lease.views:
                                    out[pos:pos + size] = np.frombuffer(v, dtype=np.uint8)
                                    pos += size
                    load()
                    assert out.tobytes()[:size] == data[0]
                    rates[verify] = total / best(load, a.rounds) / 1e9
            finally:
                d.stop()
    print(f"# {format_size(size)} blocks x {a.blocks}, batches of {a.batch}, best of {a.rounds}")
    print(f"memcpy ceiling            {ceiling:6.2f} GB/s")
    for verify, label in (("false", "acquire + copy-out, verify off"), ("true", "acquire + copy-out, verify on ")):
        print(f"{label} {rates[verify]:6.2f} GB/s  ({rates[verify] / ceiling:.2f} of memcpy)")
    print(f"cost of verify_on_acquire: {1 - rates['true'] / rates['false']:.1%} of load throughput")


if __name__ == "__main__":
    main()
