"""Serve a Hugging Face causal LM's prompt prefixes from kvtierd instead of recomputing them.

`KVTierCache(client, model)` keys a prompt's full chunks of `chunk_tokens`
tokens (kvtierd.keys), asks the daemon how long a prefix it holds, lets the
cost model decide how much of it is worth loading, copies those chunks' K/V
straight out of the shared-memory host tier into a `DynamicCache` (acquire ->
memoryviews -> torch.frombuffer: the bytes never cross the socket), runs the
model on the remaining tokens only, and stores the new full chunks back
(reserve -> write into the slots -> commit).

Block layout (one block = one chunk, all layers), C order, model dtype,
little-endian:

    [layer][k=0 | v=1][kv_head][token in chunk][head_dim]

so block_size = layers * 2 * kv_heads * chunk_tokens * head_dim * itemsize.
All layers in one block means one key, one slot and one memcpy per chunk; a
chunk is always needed by every layer, so nothing is gained by splitting.

How blocks move, per request (`paged_copy`, default on when the model is on a
GPU and kvtierd's kernels can run there):
- paged: the block layout is exactly a kvtierd.gpu.paged layout, so one
  launch of the paged-copy kernel moves every block of a request. Loading
  allocates per layer one contiguous [k/v, head, tokens, dim] tensor and
  scatters the leased slots into it (plane = that tensor viewed as [k/v, head,
  chunk, token, dim], page = chunk); each layer's K and V handed to the
  DynamicCache are contiguous halves of it, and a layer's tensor is freed as
  soon as the forward's torch.cat replaced it. Storing gathers the new chunks
  from the cache's own K/V ([head, chunk, token, dim] views, 2 planes a layer)
  into the reserved slots. The kernel reads and writes the client's
  page-locked, mapped host region directly: no staging, no per-block copies.
  The copier is built per request (its plane table holds the tensors'
  addresses); for 32 layers that is ~0.3 ms of host CPU on load (32 planes)
  and ~0.6 ms on store (64 planes), against ~20 ms to move 1 GiB.
- per block (CPU, or a GPU without cupy): loading copies each block into one
  [layer, k/v, head, chunk, token, dim] tensor with one strided copy per block
  (never one per layer and block); storing stages the chunks in block order
  with 2 * layers copies, then writes one contiguous copy per block. On CPU
  these memcpys beat the paged copier's torch fallback (index_select /
  index_copy_ through index tensors as large as the data): bench/ttft.py,
  'tiny' model, 4K-token prefix, load 4.0 ms per block vs 10.0 ms paged.
On a GPU one synchronise comes before the lease is released or the
reservation committed, and the client's mapping of the host tier is
page-locked once per process (kvtierd.gpu.pinning; the client unpins it when
it closes).

At least the last prompt token is always recomputed: its logits are the point
of the exercise. A fully cached prompt therefore loads every chunk and crops
the cache to all tokens but the last.

Limits: batch size 1 (one prompt per call; a batch of prompts with different
cached prefixes would need ragged caches), full-attention layers (sliding
window and linear-attention layers keep a different state), and models whose
cache layers hold [batch, kv_heads, seq, head_dim] tensors. Works with the
transformers 5.x Cache API (cache.layers[i].keys/values) and the 4.5x one
(cache.key_cache / value_cache); positions are passed as position_ids, which
both accept.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvtierd.integrations.cost import CostModel
from kvtierd.integrations.layerwise import LayerGate
from kvtierd.keys import PrefixHasher, namespace_seed

if TYPE_CHECKING:
    import torch

KV = tuple["torch.Tensor", "torch.Tensor"]   # one layer's K and V
_MAX_AUTO_BLOCK_BYTES = 4 << 20  # keeps blocks at the "a few MiB" the daemon is built for


@dataclass(frozen=True)
class KVGeometry:
    """The shape of a model's K/V cache, and the block layout derived from it."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: "torch.dtype"
    chunk_tokens: int

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers, 2, self.kv_heads, self.chunk_tokens, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return self.layers * 2 * self.kv_heads * self.chunk_tokens * self.head_dim * self.itemsize

    @property
    def layout(self) -> str:
        d = str(self.dtype).removeprefix("torch.")
        return (f"L{self.layers}xKVx{self.kv_heads}hx{self.chunk_tokens}tx{self.head_dim}d:{d}:"
                f"layer,kv,head,token,dim")


def model_geometry(model: Any, chunk_tokens: int | None = None) -> KVGeometry:
    """The K/V geometry of a Hugging Face causal LM, from its config and parameter dtype."""
    cfg = model.config
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    dtype = next(model.parameters()).dtype
    per_token = layers * 2 * kv_heads * int(head_dim) * dtype.itemsize
    if chunk_tokens is None:
        # the largest power of two in 16..256 whose block stays within a few MiB
        chunk_tokens = 256
        while chunk_tokens > 16 and chunk_tokens * per_token > _MAX_AUTO_BLOCK_BYTES:
            chunk_tokens //= 2
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return KVGeometry(layers, kv_heads, int(head_dim), dtype, int(chunk_tokens))


def model_identity(model: Any) -> str:
    """A string naming the weights: name, revision, config and a sampled weight fingerprint.

    The fingerprint (up to 64 evenly spaced values of every parameter, hashed)
    keeps two differently fine-tuned or randomly initialised copies of one
    architecture apart, which the name alone would not.
    """
    import torch

    cfg = model.config
    h = hashlib.blake2b(digest_size=16)
    h.update(cfg.to_json_string(use_diff=False).encode())
    samples = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
            flat = p.detach().reshape(-1)
            samples.append(flat[:: max(1, flat.numel() // 64)][:64].float())
        if samples:
            h.update(torch.cat(samples).cpu().numpy().tobytes())
    name = getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "model")
    revision = getattr(cfg, "_commit_hash", None) or ""
    return f"{name}@{revision}#{h.hexdigest()}"


# ----------------------------------------------------------- Cache API compat

def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # transformers 4.5x: no config argument
        return DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers:
        from transformers.cache_utils import DynamicLayer

        odd = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
        if odd:
            raise ValueError(f"kvtierd supports full-attention cache layers only; this model has {sorted(odd)}")
    return cache


def cache_argument(model: Any) -> str:
    """The keyword the model's forward takes its KV cache by: `cache` from transformers 5.2x on, where
    `past_key_values` is deprecated (a FutureWarning on every call), `past_key_values` before."""
    import inspect
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The cache a forward or generate returned, under either name."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _set_layer(cache: Any, idx: int, k: "torch.Tensor", v: "torch.Tensor") -> None:
    layers = getattr(cache, "layers", None)
    if layers is not None and idx < len(layers) and hasattr(layers[idx], "lazy_initialization"):
        layer = layers[idx]
        layer.lazy_initialization(k, v)   # sets dtype/device; then adopt our tensors without a copy
        layer.keys, layer.values = k, v
    else:
        cache.update(k, v, idx)


def _get_layer(cache: Any, idx: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[idx].keys, layers[idx].values
    return cache.key_cache[idx], cache.value_cache[idx]


class _TimingStreamer:
    """Wraps a generate() streamer to time the first forward (the prompt's remainder)."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.start: float | None = None
        self.first_token: float | None = None

    def put(self, value: Any) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = now          # the prompt itself is pushed first
        elif self.first_token is None:
            self.first_token = now    # then the token the first forward chose
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


@dataclass
class CacheStats:
    lookups: int = 0
    hit_tokens: int = 0          # tokens served from kvtierd
    computed_tokens: int = 0     # tokens the model ran on
    stored_blocks: int = 0
    lost_blocks: int = 0         # present at lookup, gone by acquire (evicted in between)


class KVTierCache:
    """Prefix caching for one Hugging Face causal LM through one kvtierd client."""

    def __init__(self, client: Any, model: Any, *, chunk_tokens: int | None = None,
                 tenant_salt: bytes | str = b"", model_id: str | None = None,
                 namespace: str | None = None, cost: CostModel | None = None, store: bool = True,
                 paged_copy: bool | None = None, tier: str = "host", layerwise: bool | None = None):
        """paged_copy: move a request's blocks in one paged-copy launch (True) or one copy
        per block (False); None picks paged on a GPU with kvtierd's kernels, per block
        elsewhere (see the module doc). Both give the same bytes.
        tier: where new blocks are stored and read from: "host" (the shared host tier)
        or "hbm" (the daemon's GPU pool, opened by CUDA IPC: device-to-device copies;
        needs the paged-copy path and a daemon with an HBM tier, else blocks go to host).
        layerwise: in forward() and prefill(), overlap the prefix's copy with the forward, layer by
        layer (kvtierd.integrations.layerwise); None: on for a model on a GPU, off on CPU (nothing
        to overlap there). Same bytes either way."""
        import torch

        self.model = model
        self._cache_arg = cache_argument(model)
        self.geometry = model_geometry(model, chunk_tokens)
        g = self.geometry
        self.device = next(model.parameters()).device
        self.model_id = model_id or model_identity(model)
        seed = namespace_seed(model=self.model_id, dtype=str(g.dtype), layout=g.layout,
                              chunk_tokens=g.chunk_tokens, tenant_salt=tenant_salt)
        self.hasher = PrefixHasher(seed, g.chunk_tokens)
        if namespace is None:
            short = (getattr(model.config, "_name_or_path", "") or model.config.model_type).replace("/", "_")[-64:]
            namespace = f"hf/{short}/{str(g.dtype).removeprefix('torch.')}/{seed.hex()[:24]}"
        self.namespace_name = namespace
        self.ns = client.namespace(namespace, block_size=g.block_bytes, tokens_per_block=g.chunk_tokens)
        n_params = sum(p.numel() for p in model.parameters())
        self.cost = cost if cost is not None else CostModel(device=self.device.type, params=n_params)
        self.store_enabled = store
        self.stats = CacheStats()
        self._torch = torch
        self.client = client
        if paged_copy is None:
            from kvtierd.gpu import cuda

            paged_copy = self.device.type == "cuda" and cuda.kernels_available()
        self.paged_copy = bool(paged_copy)
        if tier not in ("host", "hbm"):
            raise ValueError(f"tier must be 'host' or 'hbm', not {tier!r}")
        if tier == "hbm" and not (self.paged_copy and self.device.type == "cuda"):
            raise ValueError("the HBM tier needs a model on a GPU and kvtierd's paged-copy kernels (cupy)")
        self.tier = tier
        self.layerwise = self.device.type == "cuda" if layerwise is None else bool(layerwise)

    # ------------------------------------------------------------- public API

    def keys(self, input_ids: Any) -> list[bytes]:
        """The chunk keys of a prompt (1-D, or a batch of one)."""
        return self.hasher.keys(self._flat_ids(input_ids).cpu())

    def load(self, input_ids: Any) -> tuple[Any, int]:
        """A DynamicCache holding the longest prefix worth loading (at most all tokens but the last), and its length."""
        ids = self._flat_ids(input_ids)
        cache, n_cached, _, _ = self._load(ids, self.hasher.keys(ids.cpu()))
        return cache, n_cached

    def prefill(self, input_ids: Any) -> tuple[Any, int]:
        """Cache covering all prompt tokens but the last (loaded, then computed), and how many were loaded.

        Feed it to `model.generate(input_ids, **{cache_argument(model): cache})` or run
        `model(input_ids[:, -1:], **{cache_argument(model): cache})` for the next-token logits
        (`cache=` on transformers 5.2x and later, `past_key_values=` before).
        """
        ids = self._flat_ids(input_ids)
        keys = self.hasher.keys(ids.cpu())
        cache, n_cached, n_loaded_blocks, pending = self._load(ids, keys, overlap=True)
        end = ids.numel() - 1
        try:
            if end > n_cached:
                self._forward(ids, n_cached, end, cache)
        finally:
            self._finish(pending)
        self._store(ids, keys, n_loaded_blocks, cache)
        return cache, n_cached

    def forward(self, input_ids: Any, **kwargs: Any) -> Any:
        """One model forward that returns logits for the tokens not served from the cache.

        The output's cache (`output_cache(out)`) covers the whole prompt; `n_cached_tokens`
        is set on the output. This is the time-to-first-token path: one forward.
        """
        ids = self._flat_ids(input_ids)
        keys = self.hasher.keys(ids.cpu())
        cache, n_cached, n_loaded_blocks, pending = self._load(ids, keys, overlap=True)
        try:
            out = self._forward(ids, n_cached, ids.numel(), cache, **kwargs)
        finally:
            self._finish(pending)
        self._store(ids, keys, n_loaded_blocks, output_cache(out))
        out.n_cached_tokens = n_cached
        return out

    def generate(self, input_ids: Any, **kwargs: Any) -> Any:
        """model.generate with the prompt's cached prefix loaded first and its new chunks stored after."""
        torch = self._torch
        ids = self._flat_ids(input_ids)
        keys = self.hasher.keys(ids.cpu())
        # Loaded whole first: an overlapped load would hold its lease for the whole generation.
        cache, n_cached, n_loaded_blocks, _ = self._load(ids, keys)
        batch = ids.view(1, -1)
        kwargs.setdefault("attention_mask", torch.ones_like(batch))
        timing = None
        if kwargs.get("num_beams", 1) == 1 and int(kwargs.get("num_return_sequences", 1)) == 1:
            timing = kwargs["streamer"] = _TimingStreamer(kwargs.get("streamer"))
        kwargs[self._cache_arg] = cache
        out = self.model.generate(batch, use_cache=True, **kwargs)
        if timing is not None and timing.start is not None and timing.first_token is not None:
            self.cost.observe_prefill(ids.numel() - n_cached, timing.first_token - timing.start, n_cached)
        self.stats.computed_tokens += ids.numel() - n_cached
        sequences = out.sequences if hasattr(out, "sequences") else out
        final_cache = output_cache(out)
        final_cache = cache if final_cache is None else final_cache  # generate grew `cache` in place
        if sequences.shape[0] == 1:
            # the generated tokens' chunks are worth keeping too: a chat's next turn starts with them
            seq = sequences[0]
            self._store(seq, self.hasher.keys(seq.cpu()), n_loaded_blocks, final_cache)
        return out

    def close(self) -> None:
        """Nothing of its own to release: the client owns the pinned mapping and unpins
        it when it closes. Kept so `with KVTierCache(...)` reads naturally."""

    def __enter__(self) -> "KVTierCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- helpers

    def _flat_ids(self, input_ids: Any) -> "torch.Tensor":
        torch = self._torch
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(input_ids)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"KVTierCache takes one prompt at a time (batch 1), got batch {ids.shape[0]}")
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"expected a non-empty 1-D prompt or a [1, seq] batch, got shape {tuple(input_ids.shape)}")
        return ids.to(self.device)

    def _load(self, ids: "torch.Tensor", keys: list[bytes],
              overlap: bool = False) -> tuple[Any, int, int, tuple[LayerGate, list[str], float] | None]:
        """(cache, tokens loaded, blocks loaded, pending) for the leading cached chunks the cost model
        accepts. With `overlap` and layer-wise loading the copies may still be under way: `pending`
        then holds the gate and the lease, and `_finish(pending)` must follow the forward."""
        torch = self._torch
        g = self.geometry
        cache = _new_cache(self.model)
        self.stats.lookups += 1
        if not keys:
            return cache, 0, 0, None
        tiers = self.ns.lookup_tiers(keys)
        plan = self.cost.plan(tiers, g.block_bytes, g.chunk_tokens, total_tokens=ids.numel())
        if plan.load_blocks == 0:
            return cache, 0, 0, None
        if self.device.type == "cuda":
            self._host_region()   # page-locked once per process: the copies below are DMA
        t0 = time.perf_counter()
        # With tier="hbm" blocks are read where they are (HBM by IPC, host by DMA); a
        # host reader gets HBM blocks copied down by the daemon first.
        lease = self.ns.acquire(keys[: plan.load_blocks], tier="any" if self.tier == "hbm" else "host")
        gate = None
        try:
            n = lease.count
            if n < plan.load_blocks:
                self.stats.lost_blocks += plan.load_blocks - n
            if n == 0:
                lease.release()
                return cache, 0, 0, None
            if overlap and self.layerwise:
                kv, gate = self._read_layerwise(lease.offsets[:n], lease.tiers[:n], lease.views[:n])
            elif self.paged_copy:
                kv = self._read_paged(lease.offsets[:n], lease.tiers[:n])
            else:
                kv = self._read_blocks(lease.views[:n])
            if gate is None and self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # release only once the copies are done
            # A block the lookup found in the remote tier is leased from host (the daemon pulled it
            # in for this acquire): its time is the remote's, so it teaches the remote rate.
            leased_tiers = ["remote" if t == "remote" else lt for t, lt in zip(tiers, lease.tiers[:n])]
            n_cached = min(n * g.chunk_tokens, ids.numel() - 1)
            for layer, (k, v) in enumerate(kv):
                _set_layer(cache, layer, k[:, :, :n_cached], v[:, :, :n_cached])
            if gate is not None:
                gate.hook(cache, lease)          # the forward's update of layer i waits for layer i's copy
        except BaseException:
            if gate is not None:
                gate.finish()                    # copies landed (or made), hook gone, lease released
            lease.release()                      # (a no-op when finish() released it)
            raise
        self.stats.hit_tokens += n_cached
        if gate is not None:
            return cache, n_cached, n, (gate, leased_tiers, time.perf_counter() - t0)
        lease.release()
        self.cost.observe_load(leased_tiers, g.block_bytes, time.perf_counter() - t0)
        return cache, n_cached, n, None

    def _finish(self, pending: tuple[LayerGate, list[str], float] | None) -> None:
        """After an overlapped forward: copies done, lease released, the load's time learned (what
        the whole-prefix path measures too: lookup and acquire up to the copies, then the copies)."""
        if pending is None:
            return
        gate, leased_tiers, before_copies_s = pending
        gate.finish()
        self.cost.observe_load(leased_tiers, self.geometry.block_bytes, before_copies_s + gate.copy_s)

    def _read_layerwise(self, offsets: list[int], tiers: list[str],
                        views: list[memoryview | None]) -> tuple[list[KV], LayerGate]:
        """Per-layer K, V of shape [1, head, tokens, dim] as _read_paged / _read_blocks give, but
        filled layer by layer through a LayerGate (GPU: all layers enqueued on a side stream now)."""
        torch = self._torch
        g = self.geometry
        L, _, H, T, D = g.block_shape
        n = len(offsets)
        layer_bytes = g.block_bytes // L
        layers = [torch.empty((2, H, n * T, D), dtype=g.dtype, device=self.device) for _ in range(L)]
        if self.paged_copy:
            # Layer i of block j is contiguous at slot + i * layer_bytes: one plane, one launch a layer.
            copiers = [self._copier([(t.view(2, H, n, T, D), 2)], layer_bytes) for t in layers]
            groups = self._tier_groups(offsets, tiers)

            def copy_layer(i: int) -> None:
                for region, offs, idx in groups:
                    copiers[i].scatter(region, offs + i * layer_bytes, idx)
        else:
            src = self._block_tensors(views)

            def copy_layer(i: int) -> None:
                dst = layers[i].view(2, H, n, T, D)
                for j, block in enumerate(src):
                    dst[:, :, j].copy_(block[i], non_blocking=True)
        gate = LayerGate(L, copy_layer, self.device)
        return [(t[0].unsqueeze(0), t[1].unsqueeze(0)) for t in layers], gate

    def _tier_groups(self, offsets: list[int], tiers: list[str]) -> list[tuple[Any, np.ndarray, np.ndarray]]:
        """(region, slot offsets, block positions) per tier the leased blocks sit in."""
        if all(t == "host" for t in tiers):
            return [(self._host_region(), np.asarray(offsets, dtype=np.int64), np.arange(len(offsets)))]
        regions = self.client.worker_regions()
        groups = []
        for tier in sorted(set(tiers)):
            idx = [i for i, t in enumerate(tiers) if t == tier]
            groups.append((regions.region(tier, self.ns.domain), np.asarray([offsets[i] for i in idx], dtype=np.int64),
                           np.asarray(idx, dtype=np.int64)))
        return groups

    def _block_tensors(self, views: list[memoryview]) -> list["torch.Tensor"]:
        """The leased slots as [layer, k/v, head, token, dim] tensors over the shared memory (no copy)."""
        torch = self._torch
        g = self.geometry
        with warnings.catch_warnings():
            # lease views are read-only on purpose; torch warns because its tensors could write
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            return [torch.frombuffer(v, dtype=g.dtype).view(g.block_shape) for v in views]

    def _read_paged(self, offsets: list[int], tiers: list[str]) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
        """Leased slots into new per-layer K, V of shape [1, head, tokens, dim], contiguous,
        in one paged-copy launch per tier the blocks sit in (asynchronous on a GPU)."""
        torch = self._torch
        g = self.geometry
        L, _, H, T, D = g.block_shape
        n = len(offsets)
        # One [k/v, head, tokens, dim] tensor per layer: page i of plane `layer` (chunk i,
        # [k/v][head][token][dim]) is exactly that layer's part of block i, so one plane a
        # layer, and each layer's memory goes as soon as the forward has replaced it.
        layers = [torch.empty((2, H, n * T, D), dtype=g.dtype, device=self.device) for _ in range(L)]
        copier = self._copier([(t.view(2, H, n, T, D), 2) for t in layers])
        for region, offs, idx in self._tier_groups(offsets, tiers):
            copier.scatter(region, offs, idx)
        return [(t[0].unsqueeze(0), t[1].unsqueeze(0)) for t in layers]

    def _read_blocks(self, views: list[memoryview]) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
        """Leased slots into per-layer K, V of shape [1, head, tokens, dim], one strided copy per block."""
        torch = self._torch
        g = self.geometry
        n = len(views)
        L, two, H, T, D = g.block_shape
        src = self._block_tensors(views)
        out = torch.empty((L, two, H, n, T, D), dtype=g.dtype, device=self.device)
        for i, s in enumerate(src):
            out[:, :, :, i].copy_(s, non_blocking=True)   # one strided copy per block, out of the shared slot
        out = out.view(L, two, H, n * T, D)
        return [(out[layer, 0].unsqueeze(0), out[layer, 1].unsqueeze(0)) for layer in range(L)]

    def _forward(self, ids: "torch.Tensor", start: int, end: int, cache: Any, **kwargs: Any) -> Any:
        torch = self._torch
        position_ids = torch.arange(start, end, device=ids.device).unsqueeze(0)
        t0 = time.perf_counter()
        with torch.no_grad():
            kwargs[self._cache_arg] = cache
            out = self.model(input_ids=ids[start:end].unsqueeze(0), position_ids=position_ids,
                             use_cache=True, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.cost.observe_prefill(end - start, time.perf_counter() - t0, cached_tokens=start)
        self.stats.computed_tokens += end - start
        return out

    def _store(self, ids: "torch.Tensor", keys: list[bytes], first: int, cache: Any) -> None:
        """Write the full chunks from block `first` on that the cache now covers and kvtierd lacks."""
        if not self.store_enabled:
            return
        torch = self._torch
        g = self.geometry
        covered = min(cache.get_seq_length(), ids.numel()) // g.chunk_tokens
        todo = keys[first:covered]
        if not todo:
            return
        with self.ns.reserve(todo, tier=self.tier) as res:
            if not res.index:
                return
            chunks = [first + i for i in res.index]   # ascending, maybe with gaps (chunks already stored)
            layers = [_get_layer(cache, layer) for layer in range(g.layers)]
            self._check_layers(layers)
            if self.paged_copy:
                self._write_paged(layers, chunks, res.offsets, res.tier)
            else:
                self._write_blocks(layers, chunks, res.views)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # commit only bytes that have landed
            stored = len(res.index)
        self.stats.stored_blocks += stored

    def _write_paged(self, layers: list, chunks: list[int], offsets: list[int], tier: str = "host") -> None:
        """The given chunks of the cache's own K/V into the reserved slots, one paged-copy launch."""
        _, _, H, T, D = self.geometry.block_shape
        hi = max(chunks) + 1
        # [head, chunk, token, dim] views of [1, head, seq, dim] (contiguous in seq after the
        # forward's torch.cat); reshape copies only a tensor with strides no view can describe.
        planes = [(t[0, :, :hi * T].reshape(H, hi, T, D), 1) for k, v in layers for t in (k, v)]
        region = self._host_region() if tier == "host" else self.client.worker_regions().region(tier, self.ns.domain)
        self._copier(planes).gather(np.asarray(chunks, dtype=np.int64), region, offsets)

    def _copier(self, planes: list[tuple["torch.Tensor", int]], block_bytes: int | None = None) -> Any:
        """A PagedCopier over these planes (pages_per_block 1), checked against the block layout
        (or against `block_bytes`: one layer's part of a block, for layer-wise loads)."""
        from kvtierd.gpu.paged import PagedCopier, PagedLayout

        copier = PagedCopier(PagedLayout(planes))
        want = self.geometry.block_bytes if block_bytes is None else block_bytes
        if copier.layout.block_bytes != want:
            raise RuntimeError(f"paged layout of {copier.layout.block_bytes} bytes a block, the block "
                               f"layout says {want}")
        return copier

    def _write_blocks(self, layers: list, chunks: list[int], views: list[memoryview]) -> None:
        """The given chunks staged in block order, then one contiguous copy per block into its slot."""
        torch = self._torch
        stage = self._stage(layers, chunks)
        for view, block in zip(views, stage, strict=True):
            torch.frombuffer(view, dtype=torch.uint8).copy_(block.reshape(-1).view(torch.uint8))

    def _stage(self, layers: list, chunks: list[int]) -> "torch.Tensor":
        """The given chunks as [n, layer, k/v, head, token, dim], contiguous, on the model's device."""
        torch = self._torch
        g = self.geometry
        L, _, H, T, D = g.block_shape
        lo, hi = min(chunks), max(chunks) + 1
        stage = torch.empty((hi - lo, L, 2, H, T, D), dtype=g.dtype, device=self.device)
        for layer, (k, v) in enumerate(layers):
            for kind, t in ((0, k), (1, v)):
                part = t[0, :, lo * T:hi * T].reshape(H, hi - lo, T, D)
                stage[:, layer, kind].copy_(part.permute(1, 0, 2, 3))
        if len(chunks) != hi - lo or chunks != list(range(lo, hi)):
            stage = stage[torch.tensor([c - lo for c in chunks], device=self.device)]
        return stage

    def _check_layers(self, layers: list) -> None:
        g = self.geometry
        _, _, H, _, D = g.block_shape
        for layer, kv in enumerate(layers):
            for t in kv:
                if t is None or t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != H or t.shape[3] != D:
                    shape = None if t is None else tuple(t.shape)
                    raise ValueError(f"layer {layer}: expected K/V of shape [1, {H}, seq, {D}], found {shape}; "
                                     "this model's cache does not fit the kvtierd block layout")
                if t.dtype != g.dtype:
                    # blocks are keyed by dtype; converting silently would store other bytes under the key
                    raise ValueError(f"layer {layer}: K/V are {t.dtype}, the model's parameters {g.dtype}")

    def _host_region(self) -> Any:
        """The host tier as a copy region of this process, page-locked and mapped where
        CUDA allows (once per client; the client unpins it when it closes)."""
        return self.client.worker_regions().host(self.ns.domain)

    def pin_host_tier(self) -> bool:
        """Page-lock this process's mapping of the host tier once, so GPU copies run at DMA speed.

        Costs about 0.5 s per GiB of region, once per process: the first GPU
        load or store does it, or call this at start-up to keep it off the
        first request's latency. Returns whether the region is pinned.
        """
        return bool(self._host_region().mapped)


def generate(cache: KVTierCache, input_ids: Any, **kwargs: Any) -> Any:
    """`cache.generate(input_ids, **kwargs)`: model.generate with kvtierd prefix reuse."""
    return cache.generate(input_ids, **kwargs)
