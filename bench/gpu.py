#!/usr/bin/env python3
"""GPU paths of kvtierd against the machine's own copy ceilings, in one run.

    python3 bench/gpu.py [--out DIR]

1. Ceilings: pinned cudaMemcpy of 256 MiB H2D and D2H (torch pin_memory),
   the same from/to the registered /dev/shm region, and D2D.
2. kvtierd paths, 256 MiB per batch:
   - worker GPU <-> host-tier slots, 2 MiB blocks that are contiguous in the
     worker (one 2 MiB page each), slots scattered in a pinned /dev/shm region;
   - scattered 16 KiB pages of a 32-layer K/V cache (64 planes of
     [4096, 16, 8, 64] fp16), 2 pages per block (2 MiB blocks of 128 pieces);
   each as "direct" (kernel over mapped host memory, at several grid sizes)
   and "staged" (device gather + cudaMemcpyAsync per run of slots); the same
   into HBM-pool slots; HbmPool demotion/promotion (memcpy and kernel engines);
   baseline: one cudaMemcpyAsync per 16 KiB page.
Prints GB/s (1e9 bytes/s of payload) and the ratio to the matching ceiling;
the table comes last. Needs torch, cupy and a CUDA GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvtierd.gpu import paged, pinning  # noqa: E402
from kvtierd.gpu.paged import PagedCopier, PagedLayout, Region  # noqa: E402
from kvtierd.tiers.hbm import HbmPool  # noqa: E402

MiB = 1 << 20
BATCH = 256 * MiB
HOST = 1024 * MiB
rows: list[dict] = []


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def time_stream(fn, reps: int = 10, warm: int = 2) -> float:
    """Median seconds of fn() on the current stream, timed by CUDA events."""
    s = torch.cuda.current_stream()
    out = []
    for i in range(warm + reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(s)
        fn()
        b.record(s)
        b.synchronize()
        if i >= warm:
            out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)


def row(path: str, size: str, nbytes: int, seconds: float, ceiling: float | None, ceiling_name: str) -> None:
    g = gbps(nbytes, seconds)
    r = {"path": path, "size": size, "GBps": round(g, 2),
         "ratio": round(g / ceiling, 3) if ceiling else None, "vs": ceiling_name}
    rows.append(r)
    print(f"{path:58s} {size:>18s} {g:9.2f} GB/s  " + (f"{r['ratio']:.3f} of {ceiling_name}" if ceiling else ""),
          flush=True)


def ceilings(host_region: Region) -> dict[str, float]:
    h = torch.empty(BATCH, dtype=torch.uint8).pin_memory()
    h.random_(0, 256)
    d = torch.empty(BATCH, dtype=torch.uint8, device="cuda").random_(0, 256)
    d2 = torch.empty_like(d)
    c = {}
    c["H2D"] = gbps(BATCH, time_stream(lambda: d.copy_(h, non_blocking=True)))
    c["D2H"] = gbps(BATCH, time_stream(lambda: h.copy_(d, non_blocking=True)))
    c["D2D"] = gbps(BATCH, time_stream(lambda: d2.copy_(d)))   # payload, not read+write
    st = torch.cuda.current_stream().cuda_stream
    memcpy = cp.cuda.runtime.memcpyAsync
    c["H2D shm"] = gbps(BATCH, time_stream(lambda: memcpy(d.data_ptr(), host_region.ptr, BATCH, 4, st)))
    c["D2H shm"] = gbps(BATCH, time_stream(lambda: memcpy(host_region.ptr, d.data_ptr(), BATCH, 4, st)))
    for k in ("H2D", "D2H", "D2D", "H2D shm", "D2H shm"):
        row(f"ceiling: cudaMemcpy {k}" + (" pinned" if "shm" not in k and k != "D2D" else ""),
            "256 MiB", BATCH, BATCH / c[k] / 1e9, None, "")
    return c


def slots_for(nblocks: int, block_bytes: int, region_bytes: int, rng: random.Random) -> list[int]:
    return [i * block_bytes for i in rng.sample(range(region_bytes // block_bytes), nblocks)]


def bench_layout(name: str, layout: PagedLayout, ids: list[int], host: Region, pool: HbmPool,
                 ceil: dict[str, float], rng: random.Random) -> None:
    nblocks = len(ids) // layout.group
    nbytes = nblocks * layout.block_bytes
    offs = slots_for(nblocks, layout.block_bytes, host.nbytes, rng)
    size = f"{nblocks}x{layout.block_bytes // 1024} KiB"
    variants = [("direct", 2), ("direct", 4), ("direct", 8), ("staged", 4)]
    for mode, bps in variants:
        paged.BLOCKS_PER_SM = bps
        cop = PagedCopier(layout, backend="cuda", mode=mode)
        tag = f"{mode}" + (f", {bps} CTA/SM" if mode == "direct" else "")
        row(f"{name} gather -> host slots ({tag})", size, nbytes,
            time_stream(lambda cop=cop: cop.gather(ids, host, offs)), ceil["D2H"], "D2H pinned")
        row(f"{name} scatter <- host slots ({tag})", size, nbytes,
            time_stream(lambda cop=cop: cop.scatter(host, offs, ids)), ceil["H2D"], "H2D pinned")
    pr = pool.region()
    poffs = slots_for(nblocks, layout.block_bytes, pool.nbytes, rng)
    for bps in (4, 16):
        paged.BLOCKS_PER_SM = bps
        cop = PagedCopier(layout, backend="cuda")
        row(f"{name} gather -> HBM pool slots ({bps} CTA/SM)", size, nbytes,
            time_stream(lambda cop=cop: cop.gather(ids, pr, poffs)), ceil["D2D"], "D2D")
        row(f"{name} scatter <- HBM pool slots ({bps} CTA/SM)", size, nbytes,
            time_stream(lambda cop=cop: cop.scatter(pr, poffs, ids)), ceil["D2D"], "D2D")
    paged.BLOCKS_PER_SM = 4
    cop = PagedCopier(layout, backend="cuda")
    # spot check: the last gather into the host region holds the right bytes
    cop.gather(ids, host, offs).synchronize()
    p0 = layout.planes[0]
    ref = p0.tensor.select(p0.page_dim, ids[0]).contiguous().view(torch.uint8).reshape(-1)
    got = host.tensor[offs[0]: offs[0] + ref.numel()]
    assert torch.equal(got, ref.cpu()), f"{name}: gathered bytes differ"


def per_page_baseline(layout: PagedLayout, ids: list[int], host: Region, ceil: dict[str, float],
                      rng: random.Random) -> None:
    """One cudaMemcpyAsync per 16 KiB page: the pattern kvtierd replaces."""
    nblocks = len(ids) // layout.group
    offs = slots_for(nblocks, layout.block_bytes, host.nbytes, rng)
    s = torch.cuda.current_stream().cuda_stream
    copies = []
    for b in range(nblocks):
        for pl, poff in zip(layout.planes, layout.plane_offsets, strict=True):
            for j in range(layout.group):
                src = pl.tensor.data_ptr() + ids[b * layout.group + j] * pl.page_stride
                copies.append((host.ptr + offs[b] + poff + j * pl.page_bytes, src, pl.page_bytes))

    def run():
        for dst, src, n in copies:
            cp.cuda.runtime.memcpyAsync(dst, src, n, 4, s)

    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    nbytes = sum(n for _, _, n in copies)
    row(f"baseline: one cudaMemcpyAsync per page ({len(copies)} copies)", "16 KiB pages", nbytes,
        statistics.median(times), ceil["D2H"], "D2H pinned")


def bench_pool(pool: HbmPool, ceil: dict[str, float], rng: random.Random) -> None:
    for block, label in ((2 * MiB, "2 MiB"), (256 << 10, "256 KiB"), (16 << 10, "16 KiB")):
        n = BATCH // block
        hb = slots_for(n, block, pool.nbytes, rng)
        hs = slots_for(n, block, pool.host_nbytes, rng)
        pairs = np.array(list(zip(hb, hs, [block] * n, strict=True)), dtype=np.int64)
        for engine in ("memcpy", "kernel"):
            pool.engine = engine

            async def timed(fn, pairs=pairs):
                await fn(pairs)
                out = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    await fn(pairs)
                    out.append(time.perf_counter() - t0)
                return statistics.median(out)

            row(f"HbmPool.to_host demotion ({engine})", f"{n}x{label}", BATCH,
                asyncio.run(timed(pool.to_host)), ceil["D2H"], "D2H pinned")
            row(f"HbmPool.from_host promotion ({engine})", f"{n}x{label}", BATCH,
                asyncio.run(timed(pool.from_host)), ceil["H2D"], "H2D pinned")
    pool.engine = "auto"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="directory for gpu_bench.json")
    args = ap.parse_args()
    torch.cuda.init()
    rng = random.Random(42)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cupy {cp.__version__}", flush=True)

    path = f"/dev/shm/kvtierd-bench-{os.getpid()}"
    fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
    os.ftruncate(fd, HOST)
    mm = mmap.mmap(fd, HOST)
    os.close(fd)
    os.unlink(path)
    mm.write(os.urandom(1 << 20) * (HOST >> 20))   # fault every page in, non-zero data
    t0 = time.perf_counter()
    pin = pinning.pin_buffer(mm)
    print(f"cudaHostRegister of {HOST >> 20} MiB /dev/shm mapping (256 MiB chunks): "
          f"{(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)
    host = Region.from_buffer(mm, pinned=pin)

    ceil = ceilings(host)
    pool = HbmPool(HOST, 0, 16 * MiB, host_base=host.ptr, host_nbytes=HOST)
    cp.cuda.runtime.memset(pool.ptr, 0x5A, HOST)

    # 2 MiB contiguous blocks: one plane of 1024 pages of 2 MiB
    big = torch.empty((1024, 2 * MiB), dtype=torch.uint8, device="cuda").random_(0, 256)
    lay_big = PagedLayout([(big, 0)], 1)
    bench_layout("2 MiB blocks", lay_big, rng.sample(range(1024), BATCH // (2 * MiB)), host, pool, ceil, rng)
    del big, lay_big

    # scattered 16 KiB pages, 32 layers x (K, V), 2 pages per block
    kv = [(torch.empty((4096, 16, 8, 64), dtype=torch.float16, device="cuda").view(torch.int16).random_()
           .view(torch.float16),
           torch.empty((4096, 16, 8, 64), dtype=torch.float16, device="cuda").view(torch.int16).random_()
           .view(torch.float16)) for _ in range(32)]
    lay = PagedLayout.from_layers(kv, pages_per_block=2)
    ids = rng.sample(range(4096), BATCH // lay.block_bytes * 2)
    bench_layout("16 KiB pages x64 planes", lay, ids, host, pool, ceil, rng)
    per_page_baseline(lay, ids, host, ceil, rng)
    del kv, lay
    torch.cuda.empty_cache()

    bench_pool(pool, ceil, rng)
    print(json.dumps(pool.stats()), flush=True)
    pool.close()
    del host
    pin.close()

    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "gpu_bench.json").write_text(json.dumps({"ceilings": ceil, "rows": rows}, indent=1))
    print("\n| path | size | GB/s | ratio | vs |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['size']} | {r['GBps']:.1f} | "
              f"{'' if r['ratio'] is None else format(r['ratio'], '.2f')} | {r['vs']} |")


if __name__ == "__main__":
    main()
