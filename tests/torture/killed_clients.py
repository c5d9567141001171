"""Torture (b): 1,000 clients SIGKILLed mid-lease, mid-reservation or mid-request; nothing leaks.

    python tests/torture/killed_clients.py [--clients 1000] [--wave 25]

Client processes are forked in waves. Each holds something when it is killed:
a lease on blocks (some read up from disk for it), a reservation whose slots it
has half written, both, or requests it sent without waiting for the replies (an
acquire of disk blocks and a reserve, so the daemon is mid-request when the peer
dies). After the last wave: no lease, reservation or connection is left, none
ended by a timeout (connection loss must end them), every host slot in use
belongs to a stored block (used_bytes = blocks x slot size), no half-written
reservation became visible, and every stored block is byte-exact.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import select
import signal
import socket
import struct
import sys
import time

import msgpack
from _common import daemon, verdict, wait_for

from kvtierd import Client
from kvtierd.protocol import PROTOCOL_VERSION, Op

BLOCK = 64 << 10
STORED = [b"stored-%d" % i for i in range(512)]   # 32 MiB: twice the host tier, so half are on disk
NS = "killed"
NS_ID = 0          # the namespace's id in this daemon, set before the first fork


def content(key: bytes) -> bytes:
    seed = hashlib.blake2b(key, digest_size=32).digest()
    return seed * (BLOCK // 32)


def child(sock_path: str, n: int, mode: int, ready_fd: int) -> None:
    """Takes something, says so on the pipe, then waits to be killed."""
    rng = random.Random(n)
    if mode == 3:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock_path)
        for rid, op, args in ((1, Op.HELLO, {"version": PROTOCOL_VERSION}),
                              (2, Op.OPEN, {"name": NS, "block_size": BLOCK}),
                              (3, Op.ACQUIRE, {"ns": NS_ID, "keys": rng.sample(STORED, 32), "prefix": False}),
                              (4, Op.RESERVE, {"ns": NS_ID, "keys": [b"never-%d-%d" % (n, i) for i in range(4)]})):
            body = msgpack.packb([rid, int(op), args], use_bin_type=True)
            s.sendall(struct.pack("<I", len(body)) + body)
    else:
        c = Client(sock_path)
        ns = c.namespace(NS, block_size=BLOCK)
        if mode in (0, 2):
            ns.acquire(rng.sample(STORED, 16), prefix=False)
        if mode in (1, 2):
            res = ns.reserve([b"never-%d-%d" % (n, i) for i in range(8)])
            for v in res.views[: len(res.views) // 2]:
                v[: BLOCK // 2] = b"\xee" * (BLOCK // 2)
    os.write(ready_fd, b"r")
    signal.pause()


def spawn(sock_path: str, n: int) -> tuple[int, int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            child(sock_path, n, n % 4, w)
        finally:
            os._exit(1)
    os.close(w)
    return pid, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--wave", type=int, default=25, help="clients alive at once")
    a = ap.parse_args()
    d = daemon(["--host-bytes", "16MiB", "--set", "host.slab_bytes=1MiB", "--disk-bytes", "128MiB",
                "--set", "disk.segment_bytes=16MiB"])
    problems: list[str] = []
    t0 = time.monotonic()
    killed = not_ready = 0
    read_up = 0
    try:
        with d.client() as c:
            ns = c.namespace(NS, block_size=BLOCK)
            for i in range(0, len(STORED), 32):
                ns.put_many(STORED[i:i + 32], [content(k) for k in STORED[i:i + 32]])
            slot_bytes = ns.slot_bytes
            global NS_ID
            NS_ID = ns.id
        rng = random.Random(7)
        for start in range(0, a.clients, a.wave):
            kids = [spawn(d.socket, n) for n in range(start, min(start + a.wave, a.clients))]
            for _pid, r in kids:
                # Wait (bounded) until it holds what it came for; mid-request ones say so at once.
                deadline = time.monotonic() + 30
                got = b""
                while not got and time.monotonic() < deadline:
                    if select.select([r], [], [], 0.5)[0]:
                        got = os.read(r, 1)
                not_ready += not got
                os.close(r)
            time.sleep(rng.random() * 0.02)      # the mid-request ones die at random points of their requests
            for pid, _ in kids:
                os.kill(pid, signal.SIGKILL)
            for pid, _ in kids:
                os.waitpid(pid, 0)
                killed += 1
            if d.proc.poll() is not None:
                problems.append(f"daemon exited with {d.proc.returncode} after {killed} clients")
                break
        if d.proc.poll() is None:
            with d.client() as c:
                def settled():
                    s = c.stats()
                    return s if s["leases"] == 0 and s["reservations"] == 0 and s["clients"] == 1 else None
                s = wait_for(settled, 30) or c.stats()
                host = s["tiers"]["host"]
                read_up = s["tiers"]["disk"]["served_blocks"]
                if s["leases"] or s["reservations"] or s["clients"] != 1:
                    problems.append(f"left behind: {s['leases']} leases, {s['reservations']} reservations, "
                                    f"{s['clients'] - 1} connections")
                if s["lease_timeouts"] or s["reservation_timeouts"]:
                    problems.append(f"{s['lease_timeouts']} leases and {s['reservation_timeouts']} reservations "
                                    "ended by timeout, not by their connection's end")
                if host["used_bytes"] != host["blocks"] * slot_bytes:
                    problems.append(f"host slots leaked: used_bytes {host['used_bytes']} but {host['blocks']} "
                                    f"blocks of {slot_bytes}")
                if s["errors"].get("internal", 0):
                    problems.append(f"{s['errors']['internal']} internal errors")
                ns = c.namespace(NS, block_size=BLOCK)
                never = [b"never-%d-%d" % (n, i) for n in range(a.clients) for i in range(8)]
                visible = sum(ns.lookup([k]) for k in never[:: max(1, len(never) // 2000)])
                if visible:
                    problems.append(f"{visible} never-committed blocks are visible")
                wrong = present = 0
                for i in range(0, len(STORED), 64):
                    for k, b in zip(STORED[i:i + 64], ns.get_many(STORED[i:i + 64])):
                        present += b is not None
                        wrong += b is not None and b != content(k)
                if wrong:
                    problems.append(f"{wrong} stored blocks have wrong bytes")
                if present < len(STORED):
                    problems.append(f"{len(STORED) - present} stored blocks lost")
        if "Traceback" in d.log():
            problems.append(f"traceback in the daemon log {d.log_path}")
    finally:
        d.stop()
    for p in problems:
        print("problem:", p)
    return verdict("killed-clients", not problems,
                   f"{killed} clients SIGKILLed in {time.monotonic() - t0:.0f} s ({not_ready} before they were ready), "
                   f"{read_up} blocks read up from disk for them; "
                   f"log {d.log_path}")


if __name__ == "__main__":
    sys.exit(main())
