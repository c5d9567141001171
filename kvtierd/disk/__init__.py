"""The disk tier's storage engine: append-only, checksummed segment files.

Bitcask-shaped: records are appended to segment files, an in-memory keydir
maps (namespace, key) to the newest record, a checkpoint plus a scan of what
follows it rebuilds the keydir at start, and compaction rewrites segments
whose records have mostly died. One module per job:

- format       record and checkpoint byte layouts, the checksum
- aligned_io   aligned buffers, O_DIRECT detection, batched pwritev/preadv, fault injection
- segments     SegmentStore: segment files, keydir, LRU, capacity, batched reads/writes
- checkpoint   the checksummed keydir snapshot
- recovery     checkpoint load + segment scan, incremental, with progress
- compaction   rewriting live records out of mostly-dead segments, throttled
- fsck         offline verification and repair (`kvtierd fsck STATE_DIR [--repair]`)

kvtierd.tiers.disk.DiskTier wraps SegmentStore for the asyncio store.
"""

from kvtierd.disk.segments import SegmentStore

__all__ = ["SegmentStore"]
