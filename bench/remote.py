"""kvtierd's remote tier vs raw redis-py pipelines, to the same Redis Cluster in the same run.

Starts a 3-master, 3-replica redis-server cluster on loopback (or uses --url),
then for each block size moves --total bytes four ways, each a sequence of
pipelined rounds of at most remote.pipeline_bytes (16 MiB):

  raw put    redis-py asyncio RedisCluster pipelines of `SET key bytes PX ttl`
  tier put   RemoteTier.offer() of every block, timed until every done() came back
             (SET of each payload view, one EVAL per bucket setting its headers; the
             xxh3 in the header is passed in, as the daemon passes the checksum it
             took at commit)
  raw get    pipelines of GET, the reply bytes kept
  tier get   RemoteTier.fetch() into preallocated slot-sized buffers (an MGET of
             payloads and headers per bucket; headers checked, each payload copied
             into its buffer and the copy's xxh3 checked, while the next round is
             on the wire)

The raw rows are the ceiling: the same client library and round shape, no
header, no checksum, no copy into a destination. `raw get+copy` adds the one
copy into a buffer the consumer owns, which any reader of redis-py replies
pays. At 1 MiB the tier also runs with the other key layouts (one hash slot
per namespace, one per block: values.py); at 4 MiB two raw rows show what a
one-value format (header and payload in one string) would cost: SET of a
joined copy, or SET header + APPEND payload; and a tier row where the
caller gives no checksum, so the tier hashes each block as it sends it.
`raw get, tier's connection settings` is raw GET through a client whose
connections read 1 MiB at a time and keep their hiredis read buffers, as the
tier's do (connection.py): the tier's ratio to it says what the check and
the copy cost on equal connections.

After one warm-up round, each figure is the median of --reps measurements,
and each ratio the median of --reps paired ratios (a tier measurement over
the raw one taken just before it, so a machine shared with other work skews
both alike). `client CPU s/GB` is the benchmark process's CPU time per GB
moved, `cluster CPU s/GB` that of all six redis-server processes (INFO cpu):
on a loaded machine both are steadier than wall time. `faults/GB` counts the
benchmark process's minor page faults per GB moved (in thousands): fresh
pages the allocator hands out, one fault each.
Replicas receive every write, so put figures include replication load on the
same machine.

Lookup rows: present() of a 64-key chain, per key layout, milliseconds per
call (wall) and client CPU milliseconds per call (in the CPU s/GB column).

Time to first token (`--ttft`, on by default): a randomly initialised
Llama-shaped model on CPU (bench/ttft.py's 'tiny' shape), two daemons with
separate state sharing the cluster. Node A computes each prompt once (a miss:
full prefill and store; the commit policy writes the blocks to the cluster);
node B then answers the same prefix with a new suffix:

  full     model(prompt, logits_to_keep=1) without kvtierd: recompute
  remote   KVTierCache.forward on node B with the prefix only in the remote
           tier: lookup (one remote round), acquire (the daemon pulls the
           blocks into its host tier, verified), copy, suffix forward; before
           each sample node B deletes its local copies, so each is a remote hit
  host     the same prefix once node B holds it in its host tier

    python bench/remote.py [--sizes 256KiB,1MiB,4MiB] [--total 128MiB] [--reps 5] [--url redis://...]
                           [--ttft-lengths 1024,2048,4096] [--no-throughput] [--no-ttft]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import xxhash  # noqa: E402
from redis.asyncio import RedisCluster  # noqa: E402
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from kvtierd.config import format_size, load, parse_size  # noqa: E402
from kvtierd.remote import RemoteTier  # noqa: E402
from kvtierd.remote.connection import READ_SIZE, keep_read_buffers  # noqa: E402
from kvtierd.remote.values import BUCKETS  # noqa: E402

TTL_MS = 600_000


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


async def raw_client(url: str, tier_settings: bool = False) -> RedisCluster:
    """redis-py's defaults, or (tier_settings) the tier's read size and read buffers (connection.py)."""
    extra = {"socket_read_size": READ_SIZE} if tier_settings else {}
    rc = RedisCluster.from_url(url, retry=Retry(NoBackoff(), 0), socket_timeout=30, **extra)
    if tier_settings:
        keep_read_buffers(rc)
    await rc.initialize()
    return rc


def rounds(n: int, per_round: int):
    for i in range(0, n, per_round):
        yield range(i, min(n, i + per_round))


async def raw_put(rc, keys, blocks, per_round) -> float:
    t0 = time.perf_counter()
    for r in rounds(len(keys), per_round):
        pipe = rc.pipeline(transaction=False)
        for i in r:
            pipe.execute_command("SET", keys[i], blocks[i], "PX", TTL_MS)
        await pipe.execute()
    return time.perf_counter() - t0


async def raw_get(rc, keys, per_round, dests=None) -> float:
    t0 = time.perf_counter()
    for r in rounds(len(keys), per_round):
        pipe = rc.pipeline(transaction=False)
        for i in r:
            pipe.execute_command("GET", keys[i])
        values = await pipe.execute()
        if dests is not None:
            for i, v in zip(r, values):
                dests[i][:] = v
    return time.perf_counter() - t0


async def tier_put(tier: RemoteTier, ns, keys, blocks, sums=None) -> float:
    left = len(keys)
    finished = asyncio.Event()
    failures = 0

    def done(ok: bool) -> None:
        nonlocal left, failures
        left -= 1
        failures += not ok
        if left == 0:
            finished.set()

    t0 = time.perf_counter()
    for i, (k, b) in enumerate(zip(keys, blocks)):
        if not tier.offer(ns, k, memoryview(b), done, None if sums is None else sums[i]):
            raise RuntimeError("a write was dropped: raise remote.max_inflight_bytes")
    await finished.wait()
    dt = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{failures} writes failed")
    return dt


async def tier_get(tier: RemoteTier, ns, size, keys, dests) -> float:
    t0 = time.perf_counter()
    ok = await tier.fetch(ns, size, keys, dests)
    dt = time.perf_counter() - t0
    if not all(ok):
        raise RuntimeError(f"{ok.count(False)} blocks missed")
    return dt


async def server_cpu(rc) -> float:
    """CPU seconds every redis-server of the cluster (masters and replicas) has used so far."""
    info = await rc.info("cpu", target_nodes=RedisCluster.ALL_NODES)
    return sum(n["used_cpu_sys"] + n["used_cpu_user"] for n in info.values())


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


async def timed(coro, rc) -> tuple[float, float, float, int]:
    """(wall seconds, client CPU seconds, cluster CPU seconds, client minor faults) of one measurement."""
    s0 = await server_cpu(rc)
    f0 = minor_faults()
    c0 = time.process_time()
    wall = await coro
    c1 = time.process_time()
    f1 = minor_faults()
    return wall, c1 - c0, await server_cpu(rc) - s0, f1 - f0


async def raw_put_one_value(rc, keys, blocks, per_round, append: bool) -> float:
    """The one-value formats kvtierd does not use: SET header+payload joined, or SET header + APPEND payload."""
    head = bytes(72)
    t0 = time.perf_counter()
    for r in rounds(len(keys), per_round):
        pipe = rc.pipeline(transaction=False)
        for i in r:
            if append:
                pipe.execute_command("SET", keys[i], head, "PX", TTL_MS)
                pipe.execute_command("APPEND", keys[i], memoryview(blocks[i]))
            else:
                pipe.execute_command("SET", keys[i], head + memoryview(blocks[i]), "PX", TTL_MS)
        await pipe.execute()
    return time.perf_counter() - t0


async def measure(url: str, sizes: list[int], total: int, reps: int) -> list[tuple]:
    cfg = load(overrides={"remote.url": url, "remote.max_inflight_bytes": max(total, 1 << 20) * 2,
                          "remote.op_timeout_s": 30, "remote.ttl_s": TTL_MS / 1000,
                          "remote.lookup_budget_s": 5.0}).remote
    per_bytes = cfg.pipeline_bytes
    rc = await raw_client(url)
    rc_kept = await raw_client(url, tier_settings=True)
    rows = []
    tiers = {b: RemoteTier(cfg, buckets=b) for b in (BUCKETS, 1, 0)}
    for t in tiers.values():
        await t.start()
    try:
        for size in sizes:
            n = max(1, total // size)
            per_round = max(1, per_bytes // size)
            blocks = [os.urandom(size) for _ in range(n)]
            # The daemon offers blocks with the checksum it took at commit (host.checksums): not timed here.
            sums = [xxhash.xxh3_64_intdigest(b) for b in blocks]
            dests = [memoryview(bytearray(size)) for _ in range(n)]
            moved = n * size
            gb: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {}
            scpu: dict[str, list[float]] = {}
            flt: dict[str, list[float]] = {}
            ratios: dict[str, list[float]] = {}
            layouts = [BUCKETS, 1, 0] if size == 1 << 20 else [BUCKETS]
            for rep in range(reps + 1):            # rep 0 warms connections and server memory up
                def record(name: str, t: tuple[float, float, float, int]) -> float:
                    if rep:
                        gb.setdefault(name, []).append(gbps(moved, t[0]))
                        cpu.setdefault(name, []).append(t[1] / (moved / 1e9))
                        scpu.setdefault(name, []).append(t[2] / (moved / 1e9))
                        flt.setdefault(name, []).append(t[3] / (moved / 1e9) / 1e3)
                    return gbps(moved, t[0])
                raw_keys = [b"raw:%d:%d:%d" % (size, rep, i) for i in range(n)]
                keys = {lay: [os.urandom(32) for _ in range(n)] for lay in layouts}
                ns = {lay: f"bench/{size}/{rep}/{lay}" for lay in layouts}
                tags = {BUCKETS: "", 1: " [one slot per namespace]", 0: " [one slot per block]"}
                # Paired: each tier figure right after the raw figure it is compared with.
                raw_p = record("raw put", await timed(raw_put(rc, raw_keys, blocks, per_round), rc))
                for lay in layouts:
                    tag = tags[lay]
                    tp = record("tier put" + tag,
                                await timed(tier_put(tiers[lay], ns[lay], keys[lay], blocks, sums), rc))
                    if rep:
                        ratios.setdefault("put" + tag, []).append(tp / raw_p)
                if size == 4 << 20:
                    hashed = [os.urandom(32) for _ in range(n)]
                    record("tier put, no checksum given (the tier hashes)",
                           await timed(tier_put(tiers[BUCKETS], ns[BUCKETS], hashed, blocks), rc))
                    for append in (False, True):
                        alt = [b"alt:%d:%d:%d:%d" % (size, rep, append, i) for i in range(n)]
                        name = "raw put, one value: " + ("SET header + APPEND payload" if append
                                                         else "SET header+payload joined")
                        record(name, await timed(raw_put_one_value(rc, alt, blocks, per_round, append), rc))
                raw_g = record("raw get", await timed(raw_get(rc, raw_keys, per_round), rc))
                record("raw get+copy", await timed(raw_get(rc, raw_keys, per_round, dests), rc))
                kept_g = record("raw get, tier's connection settings",
                                await timed(raw_get(rc_kept, raw_keys, per_round), rc))
                for lay in layouts:
                    tag = tags[lay]
                    tg = record("tier get" + tag,
                                await timed(tier_get(tiers[lay], ns[lay], size, keys[lay], dests), rc))
                    if rep:
                        ratios.setdefault("get" + tag, []).append(tg / raw_g)
                        if lay == BUCKETS:
                            ratios.setdefault("get [raw with the tier's connection settings]", []).append(tg / kept_g)
                await rc.flushall(target_nodes=RedisCluster.PRIMARIES)
            for name, vals in gb.items():
                rows.append((format_size(size), name, statistics.median(vals), min(vals), max(vals),
                             statistics.median(cpu[name]), statistics.median(scpu[name]),
                             statistics.median(flt[name])))
            for name, vals in ratios.items():
                rows.append((format_size(size), f"ratio tier/raw {name}", statistics.median(vals), min(vals),
                             max(vals), None, None, None))
        rows.extend(await lookup_latency(tiers, reps))
    finally:
        for t in tiers.values():
            await t.close()
        await rc.aclose()
        await rc_kept.aclose()
    return rows


async def lookup_latency(tiers: dict, reps: int, chain: int = 64, calls: int = 200) -> list[tuple]:
    """present() of a 64-key chain that is all there, per key layout: wall ms and client CPU ms per call."""
    rows = []
    for b, tier in tiers.items():
        ns = f"bench/lookup/{b}"
        keys = [os.urandom(32) for _ in range(chain)]
        await tier_put(tier, ns, keys, [os.urandom(4096) for _ in keys])
        walls, cpus = [], []
        for rep in range(reps + 1):
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                if await tier.present(ns, 4096, keys) != chain:
                    raise RuntimeError("lookup missed (raise remote.lookup_budget_s?)")
            if rep:
                walls.append((time.perf_counter() - t0) / calls * 1e3)
                cpus.append((time.process_time() - c0) / calls * 1e3)
        name = {BUCKETS: f"{BUCKETS} slots per namespace (default)", 1: "one slot per namespace",
                0: "one slot per block"}[b]
        rows.append(("lookup", f"present(), 64-key chain, {name}: ms per call", statistics.median(walls),
                     min(walls), max(walls), statistics.median(cpus), None, None))
    return rows


def ttft(url: str, lengths: list[int], reps: int, suffix: int = 32) -> list[str]:
    """TTFT of a remote hit against recompute, transformers integration on CPU (see the module docstring)."""
    import statistics as st

    import torch
    from _daemon import Daemon
    from ttft import build_model, timed

    from kvtierd import Client
    from kvtierd.integrations.cost import CostModel
    from kvtierd.integrations.transformers import KVTierCache, model_geometry

    device = torch.device("cpu")
    model = build_model("tiny", device, torch.float32)
    geo = model_geometry(model, None)
    per_token = geo.block_bytes // geo.chunk_tokens
    host_bytes = int(sum(lengths) * per_token * 1.5) + (64 << 20)
    g = torch.Generator().manual_seed(1)
    prefixes = {n: torch.randint(0, model.config.vocab_size, (1, n), generator=g) for n in lengths}

    def prompt(n: int, rep: int):
        gen = torch.Generator().manual_seed(1000 * n + rep)
        return torch.cat([prefixes[n], torch.randint(0, model.config.vocab_size, (1, suffix), generator=gen)], 1)

    forced = CostModel(device="cpu", prefill_token_s=1.0, learn=False)   # always load: measure the path
    out = [f"# ttft: model 'tiny' {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params fp32, chunk "
           f"{geo.chunk_tokens} tokens = {format_size(geo.block_bytes)} blocks, suffix {suffix}, median of {reps}, "
           f"torch threads {torch.get_num_threads()}",
           "| prefix | KV | full ms | remote hit ms | speedup | host hit ms | speedup |",
           "|---|---|---|---|---|---|---|"]
    remote_args = ["--set", f"remote.url={url}", "--set", "remote.lookup_budget_s=1.0",
                   "--host-bytes", str(host_bytes), "--disk-bytes", "0"]
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="kvtierd-remote-ttft-") as td:
        full = {}
        for n in lengths:
            model(prompt(n, 99)[:, :256], logits_to_keep=1)
            full[n] = st.median(timed(device, lambda: model(prompt(n, r), logits_to_keep=1))[0] for r in range(reps))
        (Path(td) / "a").mkdir()
        (Path(td) / "b").mkdir()
        a = Daemon(Path(td) / "a", remote_args).start()
        b = Daemon(Path(td) / "b", remote_args).start()
        try:
            with Client(a.sock) as c, KVTierCache(c, model, cost=forced, model_id="bench/tiny") as kv:
                for n in lengths:
                    kv.forward(prompt(n, 0), logits_to_keep=1)        # a miss on node A: prefill and store
                deadline = time.monotonic() + 120
                while (r := c.stats()["remote"])["inflight_bytes"] or r["writes"] < sum(n // geo.chunk_tokens
                                                                                        for n in lengths):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"node A's blocks did not reach the cluster: {r}")
                    time.sleep(0.05)
            with Client(b.sock) as c, KVTierCache(c, model, cost=forced, model_id="bench/tiny") as kv:
                for n in lengths:
                    keys = kv.keys(prefixes[n])
                    remote, host = [], []
                    for rep in range(1, reps + 1):
                        kv.ns.delete(keys)                            # node B forgets: the next hit is remote
                        assert kv.ns.lookup_tiers(keys) == ["remote"] * len(keys)
                        dt, o = timed(device, lambda: kv.forward(prompt(n, rep), logits_to_keep=1))
                        assert o.n_cached_tokens == n, (o.n_cached_tokens, n)
                        remote.append(dt)
                        dt, o = timed(device, lambda: kv.forward(prompt(n, 50 + rep), logits_to_keep=1))
                        assert o.n_cached_tokens == n
                        host.append(dt)
                    rm, hm = st.median(remote), st.median(host)
                    out.append(f"| {n} | {format_size(n * per_token)} | {full[n] * 1e3:.0f} | {rm * 1e3:.0f} | "
                               f"{full[n] / rm:.1f}x | {hm * 1e3:.0f} | {full[n] / hm:.1f}x |")
        finally:
            a.stop()
            b.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="256KiB,1MiB,4MiB")
    ap.add_argument("--total", default="128MiB", help="bytes moved per measurement")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--url", default="", help="an existing cluster (default: start one on loopback)")
    ap.add_argument("--ttft-lengths", default="1024,2048,4096", help="prefix lengths in tokens for the TTFT part")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--no-ttft", action="store_true")
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    total = parse_size(a.total)
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    lengths = [int(x) for x in a.ttft_lengths.split(",")]

    def run(url: str) -> tuple[list, list[str]]:
        rows = [] if a.no_throughput else asyncio.run(measure(url, sizes, total, a.reps))
        return rows, [] if a.no_ttft else ttft(url, lengths, a.reps)

    if a.url:
        rows, ttft_rows = run(a.url)
    else:
        from redis_cluster import RedisClusterProcesses
        with tempfile.TemporaryDirectory() as tmp, RedisClusterProcesses(Path(tmp)) as cluster:
            rows, ttft_rows = run(cluster.url)
    if rows:
        print(f"| block | path | GB/s or ratio (median of {a.reps}) | min | max | client CPU s/GB | "
              f"cluster CPU s/GB | faults/GB (k) |")
        print("|---|---|---|---|---|---|---|---|")
        for size, name, med, lo, hi, cpu, scpu, flt in rows:
            extra = "| | |" if cpu is None else (f"| {cpu:.2f} | {'' if scpu is None else f'{scpu:.2f}'} | "
                                                 f"{'' if flt is None else f'{flt:.0f}'} |")
            print(f"| {size} | {name} | {med:.3f} | {lo:.3f} | {hi:.3f} {extra}")
    for line in ttft_rows:
        print(line)


if __name__ == "__main__":
    main()
