"""Mixtures of experts through the service: the block units run, the compute worker reports the
routed union (`Routed`), the coordinator reads the missing experts into arena slots and has them
run (`RunExperts`). Tiny random Mixtral / Qwen3-MoE give transformers' greedy tokens; the expert
counters match transformers' router choices; prefetch guesses never change the tokens.
"""
from __future__ import annotations

import pytest

from llama_ref import greedy_reference_scores, load
from moe_ref import MOE_CASES, moe_model, pass_unions, router_picks
from service_helpers import Service, single_thread_workers  # noqa: F401  (fixture)
from gdsllm.engine.tokenizer import Tokenizer
from ipc.messages import ExpertsDone, Routed, RunExperts, decode, encode

N = 32
PROMPT = "the quick brown fox jumps"


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe_norm"])
def moe(request, tmp_path_factory):
    case = request.param
    hf, _, d = moe_model(tmp_path_factory.mktemp(case), case)
    ids = Tokenizer(load(d)).encode(PROMPT)
    ref, _ = greedy_reference_scores(hf, ids, N)
    passes = [list(range(len(ids)))] + [[len(ids) + t] for t in range(N - 1)]
    unions = pass_unions(router_picks(hf, ids + ref[:N - 1]), passes)
    return case, d, ref, unions


def _generate(d, **cfg):
    from gdsllm.service.client import Client
    with Service(d, **cfg) as s, Client(s.endpoint, timeout=120) as c:
        f = c.generate(PROMPT, max_tokens=N, temperature=0, ignore_eos=True)
        ex = s.svc.coordinator.batch.experts
        metrics = s.svc.coordinator.metrics.exposition().decode()
        return f.token_ids, dict(ex.totals), (ex.slots.count, len(s.svc.coordinator.plan.streamed)), metrics


def test_service_reads_only_routed_experts(moe, single_thread_workers):  # noqa: F811
    """No budget, no prefetch: each routed expert is read once, the first time it is routed."""
    case, d, ref, unions = moe
    toks, t, slots, metrics = _generate(d, expert_prefetch=False)
    assert toks == ref, case
    distinct = {(layer, e) for u in unions for layer, es in enumerate(u) for e in es}
    assert slots[0] == len(load(d).units) - 2 - load(d).params.num_hidden_layers  # one per expert
    assert t["routed"] == sum(len(es) for u in unions for es in u)
    assert t["loads"] == len(distinct) and t["prefetch_loads"] == 0
    assert t["hits"] == t["routed"] - t["loads"]
    assert f"gdsllm_expert_loads_total{{reason=\"demand\"}} {float(len(distinct))}" in metrics


def test_service_small_budget_with_prefetch(moe, single_thread_workers):  # noqa: F811
    """Every block streamed through 2 slots, top-k expert slots, prefetch on: same tokens; every
    routed expert was a hit or a demand read; guesses are accounted as hits or misses."""
    case, d, ref, unions = moe
    meta = load(d)
    slot = max(u.nbytes for u in meta.units if u.kind == "expert")
    dense = sorted((u.nbytes for u in meta.units if u.kind != "expert"), reverse=True)
    k = meta.params.num_experts_per_tok
    budget = dense[0] + dense[1] + 2 * dense[2] + k * slot  # embed, head resident; 2 block slots
    toks, t, slots, metrics = _generate(d, vram_budget=budget, prefetch_window=2)
    assert toks == ref, case
    assert slots == (k, meta.params.num_hidden_layers)  # k expert slots, every block streamed
    assert t["routed"] == sum(len(es) for u in unions for es in u)
    assert t["hits"] + t["loads"] == t["routed"] and t["loads"] > 0
    assert t["prefetch_hits"] + t["prefetch_misses"] <= t["prefetch_loads"]
    assert t["prefetch_loads"] > 0  # the guesses were made and read
    assert t["bytes_read"] == (t["loads"] + t["prefetch_loads"]) * slot
    for name in ("gdsllm_expert_cache_hits_total", "gdsllm_expert_prefetch_hits_total",
                 "gdsllm_expert_prefetch_misses_total", "gdsllm_expert_read_bytes_total"):
        assert name in metrics


def test_expert_messages_are_validated():
    for bad in (lambda: Routed(1, 2, [3, 3]), lambda: Routed(1, 2, [-1]),
                lambda: RunExperts(1, 2, []), lambda: RunExperts(1, 2, [(5, -4096)])):
        with pytest.raises(ValueError):
            bad()
    m = RunExperts(4, 7, [(8, 4096), (9, 8192)])
    assert decode(encode(m), max_bytes=None) == m
    assert decode(encode(ExpertsDone(4, 7, [8, 9], 0.5)), max_bytes=None).experts == [8, 9]
