"""The connector's parts without an engine: namespaces, TP hit counts, layouts, worker copies, guards.

The scheduler and worker halves run here against a real daemon with hand-made requests and
step plans, so failure paths that a live engine rarely hits (a chunk gone between lookup and
load, the daemon dying mid-step, tensor-parallel ranks that stored different amounts) are
exercised deterministically.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from kvtierd.integrations.vllm.config import ConnectorConfig
from kvtierd.integrations.vllm.layout import BlockLayout, LayoutError, find_page_dim
from kvtierd.integrations.vllm.link import DaemonLink
from kvtierd.integrations.vllm.naming import (
    NamespaceSpec,
    all_rank_namespaces,
    none_hash_seed,
    rank_namespace,
    unshareable_reason,
)
from kvtierd.integrations.vllm.plan import StepPlan, Transfer
from kvtierd.integrations.vllm.scheduler import SchedulerHalf
from kvtierd.integrations.vllm.version import UnsupportedVLLMVersion, check_version
from kvtierd.integrations.vllm.worker import WorkerHalf

NB, H, BS, D = 24, 2, 32, 16   # blocks, kv heads, block size, head dim


def spec(**kw) -> NamespaceSpec:
    base = dict(model="org/tiny@", model_digest="abc", kv_dtype="float32", page_shape=(H, BS, 2 * D),
                page_bytes=H * BS * 2 * D * 4, num_layers=2, kv_layout="LBNHC", block_size=BS, blocks_per_chunk=1,
                hash_algo="sha256", hash_seed="s", vllm_series="0.32", device="cpu")
    base.update(kw)
    return NamespaceSpec(**base)


# ------------------------------------------------------------------ namespaces and keys

def test_every_identity_field_separates_namespaces():
    ref = spec().digest()
    for field, value in [("model", "org/other@"), ("model_digest", "x"), ("kv_dtype", "bfloat16"),
                         ("page_shape", (H, BS, D)), ("kv_layout", "BLNHC"), ("block_size", 64),
                         ("blocks_per_chunk", 2), ("hash_algo", "sha256_cbor"), ("hash_seed", "t"),
                         ("vllm_series", "0.33"), ("device", "cuda"), ("tenant_salt", "alice")]:
        assert spec(**{field: value}).digest() != ref, field


def test_tensor_parallel_ranks_have_distinct_namespaces():
    base = spec().base_name()
    names = all_rank_namespaces(base, tp_size=4)
    assert len(set(names)) == 4
    assert names == [rank_namespace(base, r, 4) for r in range(4)]
    assert rank_namespace(base, 0, 1) != rank_namespace(base, 0, 2)   # a rank of TP=2 holds half the heads
    with pytest.raises(ValueError):
        rank_namespace(base, 4, 4)


def test_namespace_names_are_equal_across_processes_and_hash_seeds():
    code = ("from kvtierd.integrations.vllm.naming import NamespaceSpec as S;"
            "print(S('m','d','float32',(2,32,32),8192,2,'L',32,1,'sha256','s','0.32','cpu','t').base_name())")
    names = {subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=seed),
                            capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
             for seed in ("0", "1", "random")}
    assert len(names) == 1


def test_hash_seed_rules_follow_vllm():
    assert none_hash_seed("sha256", None) == "vllm-none-hash"
    assert none_hash_seed("sha256", "7") == "7"
    assert none_hash_seed("xxhash", None) is None
    assert "PYTHONHASHSEED" in unshareable_reason("xxhash", None)
    assert unshareable_reason("xxhash", "7") is None
    assert unshareable_reason("sha256", None) is None


def test_our_seed_rule_matches_the_installed_vllm():
    from vllm.utils.hashing import sha256, xxhash
    from vllm.v1.core import kv_cache_utils as kcu
    os.environ.pop("PYTHONHASHSEED", None)
    assert kcu.resolve_none_hash_seed(sha256) == none_hash_seed("sha256", None)
    assert xxhash in kcu._NON_CRYPTO_HASH_FUNCTIONS


# ------------------------------------------------------------------ guards and settings

def test_untested_vllm_versions_are_refused_with_a_clear_message():
    assert check_version("0.32.0", env={})
    assert check_version("0.32.3+cpu", env={})
    for v in ("0.33.0", "0.31.2", "1.0.0"):
        with pytest.raises(UnsupportedVLLMVersion, match="KVTIERD_VLLM_ALLOW_UNTESTED"):
            check_version(v, env={})
    assert check_version("0.33.0", env={"KVTIERD_VLLM_ALLOW_UNTESTED": "1"}) is False


def test_extra_config_is_checked():
    cfg = ConnectorConfig.from_extra({"socket": "/x.sock", "blocks_per_chunk": "2", "save": "false"})
    assert (cfg.socket, cfg.blocks_per_chunk, cfg.save) == ("/x.sock", 2, False)
    for bad in ({"sockets": "/x"}, {"blocks_per_chunk": 0}, {"tier": "gpu"}, {"save": "maybe"},
                {"lookup_timeout_s": -1}, {"blocks_per_chunk": 1.5}):
        with pytest.raises(ValueError):
            ConnectorConfig.from_extra(bad)


def test_connector_stats_add_up_across_workers():
    from kvtierd.integrations.vllm import KVTierConnector, KVTierStats
    a = KVTierConnector.build_kv_connector_stats({"loaded_bytes": 10, "load_errors": 1})
    b = KVTierStats(data={"loaded_bytes": 5, "hit_tokens": 64})
    assert not a.is_empty()
    r = a.aggregate(b).reduce()
    assert (r["kvtierd_loaded_bytes"], r["kvtierd_load_errors"], r["kvtierd_hit_tokens"]) == (15, 1, 64)
    a.reset()
    assert a.is_empty()


# ------------------------------------------------------------------ layouts

def cpu_cache(seed: int) -> torch.Tensor:      # vLLM CPU backend: [blocks, heads, tokens, K|V]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NB, H, BS, 2 * D, generator=g)


def fa_cache(seed: int, hnd: bool = False) -> torch.Tensor:   # FlashAttention: [2, blocks, tokens, heads, dim]
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(2, NB, BS, H, D, generator=g)
    if hnd:   # same logical tensor, heads-before-tokens strides
        t = t.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    return t


def test_page_dims_are_found_from_shape_and_strides():
    assert find_page_dim(cpu_cache(0), NB)[1] == 0
    assert find_page_dim(fa_cache(0), NB)[1] == 1
    assert find_page_dim(torch.zeros(NB, 2, BS, H, D), NB)[1] == 0              # FlashInfer
    t, d = find_page_dim(torch.zeros(NB * 2, H, BS // 2, 2 * D), NB)            # kernel blocks of 16 tokens
    assert (d, tuple(t.shape[:2])) == (0, (NB, 2))
    for ambiguous_or_absent in (torch.zeros(2, 2, BS, H, D), torch.zeros(5, 7)):
        with pytest.raises(LayoutError):
            find_page_dim(ambiguous_or_absent, 2 if ambiguous_or_absent.dim() == 5 else NB)


@pytest.mark.parametrize("make", [cpu_cache, fa_cache, lambda s: fa_cache(s, hnd=True)],
                         ids=["cpu", "flash-attn", "flash-attn-hnd"])
def test_blocks_round_trip_layer_by_layer_for_each_layout(daemon, make):
    src = {f"l{i}": make(10 + i) for i in range(3)}
    layout = BlockLayout(src, NB, blocks_per_chunk=2)
    assert layout.block_bytes == 3 * 2 * H * BS * 2 * D * 4
    with daemon.client() as c:
        ns = c.namespace("t", block_size=layout.block_bytes)
        pages = [4, 9, 1, 0]
        keys = [b"k0", b"k1"]
        with ns.reserve(keys) as res:
            region = c.worker_regions().region("host")
            for lc in layout.layers:
                lc.copier.gather(pages, region, [o + lc.offset for o in res.offsets])
        dst = {k: torch.zeros_like(v) for k, v in src.items()}
        out = BlockLayout(dst, NB, blocks_per_chunk=2)
        with ns.acquire(keys) as lease:
            for lc in out.layers:
                lc.copier.scatter(region, [o + lc.offset for o in lease.offsets], [20, 21, 5, 6])
    for k in src:
        pd = 0 if src[k].shape[0] == NB else 1
        for a, b in zip([4, 9, 1, 0], [20, 21, 5, 6]):
            assert torch.equal(src[k].select(pd, a), dst[k].select(pd, b))


@pytest.mark.parametrize("make", [cpu_cache, fa_cache, lambda s: fa_cache(s, hnd=True)],
                         ids=["cpu", "flash-attn", "flash-attn-hnd"])
def test_the_cpu_page_copies_write_the_paged_copiers_bytes(daemon, make):
    src = {f"l{i}": make(20 + i) for i in range(2)}
    layout = BlockLayout(src, NB, blocks_per_chunk=2)
    with daemon.client() as c:
        ns = c.namespace("cpu-vs-paged", block_size=layout.block_bytes)
        region = c.worker_regions().region("host")
        for key, cpu in ((b"paged", False), (b"cpu", True)):
            with ns.reserve([key]) as res:
                for lc in layout.layers:
                    if cpu:
                        lc.gather_cpu(region, res.offsets, [3, 8])
                    else:
                        lc.copier.gather([3, 8], region, [o + lc.offset for o in res.offsets])
        paged, per_page = ns.get_many([b"paged", b"cpu"])
        assert paged == per_page
        dst = {k: torch.zeros_like(v) for k, v in src.items()}
        with ns.acquire([b"cpu"]) as lease:
            for lc in BlockLayout(dst, NB, blocks_per_chunk=2).layers:
                lc.scatter_cpu(region, lease.offsets, [0, 1])
                with pytest.raises(ValueError):
                    lc.scatter_cpu(region, lease.offsets, [0, NB])     # a bad page id never writes
    for k in src:
        pd = 0 if src[k].shape[0] == NB else 1
        assert torch.equal(src[k].select(pd, 3), dst[k].select(pd, 0))
        assert torch.equal(src[k].select(pd, 8), dst[k].select(pd, 1))


def test_physical_stride_order_does_not_change_block_bytes(daemon):
    nhd, hnd = fa_cache(3), fa_cache(3, hnd=True)
    assert torch.equal(nhd, hnd) and nhd.stride() != hnd.stride()
    blobs = []
    with daemon.client() as c:
        for i, t in enumerate((nhd, hnd)):
            lay = BlockLayout({"l": t}, NB)
            ns = c.namespace(f"s{i}", block_size=lay.block_bytes)
            with ns.reserve([b"y"]) as res:
                lay.layers[0].copier.gather([7], c.worker_regions().region("host"), res.offsets)
            blobs.append(ns.get_many([b"y"])[0])
    assert blobs[0] == blobs[1]


# ------------------------------------------------------------------ scheduler half

def req(rid: str, n_tokens: int, hashes: list[bytes], prompt: int | None = None):
    return SimpleNamespace(request_id=rid, block_hashes=hashes, num_tokens=n_tokens,
                           num_prompt_tokens=prompt if prompt is not None else n_tokens)


def hashes(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}".encode().ljust(32, b".") for i in range(n)]


def test_scheduler_hits_are_what_every_tp_rank_can_load(daemon):
    sp = spec()
    link = DaemonLink(daemon.socket, 2.0, "test")
    sched = SchedulerHalf(sp, link, tp_size=2)
    hs = hashes("tp", 10)
    blk = bytes(sp.block_bytes)
    with daemon.client() as c:
        r0 = c.namespace(rank_namespace(sp.base_name(), 0, 2), block_size=sp.block_bytes)
        r1 = c.namespace(rank_namespace(sp.base_name(), 1, 2), block_size=sp.block_bytes)
        r0.put_many(hs[:8], [blk] * 8)
        r1.put_many(hs[:5], [blk] * 5)          # rank 1 is behind: only 5 chunks are loadable everywhere
        assert sched.matched_tokens(req("r", 10 * BS + 3, hs), 0) == 5 * BS
        assert sched.matched_tokens(req("r", 10 * BS + 3, hs), 2 * BS) == 3 * BS   # past vLLM's own hit
        r1.put_many(hs[5:10], [blk] * 5)
        r0.put_many(hs[8:10], [blk] * 2)
        # all 10 chunks stored, but a prompt of exactly 10 chunks must leave its last token to compute
        assert sched.matched_tokens(req("r", 10 * BS, hs), 0) == 9 * BS
        assert sched.matched_tokens(req("r", 10 * BS + 1, hs), 0) == 10 * BS
    link.close()


def test_scheduler_without_a_daemon_reports_no_hits_and_reconnects(start_daemon, tmp_path):
    sp = spec()
    sock = str(tmp_path / "kvtierd.sock")
    link = DaemonLink(sock, 1.0, "test", retry_s=0.01, max_retry_s=0.01)
    sched = SchedulerHalf(sp, link)
    hs = hashes("down", 4)
    assert sched.matched_tokens(req("r", 4 * BS + 1, hs), 0) == 0
    d = start_daemon()
    assert d.socket == sock
    with d.client() as c:
        c.namespace(rank_namespace(sp.base_name(), 0, 1), block_size=sp.block_bytes).put_many(
            hs, [bytes(sp.block_bytes)] * 4)
    deadline_hits = [sched.matched_tokens(req("r", 4 * BS + 1, hs), 0) for _ in range(3)]
    assert 4 * BS in deadline_hits                 # back within the (tiny) backoff
    d.kill()
    assert sched.matched_tokens(req("r", 4 * BS + 1, hs), 0) == 0    # a dead daemon: no exception
    link.close()


def test_scheduler_plans_loads_into_the_allocated_blocks_and_saves_new_prompt_chunks(daemon):
    sp = spec()
    link = DaemonLink(daemon.socket, 2.0, "test")
    sched = SchedulerHalf(sp, link)
    hs = hashes("plan", 6)
    with daemon.client() as c:
        c.namespace(rank_namespace(sp.base_name(), 0, 1), block_size=sp.block_bytes).put_many(
            hs[:2], [bytes(sp.block_bytes)] * 2)
    r = req("r", 6 * BS + 5, hs)
    n = sched.matched_tokens(r, 0)
    assert n == 2 * BS
    blocks = [11, 12, 13, 14, 15, 16, 17]
    sched.after_alloc(r, blocks, n)
    out = SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id="r", block_ids=(blocks,), num_computed_tokens=n)],
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[],
                                              num_computed_tokens=[]),
        num_scheduled_tokens={"r": 3 * BS})      # chunked prefill: 3 of the remaining 4+ chunks this step
    plan = sched.build_plan(out)
    assert [(t.keys, t.block_ids) for t in plan.loads] == [(hs[:2], [11, 12])]
    assert [(t.keys, t.block_ids) for t in plan.saves] == [(hs[2:5], [13, 14, 15])]
    out2 = SimpleNamespace(
        scheduled_new_reqs=[],
        scheduled_cached_reqs=SimpleNamespace(req_ids=["r"], resumed_req_ids=set(), new_block_ids=[None],
                                              num_computed_tokens=[5 * BS]),
        num_scheduled_tokens={"r": BS + 5})
    plan2 = sched.build_plan(out2)
    assert plan2.loads == [] and [(t.keys, t.block_ids) for t in plan2.saves] == [(hs[5:6], [16])]
    assert sched.finished(r) is False
    link.close()


# ------------------------------------------------------------------ worker half

def worker_for(daemon, caches, **kw) -> WorkerHalf:
    w = WorkerHalf(DaemonLink(daemon.socket, 2.0, "test-worker", retry_s=0.01, max_retry_s=0.01),
                   num_blocks=NB, layer_order=list(caches), **kw)
    w.register(caches)
    return w


def plan_for(w: WorkerHalf, loads=(), saves=(), delayed=()) -> StepPlan:
    return StepPlan("vllm/unit/test", w.layout.block_bytes, w.layout.layers[0].page_bytes, BS,
                    list(loads), list(saves), list(delayed))


def run_step(w: WorkerHalf, plan: StepPlan) -> set[int]:
    w.start_load(plan)
    for lc in w.layout.layers:
        w.wait_layer(lc.name)
        w.save_layer(lc.name)
    w.wait_save()
    return w.take_load_errors()


def test_worker_saves_then_another_worker_loads_the_same_kv(daemon):
    src = {f"l{i}": cpu_cache(i) for i in range(2)}
    w1 = worker_for(daemon, src)
    keys = hashes("w", 3)
    assert run_step(w1, plan_for(w1, saves=[Transfer("a", keys, [3, 7, 9])])) == set()
    assert w1.counters.saved_chunks == 3
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    w2 = worker_for(daemon, dst)
    assert run_step(w2, plan_for(w2, loads=[Transfer("b", keys, [0, 1, 2])])) == set()
    for k in src:
        assert torch.equal(dst[k][[0, 1, 2]], src[k][[3, 7, 9]])
        assert dst[k][3:].abs().sum() == 0          # nothing else written
    assert w2.counters.loaded_chunks == 3


def test_a_chunk_gone_before_the_load_is_reported_with_everything_after_it(daemon):
    src = {"l0": cpu_cache(5)}
    w = worker_for(daemon, src)
    keys = hashes("gone", 4)
    run_step(w, plan_for(w, saves=[Transfer("a", keys, [1, 2, 3, 4])]))
    with daemon.client() as c:
        assert c.namespace(rank_namespace("vllm/unit/test", 0, 1), block_size=w.layout.block_bytes).delete(
            [keys[1]]) == 1
    errors = run_step(w, plan_for(w, loads=[Transfer("b", keys, [10, 11, 12, 13]),
                                            Transfer("c", keys[:1], [14])]))
    assert errors == {11, 12, 13}
    assert torch.equal(src["l0"][10], src["l0"][1]) and torch.equal(src["l0"][14], src["l0"][1])


def test_a_dead_daemon_turns_loads_into_load_errors_and_a_new_one_is_used(start_daemon):
    d = start_daemon()
    src = {"l0": cpu_cache(6)}
    w = worker_for(d, src)
    keys = hashes("dead", 2)
    run_step(w, plan_for(w, saves=[Transfer("a", keys, [1, 2])]))
    d.kill()
    assert run_step(w, plan_for(w, loads=[Transfer("b", keys, [5, 6])])) == {5, 6}
    assert run_step(w, plan_for(w, saves=[Transfer("c", hashes("dead2", 1), [3])])) == set()   # dropped quietly
    d2 = start_daemon()                       # same socket path, empty daemon
    w.link._next_try = 0.0
    assert run_step(w, plan_for(w, saves=[Transfer("c", keys, [1, 2])])) == set()
    assert run_step(w, plan_for(w, loads=[Transfer("b", keys, [5, 6])])) == set()
    assert torch.equal(src["l0"][5], src["l0"][1])
    assert d2.proc.poll() is None


def test_a_block_is_published_only_when_every_layer_was_written(daemon):
    src = {"l0": cpu_cache(7), "l1": cpu_cache(8)}
    w = worker_for(daemon, src)
    keys = hashes("whole", 1)
    plan = plan_for(w, saves=[Transfer("a", keys, [4])])
    w.start_load(plan)
    w.save_layer("l0")                 # vLLM handed over only layer 0 ...
    w.wait_save()                      # ... so the end of the step gathers layer 1 itself
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    w2 = worker_for(daemon, dst)
    assert run_step(w2, plan_for(w2, loads=[Transfer("b", keys, [0])])) == set()
    assert torch.equal(dst["l1"][0], src["l1"][4]) and torch.equal(dst["l0"][0], src["l0"][4])


def test_async_saves_hold_finished_requests_until_committed(daemon):
    src = {"l0": cpu_cache(9)}
    w = worker_for(daemon, src, async_save=True)
    keys = hashes("async", 2)
    run_step(w, plan_for(w, saves=[Transfer("a", keys, [1, 2])]))
    assert w.finished() == set()                       # nothing was held
    run_step(w, plan_for(w, delayed=["a"]))
    assert w.finished() == {"a"}                       # on CPU the copy is done: released at once
    assert w.finished() == set()


def test_a_cache_that_does_not_match_the_scheduler_disables_the_worker(daemon):
    src = {"l0": cpu_cache(1)}
    w = worker_for(daemon, src)
    plan = dataclasses.replace(plan_for(w, loads=[Transfer("b", hashes("m", 1), [0])]), block_bytes=12345)
    assert run_step(w, plan) == {0}
    assert "12345" in w.disabled
