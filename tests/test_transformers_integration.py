"""transformers integration: cached prefixes give the logits a full prefill gives, and are skipped when slower.

The model is a small randomly initialised Llama built from LlamaConfig (no
downloads), fp32 on CPU. A forward over a suffix after a loaded prefix is not
always bitwise equal to one forward over the whole prompt: the matrix products
run with other shapes, so float32 rounding may differ in the last bits (the
same happens between any two prefills of different lengths, with or without
kvtierd). Where the shapes coincide (a miss; a hit whose K/V came from the
same prompt) the tests demand bitwise equality; elsewhere a tolerance of 1e-5,
far below what a wrong position, layer or token (~1e-1) would produce, and
identical greedy tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvtierd.integrations.cost import CostModel  # noqa: E402
from kvtierd.integrations.transformers import KVTierCache, cache_argument, model_geometry  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 16
MODEL_CODE = """
import torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=256, max_position_embeddings=2048)
model = LlamaForCausalLM(cfg).eval()
"""


def _build_model():
    scope: dict = {}
    exec(MODEL_CODE, scope)
    return scope["model"]


@pytest.fixture(scope="module")
def model():
    return _build_model()


def _always_load() -> CostModel:
    # recompute priced far above any load, and never relearned: every hit is served
    return CostModel(prefill_token_s=1.0, learn=False)


def _prompt(n: int, seed: int = 1) -> "torch.Tensor":
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, n), generator=g)


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _reference_cache(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=True).past_key_values


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def _assert_same_kv(cache, ref_cache, n_tokens, tol=1e-6):
    """The loaded prefix is the K/V a full prefill computes: every layer, every position, in order.

    Logits of a random model barely notice chunks served in the wrong order
    (its attention is nearly uniform), so the K/V themselves are compared.
    """
    assert n_tokens > 0
    for layer, ref in zip(cache.layers, ref_cache.layers):
        torch.testing.assert_close(layer.keys[:, :, :n_tokens], ref.keys[:, :, :n_tokens], rtol=tol, atol=tol / 10)
        torch.testing.assert_close(layer.values[:, :, :n_tokens], ref.values[:, :, :n_tokens], rtol=tol, atol=tol / 10)


def test_miss_computes_everything_and_matches_bitwise(daemon, model):
    ids = _prompt(100)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load())
        out = kv.forward(ids)
        assert out.n_cached_tokens == 0
        assert torch.equal(out.logits, _reference_logits(model, ids))
        assert kv.stats.stored_blocks == 100 // CHUNK
        assert kv.ns.lookup(kv.keys(ids)) == 100 // CHUNK


def test_hit_of_the_same_prompt_matches_bitwise(daemon, model):
    ids = _prompt(100)
    ref = _reference_logits(model, ids)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load())
        kv.forward(ids)
        out = kv.forward(ids)
        assert out.n_cached_tokens == 96
        assert torch.equal(out.logits, ref[:, 96:])
        _assert_same_kv(out.past_key_values, _reference_cache(model, ids), 100)
        assert out.past_key_values.get_seq_length() == 100
        assert kv.stats.stored_blocks == 6  # the second call found every chunk already stored


def test_full_hit_recomputes_only_the_last_token(daemon, model):
    ids = _prompt(128, seed=2)
    ref = _reference_logits(model, ids)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load())
        kv.forward(ids)
        out = kv.forward(ids)
        assert out.n_cached_tokens == 127
        assert out.logits.shape[1] == 1
        _close(out.logits, ref[:, -1:])
        _assert_same_kv(out.past_key_values, _reference_cache(model, ids), 128)


def test_partial_hit_loads_the_shared_prefix_and_matches(daemon, model):
    first = _prompt(70, seed=3)
    longer = torch.cat([first, _prompt(90, seed=4)], dim=1)
    ref = _reference_logits(model, longer)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load())
        kv.forward(first)
        out = kv.forward(longer)
        assert out.n_cached_tokens == 64  # 4 full chunks of the first prompt; its tail was never keyed
        _close(out.logits, ref[:, 64:])
        _assert_same_kv(out.past_key_values, _reference_cache(model, longer), 160)
        assert kv.ns.lookup(kv.keys(longer)) == 160 // CHUNK


def test_prefill_cache_works_for_a_plain_forward_of_the_last_token(daemon, model):
    ids = _prompt(90, seed=5)
    ref = _reference_logits(model, ids)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load())
        cache, n = kv.prefill(ids)
        assert n == 0 and cache.get_seq_length() == 89
        cache, n = kv.prefill(ids)
        assert n == 80 and cache.get_seq_length() == 89
        _assert_same_kv(cache, _reference_cache(model, ids), 89)
        with torch.no_grad():
            out = model(ids[:, -1:], **{cache_argument(model): cache}, position_ids=torch.tensor([[89]]))
        _close(out.logits[:, -1], ref[:, -1])


def test_generate_gives_the_same_tokens_with_and_without_the_cache(daemon, model):
    ids = _prompt(75, seed=6)
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load())
        cold = kv.generate(ids, max_new_tokens=24, do_sample=False)
        warm = kv.generate(ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(cold, plain) and torch.equal(warm, plain)
        # the generated tokens' chunks were stored too: the whole output is a cached prefix now
        assert kv.ns.lookup(kv.keys(plain)) == (plain.shape[1] - 1) // CHUNK
        assert kv.stats.hit_tokens == 64
        # the prefill() cache handed to model.generate by hand
        cache, n = kv.prefill(ids)
        assert n == 64
        by_hand = model.generate(ids, **{cache_argument(model): cache}, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=24, do_sample=False)
        assert torch.equal(by_hand, plain)


def test_block_bytes_follow_the_documented_layout(daemon, model):
    ids = _prompt(40, seed=7)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load())
        out = kv.forward(ids)
        g = kv.geometry
        assert g.block_bytes == 2 * 2 * 2 * CHUNK * 16 * 4
        raw = kv.ns.get_many(kv.keys(ids)[1:2])[0]
        block = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(g.block_shape)
        layer = out.past_key_values.layers[1]
        assert torch.equal(block[1, 0], layer.keys[0, :, CHUNK:2 * CHUNK])
        assert torch.equal(block[1, 1], layer.values[0, :, CHUNK:2 * CHUNK])


def _same_bits(a, b) -> bool:
    """Byte-for-byte equality (NaN-safe, -0.0 != 0.0), shape and dtype included."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)))


def _assert_same_cache_bits(a, b, n_tokens=None):
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
            x, y = x.cpu(), y.cpu()
            if n_tokens is not None:
                x, y = x[:, :, :n_tokens], y[:, :, :n_tokens]
            assert _same_bits(x, y)


def _assert_blocks_hold(kv, keys, cache, chunks):
    """The stored blocks of these chunks are the cache's own K/V in the documented layout, bit for bit."""
    g = kv.geometry
    raws = kv.ns.get_many([keys[c] for c in chunks])
    for c, raw in zip(chunks, raws):
        assert raw is not None
        block = torch.frombuffer(bytearray(raw), dtype=g.dtype).view(g.block_shape)
        for n, layer in enumerate(cache.layers):
            assert _same_bits(block[n, 0], layer.keys[0, :, c * CHUNK:(c + 1) * CHUNK].cpu())
            assert _same_bits(block[n, 1], layer.values[0, :, c * CHUNK:(c + 1) * CHUNK].cpu())


def _paged_vs_blocks(daemon, model, ids):
    """Stores, loads and gapped re-stores of one prompt through the paged copier and through
    per-block copies, in two namespaces: every cache and every block must agree bit for bit."""
    with daemon.client() as c:
        paged = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), namespace="t/paged", paged_copy=True)
        blocks = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), namespace="t/blocks",
                             paged_copy=False)
        keys = paged.keys(ids)
        assert keys == blocks.keys(ids) and len(keys) >= 4
        n_chunks = len(keys)
        out_p, out_b = paged.forward(ids), blocks.forward(ids)
        assert torch.equal(out_p.logits, out_b.logits)
        _assert_blocks_hold(paged, keys, out_p.past_key_values, range(n_chunks))
        assert paged.ns.get_many(keys) == blocks.ns.get_many(keys)

        for kv in (paged, blocks):   # loads: same K/V, contiguous, exactly what was computed
            cache, n = kv.load(ids)
            assert n == min(n_chunks * CHUNK, ids.shape[1] - 1)
            _assert_same_cache_bits(cache, out_p.past_key_values, n)
            if n % CHUNK == 0:   # (a cropped full hit is a view of the loaded chunks)
                assert all(layer.keys.is_contiguous() and layer.values.is_contiguous() for layer in cache.layers)
        _assert_same_cache_bits(paged.load(ids)[0], blocks.load(ids)[0])

        # chunks 1 and 3 evicted: the next store writes chunks [1, 3], a batch with a gap
        for kv in (paged, blocks):
            assert kv.ns.delete([keys[1], keys[3]]) == 2
        out_p, out_b = paged.forward(ids), blocks.forward(ids)
        assert out_p.n_cached_tokens == out_b.n_cached_tokens == CHUNK   # only chunk 0 is a prefix now
        _assert_same_cache_bits(out_p.past_key_values, out_b.past_key_values)
        _assert_blocks_hold(paged, keys, out_p.past_key_values, [1, 3])
        assert paged.ns.get_many(keys) == blocks.ns.get_many(keys)
        assert paged.stats.stored_blocks == blocks.stats.stored_blocks == n_chunks + 2


def test_paged_copies_and_per_block_copies_store_and_load_the_same_bytes(daemon, model):
    # on CPU the paged copier runs its torch fallback: same bytes as the per-block memcpy path
    _paged_vs_blocks(daemon, model, _prompt(100, seed=12))


def test_a_full_hit_loads_the_same_bytes_both_ways(daemon, model):
    _paged_vs_blocks(daemon, model, _prompt(96, seed=13))   # 6 full chunks: loads crop to 95 tokens


def test_cpu_models_copy_per_block_by_default(daemon, model):
    with daemon.client() as c:
        assert KVTierCache(c, model, chunk_tokens=CHUNK).paged_copy is False


def test_a_new_process_sees_the_same_keys_and_hits(daemon, model):
    ids = _prompt(64, seed=8)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load())
        kv.forward(ids)
        keys_here = kv.keys(ids)
    code = MODEL_CODE + textwrap.dedent(f"""
        from kvtierd import Client
        from kvtierd.integrations.cost import CostModel
        from kvtierd.integrations.transformers import KVTierCache
        ids = torch.tensor([{ids[0].tolist()}])
        with Client({daemon.socket!r}) as c:
            kv = KVTierCache(c, model, chunk_tokens={CHUNK}, cost=CostModel(prefill_token_s=1.0, learn=False))
            print(b"".join(kv.keys(ids)).hex())
            print(kv.forward(ids).n_cached_tokens)
    """)
    env = {**os.environ, "PYTHONHASHSEED": "777", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == b"".join(keys_here).hex()
    assert int(lines[1]) == 63


def test_tenant_salt_and_weights_separate_namespaces(daemon, model):
    ids = _prompt(48, seed=9)
    other = _build_model()
    with torch.no_grad():
        other.model.layers[0].self_attn.k_proj.weight.mul_(1.5)   # a "fine-tuned" copy
    with daemon.client() as c:
        a = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), tenant_salt="a")
        b = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), tenant_salt="b")
        tuned = KVTierCache(c, other, chunk_tokens=CHUNK, cost=_always_load(), tenant_salt="a")
        a.forward(ids)
        assert b.forward(ids).n_cached_tokens == 0
        assert tuned.forward(ids).n_cached_tokens == 0
        assert a.forward(ids).n_cached_tokens == 47


def test_cost_model_skips_a_hit_that_would_be_slower_and_counts_it(daemon, model):
    ids = _prompt(96, seed=10)
    ref = _reference_logits(model, ids)
    with daemon.client() as c:
        slow = CostModel(load_rates={"host": 1e3}, prefill_token_s=1e-6, learn=False)  # 1 KB/s vs 1 µs/token
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=slow)
        kv.forward(ids)
        out = kv.forward(ids)
        assert out.n_cached_tokens == 0
        assert slow.skipped_hits == 1 and slow.skipped_tokens == 96 and slow.served_hits == 0
        assert torch.equal(out.logits, ref)


def test_batches_and_empty_prompts_are_refused(daemon, model):
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK)
        with pytest.raises(ValueError, match="batch 1"):
            kv.forward(torch.zeros((2, 32), dtype=torch.long))
        with pytest.raises(ValueError, match="non-empty"):
            kv.forward(torch.zeros((1, 0), dtype=torch.long))


def test_auto_chunk_size_keeps_blocks_within_a_few_mib(model):
    g = model_geometry(model)
    assert g.chunk_tokens == 256 and g.block_bytes == 2 * 2 * 2 * 256 * 16 * 4
    big = transformers.LlamaConfig(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                                   num_key_value_heads=8)

    class Shape:  # the 8B shape without allocating 8B parameters
        config = big

        def parameters(self):
            yield torch.empty(0, dtype=torch.bfloat16)

    g8 = model_geometry(Shape())
    assert g8.block_bytes == 4 << 20 and g8.chunk_tokens == 32  # 128 KiB of K/V per token


@pytest.mark.gpu
def test_cuda_model_round_trips_through_the_pinned_host_tier(daemon):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _build_model().to("cuda")
    ids = _prompt(100).to("cuda")
    ref = _reference_logits(model, ids)
    with daemon.client() as c, KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load()) as kv:
        kv.forward(ids)
        out = kv.forward(ids)
        assert out.n_cached_tokens == 96
        torch.testing.assert_close(out.logits, ref[:, 96:], rtol=1e-4, atol=1e-4)
        _assert_same_kv(out.past_key_values, _reference_cache(model, ids), 100, tol=1e-4)


@pytest.mark.gpu
def test_cuda_kernels_store_and_load_blocks_byte_for_byte(daemon):
    """On a GPU, stores gather the cache's own K/V into slots and loads scatter slots into
    fresh K/V, one kernel launch each: the bytes must be exactly the documented layout."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = _build_model().to("cuda")
    ids = _prompt(72, seed=11).to("cuda")
    with daemon.client() as c, KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load()) as kv:
        out = kv.forward(ids)
        g = kv.geometry
        keys = kv.keys(ids)
        for i, raw in enumerate(kv.ns.get_many(keys)):
            block = torch.frombuffer(bytearray(raw), dtype=g.dtype).view(g.block_shape)
            for n, layer in enumerate(out.past_key_values.layers):
                assert torch.equal(block[n, 0], layer.keys[0, :, i * CHUNK:(i + 1) * CHUNK].cpu())
                assert torch.equal(block[n, 1], layer.values[0, :, i * CHUNK:(i + 1) * CHUNK].cpu())
        cache, n_cached = kv.load(ids)
        assert n_cached == len(keys) * CHUNK
        for layer, ref in zip(cache.layers, out.past_key_values.layers):
            assert torch.equal(layer.keys, ref.keys[:, :, :n_cached])
            assert torch.equal(layer.values, ref.values[:, :, :n_cached])


@pytest.mark.gpu
def test_cuda_kernel_path_matches_per_block_copies_and_the_cpu_reference(daemon):
    """The one-launch kernel path against per-block torch copies on the same GPU, then the
    blocks the kernel stored read back by the CPU path: bit for bit everywhere."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kvtierd.gpu import cuda
    if not cuda.kernels_available():
        pytest.skip("needs cupy for kvtierd's kernels")
    model = _build_model().to("cuda")
    ids = _prompt(100, seed=14).to("cuda")
    with daemon.client() as c:
        assert KVTierCache(c, model, chunk_tokens=CHUNK).paged_copy is True   # the default on a GPU
    _paged_vs_blocks(daemon, model, ids)
    with daemon.client() as c:
        gpu = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), namespace="t/paged")
        cpu = KVTierCache(c, _build_model(), chunk_tokens=CHUNK, cost=_always_load(), namespace="t/paged",
                          model_id=gpu.model_id)
        assert cpu.paged_copy is False and gpu.keys(ids) == cpu.keys(ids)
        on_gpu, n = gpu.load(ids)
        on_cpu, m = cpu.load(ids.cpu())
        assert n == m == 96
        _assert_same_cache_bits(on_gpu, on_cpu)


def test_the_hbm_tier_needs_a_gpu_model(daemon, model):
    with daemon.client() as c:
        with pytest.raises(ValueError, match="GPU"):
            KVTierCache(c, model, chunk_tokens=CHUNK, tier="hbm")
        with pytest.raises(ValueError, match="tier"):
            KVTierCache(c, model, chunk_tokens=CHUNK, tier="disk")


@pytest.mark.gpu
def test_cuda_model_stores_to_and_loads_from_the_hbm_tier(start_daemon):
    """With tier="hbm" blocks go into the daemon's GPU pool and come back device to device."""
    from kvtierd.gpu import cuda
    if not cuda.kernels_available():
        pytest.skip("needs CUDA with cupy")
    d = start_daemon("--hbm-bytes", "256MiB")
    model = _build_model().to("cuda")
    ids = _prompt(100).to("cuda")
    with d.client() as c, KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), tier="hbm") as kv:
        first = kv.forward(ids)
        assert kv.ns.lookup_tiers(kv.keys(ids)) == ["hbm"] * (100 // CHUNK)
        out = kv.forward(ids)
        assert out.n_cached_tokens == 96
        for layer, ref in zip(out.past_key_values.layers, first.past_key_values.layers):
            assert torch.equal(layer.keys[:, :, :96], ref.keys[:, :, :96])
            assert torch.equal(layer.values[:, :, :96], ref.values[:, :, :96])
        # A host reader of the same blocks gets them copied down by the daemon, byte for byte.
        cpu_model = _build_model()
        cpu_kv = KVTierCache(c, cpu_model, chunk_tokens=CHUNK, cost=_always_load(), model_id=kv.model_id)
        cache, n = cpu_kv.load(ids.cpu())
        assert n == 96
        for layer, ref in zip(cache.layers, first.past_key_values.layers):
            assert torch.equal(layer.keys, ref.keys[:, :, :96].cpu())


# ------------------------------------------------------------------ cost model

def test_cost_plan_takes_whole_host_prefix_when_cheaper():
    cm = CostModel(load_rates={"host": 1e9}, prefill_token_s=1e-4, learn=False, request_overhead_s=1e-4)
    plan = cm.plan(["host"] * 8, block_bytes=1 << 20, block_tokens=16)
    assert plan.load_blocks == 8 and not plan.skipped and cm.served_hits == 1


def test_cost_plan_stops_before_a_slow_disk_tail():
    cm = CostModel(load_rates={"host": 10e9, "disk": 1e6}, prefill_token_s=1e-4, learn=False)
    plan = cm.plan(["host"] * 4 + ["disk"] * 4, block_bytes=1 << 20, block_tokens=16)
    assert plan.load_blocks == 4 and plan.skipped
    assert cm.skipped_hits == 1 and cm.skipped_tokens == 64


def test_cost_prefill_slope_ignores_the_fixed_cost_of_a_forward():
    cm = CostModel(prefill_token_s=1.0)
    for n in (32, 512, 64, 1024, 128, 256):
        cm.observe_prefill(n, 0.030 + n * 2e-5)   # 30 ms fixed, 20 µs per token
    assert cm.seconds_per_token() == pytest.approx(2e-5, rel=1e-3)


def test_cost_model_skips_short_hits_when_a_forward_after_a_load_costs_more_than_a_prefill():
    # bench/README.md's reference ceilings, TinyLlama-1.1B on an H100: a whole 2K prefill took 17 ms, a
    # 32-token forward after a loaded prefix ~30 ms; the hit is slower at 2K and 4x faster at 16K
    cm = CostModel(device="cuda", load_rates={"host": 50e9}, request_overhead_s=0.0)
    for n in (512, 2048, 4096, 8192, 16384):
        cm.observe_prefill(n, 0.002 + n * 7.5e-6)
    for n in (16, 32, 64, 128):
        cm.observe_prefill(n, 0.030 + n * 7.5e-6, cached_tokens=2048)
    snap = cm.snapshot()
    assert snap["prefill_fixed_s"] == pytest.approx(0.002, rel=1e-3)
    assert snap["after_load_fixed_s"] == pytest.approx(0.030, rel=1e-3)
    block_bytes = 32 * 22 * 2 * 4 * 64 * 2          # 32 tokens of 22 layers x K/V x 4 heads x 64 dims, bf16
    short = cm.plan(["host"] * 64, block_bytes, 32, total_tokens=2048 + 32)
    assert short.load_blocks == 0 and short.skipped
    long = cm.plan(["host"] * 512, block_bytes, 32, total_tokens=16384 + 32)
    assert long.load_blocks == 512 and not long.skipped
    assert cm.skipped_hits == 1 and cm.skipped_tokens == 2048 and cm.served_hits == 1


def test_cost_prefill_uses_the_prior_until_lengths_vary():
    cm = CostModel(prefill_token_s=3e-5)
    for _ in range(10):
        cm.observe_prefill(32, 0.030)
    assert cm.seconds_per_token() == 3e-5


def test_cost_load_rate_is_learned_per_tier():
    cm = CostModel(load_rates={"host": 1e9, "disk": 1e9}, request_overhead_s=0.0, alpha=0.5)
    for _ in range(20):
        cm.observe_load(["host"] * 4, 1 << 20, 4 * (1 << 20) / 5e9)
    assert cm.load_rates["host"] == pytest.approx(5e9, rel=1e-3)
    assert cm.load_rates["disk"] == 1e9


def test_cost_probe_serves_one_in_n_skipped_hits():
    cm = CostModel(load_rates={"host": 1.0}, learn=False, probe_every=3)
    plans = [cm.plan(["host"] * 2, 4096, 16) for _ in range(6)]
    assert [p.probe for p in plans] == [False, False, True, False, False, True]
    assert cm.skipped_hits == 4


def test_cost_model_refuses_nonsense():
    with pytest.raises(ValueError, match="positive"):
        CostModel(load_rates={"host": 0.0})
    with pytest.raises(ValueError, match="alpha"):
        CostModel(alpha=0.0)
    with pytest.raises(ValueError, match="unknown tier"):
        CostModel().plan(["tape"], 4096, 16)


def test_forward_and_generate_raise_no_deprecation_warning(daemon, model):
    """transformers 5.2x deprecates `past_key_values` with a FutureWarning per call; the integration must
    pass the cache under the name the installed version takes."""
    import warnings
    ids = _prompt(70, seed=21)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load())
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            kv.forward(ids)
            kv.forward(ids)
            kv.generate(ids, max_new_tokens=4, do_sample=False)


def _loaded_layers_copied(monkeypatch):
    """Counts, per forward, which layers the layer-wise gate copied before the model read them."""
    from kvtierd.integrations import layerwise
    order: list[int] = []
    real = layerwise.LayerGate.ready

    def ready(self, layer):
        if not self._done[layer] if 0 <= layer < self.n_layers else False:
            order.append(layer)
        return real(self, layer)
    monkeypatch.setattr(layerwise.LayerGate, "ready", ready)
    return order


@pytest.mark.parametrize("paged", [False, True])
def test_layerwise_loading_gives_the_same_logits_and_cache(daemon, model, monkeypatch, paged):
    """Layer-wise loading (on by default on a GPU) copies layer i when the forward first updates layer i's
    cache; on CPU the copy is made right then. Same logits, same K/V as loading everything first."""
    ids = _prompt(100, seed=21)
    order = _loaded_layers_copied(monkeypatch)
    with daemon.client() as c:
        whole = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), paged_copy=paged, layerwise=False)
        whole.forward(ids)                                    # miss: computes and stores
        ref = whole.forward(ids)
        assert ref.n_cached_tokens == 96 and order == []
        lw = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), paged_copy=paged, layerwise=True)
        out = lw.forward(ids)
        assert out.n_cached_tokens == 96
        assert order == list(range(model.config.num_hidden_layers))   # each layer copied once, in forward order
        assert torch.equal(out.logits, ref.logits)
        _assert_same_cache_bits(out.past_key_values, ref.past_key_values)
        assert "update" not in vars(out.past_key_values)     # the hook is gone after the forward
        assert c.stats()["leases"] == 0                       # and the lease released
        cache, n = lw.prefill(ids)
        assert n == 96 and c.stats()["leases"] == 0
        _assert_same_kv(cache, _reference_cache(model, ids), 96)


def test_a_failing_layerwise_forward_still_releases_the_lease(daemon, model, monkeypatch):
    ids = _prompt(100, seed=22)
    with daemon.client() as c:
        kv = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), layerwise=True)
        kv.forward(ids)

        def out_of_memory(*a, **k):
            raise RuntimeError("CUDA out of memory (staged)")
        with monkeypatch.context() as m:
            m.setattr(model.model.layers[1], "forward", out_of_memory)   # the model fails mid-forward
            with pytest.raises(RuntimeError, match="out of memory"):
                kv.forward(ids)
        assert c.stats()["leases"] == 0
        assert kv.forward(ids).n_cached_tokens == 96          # and the next request is served
        from kvtierd.integrations import transformers as integration
        with monkeypatch.context() as m:
            m.setattr(integration, "_set_layer", out_of_memory)           # fails before the forward starts
            with pytest.raises(RuntimeError, match="out of memory"):
                kv.forward(ids)
        assert c.stats()["leases"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_layerwise_loading_matches_loading_everything_first(daemon, paged):
    """On a GPU every layer's copy is enqueued on a side stream and the forward waits per layer on an
    event: bit for bit what loading the whole prefix first gives, with nothing left leased."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from kvtierd.gpu import cuda
    if paged and not cuda.kernels_available():
        pytest.skip("needs cupy for kvtierd's kernels")
    model = _build_model().to("cuda")
    ids = _prompt(100, seed=23).to("cuda")
    with daemon.client() as c:
        assert KVTierCache(c, model, chunk_tokens=CHUNK).layerwise is True    # the default on a GPU
        whole = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), paged_copy=paged, layerwise=False)
        whole.forward(ids)
        ref = whole.forward(ids)
        lw = KVTierCache(c, model, chunk_tokens=CHUNK, cost=_always_load(), paged_copy=paged, layerwise=True)
        for _ in range(3):
            out = lw.forward(ids)
            assert out.n_cached_tokens == 96
            assert torch.equal(out.logits, ref.logits)
            _assert_same_cache_bits(out.past_key_values, ref.past_key_values)
        assert c.stats()["leases"] == 0
