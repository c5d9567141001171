"""The event loop never waits on the disk engine's housekeeping: recovery (from hint files, and
half from hints and half by scanning), namespace deletes, compaction and eviction over 100k blocks
keep the loop's lag under 5 ms at p99.

Lag is measured the way a client feels it: a coroutine on the loop asks to wake every 2 ms
and records how late it woke, while the tier works beside it. The machine these tests run on
is shared (its idle loops alone see several ms at p99), so a control process runs the same
ticker with no disk tier at the same time, and the limit applies to what the tier adds:
p99(ours) - p99(control) < 5 ms. On an idle machine the control's p99 is ~0.2 ms.

Recovery from hint files is its own phase with its own p99: it takes a fraction of a second
(~100-160 ticks), so a few long GIL holds in it (the index's dicts copying their tables as
they grew past 44k and 87k entries held it for 4-12 ms, before the keydir was sharded) decide
its p99, where over the whole run's thousands of ticks they would vanish. One recovery's p99
would be its second-worst tick, one scheduling hiccup of the shared machine; the phase runs
HINT_RUNS recoveries in a row, so its p99 is taken over a few hundred ticks.

The control only subtracts what both loops saw alike. When the VM stalls for a while (the
control's own p99 at several ms), the tier's loop, which also competes with the tier's threads for
the 2 cores, stalls longer: such a run, if over the limit, is made again (NOISY, ATTEMPTS).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from test_disk_roundtrip import open_store, small_cfg

from kvtierd.disk.format import record_size
from kvtierd.disk.tier import DiskTier

N = 100_000
PLEN = 512
REC = record_size(PLEN)
TICK = 0.002
HINT_RUNS = 3
# A control p99 this high means the machine itself stalled the control's loop (idle: ~0.2 ms) and the
# tier's loop with it, by more than the tier adds: such a run says nothing either way, so a run over
# the limit beside a noisy control is made again, ATTEMPTS runs at most. A quiet control decides.
NOISY = 0.002
ATTEMPTS = 3


CONTROL = r"""
import asyncio, sys, threading
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
async def main():
    loop = asyncio.get_running_loop(); lags = []
    print("READY", flush=True)
    while not stop.is_set():
        t = loop.time(); await asyncio.sleep(%(TICK)r); lags.append(loop.time() - t - %(TICK)r)
    lags.sort(); print(lags[int(len(lags) * 0.99)], len(lags), flush=True)
asyncio.run(main())
"""


def _cfg():
    return small_cfg(bytes=N * REC + (64 << 20), segment_bytes=8 << 20, io_bytes=1 << 20, durability="never",
                     compaction_threshold=0.6, compaction_io_share=1.0)


def _populate(state) -> None:
    """100k blocks in namespaces a and b, interleaved so every segment is half of each."""
    s = open_store(state, _cfg())
    payload = memoryview(bytes(range(256)) * 2)
    for start in range(0, N, 2048):
        items = [("ab"[i % 2], b"k%06d" % i, payload) for i in range(start, min(N, start + 2048))]
        assert all(s.write_batch(items))
    s.close()


class Ticker:
    def __init__(self) -> None:
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            t = loop.time()
            await asyncio.sleep(TICK)
            self.lags.append(loop.time() - t - TICK)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        self._stop.set()
        await self._task

    def p99(self) -> float:
        lags = sorted(self.lags)
        return lags[int(len(lags) * 0.99)]


async def _until(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _measure(tmp_path) -> tuple[dict, float, int]:
    """One run of every phase beside the control process: (phases, control p99, control ticks)."""
    _populate(tmp_path)
    assert len(list((tmp_path / "disk").glob("*.hint"))) > 10

    async def go() -> dict:
        phases = {}
        cfg = _cfg()
        ticker = Ticker()
        ticker.start()
        for _ in range(HINT_RUNS):                  # every segment has its hint: none is read
            tier = DiskTier(cfg, tmp_path)
            await tier.start()
            await tier.wait_recovered()
            assert tier.stats()["blocks"] == N
            await tier.close()
        await ticker.stop()
        phases["hint recovery"] = ticker.p99()
        phases["hint recovery ticks"] = len(ticker.lags)
        hints = sorted((tmp_path / "disk").glob("*.hint"))
        for p in hints[::2]:            # half the segments recover from hints, half by scanning
            p.unlink()

        tier = DiskTier(cfg, tmp_path)
        ticker = Ticker()
        ticker.start()
        await tier.start()
        await tier.wait_recovered()
        st = tier.stats()
        assert st["blocks"] == N
        phases["recovery"] = ticker.p99()

        n0 = len(ticker.lags)
        assert tier.delete_namespace("a") == N // 2         # O(1) on the loop; the rest in the background
        assert not tier.contains("a", b"k000000") and tier.contains("b", b"k000001")
        await _until(lambda: tier.stats()["compaction_runs"] >= 3, 40, "compaction")
        phases["delete+compaction"] = sorted(ticker.lags[n0:])[int((len(ticker.lags) - n0) * 0.99)]

        n1 = len(ticker.lags)
        cfg.bytes = N * REC // 4                             # disk.bytes lowered (SIGHUP): evict 3/4
        payload = memoryview(b"x" * PLEN)
        for i in range(20):                                  # the write path meets eviction
            res = await tier.write_batch([("c", b"c%05d" % (i * 64 + j), payload) for j in range(64)])
            assert all(res)
        await _until(lambda: tier.stats()["used_bytes"] <= cfg.high_watermark * cfg.bytes, 40, "eviction")
        st = tier.stats()
        assert st["evictions"] > 10_000
        phases["eviction"] = sorted(ticker.lags[n1:])[int((len(ticker.lags) - n1) * 0.99)]
        await ticker.stop()
        await tier.close()
        phases["all"] = ticker.p99()
        phases["ticks"] = len(ticker.lags)
        return phases

    control = subprocess.Popen([sys.executable, "-c", CONTROL % {"TICK": TICK}], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert control.stdout.readline().strip() == "READY"
        phases = asyncio.run(go())
        out, _ = control.communicate("", timeout=30)
    finally:
        control.kill()
    return phases, float(out.split()[0]), int(out.split()[1])


def test_loop_lag_stays_under_5ms_while_recovery_compaction_and_eviction_run(tmp_path):
    for attempt in range(1, ATTEMPTS + 1):
        phases, control_p99, control_ticks = _measure(tmp_path / f"run{attempt}")
        print(f"loop lag p99 by phase (s): {phases}; control process p99 {control_p99:.4f} s")
        assert phases["ticks"] > 100 and phases["hint recovery ticks"] > 60 and control_ticks > 100
        over = phases["hint recovery"] - control_p99 >= 0.005 or phases["all"] - control_p99 >= 0.005
        if not over or control_p99 < NOISY or attempt == ATTEMPTS:
            break
    assert phases["hint recovery"] - control_p99 < 0.005, (phases, control_p99)
    assert phases["all"] - control_p99 < 0.005, (phases, control_p99)
