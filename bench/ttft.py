"""Time to first token: full prefill vs a prompt prefix served by kvtierd from each tier.

Builds a randomly initialised Llama-shaped model (no downloads), starts its
own daemon, and for each prefix length P times the logits of the first new
token for a prompt of P cached tokens plus a fresh --suffix of new ones:

  full        model(prompt, logits_to_keep=1), no kvtierd: the reference
  miss+store  the first KVTierCache.forward of the prompt: full prefill plus
              storing every full chunk (what a miss costs with kvtierd)
  host        the prefix served from the shared-memory host tier (on a GPU loaded layer by layer,
              each layer's copy overlapping the forward: kvtierd.integrations.layerwise)
  host-whole  (GPU) the same with the whole prefix copied before the forward starts
  plain copy  the reference a load must beat: the prefix's K/V already in pinned host
              tensors, one .to(device) per layer into a DynamicCache, then the same forward
  disk        the same after a daemon restart (clean shutdown flushes the host
              tier to disk; the first acquire reads it back), one sample per restart
  hbm         when the daemon reports blocks in its HBM tier (GPU machines)

Loads are forced here (the cost model is told recompute is dear) so every
tier's time is measured; the `cost model` column then says what a cost model
that learned from this run's own prefills and loads would decide. `load` is
the load alone (lookup + acquire + copy into a DynamicCache), and its GB/s is
set against a memcpy (CPU) or pinned H2D copy (GPU) of the same bytes,
measured in the same run. Speedup = full / reuse; ratios last.

    python bench/ttft.py                              # CPU: 'tiny' model, 1K..8K
    python bench/ttft.py --model 1b --lengths 2048,8192,16384        # GPU
    python bench/ttft.py --model 8b --lengths 4096,8192,16384        # GPU, Llama-3-8B shape
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from _daemon import Daemon  # noqa: E402

from kvtierd import Client  # noqa: E402
from kvtierd.config import format_size  # noqa: E402
from kvtierd.integrations.cost import CostModel  # noqa: E402
from kvtierd.integrations.transformers import (  # noqa: E402
    KVTierCache,
    _new_cache,
    _set_layer,
    cache_argument,
    model_geometry,
    output_cache,
)

SHAPES = {
    # name: layers, hidden, heads, kv heads, intermediate, vocab, rope theta
    "tiny": (4, 512, 8, 2, 1408, 32000, 10000.0),          # a few seconds per 8K prefill on 2 CPU cores
    "1b": (22, 2048, 32, 4, 5632, 32000, 10000.0),         # TinyLlama-1.1B
    "8b": (32, 4096, 32, 8, 14336, 128256, 500000.0),      # Llama-3-8B
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, inter, vocab, theta = SHAPES[shape]
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                      max_position_embeddings=32768, rope_theta=theta)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def copy_ceiling(nbytes: int, device: torch.device) -> float:
    """GB/s of the copy a load cannot beat: memcpy (CPU) or pinned H2D (GPU), same bytes, this run."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    if device.type == "cuda":
        src = src.pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    else:
        dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        dt, _ = timed(device, lambda: dst.copy_(src, non_blocking=True))
        best = min(best, dt)
    return nbytes / best / 1e9


def plain_copy(model, prompt: torch.Tensor, n: int, device: torch.device) -> "callable":
    """The plain-copy reference: a function that copies the n-token prefix's K/V (computed once, kept
    in pinned host tensors) to the device one layer at a time and runs the suffix forward."""
    with torch.no_grad():
        cache = output_cache(model(prompt[:, :n], use_cache=True))
    host = []
    for layer in cache.layers:
        k, v = layer.keys.cpu(), layer.values.cpu()
        host.append((k.pin_memory(), v.pin_memory()) if device.type == "cuda" else (k.clone(), v.clone()))
    del cache
    arg = cache_argument(model)
    position_ids = torch.arange(n, prompt.shape[1], device=device).unsqueeze(0)

    def run():
        c = _new_cache(model)
        for i, (k, v) in enumerate(host):
            _set_layer(c, i, k.to(device, non_blocking=True), v.to(device, non_blocking=True))
        return model(input_ids=prompt[:, n:], position_ids=position_ids, use_cache=True, logits_to_keep=1,
                     **{arg: c})
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="prefix lengths in tokens")
    ap.add_argument("--suffix", type=int, default=32, help="new tokens after the cached prefix")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--disk-restarts", type=int, default=1, help="daemon restarts for disk samples (0: no disk tier)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--hbm-bytes", default="0", help="daemon HBM tier size (GPU)")
    ap.add_argument("--tier", choices=("host", "hbm"), default="host",
                    help="where the integration stores blocks (hbm: needs --hbm-bytes and a GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    lengths = [int(x) for x in a.lengths.split(",")]

    model = build_model(a.model, device, dtype)
    geo = model_geometry(model, a.chunk_tokens)
    per_token = geo.block_bytes // geo.chunk_tokens
    kv_total = sum(lengths) * per_token
    host_bytes = int(kv_total * 1.3) + (64 << 20)
    print(f"# {platform.node()} {os.cpu_count()} cpus, torch {torch.__version__}, device {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# model '{a.model}' {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, {dtype}, "
          f"chunk {geo.chunk_tokens} tokens = {format_size(geo.block_bytes)} blocks, suffix {a.suffix}, "
          f"reps {a.reps}, torch threads {torch.get_num_threads()}")
    g = torch.Generator().manual_seed(1)
    prefixes = {n: torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in lengths}

    def prompt(n: int, rep: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * n + rep)
        sfx = torch.randint(0, model.config.vocab_size, (1, a.suffix), generator=gen)
        return torch.cat([prefixes[n], sfx], dim=1).to(device)

    forced = CostModel(device=device.type, prefill_token_s=1.0, learn=False)
    learned = CostModel(device=device.type, params=sum(p.numel() for p in model.parameters()))
    rows: dict[tuple[int, str], dict] = {}
    full: dict[int, float] = {}

    with torch.no_grad():
        for n in lengths:   # warm-up of kernels and allocator, then the reference
            model(prompt(n, 99)[:, :256], logits_to_keep=1)
            times = []
            for rep in range(a.reps):
                dt, _ = timed(device, lambda: model(prompt(n, rep), logits_to_keep=1))
                times.append(dt)
                learned.observe_prefill(n + a.suffix, dt)
            full[n] = statistics.median(times)

        with tempfile.TemporaryDirectory(prefix="kvtierd-ttft-") as td:
            tmp = Path(td)
            disk_bytes = 2 * kv_total + (1 << 30) if a.disk_restarts else 0
            d = Daemon(tmp, ["--host-bytes", str(host_bytes), "--disk-bytes", str(disk_bytes),
                             "--hbm-bytes", a.hbm_bytes]).start()
            try:
                # KVTierCache closes first: it unpins the client's mapping before the client unmaps it
                with Client(d.sock) as c, KVTierCache(c, model, chunk_tokens=geo.chunk_tokens, cost=forced, tier=a.tier,
                                                      model_id=f"bench/{a.model}") as kv:
                    if device.type == "cuda":
                        kv.pin_host_tier()   # once per process, not part of any request
                    for n in lengths:
                        dt, out = timed(device, lambda: kv.forward(prompt(n, 0), logits_to_keep=1))
                        assert out.n_cached_tokens == 0
                        rows[(n, "miss+store")] = {"reuse": [dt]}
                    for n in lengths:
                        keys = kv.keys(prefixes[n])
                        tier = (kv.ns.lookup_tiers(keys) or ["none"])[0]
                        r = rows.setdefault((n, tier), {"reuse": [], "load": []})
                        for rep in range(1, a.reps + 1):
                            dt, (cache, got) = timed(device, lambda: kv.load(prompt(n, rep)))
                            r["load"].append(dt)
                            del cache
                            dt, out = timed(device, lambda: kv.forward(prompt(n, rep), logits_to_keep=1))
                            assert out.n_cached_tokens == n, (out.n_cached_tokens, n)
                            r["reuse"].append(dt)
                        learned.observe_load([tier] * len(keys), geo.block_bytes, statistics.median(r["load"]))
                        if kv.layerwise:   # the same hits with the whole prefix copied first
                            whole = KVTierCache(c, model, chunk_tokens=geo.chunk_tokens, cost=forced, tier=a.tier,
                                                model_id=f"bench/{a.model}", layerwise=False)
                            w = rows.setdefault((n, f"{tier}-whole"), {"reuse": []})
                            for rep in range(1, a.reps + 1):
                                dt, out = timed(device, lambda: whole.forward(prompt(n, rep), logits_to_keep=1))
                                assert out.n_cached_tokens == n
                                w["reuse"].append(dt)
                        ref = plain_copy(model, prompt(n, 1), n, device)
                        ref()                                           # warm-up
                        p = rows.setdefault((n, "plain copy"), {"reuse": []})
                        for _ in range(a.reps):
                            dt, _ = timed(device, ref)
                            p["reuse"].append(dt)
                        del ref
                        for load_s, reuse_s in zip(r["load"], r["reuse"]):   # the forward after a load
                            learned.observe_prefill(a.suffix, max(reuse_s - load_s, 1e-6), cached_tokens=n)
                for restart in range(a.disk_restarts):
                    d.stop()
                    d.start()
                    with Client(d.sock) as c, KVTierCache(c, model, chunk_tokens=geo.chunk_tokens, cost=forced,
                                                          tier=a.tier, model_id=f"bench/{a.model}") as kv:
                        if device.type == "cuda":
                            kv.pin_host_tier()
                        for n in lengths:
                            keys = kv.keys(prefixes[n])
                            tiers = kv.ns.lookup_tiers(keys)
                            tier = tiers[0] if tiers else "none"
                            if tier != "disk":
                                print(f"# after restart {restart + 1} the {n}-token prefix is in {tier!r}, not on disk")
                                continue
                            dt, out = timed(device, lambda: kv.forward(prompt(n, 50 + restart), logits_to_keep=1))
                            assert out.n_cached_tokens == n
                            r = rows.setdefault((n, "disk"), {"reuse": [], "load": []})
                            r["reuse"].append(dt)
            finally:
                d.stop()

    for n in lengths:
        # a disk sample is one forward; its load part is what it took beyond a host hit's forward
        disk, host = rows.get((n, "disk")), rows.get((n, "host"))
        if disk and host:
            fwd = statistics.median(host["reuse"]) - statistics.median(host["load"])
            disk["load"] = [max(x - fwd, 1e-6) for x in disk["reuse"]]
            learned.observe_load(["disk"] * (n // geo.chunk_tokens), geo.block_bytes, statistics.median(disk["load"]))
    ceiling = copy_ceiling(max(lengths) * per_token, device)
    print(f"# copy ceiling ({'memcpy' if device.type == 'cpu' else 'pinned H2D'}, "
          f"{format_size(max(lengths) * per_token)}): {ceiling:.1f} GB/s")
    print(f"\n{'prefix':>7} {'KV':>10} {'full ms':>9} {'path':<11} {'load ms':>8} {'load GB/s':>9} "
          f"{'reuse ms':>9} {'speedup':>8} {'cost model':>10}")
    speedups = []
    for n in lengths:
        for path in ("miss+store", "plain copy", "hbm", "hbm-whole", "host", "host-whole", "disk", "none"):
            r = rows.get((n, path))
            if not r:
                continue
            reuse = statistics.median(r["reuse"])
            load = statistics.median(r["load"]) if r.get("load") else None
            kv_bytes = n * per_token
            decision = "-"
            if path in ("hbm", "host", "disk"):
                learned_plan = learned.plan([path] * (n // geo.chunk_tokens), geo.block_bytes, geo.chunk_tokens,
                                            total_tokens=n + a.suffix)
                decision = "serve" if learned_plan.load_blocks == n // geo.chunk_tokens else "skip"
            if path != "miss+store":
                speedups.append((n, path, full[n] / reuse))
            print(f"{n:>7} {format_size(kv_bytes):>10} {full[n] * 1e3:>9.1f} {path:<11} "
                  f"{(f'{load * 1e3:.1f}' if load else '-'):>8} "
                  f"{(f'{kv_bytes / load / 1e9:.2f}' if load else '-'):>9} {reuse * 1e3:>9.1f} "
                  f"{full[n] / reuse:>7.2f}x {decision:>10}")
    snap = learned.snapshot()
    print(f"\nlearned: prefill {snap['prefill_fixed_s'] * 1e3:.1f} ms + "
          f"{snap['prefill_s_per_token'] * 1e6:.1f} µs/token, after a load {snap['after_load_fixed_s'] * 1e3:.1f} ms + "
          f"{snap['after_load_s_per_token'] * 1e6:.1f} µs/token; load rates "
          + ", ".join(f"{t} {r / 1e9:.2f} GB/s" for t, r in learned.load_rates.items()))
    print("speedup of time to first token, full prefill / reuse:")
    for n, path, s in speedups:
        print(f"  {path:<10} {n:>6} tokens: {s:.1f}x")
    by = {(n, path): s for n, path, s in speedups}
    for n in lengths:
        for path in ("host", "hbm"):
            if (n, path) in by and (n, "plain copy") in by:
                print(f"  {path} / plain copy at {n} tokens: {by[(n, path)] / by[(n, 'plain copy')]:.2f} "
                      f"(>= 1: the load is at least as fast as a plain per-layer copy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
