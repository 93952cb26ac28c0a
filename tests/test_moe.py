"""Mixtures of experts (Mixtral, Qwen3-MoE) end to end against transformers: random tiny models
saved by transformers, converted from safetensors and from GGUF, give transformers' 32 greedy
tokens and logits within 1e-3 through `LLM`; each expert is a unit of its own and `LLM` reads
exactly the experts transformers' routers pick (counted against a simulation of the cache over
the same choices under a small budget); quantized experts; bad configs refused by name.
"""
from __future__ import annotations

import json

import pytest
import torch

from gguf_export import write_gguf
from llama_ref import greedy_reference_scores, load, reference_logits, rel_err
from families_ref import save_hf
from moe_ref import MOE_CASES, dequantized_hf, moe_config, moe_model, pass_unions, router_picks, simulate_cache
from gdsllm import LLM, SamplingParams
from gdsllm.convert.gguf import convert_gguf
from gdsllm.convert.hf import convert_hf
from gdsllm.engine.runner import Runner
from gdsllm.format.metadata import ALIGN, FormatError
from gdsllm.models.views import unit_tensors
from gdsllm.format.storage import aligned_host_buffer, HostReader

N = 32
PROMPTS = [[5, 17, 33, 9, 100, 42, 7], [1, 250, 3, 60, 61, 12, 300, 8, 8, 19, 77]]
GREEDY = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=list(MOE_CASES))
def moe(request, tmp_path_factory):
    case = request.param
    hf, hf_dir, d = moe_model(tmp_path_factory.mktemp(case), case)
    refs = [greedy_reference_scores(hf, p, N) for p in PROMPTS]
    return case, hf, hf_dir, d, refs


def _passes(prompt: list[int], n: int) -> list[list[int]]:
    """The positions each pass of a greedy generation of n tokens runs: the prompt, then one."""
    return [list(range(len(prompt)))] + [[len(prompt) + t] for t in range(n - 1)]


def test_format_one_unit_per_expert(moe):
    case, hf, _, d, _ = moe
    meta = load(d)
    p = meta.params
    assert meta.architecture == MOE_CASES[case][2]
    assert p.num_experts == (getattr(hf.config, "num_local_experts", None) or hf.config.num_experts)
    assert p.num_experts_per_tok == hf.config.num_experts_per_tok
    experts = [u for u in meta.units if u.kind == "expert"]
    assert len(experts) == p.num_hidden_layers * p.num_experts
    assert len({u.file for u in experts}) == len(experts)  # one file, one aligned read each
    for u in experts:
        assert u.name == f"block.{u.layer}.expert.{u.expert}" and u.nbytes % ALIGN == 0
        assert sorted(t.name for t in u.tensors) == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    blocks = [u for u in meta.units if u.kind == "block"]
    for b in blocks:  # attention, norms and the router; no dense MLP
        names = {t.name for t in b.tensors}
        assert "mlp.gate.weight" in names and not any(n.endswith("_proj.weight") and n.startswith("mlp.")
                                                      for n in names)
        assert b.tensor("mlp.gate.weight").shape == (p.num_experts, p.hidden_size)
    # file order: each block followed by its experts
    order = [(u.kind, u.layer) for u in meta.units]
    for i in range(p.num_hidden_layers):
        k = order.index(("block", i))
        assert order[k + 1: k + 1 + p.num_experts] == [("expert", i)] * p.num_experts


def test_greedy_and_logits_equal_transformers(moe):
    case, hf, _, d, refs = moe
    with LLM(str(d)) as llm:  # both prompts in one batch: the union of their experts per layer
        outs = llm.generate([list(p) for p in PROMPTS], GREEDY)
        assert [o.token_ids for o in outs] == [r[0] for r in refs], case
        for prompt, (ref, _) in zip(PROMPTS, refs):
            ids = prompt + ref[:N - 1]
            diff = (llm.logits(ids) - reference_logits(hf, ids)).abs().max()
            assert float(diff) < 1e-3, (case, float(diff))


def test_reads_only_the_routed_experts(moe):
    """No budget: every expert has a slot, so each routed (layer, expert) is read once, the first
    time transformers' router picks it, and nothing else is read."""
    case, hf, _, d, refs = moe
    prompt, (ref, _) = PROMPTS[0], refs[0]
    picks = router_picks(hf, prompt + ref[:N - 1])
    unions = pass_unions(picks, _passes(prompt, N))
    distinct = {(layer, e) for u in unions for layer, es in enumerate(u) for e in es}
    with LLM(str(d)) as llm:
        dense = llm.loader.bytes_read  # the resident dense units, read at start-up
        assert llm.generate(list(prompt), GREEDY).token_ids == ref
        st = llm.experts.stats()
        assert llm.experts.resident() == distinct
        assert st["expert_loads"] == len(distinct) and st["expert_evictions"] == 0
        assert st["expert_routed"] == sum(len(es) for u in unions for es in u)
        assert st["expert_hits"] == st["expert_routed"] - st["expert_loads"]
        want = sum(u.nbytes for u in llm.meta.units if u.kind == "expert" and (u.layer, u.expert) in distinct)
        assert st["expert_bytes_read"] == want == llm.loader.bytes_read - dense
    # one decode step of batch 1 reads at most top-k experts per layer: a share of each layer
    k, e = llm.meta.params.num_experts_per_tok, llm.meta.params.num_experts
    assert all(len(es) <= k for u in unions[1:] for es in u) and k < e


def test_small_budget_cache_matches_the_routers(moe):
    """Dense units resident plus 3 expert slots: the loads and hits are those of the cache's
    eviction rule replayed over transformers' router choices, and the tokens are unchanged."""
    case, hf, _, d, refs = moe
    meta = load(d)
    dense = sum(u.nbytes for u in meta.units if u.kind != "expert")
    slot = max(u.nbytes for u in meta.units if u.kind == "expert")
    prompt, (ref, _) = PROMPTS[1], refs[1]
    unions = pass_unions(router_picks(hf, prompt + ref[:N - 1]), _passes(prompt, N))
    with LLM(str(d), vram_budget=dense + 3 * slot) as llm:
        assert llm.experts.slots.count == 3 and not llm.plan.streamed
        start = llm.loader.bytes_read
        assert llm.generate(list(prompt), GREEDY).token_ids == ref
        st = llm.experts.stats()
        loads, hits = simulate_cache(unions, 3)
        assert (st["expert_loads"], st["expert_hits"]) == (loads, hits)
        assert st["expert_evictions"] == loads - 3 > 0
        assert llm.loader.bytes_read - start == st["expert_bytes_read"] == loads * slot


def test_budget_streams_dense_units_too(moe):
    """A budget below the dense units: blocks stream through a slot as well, experts still
    through their cache; same tokens."""
    case, _, _, d, refs = moe
    meta = load(d)
    slot = max(u.nbytes for u in meta.units if u.kind == "expert")
    embed_head = meta.units[0].nbytes + meta.units[-1].nbytes
    block = max(u.nbytes for u in meta.units if u.kind == "block")
    with LLM(str(d), vram_budget=embed_head + block + 2 * slot + 2 * ALIGN) as llm:
        assert llm.plan.streamed and llm.experts.slots.count >= 1
        assert llm.generate(list(PROMPTS[0]), GREEDY).token_ids == refs[0][0]
    with pytest.raises(ValueError, match="too small"):
        LLM(str(d), vram_budget=slot)


def test_runner_refuses_a_block_without_its_experts(moe):
    case, _, _, d, _ = moe
    meta = load(d)
    runner = Runner(meta.params, "cpu", torch.float32, architecture=meta.architecture)
    bufs = {}
    with HostReader() as r:
        for u in meta.units:
            bufs[u.name] = aligned_host_buffer(u.nbytes)
            r.read(meta.path(u), bufs[u.name], u.nbytes)
    w = {n: unit_tensors(u, bufs[n]) for u in meta.units for n in [u.name]}
    runner.start_pass([(0, PROMPTS[0])])
    runner.run_unit(meta.units[0], w["embed"])
    block0 = next(u for u in meta.units if u.name == "block.0")
    runner.run_unit(block0, w["block.0"])
    routed = runner.routed_experts()
    assert 1 <= len(routed) <= meta.params.num_experts
    first = next(u for u in meta.units if u.kind == "expert" and u.layer == 0 and u.expert == routed[0])
    runner.run_expert(first, w[first.name])
    block1 = next(u for u in meta.units if u.name == "block.1")
    if len(routed) > 1:
        with pytest.raises(RuntimeError, match="without its routed experts"):
            runner.run_unit(block1, w["block.1"])
    runner.abort_pass()


@pytest.mark.parametrize("quant, group", [("int8", 32), ("int4", 32)])
def test_quantized_experts(moe, tmp_path, quant, group):
    """--quant int8 / int4: the experts' projections are quantized like any linear, the router
    stays float; the logits are transformers' over the same (dequantized) weights (cpu_exact:
    float32 math), and within 1% of them by default (gdsllm.quant.kernels_cpu)."""
    case, hf, hf_dir, _, _ = moe
    d = convert_hf(hf_dir, tmp_path / quant, quant=quant, group_size=group)
    meta = load(d)
    for u in meta.units:
        for t in u.tensors:
            if u.kind == "expert":
                assert t.dtype == quant, (u.name, t.name)
            if t.name == "mlp.gate.weight":
                assert t.quant is None
    ids = PROMPTS[0]
    with LLM(str(d), cpu_exact=True) as llm:  # float32 math, as the reference
        ours = llm.logits(ids)
        assert llm.experts.stats()["expert_loads"] <= meta.params.num_hidden_layers * meta.params.num_experts
    ref = reference_logits(dequantized_hf(meta, hf_dir, tmp_path / "deq"), ids)
    assert float((ours - ref).abs().max()) < 2e-3, case
    assert float((ours - reference_logits(hf, ids)).abs().max()) > 1e-3  # it is quantized
    with LLM(str(d)) as llm:  # the CPU's packed forms: bfloat16 / float16 activations
        assert rel_err(llm.logits(ids), ref) < 1e-2, case  # 5.5e-3 at most measured


@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe_norm"])
def test_gguf_moe_equals_the_original(tmp_path, case):
    hf, hf_dir, _ = moe_model(tmp_path, case)
    g = write_gguf(hf, hf_dir / "tokenizer.json", tmp_path / "m.gguf")
    meta = load(convert_gguf(g, tmp_path / "m"))
    assert meta.architecture == MOE_CASES[case][2] and meta.params.norm_topk_prob
    ref, ref_logits = greedy_reference_scores(hf, PROMPTS[0], N)
    with LLM(str(meta.root)) as llm:
        assert llm.generate(list(PROMPTS[0]), GREEDY).token_ids == ref
        ids = PROMPTS[0] + ref[:N - 1]
        assert float((llm.logits(ids) - reference_logits(hf, ids)).abs().max()) < 1e-3
    # Q8_0 expert blocks stay quantized (int8, sliced per expert) and agree with dequantizing them
    g8 = write_gguf(hf, hf_dir / "tokenizer.json", tmp_path / "q8.gguf", experts_q8=True)
    kept, deq = convert_gguf(g8, tmp_path / "kept", quant=None), convert_gguf(g8, tmp_path / "deq")
    assert {t.dtype for u in load(kept).units if u.kind == "expert" for t in u.tensors} == {"int8"}
    with LLM(str(kept)) as a, LLM(str(deq)) as b:
        assert float((a.logits(PROMPTS[0]) - b.logits(PROMPTS[0])).abs().max()) < 1e-3


@pytest.mark.parametrize("change, match", [
    (dict(mlp_only_layers=[1]), "mlp_only_layers"),
    (dict(decoder_sparse_step=2), "decoder_sparse_step"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
])
def test_unsupported_qwen3_moe_configs_are_refused(tmp_path, change, match):
    src = tmp_path / "hf"
    save_hf(moe_config("qwen3_moe"), src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(FormatError, match=match):
        convert_hf(src, tmp_path / "out")


# ---- GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_moe_on_cuda_gives_cpu_tokens(tmp_path, case):
    """float32 on CUDA, experts through the cache under a budget of 3 expert slots: transformers'
    greedy tokens (the logits within 1e-3 of the CPU's), and the LRU counts of the CPU run."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    hf, _, d = moe_model(tmp_path, case)
    meta = load(d)
    dense = sum(u.nbytes for u in meta.units if u.kind != "expert")
    slot = max(u.nbytes for u in meta.units if u.kind == "expert")
    ref, _ = greedy_reference_scores(hf, PROMPTS[1], N)
    stats = []
    for device in ("cpu", "cuda"):
        with LLM(str(d), device=device, vram_budget=dense + 3 * slot) as llm:
            assert llm.generate(list(PROMPTS[1]), GREEDY).token_ids == ref, device
            stats.append(llm.experts.stats())
            logits = llm.logits(PROMPTS[1]).cpu()
            if device == "cpu":
                cpu_logits = logits
    assert stats[0] == stats[1]
    assert float((logits - cpu_logits).abs().max()) < 1e-3


@pytest.mark.gpu
def test_moe_service_on_cuda(tmp_path):
    """The service on CUDA (experts in VRAM slots of the arena, prefetch on): transformers' tokens."""
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from gdsllm.engine.tokenizer import Tokenizer
    from gdsllm.service.client import Client
    from service_helpers import Service
    hf, _, d = moe_model(tmp_path, "qwen3_moe_norm")
    meta = load(d)
    ids = Tokenizer(meta).encode("the quick brown fox")
    ref, _ = greedy_reference_scores(hf, ids, N)
    slot = max(u.nbytes for u in meta.units if u.kind == "expert")
    dense = sum(u.nbytes for u in meta.units if u.kind != "expert")
    with Service(d, device="cuda", vram_budget=dense + 4 * slot) as s, Client(s.endpoint, timeout=120) as c:
        f = c.generate("the quick brown fox", max_tokens=N, temperature=0, ignore_eos=True)
        totals = s.svc.coordinator.batch.experts.totals
    assert f.token_ids == ref
    assert totals["hits"] + totals["loads"] == totals["routed"] > 0
