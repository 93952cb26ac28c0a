"""The Triton W4A16 / W8A16 GEMMs (gdsllm.quant.triton_gemm) under Triton's interpreter, on CPU:
every tile kernels_cuda.CHOICES runs and falls back to, and one of each other form (GEMV, x @ W.T with
x gathered and permuted, a 16-way split; `--all`: every candidate), each where `usable`, against float32 math over
`QuantWeight.dequantize`, for both qtypes, half and float32 activations, groups that span a step
and groups that do not, a tail k-block, rows that do not fill a tile, split-K (the counters are
left at 0); `dequantize_into` in both orders, and of weights one after another (q, k, v: one
int4 launch) as `kernels_cuda.linears` multiplies them. The PTX unpacking (`Config.asm`) runs on a GPU
only (tests/test_quant.py, gpu).
Prints one JSON line last (tests/triton_helpers.py).

    TRITON_INTERPRET=1 PYTHONPATH=. python3 tests/quant_gemm_cases.py [--all]
"""
from __future__ import annotations

import json
import sys

import torch

from gdsllm.quant import kernels_cuda
from gdsllm.quant import triton_gemm as tg
from gdsllm.quant.rtn import quantize
from gdsllm.quant.schemes import QuantWeight
from triton_helpers import numpy24_interpreter_fix

# (qtype, N, K, group): K 384 is 3 k-blocks of 128 (a tail for 256-input steps and for splits),
# K 96 has int4 k-blocks of 32 inputs (inner k-tiles 2); N 40 leaves part of a tile empty
SHAPES = (("int4", 40, 384, 32), ("int4", 24, 256, 128), ("int4", 16, 96, 32),
          ("int4", 16, 512, 256), ("int8", 40, 384, 16), ("int8", 24, 320, 64), ("int8", 24, 384, 128))


# one of each form besides the chosen tiles: GEMV, x @ W.T gathering x and permuting it, split 16
OTHERS = ((1, 16, 4, 4, 4, 256), (16, 32, 4, 3, 4, 128), (16, 32, 4, 3, 4, 128, False, True),
          (16, 64, 4, 2, 16, 128, True))


def tiles(every: bool) -> list[tuple]:
    if every:
        return list(tg.CANDIDATES)
    chosen = {c for table in (kernels_cuda.CHOICES, kernels_cuda.FALLBACK)
              for q in table.values() for _, c in q if isinstance(c, tuple)}
    return sorted(chosen | set(OTHERS))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b).norm() / b.norm())


def main() -> None:
    numpy24_interpreter_fix()
    every = "--all" in sys.argv
    g = torch.Generator().manual_seed(0)
    worst, runs, dequantized, planes = {}, 0, 0, 0
    for qtype, n, k, group in SHAPES:
        qt = quantize(torch.randn(n, k, generator=g) * 0.02, qtype, group)
        data, sc = qt.packed()
        qw = QuantWeight(qtype, (n, k), group, data, sc)
        wf = qw.dequantize(torch.float32)
        # the whole-weight dequantization ("dequant" past the tiles' rows): input order exactly,
        # and the plane order as permute_x orders x
        out = torch.empty(n * k, dtype=torch.float32)
        assert torch.equal(tg.dequantize_into(qw, out), wf), (qtype, n, k, group)
        x = torch.randn(5, k, generator=g)
        wp = tg.dequantize_into(qw, out, planes=True)
        assert rel(tg.permute_x(x, qw) @ wp.T, x @ wf.T) < 1e-5, (qtype, n, k, group, "planes")
        dequantized += 1
        for c in tiles(every):
            cfg = tg.Config(*c)
            # no bfloat16 tl.dot: triton 3.5's interpreter computes it wrongly (see
            # paged_attention_cases.py); the GEMV tiles compute in float32
            cases = [(1, torch.bfloat16 if cfg.block_m == 1 else torch.float16),
                     (3, torch.float16), (cfg.block_m + 1, torch.float32)]
            for rows, dtype in cases:
                if not every and (qtype, n) != ("int4", 40) and dtype == torch.float32:
                    continue
                if not tg.usable(qtype, k, cfg, group, dtype):  # kernels_cuda.choice's fallback
                    continue
                x = torch.randn(rows, k, generator=g).to(dtype)
                ref = x.float() @ wf.T
                y = tg.matmul(x, qw, cfg)
                assert y.dtype == dtype and y.shape == (rows, n), (c, y.dtype, y.shape)
                err = rel(y, ref)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                assert err < tol, (qtype, n, k, group, c, rows, dtype, err)
                key = f"{qtype}/{dtype}".replace("torch.", "")
                worst[key] = max(worst.get(key, 0.0), err)
                runs += 1
                planes += cfg.planes
    fused = fused_cases(g)
    for locks in tg._locks.values():
        assert int(locks.abs().sum()) == 0, "split-K counters left non-zero"
    print(json.dumps({"runs": runs, "worst": worst, "dequantized": dequantized, "planes": planes,
                      "fused": fused}))


def fused_cases(g: torch.Generator) -> int:
    """Weights of one input dequantized one after another (int4 q/k/v and gate/up: one launch;
    int8: one a launch) equal each dequantized alone; kernels_cuda.linears gives linear's
    results: one matmul where they are dequantized (80 rows), one launch of the planes tile at
    8 rows (int4 in groups of 128), linear's own calls for the other tiles and where qtypes
    differ (GGUF's Q4_K_M keeps v as int8)."""
    def weight(qtype, n, k, group):
        data, sc = quantize(torch.randn(n, k, generator=g) * 0.02, qtype, group).packed()
        return QuantWeight(qtype, (n, k), group, data, sc)

    checked = 0
    for qtype, rows_of, k, group in (("int4", (48, 16, 16), 256, 128), ("int4", (40, 40), 384, 32),
                                     ("int8", (40, 24, 24), 320, 64)):
        ws = tuple(weight(qtype, n, k, group) for n in rows_of)
        for planes in (False, True):
            alone = [tg.dequantize_into(w, torch.empty(w.shape[0] * k), planes) for w in ws]
            together = tg.dequantize_into(ws, torch.empty(sum(rows_of) * k), planes)
            assert torch.equal(together, torch.cat(alone)), (qtype, rows_of, planes)
        for rows, dtype in ((80, torch.float32), (8, torch.float16)):
            x = torch.randn(rows, k, generator=g).to(dtype)
            kernels_cuda.scratch(x.device, dtype, sum(rows_of) * k)  # as the ledger reserves it
            got = kernels_cuda.linears(ws, x)
            # dequantized (80 rows), or the planes tile (int4 in groups of 128, 8 rows): one
            # launch's result, the outputs its column views; else linear's own calls
            fused = got[0].data_ptr() + got[0].element_size() * rows_of[0] == got[1].data_ptr()
            assert fused == (rows == 80 or (qtype, group) == ("int4", 128)), (qtype, rows)
            for y, w in zip(got, ws):
                ref = kernels_cuda.linear(w, x)  # (the tile splits K by its own tile count)
                assert y.shape == ref.shape and rel(y, ref.float()) < (2e-3 if fused else 1e-6), (
                    qtype, rows, rel(y, ref))
                assert rel(y, x.float() @ w.dequantize(torch.float32).T) < 2e-2, (qtype, rows)
        checked += 1
    mixed = (weight("int4", 32, 256, 128), weight("int8", 32, 256, 128))
    x = torch.randn(80, 256, generator=g)
    for y, w in zip(kernels_cuda.linears(mixed, x), mixed):
        assert torch.equal(y, kernels_cuda.linear(w, x))
    try:
        tg.dequantize_into(mixed, torch.empty(64 * 256))
        raise AssertionError("weights of two qtypes dequantized together")
    except ValueError as e:
        assert "differ in qtype" in str(e)
    return checked


if __name__ == "__main__":
    main()
