"""Checks of a quantized tensor's metadata entry (called by gdsllm.format.metadata).

    {"name": "mlp.up_proj.weight", "dtype": "int4", "shape": [1536, 576], "offset": 8192,
     "nbytes": 442368, "quant": {"qtype": "int4", "group_size": 32, "layout": "tinygemm-int32",
                                 "scales_offset": 450560, "scales_nbytes": 110592}}

`shape` is the logical [out, in] shape; `nbytes` the packed values; the (scale, zero) pairs lie
at `scales_offset` in the same unit file. An unknown qtype or layout is refused by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gdsllm.format.metadata import ALIGN, FormatError, TensorMeta
from gdsllm.quant import schemes


@dataclass(frozen=True)
class QuantMeta:
    """How a quantized tensor is stored (gdsllm.quant.schemes): its qtype, group size and layout,
    and where its companion (scale, zero) tensor lies in the same unit file (4 KiB aligned)."""

    qtype: str
    group_size: int
    layout: str
    scales_offset: int
    scales_nbytes: int

    @classmethod
    def from_json(cls, d: dict) -> "QuantMeta":
        return cls(str(d["qtype"]), int(d["group_size"]), str(d["layout"]),
                   int(d["scales_offset"]), int(d["scales_nbytes"]))

    def to_json(self) -> dict:
        return {"qtype": self.qtype, "group_size": self.group_size, "layout": self.layout,
                "scales_offset": self.scales_offset, "scales_nbytes": self.scales_nbytes}

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [(self.scales_offset, self.scales_offset + self.scales_nbytes)]


def parse_tensor(d: dict, where: Path, unit_name: str) -> TensorMeta:
    """The TensorMeta of a quantized entry of metadata.json, checked (FormatError if not sound)."""
    try:
        t = TensorMeta(str(d["name"]), str(d["dtype"]), tuple(int(s) for s in d["shape"]),
                       int(d["offset"]), int(d["nbytes"]), QuantMeta.from_json(d["quant"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: unit {unit_name}: malformed tensor entry {d!r}: {e}") from None
    return check_tensor(t, where, unit_name)


def check_tensor(t: TensorMeta, where: Path, unit_name: str) -> TensorMeta:
    """`t` if its quantized entry is consistent; FormatError naming the file and tensor if not."""
    q = t.quant
    assert q is not None
    at = f"unit {unit_name} tensor {t.name}"

    def require(cond: bool, what: str) -> None:
        if not cond:
            raise FormatError(f"{where}: {at}: {what}")

    require(q.qtype in schemes.QTYPES, f"unsupported qtype {q.qtype!r}; this GdsLLM reads "
            f"{', '.join(schemes.QTYPES)} (written by a newer GdsLLM?)")
    require(t.dtype == q.qtype, f"dtype {t.dtype!r} but qtype {q.qtype!r}")
    require(q.layout in schemes.LAYOUTS[q.qtype], f"{q.qtype} layout {q.layout!r} is not one this "
            f"GdsLLM reads ({', '.join(schemes.LAYOUTS[q.qtype])}); convert the model again")
    try:
        schemes.check_shape(q.qtype, t.shape, q.group_size, at)
    except ValueError as e:
        raise FormatError(f"{where}: {e}") from None
    require(t.offset % ALIGN == 0 and q.scales_offset % ALIGN == 0,
            f"offsets {t.offset} / {q.scales_offset} are not {ALIGN}-byte aligned")
    require(t.nbytes == schemes.data_nbytes(q.qtype, t.shape),
            f"nbytes {t.nbytes} does not match {q.qtype} of shape {t.shape}")
    require(q.scales_nbytes == schemes.scales_nbytes(q.qtype, t.shape, q.group_size),
            f"scales_nbytes {q.scales_nbytes} does not match shape {t.shape} in groups of "
            f"{q.group_size}")
    return t
