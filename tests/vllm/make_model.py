"""Writes the tiny random-weight Llama the vLLM tests and benchmark serve (transformers save_pretrained).

hidden 64, 2 layers, 2 attention heads sharing 1 KV head of dim 32, vocab 256: an engine
starts in under a minute on CPU and a request takes about a second, yet its outputs depend
on every cached K/V value. Weights come from a fixed seed, so every run writes the same model.
"""

from __future__ import annotations

import sys
from pathlib import Path


def make_tiny_llama(path: str | Path, max_positions: int = 16384, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, vocab_size=256, max_position_embeddings=max_positions,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():   # larger than default init, so logits (and greedy tokens) depend strongly on K/V
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.to(torch.float32).save_pretrained(path, safe_serialization=True)
    return path


if __name__ == "__main__":
    print(make_tiny_llama(sys.argv[1]))
