"""The CUDA paged-copy kernel produces the same bytes as the torch backend,
for random layouts, strides and dtypes, into device and pinned host slots."""

from __future__ import annotations

import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")

from kvtierd.gpu import cuda  # noqa: E402
from kvtierd.gpu.paged import PagedCopier, PagedLayout, Region  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda.kernels_available(), reason="needs CUDA with torch and cupy")]

POISON = 0xA5
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn]
KINDS = ["contiguous", "stacked", "heads_major", "pages_inner", "padded", "every_other_page"]


def bits(shape, dtype, gen, device="cpu"):
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape).to(device)


def cache_of(kind, n, t, h, d, dtype, layers, gen):
    """Dense base tensors (CPU) and, per plane, (base index, view function, page_dim)."""
    bases, views = [], []
    for _ in range(layers):
        if kind == "stacked":
            bases.append(bits((2, n, t, h, d), dtype, gen))
            views += [(len(bases) - 1, lambda x: x[0], 0), (len(bases) - 1, lambda x: x[1], 0)]
            continue
        for _ in range(2):
            if kind == "contiguous":
                bases.append(bits((n, t, h, d), dtype, gen))
                views.append((len(bases) - 1, lambda x: x, 0))
            elif kind == "heads_major":
                bases.append(bits((n, h, t, d), dtype, gen))
                views.append((len(bases) - 1, lambda x: x.permute(0, 2, 1, 3), 0))
            elif kind == "pages_inner":
                bases.append(bits((t, n, h, d), dtype, gen))
                views.append((len(bases) - 1, lambda x: x, 1))
            elif kind == "padded":
                bases.append(bits((n, t, h, d + 3), dtype, gen))
                views.append((len(bases) - 1, lambda x: x[..., :d], 0))
            elif kind == "every_other_page":
                bases.append(bits((2 * n, t, h, d), dtype, gen))
                views.append((len(bases) - 1, lambda x: x[::2], 0))
    return bases, views


def planes(bases, views):
    return [(fn(bases[i]), pd) for i, fn, pd in views]


def raw(t):
    return t.contiguous().view(torch.uint8).cpu()


def slots(nblocks, block_bytes, region_bytes, rng, odd):
    slot = -(-(block_bytes + 2) // 4096) * 4096
    offs = [i * slot for i in rng.sample(range(region_bytes // slot), nblocks)]
    return [o + 2 for o in offs] if odd else offs   # odd: 2-byte aligned slots force narrow vectors


@pytest.mark.parametrize("trial", range(24))
def test_kernel_matches_torch_backend(trial):
    rng = random.Random(trial)
    gen = torch.Generator().manual_seed(trial)
    kind, dtype = KINDS[trial % len(KINDS)], rng.choice(DTYPES)
    n, t, h, d = rng.choice([17, 40]), rng.choice([1, 4, 16]), rng.choice([1, 2, 8]), rng.choice([8, 64, 128])
    group = rng.choice([1, 2, 4])
    bases, views = cache_of(kind, n, t, h, d, dtype, rng.choice([1, 3]), gen)
    gpu_bases = [b.cuda() for b in bases]
    cpu_planes, gpu_planes = planes(bases, views), planes(gpu_bases, views)
    layout = PagedLayout(gpu_planes, group)
    cpu_layout = PagedLayout(cpu_planes, group)
    nblocks = n // group
    ids = rng.sample(range(n), nblocks * group)
    rbytes = (-(-(layout.block_bytes + 2) // 4096) * 4096) * (nblocks + 5)
    offs = slots(nblocks, layout.block_bytes, rbytes, rng, odd=trial % 5 == 4)

    ref = Region.from_tensor(torch.full((rbytes,), POISON, dtype=torch.uint8))
    PagedCopier(cpu_layout, backend="torch").gather(ids, ref, offs)
    want = ref.tensor.numpy().tobytes()

    dev_region = Region.from_tensor(torch.full((rbytes,), POISON, dtype=torch.uint8, device="cuda"))
    copier = PagedCopier(layout, backend="cuda")
    copier.gather(ids, dev_region, offs).synchronize()
    assert dev_region.tensor.cpu().numpy().tobytes() == want, "device slots"

    for mode in ("direct", "staged"):
        host = torch.full((rbytes,), POISON, dtype=torch.uint8).pin_memory()
        region = Region.from_tensor(host, mapped=True)
        PagedCopier(layout, backend="cuda", mode=mode).gather(ids, region, offs).synchronize()
        assert host.numpy().tobytes() == want, f"host slots, {mode}"

        # scatter back into a poisoned cache: exactly the gathered pages change
        for b in gpu_bases:
            b.view(torch.uint8).fill_(POISON)
        PagedCopier(layout, backend="cuda", mode=mode).scatter(region, offs, ids).synchronize()
        moved = torch.zeros(n, dtype=torch.bool)
        moved[ids] = True
        for (p, pd), (c, _) in zip(gpu_planes, cpu_planes, strict=True):
            got = raw(p.movedim(pd, 0)).reshape(n, -1)
            assert torch.equal(got[moved], raw(c.movedim(pd, 0)).reshape(n, -1)[moved]), mode
            assert (got[~moved] == POISON).all(), mode


def test_a_batch_of_two_thousand_pages_lands_in_slot_order():
    gen = torch.Generator().manual_seed(5)
    cache = [(bits((4096, 16, 8, 64), torch.float16, gen, "cuda"), 0) for _ in range(4)]
    layout = PagedLayout(cache, 1)
    ids = list(range(0, 4096, 2))[::-1]
    offs = [i * layout.block_bytes for i in range(len(ids))]
    region = Region.from_tensor(torch.full((len(ids) * layout.block_bytes,), POISON, dtype=torch.uint8, device="cuda"))
    PagedCopier(layout).gather(ids, region, offs).synchronize()
    got = region.tensor.view(len(ids), 4, -1)
    idx = torch.tensor(ids, device="cuda")
    for p, (t, _) in enumerate(cache):
        assert torch.equal(got[:, p], t.index_select(0, idx).reshape(len(ids), -1).view(torch.uint8))
