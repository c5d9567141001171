"""Layer-wise loading: the copy of a cached prefix overlaps the forward that uses it.

A prefix hit's K/V reach the model layer by layer instead of all before the
forward. On a GPU every layer's copy is enqueued at once on a side stream,
with one CUDA event recorded after each layer; the cache's `update` for layer
i (the first moment the forward touches layer i's past) makes the compute
stream wait for event i only. So layer 0 computes while layers 1..L-1 are
still in flight, and the load costs about one layer's copy instead of all of
them. No host thread waits: a stream waits on an event.

Without a GPU there is nothing to overlap with, and the copy of layer i is
made when the forward first asks for layer i (the same hook, the same bytes):
that keeps this path's logic under test on CPU.

The lease must outlive the copies: `finish()` (after the forward) waits for
the side stream or makes any copies the forward did not ask for, removes the
hook and only then releases the lease.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch


class LayerGate:
    """Per-layer readiness of a cache whose past K/V are still being copied in."""

    def __init__(self, n_layers: int, copy_layer: Callable[[int], None], device: "torch.device",
                 stream: Any = None):
        """copy_layer(i) copies layer i's K/V of every leased block into the cache's tensors (on a GPU,
        enqueued on the current stream, which is `stream` while the copies are issued)."""
        import torch

        self._torch = torch
        self.n_layers = n_layers
        self._copy_layer = copy_layer
        self._cuda = device.type == "cuda"
        self._device = device
        self._done = [False] * n_layers
        self._events: list[Any] = []
        self._cache: Any = None
        self._lease: Any = None
        self.copy_s = 0.0                   # time the copies took (GPU: measured on the side stream)
        if self._cuda:
            self._stream = stream if stream is not None else torch.cuda.Stream(device)
            # The layer tensors were allocated on the compute stream, and the copiers' tables uploaded
            # on the legacy default stream (cupy's null stream): the side stream starts after both.
            self._stream.wait_stream(torch.cuda.current_stream(device))
            self._stream.wait_stream(torch.cuda.default_stream(device))
            self._start = torch.cuda.Event(enable_timing=True)
            try:
                with torch.cuda.stream(self._stream):
                    self._start.record()
                    for i in range(n_layers):
                        copy_layer(i)
                        ev = torch.cuda.Event(enable_timing=i == n_layers - 1)
                        ev.record()
                        self._events.append(ev)
            except BaseException:
                # Copies of earlier layers may be in flight into tensors and out of slots the caller
                # is about to free and release: let them land first.
                self._stream.synchronize()
                raise

    def ready(self, layer: int) -> None:
        """Layer `layer` may be read from here on (on a GPU: by work enqueued on the current stream)."""
        if not 0 <= layer < self.n_layers or self._done[layer]:
            return
        self._done[layer] = True
        if self._cuda:
            self._torch.cuda.current_stream(self._device).wait_event(self._events[layer])
        else:
            t0 = time.perf_counter()
            self._copy_layer(layer)
            self.copy_s += time.perf_counter() - t0

    def hook(self, cache: Any, lease: Any) -> None:
        """Makes `cache.update(k, v, layer, ...)` wait for its layer first; `lease` is released by finish()."""
        original = cache.update
        gate = self

        def update(key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
            gate.ready(layer_idx)
            return original(key_states, value_states, layer_idx, *args, **kwargs)

        cache.update = update
        self._cache, self._lease = cache, lease

    def finish(self) -> None:
        """Every copy done, the hook gone, the lease released (in that order). Safe to call twice."""
        try:
            if self._cuda:
                if self._events:
                    self._events[-1].synchronize()
                    self.copy_s = self._start.elapsed_time(self._events[-1]) / 1e3
            else:
                for i in range(self.n_layers):
                    self.ready(i)
        finally:
            cache, self._cache = self._cache, None
            if cache is not None and "update" in vars(cache):
                del cache.update
            lease, self._lease = self._lease, None
            if lease is not None:
                lease.release()
