"""`--draft ngram` (gdsllm.engine.draft.NgramDraft): prompt lookup drafts that cost no bytes. The
lookup rule; greedy output with it token for token the output without it, through LLM and the
service; sampled output following the target's distribution (chi-square) with its point-mass
proposals; the VRAM ledger gives it nothing.
"""
from __future__ import annotations

import torch

from gdsllm import LLM, SamplingParams
from gdsllm.engine.budget import plan_memory
from gdsllm.engine.draft import NgramDraft, is_ngram
from gdsllm.engine.sampling import Sampler
from gdsllm.engine.speculative import accept_sampled, load_draft_meta
from gdsllm.format.metadata import load_model_meta
from gdsllm.service.client import Client
from service_helpers import Service
from spec_helpers import PROMPTS, chi_square_p, greedy, models, one_thread, reference  # noqa: F401

LOOPY = [[5, 9, 200, 31, 7, 5, 9, 200, 31, 7, 5, 9], "abc abc abc abc abc"]


def test_lookup_takes_the_latest_longest_match():
    d = NgramDraft(vocab_size=300, max_n=3)
    assert d.lookup([1, 2, 3, 4, 1, 2], 3) == [3, 4, 1]  # "1 2" seen at 0: what followed it
    assert d.lookup([1, 2, 3, 4, 1, 2], 1) == [3]
    assert d.lookup([7, 1, 2, 8, 5, 1, 2, 9, 1, 2], 2) == [9, 1]  # the latest occurrence wins
    assert d.lookup([1, 2, 9, 3, 2, 9, 1, 2, 9], 2) == [3, 2]  # the 3-gram "1 2 9" beats "2 9"
    assert d.lookup([1, 2, 3], 4) == []  # no earlier occurrence of any suffix
    assert d.lookup([4], 2) == [] and d.lookup([4, 4], 3) == [4]
    assert is_ngram("ngram") and not is_ngram("ngram-model-dir") and not is_ngram(None)


def test_point_mass_proposals_keep_the_targets_distribution():
    """A proposal with all its mass on d is accepted with probability p(d), else the token is drawn
    from p without d: the emitted token follows p (chi-square), whichever d was proposed."""
    g = torch.Generator().manual_seed(1)
    V, N = 10, 6000
    rows = torch.randn(2, V, generator=g) * 1.5
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=5))
    p = s.probs(rows)
    d = NgramDraft(V)
    prop = d.propose([(0, [3, 4, 3], 1, s)])[0]  # proposes 4, one-hot q
    assert prop.tokens == [4] and float(prop.probs[0][4]) == 1.0 and float(prop.probs[0].sum()) == 1.0
    first = torch.zeros(V)
    for _ in range(N):
        out = accept_sampled(rows, prop.tokens, prop.probs, s)
        first[out[0]] += 1
    assert chi_square_p(first, p[0]) > 1e-3
    assert abs(float(first[4]) / N - float(p[0][4])) < 0.03


def test_llm_greedy_with_ngram_equals_without(models, reference):
    target, _ = models
    with LLM(str(target)) as plain:
        want = [o.token_ids for o in plain.generate(LOOPY, greedy(24))]
    with LLM(str(target), draft="ngram", draft_tokens=4) as llm:
        assert llm.memory.draft_bytes == 0  # no bytes of the budget
        assert [o.token_ids for o in llm.generate(PROMPTS, greedy(24))] == reference
        assert [o.token_ids for o in llm.generate(LOOPY, greedy(24))] == want
        st = llm.speculator.stats
        assert st.draft_tokens > 0 and st.accepted_tokens > 0  # the repeats were looked up
        seeded = SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True)
        a = llm.generate(LOOPY[0], seeded).token_ids
        assert a == llm.generate(LOOPY[0], seeded).token_ids  # a seed's tokens are reproducible


def test_the_ledger_gives_ngram_no_bytes(models):
    target, _ = models
    meta = load_model_meta(target)
    assert load_draft_meta(meta, "ngram") is None
    assert plan_memory(meta, budget=None, draft=None).draft_bytes == 0


def test_service_greedy_with_ngram_equals_without(models, reference, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    target, _ = models
    with LLM(str(target)) as plain:
        want = plain.generate(LOOPY[1], greedy(24)).token_ids
    with Service(target, draft="ngram", draft_tokens=3) as s, Client(s.endpoint, timeout=60) as c:
        assert s.svc.coordinator.draft_bytes == 0
        got = [c.generate(p, max_tokens=24, temperature=0, ignore_eos=True).token_ids
               for p in PROMPTS if isinstance(p, str)]
        assert got == reference[:len(got)]
        assert c.generate(LOOPY[1], max_tokens=24, temperature=0, ignore_eos=True).token_ids == want
        m = s.svc.coordinator.metrics
        assert m.draft_tokens._value.get() > 0 and m.draft_accepted_tokens._value.get() > 0
