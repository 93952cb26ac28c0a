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
