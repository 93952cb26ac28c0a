"""Speculative decoding (gdsllm.engine.speculative): a resident draft proposes, the target verifies
in one pass. The acceptance rules; greedy output with a draft token for token the output without
one through LLM (tiny random models, sliding-window families, the CLI, CUDA); sampled output
following the target's distribution (chi-square, fixed seeds). The service and the real SmolLM2:
test_speculative_service.py.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gdsllm import LLM, SamplingParams
from gdsllm.convert.synth import synth
from gdsllm.convert.synth_tokenizer import synth_tokenizer_json
from gdsllm.engine.draft import check_draft
from gdsllm.engine.runner import Runner
from gdsllm.engine.sampling import Sampler
from gdsllm.engine.speculative import accept_greedy, accept_sampled
from gdsllm.format.metadata import load_model_meta
from gdsllm.service.client import Client
from llama_ref import resident_weights, run_pass
from service_helpers import Service
from spec_helpers import (PROMPTS, chi_square_p, greedy, models, one_thread,  # noqa: F401  (fixtures)
                          reference)


# ------------------------------------------------------------------ acceptance rules


def test_accept_greedy_keeps_the_matching_prefix_and_the_targets_token():
    rows = torch.full((4, 10), -1.0)
    for i, best in enumerate([3, 5, 7, 9]):
        rows[i, best] = 1.0
    assert accept_greedy(rows, [3, 5, 7]) == [3, 5, 7, 9]  # all accepted, plus the bonus token
    assert accept_greedy(rows, [3, 6, 7]) == [3, 5]  # first mismatch replaced by the argmax
    assert accept_greedy(rows, [0, 5, 7]) == [3]
    assert accept_greedy(rows[:1], []) == [3]


def test_accept_sampled_emits_the_targets_distribution():
    """Fixed target rows p and draft rows q far from them: the first emitted token follows p0 and,
    when the first draft was kept, the second follows p1; the drafts alone would fail the test."""
    g = torch.Generator().manual_seed(0)
    V, N = 12, 6000
    p_logits, q_logits = torch.randn(3, V, generator=g) * 1.5, torch.randn(2, V, generator=g) * 1.5
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=123))
    p, q = s.probs(p_logits), s.probs(q_logits)
    first, second = torch.zeros(V), torch.zeros(V)
    drafts_first = torch.zeros(V)
    for _ in range(N):
        d = [s.draw(q[0]), s.draw(q[1])]
        out = accept_sampled(p_logits, d, [q[0], q[1]], s)
        assert 1 <= len(out) <= 3 and out[:-1] == d[:len(out) - 1]
        first[out[0]] += 1
        drafts_first[d[0]] += 1
        if len(out) >= 2:
            second[out[1]] += 1
    assert chi_square_p(first, p[0]) > 1e-3
    assert chi_square_p(second, p[1]) > 1e-3
    assert chi_square_p(drafts_first, p[0]) < 1e-6  # the test tells q from p
    assert 0.2 * N < second.sum() < 0.9 * N  # both acceptance and rejection were exercised


# ------------------------------------------------------------------ greedy: LLM


def test_greedy_with_a_draft_equals_without(models, reference):
    target, draft = models
    with LLM(str(target), draft=str(draft), draft_tokens=4) as llm:
        given = {"target": [], "draft": []}  # one set of books: the draft gets the target's block ids
        for who, cache in (("target", llm.runner.cache), ("draft", llm.speculator.draft.runner.cache)):
            def record(sid, table, who=who, assign=cache.assign):
                given[who].append((sid, list(table)))
                return assign(sid, table)
            cache.assign = record
        # mixed batch: the LLM's default K, no draft, and per-request K
        params = [greedy(24), greedy(24, draft_tokens=0), greedy(24, draft_tokens=2),
                  greedy(24, draft_tokens=7)]
        outs = llm.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == reference
        assert len(given["target"]) == len(PROMPTS) and given["draft"] == given["target"]
        st = llm.speculator.stats
        assert st.draft_tokens > 0 and st.target_passes > 0
        assert llm.runner.sequences == set() and llm.speculator.draft.runner.sequences == set()
        assert llm.speculator.hist == {}


def test_self_draft_accepts_everything_and_stops_where_without(models, reference):
    """The target as its own draft: every draft accepted (K + 1 tokens per target pass), and the
    request rules (max_tokens, stop ids met inside an accepted run) end it where they would."""
    target, _ = models
    with LLM(str(target), draft=str(target), draft_tokens=3, draft_adaptive=False) as llm:
        out = llm.generate(PROMPTS[0], greedy(24))
        assert out.token_ids == reference[0]
        st = llm.speculator.stats
        assert st.accepted_tokens == st.draft_tokens and st.tokens_per_pass > 3
        stop = reference[1][6]
        cut = reference[1].index(stop) + 1
        out = llm.generate(PROMPTS[1], greedy(24, stop_token_ids=(stop,)))
        assert out.token_ids == reference[1][:cut] and out.finish_reason == "stop"
        out = llm.generate(PROMPTS[2], greedy(5))
        assert out.token_ids == reference[2][:5] and out.finish_reason == "length"


def test_mismatched_draft_is_a_clear_error(models, tmp_path):
    target, _ = models
    small = synth(tmp_path / "v300", "tiny", layers=1, dtype="float32", overrides={"vocab_size": 300})
    with pytest.raises(ValueError, match="vocabulary of 300 tokens") as e:
        LLM(str(target), draft=str(small))
    assert str(small) in str(e.value) and str(target) in str(e.value)
    other = tmp_path / "othertok"  # same vocabulary size, another tokenizer
    shutil.copytree(target, other)
    (other / "tokenizer.json").write_bytes(synth_tokenizer_json(300))
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_draft(load_model_meta(target), load_model_meta(other))
    with pytest.raises(ValueError, match="draft-tokens must be 1 to 64"):
        LLM(str(target), draft=str(target), draft_tokens=0)
    r = subprocess.run([sys.executable, "-m", "gdsllm", "generate", "-m", str(target), "--draft",
                        str(small), "-p", "hi", "-n", "2", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "vocabulary of 300 tokens" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_generate_with_a_draft(models):
    """`gdsllm generate --draft` through the pipeline prints what LLM prints without a draft."""
    target, draft = models
    with LLM(str(target)) as llm:
        want = llm.generate("hello world", SamplingParams(max_tokens=12, temperature=0)).text
    r = subprocess.run([sys.executable, "-m", "gdsllm", "generate", "-m", str(target), "--draft",
                        str(draft), "--draft-tokens", "3", "-p", "hello world", "-n", "12",
                        "--temp", "0", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"


@pytest.mark.gpu
def test_cuda_greedy_with_a_draft_equals_without(models):
    target, draft = models
    with LLM(str(target), device="cuda") as llm:
        ref = [o.token_ids for o in llm.generate(PROMPTS, greedy(24))]
    with LLM(str(target), device="cuda", draft=str(draft), draft_tokens=4) as llm:
        assert [o.token_ids for o in llm.generate(PROMPTS, greedy(24))] == ref
    with Service(target, device="cuda", vram_budget=load_model_meta(draft).total_bytes + 4 * 192512,
                 draft=draft, draft_tokens=4) as s, Client(s.endpoint, timeout=60) as c:
        assert c.generate(PROMPTS[0], max_tokens=24, temperature=0, ignore_eos=True).token_ids == ref[0]


@pytest.mark.parametrize("case", ["mistral", "gemma3"])
def test_sliding_window_families_roll_back_exactly(case, tmp_path):
    """Rejected drafts rolled back from sliding-window caches: greedy output of a windowed model
    (prompt and output longer than its window) with a random draft equals the output without."""
    from families_ref import family_model
    _, _, target = family_model(tmp_path, case)
    draft = synth(tmp_path / "draft", "tiny", layers=1, dtype="float32", seed=5,
                  overrides={"vocab_size": load_model_meta(target).params.vocab_size})
    prompts = ["the quick brown fox jumps", "a b c d e f g h i j k l"]
    with LLM(str(target)) as llm:
        ref = [o.token_ids for o in llm.generate(prompts, greedy(32))]
    for d in (draft, target):  # mostly rejected; always accepted
        with LLM(str(target), draft=str(d), draft_tokens=3) as llm:
            assert [o.token_ids for o in llm.generate(prompts, greedy(32))] == ref, (case, d)
            st = llm.speculator.stats
            assert st.draft_tokens > 0 and (st.accepted_tokens == st.draft_tokens) == (d == target)


# ------------------------------------------------------------------ sampled: distribution


def exact_distributions(model: Path, prompt: list[int], temperature: float):
    """The model's exact distributions of the first and (marginally) the second new token."""
    meta = load_model_meta(model)
    runner = Runner(meta.params, "cpu", torch.float32)
    w = resident_weights(meta)
    s = Sampler(SamplingParams(temperature=temperature, top_k=0, top_p=1.0, seed=0))
    p1 = s.probs(run_pass(runner, meta, w, [(0, prompt)])[0])
    V = meta.params.vocab_size
    p2 = s.probs(run_pass(runner, meta, w, [(1 + x, prompt + [x]) for x in range(V)]))
    return p1, p1 @ p2


def test_sampled_tokens_follow_the_targets_distribution(tmp_path):
    """Many seeds, one batch each way: the first two sampled tokens with a draft (rejections and
    acceptances both frequent) fit the target's exact distributions; the draft's own do not."""
    V, T, N = 24, 0.1, 1500
    over = {"vocab_size": V}
    target = synth(tmp_path / "t", "tiny", layers=2, dtype="float32", seed=3, overrides=over)
    draft = synth(tmp_path / "d", "tiny", layers=1, dtype="float32", seed=4, overrides=over)
    prompt = [5, 9, 17, 3]
    p1, p2 = exact_distributions(target, prompt, T)
    q1, _ = exact_distributions(draft, prompt, T)
    params = [SamplingParams(max_tokens=3, temperature=T, top_k=0, top_p=1.0, seed=i,
                             ignore_eos=True) for i in range(N)]
    # the whole batch at once: a KV block per sequence (target and draft, which follows its size)
    with LLM(str(target), draft=str(draft), draft_tokens=2, kv_tokens=N * 16) as llm:
        outs = llm.generate([prompt] * N, params)
        st = llm.speculator.stats
    assert 0.15 < st.acceptance < 0.85, st  # both branches of the rule ran many times
    c1 = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=V)
    c2 = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=V)
    assert chi_square_p(c1, p1) > 1e-3 and chi_square_p(c2, p2) > 1e-3
    assert chi_square_p(c1, q1) < 1e-6  # the test has the power to tell the draft from the target
