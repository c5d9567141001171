"""How a vLLM worker's KV cache tensors map onto kvtierd blocks, learned from the tensors.

vLLM has changed its per-layer KV cache layout several times (K and V stacked
in front, K and V packed in the last dim, block-major or layer-major strides),
so nothing here names a backend. `register_kv_caches` hands one tensor per
layer; the dim whose size is the number of KV blocks indexes pages, and a
page is whatever the rest of the tensor holds for one block, taken in the
tensor's logical (row-major) order whatever its strides. Examples:

    CPU backend (0.32):  [num_blocks, kv_heads, block_size, 2*head_dim]  -> page dim 0
    FlashAttention:      [2, num_blocks, block_size, kv_heads, head_dim] -> page dim 1
    FlashInfer:          [num_blocks, 2, block_size, kv_heads, head_dim] -> page dim 0
    kernel blocks:       [num_blocks*r, ...] is viewed as [num_blocks, r, ...]

A kvtierd block holds G consecutive vLLM blocks of every layer: layer 0's G
pages, then layer 1's, ... (kvtierd.gpu.paged's byte layout, one plane per
layer). So one layer's bytes are contiguous inside a block, and a worker
copies layer by layer: `LayerCopy.offset` is where its bytes start.

Because bytes are taken in logical order, physical stride orders (NHD/HND,
layer-major/block-major) produce the same block bytes; the namespace still
records the layout name, so engines only share when vLLM agreed on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from kvtierd.gpu.paged import PagedCopier, PagedLayout


class LayoutError(ValueError):
    """The KV cache tensors cannot be mapped onto blocks (the connector then stays off)."""


def find_page_dim(t: Any, num_blocks: int) -> tuple[Any, int]:
    """(tensor, dim) where dim indexes vLLM blocks; a dim of num_blocks*r kernel blocks is
    unflattened to (num_blocks, r) first. Two dims of size num_blocks are ambiguous (K/V
    may come first or second): that raises rather than guess."""
    if num_blocks < 1:
        raise LayoutError(f"num_blocks must be positive, got {num_blocks}")
    cands = [d for d in range(t.dim()) if t.shape[d] == num_blocks]
    if not cands:
        multiples = [d for d in range(t.dim()) if t.shape[d] > num_blocks and t.shape[d] % num_blocks == 0]
        if len(multiples) == 1:
            d = multiples[0]
            return t.unflatten(d, (num_blocks, t.shape[d] // num_blocks)), d
        raise LayoutError(f"no dimension of a KV cache tensor of shape {tuple(t.shape)} indexes "
                          f"{num_blocks} blocks")
    if len(cands) == 1:
        return t, cands[0]
    raise LayoutError(f"cannot tell which dim of a KV cache tensor of shape {tuple(t.shape)} indexes the "
                      f"{num_blocks} blocks (several have that size)")


@dataclass
class LayerCopy:
    """One layer's part of every block: a copier over its tensor and its byte offset in a block.

    On a GPU `copier` moves a whole batch in one kernel launch. On CPU `gather_cpu` and
    `scatter_cpu` copy page by page instead: one memcpy per page beats the paged copier's torch
    fallback, whose index tensors are as large as the data (a 2K-token prefix of the vLLM
    benchmark model loaded 8x faster). Both write the same bytes (tests/vllm/test_units.py).
    """

    name: str
    copier: PagedCopier
    offset: int
    nbytes: int          # bytes of this layer in one kvtierd block (G pages)
    page_shape: tuple[int, ...]
    page_bytes: int
    tensor: Any = None   # the layer's tensor (kernel blocks grouped), pages along page_dim
    page_dim: int = 0

    def _slots(self, region: Any, offsets: Sequence[int], page_ids: Sequence[int]):
        g, pb = self.nbytes // self.page_bytes, self.page_bytes
        rt = region.tensor
        if len(page_ids) != len(offsets) * g:
            raise ValueError(f"{len(offsets)} slots need {len(offsets) * g} page ids, got {len(page_ids)}")
        n = self.tensor.shape[self.page_dim]
        ids = [int(p) for p in page_ids]
        bases = [int(off) + self.offset for off in offsets]
        # everything is checked before the first byte moves
        if ids and (min(ids) < 0 or max(ids) >= n):
            raise ValueError(f"page id out of range [0, {n})")
        if bases and (min(bases) < self.offset or max(bases) + self.nbytes > rt.numel()):
            raise ValueError(f"slot offset outside the region ({rt.numel()} bytes)")
        pairs = []
        for b, base in enumerate(bases):
            for j in range(g):
                page = self.tensor.select(self.page_dim, ids[b * g + j])
                pairs.append((rt[base + j * pb: base + (j + 1) * pb], page))
        return pairs

    def gather_cpu(self, region: Any, offsets: Sequence[int], page_ids: Sequence[int]) -> None:
        """Pages -> slots (bytes of each page in logical order)."""
        import torch
        for dst, page in self._slots(region, offsets, page_ids):
            dst.copy_(page.contiguous().view(torch.uint8).reshape(-1))

    def scatter_cpu(self, region: Any, offsets: Sequence[int], page_ids: Sequence[int]) -> None:
        """Slots -> pages."""
        import torch
        for src, page in self._slots(region, offsets, page_ids):
            if page.is_contiguous():
                page.view(torch.uint8).reshape(-1).copy_(src)
            else:
                page.copy_(src.clone().view(page.dtype).view(page.shape))


class BlockLayout:
    """All layers of one worker, in block order."""

    def __init__(self, kv_caches: dict[str, Any], num_blocks: int, blocks_per_chunk: int = 1,
                 layer_order: Sequence[str] | None = None, backend: str = "auto"):
        if not kv_caches:
            raise LayoutError("no KV cache tensors were registered")
        names = list(layer_order) if layer_order else list(kv_caches)
        missing = [n for n in names if n not in kv_caches]
        if missing:
            raise LayoutError(f"layers without a KV cache tensor: {missing[:4]}")
        self.layers: list[LayerCopy] = []
        seen: dict[tuple[int, tuple, tuple], str] = {}
        off = 0
        dtypes = set()
        for name in names:
            t = kv_caches[name]
            sig = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
            if sig in seen:
                continue   # a layer that shares another's KV (cross-layer sharing) is stored once
            seen[sig] = name
            view, pd = find_page_dim(t, num_blocks)
            layout = PagedLayout([(view, pd)], pages_per_block=blocks_per_chunk)
            plane = layout.planes[0]
            self.layers.append(LayerCopy(name, PagedCopier(layout, backend=backend), off, layout.block_bytes,
                                         plane.inner_shape, plane.page_bytes, view, pd))
            off += layout.block_bytes
            dtypes.add(str(t.dtype).removeprefix("torch."))
        self.block_bytes = off
        self.group = blocks_per_chunk
        self.dtype = ",".join(sorted(dtypes))
        self.by_name = {lc.name: lc for lc in self.layers}
        shapes = {lc.page_shape for lc in self.layers}
        self.page_shape = shapes.pop() if len(shapes) == 1 else ()
        self.device = str(kv_caches[names[0]].device)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def describe(self) -> str:
        return (f"{len(self.layers)} layers, page {'x'.join(map(str, self.page_shape)) or 'mixed'} {self.dtype}, "
                f"{self.group} vLLM block(s) per kvtierd block of {self.block_bytes} bytes")
