"""A connection to the daemon that survives the daemon: errors are caught, reconnects are bounded.

vLLM must keep serving when kvtierd is down or restarts, so neither half of
the connector lets a daemon error escape into the engine. `DaemonLink.get()`
returns a connected client or None; a failure marks the link broken
(`broken()`), and the next connect attempt waits out a backoff that doubles
from `retry_s` up to `max_retry_s`, so a dead daemon costs one failed
connect (a few microseconds for a missing Unix socket) per backoff period,
never one per request or per step. Namespaces are reopened after a
reconnect: a restarted daemon numbers them afresh.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from kvtierd.client import Client, KvtierdError

log = logging.getLogger("vllm.kvtierd")  # under vLLM's logger, so its handlers print it

# What a daemon that died, restarted, hung or refused can raise through the client.
DAEMON_ERRORS = (OSError, ConnectionError, TimeoutError, KvtierdError, EOFError, ValueError)


class Unavailable(Exception):
    """The daemon cannot be reached now (the link is backing off)."""


class DaemonLink:
    def __init__(self, socket_path: str | None, timeout_s: float, name: str,
                 retry_s: float = 1.0, max_retry_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.name = name
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self.clock = clock
        self.client: Client | None = None
        self._backoff = 0.0
        self._next_try = 0.0
        self._namespaces: dict[str, Any] = {}
        self.connects = 0          # successful connects (the first one included)
        self.failures = 0          # failed connects and broken connections
        self._down_logged = False

    def get(self) -> Client | None:
        """A connected client, or None while the daemon is unreachable (at most one attempt per backoff)."""
        if self.client is not None:
            return self.client
        now = self.clock()
        if now < self._next_try:
            return None
        try:
            self.client = Client(self.socket_path, timeout=self.timeout_s, name=self.name)
        except Exception as e:   # any failure to connect (socket, handshake, mapping the region) means "down"
            self.failures += 1
            self._backoff = min(self.max_retry_s, max(self.retry_s, self._backoff * 2))
            self._next_try = now + self._backoff
            if not self._down_logged:
                log.warning("kvtierd unreachable (%s); serving without it, retrying every <= %.0f s", e,
                            self.max_retry_s)
                self._down_logged = True
            return None
        self.connects += 1
        self._backoff = 0.0
        if self.connects > 1 or self._down_logged:
            log.info("kvtierd reachable again at %s", self.client.socket_path)
        self._down_logged = False
        return self.client

    def namespace(self, name: str, block_size: int, tokens_per_block: int) -> Any | None:
        """The opened namespace (reopened after a reconnect), or None while the daemon is down."""
        c = self.get()
        if c is None:
            return None
        ns = self._namespaces.get(name)
        if ns is None or ns.client is not c:
            try:
                ns = c.namespace(name, block_size=block_size, tokens_per_block=tokens_per_block)
            except DAEMON_ERRORS as e:
                self.broken(e)
                return None
            self._namespaces[name] = ns
        return ns

    def call(self, name: str, block_size: int, tokens_per_block: int, fn: Callable[[Any], Any]) -> Any:
        """fn(namespace), retried once on a fresh connection when the old one turns out dead (the
        daemon restarted since the last call). Raises Unavailable while the daemon is down, and
        the daemon's error when the retry fails too (the link is then marked broken)."""
        for attempt in (0, 1):
            ns = self.namespace(name, block_size, tokens_per_block)
            if ns is None:
                raise Unavailable(f"kvtierd at {self.socket_path} is unreachable")
            try:
                return fn(ns)
            except DAEMON_ERRORS as e:
                dead = isinstance(e, (ConnectionError, BrokenPipeError)) and not isinstance(e, KvtierdError)
                self.broken(e)
                if attempt or not dead:
                    raise
        raise AssertionError("unreachable")

    def broken(self, err: BaseException | None = None) -> None:
        """Drops the connection after an error; the next get() reconnects (after the backoff)."""
        if err is not None:
            log.warning("kvtierd request failed (%s: %s); dropping the connection", type(err).__name__, err)
        self.failures += 1
        c, self.client = self.client, None
        self._namespaces.clear()
        self._backoff = min(self.max_retry_s, max(self.retry_s, self._backoff * 2)) if self._backoff else 0.0
        self._next_try = self.clock() + self._backoff
        if c is not None:
            try:
                c.close()
            except Exception:   # closing a dead connection: nothing left to do
                pass

    def close(self) -> None:
        c, self.client = self.client, None
        self._namespaces.clear()
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
