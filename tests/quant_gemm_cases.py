"""The Triton W4A16 / W8A16 GEMMs (gdsllm.quant.triton_gemm) under Triton's interpreter, on CPU:
every tile kernels_cuda.CHOICES runs and falls back to, and one of each other form (GEMV, x @ W.T with
x gathered and permuted, a 16-way split; `--all`: every candidate), each where `usable`, against float32 math over
`QuantWeight.dequantize`, for both qtypes, half and float32 activations, groups that span a step
and groups that do not, a tail k-block, rows that do not fill a tile, split-K (the counters are
left at 0); and `dequantize_into` in both orders. The PTX unpacking (`Config.asm`) runs on a GPU
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
    for locks in tg._locks.values():
        assert int(locks.abs().sum()) == 0, "split-K counters left non-zero"
    print(json.dumps({"runs": runs, "worst": worst, "dequantized": dequantized, "planes": planes}))


if __name__ == "__main__":
    main()
