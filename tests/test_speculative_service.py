"""Speculative decoding through the service (requests with and without drafts in one batch, chunked
prefill, a draft larger than the budget) and on the real SmolLM2 (its bfloat16, truncated and int4
copies as drafts): greedy output with a draft is token for token the output without one.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from gdsllm import LLM, SamplingParams
from gdsllm.format.metadata import load_model_meta
from gdsllm.service.client import Client
from llama_ref import resident_weights
from service_helpers import Service
from spec_helpers import PROMPTS, greedy, models, one_thread, reference  # noqa: F401  (fixtures)


# ------------------------------------------------------------------ the service


def test_service_mixed_batch_equals_llm(models, reference, monkeypatch):
    """Requests with and without drafts in flight together through the service (draft resident in
    the compute worker, target streamed): greedy tokens equal the LLM without a draft; a seeded
    sampled request equals the LLM with the same draft; the counters show speculation."""
    import threading
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker processes' torch: tiny tensors
    target, draft = models
    seeded = SamplingParams(max_tokens=16, temperature=0.8, seed=99, ignore_eos=True)
    with LLM(str(target), draft=str(draft), draft_tokens=3) as llm:
        want_seeded = llm.generate(PROMPTS[0], seeded).token_ids
    budget = load_model_meta(draft).total_bytes + 131072 + 135168 + 2 * 192512
    with Service(target, vram_budget=budget, prefetch_window=2, draft=draft, draft_tokens=3) as s:
        c = s.svc.coordinator
        assert c.plan.budget == budget - load_model_meta(draft).total_bytes
        assert len(c.plan.streamed) == 4  # the blocks stream; the draft is resident
        got = {}

        def one(i, prompt, **kw):
            with Client(s.endpoint, timeout=60) as cl:
                got[i] = cl.generate(prompt if isinstance(prompt, str) else None, max_tokens=24,
                                     temperature=0, ignore_eos=True, **kw).token_ids

        texts = [p for p in PROMPTS if isinstance(p, str)]
        threads = [threading.Thread(target=one, args=(i, p), kwargs=kw) for i, (p, kw) in
                   enumerate(zip(texts, [{}, {"draft_tokens": 0}, {"draft_tokens": 6}]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(len(texts))] == reference[:len(texts)]
        with Client(s.endpoint, timeout=60) as cl:
            f = cl.generate(PROMPTS[0], max_tokens=16, temperature=0.8, seed=99, ignore_eos=True)
        assert f.token_ids == want_seeded
        m = c.metrics
        proposed, accepted = m.draft_tokens._value.get(), m.draft_accepted_tokens._value.get()
        assert proposed > 0 and 0 <= accepted <= proposed


def test_service_draft_with_chunked_prefill_equals_llm(models, reference, monkeypatch):
    """Prompts fed in pieces of 3 tokens (chunked prefill): no draft for a mid-prompt piece, drafts
    once the prompt is in, and greedy tokens equal those without a draft."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    target, draft = models
    texts = [p for p in PROMPTS if isinstance(p, str)]
    with Service(target, draft=draft, draft_tokens=3, max_pass_tokens=3) as s:
        with Client(s.endpoint, timeout=60) as cl:
            got = [cl.generate(p, max_tokens=24, temperature=0, ignore_eos=True).token_ids for p in texts]
        assert got == reference[:len(texts)]
        assert s.svc.coordinator.metrics.draft_tokens._value.get() > 0


def test_service_kv_budget_holds_the_drafts_cache_too(models, reference, monkeypatch):
    """The draft keeps a KV cache as large as the target's (the same sequences): --kv-budget (and
    the share of free memory) pays for both, so the target's cache is budget / (target + draft
    bytes per token), not budget / target's; the answers are unchanged."""
    from gdsllm.models.kv_cache import BLOCK_SIZE, blocks_for, kv_bytes_per_token
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    target, draft = models
    t, d = (kv_bytes_per_token(load_model_meta(m).params, 4) for m in (target, draft))  # float32
    budget = 100 * (t + d)
    with Service(target, draft=draft, draft_tokens=3, kv_budget=budget) as s, \
            Client(s.endpoint, timeout=60) as cl:
        assert cl.health().kv_budget_bytes == blocks_for(100) * BLOCK_SIZE * t  # 112 tokens, not 100 * (t + d) / t
        text = next(p for p in PROMPTS if isinstance(p, str))
        assert cl.generate(text, max_tokens=24, temperature=0, ignore_eos=True).token_ids == \
            reference[PROMPTS.index(text)]


def test_service_refuses_a_draft_larger_than_the_budget(models):
    target, draft = models
    with pytest.raises(ValueError, match="needs .* bytes, the whole VRAM budget"):
        Service(target, vram_budget=1000, draft=draft).__enter__()


# ------------------------------------------------------------------ SmolLM2


def truncated_copy(src: Path, dst: Path, layers: int) -> Path:
    """A cheaper draft of the same vocabulary: the first `layers` blocks of `src`, its embedding,
    head and tokenizer."""
    from dataclasses import replace

    from gdsllm.convert.writer import ModelWriter
    meta = load_model_meta(src)
    w = resident_weights(meta)
    p = replace(meta.params, num_hidden_layers=layers)
    with ModelWriter(dst, p, meta.dtype, chat_template=meta.chat_template,
                     source=f"first {layers} blocks of {src}") as out:
        for u in meta.units:
            if u.kind != "block" or u.layer < layers:
                out.add_unit({k: v.clone() for k, v in w[u.name].items()})
        out.add_file("tokenizer.json", src / meta.tokenizer_file, tokenizer=True)
    return dst


@pytest.fixture(scope="module")
def smol(smollm2_converted, tmp_path_factory):
    """SmolLM2 float32 (target) and two drafts of its vocabulary: its bfloat16 copy (half the
    bytes, the stand-in for its int4 copy) and its first 8 of 30 blocks. The float32 and bfloat16
    conversions are the run's own (conftest.py: made once, shared with the other modules)."""
    target, bf16 = smollm2_converted("float32"), smollm2_converted("bfloat16")
    return target, bf16, truncated_copy(target, tmp_path_factory.mktemp("smol") / "l8", 8)


SMOL_PROMPTS = ["The capital of France is", "def fibonacci(n):",
                [{"role": "user", "content": "What is the tallest mountain in the world?"}]]


@pytest.mark.slow
def test_smollm2_greedy_with_drafts_equals_without_and_tokens_per_pass(smol, capsys):
    target, bf16, l8 = smol
    n = 24
    with LLM(str(target)) as llm:
        ref = [o.token_ids for o in llm.generate(SMOL_PROMPTS, greedy(n))]
    for draft in (bf16, l8):
        with LLM(str(target), draft=str(draft), draft_tokens=4) as llm:
            outs = llm.generate(SMOL_PROMPTS, [greedy(n), greedy(n, draft_tokens=0), greedy(n)])
            assert [o.token_ids for o in outs] == ref, draft
            st = llm.speculator.stats
            with capsys.disabled():
                print(f"\nSmolLM2 f32 target, draft {draft.name}, K=4: acceptance {st.acceptance:.2f}, "
                      f"{st.tokens_per_pass:.2f} tokens per target pass "
                      f"({st.tokens} tokens in {st.target_passes} sequence-passes)")
            assert st.tokens_per_pass >= 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gdsllm.quant") is None,
                    reason="needs the quantized-weights issue (gdsllm.quant)")
def test_smollm2_int4_draft(smol, smollm2_gguf, tmp_path, capsys):
    """The issue's pairing: SmolLM2 float32 verified against its own int4 conversion."""
    from gdsllm.convert.gguf import convert_gguf
    target = smol[0]
    int4 = convert_gguf(smollm2_gguf, tmp_path / "int4", dtype="float32", quant="int4")
    n = 16
    with LLM(str(target)) as llm:
        ref = [o.token_ids for o in llm.generate(SMOL_PROMPTS[:2], greedy(n))]
    with LLM(str(target), draft=str(int4), draft_tokens=4) as llm:
        assert [o.token_ids for o in llm.generate(SMOL_PROMPTS[:2], greedy(n))] == ref
        st = llm.speculator.stats
    with capsys.disabled():
        print(f"\nSmolLM2 f32 target, int4 draft, K=4: acceptance {st.acceptance:.2f}, "
              f"{st.tokens_per_pass:.2f} tokens per target pass")
    assert st.tokens_per_pass > 1.5  # an int4 copy agrees with its source most of the time


@pytest.mark.slow
def test_smollm2_service_with_draft_equals_llm(smol):
    target, bf16, _ = smol
    with LLM(str(target)) as llm:
        ref = llm.generate(SMOL_PROMPTS[0], greedy(16)).token_ids
    with Service(target, draft=bf16, draft_tokens=4) as s, Client(s.endpoint, timeout=300) as c:
        f = c.generate(SMOL_PROMPTS[0], max_tokens=16, temperature=0, ignore_eos=True)
        assert f.token_ids == ref
        assert s.svc.coordinator.metrics.draft_accepted_tokens._value.get() > 0
