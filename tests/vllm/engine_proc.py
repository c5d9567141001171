"""A vLLM engine in its own process, driven by JSON lines on stdin (the tests' engine).

    python engine_proc.py MODEL_DIR CONFIG_JSON

CONFIG_JSON: {"kvtierd": {...extra config...} or null, "failure_policy": "recompute"}.
Prints one line "@@kvt {"ready": ...}" once the engine serves, then answers each
request line {"prompts": [{"ids": [...], "salt": str|null}], "max_tokens": n} with
"@@kvt {"outputs": [{"tokens", "logprobs", "cached"}]}". Requests run one prompt at a
time, so batching never changes the numerics being compared. vLLM starts its engine
core with spawn, hence the __main__ guard.
"""

from __future__ import annotations

import json
import sys
import time

PREFIX = "@@kvt "


def reply(obj: dict) -> None:
    sys.stdout.write(PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    model_dir, cfg = sys.argv[1], json.loads(sys.argv[2])
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    kw = {}
    if cfg.get("kvtierd") is not None:
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KVTierConnector", kv_connector_module_path="kvtierd.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy=cfg.get("failure_policy", "recompute"),
            kv_connector_extra_config=cfg["kvtierd"])
    t0 = time.monotonic()
    llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", block_size=32, enforce_eager=True,
              enable_prefix_caching=True, max_model_len=cfg.get("max_model_len", 4096), max_num_seqs=4,
              disable_log_stats=False, **kw)
    # The first request of an engine pays one-off set-up (tens of seconds on CPU); pay it here, with a
    # prompt shorter than a block so nothing reaches kvtierd.
    llm.generate([{"prompt_token_ids": [3, 4, 5]}], SamplingParams(max_tokens=2, detokenize=False), use_tqdm=False)
    reply({"ready": True, "start_s": time.monotonic() - t0})
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        outs = []
        t = time.monotonic()
        for i, p in enumerate(req["prompts"]):
            prompt = {"prompt_token_ids": p["ids"]}
            if p.get("salt"):
                prompt["cache_salt"] = p["salt"]
            sp = SamplingParams(max_tokens=req.get("max_tokens", 4), temperature=0.0, logprobs=0,
                                detokenize=False, ignore_eos=True)
            t1 = time.monotonic()
            o = llm.generate([prompt], sp, use_tqdm=False)[0]
            c = o.outputs[0]
            lps = [next(iter(d.values())).logprob if d else None for d in (c.logprobs or [])]
            outs.append({"tokens": list(c.token_ids), "logprobs": lps, "cached": o.num_cached_tokens or 0,
                         "seconds": time.monotonic() - t1})
            reply({"progress": i + 1})
        reply({"outputs": outs, "seconds": time.monotonic() - t})
    reply({"bye": True})


if __name__ == "__main__":
    main()
