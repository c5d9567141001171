"""CUDA IPC of the HBM pool: one worker process writes pages into pool slots
through the handle, another opens the same handle and reads them back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
pytest.importorskip("torch")

from kvtierd.gpu import cuda, ipc  # noqa: E402
from kvtierd.tiers.hbm import HbmPool  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.kernels_available(), reason="needs CUDA, torch, cupy")]

ROOT = Path(__file__).resolve().parents[2]
POOL = 64 << 20

# Both workers build the same cache from one seed; the writer gathers pages
# 3, 1, 4, ... into slots, the reader scatters the slots into a poisoned cache
# of its own and compares with its freshly built copy.
WORKER = r"""
import sys, torch
from kvtierd.gpu import ipc
from kvtierd.gpu.paged import PagedCopier, PagedLayout
role, handle = sys.argv[1], bytes.fromhex(sys.argv[2])
g = torch.Generator().manual_seed(1234)
cache = [torch.randint(0, 256, (64, 16, 8, 64), dtype=torch.uint8, generator=g).view(torch.float16).cuda()
         for _ in range(8)]
layout = PagedLayout.from_layers([(cache[i], cache[i + 1]) for i in range(0, 8, 2)], pages_per_block=2)
ids = [3, 1, 4, 15, 9, 26, 5, 35, 8, 60]
offs = [(7 - i) * (1 << 20) for i in range(5)]
pool = ipc.open_pool(handle)
again = ipc.open_pool(handle)
assert again is pool and pool.nbytes == %d
region = pool.region()
if role == "write":
    PagedCopier(layout).gather(ids, region, offs).synchronize()
else:
    want = [c.clone() for c in cache]
    for c in cache:
        c.view(torch.uint8).fill_(0xA5)
    PagedCopier(layout).scatter(region, offs, ids).synchronize()
    moved = torch.zeros(64, dtype=torch.bool, device="cuda"); moved[ids] = True
    for c, w in zip(cache, want):
        assert torch.equal(c[moved].view(torch.int16), w[moved].view(torch.int16)), "pages differ"
        assert (c[~moved].view(torch.uint8) == 0xA5).all(), "other pages touched"
    # the tensor view addresses the same bytes
    t = pool.tensor()
    assert t.numel() == pool.nbytes and t.device.type == "cuda"
    blk = t[offs[0]: offs[0] + layout.block_bytes]
    assert torch.equal(blk[: 16 * 8 * 32 * 2], want[0][3].reshape(-1).view(torch.uint8))
again.close()
pool.close()
print("ok", role)
""" % POOL


def run_worker(role, handle):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", WORKER, role, handle.hex()], env=env,
                          capture_output=True, text=True, timeout=180)


def test_two_processes_share_slots_through_the_pool_handle():
    pool = HbmPool(POOL, 0, 1 << 20)
    cupy.cuda.runtime.memset(pool.ptr, 0xA5, POOL)
    cupy.cuda.runtime.deviceSynchronize()
    handle = pool.ipc_handle()
    w = run_worker("write", handle)
    assert w.returncode == 0 and "ok write" in w.stdout, w.stderr
    # the daemon side sees the written slots, and nothing outside them
    host = np.empty(POOL, dtype=np.uint8)
    cupy.cuda.runtime.memcpy(host.ctypes.data, pool.ptr, POOL, 4)
    written = np.zeros(POOL, dtype=bool)
    for i in range(5):
        written[(3 + i) << 20: ((3 + i) << 20) + 4 * 2 * 2 * 16 * 8 * 32 * 2] = True
    assert (host[~written] == 0xA5).all()
    assert not (host[written] == 0xA5).all()
    r = run_worker("read", handle)
    assert r.returncode == 0 and "ok read" in r.stdout, r.stderr
    pool.close()


def test_malformed_handles_are_refused():
    with pytest.raises(ValueError, match="wrong length"):
        ipc.open_pool(b"nope")
    with pytest.raises(ValueError, match="bad magic"):
        ipc.open_pool(b"X" * (ipc._HEAD.size + ipc.HANDLE_BYTES))
