"""The paged KV cache: one pool of fixed-size blocks per decoder layer, shared by all sequences,
and a block table per sequence (vLLM's design, nano-vllm's block manager without prefix sharing).

    cache = PagedKVCache(num_layers=30, kv_heads=3, head_dim=64, dtype=torch.float32,
                         device="cpu", num_blocks=1024, block_size=16)
    cache.grow(seq_id, n)              # blocks for n more tokens (KVCacheFull if the pool is out)
    cache.assign(seq_id, table)        # or: the block ids the engine's books gave it (then grow
                                       # only checks they hold the n more tokens)
    slots = cache.slots(seq_id, n)     # flat slot index of each of those n new tokens
    cache.write(layer, slots, k, v)    # k, v: [n, kv_heads, head_dim]
    k, v = cache.gather(layer, seq_id, first, end)   # [kv_heads, end - first, head_dim]
    cache.advance(seq_id, n)           # every layer wrote them: commit
    cache.truncate(seq_id, m)          # roll back to the first m tokens (rejected drafts)
    cache.compact(seq_id, start, keep) # tokens at positions `keep` move to start, start+1, ...
    cache.free(seq_id)                 # its blocks go back to the pool

Layer `l`'s pool is `k[l]`, `v[l]`: [num_blocks, block_size, kv_heads, head_dim]; the token at
position t of a sequence lives in block `table[t // block_size]` at offset `t % block_size`, so
`k[l].view(-1, kv_heads, head_dim)[block * block_size + offset]` is one token (a "slot").

Why paged: memory is allocated once and known exactly (the service admits requests by free
blocks), growth never copies, and a decode step of any batch reads its keys in place through
the block tables, which is what a CUDA graph needs (gdsllm.models.paged_attention). Block 0 is a
scratch block never given to a sequence: padding rows of a graph's batch write there.

A cache allocates its own blocks (`grow`: a Runner used on its own, tests) or is handed every
sequence's table by the scheduler's books (`assign`: gdsllm.engine.blocks; the target's and its
draft model's caches get the same ids), never both: one set of books per cache.

A sliding-window layer uses the same table and attends to its window only; its blocks are not
freed early (one table serves every layer), so its memory is that of a full layer.
"""
from __future__ import annotations

import math

import torch

BLOCK_SIZE = 16  # tokens per block, as vLLM and nano-vllm's default
SCRATCH_BLOCK = 0


class KVCacheFull(RuntimeError):
    """The pool has fewer free blocks than a sequence needs."""


def kv_bytes_per_token(params, itemsize: int) -> int:
    """Keys and values of one token in every decoder layer (PagedKVCache.token_bytes, before
    there is a cache)."""
    return 2 * params.num_hidden_layers * params.num_key_value_heads * params.head_dim * itemsize


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return math.ceil(tokens / block_size)


class PagedKVCache:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, num_blocks: int, block_size: int = BLOCK_SIZE):
        if num_blocks < 2:
            raise ValueError(f"a paged KV cache needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.device, self.block_size, self.num_blocks = torch.device(device), block_size, num_blocks
        shape = (num_blocks, block_size, kv_heads, head_dim)
        # Readers weigh only slots written in this or earlier passes, but a masked-out slot still
        # enters a matmul with weight 0, and 0 * NaN is NaN: the pool must hold finite numbers.
        # Zeroed on CUDA (one memset); on the CPU a fresh large allocation is the kernel's zero
        # pages, touched (committed) only as tokens are written.
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        self.k = [alloc(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [alloc(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # pop() gives low ids first
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.given = False  # tables come from assign (the engine's books), not from the free list

    # -- bookkeeping ------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        """Blocks this cache may still hand out itself (none when the engine's books own them)."""
        return 0 if self.given else len(self._free)

    @property
    def capacity(self) -> int:
        """Tokens the cache holds (the scratch block left out)."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def token_bytes(self) -> int:
        """Bytes one token takes over all layers (keys and values)."""
        return 2 * len(self.k) * self.kv_heads * self.head_dim * self.k[0].element_size()

    @property
    def nbytes(self) -> int:
        return self.token_bytes * self.block_size * self.num_blocks

    def length(self, seq_id: int) -> int:
        """Committed tokens of `seq_id` (0 for one the cache does not know)."""
        return self.lengths.get(seq_id, 0)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.tables

    def assign(self, seq_id: int, table: list[int]) -> None:
        """Use the blocks `table` (ids the scheduler's books gave, in position order) for a new
        sequence. ValueError for a known sequence, a block id outside the pool, or a cache that
        allocated its own blocks."""
        if seq_id in self.tables:
            raise ValueError(f"sequence {seq_id} already has a block table")
        if not self.given and self.tables:
            raise ValueError("this KV cache allocates its own blocks (grow): it takes no tables")
        bad = [b for b in table if isinstance(b, bool) or not isinstance(b, int)
               or not SCRATCH_BLOCK < b < self.num_blocks]
        if bad:
            raise ValueError(f"sequence {seq_id}: block ids {bad[:5]} are outside the KV cache's "
                             f"blocks 1 to {self.num_blocks - 1}")
        self.given = True
        self.tables[seq_id], self.lengths[seq_id] = list(table), 0

    def grow(self, seq_id: int, n: int) -> None:
        """Make room for n tokens after the committed ones (a new seq_id starts empty); with
        assigned tables, check that its blocks hold them."""
        table = self.tables.setdefault(seq_id, [])
        self.lengths.setdefault(seq_id, 0)
        need = blocks_for(self.lengths[seq_id] + n, self.block_size) - len(table)
        if self.given and need > 0:
            raise KVCacheFull(f"sequence {seq_id}: its {len(table)} KV blocks hold "
                              f"{len(table) * self.block_size} tokens, not {self.lengths[seq_id] + n}")
        if need > len(self._free):
            raise KVCacheFull(f"sequence {seq_id}: the KV cache needs {need} more blocks of "
                              f"{self.block_size} tokens and has {len(self._free)} free of "
                              f"{self.num_blocks - 1}")
        for _ in range(max(0, need)):
            table.append(self._free.pop())

    def free(self, seq_id: int) -> None:
        """Give `seq_id`'s blocks back; a no-op for an unknown id."""
        table = self.tables.pop(seq_id, [])
        if not self.given:  # assigned blocks are the books' to give out again
            self._free.extend(reversed(table))
        self.lengths.pop(seq_id, None)

    def advance(self, seq_id: int, n: int) -> None:
        self.lengths[seq_id] += n
        assert self.lengths[seq_id] <= len(self.tables[seq_id]) * self.block_size

    def truncate(self, seq_id: int, n: int) -> None:
        """Forget every token after the first n; the blocks stay with the sequence (the next
        tokens overwrite them)."""
        assert 0 <= n <= self.length(seq_id), (n, self.length(seq_id))
        self.lengths[seq_id] = n

    def compact(self, seq_id: int, start: int, keep: list[int]) -> None:
        """Keep the tokens at positions `keep` (ascending, each >= start) as positions start,
        start + 1, ... in every layer and forget the rest after `start` (a token tree's accepted
        path, its rejected branches dropped). Blocks past the new length go back to the pool: a
        tree may have borrowed more than the sequence will ever hold."""
        n = self.length(seq_id)
        assert all(start <= a < b for a, b in zip(keep, keep[1:])) and (not keep or start <= keep[0])
        assert not keep or keep[-1] < n, (keep, n)
        moved = [(s, start + i) for i, s in enumerate(keep) if s != start + i]
        if moved:
            src = torch.tensor(self.slot_list_at(seq_id, [s for s, _ in moved]), device=self.device)
            dst = torch.tensor(self.slot_list_at(seq_id, [d for _, d in moved]), device=self.device)
            for pool in self.k + self.v:
                flat = pool.view(-1, self.kv_heads, self.head_dim)
                flat.index_copy_(0, dst, flat.index_select(0, src))
        self.lengths[seq_id] = start + len(keep)
        table = self.tables[seq_id]
        spare = [] if self.given else table[blocks_for(self.lengths[seq_id], self.block_size):]
        if spare:  # assigned tables are the books' (a tree fits inside them: no borrowing)
            del table[len(table) - len(spare):]
            self._free.extend(reversed(spare))

    # -- addressing -------------------------------------------------------------------------
    def slot_list(self, seq_id: int, start: int, end: int) -> list[int]:
        """Flat slot indices of positions [start, end) of `seq_id` (host ints)."""
        return self.slot_list_at(seq_id, range(start, end))

    def room(self, seq_id: int, n: int) -> tuple[int, int]:
        """(blocks `seq_id` needs for n more tokens, tokens its blocks then hold beyond them)."""
        end = self.length(seq_id) + n
        have, want = len(self.tables.get(seq_id, ())), blocks_for(end, self.block_size)
        return max(0, want - have), max(have, want) * self.block_size - end

    def slot_list_at(self, seq_id: int, positions: list[int]) -> list[int]:
        """Flat slot indices of the given positions of `seq_id` (host ints)."""
        t, bs = self.tables[seq_id], self.block_size
        return [t[p // bs] * bs + p % bs for p in positions]

    def table_row(self, seq_id: int, width: int) -> list[int]:
        """`seq_id`'s block table padded with the scratch block to `width` entries."""
        t = self.tables.get(seq_id, [])
        assert len(t) <= width, (len(t), width)
        return t + [SCRATCH_BLOCK] * (width - len(t))

    # -- data -------------------------------------------------------------------------------
    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [n, kv_heads, head_dim] into the flat slots [n] (a device tensor)."""
        if k.dtype != self.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        self.k[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, k)
        self.v[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, v)

    def span(self, layer: int, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at the consecutive slots [first, first + n) as [kv_heads, n,
        head_dim]: views of the pool, what `gather` copies for such slots."""
        k = self.k[layer].view(-1, self.kv_heads, self.head_dim)[first:first + n]
        v = self.v[layer].view(-1, self.kv_heads, self.head_dim)[first:first + n]
        return k.transpose(0, 1), v.transpose(0, 1)

    def span4(self, layer: int, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """span(...) with a leading batch dimension, [1, kv_heads, n, head_dim]: the same views
        as span(...)[i][None], one strided view each."""
        h, d = self.kv_heads, self.head_dim
        size, stride = (1, h, n, d), (h * d, d, h * d, 1)
        return (self.k[layer].as_strided(size, stride, first * h * d),
                self.v[layer].as_strided(size, stride, first * h * d))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots` [L] as [kv_heads, L, head_dim] (a copy)."""
        k = self.k[layer].view(-1, self.kv_heads, self.head_dim).index_select(0, slots)
        v = self.v[layer].view(-1, self.kv_heads, self.head_dim).index_select(0, slots)
        return k.transpose(0, 1), v.transpose(0, 1)
