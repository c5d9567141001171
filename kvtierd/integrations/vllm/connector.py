"""KVTierConnector: the vLLM v1 KVConnectorBase_V1 that plugs kvtierd into vLLM.

A thin shell: it reads vLLM's config, derives the namespace, and forwards
each hook to the half that runs in this process (scheduler.SchedulerHalf in
EngineCore, worker.WorkerHalf in each Worker). Loads are synchronous from
the scheduler's point of view (get_num_new_matched_tokens returns
load_kv_async=False): the blocks are copied in while the step's forward
runs, layer by layer, so a hit never costs an extra scheduling round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvtierd.integrations.vllm.config import ConnectorConfig
from kvtierd.integrations.vllm.link import DaemonLink
from kvtierd.integrations.vllm.naming import NamespaceSpec, none_hash_seed, unshareable_reason
from kvtierd.integrations.vllm.plan import StepPlan
from kvtierd.integrations.vllm.scheduler import SchedulerHalf
from kvtierd.integrations.vllm.version import parse_version

if TYPE_CHECKING:
    import torch

log = logging.getLogger("vllm.kvtierd")  # under vLLM's logger, so its handlers print it


@dataclasses.dataclass
class KVTierMetadata(KVConnectorMetadata, StepPlan):
    """One step's StepPlan, as vLLM carries it to the workers."""


_COUNTERS = ("lookups", "lookup_errors", "hit_tokens", "queried_tokens", "saves_planned", "loaded_chunks",
             "loaded_bytes", "load_errors", "saved_chunks", "saved_bytes", "save_failures", "daemon_errors")


@dataclasses.dataclass
class KVTierStats(KVConnectorStats):
    """The connector's counters for one interval, summed over the scheduler and all workers."""

    def __post_init__(self) -> None:
        for k in _COUNTERS:
            self.data.setdefault(k, 0)

    def reset(self) -> None:
        for k in _COUNTERS:
            self.data[k] = 0

    def aggregate(self, other: KVConnectorStats) -> "KVTierStats":
        for k, v in other.data.items():
            if isinstance(v, (int, float)):
                self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return {f"kvtierd_{k}": v for k, v in self.data.items()}

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in _COUNTERS)


def _kv_spec(kv_cache_config: Any) -> tuple[Any, list[str]]:
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or [])
    if len(groups) != 1:
        raise ValueError(f"kvtierd supports models with one KV cache group (full attention), this one has "
                         f"{len(groups)}")
    spec = groups[0].kv_cache_spec
    if type(spec).__name__ not in ("FullAttentionSpec",):
        raise ValueError(f"kvtierd supports full-attention KV caches, not {type(spec).__name__}")
    return spec, list(groups[0].layer_names)


def _model_identity(vllm_config: Any, cfg: ConnectorConfig) -> tuple[str, str]:
    mc = vllm_config.model_config
    if cfg.model_id:
        return cfg.model_id, ""
    name = f"{mc.model}@{getattr(mc, 'revision', None) or ''}"
    h = hashlib.blake2b(digest_size=16)
    hf = getattr(mc, "hf_config", None)
    if hf is not None and hasattr(hf, "to_json_string"):
        h.update(hf.to_json_string(use_diff=False).encode())
    return name, h.hexdigest()


def namespace_spec(vllm_config: Any, kv_cache_config: Any, cfg: ConnectorConfig) -> tuple[NamespaceSpec, str | None]:
    """The namespace of this engine, and why it cannot share blocks (None when it can)."""
    import vllm

    spec, layers = _kv_spec(kv_cache_config)
    cc = vllm_config.cache_config
    algo = str(getattr(cc, "prefix_caching_hash_algo", "sha256"))
    seed = none_hash_seed(algo, os.environ.get("PYTHONHASHSEED"))
    reason = unshareable_reason(algo, os.environ.get("PYTHONHASHSEED"))
    model, digest = _model_identity(vllm_config, cfg)
    itemsize = spec.dtype.itemsize
    page_shape = (int(spec.num_heads), int(spec.block_size), int(spec.state_content_size_bytes) // itemsize)
    page_bytes = int(getattr(spec, "real_page_size_bytes", None) or spec.page_size_bytes)
    major, minor, _ = parse_version(vllm.__version__)
    ns = NamespaceSpec(
        model=model, model_digest=digest, kv_dtype=str(spec.dtype).removeprefix("torch."),
        page_shape=page_shape, page_bytes=page_bytes, num_layers=len(layers),
        kv_layout=str(getattr(kv_cache_config, "kv_cache_layout", None) or getattr(cc, "kv_cache_layout", "") or ""),
        block_size=int(spec.block_size), blocks_per_chunk=cfg.blocks_per_chunk, hash_algo=algo,
        hash_seed=hashlib.blake2b((seed or "").encode(), digest_size=16).hexdigest(),
        vllm_series=f"{major}.{minor}", device=str(vllm_config.device_config.device_type),
        tenant_salt=cfg.tenant_salt)
    return ns, reason


class KVTierConnector(KVConnectorBase_V1):
    """kvtierd as vLLM's KV connector (load with kv_connector_module_path="kvtierd.integrations.vllm")."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        import vllm

        from kvtierd.integrations.vllm.version import check_version
        check_version(vllm.__version__)      # also when this module is imported directly
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(getattr(self._kv_transfer_config, "kv_connector_extra_config", None) or {})
        self.cfg = ConnectorConfig.from_extra(extra)
        pc = vllm_config.parallel_config
        tp, pp = int(pc.tensor_parallel_size), int(pc.pipeline_parallel_size)
        disabled: str | None = None
        try:
            self.ns_spec, disabled = namespace_spec(vllm_config, kv_cache_config, self.cfg)
        except ValueError as e:
            self.ns_spec, disabled = None, str(e)
        if pp > 1 and disabled is None:
            disabled = "pipeline parallelism is not supported yet (each stage would need its own block size)"
        self._scheduler: SchedulerHalf | None = None
        self._worker: Any = None
        if role == KVConnectorRole.SCHEDULER:
            link = DaemonLink(self.cfg.socket, self.cfg.lookup_timeout_s, "vllm-scheduler", self.cfg.retry_s)
            if self.ns_spec is None:
                log.warning("kvtierd connector disabled: %s", disabled)
            else:
                self._scheduler = SchedulerHalf(
                    self.ns_spec, link, tp_size=tp, pp_size=pp,
                    hash_block_size=getattr(kv_cache_config, "hash_block_size", None),
                    load=self.cfg.load, save=self.cfg.save, async_save=self.cfg.async_save,
                    disabled_reason=disabled)
        else:
            from kvtierd.integrations.vllm.worker import WorkerHalf
            tp_rank, pp_rank = _ranks()
            link = DaemonLink(self.cfg.socket, self.cfg.io_timeout_s, f"vllm-worker-tp{tp_rank}", self.cfg.retry_s)
            layer_order = None
            if disabled is None:
                _, layer_order = _kv_spec(kv_cache_config)
            self._worker = WorkerHalf(
                link, num_blocks=int(kv_cache_config.num_blocks), blocks_per_chunk=self.cfg.blocks_per_chunk,
                layer_order=layer_order, tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp,
                tier=self.cfg.tier, async_save=self.cfg.async_save)
            if disabled is not None:
                self._worker.disabled = disabled

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._scheduler is None:
            return 0, False
        return self._scheduler.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self._scheduler is None:
            return
        ids = blocks.get_block_ids()
        self._scheduler.after_alloc(request, list(ids[0]) if ids else [], num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        if self._scheduler is None:
            return KVTierMetadata()
        plan = self._scheduler.build_plan(scheduler_output)
        return KVTierMetadata(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(StepPlan)})

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is None:
            return False, None
        return self._scheduler.finished(request), None

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, "torch.Tensor"]) -> None:
        if self._worker is not None and self._worker.disabled is None:
            self._worker.register(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._worker is not None and self.has_connector_metadata():
            meta = self._get_connector_metadata()
            if isinstance(meta, StepPlan):
                self._worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._worker is not None:
            self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: "torch.Tensor", attn_metadata: Any, **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.save_layer(layer_name)

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.wait_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        done = self._worker.finished()
        return (done or None), None

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._worker is None:
            return set()
        return self._worker.take_load_errors()

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.link.close()

    # ------------------------------------------------------------------ stats

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        half = self._scheduler if self._scheduler is not None else self._worker
        if half is None:
            return None
        stats = KVTierStats(data=half.counters.take())
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVTierStats(data=dict(data or {}))


def _ranks() -> tuple[int, int]:
    """This worker's (tensor-parallel rank, pipeline-parallel rank)."""
    from vllm.distributed import parallel_state as ps
    tp = pp = 0
    try:
        tp = ps.get_tensor_model_parallel_rank()
    except (AssertionError, AttributeError, RuntimeError):
        pass
    try:
        pp = ps.get_pp_group().rank_in_group
    except (AssertionError, AttributeError, RuntimeError):
        pass
    return tp, pp
