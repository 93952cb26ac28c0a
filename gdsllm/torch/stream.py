"""`stream_layers`: a model's units in order, the next ones already being read (prefetch).

    for unit in stream_layers("~/models/x", budget="2GiB", window=2):   # device: cuda if present
        x = my_block(unit, x)          # unit["mlp.up_proj.weight"], ...; valid until the next one

A background thread (gdsllm.engine.prefetch, the window `LLM` streams through) reads the units in
order into `window + 1` buffers, each sized for the largest
unit streamed (`budget`, when given, caps how many fit): while the loop computes with unit i, units
i+1 .. i+window are read. A buffer is refilled only after the loop moved past its unit (asked for
the next one, or called `unit.release()`); on CUDA the read into it first waits for the GPU work
queued on the current stream at that moment, so kernels still reading the old unit finish first.
Reads go through gdsllm.engine.loader's UnitLoader (the runtime's readers: KvikIO on CUDA, O_DIRECT
on the CPU; every unit's checksum verified). Views of a unit show the next unit's bytes once its
buffer is refilled: `.clone()` what outlives the step (a tied model's embedding table, for the
head). Leaving the loop early: `with stream_layers(...) as s:` or `s.close()` stops the thread.
"""
from __future__ import annotations

import os

import torch

from gdsllm.engine.loader import UnitLoader
from gdsllm.engine.prefetch import Prefetch
from gdsllm.format.metadata import UnitMeta, align_up
from gdsllm.torch.model import check_device, find_unit, model_meta, unit_buffer
from gdsllm.torch.unit import Unit

def buffer_count(window: int, budget: int | None, slot: int, largest: str) -> int:
    """Buffers of `slot` bytes: `window + 1`, fewer where `budget` bytes hold fewer (never 0)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be a non-negative number of units, got {window!r}")
    if budget is None:
        return window + 1
    if budget < slot:
        raise ValueError(f"budget {budget} bytes holds no buffer for unit {largest} ({slot} bytes); "
                         f"stream_layers needs at least one")
    return min(window + 1, budget // slot)


class LayerStream:
    """The iterator `stream_layers` returns (see the module). `io_path`, `window` (units read
    ahead at most), `buffers` (how many), `buffer_bytes`, `units_read`, `units_yielded`,
    `prefetched` describe it."""

    def __init__(self, model, budget, window: int, device, units):
        self._closed = True  # until the reader runs: nothing for close() to stop
        self.device = check_device(device)
        self.meta = model_meta(model)
        if isinstance(budget, str):
            from gdsllm.engine.budget import parse_size
            budget = parse_size(budget)
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"budget must be a positive number of bytes, got {budget!r}")
        self.order: list[UnitMeta] = ([find_unit(self.meta, k) for k in units] if units is not None
                                      else list(self.meta.units))
        if not self.order:
            raise ValueError(f"{self.meta.root}: no units to stream")
        big = max(self.order, key=lambda u: u.nbytes)
        self.buffer_bytes = align_up(big.nbytes)
        self.buffers = buffer_count(window, budget, self.buffer_bytes, big.name)
        self.window = self.buffers - 1
        self._loader = UnitLoader(self.meta, self.device, direct=True)
        self.io_path = self._loader.io_path
        self.units_yielded = 0
        self._current: Unit | None = None
        # LLM's prefetch window, read once in order: a buffer is refilled only after the loop moved
        # past its unit (on CUDA, after the GPU work queued on it until then)
        self._prefetch = Prefetch(self.order, [unit_buffer(self.buffer_bytes, self.device)
                                               for _ in range(self.buffers)],
                                  self._loader, self.device, cyclic=False)
        self._closed = False

    @property
    def units_read(self) -> int:
        return self._prefetch.reads

    @property
    def prefetched(self) -> int:
        """Units read and waiting for the loop (the filled part of the prefetch window)."""
        return self.units_read - self.units_yielded

    @property
    def bytes_read(self) -> int:
        return self._loader.bytes_read

    def __iter__(self) -> "LayerStream":
        return self

    def __next__(self) -> Unit:
        if self._current is not None:
            self._current.release()
            self._current = None
        if self._closed or self.units_yielded == len(self.order):
            self.close()
            raise StopIteration
        meta = self.order[self.units_yielded]
        try:
            buf = self._prefetch.take(meta)
        except BaseException:
            self.close()
            raise
        self.units_yielded += 1
        self._current = Unit(meta, buf, str(self.meta.path(meta)), on_release=self._prefetch.release)
        return self._current

    def close(self) -> None:
        """Stop reading, release the current unit and drop the buffers; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._current is not None:
            self._current.release()
            self._current = None
        self._prefetch.close()
        self._loader.close()

    def __enter__(self) -> "LayerStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


def stream_layers(model: str | os.PathLike | None = None, budget: int | str | None = None,
                  window: int = 2, device: str | torch.device | None = None,
                  units=None) -> LayerStream:
    """Iterate over the units of `model` (None: the embedded default model) in order, or over
    `units` (names or indices, in the order given), on `device` (default: cuda where available),
    reading up to `window` units ahead into buffers that together take at most `budget` bytes
    (an int or a size such as "2GiB"; None: no cap). Yields `gdsllm.torch.Unit`s."""
    return LayerStream(model, budget, window, device, units)
