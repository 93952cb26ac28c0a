"""Admission control: which requests may take KV-cache memory now, and which clients must wait.

    adm = Admission.for_model(meta, config, free_bytes=None)   # budget from --kv-budget or free memory
    key = caller_key(client, msg.caller)            # the ZeroMQ client, or (client, the caller it serves)
    why = adm.refuse(key, waiting=len(queue))      # "busy" reason, or None (then adm.enter(key))
    why = adm.never_fits(seq)                      # "bad_request" reason: larger than the whole budget
    if adm.fits(seq): adm.reserve(seq)             # at admission into the running batch
    adm.release(seq); adm.leave(key)               # when it finishes, fails or is cancelled

A request is admitted into the batch only when the KV cache of its prompt plus its max_tokens fits
beside what the running requests hold, so an out-of-memory cannot fail a whole pass; the rest wait
in order. The in-flight cap (--max-inflight-per-client) counts per caller: a ZeroMQ client, or
for a front end that serves many (the HTTP API), each caller it names in Generate.caller (an API
key, or a connection when there is no key), so one HTTP caller cannot lock the others out. A
client naming callers gains nothing it could not get by opening more sockets.

The reservation is whole blocks of the compute worker's paged KV cache
(gdsllm.models.kv_cache), whose size the worker reports in ArenaOpened: `kv_cache_tokens` below,
from `--kv-budget` or else the VRAM ledger's share of the memory left once the arena is allocated
(gdsllm.engine.budget, the same rule as gdsllm.LLM's); at most --max-batch whole contexts.
"""
from __future__ import annotations

from collections import Counter

from gdsllm.engine.budget import kv_tokens
from gdsllm.models.kv_cache import BLOCK_SIZE, blocks_for, kv_bytes_per_token


def kv_cache_tokens(meta, config, free_bytes: int | None, extra_per_token: int = 0) -> int:
    """Tokens of the compute worker's KV cache, by the VRAM ledger's rule (gdsllm.engine.budget
    kv_tokens): --kv-budget, or a share of the memory left once the arena is allocated."""
    return kv_tokens(meta.params, _itemsize(meta, config), device=config.device, free_bytes=free_bytes,
                     kv_budget=config.kv_budget, max_batch=config.max_batch, extra_per_token=extra_per_token)


def _itemsize(meta, config) -> int:
    from gdsllm.format.metadata import ITEMSIZE
    return 4 if config.device == "cpu" else ITEMSIZE[meta.dtype]  # engine.runner.compute_dtype


def caller_key(client: bytes, caller: str | None) -> bytes:
    """Whom the in-flight cap counts a request against: its ZeroMQ client identity, or that and
    the caller a front end sends it for."""
    return client if caller is None else client + b"\0" + caller.encode("utf-8", "replace")


class Admission:
    def __init__(self, budget: int, per_token: int, max_context: int, per_client: int,
                 max_waiting: int, block_size: int = BLOCK_SIZE):
        self.budget, self.per_token, self.max_context = budget, per_token, max_context
        self.block_size = block_size
        self.per_client, self.max_waiting = per_client, max_waiting
        self.reserved = 0
        self.held: dict[int, int] = {}  # seq_id -> bytes reserved
        self.clients: Counter[bytes] = Counter()  # requests in flight per client identity

    @classmethod
    def for_model(cls, meta, config, free_bytes: int | None = None, opened=None) -> "Admission":
        """The budget is the KV cache the compute worker reported (`opened`: its ArenaOpened),
        else what kv_cache_tokens gives."""
        p = meta.params
        per_token = kv_bytes_per_token(p, _itemsize(meta, config))
        if opened is not None and opened.kv_tokens:
            tokens, block = opened.kv_tokens, opened.kv_block_size or BLOCK_SIZE
        else:
            tokens, block = kv_cache_tokens(meta, config, free_bytes), BLOCK_SIZE
        return cls(tokens * per_token, per_token, p.max_position_embeddings,
                   config.max_inflight_per_client, config.max_waiting, block)

    # ------------------------------------------------------------------ clients and the queue

    def refuse(self, client: bytes, waiting: int, pending: int = 0) -> str | None:
        """Why a new request of `client` gets Error(busy) now, or None. `pending`: its requests not
        entered yet (being tokenized), counted as in flight."""
        if self.clients[client] + pending >= self.per_client:
            return (f"this client already has {self.per_client} requests in flight "
                    f"(--max-inflight-per-client); wait for one to finish")
        if waiting >= self.max_waiting:
            return f"{self.max_waiting} requests are already waiting; try again later"
        return None

    def enter(self, client: bytes) -> None:
        self.clients[client] += 1

    def leave(self, client: bytes) -> None:
        self.clients[client] -= 1
        if self.clients[client] <= 0:
            del self.clients[client]

    # ------------------------------------------------------------------ KV memory

    def need(self, seq) -> int:
        """Bytes of the KV-cache blocks `seq` takes with its prompt and every token it may generate."""
        n = len(seq.prompt_ids) + seq.max_new
        return blocks_for(n, self.block_size) * self.block_size * self.per_token

    def never_fits(self, seq) -> str | None:
        need = self.need(seq)
        if need <= self.budget:
            return None
        return (f"request {seq.request.request_id}: its prompt ({len(seq.prompt_ids)} tokens) plus "
                f"max_tokens ({seq.max_new}) need {need} bytes of KV cache, more than the whole "
                f"{self.budget}-byte budget (--kv-budget); lower max_tokens or shorten the prompt")

    def fits(self, seq) -> bool:
        return self.reserved + self.need(seq) <= self.budget

    def reserve(self, seq) -> None:
        n = self.need(seq)
        self.held[seq.seq_id] = n
        self.reserved += n

    def release(self, seq) -> None:
        self.reserved -= self.held.pop(seq.seq_id, 0)
