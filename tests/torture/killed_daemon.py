"""Torture (c): the daemon SIGKILLed 20 times while clients write through to the disk tier; 0 wrong bytes.

    python tests/torture/killed_daemon.py [--kills 20] [--writers 3]

One state directory across every life of the daemon. Each life: start (recovering
what the last one left: torn records, segments without hint files), check every block it
serves, then let writers store, read and delete blocks over a host tier small
enough that demotion writes to disk all the time, and SIGKILL it 0.5 to 2.5 s in.
The durability mode rotates through batch, interval and never. A block is always
the same bytes for its key, so whatever a restarted daemon serves is either those
bytes or a wrong byte. After the last kill: a clean start and stop, then `kvtierd
fsck` of the state directory.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import DaemonProcess, verdict

from kvtierd import Client

BLOCK = 64 << 10
UNIVERSE = [b"blk-%d" % i for i in range(3000)]     # 187 MiB: 24x the host tier
NS = "crash"
MODES = ["batch", "interval", "never"]


def content(key: bytes) -> bytes:
    seed = hashlib.blake2b(key, digest_size=32).digest()
    return seed * (BLOCK // 32)


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.wrong: list[str] = []
        self.stored = self.read = 0


def check_all(d: DaemonProcess, tally: Tally, life: int) -> int:
    """Reads every key back; returns how many the daemon has."""
    present = 0
    with d.client() as c:
        ns = c.namespace(NS, block_size=BLOCK)
        for i in range(0, len(UNIVERSE), 64):
            keys = UNIVERSE[i:i + 64]
            for k, b in zip(keys, ns.get_many(keys)):
                if b is not None:
                    present += 1
                    if b != content(k):
                        tally.wrong.append(f"life {life}: {k!r} after restart")
    return present


def writer(sock: str, seed: int, tally: Tally, killed: threading.Event) -> None:
    """Stores, reads (checking) and deletes until the daemon dies under it."""
    rng = random.Random(seed)
    try:
        with Client(sock) as c:
            ns = c.namespace(NS, block_size=BLOCK)
            while not killed.is_set():
                keys = list(dict.fromkeys(rng.choice(UNIVERSE) for _ in range(8)))
                roll = rng.random()
                if roll < 0.6:
                    n = ns.put_many(keys, [content(k) for k in keys])
                    with tally.lock:
                        tally.stored += n
                elif roll < 0.9:
                    for k, b in zip(keys, ns.get_many(keys)):
                        with tally.lock:
                            tally.read += b is not None
                            if b is not None and b != content(k):
                                tally.wrong.append(f"{k!r} while writing")
                else:
                    ns.delete(keys[:2])
    except Exception as e:
        if not killed.is_set():          # an error while the daemon lives is a finding; after the kill, expected
            with tally.lock:
                tally.wrong.append(f"writer error before the kill: {type(e).__name__}: {e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--writers", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvtierd-torture-"))
    rng = random.Random(3)
    tally = Tally()
    problems: list[str] = []
    t0 = time.monotonic()
    kills = 0
    survived = []
    base = ["--host-bytes", "8MiB", "--set", "host.slab_bytes=1MiB", "--disk-bytes", "512MiB",
            "--set", "disk.segment_bytes=32MiB", "--metrics-address", ""]
    d = None
    try:
        for life in range(a.kills + 1):
            mode = MODES[life % len(MODES)]
            d = DaemonProcess(tmp, [*base, "--set", f"disk.durability={mode}"]).start(timeout=120)
            survived.append(check_all(d, tally, life))
            if life == a.kills:
                break
            killed = threading.Event()
            threads = [threading.Thread(target=writer, args=(d.socket, life * 100 + w, tally, killed))
                       for w in range(a.writers)]
            for t in threads:
                t.start()
            time.sleep(0.5 + 2 * rng.random())       # the point of the test: a kill at an arbitrary moment
            killed.set()
            d.send_signal(signal.SIGKILL)
            d.proc.wait()
            kills += 1
            for t in threads:
                t.join(30)
        if "Traceback" in d.log():
            problems.append(f"traceback in the daemon log {d.log_path}")
        if d.stop() != 0:
            problems.append("the last clean stop failed")
        fsck = subprocess.run([sys.executable, "-m", "kvtierd", "fsck", str(tmp / "state")], capture_output=True,
                              text=True, timeout=300)
        print("fsck:", fsck.stdout.strip().replace("\n", " | ")[:600], f"(exit {fsck.returncode})")
    finally:
        if d is not None:
            d.kill()
    problems += tally.wrong[:20]
    for p in problems:
        print("problem:", p)
    ok = not problems and kills == a.kills
    if ok:
        shutil.rmtree(tmp, ignore_errors=True)     # hundreds of MiB of segments; kept when it failed
    return verdict("killed-daemon", ok,
                   f"{kills} SIGKILLs in {time.monotonic() - t0:.0f} s, {len(tally.wrong)} wrong blocks; "
                   f"{tally.stored} blocks stored, {tally.read} read back while writing; blocks present after each "
                   f"restart: {survived}; state {tmp}")


if __name__ == "__main__":
    sys.exit(main())
