"""Block keys: chained prefix hashes of fixed-size token chunks.

A prompt's token ids are cut into chunks of `chunk_tokens`; only full chunks
get a key (a partial tail may still grow, so its K/V is not final). The key of
chunk i is BLAKE2b-256(key of chunk i-1 || chunk i's tokens), and chunk 0
chains from a namespace seed. So a key names a whole prefix, not a chunk: two
prompts share key i exactly when their first i+1 chunks are equal, and a list
of keys is a prefix chain the daemon can answer "how many leading ones do you
have" about without ever seeing a token.

The seed is itself a hash of everything that makes K/V bytes differ for the
same tokens: model identity (name, revision, config, a weight fingerprint),
dtype, KV layout, chunk size and a tenant salt (tenants with different salts
never share blocks, so one cannot probe for another's prompts by timing).

Everything is explicit so keys are equal across processes, machines and
restarts: no Python hash(), tokens serialised little-endian with a fixed width
that is part of the seed, strings as UTF-8 with length prefixes so fields
cannot run into one another. BLAKE2b is in hashlib, fast (about 1 GB/s on one
core), and 32 bytes is far past collision worries at any cache size.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

KEY_BYTES = 32
_FORMAT = b"kvtierd/keys/v1"  # bump if the chaining or serialisation ever changes
_TOKEN_DTYPES = {4: np.dtype("<i4"), 8: np.dtype("<i8")}


def _field(h: "hashlib._Hash", value: bytes | str) -> None:
    raw = value.encode() if isinstance(value, str) else bytes(value)
    h.update(struct.pack("<Q", len(raw)))
    h.update(raw)


def namespace_seed(*, model: str, dtype: str, layout: str, chunk_tokens: int,
                   tenant_salt: bytes | str = b"", token_bytes: int = 4) -> bytes:
    """The 32-byte seed of a key chain: a hash of what makes two K/V byte strings comparable.

    `model` should identify weights, not just architecture (name + revision, or
    a weight fingerprint). `layout` names how a block's bytes are arranged.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    if token_bytes not in _TOKEN_DTYPES:
        raise ValueError(f"token_bytes must be 4 or 8, got {token_bytes}")
    if not model:
        raise ValueError("model identity must not be empty")
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    _field(h, _FORMAT)
    for value in (model, dtype, layout, str(chunk_tokens), str(token_bytes)):
        _field(h, value)
    _field(h, tenant_salt)
    return h.digest()


def _as_token_array(tokens: Sequence[int] | np.ndarray | Iterable[int], token_bytes: int) -> np.ndarray:
    """Token ids as a 1-D little-endian array of the chain's width; refuses values that do not fit."""
    if hasattr(tokens, "detach"):  # a torch tensor, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
    out_dtype = _TOKEN_DTYPES[token_bytes]
    if arr.size:
        info = np.iinfo(out_dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > info.max:
            raise ValueError(f"token ids must lie in 0..{info.max} for {token_bytes}-byte tokens; "
                             f"found {lo}..{hi}")
    return np.ascontiguousarray(arr, dtype=out_dtype)


@dataclass(frozen=True)
class PrefixHasher:
    """Keys the full chunks of token sequences within one namespace seed."""

    seed: bytes
    chunk_tokens: int
    token_bytes: int = 4

    def __post_init__(self) -> None:
        if len(self.seed) != KEY_BYTES:
            raise ValueError(f"seed must be {KEY_BYTES} bytes, got {len(self.seed)}")
        if self.chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if self.token_bytes not in _TOKEN_DTYPES:
            raise ValueError(f"token_bytes must be 4 or 8, got {self.token_bytes}")

    def full_chunks(self, n_tokens: int) -> int:
        return n_tokens // self.chunk_tokens

    def keys(self, tokens: Sequence[int] | np.ndarray, max_chunks: int | None = None) -> list[bytes]:
        """One key per full chunk of `tokens` (at most `max_chunks`), in prefix order."""
        arr = _as_token_array(tokens, self.token_bytes)
        n = self.full_chunks(arr.size)
        if max_chunks is not None:
            n = min(n, max_chunks)
        raw = arr[: n * self.chunk_tokens].tobytes()
        step = self.chunk_tokens * self.token_bytes
        out: list[bytes] = []
        prev = self.seed
        for i in range(n):
            h = hashlib.blake2b(prev, digest_size=KEY_BYTES)
            h.update(raw[i * step:(i + 1) * step])
            prev = h.digest()
            out.append(prev)
        return out

    def extend(self, prev_key: bytes | None, chunk: Sequence[int] | np.ndarray) -> bytes:
        """The key after `prev_key` (None: the chain's start) for one full chunk."""
        arr = _as_token_array(chunk, self.token_bytes)
        if arr.size != self.chunk_tokens:
            raise ValueError(f"a chunk holds exactly {self.chunk_tokens} tokens, got {arr.size}")
        h = hashlib.blake2b(self.seed if prev_key is None else prev_key, digest_size=KEY_BYTES)
        h.update(arr.tobytes())
        return h.digest()


def chunk_keys(tokens: Sequence[int] | np.ndarray, *, seed: bytes, chunk_tokens: int,
               token_bytes: int = 4) -> list[bytes]:
    """Keys of the full chunks of `tokens`: a shortcut for PrefixHasher(...).keys(tokens)."""
    return PrefixHasher(seed, chunk_tokens, token_bytes).keys(tokens)
