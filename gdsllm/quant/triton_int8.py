"""A Triton GEMV for group-wise int8 weights: y = x @ W.T with W = q * s + z, read as stored.

    y = int8_gemv(x, qw)     # x [M, K] on CUDA (M small), qw: an int8 QuantWeight

One program computes BLOCK_N outputs of one row of x. Per group g of the K axis it loads the
group's int8 values of those BLOCK_N weight rows and the x slice, and accumulates in float32

    acc += s[g, n] * sum_k x[k] q[n, k]  +  z[g, n] * sum_k x[k]

so the weight is never dequantized in memory. Not measured yet (no GPU on the machine it was
written on): tests/test_quant.py checks it against a float reference, benchmarks/bench_quant.py
times it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gdsllm.quant.schemes import QuantWeight


@triton.jit
def _gemv_kernel(x_ptr, q_ptr, sc_ptr, y_ptr, N, K, stride_xm, stride_ym,
                 GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, GROUP)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g in range(0, K // GROUP):
        k = g * GROUP + offs_k
        xv = tl.load(x_ptr + m * stride_xm + k).to(tl.float32)
        qv = tl.load(q_ptr + offs_n[:, None] * K + k[None, :], mask=mask_n[:, None], other=0)
        dot = tl.sum(qv.to(tl.float32) * xv[None, :], axis=1)
        s = tl.load(sc_ptr + (g * N + offs_n) * 2, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(sc_ptr + (g * N + offs_n) * 2 + 1, mask=mask_n, other=0.0).to(tl.float32)
        acc += s * dot + z * tl.sum(xv, axis=0)
    tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=mask_n)


def int8_gemv(x: torch.Tensor, w: QuantWeight, block_n: int = 64) -> torch.Tensor:
    assert w.qtype == "int8" and x.is_cuda and x.dim() == 2, (w.qtype, x.device, x.shape)
    n, k = w.shape
    x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    grid = (x.shape[0], triton.cdiv(n, block_n))
    _gemv_kernel[grid](x, w.data, w.scales, y, n, k, x.stride(0), y.stride(0),
                       GROUP=w.group_size, BLOCK_N=block_n)
    return y
