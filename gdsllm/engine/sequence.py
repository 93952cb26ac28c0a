"""Request rules, written once for both engines (gdsllm.LLM and the service's coordinator): what a
valid prompt is, when a generation stops, and which text may be streamed while it runs.

    ids = prompt_ids("Once upon a time", tokenizer, meta.params, "prompt")   # ValueError if bad
    gen = Generation(ids, SamplingParams(max_tokens=32, stop=("\\n",)), eos_ids, max_context, detok)
    delta = gen.append(token_id)      # text safe to stream now ("" while held back)
    if gen.finish_reason: ...         # "stop" (eos, a stop id or a stop string) or "length"

The service's requests (gdsllm.service.requests.Sequence) are Generations with who asked.

Stop rules: an end-of-sequence id (unless ignore_eos) or a stop token id ends the generation, in
`token_ids`, not in the text; a stop string ends the text right before it (also across tokens)
and is never streamed: the tail of the text that could still grow into one is held back;
max_tokens, capped by the room left in the model's context, ends it with "length".
"""
from __future__ import annotations

from gdsllm.engine.sampling import SamplingParams
from gdsllm.format.metadata import LlamaParams

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages, where: str) -> None:
    """Chat messages: a non-empty list of {"role": one of ROLES, "content": ...} dicts."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "content" not in m or m.get("role") not in ROLES:
            raise ValueError(f"{where}: chat message {i} ({m!r:.80}) needs a role among "
                             f"{', '.join(ROLES)} and a content")


def prompt_ids(prompt, tokenizer, params: LlamaParams, where: str) -> list[int]:
    """Token ids of a prompt: text (raw completion), chat messages (through the chat template) or
    token ids. ValueError naming `where` if it is empty, outside the vocabulary, or leaves no room
    in the model's context for one new token."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{where}: empty prompt")
        ids = _tokenizer(tokenizer, where).encode(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        check_messages(prompt, where)
        ids = _tokenizer(tokenizer, where).encode_chat(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < params.vocab_size]
        if bad:
            raise ValueError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {params.vocab_size})")
    else:
        raise ValueError(f"{where}: a prompt is a string, a list of token ids or a list of chat "
                         f"messages, got {type(prompt).__name__}")
    if not ids:
        raise ValueError(f"{where}: empty prompt (no tokens)")
    if len(ids) >= params.max_position_embeddings:
        raise ValueError(f"{where}: prompt of {len(ids)} tokens does not fit the model's context "
                         f"of {params.max_position_embeddings} tokens (room is needed for one more)")
    return ids


def _tokenizer(tokenizer, where: str):
    if tokenizer is None:
        raise ValueError(f"{where}: the model has no tokenizer; pass token ids")
    return tokenizer


def stop_holdback(text: str, stops) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Generation:
    """One request's output: its tokens, its text (incremental detokenization) and when it ends.

    `detok` is the tokenizer's IncrementalDetokenizer primed with the prompt, or None for a model
    without a tokenizer (then only token ids are produced). `seq_id` names it to the scheduler
    (gdsllm.engine.scheduler) and the executors; `params` are what its sampler and draft use."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, eos_ids, max_context: int,
                 detok=None, seq_id: int = 0):
        self.seq_id, self.params = seq_id, params
        self.cancelled = False
        self.prompt_ids = list(prompt_ids)
        self.stop = tuple(params.stop)
        self.end_ids = frozenset(params.stop_token_ids) | frozenset(() if params.ignore_eos else eos_ids)
        self.max_new = min(params.max_tokens, max_context - len(self.prompt_ids))
        self.detok = detok
        self.token_ids: list[int] = []
        self.text = ""  # detokenized so far (cut before a stop string once one is found)
        self.emitted = 0  # characters of `text` already streamed
        self.finish_reason: str | None = None

    def append(self, token: int) -> str:
        """Record a sampled token; returns the text delta that may be streamed now."""
        assert self.finish_reason is None, "the generation already finished"
        t = int(token)
        self.token_ids.append(t)
        if t in self.end_ids:
            return self._finish("stop")
        if self.detok is not None:
            start = max(0, len(self.text) - max(map(len, self.stop), default=0))
            self.text += self.detok.push(t)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:  # the stop string and what follows it are not part of the output
                self.finish_reason = "stop"
                self.text = self.text[: max(min(hits), self.emitted)]
                return self._emit(len(self.text))
        if len(self.token_ids) >= self.max_new:
            return self._finish("length")
        return self._emit(len(self.text) - stop_holdback(self.text, self.stop))

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        if self.detok is not None:
            self.text += self.detok.flush()  # bytes of an unfinished character, as decode() shows them
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted: upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta
