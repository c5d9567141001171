"""systemd integration without libsystemd: sd_notify, the watchdog, socket activation.

The notify protocol is one datagram of newline-separated KEY=VALUE lines sent to
the AF_UNIX socket named in $NOTIFY_SOCKET (a path, or '@name' for an abstract
socket). Outside systemd the variable is absent and every call is a cheap no-op
returning False, so the daemon calls these unconditionally.

Watchdog: with WatchdogSec= systemd sets WATCHDOG_USEC (and WATCHDOG_PID); the
service must send WATCHDOG=1 more often than that or be killed and restarted.
We ping from an asyncio task at half the interval, so a wedged event loop
stops the pings: the watchdog measures what matters, not just "the process
exists". An optional health callback can withhold a ping too.

Socket activation: systemd passes listening sockets as fds 3.. and sets
LISTEN_PID (must be us), LISTEN_FDS (how many) and LISTEN_FDNAMES. We unset the
variables after reading them so a child process never adopts our sockets.

Reload: RELOADING=1 with MONOTONIC_USEC before re-reading config, READY=1 after
(what Type=notify-reload expects; harmless under plain Type=notify).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Callable, Mapping, MutableMapping

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class SystemdError(ValueError):
    """An environment variable from systemd that cannot be understood."""


def _notify_address(env: Mapping[str, str]) -> str | None:
    path = env.get("NOTIFY_SOCKET", "")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]          # abstract namespace
    if path.startswith("/"):
        return path
    log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract '@' name; not notifying systemd", path)
    return None


def notify(msg: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification (e.g. 'READY=1\\nSTATUS=up'); False when not under systemd or it failed."""
    addr = _notify_address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode("utf-8"))
    except OSError as e:
        log.warning("sd_notify(%s) to %r failed: %s", msg.split("\n", 1)[0], addr.lstrip("\0"), e)
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def ready(status_text: str | None = None) -> bool:
    """Startup (or a reload) finished: systemd marks the unit active."""
    return notify("READY=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def status(text: str) -> bool:
    """Free-form status shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}")


def stopping(status_text: str | None = None) -> bool:
    """Shutdown began (SIGTERM): systemd shows 'deactivating' while we drain."""
    return notify("STOPPING=1" + (f"\nSTATUS={_one_line(status_text)}" if status_text else ""))


def reloading() -> bool:
    """A reload (SIGHUP) began; send ready() when it is done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def extend_timeout(seconds: float) -> bool:
    """Ask for more start/stop time (long disk recovery): EXTEND_TIMEOUT_USEC."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds when systemd expects pings from this process, else None."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    try:
        n = int(usec)
    except ValueError:
        raise SystemdError(f"WATCHDOG_USEC={usec!r} is not an integer") from None
    if n <= 0:
        raise SystemdError(f"WATCHDOG_USEC={usec!r} must be positive")
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None             # meant for another process (e.g. our parent)
        except ValueError:
            raise SystemdError(f"WATCHDOG_PID={pid!r} is not an integer") from None
    return n / 1e6


async def watchdog_loop(interval_s: float, healthy: Callable[[], bool] | None = None) -> None:
    """Ping WATCHDOG=1 every interval_s/2 while `healthy()` (if given) returns True. Runs until cancelled."""
    period = interval_s / 2
    while True:
        ok = True
        if healthy is not None:
            try:
                ok = bool(healthy())
            except Exception:
                log.exception("watchdog health check raised; withholding the ping")
                ok = False
        if ok:
            watchdog_ping()
        else:
            log.warning("watchdog health check failed; not pinging systemd")
        await asyncio.sleep(period)


def start_watchdog(healthy: Callable[[], bool] | None = None) -> asyncio.Task[None] | None:
    """Start the ping task on the running loop if systemd asked for pings; the caller cancels it at exit."""
    interval = watchdog_interval()
    if interval is None:
        return None
    log.info("systemd watchdog: %.1f s, pinging every %.1f s", interval, interval / 2)
    return asyncio.get_running_loop().create_task(watchdog_loop(interval, healthy), name="systemd-watchdog")


def listen_fds_with_names(unset_env: bool = True,
                          env: MutableMapping[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """Sockets passed by systemd socket activation, with their FileDescriptorName= (or 'unknown')."""
    env = os.environ if env is None else env
    try:
        pid_s, n_s = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
        names_s = env.get("LISTEN_FDNAMES")
        if not pid_s or not n_s:
            return []
        try:
            pid, n = int(pid_s), int(n_s)
        except ValueError:
            raise SystemdError(f"LISTEN_PID={pid_s!r} / LISTEN_FDS={n_s!r} are not integers") from None
        if pid != os.getpid():
            return []                   # inherited from a parent that was activated, not us
        if n < 0 or n > 1024:
            raise SystemdError(f"LISTEN_FDS={n} is out of range")
        names = names_s.split(":") if names_s else []
        if names and len(names) != n:
            log.warning("LISTEN_FDNAMES has %d names for %d fds; ignoring the names", len(names), n)
            names = []
        out = []
        for i in range(n):
            fd = SD_LISTEN_FDS_START + i
            try:
                os.set_inheritable(fd, False)
                sock = socket.socket(fileno=fd)     # family and type read from the fd
            except OSError as e:
                raise SystemdError(f"fd {fd} passed by systemd is not a usable socket: {e}") from None
            out.append((names[i] if names else "unknown", sock))
        return out
    finally:
        if unset_env:
            for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(key, None)


def listen_fds(unset_env: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd socket activation (fd 3..), in order; [] when not socket-activated."""
    return [s for _, s in listen_fds_with_names(unset_env)]


def activated_unix_listener(expected_path: str | None = None,
                            sockets: list[socket.socket] | None = None) -> socket.socket | None:
    """The socket-activated AF_UNIX stream listener, if any; warns when its path is not the configured one.

    The daemon then serves on it (asyncio.start_unix_server(sock=...)) instead of binding.
    Other activated sockets are closed: we have no use for them. `sockets` defaults to listen_fds().
    """
    found = None
    for sock in listen_fds() if sockets is None else sockets:
        if found is None and sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
            found = sock
        else:
            log.warning("ignoring socket-activated fd %d (family %s, type %s)", sock.fileno(), sock.family, sock.type)
            sock.close()
    if found is not None:
        name = found.getsockname()
        path = name.decode(errors="replace") if isinstance(name, bytes) else name
        if expected_path and path != expected_path:
            log.warning("socket activation gave %s but server.socket is %s; serving on %s", path, expected_path, path)
        found.setblocking(False)
    return found
