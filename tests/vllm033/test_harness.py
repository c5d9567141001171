"""The connector on vLLM 0.33 without an engine: real Scheduler, real KV cache tensors, fake attention.

vLLM 0.33 has no CPU kernels, so no model runs; everything around the forward is vLLM's own:
VllmConfig from a local HF config dir, the v1 Scheduler with KVTierConnector loaded through
KVTransferConfig and the connector factory, the KV cache config from vLLM's planner and the
tensors from vLLM's allocate_kv_cache. A fake attention step writes known K/V into the
scheduled slots. The byte-for-byte test runs in every KV cache layout vLLM's CPU and
FlashAttention backends declare (0.33 views each layer as [B, H, N, C] in a KVCacheLayout
stride order, block-outermost orders interleaving the layers). Steps go schedule() -> worker hooks ->
update_from_output against a real daemon. Where 0.33's interfaces differ from what the connector
expects, these tests fail.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("KVTIERD_VLLM_ALLOW_UNTESTED", "1")   # 0.33 is outside the supported range

BLOCK, LAYERS, KV_HEADS, HEAD_DIM, NUM_BLOCKS = 32, 2, 1, 32, 40
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]


def _backend_layouts() -> list[str]:
    """The KV cache layouts vLLM's CPU and FlashAttention backends declare, as vLLM resolves them."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts
    names: list[str] = []
    for backend in (CPUAttentionBackend, FlashAttentionBackend):
        names += [lay.name for lay in get_supported_kv_cache_layouts([backend]) if lay.name not in names]
    return names


LAYOUTS = _backend_layouts()


def _model_dir(tmp_path):
    from transformers import LlamaConfig
    d = tmp_path / "tiny-llama"
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=2,
                num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=256, max_position_embeddings=4096,
                bos_token_id=1, eos_token_id=2, torch_dtype="float32").save_pretrained(d)
    return d


class Harness:
    """One scheduler and one worker-side connector over vLLM's own KV cache tensors."""

    def __init__(self, tmp_path, socket: str, layout: str):
        from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
        from vllm.v1.core.kv_cache_planning import get_global_kv_cache_groups, get_kv_cache_configs
        from vllm.v1.core.kv_cache_utils import generate_scheduler_kv_cache_config
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec
        from vllm.v1.structured_output import StructuredOutputManager
        from vllm.v1.worker.utils import allocate_kv_cache

        model = ModelConfig(model=str(_model_dir(tmp_path)), dtype="float32", skip_tokenizer_init=True,
                            max_model_len=256, seed=0)
        self.config = VllmConfig(
            model_config=model,
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
            scheduler_config=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=256,
                                             is_encoder_decoder=False),
            device_config=DeviceConfig("cpu"),
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVTierConnector", kv_connector_module_path="kvtierd.integrations.vllm",
                kv_role="kv_both", kv_load_failure_policy="recompute",
                kv_connector_extra_config={"socket": socket, "retry_s": 0.2}))
        specs = {n: FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM,
                                      dtype=torch.float32) for n in LAYER_NAMES}
        self.layout = resolve_kv_cache_layout(self.config, [[layout]], list(specs.values()))
        assert self.layout.name == layout
        groups = get_global_kv_cache_groups(self.config, [specs])
        page = next(iter(specs.values())).page_size_bytes
        kv_cfg = get_kv_cache_configs(self.config, [specs], [NUM_BLOCKS * LAYERS * page], groups)[0]
        kv_cfg.kv_cache_layout = self.config.cache_config.kv_cache_layout
        sched_cfg = generate_scheduler_kv_cache_config([kv_cfg])
        self.config.cache_config.num_gpu_blocks = sched_cfg.num_blocks
        self.kv_cfg = kv_cfg
        self.sched = Scheduler(vllm_config=self.config, kv_cache_config=sched_cfg,
                               structured_output_manager=StructuredOutputManager(self.config),
                               block_size=BLOCK, log_stats=True)
        assert self.sched.connector is not None, "vLLM 0.33 did not create the connector from KVTransferConfig"
        self.worker = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, kv_cfg)
        self.kv = allocate_kv_cache(kv_cfg, torch.device("cpu"), self.layout)
        assert set(self.kv) == set(LAYER_NAMES)
        self.worker.register_kv_caches(self.kv)
        assert self.worker._worker.disabled is None, self.worker._worker.disabled
        self.next_id = 0

    def request(self, ids: list[int]):
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.request import Request
        init_none_hash(sha256)
        self.next_id += 1
        r = Request(f"r{self.next_id}", ids, SamplingParams(max_tokens=1, ignore_eos=True), None,
                    block_hasher=get_request_block_hasher(BLOCK, sha256))
        self.sched.add_request(r)
        return r

    @staticmethod
    def kv_value(layer: int, pos: int, tok: int) -> torch.Tensor:
        """The K/V the fake attention writes for one token: depends on layer, position and token."""
        base = layer * 1_000_000 + pos * 1000 + tok
        return torch.arange(2 * HEAD_DIM, dtype=torch.float32) + float(base)

    def page(self, layer: str, block: int) -> torch.Tensor:
        """One block of one layer in vLLM 0.33's logical per-layer view [B, H, N, C]."""
        return self.kv[layer][block]

    def step(self, before_load=None) -> tuple[object, set[int]]:
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
        out = self.sched.schedule()
        if before_load is not None:
            before_load(out)
        w = self.worker
        w.bind_connector_metadata(out.kv_connector_metadata)
        w.start_load_kv(None)
        reqs = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        for li, name in enumerate(LAYER_NAMES):
            w.wait_for_layer_load(name)
            for rid, start in reqs.items():     # fake attention: write this step's tokens' K/V
                req = self.sched.requests[rid]
                blocks = self.sched.kv_cache_manager.get_block_ids(rid)[0]
                for pos in range(start, start + out.num_scheduled_tokens[rid]):
                    if pos < req.num_prompt_tokens:
                        page = self.page(name, blocks[pos // BLOCK])
                        page[:, pos % BLOCK, :] = self.kv_value(li, pos, req.prompt_token_ids[pos])
            w.save_kv_layer(name, self.kv[name], None)
        w.wait_for_save()
        sending, recving = w.get_finished(out.finished_req_ids)
        errors = w.get_block_ids_with_load_errors()
        w.clear_connector_metadata()
        ids = list(out.num_scheduled_tokens)
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=[[5] for _ in ids],
                                kv_connector_output=KVConnectorOutput(finished_sending=sending,
                                                                      finished_recving=recving,
                                                                      invalid_block_ids=errors))
        self.sched.update_from_output(out, mro)
        return out, errors

    def run(self, req, before_load=None, max_steps: int = 8) -> list[tuple[object, set[int]]]:
        steps = []
        for _ in range(max_steps):
            steps.append(self.step(before_load if not steps else None))
            if req.is_finished():
                return steps
        raise AssertionError(f"request {req.request_id} did not finish in {max_steps} steps")

    def forget_local(self) -> None:
        """Empty vLLM's own prefix cache and zero the KV cache: what comes back now came from kvtierd."""
        assert self.sched.reset_prefix_cache(), "vLLM could not reset its prefix cache"
        for t in self.kv.values():
            t.zero_()


@pytest.fixture(params=LAYOUTS)
def harness(request, tmp_path, daemon):
    h = Harness(tmp_path, daemon.socket, request.param)
    yield h
    h.worker.shutdown()
    h.sched.connector.shutdown()


def _prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def test_shared_prefix_loads_what_was_saved_byte_for_byte(harness):
    h = harness
    prefix = _prompt(1, 4 * BLOCK)
    r1 = h.request(prefix + [9])
    h.run(r1)
    h.forget_local()
    r2 = h.request(prefix + [11, 12, 13])
    steps = h.run(r2)
    out, errors = steps[0]
    assert errors == set()
    new = out.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 4 * BLOCK, "the connector's external hit tokens did not reach vLLM"
    assert out.num_scheduled_tokens[r2.request_id] == 3
    # every prefix token's K/V in the blocks the step loaded into is what request 1's fake attention wrote
    blocks2 = list(new.block_ids[0])
    for li, name in enumerate(LAYER_NAMES):
        for pos in range(4 * BLOCK):
            got = h.page(name, blocks2[pos // BLOCK])[:, pos % BLOCK, :]
            want = h.kv_value(li, pos, prefix[pos]).expand_as(got)
            assert torch.equal(got, want), f"layer {name} token {pos}: loaded K/V differ from the saved K/V"


@pytest.mark.parametrize("harness", LAYOUTS[:1], indirect=True)
def test_block_deleted_in_daemon_is_reported_as_load_error(harness, daemon):
    h = harness
    prefix = _prompt(2, 3 * BLOCK)
    r1 = h.request(prefix + [9])
    h.run(r1)
    h.forget_local()
    r2 = h.request(prefix + [11])
    conn = h.sched.connector._scheduler
    keys = [bytes(r2.block_hashes[i]) for i in range(3)]
    with daemon.client() as c:
        assert c.namespace(conn.rank_names[0], block_size=conn.spec.block_bytes).lookup(keys) == 3

    def delete_second(out):   # between the scheduler's lookup and the worker's load
        assert out.scheduled_new_reqs and out.scheduled_new_reqs[0].num_computed_tokens == 3 * BLOCK
        with daemon.client() as c:
            assert c.namespace(conn.rank_names[0], block_size=conn.spec.block_bytes).delete([keys[1]]) == 1

    steps = h.run(r2, before_load=delete_second)
    out, errors = steps[0]
    blocks = list(out.scheduled_new_reqs[0].block_ids[0])
    assert errors == set(blocks[1:3]), "the deleted chunk and every later one must go back to vLLM"
    assert len(steps) >= 2, "vLLM must recompute the blocks that failed to load"
