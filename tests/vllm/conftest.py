"""Fixtures of the vLLM integration tests: a tiny model, real vLLM engines, a real daemon.

These tests need vLLM (scripts/setup_vllm.sh builds the venv they run in; scripts/test.sh
runs them there after the core suite). Where vLLM is not installed the whole directory is
left out of collection, so the core suite stays fast and vLLM-free.

Engines are expensive (20-60 s to start on CPU), so one set serves the session:
`baseline` (no kvtierd: the reference outputs), and `a` and `b`, two engine processes
with the connector that share blocks only through the daemon. They start before the
daemon exists, so the first requests also show that a missing daemon costs nothing
but hits. Tests use fresh random prompts, so vLLM's own prefix cache never answers
for kvtierd.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:   # origin None: only this directory, seen as a namespace package
    collect_ignore_glob = ["test_*.py"]

BLOCK = 32            # vLLM block size of the test engines (CPU needs a multiple of 32)
PAGE_BYTES = 1 * BLOCK * 64 * 4     # one layer's page: 1 KV head x 32 tokens x (K+V: 2x32) x float32
BLOCK_BYTES = 2 * PAGE_BYTES        # 2 layers


@pytest.fixture
def start_daemon(start_daemon, tmp_path):
    """tests/conftest.py's start_daemon with the host region in a private /dev/shm directory
    (a daemon elsewhere on the machine then cannot mistake it for a stale one)."""
    shm = Path("/dev/shm") / f"kvtierd-vllm-unit-{os.getpid()}-{tmp_path.name}"
    shm.mkdir(exist_ok=True)

    def start(*args: str, **kw):
        return start_daemon(*args, "--set", f"host.shm_dir={shm}", **kw)

    yield start
    shutil.rmtree(shm, ignore_errors=True)   # before the daemons stop: they unlink with missing_ok


@pytest.fixture
def daemon(start_daemon):
    return start_daemon()


class Engine:
    """One engine_proc.py process; `generate` sends a request and waits for the answer."""

    def __init__(self, name: str, model: Path, cfg: dict, log_dir: Path, env: dict):
        self.name = name
        self.log_path = log_dir / f"engine-{name}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "engine_proc.py"), str(model), json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, cwd=HERE.parents[1])
        self.lines: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("@@kvt "):
                self.lines.put(json.loads(line[6:]))
            else:
                self._log.write(line)
                self._log.flush()
        self.lines.put(None)

    def next(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"engine {self.name} did not answer within {timeout:.0f} s; log: {self.log_path}"
                                 f"\n{self.tail()}") from None
        if msg is None:
            raise AssertionError(f"engine {self.name} exited ({self.proc.poll()}); log:\n{self.tail()}")
        return msg

    def tail(self, n: int = 60) -> str:
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])

    def send(self, prompts: list[list[int]], salt: str | None = None, max_tokens: int = 6) -> None:
        req = {"prompts": [{"ids": p, "salt": salt} for p in prompts], "max_tokens": max_tokens}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 120.0) -> list[dict]:
        while True:
            msg = self.next(timeout)
            if "outputs" in msg:
                return msg["outputs"]

    def generate(self, prompts: list[list[int]], salt: str | None = None, max_tokens: int = 6) -> list[dict]:
        self.send(prompts, salt, max_tokens)
        return self.result()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._reader.join(30)          # the reader writes the log until the pipe closes
        self._log.close()


def prompt(seed: str | int, n: int) -> list[int]:
    """n random token ids (3..255: no BOS/EOS) from a seed: every test gets its own prompts."""
    rng = random.Random(f"kvtierd-vllm-{seed}")
    return [rng.randrange(3, 256) for _ in range(n)]


def same_output(got: dict, want: dict, tol: float = 1e-4) -> bool:
    """Equal greedy tokens, and logprobs equal up to float32 rounding of a different prefill split."""
    return got["tokens"] == want["tokens"] and all(
        abs(a - b) <= tol for a, b in zip(got["logprobs"], want["logprobs"], strict=True))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    sys.path.insert(0, str(HERE))
    from make_model import make_tiny_llama
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


def _daemon_process_class():
    """tests/conftest.py's DaemonProcess (loaded by path: both conftest modules are named 'conftest')."""
    spec = importlib.util.spec_from_file_location("kvtierd_root_conftest", HERE.parent / "conftest.py")
    mod = sys.modules.get(spec.name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod.DaemonProcess


class VllmDaemon:
    """The session's daemon: fixed socket and state dir (so engines can find it again after a
    restart), a private shared-memory dir, a disk tier for the restart tests."""

    def __init__(self, root: Path):
        self.root = root
        self.shm = Path("/dev/shm") / f"kvtierd-vllm-test-{os.getpid()}"
        self.shm.mkdir(exist_ok=True)
        self.args = ["--host-bytes", "64MiB", "--disk-bytes", "256MiB", "--metrics-address", "",
                     "--set", f"host.shm_dir={self.shm}", "--set", "disk.segment_bytes=8MiB"]
        self.proc = _daemon_process_class()(root, self.args)
        self.socket = self.proc.socket

    def start(self) -> "VllmDaemon":
        self.proc = _daemon_process_class()(self.root, self.args)
        self.proc.start()
        return self

    def stop(self) -> None:
        self.proc.stop()

    def kill(self) -> None:
        self.proc.kill()

    def running(self) -> bool:
        return self.proc.proc is not None and self.proc.proc.poll() is None

    def client(self):
        return self.proc.client()

    def cleanup(self) -> None:
        if self.running():
            self.proc.stop()
        shutil.rmtree(self.shm, ignore_errors=True)


class Engines:
    def __init__(self, baseline: Engine, a: Engine, b: Engine, daemon: VllmDaemon, before_daemon: dict):
        self.baseline, self.a, self.b, self.daemon = baseline, a, b, daemon
        self.before_daemon = before_daemon
        self._reference: dict[tuple, dict] = {}

    def reference(self, ids: list[int], max_tokens: int = 6) -> dict:
        key = (tuple(ids), max_tokens)
        if key not in self._reference:
            self._reference[key] = self.baseline.generate([ids], max_tokens=max_tokens)[0]
        return self._reference[key]


def wait_until(cond, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="session")
def engines(model_dir, tmp_path_factory) -> Engines:
    root = tmp_path_factory.mktemp("kvtierd")
    daemon = VllmDaemon(root)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONUNBUFFERED="1", VLLM_LOGGING_LEVEL="INFO")
    env.pop("PYTHONHASHSEED", None)   # sha256 block hashes need no seed to agree across engines
    kv = {"socket": daemon.socket, "retry_s": 0.2}
    logs = root
    started = [Engine("baseline", model_dir, {"kvtierd": None}, logs, env),
               Engine("a", model_dir, {"kvtierd": kv}, logs, env),
               Engine("b", model_dir, {"kvtierd": kv}, logs, env)]
    try:
        for e in started:
            e.next(timeout=420)      # ready (three engines start at once on two cores)
        # The daemon is not running yet: the connector must serve with no hits and no errors.
        ids = prompt("daemon-down", 200)
        before = {"a": started[1].generate([ids])[0], "a_again": started[1].generate([ids + [7, 8]])[0],
                  "ids": ids}
        daemon.start()
        yield Engines(*started, daemon, before)
    finally:
        for e in started:
            e.close()
        daemon.cleanup()
