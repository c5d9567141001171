"""The worker copy path through a real daemon on CPU: one process stores its paged
KV cache, another loads it into a poisoned cache, every byte compared."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

WORKER = str(Path(__file__).with_name("worker_process.py"))


def run_worker(daemon, *args):
    r = subprocess.run([sys.executable, WORKER, daemon.socket, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_pages_stored_by_one_worker_load_byte_for_byte_in_another(daemon):
    stored = run_worker(daemon, "store", "cpu", "11")
    assert stored["stored"] == 32 and stored["tiers"] == ["host"] * 32
    loaded = run_worker(daemon, "load", "cpu", "11")
    assert loaded == {"loaded": 32, "equal": True}
    # Storing again writes nothing new.
    assert run_worker(daemon, "store", "cpu", "11")["stored"] == 0


def test_a_daemon_without_hbm_serves_hbm_requests_from_host(daemon):
    assert run_worker(daemon, "store", "cpu", "5", "hbm")["tiers"] == ["host"] * 32
    assert run_worker(daemon, "load", "cpu", "5", "hbm") == {"loaded": 32, "equal": True}


def test_layout_and_namespace_must_agree(daemon):
    from kvtierd.gpu.paged import PagedCopier, PagedLayout
    layers = [(torch.zeros(8, 4, 2, 8), torch.zeros(8, 4, 2, 8))]
    copier = PagedCopier(PagedLayout.from_layers(layers, pages_per_block=1))
    with daemon.client() as c:
        ns = c.namespace("other-size", block_size=1000)
        with pytest.raises(ValueError, match="block size"):
            ns.store_pages(copier, [0], [b"k"])
        ns2 = c.namespace("right-size", block_size=copier.layout.block_bytes)
        with pytest.raises(ValueError, match="page ids"):
            ns2.store_pages(copier, [0, 1], [b"k"])
        assert c.stats()["reservations"] == 0
