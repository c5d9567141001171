"""kvtierd vs Redis on one machine: put then get of many blocks, 1 and 8 client processes.

Starts both servers itself, in the same run: redis-server on a free loopback
port (no persistence, as a cache is run) and a kvtierd daemon with a host tier
only. Each client process writes its share of the blocks in batches (one
Redis pipeline of SETs, or one kvtierd request, per batch), then reads them
all back the same way; a batch is one timed operation.

kvtierd is measured three ways:
  shm     reserve -> copy into the slot views -> commit; acquire -> copy out of
          the views into the client's own buffers -> release (the zero-copy API
          used as a user would: bytes end up in memory the client owns)
  many    put_many / get_many: the convenience calls (shared memory inside,
          get returns fresh bytes objects)
  buffers put_many / get_buffers: get returns memoryviews into one fresh buffer
          per call (huge pages where the kernel allows) instead of bytes
  inline  put_inline / get_inline: bytes inside the protocol frames, for
          clients that cannot map the region
Redis is redis-py with pipelines (transaction=False), GET returning bytes.

Each client process runs --warmup unmeasured rounds (put, get, delete)
before the measured one; with --warmup 0 the measured round is the first
thing a fresh process does (a cold client: nothing of the shared region is
in its page table, its heap has never grown). A first touch of a page of
the region would cost a minor page fault (~1-2 µs per 4 KiB here); the
client maps the slots of each reservation or lease in bulk before copying
(kvtierd.regions.ClientRegion.prefault: 16 faults per MiB, counted in
`faults/MiB`, instead of 256). Fresh `bytes` from get_many fault on every
page of new heap memory (256 per MiB).
`/memcpy` is the fraction of a one-thread memcpy of the same bytes (one
source block into distinct warm destinations, as the put workers copy),
measured in the same run. Ratios kvtierd/Redis come last.

`--huge-pages` gives the daemon host.huge_pages = on (reserve 1.25 x total + 64 MiB of huge
pages first, e.g. `echo 256 > /proc/sys/vm/nr_hugepages` for the defaults); `--huge-pages thp`
gives host.huge_pages = thp (needs shmem_enabled = advise).

    python bench/vs_redis.py [--sizes 256KiB,1MiB,4MiB] [--clients 1,8] [--total 256MiB] [--batch 8]
                             [--warmup 1] [--systems redis,kvtierd-shm,...] [--huge-pages [on|thp]]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _daemon import prime_host_tier, start_kvtierd  # noqa: E402

from kvtierd import Client  # noqa: E402
from kvtierd.config import format_size, parse_size  # noqa: E402

REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
SYSTEMS = ("redis", "kvtierd-shm", "kvtierd-many", "kvtierd-buffers", "kvtierd-inline")


# ------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(port: int, tmp: Path) -> subprocess.Popen:
    p = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--protected-mode", "no", "--dir", str(tmp), "--maxmemory", "0",
                          "--proto-max-bulk-len", "64mb", "--client-query-buffer-limit", "1gb"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis
    r = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(200):
        try:
            r.ping()
            return p
        except redis.ConnectionError:
            time.sleep(0.05)
    p.kill()
    raise RuntimeError("redis-server did not start")


# ------------------------------------------------------------------- workers

def _batches(keys: list[bytes], batch: int) -> list[list[bytes]]:
    return [keys[i:i + batch] for i in range(0, len(keys), batch)]


def worker(system: str, target: str, size: int, rounds: list[list[bytes]], batch: int, barrier, out_q) -> None:
    """One long-lived client process: per round, put all its keys, then get them all, then drop them.

    Only the last round is reported: the earlier ones warm the process up as a
    real inference worker is warm (its mapping of the shared region faulted in,
    Redis' allocator and socket buffers grown).
    """
    block = np.random.default_rng(os.getpid()).integers(0, 256, size, dtype=np.uint8).tobytes()
    # The client's own buffers for shm gets, as views: a bytearray's slice assignment from anything
    # but a bytearray copies twice (into a new bytearray first).
    sinks = [memoryview(bytearray(size)) for _ in range(batch)]
    if system == "redis":
        import redis
        r = redis.Redis(host="127.0.0.1", port=int(target))

        def put(ks):
            p = r.pipeline(transaction=False)
            for k in ks:
                p.set(k, block)
            p.execute()

        def get(ks):
            p = r.pipeline(transaction=False)
            for k in ks:
                p.get(k)
            vals = p.execute()
            assert all(v is not None and len(v) == size for v in vals)

        def drop(ks):
            r.delete(*ks)
    else:
        c = Client(target)
        ns = c.namespace(f"bench/vs_redis/{size}", block_size=size)
        blocks = [block] * batch

        def drop(ks):
            ns.delete(ks)
        if system == "kvtierd-shm":
            def put(ks):
                with ns.reserve(ks) as res:
                    for v in res.views:
                        v[:] = block

            def get(ks):
                with ns.acquire(ks) as lease:
                    assert lease.count == len(ks)
                    for v, sink in zip(lease.views, sinks):
                        sink[:] = v
        elif system in ("kvtierd-many", "kvtierd-buffers"):
            def put(ks):
                ns.put_many(ks, blocks[:len(ks)])

            read = ns.get_many if system == "kvtierd-many" else ns.get_buffers

            def get(ks):
                vals = read(ks)
                assert all(v is not None for v in vals)
        else:
            def put(ks):
                ns.put_inline(ks, blocks[:len(ks)])

            def get(ks):
                vals = ns.get_inline(ks)
                assert all(v is not None for v in vals)
    result = {}
    for keys in rounds:
        groups = _batches(keys, batch)
        for phase, fn in (("put", put), ("get", get)):
            barrier.wait()
            lats = []
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for ks in groups:
                s = time.perf_counter()
                fn(ks)
                lats.append(time.perf_counter() - s)
            result[phase] = (t0, time.perf_counter(), lats,
                             resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        for ks in _batches(keys, 1024):
            drop(ks)
    out_q.put(result)
    if system != "redis":
        c.close()


def case_keys(tag: str, size: int, clients: int, total: int, batch: int, rounds: int) -> list[list[list[bytes]]]:
    """Per client, per round, its keys (fresh keys every round)."""
    per_client = max(batch, total // size // clients)
    return [[[f"{tag}:{w}:{r}:{i}".encode() for i in range(per_client)] for r in range(rounds)]
            for w in range(clients)]


def run_case(system: str, target: str, size: int, keysets: list[list[list[bytes]]], batch: int) -> dict:
    clients, per_client = len(keysets), len(keysets[0][0])
    # Spawned, not forked: each client process starts as a fresh interpreter, its heap untouched by
    # this one's (forked workers inherited a heap kvtierd's client had set up, Redis's workers too).
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(clients)
    q = ctx.Queue()
    procs = []
    for rounds in keysets:
        p = ctx.Process(target=worker, args=(system, target, size, rounds, batch, barrier, q))
        p.start()
        procs.append(p)
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{system} worker failed with exit code {p.exitcode}")
    out = {}
    nbytes = per_client * clients * size
    for phase in ("put", "get"):
        t0 = min(r[phase][0] for r in results)
        t1 = max(r[phase][1] for r in results)
        lats = sorted(x for r in results for x in r[phase][2])
        out[phase] = {"gbps": nbytes / (t1 - t0) / 1e9, "ops": len(lats) / (t1 - t0), "s": t1 - t0,
                      "faults_per_mib": sum(r[phase][3] for r in results) / (nbytes / (1 << 20)),
                      "p50": lats[len(lats) // 2], "p99": lats[min(len(lats) - 1, int(len(lats) * 0.99))]}
    return out


def memcpy_gbps(size: int, total: int, rounds: int = 3) -> float:
    """One thread copying one block to `total` bytes of distinct warm destinations, as the put
    workers do (same memoryview slice assignment): the memcpy a client cannot beat."""
    n = max(1, min(total, 256 << 20) // size)
    src = memoryview(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())
    dst = memoryview(bytearray(n * size))
    best = float("inf")
    for _ in range(rounds + 1):     # the first round faults the destination in
        t = time.perf_counter()
        for i in range(0, n * size, size):
            dst[i:i + size] = src
        best = min(best, time.perf_counter() - t)
    return n * size / best / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256KiB,1MiB,4MiB")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--total", default="256MiB", help="bytes written (and read) per case")
    ap.add_argument("--batch", type=int, default=8, help="blocks per request / pipeline")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--warmup", type=int, default=1,
                    help="unmeasured rounds per client process before the measured one")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a kvtierd config override for the daemon (repeatable), e.g. server.frame_cache_bytes=512MiB")
    ap.add_argument("--huge-pages", nargs="?", const="on", choices=("on", "thp"), default=None,
                    help="the host region in huge pages: host.huge_pages=on (hugetlb, the default) or thp")
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    clients = [int(c) for c in a.clients.split(",")]
    systems = [s for s in a.systems.split(",") if s]
    total = parse_size(a.total)
    bad = set(systems) - set(SYSTEMS)
    if bad:
        ap.error(f"unknown systems {sorted(bad)} (known: {', '.join(SYSTEMS)})")
    host_bytes = int(total * 1.25) + (64 << 20)   # one case at a time: each deletes its blocks after

    print(f"# {platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# {format_size(total)} per case, batch {a.batch} blocks per op, {a.warmup} warm-up round(s)"
          f"{' (cold client processes)' if not a.warmup else ''}, kvtierd host tier {format_size(host_bytes)}"
          f"{dict(on=' in hugetlb pages', thp=' in transparent huge pages').get(a.huge_pages, '')}, "
          f"{''.join(f', --set {kv}' for kv in a.set)}, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows, res = [], {}
    with tempfile.TemporaryDirectory(prefix="kvtierd-vs-redis-") as td:
        tmp = Path(td)
        port = free_port()
        redis_p = start_redis(port, tmp)
        sets = [*a.set, *([f"host.huge_pages={a.huge_pages}"] if a.huge_pages else [])]
        kv_p, sock = start_kvtierd(tmp, host_bytes, *(arg for kv in sets for arg in ("--set", kv)))
        try:
            prime_host_tier(sock, host_bytes)
            for size in sizes:
                ceiling = memcpy_gbps(size, total)
                print(f"# memcpy ceiling, {format_size(size)} blocks: {ceiling:.2f} GB/s")
                for n in clients:
                    for system in systems:
                        target = str(port) if system == "redis" else sock
                        keysets = case_keys(f"{system}:{size}:{n}", size, n, total, a.batch, a.warmup + 1)
                        r = run_case(system, target, size, keysets, a.batch)
                        res[(size, n, system)] = r
                        for phase in ("put", "get"):
                            x = r[phase]
                            rows.append((format_size(size), n, system, phase, x["ops"], x["gbps"],
                                         x["p50"] * 1e3, x["p99"] * 1e3, x["gbps"] / ceiling,
                                         x["faults_per_mib"]))
        finally:
            kv_p.terminate()
            redis_p.terminate()
            kv_p.wait(30)
            redis_p.wait(30)

    print(f"\n{'size':>9} {'clients':>7} {'system':<15} {'op':<4} {'ops/s':>9} {'GB/s':>7} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'/memcpy':>8} {'faults/MiB':>10}")
    for size_s, n, system, phase, ops, gbps, p50, p99, frac, faults in rows:
        print(f"{size_s:>9} {n:>7} {system:<15} {phase:<4} {ops:>9.1f} {gbps:>7.2f} {p50:>8.2f} {p99:>8.2f} "
              f"{frac:>8.2f} {faults:>10.0f}")
    if "redis" in systems:
        print("\nthroughput ratio kvtierd / Redis (put, get):")
        for size in sizes:
            for n in clients:
                base = res[(size, n, "redis")]
                parts = []
                for system in systems:
                    if system == "redis":
                        continue
                    r = res[(size, n, system)]
                    parts.append(f"{system.removeprefix('kvtierd-')} {r['put']['gbps'] / base['put']['gbps']:.1f}x/"
                                 f"{r['get']['gbps'] / base['get']['gbps']:.1f}x")
                print(f"  {format_size(size):>9} x{n}: " + ", ".join(parts))
        # the headline: bytes moved (put + get) per second, each kvtierd path vs Redis
        for system in systems:
            if system == "redis":
                continue
            for size in sizes:
                for n in clients:
                    kv = sum(res[(size, n, system)][ph]["s"] for ph in ("put", "get"))
                    rd = sum(res[(size, n, "redis")][ph]["s"] for ph in ("put", "get"))
                    print(f"ratio {system}/Redis put+get {format_size(size)} x{n}: {rd / kv:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
