"""The disk tier's storage engine: append-only, checksummed segment files.

Bitcask-shaped: records are appended to segment files, an in-memory keydir
maps (namespace, key) to the newest record, each sealed segment gets a hint
file listing its records so a start reads hints instead of segments, and
compaction rewrites segments whose records have mostly died. One module per
job:

- format       the record byte layout, the checksum
- names        file names of the directory, strays, epoch and sequence-number spaces
- types        the shared data types (segments, entries, tombstones, jobs, plans)
- keydir       the index: entries in LRU order, per-namespace maps, tombstones
- shardmap     the index's maps, split so that growing never copies a big table at once
- aligned_io   aligned buffers, O_DIRECT detection, batched pwritev/preadv, fault injection
- jobs         running one write or read job (iovecs, checksums)
- capacity     room accounting, LRU eviction, segment retirement (SegmentStore mixin)
- segments     SegmentStore: segment files, batched reads/writes/deletes, sealing, hints due
- hints        per-segment hint files
- recovery     hints + segment scans at start, incremental, with progress
- compaction   rewriting live records out of mostly-dead segments, throttled
- maintenance  the background thread: tombstones, syncs, hints, room, compaction, retries
- tier         DiskTier, the asyncio adapter the store uses
- fsck         offline verification and repair (`kvtierd fsck STATE_DIR [--repair]`)
"""

from kvtierd.disk.segments import SegmentStore
from kvtierd.disk.tier import DiskTier

__all__ = ["DiskTier", "SegmentStore"]
