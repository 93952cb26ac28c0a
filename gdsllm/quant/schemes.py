"""Quantization schemes: what an int4 / int8 weight is in memory, on disk and in metadata.

A quantized weight of logical shape [N, K] (out, in) is split into groups of `group_size`
consecutive inputs; each group of each row has a scale s and a zero z (float), and

    int8:  w = q * s + z           q int8 in [-128, 127], stored row-major [N, K] (1 byte each)
    int4:  w = (q - 8) * s + z     q in [0, 15], stored in the int32 tile layout of torch's
                                   `_convert_weight_to_int4pack` (tinygemm, see `int4pack`)

The companion tensor `scales` holds (s, z) pairs as [K / group_size, N, 2], the layout
`torch.ops.aten._weight_int4pack_mm` takes: bfloat16 for int4 (what that kernel reads), float16
for int8 (a GGUF Q8_0 scale is a float16, kept exactly). Both live in the unit file, each at a
4 KiB-aligned offset, inside the unit's checksum.

    qt = QTensor.from_values("int4", q, scale, zero, group_size=32)   # writing side
    qw = QuantWeight(...)            # compute side: views over a unit's bytes (models/views.py)
    y = qw.linear(x)                 # the backend kernel (kernels_cpu / kernels_cuda)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gdsllm.format.quant_layout import (GROUP_SIZES, INT4_LAYOUT, LAYOUTS, QTYPES,  # noqa: F401
    SCALE_DTYPE_NAME, check_shape, data_nbytes, data_shape, inner_k_tiles, scales_nbytes, scales_shape)

SCALE_DTYPE = {"int4": torch.bfloat16, "int8": torch.float16}
DATA_DTYPE = {"int4": torch.int32, "int8": torch.int8}


@dataclass
class QTensor:
    """A quantized weight in host memory, as converters hand it to the writer: integer values
    `q` [N, K] (int4: uint8 0..15; int8: int8), float32 `scale` and `zero` [N, K / group]."""

    qtype: str
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: the values this weight stands for (scales as stored, rounded)."""
        sd = SCALE_DTYPE[self.qtype]
        s = self.scale.to(sd).float().repeat_interleave(self.group_size, dim=1)
        z = self.zero.to(sd).float().repeat_interleave(self.group_size, dim=1)
        q = self.q.float() - (8 if self.qtype == "int4" else 0)
        return q * s + z

    def to_int8(self) -> "QTensor":
        """Exact: an int4 value q stands for (q - 8) * s + z, an int8 value of q - 8."""
        if self.qtype == "int8":
            return self
        return QTensor("int8", (self.q.to(torch.int16) - 8).to(torch.int8), self.scale, self.zero,
                       self.group_size)

    def prepack(self) -> "QTensor":
        """Pack now (in a worker thread, say) so the writer's `packed()` is free; returns self."""
        self.__dict__["_packed"] = self.packed()
        return self

    def packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(data, scales) exactly as stored: DATA_DTYPE / SCALE_DTYPE tensors, see the layout."""
        if "_packed" in self.__dict__:
            return self.__dict__["_packed"]
        from gdsllm.quant.int4pack import pack_int4
        sc = torch.stack([self.scale, self.zero], dim=-1).transpose(0, 1).contiguous()
        sc = sc.to(SCALE_DTYPE[self.qtype])
        data = pack_int4(self.q) if self.qtype == "int4" else self.q.to(torch.int8).contiguous()
        return data, sc


@dataclass
class QuantWeight:
    """A quantized weight as the compute sees it: views over the unit's bytes (no copy).

    `data`: DATA_DTYPE[qtype] in the stored layout; `scales`: [K / group, N, 2]; `shape`: the
    logical [N, K]. `linear(x)` is x @ W.T by the backend kernel of x's device.
    """

    qtype: str
    shape: tuple[int, int]
    group_size: int
    data: torch.Tensor
    scales: torch.Tensor

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            from gdsllm.quant import kernels_cuda as k
        else:
            from gdsllm.quant import kernels_cpu as k
        return k.linear(self, x)

    @staticmethod
    def linears(ws: "tuple[QuantWeight, ...]", x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(w.linear(x) for w in ws), weights that read one x (q, k and v): on CUDA in one matmul
        where their backend dequantizes them (gdsllm.quant.kernels_cuda.linears)."""
        if x.device.type == "cuda":
            from gdsllm.quant import kernels_cuda
            return kernels_cuda.linears(ws, x)
        return tuple(w.linear(x) for w in ws)

    def values(self) -> torch.Tensor:
        """Integer values [N, K] as int16 with the int4 offset removed (q - 8), on data's device."""
        if self.qtype == "int8":
            return self.data.to(torch.int16)
        from gdsllm.quant.int4pack import unpack_int4
        return unpack_int4(self.data, self.shape).to(torch.int16) - 8

    def dequantize(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight [N, K] (or only `rows` of it) in `dtype`: a temporary copy.

        Each value is (q * s) + z rounded in `dtype` twice, the same as `QTensor.dequantize`; the
        steps run in place on one fresh tensor (the integers go straight to `dtype`, never
        through int16), which makes it 2-4x quicker on CPU than the out-of-place chain."""
        sc = self.scales if rows is None else self.scales.index_select(1, rows)
        if self.qtype == "int8":
            q = self.data if rows is None else self.data.index_select(0, rows)
            w = q.to(dtype)
        else:
            from gdsllm.quant.int4pack import unpack_int4
            q = unpack_int4(self.data, self.shape)
            w = (q if rows is None else q.index_select(0, rows)).to(dtype).sub_(8)
        g = self.group_size
        n = w.shape[0]
        s = sc[..., 0].t().to(dtype)  # [n, groups]
        z = sc[..., 1].t().to(dtype)
        return w.view(n, -1, g).mul_(s[..., None]).add_(z[..., None]).view(n, -1)

    def values_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if self.qtype == "int8":
            return self.data.index_select(0, rows).to(torch.int16)
        from gdsllm.quant.int4pack import unpack_int4_rows
        return unpack_int4_rows(self.data, self.shape, rows).to(torch.int16) - 8
