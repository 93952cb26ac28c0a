"""SamplingParams validation and the per-request Sampler: greedy, top-k, top-p, seeds."""
from __future__ import annotations

import pytest
import torch

from gdsllm.engine.sampling import Sampler, SamplingParams


def _logits(seed: int = 0, vocab: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 3


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1e-300), "float32"),  # 0 as float32: logits / 0 = inf, then NaN
    (dict(temperature=1e-39), "float32"),  # a float32 subnormal: 1 / t overflows
    (dict(temperature=1e300), "float32"),  # inf as float32
    (dict(top_p=1e-300), "float32"),  # 0 as float32: every token masked, softmax NaN
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(max_tokens=-3), "max_tokens must be at least 1"),
    (dict(max_tokens=2.5), "max_tokens must be a number"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(seed=-1), "seed"),
    (dict(stop=("",)), "stop strings"),
    (dict(stop_token_ids=("x",)), "stop_token_ids"),
])
def test_invalid_params_raise(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw).validate()
    with pytest.raises(ValueError, match=msg):
        Sampler(SamplingParams(**kw))


def test_params_defaults_and_normalisation():
    p = SamplingParams().validate()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (128, 0.8, 0.95, 40, None)
    q = SamplingParams(stop="END", stop_token_ids=[5, 6])
    assert q.stop == ("END",) and q.stop_token_ids == (5, 6)
    hash(q)  # frozen and hashable even when given lists
    with pytest.raises(Exception):
        q.temperature = 1.0  # frozen


def test_greedy_is_argmax():
    lg = _logits()
    assert Sampler(SamplingParams(temperature=0)).sample(lg) == int(lg.argmax())


def test_seed_is_deterministic_and_seeds_differ():
    lg = _logits(1, 50)
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=1234)
    a = [Sampler(params).sample(lg) for _ in range(3)]
    assert a[0] == a[1] == a[2]  # a fresh sampler with the same seed starts the same
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1.sample(lg) for _ in range(40)]
    seq2 = [s2.sample(lg) for _ in range(40)]
    assert seq1 == seq2 and len(set(seq1)) > 5  # same seed, same stream; really sampling
    other = Sampler(SamplingParams(temperature=1.5, top_k=0, top_p=1.0, seed=99))
    assert [other.sample(lg) for _ in range(40)] != seq1


def test_top_k_one_and_tiny_top_p_are_greedy():
    for seed in range(5):
        lg = _logits(seed)
        best = int(lg.argmax())
        assert Sampler(SamplingParams(temperature=2.0, top_k=1, top_p=1.0, seed=seed)).sample(lg) == best
        assert Sampler(SamplingParams(temperature=2.0, top_k=0, top_p=1e-6, seed=seed)).sample(lg) == best


def test_top_k_and_top_p_restrict_the_support():
    lg = _logits(3, 100)
    top5 = set(torch.topk(lg, 5).indices.tolist())
    s = Sampler(SamplingParams(temperature=5.0, top_k=5, top_p=1.0, seed=0))
    drawn = {s.sample(lg) for _ in range(300)}
    assert drawn <= top5 and len(drawn) > 1
    # top_p: the smallest prefix of the sorted distribution whose mass reaches p
    probs = torch.softmax(lg, -1)
    order = torch.argsort(probs, descending=True)
    mass = torch.cumsum(probs[order], 0)
    n = int((mass < 0.6).sum()) + 1
    nucleus = set(order[:n].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.6, seed=0))
    drawn = {s.sample(lg) for _ in range(400)}
    assert drawn <= nucleus and len(drawn) > 1


def test_sample_batch_rows_are_independent():
    """Each row uses its own params and generator: a row's tokens do not depend on its neighbours."""
    lg = torch.stack([_logits(i, 200) for i in range(3)])
    mk = lambda: [Sampler(SamplingParams(temperature=0)),  # noqa: E731
                  Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7)),
                  Sampler(SamplingParams(temperature=0.7, top_k=20, seed=8))]
    batch = mk()
    together = [Sampler.sample_batch(lg, batch) for _ in range(10)]
    alone = mk()
    for i in range(3):
        assert [row[i] for row in together] == [alone[i].sample(lg[i]) for _ in range(10)]
    assert all(row[0] == int(lg[0].argmax()) for row in together)


def test_extreme_valid_temperatures_give_a_distribution():
    """Within the float32 bounds no temperature or top_p can make a row NaN: the smallest
    temperature is greedy in effect, the largest uniform."""
    from gdsllm.engine.sampling import FLOAT32_MAX, FLOAT32_TINY
    lg = _logits(4, 300) * 1000  # large logits: / tiny overflows unless shifted first
    best = int(lg.argmax())
    for kw in (dict(temperature=FLOAT32_TINY), dict(temperature=FLOAT32_TINY, top_p=FLOAT32_TINY),
               dict(temperature=1.0, top_p=FLOAT32_TINY), dict(temperature=FLOAT32_MAX)):
        s = Sampler(SamplingParams(top_k=0, seed=1, **{"top_p": 1.0, **kw}))
        p = s.probs(lg)
        assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-4, kw
        if kw["temperature"] == FLOAT32_TINY or kw.get("top_p") == FLOAT32_TINY:
            assert s.sample(lg) == best, kw
    p = Sampler(SamplingParams(temperature=FLOAT32_MAX, top_k=0, top_p=1.0)).probs(lg)
    assert float(p.max() - p.min()) < 1e-6  # uniform


def test_a_row_that_cannot_be_sampled_fails_alone():
    """NaN logits in one row (a broken model, not parameters) fail that row only: the others get
    the very tokens they get without it, and sample_batch (one request's engine) raises."""
    from gdsllm.engine.sampling import SamplingError
    from gdsllm.engine.speculative import pass_tokens
    lg = torch.stack([_logits(i, 200) for i in range(3)])
    lg[1, 5] = float("nan")
    mk = lambda: {10: Sampler(SamplingParams(temperature=0.9, top_k=0, top_p=1.0, seed=3)),  # noqa: E731
                  11: Sampler(SamplingParams(temperature=0.9, top_k=0, top_p=1.0, seed=4)),
                  12: Sampler(SamplingParams(temperature=0, seed=5))}
    samplers = mk()
    tokens, accepted, proposed, failed = pass_tokens(lg, [10, 11, 12], set(), samplers, None, None)
    alone = mk()
    assert dict(tokens) == {10: alone[10].sample(lg[0]), 12: int(lg[2].argmax())}
    assert list(failed) == [11] and "not finite" in failed[11]
    with pytest.raises(SamplingError, match="not finite"):
        Sampler.sample_batch(lg, list(mk().values()))
