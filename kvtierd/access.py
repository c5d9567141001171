"""Who may talk to the daemon, which namespaces they may open, which regions they get.

Three layers, each failing closed:

1. The filesystem: the socket gets `server.socket_mode` and `server.socket_group`
   (`bind_unix_listener()`), so only that group can even connect. The host
   regions are memfds with no path, so modes do not apply to them.
2. The kernel's word on the peer: on accept the server reads SO_PEERCRED
   (pid, uid, gid of the connecting process, which it cannot forge) and
   SO_PEERGROUPS (its supplementary groups), and `admit_peer()` checks them
   against `access.allowed_uids/gids`. No socket or no credentials: refused.
3. Namespaces and domains: `access.namespaces` (prefix -> uids) decides who may
   open a namespace; `access.domains` groups namespaces (by prefix) into access
   domains, each with its own host region. A client receives the region fds of
   exactly the domains holding a namespace its uid may open (`domains_for()`),
   the HBM pool's IPC handle only with the default domain, and sees in STATS and
   HOT only namespaces it may open (`filter_stats()`, `filter_hot()`).

Prefixes match whole path segments: "tenant-a" (or "tenant-a/") matches
"tenant-a" and "tenant-a/x", not "tenant-ab"; "" matches everything. The
longest matching rule decides; a namespace matching no rule is open to every
admitted client (write `"" = [...]` to close the rest). Root and the daemon's
own uid may open everything.

The policy is an immutable snapshot swapped whole on `reload()` (SIGHUP), so a
check running concurrently sees either the old rules or the new ones. Domains
are fixed at start (each is a region of memory); rules may change live.
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


DEFAULT_DOMAIN = "default"


def prefix_matches(prefix: str, name: str) -> bool:
    """Whether namespace `name` lies under `prefix`, by whole path segments."""
    p = prefix.rstrip("/")
    return not p or name == p or name.startswith(p + "/")


@dataclass(frozen=True)
class _Rules:
    uids: frozenset[int]
    gids: frozenset[int]
    prefixes: tuple[tuple[str, frozenset[int]], ...]      # longest prefix first
    domain_users: dict[str, frozenset[int] | None]        # domain -> uids that may open one of its
                                                          # namespaces; None: every admitted uid


class AccessPolicy:
    """Admission by uid/gid, per-namespace rules and domains, from the [access] config section."""

    def __init__(self, access_cfg: Any, own_uid: int | None = None, own_gid: int | None = None) -> None:
        self.own_uid = os.geteuid() if own_uid is None else own_uid
        self.own_gid = os.getegid() if own_gid is None else own_gid
        # Domains are fixed for the daemon's life: each one is a region of memory.
        doms = dict(getattr(access_cfg, "domains", None) or {})
        self.domain_prefixes: tuple[tuple[str, str], ...] = tuple(sorted(
            ((p.rstrip("/"), name) for name, d in doms.items() for p in d["namespaces"]),
            key=lambda pn: -len(pn[0])))
        self.domains: tuple[str, ...] = (DEFAULT_DOMAIN, *doms)
        self._rules = self._build(access_cfg)

    def _build(self, cfg: Any) -> _Rules:
        uids = frozenset(cfg.allowed_uids) if cfg.allowed_uids else frozenset({self.own_uid})
        gids = frozenset(cfg.allowed_gids) if cfg.allowed_gids else frozenset({self.own_gid})
        ns = dict(cfg.namespaces or {})
        for prefix, allowed in ns.items():
            if not isinstance(prefix, str) or not all(isinstance(u, int) and u >= 0 for u in allowed):
                raise ValueError(f"access.namespaces: bad rule {prefix!r} = {allowed!r}")
        merged: dict[str, set[int]] = {}
        for p, u in ns.items():                 # "tenant-a" and "tenant-a/" are one rule
            merged.setdefault(p.rstrip("/"), set()).update(u)
        prefixes = tuple(sorted(((p, frozenset(u)) for p, u in merged.items()), key=lambda pu: -len(pu[0])))
        return _Rules(uids, gids, prefixes, self._domain_users(prefixes))

    def _domain_users(self, prefixes: tuple[tuple[str, frozenset[int]], ...]) -> dict[str, frozenset[int] | None]:
        """Who may open at least one namespace of each domain (computed once per rule set).

        Namespaces under a domain prefix p are governed either by the longest rule
        above p (which also governs namespace p itself) or by a rule below p whose
        namespaces stay in this domain; the union of those is exact.
        """
        out: dict[str, frozenset[int] | None] = {}
        roots: dict[str, list[str]] = {DEFAULT_DOMAIN: [""]}
        for p, name in self.domain_prefixes:
            roots.setdefault(name, []).append(p)
        for name in self.domains:
            users: set[int] = set()
            everyone = False
            for root in roots.get(name, []):
                above = next((u for p, u in prefixes if prefix_matches(p, root)), None)
                if above is None:
                    everyone = True
                else:
                    users |= above
                for p, u in prefixes:
                    if p != root and prefix_matches(root, p) and self.domain_of(p) == name:
                        users |= u
            out[name] = None if everyone else frozenset(users)
        return out

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

    def admit_peer(self, sock: _HasSockopt | None) -> tuple[bool, str, tuple[int, int, int] | None]:
        """(admitted, why, (pid, uid, gid) or None where unreadable) for a connected peer.

        Fails closed: no socket object, or credentials the kernel will not give, refuse.
        """
        if sock is None:
            return False, "the connection has no socket to read peer credentials from", None
        try:
            creds = peer_credentials(sock)
        except (OSError, AttributeError, TypeError, struct.error) as e:
            return False, f"cannot read the peer's credentials ({e})", None
        if creds[1] < 0 or creds[2] < 0:
            return False, "the kernel gave no credentials for the peer", creds
        ok, why = self.admit(creds[1], creds[2], peer_groups(sock))
        return ok, why, creds

    def _trusted(self, uid: int) -> bool:
        return uid == 0 or uid == self.own_uid

    def may_open(self, namespace: str, uid: int) -> bool:
        """Whether `uid` may open `namespace` (root and the daemon's own uid always may)."""
        if self._trusted(uid):
            return True
        for prefix, uids in self._rules.prefixes:
            if prefix_matches(prefix, namespace):
                return uid in uids
        return True

    def why_not(self, namespace: str, uid: int) -> str:
        """The refusal message for a may_open() that returned False."""
        for prefix, uids in self._rules.prefixes:
            if prefix_matches(prefix, namespace):
                return (f"namespace {namespace!r} matches access.namespaces prefix {prefix!r}, "
                        f"which allows uids {sorted(uids)}, not {uid}")
        return f"uid {uid} may open {namespace!r}"

    def domain_of(self, namespace: str) -> str:
        """The access domain whose region holds `namespace`'s blocks (longest prefix; else default)."""
        for prefix, name in self.domain_prefixes:
            if prefix_matches(prefix, namespace):
                return name
        return DEFAULT_DOMAIN

    def domains_for(self, uid: int) -> list[str]:
        """The domains whose regions `uid` receives: those holding a namespace it may open."""
        if self._trusted(uid):
            return list(self.domains)
        users = self._rules.domain_users
        return [d for d in self.domains if users[d] is None or uid in users[d]]

    def filter_stats(self, stats: dict, uid: int) -> dict:
        """STATS as `uid` may see it: only namespaces it may open, only its domains."""
        if self._trusted(uid):
            return stats
        out = dict(stats)
        out["namespaces"] = [n for n in stats.get("namespaces", []) if self.may_open(n["name"], uid)]
        if "domains" in stats:
            mine = set(self.domains_for(uid))
            out["domains"] = {d: v for d, v in stats["domains"].items() if d in mine}
        return out

    def filter_hot(self, hot: dict, uid: int) -> dict:
        """HOT as `uid` may see it: only namespaces it may open."""
        if self._trusted(uid):
            return hot
        return {ns: keys for ns, keys in hot.items() if self.may_open(ns, uid)}


def apply_socket_mode(path: str | os.PathLike[str], mode: int, group_name: str = "") -> None:
    """chmod `path` to `mode` and, if `group_name`, chgrp it; AccessError says what went wrong.

    Used for the Unix socket (host regions are memfds: no path, no mode).
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


class Gate:
    """The server's access hooks for admitted connections, from one policy and the store.

    Kept here so server.py only calls it: which regions and IPC handles a HELLO
    hands over, which domain an OPEN lands in, what STATS and HOT show.
    """

    def __init__(self, policy: AccessPolicy, store: Any) -> None:
        self.policy = policy
        self.store = store

    def hello(self, conn: Any, reply: dict) -> Any:
        """The HELLO reply with the fds of the peer's domains' regions attached."""
        from kvtierd.protocol import Code, ProtocolError
        from kvtierd.regions import WithFds, descriptors
        if getattr(conn, "regions_sent", False):
            # Once per connection: fds a peer never reads stay charged to the daemon's uid
            # (the kernel's limit on fds in flight), so a repeated HELLO could exhaust it.
            raise ProtocolError(Code.BAD_ARGS, "hello was already done on this connection")
        conn.regions_sent = True
        domains = [d for d in self.policy.domains_for(conn.uid) if d in self.store.regions]
        conn.domains = frozenset(domains)
        reply["host"], fds = descriptors([self.store.regions[d] for d in domains])
        # The HBM pool serves the default domain only: its IPC handle maps all of it.
        reply["hbm"] = self.store.hbm_descriptors() if DEFAULT_DOMAIN in conn.domains else []
        return WithFds(reply, fds)

    def domain_for_open(self, conn: Any, name: str) -> str:
        """The domain of namespace `name`, which this connection must have received at HELLO."""
        from kvtierd.protocol import Code, ProtocolError
        domain = self.policy.domain_of(name)
        if domain not in conn.domains:
            # Rules changed (SIGHUP) after this connection's HELLO: it has no region for it.
            raise ProtocolError(Code.DENIED, f"namespace {name!r} is in access domain {domain!r}, whose region "
                                             f"this connection did not receive; reconnect")
        return domain

    def stats(self, conn: Any, stats: dict) -> dict:
        return self.policy.filter_stats(stats, conn.uid)

    def hot(self, conn: Any, hot: dict) -> dict:
        return self.policy.filter_hot(hot, conn.uid)
