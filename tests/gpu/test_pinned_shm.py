"""A /dev/shm region registered with cudaHostRegister(mapped): the kernels
gather into it and scatter out of it directly and through staging."""

from __future__ import annotations

import mmap
import os
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")

from kvtierd.gpu import cuda, pinning  # noqa: E402
from kvtierd.gpu.paged import PagedCopier, PagedLayout, Region  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cuda.kernels_available(), reason="needs CUDA, torch, cupy")]

SIZE = 48 << 20


def test_gather_and_scatter_through_a_registered_shm_mapping():
    path = f"/dev/shm/kvtierd-pin-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    os.ftruncate(fd, SIZE)
    mm = mmap.mmap(fd, SIZE)
    os.close(fd)
    os.unlink(path)
    pin = pinning.pin(*pinning.buffer_address(mm), chunk_bytes=16 << 20)  # 3 chunks: crosses boundaries
    assert pin.pinned and pin.length == SIZE
    region = Region.from_buffer(mm, pinned=pin)
    assert region.mapped
    rng = random.Random(9)
    g = torch.Generator().manual_seed(9)
    cache = [torch.randint(0, 256, (256, 16, 8, 64), dtype=torch.uint8, generator=g).view(torch.bfloat16)
             .reshape(256, 16, 8, 32).cuda() for _ in range(6)]
    layout = PagedLayout.from_layers([(cache[i], cache[i + 1]) for i in range(0, 6, 2)], pages_per_block=4)
    nblocks = 40
    slot = layout.block_bytes
    offs = [i * slot for i in rng.sample(range(SIZE // slot), nblocks)]
    ids = rng.sample(range(256), nblocks * 4)
    ref = Region.from_tensor(torch.full((SIZE,), 0x5A, dtype=torch.uint8))
    cpu_layout = PagedLayout.from_layers([(cache[i].cpu(), cache[i + 1].cpu()) for i in range(0, 6, 2)], 4)
    PagedCopier(cpu_layout, backend="torch").gather(ids, ref, offs)
    for mode in ("direct", "staged"):
        region.tensor.fill_(0x5A)
        copier = PagedCopier(layout, backend="cuda", mode=mode)
        copier.gather(ids, region, offs).synchronize()
        assert torch.equal(region.tensor, ref.tensor), mode
        want = [c.clone() for c in cache]
        for c in cache:
            c.view(torch.uint8).fill_(0x5A)
        copier.scatter(region, offs, ids).synchronize()
        moved = torch.zeros(256, dtype=torch.bool, device="cuda")
        moved[ids] = True
        for c, w in zip(cache, want, strict=True):
            assert torch.equal(c[moved].view(torch.uint8), w[moved].view(torch.uint8)), mode
            assert (c[~moved].view(torch.uint8) == 0x5A).all(), mode
        for c, w in zip(cache, want, strict=True):
            c.copy_(w)
    del region
    pin.close()
    assert not pin.pinned
    mm.close()


def test_registering_twice_says_so():
    buf = mmap.mmap(-1, 1 << 20)
    with pinning.pin_buffer(buf):
        with pytest.raises(RuntimeError, match="already registered"):
            pinning.pin_buffer(buf)
    buf.close()
