"""A decoder block with int4 projections through the CUDA code paths, on CPU under Triton's
interpreter: the fused norms and activation writing x in plane order for the matmuls that read
it (`feeds`), and q+k+v / gate+up together (`kernels_cuda.linears`): one launch of the planes
tile (8 rows), or dequantized and multiplied together (80 rows), against the same block in float32 over the dequantized
weights. The dispatch that checks for CUDA is pointed at the CUDA kernels (this process only).
Prints one JSON line last (tests/triton_helpers.py).

    TRITON_INTERPRET=1 PYTHONPATH=.:tests python3 tests/quant_block_cases.py
"""
from __future__ import annotations

import json
from dataclasses import replace

import torch

from fused_cases import FAMILY_PARAMS, block_case
from gdsllm.models import fused, gemma3, llama
from gdsllm.quant import kernels_cuda, triton_gemm
from gdsllm.quant.rtn import quantize
from gdsllm.quant.schemes import QuantWeight
from triton_helpers import numpy24_interpreter_fix

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCKS = {"llama": llama.decoder_block, "qwen3": llama.decoder_block, "gemma3": gemma3.decoder_block}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def run(family: str, rows: int, counts: dict) -> float:
    """The block's output relative error against float32 math, family and rows as named."""
    FAMILY_PARAMS[family] = p = replace(FAMILY_PARAMS[family], intermediate_size=512)
    ref, case = (block_case(family, dt, batch=rows, device="cpu", seed=1)
                 for dt in (torch.float32, torch.float16))
    for name, w in ref.weights.items():
        if name.endswith(".weight") and name.split(".")[-2] in PROJ:  # int4 in groups of 128
            data, sc = quantize(w, "int4", 128).packed()
            qw = QuantWeight("int4", tuple(w.shape), 128, data, sc)
            case.weights[name], ref.weights[name] = qw, qw.dequantize(torch.float32)
    want = BLOCKS[family](p, ref.weights, ref.x, ref.cos, ref.sin, ref.batch, 0)
    kernels_cuda.scratch(case.x.device, torch.float16, 2 * 512 * p.hidden_size)  # gate+up: held
    before = dict(counts)
    got = BLOCKS[family](p, case.weights, case.x, case.cos, case.sin, case.batch, 0)
    assert got.dtype == torch.float16 and got.shape == want.shape
    # o_proj's input (attention's output) is the one x copied; the norms and the activation
    # wrote the others' copies. q+k+v and gate+up go together: one launch of the planes tile
    # (8 rows), or dequantized together (80).
    assert counts["permute_x"] - before["permute_x"] == 1, (family, rows, counts)
    assert counts["together"] - before["together"] == 2, (family, rows, counts)
    # gate and up, column views of one result, go into the activation as they lie
    assert counts["views_into_act"] - before["views_into_act"] == 1, (family, rows, counts)
    return rel(got, want)


def main() -> None:
    numpy24_interpreter_fix()
    counts = {"permute_x": 0, "together": 0, "views_into_act": 0}
    permute_x, dequantize_into = triton_gemm.permute_x, triton_gemm.dequantize_into

    def counted_permute(x, w):
        counts["permute_x"] += x.is_floating_point()  # not kernels_cuda.plane_order's index
        return permute_x(x, w)

    def counted_dequantize(w, out, planes=False, block_n=None):
        counts["together"] += isinstance(w, tuple)
        return dequantize_into(w, out, planes, block_n)

    def counted_matmul(x, w, cfg):
        counts["together"] += isinstance(w, tuple)
        return matmul(x, w, cfg)

    def counted_act_mul(gate, up, act, index):
        counts["views_into_act"] += gate.stride(0) != gate.shape[-1]
        return act_mul(gate, up, act, index)

    act_mul, fused._act_mul = fused._act_mul, counted_act_mul
    matmul = triton_gemm.matmul
    triton_gemm.permute_x, triton_gemm.dequantize_into = counted_permute, counted_dequantize
    triton_gemm.matmul = counted_matmul
    fused.usable = lambda *ts: all(t.dtype == ts[0].dtype in (torch.float16, torch.bfloat16) for t in ts)
    QuantWeight.linear = lambda self, x: kernels_cuda.linear(self, x)
    QuantWeight.linears = staticmethod(kernels_cuda.linears)
    errors = {f"{fam}/{rows}": run(fam, rows, counts) for fam in BLOCKS for rows in (8, 80)}
    worst = max(errors.values())
    assert worst < 5e-3, errors  # float16 against float32: 5e-4 to 8e-4 (2026-12-05)
    print(json.dumps({"errors": errors, "worst": worst}))


if __name__ == "__main__":
    main()
