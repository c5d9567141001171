"""Torture (e): 64 peers announcing huge frames and 2,000 idle connections; a new client is still served.

    python tests/torture/idle_flood.py [--idle 2000] [--big 64] [--memory-cap 2GiB]

First 64 peers each send a 4-byte length header announcing a frame of
server.max_frame_bytes (the daemon's default, 64 MiB) plus a few bytes, then go
quiet; then 2,000 connections open and never say hello. Then a new client
connects, says hello, stores and reads a block: it must be served within 1 s, and
the daemon's own memory (resident minus the mapped host region) must stay under
512 MiB throughout. The run stops sending headers early if the daemon's memory
passes --memory-cap, so a daemon that allocates per announced frame cannot take
the machine down with it. The flood comes from a child process running as another uid
(65534, "nobody"; the daemon's socket is made world-writable for it), as a tenant
misbehaving on a shared node would: the per-uid connection limit and the hello
deadline must keep it from locking out the new client, which runs as this uid.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import daemon, memory, mib, raise_fd_limit, verdict

from kvtierd import Client
from kvtierd.config import parse_size

LIMIT = 512 << 20


def new_client_round_trip(path: str) -> tuple[float, str]:
    """Seconds for connect + hello + open + put + get of one block, and what went wrong (or "")."""
    t = time.monotonic()
    try:
        with Client(path, timeout=5.0) as c:
            ns = c.namespace("flood-probe", block_size=4096)
            ns.put_many([b"probe"], [b"p" * 4096])
            if ns.get_many([b"probe"]) != [b"p" * 4096]:
                return time.monotonic() - t, "read back wrong bytes"
    except Exception as e:
        return time.monotonic() - t, f"{type(e).__name__}: {e}"
    return time.monotonic() - t, ""


def settled_memory(pid: int, timeout: float = 1.0) -> int:
    """The daemon's private memory once two samples 50 ms apart agree within 1 MiB (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    last = memory(pid)["private"]
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = memory(pid)["private"]
        if abs(now - last) < 1 << 20:
            return now
        last = now
    return last


def refused(socks: list[socket.socket]) -> int:
    """Connections the daemon has closed or answered (an idle peer gets neither unless refused)."""
    n = 0
    for s in socks:
        try:
            n += s.recv(4096, socket.MSG_DONTWAIT) is not None
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


def _flood(path: str, max_frame: int, n_big: int, n_idle: int, cap: int, daemon_pid: int,
           ready_w: int, stop_r: int) -> int:
    """In the child, as uid 65534: open the flood, report it on ready_w, hold it until stop_r closes."""
    out = {"big": 0, "idle": 0, "errors": [], "peak": 0, "capped": False}
    try:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        big: list[socket.socket] = []
        idle: list[socket.socket] = []
        for _ in range(n_big):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(struct.pack("<I", max_frame) + b"\x93" + b"\0" * 15)
            big.append(s)
            # Let the daemon's memory settle (it may fill a buffer for the announced frame over many
            # milliseconds) so the cap below sees what this header cost.
            out["peak"] = max(out["peak"], settled_memory(daemon_pid))
            if out["peak"] > cap:
                out["capped"] = True
                break
        for _ in range(n_idle):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(path)
            except OSError as e:
                out["errors"].append(f"connect {len(idle) + 1} failed: {e}")
                break
            idle.append(s)
        out["big"], out["idle"] = len(big), len(idle)
        time.sleep(0.5)
        out["refused_big"], out["refused_idle"] = refused(big), refused(idle)
    except Exception as e:   # reported to the parent, which fails the run
        out["errors"].append(f"flood: {type(e).__name__}: {e}")
    os.write(ready_w, (json.dumps(out) + "\n").encode())
    os.read(stop_r, 1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--big", type=int, default=64)
    ap.add_argument("--memory-cap", default="2GiB")
    a = ap.parse_args()
    cap = parse_size(a.memory_cap)
    raise_fd_limit(a.idle + a.big + 1000)
    tmp = Path(tempfile.mkdtemp(prefix="kvtierd-torture-"))
    tmp.chmod(0o755)                        # the other uid must reach the socket
    d = daemon(["--host-bytes", "64MiB", "--set", "server.socket_mode=0666", "--set", "access.allowed_uids=0,65534"],
               tmp)
    problems: list[str] = []
    peak = 0
    capped = False
    flood = {"big": 0, "idle": 0, "refused_big": 0, "refused_idle": 0, "errors": []}
    child = -1
    try:
        with d.client() as c:
            max_frame = c.server_info["max_frame_bytes"]
        base = memory(d.proc.pid)["private"]
        ready_r, ready_w = os.pipe()
        stop_r, stop_w = os.pipe()
        child = os.fork()
        if child == 0:                      # the flooding tenant
            os.close(ready_r)
            os.close(stop_w)
            os._exit(_flood(d.socket, max_frame, a.big, a.idle, cap, d.proc.pid, ready_w, stop_r))
        os.close(ready_w)
        os.close(stop_r)
        with os.fdopen(ready_r) as f:
            line = f.readline()
        if line:
            flood.update(json.loads(line))
        problems += flood["errors"]
        capped = flood.get("capped", False)
        peak = max(peak, flood.get("peak", 0))
        time.sleep(0.5)          # the accepts (and any refusals) happen on the daemon's loop
        peak = max(peak, memory(d.proc.pid)["private"])
        took, err = new_client_round_trip(d.socket)
        ping = subprocess.run([sys.executable, "-m", "kvtierd", "ping", "--socket", d.socket],
                              capture_output=True, text=True, timeout=30)
        ping_says = ((ping.stdout + ping.stderr).strip().splitlines() or [""])[-1][:200]   # its last line
        peak = max(peak, memory(d.proc.pid)["private"])
        os.close(stop_w)                    # the flood may end now
        _, status = os.waitpid(child, 0)
        child = -1
        refused_big, refused_idle = flood["refused_big"], flood["refused_idle"]
        alive = d.proc.poll() is None
        if err or took > 1.0:
            problems.append(f"new client: {err or 'served'} after {took:.2f} s")
        if peak > LIMIT:
            problems.append(f"daemon memory beyond the host region reached {mib(peak)} (limit {mib(LIMIT)})"
                            + (f"; stopped after {flood['big']} big headers at the {mib(cap)} cap" if capped else ""))
        if not alive:
            problems.append(f"daemon exited with {d.proc.returncode}")
    finally:
        if child > 0:
            os.kill(child, 9)
            os.waitpid(child, 0)
        d.stop()
    for p in problems:
        print("problem:", p)
    return verdict("idle-flood", not problems,
                   f"{flood['big']} big headers ({refused_big} refused or closed), {flood['idle']} idle connections "
                   f"({refused_idle} refused or closed); new client {'served' if not err else 'FAILED'} in "
                   f"{took:.2f} s; daemon private memory {mib(base)} -> peak {mib(peak)}; "
                   f"`kvtierd ping` said: {ping_says!r}; log {d.log_path}")


if __name__ == "__main__":
    sys.exit(main())
