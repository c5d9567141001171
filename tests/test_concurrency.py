"""Many client processes at once: overlapping keys, random load; every block exact, in a slot of its own."""

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
        assert check_readable_blocks(c, {"shared": ns}, 64, 64 << 20) > 0
        s = c.stats()
        assert s["leases"] == 0 and s["reservations"] == 0


def check_readable_blocks(c, spaces, universe, capacity):
    """Leases every key of every namespace at once and checks what the daemon hands out:
    each block byte-exact, no two blocks in overlapping slots, their slots within capacity.
    Returns the bytes of slots readable."""
    from load_worker import block_for
    keys = [b"key%d" % i for i in range(universe)]
    leases, slots = [], []
    try:
        for name, ns in spaces.items():
            lease = ns.acquire(keys, prefix=False)
            leases.append(lease)
            for k, off, tier, view in zip(keys, lease.offsets, lease.tiers, lease.views):
                if off < 0:
                    continue
                assert tier == "host"
                assert bytes(view) == block_for(name, k, ns.block_size), f"wrong bytes for {name}/{k!r}"
                slots.append((off, ns.slot_bytes, name, k))
    finally:
        for lease in leases:
            lease.release()
    slots.sort()
    for (off, size, name, k), (nxt, _, name2, k2) in zip(slots, slots[1:]):
        assert off + size <= nxt, f"{name}/{k!r} at {off}+{size} overlaps {name2}/{k2!r} at {nxt}"
    assert all(0 <= off and off + size <= capacity for off, size, _, _ in slots)
    readable = sum(size for _, size, _, _ in slots)
    assert readable <= capacity
    return readable


def test_blocks_under_random_load_with_mixed_block_sizes_are_exact_and_never_share_a_slot(start_daemon):
    # 16 MiB in 2 MiB slabs, three block sizes fighting over them, far more data than fits.
    from load_worker import SIZES
    d = start_daemon("--host-bytes", "16MiB", "--set", "host.slab_bytes=2MiB")
    seen = []
    with d.client() as c:
        spaces = {name: c.namespace(name, block_size=size) for name, size in SIZES.items()}
        last = [0.0]

        def poll():
            if time.monotonic() - last[0] < 0.25:
                return
            seen.append(check_readable_blocks(c, spaces, 200, 16 << 20))
            last[0] = time.monotonic()
        run_workers(d, 4, 6.0, "random", poll)
        seen.append(check_readable_blocks(c, spaces, 200, 16 << 20))
        s = c.stats()
    assert len(seen) >= 3               # checked while the workers ran, not only after
    assert max(seen) > 8 << 20          # the load really filled the tier
    assert s["evictions"].get("host", 0) > 0
    assert s["leases"] == 0 and s["reservations"] == 0
    assert s["errors"].get("internal", 0) == 0
