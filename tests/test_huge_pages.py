"""host.huge_pages: host regions from the hugetlb pool, so a worker that just started maps its slots
one huge page at a time; without enough free huge pages, `try` starts on 4 KiB pages and `on` refuses."""

import subprocess
import sys
import textwrap

import pytest

from kvtierd.tiers.host import huge_page_pool

HPS, FREE = huge_page_pool()
HOST = 64 << 20


def too_many() -> str:
    """A host size the free huge pages cannot hold."""
    return str(max(HOST, (FREE + 1) * max(HPS, 1 << 20) + (64 << 20)))


def test_on_without_enough_free_huge_pages_refuses_to_start_and_says_why(start_daemon):
    d = start_daemon("--host-bytes", too_many(), "--set", "host.huge_pages=on", wait=False)
    assert d.proc.wait(60) != 0
    log = d.log()
    assert "no huge pages" in log
    assert "vm.nr_hugepages" in log or "no hugetlb pages" in log


def test_try_without_enough_free_huge_pages_starts_on_small_pages(start_daemon):
    d = start_daemon("--host-bytes", too_many(), "--set", "host.huge_pages=try")
    assert "using 4 KiB pages" in d.log()
    with d.client() as c:
        assert c.stats()["domains"]["default"]["huge_page_bytes"] == 0
        assert c.region.prefault_enabled              # small pages: the client maps slots ahead
        ns = c.namespace("small", block_size=1 << 20)
        ns.put_many([b"a"], [b"x" * (1 << 20)])
        assert ns.get_many([b"a"]) == [b"x" * (1 << 20)]


# A fresh process reads 32 MiB of blocks and prints its minor page faults per MiB read.
READER = textwrap.dedent("""
    import resource, sys
    from kvtierd import Client
    with Client(sys.argv[1]) as c:
        ns = c.namespace("huge", block_size=1 << 20)
        keys = [b"b%d" % i for i in range(32)]
        out = [bytearray(1 << 20) for _ in keys]
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert all(ns.get_into(keys, out))
        f1 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        assert [bytes(o[:1]) for o in out] == [bytes([i]) for i in range(32)]
        print((f1 - f0) / 32, c.region.prefault_enabled)
""")


@pytest.mark.skipif(FREE * HPS < 2 * HOST, reason="needs free huge pages (vm.nr_hugepages) for a 64 MiB region")
def test_a_huge_page_region_is_mapped_by_a_new_process_one_huge_page_at_a_time(start_daemon):
    d = start_daemon("--host-bytes", str(HOST), "--set", "host.huge_pages=on")
    assert huge_page_pool()[1] <= FREE - HOST // HPS       # the daemon took its pages at start
    with d.client() as c:
        assert c.stats()["domains"]["default"]["huge_page_bytes"] == HPS
        assert not c.region.prefault_enabled               # nothing to map ahead
        ns = c.namespace("huge", block_size=1 << 20)
        keys = [b"b%d" % i for i in range(32)]
        assert ns.put_many(keys, [bytes([i]) * (1 << 20) for i in range(32)]) == 32
    out = subprocess.run([sys.executable, "-c", READER, d.socket], check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()
    assert out[1] == "False"
    assert float(out[0]) < 4, out          # 4 KiB pages: 16 per MiB at best (fault-around), 256 at worst
    d.stop()
    assert huge_page_pool()[1] >= FREE - 1                  # given back when the daemon is gone


def test_a_plain_region_is_not_taken_for_a_huge_one():
    from kvtierd.tiers.host import HostRegion, is_huge
    r = HostRegion(HOST, 16 << 20, huge_pages="off")
    try:
        assert not is_huge(r.fd) and r.huge_page_bytes == 0
    finally:
        r.close()
