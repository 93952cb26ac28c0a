"""The KV cache of one sequence: per decoder layer, keys and values grown by doubling.

    cache = KVCache(num_layers=30, kv_heads=3, head_dim=64, dtype=torch.float32, device="cpu",
                    max_len=8192)
    k_all, v_all = cache.update(layer, k_new, v_new)   # [kv_heads, length + n, head_dim] views
    ...                                                # every layer of this pass appends n tokens
    cache.advance(n)                                   # then the pass commits them
    cache.truncate(m)                                  # roll back to the first m tokens

Nothing is preallocated for the full context: capacity starts small and doubles (capped at
`max_len`), so a short chat costs kilobytes, not the model's whole context window.
"""
from __future__ import annotations

import torch

MIN_CAPACITY = 16  # tokens; the first allocation of a layer


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, max_len: int):
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.device, self.max_len = torch.device(device), max_len
        self.length = 0  # committed tokens (those every layer holds)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def _grow(self, layer: int, need: int) -> None:
        old = self.k[layer]
        cap = 0 if old is None else old.shape[1]
        if need <= cap:
            return
        new_cap = max(MIN_CAPACITY, cap)
        while new_cap < need:
            new_cap *= 2
        new_cap = min(new_cap, max(self.max_len, need))
        shape = (self.kv_heads, new_cap, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if old is not None:  # doubling: amortized O(1) copies per token
            k[:, : self.length] = old[:, : self.length]
            v[:, : self.length] = self.v[layer][:, : self.length]
        self.k[layer], self.v[layer] = k, v

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write n new keys/values ([kv_heads, n, head_dim]) after the committed tokens of `layer`;
        return views of all keys/values of that layer, new ones included."""
        n = k.shape[1]
        assert k.shape == v.shape == (self.kv_heads, n, self.head_dim), (k.shape, v.shape)
        end = self.length + n
        assert end <= self.max_len, (end, self.max_len)
        self._grow(layer, end)
        self.k[layer][:, self.length:end] = k
        self.v[layer][:, self.length:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, n: int) -> None:
        """Commit the n tokens every layer has appended in this pass."""
        self.length += n
        assert self.length <= self.max_len

    def truncate(self, n: int) -> None:
        """Forget every token after the first `n` (speculative decoding's rejected drafts); the
        next update overwrites them. Capacity is kept."""
        assert 0 <= n <= self.length, (n, self.length)
        self.length = n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
