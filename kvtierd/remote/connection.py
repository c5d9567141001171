"""Connecting to Redis or Valkey: a cluster or one server, found from the URL of any node.

`connect(cfg, seeds)` asks the first reachable node (the URL's, then the
nodes of the last topology seen) for `INFO cluster`; with cluster mode on it
builds a redis-py asyncio `RedisCluster` seeded with every known node, else a
plain `Redis`. Both use hiredis to parse replies (redis-py picks it up when
installed) and redis-py's own Python packer to send, which hands a
`memoryview` argument to the socket as it is, without copying it.

Replies are read from the socket READ_SIZE (1 MiB) at a time, not redis-py's
64 KiB: a read, a hiredis feed and a parse attempt per chunk are Python calls,
and at 1-4 MiB blocks the larger reads save 0.09-0.12 client CPU s/GB
(bench/README.md). Each connection's hiredis reader keeps up to
READ_BUFFER_KEEP bytes of buffer between replies (`KeepBufferParser`).
hiredis otherwise frees its buffer whenever it empties past 16 KiB, so every
block-sized reply grows a fresh one, and fresh pages cost a page fault each:
50-150 thousand minor faults per GB read when the allocator hands out fresh
pages, ~0.2 client CPU s/GB at 1 MiB, about what the tier's copy and xxh3
check of the payload cost. The price is that much memory per open connection
(a pipeline holds one per node).

redis-py's own retries are turned off (`Retry(NoBackoff(), 0)`): a retry
after a failed round would hold the caller for another timeout, and the tier
has its own answer to failure (a miss now, the circuit breaker, a probe that
reconnects). `Remote.execute` runs one pipeline without raising for errors of
single commands; a connection error or timeout of the round raises.

`Remote.probe` is what the breaker runs before letting traffic through again:
a fresh slot map from any reachable node, `cluster_state:ok`, and a PING to
every master. `Remote.refresh` re-reads the slot map after a failed round,
so that a replica promoted by a failover is found without waiting for a
probe.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from redis._parsers import _AsyncHiredisParser
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection, parse_url
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from kvtierd.config import RemoteConfig

log = logging.getLogger("kvtierd.remote")

PASSWORD_ENV = "KVTIERD_REMOTE_PASSWORD"
MAX_SEEDS = 64
READ_SIZE = 1 << 20            # bytes asked of the socket per read
READ_BUFFER_KEEP = 8 << 20     # a reply of a 4 MiB block and the read after it fit


class KeepBufferParser(_AsyncHiredisParser):
    """redis-py's hiredis parser, with a reader that keeps its buffer (up to READ_BUFFER_KEEP) between replies."""

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)
        self._reader.setmaxbuf(READ_BUFFER_KEEP)


def keep_read_buffers(client: Redis | RedisCluster) -> None:
    """Make the connections `client` opens from now on use KeepBufferParser (when hiredis is there)."""
    if not HIREDIS_AVAILABLE:
        return
    if isinstance(client, RedisCluster):
        # Nodes found later copy the manager's kwargs; the startup nodes have copies of their own.
        manager = client.nodes_manager
        for kwargs in [manager.connection_kwargs, *(n.connection_kwargs for n in manager.startup_nodes.values())]:
            kwargs["parser_class"] = KeepBufferParser
    else:
        client.connection_pool.connection_kwargs["parser_class"] = KeepBufferParser


def redact(url: str) -> str:
    """The URL without credentials, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


def client_options(cfg: RemoteConfig) -> tuple[tuple[str, int], dict[str, Any]]:
    """(host, port) of the URL, and the connection options every node gets."""
    parsed = parse_url(cfg.url)
    tls = parsed.pop("connection_class", None) is SSLConnection
    host, port = parsed.pop("host"), int(parsed.pop("port", 6379))
    parsed.pop("db", None)
    opts: dict[str, Any] = {
        "socket_connect_timeout": cfg.connect_timeout_s,
        "socket_timeout": cfg.op_timeout_s,
        "health_check_interval": 0,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
        "socket_read_size": READ_SIZE,
    }
    opts.update({k: v for k, v in parsed.items() if k in ("username", "password")})
    if cfg.username:
        opts["username"] = cfg.username
    password = cfg.password or os.environ.get(PASSWORD_ENV, "")
    if password:
        opts["password"] = password
    if tls:
        opts["ssl"] = True
        opts["ssl_cert_reqs"] = "required" if cfg.tls_verify else "none"
        opts["ssl_check_hostname"] = cfg.tls_verify
        if cfg.tls_ca_file:
            opts["ssl_ca_certs"] = cfg.tls_ca_file
        if cfg.tls_cert_file:
            opts["ssl_certfile"], opts["ssl_keyfile"] = cfg.tls_cert_file, cfg.tls_key_file
    return (host, port), opts


class Remote:
    """One connected client (cluster or single server) and what the tier needs of it."""

    def __init__(self, client: Redis | RedisCluster, cluster: bool) -> None:
        self.client = client
        self.cluster = cluster

    def nodes(self) -> list[tuple[str, int]]:
        """Every node of the current topology (seeds for a later reconnect)."""
        if not self.cluster:
            kw = self.client.connection_pool.connection_kwargs
            return [(kw["host"], int(kw["port"]))]
        return [(n.host, int(n.port)) for n in self.client.get_nodes()]

    def primaries(self) -> int:
        return len(self.client.get_primaries()) if self.cluster else 1

    async def execute(self, commands: list[tuple]) -> list[Any]:
        """One pipelined round; per-command errors come back as exception objects in the list."""
        pipe = self.client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        return await pipe.execute(raise_on_error=False)

    async def refresh(self) -> None:
        """Re-read the slot map (after a failover the promoted replica owns the slots)."""
        if self.cluster:
            await self.client.nodes_manager.initialize()

    async def probe(self) -> None:
        """Raises unless every master answers and the cluster says it is whole."""
        if not self.cluster:
            await self.client.ping()
            return
        await self.client.nodes_manager.initialize()
        primaries = self.client.get_primaries()
        info = await self.client.execute_command("CLUSTER INFO", target_nodes=primaries[0])
        state = info.get("cluster_state") if isinstance(info, dict) else None
        if state != "ok":
            raise ConnectionError(f"cluster_state is {state!r}")
        await asyncio.gather(*(self.client.execute_command("PING", target_nodes=n) for n in primaries))

    async def aclose(self) -> None:
        await self.client.aclose()


async def connect(cfg: RemoteConfig, seeds: list[tuple[str, int]] | None = None) -> Remote:
    """Discover the URL's server (or a seed) and connect to it; raises when none answers."""
    first, opts = client_options(cfg)
    candidates = [first] + [s for s in (seeds or []) if s != first][:MAX_SEEDS]
    error: Exception | None = None
    for host, port in candidates:
        probe = Redis(host=host, port=port, **opts)
        try:
            info = await probe.info("cluster")
        except Exception as e:        # unreachable, refused, auth: try the next node
            error = e
            continue
        finally:
            await probe.aclose()
        if not info.get("cluster_enabled"):
            client = Redis(host=host, port=port, max_connections=256, **opts)
            keep_read_buffers(client)
            return Remote(client, cluster=False)
        cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in candidates],
                               require_full_coverage=False, **opts)
        keep_read_buffers(cluster)
        try:
            await cluster.initialize()
        except Exception:
            await cluster.aclose()
            raise
        return Remote(cluster, cluster=True)
    raise ConnectionError(f"no Redis node answered at {redact(cfg.url)} or {len(candidates) - 1} other known nodes: "
                          f"{error}")
