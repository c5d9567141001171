"""What users install carries everything kvtierd needs: the wheel and the container image.

The CUDA kernels ship as source (kvtierd/native/*.cu, compiled at run time), so
a wheel or image without them imports fine and fails only on a GPU node. These
tests build the wheel the way the Dockerfile's build stage does, from the files
a Docker build context would hold (the checkout filtered by .dockerignore, with
Docker's own matching rules as docker-py implements them), and look inside.
No Docker engine is needed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from docker.utils.build import PatternMatcher

ROOT = Path(__file__).resolve().parents[1]
KERNELS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "kvtierd" / "native").glob("*.cu"))


def checkout_files() -> list[str]:
    """Files a clean checkout of this tree has: tracked or new, not ignored, not deleted."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, check=True, timeout=30).stdout
    return sorted({f for f in out.decode().split("\0") if f and (ROOT / f).is_file()})


def dockerignore_patterns() -> list[str]:
    # How the Docker CLI (and docker-py's build()) reads the file: one pattern per line, blanks and # comments out.
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def build_context() -> set[str]:
    """The files `docker build .` sends from a clean checkout of this tree."""
    excluded = PatternMatcher(dockerignore_patterns()).matches
    return {f for f in checkout_files() if not excluded(f)}


def dockerfile_copy_sources() -> list[str]:
    """Sources of every COPY from the build context (not --from another stage)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    sources = []
    for line in text.splitlines():
        if line.split()[:1] != ["COPY"]:
            continue
        parts = shlex.split(line)[1:]
        if any(p.startswith("--from") for p in parts):
            continue
        sources += [p for p in parts if not p.startswith("--")][:-1]
    return sources


def test_the_kernel_sources_live_inside_the_package_as_real_files():
    assert KERNELS == ["kvtierd/native/paged_copy.cu"]
    native = ROOT / "kvtierd" / "native"
    assert native.is_dir() and not native.is_symlink()
    from kvtierd.gpu import kernels
    assert kernels.source("paged_copy.cu") == (native / "paged_copy.cu").read_text()


def test_dockerignore_rules_are_read_the_way_docker_reads_them():
    # The matcher itself, on paths whose fate the rules decide unambiguously.
    excluded = PatternMatcher(dockerignore_patterns()).matches
    assert not excluded("kvtierd/native/paged_copy.cu")
    assert not excluded("kvtierd/__init__.py")
    assert excluded("tests/conftest.py") and excluded(".venv/bin/python") and excluded("bench/core.py")
    assert excluded("kvtierd/__pycache__/store.cpython-311.pyc")
    assert excluded("configs/kvtierd.service") and not excluded("configs/kvtierd.toml")


def test_every_file_the_dockerfile_copies_is_in_the_build_context():
    context = build_context()
    sources = dockerfile_copy_sources()
    assert "kvtierd" in sources and "pyproject.toml" in sources, sources
    for src in sources:
        src = src.rstrip("/")
        inside = sorted(f for f in context if f == src or f.startswith(src + "/"))
        assert inside, f"the Dockerfile copies {src}, but the build context has nothing there"
        if (ROOT / src).is_dir():
            # A directory COPY must bring every file of it a clean checkout has (bytecode aside).
            wanted = {f for f in checkout_files() if f.startswith(src + "/")}
            assert wanted - context == set(), f".dockerignore keeps {sorted(wanted - context)} out of the image"
    for kernel in KERNELS:
        assert kernel in context, f".dockerignore keeps {kernel} out of the image"


@pytest.fixture(scope="module")
def wheel_from_the_build_context(tmp_path_factory) -> Path:
    """The wheel the Dockerfile's build stage makes: `pip wheel .` over the build context only."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for f in build_context():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / f, src / f)
    out = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = out.glob("kvtierd-*.whl")
    return wheel


def test_the_wheel_carries_the_kernel_sources_byte_for_byte(wheel_from_the_build_context):
    with zipfile.ZipFile(wheel_from_the_build_context) as z:
        names = set(z.namelist())
        for kernel in KERNELS:
            assert kernel in names, f"{kernel} missing from {wheel_from_the_build_context.name}"
            assert z.read(kernel) == (ROOT / kernel).read_bytes()
        assert "kvtierd/gpu/kernels.py" in names
        assert not any(n.startswith(("tests/", "bench/", "native/")) for n in names)


def test_an_installed_wheel_finds_its_kernels(wheel_from_the_build_context, tmp_path):
    # Installed elsewhere, imported from there (not from this checkout), no $KVTIERD_NATIVE_DIR.
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-cache-dir",
                        "--target", str(target), str(wheel_from_the_build_context)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from kvtierd.gpu import kernels; "
             "print(kernels.__file__); print(len(kernels.source('paged_copy.cu')))")
    env = {k: v for k, v in os.environ.items() if k not in ("KVTIERD_NATIVE_DIR", "PYTHONPATH")}
    r = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    where, size = r.stdout.split()
    assert Path(where).resolve().is_relative_to(target.resolve())
    assert int(size) == len((ROOT / "kvtierd/native/paged_copy.cu").read_text())
