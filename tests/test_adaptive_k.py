"""Adaptive draft length (gdsllm.engine.adaptive_k): the choice of K from acceptance and cost, and
greedy output with adaptive K token for token the output without a draft (LLM and the service).
"""
from __future__ import annotations

import pytest

from gdsllm import LLM, SamplingParams
from gdsllm.convert.synth import synth
from gdsllm.engine.adaptive_k import TREE_DEFAULT, TREE_MAX, TREE_MIN, AdaptiveK, best_k, expected_tokens, tree_size
from gdsllm.service.client import Client
from service_helpers import Service
from spec_helpers import greedy, one_thread  # noqa: F401  (one_thread: an autouse fixture)

PROMPTS = ["hello world", "the quick brown fox", [5, 9, 200, 31, 7]]


def test_expected_tokens_is_the_chain_expectation():
    """E(k) against the distribution written out: P(exactly j drafts kept) = a^j (1 - a), j < k."""
    for a in (0.0, 0.3, 0.9, 1.0):
        for k in (1, 2, 5):
            probs = [a ** j * (1 - a) for j in range(k)] + [a ** k]
            assert abs(sum(probs) - 1) < 1e-12
            assert abs(expected_tokens(a, k) - sum(p * (j + 1) for j, p in enumerate(probs))) < 1e-12


def test_best_k_follows_acceptance_and_cost():
    assert best_k(0.8, 0.0, 6) == 6  # free drafts: always the cap
    assert best_k(0.99, 1e-3, 6) == 6
    assert best_k(0.05, 0.2, 6) == 1  # drafts rejected and not free: one
    assert best_k(0.9, 2.0, 6) == 1  # a draft pass dearer than a target pass
    ks = [best_k(a / 20, 0.05, 8) for a in range(20)]
    assert ks == sorted(ks) and ks[0] == 1 and ks[-1] == 8  # more acceptance, longer drafts
    assert [best_k(0.8, r, 8) for r in (0.0, 0.02, 0.1, 0.5)] == sorted(
        [best_k(0.8, r, 8) for r in (0.0, 0.02, 0.1, 0.5)], reverse=True)


def test_k_shrinks_on_rejections_and_grows_back():
    ak = AdaptiveK()
    assert ak.k(1, 4) == 4 and ak.k(1, 0) == 0  # nothing measured yet: the cap
    ak.timing(draft_s=0.01, draft_passes=1, target_s=0.1)  # a draft pass costs 0.1 target pass
    assert ak.k(1, 4) == 4
    for _ in range(4):
        ak.observe(1, drafted=ak.k(1, 4), accepted=0)
    assert ak.k(1, 4) == 1 and ak.acceptance(1) < 0.1
    assert ak.k(2, 4) == 4  # another sequence keeps its own record
    steps = 0
    while ak.k(1, 4) < 4:
        k = ak.k(1, 4)
        ak.observe(1, drafted=k, accepted=k)
        steps += 1
        assert steps < 10
    ak.release(1)
    assert ak.acceptance(1) == ak.prior[0]


def test_tree_size_follows_how_a_pass_grows_with_its_tokens():
    """The fit of seconds = a + b * tokens over timed passes (the first carries the prompt, the
    others 1 + T): a streamed pass (a large, b tiny) gets TREE_MAX nodes, a compute-bound one
    (b large against a) TREE_MIN, in between a quarter of a / b; no fit until the sizes differ."""
    assert tree_size(None) == TREE_DEFAULT and tree_size(1e-6) == TREE_MAX and tree_size(0.5) == TREE_MIN
    for a, b, want in ((0.5, 1e-7, TREE_MAX), (0.2, 0.001, 50), (0.001, 0.01, TREE_MIN)):
        ak = AdaptiveK()
        ak.timing(0.001, 1, a + b * 65, target_tokens=65)
        assert ak.pass_cost() is None  # one size: no fit
        ak.timing(0.001, 1, a + b * 300, target_tokens=300)  # a prompt of 236 and the tree
        for _ in range(30):
            ak.timing(0.001, 1, a + b * 65, target_tokens=65)
        fa, fb = ak.pass_cost()
        assert fa == pytest.approx(a, rel=1e-6) and fb == pytest.approx(b, rel=1e-6, abs=1e-12)
        assert tree_size(ak.ratio, ak.pass_cost()) == want


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("adaptive")
    target = synth(root / "target", "tiny", layers=4, dtype="float32", seed=7)
    draft = synth(root / "draft", "tiny", layers=1, dtype="float32", seed=11)
    with LLM(str(target)) as llm:
        ref = [o.token_ids for o in llm.generate(PROMPTS, greedy(24))]
    return target, draft, ref


def test_greedy_with_adaptive_k_equals_without(models):
    """A random draft (mostly rejected: K falls) and the target as its own draft (all accepted):
    with adaptive K, greedy tokens equal those without a draft, in a batch that mixes request K."""
    target, draft, ref = models
    for d in (draft, target):
        with LLM(str(target), draft=str(d), draft_tokens=4, draft_adaptive=True) as llm:
            outs = llm.generate(PROMPTS, [greedy(24), greedy(24, draft_tokens=0), greedy(24, draft_tokens=6)])
            assert [o.token_ids for o in outs] == ref, d
            st = llm.speculator.stats
            assert st.target_passes > 0 and llm.speculator.adaptive.ratio is not None
            assert llm.speculator.adaptive.events == {}  # released with their sequences
            if d == draft:  # rejected drafts: fewer proposed than a fixed K would
                assert st.draft_tokens < 4 * st.target_passes, st
            else:
                assert st.accepted_tokens == st.draft_tokens


def test_service_with_adaptive_k_equals_llm(models, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    target, draft, ref = models
    with Service(target, draft=draft, draft_tokens=4, draft_adaptive=True) as s:
        with Client(s.endpoint, timeout=60) as c:
            got = [c.generate(p, max_tokens=24, temperature=0, ignore_eos=True).token_ids
                   for p in PROMPTS if isinstance(p, str)]
        m = s.svc.coordinator.metrics
        proposed = m.draft_tokens._value.get()
        passes = next(x.value for x in m.tokens_per_target_pass.collect()[0].samples
                      if x.name.endswith("_count"))
    assert got == ref[:len(got)]
    assert 0 < proposed < 4 * passes  # the worker's K fell below --draft-tokens (rejections)


def test_seeded_sampled_requests_keep_k_and_their_tokens(models):
    """A seed's tokens must not depend on timings: seeded sampled requests draft K every pass, so
    with adaptive K on they give the tokens, and draft the tokens, they do with it off."""
    target, draft, _ = models
    p = SamplingParams(max_tokens=17, temperature=0.9, seed=5, ignore_eos=True)
    got = {}
    for adaptive in (False, True):
        with LLM(str(target), draft=str(draft), draft_tokens=4, draft_adaptive=adaptive) as llm:
            outs = [o.token_ids for o in llm.generate(PROMPTS, p)]
            st = llm.speculator.stats
            got[adaptive] = (outs, st.draft_tokens, st.target_passes)
    assert got[True] == got[False]
    assert got[True][1] > 0


def test_cli_no_draft_adaptive(models):
    """`gdsllm generate --draft ... --no-draft-adaptive` (fixed K) prints the no-draft text."""
    import subprocess
    import sys
    target, draft, _ = models
    with LLM(str(target)) as llm:
        want = llm.generate("hello world", SamplingParams(max_tokens=10, temperature=0)).text
    r = subprocess.run([sys.executable, "-m", "gdsllm", "generate", "-m", str(target), "--draft",
                        str(draft), "--no-draft-adaptive", "-p", "hello world", "-n", "10",
                        "--temp", "0", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
