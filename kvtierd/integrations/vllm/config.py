"""The connector's settings: `kv_connector_extra_config` keys, checked, with their defaults.

    socket             daemon socket (default: $KVTIERD_SOCKET, else the client's default path)
    tenant_salt        a string mixed into the namespace: engines with different salts never share
                       blocks (vLLM's per-request cache_salt is part of each block hash as well)
    blocks_per_chunk   vLLM blocks per kvtierd block (default 1); larger blocks mean fewer, bigger
                       copies and daemon entries, but hits and saves come in whole chunks only
    tier               where workers read blocks: "host" (shared host memory; the CPU default),
                       "any" (HBM blocks by CUDA IPC, host blocks by DMA; the GPU default) or
                       "hbm" (host blocks are promoted to the daemon's HBM pool first)
    model_id           the model identity in the namespace (default: vLLM's model name or path,
                       revision and a digest of its config); set it when one path can hold
                       different weights, or the same weights live at different paths
    load / save        turn loading or saving off (default true; e.g. a read-only replica)
    async_save         on a GPU, commit saves in a later step instead of waiting at the end of
                       this one; finished requests keep their blocks until then (default false)
    lookup_timeout_s   the scheduler's bound on one daemon round trip (default 1.0)
    io_timeout_s       the workers' bound on one daemon round trip (default 10.0)
    retry_s            the first reconnect backoff after a failure, doubling to 30 s (default 1.0)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ConnectorConfig:
    socket: str | None = None
    tenant_salt: str = ""
    blocks_per_chunk: int = 1
    tier: str | None = None
    model_id: str | None = None
    load: bool = True
    save: bool = True
    async_save: bool = False
    lookup_timeout_s: float = 1.0
    io_timeout_s: float = 10.0
    retry_s: float = 1.0

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> "ConnectorConfig":
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"unknown kvtierd connector setting(s) {unknown}; known: {sorted(known)}")
        vals: dict[str, Any] = {}
        for k, v in extra.items():
            vals[k] = _coerce(k, v, known[k].type)
        cfg = cls(**vals)
        if cfg.socket is None and os.environ.get("KVTIERD_SOCKET"):
            cfg = cls(**{**cfg.__dict__, "socket": os.environ["KVTIERD_SOCKET"]})
        if cfg.blocks_per_chunk < 1:
            raise ValueError(f"blocks_per_chunk must be >= 1, got {cfg.blocks_per_chunk}")
        if cfg.tier not in (None, "host", "any", "hbm"):
            raise ValueError(f"tier must be 'host', 'any' or 'hbm', not {cfg.tier!r}")
        for name in ("lookup_timeout_s", "io_timeout_s", "retry_s"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(cfg, name)}")
        return cfg


def _coerce(key: str, v: Any, typ: Any) -> Any:
    t = str(typ)
    if "bool" in t:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("1", "true", "yes", "0", "false", "no"):
            return v.lower() in ("1", "true", "yes")
        raise ValueError(f"{key} must be true or false, got {v!r}")
    if "int" in t and "None" not in t:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise ValueError(f"{key} must be an integer, got {v!r}")
        try:
            return int(v)
        except ValueError:
            raise ValueError(f"{key} must be an integer, got {v!r}") from None
    if "float" in t:
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number, got {v!r}") from None
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{key} must be a string, got {v!r}")
    return v
