"""The connector's worker half (runs in each vLLM Worker process).

Per step, with the scheduler's StepPlan bound:
- `start_load`: one ACQUIRE for every chunk the plan loads (prefix=False, so
  one round trip for all requests), then per layer one paged-copy batch per
  tier from the leased slots into the layer's pages. On CPU the copies run
  there and then and the lease ends; on a GPU they are queued on a load
  stream (after whatever the compute stream queued, e.g. block zeroing), an
  event is recorded per layer, and `wait_layer` makes the compute stream wait
  for that layer only, so layer i+1's copy overlaps layer i's attention. Until
  vLLM has been seen calling wait_for_layer_load (not every backend does; vLLM
  0.32's CPU backend calls none of the per-layer hooks), the forward waits for
  all copies first.
  A chunk the daemon no longer has (evicted, failed its disk checksum) or
  whose copy failed, and every later chunk of that request, goes to
  `load_errors`; vLLM recomputes those blocks (kv_load_failure_policy
  "recompute") or fails the request ("fail"), it never runs on them.
- `save_layer`: at the first layer, one RESERVE for every chunk the plan
  saves (keys the daemon already holds are skipped by the daemon); per layer
  a gather of that layer's pages into the reserved slots. On a GPU the
  gather runs on a save stream that first waits for an event recorded on the
  compute stream, so it never reads a page before attention wrote it.
- `wait_save`: gathers any layer vLLM did not hand over (a block is only
  ever published whole), then commits; a save that fails part-way is
  aborted, never published. With async_save on a GPU the commit waits for
  the copy in a later step, and `finished` reports requests whose blocks the
  scheduler held (request_finished returned True) once their saves are done.

Daemon trouble never escapes: loads become load errors, saves are dropped,
and the link reconnects later (kvtierd.integrations.vllm.link).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtierd.integrations.vllm.layout import BlockLayout, LayoutError
from kvtierd.integrations.vllm.link import DAEMON_ERRORS, DaemonLink, Unavailable
from kvtierd.integrations.vllm.naming import rank_namespace
from kvtierd.integrations.vllm.plan import StepPlan

log = logging.getLogger("vllm.kvtierd")  # under vLLM's logger, so its handlers print it


@dataclass
class WorkerCounters:
    loaded_chunks: int = 0
    loaded_bytes: int = 0
    load_errors: int = 0         # vLLM blocks reported for recompute
    saved_chunks: int = 0
    saved_bytes: int = 0
    save_failures: int = 0
    daemon_errors: int = 0

    def take(self) -> dict[str, int]:
        out = dict(self.__dict__)
        for k in self.__dict__:
            setattr(self, k, 0)
        return out


@dataclass
class _PendingSave:
    reservation: Any
    event: Any
    nbytes: int
    chunks: int
    req_ids: set[str] = field(default_factory=set)


class WorkerHalf:
    def __init__(self, link: DaemonLink, *, num_blocks: int, blocks_per_chunk: int = 1,
                 layer_order: list[str] | None = None, tp_rank: int = 0, tp_size: int = 1,
                 pp_rank: int = 0, pp_size: int = 1, tier: str | None = None, async_save: bool = False,
                 backend: str = "auto"):
        self.link = link
        self.num_blocks = num_blocks
        self.group = blocks_per_chunk
        self.layer_order = layer_order
        self.rank = (tp_rank, tp_size, pp_rank, pp_size)
        self.tier = tier
        self.async_save = async_save
        self.backend = backend
        self.layout: BlockLayout | None = None
        self.disabled: str | None = None
        self.counters = WorkerCounters()
        self.load_errors: set[int] = set()
        self._plan: StepPlan | None = None
        self._ns: Any = None
        self._leases: list[Any] = []
        self._layer_events: dict[str, Any] = {}
        self._res: Any = None
        self._res_region: Any = None
        self._res_pages: np.ndarray | None = None
        self._res_offsets: np.ndarray | None = None
        self._res_reqs: set[str] = set()
        self._saved_layers: set[str] = set()
        self._pending: list[_PendingSave] = []
        self._delayed: set[str] = set()
        self._torch: Any = None
        self._hooks_seen = False      # vLLM calls wait_for_layer_load per layer (not every backend does)
        self.load_stream = self.save_stream = None

    # ------------------------------------------------------------------ set-up

    def register(self, kv_caches: dict[str, Any]) -> None:
        try:
            self.layout = BlockLayout(kv_caches, self.num_blocks, self.group, self.layer_order, self.backend)
        except (LayoutError, ValueError) as e:
            self.disabled = f"cannot map the KV cache onto kvtierd blocks: {e}"
            log.error("kvtierd connector disabled on this worker: %s", self.disabled)
            return
        import torch
        self._torch = torch
        if self.layout.is_cuda:
            dev = torch.device(self.layout.device)
            self.load_stream = torch.cuda.Stream(dev)
            self.save_stream = torch.cuda.Stream(dev)
        if self.tier is None:
            self.tier = "any" if self.layout.is_cuda else "host"
        log.info("kvtierd worker rank tp%d/%d pp%d/%d: %s", *self.rank, self.layout.describe())

    def _call(self, plan: StepPlan, fn: Any) -> tuple[Any, Any] | None:
        """(fn(namespace), namespace) for this rank's namespace; None if off, down or failing."""
        name = self._ns_name(plan)
        if name is None:
            return None
        try:
            return self.link.call(name, self.layout.block_bytes, plan.chunk_tokens, lambda ns: (fn(ns), ns))
        except Unavailable:
            return None
        except DAEMON_ERRORS:
            self.counters.daemon_errors += 1
            return None

    def _ns_name(self, plan: StepPlan) -> str | None:
        if self.disabled or self.layout is None:
            return None
        if plan.block_bytes and plan.block_bytes != self.layout.block_bytes:
            self.disabled = (f"the scheduler expects {plan.block_bytes}-byte blocks, this worker's KV cache makes "
                             f"{self.layout.block_bytes}-byte ones ({self.layout.describe()})")
            log.error("kvtierd connector disabled on this worker: %s", self.disabled)
            return None
        return rank_namespace(plan.namespace_base, *self.rank)

    def _fail(self, err: BaseException) -> None:
        self.counters.daemon_errors += 1
        self.link.broken(err)

    # ------------------------------------------------------------------ loads

    def start_load(self, plan: StepPlan) -> None:
        self._plan = plan
        self._ns = None
        self._saved_layers = set()
        self._delayed.update(plan.delayed)
        if not plan.loads:
            return
        all_ids = [b for t in plan.loads for b in t.block_ids]
        keys = [k for t in plan.loads for k in t.keys]
        # Two requests of one step may load the same chunk; the daemon takes each key once per request.
        uniq = list(dict.fromkeys(keys))
        got = self._call(plan, lambda ns: ns.acquire(uniq, prefix=False, tier=self.tier))
        if got is None:
            self._report(all_ids)
            return
        lease, ns = got
        self._ns = ns
        self._leases.append(lease)
        at = {k: i for i, k in enumerate(uniq)}
        lease_offsets = [lease.offsets[at[k]] for k in keys]
        lease_tiers = [lease.tiers[at[k]] for k in keys]
        g = self.group
        batches: dict[str, tuple[list[int], list[int]]] = {}   # tier -> (slot offsets, page ids)
        pos = 0
        loaded = 0
        for t in plan.loads:
            n = len(t.keys)
            offs = lease_offsets[pos:pos + n]
            tiers = lease_tiers[pos:pos + n]
            pos += n
            ok = 0
            while ok < n and offs[ok] >= 0 and tiers[ok] in ("host", "hbm"):
                ok += 1
            if ok < n:
                self._report(t.block_ids[ok * g:])
            for i in range(ok):
                o, p = batches.setdefault(tiers[i], ([], []))
                o.append(offs[i])
                p.extend(t.block_ids[i * g:(i + 1) * g])
            loaded += ok
        try:
            self._scatter(ns, batches)
        except DAEMON_ERRORS + (RuntimeError,) as e:
            log.warning("kvtierd load failed (%s); %d blocks go back to vLLM for recompute", e, len(all_ids))
            self._report(all_ids)
            self._fail(e)
            self._end_loads()
            return
        self.counters.loaded_chunks += loaded
        self.counters.loaded_bytes += loaded * self.layout.block_bytes
        if not self.layout.is_cuda:
            self._end_loads()
        elif not self._hooks_seen and self._layer_events:
            # Until vLLM has been seen calling wait_for_layer_load (some backends never do), the
            # forward waits for every layer's copy up front: correct first, overlapped once proven.
            cur = self._torch.cuda.current_stream(self.layout.device)
            for ev in self._layer_events.values():
                cur.wait_event(ev)

    def _scatter(self, ns: Any, batches: dict[str, tuple[list[int], list[int]]]) -> None:
        regions = ns.client.worker_regions()      # host slots are in the namespace's domain region
        parts = []
        for tier, (offs, pages) in batches.items():
            o = np.asarray(offs, dtype=np.int64)
            p = np.asarray(pages, dtype=np.int64)
            if np.unique(o).size == o.size:
                parts.append((regions.region(tier, ns.domain), o, p))
            else:   # the same chunk loaded into two requests' blocks: one batch per copy of it
                for i in range(o.size):
                    parts.append((regions.region(tier, ns.domain), o[i:i + 1],
                                  p[i * self.group:(i + 1) * self.group]))
        torch = self._torch
        if self.layout.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.layout.device))
            self.load_stream.wait_event(ready)    # after block zeroing and earlier writes to these blocks
        # The torch fallback (a GPU without cupy) runs on the current stream: make it the load stream.
        with torch.cuda.stream(self.load_stream) if self.layout.is_cuda else contextlib.nullcontext():
            for lc in self.layout.layers:
                for region, o, p in parts:
                    if self.layout.is_cuda:
                        lc.copier.scatter(region, o + lc.offset, p, stream=self.load_stream)
                    else:
                        lc.scatter_cpu(region, o, p)
                if self.layout.is_cuda:
                    ev = torch.cuda.Event()
                    ev.record(self.load_stream)
                    self._layer_events[lc.name] = ev

    def wait_layer(self, layer_name: str) -> None:
        if self.layout is not None and layer_name in self.layout.by_name:
            self._hooks_seen = True
        ev = self._layer_events.pop(layer_name, None)
        if ev is not None:
            self._torch.cuda.current_stream(self.layout.device).wait_event(ev)

    def _end_loads(self) -> None:
        if self._layer_events:
            cur = self._torch.cuda.current_stream(self.layout.device)
            for ev in self._layer_events.values():
                cur.wait_event(ev)          # a layer vLLM never waited for is still ordered before later work
            self._layer_events.clear()
        if self.load_stream is not None:
            self.load_stream.synchronize()   # the slots are ours only until the lease ends
        leases, self._leases = self._leases, []
        for lease in leases:
            try:
                lease.release()
            except DAEMON_ERRORS as e:
                self._fail(e)

    def _report(self, block_ids: list[int]) -> None:
        self.load_errors.update(block_ids)
        self.counters.load_errors += len(block_ids)

    def take_load_errors(self) -> set[int]:
        out, self.load_errors = self.load_errors, set()
        return out

    # ------------------------------------------------------------------ saves

    def _reserve(self) -> bool:
        plan = self._plan
        keys: list[bytes] = []
        pages: list[list[int]] = []
        owners: list[str] = []
        seen: set[bytes] = set()
        g = self.group
        for t in plan.saves:
            for i, k in enumerate(t.keys):
                if k in seen:
                    continue
                seen.add(k)
                keys.append(k)
                pages.append(t.block_ids[i * g:(i + 1) * g])
                owners.append(t.req_id)
        got = self._call(plan, lambda ns: ns.reserve(keys, tier="host"))
        if got is None:
            return False
        res, ns = got
        self._ns = ns
        self._res = res
        self._res_reqs = {owners[i] for i in res.index}
        self._res_offsets = np.asarray(res.offsets, dtype=np.int64)
        self._res_pages = np.asarray([p for i in res.index for p in pages[i]], dtype=np.int64)
        self._res_region = ns.client.worker_regions().region(res.tier, ns.domain) if res.index else None
        return True

    def save_layer(self, layer_name: str) -> None:
        plan = self._plan
        if plan is None or not plan.saves or self.layout is None or self.disabled:
            return
        if self._res is None and layer_name not in self._saved_layers:
            if not self._reserve():
                self._saved_layers = {lc.name for lc in self.layout.layers}   # nothing to save this step
                return
        lc = self.layout.by_name.get(layer_name)
        if lc is None or layer_name in self._saved_layers or self._res is None:
            return
        self._saved_layers.add(layer_name)
        self._gather(lc)

    def _gather(self, lc: Any) -> None:
        if self._res_region is None:
            return
        try:
            if self.layout.is_cuda:
                torch = self._torch
                written = torch.cuda.Event()
                written.record(torch.cuda.current_stream(self.layout.device))   # attention wrote the pages
                self.save_stream.wait_event(written)
                with torch.cuda.stream(self.save_stream):
                    lc.copier.gather(self._res_pages, self._res_region, self._res_offsets + lc.offset,
                                     stream=self.save_stream)
            else:
                lc.gather_cpu(self._res_region, self._res_offsets, self._res_pages)
        except (RuntimeError, ValueError) as e:
            log.warning("kvtierd save of %s failed (%s); dropping this step's saves", lc.name, e)
            self._abort()

    def _abort(self) -> None:
        res, self._res = self._res, None
        self.counters.save_failures += 1
        if res is not None:
            try:
                res.abort()
            except DAEMON_ERRORS as e:
                self._fail(e)

    def wait_save(self) -> None:
        if self._leases or self._layer_events:
            self._end_loads()
        plan = self._plan
        if (self._res is None and plan is not None and plan.saves and self.layout is not None
                and not self.disabled and not self._saved_layers):
            # vLLM handed over no layer (a backend without the per-layer hooks): save from the cache now
            self._reserve()
        if self._res is not None and self.layout is not None:
            if self.layout.is_cuda:
                self.save_stream.wait_stream(self._torch.cuda.current_stream(self.layout.device))
            for lc in self.layout.layers:
                if lc.name not in self._saved_layers and self._res is not None:
                    self._saved_layers.add(lc.name)
                    self._gather(lc)
        res, self._res = self._res, None
        if res is not None:
            ev = None
            if self.layout.is_cuda:
                ev = self._torch.cuda.Event()
                ev.record(self.save_stream)
            n = len(res.index)
            self._pending.append(_PendingSave(res, ev, n * self.layout.block_bytes, n, set(self._res_reqs)))
        self._commit(wait=not self.async_save)
        self._plan = None

    def _commit(self, wait: bool) -> None:
        keep: list[_PendingSave] = []
        for p in self._pending:
            if p.event is not None and not wait and not p.event.query():
                keep.append(p)
                continue
            if p.event is not None:
                p.event.synchronize()
            try:
                p.reservation.commit()
            except DAEMON_ERRORS as e:
                self._fail(e)
                self.counters.save_failures += 1
                continue
            self.counters.saved_chunks += p.chunks
            self.counters.saved_bytes += p.nbytes
        self._pending = keep

    def finished(self) -> set[str]:
        """Requests the scheduler holds whose saves are all committed."""
        self._commit(wait=False)
        busy = set().union(*(p.req_ids for p in self._pending)) if self._pending else set()
        done = {r for r in self._delayed if r not in busy}
        self._delayed -= done
        return done

    def shutdown(self) -> None:
        try:
            self._commit(wait=True)
        finally:
            self.link.close()
