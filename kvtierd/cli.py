"""Command line: `kvtierd serve | stats | ping | fsck | config`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from kvtierd import __version__
from kvtierd.config import ConfigError, default_socket_path, describe, format_size, load
from kvtierd.logs import json_safe, printable
from kvtierd.protocol import ProtocolError

# CLI flag -> config key, for the common overrides.
SERVE_FLAGS = {
    "socket": "server.socket", "state_dir": "state.dir", "host_bytes": "host.bytes",
    "disk_bytes": "disk.bytes", "hbm_bytes": "hbm.bytes", "log_level": "log.level",
    "metrics_address": "metrics.address",
}


def _overrides(args: argparse.Namespace) -> dict:
    out = {key: getattr(args, flag) for flag, key in SERVE_FLAGS.items() if getattr(args, flag) is not None}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out[key.strip()] = value.strip()
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from kvtierd import logs
    try:
        overrides = _overrides(args)
        cfg = load(args.config, overrides)
    except ConfigError as e:
        print(f"kvtierd: bad configuration: {e}", file=sys.stderr)
        return 2
    logs.setup(cfg.log.level, cfg.log.format)
    from kvtierd.daemon import StartupError, serve
    from kvtierd.tiers.host import HostRegionError
    try:
        return serve(cfg, args.config, overrides)
    except (StartupError, HostRegionError, OSError) as e:
        logging.getLogger("kvtierd").error("cannot start: %s", e)
        print(f"kvtierd: cannot start: {e}", file=sys.stderr)
        return 1


def _connect(args: argparse.Namespace):
    from kvtierd.client import Client
    return Client(args.socket or default_socket_path(), timeout=10.0, name="kvtierd-cli")


def cmd_ping(args: argparse.Namespace) -> int:
    try:
        t0 = time.perf_counter()
        with _connect(args) as c:
            c.ping()
            dt = time.perf_counter() - t0
            print(f"kvtierd at {c.socket_path}: {c.server_info['server']}, pid {c.server_info['pid']}, "
                  f"answered in {dt * 1000:.2f} ms")
        return 0
    except (ConnectionError, OSError, ProtocolError) as e:
        # A refusal (KvtierdError, a ProtocolError) prints as "DENIED: too many connections ...".
        print(f"kvtierd: {e}", file=sys.stderr)
        return 1


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def render_stats(s: dict) -> str:
    lines = []
    srv = s.get("server", {})
    lines.append(f"kvtierd {srv.get('version', '?')}  pid {srv.get('pid', '?')}  up {srv.get('uptime_s', 0):.0f}s  "
                 f"clients {s.get('clients', 0)}  leases {s.get('leases', 0)}  "
                 f"reservations {s.get('reservations', 0)}  lease timeouts {s.get('lease_timeouts', 0)}")
    rec = s.get("recovery")
    if rec and not rec.get("done", True):
        lines.append(f"recovering disk tier: {rec.get('records', 0)} records, {100 * rec.get('fraction', 0):.0f}%")
    lines.append("")
    lines.append(f"{'tier':<6} {'used':>12} {'capacity':>12} {'fill':>7} {'blocks':>10} {'hits':>10} {'served':>10}")
    for name, t in s.get("tiers", {}).items():
        used, cap = t.get("used_bytes", 0), t.get("capacity_bytes", 0)
        lines.append(f"{name:<6} {format_size(used):>12} {format_size(cap):>12} "
                     f"{_pct(t.get('used_bytes', 0), t.get('capacity_bytes', 0)):>7} {t.get('blocks', 0):>10} "
                     f"{t.get('hits', 0):>10} {t.get('served_blocks', 0):>10}")
    hits = sum(t.get("hits", 0) for t in s.get("tiers", {}).values())
    misses = s.get("misses", 0)
    lines.append(f"lookup hit rate {_pct(hits, hits + misses)} ({hits} hits, {misses} misses)")
    if s.get("namespaces"):
        lines.append("")
        lines.append(f"{'namespace':<32} {'block':>10} {'blocks':>8} {'hit rate':>9} {'tokens saved':>13}")
        for ns in s["namespaces"]:
            lines.append(f"{printable(ns['name'])[:32]:<32} {format_size(ns['block_size']):>10} {ns['blocks']:>8} "
                         f"{_pct(ns['hits'], ns['hits'] + ns['misses']):>9} {ns.get('tokens_served', 0):>13}")
    moves = s.get("moves", [])
    if moves or s.get("evictions"):
        lines.append("")
        for m in moves:
            lines.append(f"{m['kind']:<8} {m['src']}->{m['dst']}: {m['blocks']} blocks, {format_size(m['bytes'])}")
        for tier, n in s.get("evictions", {}).items():
            lines.append(f"evicted from {tier}: {n} blocks")
    d = s.get("disk") or {}
    if d:
        lines.append("")
        lines.append(f"disk: direct I/O {'on' if d.get('direct_io') else 'OFF (buffered)'}"
                     f"{'  REFUSING WRITES' if d.get('refusing_writes') else ''}  "
                     f"checksum failures {d.get('checksum_failures', 0)}  torn records {d.get('torn_records', 0)}  "
                     f"I/O errors {d.get('io_errors', 0)}  compactions {d.get('compaction_runs', 0)}")
    r = s.get("remote") or {}
    if r:
        lines.append("")
        dropped = sum((r.get("dropped") or {}).values())
        where = f"cluster, {r.get('masters', 0)} masters" if r.get("cluster") else "one server"
        lines.append(f"remote: {r.get('url', '?')} ({where})  breaker {r.get('state', '?')}  "
                     f"writes {r.get('writes', 0)} ({format_size(r.get('written_bytes', 0))})  "
                     f"pulled {r.get('hits', 0)} ({format_size(r.get('read_bytes', 0))})  dropped writes {dropped}  "
                     f"queue {format_size(r.get('inflight_bytes', 0))}  errors {r.get('errors', 0)}  "
                     f"corrupt {r.get('corrupt', 0)}")
    if s.get("errors"):
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(s["errors"].items())))
    return "\n".join(lines)


def render_hot(hot: dict) -> str:
    lines = []
    for ns, items in hot.items():
        lines.append(f"{printable(ns)}:")
        for key_hex, count in items:
            lines.append(f"  {count:>8}  {printable(key_hex)}")
    return "\n".join(lines) or "no reads in the window"


def cmd_stats(args: argparse.Namespace) -> int:
    try:
        with _connect(args) as c:
            while True:
                if args.hot:
                    hot = c.hot()
                    out = json_safe(json.dumps(hot, indent=2)) if args.json else render_hot(hot)
                else:
                    s = c.stats()
                    out = json_safe(json.dumps(s, indent=2, default=str)) if args.json else render_stats(s)
                if args.watch:
                    sys.stdout.write("\x1b[H\x1b[2J" + out + "\n")
                    sys.stdout.flush()
                    time.sleep(1.0)
                    continue
                print(out)
                return 0
    except KeyboardInterrupt:
        return 0
    except (ConnectionError, OSError, ProtocolError) as e:
        print(f"kvtierd: {e}", file=sys.stderr)
        return 1


def cmd_fsck(args: argparse.Namespace) -> int:
    from kvtierd.disk.fsck import main as fsck_main
    return fsck_main([args.state_dir] + (["--repair"] if args.repair else []))


def cmd_config(args: argparse.Namespace) -> int:
    for key, default, doc, live in describe():
        print(f"{key:<32} {default:<20} {'(live) ' if live else ''}{doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvtierd", description="Tiered KV-cache daemon for LLM inference workers.")
    p.add_argument("--version", action="version", version=f"kvtierd {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="TOML config file (default: built-in defaults)")
    s.add_argument("--socket", help="Unix socket path")
    s.add_argument("--state-dir", help="state directory (disk tier, checkpoints)")
    s.add_argument("--host-bytes", help="host tier size, e.g. 4GiB")
    s.add_argument("--disk-bytes", help="disk tier size, 0 disables it")
    s.add_argument("--hbm-bytes", help="HBM pool per GPU, 0 disables it")
    s.add_argument("--metrics-address", help="host:port for Prometheus, empty disables it")
    s.add_argument("--log-level", help="debug, info, warning or error")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="any config key (repeatable)")
    s.set_defaults(func=cmd_serve)

    for name, func, helptext in (("ping", cmd_ping, "check the daemon answers"),
                                 ("stats", cmd_stats, "tiers, hit rates, clients")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("--socket", help="Unix socket path (default: $KVTIERD_SOCKET or the runtime dir)")
        if name == "stats":
            c.add_argument("--json", action="store_true", help="machine-readable output")
            c.add_argument("--watch", action="store_true", help="refresh every second")
            c.add_argument("--hot", action="store_true", help="most read keys per namespace")
        c.set_defaults(func=func)

    f = sub.add_parser("fsck", help="verify (and repair) a stopped daemon's disk tier")
    f.add_argument("state_dir")
    f.add_argument("--repair", action="store_true",
                   help="drop corrupt and torn records, replace bad hint files (stray files are only listed)")
    f.set_defaults(func=cmd_fsck)

    c = sub.add_parser("config", help="list every config key with its default")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # `kvtierd config | head`: the reader left; not an error worth a traceback.
        sys.stderr.close()
        return 0
