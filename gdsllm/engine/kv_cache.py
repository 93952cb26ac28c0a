"""The KV cache of one sequence: per decoder layer, keys and values grown by doubling; a
sliding-window layer keeps only the keys its window can still see.

    cache = KVCache(num_layers=30, kv_heads=3, head_dim=64, dtype=torch.float32, device="cpu",
                    max_len=8192)
    k_all, v_all = cache.update(layer, k_new, v_new)   # [kv_heads, length + n, head_dim] views
    ...                                                # every layer of this pass appends n tokens
    cache.advance(n)                                   # then the pass commits them
    cache.truncate(m)                                  # roll back to the first m tokens

Nothing is preallocated for the full context: capacity starts small and doubles (capped at
`max_len`), so a short chat costs kilobytes, not the model's whole context window.

A layer with a sliding window W (`windows[layer]`) needs only the last W - 1 committed tokens:
when its buffer is full it drops the older ones (one shift per W tokens, so O(1) amortized), and
its memory stays about 2 W tokens however long the generation runs. `update` then returns the
keys from position max(0, length - (W - 1)) on: attention knows the first one's position as
`past + n - returned length` (see gdsllm.models.layers.attention).
"""
from __future__ import annotations

import torch

MIN_CAPACITY = 16  # tokens; the first allocation of a layer


class KVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, max_len: int, windows: list[int | None] | None = None):
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.device, self.max_len = torch.device(device), max_len
        self.length = 0  # committed tokens (those every layer holds)
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.windows = list(windows) if windows is not None else [None] * num_layers
        assert len(self.windows) == num_layers and all(w is None or w > 0 for w in self.windows)
        self.start = [0] * num_layers  # absolute position of the first token each layer holds

    def _grow(self, layer: int, need: int) -> None:
        """Make room for `need` tokens from self.start[layer] on (dropping what a window no
        longer sees first)."""
        old = self.k[layer]
        cap = 0 if old is None else old.shape[1]
        if need <= cap:
            return
        start, held = self.start[layer], self.length - self.start[layer]
        w = self.windows[layer]
        if w is not None:
            keep = min(held, w - 1)  # the committed tokens a new token can still see
            need -= held - keep
            start, held = self.length - keep, keep
            if need <= cap and cap <= 2 * w + MIN_CAPACITY:  # shift in place: no new buffer
                src = slice(start - self.start[layer], self.length - self.start[layer])
                for t in (self.k[layer], self.v[layer]):
                    t[:, :keep] = t[:, src].clone()
                self.start[layer] = start
                return
        new_cap = max(MIN_CAPACITY, cap if w is None else min(cap, 2 * w))
        while new_cap < need:
            new_cap *= 2
        new_cap = min(new_cap, max(self.max_len if w is None else 2 * w, need))
        shape = (self.kv_heads, new_cap, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if old is not None and held:  # doubling: amortized O(1) copies per token
            src = slice(start - self.start[layer], self.length - self.start[layer])
            k[:, :held] = old[:, src]
            v[:, :held] = self.v[layer][:, src]
        self.k[layer], self.v[layer], self.start[layer] = k, v, start

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write n new keys/values ([kv_heads, n, head_dim]) after the committed tokens of `layer`;
        return views of the keys/values of that layer the new tokens may see, new ones included
        (all of them for a full-attention layer)."""
        n = k.shape[1]
        assert k.shape == v.shape == (self.kv_heads, n, self.head_dim), (k.shape, v.shape)
        assert self.length + n <= self.max_len, (self.length + n, self.max_len)
        self._grow(layer, self.length - self.start[layer] + n)
        at, end = self.length - self.start[layer], self.length - self.start[layer] + n
        self.k[layer][:, at:end] = k
        self.v[layer][:, at:end] = v
        w = self.windows[layer]
        first = 0 if w is None else max(0, self.length - (w - 1) - self.start[layer])
        return self.k[layer][:, first:end], self.v[layer][:, first:end]

    def advance(self, n: int) -> None:
        """Commit the n tokens every layer has appended in this pass."""
        self.length += n
        assert self.length <= self.max_len

    def truncate(self, n: int) -> None:
        """Forget every token after the first `n` (speculative decoding's rejected drafts); the
        next update overwrites them. Capacity is kept. A sliding layer must still hold the
        window before position n: true when n is at least the length before the last pass, as
        it drops keys only while growing, before a pass appends."""
        assert 0 <= n <= self.length, (n, self.length)
        for layer, w in enumerate(self.windows):
            assert w is None or self.start[layer] <= max(0, n - (w - 1)), (layer, n, self.start[layer])
        self.length = n

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)
