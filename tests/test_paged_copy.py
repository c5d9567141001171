"""The paged copy path on CPU: the torch backend, the plane table the CUDA
kernel reads, and input validation. The GPU kernels are checked against this
same backend in tests/gpu/test_paged_kernels.py."""

from __future__ import annotations

import ctypes
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtierd.gpu.paged import (  # noqa: E402
    MAX_DIMS,
    PagedCopier,
    PagedLayout,
    Region,
    _runs,
    check_batch,
)

POISON = 0xA5
DTYPES = [torch.float16, torch.bfloat16, torch.float32] + (
    [torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else [])


def random_bits(shape, dtype, gen):
    """Every bit pattern, NaNs included: a copy that goes through float math would show."""
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def make_layout(kind, n, t, h, d, dtype, layers, group, gen):
    """A KV cache of one of several memory layouts, as (PagedLayout, planes as (tensor, page_dim))."""
    planes = []
    for _ in range(layers):
        if kind == "contiguous":
            kv = [random_bits((n, t, h, d), dtype, gen) for _ in range(2)]
            planes += [(x, 0) for x in kv]
        elif kind == "stacked":
            st = random_bits((2, n, t, h, d), dtype, gen)
            planes += [(st[0], 0), (st[1], 0)]
        elif kind == "heads_major":       # stored [n, h, t, d], seen as [n, t, h, d]
            kv = [random_bits((n, h, t, d), dtype, gen).permute(0, 2, 1, 3) for _ in range(2)]
            planes += [(x, 0) for x in kv]
        elif kind == "pages_inner":       # [t, n, h, d]: page dim is not the outermost
            kv = [random_bits((t, n, h, d), dtype, gen) for _ in range(2)]
            planes += [(x, 1) for x in kv]
        elif kind == "padded":            # rows padded: head_dim is a slice of a wider buffer
            kv = [random_bits((n, t, h, d + 3), dtype, gen)[..., :d] for _ in range(2)]
            planes += [(x, 0) for x in kv]
        elif kind == "every_other_page":
            kv = [random_bits((2 * n, t, h, d), dtype, gen)[::2] for _ in range(2)]
            planes += [(x, 0) for x in kv]
        else:
            raise AssertionError(kind)
    return PagedLayout(planes, group), planes


def page_bytes(t, page_dim, i):
    return t.select(page_dim, i).contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()


def expected_block(planes, group, ids):
    out = b""
    for t, pd in planes:
        for j in range(group):
            out += page_bytes(t, pd, int(ids[j]))
    return out


def random_slots(nblocks, block_bytes, region_bytes, rng):
    """Distinct, non-overlapping, 4 KiB aligned slot offsets in random order."""
    slot = -(-block_bytes // 4096) * 4096
    free = rng.sample(range(region_bytes // slot), nblocks)
    return [i * slot for i in free]


LAYOUTS = ["contiguous", "stacked", "heads_major", "pages_inner", "padded", "every_other_page"]


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_writes_reference_bytes_and_nothing_else(kind, dtype):
    rng = random.Random(hash((kind, str(dtype))) & 0xFFFF)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    n, t, h, d = rng.choice([6, 9]), rng.choice([1, 4, 5]), rng.choice([1, 2, 3]), rng.choice([4, 8, 16])
    group = rng.choice([1, 2, 3])
    layout, planes = make_layout(kind, n, t, h, d, dtype, rng.choice([1, 2, 3]), group, gen)
    nblocks = n // group
    region_bytes = 4096 * 4 * (nblocks + 3)
    buf = bytearray([POISON]) * region_bytes
    region = Region.from_buffer(buf)
    ids = rng.sample(range(n), nblocks * group)
    offs = random_slots(nblocks, layout.block_bytes, region_bytes, rng)

    assert PagedCopier(layout, backend="torch").gather(ids, region, offs) is None

    expect = bytearray([POISON]) * region_bytes
    for b, off in enumerate(offs):
        blk = expected_block(planes, group, ids[b * group:(b + 1) * group])
        assert len(blk) == layout.block_bytes
        expect[off:off + len(blk)] = blk
    assert buf == expect


@pytest.mark.parametrize("kind", LAYOUTS)
def test_scatter_after_gather_restores_pages_and_leaves_others(kind):
    rng = random.Random(len(kind))
    gen = torch.Generator().manual_seed(7)
    dtype = rng.choice(DTYPES)
    layout, planes = make_layout(kind, 8, 4, 2, 8, dtype, 2, 2, gen)
    region = Region.from_buffer(bytearray([POISON]) * (1 << 16))
    ids = rng.sample(range(8), 6)
    offs = random_slots(3, layout.block_bytes, 1 << 16, rng)
    copier = PagedCopier(layout, backend="torch")
    copier.gather(ids, region, offs)
    before = [t.clone() for t, _ in planes]
    for t, _ in planes:   # overwrite the cache with fresh noise, then bring the pages back
        t.view(torch.uint8).copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=gen)
                                  ) if t.element_size() == 1 else t.copy_(random_bits(t.shape, t.dtype, gen))
    noise = [t.clone() for t, _ in planes]
    copier.scatter(region, offs, ids)
    for (t, pd), old, nz in zip(planes, before, noise, strict=True):
        for i in range(8):
            want = old if i in ids else nz
            assert page_bytes(t, pd, i) == page_bytes(want, pd, i), (kind, i)


def test_stacked_constructor_orders_k_before_v_per_layer():
    gen = torch.Generator().manual_seed(1)
    layers = [random_bits((2, 4, 2, 2, 4), torch.float16, gen) for _ in range(3)]
    layout = PagedLayout.from_stacked(layers, pages_per_block=1)
    assert len(layout.planes) == 6
    assert layout.planes[3].tensor.data_ptr() == layers[1][1].data_ptr()
    pb = 2 * 2 * 4 * 2
    assert layout.plane_offsets == [i * pb for i in range(6)]
    assert layout.block_bytes == 6 * pb


def test_per_layer_constructor_matches_explicit_planes():
    gen = torch.Generator().manual_seed(2)
    kv = [(random_bits((5, 4, 2, 8), torch.bfloat16, gen), random_bits((5, 4, 2, 8), torch.bfloat16, gen))
          for _ in range(2)]
    a = PagedLayout.from_layers(kv, pages_per_block=2)
    b = PagedLayout([(kv[0][0], 0), (kv[0][1], 0), (kv[1][0], 0), (kv[1][1], 0)], 2)
    assert a.block_bytes == b.block_bytes == 4 * 2 * 4 * 2 * 8 * 2
    assert [p.tensor.data_ptr() for p in a.planes] == [p.tensor.data_ptr() for p in b.planes]


# ------------------------------------------------------------ the kernel's plane table

def emulate_kernel(layout, ids, base, offs, gather):
    """What native/paged_copy.cu does with the plane table, one vector at a time."""
    tab = layout.plane_table()
    g = layout.group
    for b, off in enumerate(offs):
        for p in range(tab.shape[0]):
            pbase, pstride, pb, boff, ndim, vw = (int(x) for x in tab[p, :6])
            sizes = [int(x) for x in tab[p, 6:6 + ndim]]
            strides = [int(x) for x in tab[p, 11:11 + ndim]]
            for j in range(g):
                page = pbase + int(ids[b * g + j]) * pstride
                slot = base + int(off) + boff + j * pb
                for lin in range(0, pb, vw):
                    rem, src = lin, 0
                    for s, st in zip(reversed(sizes), reversed(strides), strict=True):
                        src += (rem % s) * st
                        rem //= s
                    if gather:
                        ctypes.memmove(slot + lin, page + src, vw)
                    else:
                        ctypes.memmove(page + src, slot + lin, vw)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_plane_table_addresses_the_same_bytes_as_the_torch_backend(kind):
    rng = random.Random(100 + len(kind))
    gen = torch.Generator().manual_seed(3)
    dtype = rng.choice(DTYPES)
    layout, planes = make_layout(kind, 6, 3, 2, 4, dtype, 2, 2, gen)
    ids = rng.sample(range(6), 4)
    offs = random_slots(2, layout.block_bytes, 1 << 15, rng)
    ref = Region.from_buffer(bytearray([POISON]) * (1 << 15))
    PagedCopier(layout, backend="torch").gather(ids, ref, offs)
    emu = torch.full((1 << 15,), POISON, dtype=torch.uint8)
    emulate_kernel(layout, ids, emu.data_ptr(), offs, True)
    assert bytes(emu.numpy()) == bytes(ref.tensor.numpy())
    # and back: scatter through the table into zeroed planes restores the pages
    saved = [t.clone() for t, _ in planes]
    for t, _ in planes:
        t.view(torch.uint8).zero_() if t.is_contiguous() else t.zero_()
    emulate_kernel(layout, ids, emu.data_ptr(), offs, False)
    for (t, pd), s in zip(planes, saved, strict=True):
        for i in ids:
            assert page_bytes(t, pd, i) == page_bytes(s, pd, i)


def test_plane_table_merges_contiguous_pages_into_one_wide_run():
    t = torch.zeros((8, 16, 8, 64), dtype=torch.float16)
    tab = PagedLayout([(t, 0)]).plane_table()
    assert tab[0, 4] == 1                       # one contiguous run
    assert tab[0, 2] == 16 * 8 * 64 * 2         # page bytes
    assert tab[0, 5] == 16                      # 16-byte vectors
    assert tab[0, 6] == tab[0, 2] and tab[0, 11] == 1


def test_plane_table_keeps_strides_of_a_permuted_page():
    t = torch.zeros((4, 2, 3, 8), dtype=torch.float32).permute(0, 2, 1, 3)   # [n, t=3, h=2, d=8]
    tab = PagedLayout([(t, 0)]).plane_table()
    ndim = int(tab[0, 4])
    assert 1 < ndim <= MAX_DIMS
    assert list(tab[0, 6:6 + ndim]) == [3, 2, 32]          # t, h, then a 32-byte run of d
    assert list(tab[0, 11:11 + ndim]) == [32, 3 * 32, 1]


def test_runs_merge_adjacent_slots_for_staging():
    pos, runs = _runs(np.array([8192, 0, 4096, 20480], dtype=np.int64), 4096)
    assert list(pos) == [2 * 4096, 0, 4096, 3 * 4096]
    assert runs == [(0, 0, 3 * 4096), (20480, 3 * 4096, 4096)]


# ------------------------------------------------------------ bad input

@pytest.fixture
def small():
    gen = torch.Generator().manual_seed(4)
    layout, _ = make_layout("contiguous", 4, 2, 2, 4, torch.float16, 1, 1, gen)
    return layout, Region.from_buffer(bytearray(1 << 14))


def test_page_id_out_of_range_is_refused(small):
    layout, region = small
    with pytest.raises(ValueError, match="page id out of range"):
        check_batch(layout, [4], region, [0], scatter=False)
    with pytest.raises(ValueError, match="page id out of range"):
        check_batch(layout, [-1], region, [0], scatter=False)


def test_slot_outside_region_is_refused(small):
    layout, region = small
    with pytest.raises(ValueError, match="outside the region"):
        check_batch(layout, [0], region, [(1 << 14) - 8], scatter=False)


def test_overlapping_slots_are_refused(small):
    layout, region = small
    with pytest.raises(ValueError, match="overlap"):
        check_batch(layout, [0, 1], region, [0, layout.block_bytes - 2], scatter=False)


def test_duplicate_page_in_scatter_is_refused(small):
    layout, region = small
    with pytest.raises(ValueError, match="appears twice"):
        PagedCopier(layout, backend="torch").scatter(region, [0, 4096], [1, 1])


def test_wrong_number_of_ids_is_refused(small):
    layout, region = small
    with pytest.raises(ValueError, match="need 2 page ids"):
        check_batch(layout, [0], region, [0, 4096], scatter=False)


def test_cuda_backend_refuses_a_cpu_cache(small):
    layout, _ = small
    with pytest.raises(ValueError, match="CUDA device"):
        PagedCopier(layout, backend="cuda")


def test_planes_with_different_page_counts_are_refused():
    with pytest.raises(ValueError, match="number of pages"):
        PagedLayout([(torch.zeros(4, 8), 0), (torch.zeros(5, 8), 0)])


def test_broadcast_pages_are_refused():
    with pytest.raises(ValueError, match="alias"):
        PagedLayout([(torch.zeros(1, 8).expand(4, 8), 0)])


# ------------------------------------------------------------ GPU modules without a GPU

def test_copies_are_cut_at_registration_chunk_edges():
    from kvtierd.gpu.pinning import split_at_chunks
    h, o, n = split_at_chunks(np.array([0, 4000, 9000]), np.array([100, 200, 300]), np.array([50, 200, 10000]), 4096)
    got = sorted(zip(h.tolist(), o.tolist(), n.tolist(), strict=True))
    assert got == [(0, 100, 50), (4000, 200, 96), (4096, 296, 104),
                   (9000, 300, 3288), (12288, 3588, 4096), (16384, 7684, 2616)]
    assert n.sum() == 50 + 200 + 10000


def test_no_cuda_means_no_pool_and_no_torch_import(monkeypatch):
    import subprocess
    import sys
    code = ("import sys; from kvtierd.tiers import hbm; from kvtierd.gpu import cuda, paged, pinning, ipc, kernels;"
            "assert 'torch' not in sys.modules and 'cupy' not in sys.modules, 'imported at module level';"
            "print(cuda.available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "",
                              "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_hbm_pool_without_cuda_says_what_is_missing(monkeypatch):
    from kvtierd.gpu import cuda
    from kvtierd.tiers.hbm import HbmPool
    monkeypatch.setattr(cuda, "available", lambda: False)
    with pytest.raises(cuda.CudaUnavailable, match="hbm.bytes = 0"):
        HbmPool(1 << 24, 0, 1 << 20)
