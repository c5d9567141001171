"""The worker's copy path: its paged KV cache <-> daemon slots, one launch per batch.

A worker process maps the daemon's host region (the Client does that) and, with
CUDA, page-locks its own mapping (cudaHostRegister, chunked) so kernels write
host slots at PCIe speed, and opens the HBM pool by CUDA IPC once. Then:

    copier = PagedCopier(PagedLayout.from_layers(kv_caches, pages_per_block=G))
    n = store_pages(ns, copier, page_ids, keys, tier="hbm")   # reserve, gather, sync, commit
    n = load_pages(ns, copier, keys, page_ids)                # acquire, scatter, sync, release

Block b of `keys` is pages page_ids[b*G:(b+1)*G]. The daemon maps no worker
memory, so a worker that dies leaves nothing stale in the daemon: its leases
and reservations end with its connection. Without CUDA the same calls run the
torch fallback on CPU tensors.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from kvtierd.gpu import cuda


class WorkerRegions:
    """This process's views of the daemon's tiers as copy regions (made once per client)."""

    def __init__(self, client: Any):
        self.client = client
        self.pins: dict[str, Any] = {}
        self.pool: Any = None
        self._hosts: dict[str, Any] = {}

    def host(self, domain: str = "default") -> Any:
        """The host region of access domain `domain` (a namespace's `.domain`)."""
        if domain not in self._hosts:
            from kvtierd.gpu import paged, pinning
            mapping = self.client.regions.get(domain)
            if mapping is None:
                raise PermissionError(f"no host region of access domain {domain!r} is mapped in this process")
            mm = mapping.mmap
            if cuda.driver_present() and cuda.torch_cuda():
                self.pins[domain] = pinning.pin_buffer(mm)
            self._hosts[domain] = paged.Region.from_buffer(mm, pinned=self.pins.get(domain))
        return self._hosts[domain]

    def hbm(self) -> Any:
        if self.pool is None:
            pools = self.client.server_info.get("hbm") or []
            if not pools:
                raise cuda.CudaUnavailable("the daemon has no HBM tier")
            from kvtierd.gpu import ipc
            self.pool = ipc.open_pool(pools[0]["handle"])
        return self.pool.region()

    def region(self, tier: str, domain: str = "default") -> Any:
        return self.hbm() if tier == "hbm" else self.host(domain)

    def close(self) -> None:
        # Unregister before the client unmaps the regions; close our IPC mapping.
        self._hosts.clear()
        for pin in self.pins.values():
            pin.close()
        self.pins.clear()
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def _block_pages(page_ids: Sequence[int], group: int, blocks: Sequence[int]) -> np.ndarray:
    ids = np.asarray(page_ids, dtype=np.int64).reshape(-1, group)
    return ids[np.asarray(blocks, dtype=np.int64)].reshape(-1) if len(blocks) else np.empty(0, np.int64)


def _check(ns: Any, copier: Any, keys: Sequence[bytes], page_ids: Sequence[int]) -> int:
    g = copier.layout.group
    if copier.layout.block_bytes != ns.block_size:
        raise ValueError(f"the layout's block is {copier.layout.block_bytes} bytes, namespace {ns.name!r} "
                         f"has block size {ns.block_size}")
    if len(page_ids) != len(keys) * g:
        raise ValueError(f"{len(keys)} keys need {len(keys) * g} page ids, got {len(page_ids)}")
    return g


def _wait(event: Any) -> None:
    if event is not None:
        event.synchronize()


def store_pages(ns: Any, copier: Any, page_ids: Sequence[int], keys: Sequence[bytes], tier: str = "host",
                stream: Any = None) -> int:
    """Gathers the pages of `keys` not yet stored into slots of `tier` and commits them.
    Returns how many blocks were new."""
    from kvtierd.protocol import Op
    g = _check(ns, copier, keys, page_ids)
    client = ns.client
    res = client._call(Op.RESERVE, {"ns": ns.id, "keys": list(keys), "tier": tier})
    if not res["index"]:
        client._call(Op.COMMIT, {"rid": res["rid"]})
        return 0
    try:
        region = client.worker_regions().region(res["tier"], ns.domain)
        _wait(copier.gather(_block_pages(page_ids, g, res["index"]), region, res["offsets"], stream))
    except BaseException:
        client._call(Op.ABORT, {"rid": res["rid"]})
        raise
    return client._call(Op.COMMIT, {"rid": res["rid"]})["n"]


def load_pages(ns: Any, copier: Any, keys: Sequence[bytes], page_ids: Sequence[int], tier: str = "any",
               stream: Any = None) -> int:
    """Scatters the longest stored prefix of `keys` into the given pages. Returns
    how many leading blocks were loaded; pages of the rest are untouched.
    tier "any" reads blocks where they are (HBM by IPC, host by DMA); "hbm"
    promotes host blocks to HBM first."""
    from kvtierd.protocol import Op
    g = _check(ns, copier, keys, page_ids)
    client = ns.client
    lease = client._call(Op.ACQUIRE, {"ns": ns.id, "keys": list(keys), "prefix": True, "tier": tier})
    try:
        offsets, tiers = lease["offsets"], lease["tiers"]
        regions = client.worker_regions()
        events = []
        for t in ("hbm", "host"):
            blocks = [i for i, bt in enumerate(tiers) if bt == t]
            if blocks:
                events.append(copier.scatter(regions.region(t, ns.domain), [offsets[i] for i in blocks],
                                             _block_pages(page_ids, g, blocks), stream))
        for ev in events:      # the slots are ours only until release
            _wait(ev)
    finally:
        client._call(Op.RELEASE, {"lid": lease["lid"]})
    return len(offsets)
