"""Perplexity of a model over a text, as llama.cpp users measure a quantization.

The text is tokenized without special tokens and cut into non-overlapping windows of `ctx`
tokens (the last, partial window is dropped). In each window every token after the first is
scored given the tokens before it in that window; P = exp(mean negative log-likelihood) over all
those N = windows * (ctx - 1) tokens. The definition needs nothing of GdsLLM, so anyone can check
it against transformers on the same windows (tests/test_perplexity.py does).

    ppl, n = perplexity(LLM("~/models/x"), text, ctx=512)
"""
from __future__ import annotations

import math

import torch


def windows(ids: list[int], ctx: int) -> list[list[int]]:
    """Non-overlapping windows of `ctx` tokens; the last partial window is dropped."""
    if ctx < 2:
        raise ValueError(f"--ctx must be at least 2 tokens, got {ctx}")
    return [ids[i: i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)]


def window_nll(logits: torch.Tensor, window: list[int]) -> float:
    """Sum of -log p(token i | tokens < i) for i >= 1, from the float32 logits of every position."""
    target = torch.tensor(window[1:], dtype=torch.long, device=logits.device)
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(1, target[:, None]).sum())


def perplexity(llm, text: str, ctx: int = 512, max_windows: int | None = None,
               where: str = "text") -> tuple[float, int]:
    """(perplexity, scored tokens) of `llm` (a gdsllm.LLM) over `text`; see the module docstring.
    `max_windows` scores only the first windows (tests keep CPU time small)."""
    if llm.tokenizer is None:
        raise ValueError(f"{llm.meta.root}: the model has no tokenizer; perplexity needs one")
    p = llm.meta.params
    if ctx > p.max_position_embeddings:
        raise ValueError(f"--ctx {ctx} exceeds the model's context of {p.max_position_embeddings}")
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    wins = windows(ids, ctx)
    if max_windows is not None:
        wins = wins[:max_windows]
    if not wins:
        raise ValueError(f"{where}: {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    nll = sum(window_nll(llm.logits(w), w) for w in wins)
    n = len(wins) * (ctx - 1)
    return math.exp(nll / n), n
