"""The worker's copy path: paged KV cache pages <-> daemon slots, per batch.

A worker keeps its KV cache as pages: for each layer a K and a V tensor
[num_pages, page_tokens, kv_heads, head_dim] (or the two stacked as
[2, num_pages, ...]), with any strides. kvtierd stores *blocks*: a block is
one page-group of `pages_per_block` pages, all planes.

Block byte layout (what a daemon slot holds, the contract with every reader):
  planes in layout order (layer 0 K, layer 0 V, layer 1 K, ...); inside a
  plane its pages in the order given; inside a page the elements in row-major
  order of the page's logical shape, i.e. the bytes of
  `plane.select(page_dim, page).contiguous()`. So plane p, page j of a block
  sits at `plane_offsets[p] + j * page_bytes[p]`, and one layer's bytes are
  contiguous (a reader can load layer by layer).

A layout is described by tensors (shape + strides) and the dim that indexes
pages, never by engine name: `PagedLayout.from_layers` takes per-layer K/V,
`PagedLayout.from_stacked` the [2, num_pages, ...] form, the constructor any
list of (tensor, page_dim).

Two backends produce identical bytes:
- "cuda": one launch of native/paged_copy.cu per batch, however many pages
  (one cudaMemcpyAsync per 16 KiB page reaches ~1 GB/s; a batched kernel runs
  at PCIe speed). Slots live in a Region the GPU can address: the daemon's
  HBM pool (opened by CUDA IPC) or the host shared-memory region registered
  with cudaHostRegister(mapped). For host regions there are two ways, chosen
  by `mode`: "direct" (the kernel reads/writes host memory over PCIe) and
  "staged" (the kernel gathers into device memory, then one cudaMemcpyAsync
  per run of adjacent slots). bench/gpu.py measures both; "auto" takes the
  one that measured faster (see AUTO_HOST_MODE).
- "torch": index_select / index_copy_ on integer views of the tensors, on CPU
  or on a GPU without cupy. It is the reference the kernels are tested
  against, and what CI runs.

Page ids and slot offsets are host-side integers (they come from the daemon's
reply and the worker's block table); they are validated before anything
moves: a bad id or offset raises, it never writes out of bounds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kvtierd.gpu import cuda

PLANE_WORDS = 16
MAX_DIMS = 5
CHUNK_BYTES = 16 << 10
THREADS = 256
BLOCKS_PER_SM = 4
# Which host-region path "auto" takes per direction, from bench/gpu.py on an
# H100 (bench/README.md): "direct" (kernel over mapped memory) moved 256 MiB
# batches at 0.90 (gather) / 0.87 (scatter) of the pinned cudaMemcpy ceiling,
# "staged" (device gather + cudaMemcpyAsync per run) at 0.81 / 0.84, for both
# 2 MiB contiguous blocks and scattered 16 KiB pages. Grid size (2-8 CTAs per
# SM) made no difference beyond noise.
AUTO_HOST_MODE = {"gather": "direct", "scatter": "direct"}

_INT_OF_SIZE = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _pow2_divisor(x: int, cap: int = 16) -> int:
    """Largest power of two <= cap dividing x (x == 0 counts as divisible by anything)."""
    w = cap
    while w > 1 and x % w:
        w //= 2
    return w


# --------------------------------------------------------------------- regions

@dataclass
class Region:
    """A byte range that holds slots: `ptr` is the address kernels use.

    device is "cpu" for host memory (then `mapped` says kernels may address it
    because it was registered with cudaHostRegister(mapped)) or "cuda:N".
    `tensor` is a uint8 view of the same bytes for the torch backend; `owner`
    keeps whatever backs the memory (mmap, pin, IPC mapping) alive.
    dma_base/dma_chunk: host memory registered in chunks from dma_base;
    cudaMemcpy may not cross a chunk boundary (0: no limit).
    """

    ptr: int
    nbytes: int
    device: str
    tensor: Any = None
    mapped: bool = False
    owner: Any = None
    dma_base: int = 0
    dma_chunk: int = 0

    @property
    def is_host(self) -> bool:
        return self.device == "cpu"

    @classmethod
    def from_tensor(cls, t: Any, *, mapped: bool = False, owner: Any = None) -> "Region":
        """A region over a uint8 tensor (a CPU buffer, a CUDA buffer, an opened pool)."""
        import torch
        if t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError("a region tensor must be 1-D contiguous uint8")
        return cls(t.data_ptr(), t.numel(), str(t.device) if t.is_cuda else "cpu", t,
                   mapped and not t.is_cuda, owner)

    @classmethod
    def from_buffer(cls, buf: Any, *, pinned: Any = None) -> "Region":
        """A host region over a writable buffer (the mmap of the host tier).

        Pass the PinnedRegion from kvtierd.gpu.pinning when the buffer is
        registered: with mapped=True kernels address it directly.
        """
        import torch
        t = torch.frombuffer(buf, dtype=torch.uint8)
        mapped, dma_base, dma_chunk = False, 0, 0
        if pinned is not None:
            dma_base, dma_chunk = pinned.address, pinned.chunk_bytes
            inside = pinned.address <= t.data_ptr() and t.data_ptr() + t.numel() <= pinned.address + pinned.length
            if not inside:
                raise ValueError("the pinned range does not cover this buffer")
            mapped = bool(pinned.mapped and pinned.pinned)
        return cls(t.data_ptr(), t.numel(), "cpu", t, mapped, (buf, pinned), dma_base, dma_chunk)


# --------------------------------------------------------------------- layout

@dataclass(frozen=True)
class Plane:
    """One tensor whose dim `page_dim` indexes pages, as the kernel sees it."""

    tensor: Any
    page_dim: int
    page_bytes: int
    page_stride: int                  # bytes between pages
    dims: tuple[tuple[int, int], ...]  # (size, stride) in bytes, outermost first, innermost stride 1
    inner_shape: tuple[int, ...]      # logical shape of one page


def _describe(t: Any, page_dim: int) -> Plane:
    if t.dim() < 1:
        raise ValueError("a plane needs at least the page dimension")
    pd = page_dim if page_dim >= 0 else t.dim() + page_dim
    if not 0 <= pd < t.dim():
        raise ValueError(f"page_dim {page_dim} out of range for a {t.dim()}-d tensor")
    elem = t.element_size()
    shape = [s for i, s in enumerate(t.shape) if i != pd]
    strides = [s for i, s in enumerate(t.stride()) if i != pd]
    if t.stride(pd) == 0 and t.shape[pd] > 1:
        raise ValueError("pages alias each other (page stride 0)")
    dims: list[tuple[int, int]] = [(elem, 1)]
    for size, stride in zip(reversed(shape), reversed(strides), strict=True):
        if size == 1:
            continue
        if stride == 0:
            raise ValueError("a page has a broadcast (stride 0) dimension; its bytes alias")
        inner_size, inner_stride = dims[0]
        if stride * elem == inner_size * inner_stride:
            dims[0] = (size * inner_size, inner_stride)   # adjacent in memory: one longer run
        else:
            dims.insert(0, (size, stride * elem))
    page_bytes = math.prod(shape) * elem
    return Plane(t, pd, page_bytes, t.stride(pd) * elem, tuple(dims), tuple(shape))


class PagedLayout:
    """A worker's paged KV cache: planes in block order, and the block shape.

    `planes` is a list of (tensor, page_dim); every plane must have the same
    number of pages and live on one device. A block holds `pages_per_block`
    pages of every plane (see the module doc for the byte order).
    """

    def __init__(self, planes: Sequence[tuple[Any, int]], pages_per_block: int = 1):
        if not planes:
            raise ValueError("a layout needs at least one plane")
        if pages_per_block < 1:
            raise ValueError("pages_per_block must be >= 1")
        self.planes = [_describe(t, d) for t, d in planes]
        self.group = pages_per_block
        devices = {str(p.tensor.device) for p in self.planes}
        if len(devices) != 1:
            raise ValueError(f"planes live on several devices: {sorted(devices)}")
        self.device = devices.pop()
        counts = {p.tensor.shape[p.page_dim] for p in self.planes}
        if len(counts) != 1:
            raise ValueError(f"planes disagree on the number of pages: {sorted(counts)}")
        self.num_pages = counts.pop()
        self.plane_offsets: list[int] = []
        off = 0
        for p in self.planes:
            self.plane_offsets.append(off)
            off += self.group * p.page_bytes
        self.block_bytes = off

    @classmethod
    def from_layers(cls, layers: Sequence[Any], pages_per_block: int = 1, page_dim: int = 0) -> "PagedLayout":
        """Per-layer tensors: each item a (K, V) pair or a single tensor (e.g. MLA)."""
        planes: list[tuple[Any, int]] = []
        for item in layers:
            for t in (item if isinstance(item, (tuple, list)) else (item,)):
                planes.append((t, page_dim))
        return cls(planes, pages_per_block)

    @classmethod
    def from_stacked(cls, layers: Sequence[Any], pages_per_block: int = 1, kv_dim: int = 0,
                     page_dim: int = 1) -> "PagedLayout":
        """Per-layer tensors holding K and V along `kv_dim` (e.g. [2, num_pages, ...])."""
        planes: list[tuple[Any, int]] = []
        for t in layers:
            kd = kv_dim % t.dim()
            pd = page_dim % t.dim()
            for i in range(t.shape[kd]):
                planes.append((t.select(kd, i), pd - (1 if pd > kd else 0)))
        return cls(planes, pages_per_block)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def plane_table(self) -> np.ndarray:
        """The int64 [nplanes, 16] description native/paged_copy.cu reads."""
        tab = np.zeros((len(self.planes), PLANE_WORDS), dtype=np.int64)
        for i, (p, off) in enumerate(zip(self.planes, self.plane_offsets, strict=True)):
            if len(p.dims) > MAX_DIMS:
                raise ValueError(f"plane {i}: a page spans {len(p.dims)} separate strides; "
                                 f"the kernel handles {MAX_DIMS} (use the torch backend)")
            base = p.tensor.data_ptr()
            vw = _pow2_divisor(p.dims[-1][0])
            for x in (base, p.page_stride, off, *(s for _, s in p.dims[:-1])):
                vw = min(vw, _pow2_divisor(abs(x)))
            tab[i, :6] = (base, p.page_stride, p.page_bytes, off, len(p.dims), vw)
            for k, (size, stride) in enumerate(p.dims):
                tab[i, 6 + k] = size
                tab[i, 11 + k] = stride
        return tab


# --------------------------------------------------------------------- checks

def _as_ids(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):      # a torch tensor: page ids are host data, one sync if not
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of integers")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got {a.dtype}")
    return a.astype(np.int64, copy=False)


def check_batch(layout: PagedLayout, page_ids: Any, region: Region, slot_offsets: Any,
                scatter: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validated (page_ids, slot_offsets) as int64 arrays; raises ValueError on bad input."""
    ids = _as_ids(page_ids, "page_ids")
    offs = _as_ids(slot_offsets, "slot_offsets")
    if ids.size != offs.size * layout.group:
        raise ValueError(f"{offs.size} slots need {offs.size * layout.group} page ids "
                         f"({layout.group} per block), got {ids.size}")
    if ids.size and (ids.min() < 0 or ids.max() >= layout.num_pages):
        raise ValueError(f"page id out of range [0, {layout.num_pages})")
    if offs.size:
        if offs.min() < 0 or offs.max() + layout.block_bytes > region.nbytes:
            raise ValueError(f"slot offset outside the region ({region.nbytes} bytes, "
                             f"blocks of {layout.block_bytes})")
        srt = np.sort(offs)
        if srt.size > 1 and np.diff(srt).min() < layout.block_bytes:
            raise ValueError("slots overlap: two blocks would share bytes")
    if scatter and ids.size and np.unique(ids).size != ids.size:
        raise ValueError("a page id appears twice: the scatter result would be ambiguous")
    return ids, offs


# --------------------------------------------------------------------- torch backend

def _int_view(t: Any) -> Any:
    import torch
    dt = getattr(torch, _INT_OF_SIZE[t.element_size()])
    return t if t.dtype == dt else t.view(dt)


def _region_words(region: Region, offs: np.ndarray, nbytes: int) -> tuple[Any, Any]:
    """(region viewed as w-byte words, word index of every byte group of every block)."""
    import torch
    r = region.tensor
    if r is None:
        raise ValueError("the torch backend needs a region with a tensor view")
    w = _pow2_divisor(r.data_ptr(), 8)
    w = min(w, _pow2_divisor(nbytes, 8), *(_pow2_divisor(int(o), 8) for o in np.unique(offs % 8)))
    dt = getattr(torch, _INT_OF_SIZE[w])
    words = r[: (r.numel() // w) * w].view(dt)
    base = torch.from_numpy(offs // w).to(r.device)
    idx = (base[:, None] + torch.arange(nbytes // w, device=r.device)[None, :]).reshape(-1)
    return words, idx


def torch_gather(layout: PagedLayout, ids: np.ndarray, region: Region, offs: np.ndarray) -> None:
    import torch
    if not offs.size:
        return
    nb, g = offs.size, layout.group
    ids_t = torch.from_numpy(ids).to(layout.device)
    parts = []
    for p in layout.planes:
        x = _int_view(p.tensor).index_select(p.page_dim, ids_t).movedim(p.page_dim, 0).contiguous()
        parts.append(x.view(torch.uint8).reshape(nb, g * p.page_bytes))
    blocks = torch.cat(parts, dim=1)
    words, idx = _region_words(region, offs, layout.block_bytes)
    src = blocks.to(words.device).reshape(-1).view(words.dtype)
    words.index_copy_(0, idx, src)


def torch_scatter(layout: PagedLayout, ids: np.ndarray, region: Region, offs: np.ndarray) -> None:
    import torch
    if not offs.size:
        return
    nb, g = offs.size, layout.group
    words, idx = _region_words(region, offs, layout.block_bytes)
    blocks = words[idx].view(torch.uint8).reshape(nb, layout.block_bytes).to(layout.device)
    ids_t = torch.from_numpy(ids).to(layout.device)
    for p, off in zip(layout.planes, layout.plane_offsets, strict=True):
        dst = _int_view(p.tensor)
        part = blocks[:, off: off + g * p.page_bytes].reshape(nb * g, p.page_bytes)
        x = part.view(dst.dtype).reshape(nb * g, *p.inner_shape).movedim(0, p.page_dim)
        dst.index_copy_(p.page_dim, ids_t, x)


# --------------------------------------------------------------------- cuda backend

class _CudaPath:
    """Launches native/paged_copy.cu; one instance per layout."""

    def __init__(self, layout: PagedLayout):
        from kvtierd.gpu import kernels
        cp = cuda.require_cupy()
        self.cp = cp
        self.dev = cuda.device_index(layout.device)
        self.kernel = kernels.function("paged_copy.cu", "kv_pages", self.dev)
        self.grid_cap = kernels.sm_count(self.dev) * BLOCKS_PER_SM
        with cp.cuda.Device(self.dev):
            self.planes = cp.asarray(layout.plane_table())
        self._streams: dict[int, Any] = {}
        self.layout = layout
        self.chunks_per_page = max(-(-p.page_bytes // CHUNK_BYTES) for p in layout.planes)

    def _stream(self, ptr: int) -> Any:
        """cupy's handle on a torch stream, made once per stream (ExternalStream is deprecated in cupy 14
        in favour of Stream.from_external, which older cupy lacks; both wrap the same pointer)."""
        s = self._streams.get(ptr)
        if s is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                s = self.cp.cuda.ExternalStream(ptr, self.dev)
            self._streams[ptr] = s
        return s

    def launch(self, ids: np.ndarray, base: int, offs: np.ndarray, gather: bool, stream: Any,
               blocks_per_sm: int | None = None) -> None:
        cp, lay = self.cp, self.layout
        nb = offs.size
        dst_align = _pow2_divisor(int(np.bitwise_or.reduce(offs | base)) if nb else 16)
        total = nb * len(lay.planes) * lay.group * self.chunks_per_page
        cap = self.grid_cap if blocks_per_sm is None else self.grid_cap // BLOCKS_PER_SM * blocks_per_sm
        grid = max(1, min(total, cap))
        with cp.cuda.Device(self.dev), self._stream(stream.cuda_stream):
            args = cp.asarray(np.concatenate([ids, offs]))
            self.kernel((grid,), (THREADS,), (
                self.planes, np.int32(len(lay.planes)), args, args[ids.size:], np.uint64(base),
                np.int32(lay.group), np.int64(nb), np.int64(CHUNK_BYTES),
                np.int64(self.chunks_per_page), np.int32(dst_align), np.int32(1 if gather else 0)))


def _runs(offs: np.ndarray, block_bytes: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Staging position of each block, and (slot offset, staging offset, bytes) per run of adjacent slots."""
    order = np.argsort(offs, kind="stable")
    pos = np.empty_like(offs)
    pos[order] = np.arange(offs.size, dtype=np.int64) * block_bytes
    srt = offs[order]
    breaks = np.flatnonzero(np.diff(srt) != block_bytes) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [srt.size]])
    runs = [(int(srt[s]), int(s) * block_bytes, int(e - s) * block_bytes) for s, e in zip(starts, ends, strict=True)]
    return pos, runs


class PagedCopier:
    """Moves blocks between a PagedLayout and slots of a Region.

    backend: "auto" (cuda kernels when cupy sees the layout's GPU, else torch),
    "cuda" or "torch". mode (host regions, cuda backend): "auto", "direct" or
    "staged". gather/scatter enqueue on `stream` (default: the current torch
    stream of the layout's device) and return a recorded torch.cuda.Event, or
    None when the work is already done (torch backend on CPU).
    """

    def __init__(self, layout: PagedLayout, backend: str = "auto", mode: str = "auto"):
        if backend not in ("auto", "cuda", "torch"):
            raise ValueError(f"backend must be auto, cuda or torch, not {backend!r}")
        if mode not in ("auto", "direct", "staged"):
            raise ValueError(f"mode must be auto, direct or staged, not {mode!r}")
        self.layout = layout
        if backend == "auto":
            backend = "cuda" if layout.is_cuda and cuda.kernels_available() else "torch"
        if backend == "cuda" and not layout.is_cuda:
            raise ValueError("the cuda backend needs the KV cache on a CUDA device")
        self.backend = backend
        self.mode = mode
        self._cuda = _CudaPath(layout) if backend == "cuda" else None

    # -- public

    def gather(self, page_ids: Any, region: Region, slot_offsets: Any, stream: Any = None) -> Any:
        """Pages -> slots: block b = pages page_ids[b*G:(b+1)*G], written at region + slot_offsets[b]."""
        ids, offs = check_batch(self.layout, page_ids, region, slot_offsets, scatter=False)
        return self._run(ids, region, offs, True, stream)

    def scatter(self, region: Region, slot_offsets: Any, page_ids: Any, stream: Any = None) -> Any:
        """Slots -> pages: the inverse of gather."""
        ids, offs = check_batch(self.layout, page_ids, region, slot_offsets, scatter=True)
        return self._run(ids, region, offs, False, stream)

    def choose_mode(self, region: Region, gather: bool) -> str:
        if not region.is_host:
            return "direct"
        if self.mode != "auto":
            m = self.mode
        else:
            m = AUTO_HOST_MODE["gather" if gather else "scatter"]
        if m == "direct" and not region.mapped:
            m = "staged"      # unmapped host memory is reachable only by cudaMemcpy
        return m

    # -- internals

    def _run(self, ids: np.ndarray, region: Region, offs: np.ndarray, gather: bool, stream: Any) -> Any:
        if self.backend == "torch":
            (torch_gather if gather else torch_scatter)(self.layout, ids, region, offs)
            if not self.layout.is_cuda:
                return None
            import torch
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.layout.device))
            return ev
        import torch
        dev = self.layout.device
        if not region.is_host and region.device != dev:
            raise ValueError(f"region is on {region.device}, the KV cache on {dev}")
        s = stream if stream is not None else torch.cuda.current_stream(dev)
        if offs.size:
            if self.choose_mode(region, gather) == "direct":
                self._cuda.launch(ids, region.ptr, offs, gather, s)
            else:
                self._staged(ids, region, offs, gather, s)
        ev = torch.cuda.Event()
        ev.record(s)
        return ev

    def _staged(self, ids: np.ndarray, region: Region, offs: np.ndarray, gather: bool, s: Any) -> None:
        import torch
        cp = self._cuda.cp
        bb = self.layout.block_bytes
        pos, runs = _runs(offs, bb)
        with torch.cuda.stream(s):
            # allocated on s: the caching allocator hands it out again only after s passes this point
            staging = torch.empty(offs.size * bb, dtype=torch.uint8, device=self.layout.device)
        sp = staging.data_ptr()
        if region.dma_chunk:
            from kvtierd.gpu.pinning import split_at_chunks
            rel = region.ptr - region.dma_base
            h, st, n = (np.array(x, dtype=np.int64) for x in zip(*runs, strict=True))
            h, st, n = split_at_chunks(h + rel, st, n, region.dma_chunk)
            runs = list(zip((h - rel).tolist(), st.tolist(), n.tolist(), strict=True))
        if not gather:
            for slot, st, n in runs:
                cp.cuda.runtime.memcpyAsync(sp + st, region.ptr + slot, n, 4, s.cuda_stream)
        self._cuda.launch(ids, sp, pos, gather, s)
        if gather:
            for slot, st, n in runs:
                cp.cuda.runtime.memcpyAsync(region.ptr + slot, sp + st, n, 4, s.cuda_stream)
