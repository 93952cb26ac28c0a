"""The service's requests: a Generate off the wire checked against the service's limits, turned
into the engine's SamplingParams and token ids by the rules gdsllm.LLM applies
(gdsllm.engine.sequence), and the coordinator's books on it (`Sequence`: a Generation plus who
asked, its timings and its Final).

    validate_request(msg)             # ValueError: the service's limits + the sampling values
    ids = encode_prompt(msg, tokenizer, meta.params)
    seq = Sequence(seq_id, client, msg, ids, tokenizer, eos_ids, max_context)
    seq.final() -> Final
"""
from __future__ import annotations

import time

from ipc.messages import Final, Generate

from gdsllm.engine.sampling import SamplingParams
from gdsllm.engine.sequence import Generation, check_messages, prompt_ids
from gdsllm.format.metadata import LlamaParams

MAX_STOP_STRINGS = 16  # the service's limits on what one request may ask for
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64


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


class Sequence(Generation):
    """The coordinator's books on one request: a Generation plus who asked (client identity and
    request id), its timings, and the message it came in."""

    def __init__(self, seq_id: int, client: bytes, request: Generate, prompt_ids: list[int],
                 tokenizer, eos_ids, max_context: int):
        super().__init__(prompt_ids, sampling_params(request), eos_ids, max_context,
                         tokenizer.detokenizer(prompt_ids), seq_id)
        self.client, self.request = client, request
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    @property
    def key(self) -> tuple[bytes, str]:
        return self.client, self.request.request_id

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
