"""host.populate: a new daemon initialises its host region's pages in the background, so the
first puts into a fresh region run like puts into one that has been in use (16 page faults per
MiB in a client that just mapped it, not 256), and bytes written meanwhile are kept."""

from __future__ import annotations

import ctypes
import errno
import logging
import subprocess
import sys
import textwrap
import threading

import pytest
from test_fencing import wait_for

from kvtierd.tiers import populate as populate_mod
from kvtierd.tiers.host import HostRegion, shmem_thp
from kvtierd.tiers.populate import Populator, populate, populate_all

MiB = 1 << 20
HOST = 64 * MiB

# Where memfds get transparent huge pages without asking, no page of them is first touched 4 KiB
# at a time, with or without populating.
THP_ALWAYS = shmem_thp()[0] in ("always", "force")

# A fresh process puts 32 blocks of 1 MiB and prints its minor page faults per MiB written.
WRITER = textwrap.dedent("""
    import resource, sys
    from kvtierd import Client
    data = [bytes([i]) * (1 << 20) for i in range(32)]
    keys = [b"w%d" % i for i in range(32)]
    with Client(sys.argv[1]) as c:
        ns = c.namespace("fresh", block_size=1 << 20)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert ns.put_many(keys, data) == 32
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert ns.get_many(keys[:1]) == data[:1]
        print((f1 - f0) / 32)
""")


def faults_per_mib_of_a_first_put(socket: str) -> float:
    out = subprocess.run([sys.executable, "-c", WRITER, socket], check=True, capture_output=True,
                         text=True, timeout=120)
    return float(out.stdout.split()[0])


def populated(c) -> int:
    return c.stats()["domains"]["default"]["populated_bytes"]


@pytest.mark.skipif(THP_ALWAYS, reason="shmem_enabled=always: memfds are in huge pages anyway")
def test_a_new_daemon_populates_its_region_so_a_first_put_maps_16_pages_per_fault(start_daemon):
    d = start_daemon("--host-bytes", str(HOST))
    with d.client() as c:
        wait_for(lambda: populated(c) == HOST, 30, "the host region to be populated")
    d.wait_log("host region of domain 'default' populated: 64 MiB")
    faults = faults_per_mib_of_a_first_put(d.socket)
    assert faults < 40, faults                 # fault-around: 16 per MiB


@pytest.mark.skipif(THP_ALWAYS, reason="shmem_enabled=always: memfds are in huge pages anyway")
def test_without_populate_a_first_put_faults_on_every_page(start_daemon):
    d = start_daemon("--host-bytes", str(HOST), "--set", "host.populate=false")
    with d.client() as c:
        assert populated(c) == 0
    faults = faults_per_mib_of_a_first_put(d.socket)
    assert faults > 200, faults                # one per 4 KiB page
    assert "populated" not in d.log()


def test_every_access_domain_is_populated(start_daemon, tmp_path):
    cfg = tmp_path / "domains.toml"
    cfg.write_text('[access.domains]\nbatch = { namespaces = ["batch"], host_bytes = "16MiB" }\n')
    d = start_daemon("--host-bytes", str(HOST), "--config", str(cfg))
    with d.client() as c:
        wait_for(lambda: all(v["populated_bytes"] == v["capacity_bytes"] > 0
                             for v in c.stats()["domains"].values()), 30, "both regions to be populated")
        assert set(c.stats()["domains"]) == {"default", "batch"}


class StopAfter(threading.Event):
    """An event that reads as set from its n-th check on: the daemon starting to stop right
    after the populating thread's n-th chunk."""

    def __init__(self, checks: int):
        super().__init__()
        self.left = checks

    def is_set(self) -> bool:
        self.left -= 1
        return self.left < 0 or super().is_set()


@pytest.fixture
def region():
    r = HostRegion(8 * MiB, MiB, domain="t")
    yield r
    r.close()


def test_a_stopping_daemon_gets_the_thread_back_after_one_chunk_and_a_restart_goes_on(region):
    populate(region, StopAfter(2), chunk=MiB)              # one check before, one after the first chunk
    assert region.populated_bytes == MiB
    populate(region, threading.Event(), chunk=3 * MiB)     # the rest; the last chunk is short
    assert region.populated_bytes == region.size


def test_bytes_written_before_or_while_populating_are_kept(region):
    region.slot(0, 4096)[:] = b"a" * 4096                 # before: the first chunk's page
    populate(region, StopAfter(2), chunk=2 * MiB)
    region.slot(5 * MiB, 4096)[:] = b"b" * 4096           # meanwhile: a page the thread has not reached
    populate(region, threading.Event(), chunk=2 * MiB)
    assert bytes(region.slot(0, 4096)) == b"a" * 4096
    assert bytes(region.slot(5 * MiB, 4096)) == b"b" * 4096
    assert bytes(region.slot(7 * MiB, 4096)) == bytes(4096)


def test_huge_page_regions_need_no_populating():
    r = HostRegion(8 * MiB, MiB, domain="t")
    try:
        r.populated_bytes = r.size                         # what HostRegion sets for hugetlb and THP
        p = Populator([r])
        p.start()
        assert not p._thread.is_alive() and p._thread.ident is None    # no thread was started
        p.stop()
    finally:
        r.close()


class NoPopulateWrite:
    """libc on a kernel before 5.14: madvise refuses MADV_POPULATE_WRITE with EINVAL."""
    calls = 0

    def madvise(self, addr, length, advice):
        NoPopulateWrite.calls += 1
        ctypes.set_errno(errno.EINVAL)
        return -1


def test_a_kernel_without_populate_write_is_logged_once_and_leaves_the_regions_usable(monkeypatch, caplog):
    monkeypatch.setattr(populate_mod, "_libc", NoPopulateWrite())
    regions = [HostRegion(4 * MiB, MiB, domain=d) for d in ("a", "b")]
    try:
        with caplog.at_level(logging.WARNING, logger="kvtierd.host"):
            populate_all(regions, threading.Event(), chunk=MiB)
        assert NoPopulateWrite.calls == 1                  # the second region is not tried
        assert [r.populated_bytes for r in regions] == [0, 0]
        (record,) = caplog.records
        assert "no MADV_POPULATE_WRITE" in record.getMessage() and "'a'" in record.getMessage()
        regions[0].slot(0, 4)[:] = b"ok!!"
        assert bytes(regions[0].slot(0, 4)) == b"ok!!"
    finally:
        for r in regions:
            r.close()
