"""`gdsllm.LLM` (units streamed one at a time from disk) and `gdsllm generate`, end to end."""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gdsllm
from gdsllm import LLM, SamplingParams
from conftest import concurrently
from gdsllm.format.metadata import FormatError
from llama_ref import greedy_reference, load, smollm2, smollm2_hf, synth_model

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random model (synth, with its byte-level tokenizer and chat template) and its HF twin."""
    hf, d = synth_model(tmp_path_factory.mktemp("tiny"), seed=3, num_key_value_heads=1)
    return hf, d


@pytest.fixture(scope="module")
def llm(tiny):
    with LLM(str(tiny[1])) as m:
        yield m


def test_greedy_matches_transformers_and_batch_equals_alone(llm, tiny):
    hf, _ = tiny
    prompts = ["hello world", [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], "a",
               [{"role": "user", "content": "hi there"}]]
    outs = llm.generate(prompts, GREEDY)
    assert [o.finish_reason for o in outs] == ["length"] * 4
    for p, o in zip(prompts, outs):
        assert len(o.token_ids) == 12
        assert o.token_ids == greedy_reference(hf, o.prompt_token_ids, 12)
        alone = llm.generate(p, GREEDY)
        assert alone.token_ids == o.token_ids and alone.text == o.text
        assert o.text == llm.tokenizer.decode(o.token_ids)
    assert outs[1].prompt_token_ids == prompts[1]
    assert outs[0].prompt_token_ids == llm.tokenizer.encode("hello world")
    chat = llm.tokenizer.apply_chat_template(prompts[3])
    assert outs[3].prompt_token_ids == llm.tokenizer.encode(chat, add_special_tokens=False)
    assert llm.runner.sequences == set()  # every KV cache released


def test_stream_equals_generate(llm):
    params = SamplingParams(max_tokens=20, temperature=0.9, seed=11, ignore_eos=True)
    text = "".join(llm.stream("stream me", params))
    out = llm.generate("stream me", params)
    assert text == out.text and len(out.token_ids) == 20  # same seed, same tokens
    # seeded sampling is reproducible across calls and batch neighbours
    batch = llm.generate(["stream me", "other"], [params, SamplingParams(max_tokens=5, seed=1)])
    assert batch[0].token_ids == out.token_ids


def test_one_scheduler_serves_interleaved_streams_and_queues_past_max_batch(llm, tiny):
    """Two streams consumed in turn share the engine's one scheduler (a pass serves both; each
    still sees only its own text), and prompts beyond max_batch, or beyond what the KV cache
    holds, wait their turn: the tokens are those of each prompt alone."""
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    alone = [llm.generate(p, params) for p in ("first stream", "second one")]
    a, b = llm.stream("first stream", params), llm.stream("second one", params)
    texts = ["", ""]
    for i, it in enumerate([a, b] * 20):
        texts[i % 2] += next(it, "")
    assert texts == [o.text for o in alone]
    assert llm.scheduler.books.used_blocks == 0 and not llm.scheduler.has_work
    prompts = [f"prompt number {i}" for i in range(5)]
    want = [o.token_ids for o in llm.generate(prompts, params)]
    with LLM(str(tiny[1]), max_batch=2, kv_tokens=64) as small:  # 2 at once, and 64 tokens of KV
        assert [o.token_ids for o in small.generate(prompts, params)] == want
        with pytest.raises(ValueError, match="prompt: .* more than the whole cache holds"):
            small.generate("x", SamplingParams(max_tokens=100))


def test_stop_conditions(llm):
    base = llm.generate("stop test", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    ids = base.token_ids
    # a stop token id: generation ends on it, included in token_ids, not in the text
    out = llm.generate("stop test", SamplingParams(max_tokens=16, temperature=0, ignore_eos=True,
                                                   stop_token_ids=(ids[3],)))
    first = ids.index(ids[3])
    assert out.finish_reason == "stop" and out.token_ids == ids[: first + 1]
    assert out.text == llm.tokenizer.decode(ids[:first])
    # a stop string: the text ends right before it, even when streamed
    visible = base.text.strip("\ufffd")
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    cut = base.text.index(stop)
    p = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=(stop, "never-ever"))
    out = llm.generate("stop test", p)
    assert out.finish_reason == "stop" and out.text == base.text[:cut]
    assert "".join(llm.stream("stop test", p)) == base.text[:cut]
    # the model's end-of-sequence id stops unless ignore_eos
    eos = llm.meta.params.eos_token_ids[0]
    forced = llm.generate([1, 2, 3], SamplingParams(max_tokens=5, temperature=0,
                                                    stop_token_ids=(eos,)))
    assert forced.finish_reason in ("stop", "length")
    assert llm.generate("x", SamplingParams(max_tokens=1)).finish_reason in ("stop", "length")


def test_context_limit_ends_with_length(llm):
    n_ctx = llm.meta.params.max_position_embeddings
    out = llm.generate([5] * (n_ctx - 3), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 3


@pytest.mark.parametrize("prompt, params, msg", [
    ("", None, "empty prompt"),
    ([], None, "no prompts"),
    ([[]], None, "empty prompt"),
    ("hi", SamplingParams(temperature=-1), "temperature"),
    ("hi", SamplingParams(top_p=0), "top_p"),
    ("hi", SamplingParams(max_tokens=0), "max_tokens"),
    ([1, 2, 10**6], None, "outside the vocabulary"),
    ([1.5, 2], None, "a prompt is a string"),
    ([{"content": "no role"}], None, "role"),
    (["a", "b"], [SamplingParams()], "2 prompts but 1 SamplingParams"),
    ("hi", {"temperature": 0}, "params must be SamplingParams"),
])
def test_bad_input(llm, prompt, params, msg):
    with pytest.raises(ValueError, match=msg):
        llm.generate(prompt, params)
    assert llm.runner.sequences == set()


def test_prompt_too_long(llm):
    n_ctx = llm.meta.params.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt of {n_ctx} tokens does not fit .* {n_ctx}"):
        llm.generate([5] * n_ctx)
    with pytest.raises(ValueError, match="prompt 1: prompt of"):
        llm.generate(["ok", "x" * (4 * n_ctx)])


@pytest.mark.parametrize("resident", [True, False])
def test_corrupt_unit_is_caught_on_first_read(tiny, tmp_path, resident):
    """Resident: when it is loaded at start-up; streamed: at the first step that reads it."""
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny[1], d)
    meta = load(d)
    unit = meta.units[2]
    with open(d / unit.file, "r+b") as f:
        f.seek(unit.tensors[0].offset + 3)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    budget = None if resident else max(u.nbytes for u in meta.units)  # one slot, all streamed
    with pytest.raises(FormatError, match=f"checksum .*unit {unit.name}"):
        with LLM(str(d), vram_budget=budget, prefetch_window=1) as m:
            assert not resident and m.plan.resident_offsets == {}
            m.generate("x", GREEDY)


def test_resident_units_are_read_once(llm, tiny):
    """By default the whole (small) model is resident: a generation reads nothing from storage.
    With a budget the planner pins what fits (embed and head first) and streams the rest through
    the window's slots (here one), reading the streamed units every step (plus what the window has
    read ahead of the next step); the tokens are the same."""
    meta = llm.meta
    assert llm.plan.streamed == () and llm.loader.bytes_read == meta.total_bytes
    want = llm.generate("resident", GREEDY)
    assert llm.loader.bytes_read == meta.total_bytes  # not one unit re-read
    block = max(u.nbytes for u in meta.units[1:-1])
    budget = meta.units[0].nbytes + meta.units[-1].nbytes + block  # embed, head and one slot
    with LLM(str(tiny[1]), vram_budget=budget, prefetch_window=1) as m:
        assert m.plan.resident_names == ["embed", "head"] and m.plan.num_slots == 1
        out = m.generate("resident", GREEDY)
        assert out.token_ids == want.token_ids and out.text == want.text
        m.prefetch.close()  # the reader stops; what it read ahead of the next step is counted
        read = m.loader.bytes_read - m.plan.resident_bytes
        ahead = m.meta.units[m.plan.streamed[0]].nbytes
        assert read in (GREEDY.max_tokens * m.plan.streamed_bytes_per_pass,
                        GREEDY.max_tokens * m.plan.streamed_bytes_per_pass + ahead)
    with LLM(str(tiny[1]), vram_budget="1GiB") as m:  # sizes as the CLI takes them
        assert m.plan.streamed == () and m.generate("resident", GREEDY).token_ids == want.token_ids
    with pytest.raises(ValueError, match="too small"):
        LLM(str(tiny[1]), vram_budget=4096)
    with pytest.raises(ValueError, match="must be a positive number of bytes"):
        LLM(str(tiny[1]), vram_budget=-5)


def test_buffered_io_gives_the_same_tokens(llm, tiny):
    with LLM(str(tiny[1]), io="buffered") as m:
        assert m.generate("io", GREEDY).token_ids == llm.generate("io", GREEDY).token_ids


def test_constructor_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match="device must be cpu or cuda"):
        LLM(str(tiny[1]), device="tpu")
    with pytest.raises(ValueError, match="io must be"):
        LLM(str(tiny[1]), io="mmap")
    with pytest.raises((FileNotFoundError, FormatError)):
        LLM(str(tmp_path / "nope"))
    assert gdsllm.SamplingParams is SamplingParams and gdsllm.LLM is LLM


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "gdsllm", "generate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_only_the_text(llm, tiny):
    d = str(tiny[1])
    runs = concurrently(*(functools.partial(_cli, *args) for args in [
        ("-m", d, "-p", "hello", "-n", "8", "--temp", "0"),
        ("-v", "-m", d, "-p", "hello", "-n", "8", "--temp", "0"),
        ("-v", "-m", d, "-p", "hello", "-n", "8", "--temp", "0", "--single-process"),
        ("-m", d, "-p", "hello", "--chat", "-n", "6", "--temp", "0.7", "--seed", "5"),
        ("-m", d, "-p", "hello", "--top-p", "1.5"),
        ("-m", d, "-p", "")]))
    want = llm.generate("hello", SamplingParams(max_tokens=8, temperature=0))
    r = runs[0]
    assert r.returncode == 0, r.stderr
    assert r.stdout == want.text + "\n" and r.stderr == ""  # quiet by default
    r = runs[1]
    assert r.returncode == 0 and r.stdout == want.text + "\n", r.stderr
    assert "gdsllm.service.coordinator" in r.stderr  # -v: the pipeline's logs go to stderr
    r = runs[2]
    assert r.returncode == 0 and r.stdout == want.text + "\n", r.stderr
    assert "gdsllm.engine.llm" in r.stderr
    want = llm.generate([{"role": "user", "content": "hello"}],
                        SamplingParams(max_tokens=6, temperature=0.7, seed=5))
    r = runs[3]
    assert r.returncode == 0 and r.stdout == want.text + "\n", r.stderr
    r = runs[4]
    assert r.returncode == 1 and r.stdout == "" and "--top-p must be in (0, 1]" in r.stderr
    r = runs[5]
    assert r.returncode == 1 and "empty prompt" in r.stderr


@pytest.mark.slow
def test_smollm2_streamed_from_disk_matches_transformers():
    """The real model, every unit read with O_DIRECT into one buffer: raw and chat prompts in one
    batch, 32 greedy tokens each equal to transformers'; a third request (the chat prompt without
    ignore_eos) in the same passes ends at <|im_end|> as transformers' generate does."""
    hf, tok, d = smollm2()
    prompts = ["Once upon a time,", [{"role": "user", "content": "Name three colors."}]]
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    with LLM(str(d)) as m:
        assert m.io_path == "posix"
        outs = m.generate(prompts + [prompts[1]],
                          [greedy, greedy, SamplingParams(max_tokens=32, temperature=0)])
    assert outs[0].prompt_token_ids == tok(prompts[0]).input_ids
    assert outs[1].prompt_token_ids == tok.apply_chat_template(
        prompts[1], add_generation_prompt=True, tokenize=True, return_dict=False)
    for o in outs[:2]:
        assert o.token_ids == greedy_reference(hf, o.prompt_token_ids, 32)
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
    eos = m.meta.params.eos_token_ids
    ref = outs[1].token_ids
    end = next(i for i, t in enumerate(ref) if t in eos)  # SmolLM2 answers in < 32 tokens
    assert outs[2].finish_reason == "stop" and outs[2].token_ids == ref[: end + 1]
    assert outs[2].text == tok.decode(ref[:end], skip_special_tokens=True)


@pytest.mark.slow
def test_cli_default_model(smollm2_model, xdg_cache):
    """Without -m: the embedded SmolLM2 (kept quantized), from the cache this run converted it
    into (the conversion itself: test_convert_default)."""
    with LLM(str(smollm2_model)) as m:
        assert any(t.quant is not None for u in m.meta.units for t in u.tensors)
        want = m.generate("The sky is", SamplingParams(max_tokens=4, temperature=0)).text
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(xdg_cache))
    r = subprocess.run([sys.executable, "-m", "gdsllm", "generate", "-v", "-p", "The sky is", "-n", "4",
                        "--temp", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n" and "converting the default model" not in r.stderr
    assert str(smollm2_model) in r.stderr  # the coordinator's "serving <model>" line


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_smollm2_cuda_llm_matches_transformers(dtype, smollm2_converted):
    """LLM on CUDA (KvikIO into a CUDA buffer, or O_DIRECT + copy) in float16 / bfloat16: 32
    greedy tokens equal transformers' on the same device with the same rounded weights, or part
    at a near-tie of transformers' own logits."""
    from gdsllm.format.metadata import DTYPES
    from llama_ref import NEAR_TIE, assert_same_or_near_tie, greedy_reference_scores
    hf = smollm2_hf("cuda", DTYPES[dtype])
    d = smollm2_converted(dtype)
    prompts = ["The capital of France is", [{"role": "user", "content": "What is 2+2?"}]]
    with LLM(str(d), device="cuda") as m:
        assert m.dtype == DTYPES[dtype]
        # one at a time: the same GEMM shapes as transformers, hence the same kernels
        outs = [m.generate(p, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
                for p in prompts]
    for o in outs:  # our default attention kernels are not transformers' (cuDNN): see test_model
        ref, ref_logits = greedy_reference_scores(hf, o.prompt_token_ids, 32)
        assert_same_or_near_tie(o.token_ids, ref, ref_logits, NEAR_TIE[dtype], (dtype, o.text))
    assert torch.cuda.is_available()
