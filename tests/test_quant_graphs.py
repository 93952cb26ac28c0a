"""Quantized weights inside CUDA graphs (issue 22): every decode bucket is captured for every qtype
the format stores, and gives the tokens of the same passes run eagerly and of the CPU reference.

int4 in groups of 32 and int8 in groups of 16 are how GGUF Q4_K and Q6_K blocks are kept; groups
of 128 / 64 are what `gdsllm convert --quant` writes. The embedding and the LM head are int8 in
every quantized model (gdsllm.quant.policy), so the gather and the W8A16 head run in the graphs too.
"""
from __future__ import annotations

import pytest
import torch

from gdsllm import LLM, SamplingParams
from gdsllm.convert.synth import synth
from gdsllm.engine.graphs import BUCKETS
from gdsllm.engine.runner import Runner
from gdsllm.quant import kernels_cuda
from gdsllm.quant.rtn import quantize
from gdsllm.quant.schemes import QuantWeight
from llama_ref import assert_same_or_near_tie, greedy_runner, load, rel_err, resident_weights

pytestmark = pytest.mark.gpu

QUANTS = [("int4", 32), ("int4", 128), ("int8", 16), ("int8", 64)]
DIMS = {"hidden_size": 128, "intermediate_size": 256, "head_dim": 32}
STEPS = 5


def prompts(n: int, vocab: int) -> list[list[int]]:
    return [[(37 * i + 11 * j) % (vocab - 1) + 1 for j in range(1 + i % 7)] for i in range(n)]


@pytest.fixture(scope="module", params=QUANTS, ids=[f"{q}-g{g}" for q, g in QUANTS])
def quantized(request, tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    qtype, group = request.param
    d = synth(tmp_path_factory.mktemp(f"{qtype}{group}") / "m", "tiny", dtype="float32",
              quant=qtype, group_size=group, overrides=DIMS, seed=group)
    return load(d)


def test_every_bucket_is_captured_and_gives_the_eager_and_cpu_tokens(quantized):
    meta = quantized
    ps = prompts(max(BUCKETS), meta.params.vocab_size)
    cpu = Runner(meta.params, "cpu", torch.float32, kv_tokens=4096)
    ref, ref_logits = greedy_runner(cpu, meta, resident_weights(meta, "cpu"), ps, STEPS)
    w = resident_weights(meta, "cuda")
    for b in BUCKETS:
        outs = {}
        for graphs in (False, True):
            r = Runner(meta.params, "cuda", torch.float32, kv_tokens=4096, cuda_graphs=graphs)
            for u in meta.units:
                r.pin(u.index, w[u.name])
            outs[graphs] = greedy_runner(r, meta, w, ps[:b], STEPS)[0]
            if graphs:
                assert {k[2] for k in r.graphs._graphs} == {b}, "the bucket was not captured"
        assert outs[True] == outs[False], b
        for i, toks in enumerate(outs[True]):
            assert_same_or_near_tie(toks, ref[i], ref_logits[i], 1e-3, (b, i))


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_llm_generates_batches_in_half_precision_with_and_without_graphs(quant, tmp_path):
    """The issue's crash: an smollm2-shaped quantized model (tied int8 embedding as the head)
    through `LLM` on CUDA in float16, batches of 1, 5, 16 and 64: graphs replay the eager tokens."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    d = synth(tmp_path / "m", "smollm2-135m", layers=2, dtype="float16", quant=quant)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ps = prompts(64, 49152)
    got = {}
    for graphs in (False, True):
        with LLM(str(d), device="cuda", cuda_graphs=graphs) as m:
            got[graphs] = {n: [o.token_ids for o in m.generate(ps[:n], params)] for n in (1, 5, 16, 64)}
    assert got[True] == got[False]


@pytest.mark.parametrize("qtype,group", QUANTS, ids=[f"{q}-g{g}" for q, g in QUANTS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_every_kernel_choice_is_captured_at_every_bucket(qtype, group, dtype):
    """kernels_cuda.linear alone, in half precision too (tinygemm, the Triton tiles and the
    dequantize + cuBLAS path as CHOICES routes them): every decode bucket and two prefill row
    counts are captured in a CUDA graph (a host copy or allocation there would fail the capture),
    and the replay on new inputs gives the eager call's result and float32 math's. K = 576 has int4 tiles of
    4 k-tiles, which the tensor-core tiles cannot take (dequantized instead)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for n, k in ((256, 512), (192, 576)):
        if k % group:
            continue
        qt = quantize(torch.randn(n, k, device="cuda") * 0.02, qtype, group)
        data, sc = qt.packed()
        qw = QuantWeight(qtype, (n, k), group, data, sc)
        wf = qw.dequantize(torch.float32)
        for rows in BUCKETS + (128, 256):
            x = torch.randn(rows, k, device="cuda", dtype=dtype)
            kernels_cuda.linear(qw, x)  # eager first: compiles, probes the layout, sizes the scratch
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y = kernels_cuda.linear(qw, x)
            x.copy_(torch.randn(rows, k, device="cuda", dtype=dtype))
            g.replay()
            torch.cuda.synchronize()
            eager = kernels_cuda.linear(qw, x)
            same = 1e-6 if dtype == torch.float32 else 1e-3  # cuBLAS may pick another algorithm
            assert rel_err(y, eager) < same, (n, k, rows)
            assert rel_err(y, x.float() @ wf.T) < (1e-5 if dtype == torch.float32 else 2e-2), (n, k, rows)


@pytest.mark.parametrize("rows", [16, 128])
@pytest.mark.parametrize("qtype,group", QUANTS, ids=[f"{q}-g{g}" for q, g in QUANTS])
def test_weights_of_one_input_in_one_launch_eager_and_captured(qtype, group, rows):
    """kernels_cuda.linears over q, k and v: at 16 rows the planes tile takes the three in one
    launch (int4 in groups of 128; the other tiles run per weight), at 128 (past the tiles) they
    are dequantized one after another and multiplied in one matmul; one launch's outputs are
    column views of its result, each equal to linear's within the split and cuBLAS's choice of
    algorithm; captured in a CUDA graph, the replay on new inputs gives the eager result."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    k = 512
    ws = []
    for n in (256, 128, 128):
        data, sc = quantize(torch.randn(n, k, device="cuda") * 0.02, qtype, group).packed()
        ws.append(QuantWeight(qtype, (n, k), group, data, sc))
    ws = tuple(ws)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    kernels_cuda.scratch(x.device, x.dtype, 512 * k)  # the three weights: as the ledger reserves
    eager = kernels_cuda.linears(ws, x)  # eager first: compiles
    together = rows == 128 or (qtype, group) == ("int4", 128)
    assert (eager[1].data_ptr() == eager[0].data_ptr() + 2 * 256) == together
    for y, w in zip(eager, ws):
        assert rel_err(y, kernels_cuda.linear(w, x)) < (3e-3 if together else 1e-6)
        assert rel_err(y, x.float() @ w.dequantize(torch.float32).T) < 2e-2
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ys = kernels_cuda.linears(ws, x)
    x.copy_(torch.randn(rows, k, device="cuda", dtype=torch.bfloat16))
    g.replay()
    torch.cuda.synchronize()
    for y, want in zip(ys, kernels_cuda.linears(ws, x)):
        assert rel_err(y, want) < 1e-3  # cuBLAS may pick another algorithm
