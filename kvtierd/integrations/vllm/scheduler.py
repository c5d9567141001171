"""The connector's scheduler half (runs in vLLM's EngineCore process).

Per waiting request, `matched_tokens` asks the daemon once how many leading
chunks it holds past vLLM's own prefix-cache hit: one LOOKUP per rank
namespace (TP ranks each hold their own heads; a chunk counts only if every
rank has it, so every rank can load what the scheduler promised), bounded by
the client timeout. It always leaves at least one prompt token to compute
(its logits are the point), and any daemon error means 0 hits, never an
exception. `after_alloc` records which vLLM blocks the hit fills;
`build_plan` hands the step's loads and saves to the workers; saves cover
the prompt chunks that become complete in this step (chunked prefill saves
as it goes) and never chunks vLLM found in its local cache or loaded.

Requests are duck-typed (request_id, block_hashes, num_tokens,
num_prompt_tokens) so the half is testable without an engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from kvtierd.integrations.vllm.link import DAEMON_ERRORS, DaemonLink, Unavailable
from kvtierd.integrations.vllm.naming import NamespaceSpec, all_rank_namespaces, chunk_keys
from kvtierd.integrations.vllm.plan import StepPlan, Transfer

log = logging.getLogger("vllm.kvtierd")  # under vLLM's logger, so its handlers print it


@dataclass
class _Req:
    request: Any
    block_ids: list[int] = field(default_factory=list)
    saved_chunks: int = 0        # chunks [0, saved_chunks) are saved, loaded or were local hits
    had_saves: bool = False


@dataclass
class SchedulerCounters:
    lookups: int = 0
    lookup_errors: int = 0
    hit_tokens: int = 0
    queried_tokens: int = 0
    saves_planned: int = 0       # chunks handed to workers to save

    def take(self) -> dict[str, int]:
        out = dict(self.__dict__)
        for k in self.__dict__:
            setattr(self, k, 0)
        return out


class SchedulerHalf:
    def __init__(self, spec: NamespaceSpec, link: DaemonLink, *, tp_size: int = 1, pp_size: int = 1,
                 hash_block_size: int | None = None, load: bool = True, save: bool = True,
                 async_save: bool = False, disabled_reason: str | None = None):
        self.spec = spec
        self.link = link
        self.base = spec.base_name()
        self.rank_names = all_rank_namespaces(self.base, tp_size, pp_size)
        hb = hash_block_size or spec.block_size
        if spec.chunk_tokens % hb:
            raise ValueError(f"a chunk of {spec.chunk_tokens} tokens is not a whole number of vLLM's "
                             f"{hb}-token hash blocks")
        self.hashes_per_chunk = spec.chunk_tokens // hb
        self.load_enabled = load
        self.save_enabled = save
        self.async_save = async_save
        self.disabled_reason = disabled_reason
        if disabled_reason:
            log.warning("kvtierd connector disabled: %s", disabled_reason)
        self.reqs: dict[str, _Req] = {}
        self.pending_loads: dict[str, tuple[int, list[bytes]]] = {}   # req -> (first chunk, keys)
        self.loads_ready: dict[str, Transfer] = {}
        self.delayed: list[str] = []      # finished requests held for their saves, told to workers next step
        self.counters = SchedulerCounters()

    @property
    def active(self) -> bool:
        return self.disabled_reason is None

    # ------------------------------------------------------------------ lookup

    def _full_chunks(self, request: Any, upto_tokens: int) -> int:
        c = self.spec.chunk_tokens
        return min(upto_tokens // c, len(request.block_hashes) // self.hashes_per_chunk)

    def matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        """Tokens beyond num_computed_tokens that kvtierd can supply (0 on any trouble)."""
        self.pending_loads.pop(request.request_id, None)
        if not (self.active and self.load_enabled):
            return 0
        c = self.spec.chunk_tokens
        if num_computed_tokens % c:
            return 0     # a local hit ending inside a chunk: a chunk loads whole, so it cannot start there
        start = num_computed_tokens // c
        stop = self._full_chunks(request, request.num_tokens - 1)   # >= 1 token left to compute
        if stop <= start:
            return 0
        keys = chunk_keys(request.block_hashes, self.hashes_per_chunk, start, stop)
        hits = self._lookup(keys)
        self.counters.queried_tokens += len(keys) * c
        if hits <= 0:
            return 0
        self.pending_loads[request.request_id] = (start, keys[:hits])
        self.counters.hit_tokens += hits * c
        return hits * c

    def _lookup(self, keys: list[bytes]) -> int:
        hits = len(keys)
        self.counters.lookups += 1
        for name in self.rank_names:
            want = keys[:hits]
            try:
                hits = min(hits, self.link.call(name, self.spec.block_bytes, self.spec.chunk_tokens,
                                                lambda ns, want=want: ns.lookup(want)))
            except Unavailable:
                return 0
            except DAEMON_ERRORS:
                self.counters.lookup_errors += 1
                return 0
            if hits == 0:
                break
        return hits

    # ------------------------------------------------------------------ allocation and plans

    def after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        rid = request.request_id
        st = self.reqs.get(rid)
        if st is None:
            st = self.reqs[rid] = _Req(request)
        st.request = request
        st.block_ids = list(block_ids)
        pending = self.pending_loads.pop(rid, None)
        if num_external_tokens <= 0 or pending is None:
            return
        start, keys = pending
        c, g = self.spec.chunk_tokens, self.spec.blocks_per_chunk
        n = min(len(keys), -(-num_external_tokens // c))
        ids = st.block_ids[start * g:(start + n) * g]
        if len(ids) != n * g:
            log.warning("request %s: %d blocks allocated, %d needed for the kvtierd load; not loading",
                        rid, len(st.block_ids), (start + n) * g)
            return
        self.loads_ready[rid] = Transfer(rid, keys[:n], ids)

    def build_plan(self, scheduler_output: Any) -> StepPlan:
        plan = StepPlan(self.base, self.spec.block_bytes, self.spec.page_bytes, self.spec.chunk_tokens)
        plan.delayed, self.delayed = self.delayed, []
        if not self.active:
            self.loads_ready.clear()
            return plan
        computed: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            st = self.reqs.get(new.req_id)
            if st is not None:
                st.block_ids = list(new.block_ids[0])
                computed[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, rid in enumerate(cached.req_ids):
            st = self.reqs.get(rid)
            if st is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in resumed:
                st.block_ids = list(new_ids[0]) if new_ids is not None else []
                st.saved_chunks = 0
            elif new_ids is not None:
                st.block_ids.extend(new_ids[0])
            computed[rid] = cached.num_computed_tokens[i]
        for rid, t in self.loads_ready.items():
            if rid in computed:
                plan.loads.append(t)
        self.loads_ready.clear()
        if self.save_enabled:
            self._plan_saves(plan, computed, scheduler_output.num_scheduled_tokens)
        return plan

    def _plan_saves(self, plan: StepPlan, computed: dict[str, int], scheduled: dict[str, int]) -> None:
        c, g = self.spec.chunk_tokens, self.spec.blocks_per_chunk
        for rid, n_computed in computed.items():
            st = self.reqs[rid]
            req = st.request
            end = min(n_computed + scheduled.get(rid, 0), req.num_prompt_tokens)
            first = max(st.saved_chunks, n_computed // c)
            last = min(self._full_chunks(req, end), len(st.block_ids) // g)
            if last <= first:
                continue
            keys = chunk_keys(req.block_hashes, self.hashes_per_chunk, first, last)
            plan.saves.append(Transfer(rid, keys, st.block_ids[first * g:last * g]))
            st.saved_chunks = last
            st.had_saves = True
            self.counters.saves_planned += last - first

    def finished(self, request: Any) -> bool:
        """True when the request's blocks must stay allocated until the workers report its saves done."""
        st = self.reqs.pop(request.request_id, None)
        self.pending_loads.pop(request.request_id, None)
        self.loads_ready.pop(request.request_id, None)
        if self.async_save and st is not None and st.had_saves:
            self.delayed.append(request.request_id)
            return True
        return False
