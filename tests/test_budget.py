"""gdsllm.engine.budget: the one VRAM ledger `LLM`, `serve` and `gdsllm info` plan with."""
from __future__ import annotations

import subprocess
import sys

import pytest

from gdsllm import LLM
from gdsllm.convert.synth import synth
from gdsllm.engine.budget import (DEFAULT_MAX_BATCH, DEFAULT_WINDOW, FIT, KV_FIT, free_device_bytes,
                                  kv_tokens, parse_size, plan_memory, scratch_bytes, weights_budget)
from gdsllm.models.kv_cache import BLOCK_SIZE, kv_bytes_per_token
from llama_ref import load, synth_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("budget"), seed=2, num_hidden_layers=4)[1]


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    return synth_model(tmp_path_factory.mktemp("draft"), seed=4, num_hidden_layers=1)[1]


def test_weights_budget_rules():
    assert weights_budget(1000, 10**9, 10**6) == 1000  # asked: taken as asked
    assert weights_budget(None, 900, 1000) is None  # fits in FIT of the free memory: all resident
    assert weights_budget(None, 901, 1000) == int(1000 * FIT)  # does not: that share, the rest streams
    assert weights_budget(None, 10**12, None) is None  # free memory unknown: as asked (nothing)
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match=r"--vram-budget\) must be a positive number of bytes"):
            weights_budget(bad, 1, 1)


def test_the_draft_is_the_first_claim(tiny, draft):
    meta, dmeta = load(tiny), load(draft)
    whole = plan_memory(meta, budget=None, window=2)
    assert whole.weights.streamed == () and whole.draft_bytes == 0
    budget = dmeta.total_bytes + whole.weights.arena_bytes  # the target fits beside the draft
    both = plan_memory(meta, budget=budget, window=2, draft=dmeta)
    assert both.draft_bytes == dmeta.total_bytes and both.weights.streamed == ()
    assert both.device_bytes <= budget
    tight = plan_memory(meta, budget=budget - meta.units[1].nbytes, window=1, draft=dmeta)
    assert tight.weights.streamed and tight.device_bytes <= budget - meta.units[1].nbytes
    with pytest.raises(ValueError, match=f"draft model {dmeta.root} needs {dmeta.total_bytes} bytes"):
        plan_memory(meta, budget=dmeta.total_bytes, window=2, draft=dmeta)


def test_the_dequantization_scratch_is_the_largest_quantized_weight_or_q_k_v(tiny, tmp_path):
    """Quantized models: the ledger holds one buffer at the compute dtype's size for what
    kernels_cuda dequantizes for matmuls of many rows: the largest quantized weight, or q, k and
    v together where larger (kernels_cuda.linears), never gate and up together (that doubles
    it); and the split-K counters of the Triton tiles."""
    from gdsllm.quant.kernels_cuda import SPLIT_K_COUNTERS
    assert plan_memory(load(tiny), budget=None).scratch_bytes == 0  # float: nothing
    counters = 4 * SPLIT_K_COUNTERS  # the split-K tile counters (int32) beside the buffer
    for inter in (256, 64):
        meta = load(synth(tmp_path / f"q{inter}", "tiny", dtype="float16", quant="int4",
                          group_size=32, seed=1, overrides={"hidden_size": 128, "head_dim": 32,
                                                            "intermediate_size": inter,
                                                            "vocab_size": 64}))
        largest = max(t.numel for u in meta.units for t in u.tensors if t.quant is not None)
        numel = {t.name: t.numel for t in meta.units[1].tensors}
        qkv = sum(numel[f"self_attn.{n}_proj.weight"] for n in "qkv")
        gate_up = numel["mlp.gate_proj.weight"] + numel["mlp.up_proj.weight"]
        want = largest if inter == 256 else qkv
        assert (gate_up > want and largest >= qkv) if inter == 256 else qkv > largest
        plan = plan_memory(meta, budget=None)
        assert plan.scratch_bytes == 2 * want + counters == scratch_bytes([meta])
        assert plan.device_bytes == plan.weights.arena_bytes + 2 * want + counters
        assert plan_memory(meta, budget=None, itemsize=4).scratch_bytes == 4 * want + counters
        assert any(line.startswith("scratch ") for line in plan.describe(meta))


def test_kv_tokens_rules(tiny):
    p = load(tiny).params
    per = kv_bytes_per_token(p, 2)
    ctx = p.max_position_embeddings
    assert kv_tokens(p, 2, device="cuda", free_bytes=10**6 * per) == DEFAULT_MAX_BATCH * ctx  # capped
    room = 3 * ctx * per
    assert kv_tokens(p, 2, device="cuda", free_bytes=room) == int(room * KV_FIT) // per
    assert kv_tokens(p, 2, device="cuda", free_bytes=room, kv_budget=ctx * per) == ctx  # --kv-budget
    assert kv_tokens(p, 2, device="cuda", free_bytes=room, extra_per_token=per) == int(room * KV_FIT) // (2 * per)
    assert kv_tokens(p, 2, device="cuda", free_bytes=0) == BLOCK_SIZE  # never less than one block
    assert kv_tokens(p, 4, device="cpu", free_bytes=None, max_batch=2) <= 2 * ctx


def test_llm_plans_with_the_ledger_and_the_services_defaults(tiny, draft):
    from gdsllm.config import ServiceConfig
    cfg = ServiceConfig(model=tiny)
    assert (cfg.prefetch_window, cfg.max_batch) == (DEFAULT_WINDOW, DEFAULT_MAX_BATCH)
    meta = load(tiny)
    block = max(u.nbytes for u in meta.units[1:-1])
    budget = meta.units[0].nbytes + meta.units[-1].nbytes + 2 * block + 8192
    with LLM(str(tiny), vram_budget=budget) as m:
        want = plan_memory(meta, budget=budget, window=DEFAULT_WINDOW)
        assert m.plan == want.weights and m.plan.num_slots == DEFAULT_WINDOW
        # the KV cache by the service's rule (on the CPU: capped at --max-batch contexts here)
        assert m.runner.cache.capacity >= kv_tokens(meta.params, 4, device="cpu", free_bytes=None)
    dmeta = load(draft)
    with LLM(str(tiny), draft=str(draft), vram_budget=dmeta.total_bytes + budget) as m:
        assert m.memory.draft_bytes == dmeta.total_bytes and m.plan == want.weights
        # the draft's cache holds the same sequences: as many tokens as the target's
        assert m.speculator.draft.runner.cache.capacity == m.runner.cache.capacity


def test_free_device_bytes_never_raises():
    assert free_device_bytes("cpu") > 0
    got = free_device_bytes("cuda")  # no GPU here: unknown, not an error
    assert got is None or got > 0


def test_info_prints_the_plan_before_anything_loads(tiny):
    meta = load(tiny)
    block = max(u.nbytes for u in meta.units[1:-1])
    budget = meta.units[0].nbytes + meta.units[-1].nbytes + 2 * block + 8192
    out = subprocess.run([sys.executable, "-m", "gdsllm", "info", "-m", str(tiny), "--vram-budget", str(budget),
                          "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plan = plan_memory(meta, budget=budget, window=DEFAULT_WINDOW).weights
    assert f"resident      {len(plan.resident_offsets)} of {len(meta.units)} units" in out.stdout
    assert f"streamed      {len(plan.streamed)} units" in out.stdout
    assert f"through {DEFAULT_WINDOW} slot(s)" in out.stdout
    assert "kv cache" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "gdsllm", "info", "-m", str(tiny), "--vram-budget", "banana"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--vram-budget: not a size: 'banana'" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert parse_size("2GiB") == 2 << 30


@pytest.mark.gpu
def test_free_device_bytes_on_cuda_needs_no_context_and_agrees_with_torch():
    """The coordinator plans before any worker: NVML gives the free memory without a CUDA context."""
    code = ("import torch; from gdsllm.engine.budget import free_device_bytes; "
            "f = free_device_bytes('cuda'); assert not torch.cuda.is_initialized(); "
            "t = torch.cuda.mem_get_info(0)[0]; print(f, t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    nvml, torch_free = map(int, out.stdout.split())
    # torch's own context (a few hundred MB) is the difference
    assert 0 <= nvml - torch_free < 2 << 30, (nvml, torch_free)
