"""The fused elementwise kernels (gdsllm.models.fused) against the torch code of
gdsllm.models.layers, which stays the CPU path.

On CPU: layers dispatches to torch (the kernels are never called); the wrappers' shape errors;
the kernels under Triton's interpreter (a process of its own: TRITON_INTERPRET must be set before
triton is imported), alone and inside each family's decoder block, and compiled for sm_90
without a GPU. On a CUDA GPU: every kernel against
torch at LLaMA-7B and Qwen3 sizes, and decoder blocks of three families captured in a CUDA graph
with the kernels and replayed on new inputs, against the eager torch block. Tolerances and the
fraction of elements that may differ by an ulp: tests/fused_cases.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_cases import (DTYPES, FAMILY_PARAMS, block_case, compare, compile_sm90, kernel_cases,
                         ulp_tol)
from gdsllm.models import family, fused, layers
from triton_helpers import needs_triton, run_interpreted


def test_cpu_path_is_the_torch_code(monkeypatch):
    """On CPU tensors layers never reaches the kernels, and computes what it always did."""
    def refuse(*args, **kwargs):
        raise AssertionError("a fused kernel was called on the CPU")
    for name in ("rms_norm", "add_rms_norm", "rope_qk", "act_mul"):
        monkeypatch.setattr(fused, name, refuse)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    w = torch.randn(40, generator=g)
    assert not fused.usable(x) and not fused.usable(x.half())
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(layers.rms_norm(x, w, 1e-6), w * h)
    s, n = layers.add_rms_norm(x, y, w, 1e-6, 1.0)
    assert torch.equal(s, x + y) and torch.equal(n, layers.rms_norm(x + y, w, 1e-6, 1.0))
    q, k = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 8, generator=g)
    cos, sin = layers.rope_cos_sin(torch.rand(4, generator=g), torch.arange(3), torch.float32)
    q2, k2 = layers.apply_rope_qk(q, k, cos, sin)
    rot = torch.cat((-k[..., 4:], k[..., :4]), dim=-1)
    assert torch.equal(q2, layers.apply_rope(q, cos, sin))
    assert torch.equal(k2, k * cos[:, None] + rot * sin[:, None])
    assert torch.equal(layers.act_mul("silu", x, y), F.silu(x) * y)
    assert torch.equal(layers.act_mul("gelu_pytorch_tanh", x, y), F.gelu(x, approximate="tanh") * y)


def test_wrappers_reject_shapes_that_do_not_fit():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused.add_rms_norm(x, torch.zeros(2, 9), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="cos"):
        fused.rope_qk(torch.zeros(2, 4, 8), torch.zeros(2, 2, 8), torch.zeros(2, 6),
                      torch.zeros(2, 6))
    with pytest.raises(ValueError, match="activation"):
        fused.act_mul(x, x, "relu")
    with pytest.raises(ValueError, match="differ"):
        fused.act_mul(x, x[:1], "silu")


@needs_triton
def test_kernels_under_interpreter():
    result = run_interpreted("fused_cases.py")
    blocks = len(FAMILY_PARAMS) * len(DTYPES)
    assert result["cases"] == len(list(kernel_cases())) + blocks and result["failures"] == []


@needs_triton
@pytest.mark.parametrize("kernel", ["rms_norm", "add_rms_norm_offset", "add_rms_norm_planes", "rope",
                                    "silu", "gelu", "silu_planes"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_kernels_compile_for_hopper(kernel, dtype):
    """No GPU needed: Triton lowers each kernel for sm_90 and ptxas assembles it. The rotary
    kernel has no fused multiply-add (it would round x * cos + r * sin once where torch rounds
    each product first); every store rounds to nearest (cvt.rn) where it narrows."""
    ptx = compile_sm90(kernel, dtype)
    body = ptx.split(".entry", 1)[1]
    if kernel == "rope":
        assert "fma" not in body
    else:
        assert f"cvt.rn.{'f16' if dtype == 'fp16' else 'bf16'}" in body


@pytest.mark.gpu
def test_cuda_kernels_against_torch(monkeypatch):
    """LLaMA-7B's sizes (hidden 4096, 11008, 32 heads of 128) and small ones, T 1, 16 and 100;
    the torch side is layers' code on the same CUDA tensors (fused switched off)."""
    cases = list(kernel_cases("cuda", sizes=((1, 4096), (16, 576), (100, 4096)),
                              heads=((128, 32, 32), (128, 32, 8), (64, 9, 3))))
    monkeypatch.setattr(fused, "ENABLED", False)
    refs = [ref() for _, _, ref, _ in cases]
    monkeypatch.setattr(fused, "ENABLED", True)
    failures = [f"{name}: {problem}" for (name, run, _, max_differ), want in zip(cases, refs)
                if (problem := compare(run(), want, max_differ))]
    assert failures == []


@pytest.mark.gpu
@pytest.mark.parametrize("fam", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_of_a_decoder_block(fam, dtype, monkeypatch):
    """A block captured with the fused kernels (each called inside the capture) and replayed on
    new inputs matches the eager torch block on those inputs; each replay writes the same KV
    slots the eager block writes."""
    case = block_case(fam, dtype, batch=4)
    block = family(fam).decoder_block
    x = case.x.clone()

    def run():
        return block(case.p, case.weights, x, case.cos, case.sin, case.batch, 0)

    calls = []
    for name in ("rms_norm", "add_rms_norm", "rope_qk", "act_mul"):
        orig = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _f=orig, _n=name, **k: calls.append(_n)
                            or _f(*a, **k))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compiles the kernels outside the capture
        run()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    calls.clear()
    with torch.cuda.graph(graph):
        out = run()
    assert {"rms_norm", "add_rms_norm", "rope_qk", "act_mul"} <= set(calls), calls
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=g, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setattr(fused, "ENABLED", False)
        want = run()
        monkeypatch.setattr(fused, "ENABLED", True)
        tol = {k: 4 * v for k, v in ulp_tol(dtype).items()}
        torch.testing.assert_close(out, want, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_moe_block_eager(dtype, monkeypatch):
    """A mixture-of-experts block (not captured: routing syncs with the host) with the kernels
    in its attention half and its experts, against the torch block."""
    case = block_case("mixtral", dtype, batch=4)

    def run():
        return family("mixtral").decoder_block(case.p, case.weights, case.x, case.cos, case.sin,
                                               case.batch, 0, experts=case.experts)

    got = run()
    monkeypatch.setattr(fused, "ENABLED", False)
    torch.testing.assert_close(got, run(), **{k: 4 * v for k, v in ulp_tol(dtype).items()})
