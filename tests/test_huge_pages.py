"""host.huge_pages: host regions from the hugetlb pool (`on`) or in transparent huge pages (`thp`), so
a worker that just started maps its slots one huge page at a time; without them `on` and `thp` refuse
to start and say why, and `try` takes what there is: hugetlb, else transparent, else 4 KiB pages.

The transparent case depends on the kernel's shmem policy (shmem_enabled), which a test does not
change: on a machine where it is `never` (the default) the refusal runs, where it allows them the
positive case does."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvtierd.tiers.host import THP_USABLE, huge_page_pool, shmem_thp

HPS, FREE = huge_page_pool()
HOST = 64 << 20
THP_POLICY, PMD, _ = shmem_thp()
THP = THP_POLICY in THP_USABLE


def too_many() -> str:
    """A host size the free huge pages cannot hold."""
    return str(max(HOST, (FREE + 1) * max(HPS, 1 << 20) + (64 << 20)))


def test_on_without_enough_free_huge_pages_refuses_to_start_and_says_why(start_daemon):
    d = start_daemon("--host-bytes", too_many(), "--set", "host.huge_pages=on", wait=False)
    assert d.proc.wait(60) != 0
    log = d.log()
    assert "no huge pages" in log
    assert "vm.nr_hugepages" in log or "no hugetlb pages" in log


@pytest.mark.skipif(THP, reason="the kernel's shmem policy allows transparent huge pages: try takes those")
def test_try_without_enough_free_huge_pages_starts_on_small_pages(start_daemon):
    d = start_daemon("--host-bytes", too_many(), "--set", "host.huge_pages=try")
    assert "using 4 KiB pages" in d.log()
    assert "no transparent huge pages" in d.log()
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


def store_and_read_in_a_new_process(c, socket: str) -> tuple[float, str]:
    """Stores 32 blocks of 1 MiB through client `c`, then has a fresh process read them:
    (its page faults per MiB read, whether it mapped slots ahead)."""
    ns = c.namespace("huge", block_size=1 << 20)
    keys = [b"b%d" % i for i in range(32)]
    assert ns.put_many(keys, [bytes([i]) * (1 << 20) for i in range(32)]) == 32
    out = subprocess.run([sys.executable, "-c", READER, socket], check=True, capture_output=True,
                         text=True, timeout=120).stdout.split()
    return float(out[0]), out[1]


def transparent_domain(c) -> dict:
    """The default domain's STATS, checked to be in transparent huge pages."""
    domain = c.stats()["domains"]["default"]
    assert domain["huge_page_bytes"] == PMD and 0 < domain["huge_bytes"] <= HOST
    return domain


@pytest.mark.skipif(FREE * HPS < 2 * HOST, reason="needs free huge pages (vm.nr_hugepages) for a 64 MiB region")
def test_a_huge_page_region_is_mapped_by_a_new_process_one_huge_page_at_a_time(start_daemon):
    d = start_daemon("--host-bytes", str(HOST), "--set", "host.huge_pages=on")
    assert huge_page_pool()[1] <= FREE - HOST // HPS       # the daemon took its pages at start
    with d.client() as c:
        assert c.stats()["domains"]["default"]["huge_page_bytes"] == HPS
        assert c.stats()["domains"]["default"]["huge_bytes"] == HOST
        assert not c.region.prefault_enabled               # nothing to map ahead
        faults, prefault = store_and_read_in_a_new_process(c, d.socket)
    assert prefault == "False"
    assert faults < 4, faults              # 4 KiB pages: 16 per MiB at best (fault-around), 256 at worst
    d.stop()
    assert huge_page_pool()[1] >= FREE - 1                  # given back when the daemon is gone


def test_a_plain_region_is_not_taken_for_a_huge_one():
    from kvtierd.tiers.host import HostRegion, is_huge
    r = HostRegion(HOST, 16 << 20, huge_pages="off")
    try:
        assert not is_huge(r.fd) and r.huge_page_bytes == 0 and r.huge_bytes == 0
    finally:
        r.close()


@pytest.mark.skipif(FREE * HPS < 2 * HOST, reason="needs free huge pages (vm.nr_hugepages) for a 64 MiB region")
def test_a_hugetlb_region_is_told_by_its_filesystem():
    from kvtierd.tiers.host import HostRegion, is_huge
    r = HostRegion(HOST, 16 << 20, huge_pages="on")
    try:
        assert is_huge(r.fd) and r.huge_page_bytes == HPS and r.huge_bytes == HOST
    finally:
        r.close()


def test_the_shmem_policy_is_the_pmd_size_own_setting_unless_it_inherits(tmp_path):
    (tmp_path / "hpage_pmd_size").write_text("2097152\n")
    (tmp_path / "shmem_enabled").write_text("always within_size advise [never] deny force\n")
    own = tmp_path / "hugepages-2048kB"
    own.mkdir()
    (own / "shmem_enabled").write_text("always [inherit] within_size advise never\n")
    assert shmem_thp(tmp_path) == ("never", 2 << 20, tmp_path / "shmem_enabled")
    (own / "shmem_enabled").write_text("always inherit within_size [advise] never\n")
    assert shmem_thp(tmp_path) == ("advise", 2 << 20, own / "shmem_enabled")
    (own / "shmem_enabled").write_text("always inherit within_size advise [never]\n")
    assert shmem_thp(tmp_path) == ("never", 2 << 20, own / "shmem_enabled")   # named in the refusal
    own.joinpath("shmem_enabled").unlink()              # a kernel before per-size settings
    assert shmem_thp(tmp_path) == ("never", 2 << 20, tmp_path / "shmem_enabled")
    assert shmem_thp(tmp_path / "absent") == ("", 0, tmp_path / "absent")   # no transparent huge pages at all


def test_thp_where_the_shmem_policy_forbids_them_says_which_setting_to_change():
    from kvtierd.tiers.host import _thp_memfd
    where = Path("/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled")
    for policy in ("never", "deny", ""):
        why = _thp_memfd("default", HOST, 16 << 20, policy, 2 << 20, where)
        assert isinstance(why, str) and str(where) in why and "advise" in why
    assert "no transparent huge pages" in _thp_memfd("default", HOST, 16 << 20, "advise", 0)
    assert "less than one unit" in _thp_memfd("default", 1 << 20, 1 << 20, "advise", 2 << 20)


@pytest.mark.skipif(THP, reason="the kernel's shmem policy allows transparent huge pages")
def test_thp_refuses_to_start_where_the_kernel_does_not_allow_them(start_daemon):
    d = start_daemon("--host-bytes", str(HOST), "--set", "host.huge_pages=thp", wait=False)
    assert d.proc.wait(60) != 0
    log = d.log()
    assert "no transparent huge pages" in log
    assert "shmem_enabled" in log or not PMD           # which setting to change, where there is one
    assert 'host.huge_pages = "try" or "off"' in log


@pytest.mark.skipif(not THP, reason="needs a shmem policy that allows transparent huge pages "
                                    "(/sys/kernel/mm/transparent_hugepage/shmem_enabled: advise)")
def test_a_thp_region_is_mapped_by_a_new_process_one_huge_page_at_a_time(start_daemon):
    d = start_daemon("--host-bytes", str(HOST), "--set", "host.huge_pages=thp")
    assert "in transparent huge pages" in d.log()
    with d.client() as c:
        transparent_domain(c)
        assert c.region.prefault_enabled                   # a plain memfd to the client: it maps slots ahead
        faults, _ = store_and_read_in_a_new_process(c, d.socket)
    assert faults < 4, faults              # 4 KiB pages: 16 per MiB at best (fault-around), 256 at worst


@pytest.mark.skipif(not THP or FREE * HPS >= HOST,
                    reason="needs a shmem policy that allows transparent huge pages, and too few hugetlb pages "
                           "for a 64 MiB region")
def test_try_without_enough_free_huge_pages_takes_transparent_ones(start_daemon):
    d = start_daemon("--host-bytes", str(HOST), "--set", "host.huge_pages=try")
    assert "in transparent huge pages instead" in d.log()
    with d.client() as c:
        transparent_domain(c)
