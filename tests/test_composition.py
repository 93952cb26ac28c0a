"""Features composed (issue 21): {float16, int8, int4} x {batch 1, 5, 16} x {all resident, streamed
under a small budget} x {no draft, an int4 draft} x {dense, mixture of experts}, through `LLM` and
`serve`; on CUDA also with CUDA graphs on and off. Each path once combined quantization, graphs and
batching on its own, and no test crossed them (int4 with more than 4 sequences crashed on CUDA).

On the CPU every cell computes in float32 over the stored weights, so each cell's greedy tokens
equal the float32 reference exactly: the resident model without a draft, each prompt alone. On
CUDA the matmuls differ by row count (kernels are chosen per M; a graph pads to its bucket), so a
cell there is checked against the cell that differs from it only in where the weights live
(streamed against resident), and no cell may fail.
"""
from __future__ import annotations

import threading

import pytest
import torch

from gdsllm import LLM, SamplingParams
from gdsllm.convert.requantize import requantize
from gdsllm.convert.synth import synth
from gdsllm.format.metadata import load_model_meta
from gdsllm.service.client import Client
from service_helpers import Service, single_thread_workers  # noqa: F401  (fixture)
from spec_helpers import one_thread  # noqa: F401  (fixture)

QTYPES = ("float16", "int8", "int4")
FAMILIES = {"dense": ("tiny", {"intermediate_size": 192, "num_hidden_layers": 4}),
            "moe": ("tiny-moe", {"num_hidden_layers": 4})}
BATCHES = (1, 5, 16)
PROMPTS = [f"prompt number {i}: the weights stream" for i in range(max(BATCHES))]
N = 4
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
ALIGN = 4096


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(family, qtype) -> model directory (group size 32 for both qtypes), and family -> its int4
    draft: the float16 model converted to int4 (a draft that agrees often, as in practice)."""
    root = tmp_path_factory.mktemp("compose")
    out, drafts = {}, {}
    for family, (shape, over) in FAMILIES.items():
        for q in QTYPES:
            out[family, q] = synth(root / f"{family}-{q}", shape, seed=3, dtype="float16", overrides=over,
                                   quant=None if q == "float16" else q, group_size=32)
        drafts[family] = requantize(out[family, "float16"], root / f"{family}-draft", "int4", group_size=32)
    return out, drafts


def streamed_budget(d) -> int:
    """Embed and head resident, the blocks streamed through 2 slots (and a MoE's top-k expert
    slots): the smallest plan that streams, as the service tests use."""
    meta = load_model_meta(d)
    units = {u.name: u.nbytes for u in meta.units}
    block = max(u.nbytes for u in meta.units if u.kind == "block")
    experts = [u.nbytes for u in meta.units if u.kind == "expert"]
    keep = meta.params.num_experts_per_tok * max(experts) if experts else 0
    return units["embed"] + units["head"] + 2 * block + keep + 8 * ALIGN


def llm_tokens(d, device: str, budget, draft, graphs: bool = True) -> dict[int, list[list[int]]]:
    """batch -> greedy token ids of PROMPTS[:batch], each batch one generate call. The draft's
    bytes come on top of `budget` (the ledger takes them first)."""
    if budget is not None and draft is not None:
        budget += load_model_meta(draft).total_bytes
    with LLM(str(d), device=device, vram_budget=budget, draft=None if draft is None else str(draft),
             cuda_graphs=graphs) as m:
        if budget is not None:
            assert m.plan.streamed, "the small budget must stream"
        return {b: [o.token_ids for o in m.generate(PROMPTS[:b], GREEDY)] for b in BATCHES}


def reference(d, device: str = "cpu") -> list[list[int]]:
    with LLM(str(d), device=device) as m:
        return [m.generate(p, GREEDY).token_ids for p in PROMPTS]


def served_tokens(svc, batch: int, draft_tokens: int | None) -> list[list[int]]:
    """`batch` requests at once, each on its own client; their greedy token ids in prompt order."""
    got, errors = {}, []

    def one(i):
        try:
            with Client(svc.endpoint, timeout=120) as c:
                kw = {} if draft_tokens is None else {"draft_tokens": draft_tokens}
                got[i] = c.generate(PROMPTS[i], max_tokens=N, temperature=0, ignore_eos=True, **kw).token_ids
        except Exception as e:  # noqa: BLE001  (reported below, with the cell)
            errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return [got[i] for i in range(batch)]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_llm_cells_equal_the_float32_reference(models, family, qtype):
    paths, drafts = models
    d = paths[family, qtype]
    want = reference(d)
    for budget in (None, streamed_budget(d)):
        for draft in (None, drafts[family]):
            got = llm_tokens(d, "cpu", budget, draft)
            for b in BATCHES:
                assert got[b] == want[:b], (family, qtype, "streamed" if budget else "resident",
                                            "draft" if draft else "no draft", f"batch {b}")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_served_cells_equal_the_float32_reference(models, family, qtype, single_thread_workers):
    """One service per residency, with the int4 draft: requests that keep the server's K and
    requests that turn drafting off (draft_tokens=0) are the two draft cells."""
    paths, drafts = models
    d = paths[family, qtype]
    want = reference(d)
    for budget in (None, streamed_budget(d)):
        cfg = {} if budget is None else {"vram_budget": budget + load_model_meta(drafts[family]).total_bytes}
        with Service(d, draft=drafts[family], draft_tokens=3, **cfg) as s:
            assert bool(s.svc.coordinator.plan.streamed) == (budget is not None)
            for draft_tokens in (None, 0):
                for b in BATCHES:
                    assert served_tokens(s, b, draft_tokens) == want[:b], (
                        family, qtype, "streamed" if budget else "resident",
                        "no draft" if draft_tokens == 0 else "draft", f"batch {b}")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_cuda_cells_agree_and_none_fails(models, family, qtype):
    """No cell fails, every sequence gets its tokens; cells that run the very same kernels agree
    exactly: streamed against resident (the weights' bytes are the same wherever they live), with
    graphs on and off and with and without the draft each."""
    paths, drafts = models
    d = paths[family, qtype]
    small = streamed_budget(d)
    for graphs in (True, False):
        for draft in (None, drafts[family]):
            resident = llm_tokens(d, "cuda", None, draft, graphs)
            for b in BATCHES:
                assert len(resident[b]) == b and all(len(t) == N for t in resident[b])
            streamed = llm_tokens(d, "cuda", small, draft, graphs)
            assert streamed == resident, (family, qtype, "graphs" if graphs else "eager",
                                          "draft" if draft else "no draft")
    torch.cuda.synchronize()
    with Service(d, device="cuda", draft=drafts[family], draft_tokens=3) as s:
        for draft_tokens in (None, 0):
            for b in BATCHES:
                out = served_tokens(s, b, draft_tokens)  # batches form by timing: lengths only
                assert all(len(t) == N for t in out), (family, qtype, b, draft_tokens)
