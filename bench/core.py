"""Put/get throughput of 1 MiB blocks through the daemon: shared memory (every read
and write path the client has) vs inline (bytes in the frames).

Starts its own daemon (host tier only). The ceiling is a plain memcpy of the same
bytes from private memory, into the kind of destination the row writes: a batch of
reused buffers for get_into and a lease's copy-out ("reused"), one buffer as big as
all the data for the rows that write memory that is not in cache (puts into the
region, fresh copies: "one"). The machine it was written for is shared with other
work, so the ceiling is measured again right before every timed round and each
row's ratio is the median of its per-round ratios: a load that comes and goes
moves both.

Warm rows reuse one client whose mapping of the host region is faulted in; cold rows
open a new client for every round (a new mapping: the first touch of each of its
pages would fault), as a worker that just started does. The prefault-off rows turn
the client's bulk mapping (kvtierd.regions.ClientRegion.prefault) off, to show
what it is worth in the same run.

`--huge-pages` gives the daemon host.huge_pages = on (the host region from the hugetlb
pool: reserve (3 x blocks x block + 64 MiB) of huge pages first, e.g. `echo 512 >
/proc/sys/vm/nr_hugepages` for the defaults): a cold client then maps one huge page
per fault instead of 16 pages per MiB. `--huge-pages thp` gives host.huge_pages = thp
(transparent huge pages: needs /sys/kernel/mm/transparent_hugepage/shmem_enabled =
advise, or always / within_size).

    python bench/core.py [--block 1MiB] [--blocks 256] [--batch 32] [--rounds 5] [--paths shm,inline]
                         [--huge-pages [on|thp]]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _daemon import prime_host_tier, start_kvtierd

from kvtierd import Client
from kvtierd.config import format_size, parse_size


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(nbytes: int, fn, rounds: int, ceiling, setup=None) -> tuple[float, float, float]:
    """(GB/s of the median round, median ratio to the ceiling timed just before each round,
    minor page faults per MiB in the median round); `setup` runs untimed before each round."""
    times, ratios, flts = [], [], []
    for _ in range(rounds):
        if setup is not None:
            setup()
        c = timed(ceiling)
        f0 = faults()
        t = timed(fn)
        flts.append((faults() - f0) / (nbytes / (1 << 20)))
        times.append(t)
        ratios.append(c / t)
    i = sorted(range(rounds), key=times.__getitem__)[rounds // 2]
    return nbytes / times[i] / 1e9, statistics.median(ratios), flts[i]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--block", default="1MiB")
    ap.add_argument("--blocks", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--paths", default="shm,inline")
    ap.add_argument("--huge-pages", nargs="?", const="on", choices=("on", "thp"), default=None,
                    help="the host region in huge pages: host.huge_pages=on (hugetlb, the default) or thp")
    a = ap.parse_args()
    bs = parse_size(a.block)
    total = bs * a.blocks
    paths = a.paths.split(",")
    data = [np.random.default_rng(i).integers(0, 256, bs, dtype=np.uint8).tobytes() for i in range(a.blocks)]
    batches = [(s, min(s + a.batch, a.blocks)) for s in range(0, a.blocks, a.batch)]

    # Ceilings: the same bytes copied once, from private memory, into memory already touched.
    dst = bytearray(total)
    dv = memoryview(dst)
    # Memoryviews: `bytearray[:] = x` of anything but a bytearray copies x into a new bytearray first
    # (CPython's bytearray_ass_subscript), two copies where a view's assignment makes one.
    sinks = [memoryview(bytearray(bs)) for _ in range(a.batch)]

    def memcpy_one_buffer():
        for i, b in enumerate(data):
            dv[i * bs:(i + 1) * bs] = b

    def memcpy_reused():
        for s, e in batches:
            for sink, b in zip(sinks, data[s:e]):
                sink[:] = b
    memcpy_reused()          # touch the destinations once
    memcpy_one_buffer()
    ceilings = {"memcpy into one preallocated buffer": measure(total, memcpy_one_buffer, a.rounds, memcpy_one_buffer),
                "memcpy into a batch of reused buffers": measure(total, memcpy_reused, a.rounds, memcpy_reused)}
    against = {"one": memcpy_one_buffer, "reused": memcpy_reused}

    rows = []
    with tempfile.TemporaryDirectory(prefix="kvtierd-bench-") as tmp:
        extra = ("--set", f"host.huge_pages={a.huge_pages}") if a.huge_pages else ()
        proc, sock = start_kvtierd(Path(tmp), total * 3 + (64 << 20), *extra)
        try:
            prime_host_tier(sock, total * 3 + (64 << 20))
            with Client(sock) as c:
                state = {}

                def fresh_client(prefault: bool):
                    def setup():
                        if "c" in state:
                            state["c"].close()
                        state["c"] = Client(sock)
                        state["ns"] = state["c"].namespace("bench-shm", block_size=bs)
                        if not prefault:
                            state["ns"].region.prefault_enabled = False
                    return setup

                if "shm" in paths:
                    ns = c.namespace("bench-shm", block_size=bs)
                    keys = [b"get-%d" % i for i in range(a.blocks)]
                    ns.put_many(keys, data)
                    gen = [0]

                    def put_many(target=None):
                        target = target or ns
                        gen[0] += 1
                        ks = [b"%d-%d" % (gen[0], i) for i in range(a.blocks)]
                        for s, e in batches:
                            assert target.put_many(ks[s:e], data[s:e]) == e - s
                        target.delete(ks)

                    def copy_out(target=None):
                        target = target or ns
                        for s, e in batches:
                            with target.acquire(keys[s:e]) as lease:
                                assert lease.count == e - s
                                for sink, v in zip(sinks, lease.views):
                                    sink[:] = v

                    def get_into(target=None):
                        target = target or ns
                        for s, e in batches:
                            assert all(target.get_into(keys[s:e], sinks[:e - s]))

                    def get_many(target=None):
                        target = target or ns
                        for s, e in batches:
                            assert target.get_many(keys[s:e])[0] is not None

                    def get_buffers(target=None):
                        target = target or ns
                        for s, e in batches:
                            assert target.get_buffers(keys[s:e])[0] is not None

                    ops = (("put_many", put_many, "one"), ("acquire + copy-out", copy_out, "reused"),
                           ("get_into", get_into, "reused"), ("get_many", get_many, "one"),
                           ("get_buffers", get_buffers, "one"))
                    for name, fn, vs in ops:
                        rows.append(("shm, warm client", name, vs, *measure(total, fn, a.rounds, against[vs])))
                    for prefault in (True, False):
                        label = "shm, cold client" + ("" if prefault else ", prefault off")
                        for name, fn, vs in ops:
                            if name in ("get_into", "get_buffers") and not prefault:
                                continue
                            rows.append((label, name, vs, *measure(total, lambda: fn(state["ns"]), a.rounds,
                                                                   against[vs], fresh_client(prefault))))
                    state.pop("c").close()
                if "inline" in paths:
                    ns = c.namespace("bench-inline", block_size=bs)
                    keys = [b"get-%d" % i for i in range(a.blocks)]
                    ns.put_many(keys, data)
                    gen = [0]

                    def put_inline():
                        gen[0] += 1
                        ks = [b"%d-%d" % (gen[0], i) for i in range(a.blocks)]
                        for s, e in batches:
                            assert ns.put_inline(ks[s:e], data[s:e]) == e - s
                        ns.delete(ks)

                    def get_inline():
                        for s, e in batches:
                            assert ns.get_inline(keys[s:e])[0] is not None
                    rows.append(("inline", "put_inline", "one", *measure(total, put_inline, a.rounds,
                                                                         memcpy_one_buffer)))
                    rows.append(("inline", "get_inline", "one", *measure(total, get_inline, a.rounds,
                                                                         memcpy_one_buffer)))
        finally:
            proc.terminate()
            proc.wait(30)

    load = os.getloadavg()
    print(f"\nkvtierd put/get, {format_size(bs)} blocks, {a.blocks} blocks per round, batches of {a.batch}, "
          f"median of {a.rounds} rounds, {os.cpu_count()} cores, load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"host region in {dict(on='hugetlb', thp='transparent huge').get(a.huge_pages, '4 KiB')} pages")
    print(f"{'path':<32} {'op':<20} {'GB/s':>7} {'/memcpy':>8} {'vs':>7} {'faults/MiB':>11}")
    for name, (rate, ratio, _flt) in ceilings.items():
        print(f"{name:<53} {rate:>7.2f} {ratio:>8.2f}")
    for path, op, vs, rate, ratio, flt in rows:
        print(f"{path:<32} {op:<20} {rate:>7.2f} {ratio:>8.2f} {vs:>7} {flt:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
