"""Fenced revocation against a real daemon: a writer whose reservation (or reader whose lease) timed out
cannot hurt another block, and its slots come back once its connection is gone."""

from __future__ import annotations

import time

import pytest

from kvtierd.client import KvtierdError

BS = 64 << 10


def wait_for(fn, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def fenced(start_daemon):
    # 2 s, not less: the other client's own put_many and get_many hold a reservation or a lease
    # for a round trip and a copy, and a pause of a loaded machine must not time those out too.
    return start_daemon("--set", "server.reservation_timeout_s=2", "--set", "server.lease_timeout_s=2")


def test_stalled_writer_after_timeout_cannot_corrupt_the_key_stored_again(fenced):
    with fenced.client() as stalled, fenced.client() as other:
        ns_a = stalled.namespace("fence", BS)
        ns_b = other.namespace("fence", BS)
        res = ns_a.reserve([b"k"])
        old_view = res.views[0]
        old_view[:] = b"\x01" * BS                 # half way through its copy, the writer stalls (SIGSTOP, GC)
        wait_for(lambda: other.stats()["reservation_timeouts"] == 1, what="the reservation to time out")
        assert other.stats()["quarantined_slots"] == 1
        assert ns_b.put_many([b"k"], [b"\x02" * BS]) == 1  # the key is free again; it gets another slot
        old_view[:] = b"\x03" * BS                 # the stalled writer resumes and finishes its copy
        assert ns_b.get_many([b"k"]) == [b"\x02" * BS]
        with pytest.raises(KvtierdError) as ei:
            res.commit()
        assert "revoked" in str(ei.value) or "timed out" in str(ei.value) or "lost" in str(ei.value).lower()
        assert other.stats()["quarantined_slots"] == 1  # still fenced: the stalled client has not closed
        stalled.close()
        wait_for(lambda: other.stats()["quarantined_slots"] == 0, what="the fenced slot to be released")
        assert ns_b.get_many([b"k"]) == [b"\x02" * BS]
        assert other.stats()["errors"].get("revoked", 0) >= 1


def test_timed_out_lease_keeps_the_block_it_pins_until_the_reader_is_gone(fenced):
    with fenced.client() as reader, fenced.client() as other:
        ns_r = reader.namespace("fence2", BS)
        ns_o = other.namespace("fence2", BS)
        ns_o.put_many([b"a"], [b"\x07" * BS])
        lease = ns_r.acquire([b"a"])
        view = lease.views[0]
        wait_for(lambda: other.stats()["lease_timeouts"] == 1, what="the lease to time out")
        assert ns_o.delete([b"a"]) == 1
        assert bytes(view) == b"\x07" * BS         # the slot is not reused while the reader may still read
        assert other.stats()["quarantined_slots"] == 1
        reader.close()
        wait_for(lambda: other.stats()["quarantined_slots"] == 0, what="the lease's slot to be released")
