"""Control-path latency: lookup of a 64-key chain, acquire + release of one block; 1 and 8 clients.

Starts its own daemon (host tier only), stores one 64-block chain per client,
then each client process times, one at a time:
  lookup    ns.lookup(64 keys), all present (the daemon walks the whole chain)
  acquire   `with ns.acquire([key]) as lease:` touch the view, release (two round trips)
p50 / p99 / p99.9 per operation and total ops/s across clients.

The ceiling is measured in the same run: a round trip of the same-sized
msgpack frame to a trivial Unix-socket echo server in another process, with
the client busy-polling for the reply as kvtierd's client does (what any
request/reply over this socket costs before the daemon does any work).

    python bench/latency.py [--ops 20000] [--clients 1,8] [--block 64KiB]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _daemon import start_kvtierd  # noqa: E402

from kvtierd import Client  # noqa: E402
from kvtierd.config import format_size, parse_size  # noqa: E402
from kvtierd.keys import chunk_keys, namespace_seed  # noqa: E402

CHAIN = 64
_HDR = struct.Struct("<I")


# ------------------------------------------------------------- the ceiling

def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def echo_server(path: str, ready) -> None:
    """Answers every length-prefixed frame with itself, one thread per connection."""
    import threading
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(64)
    ready.set()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    (n,) = _HDR.unpack(_recv_exact(conn, 4))
                    conn.sendall(_HDR.pack(n) + _recv_exact(conn, n))
            except (ConnectionError, OSError):
                pass
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# ----------------------------------------------------------------- clients

def _recv_spin(s: socket.socket, n: int, spin_s: float) -> bytes:
    """recv that busy-polls for up to spin_s first, as kvtierd's client does, then blocks."""
    buf = bytearray()
    until = time.perf_counter() + spin_s
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf), socket.MSG_DONTWAIT if time.perf_counter() < until else 0)
        except BlockingIOError:
            continue
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def client_proc(kind: str, target: str, block: int, ops: int, barrier, out_q, wid: int,
                spin_us: float | None) -> None:
    if kind == "echo":
        s = socket.socket(socket.AF_UNIX)
        s.connect(target)
        frame = msgpack.packb([1, 7, {"ns": 1, "keys": [b"k" * 32] * CHAIN}])
        msg = _HDR.pack(len(frame)) + frame
        spin_s = (200.0 if spin_us is None else spin_us) / 1e6

        def op():
            s.sendall(msg)
            (n,) = _HDR.unpack(_recv_spin(s, 4, spin_s))
            msgpack.unpackb(_recv_spin(s, n, spin_s))
    else:
        c = Client(target) if spin_us is None else Client(target, spin_us=spin_us)
        ns = c.namespace("bench/latency", block_size=block)
        seed = namespace_seed(model="bench/latency", dtype="u8", layout="raw", chunk_tokens=16,
                              tenant_salt=f"client{wid}")
        keys = chunk_keys(list(range(CHAIN * 16)), seed=seed, chunk_tokens=16)
        if kind == "lookup":
            ns.put_many(keys, [bytes(block)] * CHAIN)

            def op():
                if ns.lookup(keys) != CHAIN:
                    raise RuntimeError("chain not fully present")
        else:
            one = keys[:1]
            ns.put_many(one, [bytes(block)])

            def op():
                with ns.acquire(one) as lease:
                    if lease.count != 1 or lease.views[0][0] != 0:
                        raise RuntimeError("block not leased")
    for _ in range(min(200, ops)):       # warm-up: connection, allocator, page faults
        op()
    barrier.wait()
    lats = []
    t0 = time.perf_counter()
    for _ in range(ops):
        s0 = time.perf_counter()
        op()
        lats.append(time.perf_counter() - s0)
    out_q.put((t0, time.perf_counter(), lats))


def run(kind: str, target: str, block: int, clients: int, ops: int, spin_us: float | None) -> dict:
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(clients)
    q = ctx.Queue()
    procs = [ctx.Process(target=client_proc, args=(kind, target, block, ops // clients, barrier, q, w, spin_us))
             for w in range(clients)]
    for p in procs:
        p.start()
    results = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{kind} client failed with exit code {p.exitcode}")
    lats = sorted(x for r in results for x in r[2])
    t0, t1 = min(r[0] for r in results), max(r[1] for r in results)

    def pct(q: float) -> float:
        return lats[min(len(lats) - 1, int(len(lats) * q))] * 1e6
    return {"p50": pct(0.5), "p99": pct(0.99), "p999": pct(0.999), "ops": len(lats) / (t1 - t0), "n": len(lats)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", type=int, default=20000, help="operations per case, split among the clients")
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--block", default="64KiB", help="block size of the namespace")
    ap.add_argument("--spin-us", type=float, default=None,
                    help="client busy-poll before sleeping for a reply (default: the client's own)")
    a = ap.parse_args()
    block = parse_size(a.block)
    clients = [int(c) for c in a.clients.split(",")]
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# {a.ops} ops per case, {CHAIN}-key chain, {format_size(block)} blocks, "
          f"client spin {'default' if a.spin_us is None else f'{a.spin_us:g} µs'}")
    rows = []
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="kvtierd-latency-") as td:
        tmp = Path(td)
        echo_path = str(tmp / "echo.sock")
        ready = ctx.Event()
        echo = ctx.Process(target=echo_server, args=(echo_path, ready), daemon=True)
        echo.start()
        ready.wait(10)
        kv, sock = start_kvtierd(tmp, max(64 << 20, block * CHAIN * max(clients) * 2 + (32 << 20)))
        try:
            for n in clients:
                for kind, target in (("echo", echo_path), ("lookup", sock), ("acquire", sock)):
                    rows.append((kind, n, run(kind, target, block, n, a.ops, a.spin_us)))
        finally:
            kv.terminate()
            kv.wait(30)
            echo.terminate()
    print(f"\n{'operation':<26} {'clients':>7} {'p50 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9} {'ops/s':>9}")
    names = {"echo": "socket echo (ceiling)", "lookup": f"lookup {CHAIN}-key chain",
             "acquire": "acquire+release 1 block"}
    for kind, n, r in rows:
        print(f"{names[kind]:<26} {n:>7} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['p999']:>9.1f} {r['ops']:>9.0f}")
    print("\nkvtierd / socket echo ceiling (p50 latency ratio, ops/s ratio):")
    for n in clients:
        by = {k: r for k, c, r in rows if c == n}
        parts = [f"{kind} {by[kind]['p50'] / by['echo']['p50']:.1f}x / {by[kind]['ops'] / by['echo']['ops']:.2f}"
                 for kind in ("lookup", "acquire")]
        print(f"  x{n}: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
