"""CUDA kernels for quantized weights, reading the packed bytes where they landed (a VRAM slot).

    y = linear(qw, x)      # x [T, K] (float16 / bfloat16 / float32) -> [T, N] in x's dtype
    q, k, v = linears((wq, wk, wv), x)   # one x: linear's results, one launch where it can

Per row count T (decode batches, draft verification, prefill chunks) `CHOICES` names, by
measurement (table below), one of:
- "tinygemm": torch's `_weight_int4pack_mm` over the stored int4 tile layout (x cast to bfloat16,
  its only input dtype, and the result back; no cast in a model with int4 weights, which
  computes in bfloat16 on CUDA: gdsllm.engine.runner.compute_dtype). Its layout is probed once per process before the
  first use (`check_int4_layout`). Half-precision x only.
- a tile of the Triton W4A16 / W8A16 GEMM (`gdsllm.quant.triton_gemm`), which unpacks the stored
  words in registers (no copy of the weight): int4 by nibble plane, one tensor-core product per
  plane (`Config.planes`), or into whole weight tiles; split along K where the tile says so (or
  by the tile count, `triton_gemm.auto_split`), the last program of a tile summing the partials
  (`triton_gemm.lock_buffer`).
- "dequant": the weight is dequantized into ONE scratch buffer per device and dtype (`scratch`:
  grown to the largest weight by the eager calls before any capture, so never during one; its
  size is in the VRAM ledger, `gdsllm.engine.budget.scratch_bytes`) in the plane order, and
  cuBLAS multiplies it by x permuted the same way.
`linears` takes the weights that read one x (q, k and v; gate and up): where each would run
the planes tile, one launch of it covers all their rows (a graph node for three at 5-32 rows);
where they would be dequantized and the scratch as reserved holds them all (the VRAM ledger's
`gdsllm.engine.budget.dequant_numel`: q+k+v, gate+up where the LM head is larger), they are
dequantized into it one after another (int4: one launch) and multiplied by x in one cuBLAS
call, two launches for three weights instead of six. Their outputs are column views of the one
result (the fused activation reads gate and up as they lie). Timed on the H200 with the
norms' plane-order writes (docs/BENCHMARKS.md, 2026-12-05 02:37): 8 int4 blocks of the 7B
shape, median batch-16 step 1.98 against 2.24 ms without either, within a wide spread.
The planes tile and "dequant" read x in plane order: `triton_gemm.planes_x` makes that copy once
per activation (q, k and v share it), and where a fused norm or activation makes x for such a
matmul (gdsllm.models.layers' `feeds`), that kernel writes the copy too (`plane_index`,
`remember_planes`): no copy kernel of its own, a graph node fewer in decode and a host launch
fewer in an eager prefill, whose time on the H200 VM is the host's launches (the BENCHMARKS
section of 2026-12-04 21:00).
float32 x takes "dequant" where the table says tinygemm (the tiles run it in float32).

Nothing here touches the host inside a captured CUDA graph: no host tensor, no `.item()`; the only
allocations are outputs, permuted activations and split-K partials from the graph's pool; a
scratch buffer a graph captured is kept alive for good (its address is baked into the graph), and
the split-K counters are made once per device by the eager calls before any capture.

Measured on an H200 (driver 580.159.04, torch 2.11.0+cu130, Triton 3.6.0, 2026-12-04 19:22 UTC;
`benchmarks/bench_kernels.py --rows ...`, docs/bench-kernels-2026-12-04-1922-h200.json): us per
matmul summed over the LLaMA-7B shapes 4096x4096 + 11008x4096 + 4096x11008 (N x K, random
weights, groups of 128), each timed as a CUDA graph over 256 MiB of weight copies (from HBM, no
launch cost); int4 with bfloat16 x (what an int4 model computes in), int8 with float16 x; int4 /
int8: what `linear` runs at that M (CHOICES), every result checked against float32 math
(relative error < 2.5e-3). The copies share one x, so at 5-32 rows the int4 figures carry one
permutation of x per graph, not one per matmul (`triton_gemm.planes_x`: in a model q, k and v
share one, gate and up another; the copy alone costs 2.3-3.7 us at 1-64 rows).

    M               1     2     4     8    16    24    32    48    64   128   256   512
    bfloat16       71    71    70    70    72    70    70    72    72    76    96   152
    float16        71    72    70    71    72    73    72    73    72    76    98   157
    int4           38    40    52    44    47    71    72   133   134   168   191   251
    int8           70    70    70    71    74    91    92   131   134   212   232   299

int4: tinygemm to 4 rows, the planes tile (16, 128, 4, 3, auto split, 128, swap, planes) to 32,
the 32-row whole tile to 64, then dequantize; where the planes tile is not usable (groups of
less than a k-block, as GGUF's Q4_K; float32 x) the whole tiles of FALLBACK, as before. int8:
the 16-row tile (16, 64, 4, 3, 8, 128, swap) to 16, the 32-row tile to 32, the 64-row tile
(split 2) to 64, then dequantize. The 16-row int8 tile pipelines 3 stages, not the sweep's 4:
in `probe_w4_tiles.py grouped` (H200, 2026-12-05 03:52 UTC) 3 stages were quicker at every shape
and row count timed (o / gate / down at 1 row 12.6 / 27.3 / 25.1 us against 12.9 / 29.5 / 25.5;
at 16 rows 13.5 / 29.1 / 26.0 against 13.8 / 31.8 / 26.2); the 7B int8 model then decoded one
sequence in 5.44 ms a token (median of 6 rounds, docs/BENCHMARKS.md 2026-12-05 05:23), its
greedy tokens at batch 1 and 16 the same as with 4 stages.

Re-timed over an int4 block's launches as `linears` makes them (q+k+v, o, gate+up, down; H200,
2026-12-05 03:52 UTC, `benchmarks/probe_w4_tiles.py grouped`): at 16 rows the chosen planes tile
was the quickest of 18 launch shapes, 78 us a block against 121 for bfloat16 cuBLAS; loading the
next step's x before this step's products was 25-50% slower (not kept).

Why the planes tile (benchmarks/probe_w4_tiles.py, the H200, 2026-12-04): the whole int4 tiles
spent their time in shared memory, not HBM: ncu on the 16-row tile at 11008x4096 read L1/TEX
throughput 72% against DRAM 18%, 28 us. Interleaving the 8 nibble planes back into one weight
tile (tl.join + reshape) leaves a layout Triton converts through shared memory before the
tensor-core operand, 2 bytes of bfloat16 per weight written and read again, so the time
followed the weight count, not the bytes. The planes tile gives each plane its own tl.dot over
the matching columns of x in plane order: the stored words are loaded straight into the
operand's register layout and unpacked there (ttgir: no layout conversion of weights). At 16
rows, us per matmul, 4096x4096 / 11008x4096 / 4096x11008: 15.0 / 31.0 / 26.9 with the whole
tile, 12.7 / 20.8 / 20.1 with the planes tile (the unpacking by PTX; 13.4 / 22.8 / 24.4 by
elementwise ops), bfloat16 13.2 / 27.1 / 29.8. A tile that instead loads each word once per
nibble (8 columns sharing an address, no planes) took 180-2,500 us: Triton pipelined the
repeated loads through shared memory, 243 KB. From 48 rows on the planes tile loses (its x
reductions and the small dots): the whole 32-row tile stays there, and past 64 rows the
dequantization (16 rows per program: 3-8% quicker than 32) and cuBLAS.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import FormatError
from gdsllm.quant.schemes import QuantWeight

# (largest T, kernel) by T ascending: the first with T >= rows; "dequant" past the last. A kernel
# is "tinygemm", "dequant" or a triton_gemm.Config's fields. Each is the option with the least
# time summed over the three 7B shapes at the measured T it covers (the table above; at 24 and 48
# rows the next larger tile, which the sweep did not time there, as the docstring says).
CHOICES = {
    "int4": ((4, "tinygemm"), (32, (16, 128, 4, 3, 0, 128, True, False, True, True, True)),
             (64, (32, 64, 4, 3, 4, 128, True, True))),
    "int8": ((16, (16, 64, 4, 3, 8, 128, True)), (32, (32, 64, 4, 3, 4, 128, True)),
             (64, (64, 64, 8, 3, 2, 128, True))),
}
# Where a chosen tile is not `usable` for the weight and x (the planes tile: groups narrower than
# a k-block, as GGUF's Q4_K kept as int4, or float32 x): the whole tiles of the 2026-12-04 sweep
FALLBACK = {
    "int4": ((16, (16, 64, 4, 4, 8, 128, True, True)), (64, (32, 64, 4, 3, 4, 128, True, True))),
    "int8": (),
}

# The split-K tile counters of gdsllm.quant.triton_gemm (`lock_buffer`): int32, one set per device
# for the process's lifetime, in the VRAM ledger beside the scratch (gdsllm.engine.budget)
SPLIT_K_COUNTERS = 1 << 14
_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
_captured: list[torch.Tensor] = []  # scratch buffers a graph holds the address of: never freed
_plane_index: dict[tuple, torch.Tensor] = {}  # (qtype, K, device) -> plane_index's int32 [K]
_layout_checked = False


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA). Asked per
    matmul: torch.cuda.is_initialized() is a flag (no capture without it), where is_available()
    reads the environment on every call."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


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


@functools.lru_cache(maxsize=None)  # every matmul of an eager pass asks; the tables are constant
def choice(qtype: str, rows: int, k: int, dtype: torch.dtype, group_size: int = 128):
    """What runs x [rows, k] of `dtype` against a `qtype` weight in groups of `group_size`:
    "tinygemm", "dequant" or a Config (CHOICES, else FALLBACK, else "dequant")."""
    from gdsllm.quant.triton_gemm import Config, usable
    kind = next((c for top, c in CHOICES[qtype] if rows <= top), "dequant")
    if kind == "tinygemm":
        return kind if dtype != torch.float32 else "dequant"
    if kind == "dequant":
        return kind
    for c in (kind, next((c for top, c in FALLBACK[qtype] if rows <= top), None)):
        if c is not None and usable(qtype, k, Config(*c), group_size, dtype):
            return Config(*c)
    return "dequant"


def _scratch_key(device: torch.device | str, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    if not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one buffer for "cuda" and "cuda:0"
        device = torch.device("cuda", torch.cuda.current_device())
    return device, dtype


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A buffer of at least `numel` elements, shared by every weight of this device and dtype
    (kernels on one stream run in order, so one weight's use ends before the next is written).
    Called at load with the ledger's size (gdsllm.engine.budget.scratch_bytes / itemsize), it
    takes the memory before the KV cache is sized from what is left."""
    key = _scratch_key(device, dtype)
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


def plane_index(w: QuantWeight, x: torch.Tensor) -> torch.Tensor | None:
    """For an activation about to be made like x (same shape, dtype, device) that linear(w, .)
    will read: int32 [K], where each input column goes in the order w's kernel reads x in
    (triton_gemm.planes_x: the planes tile, the dequantized weights), for the kernel making x to
    write that copy too (outp[..., index[j]] = x[..., j]; gdsllm.models.fused); then
    `remember_planes`. None where the kernel reads x as it is (tinygemm, the whole tiles) or the
    index would first be made inside a graph capture (the eager passes before capture make it)."""
    k = w.shape[1]
    if x.shape[-1] != k:  # x is on CUDA (gdsllm.models.fused.usable), or the CPU under Triton's
        return None        # interpreter (tests/quant_block_cases.py)
    kind = choice(w.qtype, x.numel() // k, k, x.dtype, w.group_size)
    if kind == "tinygemm" or (kind != "dequant" and not kind.planes):
        return None
    key = (w.qtype, k, x.device)
    index = _plane_index.get(key)
    if index is None:
        if capturing():
            return None
        index = _plane_index[key] = plane_order(w).to(x.device)
    return index


def plane_order(w: QuantWeight) -> torch.Tensor:
    """int32 [K] on the CPU: where input column j of x lands in triton_gemm.permute_x(x, w)."""
    from gdsllm.quant import triton_gemm
    k = w.shape[1]
    order = triton_gemm.permute_x(torch.arange(k).view(1, k), w).view(k)  # j holds input order[j]
    index = torch.empty(k, dtype=torch.int32)
    index[order] = torch.arange(k, dtype=torch.int32)
    return index


def remember_planes(x: torch.Tensor, w: QuantWeight, xp: torch.Tensor) -> None:
    """xp (x's columns moved by plane_index(w, x)) is what linear(w, x) reads: no copy of x."""
    from gdsllm.quant import triton_gemm
    triton_gemm.remember_planes(x, w, xp)


def linear(w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
    from gdsllm.quant import triton_gemm
    rows = x.shape[0]
    n, k = w.shape
    if rows == 0:
        return x.new_empty(0, n)
    in_graph = capturing()
    if not in_graph:  # the ledger's scratch (the largest weight) and the split-K counters
        buf = scratch(x.device, x.dtype, n * k)  # exist before any capture
        triton_gemm.lock_buffer(x.device)
    kind = choice(w.qtype, rows, k, x.dtype, w.group_size)
    if kind == "tinygemm":
        check_int4_layout()
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), w.data,
                                               w.group_size, w.scales)
        return y.to(x.dtype)
    if kind != "dequant":
        return triton_gemm.matmul(x, w, kind)
    if in_graph:
        buf = scratch(x.device, x.dtype, n * k)
    # the weight in plane order (contiguous stores: 11-33 us a 7B weight at 512 rows, against
    # 200-550 in input order, whose stores are 2 bytes in 16; H200, 2026-12-04, probe_w4_tiles.py),
    # x in plane order once for the matmuls that read it (q, k, v; gate, up): each copy is one
    # more launch of an eager prefill, which the host's launches set, not the GPU
    wp = triton_gemm.dequantize_into(w, buf, planes=True)
    return F.linear(triton_gemm.planes_x(x, w), wp)


def linears(ws: tuple[QuantWeight, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(linear(w, x) for w in ws): weights that read one x. Where they share qtype, K and group
    size and each would run the planes tile (int4, 5 to 32 rows) or be dequantized (more rows
    than the tiles take), they go together: the planes tile in ONE launch over all their rows
    (up to three weights), or, where the scratch as reserved holds them all, their dequantized
    rows one after another in it and ONE cuBLAS call. The outputs are then column views of the
    [T, sum of N] result."""
    from gdsllm.quant import triton_gemm
    rows, w0 = x.shape[0], ws[0]
    n, k = sum(w.shape[0] for w in ws), w0.shape[1]
    sizes = [w.shape[0] for w in ws]
    kind = None
    if rows and len(ws) > 1 and triton_gemm.one_layout(ws):
        kind = choice(w0.qtype, rows, k, x.dtype, w0.group_size)
    if not capturing():
        triton_gemm.lock_buffer(x.device)  # as linear's: the counters exist before any capture
    if kind not in (None, "tinygemm", "dequant") and kind.planes and len(ws) <= 3:
        return triton_gemm.matmul(x, tuple(ws), kind).split(sizes, dim=1)
    held = _scratch.get(_scratch_key(x.device, x.dtype))
    if kind != "dequant" or held is None or held.numel() < n * k:
        # only into the scratch as reserved (the VRAM ledger's, gdsllm.engine.budget
        # .dequant_numel: q+k+v, and gate+up where the LM head is larger): never grown for a group
        return tuple(linear(w, x) for w in ws)
    wp = triton_gemm.dequantize_into(tuple(ws), scratch(x.device, x.dtype, n * k), planes=True)
    return F.linear(triton_gemm.planes_x(x, w0), wp).split(sizes, dim=1)
