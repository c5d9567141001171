"""get_many's fresh `bytes` do not fault on every page: the client lets glibc's heap keep freed
big blocks (kvtierd.buffers.retain_freed_heap), unless told to leave the allocator alone."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                                reason="glibc's heap thresholds")

# Reads the same 32 x 1 MiB batch several times (the caller dropping each batch's bytes before the
# next, as a worker copying them onward does) and prints the minor faults per MiB of the later reads.
READER = textwrap.dedent("""
    import resource, sys
    from kvtierd import Client
    sock, retain = sys.argv[1], sys.argv[2] == "1"
    with Client(sock, retain_heap=retain) as c:
        ns = c.namespace("heap", block_size=1 << 20)
        keys = [b"h%d" % i for i in range(32)]
        ns.put_many(keys, [bytes([i]) * (1 << 20) for i in range(32)])
        got = ns.get_many(keys)
        assert [g[0] for g in got] == list(range(32))
        del got
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            got = ns.get_many(keys)
            del got
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (4 * 32))
""")


def faults_per_mib(sock: str, retain: bool) -> float:
    out = subprocess.run([sys.executable, "-c", READER, sock, "1" if retain else "0"], check=True,
                         capture_output=True, text=True, timeout=120)
    return float(out.stdout.strip())


def test_get_many_reuses_freed_heap_instead_of_faulting_per_page(daemon):
    retained = faults_per_mib(daemon.socket, True)
    left_alone = faults_per_mib(daemon.socket, False)
    assert left_alone > 128, left_alone      # glibc gave every batch back: a fault per 4 KiB
    assert retained < 32, retained           # the next batch reuses the freed heap
