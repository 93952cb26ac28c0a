"""Every script in examples/ runs, as a user would run it (a subprocess), on tiny random models
(the default model where a test says so), and prints what the runtime really produced: each
output is checked against gdsllm.LLM run here, in the test's process."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import concurrently
from gdsllm import LLM, SamplingParams
from gdsllm.convert.synth import synth
from http_helpers import HttpServe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny target (4 blocks), a draft of its vocabulary (1 block, other seed), a tiny MoE."""
    root = tmp_path_factory.mktemp("examples")
    return {"tiny": synth(root / "tiny", "tiny", layers=4, dtype="float32", seed=7),
            "draft": synth(root / "draft", "tiny", layers=1, dtype="float32", seed=11),
            "moe": synth(root / "moe", "tiny-moe", dtype="float32", quant="int4", group_size=32)}


def run_example(name: str, *args: str, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                               **(env or {})})
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def line(out: str, prefix: str) -> str:
    found = [ln[len(prefix):] for ln in out.splitlines() if ln.startswith(prefix)]
    assert found, f"no line starting {prefix!r} in:\n{out}"
    return found[0]


def greedy(model, prompt, n: int, **kw):
    with LLM(str(model), device="cpu", **kw) as llm:
        return llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0))


def test_every_example_is_tested_and_listed_in_the_readme():
    names = sorted(p.name for p in EXAMPLES.glob("*.py"))
    tested = set(re.findall(r'run_example\("(\w+\.py)"', Path(__file__).read_text()))
    readme = (ROOT / "README.md").read_text()
    assert names and set(names) <= tested, set(names) - tested
    assert all(f"examples/{n}" in readme for n in names), [n for n in names if f"examples/{n}" not in readme]


def test_python_api(models):
    out, ref = concurrently(lambda: run_example("python_api.py", "-m", models["tiny"], "-n", 8),
                            lambda: greedy(models["tiny"], "The capital of France is", 8))
    assert line(out, "token_ids: ") == str(ref.token_ids)
    assert line(out, "generate: ") == repr(ref.text)
    assert line(out, "finish_reason: ") == ref.finish_reason
    assert f"the first generated token was {ref.token_ids[0]}" in out
    assert re.search(rf"argmax of the last row {ref.token_ids[0]} ", out)
    assert len([ln for ln in out.splitlines() if ln.startswith("batch: ")]) == 2


def test_inference_demo_streams_under_a_small_budget(models):
    out, ref = concurrently(lambda: run_example("inference_demo.py", "-m", models["tiny"], "-n", 12),
                            lambda: greedy(models["tiny"], "The capital of France is", 12))
    streamed = int(re.search(r"(\d+) streamed every step", out).group(1))
    assert streamed >= 1
    assert line(out, "text: ") == repr(ref.text)
    mb = float(re.search(r"([\d.]+) MB read from storage while generating", out).group(1))
    assert mb > 0
    assert len(re.findall(r"^  \+ *[\d.]+ ms  ", out, re.M)) >= 2  # a timed line per piece


def test_speculative_equals_plain_greedy(models):
    out, ref = concurrently(
        lambda: run_example("speculative.py", "-m", models["tiny"], "--draft", models["draft"], "-k", 3,
                            "-n", 16),
        lambda: greedy(models["tiny"], "The capital of France is", 16))
    assert line(out, "same tokens: ") == "True"
    assert line(out, "with draft:    ").startswith(repr(ref.text))
    drafted = int(re.search(r"drafted (\d+), accepted (\d+)", out).group(1))
    assert drafted > 0


def test_custom_forward_equals_llm_logits(models):
    out = run_example("custom_forward.py", "-m", models["tiny"], "-p", "hello world, the quick brown fox",
                      "--window", 2)
    m = re.search(r"max \|logits - LLM logits\| = (\S+) \(tolerance 0.0001; the logits reach (\S+)\)", out)
    diff, scale = float(m.group(1)), float(m.group(2))
    assert diff <= 1e-4 and scale > 0.1, out  # logits large enough for the check to mean something
    assert "match" in out.splitlines()
    assert re.search(r"streaming 6 units through 3 buffers", out)


@pytest.mark.slow
def test_custom_forward_on_the_default_model(smollm2_model, xdg_cache):
    """The real SmolLM2 (int4, tied embeddings), the example's own default."""
    out = run_example("custom_forward.py", env={"XDG_CACHE_HOME": str(xdg_cache)})
    diff = float(re.search(r"max \|logits - LLM logits\| = (\S+)", out).group(1))
    assert diff <= 1e-4 and "match" in out.splitlines()


def test_moe_reads_only_routed_experts(models):
    def reference():
        with LLM(str(models["moe"]), device="cpu") as llm:
            return llm.generate("hello world", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    out, ref = concurrently(lambda: run_example("moe.py", "-m", models["moe"], "-p", "hello world", "-n", 6),
                            reference)
    assert line(out, "token_ids: ") == str(ref.token_ids)
    m = re.search(r"expert slots (\d+); routed (\d+), read (\d+)", out)
    slots, routed, read = map(int, m.groups())
    assert slots == 4 and 0 < read <= routed


def test_openai_client_against_serve(models, tmp_path):
    server = HttpServe(models["tiny"], tmp_path / "serve.log", wait=False)
    try:
        ref = greedy(models["tiny"], "The capital of France is", 8)  # while the server starts
        server.wait_ready()
        out = run_example("openai_client.py", "--base-url", server.url + "/v1", "-n", 8)
    finally:
        assert server.stop() == 0, server.log_tail()
    assert line(out, "model: ") == models["tiny"].name
    assert line(out, "completion: ").startswith(repr(ref.text) + " (finish length, 8 tokens)")
    assert line(out, "stream: ").startswith(repr(ref.text))
    assert re.search(r"^chat: .* \(\d+ tokens\)$", out, re.M)
