"""The maintenance thread: the disk engine's housekeeping, each step failing on its own.

Woken by the store or every 0.2 s, it runs these steps in order:

    epoch        record the boot epoch if that failed at open; move to a new
                 epoch before the per-epoch counters run out (names.py)
    tombstones   write pending tombstones
    sync         fdatasync under durability=interval
    reap         take blocks of deleted namespaces out of the index (batched)
    segments     delete segments with nothing live (and retry deletes that
                 failed), bring segment bytes under the high watermark
                 (capacity.py, batched)
    hints        write the hint file of each newly sealed segment (hints.py)
    compaction   compact the emptiest segment (compaction.py)
    direct_io    probe O_DIRECT again while an earlier probe could not tell

A step that fails with an OSError (ENOSPC, EIO, EROFS, ...) logs one line
naming the step and the error, counts it (maintenance_errors, io_errors)
and is retried after a back-off that doubles from 1 s up to 60 s; the other
steps go on meanwhile, and a success resets it. Nothing is rewritten on a
timer: the only periodic disk work is the interval sync.
"""

from __future__ import annotations

import logging
import threading
import time

from kvtierd.disk.compaction import compact_segment, pick_victim
from kvtierd.disk.types import ReportedError

log = logging.getLogger("kvtierd.disk")

MAX_BACKOFF = 60.0


class Maintenance(threading.Thread):
    """Background housekeeping for one SegmentStore; stop() and join() before close()."""

    def __init__(self, store):
        super().__init__(name="kvtierd-disk-maint", daemon=True)
        self.store = store
        self.stopping = threading.Event()
        self.paused = threading.Event()     # tests pause the segment steps to stage crashes
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._last_sync = time.monotonic()

    def stop(self) -> None:
        self.stopping.set()
        with self.store.lock:
            self.store.wake.notify_all()

    def _step(self, name: str, fn) -> None:
        now = time.monotonic()
        if now < self._retry_at.get(name, 0.0):
            return
        try:
            fn()
        except OSError as e:
            back = min(MAX_BACKOFF, max(1.0, self._backoff.get(name, 0.0) * 2))
            self._backoff[name] = back
            self._retry_at[name] = now + back
            self.store.counters["maintenance_errors"] += 1
            if isinstance(e, ReportedError):
                return                  # logged and counted where it happened; only back off
            self.store.counters["io_errors"] += 1
            log.error("disk tier: maintenance step %s failed (%s); retrying in %.0f s",
                      name, e.strerror or e, back)
            return
        if name in self._backoff:
            del self._backoff[name]
            self._retry_at.pop(name, None)
            log.info("disk tier: maintenance step %s works again", name)

    def _epoch(self) -> None:
        store = self.store
        if not store.epoch_durable:
            store.ensure_epoch()
            log.info("disk tier: boot epoch recorded; accepting new blocks")
        store.roll_epoch_if_due()

    def _sync(self) -> None:
        store = self.store
        if store.cfg.durability != "interval" or time.monotonic() - self._last_sync < store.cfg.fsync_interval_s:
            return
        self._last_sync = time.monotonic()
        err = store.sync_dirty()
        if err:
            raise OSError(0, err)

    def _segments(self) -> None:
        self.store.unlink_orphans()          # retries deletes that failed (it backs off itself)
        self.store.reap_dead_segments()
        self.store.make_room()

    def _compaction(self) -> None:
        victim = pick_victim(self.store)
        if victim is not None:
            compact_segment(self.store, victim, self.stopping)

    def run(self) -> None:
        store = self.store
        cfg = store.cfg
        while not self.stopping.is_set():
            with store.lock:
                store.wake.wait(timeout=min(0.2, cfg.fsync_interval_s))
            if self.stopping.is_set():
                break
            try:
                self._step("epoch", self._epoch)
                self._step("tombstones", store.flush_tombstones)
                self._step("sync", self._sync)
                if not store.recovered.is_set():
                    continue
                self._step("reap", store.reap_hidden)
                if self.paused.is_set():
                    continue
                self._step("segments", self._segments)
                self._step("hints", store.write_due_hints)
                self._step("compaction", self._compaction)
                self._step("direct_io", store.reprobe_direct)
            except Exception:
                # A bug, not an I/O error: say where, keep the thread alive, do not spin.
                store.counters["maintenance_errors"] += 1
                log.exception("disk tier: maintenance step failed; retrying")
                self.stopping.wait(1.0)
