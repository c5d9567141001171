"""The HBM tier end to end on a GPU: a daemon and worker processes sharing blocks
through the HBM pool (CUDA IPC) and the pinned host tier, under pressure."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvtierd.gpu import cuda

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda.kernels_available(), reason="needs CUDA with torch and cupy")]

WORKER = str(Path(__file__).resolve().parents[1] / "worker_process.py")
# 64 KiB blocks (see worker_process.py); 1 MiB slabs so a small pool fills in slots, not slabs.
SMALL_SLABS = ("--set", "host.slab_bytes=1MiB")


def worker(d, *args):
    r = subprocess.run([sys.executable, WORKER, d.socket, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + d.log()
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_two_workers_share_blocks_through_the_hbm_pool(start_daemon):
    d = start_daemon("--hbm-bytes", "64MiB", *SMALL_SLABS)
    d.wait_log("HBM tier")
    with d.client() as c:                  # pinning faulted the region in: host.populate skips it
        assert c.stats()["domains"]["default"]["populated_bytes"] == 64 << 20
    assert "'default' populated" not in d.log()
    out = worker(d, "store", "cuda", "1", "hbm")
    assert out["stored"] == 32 and out["tiers"] == ["hbm"] * 32
    assert worker(d, "load", "cuda", "1") == {"loaded": 32, "equal": True}
    # A reader that only maps the host region (here a CPU worker) gets HBM blocks copied down first.
    worker(d, "store", "cuda", "3", "hbm")
    assert worker(d, "load", "cpu", "3", "host") == {"loaded": 32, "equal": True}
    # Host-tier blocks, loaded by a GPU worker through its pinned mapping.
    assert worker(d, "store", "cuda", "2", "host")["tiers"] == ["host"] * 32
    assert worker(d, "load", "cuda", "2") == {"loaded": 32, "equal": True}
    # Asking for HBM promotes host blocks on the way.
    assert worker(d, "load", "cuda", "2", "hbm") == {"loaded": 32, "equal": True}
    with d.client() as c:
        ns = c.namespace("worker-test", block_size=64 << 10)
        assert ns.lookup_tiers([b"w2-%d" % i for i in range(32)]) == ["hbm"] * 32
        assert ns.lookup_tiers([b"w3-%d" % i for i in range(32)]) == ["host"] * 32
        # The bytes API reads through host as well.
        assert ns.get_many([b"w1-0"])[0] is not None
        moves = {(m["src"], m["dst"]): m["blocks"] for m in c.stats()["moves"]}
    assert moves[("host", "hbm")] == 32
    assert moves[("hbm", "host")] >= 33


def test_demotion_under_pressure_keeps_every_byte(start_daemon):
    # 8 MiB of HBM holds 128 blocks; 12 workers store 384 into it.
    d = start_daemon("--hbm-bytes", "8MiB", "--host-bytes", "256MiB", *SMALL_SLABS)
    for seed in range(100, 112):
        assert worker(d, "store", "cuda", str(seed), "hbm")["stored"] == 32
    with d.client() as c:
        s = c.stats()
    assert s["tiers"]["hbm"]["used_bytes"] <= s["tiers"]["hbm"]["capacity_bytes"]
    demoted = {(m["src"], m["dst"]): m["blocks"] for m in s["moves"]}[("hbm", "host")]
    assert demoted >= 384 - 128
    for seed in range(100, 112):
        assert worker(d, "load", "cuda", str(seed)) == {"loaded": 32, "equal": True}


def test_a_killed_worker_leaves_no_lease_and_no_mapping_behind(start_daemon):
    d = start_daemon("--hbm-bytes", "64MiB", *SMALL_SLABS)
    worker(d, "store", "cuda", "7", "hbm")
    p = subprocess.Popen([sys.executable, WORKER, d.socket, "hold", "cuda", "7"], stdout=subprocess.PIPE, text=True)
    assert json.loads(p.stdout.readline()) == {"holding": 32}
    p.send_signal(signal.SIGKILL)
    p.wait()
    with d.client() as c:
        deadline = time.monotonic() + 10
        while c.stats()["leases"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.stats()["leases"] == 0
    assert worker(d, "load", "cuda", "7") == {"loaded": 32, "equal": True}


def test_hbm_blocks_survive_a_clean_restart_through_disk(start_daemon, tmp_path):
    args = ("--hbm-bytes", "64MiB", "--disk-bytes", "256MiB", "--set", "disk.segment_bytes=16MiB", *SMALL_SLABS)
    d = start_daemon(*args, tmp=tmp_path)
    worker(d, "store", "cuda", "9", "hbm")
    assert d.stop() == 0
    d2 = start_daemon(*args, tmp=tmp_path)
    assert worker(d2, "load", "cuda", "9") == {"loaded": 32, "equal": True}
