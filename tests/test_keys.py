"""Chained prefix keys: deterministic, prefix-shaped, and separated by namespace."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kvtierd.keys import KEY_BYTES, PrefixHasher, chunk_keys, namespace_seed

SEED = namespace_seed(model="m@r#abc", dtype="torch.float32", layout="L2xKV", chunk_tokens=4)


def test_key_of_chunk_is_hash_of_previous_key_and_little_endian_tokens():
    keys = chunk_keys([1, 2, 3, 4, 5, 6, 7, 8], seed=SEED, chunk_tokens=4)
    first = hashlib.blake2b(SEED + np.array([1, 2, 3, 4], "<i4").tobytes(), digest_size=32).digest()
    second = hashlib.blake2b(first + np.array([5, 6, 7, 8], "<i4").tobytes(), digest_size=32).digest()
    assert keys == [first, second]
    assert all(len(k) == KEY_BYTES for k in keys)


def test_only_full_chunks_are_keyed():
    h = PrefixHasher(SEED, 4)
    assert len(h.keys(list(range(11)))) == 2
    assert h.keys([1, 2, 3]) == []
    assert h.keys(list(range(12)), max_chunks=1) == h.keys(list(range(4)))


def test_shared_prefix_gives_shared_keys_and_a_different_chunk_breaks_the_chain():
    h = PrefixHasher(SEED, 4)
    a = h.keys(list(range(16)))
    b = h.keys(list(range(8)) + [99] + list(range(9, 16)))
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]  # chunk 3 equal in tokens, but its prefix differs


def test_extend_continues_a_chain():
    h = PrefixHasher(SEED, 4)
    keys = h.keys(list(range(12)))
    assert h.extend(None, [0, 1, 2, 3]) == keys[0]
    assert h.extend(keys[1], [8, 9, 10, 11]) == keys[2]
    with pytest.raises(ValueError, match="exactly 4 tokens"):
        h.extend(keys[0], [1, 2])


def test_token_container_does_not_change_keys():
    torch = pytest.importorskip("torch")
    h = PrefixHasher(SEED, 4)
    ref = h.keys([5, 6, 7, 8, 9, 10, 11, 12])
    assert h.keys(np.arange(5, 13, dtype=np.int64)) == ref
    assert h.keys(np.arange(5, 13, dtype=np.uint16)) == ref
    assert h.keys(torch.arange(5, 13)) == ref


@pytest.mark.parametrize("field,value", [
    ("model", "other@r#abc"), ("dtype", "torch.bfloat16"), ("layout", "L3xKV"),
    ("chunk_tokens", 8), ("tenant_salt", b"tenant-b"), ("token_bytes", 8),
])
def test_every_namespace_field_changes_the_seed(field, value):
    base = dict(model="m@r#abc", dtype="torch.float32", layout="L2xKV", chunk_tokens=4)
    assert namespace_seed(**{**base, field: value}) != namespace_seed(**base)


def test_fields_cannot_run_into_each_other():
    a = namespace_seed(model="ab", dtype="c", layout="x", chunk_tokens=4)
    b = namespace_seed(model="a", dtype="bc", layout="x", chunk_tokens=4)
    assert a != b


def test_bad_tokens_and_arguments_are_refused():
    h = PrefixHasher(SEED, 4)
    with pytest.raises(ValueError, match="0..2147483647"):
        h.keys([1, 2, 3, -1])
    with pytest.raises(ValueError, match="0..2147483647"):
        h.keys([1, 2, 3, 2**31])
    with pytest.raises(ValueError, match="integers"):
        h.keys([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="1-D"):
        h.keys([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="32 bytes"):
        PrefixHasher(b"short", 4)
    with pytest.raises(ValueError, match="positive"):
        PrefixHasher(SEED, 0)
    with pytest.raises(ValueError, match="empty"):
        namespace_seed(model="", dtype="f", layout="l", chunk_tokens=4)
    wide = PrefixHasher(namespace_seed(model="m", dtype="f", layout="l", chunk_tokens=2, token_bytes=8), 2, 8)
    assert len(wide.keys([2**40, 1])) == 1


def test_keys_are_equal_in_a_fresh_process_with_another_hash_seed():
    code = textwrap.dedent("""
        from kvtierd.keys import chunk_keys, namespace_seed
        seed = namespace_seed(model="m@r#abc", dtype="torch.float32", layout="L2xKV", chunk_tokens=4,
                              tenant_salt="t1")
        print(b"".join(chunk_keys(list(range(1000, 1040)), seed=seed, chunk_tokens=4)).hex())
    """)
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seed = namespace_seed(model="m@r#abc", dtype="torch.float32", layout="L2xKV", chunk_tokens=4, tenant_salt="t1")
    assert out.stdout.strip() == b"".join(chunk_keys(list(range(1000, 1040)), seed=seed, chunk_tokens=4)).hex()
