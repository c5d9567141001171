"""The daemon's lifecycle: start-up, signals, reload and drain.

Start-up order matters to users: refuse early if another daemon owns the
socket (a lock file beside it decides; a socket left by a crashed daemon is
replaced), build the tiers (the disk tier recovers in the background so
`ping`/`stats` answer during recovery), listen, then tell systemd READY=1 once
recovery is done. SIGTERM/SIGINT drain: stop accepting, let in-flight requests
finish, flush the host tier to disk if configured, remove the socket. The host
regions (one memfd per access domain) have no path: they go with the daemon and
its clients' mappings, also after a crash, so there is nothing to clean up.
SIGHUP re-reads the config and applies what may change live, naming what needs
a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import signal
import socket
import time
from pathlib import Path

from kvtierd import __version__
from kvtierd import config as config_mod
from kvtierd.core.store import Store
from kvtierd.server import Connection, Server

log = logging.getLogger("kvtierd")


class StartupError(RuntimeError):
    """Start-up cannot go on; the message says why and what to do."""


class Daemon:
    def __init__(self, cfg: config_mod.Config, config_path: str | None = None,
                 overrides: dict | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides or {}
        self.stopping = asyncio.Event()
        self.lock_fd: int | None = None
        self.sock_path = Path(cfg.server.socket)
        self.owns_socket = False
        self.populator = None          # kvtierd.tiers.populate.Populator while host.populate runs

    # ------------------------------------------------------------ start

    def _take_lock(self) -> None:
        self.sock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        lock = self.sock_path.with_name(self.sock_path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StartupError(f"another kvtierd is already serving on {self.sock_path} "
                               f"(it holds {lock}); stop it first or pick another --socket") from None
        self.lock_fd = fd

    def _bind(self) -> socket.socket:
        """Our listening socket: handed over by systemd, or bound here."""
        from kvtierd import systemd
        handed = systemd.activated_unix_listener(str(self.sock_path))
        if handed is not None:
            log.info("using the listening socket handed over by systemd")
            return handed
        from kvtierd.access import AccessError, bind_unix_listener
        stale = os.path.lexists(self.sock_path)
        try:
            # Replaces only a socket nobody listens on; mode and group are set before listen().
            sock = bind_unix_listener(self.sock_path, self.cfg.server.socket_mode, self.cfg.server.socket_group,
                                      backlog=1024)
        except AccessError as e:
            raise StartupError(f"{e}; stop it first or pick another --socket") from None
        if stale:
            log.warning("replaced stale socket %s left by a daemon that did not exit cleanly", self.sock_path)
        self.owns_socket = True
        return sock

    def _build_regions(self) -> dict:
        """One host region per access domain: the default one (host.bytes) and each of
        access.domains. memfds, so nothing to find or remove after a crash; files that
        daemons before memfd regions left in host.shm_dir are removed once."""
        from kvtierd.tiers.host import HostRegion, is_huge, remove_legacy_regions
        for p in remove_legacy_regions(self.cfg.host.shm_dir):
            log.info("removed %s, a shared-memory region file left by an earlier kvtierd version", p)
        slab, huge = self.cfg.host.slab_bytes, self.cfg.host.huge_pages
        regions = {"default": HostRegion(self.cfg.host.bytes, slab, huge_pages=huge)}
        try:
            for name, d in self.cfg.access.domains.items():
                regions[name] = HostRegion(d["host_bytes"], slab, domain=name, huge_pages=huge)
        except BaseException:
            for r in regions.values():
                r.close()
            raise
        for name, r in regions.items():
            if r.huge_page_bytes:
                log.info("host region of domain %r: %d of %d MiB in %s huge pages of %d KiB", name,
                         r.huge_bytes >> 20, r.size >> 20, "hugetlb" if is_huge(r.fd) else "transparent",
                         r.huge_page_bytes >> 10)
        if len(regions) > 1:
            log.info("access domains: %s", ", ".join(f"{n} ({r.size >> 20} MiB)" for n, r in regions.items()))
        return regions

    def _build_disk(self):
        if not self.cfg.disk.bytes:
            return None
        from kvtierd.disk.tier import DiskTier
        return DiskTier(self.cfg.disk, Path(self.cfg.state.dir))

    async def run(self) -> int:
        from kvtierd import access, hotkeys, metrics, systemd
        cfg = self.cfg
        self._take_lock()
        Path(cfg.state.dir).mkdir(parents=True, exist_ok=True, mode=0o750)
        self.policy = access.AccessPolicy(cfg.access)
        disk = self._build_disk()
        self.store = store = Store(cfg, disk, self._build_regions())
        if cfg.remote.url:
            # redis-py is imported only with a remote tier
            from kvtierd.remote import RemoteTier
            store.attach_remote(RemoteTier(cfg.remote))
        self.hot = hotkeys.HotKeys(cfg.metrics.hot_keys, cfg.metrics.hot_window_s)
        self.metrics = metrics.Metrics(stats_fn=self._stats_for_metrics,
                                       max_namespaces=cfg.metrics.max_namespaces)
        server = self.server = Server(
            cfg, store, admit=self._admit, observe=self.metrics.requests.observe,
            refuse_open=self._refuse_open, extra_stats=self._extra_stats,
            hot=self.hot.top, record_reads=self.hot.record, gate=access.Gate(self.policy, store))
        # GPU set-up (pinning a large region takes seconds) happens before the socket
        # exists, so no client waits on a socket that listens but does not serve yet.
        try:
            await self._attach_gpu(store)
            sock = self._bind()
        except BaseException:
            for region in store.regions.values():
                region.close()
            raise
        loop = asyncio.get_running_loop()
        # Signals first: a SIGTERM that comes while we start must still drain, not kill.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        if disk is not None:
            await disk.start()          # recovery goes on in the background
        await store.start()
        if cfg.host.populate:
            from kvtierd.tiers.populate import Populator
            self.populator = Populator(store.regions.values())
            self.populator.start()
        self.metrics_port = None
        if cfg.metrics.address:
            self.metrics_port = await self.metrics.start_http(cfg.metrics.address)   # logs the address
        self.unix_server = await loop.create_unix_server(lambda: Connection(server), sock=sock)
        log.info("kvtierd %s serving on %s (pid %d): %s", __version__, self.sock_path, os.getpid(), cfg.summary())
        watchdog = systemd.start_watchdog()
        ready = asyncio.create_task(self._ready_after_recovery())
        await self.stopping.wait()
        ready.cancel()
        if watchdog is not None:
            watchdog.cancel()
        await self.shutdown()
        return 0

    async def _attach_gpu(self, store: Store) -> None:
        """Pins the host region and builds the HBM pool where CUDA is usable. torch and
        cupy are imported only here, and only on a machine with an NVIDIA driver."""
        cfg = self.cfg
        if not (cfg.hbm.bytes or cfg.host.pin):
            return
        from kvtierd.gpu import cuda
        if not cuda.driver_present() or not cuda.available():
            if cfg.hbm.bytes:
                log.warning("hbm.bytes is set but no CUDA device is usable here: running without the HBM tier")
            return
        if len(cfg.hbm.devices) > 1:
            raise StartupError("one kvtierd serves one GPU: run one daemon (one socket) per device "
                               f"instead of hbm.devices = {list(cfg.hbm.devices)}")
        device = cfg.hbm.devices[0] if cfg.hbm.devices else 0
        from kvtierd.gpu import pinning
        t0 = time.monotonic()
        pin = await asyncio.to_thread(pinning.pin_buffer, store.host_region.mmap, device=device)
        log.info("host region pinned for DMA in %.2f s (%d chunks of %d MiB)", time.monotonic() - t0,
                 -(-pin.length // pin.chunk_bytes), pin.chunk_bytes >> 20)
        # Registering faulted every page in, writable: nothing is left for host.populate to do there.
        store.host_region.populated_bytes = store.host_region.size
        if not cfg.hbm.bytes:
            store.host_pin = pin
            return
        from kvtierd.tiers.hbm import HbmPool
        try:
            pool = HbmPool(cfg.hbm.bytes, device, cfg.host.slab_bytes, host_base=pin.address,
                           host_nbytes=pin.length, host_mapped=pin.mapped, host_chunk_bytes=pin.chunk_bytes)
        except (MemoryError, cuda.CudaUnavailable) as e:
            pin.close()
            raise StartupError(f"cannot build the HBM tier: {e}") from None
        store.attach_hbm(pool, pin)
        log.info("HBM tier: %d MiB on cuda:%d, exported by CUDA IPC", cfg.hbm.bytes >> 20, device)

    async def _ready_after_recovery(self) -> None:
        from kvtierd import systemd
        disk = self.store.disk
        if disk is not None:
            t0 = time.monotonic()
            waiter = asyncio.create_task(disk.wait_recovered())
            ticks = 0
            while not waiter.done():
                p = disk.recovery_progress()
                text = f"recovering disk tier: {p.get('records', 0)} records, {100 * p.get('fraction', 0):.0f}%"
                systemd.status(text)
                systemd.extend_timeout(30)   # a huge tier may take longer than TimeoutStartSec
                if ticks and ticks % 5 == 0:
                    log.info("%s (lookups see what is recovered so far)", text)
                ticks += 1
                await asyncio.wait([waiter], timeout=1.0)
            await waiter
            log.info("disk tier recovered in %.2f s: %s", time.monotonic() - t0, disk.recovery_progress())
        systemd.ready(f"serving on {self.sock_path}")

    # ------------------------------------------------------------ runtime

    def _admit(self, conn: Connection, sock: socket.socket | None) -> str | None:
        ok, reason, creds = self.policy.admit_peer(sock)      # fails closed: no socket, no credentials
        if creds is not None:
            conn.pid, conn.uid, conn.gid = creds
        if not ok:
            self.server.count_error("denied")
            log.warning("refused connection from pid=%d uid=%d gid=%d: %s", conn.pid, conn.uid, conn.gid, reason)
            return reason
        return None

    def _refuse_open(self, namespace: str, uid: int) -> str | None:
        if self.policy.may_open(namespace, uid):
            return None
        log.warning("refused uid %d access to namespace %r", uid, namespace)
        return self.policy.why_not(namespace, uid)

    def _extra_stats(self) -> dict:
        out = {}
        disk = self.store.disk
        if disk is not None:
            out["recovery"] = disk.recovery_progress()
        return out

    def _stats_for_metrics(self) -> dict:
        s = self.store.stats()
        s.update(self.server.session_stats())
        return s

    def reload(self) -> None:
        """SIGHUP: re-read the config; apply live keys, log the rest."""
        from kvtierd import logs, systemd
        systemd.reloading()
        try:
            new = config_mod.load(self.config_path, self.overrides)
        except config_mod.ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e)
            systemd.ready("reload refused: " + str(e))
            return
        live = self.cfg.live_keys()
        changed, needs_restart = [], []
        for section in dataclasses.fields(new):
            old_s, new_s = getattr(self.cfg, section.name), getattr(new, section.name)
            for f in dataclasses.fields(new_s):
                key = f"{section.name}.{f.name}"
                if getattr(old_s, f.name) != getattr(new_s, f.name):
                    if key in live:
                        setattr(old_s, f.name, getattr(new_s, f.name))
                        changed.append(key)
                    else:
                        needs_restart.append(key)
        logs.reconfigure(self.cfg.log.level, self.cfg.log.format)
        self.store.reconfigure(self.cfg)
        self.server.retune_frame_cache(self.cfg.server.frame_cache_bytes, self.cfg.server.frame_cache_idle_s)
        self.policy.reload(self.cfg.access)
        self.hot.configure(self.cfg.metrics.hot_keys, self.cfg.metrics.hot_window_s)
        log.info("reloaded config: applied %s", ", ".join(changed) or "nothing new")
        if needs_restart:
            log.warning("changed keys that need a restart to take effect: %s", ", ".join(needs_restart))
        systemd.ready("reloaded")

    # ------------------------------------------------------------ stop

    async def shutdown(self) -> None:
        from kvtierd import systemd
        systemd.stopping()
        log.info("draining: no new connections")
        self.unix_server.close()
        await self.server.drain(self.cfg.server.drain_timeout_s)
        self.server.busy_poll.close()
        if self.populator is not None:
            await asyncio.to_thread(self.populator.stop)   # before the regions it writes are closed
        await self.store.close(flush=self.cfg.disk.flush_on_shutdown)
        await self.metrics.stop_http()
        if self.owns_socket:
            self.sock_path.unlink(missing_ok=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)
        log.info("stopped")


def serve(cfg: config_mod.Config, config_path: str | None, overrides: dict) -> int:
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:   # uvloop is a dependency; this only helps odd platforms
        runner = asyncio.run
    return runner(Daemon(cfg, config_path, overrides).run())
