"""Cases for tests/test_fused.py: the fused kernels under Triton's interpreter, compiled for
sm_90 without a GPU, and a random decoder block on a paged KV cache for the GPU tests.

    TRITON_INTERPRET=1 python3 tests/fused_cases.py   # every kernel (interpreted) vs layers' torch
    ptx = compile_sm90("rope", "fp16")                # a kernel built for an H100/H200, no GPU
    case = block_case("gemma3", torch.bfloat16, batch=4)

Run as a script (TRITON_INTERPRET=1 must be set before triton is imported, hence a process of
its own), it runs gdsllm.models.fused's wrappers on CPU tensors against the torch code of
gdsllm.models.layers and prints one JSON line {"cases": n, "failures": [...]}; exit status 1 on
any failure. Tolerance: one unit in the last place of the dtype (torch.finfo(dtype).eps
relative and absolute), and at most a fraction of the elements differing at all: the kernels
round where torch does and differ only in the order of the float32 sum of squares and in float32
exp / rsqrt, so the norms and silu differ in at most 1% (rounding once where torch rounds twice
would change about 25%); the rotary embedding must be bit-equal; tanh GELU up to 10% (torch
computes 0.5 g (1 + tanh z), which loses the low bits where tanh nears -1; the kernel computes
g / (1 + exp(-2z)), equal in exact arithmetic: about 3% of float16 and 7% of bfloat16 outputs,
all tiny ones, differ by an ulp on the CPU).
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from gdsllm.format.metadata import LlamaParams, unit_tensor_shapes
from gdsllm.models import layers
from gdsllm.models.attention import PassBatch
from gdsllm.models.kv_cache import PagedKVCache

DTYPES = (torch.float16, torch.bfloat16)


def ulp_tol(dtype: torch.dtype) -> dict:
    eps = torch.finfo(dtype).eps
    return dict(atol=eps, rtol=eps)


def kernel_cases(device: str = "cpu", sizes=((1, 576), (5, 4096)), heads=((64, 6, 2), (128, 4, 4)),
                 seed: int = 0):
    """(name, fused call, torch reference call, fraction of elements that may differ by an
    ulp) for every kernel over DTYPES, T x hidden
    in `sizes` and head_dim / q heads / kv heads in `heads`; random inputs with the scales of a
    real block (norm weights near 1, gate values over the silu / GELU bends)."""
    from gdsllm.models import fused
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device)

    for dtype in DTYPES:
        for t, n in sizes:
            x, y = rnd(t, n).to(dtype), rnd(t, n).to(dtype)
            for off, w in ((0.0, rnd(n, scale=0.1, shift=1.0).to(dtype)),
                           (1.0, rnd(n, scale=0.3).to(dtype))):
                tag = f"{dtype} T={t} n={n} offset={off}"
                yield (f"rms_norm {tag}", lambda x=x, w=w, o=off: fused.rms_norm(x, w, 1e-6, o),
                       lambda x=x, w=w, o=off: layers.rms_norm(x, w, 1e-6, o), 0.01)
                yield (f"add_rms_norm {tag}",
                       lambda x=x, y=y, w=w, o=off: fused.add_rms_norm(x, y, w, 1e-6, o),
                       lambda x=x, y=y, w=w, o=off: (x + y, layers.rms_norm(x + y, w, 1e-6, o)),
                       0.01)
            # the planes forms: the output and a copy with column j at index[j] (one launch)
            index = torch.randperm(n, generator=g).to(torch.int32).to(device)
            w = rnd(n, scale=0.1, shift=1.0).to(dtype)
            yield (f"rms_norm_planes {dtype} T={t} n={n}",
                   lambda x=x, w=w, i=index: fused.rms_norm_planes(x, w, 1e-6, 0.0, i),
                   lambda x=x, w=w, i=index: moved(layers.rms_norm(x, w, 1e-6), i), 0.01)
            yield (f"add_rms_norm_planes {dtype} T={t} n={n}",
                   lambda x=x, y=y, w=w, i=index: fused.add_rms_norm_planes(x, y, w, 1e-6, 0.0, i),
                   lambda x=x, y=y, w=w, i=index: (x + y, *moved(layers.rms_norm(x + y, w, 1e-6), i)),
                   0.01)
            gate, up = rnd(t, 3 * n, scale=3.0).to(dtype), rnd(t, 3 * n).to(dtype)
            for act in fused.ACTS:
                yield (f"act_mul {act} {dtype} T={t}",
                       lambda gate=gate, up=up, a=act: fused.act_mul(gate, up, a),
                       lambda gate=gate, up=up, a=act: layers.ACTIVATIONS[a](gate) * up,
                       0.01 if act == "silu" else 0.1)
            index3 = torch.randperm(3 * n, generator=g).to(torch.int32).to(device)
            yield (f"act_mul_planes silu {dtype} T={t}",
                   lambda gate=gate, up=up, i=index3: fused.act_mul_planes(gate, up, "silu", i),
                   lambda gate=gate, up=up, i=index3: moved(F.silu(gate) * up, i), 0.01)
            # gate and up as column views of one [T, 6n] result (a grouped matmul's), read in place
            gu = torch.cat([gate, up], dim=1)
            gv, uv = gu[:, :3 * n], gu[:, 3 * n:]
            yield (f"act_mul_planes of column views silu {dtype} T={t}",
                   lambda gate=gv, up=uv, i=index3: fused.act_mul_planes(gate, up, "silu", i),
                   lambda gate=gv, up=uv, i=index3: moved(F.silu(gate) * up, i), 0.01)
            yield (f"act_mul of column views gelu {dtype} T={t}",
                   lambda gate=gv, up=uv: fused.act_mul(gate, up, "gelu_pytorch_tanh"),
                   lambda gate=gv, up=uv: layers.ACTIVATIONS["gelu_pytorch_tanh"](gate) * up, 0.1)
            for hd, nh, nkv in heads:
                qkv = rnd(t, (nh + 2 * nkv) * hd).to(dtype)  # q, k: slices of one projection
                q = qkv[:, :nh * hd].view(t, nh, hd)
                k = qkv[:, nh * hd:(nh + nkv) * hd].view(t, nkv, hd)
                inv = layers.rope_inv_freq(LlamaParams(
                    vocab_size=1, hidden_size=nh * hd, intermediate_size=1, num_hidden_layers=1,
                    num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
                    rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
                    tie_word_embeddings=False)).to(device)
                cos, sin = layers.rope_cos_sin(inv, torch.arange(t, device=device) * 37 + 5, dtype)
                yield (f"rope_qk {dtype} T={t} hd={hd} heads={nh}/{nkv}",
                       lambda q=q, k=k, c=cos, s=sin: fused.rope_qk(q, k, c, s),
                       lambda q=q, k=k, c=cos, s=sin: (layers.apply_rope(q, c, s),
                                                       layers.apply_rope(k, c, s)), 0.0)
                w = rnd(hd, scale=0.1, shift=1.0).to(dtype)  # Qwen3's q norm on [T, heads, hd]
                yield (f"rms_norm heads {dtype} T={t} hd={hd}",
                       lambda q=q, w=w: fused.rms_norm(q, w, 1e-6),
                       lambda q=q, w=w: layers.rms_norm(q, w, 1e-6), 0.01)
                # k from the middle of the projection, Gemma's offset: read where it lies
                yield (f"rms_norm heads offset {dtype} T={t} hd={hd}",
                       lambda k=k, w=w: fused.rms_norm(k, w - 1.0, 1e-6, 1.0),
                       lambda k=k, w=w: layers.rms_norm(k, w - 1.0, 1e-6, 1.0), 0.01)


def moved(out: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, out with column j at index[j]): what the planes forms of the kernels return."""
    outp = torch.empty_like(out)
    outp[..., index.long()] = out
    return out, outp


def compare(got, ref, max_differ: float) -> str | None:
    """None when got matches ref (a tensor or a tuple of them) within an ulp, with at most a
    fraction `max_differ` of the elements not bit-equal; else what differs."""
    got = got if isinstance(got, tuple) else (got,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for a, b in zip(got, ref, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"shape/dtype {tuple(a.shape)} {a.dtype} != {tuple(b.shape)} {b.dtype}"
        differ = (a != b).sum().item()
        if differ > max_differ * a.numel():
            return f"{differ} of {a.numel()} elements differ (at most {max_differ:.0%} may)"
        try:
            torch.testing.assert_close(a, b, **ulp_tol(a.dtype))
        except AssertionError as e:
            return str(e).splitlines()[0] + " " + " ".join(str(e).split())[-120:]
    return None


def bf16_round_to_nearest_even() -> None:
    """triton 3.5's interpreter casts float32 to bfloat16 by truncation (cast_impl passes no
    rounding mode to _convert_float, and its RTNE branch rounds half up without carrying into
    the exponent); the GPU rounds to nearest even (cvt.rn.bf16.f32), as torch does. Patch that
    one conversion so the interpreter rounds as the GPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter
    orig = interpreter._convert_float
    if getattr(orig, "_gdsllm_rne", False):
        return

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.ascontiguousarray(data).view(np.uint32).astype(np.uint64)
            return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return orig(data, input_dtype, output_dtype, rounding_mode)

    convert._gdsllm_rne = True
    interpreter._convert_float = convert


def check_interpreted() -> dict:
    """Every kernel case, then each family's decoder block on CPU tensors with layers sent to
    the (interpreted) kernels against the same block in torch (4 ulps: differences of an ulp
    inside pass through the matmuls)."""
    from gdsllm.models import family, fused
    bf16_round_to_nearest_even()
    failures, n = [], 0
    for name, run, ref, max_differ in kernel_cases():
        n += 1
        problem = compare(run(), ref(), max_differ)
        if problem:
            failures.append(f"{name}: {problem}")
    usable = fused.usable
    for fam in FAMILY_PARAMS:
        for dtype in DTYPES:
            n += 1
            case = block_case(fam, dtype, batch=2, ctx=20, device="cpu", seed=n)
            args = (case.p, case.weights, case.x, case.cos, case.sin, case.batch, 0)
            kw = {"experts": case.experts} if case.experts else {}
            want = family(fam).decoder_block(*args, **kw)
            fused.usable = lambda *tensors: True
            try:
                got = family(fam).decoder_block(*args, **kw)
            finally:
                fused.usable = usable
            tol = {k: 4 * v for k, v in ulp_tol(dtype).items()}
            try:
                torch.testing.assert_close(got, want, **tol)
            except AssertionError as e:
                failures.append(f"block {fam} {dtype}: " + " ".join(str(e).split())[:200])
    return {"cases": n, "failures": failures}


# -- compiled for Hopper, no GPU ---------------------------------------------------------------

def compile_sm90(kernel: str, dtype: str) -> str:
    """One of the kernels ("rms_norm", "add_rms_norm_offset", "add_rms_norm_planes", "rope",
    "silu", "gelu", "silu_planes") lowered
    for sm_90 by Triton and assembled by ptxas, with the launch options gdsllm.models.fused
    uses and the 16-byte alignment Triton's launcher would assume; returns the PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from gdsllm.models import fused
    ptr = "*" + dtype
    options = {"num_warps": 1}
    if kernel.startswith(("rms_norm", "add_rms_norm")):
        fn = fused._rms_norm_kernel
        sig = dict.fromkeys(("x_ptr", "y_ptr", "w_ptr", "out_ptr", "sum_ptr"), ptr)
        sig.update(idx_ptr="*i32", outp_ptr=ptr, stride_x="i32", heads="i32", stride_xh="i32",
                   stride_y="i32", n="i32", inv_n="fp32", eps="fp32", offset="fp32")
        const = dict(HAS_Y=kernel.startswith("add"), OFFSET=kernel.endswith("offset"),
                     HAS_P=kernel.endswith("planes"), BLOCK=4096)
        options["num_warps"] = 8
    elif kernel == "rope":
        fn = fused._rope_kernel
        sig = dict.fromkeys(("q_ptr", "k_ptr", "cos_ptr", "sin_ptr", "qo_ptr", "ko_ptr"), ptr)
        sig.update(dict.fromkeys(("stride_qt", "stride_qh", "stride_kt", "stride_kh",
                                  "stride_ct", "stride_st", "nh", "nkv"), "i32"))
        const = dict(HALF=64, BLOCK=64)
        options["enable_fp_fusion"] = False
    else:
        fn = fused._act_mul_kernel
        sig = dict(gate_ptr=ptr, up_ptr=ptr, out_ptr=ptr, idx_ptr="*i32", outp_ptr=ptr, n="i32",
                   cols="i32", stride_g="i32", stride_u="i32")
        const = dict(GELU=kernel == "gelu", HAS_P=kernel.endswith("planes"),
                     STRIDED=kernel.endswith("planes"), BLOCK=1024)
        options["num_warps"] = 4
    sig.update(dict.fromkeys(const, "constexpr"))
    aligned = {(i,): [["tt.divisibility", 16]] for i in range(len(sig) - len(const))}
    src = ASTSource(fn, sig, const, aligned)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


# -- a decoder block on a paged KV cache (the GPU tests) ---------------------------------------

BASE = LlamaParams(vocab_size=64, hidden_size=256, intermediate_size=704, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-6,
                   rope_theta=10000.0, max_position_embeddings=512, tie_word_embeddings=False)
FAMILY_PARAMS = {
    "llama": BASE,
    "qwen3": replace(BASE, qk_norm=True, attention_bias=True, head_dim=128),
    "gemma3": replace(BASE, qk_norm=True, norm_weight_offset=1.0, feedforward_norms=True,
                      hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=64.0,
                      layer_types=("sliding_attention",), sliding_window=8,
                      rope_local_theta=10000.0, rope_theta=1e6),
    "mixtral": replace(BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                       norm_topk_prob=True),
}


@dataclass
class BlockCase:
    p: LlamaParams
    weights: dict[str, torch.Tensor]
    x: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    batch: PassBatch
    experts: dict[int, dict[str, torch.Tensor]] | None = None  # a MoE block's expert units


def block_case(family: str, dtype: torch.dtype, batch: int, ctx: int = 40,
               device: str = "cuda", seed: int = 0) -> BlockCase:
    """Layer 0 of `family` with random weights (norm weights around 1, or around 0 with Gemma's
    offset; a MoE block's experts in `experts`), `batch` sequences each at `ctx` cached tokens
    (random keys / values) decoding one token: a decode PassBatch as the runner builds it."""
    p = FAMILY_PARAMS[family]
    g = torch.Generator().manual_seed(seed)

    def unit(kind):
        weights = {}
        for name, shape in unit_tensor_shapes(p, kind).items():
            w = torch.randn(shape, generator=g) * (0.1 if "norm" in name else 0.05)
            if "norm" in name and not p.norm_weight_offset:
                w += 1.0
            weights[name] = w.to(dtype).to(device)
        return weights

    weights = unit("block")
    experts = {j: unit("expert") for j in range(p.num_experts)} or None
    bs = 16
    per = -(-ctx // bs)
    cache = PagedKVCache(1, p.num_key_value_heads, p.head_dim, dtype, device,
                         num_blocks=batch * per + 1, block_size=bs)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=g))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=g))
    tables = (1 + torch.randperm(batch * per, generator=g)).view(batch, per).to(torch.int32)
    slots = tables[:, (ctx - 1) // bs].long() * bs + (ctx - 1) % bs
    pb = PassBatch(cache, slots.to(device), block_tables=tables.to(device),
                   seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device=device))
    inv = layers.rope_inv_freq(p, p.layer_rope(0)).to(device)
    cos, sin = layers.rope_cos_sin(inv, torch.full((batch,), ctx - 1, device=device), dtype)
    x = torch.randn(batch, p.hidden_size, generator=g).to(dtype).to(device)
    return BlockCase(p, weights, x, cos, sin, pb, experts)


if __name__ == "__main__":
    result = check_interpreted()
    print(json.dumps(result))
    sys.exit(1 if result["failures"] else 0)
