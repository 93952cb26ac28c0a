"""Quantized weights (issue 10), the building blocks: the int4 tile layout, GGUF blocks,
round-to-nearest, torch's CPU int4 kernel on our scales, and (marked gpu) the CUDA kernels against
a float reference. The format, compute and bad inputs: test_quant_format.py.

    python3 -m pytest -q tests/test_quant.py
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from gdsllm.quant import schemes
from gdsllm.quant.gguf_blocks import DECODERS, decode
from gdsllm.quant.int4pack import pack_int4, unpack_int4
from gdsllm.quant.rtn import quantize
from gdsllm.quant.schemes import QuantWeight, inner_k_tiles
from llama_ref import rel_err
from triton_helpers import needs_triton, run_interpreted


# --- layouts and blocks -------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(8, 64), (16, 128), (24, 256), (16, 96)])
def test_int4_pack_is_the_kernel_layout(n, k):
    """pack_int4 word by word against the formula of torch's CUDA `_convert_weight_to_int4pack`
    (aten/src/ATen/native/cuda/int4mm.cu, uint8 input), and unpack_int4 inverts it."""
    g = torch.Generator().manual_seed(n * k)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    b = (q[:, 0::2] << 4) | q[:, 1::2]
    d, t = pack_int4(q), inner_k_tiles(k)
    assert d.shape == (n // 8, k // (16 * t), 32, t // 2) and d.dtype == torch.int32
    for nt in range(n // 8):
        for ko in range(k // (16 * t)):
            for lane in range(32):
                for ik in range(0, t, 2):
                    row, kb = nt * 8 + lane // 4, (ko * t + ik) * 8
                    v = [int(b[row, x]) for x in (kb + lane % 4, kb + lane % 4 + 4,
                                                  kb + 8 + lane % 4, kb + 12 + lane % 4)]
                    want = ((v[3] & 15) << 28 | (v[2] & 15) << 24 | (v[1] & 15) << 20 |
                            (v[0] & 15) << 16 | (v[3] & 0xF0) << 8 | (v[2] & 0xF0) << 4 |
                            (v[1] & 0xF0) | (v[0] & 0xF0) >> 4)
                    assert int(d[nt, ko, lane, ik // 2]) & 0xFFFFFFFF == want
    assert torch.equal(unpack_int4(d, (n, k)), q)


def test_cpu_int4_kernel_agrees_with_our_scales():
    """torch's own CPU int4 kernel, given our values and (scale, zero) pairs, computes what our
    dequantization says: the formula (q - 8) * s + z is the kernels' formula."""
    w = torch.randn(64, 128)
    qt = quantize(w, "int4", 32)
    data, sc = qt.packed()
    qw = QuantWeight("int4", (64, 128), 32, data, sc)
    x = torch.randn(3, 128)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qt.q.to(torch.int32), 2)
    theirs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sc.float())
    assert rel_err(theirs, x @ qw.dequantize(torch.float32).T) < 1e-5
    assert rel_err(qw.linear(x), theirs) < 1e-5


@pytest.mark.parametrize("qtype", ["int4", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
def test_cpu_resident_forms_against_float32(qtype, rows):
    """The resident CPU forms (gdsllm.quant.kernels_cpu.resident: int4 repacked for torch's
    kernel with bfloat16 activations, int8 as a float16 copy) against float32 math over the
    dequantized weight, at decode and prompt row counts, relative to the largest output: int4
    within 2^-7, a few bfloat16 roundings of at most 2^-9 each (the input, the output: 3.4e-3
    measured), int8 within 2^-10 (float16's roundings: 5.4e-4 measured); both still dequantize
    exactly."""
    from gdsllm.quant.kernels_cpu import (HALF_ROWS, INT4_KERNEL, HalfCopy, PackedInt4, resident,
                                          resident_nbytes)
    if qtype == "int4" and not INT4_KERNEL:
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu (2.5 and later)")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 256, generator=g)
    data, sc = quantize(w, qtype, 32).packed()
    qw = QuantWeight(qtype, (96, 256), 32, data, sc)
    rw = resident(qw)
    assert isinstance(rw, PackedInt4 if qtype == "int4" else HalfCopy)
    made = rw.packed if qtype == "int4" else rw.half
    assert made.nbytes == resident_nbytes(qw)
    assert torch.equal(rw.dequantize(torch.float32), qw.dequantize(torch.float32))
    x = torch.randn(rows, 256, generator=g)
    want = x @ qw.dequantize(torch.float32).T
    got = rw.linear(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert rel_err(got, want) < (2 ** -7 if qtype == "int4" else 2 ** -10)
    if qtype == "int8" and rows <= HALF_ROWS:  # beyond float16's range: float32 math
        x[0, 0] = 1e6
        assert torch.equal(rw.linear(x), x @ rw.half.float().T)


def test_cpu_fused_int4_equals_its_parts():
    """Projections of one input held as one FusedInt4 (q/k/v, gate/up): each part's columns of
    its output are bit for bit that part's own PackedInt4 matmul, at decode and prompt row
    counts; the bytes made are fused_nbytes."""
    from gdsllm.quant.kernels_cpu import (INT4_KERNEL, FusedInt4, PackedInt4, fusable,
                                          fused_nbytes)
    if not INT4_KERNEL:
        pytest.skip("this torch has no _weight_int4pack_mm_for_cpu (2.5 and later)")
    g = torch.Generator().manual_seed(0)
    parts = []
    for n in (64, 32, 32):
        data, sc = quantize(torch.randn(n, 128, generator=g), "int4", 32).packed()
        parts.append(QuantWeight("int4", (n, 128), 32, data, sc))
    assert fusable(parts) and not fusable(parts + [QuantWeight("int8", (8, 128), 32, None, None)])
    f = FusedInt4.of(parts)
    assert f.packed.nbytes + f.scales.nbytes == fused_nbytes(parts)
    for rows in (1, 5, 40):
        x = torch.randn(rows, 128, generator=g)
        y = f.linear(x)
        assert y.shape == (rows, 128) and f.sizes == (64, 32, 32)
        for yp, w in zip(y.split(f.sizes, dim=1), parts):
            assert yp.dtype == torch.float32 and torch.equal(yp, PackedInt4.of(w).linear(x))


F16_AT = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
          "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_gguf_blocks_decode_like_gguf(name):
    """Random blocks of every kept type: q * s + z from our decoding equals gguf.quants.dequantize
    exactly, and the qtype / group size are the mapping the issue asks for."""
    _, block, size = DECODERS[name]
    n, k = 8, 512
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    for off in F16_AT[name]:
        raw[:, off:off + 2] = rng.uniform(1e-3, 2e-2, (raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    ref = torch.from_numpy(gguf.quants.dequantize(raw.reshape(n, -1), Q[name]).reshape(n, k))
    qt = decode(name, raw, (n, k))
    assert qt.qtype == ("int4" if name in ("Q4_0", "Q4_1", "Q4_K") else "int8")
    assert qt.group_size == (16 if name == "Q6_K" else 32)
    g = qt.group_size
    ours = (qt.q.float() - (8 if qt.qtype == "int4" else 0)) * qt.scale.repeat_interleave(g, 1) \
        + qt.zero.repeat_interleave(g, 1)
    assert torch.equal(ours, ref.float())


@pytest.mark.parametrize("qtype,g", [("int4", 32), ("int4", 128), ("int8", 64)])
def test_rtn_is_nearest_code(qtype, g):
    """Plain RTN: every weight is within half a step of its dequantized value, under the stored
    scales; the refinement (the writer's default) lowers the error further."""
    w = torch.randn(16, 256) * torch.logspace(-3, 0, 16)[:, None]
    w[0, :g] = 0.25  # a constant group
    qt = quantize(w, qtype, g, refine=0)
    refined = quantize(w, qtype, g)
    mse = lambda t: float(((t.dequantize() - w) ** 2).sum())
    assert mse(refined) < mse(qt)
    assert torch.allclose(refined.dequantize()[0, :g], w[0, :g], rtol=1e-2)
    step = qt.scale.to(schemes.SCALE_DTYPE[qtype]).float().repeat_interleave(g, 1)
    err = (qt.dequantize() - w).abs()
    assert (err <= step * 0.5 + 1e-3 * step + 1e-7).all()
    assert torch.allclose(qt.dequantize()[0, :g], w[0, :g], rtol=1e-2)


# --- CUDA kernels (the lead runs these on the GPU) ----------------------------------------------

@needs_triton
def test_triton_gemm_tiles_under_interpreter():
    """The Triton W4A16 / W8A16 GEMMs on CPU under Triton's interpreter (tests/quant_gemm_cases.py):
    every tile kernels_cuda.CHOICES runs and one of each other form, against float32 math; and the
    whole-weight dequantization in input and plane order."""
    result = run_interpreted("quant_gemm_cases.py")
    assert result["runs"] > 100 and result["dequantized"] == 7 and set(result["worst"]) == {
        "int4/bfloat16", "int4/float16", "int4/float32", "int8/bfloat16", "int8/float16"}
    assert result["planes"] >= 4  # the planes tile, in groups of one k-block and of two
    assert result["fused"] == 3  # weights of one input dequantized together: int4 twice, int8


def test_linears_of_quantized_parts_equal_linear_of_each_with_its_bias():
    """layers.linears over quantized q, k and v (QuantWeight.linears: on CUDA one matmul where
    dequantized, here each part's kernel) gives linear's result for each, its bias added."""
    from gdsllm.models import layers
    g = torch.Generator().manual_seed(3)
    weights = {}
    for name, n in zip(layers.FUSED["self_attn.qkv_proj.weight"], (64, 32, 32)):
        data, sc = quantize(torch.randn(n, 128, generator=g) * 0.02, "int4", 32).packed()
        weights[name] = QuantWeight("int4", (n, 128), 32, data, sc)
    weights["self_attn.q_proj.bias"] = torch.randn(64, generator=g)
    weights["self_attn.v_proj.bias"] = torch.randn(32, generator=g)
    x = torch.randn(5, 128, generator=g)
    got = layers.linears(weights, "self_attn.qkv_proj.weight", x)
    for y, name in zip(got, layers.FUSED["self_attn.qkv_proj.weight"]):
        assert torch.equal(y, layers.linear(weights, name, x)), name
    assert not torch.equal(got[0], weights["self_attn.q_proj.weight"].linear(x))  # bias added


@needs_triton
@pytest.mark.slow
def test_quantized_block_through_the_cuda_paths_under_interpreter():
    """LLaMA, Qwen 3 and Gemma 3 blocks with int4 projections through the CUDA code paths on CPU
    (tests/quant_block_cases.py): the norms and the activation write x in plane order for the
    matmuls after them (only o_proj's input is copied), q+k+v and gate+up are dequantized
    together past the tiles, and the output is float32 math's over the dequantized weights."""
    result = run_interpreted("quant_block_cases.py")
    assert set(result["errors"]) == {f"{f}/{r}" for f in ("llama", "qwen3", "gemma3") for r in (8, 80)}
    assert result["worst"] < 5e-3


@needs_triton
@pytest.mark.parametrize("kernel", ["dequant-planes", "dequant-input-order", "planes-1", "planes-3"])
def test_one_launch_kernels_of_three_weights_compile_for_hopper(kernel):
    """No GPU needed: the int4 kernels that take up to three weights in one launch (a branch per
    weight's programs, which the interpreter runs as Python) lower for sm_90 and ptxas assembles
    them, with the 16-byte alignment Triton's launcher assumes for the pointers: the
    dequantization in both orders, and the planes tile for one weight and for three (split 4,
    the PTX unpacking)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gdsllm.quant import triton_gemm
    if kernel.startswith("dequant"):
        fn, ptrs = triton_gemm._w4_dequant, {"q0": "*i32", "s0": "*bf16", "q1": "*i32", "s1": "*bf16",
                                             "q2": "*i32", "s2": "*bf16", "out_ptr": "*bf16"}
        ints = ("N0", "N1", "N2", "B1", "B2", "KO")
        const = dict(G=128, T=8, BLOCK_N=16, PLANES=kernel == "dequant-planes")
    else:
        fn, ptrs = triton_gemm._w4_planes, {"x_ptr": "*bf16", "q_ptr": "*i32", "sz_ptr": "*i32",
                                            "q1": "*i32", "sz1": "*i32", "q2": "*i32",
                                            "sz2": "*i32", "y_ptr": "*bf16", "ws_ptr": "*fp32",
                                            "lock_ptr": "*i32"}
        ints = ("M", "N", "N1", "N2", "B1", "B2", "KO", "stride_xm", "stride_ym", "per_split")
        const = dict(G=128, T=8, BLOCK_M=16, BLOCK_N=128, SPLIT=4, SWAP=True, STAGES=3, ASM=True,
                     PARTS=int(kernel[-1]))
    sig = {**ptrs, **dict.fromkeys(ints, "i32"), **dict.fromkeys(const, "constexpr")}
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(ptrs))}
    ptx = triton.compile(ASTSource(fn, sig, const, aligned), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "num_stages": 3}).asm["ptx"]
    assert "st.global" in ptx


@needs_triton
def test_planes_tile_routing_split_and_shared_x():
    """The planes tile where it is usable (half x, k-blocks of 128, groups spanning them), the
    whole tiles where not (GGUF's groups of 32, float32 x); split-K by tile count as measured;
    x put in plane order once for consecutive matmuls of one unchanged tensor."""
    from gdsllm.quant import kernels_cuda
    from gdsllm.quant import triton_gemm as tg
    assert kernels_cuda.choice("int4", 2, 4096, torch.bfloat16) == "tinygemm"
    assert kernels_cuda.choice("int4", 16, 4096, torch.bfloat16).planes
    assert kernels_cuda.choice("int4", 32, 11008, torch.float16, 256).planes
    for k, g, dtype in ((4096, 32, torch.bfloat16), (576, 128, torch.bfloat16),
                        (4096, 128, torch.float32)):
        cfg = kernels_cuda.choice("int4", 16, k, dtype, g)
        assert cfg == tg.Config(*kernels_cuda.FALLBACK["int4"][0][1]), (k, g, dtype, cfg)
    assert kernels_cuda.choice("int4", 48, 4096, torch.bfloat16).block_m == 32
    assert kernels_cuda.choice("int4", 65, 4096, torch.bfloat16) == "dequant"
    # 2 x 132 SMs' worth of programs, a power of two in [2, 8] (the H200's measured splits)
    assert [tg.auto_split(t, 132) for t in (1, 32, 64, 86, 128, 172, 344)] == [8, 8, 4, 4, 2, 2, 2]
    g = torch.Generator().manual_seed(0)
    data, sc = quantize(torch.randn(8, 256, generator=g), "int4", 128).packed()
    qw = QuantWeight("int4", (8, 256), 128, data, sc)
    x = torch.randn(3, 256, generator=g)
    a = tg.planes_x(x, qw)
    assert torch.equal(a, tg.permute_x(x, qw)) and tg.planes_x(x, qw) is a  # k, v: the same copy
    x.add_(1.0)  # changed in place: a new copy
    b = tg.planes_x(x, qw)
    assert b is not a and torch.equal(b, tg.permute_x(x, qw))
    assert tg.planes_x(x.clone(), qw) is not b  # another tensor, equal or not
    # the same x against an int8 weight of the same K (a GGUF Q4_K_M block: q int4, v int8)
    data8, sc8 = quantize(torch.randn(8, 256, generator=g), "int8", 128).packed()
    qw8 = QuantWeight("int8", (8, 256), 128, data8, sc8)
    assert tg.planes_x(x, qw) is not b  # x again after the clone: a new copy of it
    c = tg.planes_x(x, qw8)
    assert torch.equal(c, tg.permute_x(x, qw8)) and not torch.equal(c, b)


@pytest.mark.parametrize("qtype,k", [("int4", 256), ("int4", 4096), ("int4", 11008), ("int8", 576)])
def test_plane_order_moves_columns_as_permute_x(qtype, k):
    """The index a fused kernel writes x's plane-order copy by (outp[..., index[j]] = x[..., j])
    gives what triton_gemm.permute_x gives."""
    from gdsllm.quant import kernels_cuda, triton_gemm
    w = QuantWeight(qtype, (8, k), 32, torch.zeros(1), torch.zeros(1))  # permute_x reads the shape
    index = kernels_cuda.plane_order(w)
    x = torch.randn(3, k)
    outp = torch.empty_like(x)
    outp[:, index.long()] = x
    assert index.dtype == torch.int32 and torch.equal(outp, triton_gemm.permute_x(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("qtype,rows", [("int4", 16), ("int4", 100), ("int8", 100), ("int4", 2)])
def test_cuda_norm_and_activation_write_x_in_plane_order(qtype, rows, monkeypatch):
    """A norm or an activation whose output goes into a quantized matmul that reads x in plane
    order (the planes tile, the dequantized weight) writes that copy in the same launch; the
    matmul takes it (no copy of its own) and gives what it gives x as made without it. tinygemm
    (2 rows) reads x as it is: no copy."""
    from gdsllm.models import fused, layers
    from gdsllm.quant import kernels_cuda, triton_gemm
    n, k = 256, 512
    data, sc = quantize(torch.randn(n, k, device="cuda") * 0.02, qtype, 128).packed()
    qw = QuantWeight(qtype, (n, k), 128, data, sc)
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = (torch.randn(rows, k, device="cuda", generator=g, dtype=torch.bfloat16) for _ in "xy")
    nw = torch.rand(k, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    gate = torch.randn(rows, k, device="cuda", generator=g, dtype=torch.bfloat16)
    made = {"norm": lambda f: layers.rms_norm(x, nw, 1e-6, feeds=f),
            "add_norm": lambda f: layers.add_rms_norm(x, y, nw, 1e-6, feeds=f)[1],
            "act": lambda f: layers.act_mul("silu", gate, y, f)}
    index = kernels_cuda.plane_index(qw, x)
    assert (index is None) == (rows == 2)
    for name, make in made.items():
        plain = make(None)
        want = kernels_cuda.linear(qw, plain)
        out = make(qw)
        assert torch.equal(out, plain), name
        with monkeypatch.context() as m:
            if index is not None:  # the copy the kernel wrote: planes_x makes none
                m.setattr(triton_gemm, "permute_x", lambda *a: pytest.fail(f"{name}: x copied"))
            got = kernels_cuda.linear(qw, out)
            xp = triton_gemm.planes_x(out, qw) if index is not None else None
        assert torch.equal(got, want), name
        assert xp is None or torch.equal(xp, triton_gemm.permute_x(out, qw)), name
    assert fused.usable(x)


@pytest.mark.gpu
def test_cuda_int4_layout_probe_passes():
    from gdsllm.quant.int4pack import probe_torch_layout
    assert probe_torch_layout("cuda") is None


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", ["int4", "int8"])
@pytest.mark.parametrize("n,k,g,dtype", [(4096, 4096, 32, torch.float16),
                                         (11008, 4096, 64, torch.bfloat16),
                                         (4096, 11008, 128, torch.bfloat16),  # the planes tile
                                         (1000, 4096, 256, torch.float16),
                                         (576, 1536, 32, torch.float16),
                                         (1536, 576, 64, torch.bfloat16),
                                         (104, 256, 128, torch.float32)])
def test_cuda_triton_gemm_against_float_at_every_row_count(qtype, n, k, g, dtype):
    """kernels_cuda.linear (the Triton W4A16 / W8A16 GEMMs, tinygemm, dequantize into the
    scratch) at row counts across its choices, every measured tile configuration on one shape,
    and the dequantization kernel (input order and plane order), against float32 math."""
    from gdsllm.quant import kernels_cuda, triton_gemm
    qt = quantize(torch.randn(n, k, device="cuda") * 0.02, qtype, g)
    data, sc = qt.packed()
    qw = QuantWeight(qtype, (n, k), g, data, sc)
    wf = qw.dequantize(torch.float32)
    tol = 2e-2 if dtype != torch.float32 else 1e-5  # half: x and W rounded (tinygemm: bf16)
    for rows in (1, 3, 16, 33, 64, 130, 1100):
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        ref = x.float() @ wf.T
        assert rel_err(kernels_cuda.linear(qw, x), ref) < tol, rows
        if (n, k) in ((4096, 4096), (4096, 11008)) and rows in (3, 33):
            for c in triton_gemm.CANDIDATES:
                if not triton_gemm.usable(qtype, k, triton_gemm.Config(*c), g, dtype):
                    continue
                assert rel_err(triton_gemm.matmul(x, qw, triton_gemm.Config(*c)), ref) < tol, c
    out = torch.empty(n * k, device="cuda", dtype=torch.float32)
    assert torch.equal(triton_gemm.dequantize_into(qw, out), wf)
    x = torch.randn(5, k, device="cuda", dtype=torch.float32)
    wp = triton_gemm.dequantize_into(qw, out, planes=True)
    assert rel_err(triton_gemm.permute_x(x, qw) @ wp.T, x @ wf.T) < 1e-5
    if qtype == "int4":
        x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm(x, qw.data, g, qw.scales)
        assert rel_err(y, x.float() @ wf.T) < 2e-2
