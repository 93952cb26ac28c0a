"""Shared by the speculative-decoding tests (test_speculative*.py, test_adaptive_k.py): one torch
thread per module, greedy SamplingParams, a tiny target with a random draft of its vocabulary and
the target's greedy tokens without a draft, and a chi-square goodness-of-fit p-value.

    from spec_helpers import PROMPTS, greedy, models, one_thread, reference  # noqa: F401  (fixtures)
"""
from __future__ import annotations

import pytest
import torch

from gdsllm import LLM, SamplingParams
from gdsllm.convert.synth import synth

PROMPTS = ["hello world", "the quick brown fox", "zzz", [5, 9, 200, 31, 7]]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and much faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny target (4 blocks), a random draft of the same vocabulary (1 block, other seed)."""
    root = tmp_path_factory.mktemp("spec")
    target = synth(root / "target", "tiny", layers=4, dtype="float32", seed=7)
    draft = synth(root / "draft", "tiny", layers=1, dtype="float32", seed=11)
    return target, draft


@pytest.fixture(scope="module")
def reference(models):
    with LLM(str(models[0])) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, greedy(24))]


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square goodness of fit; cells expecting < 5 are pooled."""
    n = float(counts.sum())
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts.double()[~small], counts.double()[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))
