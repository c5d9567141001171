"""Checksums of host-tier bytes: taken at commit, checked where bytes leave the daemon's trust.

A host slot is shared memory that admitted clients map, so a block's bytes can
change behind the daemon's back (a stray or stalled writer, a bug in a client).
Its xxh3-64 is taken when it is committed (or arrives from disk, remote or HBM)
and checked before the block is persisted to disk, sent to the remote tier, or
(host.verify_on_acquire) leased to a reader; a mismatch makes it a miss. Large
batches are hashed in a thread so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

import xxhash

THREAD_MIN_BYTES = 4 << 20     # below this, hashing inline costs less than a thread hop

sum_of = xxhash.xxh3_64_intdigest   # one block's checksum


def sums_of(views: Sequence[memoryview]) -> list[int]:
    return [sum_of(v) for v in views]


async def sums(views: Sequence[memoryview]) -> list[int]:
    if sum(map(len, views)) < THREAD_MIN_BYTES:
        return sums_of(views)
    return await asyncio.to_thread(sums_of, views)
