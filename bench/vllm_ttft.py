"""Time to first token through vLLM, with and without kvtierd, from the host and disk tiers (CPU).

Two vLLM engines, one after the other in their own processes, serve the same randomly
initialised Llama-shaped model (no downloads): `base` without a connector, then `kv` with
KVTierConnector and its own daemon.
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
import json
import os
import platform
import random
import statistics
import subprocess
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


def prompts(lengths: list[int], repeat: int, suffix: int) -> list[tuple[int, list[int], list[list[int]]]]:
    """(length, prefix, suffixes) for every run, the same in both phases."""
    rng = random.Random(1)
    out = []
    for n in lengths:
        for _ in range(repeat):
            prefix = [rng.randrange(3, 32000) for _ in range(n)]
            out.append((n, prefix, [[rng.randrange(3, 32000) for _ in range(suffix)] for _ in range(3)]))
    return out


def wait_recovered(sock: str, timeout: float = 120.0) -> None:
    """Until the restarted daemon has indexed its disk tier (lookups miss blocks not yet recovered)."""
    from kvtierd import Client
    deadline = time.monotonic() + timeout
    with Client(sock) as c:
        while not c.stats()["disk"].get("recovery_done"):
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not finish disk recovery")
            time.sleep(0.05)


def run_phase(phase: str, model: Path, runs, sock: str | None, daemon: Daemon | None, max_len: int) -> list[dict]:
    """One engine's measurements. Each phase runs in its own process, so one engine's idle
    threads never compete with the other's prefill."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = {}
    if phase == "kv":
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtierd.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config={"socket": sock})
    llm = LLM(model=str(model), skip_tokenizer_init=True, dtype="float32", block_size=32, enforce_eager=True,
              enable_prefix_caching=True, max_model_len=max_len, max_num_seqs=1, max_num_batched_tokens=max_len,
              **kw)
    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)

    def ttft(ids, want_cached=None):
        t = time.perf_counter()
        out = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0]
        dt = time.perf_counter() - t
        if want_cached is not None and (out.num_cached_tokens or 0) < want_cached:
            raise SystemExit(f"expected >= {want_cached} cached tokens, got {out.num_cached_tokens}")
        return dt

    # One-off costs (the first request, the first prefill of each length) are paid before timing,
    # with prompts of their own.
    warm = random.Random(2)
    for n in sorted({n for n, _, _ in runs}):
        ttft([warm.randrange(3, 32000) for _ in range(n + 1)])
    llm.reset_prefix_cache()
    rows = []
    for n, prefix, sfx in runs:
        full_blocks = (n // 32) * 32
        llm.reset_prefix_cache()
        if phase == "base":
            rows.append({"n": n, "full": ttft(prefix + sfx[0]), "local": ttft(prefix + sfx[1], full_blocks)})
        else:
            r = {"n": n, "miss+store": ttft(prefix + sfx[0])}
            llm.reset_prefix_cache()
            r["host"] = ttft(prefix + sfx[1], full_blocks)
            daemon.stop()
            daemon.start()
            wait_recovered(daemon.sock)
            llm.reset_prefix_cache()
            r["disk"] = ttft(prefix + sfx[2], full_blocks)
            rows.append(r)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--phase", choices=("base", "kv"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    max_len = max(lengths) + a.suffix + 64
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    runs = prompts(lengths, a.repeat, a.suffix)
    if a.phase:
        tmp = Path(a.dir)
        daemon = None
        if a.phase == "kv":
            shm = Path("/dev/shm") / f"kvtierd-vllm-bench-{os.getpid()}"
            shm.mkdir()
            daemon = Daemon(tmp, ["--host-bytes", "1GiB", "--disk-bytes", "4GiB", "--set",
                                  f"host.shm_dir={shm}"]).start()
        try:
            rows = run_phase(a.phase, tmp / "model", runs, daemon.sock if daemon else None, daemon, max_len)
        finally:
            if daemon is not None:
                daemon.stop()
                for f in shm.glob("*"):
                    f.unlink()
                shm.rmdir()
        (tmp / f"{a.phase}.json").write_text(json.dumps(rows))
        return 0

    with tempfile.TemporaryDirectory(prefix="kvtierd-vllm-bench-") as t:
        tmp = Path(t)
        make_model(tmp / "model", max_len + 1024)
        for phase in ("base", "kv"):
            subprocess.run([sys.executable, __file__, "--phase", phase, "--dir", t, "--lengths", a.lengths,
                            "--suffix", str(a.suffix), "--repeat", str(a.repeat)], check=True)
        rows = json.loads((tmp / "base.json").read_text())
        for r, k in zip(rows, json.loads((tmp / "kv.json").read_text()), strict=True):
            r.update(k)

    print(f"vLLM TTFT, model {SHAPE['num_hidden_layers']}L/{SHAPE['hidden_size']}h fp32 on {platform.machine()} "
          f"CPU ({os.cpu_count()} cores), suffix {a.suffix} tokens, median of {a.repeat} (min..max), seconds")
    cols = ("full", "local", "miss+store", "host", "disk")
    print(f"{'prefix':>7} " + " ".join(f"{c:>20}" for c in cols) + f" {'full/host':>10} {'local/host':>10}")
    for n in lengths:
        res = {c: sorted(r[c] for r in rows if r["n"] == n) for c in cols}
        cells = [f"{statistics.median(v):7.3f} ({v[0]:.3f}..{v[-1]:.3f})" for v in res.values()]
        h = statistics.median(res["host"])
        print(f"{n:>7} " + " ".join(f"{x:>20}" for x in cells)
              + f" {statistics.median(res['full']) / h:>10.1f} {statistics.median(res['local']) / h:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
