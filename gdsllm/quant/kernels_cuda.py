"""CUDA kernels for quantized weights, reading the packed bytes where they landed (a VRAM slot).

    y = linear(qw, x)      # x [T, K] (float16 / bfloat16 / float32) -> [T, N] in x's dtype

Per row count T (decode batches, draft verification, prefill chunks), chosen by measurement:
- int4, T <= INT4PACK_MAX_ROWS and x in half precision: torch's tinygemm `_weight_int4pack_mm`
  over the stored tile layout (x cast to bfloat16, its only input dtype, and the result back).
  Its layout is probed once per process before the first use (`check_int4_layout`).
- T <= KERNEL_MAX_ROWS: the Triton W4A16 / W8A16 GEMM of `gdsllm.quant.triton_gemm`, which
  unpacks the stored words in registers (no copy of the weight), tiles from `CONFIGS`. float32
  activations take it for int4 at every T up to there (float32 math, not tinygemm's bfloat16).
- Above: the weight is dequantized into ONE scratch buffer per device and dtype (`scratch`:
  allocated once at the largest weight seen, never during a capture) and multiplied by cuBLAS.

Nothing here touches the host inside a captured CUDA graph: no host tensor, no `.item()`; the only
allocations are outputs and split-K partials from the graph's pool; a scratch buffer a graph
captured is kept alive for good (its address is baked into the graph).

Measured on an H200 (torch 2.11, Triton 3.6, 2026-12-03; benchmarks/bench_kernels.py --sweep,
docs/bench-kernels-2026-12-03-h200.json): us per matmul summed over the LLaMA-7B shapes
4096x4096 + 11008x4096 + 4096x11008 (N x K, groups of 128), each timed as a CUDA graph over
256 MiB of weight copies (from HBM, no launch cost); the best Triton tile of the candidates:

    T            1     2     4     8    16    32    64   128   256   512  1024  2048
    fp16        68    68    69    69    68    71    69    75    96   153   293   589
    tinygemm    38    40    51    79   133   249   488   963  1888  3741  7432 14839
    int4 Tr    156   155   156   157   161   279   321   353   450   676  1317  2513
    int4 dq   1683  1681  1683  1681  1681  1685  1686  1692  1708  1763  1903  2190
    int8 Tr     73    73    73    75    78   111   195   255   337   496   964  1839
    int8 dq    155   155   155   154   155   156   159   164   180   236   373   664

(Tr: Triton GEMM, dq: dequantize into the scratch + cuBLAS; tinygemm timed on bfloat16
activations, so a float16 model also pays two small casts.) Hence tinygemm for int4 up to 32
rows, the Triton int4 GEMM to 1024, then dequantize; Triton int8 up to 32 rows, then dequantize.
The int4 Triton GEMM is 4x tinygemm at one row and its dequantization kernel 11x int8's; why was
not measured (the likely suspect is the unpacking's [N, 2t, 8] -> [N, 16t] reshape per k-block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import FormatError
from gdsllm.quant.schemes import QuantWeight

INT4PACK_MAX_ROWS = 32
KERNEL_MAX_ROWS = {"int4": 1024, "int8": 32}
# (largest T, block_m, block_n, warps, stages, split_k), by T ascending: the first with T >= rows;
# each the candidate with the least summed time over the three shapes at those T (table above)
CONFIGS = {
    "int4": ((32, 16, 64, 4, 3, 4), (128, 64, 64, 4, 3, 1), (256, 128, 64, 4, 3, 1),
             (1024, 128, 128, 8, 3, 1)),
    "int8": ((16, 16, 32, 4, 4, 8), (32, 16, 64, 4, 3, 4)),
}

_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_captured: list[torch.Tensor] = []  # scratch buffers a graph holds the address of: never freed
_layout_checked = False


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_int4_layout() -> None:
    """FormatError if this torch does not pack int4 in the layout GdsLLM models are written in."""
    global _layout_checked
    if _layout_checked:
        return
    if capturing():
        raise RuntimeError("int4: the first tinygemm matmul of this process is inside a CUDA graph "
                           "capture; run one eagerly first (the layout probe reads back to the host)")
    from gdsllm.quant.int4pack import INT4_LAYOUT, probe_torch_layout
    why = probe_torch_layout("cuda")
    if why is not None:
        raise FormatError(f"this model stores int4 weights in the {INT4_LAYOUT} layout, and {why}; "
                          f"run it on the CPU, or convert it with --quant int8 or --quant none")
    _layout_checked = True


def config(qtype: str, rows: int):
    from gdsllm.quant.triton_gemm import Config
    for top, *c in CONFIGS[qtype]:
        if rows <= top:
            return Config(*c)
    return Config(*CONFIGS[qtype][-1][1:])


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A buffer of at least `numel` elements, shared by every weight of this device and dtype
    (kernels on one stream run in order, so one weight's use ends before the next is written)."""
    key = (device, dtype)
    buf = _scratch.get(key)
    in_graph = capturing()
    if buf is None or buf.numel() < numel:
        if in_graph:
            raise RuntimeError(f"quantized matmul: the dequantization scratch must grow to {numel} "
                               f"elements inside a CUDA graph capture; run the shape eagerly first")
        _scratch.pop(key, None)  # freed here unless a graph captured it (then in _captured)
        buf = torch.empty(numel, dtype=dtype, device=device)
        _scratch[key] = buf
    if in_graph and not any(b is buf for b in _captured):
        _captured.append(buf)
    return buf[:numel]


def linear(w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    from gdsllm.quant import triton_gemm
    rows = x.shape[0]
    if rows == 0:
        return x.new_empty(0, w.shape[0])
    if w.qtype == "int4" and rows <= INT4PACK_MAX_ROWS and x.dtype != torch.float32:
        check_int4_layout()
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), w.data,
                                               w.group_size, w.scales)
        return y.to(x.dtype)
    if rows <= KERNEL_MAX_ROWS[w.qtype]:
        return triton_gemm.matmul(x, w, config(w.qtype, rows))
    n, k = w.shape
    return F.linear(x, triton_gemm.dequantize_into(w, scratch(x.device, x.dtype, n * k)))
