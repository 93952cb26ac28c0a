"""Perplexity of a model over a text, as llama.cpp users measure a quantization.

The text is tokenized without special tokens and cut into non-overlapping windows of `ctx`
tokens (the last, partial window is dropped). In each window every token after the first is
scored given the tokens before it in that window; P = exp(mean negative log-likelihood) over all
those N = windows * (ctx - 1) tokens. The definition needs nothing of GdsLLM, so anyone can check
it against transformers on the same windows (tests/test_perplexity.py does).

A model whose tokenizer adds a BOS token to a text (Gemma, Llama; its tokenizer.json's
post-processor, from the GGUF's `add_bos_token`) is scored as llama.cpp's `llama-perplexity`
lays it out: the ids are BOS + the text's tokens, cut as above, and each window's first token is
BOS (in every window after the first it replaces a text token, which is then not scored). A model
of that kind sees no text that does not start with BOS in training: without it Gemma 3 270M
scores GPL-3 several times worse. llama.cpp then scores only the second half of each window; this
scores every position after the first, or with `second_half` (`--second-half`) the tokens
llama.cpp scores: in each window those after position ctx/2 (ctx - 1 - ctx/2 of them), so the
two figures are of the same tokens.

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


def window_nll(logits: torch.Tensor, window: list[int], first: int = 0) -> float:
    """Sum of -log p(token i | tokens < i) for i > first, from the float32 logits of every
    position."""
    target = torch.tensor(window[first + 1:], dtype=torch.long, device=logits.device)
    logp = torch.log_softmax(logits[first:-1].double(), dim=-1)
    return float(-logp.gather(1, target[:, None]).sum())


def bos_to_add(tokenizer, bos_token_id: int | None) -> int | None:
    """The BOS id when `tokenizer` adds it in front of a text (as the model was trained), else None."""
    if bos_token_id is None:
        return None
    ids = tokenizer.encode("a", add_special_tokens=True)
    return bos_token_id if ids and ids[0] == bos_token_id else None


def scored_windows(ids: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    """The windows scored for text token ids `ids` (see the module docstring for the BOS layout)."""
    if bos is None:
        return windows(ids, ctx)
    return [[bos] + w[1:] for w in windows([bos] + ids, ctx)]


def perplexity(llm, text: str, ctx: int = 512, max_windows: int | None = None,
               where: str = "text", progress=None, second_half: bool = False) -> tuple[float, int]:
    """(perplexity, scored tokens) of `llm` (a gdsllm.LLM) over `text`; see the module docstring.
    `max_windows` scores only the first windows (tests keep CPU time small); `progress(done,
    total)` is called after each window; `second_half` scores llama.cpp's tokens only."""
    if llm.tokenizer is None:
        raise ValueError(f"{llm.meta.root}: the model has no tokenizer; perplexity needs one")
    p = llm.meta.params
    if ctx > p.max_position_embeddings:
        raise ValueError(f"--ctx {ctx} exceeds the model's context of {p.max_position_embeddings}")
    if second_half and ctx < 3:
        raise ValueError(f"--second-half needs --ctx of at least 3 (it scores the tokens after the "
                         f"middle of each window), got {ctx}")
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    wins = scored_windows(ids, ctx, bos_to_add(llm.tokenizer, p.bos_token_id))
    if max_windows is not None:
        wins = wins[:max_windows]
    if not wins:
        raise ValueError(f"{where}: {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    first = ctx // 2 if second_half else 0
    nll = 0.0
    for i, w in enumerate(wins):
        nll += window_nll(llm.logits(w), w, first)
        if progress is not None:
            progress(i + 1, len(wins))
    n = len(wins) * (ctx - 1 - first)
    return math.exp(nll / n), n
