"""The CPU decode block as one call (gdsllm.models.cpu_compiled): scripted (the default) the
eager block's logits bit for bit, on a tiny random model and on the default model; compiled
(--cpu-compile) the same tokens and logits on the tiny model, once (at start-up, no recompile as
the sequence grows); eager where it does not apply, and eager with one log line where making
it fails."""
from __future__ import annotations

import contextlib
import logging
import os

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


@contextlib.contextmanager
def _mode(mode: str):
    """Build LLMs / Runners with every block eager ("eager": GDSLLM_CPU_COMPILE=0, read when the
    Runner is made), scripted ("script") or compiled ("inductor"); yields cpu_compile."""
    keep = os.environ.get("GDSLLM_CPU_COMPILE")
    os.environ["GDSLLM_CPU_COMPILE"] = "0" if mode == "eager" else "1"
    try:
        yield mode == "inductor"
    finally:
        os.environ["GDSLLM_CPU_COMPILE"] = keep if keep is not None else "1"


def _llm(model, mode: str) -> LLM:
    with _mode(mode) as inductor:
        return LLM(model, cpu_compile=inductor)


def _greedy(llm: LLM, prompt, n: int = 24):
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return llm.generate(prompt, sp).token_ids


def _logits(model, mode: str, prompt, steps: int = 6) -> list[torch.Tensor]:
    """A Runner of its own over the resident model: each pass's logits of `steps` greedy tokens
    decoded after `prompt`, the blocks run as `mode` says (_mode)."""
    meta = load(model)
    with _mode(mode) as inductor:
        r = Runner(meta.params, "cpu", torch.float32, architecture=meta.architecture,
                   kv_tokens=256, cpu_compile=inductor)
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
    assert r.compiled.calls == (steps * meta.params.num_hidden_layers if mode != "eager" else 0)
    return out


def test_scripted_decode_is_eager_bit_for_bit(int4_model):
    for a, b in zip(_logits(int4_model, "eager", PROMPTS[0]), _logits(int4_model, "script", PROMPTS[0])):
        assert torch.equal(a, b)
    with _llm(int4_model, "eager") as eager, _llm(int4_model, "script") as scr:
        c = scr.runner.compiled
        assert not c.inductor and c.compile_s is not None and c.failed is None  # at start-up
        for prompt in PROMPTS:
            assert _greedy(scr, prompt) == _greedy(eager, prompt)
        assert c.calls == 2 * 23 * eager.meta.params.num_hidden_layers
        assert eager.runner.compiled.calls == 0


def test_scripted_default_model_is_eager_bit_for_bit():
    """The default model (SmolLM2-135M, int4 blocks, 3 key/value heads of 9): every pass's logits
    equal, the prompt's and 12 decode passes', where the Inductor block parts from eager."""
    from gdsllm.convert.default_model import default_model_dir
    model = default_model_dir()
    # "The capital of France is Paris, and the capital of Italy is"
    prompt = [504, 3575, 282, 4649, 314, 7042, 28, 284, 260, 3575, 282, 7158, 314]
    for a, b in zip(_logits(model, "eager", prompt, 12), _logits(model, "script", prompt, 12)):
        assert torch.equal(a, b)


def test_compiled_decode_is_eager_bit_for_bit(int4_model):
    with _llm(int4_model, "eager") as eager, _llm(int4_model, "inductor") as comp:
        c = comp.runner.compiled
        assert c.compile_s is not None and c.compile_s > 0 and c.failed is None  # at start-up
        for prompt in PROMPTS:
            assert _greedy(comp, prompt) == _greedy(eager, prompt)
        # every decode pass's blocks ran compiled, none of the eager LLM's
        assert c.calls == 2 * 23 * eager.meta.params.num_hidden_layers
        assert eager.runner.compiled.calls == 0
    for a, b in zip(_logits(int4_model, "eager", PROMPTS[0]), _logits(int4_model, "inductor", PROMPTS[0])):
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
    with _llm(int4_model, "eager") as eager, _llm(int4_model, "inductor") as comp:
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
    with _llm(int4_model, "eager") as eager:
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


def test_script_failure_falls_back_to_eager(int4_model, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("TorchScript is gone from this torch")
    monkeypatch.setattr(cpu_compiled.torch.jit, "script", broken)
    with _llm(int4_model, "eager") as eager:
        want = _greedy(eager, PROMPTS[0])
    with caplog.at_level(logging.WARNING, logger="gdsllm.models.cpu_compiled"):
        with _llm(int4_model, "script") as llm:
            assert _greedy(llm, PROMPTS[0]) == want
            c = llm.runner.compiled
    assert c.failed == "RuntimeError: TorchScript is gone from this torch" and c.calls == 0
    assert len([r for r in caplog.records if "scripted CPU decode block is off" in r.getMessage()]) == 1
