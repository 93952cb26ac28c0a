"""Every message that crosses a GdsLLM socket, in one place.

Clients talk to the coordinator (ZeroMQ DEALER -> ROUTER): those messages are here. The coordinator
drives the I/O worker and the compute worker (one PAIR socket each): those are defined in
`ipc.worker_messages` and re-exported here, so every message is importable from this module. All
are msgpack maps with a `type` tag, encoded and validated by `ipc.codec` (`encode(msg)`,
`decode(raw)`). Weight bytes never travel here: a LOAD says which unit goes into which arena slot,
and the bytes move from storage into the slot directly.

Units of fields: bytes for sizes and offsets, seconds for times.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .codec import ProtocolError, decode, encode, message  # noqa: F401  (re-exported)


# ---------------------------------------------------------------- client <-> coordinator


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@message("generate")
@dataclass(frozen=True)
class Generate:
    """Start a generation: exactly one of `prompt` (raw completion) or `messages` (chat)."""

    request_id: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    max_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = True
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    stop_token_ids: list[int] = field(default_factory=list)  # end it besides eos (checked by the engine)
    draft_tokens: int | None = None  # speculative decoding: None = the server's --draft-tokens, 0 = off
    draft_tree: int | None = None  # token-tree nodes per pass: None = the server's --draft-tree, 0 = a chain
    # Who a front end sends it for (the HTTP API: an API key's hash, or the caller's address:port):
    # the per-client in-flight cap counts (client, caller) pairs. None: the client itself.
    caller: str | None = None

    def __post_init__(self):
        _check_id(self.request_id)
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.caller is not None and not 1 <= len(self.caller) <= MAX_ID_CHARS:
            raise ValueError(f"caller must be 1 to {MAX_ID_CHARS} characters")


MAX_ID_CHARS = 128  # request ids are echoed in replies: bounded


def _check_id(request_id: str) -> None:
    if not request_id or len(request_id) > MAX_ID_CHARS:
        raise ValueError(f"request_id must be 1 to {MAX_ID_CHARS} characters")


@message("cancel")
@dataclass(frozen=True)
class Cancel:
    request_id: str

    def __post_init__(self):
        _check_id(self.request_id)


@message("health")
@dataclass(frozen=True)
class Health:
    request_id: str = "health"

    def __post_init__(self):
        _check_id(self.request_id)


@message("token")
@dataclass(frozen=True)
class TokenChunk:
    """Streamed output: the text delta and the token ids it came from."""

    request_id: str
    text: str
    token_ids: list[int]


@message("final")
@dataclass(frozen=True)
class Final:
    """The end of a generation. finish_reason: "stop", "length" or "cancelled"."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    duration_s: float


@message("error")
@dataclass(frozen=True)
class Error:
    """A request failed. code: "bad_request", "not_found", "worker_died", "internal", "busy"
    (queue full or the client's in-flight cap reached: retry later), "timeout" (its pass made no
    progress for the watchdog's deadline), "io_error" (a unit it needed could not be read or failed
    its checksum; the message names the file)."""

    request_id: str
    code: str
    message: str


@message("health_reply")
@dataclass(frozen=True)
class HealthReply:
    request_id: str
    status: str  # "ok"; "restarting" while dead workers are replaced; "degraded" when that failed
    model: str
    backend: str  # "cpu" or "cuda"
    io_path: str  # "gds", "compat", "posix" or "buffered"
    vram_budget_bytes: int
    resident_units: list[str]
    streamed_units: int
    prefetch_window: int
    requests_running: int
    requests_waiting: int
    detail: str = ""
    restarts: int = 0  # times the workers were replaced since start
    kv_budget_bytes: int = 0  # KV-cache memory that admission control hands out
    kv_reserved_bytes: int = 0


from .worker_messages import (  # noqa: F401, E402  (the workers' messages: one namespace)
    RESIDENT, ComputeReady, AttachArena, IoReady, MakeRunner, RunnerReady, Load, Loaded, SeqSampling,
    StartPass, Run, Done, PassResult, Routed, RunExperts, ExpertsDone, WorkerError,
    Shutdown)
