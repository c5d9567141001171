"""Fixtures of the engine-less vLLM 0.33 harness (tests/vllm033/).

vLLM 0.33 installs here only without its dependencies and has no CPU kernels,
so no engine can run; its Scheduler, config classes, connector factory and KV
cache allocation still do. scripts/setup_vllm033.sh builds the venv these tests
run in and scripts/test.sh runs them after the 0.32 engine tests. Anywhere
else (the core venv, the 0.32 venv) the directory is left out of collection.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _is_vllm_033() -> bool:
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:   # origin None: only a namespace package, not vLLM
        return False
    try:
        return importlib.metadata.version("vllm").startswith("0.33.")
    except importlib.metadata.PackageNotFoundError:
        return False


if not _is_vllm_033():
    collect_ignore_glob = ["test_*.py"]


def _daemon_process_class():
    """tests/conftest.py's DaemonProcess (loaded by path: both conftest modules are named 'conftest')."""
    spec = importlib.util.spec_from_file_location("kvtierd_root_conftest", HERE.parent / "conftest.py")
    mod = sys.modules.get(spec.name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod.DaemonProcess


@pytest.fixture
def daemon(tmp_path):
    """A real `kvtierd serve` on a tmp socket: host tier only, in a private /dev/shm directory."""
    shm = Path("/dev/shm") / f"kvtierd-vllm033-{os.getpid()}-{tmp_path.name}"
    shm.mkdir(exist_ok=True)
    d = _daemon_process_class()(tmp_path, ["--host-bytes", "64MiB", "--disk-bytes", "0", "--metrics-address", "",
                                           "--set", f"host.shm_dir={shm}"])
    d.start()
    yield d
    shutil.rmtree(shm, ignore_errors=True)   # before the daemon stops: it unlinks with missing_ok
    d.stop()
