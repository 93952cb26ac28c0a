"""The compiled CPU decode block (gdsllm.models.cpu_compiled): the same tokens and logits as the
eager block, compiled once (at start-up, no recompile as the sequence grows), eager where it
does not apply, and eager with one log line where compiling fails."""
from __future__ import annotations

import logging

import pytest
import torch
from llama_ref import load, resident_weights

from gdsllm.convert.synth import synth
from gdsllm.engine.llm import LLM
from gdsllm.engine.runner import Runner
from gdsllm.engine.sampling import SamplingParams
from gdsllm.models import cpu_compiled

PROMPTS = [[5, 9, 17, 3, 44, 2], [7, 7, 1]]


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory):
    """A tiny random LLaMA with int4 projections (the default model's kind of weights)."""
    return synth(tmp_path_factory.mktemp("cc") / "m", "tiny", dtype="float32", quant="int4",
                 group_size=32, seed=5, overrides={"hidden_size": 128, "intermediate_size": 256,
                                                   "head_dim": 32, "num_hidden_layers": 3,
                                                   "tie_word_embeddings": True})


@pytest.fixture(autouse=True)
def compile_allowed(monkeypatch):
    monkeypatch.setenv("GDSLLM_CPU_COMPILE", "1")  # whatever the environment says


def _greedy(llm: LLM, prompt, n: int = 24):
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return llm.generate(prompt, sp).token_ids


def _logits(model, compiled: bool, prompt, steps: int = 6) -> list[torch.Tensor]:
    """A Runner of its own over the resident model: each pass's logits of `steps` greedy tokens
    decoded after `prompt`."""
    meta = load(model)
    r = Runner(meta.params, "cpu", torch.float32, architecture=meta.architecture, kv_tokens=256,
               cpu_compile=compiled)
    weights = resident_weights(meta)
    for unit in meta.units:
        r.pin(unit.index, weights[unit.name])
    out, toks = [], prompt
    for _ in range(steps + 1):
        r.start_pass([(1, toks)])
        for unit in meta.units:
            r.run_unit(unit, r.pinned[unit.index])
        out.append(r.end_pass())
        toks = [int(out[-1][0].argmax())]
    assert r.compiled.calls == (steps * meta.params.num_hidden_layers if compiled else 0)
    return out


def test_compiled_decode_is_eager_bit_for_bit(int4_model):
    with LLM(int4_model, cpu_compile=False) as eager, LLM(int4_model, cpu_compile=True) as comp:
        c = comp.runner.compiled
        assert c.compile_s is not None and c.compile_s > 0 and c.failed is None  # at start-up
        for prompt in PROMPTS:
            assert _greedy(comp, prompt) == _greedy(eager, prompt)
        # every decode pass's blocks ran compiled, none of the eager LLM's
        assert c.calls == 2 * 23 * eager.meta.params.num_hidden_layers
        assert eager.runner.compiled.calls == 0
    for a, b in zip(_logits(int4_model, False, PROMPTS[0]), _logits(int4_model, True, PROMPTS[0])):
        assert torch.equal(a, b)


def test_one_graph_for_every_length(int4_model):
    """dynamic key count and first slot: no recompile over a growing sequence (the guard count
    is Dynamo's cache entries of the block's code)."""
    from torch._dynamo.utils import counters
    before = counters["stats"]["unique_graphs"]
    with LLM(int4_model, cpu_compile=True) as llm:
        _greedy(llm, PROMPTS[0], n=40)
        assert llm.runner.compiled.calls > 0
    assert counters["stats"]["unique_graphs"] - before <= 1


def test_batches_and_prompts_run_eager(int4_model):
    """Two sequences in one decode pass: not covered, the eager block, the same tokens."""
    with LLM(int4_model, cpu_compile=False) as eager, LLM(int4_model, cpu_compile=True) as comp:
        sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        before = comp.runner.compiled.calls
        got = [o.token_ids for o in comp.generate(PROMPTS, sp)]
        assert got == [o.token_ids for o in eager.generate(PROMPTS, sp)]
        assert comp.runner.compiled.calls == before  # both sequences decode in every pass


def test_env_switch_off(int4_model, monkeypatch):
    monkeypatch.setenv("GDSLLM_CPU_COMPILE", "0")
    with LLM(int4_model, cpu_compile=True) as llm:
        _greedy(llm, PROMPTS[0], n=4)
        assert not llm.runner.compiled.enabled and llm.runner.compiled.calls == 0


def test_compile_failure_falls_back_to_eager(int4_model, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler here\nsecond line")
    monkeypatch.setattr(cpu_compiled.torch, "compile", broken)
    with LLM(int4_model, cpu_compile=False) as eager:
        want = _greedy(eager, PROMPTS[0])
    with caplog.at_level(logging.WARNING, logger="gdsllm.models.cpu_compiled"):
        with LLM(int4_model, cpu_compile=True) as llm:
            assert _greedy(llm, PROMPTS[0]) == want
            c = llm.runner.compiled
    assert c.failed == "RuntimeError: no C++ compiler here" and c.calls == 0
    lines = [r for r in caplog.records if "compiled CPU decode block is off" in r.getMessage()]
    assert len(lines) == 1


def test_float_models_are_not_covered(tmp_path):
    """float32 weights (no packed int4): the eager block, nothing compiled."""
    d = synth(tmp_path / "f", "tiny", dtype="float32", seed=2)
    with LLM(d, cpu_compile=True) as llm:
        _greedy(llm, PROMPTS[0], n=4)
        assert llm.runner.compiled.calls == 0 and llm.runner.compiled.compile_s is None
