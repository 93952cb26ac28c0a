"""`open_model`: a model's units, loaded on demand into device memory, by unit and tensor name.

    with open_model("~/models/x", device="cuda") as m:     # None: the embedded default model
        m.io_path                                          # "gds", "compat" or "posix"
        q = m["block.3"]["self_attn.q_proj.weight"]        # loads block.3 (checksum verified)
        w = q.dequantize(torch.float16) if isinstance(q, QuantWeight) else q
        m.release("block.3")                               # or m["block.3"].release()
    # leaving the block releases every unit still loaded

Each unit is read once, into a buffer of its own (VRAM on CUDA, page-aligned host memory on the
CPU), by gdsllm.engine.loader's UnitLoader, the reader and checksum check of the runtime itself;
`m[name]` gives the same `Unit` until it is released. A tied model's head has no
`lm_head.weight`: its head multiplies by the embed unit's `embed_tokens.weight`
(`m.meta.params.tie_word_embeddings`).
"""
from __future__ import annotations

import os

import torch

from gdsllm.engine.loader import UnitLoader
from gdsllm.format.metadata import ModelMeta, UnitMeta, load_model_meta
from gdsllm.format.storage import aligned_host_buffer
from gdsllm.torch.unit import Unit


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def model_meta(model: str | os.PathLike | None) -> ModelMeta:
    """The validated metadata of a model directory (None: the embedded default model)."""
    from gdsllm.engine.llm import resolve
    return load_model_meta(resolve(model))


def check_device(device: str | torch.device | None) -> torch.device:
    dev = torch.device(device or default_device())
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev}: no CUDA GPU is available to torch")
    return dev


def unit_buffer(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 buffer a unit can be read into: device memory, or page-aligned host memory."""
    if device.type == "cpu":
        return aligned_host_buffer(nbytes)
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def find_unit(meta: ModelMeta, key: str | int) -> UnitMeta:
    """A unit of `meta` by name ("embed", "block.3", "head", ...) or index; KeyError naming both."""
    if isinstance(key, int) and not isinstance(key, bool):
        if 0 <= key < len(meta.units):
            return meta.units[key]
    else:
        for u in meta.units:
            if u.name == key:
                return u
    first, last = meta.units[0].name, meta.units[-1].name
    raise KeyError(f"{meta.root}: no unit {key!r} (it has {len(meta.units)} units, "
                   f"{first} .. {last})")


class OpenModel:
    """A model directory opened for direct access to its units (see the module)."""

    def __init__(self, model: str | os.PathLike | None = None, device: str | torch.device | None = None):
        self.device = check_device(device)
        self.meta = model_meta(model)
        self.loader = UnitLoader(self.meta, self.device, direct=True)
        self.io_path = self.loader.io_path
        self._loaded: dict[str, Unit] = {}
        self._closed = False

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.meta.units]

    @property
    def loaded(self) -> list[str]:
        """Names of the units in memory now."""
        return [name for name, u in self._loaded.items() if not u.released]

    def unit(self, key: str | int) -> Unit:
        """The unit named `key` (or at that index), read and verified on first access."""
        if self._closed:
            raise RuntimeError(f"{self.meta.root}: the model was closed")
        meta = find_unit(self.meta, key)
        u = self._loaded.get(meta.name)
        if u is not None and not u.released:
            return u
        buf = unit_buffer(meta.nbytes, self.device)
        self.loader.load(meta, buf)
        u = self._loaded[meta.name] = Unit(meta, buf, str(self.meta.path(meta)),
                                           on_release=lambda name=meta.name: self._forget(name))
        return u

    __getitem__ = unit

    def tensor(self, unit: str | int, name: str):
        """`m.unit(unit)[name]`."""
        return self.unit(unit)[name]

    def _forget(self, name: str) -> None:
        self._loaded.pop(name, None)

    def release(self, key: str | int | None = None) -> None:
        """Release one unit (by name or index), or every unit loaded when `key` is None."""
        if key is not None:
            u = self._loaded.get(find_unit(self.meta, key).name)
            if u is not None:
                u.release()
            return
        for u in list(self._loaded.values()):
            u.release()

    @property
    def bytes_read(self) -> int:
        return self.loader.bytes_read

    def close(self) -> None:
        """Release every unit and the reader; the model cannot load units afterwards."""
        if self._closed:
            return
        self.release()
        self.loader.close()
        self._closed = True

    def __enter__(self) -> "OpenModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<OpenModel {self.meta.root} on {self.device} ({self.io_path}): "
                f"{len(self.meta.units)} units, {len(self.loaded)} loaded>")


def open_model(model: str | os.PathLike | None = None,
               device: str | torch.device | None = None) -> OpenModel:
    """Open a GdsLLM model directory (None: the embedded default model) on `device` (default:
    cuda where available, else cpu); units load on first access. Use it as a context manager, or
    call `close()`."""
    return OpenModel(model, device)
