"""Time to first token through vLLM, with and without kvtierd, from the host and disk tiers (CPU).

One process runs two vLLM engines on the same randomly initialised Llama-shaped model (no
downloads): `base` without a connector and `kv` with KVTierConnector and its own daemon.
For each prefix length P and repeat, a fresh random P-token prefix plus a fresh short suffix:

  full        base, prefix cache empty: the whole prompt is prefilled (the reference)
  local       base again with another suffix: vLLM's own in-memory prefix cache supplies the
              prefix, nothing is copied. The ceiling for any external cache.
  miss+store  kv, first sight of the prefix: full prefill plus saving every full block
  host        kv after reset_prefix_cache(): the prefix comes from kvtierd's host tier
  disk        kv after a daemon restart (a clean stop flushes the host tier to disk) and
              reset_prefix_cache(): the prefix comes from the disk tier

TTFT = wall time of generate(max_tokens=1). Medians of --repeat runs, with min..max, then
speedup = full / host and ratio = local / host (1.0: as fast as vLLM's own cache).

    python bench/vllm_ttft.py                          # 2K, 4K, 8K prefixes, 3 repeats
    python bench/vllm_ttft.py --lengths 2048 --repeat 1

Needs the vLLM venv (scripts/setup_vllm.sh); vLLM starts its engine cores with spawn.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _daemon import Daemon  # noqa: E402

SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64, vocab_size=32000)


def make_model(path: Path, max_positions: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, **SHAPE)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    tmp = Path(tempfile.mkdtemp(prefix="kvtierd-vllm-bench-"))
    shm = Path("/dev/shm") / f"kvtierd-vllm-bench-{os.getpid()}"
    shm.mkdir()
    max_len = max(lengths) + a.suffix + 64
    model = make_model(tmp / "model", max_len + 1024)
    daemon = Daemon(tmp, ["--host-bytes", "1GiB", "--disk-bytes", "4GiB", "--set", f"host.shm_dir={shm}"]).start()
    common = dict(model=str(model), skip_tokenizer_init=True, dtype="float32", block_size=32, enforce_eager=True,
                  enable_prefix_caching=True, max_model_len=max_len, max_num_seqs=1,
                  max_num_batched_tokens=max_len)
    base = LLM(**common)
    kv = LLM(**common, kv_transfer_config=KVTransferConfig(
        kv_connector="KVTierConnector", kv_connector_module_path="kvtierd.integrations.vllm", kv_role="kv_both",
        kv_load_failure_policy="recompute", kv_connector_extra_config={"socket": daemon.sock}))
    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    rng = random.Random(1)

    def ttft(llm, ids, want_cached=None):
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        dt = time.perf_counter() - t
        if want_cached is not None and (out.num_cached_tokens or 0) < want_cached:
            raise SystemExit(f"expected >= {want_cached} cached tokens, got {out.num_cached_tokens}")
        return dt

    for llm in (base, kv):   # one-off set-up of each engine's first request
        ttft(llm, [rng.randrange(3, 32000) for _ in range(40)])
    rows = []
    try:
        for n in lengths:
            res: dict[str, list[float]] = {k: [] for k in ("full", "local", "miss+store", "host", "disk")}
            for _ in range(a.repeat):
                prefix = [rng.randrange(3, 32000) for _ in range(n)]
                sfx = lambda: [rng.randrange(3, 32000) for _ in range(a.suffix)]
                full_blocks = (n // 32) * 32
                base.reset_prefix_cache()
                res["full"].append(ttft(base, prefix + sfx()))
                res["local"].append(ttft(base, prefix + sfx(), full_blocks))
                res["miss+store"].append(ttft(kv, prefix + sfx()))
                kv.reset_prefix_cache()
                res["host"].append(ttft(kv, prefix + sfx(), full_blocks))
                daemon.stop()
                daemon.start()
                kv.reset_prefix_cache()
                res["disk"].append(ttft(kv, prefix + sfx(), full_blocks))
            rows.append((n, res))
    finally:
        daemon.stop()
        for f in shm.glob("*"):
            f.unlink()
        shm.rmdir()

    print(f"vLLM TTFT, model {SHAPE['num_hidden_layers']}L/{SHAPE['hidden_size']}h fp32 on {platform.machine()} "
          f"CPU ({os.cpu_count()} cores), suffix {a.suffix} tokens, median of {a.repeat} (min..max), seconds")
    cols = ("full", "local", "miss+store", "host", "disk")
    print(f"{'prefix':>7} " + " ".join(f"{c:>20}" for c in cols) + f" {'full/host':>10} {'local/host':>10}")
    for n, res in rows:
        cells = []
        for c in cols:
            v = sorted(res[c])
            cells.append(f"{statistics.median(v):7.3f} ({v[0]:.3f}..{v[-1]:.3f})")
        h = statistics.median(res["host"])
        print(f"{n:>7} " + " ".join(f"{x:>20}" for x in cells)
              + f" {statistics.median(res['full']) / h:>10.1f} {statistics.median(res['local']) / h:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
