"""The LLaMA math and the batched Runner against Hugging Face transformers.

Random shapes (synth --hf-out, converted back with convert_hf) and the real SmolLM2 (the GGUF
through convert_gguf vs transformers' GGUF loader): greedy tokens equal, per-step logits close;
batch compositions equal each sequence alone; bad input raises clear errors.

    python3 -m pytest tests/test_model.py            # the SmolLM2 cases are @slow (~1 min)
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from gdsllm.convert.hf import convert_hf

from gdsllm.models.views import unit_tensors
from gdsllm.format.metadata import DTYPES
from gdsllm.engine.runner import Runner
from llama_ref import (NEAR_TIE, assert_same_or_near_tie, greedy_reference, greedy_reference_scores,
                       greedy_runner, load, reference_logits, rel_err, resident_weights, run_pass,
                       smollm2, smollm2_hf, synth_model)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SHAPES = {
    # GQA ratio 1 (plain multi-head), untied head
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    # ratio 3, odd hidden size 72 with head_dim 24, tied head, another rope theta
    "gqa3-odd-tied": dict(hidden_size=72, intermediate_size=200, num_attention_heads=3,
                          num_key_value_heads=1, head_dim=24, tie_word_embeddings=True,
                          rope_theta=500000.0),
    # ratio 4, head_dim not hidden/heads, Llama-3 rope scaling that really moves the frequencies
    "gqa4-llama3": dict(hidden_size=96, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                        layers=3, rope_scaling=LLAMA3),
}
PROMPTS = [[1, 72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100], [1, 300, 17], [5]]


def _synth(tmp_path, name):
    cfg = dict(SHAPES[name])
    layers = cfg.pop("layers", None)
    if layers:
        cfg["num_hidden_layers"] = layers
    return synth_model(tmp_path, seed=len(name), **cfg)


@pytest.fixture(scope="module", params=list(SHAPES))
def random_llama(request, tmp_path_factory):
    hf, d = _synth(tmp_path_factory.mktemp(request.param), request.param)
    meta = load(d)
    return hf, meta, resident_weights(meta)


def test_random_shapes_match_transformers(random_llama):
    hf, meta, w = random_llama
    assert meta.params.tie_word_embeddings == hf.config.tie_word_embeddings
    runner = Runner(meta.params, "cpu", torch.float32)
    toks, logits = greedy_runner(runner, meta, w, PROMPTS, 32)
    for prompt, ours, lg in zip(PROMPTS, toks, logits):
        assert ours == greedy_reference(hf, prompt, 32)
        ref = reference_logits(hf, prompt + ours)[len(prompt) - 1: -1]
        assert rel_err(lg, ref) < 1e-5, (prompt, rel_err(lg, ref))
    assert runner.sequences == set()


def test_batch_equals_each_alone(random_llama):
    """Two (three) sequences of different lengths in one step: same tokens and logits as alone."""
    _, meta, w = random_llama
    runner = Runner(meta.params, "cpu", torch.float32)
    together_t, together_l = greedy_runner(runner, meta, w, PROMPTS, 8)
    for i, prompt in enumerate(PROMPTS):
        alone_t, alone_l = greedy_runner(runner, meta, w, [prompt], 8, first_id=100 + i)
        assert alone_t[0] == together_t[i]
        assert rel_err(together_l[i], alone_l[0]) < 1e-5


def test_sequence_joins_mid_generation(random_llama):
    _, meta, w = random_llama
    runner = Runner(meta.params, "cpu", torch.float32)
    a, b = PROMPTS[0], PROMPTS[1]
    (alone_a,), (alone_a_l,) = greedy_runner(runner, meta, w, [a], 10, first_id=50)
    (alone_b,), (alone_b_l,) = greedy_runner(runner, meta, w, [b], 6, first_id=51)
    # A runs alone for 4 steps; then B's whole prompt joins the pass of A's 5th token.
    got_a, got_b, lg_a, lg_b = [], [], [], []
    chunks = [(0, a)]
    for step in range(10):
        if step == 4:
            chunks.append((1, b))
        lg = run_pass(runner, meta, w, chunks)
        got_a.append(int(lg[0].argmax()))
        lg_a.append(lg[0])
        if len(chunks) == 2:
            got_b.append(int(lg[1].argmax()))
            lg_b.append(lg[1])
        chunks = [(0, [got_a[-1]])] + ([(1, [got_b[-1]])] if got_b else [])
    assert got_a == alone_a and got_b == alone_b
    assert rel_err(torch.stack(lg_a), alone_a_l) < 1e-5
    assert rel_err(torch.stack(lg_b), alone_b_l) < 1e-5
    assert runner.seq_len(0) == len(a) + 9 and runner.seq_len(1) == len(b) + 5
    runner.release(0)
    assert runner.seq_len(0) == 0 and runner.seq_len(1) == len(b) + 5


def test_prompt_chunked_across_passes(random_llama):
    """A prompt fed in two chunks (the second causal over a cached prefix) equals it whole."""
    _, meta, w = random_llama
    runner = Runner(meta.params, "cpu", torch.float32)
    p = PROMPTS[0]
    whole = run_pass(runner, meta, w, [(0, p)])
    run_pass(runner, meta, w, [(1, p[:5])])
    split = run_pass(runner, meta, w, [(1, p[5:])])
    assert rel_err(split, whole) < 1e-5


def test_bridge_views_are_zero_copy(random_llama):
    _, meta, _ = random_llama
    u = meta.units[1]
    buf = torch.frombuffer(bytearray(meta.path(u).read_bytes()), dtype=torch.uint8)
    views = unit_tensors(u, buf)
    for t in u.tensors:
        v = views[t.name]
        assert v.data_ptr() == buf.data_ptr() + t.offset and tuple(v.shape) == t.shape
    buf[u.tensor("input_layernorm.weight").offset: u.tensor("input_layernorm.weight").offset + 4] = 0
    assert views["input_layernorm.weight"][0] == 0  # a view, not a copy
    with pytest.raises(ValueError, match="buffer holds"):
        unit_tensors(u, buf[: u.nbytes - 4096])
    with pytest.raises(TypeError, match="uint8"):
        unit_tensors(u, buf.view(torch.float32))
    with pytest.raises(ValueError, match="aligned"):
        unit_tensors(u, torch.zeros(u.nbytes + 8, dtype=torch.uint8)[1:u.nbytes + 1])


def test_runner_bad_input(random_llama):
    _, meta, w = random_llama
    p = meta.params
    runner = Runner(p, "cpu", torch.float32)
    with pytest.raises(ValueError, match="context"):
        runner.start_pass([(0, [5] * (p.max_position_embeddings + 1))])
    with pytest.raises(ValueError, match="no new tokens"):
        runner.start_pass([(0, [])])
    with pytest.raises(ValueError, match="vocabulary"):
        runner.start_pass([(0, [p.vocab_size])])
    with pytest.raises(ValueError, match="twice"):
        runner.start_pass([(0, [1]), (0, [2])])
    with pytest.raises(ValueError, match="empty batch"):
        runner.start_pass([])
    runner.start_pass([(0, [1, 2])])
    with pytest.raises(RuntimeError, match="expected embed"):
        runner.run_unit(meta.units[1], w[meta.units[1].name])
    with pytest.raises(RuntimeError, match="end_pass after 0"):
        runner.end_pass()
    with pytest.raises(RuntimeError, match="in progress"):
        runner.start_pass([(1, [1])])
    with pytest.raises(RuntimeError, match="middle of a pass"):
        runner.release(0)
    runner.abort_pass()
    assert runner.seq_len(0) == 0  # nothing of the aborted pass was committed
    # a sequence at the context limit: one token more is refused before any compute
    run_pass(runner, meta, w, [(0, [5] * (p.max_position_embeddings - 1))])
    run_pass(runner, meta, w, [(0, [5])])
    with pytest.raises(ValueError, match=r"sequence 0: \d+ cached \+ 1 new tokens exceed"):
        runner.start_pass([(0, [5])])


def test_unknown_rope_type_is_refused(tmp_path):
    from dataclasses import replace
    from gdsllm.models.layers import rope_inv_freq
    _, d = synth_model(tmp_path)
    p = replace(load(d).params, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(p)
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(replace(p, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_paths(tmp_path, dtype):
    """Weights stored in half precision: computed in that dtype (the CUDA path, run here on the
    CPU) the greedy tokens equal transformers loaded in that dtype; upcast to float32 (the CPU
    path) the logits equal transformers' float32 model over the same rounded weights."""
    _, _ = synth_model(tmp_path, seed=3, num_key_value_heads=1)
    meta = load(convert_hf(tmp_path / "hf", tmp_path / dtype, dtype=dtype))
    w = resident_weights(meta)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=DTYPES[dtype]).eval()
    prompt = PROMPTS[0]
    (half,), _ = greedy_runner(Runner(meta.params, "cpu", DTYPES[dtype]), meta, w, [prompt], 16)
    assert half == greedy_reference(hf, prompt, 16)
    (ours,), (lg,) = greedy_runner(Runner(meta.params, "cpu", torch.float32), meta, w, [prompt], 16)
    hf = hf.float()  # the same rounded weights, in float32
    assert ours == greedy_reference(hf, prompt, 16)
    assert rel_err(lg, reference_logits(hf, prompt + ours)[len(prompt) - 1: -1]) < 1e-5


# -- the real model ------------------------------------------------------------------------------

SMOL_RAW = ["The capital of France is", "def fibonacci(n):"]
SMOL_CHAT = [[{"role": "user", "content": "What is 2+2?"}],
             [{"role": "system", "content": "You are a pirate."},
              {"role": "user", "content": "Tell me about the sea in one sentence."}]]


@pytest.fixture(scope="module")
def smol():
    hf, tok, d = smollm2()
    meta = load(d)
    prompts = [tok(t).input_ids for t in SMOL_RAW]
    prompts += [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True,
                                        return_dict=False) for m in SMOL_CHAT]
    return hf, meta, resident_weights(meta), prompts


@pytest.mark.slow
def test_smollm2_matches_transformers(smol):
    """4 prompts (2 raw, 2 chat) decoded together for 32 tokens: ids equal transformers' greedy
    generate, every step's logits within 1e-3 relative of transformers' forward."""
    hf, meta, w, prompts = smol
    assert meta.params.num_key_value_heads * 3 == meta.params.num_attention_heads
    runner = Runner(meta.params, "cpu", torch.float32)
    toks, logits = greedy_runner(runner, meta, w, prompts, 32)
    for prompt, ours, lg in zip(prompts, toks, logits):
        assert ours == greedy_reference(hf, prompt, 32), prompt
        ref = reference_logits(hf, prompt + ours)[len(prompt) - 1: -1]
        assert rel_err(lg, ref) < 1e-3


@pytest.mark.slow
def test_smollm2_batch_equals_alone(smol):
    _, meta, w, prompts = smol
    runner = Runner(meta.params, "cpu", torch.float32)
    together, together_l = greedy_runner(runner, meta, w, prompts[:2], 6)
    for i in range(2):
        alone, alone_l = greedy_runner(runner, meta, w, [prompts[i]], 6, first_id=10 + i)
        assert alone[0] == together[i]
        assert rel_err(together_l[i], alone_l[0]) < 1e-4


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_smollm2_cuda_matches_transformers(smol, dtype, smollm2_converted, monkeypatch):
    """On CUDA in float16 / bfloat16, both sides rounding the same dequantized float32 weights to
    `dtype`, ours as bridge views over one CUDA buffer per unit. With the kernels transformers runs
    (cuDNN attention, the unfused torch elementwise code), the 32 greedy tokens are equal. With our
    default kernels (flash / memory-efficient attention, the fused Triton elementwise kernels)
    they are equal too, or part at a near-tie of transformers' own logits."""
    from gdsllm.models import fused
    _, _, _, prompts = smol
    hf = smollm2_hf("cuda", DTYPES[dtype])
    meta = load(smollm2_converted(dtype))
    w = resident_weights(meta, "cuda")
    for prompt in prompts:  # one at a time: the same GEMM shapes as transformers, hence kernels
        ref, ref_logits = greedy_reference_scores(hf, prompt, 32)
        same = Runner(meta.params, "cuda", DTYPES[dtype], cudnn_attention=True)
        with monkeypatch.context() as m:  # transformers' elementwise code: unfused
            m.setattr(fused, "ENABLED", False)
            (ours,), _ = greedy_runner(same, meta, w, [prompt], 32)
        assert ours == ref, (dtype, "cudnn", prompt)
        (ours,), _ = greedy_runner(Runner(meta.params, "cuda", DTYPES[dtype]), meta, w, [prompt], 32)
        assert_same_or_near_tie(ours, ref, ref_logits, NEAR_TIE[dtype], (dtype, prompt))

