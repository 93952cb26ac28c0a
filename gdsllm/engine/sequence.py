"""One generation request inside the coordinator: its validated parameters, its tokens, and the
text it has produced so far (incremental detokenization, stop strings, max_tokens, eos).

    seq = Sequence.from_request(msg, client, seq_id, tokenizer, eos_ids, max_context)  # ValueError
    delta = seq.append(token_id)      # text safe to stream now ("" while held back)
    if seq.finish_reason: ...         # "stop" (eos or a stop string) or "length"

The coordinator owns the scheduling; this module only keeps one request's books.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ipc.messages import Final, Generate, SeqSampling

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def validate_request(msg: Generate) -> None:
    """Raise ValueError with a clear message for what no sampler should see: the service's own
    limits here, the sampling values through the compute engine's SamplingParams.validate()."""
    rid = msg.request_id
    if len(msg.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_CHARS for s in msg.stop):
        raise ValueError(f"request {rid}: stop takes at most {MAX_STOP_STRINGS} non-empty strings "
                         f"of at most {MAX_STOP_CHARS} characters")
    if msg.messages is not None:
        if not msg.messages:
            raise ValueError(f"request {rid}: messages is empty")
        for m in msg.messages:
            if m.role not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"request {rid}: unknown chat role {m.role!r}")
    from gdsllm.engine.sampling import SamplingParams
    try:
        SamplingParams(temperature=msg.temperature, top_p=msg.top_p, top_k=msg.top_k, seed=msg.seed,
                       max_tokens=msg.max_tokens, stop=tuple(msg.stop),
                       draft_tokens=msg.draft_tokens).validate()
    except (TypeError, ValueError) as e:
        raise ValueError(f"request {rid}: {e}") from None


def encode_prompt(msg: Generate, tokenizer) -> list[int]:
    """Token ids of the prompt (raw completion) or of the chat messages through the template,
    exactly as gdsllm.LLM makes them."""
    if msg.messages is not None:
        return tokenizer.encode_chat([{"role": m.role, "content": m.content} for m in msg.messages])
    return list(tokenizer.encode(msg.prompt))


@dataclass
class Sequence:
    """The coordinator's books on one request (client identity + request id)."""

    seq_id: int
    client: bytes
    request: Generate
    prompt_ids: list[int]
    tokenizer: object
    eos_ids: frozenset[int]
    max_new: int  # max_tokens, capped by the model's context length
    arrived: float = field(default_factory=time.perf_counter)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # detokenized so far (before stop-string truncation)
    emitted: int = 0  # characters of `text` already streamed
    finish_reason: str | None = None
    cancelled: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    detok: object = None  # the tokenizer's IncrementalDetokenizer, primed with the prompt

    def __post_init__(self):
        if self.detok is None:
            self.detok = self.tokenizer.detokenizer(self.prompt_ids)

    @property
    def key(self) -> tuple[bytes, str]:
        return self.client, self.request.request_id

    def sampling(self) -> SeqSampling:
        r = self.request
        return SeqSampling(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, seed=r.seed)

    def append(self, token: int) -> str:
        """Record a sampled token; returns the text delta that may be streamed now. Same rules as
        gdsllm.LLM: eos ends without text, a stop string ends before it, then max_tokens."""
        assert self.finish_reason is None, f"request {self.request.request_id} already finished"
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        self.token_ids.append(int(token))
        if int(token) in self.eos_ids and not self.request.ignore_eos:
            self.text += self.detok.flush()  # bytes of an unfinished character, as LLM shows them
            return self._finish("stop", len(self.text))
        stops = self.request.stop
        start = max(0, len(self.text) - max(map(len, stops), default=0))
        self.text += self.detok.push(int(token))
        hits = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        if hits:  # the stop string and what follows it are not part of the output
            return self._finish("stop", min(hits))
        if len(self.token_ids) >= self.max_new:
            self.text += self.detok.flush()
            return self._finish("length", len(self.text))
        # Hold back a tail that could still grow into a stop string.
        hold = max(map(len, stops), default=1) - 1
        return self._emit(len(self.text) - hold)

    def _finish(self, reason: str, upto: int) -> str:
        self.finish_reason = reason
        self.text = self.text[: max(upto, self.emitted)]
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted: upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta

    def final(self, finish_reason: str | None = None) -> Final:
        now = time.perf_counter()
        reason = finish_reason or self.finish_reason or "stop"
        ttft = (self.first_token_at - self.arrived) if self.first_token_at else 0.0
        return Final(request_id=self.request.request_id, text=self.text[: self.emitted]
                     if reason == "cancelled" else self.text, token_ids=list(self.token_ids),
                     finish_reason=reason, prompt_tokens=len(self.prompt_ids),
                     completion_tokens=len(self.token_ids), time_to_first_token_s=ttft,
                     duration_s=now - self.arrived)
