"""The one configuration schema of kvtierd: defaults, parsing and validation.

Every key lives here once, with its default, its parser and a one-line doc.
Values come from three places, later ones winning: the defaults below, a TOML
file (configs/kvtierd.toml is the shipped, commented default) and command-line
overrides (``--host-bytes 4GiB`` or the generic ``--set host.bytes=4GiB``).
A bad value raises ConfigError naming the key and the reason, so the daemon
refuses to start rather than run on a half-understood config.

Paths left empty are resolved at load time: the daemon prefers /run/kvtierd and
/var/lib/kvtierd (what the systemd unit provides) and falls back to the per-user
XDG runtime/state directories, so the defaults work on a laptop without root.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key."""


# ---------------------------------------------------------------- value parsers

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as '512MiB', '4GiB', '1.5G', '4096'."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as '512MiB', got {type(value).__name__}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot read {value!r} as a size (use bytes or a suffix: KiB MiB GiB TiB, KB MB GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """A short human form of a byte count, e.g. '1.5 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _size(min_: int = 0, max_: int | None = None) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        n = parse_size(v)
        if n < min_:
            raise ValueError(f"must be at least {format_size(min_)}")
        if max_ is not None and n > max_:
            raise ValueError(f"must be at most {format_size(max_)}")
        return n
    return parse


def _num(kind: type, min_: float | None = None, max_: float | None = None) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError(f"expected a number, got {type(v).__name__}")
        try:
            x = kind(v)
        except (TypeError, ValueError):
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {v!r}") from None
        if kind is int and isinstance(v, float) and v != x:
            raise ValueError(f"expected an integer, got {v!r}")
        if min_ is not None and x < min_:
            raise ValueError(f"must be >= {min_}")
        if max_ is not None and x > max_:
            raise ValueError(f"must be <= {max_}")
        return x
    return parse


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if not isinstance(v, str) or v.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {v!r}")
        return v.lower()
    return parse


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def _mode(v: Any) -> int:
    """A file mode given as an int (0o660 in TOML) or an octal string '0660'."""
    if isinstance(v, str):
        try:
            v = int(v, 8)
        except ValueError:
            raise ValueError(f"expected an octal mode such as '0660', got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0o777:
        raise ValueError(f"expected a mode between 0 and 0777, got {v!r}")
    return v


def _int_list(v: Any) -> tuple[int, ...]:
    if isinstance(v, str):
        v = [x for x in v.split(",") if x.strip()]
    if not isinstance(v, (list, tuple)):
        raise ValueError("expected a list of integers")
    out = []
    for x in v:
        try:
            out.append(int(x))
        except (TypeError, ValueError):
            raise ValueError(f"expected a list of integers, found {x!r}") from None
        if out[-1] < 0:
            raise ValueError("ids must not be negative")
    return tuple(out)


def _ns_acl(v: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(v, dict):
        raise ValueError("expected a table of namespace prefix = [uid, ...]")
    return {str(k): _int_list(x) for k, x in v.items()}


_DOMAIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_DOMAINS = 63          # one region fd each in a HELLO reply, beside the default domain's


def _domains(v: Any) -> dict[str, dict[str, Any]]:
    """access.domains: name -> {namespaces = [prefix, ...], host_bytes = size}."""
    if not isinstance(v, dict):
        raise ValueError('expected a table such as { tenant-a = { namespaces = ["tenant-a"], host_bytes = "1GiB" } }')
    if len(v) > MAX_DOMAINS:
        raise ValueError(f"at most {MAX_DOMAINS} domains, got {len(v)}")
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for name, d in v.items():
        if not isinstance(name, str) or not _DOMAIN_NAME_RE.match(name) or name == "default":
            raise ValueError(f"domain name {name!r}: use letters, digits, '.', '_', '-' (and not 'default', "
                             f"which is every namespace no domain names)")
        if not isinstance(d, dict) or set(d) - {"namespaces", "host_bytes"} or "namespaces" not in d \
                or "host_bytes" not in d:
            raise ValueError(f"domain {name!r}: expected {{ namespaces = [prefix, ...], host_bytes = size }}")
        prefixes = d["namespaces"]
        if not isinstance(prefixes, (list, tuple)) or not prefixes or \
                not all(isinstance(p, str) and p.strip("/") for p in prefixes):
            raise ValueError(f"domain {name!r}: namespaces must be a non-empty list of non-empty prefixes")
        for p in prefixes:
            other = seen.setdefault(p.rstrip("/"), name)
            if other != name:
                raise ValueError(f"namespace prefix {p!r} is in domains {other!r} and {name!r}; give it to one")
        out[name] = {"namespaces": tuple(prefixes), "host_bytes": parse_size(d["host_bytes"])}
    return out


def opt(default: Any, parse: Callable[[Any], Any], doc: str, live: bool = False) -> Any:
    """A config key: its default, parser, doc line, and whether SIGHUP may change it."""
    meta = {"parse": parse, "doc": doc, "live": live}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------- schema

@dataclass
class ServerConfig:
    socket: str = opt("", _str, "Unix socket path; empty: /run/kvtierd/kvtierd.sock or the per-user runtime dir")
    socket_mode: int = opt(0o660, _mode, "permission bits of the socket")
    socket_group: str = opt("", _str, "group owning the socket; empty: the daemon's group")
    max_frame_bytes: int = opt(64 << 20, _size(4096, 1 << 30), "largest request frame accepted, and largest reply sent (a GET whose reply would be bigger is refused)", live=True)
    frame_cache_bytes: int = opt(512 << 20, _size(0, 16 << 30), "large frame buffers (requests and replies with blocks in them) kept for the next frame, in all: a new one faults in page by page, so this should hold a burst's frames in flight at once (8 clients putting 32 MiB each: 256 MiB); they are memory the daemon holds, let go after server.frame_cache_idle_s unused", live=True)
    frame_cache_idle_s: float = opt(30.0, _num(float, 0.1, 86400.0), "a kept frame buffer nobody took for this long is let go (the memory of a burst of large frames goes back once it is over)", live=True)
    max_connections: int = opt(1024, _num(int, 1), "connections beyond this are refused", live=True)
    max_connections_per_uid: int = opt(512, _num(int, 1), "connections one uid (root too) may hold at once; beyond this they are refused (LIMIT), so one uid cannot lock others out", live=True)
    busy_poll_us: float = opt(50.0, _num(float, 0, 1000), "after answering, spin up to this long for the next request instead of sleeping (only while requests do come that fast); 0: never")
    max_pipelined: int = opt(1024, _num(int, 1, 1 << 20), "requests queued per connection behind a waiting one; beyond this (or max_frame_bytes of queued frames) the daemon stops reading that connection until the queue drains", live=True)
    hello_timeout_s: float = opt(5.0, _num(float, 0.01), "a connection that has not said hello by then is closed", live=True)
    idle_timeout_s: float = opt(600.0, _num(float, 0), "a connection with no request for this long and no lease or reservation is closed (clients reconnect on their next call); 0 disables", live=True)
    lease_timeout_s: float = opt(60.0, _num(float, 0.01), "a lease not released by then is revoked", live=True)
    reservation_timeout_s: float = opt(60.0, _num(float, 0.01), "an uncommitted reservation older than this is aborted", live=True)
    drain_timeout_s: float = opt(10.0, _num(float, 0), "on SIGTERM, how long in-flight work may take before exit")
    max_namespaces: int = opt(4096, _num(int, 1), "namespaces the daemon holds at most; opening one more is refused (LIMIT)", live=True)
    max_namespaces_per_uid: int = opt(256, _num(int, 1), "namespaces one uid may create at most (root is not limited)", live=True)


@dataclass
class StateConfig:
    dir: str = opt("", _str, "state directory (disk segment and hint files); empty: /var/lib/kvtierd or the per-user state dir")


@dataclass
class HostConfig:
    bytes: int = opt(1 << 30, _size(1 << 20), "size of the host tier of the default domain (a shared-memory region handed to clients as an fd)")
    slab_bytes: int = opt(16 << 20, _size(1 << 16, 1 << 30), "slab size: the region is split into slabs, each holding slots of one size class")
    high_watermark: float = opt(0.95, _num(float, 0.0, 1.0), "above this fill, the coldest blocks move down a tier", live=True)
    low_watermark: float = opt(0.85, _num(float, 0.0, 1.0), "demotion stops at this fill", live=True)
    shm_dir: str = opt("/dev/shm", _str, "where daemons before memfd regions left region files; scanned only to remove their leftovers")
    huge_pages: str = opt("off", _choice("off", "try", "on", "thp"), "back the host regions with huge pages: a process that maps a region then takes one page fault per huge page instead of 16-256 per MiB, so a worker that just started copies at memcpy speed; on: from the hugetlb pool (reserve them with vm.nr_hugepages), refusing to start when too few are free; thp: transparent huge pages, where the kernel's shmem_enabled policy allows them (advise, within_size, always), refusing to start where it does not; try: hugetlb, else transparent, else 4 KiB pages with a warning")
    populate: bool = opt(True, _bool, "after start, a background thread writes every page of the 4 KiB-page host regions once (MADV_POPULATE_WRITE, about 0.1-0.3 s of one core per GiB): until a page has been written, the first writer of it takes a page fault per 4 KiB, so a new daemon's first fill of its region runs at under half the speed of later ones (bench/fresh.py); off: pages are initialised by the traffic that first touches them")
    pin: bool = opt(True, _bool, "page-lock the region with cudaHostRegister when CUDA is present")
    reserve_wait_s: float = opt(1.0, _num(float, 0.0, 60.0), "a reserve that finds no room waits this long for moves in flight before answering FULL for the keys it could not place", live=True)
    checksums: bool = opt(True, _bool, "take an xxh3 of each host block at commit and check it before the block is persisted or sent elsewhere", live=True)
    verify_on_acquire: bool = opt(False, _bool, "also check it before a block is leased to a reader (a block changed behind the daemon's back is then a miss); off by default: it costs 31-44% of load throughput on a 2-core VM (bench/verify_cost.py)", live=True)


@dataclass
class DiskConfig:
    bytes: int = opt(8 << 30, _size(0), "byte limit of the disk tier; 0 disables it", live=True)
    segment_bytes: int = opt(0, _size(0, 64 << 30), "size of one segment file; 0: min(1 GiB, disk.bytes / 8), at least 1 MiB, in whole MiB")
    io_threads: int = opt(4, _num(int, 1, 64), "threads doing disk I/O")
    io_depth: int = opt(8, _num(int, 1, 1024), "disk I/Os in flight at most", live=True)
    io_bytes: int = opt(4 << 20, _size(4096, 256 << 20), "bytes per write or read I/O (many blocks per I/O)")
    durability: str = opt("batch", _choice("batch", "interval", "never"), "fdatasync per batch, per interval, or never", live=True)
    fsync_interval_s: float = opt(1.0, _num(float, 0.001), "with durability=interval, the longest a committed write stays unsynced", live=True)
    direct_io: str = opt("auto", _choice("auto", "on", "off"), "O_DIRECT: auto falls back to buffered I/O (and says so) where unsupported")
    flush_on_shutdown: bool = opt(True, _bool, "on clean shutdown write host-tier blocks to disk so a restart keeps them", live=True)
    compaction_threshold: float = opt(0.5, _num(float, 0.0, 1.0), "segments whose live fraction falls below this are compacted", live=True)
    compaction_io_share: float = opt(0.25, _num(float, 0.01, 1.0), "largest share of disk time compaction may take", live=True)
    high_watermark: float = opt(0.95, _num(float, 0.0, 1.0), "above this fill, the coldest disk blocks are evicted", live=True)
    low_watermark: float = opt(0.90, _num(float, 0.0, 1.0), "eviction stops at this fill", live=True)

    def effective_segment_bytes(self) -> int:
        """disk.segment_bytes, or when 0 the size derived from disk.bytes: min(1 GiB, bytes / 8)
        rounded down to whole MiB, at least 1 MiB (8 segments keep compaction's headroom small)."""
        if self.segment_bytes:
            return self.segment_bytes
        return max(1 << 20, min(1 << 30, self.bytes // 8) >> 20 << 20)


@dataclass
class HbmConfig:
    bytes: int = opt(0, _size(0), "bytes of HBM pool per GPU; 0 disables the HBM tier")
    devices: tuple = opt((), _int_list, "CUDA device ordinals; empty: device 0")
    high_watermark: float = opt(0.95, _num(float, 0.0, 1.0), "above this fill, the coldest blocks move to host", live=True)
    low_watermark: float = opt(0.85, _num(float, 0.0, 1.0), "demotion stops at this fill", live=True)


@dataclass
class MetricsConfig:
    address: str = opt("127.0.0.1:9477", _str, "host:port of the Prometheus endpoint; empty disables it")
    hot_keys: int = opt(10, _num(int, 0, 1000), "top-N most read keys kept per namespace for `kvtierd stats --hot`", live=True)
    hot_window_s: float = opt(60.0, _num(float, 1.0), "sliding window of the hot-key counts", live=True)
    max_namespaces: int = opt(32, _num(int, 1, 10000), "namespaces named in metric labels; the rest are 'other'")


@dataclass
class LogConfig:
    level: str = opt("info", _choice("debug", "info", "warning", "error"), "log level", live=True)
    format: str = opt("text", _choice("text", "json"), "plain text or one JSON object per line", live=True)


@dataclass
class AccessConfig:
    allowed_uids: tuple = opt((), _int_list, "uids admitted on the socket; empty: the daemon's own uid (root is always admitted)", live=True)
    allowed_gids: tuple = opt((), _int_list, "gids admitted on the socket; empty: the daemon's own gid", live=True)
    namespaces: dict = opt({}, _ns_acl, "namespace-name prefix -> uids allowed to open it", live=True)
    domains: dict = opt({}, _domains, "access domains: name -> { namespaces = [prefix, ...], host_bytes = size }; each has its own host region, sent only to uids that may open one of its namespaces; other namespaces are in the default domain (host.bytes)")


def _remote_url(v: Any) -> str:
    v = _str(v).strip()
    if v and not re.match(r"^rediss?://[^/?#]+", v):
        raise ValueError(f"expected redis://HOST:PORT or rediss://HOST:PORT (empty: no remote tier), got {v!r}")
    return v


@dataclass
class RemoteConfig:
    url: str = opt("", _remote_url, "redis://HOST:PORT or rediss://HOST:PORT of any node of a Redis/Valkey cluster or a single server; empty: no remote tier")
    username: str = opt("", _str, "Redis ACL user; empty: the URL's, or the default user")
    password: str = opt("", _str, "Redis password; empty: the URL's, or $KVTIERD_REMOTE_PASSWORD")
    tls_ca_file: str = opt("", _str, "with rediss://: CA bundle that signs the servers' certificates; empty: the system's")
    tls_cert_file: str = opt("", _str, "with rediss://: client certificate (PEM) for mutual TLS")
    tls_key_file: str = opt("", _str, "with rediss://: private key of tls_cert_file")
    tls_verify: bool = opt(True, _bool, "with rediss://: check the servers' certificates and host names")
    bytes: int = opt(0, _size(0), "most bytes this daemon keeps written in the remote (counted until their TTL ends); 0: no limit but Redis's maxmemory")
    ttl_s: float = opt(86400.0, _num(float, 0), "expiry of the blocks kvtierd writes; 0: none (rely on Redis eviction)")
    write_policy: str = opt("commit", _choice("commit", "demote", "off"), "commit: write each block soon after commit; demote: when it leaves the local tiers; off: read only")
    connect_timeout_s: float = opt(1.0, _num(float, 0.001), "time allowed to open a connection to a node")
    op_timeout_s: float = opt(2.0, _num(float, 0.001), "time allowed for one pipelined round (bounded by pipeline_bytes)")
    lookup_budget_s: float = opt(0.005, _num(float, 0.0001), "the longest a lookup waits for the remote; later answers count as misses")
    max_inflight_bytes: int = opt(256 << 20, _size(1 << 20), "bytes of writes queued or in flight at most; further writes are dropped (counted)")
    pipeline_bytes: int = opt(16 << 20, _size(64 << 10, 1 << 30), "bytes of values per pipelined round at most (redis-py buffers a whole pipeline)")
    breaker_failures: int = opt(3, _num(int, 1), "failed or slow rounds in a row that open the circuit breaker (the remote is then skipped)")
    breaker_open_s: float = opt(1.0, _num(float, 0.01), "while open, how often a probe tries to reconnect; the tier resumes when one succeeds")


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    state: StateConfig = field(default_factory=StateConfig)
    host: HostConfig = field(default_factory=HostConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    hbm: HbmConfig = field(default_factory=HbmConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)

    def summary(self) -> str:
        return (f"socket={self.server.socket} state={self.state.dir} host={format_size(self.host.bytes)} "
                f"disk={format_size(self.disk.bytes)} hbm={format_size(self.hbm.bytes)} "
                f"metrics={self.metrics.address or 'off'} "
                f"remote={re.sub(r'//[^@/]*@', '//', self.remote.url) or 'off'}")

    def live_keys(self) -> set[str]:
        return {f"{s.name}.{f.name}" for s in dataclasses.fields(self)
                for f in dataclasses.fields(getattr(self, s.name)) if f.metadata.get("live")}


SECTIONS: dict[str, type] = {f.name: f.type if isinstance(f.type, type) else globals()[f.type]
                             for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------------- loading

def set_value(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` from raw input, validating it. Raises ConfigError."""
    section, _, key = dotted.partition(".")
    if section not in SECTIONS:
        raise ConfigError(f"{dotted}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
    sect = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(sect)}
    if key not in fields:
        raise ConfigError(f"{dotted}: unknown key (known in [{section}]: {', '.join(fields)})")
    try:
        setattr(sect, key, fields[key].metadata["parse"](value))
    except ValueError as e:
        raise ConfigError(f"{dotted}: {e}") from None


def _apply_table(cfg: Config, data: dict[str, Any], source: str) -> None:
    for section, table in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, value in table.items():
            set_value(cfg, f"{section}.{key}", value)


def _writable_dir(path: Path) -> bool:
    """True if `path` exists and we may create files in it, or could create it."""
    p = path
    while not p.exists():
        p = p.parent
    return os.access(p, os.W_OK | os.X_OK)


def default_runtime_dir() -> Path:
    if _writable_dir(Path("/run/kvtierd")) and os.geteuid() == 0:
        return Path("/run/kvtierd")
    xdg = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    if xdg and _writable_dir(Path(xdg)):
        return Path(xdg) / "kvtierd" if "RUNTIME_DIRECTORY" not in os.environ else Path(xdg)
    return Path(f"/tmp/kvtierd-{os.getuid()}")


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0 and _writable_dir(Path("/var/lib/kvtierd")):
        return Path("/var/lib/kvtierd")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "kvtierd"


def default_socket_path() -> Path:
    """Where clients and CLI look for the daemon when told nothing else."""
    env = os.environ.get("KVTIERD_SOCKET")
    return Path(env) if env else default_runtime_dir() / "kvtierd.sock"


def validate(cfg: Config) -> None:
    """Checks that span keys. Raises ConfigError."""
    for name in ("host", "disk", "hbm"):
        s = getattr(cfg, name)
        if s.low_watermark > s.high_watermark:
            raise ConfigError(f"{name}.low_watermark ({s.low_watermark}) must not exceed "
                              f"{name}.high_watermark ({s.high_watermark})")
    if cfg.host.slab_bytes > cfg.host.bytes:
        raise ConfigError(f"host.slab_bytes ({format_size(cfg.host.slab_bytes)}) must not exceed "
                          f"host.bytes ({format_size(cfg.host.bytes)})")
    for name, d in cfg.access.domains.items():
        if d["host_bytes"] < cfg.host.slab_bytes:
            raise ConfigError(f"access.domains.{name}.host_bytes ({format_size(d['host_bytes'])}) must be at "
                              f"least host.slab_bytes ({format_size(cfg.host.slab_bytes)})")
    seg = cfg.disk.segment_bytes
    if cfg.disk.bytes and cfg.disk.bytes < (1 << 20):
        raise ConfigError(f"disk.bytes ({format_size(cfg.disk.bytes)}) must be 0 (no disk tier) or at least 1 MiB")
    if seg and seg < (1 << 20):
        raise ConfigError(f"disk.segment_bytes ({format_size(seg)}) must be 0 (derived from disk.bytes) "
                          "or at least 1 MiB")
    if cfg.disk.bytes and seg > cfg.disk.bytes:
        raise ConfigError(f"disk.segment_bytes ({format_size(seg)}) must not exceed disk.bytes "
                          f"({format_size(cfg.disk.bytes)}); leave disk.segment_bytes at 0 to derive it")
    if cfg.metrics.address:
        host, sep, port = cfg.metrics.address.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"metrics.address: expected host:port, got {cfg.metrics.address!r}")
    r = cfg.remote
    if (r.tls_ca_file or r.tls_cert_file or r.tls_key_file) and not r.url.startswith("rediss://"):
        raise ConfigError("remote.tls_*: TLS files are used with a rediss:// url only")
    if bool(r.tls_cert_file) != bool(r.tls_key_file):
        raise ConfigError("remote.tls_cert_file and remote.tls_key_file go together")


def load(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file (if any), then overrides; paths resolved; validated."""
    cfg = Config()
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        _apply_table(cfg, data, str(path))
    for key, value in (overrides or {}).items():
        set_value(cfg, key, value)
    if not cfg.server.socket:
        cfg.server.socket = str(default_socket_path())
    if not cfg.state.dir:
        cfg.state.dir = str(default_state_dir())
    validate(cfg)
    return cfg


def _show(name: str, value: Any) -> str:
    """A default as a user would write it in the TOML file."""
    if name.endswith("bytes") and isinstance(value, int) and value:
        for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if value % (1 << shift) == 0:
                return f'"{value >> shift}{unit}"'
    if name.endswith("_mode"):
        return f'"{value:04o}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return repr(value)


def describe() -> list[tuple[str, str, str, bool]]:
    """(key, default, doc, live) for every key: the config reference."""
    out = []
    for s in dataclasses.fields(Config):
        for f in dataclasses.fields(SECTIONS[s.name]):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((f"{s.name}.{f.name}", _show(f.name, default), f.metadata["doc"], f.metadata["live"]))
    return out
