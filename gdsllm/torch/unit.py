"""`Unit`: the tensors of one unit of a model, views over the buffer that holds it right now.

    unit["self_attn.q_proj.weight"]     # a torch.Tensor, or a QuantWeight (int4 / int8) whose
                                        # .dequantize(dtype) gives the float weight
    unit.name, unit.kind, unit.layer    # "block.3", "block", 3 (gdsllm.format.metadata.UnitMeta)
    unit.release()                      # or `with unit:`; then unit[...] raises

The views are gdsllm.models.views's: they share the buffer's memory and copy nothing. `release()`
hands the buffer back to whoever owns it (open_model frees it, stream_layers refills it with a
later unit): a view kept past that either keeps the memory alive (open_model) or silently shows
the later unit's bytes (stream_layers). `.clone()` what you keep.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from gdsllm.models.views import unit_tensors
from gdsllm.format.metadata import UnitMeta
from gdsllm.quant.schemes import QuantWeight


class Unit(Mapping):
    """A read-only mapping tensor name -> torch.Tensor | QuantWeight, valid until `release()`."""

    def __init__(self, meta: UnitMeta, buf: torch.Tensor, source: str,
                 on_release: Callable[[], None] | None = None):
        self.meta = meta
        self.source = source  # the unit's file, for messages
        self._tensors: dict[str, torch.Tensor | QuantWeight] | None = unit_tensors(meta, buf)
        self._on_release = on_release

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def layer(self) -> int | None:
        return self.meta.layer

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes

    @property
    def released(self) -> bool:
        return self._tensors is None

    def _live(self) -> dict[str, torch.Tensor | QuantWeight]:
        if self._tensors is None:
            raise RuntimeError(f"unit {self.name} ({self.source}) was released; its views are gone")
        return self._tensors

    def __getitem__(self, name: str) -> torch.Tensor | QuantWeight:
        tensors = self._live()
        if name not in tensors:
            raise KeyError(f"unit {self.name} ({self.source}) has no tensor {name!r}; it has "
                           f"{', '.join(sorted(tensors))}")
        return tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._live())

    def __len__(self) -> int:
        return len(self._live())

    def release(self) -> None:
        """Drop the views and hand the buffer back; a second call does nothing."""
        if self._tensors is None:
            return
        self._tensors = None
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback()

    def __enter__(self) -> "Unit":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else f"{len(self)} tensors"
        return f"<Unit {self.name} ({self.source}, {self.nbytes} bytes, {state})>"
