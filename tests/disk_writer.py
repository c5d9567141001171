"""A writer process for tests/test_disk_daemon.py: puts blocks into a daemon until it goes away.

Usage: python tests/disk_writer.py SOCKET PREFIX BLOCK_SIZE [DELETE_EVERY [PAUSE_S]]

Keys are PREFIX + a counter; a block's bytes are derived from its key alone
(`content`), so a reader can tell a right block from a wrong one without
knowing who wrote it. Each batch is reserved, filled and committed; only when
the daemon confirms every reserved key in the commit reply is a line
"ACK key-hex ..." printed, so ACK means "the daemon said it is stored". Every
DELETE_EVERY-th batch deletes one older acknowledged key (leaving dead records
on disk for compaction to reclaim) and prints "DEL key-hex" once the daemon
confirmed the delete. PAUSE_S between batches bounds how much a run writes.
When the daemon dies the writer exits with status 0.
"""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np

BATCH = 8


def content(key: bytes, size: int) -> bytes:
    """Deterministic, key-specific bytes: any mix-up of blocks or offsets shows."""
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()


def main(argv: list[str]) -> int:
    from kvtierd import Client
    socket_path, prefix, block_size = argv[0], argv[1].encode(), int(argv[2])
    delete_every = int(argv[3]) if len(argv) > 3 else 0
    pause = float(argv[4]) if len(argv) > 4 else 0.0
    n = 0
    acked: list[bytes] = []
    try:
        with Client(socket_path, timeout=10.0, reconnect_attempts=0) as c:   # exits when the daemon dies
            ns = c.namespace("crash", block_size=block_size)
            print("READY", flush=True)
            batch_no = 0
            while True:
                keys = [prefix + b"-%06d" % (n + i) for i in range(BATCH)]
                n += BATCH
                res = ns.reserve(keys)
                for k, view in zip(res.keys, res.views):
                    view[:] = content(k, block_size)
                done = res.commit()
                if res.keys and done == len(res.keys):
                    acked += res.keys
                    print("ACK " + " ".join(k.hex() for k in res.keys), flush=True)
                batch_no += 1
                if delete_every and batch_no % delete_every == 0 and len(acked) > 4 * BATCH:
                    victim = acked.pop(len(acked) // 3)
                    ns.delete([victim])
                    print("DEL " + victim.hex(), flush=True)
                if pause:
                    time.sleep(pause)
    except OSError:             # ConnectionError, BrokenPipeError: the daemon is gone
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
