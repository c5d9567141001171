"""A client process used by the concurrency tests: random operations, every byte checked.

Usage: python load_worker.py SOCKET SEED SECONDS [overlap|random]
Prints 'ok <ops>' on success; exits 1 with a message on any wrong byte.
"""

import hashlib
import random
import sys
import time

import numpy as np

from kvtierd import Client, StoreFull

SIZES = {"small": 4096, "medium": 100_000, "large": 1 << 20}


def block_for(ns: str, key: bytes, size: int) -> bytes:
    seed = int.from_bytes(hashlib.blake2b(ns.encode() + key, digest_size=8).digest(), "little")
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def main() -> int:
    path, seed, seconds, mode = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    rng = random.Random(seed)
    ops = 0
    with Client(path) as c:
        if mode == "overlap":
            spaces = {"shared": c.namespace("shared", block_size=64 << 10)}
            universe = 64
        else:
            spaces = {name: c.namespace(name, block_size=size) for name, size in SIZES.items()}
            universe = 200
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            name = rng.choice(list(spaces))
            ns = spaces[name]
            keys = [b"key%d" % rng.randrange(universe) for _ in range(rng.randint(1, 8))]
            keys = list(dict.fromkeys(keys))
            op = rng.random()
            if op < 0.45:
                put = ns.put_many if op < 0.35 else ns.put_inline
                try:
                    put(keys, [block_for(name, k, ns.block_size) for k in keys])
                except StoreFull:
                    pass    # no room this instant (every slot leased or reserved): a legitimate answer
            elif op < 0.7:
                for k, b in zip(keys, ns.get_many(keys)):
                    if b is not None and b != block_for(name, k, ns.block_size):
                        print(f"WRONG BYTES for {name}/{k!r}", flush=True)
                        return 1
            elif op < 0.85:
                with ns.acquire(keys, prefix=False) as lease:
                    for k, v in zip(keys, lease.views):
                        if v is not None and bytes(v) != block_for(name, k, ns.block_size):
                            print(f"WRONG LEASED BYTES for {name}/{k!r}", flush=True)
                            return 1
            elif op < 0.95:
                ns.lookup(keys)
            elif mode != "overlap":
                ns.delete(keys)
            ops += 1
    print(f"ok {ops}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
