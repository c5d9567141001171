"""DiskTier: the asyncio face of the disk engine (SegmentStore), the object the store talks to.

Every method that may touch the disk is async and runs its I/O in a bounded
thread pool (disk.io_threads threads, at most disk.io_depth I/Os submitted at
once), so the event loop only does bounded in-memory bookkeeping: lookups,
LRU touches, offset allocation, publishing. Making room (eviction, retiring
segments, rewriting the tombstones they held, unlinking them) runs in the
pool before a batch is planned, in bounded lock holds (capacity.py). A
batch becomes several jobs (one pwritev/preadv of up to disk.io_bytes each)
that run in parallel. Recovery runs in its own thread from start(); the
maintenance thread (maintenance.py) writes tombstones and hint files, syncs
under durability=interval, reaps deleted namespaces and compacts.

What "committed" (write_batch returned True) means, per disk.durability:

- batch:    the records and the segment's size were fdatasync'ed (and a new
            segment's directory entry fsync'ed) before write_batch returned:
            they survive a crash of the process and of the machine.
- interval: the bytes reached the kernel (page cache, or the device with
            O_DIRECT) before write_batch returned: they survive a crash of the
            process at once, and a power loss once the maintenance thread's
            next fdatasync ran, at most disk.fsync_interval_s later.
- never:    as interval, but synced only when a segment is compacted or
            sealed (before its hint file is written) and at clean close: a
            power loss may lose anything written since. For a cache that can
            recompute, often the right choice.

In every mode a block that comes back from read_batch was verified against
its checksum, so a power loss can lose blocks but never return wrong bytes.
Deletes are effective at once; they are durable after the next tombstone
flush (within ~0.2 s, synced per the same policy).

The payload views given to write_batch are read during the call only (no
copy is kept); views given to read_batch are written during the call only.
A call that is cancelled still finishes its I/O in the background (shielded)
so the offsets it claimed are accounted for.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtierd.disk.format import record_size
from kvtierd.disk.maintenance import Maintenance
from kvtierd.disk.segments import SegmentStore

log = logging.getLogger("kvtierd.disk")

SWITCH_INTERVAL = 0.0005    # seconds; see start()


class DiskTier:
    def __init__(self, cfg, state_dir: Path) -> None:
        self.cfg = cfg
        self.store = SegmentStore(cfg, Path(state_dir))
        self._pool = ThreadPoolExecutor(max_workers=cfg.io_threads, thread_name_prefix="kvtierd-disk-io")
        self._sem: asyncio.Semaphore | None = None
        self._plan_lock: asyncio.Lock | None = None
        self._recovered: asyncio.Event | None = None
        self._recovery_thread: threading.Thread | None = None
        self._maint: Maintenance | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.recovery_error = ""

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the directory and begin recovery in the background; returns at once."""
        loop = asyncio.get_running_loop()
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            # The engine's threads run Python (recovery, eviction, compaction); the loop thread
            # waits for the GIL up to one switch interval per runnable thread. CPython's 5 ms
            # default alone would use up the loop's lag budget.
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._sem = asyncio.Semaphore(self.cfg.io_depth)
        self._plan_lock = asyncio.Lock()
        self._recovered = asyncio.Event()
        await loop.run_in_executor(self._pool, self.store.open)

        def recover() -> None:
            # Python's cyclic GC would stop every thread, the loop included, for 0.1 s and
            # more while it walks the growing index (a full collection runs each time the
            # heap grew by a quarter). The index's own objects need no cyclic GC (entries are
            # plain tuples, freed by reference counting), so collection pauses during
            # recovery, and the index built is then frozen (gc.freeze: moved out of the
            # collector's sight, still freed normally), so later full collections do not
            # walk it either. The cost: cyclic garbage made elsewhere during recovery is
            # frozen with it and never collected, a one-off of at most seconds' worth.
            gc_was_on = gc.isenabled()
            gc.disable()
            try:
                self.store.recover()
            except Exception as e:          # the tier still serves what it has and new writes
                self.recovery_error = f"{type(e).__name__}: {e}"
                log.exception("disk tier: recovery failed; serving what was recovered")
                self.store.progress["done"] = True
                self.store.recovered.set()
            finally:
                if gc_was_on:
                    gc.freeze()
                    gc.enable()
                loop.call_soon_threadsafe(self._recovered.set)

        self._recovery_thread = threading.Thread(target=recover, name="kvtierd-disk-recovery", daemon=True)
        self._recovery_thread.start()
        self._maint = Maintenance(self.store)
        self._maint.start()

    async def wait_recovered(self) -> None:
        if self._recovered is not None:
            await self._recovered.wait()

    def recovery_progress(self) -> dict:
        p = dict(self.store.progress)
        return {k: p[k] for k in ("done", "records", "bytes_scanned", "fraction", "seconds")}

    async def close(self) -> None:
        """Finish in-flight I/O, stop the threads, write pending tombstones, sync, write hints."""
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._maint is not None:
            self._maint.stop()
            await loop.run_in_executor(None, self._maint.join)
        if self._recovery_thread is not None:
            await loop.run_in_executor(None, self._recovery_thread.join)
        await loop.run_in_executor(self._pool, self.store.close)
        self._pool.shutdown(wait=True)

    # ------------------------------------------------------------ lookups (no I/O)

    def contains(self, ns: str, key: bytes) -> bool:
        return self.store.contains(ns, key)

    def block_size(self, ns: str, key: bytes) -> int | None:
        return self.store.block_size(ns, key)

    def keys(self, ns: str) -> Iterable[bytes]:
        return self.store.keys(ns)

    def delete(self, ns: str, key: bytes) -> bool:
        return self.store.delete(ns, key)

    def delete_namespace(self, ns: str) -> int:
        return self.store.delete_namespace(ns)

    def stats(self) -> dict:
        s = self.store.stats()
        s["recovery_done"] = bool(self.store.progress["done"])
        s["recovery_error"] = self.recovery_error
        s["hint_problems"] = len(self.store.hint_problems)
        return s

    # ------------------------------------------------------------ batched I/O

    async def write_batch(self, items: list[tuple[str, bytes, memoryview]]) -> list[bool]:
        """Store blocks; True = stored (durable per disk.durability). Never raises for I/O errors."""
        if not items:
            return []
        if self._closing or not self.store.opened:
            return [False] * len(items)
        return await self._shielded(self._write(items))

    async def read_batch(self, items: list[tuple[str, bytes, memoryview]]) -> list[bool]:
        """Read and verify blocks into the given views; False = miss (absent, failed, corrupt)."""
        if not items:
            return []
        if self._closing or not self.store.opened:
            return [False] * len(items)
        return await self._shielded(self._read(items))

    async def _shielded(self, coro) -> list[bool]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def _write(self, items) -> list[bool]:
        store = self.store
        loop = asyncio.get_running_loop()
        incoming = sum(record_size(memoryview(p).nbytes) for _ns, _k, p in items)
        # Batches are planned in the order they came (asyncio.Lock is FIFO): the keydir's LRU
        # order is the order records are published, and a batch that waited for room must
        # not fall behind one that came after it, or the tier would evict the newer blocks.
        async with self._plan_lock:
            if store.needs_room(incoming):
                await loop.run_in_executor(self._pool, store.make_room_for, incoming)
            plan = store.prepare_write(items)
        err = "not finished"
        try:
            if plan.reclaim or plan.carry:
                # Segments retired to make room go first, so the files stay within disk.bytes.
                await loop.run_in_executor(self._pool, store.reclaim, plan)
            await self._run_jobs(store.run_write_job, plan.jobs)
            err = ""
            if plan.sync and plan.jobs and all(j.ok for j in plan.jobs):
                segs = {j.seg for j in plan.jobs}
                err = await loop.run_in_executor(self._pool, store.sync_segments, segs)
        finally:
            results = store.finish_write(plan, err)
        return results

    async def _read(self, items) -> list[bool]:
        store = self.store
        plan = store.prepare_read(items)
        try:
            await self._run_jobs(store.run_read_job, plan.jobs)
        finally:
            results = store.finish_read(plan)
        return results

    async def _run_jobs(self, fn, jobs) -> None:
        if not jobs:
            return
        loop = asyncio.get_running_loop()
        sem = self._sem

        async def one(job) -> None:
            async with sem:
                await loop.run_in_executor(self._pool, fn, job)

        if len(jobs) == 1:
            await one(jobs[0])
        else:
            await asyncio.gather(*(one(j) for j in jobs))
