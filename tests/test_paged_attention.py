"""Decode attention over a paged KV cache (gdsllm.models.paged_attention).

The torch reference against per-sequence SDPA over contiguous keys (random pools, shuffled block
tables, GQA/MHA/MQA, windows, lengths from 1 to more than 3 blocks in one batch, float32 and
bfloat16); the Triton kernel against the reference under Triton's interpreter on CPU (a process
of its own: TRITON_INTERPRET must be set before triton is imported), and on a CUDA GPU in
float16/bfloat16, captured in a CUDA graph and replayed with new lengths and block tables.

Tolerances: float32, 1e-5 absolute (the same float32 math, summed in another order); bfloat16
pools and queries, 1e-2 absolute + 8e-3 relative (both sides see the same bfloat16 values and
compute in float32; the reference's output is rounded to bfloat16: half an ulp is 2^-9 relative);
the Triton kernel in half precision, 2e-2 absolute (its P @ V product takes P in the pools'
half precision, as flash attention does).
"""
from __future__ import annotations

import pytest
import torch

from gdsllm.models.paged_attention import decode_attention, decode_attention_ref
from paged_attention_cases import INTERP_CASES, compile_sm90, make_case, sdpa_per_sequence
from triton_helpers import needs_triton, run_interpreted

MIXED = [1, 15, 16, 17, 33, 50, 64, 70]  # block size 16: 1 token .. more than 4 blocks


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4), (6, 1)])  # GQA, MHA, MQA
@pytest.mark.parametrize("window", [None, 1, 5, 20, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_per_sequence_sdpa(heads, kv_heads, window, dtype):
    case = make_case(MIXED, heads, kv_heads, 32, 16, dtype, seed=heads + kv_heads)
    got = decode_attention_ref(*case.args(), window)
    assert got.shape == (len(MIXED), heads * 32) and got.dtype == dtype
    torch.testing.assert_close(got.float(), sdpa_per_sequence(case, window), **_tol(dtype))


@pytest.mark.parametrize("block_size", [1, 4, 8, 32])
def test_reference_any_block_size(block_size):
    case = make_case([1, 9, 40, 130], 4, 2, 64, block_size, seed=block_size)
    torch.testing.assert_close(decode_attention_ref(*case.args(), 7),
                               sdpa_per_sequence(case, 7), atol=1e-5, rtol=0)


def test_padding_entries_and_empty_rows_are_safe():
    """Table entries past a sequence's blocks are never seen (random, 0 or -1 give the same
    output); a row with seq_lens 0 (batch padding) gives zeros, not NaN."""
    case = make_case([0, 5, 40], 4, 2, 16, 16, seed=3)
    base = decode_attention_ref(*case.args())
    assert torch.equal(base[0], torch.zeros_like(base[0]))
    torch.testing.assert_close(base, sdpa_per_sequence(case), atol=1e-5, rtol=0)
    need = (case.seq_lens + 15) // 16
    past = torch.arange(case.block_tables.shape[1])[None, :] >= need[:, None]
    for fill in (0, -1):
        case.block_tables = case.block_tables.masked_fill(past, fill)
        assert torch.equal(decode_attention_ref(*case.args()), base)


def test_dispatch_on_cpu_is_the_reference():
    case = make_case([3, 20], 4, 2, 16, 8, seed=5)
    assert torch.equal(decode_attention(*case.args(), 4), decode_attention_ref(*case.args(), 4))


def test_non_contiguous_query():
    """q as the models make it: a slice of a fused projection."""
    case = make_case([7, 30], 4, 2, 16, 8, seed=6)
    fused = torch.cat([case.q, torch.randn_like(case.q)], dim=1)  # [B, 2H, D]
    case.q = fused[:, :4]
    assert not case.q.is_contiguous()
    torch.testing.assert_close(decode_attention_ref(*case.args()), sdpa_per_sequence(case),
                               atol=1e-5, rtol=0)


@needs_triton
def test_triton_kernel_under_interpreter():
    result = run_interpreted("paged_attention_cases.py")
    assert result["cases"] == len(INTERP_CASES) and result["failures"] == []


@needs_triton
@pytest.mark.parametrize("dtype,group,head_dim,split", [("fp16", 4, 128, True),
                                                        ("bf16", 1, 128, False),
                                                        ("fp16", 2, 256, True)])
def test_triton_kernel_compiles_for_hopper(dtype, group, head_dim, split):
    """No GPU needed: Triton lowers the kernel for sm_90 and ptxas assembles it. The K/V tiles
    are loaded with cp.async (pipelined, vectorised) and the products run on tensor cores."""
    ptx = compile_sm90(dtype, group, head_dim, split)
    assert "cp.async" in ptx and "mma.sync" in ptx


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (32, 32, 128), (8, 1, 64),
                                                     (8, 4, 256)])
def test_cuda_triton_against_reference(dtype, heads, kv_heads, head_dim):
    from gdsllm.models.paged_attention import decode_attention_triton
    case = make_case([1, 16, 17, 300, 1025, 0], heads, kv_heads, head_dim, 16, dtype,
                     device="cuda", seed=heads)
    for window in (None, 100):
        ref = decode_attention_ref(*case.args(), window).float()
        torch.testing.assert_close(ref, sdpa_per_sequence(case, window), **_tol(dtype))
        for splits in (None, 1, 5):
            got = decode_attention_triton(*case.args(), window, num_splits=splits)
            assert got.dtype == dtype and got.shape == ref.shape
            torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=0)
        torch.testing.assert_close(decode_attention(*case.args(), window).float(), ref,
                                   atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 4])
def test_cuda_graph_capture_and_replay(splits):
    """One capture; each replay sees new seq_lens and block tables copied into the same
    tensors, and matches the reference for them."""
    from gdsllm.models.paged_attention import decode_attention_triton
    cases = [make_case(lens, 16, 4, 128, 16, torch.bfloat16, device="cuda", extra_blocks=20,
                       seed=i)
             for i, lens in enumerate([[5, 40, 200, 1], [300, 2, 17, 64], [0, 128, 129, 250]])]
    width = max(c.block_tables.shape[1] for c in cases)
    pools = max(c.k_pool.shape[0] for c in cases)

    def padded(c):  # every case in the same shapes: tables padded with 0, pools with garbage
        bt = torch.zeros(4, width, dtype=torch.int32, device="cuda")
        bt[:, :c.block_tables.shape[1]] = c.block_tables
        grow = pools - c.k_pool.shape[0]
        k = torch.cat([c.k_pool, torch.randn_like(c.k_pool[:1]).expand(grow, -1, -1, -1)])
        v = torch.cat([c.v_pool, torch.randn_like(c.v_pool[:1]).expand(grow, -1, -1, -1)])
        return c.q, k, v, bt, c.seq_lens

    static = [t.clone() for t in padded(cases[0])]
    for _ in range(2):  # compile and warm up outside the capture
        decode_attention_triton(*static, cases[0].scale, 50, num_splits=splits)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(*static, cases[0].scale, 50, num_splits=splits)
    for c in cases[1:] + cases[:1]:
        for dst, src in zip(static, padded(c)):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_attention_ref(*static, c.scale, 50).float()
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
        torch.testing.assert_close(ref, sdpa_per_sequence(c, 50), **_tol(torch.bfloat16))
