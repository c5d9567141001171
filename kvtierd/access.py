"""Who may talk to the daemon, and which namespaces they may open.

Two layers, both cheap:

1. The filesystem: the socket (and the shared-memory regions) get
   `server.socket_mode` and `server.socket_group`, so only that group can even
   connect. `apply_socket_mode()` does this with errors that say what to fix.
2. The kernel's word on the peer: on accept the server reads SO_PEERCRED
   (pid, uid, gid of the connecting process, which it cannot forge) and
   SO_PEERGROUPS (its supplementary groups, Linux >= 4.13), and
   `AccessPolicy.admit()` checks them against `access.allowed_uids/gids`.
   Supplementary groups matter: the usual setup is "users in group kvtierd",
   and that is rarely anyone's primary group.

Defaults: the daemon's own uid and gid are admitted; root always is. Namespace
rules (`access.namespaces`, prefix -> uids) are checked when a client opens a
namespace; the longest matching prefix decides, a namespace matching no prefix
is open to every admitted client (write `"" = [...]` to close the rest).

The policy is an immutable snapshot swapped whole on `reload()` (SIGHUP), so a
check running concurrently sees either the old rules or the new ones.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Protocol

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)      # Linux value; Python does not export it
_UCRED = struct.Struct("3i")                               # struct ucred: pid_t, uid_t, gid_t


class AccessError(PermissionError):
    """Socket permissions that could not be applied; the message says what to fix."""


class _HasSockopt(Protocol):
    def getsockopt(self, level: int, optname: int, buflen: int = ...) -> Any: ...


def peer_credentials(sock: _HasSockopt) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected AF_UNIX socket.

    Works on a socket.socket or asyncio's transport.get_extra_info('socket').
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def peer_groups(sock: _HasSockopt, max_groups: int = 256) -> tuple[int, ...]:
    """Supplementary gids of the peer (SO_PEERGROUPS); () where the kernel does not support it."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * max_groups)
    except OSError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


@dataclass(frozen=True)
class _Rules:
    uids: frozenset[int]
    gids: frozenset[int]
    prefixes: tuple[tuple[str, frozenset[int]], ...]      # longest prefix first


class AccessPolicy:
    """Admission by uid/gid and per-namespace rules, from the [access] config section."""

    def __init__(self, access_cfg: Any, own_uid: int | None = None, own_gid: int | None = None) -> None:
        self.own_uid = os.geteuid() if own_uid is None else own_uid
        self.own_gid = os.getegid() if own_gid is None else own_gid
        self._rules = self._build(access_cfg)

    def _build(self, cfg: Any) -> _Rules:
        uids = frozenset(cfg.allowed_uids) if cfg.allowed_uids else frozenset({self.own_uid})
        gids = frozenset(cfg.allowed_gids) if cfg.allowed_gids else frozenset({self.own_gid})
        ns = dict(cfg.namespaces or {})
        for prefix, allowed in ns.items():
            if not isinstance(prefix, str) or not all(isinstance(u, int) and u >= 0 for u in allowed):
                raise ValueError(f"access.namespaces: bad rule {prefix!r} = {allowed!r}")
        prefixes = tuple(sorted(((p, frozenset(u)) for p, u in ns.items()), key=lambda pu: -len(pu[0])))
        return _Rules(uids, gids, prefixes)

    def reload(self, access_cfg: Any) -> None:
        """Swap in new rules (SIGHUP). Open connections are not re-checked; new ones and new opens are."""
        self._rules = self._build(access_cfg)

    def admit(self, uid: int, gid: int, groups: Iterable[int] = ()) -> tuple[bool, str]:
        """(admitted, why) for a connecting peer; `groups` are its supplementary gids."""
        r = self._rules
        if uid == 0:
            return True, "root"
        if uid in r.uids:
            return True, f"uid {uid} allowed"
        if gid in r.gids:
            return True, f"gid {gid} allowed"
        for g in groups:
            if g in r.gids:
                return True, f"supplementary gid {g} allowed"
        return False, (f"uid {uid} gid {gid} is not in access.allowed_uids {sorted(r.uids)} "
                       f"nor access.allowed_gids {sorted(r.gids)}")

    def may_open(self, namespace: str, uid: int) -> bool:
        """Whether `uid` may open `namespace` (root and the daemon's own uid always may)."""
        if uid == 0 or uid == self.own_uid:
            return True
        for prefix, uids in self._rules.prefixes:
            if namespace.startswith(prefix):
                return uid in uids
        return True

    def why_not(self, namespace: str, uid: int) -> str:
        """The refusal message for a may_open() that returned False."""
        for prefix, uids in self._rules.prefixes:
            if namespace.startswith(prefix):
                return (f"namespace {namespace!r} matches access.namespaces prefix {prefix!r}, "
                        f"which allows uids {sorted(uids)}, not {uid}")
        return f"uid {uid} may open {namespace!r}"


def apply_socket_mode(path: str | os.PathLike[str], mode: int, group_name: str = "") -> None:
    """chmod `path` to `mode` and, if `group_name`, chgrp it; AccessError says what went wrong.

    Used for the Unix socket and the shared-memory region files alike.
    """
    if not 0 <= mode <= 0o777:
        raise AccessError(f"server.socket_mode {mode:o} is not a permission mode (0..0777)")
    if group_name:
        try:
            gid = grp.getgrnam(group_name).gr_gid
        except KeyError:
            raise AccessError(f"server.socket_group: no group named {group_name!r} on this system "
                              f"(create it with `groupadd {group_name}` or leave the key empty)") from None
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise AccessError(f"cannot give {path} to group {group_name!r}: the daemon (uid {os.geteuid()}) is "
                              f"neither root nor a member of that group") from None
        except FileNotFoundError:
            raise AccessError(f"cannot set the group of {path}: it does not exist") from None
    try:
        os.chmod(path, mode)
    except FileNotFoundError:
        raise AccessError(f"cannot set the mode of {path}: it does not exist") from None
    except PermissionError:
        raise AccessError(f"cannot chmod {path} to {mode:04o}: not owned by the daemon (uid {os.geteuid()})") from None


def bind_unix_listener(path: str | os.PathLike[str], mode: int, group_name: str = "",
                       backlog: int = 512) -> socket.socket:
    """A listening AF_UNIX socket at `path` whose mode and group are set before it accepts anyone.

    bind() creates the file with the process umask; only after apply_socket_mode()
    do we listen(), so no client can connect through looser permissions in between.
    A stale socket file (nobody listening) is replaced; a live one is an error.
    """
    path = os.fspath(path)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise AccessError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)             # left behind by a daemon that died
        except OSError as e:
            raise AccessError(f"{path} exists and cannot be probed ({e}); remove it if no daemon uses it") from None
        else:
            raise AccessError(f"another daemon is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        apply_socket_mode(path, mode, group_name)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
