"""The vLLM connector's GPU worker path: layer-by-layer load and save of a Llama-3-8B-shaped
KV cache in vLLM's FlashAttention layout, against the pinned-copy ceiling of the same run.

Runs the connector's real worker half (kvtierd.integrations.vllm.worker.WorkerHalf, no vLLM
needed) against its own daemon: per layer a [2, num_blocks, block_size, kv_heads, head_dim]
bf16 tensor on the GPU; a save step gathers N chunks layer by layer into reserved host slots
(after an event on the compute stream) and commits; a load step scatters them back, layer by
layer, with the compute stream waiting on each layer's event, as vLLM's attention would.
GB/s = bytes moved / wall time of the step (synchronised). The ceiling is one pinned
cudaMemcpy of the same bytes each way, measured in the same run; the ratio is printed last.

    python bench/vllm_worker_gpu.py                        # 32 layers, 8 KV heads, dim 128, 512 MiB moved
    python bench/vllm_worker_gpu.py --tokens 16384 --repeat 5

Without CUDA it says so and exits 0 (the CPU path is covered by tests/vllm).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _daemon import Daemon  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens moved per step")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (checks the script here)")
    a = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("torch is not installed; skipped")
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; the GPU worker path benchmark was skipped")
        return 0
    on_gpu = a.device == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    from kvtierd.gpu import cuda
    from kvtierd.integrations.vllm.link import DaemonLink
    from kvtierd.integrations.vllm.naming import rank_namespace
    from kvtierd.integrations.vllm.plan import StepPlan, Transfer
    from kvtierd.integrations.vllm.worker import WorkerHalf

    dev = torch.device("cuda:0" if on_gpu else "cpu")
    n = a.tokens // a.block_size
    num_blocks = 2 * n + 8
    caches = {f"model.layers.{i}.self_attn.attn": torch.randn(
        2, num_blocks, a.block_size, a.kv_heads, a.head_dim, device=dev, dtype=torch.bfloat16)
        for i in range(a.layers)}
    page = 2 * a.block_size * a.kv_heads * a.head_dim * 2
    block = page * a.layers
    total = block * n
    host_bytes = max(1 << 30, 3 * total)
    print(f"Llama-3-8B-shaped KV: {a.layers} layers x [2, {num_blocks}, {a.block_size}, {a.kv_heads}, "
          f"{a.head_dim}] bf16; {n} chunks of {block >> 10} KiB = {total / 2**20:.0f} MiB per step; "
          f"kernels: {'cuda' if on_gpu and cuda.kernels_available() else 'torch fallback'}")
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(Path(tmp), ["--host-bytes", str(host_bytes), "--disk-bytes", "0"]).start()
        try:
            w = WorkerHalf(DaemonLink(d.sock, 60.0, "bench"), num_blocks=num_blocks, layer_order=list(caches))
            w.register(caches)
            names = list(caches)
            saves, loads, ceil_h2d, ceil_d2h = [], [], [], []
            for r in range(a.repeat):
                keys = [f"r{r}-{i}".encode().ljust(32, b".") for i in range(n)]
                plan = StepPlan("vllm/bench/gpu", w.layout.block_bytes, page, a.block_size,
                                saves=[Transfer("s", keys, list(range(n)))])
                sync()
                t = time.perf_counter()
                w.start_load(plan)
                for name in names:
                    w.wait_layer(name)
                    w.save_layer(name)
                w.wait_save()
                sync()
                saves.append(time.perf_counter() - t)
                plan = StepPlan("vllm/bench/gpu", w.layout.block_bytes, page, a.block_size,
                                loads=[Transfer("l", keys, list(range(n, 2 * n)))])
                sync()
                t = time.perf_counter()
                w.start_load(plan)
                for name in names:
                    w.wait_layer(name)
                w.wait_save()
                sync()
                loads.append(time.perf_counter() - t)
                if w.take_load_errors():
                    raise SystemExit("load errors: the benchmark's blocks were not all loaded")
                for cache in caches.values():
                    assert torch.equal(cache[:, :n], cache[:, n:2 * n]), "loaded KV differs from saved KV"
                with d_client(d) as c:
                    ns = c.namespace(rank_namespace("vllm/bench/gpu", 0, 1), block_size=w.layout.block_bytes)
                    ns.delete(keys)
                pinned = torch.empty(total, dtype=torch.uint8, pin_memory=on_gpu)
                gpu = torch.empty(total, dtype=torch.uint8, device=dev)
                for dst, src, out in ((gpu, pinned, ceil_h2d), (pinned, gpu, ceil_d2h)):
                    sync()
                    t = time.perf_counter()
                    dst.copy_(src, non_blocking=True)
                    sync()
                    out.append(time.perf_counter() - t)
                del pinned, gpu
            w.shutdown()
        finally:
            d.stop()

    def gbs(ts: list[float]) -> str:
        v = sorted(total / t / 1e9 for t in ts)
        return f"{statistics.median(v):6.2f} GB/s (min {v[0]:.2f}, max {v[-1]:.2f})"

    med = lambda ts: statistics.median(total / t / 1e9 for t in ts)
    print(f"save (GPU -> host, layer by layer): {gbs(saves)}")
    print(f"load (host -> GPU, layer by layer): {gbs(loads)}")
    print(f"ceiling D2H pinned memcpy:          {gbs(ceil_d2h)}")
    print(f"ceiling H2D pinned memcpy:          {gbs(ceil_h2d)}")
    print(f"ratio save/ceiling {med(saves) / med(ceil_d2h):.2f}, load/ceiling {med(loads) / med(ceil_h2d):.2f}")
    return 0


def d_client(d):
    from kvtierd import Client
    return Client(d.sock, timeout=60)


if __name__ == "__main__":
    sys.exit(main())
