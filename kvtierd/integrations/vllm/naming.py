"""Which kvtierd namespace an engine's blocks live in, and what a block's key is.

Keys are vLLM's own prefix block hashes (`request.block_hashes`): each chains
the hashes of all earlier blocks, the block's tokens and its extra keys
(cache_salt, LoRA, multimodal hashes), so one hash names a whole prefix and
two requests share a key exactly when vLLM's own prefix cache would share the
block. With `blocks_per_chunk` G > 1 a kvtierd block holds G vLLM blocks and
is keyed by the hash of its last vLLM block.

The namespace separates everything that makes the same hash mean different
bytes: model identity, KV dtype, the per-layer page shape and KV cache layout,
block size and G, the hash algorithm and its seed, the vLLM release series,
the device type, the tenant salt, and the parallel rank and size (each tensor-
parallel rank holds only its KV heads, so each rank has its own namespace).
All of it is hashed with BLAKE2b into the name; nothing uses Python's hash(),
so names are equal across processes, hosts and restarts.

What vLLM's hash depends on (vllm/v1/core/kv_cache_utils.py, 0.32):
- the algorithm, `--prefix-caching-hash-algo` (sha256 by default: pickle of
  (parent, tokens, extra keys), SHA-256; sha256_cbor; xxhash; xxhash_cbor);
- the seed of the first block's parent, NONE_HASH = hash(seed), where seed is
  $PYTHONHASHSEED if set, else the fixed "vllm-none-hash" for the sha256
  algorithms and fresh random bytes per process for the xxhash ones.
So with sha256 keys agree across engines that all leave PYTHONHASHSEED unset
or all set it to one value; with xxhash every engine must set the same
PYTHONHASHSEED (`unshareable_reason` says when keys cannot be shared at all).
The seed goes into the namespace, so engines with different seeds never meet.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

FORMAT = b"kvtierd/vllm/namespace/v1"   # bump if the fields or their encoding change
NONCRYPTO_ALGOS = ("xxhash", "xxhash_cbor")
DEFAULT_SEED = "vllm-none-hash"          # vLLM's seed for sha256 algorithms without PYTHONHASHSEED


def none_hash_seed(hash_algo: str, pythonhashseed: str | None) -> str | None:
    """The seed vLLM derives NONE_HASH from, or None when it is random per process."""
    if pythonhashseed is not None:
        return pythonhashseed
    if hash_algo in NONCRYPTO_ALGOS:
        return None
    return DEFAULT_SEED


def unshareable_reason(hash_algo: str, pythonhashseed: str | None) -> str | None:
    """Why block hashes of this process can never match another process's (None: they can)."""
    if none_hash_seed(hash_algo, pythonhashseed) is None:
        return (f"prefix_caching_hash_algo={hash_algo!r} without PYTHONHASHSEED gives every vLLM process a "
                f"random hash seed, so no other engine could ever use these blocks; set PYTHONHASHSEED to one "
                f"value on every engine (or use sha256)")
    return None


@dataclass(frozen=True)
class NamespaceSpec:
    """Everything that must match for two engines to share blocks."""

    model: str               # model name or path (+ revision, or the operator's model_id)
    model_digest: str        # a digest of the model's config
    kv_dtype: str
    page_shape: tuple[int, ...]   # logical shape of one layer's page (one vLLM block), outermost first
    page_bytes: int          # bytes of one layer's page
    num_layers: int
    kv_layout: str           # vLLM's resolved KV cache layout name ("" when the version has none)
    block_size: int          # tokens per vLLM block
    blocks_per_chunk: int    # vLLM blocks per kvtierd block
    hash_algo: str
    hash_seed: str
    vllm_series: str         # "0.32": layouts and hashing may change between minor releases
    device: str              # "cpu", "cuda", ...
    tenant_salt: str = ""

    @property
    def chunk_tokens(self) -> int:
        return self.block_size * self.blocks_per_chunk

    @property
    def block_bytes(self) -> int:
        """Bytes of one kvtierd block on one rank: G pages of every layer."""
        return self.num_layers * self.blocks_per_chunk * self.page_bytes

    def digest(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        fields = (FORMAT.decode(), self.model, self.model_digest, self.kv_dtype,
                  "x".join(map(str, self.page_shape)), str(self.page_bytes), str(self.num_layers), self.kv_layout,
                  str(self.block_size), str(self.blocks_per_chunk), self.hash_algo, self.hash_seed,
                  self.vllm_series, self.device, self.tenant_salt)
        for f in fields:
            raw = f.encode()
            h.update(struct.pack("<Q", len(raw)))   # length-prefixed: fields cannot run into one another
            h.update(raw)
        return h.hexdigest()

    def base_name(self) -> str:
        short = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.rstrip("/").split("/")[-1])[-48:] or "model"
        return f"vllm/{short}/{self.digest()}"


def rank_namespace(base: str, tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1) -> str:
    """The namespace of one parallel rank: ranks hold different KV heads (TP) or layers (PP)."""
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"rank tp{tp_rank}/{tp_size} pp{pp_rank}/{pp_size} out of range")
    return f"{base}/tp{tp_rank}of{tp_size}/pp{pp_rank}of{pp_size}"


def all_rank_namespaces(base: str, tp_size: int, pp_size: int = 1) -> list[str]:
    """Every rank's namespace: a block counts as a hit only if all of them hold it."""
    return [rank_namespace(base, t, tp_size, p, pp_size) for p in range(pp_size) for t in range(tp_size)]


def chunk_keys(block_hashes: list[bytes], hashes_per_chunk: int, start: int, stop: int) -> list[bytes]:
    """kvtierd keys of chunks [start, stop): the hash that ends each chunk (vLLM hashes every
    `hash_block_size` tokens, which may be finer than its block size)."""
    h = hashes_per_chunk
    return [bytes(block_hashes[(i + 1) * h - 1]) for i in range(start, stop)]
