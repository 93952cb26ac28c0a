"""Admission control at the door: which clients must wait. What joins a weight pass, and when its
KV cache fits, is the engine scheduler's (gdsllm.engine.scheduler).

    adm = Admission(per_client=8, max_waiting=256)  # --max-inflight-per-client, --max-waiting
    key = caller_key(client, msg.caller)            # the ZeroMQ client, or (client, the caller it serves)
    why = adm.refuse(key, waiting=len(queue))      # "busy" reason, or None (then adm.enter(key))
    adm.leave(key)                                 # when it finishes, fails or is cancelled

The in-flight cap (--max-inflight-per-client) counts per caller: a ZeroMQ client, or for a front
end that serves many (the HTTP API), each caller it names in Generate.caller (an API key, or a
connection when there is no key), so one HTTP caller cannot lock the others out. A client naming
callers gains nothing it could not get by opening more sockets.

The compute worker's paged KV cache holds `kv_cache_tokens` tokens: `--kv-budget`, or else the
VRAM ledger's share of the memory left once the arena is allocated (gdsllm.engine.budget, the
same rule as gdsllm.LLM's); at most --max-batch whole contexts.
"""
from __future__ import annotations

from collections import Counter

from gdsllm.engine.budget import kv_tokens


def kv_cache_tokens(meta, config, free_bytes: int | None, extra_per_token: int = 0) -> int:
    """Tokens of the compute worker's KV cache, by the VRAM ledger's rule (gdsllm.engine.budget
    kv_tokens): --kv-budget, or a share of the memory left once the arena is allocated."""
    return kv_tokens(meta.params, kv_itemsize(meta, config), device=config.device, free_bytes=free_bytes,
                     kv_budget=config.kv_budget, max_batch=config.max_batch, extra_per_token=extra_per_token)


def kv_itemsize(meta, config) -> int:
    """Bytes of one KV element in the compute worker."""
    from gdsllm.format.metadata import ITEMSIZE
    return 4 if config.device == "cpu" else ITEMSIZE[meta.dtype]  # engine.runner.compute_dtype


def caller_key(client: bytes, caller: str | None) -> bytes:
    """Whom the in-flight cap counts a request against: its ZeroMQ client identity, or that and
    the caller a front end sends it for."""
    return client if caller is None else client + b"\0" + caller.encode("utf-8", "replace")


class Admission:
    def __init__(self, per_client: int, max_waiting: int):
        self.per_client, self.max_waiting = per_client, max_waiting
        self.clients: Counter[bytes] = Counter()  # requests in flight per client identity

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
