"""Request rules, written once for both engines (gdsllm.LLM and the service's coordinator): what a
valid prompt is, when a generation stops, and which text may be streamed while it runs.

    ids = prompt_ids("Once upon a time", tokenizer, meta.params, "prompt")   # ValueError if bad
    gen = Generation(ids, SamplingParams(max_tokens=32, stop=("\\n",)), eos_ids, max_context, detok)
    delta = gen.append(token_id)      # text safe to stream now ("" while held back)
    if gen.finish_reason: ...         # "stop" (eos, a stop id or a stop string) or "length"

    validate_request(msg)             # a Generate off the wire: the service's limits + sampling
    seq = Sequence(seq_id, client, msg, ids, tokenizer, eos_ids, max_context)  # the coordinator's books

Stop rules: an end-of-sequence id (unless ignore_eos) or a stop token id ends the generation, in
`token_ids`, not in the text; a stop string ends the text right before it (also across tokens)
and is never streamed: the tail of the text that could still grow into one is held back;
max_tokens, capped by the room left in the model's context, ends it with "length".
"""
from __future__ import annotations

import time

from gdsllm.engine.sampling import SamplingParams
from gdsllm.format.metadata import LlamaParams
from ipc.messages import Final, Generate, SeqSampling

MAX_STOP_STRINGS = 16  # the service's limits on what one request may ask for
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
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


def sampling_params(msg: Generate) -> SamplingParams:
    """The engine's SamplingParams of a wire request (not validated: see validate_request)."""
    return SamplingParams(temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k,
                          seed=msg.seed, max_tokens=msg.max_tokens, stop=tuple(msg.stop),
                          stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                          draft_tokens=msg.draft_tokens, draft_tree=msg.draft_tree)


def validate_request(msg: Generate) -> None:
    """Raise ValueError with a clear message for what no sampler should see: the service's own
    limits here, the sampling values through SamplingParams.validate() (as gdsllm.LLM does)."""
    rid = msg.request_id
    if len(msg.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in msg.stop):
        raise ValueError(f"request {rid}: stop takes at most {MAX_STOP_STRINGS} non-empty strings "
                         f"of at most {MAX_STOP_CHARS} characters")
    if len(msg.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"request {rid}: stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids")
    if msg.messages is not None:
        check_messages(_dicts(msg), f"request {rid}")
    try:
        sampling_params(msg).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"request {rid}: {e}") from None


def _dicts(msg: Generate) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in msg.messages]


def encode_prompt(msg: Generate, tokenizer, params: LlamaParams) -> list[int]:
    """Token ids of the request's prompt or chat messages, checked, exactly as gdsllm.LLM makes them."""
    prompt = msg.prompt if msg.messages is None else _dicts(msg)
    return prompt_ids(prompt, tokenizer, params, f"request {msg.request_id}")


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
    without a tokenizer (then only token ids are produced)."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, eos_ids, max_context: int,
                 detok=None):
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


class Sequence(Generation):
    """The coordinator's books on one request: a Generation plus who asked (client identity and
    request id), its timings, and the message it came in."""

    def __init__(self, seq_id: int, client: bytes, request: Generate, prompt_ids: list[int],
                 tokenizer, eos_ids, max_context: int):
        super().__init__(prompt_ids, sampling_params(request), eos_ids, max_context,
                         tokenizer.detokenizer(prompt_ids))
        self.seq_id, self.client, self.request = seq_id, client, request
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.cancelled = False

    @property
    def key(self) -> tuple[bytes, str]:
        return self.client, self.request.request_id

    def sampling(self) -> SeqSampling:
        r = self.request
        return SeqSampling(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=r.seed,
                           draft_tree=r.draft_tree)

    def append(self, token: int) -> str:
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        return super().append(token)

    def final(self, finish_reason: str | None = None) -> Final:
        now = time.perf_counter()
        reason = finish_reason or self.finish_reason or "stop"
        ttft = (self.first_token_at - self.arrived) if self.first_token_at else 0.0
        return Final(request_id=self.request.request_id, text=self.text[: self.emitted]
                     if reason == "cancelled" else self.text, token_ids=list(self.token_ids),
                     finish_reason=reason, prompt_tokens=len(self.prompt_ids),
                     completion_tokens=len(self.token_ids), time_to_first_token_s=ttft,
                     duration_s=now - self.arrived)
