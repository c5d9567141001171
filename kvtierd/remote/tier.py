"""RemoteTier: the API the store calls to share blocks through a Redis/Valkey cluster.

    tier = RemoteTier(cfg.remote)
    await tier.start()                      # never raises for an unreachable remote
    n = await tier.present(ns, size, keys)  # leading keys present remotely (0 when down or late)
    which = await tier.exists(ns, size, keys)      # the same, per key
    ok = await tier.fetch(ns, size, keys, dests)   # verified copies into the given slot views
    tier.offer(ns, key, view, done, csum)   # queue an async write; False = dropped (counted)
    tier.stats()                            # plain dict for `kvtierd stats` and metrics.py
    await tier.close()

Contract with the caller (all calls on the event loop thread):

* `present(ns_name, block_size, keys) -> int`: one pipelined round, an MGET
  of the headers per bucket (values.py; one round trip per node, nodes in
  parallel), inside `lookup_budget_s`. A block without the header of an
  intact block of this namespace counts as absent. A round that misses
  the budget answers 0 and finishes in the background (so its connection is
  not torn down), and at most MAX_LATE_ROUNDS such rounds may be out: beyond
  that present() answers 0 at once. It is a hint: fetch() is the truth.
  `exists()` is the same round, answered per key.
* `fetch(ns_name, block_size, keys, dests, sums=None) -> list[bool]`: an MGET
  of payloads and headers per bucket, in rounds of at most `pipeline_bytes`;
  each block's header is checked (values.py), its payload copied into
  `dests[i]` (writable, exactly block_size bytes) and the copy hashed
  against the header's xxh3. The next round is sent before a round is
  checked, so the cluster sends it meanwhile; a fetch holds at most two
  rounds of replies. (A thread for the copy and hash measured worse on a
  loaded 2-core machine: GIL hand-offs cost more than the overlap gained.)
  False means dests[i] may hold anything and must not be served. A failed
  round makes the rest of the call misses. With `sums` a list, sums[i] gets
  the xxh3_64 of each delivered block (computed to verify it: the caller
  need not hash it again).
* `offer(ns_name, key, view, done, csum=None) -> bool`: see writer.py. True:
  `view` must stay valid and unchanged until `done(ok)` is called (on the
  loop, exactly once, also at close()). `csum` is the block's xxh3_64 as the
  caller knows it to be right (the store's checksum taken at commit); the
  header carries it, so bytes changed behind the caller's back since then,
  or a slot reused too early, reach a reader as a miss, never as wrong
  bytes. Without it the writer hashes the view as it sends it.
* Failures (a node down, a timeout, a failover, every node down) are misses,
  dropped writes and counters, never exceptions; they feed the circuit
  breaker (breaker.py). Commands the cluster refuses (maxmemory with
  noeviction, ACL) fail their keys only and do not. Bad arguments (a dest of the
  wrong size) are the caller's bug and raise ValueError.

A write round is `SET payload-key view PX ttl` per block, then, per bucket,
one EVAL of HEADERS_LUA that sets the bucket's header keys with the same
TTL, in one pipeline (values.py says why two strings): the payload goes from
the caller's memoryview to the socket with no copy, and a round costs
redis-py's per-command Python once per block, not twice. (So an ACL user for
kvtierd needs EVAL besides SET and MGET on its key pattern.) A reader between
the two sees a payload without its header, or an old header with a new
payload: a miss either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Sequence

from redis.exceptions import ClusterDownError, ResponseError

from kvtierd.config import RemoteConfig
from kvtierd.remote.breaker import CLOSED, CircuitBreaker
from kvtierd.remote.connection import Remote, connect, redact
from kvtierd.remote.stats import Counters
from kvtierd.remote.values import BUCKETS, FIXED_SIZE, MAX_KEY, NamespaceNames, checksum
from kvtierd.remote.writer import Budget, Write, WriteQueue

log = logging.getLogger("kvtierd.remote")

MAX_LATE_ROUNDS = 32       # lookup rounds past their budget that may still be out
MAX_NAMES = 4096           # namespace name cache entries (the store bounds namespaces far below)

# The headers of one bucket in one command: redis-py's cluster pipeline spends tens of microseconds of
# Python per command, and a SET per header doubled the commands of a write round (bench/remote.py).
# KEYS: header keys (one hash slot); ARGV[1]: TTL in ms (0: none), then the headers in KEYS' order.
HEADERS_LUA = """local px = ARGV[1]
for i = 1, #KEYS do
  if px == '0' then redis.call('SET', KEYS[i], ARGV[i + 1]) else redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', px) end
end
return #KEYS"""


class RemoteTier:
    def __init__(self, cfg: RemoteConfig, buckets: int = BUCKETS, clock: Callable[[], float] = time.monotonic) -> None:
        if not cfg.url:
            raise ValueError("remote.url is empty: there is no remote tier to start")
        self.cfg = cfg
        self.buckets = buckets                  # part of the format: bench/remote.py compares others
        self.breaker = CircuitBreaker(cfg.breaker_failures, cfg.breaker_open_s, clock)
        self.queue = WriteQueue(cfg.max_inflight_bytes, cfg.pipeline_bytes, Budget(cfg.bytes, cfg.ttl_s, clock))
        self.c = Counters()
        self._remote: Remote | None = None
        self._seeds: list[tuple[str, int]] = []
        self._names: dict[str, NamespaceNames] = {}
        self._late = 0
        self._closed = False
        self._wake = asyncio.Event()        # the writer has work
        self._tripped = asyncio.Event()     # the prober has work
        self._tasks: list[asyncio.Task] = []
        self._refresh: asyncio.Task | None = None
        self._ttl_ms = int(cfg.ttl_s * 1000)
        self._refusal_logged = -60.0

    # ----------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect (or, if the remote is unreachable, open the breaker and keep probing)."""
        try:
            await self._connect()
            log.info("remote tier on %s (%s, %d masters)", redact(self.cfg.url),
                     "cluster" if self._remote.cluster else "single server", self._remote.primaries())
        except Exception as e:
            log.warning("remote tier: %s is unreachable (%s); serving without it and retrying every %.1f s",
                        redact(self.cfg.url), e, self.cfg.breaker_open_s)
            self._trip()
        self._tasks = [asyncio.create_task(self._writer(), name="kvtierd-remote-writer"),
                       asyncio.create_task(self._prober(), name="kvtierd-remote-prober")]

    async def close(self) -> None:
        """Stop: the round in flight ends (or times out), queued writes get done(False), connections close."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._tripped.set()
        for t in self._tasks:
            if t.get_name().endswith("prober"):
                t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self.queue.drain():
            self._finish(w, False, dropped="closed")
        if self._refresh is not None:
            self._refresh.cancel()
        if self._remote is not None:
            try:
                await self._remote.aclose()
            except Exception:
                log.debug("closing the remote client", exc_info=True)
            self._remote = None

    # ----------------------------------------------------------------- API

    def available(self) -> bool:
        """False while the breaker is open or the tier is closed: calls answer misses without I/O."""
        return not self._closed and self._remote is not None and self.breaker.allow()

    async def present(self, ns_name: str, block_size: int, keys: Sequence[bytes]) -> int:
        """How many leading keys are present remotely, within the lookup budget (0 when down or late)."""
        found = await self.exists(ns_name, block_size, keys)
        return found.index(False) if False in found else len(found)

    async def exists(self, ns_name: str, block_size: int, keys: Sequence[bytes]) -> list[bool]:
        """Whether each key is present remotely with the length of an intact block; all False when the
        remote is down or the round misses the lookup budget. The same single round as present()."""
        absent = [False] * len(keys)
        if not keys:
            return absent
        self.c.lookup_keys += len(keys)
        if not self.available():
            return absent
        if self._late >= MAX_LATE_ROUNDS:
            self.c.lookup_shed += 1
            return absent
        names = self._ns(ns_name)
        t0 = time.perf_counter()
        task = asyncio.ensure_future(self._exists_round(names, block_size, keys, t0))
        done, _ = await asyncio.wait((task,), timeout=self.cfg.lookup_budget_s)
        if not done:
            self.c.lookup_late += 1
            self._late += 1
            task.add_done_callback(self._late_done)
            return absent
        found = task.result()
        if found is None:
            return absent
        self.c.lookup_found += sum(found)
        return found

    async def fetch(self, ns_name: str, block_size: int, keys: Sequence[bytes],
                    dests: Sequence[memoryview], sums: list | None = None) -> list[bool]:
        """Copy the verified payload of each key into dests[i]; True where that worked."""
        if len(dests) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(dests)} destinations")
        for d in dests:
            if d.nbytes != block_size or d.readonly:
                raise ValueError(f"destinations must be writable views of exactly {block_size} bytes")
        if sums is not None and len(sums) != len(keys):
            raise ValueError("sums must have one place per key")
        ok = [False] * len(keys)
        if not keys:
            return ok
        if not self.available():
            self.c.misses += len(keys)
            return ok
        names = self._ns(ns_name)
        per_round = max(1, self.cfg.pipeline_bytes // (block_size + FIXED_SIZE + MAX_KEY))
        nxt = self._fetch_round(names, keys, 0, per_round)
        try:
            while nxt is not None:
                start, groups, task = nxt
                nxt = None
                replies = await task
                if replies is None:
                    break
                if start + per_round < len(keys) and self.available():
                    # The next round goes out before this one is checked: the cluster sends it while
                    # the loop copies and hashes (the fetch holds at most two rounds of replies).
                    nxt = self._fetch_round(names, keys, start + per_round, per_round)
                self._deliver(names, block_size, keys, start, groups, replies, dests, ok, sums)
        finally:
            if nxt is not None:     # cancelled, or the remote went down: the round ends on its own
                nxt[2].add_done_callback(lambda t: t.cancelled() or t.exception())
        hits = sum(ok)
        self.c.hits += hits
        self.c.misses += len(keys) - hits
        self.c.read_bytes += hits * block_size
        return ok

    def offer(self, ns_name: str, key: bytes, view: memoryview, done: Callable[[bool], None],
              csum: int | None = None) -> bool:
        """Queue an asynchronous write of `view` under `key`; False = dropped (counted), done not called."""
        if self._closed:
            self.c.dropped["closed"] += 1
            return False
        if self.cfg.write_policy == "off":
            return False
        if not self.available():
            self.c.dropped["down"] += 1
            return False
        reason = self.queue.admit(Write(self._ns(ns_name), key, view, done, csum))
        if reason is not None:
            self.c.dropped[reason] += 1
            return False
        self._wake.set()
        return True

    def stats(self) -> dict[str, Any]:
        c = self.c
        remote = self._remote
        return {
            "url": redact(self.cfg.url),
            "state": self.breaker.state if not self._closed else "stopped",
            "connected": remote is not None,
            "cluster": bool(remote and remote.cluster),
            "masters": remote.primaries() if remote is not None else 0,
            "write_policy": self.cfg.write_policy,
            "breaker_opens": self.breaker.opens,
            "probes": self.breaker.probes,
            "lookup_keys": c.lookup_keys, "lookup_found": c.lookup_found,
            "lookup_late": c.lookup_late, "lookup_shed": c.lookup_shed,
            "hits": c.hits, "misses": c.misses, "corrupt": c.corrupt, "read_bytes": c.read_bytes,
            "writes": c.writes, "written_bytes": c.written_bytes, "write_errors": c.write_errors,
            "errors": c.errors, "timeouts": c.timeouts,
            "dropped": dict(c.dropped),
            "queue_blocks": len(self.queue.queue), "queue_bytes": self.queue.queued_bytes,
            "inflight_bytes": self.queue.inflight_bytes,
            "budget_bytes": self.cfg.bytes, "budget_used_bytes": self.queue.budget.used,
            "latency": {op: h.snapshot() for op, h in c.latency.items()},
        }

    # ------------------------------------------------------------ internals

    def _ns(self, name: str) -> NamespaceNames:
        names = self._names.get(name)
        if names is None:
            if len(self._names) >= MAX_NAMES:
                self._names.clear()
            names = self._names[name] = NamespaceNames(name, self.buckets)
        return names

    def _fetch_round(self, names: NamespaceNames, keys: Sequence[bytes], start: int,
                     per_round: int) -> tuple[int, list[list[int]], asyncio.Task]:
        """Send the round for keys[start:start + per_round]: an MGET of payload and header keys per bucket."""
        groups, args = _by_bucket(names, keys, start, min(len(keys), start + per_round), payloads=True)
        cmds = [("MGET", *a) for a in args]
        return start, groups, asyncio.ensure_future(self._timed_round("fetch", cmds))

    async def _timed_round(self, op: str, cmds: list[tuple]) -> list[Any] | None:
        t0 = time.perf_counter()
        replies = await self._round(cmds)
        self.c.latency[op].observe(time.perf_counter() - t0)
        return replies

    def _deliver(self, names: NamespaceNames, block_size: int, keys: Sequence[bytes], start: int,
                 groups: list[list[int]], replies: list[Any], dests: Sequence[memoryview], ok: list[bool],
                 sums: list | None) -> None:
        """Copy each block of a round whose header is that of block `key` of this namespace into its dest,
        then hash the copy (what the caller gets) against the header's xxh3; ok[i] only if it matches."""
        for idx, reply in zip(groups, replies):
            if not isinstance(reply, list) or len(reply) != 2 * len(idx):
                continue
            for j, i in enumerate(idx):
                payload, header = reply[2 * j], reply[2 * j + 1]
                if payload is None or header is None:
                    continue
                want = names.header_ok(keys[i], block_size, header) if len(payload) == block_size else None
                if want is not None:
                    dests[i][:] = payload
                    if checksum(dests[i]) == want:
                        ok[i] = True
                        if sums is not None:
                            sums[i] = want
                        continue
                self.c.corrupt += 1

    async def _exists_round(self, names: NamespaceNames, block_size: int, keys: Sequence[bytes],
                            t0: float) -> list[bool] | None:
        """Presence of each key, or None when the round failed."""
        groups, args = _by_bucket(names, keys, 0, len(keys), payloads=False)
        replies = await self._round([("MGET", *a) for a in args])
        self.c.latency["lookup"].observe(time.perf_counter() - t0)
        if replies is None:
            return None
        found = [False] * len(keys)
        for idx, reply in zip(groups, replies):
            if isinstance(reply, list) and len(reply) == len(idx):
                for i, header in zip(idx, reply):
                    found[i] = names.header_ok(keys[i], block_size, header) is not None
        return found

    def _late_done(self, task: asyncio.Task) -> None:
        self._late -= 1
        # A round that failed has told the breaker already. One that answered,
        # but after the budget, counts as a slow round: a remote always past the
        # budget would otherwise cost every lookup its whole budget.
        if not task.cancelled() and task.exception() is None and task.result() is not None:
            if self.breaker.failure():
                self._on_trip("lookups keep missing the %.1f ms budget" % (self.cfg.lookup_budget_s * 1e3))

    async def _round(self, commands: list[tuple]) -> list[Any] | None:
        """One pipelined round; None (counted, breaker told) if it failed as a whole."""
        remote = self._remote
        if remote is None:
            return None
        try:
            results = await asyncio.wait_for(remote.execute(commands), self.cfg.op_timeout_s)
        except asyncio.TimeoutError:
            self.c.timeouts += 1
            self._failed(remote, "a round ran past remote.op_timeout_s")
            return None
        except Exception as e:
            self._failed(remote, f"{type(e).__name__}: {e}")
            return None
        errors = [r for r in results if isinstance(r, Exception)]
        if not errors:
            self.breaker.success()
        elif any(not isinstance(r, ResponseError) or isinstance(r, ClusterDownError) for r in errors):
            # A node unreachable or the cluster down: the breaker hears of it.
            self._failed(remote, f"{len(errors)} of {len(results)} commands failed: {errors[0]}")
        else:
            # Refused commands (maxmemory with noeviction, ACL, READONLY in a failover) fail
            # their keys only: a full cluster that refuses writes still serves reads.
            self.c.errors += 1
            self.breaker.success()
            now = time.monotonic()
            if now - self._refusal_logged >= 60.0:
                self._refusal_logged = now
                log.warning("the remote refused %d of %d commands: %s (logged once a minute)", len(errors),
                            len(results), errors[0])
        return results

    def _failed(self, remote: Remote, why: str) -> None:
        self.c.errors += 1
        log.debug("remote round failed: %s", why)
        if self.breaker.failure():
            self._on_trip(why)
        elif remote.cluster and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self._refresh_slots(remote))

    async def _refresh_slots(self, remote: Remote) -> None:
        try:
            await asyncio.wait_for(remote.refresh(), self.cfg.op_timeout_s)
        except Exception as e:
            log.debug("slot map refresh failed: %s", e)

    def _on_trip(self, why: str) -> None:
        log.warning("remote tier off after %d failed rounds (%s); probing every %.1f s",
                    self.cfg.breaker_failures, why, self.cfg.breaker_open_s)
        self._tripped.set()

    def _trip(self) -> None:
        self.breaker.trip()
        self._tripped.set()

    async def _connect(self) -> None:
        remote = await _bounded(connect(self.cfg, self._seeds), self.cfg.connect_timeout_s + 2 * self.cfg.op_timeout_s)
        old, self._remote = self._remote, remote
        self._seeds = remote.nodes()
        if old is not None:
            try:
                await old.aclose()
            except Exception:
                log.debug("closing the old remote client", exc_info=True)

    async def _probe(self) -> bool:
        """Reconnect from scratch (any known node), then check every master answers."""
        try:
            if self._remote is not None:
                self._seeds = list(dict.fromkeys(self._seeds + self._remote.nodes()))
            await self._connect()
            await _bounded(self._remote.probe(), self.cfg.op_timeout_s * 2)
            return True
        except Exception as e:
            log.debug("remote probe failed: %s", e)
            return False

    async def _prober(self) -> None:
        while not self._closed:
            await self._tripped.wait()
            self._tripped.clear()
            while not self._closed and self.breaker.state != CLOSED:
                # A timer, not a poll: the breaker opens for open_s, then one probe runs.
                await asyncio.sleep(max(0.0, self.breaker.opened_at + self.breaker.open_s - time.monotonic()))
                if self._closed:
                    return
                self.breaker.probing()
                ok = await self._probe()
                self.breaker.probe_result(ok)
                if ok:
                    log.warning("remote tier back on %s (%s, %d masters)", redact(self.cfg.url),
                                "cluster" if self._remote.cluster else "single server", self._remote.primaries())
                    self._wake.set()

    def _finish(self, w: Write, ok: bool, dropped: str | None = None) -> None:
        """Account for one accepted write and call its done()."""
        self.queue.finish(w, ok)
        if ok:
            self.c.writes += 1
            self.c.written_bytes += w.nbytes
        elif dropped is not None:
            self.c.dropped[dropped] += 1
        else:
            self.c.write_errors += 1
        try:
            w.done(ok)
        except Exception:
            log.exception("a remote write's done callback failed")

    def _commands(self, batch: list[Write]) -> tuple[list[tuple], list[int]]:
        """The round that writes `batch`: a SET per payload, then one EVAL of HEADERS_LUA per hash slot
        bucket setting that bucket's headers; and, per write, the position of its EVAL's reply."""
        px = ("PX", self._ttl_ms) if self._ttl_ms > 0 else ()
        cmds: list[tuple] = []
        buckets: dict[tuple, tuple[list[int], list[bytes], list[bytes]]] = {}
        for i, w in enumerate(batch):
            b, payload_key, header_key = w.names.redis_keys(w.key)
            cmds.append(("SET", payload_key, w.view, *px))
            # 0 buckets: a hash slot per block, so a script per block
            group = buckets.setdefault((w.names.digest, b if b >= 0 else w.key), ([], [], []))
            group[0].append(i)
            group[1].append(header_key)
            group[2].append(w.names.header(w.key, w.view, w.csum))
        header_at = [0] * len(batch)
        for positions, header_keys, headers in buckets.values():
            for i in positions:
                header_at[i] = len(cmds)
            cmds.append(("EVAL", HEADERS_LUA, len(header_keys), *header_keys, self._ttl_ms, *headers))
        return cmds, header_at

    async def _writer(self) -> None:
        while True:
            if not self.queue.queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._closed:
                return        # close() fails what is left
            if not self.available():
                for w in self.queue.drain():
                    self._finish(w, False, dropped="down")
                continue
            batch = self.queue.take()
            t0 = time.perf_counter()
            cmds, header_at = self._commands(batch)
            results = await self._round(cmds)
            self.c.latency["write"].observe(time.perf_counter() - t0)
            for i, w in enumerate(batch):
                ok = results is not None and _set_ok(results[i]) and isinstance(results[header_at[i]], int)
                self._finish(w, ok)


def _by_bucket(names: NamespaceNames, keys: Sequence[bytes], start: int, end: int,
               payloads: bool) -> tuple[list[list[int]], list[list[bytes]]]:
    """Positions start..end-1 of `keys` grouped by hash slot bucket (one multi-key command each), in
    first-seen order, and each group's Redis keys: payload and header key per block, or headers only."""
    groups: dict[int, tuple[list[int], list[bytes]]] = {}
    for i in range(start, end):
        b, payload_key, header_key = names.redis_keys(keys[i])
        group = groups.get(b if b >= 0 else -1 - i)      # 0 buckets: a slot per block
        if group is None:
            group = groups[b if b >= 0 else -1 - i] = ([], [])
        group[0].append(i)
        if payloads:
            group[1].append(payload_key)
        group[1].append(header_key)
    return [g[0] for g in groups.values()], [g[1] for g in groups.values()]


def _set_ok(reply: Any) -> bool:
    """A SET reply that says the value was stored (redis-py parses OK to True)."""
    return reply is True or reply == b"OK"


async def _bounded(coro: Any, timeout: float) -> Any:
    """wait_for, with the inner task's outcome always retrieved: a probe cancelled at close() just as its
    connection attempt fails must not log 'Task exception was never retrieved'."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.wait_for(task, timeout)
