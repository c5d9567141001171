"""Many client processes at once: overlapping keys, random load, capacity bounds."""

import subprocess
import sys
import time
from pathlib import Path

WORKER = str(Path(__file__).with_name("load_worker.py"))


def run_workers(daemon, n, seconds, mode, poll=None):
    procs = [subprocess.Popen([sys.executable, WORKER, daemon.socket, str(seed), str(seconds), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for seed in range(n)]
    while any(p.poll() is None for p in procs):
        if poll:
            poll()
        time.sleep(0.05)
    outs = [p.communicate()[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
        assert out.startswith("ok"), out
    return outs


def test_eight_clients_on_overlapping_keys_see_only_correct_bytes(daemon):
    run_workers(daemon, 8, 4.0, "overlap")
    from load_worker import block_for
    with daemon.client() as c:
        ns = c.namespace("shared", block_size=64 << 10)
        keys = [b"key%d" % i for i in range(64)]
        for k, b in zip(keys, ns.get_many(keys)):
            assert b is None or b == block_for("shared", k, 64 << 10)
        s = c.stats()
        assert s["leases"] == 0 and s["reservations"] == 0


def test_capacity_is_never_exceeded_under_random_load_with_mixed_block_sizes(start_daemon):
    # 16 MiB in 2 MiB slabs, three block sizes fighting over them, far more data than fits.
    d = start_daemon("--host-bytes", "16MiB", "--set", "host.slab_bytes=2MiB")
    seen = []
    with d.client() as c:
        def poll():
            t = c.stats()["tiers"]["host"]
            seen.append(t["used_bytes"])
            assert t["used_bytes"] <= t["capacity_bytes"] == 16 << 20
        run_workers(d, 4, 6.0, "random", poll)
        poll()
        s = c.stats()
    assert max(seen) > 8 << 20          # the load really filled the tier
    assert s["evictions"].get("host", 0) > 0
    assert s["leases"] == 0 and s["reservations"] == 0
    assert s["errors"].get("internal", 0) == 0
