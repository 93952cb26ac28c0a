"""Fused elementwise kernels of a decoder block on CUDA, one launch each (Triton).

    out = rms_norm(x, weight, eps, offset)             # layers.rms_norm in one kernel
    s, out = add_rms_norm(x, y, weight, eps, offset)   # s = x + y, out = rms_norm(s)
    q, k = rope_qk(q, k, cos, sin)                     # layers.apply_rope on q and on k, one kernel
    out = act_mul(gate, up, "silu")                    # act(gate) * up: SwiGLU / GeGLU
    out, outp = rms_norm_planes(x, weight, eps, offset, index)     # each with a copy of out in
    s, out, outp = add_rms_norm_planes(x, y, weight, eps, offset, index)  # another column order:
    out, outp = act_mul_planes(gate, up, act, index)     # outp[.., index[j]] = out[.., j] (the
                                                         # order a quantized matmul reads x in)

In torch these are ~8 kernels per norm, 5 per rotary call, 2 for the gate and 1 per residual add,
each costing a launch's 1-3 us on the GPU whatever its size: most of a small-batch decode block's
elementwise time. The torch code in `gdsllm.models.layers` is the reference and the CPU path;
layers calls these only where `usable(...)`: CUDA tensors of one floating dtype, triton importable,
and `GDSLLM_FUSED` not set to 0 in the environment (read once at import: for A/B measurements).

Same math as the reference, rounding step for step: statistics in float32, and every place
where torch rounds an intermediate to the activation dtype (the normalized rows before the weight
multiply, x * cos and rotate_half(x) * sin before their sum, act(gate) before the multiply by
up, the residual sum) is rounded here too, so results differ from torch only by the order of the
float32 sum of squares and by the float32 rsqrt / exp approximations.

Nothing reads a device value on the host, and nothing is allocated but the outputs: the calls
are captured in CUDA graphs (gdsllm.engine.graphs). Each kernel runs on CPU tensors under
TRITON_INTERPRET=1 (tests/test_fused.py); benchmarks/bench_fused.py times a block's elementwise
work against the torch reference on the GPU.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: layers' torch code serves
    triton = None

ENABLED = os.environ.get("GDSLLM_FUSED", "1") != "0"
ACTS = ("silu", "gelu_pytorch_tanh")  # the activations act_mul implements (layers.ACTIVATIONS)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_ACT_BLOCK = 1024


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels serve these operands: all CUDA, one float dtype, triton there."""
    first = tensors[0]
    return (triton is not None and ENABLED and first.is_cuda and first.dtype in _DTYPES
            and all(t.is_cuda and t.dtype == first.dtype for t in tensors[1:]))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
             ) -> torch.Tensor:
    """layers.rms_norm over the last dimension of x (any leading shape), in x's dtype."""
    return _norm(x, None, weight, eps, offset)[0]


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, layers.rms_norm(x + y, ...)): a residual add and the norm after it."""
    out, total, _ = _norm(x, y, weight, eps, offset)
    return total, out


def rms_norm_planes(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                    index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm and its output with columns moved (outp[..., index[j]] = out[..., j]), one
    launch: a quantized matmul's x in plane order (gdsllm.quant.kernels_cuda.plane_index)
    without a copy kernel of its own."""
    out, _, outp = _norm(x, None, weight, eps, offset, index)
    return out, outp


def add_rms_norm_planes(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float,
                        offset: float, index: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x + y, rms_norm(x + y), that norm with its columns moved as rms_norm_planes)."""
    out, total, outp = _norm(x, y, weight, eps, offset, index)
    return total, out, outp


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """layers.apply_rope on q [T, nh, hd] and k [T, nkv, hd] with cos/sin [T, hd] (rotate_half
    convention, as layers.rope_cos_sin makes them); new tensors, one launch."""
    t, nh, hd = q.shape
    nkv = k.shape[1]
    if k.shape != (t, nkv, hd) or cos.shape != (t, hd) or sin.shape != (t, hd) or hd % 2:
        raise ValueError(f"rope_qk: q {tuple(q.shape)}, k {tuple(k.shape)}, cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)} do not fit")
    q, k, cos, sin = (a if a.stride(-1) == 1 else a.contiguous() for a in (q, k, cos, sin))
    qo = torch.empty((t, nh, hd), dtype=q.dtype, device=q.device)
    ko = torch.empty((t, nkv, hd), dtype=k.dtype, device=k.device)
    if t:
        _rope_kernel[(t, nh + nkv)](
            q, k, cos, sin, qo, ko, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos.stride(0), sin.stride(0), nh, nkv, HALF=hd // 2, BLOCK=_pow2(hd // 2),
            num_warps=1, enable_fp_fusion=False)  # no fma: torch rounds each product first
    return qo, ko


def act_mul(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up in gate's dtype, act one of ACTS (torch: F.silu / tanh F.gelu)."""
    return _act_mul(gate, up, act, None)[0]


def act_mul_planes(gate: torch.Tensor, up: torch.Tensor, act: str, index: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """act_mul and its output with columns moved (outp[..., index[j]] = out[..., j]), one launch."""
    return _act_mul(gate, up, act, index)


def _act_mul(gate: torch.Tensor, up: torch.Tensor, act: str, index: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if act not in ACTS:
        raise ValueError(f"act_mul: activation {act!r} is not one of {', '.join(ACTS)}")
    if gate.shape != up.shape:
        raise ValueError(f"act_mul: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    n, cols = gate.numel(), gate.shape[-1]
    # rows read where they lie when only the rows are apart (gate and up: column views of one
    # [T, 2I] matmul result, gdsllm.quant.kernels_cuda.linears), not copied first
    strided = gate.dim() == 2 and gate.stride(1) == up.stride(1) == 1 and (
        gate.stride(0) != cols or up.stride(0) != cols)
    if not strided:
        gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    outp = None if index is None else torch.empty_like(out)
    if index is not None and index.shape != (cols,):
        raise ValueError(f"act_mul: column index {tuple(index.shape)} for {cols} columns")
    if n:
        _act_mul_kernel[(-(-n // _ACT_BLOCK),)](  # not triton.cdiv: 2 us on the host
            gate, up, out, index if index is not None else out, out if outp is None else outp, n,
            cols, gate.stride(0) if strided else cols, up.stride(0) if strided else cols,
            GELU=act == "gelu_pytorch_tanh", HAS_P=index is not None, STRIDED=strided,
            BLOCK=_ACT_BLOCK, num_warps=4)
    return out, outp


def _norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float,
          offset: float, index: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    n = x.shape[-1]
    if weight.shape != (n,) or (y is not None and y.shape != x.shape) or (
            index is not None and index.shape != (n,)):
        raise ValueError(f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}"
                         + ("" if y is None else f", residual {tuple(y.shape)}") + " do not fit")
    if x.dim() == 3 and x.stride(-1) == 1 and y is None:
        # [T, heads, hd] as it lies: per-head q / k of a grouped q+k+v result (column views,
        # gdsllm.quant.kernels_cuda.linears), whose rows no single stride reaches
        x2, heads, stride_h = x, x.shape[1], x.stride(1)
    else:
        x2 = x.reshape(-1, n)  # a view for the rows the models pass (contiguous last dimension)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        heads, stride_h = 1, 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = None if y is None else torch.empty_like(out)
    outp = None if index is None else torch.empty_like(out)
    y2 = x2
    if y is not None:
        y2 = y.reshape(-1, n)
        y2 = y2 if y2.stride(-1) == 1 else y2.contiguous()
    rows, block = x.numel() // n if n else 0, _pow2(n)
    if rows:
        _rms_norm_kernel[(rows,)](
            x2, y2, weight.contiguous(), out, out if total is None else total,
            out if index is None else index, out if outp is None else outp,
            x2.stride(0), heads, stride_h, y2.stride(0), n, 1.0 / n, eps, offset,
            HAS_Y=y is not None,
            OFFSET=bool(offset), HAS_P=index is not None, BLOCK=block,
            num_warps=max(1, min(16, block // 512)))
    return out, total, outp


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, y_ptr, w_ptr, out_ptr, sum_ptr, idx_ptr, outp_ptr, stride_x,
                         heads, stride_xh, stride_y, n, inv_n, eps, offset, HAS_Y: tl.constexpr,
                         OFFSET: tl.constexpr, HAS_P: tl.constexpr, BLOCK: tl.constexpr):
        """One row: (x [+ y], rounded) -> float32 h * rsqrt(mean(h^2) + eps) -> times the weight
        as layers.rms_norm: LLaMA rounds h and the weight to the dtype first, Gemma multiplies
        by (offset + weight) in float32. Output rows are contiguous; x's row r is head
        r % heads of token r // heads (heads 1: rows stride_x apart)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        dt = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + (row // heads) * stride_x + (row % heads) * stride_xh + cols,
                    mask=mask, other=0.0)
        if HAS_Y:
            y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + y.to(tl.float32)).to(dt)
            tl.store(sum_ptr + row * n + cols, x, mask=mask)
        h = x.to(tl.float32)
        h = h * tl.math.rsqrt(tl.sum(h * h, axis=0) * inv_n + eps)  # torch's mean: sum * (1/n)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if OFFSET:
            out = h * (offset + w.to(tl.float32))
        else:
            out = w.to(dt).to(tl.float32) * h.to(dt).to(tl.float32)
        tl.store(out_ptr + row * n + cols, out.to(dt), mask=mask)
        if HAS_P:  # the same values, column j at idx[j]
            dest = tl.load(idx_ptr + cols, mask=mask, other=0)
            tl.store(outp_ptr + row * n + dest, out.to(dt), mask=mask)

    @triton.jit
    def _rope_head(src, dst, c1, c2, s1, s2, offs, mask, HALF: tl.constexpr):
        """One head: x * cos + rotate_half(x) * sin, each product rounded to the dtype before
        the sum, as torch does; rotate_half(x) = (-x2, x1) and rounding commutes with -."""
        dt = dst.dtype.element_ty
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        o1 = (x1 * c1).to(dt).to(tl.float32) - (x2 * s1).to(dt).to(tl.float32)
        o2 = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
        tl.store(dst + offs, o1.to(dt), mask=mask)
        tl.store(dst + HALF + offs, o2.to(dt), mask=mask)

    @triton.jit
    def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, stride_qt, stride_qh,
                     stride_kt, stride_kh, stride_ct, stride_st, nh, nkv,
                     HALF: tl.constexpr, BLOCK: tl.constexpr):
        """Program (token t, head j): q's head j for j < nh, else k's head j - nh."""
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        c1 = tl.load(cos_ptr + t * stride_ct + offs, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + t * stride_ct + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * stride_st + offs, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + t * stride_st + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        if j < nh:
            _rope_head(q_ptr + t * stride_qt + j * stride_qh, qo_ptr + (t * nh + j) * (2 * HALF),
                       c1, c2, s1, s2, offs, mask, HALF)
        else:
            _rope_head(k_ptr + t * stride_kt + (j - nh) * stride_kh,
                       ko_ptr + (t * nkv + j - nh) * (2 * HALF), c1, c2, s1, s2, offs, mask, HALF)

    @triton.jit
    def _act_mul_kernel(gate_ptr, up_ptr, out_ptr, idx_ptr, outp_ptr, n, cols, stride_g,
                        stride_u, GELU: tl.constexpr, HAS_P: tl.constexpr, STRIDED: tl.constexpr,
                        BLOCK: tl.constexpr):
        """act(gate) in float32, rounded to the dtype (as F.silu / F.gelu return it), times up.
        silu: g / (1 + exp(-g)); tanh GELU: 0.5 g (1 + tanh(z)) = g / (1 + exp(-2z)) with
        z = sqrt(2/pi) (g + 0.044715 g^3) (Triton has no tanh; this form saturates cleanly).
        STRIDED: gate's and up's rows lie stride_g / stride_u elements apart (out is contiguous)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dt = out_ptr.dtype.element_ty
        if STRIDED:
            row, c = offs // cols, offs % cols
            g = tl.load(gate_ptr + row * stride_g + c, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + row * stride_u + c, mask=mask, other=0.0).to(tl.float32)
        else:
            g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            a = g / (1.0 + tl.exp(-2.0 * z))
        else:
            a = g / (1.0 + tl.exp(-g))
        y = (a.to(dt).to(tl.float32) * u).to(dt)
        tl.store(out_ptr + offs, y, mask=mask)
        if HAS_P:  # the same values, column j of each row at idx[j]
            col = offs % cols
            dest = offs - col + tl.load(idx_ptr + col, mask=mask, other=0)
            tl.store(outp_ptr + dest, y, mask=mask)
